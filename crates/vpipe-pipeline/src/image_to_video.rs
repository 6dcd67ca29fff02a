//! Image-to-video conditioning, as diffusers' `WanImageToVideoPipeline.prepare_latents`
//! builds it: the VAE encodes a video of the first frame followed by zeros (and, for
//! first-last-frame to video, the last frame at the end), and a 4-channel mask says which of
//! the frames each latent frame stands for are given. The DiT reads the noise's 16 channels
//! followed by these 20 (36 in all).

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Frames one latent frame stands for after the first (the VAE's temporal factor).
const FRAMES_PER_LATENT: usize = 4;

/// The video the VAE encodes for the condition.
///
/// # Shapes
/// - `first`, `last`: [1, 3, H, W] in [-1, 1].
/// - output: [1, 3, frames, H, W]: `first`, zeros, and `last` as the final frame when given.
pub fn condition_video(first: &Tensor, last: Option<&Tensor>, frames: usize) -> Result<Tensor> {
    let (_, c, h, w) = first.dims4()?;
    let given = 1 + usize::from(last.is_some());
    let zeros = Tensor::zeros(
        (1, c, frames.saturating_sub(given), h, w),
        first.dtype(),
        first.device(),
    )?;
    let mut parts = vec![first.unsqueeze(2)?, zeros];
    if let Some(last) = last {
        parts.push(last.unsqueeze(2)?);
    }
    Ok(Tensor::cat(&parts, 2)?)
}

/// The mask of the given frames in latent form: for each latent frame, one channel per frame
/// it stands for (the first latent frame stands for the first frame alone, repeated), 1 where
/// that frame is given.
///
/// # Shapes
/// Output: [1, 4, 1 + (frames − 1) / 4, h, w] in f32.
pub fn condition_mask(
    frames: usize,
    (h, w): (usize, usize),
    last: bool,
    device: &Device,
) -> Result<Tensor> {
    let latent_frames = 1 + frames.saturating_sub(1) / FRAMES_PER_LATENT;
    let mut values = vec![0f32; FRAMES_PER_LATENT * latent_frames];
    for channel in 0..FRAMES_PER_LATENT {
        // [channel][latent frame]
        values[channel * latent_frames] = 1.0;
    }
    if last && latent_frames > 1 {
        // The last frame is the last one the last latent frame stands for.
        values[(FRAMES_PER_LATENT - 1) * latent_frames + latent_frames - 1] = 1.0;
    }
    let mask = Tensor::from_vec(values, (1, FRAMES_PER_LATENT, latent_frames, 1, 1), device)?;
    Ok(mask
        .broadcast_as((1, FRAMES_PER_LATENT, latent_frames, h, w))?
        .contiguous()?)
}

/// The 20 conditioning channels: the mask, then the normalised latents of
/// [`condition_video`].
///
/// # Shapes
/// - `latents`: [1, 16, F, h, w], normalised (`WanVae::normalize_latents`).
/// - output: [1, 20, F, h, w] in `latents`' dtype.
pub fn image_condition(latents: &Tensor, frames: usize, last: bool) -> Result<Tensor> {
    let (_, _, _, h, w) = latents.dims5()?;
    let mask = condition_mask(frames, (h, w), last, latents.device())?.to_dtype(latents.dtype())?;
    Ok(Tensor::cat(&[&mask, latents], 1)?)
}

/// OpenAI CLIP's normalisation, which Wan's image encoder was trained with.
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// CLIP's image preprocessing as transformers' `CLIPImageProcessor` does it for Wan's image
/// encoder: the shortest side resized to `size` (bicubic; the other side to `size · long /
/// short`, rounded down), the centre `size` × `size` cropped, values scaled to [0, 1] and
/// normalised with OpenAI CLIP's mean and std. The resampling is the `image` crate's
/// Catmull-Rom (PIL's bicubic kernel), so values may differ from PIL's by a rounding step.
///
/// # Shapes
/// - `rgb`: `width` × `height` × 3 bytes, row-major.
/// - output: [1, 3, size, size] in f32 on the host.
pub fn clip_pixel_values(rgb: &[u8], (width, height): (u32, u32), size: u32) -> Result<Tensor> {
    let bad = |reason: String| crate::error::Error::BadInput(reason);
    let image = image::RgbImage::from_raw(width, height, rgb.to_vec()).ok_or_else(|| {
        bad(format!(
            "CLIP preprocessing: {} bytes for a {width}×{height} RGB image",
            rgb.len()
        ))
    })?;
    if width == 0 || height == 0 || size == 0 {
        return Err(bad(format!(
            "CLIP preprocessing: a {width}×{height} image to {size} px"
        )));
    }
    let (short, long) = (width.min(height), width.max(height));
    let scaled_long = (u64::from(size) * u64::from(long) / u64::from(short)) as u32;
    let (w, h) = if width <= height {
        (size, scaled_long)
    } else {
        (scaled_long, size)
    };
    let resized = image::imageops::resize(&image, w, h, image::imageops::FilterType::CatmullRom);
    let (left, top) = ((w - size) / 2, (h - size) / 2);
    let cropped = image::imageops::crop_imm(&resized, left, top, size, size).to_image();
    let n = (size * size) as usize;
    let mut planes = vec![0f32; 3 * n];
    for (i, pixel) in cropped.pixels().enumerate() {
        for c in 0..3 {
            planes[c * n + i] = (f32::from(pixel[c]) / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    let s = size as usize;
    Ok(Tensor::from_vec(planes, (1, 3, s, s), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use candle_core::DType;
    use vpipe_models::wan::WanVae;

    /// diffusers' `prepare_latents` on the tiny VAE (tools/fixtures/make_i2v_condition_fixtures.py):
    /// the first frame alone, and the first and the last.
    #[test]
    fn the_condition_matches_diffusers_prepare_latents() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cases = candle_core::safetensors::load(
            root.join("tests/fixtures/i2v_condition.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let vae = WanVae::from_file(
            root.join("../vpipe-models/tests/fixtures/vae/wan_vae_tiny_diffusers.safetensors"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        for (key, last) in [
            ("condition_first", None),
            ("condition_first_last", Some(&cases["last"])),
        ] {
            let video = condition_video(&cases["first"], last, 9).unwrap();
            assert_eq!(video.dims(), &[1, 3, 9, 48, 64]);
            let latents = vae.normalize_latents(&vae.encode(&video).unwrap()).unwrap();
            let condition = image_condition(&latents, 9, last.is_some()).unwrap();
            let err = vpipe_models::ops::max_abs_diff(&condition, &cases[key]).unwrap();
            println!("{key}: max abs {err:.3e}");
            assert!(err <= 1e-4, "{key}: {err}");
        }
    }

    /// transformers' CLIPImageProcessor (PIL backend) on two smooth images
    /// (tools/fixtures/make_clip_preprocess_fixtures.py): a landscape and a portrait.
    #[test]
    fn clip_preprocessing_matches_transformers_within_a_rounding_step() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cases = candle_core::safetensors::load(
            root.join("tests/fixtures/clip_preprocess.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        for case in ["landscape", "portrait"] {
            let rgb = &cases[&format!("{case}.rgb")];
            let (h, w, _) = rgb.dims3().unwrap();
            let bytes = rgb.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            let pixels = clip_pixel_values(&bytes, (w as u32, h as u32), 224).unwrap();
            let expected = &cases[&format!("{case}.pixel_values")];
            let diff = (&pixels - expected).unwrap().abs().unwrap();
            let max = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
            let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
            println!("{case}: max abs {max:.3e}, mean abs {mean:.3e}");
            // One rounding step of 1/255 over the smallest std (0.261): 0.015.
            assert!(max <= 0.016, "{case}: max {max}");
            assert!(mean <= 0.005, "{case}: mean {mean}");
        }
        assert!(clip_pixel_values(&[0; 5], (2, 2), 224).is_err());
    }

    #[test]
    fn the_mask_marks_the_given_frames() {
        let at = |mask: &Tensor, c: usize, f: usize| {
            mask.narrow(1, c, 1)
                .unwrap()
                .narrow(2, f, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // 81 frames: 21 latent frames.
        let mask = condition_mask(81, (2, 3), true, &Device::Cpu).unwrap();
        assert_eq!(mask.dims(), &[1, 4, 21, 2, 3]);
        for c in 0..4 {
            assert_eq!(at(&mask, c, 0), 1.0);
            assert_eq!(at(&mask, c, 10), 0.0);
            assert_eq!(at(&mask, c, 20), if c == 3 { 1.0 } else { 0.0 });
        }
        let first_only = condition_mask(81, (2, 3), false, &Device::Cpu).unwrap();
        assert_eq!(at(&first_only, 3, 20), 0.0);
    }
}
