//! A linear layer whose weight may be stored as scaled float8, as ComfyUI's `fp8_e4m3fn_scaled`
//! checkpoints store it.
//!
//! Such a file keeps `X.weight` in float8 e4m3fn and a per-tensor `X.scale_weight` (f32); the
//! real weight is `weight.to(f32) * scale_weight` (`comfy/ops.py`, `scaled_fp8`). The weight stays
//! in float8 in memory (1 byte per parameter) and is dequantised for each forward, so the memory
//! saving is kept at the cost of one cast per call. A plain float8 weight is the same with a
//! scale of exactly 1, which the caller supplies (see [`Linear::new`]).
//!
//! Every other tensor is converted to the compute dtype when it is loaded
//! ([`get_in_dtype`]), float8 ones included.

use candle_core::{DType, Module, Result, Shape, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// Names of the per-tensor scale that ComfyUI's scaled-fp8 files give a linear layer: the
/// `scaled_fp8` format and the later `comfy_quant` one.
pub const SCALE_NAMES: [&str; 2] = ["scale_weight", "weight_scale"];

/// How a linear layer's matrix product runs: the plan's choice (`--fp8-compute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    /// In the activations' dtype, with the weight as stored (a scaled-fp8 weight dequantised).
    #[default]
    Exact,
    /// In float8 e4m3 with per-token activation scales and per-channel weight scales (a
    /// scaled-fp8 weight with its own scale), for bf16 and f16 activations
    /// ([`crate::ops::fp8::linear`]); f32 stays exact.
    Fp8,
}

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
    /// or keeps a scaled-fp8 weight in float8 when the checkpoint has its scale (a caller that
    /// wants a plain float8 weight kept in float8 puts a `scale_weight` of 1.0 next to it).
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
            None => (get_in_dtype(&vb, (out_dim, in_dim), "weight", dtype)?, None),
        };
        let bias = if with_bias {
            Some(get_in_dtype(&vb, out_dim, "bias", dtype)?)
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

/// A linear layer's input made ready once for every layer that reads it (the queries', keys'
/// and values' projections of one attention): quantised to float8 once when the products
/// are, as it is otherwise. A quantised input keeps only its float8 rows.
#[derive(Debug)]
pub struct LinearInput {
    /// The input as given; `None` once quantised.
    x: Option<Tensor>,
    shape: Vec<usize>,
    fp8: Option<crate::ops::fp8::Fp8Rows>,
}

impl LinearInput {
    /// `x` for products as `precision` says (float8 applies to bf16 and f16 inputs).
    ///
    /// # Shapes
    /// - `x`: [..., in].
    pub fn new(x: &Tensor, precision: MatmulPrecision) -> Result<Self> {
        let fp8 = match x.dims().last() {
            Some(&inputs)
                if precision == MatmulPrecision::Fp8
                    && matches!(x.dtype(), DType::BF16 | DType::F16) =>
            {
                let rows = x.elem_count() / inputs.max(1);
                Some(crate::ops::fp8::Fp8Rows::quantize(
                    &x.reshape((rows, inputs))?,
                )?)
            }
            _ => None,
        };
        Ok(Self {
            x: fp8.is_none().then(|| x.clone()),
            shape: x.dims().to_vec(),
            fp8,
        })
    }

    /// An input quantised already, of `shape` ([..., in]; its rows those of `rows`).
    #[cfg(feature = "cuda")]
    pub(crate) fn quantized(rows: crate::ops::fp8::Fp8Rows, shape: &[usize]) -> Self {
        Self {
            x: None,
            shape: shape.to_vec(),
            fp8: Some(rows),
        }
    }
}

impl Linear {
    /// `act(x·Wᵀ + b)`; on CUDA the bias and the activation are one in-place pass over the
    /// matmul's output.
    fn forward_act(&self, input: &LinearInput, gelu: bool) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let Some((&x_in, leading)) = input.shape.split_last() else {
            candle_core::bail!("linear: the input is a scalar; expected [..., {in_dim}]")
        };
        if x_in != in_dim {
            candle_core::bail!(
                "linear: input of shape {:?}, expected [..., {in_dim}] for a weight of [{out_dim}, \
                 {in_dim}]",
                input.shape
            )
        }
        let mut out_shape = input.shape.clone();
        out_shape[leading.len()] = out_dim;
        let rows = leading.iter().product::<usize>();
        let x = match (&input.fp8, &input.x) {
            (Some(x8), _) => {
                let weight = self.fp8_weight()?;
                let y = crate::ops::fp8::linear_rows(x8, &weight, self.bias.as_ref(), gelu)?;
                return y.reshape(out_shape);
            }
            (None, Some(x)) => x,
            (None, None) => candle_core::bail!("linear: an input with neither values nor rows"),
        };
        let weight = self.weight_in(x.dtype())?;
        #[cfg(feature = "cuda")]
        if let Some(y) = self.with_epilogue(&x.reshape((rows, in_dim))?, &weight, gelu)? {
            return y.reshape(out_shape);
        }
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

    /// `GELU_tanh(x·Wᵀ + b)` (the first half of Wan's FFN), the product as `precision` says.
    ///
    /// # Shapes
    /// - `x`: [..., in] → [..., out]
    pub fn forward_gelu_in(&self, x: &Tensor, precision: MatmulPrecision) -> Result<Tensor> {
        self.forward_act(&LinearInput::new(x, precision)?, true)
    }

    /// `x·Wᵀ + b`, the product as `precision` says.
    ///
    /// # Shapes
    /// - `x`: [..., in] → [..., out], in `x`'s dtype.
    pub fn forward_in(&self, x: &Tensor, precision: MatmulPrecision) -> Result<Tensor> {
        self.forward_act(&LinearInput::new(x, precision)?, false)
    }

    /// `GELU_tanh(x·Wᵀ + b)` of an input prepared once ([`LinearInput`]).
    ///
    /// # Shapes
    /// - `x`: [..., in] → [..., out], in `x`'s dtype.
    pub fn forward_gelu_prepared(&self, x: &LinearInput) -> Result<Tensor> {
        self.forward_act(x, true)
    }

    /// `x·Wᵀ + b` of an input prepared once for several layers ([`LinearInput`]).
    ///
    /// # Shapes
    /// - `x`: [..., in] → [..., out], in `x`'s dtype.
    pub fn forward_prepared(&self, x: &LinearInput) -> Result<Tensor> {
        self.forward_act(x, false)
    }

    /// On CUDA in bf16/f16 with a bias: `act(x·Wᵀ + b)` as one cuBLASLt product whose
    /// epilogue adds the bias (and GELU) in f32 before the output is rounded, rather than a
    /// second pass over the output; `None` where that does not apply or cuBLASLt cannot take
    /// the operands (logged once), so that the caller multiplies as before.
    ///
    /// # Shapes
    /// - `x`: [rows, in]; `weight`: [out, in] in `x`'s dtype; returns [rows, out].
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    fn with_epilogue(&self, x: &Tensor, weight: &Tensor, gelu: bool) -> Result<Option<Tensor>> {
        use crate::ops::lt::{matmul, Epilogue, Product};
        let (Some(bias), candle_core::Device::Cuda(cuda)) = (&self.bias, x.device()) else {
            return Ok(None);
        };
        if !matches!(x.dtype(), DType::BF16 | DType::F16) || weight.dtype() != x.dtype() {
            return Ok(None);
        }
        let (rows, inputs) = x.dims2()?;
        let outputs = weight.dim(0)?;
        let (x, weight) = (x.contiguous()?, weight.contiguous()?);
        let bias = bias.to_dtype(x.dtype())?.contiguous()?;
        let ptr = crate::ops::fused::device_ptr;
        let (y, yp) = crate::ops::fused::empty(&x, &[rows, outputs])?;
        let epilogue = if gelu {
            Epilogue::GeluBias(ptr(&bias)?)
        } else {
            Epilogue::Bias(ptr(&bias)?)
        };
        let product = Product {
            outputs,
            rows,
            inputs,
            operands: x.dtype(),
            output: x.dtype(),
        };
        // SAFETY: `weight` [outputs, inputs], `x` [rows, inputs] and the bias [outputs] are
        // contiguous tensors of one dtype (checked above), alive past the call; `y` is fresh.
        match unsafe {
            matmul(
                cuda,
                product,
                (ptr(&weight)?, ptr(&x)?, yp),
                1.0,
                epilogue,
                None,
            )
        } {
            Ok(()) => Ok(Some(y)),
            Err(e) => {
                static LOGGED: std::sync::Once = std::sync::Once::new();
                LOGGED.call_once(|| {
                    tracing::warn!("linear layers multiply without a fused epilogue: {e}")
                });
                Ok(None)
            }
        }
    }

    /// The weight in float8 with its scales, for [`MatmulPrecision::Fp8`]: a float8 weight as
    /// it is stored, any other quantised per output channel.
    fn fp8_weight(&self) -> Result<crate::ops::fp8::Fp8Weight> {
        use crate::ops::fp8::Fp8Weight;
        match (&self.scale, self.weight.dtype()) {
            (Some(scale), _) => Fp8Weight::scaled(self.weight.clone(), scale),
            (None, DType::F8E4M3) => Fp8Weight::scaled(
                self.weight.clone(),
                &Tensor::new(1f32, self.weight.device())?,
            ),
            _ => Fp8Weight::quantize(&self.weight),
        }
    }
}

impl Module for Linear {
    /// # Shapes
    /// - `x`: [..., in] → [..., out], computed in `x`'s dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(x, MatmulPrecision::Exact)
    }
}

/// `name` from `vb` in `dtype`, its shape checked against `shape`: [`VarBuilder::get_with_hints_dtype`],
/// which converts with candle's `to_dtype`. On a CUDA device that conversion fails for float8
/// tensors in candle 0.11.1 (it asks the kernel file for `cast_f8e4m3_*`, which defines
/// `cast_f8_e4m3_*`), and a `VarBuilder` does not tell a tensor's stored dtype without
/// converting it. So a failed load on CUDA asks for the tensor in float8: a tensor stored so
/// comes back unconverted and is dequantised with a scale of 1 by vpipe's own kernel (any other
/// would need the same broken cast, and fails as the first try did). Retrying through the host
/// does not work: the DiT's key-renaming `VarBuilder` reads on its inner builder's device.
/// Only small tensors (norms, modulation tables, biases, the patch embedding) take this way in
/// a float8 checkpoint.
pub(crate) fn get_in_dtype<S: Into<Shape>>(
    vb: &VarBuilder,
    shape: S,
    name: &str,
    dtype: DType,
) -> Result<Tensor> {
    let shape = shape.into();
    let direct = vb.get_with_hints_dtype(shape.clone(), name, Init::Const(0.), dtype);
    #[cfg(feature = "cuda")]
    if direct.is_err() && vb.device().is_cuda() {
        let stored = vb.get_with_hints_dtype(shape, name, Init::Const(0.), DType::F8E4M3);
        if let Ok(stored) = stored {
            let one = Tensor::new(1f32, vb.device())?;
            return crate::ops::fused::dequantize_fp8(&stored, &one, dtype);
        }
    }
    direct
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

    /// A plain float8 weight taken with a scale of exactly 1.0 (as a caller supplies for an
    /// unscaled e4m3 checkpoint) stays float8 and computes the f32 matmul of its values.
    #[test]
    fn plain_fp8_weight_with_unit_scale_matches_f32_matmul() -> Result<()> {
        let dev = Device::Cpu;
        // Values of every magnitude e4m3 holds, some of them rounded on the way in.
        let w = Tensor::new(
            &[
                [0.013f32, -0.75, 3.1, 448.0],
                [-0.001953125, 17.0, -2.6, 0.5],
                [1.0, -96.0, 0.0, 0.09],
            ],
            &dev,
        )?;
        let stored = w.to_dtype(DType::F8E4M3)?;
        let dequantised = stored.to_dtype(DType::F32)?;
        let bias = Tensor::new(&[0.25f32, -1.0, 2.0], &dev)?;
        let tensors = HashMap::from([
            ("l.weight".to_string(), stored),
            ("l.scale_weight".to_string(), Tensor::new(1f32, &dev)?),
            ("l.bias".to_string(), bias.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let lin = Linear::new(4, 3, true, vb.pp("l"))?;
        assert!(lin.is_scaled_fp8());
        assert_eq!(lin.weight.dtype(), DType::F8E4M3);
        let x = Tensor::new(&[[1.0f32, -2.0, 0.5, 0.125], [3.0, 0.25, -1.0, 2.0]], &dev)?;
        let expected = x.matmul(&dequantised.t()?)?.broadcast_add(&bias)?;
        assert_eq!(
            lin.forward(&x)?.to_vec2::<f32>()?,
            expected.to_vec2::<f32>()?
        );
        Ok(())
    }

    /// One input quantised once for several float8 products (q, k and v) gives each layer the
    /// product that quantising the input for it alone gives, and exact products ignore it.
    #[test]
    fn an_input_prepared_once_serves_every_layer_that_reads_it() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::arange(0f32, 24.0, &dev)?.reshape((2, 3, 4))? * 0.37)?
            .sin()?
            .to_dtype(DType::BF16)?;
        let layers = (0..3)
            .map(|i| {
                let w = (Tensor::arange(0f32, 20.0, &dev)?.reshape((5, 4))? * (0.3 + i as f64))?
                    .cos()?;
                let tensors = HashMap::from([
                    ("weight".to_string(), w),
                    (
                        "bias".to_string(),
                        Tensor::full(0.1f32 * i as f32, 5, &dev)?,
                    ),
                ]);
                Linear::new(
                    4,
                    5,
                    true,
                    VarBuilder::from_tensors(tensors, DType::BF16, &dev),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let fp8 = LinearInput::new(&x, MatmulPrecision::Fp8)?;
        let exact = LinearInput::new(&x, MatmulPrecision::Exact)?;
        assert!(fp8.fp8.is_some() && exact.fp8.is_none());
        for layer in &layers {
            let alone = crate::ops::fp8::linear(
                &x.reshape((6, 4))?,
                &layer.fp8_weight()?,
                layer.bias.as_ref(),
                false,
            )?
            .reshape((2, 3, 5))?;
            let shared = layer.forward_prepared(&fp8)?;
            let diff = (shared.to_dtype(DType::F32)? - alone.to_dtype(DType::F32)?)?;
            assert_eq!(diff.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
            let exact = layer.forward_prepared(&exact)?;
            let plain = layer.forward(&x)?;
            let diff = (exact.to_dtype(DType::F32)? - plain.to_dtype(DType::F32)?)?;
            assert_eq!(diff.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        }
        Ok(())
    }

    #[test]
    fn an_input_of_the_wrong_width_or_rank_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let tensors = HashMap::from([(
            "weight".to_string(),
            Tensor::ones((3, 2), DType::F32, &dev)?,
        )]);
        let lin = Linear::new(
            2,
            3,
            false,
            VarBuilder::from_tensors(tensors, DType::F32, &dev),
        )?;
        assert!(lin.forward(&Tensor::new(1f32, &dev)?).is_err());
        assert!(lin
            .forward(&Tensor::ones((4, 5), DType::F32, &dev)?)
            .is_err());
        let empty = lin.forward(&Tensor::ones((0, 2), DType::F32, &dev)?)?;
        assert_eq!(empty.dims(), &[0, 3]);
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
