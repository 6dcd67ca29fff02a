//! The in-memory video, its tensor form, and the frame-count and size fitting Wan needs.

use candle_core::{DType, Device, Tensor};

use crate::error::{Result, VideoError};
use crate::limits::{human_bytes, MAX_DECODED_BYTES, MAX_FRAME_SIDE};

/// Frames per second given to a folder of PNG frames, which stores none: Wan 2.1's rate.
pub const DEFAULT_FPS: f64 = 16.0;

/// A video held as 8-bit RGB frames in one contiguous buffer.
///
/// Layout: `data[((t * height + y) * width + x) * 3 + c]`, frames in display order, `c` = R, G, B.
/// A `Video` always has at least one frame, non-zero width and height, and a finite positive
/// frame rate.
#[derive(Clone, PartialEq)]
pub struct Video {
    data: Vec<u8>,
    width: u32,
    height: u32,
    frames: usize,
    fps: f64,
}

impl std::fmt::Debug for Video {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Video")
            .field("frames", &self.frames)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("fps", &self.fps)
            .finish_non_exhaustive()
    }
}

impl Video {
    /// Wraps `data` (T×H×W×3 RGB bytes, see the type's layout) as a video.
    ///
    /// Fails when `data` is empty, not a whole number of `width`×`height` frames, or `fps` is not
    /// finite and positive.
    pub fn new(data: Vec<u8>, width: u32, height: u32, fps: f64) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(VideoError::InvalidVideo(format!(
                "frame size {width}x{height} has a zero side"
            )));
        }
        check_fps(fps)?;
        let frame_len = checked_frame_len(width, height)?;
        if data.is_empty() || !data.len().is_multiple_of(frame_len) {
            return Err(VideoError::InvalidVideo(format!(
                "{} bytes is not a positive whole number of {width}x{height} RGB frames ({frame_len} bytes each)",
                data.len()
            )));
        }
        let frames = data.len() / frame_len;
        Ok(Self {
            data,
            width,
            height,
            frames,
            fps,
        })
    }

    /// Builds a video from separate frames, each `width`×`height`×3 RGB bytes.
    pub fn from_frames<F: AsRef<[u8]>>(
        frames: &[F],
        width: u32,
        height: u32,
        fps: f64,
    ) -> Result<Self> {
        let frame_len = checked_frame_len(width, height)?;
        let mut data = Vec::with_capacity(frames.len().saturating_mul(frame_len));
        for (i, f) in frames.iter().enumerate() {
            let f = f.as_ref();
            if f.len() != frame_len {
                return Err(VideoError::InvalidVideo(format!(
                    "frame {i} has {} bytes, a {width}x{height} RGB frame has {frame_len}",
                    f.len()
                )));
            }
            data.extend_from_slice(f);
        }
        Self::new(data, width, height, fps)
    }

    /// Frame width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Frame height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Number of frames (at least 1).
    pub fn num_frames(&self) -> usize {
        self.frames
    }

    /// Frames per second.
    pub fn fps(&self) -> f64 {
        self.fps
    }

    /// Changes the frame rate (e.g. for a PNG folder, which stores none).
    pub fn set_fps(&mut self, fps: f64) -> Result<()> {
        check_fps(fps)?;
        self.fps = fps;
        Ok(())
    }

    /// Duration in seconds: frames / fps.
    pub fn duration_secs(&self) -> f64 {
        self.frames as f64 / self.fps
    }

    /// All frames, T×H×W×3 RGB bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Frame `t` as H×W×3 RGB bytes, or `None` past the end.
    pub fn frame(&self, t: usize) -> Option<&[u8]> {
        let n = frame_len(self.width, self.height);
        let start = t.checked_mul(n)?;
        self.data.get(start..start.checked_add(n)?)
    }

    /// The frames in display order, each H×W×3 RGB bytes.
    pub fn frames(&self) -> std::slice::ChunksExact<'_, u8> {
        self.data.chunks_exact(frame_len(self.width, self.height))
    }

    /// Keeps the first `n` frames (`1 <= n`); a no-op when `n >= num_frames()`.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(VideoError::InvalidVideo(
                "cannot truncate a video to 0 frames".into(),
            ));
        }
        if n < self.frames {
            self.data.truncate(n * frame_len(self.width, self.height));
            self.frames = n;
        }
        Ok(())
    }

    /// Drops frames from the end so that the count is 4k+1, as Wan's VAE needs, and says so.
    pub fn trim_to_4k_plus_1(&mut self) -> FrameFit {
        let fit = fit_to_4k_plus_1(self.frames);
        // `kept >= 1` because a video has at least one frame.
        self.data
            .truncate(fit.kept * frame_len(self.width, self.height));
        self.frames = fit.kept;
        fit
    }
}

/// Bytes of one RGB frame of a valid [`Video`], whose frames are known to fit in memory.
fn frame_len(width: u32, height: u32) -> usize {
    width as usize * height as usize * 3
}

/// Bytes of one RGB frame of a size not yet validated; an error when it overflows `usize`.
fn checked_frame_len(width: u32, height: u32) -> Result<usize> {
    (width as usize)
        .checked_mul(height as usize)
        .and_then(|px| px.checked_mul(3))
        .ok_or_else(|| {
            VideoError::InvalidVideo(format!(
                "frame size {width}x{height} does not fit in memory"
            ))
        })
}

fn check_fps(fps: f64) -> Result<()> {
    if fps.is_finite() && fps > 0.0 {
        Ok(())
    } else {
        Err(VideoError::InvalidVideo(format!(
            "frame rate {fps} is not a finite positive number"
        )))
    }
}

/// How a frame count fits Wan's 4k+1 rule (the VAE compresses time 4×, keeping the first frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameFit {
    /// Frames kept: the largest 4k+1 not above the input count (0 for an empty input).
    pub kept: usize,
    /// Frames dropped from the end.
    pub dropped: usize,
}

impl FrameFit {
    /// A line for the user when frames were dropped, `None` when the count already fits.
    pub fn notice(&self) -> Option<String> {
        if self.dropped == 0 {
            return None;
        }
        let total = self.kept + self.dropped;
        Some(if self.kept == 0 {
            format!("{total} frames cannot be fitted to 4k+1")
        } else {
            format!(
                "using the first {} of {total} frames: Wan needs 4k+1 frames, dropped the last {}",
                self.kept, self.dropped
            )
        })
    }
}

/// Trims a frame count to the largest 4k+1 ≤ `frames` (81 → 81, 83 → 81, 4 → 1, 0 → 0).
pub fn fit_to_4k_plus_1(frames: usize) -> FrameFit {
    let kept = if frames == 0 {
        0
    } else {
        (frames - 1) / 4 * 4 + 1
    };
    FrameFit {
        kept,
        dropped: frames - kept,
    }
}

/// Converts a video to the tensor Wan's VAE takes, on `device`, values in [-1, 1].
///
/// `v / 127.5 - 1` per channel value `v` in 0..=255.
///
/// # Shapes
/// - returns `[1, 3, T, H, W]`, `f32`, channels R, G, B.
pub fn to_tensor(video: &Video, device: &Device) -> Result<Tensor> {
    let (t, h, w) = (video.frames, video.height as usize, video.width as usize);
    let plane = t * h * w;
    let mut out = vec![0f32; 3 * plane];
    // Channel-last bytes to channel-first planes in one pass; the [R|G|B] split keeps writes
    // sequential within each plane.
    let (r, gb) = out.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    for (i, px) in video.data.chunks_exact(3).enumerate() {
        r[i] = f32::from(px[0]) / 127.5 - 1.0;
        g[i] = f32::from(px[1]) / 127.5 - 1.0;
        b[i] = f32::from(px[2]) / 127.5 - 1.0;
    }
    Ok(Tensor::from_vec(out, (1, 3, t, h, w), device)?)
}

/// Converts a decoded tensor back to a video: values clamped to [-1, 1], mapped to 0..=255 and
/// rounded to nearest (NaN becomes 0).
///
/// # Shapes
/// - `tensor`: `[1, 3, T, H, W]`, any float dtype, any device.
pub fn from_tensor(tensor: &Tensor, fps: f64) -> Result<Video> {
    let dims = tensor.dims().to_vec();
    let (t, h, w) = match dims.as_slice() {
        &[1, 3, t, h, w] if t > 0 && h > 0 && w > 0 => (t, h, w),
        _ => return Err(VideoError::TensorShape { got: dims }),
    };
    let (width, height) = match (u32::try_from(w), u32::try_from(h)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => return Err(VideoError::TensorShape { got: dims }),
    };
    // Channel-last on the tensor's own device, then one copy to the host.
    let values = tensor
        .to_dtype(DType::F32)?
        .squeeze(0)?
        .permute((1, 2, 3, 0))?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    let data = values
        .into_iter()
        .map(|x| ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8)
        .collect::<Vec<u8>>();
    debug_assert_eq!(data.len(), t * h * w * 3);
    Video::new(data, width, height, fps)
}

/// Scales a video to cover `width`×`height` keeping its aspect ratio, then crops the centre.
///
/// Implemented as the equivalent crop-then-scale: the centred source region with the target's
/// aspect ratio is resampled to exactly `width`×`height` with a triangle (bilinear) filter whose
/// support widens when shrinking, so downscaling averages over the covered area instead of
/// aliasing. The frame rate is kept.
///
/// The target is bounded like decoded input: at most [`MAX_FRAME_SIDE`] pixels per side and
/// [`MAX_DECODED_BYTES`] for all output frames, checked before the output is allocated.
pub fn resize_center_crop(video: &Video, width: u32, height: u32) -> Result<Video> {
    if width == 0 || height == 0 {
        return Err(VideoError::InvalidVideo(format!(
            "target size {width}x{height} has a zero side"
        )));
    }
    // The target size is the caller's: bound it like a decoded input before allocating for it.
    if width > MAX_FRAME_SIDE || height > MAX_FRAME_SIDE {
        return Err(VideoError::InvalidVideo(format!(
            "target size {width}x{height} exceeds {MAX_FRAME_SIDE} pixels per side"
        )));
    }
    let out_len = (video.frames as u64)
        .checked_mul(u64::from(width) * u64::from(height) * 3)
        .filter(|&b| b <= MAX_DECODED_BYTES)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| {
            VideoError::InvalidVideo(format!(
                "{} frames of {width}x{height} exceed the limit of {} of RGB frames",
                video.frames,
                human_bytes(MAX_DECODED_BYTES)
            ))
        })?;
    let (sw, sh) = (video.width as u64, video.height as u64);
    if (sw, sh) == (width as u64, height as u64) {
        return Ok(video.clone());
    }
    // Source region with the target aspect: the full width if the source is relatively taller,
    // else the full height. Integer arithmetic keeps the choice exact for equal aspects.
    let (cw, ch) = if sw * height as u64 <= sh * width as u64 {
        let ch = ((sw * height as u64) as f64 / width as f64).round() as u64;
        (sw, ch.clamp(1, sh))
    } else {
        let cw = ((sh * width as u64) as f64 / height as f64).round() as u64;
        (cw.clamp(1, sw), sh)
    };
    let (x0, y0) = ((sw - cw) / 2, (sh - ch) / 2);
    let mut data = Vec::new();
    data.try_reserve_exact(out_len)
        .map_err(|e| VideoError::InvalidVideo(format!("cannot allocate {out_len} bytes: {e}")))?;
    for frame in video.frames() {
        let img = image::RgbImage::from_raw(video.width, video.height, frame.to_vec())
            .ok_or_else(|| VideoError::InvalidVideo("frame length mismatch".into()))?;
        let cropped =
            image::imageops::crop_imm(&img, x0 as u32, y0 as u32, cw as u32, ch as u32).to_image();
        let resized = if (cw, ch) == (width as u64, height as u64) {
            cropped
        } else {
            image::imageops::resize(
                &cropped,
                width,
                height,
                image::imageops::FilterType::Triangle,
            )
        };
        data.extend_from_slice(resized.as_raw());
    }
    Video::new(data, width, height, video.fps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_k_plus_one() {
        let cases = [
            (0, 0),
            (1, 1),
            (4, 1),
            (5, 5),
            (80, 77),
            (81, 81),
            (83, 81),
            (84, 81),
            (85, 85),
        ];
        for (n, kept) in cases {
            let fit = fit_to_4k_plus_1(n);
            assert_eq!((fit.kept, fit.dropped), (kept, n - kept), "n = {n}");
            assert_eq!(fit.kept % 4, n.min(1), "n = {n}");
        }
        assert_eq!(fit_to_4k_plus_1(81).notice(), None);
        let notice = fit_to_4k_plus_1(83).notice().unwrap();
        assert!(
            notice.contains("first 81 of 83") && notice.contains("last 2"),
            "{notice}"
        );
    }

    #[test]
    fn trim_drops_tail_frames() {
        let data: Vec<u8> = (0..7u8).flat_map(|t| [t; 2 * 2 * 3]).collect();
        let mut v = Video::new(data, 2, 2, 16.0).unwrap();
        let fit = v.trim_to_4k_plus_1();
        assert_eq!((fit.kept, fit.dropped), (5, 2));
        assert_eq!(v.num_frames(), 5);
        assert_eq!(v.frame(4).unwrap()[0], 4);
        assert!(v.frame(5).is_none());
    }

    #[test]
    fn rejects_inconsistent_parts() {
        assert!(matches!(
            Video::new(vec![0; 11], 2, 2, 16.0),
            Err(VideoError::InvalidVideo(_))
        ));
        assert!(Video::new(vec![], 2, 2, 16.0).is_err());
        assert!(Video::new(vec![0; 12], 2, 2, 0.0).is_err());
        assert!(Video::new(vec![0; 12], 2, 2, f64::NAN).is_err());
        assert!(Video::new(vec![0; 12], 0, 2, 16.0).is_err());
        assert!(Video::from_frames(&[vec![0u8; 12], vec![0u8; 9]], 2, 2, 16.0).is_err());
    }

    #[test]
    fn tensor_round_trip_is_exact_and_clamps() {
        let data: Vec<u8> = (0..2 * 3 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let v = Video::new(data, 4, 3, 24.0).unwrap();
        let t = to_tensor(&v, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 2, 3, 4]);
        // Pixel (t=1, y=2, x=3), green channel.
        let g = t
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .get(1)
            .unwrap()
            .get(2)
            .unwrap()
            .get(3)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let byte = v.data()[((3 + 2) * 4 + 3) * 3 + 1];
        assert_eq!(g, f32::from(byte) / 127.5 - 1.0);
        let back = from_tensor(&t, 24.0).unwrap();
        assert_eq!(back, v);

        let wild = Tensor::new(&[-3f32, -1.0, 0.0, 0.002, 1.0, 7.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 1, 2))
            .unwrap();
        let v = from_tensor(&wild, 16.0).unwrap();
        // Channel-last: (r0, g0, b0, r1, g1, b1) = (-3, 0, 1, -1, 0.002, 7).
        assert_eq!(v.data(), &[0, 128, 255, 0, 128, 255]);
        let bad = Tensor::zeros((3, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            from_tensor(&bad, 16.0),
            Err(VideoError::TensorShape { .. })
        ));
    }

    #[test]
    fn resize_center_crop_covers_and_centres() {
        // 8x4 frame whose columns 2..6 are white: a 4x4 centre crop is all white.
        let mut data = vec![0u8; 8 * 4 * 3];
        for y in 0..4 {
            for x in 2..6 {
                data[(y * 8 + x) * 3..(y * 8 + x) * 3 + 3].fill(255);
            }
        }
        let v = Video::new(data, 8, 4, 16.0).unwrap();
        let sq = resize_center_crop(&v, 2, 2).unwrap();
        assert_eq!((sq.width(), sq.height(), sq.num_frames()), (2, 2, 1));
        assert!(sq.data().iter().all(|&b| b == 255), "{:?}", sq.data());
        // Upscale of a flat frame stays flat and hits the exact size.
        let flat = Video::new(vec![77u8; 3 * 5 * 3 * 2], 3, 5, 16.0).unwrap();
        let up = resize_center_crop(&flat, 16, 9).unwrap();
        assert_eq!((up.width(), up.height(), up.num_frames()), (16, 9, 2));
        assert!(up.data().iter().all(|&b| b == 77));
    }
}
