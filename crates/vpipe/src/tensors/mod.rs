//! `vpipe tensors …`: one component on tensors in safetensors files, run through the same
//! residency store, phases and meters as a full run.

mod dit;
mod schedule;
mod text;
mod vae;

pub(crate) use dit::run_dit;
pub(crate) use schedule::run_schedule;
pub(crate) use text::run_text_encode;
pub(crate) use vae::{run_tiled, run_vae, VaeOp};

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};
use vpipe_mem::{fmt_bytes, MemorySession, Report};

use crate::exit::BadInput;

/// Reads the tensors `keys` from a safetensors file, on the host; a missing key is bad input
/// that lists what the file holds.
pub(crate) fn read_inputs<const N: usize>(
    path: &Path,
    keys: [&str; N],
) -> anyhow::Result<[Tensor; N]> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        BadInput(format!(
            "--input {}: not a readable safetensors file: {e}",
            path.display()
        ))
    })?;
    let mut found: Vec<_> = tensors.keys().cloned().collect();
    found.sort();
    let mut missing = Vec::new();
    let taken = keys.map(|key| {
        tensors.remove(key).unwrap_or_else(|| {
            missing.push(key);
            Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu).expect("an empty tensor")
        })
    });
    if !missing.is_empty() {
        return Err(BadInput(format!(
            "--input {}: no tensor {} (found: {})",
            path.display(),
            missing
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", "),
            found.join(", ")
        ))
        .into());
    }
    Ok(taken)
}

/// Writes `tensors` to `path` through a temporary file in the same folder, so that an
/// interrupted run never leaves a half-written output.
pub(crate) fn write_outputs(path: &Path, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    crate::partial::write_atomically(path, |partial| {
        candle_core::safetensors::save(tensors, partial)
            .with_context(|| format!("writing {}", path.display()))
    })
}

/// Renders the session's report, writes it (and its chart) when asked, and returns it.
pub(crate) fn finish_report(
    session: &MemorySession,
    path: Option<&Path>,
) -> anyhow::Result<Report> {
    let report = session.report()?;
    if let Some(path) = path {
        report.write_json(path)?;
        vpipe_mem::write_svg(&report, &path.with_extension("svg"))?;
    }
    Ok(report)
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
