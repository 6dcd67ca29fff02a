//! `vpipe tensors vae-encode|vae-decode`: the Wan VAE (2.1 or 2.2, recognised from the
//! file), tiled, with a budget-driven tile.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Tensor;
use vpipe_mem::{MemorySession, Tier};

use crate::flags::VaeJob;
use vpipe_pipeline::{calibrate, choose_tile, run_tiled, VaeOp};

pub(crate) fn run_vae(op: VaeOp, mut job: VaeJob) -> anyhow::Result<ExitCode> {
    // A reader that never executes pickle code checks the file before anything loads it.
    let inspection = vpipe_ckpt::inspect(&job.vae)?;
    let grid = vae_grid(&job, &inspection)?;
    if let Some(tiles) = job.tiles.as_mut() {
        tiles_on_grid(tiles, grid, job.stride_given)?;
    }
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
                    let frame = op.pixels(&vae, &input)?;
                    choose_tile(p, model, budget, frame, (job.layout, grid), strips)?
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

/// The spatial factor of the VAE in `--vae` (8 for Wan 2.1, 16 for Wan 2.2), from its header;
/// a file that holds no Wan VAE is bad input.
fn vae_grid(job: &VaeJob, inspection: &vpipe_ckpt::Inspection) -> anyhow::Result<usize> {
    use vpipe_ckpt::{Family, ModelConfig};
    let detection = &inspection.detection;
    match (detection.family, &detection.config) {
        (Family::WanVae | Family::WanVae22, Some(ModelConfig::Vae(c))) => {
            let stages = c.dim_mult.as_ref().map_or(4, Vec::len).clamp(1, 8);
            Ok((1 << (stages - 1)) * c.patch_size.unwrap_or(1).max(1))
        }
        (family, _) => Err(vpipe_pipeline::Error::BadInput(format!(
            "--vae {}: holds a {}, expected a {} or {} (its configuration from its tensors)",
            job.vae.display(),
            family.describe(),
            Family::WanVae.describe(),
            Family::WanVae22.describe()
        ))
        .into()),
    }
}

/// Puts `tiles` on the VAE's `grid` (whole latent cells): a tile or a given stride off it is
/// bad input naming the flag; the default stride is put on it.
fn tiles_on_grid(
    tiles: &mut vpipe_models::tiling::TileSpec,
    grid: usize,
    stride_given: bool,
) -> anyhow::Result<()> {
    let off = |flag: &str, px: usize| {
        vpipe_pipeline::Error::BadInput(format!(
            "{flag} {px}: this VAE makes latents {grid}× smaller per side; expected a multiple \
             of {grid} px"
        ))
    };
    if !tiles.tile.is_multiple_of(grid) {
        return Err(off("--tile", tiles.tile).into());
    }
    if stride_given && !tiles.stride.is_multiple_of(grid) {
        return Err(off("--stride", tiles.stride).into());
    }
    if !stride_given {
        tiles.stride = vpipe_models::tiling::default_stride_on(tiles.tile, grid);
    }
    Ok(())
}
