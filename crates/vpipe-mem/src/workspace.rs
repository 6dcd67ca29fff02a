//! Memory that the CPU matmul library keeps for the life of each thread.
//!
//! candle's CPU matmuls run on `gemm`, which packs operands into a per-thread buffer the size of
//! the CPU's L2 cache, made on the thread's first matmul and never freed. Its size depends on
//! the CPU (1 MiB on one machine, 2 MiB on another) and the number of threads on the machine's
//! cores. Made inside a phase, it would be counted as that phase's growth and as part of a
//! model's load, so that verifications failed on some CPUs and not on others.
//!
//! The session therefore makes these buffers before its baseline, on every thread that can run
//! a matmul (the calling thread and each thread of rayon's global pool, where gemm runs its
//! parallel work), and reports their measured size as a line of its own.

use std::sync::OnceLock;

/// The per-thread matmul buffers, measured as they were made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ComputeWorkspace {
    /// Threads that hold a buffer: the thread that made the session and rayon's workers.
    pub threads: usize,
    /// Heap bytes the counting allocator saw them take (0 without it).
    pub heap_bytes: u64,
}

static WORKSPACE: OnceLock<ComputeWorkspace> = OnceLock::new();

fn make_matmul_buffer() {
    gemm_common::gemm::L2_SLAB.with(|_| ());
}

/// Makes the matmul buffers of the calling thread and of every rayon worker, once per process,
/// and returns what the first call measured them to take. A later call from another thread
/// makes that thread's buffer too (so that it cannot appear inside a phase of a session made
/// there), without adding it to the figure.
pub fn prepare_compute_workspace() -> ComputeWorkspace {
    let made = *WORKSPACE.get_or_init(|| {
        let before = crate::heap_stats().map(|h| h.current);
        make_matmul_buffer();
        let workers = rayon::broadcast(|_| make_matmul_buffer()).len();
        let after = crate::heap_stats().map(|h| h.current);
        let heap_bytes = match (before, after) {
            (Some(b), Some(a)) => a.saturating_sub(b),
            _ => 0,
        };
        ComputeWorkspace {
            threads: workers + 1,
            heap_bytes,
        }
    });
    make_matmul_buffer();
    made
}
