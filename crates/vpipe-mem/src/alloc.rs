//! A counting global allocator: exact heap bytes in use and their high-water mark.
//!
//! Large blocks (model weights, activations) are mapped straight from the kernel and unmapped on
//! free. glibc would otherwise serve them from its arenas once its dynamic mmap threshold has
//! risen, and keep the pages after `free`: an offload would then not show up in RssAnon at all,
//! which is the very failure vpipe exists to rule out.
//!
//! The allocator is declared by the final artefact (the `vpipe` binary, a test binary):
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: vpipe_mem::CountingAllocator = vpipe_mem::CountingAllocator;
//! ```
//!
//! Without that line [`heap_stats`] returns `None` and no report shows heap figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Blocks at least this large bypass malloc and go to `mmap`/`munmap` directly.
const DIRECT_MAP_THRESHOLD: usize = 1 << 20;

static CURRENT: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Heap bytes requested by live allocations, and the most there were since the last reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeapStats {
    /// Bytes of live allocations now.
    pub current: u64,
    /// Highest `current` since the process started or [`reset_heap_peak`] was called.
    pub peak: u64,
}

/// The counters of the installed [`CountingAllocator`], or `None` when it is not the global
/// allocator of this process.
pub fn heap_stats() -> Option<HeapStats> {
    INSTALLED.load(Ordering::Relaxed).then(|| HeapStats {
        current: CURRENT.load(Ordering::SeqCst),
        peak: PEAK.load(Ordering::SeqCst),
    })
}

/// Sets the high-water mark to the current value, so that the next peak is the peak of what
/// follows.
pub fn reset_heap_peak() {
    PEAK.store(CURRENT.load(Ordering::SeqCst), Ordering::SeqCst);
}

/// Global allocator that counts every byte and maps large blocks directly (see module docs).
pub struct CountingAllocator;

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

fn is_direct(layout: &Layout) -> bool {
    is_directly_mapped(layout.size()) && layout.align() <= page_size()
}

/// Whether a block of `size` bytes (with ordinary alignment) is mapped straight from the
/// kernel, and so returned to it when freed.
pub(crate) fn is_directly_mapped(size: usize) -> bool {
    size >= DIRECT_MAP_THRESHOLD
}

fn count_alloc(size: usize) {
    INSTALLED.store(true, Ordering::Relaxed);
    let now = CURRENT.fetch_add(size as u64, Ordering::SeqCst) + size as u64;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

fn count_free(size: usize) {
    CURRENT.fetch_sub(size as u64, Ordering::SeqCst);
}

/// # Safety
/// `size` must be non-zero.
unsafe fn map_block(size: usize) -> *mut u8 {
    let ptr = libc::mmap(
        std::ptr::null_mut(),
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    if ptr == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        ptr as *mut u8
    }
}

// SAFETY: every method forwards to System or to mmap/munmap/mremap with the sizes the caller's
// layouts give; a block's size class (direct or not) is a pure function of its layout, so a
// block is always released by the mechanism that created it.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = if is_direct(&layout) {
            map_block(layout.size())
        } else {
            System.alloc(layout)
        };
        if !ptr.is_null() {
            count_alloc(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // Fresh anonymous mappings are already zero.
        let ptr = if is_direct(&layout) {
            map_block(layout.size())
        } else {
            System.alloc_zeroed(layout)
        };
        if !ptr.is_null() {
            count_alloc(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_direct(&layout) {
            libc::munmap(ptr as *mut libc::c_void, layout.size());
        } else {
            System.dealloc(ptr, layout);
        }
        count_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new_ptr = match (is_direct(&layout), is_direct(&new_layout)) {
            (false, false) => System.realloc(ptr, layout, new_size),
            (true, true) => {
                let moved = libc::mremap(
                    ptr as *mut libc::c_void,
                    layout.size(),
                    new_size,
                    libc::MREMAP_MAYMOVE,
                );
                if moved == libc::MAP_FAILED {
                    std::ptr::null_mut()
                } else {
                    moved as *mut u8
                }
            }
            _ => {
                let fresh = self.alloc(new_layout);
                if !fresh.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                return fresh;
            }
        };
        if !new_ptr.is_null() {
            count_free(layout.size());
            count_alloc(new_size);
        }
        new_ptr
    }
}
