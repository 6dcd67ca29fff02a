//! The CLIP vision encoder of Wan's image-to-video models: OpenCLIP's ViT-H/14 as
//! transformers' `CLIPVisionModel` runs it (`transformers/models/clip/modeling_clip.py`), and
//! the features Wan takes from it: the output of the next-to-last layer, before the final
//! norm (diffusers' `WanImageToVideoPipeline.encode_image`: `hidden_states[-2]`), 257 × 1280
//! for a 224-px image.
//!
//! An image is cut into patches (a strided convolution without bias), a class token is put
//! first, learned position embeddings are added, and a pre-norm transformer (layer norm,
//! self-attention over all tokens, layer norm, MLP with exact GELU) runs over them. Weights
//! are read in transformers' names (`vision_model.*`), which ComfyUI's
//! `clip_vision_h.safetensors` uses too.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::ops::attention::{attention, Attend};
use crate::ops::linear::{get_in_dtype, Linear};

/// The encoder's hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Token width.
    pub hidden_size: usize,
    /// The MLP's hidden width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Image channels (3).
    pub num_channels: usize,
    /// The square image's side in pixels.
    pub image_size: usize,
    /// The square patch's side in pixels.
    pub patch_size: usize,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
}

impl Config {
    /// OpenCLIP ViT-H/14 at 224 px (`open-clip-xlm-roberta-large-vit-huge-14`'s visual part,
    /// diffusers' `Wan2.1-I2V-14B-*-Diffusers/image_encoder/config.json`).
    pub fn vit_h_14() -> Self {
        Self {
            hidden_size: 1280,
            intermediate_size: 5120,
            num_layers: 32,
            num_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            layer_norm_eps: 1e-5,
        }
    }

    /// Tokens per image: the class token and one per patch.
    pub fn tokens(&self) -> usize {
        let side = self.image_size / self.patch_size.max(1);
        1 + side * side
    }

    /// Parameters of the encoder as [`ClipVisionEncoder`] loads it (the embeddings, the
    /// pre-norm and every layer), for memory plans; saturates at `u64::MAX`.
    pub fn parameter_count(&self) -> u64 {
        let d = self.hidden_size as u64;
        let patch = (self.num_channels * self.patch_size * self.patch_size) as u64;
        let layer = self.layer_parameter_count();
        let embeddings = d * patch + d + self.tokens() as u64 * d;
        (self.num_layers as u64)
            .saturating_mul(layer)
            .saturating_add(embeddings + 2 * d)
    }

    /// Parameters of one transformer layer: q, k, v and the output with biases, the MLP's
    /// two layers, two layer norms.
    pub fn layer_parameter_count(&self) -> u64 {
        let (d, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        4 * (d * d + d) + 2 * d * i + i + d + 4 * d
    }

    /// Checks the sizes fit together (heads divide the width, patches tile the image).
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::ClipConfig { reason });
        if [
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
            self.num_heads,
            self.num_channels,
            self.image_size,
            self.patch_size,
        ]
        .contains(&0)
        {
            return bad(format!("a size of 0 in {self:?}"));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden size {} is not a multiple of {} heads",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "image size {} is not a multiple of the patch size {}",
                self.image_size, self.patch_size
            ));
        }
        Ok(())
    }

    /// From a transformers `CLIPVisionConfig` (`config.json`; a `CLIPConfig`'s
    /// `vision_config` too).
    pub fn from_transformers_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Raw {
            vision_config: Option<Box<Raw>>,
            hidden_size: Option<usize>,
            intermediate_size: Option<usize>,
            num_hidden_layers: Option<usize>,
            num_attention_heads: Option<usize>,
            num_channels: Option<usize>,
            image_size: Option<usize>,
            patch_size: Option<usize>,
            layer_norm_eps: Option<f64>,
            hidden_act: Option<String>,
        }
        let raw: Raw = serde_json::from_str(text).map_err(|e| Error::ClipConfig {
            reason: format!("config.json: {e}"),
        })?;
        let raw = match raw.vision_config {
            Some(vision) => *vision,
            None => raw,
        };
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "gelu") {
            return Err(Error::ClipConfig {
                reason: format!("config.json: hidden_act {act:?}; vpipe runs \"gelu\""),
            });
        }
        // transformers' defaults are ViT-B/32's; a config without a size is not Wan's encoder.
        let need = |v: Option<usize>, name: &str| {
            v.ok_or_else(|| Error::ClipConfig {
                reason: format!("config.json: no {name}"),
            })
        };
        let cfg = Self {
            hidden_size: need(raw.hidden_size, "hidden_size")?,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads: need(raw.num_attention_heads, "num_attention_heads")?,
            num_channels: raw.num_channels.unwrap_or(3),
            image_size: need(raw.image_size, "image_size")?,
            patch_size: need(raw.patch_size, "patch_size")?,
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-5),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The layer a checkpoint key of the encoder belongs to (3 for
/// `vision_model.encoder.layers.3.mlp.fc1.weight` and `encoder.layers.3.…`); `None` for a key
/// outside the layers.
pub fn layer_of(key: &str) -> Option<usize> {
    let rest = key
        .strip_prefix("vision_model.")
        .unwrap_or(key)
        .strip_prefix("encoder.layers.")?;
    let (index, _) = rest.split_once('.')?;
    index.parse().ok()
}

/// Layer norm with weight and bias, computed in f32 and returned in the input's dtype.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: get_in_dtype(&vb, dim, "weight", DType::F32)?,
            bias: get_in_dtype(&vb, dim, "bias", DType::F32)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let normed = candle_nn::ops::layer_norm(
            &x.to_dtype(DType::F32)?,
            &self.weight,
            &self.bias,
            self.eps as f32,
        )?;
        Ok(normed.to_dtype(x.dtype())?)
    }
}

/// One pre-norm transformer layer.
#[derive(Debug, Clone)]
struct EncoderLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    num_heads: usize,
}

impl EncoderLayer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let attn = vb.pp("self_attn");
        Ok(Self {
            norm1: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            q: Linear::new(d, d, true, attn.pp("q_proj"))?,
            k: Linear::new(d, d, true, attn.pp("k_proj"))?,
            v: Linear::new(d, d, true, attn.pp("v_proj"))?,
            out: Linear::new(d, d, true, attn.pp("out_proj"))?,
            norm2: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: Linear::new(d, i, true, vb.pp("mlp").pp("fc1"))?,
            fc2: Linear::new(i, d, true, vb.pp("mlp").pp("fc2"))?,
            num_heads: cfg.num_heads,
        })
    }

    /// # Shapes
    /// - `x`: [B, L, hidden] → [B, L, hidden]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, self.num_heads, d / self.num_heads))?
                .transpose(1, 2)?)
        };
        let h = self.norm1.forward(x)?;
        let (q, k, v) = (
            heads(self.q.forward(&h)?)?,
            heads(self.k.forward(&h)?)?,
            heads(self.v.forward(&h)?)?,
        );
        // 257 tokens: every query row at once through matmul and softmax (0.3 MB of scores per
        // head; a fused kernel would gain nothing measurable here).
        let attended = attention(&q, &k, &v, Attend::chunked(l))?;
        let attended = attended.transpose(1, 2)?.reshape((b, l, d))?;
        let x = (x + self.out.forward(&attended)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?;
        Ok((&x + self.fc2.forward(&h)?)?)
    }
}

/// The CLIP vision encoder (ViT), up to its last layer's output (no final norm, no projection:
/// Wan does not use them).
#[derive(Debug, Clone)]
pub struct ClipVisionEncoder {
    /// The patch convolution as a matrix: [hidden, channels · patch²].
    patch_weight: Tensor,
    /// [hidden]
    class_embedding: Tensor,
    /// [tokens, hidden]
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    /// The layers the encoder holds; `None` for a layer a [`LayerSource`] gives at each
    /// forward.
    layers: Vec<Option<EncoderLayer>>,
    /// The checkpoint's prefix of the names a [`LayerSource`] gives (`vision_model.` or
    /// none).
    prefix: &'static str,
    cfg: Config,
    dtype: DType,
}

/// Where a forward gets the layers an encoder built with
/// [`ClipVisionEncoder::from_checkpoint_partial`] does not hold: a stream of them through a
/// fixed arena, for example.
pub trait LayerSource {
    /// The tensors of layer `index`, named as in the checkpoint the encoder was built from, on
    /// `device`, as a `VarBuilder` in `dtype`; valid until the layer's forward is done.
    fn layer(&mut self, index: usize, dtype: DType, device: &Device)
        -> Result<VarBuilder<'static>>;
}

/// The source of an encoder that holds every layer: asked for one, it fails.
pub struct HeldLayers;

impl LayerSource for HeldLayers {
    fn layer(&mut self, index: usize, _: DType, _: &Device) -> Result<VarBuilder<'static>> {
        Err(Error::ClipConfig {
            reason: format!("layer {index} is not held by the encoder and no source was given"),
        })
    }
}

impl ClipVisionEncoder {
    /// Builds the encoder from `vb` in transformers' names without the `vision_model.` prefix
    /// (`embeddings.*`, `pre_layrnorm.*`, `encoder.layers.N.*`), in `vb`'s dtype.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::with_layers(cfg, vb, "", &|_| true)
    }

    /// [`Self::new`] holding the layers for which `held` is true; `prefix` is the
    /// checkpoint's, for the names a [`LayerSource`] gives.
    fn with_layers(
        cfg: &Config,
        vb: VarBuilder,
        prefix: &'static str,
        held: &dyn Fn(usize) -> bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let embeddings = vb.pp("embeddings");
        let patch_weight = get_in_dtype(
            &embeddings.pp("patch_embedding"),
            (d, c, p, p),
            "weight",
            vb.dtype(),
        )?
        .reshape((d, c * p * p))?;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                held(i)
                    .then(|| EncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_weight,
            class_embedding: get_in_dtype(&embeddings, d, "class_embedding", vb.dtype())?,
            position_embedding: get_in_dtype(
                &embeddings.pp("position_embedding"),
                (cfg.tokens(), d),
                "weight",
                vb.dtype(),
            )?,
            pre_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
            prefix,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Builds the encoder from a checkpoint's `VarBuilder` (empty path) in transformers' or
    /// ComfyUI's names (`vision_model.*`, with or without that prefix).
    pub fn from_checkpoint(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::from_checkpoint_partial(cfg, vb, &|_| true)
    }

    /// [`Self::from_checkpoint`] over a checkpoint's `VarBuilder` that holds the layers for
    /// which `held` is true and every tensor outside the layers; a forward gets the others
    /// from a [`LayerSource`] ([`Self::image_features_with`]).
    pub fn from_checkpoint_partial(
        cfg: &Config,
        vb: VarBuilder,
        held: &dyn Fn(usize) -> bool,
    ) -> Result<Self> {
        if vb.contains_tensor("vision_model.embeddings.class_embedding") {
            Self::with_layers(cfg, vb.pp("vision_model"), "vision_model.", held)
        } else {
            Self::with_layers(cfg, vb, "", held)
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The hidden states after the first `layers` layers (the embeddings after the
    /// pre-layernorm for 0).
    ///
    /// # Shapes
    /// - `pixel_values`: [B, channels, image_size, image_size], normalised as CLIP's image
    ///   processor does.
    /// - output: [B, tokens, hidden] in the encoder's dtype.
    ///
    /// # Errors
    /// [`Error::ClipInput`] for `pixel_values` of a shape other than the above;
    /// [`Error::ClipConfig`] for more layers than the model has.
    pub fn hidden_states(&self, pixel_values: &Tensor, layers: usize) -> Result<Tensor> {
        self.hidden_states_with(pixel_values, layers, &mut HeldLayers)
    }

    /// [`Self::hidden_states`] with the layers the encoder does not hold from `source`.
    ///
    /// # Shapes
    /// As [`Self::hidden_states`].
    pub fn hidden_states_with(
        &self,
        pixel_values: &Tensor,
        layers: usize,
        source: &mut dyn LayerSource,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (s, p, c) = (cfg.image_size, cfg.patch_size, cfg.num_channels);
        let dims = pixel_values.dims();
        if dims.len() != 4 || dims[1] != c || dims[2] != s || dims[3] != s || dims[0] == 0 {
            return Err(Error::ClipInput {
                tensor: "pixel_values",
                reason: format!("expected [B, {c}, {s}, {s}] with B ≥ 1, got {dims:?}"),
            });
        }
        if layers > self.layers.len() {
            return Err(Error::ClipConfig {
                reason: format!(
                    "{layers} layers asked for, the model has {}",
                    self.layers.len()
                ),
            });
        }
        let b = dims[0];
        let g = s / p;
        // [B, C, g, p, g, p] → [B, g, g, C, p, p]: each patch flattened as the convolution's
        // kernel is (channel, row, column), patches in row-major order.
        let patches = pixel_values
            .to_dtype(self.dtype)?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, g * g, c * p * p))?;
        let patches = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let class = self
            .class_embedding
            .reshape((1, 1, cfg.hidden_size))?
            .broadcast_as((b, 1, cfg.hidden_size))?;
        let x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_norm.forward(&x)?;
        for (index, layer) in self.layers[..layers].iter().enumerate() {
            x = match layer {
                Some(layer) => layer.forward(&x)?,
                None => {
                    let vb = source.layer(index, self.dtype, pixel_values.device())?;
                    let vb = vb.pp(format!("{}encoder.layers.{index}", self.prefix));
                    EncoderLayer::new(&self.cfg, vb)?.forward(&x)?
                }
            };
        }
        Ok(x)
    }

    /// The image features Wan's DiT consumes: the output of the next-to-last layer.
    ///
    /// # Shapes
    /// - `pixel_values`: as [`Self::hidden_states`].
    /// - output: [B, tokens, hidden] (257 × 1280 for ViT-H/14).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.image_features_with(pixel_values, &mut HeldLayers)
    }

    /// [`Self::image_features`] with the layers the encoder does not hold from `source`.
    ///
    /// # Shapes
    /// As [`Self::image_features`].
    pub fn image_features_with(
        &self,
        pixel_values: &Tensor,
        source: &mut dyn LayerSource,
    ) -> Result<Tensor> {
        self.hidden_states_with(pixel_values, self.layers.len().saturating_sub(1), source)
    }

    /// Loads an encoder file (`.safetensors` or `.pth`) in `dtype` on `device`.
    pub fn from_file(
        path: impl AsRef<std::path::Path>,
        cfg: &Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vb = crate::checkpoint::var_builder_from_file(path, dtype, device)?;
        Self::from_checkpoint(cfg, vb)
    }
}
