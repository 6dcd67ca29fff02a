//! A linear layer whose weight may be stored as scaled float8, as ComfyUI's `fp8_e4m3fn_scaled`
//! checkpoints store it.
//!
//! Such a file keeps `X.weight` in float8 e4m3fn and a per-tensor `X.scale_weight` (f32); the
//! real weight is `weight.to(f32) * scale_weight` (`comfy/ops.py`, `scaled_fp8`). The weight stays
//! in float8 in memory (1 byte per parameter) and is dequantised for each forward, so the memory
//! saving is kept at the cost of one cast per call.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// Names of the per-tensor scale that ComfyUI's scaled-fp8 files give a linear layer: the
/// `scaled_fp8` format and the later `comfy_quant` one.
const SCALE_NAMES: [&str; 2] = ["scale_weight", "weight_scale"];

/// `y = x·Wᵀ + b` with `W` in the checkpoint's precision (f32, bf16, f16, or scaled float8).
#[derive(Debug, Clone)]
pub struct Linear {
    /// shape [out, in]
    weight: Tensor,
    /// Scalar f32 dequantisation factor when `weight` is float8.
    scale: Option<Tensor>,
    /// shape [out]
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` [out, in] and `bias` [out] (when `with_bias`) from `vb`, in `vb`'s dtype,
    /// or keeps a scaled-fp8 weight in float8 when the checkpoint has its scale.
    pub fn new(in_dim: usize, out_dim: usize, with_bias: bool, vb: VarBuilder) -> Result<Self> {
        Self::new_in(in_dim, out_dim, with_bias, vb.dtype(), vb)
    }

    /// Like [`Self::new`], with the weights in `dtype` instead of `vb`'s (layers the reference
    /// keeps in f32 whatever the model's dtype).
    pub fn new_in(
        in_dim: usize,
        out_dim: usize,
        with_bias: bool,
        dtype: DType,
        vb: VarBuilder,
    ) -> Result<Self> {
        let scale_name = SCALE_NAMES.into_iter().find(|n| vb.contains_tensor(n));
        let (weight, scale) = match scale_name {
            Some(name) => {
                let weight = vb.get_with_hints_dtype(
                    (out_dim, in_dim),
                    "weight",
                    Init::Const(0.),
                    DType::F8E4M3,
                )?;
                let scale = vb.get_unchecked_dtype(name, DType::F32)?;
                if scale.elem_count() != 1 {
                    candle_core::bail!(
                        "{}.{name}: expected one per-tensor scale, got shape {:?}",
                        vb.prefix(),
                        scale.dims()
                    );
                }
                (weight, Some(scale.flatten_all()?.reshape(())?))
            }
            None => {
                let weight =
                    vb.get_with_hints_dtype((out_dim, in_dim), "weight", Init::Const(0.), dtype)?;
                (weight, None)
            }
        };
        let bias = if with_bias {
            Some(vb.get_with_hints_dtype(out_dim, "bias", Init::Const(0.), dtype)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            scale,
            bias,
        })
    }

    /// The weight as the computation uses it, in `dtype`.
    fn weight_in(&self, dtype: DType) -> Result<Tensor> {
        match &self.scale {
            #[cfg(feature = "cuda")]
            Some(scale) if self.weight.device().is_cuda() => {
                crate::ops::fused::dequantize_fp8(&self.weight, scale, dtype)
            }
            Some(scale) => self
                .weight
                .to_dtype(DType::F32)?
                .broadcast_mul(scale)?
                .to_dtype(dtype),
            None => self.weight.to_dtype(dtype),
        }
    }

    /// Whether the weight is stored as scaled float8.
    pub fn is_scaled_fp8(&self) -> bool {
        self.scale.is_some()
    }
}

impl Linear {
    /// `act(x·Wᵀ + b)`; on CUDA the bias and the activation are one in-place pass over the
    /// matmul's output.
    fn forward_act(&self, x: &Tensor, gelu: bool) -> Result<Tensor> {
        let weight = self.weight_in(x.dtype())?;
        let (out_dim, in_dim) = weight.dims2()?;
        let mut out_shape = x.dims().to_vec();
        let last = out_shape.len() - 1;
        out_shape[last] = out_dim;
        let rows = x.elem_count() / in_dim.max(1);
        let y = x.reshape((rows, in_dim))?.matmul(&weight.t()?)?;
        #[cfg(feature = "cuda")]
        if y.device().is_cuda() {
            if let Some(b) = &self.bias {
                crate::ops::fused::bias_act_in_place(&y, b, gelu)?;
            } else if gelu {
                return y.gelu()?.reshape(out_shape);
            }
            return y.reshape(out_shape);
        }
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        let y = if gelu { y.gelu()? } else { y };
        y.reshape(out_shape)
    }

    /// `GELU_tanh(x·Wᵀ + b)` (the first half of Wan's FFN).
    ///
    /// # Shapes
    /// - `x`: [..., in] → [..., out]
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, true)
    }
}

impl Module for Linear {
    /// # Shapes
    /// - `x`: [..., in] → [..., out], computed in `x`'s dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }
}

/// Layer norm over the last dimension without affine parameters, computed in f32 (diffusers'
/// `FP32LayerNorm(elementwise_affine=False)`); the result stays f32.
///
/// # Shapes
/// - `x`: [..., dim] → [..., dim] (f32)
pub fn layer_norm_f32(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    let x = x.to_dtype(DType::F32)?;
    let ones = Tensor::ones(dim, DType::F32, x.device())?;
    let zeros = Tensor::zeros(dim, DType::F32, x.device())?;
    candle_nn::ops::layer_norm(&x, &ones, &zeros, eps as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    #[test]
    fn scaled_fp8_weight_is_dequantised_per_forward() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1.0f32, -2.0], [0.5, 4.0], [3.0, 0.25]], &dev)?;
        let scale = 0.5f32;
        let stored = (&w / scale as f64)?.to_dtype(DType::F8E4M3)?;
        let tensors = HashMap::from([
            ("l.weight".to_string(), stored),
            ("l.scale_weight".to_string(), Tensor::new(&[scale], &dev)?),
            (
                "l.bias".to_string(),
                Tensor::new(&[0.1f32, 0.2, 0.3], &dev)?,
            ),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let lin = Linear::new(2, 3, true, vb.pp("l"))?;
        assert!(lin.is_scaled_fp8());
        let x = Tensor::new(&[[1.0f32, 1.0]], &dev)?;
        let y = lin.forward(&x)?.to_vec2::<f32>()?;
        // The weights above are exact in e4m3 after dividing by 0.5.
        assert_eq!(y, vec![vec![-1.0 + 0.1, 4.5 + 0.2, 3.25 + 0.3]]);
        Ok(())
    }

    #[test]
    fn plain_weight_matches_matmul_for_any_leading_shape() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 6., &dev)?.reshape((3, 2))?;
        let tensors = HashMap::from([("weight".to_string(), w.clone())]);
        let lin = Linear::new(
            2,
            3,
            false,
            VarBuilder::from_tensors(tensors, DType::F32, &dev),
        )?;
        let x = Tensor::arange(0f32, 8., &dev)?.reshape((2, 2, 2))?;
        let y = lin.forward(&x)?;
        assert_eq!(y.dims(), &[2, 2, 3]);
        let expected = x.reshape((4, 2))?.matmul(&w.t()?)?.reshape((2, 2, 3))?;
        assert_eq!(y.to_vec3::<f32>()?, expected.to_vec3::<f32>()?);
        Ok(())
    }
}
