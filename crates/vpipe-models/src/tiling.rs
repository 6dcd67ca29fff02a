//! Spatial tiling for the VAE: tiles in pixels, a linear-ramp blend over the overlap, tiles
//! cropped to the stride and written row by row into one preallocated host buffer.
//!
//! The layout and the blend are those of diffusers' `AutoencoderKLWan.tiled_encode` /
//! `tiled_decode`, so that a tiled vpipe run can be checked against diffusers with the same
//! tile and stride: tiles start every `stride` pixels from the top-left corner, edge tiles are
//! cut at the frame border (so every frame size works, down to a single 8×8 frame), each tile
//! runs the whole temporal causal pass with its own feature cache (never temporal tiling: a
//! restarted cache makes frames blink), and each tile is blended with its already blended
//! upper and left neighbours over `tile − stride` (latent units on encode, pixels on decode:
//! the overlap is converted by the spatial scale factor 8) before it is cropped to the stride.
//! A tile that covers the whole frame runs the untiled path, so its result is exactly the
//! untiled one.
//!
//! What the tile function returns is blended as it is: on encode that is `quant_conv`'s 32-channel
//! output (`[mean; logvar]`, unclamped), which diffusers blends before it splits the posterior and
//! clamps the log-variance; on decode it is the unclamped pixels, which diffusers clamps to
//! [-1, 1] once, after assembly. [`crate::wan::WanVae::encode_posterior_tiled`] and
//! [`crate::wan::WanVae::decode_tiled`] do it in that order. The spec is checked
//! ([`TileSpec::validate`]) before the tile function is first called; every result, the
//! untiled one included, is returned on the host.

use candle_core::{Device, Tensor};

/// Pixels per latent cell in each spatial direction.
pub const SPATIAL_SCALE: usize = 8;
/// The largest tile vpipe accepts, in pixels (seed TEST 4: tiles stay below 512×512 pixels'
/// worth of activations per side; larger frames are tiled).
pub const MAX_TILE: usize = 512;

/// The stride vpipe pairs with a tile when none is given: three quarters of it, on the 8-px
/// grid (256 → 192, as diffusers' default).
pub fn default_stride(tile: usize) -> usize {
    (tile / 4 * 3 / SPATIAL_SCALE * SPATIAL_SCALE).max(SPATIAL_SCALE)
}

/// Tile size and stride in pixels (square tiles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TileSpec {
    /// Tile side, pixels.
    pub tile: usize,
    /// Distance between tile origins, pixels (`tile − stride` is the overlap).
    pub stride: usize,
}

/// A tile specification that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TileError {
    /// The tile size is unusable.
    #[error("tile {tile} px: {reason}")]
    Tile {
        /// The tile given.
        tile: usize,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The stride is unusable.
    #[error("stride {stride} px with tile {tile} px: {reason}")]
    Stride {
        /// The stride given.
        stride: usize,
        /// The tile it goes with.
        tile: usize,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// For the crate's functions: a refused spec is reported as an [`crate::Error::Config`] whose
/// reason is the [`TileError`]'s message.
impl From<TileError> for crate::Error {
    fn from(err: TileError) -> Self {
        crate::Error::Config {
            reason: format!("tiling: {err}"),
        }
    }
}

impl TileSpec {
    /// diffusers' default: 256-px tiles every 192 px.
    pub const DEFAULT: TileSpec = TileSpec {
        tile: 256,
        stride: 192,
    };

    /// Checks the spec before any work starts.
    pub fn validate(&self) -> Result<(), TileError> {
        let tile = self.tile;
        if tile == 0 || !tile.is_multiple_of(SPATIAL_SCALE) {
            return Err(TileError::Tile {
                tile,
                reason: "must be a positive multiple of 8 (the VAE's spatial scale)",
            });
        }
        if tile > MAX_TILE {
            return Err(TileError::Tile {
                tile,
                reason: "must be at most 512",
            });
        }
        let stride = self.stride;
        let reason = if stride == 0 || !stride.is_multiple_of(SPATIAL_SCALE) {
            Some("must be a positive multiple of 8")
        } else if stride > tile {
            Some("must not exceed the tile (tiles would leave gaps)")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(TileError::Stride {
                stride,
                tile,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// How many tiles cover a frame of `height`×`width` pixels.
    pub fn count(&self, height: usize, width: usize) -> usize {
        if height <= self.tile && width <= self.tile {
            1
        } else {
            height.div_ceil(self.stride) * width.div_ceil(self.stride)
        }
    }

    /// The spec in latent cells.
    fn latent(&self) -> (usize, usize) {
        (self.tile / SPATIAL_SCALE, self.stride / SPATIAL_SCALE)
    }
}

/// Runs `attempt` with `spec`; while it fails with an error `retry_smaller` accepts (a device
/// out-of-memory) and half the tile is still at least `smallest` pixels, calls `on_fallback`
/// with the failed and the next spec and tries again with half the tile. Returns the result
/// and the spec that produced it.
pub fn halving_on_failure<T, E>(
    mut spec: TileSpec,
    smallest: usize,
    retry_smaller: impl Fn(&E) -> bool,
    mut on_fallback: impl FnMut(TileSpec, TileSpec),
    mut attempt: impl FnMut(TileSpec) -> Result<T, E>,
) -> Result<(T, TileSpec), E> {
    loop {
        match attempt(spec) {
            Err(e) if retry_smaller(&e) && spec.tile / 2 >= smallest => {
                let half = spec.tile / 2 / SPATIAL_SCALE * SPATIAL_SCALE;
                let smaller = TileSpec {
                    tile: half,
                    stride: default_stride(half),
                };
                on_fallback(spec, smaller);
                spec = smaller;
            }
            other => return other.map(|value| (value, spec)),
        }
    }
}

/// How tile outputs relate to tile inputs.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Tile side and stride in input units.
    tile_in: usize,
    stride_in: usize,
    /// Overlap blended and crop kept, in output units.
    blend_out: usize,
    crop_out: usize,
}

/// Encodes `video` ([B, C, T, H, W], pixels) tile by tile with `encode_tile`, which maps a
/// pixel tile to its latent tile (any channel count, the same T for every tile). Returns the
/// assembled latents on the host. A spec that [`TileSpec::validate`] refuses is an error before
/// `encode_tile` is called.
///
/// # Shapes
/// - `video`: `[B, C, T, H, W]`
/// - returns: `[B, C', T', ⌊H/8⌋, ⌊W/8⌋]` as `encode_tile` shapes each tile (cropped to
///   `⌊H/8⌋ × ⌊W/8⌋`, as diffusers does)
pub fn tiled_encode<E: From<candle_core::Error> + From<TileError>>(
    video: &Tensor,
    spec: TileSpec,
    encode_tile: impl FnMut(&Tensor) -> Result<Tensor, E>,
) -> Result<Tensor, E> {
    spec.validate()?;
    let (tile_latent, stride_latent) = spec.latent();
    let layout = Layout {
        tile_in: spec.tile,
        stride_in: spec.stride,
        blend_out: tile_latent - stride_latent,
        crop_out: stride_latent,
    };
    let (_, _, _, h, w) = video.dims5()?;
    run_tiled(
        video,
        layout,
        (h / SPATIAL_SCALE, w / SPATIAL_SCALE),
        &|latents: &Tensor| Ok(latents.clone()),
        encode_tile,
    )
}

/// Decodes `latents` ([B, C, T, h, w]) tile by tile with `decode_tile`, which maps a latent
/// tile to its pixel tile. Blending is in pixels over `tile − stride`. With `clamp_to`, the
/// assembled pixels are clamped to that range (diffusers clamps to [-1, 1] once, after
/// assembly; clamping each blended, cropped tile before it leaves the device is the same
/// thing, and spares the host a pass over the whole video). The result is on the host. A spec
/// that [`TileSpec::validate`] refuses is an error before `decode_tile` is called.
///
/// # Shapes
/// - `latents`: `[B, C, T, h, w]`
/// - returns: `[B, C', T', 8h, 8w]` as `decode_tile` shapes each tile
pub fn tiled_decode<E: From<candle_core::Error> + From<TileError>>(
    latents: &Tensor,
    spec: TileSpec,
    clamp_to: Option<(f64, f64)>,
    decode_tile: impl FnMut(&Tensor) -> Result<Tensor, E>,
) -> Result<Tensor, E> {
    spec.validate()?;
    let (tile_latent, stride_latent) = spec.latent();
    let layout = Layout {
        tile_in: tile_latent,
        stride_in: stride_latent,
        blend_out: spec.tile - spec.stride,
        crop_out: spec.stride,
    };
    let (_, _, _, h, w) = latents.dims5()?;
    let finish = |pixels: &Tensor| match clamp_to {
        Some((low, high)) => pixels.clamp(low, high),
        None => Ok(pixels.clone()),
    };
    run_tiled(
        latents,
        layout,
        (h * SPATIAL_SCALE, w * SPATIAL_SCALE),
        &finish,
        decode_tile,
    )
}

/// Tile origins along one axis: every `stride` from 0 while inside the frame.
fn origins(len: usize, stride: usize) -> impl Iterator<Item = usize> {
    (0..len).step_by(stride)
}

/// A final, cropped part of a tile on the host, packed: `finish` runs on the device first.
fn to_host(
    part: &Tensor,
    finish: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    // `to_device` moves a tensor's whole storage, so the part is packed where it is first.
    finish(part)?.contiguous()?.to_device(&Device::Cpu)
}

fn run_tiled<E: From<candle_core::Error>>(
    input: &Tensor,
    layout: Layout,
    (out_h, out_w): (usize, usize),
    finish: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    mut run: impl FnMut(&Tensor) -> Result<Tensor, E>,
) -> Result<Tensor, E> {
    let (_, _, _, h, w) = input.dims5()?;
    if h <= layout.tile_in && w <= layout.tile_in {
        return Ok(to_host(&run(input)?, finish)?);
    }
    // Blending needs only the last `blend_out` rows of the (blended) tile above and the last
    // `blend_out` columns of the (blended) tile to the left. Those strips stay where the model
    // computed; only each tile's final, cropped part goes to the host.
    let strip = |t: &Tensor, dim: usize| -> candle_core::Result<Tensor> {
        let len = t.dim(dim)?;
        let keep = layout.blend_out.min(len);
        t.narrow(dim, len - keep, keep)?.contiguous()
    };
    let mut strips_above: Vec<Tensor> = Vec::new();
    // The host buffer the rows are written into, made when the first row gives the output's
    // batch, channels, frames and dtype.
    let mut output: Option<Tensor> = None;
    let mut filled = 0;
    for top in origins(h, layout.stride_in) {
        if filled == out_h {
            // The rows left would all be cropped away (an input a few pixels taller than the
            // output covers, on encode).
            break;
        }
        let mut row_strips = Vec::new();
        let mut strip_left: Option<Tensor> = None;
        let mut parts = Vec::new();
        let mut rows = 0;
        let mut columns_filled = 0;
        for (column, left) in origins(w, layout.stride_in).enumerate() {
            let tile = input.narrow(3, top, layout.tile_in.min(h - top))?.narrow(
                4,
                left,
                layout.tile_in.min(w - left),
            )?;
            let mut out = run(&tile)?;
            if let Some(above) = strips_above.get(column) {
                out = blend(above, &out, 3, layout.blend_out)?;
            }
            if let Some(before) = &strip_left {
                out = blend(before, &out, 4, layout.blend_out)?;
            }
            row_strips.push(strip(&out, 3)?);
            strip_left = Some(strip(&out, 4)?);
            let (_, _, _, th, tw) = out.dims5()?;
            rows = layout.crop_out.min(th).min(out_h - filled);
            let columns = layout.crop_out.min(tw).min(out_w - columns_filled);
            if columns > 0 {
                parts.push(to_host(
                    &out.narrow(3, 0, rows)?.narrow(4, 0, columns)?,
                    finish,
                )?);
                columns_filled += columns;
            }
        }
        strips_above = row_strips;
        if columns_filled != out_w {
            return Err(candle_core::Error::Msg(format!(
                "tiling: the tiles covered {columns_filled} of {out_w} output columns"
            ))
            .into());
        }
        // Packed parts side by side: one strided copy each, into the row and then the buffer.
        let row = Tensor::cat(&parts, 4)?;
        let buffer = match &output {
            Some(buffer) => buffer,
            None => {
                let (b, c, t, _, _) = row.dims5()?;
                output.insert(Tensor::zeros(
                    (b, c, t, out_h, out_w),
                    row.dtype(),
                    &Device::Cpu,
                )?)
            }
        };
        buffer.slice_set(&row, 3, filled)?;
        filled += rows;
    }
    match output {
        Some(output) if filled == out_h => Ok(output),
        _ => Err(candle_core::Error::Msg(format!(
            "tiling: the tiles covered {filled} of {out_h} output rows"
        ))
        .into()),
    }
}

/// Blends the end of `previous` into the start of `next` along `dim` over `extent` cells:
/// `next[y] = previous[len − extent + y]·(1 − y/extent) + next[y]·(y/extent)`.
fn blend(
    previous: &Tensor,
    next: &Tensor,
    dim: usize,
    extent: usize,
) -> candle_core::Result<Tensor> {
    let extent = extent.min(previous.dim(dim)?).min(next.dim(dim)?);
    if extent == 0 {
        return Ok(next.clone());
    }
    let mut weight_shape = [1usize; 5];
    weight_shape[dim] = extent;
    let ramp: Vec<f32> = (0..extent)
        .map(|y| (y as f64 / extent as f64) as f32)
        .collect();
    let ramp =
        Tensor::from_vec(ramp, weight_shape.as_slice(), next.device())?.to_dtype(next.dtype())?;
    let keep = (ramp.ones_like()? - &ramp)?;
    let tail = previous.narrow(dim, previous.dim(dim)? - extent, extent)?;
    let head = next.narrow(dim, 0, extent)?;
    let blended = (tail.broadcast_mul(&keep)? + head.broadcast_mul(&ramp)?)?;
    let rest = next.narrow(dim, extent, next.dim(dim)? - extent)?;
    Tensor::cat(&[&blended, &rest], dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn a_failing_tile_is_halved_until_it_works_or_is_too_small() {
        let mut fallbacks = Vec::new();
        let fits_at_64 = |spec: TileSpec| {
            if spec.tile > 64 {
                Err("CUDA_ERROR_OUT_OF_MEMORY")
            } else {
                Ok(spec.tile)
            }
        };
        let (value, used) = halving_on_failure(
            TileSpec::DEFAULT,
            64,
            |e: &&str| e.contains("OUT_OF_MEMORY"),
            |from, to| fallbacks.push((from.tile, to.tile, to.stride)),
            fits_at_64,
        )
        .unwrap();
        assert_eq!((value, used.tile, used.stride), (64, 64, 48));
        assert_eq!(fallbacks, [(256, 128, 96), (128, 64, 48)]);

        // Below the smallest tile the failure is returned, and other errors at once.
        let never = |_: TileSpec| Err::<(), _>("CUDA_ERROR_OUT_OF_MEMORY");
        assert!(
            halving_on_failure(TileSpec::DEFAULT, 128, |_: &&str| true, |_, _| {}, never).is_err()
        );
        let mut calls = 0;
        let other = halving_on_failure(
            TileSpec::DEFAULT,
            8,
            |e: &&str| e.contains("MEMORY"),
            |_, _| {},
            |_| {
                calls += 1;
                Err::<(), _>("shape mismatch")
            },
        );
        assert!(other.is_err());
        assert_eq!(calls, 1);
    }

    #[test]
    fn specs_are_validated_before_work() {
        assert!(TileSpec::DEFAULT.validate().is_ok());
        assert!(TileSpec {
            tile: 512,
            stride: 384
        }
        .validate()
        .is_ok());
        for (tile, stride) in [
            (0, 0),
            (250, 192),
            (520, 256),
            (256, 0),
            (256, 100),
            (256, 264),
        ] {
            let err = TileSpec { tile, stride }.validate().unwrap_err();
            assert!(err.to_string().contains("px"), "{err}");
        }
    }

    fn ramp_video(h: usize, w: usize) -> Tensor {
        let data: Vec<f32> = (0..2 * 3 * h * w).map(|i| (i % 97) as f32 / 97.0).collect();
        Tensor::from_vec(data, (1, 2, 3, h, w), &Device::Cpu).unwrap()
    }

    /// A tile function that is exactly "downsample by 8 by averaging": tiling it must give the
    /// untiled result wherever the overlap blends two equal values.
    fn pool8(t: &Tensor) -> crate::Result<Tensor> {
        let (b, c, f, h, w) = t.dims5()?;
        Ok(t.reshape((b, c * f, h, w))?
            .avg_pool2d(8)?
            .reshape((b, c, f, h / 8, w / 8))?)
    }

    #[test]
    fn a_pointwise_tile_function_tiles_to_the_untiled_result() {
        for (h, w) in [(120, 200), (56, 72), (8, 8), (480, 832)] {
            let video = ramp_video(h, w);
            let untiled = pool8(&video).unwrap();
            for spec in [
                TileSpec {
                    tile: 64,
                    stride: 48,
                },
                TileSpec {
                    tile: 32,
                    stride: 32,
                },
            ] {
                let tiled = tiled_encode(&video, spec, pool8).unwrap();
                assert_eq!(tiled.dims(), untiled.dims(), "{h}x{w} {spec:?}");
                let diff = (tiled - &untiled)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap();
                assert!(diff.to_scalar::<f32>().unwrap() < 1e-6, "{h}x{w} {spec:?}");
            }
        }
    }

    #[test]
    fn a_tile_covering_the_frame_is_exactly_untiled() {
        let latents = ramp_video(15, 25);
        let mut calls = 0;
        let out = tiled_decode(
            &latents,
            TileSpec {
                tile: 256,
                stride: 192,
            },
            None,
            |t| {
                calls += 1;
                Ok::<_, crate::Error>(t.affine(2.0, 1.0)?)
            },
        )
        .unwrap();
        assert_eq!(calls, 1);
        let expected = latents.affine(2.0, 1.0).unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn the_overlap_ramps_linearly_from_the_previous_tile() {
        let previous = Tensor::ones((1, 1, 1, 1, 4), DType::F32, &Device::Cpu).unwrap();
        let next = Tensor::zeros((1, 1, 1, 1, 6), DType::F32, &Device::Cpu).unwrap();
        let blended = blend(&previous, &next, 4, 4).unwrap();
        let values = blended.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
    }
}
