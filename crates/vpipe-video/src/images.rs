//! Animated GIF and folders of PNG frames, through the `image` crate.

use std::io::{BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use image::codecs::gif::{GifDecoder, GifEncoder, Repeat};
use image::codecs::png::PngEncoder;
use image::{AnimationDecoder, Delay, ExtendedColorType, ImageDecoder, ImageEncoder, RgbaImage};

use crate::error::{Result, VideoError};
use crate::input;
use crate::limits::ReadLimits;
use crate::video::{Video, DEFAULT_FPS};

// ---------------------------------------------------------------------------------------------
// GIF

/// Browsers play GIF delays of 0 or 10 ms as 100 ms; so does this reader.
const GIF_MIN_DELAY_MS: f64 = 20.0;
const GIF_FALLBACK_DELAY_MS: f64 = 100.0;

/// Logical screen size from a GIF's header (bytes 6..10, little-endian), which sets the size of
/// every decoded frame.
fn gif_screen_size(bytes: &[u8]) -> Option<(u64, u64)> {
    let field = |at: usize| {
        let b = bytes.get(at..at + 2)?;
        Some(u64::from(u16::from_le_bytes([b[0], b[1]])))
    };
    Some((field(6)?, field(8)?))
}

/// Allocation cap handed to the `image` crate for one GIF: its frame iterator keeps the
/// composited canvas and, per frame, the frame's own pixels and a new canvas, all RGBA. Four
/// canvases leave room for frames somewhat larger than the screen (which some writers produce)
/// while a frame descriptor declaring 65535×65535 inside a small screen is refused.
fn gif_decoder_limits(width: u64, height: u64, limits: &ReadLimits) -> image::Limits {
    const MIN_BUDGET: u64 = 1 << 20;
    let canvas = width.saturating_mul(height).saturating_mul(4);
    let mut out = image::Limits::no_limits();
    out.max_image_width = Some(limits.max_frame_side);
    out.max_image_height = Some(limits.max_frame_side);
    out.max_alloc = Some(canvas.saturating_mul(4).max(MIN_BUDGET));
    out
}

pub(crate) fn read_gif(path: &Path, bytes: &[u8], limits: &ReadLimits) -> Result<Video> {
    let malformed = |e: image::ImageError| VideoError::Malformed {
        path: path.to_path_buf(),
        format: "GIF",
        detail: e.to_string(),
    };
    let Some((screen_w, screen_h)) = gif_screen_size(bytes) else {
        return Err(VideoError::Truncated {
            path: path.to_path_buf(),
            detail: format!("GIF of {} bytes ends inside its header", bytes.len()),
        });
    };
    // The decoder allocates a canvas of the screen's size at the first frame: check it first.
    limits.check(path, "GIF", screen_w, screen_h, None)?;
    let mut decoder = GifDecoder::new(std::io::Cursor::new(bytes)).map_err(malformed)?;
    decoder
        .set_limits(gif_decoder_limits(screen_w, screen_h, limits))
        .map_err(malformed)?;
    let mut data: Vec<u8> = Vec::new();
    let mut size = None;
    let mut total_ms = 0.0;
    let mut count = 0usize;
    // Frames come composited onto the full canvas, disposal applied.
    for frame in decoder.into_frames() {
        // The `image` crate reports a cut-off GIF as a format error; a GIF that fails and lacks
        // its trailer byte (0x3B) was cut off.
        let frame = frame.map_err(|e| match e {
            _ if bytes.last() != Some(&0x3b) => VideoError::Truncated {
                path: path.to_path_buf(),
                detail: format!("GIF ends inside frame {count} ({e})"),
            },
            other => malformed(other),
        })?;
        let (n, d) = frame.delay().numer_denom_ms();
        let ms = f64::from(n) / f64::from(d.max(1));
        total_ms += if ms < GIF_MIN_DELAY_MS {
            GIF_FALLBACK_DELAY_MS
        } else {
            ms
        };
        let rgba = frame.into_buffer();
        let dims = rgba.dimensions();
        let (w, h) = *size.get_or_insert(dims);
        if dims != (w, h) {
            return Err(VideoError::FrameSizeMismatch {
                path: path.to_path_buf(),
                frame: count,
                width: w,
                height: h,
                got_width: dims.0,
                got_height: dims.1,
            });
        }
        // A GIF declares no frame count: the clip's total is checked as it grows, before each
        // frame is added.
        let frames = u64::try_from(count + 1).unwrap_or(u64::MAX);
        let clip_len = limits.check(path, "GIF", u64::from(w), u64::from(h), Some(frames))?;
        let ceiling = usize::try_from(limits.max_decoded_bytes).unwrap_or(usize::MAX);
        reserve_within(&mut data, clip_len, ceiling).map_err(|source| VideoError::OutOfMemory {
            path: path.to_path_buf(),
            bytes: clip_len,
            source,
        })?;
        data.extend(rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]));
        count += 1;
    }
    let Some((w, h)) = size else {
        return Err(VideoError::Malformed {
            path: path.to_path_buf(),
            format: "GIF",
            detail: "no frames".into(),
        });
    };
    let fps = count as f64 * 1000.0 / total_ms;
    Video::new(data, w, h, fps).map_err(|e| VideoError::Malformed {
        path: path.to_path_buf(),
        format: "GIF",
        detail: e.to_string(),
    })
}

/// Makes room for `data` to reach `needed` bytes, growing geometrically (so that appending frame
/// by frame stays linear) but never past `ceiling` (the decoded-bytes limit, `>= needed`), and
/// reporting a refused allocation instead of aborting.
fn reserve_within(
    data: &mut Vec<u8>,
    needed: usize,
    ceiling: usize,
) -> std::result::Result<(), std::collections::TryReserveError> {
    if needed <= data.capacity() {
        return Ok(());
    }
    let target = data.capacity().saturating_mul(2).min(ceiling).max(needed);
    data.try_reserve_exact(target.saturating_sub(data.len()))
}

/// GIF delays are whole centiseconds; frame `i` gets the difference of the rounded cumulative
/// times, so the total stays within 10 ms of frames / fps (16 fps → 6, 6, 7, 6, ... cs).
fn gif_delay_cs(i: usize, fps: f64) -> u32 {
    let at = |k: usize| (k as f64 * 100.0 / fps).round();
    (at(i + 1) - at(i)).max(1.0) as u32
}

pub(crate) fn write_gif<W: Write>(
    out: W,
    path: &Path,
    video: &Video,
    speed: i32,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<W> {
    let gif_error = |e: image::ImageError| match e {
        image::ImageError::IoError(source) => VideoError::io(path, "write", source),
        other => VideoError::ImageWrite {
            path: path.to_path_buf(),
            format: "GIF",
            detail: other.to_string(),
        },
    };
    if video.width() > u32::from(u16::MAX) || video.height() > u32::from(u16::MAX) {
        return Err(VideoError::ImageWrite {
            path: path.to_path_buf(),
            format: "GIF",
            detail: format!(
                "frame size {}x{} exceeds GIF's 65535 limit",
                video.width(),
                video.height()
            ),
        });
    }
    let mut out = BufWriter::new(out);
    {
        let mut encoder = GifEncoder::new_with_speed(&mut out, speed.clamp(1, 30));
        encoder.set_repeat(Repeat::Infinite).map_err(gif_error)?;
        for (i, frame) in video.frames().enumerate() {
            crate::check_stop(stop, path)?;
            let rgba = RgbaImage::from_fn(video.width(), video.height(), |x, y| {
                let o = ((y * video.width() + x) * 3) as usize;
                image::Rgba([frame[o], frame[o + 1], frame[o + 2], 255])
            });
            let delay = Delay::from_numer_denom_ms(gif_delay_cs(i, video.fps()) * 10, 1);
            encoder
                .encode_frame(image::Frame::from_parts(rgba, 0, 0, delay))
                .map_err(gif_error)?;
        }
    }
    out.into_inner()
        .map_err(|e| VideoError::io(path, "write", e.into_error()))
}

// ---------------------------------------------------------------------------------------------
// PNG folder

/// Name order that puts `frame_2` before `frame_10`: runs of digits compare as numbers.
fn natural_key(name: &str) -> Vec<(u8, u128, String)> {
    let mut key = Vec::new();
    let mut chars = name.chars().peekable();
    while let Some(&c) = chars.peek() {
        let mut run = String::new();
        if c.is_ascii_digit() {
            while let Some(&d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                run.push(d);
                chars.next();
            }
            // Too long for u128: fall back to comparing the digits as text after the number.
            let value = run.parse::<u128>().unwrap_or(u128::MAX);
            key.push((0, value, run));
        } else {
            while let Some(&d) = chars.peek().filter(|d| !d.is_ascii_digit()) {
                run.push(d);
                chars.next();
            }
            key.push((1, 0, run));
        }
    }
    key
}

fn is_png(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
}

/// Reads the regular `*.png` files of `dir` (extension in any case) as frames in natural name
/// order. Entries that are not regular files (a FIFO named `x.png`, a sub-folder, a broken link)
/// are skipped without being opened.
pub(crate) fn read_png_folder(dir: &Path, limits: &ReadLimits) -> Result<Video> {
    let entries = std::fs::read_dir(dir).map_err(|e| VideoError::io(dir, "list folder", e))?;
    let mut pngs: Vec<PathBuf> = Vec::new();
    let mut others = 0usize;
    for entry in entries {
        let entry = entry.map_err(|e| VideoError::io(dir, "list folder", e))?;
        let p = entry.path();
        // `metadata` follows links: a link to a regular PNG counts, a link to anything else not.
        let regular = is_png(&p) && std::fs::metadata(&p).is_ok_and(|m| m.is_file());
        if regular {
            pngs.push(p);
        } else {
            others += 1;
        }
    }
    if pngs.is_empty() {
        return Err(VideoError::EmptyFolder {
            path: dir.to_path_buf(),
            found: match others {
                0 => "nothing".into(),
                1 => "1 other entry".into(),
                n => format!("{n} other entries"),
            },
        });
    }
    pngs.sort_by_cached_key(|p| natural_key(&p.file_name().unwrap_or_default().to_string_lossy()));
    let frames = u64::try_from(pngs.len()).unwrap_or(u64::MAX);
    let mut data: Vec<u8> = Vec::new();
    let mut size = None;
    for (i, p) in pngs.iter().enumerate() {
        let frame = open_png_frame(p)?;
        let dims = (frame.width, frame.height);
        let (w, h) = match size {
            Some(first) => first,
            None => {
                // The first header fixes every frame's size: check the whole clip against the
                // limits and reserve it at once, before any pixel is decoded.
                let total =
                    limits.check(p, "PNG", u64::from(dims.0), u64::from(dims.1), Some(frames))?;
                data.try_reserve_exact(total)
                    .map_err(|source| VideoError::OutOfMemory {
                        path: dir.to_path_buf(),
                        bytes: total,
                        source,
                    })?;
                *size.insert(dims)
            }
        };
        if dims != (w, h) {
            return Err(VideoError::FrameSizeMismatch {
                path: p.clone(),
                frame: i,
                width: w,
                height: h,
                got_width: dims.0,
                got_height: dims.1,
            });
        }
        let img = decode_png(p, frame, limits)?;
        data.extend_from_slice(img.as_raw());
    }
    let Some((w, h)) = size else {
        // Unreachable: `pngs` is not empty and every iteration sets the size or returns.
        return Err(VideoError::EmptyFolder {
            path: dir.to_path_buf(),
            found: "nothing".into(),
        });
    };
    Video::new(data, w, h, DEFAULT_FPS).map_err(|e| VideoError::Malformed {
        path: dir.to_path_buf(),
        format: "PNG",
        detail: e.to_string(),
    })
}

fn png_error(path: &Path, e: image::ImageError) -> VideoError {
    match e {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            VideoError::Truncated {
                path: path.to_path_buf(),
                detail: "PNG ends early".into(),
            }
        }
        other => VideoError::Malformed {
            path: path.to_path_buf(),
            format: "PNG",
            detail: other.to_string(),
        },
    }
}

const PNG_SIGNATURE: [u8; 8] = *b"\x89PNG\r\n\x1a\n";

/// One opened frame whose header has been read, nothing else.
struct PngFrame {
    file: std::fs::File,
    width: u32,
    height: u32,
}

/// Opens a frame (a regular file only) and reads its declared size from the IHDR chunk, which
/// PNG requires to come first: 24 bytes, before the image decoder sizes anything by it.
fn open_png_frame(path: &Path) -> Result<PngFrame> {
    let (mut file, _) = input::open_regular_file(path)?;
    let mut head = [0u8; 24];
    file.read_exact(&mut head).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => VideoError::Truncated {
            path: path.to_path_buf(),
            detail: "PNG ends inside its header".into(),
        },
        _ => VideoError::io(path, "read", e),
    })?;
    let malformed = |detail: &str| VideoError::Malformed {
        path: path.to_path_buf(),
        format: "PNG",
        detail: detail.into(),
    };
    if head[..8] != PNG_SIGNATURE {
        return Err(malformed("not a PNG image (no PNG signature at its start)"));
    }
    if &head[12..16] != b"IHDR" {
        return Err(malformed("the first chunk is not IHDR"));
    }
    let width = u32::from_be_bytes([head[16], head[17], head[18], head[19]]);
    let height = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
    file.seek(std::io::SeekFrom::Start(0))
        .map_err(|e| VideoError::io(path, "seek", e))?;
    Ok(PngFrame {
        file,
        width,
        height,
    })
}

/// Decodes one frame whose declared size was checked, to RGB, with the `image` crate's own
/// allocation limits set to what that size needs (16-bit RGBA at most, plus room for ancillary
/// chunks), so that a file lying about itself still cannot allocate more.
fn decode_png(path: &Path, frame: PngFrame, limits: &ReadLimits) -> Result<image::RgbImage> {
    const ANCILLARY_BUDGET: u64 = 64 << 20;
    let mut decode_limits = image::Limits::no_limits();
    decode_limits.max_image_width = Some(limits.max_frame_side);
    decode_limits.max_image_height = Some(limits.max_frame_side);
    decode_limits.max_alloc = Some(
        (u64::from(frame.width) * u64::from(frame.height))
            .saturating_mul(8)
            .saturating_add(ANCILLARY_BUDGET),
    );
    let mut reader = image::ImageReader::with_format(
        std::io::BufReader::new(frame.file),
        image::ImageFormat::Png,
    );
    reader.limits(decode_limits);
    let image = reader.decode().map_err(|e| png_error(path, e))?.into_rgb8();
    if image.dimensions() != (frame.width, frame.height) {
        return Err(VideoError::Malformed {
            path: path.to_path_buf(),
            format: "PNG",
            detail: format!(
                "decoded {}x{} pixels, the header declares {}x{}",
                image.width(),
                image.height(),
                frame.width,
                frame.height
            ),
        });
    }
    Ok(image)
}

/// File name of frame `i` in a written folder; zero-padded so plain name order works too.
pub(crate) fn frame_file_name(i: usize) -> String {
    format!("frame_{i:05}.png")
}

pub(crate) fn write_png_folder(
    dir: &Path,
    final_path: &Path,
    video: &Video,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<()> {
    for (i, frame) in video.frames().enumerate() {
        crate::check_stop(stop, final_path)?;
        let file = dir.join(frame_file_name(i));
        let f = std::fs::File::create(&file).map_err(|e| VideoError::io(&file, "create", e))?;
        let mut w = BufWriter::new(f);
        PngEncoder::new(&mut w)
            .write_image(
                frame,
                video.width(),
                video.height(),
                ExtendedColorType::Rgb8,
            )
            .map_err(|e| match e {
                image::ImageError::IoError(source) => VideoError::io(&file, "write", source),
                other => VideoError::ImageWrite {
                    path: final_path.join(frame_file_name(i)),
                    format: "PNG",
                    detail: other.to_string(),
                },
            })?;
        w.flush().map_err(|e| VideoError::io(&file, "write", e))?;
    }
    Ok(())
}

/// Reads one still image, PNG or JPEG (by content), as a video of one frame.
pub(crate) fn read_image(path: &Path, limits: &ReadLimits) -> Result<Video> {
    let bytes = crate::input::read_regular_file(path, limits.max_file_bytes)?;
    let (format, name) = if bytes.starts_with(&PNG_SIGNATURE) {
        (image::ImageFormat::Png, "PNG")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        (image::ImageFormat::Jpeg, "JPEG")
    } else {
        return Err(VideoError::UnsupportedInput {
            path: path.to_path_buf(),
            found: if bytes.is_empty() {
                "an empty file".into()
            } else {
                format!(
                    "a file starting with {:02x?}, which is neither PNG nor JPEG",
                    &bytes[..bytes.len().min(8)]
                )
            },
        });
    };
    let malformed = |detail: String| VideoError::Malformed {
        path: path.to_path_buf(),
        format: name,
        detail,
    };
    let reader = || image::ImageReader::with_format(std::io::Cursor::new(bytes.as_slice()), format);
    // The declared size first: checked against the limits before any pixel is decoded.
    let (width, height) = reader()
        .into_dimensions()
        .map_err(|e| malformed(e.to_string()))?;
    let total = limits.check(path, name, u64::from(width), u64::from(height), Some(1))?;
    let mut decoder = reader()
        .into_decoder()
        .map_err(|e| malformed(e.to_string()))?;
    let color = image::ImageDecoder::original_color_type(&decoder);
    let cmyk = matches!(
        color,
        image::ExtendedColorType::Cmyk8 | image::ExtendedColorType::Cmyk16
    ) || (format == image::ImageFormat::Jpeg && jpeg_components(&bytes) == Some(4));
    if cmyk {
        // Four-channel JPEGs (CMYK or YCCK) would be converted by guesswork about the inks.
        return Err(malformed(
            "CMYK colour (4 channels), which vpipe does not convert; save the image as RGB".into(),
        ));
    }
    let mut decode_limits = image::Limits::no_limits();
    decode_limits.max_image_width = Some(limits.max_frame_side);
    decode_limits.max_image_height = Some(limits.max_frame_side);
    // The decoded image in its own colour type (at most 8 bytes a pixel) and some room for
    // the decoder's tables.
    decode_limits.max_alloc = Some((total as u64).saturating_mul(8).saturating_add(64 << 20));
    image::ImageDecoder::set_limits(&mut decoder, decode_limits)
        .map_err(|e| malformed(e.to_string()))?;
    let image = image::DynamicImage::from_decoder(decoder)
        .map_err(|e| match format {
            image::ImageFormat::Png => png_error(path, e),
            _ => malformed(e.to_string()),
        })?
        .into_rgb8();
    Video::new(image.into_raw(), width, height, DEFAULT_FPS).map_err(|e| malformed(e.to_string()))
}

/// The component count of a JPEG's frame header (SOFn), read from its marker segments; `None`
/// when there is none before the image data.
fn jpeg_components(bytes: &[u8]) -> Option<u8> {
    let mut at = 2; // after SOI
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xff {
            return None;
        }
        let marker = bytes[at + 1];
        let length = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        // SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC): length, precision, height, width,
        // then the component count.
        if (0xc0..=0xcf).contains(&marker) && ![0xc4, 0xc8, 0xcc].contains(&marker) {
            return bytes.get(at + 9).copied();
        }
        if marker == 0xda {
            return None; // start of scan: the image data follows
        }
        at += 2 + length;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut names = vec!["f10.png", "f2.png", "f1.png", "a.png", "f02.png"];
        names.sort_by_cached_key(|n| natural_key(n));
        // Equal numbers fall back to the digits as text: "02" < "2".
        assert_eq!(names, ["a.png", "f1.png", "f02.png", "f2.png", "f10.png"]);
    }

    #[test]
    fn gif_delays_keep_the_total() {
        let total: u32 = (0..16).map(|i| gif_delay_cs(i, 16.0)).sum();
        assert_eq!(total, 100);
        assert_eq!(gif_delay_cs(0, 16.0), 6);
        let total: u32 = (0..81).map(|i| gif_delay_cs(i, 16.0)).sum();
        assert_eq!(total, 506); // 81 / 16 s = 5.0625 s
    }
}
