//! A LoRA merged into a weight held in device memory, in place, by one cuBLAS matrix product.

use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::kernels;
use candle_core::{CudaDevice, DType, Tensor};

use crate::error::{Error, Result};
use crate::plan::{Delta, MergePlan, Patch};

/// A weight's sizes as the product sees them: `rows × columns`, the update of rank `rank`.
#[derive(Clone, Copy)]
struct Dims {
    rows: usize,
    columns: usize,
    rank: usize,
}

impl MergePlan {
    /// [`MergePlan::apply_in_place`] on the GPU: `weight` holds the bytes of `name` in device
    /// memory (row-major, in `dtype`) and gains `strength · scale · up · down` from one cuBLAS
    /// matrix product that accumulates in f32 and rounds into the weight once (β = 1), the
    /// arithmetic of the host's merge in another order. No temporary the size of the weight:
    /// only the two factors go to the device. Runs on `device`'s stream and waits for it.
    ///
    /// Returns `Ok(false)`, with nothing written, where this path does not apply and the host's
    /// merge must run instead: a weight the plan does not patch; more than one patch, or a full
    /// one (a second product would round the weight twice); a dtype other than f32, bf16 or
    /// f16; factors stored in another dtype than the weight (cuBLAS takes both in the weight's,
    /// and converting them would round them).
    ///
    /// # Shapes
    /// `weight` holds exactly the elements of the shape given for `name` in the plan's model
    /// weight list.
    pub fn apply_in_place_on_device(
        &self,
        name: &str,
        dtype: DType,
        device: &CudaDevice,
        weight: &mut CudaSlice<u8>,
    ) -> Result<bool> {
        let Some((patch, up, down, dims)) = self.single_low_rank(name, dtype, weight.len())? else {
            return Ok(false);
        };
        let data_type = match dtype {
            DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
            _ => return Ok(false),
        };
        if up.dtype() != dtype || down.dtype() != dtype {
            return Ok(false);
        }
        let stream = device.cuda_stream();
        // The factors' elements as little-endian bytes in their dtype (they are on the host).
        let upload = |factor: &Tensor| -> Result<CudaSlice<u8>> {
            stream
                .clone_htod(&*safetensors::View::data(factor))
                .map_err(|e| on_gpu_error(name, &e))
        };
        let (up, down) = (upload(up)?, upload(down)?);
        let alpha = patch.factor_scale() as f32;
        accumulate_product(name, device, (weight, data_type), (&up, &down), dims, alpha)?;
        stream.synchronize().map_err(|e| on_gpu_error(name, &e))?;
        self.mark_applied(name);
        Ok(true)
    }

    /// [`MergePlan::apply_in_place_scaled_fp8`] on the GPU: `weight` holds the float8 e4m3
    /// bytes of `name` in device memory, `scale` the one scale they are stored with. The bytes
    /// are widened to f32 in one temporary (four times the weight's bytes), gain the update from
    /// one cuBLAS product (β = 1, the update divided by `scale`, so that the temporary stays in
    /// the stored units), and are rounded back to float8 with the same scale (to nearest even,
    /// saturating at ±448), as on the host. Runs on `device`'s stream and waits for it.
    ///
    /// Returns `Ok(false)`, with nothing written, where this path does not apply (as
    /// [`MergePlan::apply_in_place_on_device`], the factors in any float dtype: they are
    /// widened to f32 on the host).
    ///
    /// # Shapes
    /// As [`MergePlan::apply_in_place_on_device`], one byte per element.
    pub fn apply_in_place_scaled_fp8_on_device(
        &self,
        name: &str,
        scale: f32,
        device: &CudaDevice,
        weight: &mut CudaSlice<u8>,
    ) -> Result<bool> {
        let Some((patch, up, down, dims)) =
            self.single_low_rank(name, DType::F8E4M3, weight.len())?
        else {
            return Ok(false);
        };
        let stream = device.cuda_stream();
        let upload = |factor: &Tensor| -> Result<CudaSlice<f32>> {
            let values = factor
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            stream
                .clone_htod(&values)
                .map_err(|e| on_gpu_error(name, &e))
        };
        let (up, down) = (upload(up)?, upload(down)?);
        let elements = weight.len();
        let mut wide = stream
            .alloc_zeros::<f32>(elements)
            .map_err(|e| on_gpu_error(name, &e))?;
        cast(name, device, "cast_f8_e4m3_f32", weight, &mut wide)?;
        let alpha = (patch.factor_scale() / f64::from(scale)) as f32;
        let f32_type = sys::cudaDataType_t::CUDA_R_32F;
        accumulate_product(
            name,
            device,
            (&mut wide, f32_type),
            (&up, &down),
            dims,
            alpha,
        )?;
        cast(name, device, "cast_f32_f8_e4m3", &wide, weight)?;
        stream.synchronize().map_err(|e| on_gpu_error(name, &e))?;
        self.mark_applied(name);
        Ok(true)
    }

    /// The one low-rank patch of `name` with its factors and sizes, for a weight held as
    /// `bytes` bytes of `dtype`; `None` where the plan does not patch it, or patches it with more
    /// than one patch or a full one (a second product would round the weight twice).
    fn single_low_rank(
        &self,
        name: &str,
        dtype: DType,
        bytes: usize,
    ) -> Result<Option<(&Patch, &Tensor, &Tensor, Dims)>> {
        let Some(target) = self.targets.get(name) else {
            return Ok(None);
        };
        let [patch] = &target.patches[..] else {
            return Ok(None);
        };
        let Delta::LowRank { up, down, .. } = &patch.delta else {
            return Ok(None);
        };
        let rows = target.shape.dims().first().copied().unwrap_or(1).max(1);
        let columns = target.shape.elem_count() / rows;
        let rank = down.dims()[0];
        let elem = dtype.size_in_bytes();
        if bytes != rows * columns * elem
            || up.elem_count() != rows * rank
            || down.elem_count() != rank * columns
        {
            return Err(Error::WeightShape {
                weight: format!("{name} (held as {bytes} bytes of {dtype:?})"),
                expected: target.shape.clone(),
                got: candle_core::Shape::from(bytes / elem),
            });
        }
        Ok(Some((
            patch,
            up,
            down,
            Dims {
                rows,
                columns,
                rank,
            },
        )))
    }
}

fn on_gpu_error(name: &str, e: &dyn std::fmt::Display) -> Error {
    Error::Candle(Box::new(candle_core::Error::Msg(format!(
        "merging a LoRA into '{name}' on the GPU: {e}"
    ))))
}

/// `weight += alpha · up · down` on `device`'s stream, every buffer in `data_type`.
fn accumulate_product<W, F>(
    name: &str,
    device: &CudaDevice,
    (weight, data_type): (&mut CudaSlice<W>, sys::cudaDataType_t),
    (up, down): (&CudaSlice<F>, &CudaSlice<F>),
    Dims {
        rows,
        columns,
        rank,
    }: Dims,
    alpha: f32,
) -> Result<()> {
    let stream = device.cuda_stream();
    let beta = 1f32;
    let blas = device.cublas_handle();
    let (up_ptr, _up_record) = up.device_ptr(&stream);
    let (down_ptr, _down_record) = down.device_ptr(&stream);
    let (weight_ptr, _weight_record) = weight.device_ptr_mut(&stream);
    let int = |n: usize| i32::try_from(n).map_err(|e| on_gpu_error(name, &e));
    // Column-major, as cuBLAS sees row-major memory: the weight is [columns × rows] (leading
    // dimension `columns`), `down` [columns × rank], `up` [rank × rows]; weight += alpha · down
    // · up is the row-major weight += alpha · up · down.
    // SAFETY: the three buffers hold exactly those shapes in `data_type` (the callers check
    // the sizes), they are distinct allocations, and the handle runs on `stream`, which orders
    // the product after the factors' copies and before anything reads the weight.
    #[allow(unsafe_code)]
    unsafe {
        cublas::gemm_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_N,
            sys::cublasOperation_t::CUBLAS_OP_N,
            int(columns)?,
            int(rows)?,
            int(rank)?,
            (&alpha) as *const f32 as *const _,
            down_ptr as *const _,
            data_type,
            int(columns)?,
            up_ptr as *const _,
            data_type,
            int(rank)?,
            (&beta) as *const f32 as *const _,
            weight_ptr as *mut _,
            data_type,
            int(columns)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| on_gpu_error(name, &e))
}

/// Converts `from`'s elements into `to` (as many) with candle's cast kernel `kernel` on
/// `device`'s stream: float8 e4m3 ⇄ f32, rounding to nearest even and saturating at ±448.
fn cast<A, B>(
    name: &str,
    device: &CudaDevice,
    kernel: &str,
    from: &CudaSlice<A>,
    to: &mut CudaSlice<B>,
) -> Result<()> {
    let elements = from.len();
    let grid = u32::try_from(elements).map_err(|e| on_gpu_error(name, &e))?;
    let func = device.get_or_load_func(kernel, &kernels::CAST)?;
    // Contiguous: no dims and strides (`info` null).
    let (dims, info) = (0usize, 0u64);
    let mut launch = func.builder();
    launch
        .arg(&elements)
        .arg(&dims)
        .arg(&info)
        .arg(from)
        .arg(to);
    // SAFETY: the kernel reads `elements` elements of `from` and writes as many of `to`, which
    // both hold (they are the weight and its f32 widening, of equal counts).
    #[allow(unsafe_code)]
    unsafe { launch.launch(LaunchConfig::for_num_elems(grid)) }
        .map(|_| ())
        .map_err(|e| on_gpu_error(name, &e))
}
