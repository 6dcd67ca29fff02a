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

use vpipe_mem::{fmt_bytes, Report};

use vpipe_pipeline::{finish_report, read_inputs, write_outputs};

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
