//! LoRA for the Wan 2.1 DiT, merged into the weights as ComfyUI's `LoraLoaderModelOnly` does.
//!
//! 1. [`LoraFile::read`] reads a `.safetensors` LoRA and sorts its keys by module. Every key
//!    format in use for Wan is recognised:
//!    - pairs: PEFT `lora_A.weight` / `lora_B.weight`, kohya `lora_down.weight` /
//!      `lora_up.weight`, each with an optional `.alpha`;
//!    - full deltas: `.diff` (weight, e.g. norms) and `.diff_b` (bias), PEFT `lora_B.bias`;
//!    - namings ([`Naming`]): original Wan names behind `diffusion_model.` /
//!      `model.diffusion_model.`, diffusers names behind `transformer.`, kohya / musubi flat
//!      `lora_unet_blocks_0_self_attn_q`, Wan-Fun `lora_unet__…`, and unprefixed names.
//! 2. [`MergePlan::new`] matches the modules of one or more files (each with a strength) to the
//!    model's weights, given under their original Wan names with shapes, and checks every
//!    shape. Nothing is silently skipped: unknown suffixes, keys that fit no weight, half pairs,
//!    non-finite alphas, shape mismatches and empty files are errors that name the keys.
//! 3. [`MergePlan::apply`] merges one weight (`W + Σ strength · scale · ΔW`, in f32, cast back
//!    to the weight's dtype); [`LoraBackend`] does it for every tensor a `VarBuilder` hands out.
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! use std::sync::Arc;
//! # fn f(vb: candle_nn::VarBuilder, shapes: BTreeMap<String, candle_core::Shape>,
//! #      diffusers_to_original: &dyn Fn(&str) -> Option<String>) -> vpipe_lora::Result<()> {
//! let lora = vpipe_lora::LoraFile::read("wan_lora.safetensors")?;
//! let plan = vpipe_lora::MergePlan::new(&[(&lora, 0.8)], &shapes, diffusers_to_original)?;
//! for line in plan.summary() {
//!     println!("{line}");
//! }
//! let plan = Arc::new(plan);
//! let vb = vpipe_lora::LoraBackend::wrap(vb, plan.clone());
//! // ... build the DiT from `vb` ...
//! plan.ensure_all_applied()?;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![deny(unsafe_code)]

mod backend;
#[cfg(feature = "cuda")]
mod device;
mod error;
mod file;
mod plan;

pub use backend::LoraBackend;
pub use error::{Error, Result};
pub use file::{LoraFile, Naming, PairStyle};
pub use plan::{FileSummary, MergePlan};
