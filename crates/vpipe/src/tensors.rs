//! `vpipe tensors vae-encode|vae-decode`: one component on tensors in safetensors files, run
//! through the same residency store, phases and meters as a full run.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vpipe_mem::{fmt_bytes, MemError, MemorySession, Phase, Tier};
use vpipe_models::tiling::{default_stride, TileSpec, MAX_TILE, SPATIAL_SCALE};
use vpipe_models::wan::vae::WanVae;

use crate::exit::BadInput;
use crate::flags::VaeJob;

/// Which way through the VAE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VaeOp {
    Encode,
    Decode,
}

impl VaeOp {
    fn phase(self) -> &'static str {
        match self {
            VaeOp::Encode => "vae encode",
            VaeOp::Decode => "vae decode",
        }
    }

    fn keys(self) -> (&'static str, &'static str) {
        match self {
            VaeOp::Encode => ("video_in", "enc_mean"),
            VaeOp::Decode => ("enc_mean", "decoded"),
        }
    }
}

/// The smallest tile a device out-of-memory may shrink to before the run gives up.
const SMALLEST_TILE: usize = 64;

fn read_input(path: &Path, key: &str) -> anyhow::Result<Tensor> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("--input {}", path.display()))?;
    tensors.remove(key).ok_or_else(|| {
        let mut found: Vec<_> = tensors.keys().cloned().collect();
        found.sort();
        BadInput(format!(
            "--input {}: no tensor '{key}' (found: {})",
            path.display(),
            found.join(", ")
        ))
        .into()
    })
}

fn is_device_out_of_memory(err: &vpipe_models::Error) -> bool {
    err.to_string().contains("OUT_OF_MEMORY")
}

/// Runs the VAE over `input` (on the host) tile by tile; on a device out-of-memory the tile is
/// halved and the whole pass retried, and the fallback recorded.
fn run_tiled(
    phase: &mut Phase<'_>,
    vae: &WanVae,
    op: VaeOp,
    input: &Tensor,
    mut tiles: TileSpec,
) -> anyhow::Result<Tensor> {
    let (_, _, _, h, w) = input.dims5()?;
    let pixels = match op {
        VaeOp::Encode => (h, w),
        VaeOp::Decode => (h * SPATIAL_SCALE, w * SPATIAL_SCALE),
    };
    loop {
        let result = match op {
            VaeOp::Encode => vae.encode_tiled(input, tiles),
            VaeOp::Decode => vae.decode_tiled(input, tiles),
        };
        match result {
            Err(e) if is_device_out_of_memory(&e) && tiles.tile / 2 >= SMALLEST_TILE => {
                let smaller = TileSpec {
                    tile: tiles.tile / 2,
                    stride: default_stride(tiles.tile / 2),
                };
                phase.fallback(
                    "vae tile",
                    &format!(
                        "device out of memory at tile {} px: retrying with tile {} px, stride {} px",
                        tiles.tile, smaller.tile, smaller.stride
                    ),
                );
                tiles = smaller;
            }
            Err(e) => return Err(e.into()),
            Ok(out) => {
                phase.note(
                    "vae tiles",
                    &format!(
                        "tile {} px, stride {} px, {} tile(s), {:?}",
                        tiles.tile,
                        tiles.stride,
                        tiles.count(pixels.0, pixels.1),
                        vae.dtype()
                    ),
                );
                return Ok(out.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
            }
        }
    }
}

/// Compute-tier memory of one tile as measured on two crops: `fixed + per_pixel · side²`.
#[derive(Debug, Clone, Copy)]
struct TileMemoryModel {
    fixed: f64,
    per_pixel: f64,
}

impl TileMemoryModel {
    fn bytes(&self, side: usize) -> u64 {
        (self.fixed + self.per_pixel * (side * side) as f64).max(0.0) as u64
    }
}

/// Runs the VAE untiled on two square crops of the input (all the frames one causal chunk
/// needs, so the peak is that of a whole pass) and fits the measured compute-tier peaks.
fn calibrate(
    phase: &mut Phase<'_>,
    vae: &WanVae,
    op: VaeOp,
    input: &Tensor,
) -> anyhow::Result<TileMemoryModel> {
    let (_, _, t, h, w) = input.dims5()?;
    let cell = match op {
        VaeOp::Encode => 1,
        VaeOp::Decode => SPATIAL_SCALE,
    };
    // Crops in pixels, on the 8-px grid, no larger than the frame.
    let frame_pixels = h.min(w) * cell;
    let large = 128.min(frame_pixels / SPATIAL_SCALE * SPATIAL_SCALE);
    let small = (large / 2 / SPATIAL_SCALE * SPATIAL_SCALE).max(SPATIAL_SCALE);
    if small == large {
        anyhow::bail!(
            "--tile auto: the frame ({}x{} px) is too small to calibrate on; give --tile",
            h * cell,
            w * cell
        );
    }
    let frames = match op {
        VaeOp::Encode => t.min(5),
        VaeOp::Decode => t.min(2),
    };
    let mut peaks = Vec::new();
    for side in [small, large] {
        let crop = input
            .narrow(2, 0, frames)?
            .narrow(3, 0, side / cell)?
            .narrow(4, 0, side / cell)?
            .to_device(phase.session().device())?
            .to_dtype(vae.dtype())?;
        let (_, peak) = phase.measure_peak(|| -> anyhow::Result<()> {
            let out = match op {
                VaeOp::Encode => vae.encode_moments(&crop)?,
                VaeOp::Decode => vae.decode_unclamped(&crop)?,
            };
            drop(out);
            Ok(())
        })?;
        peaks.push((side, peak));
    }
    let ((s1, p1), (s2, p2)) = (peaks[0], peaks[1]);
    let per_pixel = (p2 as f64 - p1 as f64) / ((s2 * s2) as f64 - (s1 * s1) as f64);
    let model = TileMemoryModel {
        fixed: p1 as f64 - per_pixel * (s1 * s1) as f64,
        per_pixel: per_pixel.max(0.0),
    };
    phase.note(
        "vae tile calibration",
        &format!(
            "measured peak {} at {s1} px and {} at {s2} px ({} frames): {:.1} B per pixel + {} fixed",
            fmt_bytes(p1),
            fmt_bytes(p2),
            frames,
            model.per_pixel,
            fmt_bytes(model.fixed.max(0.0) as u64)
        ),
    );
    Ok(model)
}

/// The largest tile (multiple of 32 px, 64 to 512) whose modelled peak fits what the budget
/// leaves, or a refusal naming both numbers.
fn choose_tile(
    phase: &mut Phase<'_>,
    model: TileMemoryModel,
    budget: u64,
) -> Result<TileSpec, MemError> {
    let session = phase.session();
    let in_use = phase
        .read()?
        .compute_used()
        .saturating_sub(session.baseline().compute_used());
    let left = budget.saturating_sub(in_use);
    let fits = (SMALLEST_TILE..=MAX_TILE)
        .rev()
        .step_by(32)
        .find(|&side| model.bytes(side) <= left);
    let Some(tile) = fits else {
        return Err(MemError::OverBudget {
            model: format!("vae activations of a {SMALLEST_TILE}-px tile (modelled)"),
            tier: session.compute_tier(),
            needed: model.bytes(SMALLEST_TILE),
            in_use,
            allowed: budget,
        });
    };
    let tiles = TileSpec {
        tile,
        stride: default_stride(tile),
    };
    phase.note(
        "vae tile choice",
        &format!(
            "{} of the budget left: tile {tile} px (modelled peak {}), stride {} px",
            fmt_bytes(left),
            fmt_bytes(model.bytes(tile)),
            tiles.stride
        ),
    );
    Ok(tiles)
}

pub(crate) fn run_vae(op: VaeOp, job: VaeJob) -> anyhow::Result<ExitCode> {
    // A reader that never executes pickle code checks the file before anything loads it.
    vpipe_ckpt::inspect(&job.vae)?;
    let device = crate::device::open(&job.device)?;
    let (in_key, out_key) = op.keys();
    let input = read_input(&job.input, in_key)?;
    let mut session = MemorySession::new(device.clone(), job.budget)?;

    let vae_id = session.phase("load", |p| -> anyhow::Result<_> {
        Ok(p.register("vae", &job.vae, Some(job.dtype))?)
    })?;
    let output = session.phase(op.phase(), |p| -> anyhow::Result<Tensor> {
        p.make_resident(vae_id)?;
        let output = {
            let lease = p.lease(vae_id)?;
            let weights: HashMap<String, Tensor> = lease
                .iter()
                .map(|(name, t)| (name.to_owned(), t.clone()))
                .collect();
            let vb = VarBuilder::from_tensors(weights, job.dtype, &device);
            let vae = WanVae::from_checkpoint(vb)
                .with_context(|| format!("--vae {}", job.vae.display()))?;
            let tiles = match (job.tiles, job.budget.compute) {
                (Some(tiles), _) => tiles,
                (None, Some(budget)) => {
                    let model = calibrate(p, &vae, op, &input)?;
                    choose_tile(p, model, budget)?
                }
                (None, None) => unreachable!("flags require a budget for an automatic tile"),
            };
            run_tiled(p, &vae, op, &input, tiles)?
            // The model and its clones of the leased weights end here, before the offload
            // verifies that the weights' memory came back.
        };
        p.offload(vae_id, Tier::Disk)?;
        p.declare_output(out_key, (output.elem_count() * 4) as u64);
        Ok(output)
    })?;
    session.phase("write", |_| -> anyhow::Result<()> {
        let partial = job.output.with_extension("safetensors.partial");
        let map = HashMap::from([(out_key.to_owned(), output.clone())]);
        candle_core::safetensors::save(&map, &partial)
            .with_context(|| format!("--output {}", partial.display()))?;
        std::fs::rename(&partial, &job.output)
            .with_context(|| format!("--output {}", job.output.display()))?;
        Ok(())
    })?;

    let report = session.report()?;
    if let Some(path) = &job.report {
        report.write_json(path)?;
        vpipe_mem::write_svg(&report, &path.with_extension("svg"))?;
    }
    let phase = report
        .phases
        .iter()
        .find(|p| p.name == op.phase())
        .expect("the phase was recorded");
    let tiles = report
        .notes
        .iter()
        .find(|n| n.what == "vae tiles")
        .map(|n| n.detail.as_str())
        .unwrap_or("");
    println!(
        "{}: {tiles}; peak {} above baseline ({}, measured); {} fallback(s); wrote '{out_key}' {:?} to {}",
        op.phase(),
        fmt_bytes(phase.peak_above_baseline),
        report.compute_meter,
        report.fallbacks.len(),
        output.dims(),
        job.output.display()
    );
    Ok(ExitCode::SUCCESS)
}
