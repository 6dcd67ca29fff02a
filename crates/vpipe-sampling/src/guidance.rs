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
/// (**cond**) and its last `B` rows (**uncond**), and combines them with [`cfg()`].
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

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn cfg_by_hand() {
        let cond = t(&[1.0, 2.0, -1.0, 0.5], &[2, 2]);
        let uncond = t(&[0.0, 1.0, 1.0, 0.5], &[2, 2]);
        // uncond + 5·(cond − uncond): 0 + 5·1, 1 + 5·1, 1 + 5·(−2), 0.5 + 0.
        let got = cfg(&cond, &uncond, 5.0).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [5.0, 6.0, -9.0, 0.5]
        );
        assert_eq!(got.dims(), &[2, 2]);
        let one = cfg(&cond, &uncond, 1.0).unwrap();
        assert_eq!(
            one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 2.0, -1.0, 0.5]
        );
        let zero = cfg(&cond, &uncond, 0.0).unwrap();
        assert_eq!(
            zero.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 1.0, 1.0, 0.5]
        );
    }

    #[test]
    fn batched_is_cond_first_then_uncond() {
        // Batch of 2·B, B = 2: rows 0, 1 cond; rows 2, 3 uncond.
        let pred = t(&[1.0, 2.0, 0.0, 0.0], &[4, 1]);
        let got = cfg_batched(&pred, 3.0).unwrap();
        assert_eq!(got.dims(), &[2, 1]);
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [3.0, 6.0]
        );
    }

    #[test]
    fn keeps_the_dtype() {
        let cond = t(&[1.0, 2.0], &[2]).to_dtype(DType::BF16).unwrap();
        let uncond = t(&[0.5, 0.5], &[2]).to_dtype(DType::BF16).unwrap();
        let got = cfg(&cond, &uncond, 2.0).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(
            got.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            [1.5, 3.5]
        );
    }

    #[test]
    fn bad_shapes_are_clear_errors() {
        let err = cfg(&t(&[1.0, 2.0], &[2]), &t(&[1.0, 2.0], &[1, 2]), 5.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cfg uncond (must match cond): expected shape [2], got shape [1, 2]"
        );
        let err = cfg_batched(&t(&[1.0, 2.0, 3.0], &[3, 1]), 5.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "batched CFG prediction must be [2B, ...] (cond rows first, then uncond), got shape [3, 1]"
        );
        let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
        assert!(matches!(
            cfg_batched(&scalar, 5.0),
            Err(Error::NotCondUncondBatch(_))
        ));
    }
}
