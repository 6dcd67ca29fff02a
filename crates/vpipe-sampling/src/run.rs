//! The driver that runs a whole schedule on given predictions (`vpipe tensors schedule`).

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::sampler::Sampler;
use crate::schedule::{SamplerKind, Schedule};

/// A schedule run to the end by [`run_schedule`] or [`run_on_schedule`].
#[derive(Debug, Clone)]
pub struct ScheduleRun {
    /// `[N + 1, …]`: `samples[0]` is the input, `samples[i + 1]` the output of step `i`; in the
    /// input's dtype.
    pub samples: Tensor,
    /// The `N + 1` sigmas of the schedule, ending in 0.
    pub sigmas: Vec<f64>,
    /// The `N` timesteps of the schedule.
    pub timesteps: Vec<f64>,
}

/// Builds the full schedule (`Schedule::new(kind, steps, shift)`) and runs it from `x0`, step
/// `i` taking `model_outputs[i]` as the model's velocity prediction.
///
/// # Shapes
/// `x0`: any shape `S`; `model_outputs`: `[steps, S…]`; `samples` of the result:
/// `[steps + 1, S…]`.
///
/// # Errors
/// Those of [`Schedule::new`] and [`run_on_schedule`].
pub fn run_schedule(
    kind: SamplerKind,
    shift: f64,
    steps: usize,
    x0: &Tensor,
    model_outputs: &Tensor,
) -> Result<ScheduleRun> {
    run_on_schedule(Schedule::new(kind, steps, shift)?, x0, model_outputs)
}

/// Runs `schedule` (e.g. one cut by [`Schedule::for_strength`], with `x` the noised latent)
/// from `x` with a fresh [`Sampler`], step `i` taking `model_outputs[i]`.
///
/// # Shapes
/// `x`: any shape `S`; `model_outputs`: `[N, S…]` for a schedule of `N` steps; `samples` of
/// the result: `[N + 1, S…]`.
///
/// # Errors
/// [`Error::OutputCount`] unless `model_outputs` has `N` rows, [`Error::ShapeMismatch`] when a
/// row's shape is not `x`'s; candle errors.
pub fn run_on_schedule(
    schedule: Schedule,
    x: &Tensor,
    model_outputs: &Tensor,
) -> Result<ScheduleRun> {
    let steps = schedule.steps();
    let got = model_outputs.dims().first().copied().unwrap_or(0);
    if model_outputs.rank() == 0 || got != steps {
        return Err(Error::OutputCount {
            expected: steps,
            got,
        });
    }
    if model_outputs.dims()[1..] != *x.dims() {
        let mut expected = vec![steps];
        expected.extend_from_slice(x.dims());
        return Err(Error::ShapeMismatch {
            what: "model_outputs (must be [steps, ...x0 shape])",
            expected,
            got: model_outputs.dims().to_vec(),
        });
    }
    let sigmas = schedule.sigmas().to_vec();
    let timesteps = schedule.timesteps().to_vec();
    let mut sampler = Sampler::new(schedule);
    let mut samples = Vec::with_capacity(steps + 1);
    samples.push(x.clone());
    for i in 0..steps {
        let next = sampler.step(&model_outputs.get(i)?, &samples[i])?;
        samples.push(next);
    }
    Ok(ScheduleRun {
        samples: Tensor::stack(&samples, 0)?,
        sigmas,
        timesteps,
    })
}
