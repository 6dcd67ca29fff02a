//! Flow-matching sampling for Wan 2.1: the flow shift, Euler and UniPC schedules and steps,
//! denoise strength for video-to-video, and classifier-free guidance.
//!
//! Reference: diffusers 0.42.1 `FlowMatchEulerDiscreteScheduler(shift=s)` and
//! `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
//! num_train_timesteps=1000, flow_shift=s)` (the config the diffusers Wan pipelines ship:
//! solver_order 2, bh2, predict_x0, lower_order_final, final_sigmas_type "zero"), and
//! `WanVideoToVideoPipeline` for the strength. Schedules match diffusers' values to the bit
//! (it mixes float32 and float64 arithmetic; see [`Schedule`]); the parity tests in `tests/`
//! compare samples, sigmas and timesteps with fixtures written by
//! `tools/fixtures/make_sampling_fixtures.py` (≤ 1e-5 max abs).
//!
//! Note that diffusers' UniPC differs from the original Wan `FlowUniPCMultistepScheduler`
//! (σ from 1 rather than 0.999: timesteps differ by 1); this crate follows diffusers.
//!
//! The model is a velocity predictor: for a latent `x` at noise level σ it returns
//! `v ≈ noise − x0`, so `x0 = x − σ·v`, and noising is `x = σ·noise + (1 − σ)·x0`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use vpipe_sampling::{cfg, Sampler, SamplerKind, Schedule};
//!
//! let schedule = Schedule::new("unipc".parse::<SamplerKind>()?, 4, 3.0)?;
//! assert_eq!(schedule.timesteps(), &[999.0, 900.0, 750.0, 500.0]);
//!
//! let mut x = Tensor::randn(0f32, 1.0, (1, 16, 2, 4, 4), &Device::Cpu)?;
//! let mut sampler = Sampler::new(schedule);
//! while let Some(t) = sampler.timestep() {
//!     // a real pipeline calls the model twice here, at timestep `t`
//!     let _ = t;
//!     let v_cond = x.ones_like()?;
//!     let v_uncond = x.zeros_like()?;
//!     let v = cfg(&v_cond, &v_uncond, 5.0)?;
//!     x = sampler.step(&v, &x)?;
//! }
//! assert!(sampler.is_done());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

mod error;
mod guidance;
mod run;
mod sampler;
mod schedule;

pub use crate::error::{Error, Result};
pub use crate::guidance::{cfg, cfg_batched};
pub use crate::run::{run_on_schedule, run_schedule, ScheduleRun};
pub use crate::sampler::{noise_latents, Sampler};
pub use crate::schedule::{shift_sigma, SamplerKind, Schedule};
