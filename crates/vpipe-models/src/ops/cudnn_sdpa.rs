//! Scaled-dot-product attention on CUDA through cuDNN's fused flash-attention engines, built
//! with cuDNN's backend graph API (the cudarc that candle re-exports): PyTorch's default
//! attention kernel on Hopper, which vpipe's own kernel (`ops::fused::flash_attention`) trails.
//!
//! # The graphs
//!
//! cuDNN runs attention from one of two descriptions, and this module builds them exactly as
//! cuDNN's frontend (v1.x) builds an inference SDPA (no mask, bias or dropout, non-causal, no
//! softmax statistics written out):
//!
//! - **Native**: one `CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR` operation with the Q, K, V
//!   and O tensors and the scale (a pass-by-value f32 tensor); K is given as [B, H, Lk, D].
//!   The frontend picks it by default from cuDNN 9.13.1 on (it refuses the operation earlier),
//!   so it is tried first there.
//! - **Composite** (every cuDNN 9): the operations the frontend lowers SDPA to, which cuDNN's
//!   fused-attention engines recognise as one pattern:
//!   `S = Q·Kᵀ` (matmul, f32 out; Kᵀ is K's own memory described as [B, H, D, Lk] by swapping
//!   the last two dimensions and strides) → `S·scale` (pointwise mul by the pass-by-value
//!   scale) → softmax as `M = max(S)` (reduction) → `S − M` → `exp` → `Z = Σ exp` (reduction)
//!   → `exp / Z` → `P·V` (matmul into O). The frontend also emits the statistics chain
//!   `M + log Z` into a virtual tensor that nothing reads, even for inference, and so does
//!   this module, so that cuDNN sees the graph its engines are matched against. Every
//!   intermediate is virtual and f32, except the probabilities P, which are in the I/O dtype
//!   (bf16/f16): the second matmul takes its A operand in the I/O type, as the frontend notes.
//!   Compute types are f32 throughout.
//!
//! **Float8** ([`sdpa_fp8`]): the composite graph as the frontend lowers its FP8 SDPA, Q, K
//! and V in e4m3 with one descale each (device f32 scalars): `S = Q·Kᵀ` → `·scale` →
//! `·descale_q` → `·descale_k` → the softmax above (P in f32) → `amax(P)` (an output) →
//! `P·scale_s` in e4m3 → `P·V` (f32) → `·descale_s` → `·descale_v` → `·scale_o` into O (in
//! the input's bf16/f16) and `amax` of the descaled product (an output). P is at most 1, so
//! `scale_s` is 448 (e4m3's largest value) and `descale_s` its inverse; O is not quantised
//! (`scale_o` 1). Where cuDNN gives no plan with O in bf16/f16 (the frontend's older cuDNN
//! versions write float8 only), O is written in e4m3 with `scale_o = 1 / descale_v` (every
//! output is a convex combination of V's rows, so `|O| ≤ max |V|`) and dequantised after.
//! K and V are quantised less each channel's mean over the keys, and V's mean is added back
//! to O ([`Fp8KeysValues`]): with the mean left in, the output's norm shrank with the keys
//! (relative L2 0.38 against the exact attention at the 14B's 32,760, cosine 0.9996); centred,
//! 0.0011, as close to an f32 reference as the exact attention (H100, cuDNN 9, 2026-12-05).
//! Heads of 128 only: at 64 the uncentred error was 21–26 % relative L2 at 4096 keys, against
//! 6–8 % at 128, and heads of 64 have not been measured centred.
//!
//! Unless `VPIPE_CUDNN_SDPA_GRAPH` says `native` or `composite` (only that one is tried), the
//! native operation is tried where the version allows and the composite graph when it gives
//! no plan. For the graph that builds, cuDNN's heuristics (mode A) rank engine configurations,
//! and the first one that finalizes into an execution plan is kept (`VPIPE_CUDNN_SDPA_CONFIG=n`
//! tries the n-th first).
//!
//! # Plans and handles
//!
//! A plan is built once per (stream, dtype, B, H, Lq, Lk, D, strides of q, k, v and the
//! output) and thread (cuDNN handles and plans are not thread-safe), like `ops::cudnn`'s
//! convolutions; a shape cuDNN refuses is remembered too, so that a caller that falls back
//! pays the planning once. The backend API needs the raw handle, which cudarc's `Cudnn` keeps
//! private, so this module keeps its own handle per stream and thread.
//!
//! The operands are read in place through their strides (the DiT's token-major [B, L, H, D]
//! buffers viewed as [B, H, L, D]); the output is written token-major and returned as the
//! [B, H, Lq, D] view of it, as `ops::fused::flash_attention` does.

// The backend API is FFI; each unsafe block says what it relies on.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cudnn::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Storage, Tensor};

use crate::ops::attention::FP8_HEAD_DIM;

use sys::cudnnBackendAttributeName_t as Attr;
use sys::cudnnBackendAttributeType_t as AttrType;
use sys::cudnnBackendDescriptorType_t as Kind;

/// Errors inside this module: what failed, and cuDNN's status; [`error`] adds the prefix.
type Fallible<T> = std::result::Result<T, String>;

fn error(what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN SDPA: {what}"))
}

/// `Ok` for `CUDNN_STATUS_SUCCESS`, else "`step`: the status".
fn check(status: sys::cudnnStatus_t, step: &str) -> Fallible<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(format!("{step}: {status:?}"))
    }
}

/// The cuDNN library's version, e.g. 91501 for 9.15.1 (`cudnnGetVersion`). The CUDA build
/// links the library (as candle links cudarc's libraries), so it is there whenever the process
/// runs.
pub fn cudnn_version() -> usize {
    result::get_version()
}

/// The first cuDNN with the native SDPA operation, as cuDNN's frontend gates it.
const NATIVE_MIN_VERSION: usize = 91301;
/// Reductions take a determinism flag from cuDNN 9.11 on (the frontend sets it from then on).
const DETERMINISM_FLAG_VERSION: usize = 91100;
/// Chooses the graph: `native` or `composite` tries that one alone; unset tries both.
const GRAPH_ENV: &str = "VPIPE_CUDNN_SDPA_GRAPH";
/// A number n: the heuristics' n-th engine configuration is tried first (from 1), to time
/// the others; unset, their ranking is followed.
const CONFIG_ENV: &str = "VPIPE_CUDNN_SDPA_CONFIG";

/// Unique ids of the tensors the variant pack binds (ids are the graph's only link from a
/// tensor descriptor to its memory).
const UID_Q: i64 = 1;
const UID_K: i64 = 2;
const UID_V: i64 = 3;
const UID_O: i64 = 4;
const UID_SCALE: i64 = 5;
/// The float8 graph's scales (device f32 scalars) and its two amax outputs.
const UID_DESCALE_Q: i64 = 6;
const UID_DESCALE_K: i64 = 7;
const UID_DESCALE_V: i64 = 8;
const UID_DESCALE_S: i64 = 9;
const UID_SCALE_S: i64 = 10;
const UID_SCALE_O: i64 = 11;
const UID_AMAX_S: i64 = 12;
const UID_AMAX_O: i64 = 13;
/// What the float8 graph scales the probabilities by before they are rounded to e4m3: P is
/// at most 1, e4m3's largest value 448.
const FP8_PROBABILITY_SCALE: f32 = 448.0;
/// The composite graph's virtual tensors, numbered from here.
const UID_VIRTUAL: i64 = 100;

/// Alignment cuDNN is promised for every tensor's address and strides (its kernels load 16
/// bytes at a time); [`sdpa_supports`] checks the operands against it.
const ALIGN_BYTES: usize = 16;
/// The largest head dimension taken (every Wan DiT has 128).
const MAX_HEAD_DIM: usize = 128;

/// A cuDNN backend descriptor, destroyed on drop.
struct Descriptor {
    raw: sys::cudnnBackendDescriptor_t,
}

impl Descriptor {
    fn new(kind: Kind, what: &str) -> Fallible<Self> {
        let mut raw: sys::cudnnBackendDescriptor_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid place for the new descriptor.
        let status = unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut raw) };
        check(status, &format!("creating {what}"))?;
        if raw.is_null() {
            return Err(format!("creating {what}: cuDNN returned no descriptor"));
        }
        Ok(Self { raw })
    }

    /// Sets `name` to `values`.
    ///
    /// # Safety
    /// `T` must be the C type cuDNN reads for `ty` (e.g. `i64` for `CUDNN_TYPE_INT64`, the
    /// 32-bit enum for `CUDNN_TYPE_DATA_TYPE`, `bool` for `CUDNN_TYPE_BOOLEAN`), and any handle,
    /// descriptor or pointer among `values` must stay valid for as long as cuDNN uses it.
    unsafe fn set<T>(&self, name: Attr, ty: AttrType, values: &[T], step: &str) -> Fallible<()> {
        // SAFETY: `values` holds `values.len()` elements of the type `ty` names (the caller's
        // promise); cuDNN reads them during the call.
        let status = unsafe {
            sys::cudnnBackendSetAttribute(
                self.raw,
                name,
                ty,
                values.len() as i64,
                values.as_ptr().cast::<c_void>(),
            )
        };
        check(status, step)
    }

    fn set_i64s(&self, name: Attr, values: &[i64], step: &str) -> Fallible<()> {
        // SAFETY: CUDNN_TYPE_INT64 is int64_t.
        unsafe { self.set(name, AttrType::CUDNN_TYPE_INT64, values, step) }
    }

    fn set_bool(&self, name: Attr, value: bool, step: &str) -> Fallible<()> {
        // SAFETY: CUDNN_TYPE_BOOLEAN is C's bool, one byte like Rust's.
        unsafe { self.set(name, AttrType::CUDNN_TYPE_BOOLEAN, &[value], step) }
    }

    fn set_data_type(&self, name: Attr, value: sys::cudnnDataType_t, step: &str) -> Fallible<()> {
        // SAFETY: CUDNN_TYPE_DATA_TYPE is the cudnnDataType_t enum, 32 bits (repr(u32) here).
        unsafe { self.set(name, AttrType::CUDNN_TYPE_DATA_TYPE, &[value], step) }
    }

    fn set_pointwise_mode(&self, value: sys::cudnnPointwiseMode_t, step: &str) -> Fallible<()> {
        // SAFETY: CUDNN_TYPE_POINTWISE_MODE is the cudnnPointwiseMode_t enum, 32 bits.
        unsafe {
            self.set(
                Attr::CUDNN_ATTR_POINTWISE_MODE,
                AttrType::CUDNN_TYPE_POINTWISE_MODE,
                &[value],
                step,
            )
        }
    }

    fn set_reduction_operator(
        &self,
        value: sys::cudnnReduceTensorOp_t,
        step: &str,
    ) -> Fallible<()> {
        // SAFETY: CUDNN_TYPE_REDUCTION_OPERATOR_TYPE is the cudnnReduceTensorOp_t enum, 32 bits.
        unsafe {
            self.set(
                Attr::CUDNN_ATTR_REDUCTION_OPERATOR,
                AttrType::CUDNN_TYPE_REDUCTION_OPERATOR_TYPE,
                &[value],
                step,
            )
        }
    }

    fn set_heuristic_mode(&self, value: sys::cudnnBackendHeurMode_t, step: &str) -> Fallible<()> {
        // SAFETY: CUDNN_TYPE_HEUR_MODE is the cudnnBackendHeurMode_t enum, 32 bits.
        unsafe {
            self.set(
                Attr::CUDNN_ATTR_ENGINEHEUR_MODE,
                AttrType::CUDNN_TYPE_HEUR_MODE,
                &[value],
                step,
            )
        }
    }

    /// Sets `name` to `handle`, which cuDNN keeps: the caller keeps the handle alive for as
    /// long as this descriptor (a [`Plan`] holds its [`Handle`]).
    fn set_handle(&self, name: Attr, handle: &Handle, step: &str) -> Fallible<()> {
        // SAFETY: CUDNN_TYPE_HANDLE is cudnnHandle_t; `handle` is live (see above).
        unsafe { self.set(name, AttrType::CUDNN_TYPE_HANDLE, &[handle.raw], step) }
    }

    /// Sets `name` to descriptors, which the caller keeps alive for as long as this one (the
    /// [`Plan`] holds every descriptor of its graph).
    fn set_descriptors(&self, name: Attr, values: &[&Descriptor], step: &str) -> Fallible<()> {
        let raw: Vec<sys::cudnnBackendDescriptor_t> = values.iter().map(|d| d.raw).collect();
        // SAFETY: CUDNN_TYPE_BACKEND_DESCRIPTOR is cudnnBackendDescriptor_t; they are live.
        unsafe { self.set(name, AttrType::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw, step) }
    }

    fn finalize(&self, step: &str) -> Fallible<()> {
        // SAFETY: `raw` is a live descriptor whose attributes were set through `set`.
        check(unsafe { sys::cudnnBackendFinalize(self.raw) }, step)
    }

    /// A finalized descriptor's single int64 attribute.
    fn get_i64(&self, name: Attr, step: &str) -> Fallible<i64> {
        let (mut value, mut count) = (0i64, 0i64);
        // SAFETY: one int64_t is requested into `value`; cuDNN writes the count into `count`.
        let status = unsafe {
            sys::cudnnBackendGetAttribute(
                self.raw,
                name,
                AttrType::CUDNN_TYPE_INT64,
                1,
                &mut count,
                (&mut value as *mut i64).cast::<c_void>(),
            )
        };
        check(status, step)?;
        if count != 1 {
            return Err(format!("{step}: cuDNN returned {count} values"));
        }
        Ok(value)
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: `raw` was created by `Descriptor::new` and is destroyed only here.
        unsafe {
            let _ = sys::cudnnBackendDestroyDescriptor(self.raw);
        }
    }
}

/// Descriptors that must outlive the ones built from them, dropped newest first (operations
/// before the tensors they name, the plan before its engine configuration and graph).
#[derive(Default)]
struct Kept(Vec<Descriptor>);

impl Kept {
    fn keep(&mut self, descriptor: Descriptor) {
        self.0.push(descriptor);
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        while self.0.pop().is_some() {}
    }
}

/// A raw cuDNN handle bound to a stream, destroyed on drop; it holds the stream so that no
/// other stream can take its address (the key it is found by) while it lives.
struct Handle {
    raw: sys::cudnnHandle_t,
    _stream: Arc<CudaStream>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: `raw` was created by `handle` and is destroyed only here, after every plan
        // built on it (each holds this handle).
        unsafe {
            let _ = result::destroy_handle(self.raw);
        }
    }
}

/// What identifies a plan: the stream (its handle), dtype, sizes and the element strides of
/// q, k, v and the output ([B, H, L, D] order).
#[derive(Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    stream: usize,
    dtype: DType,
    /// Q, K and V in float8 e4m3 (the output in `dtype`, or in e4m3 too with `fp8_output`).
    fp8: bool,
    fp8_output: bool,
    /// B, H, Lq, Lk, D.
    sizes: [usize; 5],
    strides: [[usize; 4]; 4],
}

/// Which of the two graphs a plan runs.
#[derive(Clone, Copy)]
enum Graph {
    Native,
    Composite,
    CompositeFp8,
}

impl Graph {
    fn name(self) -> &'static str {
        match self {
            Graph::Native => "native SDPA_FWD operation",
            Graph::Composite => "composite graph",
            Graph::CompositeFp8 => "composite float8 graph",
        }
    }
}

/// An execution plan and everything it was built from.
struct Plan {
    plan: Descriptor,
    workspace_bytes: usize,
    /// Which graph, which engine configuration, and why any graph tried first gave no plan.
    description: String,
    /// The engine configuration, operation graph, operations and tensors of the plan.
    _graph: Kept,
    /// Dropped last: the descriptors above were built on it.
    handle: Rc<Handle>,
}

/// Per thread: handles by stream, and plans (or why there is none) by key.
#[derive(Default)]
struct State {
    handles: HashMap<usize, Rc<Handle>>,
    plans: HashMap<PlanKey, Result<Rc<Plan>, String>>,
}

/// Where the float8 graph's device scalars sit in their buffer, 16 bytes apart (the alignment
/// every tensor descriptor promises): `scale_s`, `descale_s`, `scale_o`, then the two amax
/// outputs. A buffer per call, freed after it in stream order, as the workspace is, so that
/// nothing stays on the device between phases.
struct Fp8Scalars;

impl Fp8Scalars {
    const STRIDE: usize = ALIGN_BYTES / 4;
    const SCALE_S: usize = 0;
    const DESCALE_S: usize = 1;
    const SCALE_O: usize = 2;
    const AMAX_S: usize = 3;
    const AMAX_O: usize = 4;
    const COUNT: usize = 5;

    /// A fresh buffer on `stream` with the constants in place.
    fn on(stream: &Arc<CudaStream>) -> candle_core::Result<CudaSlice<f32>> {
        let mut values = [0f32; Self::COUNT * Self::STRIDE];
        values[Self::SCALE_S * Self::STRIDE] = FP8_PROBABILITY_SCALE;
        values[Self::DESCALE_S * Self::STRIDE] = 1.0 / FP8_PROBABILITY_SCALE;
        values[Self::SCALE_O * Self::STRIDE] = 1.0;
        stream
            .clone_htod(&values)
            .map_err(|e| error(format!("the float8 scales: {e:?}")))
    }
}

thread_local! {
    // cuDNN handles and execution plans are not thread-safe; one set per thread.
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// This thread's handle for `stream`, created (and bound to the stream) on first use.
fn handle(stream: &Arc<CudaStream>) -> Fallible<Rc<Handle>> {
    let key = Arc::as_ptr(stream) as usize;
    if let Some(found) = STATE.with(|s| s.borrow().handles.get(&key).cloned()) {
        return Ok(found);
    }
    let _span = tracing::debug_span!("cudnn_sdpa_handle").entered();
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| format!("binding the CUDA context: {e:?}"))?;
    let raw = result::create_handle().map_err(|e| format!("creating the handle: {e:?}"))?;
    let created = Rc::new(Handle {
        raw,
        _stream: stream.clone(),
    });
    // SAFETY: `raw` is a live handle and the stream outlives it (`created` holds both).
    unsafe { result::set_stream(raw, stream.cu_stream() as sys::cudaStream_t) }
        .map_err(|e| format!("binding the handle to the stream: {e:?}"))?;
    STATE.with(|s| s.borrow_mut().handles.insert(key, created.clone()));
    Ok(created)
}

/// A tensor descriptor's properties.
struct TensorSpec {
    name: &'static str,
    uid: i64,
    dtype: sys::cudnnDataType_t,
    dims: [i64; 4],
    strides: [i64; 4],
    is_virtual: bool,
    by_value: bool,
}

fn tensor(spec: TensorSpec) -> Fallible<Descriptor> {
    let TensorSpec {
        name,
        uid,
        dtype,
        dims,
        strides,
        is_virtual,
        by_value,
    } = spec;
    let d = Descriptor::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR, name)?;
    let step = |what: &str| format!("tensor {name}: {what}");
    d.set_data_type(Attr::CUDNN_ATTR_TENSOR_DATA_TYPE, dtype, &step("data type"))?;
    d.set_i64s(
        Attr::CUDNN_ATTR_TENSOR_DIMENSIONS,
        &dims,
        &step("dimensions"),
    )?;
    d.set_i64s(Attr::CUDNN_ATTR_TENSOR_STRIDES, &strides, &step("strides"))?;
    d.set_i64s(
        Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID,
        &[uid],
        &step("unique id"),
    )?;
    d.set_i64s(
        Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
        &[ALIGN_BYTES as i64],
        &step("alignment"),
    )?;
    if is_virtual {
        d.set_bool(Attr::CUDNN_ATTR_TENSOR_IS_VIRTUAL, true, &step("virtual"))?;
    }
    if by_value {
        d.set_bool(Attr::CUDNN_ATTR_TENSOR_IS_BY_VALUE, true, &step("by value"))?;
    }
    d.finalize(&step("finalizing"))?;
    Ok(d)
}

/// The sizes and layouts a graph is built for, in cuDNN's terms.
struct Problem {
    /// The output's type (and the inputs', unless `input` says float8).
    io: sys::cudnnDataType_t,
    /// Q's, K's and V's type.
    input: sys::cudnnDataType_t,
    b: i64,
    h: i64,
    lq: i64,
    lk: i64,
    d: i64,
    q: [i64; 4],
    k: [i64; 4],
    v: [i64; 4],
    o: [i64; 4],
}

impl Problem {
    fn from_key(key: &PlanKey) -> Fallible<Self> {
        let io = match key.dtype {
            DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
            DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
            other => return Err(format!("no attention for {other:?}")),
        };
        let [b, h, lq, lk, d] = key.sizes.map(|n| n as i64);
        let [q, k, v, o] = key.strides.map(|s| s.map(|n| n as i64));
        let fp8 = sys::cudnnDataType_t::CUDNN_DATA_FP8_E4M3;
        let input = if key.fp8 { fp8 } else { io };
        let io = if key.fp8_output { fp8 } else { io };
        Ok(Self {
            io,
            input,
            b,
            h,
            lq,
            lk,
            d,
            q,
            k,
            v,
            o,
        })
    }

    /// The four tensors the variant pack binds and the scale. `transposed_k` describes K as
    /// Kᵀ [B, H, D, Lk] over the same memory (what the composite graph's first matmul takes).
    fn io_tensors(&self, transposed_k: bool) -> Fallible<[Descriptor; 5]> {
        let (b, h, lq, lk, d) = (self.b, self.h, self.lq, self.lk, self.d);
        let plain = |name, uid, dims, strides| TensorSpec {
            name,
            uid,
            dtype: self.input,
            dims,
            strides,
            is_virtual: false,
            by_value: false,
        };
        let [k0, k1, k2, k3] = self.k;
        let k = if transposed_k {
            plain("Kᵀ", UID_K, [b, h, d, lk], [k0, k1, k3, k2])
        } else {
            plain("K", UID_K, [b, h, lk, d], self.k)
        };
        Ok([
            tensor(plain("Q", UID_Q, [b, h, lq, d], self.q))?,
            tensor(k)?,
            tensor(plain("V", UID_V, [b, h, lk, d], self.v))?,
            tensor(TensorSpec {
                dtype: self.io,
                ..plain("O", UID_O, [b, h, lq, d], self.o)
            })?,
            // A host f32 passed by value at execution, [1, 1, 1, 1] as PyTorch declares it.
            tensor(TensorSpec {
                name: "scale",
                uid: UID_SCALE,
                dtype: sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                dims: [1; 4],
                strides: [1; 4],
                is_virtual: false,
                by_value: true,
            })?,
        ])
    }
}

/// The native SDPA operation over Q, K, V, O and the scale; returns the operation and the
/// tensors it names.
fn native_graph(p: &Problem) -> Fallible<(Vec<Descriptor>, Kept)> {
    let [q, k, v, o, scale] = p.io_tensors(false)?;
    let op = Descriptor::new(
        Kind::CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR,
        "the SDPA operation",
    )?;
    for (name, t, what) in [
        (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, &q, "Q"),
        (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, &k, "K"),
        (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, &v, "V"),
        (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, &o, "O"),
        (
            Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC,
            &scale,
            "scale",
        ),
    ] {
        op.set_descriptors(name, &[t], &format!("SDPA operation: {what}"))?;
    }
    op.finalize("finalizing the SDPA operation")?;
    let mut kept = Kept::default();
    for t in [q, k, v, o, scale] {
        kept.keep(t);
    }
    Ok((vec![op], kept))
}

/// A matmul operation `c = a · b` computing in f32, with the padding value given where the
/// frontend sets one (its float8 graph's first product); its matmul descriptor goes to `kept`.
fn matmul(
    (name, padding): (&str, Option<f64>),
    a: &Descriptor,
    b: &Descriptor,
    c: &Descriptor,
    kept: &mut Kept,
) -> Fallible<Descriptor> {
    let step = |what: &str| format!("matmul {name}: {what}");
    let desc = Descriptor::new(Kind::CUDNN_BACKEND_MATMUL_DESCRIPTOR, name)?;
    desc.set_data_type(
        Attr::CUDNN_ATTR_MATMUL_COMP_TYPE,
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        &step("compute type"),
    )?;
    if let Some(padding) = padding {
        // SAFETY: CUDNN_TYPE_DOUBLE is C's double.
        unsafe {
            desc.set(
                Attr::CUDNN_ATTR_MATMUL_PADDING_VALUE,
                AttrType::CUDNN_TYPE_DOUBLE,
                &[padding],
                &step("padding value"),
            )
        }?;
    }
    desc.finalize(&step("finalizing the descriptor"))?;
    let op = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, name)?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_MATMUL_ADESC, &[a], &step("A"))?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_MATMUL_BDESC, &[b], &step("B"))?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_MATMUL_CDESC, &[c], &step("C"))?;
    op.set_descriptors(
        Attr::CUDNN_ATTR_OPERATION_MATMUL_DESC,
        &[&desc],
        &step("descriptor"),
    )?;
    op.finalize(&step("finalizing"))?;
    kept.keep(desc);
    Ok(op)
}

/// A pointwise operation `y = mode(x[, b])` computing in f32; its pointwise descriptor goes to
/// `kept`.
fn pointwise(
    mode: sys::cudnnPointwiseMode_t,
    x: &Descriptor,
    b: Option<&Descriptor>,
    y: &Descriptor,
    kept: &mut Kept,
) -> Fallible<Descriptor> {
    let step = |what: &str| format!("pointwise {mode:?}: {what}");
    let desc = Descriptor::new(Kind::CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "a pointwise mode")?;
    desc.set_pointwise_mode(mode, &step("mode"))?;
    desc.set_data_type(
        Attr::CUDNN_ATTR_POINTWISE_MATH_PREC,
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        &step("precision"),
    )?;
    desc.finalize(&step("finalizing the descriptor"))?;
    let op = Descriptor::new(
        Kind::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR,
        "a pointwise operation",
    )?;
    op.set_descriptors(
        Attr::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR,
        &[&desc],
        &step("descriptor"),
    )?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[x], &step("X"))?;
    if let Some(b) = b {
        op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[b], &step("B"))?;
    }
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[y], &step("Y"))?;
    op.finalize(&step("finalizing"))?;
    kept.keep(desc);
    Ok(op)
}

/// A reduction `y = op(x)` over the dimensions where `y` has size 1, computing in f32; its
/// reduction descriptor goes to `kept`.
fn reduction(
    operator: sys::cudnnReduceTensorOp_t,
    x: &Descriptor,
    y: &Descriptor,
    kept: &mut Kept,
) -> Fallible<Descriptor> {
    let step = |what: &str| format!("reduction {operator:?}: {what}");
    let desc = Descriptor::new(Kind::CUDNN_BACKEND_REDUCTION_DESCRIPTOR, "a reduction mode")?;
    desc.set_data_type(
        Attr::CUDNN_ATTR_REDUCTION_COMP_TYPE,
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        &step("compute type"),
    )?;
    desc.set_reduction_operator(operator, &step("operator"))?;
    if cudnn_version() >= DETERMINISM_FLAG_VERSION {
        desc.set_bool(
            Attr::CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC,
            false,
            &step("determinism"),
        )?;
    }
    desc.finalize(&step("finalizing the descriptor"))?;
    let op = Descriptor::new(
        Kind::CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR,
        "a reduction operation",
    )?;
    op.set_descriptors(
        Attr::CUDNN_ATTR_OPERATION_REDUCTION_DESC,
        &[&desc],
        &step("descriptor"),
    )?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_REDUCTION_XDESC, &[x], &step("X"))?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_REDUCTION_YDESC, &[y], &step("Y"))?;
    op.finalize(&step("finalizing"))?;
    kept.keep(desc);
    Ok(op)
}

/// Dimensions and strides of a tensor descriptor.
type Extent = ([i64; 4], [i64; 4]);

/// A composite graph's virtual tensors (intermediates cuDNN never stores), numbered from
/// [`UID_VIRTUAL`] and laid out packed, as the frontend lays them out.
struct Virtuals {
    next_uid: i64,
}

impl Virtuals {
    fn new() -> Self {
        Self {
            next_uid: UID_VIRTUAL,
        }
    }

    fn tensor(
        &mut self,
        name: &'static str,
        dtype: sys::cudnnDataType_t,
        (dims, strides): Extent,
    ) -> Fallible<Descriptor> {
        self.next_uid += 1;
        tensor(TensorSpec {
            name,
            uid: self.next_uid,
            dtype,
            dims,
            strides,
            is_virtual: true,
            by_value: false,
        })
    }
}

/// The scores' [B, H, Lq, Lk] and the per-row values' [B, H, Lq, 1] extents, packed.
fn score_extents(p: &Problem) -> (Extent, Extent) {
    let (b, h, lq, lk) = (p.b, p.h, p.lq, p.lk);
    (
        ([b, h, lq, lk], [h * lq * lk, lq * lk, lk, 1]),
        ([b, h, lq, 1], [h * lq, lq, 1, 1]),
    )
}

/// The frontend's softmax with statistics over the keys of the scores `x`: `M = max`, `x − M`,
/// `exp`, `Z = Σ exp`, the statistics chain `M + log Z` (which nothing reads: the engines
/// match the graph with it) and the probabilities `P = exp / Z` in `dtype`, which it returns.
/// Appends its operations to `ops` and the other tensors it made to `kept`.
fn softmax(
    (x, dtype): (&Descriptor, sys::cudnnDataType_t),
    p: &Problem,
    virtuals: &mut Virtuals,
    ops: &mut Vec<Descriptor>,
    kept: &mut Kept,
) -> Fallible<Descriptor> {
    use sys::cudnnPointwiseMode_t as Pw;
    use sys::cudnnReduceTensorOp_t as Red;
    let f32 = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
    let (scores, rows) = score_extents(p);
    let max = virtuals.tensor("M = max", f32, rows)?;
    let centred = virtuals.tensor("S − M", f32, scores)?;
    let exp = virtuals.tensor("exp(S − M)", f32, scores)?;
    let sum = virtuals.tensor("Z = Σ exp", f32, rows)?;
    let log_sum = virtuals.tensor("log Z", f32, rows)?;
    let stats = virtuals.tensor("stats = M + log Z", f32, rows)?;
    let probs = virtuals.tensor("P = exp / Z", dtype, scores)?;
    ops.push(reduction(Red::CUDNN_REDUCE_TENSOR_MAX, x, &max, kept)?);
    ops.push(pointwise(
        Pw::CUDNN_POINTWISE_SUB,
        x,
        Some(&max),
        &centred,
        kept,
    )?);
    ops.push(pointwise(
        Pw::CUDNN_POINTWISE_EXP,
        &centred,
        None,
        &exp,
        kept,
    )?);
    ops.push(reduction(Red::CUDNN_REDUCE_TENSOR_ADD, &exp, &sum, kept)?);
    ops.push(pointwise(
        Pw::CUDNN_POINTWISE_LOG,
        &sum,
        None,
        &log_sum,
        kept,
    )?);
    ops.push(pointwise(
        Pw::CUDNN_POINTWISE_ADD,
        &max,
        Some(&log_sum),
        &stats,
        kept,
    )?);
    ops.push(pointwise(
        Pw::CUDNN_POINTWISE_DIV,
        &exp,
        Some(&sum),
        &probs,
        kept,
    )?);
    for t in [max, centred, exp, sum, log_sum, stats] {
        kept.keep(t);
    }
    Ok(probs)
}

/// `y = x · b` (pointwise, f32).
fn mul(x: &Descriptor, b: &Descriptor, y: &Descriptor, kept: &mut Kept) -> Fallible<Descriptor> {
    pointwise(
        sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_MUL,
        x,
        Some(b),
        y,
        kept,
    )
}

/// The composite graph (see the module documentation); returns its operations in the
/// frontend's order and the descriptors they name.
fn composite_graph(p: &Problem) -> Fallible<(Vec<Descriptor>, Kept)> {
    let [q, kt, v, o, scale] = p.io_tensors(true)?;
    let (scores, _) = score_extents(p);
    let f32 = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
    let mut virtuals = Virtuals::new();
    let s = virtuals.tensor("S = Q·Kᵀ", f32, scores)?;
    let scaled = virtuals.tensor("S·scale", f32, scores)?;
    let mut kept = Kept::default();
    let mut ops = vec![
        matmul(("Q·Kᵀ", None), &q, &kt, &s, &mut kept)?,
        mul(&s, &scale, &scaled, &mut kept)?,
    ];
    let probs = softmax((&scaled, p.io), p, &mut virtuals, &mut ops, &mut kept)?;
    ops.push(matmul(("P·V", None), &probs, &v, &o, &mut kept)?);
    for t in [q, kt, v, o, scale, s, scaled, probs] {
        kept.keep(t);
    }
    Ok((ops, kept))
}

/// The composite float8 graph (see the module documentation); returns its operations in the
/// frontend's order and the descriptors they name.
fn composite_fp8_graph(p: &Problem) -> Fallible<(Vec<Descriptor>, Kept)> {
    use sys::cudnnReduceTensorOp_t as Red;
    let [q, kt, v, o, scale] = p.io_tensors(true)?;
    let f32 = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
    // The scales and the amax outputs: f32 [1, 1, 1, 1] in device memory.
    let scalar = |name, uid| {
        tensor(TensorSpec {
            name,
            uid,
            dtype: f32,
            dims: [1; 4],
            strides: [1; 4],
            is_virtual: false,
            by_value: false,
        })
    };
    let descale_q = scalar("descale q", UID_DESCALE_Q)?;
    let descale_k = scalar("descale k", UID_DESCALE_K)?;
    let descale_v = scalar("descale v", UID_DESCALE_V)?;
    let descale_s = scalar("descale s", UID_DESCALE_S)?;
    let scale_s = scalar("scale s", UID_SCALE_S)?;
    let scale_o = scalar("scale o", UID_SCALE_O)?;
    let amax_s = scalar("amax s", UID_AMAX_S)?;
    let amax_o = scalar("amax o", UID_AMAX_O)?;
    let (scores, _) = score_extents(p);
    let (b, h, lq, d) = (p.b, p.h, p.lq, p.d);
    let outputs = ([b, h, lq, d], [h * lq * d, lq * d, d, 1]);
    let mut virtuals = Virtuals::new();
    let s = virtuals.tensor("S = Q·Kᵀ", f32, scores)?;
    let scaled = virtuals.tensor("S·scale", f32, scores)?;
    let q_descaled = virtuals.tensor("·descale q", f32, scores)?;
    let k_descaled = virtuals.tensor("·descale k", f32, scores)?;
    let mut kept = Kept::default();
    let mut ops = vec![
        matmul(("Q·Kᵀ", Some(0.0)), &q, &kt, &s, &mut kept)?,
        mul(&s, &scale, &scaled, &mut kept)?,
        mul(&scaled, &descale_q, &q_descaled, &mut kept)?,
        mul(&q_descaled, &descale_k, &k_descaled, &mut kept)?,
    ];
    let probs = softmax((&k_descaled, f32), p, &mut virtuals, &mut ops, &mut kept)?;
    let probs8 = virtuals.tensor("P·scale s", p.input, scores)?;
    let product = virtuals.tensor("P·V", f32, outputs)?;
    let s_descaled = virtuals.tensor("·descale s", f32, outputs)?;
    let v_descaled = virtuals.tensor("·descale v", f32, outputs)?;

    ops.extend([
        reduction(Red::CUDNN_REDUCE_TENSOR_AMAX, &probs, &amax_s, &mut kept)?,
        mul(&probs, &scale_s, &probs8, &mut kept)?,
        matmul(("P·V", None), &probs8, &v, &product, &mut kept)?,
        mul(&product, &descale_s, &s_descaled, &mut kept)?,
        mul(&s_descaled, &descale_v, &v_descaled, &mut kept)?,
        mul(&v_descaled, &scale_o, &o, &mut kept)?,
        reduction(
            Red::CUDNN_REDUCE_TENSOR_AMAX,
            &v_descaled,
            &amax_o,
            &mut kept,
        )?,
    ]);
    for t in [
        q, kt, v, o, scale, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, amax_s,
        amax_o, s, scaled, q_descaled, k_descaled, probs, probs8, product, s_descaled, v_descaled,
    ] {
        kept.keep(t);
    }
    Ok((ops, kept))
}

/// The operation graph of `ops`, cuDNN's ranked engine configurations for it, and the first
/// that finalizes into an execution plan.
fn plan_graph(
    handle: &Rc<Handle>,
    graph: Graph,
    ops: Vec<Descriptor>,
    mut kept: Kept,
) -> Fallible<Plan> {
    let op_graph = Descriptor::new(
        Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR,
        "the operation graph",
    )?;
    let op_refs: Vec<&Descriptor> = ops.iter().collect();
    op_graph.set_descriptors(
        Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS,
        &op_refs,
        "operation graph: operations",
    )?;
    op_graph.set_handle(
        Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
        handle,
        "operation graph: handle",
    )?;
    op_graph.finalize("finalizing the operation graph")?;
    for op in ops {
        kept.keep(op);
    }

    let heuristics = Descriptor::new(Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "the heuristics")?;
    heuristics.set_descriptors(
        Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH,
        &[&op_graph],
        "heuristics: operation graph",
    )?;
    heuristics.set_heuristic_mode(
        sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
        "heuristics: mode",
    )?;
    heuristics.finalize("finalizing the heuristics query")?;
    let mut count = 0i64;
    // SAFETY: a count query (no elements requested, none written).
    let status = unsafe {
        sys::cudnnBackendGetAttribute(
            heuristics.raw,
            Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            AttrType::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            0,
            &mut count,
            std::ptr::null_mut(),
        )
    };
    check(status, "counting the engine configurations")?;
    if count <= 0 {
        return Err("the heuristics found no engine configuration".into());
    }
    // cuDNN fills engine configuration descriptors that the caller creates.
    let configs = (0..count)
        .map(|_| Descriptor::new(Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "an engine config"))
        .collect::<Fallible<Vec<_>>>()?;
    let mut raw: Vec<sys::cudnnBackendDescriptor_t> = configs.iter().map(|c| c.raw).collect();
    let mut returned = 0i64;
    // SAFETY: `raw` holds `count` live engine configuration descriptors for cuDNN to fill.
    let status = unsafe {
        sys::cudnnBackendGetAttribute(
            heuristics.raw,
            Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            AttrType::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            count,
            &mut returned,
            raw.as_mut_ptr().cast::<c_void>(),
        )
    };
    check(status, "reading the engine configurations")?;
    let returned = returned.clamp(0, count) as usize;

    let mut refusals = Vec::new();
    let mut ranked: Vec<_> = configs.into_iter().take(returned).enumerate().collect();
    let first = std::env::var(CONFIG_ENV)
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=ranked.len()).contains(n));
    if let Some(n) = first {
        let chosen = ranked.remove(n - 1);
        ranked.insert(0, chosen);
    }
    for (rank, config) in ranked {
        match execution_plan(handle, &config) {
            Ok((plan, workspace_bytes)) => {
                let description = format!(
                    "{}, engine configuration {} of {returned} (heuristics mode A), \
                     workspace {workspace_bytes} bytes, cuDNN {}",
                    graph.name(),
                    rank + 1,
                    cudnn_version()
                );
                kept.keep(op_graph);
                kept.keep(heuristics);
                kept.keep(config);
                return Ok(Plan {
                    plan,
                    workspace_bytes,
                    description,
                    _graph: kept,
                    handle: handle.clone(),
                });
            }
            Err(e) => refusals.push(format!("configuration {}: {e}", rank + 1)),
        }
    }
    if refusals.is_empty() {
        return Err("the heuristics returned no engine configuration".into());
    }
    Err(format!(
        "no engine configuration finalized ({})",
        refusals.join("; ")
    ))
}

/// An execution plan of one engine configuration, and its workspace size.
fn execution_plan(handle: &Handle, config: &Descriptor) -> Fallible<(Descriptor, usize)> {
    let plan = Descriptor::new(
        Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR,
        "the execution plan",
    )?;
    plan.set_handle(
        Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
        handle,
        "execution plan: handle",
    )?;
    plan.set_descriptors(
        Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,
        &[config],
        "execution plan: engine configuration",
    )?;
    plan.finalize("finalizing the execution plan")?;
    let bytes = plan.get_i64(
        Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
        "reading the workspace size",
    )?;
    let bytes = usize::try_from(bytes).map_err(|_| format!("workspace size {bytes}"))?;
    Ok((plan, bytes))
}

/// A plan for `key` on `handle`: the native operation, then the composite graph, as the
/// version and [`GRAPH_ENV`] allow.
fn build_plan(handle: &Rc<Handle>, key: &PlanKey) -> Fallible<Plan> {
    let version = cudnn_version();
    // cuDNN's frontend refuses bf16/f16 attention on 9.10.0 and 9.10.1 (known bugs), and this
    // module is written against cuDNN 9's backend API.
    if version < 90000 || version == 91000 || version == 91001 {
        return Err(format!(
            "cuDNN {version} is not supported (9.0 or later, except 9.10.0 and 9.10.1)"
        ));
    }
    let problem = Problem::from_key(key)?;
    if key.fp8 {
        return composite_fp8_graph(&problem)
            .and_then(|(ops, kept)| plan_graph(handle, Graph::CompositeFp8, ops, kept))
            .map_err(|e| {
                format!(
                    "no execution plan for float8 [B, H, Lq, Lk, D] = {:?} with strides {:?}, \
                     output {:?} ({}: {e})",
                    key.sizes,
                    key.strides,
                    key.dtype,
                    Graph::CompositeFp8.name()
                )
            });
    }
    let choice = std::env::var(GRAPH_ENV).unwrap_or_default();
    let mut refusals = Vec::new();
    if choice != "composite" {
        if version >= NATIVE_MIN_VERSION {
            match native_graph(&problem)
                .and_then(|(ops, kept)| plan_graph(handle, Graph::Native, ops, kept))
            {
                Ok(plan) => return Ok(plan),
                Err(e) => refusals.push(format!("{}: {e}", Graph::Native.name())),
            }
        } else {
            refusals.push(format!(
                "{}: needs cuDNN {NATIVE_MIN_VERSION} or later",
                Graph::Native.name()
            ));
        }
    }
    if choice != "native" {
        match composite_graph(&problem)
            .and_then(|(ops, kept)| plan_graph(handle, Graph::Composite, ops, kept))
        {
            Ok(mut plan) => {
                if !refusals.is_empty() {
                    plan.description += &format!(" (after {})", refusals.join("; "));
                }
                return Ok(plan);
            }
            Err(e) => refusals.push(format!("{}: {e}", Graph::Composite.name())),
        }
    }
    Err(format!(
        "no execution plan for {:?} [B, H, Lq, Lk, D] = {:?} with strides {:?} ({})",
        key.dtype,
        key.sizes,
        key.strides,
        refusals.join("; ")
    ))
}

/// This thread's plan for `key`, built on first use; a refusal is remembered as well.
fn plan_for(key: &PlanKey, stream: &Arc<CudaStream>) -> candle_core::Result<Rc<Plan>> {
    if let Some(found) = STATE.with(|s| s.borrow().plans.get(key).cloned()) {
        return found.map_err(error);
    }
    let handle = handle(stream).map_err(error)?;
    let built = tracing::debug_span!("cudnn_sdpa_plan").in_scope(|| build_plan(&handle, key));
    let cached = built.map(Rc::new);
    if let Ok(plan) = &cached {
        tracing::debug!(plan = %plan.description, "cuDNN SDPA plan");
    }
    STATE.with(|s| s.borrow_mut().plans.insert(key.clone(), cached.clone()));
    cached.map_err(error)
}

/// Whether [`sdpa`] takes these operands: bf16 or f16 (all three alike) on one CUDA device,
/// [B, H, L, D] with equal B, H and D, k and v of one length and no empty dimension, D a
/// multiple of 8 up to 128, D contiguous, and every other stride and the start offsets 16-byte
/// aligned (cuDNN's requirement); a stride of 0 only on a dimension of size 1.
pub fn sdpa_supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let (Ok((b, h, lq, d)), Ok((kb, kh, lk, kd)), Ok(v_dims)) = (q.dims4(), k.dims4(), v.dims4())
    else {
        return false;
    };
    let shapes = (kb, kh, kd) == (b, h, d)
        && v_dims == (b, h, lk, d)
        && [b, h, lq, lk].iter().all(|&n| n > 0)
        && d.is_multiple_of(8)
        && d <= MAX_HEAD_DIM;
    let dtype = q.dtype();
    let types = matches!(dtype, DType::BF16 | DType::F16)
        && k.dtype() == dtype
        && v.dtype() == dtype
        && q.device().is_cuda()
        && q.device().same_device(k.device())
        && q.device().same_device(v.device());
    let align = ALIGN_BYTES / dtype.size_in_bytes();
    let aligned = |t: &Tensor| {
        let (dims, strides) = (t.dims(), t.layout().stride());
        strides[3] == 1
            && strides[..3]
                .iter()
                .zip(dims)
                .all(|(&s, &n)| s.is_multiple_of(align) && (s > 0 || n == 1))
            && t.layout().start_offset().is_multiple_of(align)
    };
    shapes && types && [q, k, v].into_iter().all(aligned)
}

/// Element strides as cuDNN gets them: a size-1 dimension of stride 0 (a broadcast) gets the
/// extent of the dimensions inside it, as PyTorch passes such strides (cuDNN may reject 0).
fn strides_of(layout: &Layout) -> [usize; 4] {
    let (dims, strides) = (layout.dims(), layout.stride());
    std::array::from_fn(|i| match strides[i] {
        0 => (i + 1..4).map(|j| strides[j] * dims[j]).max().unwrap_or(1),
        s => s,
    })
}

/// The plan [`sdpa`] runs for these operands, in words (which graph, which engine
/// configuration, the workspace, the cuDNN version, and why a graph tried first gave no
/// plan); builds the plan if needed. For reports.
///
/// # Errors
/// As [`sdpa`].
pub fn describe_plan(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<String> {
    let (key, stream) = plan_key(q, k, v)?;
    Ok(plan_for(&key, &stream)?.description.clone())
}

/// The plan key of supported operands, and their stream.
fn plan_key(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<(PlanKey, Arc<CudaStream>)> {
    if !sdpa_supports(q, k, v) {
        return Err(error(format!(
            "unsupported operands q {:?} {:?} strides {:?} offset {}, k {:?} {:?} strides {:?} \
             offset {}, v {:?} {:?} strides {:?} offset {}",
            q.dims(),
            q.dtype(),
            q.layout().stride(),
            q.layout().start_offset(),
            k.dims(),
            k.dtype(),
            k.layout().stride(),
            k.layout().start_offset(),
            v.dims(),
            v.dtype(),
            v.layout().stride(),
            v.layout().start_offset(),
        )));
    }
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let stream = q.device().as_cuda_device()?.cuda_stream();
    let key = PlanKey {
        stream: Arc::as_ptr(&stream) as usize,
        dtype: q.dtype(),
        fp8: false,
        fp8_output: false,
        sizes: [b, h, lq, lk, d],
        strides: [
            strides_of(q.layout()),
            strides_of(k.layout()),
            strides_of(v.layout()),
            output_strides(h, lq, d),
        ],
    };
    Ok((key, stream))
}

/// Strides of the output's [B, H, Lq, D] view of its token-major [B, Lq, H, D] buffer.
fn output_strides(h: usize, lq: usize, d: usize) -> [usize; 4] {
    [lq * h * d, d, h * d, 1]
}

/// `softmax(q·kᵀ / √D) · v` through cuDNN's fused attention (see the module documentation),
/// reading q, k and v in place through their strides. The output is written token-major and
/// returned as a [B, H, Lq, D] view of it, so that the usual `transpose(1, 2)` back to
/// [B, Lq, H, D] is free.
///
/// The plan is built on the first call for a shape and layout (see the module documentation);
/// the workspace cuDNN asks for (usually none or a few MiB) is allocated per call from the
/// device's stream-ordered pool rather than kept per plan, so that idle plans hold no memory.
///
/// # Shapes
/// - `q`: [B, H, Lq, D], `k` and `v`: [B, H, Lk, D], bf16 or f16, any strides with D
///   contiguous ([`sdpa_supports`]).
/// - returns [B, H, Lq, D], a transposed view of a [B, Lq, H, D] buffer.
///
/// # Errors
/// Operands [`sdpa_supports`] refuses, or no execution plan from cuDNN for them (the message
/// names each step that failed and cuDNN's status), so that the caller can fall back to
/// another kernel; or a failed allocation or launch.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (key, stream) = plan_key(q, k, v)?;
    let plan = plan_for(&key, &stream)?;
    match q.dtype() {
        DType::BF16 => run::<half::bf16>(q, k, v, &plan, &key, &stream),
        DType::F16 => run::<half::f16>(q, k, v, &plan, &key, &stream),
        other => Err(error(format!("no attention for {other:?}"))),
    }
}

/// The device pointer of an operand's first element, and the record of its read (dropped
/// after the launch).
fn operand_ptr<'a>(
    storage: &'a Storage,
    layout: &Layout,
    stream: &'a CudaStream,
) -> candle_core::Result<(u64, SyncOnDrop<'a>)> {
    let Storage::Cuda(cuda) = storage else {
        return Err(error("operands must be on the CUDA device"));
    };
    // Both dtypes taken are two bytes wide.
    let offset = (layout.start_offset() * 2) as u64;
    let (base, read) = match &cuda.slice {
        CudaStorageSlice::BF16(s) => s.device_ptr(stream),
        CudaStorageSlice::F16(s) => s.device_ptr(stream),
        _ => return Err(error("operands must be bf16 or f16")),
    };
    Ok((base + offset, read))
}

/// `softmax(q·kᵀ / √D) · v` through cuDNN's fused attention in float8 (the module
/// documentation's float8 graph): q, k and v are quantised to e4m3 with one scale each (their
/// largest |value| over 448, computed on the device) into copies of their own layouts, both
/// products run in float8 with f32 accumulation, and the output is written in q's dtype,
/// token-major, returned as [`sdpa`]'s is. The plan is built once per shape and layout.
///
/// # Shapes
/// As [`sdpa`]; D 128.
///
/// # Errors
/// As [`sdpa`] (cuDNN's float8 attention needs Hopper or newer and cuDNN 9.1 or later; where
/// it gives no plan the message says so, and the caller runs the exact attention instead).
pub fn sdpa_fp8(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    sdpa_fp8_with(q, k, v, &Fp8KeysValues::quantize(k, v)?)
}

/// Keys and values quantised for [`sdpa_fp8_with`] (e4m3, one scale each, in their own
/// layouts), so that query slices attending to the same keys quantise them once. Both are
/// quantised less each channel's mean over the keys, which changes no attention output: taken
/// off the keys it lowers every score of a query by the same amount, which the softmax
/// ignores; taken off the values it is added back to the output (`o = P·(v − m) + m`, P's
/// rows summing to 1). What it changes is the float8 error. With the values' mean left in, the
/// output's norm shrank as the keys grew (0.62 of the exact one's at 32 760 keys, cosine
/// 0.9996); centred, the error is bf16's (BENCHMARKS.md, 2026-12-05). Hopper's float8 matrix
/// products add each product to the running sum aligned to the larger exponent and cut to
/// about 13 bits below it: with values of one sign every cut lowers the sum, and the more keys
/// the larger the sum and the more is cut; centred, the cuts fall either way
/// (`bench/fp8_attention_emulation.py` reproduces the drift, 0.624 at 32 760 keys, and its
/// absence once centred).
pub struct Fp8KeysValues {
    k: (Tensor, Tensor, Vec<usize>),
    v: (Tensor, Tensor, Vec<usize>),
    /// The values' mean over the keys, f32 [B, 1, H, D].
    v_mean: Tensor,
}

impl Fp8KeysValues {
    /// # Shapes
    /// - `k`, `v`: [B, H, Lk, D], bf16 or f16.
    pub fn quantize(k: &Tensor, v: &Tensor) -> candle_core::Result<Self> {
        // The mean and the spread about it in one pass where x's layout allows, else the
        // mean by a matrix product and the spread in the quantisation's own pass.
        let quantize = |x: &Tensor| -> candle_core::Result<_> {
            if let Some(centred) = crate::ops::fp8::quantize_centred(x)? {
                return Ok(centred);
            }
            let mean = mean_over_keys(x)?;
            Ok((crate::ops::fp8::quantize_per_tensor(x, Some(&mean))?, mean))
        };
        let (k, _) = quantize(k)?;
        let (v, v_mean) = quantize(v)?;
        Ok(Self { k, v, v_mean })
    }
}

/// Each channel's mean over the keys of `x` [B, H, L, D], as f32 [B, 1, H, D]: matrix
/// products of rows of 1/L with x's rows, token- or head-major as x is laid out (else a
/// contiguous copy), accumulated in f32. The keys are summed in up to 64 runs of equal length,
/// a product row each, and the runs' sums added: one row over all 32 760 keys would leave most
/// of the GPU idle. The mean's rounding does not matter: the same mean is taken off and added
/// back.
fn mean_over_keys(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    let runs = (1..=64).rev().find(|r| l % r == 0).unwrap_or(1);
    let tokens = x.transpose(1, 2)?;
    let (rows, batches, width) = if tokens.is_contiguous() {
        (tokens.reshape((b * runs, l / runs, h * d))?, b, h * d)
    } else {
        (
            x.contiguous()?.reshape((b * h * runs, l / runs, d))?,
            b * h,
            d,
        )
    };
    let weights = Tensor::full(1.0 / l as f32, (batches * runs, 1, l / runs), x.device())?
        .to_dtype(x.dtype())?;
    weights
        .matmul(&rows)?
        .reshape((batches, runs, width))?
        .to_dtype(DType::F32)?
        .sum(1)?
        .reshape((b, 1, h, d))
}

/// [`sdpa_fp8`] with `k` and `v` already quantised in `kv8` (from these `k` and `v`, whose
/// shapes and layouts the plan takes): only q is quantised here.
///
/// # Shapes
/// As [`sdpa_fp8`].
///
/// # Errors
/// As [`sdpa_fp8`].
pub fn sdpa_fp8_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv8: &Fp8KeysValues,
) -> candle_core::Result<Tensor> {
    match sdpa_fp8_output(q, k, v, kv8, false)? {
        Fp8AttentionOutput::Heads(out) => Ok(out),
        Fp8AttentionOutput::Rows(_) => Err(error("float8 rows where heads were asked for")),
    }
}

/// What [`sdpa_fp8_rows`] gives back.
#[derive(Debug)]
pub enum Fp8AttentionOutput {
    /// [B, H, Lq, D] in q's dtype, as [`sdpa_fp8`] returns it.
    Heads(Tensor),
    /// The output's B·Lq token rows of H·D, quantised per row for a float8 product.
    Rows(crate::ops::fp8::Fp8Rows),
}

/// [`sdpa_fp8`] with its output made the input of a float8 product (the output projection):
/// where cuDNN writes the output in e4m3, one pass turns it into the product's float8 rows
/// (dequantised, the values' mean back, quantised per row), and the 16-bit output is never
/// written; else the output as [`sdpa_fp8`] returns it.
///
/// # Shapes
/// As [`sdpa_fp8`]; the rows are [B·Lq, H·D].
///
/// # Errors
/// As [`sdpa_fp8`].
pub fn sdpa_fp8_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<Fp8AttentionOutput> {
    sdpa_fp8_output(q, k, v, &Fp8KeysValues::quantize(k, v)?, true)
}

/// [`sdpa_fp8_with`], or with `rows` [`sdpa_fp8_rows`].
fn sdpa_fp8_output(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv8: &Fp8KeysValues,
    rows: bool,
) -> candle_core::Result<Fp8AttentionOutput> {
    let (mut key, stream) = plan_key(q, k, v)?;
    let d = key.sizes[4];
    if d != FP8_HEAD_DIM {
        return Err(error(format!(
            "float8 attention takes heads of {FP8_HEAD_DIM} (the only size measured accurate \
             enough), not {d}"
        )));
    }
    let (q8, descale_q, q_strides) = crate::ops::fp8::quantize_per_tensor(q, None)?;
    let (k8, descale_k, k_strides) = (&kv8.k.0, &kv8.k.1, kv8.k.2.clone());
    let (v8, descale_v, v_strides) = (&kv8.v.0, &kv8.v.1, kv8.v.2.clone());
    let four = |strides: Vec<usize>| -> candle_core::Result<[usize; 4]> {
        let strides: [usize; 4] = strides
            .try_into()
            .map_err(|s| error(format!("float8 operand strides {s:?}")))?;
        // One-byte elements: every stride of a dimension past 1 16-byte aligned.
        if strides[..3].iter().any(|s| !s.is_multiple_of(ALIGN_BYTES)) {
            return Err(error(format!(
                "float8 operand strides {strides:?} are not multiples of {ALIGN_BYTES}"
            )));
        }
        Ok(strides)
    };
    key.fp8 = true;
    key.strides = [
        four(q_strides)?,
        four(k_strides)?,
        four(v_strides)?,
        key.strides[3],
    ];
    let plan = match plan_for(&key, &stream) {
        Ok(plan) => plan,
        Err(refused) => {
            key.fp8_output = true;
            plan_for(&key, &stream).map_err(|also| {
                error(format!("{refused}; with the output in float8 too: {also}"))
            })?
        }
    };
    let scalars = Fp8Scalars::on(&stream)?;
    let (base, _scalars_read) = scalars.device_ptr(&stream);
    let scalar = |i: usize| base + (i * Fp8Scalars::STRIDE * 4) as u64;
    let ptr = crate::ops::fused::device_ptr;
    // A float8 output's scale: the largest |V| maps to 448.
    let output_scale = key.fp8_output.then(|| descale_v.recip()).transpose()?;
    let mut operands = vec![
        (UID_Q, ptr(&q8)?),
        (UID_K, ptr(k8)?),
        (UID_V, ptr(v8)?),
        (UID_DESCALE_Q, ptr(&descale_q)?),
        (UID_DESCALE_K, ptr(descale_k)?),
        (UID_DESCALE_V, ptr(descale_v)?),
        (UID_SCALE_S, scalar(Fp8Scalars::SCALE_S)),
        (UID_DESCALE_S, scalar(Fp8Scalars::DESCALE_S)),
        (
            UID_SCALE_O,
            match &output_scale {
                Some(scale) => ptr(scale)?,
                None => scalar(Fp8Scalars::SCALE_O),
            },
        ),
        (UID_AMAX_S, scalar(Fp8Scalars::AMAX_S)),
        (UID_AMAX_O, scalar(Fp8Scalars::AMAX_O)),
    ];
    let device = q.device().as_cuda_device()?;
    let out = if key.fp8_output {
        let [b, h, lq, _, d] = key.sizes;
        let (o8, o8_ptr) = crate::ops::fused::empty_on(device, DType::F8E4M3, &[b, lq, h * d])?;
        operands.push((UID_O, o8_ptr));
        execute_on(&plan, &key, &stream, &operands)?;
        // Dequantised with the values' mean back in one pass where the kernel takes them,
        // and quantised per row too where a float8 product reads the output.
        let means = (descale_v, &kv8.v_mean);
        if rows {
            if let Some(rows) = crate::ops::fp8::Fp8Rows::attention_output(&o8, means, q.dtype())? {
                return Ok(Fp8AttentionOutput::Rows(rows));
            }
        }
        if let Some(out) =
            crate::ops::fused::dequantize_rows_with_mean(&o8, means.0, means.1, q.dtype())?
        {
            return Ok(Fp8AttentionOutput::Heads(
                out.reshape((b, lq, h, d))?.transpose(1, 2)?,
            ));
        }
        crate::ops::fused::dequantize_fp8(&o8, descale_v, q.dtype())?
            .reshape((b, lq, h, d))?
            .transpose(1, 2)
    } else {
        match q.dtype() {
            DType::BF16 => launch::<half::bf16>(device, &plan, &key, &stream, &operands),
            DType::F16 => launch::<half::f16>(device, &plan, &key, &stream, &operands),
            other => Err(error(format!("no attention for {other:?}"))),
        }
    };
    // q's float8 copy and descale are freed after the launch in stream order.
    drop((q8, descale_q));
    // The values' mean back (see [`Fp8KeysValues`]), in place on the fresh output.
    let out = out?;
    let out = match crate::ops::fp8::ChannelOffsets::for_layout(&kv8.v_mean, &out)? {
        Some(mean) => {
            crate::ops::fp8::add_channel_offsets(&out, &mean)?;
            out
        }
        None => out.broadcast_add(&kv8.v_mean.transpose(1, 2)?.to_dtype(out.dtype())?)?,
    };
    Ok(Fp8AttentionOutput::Heads(out))
}

/// Executes `plan` on q, k and v read in place.
fn run<T: CudaDType + DeviceRepr>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &Plan,
    key: &PlanKey,
    stream: &Arc<CudaStream>,
) -> candle_core::Result<Tensor> {
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let (qp, _q_read) = operand_ptr(&q_storage, q_layout, stream)?;
    let (kp, _k_read) = operand_ptr(&k_storage, k_layout, stream)?;
    let (vp, _v_read) = operand_ptr(&v_storage, v_layout, stream)?;
    let device = q.device().as_cuda_device()?;
    let operands = [(UID_Q, qp), (UID_K, kp), (UID_V, vp)];
    launch::<T>(device, plan, key, stream, &operands)
    // The read records drop here, after the launch, then the storage guards.
}

/// Allocates the output and executes `plan` on `operands` (unique id and device address of
/// every tensor the plan binds but the output and the scale); returns the output as a
/// [B, H, Lq, D] view of its token-major buffer.
fn launch<T: CudaDType + DeviceRepr>(
    device: &candle_core::CudaDevice,
    plan: &Plan,
    key: &PlanKey,
    stream: &Arc<CudaStream>,
    operands: &[(i64, u64)],
) -> candle_core::Result<Tensor> {
    let [b, h, lq, _, d] = key.sizes;
    let alloc_err = |e| error(format!("allocating device memory: {e:?}"));
    // SAFETY: the plan writes every element of the output (O covers it exactly).
    let mut out = unsafe { stream.alloc::<T>(b * lq * h * d) }.map_err(alloc_err)?;
    {
        let (op, _o_write) = out.device_ptr_mut(stream);
        let mut bound = operands.to_vec();
        bound.push((UID_O, op));
        execute_on(plan, key, stream, &bound)?;
        // The write record drops here, after the launch.
    }
    let out = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(out, device.clone())),
        vec![b, lq, h, d],
        BackpropOp::none(),
        false,
    );
    out.transpose(1, 2)
}

/// Allocates the workspace and executes `plan` on `bound` (unique id and device address of
/// every tensor the plan binds but the scale, the output included).
fn execute_on(
    plan: &Plan,
    key: &PlanKey,
    stream: &Arc<CudaStream>,
    bound: &[(i64, u64)],
) -> candle_core::Result<()> {
    let d = key.sizes[4];
    let alloc_err = |e| error(format!("allocating device memory: {e:?}"));
    // SAFETY: cuDNN's workspace is scratch it writes before reading.
    let mut workspace = match plan.workspace_bytes {
        0 => None,
        n => Some(unsafe { stream.alloc::<u8>(n) }.map_err(alloc_err)?),
    };
    {
        let scratch = workspace.as_mut().map(|w| w.device_ptr_mut(stream));
        let wp = scratch.as_ref().map_or(0, |(p, _)| *p);
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| error(format!("binding the CUDA context: {e:?}")))?;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let _span = tracing::trace_span!("cudnn_sdpa_execute").entered();
        // SAFETY: the bound tensors are live buffers of the layouts the plan was built for
        // (its key; the caller holds them past this call, the output fresh and its own), and
        // `wp` (if any) a fresh buffer of the plan's workspace size; the launch is ordered on
        // `stream` before anything frees them.
        unsafe { execute(plan, bound, scale, wp) }.map_err(error)?;
    }
    // Frees the workspace after the launch in stream order.
    drop(workspace);
    Ok(())
}

/// Binds the tensors to their unique ids in a variant pack (the pass-by-value `scale` too)
/// and launches `plan` on its handle's stream.
///
/// # Safety
/// Every address in `bound` must point to a live device buffer covering the layout the plan
/// gave its id (the output writable and used by nothing else meanwhile), and `workspace` to a
/// live buffer of at least the plan's workspace size (or be 0 when it needs none).
unsafe fn execute(plan: &Plan, bound: &[(i64, u64)], scale: f32, workspace: u64) -> Fallible<()> {
    // cuDNN reads the pass-by-value scale from host memory during the execute call; aligned
    // as the tensor descriptor promises.
    #[repr(align(16))]
    struct Aligned(f32);
    let mut scale = Aligned(scale);
    let mut pointers: Vec<*mut c_void> = bound
        .iter()
        .map(|&(_, address)| address as usize as *mut c_void)
        .collect();
    pointers.push((&mut scale.0 as *mut f32).cast::<c_void>());
    let mut uids: Vec<i64> = bound.iter().map(|&(uid, _)| uid).collect();
    uids.push(UID_SCALE);
    let pack = Descriptor::new(
        Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR,
        "the variant pack",
    )?;
    // SAFETY: CUDNN_TYPE_VOID_PTR is void*; the pointers stay valid until `cudnnBackendExecute`
    // returns (the caller's promise, and `scale` lives on this frame).
    unsafe {
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
            AttrType::CUDNN_TYPE_VOID_PTR,
            &pointers,
            "variant pack: data pointers",
        )?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
            AttrType::CUDNN_TYPE_VOID_PTR,
            &[workspace as usize as *mut c_void],
            "variant pack: workspace",
        )?;
    }
    pack.set_i64s(
        Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
        &uids,
        "variant pack: unique ids",
    )?;
    pack.finalize("finalizing the variant pack")?;
    // SAFETY: the handle, plan and pack are live and finalized; the buffers are the caller's
    // promise.
    let status = unsafe { sys::cudnnBackendExecute(plan.handle.raw, plan.plan.raw, pack.raw) };
    check(status, "executing the plan")
}
