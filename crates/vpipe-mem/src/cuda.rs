//! Device memory meters for CUDA: the driver's free/total, the default memory pool's exact
//! accounting, and NVML's per-process figure as a cross-check.
//!
//! candle allocates every tensor with `cuMemAllocAsync` from the device's default pool, so the
//! pool's used-memory attributes are exact: the current value is what live tensors hold, and
//! the high-water mark catches transient peaks between two readings. Each reading synchronizes
//! the device first: freed blocks return to the pool only once the stream has passed the free.

use std::sync::Arc;

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext};
use candle_core::CudaDevice;

use crate::MemError;

/// One synchronized reading of a CUDA device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CudaReading {
    /// `cuMemGetInfo` free bytes (whole device, all processes).
    pub driver_free: u64,
    /// `cuMemGetInfo` total bytes.
    pub driver_total: u64,
    /// Default pool: bytes in live allocations (`CU_MEMPOOL_ATTR_USED_MEM_CURRENT`).
    pub pool_used: u64,
    /// Default pool: highest `pool_used` since the last reset.
    pub pool_used_high: u64,
    /// Default pool: bytes reserved from the driver (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`).
    pub pool_reserved: u64,
    /// Default pool: highest `pool_reserved` since the last reset.
    pub pool_reserved_high: u64,
    /// NVML's used GPU memory for this process, when NVML is loaded and reports it.
    pub nvml_process_used: Option<u64>,
}

impl CudaReading {
    /// Bytes this process holds on the device outside the pool: NVML's per-process figure
    /// less the pool's reserve (0 without NVML).
    pub fn outside_pool(&self) -> u64 {
        self.nvml_process_used
            .map_or(0, |used| used.saturating_sub(self.pool_reserved))
    }
}

/// Meters of one CUDA device.
pub struct CudaMeter {
    device: CudaDevice,
    context: Arc<CudaContext>,
    pool: sys::CUmemoryPool,
    nvml: Option<NvmlProcess>,
}

struct NvmlProcess {
    nvml: nvml_wrapper::Nvml,
    pci_bus_id: String,
}

// SAFETY: the pool handle is a driver object usable from any thread with the context bound;
// every use binds the context first.
unsafe impl Send for CudaMeter {}
unsafe impl Sync for CudaMeter {}

fn driver(what: &'static str, code: sys::CUresult) -> Result<(), MemError> {
    if code == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(MemError::Meter {
            meter: "cuda",
            detail: format!("{what} failed: {code:?}"),
        })
    }
}

impl CudaMeter {
    /// Meters for `device`. NVML is optional: when `libnvidia-ml.so.1` does not load, readings
    /// carry no NVML figure.
    pub fn new(device: &CudaDevice) -> Result<Self, MemError> {
        let stream = device.cuda_stream();
        let context = stream.context().clone();
        let wrap = |e: candle_core::cuda_backend::cudarc::driver::DriverError| MemError::Meter {
            meter: "cuda",
            detail: e.to_string(),
        };
        context.bind_to_thread().map_err(wrap)?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: the context is bound and the out-pointer is valid.
        driver("cuDeviceGetDefaultMemPool", unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
        })?;
        let attr = |a| context.attribute(a).map_err(wrap).map(|v| v as u32);
        let pci_bus_id = format!(
            "{:08X}:{:02X}:{:02X}.0",
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?,
        );
        let nvml = match nvml_wrapper::Nvml::init() {
            Ok(nvml) => Some(NvmlProcess { nvml, pci_bus_id }),
            Err(e) => {
                tracing::info!("NVML not available, no per-process cross-check: {e}");
                None
            }
        };
        Ok(Self {
            device: device.clone(),
            context,
            pool,
            nvml,
        })
    }

    fn pool_attribute(&self, attribute: sys::CUmemPool_attribute) -> Result<u64, MemError> {
        let mut value: u64 = 0;
        // SAFETY: these attributes are cuuint64_t; the pointer is valid for the call.
        driver("cuMemPoolGetAttribute", unsafe {
            sys::cuMemPoolGetAttribute(self.pool, attribute, &mut value as *mut u64 as *mut _)
        })?;
        Ok(value)
    }

    fn nvml_process_used(&self) -> Option<u64> {
        let nvml = self.nvml.as_ref()?;
        let device = nvml
            .nvml
            .device_by_pci_bus_id(nvml.pci_bus_id.as_str())
            .ok()?;
        let pid = std::process::id();
        let processes = device.running_compute_processes().ok()?;
        processes
            .iter()
            .find(|p| p.pid == pid)
            .and_then(|p| match p.used_gpu_memory {
                nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) => Some(bytes),
                nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
            })
    }

    /// Synchronizes the device, then reads every meter.
    pub fn read(&self) -> Result<CudaReading, MemError> {
        self.device.synchronize().map_err(|e| MemError::Meter {
            meter: "cuda",
            detail: format!("synchronize: {e}"),
        })?;
        self.read_in_flight()
    }

    /// Reads every meter without waiting for the device: the pool's figures are those of the
    /// allocations enqueued so far (stream-ordered allocations take their memory when they
    /// are enqueued), so a reading between two kernels costs no stall.
    pub fn read_in_flight(&self) -> Result<CudaReading, MemError> {
        let (free, total) = self.context.mem_get_info().map_err(|e| MemError::Meter {
            meter: "cuda",
            detail: format!("cuMemGetInfo: {e}"),
        })?;
        use sys::CUmemPool_attribute::*;
        Ok(CudaReading {
            driver_free: free as u64,
            driver_total: total as u64,
            pool_used: self.pool_attribute(CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            pool_used_high: self.pool_attribute(CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            pool_reserved: self.pool_attribute(CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            pool_reserved_high: self.pool_attribute(CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
            nvml_process_used: self.nvml_process_used(),
        })
    }

    /// Resets both high-water marks of the pool to the current values.
    pub fn reset_peaks(&self) -> Result<(), MemError> {
        self.context.bind_to_thread().map_err(|e| MemError::Meter {
            meter: "cuda",
            detail: e.to_string(),
        })?;
        use sys::CUmemPool_attribute::*;
        for attribute in [
            CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
        ] {
            let mut zero: u64 = 0;
            // SAFETY: resetting a HIGH attribute takes a cuuint64_t 0.
            driver("cuMemPoolSetAttribute", unsafe {
                sys::cuMemPoolSetAttribute(self.pool, attribute, &mut zero as *mut u64 as *mut _)
            })?;
        }
        Ok(())
    }
}
