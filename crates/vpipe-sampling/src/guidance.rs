//! Classifier-free guidance.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// Classifier-free guidance: `uncond + scale·(cond − uncond)`.
///
/// The combination of the original Wan code, diffusers' Wan pipelines and ComfyUI
/// (`noise = uncond + g·(cond − uncond)`). `scale` 1 gives `cond` (up to rounding), 0 gives
/// `uncond`. Computed in f32, the result in the dtype of `cond`.
///
/// # Shapes
/// `cond`, `uncond`: the same shape (any rank); the result has it too.
///
/// # Errors
/// [`Error::ShapeMismatch`] for shapes that differ; candle errors.
pub fn cfg(cond: &Tensor, uncond: &Tensor, scale: f64) -> Result<Tensor> {
    if cond.dims() != uncond.dims() {
        return Err(Error::ShapeMismatch {
            what: "cfg uncond (must match cond)",
            expected: cond.dims().to_vec(),
            got: uncond.dims().to_vec(),
        });
    }
    let c = cond.to_dtype(DType::F32)?;
    let u = uncond.to_dtype(DType::F32)?;
    let guided = (&u + ((c - &u)? * scale)?)?;
    Ok(guided.to_dtype(cond.dtype())?)
}

/// Guidance on one batched forward: splits a prediction `[2B, …]` into its first `B` rows
/// (**cond**) and its last `B` rows (**uncond**), and combines them with [`cfg`].
///
/// The caller builds the model input in the same order: `cat([x, x])` along dim 0 with the
/// positive context first and the negative context second (as ComfyUI's batched cond+uncond
/// forward does when memory allows).
///
/// # Shapes
/// `pred`: `[2B, …]`; result: `[B, …]`.
///
/// # Errors
/// [`Error::NotCondUncondBatch`] for a rank-0 tensor or an odd or zero dim 0.
pub fn cfg_batched(pred: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = pred.dims();
    match dims.first() {
        Some(&n) if n > 0 && n % 2 == 0 => {
            let b = n / 2;
            cfg(&pred.narrow(0, 0, b)?, &pred.narrow(0, b, b)?, scale)
        }
        _ => Err(Error::NotCondUncondBatch(dims.to_vec())),
    }
}
