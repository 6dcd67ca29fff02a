//! Page-locked host copies of weights and their upload to the device.
//!
//! A host→device copy from pinned memory runs at the bus's speed (55 GB/s measured on an H100,
//! against 7–10 GB/s from pageable memory), so the host tier of a CUDA run is pinned.

use candle_core::cuda_backend::cudarc::driver::{
    result, DevicePtrMut, DeviceRepr, PinnedHostSlice,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Shape, Storage, Tensor};

/// Page-locked host memory that the tensors of one model share: one allocation instead of
/// one per tensor (page-locking is the slow part of making a host copy; done once it is done
/// for all).
pub(crate) struct PinnedArena {
    bytes: PinnedHostSlice<u8>,
}

// SAFETY: the arena is written only through `PinnedArena::fill`, before it is shared; after that
// it is only read (by the copy engine and by `bytes`).
unsafe impl Sync for PinnedArena {}
unsafe impl Send for PinnedArena {}

impl PinnedArena {
    /// An arena of `len` bytes, not yet written.
    pub(crate) fn new(device: &CudaDevice, len: usize) -> candle_core::Result<Self> {
        let context = device.cuda_stream().context().clone();
        // Portable, not write-combined: the CPU writes it once, the copy engine reads it.
        // SAFETY: every byte a tensor is made of is written (`fill`) before anything reads it.
        let bytes = unsafe { context.alloc_pinned_with_flags::<u8>(len.max(1), 0) }
            .map_err(driver_error)?;
        Ok(Self { bytes })
    }

    /// The arena's bytes, to fill in parallel: disjoint ranges of it may be written from
    /// several threads (`fill` takes `&self`).
    pub(crate) fn fill(
        &self,
        range: std::ops::Range<usize>,
        data: &[u8],
    ) -> candle_core::Result<()> {
        if range.len() != data.len() || range.end > self.bytes.len() {
            candle_core::bail!(
                "pinned arena: {} bytes for the range {range:?} of {}",
                data.len(),
                self.bytes.len()
            );
        }
        let base = self.bytes.as_ptr().map_err(driver_error)? as *mut u8;
        // SAFETY: the range lies in the allocation (checked above); callers write disjoint
        // ranges, and nothing reads a range before its tensor is made (after every fill).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(range.start), data.len()) };
        Ok(())
    }

    /// A writable view of `range`, for a read straight from a file into the arena.
    ///
    /// # Safety
    /// No other thread may touch `range` while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range_mut(
        &self,
        range: std::ops::Range<usize>,
    ) -> candle_core::Result<&mut [u8]> {
        if range.end > self.bytes.len() {
            candle_core::bail!("pinned arena: range {range:?} past {}", self.bytes.len());
        }
        let base = self.bytes.as_ptr().map_err(driver_error)? as *mut u8;
        Ok(std::slice::from_raw_parts_mut(
            base.add(range.start),
            range.len(),
        ))
    }

    /// The bytes in `range`.
    fn slice(&self, range: std::ops::Range<usize>) -> candle_core::Result<&[u8]> {
        let all = self.bytes.as_slice().map_err(driver_error)?;
        all.get(range.clone()).ok_or_else(|| {
            candle_core::Error::Msg(format!("pinned arena: range {range:?} past {}", all.len()))
        })
    }
}

/// One tensor's bytes in page-locked host memory: a range of an arena.
pub(crate) struct PinnedTensor {
    dtype: DType,
    shape: Shape,
    arena: std::sync::Arc<PinnedArena>,
    start: usize,
}

fn driver_error(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl PinnedTensor {
    /// Copies `data` (the raw little-endian bytes of a `dtype` tensor of `shape`) into freshly
    /// pinned memory of its own.
    pub(crate) fn from_bytes(
        device: &CudaDevice,
        dtype: DType,
        shape: Shape,
        data: &[u8],
    ) -> candle_core::Result<Self> {
        let arena = PinnedArena::new(device, data.len())?;
        arena.fill(0..data.len(), data)?;
        Self::in_arena(std::sync::Arc::new(arena), 0, dtype, shape)
    }

    /// The tensor of `dtype` and `shape` whose bytes start at `start` in `arena` (written
    /// there before).
    pub(crate) fn in_arena(
        arena: std::sync::Arc<PinnedArena>,
        start: usize,
        dtype: DType,
        shape: Shape,
    ) -> candle_core::Result<Self> {
        let len = shape.elem_count() * dtype.size_in_bytes();
        arena.slice(start..start + len)?;
        Ok(Self {
            dtype,
            shape,
            arena,
            start,
        })
    }

    fn upload_as<T: CudaDType + DeviceRepr>(
        &self,
        device: &CudaDevice,
    ) -> candle_core::Result<Tensor> {
        let stream = device.cuda_stream();
        let len = self.shape.elem_count();
        // SAFETY: every element is written by the copy below before the tensor is used.
        let mut slice = unsafe { stream.alloc::<T>(len) }.map_err(driver_error)?;
        {
            let source = self.bytes()?;
            let (destination, _record) = slice.device_ptr_mut(&stream);
            // SAFETY: `destination` holds exactly `source.len()` bytes; the pinned buffer
            // outlives the copy (it is dropped only after the device copy is, and every drop
            // is followed by a synchronize before the next reading).
            unsafe { result::memcpy_htod_async(destination, source, stream.cu_stream()) }
                .map_err(driver_error)?;
        }
        let storage = CudaStorage::wrap_cuda_slice(slice, device.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            self.shape.clone(),
            BackpropOp::none(),
            false,
        ))
    }

    /// The page-locked bytes.
    pub(crate) fn bytes(&self) -> candle_core::Result<&[u8]> {
        let len = self.shape.elem_count() * self.dtype.size_in_bytes();
        self.arena.slice(self.start..self.start + len)
    }

    /// Makes a device tensor with one host→device copy from the pinned bytes.
    ///
    /// Every dtype in [`crate::store::HELD_DTYPES`] has an arm here: the store refuses any other
    /// dtype when a checkpoint is registered, so a run never reaches the error arm.
    pub(crate) fn upload(&self, device: &CudaDevice) -> candle_core::Result<Tensor> {
        match self.dtype {
            DType::BF16 => self.upload_as::<half::bf16>(device),
            DType::F16 => self.upload_as::<half::f16>(device),
            DType::F32 => self.upload_as::<f32>(device),
            DType::F64 => self.upload_as::<f64>(device),
            DType::F8E4M3 => self.upload_as::<float8::F8E4M3>(device),
            DType::U8 => self.upload_as::<u8>(device),
            DType::U32 => self.upload_as::<u32>(device),
            DType::I16 => self.upload_as::<i16>(device),
            DType::I32 => self.upload_as::<i32>(device),
            DType::I64 => self.upload_as::<i64>(device),
            other => Err(candle_core::Error::Msg(format!(
                "no device upload for dtype {other:?}"
            ))),
        }
    }
}

/// Copies a contiguous device tensor's elements into `bytes` (its length, its dtype's
/// little-endian bytes, aligned for the dtype: a range of an arena) and waits for the copy.
pub(crate) fn copy_to_host(tensor: &Tensor, bytes: &mut [u8]) -> candle_core::Result<()> {
    use candle_core::cuda_backend::CudaStorageSlice as S;
    fn copy<T: DeviceRepr + bytemuck::Pod>(
        slice: &candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
        (start, end): (usize, usize),
        bytes: &mut [u8],
        stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    ) -> candle_core::Result<()> {
        let host: &mut [T] = bytemuck::try_cast_slice_mut(bytes)
            .map_err(|e| candle_core::Error::Msg(format!("copy to host: {e}")))?;
        if host.len() != end - start {
            candle_core::bail!(
                "copy to host: {} elements into room for {}",
                end - start,
                host.len()
            );
        }
        stream
            .memcpy_dtoh(&slice.slice(start..end), host)
            .and_then(|()| stream.synchronize())
            .map_err(driver_error)
    }
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        candle_core::bail!("copy to host: the tensor is not on the CUDA device")
    };
    let Some(offsets) = layout.contiguous_offsets() else {
        candle_core::bail!("copy to host: the tensor is not contiguous")
    };
    let stream = cuda.device.cuda_stream();
    match &cuda.slice {
        S::BF16(s) => copy(s, offsets, bytes, &stream),
        S::F16(s) => copy(s, offsets, bytes, &stream),
        S::F32(s) => copy(s, offsets, bytes, &stream),
        _ => candle_core::bail!("copy to host: only f32, bf16 and f16 tensors"),
    }
}

/// Overwrites a contiguous device tensor with page-locked `bytes` (the same length), copied
/// asynchronously on `stream`; the caller orders `stream` with the streams that read or
/// write the tensor, and keeps `bytes` alive until the copy is done.
pub(crate) struct CopyFromPinned<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) stream: &'a std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
}

impl candle_core::InplaceOp1 for CopyFromPinned<'_> {
    fn name(&self) -> &'static str {
        "stream-copy"
    }

    fn cpu_fwd(
        &self,
        _storage: &mut candle_core::CpuStorage,
        _layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("stream-copy: the arena is on the CPU")
    }

    fn cuda_fwd(
        &self,
        storage: &mut CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        fn copy<T: DeviceRepr>(
            slice: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
            layout: &candle_core::Layout,
            bytes: &[u8],
            stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
        ) -> candle_core::Result<()> {
            let size = std::mem::size_of::<T>();
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("stream-copy: the arena tensor is not contiguous")
            };
            if (end - start) * size != bytes.len() {
                candle_core::bail!(
                    "stream-copy: {} bytes for an arena tensor of {}",
                    bytes.len(),
                    (end - start) * size
                );
            }
            let (base, _record) = slice.device_ptr_mut(stream);
            // SAFETY: [start, end) lies in the slice (the layout is the tensor's own); the
            // source is page-locked and kept alive by the caller until the copy completes.
            unsafe {
                result::memcpy_htod_async(base + (start * size) as u64, bytes, stream.cu_stream())
            }
            .map_err(driver_error)
        }
        let (bytes, stream) = (self.bytes, self.stream.as_ref());
        match &mut storage.slice {
            S::U8(s) => copy(s, layout, bytes, stream),
            S::U32(s) => copy(s, layout, bytes, stream),
            S::I16(s) => copy(s, layout, bytes, stream),
            S::I32(s) => copy(s, layout, bytes, stream),
            S::I64(s) => copy(s, layout, bytes, stream),
            S::BF16(s) => copy(s, layout, bytes, stream),
            S::F16(s) => copy(s, layout, bytes, stream),
            S::F32(s) => copy(s, layout, bytes, stream),
            S::F64(s) => copy(s, layout, bytes, stream),
            S::F8E4M3(s) => copy(s, layout, bytes, stream),
            _ => candle_core::bail!("stream-copy: no arena for this dtype"),
        }
    }
}
