//! Animated GIF and folders of PNG frames, through the `image` crate.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use image::codecs::gif::{GifDecoder, GifEncoder, Repeat};
use image::codecs::png::PngEncoder;
use image::{AnimationDecoder, Delay, ExtendedColorType, ImageEncoder, RgbaImage};

use crate::error::{Result, VideoError};
use crate::video::{Video, DEFAULT_FPS};

// ---------------------------------------------------------------------------------------------
// GIF

/// Browsers play GIF delays of 0 or 10 ms as 100 ms; so does this reader.
const GIF_MIN_DELAY_MS: f64 = 20.0;
const GIF_FALLBACK_DELAY_MS: f64 = 100.0;

pub(crate) fn read_gif(path: &Path, bytes: &[u8]) -> Result<Video> {
    let malformed = |e: image::ImageError| VideoError::Malformed {
        path: path.to_path_buf(),
        format: "GIF",
        detail: e.to_string(),
    };
    let decoder = GifDecoder::new(std::io::Cursor::new(bytes)).map_err(malformed)?;
    let mut data = Vec::new();
    let mut size = None;
    let mut total_ms = 0.0;
    let mut count = 0;
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

/// GIF delays are whole centiseconds; frame `i` gets the difference of the rounded cumulative
/// times, so the total stays within 10 ms of frames / fps (16 fps → 6, 6, 7, 6, ... cs).
fn gif_delay_cs(i: usize, fps: f64) -> u32 {
    let at = |k: usize| (k as f64 * 100.0 / fps).round();
    (at(i + 1) - at(i)).max(1.0) as u32
}

pub(crate) fn write_gif<W: Write>(out: W, path: &Path, video: &Video, speed: i32) -> Result<W> {
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

pub(crate) fn read_png_folder(dir: &Path) -> Result<Video> {
    let entries = std::fs::read_dir(dir).map_err(|e| VideoError::io(dir, "list folder", e))?;
    let mut pngs: Vec<PathBuf> = Vec::new();
    let mut others = 0usize;
    for entry in entries {
        let entry = entry.map_err(|e| VideoError::io(dir, "list folder", e))?;
        let p = entry.path();
        if p.is_file() && is_png(&p) {
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
    let mut data = Vec::new();
    let mut size = None;
    for (i, p) in pngs.iter().enumerate() {
        let img = image::ImageReader::open(p)
            .map_err(|e| VideoError::io(p, "open", e))?
            .decode()
            .map_err(|e| match e {
                image::ImageError::IoError(io)
                    if io.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    VideoError::Truncated {
                        path: p.clone(),
                        detail: "PNG ends early".into(),
                    }
                }
                other => VideoError::Malformed {
                    path: p.clone(),
                    format: "PNG",
                    detail: other.to_string(),
                },
            })?
            .into_rgb8();
        let dims = img.dimensions();
        let (w, h) = *size.get_or_insert(dims);
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
        data.extend_from_slice(img.as_raw());
    }
    let (w, h) = size.expect("at least one PNG");
    Video::new(data, w, h, DEFAULT_FPS).map_err(|e| VideoError::Malformed {
        path: dir.to_path_buf(),
        format: "PNG",
        detail: e.to_string(),
    })
}

/// File name of frame `i` in a written folder; zero-padded so plain name order works too.
pub(crate) fn frame_file_name(i: usize) -> String {
    format!("frame_{i:05}.png")
}

pub(crate) fn write_png_folder(dir: &Path, final_path: &Path, video: &Video) -> Result<()> {
    for (i, frame) in video.frames().enumerate() {
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
