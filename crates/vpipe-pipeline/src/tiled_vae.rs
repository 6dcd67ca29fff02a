//! The Wan VAE over a whole clip in tiles, inside a phase: the tile from the budget (a
//! per-pixel memory model measured on small crops), one tile at a time, a device
//! out-of-memory answered by a smaller tile. Used by the pipeline's VAE phases and by
//! `vpipe tensors vae-encode|vae-decode`.

use std::cell::RefCell;

use candle_core::{DType, Tensor};
use vpipe_mem::{fmt_bytes, MemError, Phase};
use vpipe_models::tiling::{default_stride_on, halving_on_grid, TileLayout, TileSpec, MAX_TILE};
use vpipe_models::wan::vae::{WanVae, TEMPORAL_FACTOR};

use crate::error::{Error, Result};
use crate::observer::{Observer, Step};

/// Which way through the VAE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeOp {
    Encode,
    Decode,
}

impl VaeOp {
    pub fn phase(self) -> &'static str {
        match self {
            VaeOp::Encode => "vae encode",
            VaeOp::Decode => "vae decode",
        }
    }

    pub fn keys(self) -> (&'static str, &'static str) {
        match self {
            VaeOp::Encode => ("video_in", "enc_mean"),
            VaeOp::Decode => ("enc_mean", "decoded"),
        }
    }

    /// Bytes per frame pixel of the tiled pass's output, all channels and frames: what a
    /// pixel of blending strip holds (on encode, a latent cell covers f² pixels, f the VAE's
    /// spatial factor).
    pub fn strip_bytes_per_pixel(self, vae: &WanVae, input: &Tensor) -> candle_core::Result<f64> {
        let (_, _, t, _, _) = input.dims5()?;
        let cfg = vae.config();
        let elem = vae.dtype().size_in_bytes() as f64;
        Ok(match self {
            VaeOp::Encode => {
                let latent_frames = 1 + (t - 1) / TEMPORAL_FACTOR;
                let f = cfg.spatial_factor();
                (2 * cfg.z_dim * latent_frames) as f64 * elem / (f * f) as f64
            }
            VaeOp::Decode => (cfg.out_channels * (1 + TEMPORAL_FACTOR * (t - 1))) as f64 * elem,
        })
    }

    /// The tiled pass over `input` (on the host), with the output on the host in f32: the
    /// encode's posterior mean, or the decode's clamped pixels (converted on the device).
    /// Calibration runs it too, so that its crops hold what the real pass holds.
    /// `after_tile` is called after each tile and `keep_going` within one; either ends the
    /// pass by returning false.
    fn tiled_pass(
        self,
        vae: &WanVae,
        input: &Tensor,
        tiles: TileSpec,
        after_tile: &mut dyn FnMut() -> bool,
        keep_going: &dyn Fn() -> bool,
    ) -> vpipe_models::Result<Tensor> {
        match self {
            VaeOp::Encode => Ok(vae
                .encode_posterior_tiled_observed(input, tiles, after_tile, keep_going)?
                .mean
                .to_dtype(DType::F32)?),
            VaeOp::Decode => {
                vae.decode_tiled_observed(input, tiles, DType::F32, after_tile, keep_going)
            }
        }
    }

    /// The frame's (height, width) in pixels for this operation's input to `vae`.
    pub fn pixels(self, vae: &WanVae, input: &Tensor) -> candle_core::Result<(usize, usize)> {
        let (_, _, _, h, w) = input.dims5()?;
        let f = vae.config().spatial_factor();
        Ok(match self {
            VaeOp::Encode => (h, w),
            VaeOp::Decode => (h * f, w * f),
        })
    }
}

/// The smallest tile a device out-of-memory may shrink to before the run gives up.
const SMALLEST_TILE: usize = 64;
/// The largest crop calibration measures, in pixels.
const CALIBRATION_SIDE: usize = 192;
/// Share of what the budget leaves that a modelled tile may take: the model extrapolates
/// from crops no larger than CALIBRATION_SIDE.
const TILE_BUDGET_SHARE: f64 = 0.9;

fn is_device_out_of_memory(err: &vpipe_models::Error) -> bool {
    err.to_string().contains("OUT_OF_MEMORY")
}

/// Runs the VAE over `input` (on the host) tile by tile; on a device out-of-memory the tile is
/// halved (on the VAE's grid: whole latent cells) and the whole pass retried, and the
/// fallback recorded. The observer sees the tiles
/// as a step, and can stop the pass between and within tiles.
pub fn run_tiled(
    phase: &mut Phase<'_>,
    vae: &WanVae,
    op: VaeOp,
    input: &Tensor,
    tiles: TileSpec,
    observer: &mut dyn Observer,
) -> Result<Tensor> {
    let pixels = op.pixels(vae, input)?;
    let grid = vae.config().spatial_factor();
    // The attempt reads the meters after every tile (the report's chart gets a point per
    // tile); fallbacks and samples are recorded once the attempts are over.
    let mut fallbacks = Vec::new();
    let mut samples = Vec::new();
    let reader = &*phase;
    // Both callbacks of a pass reach the step: one reports a tile, the other asks whether to
    // stop; they never run at once.
    let count = vae.tiles(tiles, pixels).map_or(0, |(count, _)| count);
    let step = RefCell::new(Step::start(observer, op.phase(), count as u64));
    let attempts = halving_on_grid(
        tiles,
        (SMALLEST_TILE, grid),
        is_device_out_of_memory,
        |failed, smaller| fallbacks.push((failed, smaller)),
        |tiles| {
            let mut after_tile = || {
                samples.push(reader.read());
                let mut step = step.borrow_mut();
                step.advance("tile");
                !step.observer().should_stop()
            };
            let keep_going = || !step.borrow().observer().should_stop();
            op.tiled_pass(vae, input, tiles, &mut after_tile, &keep_going)
        },
    );
    for reading in samples {
        phase.record_sample(reading?);
    }
    for (failed, smaller) in fallbacks {
        phase.fallback(
            "vae tile",
            &format!(
                "device out of memory at tile {} px: retrying with tile {} px, stride {} px",
                failed.tile, smaller.tile, smaller.stride
            ),
        );
    }
    drop(step);
    let (output, used) = attempts.map_err(|e| match e {
        vpipe_models::Error::Stopped => Error::Interrupted,
        other => other.into(),
    })?;
    let (count, shapes) = vae.tiles(used, pixels)?;
    phase.note(
        "vae tiles",
        &format!(
            "tile {} px, stride {} px, {} layout, {count} tile(s) of {}, {:?}",
            used.tile,
            used.stride,
            used.layout,
            shapes
                .iter()
                .map(|(h, w)| format!("{h}x{w}"))
                .collect::<Vec<_>>()
                .join("/"),
            vae.dtype()
        ),
    );
    Ok(output)
}

/// Compute-tier memory of one tile as a function of its pixel count `p` (height × width),
/// fitted through three measured square crops: `y₁ + d₁·(p − p₁) + d₂·(p − p₁)(p − p₂)`. The
/// quadratic term is the middle block's per-frame attention, whose scores grow with the square
/// of the tokens.
#[derive(Debug, Clone, Copy)]
pub struct TileMemoryModel {
    points: [(f64, f64); 3],
    slope: f64,
    curvature: f64,
}

impl TileMemoryModel {
    fn fit(measured: [(usize, u64); 3]) -> Self {
        let points = measured.map(|(side, peak)| ((side * side) as f64, peak as f64));
        let [(p1, y1), (p2, y2), (p3, y3)] = points;
        let slope = (y2 - y1) / (p2 - p1);
        // Never assume that larger tiles cost less per pixel than the crops showed.
        let curvature = (((y3 - y2) / (p3 - p2) - slope) / (p3 - p1)).max(0.0);
        Self {
            points,
            slope: slope.max(0.0),
            curvature,
        }
    }

    fn bytes(&self, pixels: usize) -> u64 {
        let p = pixels as f64;
        let [(p1, y1), (p2, _), _] = self.points;
        (y1 + self.slope * (p - p1) + self.curvature * (p - p1) * (p - p2)).max(0.0) as u64
    }
}

/// Runs the VAE on three square crops of the input (all frames), each as one tile of the tiled
/// pass, and fits the measured compute-tier peaks. The observer can stop a crop's pass.
pub fn calibrate(
    phase: &mut Phase<'_>,
    vae: &WanVae,
    op: VaeOp,
    input: &Tensor,
    layout: TileLayout,
    observer: &dyn Observer,
) -> Result<TileMemoryModel> {
    let _span = tracing::debug_span!("vae_calibration").entered();
    let (_, _, t, h, w) = input.dims5()?;
    let grid = vae.config().spatial_factor();
    let cell = match op {
        VaeOp::Encode => 1,
        VaeOp::Decode => grid,
    };
    // Crops in pixels, on the VAE's grid, no larger than the frame.
    let on_grid = |px: usize| px / grid * grid;
    let large = on_grid(CALIBRATION_SIDE.min(h.min(w) * cell));
    let sides = [on_grid(large / 3), on_grid(large * 2 / 3), large];
    if sides[0] == 0 || sides[0] == sides[1] {
        return Err(Error::FrameTooSmallToCalibrate {
            height: h * cell,
            width: w * cell,
        });
    }
    // Every frame: the VAE's working set does not grow with T, but the tile's input and
    // output on the device do (measured on an H100: crops of 5 frames under-predicted an
    // 81-frame 256-px tile by 12 %).
    let frames = t;
    let mut measured = [(0, 0); 3];
    for (slot, side) in measured.iter_mut().zip(sides) {
        // On the host, through the tiled pass with one tile covering the crop: the window
        // holds what a tile of the real pass holds, its move to the device, its conversion and
        // its output's way back included (calibrating on a crop already on the device missed
        // its input: 7–8 % of an 81-frame tile on the H100).
        let crop = input
            .narrow(2, 0, frames)?
            .narrow(3, 0, side / cell)?
            .narrow(4, 0, side / cell)?;
        let covering = TileSpec {
            tile: side,
            stride: side,
            layout,
        };
        let keep_going = || !observer.should_stop();
        let (_, peak) = phase.measure_peak(|| -> Result<()> {
            drop(op.tiled_pass(vae, &crop, covering, &mut || true, &keep_going)?);
            Ok(())
        })?;
        *slot = (side, peak);
    }
    let model = TileMemoryModel::fit(measured);
    phase.note(
        "vae tile calibration",
        &format!(
            "measured peaks ({frames} frames): {}",
            measured
                .iter()
                .map(|(side, peak)| format!("{side} px {}", fmt_bytes(*peak)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    Ok(model)
}

/// The largest tile (multiple of 32 px, 64 to 512) in `layout`, its stride on the VAE's `grid`
/// (its spatial factor), whose largest tile over a `frame` of (height, width) pixels has a
/// modelled peak that fits what the budget leaves, or a refusal naming both numbers. (A balanced layout's tiles can be smaller than the spec's
/// side: 384 px every 288 cuts 832×480 into six tiles of 288×344.)
pub fn choose_tile(
    phase: &mut Phase<'_>,
    model: TileMemoryModel,
    budget: u64,
    frame: (usize, usize),
    (layout, grid): (TileLayout, usize),
    strip_bytes_per_pixel: f64,
) -> Result<TileSpec, MemError> {
    let session = phase.session();
    let in_use = phase
        .read()?
        .compute_used()
        .saturating_sub(session.baseline().compute_used());
    let left = budget.saturating_sub(in_use);
    let allowed = (left as f64 * TILE_BUDGET_SHARE) as u64;
    let spec = |side: usize| TileSpec {
        tile: side,
        stride: default_stride_on(side, grid),
        layout,
    };
    // The modelled largest tile, and the blending strips the pass holds besides it (exact).
    let needed = |tiles: TileSpec| {
        let (h, w) = tiles.largest_tile(frame.0, frame.1);
        let strips = tiles.strip_pixels(frame.0, frame.1) as f64 * strip_bytes_per_pixel;
        (model.bytes(h * w), strips as u64)
    };
    let fits = (SMALLEST_TILE..=MAX_TILE)
        .rev()
        .step_by(32)
        .map(spec)
        .find(|&tiles| {
            let (tile, strips) = needed(tiles);
            tile + strips <= allowed
        });
    let Some(tiles) = fits else {
        let smallest = SMALLEST_TILE * SMALLEST_TILE;
        return Err(MemError::OverBudget {
            model: format!("vae activations of a {SMALLEST_TILE}-px tile (modelled)"),
            tier: session.compute_tier(),
            needed: model.bytes(smallest),
            in_use,
            allowed: budget,
        });
    };
    let (largest_h, largest_w) = tiles.largest_tile(frame.0, frame.1);
    let (tile_bytes, strip_bytes) = needed(tiles);
    phase.note(
        "vae tile choice",
        &format!(
            "{} of the budget left, {}% of it allowed: tile {} px, stride {} px, {} layout, \
             largest tile {largest_h}x{largest_w} px (estimated: modelled peak {}, blending strips {} from their sizes)",
            fmt_bytes(left),
            (TILE_BUDGET_SHARE * 100.0) as u32,
            tiles.tile,
            tiles.stride,
            tiles.layout,
            fmt_bytes(tile_bytes),
            fmt_bytes(strip_bytes),
        ),
    );
    Ok(tiles)
}

#[cfg(test)]
mod tests {
    use super::TileMemoryModel;

    #[test]
    fn the_tile_model_reproduces_a_quadratic_and_never_bends_down() {
        // peak(p) = 1000 + 3·p + 0.001·p², p = side²
        let peak = |side: usize| {
            let p = (side * side) as f64;
            (1000.0 + 3.0 * p + 0.001 * p * p) as u64
        };
        let model = TileMemoryModel::fit([64, 128, 192].map(|s| (s, peak(s))));
        for side in [64, 256, 512] {
            let (got, want) = (model.bytes(side * side) as f64, peak(side) as f64);
            assert!((got - want).abs() / want < 1e-6, "{side}: {got} vs {want}");
        }
        // Measured peaks that grow less than linearly are extrapolated linearly, not lower.
        let model = TileMemoryModel::fit([(64, 1000), (128, 3000), (192, 4000)]);
        assert!(model.bytes(256 * 256) >= 4000);
    }
}
