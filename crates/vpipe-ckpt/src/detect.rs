//! What a checkpoint is, from its tensor names and shapes alone.
//!
//! [`detect`] is a pure function over `(name, shape, dtype)` triples: it finds the model family, the
//! key naming, a key prefix in front of all names, and the configuration the shapes imply, the way
//! ComfyUI recognises checkpoints (`comfy/model_detection.py`: the DiT by `head.modulation`, heads =
//! dim / 128, layers counted from `blocks.N.`). Key names and shapes are those of
//! the published Wan 2.1 checkpoints (DiT, umT5, VAE) and LoRA files.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::Serialize;

use crate::DType;

/// One tensor as detection sees it: its name, shape and dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorMeta<'a> {
    /// Full key, prefix included.
    pub name: &'a str,
    /// Shape.
    pub shape: &'a [usize],
    /// Element type.
    pub dtype: DType,
}

/// The kind of model a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Wan 2.1 diffusion transformer, text-to-video (`in_dim` 16).
    WanDitT2v,
    /// Wan 2.1 diffusion transformer, image-to-video: has `img_emb`, `cross_attn.k_img`/`v_img`
    /// and `in_dim` 36.
    WanDitI2v,
    /// Wan 2.2 TI2V diffusion transformer (TI2V-5B): `in_dim` and `out_dim` 48 (the Wan 2.2
    /// VAE's latents), no image cross-attention; text- and image-to-video alike.
    WanDitTi2v,
    /// Wan 2.1 causal 3D VAE (also Wan 2.2 A14B's).
    WanVae,
    /// Wan 2.2 causal 3D VAE (TI2V-5B's): residual stages, 2×2 patches, 48 latent channels.
    WanVae22,
    /// umT5 text encoder (encoder only; per-layer relative position bias).
    Umt5Encoder,
    /// CLIP vision tower (open-clip xlm-roberta ViT-H/14 in Wan I2V).
    ClipVision,
    /// A LoRA (or diff patch) for the Wan DiT.
    WanLora,
    /// None of the above.
    Unknown,
}

impl Family {
    /// A short human name ("Wan 2.1 DiT, image-to-video").
    pub fn describe(self) -> &'static str {
        match self {
            Self::WanDitT2v => "Wan 2.1 DiT, text-to-video",
            Self::WanDitI2v => "Wan 2.1 DiT, image-to-video",
            Self::WanDitTi2v => "Wan 2.2 DiT, text-image-to-video (TI2V)",
            Self::WanVae => "Wan 2.1 VAE",
            Self::WanVae22 => "Wan 2.2 VAE",
            Self::Umt5Encoder => "umT5 text encoder",
            Self::ClipVision => "CLIP vision encoder",
            Self::WanLora => "LoRA for the Wan DiT",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Which naming scheme the keys follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyLayout {
    /// The original Wan code's names (`blocks.0.self_attn.q`, `encoder.downsamples.0`,
    /// `token_embedding`, `visual.transformer.0`). ComfyUI's repackaged DiT and VAE files use these
    /// too, often behind a `model.diffusion_model.` prefix.
    Wan,
    /// diffusers (DiT, VAE, LoRA) or Hugging Face transformers (umT5, CLIP) names
    /// (`blocks.0.attn1.to_q`, `encoder.block.0.layer.0.SelfAttention.q`). ComfyUI's umT5 and
    /// `clip_vision_h` files use these.
    Diffusers,
    /// open_clip's names (`visual.transformer.resblocks.0`).
    OpenClip,
    /// Not recognised.
    Unknown,
}

/// How a LoRA file stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// PEFT names: `<module>.lora_A.weight` / `.lora_B.weight`.
    PeftAB,
    /// kohya-style dotted names: `<module>.lora_down.weight` / `.lora_up.weight` (+ `.alpha`).
    DownUp,
    /// kohya / musubi-tuner flat names: `lora_unet_blocks_0_self_attn_q.lora_down.weight`.
    KohyaFlat,
    /// Wan-Fun flat names with a double underscore: `lora_unet__blocks_0_cross_attn_k…`.
    WanFunFlat,
    /// Only full or bias deltas (`.diff`, `.diff_b`), no low-rank pairs.
    DiffOnly,
}

/// Configuration of a Wan DiT, from its tensor shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DitConfig {
    /// Hidden size (`patch_embedding.weight` dim 0).
    pub dim: usize,
    /// FFN inner size (`blocks.0.ffn.0.weight` dim 0).
    pub ffn_dim: usize,
    /// Number of transformer blocks (distinct `blocks.N`).
    pub num_layers: usize,
    /// Attention heads, `dim / 128` (Wan's head size is 128).
    pub num_heads: usize,
    /// Latent channels in (`patch_embedding.weight` dim 1): 16 for T2V, 36 for I2V.
    pub in_dim: usize,
    /// Latent channels out (`head.head.weight` rows / patch volume).
    pub out_dim: usize,
    /// Text embedding width (`text_embedding.0.weight` dim 1), 4096 for umT5-XXL.
    pub text_dim: usize,
    /// Sinusoidal time embedding width (`time_embedding.0.weight` dim 1).
    pub freq_dim: usize,
    /// Patch size (t, h, w), from the patch embedding kernel.
    pub patch_size: [usize; 3],
    /// Has image cross-attention (`k_img`/`v_img`, `img_emb`).
    pub image_conditioning: bool,
    /// Has `img_emb.emb_pos` (first-last-frame-to-video).
    pub first_last_frame: bool,
    /// Has RMS norms on q and k.
    pub qk_norm: bool,
    /// Has the affine norm before cross-attention.
    pub cross_attn_norm: bool,
    /// "1.3B", "14B" or "5B" when dim, ffn_dim and layers match a released Wan size.
    pub size_name: Option<&'static str>,
}

/// Configuration of a Wan VAE, from its tensor shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VaeConfig {
    /// Base channel count (`encoder.conv1.weight` dim 0), 96 for Wan 2.1.
    pub base_dim: usize,
    /// Latent channels (`conv2.weight` dim 0), 16 for Wan 2.1.
    pub z_dim: usize,
    /// Channel multipliers per encoder stage ([1, 2, 4, 4] for Wan 2.1), when the encoder's
    /// block list can be read.
    pub dim_mult: Option<Vec<usize>>,
    /// Residual blocks per encoder stage.
    pub num_res_blocks: Option<usize>,
    /// Which encoder downsamples also halve time (`[false, true, true]` for Wan 2.1).
    pub temporal_downsample: Option<Vec<bool>>,
    /// The decoder's base channel count when it differs from `base_dim` (Wan 2.2: 256), from
    /// the decoder's output convolution.
    pub decoder_base_dim: Option<usize>,
    /// Side of the square patches the video is folded into before the encoder (Wan 2.2: 2,
    /// from its 12 input channels); `None` for a VAE that takes the frames as they are.
    pub patch_size: Option<usize>,
}

/// Configuration of a umT5 encoder, from its tensor shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Umt5Config {
    /// Model width (4096 for XXL).
    pub d_model: usize,
    /// FFN inner width (10240 for XXL).
    pub d_ff: usize,
    /// Encoder layers (24 for XXL).
    pub num_layers: usize,
    /// Attention heads (64 for XXL), from the relative position bias table.
    pub num_heads: usize,
    /// Per-head width (64 for XXL).
    pub d_kv: usize,
    /// Vocabulary size (256384).
    pub vocab_size: usize,
    /// Relative position buckets (32).
    pub num_buckets: usize,
    /// The file carries the SentencePiece model as a `spiece_model` tensor (ComfyUI).
    pub has_tokenizer: bool,
}

/// Configuration of a CLIP vision tower, from its tensor shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClipConfig {
    /// Transformer width (1280 for ViT-H).
    pub width: usize,
    /// Transformer layers (32 for ViT-H).
    pub num_layers: usize,
    /// MLP inner width (5120 for ViT-H).
    pub mlp_dim: Option<usize>,
    /// Patch size (14).
    pub patch_size: usize,
    /// Positions including the class token (257 at 224 px).
    pub num_positions: Option<usize>,
    /// Image size implied by the positions and the patch size (224).
    pub image_size: Option<usize>,
    /// Output projection width, when present (1024).
    pub projection_dim: Option<usize>,
    /// The file also holds a text tower.
    pub has_text_tower: bool,
    /// "ViT-H/14" when width, layers and patch match it.
    pub size_name: Option<&'static str>,
}

/// What a LoRA file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoraConfig {
    /// Key format.
    pub format: LoraFormat,
    /// Distinct ranks (rows of the down / A matrices), ascending.
    pub ranks: Vec<usize>,
    /// Number of distinct target modules.
    pub targets: usize,
    /// Number of `.alpha` tensors (0: ComfyUI uses scale 1.0).
    pub alphas: usize,
    /// Number of full-weight deltas (`.diff`).
    pub diffs: usize,
    /// Number of bias deltas (`.diff_b`).
    pub bias_diffs: usize,
    /// Distinct DiT block indices touched.
    pub blocks: usize,
    /// Input width of the self-attention q target, i.e. the base model's dim, when present.
    pub base_dim: Option<usize>,
    /// "1.3B" or "14B" when `base_dim` matches.
    pub base_size: Option<&'static str>,
}

/// The configuration detected for a family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelConfig {
    /// A Wan DiT.
    Dit(DitConfig),
    /// A Wan VAE.
    Vae(VaeConfig),
    /// A umT5 encoder.
    Umt5(Umt5Config),
    /// A CLIP vision tower.
    Clip(ClipConfig),
    /// A LoRA.
    Lora(LoraConfig),
}

/// The result of [`detect`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detection {
    /// Model family.
    pub family: Family,
    /// Key naming scheme.
    pub layout: KeyLayout,
    /// Prefix in front of the model's keys (`"model.diffusion_model."`, `"diffusion_model."`,
    /// `"transformer."`, `"lora_unet_"`, …); empty when there is none. Strip it to get the names
    /// of [`DitConfig`] and friends.
    pub prefix: String,
    /// Configuration implied by the shapes; `None` when the family is unknown or a key the
    /// configuration needs is missing (a note then says which).
    pub config: Option<ModelConfig>,
    /// Remarks: missing keys, extra tensors, fp8 scaling, unusual values.
    pub notes: Vec<String>,
}

impl Detection {
    /// A human description of the key layout for this family ("original Wan / ComfyUI").
    pub fn layout_description(&self) -> &'static str {
        match (self.family, self.layout) {
            (_, KeyLayout::Unknown) => "unknown",
            (_, KeyLayout::OpenClip) => "open_clip",
            (Family::Umt5Encoder, KeyLayout::Wan) => "original Wan (t5.py)",
            (Family::Umt5Encoder, KeyLayout::Diffusers) => "transformers (as in ComfyUI)",
            (Family::ClipVision, KeyLayout::Wan) => "original Wan (clip.py)",
            (Family::ClipVision, KeyLayout::Diffusers) => {
                "transformers (as in ComfyUI clip_vision_h)"
            }
            (Family::Unknown, KeyLayout::Wan) => "original Wan",
            (Family::Unknown, KeyLayout::Diffusers) => "diffusers / transformers",
            (_, KeyLayout::Wan) => "original Wan / ComfyUI",
            (_, KeyLayout::Diffusers) => "diffusers",
        }
    }
}

/// Detects family, key layout, prefix and configuration from tensor names and shapes.
///
/// Pure: it looks at nothing but its input, so it works the same on a file's header, a synthetic
/// list in a test, or names collected from several shards.
pub fn detect<'a>(tensors: impl IntoIterator<Item = TensorMeta<'a>>) -> Detection {
    let tensors: Vec<TensorMeta<'a>> = tensors.into_iter().collect();
    let lora_like = tensors
        .iter()
        .filter(|t| lora_part(t.name).is_some())
        .count();
    if lora_like > 0 && lora_like * 2 >= tensors.len() {
        return detect_lora(&tensors);
    }
    detect_model(&tensors)
}

// ---------------------------------------------------------------------------------------------
// Models

/// An anchor key: if `suffix` is present (after some prefix), the file is `family` in `layout`.
struct Anchor {
    suffix: &'static str,
    family: Family,
    layout: KeyLayout,
}

const ANCHORS: &[Anchor] = &[
    // ComfyUI's own test for a Wan DiT.
    Anchor {
        suffix: "head.modulation",
        family: Family::WanDitT2v,
        layout: KeyLayout::Wan,
    },
    Anchor {
        suffix: "condition_embedder.time_embedder.linear_1.weight",
        family: Family::WanDitT2v,
        layout: KeyLayout::Diffusers,
    },
    Anchor {
        suffix: "encoder.downsamples.0.residual.0.gamma",
        family: Family::WanVae,
        layout: KeyLayout::Wan,
    },
    Anchor {
        suffix: "encoder.down_blocks.0.norm1.gamma",
        family: Family::WanVae,
        layout: KeyLayout::Diffusers,
    },
    // Wan 2.2's VAE groups its encoder blocks per stage, in both layouts.
    Anchor {
        suffix: "encoder.downsamples.0.downsamples.0.residual.0.gamma",
        family: Family::WanVae22,
        layout: KeyLayout::Wan,
    },
    Anchor {
        suffix: "encoder.down_blocks.0.resnets.0.norm1.gamma",
        family: Family::WanVae22,
        layout: KeyLayout::Diffusers,
    },
    Anchor {
        suffix: "blocks.0.pos_embedding.embedding.weight",
        family: Family::Umt5Encoder,
        layout: KeyLayout::Wan,
    },
    Anchor {
        suffix: "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        family: Family::Umt5Encoder,
        layout: KeyLayout::Diffusers,
    },
    Anchor {
        suffix: "visual.transformer.0.attn.to_qkv.weight",
        family: Family::ClipVision,
        layout: KeyLayout::Wan,
    },
    Anchor {
        suffix: "vision_model.encoder.layers.0.self_attn.q_proj.weight",
        family: Family::ClipVision,
        layout: KeyLayout::Diffusers,
    },
    Anchor {
        suffix: "visual.transformer.resblocks.0.attn.in_proj_weight",
        family: Family::ClipVision,
        layout: KeyLayout::OpenClip,
    },
];

/// Names and shapes of one component, prefix stripped.
struct Keys<'a> {
    map: HashMap<&'a str, &'a [usize]>,
}

impl<'a> Keys<'a> {
    fn shape(&self, key: &str) -> Result<&'a [usize], String> {
        self.map
            .get(key)
            .copied()
            .ok_or_else(|| format!("missing key {key}"))
    }

    /// Dimension `i` of `key`'s shape.
    fn dim(&self, key: &str, i: usize) -> Result<usize, String> {
        let s = self.shape(key)?;
        s.get(i)
            .copied()
            .ok_or_else(|| format!("{key} has shape {s:?}, expected at least {} dims", i + 1))
    }

    fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    fn any_prefix(&self, p: &str) -> bool {
        self.map.keys().any(|k| k.starts_with(p))
    }

    /// Distinct `N` in keys `"{head}N."`.
    fn indices(&self, head: &str) -> BTreeSet<usize> {
        self.map
            .keys()
            .filter_map(|k| k.strip_prefix(head))
            .filter_map(|rest| rest.split('.').next()?.parse().ok())
            .collect()
    }
}

fn detect_model(tensors: &[TensorMeta<'_>]) -> Detection {
    // Every (anchor, prefix) that occurs, with how many tensors sit under the prefix.
    let mut found: Vec<(&Anchor, &str, usize)> = Vec::new();
    for anchor in ANCHORS {
        for t in tensors {
            let Some(prefix) = t.name.strip_suffix(anchor.suffix) else {
                continue;
            };
            if !(prefix.is_empty() || prefix.ends_with('.')) {
                continue;
            }
            if found
                .iter()
                .any(|(a, p, _)| std::ptr::eq(*a, anchor) && *p == prefix)
            {
                continue;
            }
            let n = tensors
                .iter()
                .filter(|t| t.name.starts_with(prefix))
                .count();
            found.push((anchor, prefix, n));
        }
    }
    // The component that covers the most tensors wins; ties go to the earlier anchor.
    let Some(&(anchor, prefix, covered)) = found
        .iter()
        .enumerate()
        .max_by_key(|(i, (_, _, n))| (*n, std::cmp::Reverse(*i)))
        .map(|(_, f)| f)
    else {
        return Detection {
            family: Family::Unknown,
            layout: KeyLayout::Unknown,
            prefix: String::new(),
            config: None,
            notes: if tensors.is_empty() {
                vec!["the file holds no tensors".into()]
            } else {
                vec![]
            },
        };
    };

    let mut notes = Vec::new();
    for (other, p, n) in &found {
        if !(std::ptr::eq(*other, anchor) && *p == prefix) {
            notes.push(format!(
                "also holds a {} ({} names) under prefix {p:?} ({n} tensors)",
                other.family.describe(),
                layout_word(other.layout),
            ));
        }
    }
    if covered < tensors.len() {
        notes.push(format!(
            "{} tensors are outside prefix {prefix:?}",
            tensors.len() - covered
        ));
    }

    let keys = Keys {
        map: tensors
            .iter()
            .filter_map(|t| Some((t.name.strip_prefix(prefix)?, t.shape)))
            .collect(),
    };
    let scale_weights = tensors
        .iter()
        .filter(|t| t.name.ends_with(".scale_weight"))
        .count();
    if scale_weights > 0 || tensors.iter().any(|t| t.name.ends_with("scaled_fp8")) {
        notes.push(format!(
            "fp8 scaled weights (ComfyUI): {scale_weights} scale_weight tensors; weights must be multiplied by them"
        ));
    }

    let mut family = anchor.family;
    let config = match anchor.family {
        Family::WanDitT2v => dit_config(&keys, anchor.layout).map(|c| {
            if c.image_conditioning || c.in_dim == 36 {
                family = Family::WanDitI2v;
            } else if c.in_dim == TI2V_LATENT_CHANNELS && c.out_dim == TI2V_LATENT_CHANNELS {
                family = Family::WanDitTi2v;
            }
            if c.dim % 128 != 0 {
                notes.push(format!("dim {} is not a multiple of the head size 128", c.dim));
            }
            let expected_in = match family {
                Family::WanDitI2v => 36,
                Family::WanDitTi2v => TI2V_LATENT_CHANNELS,
                _ => 16,
            };
            if c.in_dim != expected_in {
                notes.push(format!(
                    "in_dim {} differs from Wan 2.1's {expected_in} for this task (a Fun/VACE/2.2 variant?)",
                    c.in_dim
                ));
            }
            ModelConfig::Dit(c)
        }),
        Family::WanVae => vae_config(&keys, anchor.layout).map(ModelConfig::Vae),
        Family::WanVae22 => vae22_config(&keys, anchor.layout).map(ModelConfig::Vae),
        Family::Umt5Encoder => umt5_config(&keys, anchor.layout).and_then(|c| {
            if c.num_layers > 1 && !keys.has(&umt5_bias_key(anchor.layout, 1)) {
                family = Family::Unknown;
                Err("a T5 encoder whose position bias is shared across layers: T5, not umT5".into())
            } else {
                Ok(ModelConfig::Umt5(c))
            }
        }),
        Family::ClipVision => clip_config(&keys, anchor.layout).map(ModelConfig::Clip),
        Family::WanDitI2v | Family::WanDitTi2v | Family::WanLora | Family::Unknown => {
            Err("no config".into())
        }
    };
    let config = match config {
        Ok(c) => Some(c),
        Err(why) if family == Family::Unknown => {
            notes.push(why);
            None
        }
        Err(missing) => {
            notes.push(format!("configuration not derivable: {missing}"));
            None
        }
    };
    Detection {
        family,
        layout: anchor.layout,
        prefix: prefix.to_owned(),
        config,
        notes,
    }
}

fn layout_word(l: KeyLayout) -> &'static str {
    match l {
        KeyLayout::Wan => "original Wan",
        KeyLayout::Diffusers => "diffusers/transformers",
        KeyLayout::OpenClip => "open_clip",
        KeyLayout::Unknown => "unknown",
    }
}

/// Latent channels of the Wan 2.2 VAE, which a TI2V DiT takes in and gives out.
const TI2V_LATENT_CHANNELS: usize = 48;

fn wan_size_name(dim: usize, ffn_dim: usize, layers: usize) -> Option<&'static str> {
    // Wan2.1 `wan/configs/wan_t2v_1_3B.py` and `wan_t2v_14B.py` / `wan_i2v_14B.py`; Wan2.2
    // `wan/configs/wan_ti2v_5B.py`.
    match (dim, ffn_dim, layers) {
        (1536, 8960, 30) => Some("1.3B"),
        (5120, 13824, 40) => Some("14B"),
        (3072, 14336, 30) => Some("5B"),
        _ => None,
    }
}

fn dit_config(k: &Keys<'_>, layout: KeyLayout) -> Result<DitConfig, String> {
    let wan = layout == KeyLayout::Wan;
    let pe = k.shape("patch_embedding.weight")?;
    let [dim, in_dim, pt, ph, pw] = pe[..] else {
        return Err(format!(
            "patch_embedding.weight has shape {pe:?}, expected 5 dims"
        ));
    };
    let text_dim = k.dim(
        if wan {
            "text_embedding.0.weight"
        } else {
            "condition_embedder.text_embedder.linear_1.weight"
        },
        1,
    )?;
    let freq_dim = k.dim(
        if wan {
            "time_embedding.0.weight"
        } else {
            "condition_embedder.time_embedder.linear_1.weight"
        },
        1,
    )?;
    let ffn_dim = k.dim(
        if wan {
            "blocks.0.ffn.0.weight"
        } else {
            "blocks.0.ffn.net.0.proj.weight"
        },
        0,
    )?;
    let head_rows = k.dim(
        if wan {
            "head.head.weight"
        } else {
            "proj_out.weight"
        },
        0,
    )?;
    // Shapes come from the file: a hostile one may overflow the product (then 0, "unknown").
    let patch_volume = pt.checked_mul(ph).and_then(|v| v.checked_mul(pw));
    let out_dim = patch_volume
        .and_then(|v| head_rows.checked_div(v))
        .unwrap_or(0);
    let num_layers = k.indices("blocks.").len();
    let image_conditioning = if wan {
        k.has("blocks.0.cross_attn.k_img.weight") || k.any_prefix("img_emb.")
    } else {
        k.has("blocks.0.attn2.add_k_proj.weight")
            || k.any_prefix("condition_embedder.image_embedder.")
    };
    Ok(DitConfig {
        dim,
        ffn_dim,
        num_layers,
        num_heads: dim / 128,
        in_dim,
        out_dim,
        text_dim,
        freq_dim,
        patch_size: [pt, ph, pw],
        image_conditioning,
        first_last_frame: k.has(if wan {
            "img_emb.emb_pos"
        } else {
            "condition_embedder.image_embedder.pos_embed"
        }),
        qk_norm: k.has(if wan {
            "blocks.0.self_attn.norm_q.weight"
        } else {
            "blocks.0.attn1.norm_q.weight"
        }),
        cross_attn_norm: k.has(if wan {
            "blocks.0.norm3.weight"
        } else {
            "blocks.0.norm2.weight"
        }),
        size_name: wan_size_name(dim, ffn_dim, num_layers),
    })
}

fn vae_config(k: &Keys<'_>, layout: KeyLayout) -> Result<VaeConfig, String> {
    let wan = layout == KeyLayout::Wan;
    let base_dim = k.dim(
        if wan {
            "encoder.conv1.weight"
        } else {
            "encoder.conv_in.weight"
        },
        0,
    )?;
    let z_dim = k.dim(
        if wan {
            "conv2.weight"
        } else {
            "post_quant_conv.weight"
        },
        0,
    )?;
    let (blocks, residual_out, resample, time_conv) = if wan {
        (
            "encoder.downsamples.",
            "residual.6.weight",
            "resample.1.weight",
            "time_conv.weight",
        )
    } else {
        (
            "encoder.down_blocks.",
            "conv2.weight",
            "resample.1.weight",
            "time_conv.weight",
        )
    };
    // The encoder is a flat list: per stage, residual blocks then (except after the last stage) a
    // resample. Walk it in index order.
    let mut stages: Vec<(Vec<usize>, bool)> = vec![(Vec::new(), false)];
    let mut temporal = Vec::new();
    let mut readable = true;
    for n in k.indices(blocks) {
        let key = |s: &str| format!("{blocks}{n}.{s}");
        if let Ok(c) = k.dim(&key(residual_out), 0) {
            if let Some(last) = stages.last_mut() {
                last.0.push(c);
            }
        } else if k.has(&key(resample)) {
            temporal.push(k.has(&key(time_conv)));
            if let Some(last) = stages.last_mut() {
                last.1 = true;
            }
            stages.push((Vec::new(), false));
        } else {
            readable = false;
        }
    }
    let ok = readable && base_dim > 0 && stages.iter().all(|(r, _)| !r.is_empty());
    let dim_mult = ok.then(|| {
        stages
            .iter()
            .map(|(r, _)| r[r.len() - 1] / base_dim)
            .collect()
    });
    let num_res_blocks = ok.then(|| stages[0].0.len());
    Ok(VaeConfig {
        base_dim,
        z_dim,
        dim_mult,
        num_res_blocks,
        temporal_downsample: (ok && !temporal.is_empty()).then_some(temporal),
        decoder_base_dim: None,
        patch_size: None,
    })
}

/// The Wan 2.2 VAE's configuration: its encoder is a list of stages
/// (`encoder.downsamples.i.downsamples.j`, diffusers `encoder.down_blocks.i.resnets.j` and
/// `.downsampler`), its decoder has a base width of its own (the output convolution's input
/// over `dim_mult[0]`), and it folds the frames into p×p patches (3·p² input channels).
fn vae22_config(k: &Keys<'_>, layout: KeyLayout) -> Result<VaeConfig, String> {
    let wan = layout == KeyLayout::Wan;
    let (conv_in, quant, conv_out) = if wan {
        (
            "encoder.conv1.weight",
            "conv2.weight",
            "decoder.head.2.weight",
        )
    } else {
        (
            "encoder.conv_in.weight",
            "post_quant_conv.weight",
            "decoder.conv_out.weight",
        )
    };
    let base_dim = k.dim(conv_in, 0)?;
    let in_channels = k.dim(conv_in, 1)?;
    let z_dim = k.dim(quant, 0)?;
    let decoder_width = k.dim(conv_out, 1)?;
    let stage = |i: usize| {
        if wan {
            format!("encoder.downsamples.{i}.downsamples.")
        } else {
            format!("encoder.down_blocks.{i}.resnets.")
        }
    };
    let resample = |i: usize, r: usize, what: &str| {
        if wan {
            format!("encoder.downsamples.{i}.downsamples.{r}.{what}")
        } else {
            format!("encoder.down_blocks.{i}.downsampler.{what}")
        }
    };
    let residual_out = if wan {
        "residual.6.weight"
    } else {
        "conv2.weight"
    };
    let (mut dim_mult, mut res_blocks, mut temporal) = (Vec::new(), Vec::new(), Vec::new());
    let mut readable = base_dim > 0;
    for i in 0.. {
        let head = stage(i);
        let blocks: Vec<usize> = k
            .indices(&head)
            .into_iter()
            .filter(|j| k.has(&format!("{head}{j}.{residual_out}")))
            .collect();
        if blocks.is_empty() {
            break;
        }
        let width = k.dim(&format!("{head}{}.{residual_out}", blocks.len() - 1), 0)?;
        readable &= base_dim > 0 && width % base_dim.max(1) == 0;
        dim_mult.push(width / base_dim.max(1));
        res_blocks.push(blocks.len());
        let r = blocks.len();
        if k.has(&resample(i, r, "resample.1.weight")) {
            temporal.push(k.has(&resample(i, r, "time_conv.weight")));
        }
    }
    readable &= !dim_mult.is_empty()
        && res_blocks.iter().all(|&n| n == res_blocks[0])
        && temporal.len() + 1 == dim_mult.len();
    let patch_size = (1..=8).find(|p| 3 * p * p == in_channels);
    let decoder_base = dim_mult
        .first()
        .filter(|&&m| m > 0 && decoder_width % m == 0)
        .map(|m| decoder_width / m);
    Ok(VaeConfig {
        base_dim,
        z_dim,
        dim_mult: readable.then(|| dim_mult.clone()),
        num_res_blocks: readable.then(|| res_blocks[0]),
        temporal_downsample: readable.then_some(temporal),
        decoder_base_dim: decoder_base.filter(|&d| d != base_dim),
        patch_size,
    })
}

fn umt5_bias_key(layout: KeyLayout, layer: usize) -> String {
    match layout {
        KeyLayout::Wan => format!("blocks.{layer}.pos_embedding.embedding.weight"),
        _ => format!("encoder.block.{layer}.layer.0.SelfAttention.relative_attention_bias.weight"),
    }
}

fn umt5_config(k: &Keys<'_>, layout: KeyLayout) -> Result<Umt5Config, String> {
    let wan = layout == KeyLayout::Wan;
    let emb = if wan {
        k.shape("token_embedding.weight")?
    } else {
        k.shape("shared.weight")
            .or_else(|_| k.shape("encoder.embed_tokens.weight"))?
    };
    let [vocab_size, d_model] = emb[..] else {
        return Err(format!(
            "token embedding has shape {emb:?}, expected 2 dims"
        ));
    };
    let bias = umt5_bias_key(layout, 0);
    let num_buckets = k.dim(&bias, 0)?;
    let num_heads = k.dim(&bias, 1)?;
    let inner = k.dim(
        if wan {
            "blocks.0.attn.q.weight"
        } else {
            "encoder.block.0.layer.0.SelfAttention.q.weight"
        },
        0,
    )?;
    let d_ff = if wan {
        k.dim("blocks.0.ffn.fc1.weight", 0)?
    } else {
        k.dim("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", 0)
            .or_else(|_| k.dim("encoder.block.0.layer.1.DenseReluDense.wi.weight", 0))?
    };
    Ok(Umt5Config {
        d_model,
        d_ff,
        num_layers: k
            .indices(if wan { "blocks." } else { "encoder.block." })
            .len(),
        num_heads,
        d_kv: inner.checked_div(num_heads).unwrap_or(0),
        vocab_size,
        num_buckets,
        has_tokenizer: k.has("spiece_model"),
    })
}

fn clip_config(k: &Keys<'_>, layout: KeyLayout) -> Result<ClipConfig, String> {
    let (patch, layers, mlp, pos, proj, text) = match layout {
        KeyLayout::Wan => (
            "visual.patch_embedding.weight",
            "visual.transformer.",
            "visual.transformer.0.mlp.0.weight",
            "visual.pos_embedding",
            "visual.head",
            "textual.",
        ),
        KeyLayout::OpenClip => (
            "visual.conv1.weight",
            "visual.transformer.resblocks.",
            "visual.transformer.resblocks.0.mlp.c_fc.weight",
            "visual.positional_embedding",
            "visual.proj",
            "transformer.resblocks.",
        ),
        _ => (
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.encoder.layers.",
            "vision_model.encoder.layers.0.mlp.fc1.weight",
            "vision_model.embeddings.position_embedding.weight",
            "visual_projection.weight",
            "text_model.",
        ),
    };
    let width = k.dim(patch, 0)?;
    let patch_size = k.dim(patch, 2)?;
    // Wan stores the position table as [1, n, width]; open_clip and transformers as [n, width].
    let num_positions = k.shape(pos).ok().and_then(|s| match s {
        [1, n, _] | [n, _] => Some(*n),
        _ => None,
    });
    let image_size = num_positions.and_then(|n| {
        let grid = (n.checked_sub(1)? as f64).sqrt().round() as usize;
        // Checked: `n` and `patch_size` come from the file.
        let square = grid.checked_mul(grid)?.checked_add(1)?;
        if square != n {
            return None;
        }
        grid.checked_mul(patch_size)
    });
    // Wan's `visual.head` and open_clip's `visual.proj` are [width, out]; transformers' projection
    // is a Linear weight [out, width].
    let projection_dim = k
        .shape(proj)
        .ok()
        .and_then(|s| {
            if layout == KeyLayout::Diffusers {
                s.first()
            } else {
                s.get(1)
            }
        })
        .copied();
    let num_layers = k.indices(layers).len();
    Ok(ClipConfig {
        width,
        num_layers,
        mlp_dim: k.dim(mlp, 0).ok(),
        patch_size,
        num_positions,
        image_size,
        projection_dim,
        has_text_tower: k.any_prefix(text),
        size_name: (width == 1280 && num_layers == 32 && patch_size == 14).then_some("ViT-H/14"),
    })
}

// ---------------------------------------------------------------------------------------------
// LoRA

/// Which part of a LoRA pair a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoraPart {
    /// Down / A matrix: [rank, in].
    Down {
        peft: bool,
    },
    /// Up / B matrix: [out, rank].
    Up,
    Alpha,
    Diff,
    DiffBias,
}

const LORA_SUFFIXES: &[(&str, LoraPart)] = &[
    (".lora_A.weight", LoraPart::Down { peft: true }),
    (".lora_B.weight", LoraPart::Up),
    (".lora_B.bias", LoraPart::DiffBias),
    (".lora_down.weight", LoraPart::Down { peft: false }),
    (".lora_up.weight", LoraPart::Up),
    (".alpha", LoraPart::Alpha),
    (".diff_b", LoraPart::DiffBias),
    (".diff", LoraPart::Diff),
];

/// Splits a LoRA key into (target module with prefix, part).
fn lora_part(name: &str) -> Option<(&str, LoraPart)> {
    LORA_SUFFIXES
        .iter()
        .find_map(|(suffix, part)| Some((name.strip_suffix(suffix)?, *part)))
}

/// A LoRA target split into its parts.
struct Target<'a> {
    /// Everything before `blocks`: `"diffusion_model."`, `"transformer."`, `"lora_unet_"`, ….
    prefix: &'a str,
    /// The block index.
    block: Option<usize>,
    /// The module inside the block (`self_attn.q`, or `self_attn_q` in flat names).
    module: &'a str,
    /// `Some` for the flat (kohya / Wan-Fun) namings.
    flat: Option<LoraFormat>,
}

/// Splits a target like `diffusion_model.blocks.3.self_attn.q` or `lora_unet_blocks_3_self_attn_q`.
/// Targets outside the transformer blocks give `None`.
fn split_target(target: &str) -> Option<Target<'_>> {
    for (head, format) in [
        ("lora_unet__", LoraFormat::WanFunFlat),
        ("lora_unet_", LoraFormat::KohyaFlat),
    ] {
        if let Some(rest) = target.strip_prefix(head) {
            // `blocks_0_self_attn_q`: module names contain `_` themselves, so only the block index
            // can be split off reliably.
            let (n, module) = rest.strip_prefix("blocks_")?.split_once('_')?;
            return Some(Target {
                prefix: head,
                block: n.parse().ok(),
                module,
                flat: Some(format),
            });
        }
    }
    let at = if target.starts_with("blocks.") {
        0
    } else {
        target.find(".blocks.")? + 1
    };
    let (n, module) = target[at + "blocks.".len()..].split_once('.')?;
    Some(Target {
        prefix: &target[..at],
        block: n.parse().ok(),
        module,
        flat: None,
    })
}

/// Whether a module path inside a block is a Wan (original) or diffusers name.
fn module_layout(module: &str) -> KeyLayout {
    let head = module.split(['.', '_']).next().unwrap_or("");
    match head {
        "self" | "cross" | "norm3" | "modulation" => KeyLayout::Wan,
        "attn1" | "attn2" | "scale" => KeyLayout::Diffusers,
        "ffn" if module.contains("net") => KeyLayout::Diffusers,
        "ffn" => KeyLayout::Wan,
        _ => KeyLayout::Unknown,
    }
}

fn detect_lora(tensors: &[TensorMeta<'_>]) -> Detection {
    let mut targets = BTreeSet::new();
    let mut ranks = BTreeSet::new();
    let (mut alphas, mut diffs, mut bias_diffs, mut peft, mut downup) = (0, 0, 0, 0, 0);
    let mut blocks = BTreeSet::new();
    let mut prefixes: HashMap<&str, usize> = HashMap::new();
    let mut layouts: HashMap<KeyLayout, usize> = HashMap::new();
    let mut flat_formats: HashMap<Option<LoraFormat>, usize> = HashMap::new();
    let mut base_dim = None;
    let mut foreign = 0usize;

    for t in tensors {
        let Some((target, part)) = lora_part(t.name) else {
            foreign += 1;
            continue;
        };
        targets.insert(target);
        match part {
            LoraPart::Down { peft: p } => {
                if p {
                    peft += 1;
                } else {
                    downup += 1;
                }
                if let Some(&r) = t.shape.first() {
                    ranks.insert(r);
                }
            }
            LoraPart::Up => {}
            LoraPart::Alpha => alphas += 1,
            LoraPart::Diff => diffs += 1,
            LoraPart::DiffBias => bias_diffs += 1,
        }
        if let Some(tg) = split_target(target) {
            *prefixes.entry(tg.prefix).or_default() += 1;
            *flat_formats.entry(tg.flat).or_default() += 1;
            let layout = module_layout(tg.module);
            *layouts.entry(layout).or_default() += 1;
            if layout != KeyLayout::Unknown {
                if let Some(n) = tg.block {
                    blocks.insert(n);
                }
            }
            let is_q = matches!(tg.module, "self_attn.q" | "self_attn_q" | "attn1.to_q");
            if is_q && matches!(part, LoraPart::Down { .. }) {
                base_dim = base_dim.or(t.shape.get(1).copied());
            }
        }
    }

    let top = |m: &HashMap<KeyLayout, usize>| {
        m.iter()
            .filter(|(l, _)| **l != KeyLayout::Unknown)
            .max_by_key(|(_, n)| **n)
            .map(|(l, _)| *l)
    };
    let layout = top(&layouts).unwrap_or(KeyLayout::Unknown);
    let prefix = prefixes
        .iter()
        .max_by_key(|(p, n)| (**n, p.len()))
        .map(|(p, _)| p.to_string())
        .unwrap_or_default();
    let naming = flat_formats
        .iter()
        .max_by_key(|(_, n)| **n)
        .and_then(|(f, _)| *f);
    let format = match naming {
        Some(flat) => flat,
        _ if peft == 0 && downup == 0 => LoraFormat::DiffOnly,
        _ if peft >= downup => LoraFormat::PeftAB,
        _ => LoraFormat::DownUp,
    };

    let mut notes = Vec::new();
    if foreign > 0 {
        notes.push(format!("{foreign} tensors are not LoRA weights"));
    }
    let family = if layout == KeyLayout::Unknown {
        notes.push("LoRA weights for a model other than the Wan DiT (no blocks.N.self_attn/cross_attn/ffn targets)".into());
        Family::Unknown
    } else {
        Family::WanLora
    };
    let base_size = match base_dim {
        Some(1536) => Some("1.3B"),
        Some(5120) => Some("14B"),
        _ => None,
    };
    let config = (family == Family::WanLora).then(|| {
        ModelConfig::Lora(LoraConfig {
            format,
            ranks: ranks.into_iter().collect(),
            targets: targets.len(),
            alphas,
            diffs,
            bias_diffs,
            blocks: blocks.len(),
            base_dim,
            base_size,
        })
    });
    Detection {
        family,
        layout,
        prefix,
        config,
        notes,
    }
}

#[cfg(test)]
#[path = "detect_tests.rs"]
mod tests;
