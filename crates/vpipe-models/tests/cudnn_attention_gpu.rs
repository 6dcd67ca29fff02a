//! cuDNN's fused attention (`ops::cudnn_sdpa`) against the chunked path on the same inputs, on
//! a CUDA device: built only with the `cuda` feature.
//!
//! The reference is the chunked path in f32 on the bf16/f16-rounded inputs, so the figures are
//! cuDNN's own rounding next to the chunked path's in the same dtype, bounded as the fused
//! kernel's test bounds its own. A shape cuDNN finds no plan for fails with cuDNN's message:
//! these tests exist to show that the plans build and run.
//!
//! `times_against_fused_kernel` prints seconds per call and TFLOP/s of cuDNN and vpipe's fused
//! kernel on the 14B model's self-attention; run the binary with `--test-threads=1` so that no
//! other test shares the GPU meanwhile.
#![cfg(feature = "cuda")]

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, D};
use vpipe_models::ops::attention::{
    attention, attention_over_query, chunked_attention, cudnn_refusal, Attend, AttentionKernel,
    QueryChunk,
};
use vpipe_models::ops::cudnn_sdpa::{cudnn_version, describe_plan, sdpa, sdpa_supports};
use vpipe_models::ops::fused::{flash_attention, flash_attention_supports};
use vpipe_models::ops::max_abs_diff;

const HEAD_DIM: usize = 128;

/// One device for every operand: candle gives each `new_cuda` call a device of its own, and
/// cuDNN's attention takes operands of one device only.
fn device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| Device::new_cuda(0).expect("a CUDA device"))
        .clone()
}

/// Random operands [B, H, L, D]: contiguous, or token-major ([B, L, H, D] viewed as
/// [B, H, L, D]) as the DiT passes them.
fn operand(b: usize, h: usize, l: usize, dtype: DType, strided: bool) -> Result<Tensor> {
    let dev = device();
    if strided {
        Tensor::randn(0f32, 1.5, (b, l, h, HEAD_DIM), &dev)?
            .to_dtype(dtype)?
            .transpose(1, 2)
    } else {
        Tensor::randn(0f32, 1.5, (b, h, l, HEAD_DIM), &dev)?.to_dtype(dtype)
    }
}

/// Largest absolute difference, computed on the device (the tensors may be large).
fn device_max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()
}

/// The accuracy bound of a 16-bit kernel, from the chunked path's error in the same dtype.
fn bound(chunked_err: f64) -> f64 {
    2.0 * chunked_err.max(4e-3)
}

fn check((b, h, lq, lk): (usize, usize, usize, usize), dtype: DType, strided: bool) -> Result<()> {
    let (q, k, v) = (
        operand(b, h, lq, dtype, strided)?,
        operand(b, h, lk, dtype, strided)?,
        operand(b, h, lk, dtype, strided)?,
    );
    assert!(
        sdpa_supports(&q, &k, &v),
        "cuDNN SDPA refused {:?} {dtype:?} strided={strided}",
        q.dims()
    );
    let plan = describe_plan(&q, &k, &v)?;
    let out = sdpa(&q, &k, &v)?;
    assert_eq!(out.dims(), &[b, h, lq, HEAD_DIM]);
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    let reference = chunked_attention(&f32_of(&q)?, &f32_of(&k)?, &f32_of(&v)?, QueryChunk(512))?;
    let same_dtype = chunked_attention(&q, &k, &v, QueryChunk(512))?;
    let err = max_abs_diff(&f32_of(&out)?, &reference)?;
    let chunked_err = max_abs_diff(&f32_of(&same_dtype)?, &reference)?;
    println!(
        "cuDNN SDPA {dtype:?} B{b} H{h} Lq{lq} Lk{lk} strided={strided}: max abs vs f32 \
         {err:.2e} (chunked {dtype:?}: {chunked_err:.2e}); {plan}"
    );
    assert!(
        err <= bound(chunked_err),
        "cuDNN SDPA {err} against chunked {chunked_err}"
    );
    Ok(())
}

fn check_all(shapes: &[(usize, usize, usize, usize)]) -> Result<()> {
    println!("cuDNN version {}", cudnn_version());
    for &shape in shapes {
        for dtype in [DType::BF16, DType::F16] {
            for strided in [false, true] {
                check(shape, dtype, strided)?;
            }
        }
    }
    Ok(())
}

#[test]
fn self_attention_matches_chunked() -> Result<()> {
    check_all(&[(1, 2, 100, 100), (2, 3, 257, 257)])
}

#[test]
fn ragged_lengths_match_chunked() -> Result<()> {
    check_all(&[(1, 2, 100, 77)])
}

#[test]
fn wan_cross_attention_matches_chunked() -> Result<()> {
    // 512 text tokens, and 257 image tokens + 512 text tokens (image-to-video).
    check_all(&[(2, 40, 1560, 512), (2, 40, 1560, 257 + 512)])
}

#[test]
fn large_self_attention_matches_chunked() -> Result<()> {
    check_all(&[(1, 40, 4096, 4096)])
}

#[test]
fn over_the_queries_in_slices_equals_one_call() -> Result<()> {
    // The DiT's self-attention in token slices: head-major queries written over one slice at a
    // time by cuDNN's output of that slice.
    let dev = device();
    let (b, h, l) = (2, 8, 1000);
    let q = Tensor::randn(0f32, 1.5, (b, h, l, HEAD_DIM), &dev)?.to_dtype(DType::BF16)?;
    let (k, v) = (
        operand(b, h, l, DType::BF16, true)?,
        operand(b, h, l, DType::BF16, true)?,
    );
    let cudnn = Attend {
        kernel: AttentionKernel::Cudnn,
        chunk: QueryChunk(1),
    };
    let whole = attention(&q, &k, &v, cudnn)?;
    for slices in [2, 3, 8] {
        let over = attention_over_query(q.copy()?, &k, &v, cudnn, slices)?;
        let err = device_max_abs_diff(&over, &whole)?;
        println!("cuDNN over the queries in {slices} slices: max abs vs one call {err:.2e}");
        // Each query row is computed alone, but another query length may get another engine
        // configuration: within two bf16 steps at the output's scale.
        assert!(err <= 2e-2, "{slices} slices: {err}");
    }
    assert_eq!(cudnn_refusal(), None);
    Ok(())
}

#[test]
fn refuses_what_it_cannot_take() -> Result<()> {
    let dev = device();
    let f32_q = Tensor::randn(0f32, 1., (1, 2, 64, HEAD_DIM), &dev)?;
    assert!(!sdpa_supports(&f32_q, &f32_q, &f32_q));
    assert!(sdpa(&f32_q, &f32_q, &f32_q).is_err());
    let q = f32_q.to_dtype(DType::BF16)?;
    // A head dimension that is not a multiple of 8, and one starting off 16-byte alignment.
    let odd = q.narrow(3, 0, 100)?;
    assert!(!sdpa_supports(&odd, &odd, &odd));
    let shifted = q.narrow(3, 1, 64)?;
    assert!(!sdpa_supports(&shifted, &shifted, &shifted));
    assert!(sdpa(&shifted, &shifted, &shifted).is_err());
    // Mixed dtypes.
    let f16_k = q.to_dtype(DType::F16)?;
    assert!(!sdpa_supports(&q, &f16_k, &f16_k));
    Ok(())
}

/// Seconds per call of `run` over `calls` calls after `warmups`, the device synchronised around.
fn seconds_per_call(
    dev: &Device,
    warmups: usize,
    calls: usize,
    run: impl Fn() -> Result<Tensor>,
) -> Result<f64> {
    for _ in 0..warmups {
        run()?;
    }
    dev.synchronize()?;
    let start = Instant::now();
    for _ in 0..calls {
        run()?;
    }
    dev.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / calls as f64)
}

#[test]
fn times_against_fused_kernel() -> Result<()> {
    // The 14B model's self-attention at 81 frames of 720p: B 2 (conditional and unconditional
    // passes), 40 heads, 32 760 tokens, token-major bf16.
    let (b, h, l) = (2, 40, 32_760);
    let dev = device();
    let (q, k, v) = (
        operand(b, h, l, DType::BF16, true)?,
        operand(b, h, l, DType::BF16, true)?,
        operand(b, h, l, DType::BF16, true)?,
    );
    assert!(sdpa_supports(&q, &k, &v) && flash_attention_supports(&q, &k, &v));
    println!(
        "cuDNN version {}; {}",
        cudnn_version(),
        describe_plan(&q, &k, &v)?
    );
    let flops = 4.0 * (b * h * l * l * HEAD_DIM) as f64;
    let cudnn_s = seconds_per_call(&dev, 2, 5, || sdpa(&q, &k, &v))?;
    let fused_s = seconds_per_call(&dev, 2, 5, || flash_attention(&q, &k, &v))?;
    for (name, s) in [("cuDNN SDPA", cudnn_s), ("fused kernel", fused_s)] {
        println!(
            "{name}: B{b} H{h} L{l} D{HEAD_DIM} bf16: {s:.4} s per call, {:.1} TFLOP/s",
            flops / s / 1e12
        );
    }
    println!("cuDNN SDPA / fused kernel time: {:.3}", cudnn_s / fused_s);

    // Accuracy on this shape: both kernels against the f32 chunked path on the first query
    // rows (all of the keys), bounded by the bf16 chunked path's error there; then the two
    // whole outputs against each other, within the sum of the two bounds.
    let cudnn_out = sdpa(&q, &k, &v)?;
    let fused_out = flash_attention(&q, &k, &v)?;
    let rows = 256;
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    let (k32, v32) = (f32_of(&k)?, f32_of(&v)?);
    let q_rows = q.narrow(2, 0, rows)?;
    let reference = chunked_attention(&f32_of(&q_rows)?, &k32, &v32, QueryChunk(64))?;
    let chunked = chunked_attention(&q_rows, &k, &v, QueryChunk(64))?;
    let chunked_err = device_max_abs_diff(&chunked, &reference)? as f64;
    let cudnn_err = device_max_abs_diff(&cudnn_out.narrow(2, 0, rows)?, &reference)? as f64;
    let fused_err = device_max_abs_diff(&fused_out.narrow(2, 0, rows)?, &reference)? as f64;
    let between = device_max_abs_diff(&cudnn_out, &fused_out)? as f64;
    println!(
        "first {rows} query rows, max abs vs f32: cuDNN {cudnn_err:.2e}, fused {fused_err:.2e} \
         (chunked bf16: {chunked_err:.2e}); cuDNN vs fused over all rows: {between:.2e}"
    );
    let limit = bound(chunked_err);
    assert!(cudnn_err <= limit, "cuDNN {cudnn_err} > {limit}");
    assert!(fused_err <= limit, "fused {fused_err} > {limit}");
    assert!(
        between <= 2.0 * limit,
        "cuDNN vs fused {between} > {}",
        2.0 * limit
    );
    Ok(())
}
