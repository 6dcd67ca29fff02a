//! The flow shift and the Euler / UniPC schedules, built as diffusers builds them.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// diffusers' `num_train_timesteps` for Wan: timestep = 1000·σ.
const NUM_TRAIN_TIMESTEPS: f64 = 1000.0;

/// The flow shift `σ' = s·σ / (1 + (s − 1)·σ)`.
///
/// The same map everywhere: ComfyUI `ModelSamplingSD3` (`time_snr_shift`), diffusers
/// `FlowMatchEulerDiscreteScheduler(shift)` and `UniPCMultistepScheduler(flow_shift)`, the
/// original Wan `FlowUniPCMultistepScheduler`. `s > 1` keeps σ high for longer (more steps at
/// high noise). Plain f64 arithmetic; for a valid shift (finite, > 0) it maps [0, 1] onto [0, 1]
/// with 0 ↦ 0 and 1 ↦ 1. [`Schedule::new`] validates the shift, this function does not.
pub fn shift_sigma(sigma: f64, shift: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// Which flow-matching sampler a schedule is built for and run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// First-order Euler: diffusers `FlowMatchEulerDiscreteScheduler(shift=s)`.
    Euler,
    /// Multistep UniPC (bh2, order 2) on flow sigmas: diffusers
    /// `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
    /// flow_shift=s)`, the scheduler the diffusers Wan pipelines ship.
    #[serde(alias = "uni_pc")]
    UniPc,
}

impl SamplerKind {
    /// The name [`FromStr`] reads and [`fmt::Display`] writes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::UniPc => "unipc",
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = Error;

    /// `"euler"`, or `"unipc"` / `"uni_pc"` (ComfyUI's name), case-insensitive.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "euler" => Ok(Self::Euler),
            "unipc" | "uni_pc" => Ok(Self::UniPc),
            _ => Err(Error::UnknownSampler(s.to_string())),
        }
    }
}

/// A sampling schedule: `steps + 1` sigmas ending in 0, and the `steps` timesteps the model
/// is called with (timestep i goes with sigma i).
///
/// Values are those diffusers 0.42.1 computes, to the bit where it matters: it mixes float32
/// torch and float64 numpy arithmetic, and this type redoes each operation in the same
/// precision. The sigmas are float32 values (held as f64). The timesteps are float32
/// `1000·σ` for Euler and, for UniPC, `1000·σ` truncated to an integer (diffusers stores them as
/// int64, so the model gets 999, 900, … rather than 999.999, 900.12, …).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    kind: SamplerKind,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
}

impl Schedule {
    /// The full schedule of `steps` steps at flow shift `shift` for the sampler `kind`.
    ///
    /// - Euler, as `FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps)`: the training
    ///   table's shifted σ at t = 1000 and t = 1 (float32) bound a float64 linspace of `steps`
    ///   timesteps, which are shifted in float64 and rounded to float32.
    /// - UniPC, as the flow-sigmas branch of `UniPCMultistepScheduler.set_timesteps(steps)`:
    ///   `linspace(1, 1/1000, steps + 1)` without its last value, shifted in float64; a first
    ///   σ within 1e-6 of 1 is lowered by 1e-6 (so that log(1 − σ) stays finite).
    ///
    /// # Errors
    /// [`Error::ZeroSteps`] for `steps == 0`, [`Error::BadShift`] unless `shift` is finite and
    /// above 0.
    pub fn new(kind: SamplerKind, steps: usize, shift: f64) -> Result<Self> {
        if steps == 0 {
            return Err(Error::ZeroSteps);
        }
        if !(shift.is_finite() && shift > 0.0) {
            return Err(Error::BadShift(shift));
        }
        let (sigmas, timesteps) = match kind {
            SamplerKind::Euler => euler_schedule(steps, shift),
            SamplerKind::UniPc => unipc_schedule(steps, shift),
        };
        Ok(Self {
            kind,
            sigmas,
            timesteps,
        })
    }

    /// The sampler this schedule is for.
    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// Number of steps (model calls).
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// `steps + 1` sigmas, decreasing, the last one 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// `steps` timesteps, the model's `t` at each step.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The part of this schedule that a video-to-video run of denoise strength `strength`
    /// executes, as diffusers' `WanVideoToVideoPipeline` (0.42.1) picks it.
    ///
    /// `get_timesteps` keeps `k = min(int(steps·strength), steps)` steps: the last `k` of the
    /// schedule, from index `steps − k` on (the scheduler order is 1 for both samplers). The clean
    /// latent is then noised to the first kept sigma with [`noise_latents`](crate::noise_latents)
    /// (`sigmas()[0]` of the returned schedule), and the sampler runs the kept steps from there.
    /// Running a fresh sampler over the returned schedule is exactly what diffusers does: its
    /// step index starts at `steps − k` (the pipeline finds it from the first timestep), UniPC
    /// starts with no history, and its `lower_order_final` counts the steps left, which are the
    /// same. `int(·)` truncates the floating-point product, so 10 × 0.7 = 7.000000000000001
    /// keeps 7 steps and 100 × 0.29 = 28.999999999999996 keeps 28.
    ///
    /// **ComfyUI's `denoise`** differs: `KSampler.set_steps` builds a *longer* schedule of
    /// `int(steps / denoise)` steps and runs its last `steps` (`sigmas[-(steps + 1):]`), so it
    /// always makes `steps` model calls and starts at about the same σ. diffusers' strength
    /// instead keeps the schedule of `steps` and runs fewer: with 10 steps, strength 0.6 runs 6
    /// steps of the 10-step schedule, while ComfyUI denoise 0.6 runs 10 steps of a 16-step
    /// schedule. Both cut a schedule and keep its tail; they differ in which schedule is cut
    /// (ComfyUI's own sigma tables and samplers also differ from diffusers' in other ways).
    ///
    /// Meant for a full schedule; on a schedule already cut it cuts again, relative to that
    /// schedule's steps.
    ///
    /// # Errors
    /// [`Error::BadStrength`] outside (0, 1] (NaN included); [`Error::NoStepLeft`] when
    /// `int(steps·strength)` is 0 (diffusers would run nothing and return the noised latent).
    pub fn for_strength(&self, strength: f64) -> Result<Self> {
        let steps = self.steps();
        let first = strength_first_step(steps, strength)?;
        Ok(Self {
            kind: self.kind,
            sigmas: self.sigmas[first..].to_vec(),
            timesteps: self.timesteps[first..].to_vec(),
        })
    }
}

/// The index of the first step a run of denoise `strength` executes (diffusers
/// `get_timesteps`).
fn strength_first_step(steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::BadStrength(strength));
    }
    // Python's int() of a positive float truncates; the product is in [0, steps].
    let kept = ((steps as f64 * strength).trunc() as usize).min(steps);
    if kept == 0 {
        let mut min_strength = 1.0 / steps as f64;
        while (steps as f64 * min_strength) < 1.0 {
            min_strength = min_strength.next_up();
        }
        return Err(Error::NoStepLeft {
            steps,
            strength,
            min_strength,
        });
    }
    Ok(steps - kept)
}

/// numpy's `linspace(start, stop, num)` in float64, operation for operation
/// (`arange(num) * step + start`, the last value set to `stop`), so that truncations downstream
/// see the same values.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// `FlowMatchEulerDiscreteScheduler(shift=shift)` + `set_timesteps(steps)`.
fn euler_schedule(steps: usize, shift: f64) -> (Vec<f64>, Vec<f64>) {
    // `__init__` shifts its float32 training table t/1000, t = 1000 … 1, in float32 torch
    // arithmetic (the Python scalars become float32 operands).
    let shift_f32 = |sigma: f32| {
        let num = shift as f32 * sigma;
        let den = 1.0f32 + (shift - 1.0) as f32 * sigma;
        num / den
    };
    let table = |t: f32| t / NUM_TRAIN_TIMESTEPS as f32;
    let sigma_max = f64::from(shift_f32(table(1000.0)));
    let sigma_min = f64::from(shift_f32(table(1.0)));
    // `set_timesteps`: float64 numpy from here until the float32 cast.
    let timesteps = linspace(
        sigma_max * NUM_TRAIN_TIMESTEPS,
        sigma_min * NUM_TRAIN_TIMESTEPS,
        steps,
    );
    let sigmas32: Vec<f32> = timesteps
        .iter()
        .map(|t| shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift) as f32)
        .collect();
    let timesteps = sigmas32
        .iter()
        .map(|&s| f64::from(s * NUM_TRAIN_TIMESTEPS as f32))
        .collect();
    let mut sigmas: Vec<f64> = sigmas32.into_iter().map(f64::from).collect();
    sigmas.push(0.0);
    (sigmas, timesteps)
}

/// The flow-sigmas branch of `UniPCMultistepScheduler.set_timesteps(steps)`.
fn unipc_schedule(steps: usize, shift: f64) -> (Vec<f64>, Vec<f64>) {
    let mut sigmas: Vec<f64> = linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1)[..steps]
        .iter()
        .map(|&s| shift_sigma(s, shift))
        .collect();
    const EPS: f64 = 1e-6;
    if (sigmas[0] - 1.0).abs() < EPS {
        sigmas[0] -= EPS;
    }
    // Truncated from the float64 sigmas (numpy astype(int64)), before the float32 cast.
    let timesteps = sigmas
        .iter()
        .map(|s| (s * NUM_TRAIN_TIMESTEPS).trunc())
        .collect();
    let mut sigmas: Vec<f64> = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
    sigmas.push(0.0);
    (sigmas, timesteps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_formula() {
        // s·σ / (1 + (s − 1)·σ) by hand: 3·0.5 / (1 + 2·0.5) = 0.75.
        assert_eq!(shift_sigma(0.5, 3.0), 0.75);
        // 5·0.25 / (1 + 4·0.25) = 0.625.
        assert_eq!(shift_sigma(0.25, 5.0), 0.625);
        for s in [0.5, 1.0, 3.0, 5.0, 8.0, 12.0] {
            assert_eq!(shift_sigma(0.0, s), 0.0, "shift {s} keeps 0");
            assert_eq!(shift_sigma(1.0, s), 1.0, "shift {s} keeps 1");
        }
        for i in 0..=20 {
            let sigma = f64::from(i) / 20.0;
            assert_eq!(shift_sigma(sigma, 1.0), sigma, "shift 1 is the identity");
            // Shifts compose by multiplying: shift_b(shift_a(σ)) = shift_{a·b}(σ).
            let composed = shift_sigma(shift_sigma(sigma, 3.0), 2.5);
            assert!((composed - shift_sigma(sigma, 7.5)).abs() < 1e-15);
            // Shift 1/s undoes shift s.
            assert!((shift_sigma(shift_sigma(sigma, 8.0), 1.0 / 8.0) - sigma).abs() < 1e-15);
            // s > 1 raises σ inside (0, 1).
            if i > 0 && i < 20 {
                assert!(shift_sigma(sigma, 3.0) > sigma);
            }
        }
    }

    #[test]
    fn sampler_names() {
        assert_eq!("euler".parse::<SamplerKind>().unwrap(), SamplerKind::Euler);
        assert_eq!("unipc".parse::<SamplerKind>().unwrap(), SamplerKind::UniPc);
        assert_eq!("uni_pc".parse::<SamplerKind>().unwrap(), SamplerKind::UniPc);
        assert_eq!("UniPC".parse::<SamplerKind>().unwrap(), SamplerKind::UniPc);
        for kind in [SamplerKind::Euler, SamplerKind::UniPc] {
            assert_eq!(kind.to_string().parse::<SamplerKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(serde_json::from_str::<SamplerKind>(&json).unwrap(), kind);
        }
        assert_eq!(
            serde_json::from_str::<SamplerKind>("\"uni_pc\"").unwrap(),
            SamplerKind::UniPc
        );
        assert_eq!(
            "dpmpp_2m".parse::<SamplerKind>().unwrap_err().to_string(),
            "unknown sampler \"dpmpp_2m\": expected \"euler\" or \"unipc\" (also \"uni_pc\")"
        );
    }

    #[test]
    fn bad_arguments_are_clear_errors() {
        let err = |kind, steps, shift| Schedule::new(kind, steps, shift).unwrap_err().to_string();
        assert_eq!(
            err(SamplerKind::Euler, 0, 3.0),
            "steps must be at least 1, got 0"
        );
        assert_eq!(
            err(SamplerKind::UniPc, 0, 3.0),
            "steps must be at least 1, got 0"
        );
        for (shift, shown) in [
            (0.0, "0"),
            (-3.0, "-3"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(
                err(SamplerKind::UniPc, 10, shift),
                format!("shift must be a finite number > 0, got {shown}")
            );
        }

        let full = Schedule::new(SamplerKind::Euler, 10, 3.0).unwrap();
        for (strength, shown) in [(0.0, "0"), (-0.5, "-0.5"), (1.5, "1.5"), (f64::NAN, "NaN")] {
            assert_eq!(
                full.for_strength(strength).unwrap_err().to_string(),
                format!("strength must be in (0, 1], got {shown}")
            );
        }
        assert_eq!(
            full.for_strength(0.05).unwrap_err().to_string(),
            "strength 0.05 with 10 steps runs no step (int(10 * 0.05) = 0): raise the strength \
             to at least 0.1 or use more steps"
        );
    }

    /// The smallest strength the error suggests really keeps one step, also where 1/steps
    /// times steps rounds below 1 (49 · (1/49) = 0.9999999999999999).
    #[test]
    fn suggested_min_strength_keeps_a_step() {
        for steps in 1..=200 {
            let full = Schedule::new(SamplerKind::Euler, steps, 3.0).unwrap();
            let tiny = 0.5 / steps as f64;
            match full.for_strength(tiny) {
                Err(Error::NoStepLeft { min_strength, .. }) => {
                    assert_eq!(full.for_strength(min_strength).unwrap().steps(), 1);
                    assert!(full.for_strength(min_strength.next_down()).is_err());
                }
                other => panic!("{steps} steps, strength {tiny}: {other:?}"),
            }
        }
    }

    #[test]
    fn strength_keeps_the_tail() {
        let full = Schedule::new(SamplerKind::UniPc, 10, 3.0).unwrap();
        assert_eq!(full.for_strength(1.0).unwrap(), full);
        let cut = full.for_strength(0.6).unwrap();
        assert_eq!(cut.steps(), 6);
        assert_eq!(cut.sigmas(), &full.sigmas()[4..]);
        assert_eq!(cut.timesteps(), &full.timesteps()[4..]);
        assert_eq!(*cut.sigmas().last().unwrap(), 0.0);
    }

    #[test]
    fn schedules_are_decreasing_and_end_in_zero() {
        for kind in [SamplerKind::Euler, SamplerKind::UniPc] {
            for steps in [1, 2, 5, 50, 200] {
                for shift in [0.5, 1.0, 3.0, 12.0] {
                    let s = Schedule::new(kind, steps, shift).unwrap();
                    assert_eq!(s.steps(), steps);
                    assert_eq!(s.sigmas().len(), steps + 1);
                    assert_eq!(*s.sigmas().last().unwrap(), 0.0);
                    assert!(
                        s.sigmas().windows(2).all(|w| w[0] > w[1]),
                        "{kind} {steps} {shift}"
                    );
                    assert!(s.sigmas()[0] <= 1.0);
                }
            }
        }
    }
}
