//! Spatial tiling for the VAE: tiles in pixels, a linear-ramp blend over the overlap, tiles
//! cropped where the next one starts and written row by row into one preallocated host buffer.
//!
//! Each tile runs the whole temporal causal pass with its own feature cache (never temporal
//! tiling: a restarted cache makes frames blink), and each tile is blended with its already
//! blended upper and left neighbours over their overlap (latent units on encode, pixels on
//! decode: positions are converted by the spatial scale factor 8) before it is cropped where
//! the next tile starts. A tile that covers the whole frame runs the untiled path, so its
//! result is exactly the untiled one. A VAE that folds the video into patches first (Wan 2.2,
//! 2×2) is tiled over the folded video, whose pixels its encoder compresses by 8 and its
//! decoder produces before they are unfolded ([`tiled_encode_patches`]; the blend is in folded
//! pixels, as in diffusers). Two placements ([`TileLayout`]):
//!
//! - [`TileLayout::Diffusers`] is that of diffusers' `AutoencoderKLWan.tiled_encode` /
//!   `tiled_decode`, so that a tiled vpipe run can be checked against diffusers with the same
//!   tile and stride: tiles start every `stride` pixels from the top-left corner and edge tiles
//!   are cut at the frame border. An edge tile can lie wholly inside its neighbour's overlap
//!   (832 px wide with 256-px tiles every 192: a fifth, 64-px column after four tiles that
//!   already reach the border), which costs a tile's fixed cost for nothing.
//! - [`TileLayout::Balanced`] (the default) uses the fewest tiles per axis that cover the frame
//!   with at least the spec's overlap, all of one size no larger than the spec's tile, spread
//!   evenly and ending at the border. No tile is larger than the spec's, so the memory a spec
//!   needs bounds both layouts.
//!
//! What the tile function returns is blended as it is, in place (it must be a tensor the
//! function does not keep; a view is packed first): on encode that is `quant_conv`'s 32-channel
//! output (`[mean; logvar]`, unclamped), which diffusers blends before it splits the posterior and
//! clamps the log-variance; on decode it is the unclamped pixels, which diffusers clamps to
//! [-1, 1] once, after assembly. [`crate::wan::WanVae::encode_posterior_tiled`] and
//! [`crate::wan::WanVae::decode_tiled`] do it in that order. The spec is checked
//! ([`TileSpec::validate`]) before the tile function is first called; every result, the
//! untiled one included, is returned on the host.

use candle_core::{DType, Device, Tensor};

/// Pixels per latent cell in each spatial direction.
pub const SPATIAL_SCALE: usize = 8;
/// The largest tile vpipe accepts, in pixels (seed TEST 4: tiles stay below 512×512 pixels'
/// worth of activations per side; larger frames are tiled).
pub const MAX_TILE: usize = 512;

/// The largest frame side, in pixels, that the tiler lays tiles over: 16384, about 20 times
/// Wan's 832-px width, which is still at most 2049 tiles per axis. A larger side (or an empty
/// one) is refused ([`TileSpec::check_frame`]) before any count, plan or buffer is sized from
/// it.
pub const MAX_FRAME_SIDE: usize = 16384;

/// The stride vpipe pairs with a tile when none is given: three quarters of it, on the 8-px
/// grid (256 → 192, as diffusers' default).
pub fn default_stride(tile: usize) -> usize {
    default_stride_on(tile, SPATIAL_SCALE)
}

/// [`default_stride`] on a grid of `grid` pixels (a VAE's spatial factor: 16 for Wan 2.2,
/// whose tiles must cover whole latent cells): three quarters of the tile, rounded down to
/// the grid, at least one cell.
pub fn default_stride_on(tile: usize, grid: usize) -> usize {
    let grid = grid.max(1);
    (tile / 4 * 3 / grid * grid).max(grid)
}

/// Where tiles go over a frame (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TileLayout {
    /// The fewest equal tiles, at most the spec's size, with at least its overlap.
    #[default]
    Balanced,
    /// diffusers' placement: a tile every `stride` from the corner, edge tiles cut.
    Diffusers,
}

impl std::fmt::Display for TileLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TileLayout::Balanced => "balanced",
            TileLayout::Diffusers => "diffusers",
        })
    }
}

impl std::str::FromStr for TileLayout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "balanced" => Ok(TileLayout::Balanced),
            "diffusers" => Ok(TileLayout::Diffusers),
            _ => Err(format!(
                "'{s}' is not a tile layout (balanced or diffusers)"
            )),
        }
    }
}

/// Tile size and stride in pixels (square tiles), and where the tiles go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TileSpec {
    /// Tile side, pixels.
    pub tile: usize,
    /// Distance between tile origins, pixels (`tile − stride` is the overlap). The balanced
    /// layout's tiles may be closer together (a larger overlap), never farther apart.
    pub stride: usize,
    /// Tile placement.
    #[serde(default)]
    pub layout: TileLayout,
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
    /// The frame cannot be tiled: a side is empty or past [`MAX_FRAME_SIDE`].
    #[error("frame {height}x{width} px: {reason}")]
    Frame {
        /// Frame height in pixels.
        height: usize,
        /// Frame width in pixels.
        width: usize,
        /// Why it is refused.
        reason: String,
    },
    /// The tensor to tile is not a non-empty 5-dimensional tensor.
    #[error(
        "input of shape {shape:?}: expected a tensor of shape {layout} with no empty dimension"
    )]
    Input {
        /// The expected layout, e.g. `[B, C, T, H, W]`.
        layout: &'static str,
        /// The shape that was passed.
        shape: Vec<usize>,
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
    /// diffusers' default size: 256-px tiles every 192 px, balanced.
    pub const DEFAULT: TileSpec = TileSpec::balanced(256, 192);

    /// `tile` and `stride` in the balanced layout.
    pub const fn balanced(tile: usize, stride: usize) -> TileSpec {
        TileSpec {
            tile,
            stride,
            layout: TileLayout::Balanced,
        }
    }

    /// `tile` and `stride` in diffusers' layout.
    pub const fn diffusers(tile: usize, stride: usize) -> TileSpec {
        TileSpec {
            tile,
            stride,
            layout: TileLayout::Diffusers,
        }
    }

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

    /// Checks the spec ([`Self::validate`]) and a frame of `height`×`width` pixels: both sides
    /// at least 1 and at most [`MAX_FRAME_SIDE`]. Every count and size below is computed only
    /// after this check, so none can overflow or size an absurd allocation.
    pub fn check_frame(&self, height: usize, width: usize) -> Result<(), TileError> {
        self.validate()?;
        let reason = if height == 0 || width == 0 {
            "each side must be at least 1 px".to_string()
        } else if height > MAX_FRAME_SIDE || width > MAX_FRAME_SIDE {
            format!("each side must be at most {MAX_FRAME_SIDE} px")
        } else {
            return Ok(());
        };
        Err(TileError::Frame {
            height,
            width,
            reason,
        })
    }

    /// How many tiles cover a frame of `height`×`width` pixels; a spec or frame that
    /// [`Self::check_frame`] refuses is an error.
    pub fn try_count(&self, height: usize, width: usize) -> Result<usize, TileError> {
        self.check_frame(height, width)?;
        if height <= self.tile && width <= self.tile {
            return Ok(1);
        }
        let rows = self.spans(height, SPATIAL_SCALE).len();
        let columns = self.spans(width, SPATIAL_SCALE).len();
        rows.checked_mul(columns)
            .ok_or_else(|| overflow(height, width, "the tile count"))
    }

    /// How many tiles cover a frame of `height`×`width` pixels; 0 for a spec or frame that
    /// [`Self::check_frame`] refuses (see [`Self::try_count`] for the reason).
    pub fn count(&self, height: usize, width: usize) -> usize {
        self.try_count(height, width).unwrap_or(0)
    }

    /// The (height, width) in pixels of every distinct tile a `height`×`width` frame is cut
    /// into, smallest first; a spec or frame that [`Self::check_frame`] refuses is an error.
    pub fn try_tile_shapes(
        &self,
        height: usize,
        width: usize,
    ) -> Result<Vec<(usize, usize)>, TileError> {
        self.check_frame(height, width)?;
        let lengths = |len: usize| {
            let mut v: Vec<usize> = self
                .spans(len, SPATIAL_SCALE)
                .iter()
                .map(|&(_, l)| l)
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let widths = lengths(width);
        Ok(lengths(height)
            .into_iter()
            .flat_map(|h| widths.iter().map(move |&w| (h, w)))
            .collect())
    }

    /// The (height, width) in pixels of every distinct tile a `height`×`width` frame is cut
    /// into, smallest first; empty for a spec or frame that [`Self::check_frame`] refuses.
    pub fn tile_shapes(&self, height: usize, width: usize) -> Vec<(usize, usize)> {
        self.try_tile_shapes(height, width).unwrap_or_default()
    }

    /// The (height, width) in pixels of the largest tile a `height`×`width` frame is cut
    /// into: what bounds a pass's memory (a balanced layout's tiles are often smaller than the
    /// spec's square). A spec or frame that [`Self::check_frame`] refuses is an error.
    pub fn try_largest_tile(
        &self,
        height: usize,
        width: usize,
    ) -> Result<(usize, usize), TileError> {
        let shapes = self.try_tile_shapes(height, width)?;
        let mut largest = (0, 0);
        let mut largest_area = 0;
        for (h, w) in shapes {
            let area = h
                .checked_mul(w)
                .ok_or_else(|| overflow(height, width, "a tile's area"))?;
            if area > largest_area {
                (largest, largest_area) = ((h, w), area);
            }
        }
        Ok(largest)
    }

    /// [`Self::try_largest_tile`], or (0, 0) for a spec or frame that [`Self::check_frame`]
    /// refuses.
    pub fn largest_tile(&self, height: usize, width: usize) -> (usize, usize) {
        self.try_largest_tile(height, width).unwrap_or((0, 0))
    }

    /// The most frame pixels of blending strips that a tiled pass over a `height`×`width`
    /// frame holds at once, per output channel and frame: the overlaps of the row above and of
    /// the row in progress with the next row, across all columns, and one tile's overlap with
    /// the next column. Times the output's bytes per pixel (on encode, per latent cell divided
    /// by 64), that is memory the untiled calibration crops do not hold. A spec or frame that
    /// [`Self::check_frame`] refuses is an error.
    pub fn try_strip_pixels(&self, height: usize, width: usize) -> Result<usize, TileError> {
        self.check_frame(height, width)?;
        if height <= self.tile && width <= self.tile {
            return Ok(0);
        }
        let too_large = || overflow(height, width, "the blending strips");
        let rows = self.spans(height, SPATIAL_SCALE);
        let columns = self.spans(width, SPATIAL_SCALE);
        let overlaps = |spans: &[(usize, usize)]| -> Vec<usize> {
            spans
                .windows(2)
                .map(|pair| (pair[0].0 + pair[0].1).saturating_sub(pair[1].0))
                .collect()
        };
        let row_overlaps = overlaps(&rows);
        let column_overlap = overlaps(&columns).into_iter().max().unwrap_or(0);
        let row_width = columns
            .iter()
            .try_fold(0usize, |sum, &(_, w)| sum.checked_add(w))
            .ok_or_else(too_large)?;
        let mut most = 0;
        for (r, &(_, row_height)) in rows.iter().enumerate() {
            let above = r.checked_sub(1).map_or(0, |a| row_overlaps[a]);
            let below = row_overlaps.get(r).copied().unwrap_or(0);
            let pixels = above
                .checked_add(below)
                .and_then(|strips| strips.checked_mul(row_width))
                .and_then(|strips| strips.checked_add(row_height.checked_mul(column_overlap)?))
                .ok_or_else(too_large)?;
            most = most.max(pixels);
        }
        Ok(most)
    }

    /// [`Self::try_strip_pixels`], or 0 for a spec or frame that [`Self::check_frame`]
    /// refuses.
    pub fn strip_pixels(&self, height: usize, width: usize) -> usize {
        self.try_strip_pixels(height, width).unwrap_or(0)
    }

    /// The tiles along one axis of `len` input units (pixels or latent cells) as (origin,
    /// length) in those units, for a spec given in the same units; the balanced layout puts
    /// origins on a `grid`-unit grid (8 for pixels, so that they fall on latent cells).
    fn spans(&self, len: usize, grid: usize) -> Vec<(usize, usize)> {
        let (tile, stride) = (self.tile, self.stride);
        match self.layout {
            // Also along an axis the tile covers, once the frame is tiled (diffusers' loops
            // do not check each axis).
            TileLayout::Diffusers => (0..len)
                .step_by(stride)
                .map(|origin| (origin, tile.min(len - origin)))
                .collect(),
            // A length a few pixels off the grid past the tile is one tile of all of it.
            TileLayout::Balanced if len / grid <= tile / grid => vec![(0, len)],
            TileLayout::Balanced => {
                let cells = balanced_spans(len / grid, tile / grid, stride / grid);
                let last = cells.len() - 1;
                cells
                    .into_iter()
                    .enumerate()
                    .map(|(i, (origin, length))| {
                        // The last tile also takes what is left after the last whole cell.
                        let length = if i == last {
                            len - origin * grid
                        } else {
                            length * grid
                        };
                        (origin * grid, length)
                    })
                    .collect()
            }
        }
    }

    /// The spec in latent cells.
    fn latent(&self) -> TileSpec {
        TileSpec {
            tile: self.tile / SPATIAL_SCALE,
            stride: self.stride / SPATIAL_SCALE,
            layout: self.layout,
        }
    }
}

/// A size computed from a frame that does not fit in `usize`.
fn overflow(height: usize, width: usize, what: &str) -> TileError {
    TileError::Frame {
        height,
        width,
        reason: format!("{what} overflows"),
    }
}

/// The balanced layout along an axis of `len > tile` cells: (origin, length) in cells.
fn balanced_spans(len: usize, tile: usize, stride: usize) -> Vec<(usize, usize)> {
    let overlap = tile - stride;
    let count = 1 + (len - tile).div_ceil(stride);
    // The shortest tile with which `count` tiles overlapping by `overlap` still cover.
    let length = (len + (count - 1) * overlap).div_ceil(count);
    // Floored even spacing: gaps of at most ⌈(len − length)/(count − 1)⌉ ≤ length − overlap,
    // so every overlap is at least `overlap`, and the last tile ends at `len`.
    (0..count)
        .map(|i| (i * (len - length) / (count - 1), length))
        .collect()
}

/// Runs `attempt` with `spec`; while it fails with an error `retry_smaller` accepts (a device
/// out-of-memory) and half the tile is still at least `smallest` pixels, calls `on_fallback`
/// with the failed and the next spec and tries again with half the tile. Returns the result
/// and the spec that produced it. Halving stops before a tile smaller than one latent cell,
/// whatever `smallest` is, so the loop ends even when every attempt fails.
pub fn halving_on_failure<T, E>(
    spec: TileSpec,
    smallest: usize,
    retry_smaller: impl Fn(&E) -> bool,
    on_fallback: impl FnMut(TileSpec, TileSpec),
    attempt: impl FnMut(TileSpec) -> Result<T, E>,
) -> Result<(T, TileSpec), E> {
    halving_on_grid(
        spec,
        (smallest, SPATIAL_SCALE),
        retry_smaller,
        on_fallback,
        attempt,
    )
}

/// [`halving_on_failure`] with every smaller tile and its stride on a grid of `grid` pixels
/// (a VAE's spatial factor), so that each tile still covers whole latent cells.
pub fn halving_on_grid<T, E>(
    mut spec: TileSpec,
    (smallest, grid): (usize, usize),
    retry_smaller: impl Fn(&E) -> bool,
    mut on_fallback: impl FnMut(TileSpec, TileSpec),
    mut attempt: impl FnMut(TileSpec) -> Result<T, E>,
) -> Result<(T, TileSpec), E> {
    let grid = grid.max(1);
    loop {
        let half = spec.tile / 2 / grid * grid;
        match attempt(spec) {
            Err(e) if retry_smaller(&e) && spec.tile / 2 >= smallest && half >= grid => {
                let smaller = TileSpec {
                    tile: half,
                    stride: default_stride_on(half, grid),
                    layout: spec.layout,
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
    /// The spec in input units (pixels on encode, latent cells on decode).
    spec_in: TileSpec,
    /// Input units per balanced-layout grid step (one latent cell).
    grid_in: usize,
    /// Output position of an input position.
    to_out: fn(usize) -> usize,
    /// The longest side, in input units, run as one tile (the spec's tile, except for
    /// diffusers' encode of a video folded into patches: see [`tiled_encode_patches`]).
    untiled_within: usize,
}

/// Encodes `video` ([B, C, T, H, W], pixels) tile by tile with `encode_tile`, which maps a
/// pixel tile to its latent tile (any channel count, the same T for every tile). Returns the
/// assembled latents on the host. A spec or frame that [`TileSpec::check_frame`] refuses, or a
/// `video` that is not 5-dimensional with no empty dimension, is an error before `encode_tile`
/// is called.
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
    tiled_encode_patches(video, spec, 1, encode_tile)
}

/// [`tiled_encode`] of a video already folded into `patch`×`patch` patches (Wan 2.2's VAE,
/// whose encoder compresses the folded video by 8), with `spec` in folded pixels. The tiles
/// are the same, except where diffusers' layout decides whether to tile at all: diffusers
/// compares its tile with the *unfolded* frame, so there a frame more than `spec.tile / patch`
/// folded pixels on a side is tiled even when one tile covers it. (`patch` 1 is
/// [`tiled_encode`].)
///
/// # Shapes
/// As [`tiled_encode`], `video` being the folded video.
pub fn tiled_encode_patches<E: From<candle_core::Error> + From<TileError>>(
    video: &Tensor,
    spec: TileSpec,
    patch: usize,
    encode_tile: impl FnMut(&Tensor) -> Result<Tensor, E>,
) -> Result<Tensor, E> {
    // The spec first: a bad spec is reported whatever the input.
    spec.validate()?;
    let (_, _, _, h, w) = non_empty_5d(video, "[B, C, T, H, W]")?;
    spec.check_frame(h, w)?;
    let untiled_within = match spec.layout {
        TileLayout::Diffusers => spec.tile / patch.max(1),
        TileLayout::Balanced => spec.tile,
    };
    let layout = Layout {
        spec_in: spec,
        grid_in: SPATIAL_SCALE,
        to_out: |pixels| pixels / SPATIAL_SCALE,
        untiled_within,
    };
    run_tiled(
        video,
        layout,
        (h / SPATIAL_SCALE, w / SPATIAL_SCALE),
        Finish::default(),
        encode_tile,
    )
}

/// What becomes of decoded pixels once blended and cropped, on the device, before they go to
/// the host: work on the whole video that the host would do slowly.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Finish {
    /// Clamp to this range. diffusers clamps to [-1, 1] once, after assembly; clamping each
    /// blended, cropped tile is the same thing.
    pub clamp: Option<(f64, f64)>,
    /// Convert to this dtype, after the clamp (the blend stays in the tiles' dtype, as in
    /// diffusers).
    pub dtype: Option<DType>,
}

impl Finish {
    fn apply(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let pixels = match self.clamp {
            Some((low, high)) => pixels.clamp(low, high)?,
            None => pixels.clone(),
        };
        match self.dtype {
            Some(dtype) => pixels.to_dtype(dtype),
            None => Ok(pixels),
        }
    }
}

/// Decodes `latents` ([B, C, T, h, w]) tile by tile with `decode_tile`, which maps a latent
/// tile to its pixel tile. Blending is in pixels; `finish` then runs on each cropped tile
/// before it leaves the device. The result is on the host. A spec or pixel frame (`8h`×`8w`)
/// that [`TileSpec::check_frame`] refuses, or `latents` that are not 5-dimensional with no
/// empty dimension, is an error before `decode_tile` is called.
///
/// # Shapes
/// - `latents`: `[B, C, T, h, w]`
/// - returns: `[B, C', T', 8h, 8w]` as `decode_tile` shapes each tile
pub fn tiled_decode<E: From<candle_core::Error> + From<TileError>>(
    latents: &Tensor,
    spec: TileSpec,
    finish: Finish,
    decode_tile: impl FnMut(&Tensor) -> Result<Tensor, E>,
) -> Result<Tensor, E> {
    spec.validate()?;
    let (_, _, _, h, w) = non_empty_5d(latents, "[B, C, T, h, w]")?;
    // Saturated, a product past usize is past the frame limit too and refused as such.
    let (out_h, out_w) = (
        h.saturating_mul(SPATIAL_SCALE),
        w.saturating_mul(SPATIAL_SCALE),
    );
    spec.check_frame(out_h, out_w)?;
    let layout = Layout {
        spec_in: spec.latent(),
        grid_in: 1,
        to_out: |cells| cells * SPATIAL_SCALE,
        untiled_within: spec.latent().tile,
    };
    run_tiled(latents, layout, (out_h, out_w), finish, decode_tile)
}

/// The dimensions of `x` when it has five and none is empty.
fn non_empty_5d(
    x: &Tensor,
    layout: &'static str,
) -> Result<(usize, usize, usize, usize, usize), TileError> {
    match *x.dims() {
        [b, c, t, h, w] if !x.dims().contains(&0) => Ok((b, c, t, h, w)),
        _ => Err(TileError::Input {
            layout,
            shape: x.dims().to_vec(),
        }),
    }
}

/// A final, cropped part of a tile on the host, packed: `finish` runs on the device first.
fn to_host(part: &Tensor, finish: Finish) -> candle_core::Result<Tensor> {
    // `to_device` moves a tensor's whole storage, so the part is packed where it is first.
    finish.apply(part)?.contiguous()?.to_device(&Device::Cpu)
}

/// The last `len` cells of `t` along `dim` (all of it if shorter), packed.
fn tail(t: &Tensor, dim: usize, len: usize) -> candle_core::Result<Tensor> {
    let have = t.dim(dim)?;
    let keep = len.min(have);
    t.narrow(dim, have - keep, keep)?.contiguous()
}

fn run_tiled<E: From<candle_core::Error>>(
    input: &Tensor,
    layout: Layout,
    (out_h, out_w): (usize, usize),
    finish: Finish,
    mut run: impl FnMut(&Tensor) -> Result<Tensor, E>,
) -> Result<Tensor, E> {
    let (_, _, _, h, w) = input.dims5()?;
    let spec = layout.spec_in;
    if h <= layout.untiled_within && w <= layout.untiled_within {
        return Ok(to_host(&run(input)?, finish)?);
    }
    let rows = spec.spans(h, layout.grid_in);
    let columns = spec.spans(w, layout.grid_in);
    let row_out: Vec<usize> = rows.iter().map(|&(o, _)| (layout.to_out)(o)).collect();
    let column_out: Vec<usize> = columns.iter().map(|&(o, _)| (layout.to_out)(o)).collect();
    // Blending needs only the part of the (blended) tile above that the next row overlaps, and
    // likewise of the tile to the left. Those strips stay where the model computed; only each
    // tile's final, cropped part goes to the host.
    let mut strips_above: Vec<Tensor> = Vec::new();
    // The host buffer the rows are written into, made when the first row gives the output's
    // batch, channels, frames and dtype.
    let mut output: Option<Tensor> = None;
    let mut filled = 0;
    for (r, &(top, tile_h)) in rows.iter().enumerate() {
        if filled == out_h {
            // The rows left would all be cropped away (an input a few pixels taller than the
            // output covers, on encode).
            break;
        }
        let mut row_strips = Vec::new();
        let mut strip_left: Option<Tensor> = None;
        let mut parts = Vec::new();
        let mut kept_rows = 0;
        let mut columns_filled = 0;
        for (c, &(left, tile_w)) in columns.iter().enumerate() {
            let _span = tracing::debug_span!("vae_tile", row = r, column = c).entered();
            let tile = input.narrow(3, top, tile_h)?.narrow(4, left, tile_w)?;
            // Blended in place: a packed result the tile function does not keep.
            let out = run(&tile)?.contiguous()?;
            if let Some(above) = strips_above.get(c) {
                blend_into(above, &out, 3, above.dim(3)?)?;
            }
            if let Some(before) = &strip_left {
                blend_into(before, &out, 4, before.dim(4)?)?;
            }
            let (_, _, _, th, tw) = out.dims5()?;
            // From where the next tile starts to this tile's end.
            if let Some(&next) = row_out.get(r + 1) {
                row_strips.push(tail(&out, 3, (row_out[r] + th).saturating_sub(next))?);
            }
            strip_left = match column_out.get(c + 1) {
                Some(&next) => Some(tail(&out, 4, (column_out[c] + tw).saturating_sub(next))?),
                None => None,
            };
            // Up to where the next tile starts.
            let crop = |origins: &[usize], i: usize, len: usize| {
                origins
                    .get(i + 1)
                    .map_or(len, |&next| next - origins[i])
                    .min(len)
            };
            kept_rows = crop(&row_out, r, th).min(out_h - filled);
            let kept_columns = crop(&column_out, c, tw).min(out_w - columns_filled);
            if kept_columns > 0 {
                parts.push(to_host(
                    &out.narrow(3, 0, kept_rows)?.narrow(4, 0, kept_columns)?,
                    finish,
                )?);
                columns_filled += kept_columns;
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
        filled += kept_rows;
    }
    match output {
        Some(output) if filled == out_h => Ok(output),
        _ => Err(candle_core::Error::Msg(format!(
            "tiling: the tiles covered {filled} of {out_h} output rows"
        ))
        .into()),
    }
}

/// Blends the end of `previous` into the start of `next` along `dim` over `extent` cells, in
/// place in `next` (packed; no copy of the whole tile):
/// `next[y] = previous[len − extent + y]·(1 − y/extent) + next[y]·(y/extent)`.
fn blend_into(
    previous: &Tensor,
    next: &Tensor,
    dim: usize,
    extent: usize,
) -> candle_core::Result<()> {
    let extent = extent.min(previous.dim(dim)?).min(next.dim(dim)?);
    if extent == 0 {
        return Ok(());
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
    next.slice_set(&blended, dim, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_on_a_16_px_grid_keeps_tiles_and_strides_on_it() {
        let mut tried = Vec::new();
        let result = halving_on_grid(
            TileSpec::balanced(272, 192),
            (16, 16),
            |_: &()| true,
            |_, _| {},
            |spec| {
                tried.push((spec.tile, spec.stride));
                Err::<(), ()>(())
            },
        );
        assert!(result.is_err());
        assert_eq!(tried, [(272, 192), (128, 96), (64, 48), (32, 16), (16, 16)]);
        assert_eq!(default_stride_on(272, 16), 192);
        assert_eq!(default_stride(272), 200);
    }

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
        assert!(TileSpec::balanced(512, 384).validate().is_ok());
        for (tile, stride) in [
            (0, 0),
            (250, 192),
            (520, 256),
            (256, 0),
            (256, 100),
            (256, 264),
        ] {
            let err = TileSpec::diffusers(tile, stride).validate().unwrap_err();
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
                TileSpec::diffusers(64, 48),
                TileSpec::diffusers(32, 32),
                TileSpec::balanced(64, 48),
                TileSpec::balanced(32, 32),
                TileSpec::balanced(64, 16),
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
        let out = tiled_decode(&latents, TileSpec::DEFAULT, Finish::default(), |t| {
            calls += 1;
            Ok::<_, crate::Error>(t.affine(2.0, 1.0)?)
        })
        .unwrap();
        assert_eq!(calls, 1);
        let expected = latents.affine(2.0, 1.0).unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn finishing_each_tile_is_finishing_the_assembled_result() {
        // A bf16 tile function whose values leave [-1, 1]: clamped and converted per cropped
        // tile, the result is the unfinished assembly clamped and converted afterwards.
        let latents = ramp_video(15, 25);
        let decode = |t: &Tensor| -> crate::Result<Tensor> {
            let (b, c, f, h, w) = t.dims5()?;
            let up = t
                .reshape((b, c * f, h, w))?
                .upsample_nearest2d(h * 8, w * 8)?
                .reshape((b, c, f, h * 8, w * 8))?;
            Ok(up.affine(4.0, -2.0)?.to_dtype(DType::BF16)?)
        };
        for spec in [TileSpec::balanced(64, 48), TileSpec::diffusers(64, 48)] {
            let finish = Finish {
                clamp: Some((-1.0, 1.0)),
                dtype: Some(DType::F32),
            };
            let finished = tiled_decode(&latents, spec, finish, decode).unwrap();
            assert_eq!(finished.dtype(), DType::F32);
            let expected = tiled_decode(&latents, spec, Finish::default(), decode)
                .unwrap()
                .clamp(-1f64, 1f64)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert_eq!(
                finished.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{spec:?}"
            );
        }
    }

    #[test]
    fn diffusers_layout_follows_diffusers_loops() {
        // `for i in range(0, 832, 192)`: x[i : i + 256], the last cut at the border.
        let spec = TileSpec::diffusers(256, 192);
        assert_eq!(
            spec.spans(832, SPATIAL_SCALE),
            [(0, 256), (192, 256), (384, 256), (576, 256), (768, 64)]
        );
        assert_eq!(
            spec.spans(480, SPATIAL_SCALE),
            [(0, 256), (192, 256), (384, 96)]
        );
        assert_eq!(spec.count(480, 832), 15);
        // An axis the tile covers is still cut every stride: 40×24 px with 24-px tiles every 16
        // is 3×2 tiles.
        assert_eq!(TileSpec::diffusers(24, 16).spans(24, 8), [(0, 24), (16, 8)]);
        assert_eq!(TileSpec::diffusers(24, 16).count(40, 24), 6);
        assert_eq!(spec.latent().spans(60, 1), [(0, 32), (24, 32), (48, 12)]);
    }

    #[test]
    fn balanced_layout_on_the_wan_frame() {
        // 832 px: four 256-px tiles reach the border, so there is no fifth; 480 px: three
        // tiles of 208 px (26 latent cells) instead of 256, 256 and 96.
        let spec = TileSpec::balanced(256, 192);
        assert_eq!(
            spec.spans(832, SPATIAL_SCALE),
            [(0, 256), (192, 256), (384, 256), (576, 256)]
        );
        assert_eq!(
            spec.spans(480, SPATIAL_SCALE),
            [(0, 208), (136, 208), (272, 208)]
        );
        assert_eq!(spec.count(480, 832), 12);
        assert_eq!(spec.tile_shapes(480, 832), [(208, 256)]);
        assert_eq!(spec.largest_tile(480, 832), (208, 256));
        assert_eq!(
            TileSpec::diffusers(256, 192).largest_tile(480, 832),
            (256, 256)
        );
        // Rows overlap by 72 px, columns by 64: the middle row holds the strips above and below
        // across four 256-px columns and one 208×64 column strip.
        assert_eq!(spec.strip_pixels(480, 832), (72 + 72) * 1024 + 208 * 64);
        assert_eq!(spec.strip_pixels(200, 200), 0);
        // Off the 8-px grid (the generic tiler accepts it; the VAE does not).
        assert_eq!(spec.spans(260, SPATIAL_SCALE), [(0, 260)]);
        assert_eq!(
            spec.spans(470, SPATIAL_SCALE),
            [(0, 200), (128, 200), (264, 206)]
        );
        // Decode tiles in latent cells are the same tiles.
        assert_eq!(spec.latent().spans(60, 1), [(0, 26), (17, 26), (34, 26)]);
    }

    #[test]
    fn balanced_tiles_cover_with_at_least_the_overlap_and_never_exceed_the_tile() {
        for (tile, stride) in [
            (256, 192),
            (64, 48),
            (32, 16),
            (16, 8),
            (64, 64),
            (512, 384),
        ] {
            let spec = TileSpec::balanced(tile, stride);
            for len in (8..=1200).step_by(8) {
                let spans = spec.spans(len, SPATIAL_SCALE);
                let at = format!("tile {tile} stride {stride}, {len} px: {spans:?}");
                assert_eq!(spans[0].0, 0, "{at}");
                let (last, last_len) = spans[spans.len() - 1];
                assert_eq!(last + last_len, len, "{at}");
                let fewest = if len <= tile {
                    1
                } else {
                    1 + (len - tile).div_ceil(stride)
                };
                assert_eq!(spans.len(), fewest, "{at}");
                for &(origin, length) in &spans {
                    assert!(length <= tile && origin % SPATIAL_SCALE == 0, "{at}");
                }
                for pair in spans.windows(2) {
                    let ((a, a_len), (b, _)) = (pair[0], pair[1]);
                    assert!(b > a && a + a_len >= b + (tile - stride), "{at}");
                }
            }
        }
    }

    #[test]
    fn the_overlap_ramps_linearly_from_the_previous_tile() {
        let previous = Tensor::ones((1, 1, 1, 1, 4), DType::F32, &Device::Cpu).unwrap();
        let next = Tensor::zeros((1, 1, 1, 1, 6), DType::F32, &Device::Cpu).unwrap();
        blend_into(&previous, &next, 4, 4).unwrap();
        let values = next.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
    }
}
