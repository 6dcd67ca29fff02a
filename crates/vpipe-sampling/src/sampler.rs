//! The steppers: Euler and multistep UniPC on flow predictions, as diffusers runs them.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::schedule::{SamplerKind, Schedule};

/// A stateful sampler walking a [`Schedule`]: call [`Sampler::step`] once per step with the
/// model's prediction at [`Sampler::timestep`].
///
/// The model output is a flow velocity `v` (Wan predicts `noise − x0`): the clean-sample
/// estimate is `x0 = x − σ·v`. Internally everything runs in f32, whatever the dtype of the
/// latents (inputs are cast to f32, the new sample is cast back to the dtype of `sample`);
/// UniPC's history stays in f32 between steps.
///
/// - Euler (`FlowMatchEulerDiscreteScheduler.step`): `x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i`,
///   with `σ_{i+1} − σ_i` taken in float32 as diffusers does.
/// - UniPC (`UniPCMultistepScheduler.step`, bh2, `solver_order` 2, predict_x0,
///   `lower_order_final`): each step first corrects the sample it is given with the new
///   prediction (UniC, from step 1 on), then predicts the next sample (UniP), first order at
///   the first step (no history yet) and at the last step, second order otherwise.
#[derive(Debug, Clone)]
pub struct Sampler {
    schedule: Schedule,
    step_index: usize,
    unipc: UniPcState,
}

/// What UniPC carries from one step to the next.
#[derive(Debug, Clone, Default)]
struct UniPcState {
    /// x0 predictions of the last two steps, newest last (diffusers' `model_outputs`).
    x0_prev: Option<Tensor>,
    x0_last: Option<Tensor>,
    /// The sample the last predictor started from (diffusers' `last_sample`).
    last_sample: Option<Tensor>,
    /// Order of the last predictor; the next corrector uses it (diffusers' `this_order`).
    last_order: usize,
    /// Steps run so far, capped at the solver order (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
}

/// diffusers' `solver_order` for the Wan config.
const UNIPC_ORDER: usize = 2;

impl Sampler {
    /// A sampler at the start of `schedule`, with no history.
    pub fn new(schedule: Schedule) -> Self {
        Self {
            schedule,
            step_index: 0,
            unipc: UniPcState::default(),
        }
    }

    /// Moves the history the sampler carries between steps to `device` (between two phases
    /// of one denoising loop, so that no tensor of it stays on the compute device).
    pub fn move_history_to(&mut self, device: &candle_core::Device) -> Result<()> {
        let state = &mut self.unipc;
        for slot in [
            &mut state.x0_prev,
            &mut state.x0_last,
            &mut state.last_sample,
        ] {
            if let Some(t) = slot.take() {
                *slot = Some(t.to_device(device)?);
            }
        }
        Ok(())
    }

    /// The schedule this sampler walks.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Steps already run.
    pub fn step_index(&self) -> usize {
        self.step_index
    }

    /// Whether every step of the schedule has run.
    pub fn is_done(&self) -> bool {
        self.step_index >= self.schedule.steps()
    }

    /// The timestep to give the model for the next step, `None` once done.
    pub fn timestep(&self) -> Option<f64> {
        self.schedule.timesteps().get(self.step_index).copied()
    }

    /// The sigma of the sample the next step takes, `None` once done.
    pub fn sigma(&self) -> Option<f64> {
        if self.is_done() {
            None
        } else {
            Some(self.schedule.sigmas()[self.step_index])
        }
    }

    /// Runs one step: from `sample` (at [`Self::sigma`]) and the model's velocity prediction
    /// for it, the sample at the next sigma.
    ///
    /// # Shapes
    /// `model_output` and `sample`: the same shape, any rank (e.g. latents `[B, C, T, H, W]`);
    /// the result has that shape and the dtype of `sample`.
    ///
    /// # Errors
    /// [`Error::ScheduleExhausted`] after the last step, [`Error::ShapeMismatch`] for shapes
    /// that differ; candle errors (e.g. tensors on different devices).
    pub fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let steps = self.schedule.steps();
        if self.step_index >= steps {
            return Err(Error::ScheduleExhausted { steps });
        }
        if model_output.dims() != sample.dims() {
            return Err(Error::ShapeMismatch {
                what: "Sampler::step model_output (must match sample)",
                expected: sample.dims().to_vec(),
                got: model_output.dims().to_vec(),
            });
        }
        let dtype = sample.dtype();
        let v = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let next = match self.schedule.kind() {
            SamplerKind::Euler => self.euler_step(&v, &x)?,
            SamplerKind::UniPc => self.unipc_step(&v, x)?,
        };
        self.step_index += 1;
        Ok(next.to_dtype(dtype)?)
    }

    fn euler_step(&self, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        let s = self.schedule.sigmas();
        let i = self.step_index;
        let dt = s[i + 1] as f32 - s[i] as f32;
        Ok((x + (v * f64::from(dt))?)?)
    }

    fn unipc_step(&mut self, v: &Tensor, x: Tensor) -> Result<Tensor> {
        let i = self.step_index;
        let sigma = self.schedule.sigmas()[i];
        let x0 = (&x - (v * sigma)?)?;

        let st = &self.unipc;
        let x = match (&st.last_sample, &st.x0_last) {
            (Some(last_sample), Some(x0_last)) if i > 0 => {
                let m1 = st.x0_prev.as_ref().filter(|_| st.last_order == 2);
                self.unic(&x0, last_sample, x0_last, m1)?
            }
            _ => x,
        };

        let st = &mut self.unipc;
        st.x0_prev = st.x0_last.take();
        st.x0_last = Some(x0.clone());
        let steps_left = self.schedule.steps() - i;
        let order = UNIPC_ORDER.min(steps_left).min(st.lower_order_nums + 1);
        st.last_order = order;
        st.last_sample = Some(x.clone());
        st.lower_order_nums = (st.lower_order_nums + 1).min(UNIPC_ORDER);

        let st = &self.unipc;
        // Order 2 needs one earlier prediction, which the warm-up (order ≤ steps run + 1)
        // guarantees.
        debug_assert!(order == 1 || st.x0_prev.is_some());
        let m1 = st.x0_prev.as_ref().filter(|_| order == 2);
        self.unip(&x, &x0, m1)
    }

    /// λ = log(α) − log(σ) of flow sigma `s` (α = 1 − σ); +∞ at σ = 0.
    fn lambda(&self, index: usize) -> f64 {
        let s = self.schedule.sigmas()[index];
        (1.0 - s).ln() - s.ln()
    }

    /// UniP (bh2, predict_x0): from `x` at σ_i to σ_{i+1}. `m0` is the x0 prediction at σ_i;
    /// `m1`, the one at σ_{i−1}, is given for a second-order step.
    fn unip(&self, x: &Tensor, m0: &Tensor, m1: Option<&Tensor>) -> Result<Tensor> {
        let i = self.step_index;
        let sig = self.schedule.sigmas();
        let (sigma_t, sigma_s0) = (sig[i + 1], sig[i]);
        let alpha_t = 1.0 - sigma_t;
        let (lambda_t, lambda_s0) = (self.lambda(i + 1), self.lambda(i));
        let h = lambda_t - lambda_s0;
        let hh = -h;
        // bh2 takes B(h) = e^hh − 1, the same value as h·φ1(h). At the last step σ_t = 0,
        // h = +∞: both are −1 and the step lands on m0.
        let h_phi_1 = hh.exp_m1();
        let b_h = h_phi_1;
        let x_t = ((x * (sigma_t / sigma_s0))? - (m0 * (alpha_t * h_phi_1))?)?;
        match m1 {
            None => Ok(x_t),
            Some(m1) => {
                let rk = (self.lambda(i - 1) - lambda_s0) / h;
                let d1 = ((m1 - m0)? * (1.0 / rk))?;
                // diffusers fixes rho_p = 0.5 at order 2.
                let pred_res = (d1 * 0.5)?;
                Ok((x_t - (pred_res * (alpha_t * b_h))?)?)
            }
        }
    }

    /// UniC (bh2, predict_x0): the corrected sample at σ_i, rebuilt from `last_sample` (at
    /// σ_{i−1}, where the last predictor started) with the new x0 prediction `model_t` at σ_i.
    /// `m0` is the x0 prediction at σ_{i−1}; `m1`, the one at σ_{i−2}, is given when the last
    /// predictor was second order (the corrector takes its order).
    fn unic(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        m0: &Tensor,
        m1: Option<&Tensor>,
    ) -> Result<Tensor> {
        let i = self.step_index;
        let sig = self.schedule.sigmas();
        let (sigma_t, sigma_s0) = (sig[i], sig[i - 1]);
        let alpha_t = 1.0 - sigma_t;
        let (lambda_t, lambda_s0) = (self.lambda(i), self.lambda(i - 1));
        let h = lambda_t - lambda_s0;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = h_phi_1; // bh2
                           // b_k = h_phi_k · k! / B(h), h_phi_1 = e^hh − 1, h_phi_{k+1} = h_phi_k / hh − 1/(k+1)!.
        let h_phi_k1 = h_phi_1 / hh - 1.0;
        let b1 = h_phi_k1 / b_h;
        let x_t = ((last_sample * (sigma_t / sigma_s0))? - (m0 * (alpha_t * h_phi_1))?)?;
        let d1_t = (model_t - m0)?;
        let corr = match m1 {
            // diffusers fixes rho_c = 0.5 at order 1.
            None => (d1_t * 0.5)?,
            Some(m1) => {
                let h_phi_k2 = h_phi_k1 / hh - 0.5;
                let b2 = h_phi_k2 * 2.0 / b_h;
                let rk = (self.lambda(i - 2) - lambda_s0) / h;
                // Solve [[1, 1], [rk, 1]] · rho = [b1, b2].
                let rho0 = (b1 - b2) / (1.0 - rk);
                let rho1 = b1 - rho0;
                let d1 = ((m1 - m0)? * (1.0 / rk))?;
                ((d1 * rho0)? + (d1_t * rho1)?)?
            }
        };
        Ok((x_t - (corr * (alpha_t * b_h))?)?)
    }
}

/// Noises a clean latent to flow sigma `sigma`: `σ·noise + (1 − σ)·x0`.
///
/// What diffusers' `FlowMatchEulerDiscreteScheduler.scale_noise` and the flow branch of
/// `UniPCMultistepScheduler.add_noise` compute (the two agree to the bit), and ComfyUI's
/// `CONST.noise_scaling`. For video-to-video, `sigma` is the first sigma of
/// [`Schedule::for_strength`]. Computed in f32 (`1 − σ` rounded to f32 first, as there), the
/// result in the dtype of `x0`.
///
/// # Shapes
/// `x0` and `noise`: the same shape; the result has it too.
///
/// # Errors
/// [`Error::BadSigma`] outside [0, 1], [`Error::ShapeMismatch`] for shapes that differ.
pub fn noise_latents(x0: &Tensor, noise: &Tensor, sigma: f64) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&sigma) {
        return Err(Error::BadSigma {
            what: "noise_latents",
            sigma,
        });
    }
    if noise.dims() != x0.dims() {
        return Err(Error::ShapeMismatch {
            what: "noise_latents noise (must match x0)",
            expected: x0.dims().to_vec(),
            got: noise.dims().to_vec(),
        });
    }
    let sigma32 = sigma as f32;
    let x0_32 = x0.to_dtype(DType::F32)?;
    let noise32 = noise.to_dtype(DType::F32)?;
    let mixed = ((noise32 * f64::from(sigma32))? + (x0_32 * f64::from(1.0f32 - sigma32))?)?;
    Ok(mixed.to_dtype(x0.dtype())?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn wave(phase: f32, shape: &[usize]) -> Tensor {
        // Deterministic, non-trivial values without an RNG.
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.37 + phase).sin() * 1.7)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// On a straight flow (the model always predicts v = noise − x0) both samplers stay on the
    /// path: the sample at σ_i is σ_i·noise + (1 − σ_i)·x0, and the last step lands on x0.
    /// For UniPC this holds because every x0 prediction is the same, so the multistep terms
    /// vanish and the exponential-integrator update is exact.
    #[test]
    fn straight_flow_stays_on_the_path() {
        let shape = [1, 4, 2, 3, 3];
        let x0 = wave(0.0, &shape);
        let noise = wave(1.3, &shape);
        let v = (&noise - &x0).unwrap();
        for kind in [SamplerKind::Euler, SamplerKind::UniPc] {
            for (steps, shift) in [(1, 3.0), (4, 3.0), (10, 5.0), (30, 8.0)] {
                let schedule = Schedule::new(kind, steps, shift).unwrap();
                let sigmas = schedule.sigmas().to_vec();
                let mut x = noise_latents(&x0, &noise, sigmas[0]).unwrap();
                let mut sampler = Sampler::new(schedule);
                for sigma in &sigmas[1..] {
                    x = sampler.step(&v, &x).unwrap();
                    let on_path = noise_latents(&x0, &noise, *sigma).unwrap();
                    let e = max_abs(&x, &on_path);
                    assert!(
                        e < 1e-5,
                        "{kind} {steps} steps shift {shift} σ {sigma}: {e}"
                    );
                }
                assert!(sampler.is_done());
                assert!(max_abs(&x, &x0) < 1e-5);
            }
        }
    }

    #[test]
    fn euler_step_by_hand() {
        let schedule = Schedule::new(SamplerKind::Euler, 4, 3.0).unwrap();
        let s = schedule.sigmas().to_vec();
        let mut sampler = Sampler::new(schedule);
        assert_eq!(sampler.timestep(), Some(1000.0));
        assert_eq!(sampler.sigma(), Some(1.0));
        let x = Tensor::new(&[2.0f32, -1.0], &Device::Cpu).unwrap();
        let v = Tensor::new(&[1.0f32, 4.0], &Device::Cpu).unwrap();
        let got = sampler.step(&v, &x).unwrap().to_vec1::<f32>().unwrap();
        let dt = s[1] as f32 - s[0] as f32;
        assert_eq!(got, [2.0 + dt, -1.0 + 4.0 * dt]);
        assert_eq!(sampler.step_index(), 1);
        assert_eq!(sampler.sigma(), Some(s[1]));
    }

    /// A one-step UniPC run is a single first-order step to σ = 0: it returns the x0
    /// prediction x − σ·v.
    #[test]
    fn unipc_single_step_returns_the_x0_prediction() {
        let schedule = Schedule::new(SamplerKind::UniPc, 1, 3.0).unwrap();
        let sigma = schedule.sigmas()[0];
        let x = wave(0.2, &[2, 3]);
        let v = wave(0.9, &[2, 3]);
        let got = Sampler::new(schedule).step(&v, &x).unwrap();
        let want = (&x - (&v * sigma).unwrap()).unwrap();
        assert!(max_abs(&got, &want) < 1e-6);
    }

    /// bf16 latents come back in bf16, and the arithmetic runs in f32: the bf16 step equals
    /// the f32 step on the same (bf16-valued) inputs, rounded once to bf16.
    #[test]
    fn keeps_the_sample_dtype() {
        let shape = [1, 2, 1, 2, 2];
        let to = |t: &Tensor, d| t.to_dtype(d).unwrap();
        let x16 = to(&wave(0.1, &shape), DType::BF16);
        let v16 = to(&wave(0.7, &shape), DType::BF16);
        for kind in [SamplerKind::Euler, SamplerKind::UniPc] {
            let schedule = Schedule::new(kind, 4, 3.0).unwrap();
            let out16 = Sampler::new(schedule.clone()).step(&v16, &x16).unwrap();
            let out32 = Sampler::new(schedule)
                .step(&to(&v16, DType::F32), &to(&x16, DType::F32))
                .unwrap();
            assert_eq!(out16.dtype(), DType::BF16);
            assert_eq!(out32.dtype(), DType::F32);
            let flat = |t: &Tensor| {
                to(t, DType::F32)
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(flat(&out16), flat(&to(&out32, DType::BF16)), "{kind}");
        }
    }

    #[test]
    fn misuse_is_a_clear_error() {
        let schedule = Schedule::new(SamplerKind::UniPc, 2, 3.0).unwrap();
        let mut sampler = Sampler::new(schedule);
        let x = wave(0.0, &[1, 2, 2]);
        let err = sampler.step(&wave(0.0, &[1, 2, 3]), &x).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Sampler::step model_output (must match sample): expected shape [1, 2, 2], got \
             shape [1, 2, 3]"
        );
        assert_eq!(sampler.step_index(), 0, "a refused step does not advance");
        let x = sampler.step(&x, &x).unwrap();
        let x = sampler.step(&x, &x).unwrap();
        assert!(sampler.is_done());
        assert_eq!(sampler.timestep(), None);
        assert_eq!(sampler.sigma(), None);
        assert_eq!(
            sampler.step(&x, &x).unwrap_err().to_string(),
            "the sampler has already run all 2 steps of its schedule"
        );

        let err = noise_latents(&x, &x, 1.5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "noise_latents: sigma must be in [0, 1], got 1.5"
        );
        let err = noise_latents(&x, &wave(0.0, &[2, 2]), 0.5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "noise_latents noise (must match x0): expected shape [1, 2, 2], got shape [2, 2]"
        );
    }

    #[test]
    fn noise_latents_by_hand() {
        let x0 = Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let noise = Tensor::new(&[0.5f32, 4.0], &Device::Cpu).unwrap();
        let got = noise_latents(&x0, &noise, 0.25)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, [0.25 * 0.5 + 0.75, 0.25 * 4.0 - 0.75 * 2.0]);
        assert_eq!(
            noise_latents(&x0, &noise, 1.0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [0.5, 4.0]
        );
        assert_eq!(
            noise_latents(&x0, &noise, 0.0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1.0, -2.0]
        );
    }
}
