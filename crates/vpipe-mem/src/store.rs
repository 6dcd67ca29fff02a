//! The residency store: the one owner of every model's weights, in one of three tiers.
//!
//! - **disk**: the checkpoint file; nothing of the model is in memory.
//! - **host**: a copy in host RAM (pinned when computing on CUDA, so uploads run at full PCIe
//!   speed; pageable otherwise). On a CPU run this is also the compute tier.
//! - **device**: a copy on the CUDA device, made from the host copy. Weights are immutable
//!   during a run, so leaving the device is dropping this copy, never copying back.
//!
//! Moves between tiers are made by [`crate::Phase`], which measures and verifies each one;
//! this module only holds the copies and knows their sizes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};

use crate::MemError;

/// Where a model's weights are.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Only in the checkpoint file.
    Disk,
    /// In host RAM.
    Host,
    /// On the CUDA device (with the host copy kept).
    Device,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Disk => "disk",
            Tier::Host => "host",
            Tier::Device => "device",
        })
    }
}

/// Handle of a registered model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelId(pub(crate) usize);

/// A tensor of a registered model as it will be held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// Checkpoint key.
    pub name: String,
    /// Dtype in memory (after any conversion at load).
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorMeta {
    /// Bytes this tensor occupies in memory (saturating: a shape is checked against the file
    /// before it gets here, but the sum must not wrap if one is not).
    pub fn bytes(&self) -> u64 {
        self.shape
            .iter()
            .try_fold(self.dtype.size_in_bytes() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            })
            .unwrap_or(u64::MAX)
    }
}

/// The dtypes the store holds weights in: those candle has CPU kernels and a CUDA storage for,
/// so a host copy can always be uploaded (`pinned.rs` has an arm for each). A checkpoint with
/// a tensor that would be held in any other dtype is refused when it is registered, not when
/// the run reaches its upload.
pub(crate) const HELD_DTYPES: [DType; 10] = [
    DType::U8,
    DType::U32,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::BF16,
    DType::F16,
    DType::F32,
    DType::F64,
    DType::F8E4M3,
];

pub(crate) enum HostCopy {
    Pageable(BTreeMap<String, Tensor>),
    /// Shared with a [`crate::Streamer`] that copies groups of it to the device.
    #[cfg(feature = "cuda")]
    Pinned(std::sync::Arc<BTreeMap<String, crate::pinned::PinnedTensor>>),
}

/// An open checkpoint, read one tensor at a time.
pub(crate) enum Reader {
    Mapped(MmapedSafetensors),
    Pth(PthTensors),
}

/// The checkpoint formats the store reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Safetensors,
    /// PyTorch zip archive. Callers should have the file checked by a reader that never
    /// executes its pickle (`vpipe_ckpt::inspect`) before registering it.
    Pth,
}

impl Format {
    /// The format of the regular file at `path`, by its content (the same decision as
    /// `vpipe inspect`'s): a safetensors file named `.ckpt` or `.bin` is read as safetensors.
    fn of(path: &Path) -> Result<Format, MemError> {
        match vpipe_ckpt::container_of(path) {
            Ok(vpipe_ckpt::Container::Pth) => Ok(Format::Pth),
            Ok(_) => Ok(Format::Safetensors),
            Err(e) => Err(inspect_error(path, &e)),
        }
    }
}

/// A `vpipe_ckpt` error as the store's checkpoint error (which names the file itself).
fn inspect_error(path: &Path, e: &vpipe_ckpt::InspectError) -> MemError {
    MemError::Checkpoint {
        path: path.to_owned(),
        detail: e.detail(),
    }
}

/// Exact float8 e5m2 → f16: an e5m2 byte is the high byte of the f16 with the same value
/// (1 sign, 5 exponent bits with the same bias, 2 of f16's 10 mantissa bits), infinities and
/// NaNs included. candle has no e5m2 dtype, so the store holds such tensors as f16 (or the
/// load dtype, through f16).
pub(crate) fn f16_from_e5m2(byte: u8) -> half::f16 {
    half::f16::from_bits(u16::from(byte) << 8)
}

/// A tensor of a mapped safetensors file on the CPU, in its file dtype; float8 e5m2 tensors
/// come back as f16 (see [`f16_from_e5m2`]).
fn load_mapped(mapped: &MmapedSafetensors, name: &str) -> candle_core::Result<Tensor> {
    let view = mapped.get(name)?;
    if view.dtype() == safetensors::Dtype::F8_E5M2 {
        let values: Vec<half::f16> = view.data().iter().map(|&b| f16_from_e5m2(b)).collect();
        return Tensor::from_vec(values, view.shape(), &Device::Cpu);
    }
    mapped.load(name, &Device::Cpu)
}

/// The dtype a safetensors tensor of file dtype `stored` is read as, before any conversion to
/// the load dtype.
fn read_dtype(stored: safetensors::Dtype) -> candle_core::Result<DType> {
    match stored {
        safetensors::Dtype::F8_E5M2 => Ok(DType::F16),
        other => DType::try_from(other),
    }
}

/// Computes a patched weight from the stored one (same shape and dtype), given its key.
pub type PatchFn = dyn Fn(&str, &Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// A change applied to some of a model's weights each time they are read from disk (e.g.
/// LoRAs merged into the weights), so that the patched weights replace the originals in
/// memory instead of sitting next to them.
#[derive(Clone)]
pub struct WeightPatch {
    /// The checkpoint keys the patch changes.
    pub keys: std::collections::BTreeSet<String>,
    /// The change; see [`PatchFn`].
    pub apply: std::sync::Arc<PatchFn>,
    /// The same change made in place on the weight's bytes where it was read to, where it can
    /// be (see [`PatchInPlaceFn`]); `apply` otherwise.
    pub apply_in_place: Option<std::sync::Arc<PatchInPlaceFn>>,
    /// The same change made in place on the weight's bytes copied to the device, where it can
    /// be (see [`PatchOnDeviceFn`]); `apply_in_place` otherwise. A CUDA run's pinned host copy
    /// takes this way.
    #[cfg(feature = "cuda")]
    pub apply_on_device: Option<std::sync::Arc<PatchOnDeviceFn>>,
}

/// Patches the weight of a key in place, given its bytes on the host (row-major,
/// little-endian, in the dtype given); `Ok(false)`, with nothing written, where it cannot (the
/// caller then uses [`WeightPatch::apply`]). Lets the store read a patched weight as it reads
/// any other (straight into its host copy) and merge it there, with no full-size temporary.
pub type PatchInPlaceFn = dyn Fn(&str, DType, &mut [u8]) -> candle_core::Result<bool> + Send + Sync;

/// Patches the weight of a key in place in device memory, given its bytes there (row-major, in
/// the dtype given) and the device whose stream to run on; `Ok(false)`, with nothing written,
/// where it cannot (the caller then patches the host bytes). Lets the store merge a LoRA on the
/// GPU as the weights are read, at the bus's speed rather than the host cores'.
#[cfg(feature = "cuda")]
pub type PatchOnDeviceFn = dyn Fn(
        &str,
        DType,
        &candle_core::CudaDevice,
        &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>,
    ) -> candle_core::Result<bool>
    + Send
    + Sync;

impl fmt::Debug for WeightPatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WeightPatch({} keys)", self.keys.len())
    }
}

pub(crate) struct Model {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) format: Format,
    pub(crate) tensors: Vec<TensorMeta>,
    pub(crate) host: Option<HostCopy>,
    pub(crate) device: Option<BTreeMap<String, Tensor>>,
    pub(crate) patch: Option<WeightPatch>,
}

impl Model {
    pub(crate) fn tier(&self) -> Tier {
        if self.device.is_some() {
            Tier::Device
        } else if self.host.is_some() {
            Tier::Host
        } else {
            Tier::Disk
        }
    }

    /// Bytes of the weights in memory, in any tier.
    pub(crate) fn bytes(&self) -> u64 {
        self.tensors.iter().map(TensorMeta::bytes).sum()
    }

    /// Bytes of the tensors large enough for the counting allocator to map directly (and so
    /// to show up in, and leave, RssAnon with them).
    pub(crate) fn directly_mapped_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(TensorMeta::bytes)
            .filter(|&b| crate::alloc::is_directly_mapped(b as usize))
            .sum()
    }

    fn checkpoint_error(&self, detail: impl fmt::Display) -> MemError {
        MemError::Checkpoint {
            path: self.path.clone(),
            detail: detail.to_string(),
        }
    }

    /// Refuses anything but a regular file before it is opened (a FIFO would block the open,
    /// a device would never end), naming what the path is.
    fn check_regular(&self) -> Result<(), MemError> {
        vpipe_ckpt::check_regular_file(&self.path)
            .map(drop)
            .map_err(|e| inspect_error(&self.path, &e))
    }

    fn map(&self) -> Result<MmapedSafetensors, MemError> {
        self.check_regular()?;
        // SAFETY: the checkpoint is mapped read-only; vpipe never writes to model files while
        // running, and a file changed underneath by another program is the user's to avoid,
        // as with every program that maps its inputs.
        unsafe { MmapedSafetensors::new(&self.path) }.map_err(|e| self.checkpoint_error(e))
    }

    fn open_pth(&self) -> Result<PthTensors, MemError> {
        self.check_regular()?;
        PthTensors::new(&self.path, None).map_err(|e| self.checkpoint_error(e))
    }

    /// Opens the checkpoint for reading tensors one at a time ([`Model::read_tensor`]).
    pub(crate) fn reader(&self) -> Result<Reader, MemError> {
        Ok(match self.format {
            Format::Safetensors => Reader::Mapped(self.map()?),
            Format::Pth => Reader::Pth(self.open_pth()?),
        })
    }

    /// One tensor from the checkpoint, on the host, in the dtype the store holds it in (the
    /// model's patch not applied); the file's pages it touched leave this process's resident
    /// set (they stay in the page cache).
    pub(crate) fn read_stored(
        &self,
        reader: &Reader,
        meta: &TensorMeta,
    ) -> Result<Tensor, MemError> {
        let read = match reader {
            Reader::Mapped(mapped) => load_mapped(mapped, &meta.name),
            Reader::Pth(archive) => archive.get(&meta.name).and_then(|t| {
                t.ok_or_else(|| candle_core::Error::Msg("missing".into()))?
                    .contiguous()
            }),
        };
        let tensor = read
            .and_then(|t| t.to_dtype(meta.dtype))
            .map_err(|e| self.checkpoint_error(format!("tensor '{}': {e}", meta.name)))?;
        if let Reader::Mapped(mapped) = reader {
            release_mapped_pages(mapped, &meta.name);
        }
        Ok(tensor)
    }

    /// [`Model::read_stored`] with the model's patch applied.
    pub(crate) fn read_tensor(
        &self,
        reader: &Reader,
        meta: &TensorMeta,
    ) -> Result<Tensor, MemError> {
        self.patched(meta, self.read_stored(reader, meta)?)
    }

    /// A tensor's bytes straight from the mapped file when the store holds them as they are
    /// stored (same dtype, no patch), so that a copy needs no intermediate tensor.
    pub(crate) fn stored_bytes<'r>(
        &self,
        reader: &'r Reader,
        meta: &TensorMeta,
    ) -> Option<std::borrow::Cow<'r, [u8]>> {
        let Reader::Mapped(mapped) = reader else {
            return None;
        };
        let view = mapped.get(&meta.name).ok()?;
        let patched = self
            .patch
            .as_ref()
            .is_some_and(|p| p.keys.contains(&meta.name));
        (!patched && DType::try_from(view.dtype()).ok() == Some(meta.dtype))
            .then(|| std::borrow::Cow::Borrowed(view.data()))
    }

    /// Calls `with` on a tensor's bytes as the store holds them (converted, patched): straight
    /// from the map where they are stored so ([`Model::stored_bytes`]), else from the tensor
    /// [`Model::read_tensor`] makes; then drops the file's pages from the resident set.
    pub(crate) fn with_held_bytes<R>(
        &self,
        reader: &Reader,
        meta: &TensorMeta,
        with: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, MemError> {
        let result = match self.stored_bytes(reader, meta) {
            Some(bytes) => with(&bytes),
            None => with(&safetensors::View::data(&self.read_tensor(reader, meta)?)),
        };
        if let Reader::Mapped(mapped) = reader {
            release_mapped_pages(mapped, &meta.name);
        }
        Ok(result)
    }

    /// The model's description without any of its copies: what a reader of its file needs.
    pub(crate) fn description(&self) -> Model {
        Model {
            name: self.name.clone(),
            path: self.path.clone(),
            format: self.format,
            tensors: self.tensors.clone(),
            host: None,
            device: None,
            patch: self.patch.clone(),
        }
    }

    /// Reads the checkpoint into host memory: pageable tensors, or pinned buffers when
    /// `pinned_for` is a CUDA device.
    pub(crate) fn read_host_copy(&self, pinned_for: &Device) -> Result<HostCopy, MemError> {
        let reader = self.reader()?;
        match (pinned_for, &reader) {
            #[cfg(feature = "cuda")]
            (Device::Cuda(cuda), Reader::Mapped(_)) => self.read_pinned_copy(cuda, &reader),
            #[cfg(feature = "cuda")]
            (Device::Cuda(cuda), Reader::Pth(_)) => {
                let mut copies = BTreeMap::new();
                for meta in &self.tensors {
                    let tensor = self.read_tensor(&reader, meta)?;
                    let data = safetensors::View::data(&tensor);
                    let pinned = self.pin(cuda, &meta.name, meta.dtype, &meta.shape, &data)?;
                    copies.insert(meta.name.clone(), pinned);
                }
                Ok(HostCopy::Pinned(std::sync::Arc::new(copies)))
            }
            _ => {
                let mut copies = BTreeMap::new();
                for meta in &self.tensors {
                    copies.insert(meta.name.clone(), self.read_tensor(&reader, meta)?);
                }
                Ok(HostCopy::Pageable(copies))
            }
        }
    }

    /// Reads a safetensors checkpoint into one page-locked arena, tensors in parallel: those
    /// held in their stored dtype straight from the file into the arena (`pread`: no page
    /// faults on a map), patched on the device where the patch can be (one weight at a time,
    /// by one thread, while the others read), else on the host in place; the others converted
    /// or patched through the map, fewer at a time (a tensor-level LoRA merge holds the
    /// weight, its update and the sum in f32).
    #[cfg(feature = "cuda")]
    fn read_pinned_copy(
        &self,
        cuda: &candle_core::CudaDevice,
        reader: &Reader,
    ) -> Result<HostCopy, MemError> {
        use crate::pinned::{PinnedArena, PinnedTensor};
        use rayon::prelude::*;
        use std::os::unix::fs::FileExt;
        use std::sync::Arc;

        let file =
            vpipe_ckpt::open_regular(&self.path).map_err(|e| inspect_error(&self.path, &e))?;
        // SAFETY: read-only map of the checkpoint, as `map` makes (only its header is read).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| self.checkpoint_error(e))?;
        let (header, metadata) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| self.checkpoint_error(e))?;
        // Each tensor's range in the arena (64-byte aligned) and where it is in the file when
        // it can be read as it is stored.
        let mut ranges = Vec::with_capacity(self.tensors.len());
        let mut total = 0usize;
        for meta in &self.tensors {
            let start = total.div_ceil(64) * 64;
            total = start + meta.bytes() as usize;
            let info = metadata.info(&meta.name).ok_or_else(|| {
                self.checkpoint_error(format!("tensor '{}' is not in the header", meta.name))
            })?;
            let as_stored = self
                .patch
                .as_ref()
                .is_none_or(|p| !p.keys.contains(&meta.name) || p.apply_in_place.is_some())
                && DType::try_from(info.dtype).ok() == Some(meta.dtype);
            let at = as_stored.then_some((8 + header + info.data_offsets.0) as u64);
            ranges.push((meta, start..total, at));
        }
        let arena = Arc::new(
            PinnedArena::new(cuda, total)
                .map_err(|e| self.checkpoint_error(format!("pinning {total} bytes: {e}")))?,
        );
        type Entry<'a> = (&'a TensorMeta, std::ops::Range<usize>, Option<u64>);
        let context = |meta: &TensorMeta, e: &dyn fmt::Display| {
            self.checkpoint_error(format!("tensor '{}': {e}", meta.name))
        };
        let patch_of =
            |meta: &TensorMeta| self.patch.as_ref().filter(|p| p.keys.contains(&meta.name));
        // A weight read as stored and patched on the host: in place where the patch can be,
        // else through a tensor of the bytes read.
        let patch_on_host = |(meta, range, _): &Entry| -> Result<(), MemError> {
            let Some(patch) = patch_of(meta) else {
                return Ok(());
            };
            // SAFETY: each tensor's range is its own; no other thread touches it now.
            let target =
                unsafe { arena.range_mut(range.clone()) }.map_err(|e| context(meta, &e))?;
            if let Some(apply) = patch.apply_in_place.as_deref() {
                if apply(&meta.name, meta.dtype, target).map_err(|e| context(meta, &e))? {
                    return Ok(());
                }
            }
            let stored =
                Tensor::from_raw_buffer(target, meta.dtype, meta.shape.as_slice(), &Device::Cpu)
                    .map_err(|e| context(meta, &e))?;
            let tensor = self.patched_whole(patch, meta, &stored)?;
            target.copy_from_slice(&safetensors::View::data(&tensor));
            Ok(())
        };
        // Patched float weights go to the device to be merged there as they are read (the
        // GPU's products run at the bus's speed, the host's at its cores'), one at a time: in
        // place where the patch can be (the weight and its factors are all the device holds
        // for it; a float8 weight also its f32 widening), else by the tensor-level patch on
        // the device (the weight, its f32 sum and an update), freed before the next. A float8
        // weight the device cannot merge in place is merged on the host: candle's CUDA
        // backend has no float8 conversion under the names it looks for.
        let on_device = |meta: &TensorMeta| {
            patch_of(meta).filter(|_| {
                matches!(
                    meta.dtype,
                    DType::F32 | DType::BF16 | DType::F16 | DType::F8E4M3
                )
            })
        };
        let merge_on_device = |entry: &Entry| -> Result<(), MemError> {
            let (meta, range, _) = entry;
            let Some(patch) = on_device(meta) else {
                return Ok(());
            };
            let stream = cuda.cuda_stream();
            // SAFETY: the weight was read before it was sent here; only this thread touches
            // its range now.
            let bytes = unsafe { arena.range_mut(range.clone()) }.map_err(|e| context(meta, &e))?;
            if let Some(apply) = patch.apply_on_device.as_deref() {
                let mut on_gpu = stream.clone_htod(&*bytes).map_err(|e| context(meta, &e))?;
                if apply(&meta.name, meta.dtype, cuda, &mut on_gpu)
                    .map_err(|e| context(meta, &e))?
                {
                    return stream
                        .memcpy_dtoh(&on_gpu, bytes)
                        .and_then(|()| stream.synchronize())
                        .map_err(|e| context(meta, &e));
                }
            }
            if meta.dtype == DType::F8E4M3 {
                return patch_on_host(entry);
            }
            let device = Device::Cuda(cuda.clone());
            let weight = Tensor::from_raw_buffer(bytes, meta.dtype, meta.shape.as_slice(), &device)
                .map_err(|e| context(meta, &e))?;
            let merged = self.patched_whole(patch, meta, &weight)?;
            crate::pinned::copy_to_host(&merged, bytes).map_err(|e| context(meta, &e))
        };
        let read = |(meta, range, at): &Entry| -> Result<(), MemError> {
            match at {
                Some(offset) => {
                    // SAFETY: each tensor's range is its own; no other thread writes it.
                    let target =
                        unsafe { arena.range_mut(range.clone()) }.map_err(|e| context(meta, &e))?;
                    file.read_exact_at(target, *offset)
                        .map_err(|e| context(meta, &e))
                }
                None => {
                    let stored = self.read_stored(reader, meta)?;
                    let tensor = self.patched(meta, stored)?;
                    arena
                        .fill(range.clone(), &safetensors::View::data(&tensor))
                        .map_err(|e| context(meta, &e))
                }
            }
        };
        let (direct, converted): (Vec<&Entry>, Vec<&Entry>) =
            ranges.iter().partition(|(_, _, at)| at.is_some());
        // The weights read as stored, in parallel; those patched on the device are merged by
        // one thread as they arrive, the others on the host by the thread that read them.
        std::thread::scope(|scope| -> Result<(), MemError> {
            let (ready, arrived) = std::sync::mpsc::channel::<&Entry>();
            let merger = scope.spawn(move || -> Result<(), MemError> {
                arrived.into_iter().try_for_each(merge_on_device)
            });
            let read_all = direct.par_iter().try_for_each_with(ready, |ready, entry| {
                read(entry)?;
                if on_device(entry.0).is_some() {
                    // A closed channel means the merger failed: its error is reported below.
                    let _ = ready.send(entry);
                    Ok(())
                } else {
                    patch_on_host(entry)
                }
            });
            let merged = merger
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            read_all?;
            merged
        })?;
        // Conversions and merges: a few at a time, so that their temporaries stay bounded.
        for chunk in converted.chunks(4) {
            chunk.par_iter().try_for_each(|entry| read(entry))?;
        }
        let copies = ranges
            .iter()
            .map(|(meta, range, _)| {
                PinnedTensor::in_arena(
                    arena.clone(),
                    range.start,
                    meta.dtype,
                    meta.shape.clone().into(),
                )
                .map(|t| (meta.name.clone(), t))
                .map_err(|e| self.checkpoint_error(format!("tensor '{}': {e}", meta.name)))
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        Ok(HostCopy::Pinned(Arc::new(copies)))
    }

    /// `tensor` with the model's patch applied when the patch changes it; the patched tensor
    /// must keep the stored shape and dtype (the store's byte accounting depends on it).
    fn patched(&self, meta: &TensorMeta, tensor: Tensor) -> Result<Tensor, MemError> {
        let Some(patch) = self.patch.as_ref().filter(|p| p.keys.contains(&meta.name)) else {
            return Ok(tensor);
        };
        if let Some(merged) = self.patched_into_new(patch, meta, &tensor)? {
            return Ok(merged);
        }
        self.patched_whole(patch, meta, &tensor)
    }

    /// `tensor` patched by the patch's tensor-level `apply`, checked to keep the stored shape
    /// and dtype.
    fn patched_whole(
        &self,
        patch: &WeightPatch,
        meta: &TensorMeta,
        tensor: &Tensor,
    ) -> Result<Tensor, MemError> {
        let out = (patch.apply)(&meta.name, tensor)
            .and_then(|t| t.contiguous())
            .map_err(|e| self.checkpoint_error(format!("patching '{}': {e}", meta.name)))?;
        if out.dims() != meta.shape.as_slice() || out.dtype() != meta.dtype {
            return Err(self.checkpoint_error(format!(
                "patching '{}' changed it from {:?} {:?} to {:?} {:?}",
                meta.name,
                meta.shape,
                meta.dtype,
                out.dims(),
                out.dtype()
            )));
        }
        Ok(out)
    }

    /// The patched tensor made by the patch's `apply_in_place` on a fresh host copy of the
    /// weight's bytes, or `None` where it does not apply (the patch says which dtypes it takes).
    fn patched_into_new(
        &self,
        patch: &WeightPatch,
        meta: &TensorMeta,
        tensor: &Tensor,
    ) -> Result<Option<Tensor>, MemError> {
        let Some(apply) = patch.apply_in_place.as_deref() else {
            return Ok(None);
        };
        if !tensor.device().is_cpu() || tensor.dtype() != meta.dtype {
            return Ok(None);
        }
        let in_copy = || -> candle_core::Result<Option<Tensor>> {
            let mut bytes = safetensors::View::data(&tensor.flatten_all()?).into_owned();
            if !apply(&meta.name, meta.dtype, &mut bytes)? {
                return Ok(None);
            }
            Tensor::from_raw_buffer(&bytes, meta.dtype, meta.shape.as_slice(), &Device::Cpu)
                .map(Some)
        };
        in_copy().map_err(|e| self.checkpoint_error(format!("patching '{}': {e}", meta.name)))
    }

    /// One tensor's bytes into pinned memory, errors naming the checkpoint and the tensor.
    #[cfg(feature = "cuda")]
    fn pin(
        &self,
        cuda: &candle_core::CudaDevice,
        name: &str,
        dtype: DType,
        shape: &[usize],
        data: &[u8],
    ) -> Result<crate::pinned::PinnedTensor, MemError> {
        crate::pinned::PinnedTensor::from_bytes(cuda, dtype, shape.to_vec().into(), data)
            .map_err(|e| self.checkpoint_error(format!("pinning '{name}': {e}")))
    }
}

/// The dtype a stored tensor is kept in when the model is loaded in `load_dtype`.
///
/// Quantisation data keeps its stored dtype: float8 weights stay float8 (1 byte each; the
/// model dequantises them per use) and one-element f32 tensors, their per-tensor scales, stay
/// f32 (a bf16 scale would be off by up to 0.4 %). Every other floating tensor is converted.
pub fn resident_dtype(file: DType, shape: &[usize], load_dtype: Option<DType>) -> DType {
    let is_scale = file == DType::F32 && shape.iter().product::<usize>() <= 1;
    match load_dtype {
        Some(_) if matches!(file, DType::F8E4M3) || is_scale => file,
        Some(dtype) if file.is_float() => dtype,
        _ => file,
    }
}

/// Reads a checkpoint's header (safetensors) or tensor index (.pth) and describes the model
/// it holds.
pub(crate) fn describe_checkpoint(
    name: &str,
    path: &Path,
    load_dtype: Option<DType>,
) -> Result<Model, MemError> {
    let model = Model {
        name: name.to_owned(),
        path: path.to_owned(),
        format: Format::of(path)?,
        tensors: Vec::new(),
        host: None,
        device: None,
        patch: None,
    };
    let mut tensors = Vec::new();
    match model.format {
        Format::Safetensors => {
            let mapped = model.map()?;
            for (key, view) in mapped.tensors() {
                let file_dtype = read_dtype(view.dtype())
                    .map_err(|e| model.checkpoint_error(format!("tensor '{key}': {e}")))?;
                let shape = view.shape().to_vec();
                tensors.push(TensorMeta {
                    name: key,
                    dtype: resident_dtype(file_dtype, &shape, load_dtype),
                    shape,
                });
            }
        }
        Format::Pth => {
            for (key, info) in model.open_pth()?.tensor_infos() {
                let shape = info.layout.shape().dims().to_vec();
                tensors.push(TensorMeta {
                    name: key.clone(),
                    dtype: resident_dtype(info.dtype, &shape, load_dtype),
                    shape,
                });
            }
        }
    }
    with_tensors(model, tensors)
}

/// The model a checkpoint holds, from its inspection (`vpipe_ckpt::inspect`: the header or
/// tensor index already read), without reading the file again.
pub(crate) fn describe_inspected(
    name: &str,
    inspection: &vpipe_ckpt::Inspection,
    load_dtype: Option<DType>,
) -> Result<Model, MemError> {
    let model = Model {
        name: name.to_owned(),
        path: inspection.path.clone(),
        format: match inspection.format {
            vpipe_ckpt::FileFormat::Pth { .. } => Format::Pth,
            _ => Format::Safetensors,
        },
        tensors: Vec::new(),
        host: None,
        device: None,
        patch: None,
    };
    let tensors = inspection
        .tensors
        .iter()
        .map(|t| {
            // float8 e5m2 has no candle dtype: the store reads it as its exact f16 values.
            let file_dtype = match t.dtype {
                vpipe_ckpt::DType::F8_E5M2 => Some(DType::F16),
                other => other.to_candle(),
            }
            .ok_or_else(|| {
                model.checkpoint_error(format!(
                    "tensor '{}' is {:?}, a dtype vpipe cannot read",
                    t.name, t.dtype
                ))
            })?;
            Ok(TensorMeta {
                name: t.name.clone(),
                dtype: resident_dtype(file_dtype, &t.shape, load_dtype),
                shape: t.shape.clone(),
            })
        })
        .collect::<Result<Vec<_>, MemError>>()?;
    with_tensors(model, tensors)
}

/// `model` with `tensors` (sorted by key), refused when one has a dtype vpipe cannot hold.
fn with_tensors(model: Model, mut tensors: Vec<TensorMeta>) -> Result<Model, MemError> {
    if let Some(t) = tensors.iter().find(|t| !HELD_DTYPES.contains(&t.dtype)) {
        return Err(model.checkpoint_error(format!(
            "tensor '{}' is {:?}, a dtype vpipe cannot compute with or move to the GPU; \
             convert the checkpoint to bf16, f16, f32 or float8 e4m3",
            t.name, t.dtype
        )));
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Model { tensors, ..model })
}

/// A phase's borrow of one model's weights in the compute tier.
///
/// The lease borrows the phase that handed it out, so the model cannot be moved while a lease
/// is alive, and no tensor reference can outlive the phase (a compile error). An owned clone
/// of a tensor can still be made (candle tensors are reference-counted); a clone that is still
/// alive when the model is offloaded keeps its memory, and the offload's verification then
/// fails naming the model and both numbers.
pub struct Lease<'p> {
    pub(crate) model: &'p str,
    pub(crate) tensors: &'p BTreeMap<String, Tensor>,
}

impl<'p> Lease<'p> {
    /// The model's name.
    pub fn model(&self) -> &str {
        self.model
    }

    /// One weight, by checkpoint key.
    pub fn get(&self, name: &str) -> Result<&'p Tensor, MemError> {
        self.tensors
            .get(name)
            .ok_or_else(|| MemError::UnknownTensor {
                model: self.model.to_owned(),
                tensor: name.to_owned(),
            })
    }

    /// All weights, by checkpoint key.
    pub fn iter(&self) -> impl Iterator<Item = (&'p str, &'p Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// Drops the pages of tensor `name`'s bytes from this process's resident set once they have been
/// copied: without it, reading a 28.6 GB checkpoint into its host copy peaks at twice its size
/// in RSS (the copy plus every file page touched through the map, measured on the H100 host).
/// The pages stay in the kernel's page cache, and a later read through the map faults them
/// back in, so this only changes what the process holds.
fn release_mapped_pages(mapped: &MmapedSafetensors, name: &str) {
    let Ok(view) = mapped.get(name) else { return };
    let data = view.data();
    if data.is_empty() {
        return;
    }
    let page = crate::alloc::page_size();
    let start = data.as_ptr() as usize / page * page;
    let end = data.as_ptr() as usize + data.len();
    // SAFETY: [start, end) lies within the read-only file mapping `mapped` holds (rounded down
    // to its page; the mapping starts on a page boundary). MADV_DONTNEED on a shared file
    // mapping only unmaps pages; their contents stay in the file and the page cache, so every
    // slice into the mapping, including neighbours sharing the edge pages, stays valid.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
    }
}

#[cfg(test)]
mod tests {
    use super::resident_dtype;
    use candle_core::DType;

    #[test]
    fn quantisation_data_keeps_its_dtype() {
        let bf16 = Some(DType::BF16);
        assert_eq!(resident_dtype(DType::F32, &[16, 16], bf16), DType::BF16);
        assert_eq!(resident_dtype(DType::F16, &[4], bf16), DType::BF16);
        assert_eq!(
            resident_dtype(DType::F8E4M3, &[16, 16], bf16),
            DType::F8E4M3
        );
        assert_eq!(resident_dtype(DType::F32, &[1], bf16), DType::F32);
        assert_eq!(resident_dtype(DType::F32, &[], bf16), DType::F32);
        // The bytes of an embedded tokenizer model are not numbers to convert.
        assert_eq!(resident_dtype(DType::U8, &[1000], bf16), DType::U8);
        assert_eq!(resident_dtype(DType::F32, &[16], None), DType::F32);
    }
}
