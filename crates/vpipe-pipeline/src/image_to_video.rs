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
