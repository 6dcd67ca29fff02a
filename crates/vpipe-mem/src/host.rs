//! Host memory as the kernel counts it: RssAnon, RssFile and RssShmem of this process.
//!
//! Anonymous pages are the weights and activations we own; file pages are mapped checkpoints
//! (which the kernel may drop under pressure); shared-memory pages are where pinned CUDA host
//! buffers can land. Keeping them apart is what lets a report say which tier a byte lives in.

use std::io::Read;

use crate::MemError;

/// Resident set of this process by kind, in bytes, from `/proc/self/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostRss {
    /// Anonymous resident pages (heap, anonymous mappings).
    pub anon: u64,
    /// Resident pages backed by files (mmapped checkpoints, the binary itself).
    pub file: u64,
    /// Resident shared-memory pages.
    pub shmem: u64,
}

/// Reads `/proc/self/status`. The file is read into a stack buffer, so that taking a reading
/// does not itself move the heap counters it is read next to.
pub fn read_host_rss() -> Result<HostRss, MemError> {
    const PATH: &str = "/proc/self/status";
    let mut buf = [0u8; 8192];
    let mut file = std::fs::File::open(PATH).map_err(|source| MemError::Meter {
        meter: "host",
        detail: format!("{PATH}: {source}"),
    })?;
    let mut len = 0;
    loop {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(MemError::Meter {
                    meter: "host",
                    detail: format!("{PATH}: {source}"),
                })
            }
        }
        if len == buf.len() {
            break;
        }
    }
    let text = std::str::from_utf8(&buf[..len]).map_err(|_| MemError::Meter {
        meter: "host",
        detail: format!("{PATH} is not UTF-8"),
    })?;
    let field = |key: &'static str| -> Result<u64, MemError> {
        parse_kib_field(text, key).ok_or_else(|| MemError::Meter {
            meter: "host",
            detail: format!("{PATH} has no readable {key} line"),
        })
    };
    Ok(HostRss {
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
        shmem: field("RssShmem:")?,
    })
}

/// Finds `key   1234 kB` and returns the value in bytes.
/// What the OS reports available for new allocations without swapping (`MemAvailable` in
/// `/proc/meminfo`), or `None` where it cannot be read.
pub fn available_host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_kib_field(&info, "MemAvailable:")
}

fn parse_kib_field(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let mut parts = line[key.len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kib_lines() {
        let status = "Name:\tx\nRssAnon:\t    2048 kB\nRssFile:\t  12 kB\nRssShmem:\t0 kB\n";
        assert_eq!(parse_kib_field(status, "RssAnon:"), Some(2048 * 1024));
        assert_eq!(parse_kib_field(status, "RssFile:"), Some(12 * 1024));
        assert_eq!(parse_kib_field(status, "RssShmem:"), Some(0));
        assert_eq!(parse_kib_field(status, "VmHWM:"), None);
        assert_eq!(parse_kib_field("RssAnon: 12 pages\n", "RssAnon:"), None);
    }

    #[test]
    fn reads_this_process() {
        let rss = read_host_rss().unwrap();
        assert!(rss.anon > 0 && rss.file > 0, "{rss:?}");
    }
}
