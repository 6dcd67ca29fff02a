//! Page-locked host copies of weights and their upload to the device.
//!
//! A host→device copy from pinned memory runs at the bus's speed (55 GB/s measured on an H100,
//! against 7–10 GB/s from pageable memory), so the host tier of a CUDA run is pinned.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaContext, DevicePtrMut, DeviceRepr, PinnedHostSlice,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Shape, Storage, Tensor};

/// One tensor's bytes in page-locked host memory.
pub(crate) struct PinnedTensor {
    dtype: DType,
    shape: Shape,
    bytes: PinnedBytes,
}

/// Transparent huge pages: the size and alignment of one.
const HUGE_PAGE: usize = 2 << 20;

/// Page-locked bytes: from the driver's allocator, or, for a tensor of a huge page or more, an
/// anonymous mapping on transparent huge pages that the driver then locks. The driver's
/// allocator faults and locks 4 KiB pages one by one (10.9 M minor faults for the 40 GB of
/// host copies of the 14B pipeline on the H100 host); huge pages are 512 times fewer.
enum PinnedBytes {
    Driver(PinnedHostSlice<u8>),
    Registered {
        /// Start of the huge-page-aligned region inside the mapping.
        data: *mut u8,
        len: usize,
        /// The whole mapping, unmapped on drop.
        mapping: *mut libc::c_void,
        mapping_len: usize,
        context: Arc<CudaContext>,
    },
}

// SAFETY: `Registered` owns its mapping exclusively (nothing else holds the pointers), and
// the bytes are plain host memory; the driver slice is Send + Sync itself.
unsafe impl Send for PinnedBytes {}
unsafe impl Sync for PinnedBytes {}

impl PinnedBytes {
    /// Page-locked copy of `data`.
    fn copy_of(context: &Arc<CudaContext>, data: &[u8]) -> candle_core::Result<Self> {
        if data.len() >= HUGE_PAGE {
            if let Some(bytes) = Self::huge_pages(context, data)? {
                return Ok(bytes);
            }
        }
        // SAFETY: the buffer is fully written below before anything reads it.
        let mut bytes = unsafe { context.alloc_pinned_with_flags::<u8>(data.len().max(1), 0) }
            .map_err(driver_error)?;
        let destination = bytes.as_mut_slice().map_err(driver_error)?;
        destination[..data.len()].copy_from_slice(data);
        Ok(Self::Driver(bytes))
    }

    /// `data` copied into huge pages and registered with the driver; `None` when the kernel
    /// refuses the mapping (then the driver's allocator serves).
    fn huge_pages(context: &Arc<CudaContext>, data: &[u8]) -> candle_core::Result<Option<Self>> {
        let len = data.len();
        let region = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let mapping_len = region + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; every pointer below stays inside it.
        let mapping = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapping_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            return Ok(None);
        }
        let data_ptr = (mapping as usize).next_multiple_of(HUGE_PAGE) as *mut u8;
        // SAFETY: [data_ptr, data_ptr + region) lies inside the mapping (one spare huge page
        // covers the alignment); a refused hint only means 4 KiB pages.
        unsafe {
            libc::madvise(data_ptr.cast(), region, libc::MADV_HUGEPAGE);
            std::ptr::copy_nonoverlapping(data.as_ptr(), data_ptr, len);
        }
        context.bind_to_thread().map_err(driver_error)?;
        // SAFETY: the range is mapped, written and owned by this value until drop, which
        // unregisters it before unmapping.
        let registered = unsafe { sys::cuMemHostRegister_v2(data_ptr.cast(), region, 0) };
        if registered != sys::CUresult::CUDA_SUCCESS {
            // SAFETY: the mapping made above, not registered.
            unsafe { libc::munmap(mapping, mapping_len) };
            return Err(candle_core::Error::Msg(format!(
                "locking {region} bytes of host memory: {registered:?}"
            )));
        }
        Ok(Some(Self::Registered {
            data: data_ptr,
            len,
            mapping,
            mapping_len,
            context: context.clone(),
        }))
    }

    fn as_slice(&self) -> candle_core::Result<&[u8]> {
        match self {
            Self::Driver(bytes) => bytes.as_slice().map_err(driver_error),
            // SAFETY: `len` bytes at `data` were written in `huge_pages` and live until drop.
            Self::Registered { data, len, .. } => {
                Ok(unsafe { std::slice::from_raw_parts(*data, *len) })
            }
        }
    }
}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        if let Self::Registered {
            data,
            mapping,
            mapping_len,
            context,
            ..
        } = self
        {
            // An upload from these bytes may still be queued: the driver slice waits on its
            // event for the same reason.
            let _ = context.bind_to_thread();
            let _ = context.synchronize();
            // SAFETY: registered and mapped in `huge_pages`, released once, here.
            unsafe {
                sys::cuMemHostUnregister((*data).cast());
                libc::munmap(*mapping, *mapping_len);
            }
        }
    }
}

fn driver_error(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl PinnedTensor {
    /// Copies `data` (the raw little-endian bytes of a `dtype` tensor of `shape`) into freshly
    /// pinned memory.
    pub(crate) fn from_bytes(
        device: &CudaDevice,
        dtype: DType,
        shape: Shape,
        data: &[u8],
    ) -> candle_core::Result<Self> {
        let context = device.cuda_stream().context().clone();
        Ok(Self {
            dtype,
            shape,
            bytes: PinnedBytes::copy_of(&context, data)?,
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
            let source = self.bytes.as_slice()?;
            let source = &source[..len * std::mem::size_of::<T>()];
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

    /// Makes a device tensor with one host→device copy from the pinned bytes.
    pub(crate) fn upload(&self, device: &CudaDevice) -> candle_core::Result<Tensor> {
        match self.dtype {
            DType::BF16 => self.upload_as::<half::bf16>(device),
            DType::F16 => self.upload_as::<half::f16>(device),
            DType::F32 => self.upload_as::<f32>(device),
            DType::F64 => self.upload_as::<f64>(device),
            DType::U8 => self.upload_as::<u8>(device),
            DType::U32 => self.upload_as::<u32>(device),
            DType::I64 => self.upload_as::<i64>(device),
            other => Err(candle_core::Error::Msg(format!(
                "no device upload for dtype {other:?}"
            ))),
        }
    }
}
