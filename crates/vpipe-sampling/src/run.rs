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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn samples_start_with_x0_and_follow_the_sampler() {
        let x0 = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 2, 2))
            .unwrap();
        let outputs = Tensor::ones((3, 1, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let run = run_schedule(SamplerKind::UniPc, 3.0, 3, &x0, &outputs).unwrap();
        assert_eq!(run.samples.dims(), &[4, 1, 2, 2, 2]);
        assert_eq!(run.sigmas.len(), 4);
        assert_eq!(run.timesteps.len(), 3);
        let first = run.samples.get(0).unwrap();
        assert_eq!(
            first.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x0.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // The same steps taken by hand.
        let mut sampler = Sampler::new(Schedule::new(SamplerKind::UniPc, 3, 3.0).unwrap());
        let mut x = x0.clone();
        for i in 0..3 {
            x = sampler.step(&outputs.get(i).unwrap(), &x).unwrap();
            let row = run.samples.get(i + 1).unwrap();
            assert_eq!(
                row.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn bad_model_outputs_are_clear_errors() {
        let x0 = Tensor::zeros((1, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let four = Tensor::zeros((4, 1, 2, 3), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            run_schedule(SamplerKind::Euler, 3.0, 5, &x0, &four)
                .unwrap_err()
                .to_string(),
            "model_outputs holds 4 predictions along dim 0, the schedule has 5 steps"
        );
        let wrong = Tensor::zeros((4, 1, 3, 2), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            run_schedule(SamplerKind::Euler, 3.0, 4, &x0, &wrong)
                .unwrap_err()
                .to_string(),
            "model_outputs (must be [steps, ...x0 shape]): expected shape [4, 1, 2, 3], got \
             shape [4, 1, 3, 2]"
        );
        assert_eq!(
            run_schedule(SamplerKind::UniPc, 3.0, 0, &x0, &four)
                .unwrap_err()
                .to_string(),
            "steps must be at least 1, got 0"
        );
    }
}
