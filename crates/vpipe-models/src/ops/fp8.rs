//! Float8 (e4m3) linear layers: the activations quantised per token (row), the weight per
//! output channel (or a stored scaled-fp8 weight with its one scale), the product in float8
//! with f32 accumulation, then both scales, the bias and the activation. On CUDA (compute
//! capability 8.9 or newer) the product is cuBLASLt's float8 matrix product; anywhere else the
//! same arithmetic is emulated (values quantised to float8 and back, the product in f32): the
//! reference the GPU path is tested against.
//!
//! On CUDA the scales, the bias and GELU are applied in the product's epilogue, to the f32
//! accumulator, and the output is rounded once, as the emulation does (cuBLASLt's "outer
//! vector" scaling, cuBLAS 12.9 or newer). Where cuBLASLt has no such algorithm the product is
//! rounded to the activations' dtype first (scaled so that it fits in f16) and one pass of
//! vpipe's (a block per row, eight elements a thread) applies the rest: one more rounding,
//! within float8's error.

use candle_core::{DType, Tensor, D};

/// The largest finite float8 e4m3 value: a scale maps each row's largest |value| to it.
const FP8_MAX: f64 = 448.0;

/// The smallest scale, for a row of zeros (whose values stay zeros).
const MIN_SCALE: f64 = 1e-12;

/// Whether `device` runs [`linear`]: the CPU (emulated) and CUDA devices of compute
/// capability 8.9 or newer (Ada, Hopper, Blackwell), whose cuBLASLt has float8 products; else
/// why not.
pub fn runs_on(device: &candle_core::Device) -> std::result::Result<(), String> {
    if device.is_cpu() {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
        let context = cuda.cuda_stream().context().clone();
        let capability = context
            .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .and_then(|major| {
                context
                    .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                    .map(|minor| (major, minor))
            })
            .map_err(|e| format!("reading the GPU's compute capability: {e}"))?;
        if capability < (8, 9) {
            return Err(format!(
                "this GPU's compute capability is {}.{}; float8 products need 8.9 or newer \
                 (Ada, Hopper, Blackwell)",
                capability.0, capability.1
            ));
        }
    }
    Ok(())
}

/// A weight in float8 for [`linear`]: its [out, in] values and the f32 scales that give them
/// back (`w ≈ w8 · scale`), one per output channel or one for all.
#[derive(Debug, Clone)]
pub struct Fp8Weight {
    weight: Tensor,
    scales: Tensor,
}

impl Fp8Weight {
    /// `weight` [out, in] (f32, bf16 or f16) quantised with one scale per output channel:
    /// the channel's largest |w| over 448.
    pub fn quantize(weight: &Tensor) -> candle_core::Result<Self> {
        let (rows, _) = weight.dims2()?;
        let (weight, scales) = quantize_per_row(&weight.contiguous()?, rows)?;
        Ok(Self { weight, scales })
    }

    /// A stored scaled-fp8 weight (ComfyUI's `w = w8 · scale`), used as it is.
    ///
    /// # Shapes
    /// - `weight`: [out, in] float8 e4m3; `scale`: one element.
    pub fn scaled(weight: Tensor, scale: &Tensor) -> candle_core::Result<Self> {
        weight.dims2()?;
        if weight.dtype() != DType::F8E4M3 || scale.elem_count() != 1 {
            candle_core::bail!(
                "fp8 weight: expected float8 e4m3 values and one scale, got {:?} and {:?}",
                weight.dtype(),
                scale.dims()
            );
        }
        let scales = scale
            .to_device(weight.device())?
            .to_dtype(DType::F32)?
            .reshape(1)?;
        Ok(Self {
            weight: weight.contiguous()?,
            scales,
        })
    }
}

/// Activations in float8 for [`linear_rows`]: `x` quantised per row once, for every product
/// that reads the same input (the queries', keys' and values' projections of one attention).
#[derive(Debug)]
pub struct Fp8Rows {
    /// [padded rows, in] float8 e4m3: on CUDA the rows up to a multiple of 16 are zeros.
    values: Tensor,
    /// [padded rows] f32, zeros for the padding.
    scales: Tensor,
    rows: usize,
    dtype: DType,
}

impl Fp8Rows {
    /// `x` quantised with one scale per row: the row's largest |value| over 448.
    ///
    /// # Shapes
    /// - `x`: [rows, in], bf16 or f16.
    pub fn quantize(x: &Tensor) -> candle_core::Result<Self> {
        let (rows, _) = x.dims2()?;
        if !matches!(x.dtype(), DType::BF16 | DType::F16) {
            candle_core::bail!("fp8 linear: input in {:?}; expected bf16 or f16", x.dtype());
        }
        let padded = padded_rows(rows, x.device());
        let (values, scales) = quantize_per_row(&x.contiguous()?, padded)?;
        Ok(Self {
            values,
            scales,
            rows,
            dtype: x.dtype(),
        })
    }

    /// `LN(x) · mul + add` ([`crate::ops::fused::ln_modulate`]) quantised per row as
    /// [`Self::quantize`] quantises, in the same pass over `x` and from the norm's f32 values
    /// (not rounded to x's dtype first); `None` where that kernel does not take `x` (the
    /// caller norms, then quantises).
    ///
    /// # Shapes
    /// - `x`: [B, L, D], bf16 or f16; `mul`, `add`: [B, 1, D] or [1, 1, D], f32. The rows are
    ///   x's B·L tokens.
    #[cfg(feature = "cuda")]
    pub(crate) fn layer_norm_modulated(
        x: &Tensor,
        (mul, add, eps): (&Tensor, &Tensor, f32),
    ) -> candle_core::Result<Option<Self>> {
        let (b, l, _) = x.dims3()?;
        let padded = padded_rows(b * l, x.device());
        Ok(
            crate::ops::fused::ln_modulate_fp8(x, (mul, add, eps), padded)?.map(
                |(values, scales)| Self {
                    values,
                    scales,
                    rows: b * l,
                    dtype: x.dtype(),
                },
            ),
        )
    }

    /// cuDNN's float8 attention output `o8` made the output projection's float8 input: per
    /// token row `float(o8) · scale + mean[b]` (the values' mean back), quantised as
    /// [`Self::quantize`] quantises, in one pass and from f32 (the 16-bit output is never
    /// written); `None` where that kernel does not take the operands.
    ///
    /// # Shapes
    /// - `o8`: [B, L, C] float8 e4m3; `scale`: one f32; `mean`: B·C f32. The rows are the
    ///   B·L tokens, as `dtype` (the attention's) they stand for.
    #[cfg(feature = "cuda")]
    pub(crate) fn attention_output(
        o8: &Tensor,
        (scale, mean): (&Tensor, &Tensor),
        dtype: DType,
    ) -> candle_core::Result<Option<Self>> {
        let (b, l, _) = o8.dims3()?;
        let padded = padded_rows(b * l, o8.device());
        Ok(
            crate::ops::fused::dequantize_rows_with_mean_fp8(o8, (scale, mean), dtype, padded)?
                .map(|(values, scales)| Self {
                    values,
                    scales,
                    rows: b * l,
                    dtype,
                }),
        )
    }
}

/// The rows a float8 input of `rows` rows is stored with: cuBLASLt's float8 products take
/// whole tiles of 16 rows, so on CUDA the rows past `rows` are zeros, and their outputs are
/// left out (a prefix of a row-major tensor, no copy).
fn padded_rows(rows: usize, device: &candle_core::Device) -> usize {
    if device.is_cuda() {
        rows.next_multiple_of(16)
    } else {
        rows
    }
}

/// `act(x · Wᵀ + bias)` in float8: `x` quantised per row, the product accumulated in f32,
/// times the row's and the channel's scales, plus the bias, then GELU(tanh) when `gelu`,
/// rounded to `x`'s dtype.
///
/// # Shapes
/// - `x`: [rows, in], bf16 or f16; `bias`: [out]; returns [rows, out] in `x`'s dtype.
pub fn linear(
    x: &Tensor,
    weight: &Fp8Weight,
    bias: Option<&Tensor>,
    gelu: bool,
) -> candle_core::Result<Tensor> {
    let (outputs, weight_inputs) = weight.weight.dims2()?;
    if x.dims2()?.1 != weight_inputs || !matches!(x.dtype(), DType::BF16 | DType::F16) {
        candle_core::bail!(
            "fp8 linear: input {:?} {:?} for a weight of [{outputs}, {weight_inputs}]; expected \
             [rows, {weight_inputs}] in bf16 or f16",
            x.dims(),
            x.dtype()
        );
    }
    linear_rows(&Fp8Rows::quantize(x)?, weight, bias, gelu)
}

/// [`linear`] of activations already in float8, so that products of one input quantise it
/// once.
///
/// # Shapes
/// - `x`: [rows, in]; `bias`: [out]; returns [rows, out] in the dtype `x` was quantised from.
pub fn linear_rows(
    x: &Fp8Rows,
    weight: &Fp8Weight,
    bias: Option<&Tensor>,
    gelu: bool,
) -> candle_core::Result<Tensor> {
    let (outputs, weight_inputs) = weight.weight.dims2()?;
    let inputs = x.values.dim(1)?;
    if inputs != weight_inputs {
        candle_core::bail!(
            "fp8 linear: input of [{}, {inputs}] for a weight of [{outputs}, {weight_inputs}]",
            x.rows
        );
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = x.values.device() {
        let operands = (&x.values, &x.scales, weight);
        if let Some(y) = cuda_kernels::scaled_product(cuda, operands, bias, gelu, x.dtype)? {
            return y.narrow(0, 0, x.rows);
        }
        let y = cuda_kernels::unscaled_product(cuda, x, weight)?.narrow(0, 0, x.rows)?;
        cuda_kernels::scale_bias_act(&y, &x.scales, &weight.scales, bias, gelu)?;
        return Ok(y);
    }
    let product = x
        .values
        .to_dtype(DType::F32)?
        .matmul(&weight.weight.to_dtype(DType::F32)?.t()?)?
        .broadcast_mul(&x.scales.unsqueeze(1)?)?
        .broadcast_mul(&weight.scales.unsqueeze(0)?)?;
    let y = match bias {
        Some(b) => product.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => product,
    };
    let y = if gelu { y.gelu()? } else { y };
    y.to_dtype(x.dtype)
}

/// `x` [rows, cols] in float8 e4m3 with one scale per row, its largest |value| over 448 (at
/// least [`MIN_SCALE`]): the rows divided by their scales and rounded (saturating), followed
/// by zero rows up to `padded_rows` (on CUDA; the CPU pads nothing), and the f32 scales, one
/// per row (zeros for the padding).
fn quantize_per_row(x: &Tensor, padded_rows: usize) -> candle_core::Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda_kernels::quantize_rows(x, padded_rows);
    }
    let _ = padded_rows;
    let scales = x
        .to_dtype(DType::F32)?
        .abs()?
        .max(D::Minus1)?
        .affine(1.0 / FP8_MAX, 0.0)?
        .maximum(MIN_SCALE)?;
    let x8 = x
        .to_dtype(DType::F32)?
        .broadcast_div(&scales.unsqueeze(1)?)?
        .clamp(-FP8_MAX, FP8_MAX)?
        .to_dtype(DType::F8E4M3)?;
    Ok((x8, scales))
}

#[cfg(all(feature = "cuda", feature = "bench-hooks"))]
pub use cuda_kernels::set_scales_in_product;
#[cfg(feature = "cuda")]
pub(crate) use cuda_kernels::{
    add_channel_offsets, quantize_centred, quantize_per_tensor, ChannelOffsets,
};

#[cfg(feature = "cuda")]
mod cuda_kernels {
    //! The CUDA side of [`super::linear`]: vpipe's kernels (`kernels/fp8.cu`) and cuBLASLt's
    //! float8 product.
    #![allow(unsafe_code)]

    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, DType, Tensor};
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::ops::fused::{device_ptr, empty, empty_on, suffix};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fp8.ptx"));

    /// What the float8 product is multiplied by before it is rounded to the activations' dtype
    /// (and divided by after) where the scales cannot be applied in the product: each of its
    /// terms is at most 448² = 2¹⁷·⁶, so a product over k inputs stays under 3.1·k, within
    /// f16's 65 504 for k up to 21 000 (Wan's widest is 13 824). A power of two, so the two
    /// steps round nothing.
    pub(super) const PRODUCT_SCALE: f64 = 1.0 / 65_536.0;

    /// Set once cuBLASLt has refused a product with its scales in the epilogue (without GELU,
    /// with GELU): it has no such algorithm here, and those products apply them in a pass of
    /// their own from then on.
    static SCALES_REFUSED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

    /// Whether the products may apply the scales in cuBLASLt's epilogue (the default) rather
    /// than in vpipe's pass after an unscaled product, for the benchmarks that time both ways.
    #[cfg(feature = "bench-hooks")]
    pub fn set_scales_in_product(on: bool) {
        for refused in &SCALES_REFUSED {
            refused.store(!on, Ordering::Relaxed);
        }
    }

    /// `act(x8 · w8ᵀ · row_scale · column_scale + bias)` in one cuBLASLt product, its f32
    /// accumulator scaled and the bias and GELU added in the epilogue, rounded once to
    /// `dtype`; `None` (nothing written) where cuBLASLt has no such algorithm, GELU comes
    /// without a bias, or an earlier product of the same epilogue was refused.
    ///
    /// # Shapes
    /// - `x8`: [rows, in] float8 with `row_scales` [rows] f32, `rows` a multiple of 16;
    ///   `weight`: [out, in]; `bias`: [out]; returns [rows, out] in `dtype`.
    pub(super) fn scaled_product(
        device: &CudaDevice,
        (x8, row_scales, weight): (&Tensor, &Tensor, &super::Fp8Weight),
        bias: Option<&Tensor>,
        gelu: bool,
        dtype: DType,
    ) -> candle_core::Result<Option<Tensor>> {
        use crate::ops::lt::{matmul, Epilogue, OuterScales, Product};
        let refused = &SCALES_REFUSED[usize::from(gelu)];
        if refused.load(Ordering::Relaxed) || (gelu && bias.is_none()) {
            return Ok(None);
        }
        let (rows, inputs) = x8.dims2()?;
        let outputs = weight.weight.dim(0)?;
        // One scale per output feature, also for a stored weight's single one.
        let column_scales = weight.scales.broadcast_as(outputs)?.contiguous()?;
        let bias = bias.map(|b| b.to_dtype(dtype)?.contiguous()).transpose()?;
        let epilogue = match (&bias, gelu) {
            (Some(b), true) => Epilogue::GeluBias(device_ptr(b)?),
            (Some(b), false) => Epilogue::Bias(device_ptr(b)?),
            (None, _) => Epilogue::None,
        };
        let like = Tensor::zeros((), dtype, x8.device())?;
        let (y, yp) = empty(&like, &[rows, outputs])?;
        let product = Product {
            outputs,
            rows,
            inputs,
            operands: DType::F8E4M3,
            output: dtype,
        };
        let scales = OuterScales {
            weight: device_ptr(&column_scales)?,
            rows: device_ptr(row_scales)?,
        };
        let operands = (device_ptr(&weight.weight)?, device_ptr(x8)?, yp);
        // SAFETY: `weight.weight` [outputs, inputs] and `x8` [rows, inputs] are contiguous
        // float8 (`device_ptr` checks); `column_scales` and `row_scales` hold `outputs` and
        // `rows` f32; the bias `outputs` elements of `dtype`; `y` is fresh. All outlive the
        // call, which is queued on their stream.
        match unsafe { matmul(device, product, operands, 1.0, epilogue, Some(scales)) } {
            Ok(()) => Ok(Some(y)),
            Err(e) => {
                if !refused.swap(true, Ordering::Relaxed) {
                    let which = if gelu { " with GELU" } else { "" };
                    tracing::warn!(
                        "float8 products{which} apply their scales in a pass of their own: {e}"
                    );
                }
                Ok(None)
            }
        }
    }

    /// `{base}_{dtype}` from `kernels/fp8.cu`.
    fn name(base: &str, dtype: DType) -> candle_core::Result<String> {
        Ok(format!("{base}_{}", suffix(dtype)?))
    }

    /// `x` [rows, cols] in e4m3 with one scale per row (see [`super::quantize_per_row`]), in
    /// one kernel: one block per row.
    pub(super) fn quantize_rows(
        x: &Tensor,
        padded_rows: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (rows, cols) = x.dims2()?;
        let x = x.contiguous()?;
        let padded_rows = padded_rows.max(rows);
        if rows == 0 || cols == 0 {
            let out = Tensor::zeros((padded_rows, cols), DType::F8E4M3, x.device())?;
            let scales = Tensor::ones(padded_rows, DType::F32, x.device())?;
            return Ok((out, scales));
        }
        if let Some(RowsDone::Quantised(values, scales)) =
            rows_pass(&x, rows, RowsPass::default(), Some(padded_rows))?
        {
            return Ok((values, scales));
        }
        let scales = Tensor::zeros(padded_rows, DType::F32, x.device())?;
        // The kernel writes the first `rows` rows; only the padding is zeroed here.
        let like = Tensor::zeros((), DType::F8E4M3, x.device())?;
        let (out, op) = empty(&like, &[padded_rows, cols])?;
        if padded_rows > rows {
            let padding = Tensor::zeros((padded_rows - rows, cols), DType::F8E4M3, x.device())?;
            out.slice_set(&padding, 0, rows)?;
        }
        let sp = device_ptr(&scales)?;
        let func = x.device().as_cuda_device()?.get_or_load_custom_func(
            &name("quantize_rows", x.dtype())?,
            "vpipe_fp8",
            PTX,
        )?;
        let (xp, cols) = (device_ptr(&x)?, cols as i32);
        let mut a = func.builder();
        a.arg(&xp);
        a.arg(&sp);
        a.arg(&op);
        a.arg(&cols);
        let cfg = one_block_per_row(rows)?;
        // SAFETY: `x` is contiguous [rows, cols]; `out` holds at least `rows · cols` bytes and
        // `scales` `rows` f32, which the kernel writes, one block per row, on their stream.
        unsafe { a.launch(cfg) }.w()?;
        Ok((out, scales))
    }

    /// A launch of one block of 256 threads per row.
    fn one_block_per_row(rows: usize) -> candle_core::Result<LaunchConfig> {
        let grid = u32::try_from(rows).map_err(|_| {
            candle_core::Error::Msg(format!("fp8: {rows} rows, more than one launch covers"))
        })?;
        Ok(LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// An offset per channel of a [B, H, L, D] tensor laid out with its L axis outside H and
    /// D (token-major) or outside D only (head-major): element i of its memory is paired with
    /// `values[(i / span) · inner + i % inner]`, where `inner` is the L axis's stride and
    /// `span` L times it; `values` is f32 [B, H, D] (contiguous). Attention's keys and values
    /// less their mean over the keys, and the values' mean added back to the output.
    pub(crate) struct ChannelOffsets {
        values: Tensor,
        inner: i64,
        span: i64,
    }

    /// How many consecutive elements of `x` [B, H, L, D] in memory are channels of one token:
    /// H·D where x is token-major ([B, L, H, D] memory), D where head-major; `None` for any
    /// other layout.
    fn channel_run(x: &Tensor) -> candle_core::Result<Option<usize>> {
        let (_, h, l, d) = x.dims4()?;
        let stride = x.layout().stride();
        let (token_major, head_major) = ([l * h * d, d, h * d, 1], [h * l * d, l * d, d, 1]);
        // Axes of one element take any stride.
        let matches =
            |expected: [usize; 4]| (0..4).all(|a| x.dims()[a] == 1 || stride[a] == expected[a]);
        Ok(if matches(token_major) {
            Some(h * d)
        } else if matches(head_major) {
            Some(d)
        } else {
            None
        })
    }

    impl ChannelOffsets {
        /// `values` ([B, 1, H, D] or any shape of B·H·D elements) paired with `x` [B, H, L, D];
        /// `None` where x's layout is neither of the two the indexing covers.
        pub(crate) fn for_layout(values: &Tensor, x: &Tensor) -> candle_core::Result<Option<Self>> {
            let (b, h, l, d) = x.dims4()?;
            let Some(inner) = channel_run(x)? else {
                return Ok(None);
            };
            if values.elem_count() != b * h * d {
                candle_core::bail!(
                    "channel offsets: {} values for [{b}, {h}, {l}, {d}]",
                    values.elem_count()
                );
            }
            Ok(Some(Self {
                values: values.to_dtype(DType::F32)?.contiguous()?,
                inner: inner as i64,
                span: (l * inner) as i64,
            }))
        }

        /// The kernels' arguments: the values' address (0 for none), inner, span.
        fn arguments(offsets: Option<&Self>) -> candle_core::Result<(u64, i64, i64)> {
            Ok(match offsets {
                Some(o) => (device_ptr(&o.values)?, o.inner, o.span),
                None => (0, 1, 1),
            })
        }
    }

    /// One thread for each of `threads` units of work, in blocks of 256: at 1024 a block
    /// (cudarc's `for_num_elems`), these kernels' 38 registers a thread let one block, half
    /// the threads, stay on a multiprocessor (Nsight Compute, H100).
    fn per_thread_launch(threads: u32) -> LaunchConfig {
        const BLOCK: u32 = 256;
        LaunchConfig {
            grid_dim: (threads.div_ceil(BLOCK).max(1), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `n` elements as one launch's count.
    fn elements_u32(n: usize) -> candle_core::Result<u32> {
        u32::try_from(n).map_err(|_| {
            candle_core::Error::Msg(format!("fp8: {n} elements, more than one launch covers"))
        })
    }

    /// How many of the `n` elements of `dtype` from the device address `x`, in rows of `cols`,
    /// a thread can take at a time: 8 or 4 for 16-bit elements whose address allows one 16- or
    /// 8-byte access per group and whose groups lie within a row and within a block of offsets
    /// (16-byte aligned, read as 16-byte words) (the kernels' `_x8` and `_x4` variants), else 1.
    fn group_width(
        x: u64,
        dtype: DType,
        (n, cols): (usize, usize),
        offsets: Option<&ChannelOffsets>,
    ) -> usize {
        let fits = |width: usize| {
            matches!(dtype, DType::BF16 | DType::F16)
                && x.is_multiple_of(2 * width as u64)
                && n.is_multiple_of(width)
                && cols.is_multiple_of(width)
                && offsets.is_none_or(|o| {
                    o.inner % width as i64 == 0
                        && device_ptr(&o.values).is_ok_and(|p| p.is_multiple_of(16))
                })
        };
        [8, 4].into_iter().find(|&w| fits(w)).unwrap_or(1)
    }

    /// `{base}_x{width}_{dtype}`, or `{base}_{dtype}` for one element a thread.
    fn grouped(base: &str, dtype: DType, width: usize) -> candle_core::Result<String> {
        if width == 1 {
            name(base, dtype)
        } else {
            name(&format!("{base}_x{width}"), dtype)
        }
    }

    /// The largest |value| (less its channel's offset, where given) of the `rows · cols`
    /// elements from the device address `x` (of `dtype`), f32 [1] on `device`: one kernel,
    /// a block's largest merged by an atomic maximum.
    fn absmax_at(
        (x, dtype): (u64, DType),
        offsets: Option<&ChannelOffsets>,
        device: &candle_core::Device,
        (rows, cols): (usize, usize),
    ) -> candle_core::Result<Tensor> {
        let out = Tensor::zeros(1, DType::F32, device)?;
        let n = rows * cols;
        if n == 0 {
            return Ok(out);
        }
        let per_thread = group_width(x, dtype, (n, cols), offsets);
        let (offsets, inner, span) = ChannelOffsets::arguments(offsets)?;
        let kernel = grouped("absmax_all", dtype, per_thread)?;
        let func = device
            .as_cuda_device()?
            .get_or_load_custom_func(&kernel, "vpipe_fp8", PTX)?;
        // Enough blocks to fill the GPU; each thread strides over the rest.
        let blocks = (n / per_thread).div_ceil(256).clamp(1, 1024) as u32;
        let (op, n64) = (device_ptr(&out)?, n as i64);
        let mut a = func.builder();
        a.arg(&x);
        a.arg(&offsets);
        a.arg(&inner);
        a.arg(&span);
        a.arg(&op);
        a.arg(&n64);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's `x` addresses `n` live elements of `dtype` (8-byte aligned in
        // groups where a grouped kernel runs: `group_width`); `out` holds one f32, zero before;
        // the offsets, when given, cover every index the pairing gives for them
        // (`ChannelOffsets::for_layout`). The kernel reads and writes only those, on the
        // device's stream.
        unsafe { a.launch(cfg) }.w()?;
        Ok(out)
    }

    /// Writes the `rows · cols` elements from the device address `x` (of `dtype`) over their
    /// rows' `scales` (f32 [rows], or one for all) into the start of the float8 tensor `out`.
    fn quantize_at(
        (x, dtype): (u64, DType),
        scales: &Tensor,
        offsets: Option<&ChannelOffsets>,
        out: &Tensor,
        (rows, cols): (usize, usize),
    ) -> candle_core::Result<()> {
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        if out.dtype() != DType::F8E4M3 || out.elem_count() < n {
            candle_core::bail!(
                "fp8 quantize: {n} elements into {:?} {:?}",
                out.dims(),
                out.dtype()
            );
        }
        let scales = scales.to_dtype(DType::F32)?.contiguous()?;
        let stride = i32::from(scales.elem_count() != 1);
        let (sp, op) = (device_ptr(&scales)?, device_ptr(out)?);
        // A group's float8 bytes are stored as one word.
        let width = group_width(x, dtype, (n, cols), offsets);
        let per_thread = [8, 4]
            .into_iter()
            .find(|&w| w <= width && op.is_multiple_of(w as u64))
            .unwrap_or(1);
        let (offsets, inner, span) = ChannelOffsets::arguments(offsets)?;
        let kernel = grouped("quantize_fp8", dtype, per_thread)?;
        let threads = elements_u32(n / per_thread)?;
        let func =
            out.device()
                .as_cuda_device()?
                .get_or_load_custom_func(&kernel, "vpipe_fp8", PTX)?;
        let (n64, cols) = (n as i64, cols as i32);
        let mut a = func.builder();
        a.arg(&x);
        a.arg(&sp);
        a.arg(&stride);
        a.arg(&offsets);
        a.arg(&inner);
        a.arg(&span);
        a.arg(&op);
        a.arg(&n64);
        a.arg(&cols);
        // SAFETY: the caller's `x` addresses `n` live elements of `dtype` (aligned for groups
        // where a grouped kernel runs, as is `out`); `out` holds at least `n` bytes (checked);
        // `scales` one f32 per row (stride 1) or one (stride 0); the offsets, when given,
        // cover every index their pairing gives.
        unsafe { a.launch(per_thread_launch(threads)) }.w()?;
        Ok(())
    }

    /// `x` in float8 e4m3 with one scale for all of it, in its own memory order: the float8
    /// elements [n] (the i-th element of `x`'s storage span at the i-th byte) and the f32 [1]
    /// descale that gives the values back (`x ≈ x8 · descale`: the largest |x| over 448). The
    /// float8 copy has `x`'s strides; a view whose elements do not fill their span is made
    /// contiguous first, and the strides returned are those of what was quantised.
    ///
    /// With `mean` ([B, 1, H, D], x [B, H, L, D]), each element less its channel's mean is
    /// quantised instead (`x − mean ≈ x8 · descale`), x made contiguous first where its layout
    /// is neither token- nor head-major ([`ChannelOffsets`]).
    pub(crate) fn quantize_per_tensor(
        x: &Tensor,
        mean: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor, Vec<usize>)> {
        let mut x = if fills_its_span(x) {
            x.clone()
        } else {
            x.contiguous()?
        };
        let offsets = match mean {
            None => None,
            Some(mean) => match ChannelOffsets::for_layout(mean, &x)? {
                Some(offsets) => Some(offsets),
                None => {
                    x = x.contiguous()?;
                    ChannelOffsets::for_layout(mean, &x)?
                }
            },
        };
        let (ptr, rows_cols) = rows_of(&x)?;
        let absmax = absmax_at((ptr, x.dtype()), offsets.as_ref(), x.device(), rows_cols)?;
        quantize_to_absmax(&x, offsets.as_ref(), &absmax)
    }

    /// `x` (a [B, H, L, D] tensor, token- or head-major, bf16 or f16) less each channel's
    /// mean over L, quantised as [`quantize_per_tensor`] with that mean quantises it, and the
    /// mean (f32 [B, 1, H, D]); the mean and the largest |x − mean| come from one pass over
    /// x. `None` where x's layout, dtype or alignment is not one that pass takes.
    #[allow(clippy::type_complexity)]
    pub(crate) fn quantize_centred(
        x: &Tensor,
    ) -> candle_core::Result<Option<((Tensor, Tensor, Vec<usize>), Tensor)>> {
        let Some((mean, absmax)) = centred_spread(x)? else {
            return Ok(None);
        };
        let Some(offsets) = ChannelOffsets::for_layout(&mean, x)? else {
            return Ok(None);
        };
        Ok(Some((
            quantize_to_absmax(x, Some(&offsets), &absmax)?,
            mean,
        )))
    }

    /// `x`'s first element's address, and its elements as (rows, cols) of its last axis.
    fn rows_of(x: &Tensor) -> candle_core::Result<(u64, (usize, usize))> {
        let n = x.elem_count();
        let cols = x.dims().last().copied().unwrap_or(1).max(1);
        if !n.is_multiple_of(cols) {
            candle_core::bail!("fp8 quantize: {n} elements in rows of {cols}");
        }
        Ok((crate::ops::fused::layout_ptr(x)?, (n / cols, cols)))
    }

    /// [`quantize_per_tensor`] of `x` (whose elements fill their span) given its largest
    /// |value| (less the offsets, where given), f32 [1].
    fn quantize_to_absmax(
        x: &Tensor,
        offsets: Option<&ChannelOffsets>,
        absmax: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Vec<usize>)> {
        let (ptr, (rows, cols)) = rows_of(x)?;
        let n = rows * cols;
        let descale = absmax
            .affine(1.0 / super::FP8_MAX, 0.0)?
            .maximum(super::MIN_SCALE)?
            .reshape(1)?;
        // Every element is written by the kernel.
        let (out, _) = empty_on(x.device().as_cuda_device()?, DType::F8E4M3, &[n])?;
        quantize_at((ptr, x.dtype()), &descale, offsets, &out, (rows, cols))?;
        Ok((out, descale, x.layout().stride().to_vec()))
    }

    /// Each channel's mean over L of `x` [B, H, L, D] (f32 [B, 1, H, D]) and the largest
    /// |x − mean| over all of x (f32 [1]), from one pass over x in chunks of rows and a merge
    /// of the chunks (`channel_stats*` in kernels/fp8.cu; deterministic: no sum depends on
    /// timing); `None` where x is not token- or head-major ([`ChannelOffsets`]), not bf16 or
    /// f16, or its channel rows are not whole 16-byte groups.
    fn centred_spread(x: &Tensor) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        const VEC: usize = 8;
        let (b, h, l, d) = x.dims4()?;
        let Some(inner) = channel_run(x)? else {
            return Ok(None);
        };
        let outer = b * h * d / inner;
        let xp = crate::ops::fused::layout_ptr(x)?;
        if !matches!(x.dtype(), DType::BF16 | DType::F16)
            || !inner.is_multiple_of(VEC)
            || !xp.is_multiple_of(2 * VEC as u64)
            || b * h * l * d == 0
        {
            return Ok(None);
        }
        let device = x.device().as_cuda_device()?;
        // About four blocks per multiprocessor of the largest Hopper parts.
        let chunks = 528usize.div_ceil(outer).clamp(1, l);
        let rows_per_chunk = l.div_ceil(chunks);
        let chunks = l.div_ceil(rows_per_chunk);
        let groups = inner / VEC;
        // 256 threads: the kernel's 66 registers a thread leave room for three blocks a
        // multiprocessor; rows of more groups loop, of fewer go several at once.
        let threads = 256;
        let shared = if threads / groups > 1 {
            3 * threads * VEC * 4
        } else {
            0
        };
        let channels = outer * inner;
        let (_partial, pp) = empty_on(device, DType::F32, &[3, chunks, channels])?;
        let func = device.get_or_load_custom_func(
            &name("channel_stats_x8", x.dtype())?,
            "vpipe_fp8",
            PTX,
        )?;
        let (rows, inner32, per_chunk) = (l as i64, inner as i32, rows_per_chunk as i32);
        let mut a = func.builder();
        a.arg(&xp);
        a.arg(&pp);
        a.arg(&rows);
        a.arg(&inner32);
        a.arg(&per_chunk);
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, outer as u32, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        // SAFETY: `x` is [outer, l, inner] from `xp` with inner contiguous (its strides
        // checked above), 16-bit, 16-byte aligned with inner a multiple of eight; `partial`
        // holds 3 · chunks · outer · inner f32, each written by one thread; the shared
        // memory holds 3 · threads · 8 f32 where rows go several at once.
        unsafe { a.launch(cfg) }.w()?;
        let (mean, mp) = empty_on(device, DType::F32, &[b, 1, h, d])?;
        let absmax = Tensor::zeros(1, DType::F32, x.device())?;
        let ap = device_ptr(&absmax)?;
        let merge = device.get_or_load_custom_func("channel_stats_merge_f32", "vpipe_fp8", PTX)?;
        let (channels64, chunks32) = (channels as i64, chunks as i32);
        let mut a = merge.builder();
        a.arg(&pp);
        a.arg(&mp);
        a.arg(&ap);
        a.arg(&rows);
        a.arg(&channels64);
        a.arg(&chunks32);
        let cfg = LaunchConfig {
            grid_dim: (channels.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `partial` holds the chunks' values just written in stream order; `mean`
        // holds `channels` f32 (b·h·d, in the channel order the offsets pair with), each
        // written by one thread; `absmax` one f32, zero before.
        unsafe { a.launch(cfg) }.w()?;
        Ok(Some((mean, absmax)))
    }

    /// `y ← y + offset` per channel, in place (see [`ChannelOffsets`]; `y` a fresh tensor the
    /// caller owns, whose layout the offsets were paired with).
    pub(crate) fn add_channel_offsets(
        y: &Tensor,
        offsets: &ChannelOffsets,
    ) -> candle_core::Result<()> {
        let n = y.elem_count();
        if n == 0 {
            return Ok(());
        }
        let yp = crate::ops::fused::layout_ptr(y)?;
        let cols = y.dims().last().copied().unwrap_or(1).max(1);
        let per_thread = group_width(yp, y.dtype(), (n, cols), Some(offsets));
        let (op, inner, span) = ChannelOffsets::arguments(Some(offsets))?;
        let kernel = grouped("add_offsets", y.dtype(), per_thread)?;
        let func =
            y.device()
                .as_cuda_device()?
                .get_or_load_custom_func(&kernel, "vpipe_fp8", PTX)?;
        let (n32, n64) = (elements_u32(n / per_thread)?, n as i64);
        let mut a = func.builder();
        a.arg(&yp);
        a.arg(&op);
        a.arg(&inner);
        a.arg(&span);
        a.arg(&n64);
        // SAFETY: `y`'s `n` elements fill their span from `yp` (its layout is one the offsets
        // were paired with, token- or head-major); the offsets cover every index the pairing
        // gives; the caller holds no other reference to `y` while the kernel writes it.
        unsafe { a.launch(per_thread_launch(n32)) }.w()?;
        Ok(())
    }

    /// Whether `x`'s elements fill the memory from its first one to its last (a permutation of
    /// a contiguous tensor, such as a transposed view), so that quantising that memory in
    /// order quantises exactly `x`.
    fn fills_its_span(x: &Tensor) -> bool {
        let mut axes: Vec<(usize, usize)> = x
            .layout()
            .stride()
            .iter()
            .copied()
            .zip(x.dims().iter().copied())
            .filter(|&(_, n)| n > 1)
            .collect();
        axes.sort_unstable();
        let mut expected = 1;
        for (stride, n) in axes {
            if stride != expected {
                return false;
            }
            expected *= n;
        }
        true
    }

    /// What [`rows_pass`] applies to each row: `act(x · factor · row_scales[r] ·
    /// column_scales[c] + bias[c])`, a missing term left out.
    #[derive(Clone, Copy)]
    pub(super) struct RowsPass<'a> {
        pub(super) factor: f32,
        pub(super) row_scales: Option<&'a Tensor>,
        pub(super) column_scales: Option<&'a Tensor>,
        pub(super) bias: Option<&'a Tensor>,
        pub(super) gelu: bool,
    }

    impl Default for RowsPass<'_> {
        fn default() -> Self {
            Self {
                factor: 1.0,
                row_scales: None,
                column_scales: None,
                bias: None,
                gelu: false,
            }
        }
    }

    /// What [`rows_pass`] did.
    pub(super) enum RowsDone {
        /// Wrote the rows back in place.
        InPlace,
        /// Quantised them: float8 values [padded, cols] and their f32 scales [padded].
        Quantised(Tensor, Tensor),
    }

    /// `pass` over the first `rows` rows of `x` [≥ rows, cols] (contiguous), eight elements a
    /// thread, one block per row: in place without `quantise_to`; with `Some(padded)`, into
    /// float8 with one scale per row as [`quantize_rows`] makes them, `padded` rows of which
    /// those past `rows` are zeros. `None` (nothing done) where the eight-wide kernel does
    /// not apply: not 16-bit, rows of other than a multiple of eight, or an unaligned operand.
    pub(super) fn rows_pass(
        x: &Tensor,
        rows: usize,
        pass: RowsPass,
        quantise_to: Option<usize>,
    ) -> candle_core::Result<Option<RowsDone>> {
        const VEC: usize = 8;
        let cols = x.dim(1)?;
        let bias = pass
            .bias
            .map(|b| b.to_dtype(x.dtype())?.contiguous())
            .transpose()?;
        let (xp, bp) = (device_ptr(x)?, bias.as_ref().map(device_ptr).transpose()?);
        let aligned = |p: u64| p.is_multiple_of(2 * VEC as u64);
        if !matches!(x.dtype(), DType::BF16 | DType::F16)
            || !cols.is_multiple_of(VEC)
            || !aligned(xp)
            || bp.is_some_and(|p| !aligned(p))
            || x.dim(0)? < rows
        {
            return Ok(None);
        }
        let grid_rows = quantise_to.unwrap_or(rows).max(rows);
        let quantised = match quantise_to {
            Some(_) => {
                let like = Tensor::zeros((), DType::F8E4M3, x.device())?;
                let (values, vp) = empty(&like, &[grid_rows, cols])?;
                let (scales, sp) =
                    empty_on(x.device().as_cuda_device()?, DType::F32, &[grid_rows])?;
                Some(((values, vp), (scales, sp)))
            }
            None => None,
        };
        let done = |quantised: Option<((Tensor, u64), (Tensor, u64))>| {
            Some(match quantised {
                Some(((values, _), (scales, _))) => RowsDone::Quantised(values, scales),
                None => RowsDone::InPlace,
            })
        };
        if grid_rows == 0 || cols == 0 {
            return Ok(done(quantised));
        }
        let column_stride = i32::from(pass.column_scales.is_some_and(|c| c.elem_count() != 1));
        let pointer = |t: Option<&Tensor>| t.map(device_ptr).transpose().map(|p| p.unwrap_or(0));
        let (rp, cp) = (pointer(pass.row_scales)?, pointer(pass.column_scales)?);
        let (yp, y8p, y8s) = match &quantised {
            Some(((_, vp), (_, sp))) => (0u64, *vp, *sp),
            None => (xp, 0, 0),
        };
        let func = x.device().as_cuda_device()?.get_or_load_custom_func(
            &name("rows_scale_act_x8", x.dtype())?,
            "vpipe_fp8",
            PTX,
        )?;
        let (gelu, cols32, rows32) = (i32::from(pass.gelu), cols as i32, rows as i32);
        let bp = bp.unwrap_or(0);
        let mut a = func.builder();
        a.arg(&xp);
        a.arg(&pass.factor);
        a.arg(&rp);
        a.arg(&cp);
        a.arg(&column_stride);
        a.arg(&bp);
        a.arg(&gelu);
        a.arg(&yp);
        a.arg(&y8p);
        a.arg(&y8s);
        a.arg(&cols32);
        a.arg(&rows32);
        // SAFETY: `x` holds at least `rows` contiguous rows of `cols` 16-bit elements, 16-byte
        // aligned (checked above); the scales hold one f32 per row and per column (or one);
        // the bias `cols` elements; `values` and `scales`, when quantising, are fresh tensors
        // of `grid_rows` rows that the kernel writes whole. All on the tensors' stream.
        unsafe { a.launch(one_block_per_row(grid_rows)?) }.w()?;
        Ok(done(quantised))
    }

    /// `y ← act(y / PRODUCT_SCALE · row_scales[r] · column_scales[c] + bias[c])` in place:
    /// the unscaled product's scales, bias and activation.
    pub(super) fn scale_bias_act(
        y: &Tensor,
        row_scales: &Tensor,
        column_scales: &Tensor,
        bias: Option<&Tensor>,
        gelu: bool,
    ) -> candle_core::Result<()> {
        let (rows, cols) = y.dims2()?;
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        let factor = (1.0 / PRODUCT_SCALE) as f32;
        let pass = RowsPass {
            factor,
            row_scales: Some(row_scales),
            column_scales: Some(column_scales),
            bias,
            gelu,
        };
        if rows_pass(y, rows, pass, None)?.is_some() {
            return Ok(());
        }
        let n32 = elements_u32(n)?;
        let column_stride = i32::from(column_scales.elem_count() != 1);
        let bias = bias
            .map(|b| b.to_dtype(y.dtype())?.contiguous())
            .transpose()?;
        let (yp, rp, cp) = (
            device_ptr(y)?,
            device_ptr(row_scales)?,
            device_ptr(column_scales)?,
        );
        let bp = bias.as_ref().map(device_ptr).transpose()?.unwrap_or(0);
        let func = y.device().as_cuda_device()?.get_or_load_custom_func(
            &name("scale_bias_act", y.dtype())?,
            "vpipe_fp8",
            PTX,
        )?;
        let (n64, cols, gelu) = (n as i64, cols as i32, i32::from(gelu));
        let mut a = func.builder();
        a.arg(&yp);
        a.arg(&factor);
        a.arg(&rp);
        a.arg(&cp);
        a.arg(&column_stride);
        a.arg(&bp);
        a.arg(&n64);
        a.arg(&cols);
        a.arg(&gelu);
        // SAFETY: `y` is the product's fresh contiguous output of `n` elements; the scales
        // hold one f32 per row and per column (or one); `bias`, when given, `cols` elements.
        unsafe { a.launch(LaunchConfig::for_num_elems(n32)) }.w()?;
        Ok(())
    }

    /// `y [rows, out] = x8 · w8ᵀ · PRODUCT_SCALE` over the padded rows of `x` (float8 in, f32
    /// accumulation, `x`'s dtype out; [`crate::ops::lt`]): the product that the scales are
    /// applied to afterwards.
    pub(super) fn unscaled_product(
        device: &CudaDevice,
        x: &super::Fp8Rows,
        weight: &super::Fp8Weight,
    ) -> candle_core::Result<Tensor> {
        let (rows, inputs) = x.values.dims2()?;
        let outputs = weight.weight.dim(0)?;
        let (y, yp) = empty_on(device, x.dtype, &[rows, outputs])?;
        let product = crate::ops::lt::Product {
            outputs,
            rows,
            inputs,
            operands: DType::F8E4M3,
            output: x.dtype,
        };
        let (wp, xp) = (device_ptr(&weight.weight)?, device_ptr(&x.values)?);
        let alpha = PRODUCT_SCALE as f32;
        // SAFETY: `weight.weight` is [outputs, inputs] and `x.values` [rows, inputs] float8,
        // contiguous (`device_ptr` checks); `y` is a fresh [rows, outputs] buffer of x's dtype.
        unsafe {
            crate::ops::lt::matmul(
                device,
                product,
                (wp, xp, yp),
                alpha,
                crate::ops::lt::Epilogue::None,
                None,
            )
        }?;
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn relative_l2(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap();
        let b = b.to_dtype(DType::F64).unwrap();
        let diff = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
        let norm = b.sqr().unwrap().sum_all().unwrap();
        (diff.to_scalar::<f64>().unwrap() / norm.to_scalar::<f64>().unwrap()).sqrt()
    }

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        // A fixed pattern rather than an RNG: the test must not depend on one.
        let n = shape.0 * shape.1;
        let values: Vec<f32> = (0..n)
            .map(|i| {
                let x = ((i as u64 * 2_654_435_761 + seed * 97) % 1_000_003) as f32 / 1_000_003.0;
                (x - 0.5) * if i % 7 == 0 { 4.0 } else { 1.0 }
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Per-channel quantisation keeps each weight within e4m3's 3 mantissa bits.
    #[test]
    fn a_quantised_weight_gives_its_values_back_within_float8_precision() {
        let w = random((48, 64), 1);
        let q = Fp8Weight::quantize(&w).unwrap();
        assert_eq!(q.weight.dtype(), DType::F8E4M3);
        assert_eq!(q.scales.dims(), [48]);
        let back = q
            .weight
            .to_dtype(DType::F32)
            .unwrap()
            .broadcast_mul(&q.scales.unsqueeze(1).unwrap())
            .unwrap();
        let err = relative_l2(&back, &w);
        assert!(err > 0.0 && err < 0.04, "{err}");
    }

    /// The float8 linear layer against the exact one in f32: within float8's error, with the
    /// bias and GELU applied after the scales; a row of zeros gives the activation of the bias.
    #[test]
    fn the_fp8_linear_is_the_exact_one_within_float8_error() {
        let w = random((48, 64), 2);
        let bias = random((1, 48), 3).flatten_all().unwrap();
        let mut x = random((37, 64), 4);
        x = Tensor::cat(
            &[x, Tensor::zeros((1, 64), DType::F32, &Device::Cpu).unwrap()],
            0,
        )
        .unwrap();
        let weight = Fp8Weight::quantize(&w).unwrap();
        for gelu in [false, true] {
            let exact = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let exact = if gelu { exact.gelu().unwrap() } else { exact };
            let xb = x.to_dtype(DType::BF16).unwrap();
            let y = linear(&xb, &weight, Some(&bias), gelu).unwrap();
            assert_eq!((y.dims(), y.dtype()), ([38, 48].as_slice(), DType::BF16));
            let err = relative_l2(&y, &exact);
            assert!(err > 0.0 && err < 0.06, "gelu {gelu}: {err}");
            let last = y.get(37).unwrap().to_dtype(DType::F32).unwrap();
            let want = if gelu {
                bias.gelu().unwrap()
            } else {
                bias.clone()
            };
            assert!(relative_l2(&last, &want) < 1e-2);
        }
    }

    /// A stored scaled-fp8 weight is used with its own scale: the same as the exact product
    /// with the dequantised weight, within the activations' float8 error.
    #[test]
    fn a_scaled_fp8_weight_is_used_as_stored() {
        let w8 = random((16, 32), 5)
            .affine(200.0, 0.0)
            .unwrap()
            .to_dtype(DType::F8E4M3)
            .unwrap();
        let scale = Tensor::new(0.01f32, &Device::Cpu).unwrap();
        let weight = Fp8Weight::scaled(w8.clone(), &scale).unwrap();
        let x = random((9, 32), 6);
        let exact = x
            .matmul(
                &(w8.to_dtype(DType::F32).unwrap() * 0.01)
                    .unwrap()
                    .t()
                    .unwrap(),
            )
            .unwrap();
        let y = linear(&x.to_dtype(DType::F16).unwrap(), &weight, None, false).unwrap();
        assert_eq!(y.dtype(), DType::F16);
        let err = relative_l2(&y, &exact);
        assert!(err > 0.0 && err < 0.05, "{err}");
        assert!(Fp8Weight::scaled(random((2, 2), 7), &scale).is_err());
    }

    #[test]
    fn f32_activations_and_wrong_widths_are_refused() {
        let weight = Fp8Weight::quantize(&random((8, 16), 8)).unwrap();
        assert!(linear(&random((4, 16), 9), &weight, None, false).is_err());
        let x = random((4, 12), 9).to_dtype(DType::BF16).unwrap();
        assert!(linear(&x, &weight, None, false).is_err());
    }
}
