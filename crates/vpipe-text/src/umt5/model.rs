//! The umT5 encoder: configuration, layers and the encoder itself.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Module, VarBuilder};
// The linear layer that also reads ComfyUI's scaled-fp8 weights (kept in fp8, dequantised per
// use); one implementation for the DiT and the text encoder.
use vpipe_models::ops::linear::Linear;

use super::keys::{self, KeyLayout};
use crate::{Error, Result};

/// Encoder hyper-parameters. Field names follow transformers' `UMT5Config`, so a `config.json`
/// of `UMT5EncoderModel` (or ComfyUI's `umt5_config_xxl.json`) deserialises into this; unknown
/// fields are ignored and missing optional ones take umT5's values.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "RawConfig")]
pub struct Config {
    /// Rows of the token embedding (256 384 for umT5-XXL: 256 300 pieces rounded up).
    pub vocab_size: usize,
    /// Hidden width (4096).
    pub d_model: usize,
    /// Width of one attention head (64).
    pub d_kv: usize,
    /// Inner width of the gated feed-forward (10 240).
    pub d_ff: usize,
    /// Encoder blocks (24).
    pub num_layers: usize,
    /// Attention heads (64).
    pub num_heads: usize,
    /// Relative-position buckets, half per direction (32).
    pub relative_attention_num_buckets: usize,
    /// Distance from which all relative positions share the last bucket (128).
    pub relative_attention_max_distance: usize,
    /// RMS-norm epsilon (1e-6).
    pub layer_norm_epsilon: f64,
}

impl Config {
    /// umT5-XXL, the text encoder of Wan 2.1 / 2.2.
    // transformers: UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
    //               num_heads=64, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
    //               (google/umt5-xxl config.json)
    // Wan2.1:       umt5_xxl(encoder_only=True, ...) -> T5Encoder(vocab=256384, dim=4096,
    //               dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24, num_buckets=32,
    //               shared_pos=False)
    pub fn umt5_xxl() -> Self {
        Self {
            vocab_size: 256_384,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10_240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
        }
    }

    /// Reads a transformers `config.json`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| Error::ConfigJson {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(cfg)
    }

    /// Checks that the fields describe an encoder this implementation can build.
    pub fn validate(&self) -> Result<()> {
        let fail = |reason: String| Err(Error::Config { reason });
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return fail(format!("{name} must be positive ({self:?})"));
        }
        let buckets = self.relative_attention_num_buckets;
        // Bidirectional: half the buckets per direction, half of those exact.
        if buckets < 4 || !buckets.is_multiple_of(4) {
            return fail(format!(
                "relative_attention_num_buckets {buckets} must be a positive multiple of 4"
            ));
        }
        if self.relative_attention_max_distance <= buckets / 4 {
            return fail(format!(
                "relative_attention_max_distance {} must exceed the exact range {}",
                self.relative_attention_max_distance,
                buckets / 4
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return fail(format!(
                "layer_norm_epsilon {} must be positive and finite",
                self.layer_norm_epsilon
            ));
        }
        Ok(())
    }

    /// Reads the configuration from the tensor shapes of a checkpoint.
    ///
    /// `vb` answers to transformers names (see [`keys::canonical_var_builder`]). Layers are
    /// counted from the keys; widths come from block 0's tensors and the final norm. Loads the
    /// token embedding to read its row count (use [`Umt5Encoder::from_checkpoint`], which
    /// keeps it, to avoid loading it twice). The epsilon and `max_distance` are not stored in
    /// checkpoints and take umT5's values (1e-6, 128).
    pub fn from_var_builder(vb: &VarBuilder) -> Result<Self> {
        Ok(infer_config(vb)?.0)
    }
}

/// What a `config.json` may hold; resolved into [`Config`] like transformers' `UMT5Config`.
#[derive(serde::Deserialize)]
struct RawConfig {
    vocab_size: usize,
    d_model: usize,
    d_kv: usize,
    d_ff: usize,
    num_layers: usize,
    num_heads: usize,
    #[serde(default = "default_buckets")]
    relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    /// transformers: `"gated-gelu"` etc. Takes precedence over the two below, as in
    /// `UMT5Config.__post_init__`.
    feed_forward_proj: Option<String>,
    /// ComfyUI's `umt5_config_xxl.json` says `"gelu_pytorch_tanh"`.
    dense_act_fn: Option<String>,
    is_gated_act: Option<bool>,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}

impl TryFrom<RawConfig> for Config {
    type Error = String;

    fn try_from(raw: RawConfig) -> std::result::Result<Self, String> {
        let (act, gated) = match &raw.feed_forward_proj {
            Some(proj) => match proj.split_once('-') {
                // transformers maps "gated-gelu" to gelu_new (the tanh approximation).
                Some(("gated", "gelu")) => ("gelu_new".to_string(), true),
                Some(("gated", act)) => (act.to_string(), true),
                _ => (proj.clone(), false),
            },
            None => (
                raw.dense_act_fn.unwrap_or_else(|| "gelu_new".to_string()),
                raw.is_gated_act.unwrap_or(true),
            ),
        };
        if !gated || !matches!(act.as_str(), "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") {
            return Err(format!(
                "feed-forward `{}{act}` is not supported: umT5 uses a gated GELU with the tanh \
                 approximation (feed_forward_proj \"gated-gelu\", dense_act_fn \"gelu_new\" or \
                 \"gelu_pytorch_tanh\")",
                if gated { "gated-" } else { "" }
            ));
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            d_model: raw.d_model,
            d_kv: raw.d_kv,
            d_ff: raw.d_ff,
            num_layers: raw.num_layers,
            num_heads: raw.num_heads,
            relative_attention_num_buckets: raw.relative_attention_num_buckets,
            relative_attention_max_distance: raw.relative_attention_max_distance,
            layer_norm_epsilon: raw.layer_norm_epsilon,
        })
    }
}

/// Infers the config from shapes; also returns the embedding it had to load for `vocab_size`.
fn infer_config(vb: &VarBuilder) -> Result<(Config, Tensor)> {
    let dims = |name: &str| -> Result<Vec<usize>> { Ok(vb.get_unchecked(name)?.dims().to_vec()) };
    let block = "encoder.block";
    let num_layers = (0..)
        .take_while(|n| vb.contains_tensor(&format!("{block}.{n}.layer.0.SelfAttention.q.weight")))
        .count();
    if num_layers == 0 {
        return Err(Error::Config {
            reason: format!("no `{block}.0.layer.0.SelfAttention.q.weight`: no encoder blocks"),
        });
    }
    let ffn = format!("{block}.0.layer.1.DenseReluDense");
    if !vb.contains_tensor(&format!("{ffn}.wi_0.weight"))
        && vb.contains_tensor(&format!("{ffn}.wi.weight"))
    {
        return Err(Error::Config {
            reason: format!(
                "`{ffn}.wi.weight` without `wi_0`: a non-gated T5 feed-forward; umT5 is gated"
            ),
        });
    }
    let d_model = dims("encoder.final_layer_norm.weight")?[0];
    let bias = dims(&format!(
        "{block}.0.layer.0.SelfAttention.relative_attention_bias.weight"
    ))?;
    let inner = dims(&format!("{block}.0.layer.0.SelfAttention.q.weight"))?[0];
    let d_ff = dims(&format!("{ffn}.wi_0.weight"))?[0];
    let embedding = vb.get_unchecked("shared.weight")?;
    let (vocab_size, emb_dim) = embedding.dims2()?;
    let [num_buckets, num_heads] = bias[..] else {
        return Err(Error::Config {
            reason: format!(
                "relative_attention_bias has shape {bias:?}, expected [buckets, heads]"
            ),
        });
    };
    if num_heads == 0 || !inner.is_multiple_of(num_heads) || emb_dim != d_model {
        return Err(Error::Config {
            reason: format!(
                "inconsistent shapes: q projects to {inner} for {num_heads} heads, embedding \
                 width {emb_dim}, final norm width {d_model}"
            ),
        });
    }
    let cfg = Config {
        vocab_size,
        d_model,
        d_kv: inner / num_heads,
        d_ff,
        num_layers,
        num_heads,
        relative_attention_num_buckets: num_buckets,
        ..Config::umt5_xxl()
    };
    cfg.validate()?;
    Ok((cfg, embedding))
}

/// T5's bucket of a relative position `key - query` (bidirectional, as in the encoder):
/// `num_buckets / 2` per direction; distances below `num_buckets / 4` get their own bucket,
/// larger ones share log-spaced buckets up to `max_distance`, beyond which all share the last.
///
/// The log is taken in f32 exactly as transformers' `_relative_position_bucket` does, so that
/// distances on a bucket edge fall on the same side.
pub fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> u32 {
    let half = num_buckets / 2;
    let max_exact = half / 2;
    let base = if relative_position > 0 { half } else { 0 };
    let n = relative_position.unsigned_abs() as usize;
    let bucket = if n < max_exact {
        n
    } else {
        let log_ratio = (n as f32 / max_exact as f32).ln()
            / (max_distance as f32 / max_exact as f32).ln()
            * (half - max_exact) as f32;
        (max_exact + log_ratio as usize).min(half - 1)
    };
    (base + bucket) as u32
}

/// T5 RMS norm: no mean, no bias; accumulated in f32 as transformers does for half inputs.
#[derive(Debug, Clone)]
struct RmsNorm {
    /// shape [d_model]
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(cfg.d_model, "weight")?,
            eps: cfg.layer_norm_epsilon,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let xf = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(xf.to_dtype(x.dtype())?.broadcast_mul(&self.weight)?)
    }
}

/// Self-attention with this layer's own relative-position table and no 1/√d scaling.
#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// shape [num_buckets, num_heads]
    relative_attention_bias: Tensor,
    num_heads: usize,
    d_kv: usize,
}

impl SelfAttention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            q: Linear::new(cfg.d_model, inner, false, vb.pp("q"))?,
            k: Linear::new(cfg.d_model, inner, false, vb.pp("k"))?,
            v: Linear::new(cfg.d_model, inner, false, vb.pp("v"))?,
            o: Linear::new(inner, cfg.d_model, false, vb.pp("o"))?,
            relative_attention_bias: vb.get(
                (cfg.relative_attention_num_buckets, cfg.num_heads),
                "relative_attention_bias.weight",
            )?,
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `x`: [B, L, d_model]; `buckets`: [L·L] u32 (query-major); `mask`: [B, 1, 1, L], 0 or the
    /// dtype's lowest value.
    fn forward(&self, x: &Tensor, buckets: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, self.num_heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads(self.q.forward(x)?)?;
        let k = heads(self.k.forward(x)?)?;
        let v = heads(self.v.forward(x)?)?;
        let position_bias = self
            .relative_attention_bias
            .index_select(buckets, 0)?
            .reshape((l, l, self.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?;
        let scores = q
            .matmul(&k.t()?)?
            .broadcast_add(&position_bias)?
            .broadcast_add(mask)?;
        // Softmax in f32, as the original Wan code does (`F.softmax(attn.float())`).
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, self.num_heads * self.d_kv))?;
        Ok(self.o.forward(&out)?)
    }
}

/// Gated feed-forward: `wo(gelu_tanh(wi_0·x) · wi_1·x)`.
#[derive(Debug, Clone)]
struct GatedFeedForward {
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

impl GatedFeedForward {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            wi_0: Linear::new(cfg.d_model, cfg.d_ff, false, vb.pp("wi_0"))?,
            wi_1: Linear::new(cfg.d_model, cfg.d_ff, false, vb.pp("wi_1"))?,
            wo: Linear::new(cfg.d_ff, cfg.d_model, false, vb.pp("wo"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation (transformers' `gelu_new`).
        let gate = self.wi_0.forward(x)?.gelu()?;
        Ok(self.wo.forward(&(gate * self.wi_1.forward(x)?)?)?)
    }
}

/// In float16, transformers and Wan clamp the residual stream to ±(65504 − 1000) when it holds
/// an infinity (`fp16_clamp`); other dtypes pass through.
fn clamp_fp16(x: Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F16 {
        return Ok(x);
    }
    let peak = x
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if peak.is_infinite() {
        let limit = 65504.0 - 1000.0;
        Ok(x.clamp(-limit, limit)?)
    } else {
        Ok(x)
    }
}

/// One pre-norm encoder block (`encoder.block.N`).
#[derive(Debug, Clone)]
struct Block {
    norm1: RmsNorm,
    attn: SelfAttention,
    norm2: RmsNorm,
    ffn: GatedFeedForward,
}

impl Block {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: RmsNorm::new(cfg, vb.pp("layer.0.layer_norm"))?,
            attn: SelfAttention::new(cfg, vb.pp("layer.0.SelfAttention"))?,
            norm2: RmsNorm::new(cfg, vb.pp("layer.1.layer_norm"))?,
            ffn: GatedFeedForward::new(cfg, vb.pp("layer.1.DenseReluDense"))?,
        })
    }

    fn forward(&self, x: &Tensor, buckets: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = clamp_fp16((x + self.attn.forward(&self.norm1.forward(x)?, buckets, mask)?)?)?;
        clamp_fp16((&h + self.ffn.forward(&self.norm2.forward(&h)?)?)?)
    }
}

/// Where a forward gets what an encoder built with [`Umt5Encoder::from_checkpoint_partial`]
/// does not hold.
pub trait Umt5Source {
    /// Rows `ids` of the token embedding, [ids.len(), d_model], on `device` in `dtype`.
    fn embedding_rows(&mut self, ids: &[u32], dtype: DType, device: &Device) -> Result<Tensor>;

    /// The tensors of block `index`, named as in the checkpoint the encoder was built from,
    /// on `device`, as a `VarBuilder` in `dtype`; valid until the block's forward is done.
    fn block(&mut self, index: usize, dtype: DType, device: &Device)
        -> Result<VarBuilder<'static>>;
}

/// The source of an encoder that holds everything: asked for anything, it fails.
struct HeldOnly;

impl Umt5Source for HeldOnly {
    fn embedding_rows(&mut self, _: &[u32], _: DType, _: &Device) -> Result<Tensor> {
        Err(Error::Config {
            reason: "the encoder holds no token embedding and no source was given".into(),
        })
    }

    fn block(&mut self, index: usize, _: DType, _: &Device) -> Result<VarBuilder<'static>> {
        Err(Error::Config {
            reason: format!("block {index} is not held by the encoder and no source was given"),
        })
    }
}

/// The umT5 encoder (transformers `UMT5EncoderModel`, Wan's `T5Encoder`), with Wan's output
/// handling: rows past each sequence's true length are zero.
#[derive(Debug, Clone)]
pub struct Umt5Encoder {
    /// shape [vocab_size, d_model]; `None` when a [`Umt5Source`] gives the rows a forward needs.
    embedding: Option<Tensor>,
    /// `None` for a block a [`Umt5Source`] gives at each forward.
    blocks: Vec<Option<Block>>,
    /// How the checkpoint names the tensors a [`Umt5Source`] gives.
    keys: (KeyLayout, &'static str),
    final_norm: RmsNorm,
    cfg: Config,
    dtype: DType,
    device: Device,
}

impl Umt5Encoder {
    /// Builds the encoder from `vb`, which must answer to transformers names with the token
    /// embedding as `shared.weight` (a checkpoint wrapped by [`keys::canonical_var_builder`]).
    /// Computation runs in `vb`'s dtype and on its device.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let embedding = vb.get((cfg.vocab_size, cfg.d_model), "shared.weight")?;
        let keys = (KeyLayout::Transformers { embedding: None }, "");
        Self::with_embedding(cfg, vb, Some(embedding), keys, &|_| true)
    }

    fn with_embedding(
        cfg: &Config,
        vb: VarBuilder,
        embedding: Option<Tensor>,
        keys: (KeyLayout, &'static str),
        held: &dyn Fn(usize) -> bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                held(i)
                    .then(|| Block::new(cfg, vb.pp(format!("encoder.block.{i}"))))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embedding,
            blocks,
            keys,
            final_norm: RmsNorm::new(cfg, vb.pp("encoder.final_layer_norm"))?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Builds the encoder from a checkpoint's `VarBuilder` (empty path) in either key layout,
    /// with or without a known prefix ([`keys::KNOWN_PREFIXES`]); the configuration comes from
    /// the tensor shapes ([`Config::from_var_builder`]).
    pub fn from_checkpoint(vb: VarBuilder) -> Result<Self> {
        let (layout, prefix) = detect(&vb)?;
        let vb = keys::canonical_var_builder(vb, layout, prefix);
        let (cfg, embedding) = infer_config(&vb)?;
        tracing::debug!(?layout, prefix, ?cfg, "loading umT5 encoder");
        Self::with_embedding(&cfg, vb, Some(embedding), (layout, prefix), &|_| true)
    }

    /// Builds the encoder from a checkpoint's `VarBuilder` (empty path, either key layout)
    /// that holds the blocks for which `held` is true and the final norm, without the token
    /// embedding: a forward gets the embedding rows and the other blocks from a
    /// [`Umt5Source`] ([`Self::forward_with`]).
    pub fn from_checkpoint_partial(
        cfg: &Config,
        vb: VarBuilder,
        held: &dyn Fn(usize) -> bool,
    ) -> Result<Self> {
        let (layout, prefix) = detect(&vb)?;
        let vb = keys::canonical_var_builder(vb, layout, prefix);
        Self::with_embedding(cfg, vb, None, (layout, prefix), held)
    }

    /// Builds the encoder from a checkpoint's `VarBuilder` (empty path) in either key layout,
    /// with the given configuration instead of one read from the shapes.
    pub fn from_checkpoint_with_config(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (layout, prefix) = detect(&vb)?;
        tracing::debug!(?layout, prefix, ?cfg, "loading umT5 encoder");
        let vb = keys::canonical_var_builder(vb, layout, prefix);
        let embedding = vb.get((cfg.vocab_size, cfg.d_model), "shared.weight")?;
        Self::with_embedding(cfg, vb, Some(embedding), (layout, prefix), &|_| true)
    }

    /// Loads an encoder checkpoint file, the one call a command line needs: `.safetensors`
    /// (memory-mapped; transformers, ComfyUI or original-Wan names) or `.pth` / `.pt` / `.bin`
    /// (a `torch.save` state dict, e.g. Wan's `models_t5_umt5-xxl-enc-bf16.pth`). Weights are
    /// converted to `dtype` (f32, bf16 or f16) on `device`. With `config`, a transformers
    /// `config.json` sets the hyper-parameters; without, they are read from the shapes.
    pub fn from_file(
        path: impl AsRef<Path>,
        config: Option<&Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::from_files(&[path.as_ref()], config, dtype, device)
    }

    /// [`Self::from_file`] over the shards of one checkpoint (e.g. transformers'
    /// `model-0000N-of-0000M.safetensors`); `.pth`-style files must come alone.
    pub fn from_files<P: AsRef<Path>>(
        paths: &[P],
        config: Option<&Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let ext = |p: &Path| {
            p.extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
        };
        let paths: Vec<&Path> = paths.iter().map(AsRef::as_ref).collect();
        let first = *paths.first().ok_or_else(|| Error::Config {
            reason: "no checkpoint file given".to_string(),
        })?;
        let vb = if paths
            .iter()
            .all(|p| ext(p).as_deref() == Some("safetensors"))
        {
            // SAFETY: the files are mapped read-only; as with every mmap, they must not be
            // modified while the VarBuilder lives (tensors are copied out when built).
            #[allow(unsafe_code)]
            unsafe {
                VarBuilder::from_mmaped_safetensors(&paths, dtype, device)?
            }
        } else if paths.len() == 1 && matches!(ext(first).as_deref(), Some("pth" | "pt" | "bin")) {
            VarBuilder::from_pth(first, dtype, device)?
        } else {
            let bad = paths
                .iter()
                .find(|p| !matches!(ext(p).as_deref(), Some("safetensors")))
                .unwrap_or(&first);
            return Err(Error::UnsupportedFile {
                path: bad.to_path_buf(),
            });
        };
        match config {
            Some(c) => Self::from_checkpoint_with_config(&Config::from_json_file(c)?, vb),
            None => Self::from_checkpoint(vb),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The dtype computation runs in (the weights' dtype).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Encodes token ids into the text context Wan's DiT cross-attends to.
    ///
    /// Attention ignores keys where `attention_mask` is 0; afterwards, each row `b` keeps its
    /// first `n_b` positions, `n_b` = the number of mask entries > 0, and every later position
    /// is set to zero (diffusers' trim to the true length and zero-pad back, which is what
    /// ComfyUI's `zero_out_masked` gives too). Masks are expected as a prefix of ones.
    ///
    /// # Shapes
    /// - `input_ids`: [B, L], an integer dtype (u8, u32, i64), ids in `0..vocab_size`; Wan pads
    ///   with 0 to L = 512.
    /// - `attention_mask`: [B, L], any dtype, 1 for tokens, 0 for padding.
    /// - output: [B, L, d_model] in the model's dtype.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.forward_with(input_ids, attention_mask, &mut HeldOnly)
    }

    /// [`Self::forward`] with the embedding rows and the blocks the encoder does not hold from
    /// `source`.
    ///
    /// # Shapes
    /// As [`Self::forward`].
    pub fn forward_with(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        source: &mut dyn Umt5Source,
    ) -> Result<Tensor> {
        let _span = tracing::debug_span!("umt5.forward").entered();
        let (b, l) = dims_bl("input_ids", input_ids)?;
        if attention_mask.dims() != input_ids.dims() {
            return Err(Error::MaskShape {
                input_ids: input_ids.dims().to_vec(),
                attention_mask: attention_mask.dims().to_vec(),
            });
        }
        if !matches!(input_ids.dtype(), DType::U8 | DType::U32 | DType::I64) {
            return Err(Error::InputDType {
                tensor: "input_ids",
                expected: "an integer dtype (u8, u32 or i64)",
                got: input_ids.dtype(),
            });
        }
        let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let mut flat_ids = Vec::with_capacity(b * l);
        for (row, r) in ids.iter().enumerate() {
            for (position, &id) in r.iter().enumerate() {
                if id < 0 || id as usize >= self.cfg.vocab_size {
                    return Err(Error::TokenId {
                        row,
                        position,
                        id,
                        vocab_size: self.cfg.vocab_size,
                    });
                }
                flat_ids.push(id as u32);
            }
        }
        let mask = attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let lowest = lowest(self.dtype);
        let mask_bias: Vec<f32> = mask
            .iter()
            .flatten()
            .map(|&m| if m > 0.0 { 0.0 } else { lowest })
            .collect();
        let keep: Vec<u8> = mask
            .iter()
            .flat_map(|row| {
                let n = row.iter().filter(|&&m| m > 0.0).count();
                (0..l).map(move |t| u8::from(t < n))
            })
            .collect();
        let buckets: Vec<u32> = (0..l as i64)
            .flat_map(|q| {
                (0..l as i64).map(move |k| {
                    relative_position_bucket(
                        k - q,
                        self.cfg.relative_attention_num_buckets,
                        self.cfg.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let dev = &self.device;
        let ids = Tensor::from_vec(flat_ids, b * l, dev)?;
        let mask_bias = Tensor::from_vec(mask_bias, (b, 1, 1, l), dev)?.to_dtype(self.dtype)?;
        let buckets = Tensor::from_vec(buckets, l * l, dev)?;

        let embedded = match &self.embedding {
            Some(embedding) => embedding.index_select(&ids, 0)?,
            None => {
                let rows = ids.to_vec1::<u32>()?;
                source.embedding_rows(&rows, self.dtype, dev)?
            }
        };
        let mut x = embedded.reshape((b, l, self.cfg.d_model))?;
        for (i, block) in self.blocks.iter().enumerate() {
            let _span = tracing::trace_span!("umt5.block", i).entered();
            let streamed;
            let block = match block {
                Some(block) => block,
                None => {
                    let vb = source.block(i, self.dtype, dev)?;
                    let vb = keys::canonical_var_builder(vb, self.keys.0, self.keys.1);
                    streamed = Block::new(&self.cfg, vb.pp(format!("encoder.block.{i}")))?;
                    &streamed
                }
            };
            x = block.forward(&x, &buckets, &mask_bias)?;
        }
        let x = self.final_norm.forward(&x)?;
        let keep = Tensor::from_vec(keep, (b, l, 1), dev)?.broadcast_as(x.shape())?;
        Ok(keep.where_cond(&x, &x.zeros_like()?)?)
    }
}

/// The layout and prefix of a checkpoint, or the error listing what was looked for.
fn detect(vb: &VarBuilder) -> Result<(KeyLayout, &'static str)> {
    keys::detect_layout(vb).ok_or_else(|| Error::UnknownLayout {
        looked_for: keys::MARKERS.to_vec(),
        prefixes: keys::KNOWN_PREFIXES.to_vec(),
    })
}

/// `torch.finfo(dtype).min`, the mask fill of transformers and Wan.
fn lowest(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -65504.0,
        // bf16 0xFF7F, exactly representable in f32.
        DType::BF16 => -3.389_531_4e38,
        _ => f32::MIN,
    }
}

fn dims_bl(tensor: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    match t.dims() {
        &[b, l] if b > 0 && l > 0 => Ok((b, l)),
        got => Err(Error::Rank {
            tensor,
            layout: "[B, L]",
            got: got.to_vec(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxl_preset_is_valid() {
        Config::umt5_xxl().validate().unwrap();
    }

    #[test]
    fn bf16_lowest_is_exact() {
        let v = candle_core::Tensor::new(&[lowest(DType::BF16)], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(v[0], lowest(DType::BF16));
        assert!(v[0].is_finite());
    }

    #[test]
    fn config_json_variants() {
        // transformers' UMT5Config.to_json_string() fields for umt5-xxl (abridged).
        let hf = r#"{"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240,
            "num_layers": 24, "num_decoder_layers": 24, "num_heads": 64,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "dropout_rate": 0.1, "layer_norm_epsilon": 1e-06, "feed_forward_proj": "gated-gelu",
            "dense_act_fn": "gelu_new", "is_gated_act": true, "model_type": "umt5"}"#;
        assert_eq!(
            serde_json::from_str::<Config>(hf).unwrap(),
            Config::umt5_xxl()
        );
        // ComfyUI's umt5_config_xxl.json: no feed_forward_proj, no max_distance.
        let comfy = r#"{"d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn":
            "gelu_pytorch_tanh", "is_gated_act": true, "layer_norm_epsilon": 1e-06,
            "num_heads": 64, "num_layers": 24, "relative_attention_num_buckets": 32,
            "vocab_size": 256384}"#;
        assert_eq!(
            serde_json::from_str::<Config>(comfy).unwrap(),
            Config::umt5_xxl()
        );
        let relu = hf.replace("\"gated-gelu\"", "\"relu\"");
        let err = serde_json::from_str::<Config>(&relu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("feed-forward `relu` is not supported"),
            "{err}"
        );
    }
}
