//! vpipe's own CUDA kernels (built to PTX by `build.rs` with the `cuda` feature).

// Device allocation and kernel launch are FFI; each unsafe block says what it relies on.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_channels.ptx"));

fn typed<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
    silu: bool,
    kernel: &str,
) -> candle_core::Result<Tensor> {
    let device = x.device().as_cuda_device()?.clone();
    let x = x.contiguous()?;
    let gamma = gamma.to_dtype(x.dtype())?.contiguous()?;
    let dims = x.dims();
    let (batches, channels) = (dims[0], dims[1]);
    let positions: usize = dims[2..].iter().product();
    let func = device.get_or_load_custom_func(kernel, "vpipe_rms_channels", PTX)?;
    let stream = device.cuda_stream();
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { stream.alloc::<T>(x.elem_count()) }.w()?;
    {
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = gamma.storage_and_layout();
        let (Storage::Cuda(xs), Storage::Cuda(gs)) = (&*xs, &*gs) else {
            candle_core::bail!("rms_channels: tensors must be on the CUDA device")
        };
        let xv = xs
            .as_cuda_slice::<T>()?
            .slice(xl.start_offset()..xl.start_offset() + x.elem_count());
        let gv = gs
            .as_cuda_slice::<T>()?
            .slice(gl.start_offset()..gl.start_offset() + channels);
        let threads = batches * positions;
        let cfg = LaunchConfig::for_num_elems(threads as u32);
        let (b, c, p, silu) = (
            batches as i64,
            channels as i32,
            positions as i64,
            silu as i32,
        );
        let mut builder = func.builder();
        builder.arg(&xv);
        builder.arg(&gv);
        builder.arg(&mut out);
        builder.arg(&b);
        builder.arg(&c);
        builder.arg(&p);
        builder.arg(&eps);
        builder.arg(&silu);
        // SAFETY: argument types and order match the kernel's signature.
        unsafe { builder.launch(cfg) }.w()?;
    }
    let storage = CudaStorage::wrap_cuda_slice(out, device);
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        x.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

/// RMS norm over dimension 1 (channels) of a CUDA tensor, times `gamma` per channel, then
/// SiLU if asked: one kernel, no transposes.
///
/// # Shapes
/// - `x`: `[B, C, …]`; `gamma`: `C` elements; returns `x`'s shape
pub fn rms_norm_channels(
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
    silu: bool,
) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F32 => typed::<f32>(x, gamma, eps, silu, "rms_channels_f32"),
        DType::BF16 => typed::<half::bf16>(x, gamma, eps, silu, "rms_channels_bf16"),
        DType::F16 => typed::<half::f16>(x, gamma, eps, silu, "rms_channels_f16"),
        other => candle_core::bail!("rms_channels: no kernel for {other:?}"),
    }
}
