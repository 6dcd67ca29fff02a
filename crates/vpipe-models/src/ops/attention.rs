//! Attention with bounded memory, through one of three kernels that a plan picks
//! ([`AttentionKernel::choose`]):
//! - cuDNN's fused attention on CUDA in bf16/f16 (head dims up to 128, `ops::cudnn_sdpa`);
//! - vpipe's own fused kernel on CUDA in bf16/f16 at head dim 128 (`ops::fused`), which keeps no
//!   scores and can write its output over the queries;
//! - the chunked path anywhere else: the softmax scores of at most `query_chunk` query rows exist
//!   at any time, so 32 760 tokens × 40 heads never materialise the 86 GB score matrix.
//!
//! Every attention in the models calls [`attention`], [`attention_over_query`] or
//! [`attention_projection_input`] with the plan's [`Attend`].

use candle_core::{DType, Result, Tensor};

use crate::ops::linear::{LinearInput, MatmulPrecision};

#[cfg(feature = "bench-hooks")]
pub use hooks::{skip_for_benchmark, time_calls, timed_seconds};

/// Switches for benchmarks that split a model's time into attention and the rest; built only
/// with the `bench-hooks` feature, so that no other build has process-wide switches.
#[cfg(feature = "bench-hooks")]
mod hooks {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use candle_core::{Result, Tensor};

    static TIMING: AtomicBool = AtomicBool::new(false);
    static SKIPPED: AtomicBool = AtomicBool::new(false);
    static TIMED_NANOS: AtomicU64 = AtomicU64::new(0);

    /// Starts (or stops) timing every [`super::attention`] call with a device
    /// synchronisation before and after it, and resets the total. The synchronisations cost a
    /// little time themselves.
    pub fn time_calls(on: bool) {
        TIMED_NANOS.store(0, Ordering::Relaxed);
        TIMING.store(on, Ordering::Relaxed);
    }

    /// Makes [`super::attention`] return its query unchanged, so that a model's forward times
    /// everything except attention (the same switch exists in the diffusers benchmark). The
    /// model's output is meaningless while this is on.
    pub fn skip_for_benchmark(on: bool) {
        SKIPPED.store(on, Ordering::Relaxed);
    }

    /// Seconds spent in [`super::attention`] since [`time_calls`]`(true)`.
    pub fn timed_seconds() -> f64 {
        TIMED_NANOS.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// `run` (the attention) as the switches say; skipped, `skipped` of the query instead.
    pub(super) fn around<T>(
        q: &Tensor,
        skipped: impl FnOnce(Tensor) -> Result<T>,
        run: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if SKIPPED.load(Ordering::Relaxed) {
            return skipped(q.clone());
        }
        if !TIMING.load(Ordering::Relaxed) {
            return run();
        }
        q.device().synchronize()?;
        let start = std::time::Instant::now();
        let out = run()?;
        q.device().synchronize()?;
        TIMED_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(out)
    }
}

/// How many query rows one attention pass handles at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryChunk(pub usize);

impl QueryChunk {
    /// The largest chunk whose scratch fits `budget_bytes`: per query row, the scores and the
    /// softmax probabilities ([B, H, 1, Lk] each, in `dtype`) plus its output row [B, H, 1, D].
    /// At least one row, even when the budget is smaller (the caller checks the budget first).
    pub fn for_budget(
        budget_bytes: u64,
        batch: usize,
        heads: usize,
        key_len: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Self {
        let row = Self::bytes_per_row(batch, heads, key_len, head_dim, dtype);
        Self((budget_bytes / row.max(1)).max(1) as usize)
    }

    /// Scratch bytes one query row needs (see [`Self::for_budget`]); saturates at `u64::MAX`
    /// for sizes whose product does not fit, which no budget covers.
    pub fn bytes_per_row(
        batch: usize,
        heads: usize,
        key_len: usize,
        head_dim: usize,
        dtype: DType,
    ) -> u64 {
        let elem = dtype.size_in_bytes() as u64;
        (batch as u64)
            .saturating_mul(heads as u64)
            .saturating_mul(
                (key_len as u64)
                    .saturating_mul(2)
                    .saturating_add(head_dim as u64),
            )
            .saturating_mul(elem)
    }
}

/// The attention kernels, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// cuDNN's fused flash attention (`ops::cudnn_sdpa`): CUDA, bf16/f16, head dims a multiple
    /// of 8 up to 128; its output is a buffer of its own next to q, k and v.
    Cudnn,
    /// vpipe's fused kernel (kernels/attention.cu): CUDA, bf16/f16, head dim 128; it can write
    /// over its queries.
    Fused,
    /// `QueryChunk` query rows at a time through matmul and softmax: any device and dtype.
    Chunked,
    /// cuDNN's fused attention in float8 (`ops::cudnn_sdpa::sdpa_fp8`): q, k and v quantised
    /// to e4m3 with one scale each, both products in float8 with f32 accumulation, the output
    /// in q's dtype. Opt-in (`--attention fp8`), never picked by itself: faster and less exact.
    /// CUDA, Hopper or newer, bf16/f16, heads of 128; the cross-attention (512 keys) stays
    /// cuDNN's exact one. Its keys and values are quantised less their mean over the
    /// keys, which keeps its error at bf16's up to the 14B's 32 760 keys, as measured
    /// (`ops::cudnn_sdpa`'s documentation).
    CudnnFp8,
}

/// The head dimension cuDNN's float8 attention is taken for (every Wan DiT's): at 64 its
/// error against the exact attention was three times that at 128 before the keys and values
/// were centred, and has not been measured since (`ops::cudnn_sdpa`).
pub(crate) const FP8_HEAD_DIM: usize = 128;

impl AttentionKernel {
    /// Every exact kernel, fastest first (what `--attention auto` picks from).
    pub const ALL: [Self; 3] = [Self::Cudnn, Self::Fused, Self::Chunked];

    /// The name `--attention` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cudnn => "cudnn",
            Self::Fused => "fused",
            Self::Chunked => "chunked",
            Self::CudnnFp8 => "fp8",
        }
    }

    /// The kernel `--attention` names.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([Self::CudnnFp8])
            .find(|k| k.name() == name)
    }

    /// The kernel in words, for plans and reports.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Cudnn => "cuDNN fused attention",
            Self::Fused => "vpipe's fused attention kernel",
            Self::Chunked => "chunked attention (matmul and softmax over query chunks)",
            Self::CudnnFp8 => {
                "cuDNN fused attention in float8 (self-attention; one scale per q, k and v, \
                 keys and values less their mean over the keys; 0.11 % relative L2 against \
                 the exact attention at 32 760 keys, measured on an H100)"
            }
        }
    }

    /// The kernel of a cross-attention when this one runs the self-attention: float8 only
    /// where the time is (the self-attention's 32 760 keys, not the text's 512).
    pub fn for_cross_attention(self) -> Self {
        match self {
            Self::CudnnFp8 => Self::Cudnn,
            other => other,
        }
    }

    /// Whether this build can run this kernel for heads of `head_dim` in `dtype`, on a CUDA
    /// device (`on_cuda`) or not; `Err` says why not.
    pub fn applies(
        self,
        on_cuda: bool,
        dtype: DType,
        head_dim: usize,
    ) -> std::result::Result<(), String> {
        let half = matches!(dtype, DType::BF16 | DType::F16);
        match self {
            Self::Chunked => Ok(()),
            _ if !cfg!(feature = "cuda") => Err("this build has no CUDA (feature `cuda`)".into()),
            _ if !on_cuda => Err("it runs on a CUDA device only".into()),
            _ if !half => Err(format!("it computes in bf16 or f16, not {dtype:?}")),
            Self::Fused if !fused_kernel_applies(on_cuda, dtype, head_dim) => Err(format!(
                "it takes heads of {FUSED_HEAD_DIM}, not {head_dim}"
            )),
            Self::Cudnn if !head_dim.is_multiple_of(8) || head_dim > 128 => Err(format!(
                "it takes heads of a multiple of 8 up to 128, not {head_dim}"
            )),
            Self::CudnnFp8 if head_dim != FP8_HEAD_DIM => Err(format!(
                "it takes heads of {FP8_HEAD_DIM} (the only size measured accurate enough), not \
                 {head_dim}"
            )),
            Self::Cudnn | Self::Fused | Self::CudnnFp8 => Ok(()),
        }
    }

    /// The fastest kernel that [applies](Self::applies) to heads of `head_dim` in `dtype`.
    pub fn fastest(on_cuda: bool, dtype: DType, head_dim: usize) -> Self {
        Self::ALL
            .into_iter()
            .find(|k| k.applies(on_cuda, dtype, head_dim).is_ok())
            .unwrap_or(Self::Chunked)
    }
}

/// How one attention call runs, as its plan decided: the kernel, and the query rows one
/// pass of the chunked path takes (where it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attend {
    /// The kernel asked for (another runs where it does not take the operands).
    pub kernel: AttentionKernel,
    /// Query rows per pass of the chunked path.
    pub chunk: QueryChunk,
}

impl Attend {
    /// The chunked path, `rows` query rows at a time.
    pub fn chunked(rows: usize) -> Self {
        Self {
            kernel: AttentionKernel::Chunked,
            chunk: QueryChunk(rows),
        }
    }
}

/// Whether this build has the fused kernel for attention on a CUDA device (`on_cuda`) in
/// `dtype` with heads of `head_dim`; where it does, attention takes no score scratch (strides
/// of the operands aside, which the models keep aligned: see [`is_fused`]).
pub fn fused_kernel_applies(on_cuda: bool, dtype: DType, head_dim: usize) -> bool {
    cfg!(feature = "cuda")
        && on_cuda
        && matches!(dtype, DType::BF16 | DType::F16)
        && head_dim == FUSED_HEAD_DIM
}

/// The head dimension of the fused kernel (kernels/attention.cu).
pub const FUSED_HEAD_DIM: usize = 128;

/// Whether [`attention`] runs the fused kernel for these operands (it then needs no scratch,
/// whatever the chunk).
pub fn is_fused(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        crate::ops::fused::flash_attention_supports(q, k, v)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v);
        false
    }
}

/// `softmax(q·kᵀ / √D) · v` through the kernel `how` names, where it takes these operands:
/// cuDNN falls back to the fused kernel (and records why: [`cudnn_refusal`]) when cuDNN gives
/// no plan for them, the fused kernel to the chunked path for operands it does not take
/// ([`is_fused`]).
///
/// # Shapes
/// - `q`: [B, H, Lq, D], `k` and `v`: [B, H, Lk, D], of one dtype (any strides).
/// - output: [B, H, Lq, D], possibly a transposed view of a token-major buffer.
///
/// # Errors
/// Operands of another rank, with different B, H or D, keys and values of different lengths,
/// or an empty dimension (a softmax over no keys has no value).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, how: Attend) -> Result<Tensor> {
    #[cfg(feature = "bench-hooks")]
    return hooks::around(q, Ok, || dispatch(q, k, v, how));
    #[cfg(not(feature = "bench-hooks"))]
    dispatch(q, k, v, how)
}

/// [`attention`] with its output made the input of the output projection for products of
/// `precision` (token rows [B, Lq, H·D]). cuDNN's float8 attention feeding float8 products
/// turns its float8 output into the product's float8 rows in one pass, so that the 16-bit
/// output is never written ([`crate::ops::cudnn_sdpa::sdpa_fp8_rows`]); where cuDNN refuses
/// it, its exact attention runs (the refusal recorded).
///
/// # Shapes
/// As [`attention`]; the input's shape is [B, Lq, H·D].
///
/// # Errors
/// As [`attention`].
pub fn attention_projection_input(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    how: Attend,
    precision: MatmulPrecision,
) -> Result<LinearInput> {
    let tokens = |out: Tensor| -> Result<LinearInput> {
        let (b, h, l, d) = out.dims4()?;
        LinearInput::new(&out.transpose(1, 2)?.reshape((b, l, h * d))?, precision)
    };
    #[cfg(feature = "cuda")]
    if how.kernel == AttentionKernel::CudnnFp8
        && precision == MatmulPrecision::Fp8
        && q.device().is_cuda()
    {
        use crate::ops::cudnn_sdpa::{sdpa_fp8_rows, Fp8AttentionOutput};
        let run = || -> Result<LinearInput> {
            let (b, h, l, d) = q.dims4()?;
            check_operands(q, k, v)?;
            match sdpa_fp8_rows(q, k, v) {
                Ok(Fp8AttentionOutput::Rows(rows)) => {
                    Ok(LinearInput::quantized(rows, &[b, l, h * d]))
                }
                Ok(Fp8AttentionOutput::Heads(out)) => tokens(out),
                Err(e) => {
                    record_fp8_refusal(e.to_string());
                    let exact = Attend {
                        kernel: how.kernel.for_cross_attention(),
                        ..how
                    };
                    tokens(dispatch(q, k, v, exact)?)
                }
            }
        };
        #[cfg(feature = "bench-hooks")]
        return hooks::around(q, tokens, run);
        #[cfg(not(feature = "bench-hooks"))]
        return run();
    }
    tokens(attention(q, k, v, how)?)
}

fn dispatch(q: &Tensor, k: &Tensor, v: &Tensor, how: Attend) -> Result<Tensor> {
    check_operands(q, k, v)?;
    #[cfg(feature = "cuda")]
    {
        if how.kernel == AttentionKernel::CudnnFp8 {
            match crate::ops::cudnn_sdpa::sdpa_fp8(q, k, v) {
                Ok(out) => return Ok(out),
                Err(e) => record_fp8_refusal(e.to_string()),
            }
        }
        if matches!(
            how.kernel,
            AttentionKernel::Cudnn | AttentionKernel::CudnnFp8
        ) {
            if let Some(out) = cudnn(q, k, v) {
                return Ok(out);
            }
        }
        if how.kernel != AttentionKernel::Chunked && is_fused(q, k, v) {
            return crate::ops::fused::flash_attention(q, k, v);
        }
    }
    chunked_attention(q, k, v, how.chunk)
}

/// cuDNN's attention where it takes these operands and gives a plan for them; `None` (the
/// refusal recorded) where it does not.
#[cfg(feature = "cuda")]
fn cudnn(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<Tensor> {
    use crate::ops::cudnn_sdpa;
    if !cudnn_sdpa::sdpa_supports(q, k, v) {
        record_cudnn_refusal(format!(
            "operands it does not take (q {:?} {:?} strides {:?})",
            q.dims(),
            q.dtype(),
            q.layout().stride()
        ));
        return None;
    }
    match cudnn_sdpa::sdpa(q, k, v) {
        Ok(out) => Some(out),
        Err(e) => {
            record_cudnn_refusal(e.to_string());
            None
        }
    }
}

/// The first reason cuDNN's attention was refused in this process.
static CUDNN_REFUSAL: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The first reason cuDNN's float8 attention was refused in this process.
static FP8_REFUSAL: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Keeps `why` in `slot` unless a reason is there already, and logs it the first time.
#[cfg(feature = "cuda")]
fn record_first(slot: &std::sync::Mutex<Option<String>>, why: String, what: &str) {
    let mut first = slot.lock().unwrap_or_else(|e| e.into_inner());
    if first.is_none() {
        tracing::warn!("{what}: {why}");
        *first = Some(why);
    }
}

#[cfg(feature = "cuda")]
fn record_fp8_refusal(why: String) {
    let what = "cuDNN's float8 attention refused, its exact attention runs instead";
    record_first(&FP8_REFUSAL, why, what);
}

/// Why cuDNN's float8 attention did not run for some call of this process where a plan asked
/// for it (the first reason): the exact cuDNN attention ran instead.
pub fn fp8_attention_refusal() -> Option<String> {
    FP8_REFUSAL
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

#[cfg(feature = "cuda")]
fn record_cudnn_refusal(why: String) {
    let what = "cuDNN attention refused, the fused kernel runs instead";
    record_first(&CUDNN_REFUSAL, why, what);
}

/// Why cuDNN's attention did not run for some call of this process where a plan asked for
/// it (the first reason), so that a report can say that another kernel ran instead.
pub fn cudnn_refusal() -> Option<String> {
    CUDNN_REFUSAL
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// [`attention`] whose output takes the queries' memory, so that no whole output buffer exists
/// next to q, k and v at the attention's peak: where vpipe's fused kernel runs, it writes over
/// `q` in one launch; any other kernel attends `slices` query slices in turn, each slice's
/// output copied over its own queries (which no later slice reads), so that one slice's output
/// at a time exists beside them. The output has `q`'s layout; `q` must be contiguous and must
/// not share its memory with `k` or `v`. With one slice, as [`attention`], `q` freed after it.
///
/// # Shapes
/// As [`attention`].
///
/// # Errors
/// As [`attention`], or a non-contiguous `q` with more than one slice.
pub fn attention_over_query(
    q: Tensor,
    k: &Tensor,
    v: &Tensor,
    how: Attend,
    slices: usize,
) -> Result<Tensor> {
    let (_, _, lq, _) = check_operands(&q, k, v)?;
    #[cfg(feature = "cuda")]
    if how.kernel == AttentionKernel::Fused && is_fused(&q, k, v) {
        crate::ops::fused::flash_attention_in_place(&q, k, v)?;
        return Ok(q);
    }
    if slices <= 1 {
        return attention(&q, k, v, how);
    }
    let size = lq.div_ceil(slices);
    // cuDNN's float8 attention: the keys and values quantised once for every slice.
    #[cfg(feature = "cuda")]
    let keys_values_fp8 = if how.kernel == AttentionKernel::CudnnFp8 && k.device().is_cuda() {
        crate::ops::cudnn_sdpa::Fp8KeysValues::quantize(k, v)
            .map_err(|e| record_fp8_refusal(e.to_string()))
            .ok()
    } else {
        None
    };
    for start in (0..lq).step_by(size) {
        let rows = size.min(lq - start);
        let q_slice = q.narrow(2, start, rows)?;
        #[cfg(feature = "cuda")]
        let part = match &keys_values_fp8 {
            Some(kv8) => attention_fp8_keys_values(&q_slice, (k, v, kv8), how)?,
            None => attention(&q_slice, k, v, how)?,
        };
        #[cfg(not(feature = "cuda"))]
        let part = attention(&q_slice, k, v, how)?;
        q.slice_set(&part.contiguous()?, 2, start)?;
    }
    Ok(q)
}

/// [`attention`] with cuDNN's float8 attention on keys and values quantised already (`kv8`,
/// from `k` and `v`); where cuDNN refuses, its exact attention (the refusal recorded).
#[cfg(feature = "cuda")]
fn attention_fp8_keys_values(
    q: &Tensor,
    (k, v, kv8): (&Tensor, &Tensor, &crate::ops::cudnn_sdpa::Fp8KeysValues),
    how: Attend,
) -> Result<Tensor> {
    let run = || -> Result<Tensor> {
        check_operands(q, k, v)?;
        match crate::ops::cudnn_sdpa::sdpa_fp8_with(q, k, v, kv8) {
            Ok(out) => Ok(out),
            Err(e) => {
                record_fp8_refusal(e.to_string());
                let exact = Attend {
                    kernel: how.kernel.for_cross_attention(),
                    ..how
                };
                dispatch(q, k, v, exact)
            }
        }
    };
    #[cfg(feature = "bench-hooks")]
    return hooks::around(q, Ok, run);
    #[cfg(not(feature = "bench-hooks"))]
    run()
}

/// The unfused path of [`attention`] on any device: `chunk` query rows at a time (public so
/// that the GPU checks can compare the fused kernel with it).
///
/// # Shapes
/// As [`attention`]; the output is contiguous.
///
/// # Errors
/// As [`attention`].
pub fn chunked_attention(q: &Tensor, k: &Tensor, v: &Tensor, chunk: QueryChunk) -> Result<Tensor> {
    let (b, h, lq, d) = check_operands(q, k, v)?;
    let scale = 1.0 / (d as f64).sqrt();
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let kt = k.t()?;
    let rows = chunk.0.max(1);
    if rows >= lq {
        return attend(&q.contiguous()?, &kt, &v, scale);
    }
    let out = Tensor::zeros((b, h, lq, d), q.dtype(), q.device())?;
    let mut start = 0;
    while start < lq {
        let n = rows.min(lq - start);
        let part = attend(&q.narrow(2, start, n)?.contiguous()?, &kt, &v, scale)?;
        out.slice_set(&part, 2, start)?;
        start += n;
    }
    Ok(out)
}

/// q [B, H, Lq, D] with k and v [B, H, Lk, D] and no empty dimension; returns (B, H, Lq, D).
fn check_operands(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let shapes_agree = match (q.dims(), k.dims(), v.dims()) {
        ([b, h, _, d], [kb, kh, lk, kd], [vb, vh, vl, vd]) => {
            (kb, kh, kd) == (b, h, d) && (vb, vh, vl, vd) == (b, h, lk, d)
        }
        _ => false,
    };
    if !shapes_agree {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} must be [B, H, L, D] with equal B, H and D, \
             and k and v of one length",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.dims().contains(&0) {
            candle_core::bail!(
                "attention: {name} of shape {:?} is empty; every dimension must be at least 1",
                t.dims()
            );
        }
    }
    q.dims4()
}

/// One pass; the scale goes on the query rows ([c, D]) rather than the scores ([c, Lk]), a
/// pass over far fewer elements.
fn attend(q: &Tensor, kt: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q * scale)?.matmul(kt)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    if v.dtype() == DType::F32 && v.device().is_cpu() {
        // The probabilities times the values accumulate in f64 in the f32 CPU path: Wan's text
        // context is zero-padded to 512 rows, hundreds of identical keys whose f32 rounding
        // errors add up in one direction (1.1e-5 from f64 per forward, against 4e-6 for
        // PyTorch's SDPA; measured on the pipeline's golden test).
        return probs
            .to_dtype(DType::F64)?
            .matmul(&v.to_dtype(DType::F64)?)?
            .to_dtype(DType::F32);
    }
    probs.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Result<Tensor> {
        // A small LCG keeps the test independent of candle's RNG.
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut state = seed;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    #[test]
    fn chunked_equals_unchunked() -> Result<()> {
        let q = random((2, 3, 37, 16), 1)?;
        let k = random((2, 3, 29, 16), 2)?;
        let v = random((2, 3, 29, 16), 3)?;
        let full = attention(&q, &k, &v, Attend::chunked(usize::MAX))?;
        // Reference written out without the chunking code path.
        let reference =
            candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * 0.25)?)?.matmul(&v)?;
        assert!(crate::ops::max_abs_diff(&full, &reference)? <= 1e-6);
        for rows in [1, 5, 36, 37] {
            let chunked = attention(&q, &k, &v, Attend::chunked(rows))?;
            let err = crate::ops::max_abs_diff(&chunked, &full)?;
            assert!(err <= 1e-5, "chunk {rows}: {err}");
        }
        Ok(())
    }

    #[test]
    fn attention_over_query_in_slices_equals_attention() -> Result<()> {
        let q = random((2, 3, 37, 16), 4)?;
        let k = random((2, 3, 29, 16), 5)?;
        let v = random((2, 3, 29, 16), 6)?;
        let whole = attention(&q, &k, &v, Attend::chunked(8))?;
        for slices in [1, 2, 5, 37, 64] {
            let over = attention_over_query(q.copy()?, &k, &v, Attend::chunked(8), slices)?;
            assert_eq!(
                crate::ops::max_abs_diff(&over, &whole)?,
                0.0,
                "{slices} slices"
            );
        }
        Ok(())
    }

    #[test]
    fn chunk_follows_budget() {
        // 14B self-attention: B 1, 40 heads, 32 760 keys, bf16: 5.2 MB per query row.
        let row = QueryChunk::bytes_per_row(1, 40, 32_760, 128, DType::BF16);
        assert_eq!(row, 40 * (2 * 32_760 + 128) * 2);
        assert_eq!(
            QueryChunk::for_budget(row * 100 + 1, 1, 40, 32_760, 128, DType::BF16).0,
            100
        );
        assert_eq!(
            QueryChunk::for_budget(10, 1, 40, 32_760, 128, DType::BF16).0,
            1
        );
    }

    #[test]
    fn mismatched_shapes_are_an_error() -> Result<()> {
        let q = random((1, 2, 4, 8), 1)?;
        let k = random((1, 2, 5, 4), 2)?;
        assert!(attention(&q, &k, &k, Attend::chunked(2)).is_err());
        let v = random((1, 2, 6, 8), 3)?;
        let k = random((1, 2, 5, 8), 2)?;
        assert!(attention(&q, &k, &v, Attend::chunked(2)).is_err());
        Ok(())
    }

    #[test]
    fn empty_operands_are_an_error_not_a_panic() -> Result<()> {
        let q = random((1, 2, 4, 8), 1)?;
        let no_keys = Tensor::zeros((1, 2, 0, 8), DType::F32, &Device::Cpu)?;
        for rows in [0, 1, usize::MAX] {
            let err = attention(&q, &no_keys, &no_keys, Attend::chunked(rows)).unwrap_err();
            assert!(err.to_string().contains("k of shape [1, 2, 0, 8]"), "{err}");
        }
        let no_queries = Tensor::zeros((1, 2, 0, 8), DType::F32, &Device::Cpu)?;
        assert!(chunked_attention(&no_queries, &q, &q, QueryChunk(3)).is_err());
        Ok(())
    }

    #[test]
    fn bytes_per_row_saturates() {
        let row = QueryChunk::bytes_per_row(usize::MAX, usize::MAX, usize::MAX, 1, DType::F32);
        assert_eq!(row, u64::MAX);
        assert_eq!(
            QueryChunk::for_budget(1 << 30, usize::MAX, 40, usize::MAX, 128, DType::BF16).0,
            1
        );
    }
}
