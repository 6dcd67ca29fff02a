//! One reading of every meter this process has, taken together.

use std::time::Instant;

use crate::alloc::{heap_stats, reset_heap_peak, HeapStats};
use crate::host::{read_host_rss, HostRss};
use crate::MemError;

#[cfg(feature = "cuda")]
pub use crate::cuda::CudaReading;

/// Device readings when the crate is built without CUDA: there are none.
#[cfg(not(feature = "cuda"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CudaReading {}

/// Every meter at one instant (after the device was synchronized).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reading {
    /// Milliseconds since the meters were created.
    pub t_ms: f64,
    /// Resident set from `/proc/self/status`.
    pub host: HostRss,
    /// Counting allocator, when it is this process's global allocator.
    pub heap: Option<HeapStats>,
    /// The CUDA device, when computing on one.
    pub cuda: Option<CudaReading>,
}

/// The tier models compute from: host RAM on a CPU run, the CUDA device otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeKind {
    /// Compute on the host; weights in pageable RAM.
    Cpu,
    /// Compute on a CUDA device.
    Cuda,
}

impl Reading {
    /// Bytes in use in the compute tier: the pool's live allocations on CUDA; on the CPU the
    /// counting allocator's live bytes, or RssAnon where that allocator is not installed.
    pub fn compute_used(&self) -> u64 {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            return cuda.pool_used;
        }
        self.host_used()
    }

    /// Highest compute-tier use since the peaks were last reset.
    pub fn compute_peak(&self) -> u64 {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            return cuda.pool_used_high;
        }
        match self.heap {
            Some(heap) => heap.peak,
            None => self.host.anon,
        }
    }

    /// On CUDA, the device memory this process takes: the pool's reserved bytes plus what it
    /// holds outside the pool (the context, the libraries' handles and workspaces: NVML's
    /// per-process figure less the pool's reserve, counted as 0 without NVML). `None` on the
    /// CPU.
    pub fn device_footprint(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            return Some(cuda.pool_reserved + cuda.outside_pool());
        }
        None
    }

    /// On CUDA, the bytes the pool has reserved from the driver.
    pub fn pool_reserved(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            return Some(cuda.pool_reserved);
        }
        None
    }

    /// The high-water mark of [`Reading::device_footprint`] since the peaks were reset: the
    /// pool's reserve at its highest plus what is outside the pool now.
    pub fn device_footprint_peak(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            return Some(cuda.pool_reserved_high + cuda.outside_pool());
        }
        None
    }

    /// The bytes a budget bounds at its peak, and the meter they come from: on CUDA the
    /// process's whole device footprint ([`Reading::device_footprint_peak`]); on the CPU
    /// the compute tier's high-water mark above `baseline`.
    pub fn budgeted_peak(&self, baseline: &Reading) -> (u64, &'static str) {
        match self.device_footprint_peak() {
            Some(peak) => (peak, "device footprint: pool reserved + outside the pool"),
            None => (
                self.compute_peak().saturating_sub(baseline.compute_used()),
                match self.heap {
                    Some(_) => "heap above baseline",
                    None => "rss_anon above baseline",
                },
            ),
        }
    }

    /// Bytes of host memory this process owns: live heap bytes when counted, else RssAnon.
    pub fn host_used(&self) -> u64 {
        match self.heap {
            Some(heap) => heap.current,
            None => self.host.anon,
        }
    }

    /// The name of the meter behind [`Reading::compute_used`].
    pub fn compute_meter(&self) -> &'static str {
        if self.cuda.is_some() {
            "pool_used"
        } else if self.heap.is_some() {
            "heap"
        } else {
            "rss_anon"
        }
    }
}

/// Called with every reading right after it is taken (tests use it to take an independent
/// reading at the same instant).
pub type ReadingObserver = Box<dyn Fn(&Reading) + Send + Sync>;

/// The meters of this process.
pub struct Meters {
    start: Instant,
    #[cfg(feature = "cuda")]
    cuda: Option<crate::cuda::CudaMeter>,
    observer: Option<ReadingObserver>,
}

impl Meters {
    /// Host meters only.
    pub fn host() -> Self {
        Self {
            start: Instant::now(),
            #[cfg(feature = "cuda")]
            cuda: None,
            observer: None,
        }
    }

    /// Meters for computing on `device` (host meters are always included).
    pub fn for_device(device: &candle_core::Device) -> Result<Self, MemError> {
        match device {
            candle_core::Device::Cpu => Ok(Self::host()),
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(cuda) => Ok(Self {
                start: Instant::now(),
                cuda: Some(crate::cuda::CudaMeter::new(cuda)?),
                observer: None,
            }),
            #[allow(unreachable_patterns)]
            other => Err(MemError::Meter {
                meter: "device",
                detail: format!("no meters for {other:?} in this build"),
            }),
        }
    }

    /// Calls `observer` with every reading, right after it is taken.
    pub fn with_observer(mut self, observer: ReadingObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Where models compute.
    pub fn compute_kind(&self) -> ComputeKind {
        #[cfg(feature = "cuda")]
        if self.cuda.is_some() {
            return ComputeKind::Cuda;
        }
        ComputeKind::Cpu
    }

    /// Synchronizes the device, then reads every meter.
    pub fn read(&self) -> Result<Reading, MemError> {
        self.read_with(true)
    }

    /// Reads every meter without synchronizing the device (on CUDA the pool figures of the
    /// allocations enqueued so far, which stream-ordered allocations take when enqueued):
    /// for readings inside a computation, which a synchronization would slow down.
    pub fn read_in_flight(&self) -> Result<Reading, MemError> {
        self.read_with(false)
    }

    fn read_with(&self, synchronize: bool) -> Result<Reading, MemError> {
        #[cfg(feature = "cuda")]
        let cuda = self
            .cuda
            .as_ref()
            .map(|c| {
                if synchronize {
                    c.read()
                } else {
                    c.read_in_flight()
                }
            })
            .transpose()?;
        #[cfg(not(feature = "cuda"))]
        let (cuda, _) = (None, synchronize);
        // Heap first: reading RSS must not be able to move the heap counters it is compared to.
        let heap = heap_stats();
        let host = read_host_rss()?;
        let reading = Reading {
            t_ms: self.start.elapsed().as_secs_f64() * 1e3,
            host,
            heap,
            cuda,
        };
        if let Some(observer) = &self.observer {
            observer(&reading);
        }
        Ok(reading)
    }

    /// Counts the readings' times from now on (a new record of a long-lived session).
    pub fn restart_clock(&mut self) {
        self.start = Instant::now();
    }

    /// Resets every high-water mark (heap peak, pool high marks) to the current value.
    pub fn reset_peaks(&self) -> Result<(), MemError> {
        reset_heap_peak();
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            cuda.reset_peaks()?;
        }
        Ok(())
    }
}
