//! `vpipe tensors vae-encode|vae-decode`: the Wan VAE, tiled, with a budget-driven tile.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Tensor;
use vpipe_mem::{MemorySession, Tier};

use crate::flags::VaeJob;
use vpipe_pipeline::{calibrate, choose_tile, run_tiled, VaeOp};

pub(crate) fn run_vae(op: VaeOp, job: VaeJob) -> anyhow::Result<ExitCode> {
    // A reader that never executes pickle code checks the file before anything loads it.
    vpipe_ckpt::inspect(&job.vae)?;
    vpipe_pipeline::check_tensor_outputs(
        &job.output,
        job.compute.report.as_deref(),
        &[("--vae", &job.vae), ("--input", &job.input)],
    )?;
    let device = vpipe_pipeline::open_device(&job.compute.device)?;
    let (in_key, out_key) = op.keys();
    let [input] = super::read_inputs(&job.input, [in_key])?;
    let mut session = MemorySession::new(device.clone(), job.compute.budget)?;
    let mut observer = crate::progress::Terminal::default();

    let vae_id = session.phase("load", |p| -> anyhow::Result<_> {
        Ok(p.register("vae", &job.vae, Some(job.compute.dtype))?)
    })?;
    let output = session.phase(op.phase(), |p| -> anyhow::Result<Tensor> {
        p.make_resident(vae_id)?;
        let output = {
            let lease = p.lease(vae_id)?;
            let vae = vpipe_pipeline::wan_vae(&lease, job.compute.dtype, &device)
                .with_context(|| format!("--vae {}", job.vae.display()))?;
            let tiles = match (job.tiles, job.compute.budget.compute) {
                (Some(tiles), _) => tiles,
                (None, Some(budget)) => {
                    let model = calibrate(p, &vae, op, &input, job.layout, &observer)?;
                    let strips = op.strip_bytes_per_pixel(&vae, &input)?;
                    choose_tile(p, model, budget, op.pixels(&input)?, job.layout, strips)?
                }
                (None, None) => unreachable!("flags require a budget for an automatic tile"),
            };
            run_tiled(p, &vae, op, &input, tiles, &mut observer)?
            // The model and its clones of the leased weights end here, before the offload
            // verifies that the weights' memory came back.
        };
        p.offload(vae_id, Tier::Disk)?;
        p.declare_output(out_key, (output.elem_count() * 4) as u64);
        Ok(output)
    })?;
    session.phase("write", |_| {
        super::write_outputs(
            &job.output,
            &HashMap::from([(out_key.to_owned(), output.clone())]),
        )
    })?;

    let report = super::finish_report(&session, job.compute.report.as_deref())?;
    let tiles = report
        .notes
        .iter()
        .find(|n| n.what == "vae tiles")
        .map(|n| n.detail.as_str())
        .unwrap_or("");
    println!(
        "{}: {tiles}; peak {}; {} fallback(s); wrote '{out_key}' {:?} to {}",
        op.phase(),
        super::phase_peak(&report, op.phase()),
        report.fallbacks.len(),
        output.dims(),
        job.output.display()
    );
    vpipe_pipeline::budget_kept(&report, &format!("--output {}", job.output.display()))?;
    Ok(ExitCode::SUCCESS)
}
