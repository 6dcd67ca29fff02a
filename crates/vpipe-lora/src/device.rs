//! A LoRA merged into a weight held in device memory, in place, by one cuBLAS matrix product.

use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use candle_core::{CudaDevice, DType, Tensor};

use crate::error::{Error, Result};
use crate::plan::{Delta, MergePlan};

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
        let Some(target) = self.targets.get(name) else {
            return Ok(false);
        };
        let [patch] = &target.patches[..] else {
            return Ok(false);
        };
        let Delta::LowRank { up, down, scale } = &patch.delta else {
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
        let rows = target.shape.dims().first().copied().unwrap_or(1).max(1);
        let columns = target.shape.elem_count() / rows;
        let rank = down.dims()[0];
        let elem = dtype.size_in_bytes();
        if weight.len() != rows * columns * elem
            || up.elem_count() != rows * rank
            || down.elem_count() != rank * columns
        {
            return Err(Error::WeightShape {
                weight: format!("{name} (held as {} bytes of {dtype:?})", weight.len()),
                expected: target.shape.clone(),
                got: candle_core::Shape::from(weight.len() / elem),
            });
        }
        let stream = device.cuda_stream();
        let driver = |e: &dyn std::fmt::Display| {
            Error::Candle(Box::new(candle_core::Error::Msg(format!(
                "merging a LoRA into '{name}' on the GPU: {e}"
            ))))
        };
        // The factors' elements as little-endian bytes in their dtype (they are on the host).
        let upload = |factor: &Tensor| -> Result<CudaSlice<u8>> {
            stream
                .clone_htod(&*safetensors::View::data(factor))
                .map_err(|e| driver(&e))
        };
        let (up, down) = (upload(up)?, upload(down)?);
        let alpha = (patch.strength * scale) as f32;
        let beta = 1f32;
        let blas = device.cublas_handle();
        {
            let (up_ptr, _up_record) = up.device_ptr(&stream);
            let (down_ptr, _down_record) = down.device_ptr(&stream);
            let (weight_ptr, _weight_record) = weight.device_ptr_mut(&stream);
            let int = |n: usize| i32::try_from(n).map_err(|e| driver(&e));
            // Column-major, as cuBLAS sees row-major memory: the weight is [columns × rows]
            // (leading dimension `columns`), `down` [columns × rank], `up` [rank × rows];
            // weight += alpha · down · up is the row-major weight += alpha · up · down.
            // SAFETY: the three buffers hold exactly those shapes in `dtype` (checked above),
            // they are distinct allocations, and the handle runs on `stream`, which orders the
            // product after the factors' copies and before anything reads the weight.
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
            .map_err(|e| driver(&e))?;
        }
        stream.synchronize().map_err(|e| driver(&e))?;
        self.mark_applied(name);
        Ok(true)
    }
}
