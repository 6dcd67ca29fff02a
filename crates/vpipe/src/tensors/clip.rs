//! `vpipe tensors clip-vision`: the CLIP vision encoder on preprocessed images.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Tensor};
use vpipe_mem::{MemorySession, Tier};

use crate::flags::ClipVisionJob;

const PHASE: &str = "clip vision";

pub(crate) fn run_clip_vision(job: ClipVisionJob) -> anyhow::Result<ExitCode> {
    let checkpoint = vpipe_ckpt::inspect(&job.clip_vision)?;
    vpipe_pipeline::check_tensor_outputs(
        &job.output,
        job.compute.report.as_deref(),
        &[("--clip-vision", &job.clip_vision), ("--input", &job.input)],
    )?;
    let device = vpipe_pipeline::open_device(&job.compute.device)?;
    let [pixels] = super::read_inputs(&job.input, ["pixel_values"])?;
    let mut session = MemorySession::new(device.clone(), job.compute.budget)?;

    let id = session.phase("load", |p| -> anyhow::Result<_> {
        Ok(p.register_inspected("clip vision", &checkpoint, Some(job.compute.dtype))?)
    })?;
    let output = session.phase(PHASE, |p| -> anyhow::Result<Tensor> {
        p.make_resident(id)?;
        let output = {
            let lease = p.lease(id)?;
            let encoder =
                vpipe_pipeline::clip_vision(&lease, &job.config, job.compute.dtype, &device)
                    .with_context(|| format!("--clip-vision {}", job.clip_vision.display()))?;
            let out = encoder
                .image_features(&pixels.to_device(&device)?)
                .context("clip vision")?;
            out.to_device(&candle_core::Device::Cpu)?
                .to_dtype(DType::F32)?
        };
        p.offload(id, Tier::Disk)?;
        p.declare_output("image_features", (output.elem_count() * 4) as u64);
        Ok(output)
    })?;
    session.phase("write", |_| {
        super::write_outputs(
            &job.output,
            &HashMap::from([("image_features".to_owned(), output.clone())]),
        )
    })?;
    let report = super::finish_report(&session, job.compute.report.as_deref())?;
    println!(
        "clip vision: peak {}; wrote 'image_features' {:?} to {}",
        super::phase_peak(&report, PHASE),
        output.dims(),
        job.output.display()
    );
    vpipe_pipeline::budget_kept(&report, &format!("--output {}", job.output.display()))?;
    Ok(ExitCode::SUCCESS)
}
