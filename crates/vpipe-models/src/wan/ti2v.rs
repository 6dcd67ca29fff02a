//! Wan 2.2 TI2V-5B's conditioning around the DiT, as diffusers' `WanPipeline` (text-to-video)
//! and `WanImageToVideoPipeline` (image-to-video) do it with `expand_timesteps=True`
//! (`pipelines/wan/pipeline_wan.py`, `pipeline_wan_i2v.py`; `Wan2.2:wan/textimage2video.py`).
//!
//! TI2V-5B takes a timestep per token ([`super::WanModel::forward`]). Text-to-video gives
//! every token the step's timestep. Image-to-video keeps the image's latent as the first latent
//! frame: the image alone (one frame) is encoded by the Wan 2.2 VAE and normalised with its
//! latent mean and std; before every step the model's input is the latents with their first
//! frame replaced by that condition ([`blend_first_frame`]), and the first frame's tokens get
//! timestep 0, the others the step's ([`expanded_timestep`]). The sampler steps every frame,
//! the first included: that frame's update is replaced by the next blend, and the final
//! latents are blended once more before decoding. The condition is the same for both passes
//! of classifier-free guidance.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The first-frame mask of image-to-video (diffusers' `first_frame_mask`): 0 on latent frame
/// 0, 1 on the others.
///
/// # Shapes
/// - output: [1, 1, frames, height, width], f32.
pub fn first_frame_mask(
    frames: usize,
    height: usize,
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    if frames == 0 || height == 0 || width == 0 {
        return Err(Error::DitInput {
            tensor: "latents",
            reason: format!("the latent grid {frames}×{height}×{width} is empty"),
        });
    }
    let plane = height * width;
    let mask: Vec<f32> = (0..frames * plane)
        .map(|i| if i < plane { 0.0 } else { 1.0 })
        .collect();
    Ok(Tensor::from_vec(
        mask,
        (1, 1, frames, height, width),
        device,
    )?)
}

/// The model's input of an image-to-video step (and the final latents after the last step):
/// `(1 − mask) · condition + mask · latents` with the [`first_frame_mask`], in f32 as
/// diffusers computes it: the first frame is the condition, the others the latents.
///
/// # Shapes
/// - `latents`: [B, C, F, H, W]; `condition`: [B, C, 1, H, W] or [1, C, 1, H, W] (the image's
///   normalised latent, the same for every sample).
/// - output: [B, C, F, H, W], f32.
///
/// # Errors
/// [`Error::DitInput`] naming `condition` when its shape does not match the latents'.
pub fn blend_first_frame(latents: &Tensor, condition: &Tensor) -> Result<Tensor> {
    let (b, c, f, h, w) = match *latents.dims() {
        [b, c, f, h, w] => (b, c, f, h, w),
        _ => {
            return Err(Error::DitInput {
                tensor: "latents",
                reason: format!("expected [B, C, F, H, W], got {:?}", latents.dims()),
            })
        }
    };
    let fits = match *condition.dims() {
        [cb, cc, 1, ch, cw] => (cb == b || cb == 1) && (cc, ch, cw) == (c, h, w),
        _ => false,
    };
    if !fits {
        return Err(Error::DitInput {
            tensor: "condition",
            reason: format!(
                "expected [{b} or 1, {c}, 1, {h}, {w}] (one latent frame of the latents' size), \
                 got {:?}",
                condition.dims()
            ),
        });
    }
    let mask = first_frame_mask(f, h, w, latents.device())?;
    let keep = mask.affine(-1.0, 1.0)?;
    let image = keep.broadcast_mul(&condition.to_dtype(DType::F32)?)?;
    let noisy = mask.broadcast_mul(&latents.to_dtype(DType::F32)?)?;
    Ok(image.broadcast_add(&noisy)?)
}

/// The per-token timestep of a step at `t` (diffusers' `(mask[0][0][:, ::2, ::2] * t)
/// .flatten()` expanded to the batch): `t` on every token, but `0 · t` on the first latent
/// frame's tokens when `image` (image-to-video), in f32. Wan's temporal patch is 1, so token
/// frame 0 is latent frame 0.
///
/// # Shapes
/// - `token_grid`: (frames, height, width) in tokens ([`super::WanModel::token_grid`]).
/// - output: [batch, frames · height · width], f32, frame-major.
pub fn expanded_timestep(
    t: f32,
    batch: usize,
    token_grid: [usize; 3],
    image: bool,
    device: &Device,
) -> Result<Tensor> {
    let [frames, height, width] = token_grid;
    let tokens = frames
        .checked_mul(height)
        .and_then(|n| n.checked_mul(width))
        .filter(|&n| n > 0 && n <= super::dit::MAX_TOKENS);
    let Some(tokens) = tokens else {
        return Err(Error::DitInput {
            tensor: "timestep",
            reason: format!(
                "the token grid {token_grid:?} is empty or has more than {} tokens",
                super::dit::MAX_TOKENS
            ),
        });
    };
    if batch == 0 {
        return Err(Error::DitInput {
            tensor: "timestep",
            reason: "a batch of 0 samples".into(),
        });
    }
    let first = if image { height * width } else { 0 };
    let row: Vec<f32> = (0..tokens)
        .map(|i| if i < first { 0.0 * t } else { 1.0 * t })
        .collect();
    Ok(Tensor::from_vec(row, (1, tokens), device)?.repeat((batch, 1))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_to_video_zeroes_the_first_frames_tokens() -> Result<()> {
        let t = expanded_timestep(800.0, 2, [3, 2, 2], true, &Device::Cpu)?;
        let rows = t.to_vec2::<f32>()?;
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][..4], [0.0; 4]);
        assert!(rows[1][4..].iter().all(|&v| v == 800.0));
        let t2v = expanded_timestep(800.0, 1, [3, 2, 2], false, &Device::Cpu)?;
        assert!(t2v.to_vec2::<f32>()?[0].iter().all(|&v| v == 800.0));
        assert!(expanded_timestep(1.0, 1, [0, 2, 2], true, &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn a_condition_of_another_size_is_refused() -> Result<()> {
        let latents = Tensor::zeros((1, 4, 3, 2, 2), DType::F32, &Device::Cpu)?;
        let condition = Tensor::ones((1, 4, 1, 2, 3), DType::F32, &Device::Cpu)?;
        let err = blend_first_frame(&latents, &condition)
            .unwrap_err()
            .to_string();
        assert!(err.contains("condition"), "{err}");
        Ok(())
    }
}
