//! The fused attention kernel (kernels/attention.cu) against the chunked path on the same
//! inputs, on a CUDA device: built only with the `cuda` feature, run by `bench/gpu-dit.sh`.
//!
//! The reference is the chunked path in f32 on the bf16/f16-rounded inputs, so the figures are
//! the kernel's own rounding (probabilities rounded to 16 bits before p·v, output rounded once)
//! next to the chunked path's in the same dtype.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor};
use vpipe_models::ops::attention::{
    attention, attention_over_query, chunked_attention, is_fused, Attend, AttentionKernel,
    QueryChunk,
};

/// vpipe's fused kernel, the chunk unused.
const FUSED: Attend = Attend {
    kernel: AttentionKernel::Fused,
    chunk: QueryChunk(1),
};
use vpipe_models::ops::max_abs_diff;

fn device() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

/// Token-major operands ([B, L, H, D] viewed as [B, H, L, D]), as the DiT passes them.
fn token_major(b: usize, l: usize, h: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.5, (b, l, h, 128), dev)?
        .to_dtype(dtype)?
        .transpose(1, 2)
}

fn check((b, h, lq, lk): (usize, usize, usize, usize), dtype: DType, strided: bool) -> Result<()> {
    let dev = device();
    let make = |l: usize| -> Result<Tensor> {
        if strided {
            token_major(b, l, h, dtype, &dev)
        } else {
            Tensor::randn(0f32, 1.5, (b, h, l, 128), &dev)?.to_dtype(dtype)
        }
    };
    let (q, k, v) = (make(lq)?, make(lk)?, make(lk)?);
    assert!(is_fused(&q, &k, &v), "fused kernel refused {:?}", q.dims());
    let fused = attention(&q, &k, &v, FUSED)?;
    assert_eq!(fused.dims(), &[b, h, lq, 128]);
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    let reference = chunked_attention(&f32_of(&q)?, &f32_of(&k)?, &f32_of(&v)?, QueryChunk(512))?;
    let same_dtype = chunked_attention(&q, &k, &v, QueryChunk(512))?;
    let fused_err = max_abs_diff(&f32_of(&fused)?, &reference)?;
    let chunked_err = max_abs_diff(&f32_of(&same_dtype)?, &reference)?;
    println!(
        "fused attention {dtype:?} B{b} H{h} Lq{lq} Lk{lk} strided={strided}: max abs vs f32 \
         {fused_err:.2e} (chunked {dtype:?}: {chunked_err:.2e})"
    );
    assert!(
        fused_err <= 2.0 * chunked_err.max(4e-3),
        "fused {fused_err} against chunked {chunked_err}"
    );
    Ok(())
}

#[test]
fn matches_chunked_on_ragged_lengths() -> Result<()> {
    for shape in [
        (1, 2, 100, 77),
        (2, 3, 64, 64),
        (1, 1, 1, 5),
        (1, 2, 130, 1),
        (2, 4, 1000, 4100),
    ] {
        check(shape, DType::BF16, false)?;
        check(shape, DType::F16, false)?;
    }
    Ok(())
}

#[test]
fn reads_token_major_operands_in_place() -> Result<()> {
    check((2, 5, 300, 300), DType::BF16, true)?;
    // Cross-attention shape: 512 text tokens.
    check((2, 5, 300, 512), DType::BF16, true)
}

#[test]
fn large_scores_do_not_overflow() -> Result<()> {
    // Logits near 1e3 would overflow exp without the running max.
    let dev = device();
    let q = (Tensor::ones((1, 1, 70, 128), DType::F32, &dev)? * 3.0)?.to_dtype(DType::BF16)?;
    let k = (Tensor::ones((1, 1, 90, 128), DType::F32, &dev)? * 3.0)?.to_dtype(DType::BF16)?;
    let v = Tensor::randn(0f32, 1., (1, 1, 90, 128), &dev)?.to_dtype(DType::BF16)?;
    let fused = attention(&q, &k, &v, FUSED)?.to_dtype(DType::F32)?;
    // Equal scores: every output row is the mean of v's rows.
    let mean = v
        .to_dtype(DType::F32)?
        .mean_keepdim(2)?
        .broadcast_as((1, 1, 70, 128))?;
    let err = max_abs_diff(&fused, &mean)?;
    assert!(err < 1e-2, "{err}");
    Ok(())
}

#[test]
fn writing_over_the_queries_equals_a_fresh_output() -> Result<()> {
    let dev = device();
    for (strided, (b, h, lq, lk)) in [(false, (2, 4, 1000, 1000)), (true, (2, 5, 300, 300))] {
        let make = |l: usize| -> Result<Tensor> {
            if strided {
                token_major(b, l, h, DType::BF16, &dev)
            } else {
                Tensor::randn(0f32, 1.5, (b, h, l, 128), &dev)?.to_dtype(DType::BF16)
            }
        };
        let (q, k, v) = (make(lq)?, make(lk)?, make(lk)?);
        let fresh = attention(&q, &k, &v, FUSED)?;
        // A copy of q with q's strides, so that the kernel writes the output in that layout.
        let queries = if strided {
            q.transpose(1, 2)?.copy()?.transpose(1, 2)?
        } else {
            q.copy()?
        };
        let over = attention_over_query(queries, &k, &v, FUSED, 1)?;
        assert_eq!(over.dims(), fresh.dims());
        let err = max_abs_diff(&over.to_dtype(DType::F32)?, &fresh.to_dtype(DType::F32)?)?;
        println!("attention over the queries, strided={strided}: max abs vs a fresh output {err}");
        assert_eq!(err, 0.0);
    }
    Ok(())
}
