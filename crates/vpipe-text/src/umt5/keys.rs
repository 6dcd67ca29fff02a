//! Checkpoint key layouts of the umT5 encoder, and the one place where they are translated.
//!
//! The model code asks for tensors by their **transformers names** (`UMT5EncoderModel`, also
//! what ComfyUI's `umt5_xxl_*.safetensors` files use), with the token embedding as
//! `shared.weight`. The original Wan checkpoint (`models_t5_umt5-xxl-enc-bf16.pth`, Wan's
//! `t5.py`) stores the same tensors under other names; [`transformers_to_wan`] gives the original
//! name of a transformers name and [`canonical_var_builder`] wraps a `VarBuilder` so that the
//! layers never see the difference. Per block `N`:
//!
//! | transformers / ComfyUI | original Wan `t5.py` |
//! |---|---|
//! | `shared.weight` or `encoder.embed_tokens.weight` | `token_embedding.weight` |
//! | `encoder.block.N.layer.0.layer_norm` | `blocks.N.norm1` |
//! | `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}` | `blocks.N.attn.{q,k,v,o}` |
//! | `encoder.block.N.layer.0.SelfAttention.relative_attention_bias` | `blocks.N.pos_embedding.embedding` |
//! | `encoder.block.N.layer.1.layer_norm` | `blocks.N.norm2` |
//! | `encoder.block.N.layer.1.DenseReluDense.wi_0` | `blocks.N.ffn.gate.0` |
//! | `encoder.block.N.layer.1.DenseReluDense.wi_1` | `blocks.N.ffn.fc1` |
//! | `encoder.block.N.layer.1.DenseReluDense.wo` | `blocks.N.ffn.fc2` |
//! | `encoder.final_layer_norm` | `norm` |
//!
//! transformers ties `encoder.embed_tokens.weight` to `shared.weight`; files may hold either or
//! both (ComfyUI's hold one), and the loader takes whichever exists, `shared.weight` first.

use candle_nn::VarBuilder;

/// Key prefixes an umT5 checkpoint may carry in front of its names: none (ComfyUI's text-encoder
/// files, transformers, the original `.pth`), a ComfyUI full checkpoint's
/// `text_encoders.umt5xxl.transformer.`, its text-encoder state dict's `umt5xxl.transformer.`,
/// and `text_encoder.` (a diffusers pipeline's component saved into one file).
pub const KNOWN_PREFIXES: [&str; 4] = [
    "",
    "text_encoders.umt5xxl.transformer.",
    "umt5xxl.transformer.",
    "text_encoder.",
];

/// A transformers-named key whose presence marks that layout.
const TRANSFORMERS_MARKER: &str = "encoder.block.0.layer.0.SelfAttention.q.weight";
/// An original-Wan-named key whose presence marks that layout.
const WAN_MARKER: &str = "blocks.0.attn.q.weight";
/// The embedding under transformers names, in order of preference.
const TRANSFORMERS_EMBEDDINGS: [&str; 2] = ["shared.weight", "encoder.embed_tokens.weight"];

/// The marker keys [`detect_layout`] looks for, for error messages.
pub const MARKERS: [&str; 2] = [TRANSFORMERS_MARKER, WAN_MARKER];

/// How an umT5 checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// transformers `UMT5EncoderModel` / ComfyUI names. `embedding` is the key the token
    /// embedding is stored under (`shared.weight` or `encoder.embed_tokens.weight`), or `None`
    /// when the file has neither (loading then fails naming both).
    Transformers {
        /// Where the token embedding is.
        embedding: Option<&'static str>,
    },
    /// Original Wan `t5.py` names (`models_t5_umt5-xxl-enc-bf16.pth`).
    Wan,
}

/// Finds the key layout and prefix of an umT5 checkpoint. `vb` must have an empty path.
pub fn detect_layout(vb: &VarBuilder) -> Option<(KeyLayout, &'static str)> {
    detect_layout_of(&|name| vb.contains_tensor(name))
}

/// [`detect_layout`] over a checkpoint's key set (`contains` answers whether a key is in it).
pub fn detect_layout_of(contains: &dyn Fn(&str) -> bool) -> Option<(KeyLayout, &'static str)> {
    KNOWN_PREFIXES.iter().find_map(|&prefix| {
        if contains(&format!("{prefix}{TRANSFORMERS_MARKER}")) {
            let embedding = TRANSFORMERS_EMBEDDINGS
                .into_iter()
                .find(|e| contains(&format!("{prefix}{e}")));
            Some((KeyLayout::Transformers { embedding }, prefix))
        } else if contains(&format!("{prefix}{WAN_MARKER}")) {
            Some((KeyLayout::Wan, prefix))
        } else {
            None
        }
    })
}

/// Wraps a checkpoint's `VarBuilder` (empty path) so that it answers to transformers names, with
/// the embedding as `shared.weight`.
pub fn canonical_var_builder<'a>(
    vb: VarBuilder<'a>,
    layout: KeyLayout,
    prefix: &'static str,
) -> VarBuilder<'a> {
    match layout {
        KeyLayout::Transformers { embedding } => {
            // With neither embedding key present, ask for `shared.weight` so that candle's
            // missing-tensor error names it.
            let embedding = embedding.unwrap_or(TRANSFORMERS_EMBEDDINGS[0]);
            vb.rename_f(move |name: &str| {
                if name == "shared.weight" {
                    format!("{prefix}{embedding}")
                } else {
                    format!("{prefix}{name}")
                }
            })
        }
        KeyLayout::Wan => {
            vb.rename_f(move |name: &str| format!("{prefix}{}", transformers_to_wan(name)))
        }
    }
}

/// The block a checkpoint key of this layout belongs to (`encoder.block.N.…` or
/// `blocks.N.…` after the prefix).
pub fn block_of(key: &str, layout: KeyLayout, prefix: &str) -> Option<usize> {
    let rest = key.strip_prefix(prefix)?;
    let rest = match layout {
        KeyLayout::Transformers { .. } => rest.strip_prefix("encoder.block.")?,
        KeyLayout::Wan => rest.strip_prefix("blocks.")?,
    };
    rest.split_once('.')?.0.parse().ok()
}

/// Whether a checkpoint key of this layout is (a copy of) the token embedding.
pub fn is_embedding(key: &str, layout: KeyLayout, prefix: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    match layout {
        KeyLayout::Transformers { .. } => TRANSFORMERS_EMBEDDINGS.contains(&rest),
        KeyLayout::Wan => rest == "token_embedding.weight",
    }
}

/// Per-block sub-keys: transformers → original Wan.
const BLOCK_KEYS: [(&str, &str); 10] = [
    ("layer.0.layer_norm.", "norm1."),
    ("layer.0.SelfAttention.q.", "attn.q."),
    ("layer.0.SelfAttention.k.", "attn.k."),
    ("layer.0.SelfAttention.v.", "attn.v."),
    ("layer.0.SelfAttention.o.", "attn.o."),
    (
        "layer.0.SelfAttention.relative_attention_bias.",
        "pos_embedding.embedding.",
    ),
    ("layer.1.layer_norm.", "norm2."),
    ("layer.1.DenseReluDense.wi_0.", "ffn.gate.0."),
    ("layer.1.DenseReluDense.wi_1.", "ffn.fc1."),
    ("layer.1.DenseReluDense.wo.", "ffn.fc2."),
];

/// The original Wan `t5.py` name of a transformers umT5 tensor name. Names that match no rule
/// come back unchanged.
pub fn transformers_to_wan(name: &str) -> String {
    if let Some(rest) = TRANSFORMERS_EMBEDDINGS
        .iter()
        .find_map(|e| name.strip_prefix(e.trim_end_matches("weight")))
    {
        return format!("token_embedding.{rest}");
    }
    if let Some(rest) = name.strip_prefix("encoder.final_layer_norm.") {
        return format!("norm.{rest}");
    }
    if let Some((n, rest)) = name
        .strip_prefix("encoder.block.")
        .and_then(|s| s.split_once('.'))
    {
        if n.parse::<usize>().is_ok() {
            for (hf, wan) in BLOCK_KEYS {
                if let Some(tail) = rest.strip_prefix(hf) {
                    return format!("blocks.{n}.{wan}{tail}");
                }
            }
        }
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of the umT5-XXL key table (transformers and the Wan team's names).
    const PAIRS: [(&str, &str); 12] = [
        ("shared.weight", "token_embedding.weight"),
        ("encoder.embed_tokens.weight", "token_embedding.weight"),
        (
            "encoder.block.0.layer.0.layer_norm.weight",
            "blocks.0.norm1.weight",
        ),
        (
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "blocks.0.attn.q.weight",
        ),
        (
            "encoder.block.7.layer.0.SelfAttention.o.weight",
            "blocks.7.attn.o.weight",
        ),
        (
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "blocks.0.pos_embedding.embedding.weight",
        ),
        (
            "encoder.block.23.layer.1.layer_norm.weight",
            "blocks.23.norm2.weight",
        ),
        (
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
            "blocks.0.ffn.gate.0.weight",
        ),
        (
            "encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
            "blocks.0.ffn.fc1.weight",
        ),
        (
            "encoder.block.12.layer.1.DenseReluDense.wo.weight",
            "blocks.12.ffn.fc2.weight",
        ),
        ("encoder.final_layer_norm.weight", "norm.weight"),
        ("encoder.block.x.layer.0.foo", "encoder.block.x.layer.0.foo"),
    ];

    #[test]
    fn reference_table_rows_map() {
        for (hf, wan) in PAIRS {
            assert_eq!(transformers_to_wan(hf), wan, "{hf}");
        }
    }
}
