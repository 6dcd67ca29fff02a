//! Checkpoint key layouts of the Wan VAE, and the one place where they are translated.
//!
//! The model code asks for tensors by their **original Wan names** (`Wan2.1:wan/modules/vae.py`,
//! also used by ComfyUI's repackaged files), e.g. `encoder.downsamples.0.residual.0.gamma`.
//! A diffusers checkpoint (`AutoencoderKLWan.state_dict()`) stores the same 194 tensors under
//! other names, e.g. `encoder.down_blocks.0.norm1.gamma`; [`wan_to_diffusers`] computes the
//! diffusers name of an original name and [`canonical_var_builder`] wraps a `VarBuilder` so that
//! the layers never see the difference (the rule is `diffusers:scripts/convert_wan_to_diffusers.py`,
//! `convert_vae`, read backwards).
//!
//! Within a block the sub-keys map as
//!
//! | original | diffusers |
//! |---|---|
//! | `residual.0` | `norm1` |
//! | `residual.2` | `conv1` |
//! | `residual.3` | `norm2` |
//! | `residual.6` | `conv2` |
//! | `shortcut` | `conv_shortcut` |
//! | `resample.1`, `time_conv`, `norm`, `to_qkv`, `proj` | unchanged |
//!
//! and the block prefixes as
//!
//! | original | diffusers |
//! |---|---|
//! | `conv1`, `conv2` | `quant_conv`, `post_quant_conv` |
//! | `{encoder,decoder}.conv1` | `{encoder,decoder}.conv_in` |
//! | `{encoder,decoder}.head.0`, `.head.2` | `{encoder,decoder}.norm_out`, `.conv_out` |
//! | `{encoder,decoder}.middle.0`, `.1`, `.2` | `….mid_block.resnets.0`, `.attentions.0`, `.resnets.1` |
//! | `encoder.downsamples.n` | `encoder.down_blocks.n` |
//! | `decoder.upsamples.n` | `decoder.up_blocks.{n / (r+2)}.resnets.{n % (r+2)}`, or `.upsamplers.0` when `n % (r+2) = r+1` |
//!
//! where `r` is `num_res_blocks` (2 for Wan 2.1: `upsamples.3` is `up_blocks.0.upsamplers.0`).
//!
//! The Wan 2.2 VAE (`Wan2.2:wan/modules/vae2_2.py`, `Wan2.2_VAE.pth`, ComfyUI
//! `wan2.2_vae.safetensors`; 196 tensors) groups its blocks per stage, in both layouts
//! (`diffusers:scripts/convert_wan_to_diffusers.py`, `convert_vae_22`):
//!
//! | original | diffusers |
//! |---|---|
//! | `encoder.downsamples.i.downsamples.j` (a residual block, `j < r`) | `encoder.down_blocks.i.resnets.j` |
//! | `encoder.downsamples.i.downsamples.r` (`resample.1`, `time_conv`) | `encoder.down_blocks.i.downsampler` |
//! | `decoder.upsamples.i.upsamples.j` (a residual block, `j ≤ r`) | `decoder.up_blocks.i.resnets.j` |
//! | `decoder.upsamples.i.upsamples.{r+1}` (`resample.1`, `time_conv`) | `decoder.up_blocks.i.upsampler` |
//!
//! with the same sub-keys, middle, head and top-level names as Wan 2.1. The stage shortcuts
//! (`avg_shortcut`) have no parameters. An original 2.2 name (two `downsamples`/`upsamples`
//! indices) cannot be mistaken for a 2.1 one, so [`wan_to_diffusers`] maps both; the diffusers
//! decoder names `up_blocks.i.resnets.j` are the same in both versions and mean different
//! blocks, so the way back is [`diffusers_to_wan`] for 2.1 and [`diffusers_to_wan22`] for 2.2.

use candle_nn::VarBuilder;

/// Key prefixes a VAE checkpoint may carry in front of its names (ComfyUI full checkpoints use
/// `first_stage_model.`, some exports `vae.`).
pub const KNOWN_PREFIXES: [&str; 4] = ["", "first_stage_model.", "vae.", "model."];

/// How a VAE checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// Original Wan names (`Wan2.1_VAE.pth`, ComfyUI `wan_2.1_vae.safetensors`).
    Wan,
    /// diffusers `AutoencoderKLWan` names (`vae/diffusion_pytorch_model.safetensors`).
    Diffusers,
}

/// Finds the key layout and prefix of a VAE checkpoint: `encoder.conv1.weight` marks the original
/// layout, `encoder.conv_in.weight` the diffusers one. `vb` must have an empty path.
pub fn detect_layout(vb: &VarBuilder) -> Option<(KeyLayout, &'static str)> {
    KNOWN_PREFIXES.iter().find_map(|&prefix| {
        if vb.contains_tensor(&format!("{prefix}encoder.conv1.weight")) {
            Some((KeyLayout::Wan, prefix))
        } else if vb.contains_tensor(&format!("{prefix}encoder.conv_in.weight")) {
            Some((KeyLayout::Diffusers, prefix))
        } else {
            None
        }
    })
}

/// Wraps a checkpoint's `VarBuilder` (empty path) so that it answers to original Wan names.
///
/// `num_res_blocks` is needed for the diffusers decoder names only; encoder and top-level names
/// do not depend on it (config detection can run with any value).
pub fn canonical_var_builder<'a>(
    vb: VarBuilder<'a>,
    layout: KeyLayout,
    prefix: &'static str,
    num_res_blocks: usize,
) -> VarBuilder<'a> {
    match layout {
        KeyLayout::Wan if prefix.is_empty() => vb,
        KeyLayout::Wan => vb.rename_f(move |name: &str| format!("{prefix}{name}")),
        KeyLayout::Diffusers => vb.rename_f(move |name: &str| {
            format!("{prefix}{}", wan_to_diffusers(name, num_res_blocks))
        }),
    }
}

/// Block sub-keys: original → diffusers.
const SUB_KEYS: [(&str, &str); 5] = [
    ("residual.0", "norm1"),
    ("residual.2", "conv1"),
    ("residual.3", "norm2"),
    ("residual.6", "conv2"),
    ("shortcut", "conv_shortcut"),
];

fn sub_to_diffusers(rest: &str) -> String {
    for (wan, diff) in SUB_KEYS {
        if let Some(tail) = rest.strip_prefix(wan) {
            if tail.is_empty() || tail.starts_with('.') {
                return format!("{diff}{tail}");
            }
        }
    }
    rest.to_string()
}

fn sub_to_wan(rest: &str) -> String {
    for (wan, diff) in SUB_KEYS {
        if let Some(tail) = rest.strip_prefix(diff) {
            if tail.is_empty() || tail.starts_with('.') {
                return format!("{wan}{tail}");
            }
        }
    }
    rest.to_string()
}

/// Splits `"12.rest.of.key"` into `(12, "rest.of.key")`.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// The diffusers name of an original Wan VAE tensor name, Wan 2.1 or 2.2. Names that match no
/// rule come back unchanged.
pub fn wan_to_diffusers(name: &str, num_res_blocks: usize) -> String {
    let per_block = num_res_blocks + 2;
    if let Some(rest) = name.strip_prefix("conv1.") {
        return format!("quant_conv.{rest}");
    }
    if let Some(rest) = name.strip_prefix("conv2.") {
        return format!("post_quant_conv.{rest}");
    }
    for part in ["encoder.", "decoder."] {
        let Some(rest) = name.strip_prefix(part) else {
            continue;
        };
        let mapped = if let Some(r) = rest.strip_prefix("conv1.") {
            format!("conv_in.{r}")
        } else if let Some(r) = rest.strip_prefix("head.0.") {
            format!("norm_out.{r}")
        } else if let Some(r) = rest.strip_prefix("head.2.") {
            format!("conv_out.{r}")
        } else if let Some((n, r)) = rest.strip_prefix("middle.").and_then(split_index) {
            match n {
                0 => format!("mid_block.resnets.0.{}", sub_to_diffusers(r)),
                1 => format!("mid_block.attentions.0.{r}"),
                2 => format!("mid_block.resnets.1.{}", sub_to_diffusers(r)),
                _ => return name.to_string(),
            }
        } else if let Some(mapped) = wan22_stage_to_diffusers(rest) {
            mapped
        } else if let Some((n, r)) = rest.strip_prefix("downsamples.").and_then(split_index) {
            format!("down_blocks.{n}.{}", sub_to_diffusers(r))
        } else if let Some((n, r)) = rest.strip_prefix("upsamples.").and_then(split_index) {
            let (block, i) = (n / per_block, n % per_block);
            if i == per_block - 1 {
                format!("up_blocks.{block}.upsamplers.0.{r}")
            } else {
                format!("up_blocks.{block}.resnets.{i}.{}", sub_to_diffusers(r))
            }
        } else {
            return name.to_string();
        };
        return format!("{part}{mapped}");
    }
    name.to_string()
}

/// Whether a name's sub-key belongs to a resample (`resample.1`, `time_conv`) rather than a
/// residual block.
fn is_resample(rest: &str) -> bool {
    rest.starts_with("resample.") || rest.starts_with("time_conv.")
}

/// A Wan 2.2 stage name below `encoder.` or `decoder.` (`downsamples.i.downsamples.j.…` or
/// `upsamples.i.upsamples.j.…`) in diffusers' form; `None` for any other name. The resample is
/// told from the residual blocks by its sub-key, as diffusers' converter does.
fn wan22_stage_to_diffusers(rest: &str) -> Option<String> {
    for (wan, blocks, resample) in [
        ("downsamples", "down_blocks", "downsampler"),
        ("upsamples", "up_blocks", "upsampler"),
    ] {
        let Some((i, r)) = rest
            .strip_prefix(wan)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(split_index)
        else {
            continue;
        };
        // A Wan 2.1 name has no second index.
        let (j, r) = r
            .strip_prefix(wan)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(split_index)?;
        return Some(if is_resample(r) {
            format!("{blocks}.{i}.{resample}.{r}")
        } else {
            format!("{blocks}.{i}.resnets.{j}.{}", sub_to_diffusers(r))
        });
    }
    None
}

/// The original Wan 2.2 name of a diffusers Wan 2.2 VAE tensor name (the inverse of
/// [`wan_to_diffusers`] on 2.2 names). `num_res_blocks` places the resamples: after the `r`
/// residual blocks of an encoder stage, after the `r + 1` of a decoder stage. Names that match
/// no rule come back unchanged.
pub fn diffusers_to_wan22(name: &str, num_res_blocks: usize) -> String {
    for part in ["encoder.", "decoder."] {
        let Some(rest) = name.strip_prefix(part) else {
            continue;
        };
        for (blocks, wan, resample, index) in [
            (
                "down_blocks.",
                "downsamples",
                "downsampler.",
                num_res_blocks,
            ),
            ("up_blocks.", "upsamples", "upsampler.", num_res_blocks + 1),
        ] {
            let Some((i, r)) = rest.strip_prefix(blocks).and_then(split_index) else {
                continue;
            };
            let mapped = if let Some((j, r)) = r.strip_prefix("resnets.").and_then(split_index) {
                format!("{wan}.{i}.{wan}.{j}.{}", sub_to_wan(r))
            } else if let Some(r) = r.strip_prefix(resample) {
                format!("{wan}.{i}.{wan}.{index}.{r}")
            } else {
                return name.to_string();
            };
            return format!("{part}{mapped}");
        }
    }
    // Middle, head and top-level names are Wan 2.1's.
    diffusers_to_wan(name, num_res_blocks)
}

/// The original Wan 2.1 name of a diffusers Wan 2.1 VAE tensor name (the inverse of
/// [`wan_to_diffusers`] on 2.1 names). Names that match no rule come back unchanged.
pub fn diffusers_to_wan(name: &str, num_res_blocks: usize) -> String {
    let per_block = num_res_blocks + 2;
    if let Some(rest) = name.strip_prefix("quant_conv.") {
        return format!("conv1.{rest}");
    }
    if let Some(rest) = name.strip_prefix("post_quant_conv.") {
        return format!("conv2.{rest}");
    }
    for part in ["encoder.", "decoder."] {
        let Some(rest) = name.strip_prefix(part) else {
            continue;
        };
        let mapped = if let Some(r) = rest.strip_prefix("conv_in.") {
            format!("conv1.{r}")
        } else if let Some(r) = rest.strip_prefix("norm_out.") {
            format!("head.0.{r}")
        } else if let Some(r) = rest.strip_prefix("conv_out.") {
            format!("head.2.{r}")
        } else if let Some(r) = rest.strip_prefix("mid_block.resnets.0.") {
            format!("middle.0.{}", sub_to_wan(r))
        } else if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
            format!("middle.1.{r}")
        } else if let Some(r) = rest.strip_prefix("mid_block.resnets.1.") {
            format!("middle.2.{}", sub_to_wan(r))
        } else if let Some((n, r)) = rest.strip_prefix("down_blocks.").and_then(split_index) {
            format!("downsamples.{n}.{}", sub_to_wan(r))
        } else if let Some((block, r)) = rest.strip_prefix("up_blocks.").and_then(split_index) {
            if let Some((i, r)) = r.strip_prefix("resnets.").and_then(split_index) {
                format!("upsamples.{}.{}", block * per_block + i, sub_to_wan(r))
            } else if let Some(r) = r.strip_prefix("upsamplers.0.") {
                format!("upsamples.{}.{r}", block * per_block + per_block - 1)
            } else {
                return name.to_string();
            }
        } else {
            return name.to_string();
        };
        return format!("{part}{mapped}");
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of the Wan 2.1 VAE key table (num_res_blocks 2), from the Wan team's checkpoint.
    const PAIRS: [(&str, &str); 22] = [
        ("encoder.conv1.weight", "encoder.conv_in.weight"),
        (
            "encoder.downsamples.0.residual.0.gamma",
            "encoder.down_blocks.0.norm1.gamma",
        ),
        (
            "encoder.downsamples.0.residual.2.bias",
            "encoder.down_blocks.0.conv1.bias",
        ),
        (
            "encoder.downsamples.3.residual.3.gamma",
            "encoder.down_blocks.3.norm2.gamma",
        ),
        (
            "encoder.downsamples.3.residual.6.weight",
            "encoder.down_blocks.3.conv2.weight",
        ),
        (
            "encoder.downsamples.3.shortcut.weight",
            "encoder.down_blocks.3.conv_shortcut.weight",
        ),
        (
            "encoder.downsamples.5.resample.1.weight",
            "encoder.down_blocks.5.resample.1.weight",
        ),
        (
            "encoder.downsamples.5.time_conv.bias",
            "encoder.down_blocks.5.time_conv.bias",
        ),
        (
            "encoder.middle.0.residual.0.gamma",
            "encoder.mid_block.resnets.0.norm1.gamma",
        ),
        (
            "encoder.middle.1.to_qkv.weight",
            "encoder.mid_block.attentions.0.to_qkv.weight",
        ),
        (
            "encoder.middle.1.norm.gamma",
            "encoder.mid_block.attentions.0.norm.gamma",
        ),
        (
            "encoder.middle.2.residual.6.bias",
            "encoder.mid_block.resnets.1.conv2.bias",
        ),
        ("encoder.head.0.gamma", "encoder.norm_out.gamma"),
        ("encoder.head.2.weight", "encoder.conv_out.weight"),
        ("conv1.weight", "quant_conv.weight"),
        ("conv2.bias", "post_quant_conv.bias"),
        ("decoder.conv1.weight", "decoder.conv_in.weight"),
        (
            "decoder.upsamples.2.residual.2.weight",
            "decoder.up_blocks.0.resnets.2.conv1.weight",
        ),
        (
            "decoder.upsamples.3.time_conv.weight",
            "decoder.up_blocks.0.upsamplers.0.time_conv.weight",
        ),
        (
            "decoder.upsamples.4.shortcut.bias",
            "decoder.up_blocks.1.resnets.0.conv_shortcut.bias",
        ),
        (
            "decoder.upsamples.11.resample.1.weight",
            "decoder.up_blocks.2.upsamplers.0.resample.1.weight",
        ),
        (
            "decoder.upsamples.14.residual.0.gamma",
            "decoder.up_blocks.3.resnets.2.norm1.gamma",
        ),
    ];

    #[test]
    fn reference_table_rows_map_both_ways() {
        for (wan, diff) in PAIRS {
            assert_eq!(wan_to_diffusers(wan, 2), diff, "{wan}");
            assert_eq!(diffusers_to_wan(diff, 2), wan, "{diff}");
        }
    }

    #[test]
    fn decoder_index_follows_num_res_blocks() {
        // With 3 residual blocks per stage, each decoder stage has 4 resnets and 1 upsampler.
        assert_eq!(
            wan_to_diffusers("decoder.upsamples.4.resample.1.weight", 3),
            "decoder.up_blocks.0.upsamplers.0.resample.1.weight"
        );
        assert_eq!(
            wan_to_diffusers("decoder.upsamples.5.residual.0.gamma", 3),
            "decoder.up_blocks.1.resnets.0.norm1.gamma"
        );
    }

    /// Rows of the Wan 2.2 VAE key table (num_res_blocks 2), from diffusers' `convert_vae_22`;
    /// the full set is checked against the generator's names in `tests/vae22_parity.rs`.
    const PAIRS_22: [(&str, &str); 10] = [
        (
            "encoder.downsamples.0.downsamples.0.residual.0.gamma",
            "encoder.down_blocks.0.resnets.0.norm1.gamma",
        ),
        (
            "encoder.downsamples.1.downsamples.0.shortcut.weight",
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        ),
        (
            "encoder.downsamples.1.downsamples.1.residual.6.bias",
            "encoder.down_blocks.1.resnets.1.conv2.bias",
        ),
        (
            "encoder.downsamples.1.downsamples.2.resample.1.weight",
            "encoder.down_blocks.1.downsampler.resample.1.weight",
        ),
        (
            "encoder.downsamples.2.downsamples.2.time_conv.bias",
            "encoder.down_blocks.2.downsampler.time_conv.bias",
        ),
        (
            "decoder.upsamples.0.upsamples.2.residual.3.gamma",
            "decoder.up_blocks.0.resnets.2.norm2.gamma",
        ),
        (
            "decoder.upsamples.0.upsamples.3.time_conv.weight",
            "decoder.up_blocks.0.upsampler.time_conv.weight",
        ),
        (
            "decoder.upsamples.2.upsamples.0.shortcut.bias",
            "decoder.up_blocks.2.resnets.0.conv_shortcut.bias",
        ),
        (
            "decoder.upsamples.2.upsamples.3.resample.1.weight",
            "decoder.up_blocks.2.upsampler.resample.1.weight",
        ),
        (
            "decoder.middle.1.proj.bias",
            "decoder.mid_block.attentions.0.proj.bias",
        ),
    ];

    #[test]
    fn wan22_table_rows_map_both_ways() {
        for (wan, diff) in PAIRS_22 {
            assert_eq!(wan_to_diffusers(wan, 2), diff, "{wan}");
            assert_eq!(diffusers_to_wan22(diff, 2), wan, "{diff}");
        }
        // Wan 2.1 names are not taken for Wan 2.2 ones.
        for (wan, diff) in PAIRS {
            assert_eq!(wan_to_diffusers(wan, 2), diff, "{wan}");
        }
    }

    #[test]
    fn unknown_names_pass_through() {
        assert_eq!(wan_to_diffusers("something.else", 2), "something.else");
        assert_eq!(diffusers_to_wan("something.else", 2), "something.else");
    }
}
