//! `vpipe tensors …`: one component on tensors in safetensors files, run through the same
//! residency store, phases and meters as a full run.

mod clip;
mod dit;
mod schedule;
mod text;
mod vae;

pub(crate) use clip::run_clip_vision;
pub(crate) use dit::run_dit;
pub(crate) use schedule::run_schedule;
pub(crate) use text::run_text_encode;
pub(crate) use vae::run_vae;

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use vpipe_mem::{fmt_bytes, Lease, MemorySession, ModelId, Phase, Report, Tier};

use vpipe_pipeline::{finish_report, read_inputs, write_outputs, Compute};

/// A component that runs one model on tensors: what it is called and what it writes.
struct OneModel<'a> {
    /// The phase that computes, the model's name in the report, and the summary line's label.
    phase: &'static str,
    model: &'static str,
    label: &'static str,
    /// The model's flag and file.
    flag: &'static str,
    checkpoint: &'a vpipe_ckpt::Inspection,
    /// The output file and the key of the one tensor written to it.
    output: &'a Path,
    output_key: &'static str,
    compute: &'a Compute,
}

/// Loads `job.checkpoint` in a phase of its own, computes `compute` in the phase `job.phase`
/// (which holds the model and gives it back, e.g. through [`resident`]), writes the result
/// (f32, on the host) as `job.output_key`, and reports, as every such component does.
fn run_one_model(
    job: OneModel<'_>,
    device: &Device,
    compute: impl FnOnce(&mut Phase<'_>, ModelId) -> anyhow::Result<Tensor>,
) -> anyhow::Result<ExitCode> {
    let mut session = MemorySession::new(device.clone(), job.compute.budget)?;
    let id = session.phase("load", |p| -> anyhow::Result<_> {
        Ok(p.register_inspected(job.model, job.checkpoint, Some(job.compute.dtype))?)
    })?;
    let output = session.phase(job.phase, |p| -> anyhow::Result<Tensor> {
        let output = compute(p, id)
            .with_context(|| format!("{} {}", job.flag, job.checkpoint.path.display()))?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        p.declare_output(job.output_key, (output.elem_count() * 4) as u64);
        Ok(output)
    })?;
    session.phase("write", |_| {
        write_outputs(
            job.output,
            &HashMap::from([(job.output_key.to_owned(), output.clone())]),
        )
    })?;
    let report = finish_report(&session, job.compute.report.as_deref())?;
    println!(
        "{}: peak {}; wrote '{}' {:?} to {}",
        job.label,
        phase_peak(&report, job.phase),
        job.output_key,
        output.dims(),
        job.output.display()
    );
    vpipe_pipeline::budget_kept(&report, &format!("--output {}", job.output.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// `forward` over the lease of model `id`, made resident for it and offloaded after.
fn resident(
    p: &mut Phase<'_>,
    id: ModelId,
    forward: impl FnOnce(&Lease<'_>) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Tensor> {
    p.make_resident(id)?;
    let output = {
        let lease = p.lease(id)?;
        forward(&lease)?
    };
    p.offload(id, Tier::Disk)?;
    Ok(output)
}

/// The measured peak of the phase `name`, above the session's baseline, for the summary line.
fn phase_peak(report: &Report, name: &str) -> String {
    report
        .phases
        .iter()
        .find(|p| p.name == name)
        .map(|p| {
            format!(
                "{} above baseline ({}, measured)",
                fmt_bytes(p.peak_above_baseline),
                report.compute_meter
            )
        })
        .unwrap_or_else(|| "not measured".into())
}
