//! Streamed weights: a model computes with only some of its weights in the compute tier. The
//! rest come in groups (a transformer block each) through a fixed arena of slots, refilled in
//! place as the model asks for the next group.
//!
//! - On CUDA the source is the model's pinned host copy, or its file read through one pinned
//!   staging buffer per slot when the host has no room for a copy. A second stream copies the
//!   next groups into free slots while the compute stream works on the current one; events
//!   order the two (a slot is refilled only after the compute that read it, and read only
//!   after its copy).
//! - On the CPU the source is the file (the page cache, which the process does not own), and
//!   the slots are in the heap.
//!
//! The arena and the fixed part are allocated once, when the stream starts (a verified move,
//! see [`crate::Phase::begin_stream`]), so the compute tier holds exactly `fixed + slots ×
//! group` bytes of this model for the whole phase, whatever the number of groups.

use std::collections::{BTreeMap, VecDeque};

use candle_core::{CpuStorage, Device, Layout, Tensor};

use crate::store::{Model, Reader, TensorMeta};
use crate::MemError;

/// What to stream: groups of tensors that take turns in the arena. Every tensor of the model
/// that is in no group is fixed (held in the compute tier for the whole stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// Checkpoint keys of each streamed group, in the order the model uses the groups (it may
    /// start over at the first when it is done with the last, as a denoising step does).
    /// The groups' layouts (dtypes and shapes of their tensors, in order) repeat with a period
    /// `p`: group `g` is laid out like group `g mod p` (one layout per transformer block, or
    /// one per part of a block when a block is streamed in parts).
    pub groups: Vec<Vec<String>>,
    /// Arena slots, at least one per layout of the period; slot `k` holds groups laid out
    /// like group `k mod p`. With one slot per layout a group is copied while the group
    /// before it computes; with more, further groups are copied ahead.
    pub slots: usize,
    /// Tensors that stay out of the compute tier between uses: read by rows on the host
    /// ([`Streamer::rows`]: a token embedding, of which a forward needs a few hundred rows),
    /// or brought whole to the device for one use ([`Streamer::host_tensor`]: the DiT's text
    /// and time embeddings, once per forward).
    pub host_rows: Vec<String>,
}

/// Where a stream reads its groups from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamSource {
    /// The model's pinned host copy.
    PinnedHost,
    /// The checkpoint file, through the page cache.
    File,
}

/// What a stream did, for the report.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StreamStats {
    /// Groups handed to the model.
    pub fetches: u64,
    /// Groups copied into the arena (a group asked for again while it is current is not
    /// copied again).
    pub copies: u64,
    /// Bytes copied into the arena.
    pub bytes_moved: u64,
    /// Times the model asked for a group other than the next one copied ahead (each costs
    /// the copies in flight).
    pub out_of_order: u64,
}

struct Slot {
    /// The layout of the groups this slot holds: group `g` fits when `g mod period` is it.
    layout: usize,
    /// The arena's tensors of this slot, in the groups' tensor order.
    tensors: Vec<Tensor>,
    #[cfg(feature = "cuda")]
    cuda: Option<CudaSlot>,
}

#[cfg(feature = "cuda")]
struct CudaSlot {
    /// Recorded on the copy stream after the slot's last copy.
    filled: Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
    /// Recorded on the compute stream after the last work that read the slot.
    released: Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
    /// A page-locked buffer of one group, for a file source.
    staging: Option<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u8>>,
}

enum Source {
    /// The model's description and its open file (boxed: far larger than a pointer).
    File(Box<(Model, Reader)>),
    #[cfg(feature = "cuda")]
    Pinned(std::sync::Arc<BTreeMap<String, crate::pinned::PinnedTensor>>),
}

/// A copy issued into a slot.
#[derive(Debug, Clone, Copy)]
struct Issued {
    group: usize,
    slot: usize,
}

/// A model's weights while it computes streamed: the fixed tensors, and the groups, one at a
/// time, through [`Streamer::group`]. Made by [`crate::Phase::begin_stream`] and given back
/// with [`crate::Phase::end_stream`], which verifies that its memory was released.
pub struct Streamer {
    pub(crate) model: String,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: Device,
    fixed: BTreeMap<String, Tensor>,
    groups: Vec<Vec<String>>,
    metas: Vec<Vec<TensorMeta>>,
    host_rows: BTreeMap<String, TensorMeta>,
    slots: Vec<Slot>,
    /// The period of the groups' layouts ([`StreamSpec::groups`]).
    period: usize,
    free: Vec<usize>,
    issued: VecDeque<Issued>,
    current: Option<Issued>,
    next_group: usize,
    source: Source,
    pub(crate) source_kind: StreamSource,
    pub(crate) stats: StreamStats,
    #[cfg(feature = "cuda")]
    copy_stream: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>>,
}

fn tensor_error(context: String) -> impl FnOnce(candle_core::Error) -> MemError {
    move |source| MemError::Tensor {
        context,
        source: Box::new(source),
    }
}

impl Streamer {
    /// Bytes the arena and the fixed part hold in the compute tier (what starting the stream
    /// adds and ending it frees).
    pub fn bytes(&self) -> u64 {
        self.fixed_bytes() + self.arena_bytes()
    }

    /// Bytes of the fixed part.
    pub fn fixed_bytes(&self) -> u64 {
        self.fixed.values().map(tensor_bytes).sum()
    }

    /// Bytes of the arena (all slots).
    pub fn arena_bytes(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| &s.tensors)
            .map(tensor_bytes)
            .sum()
    }

    /// Slots of the arena.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Streamed groups.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// What the stream did so far.
    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// The fixed tensors, by checkpoint key (clones share the memory; drop them before
    /// [`crate::Phase::end_stream`]).
    pub fn fixed(&self) -> &BTreeMap<String, Tensor> {
        &self.fixed
    }

    /// The tensors of group `group`, by checkpoint key, in the compute tier. They stay valid
    /// until the arena slot they are in is refilled: use them before asking for the
    /// `slots`-th group after this one, and do not keep them (the arena's memory is the
    /// stream's; a clone kept past [`crate::Phase::end_stream`] fails its verification).
    pub fn group(&mut self, group: usize) -> Result<BTreeMap<String, Tensor>, MemError> {
        if group >= self.groups.len() {
            return Err(MemError::UnknownTensor {
                model: self.model.clone(),
                tensor: format!("stream group {group} of {}", self.groups.len()),
            });
        }
        self.stats.fetches += 1;
        let slot = match self.current {
            Some(current) if current.group == group => current.slot,
            _ => self.advance_to(group)?,
        };
        Ok(self.groups[group]
            .iter()
            .cloned()
            .zip(self.slots[slot].tensors.iter().cloned())
            .collect())
    }

    /// The error for a tensor `name` the stream does not have.
    fn unknown(&self, name: &str) -> MemError {
        MemError::UnknownTensor {
            model: self.model.clone(),
            tensor: name.to_owned(),
        }
    }

    /// What the stream knows of the host-side tensor `name`.
    fn host_meta(&self, name: &str) -> Result<&TensorMeta, MemError> {
        self.host_rows.get(name).ok_or_else(|| self.unknown(name))
    }

    /// Rows `ids` of the 2-D host-side tensor `name` (one of [`StreamSpec::host_rows`]), as a
    /// `[ids.len(), columns]` tensor on the host in the dtype the store holds it in, read
    /// from the pinned host copy or the file without reading the rest.
    pub fn rows(&self, name: &str, ids: &[u32]) -> Result<Tensor, MemError> {
        let meta = self.host_meta(name)?;
        let [count, columns] = meta.shape[..] else {
            return Err(MemError::UnknownTensor {
                model: self.model.clone(),
                tensor: format!("{name} (rows of a tensor of shape {:?})", meta.shape),
            });
        };
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= count) {
            return Err(MemError::UnknownTensor {
                model: self.model.clone(),
                tensor: format!("row {bad} of '{name}', which has {count}"),
            });
        }
        let gather = |bytes: &[u8], dtype: candle_core::DType| -> Result<Tensor, MemError> {
            let row = columns * dtype.size_in_bytes();
            let mut out = Vec::with_capacity(ids.len() * row);
            for &i in ids {
                out.extend_from_slice(&bytes[i as usize * row..(i as usize + 1) * row]);
            }
            Tensor::from_raw_buffer(&out, dtype, &[ids.len(), columns], &Device::Cpu)
                .and_then(|t| t.to_dtype(meta.dtype))
                .map_err(tensor_error(format!("rows of '{name}'")))
        };
        match &self.source {
            #[cfg(feature = "cuda")]
            Source::Pinned(host) => {
                let pinned = host.get(name).ok_or_else(|| self.unknown(name))?;
                gather(
                    pinned
                        .bytes()
                        .map_err(tensor_error(format!("pinned '{name}'")))?,
                    meta.dtype,
                )
            }
            Source::File(file) => {
                let (model, reader) = (&file.0, &file.1);
                // Straight from the map where the file holds a dtype candle reads as it is.
                if let Reader::Mapped(mapped) = reader {
                    let view = mapped
                        .get(name)
                        .map_err(tensor_error(format!("'{name}' in the file")))?;
                    if let Ok(dtype) = candle_core::DType::try_from(view.dtype()) {
                        if view.dtype() != safetensors::Dtype::F8_E5M2 {
                            return gather(view.data(), dtype);
                        }
                    }
                }
                let ids = Tensor::new(ids, &Device::Cpu).map_err(tensor_error(name.to_owned()))?;
                model
                    .read_tensor(reader, meta)?
                    .index_select(&ids, 0)
                    .map_err(tensor_error(format!("rows of '{name}'")))
            }
        }
    }

    /// The whole host-side tensor `name` (one of [`StreamSpec::host_rows`]) on `device`, in
    /// the dtype the store holds it in: copied from the pinned host copy straight to the
    /// device, or read from the file.
    pub fn host_tensor(&self, name: &str, device: &Device) -> Result<Tensor, MemError> {
        let meta = self.host_meta(name)?;
        match &self.source {
            #[cfg(feature = "cuda")]
            Source::Pinned(host) => {
                let pinned = host.get(name).ok_or_else(|| self.unknown(name))?;
                let bytes = pinned
                    .bytes()
                    .map_err(tensor_error(format!("pinned '{name}'")))?;
                Tensor::from_raw_buffer(bytes, meta.dtype, &meta.shape, device)
                    .map_err(tensor_error(format!("'{name}' from pinned memory")))
            }
            Source::File(file) => file
                .0
                .read_tensor(&file.1, meta)?
                .to_device(device)
                .map_err(tensor_error(format!("'{name}' to the device"))),
        }
    }

    /// Releases the current slot, keeps every free slot filling ahead, and returns the slot
    /// that holds `group` once the compute stream may read it.
    fn advance_to(&mut self, group: usize) -> Result<usize, MemError> {
        if let Some(current) = self.current.take() {
            self.mark_released(current.slot)?;
            self.free.push(current.slot);
        }
        if self.issued.front().is_some_and(|i| i.group != group) {
            // Asked out of order: what was copied ahead is not what comes next.
            self.stats.out_of_order += 1;
            while let Some(i) = self.issued.pop_front() {
                self.free.push(i.slot);
            }
        }
        if self.issued.is_empty() {
            self.next_group = group;
        }
        // Lowest slot first, so that a one-slot arena and a first fill are in slot order; the
        // copies ahead stop at the first group whose layout has no free slot.
        self.free.sort_unstable();
        while let Some(at) = self
            .free
            .iter()
            .position(|&k| self.slots[k].layout == self.next_group % self.period)
        {
            let slot = self.free.remove(at);
            let next = self.next_group;
            self.fill(slot, next)?;
            self.stats.copies += 1;
            self.stats.bytes_moved += self.metas[next].iter().map(TensorMeta::bytes).sum::<u64>();
            self.issued.push_back(Issued { group: next, slot });
            self.next_group = (next + 1) % self.groups.len();
        }
        let ready = self
            .issued
            .pop_front()
            .expect("an arena has at least one slot, filled above");
        self.wait_filled(ready.slot)?;
        self.current = Some(ready);
        Ok(ready.slot)
    }

    /// Copies `group` into `slot` (on the copy stream on CUDA, after the compute that last
    /// read the slot; right away on the CPU). The caller counts the copy.
    fn fill(&mut self, slot: usize, group: usize) -> Result<(), MemError> {
        match &self.source {
            Source::File(file) => {
                let (model, reader) = (&file.0, &file.1);
                #[cfg(feature = "cuda")]
                if self.copy_stream.is_some() {
                    return self.fill_cuda_from_file(slot, group);
                }
                for (meta, target) in self.metas[group].iter().zip(&self.slots[slot].tensors) {
                    model
                        .with_held_bytes(reader, meta, |bytes| {
                            target.inplace_op1(&FillFromHost { bytes })
                        })?
                        .map_err(tensor_error(format!(
                            "streaming '{}' tensor '{}'",
                            self.model, meta.name
                        )))?;
                }
            }
            #[cfg(feature = "cuda")]
            Source::Pinned(host) => {
                let host = host.clone();
                let sources = self.metas[group]
                    .iter()
                    .map(|meta| {
                        host.get(&meta.name)
                            .ok_or_else(|| MemError::UnknownTensor {
                                model: self.model.clone(),
                                tensor: meta.name.clone(),
                            })?
                            .bytes()
                            .map_err(tensor_error(format!("pinned '{}'", meta.name)))
                    })
                    .collect::<Result<Vec<&[u8]>, MemError>>()?;
                self.copy_to_slot(slot, group, &sources)?;
            }
        }
        Ok(())
    }

    /// Reads `group` from the file into `slot`'s staging buffer (after the slot's previous
    /// copy out of it finished), then copies it to the device.
    #[cfg(feature = "cuda")]
    fn fill_cuda_from_file(&mut self, slot: usize, group: usize) -> Result<(), MemError> {
        let Source::File(file) = &self.source else {
            unreachable!("called for a file source only")
        };
        let (model, reader) = (&file.0, &file.1);
        let cuda = self.slots[slot].cuda.as_mut().expect("a CUDA slot");
        if let Some(filled) = &cuda.filled {
            filled
                .synchronize()
                .map_err(cuda_error("waiting for a staging buffer"))?;
        }
        let staging = cuda
            .staging
            .as_mut()
            .expect("a file source has staging buffers");
        let bytes = staging
            .as_mut_slice()
            .map_err(cuda_error("mapping a staging buffer"))?;
        let mut ranges = Vec::with_capacity(self.metas[group].len());
        let mut offset = 0;
        for meta in &self.metas[group] {
            let len = model.with_held_bytes(reader, meta, |data| {
                bytes[offset..offset + data.len()].copy_from_slice(data);
                data.len()
            })?;
            ranges.push(offset..offset + len);
            offset += len;
        }
        let staging = cuda
            .staging
            .as_ref()
            .expect("a file source has staging buffers");
        let all = staging
            .as_slice()
            .map_err(cuda_error("mapping a staging buffer"))?;
        // SAFETY of the lifetime: the staging buffer lives in the slot until the stream is
        // dropped, which synchronizes the copy stream first.
        let all: &'static [u8] = unsafe { std::slice::from_raw_parts(all.as_ptr(), all.len()) };
        let sources: Vec<&[u8]> = ranges.into_iter().map(|r| &all[r]).collect();
        self.copy_to_slot(slot, group, &sources)
    }

    /// Enqueues the copies of `sources` (page-locked) into `slot` on the copy stream, after
    /// the compute that last read the slot, and records the slot's `filled` event.
    #[cfg(feature = "cuda")]
    fn copy_to_slot(
        &mut self,
        slot: usize,
        group: usize,
        sources: &[&[u8]],
    ) -> Result<(), MemError> {
        let stream = self.copy_stream.clone().expect("a CUDA stream");
        let cuda = self.slots[slot].cuda.as_mut().expect("a CUDA slot");
        if let Some(released) = cuda.released.take() {
            stream
                .wait(&released)
                .map_err(cuda_error("ordering a copy after the compute"))?;
        }
        for ((target, source), meta) in self.slots[slot]
            .tensors
            .iter()
            .zip(sources)
            .zip(&self.metas[group])
        {
            target
                .inplace_op1(&crate::pinned::CopyFromPinned {
                    bytes: source,
                    stream: &stream,
                })
                .map_err(tensor_error(format!(
                    "streaming '{}' tensor '{}'",
                    self.model, meta.name
                )))?;
        }
        let filled = stream
            .record_event(None)
            .map_err(cuda_error("recording a copy"))?;
        self.slots[slot].cuda.as_mut().expect("a CUDA slot").filled = Some(filled);
        Ok(())
    }

    /// On CUDA, makes the compute stream wait for `slot`'s copy (the host does not wait).
    fn wait_filled(&mut self, slot: usize) -> Result<(), MemError> {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(device), Some(cuda)) = (&self.device, &self.slots[slot].cuda) {
            if let Some(filled) = &cuda.filled {
                device
                    .cuda_stream()
                    .wait(filled)
                    .map_err(cuda_error("ordering the compute after a copy"))?;
            }
        }
        let _ = slot;
        Ok(())
    }

    /// On CUDA, records on the compute stream that the work reading `slot` has been enqueued.
    fn mark_released(&mut self, slot: usize) -> Result<(), MemError> {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(device), Some(cuda)) = (&self.device, self.slots[slot].cuda.as_mut()) {
            cuda.released = Some(
                device
                    .cuda_stream()
                    .record_event(None)
                    .map_err(cuda_error("recording the compute"))?,
            );
        }
        let _ = slot;
        Ok(())
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        // Copies in flight read the host buffers and write the arena: finish them first.
        #[cfg(feature = "cuda")]
        if let Some(stream) = &self.copy_stream {
            if let Err(e) = stream.synchronize() {
                tracing::warn!("synchronizing the copy stream of '{}': {e}", self.model);
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_error(
    what: &'static str,
) -> impl Fn(candle_core::cuda_backend::cudarc::driver::DriverError) -> MemError {
    move |e| MemError::Tensor {
        context: what.into(),
        source: Box::new(candle_core::Error::Msg(e.to_string())),
    }
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// Overwrites a contiguous CPU tensor's bytes with `bytes` (the same length).
struct FillFromHost<'a> {
    bytes: &'a [u8],
}

impl candle_core::InplaceOp1 for FillFromHost<'_> {
    fn name(&self) -> &'static str {
        "stream-fill"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        fn fill<T: bytemuck::Pod>(
            target: &mut [T],
            bytes: &[u8],
            layout: &Layout,
        ) -> candle_core::Result<()> {
            let target = match layout.contiguous_offsets() {
                Some((start, end)) => &mut target[start..end],
                None => candle_core::bail!("stream-fill: the arena tensor is not contiguous"),
            };
            let target: &mut [u8] = bytemuck::cast_slice_mut(target);
            if target.len() != bytes.len() {
                candle_core::bail!(
                    "stream-fill: {} bytes for an arena tensor of {}",
                    bytes.len(),
                    target.len()
                );
            }
            target.copy_from_slice(bytes);
            Ok(())
        }
        match storage {
            CpuStorage::U8(v) => fill(v, self.bytes, layout),
            CpuStorage::U32(v) => fill(v, self.bytes, layout),
            CpuStorage::I16(v) => fill(v, self.bytes, layout),
            CpuStorage::I32(v) => fill(v, self.bytes, layout),
            CpuStorage::I64(v) => fill(v, self.bytes, layout),
            CpuStorage::BF16(v) => fill(v, self.bytes, layout),
            CpuStorage::F16(v) => fill(v, self.bytes, layout),
            CpuStorage::F32(v) => fill(v, self.bytes, layout),
            CpuStorage::F64(v) => fill(v, self.bytes, layout),
            CpuStorage::F8E4M3(v) => {
                // float8's type has no Pod impl; it is one byte.
                let n = v.len();
                // SAFETY: F8E4M3 is a transparent u8.
                let raw = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n) };
                fill(raw, self.bytes, layout)
            }
            _ => candle_core::bail!("stream-fill: no arena for this dtype"),
        }
    }
}

/// The tensors a stream does not hold for its whole length: its groups' and those it reads by
/// rows on the host.
fn not_fixed(spec: &StreamSpec) -> std::collections::BTreeSet<&str> {
    spec.groups
        .iter()
        .flatten()
        .chain(&spec.host_rows)
        .map(String::as_str)
        .collect()
}

/// Bytes a stream of `model` by `spec` puts in the compute tier: its fixed tensors and its
/// arena (the unknown tensor names a stream refuses count nothing here).
pub(crate) fn stream_bytes(model: &Model, spec: &StreamSpec) -> u64 {
    let streamed = not_fixed(spec);
    let fixed: u64 = model
        .tensors
        .iter()
        .filter(|t| !streamed.contains(t.name.as_str()))
        .map(TensorMeta::bytes)
        .sum();
    let by_name: BTreeMap<&str, &TensorMeta> =
        model.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let metas: Vec<Vec<TensorMeta>> = spec
        .groups
        .iter()
        .map(|g| {
            g.iter()
                .filter_map(|name| by_name.get(name.as_str()).map(|m| (*m).clone()))
                .collect()
        })
        .collect();
    let period = layout_period(&metas);
    let arena: u64 = (0..spec.slots.min(metas.len()))
        .map(|k| metas[k % period].iter().map(TensorMeta::bytes).sum::<u64>())
        .sum();
    fixed + arena
}

/// The smallest `p` such that every group is laid out like group `g mod p` (the same dtypes
/// and shapes in the same order); the group count when no shorter period exists.
fn layout_period(metas: &[Vec<TensorMeta>]) -> usize {
    let alike = |a: &[TensorMeta], b: &[TensorMeta]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(a, b)| a.dtype == b.dtype && a.shape == b.shape)
    };
    (1..metas.len())
        .find(|&p| (p..metas.len()).all(|g| alike(&metas[g], &metas[g % p])))
        .unwrap_or(metas.len().max(1))
}

/// Starts a stream of `model` on `device` (nothing verified here; see
/// [`crate::Phase::begin_stream`]).
pub(crate) fn start(
    model: &Model,
    device: &Device,
    spec: &StreamSpec,
) -> Result<Streamer, MemError> {
    let spec_error = |detail: String| MemError::Checkpoint {
        path: model.path.clone(),
        detail: format!("streaming '{}': {detail}", model.name),
    };
    if spec.slots == 0 || spec.groups.is_empty() {
        return Err(spec_error(format!(
            "{} groups through {} slots: a stream needs at least one of each",
            spec.groups.len(),
            spec.slots
        )));
    }
    let by_name: BTreeMap<&str, &TensorMeta> =
        model.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let metas = spec
        .groups
        .iter()
        .map(|g| {
            g.iter()
                .map(|name| {
                    by_name
                        .get(name.as_str())
                        .map(|m| (*m).clone())
                        .ok_or_else(|| spec_error(format!("no tensor '{name}' in the checkpoint")))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(missing) = spec
        .host_rows
        .iter()
        .find(|n| !by_name.contains_key(n.as_str()))
    {
        return Err(spec_error(format!(
            "no tensor '{missing}' in the checkpoint"
        )));
    }
    let period = layout_period(&metas);
    if spec.slots < period {
        return Err(spec_error(format!(
            "the groups' tensors repeat a pattern of {period} layouts (dtypes and shapes) and \
             {} slots cannot hold one of each",
            spec.slots
        )));
    }
    let streamed = not_fixed(spec);
    let slots = spec.slots.min(spec.groups.len());
    let zeros = |meta: &TensorMeta| {
        Tensor::zeros(meta.shape.as_slice(), meta.dtype, device)
            .map_err(tensor_error(format!("arena for '{}'", meta.name)))
    };
    let alloc_slot = |k: usize| -> Result<Slot, MemError> {
        Ok(Slot {
            layout: k % period,
            tensors: metas[k % period]
                .iter()
                .map(zeros)
                .collect::<Result<_, _>>()?,
            #[cfg(feature = "cuda")]
            cuda: None,
        })
    };
    let fixed_metas: Vec<&TensorMeta> = model
        .tensors
        .iter()
        .filter(|t| !streamed.contains(t.name.as_str()))
        .collect();
    let group_bytes = |k: usize| -> u64 { metas[k % period].iter().map(TensorMeta::bytes).sum() };
    match (device, &model.host) {
        #[cfg(feature = "cuda")]
        (Device::Cuda(cuda), Some(crate::store::HostCopy::Pinned(host))) => {
            let fixed = fixed_metas
                .iter()
                .map(|m| {
                    let upload = host[&m.name]
                        .upload(cuda)
                        .map_err(tensor_error(format!("uploading '{}'", m.name)))?;
                    Ok((m.name.clone(), upload))
                })
                .collect::<Result<BTreeMap<_, _>, MemError>>()?;
            let copy_stream = new_copy_stream(cuda)?;
            let slots = (0..slots)
                .map(|k| {
                    let mut slot = alloc_slot(k)?;
                    slot.cuda = Some(CudaSlot {
                        filled: None,
                        released: None,
                        staging: None,
                    });
                    Ok(slot)
                })
                .collect::<Result<Vec<_>, MemError>>()?;
            Ok(Streamer::new(
                model,
                device,
                fixed,
                spec,
                metas,
                slots,
                Source::Pinned(host.clone()),
                Some(copy_stream),
            ))
        }
        (_, None) => {
            let description = model.description();
            let reader = description.reader()?;
            let fixed = fixed_metas
                .iter()
                .map(|m| {
                    let tensor = description.read_tensor(&reader, m)?;
                    let tensor = tensor
                        .to_device(device)
                        .map_err(tensor_error(format!("fixed tensor '{}'", m.name)))?;
                    Ok((m.name.clone(), tensor))
                })
                .collect::<Result<BTreeMap<_, _>, MemError>>()?;
            #[cfg(feature = "cuda")]
            let (slots, copy_stream) = match device {
                Device::Cuda(cuda) => {
                    let context = cuda.cuda_stream().context().clone();
                    let slots = (0..slots)
                        .map(|k| {
                            let mut slot = alloc_slot(k)?;
                            // SAFETY: written in full before each copy out of it.
                            let staging = unsafe {
                                context.alloc_pinned_with_flags::<u8>(
                                    group_bytes(k).max(1) as usize,
                                    0,
                                )
                            }
                            .map_err(cuda_error("allocating a staging buffer"))?;
                            slot.cuda = Some(CudaSlot {
                                filled: None,
                                released: None,
                                staging: Some(staging),
                            });
                            Ok(slot)
                        })
                        .collect::<Result<Vec<_>, MemError>>()?;
                    (slots, Some(new_copy_stream(cuda)?))
                }
                _ => ((0..slots).map(alloc_slot).collect::<Result<_, _>>()?, None),
            };
            #[cfg(not(feature = "cuda"))]
            let (slots, copy_stream) = (
                (0..slots).map(alloc_slot).collect::<Result<Vec<_>, _>>()?,
                None::<()>,
            );
            #[cfg(not(feature = "cuda"))]
            let _ = group_bytes;
            Ok(Streamer::new(
                model,
                device,
                fixed,
                spec,
                metas,
                slots,
                Source::File(Box::new((description, reader))),
                copy_stream,
            ))
        }
        _ => Err(spec_error(format!(
            "it is in {}; a stream reads from the pinned host copy on CUDA or from the file",
            model.tier()
        ))),
    }
}

#[cfg(feature = "cuda")]
fn new_copy_stream(
    cuda: &candle_core::CudaDevice,
) -> Result<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>, MemError> {
    cuda.cuda_stream()
        .context()
        .new_stream()
        .map_err(cuda_error("creating the copy stream"))
}

#[cfg(feature = "cuda")]
type CopyStream = Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>>;
#[cfg(not(feature = "cuda"))]
type CopyStream = Option<()>;

impl Streamer {
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &Model,
        device: &Device,
        fixed: BTreeMap<String, Tensor>,
        spec: &StreamSpec,
        metas: Vec<Vec<TensorMeta>>,
        slots: Vec<Slot>,
        source: Source,
        copy_stream: CopyStream,
    ) -> Self {
        let source_kind = match source {
            Source::File(_) => StreamSource::File,
            #[cfg(feature = "cuda")]
            Source::Pinned(_) => StreamSource::PinnedHost,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = copy_stream;
        Self {
            model: model.name.clone(),
            device: device.clone(),
            fixed,
            groups: spec.groups.clone(),
            host_rows: model
                .tensors
                .iter()
                .filter(|t| spec.host_rows.contains(&t.name))
                .map(|t| (t.name.clone(), t.clone()))
                .collect(),
            period: layout_period(&metas),
            metas,
            free: (0..slots.len()).collect(),
            slots,
            issued: VecDeque::new(),
            current: None,
            next_group: 0,
            source,
            source_kind,
            stats: StreamStats::default(),
            #[cfg(feature = "cuda")]
            copy_stream,
        }
    }
}
