//! Models built from leased weights. A model made here holds clones of the lease's tensors:
//! drop it before the phase offloads the weights, or the offload's verification fails.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};
use vpipe_lora::{LoraFile, MergePlan};

use vpipe_mem::{Lease, ModelId, Phase, WeightPatch};
use vpipe_models::wan::{dit_keys, DitConfig, WanModel, WanVae};
use vpipe_text::umt5::{Config as Umt5Config, Umt5Encoder};

/// A `VarBuilder` over a lease's weights, handing them out in `dtype` unless a layer asks for
/// another (scaled-fp8 weights stay float8).
fn var_builder(lease: &Lease<'_>, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_tensors(lease_weights(lease), dtype, device)
}

/// Clones (reference counts) of a lease's tensors, by checkpoint key.
fn lease_weights(lease: &Lease<'_>) -> HashMap<String, Tensor> {
    lease
        .iter()
        .map(|(name, t)| (name.to_owned(), t.clone()))
        .collect()
}

/// The Wan VAE over a lease's weights (either key layout; config from the shapes).
pub(crate) fn wan_vae(lease: &Lease<'_>, dtype: DType, device: &Device) -> anyhow::Result<WanVae> {
    Ok(WanVae::from_checkpoint(var_builder(lease, dtype, device))?)
}

/// The Wan DiT over a lease's weights (either key layout) with `loras` merged in; `config`
/// from a diffusers `config.json`, else from the shapes.
///
/// Merged weights are new tensors: while the model lives, each patched weight exists twice
/// (the lease's and the merged one), and the phase's measured peak shows it. Only LoRAs on
/// scaled-fp8 weights come here; others are merged by the store ([`plan_loras`]).
pub(crate) fn wan_dit(
    lease: &Lease<'_>,
    config: Option<&DitConfig>,
    dtype: DType,
    device: &Device,
    loras: &[(LoraFile, f64)],
) -> anyhow::Result<WanModel> {
    let mut weights = lease_weights(lease);
    if !loras.is_empty() {
        merge_loras(&mut weights, loras, dtype, device)?;
    }
    let vb = VarBuilder::from_tensors(weights, dtype, device);
    Ok(WanModel::from_checkpoint(vb, config)?)
}

/// Merges `loras` into the DiT weights (checkpoint names, either layout). A scaled-fp8 weight
/// that a LoRA patches is dequantised first and kept in `dtype`.
fn merge_loras(
    weights: &mut HashMap<String, Tensor>,
    loras: &[(LoraFile, f64)],
    dtype: DType,
    device: &Device,
) -> anyhow::Result<()> {
    let probe = VarBuilder::from_tensors(weights.clone(), dtype, device);
    let (layout, prefix) = dit_keys::detect_layout(&probe)
        .ok_or_else(|| anyhow::anyhow!("no Wan DiT in the checkpoint to merge the LoRA into"))?;
    drop(probe);
    // original name → checkpoint key
    let keys: HashMap<String, String> = weights
        .keys()
        .filter_map(|k| dit_keys::original_name(k, layout, prefix).map(|o| (o, k.clone())))
        .collect();
    let shapes: BTreeMap<String, Shape> = keys
        .iter()
        .map(|(original, key)| (original.clone(), weights[key].shape().clone()))
        .collect();
    let pairs: Vec<(&LoraFile, f64)> = loras.iter().map(|(f, s)| (f, *s)).collect();
    let plan = MergePlan::new(&pairs, &shapes, &dit_keys::diffusers_to_wan)?;
    let patched: Vec<String> = plan.patched_weights().map(str::to_owned).collect();
    for original in patched {
        let key = &keys[&original];
        let mut weight = weights[key].clone();
        if weight.dtype() == DType::F8E4M3 {
            weight = dequantized(weights, key, dtype)?;
        }
        let merged = plan.apply(&original, &weight)?;
        weights.insert(key.clone(), merged);
    }
    Ok(())
}

/// The scaled-fp8 weight `key` as `dtype` (its scale removed from `weights`): computed on the
/// host, where candle's float8 casts work.
fn dequantized(
    weights: &mut HashMap<String, Tensor>,
    key: &str,
    dtype: DType,
) -> anyhow::Result<Tensor> {
    let device = weights[key].device().clone();
    let stem = key.strip_suffix("weight").unwrap_or(key);
    let scale = ["scale_weight", "weight_scale"]
        .iter()
        .find_map(|s| weights.remove(&format!("{stem}{s}")));
    let mut weight = weights[key].to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    if let Some(scale) = scale {
        let scale = scale
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?;
        weight = weight.broadcast_mul(&scale.reshape(())?)?;
    }
    Ok(weight.to_dtype(dtype)?.to_device(&device)?)
}

/// The umT5 encoder over a lease's weights (transformers / ComfyUI or original Wan names);
/// `config` from a `config.json`, else from the shapes.
pub(crate) fn umt5(
    lease: &Lease<'_>,
    config: Option<&Umt5Config>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Umt5Encoder> {
    let vb = var_builder(lease, dtype, device);
    Ok(match config {
        Some(cfg) => Umt5Encoder::from_checkpoint_with_config(cfg, vb)?,
        None => Umt5Encoder::from_checkpoint(vb)?,
    })
}

/// Reads LoRA files (headers and tensors, on the host), each with its strength.
pub(crate) fn read_loras(
    files: &[(std::path::PathBuf, f64)],
) -> anyhow::Result<Vec<(LoraFile, f64)>> {
    files
        .iter()
        .map(|(path, strength)| {
            let file =
                LoraFile::read(path).with_context(|| format!("--lora {}", path.display()))?;
            Ok((file, *strength))
        })
        .collect()
}

/// Checks `loras` against the DiT's header (before any weight moves, so that a LoRA that
/// matches nothing fails early), notes what each file patches, and arranges the merge:
/// normally as a store patch, so that merged weights replace the originals as they are read
/// from disk; when a LoRA patches scaled-fp8 weights (whose dtype the merge changes), at model
/// build time instead (see [`wan_dit`]), which the returned `true` says.
pub(crate) fn plan_loras(
    p: &mut Phase<'_>,
    dit: ModelId,
    dit_path: &Path,
    loras: &[(LoraFile, f64)],
    files: &[(PathBuf, f64)],
) -> anyhow::Result<bool> {
    if loras.is_empty() {
        p.note("lora", "none");
        return Ok(false);
    }
    let header = vpipe_ckpt::inspect(dit_path)?;
    let layout = match header.detection.layout {
        vpipe_ckpt::KeyLayout::Diffusers => dit_keys::KeyLayout::Diffusers,
        _ => dit_keys::KeyLayout::Wan,
    };
    let prefix = &header.detection.prefix;
    // original name → (checkpoint key, shape, stored as float8)
    let weights: HashMap<String, (String, Shape, bool)> = header
        .tensors
        .iter()
        .filter_map(|t| {
            let fp8 = t.dtype.to_candle() == Some(DType::F8E4M3);
            dit_keys::original_name(&t.name, layout, prefix)
                .map(|o| (o, (t.name.clone(), Shape::from(t.shape.clone()), fp8)))
        })
        .collect();
    let shapes: BTreeMap<String, Shape> = weights
        .iter()
        .map(|(o, (_, shape, _))| (o.clone(), shape.clone()))
        .collect();
    let pairs: Vec<_> = loras.iter().map(|(f, s)| (f, *s)).collect();
    let plan = MergePlan::new(&pairs, &shapes, &dit_keys::diffusers_to_wan)?;
    for (summary, (path, strength)) in plan.summary().iter().zip(files) {
        p.note(
            "lora",
            &format!("{} at strength {strength}: {summary}", path.display()),
        );
    }
    let patched: Vec<String> = plan.patched_weights().map(str::to_owned).collect();
    if patched.iter().any(|o| weights[o].2) {
        p.note(
            "lora",
            "merged when the DiT is built (it patches scaled-fp8 weights)",
        );
        return Ok(true);
    }
    let by_key: HashMap<String, String> = patched
        .iter()
        .map(|o| (weights[o].0.clone(), o.clone()))
        .collect();
    let plan = std::sync::Arc::new(plan);
    let patch = WeightPatch {
        keys: by_key.keys().cloned().collect(),
        apply: std::sync::Arc::new(move |key: &str, weight: &Tensor| {
            plan.apply(&by_key[key], weight)
                .map_err(candle_core::Error::wrap)
        }),
    };
    p.note(
        "lora",
        &format!(
            "{} weights merged as they are read from disk",
            patch.keys.len()
        ),
    );
    p.set_patch(dit, patch)?;
    Ok(false)
}
