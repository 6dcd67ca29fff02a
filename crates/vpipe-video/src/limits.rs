//! Caps on what a reader will allocate for one input, checked against the sizes a file's
//! headers declare before any buffer is sized by them.
//!
//! Header fields are untrusted: a 35-byte GIF can declare a 65535×65535 screen, an MP4 a
//! 65535×65535 track of 4 billion samples. Without a check first, the decoders would ask the
//! allocator for those sizes and the process would abort. The defaults are far past any real
//! input of this tool (Wan works at 832×480 or 1280×720 with 81 frames) and still bounded.

use std::path::Path;

use crate::error::{Result, VideoError};

/// Largest frame width or height any reader accepts, in pixels: 16384, four times a 4K frame's
/// width. Past every camera and every size Wan can use, and it keeps one RGBA frame under 1 GiB.
pub const MAX_FRAME_SIDE: u32 = 16_384;

/// Most frames one input may hold: 2^20 (over 9 hours at 30 fps). Guards against files of many
/// tiny frames, where the byte cap alone would allow millions of decoder calls.
pub const MAX_FRAMES: usize = 1 << 20;

/// Most bytes of decoded 8-bit RGB frames one input may produce: 16 GiB (e.g. about 7 minutes of
/// 832×480 at 30 fps, or 2,900 frames of 1920×1080), far past a Wan clip of 81 frames.
pub const MAX_DECODED_BYTES: u64 = 16 << 30;

/// Largest input file read into memory: 4 GiB, over an hour of 1080p H.264 at 8 Mbps.
pub const MAX_INPUT_FILE_BYTES: u64 = 4 << 30;

/// Limits the readers enforce ([`crate::read_video_with_limits`]); [`crate::read_video`] uses
/// [`ReadLimits::default`], which takes the `MAX_*` constants of this crate.
///
/// Every check happens before the memory it guards is allocated: a header that declares more
/// than these limits is a [`VideoError::DeclaredSizeTooLarge`] naming the file, the declared
/// size and the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Largest frame width or height in pixels ([`MAX_FRAME_SIDE`]).
    pub max_frame_side: u32,
    /// Most frames ([`MAX_FRAMES`]).
    pub max_frames: usize,
    /// Most bytes of decoded RGB frames, width × height × 3 × frames ([`MAX_DECODED_BYTES`]).
    pub max_decoded_bytes: u64,
    /// Largest input file, which is read whole into memory ([`MAX_INPUT_FILE_BYTES`]).
    pub max_file_bytes: u64,
}

impl Default for ReadLimits {
    fn default() -> Self {
        Self {
            max_frame_side: MAX_FRAME_SIDE,
            max_frames: MAX_FRAMES,
            max_decoded_bytes: MAX_DECODED_BYTES,
            max_file_bytes: MAX_INPUT_FILE_BYTES,
        }
    }
}

impl ReadLimits {
    /// Checks a declared frame size, and frame count when known (`None` checks one frame), and
    /// returns the decoded size in bytes (`width * height * 3 * frames`), which then fits in
    /// memory's address space.
    pub(crate) fn check(
        &self,
        path: &Path,
        format: &'static str,
        width: u64,
        height: u64,
        frames: Option<u64>,
    ) -> Result<usize> {
        let refuse = |limit: String| VideoError::DeclaredSizeTooLarge {
            path: path.to_path_buf(),
            format,
            width,
            height,
            frames,
            limit,
        };
        let max_side = u64::from(self.max_frame_side);
        if width > max_side || height > max_side {
            return Err(refuse(format!("at most {max_side} pixels per side")));
        }
        let max_frames = u64::try_from(self.max_frames).unwrap_or(u64::MAX);
        if frames.is_some_and(|n| n > max_frames) {
            return Err(refuse(format!("at most {max_frames} frames")));
        }
        let bytes = width
            .checked_mul(height)
            .and_then(|px| px.checked_mul(3))
            .and_then(|b| b.checked_mul(frames.unwrap_or(1)));
        let over = || {
            let needed = bytes.map_or("more than 2^64 bytes".to_string(), human_bytes);
            refuse(format!(
                "at most {} of decoded RGB frames ({needed} needed)",
                human_bytes(self.max_decoded_bytes)
            ))
        };
        match bytes {
            Some(b) if b <= self.max_decoded_bytes => usize::try_from(b).map_err(|_| over()),
            _ => Err(over()),
        }
    }
}

/// `"16 GiB"`, `"1.5 MiB"`, `"120 bytes"`.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_sizes_are_checked_without_overflow() {
        let limits = ReadLimits::default();
        let p = Path::new("x.gif");
        assert_eq!(
            limits.check(p, "GIF", 832, 480, Some(81)).unwrap(),
            832 * 480 * 3 * 81
        );
        let err = limits.check(p, "GIF", 65535, 65535, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("65535x65535 pixels, over the limit: at most 16384 pixels per side"),
            "{err}"
        );
        let err = limits
            .check(p, "MP4", 16384, 16384, Some(u64::MAX))
            .unwrap_err();
        assert!(err.to_string().contains("at most 1048576 frames"), "{err}");
        let err = limits
            .check(p, "MP4", 16384, 16384, Some(100_000))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("at most 16 GiB of decoded RGB frames (73.2 TiB needed)"),
            "{err}"
        );
        let huge = ReadLimits {
            max_frame_side: u32::MAX,
            max_frames: usize::MAX,
            max_decoded_bytes: u64::MAX,
            ..limits
        };
        let err = huge
            .check(p, "MP4", u64::from(u32::MAX), u64::from(u32::MAX), Some(3))
            .unwrap_err();
        assert!(err.to_string().contains("more than 2^64 bytes"), "{err}");
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(human_bytes(120), "120 bytes");
        assert_eq!(human_bytes(16 << 30), "16 GiB");
        assert_eq!(human_bytes(3 << 19), "1.5 MiB");
    }
}
