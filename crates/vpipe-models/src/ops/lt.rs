//! Matrix products through cuBLASLt, for what candle's matmul does not do: float8 operands
//! with their scales, and the linear layers' bias (and GELU) added in the product's epilogue
//! rather than by a second pass over its output. One algorithm per shape and kind is asked of cuBLASLt's
//! heuristics and kept per thread; the workspace is allocated per product, freed in stream
//! order, so that nothing stays on the device between phases.

// cuBLASLt is FFI; each unsafe block says what it relies on.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, DType};

/// cuBLASLt's workspace: what NVIDIA recommends on Hopper. Taken from the pool for each
/// product and given back after it, it is among the transient allocations the planner's pool
/// reserve covers (a third of the activations: over 0.4 GiB for the 14B at 832×480×81 in
/// every plan).
const WORKSPACE_BYTES: usize = 32 << 20;

/// The alignment every operand's address must have (cuBLASLt's default assumption, 256 bytes):
/// [`matmul`] refuses others rather than give cuBLASLt an address its algorithm cannot take.
const ALIGN_BYTES: u64 = 256;

/// What the epilogue adds to the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Epilogue {
    /// Nothing.
    None,
    /// A bias per output feature (device address, in the output's dtype).
    Bias(u64),
    /// A bias per output feature, then GELU(tanh).
    GeluBias(u64),
}

impl Epilogue {
    fn kind(self) -> (sys::cublasLtEpilogue_t, Option<u64>) {
        match self {
            Self::None => (sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT, None),
            Self::Bias(b) => (sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS, Some(b)),
            Self::GeluBias(b) => (
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
                Some(b),
            ),
        }
    }
}

/// Float8 operands' scales, one f32 per output feature and one per row (device addresses of
/// `outputs` and `rows` f32): cuBLASLt's "outer vector" scaling, applied to the f32
/// accumulator before the epilogue, so that the output is rounded once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct OuterScales {
    pub(crate) weight: u64,
    pub(crate) rows: u64,
}

/// A product `y [rows, out] = x [rows, in] · wᵀ` (row-major; `w` [out, in]) as cuBLASLt sees
/// it in column-major memory: `w` is k × m transposed, `x` k × n, `y` m × n, the "TN" layout
/// float8 products need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Product {
    /// Output features (m).
    pub(crate) outputs: usize,
    /// Rows of `x` and `y` (n).
    pub(crate) rows: usize,
    /// Input features (k).
    pub(crate) inputs: usize,
    /// `w`'s and `x`'s element type (the same for both).
    pub(crate) operands: DType,
    /// `y`'s (and the bias's).
    pub(crate) output: DType,
}

/// What a kept algorithm was chosen for.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    product: Product,
    epilogue: u32,
    scaled: bool,
    stream: usize,
}

thread_local! {
    // Like cuDNN's handles, one per stream per thread.
    static HANDLES: RefCell<HashMap<usize, usize>> = RefCell::new(HashMap::new());
    static ALGORITHMS: RefCell<HashMap<Key, sys::cublasLtMatmulAlgo_t>> =
        RefCell::new(HashMap::new());
}

fn fail(what: &str, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt product: {what}: {e}"))
}

fn handle(device: &CudaDevice) -> candle_core::Result<sys::cublasLtHandle_t> {
    let stream = device.cuda_stream();
    let key = std::sync::Arc::as_ptr(&stream) as usize;
    HANDLES.with(|handles| {
        if let Some(&h) = handles.borrow().get(&key) {
            return Ok(h as sys::cublasLtHandle_t);
        }
        let handle = lt::create_handle().map_err(|e| fail("creating the handle", e))?;
        handles.borrow_mut().insert(key, handle as usize);
        Ok(handle)
    })
}

/// Owned cuBLASLt descriptors, destroyed on drop.
struct Desc(sys::cublasLtMatmulDesc_t);
struct Layout(sys::cublasLtMatrixLayout_t);
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: made by `create_matmul_desc`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: made by `create_matrix_layout`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: made by `create_matmul_pref`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn data_type(dtype: DType) -> candle_core::Result<sys::cudaDataType_t> {
    Ok(match dtype {
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::F8E4M3 => sys::cudaDataType_t::CUDA_R_8F_E4M3,
        other => candle_core::bail!("cuBLASLt product: no {other:?} operands here"),
    })
}

/// Sets a descriptor attribute from a plain value.
///
/// # Safety
/// `T` must be the C type cuBLASLt reads for `attribute`.
unsafe fn set<T>(
    desc: &Desc,
    attribute: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
    what: &str,
) -> candle_core::Result<()> {
    // SAFETY: `value` is a live `T`, the type the caller promises cuBLASLt reads.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc.0,
            attribute,
            (value as *const T).cast(),
            std::mem::size_of::<T>(),
        )
    }
    .map_err(|e| fail(what, e))
}

/// `y = alpha · x · wᵀ` (each term times its scales, when given) plus the epilogue's,
/// accumulated in f32, on `device`'s stream. Float8 products accumulate as the tensor cores
/// do, without cuBLASLt's periodic promotion to full f32 (its "fast accumulation", as
/// inference libraries run their forward products): its error is far below float8's own.
///
/// # Safety
/// `w`, `x` and `y` must be device addresses of live, contiguous row-major buffers of
/// `product`'s shapes and types (`y` written, used by nothing else meanwhile), a bias
/// `product.outputs` elements of the output's type, and scales as [`OuterScales`] says.
///
/// # Errors
/// An address not aligned to 256 bytes (a scale vector's to 16), a shape, epilogue or scaling
/// cuBLASLt has no algorithm for, or its failure; nothing is written then, so that the caller may compute the product another way.
pub(crate) unsafe fn matmul(
    device: &CudaDevice,
    product: Product,
    (w, x, y): (u64, u64, u64),
    alpha: f32,
    epilogue: Epilogue,
    scales: Option<OuterScales>,
) -> candle_core::Result<()> {
    let Product {
        outputs,
        rows,
        inputs,
        operands,
        output,
    } = product;
    if rows == 0 || outputs == 0 {
        return Ok(());
    }
    let (epilogue_kind, bias) = epilogue.kind();
    if [w, x, y]
        .into_iter()
        .chain(bias)
        .any(|address| address % ALIGN_BYTES != 0)
        || scales.is_some_and(|s| s.weight % 16 != 0 || s.rows % 16 != 0)
    {
        candle_core::bail!("cuBLASLt product: an operand is not aligned (256 bytes; scales 16)");
    }
    let handle = handle(device)?;
    let stream = device.cuda_stream();
    let (m, n, k) = (outputs as u64, rows as u64, inputs as u64);
    let desc = Desc(
        lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| fail("the descriptor", e))?,
    );
    let transpose =
        candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32;
    // SAFETY: each attribute below is given as the C type cuBLASLt documents for it (the
    // operation, epilogue and scale-mode enums as 32-bit integers, the fast-accumulation flag
    // as an 8-bit one, the bias and the scales as device pointers).
    unsafe {
        set(
            &desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &transpose,
            "transposing the weight",
        )?;
        set(
            &desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &(epilogue_kind as u32),
            "the epilogue",
        )?;
        if let Some(bias) = bias {
            set(
                &desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias,
                "the bias",
            )?;
        }
        if operands == DType::F8E4M3 {
            set(
                &desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                &1i8,
                "fast accumulation",
            )?;
        }
        if let Some(OuterScales { weight, rows }) = scales {
            let mode =
                sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as u32;
            use sys::cublasLtMatmulDescAttributes_t as A;
            set(
                &desc,
                A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                &mode,
                "the weight's scale mode",
            )?;
            set(
                &desc,
                A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                &mode,
                "the rows' scale mode",
            )?;
            set(
                &desc,
                A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                &weight,
                "the weight's scales",
            )?;
            set(
                &desc,
                A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                &rows,
                "the rows' scales",
            )?;
        }
    }
    let layout = |dtype, rows, cols, ld| {
        lt::create_matrix_layout(dtype, rows, cols, ld)
            .map(Layout)
            .map_err(|e| fail("a layout", e))
    };
    let (operand_type, output_type) = (data_type(operands)?, data_type(output)?);
    let a = layout(operand_type, k, m, k as i64)?;
    let b = layout(operand_type, k, n, k as i64)?;
    let d = layout(output_type, m, n, m as i64)?;
    let key = Key {
        product,
        epilogue: epilogue_kind as u32,
        scaled: scales.is_some(),
        stream: std::sync::Arc::as_ptr(&stream) as usize,
    };
    let algorithm = match ALGORITHMS.with(|kept| kept.borrow().get(&key).copied()) {
        Some(algorithm) => algorithm,
        None => {
            let pref = Pref(lt::create_matmul_pref().map_err(|e| fail("the preference", e))?);
            let workspace_bytes = WORKSPACE_BYTES as u64;
            // SAFETY: the attribute is a u64, passed by pointer with its size.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref.0,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&workspace_bytes as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(|e| fail("the workspace size", e))?;
            // SAFETY: every descriptor is alive for the call.
            let heuristic = unsafe {
                lt::get_matmul_algo_heuristic(handle, desc.0, a.0, b.0, d.0, d.0, pref.0)
            }
            .map_err(|e| fail("no algorithm for these shapes", e))?;
            ALGORITHMS.with(|kept| kept.borrow_mut().insert(key, heuristic.algo));
            heuristic.algo
        }
    };
    let beta = 0f32;
    // SAFETY: scratch for cuBLASLt only, freed after the product in stream order.
    let scratch = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.w()?;
    let (workspace, _record) = scratch.device_ptr(&stream);
    // SAFETY: the operands are the caller's promise; β = 0, so C (= D) is not read; the
    // workspace is live and as large as the heuristics were told. All on `stream`.
    unsafe {
        lt::matmul(
            handle,
            desc.0,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            w as *const _,
            a.0,
            x as *const _,
            b.0,
            y as *const _,
            d.0,
            y as *mut _,
            d.0,
            &algorithm,
            workspace as *mut _,
            WORKSPACE_BYTES,
            stream.cu_stream() as *mut _,
        )
    }
    .map_err(|e| fail("the product", e))
}
