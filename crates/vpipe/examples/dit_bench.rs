//! DiT benchmark at full size: the Wan 2.1 14B architecture with random bf16 weights, one
//! denoising step with CFG at 832×480×81 (32 760 tokens, 512 text tokens), time and measured
//! device memory, split into attention and the rest.
//!
//! ```text
//! cargo build --release --features cuda -p vpipe --example dit_bench
//! dit_bench --preset wan2.1-t2v-14b --scratch-gib 4 --reps 2 [--attention cudnn] > dit.jsonl
//! dit_bench --token-slices 8 --batches 1     # the forward a streamed plan runs in slices
//! dit_bench --matmul fp8 --attention fp8      # float8 paths, and their error against exact
//! dit_bench --matmul fp8 --fp8-scales epilogue # the float8 products' scales in cuBLASLt's epilogue
//! dit_bench --preset wan2.1-t2v-1.3b --layers 1 --latent 1,4,4 --device cpu   # script check
//! ```
//!
//! Prints one JSON object per measurement. Memory is the CUDA pool's high-water mark above
//! what was in use before the call (the weights), read through vpipe-mem's meters. The
//! attention share is measured twice: the attention function alone on tensors of the model's
//! shapes, once per block kind, times the number of blocks; and every attention call inside one
//! more forward, each between two device synchronisations. Last, the forward runs with
//! attention replaced by the identity (`skip_for_benchmark`): the time of everything else,
//! measured directly and compared with diffusers under the same switch.

use std::time::Instant;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde_json::json;
use vpipe_models::ops::attention::{
    attention, skip_for_benchmark, time_calls, timed_seconds, AttentionKernel,
};
use vpipe_models::ops::linear::MatmulPrecision;
use vpipe_models::wan::dit::{Config, Execution, WanModel};

mod common;
use common::{device_and_meters, measure, Measured, RandomWeights, GIB};

struct Args {
    preset: String,
    scratch_gib: f64,
    reps: usize,
    /// Latent frames, height, width (832×480×81 → 21, 60, 104).
    latent: [usize; 3],
    /// Fewer blocks than the preset (a quick check of the script on a CPU).
    layers: Option<usize>,
    cpu: bool,
    /// The attention kernel (default: the fastest that applies).
    attention: Option<AttentionKernel>,
    /// Token slices of the FFN and the self-attention's input (`Execution::token_slices`).
    token_slices: usize,
    /// Batch sizes to measure, in order (2: one step with CFG batched; 1: one pass).
    batches: Vec<usize>,
    /// How the blocks' linear layers multiply (`Execution::matmul`).
    matmul: MatmulPrecision,
}

fn parse_args() -> Args {
    let mut args = Args {
        preset: "wan2.1-t2v-14b".into(),
        scratch_gib: 4.0,
        reps: 2,
        latent: [21, 60, 104],
        layers: None,
        cpu: false,
        attention: None,
        token_slices: 1,
        batches: vec![2, 1],
        matmul: MatmulPrecision::Exact,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--preset" => args.preset = value,
            "--scratch-gib" => args.scratch_gib = value.parse().expect("--scratch-gib X"),
            "--reps" => args.reps = value.parse().expect("--reps N"),
            "--latent" => {
                let v: Vec<usize> = value
                    .split(',')
                    .map(|x| x.parse().expect("--latent F,H,W"))
                    .collect();
                args.latent = [v[0], v[1], v[2]];
            }
            "--layers" => args.layers = Some(value.parse().expect("--layers N")),
            "--device" => args.cpu = value == "cpu",
            "--attention" => {
                args.attention = Some(
                    AttentionKernel::from_name(&value).expect("--attention cudnn|fused|chunked"),
                )
            }
            "--token-slices" => args.token_slices = value.parse().expect("--token-slices N"),
            "--batches" => {
                args.batches = value
                    .split(',')
                    .map(|x| x.parse().expect("--batches B[,B…]"))
                    .collect()
            }
            "--matmul" => {
                args.matmul = match value.as_str() {
                    "fp8" => MatmulPrecision::Fp8,
                    "exact" => MatmulPrecision::Exact,
                    other => panic!("--matmul exact|fp8, not {other}"),
                }
            }
            // Where float8 products apply their scales: in a pass of vpipe's after the
            // product (the default) or in cuBLASLt's epilogue, to time both.
            "--fp8-scales" => {
                let in_epilogue = match value.as_str() {
                    "epilogue" => true,
                    "pass" => false,
                    other => panic!("--fp8-scales pass|epilogue, not {other}"),
                };
                #[cfg(feature = "cuda")]
                vpipe_models::ops::fp8::set_scales_in_product(in_epilogue);
                #[cfg(not(feature = "cuda"))]
                let _ = in_epilogue;
            }
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn main() -> Result<()> {
    let args = parse_args();
    let (device, meters) = device_and_meters(args.cpu)?;
    let mut cfg = Config::preset(&args.preset).expect("preset: wan2.1-t2v-14b or wan2.1-t2v-1.3b");
    if let Some(layers) = args.layers {
        cfg.num_layers = layers;
    }
    let dtype = DType::BF16;

    let start = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
    let model = WanModel::new(&cfg, vb).map_err(candle_core::Error::wrap)?;
    device.synchronize()?;
    let scratch = (args.scratch_gib * GIB) as u64;
    let kernel = args
        .attention
        .unwrap_or_else(|| AttentionKernel::fastest(device.is_cuda(), dtype, cfg.head_dim()));
    let execution = Execution {
        attention: kernel,
        attention_scratch: scratch,
        token_slices: args.token_slices,
        matmul: args.matmul,
    };
    let weights = meters.read().expect("meter").compute_used() as f64 / GIB;
    println!(
        "{}",
        json!({"what": "build", "preset": args.preset, "params": cfg.parameter_count(),
        "weights_gib": weights, "build_s": start.elapsed().as_secs_f64()}),
    );

    let [frames, height, width] = args.latent;
    let text_len = 512;
    let tokens = frames * (height / 2) * (width / 2);
    for &batch in &args.batches {
        let latents = Tensor::randn(
            0f32,
            1.,
            (batch, cfg.in_channels, frames, height, width),
            &device,
        )?
        .to_dtype(dtype)?;
        let timestep = Tensor::new(vec![999f32; batch], &device)?;
        let context =
            Tensor::randn(0f32, 1., (batch, text_len, cfg.text_dim), &device)?.to_dtype(dtype)?;
        let forward = || {
            model
                .forward_planned(&latents, &timestep, &context, &execution)
                .map(drop)
                .map_err(candle_core::Error::wrap)
        };
        let Measured {
            median_s: step_s,
            peak_gib,
            ..
        } = measure(&device, &meters, args.reps, forward)?;

        let (self_attend, cross_attend) = model.attends(&execution, batch, tokens, text_len);
        let (h, hd) = (cfg.num_heads, cfg.head_dim());
        let q = Tensor::randn(0f32, 1., (batch, h, tokens, hd), &device)?.to_dtype(dtype)?;
        let kv_text =
            Tensor::randn(0f32, 1., (batch, h, text_len, hd), &device)?.to_dtype(dtype)?;
        let Measured {
            median_s: self_s, ..
        } = measure(&device, &meters, args.reps, || {
            attention(&q, &q, &q, self_attend).map(drop)
        })?;
        let Measured {
            median_s: cross_s, ..
        } = measure(&device, &meters, args.reps, || {
            attention(&q, &kv_text, &kv_text, cross_attend).map(drop)
        })?;
        let attention_s = (self_s + cross_s) * cfg.num_layers as f64;
        if device.is_cuda() {
            cross_attention_kernels(&q, &kv_text, (&device, &meters), args.reps)?;
        }
        // Once more with every attention call timed inside the forward (synchronised).
        time_calls(true);
        let start = Instant::now();
        forward()?;
        device.synchronize()?;
        let timed_forward_s = start.elapsed().as_secs_f64();
        let in_model_attention_s = timed_seconds();
        time_calls(false);
        // And the forward without attention at all (attention returns its query).
        skip_for_benchmark(true);
        let Measured {
            median_s: rest_s,
            peak_gib: rest_peak_gib,
            ..
        } = measure(&device, &meters, args.reps, forward)?;
        skip_for_benchmark(false);
        println!(
            "{}",
            json!({"what": "forward", "batch": batch, "tokens": tokens, "text_len": text_len,
            "forward_s": step_s, "peak_above_weights_gib": peak_gib,
            "activation_estimate_gib": cfg.activation_bytes_estimate(dtype, batch, tokens, &execution, device.is_cuda()) as f64 / GIB,
            "attention_s": attention_s, "non_attention_s": step_s - attention_s,
            "self_attention_layer_s": self_s, "cross_attention_layer_s": cross_s,
            "timed_forward_s": timed_forward_s, "in_model_attention_s": in_model_attention_s,
            "in_model_non_attention_s": timed_forward_s - in_model_attention_s,
            "forward_without_attention_s": rest_s, "forward_without_attention_peak_gib": rest_peak_gib,
            "attention": kernel.name(), "token_slices": args.token_slices, "cudnn_refusal": vpipe_models::ops::attention::cudnn_refusal(),
            "matmul": format!("{:?}", args.matmul),
            "scratch_gib": args.scratch_gib, "self_chunk_rows": self_attend.chunk.0, "cross_chunk_rows": cross_attend.chunk.0.min(tokens)}),
        );
        if args.matmul != MatmulPrecision::Exact || kernel == AttentionKernel::CudnnFp8 {
            // The output's error against the exact forward: exact products, cuDNN's exact
            // attention for float8's, the same inputs.
            let exact = Execution {
                matmul: MatmulPrecision::Exact,
                attention: match kernel {
                    AttentionKernel::CudnnFp8 => AttentionKernel::Cudnn,
                    other => other,
                },
                ..execution
            };
            let run = |execution: &Execution| {
                model
                    .forward_planned(&latents, &timestep, &context, execution)
                    .map_err(candle_core::Error::wrap)?
                    .to_dtype(DType::F64)?
                    .flatten_all()
            };
            let (fast, reference) = (run(&execution)?, run(&exact)?);
            let dot = |a: &Tensor, b: &Tensor| (a * b)?.sum_all()?.to_scalar::<f64>();
            let diff = (&fast - &reference)?;
            println!(
                "{}",
                json!({"what": "fast_path_error", "batch": batch, "matmul": format!("{:?}", args.matmul), "attention": kernel.name(),
                "relative_l2": (dot(&diff, &diff)? / dot(&reference, &reference)?).sqrt(),
                "max_abs": diff.abs()?.max_all()?.to_scalar::<f64>()?,
                "cosine": dot(&fast, &reference)? / (dot(&fast, &fast)? * dot(&reference, &reference)?).sqrt()}),
            );
        }
    }
    Ok(())
}

/// The cross-attention (the text's keys) with each GPU kernel, on head-major operands and on
/// the token-major views the forward passes, with cuDNN's plan for each: which kernel the
/// short keys should take.
fn cross_attention_kernels(
    q: &Tensor,
    kv: &Tensor,
    (device, meters): (&candle_core::Device, &vpipe_mem::Meters),
    reps: usize,
) -> Result<()> {
    let (b, h, l, d) = q.dims4()?;
    let lk = kv.dim(2)?;
    // [B, H, L, D] viewed over a [B, L, H, D] buffer, as the forward's projections lay it out.
    let token_major = |x: &Tensor| x.transpose(1, 2)?.contiguous()?.transpose(1, 2);
    let (q_tokens, kv_tokens) = (token_major(q)?, token_major(kv)?);
    let flops = 4.0 * (b * h * l * lk * d) as f64;
    for (layout, q, kv) in [
        ("head-major", q, kv),
        ("token-major", &q_tokens, &kv_tokens),
    ] {
        for kernel in [AttentionKernel::Cudnn, AttentionKernel::Fused] {
            let how = vpipe_models::ops::attention::Attend {
                kernel,
                chunk: vpipe_models::ops::attention::QueryChunk(l),
            };
            let timed = measure(device, meters, reps.max(5), || {
                attention(q, kv, kv, how).map(drop)
            });
            let plan = match kernel {
                #[cfg(feature = "cuda")]
                AttentionKernel::Cudnn => vpipe_models::ops::cudnn_sdpa::describe_plan(q, kv, kv)
                    .unwrap_or_else(|e| e.to_string()),
                _ => String::new(),
            };
            let line = match timed {
                Ok(Measured { median_s, .. }) => {
                    json!({"what": "cross_attention", "layout": layout,
                    "kernel": kernel.name(), "shape": [b, h, l, lk, d], "s": median_s,
                    "tflops": flops / median_s / 1e12, "plan": plan})
                }
                Err(e) => json!({"what": "cross_attention", "layout": layout,
                    "kernel": kernel.name(), "error": e.to_string()}),
            };
            println!("{line}");
        }
    }
    Ok(())
}
