//! vpipe's memory core: meters that measure, a residency store that owns every model's
//! weights, phases that move them and verify each move, a budget checked before every load,
//! and a ledger from which reports and charts are rendered.
//!
//! ```no_run
//! use vpipe_mem::{Budget, MemorySession, Tier};
//! # fn main() -> Result<(), vpipe_mem::MemError> {
//! let mut session = MemorySession::new(candle_core::Device::Cpu, Budget::default())?;
//! let vae = session.register("vae", "vae.safetensors".as_ref(), None)?;
//! session.phase("vae encode", |phase| {
//!     phase.make_resident(vae)?;
//!     let lease = phase.lease(vae)?;
//!     let _weight = lease.get("decoder.head.2.weight")?;
//!     drop(lease);
//!     phase.offload(vae, Tier::Disk)
//! })?;
//! # Ok(()) }
//! ```
//!
//! A lease borrows its phase, so a model cannot be moved while its weights are leased:
//!
//! ```compile_fail
//! # use vpipe_mem::{Budget, MemorySession, Tier};
//! # let mut session = MemorySession::new(candle_core::Device::Cpu, Budget::default()).unwrap();
//! # let vae = session.register("vae", "vae.safetensors".as_ref(), None).unwrap();
//! session.phase("oops", |phase| {
//!     let lease = phase.lease(vae)?;
//!     phase.offload(vae, Tier::Disk)?; // error: `phase` is borrowed by `lease`
//!     let _ = lease.get("w");
//!     Ok::<(), vpipe_mem::MemError>(())
//! }).unwrap();
//! ```
#![deny(missing_docs)]

mod alloc;
#[cfg(feature = "cuda")]
mod cuda;
mod error;
mod host;
mod ledger;
mod meter;
#[cfg(feature = "cuda")]
mod pinned;
mod report;
mod session;
mod store;
mod stream;
mod svg;
mod workspace;

pub use alloc::{heap_stats, reset_heap_peak, CountingAllocator, HeapStats};
pub use error::MemError;
pub use host::{available_host_memory, read_host_rss, HostRss};
pub use ledger::{Check, Entry, Event, Ledger};
pub use meter::{ComputeKind, CudaReading, Meters, Reading, ReadingObserver};
pub use report::{
    Fallback, Output, PhaseReport, Refusal, Report, Sample, StreamReport, TransitionReport,
    Violation, REPORT_SCHEMA_VERSION,
};
pub use session::{Budget, MemorySession, Phase};
pub use store::{
    resident_dtype, Lease, ModelId, PatchFn, PatchInPlaceFn, TensorMeta, Tier, WeightPatch,
};
pub use stream::{StreamSource, StreamSpec, StreamStats, Streamer};
pub use svg::{render_svg, write_svg};
pub use workspace::{prepare_compute_workspace, ComputeWorkspace};

/// Bytes as a short human figure with binary units (`1.50 GiB`).
pub fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Like [`fmt_bytes`], with a sign.
pub fn fmt_signed_bytes(bytes: i64) -> String {
    let sign = if bytes < 0 { "-" } else { "+" };
    format!("{sign}{}", fmt_bytes(bytes.unsigned_abs()))
}

/// Parses a byte size such as `8GiB`, `512 MiB`, `1.5GB` or `1048576`.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024f64.powi(4),
        "tb" => 1e12,
        _ => return None,
    };
    (number.is_finite() && number >= 0.0).then_some((number * scale) as u64)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place, so that a
/// reader never sees a half-written file.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<(), MemError> {
    let wrap = |source| MemError::Write {
        path: path.to_owned(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| wrap(std::io::Error::other("not a file path")))?;
    let mut temporary = path.to_owned();
    temporary.set_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    // Synced before the rename, so a crash cannot publish a file whose data was lost; any
    // failure (a full disk mid-write, a failed sync or rename) removes the temporary file,
    // which nothing else would ever clean up.
    std::fs::File::create(&temporary)
        .and_then(|mut file| {
            std::io::Write::write_all(&mut file, bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&temporary);
            wrap(e)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_and_print() {
        assert_eq!(parse_bytes("8GiB"), Some(8 << 30));
        assert_eq!(parse_bytes("512 MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("1.5GB"), Some(1_500_000_000));
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("8 parsecs"), None);
        assert_eq!(parse_bytes(""), None);
        assert_eq!(fmt_bytes(1536 << 20), "1.50 GiB");
        assert_eq!(fmt_bytes(12), "12 B");
        assert_eq!(fmt_signed_bytes(-(1 << 20)), "-1.00 MiB");
    }
}
