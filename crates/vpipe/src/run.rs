//! `vpipe run`: the pipeline on the user's model files.

use std::process::ExitCode;

use vpipe_mem::fmt_bytes;
use vpipe_pipeline::RunOptions;

pub(crate) fn run(options: RunOptions) -> anyhow::Result<ExitCode> {
    let out = options.out.clone();
    let report = vpipe_pipeline::run(options, &mut crate::progress::Terminal::default())?;
    let peak =
        |f: fn(&vpipe_mem::PhaseReport) -> Option<u64>| report.phases.iter().filter_map(f).max();
    let headline = match peak(|p| p.device_footprint_peak) {
        Some(footprint) => format!(
            "device footprint at most {} (pool reserved + outside the pool, measured), \
             live tensors at most {} above baseline",
            fmt_bytes(footprint),
            fmt_bytes(peak(|p| Some(p.peak_above_baseline)).unwrap_or(0)),
        ),
        None => format!(
            "highest peak {} above baseline ({}, measured)",
            fmt_bytes(peak(|p| Some(p.peak_above_baseline)).unwrap_or(0)),
            report.compute_meter
        ),
    };
    println!(
        "run: {} phases, {headline}, {} violation(s); wrote {}",
        report.phases.len(),
        report.violations.len(),
        out.display()
    );
    vpipe_pipeline::budget_kept(&report, &format!("--out {}", out.display()))?;
    Ok(ExitCode::SUCCESS)
}
