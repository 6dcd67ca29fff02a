//! The Wan 2.1 diffusion transformer (text-to-video): `WanModel` in `Wan2.1:wan/modules/model.py`,
//! `WanTransformer3DModel` in diffusers (`models/transformers/transformer_wan.py`).
//!
//! Video latents [B, 16, F, H, W] are cut into (1, 2, 2) patches (tokens), run through `layers`
//! blocks of self-attention with 3D RoPE, cross-attention to the umT5 context, and a gated FFN,
//! each modulated by the timestep, and put back together as the predicted velocity.
//!
//! Precision follows diffusers: the time embedding, the modulation tables, the layer norms and
//! the residual updates run in f32 whatever the weights' dtype; everything else runs in the
//! weights' dtype. Linear weights may also be ComfyUI's scaled float8 ([`crate::ops::linear`]).

use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::dit_keys;
use crate::error::{Error, Result};
use crate::ops::attention::{
    attention, attention_over_query, attention_projection_input, Attend, AttentionKernel,
    QueryChunk,
};
use crate::ops::linear::{get_in_dtype, layer_norm_f32, Linear, LinearInput, MatmulPrecision};
use crate::parallel::Communicator;

/// Scratch that one attention call may use for its scores when no budget is given.
pub const DEFAULT_ATTENTION_SCRATCH: u64 = 1 << 30;

/// The most tokens (patches of the latent) one sample may have: 2^20, 14 times the 75 600 of
/// an 81-frame 1280×720 video. Its RoPE tables alone are 512 MiB for 128-wide heads; a larger
/// grid is refused before anything is sized from it.
pub const MAX_TOKENS: usize = 1 << 20;

/// The DiT's hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Model width (`dim`; diffusers `num_attention_heads · attention_head_dim`).
    pub dim: usize,
    /// Hidden width of the FFN.
    pub ffn_dim: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Latent channels in (16 for text-to-video).
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Width of the text encoder's output (umT5-XXL: 4096).
    pub text_dim: usize,
    /// Width of the sinusoidal timestep features.
    pub freq_dim: usize,
    /// Patch size (t, h, w).
    pub patch_size: [usize; 3],
    /// Epsilon of every norm.
    pub eps: f64,
    /// Positions each RoPE axis covers (the latent grid must fit).
    pub rope_max_seq_len: usize,
    /// Image-to-video: the width of the CLIP image features the model attends to besides the
    /// text (ViT-H/14: 1280); `None` for text-to-video.
    pub image_dim: Option<usize>,
    /// First-last-frame to video: the image tokens of both frames (2 × 257), which get learned
    /// position embeddings; `None` otherwise.
    pub image_tokens: Option<usize>,
}

impl Config {
    /// Wan2.1-T2V-1.3B (`Wan2.1:wan/configs/wan_t2v_1_3B.py`: dim 1536, ffn_dim 8960,
    /// num_heads 12, num_layers 30).
    pub fn wan21_t2v_1_3b() -> Self {
        Self {
            dim: 1536,
            ffn_dim: 8960,
            num_heads: 12,
            num_layers: 30,
            ..Self::wan21_t2v_14b()
        }
    }

    /// Wan2.1-T2V-14B (`Wan2.1:wan/configs/wan_t2v_14B.py`: dim 5120, ffn_dim 13824,
    /// num_heads 40, num_layers 40; shared: patch (1, 2, 2), text_len 512, freq_dim 256,
    /// eps 1e-6).
    pub fn wan21_t2v_14b() -> Self {
        Self {
            dim: 5120,
            ffn_dim: 13824,
            num_heads: 40,
            num_layers: 40,
            in_channels: 16,
            out_channels: 16,
            text_dim: 4096,
            freq_dim: 256,
            patch_size: [1, 2, 2],
            eps: 1e-6,
            rope_max_seq_len: 1024,
            image_dim: None,
            image_tokens: None,
        }
    }

    /// Wan2.1-I2V-14B, 480p and 720p alike (`Wan2.1:wan/configs/wan_i2v_14B.py`): the 14B
    /// with 36 input channels (noise, mask, image latents) and image cross-attention over the
    /// CLIP ViT-H/14 features (1280 wide).
    pub fn wan21_i2v_14b() -> Self {
        Self {
            in_channels: 36,
            image_dim: Some(1280),
            ..Self::wan21_t2v_14b()
        }
    }

    /// Wan2.1-FLF2V-14B-720P: the image-to-video 14B over both frames' 2 × 257 image tokens,
    /// with their learned position embeddings.
    pub fn wan21_flf2v_14b() -> Self {
        Self {
            image_tokens: Some(2 * 257),
            ..Self::wan21_i2v_14b()
        }
    }

    /// Each expert of Wan2.2-I2V-A14B: the 14B with 36 input channels (noise, mask, image
    /// latents) and no image features.
    pub fn wan22_i2v_a14b_expert() -> Self {
        Self {
            in_channels: 36,
            ..Self::wan21_t2v_14b()
        }
    }

    /// Wan2.2-TI2V-5B (`Wan2.2:wan/configs/wan_ti2v_5B.py`: dim 3072, ffn_dim 14336,
    /// num_heads 24, num_layers 30, in_dim and out_dim 48: the latents of the Wan 2.2 VAE,
    /// 16× spatial compression). Its pipelines give it a timestep per token (see
    /// [`WanModel::forward`]).
    pub fn wan22_ti2v_5b() -> Self {
        Self {
            dim: 3072,
            ffn_dim: 14336,
            num_heads: 24,
            num_layers: 30,
            in_channels: 48,
            out_channels: 48,
            ..Self::wan21_t2v_14b()
        }
    }

    /// The names [`Self::preset`] knows; a Wan 2.2 A14B preset names one expert of its pair.
    pub const PRESETS: [&'static str; 8] = [
        "wan2.1-t2v-14b",
        "wan2.1-t2v-1.3b",
        "wan2.1-i2v-14b-480p",
        "wan2.1-i2v-14b-720p",
        "wan2.1-flf2v-14b-720p",
        "wan2.2-t2v-a14b",
        "wan2.2-i2v-a14b",
        "wan2.2-ti2v-5b",
    ];

    /// The preset named `name`, one of [`Self::PRESETS`].
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "wan2.1-t2v-14b" => Some(Self::wan21_t2v_14b()),
            "wan2.1-t2v-1.3b" => Some(Self::wan21_t2v_1_3b()),
            "wan2.1-i2v-14b-480p" | "wan2.1-i2v-14b-720p" => Some(Self::wan21_i2v_14b()),
            "wan2.1-flf2v-14b-720p" => Some(Self::wan21_flf2v_14b()),
            // Each Wan 2.2 T2V-A14B expert has the Wan 2.1 14B architecture.
            "wan2.2-t2v-a14b" => Some(Self::wan21_t2v_14b()),
            "wan2.2-i2v-a14b" => Some(Self::wan22_i2v_a14b_expert()),
            "wan2.2-ti2v-5b" => Some(Self::wan22_ti2v_5b()),
            _ => None,
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.num_heads
    }

    /// Checks the configuration for sizes the model cannot run.
    pub fn validate(&self) -> Result<()> {
        let fail = |reason: String| Err(Error::DitConfig { reason });
        if self.num_heads == 0 || !self.dim.is_multiple_of(self.num_heads) {
            return fail(format!(
                "dim {} is not a multiple of num_heads {}",
                self.dim, self.num_heads
            ));
        }
        let head_dim = self.head_dim();
        if !head_dim.is_multiple_of(2) || head_dim < 6 {
            return fail(format!(
                "head_dim {head_dim} must be even and at least 6 for 3D RoPE"
            ));
        }
        if !self.freq_dim.is_multiple_of(2) {
            return fail(format!("freq_dim {} must be even", self.freq_dim));
        }
        if self.patch_size.contains(&0) {
            return fail(format!("patch_size {:?} has a zero", self.patch_size));
        }
        for (name, v) in [
            ("dim", self.dim),
            ("ffn_dim", self.ffn_dim),
            ("num_layers", self.num_layers),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("text_dim", self.text_dim),
            ("rope_max_seq_len", self.rope_max_seq_len),
        ] {
            if v == 0 {
                return fail(format!("{name} is 0"));
            }
        }
        if self.image_dim == Some(0) || self.image_tokens == Some(0) {
            return fail("image_dim or the image tokens is 0".into());
        }
        if self.image_tokens.is_some() && self.image_dim.is_none() {
            return fail("image tokens without image_dim".into());
        }
        if !self.eps.is_finite() || self.eps < 0.0 {
            return fail(format!("eps {} must be a finite number >= 0", self.eps));
        }
        // Every weight's element count (and so every load) is sized from these products.
        if self.checked_parameter_count().is_none() {
            return fail(format!(
                "the parameter count of dim {}, ffn_dim {}, {} layers, patch {:?} and \
                 {}/{}/{} channels overflows",
                self.dim,
                self.ffn_dim,
                self.num_layers,
                self.patch_size,
                self.in_channels,
                self.out_channels,
                self.text_dim
            ));
        }
        Ok(())
    }

    /// Reads a diffusers `transformer/config.json` (`WanTransformer3DModel`). Image-to-video
    /// configurations (`image_dim`, `added_kv_proj_dim`) are refused.
    pub fn from_diffusers_json(text: &str) -> Result<Self> {
        let raw: DiffusersConfig = serde_json::from_str(text).map_err(|e| Error::DitConfig {
            reason: format!("not a WanTransformer3DModel config.json: {e}"),
        })?;
        let dim = raw.num_attention_heads * raw.attention_head_dim;
        if raw.image_dim.is_some() != raw.added_kv_proj_dim.is_some()
            || raw.added_kv_proj_dim.is_some_and(|d| d != dim)
        {
            return Err(Error::DitConfig {
                reason: format!(
                    "image_dim {:?} with added_kv_proj_dim {:?}: Wan's image-to-video models \
                     set both, the latter to the model width {dim}",
                    raw.image_dim, raw.added_kv_proj_dim
                ),
            });
        }
        if raw.pos_embed_seq_len.is_some() && raw.image_dim.is_none() {
            return Err(Error::DitConfig {
                reason: "pos_embed_seq_len without image_dim: the position embeddings are the \
                         image tokens' (first-last-frame to video)"
                    .into(),
            });
        }
        if !raw.cross_attn_norm || raw.qk_norm.as_deref() != Some("rms_norm_across_heads") {
            return Err(Error::DitConfig {
                reason: format!(
                    "cross_attn_norm {} / qk_norm {:?}: Wan 2.1 uses true / \
                     \"rms_norm_across_heads\", nothing else is implemented",
                    raw.cross_attn_norm, raw.qk_norm
                ),
            });
        }
        let cfg = Self {
            dim,
            ffn_dim: raw.ffn_dim,
            num_heads: raw.num_attention_heads,
            num_layers: raw.num_layers,
            in_channels: raw.in_channels,
            out_channels: raw.out_channels.unwrap_or(raw.in_channels),
            text_dim: raw.text_dim,
            freq_dim: raw.freq_dim,
            patch_size: raw.patch_size,
            eps: raw.eps,
            rope_max_seq_len: raw.rope_max_seq_len,
            image_dim: raw.image_dim,
            image_tokens: raw.pos_embed_seq_len,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the configuration from the tensor shapes of a checkpoint (original names, see
    /// [`dit_keys::canonical_var_builder`]). The head count is `dim / 128`, as ComfyUI assumes
    /// (every Wan 2.1 and 2.2 model has 128-wide heads); other models need a `config.json`.
    pub fn from_var_builder(vb: &VarBuilder) -> Result<Self> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            Ok(vb.get_unchecked_dtype(name, DType::F32)?.dims().to_vec())
        };
        let image_tokens = if vb.contains_tensor("img_emb.emb_pos") {
            Some(shape("img_emb.emb_pos")?.get(1).copied().unwrap_or(0))
        } else {
            None
        };
        let image_dim = if vb.contains_tensor("img_emb.proj.0.weight") {
            Some(
                shape("img_emb.proj.0.weight")?
                    .first()
                    .copied()
                    .unwrap_or(0),
            )
        } else {
            None
        };
        let patch = shape("patch_embedding.weight")?;
        let [dim, in_channels, pt, ph, pw] = patch[..] else {
            return Err(Error::DitConfig {
                reason: format!(
                    "patch_embedding.weight has shape {patch:?}, expected [dim, C, t, h, w]"
                ),
            });
        };
        // A dimension the shape lacks is a checkpoint that is not a Wan DiT, not a panic.
        let dim_of = |name: &str, i: usize| -> Result<usize> {
            let dims = shape(name)?;
            dims.get(i).copied().ok_or_else(|| Error::DitConfig {
                reason: format!(
                    "{name} has shape {dims:?}, expected at least {} dimensions",
                    i + 1
                ),
            })
        };
        let text_dim = dim_of("text_embedding.0.weight", 1)?;
        let freq_dim = dim_of("time_embedding.0.weight", 1)?;
        let ffn_dim = dim_of("blocks.0.ffn.0.bias", 0)?;
        let head_out = dim_of("head.head.bias", 0)?;
        let num_layers = (0..)
            .take_while(|i| vb.contains_tensor(&format!("blocks.{i}.modulation")))
            .count();
        const HEAD_DIM: usize = 128;
        if dim % HEAD_DIM != 0 {
            return Err(Error::DitConfig {
                reason: format!(
                    "dim {dim} is not a multiple of 128, so the head count cannot be derived \
                     from the shapes; pass the diffusers config.json (--config)"
                ),
            });
        }
        let patch_volume = pt
            .checked_mul(ph)
            .and_then(|v| v.checked_mul(pw))
            .unwrap_or(0)
            .max(1);
        let cfg = Self {
            dim,
            ffn_dim,
            num_heads: dim / HEAD_DIM,
            num_layers,
            in_channels,
            out_channels: head_out / patch_volume,
            text_dim,
            freq_dim,
            patch_size: [pt, ph, pw],
            eps: 1e-6,
            rope_max_seq_len: 1024,
            image_dim,
            image_tokens,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// **Estimated** device bytes one forward of `batch` samples of `tokens` tokens in `dtype`
    /// needs on top of the weights, run as `execution` says (its attention kernel, at most
    /// `attention_scratch` bytes of scores where the chunked path runs, its token slices), on
    /// CUDA or not (`on_cuda`): the larger of the two live sets inside a block, self-attention
    /// and the FFN. An estimate from
    /// the code's structure, not a measurement (`dit_bench` reports the measured peak next to
    /// it). Saturates at `u64::MAX` (more than any budget) for sizes whose product does not
    /// fit.
    pub fn activation_bytes_estimate(
        &self,
        dtype: DType,
        batch: usize,
        tokens: usize,
        execution: &Execution,
        on_cuda: bool,
    ) -> u64 {
        let token_slices = execution.token_slices;
        let attention_scratch = match execution.attention {
            AttentionKernel::Chunked => execution.attention_scratch,
            AttentionKernel::Cudnn | AttentionKernel::Fused | AttentionKernel::CudnnFp8 => 0,
        };
        let elem = dtype.size_in_bytes() as u64;
        let token_row = (batch as u64)
            .saturating_mul(tokens as u64)
            .saturating_mul(elem);
        let (d, f) = (self.dim as u64, self.ffn_dim as u64);
        let all_scores =
            QueryChunk::bytes_per_row(batch, self.num_heads, tokens, self.head_dim(), dtype)
                .saturating_mul(tokens as u64);
        let slices = token_slices.max(1) as u64;
        // Whole: the residual stream, its normed copy, q, k and v while they are made (a
        // projection and its normed output live together), then q, k, v and the output: six
        // token-sized tensors, and half of one more for the step's own (measured on the H200,
        // 32,760 tokens, bf16: 3.95 GiB at B=2 batched, 2.05 GiB at B=1). In slices: the
        // residual, q, k and v, the output taking the queries' memory, plus one slice's
        // normed input, projection, norm and rotation. vpipe's fused kernel writes over the
        // queries at once and holds one tensor more (measured: 1.73 GiB at B=1 in 8 slices,
        // 5.5 token-sized tensors); cuDNN's writes one query slice's output at a time (one
        // slice more; measured: 1.48 GiB at B=1 in 8 slices, 4.7 tensors). The chunked path is
        // counted as the fused kernel, with one slice's output more. Whole, cuDNN's attention
        // holds less: its output is a fresh token-major tensor that the output projection
        // reads as it is (measured with the 14B at 32,760 tokens, bf16: 3.78 GiB at B=2, 1.895
        // GiB at B=1, 6.05 token-sized tensors; counted as 6.1). In float8, cuDNN's attention
        // reads float8 copies of q, k and v made beside them (half a token-sized tensor each in
        // a 16-bit dtype; an estimate, not yet measured).
        // Per kernel: (whole, held whole in slices, one slice's own output).
        let (whole_row, held_in_slices, own_output) = match execution.attention {
            AttentionKernel::Fused => ((13 * d).div_ceil(2), 5 * d, 0),
            AttentionKernel::Cudnn => ((61 * d).div_ceil(10), 4 * d, d.div_ceil(slices)),
            AttentionKernel::CudnnFp8 => (
                (61 * d).div_ceil(10) + (3 * d).div_ceil(2),
                4 * d + (3 * d).div_ceil(2),
                d.div_ceil(slices),
            ),
            AttentionKernel::Chunked => ((13 * d).div_ceil(2), 5 * d, d.div_ceil(slices)),
        };
        let attention_row = match slices {
            1 => whole_row,
            n => held_in_slices
                .saturating_add(own_output)
                .saturating_add((5 * d).div_ceil(n)),
        };
        let attention = token_row
            .saturating_mul(attention_row)
            .saturating_add(attention_scratch.min(all_scores));
        // Whole: the residual, its normed copy, the output, the new residual and the hidden
        // state. On CUDA the linear layers add their bias and GELU to the matrix product
        // without another token-sized tensor (in its epilogue, else in place over it), and
        // each intermediate is freed once the next is made, so the most that
        // lives at once is the residual, the hidden state and one token-sized tensor (its
        // normed copy, then the output): 2·dim + ffn_dim, under the whole forward's measured
        // peak above for the 14B (4.7 against 6.05 token-sized tensors). In slices: the
        // residual and the slices done so far, plus one slice's copy, normed copy, hidden
        // state and output; then the slices and their concatenation. In float8 the second
        // product reads a float8 copy of the hidden state (half its bytes in a 16-bit dtype)
        // and of its weight (dim × ffn_dim bytes), made beside them.
        let (f, fp8_weight) = match execution.matmul {
            MatmulPrecision::Exact => (f, 0),
            MatmulPrecision::Fp8 => (f + f.div_ceil(2), d.saturating_mul(self.ffn_dim as u64)),
        };
        let ffn_row = match slices {
            1 if on_cuda => d.saturating_mul(2).saturating_add(f),
            1 => d.saturating_mul(4).saturating_add(f),
            n => (2 * d + (3 * d + f).div_ceil(n)).max(3 * d),
        };
        let ffn = token_row.saturating_mul(ffn_row).saturating_add(fp8_weight);
        attention.max(ffn)
    }

    /// Parameter count of the text-to-video model (used for memory plans); `u64::MAX` for a
    /// configuration whose count does not fit (which [`Self::validate`] refuses).
    pub fn parameter_count(&self) -> u64 {
        self.checked_parameter_count().unwrap_or(u64::MAX)
    }

    /// Parameters of the text and time embeddings' larger weights, which a streamed model
    /// takes from its source at each forward ([`dit_keys::is_source_embedding`]).
    pub fn source_embedding_parameter_count(&self) -> u64 {
        let (d, t) = (self.dim as u64, self.text_dim as u64);
        (t * d + d) + (d * d + d) + (d * d + d) + (d * 6 * d + 6 * d)
    }

    /// Parameter count of one transformer block (what one block of a stream moves);
    /// `u64::MAX` when it does not fit.
    pub fn block_parameter_count(&self) -> u64 {
        self.checked_block_parameter_count().unwrap_or(u64::MAX)
    }

    fn checked_block_parameter_count(&self) -> Option<u64> {
        let (d, f) = (self.dim as u64, self.ffn_dim as u64);
        let linear = |i: u64, o: u64| i.checked_mul(o)?.checked_add(o);
        // Image-to-video: the image keys and values and their norm.
        let image = match self.image_dim {
            Some(_) => linear(d, d)?.checked_mul(2)?.checked_add(d)?,
            None => 0,
        };
        [
            image,
            linear(d, d)?.checked_mul(8)?,
            d.checked_mul(12)?,
            linear(d, f)?,
            linear(f, d)?,
        ]
        .into_iter()
        .try_fold(0u64, u64::checked_add)
    }

    /// The parameter count, or `None` when it does not fit in a `u64`.
    fn checked_parameter_count(&self) -> Option<u64> {
        let d = self.dim as u64;
        let linear = |i: u64, o: u64| i.checked_mul(o)?.checked_add(o);
        let [pt, ph, pw] = self.patch_size.map(|v| v as u64);
        let patch_volume = pt.checked_mul(ph)?.checked_mul(pw)?;
        let patch = (self.in_channels as u64)
            .checked_mul(patch_volume)?
            .checked_mul(d)?
            .checked_add(d)?;
        let embed = [
            linear(self.text_dim as u64, d)?,
            linear(d, d)?,
            linear(self.freq_dim as u64, d)?,
            linear(d, d)?,
            linear(d, d.checked_mul(6)?)?,
        ]
        .into_iter()
        .try_fold(0u64, u64::checked_add)?;
        let block = self.checked_block_parameter_count()?;
        // Image-to-video: the image embedding (norm, two linear layers, norm).
        let image = match self.image_dim.map(|i| i as u64) {
            Some(i) => [
                i.checked_mul(2)?,
                (self.image_tokens.unwrap_or(0) as u64).checked_mul(i)?,
                linear(i, i)?,
                linear(i, d)?,
                d.checked_mul(2)?,
            ]
            .into_iter()
            .try_fold(0u64, u64::checked_add)?,
            None => 0,
        };
        let head = linear(d, (self.out_channels as u64).checked_mul(patch_volume)?)?
            .checked_add(d.checked_mul(2)?)?;
        patch
            .checked_add(embed)?
            .checked_add(image)?
            .checked_add((self.num_layers as u64).checked_mul(block)?)?
            .checked_add(head)
    }
}

/// The fields of diffusers' `WanTransformer3DModel` config that matter here, with diffusers'
/// defaults.
#[derive(Debug, Deserialize)]
struct DiffusersConfig {
    #[serde(default = "default_patch")]
    patch_size: [usize; 3],
    #[serde(default = "default_heads")]
    num_attention_heads: usize,
    #[serde(default = "default_head_dim")]
    attention_head_dim: usize,
    #[serde(default = "default_channels")]
    in_channels: usize,
    #[serde(default)]
    out_channels: Option<usize>,
    #[serde(default = "default_text_dim")]
    text_dim: usize,
    #[serde(default = "default_freq_dim")]
    freq_dim: usize,
    #[serde(default = "default_ffn_dim")]
    ffn_dim: usize,
    #[serde(default = "default_heads")]
    num_layers: usize,
    #[serde(default = "default_true")]
    cross_attn_norm: bool,
    #[serde(default = "default_qk_norm")]
    qk_norm: Option<String>,
    #[serde(default = "default_eps")]
    eps: f64,
    #[serde(default)]
    image_dim: Option<usize>,
    #[serde(default)]
    added_kv_proj_dim: Option<usize>,
    #[serde(default)]
    pos_embed_seq_len: Option<usize>,
    #[serde(default = "default_rope_len")]
    rope_max_seq_len: usize,
}

fn default_patch() -> [usize; 3] {
    [1, 2, 2]
}
fn default_heads() -> usize {
    40
}
fn default_head_dim() -> usize {
    128
}
fn default_channels() -> usize {
    16
}
fn default_text_dim() -> usize {
    4096
}
fn default_freq_dim() -> usize {
    256
}
fn default_ffn_dim() -> usize {
    13824
}
fn default_true() -> bool {
    true
}
fn default_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".into())
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_len() -> usize {
    1024
}

/// RMS norm over the last dimension with a learned gain (q/k norm across all heads).
#[derive(Debug, Clone)]
struct RmsNorm {
    /// shape [dim]
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: get_in_dtype(&vb, dim, "weight", vb.dtype())?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            x,
            &self.weight.to_dtype(x.dtype())?,
            self.eps,
        )?)
    }
}

/// Per-token cos/sin of the 3D rotary embedding, for one latent grid.
#[derive(Debug, Clone)]
pub struct Rope {
    /// shape [L, head_dim / 2], f32
    pub cos: Tensor,
    /// shape [L, head_dim / 2], f32
    pub sin: Tensor,
}

impl Rope {
    /// The tables for a grid of `frames × height × width` tokens, in token order (frame-major),
    /// with the head dimension's complex pairs split between the axes as
    /// `[D − 4·(D/6), 2·(D/6), 2·(D/6)]` real dimensions (128 → 44/42/42) and θ = 10000.
    /// Computed in f64 as the reference does, stored as f32.
    ///
    /// # Errors
    /// An empty grid, an axis longer than `max_len`, or more than [`MAX_TOKENS`] tokens
    /// ([`Error::DitInput`] of `hidden_states`), before any table is allocated.
    pub fn new(head_dim: usize, grid: [usize; 3], max_len: usize, device: &Device) -> Result<Self> {
        let hw = 2 * (head_dim / 6);
        let axis_dims = [head_dim - 2 * hw, hw, hw];
        let refuse = |reason: String| {
            Err(Error::DitInput {
                tensor: "hidden_states",
                reason,
            })
        };
        if grid.contains(&0) {
            return refuse(format!("the token grid {grid:?} is empty"));
        }
        if let Some(axis) = grid.iter().position(|&n| n > max_len) {
            return refuse(format!(
                "the token grid {grid:?} exceeds the RoPE table length {max_len} on axis {axis}"
            ));
        }
        let tokens = grid
            .iter()
            .try_fold(1usize, |product, &n| product.checked_mul(n))
            .filter(|&tokens| tokens <= MAX_TOKENS);
        let Some(tokens) = tokens else {
            return refuse(format!(
                "the token grid {grid:?} has more than {MAX_TOKENS} tokens per sample"
            ));
        };
        let pairs = head_dim / 2;
        // Each table holds tokens × pairs f32; bounded as for the longest grid of 128-wide heads.
        const MAX_ENTRIES: usize = MAX_TOKENS * 64;
        if tokens.checked_mul(pairs).is_none_or(|n| n > MAX_ENTRIES) {
            return refuse(format!(
                "RoPE tables of {tokens} tokens × {pairs} pairs exceed {MAX_ENTRIES} entries"
            ));
        }
        // For each axis and pair: the rotation frequency.
        let freqs: Vec<Vec<f64>> = axis_dims
            .iter()
            .map(|&d| {
                (0..d / 2)
                    .map(|i| 1.0 / 10000f64.powf((2 * i) as f64 / d as f64))
                    .collect()
            })
            .collect();
        let mut cos = Vec::with_capacity(tokens * pairs);
        let mut sin = Vec::with_capacity(tokens * pairs);
        for f in 0..grid[0] {
            for h in 0..grid[1] {
                for w in 0..grid[2] {
                    for (axis, pos) in [f, h, w].into_iter().enumerate() {
                        for &freq in &freqs[axis] {
                            let angle = pos as f64 * freq;
                            cos.push(angle.cos() as f32);
                            sin.push(angle.sin() as f32);
                        }
                    }
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (tokens, pairs), device)?,
            sin: Tensor::from_vec(sin, (tokens, pairs), device)?,
        })
    }

    /// The tables of tokens `start..start + len`.
    fn tokens(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            cos: self.cos.narrow(0, start, len)?,
            sin: self.sin.narrow(0, start, len)?,
        })
    }

    /// [`RmsNorm::forward`] of `x` then [`Self::heads`], in one pass on CUDA where the fused
    /// kernel takes the operands.
    ///
    /// # Shapes
    /// - `x`: [B, L, H·D] → [B, H, L, D] (contiguous), `x`'s dtype.
    fn normed_heads(&self, x: &Tensor, norm: &RmsNorm, heads: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if fused(x) {
            let weight = norm.weight.to_dtype(x.dtype())?;
            let fused = crate::ops::fused::rms_rope_heads(
                x,
                (&weight, norm.eps),
                (&self.cos, &self.sin),
                heads,
            )?;
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        self.heads(&norm.forward(x)?, heads)
    }

    /// Splits `x` into heads and rotates its interleaved pairs, in f32.
    ///
    /// # Shapes
    /// - `x`: [B, L, H·D] → [B, H, L, D] (contiguous), `x`'s dtype.
    fn heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if fused(x) {
            return Ok(crate::ops::fused::rope_heads(
                x, &self.cos, &self.sin, heads,
            )?);
        }
        let (b, l, hd) = x.dims3()?;
        let split = x
            .reshape((b, l, heads, hd / heads))?
            .transpose(1, 2)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let rotated = candle_nn::rotary_emb::rope_i(&split, &self.cos, &self.sin)?;
        Ok(rotated.to_dtype(x.dtype())?)
    }
}

/// Self- or cross-attention with q/k RMS norm across all heads.
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    num_heads: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            q: Linear::new(d, d, true, vb.pp("q"))?,
            k: Linear::new(d, d, true, vb.pp("k"))?,
            v: Linear::new(d, d, true, vb.pp("v"))?,
            o: Linear::new(d, d, true, vb.pp("o"))?,
            norm_q: RmsNorm::new(d, cfg.eps, vb.pp("norm_q"))?,
            norm_k: RmsNorm::new(d, cfg.eps, vb.pp("norm_k"))?,
            num_heads: cfg.num_heads,
        })
    }

    /// [B, L, dim] → [B, heads, L, head_dim], as a view: the fused attention kernel reads
    /// token-major heads in place, the chunked path copies what it needs.
    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        Ok(x.reshape((b, l, self.num_heads, d / self.num_heads))?
            .transpose(1, 2)?)
    }

    /// `input` (the normed tokens, made ready for the products: [`norm_modulate_input`]) is
    /// taken by value so that it is freed as soon as the queries, keys and values are made,
    /// before the attention itself (one token-sized tensor less at its peak).
    /// With `image` (image-to-video's cross-attention), the queries also attend to the image
    /// context through its own keys and values, and the two results are added.
    ///
    /// # Shapes
    /// - `input`: [B, L, dim]; `context`: [B, Lc, dim] for cross-attention, `None` for self;
    ///   the image context [B, Li, dim].
    /// - output: [B, L, dim]
    ///
    /// With a token `shard` (self-attention only), `x` is this rank's shard of the tokens and
    /// the attention runs over every rank's tokens ([`TokenShard::attend`]).
    fn forward(
        &self,
        input: LinearInput,
        (context, image): (Option<&Tensor>, Option<(&ImageKeys, &Tensor)>),
        (rope, shard): (Option<&Rope>, Option<&TokenShard>),
        (how, matmul): (Attend, MatmulPrecision),
    ) -> Result<Tensor> {
        // Each intermediate lives only inside its block: the token-sized tensors are what
        // bounds the activation peak (see `Config::activation_bytes_estimate`).
        let split = |t: Tensor, norm: &RmsNorm| match rope {
            Some(rope) => rope.normed_heads(&t, norm, self.num_heads),
            None => self.heads(&norm.forward(&t)?),
        };
        // One input for the queries', keys' and values' products (in float8, quantised once).
        let (q, k, v) = {
            let context = context.map(|c| LinearInput::new(c, matmul)).transpose()?;
            let kv_input = context.as_ref().unwrap_or(&input);
            let q = split(self.q.forward_prepared(&input)?, &self.norm_q)?;
            let k = split(self.k.forward_prepared(kv_input)?, &self.norm_k)?;
            let v = self.heads(&self.v.forward_prepared(kv_input)?)?;
            (q, k, v)
        };
        drop(input);
        if shard.is_none() && image.is_none() {
            // The output straight into the projection's input (in float8 where both paths
            // are: the 16-bit output is never written).
            let projected = attention_projection_input(&q, &k, &v, how, matmul)?;
            drop((q, k, v));
            return Ok(self.o.forward_prepared(&projected)?);
        }
        let mut out = match shard {
            None => attention(&q, &k, &v, how)?,
            Some(shard) => shard.attend(q.clone(), &k, &v, |q, k, v| attention(&q, k, v, how))?,
        };
        drop((k, v));
        if let Some((keys, image)) = image {
            let image = LinearInput::new(image, matmul)?;
            let k = self.heads(&keys.norm_k.forward(&keys.k.forward_prepared(&image)?)?)?;
            let v = self.heads(&keys.v.forward_prepared(&image)?)?;
            out = (out + attention(&q, &k, &v, how)?)?;
        }
        drop(q);
        let (b, h, l, hd) = out.dims4()?;
        let out = out.transpose(1, 2)?.reshape((b, l, h * hd))?;
        Ok(self.o.forward_in(&out, matmul)?)
    }

    /// Self-attention of the residual stream `x` normed by `norm` (given a slice of `x` and
    /// the index of its first token), with q, k and v made
    /// `slices` token slices at a time into their full tensors, so that the normed input and
    /// the projections' intermediates exist for one slice at a time; the attention's output
    /// then takes the queries' memory ([`attention_over_query`]). At its peak: `x`, q, k and
    /// v. The same values as [`Self::forward`] of `norm(x)`: every step is per token.
    ///
    /// # Shapes
    /// - `x`: [B, L, dim]; output: [B, L, dim].
    fn forward_self_sliced(
        &self,
        x: &Tensor,
        norm: &dyn Fn(&Tensor, usize) -> Result<LinearInput>,
        (rope, shard): (&Rope, Option<&TokenShard>),
        (how, matmul): (Attend, MatmulPrecision),
        slices: usize,
    ) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let (heads, hd) = (self.num_heads, d / self.num_heads);
        let q = Tensor::zeros((b, heads, l, hd), x.dtype(), x.device())?;
        let k = Tensor::zeros((b, heads, l, hd), x.dtype(), x.device())?;
        let v = Tensor::zeros((b, l, d), x.dtype(), x.device())?;
        let size = l.div_ceil(slices.max(1)).max(1);
        for start in (0..l).step_by(size) {
            let len = size.min(l - start);
            let h = norm(&x.narrow(1, start, len)?.contiguous()?, start)?;
            let rope = rope.tokens(start, len)?;
            let project = |linear: &Linear, norm: &RmsNorm| -> Result<Tensor> {
                rope.normed_heads(&linear.forward_prepared(&h)?, norm, heads)
            };
            q.slice_set(&project(&self.q, &self.norm_q)?, 2, start)?;
            k.slice_set(&project(&self.k, &self.norm_k)?, 2, start)?;
            v.slice_set(&self.v.forward_prepared(&h)?.contiguous()?, 1, start)?;
        }
        let v = self.heads(&v)?;
        let over_query = |q, k: &Tensor, v: &Tensor| attention_over_query(q, k, v, how, slices);
        let attended = match shard {
            None => over_query(q, &k, &v)?,
            Some(shard) => shard.attend(q, &k, &v, over_query)?,
        };
        drop((k, v));
        // The head-major output copied token-major; the queries' memory is freed before the
        // output projection.
        let out = attended.transpose(1, 2)?.reshape((b, l, d))?;
        drop(attended);
        Ok(self.o.forward_in(&out, matmul)?)
    }
}

/// The parts of a transformer block, in the order a forward runs them. A stream may move a
/// block's weights one part at a time, so that its arena holds a part per slot rather than
/// a whole block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockPart {
    /// `self_attn.*` and the block's `modulation` table.
    SelfAttention,
    /// `cross_attn.*` and its norm (`norm3`).
    CrossAttention,
    /// `ffn.*`.
    FeedForward,
}

impl BlockPart {
    /// Every part, in the order a forward runs them.
    pub const ALL: [BlockPart; 3] = [
        BlockPart::SelfAttention,
        BlockPart::CrossAttention,
        BlockPart::FeedForward,
    ];

    /// The part's place in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The part a block's tensor belongs to, from its original Wan name inside the block
    /// (`self_attn.q.weight`, `modulation`, `norm3.bias`, `ffn.0.weight`); `None` for a name
    /// of no part.
    pub fn of(name_in_block: &str) -> Option<Self> {
        let module = name_in_block.split('.').next()?;
        match module {
            "self_attn" | "modulation" => Some(Self::SelfAttention),
            "cross_attn" | "norm3" => Some(Self::CrossAttention),
            "ffn" => Some(Self::FeedForward),
            _ => None,
        }
    }
}

/// A block's self-attention and the modulation table its timestep conditioning adds to.
#[derive(Debug, Clone)]
struct SelfAttentionPart {
    attn: Attention,
    /// shape [1, 6, dim], f32
    modulation: Tensor,
}

impl SelfAttentionPart {
    /// `vb`: the block's (`blocks.{i}`).
    fn new(cfg: &Config, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            attn: Attention::new(cfg, vb.pp("self_attn"))?,
            modulation: get_in_dtype(vb, (1, 6, cfg.dim), "modulation", DType::F32)?,
        })
    }

    /// Updates the pass's residual stream, and sets the block's modulation (the table plus
    /// the timestep's projection) that the feed-forward part reads.
    fn forward(&self, pass: &mut Embedded, run: &BlockRun, how: Attend) -> Result<()> {
        let m = self.modulation.broadcast_add(&pass.time)?;
        let modulation = Modulation::new(&m, 0, true, pass.runs.as_deref())?;
        let norm = |x: &Tensor, start: usize| modulation.norm_input(x, start, run.eps, run.matmul);
        // Scoped so that the attention's output is freed before the residual is replaced (a
        // shadowed binding would live to the end of the function).
        let x = {
            let y = if run.token_slices > 1 {
                self.attn.forward_self_sliced(
                    &pass.x,
                    &norm,
                    (run.rope, run.shard),
                    (how, run.matmul),
                    run.token_slices,
                )?
            } else {
                self.attn.forward(
                    norm(&pass.x, 0)?,
                    (None, None),
                    (Some(run.rope), run.shard),
                    (how, run.matmul),
                )?
            };
            modulation.gated_residual(&pass.x, &y)?
        };
        pass.x = x;
        pass.block_modulation = Some(m);
        Ok(())
    }
}

/// Image-to-video's keys and values of the image context in a block's cross-attention.
#[derive(Debug, Clone)]
struct ImageKeys {
    k: Linear,
    v: Linear,
    /// RMS norm across the heads, as the text keys have.
    norm_k: RmsNorm,
}

/// A block's cross-attention to the text (and, for image-to-video, to the image) and its
/// affine norm (diffusers `norm2`).
#[derive(Debug, Clone)]
struct CrossAttentionPart {
    attn: Attention,
    image: Option<ImageKeys>,
    /// shape [dim] each
    norm_weight: Tensor,
    norm_bias: Tensor,
}

impl CrossAttentionPart {
    /// `vb`: the block's (`blocks.{i}`).
    fn new(cfg: &Config, vb: &VarBuilder) -> Result<Self> {
        let attn = vb.pp("cross_attn");
        let d = cfg.dim;
        let image = cfg
            .image_dim
            .map(|_| -> Result<ImageKeys> {
                Ok(ImageKeys {
                    k: Linear::new(d, d, true, attn.pp("k_img"))?,
                    v: Linear::new(d, d, true, attn.pp("v_img"))?,
                    norm_k: RmsNorm::new(d, cfg.eps, attn.pp("norm_k_img"))?,
                })
            })
            .transpose()?;
        Ok(Self {
            attn: Attention::new(cfg, attn)?,
            image,
            norm_weight: get_in_dtype(&vb.pp("norm3"), d, "weight", DType::F32)?,
            norm_bias: get_in_dtype(&vb.pp("norm3"), d, "bias", DType::F32)?,
        })
    }

    fn forward(&self, pass: &mut Embedded, how: Attend, run: &BlockRun) -> Result<()> {
        let image = match (&self.image, &pass.image) {
            (Some(keys), Some(image)) => Some((keys, image)),
            (None, None) => None,
            _ => {
                return Err(Error::DitInput {
                    tensor: "encoder_hidden_states_image",
                    reason: "the image context and the image-to-video weights go together".into(),
                })
            }
        };
        let x = {
            let h = norm_modulate_input(
                &pass.x,
                (&self.norm_weight, &self.norm_bias, run.eps),
                run.matmul,
            )?;
            let y = self.attn.forward(
                h,
                (Some(&pass.context), image),
                (None, None),
                (how, run.matmul),
            )?;
            residual(&pass.x, &y)?
        };
        pass.x = x;
        Ok(())
    }
}

/// A block's gated feed-forward network.
#[derive(Debug, Clone)]
struct FeedForwardPart {
    ffn_in: Linear,
    ffn_out: Linear,
}

impl FeedForwardPart {
    /// `vb`: the block's (`blocks.{i}`).
    fn new(cfg: &Config, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            ffn_in: Linear::new(cfg.dim, cfg.ffn_dim, true, vb.pp("ffn.0"))?,
            ffn_out: Linear::new(cfg.ffn_dim, cfg.dim, true, vb.pp("ffn.2"))?,
        })
    }

    /// Runs over `slices` slices of the tokens in turn (1: all at once), so that the
    /// `ffn_dim`-wide hidden state exists for one slice at a time; a slice that spans tokens
    /// of different timesteps runs as one piece per timestep.
    fn forward(&self, pass: &mut Embedded, run: &BlockRun) -> Result<()> {
        let (slices, eps, matmul) = (run.token_slices, run.eps, run.matmul);
        let m = pass
            .block_modulation
            .take()
            .ok_or_else(|| Error::DitInput {
                tensor: "blocks",
                reason: "a block's feed-forward part ran before its self-attention".into(),
            })?;
        let modulation = Modulation::new(&m, 3, true, pass.runs.as_deref())?;
        let ffn = |x: &Tensor, run: &ModulationRun| -> Result<Tensor> {
            let h = norm_modulate_input(x, (&run.scale, &run.shift, eps), matmul)?;
            let hidden = self.ffn_in.forward_gelu_prepared(&h)?;
            drop(h);
            let y = self.ffn_out.forward_in(&hidden, matmul)?;
            drop(hidden);
            gated_residual(x, &y, run.gate()?)
        };
        let tokens = pass.x.dim(1)?;
        let size = if slices <= 1 || tokens < 2 {
            tokens
        } else {
            tokens.div_ceil(slices)
        };
        let pieces: Vec<_> = (0..tokens)
            .step_by(size.max(1))
            .flat_map(|start| modulation.pieces(start, size.min(tokens - start)))
            .collect();
        pass.x = match pieces[..] {
            [(0, len, run)] if len == tokens => ffn(&pass.x, run)?,
            _ => {
                let parts = pieces
                    .iter()
                    .map(|&(start, len, run)| {
                        ffn(&pass.x.narrow(1, start, len)?.contiguous()?, run)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 1)?
            }
        };
        Ok(())
    }
}

/// One transformer block: its three parts.
#[derive(Debug, Clone)]
struct Block {
    self_attn: SelfAttentionPart,
    cross_attn: CrossAttentionPart,
    ffn: FeedForwardPart,
}

impl Block {
    /// `vb`: the block's (`blocks.{i}`).
    fn new(cfg: &Config, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: SelfAttentionPart::new(cfg, vb)?,
            cross_attn: CrossAttentionPart::new(cfg, vb)?,
            ffn: FeedForwardPart::new(cfg, vb)?,
        })
    }

    fn part(&self, part: BlockPart) -> PartRef<'_> {
        match part {
            BlockPart::SelfAttention => PartRef::SelfAttention(&self.self_attn),
            BlockPart::CrossAttention => PartRef::CrossAttention(&self.cross_attn),
            BlockPart::FeedForward => PartRef::FeedForward(&self.ffn),
        }
    }
}

/// One part of a block, built on its own from a stream's weights.
enum OwnedPart {
    SelfAttention(SelfAttentionPart),
    CrossAttention(CrossAttentionPart),
    FeedForward(FeedForwardPart),
}

impl OwnedPart {
    /// `vb`: the block's (`blocks.{i}`).
    fn new(part: BlockPart, cfg: &Config, vb: &VarBuilder) -> Result<Self> {
        Ok(match part {
            BlockPart::SelfAttention => Self::SelfAttention(SelfAttentionPart::new(cfg, vb)?),
            BlockPart::CrossAttention => Self::CrossAttention(CrossAttentionPart::new(cfg, vb)?),
            BlockPart::FeedForward => Self::FeedForward(FeedForwardPart::new(cfg, vb)?),
        })
    }

    fn as_ref(&self) -> PartRef<'_> {
        match self {
            Self::SelfAttention(p) => PartRef::SelfAttention(p),
            Self::CrossAttention(p) => PartRef::CrossAttention(p),
            Self::FeedForward(p) => PartRef::FeedForward(p),
        }
    }
}

/// A block part, held by the model or built from a stream.
#[derive(Clone, Copy)]
enum PartRef<'a> {
    SelfAttention(&'a SelfAttentionPart),
    CrossAttention(&'a CrossAttentionPart),
    FeedForward(&'a FeedForwardPart),
}

/// What every part of every block of one forward shares.
struct BlockRun<'a> {
    /// The tables of the tokens the passes hold (this rank's shard under sequence
    /// parallelism).
    rope: &'a Rope,
    /// Sequence parallelism: which of every rank's tokens the passes hold.
    shard: Option<&'a TokenShard<'a>>,
    /// How each pass's attention runs (self, cross).
    attends: &'a [(Attend, Attend)],
    token_slices: usize,
    matmul: MatmulPrecision,
    eps: f64,
}

/// Sequence parallelism (Ulysses): the tokens of one forward cut into one contiguous shard per
/// rank of `comm`, in rank order, each padded at its end to `len` tokens (the last shards
/// may hold only part of `len` real tokens, or none) so that the collectives move tensors of
/// one shape on every rank, as NCCL's need. Everything per token (the norms, projections,
/// cross-attention, FFN, modulation, head) runs on the rank's own shard; only the
/// self-attention needs every token, and gets them through two all-to-alls
/// ([`Self::attend`]). Padding tokens are carried through the per-token work and never
/// attended to.
struct TokenShard<'a> {
    comm: &'a dyn Communicator,
    /// Every rank's tokens together (L).
    tokens: usize,
    /// Tokens per rank, padding included: ⌈L / N⌉.
    len: usize,
}

impl<'a> TokenShard<'a> {
    /// The shard of `comm`'s rank of `tokens` tokens of a model with `heads` heads.
    ///
    /// # Errors
    /// [`Error::DitConfig`] when the heads do not divide among the ranks.
    fn new(comm: &'a dyn Communicator, tokens: usize, heads: usize) -> Result<Self> {
        check_heads_divide(comm, heads)?;
        Ok(Self {
            comm,
            tokens,
            len: tokens.div_ceil(comm.world_size()),
        })
    }

    /// The first of the rank's tokens.
    fn start(&self) -> usize {
        self.comm.rank() * self.len
    }

    /// The rank's real tokens (the rest of `len` is padding).
    fn real(&self) -> usize {
        self.len.min(self.tokens.saturating_sub(self.start()))
    }

    /// The rank's rows of `x` along `dim` (every token there), padded with zeros to `len`.
    fn local(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let real = x.narrow(dim, self.start().min(self.tokens), self.real())?;
        pad(&real, dim, self.len)
    }

    /// The rank's RoPE tables (the padding rows zero).
    fn rope(&self, rope: &Rope) -> Result<Rope> {
        Ok(Rope {
            cos: self.local(&rope.cos, 0)?,
            sin: self.local(&rope.sin, 0)?,
        })
    }

    /// Per-token timesteps' runs of every token, as runs of the rank's shard: each run cut to
    /// the shard (possibly empty), the last one covering the padding too, so that every run
    /// keeps its row of the modulation tables.
    fn runs(&self, runs: &[Range<usize>]) -> Vec<Range<usize>> {
        let (first, end) = (self.start(), self.start() + self.real());
        let local = |t: usize| t.clamp(first, end) - first;
        let mut local_runs: Vec<_> = runs
            .iter()
            .map(|run| local(run.start)..local(run.end))
            .collect();
        if let Some(last) = local_runs.last_mut() {
            last.end = self.len;
        }
        local_runs
    }

    /// Attention of this rank's tokens' queries over every rank's keys and values, by `core`:
    /// an all-to-all gives each rank every token of `H/N` of the heads, `core` attends over
    /// them (padding cut off), and another all-to-all gives each rank back every head of its
    /// own tokens.
    ///
    /// # Shapes
    /// - `q`, `k`, `v`: [B, H, len, D]; `core`'s operands [B, H/N, L, D], output the same.
    /// - output: [B, H, len, D].
    fn attend(
        &self,
        q: Tensor,
        k: &Tensor,
        v: &Tensor,
        core: impl FnOnce(Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let every_token = |x: &Tensor| -> Result<Tensor> {
            let x = self.comm.all_to_all(x, 1, 2)?;
            Ok(if x.dim(2)? == self.tokens {
                x
            } else {
                x.narrow(2, 0, self.tokens)?.contiguous()?
            })
        };
        let q = every_token(&q)?;
        let (k, v) = (every_token(k)?, every_token(v)?);
        let out = core(q, &k, &v)?;
        drop((k, v));
        let padded = pad(&out, 2, self.len * self.comm.world_size())?;
        Ok(self.comm.all_to_all(&padded, 2, 1)?)
    }

    /// Every rank's tokens of `x`, padding dropped.
    ///
    /// # Shapes
    /// - `x`: [B, len, C] → [B, L, C].
    fn gather(&self, x: &Tensor) -> Result<Tensor> {
        let every = self.comm.all_gather(&x.contiguous()?, 1)?;
        Ok(every.narrow(1, 0, self.tokens)?)
    }
}

/// `x` with zeros after its rows along `dim`, up to `to` rows.
fn pad(x: &Tensor, dim: usize, to: usize) -> Result<Tensor> {
    let rows = x.dim(dim)?;
    if rows >= to {
        return Ok(x.clone());
    }
    let mut zeros = x.dims().to_vec();
    zeros[dim] = to - rows;
    let zeros = Tensor::zeros(zeros, x.dtype(), x.device())?;
    Ok(Tensor::cat(&[x, &zeros], dim)?)
}

/// Refuses a sequence-parallel group among whose ranks the heads do not divide (each rank
/// attends with `heads / N` of them).
fn check_heads_divide(comm: &dyn Communicator, heads: usize) -> Result<()> {
    let ranks = comm.world_size();
    if ranks == 0 || !heads.is_multiple_of(ranks) {
        return Err(Error::DitConfig {
            reason: format!(
                "sequence parallelism over {ranks} ranks needs a head count that divides                  among them; the model has {heads} heads"
            ),
        });
    }
    Ok(())
}

impl PartRef<'_> {
    /// Runs every pass through this part.
    ///
    /// # Shapes
    /// Each pass's `x`: [B, L, dim] before and after.
    fn forward(self, passes: &mut [Embedded], run: &BlockRun) -> Result<()> {
        for (pass, attends) in passes.iter_mut().zip(run.attends) {
            match self {
                Self::SelfAttention(p) => p.forward(pass, run, attends.0)?,
                Self::CrossAttention(p) => p.forward(pass, attends.1, run)?,
                Self::FeedForward(p) => p.forward(pass, run)?,
            }
        }
        Ok(())
    }
}

/// Image-to-video's embedding of the CLIP image features into the model's width (diffusers
/// `WanImageEmbedding`): layer norm, linear, exact GELU, linear, layer norm; the norms in f32
/// with their affine weights.
#[derive(Debug, Clone)]
struct ImageEmbedding {
    /// First-last-frame to video: [1, tokens, image_dim], added to the features first.
    position: Option<Tensor>,
    norm_in: (Tensor, Tensor),
    proj_in: Linear,
    proj_out: Linear,
    norm_out: (Tensor, Tensor),
}

/// diffusers' `FP32LayerNorm` epsilon (PyTorch's default).
const IMAGE_NORM_EPS: f64 = 1e-5;

impl ImageEmbedding {
    /// `vb`: the model's (`img_emb.proj.*`).
    fn new(cfg: &Config, image_dim: usize, vb: &VarBuilder) -> Result<Self> {
        let dim = cfg.dim;
        let proj = vb.pp("img_emb.proj");
        let norm = |i: usize, n: usize| -> Result<(Tensor, Tensor)> {
            let vb = proj.pp(i.to_string());
            Ok((
                get_in_dtype(&vb, n, "weight", DType::F32)?,
                get_in_dtype(&vb, n, "bias", DType::F32)?,
            ))
        };
        Ok(Self {
            position: cfg
                .image_tokens
                .map(|tokens| {
                    get_in_dtype(
                        &vb.pp("img_emb"),
                        (1, tokens, image_dim),
                        "emb_pos",
                        DType::F32,
                    )
                })
                .transpose()?,
            norm_in: norm(0, image_dim)?,
            proj_in: Linear::new(image_dim, image_dim, true, proj.pp("1"))?,
            proj_out: Linear::new(image_dim, dim, true, proj.pp("3"))?,
            norm_out: norm(4, dim)?,
        })
    }

    /// # Shapes
    /// - `features`: [B, Li, image_dim] → [B, Li, dim] in `dtype`.
    fn forward(&self, features: &Tensor, dtype: DType) -> Result<Tensor> {
        let features = match &self.position {
            Some(position) => features.to_dtype(DType::F32)?.broadcast_add(position)?,
            None => features.clone(),
        };
        let features = &features;
        let h = norm_modulate(
            &features.to_dtype(dtype)?,
            &self.norm_in.0,
            &self.norm_in.1,
            IMAGE_NORM_EPS,
        )?;
        let h = self.proj_in.forward(&h)?.gelu_erf()?;
        let h = self.proj_out.forward(&h)?;
        norm_modulate(&h, &self.norm_out.0, &self.norm_out.1, IMAGE_NORM_EPS)
    }
}

/// Whether `x` lives where vpipe's fused CUDA kernels run.
#[cfg(feature = "cuda")]
fn fused(x: &Tensor) -> bool {
    x.device().is_cuda()
}

/// `LN(x) · mul + add` with LN without affine, all in f32, rounded once to `x`'s dtype
/// (diffusers' `FP32LayerNorm` followed by the modulation, or the affine cross-attention norm
/// with `mul`, `add` = its weight and bias).
///
/// # Shapes
/// - `x`: [B, L, D]; `mul`, `add`: f32, [B, 1, D], [1, 1, D] or [D].
fn norm_modulate(x: &Tensor, mul: &Tensor, add: &Tensor, eps: f64) -> Result<Tensor> {
    let (mul, add) = modulation_rows(x, mul, add)?;
    #[cfg(feature = "cuda")]
    if fused(x) {
        return Ok(crate::ops::fused::ln_modulate(x, &mul, &add, eps as f32)?);
    }
    let y = layer_norm_f32(x, eps)?
        .broadcast_mul(&mul)?
        .broadcast_add(&add)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// [`norm_modulate`] made ready for the products that read it ([`LinearInput`]): with float8
/// products on CUDA, quantised in the norm's own pass, where the kernel takes `x`.
fn norm_modulate_input(
    x: &Tensor,
    (mul, add, eps): (&Tensor, &Tensor, f64),
    matmul: MatmulPrecision,
) -> Result<LinearInput> {
    #[cfg(feature = "cuda")]
    if fused(x) && matmul == MatmulPrecision::Fp8 && matches!(x.dtype(), DType::BF16 | DType::F16) {
        let (mul, add) = modulation_rows(x, mul, add)?;
        let quantized =
            crate::ops::fp8::Fp8Rows::layer_norm_modulated(x, (&mul, &add, eps as f32))?;
        if let Some(rows) = quantized {
            return Ok(LinearInput::quantized(rows, x.dims()));
        }
    }
    Ok(LinearInput::new(&norm_modulate(x, mul, add, eps)?, matmul)?)
}

/// `mul` and `add` as [B or 1, 1, D] (a [D] vector as [1, 1, D]).
fn modulation_rows(x: &Tensor, mul: &Tensor, add: &Tensor) -> Result<(Tensor, Tensor)> {
    let d = x.dim(2)?;
    Ok(if mul.rank() == 1 {
        (mul.reshape((1, 1, d))?, add.reshape((1, 1, d))?)
    } else {
        (mul.clone(), add.clone())
    })
}

/// A block's (or the output norm's) modulation of a pass's tokens: shift, 1 + scale and, for a
/// block, the gate. With a timestep per sample it is one run over every token, which the fused
/// CUDA kernels take whole; with timesteps per token, one run per stretch of tokens whose
/// timesteps are equal in every sample ([`Timesteps::PerToken`]), each applied to its tokens
/// alone. Wan 2.2 TI2V's image-to-video has two such stretches (the first latent frame at 0,
/// the rest at the step's timestep), text-to-video one: the same work as a timestep per sample,
/// with B·R·6·dim f32 of modulation (R runs) rather than diffusers' B·L·6·dim: 4 B · 6 · 3072
/// = 72 KiB per token for the 5B, 1.9 GiB per sample at 720p's 27,280 tokens, plus as much
/// again for each block's table added to it in f32. A timestep that changes at every token
/// costs what diffusers' tables cost, and one set of kernels per token.
struct Modulation {
    runs: Vec<ModulationRun>,
}

/// The modulation of one stretch of tokens.
struct ModulationRun {
    /// The tokens it applies to (`0..usize::MAX`: every token).
    tokens: Range<usize>,
    /// [B, 1, dim], f32.
    shift: Tensor,
    /// 1 + scale, [B, 1, dim], f32.
    scale: Tensor,
    /// [B, 1, dim], f32; `None` for the output norm.
    gate: Option<Tensor>,
}

impl ModulationRun {
    fn gate(&self) -> Result<&Tensor> {
        self.gate.as_ref().ok_or_else(|| Error::DitInput {
            tensor: "blocks",
            reason: "the output norm's modulation has no gate".into(),
        })
    }
}

impl Modulation {
    /// Reads the runs from `m`, a table plus the timesteps' projection: [B, K, dim] for a
    /// timestep per sample (`runs` is `None`), [B, R, K, dim] for one row per run of `runs`.
    /// Shift, scale and (if `gated`) gate are chunks `first`, `first + 1` and `first + 2` of K.
    fn new(m: &Tensor, first: usize, gated: bool, runs: Option<&[Range<usize>]>) -> Result<Self> {
        let run = |m: &Tensor, tokens: Range<usize>| -> Result<ModulationRun> {
            Ok(ModulationRun {
                tokens,
                shift: m.narrow(1, first, 1)?,
                scale: (m.narrow(1, first + 1, 1)? + 1.0)?,
                gate: gated.then(|| m.narrow(1, first + 2, 1)).transpose()?,
            })
        };
        let runs = match runs {
            None => vec![run(m, 0..usize::MAX)?],
            Some(runs) => runs
                .iter()
                .enumerate()
                .map(|(r, tokens)| run(&m.narrow(1, r, 1)?.squeeze(1)?, tokens.clone()))
                .collect::<Result<_>>()?,
        };
        Ok(Self { runs })
    }

    /// Tokens `start..start + len` cut where the run changes: (first token, count, run).
    fn pieces(&self, start: usize, len: usize) -> Vec<(usize, usize, &ModulationRun)> {
        let end = start + len;
        self.runs
            .iter()
            .filter_map(|run| {
                let (first, last) = (run.tokens.start.max(start), run.tokens.end.min(end));
                (first < last).then(|| (first, last - first, run))
            })
            .collect()
    }

    /// `f` of each piece of `x` (and `y`), concatenated; `f` of `x` itself when one run
    /// covers it.
    ///
    /// # Shapes
    /// - `x`, `y`: [B, l, dim], tokens `start..start + l`.
    fn per_piece(
        &self,
        (x, y): (&Tensor, Option<&Tensor>),
        start: usize,
        f: impl Fn(&Tensor, Option<&Tensor>, &ModulationRun) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let len = x.dim(1)?;
        let pieces = self.pieces(start, len);
        if let [(first, n, run)] = pieces[..] {
            if first == start && n == len {
                return f(x, y, run);
            }
        }
        let parts = pieces
            .iter()
            .map(|&(first, n, run)| {
                let cut = |t: &Tensor| t.narrow(1, first - start, n)?.contiguous();
                f(&cut(x)?, y.map(cut).transpose()?.as_ref(), run)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// `LN(x) · (1 + scale) + shift`, each token with its run's ([`norm_modulate`]).
    ///
    /// # Shapes
    /// - `x`: [B, l, dim], tokens `start..start + l`; output: the same, in `x`'s dtype.
    fn norm(&self, x: &Tensor, start: usize, eps: f64) -> Result<Tensor> {
        self.per_piece((x, None), start, |x, _, run| {
            norm_modulate(x, &run.scale, &run.shift, eps)
        })
    }

    /// [`Self::norm`] made ready for the products that read it: in one pass
    /// ([`norm_modulate_input`]) where one run covers the tokens.
    ///
    /// # Shapes
    /// As [`Self::norm`].
    fn norm_input(
        &self,
        x: &Tensor,
        start: usize,
        eps: f64,
        matmul: MatmulPrecision,
    ) -> Result<LinearInput> {
        match self.pieces(start, x.dim(1)?)[..] {
            [(first, n, run)] if first == start && n == x.dim(1)? => {
                norm_modulate_input(x, (&run.scale, &run.shift, eps), matmul)
            }
            _ => Ok(LinearInput::new(&self.norm(x, start, eps)?, matmul)?),
        }
    }

    /// `x + y · gate`, each token with its run's gate ([`gated_residual`]).
    ///
    /// # Shapes
    /// - `x`, `y`: [B, L, dim] (every token); output: the same, in `x`'s dtype.
    fn gated_residual(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.per_piece((x, Some(y)), 0, |x, y, run| {
            let y = y.ok_or_else(|| Error::DitInput {
                tensor: "blocks",
                reason: "a gated residual without its update".into(),
            })?;
            gated_residual(x, y, run.gate()?)
        })
    }
}

/// `x + y`, one pass on CUDA.
fn residual(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) {
        return Ok(crate::ops::fused::residual(x, y)?);
    }
    Ok((x + y)?)
}

/// `x + y · gate` in f32, returned in `x`'s dtype.
fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) {
        return Ok(crate::ops::fused::gated_residual(x, y, gate)?);
    }
    let sum = x
        .to_dtype(DType::F32)?
        .add(&y.to_dtype(DType::F32)?.broadcast_mul(gate)?)?;
    Ok(sum.to_dtype(x.dtype())?)
}

/// A forward's timesteps, checked.
enum Timesteps {
    /// One per sample ([B]).
    PerSample(Vec<f32>),
    /// One per token ([B, L]), grouped into runs: the longest stretches of tokens whose
    /// timesteps are equal (bit for bit) in every sample. `values` holds each sample's value
    /// on each run, [B, R] row-major.
    PerToken {
        values: Vec<f32>,
        runs: Vec<Range<usize>>,
    },
}

impl Timesteps {
    /// The runs of `t`, [batch, tokens] row-major.
    fn per_token(t: &[f32], batch: usize, tokens: usize) -> Result<Self> {
        if t.len() != batch * tokens || tokens == 0 {
            return Err(Error::DitInput {
                tensor: "timestep",
                reason: format!("{} values for {batch} × {tokens} tokens", t.len()),
            });
        }
        let rows: Vec<&[f32]> = t.chunks(tokens).collect();
        let changes = |i: usize| {
            rows.iter()
                .any(|row| row[i].to_bits() != row[i - 1].to_bits())
        };
        let starts: Vec<usize> = std::iter::once(0)
            .chain((1..tokens).filter(|&i| changes(i)))
            .collect();
        let runs: Vec<Range<usize>> = starts
            .iter()
            .zip(starts.iter().skip(1).chain([&tokens]))
            .map(|(&start, &end)| start..end)
            .collect();
        let values = rows
            .iter()
            .flat_map(|row| runs.iter().map(|run| row[run.start]))
            .collect();
        Ok(Self::PerToken { values, runs })
    }
}

/// Diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`: `[cos, sin]` of
/// `t · 10000^(−i/half)`, computed in f32 operation by operation as diffusers does.
fn timestep_features(timestep: &[f32], freq_dim: usize, device: &Device) -> Result<Tensor> {
    let half = freq_dim / 2;
    let log_max = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (log_max * i as f32 / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(timestep.len() * freq_dim);
    for &t in timestep {
        out.extend(freqs.iter().map(|&f| (t * f).cos()));
        out.extend(freqs.iter().map(|&f| (t * f).sin()));
    }
    Ok(Tensor::from_vec(out, (timestep.len(), freq_dim), device)?)
}

/// Where a forward gets the weights of the blocks a [`WanModel`] does not hold (see
/// [`WanModel::from_checkpoint_partial`]): a stream of them through a fixed arena, for example.
pub trait BlockSource {
    /// The tensors of block `index`, named as in the checkpoint the model was built from, on
    /// `device`, as a `VarBuilder` in `dtype`. They need to stay valid only until the block's
    /// forward is done (the next call may reuse their memory).
    fn block(&mut self, index: usize, dtype: DType, device: &Device)
        -> Result<VarBuilder<'static>>;

    /// Whether the source gives a block one part at a time ([`Self::block_part`]) rather
    /// than whole ([`Self::block`]).
    fn gives_parts(&self) -> bool {
        false
    }

    /// The tensors of one part of block `index` ([`BlockPart::of`] says which tensors),
    /// as [`Self::block`] gives a whole block; valid until the part's forward is done.
    fn block_part(
        &mut self,
        index: usize,
        part: BlockPart,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        let _ = part;
        self.block(index, dtype, device)
    }

    /// The text and time embeddings' weights ([`dit_keys::is_source_embedding`]), for a model
    /// built without them, named and placed as [`Self::block`] gives a block's; valid until
    /// the embeddings are computed.
    fn embeddings(&mut self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let _ = (dtype, device);
        Err(Error::DitInput {
            tensor: "embeddings",
            reason: "the model was built without its text and time embeddings and the block \
                     source does not give them"
                .into(),
        })
    }
}

/// The source of a model that holds every block: asked for one, it fails.
pub struct HeldBlocks;

impl BlockSource for HeldBlocks {
    fn block(
        &mut self,
        index: usize,
        _dtype: DType,
        _device: &Device,
    ) -> Result<VarBuilder<'static>> {
        Err(Error::DitInput {
            tensor: "blocks",
            reason: format!("block {index} is not held by the model and no block source was given"),
        })
    }
}

/// The text embedding and the time embedding's larger weights (the projection to the blocks'
/// modulation among them): 0.43 GiB of the 14B in bf16, which a streamed model leaves on the
/// host and brings to the device once per forward.
#[derive(Debug, Clone)]
struct Embeddings {
    text_in: Linear,
    text_out: Linear,
    /// Kept in f32, as `time_in`.
    time_out: Linear,
    time_projection: Linear,
}

impl Embeddings {
    /// `vb`: the model's (original names).
    fn new(cfg: &Config, vb: &VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            text_in: Linear::new(cfg.text_dim, d, true, vb.pp("text_embedding.0"))?,
            text_out: Linear::new(d, d, true, vb.pp("text_embedding.2"))?,
            time_out: Linear::new_in(d, d, true, DType::F32, vb.pp("time_embedding.2"))?,
            time_projection: Linear::new(d, 6 * d, true, vb.pp("time_projection.1"))?,
        })
    }
}

/// One input's state between the embeddings and the head.
struct Embedded {
    /// The residual stream, [B, L, dim].
    x: Tensor,
    /// The timesteps' projection: [B, 6, dim] for a timestep per sample, [B, R, 6, dim] for
    /// one per run of tokens ([`Self::runs`]); f32.
    time: Tensor,
    /// The time embedding: [B, dim], or [B, R, dim] per run; f32.
    temb: Tensor,
    /// Per-token timesteps: the runs of tokens whose timesteps are equal (in every sample),
    /// in token order, covering every token; `None` for a timestep per sample.
    runs: Option<Vec<Range<usize>>>,
    /// The embedded text, [B, Lc, dim].
    context: Tensor,
    /// Image-to-video: the embedded image features, [B, Li, dim].
    image: Option<Tensor>,
    grid: [usize; 3],
    /// The current block's modulation, [B, 6, dim] (or [B, R, 6, dim]) f32: set by its
    /// self-attention part, read by its feed-forward part.
    block_modulation: Option<Tensor>,
}

/// How a step with classifier-free guidance runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuidancePasses {
    /// Condition and uncondition in one forward of batch 2 (faster, twice the activations).
    Batched,
    /// Two passes of batch 1 that go through each block part in turn: about half the
    /// activations of a batched step (both residual streams live), and each streamed block
    /// is fetched once per step.
    TwoPasses,
    /// Two forwards of batch 1, one after the other: one residual stream lives at a time,
    /// and each streamed block is fetched twice per step.
    Sequential,
    /// One forward of the condition only: at guidance scale 1 the guided velocity is the
    /// conditional one (diffusers' pipelines and ComfyUI skip the unconditional pass there).
    Single,
}

/// The Wan 2.1 text-to-video DiT.
#[derive(Debug, Clone)]
pub struct WanModel {
    /// Patch embedding as a matrix: shape [dim, C·pt·ph·pw].
    patch_weight: Tensor,
    /// shape [dim]
    patch_bias: Tensor,
    /// Kept in f32 (diffusers keeps `time_embedder` in f32).
    time_in: Linear,
    /// The text and time embeddings' larger weights; `None` when a [`BlockSource`] gives them
    /// at each forward ([`BlockSource::embeddings`]).
    embeddings: Option<Embeddings>,
    /// Image-to-video: the embedding of the image features.
    image_embedding: Option<ImageEmbedding>,
    /// The blocks the model holds; `None` for a block whose weights a [`BlockSource`] gives
    /// at each forward.
    blocks: Vec<Option<Block>>,
    /// How the checkpoint names the weights a [`BlockSource`] gives.
    keys: (dit_keys::KeyLayout, &'static str),
    head: Linear,
    /// shape [1, 2, dim], f32
    head_modulation: Tensor,
    cfg: Config,
    dtype: DType,
    device: Device,
}

/// How a forward runs where memory and speed trade off, as a plan decides it (the model keeps
/// no such setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execution {
    /// The attention kernel (where it takes the operands; see
    /// [`attention`](crate::ops::attention::attention)).
    pub attention: AttentionKernel,
    /// Bytes the scores of one attention call may take where the chunked path runs (the
    /// query chunk follows, [`QueryChunk::for_budget`]).
    pub attention_scratch: u64,
    /// Token slices the FFN and the self-attention's input (its norm and the q, k and v
    /// projections) run over in turn (1: all at once). More slices hold less at a time: a
    /// slice of the FFN's `ffn_dim`-wide hidden state, and of the normed input and the
    /// projections' intermediates, the attention's output then taking the queries' memory
    /// (see [`Config::activation_bytes_estimate`]).
    pub token_slices: usize,
    /// How the blocks' linear layers multiply (the embeddings and the head stay exact).
    pub matmul: MatmulPrecision,
}

impl Default for Execution {
    fn default() -> Self {
        Self {
            attention: AttentionKernel::Fused,
            attention_scratch: DEFAULT_ATTENTION_SCRATCH,
            token_slices: 1,
            matmul: MatmulPrecision::Exact,
        }
    }
}

/// What a step cache keeps between denoising steps: for each forward of a step (in the order
/// the step runs them), what the transformer blocks added to the residual stream the last time
/// they ran. A step whose input barely changed adds that instead of running the blocks (the
/// TeaCache idea; the caller decides which steps, see [`WanModel::time_modulation`]).
#[derive(Debug, Clone, Default)]
pub struct BlockCache {
    residuals: Vec<Option<Tensor>>,
}

impl BlockCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// What the blocks added to the condition's residual stream when they last ran, [1, L,
    /// dim] in the model's dtype (the output of the last block minus the input of the first:
    /// MagCache's residual). The condition is the first sample of the step's first forward in
    /// every way of passing. `None` before any step ran the blocks.
    pub fn condition_residual(&self) -> Result<Option<Tensor>> {
        match self.residuals.first() {
            Some(Some(residual)) => Ok(Some(residual.narrow(0, 0, 1)?)),
            _ => Ok(None),
        }
    }

    /// The slots of forwards `first..first + n` of a step, made as needed.
    fn slots(&mut self, first: usize, n: usize) -> &mut [Option<Tensor>] {
        if self.residuals.len() < first + n {
            self.residuals.resize(first + n, None);
        }
        &mut self.residuals[first..first + n]
    }
}

/// Some forwards' slots of a [`BlockCache`], with what the step does with them.
type CacheSlots<'c> = (&'c mut [Option<Tensor>], CacheUse);

/// The cache slots of forwards `first..first + n` of a step, with what the step does with
/// them.
fn cache_slots<'c>(
    cache: &'c mut Option<(&mut BlockCache, CacheUse)>,
    first: usize,
    n: usize,
) -> Option<CacheSlots<'c>> {
    cache
        .as_mut()
        .map(|(cache, usage)| (cache.slots(first, n), *usage))
}

/// What a step does with its [`BlockCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    /// Run the blocks and keep what they add.
    Refresh,
    /// Skip the blocks and add what they added when they last ran.
    Reuse,
}

/// How one guided step runs: its passes, its execution, and the block cache it refreshes or
/// reuses (none: the blocks always run, nothing is kept).
pub struct StepRun<'a> {
    /// How the condition and the uncondition run.
    pub passes: GuidancePasses,
    /// The memory-for-speed settings of each forward.
    pub execution: &'a Execution,
    /// The step cache and what this step does with it.
    pub cache: Option<(&'a mut BlockCache, CacheUse)>,
    /// Image-to-video: the CLIP image features, [1, Li, image_dim], the same for the
    /// condition and the uncondition (as diffusers' pipeline passes them).
    pub image: Option<&'a Tensor>,
}

/// How one guided step runs over several ranks ([`WanModel::forward_guided_parallel`]).
#[derive(Clone, Copy)]
pub struct ParallelRun<'a> {
    /// The memory-for-speed settings of each rank's forward.
    pub execution: &'a Execution,
    /// Sequence parallelism: the ranks among which each pass's tokens are split (Ulysses;
    /// the heads must divide among them). `None`: this rank runs every token.
    pub sequence: Option<&'a dyn Communicator>,
    /// Guidance parallelism: two ranks, rank 0 running the conditional pass and rank 1 the
    /// unconditional one. `None`: this rank runs both passes (through each block together,
    /// as [`GuidancePasses::TwoPasses`]).
    pub guidance: Option<&'a dyn Communicator>,
    /// Image-to-video: the CLIP image features, [B, Li, image_dim], the same for both passes
    /// (every rank attends to all of them from its own tokens).
    pub image: Option<&'a Tensor>,
}

impl WanModel {
    /// Builds the model from `vb` (original Wan names, see [`dit_keys::canonical_var_builder`]),
    /// in `vb`'s dtype. Linear weights with a float8 scale next to them stay float8
    /// ([`Linear`]); every other tensor, float8 or not, is converted on load.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::with_blocks(cfg, vb, (dit_keys::KeyLayout::Wan, ""), &|_| true, true)
    }

    /// Like [`Self::new`], holding only the blocks for which `held` is true; a forward gets the
    /// others from a [`BlockSource`], whose tensors are named as `keys` says.
    fn with_blocks(
        cfg: &Config,
        vb: VarBuilder,
        keys: (dit_keys::KeyLayout, &'static str),
        held: &dyn Fn(usize) -> bool,
        embeddings_held: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.dim;
        let [pt, ph, pw] = cfg.patch_size;
        let patch_in = cfg.in_channels * pt * ph * pw;
        let patch = vb.pp("patch_embedding");
        let patch_weight = get_in_dtype(
            &patch,
            (d, cfg.in_channels, pt, ph, pw),
            "weight",
            vb.dtype(),
        )?
        .reshape((d, patch_in))?;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                held(i)
                    .then(|| Block::new(cfg, &vb.pp(format!("blocks.{i}"))))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let out_dim = cfg.out_channels * pt * ph * pw;
        Ok(Self {
            patch_weight,
            patch_bias: get_in_dtype(&patch, d, "bias", vb.dtype())?,
            time_in: Linear::new_in(cfg.freq_dim, d, true, DType::F32, vb.pp("time_embedding.0"))?,
            embeddings: embeddings_held
                .then(|| Embeddings::new(cfg, &vb))
                .transpose()?,
            image_embedding: cfg
                .image_dim
                .map(|image_dim| ImageEmbedding::new(cfg, image_dim, &vb))
                .transpose()?,
            blocks,
            keys,
            head: Linear::new(d, out_dim, true, vb.pp("head.head"))?,
            head_modulation: get_in_dtype(&vb, (1, 2, d), "head.modulation", DType::F32)?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Builds the model from a checkpoint's `VarBuilder` (empty path) in either key layout and
    /// with or without a ComfyUI prefix. The configuration is `cfg` when given (e.g. from a
    /// diffusers `config.json`), else read from the tensor shapes.
    pub fn from_checkpoint(vb: VarBuilder, cfg: Option<&Config>) -> Result<Self> {
        let (layout, prefix) = dit_keys::detect_layout(&vb).ok_or_else(|| Error::NoDit {
            prefixes: dit_keys::KNOWN_PREFIXES.to_vec(),
        })?;
        let vb = dit_keys::canonical_var_builder(vb, layout, prefix);
        let cfg = match cfg {
            Some(cfg) => cfg.clone(),
            None => Config::from_var_builder(&vb)?,
        };
        tracing::debug!(?layout, prefix, ?cfg, "loading Wan DiT");
        Self::with_blocks(&cfg, vb, (layout, prefix), &|_| true, true)
    }

    /// Builds the model from a checkpoint's `VarBuilder` (as [`Self::from_checkpoint`]) that
    /// holds the blocks for which `held` is true and every tensor outside the blocks but,
    /// unless `embeddings_held`, the text and time embeddings' larger weights
    /// ([`dit_keys::is_source_embedding`]); a forward gets the rest from a [`BlockSource`]
    /// ([`Self::forward_guided_with`]). The configuration must be given: the block count
    /// cannot be read from a partial checkpoint.
    pub fn from_checkpoint_partial(
        vb: VarBuilder,
        cfg: &Config,
        held: &dyn Fn(usize) -> bool,
        embeddings_held: bool,
    ) -> Result<Self> {
        let (layout, prefix) = dit_keys::detect_layout(&vb).ok_or_else(|| Error::NoDit {
            prefixes: dit_keys::KNOWN_PREFIXES.to_vec(),
        })?;
        let vb = dit_keys::canonical_var_builder(vb, layout, prefix);
        Self::with_blocks(cfg, vb, (layout, prefix), held, embeddings_held)
    }

    /// The text and time embeddings' weights: the model's, or `source`'s for a model built
    /// without them (valid until the next call to `source`).
    fn embeddings<'a>(
        &'a self,
        source: &mut dyn BlockSource,
    ) -> Result<std::borrow::Cow<'a, Embeddings>> {
        Ok(match &self.embeddings {
            Some(held) => std::borrow::Cow::Borrowed(held),
            None => {
                let vb = source.embeddings(self.dtype, &self.device)?;
                let vb = dit_keys::canonical_var_builder(vb, self.keys.0, self.keys.1);
                std::borrow::Cow::Owned(Embeddings::new(&self.cfg, &vb)?)
            }
        })
    }

    /// Whether the model holds block `index` (else a [`BlockSource`] gives it at each forward).
    pub fn holds_block(&self, index: usize) -> bool {
        self.blocks.get(index).is_some_and(Option::is_some)
    }

    /// Loads a DiT checkpoint file (`.safetensors` or `.pth`) in `dtype` on `device`.
    pub fn from_file(
        path: impl AsRef<Path>,
        cfg: Option<&Config>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vb = crate::checkpoint::var_builder_from_file(path, dtype, device)?;
        Self::from_checkpoint(vb, cfg)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// How the attentions (self, cross) of a forward of `batch` samples of `tokens` tokens
    /// with `context_len` context rows run under `execution`.
    pub fn attends(
        &self,
        execution: &Execution,
        batch: usize,
        tokens: usize,
        context_len: usize,
    ) -> (Attend, Attend) {
        let (h, hd) = (self.cfg.num_heads, self.cfg.head_dim());
        let budget = execution.attention_scratch;
        let attend = |kernel, keys: usize| Attend {
            kernel,
            chunk: QueryChunk::for_budget(budget, batch, h, keys, hd, self.dtype),
        };
        (
            attend(execution.attention, tokens),
            attend(execution.attention.for_cross_attention(), context_len),
        )
    }

    /// The guided velocity `uncond + scale · (cond − uncond)` for one sample, for a model that
    /// holds every block, its passes run as `how` says ([`GuidancePasses::Single`]: the
    /// conditional velocity, `uncond` and `scale` unused).
    ///
    /// # Shapes
    /// - `latents`: [1, C, F, H, W]; `timestep`: [1], or [1, L] per token (see
    ///   [`Self::forward`]); `cond`, `uncond`: [1, Lc, text_dim].
    /// - output: [1, C, F, H, W] in the model's dtype.
    pub fn forward_guided(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        cond: &Tensor,
        uncond: &Tensor,
        scale: f64,
        (passes, execution): (GuidancePasses, &Execution),
    ) -> Result<Tensor> {
        let step = StepRun {
            passes,
            execution,
            cache: None,
            image: None,
        };
        self.forward_guided_with(
            latents,
            timestep,
            cond,
            uncond,
            scale,
            step,
            &mut HeldBlocks,
        )
    }

    /// [`Self::forward_guided`] with the blocks the model does not hold from `source`. With
    /// [`GuidancePasses::TwoPasses`] both passes go through each block in turn, so each
    /// block's weights are asked for once per step, as with a batched step.
    ///
    /// # Shapes
    /// As [`Self::forward_guided`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_guided_with(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        cond: &Tensor,
        uncond: &Tensor,
        scale: f64,
        step: StepRun<'_>,
        source: &mut dyn BlockSource,
    ) -> Result<Tensor> {
        let StepRun {
            passes,
            execution,
            mut cache,
            image,
        } = step;
        if !scale.is_finite() {
            return Err(Error::DitInput {
                tensor: "guidance",
                reason: format!("the guidance scale {scale} is not a finite number"),
            });
        }
        if passes == GuidancePasses::Batched && cond.dims() != uncond.dims() {
            // One batch holds both: they must be of one shape (two passes need not).
            return Err(Error::DitInput {
                tensor: "encoder_hidden_states",
                reason: format!(
                    "the condition {:?} and the uncondition {:?} differ in shape; batched \
                     guidance needs them alike",
                    cond.dims(),
                    uncond.dims()
                ),
            });
        }
        let guided = match passes {
            GuidancePasses::Batched => {
                let [both] = self.forward_passes(
                    (
                        [(
                            &Tensor::cat(&[latents, latents], 0)?,
                            &Tensor::cat(&[timestep, timestep], 0)?,
                            &Tensor::cat(&[cond, uncond], 0)?,
                        )],
                        image.map(|i| Tensor::cat(&[i, i], 0)).transpose()?.as_ref(),
                    ),
                    (execution, cache_slots(&mut cache, 0, 1), None),
                    source,
                )?;
                vpipe_sampling::cfg_batched(&both, scale)
            }
            GuidancePasses::TwoPasses => {
                let [c, u] = self.forward_passes(
                    (
                        [(latents, timestep, cond), (latents, timestep, uncond)],
                        image,
                    ),
                    (execution, cache_slots(&mut cache, 0, 2), None),
                    source,
                )?;
                vpipe_sampling::cfg(&c, &u, scale)
            }
            GuidancePasses::Sequential => {
                let [c] = self.forward_passes(
                    ([(latents, timestep, cond)], image),
                    (execution, cache_slots(&mut cache, 0, 1), None),
                    source,
                )?;
                let [u] = self.forward_passes(
                    ([(latents, timestep, uncond)], image),
                    (execution, cache_slots(&mut cache, 1, 1), None),
                    source,
                )?;
                vpipe_sampling::cfg(&c, &u, scale)
            }
            GuidancePasses::Single => {
                let [c] = self.forward_passes(
                    ([(latents, timestep, cond)], image),
                    (execution, cache_slots(&mut cache, 0, 1), None),
                    source,
                )?;
                return Ok(c);
            }
        };
        guided.map_err(|e| Error::DitInput {
            tensor: "guidance",
            reason: e.to_string(),
        })
    }

    /// The timestep's modulation for the blocks (the time projection, TeaCache's "modulated
    /// input" of Wan: `e0`), [1, 6·dim] in f32: how much it changes between two steps says how
    /// much the blocks' work changes, so a step cache compares it. A step with per-token
    /// timesteps has one per distinct timestep; with TI2V's (the first frame at 0 throughout)
    /// only the step's own timestep changes, so it is the one to pass. The [`BlockCache`]
    /// itself keeps what the blocks added per token and takes either form of timestep.
    pub fn time_modulation(&self, timestep: f32) -> Result<Tensor> {
        let mut modulations = self.time_modulations(&[timestep], &mut HeldBlocks)?;
        Ok(modulations.remove(0))
    }

    /// [`Self::time_modulation`] of each timestep, the embeddings' weights from `source` when
    /// the model does not hold them (fetched once).
    pub fn time_modulations(
        &self,
        timesteps: &[f32],
        source: &mut dyn BlockSource,
    ) -> Result<Vec<Tensor>> {
        if let Some(bad) = timesteps.iter().find(|t| !t.is_finite()) {
            return Err(Error::DitInput {
                tensor: "timestep",
                reason: format!("{bad} is not a finite number"),
            });
        }
        let embeddings = self.embeddings(source)?;
        timesteps
            .iter()
            .map(|&timestep| {
                let features = timestep_features(&[timestep], self.cfg.freq_dim, &self.device)?;
                Ok(self.embed_time(&embeddings, &features)?.1)
            })
            .collect()
    }

    /// The time embedding (`temb`, [B, dim] in f32) and the blocks' modulation ([B, 6·dim] in
    /// f32) of timestep features [B, freq_dim].
    fn embed_time(&self, embeddings: &Embeddings, features: &Tensor) -> Result<(Tensor, Tensor)> {
        let temb = embeddings
            .time_out
            .forward(&self.time_in.forward(features)?.silu()?)?;
        let time = embeddings
            .time_projection
            .forward(&temb.to_dtype(self.dtype)?.silu()?)?
            .to_dtype(DType::F32)?;
        Ok((temb, time))
    }

    /// The token grid (frames, height, width) of a latent of this shape.
    pub fn token_grid(&self, frames: usize, height: usize, width: usize) -> Result<[usize; 3]> {
        let [pt, ph, pw] = self.cfg.patch_size;
        if !frames.is_multiple_of(pt) || !height.is_multiple_of(ph) || !width.is_multiple_of(pw) {
            return Err(Error::DitInput {
                tensor: "hidden_states",
                reason: format!(
                    "latent frames × height × width {frames}×{height}×{width} must be multiples \
                     of the patch size {:?}",
                    self.cfg.patch_size
                ),
            });
        }
        Ok([frames / pt, height / ph, width / pw])
    }

    /// Predicts the flow velocity.
    ///
    /// The timestep is one per sample (Wan 2.1, Wan 2.2 A14B), or one per token, as Wan 2.2
    /// TI2V-5B's pipelines give it (diffusers' `expand_timesteps`; [`super::ti2v`] builds it):
    /// each token's time embedding then modulates that token in every block and in the output
    /// norm. Tokens whose timesteps are equal share one modulation, so TI2V's image-to-video
    /// (the first latent frame at 0, the rest at t) costs what a timestep per sample costs;
    /// a uniform per-token timestep gives the per-sample result bit for bit.
    ///
    /// # Shapes
    /// - `latents`: [B, in_channels, F, H, W] (F, H, W multiples of the patch size).
    /// - `timestep`: [B], or [B, L] with L = (F/pt)·(H/ph)·(W/pw) tokens in frame-major order;
    ///   float, in [0, 1000] (σ · 1000).
    /// - `context`: [B, Lc, text_dim]: the umT5 output, zero-padded (512 rows in Wan).
    /// - output: [B, out_channels, F, H, W] in the model's dtype.
    ///
    /// # Errors
    /// [`Error::DitInput`] naming the input, before any work: a rank other than the above, an
    /// empty dimension (an empty text context included), a channel count or text width other
    /// than the config's, batch sizes that differ between the inputs, a per-token timestep
    /// of another length than the token count, frames or sides that are not multiples of the
    /// patch size, a token grid past the RoPE tables or [`MAX_TOKENS`], a timestep that is not
    /// a finite number.
    pub fn forward(&self, latents: &Tensor, timestep: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_planned(latents, timestep, context, &Execution::default())
    }

    /// [`Self::forward`] under `execution`.
    ///
    /// # Shapes
    /// As [`Self::forward`].
    pub fn forward_planned(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        execution: &Execution,
    ) -> Result<Tensor> {
        let [out] = self.forward_passes(
            ([(latents, timestep, context)], None),
            (execution, None, None),
            &mut HeldBlocks,
        )?;
        Ok(out)
    }

    /// [`Self::forward_planned`] of an image-to-video model, whose blocks also attend to the
    /// image: `image_features` are the CLIP vision encoder's (the next-to-last layer's
    /// output), embedded by the model's image embedding.
    ///
    /// # Shapes
    /// As [`Self::forward`], with `latents` of the model's `in_channels` (36: the noise, the
    /// mask and the conditioning latents) and `image_features`: [B, Li, image_dim] (Li = 257
    /// for one 224-px image).
    ///
    /// # Errors
    /// As [`Self::forward`]; [`Error::DitInput`] naming `encoder_hidden_states_image` for
    /// features of another shape, or for a model that is not image-to-video.
    pub fn forward_with_image(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        image_features: &Tensor,
        execution: &Execution,
    ) -> Result<Tensor> {
        let [out] = self.forward_passes(
            ([(latents, timestep, context)], Some(image_features)),
            (execution, None, None),
            &mut HeldBlocks,
        )?;
        Ok(out)
    }

    /// [`Self::forward_planned`] with the tokens split among the ranks of `sequence` (Ulysses
    /// sequence parallelism): each rank holds a contiguous shard of ⌈L / N⌉ tokens (the last
    /// ones padded), runs the per-token work on it, and around each self-attention exchanges
    /// tokens for heads with the others (all-to-all), attending over every token with H / N
    /// of the heads. Every rank of the group calls this with the same inputs and gets the whole
    /// output (an all-gather after the head). The same result as [`Self::forward_planned`] to
    /// rounding (the attention's sums run over the same tokens in the same order).
    ///
    /// # Shapes
    /// As [`Self::forward`].
    ///
    /// # Errors
    /// As [`Self::forward`]; [`Error::DitConfig`] when the model's heads do not divide among
    /// the ranks; a failed collective (a rank that left the group or stopped, see
    /// [`crate::parallel::CommError`]) as [`Error::Candle`] wrapping it.
    pub fn forward_sharded(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        execution: &Execution,
        sequence: &dyn Communicator,
    ) -> Result<Tensor> {
        let [out] = self.forward_passes(
            ([(latents, timestep, context)], None),
            (execution, None, Some(sequence)),
            &mut HeldBlocks,
        )?;
        Ok(out)
    }

    /// The guided velocity `uncond + scale · (cond − uncond)` (as [`Self::forward_guided`]),
    /// its passes spread over ranks as `run` says: with a `guidance` group of two, the
    /// conditional pass on its rank 0 and the unconditional one on its rank 1, combined
    /// through an all-gather; with a `sequence` group, each pass's tokens split among its ranks
    /// ([`Self::forward_sharded`]). Both together: N = 2·S ranks, each in one guidance group
    /// (the ranks holding the same shard) and one sequence group (the ranks running the same
    /// pass). Every rank calls this with the same inputs and gets the whole guided velocity.
    ///
    /// # Shapes
    /// - `latents`: [B, C, F, H, W]; `timestep`: [B] or [B, L] (see [`Self::forward`]);
    ///   `cond`, `uncond`: [B, Lc, text_dim].
    /// - output: [B, C, F, H, W] in the model's dtype.
    ///
    /// # Errors
    /// As [`Self::forward_sharded`]; [`Error::DitInput`] of `guidance` for a scale that is
    /// not a finite number or a guidance group of other than two ranks.
    pub fn forward_guided_parallel(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        cond: &Tensor,
        uncond: &Tensor,
        scale: f64,
        run: ParallelRun<'_>,
    ) -> Result<Tensor> {
        let refuse = |reason: String| {
            Err(Error::DitInput {
                tensor: "guidance",
                reason,
            })
        };
        if !scale.is_finite() {
            return refuse(format!("the guidance scale {scale} is not a finite number"));
        }
        let how = (run.execution, None, run.sequence);
        let guided = match run.guidance {
            Some(guidance) => {
                if guidance.world_size() != 2 {
                    return refuse(format!(
                        "guidance parallelism runs the condition and the uncondition on two                          ranks; the group has {}",
                        guidance.world_size()
                    ));
                }
                let context = if guidance.rank() == 0 { cond } else { uncond };
                let [own] = self.forward_passes(
                    ([(latents, timestep, context)], run.image),
                    how,
                    &mut HeldBlocks,
                )?;
                // [cond; uncond] along the batch, on both ranks.
                let both = guidance.all_gather(&own, 0)?;
                vpipe_sampling::cfg_batched(&both, scale)
            }
            None => {
                let [c, u] = self.forward_passes(
                    (
                        [(latents, timestep, cond), (latents, timestep, uncond)],
                        run.image,
                    ),
                    how,
                    &mut HeldBlocks,
                )?;
                vpipe_sampling::cfg(&c, &u, scale)
            }
        };
        guided.map_err(|e| Error::DitInput {
            tensor: "guidance",
            reason: e.to_string(),
        })
    }

    /// Forwards of `N` inputs (each as [`Self::forward`]'s) through the blocks together: each
    /// block is built once (from `source` when the model does not hold it) and runs every
    /// input before the next block. With a `sequence` group, the blocks run on this rank's
    /// shard of the tokens ([`TokenShard`]) and the outputs are gathered whole on every rank.
    fn forward_passes<const N: usize>(
        &self,
        (inputs, image): ([(&Tensor, &Tensor, &Tensor); N], Option<&Tensor>),
        (execution, cache, sequence): (
            &Execution,
            Option<CacheSlots<'_>>,
            Option<&dyn Communicator>,
        ),
        source: &mut dyn BlockSource,
    ) -> Result<[Tensor; N]> {
        if let Some(comm) = sequence {
            check_heads_divide(comm, self.cfg.num_heads)?;
        }
        let mut passes = Vec::with_capacity(N);
        {
            // A source's embedding weights are dropped before the first block runs.
            let embeddings = self.embeddings(source)?;
            for input in inputs {
                passes.push(self.embed(input, image, &embeddings, sequence)?);
            }
        }
        let grid = passes[0].grid;
        if let Some(other) = passes.iter().find(|p| p.grid != grid) {
            return Err(Error::DitInput {
                tensor: "hidden_states",
                reason: format!(
                    "passes of one forward need one token grid, got {grid:?} and {:?}",
                    other.grid
                ),
            });
        }
        let rope = Rope::new(
            self.cfg.head_dim(),
            grid,
            self.cfg.rope_max_seq_len,
            &self.device,
        )?;
        let tokens: usize = grid.iter().product();
        let shard = sequence
            .map(|comm| TokenShard::new(comm, tokens, self.cfg.num_heads))
            .transpose()?;
        let rope = match &shard {
            Some(shard) => shard.rope(&rope)?,
            None => rope,
        };
        let attends: Vec<_> = passes
            .iter()
            .map(|p| Ok(self.attends(execution, p.x.dim(0)?, tokens, p.context.dim(1)?)))
            .collect::<Result<_>>()?;
        let run = BlockRun {
            rope: &rope,
            shard: shard.as_ref(),
            attends: &attends,
            token_slices: execution.token_slices,
            matmul: execution.matmul,
            eps: self.cfg.eps,
        };
        match cache {
            Some((slots, CacheUse::Reuse)) => {
                for (pass, slot) in passes.iter_mut().zip(slots.iter()) {
                    let residual = slot.as_ref().ok_or_else(|| Error::DitInput {
                        tensor: "cache",
                        reason: "a step reuses the block cache before any step filled it".into(),
                    })?;
                    pass.x = (&pass.x + residual)?;
                }
            }
            Some((slots, CacheUse::Refresh)) => {
                let before: Vec<Tensor> = passes.iter().map(|p| p.x.clone()).collect();
                self.run_blocks(&mut passes, &run, source)?;
                for ((slot, pass), before) in slots.iter_mut().zip(&passes).zip(before) {
                    *slot = Some((&pass.x - before)?);
                }
            }
            None => self.run_blocks(&mut passes, &run, source)?,
        }
        let mut outputs = Vec::with_capacity(N);
        for pass in passes {
            // [B, 2, dim], or [B, R, 2, dim] per run of tokens.
            let temb = pass.temb.unsqueeze(pass.temb.rank() - 1)?;
            let m = self.head_modulation.broadcast_add(&temb)?;
            let x = Modulation::new(&m, 0, false, pass.runs.as_deref())?.norm(
                &pass.x,
                0,
                self.cfg.eps,
            )?;
            let x = self.head.forward(&x)?;
            let x = match &shard {
                Some(shard) => shard.gather(&x)?,
                None => x,
            };
            outputs.push(self.unpatchify(&x, grid)?);
        }
        Ok(outputs
            .try_into()
            .unwrap_or_else(|_| unreachable!("one output per pass")))
    }

    /// Runs every pass through every block, the blocks the model does not hold from
    /// `source`, each block part by part.
    fn run_blocks(
        &self,
        passes: &mut [Embedded],
        run: &BlockRun,
        source: &mut dyn BlockSource,
    ) -> Result<()> {
        let block_vb = |vb: VarBuilder<'static>, i: usize| {
            dit_keys::canonical_var_builder(vb, self.keys.0, self.keys.1).pp(format!("blocks.{i}"))
        };
        for i in 0..self.blocks.len() {
            let _span = tracing::trace_span!("dit_block", i).entered();
            match &self.blocks[i] {
                Some(block) => {
                    for part in BlockPart::ALL {
                        block.part(part).forward(passes, run)?;
                    }
                }
                None if source.gives_parts() => {
                    for part in BlockPart::ALL {
                        let vb = block_vb(source.block_part(i, part, self.dtype, &self.device)?, i);
                        OwnedPart::new(part, &self.cfg, &vb)?
                            .as_ref()
                            .forward(passes, run)?;
                    }
                }
                None => {
                    let vb = block_vb(source.block(i, self.dtype, &self.device)?, i);
                    let block = Block::new(&self.cfg, &vb)?;
                    for part in BlockPart::ALL {
                        block.part(part).forward(passes, run)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks the inputs and runs everything before the blocks: the patch, time and text
    /// embeddings; with a `sequence` group, of this rank's shard of the tokens.
    fn embed(
        &self,
        (latents, timestep, context): (&Tensor, &Tensor, &Tensor),
        image: Option<&Tensor>,
        embeddings: &Embeddings,
        sequence: Option<&dyn Communicator>,
    ) -> Result<Embedded> {
        let (b, timesteps, grid) = self.check_inputs(latents, timestep, context)?;
        let shard = sequence
            .map(|comm| TokenShard::new(comm, grid.iter().product(), self.cfg.num_heads))
            .transpose()?;
        let image = match (&self.image_embedding, image) {
            (Some(embedding), Some(features)) => {
                let dims = features.dims();
                let image_dim = self.cfg.image_dim.unwrap_or(0);
                let tokens_ok = match self.cfg.image_tokens {
                    Some(tokens) => dims.get(1) == Some(&tokens),
                    None => dims.get(1).is_some_and(|&l| l > 0),
                };
                if dims.len() != 3 || dims[0] != b || !tokens_ok || dims[2] != image_dim {
                    let tokens = self.cfg.image_tokens.map_or("Li ≥ 1".to_owned(), |t| {
                        format!("{t} (both frames' tokens)")
                    });
                    return Err(Error::DitInput {
                        tensor: "encoder_hidden_states_image",
                        reason: format!("expected [{b}, {tokens}, {image_dim}], got {dims:?}"),
                    });
                }
                Some(embedding.forward(features, self.dtype)?)
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::DitInput {
                    tensor: "encoder_hidden_states_image",
                    reason: "an image-to-video model needs the image features".into(),
                })
            }
            (None, Some(_)) => {
                return Err(Error::DitInput {
                    tensor: "encoder_hidden_states_image",
                    reason: "a text-to-video model takes no image features".into(),
                })
            }
        };
        let x = self.patchify(&latents.to_dtype(self.dtype)?, grid, shard.as_ref())?;

        let _span = tracing::trace_span!("dit_embed").entered();
        let (values, runs) = match timesteps {
            Timesteps::PerSample(t) => (t, None),
            Timesteps::PerToken { values, runs } => match &shard {
                Some(shard) => (values, Some(shard.runs(&runs))),
                None => (values, Some(runs)),
            },
        };
        // One embedding per distinct row: per sample, or per sample and run of tokens.
        let features = timestep_features(&values, self.cfg.freq_dim, &self.device)?;
        let (temb, time) = self.embed_time(embeddings, &features)?;
        let d = self.cfg.dim;
        let (temb, time) = match &runs {
            None => (temb, time.reshape((b, 6, d))?),
            Some(runs) => (
                temb.reshape((b, runs.len(), d))?,
                time.reshape((b, runs.len(), 6, d))?,
            ),
        };
        let context = embeddings.text_out.forward(
            &embeddings
                .text_in
                .forward(&context.to_dtype(self.dtype)?)?
                .gelu()?,
        )?;
        Ok(Embedded {
            x,
            time,
            temb,
            runs,
            context,
            image,
            grid,
            block_modulation: None,
        })
    }

    /// The checks of [`Self::forward`]: the batch, the timesteps in f32 and the token grid.
    fn check_inputs(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
    ) -> Result<(usize, Timesteps, [usize; 3])> {
        let refuse = |tensor: &'static str, reason: String| Err(Error::DitInput { tensor, reason });
        let (in_channels, text_dim) = (self.cfg.in_channels, self.cfg.text_dim);
        let (b, c, f, h, w) = match *latents.dims() {
            [b, c, f, h, w] => (b, c, f, h, w),
            _ => {
                return refuse(
                    "hidden_states",
                    format!(
                        "expected [B, {in_channels}, F, H, W], got {:?}",
                        latents.dims()
                    ),
                )
            }
        };
        if latents.dims().contains(&0) {
            return refuse(
                "hidden_states",
                format!(
                    "shape {:?} has an empty dimension; every dimension must be at least 1",
                    latents.dims()
                ),
            );
        }
        if c != in_channels {
            return refuse(
                "hidden_states",
                format!(
                    "expected {in_channels} channels, got shape {:?}",
                    latents.dims()
                ),
            );
        }
        let grid = self.token_grid(f, h, w)?;
        // The same limits the RoPE tables check, before the latents are converted.
        let tokens = grid
            .iter()
            .try_fold(1usize, |p, &n| p.checked_mul(n))
            .filter(|&n| n <= MAX_TOKENS);
        let Some(tokens) = tokens else {
            return refuse(
                "hidden_states",
                format!("the token grid {grid:?} has more than {MAX_TOKENS} tokens per sample"),
            );
        };
        // [B] (or a scalar for one sample), or [B, L] (one per token), counted before
        // anything is converted or copied.
        let per_token = match *timestep.dims() {
            [] | [_] if timestep.elem_count() == b => false,
            [tb, tl] if tb == b && tl == tokens => true,
            _ => {
                return refuse(
                    "timestep",
                    format!(
                        "expected [{b}] (one value per sample) or [{b}, {tokens}] (one per \
                         token of the {grid:?} token grid), got shape {:?}",
                        timestep.dims()
                    ),
                )
            }
        };
        let t: Vec<f32> = timestep
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()
            .map_err(|e| Error::DitInput {
                tensor: "timestep",
                reason: e.to_string(),
            })?;
        if let Some(bad) = t.iter().find(|v| !v.is_finite()) {
            return refuse(
                "timestep",
                format!("{bad} is not a finite number (expected σ · 1000 in [0, 1000])"),
            );
        }
        let (cb, cl, cd) = match *context.dims() {
            [cb, cl, cd] => (cb, cl, cd),
            _ => {
                return refuse(
                    "encoder_hidden_states",
                    format!("expected [B, L, {text_dim}], got {:?}", context.dims()),
                )
            }
        };
        if cb != b || cd != text_dim {
            return refuse(
                "encoder_hidden_states",
                format!("expected [{b}, L, {text_dim}], got {:?}", context.dims()),
            );
        }
        if cl == 0 {
            return refuse(
                "encoder_hidden_states",
                format!(
                    "shape {:?} has no text rows (L = 0); cross-attention needs at least one \
                     (Wan pads the prompt's embedding to 512 rows)",
                    context.dims()
                ),
            );
        }
        let timesteps = if per_token {
            Timesteps::per_token(&t, b, tokens)?
        } else {
            Timesteps::PerSample(t)
        };
        Ok((b, timesteps, grid))
    }

    /// [B, C, F, H, W] → tokens [B, L, dim] (the (1, 2, 2)-strided Conv3d as one matmul), or
    /// the `shard`'s tokens [B, len, dim] alone.
    fn patchify(&self, x: &Tensor, grid: [usize; 3], shard: Option<&TokenShard>) -> Result<Tensor> {
        let (b, c, _, _, _) = x.dims5()?;
        let [pt, ph, pw] = self.cfg.patch_size;
        let [gf, gh, gw] = grid;
        let patches = x
            .reshape(vec![b, c, gf, pt, gh, ph, gw, pw])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .contiguous()?
            .reshape((b, gf * gh * gw, c * pt * ph * pw))?;
        // Cut before the projection: a patch is C·pt·ph·pw wide, a token `dim`.
        let patches = match shard {
            Some(shard) => shard.local(&patches, 1)?,
            None => patches,
        };
        let l = patches.dim(1)?;
        let tokens = patches
            .reshape((b * l, c * pt * ph * pw))?
            .matmul(&self.patch_weight.t()?)?;
        #[cfg(feature = "cuda")]
        if fused(&tokens) {
            // In place on the fresh product: candle's broadcasting add is several times
            // slower over this many tokens.
            crate::ops::fused::bias_act_in_place(&tokens, &self.patch_bias, false)?;
            return Ok(tokens.reshape((b, l, self.cfg.dim))?);
        }
        let tokens = tokens.broadcast_add(&self.patch_bias)?;
        Ok(tokens.reshape((b, l, self.cfg.dim))?)
    }

    /// Head output [B, L, C·pt·ph·pw] → [B, C, F, H, W].
    fn unpatchify(&self, x: &Tensor, grid: [usize; 3]) -> Result<Tensor> {
        let b = x.dim(0)?;
        let [pt, ph, pw] = self.cfg.patch_size;
        let [gf, gh, gw] = grid;
        let c = self.cfg.out_channels;
        Ok(x.reshape(vec![b, gf, gh, gw, pt, ph, pw, c])?
            .permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?
            .contiguous()?
            .reshape((b, c, gf * pt, gh * ph, gw * pw))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_published_sizes() {
        // The published Wan 2.1 T2V sizes: 1.419 B and 14.289 B parameters.
        let small = Config::wan21_t2v_1_3b().parameter_count() as f64 / 1e9;
        let large = Config::wan21_t2v_14b().parameter_count() as f64 / 1e9;
        assert!((small - 1.419).abs() < 0.001, "{small}");
        assert!((large - 14.289).abs() < 0.001, "{large}");
    }

    #[test]
    fn rope_split_is_44_42_42_for_128() -> Result<()> {
        // Frame 1, row 0, column 0: only the first 22 pairs (time axis) rotate.
        let rope = Rope::new(128, [2, 1, 1], 1024, &Device::Cpu)?;
        let sin = rope.sin.to_vec2::<f32>()?;
        assert_eq!(sin[1].iter().filter(|v| **v != 0.0).count(), 22);
        assert!(sin[1][22..].iter().all(|v| *v == 0.0));
        Ok(())
    }

    #[test]
    fn bad_config_json_is_an_error() {
        assert!(Config::from_diffusers_json("{").is_err());
        // Wan 2.1 I2V-14B: read; without its added key/value width, or with another, refused.
        let i2v = r#"{"in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}"#;
        let cfg = Config::from_diffusers_json(i2v).unwrap();
        assert_eq!((cfg.in_channels, cfg.image_dim), (36, Some(1280)));
        for bad in [
            r#"{"image_dim": 1280}"#,
            r#"{"image_dim": 1280, "added_kv_proj_dim": 1280}"#,
        ] {
            let err = Config::from_diffusers_json(bad).unwrap_err().to_string();
            assert!(err.contains("added_kv_proj_dim"), "{err}");
        }
        // First-last-frame to video: the image tokens of both frames; not without image_dim.
        let flf2v = r#"{"image_dim": 1280, "added_kv_proj_dim": 5120, "pos_embed_seq_len": 514}"#;
        assert_eq!(
            Config::from_diffusers_json(flf2v).unwrap().image_tokens,
            Some(514)
        );
        let err = Config::from_diffusers_json(r#"{"pos_embed_seq_len": 514}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("image_dim"), "{err}");
    }
}
