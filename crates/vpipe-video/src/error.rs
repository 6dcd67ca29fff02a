//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong reading, writing or converting a video.
///
/// Every variant that concerns a file names it, and says what was found there, so that the
/// message alone tells a user what to change.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    // ---- file system ----
    /// The file or folder could not be opened, read, created or renamed.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        /// The file or folder concerned.
        path: PathBuf,
        /// What was being done ("open", "create temporary file", "rename into place", ...).
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The input exists but is neither a regular file nor a folder: reading a FIFO or a
    /// terminal blocks until someone writes to it, and a device such as `/dev/zero` never ends,
    /// so such inputs are refused before they are opened.
    #[error("{}: not a regular file ({kind}); give a video file or a folder of PNG frames", path.display())]
    NotRegularFile {
        /// The input.
        path: PathBuf,
        /// What it is instead: `"a FIFO"`, `"a socket"`, `"a character device"`,
        /// `"a block device"`, `"a folder"` or `"an unknown file type"`.
        kind: &'static str,
    },
    /// The path runs into a loop of symbolic links (or more links than the system follows).
    #[error("{}: symbolic link loop: following its links never reaches a file", path.display())]
    SymlinkLoop {
        /// The input.
        path: PathBuf,
    },
    /// The path is a symbolic link whose target does not exist.
    #[error("{}: broken symbolic link: its target {} does not exist", path.display(), target.display())]
    BrokenSymlink {
        /// The link.
        path: PathBuf,
        /// Where it points.
        target: PathBuf,
    },
    /// The file is larger than [`crate::ReadLimits::max_file_bytes`]; it is read whole into
    /// memory, so the size is checked first.
    #[error("{}: file is {} bytes, over the limit of {} bytes for an input read into memory", path.display(), bytes, limit)]
    InputFileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// The limit it exceeds.
        limit: u64,
    },

    // ---- input format ----
    /// A header that declares a frame size or frame count past the reader's limits
    /// ([`crate::ReadLimits`]). Checked before anything is allocated for the frames, so that a
    /// tiny hostile file cannot make the process ask for gigabytes and abort.
    #[error("{}: {format} declares {}, over the limit: {limit}", path.display(), declared_size(*width, *height, *frames))]
    DeclaredSizeTooLarge {
        /// The file (for a PNG folder, the frame whose header was read).
        path: PathBuf,
        /// What declared it: `"GIF"`, `"PNG"`, `"MP4"` or `"H.264 SPS"`.
        format: &'static str,
        /// Declared frame width in pixels.
        width: u64,
        /// Declared frame height in pixels.
        height: u64,
        /// Declared (or, for a GIF, decoded so far) frame count; `None` when only the frame
        /// size was checked.
        frames: Option<u64>,
        /// The limit that is exceeded, in words, e.g. `"at most 16384 pixels per side"`.
        limit: String,
    },
    /// The decoded frames fit the limits but the system could not provide the memory.
    #[error("{}: cannot allocate {bytes} bytes for the decoded frames: {source}", path.display())]
    OutOfMemory {
        /// The input.
        path: PathBuf,
        /// The size of the refused allocation.
        bytes: usize,
        /// The allocator's refusal.
        #[source]
        source: std::collections::TryReserveError,
    },
    /// Neither an MP4, a GIF nor a folder of PNG frames.
    #[error("{}: unsupported video input: found {found}; expected an H.264 .mp4, a .gif or a folder of .png frames", path.display())]
    UnsupportedInput {
        /// The input.
        path: PathBuf,
        /// What the file looked like (its first bytes or extension).
        found: String,
    },
    /// An output path whose extension names no format this crate writes.
    #[error("{}: cannot write video with extension {extension:?}: use .mp4, .gif, or a path without extension for a folder of PNG frames", path.display())]
    UnsupportedOutput {
        /// The output path.
        path: PathBuf,
        /// Its extension.
        extension: String,
    },
    /// An MP4 without any video track.
    #[error("{}: no video track in this MP4 (found: {found})", path.display())]
    NoVideoTrack {
        /// The MP4.
        path: PathBuf,
        /// The tracks that are there, e.g. `"track 1: soun (mp4a)"`, or `"no tracks"`.
        found: String,
    },
    /// A video track coded with something other than H.264.
    #[error("{}: video track {track} uses {codec}, only H.264 (avc1) is supported; re-encode with e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`", path.display())]
    UnsupportedCodec {
        /// The MP4.
        path: PathBuf,
        /// Track id in the file.
        track: u32,
        /// The sample entry's four-character code and what it means, e.g. `"mp4v (MPEG-4 Part 2 Visual)"`.
        codec: String,
    },
    /// An H.264 profile that OpenH264 cannot decode (4:4:4, 4:2:2, 10-bit).
    #[error("{}: H.264 profile {profile} (profile_idc {profile_idc}) is not supported: OpenH264 decodes 8-bit 4:2:0 only; re-encode with `-pix_fmt yuv420p`", path.display())]
    UnsupportedProfile {
        /// The MP4.
        path: PathBuf,
        /// `profile_idc` from the SPS.
        profile_idc: u8,
        /// Its name, e.g. `"High 4:4:4 Predictive"`.
        profile: String,
    },
    /// The file ends before the data its headers announce.
    #[error("{}: truncated file: {detail}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Which structure runs past the end.
        detail: String,
    },
    /// A container that is malformed in some other way.
    #[error("{}: malformed {format}: {detail}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// `"MP4"`, `"GIF"`, `"PNG"`.
        format: &'static str,
        /// What the parser reported.
        detail: String,
    },
    /// The H.264 decoder rejected a sample.
    #[error("{}: H.264 decoder rejected sample {sample} of {samples}: {detail}", path.display())]
    Decode {
        /// The MP4.
        path: PathBuf,
        /// Zero-based sample index in decode order.
        sample: usize,
        /// Number of samples in the track.
        samples: usize,
        /// OpenH264's message.
        detail: String,
    },
    /// A folder that holds no PNG frames.
    #[error("{}: no .png frames in this folder (found {found})", path.display())]
    EmptyFolder {
        /// The folder.
        path: PathBuf,
        /// What is there instead, e.g. `"nothing"` or `"3 other files"`.
        found: String,
    },
    /// A frame whose size differs from the first frame's.
    #[error("{}: frame {frame} is {got_width}x{got_height}, but the first frame is {width}x{height}", path.display())]
    FrameSizeMismatch {
        /// The file (a PNG in a folder, or the video).
        path: PathBuf,
        /// Zero-based frame index.
        frame: usize,
        /// Width of the first frame.
        width: u32,
        /// Height of the first frame.
        height: u32,
        /// Width of this frame.
        got_width: u32,
        /// Height of this frame.
        got_height: u32,
    },

    // ---- output ----
    /// The H.264 encoder failed or the frames cannot be H.264 4:2:0 coded.
    #[error("{}: cannot encode H.264: {detail}", path.display())]
    Encode {
        /// The output file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// Writing a GIF or PNG frame failed.
    #[error("{}: cannot write {format}: {detail}", path.display())]
    ImageWrite {
        /// The output file.
        path: PathBuf,
        /// `"GIF"` or `"PNG"`.
        format: &'static str,
        /// What the encoder reported.
        detail: String,
    },
    /// The caller asked the write to stop ([`crate::WriteOptions::stop`]); nothing was left at
    /// the output path or beside it.
    #[error("{}: writing stopped (interrupted); no output was left", path.display())]
    Stopped {
        /// The output that was being written.
        path: PathBuf,
    },
    /// A PNG-folder output path that already holds files.
    #[error("{}: output folder exists and is not empty; choose a new path or remove it", path.display())]
    OutputFolderNotEmpty {
        /// The folder.
        path: PathBuf,
    },

    // ---- in-memory video and tensors ----
    /// A [`crate::Video`] built from inconsistent parts.
    #[error("invalid video: {0}")]
    InvalidVideo(String),
    /// A tensor that is not a `[1, 3, T, H, W]` video.
    #[error("expected a video tensor of shape [1, 3, T, H, W], got {got:?}")]
    TensorShape {
        /// The tensor's dimensions.
        got: Vec<usize>,
    },
    /// candle failed while building or reading a tensor.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// `"832x480 pixels"` or `"832x480 pixels x 81 frames"`.
fn declared_size(width: u64, height: u64, frames: Option<u64>) -> String {
    match frames {
        Some(n) => format!("{width}x{height} pixels x {n} frames"),
        None => format!("{width}x{height} pixels"),
    }
}

/// Result with [`VideoError`].
pub type Result<T> = std::result::Result<T, VideoError>;

impl VideoError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            op,
            source,
        }
    }
}
