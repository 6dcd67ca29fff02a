//! The Wan 2.1 video VAE: a causal 3D convolutional autoencoder, 8× spatial and 4× temporal
//! compression, 16 latent channels.
//!
//! Written from the architecture (original `Wan2.1:wan/modules/vae.py` `WanVAE_`, diffusers
//! `AutoencoderKLWan`); numerically checked against diffusers 0.42.1 in
//! `tests/vae_parity.rs`. Weights are requested by their original Wan names; see
//! [`super::keys`] for the diffusers layout.
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

/// Spatial compression factor (`scale_factor_spatial`).
pub const SPATIAL_FACTOR: usize = 8;

/// Temporal compression factor (`scale_factor_temporal`): `T_lat = 1 + (T - 1) / 4`.
pub const TEMPORAL_FACTOR: usize = 4;

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

/// VAE hyper-parameters. Field names follow diffusers' `AutoencoderKLWan` config, so its
/// `vae/config.json` deserializes into this (unknown fields are ignored, missing ones take the
/// Wan 2.1 values).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Config {
    /// Channels of the first encoder stage and last decoder stage (96).
    pub base_dim: usize,
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
    /// Video channels in (3).
    pub in_channels: usize,
    /// Video channels out (3).
    pub out_channels: usize,
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
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            temperal_downsample: vec![false, true, true],
            attn_scales: vec![],
            in_channels: 3,
            out_channels: 3,
            latents_mean: WAN21_LATENTS_MEAN.to_vec(),
            latents_std: WAN21_LATENTS_STD.to_vec(),
        }
    }

    /// Checks that the fields describe a Wan 2.1-style VAE this implementation can build.
    pub fn validate(&self) -> Result<()> {
        let fail = |reason: String| Err(Error::Config { reason });
        if self.base_dim == 0 || self.z_dim == 0 || self.in_channels == 0 || self.out_channels == 0
        {
            return fail(format!(
                "base_dim {}, z_dim {}, in_channels {} and out_channels {} must be positive",
                self.base_dim, self.z_dim, self.in_channels, self.out_channels
            ));
        }
        if self.dim_mult.len() < 2 || self.dim_mult.contains(&0) {
            return fail(format!(
                "dim_mult {:?} needs at least two positive entries",
                self.dim_mult
            ));
        }
        if let Some(m) = self
            .dim_mult
            .iter()
            .find(|&&m| m.checked_mul(self.base_dim).is_none())
        {
            return fail(format!(
                "a stage width of dim_mult {m} × base_dim {} overflows",
                self.base_dim
            ));
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
                "attn_scales {:?}: attention inside the stages is not implemented (Wan 2.1 has none)",
                self.attn_scales
            ));
        }
        let dec_dims = self.decoder_dims();
        if dec_dims[1..].iter().any(|&d| d < 2 || d % 2 != 0) {
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

    /// Stage widths of the decoder: `base_dim · [dim_mult.last, dim_mult reversed...]`.
    fn decoder_dims(&self) -> Vec<usize> {
        let last = *self.dim_mult.last().unwrap_or(&1);
        std::iter::once(last)
            .chain(self.dim_mult.iter().rev().copied())
            .map(|m| m * self.base_dim)
            .collect()
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
        // Walk the encoder's flat block list: residual blocks, with a resample ending each stage
        // but the last.
        let mut stages: Vec<(usize, usize)> = vec![]; // (residual blocks, output width)
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
        let (latents_mean, latents_std) = if z_dim == WAN21_LATENTS_MEAN.len() {
            (WAN21_LATENTS_MEAN.to_vec(), WAN21_LATENTS_STD.to_vec())
        } else {
            (vec![0.0; z_dim], vec![1.0; z_dim])
        };
        let cfg = Self {
            base_dim,
            z_dim,
            dim_mult,
            num_res_blocks,
            temperal_downsample,
            attn_scales: vec![],
            in_channels,
            out_channels,
            latents_mean,
            latents_std,
        };
        cfg.validate()?;
        Ok(cfg)
    }
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
    fn new(dim: usize, mode: ResampleMode, vb: VarBuilder) -> candle_core::Result<Self> {
        let conv = match mode {
            ResampleMode::Up2d | ResampleMode::Up3d => {
                frame_conv(dim, dim / 2, 3, 1, 1, vb.pp("resample.1"))?
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

/// `Encoder3d`.
#[derive(Debug, Clone)]
struct Encoder {
    conv1: CausalConv3d,
    downsamples: Vec<Layer>,
    middle: Middle,
    head: Head,
}

impl Encoder {
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
        let mut downsamples = vec![];
        let vd = vb.pp("downsamples");
        let stages = cfg.dim_mult.len();
        for i in 0..stages {
            let (mut c_in, c_out) = (dims[i], dims[i + 1]);
            for _ in 0..cfg.num_res_blocks {
                let block = ResidualBlock::new(c_in, c_out, vd.pp(downsamples.len()))?;
                downsamples.push(Layer::Residual(Box::new(block)));
                c_in = c_out;
            }
            if i != stages - 1 {
                let mode = if cfg.temperal_downsample[i] {
                    ResampleMode::Down3d
                } else {
                    ResampleMode::Down2d
                };
                let r = Resample::new(c_out, mode, vd.pp(downsamples.len()))?;
                downsamples.push(Layer::Resample(Box::new(r)));
            }
        }
        let top = dims[stages];
        Ok(Self {
            conv1,
            downsamples,
            middle: Middle::new(top, vb.pp("middle"))?,
            head: Head::new(top, 2 * cfg.z_dim, vb.pp("head"))?,
        })
    }

    /// One chunk. [B, C_in, T, H, W] → [B, 2·z, T', H/8, W/8]
    fn forward(&self, x: &Tensor, cache: &mut Cursor) -> candle_core::Result<Tensor> {
        let mut x = conv_cached(&self.conv1, x, cache.next_slot())?;
        for layer in &self.downsamples {
            x = layer.forward(&x, cache)?;
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
    upsamples: Vec<Layer>,
    head: Head,
}

impl Decoder {
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
        let mut upsamples = vec![];
        let vu = vb.pp("upsamples");
        let stages = cfg.dim_mult.len();
        for i in 0..stages {
            let c_out = dims[i + 1];
            // Every stage after the first receives the previous upsample's halved width.
            let mut c_in = if i > 0 { dims[i] / 2 } else { dims[i] };
            for _ in 0..=cfg.num_res_blocks {
                let block = ResidualBlock::new(c_in, c_out, vu.pp(upsamples.len()))?;
                upsamples.push(Layer::Residual(Box::new(block)));
                c_in = c_out;
            }
            if i != stages - 1 {
                // temperal_upsample = temperal_downsample reversed.
                let mode = if cfg.temperal_downsample[stages - 2 - i] {
                    ResampleMode::Up3d
                } else {
                    ResampleMode::Up2d
                };
                let r = Resample::new(c_out, mode, vu.pp(upsamples.len()))?;
                upsamples.push(Layer::Resample(Box::new(r)));
            }
        }
        let last = dims[stages];
        Ok(Self {
            conv1,
            middle,
            upsamples,
            head: Head::new(last, cfg.out_channels, vb.pp("head"))?,
        })
    }

    /// One latent frame. [B, z, 1, h, w] → [B, C_out, 1 or 4, 8h, 8w]
    fn forward(&self, x: &Tensor, cache: &mut Cursor) -> candle_core::Result<Tensor> {
        let x = conv_cached(&self.conv1, x, cache.next_slot())?;
        let mut x = self.middle.forward(&x, cache)?;
        for layer in &self.upsamples {
            x = layer.forward(&x, cache)?;
        }
        self.head.forward(&x, cache)
    }
}

// ---- The model ---------------------------------------------------------------------------------

/// Posterior of the encoder, the diagonal Gaussian `N(mean, exp(logvar))`.
#[derive(Debug, Clone)]
pub struct Posterior {
    /// Raw (not normalised) latent mean, [B, z, T_lat, H/8, W/8]. Inference uses this.
    pub mean: Tensor,
    /// Log-variance clamped to [-30, 20] as diffusers does, same shape.
    pub logvar: Tensor,
}

/// The Wan 2.1 VAE (`WanVAE_` / `AutoencoderKLWan`).
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
    /// or without a known prefix ([`keys::KNOWN_PREFIXES`]); the configuration comes from the
    /// tensor shapes ([`Config::from_var_builder`]).
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
    /// - `video`: [B, 3, T, H, W], values in [-1, 1], `T = 1 + 4k`, H and W multiples of 8.
    /// - output: [B, z_dim, 1 + k, H/8, W/8] in the model's dtype.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor> {
        Ok(self.encode_posterior(video)?.mean)
    }

    /// Encodes a clip to its posterior: mean and clamped log-variance, each
    /// [B, z_dim, 1 + k, H/8, W/8].
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
    /// - output: [B, 2·z_dim, 1 + k, H/8, W/8].
    pub fn encode_moments(&self, video: &Tensor) -> Result<Tensor> {
        self.encode_moments_while(video, &|| true)
    }

    /// [`Self::encode_moments`], asking `keep_going` before each temporal chunk: a tile of a
    /// long clip takes many seconds on a CPU, and a stop request must not wait for its end.
    fn encode_moments_while(
        &self,
        video: &Tensor,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Tensor> {
        let (_, _, t, _, _) = self.check_video(video)?;
        let x = video.to_device(&self.device)?.to_dtype(self.dtype)?;
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
    /// - output: [B, 3, 1 + 4·(T_lat − 1), 8h, 8w] in the model's dtype.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.decode_unclamped(z)?.clamp(-1f64, 1f64)?)
    }

    /// Decodes raw latents without the final clamp.
    ///
    /// # Shapes
    /// As [`Self::decode`].
    pub fn decode_unclamped(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_unclamped_while(z, &|| true)
    }

    /// [`Self::decode_unclamped`], asking `keep_going` before each latent frame (see
    /// [`Self::encode_moments_while`]).
    fn decode_unclamped_while(&self, z: &Tensor, keep_going: &dyn Fn() -> bool) -> Result<Tensor> {
        let (_, _, t, _, _) = self.check_latents(z)?;
        let z = z.to_device(&self.device)?.to_dtype(self.dtype)?;
        let x = self.post_quant_conv.forward(&z, None)?;
        let mut slots = vec![];
        let mut outs = Vec::with_capacity(t);
        for i in 0..t {
            if !keep_going() {
                return Err(Error::Stopped);
            }
            let _span = tracing::debug_span!("vae_decode_frame", i, t).entered();
            let mut cursor = Cursor::new(&mut slots);
            outs.push(self.decoder.forward(&x.narrow(2, i, 1)?, &mut cursor)?);
        }
        // Contiguous [B, C, T, H, W] whatever the device's layout, for the host.
        Ok(layout::cat_time(&outs.iter().collect::<Vec<_>>())?.contiguous()?)
    }

    /// Encodes a clip tile by tile ([`crate::tiling`]) to the raw posterior mean: diffusers'
    /// `encode(video).latent_dist.mode()` after `enable_tiling(tile_sample_min_height=tile,
    /// tile_sample_min_width=tile, tile_sample_stride_height=stride,
    /// tile_sample_stride_width=stride)`. A tile covering the frame gives exactly
    /// [`Self::encode`]'s result.
    ///
    /// # Errors
    /// A refused spec ([`TileSpec::validate`], reported as [`Error::Config`]) or a video
    /// [`Self::encode`] refuses, both before any tile is encoded.
    ///
    /// # Shapes
    /// As [`Self::encode`]; the result is in the model's dtype, on the host (the tiles are
    /// assembled there).
    pub fn encode_tiled(&self, video: &Tensor, spec: TileSpec) -> Result<Tensor> {
        Ok(self.encode_posterior_tiled(video, spec)?.mean)
    }

    /// Tiled [`Self::encode_posterior`]: the 32-channel `quant_conv` output of each tile is
    /// blended (as diffusers' `tiled_encode` does), then split into mean and log-variance, and
    /// the log-variance clamped to [-30, 20].
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
        spec.validate()?;
        self.check_video(video)?;
        let moments = tiling::tiled_encode(video, spec, |tile| {
            let moments = self.encode_moments_while(&self.on_device(tile)?, keep_going)?;
            if !after_tile() {
                return Err(Error::Stopped);
            }
            Ok::<_, Error>(moments)
        })?;
        self.posterior(&moments)
    }

    /// Decodes raw latents tile by tile ([`crate::tiling`]) and clamps to [-1, 1] after
    /// assembly: diffusers' `decode(z).sample` with tiling enabled as in
    /// [`Self::encode_tiled`]. A tile covering the frame gives exactly [`Self::decode`]'s
    /// result. For the unclamped output, run [`tiling::tiled_decode`] with
    /// [`Self::decode_unclamped`] and [`tiling::Finish::default`].
    ///
    /// # Errors
    /// A refused spec ([`TileSpec::validate`], reported as [`Error::Config`]) or latents
    /// [`Self::decode`] refuses, both before any tile is decoded.
    ///
    /// # Shapes
    /// As [`Self::decode`]; the result is in the model's dtype, on the host.
    pub fn decode_tiled(&self, z: &Tensor, spec: TileSpec) -> Result<Tensor> {
        self.decode_tiled_observed(z, spec, self.dtype, &mut || true, &|| true)
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
        spec.validate()?;
        self.check_latents(z)?;
        let finish = tiling::Finish {
            clamp: Some((-1.0, 1.0)),
            dtype: Some(dtype),
        };
        tiling::tiled_decode(z, spec, finish, |tile| {
            let pixels = self.decode_unclamped_while(&self.on_device(tile)?, keep_going)?;
            if !after_tile() {
                return Err(Error::Stopped);
            }
            Ok::<_, Error>(pixels)
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
        if c != self.cfg.in_channels {
            return Err(Error::Channels {
                tensor: NAME,
                expected: self.cfg.in_channels,
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
        if h % SPATIAL_FACTOR != 0 || w % SPATIAL_FACTOR != 0 {
            return Err(Error::SpatialSize {
                tensor: NAME,
                height: h,
                width: w,
                factor: SPATIAL_FACTOR,
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
        check_frame_side(NAME, dims.3, dims.4, SPATIAL_FACTOR)?;
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

    /// The Wan 2.1 preset asks for exactly the real checkpoint's tensors: 194 of them, with the
    /// shapes of the Wan 2.1 VAE checkpoint, and 126.9 M parameters (53.6 M
    /// encoder, 73.3 M decoder).
    #[test]
    fn wan21_requests_the_real_key_set() {
        let rec = Recorder::default();
        // u8 zeros: the shapes matter, not the values (127 MB instead of 508).
        let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::U8, Device::Cpu);
        WanVae::new(&Config::wan21(), vb).unwrap();
        let keys = rec.0.lock().unwrap().clone();
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
        for (name, shape) in expect {
            assert_eq!(keys.get(name).map(Vec::as_slice), Some(shape), "{name}");
        }
        for absent in [
            "encoder.downsamples.2.time_conv.weight",
            "encoder.downsamples.11.residual.0.gamma",
            "decoder.upsamples.11.time_conv.weight",
            "decoder.upsamples.15.residual.0.gamma",
        ] {
            assert!(!keys.contains_key(absent), "{absent}");
        }
        let params = |prefix: &str| -> usize {
            keys.iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(_, s)| s.iter().product::<usize>())
                .sum()
        };
        let tenths = |n: usize| (n as f64 / 1e5).round() as usize;
        assert_eq!(tenths(params("")), 1269);
        assert_eq!(tenths(params("encoder.")), 536);
        assert_eq!(tenths(params("decoder.")), 733);
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
