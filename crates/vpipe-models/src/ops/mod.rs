//! Tensor operations candle lacks, and small numeric helpers.

pub mod attention;
pub mod conv3d;
#[cfg(feature = "cuda")]
pub mod cudnn;
#[cfg(feature = "cuda")]
pub mod fused;
pub mod linear;

pub use conv3d::{CausalConv3d, Conv3dConfig};

use candle_core::{DType, Tensor, D};

/// Largest absolute element-wise difference of two tensors of equal shape, computed in f64
/// (parity tests and reports).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    if a.dims() != b.dims() {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: a.shape().clone(),
            rhs: b.shape().clone(),
            op: "max_abs_diff",
        });
    }
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    d.flatten_all()?.max(D::Minus1)?.to_scalar::<f64>()
}
