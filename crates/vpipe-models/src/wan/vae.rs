//! The Wan video VAEs: causal 3D convolutional autoencoders with 4× temporal compression.
//!
//! - **Wan 2.1** (also Wan 2.2's A14B models): 8× spatial compression, 16 latent channels.
//! - **Wan 2.2** (the TI2V-5B model's VAE): the video is first folded into 2×2 patches (12
//!   channels at half the resolution), each encoder stage adds its input averaged down to its
//!   output's shape (`AvgDown3D`) and each decoder stage its input repeated up (`DupUp3D`), the
//!   decoder has a base width of its own, and the decoder's output is unfolded back: 16× spatial
//!   compression, 48 latent channels.
//!
//! Written from the architecture (original `Wan2.1:wan/modules/vae.py` `WanVAE_` and
//! `Wan2.2:wan/modules/vae2_2.py` `WanVAE_`, diffusers `AutoencoderKLWan`); numerically checked
//! against diffusers 0.42.1 in `tests/vae_parity.rs` and `tests/vae22_parity.rs`. Weights are
//! requested by their original Wan names; see [`super::keys`] for the diffusers layout.
//!
//! Time is processed in chunks, as in the reference: the encoder takes frame 0 alone and then
//! 4 frames at a time, the decoder one latent frame at a time. Every causal convolution keeps
//! the last [`CACHE_T`] input frames of the previous chunk (the feature cache), so peak memory
//! does not grow with the number of frames.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::keys;
use crate::error::{Error, Result};
use crate::ops::conv3d::{CausalConv3d, Conv3dConfig};
use crate::ops::layout;
use crate::tiling::{self, TileSpec};

/// Frames of history each causal convolution keeps between chunks (`CACHE_T` upstream).
pub const CACHE_T: usize = 2;

/// Spatial compression factor of the Wan 2.1 VAE (`scale_factor_spatial`); a configuration's
/// own is [`Config::spatial_factor`] (16 for Wan 2.2).
pub const SPATIAL_FACTOR: usize = 8;

/// Temporal compression factor (`scale_factor_temporal`): `T_lat = 1 + (T - 1) / 4`.
pub const TEMPORAL_FACTOR: usize = 4;

/// Most stages a configuration may have (Wan's VAEs have 4).
const MAX_STAGES: usize = 8;

/// Largest patch side a configuration may fold the video into (Wan 2.2's is 2).
const MAX_PATCH: usize = 8;

/// Query rows per block in the middle attention (bounds the score matrix to
/// `ATTN_QUERY_CHUNK × H·W` per frame).
const ATTN_QUERY_CHUNK: usize = 1024;

/// Wan 2.1 latent channel means (`latents_mean` in diffusers' config; the original applies
/// them inside `WanVAE_` as `scale[0]`).
pub const WAN21_LATENTS_MEAN: [f64; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];

/// Wan 2.1 latent channel standard deviations (`latents_std`).
pub const WAN21_LATENTS_STD: [f64; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

/// Wan 2.2 (TI2V-5B) latent channel means (`latents_mean` in diffusers' config, `mean` of the
/// original `Wan2_2_VAE`).
pub const WAN22_LATENTS_MEAN: [f64; 48] = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
    0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
    -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
    -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
    0.3573, -0.0548, -0.1681, -0.0667,
];

/// Wan 2.2 (TI2V-5B) latent channel standard deviations (`latents_std`).
pub const WAN22_LATENTS_STD: [f64; 48] = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
];

/// VAE hyper-parameters. Field names follow diffusers' `AutoencoderKLWan` config, so its
/// `vae/config.json` deserializes into this (unknown fields are ignored, missing ones take the
/// Wan 2.1 values).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Config {
    /// Channels of the first encoder stage (96), and of the last decoder stage unless
    /// `decoder_base_dim` says otherwise.
    pub base_dim: usize,
    /// Channels of the last decoder stage when they differ from `base_dim` (Wan 2.2: 256).
    pub decoder_base_dim: Option<usize>,
    /// Latent channels (16). The encoder head outputs `2·z_dim` (mean and log-variance).
    pub z_dim: usize,
    /// Channel multiplier per stage ([1, 2, 4, 4]).
    pub dim_mult: Vec<usize>,
    /// Residual blocks per encoder stage (2); the decoder has one more per stage.
    pub num_res_blocks: usize,
    /// Whether each encoder downsample also halves time ([false, true, true]); the decoder uses
    /// it reversed. One entry per stage but the last. (Upstream spelling.)
    pub temperal_downsample: Vec<bool>,
    /// Scales with attention inside the stages. Wan 2.1 has none (only the middle blocks
    /// attend); anything else is rejected.
    pub attn_scales: Vec<f64>,
    /// Channels into the encoder: the video's (3), times `patch_size²` when it is folded into
    /// patches (Wan 2.2: 12).
    pub in_channels: usize,
    /// Channels out of the decoder, before patches are unfolded (3; Wan 2.2: 12).
    pub out_channels: usize,
    /// Wan 2.2's residual stages: each encoder stage adds its input averaged down to its
    /// output's shape, each decoder stage its input repeated up to it, and a decoder upsample
    /// keeps its width instead of halving it.
    pub is_residual: bool,
    /// Side of the square patches the video is folded into before the encoder and unfolded from
    /// after the decoder (Wan 2.2: 2; none, i.e. 1, for Wan 2.1).
    pub patch_size: Option<usize>,
    /// Per-channel latent mean, for the pipeline's `(z - mean) / std`. Length `z_dim`.
    pub latents_mean: Vec<f64>,
    /// Per-channel latent standard deviation. Length `z_dim`.
    pub latents_std: Vec<f64>,
}

impl Default for Config {
    fn default() -> Self {
        Self::wan21()
    }
}

impl Config {
    /// Wan 2.1 (and Wan 2.2 A14B, which reuses it).
    // diffusers: AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    //            attn_scales=[], temperal_downsample=[False, True, True])
    // Wan2.1:    _video_vae(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    //            attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    pub fn wan21() -> Self {
        Self {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            temperal_downsample: vec![false, true, true],
            attn_scales: vec![],
            in_channels: 3,
            out_channels: 3,
            is_residual: false,
            patch_size: None,
            latents_mean: WAN21_LATENTS_MEAN.to_vec(),
            latents_std: WAN21_LATENTS_STD.to_vec(),
        }
    }

    /// Wan 2.2's VAE (TI2V-5B; `Wan2.2_VAE.pth`, ComfyUI `wan2.2_vae.safetensors`).
    // diffusers: AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48,
    //            dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
    //            is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    //            scale_factor_spatial=16, scale_factor_temporal=4)
    // Wan2.2:    WanVAE_(dim=160, dec_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4],
    //            num_res_blocks=2, temperal_downsample=[False, True, True])
    pub fn wan22() -> Self {
        Self {
            base_dim: 160,
            decoder_base_dim: Some(256),
            z_dim: 48,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            temperal_downsample: vec![false, true, true],
            attn_scales: vec![],
            in_channels: 12,
            out_channels: 12,
            is_residual: true,
            patch_size: Some(2),
            latents_mean: WAN22_LATENTS_MEAN.to_vec(),
            latents_std: WAN22_LATENTS_STD.to_vec(),
        }
    }

    /// The patch side (1 when the video is not folded into patches; a `patch_size` of 0, which
    /// [`Self::validate`] refuses, counts as 1 here).
    pub fn patch(&self) -> usize {
        self.patch_size.unwrap_or(1).max(1)
    }

    /// Pixels per latent cell along each spatial axis: 2 per downsampling stage, times the patch
    /// side (8 for Wan 2.1, 16 for Wan 2.2).
    pub fn spatial_factor(&self) -> usize {
        let downsamples = self.dim_mult.len().saturating_sub(1) as u32;
        2usize
            .saturating_pow(downsamples)
            .saturating_mul(self.patch())
    }

    /// Channels of the video the VAE encodes (`in_channels` over the patch area).
    pub fn video_in_channels(&self) -> usize {
        self.in_channels / (self.patch() * self.patch())
    }

    /// Channels of the video the VAE decodes to (`out_channels` over the patch area).
    pub fn video_out_channels(&self) -> usize {
        self.out_channels / (self.patch() * self.patch())
    }

    /// The decoder's base width: `decoder_base_dim`, else `base_dim`.
    fn decoder_base(&self) -> usize {
        self.decoder_base_dim.unwrap_or(self.base_dim)
    }

    /// Checks that the fields describe a Wan 2.1- or 2.2-style VAE this implementation can
    /// build.
    pub fn validate(&self) -> Result<()> {
        let fail = |reason: String| Err(Error::Config { reason });
        if self.base_dim == 0 || self.z_dim == 0 || self.in_channels == 0 || self.out_channels == 0
        {
            return fail(format!(
                "base_dim {}, z_dim {}, in_channels {} and out_channels {} must be positive",
                self.base_dim, self.z_dim, self.in_channels, self.out_channels
            ));
        }
        if self.decoder_base_dim == Some(0) {
            return fail("decoder_base_dim must be positive".into());
        }
        // The bound keeps the spatial factor (2 per stage) far from overflowing.
        if !(2..=MAX_STAGES).contains(&self.dim_mult.len()) || self.dim_mult.contains(&0) {
            return fail(format!(
                "dim_mult {:?} needs two to {MAX_STAGES} positive entries",
                self.dim_mult
            ));
        }
        for base in [self.base_dim, self.decoder_base()] {
            if let Some(m) = self
                .dim_mult
                .iter()
                .find(|&&m| m.checked_mul(base).is_none())
            {
                return fail(format!(
                    "a stage width of dim_mult {m} × base width {base} overflows"
                ));
            }
        }
        if self.temperal_downsample.len() != self.dim_mult.len() - 1 {
            return fail(format!(
                "temperal_downsample {:?} needs one entry per stage but the last ({})",
                self.temperal_downsample,
                self.dim_mult.len() - 1
            ));
        }
        if !self.attn_scales.is_empty() {
            return fail(format!(
                "attn_scales {:?}: attention inside the stages is not implemented (Wan 2.1 and \
                 2.2 have none)",
                self.attn_scales
            ));
        }
        if let Some(p) = self.patch_size {
            if !(1..=MAX_PATCH).contains(&p) {
                return fail(format!("patch_size {p} must be 1 to {MAX_PATCH}"));
            }
        }
        let area = self.patch() * self.patch();
        if !self.in_channels.is_multiple_of(area) || !self.out_channels.is_multiple_of(area) {
            return fail(format!(
                "in_channels {} and out_channels {} must be multiples of patch_size² ({area})",
                self.in_channels, self.out_channels
            ));
        }
        let (enc_dims, dec_dims) = (self.encoder_dims(), self.decoder_dims());
        if self.is_residual {
            // The shortcuts regroup channels: AvgDown3D averages groups of
            // `c_in · factor / c_out` values, DupUp3D repeats each channel
            // `c_out · factor / c_in` times.
            let stages = self.dim_mult.len();
            for i in 0..stages {
                let down = self.encoder_shortcut(i);
                let (c_in, c_out) = (enc_dims[i], enc_dims[i + 1]);
                if !c_in
                    .checked_mul(down.factor())
                    .is_some_and(|n| n.is_multiple_of(c_out))
                {
                    return fail(format!(
                        "encoder stage {i}: {c_in} channels × {} cells do not average into \
                         {c_out} channels",
                        down.factor()
                    ));
                }
                if let Some(up) = self.decoder_shortcut(i) {
                    let (c_in, c_out) = (dec_dims[i], dec_dims[i + 1]);
                    if !c_out
                        .checked_mul(up.factor())
                        .is_some_and(|n| n.is_multiple_of(c_in))
                    {
                        return fail(format!(
                            "decoder stage {i}: {c_in} channels do not repeat into {c_out} \
                             channels × {} cells",
                            up.factor()
                        ));
                    }
                }
            }
        } else if dec_dims[1..].iter().any(|&d| d < 2 || d % 2 != 0) {
            return fail(format!(
                "decoder stage widths {dec_dims:?} must be even: each upsample halves them"
            ));
        }
        for (name, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if v.len() != self.z_dim {
                return fail(format!(
                    "{name} has {} entries, z_dim is {}",
                    v.len(),
                    self.z_dim
                ));
            }
        }
        if self.latents_std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return fail(format!(
                "latents_std {:?} must be positive and finite",
                self.latents_std
            ));
        }
        Ok(())
    }

    /// Stage widths of the encoder: `base_dim · [1, dim_mult...]`.
    fn encoder_dims(&self) -> Vec<usize> {
        std::iter::once(1)
            .chain(self.dim_mult.iter().copied())
            .map(|m| m * self.base_dim)
            .collect()
    }

    /// Stage widths of the decoder: `decoder base · [dim_mult.last, dim_mult reversed...]`.
    fn decoder_dims(&self) -> Vec<usize> {
        let last = *self.dim_mult.last().unwrap_or(&1);
        std::iter::once(last)
            .chain(self.dim_mult.iter().rev().copied())
            .map(|m| m * self.decoder_base())
            .collect()
    }

    /// Whether encoder stage `i` halves time (the last stage does not downsample).
    fn halves_time(&self, i: usize) -> bool {
        self.temperal_downsample.get(i).copied().unwrap_or(false)
    }

    /// The cells encoder stage `i` averages in its residual shortcut: 2×2 spatially in every
    /// stage that downsamples, and 2 frames where it also halves time.
    fn encoder_shortcut(&self, i: usize) -> Cells {
        let last = i + 1 == self.dim_mult.len();
        Cells {
            time: if !last && self.halves_time(i) { 2 } else { 1 },
            space: if last { 1 } else { 2 },
        }
    }

    /// The cells decoder stage `i` repeats its input into, when it upsamples (all but the last
    /// stage): 2×2 spatially, and 2 frames where it also doubles time.
    fn decoder_shortcut(&self, i: usize) -> Option<Cells> {
        let stages = self.dim_mult.len();
        (i + 1 < stages).then(|| Cells {
            // temperal_upsample = temperal_downsample reversed.
            time: if self.halves_time(stages - 2 - i) {
                2
            } else {
                1
            },
            space: 2,
        })
    }

    /// Reads the configuration from the tensor shapes of a checkpoint, as ComfyUI does.
    ///
    /// `vb` answers to original Wan names (see [`keys::canonical_var_builder`]); only small
    /// tensors are read (the first and last convolutions, `conv2`, and norm gains).
    /// `latents_mean`/`latents_std` are Wan 2.1's when `z_dim` is 16, otherwise zeros and ones
    /// (no normalisation).
    pub fn from_var_builder(vb: &VarBuilder) -> Result<Self> {
        // Dimension `i` of a tensor's shape; a shape without it is a checkpoint that is not a
        // Wan VAE, not a panic.
        let dim = |name: &str, i: usize| -> Result<usize> {
            let shape = vb.get_unchecked(name)?.dims().to_vec();
            shape.get(i).copied().ok_or_else(|| Error::Config {
                reason: format!(
                    "{name} has shape {shape:?}, expected at least {} dimensions",
                    i + 1
                ),
            })
        };
        let (base_dim, in_channels) = (
            dim("encoder.conv1.weight", 0)?,
            dim("encoder.conv1.weight", 1)?,
        );
        if base_dim == 0 {
            return Err(Error::Config {
                reason: "encoder.conv1.weight has no output channels (base_dim 0)".into(),
            });
        }
        let z_dim = dim("conv2.weight", 0)?;
        let out_channels = dim("decoder.head.2.weight", 0)?;
        let decoder_width = dim("decoder.head.2.weight", 1)?;
        let is_residual =
            vb.contains_tensor("encoder.downsamples.0.downsamples.0.residual.0.gamma");
        let (stages, temperal_downsample) = if is_residual {
            residual_encoder_stages(vb, &dim)?
        } else {
            flat_encoder_stages(vb, base_dim, &dim)?
        };
        let num_res_blocks = stages[0].0;
        if num_res_blocks == 0 || stages.iter().any(|s| s.0 != num_res_blocks) {
            return Err(Error::Config {
                reason: format!(
                    "encoder stages have {:?} residual blocks; expected the same positive count in each",
                    stages.iter().map(|s| s.0).collect::<Vec<_>>()
                ),
            });
        }
        let dim_mult = stages
            .iter()
            .map(|&(_, w)| {
                if w % base_dim == 0 {
                    Ok(w / base_dim)
                } else {
                    Err(Error::Config {
                        reason: format!("stage width {w} is not a multiple of base_dim {base_dim}"),
                    })
                }
            })
            .collect::<Result<Vec<_>>>()?;
        // The decoder's last stage is `decoder base · dim_mult[0]` wide.
        if !decoder_width.is_multiple_of(dim_mult[0]) {
            return Err(Error::Config {
                reason: format!(
                    "decoder.head.2.weight takes {decoder_width} channels, not a multiple of \
                     dim_mult[0] {}",
                    dim_mult[0]
                ),
            });
        }
        let decoder_base = decoder_width / dim_mult[0];
        // Wan 2.2 folds RGB frames into square patches (12 channels for 2×2).
        let patch_size = if is_residual {
            let p = (1..=MAX_PATCH)
                .find(|p| 3 * p * p == in_channels)
                .ok_or_else(|| Error::Config {
                    reason: format!(
                        "a residual (Wan 2.2) VAE takes RGB frames folded into p×p patches, \
                         3·p² channels; encoder.conv1.weight takes {in_channels}"
                    ),
                })?;
            Some(p)
        } else {
            None
        };
        let (latents_mean, latents_std) = match (is_residual, z_dim) {
            (false, 16) => (WAN21_LATENTS_MEAN.to_vec(), WAN21_LATENTS_STD.to_vec()),
            (true, 48) => (WAN22_LATENTS_MEAN.to_vec(), WAN22_LATENTS_STD.to_vec()),
            _ => (vec![0.0; z_dim], vec![1.0; z_dim]),
        };
        let cfg = Self {
            base_dim,
            decoder_base_dim: (decoder_base != base_dim).then_some(decoder_base),
            z_dim,
            dim_mult,
            num_res_blocks,
            temperal_downsample,
            attn_scales: vec![],
            in_channels,
            out_channels,
            is_residual,
            patch_size,
            latents_mean,
            latents_std,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Residual blocks and output width of each encoder stage, and whether each downsample halves
/// time, read from the tensors a checkpoint has.
type EncoderStages = (Vec<(usize, usize)>, Vec<bool>);

/// Wan 2.1's encoder, one flat list (`encoder.downsamples.{n}`): residual blocks, with a
/// resample ending each stage but the last.
fn flat_encoder_stages(
    vb: &VarBuilder,
    base_dim: usize,
    dim: &dyn Fn(&str, usize) -> Result<usize>,
) -> Result<EncoderStages> {
    let mut stages = vec![];
    let mut temperal_downsample = vec![];
    let (mut res_in_stage, mut width) = (0, base_dim);
    for n in 0.. {
        let p = format!("encoder.downsamples.{n}");
        if vb.contains_tensor(&format!("{p}.residual.0.gamma")) {
            res_in_stage += 1;
            width = dim(&format!("{p}.residual.3.gamma"), 0)?;
        } else if vb.contains_tensor(&format!("{p}.resample.1.weight")) {
            stages.push((res_in_stage, width));
            temperal_downsample.push(vb.contains_tensor(&format!("{p}.time_conv.weight")));
            res_in_stage = 0;
        } else {
            break;
        }
    }
    stages.push((res_in_stage, width));
    Ok((stages, temperal_downsample))
}

/// Wan 2.2's encoder, one module per stage (`encoder.downsamples.{i}.downsamples.{j}`): its
/// residual blocks, then a resample in every stage but the last.
fn residual_encoder_stages(
    vb: &VarBuilder,
    dim: &dyn Fn(&str, usize) -> Result<usize>,
) -> Result<EncoderStages> {
    let mut stages = vec![];
    let mut downsamples = vec![]; // per stage: None, or Some(halves time)
    for i in 0..=MAX_STAGES {
        let p = format!("encoder.downsamples.{i}.downsamples");
        let (mut blocks, mut width) = (0, 0);
        while vb.contains_tensor(&format!("{p}.{blocks}.residual.0.gamma")) {
            width = dim(&format!("{p}.{blocks}.residual.3.gamma"), 0)?;
            blocks += 1;
        }
        if blocks == 0 {
            break;
        }
        stages.push((blocks, width));
        downsamples.push(
            vb.contains_tensor(&format!("{p}.{blocks}.resample.1.weight"))
                .then(|| vb.contains_tensor(&format!("{p}.{blocks}.time_conv.weight"))),
        );
    }
    let last = downsamples.len().saturating_sub(1);
    if downsamples[..last].iter().any(Option::is_none) || downsamples[last].is_some() {
        return Err(Error::Config {
            reason: format!(
                "encoder stages downsample as {:?}; expected every stage but the last to",
                downsamples.iter().map(Option::is_some).collect::<Vec<_>>()
            ),
        });
    }
    Ok((stages, downsamples.into_iter().flatten().collect()))
}

// ---- Feature cache -----------------------------------------------------------------------------

/// One causal layer's memory of the previous chunk.
#[derive(Debug, Clone)]
enum Slot {
    /// Nothing seen yet (first chunk).
    Empty,
    /// Upsample3d after the first chunk, which skipped its `time_conv` ("Rep" upstream): the next
    /// chunk's `time_conv` starts from zero padding.
    Rep,
    /// The last input frames of the previous chunk, [B, C, ≤CACHE_T, H, W].
    Frames(Tensor),
}

/// Hands out the cache slots in layer order; one cursor per chunk, over slots that persist
/// across chunks (`feat_cache` / `feat_idx` upstream).
struct Cursor<'a> {
    slots: &'a mut Vec<Slot>,
    idx: usize,
}

impl<'a> Cursor<'a> {
    fn new(slots: &'a mut Vec<Slot>) -> Self {
        Self { slots, idx: 0 }
    }

    fn next_slot(&mut self) -> &mut Slot {
        if self.idx == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.idx += 1;
        &mut self.slots[self.idx - 1]
    }
}

/// The last `min(T, CACHE_T)` frames of `x`; when that is fewer than `CACHE_T`, the previous
/// cache's last frame goes in front.
fn next_cache(x: &Tensor, prev: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let t = x.dim(2)?;
    let keep = t.min(CACHE_T);
    // A copy, so that the chunk's activation can be freed.
    let tail = layout::copy_frames(x, t - keep, keep)?;
    match prev {
        Some(p) if keep < CACHE_T => {
            let last = p.narrow(2, p.dim(2)? - 1, 1)?;
            layout::cat_time(&[&last, &tail])
        }
        _ => Ok(tail),
    }
}

/// A causal convolution that reads and updates its cache slot.
fn conv_cached(conv: &CausalConv3d, x: &Tensor, slot: &mut Slot) -> candle_core::Result<Tensor> {
    let prev = match slot {
        Slot::Frames(p) => Some(&*p),
        _ => None,
    };
    let cache = next_cache(x, prev)?;
    let y = conv.forward(x, prev)?;
    *slot = Slot::Frames(cache);
    Ok(y)
}

/// `conv(silu(norm(x))) + residual` through the convolution's cache slot. The norm writes its
/// output after the convolution's front frames (cache or zeros) in one new tensor, which the
/// convolution takes as it is (on CUDA, where the norm is one kernel, this saves a copy of the
/// whole normed chunk). The slot then holds the last `CACHE_T` frames of that tensor, zeros
/// included where the clip was shorter, which the next chunk's convolution reads the same way
/// as the reference's shorter cache behind zero padding.
fn norm_silu_conv_cached(
    norm: &RmsNorm,
    conv: &CausalConv3d,
    x: &Tensor,
    slot: &mut Slot,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let prev = match &*slot {
        Slot::Frames(prev) => Some(prev),
        _ => None,
    };
    let front = conv.front_frames(x, prev)?;
    let padded = norm.normalize(x, true, front.as_ref())?;
    let t = padded.dim(2)?;
    let keep = t.min(CACHE_T);
    *slot = Slot::Frames(layout::copy_frames(&padded, t - keep, keep)?);
    conv.forward_padded(&padded, residual)
}

// ---- Layers ------------------------------------------------------------------------------------

/// Loads a [`CausalConv3d`] with a bias.
fn causal_conv3d(
    c_in: usize,
    c_out: usize,
    kernel: (usize, usize, usize),
    cfg: Conv3dConfig,
    vb: VarBuilder,
) -> candle_core::Result<CausalConv3d> {
    let weight = vb.get((c_out, c_in, kernel.0, kernel.1, kernel.2), "weight")?;
    let bias = vb.get(c_out, "bias")?;
    CausalConv3d::new(weight, Some(bias), cfg)
}

/// A 2D convolution with bias (`nn.Conv2d`, `k`×`k`) applied to every frame of a clip: a
/// causal convolution with one temporal tap.
fn frame_conv(
    c_in: usize,
    c_out: usize,
    k: usize,
    padding: usize,
    stride: usize,
    vb: VarBuilder,
) -> candle_core::Result<CausalConv3d> {
    let weight = vb.get((c_out, c_in, k, k), "weight")?.unsqueeze(2)?;
    let bias = vb.get(c_out, "bias")?;
    let cfg = Conv3dConfig {
        stride: (1, stride, stride),
        padding: (0, padding, padding),
    };
    CausalConv3d::new(weight, Some(bias), cfg)
}

/// A 1×1 `nn.Conv2d` applied to tokens: a linear map over their channels.
#[derive(Debug, Clone)]
struct Pointwise {
    /// shape [C_out, C_in]
    weight: Tensor,
    /// shape [C_out]
    bias: Tensor,
}

impl Pointwise {
    fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb
                .get((c_out, c_in, 1, 1), "weight")?
                .reshape((c_out, c_in))?,
            bias: vb.get(c_out, "bias")?,
        })
    }

    /// # Shapes
    /// [N, L, C_in] → [N, L, C_out]
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, l, c) = x.dims3()?;
        // candle's CPU backend has no bf16 matmul.
        let dtype = if x.device().is_cpu() && x.dtype() == DType::BF16 {
            DType::F32
        } else {
            x.dtype()
        };
        let y = x
            .to_dtype(dtype)?
            .reshape((n * l, c))?
            .matmul(&self.weight.to_dtype(dtype)?.t()?)?
            .broadcast_add(&self.bias.to_dtype(dtype)?)?;
        y.reshape((n, l, ()))?.to_dtype(x.dtype())
    }
}

/// `RMS_norm` / `WanRMS_norm`: `x / max(‖x‖₂, 1e-12) · √C · γ` over the channel dimension
/// (dimension 1), no bias. Half-precision inputs are normalised in f32, as diffusers does.
#[derive(Debug, Clone)]
struct RmsNorm {
    /// shape [C]
    gamma: Tensor,
}

/// Added under the root of the mean square: the reference divides by `max(‖x‖, 1e-12)`, so an
/// all-zero channel vector must give zeros, not NaN.
const RMS_EPS: f64 = 1e-24;

impl RmsNorm {
    /// `images`: gamma is stored as [C, 1, 1] (attention) instead of [C, 1, 1, 1].
    fn new(dim: usize, images: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let gamma = if images {
            vb.get((dim, 1, 1), "gamma")?
        } else {
            vb.get((dim, 1, 1, 1), "gamma")?
        };
        Ok(Self {
            gamma: gamma.flatten_all()?,
        })
    }

    /// `F.normalize(x, dim=1) · √C · γ`, which is `x / √mean(x²) · γ` over the channels, then
    /// SiLU if asked; given `front` frames, the result comes after them in one tensor.
    ///
    /// # Shapes
    /// - `x`: [B, C, T, H, W]; `front`: [B, C, F, H, W]; returns [B, C, F + T, H, W].
    fn normalize(
        &self,
        x: &Tensor,
        silu: bool,
        front: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        // On CUDA one kernel over the channels-last rows, written after the front frames.
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return crate::ops::fused::rms_norm_channels_last(
                x,
                &self.gamma,
                RMS_EPS as f32,
                silu,
                front,
            );
        }
        // Elsewhere candle's fused RMS norm over the last dimension, on a channels-last copy;
        // the result is a view that the SiLU reads through, writing contiguous memory.
        let y = layout::logical(&self.over_last_dim(&layout::physical(x)?.contiguous()?)?)?;
        let y = if silu { y.silu()? } else { y };
        match front {
            Some(front) => layout::cat_time(&[front, &y]),
            None => Ok(y),
        }
    }

    /// The norm over the last dimension of tokens.
    ///
    /// # Shapes
    /// […, C] → […, C]
    fn over_last_dim(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let gamma = self.gamma.to_dtype(tokens.dtype())?;
        candle_nn::ops::rms_norm(&tokens.contiguous()?, &gamma, RMS_EPS as f32)
    }
}

/// `ResidualBlock`: RMS norm, SiLU, causal 3×3×3 conv, twice, plus a 1×1×1 shortcut when the
/// width changes.
#[derive(Debug, Clone)]
struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let r = vb.pp("residual");
        let k3 = (3, 3, 3);
        Ok(Self {
            norm1: RmsNorm::new(c_in, false, r.pp(0))?,
            conv1: causal_conv3d(c_in, c_out, k3, Conv3dConfig::padded(1), r.pp(2))?,
            norm2: RmsNorm::new(c_out, false, r.pp(3))?,
            conv2: causal_conv3d(c_out, c_out, k3, Conv3dConfig::padded(1), r.pp(6))?,
            shortcut: if c_in != c_out {
                Some(causal_conv3d(
                    c_in,
                    c_out,
                    (1, 1, 1),
                    Conv3dConfig::default(),
                    vb.pp("shortcut"),
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cursor) -> candle_core::Result<Tensor> {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None)?,
            None => x.clone(),
        };
        let y = norm_silu_conv_cached(&self.norm1, &self.conv1, x, cache.next_slot(), None)?;
        norm_silu_conv_cached(&self.norm2, &self.conv2, &y, cache.next_slot(), Some(&h))
    }
}

/// `AttentionBlock`: single-head self-attention over the H·W positions of each frame, with a
/// 1×1 conv for q, k, v and one for the output. Computed on tokens ([B·T, H·W, C]), which on
/// channels-last memory are the clip itself.
#[derive(Debug, Clone)]
struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Pointwise,
    proj: Pointwise,
}

impl AttentionBlock {
    fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm: RmsNorm::new(dim, true, vb.pp("norm"))?,
            to_qkv: Pointwise::new(dim, 3 * dim, vb.pp("to_qkv"))?,
            proj: Pointwise::new(dim, dim, vb.pp("proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        let tokens = layout::physical(x)?
            .contiguous()?
            .reshape((b * t, h * w, c))?;
        let normed = self.norm.over_last_dim(&tokens)?;
        // [BT, HW, 3C]; channels [0, C) are q, [C, 2C) k, [2C, 3C) v.
        let qkv = self.to_qkv.forward(&normed)?.to_dtype(DType::F32)?;
        let q = qkv.narrow(2, 0, c)?;
        let k_t = qkv.narrow(2, c, c)?.transpose(1, 2)?.contiguous()?;
        let v = qkv.narrow(2, 2 * c, c)?.contiguous()?;
        let scale = 1.0 / (c as f64).sqrt();
        let n = h * w;
        let mut outs = Vec::with_capacity(n.div_ceil(ATTN_QUERY_CHUNK));
        for start in (0..n).step_by(ATTN_QUERY_CHUNK) {
            let len = ATTN_QUERY_CHUNK.min(n - start);
            let q = q.narrow(1, start, len)?.contiguous()?;
            let scores = (q.matmul(&k_t)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            outs.push(probs.matmul(&v)?);
        }
        let attn = Tensor::cat(&outs, 1)?.to_dtype(x.dtype())?; // [BT, HW, C]
        let y = (self.proj.forward(&attn)? + tokens)?;
        layout::logical(&y.reshape((b, t, h, w, c))?)
    }
}

/// The middle block: residual, attention, residual.
#[derive(Debug, Clone)]
struct Middle {
    res0: ResidualBlock,
    attn: AttentionBlock,
    res1: ResidualBlock,
}

impl Middle {
    fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            res0: ResidualBlock::new(dim, dim, vb.pp(0))?,
            attn: AttentionBlock::new(dim, vb.pp(1))?,
            res1: ResidualBlock::new(dim, dim, vb.pp(2))?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cursor) -> candle_core::Result<Tensor> {
        let x = self.res0.forward(x, cache)?;
        let x = self.attn.forward(&x)?;
        self.res1.forward(&x, cache)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResampleMode {
    /// Nearest ×2, then a 3×3 conv halving the width.
    Up2d,
    /// `Up2d` preceded by a `time_conv` that doubles the frames (after the first chunk).
    Up3d,
    /// Zero-pad right and bottom by one, then a 3×3 stride-2 conv.
    Down2d,
    /// `Down2d` followed by a stride-2 `time_conv` (after the first chunk).
    Down3d,
}

/// `Resample` (`resample.1` is the 2D conv; index 0 is the parameterless pad or upsample).
#[derive(Debug, Clone)]
struct Resample {
    mode: ResampleMode,
    /// The 3×3 `nn.Conv2d`, applied to every frame.
    conv: CausalConv3d,
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    /// `up_out` is the width an upsample's conv leaves: half of `dim` in Wan 2.1, all of it in
    /// Wan 2.2 (diffusers' `upsample_out_dim`); downsamples keep `dim`.
    fn new(
        dim: usize,
        mode: ResampleMode,
        up_out: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let conv = match mode {
            ResampleMode::Up2d | ResampleMode::Up3d => {
                frame_conv(dim, up_out, 3, 1, 1, vb.pp("resample.1"))?
            }
            ResampleMode::Down2d | ResampleMode::Down3d => {
                frame_conv(dim, dim, 3, 0, 2, vb.pp("resample.1"))?
            }
        };
        let time_conv = match mode {
            ResampleMode::Up3d => Some(causal_conv3d(
                dim,
                2 * dim,
                (3, 1, 1),
                Conv3dConfig {
                    stride: (1, 1, 1),
                    padding: (1, 0, 0),
                },
                vb.pp("time_conv"),
            )?),
            ResampleMode::Down3d => Some(causal_conv3d(
                dim,
                dim,
                (3, 1, 1),
                Conv3dConfig {
                    stride: (2, 1, 1),
                    padding: (0, 0, 0),
                },
                vb.pp("time_conv"),
            )?),
            _ => None,
        };
        Ok(Self {
            mode,
            conv,
            time_conv,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cursor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        // On CUDA, the time upsampling's [B, C, T, 2, H, W] interleave stays a view that the
        // spatial upsampling reads in place.
        let mut interleaved: Option<Tensor> = None;
        if let (ResampleMode::Up3d, Some(time_conv)) = (self.mode, &self.time_conv) {
            let slot = cache.next_slot();
            if let Slot::Empty = slot {
                // First chunk: one frame stays one frame.
                *slot = Slot::Rep;
            } else {
                let (b, c, t, h, w) = x.dims5()?;
                let (y, next) = match &*slot {
                    Slot::Frames(prev) => (
                        time_conv.forward(&x, Some(prev))?,
                        next_cache(&x, Some(prev))?,
                    ),
                    _ => {
                        // After "Rep" the cache is zero-padded to CACHE_T frames.
                        let keep = t.min(CACHE_T);
                        let mut next = layout::copy_frames(&x, t - keep, keep)?;
                        if keep < CACHE_T {
                            let zeros = layout::zero_frames(&next, CACHE_T - keep)?;
                            next = layout::cat_time(&[&zeros, &next])?;
                        }
                        (time_conv.forward(&x, None)?, next)
                    }
                };
                *slot = Slot::Frames(next);
                // [B, 2C, T, H, W]: channel half 0 gives the even output frames, half 1 the odd.
                if layout::channels_last_device(&y) {
                    let packed = layout::physical(&layout::channels_last(&y)?)?;
                    let halves = packed.reshape((b, t, h, w, 2, c))?;
                    interleaved = Some(halves.permute((0, 5, 1, 4, 2, 3))?);
                } else {
                    x = y
                        .reshape((b, 2, c, t, h, w))?
                        .permute((0, 2, 3, 1, 4, 5))?
                        .reshape((b, c, 2 * t, h, w))?;
                }
            }
        }
        let x = match self.mode {
            ResampleMode::Up2d | ResampleMode::Up3d => {
                upsample2x(interleaved.as_ref().unwrap_or(&x))?
            }
            ResampleMode::Down2d | ResampleMode::Down3d => layout::pad_bottom_right(&x)?,
        };
        let mut x = self.conv.forward(&x, None)?;
        if let (ResampleMode::Down3d, Some(time_conv)) = (self.mode, &self.time_conv) {
            let slot = cache.next_slot();
            let last = layout::copy_frames(&x, x.dim(2)? - 1, 1)?;
            if let Slot::Frames(prev) = &*slot {
                let prev_last = prev.narrow(2, prev.dim(2)? - 1, 1)?;
                x = time_conv.forward(&layout::cat_time(&[&prev_last, &x])?, None)?;
            }
            *slot = Slot::Frames(last);
        }
        Ok(x)
    }
}

/// Nearest ×2 spatial upsampling of every frame (nearest-exact ×2 picks source index ⌊i/2⌋,
/// the same as nearest).
///
/// # Shapes
/// [B, C, T, H, W] → [B, C, T, 2H, 2W]; on CUDA also the interleave
/// [B, C, T, R, H, W] → [B, C, T·R, 2H, 2W].
fn upsample2x(x: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::ops::fused::upsample2x_channels_last(x);
    }
    let (b, c, t, h, w) = x.dims5()?;
    x.permute((0, 2, 1, 3, 4))?
        .reshape((b * t, c, h, w))?
        .upsample_nearest2d(2 * h, 2 * w)?
        .reshape((b, t, c, 2 * h, 2 * w))?
        .permute((0, 2, 1, 3, 4))
}

#[derive(Debug, Clone)]
enum Layer {
    Residual(Box<ResidualBlock>),
    Resample(Box<Resample>),
}

impl Layer {
    fn forward(&self, x: &Tensor, cache: &mut Cursor) -> candle_core::Result<Tensor> {
        match self {
            Self::Residual(r) => r.forward(x, cache),
            Self::Resample(r) => r.forward(x, cache),
        }
    }
}

/// The last layers of the encoder and the decoder: RMS norm, SiLU, causal 3×3×3 conv
/// (`head.0`, `head.2`).
#[derive(Debug, Clone)]
struct Head {
    norm: RmsNorm,
    conv: CausalConv3d,
}

impl Head {
    fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm: RmsNorm::new(c_in, false, vb.pp(0))?,
            conv: causal_conv3d(c_in, c_out, (3, 3, 3), Conv3dConfig::padded(1), vb.pp(2))?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cursor) -> candle_core::Result<Tensor> {
        norm_silu_conv_cached(&self.norm, &self.conv, x, cache.next_slot(), None)
    }
}

// ---- Wan 2.2's residual shortcuts ----------------------------------------------------------------

/// The block of cells a residual shortcut maps one latent-side position to: `time` frames by
/// `space`×`space` pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cells {
    time: usize,
    space: usize,
}

impl Cells {
    /// Values per block.
    fn factor(self) -> usize {
        self.time * self.space * self.space
    }
}

/// `AvgDown3D`: the shortcut of a Wan 2.2 encoder stage. Each input channel's cells (2 frames
/// where time is halved, 2×2 pixels where space is) become `factor` channels in a row, and
/// every `c_in · factor / c_out` consecutive ones of those are averaged into one output channel.
/// A clip whose frame count is not a multiple of the time factor gets zero frames in front
/// (the first chunk's single frame, averaged with zeros, as the reference does).
#[derive(Debug, Clone)]
struct AvgDown {
    c_out: usize,
    cells: Cells,
}

impl AvgDown {
    /// # Shapes
    /// [B, C_in, T, H, W] → [B, C_out, ⌈T/t⌉, H/s, W/s] (contiguous, whatever the input's
    /// layout)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        let Cells {
            time: ft,
            space: fs,
        } = self.cells;
        if self.cells.factor() == 1 && c == self.c_out {
            return Ok(x.clone());
        }
        if !h.is_multiple_of(fs) || !w.is_multiple_of(fs) {
            candle_core::bail!("AvgDown3D: a {h}x{w} frame does not split into {fs}x{fs} cells")
        }
        let pad = (ft - t % ft) % ft;
        let x = if pad > 0 {
            layout::cat_time(&[&layout::zero_frames(x, pad)?, x])?
        } else {
            x.clone()
        };
        let (t, h, w) = ((t + pad) / ft, h / fs, w / fs);
        let group = c * self.cells.factor() / self.c_out;
        // Averaged in f32: half-precision sums of a group would round at every addition.
        let dtype = x.dtype();
        x.reshape(vec![b, c, t, ft, h, fs, w, fs])?
            .permute(vec![0, 1, 3, 5, 7, 2, 4, 6])? // [B, C, ft, fs, fs, T, H, W]
            .reshape(vec![b, self.c_out, group, t, h, w])?
            .to_dtype(DType::F32)?
            .mean(2)?
            .to_dtype(dtype)
    }
}

/// `DupUp3D`: the shortcut of a Wan 2.2 decoder stage, the mirror of [`AvgDown`]: each input
/// channel is repeated `c_out · factor / c_in` times, and each run of `factor` channels becomes
/// one output channel's block of cells. On the first chunk, where the stage's upsample leaves a
/// single frame, the leading `time − 1` frames are dropped.
#[derive(Debug, Clone)]
struct DupUp {
    c_out: usize,
    cells: Cells,
}

impl DupUp {
    /// # Shapes
    /// [B, C_in, T, H, W] → [B, C_out, T·t (− (t − 1) on the first chunk), H·s, W·s]
    /// (contiguous, whatever the input's layout)
    fn forward(&self, x: &Tensor, first_chunk: bool) -> candle_core::Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        let Cells {
            time: ft,
            space: fs,
        } = self.cells;
        let repeats = self.c_out * self.cells.factor() / c;
        let y = x
            .unsqueeze(2)?
            .broadcast_as(vec![b, c, repeats, t, h, w])?
            .reshape(vec![b, self.c_out, ft, fs, fs, t, h, w])?
            .permute(vec![0, 1, 5, 2, 6, 3, 7, 4])? // [B, C_out, T, ft, H, fs, W, fs]
            .reshape((b, self.c_out, t * ft, h * fs, w * fs))?;
        if first_chunk && ft > 1 {
            y.narrow(2, ft - 1, t * ft - (ft - 1))
        } else {
            Ok(y)
        }
    }
}

/// `a + b` in the device's layout (channels-last on CUDA, whatever the inputs' layouts), for
/// adding a shortcut computed in another layout.
fn add_in_layout(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if layout::channels_last_device(a) {
        layout::logical(&(layout::physical(a)? + layout::physical(b)?)?)
    } else {
        a + b
    }
}

/// Folds each `p`×`p` patch of every frame into channels (`patchify` upstream): channel
/// `c·p² + j·p + i` holds pixel `(i, j)` of each patch of channel `c` (row offset `i`, column
/// offset `j`).
///
/// # Shapes
/// [B, C, T, H, W] → [B, C·p², T, H/p, W/p]
fn patchify(x: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (b, c, t, h, w) = x.dims5()?;
    x.reshape(vec![b, c, t, h / p, p, w / p, p])?
        .permute(vec![0, 1, 6, 4, 2, 3, 5])? // [B, C, j, i, T, H/p, W/p]
        .reshape((b, c * p * p, t, h / p, w / p))
}

/// The inverse of [`patchify`] (`unpatchify` upstream).
///
/// # Shapes
/// [B, C·p², T, H, W] → [B, C, T, H·p, W·p]
fn unpatchify(x: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (b, cp, t, h, w) = x.dims5()?;
    let c = cp / (p * p);
    x.reshape(vec![b, c, p, p, t, h, w])?
        .permute(vec![0, 1, 4, 5, 3, 6, 2])? // [B, C, T, H, i, W, j]
        .reshape((b, c, t, h * p, w * p))
}

// ---- Encoder and decoder -----------------------------------------------------------------------

/// One encoder stage: residual blocks, then a downsample in every stage but the last; in
/// Wan 2.2 the stage's input, averaged down, is added to its output.
#[derive(Debug, Clone)]
struct EncoderStage {
    layers: Vec<Layer>,
    shortcut: Option<AvgDown>,
}

impl EncoderStage {
    fn forward(&self, x: &Tensor, cache: &mut Cursor) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        for layer in &self.layers {
            y = layer.forward(&y, cache)?;
        }
        match &self.shortcut {
            Some(shortcut) => add_in_layout(&y, &shortcut.forward(x)?),
            None => Ok(y),
        }
    }
}

/// One decoder stage: residual blocks (one more than the encoder's), then an upsample in every
/// stage but the last; in Wan 2.2 the stage's input, repeated up, is added to its output.
#[derive(Debug, Clone)]
struct DecoderStage {
    layers: Vec<Layer>,
    shortcut: Option<DupUp>,
}

impl DecoderStage {
    fn forward(
        &self,
        x: &Tensor,
        cache: &mut Cursor,
        first_chunk: bool,
    ) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        for layer in &self.layers {
            y = layer.forward(&y, cache)?;
        }
        match &self.shortcut {
            Some(shortcut) => add_in_layout(&y, &shortcut.forward(x, first_chunk)?),
            None => Ok(y),
        }
    }
}

/// `Encoder3d`.
#[derive(Debug, Clone)]
struct Encoder {
    conv1: CausalConv3d,
    stages: Vec<EncoderStage>,
    middle: Middle,
    head: Head,
}

impl Encoder {
    /// Wan 2.1 numbers its layers in one list over all stages (`downsamples.{n}`), Wan 2.2
    /// per stage (`downsamples.{i}.downsamples.{j}`).
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let dims = cfg.encoder_dims();
        let k3 = (3, 3, 3);
        let conv1 = causal_conv3d(
            cfg.in_channels,
            dims[0],
            k3,
            Conv3dConfig::padded(1),
            vb.pp("conv1"),
        )?;
        let vd = vb.pp("downsamples");
        let n_stages = cfg.dim_mult.len();
        let mut stages = Vec::with_capacity(n_stages);
        let mut flat_index = 0;
        for i in 0..n_stages {
            let (mut c_in, c_out) = (dims[i], dims[i + 1]);
            let mut layers = vec![];
            let mut layer_vb = |j: usize| {
                if cfg.is_residual {
                    vd.pp(i).pp("downsamples").pp(j)
                } else {
                    flat_index += 1;
                    vd.pp(flat_index - 1)
                }
            };
            for j in 0..cfg.num_res_blocks {
                let block = ResidualBlock::new(c_in, c_out, layer_vb(j))?;
                layers.push(Layer::Residual(Box::new(block)));
                c_in = c_out;
            }
            if i != n_stages - 1 {
                let mode = if cfg.halves_time(i) {
                    ResampleMode::Down3d
                } else {
                    ResampleMode::Down2d
                };
                let r = Resample::new(c_out, mode, c_out, layer_vb(cfg.num_res_blocks))?;
                layers.push(Layer::Resample(Box::new(r)));
            }
            let shortcut = cfg.is_residual.then(|| AvgDown {
                c_out,
                cells: cfg.encoder_shortcut(i),
            });
            stages.push(EncoderStage { layers, shortcut });
        }
        let top = dims[n_stages];
        Ok(Self {
            conv1,
            stages,
            middle: Middle::new(top, vb.pp("middle"))?,
            head: Head::new(top, 2 * cfg.z_dim, vb.pp("head"))?,
        })
    }

    /// One chunk. [B, C_in, T, H, W] → [B, 2·z, T', H/8, W/8]
    fn forward(&self, x: &Tensor, cache: &mut Cursor) -> candle_core::Result<Tensor> {
        let mut x = conv_cached(&self.conv1, x, cache.next_slot())?;
        for stage in &self.stages {
            x = stage.forward(&x, cache)?;
        }
        let x = self.middle.forward(&x, cache)?;
        self.head.forward(&x, cache)
    }
}

/// `Decoder3d`.
#[derive(Debug, Clone)]
struct Decoder {
    conv1: CausalConv3d,
    middle: Middle,
    stages: Vec<DecoderStage>,
    head: Head,
}

impl Decoder {
    /// Names as in [`Encoder::new`]: `upsamples.{n}` (Wan 2.1) or
    /// `upsamples.{i}.upsamples.{j}` (Wan 2.2).
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let dims = cfg.decoder_dims();
        let k3 = (3, 3, 3);
        let conv1 = causal_conv3d(
            cfg.z_dim,
            dims[0],
            k3,
            Conv3dConfig::padded(1),
            vb.pp("conv1"),
        )?;
        let middle = Middle::new(dims[0], vb.pp("middle"))?;
        let vu = vb.pp("upsamples");
        let n_stages = cfg.dim_mult.len();
        let mut stages = Vec::with_capacity(n_stages);
        let mut flat_index = 0;
        for i in 0..n_stages {
            let c_out = dims[i + 1];
            // In Wan 2.1 every stage after the first receives the previous upsample's halved
            // width; Wan 2.2's upsamples keep theirs.
            let mut c_in = if i > 0 && !cfg.is_residual {
                dims[i] / 2
            } else {
                dims[i]
            };
            let mut layers = vec![];
            let mut layer_vb = |j: usize| {
                if cfg.is_residual {
                    vu.pp(i).pp("upsamples").pp(j)
                } else {
                    flat_index += 1;
                    vu.pp(flat_index - 1)
                }
            };
            for j in 0..=cfg.num_res_blocks {
                let block = ResidualBlock::new(c_in, c_out, layer_vb(j))?;
                layers.push(Layer::Residual(Box::new(block)));
                c_in = c_out;
            }
            let shortcut = cfg.decoder_shortcut(i);
            if let Some(cells) = shortcut {
                let mode = if cells.time == 2 {
                    ResampleMode::Up3d
                } else {
                    ResampleMode::Up2d
                };
                let up_out = if cfg.is_residual { c_out } else { c_out / 2 };
                let r = Resample::new(c_out, mode, up_out, layer_vb(cfg.num_res_blocks + 1))?;
                layers.push(Layer::Resample(Box::new(r)));
            }
            let shortcut = shortcut
                .filter(|_| cfg.is_residual)
                .map(|cells| DupUp { c_out, cells });
            stages.push(DecoderStage { layers, shortcut });
        }
        let last = dims[n_stages];
        Ok(Self {
            conv1,
            middle,
            stages,
            head: Head::new(last, cfg.out_channels, vb.pp("head"))?,
        })
    }

    /// One latent frame; `first_chunk` for the first, whose temporal upsamples leave one frame.
    /// [B, z, 1, h, w] → [B, C_out, 1 or 4, 8h, 8w]
    fn forward(
        &self,
        x: &Tensor,
        cache: &mut Cursor,
        first_chunk: bool,
    ) -> candle_core::Result<Tensor> {
        let x = conv_cached(&self.conv1, x, cache.next_slot())?;
        let mut x = self.middle.forward(&x, cache)?;
        for stage in &self.stages {
            x = stage.forward(&x, cache, first_chunk)?;
        }
        self.head.forward(&x, cache)
    }
}

// ---- The model ---------------------------------------------------------------------------------

/// Posterior of the encoder, the diagonal Gaussian `N(mean, exp(logvar))`.
#[derive(Debug, Clone)]
pub struct Posterior {
    /// Raw (not normalised) latent mean, [B, z, T_lat, H/f, W/f] (f the spatial factor).
    /// Inference uses this.
    pub mean: Tensor,
    /// Log-variance clamped to [-30, 20] as diffusers does, same shape.
    pub logvar: Tensor,
}

/// A Wan VAE, 2.1 or 2.2 (`WanVAE_` / `AutoencoderKLWan`).
#[derive(Debug, Clone)]
pub struct WanVae {
    encoder: Encoder,
    /// `conv1` (diffusers `quant_conv`), 1×1×1, 2z → 2z.
    quant_conv: CausalConv3d,
    /// `conv2` (diffusers `post_quant_conv`), 1×1×1, z → z.
    post_quant_conv: CausalConv3d,
    decoder: Decoder,
    cfg: Config,
    dtype: DType,
    device: Device,
}

impl WanVae {
    /// Builds the VAE from `vb`, which must answer to original Wan names (a Wan/ComfyUI
    /// checkpoint, or any checkpoint wrapped by [`keys::canonical_var_builder`]). Computation
    /// runs in `vb`'s dtype and on its device.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let z = cfg.z_dim;
        let one = (1, 1, 1);
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            quant_conv: causal_conv3d(2 * z, 2 * z, one, Conv3dConfig::default(), vb.pp("conv1"))?,
            post_quant_conv: causal_conv3d(z, z, one, Conv3dConfig::default(), vb.pp("conv2"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Builds the VAE from a checkpoint's `VarBuilder` (empty path) in either key layout, with
    /// or without a known prefix ([`keys::KNOWN_PREFIXES`]); the configuration, Wan 2.1 or 2.2,
    /// comes from the tensor shapes ([`Config::from_var_builder`]).
    pub fn from_checkpoint(vb: VarBuilder) -> Result<Self> {
        let (layout, prefix) = keys::detect_layout(&vb).ok_or_else(|| Error::UnknownLayout {
            prefixes: keys::KNOWN_PREFIXES.to_vec(),
        })?;
        // Detection reads encoder and top-level names only, which do not depend on
        // num_res_blocks.
        let probe = keys::canonical_var_builder(vb.clone(), layout, prefix, 0);
        let cfg = Config::from_var_builder(&probe)?;
        let vb = keys::canonical_var_builder(vb, layout, prefix, cfg.num_res_blocks);
        tracing::debug!(?layout, prefix, ?cfg, "loading Wan VAE");
        Self::new(&cfg, vb)
    }

    /// Loads a VAE checkpoint file: `.safetensors` (memory-mapped) or `.pth` / `.pt` / `.ckpt`
    /// (a `torch.save` state dict), original Wan/ComfyUI or diffusers names. Weights are
    /// converted to `dtype` (f32, bf16 or f16) on `device`.
    pub fn from_file(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_checkpoint(crate::checkpoint::var_builder_from_file(
            path, dtype, device,
        )?)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The dtype computation runs in (the weights' dtype).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Encodes a clip to the raw posterior mean (`latent_dist.mode()` in diffusers; not
    /// normalised, see [`Self::normalize_latents`]).
    ///
    /// # Shapes
    /// - `video`: [B, 3, T, H, W], values in [-1, 1], `T = 1 + 4k`, H and W multiples of the
    ///   spatial factor f ([`Config::spatial_factor`]: 8 for Wan 2.1, 16 for Wan 2.2).
    /// - output: [B, z_dim, 1 + k, H/f, W/f] in the model's dtype.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor> {
        Ok(self.encode_posterior(video)?.mean)
    }

    /// Encodes a clip to its posterior: mean and clamped log-variance, each
    /// [B, z_dim, 1 + k, H/f, W/f].
    ///
    /// # Shapes
    /// As [`Self::encode`].
    pub fn encode_posterior(&self, video: &Tensor) -> Result<Posterior> {
        self.posterior(&self.encode_moments(video)?)
    }

    /// Splits `quant_conv`'s output into mean and log-variance (clamped to [-30, 20], as
    /// diffusers' `DiagonalGaussianDistribution`).
    fn posterior(&self, moments: &Tensor) -> Result<Posterior> {
        let z = self.cfg.z_dim;
        Ok(Posterior {
            mean: moments.narrow(1, 0, z)?,
            logvar: moments.narrow(1, z, z)?.clamp(-30f64, 20f64)?,
        })
    }

    /// Encodes a clip to `quant_conv`'s output, `[mean; logvar]` unclamped.
    ///
    /// # Shapes
    /// - `video`: as [`Self::encode`].
    /// - output: [B, 2·z_dim, 1 + k, H/f, W/f].
    pub fn encode_moments(&self, video: &Tensor) -> Result<Tensor> {
        self.check_video(video)?;
        let x = video.to_device(&self.device)?.to_dtype(self.dtype)?;
        self.encode_patches_while(&patchify(&x, self.cfg.patch())?, &|| true)
    }

    /// The encoder on a clip already folded into patches ([`patchify`]), on the model's device
    /// and in its dtype, asking `keep_going` before each temporal chunk: a tile of a long clip
    /// takes many seconds on a CPU, and a stop request must not wait for its end.
    ///
    /// # Shapes
    /// [B, in_channels, 1 + 4k, H/p, W/p] → [B, 2·z_dim, 1 + k, H/f, W/f]
    fn encode_patches_while(&self, x: &Tensor, keep_going: &dyn Fn() -> bool) -> Result<Tensor> {
        let t = x.dim(2)?;
        let mut slots = vec![];
        let mut outs = vec![];
        let chunks = 1 + (t - 1) / TEMPORAL_FACTOR;
        for i in 0..chunks {
            if !keep_going() {
                return Err(Error::Stopped);
            }
            let _span = tracing::debug_span!("vae_encode_chunk", i, chunks).entered();
            let (start, len) = if i == 0 {
                (0, 1)
            } else {
                (1 + TEMPORAL_FACTOR * (i - 1), TEMPORAL_FACTOR)
            };
            let mut cursor = Cursor::new(&mut slots);
            outs.push(
                self.encoder
                    .forward(&x.narrow(2, start, len)?, &mut cursor)?,
            );
        }
        let h = layout::cat_time(&outs.iter().collect::<Vec<_>>())?;
        // Contiguous [B, C, T, H, W] whatever the device's layout, for the host.
        Ok(self.quant_conv.forward(&h, None)?.contiguous()?)
    }

    /// Decodes raw latents and clamps to [-1, 1] (diffusers `decode(z).sample`).
    ///
    /// # Shapes
    /// - `z`: [B, z_dim, T_lat, h, w] (raw, not normalised)
    /// - output: [B, 3, 1 + 4·(T_lat − 1), f·h, f·w] in the model's dtype (f the spatial
    ///   factor).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.decode_unclamped(z)?.clamp(-1f64, 1f64)?)
    }

    /// Decodes raw latents without the final clamp.
    ///
    /// # Shapes
    /// As [`Self::decode`].
    pub fn decode_unclamped(&self, z: &Tensor) -> Result<Tensor> {
        self.check_latents(z)?;
        let z = z.to_device(&self.device)?.to_dtype(self.dtype)?;
        let patches = self.decode_patches_while(&z, &|| true)?;
        Ok(unpatchify(&patches, self.cfg.patch())?.contiguous()?)
    }

    /// The decoder on latents on the model's device and in its dtype, up to the frames still
    /// folded into patches, asking `keep_going` before each latent frame (see
    /// [`Self::encode_patches_while`]).
    ///
    /// # Shapes
    /// [B, z_dim, T_lat, h, w] → [B, out_channels, 1 + 4·(T_lat − 1), f·h/p, f·w/p]
    fn decode_patches_while(&self, z: &Tensor, keep_going: &dyn Fn() -> bool) -> Result<Tensor> {
        let t = z.dim(2)?;
        let x = self.post_quant_conv.forward(z, None)?;
        let mut slots = vec![];
        let mut outs = Vec::with_capacity(t);
        for i in 0..t {
            if !keep_going() {
                return Err(Error::Stopped);
            }
            let _span = tracing::debug_span!("vae_decode_frame", i, t).entered();
            let mut cursor = Cursor::new(&mut slots);
            outs.push(
                self.decoder
                    .forward(&x.narrow(2, i, 1)?, &mut cursor, i == 0)?,
            );
        }
        // Contiguous [B, C, T, H, W] whatever the device's layout, for the host.
        Ok(layout::cat_time(&outs.iter().collect::<Vec<_>>())?.contiguous()?)
    }

    /// Encodes a clip tile by tile ([`crate::tiling`]) to the raw posterior mean. A tile
    /// covering the frame gives exactly [`Self::encode`]'s result.
    ///
    /// `spec` is in video pixels. For Wan 2.1 this is diffusers' `encode(video).latent_dist.mode()`
    /// after `enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
    /// tile_sample_stride_height=stride, tile_sample_stride_width=stride)`. A VAE that folds
    /// the video into patches (Wan 2.2) is tiled over the folded video, where a tile is
    /// `tile / patch_size` wide; diffusers lays its encode tile sizes over the folded video as
    /// they are, so its `enable_tiling(T, T, S, S)` encode is this with tile 2T and stride 2S
    /// in [`TileSpec::diffusers`]' layout (its decode is [`Self::decode_tiled`] with T and S;
    /// see also [`tiling::tiled_encode_patches`]).
    ///
    /// # Errors
    /// A refused spec ([`TileSpec::validate`], or a tile or stride that is not a multiple of
    /// the spatial factor; reported as [`Error::Config`]) or a video [`Self::encode`] refuses,
    /// both before any tile is encoded.
    ///
    /// # Shapes
    /// As [`Self::encode`]; the result is in the model's dtype, on the host (the tiles are
    /// assembled there).
    pub fn encode_tiled(&self, video: &Tensor, spec: TileSpec) -> Result<Tensor> {
        Ok(self.encode_posterior_tiled(video, spec)?.mean)
    }

    /// Tiled [`Self::encode_posterior`]: the `quant_conv` output (`2·z_dim` channels) of each
    /// tile is blended (as diffusers' `tiled_encode` does), then split into mean and
    /// log-variance, and the log-variance clamped to [-30, 20].
    ///
    /// # Errors and shapes
    /// As [`Self::encode_tiled`].
    pub fn encode_posterior_tiled(&self, video: &Tensor, spec: TileSpec) -> Result<Posterior> {
        self.encode_posterior_tiled_observed(video, spec, &mut || true, &|| true)
    }

    /// [`Self::encode_posterior_tiled`], calling `after_tile` once each tile's latents exist
    /// (a caller's memory sample per tile) and `keep_going` before each temporal chunk of a
    /// tile; either returning false stops the pass with [`Error::Stopped`] (e.g. Ctrl-C).
    pub fn encode_posterior_tiled_observed(
        &self,
        video: &Tensor,
        spec: TileSpec,
        after_tile: &mut dyn FnMut() -> bool,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Posterior> {
        let spec = self.patch_spec(spec)?;
        self.check_video(video)?;
        // Folded on the host, where the tiler keeps the whole input.
        let patches = patchify(video, self.cfg.patch())?;
        let moments = tiling::tiled_encode_patches(&patches, spec, self.cfg.patch(), |tile| {
            let moments = self.encode_patches_while(&self.on_device(tile)?, keep_going)?;
            if !after_tile() {
                return Err(Error::Stopped);
            }
            Ok::<_, Error>(moments)
        })?;
        self.posterior(&moments)
    }

    /// Decodes raw latents tile by tile ([`crate::tiling`]) and clamps to [-1, 1] after
    /// assembly: diffusers' `decode(z).sample` with `enable_tiling` given `spec`'s tile and
    /// stride (video pixels; for Wan 2.2 too, see [`Self::encode_tiled`]). Tiles are blended
    /// before the frames are unfolded from patches, as diffusers does. A tile covering the
    /// frame gives exactly [`Self::decode`]'s result.
    ///
    /// # Errors
    /// A refused spec (as for [`Self::encode_tiled`]) or latents [`Self::decode`] refuses,
    /// both before any tile is decoded.
    ///
    /// # Shapes
    /// As [`Self::decode`]; the result is in the model's dtype, on the host.
    pub fn decode_tiled(&self, z: &Tensor, spec: TileSpec) -> Result<Tensor> {
        self.decode_tiled_observed(z, spec, self.dtype, &mut || true, &|| true)
    }

    /// [`Self::decode_tiled`] without the clamp.
    ///
    /// # Errors and shapes
    /// As [`Self::decode_tiled`].
    pub fn decode_tiled_unclamped(&self, z: &Tensor, spec: TileSpec) -> Result<Tensor> {
        self.decode_tiled_finished(z, spec, tiling::Finish::default(), &mut || true, &|| true)
    }

    /// [`Self::decode_tiled`] with the result in `dtype` (each clamped tile is converted on the
    /// device; f32 for files and video costs the host nothing), calling `after_tile` once each
    /// tile's pixels exist (a caller's memory sample per tile) and `keep_going` before each
    /// latent frame of a tile; either returning false stops the pass with [`Error::Stopped`].
    pub fn decode_tiled_observed(
        &self,
        z: &Tensor,
        spec: TileSpec,
        dtype: DType,
        after_tile: &mut dyn FnMut() -> bool,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Tensor> {
        let finish = tiling::Finish {
            clamp: Some((-1.0, 1.0)),
            dtype: Some(dtype),
        };
        self.decode_tiled_finished(z, spec, finish, after_tile, keep_going)
    }

    /// The tiled decode with `finish` applied to each blended, cropped tile (clamping and
    /// converting commute with unfolding the patches, which happens once, on the host).
    fn decode_tiled_finished(
        &self,
        z: &Tensor,
        spec: TileSpec,
        finish: tiling::Finish,
        after_tile: &mut dyn FnMut() -> bool,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Tensor> {
        let spec = self.patch_spec(spec)?;
        self.check_latents(z)?;
        let patches = tiling::tiled_decode(z, spec, finish, |tile| {
            let pixels = self.decode_patches_while(&self.on_device(tile)?, keep_going)?;
            if !after_tile() {
                return Err(Error::Stopped);
            }
            Ok::<_, Error>(pixels)
        })?;
        Ok(unpatchify(&patches, self.cfg.patch())?.contiguous()?)
    }

    /// The tiles a tiled pass with `spec` cuts a `height`×`width` video into, as (height,
    /// width) in video pixels, smallest first, and how many there are: the tiler runs on the
    /// video folded into patches, so this VAE's patches decide where the tiles fall.
    pub fn tiles(
        &self,
        spec: TileSpec,
        (height, width): (usize, usize),
    ) -> Result<(usize, Vec<(usize, usize)>)> {
        let p = self.cfg.patch();
        let folded = self.patch_spec(spec)?;
        let (h, w) = (height / p, width / p);
        let shapes = folded.try_tile_shapes(h, w)?;
        let count = folded.try_count(h, w)?;
        Ok((
            count,
            shapes
                .into_iter()
                .map(|(th, tw)| (th * p, tw * p))
                .collect(),
        ))
    }

    /// `spec` (video pixels) checked ([`TileSpec::validate`], and whole latent cells: tile and
    /// stride multiples of the spatial factor) and converted to pixels of the video folded into
    /// patches, where the tiler runs (itself when there are no patches).
    fn patch_spec(&self, spec: TileSpec) -> Result<TileSpec> {
        spec.validate()?;
        let (p, factor) = (self.cfg.patch(), self.cfg.spatial_factor());
        if !spec.tile.is_multiple_of(factor) || !spec.stride.is_multiple_of(factor) {
            return Err(Error::Config {
                reason: format!(
                    "tiling: tile {} px and stride {} px must be multiples of {factor} (this \
                     VAE's spatial scale)",
                    spec.tile, spec.stride
                ),
            });
        }
        Ok(TileSpec {
            tile: spec.tile / p,
            stride: spec.stride / p,
            layout: spec.layout,
        })
    }

    /// A tile of a host-side input, on the model's device and in its dtype: tiled runs keep the
    /// whole input on the host and move one tile at a time. The tile is packed first because
    /// `to_device` moves a view's whole storage (the whole clip, for a tile of it), and
    /// converted on the device, where that is cheap.
    fn on_device(&self, tile: &Tensor) -> Result<Tensor> {
        Ok(tile
            .contiguous()?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?)
    }

    /// `(z − latents_mean) / latents_std` per channel: raw latents to the DiT's space.
    ///
    /// # Shapes
    /// [B, z_dim, T, h, w] → same
    pub fn normalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        self.check_latents(z)?;
        let (mean, std) = self.latent_stats(z)?;
        Ok(z.broadcast_sub(&mean)?.broadcast_div(&std)?)
    }

    /// `z · latents_std + latents_mean` per channel: the DiT's latents back to raw.
    ///
    /// # Shapes
    /// [B, z_dim, T, h, w] → same
    pub fn denormalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        self.check_latents(z)?;
        let (mean, std) = self.latent_stats(z)?;
        Ok(z.broadcast_mul(&std)?.broadcast_add(&mean)?)
    }

    fn latent_stats(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = self.cfg.z_dim;
        let stat = |v: &[f64]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, n, z.device())?
                .to_dtype(z.dtype())?
                .reshape((1, n, 1, 1, 1))?)
        };
        Ok((stat(&self.cfg.latents_mean)?, stat(&self.cfg.latents_std)?))
    }

    fn check_video(&self, video: &Tensor) -> Result<(usize, usize, usize, usize, usize)> {
        const NAME: &str = "video";
        let dims = check_5d(video, NAME, "[B, 3, T, H, W]")?;
        let (_, c, t, h, w) = dims;
        if c != self.cfg.video_in_channels() {
            return Err(Error::Channels {
                tensor: NAME,
                expected: self.cfg.video_in_channels(),
                got: c,
                shape: video.dims().to_vec(),
            });
        }
        if (t - 1) % TEMPORAL_FACTOR != 0 {
            let below = 1 + TEMPORAL_FACTOR * ((t - 1) / TEMPORAL_FACTOR);
            return Err(Error::FrameCount {
                tensor: NAME,
                frames: t,
                below,
                above: below + TEMPORAL_FACTOR,
            });
        }
        let factor = self.cfg.spatial_factor();
        if !h.is_multiple_of(factor) || !w.is_multiple_of(factor) {
            return Err(Error::SpatialSize {
                tensor: NAME,
                height: h,
                width: w,
                factor,
            });
        }
        check_frame_side(NAME, h, w, 1)?;
        Ok(dims)
    }

    fn check_latents(&self, z: &Tensor) -> Result<(usize, usize, usize, usize, usize)> {
        const NAME: &str = "latents";
        let dims = check_5d(z, NAME, "[B, z_dim, T, h, w]")?;
        if dims.1 != self.cfg.z_dim {
            return Err(Error::Channels {
                tensor: NAME,
                expected: self.cfg.z_dim,
                got: dims.1,
                shape: z.dims().to_vec(),
            });
        }
        check_frame_side(NAME, dims.3, dims.4, self.cfg.spatial_factor())?;
        Ok(dims)
    }
}

/// A frame of `height`×`width` cells of `scale` pixels each is at most
/// [`tiling::MAX_FRAME_SIDE`] pixels per side: the same limit, tiled or not, so that no
/// output or activation is sized from a larger one.
fn check_frame_side(tensor: &'static str, height: usize, width: usize, scale: usize) -> Result<()> {
    let max = tiling::MAX_FRAME_SIDE;
    let pixels = |n: usize| n.checked_mul(scale).filter(|&p| p <= max);
    if pixels(height).is_some() && pixels(width).is_some() {
        return Ok(());
    }
    Err(Error::TooLarge {
        tensor,
        reason: format!(
            "a frame of {height}x{width} (x{scale} px per cell) is more than {max} px on a side"
        ),
    })
}

/// Rank 5 and no empty dimension.
fn check_5d(
    x: &Tensor,
    tensor: &'static str,
    layout: &'static str,
) -> Result<(usize, usize, usize, usize, usize)> {
    let dims = x.dims();
    if dims.len() != 5 {
        return Err(Error::Rank {
            tensor,
            layout,
            got: dims.to_vec(),
        });
    }
    if dims.contains(&0) {
        return Err(Error::Empty {
            tensor,
            shape: dims.to_vec(),
        });
    }
    Ok((dims[0], dims[1], dims[2], dims[3], dims[4]))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use candle_core::Shape;
    use candle_nn::var_builder::SimpleBackend;

    use super::*;

    /// Records every tensor the model asks for and hands out zeros.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<BTreeMap<String, Vec<usize>>>>);

    impl SimpleBackend for Recorder {
        fn get(
            &self,
            s: Shape,
            name: &str,
            _: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0
                .lock()
                .unwrap()
                .insert(name.to_string(), s.dims().to_vec());
            Tensor::zeros(s, dtype, dev)
        }

        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("unexpected get_unchecked({name})")
        }

        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }

    /// The tensors `cfg` asks a checkpoint for, and their shapes (u8 zeros: the shapes matter,
    /// not the values).
    fn requested_keys(cfg: &Config) -> BTreeMap<String, Vec<usize>> {
        let rec = Recorder::default();
        let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::U8, Device::Cpu);
        WanVae::new(cfg, vb).unwrap();
        let keys = rec.0.lock().unwrap().clone();
        keys
    }

    /// `keys` holds each of `expect` with its shape and none of `absent`, and its parameters
    /// in tenths of millions: (all, encoder, decoder).
    fn check_key_set(
        keys: &BTreeMap<String, Vec<usize>>,
        expect: &[(&str, &[usize])],
        absent: &[&str],
        tenths_of_millions: (usize, usize, usize),
    ) {
        for &(name, shape) in expect {
            assert_eq!(keys.get(name).map(Vec::as_slice), Some(shape), "{name}");
        }
        for &name in absent {
            assert!(!keys.contains_key(name), "{name}");
        }
        let params = |prefix: &str| -> usize {
            keys.iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(_, s)| s.iter().product::<usize>())
                .sum()
        };
        let tenths = |n: usize| (n as f64 / 1e5).round() as usize;
        let counted = (
            tenths(params("")),
            tenths(params("encoder.")),
            tenths(params("decoder.")),
        );
        assert_eq!(counted, tenths_of_millions);
    }

    /// The Wan 2.1 preset asks for exactly the real checkpoint's tensors: 194 of them, with the
    /// shapes of the Wan 2.1 VAE checkpoint, and 126.9 M parameters (53.6 M
    /// encoder, 73.3 M decoder).
    #[test]
    fn wan21_requests_the_real_key_set() {
        let keys = requested_keys(&Config::wan21());
        assert_eq!(keys.len(), 194);
        let expect: [(&str, &[usize]); 22] = [
            ("encoder.conv1.weight", &[96, 3, 3, 3, 3]),
            ("encoder.downsamples.2.resample.1.weight", &[96, 96, 3, 3]),
            ("encoder.downsamples.3.shortcut.weight", &[192, 96, 1, 1, 1]),
            (
                "encoder.downsamples.5.time_conv.weight",
                &[192, 192, 3, 1, 1],
            ),
            (
                "encoder.downsamples.8.time_conv.weight",
                &[384, 384, 3, 1, 1],
            ),
            (
                "encoder.downsamples.10.residual.6.weight",
                &[384, 384, 3, 3, 3],
            ),
            ("encoder.middle.1.norm.gamma", &[384, 1, 1]),
            ("encoder.middle.1.to_qkv.weight", &[1152, 384, 1, 1]),
            ("encoder.middle.1.proj.weight", &[384, 384, 1, 1]),
            ("encoder.head.0.gamma", &[384, 1, 1, 1]),
            ("encoder.head.2.weight", &[32, 384, 3, 3, 3]),
            ("conv1.weight", &[32, 32, 1, 1, 1]),
            ("conv2.weight", &[16, 16, 1, 1, 1]),
            ("decoder.conv1.weight", &[384, 16, 3, 3, 3]),
            ("decoder.upsamples.3.resample.1.weight", &[192, 384, 3, 3]),
            ("decoder.upsamples.3.time_conv.weight", &[768, 384, 3, 1, 1]),
            ("decoder.upsamples.4.shortcut.weight", &[384, 192, 1, 1, 1]),
            ("decoder.upsamples.7.time_conv.weight", &[768, 384, 3, 1, 1]),
            (
                "decoder.upsamples.8.residual.2.weight",
                &[192, 192, 3, 3, 3],
            ),
            ("decoder.upsamples.11.resample.1.weight", &[96, 192, 3, 3]),
            ("decoder.upsamples.14.residual.6.weight", &[96, 96, 3, 3, 3]),
            ("decoder.head.2.weight", &[3, 96, 3, 3, 3]),
        ];
        let absent = [
            "encoder.downsamples.2.time_conv.weight",
            "encoder.downsamples.11.residual.0.gamma",
            "decoder.upsamples.11.time_conv.weight",
            "decoder.upsamples.15.residual.0.gamma",
        ];
        check_key_set(&keys, &expect, &absent, (1269, 536, 733));
    }

    /// The Wan 2.2 preset asks for exactly the real checkpoint's tensors (`Wan2.2_VAE.pth`,
    /// original names): 196 of them, 704.7 M parameters (149.6 M encoder, 555.0 M decoder), with
    /// the shapes diffusers' `AutoencoderKLWan` has at that config, names translated by
    /// `convert_vae_22` read backwards.
    #[test]
    fn wan22_requests_the_real_key_set() {
        let keys = requested_keys(&Config::wan22());
        assert_eq!(keys.len(), 196);
        let expect: [(&str, &[usize]); 21] = [
            ("encoder.conv1.weight", &[160, 12, 3, 3, 3]),
            (
                "encoder.downsamples.0.downsamples.1.residual.6.weight",
                &[160, 160, 3, 3, 3],
            ),
            (
                "encoder.downsamples.0.downsamples.2.resample.1.weight",
                &[160, 160, 3, 3],
            ),
            (
                "encoder.downsamples.1.downsamples.0.shortcut.weight",
                &[320, 160, 1, 1, 1],
            ),
            (
                "encoder.downsamples.1.downsamples.2.time_conv.weight",
                &[320, 320, 3, 1, 1],
            ),
            (
                "encoder.downsamples.2.downsamples.2.time_conv.weight",
                &[640, 640, 3, 1, 1],
            ),
            (
                "encoder.downsamples.3.downsamples.1.residual.6.weight",
                &[640, 640, 3, 3, 3],
            ),
            ("encoder.middle.1.to_qkv.weight", &[1920, 640, 1, 1]),
            ("encoder.head.2.weight", &[96, 640, 3, 3, 3]),
            ("conv1.weight", &[96, 96, 1, 1, 1]),
            ("conv2.weight", &[48, 48, 1, 1, 1]),
            ("decoder.conv1.weight", &[1024, 48, 3, 3, 3]),
            (
                "decoder.upsamples.0.upsamples.3.resample.1.weight",
                &[1024, 1024, 3, 3],
            ),
            (
                "decoder.upsamples.0.upsamples.3.time_conv.weight",
                &[2048, 1024, 3, 1, 1],
            ),
            (
                "decoder.upsamples.1.upsamples.3.time_conv.weight",
                &[2048, 1024, 3, 1, 1],
            ),
            (
                "decoder.upsamples.2.upsamples.0.shortcut.weight",
                &[512, 1024, 1, 1, 1],
            ),
            (
                "decoder.upsamples.2.upsamples.3.resample.1.weight",
                &[512, 512, 3, 3],
            ),
            (
                "decoder.upsamples.3.upsamples.0.shortcut.weight",
                &[256, 512, 1, 1, 1],
            ),
            (
                "decoder.upsamples.3.upsamples.2.residual.6.weight",
                &[256, 256, 3, 3, 3],
            ),
            ("decoder.head.0.gamma", &[256, 1, 1, 1]),
            ("decoder.head.2.weight", &[12, 256, 3, 3, 3]),
        ];
        let absent = [
            "encoder.downsamples.0.downsamples.2.time_conv.weight",
            "encoder.downsamples.3.downsamples.2.resample.1.weight",
            "decoder.upsamples.2.upsamples.3.time_conv.weight",
            "decoder.upsamples.3.upsamples.3.resample.1.weight",
        ];
        check_key_set(&keys, &expect, &absent, (7047, 1496, 5550));
    }

    /// Channel `c·4 + j·2 + i` of the folded clip is pixel (row offset `i`, column offset `j`)
    /// of each 2×2 patch of channel `c`, as `rearrange("b c f (h q) (w r) -> b (c r q) f h w")`
    /// upstream; unfolding restores the clip.
    #[test]
    fn patches_fold_columns_before_rows() {
        let x = Tensor::arange(0f32, 32., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 4, 4))
            .unwrap();
        let folded = patchify(&x, 2).unwrap();
        assert_eq!(folded.dims(), [1, 8, 1, 2, 2]);
        let at = |t: &Tensor, c: usize, h: usize, w: usize| -> f32 {
            t.get(0)
                .unwrap()
                .get(c)
                .unwrap()
                .get(0)
                .unwrap()
                .get(h)
                .unwrap()
                .get(w)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // Channel 1·4 + 1·2 + 0 = 6: channel 1, column offset 1, row offset 0, patch (1, 0).
        assert_eq!(at(&folded, 6, 1, 0), at(&x, 1, 2, 1));
        // Channel 0·4 + 0·2 + 1 = 1: channel 0, row offset 1, patch (0, 1).
        assert_eq!(at(&folded, 1, 0, 1), at(&x, 0, 1, 2));
        let back = unpatchify(&folded, 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    /// AvgDown3D pads a 1-frame chunk with a zero frame in front and averages groups of
    /// consecutive (channel, cell) values; DupUp3D repeats channels into cells and drops the
    /// leading frame of the first chunk.
    #[test]
    fn residual_shortcuts_regroup_cells() {
        let dev = Device::Cpu;
        // 1 channel, 1 frame of 2×2 → 2 channels (group 1·8/2 = 4): channel 0 averages the
        // zero frame's 4 cells, channel 1 the real frame's.
        let x = Tensor::new(&[1f32, 2., 3., 6.], &dev)
            .unwrap()
            .reshape((1, 1, 1, 2, 2))
            .unwrap();
        let down = AvgDown {
            c_out: 2,
            cells: Cells { time: 2, space: 2 },
        };
        let y = down.forward(&x).unwrap();
        assert_eq!(y.dims(), [1, 2, 1, 1, 1]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 3.0]
        );
        // 2 channels → 1 channel of 2 frames × 2×2 (repeats 1·8/2 = 4): channel 0 fills frame
        // 0, channel 1 frame 1; the first chunk keeps frame 1 only.
        let z = Tensor::new(&[5f32, 7.], &dev)
            .unwrap()
            .reshape((1, 2, 1, 1, 1))
            .unwrap();
        let up = DupUp {
            c_out: 1,
            cells: Cells { time: 2, space: 2 },
        };
        let all = up.forward(&z, false).unwrap();
        assert_eq!(all.dims(), [1, 1, 2, 2, 2]);
        assert_eq!(
            all.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [5.0, 5.0, 5.0, 5.0, 7.0, 7.0, 7.0, 7.0]
        );
        let first = up.forward(&z, true).unwrap();
        assert_eq!(
            first.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [7.0; 4]
        );
    }

    #[test]
    fn feature_cache_keeps_two_frames() {
        let dev = Device::Cpu;
        let frames = |t: usize, v: f32| Tensor::full(v, (1, 1, t, 1, 1), &dev).unwrap();
        let values = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // A 4-frame chunk keeps its last two frames.
        let x = Tensor::arange(0f32, 4f32, &dev)
            .unwrap()
            .reshape((1, 1, 4, 1, 1))
            .unwrap();
        assert_eq!(values(&next_cache(&x, None).unwrap()), [2.0, 3.0]);
        // A 1-frame chunk keeps the previous cache's last frame in front.
        let prev = Tensor::cat(&[frames(1, 7.0), frames(1, 8.0)], 2).unwrap();
        assert_eq!(
            values(&next_cache(&frames(1, 9.0), Some(&prev)).unwrap()),
            [8.0, 9.0]
        );
        // The first 1-frame chunk keeps just itself.
        assert_eq!(values(&next_cache(&frames(1, 9.0), None).unwrap()), [9.0]);
    }
}
