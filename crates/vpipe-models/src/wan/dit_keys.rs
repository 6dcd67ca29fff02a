//! Checkpoint key layouts of the Wan DiT, and the one place where they are translated.
//!
//! The model asks for tensors by their **original Wan names** (`Wan2.1:wan/modules/model.py`,
//! also ComfyUI's), e.g. `blocks.0.self_attn.q.weight`. diffusers' `WanTransformer3DModel`
//! stores the same tensors under other names (`blocks.0.attn1.to_q.weight`); the tables below are
//! `diffusers:scripts/convert_wan_to_diffusers.py` (`TRANSFORMER_KEYS_RENAME_DICT`) written as
//! module-to-module pairs, so that they read in both directions. Note the norm swap: the only
//! block norm with weights, the cross-attention norm, is `norm3` in the original and `norm2` in
//! diffusers.

use candle_nn::VarBuilder;

use super::dit::BlockPart;

/// Key prefixes a DiT checkpoint may carry: ComfyUI diffusion-model and full checkpoints.
pub const KNOWN_PREFIXES: [&str; 3] = ["", "model.diffusion_model.", "diffusion_model."];

/// How a DiT checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// Original Wan / ComfyUI names (`blocks.0.self_attn.q.weight`).
    Wan,
    /// diffusers `WanTransformer3DModel` names (`blocks.0.attn1.to_q.weight`).
    Diffusers,
}

/// Global modules: (original, diffusers). The `img_emb` entries are image-to-video's (named
/// for key translation and detection; the model itself runs text-to-video).
const GLOBAL_MODULES: [(&str, &str); 13] = [
    ("patch_embedding", "patch_embedding"),
    (
        "text_embedding.0",
        "condition_embedder.text_embedder.linear_1",
    ),
    (
        "text_embedding.2",
        "condition_embedder.text_embedder.linear_2",
    ),
    (
        "time_embedding.0",
        "condition_embedder.time_embedder.linear_1",
    ),
    (
        "time_embedding.2",
        "condition_embedder.time_embedder.linear_2",
    ),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    (
        "img_emb.proj.1",
        "condition_embedder.image_embedder.ff.net.0.proj",
    ),
    (
        "img_emb.proj.3",
        "condition_embedder.image_embedder.ff.net.2",
    ),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    (
        "img_emb.emb_pos",
        "condition_embedder.image_embedder.pos_embed",
    ),
];

/// Modules inside `blocks.N.`: (original, diffusers); the `_img` ones are image-to-video's.
const BLOCK_MODULES: [(&str, &str); 19] = [
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("norm3", "norm2"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("modulation", "scale_shift_table"),
];

/// Which side of the tables a name is on.
#[derive(Clone, Copy)]
enum Side {
    Wan,
    Diffusers,
}

/// Replaces the module path at the start of `path` (whole dot-separated segments) by its
/// counterpart; `None` when no entry matches.
fn swap_module(path: &str, table: &[(&str, &str)], from: Side) -> Option<String> {
    table.iter().find_map(|&(wan, diffusers)| {
        let (have, want) = match from {
            Side::Wan => (wan, diffusers),
            Side::Diffusers => (diffusers, wan),
        };
        let tail = path.strip_prefix(have)?;
        (tail.is_empty() || tail.starts_with('.')).then(|| format!("{want}{tail}"))
    })
}

fn translate(name: &str, from: Side) -> Option<String> {
    if let Some(rest) = name.strip_prefix("blocks.") {
        let (index, rest) = rest.split_once('.')?;
        index.parse::<usize>().ok()?;
        return Some(format!(
            "blocks.{index}.{}",
            swap_module(rest, &BLOCK_MODULES, from)?
        ));
    }
    swap_module(name, &GLOBAL_MODULES, from)
}

/// The diffusers name of an original Wan DiT tensor name; `None` for names that are not Wan
/// DiT tensors.
pub fn wan_to_diffusers(name: &str) -> Option<String> {
    translate(name, Side::Wan)
}

/// The original Wan name of a diffusers DiT tensor name (inverse of [`wan_to_diffusers`]).
pub fn diffusers_to_wan(name: &str) -> Option<String> {
    translate(name, Side::Diffusers)
}

/// The original Wan name of a checkpoint key in `layout` with `prefix` (`None` for keys outside
/// the model, e.g. another prefix or I2V tensors).
pub fn original_name(key: &str, layout: KeyLayout, prefix: &str) -> Option<String> {
    let name = key.strip_prefix(prefix)?;
    match layout {
        KeyLayout::Wan => Some(name.to_string()),
        KeyLayout::Diffusers => diffusers_to_wan(name),
    }
}

/// Finds the key layout and prefix of a DiT checkpoint from `head.modulation` (original, as
/// ComfyUI's model detection does) or `proj_out.weight` + `condition_embedder` (diffusers).
/// `vb` must have an empty path.
pub fn detect_layout(vb: &VarBuilder) -> Option<(KeyLayout, &'static str)> {
    detect_layout_of(&|name| vb.contains_tensor(name))
}

/// [`detect_layout`] over a checkpoint's key set (`contains` answers whether a key is in it).
pub fn detect_layout_of(contains: &dyn Fn(&str) -> bool) -> Option<(KeyLayout, &'static str)> {
    KNOWN_PREFIXES.iter().find_map(|&prefix| {
        if contains(&format!("{prefix}head.modulation")) {
            Some((KeyLayout::Wan, prefix))
        } else if contains(&format!(
            "{prefix}condition_embedder.time_embedder.linear_1.weight"
        )) {
            Some((KeyLayout::Diffusers, prefix))
        } else {
            None
        }
    })
}

/// The block a checkpoint key belongs to, and the key's name inside the block: both layouts
/// name a block's tensors `{prefix}blocks.{index}.…`.
pub fn block_of<'k>(key: &'k str, prefix: &str) -> Option<(usize, &'k str)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix("blocks.")?;
    let (index, name) = rest.split_once('.')?;
    Some((index.parse().ok()?, name))
}

/// The block index and block part of checkpoint key `key` in `layout` with `prefix`; `None`
/// for a key outside the blocks or of no part.
pub fn block_part_of(key: &str, layout: KeyLayout, prefix: &str) -> Option<(usize, BlockPart)> {
    let original = original_name(key, layout, prefix)?;
    let (index, name) = block_of(&original, "")?;
    Some((index, BlockPart::of(name)?))
}

/// Whether checkpoint `key` is one of the text and time embeddings' larger weights, which a
/// model built without them takes from its [`BlockSource::embeddings`](super::BlockSource):
/// the text embedding's two layers, the time embedding's second and the projection to the
/// blocks' modulation (the first time layer stays: it names the diffusers layout).
pub fn is_source_embedding(key: &str, layout: KeyLayout, prefix: &str) -> bool {
    const MODULES: [&str; 4] = [
        "text_embedding.0.",
        "text_embedding.2.",
        "time_embedding.2.",
        "time_projection.1.",
    ];
    original_name(key, layout, prefix).is_some_and(|o| MODULES.iter().any(|m| o.starts_with(m)))
}

/// Wraps a checkpoint's `VarBuilder` (empty path) so that it answers to original Wan names.
pub fn canonical_var_builder<'a>(
    vb: VarBuilder<'a>,
    layout: KeyLayout,
    prefix: &'static str,
) -> VarBuilder<'a> {
    match layout {
        KeyLayout::Wan if prefix.is_empty() => vb,
        KeyLayout::Wan => vb.rename_f(move |name: &str| format!("{prefix}{name}")),
        KeyLayout::Diffusers => vb.rename_f(move |name: &str| {
            // Names without a diffusers counterpart are asked for as they are, so that a
            // missing tensor is reported under the name the model wanted.
            let mapped = wan_to_diffusers(name).unwrap_or_else(|| name.to_string());
            format!("{prefix}{mapped}")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_and_global_names_translate_both_ways() {
        let pairs = [
            (
                "blocks.7.self_attn.o.weight",
                "blocks.7.attn1.to_out.0.weight",
            ),
            (
                "blocks.0.self_attn.norm_q.weight",
                "blocks.0.attn1.norm_q.weight",
            ),
            ("blocks.12.cross_attn.k.bias", "blocks.12.attn2.to_k.bias"),
            ("blocks.3.norm3.weight", "blocks.3.norm2.weight"),
            ("blocks.3.ffn.0.bias", "blocks.3.ffn.net.0.proj.bias"),
            ("blocks.3.ffn.2.weight", "blocks.3.ffn.net.2.weight"),
            ("blocks.39.modulation", "blocks.39.scale_shift_table"),
            ("head.modulation", "scale_shift_table"),
            ("head.head.weight", "proj_out.weight"),
            (
                "time_projection.1.bias",
                "condition_embedder.time_proj.bias",
            ),
            (
                "text_embedding.2.weight",
                "condition_embedder.text_embedder.linear_2.weight",
            ),
            ("patch_embedding.weight", "patch_embedding.weight"),
        ];
        for (wan, diffusers) in pairs {
            assert_eq!(wan_to_diffusers(wan).as_deref(), Some(diffusers), "{wan}");
            assert_eq!(
                diffusers_to_wan(diffusers).as_deref(),
                Some(wan),
                "{diffusers}"
            );
        }
    }

    #[test]
    fn segments_match_whole() {
        // `self_attn.q` must not capture `self_attn.qx`, nor `modulation` a longer segment.
        assert_eq!(wan_to_diffusers("blocks.0.self_attn.qx.weight"), None);
        assert_eq!(wan_to_diffusers("blocks.x.self_attn.q.weight"), None);
        assert_eq!(wan_to_diffusers("img_emb.proj.2.weight"), None);
        assert_eq!(diffusers_to_wan("blocks.0.attn2.add_q_proj.weight"), None);
        // `cross_attn.k` must not capture `cross_attn.k_img`.
        assert_eq!(
            wan_to_diffusers("blocks.3.cross_attn.k_img.weight").as_deref(),
            Some("blocks.3.attn2.add_k_proj.weight")
        );
    }

    #[test]
    fn every_block_module_has_a_part_in_both_layouts() {
        for (wan, diffusers) in BLOCK_MODULES {
            let expected = match wan.split('.').next() {
                Some("self_attn" | "modulation") => BlockPart::SelfAttention,
                Some("cross_attn" | "norm3") => BlockPart::CrossAttention,
                _ => BlockPart::FeedForward,
            };
            for (key, layout, prefix) in [
                (format!("blocks.5.{wan}.weight"), KeyLayout::Wan, ""),
                (
                    format!("model.diffusion_model.blocks.5.{wan}.weight"),
                    KeyLayout::Wan,
                    "model.diffusion_model.",
                ),
                (
                    format!("blocks.5.{diffusers}.weight"),
                    KeyLayout::Diffusers,
                    "",
                ),
            ] {
                let key = key.replace("modulation.weight", "modulation");
                let key = key.replace("scale_shift_table.weight", "scale_shift_table");
                assert_eq!(
                    block_part_of(&key, layout, prefix),
                    Some((5, expected)),
                    "{key}"
                );
            }
        }
        for (i, part) in BlockPart::ALL.into_iter().enumerate() {
            assert_eq!(part.index(), i);
        }
        assert_eq!(block_part_of("head.head.weight", KeyLayout::Wan, ""), None);
        assert_eq!(
            block_part_of("proj_out.weight", KeyLayout::Diffusers, ""),
            None
        );
    }
}
