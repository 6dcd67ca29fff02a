/*!
Video in and out for vpipe, without a system ffmpeg.

- **Read** ([`read_video`]): H.264 in MP4 (`mp4` demux, OpenH264 decode, 8-bit 4:2:0 including
  High profile with B-frames, frames in display order), animated GIF, or a folder of PNG frames
  (sorted by name, numbers compared as numbers).
- **Write** ([`write_video`]), chosen by extension: `.mp4` (OpenH264 Constrained Baseline at an
  explicit bitrate, BT.601 limited range signalled in the VUI, exact duration), `.gif`, or a path
  without extension for a folder of `frame_00000.png`, ... Output goes to a hidden
  `.NAME.*.partial` file or folder next to the target and is renamed into place only when
  complete, so an interrupted or failed write never leaves a half-written video.
- **Tensors**: [`to_tensor`] / [`from_tensor`] convert between a [`Video`] and the
  `[1, 3, T, H, W]` f32 tensor in [-1, 1] that Wan's VAE uses; [`fit_to_4k_plus_1`] and
  [`resize_center_crop`] fit a clip to Wan's frame-count and size rules.

Unsupported input (another codec, High 4:4:4, no video track, a truncated file, an empty folder,
frames of different sizes) is a [`VideoError`] naming the file and what was found.

Inputs are untrusted: only regular files and folders are opened (a FIFO, socket or device is
refused before opening, so a read never blocks), and every frame size and frame count a header
declares (GIF screen, PNG IHDR, MP4 sample entry and sample count, every H.264 SPS) is checked
against [`ReadLimits`] before anything is allocated for it. Corrupt files give errors, not
panics; `tests/fuzz_readers.rs` holds the readers to that.

OpenH264 is built from source (the `openh264` crate's `source` feature). Building from source
makes the builder, not Cisco, responsible for H.264 patent licensing. With `nasm` installed
before the first build its assembly kernels are used (encode ≈ 2.7× faster); without, the build
falls back to C silently.

```no_run
use vpipe_video::{read_video, to_tensor, from_tensor, write_video, WriteOptions};
use candle_core::Device;

let mut video = read_video("input.mp4")?;
if let Some(notice) = video.trim_to_4k_plus_1().notice() {
    eprintln!("{notice}");
}
let video = vpipe_video::resize_center_crop(&video, 832, 480)?;
let x = to_tensor(&video, &Device::Cpu)?; // [1, 3, T, 480, 832]
let out = from_tensor(&x, video.fps())?;
write_video("output.mp4", &out, &WriteOptions::default())?;
# Ok::<(), Box<dyn std::error::Error>>(())
```
*/
// One `unsafe` block (mp4io::quiet_encoder_log) sets an OpenH264 option the wrapper lacks.
#![deny(missing_docs, unreachable_pub, unsafe_code)]

mod error;
mod images;
mod input;
mod limits;
mod mp4io;
mod video;

use std::io::{BufWriter, Write};
use std::path::Path;

pub use error::{Result, VideoError};
pub use limits::{ReadLimits, MAX_DECODED_BYTES, MAX_FRAMES, MAX_FRAME_SIDE, MAX_INPUT_FILE_BYTES};
pub use mp4io::{default_bitrate, Mp4Info};
pub use video::{
    fit_to_4k_plus_1, from_tensor, resize_center_crop, to_tensor, FrameFit, Video, DEFAULT_FPS,
};

/// Settings for [`write_video`].
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// H.264 target bitrate in bits per second; `None` uses [`default_bitrate`]
    /// (0.65 bits per pixel per frame, ≈ 4.2 Mbps at 832×480 and 16 fps).
    pub bitrate_bps: Option<u32>,
    /// GIF colour quantisation speed, 1 (best, slowest) to 30; `None` uses 10.
    pub gif_speed: Option<i32>,
    /// A flag the caller sets to stop the write (Ctrl-C): checked before each frame, it ends
    /// the write with [`VideoError::Stopped`] and removes the temporary file or folder.
    pub stop: Option<&'static std::sync::atomic::AtomicBool>,
}

/// [`VideoError::Stopped`] for `path` once `stop` is set.
pub(crate) fn check_stop(stop: Option<&std::sync::atomic::AtomicBool>, path: &Path) -> Result<()> {
    match stop {
        Some(flag) if flag.load(std::sync::atomic::Ordering::Relaxed) => Err(VideoError::Stopped {
            path: path.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

const DEFAULT_GIF_SPEED: i32 = 10;

/// Reads a video: an H.264 `.mp4`, a `.gif`, or a folder of `.png` frames.
///
/// Files are recognised by their content, not their extension. A PNG folder has no frame rate
/// and gets [`DEFAULT_FPS`]; change it with [`Video::set_fps`]. A GIF's rate is its frame count
/// over its total delay. The whole file is read into memory.
///
/// Only regular files and folders are read: a FIFO, socket or device is a
/// [`VideoError::NotRegularFile`] before anything is opened. A folder's frames are its regular
/// files ending in `.png` (any case), in natural name order. Sizes and frame counts that
/// headers declare are checked against [`ReadLimits::default`] before anything is allocated for
/// them; use [`read_video_with_limits`] for other limits.
pub fn read_video(path: impl AsRef<Path>) -> Result<Video> {
    read_video_with_limits(path, &ReadLimits::default())
}

/// [`read_video`] with explicit limits on frame size, frame count, decoded bytes and file size,
/// e.g. tighter ones derived from a memory budget.
pub fn read_video_with_limits(path: impl AsRef<Path>, limits: &ReadLimits) -> Result<Video> {
    let path = path.as_ref();
    if let input::InputKind::Folder = input::classify(path)? {
        return images::read_png_folder(path, limits);
    }
    let bytes = input::read_regular_file(path, limits.max_file_bytes)?;
    match sniff(&bytes) {
        Kind::Mp4 => mp4io::read(path, &bytes, limits),
        Kind::Gif => images::read_gif(path, &bytes, limits),
        Kind::Other(found) => Err(VideoError::UnsupportedInput {
            path: path.to_path_buf(),
            found,
        }),
    }
}

/// Reads one still image, PNG or JPEG (recognised by content), as a video of one frame at
/// [`DEFAULT_FPS`]. Its declared size is checked against [`ReadLimits::default`] before any
/// pixel is decoded; CMYK JPEGs are refused ([`VideoError::Malformed`]).
pub fn read_image(path: impl AsRef<Path>) -> Result<Video> {
    read_image_with_limits(path, &ReadLimits::default())
}

/// [`read_image`] with explicit limits on the image's size and the file's.
pub fn read_image_with_limits(path: impl AsRef<Path>, limits: &ReadLimits) -> Result<Video> {
    images::read_image(path.as_ref(), limits)
}

/// How many frames [`read_video`] would return: an MP4's from its header, without decoding; a
/// GIF or a PNG folder by reading it.
pub fn count_frames(path: impl AsRef<Path>) -> Result<usize> {
    let path = path.as_ref();
    match probe_mp4(path) {
        Ok(info) => Ok(info.frames),
        Err(_) => Ok(read_video(path)?.num_frames()),
    }
}

/// Reads an MP4's header: codec, size, frame count, frame rate and durations, without decoding.
///
/// Fails like [`read_video`] on files it could not decode for header reasons (no video track,
/// another codec, an unsupported H.264 profile, truncation).
pub fn probe_mp4(path: impl AsRef<Path>) -> Result<Mp4Info> {
    let path = path.as_ref();
    let limits = ReadLimits::default();
    let bytes = input::read_regular_file(path, limits.max_file_bytes)?;
    match sniff(&bytes) {
        Kind::Mp4 => mp4io::probe(path, &bytes, &limits),
        Kind::Gif => Err(VideoError::UnsupportedInput {
            path: path.to_path_buf(),
            found: "a GIF, not an MP4".into(),
        }),
        Kind::Other(found) => Err(VideoError::UnsupportedInput {
            path: path.to_path_buf(),
            found,
        }),
    }
}

enum Kind {
    Mp4,
    Gif,
    Other(String),
}

fn sniff(bytes: &[u8]) -> Kind {
    if bytes.is_empty() {
        return Kind::Other("an empty file".into());
    }
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return Kind::Gif;
    }
    // ISO-BMFF files start with a box; 'ftyp' normally, some writers begin with others.
    if let Some(kind) = bytes.get(4..8) {
        if [b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"]
            .iter()
            .any(|k| k.as_slice() == kind)
        {
            return Kind::Mp4;
        }
    }
    let what = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        "a single PNG image (put frames in a folder to read them as a video)".to_string()
    } else if bytes.starts_with(b"\x1aE\xdf\xa3") {
        "a Matroska/WebM file".to_string()
    } else if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"AVI ") {
        "an AVI file".to_string()
    } else if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        "a WebP image".to_string()
    } else if bytes.starts_with(&[0, 0, 0, 1]) || bytes.starts_with(&[0, 0, 1]) {
        "a raw H.264/HEVC elementary stream (mux it into an MP4 first)".to_string()
    } else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!(
            "unrecognised content starting with bytes {}",
            head.join(" ")
        )
    };
    Kind::Other(what)
}

enum OutKind {
    Mp4,
    Gif,
    PngFolder,
}

/// Writes a video; the format follows the extension: `.mp4`, `.gif`, or none for a folder of
/// PNG frames (`frame_00000.png`, ...).
///
/// The data goes to a temporary `.NAME.*.partial` file or folder in the target's directory and is
/// renamed onto `path` only when complete: an existing file at `path` is replaced atomically, an
/// error leaves nothing behind. A folder target must not exist or be empty.
/// MP4 needs even width and height (H.264 4:2:0) and at most 3840×2160.
pub fn write_video(path: impl AsRef<Path>, video: &Video, options: &WriteOptions) -> Result<()> {
    let path = path.as_ref();
    let kind = match path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
    {
        None => OutKind::PngFolder,
        Some(e) if e == "mp4" => OutKind::Mp4,
        Some(e) if e == "gif" => OutKind::Gif,
        Some(e) => {
            return Err(VideoError::UnsupportedOutput {
                path: path.to_path_buf(),
                extension: e,
            })
        }
    };
    match kind {
        OutKind::Mp4 => write_file_atomically(path, |file| {
            let out = mp4io::write(
                BufWriter::new(file),
                path,
                video,
                options.bitrate_bps,
                options.stop,
            )?;
            out.into_inner()
                .map_err(|e| VideoError::io(path, "write", e.into_error()))?;
            Ok(())
        }),
        OutKind::Gif => write_file_atomically(path, |file| {
            let speed = options.gif_speed.unwrap_or(DEFAULT_GIF_SPEED);
            let out = images::write_gif(file, path, video, speed, options.stop)?;
            out.flush().map_err(|e| VideoError::io(path, "write", e))
        }),
        OutKind::PngFolder => write_folder_atomically(path, video, options.stop),
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary file or folder untouched for this long belongs to a writer that is gone (killed
/// mid-write: SIGKILL, a power cut); a live writer touches its file with every frame.
const STALE_PARTIAL_AGE: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Removes the temporary files and folders (`{prefix}*.partial`) that writers of the same
/// target left in `dir` when they were killed. Age is the rule, not the writer's pid, which
/// says nothing across pid namespaces or hosts sharing the folder. Errors are ignored: another
/// writer may remove the same leftover, which only ever costs disk space.
fn remove_stale_partials(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(prefix) && name.ends_with(".partial")) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let age = meta.modified().ok().and_then(|m| m.elapsed().ok());
        if age.is_some_and(|age| age > STALE_PARTIAL_AGE) {
            let _ = if meta.is_dir() {
                std::fs::remove_dir_all(entry.path())
            } else {
                std::fs::remove_file(entry.path())
            };
        }
    }
}

fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "video".into());
    format!(".{name}.")
}

/// Runs `write` on a temporary file beside `path`, then syncs and renames it onto `path`.
/// Any error drops the temporary file, which deletes it.
fn write_file_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    let dir = parent_dir(path);
    let prefix = temp_prefix(path);
    remove_stale_partials(dir, &prefix);
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".partial");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // tempfile's 0600 would otherwise become the video's mode.
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder
        .tempfile_in(dir)
        .map_err(|e| VideoError::io(path, "create temporary file beside it", e))?;
    write(tmp.as_file_mut())?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| VideoError::io(tmp.path(), "sync", e))?;
    tmp.persist(path)
        .map_err(|e| VideoError::io(path, "rename into place", e.error))?;
    Ok(())
}

/// Writes PNG frames into a temporary folder beside `path`, then renames it onto `path`.
fn write_folder_atomically(
    path: &Path,
    video: &Video,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<()> {
    if let Ok(mut entries) = std::fs::read_dir(path) {
        if entries.next().is_some() {
            return Err(VideoError::OutputFolderNotEmpty {
                path: path.to_path_buf(),
            });
        }
    }
    let dir = parent_dir(path);
    let prefix = temp_prefix(path);
    remove_stale_partials(dir, &prefix);
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".partial");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o755));
    }
    let tmp = builder
        .tempdir_in(dir)
        .map_err(|e| VideoError::io(path, "create temporary folder beside it", e))?;
    images::write_png_folder(tmp.path(), path, video, stop)?;
    // Replaces `path` only if it is missing or an empty folder; anything else fails here and
    // the temporary folder is removed when `tmp` drops.
    std::fs::rename(tmp.path(), path).map_err(|e| VideoError::io(path, "rename into place", e))?;
    // Renamed away: nothing left for the guard to delete.
    let _ = tmp.keep();
    Ok(())
}
