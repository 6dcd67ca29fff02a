//! 3D convolution on CUDA through cuDNN (the cudarc that candle re-exports).
//!
//! candle has no conv3d, and its conv2d is about 20× slower than cuDNN on the VAE's shapes
//! (measured when vpipe chose its crates). Each distinct shape gets its descriptors and
//! algorithm once (building them per call costs 2–3× the convolution itself); tensor-op math is
//! enabled for bf16/f16, and f32 uses FMA math (no TF32, which cuDNN's default math allows on
//! Ampere and later) so that f32 results stay comparable with the CPU path.
//!
//! Data is channels-last (NDHWC, filters KTRSC; [`super::layout`]), the layout cuDNN's
//! tensor-core kernels compute in: given NCDHW data, cuDNN transposes input and output around
//! every convolution (measured on the H100: 3.2 ms of a 27 ms decoder pass in PyTorch,
//! bench/results/2026-11-27-vae-ncu-decode.txt). Channel counts are padded with zeros to a
//! multiple of 8, which those kernels need (the VAE's 3-channel video in and out). The bias,
//! and a residual when there is one, are added by one in-place kernel after the convolution.

// Device allocations and the cuDNN launch are FFI; each unsafe block says what it relies on.
#![allow(unsafe_code)]

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cudnn::{
    result, sys, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor,
    TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Storage, Tensor};

use super::{fused, layout};

fn fail(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN conv3d: {what}: {e:?}"))
}

/// What identifies a planned convolution.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    stream: usize,
    dtype: DType,
    input: [usize; 5],
    filter: [usize; 5],
    padding: [usize; 3],
    stride: [usize; 3],
}

struct Plan<T: CudnnDataType> {
    input: TensorDescriptor<T>,
    output: TensorDescriptor<T>,
    filter: FilterDescriptor<T>,
    conv: ConvDescriptor<f32>,
    algorithm: sys::cudnnConvolutionFwdAlgo_t,
    workspace_bytes: usize,
    output_dims: [usize; 5],
}

thread_local! {
    // cuDNN handles are not thread-safe; one handle per stream per thread.
    static HANDLES: RefCell<HashMap<usize, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<PlanKey, Rc<dyn Any>>> = RefCell::new(HashMap::new());
}

fn handle(stream: &Arc<CudaStream>) -> candle_core::Result<Arc<Cudnn>> {
    let key = Arc::as_ptr(stream) as usize;
    HANDLES.with(|handles| {
        if let Some(h) = handles.borrow().get(&key) {
            return Ok(h.clone());
        }
        let _span = tracing::debug_span!("cudnn_handle").entered();
        let h = Cudnn::new(stream.clone()).map_err(|e| fail("creating the handle", e))?;
        handles.borrow_mut().insert(key, h.clone());
        Ok(h)
    })
}

/// Dimensions as cuDNN's C ints.
fn as_i32(values: &[usize]) -> Vec<i32> {
    values.iter().map(|&v| v as i32).collect()
}

/// Element strides of a packed NDHWC tensor, in cuDNN's NCDHW dimension order.
fn channels_last_strides(dims: &[usize; 5]) -> [i32; 5] {
    let [_, c, d, h, w] = dims.map(|v| v as i32);
    [d * h * w * c, 1, h * w * c, w * c, c]
}

fn plan<T: CudnnDataType + 'static>(
    cudnn: &Arc<Cudnn>,
    key: &PlanKey,
) -> candle_core::Result<Rc<Plan<T>>> {
    if let Some(found) = PLANS.with(|p| p.borrow().get(key).cloned()) {
        return found
            .downcast::<Plan<T>>()
            .map_err(|_| fail("plan cache", "dtype mismatch"));
    }
    // A new shape: descriptors and cuDNN's heuristic choice, once per process and shape.
    let _span = tracing::debug_span!("cudnn_plan").entered();
    let [n, _, d, h, w] = key.input;
    let [k, _, kd, kh, kw] = key.filter;
    let out = |i: usize, kernel: usize, axis: usize| {
        (i + 2 * key.padding[axis] - kernel) / key.stride[axis] + 1
    };
    let output_dims = [n, k, out(d, kd, 0), out(h, kh, 1), out(w, kw, 2)];
    let input = cudnn
        .create_nd_tensor::<T>(&as_i32(&key.input), &channels_last_strides(&key.input))
        .map_err(|e| fail("input descriptor", e))?;
    let output = cudnn
        .create_nd_tensor::<T>(&as_i32(&output_dims), &channels_last_strides(&output_dims))
        .map_err(|e| fail("output descriptor", e))?;
    let filter = cudnn
        .create_nd_filter::<T>(
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
            &as_i32(&key.filter),
        )
        .map_err(|e| fail("filter descriptor", e))?;
    let mut conv = cudnn
        .create_convnd::<f32>(
            &as_i32(&key.padding),
            &as_i32(&key.stride),
            &[1, 1, 1],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(|e| fail("convolution descriptor", e))?;
    let math = if key.dtype == DType::F32 {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    };
    conv.set_math_type(math).map_err(|e| fail("math type", e))?;
    let forward = ConvForward {
        conv: &conv,
        x: &input,
        w: &filter,
        y: &output,
    };
    let algorithm = match top_algorithm::<T>(key, &output_dims, math) {
        Some(algorithm) => algorithm,
        None => tracing::debug_span!("cudnn_all_algorithms")
            .in_scope(|| forward.pick_algorithm())
            .map_err(|e| fail("algorithm", e))?,
    };
    let workspace_bytes = forward
        .get_workspace_size(algorithm)
        .map_err(|e| fail("workspace size", e))?;
    let planned = Rc::new(Plan {
        input,
        output,
        filter,
        conv,
        algorithm,
        workspace_bytes,
        output_dims,
    });
    PLANS.with(|p| {
        p.borrow_mut()
            .insert(key.clone(), planned.clone() as Rc<dyn Any>)
    });
    Ok(planned)
}

/// A raw cuDNN handle for heuristic queries (they launch nothing), made once per thread.
fn query_handle() -> Option<sys::cudnnHandle_t> {
    thread_local! {
        static QUERY: Option<usize> = result::create_handle().ok().map(|h| h as usize);
    }
    QUERY.with(|h| h.map(|h| h as sys::cudnnHandle_t))
}

/// Raw descriptors that destroy themselves.
struct QueryDescriptors {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl Drop for QueryDescriptors {
    fn drop(&mut self) {
        // SAFETY: each was created once by `top_algorithm` and is destroyed only here.
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.x);
            let _ = result::destroy_tensor_descriptor(self.y);
            let _ = result::destroy_filter_descriptor(self.w);
            let _ = result::destroy_convolution_descriptor(self.conv);
        }
    }
}

/// cuDNN's first choice of algorithm for `key`, asked for alone. The usual query (cudarc's
/// `pick_algorithm`) asks for every algorithm, ranked, which costs milliseconds of host time
/// per new shape (6 ms on the H100, about a hundred shapes per VAE pass of a fresh process),
/// for the first of them. `None` when the first choice is not usable or the query fails; the
/// caller then asks for all.
fn top_algorithm<T: CudnnDataType>(
    key: &PlanKey,
    output_dims: &[usize; 5],
    math: sys::cudnnMathType_t,
) -> Option<sys::cudnnConvolutionFwdAlgo_t> {
    let handle = query_handle()?;
    let descriptors = QueryDescriptors {
        x: result::create_tensor_descriptor().ok()?,
        y: result::create_tensor_descriptor().ok()?,
        w: result::create_filter_descriptor().ok()?,
        conv: result::create_convolution_descriptor().ok()?,
    };
    let (x_dims, y_dims, w_dims) = (as_i32(&key.input), as_i32(output_dims), as_i32(&key.filter));
    let (x_strides, y_strides) = (
        channels_last_strides(&key.input),
        channels_last_strides(output_dims),
    );
    let (padding, stride) = (as_i32(&key.padding), as_i32(&key.stride));
    let dilation = [1i32; 3];
    let mut returned = 0;
    // SAFETY: every descriptor is live until `descriptors` drops; the arrays outlive the calls
    // and hold the lengths passed (5 dimensions, 3 spatial parameters); one result slot.
    let top = unsafe {
        result::set_tensornd_descriptor(
            descriptors.x,
            T::DATA_TYPE,
            5,
            x_dims.as_ptr(),
            x_strides.as_ptr(),
        )
        .ok()?;
        result::set_tensornd_descriptor(
            descriptors.y,
            T::DATA_TYPE,
            5,
            y_dims.as_ptr(),
            y_strides.as_ptr(),
        )
        .ok()?;
        result::set_filternd_descriptor(
            descriptors.w,
            T::DATA_TYPE,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
            5,
            w_dims.as_ptr(),
        )
        .ok()?;
        result::set_convolutionnd_descriptor(
            descriptors.conv,
            3,
            padding.as_ptr(),
            stride.as_ptr(),
            dilation.as_ptr(),
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )
        .ok()?;
        result::set_convolution_math_type(descriptors.conv, math).ok()?;
        let mut top: sys::cudnnConvolutionFwdAlgoPerf_t = std::mem::zeroed();
        result::get_convolution_forward_algorithm(
            handle,
            descriptors.x,
            descriptors.w,
            descriptors.conv,
            descriptors.y,
            1,
            &mut returned,
            &mut top,
        )
        .ok()?;
        top
    };
    (returned == 1 && top.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS).then_some(top.algo)
}

/// Channel counts are padded to a multiple of this for the tensor-core kernels.
const CHANNEL_ALIGN: usize = 8;

fn conv3d_typed<T>(
    input: &Tensor,
    filter: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    padding: [usize; 3],
    stride: [usize; 3],
) -> candle_core::Result<Tensor>
where
    T: CudnnDataType + CudaDType + DeviceRepr + 'static,
    T: num_traits_one::One,
{
    let device = input.device().as_cuda_device()?.clone();
    let stream = device.cuda_stream();
    let cudnn = handle(&stream)?;
    let (k, c, kt, kh, kw) = filter.dims5()?;
    if input.dim(1)? != c {
        return Err(fail(
            "input",
            format!("{} channels, the filter expects {c}", input.dim(1)?),
        ));
    }
    let c_pad = c.next_multiple_of(CHANNEL_ALIGN) - c;
    let k_pad = k.next_multiple_of(CHANNEL_ALIGN) - k;
    // [N, D, H, W, C] packed, and the filter as [K, kt, kh, kw, C]: a per-call copy of the
    // filter (at most a few MiB) instead of a second resident copy of every weight.
    let mut x = layout::physical(input)?.contiguous()?;
    if c_pad > 0 {
        x = x.pad_with_zeros(4, 0, c_pad)?;
    }
    let w = tracing::trace_span!("conv_filter")
        .in_scope(|| fused::filter_channels_last(filter, k + k_pad, c + c_pad))?;
    let bias = match bias {
        Some(b) if k_pad > 0 => Some(b.flatten_all()?.pad_with_zeros(0, 0, k_pad)?),
        Some(b) => Some(b.flatten_all()?),
        None => None,
    };
    let (n, d, h, wd, cp) = x.dims5()?;
    let key = PlanKey {
        stream: Arc::as_ptr(&stream) as usize,
        dtype: input.dtype(),
        input: [n, cp, d, h, wd],
        filter: [k + k_pad, cp, kt, kh, kw],
        padding,
        stride,
    };
    let plan = plan::<T>(&cudnn, &key)?;
    let out_len: usize = plan.output_dims.iter().product();
    // SAFETY: cuDNN writes every output element (beta = 0).
    let mut out = unsafe { stream.alloc::<T>(out_len) }.map_err(|e| fail("output", e))?;
    let mut workspace = if plan.workspace_bytes > 0 {
        Some(
            unsafe { stream.alloc::<u8>(plan.workspace_bytes) }
                .map_err(|e| fail("workspace", e))?,
        )
    } else {
        None
    };
    tracing::trace_span!("cudnn_forward").in_scope(|| -> candle_core::Result<()> {
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = w.storage_and_layout();
        let (Storage::Cuda(xs), Storage::Cuda(ws)) = (&*x_storage, &*w_storage) else {
            return Err(fail("storage", "tensors must be on the CUDA device"));
        };
        let xs = xs.as_cuda_slice::<T>()?;
        let ws = ws.as_cuda_slice::<T>()?;
        let xs = xs.slice(x_layout.start_offset()..x_layout.start_offset() + x.elem_count());
        let ws = ws.slice(w_layout.start_offset()..w_layout.start_offset() + w.elem_count());
        let forward = ConvForward {
            conv: &plan.conv,
            x: &plan.input,
            w: &plan.filter,
            y: &plan.output,
        };
        // SAFETY: the descriptors were built from these packed tensors' dtype and shapes.
        unsafe {
            forward.launch(
                plan.algorithm,
                workspace.as_mut(),
                (T::one(), T::zero()),
                &xs,
                &ws,
                &mut out,
            )
        }
        .map_err(|e| fail("launch", e))
    })?;
    let [_, kp, d_out, h_out, w_out] = plan.output_dims;
    let out = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(out, device)),
        vec![n, d_out, h_out, w_out, kp],
        BackpropOp::none(),
        false,
    );
    // Packed like the output, padded channels included.
    let residual = residual
        .map(|r| {
            let r = layout::physical(r)?;
            if k_pad > 0 {
                r.pad_with_zeros(4, 0, k_pad)?.contiguous()
            } else {
                r.contiguous()
            }
        })
        .transpose()?;
    // `out` was allocated above and nothing else holds it; the epilogue checks the residual's
    // shape and dtype against it.
    tracing::trace_span!("conv_epilogue")
        .in_scope(|| fused::bias_residual_in_place(&out, bias.as_ref(), residual.as_ref()))?;
    let out = layout::logical(&out)?;
    if k_pad > 0 {
        out.narrow(1, 0, k)
    } else {
        Ok(out)
    }
}

/// Minimal one/zero for the scaling parameters, so no numeric-traits dependency is needed.
mod num_traits_one {
    pub trait One {
        fn one() -> Self;
        fn zero() -> Self;
    }
    impl One for f32 {
        fn one() -> Self {
            1.0
        }
        fn zero() -> Self {
            0.0
        }
    }
    impl One for half::f16 {
        fn one() -> Self {
            half::f16::ONE
        }
        fn zero() -> Self {
            half::f16::ZERO
        }
    }
    impl One for half::bf16 {
        fn one() -> Self {
            half::bf16::ONE
        }
        fn zero() -> Self {
            half::bf16::ZERO
        }
    }
}

/// Cross-correlation of `input` with `filter`, plus `bias` per output channel and `residual`,
/// zero padding symmetric per axis. The result's memory is channels-last ([`layout`]); `input`
/// and `residual` may have any layout (channels-last ones are read without a copy).
///
/// # Shapes
/// - `input`: `[N, C, D, H, W]` on a CUDA device, f32 / bf16 / f16
/// - `filter`: `[K, C, kd, kh, kw]`, same dtype
/// - `bias`: `K` elements (any shape), same dtype
/// - `residual`: the output's shape, same dtype
/// - returns: `[N, K, (D + 2pd − kd)/sd + 1, …]`
pub fn conv3d(
    input: &Tensor,
    filter: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    padding: [usize; 3],
    stride: [usize; 3],
) -> candle_core::Result<Tensor> {
    let (b, r) = (bias, residual);
    match input.dtype() {
        DType::F32 => conv3d_typed::<f32>(input, filter, b, r, padding, stride),
        DType::BF16 => conv3d_typed::<half::bf16>(input, filter, b, r, padding, stride),
        DType::F16 => conv3d_typed::<half::f16>(input, filter, b, r, padding, stride),
        other => Err(fail("dtype", other)),
    }
}
