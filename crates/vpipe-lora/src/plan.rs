//! Matching LoRA modules to model weights, and merging.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::{Error, Result};
use crate::file::{LoraFile, Module, Naming, PairStyle};

/// The largest finite float8 e4m3fn value.
const F8E4M3_MAX: f64 = 448.0;

/// Rows of a weight [`MergePlan::apply_in_place`] merges together: their low-rank update is one
/// matrix product, and their f32 copy (13 824 columns: 1.8 MB) stays in a core's cache.
const MERGE_ROWS: usize = 32;

/// One contribution to one model weight.
#[derive(Debug)]
pub(crate) struct Patch {
    pub(crate) strength: f64,
    pub(crate) delta: Delta,
}

#[derive(Debug)]
pub(crate) enum Delta {
    /// `scale · up · down`, flattened to `[out, in·k…]` and reshaped to the weight.
    LowRank {
        /// shape [out, rank, 1…]
        up: Tensor,
        /// shape [rank, in, k…]
        down: Tensor,
        scale: f64,
    },
    /// `scale · delta`, same shape as the weight.
    Full { delta: Tensor, scale: f64 },
}

impl Patch {
    /// What the patch's product (or full delta) is multiplied by: strength · alpha / rank.
    pub(crate) fn factor_scale(&self) -> f64 {
        match &self.delta {
            Delta::LowRank { scale, .. } | Delta::Full { scale, .. } => self.strength * scale,
        }
    }

    /// The patch in `dtype` on `device`, shaped like the weight.
    fn delta(&self, dtype: DType, device: &Device, shape: &Shape) -> Result<Tensor> {
        let out = match &self.delta {
            Delta::LowRank { up, down, .. } => {
                let rank = down.dims()[0];
                let out_dim = up.dims()[0];
                let up = up
                    .to_device(device)?
                    .to_dtype(dtype)?
                    .reshape((out_dim, rank))?;
                let down = down.to_device(device)?.to_dtype(dtype)?;
                let in_flat = down.elem_count() / rank;
                // strength · alpha / rank on the rank × in factor rather than on the product:
                // the same numbers up to f32 rounding, one full-size temporary less per merge.
                let down = down
                    .reshape((rank, in_flat))?
                    .affine(self.factor_scale(), 0.0)?;
                up.matmul(&down)?.reshape(shape)?
            }
            Delta::Full { delta, .. } => delta
                .to_device(device)?
                .to_dtype(dtype)?
                .affine(self.factor_scale(), 0.0)?,
        };
        Ok(out)
    }
}

#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) shape: Shape,
    pub(crate) patches: Vec<Patch>,
}

/// What one LoRA file contributes to a [`MergePlan`], for logging ([`MergePlan::summary`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FileSummary {
    /// The file name.
    pub file: String,
    /// The strength it is merged with.
    pub strength: f64,
    /// Key namings found (usually one).
    pub namings: BTreeSet<Naming>,
    /// Pair namings found (empty for a diff-only file).
    pub pair_styles: BTreeSet<PairStyle>,
    /// Low-rank pairs (one weight each).
    pub pairs: usize,
    /// Full weight deltas (`diff`).
    pub diffs: usize,
    /// Bias deltas (`diff_b`, `lora_B.bias`).
    pub bias_diffs: usize,
    /// Distinct ranks of the pairs.
    pub ranks: BTreeSet<usize>,
    /// Distinct alphas of the pairs, ascending.
    pub alphas: Vec<f64>,
    /// Pairs without alpha (scale 1).
    pub pairs_without_alpha: usize,
}

impl FileSummary {
    /// Model weights this file patches.
    pub fn patches(&self) -> usize {
        self.pairs + self.diffs + self.bias_diffs
    }
}

impl fmt::Display for FileSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let namings: Vec<String> = self.namings.iter().map(|n| n.to_string()).collect();
        write!(
            f,
            "{} (strength {}): {}; {} patches ({} low-rank",
            self.file,
            self.strength,
            namings.join(", "),
            self.patches(),
            self.pairs
        )?;
        if !self.pair_styles.is_empty() {
            let styles: Vec<String> = self.pair_styles.iter().map(|s| s.to_string()).collect();
            write!(f, " {}", styles.join("+"))?;
        }
        write!(f, ", {} diff, {} bias diff)", self.diffs, self.bias_diffs)?;
        if self.pairs > 0 {
            write!(f, "; rank {:?}; alpha {:?}", self.ranks, self.alphas)?;
            if self.pairs_without_alpha > 0 {
                write!(
                    f,
                    " ({} pair(s) without alpha: scale 1)",
                    self.pairs_without_alpha
                )?;
            }
        }
        Ok(())
    }
}

/// Finds the model weight a LoRA module names.
struct Resolver<'a> {
    weights: &'a BTreeMap<String, Shape>,
    diffusers_to_original: &'a dyn Fn(&str) -> Option<String>,
    /// kohya flat name (`blocks_0_self_attn_q`) → the model weights it spells.
    flat: HashMap<String, Vec<String>>,
}

enum Resolved {
    Weight(String),
    Missing,
    Ambiguous(Vec<String>),
}

impl<'a> Resolver<'a> {
    fn new(
        weights: &'a BTreeMap<String, Shape>,
        diffusers_to_original: &'a dyn Fn(&str) -> Option<String>,
    ) -> Self {
        let mut flat: HashMap<String, Vec<String>> = HashMap::new();
        for name in weights.keys() {
            // ComfyUI builds `lora_unet_` names from `.weight` tensors; parameters without that
            // suffix (`blocks.0.modulation`) are spelled in full.
            let stem = name.strip_suffix(".weight").unwrap_or(name);
            flat.entry(stem.replace('.', "_"))
                .or_default()
                .push(name.clone());
        }
        Self {
            weights,
            diffusers_to_original,
            flat,
        }
    }

    /// `stem.weight`, or the stem itself for parameters such as `modulation`.
    fn original(&self, stem: &str) -> Option<String> {
        [format!("{stem}.weight"), stem.to_string()]
            .into_iter()
            .find(|n| self.weights.contains_key(n))
    }

    fn diffusers(&self, stem: &str) -> Option<String> {
        [format!("{stem}.weight"), stem.to_string()]
            .iter()
            .filter_map(|n| (self.diffusers_to_original)(n))
            .find(|n| self.weights.contains_key(n))
    }

    fn resolve(&self, module: &Module) -> Resolved {
        let name = module.name();
        let found = |w: Option<String>| w.map_or(Resolved::Missing, Resolved::Weight);
        match module.naming {
            Naming::Original => found(self.original(name)),
            Naming::Diffusers => found(self.diffusers(name)),
            Naming::KohyaFlat | Naming::WanFun => match self.flat.get(name) {
                None => Resolved::Missing,
                Some(v) if v.len() == 1 => Resolved::Weight(v[0].clone()),
                Some(v) => Resolved::Ambiguous(v.clone()),
            },
            Naming::Bare => match (self.original(name), self.diffusers(name)) {
                (Some(a), Some(b)) if a != b => Resolved::Ambiguous(vec![a, b]),
                (Some(a), _) | (None, Some(a)) => Resolved::Weight(a),
                (None, None) => Resolved::Missing,
            },
        }
    }
}

/// Which model weights get which LoRA patches: the result of matching one or more
/// [`LoraFile`]s, each with its strength, against a model's weight names and shapes.
///
/// The patches of all files are summed onto each weight ([`MergePlan::apply`]), in f32 (f64 for
/// an f64 weight) on the weight's device, and the result is cast back to the weight's dtype:
///
/// - low-rank pair: `ΔW = strength · (alpha / rank) · up · down`, `rank = down.shape[0]`, scale 1
///   without alpha; conv weights (`patch_embedding`, `[out, in, 1, 2, 2]`) through the
///   flattened `[out, in·1·2·2]` product;
/// - `diff`: `ΔW = strength · diff`; `diff_b`: `Δbias = strength · diff_b`;
/// - `lora_B.bias` (PEFT): `Δbias = strength · (alpha / rank) · bias`, as PEFT scales it.
///
/// These are ComfyUI's formulas (`comfy/lora.py`, `comfy/weight_adapter/lora.py`).
///
/// The plan remembers which weights it has patched, so that a loader can check afterwards that
/// the model really asked for every patched weight under the planned name
/// ([`MergePlan::ensure_all_applied`]).
#[derive(Debug)]
pub struct MergePlan {
    pub(crate) targets: BTreeMap<String, Target>,
    summaries: Vec<FileSummary>,
    applied: Mutex<BTreeSet<String>>,
}

impl MergePlan {
    /// Matches each LoRA's keys to `model_weights` and checks every shape.
    ///
    /// - `loras`: each file with its strength (ComfyUI's `strength_model`).
    /// - `model_weights`: every weight of the model under its **original Wan / ComfyUI name**
    ///   (`blocks.0.self_attn.q.weight`, `blocks.0.modulation`, `head.head.weight`, …), without
    ///   any checkpoint prefix, with its shape.
    /// - `diffusers_to_original`: maps a diffusers weight name (`blocks.0.attn1.to_q.weight`) to
    ///   the original name, `None` if it knows none; used for `transformer.`-prefixed and bare
    ///   LoRA keys.
    ///
    /// Kohya flat names (`lora_unet_blocks_0_self_attn_q`, Wan-Fun's `lora_unet__…`) are matched
    /// against the model names with `.` replaced by `_`.
    ///
    /// # Errors
    /// Per file, in this order: [`Error::Strength`] for a non-finite strength,
    /// [`Error::Ambiguous`], [`Error::Unmatched`] listing every key that fits no weight,
    /// [`Error::DuplicateTarget`], [`Error::ShapeMismatch`].
    pub fn new(
        loras: &[(&LoraFile, f64)],
        model_weights: &BTreeMap<String, Shape>,
        diffusers_to_original: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let resolver = Resolver::new(model_weights, diffusers_to_original);
        let mut targets: BTreeMap<String, Target> = BTreeMap::new();
        let mut summaries = Vec::new();
        for &(lora, strength) in loras {
            let file = lora.name().to_string();
            if !strength.is_finite() {
                return Err(Error::Strength { file, strength });
            }
            let mut summary = FileSummary {
                file: file.clone(),
                strength,
                namings: lora.namings(),
                pair_styles: BTreeSet::new(),
                pairs: 0,
                diffs: 0,
                bias_diffs: 0,
                ranks: BTreeSet::new(),
                alphas: Vec::new(),
                pairs_without_alpha: 0,
            };
            let mut unmatched = Vec::new();
            // weight → (LoRA key, patch) of this file.
            let mut mine: BTreeMap<String, Vec<(String, Delta)>> = BTreeMap::new();
            for module in lora.modules() {
                let weight = match resolver.resolve(module) {
                    Resolved::Weight(w) => Some(w),
                    Resolved::Missing => None,
                    Resolved::Ambiguous(candidates) => {
                        return Err(Error::Ambiguous {
                            file,
                            key: module.key.clone(),
                            candidates,
                        })
                    }
                };
                let bias = weight
                    .as_deref()
                    .and_then(|w| w.strip_suffix(".weight"))
                    .map(|stem| format!("{stem}.bias"))
                    .filter(|b| model_weights.contains_key(b));
                let scale = module.pair.as_ref().map_or(1.0, |p| p.scale());
                if let Some(p) = &module.pair {
                    match &weight {
                        Some(w) => mine.entry(w.clone()).or_default().push((
                            p.up_key.clone(),
                            Delta::LowRank {
                                up: p.up.clone(),
                                down: p.down.clone(),
                                scale,
                            },
                        )),
                        None => unmatched.extend([p.down_key.clone(), p.up_key.clone()]),
                    }
                }
                if let Some(d) = &module.diff {
                    match &weight {
                        Some(w) => mine.entry(w.clone()).or_default().push((
                            d.key.clone(),
                            Delta::Full {
                                delta: d.delta.clone(),
                                scale: 1.0,
                            },
                        )),
                        None => unmatched.push(d.key.clone()),
                    }
                }
                for (d, scale) in [(&module.diff_b, 1.0), (&module.peft_bias, scale)] {
                    let Some(d) = d else { continue };
                    match &bias {
                        Some(b) => mine.entry(b.clone()).or_default().push((
                            d.key.clone(),
                            Delta::Full {
                                delta: d.delta.clone(),
                                scale,
                            },
                        )),
                        None => unmatched.push(d.key.clone()),
                    }
                }
            }
            if !unmatched.is_empty() {
                unmatched.sort();
                return Err(Error::Unmatched {
                    file,
                    keys: unmatched,
                });
            }
            for (weight, mut patches) in mine {
                if patches.len() > 1 {
                    return Err(Error::DuplicateTarget {
                        file,
                        weight,
                        keys: patches.into_iter().map(|(k, _)| k).collect(),
                    });
                }
                let (key, delta) = patches.pop().expect("one patch per weight");
                let shape = &model_weights[&weight];
                check_shape(&file, &key, &delta, &weight, shape)?;
                match (&delta, weight.ends_with(".bias")) {
                    (_, true) => summary.bias_diffs += 1,
                    (Delta::LowRank { .. }, false) => summary.pairs += 1,
                    (Delta::Full { .. }, false) => summary.diffs += 1,
                }
                targets
                    .entry(weight)
                    .or_insert_with(|| Target {
                        shape: shape.clone(),
                        patches: Vec::new(),
                    })
                    .patches
                    .push(Patch { strength, delta });
            }
            for p in lora.modules().iter().filter_map(|m| m.pair.as_ref()) {
                summary.pair_styles.insert(p.style);
                summary.ranks.insert(p.rank());
                match p.alpha {
                    Some(a) if !summary.alphas.contains(&a) => summary.alphas.push(a),
                    Some(_) => {}
                    None => summary.pairs_without_alpha += 1,
                }
            }
            summary.alphas.sort_by(f64::total_cmp);
            summaries.push(summary);
        }
        Ok(Self {
            targets,
            summaries,
            applied: Mutex::new(BTreeSet::new()),
        })
    }

    /// The model weights that get at least one patch, sorted.
    pub fn patched_weights(&self) -> impl Iterator<Item = &str> {
        self.targets.keys().map(String::as_str)
    }

    /// Whether `name` gets a patch.
    pub fn is_patched(&self, name: &str) -> bool {
        self.targets.contains_key(name)
    }

    /// Per file: naming, patch counts, ranks, alphas. Each implements `Display` for logging.
    pub fn summary(&self) -> &[FileSummary] {
        &self.summaries
    }

    /// The merged weight: `weight` plus every patch planned for `name`, computed in f32 (f64 for
    /// an f64 weight) on `weight`'s device, returned in `weight`'s dtype. A weight the plan does
    /// not patch comes back unchanged (a cheap clone of the same storage).
    ///
    /// # Shapes
    /// `weight` must have the shape given for `name` in the plan's model weight list; the
    /// result has the same shape.
    pub fn apply(&self, name: &str, weight: &Tensor) -> Result<Tensor> {
        let Some(target) = self.targets.get(name) else {
            return Ok(weight.clone());
        };
        if weight.shape() != &target.shape {
            return Err(Error::WeightShape {
                weight: name.to_string(),
                expected: target.shape.clone(),
                got: weight.shape().clone(),
            });
        }
        let compute = if weight.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let device = weight.device();
        let mut acc = weight.to_dtype(compute)?;
        for patch in &target.patches {
            acc = (acc + patch.delta(compute, device, &target.shape)?)?;
        }
        let merged = acc.to_dtype(weight.dtype())?;
        self.mark_applied(name);
        Ok(merged)
    }

    /// [`MergePlan::apply`] done in place on the weight's bytes (row-major, little-endian, in
    /// `dtype`), with no full-size temporary: each block of rows is merged in f32 from its own
    /// bytes and the patches' factors (a low-rank patch's `rank × in` factor scaled once),
    /// blocks in parallel. This lets the store merge a weight where it was read to (its pinned
    /// arena), so a LoRA adds no second copy and no read through a memory map. The same sums as
    /// [`MergePlan::apply`] in another order, so a merged value may differ by f32 rounding
    /// before it is rounded to `dtype`.
    ///
    /// Returns `Ok(false)`, with nothing written, where this path does not apply: a weight the
    /// plan does not patch, or a dtype other than f32, bf16 or f16.
    ///
    /// # Shapes
    /// `weight` holds exactly the elements of the shape given for `name` in the plan's model
    /// weight list.
    pub fn apply_in_place(&self, name: &str, dtype: DType, weight: &mut [u8]) -> Result<bool> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Ok(false);
        }
        self.merge_rows_in_place(
            name,
            (dtype, weight),
            |bytes, out| decode_f32(dtype, bytes, out),
            |values, bytes| encode_f32(dtype, values, bytes),
        )
    }

    /// [`MergePlan::apply_scaled_fp8`] done in place on a float8 e4m3 weight's bytes with one
    /// `scale` for the whole weight, as [`MergePlan::apply_in_place`] does for 16-bit weights:
    /// each block of rows dequantised to f32, merged, and rounded back to float8 with the same
    /// scale (to nearest even, saturating at ±448), blocks in parallel. The same sums as
    /// [`MergePlan::apply_scaled_fp8`] in another order.
    ///
    /// Returns `Ok(false)`, with nothing written, for a weight the plan does not patch.
    ///
    /// # Shapes
    /// As [`MergePlan::apply_in_place`], one byte per element.
    pub fn apply_in_place_scaled_fp8(
        &self,
        name: &str,
        scale: f32,
        weight: &mut [u8],
    ) -> Result<bool> {
        let max = F8E4M3_MAX as f32;
        let table = e4m3_values();
        self.merge_rows_in_place(
            name,
            (DType::F8E4M3, weight),
            |bytes, out| {
                for (o, b) in out.iter_mut().zip(bytes) {
                    *o = table[*b as usize] * scale;
                }
            },
            |values, bytes| {
                for (b, v) in bytes.iter_mut().zip(values) {
                    *b = e4m3_bits((v / scale).clamp(-max, max));
                }
            },
        )
    }

    /// Merges the patches of `name` into `weight`'s bytes (elements of `dtype`'s size) a block
    /// of rows at a time, in parallel: `decode` reads a block's bytes as f32, `encode` writes
    /// the merged values back. `Ok(false)` for a weight the plan does not patch.
    fn merge_rows_in_place(
        &self,
        name: &str,
        (dtype, weight): (DType, &mut [u8]),
        decode: impl Fn(&[u8], &mut [f32]) + Sync,
        encode: impl Fn(&[f32], &mut [u8]) + Sync,
    ) -> Result<bool> {
        use rayon::prelude::*;
        let Some(target) = self.targets.get(name) else {
            return Ok(false);
        };
        let rows = target.shape.dims().first().copied().unwrap_or(1).max(1);
        let columns = target.shape.elem_count() / rows;
        let elem = dtype.size_in_bytes();
        if weight.len() != rows * columns * elem {
            return Err(Error::WeightShape {
                weight: format!("{name} (held as {} bytes of {dtype:?})", weight.len()),
                expected: target.shape.clone(),
                got: Shape::from(weight.len() / elem),
            });
        }
        // Each patch as row factors: low rank `up` [rows, rank] and the scaled `down`
        // [rank, columns] (a matrix product of a block of rows at a time); a full patch as its
        // scaled delta [rows, columns].
        enum Factors {
            LowRank {
                up: Vec<f32>,
                down: Vec<f32>,
                rank: usize,
            },
            Full(Vec<f32>),
        }
        let f32_vec = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let factors = target
            .patches
            .iter()
            .map(|patch| -> Result<Factors> {
                Ok(match &patch.delta {
                    Delta::LowRank { up, down, .. } => {
                        let rank = down.dims()[0];
                        let down = down
                            .to_dtype(DType::F32)?
                            .affine(patch.factor_scale(), 0.0)?;
                        Factors::LowRank {
                            up: f32_vec(up)?,
                            down: f32_vec(&down)?,
                            rank,
                        }
                    }
                    Delta::Full { delta, .. } => Factors::Full(f32_vec(
                        &delta
                            .to_dtype(DType::F32)?
                            .affine(patch.factor_scale(), 0.0)?,
                    )?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // A block of rows at a time: the low-rank update of the block is one matrix product
        // accumulated into the rows, which reuses each `down` row across the block's rows (a
        // row at a time re-read all of `down` per row, 4× slower on a 14B FFN weight,
        // examples/merge_speed.rs).
        let add_updates = |first: usize, acc: &mut [f32]| {
            let count = acc.len() / columns;
            for factors in &factors {
                match factors {
                    Factors::LowRank { up, down, rank } => {
                        add_product(acc, &up[first * rank..(first + count) * rank], down, *rank)
                    }
                    Factors::Full(delta) => {
                        let delta = &delta[first * columns..(first + count) * columns];
                        for (a, d) in acc.iter_mut().zip(delta) {
                            *a += d;
                        }
                    }
                }
            }
        };
        weight
            .par_chunks_mut(MERGE_ROWS * columns * elem)
            .enumerate()
            .try_for_each_init(
                || vec![0f32; MERGE_ROWS * columns],
                |acc, (block, bytes)| -> Result<()> {
                    let acc = &mut acc[..bytes.len() / elem];
                    decode(bytes, acc);
                    add_updates(block * MERGE_ROWS, acc);
                    encode(acc, bytes);
                    Ok(())
                },
            )?;
        self.mark_applied(name);
        Ok(true)
    }

    /// [`MergePlan::apply`] for a ComfyUI scaled-fp8 weight (`w = f32(w8) · scale`): the patches
    /// are merged into the dequantised weight in f32, and the result is stored back as float8
    /// with the same scale (round to nearest even, saturating at ±448), so the merged weight
    /// takes no more memory than the original. ComfyUI rounds stochastically at this point;
    /// vpipe rounds to nearest so that a run is reproducible.
    ///
    /// # Shapes
    /// `weight` as in [`MergePlan::apply`], float8 e4m3; `scale` one element (or broadcastable
    /// to `weight`).
    pub fn apply_scaled_fp8(&self, name: &str, weight: &Tensor, scale: &Tensor) -> Result<Tensor> {
        if !self.targets.contains_key(name) {
            return Ok(weight.clone());
        }
        let scale = scale.to_device(weight.device())?.to_dtype(DType::F32)?;
        let dequantised = weight.to_dtype(DType::F32)?.broadcast_mul(&scale)?;
        let merged = self.apply(name, &dequantised)?;
        Ok(merged
            .broadcast_div(&scale)?
            .clamp(-F8E4M3_MAX, F8E4M3_MAX)?
            .to_dtype(weight.dtype())?)
    }

    /// Records that `name` was merged (for [`MergePlan::ensure_all_applied`]).
    pub(crate) fn mark_applied(&self, name: &str) {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
    }

    /// Patched weights that [`MergePlan::apply`] has not been called for yet, sorted.
    pub fn unapplied(&self) -> Vec<String> {
        let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        self.targets
            .keys()
            .filter(|k| !applied.contains(*k))
            .cloned()
            .collect()
    }

    /// Fails with [`Error::NotApplied`] if some patched weight was never merged, e.g. because
    /// the model loads it under another name than the one the plan was made with. Call it after
    /// building the model through a [`crate::LoraBackend`].
    pub fn ensure_all_applied(&self) -> Result<()> {
        let weights = self.unapplied();
        if weights.is_empty() {
            Ok(())
        } else {
            Err(Error::NotApplied { weights })
        }
    }
}

fn check_shape(file: &str, key: &str, delta: &Delta, weight: &str, shape: &Shape) -> Result<()> {
    let dims = shape.dims();
    let (fits, lora_shape) = match delta {
        Delta::LowRank { up, down, .. } => {
            let rank = down.dims()[0];
            let fits = !dims.is_empty()
                && up.dims()[0] == dims[0]
                && down.elem_count() / rank == shape.elem_count() / dims[0];
            (fits, format!("up {:?} · down {:?}", up.dims(), down.dims()))
        }
        Delta::Full { delta, .. } => (delta.dims() == dims, format!("{:?}", delta.dims())),
    };
    if fits {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            file: file.to_string(),
            key: key.to_string(),
            lora_shape,
            weight: weight.to_string(),
            weight_shape: dims.into(),
        })
    }
}

/// Little-endian `dtype` values (f32, bf16 or f16) widened to f32.
fn decode_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        _ => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
    }
}

/// f32 values rounded (to nearest even) to little-endian `dtype` (f32, bf16 or f16).
fn encode_f32(dtype: DType, values: &[f32], bytes: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (b, v) in bytes.chunks_exact_mut(4).zip(values) {
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::BF16 => {
            for (b, v) in bytes.chunks_exact_mut(2).zip(values) {
                b.copy_from_slice(&bf16_bits(*v).to_le_bytes());
            }
        }
        _ => {
            for (b, v) in bytes.chunks_exact_mut(2).zip(values) {
                b.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
    }
}

/// The value of each float8 e4m3 bit pattern (NaN for the two NaNs), as `float8` decodes it.
fn e4m3_values() -> &'static [f32; 256] {
    static VALUES: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    VALUES.get_or_init(|| std::array::from_fn(|i| float8::F8E4M3::from_bits(i as u8).to_f32()))
}

/// `value` (|value| at most 448) rounded to the nearest float8 e4m3 (ties to even), as bits; a
/// NaN stays NaN. The rounding `float8::F8E4M3::from_f32` does, without its detour through
/// f64 and its branches for values a clamped weight never holds (with it, the merge of a 14B
/// FFN weight took 0.650 s on 2 cores; with this, 0.154 s).
fn e4m3_bits(value: f32) -> u8 {
    let bits = value.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let magnitude = bits & 0x7fff_ffff;
    if value.is_nan() {
        return sign | 0x7f;
    }
    let below_normal = f32::from_bits(magnitude) < E4M3_MIN_NORMAL;
    let code = if below_normal {
        // Multiples of 2⁻⁹ (the subnormals; 8 is the smallest normal, 2⁻⁶).
        (f32::from_bits(magnitude) * 512.0).round_ties_even() as u8
    } else {
        // The 23-bit mantissa rounded to 3 bits (a carry moves into the exponent), the
        // exponent rebiased from 127 to 7.
        let rounded = magnitude + 0x7_ffff + ((magnitude >> 20) & 1);
        ((rounded >> 20) - ((127 - 7) << 3)) as u8
    };
    sign | code
}

/// float8 e4m3's smallest normal value, 2⁻⁶.
const E4M3_MIN_NORMAL: f32 = 1.0 / 64.0;

/// `value` rounded to the nearest bfloat16 (ties to even), as bits: `half::bf16::from_f32`
/// without its branches, so that a loop of it vectorises; a NaN stays a (quiet) NaN.
fn bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if value.is_nan() {
        ((bits >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

/// `acc += up · down`, row-major: `acc` [rows, columns], `up` [rows, rank], `down` [rank,
/// columns]; one thread (the caller runs blocks of rows in parallel).
///
/// # Panics
/// When the lengths do not make those shapes.
#[allow(unsafe_code)]
fn add_product(acc: &mut [f32], up: &[f32], down: &[f32], rank: usize) {
    assert!(rank > 0 && down.len().is_multiple_of(rank) && up.len().is_multiple_of(rank));
    let (rows, columns) = (up.len() / rank, down.len() / rank);
    assert_eq!(acc.len(), rows * columns);
    // SAFETY: the three slices hold exactly the row-major shapes given (asserted above), the
    // strides stay within them, and `acc` is borrowed mutably, so it aliases neither factor.
    unsafe {
        gemm::gemm(
            rows,
            columns,
            rank,
            acc.as_mut_ptr(),
            1,
            columns as isize,
            true,
            up.as_ptr(),
            1,
            rank as isize,
            down.as_ptr(),
            1,
            columns as isize,
            1f32,
            1f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float8_rounding_matches_the_float8_crate_at_every_boundary() {
        use float8::F8E4M3;
        let table = e4m3_values();
        let mut values: Vec<f32> = Vec::new();
        // Every finite e4m3 value up to 448, the f32s next to it, and the midpoints to the
        // next value with their neighbours (the ties and the values just off them).
        let finite: Vec<f32> = (0u8..=0x7e).map(|b| table[b as usize]).collect();
        for pair in finite.windows(2) {
            let mid = (pair[0] + pair[1]) / 2.0;
            for v in [pair[0], mid] {
                values.extend([v, f32::from_bits(v.to_bits() + 1)]);
                if v > 0.0 {
                    values.push(f32::from_bits(v.to_bits() - 1));
                }
            }
        }
        values.push(448.0);
        // And a spread of others.
        let mut x = 1e-6f32;
        while x < 448.0 {
            values.push(x);
            x *= 1.0007;
        }
        for v in values {
            for v in [v, -v] {
                assert_eq!(
                    e4m3_bits(v),
                    F8E4M3::from_f32(v).to_bits(),
                    "{v:e} ({:#x})",
                    v.to_bits()
                );
            }
        }
        assert!(table[e4m3_bits(f32::NAN) as usize].is_nan());
        for b in 0u8..=255 {
            let v = F8E4M3::from_bits(b).to_f32();
            assert!(table[b as usize] == v || (v.is_nan() && table[b as usize].is_nan()));
        }
    }

    /// The branch-free rounding equals `half`'s on every kind of value: ties both ways,
    /// subnormals, the largest finite values (rounding to infinity), infinities and NaNs.
    #[test]
    fn bf16_rounding_is_halfs() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::from_bits(0x3f80_8000), // a tie, rounds down to even
            f32::from_bits(0x3f81_8000), // a tie, rounds up to even
            f32::from_bits(0x0000_0001),
            f32::from_bits(0x807f_ffff),
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001), // a signalling NaN
        ];
        let spread = (0..1u32 << 20).map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9)));
        for value in specials.into_iter().chain(spread) {
            let want = half::bf16::from_f32(value);
            let got = bf16_bits(value);
            if value.is_nan() {
                assert!(half::bf16::from_bits(got).is_nan(), "{value:?}");
            } else {
                assert_eq!(got, want.to_bits(), "{value:?} ({:#010x})", value.to_bits());
            }
        }
    }
}
