//! `vpipe tensors schedule`: a sampler run over given model predictions (no model, no device).

use std::collections::HashMap;
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};

use crate::flags::ScheduleJob;

pub(crate) fn run_schedule(job: ScheduleJob) -> anyhow::Result<ExitCode> {
    vpipe_pipeline::check_tensor_outputs(&job.output, None, &[("--input", &job.input)])?;
    let [x0, model_outputs] = super::read_inputs(&job.input, ["x0", "model_outputs"])?;
    let run = vpipe_sampling::run_schedule(job.sampler, job.shift, job.steps, &x0, &model_outputs)?;
    let as_tensor = |v: &[f64]| {
        Tensor::from_vec(
            v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            v.len(),
            &Device::Cpu,
        )
    };
    let outputs = HashMap::from([
        ("samples".to_owned(), run.samples.to_dtype(DType::F32)?),
        ("sigmas".to_owned(), as_tensor(&run.sigmas)?),
        ("timesteps".to_owned(), as_tensor(&run.timesteps)?),
    ]);
    super::write_outputs(&job.output, &outputs)?;
    println!(
        "schedule: {} steps of {} at shift {}; sigmas {:?}; wrote samples {:?} to {}",
        job.steps,
        job.sampler,
        job.shift,
        run.sigmas
            .iter()
            .map(|s| (s * 1e6).round() / 1e6)
            .collect::<Vec<_>>(),
        run.samples.dims(),
        job.output.display()
    );
    Ok(ExitCode::SUCCESS)
}
