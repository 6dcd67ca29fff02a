//! Tensor operations candle lacks, and small numeric helpers.

pub mod attention;
pub mod conv3d;
#[cfg(feature = "cuda")]
pub mod cudnn;
#[cfg(feature = "cuda")]
pub mod cudnn_sdpa;
pub mod fp8;
#[cfg(feature = "cuda")]
pub mod fused;
pub mod layout;
pub mod linear;
#[cfg(feature = "cuda")]
pub(crate) mod lt;

pub use conv3d::{CausalConv3d, Conv3dConfig};

use candle_core::{DType, Tensor, D};

/// Largest absolute element-wise difference of two tensors of equal shape, computed in f64
/// on the host (parity tests and reports; the tensors may live on different devices).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    if a.dims() != b.dims() {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: a.shape().clone(),
            rhs: b.shape().clone(),
            op: "max_abs_diff",
        });
    }
    let host = |t: &Tensor| t.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F64);
    let d = (host(a)? - host(b)?)?.abs()?;
    d.flatten_all()?.max(D::Minus1)?.to_scalar::<f64>()
}
