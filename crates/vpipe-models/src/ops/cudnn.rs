//! 3D convolution on CUDA through cuDNN (the cudarc that candle re-exports).
//!
//! candle has no conv3d, and its conv2d is about 20× slower than cuDNN on the VAE's shapes
//! (`shared/reference/rust-stack.md` §4.4). Each distinct shape gets its descriptors and
//! algorithm once (building them per call costs 2–3× the convolution itself); tensor-op math is
//! enabled for bf16/f16, and f32 uses FMA math (no TF32, which cuDNN's default math allows on Ampere and later) so that f32 results stay comparable
//! with the CPU path.

// Device allocations and the cuDNN launch are FFI; each unsafe block says what it relies on.
#![allow(unsafe_code)]

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Storage, Tensor};

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
        let h = Cudnn::new(stream.clone()).map_err(|e| fail("creating the handle", e))?;
        handles.borrow_mut().insert(key, h.clone());
        Ok(h)
    })
}

fn contiguous_strides(dims: &[usize; 5]) -> [i32; 5] {
    let mut strides = [1i32; 5];
    for i in (0..4).rev() {
        strides[i] = strides[i + 1] * dims[i + 1] as i32;
    }
    strides
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
    let [n, _, d, h, w] = key.input;
    let [k, _, kd, kh, kw] = key.filter;
    let out = |i: usize, kernel: usize, axis: usize| {
        (i + 2 * key.padding[axis] - kernel) / key.stride[axis] + 1
    };
    let output_dims = [n, k, out(d, kd, 0), out(h, kh, 1), out(w, kw, 2)];
    let as_i32 = |a: &[usize]| a.iter().map(|&v| v as i32).collect::<Vec<_>>();
    let input = cudnn
        .create_nd_tensor::<T>(&as_i32(&key.input), &contiguous_strides(&key.input))
        .map_err(|e| fail("input descriptor", e))?;
    let output = cudnn
        .create_nd_tensor::<T>(&as_i32(&output_dims), &contiguous_strides(&output_dims))
        .map_err(|e| fail("output descriptor", e))?;
    let filter = cudnn
        .create_nd_filter::<T>(
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
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
    let algorithm = forward.pick_algorithm().map_err(|e| fail("algorithm", e))?;
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

fn dims5(t: &Tensor) -> candle_core::Result<[usize; 5]> {
    let (a, b, c, d, e) = t.dims5()?;
    Ok([a, b, c, d, e])
}

fn conv3d_typed<T>(
    input: &Tensor,
    filter: &Tensor,
    bias: Option<&Tensor>,
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
    let input = input.contiguous()?;
    let filter = filter.contiguous()?;
    let key = PlanKey {
        stream: Arc::as_ptr(&stream) as usize,
        dtype: input.dtype(),
        input: dims5(&input)?,
        filter: dims5(&filter)?,
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
    {
        let (x_storage, x_layout) = input.storage_and_layout();
        let (w_storage, w_layout) = filter.storage_and_layout();
        let (Storage::Cuda(x), Storage::Cuda(w)) = (&*x_storage, &*w_storage) else {
            return Err(fail("storage", "tensors must be on the CUDA device"));
        };
        let x = x.as_cuda_slice::<T>()?;
        let w = w.as_cuda_slice::<T>()?;
        let x = x.slice(x_layout.start_offset()..x_layout.start_offset() + input.elem_count());
        let w = w.slice(w_layout.start_offset()..w_layout.start_offset() + filter.elem_count());
        let forward = ConvForward {
            conv: &plan.conv,
            x: &plan.input,
            w: &plan.filter,
            y: &plan.output,
        };
        // SAFETY: the descriptors were built from these tensors' dtype and contiguous shapes.
        unsafe {
            forward.launch(
                plan.algorithm,
                workspace.as_mut(),
                (T::one(), T::zero()),
                &x,
                &w,
                &mut out,
            )
        }
        .map_err(|e| fail("launch", e))?;
    }
    if let Some(bias) = bias {
        add_bias::<T>(&stream, &mut out, plan.output_dims, bias)?;
    }
    let storage = CudaStorage::wrap_cuda_slice(out, device);
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        plan.output_dims.to_vec(),
        BackpropOp::none(),
        false,
    ))
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

/// Cross-correlation of `input` with `filter`, plus `bias` per output channel, zero padding
/// symmetric per axis.
///
/// # Shapes
/// - `input`: `[N, C, D, H, W]` on a CUDA device, f32 / bf16 / f16
/// - `filter`: `[K, C, kd, kh, kw]`, same dtype
/// - `bias`: `K` elements (any shape), same dtype
/// - returns: `[N, K, (D + 2pd − kd)/sd + 1, …]`
pub fn conv3d(
    input: &Tensor,
    filter: &Tensor,
    bias: Option<&Tensor>,
    padding: [usize; 3],
    stride: [usize; 3],
) -> candle_core::Result<Tensor> {
    match input.dtype() {
        DType::F32 => conv3d_typed::<f32>(input, filter, bias, padding, stride),
        DType::BF16 => conv3d_typed::<half::bf16>(input, filter, bias, padding, stride),
        DType::F16 => conv3d_typed::<half::f16>(input, filter, bias, padding, stride),
        other => Err(fail("dtype", other)),
    }
}

/// A raw cuDNN handle per stream, for the calls cudarc's safe API does not expose
/// (`cudnnAddTensor`). Lives as long as its thread.
fn raw_handle(stream: &Arc<CudaStream>) -> candle_core::Result<sys::cudnnHandle_t> {
    thread_local! {
        static RAW: RefCell<HashMap<usize, usize>> = RefCell::new(HashMap::new());
    }
    let key = Arc::as_ptr(stream) as usize;
    RAW.with(|raw| {
        if let Some(&h) = raw.borrow().get(&key) {
            return Ok(h as sys::cudnnHandle_t);
        }
        let mut h: sys::cudnnHandle_t = std::ptr::null_mut();
        // SAFETY: plain handle creation; the stream outlives the thread's use of it.
        unsafe {
            status(sys::cudnnCreate(&mut h), "cudnnCreate")?;
            status(
                sys::cudnnSetStream(h, stream.cu_stream() as _),
                "cudnnSetStream",
            )?;
        }
        raw.borrow_mut().insert(key, h as usize);
        Ok(h)
    })
}

fn status(code: sys::cudnnStatus_t, what: &str) -> candle_core::Result<()> {
    if code == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(fail(what, code))
    }
}

/// An Nd tensor descriptor that is destroyed with it.
struct RawDescriptor(sys::cudnnTensorDescriptor_t);

impl RawDescriptor {
    fn new<T: CudnnDataType>(dims: [usize; 5]) -> candle_core::Result<Self> {
        let mut desc: sys::cudnnTensorDescriptor_t = std::ptr::null_mut();
        let dims_i32 = dims.map(|d| d as i32);
        let strides = contiguous_strides(&dims);
        // SAFETY: the descriptor is created, then set from arrays of the declared length.
        unsafe {
            status(
                sys::cudnnCreateTensorDescriptor(&mut desc),
                "tensor descriptor",
            )?;
            let described = Self(desc);
            status(
                sys::cudnnSetTensorNdDescriptor(
                    desc,
                    T::DATA_TYPE,
                    5,
                    dims_i32.as_ptr(),
                    strides.as_ptr(),
                ),
                "tensor descriptor dims",
            )?;
            Ok(described)
        }
    }
}

impl Drop for RawDescriptor {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateTensorDescriptor and used by no call after this one.
        unsafe { sys::cudnnDestroyTensorDescriptor(self.0) };
    }
}

/// `out += bias` broadcast over every position, in place, with one cuDNN kernel: candle's
/// broadcasting add takes its slow strided path for a `[1, C, 1, 1, 1]` operand.
fn add_bias<T: CudnnDataType + CudaDType + DeviceRepr>(
    stream: &Arc<CudaStream>,
    out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    out_dims: [usize; 5],
    bias: &Tensor,
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let channels = out_dims[1];
    if bias.elem_count() != channels {
        return Err(fail(
            "bias",
            format!("{} values for {channels} channels", bias.elem_count()),
        ));
    }
    let bias = bias.contiguous()?;
    let out_desc = RawDescriptor::new::<T>(out_dims)?;
    let bias_desc = RawDescriptor::new::<T>([1, channels, 1, 1, 1])?;
    let handle = raw_handle(stream)?;
    let (storage, layout) = bias.storage_and_layout();
    let Storage::Cuda(b) = &*storage else {
        return Err(fail("bias", "must be on the CUDA device"));
    };
    let b = b.as_cuda_slice::<T>()?;
    let b = b.slice(layout.start_offset()..layout.start_offset() + channels);
    let (b_ptr, _b_sync) = b.device_ptr(stream);
    let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
    // The scaling factors of f32, bf16 and f16 tensors are f32.
    let one = 1.0f32;
    // SAFETY: both descriptors describe the buffers passed, which live until the calls return
    // on the handle's stream (the sync guards record that use).
    unsafe {
        status(
            sys::cudnnAddTensor(
                handle,
                &one as *const f32 as *const _,
                bias_desc.0,
                b_ptr as *const _,
                &one as *const f32 as *const _,
                out_desc.0,
                out_ptr as *mut _,
            ),
            "cudnnAddTensor",
        )
    }
}
