//! Models built from leased weights. A model made here holds clones of the lease's tensors:
//! drop it before the phase offloads the weights, or the offload's verification fails.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};
use vpipe_lora::{LoraFile, MergePlan};

use vpipe_mem::{Lease, ModelId, Phase, StreamSpec, Streamer, TensorMeta, WeightPatch};
use vpipe_models::wan::{dit_keys, BlockPart, BlockSource, DitConfig, WanModel, WanVae};
use vpipe_text::umt5::{Config as Umt5Config, Umt5Encoder, Umt5Source};

use crate::error::{Context, Error, Result};
use crate::models::Checkpoint;

/// A `VarBuilder` over clones (reference counts) of a lease's weights, handing them out in
/// `dtype` unless a layer asks for another (float8 weights stay float8).
///
/// A plain float8 weight (no scale next to it) gets a scale of exactly 1, so that the model
/// keeps it in float8 as it keeps ComfyUI's scaled ones, instead of holding a converted copy
/// of twice or four times its size that the plan did not count.
fn var_builder(
    lease: &Lease<'_>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<VarBuilder<'static>> {
    let weights = lease
        .iter()
        .map(|(name, t)| (name.to_owned(), t.clone()))
        .collect();
    var_builder_of(weights, dtype, device)
}

/// [`var_builder`] over weights by checkpoint key.
fn var_builder_of(
    mut weights: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<VarBuilder<'static>> {
    let unscaled: Vec<String> = weights
        .iter()
        .filter(|(_, t)| t.dtype() == DType::F8E4M3)
        .filter_map(|(name, _)| name.strip_suffix("weight"))
        .filter(|stem| {
            fp8_scale_names(stem)
                .iter()
                .all(|n| !weights.contains_key(n))
        })
        .map(str::to_owned)
        .collect();
    for stem in unscaled {
        let [scale_name, _] = fp8_scale_names(&stem);
        weights.insert(scale_name, Tensor::new(1f32, device)?);
    }
    Ok(VarBuilder::from_tensors(weights, dtype, device))
}

/// The checkpoint keys the model reads the per-tensor scale of the float8 weight `{stem}weight`
/// from ([`SCALE_NAMES`](vpipe_models::ops::linear::SCALE_NAMES)).
fn fp8_scale_names(stem: &str) -> [String; 2] {
    vpipe_models::ops::linear::SCALE_NAMES.map(|name| format!("{stem}{name}"))
}

/// The Wan VAE over a lease's weights (either key layout; config from the shapes).
pub fn wan_vae(lease: &Lease<'_>, dtype: DType, device: &Device) -> Result<WanVae> {
    Ok(WanVae::from_checkpoint(var_builder(lease, dtype, device)?)?)
}

/// The Wan DiT over a lease's weights (either key layout, LoRAs already merged by the store,
/// see [`plan_loras`]); `config` from a diffusers `config.json`, else from the shapes.
pub fn wan_dit(
    lease: &Lease<'_>,
    config: Option<&DitConfig>,
    dtype: DType,
    device: &Device,
) -> Result<WanModel> {
    Ok(WanModel::from_checkpoint(
        var_builder(lease, dtype, device)?,
        config,
    )?)
}

/// [`var_builder`] over a stream's fixed tensors.
fn fixed_var_builder(
    streamer: &Streamer,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<VarBuilder<'static>> {
    let fixed = streamer
        .fixed()
        .iter()
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    var_builder_of(fixed, dtype, device)
}

/// The stream of a model's blocks from `held` on (blocks before it are held for the whole
/// phase with the tensors outside the blocks, but those `host_rows` says are read by rows):
/// `parts` groups per block (`part_of` names a key's block and part), each group's keys
/// sorted, so that every group lines up with the same part of the first block (a block's keys
/// share their prefix up to the block's index).
fn block_stream(
    keys: &[TensorMeta],
    part_of: &dyn Fn(&str) -> Option<(usize, usize)>,
    (blocks, parts): (usize, usize),
    held: usize,
    slots: usize,
    host_rows: &dyn Fn(&str) -> bool,
) -> StreamSpec {
    let mut groups: Vec<Vec<String>> = vec![Vec::new(); blocks.saturating_sub(held) * parts];
    for meta in keys {
        if let Some((index, part)) =
            part_of(&meta.name).filter(|&(i, part)| (held..blocks).contains(&i) && part < parts)
        {
            groups[(index - held) * parts + part].push(meta.name.clone());
        }
    }
    for group in &mut groups {
        group.sort_unstable();
    }
    StreamSpec {
        groups,
        slots,
        host_rows: keys
            .iter()
            .filter(|t| host_rows(&t.name))
            .map(|t| t.name.clone())
            .collect(),
    }
}

/// The stream of a DiT's blocks from `held` on, each block in `parts` groups: 1, whole, or
/// its [`BlockPart`]s in order, one arena slot each (see [`block_stream`]); the text and time
/// embeddings' larger weights stay on the host, brought to the device at each forward
/// ([`StreamedBlocks`]).
pub(crate) fn dit_block_stream(
    keys: &[TensorMeta],
    (blocks, parts): (usize, usize),
    held: usize,
    slots: usize,
) -> Result<StreamSpec> {
    let contains = |name: &str| keys.iter().any(|t| t.name == name);
    let (layout, prefix) = dit_keys::detect_layout_of(&contains).ok_or(Error::KeyLayout(
        "the DiT checkpoint's key layout is not recognised",
    ))?;
    let part_of = |name: &str| {
        if parts == 1 {
            return dit_keys::block_of(name, prefix).map(|(index, _)| (index, 0));
        }
        let (index, part) = dit_keys::block_part_of(name, layout, prefix)?;
        Some((index, part.index()))
    };
    Ok(block_stream(
        keys,
        &part_of,
        (blocks, parts),
        held,
        slots,
        &|name| dit_keys::is_source_embedding(name, layout, prefix),
    ))
}

/// The stream of an umT5 encoder's blocks from `held` on, its token embedding read by rows
/// on the host (see [`block_stream`]); also returns the embedding's key.
pub(crate) fn umt5_block_stream(
    keys: &[TensorMeta],
    blocks: usize,
    held: usize,
    slots: usize,
) -> Result<(StreamSpec, String)> {
    use vpipe_text::umt5::keys as umt5_keys;
    let contains = |name: &str| keys.iter().any(|t| t.name == name);
    let (layout, prefix) = umt5_keys::detect_layout_of(&contains).ok_or(Error::KeyLayout(
        "the text encoder checkpoint's key layout is not recognised",
    ))?;
    let embedding = match layout {
        umt5_keys::KeyLayout::Transformers { embedding } => {
            embedding.map(|e| format!("{prefix}{e}"))
        }
        umt5_keys::KeyLayout::Wan => Some(format!("{prefix}token_embedding.weight")),
    }
    .filter(|key| contains(key))
    .ok_or(Error::KeyLayout(
        "the text encoder checkpoint has no token embedding",
    ))?;
    let spec = block_stream(
        keys,
        &|name| umt5_keys::block_of(name, layout, prefix).map(|index| (index, 0)),
        (blocks, 1),
        held,
        slots,
        &|name| umt5_keys::is_embedding(name, layout, prefix),
    );
    Ok((spec, embedding))
}

/// The umT5 encoder over a stream's fixed tensors (the blocks before `held` and the final
/// norm); the token embedding's rows and the other blocks come from [`StreamedText`].
pub(crate) fn umt5_streamed(
    streamer: &Streamer,
    config: &Umt5Config,
    held: usize,
    dtype: DType,
    device: &Device,
) -> Result<Umt5Encoder> {
    Ok(Umt5Encoder::from_checkpoint_partial(
        config,
        fixed_var_builder(streamer, dtype, device)?,
        &|i| i < held,
    )?)
}

/// The text encoder's streamed blocks and its embedding rows, as a forward asks for them.
pub(crate) struct StreamedText<'s> {
    pub(crate) streamer: &'s mut Streamer,
    pub(crate) held: usize,
    /// The token embedding's checkpoint key.
    pub(crate) embedding: String,
}

impl Umt5Source for StreamedText<'_> {
    fn embedding_rows(
        &mut self,
        ids: &[u32],
        dtype: DType,
        device: &Device,
    ) -> vpipe_text::Result<Tensor> {
        let rows = self
            .streamer
            .rows(&self.embedding, ids)
            .map_err(candle_core::Error::wrap)?;
        Ok(rows.to_dtype(dtype)?.to_device(device)?)
    }

    fn block(
        &mut self,
        index: usize,
        dtype: DType,
        device: &Device,
    ) -> vpipe_text::Result<VarBuilder<'static>> {
        streamed_group(self.streamer, (index, 0, 1), self.held, dtype, device)
            .map_err(vpipe_text::Error::from)
    }
}

/// Part `part` of `parts` of block `index` of a stream whose blocks before `held` are held,
/// as a `VarBuilder`.
fn streamed_group(
    streamer: &mut Streamer,
    (index, part, parts): (usize, usize, usize),
    held: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<VarBuilder<'static>> {
    let group = index
        .checked_sub(held)
        .map(|streamed| streamed * parts + part)
        .ok_or_else(|| candle_core::Error::Msg(format!("block {index} is held, not streamed")))?;
    let tensors = streamer
        .group(group)
        .map_err(candle_core::Error::wrap)?
        .into_iter()
        .collect();
    var_builder_of(tensors, dtype, device)
}

/// The DiT over a stream's fixed tensors (those outside the blocks and the blocks before
/// `held`, but the embeddings [`dit_block_stream`] leaves on the host); the other blocks and
/// the embeddings come from [`StreamedBlocks`] at each forward.
pub(crate) fn wan_dit_streamed(
    streamer: &Streamer,
    config: &DitConfig,
    held: usize,
    dtype: DType,
    device: &Device,
) -> Result<WanModel> {
    Ok(WanModel::from_checkpoint_partial(
        fixed_var_builder(streamer, dtype, device)?,
        config,
        &|i| i < held,
        false,
    )?)
}

/// The DiT's streamed blocks, from `held` on, in `parts` groups each (see
/// [`dit_block_stream`]), and its embeddings from the host, as a forward asks for them.
pub(crate) struct StreamedBlocks<'s> {
    pub(crate) streamer: &'s mut Streamer,
    pub(crate) held: usize,
    pub(crate) parts: usize,
    /// The checkpoint keys of the embeddings kept on the host (the stream's `host_rows`).
    pub(crate) embeddings: Vec<String>,
}

impl BlockSource for StreamedBlocks<'_> {
    fn block(
        &mut self,
        index: usize,
        dtype: DType,
        device: &Device,
    ) -> vpipe_models::Result<VarBuilder<'static>> {
        Ok(streamed_group(
            self.streamer,
            (index, 0, 1),
            self.held,
            dtype,
            device,
        )?)
    }

    fn gives_parts(&self) -> bool {
        self.parts > 1
    }

    fn block_part(
        &mut self,
        index: usize,
        part: BlockPart,
        dtype: DType,
        device: &Device,
    ) -> vpipe_models::Result<VarBuilder<'static>> {
        Ok(streamed_group(
            self.streamer,
            (index, part.index(), self.parts),
            self.held,
            dtype,
            device,
        )?)
    }

    fn embeddings(
        &mut self,
        dtype: DType,
        device: &Device,
    ) -> vpipe_models::Result<VarBuilder<'static>> {
        let tensors = self
            .embeddings
            .iter()
            .map(|name| {
                let tensor = self
                    .streamer
                    .host_tensor(name, device)
                    .map_err(candle_core::Error::wrap)?;
                Ok((name.clone(), tensor))
            })
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        Ok(var_builder_of(tensors, dtype, device)?)
    }
}

/// A DiT's streamed blocks that take a reading of the meters as each streamed block starts
/// (without waiting for the device, so the copies and the compute keep overlapping), for the
/// report's chart: the arena's use between the steps' readings.
pub(crate) struct ReadAtEachBlock<'a, 's, 'p> {
    pub(crate) blocks: &'a mut StreamedBlocks<'s>,
    pub(crate) phase: &'a Phase<'p>,
    pub(crate) readings: Vec<vpipe_mem::Reading>,
}

impl ReadAtEachBlock<'_, '_, '_> {
    fn read(&mut self) -> vpipe_models::Result<()> {
        let reading = self
            .phase
            .read_in_flight()
            .map_err(candle_core::Error::wrap)?;
        self.readings.push(reading);
        Ok(())
    }
}

impl BlockSource for ReadAtEachBlock<'_, '_, '_> {
    fn block(
        &mut self,
        index: usize,
        dtype: DType,
        device: &Device,
    ) -> vpipe_models::Result<VarBuilder<'static>> {
        let vb = self.blocks.block(index, dtype, device)?;
        self.read()?;
        Ok(vb)
    }

    fn gives_parts(&self) -> bool {
        self.blocks.gives_parts()
    }

    fn block_part(
        &mut self,
        index: usize,
        part: BlockPart,
        dtype: DType,
        device: &Device,
    ) -> vpipe_models::Result<VarBuilder<'static>> {
        let vb = self.blocks.block_part(index, part, dtype, device)?;
        if part == BlockPart::SelfAttention {
            self.read()?;
        }
        Ok(vb)
    }

    fn embeddings(
        &mut self,
        dtype: DType,
        device: &Device,
    ) -> vpipe_models::Result<VarBuilder<'static>> {
        self.blocks.embeddings(dtype, device)
    }
}

/// The umT5 encoder over a lease's weights (transformers / ComfyUI or original Wan names);
/// `config` from a `config.json`, else from the shapes.
pub fn umt5(
    lease: &Lease<'_>,
    config: Option<&Umt5Config>,
    dtype: DType,
    device: &Device,
) -> Result<Umt5Encoder> {
    let vb = var_builder(lease, dtype, device)?;
    Ok(match config {
        Some(cfg) => Umt5Encoder::from_checkpoint_with_config(cfg, vb)?,
        None => Umt5Encoder::from_checkpoint(vb)?,
    })
}

/// The CLIP vision encoder over a lease's weights (transformers' or ComfyUI's names).
pub fn clip_vision(
    lease: &Lease<'_>,
    config: &vpipe_models::clip::Config,
    dtype: DType,
    device: &Device,
) -> Result<vpipe_models::clip::ClipVisionEncoder> {
    Ok(vpipe_models::clip::ClipVisionEncoder::from_checkpoint(
        config,
        var_builder(lease, dtype, device)?,
    )?)
}

/// The stream of a CLIP vision encoder's layers from `held` on, whole, through `slots` arena
/// slots (see [`block_stream`]).
pub(crate) fn clip_layer_stream(
    keys: &[TensorMeta],
    layers: usize,
    held: usize,
    slots: usize,
) -> StreamSpec {
    block_stream(
        keys,
        &|name| vpipe_models::clip::layer_of(name).map(|index| (index, 0)),
        (layers, 1),
        held,
        slots,
        &|_| false,
    )
}

/// The CLIP vision encoder over a stream's fixed tensors (the embeddings, the pre-norm and
/// the layers before `held`); the other layers come from [`StreamedLayers`].
pub(crate) fn clip_vision_streamed(
    streamer: &Streamer,
    config: &vpipe_models::clip::Config,
    held: usize,
    dtype: DType,
    device: &Device,
) -> Result<vpipe_models::clip::ClipVisionEncoder> {
    Ok(
        vpipe_models::clip::ClipVisionEncoder::from_checkpoint_partial(
            config,
            fixed_var_builder(streamer, dtype, device)?,
            &|i| i < held,
        )?,
    )
}

/// The CLIP vision encoder's streamed layers, as a forward asks for them.
pub(crate) struct StreamedLayers<'s> {
    pub(crate) streamer: &'s mut Streamer,
    pub(crate) held: usize,
}

impl vpipe_models::clip::LayerSource for StreamedLayers<'_> {
    fn layer(
        &mut self,
        index: usize,
        dtype: DType,
        device: &Device,
    ) -> vpipe_models::Result<VarBuilder<'static>> {
        Ok(streamed_group(
            self.streamer,
            (index, 0, 1),
            self.held,
            dtype,
            device,
        )?)
    }
}

/// Reads LoRA files (headers and tensors, on the host), each with its strength.
pub fn read_loras(files: &[(std::path::PathBuf, f64)]) -> Result<Vec<(LoraFile, f64)>> {
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
/// matches nothing fails early), notes what each file patches, and arranges the merge as a
/// store patch: merged weights replace the originals as they are read from disk, so the DiT
/// never exists twice. A scaled-fp8 weight is merged in f32 and stored back as float8 with its
/// own scale (on the GPU as it is read on CUDA, [`MergePlan::apply_in_place_scaled_fp8_on_device`];
/// else [`MergePlan::apply_in_place_scaled_fp8`], or [`MergePlan::apply_scaled_fp8`] for a
/// scale per channel); its scale is read from the file here.
pub fn plan_loras(
    p: &mut Phase<'_>,
    dit: ModelId,
    checkpoint: &Checkpoint,
    loras: &[(LoraFile, f64)],
    files: &[(PathBuf, f64)],
) -> Result<()> {
    if loras.is_empty() {
        p.note("lora", "none");
        return Ok(());
    }
    let header = &checkpoint.inspection;
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
    // checkpoint key → (original name, float8 scale when the weight is scaled fp8)
    let mut by_key: HashMap<String, (String, Option<Tensor>)> = HashMap::new();
    let mut fp8 = 0;
    for original in plan.patched_weights() {
        let (key, _, is_fp8) = &weights[original];
        let scale = if *is_fp8 {
            fp8 += 1;
            Some(fp8_scale(&checkpoint.path, header, key)?)
        } else {
            None
        };
        by_key.insert(key.clone(), (original.to_owned(), scale));
    }
    let plan = std::sync::Arc::new(plan);
    let by_key = std::sync::Arc::new(by_key);
    let (into_plan, into_keys) = (plan.clone(), by_key.clone());
    #[cfg(feature = "cuda")]
    let (device_plan, device_keys) = (plan.clone(), by_key.clone());
    let patch = WeightPatch {
        keys: by_key.keys().cloned().collect(),
        apply: std::sync::Arc::new(move |key: &str, weight: &Tensor| {
            let (original, scale) = &by_key[key];
            match scale {
                Some(scale) => plan.apply_scaled_fp8(original, weight, scale),
                None => plan.apply(original, weight),
            }
            .map_err(candle_core::Error::wrap)
        }),
        // Rows merged in the weight's own memory, scaled-fp8 weights with their one scale
        // too; a scale per channel takes `apply`.
        apply_in_place: Some(std::sync::Arc::new(
            move |key: &str, dtype: DType, weight: &mut [u8]| match &into_keys[key] {
                (original, None) => into_plan
                    .apply_in_place(original, dtype, weight)
                    .map_err(candle_core::Error::wrap),
                (original, Some(scale)) if dtype == DType::F8E4M3 => match one_scale(scale)? {
                    Some(scale) => into_plan
                        .apply_in_place_scaled_fp8(original, scale, weight)
                        .map_err(candle_core::Error::wrap),
                    None => Ok(false),
                },
                (_, Some(_)) => Ok(false),
            },
        )),
        #[cfg(feature = "cuda")]
        apply_on_device: Some(std::sync::Arc::new(
            move |key: &str, dtype: DType, device: &candle_core::CudaDevice, weight: &mut _| {
                match &device_keys[key] {
                    (original, None) => device_plan
                        .apply_in_place_on_device(original, dtype, device, weight)
                        .map_err(candle_core::Error::wrap),
                    (original, Some(scale)) if dtype == DType::F8E4M3 => match one_scale(scale)? {
                        Some(scale) => device_plan
                            .apply_in_place_scaled_fp8_on_device(original, scale, device, weight)
                            .map_err(candle_core::Error::wrap),
                        None => Ok(false),
                    },
                    (_, Some(_)) => Ok(false),
                }
            },
        )),
    };
    let kept = match fp8 {
        0 => String::new(),
        n => format!(" ({n} of them scaled fp8, kept in float8)"),
    };
    p.note(
        "lora",
        &format!(
            "{} weights merged as they are read from disk{kept}",
            patch.keys.len()
        ),
    );
    p.set_patch(dit, patch)?;
    Ok(())
}

/// A float8 weight's scale as one number, `None` for a scale per channel.
fn one_scale(scale: &Tensor) -> candle_core::Result<Option<f32>> {
    if scale.elem_count() != 1 {
        return Ok(None);
    }
    Ok(Some(
        scale
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?[0],
    ))
}

/// The scale of the float8 weight `key` (see [`fp8_scale_names`]), read from the checkpoint,
/// in f32; exactly 1 for a plain float8 weight, as the model takes it (see [`var_builder`]).
fn fp8_scale(path: &Path, header: &vpipe_ckpt::Inspection, key: &str) -> Result<Tensor> {
    let stem = key.strip_suffix("weight").unwrap_or(key);
    let names = fp8_scale_names(stem);
    let Some(name) = names
        .iter()
        .find(|n| header.tensors.iter().any(|t| &t.name == *n))
    else {
        return Ok(Tensor::new(1f32, &Device::Cpu)?);
    };
    // SAFETY: read-only map of a checkpoint file, as the store maps it.
    let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }?;
    Ok(mapped.load(name, &Device::Cpu)?.to_dtype(DType::F32)?)
}
