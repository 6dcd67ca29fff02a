//! Reading a LoRA file and sorting its keys into per-module patches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// How a LoRA file names the module a patch belongs to (the part of the key before the patch
/// suffix such as `.lora_A.weight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Naming {
    /// Original Wan / ComfyUI names behind `diffusion_model.` or `model.diffusion_model.`:
    /// `diffusion_model.blocks.0.self_attn.q` (ComfyUI, lightx2v, CausVid, most trainers).
    Original,
    /// diffusers names behind `transformer.`: `transformer.blocks.0.attn1.to_q`
    /// (diffusers / PEFT training scripts).
    Diffusers,
    /// kohya / musubi-tuner flat names: `lora_unet_blocks_0_self_attn_q`, the original name
    /// with `.` replaced by `_`.
    KohyaFlat,
    /// Wan-Fun's flat names with a double underscore: `lora_unet__blocks_0_self_attn_q`.
    WanFun,
    /// No known prefix: tried as an original name and as a diffusers name (an error if both
    /// fit different weights).
    Bare,
}

impl Naming {
    /// Splits a module key into its naming and the name behind the prefix.
    fn split(module: &str) -> (Self, &str) {
        // Longest prefixes first: `lora_unet__` before `lora_unet_`, `model.diffusion_model.`
        // before `diffusion_model.`.
        const PREFIXES: [(&str, Naming); 5] = [
            ("model.diffusion_model.", Naming::Original),
            ("diffusion_model.", Naming::Original),
            ("transformer.", Naming::Diffusers),
            ("lora_unet__", Naming::WanFun),
            ("lora_unet_", Naming::KohyaFlat),
        ];
        for (prefix, naming) in PREFIXES {
            if let Some(rest) = module.strip_prefix(prefix) {
                return (naming, rest);
            }
        }
        (Self::Bare, module)
    }
}

impl fmt::Display for Naming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Original => "original Wan names (diffusion_model.)",
            Self::Diffusers => "diffusers names (transformer.)",
            Self::KohyaFlat => "kohya flat names (lora_unet_)",
            Self::WanFun => "Wan-Fun flat names (lora_unet__)",
            Self::Bare => "unprefixed names",
        })
    }
}

/// How the two halves of a low-rank pair are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PairStyle {
    /// PEFT: `lora_A.weight` (down) and `lora_B.weight` (up).
    Peft,
    /// kohya: `lora_down.weight` and `lora_up.weight`.
    DownUp,
}

impl fmt::Display for PairStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Peft => "lora_A/lora_B",
            Self::DownUp => "lora_down/lora_up",
        })
    }
}

/// What a key suffix says the tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down(PairStyle),
    Up(PairStyle),
    Alpha,
    Diff,
    DiffB,
    /// PEFT `lora_B.bias` (diffusers' name for a bias delta); scaled like the pair.
    PeftBias,
}

/// Suffixes in match order; none is a suffix of a later one that would match first wrongly
/// (`.diff_b` does not end in `.diff`).
const SUFFIXES: [(&str, Part); 8] = [
    (".lora_A.weight", Part::Down(PairStyle::Peft)),
    (".lora_B.weight", Part::Up(PairStyle::Peft)),
    (".lora_down.weight", Part::Down(PairStyle::DownUp)),
    (".lora_up.weight", Part::Up(PairStyle::DownUp)),
    (".lora_B.bias", Part::PeftBias),
    (".alpha", Part::Alpha),
    (".diff_b", Part::DiffB),
    (".diff", Part::Diff),
];

fn split_key(key: &str) -> Option<(&str, Part)> {
    SUFFIXES.iter().find_map(|&(suffix, part)| {
        key.strip_suffix(suffix)
            .filter(|m| !m.is_empty())
            .map(|m| (m, part))
    })
}

/// A low-rank pair `ΔW = scale · up · down` of one module.
#[derive(Debug, Clone)]
pub(crate) struct Pair {
    /// Key of the down (A) matrix.
    pub(crate) down_key: String,
    /// Key of the up (B) matrix.
    pub(crate) up_key: String,
    /// shape [rank, in, k...]
    pub(crate) down: Tensor,
    /// shape [out, rank, 1...]
    pub(crate) up: Tensor,
    /// `.alpha` (or the adapter metadata's `lora_alpha`); `None` means scale 1.
    pub(crate) alpha: Option<f64>,
    pub(crate) style: PairStyle,
}

impl Pair {
    /// `down.shape[0]`, the rank ComfyUI divides alpha by.
    pub(crate) fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// alpha / rank, or 1 without alpha (ComfyUI `comfy/weight_adapter/lora.py`).
    pub(crate) fn scale(&self) -> f64 {
        self.alpha.map_or(1.0, |a| a / self.rank() as f64)
    }
}

/// A full-tensor delta (`diff`, `diff_b`, `lora_B.bias`).
#[derive(Debug, Clone)]
pub(crate) struct Full {
    pub(crate) key: String,
    pub(crate) delta: Tensor,
}

/// Every patch one LoRA module (one key stem) carries.
#[derive(Debug, Clone)]
pub(crate) struct Module {
    /// The key stem as in the file, prefix included (`diffusion_model.blocks.0.ffn.0`).
    pub(crate) key: String,
    pub(crate) naming: Naming,
    pub(crate) pair: Option<Pair>,
    /// Delta of the module's weight.
    pub(crate) diff: Option<Full>,
    /// Delta of the module's bias (`diff_b`); unscaled.
    pub(crate) diff_b: Option<Full>,
    /// Delta of the module's bias given as PEFT `lora_B.bias`; scaled by the pair's scale.
    pub(crate) peft_bias: Option<Full>,
}

impl Module {
    /// The name behind the naming's prefix.
    pub(crate) fn name(&self) -> &str {
        Naming::split(&self.key).1
    }
}

/// A LoRA checkpoint, read and checked, not yet matched against a model.
///
/// Holds the tensors as stored (any float dtype, on the CPU); they are converted to f32 on the
/// weight's device only while merging.
#[derive(Debug, Clone)]
pub struct LoraFile {
    name: String,
    modules: Vec<Module>,
}

/// What [`LoraFile::read`] takes from the safetensors header: diffusers saves its PEFT
/// `LoraConfig` as JSON under `lora_adapter_metadata`, and PEFT scales pairs by
/// `lora_alpha / r` from there when the file has no `.alpha` keys.
const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

impl LoraFile {
    /// Reads a LoRA `.safetensors` file (onto the CPU).
    ///
    /// Besides the tensors, a diffusers `lora_adapter_metadata` entry in the header is honoured:
    /// its `lora_alpha` becomes the alpha of every pair without an `.alpha` key. Per-module
    /// `rank_pattern` / `alpha_pattern`, DoRA and rsLoRA are refused with [`Error::Metadata`].
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let read_err = |source| Error::Read {
            path: path.display().to_string(),
            source: Box::new(source),
        };
        let bytes = std::fs::read(path).map_err(|e| read_err(e.into()))?;
        let tensors =
            candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(read_err)?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| read_err(candle_core::Error::wrap(e)))?;
        let alpha = match header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(ADAPTER_METADATA_KEY))
        {
            Some(json) => metadata_alpha(&name, json)?,
            None => None,
        };
        Self::build(name, tensors, alpha)
    }

    /// Builds a LoRA from tensors already in memory. `name` stands for the file in messages.
    pub fn from_tensors(name: impl Into<String>, tensors: HashMap<String, Tensor>) -> Result<Self> {
        Self::build(name.into(), tensors, None)
    }

    /// The file name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn modules(&self) -> &[Module] {
        &self.modules
    }

    /// The namings found in the file (usually exactly one).
    pub fn namings(&self) -> BTreeSet<Naming> {
        self.modules.iter().map(|m| m.naming).collect()
    }

    fn build(
        name: String,
        tensors: HashMap<String, Tensor>,
        metadata_alpha: Option<f64>,
    ) -> Result<Self> {
        #[derive(Default)]
        struct Raw {
            down: Vec<(String, Tensor, PairStyle)>,
            up: Vec<(String, Tensor, PairStyle)>,
            alpha: Vec<(String, Tensor)>,
            diff: Vec<(String, Tensor)>,
            diff_b: Vec<(String, Tensor)>,
            peft_bias: Vec<(String, Tensor)>,
        }
        let mut raw: BTreeMap<String, Raw> = BTreeMap::new();
        let mut unsupported = Vec::new();
        for (key, t) in tensors {
            let Some((module, part)) = split_key(&key) else {
                unsupported.push(key);
                continue;
            };
            let r = raw.entry(module.to_string()).or_default();
            match part {
                Part::Down(s) => r.down.push((key, t, s)),
                Part::Up(s) => r.up.push((key, t, s)),
                Part::Alpha => r.alpha.push((key, t)),
                Part::Diff => r.diff.push((key, t)),
                Part::DiffB => r.diff_b.push((key, t)),
                Part::PeftBias => r.peft_bias.push((key, t)),
            }
        }
        if !unsupported.is_empty() {
            unsupported.sort();
            return Err(Error::UnsupportedKeys {
                file: name,
                keys: unsupported,
            });
        }

        let mut problems = Vec::new();
        let mut modules = Vec::new();
        for (stem, r) in raw {
            // Two spellings of one half (lora_A and lora_down) cannot both be meant.
            for (what, v) in [("down", r.down.len()), ("up", r.up.len())] {
                if v > 1 {
                    problems.push(format!(
                        "{stem}: {v} {what} matrices (lora_A/lora_down twice)"
                    ));
                }
            }
            if r.down.len() > 1 || r.up.len() > 1 {
                continue;
            }
            let alpha = match r.alpha.first() {
                None => None,
                Some((key, t)) => match scalar(t) {
                    Some(a) if a.is_finite() => Some(a),
                    Some(a) => {
                        problems.push(format!("{key}: alpha is {a}, not a finite number"));
                        continue;
                    }
                    None => {
                        problems.push(format!(
                            "{key}: alpha must hold one number, has shape {:?}",
                            t.dims()
                        ));
                        continue;
                    }
                },
            };
            let pair = match (r.down.into_iter().next(), r.up.into_iter().next()) {
                (Some((down_key, down, ds)), Some((up_key, up, us))) => {
                    if down.rank() < 2 || up.rank() < 2 {
                        problems.push(format!(
                            "{up_key}: up {:?} and down {:?} must both have at least 2 dimensions",
                            up.dims(),
                            down.dims()
                        ));
                        continue;
                    }
                    let rank = down.dims()[0];
                    let up_cols = up.elem_count() / up.dims()[0].max(1);
                    if up_cols != rank || rank == 0 {
                        problems.push(format!(
                            "{up_key}: up {:?} and down {:?} disagree on the rank \
                             (down.shape[0] = {rank})",
                            up.dims(),
                            down.dims()
                        ));
                        continue;
                    }
                    // A pair spelled half PEFT, half kohya (lora_A + lora_up) still has one
                    // meaning; it is reported as down/up.
                    let style = if ds == us { ds } else { PairStyle::DownUp };
                    let alpha = match (alpha, style) {
                        (None, PairStyle::Peft) => metadata_alpha,
                        (a, _) => a,
                    };
                    Some(Pair {
                        down_key,
                        up_key,
                        down,
                        up,
                        alpha,
                        style,
                    })
                }
                (Some((down_key, ..)), None) => {
                    problems.push(format!("{down_key}: down/lora_A without its up/lora_B"));
                    continue;
                }
                (None, Some((up_key, ..))) => {
                    problems.push(format!("{up_key}: up/lora_B without its down/lora_A"));
                    continue;
                }
                (None, None) => None,
            };
            if pair.is_none() {
                for (key, _) in &r.alpha {
                    problems.push(format!("{key}: alpha without a lora_A/lora_B pair"));
                }
                for (key, _) in &r.peft_bias {
                    problems.push(format!("{key}: lora_B.bias without a lora_A/lora_B pair"));
                }
            }
            let full = |v: Vec<(String, Tensor)>| {
                v.into_iter().next().map(|(key, delta)| Full { key, delta })
            };
            let (naming, _) = Naming::split(&stem);
            modules.push(Module {
                naming,
                key: stem,
                pair,
                diff: full(r.diff),
                diff_b: full(r.diff_b),
                peft_bias: full(r.peft_bias),
            });
        }
        if !problems.is_empty() {
            return Err(Error::Malformed {
                file: name,
                problems,
            });
        }
        if modules.is_empty() {
            return Err(Error::Empty { file: name });
        }
        Ok(Self { name, modules })
    }
}

/// The single number of an alpha tensor (shape `[]` or `[1]`, any dtype).
fn scalar(t: &Tensor) -> Option<f64> {
    if t.elem_count() != 1 {
        return None;
    }
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .ok()
        .and_then(|v| v.first().copied())
}

/// `lora_alpha` from diffusers' `lora_adapter_metadata` JSON (keys may carry a component
/// prefix such as `transformer.`), refusing what would change the scale per module.
fn metadata_alpha(file: &str, json: &str) -> Result<Option<f64>> {
    let bad = |reason: String| Error::Metadata {
        file: file.to_string(),
        reason,
    };
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| bad(format!("{ADAPTER_METADATA_KEY} is not JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(bad(format!("{ADAPTER_METADATA_KEY} is not a JSON object")));
    };
    let mut alpha = None;
    for (key, v) in obj {
        let field = key.rsplit('.').next().unwrap_or(key);
        match field {
            "lora_alpha" => {
                let a = v
                    .as_f64()
                    .filter(|a| a.is_finite())
                    .ok_or_else(|| bad(format!("{key} = {v} is not a finite number")))?;
                if alpha.is_some_and(|b| b != a) {
                    return Err(bad(format!("two different lora_alpha values ({key})")));
                }
                alpha = Some(a);
            }
            "rank_pattern" | "alpha_pattern" if v.as_object().is_some_and(|m| !m.is_empty()) => {
                return Err(bad(format!(
                    "{key} (per-module rank/alpha) is not supported"
                )));
            }
            "use_dora" | "use_rslora" if v.as_bool() == Some(true) => {
                return Err(bad(format!("{key} = true is not supported")));
            }
            _ => {}
        }
    }
    Ok(alpha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_split() {
        assert_eq!(
            split_key("diffusion_model.blocks.0.self_attn.q.lora_A.weight"),
            Some((
                "diffusion_model.blocks.0.self_attn.q",
                Part::Down(PairStyle::Peft)
            ))
        );
        assert_eq!(
            split_key("blocks.0.norm3.diff_b"),
            Some(("blocks.0.norm3", Part::DiffB))
        );
        assert_eq!(
            split_key("blocks.0.norm3.diff"),
            Some(("blocks.0.norm3", Part::Diff))
        );
        assert_eq!(split_key("x.lora_mid.weight"), None);
        assert_eq!(split_key(".alpha"), None);
        assert_eq!(
            Naming::split("lora_unet__blocks_0_ffn_0"),
            (Naming::WanFun, "blocks_0_ffn_0")
        );
        assert_eq!(
            Naming::split("model.diffusion_model.head.head"),
            (Naming::Original, "head.head")
        );
    }

    #[test]
    fn metadata() {
        let j = r#"{"transformer.r": 4, "transformer.lora_alpha": 2.0, "transformer.rank_pattern": {}}"#;
        assert_eq!(metadata_alpha("f", j).unwrap(), Some(2.0));
        let j = r#"{"r": 4, "use_dora": true}"#;
        assert!(matches!(
            metadata_alpha("f", j),
            Err(Error::Metadata { .. })
        ));
        let j = r#"{"alpha_pattern": {"blocks.0": 3}}"#;
        assert!(matches!(
            metadata_alpha("f", j),
            Err(Error::Metadata { .. })
        ));
    }
}
