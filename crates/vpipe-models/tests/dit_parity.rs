//! Parity of the Wan DiT with diffusers' `WanTransformer3DModel`.
//!
//! Fixtures: `tools/fixtures/make_dit_fixtures.py` (diffusers 0.42.1, fp32, CPU, seed 31001; a
//! tiny model with the real structure: dim 32 = 2 heads × 16, ffn 64, 2 layers, 16 channels,
//! text_dim 24, freq_dim 16). Cases: `batch2` (2 samples, 3×8×12 latents, contexts with 13 and
//! 7 non-zero rows of 20, t = 757.25 and 31.5) and `single` (1 frame, 6×10, t = 999).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vpipe_models::ops::max_abs_diff;
use vpipe_models::wan::dit::{
    BlockCache, BlockPart, BlockSource, CacheUse, Config, Execution, GuidancePasses, HeldBlocks,
    Rope, StepRun, WanModel,
};
use vpipe_models::wan::dit_keys;

const TOL: f64 = 1e-4;
const CASES: [&str; 2] = ["batch2", "single"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dit")
        .join(name)
}

fn cases() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("dit_cases.safetensors"), &Device::Cpu).unwrap()
}

fn config() -> Config {
    Config::from_diffusers_json(&std::fs::read_to_string(fixture("config.json")).unwrap()).unwrap()
}

/// Largest absolute value of a tensor (the scale a bf16 bound is taken against).
fn output_max(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

/// A fixture model with the fixture's config.json, in `dtype` on `device`.
fn model(file: &str, dtype: DType, device: &Device) -> WanModel {
    WanModel::from_file(fixture(file), Some(&config()), dtype, device).unwrap()
}

fn run(model: &WanModel, cases: &HashMap<String, Tensor>, case: &str) -> Tensor {
    let get = |k: &str| cases[&format!("{case}.{k}")].clone();
    model
        .forward(
            &get("hidden_states"),
            &get("timestep"),
            &get("encoder_hidden_states"),
        )
        .unwrap()
}

fn check(file: &str, expected_key: &str, tol: f64) {
    let model = model(file, DType::F32, &Device::Cpu);
    let cases = cases();
    for case in CASES {
        let out = run(&model, &cases, case);
        let expected = &cases[&format!("{case}.{expected_key}")];
        let err = max_abs_diff(&out, expected).unwrap();
        println!("{file} {case}: max abs {err:.3e}");
        assert!(err <= tol, "{file} {case}: max abs {err} > {tol}");
    }
}

#[test]
fn diffusers_layout_matches_diffusers() {
    check("dit_tiny_diffusers.safetensors", "out", TOL);
}

#[test]
fn original_layout_with_comfy_prefix_matches_diffusers() {
    check("dit_tiny_wan.safetensors", "out", TOL);
}

#[test]
fn scaled_fp8_weights_match_dequantised_diffusers() {
    check("dit_tiny_wan_fp8.safetensors", "out_fp8", TOL);
}

#[test]
fn rope_tables_match_diffusers() {
    let cases = cases();
    let cfg = config();
    // batch2: 3×8×12 latents → 3×4×6 tokens; diffusers repeats each pair's value twice.
    let rope = Rope::new(cfg.head_dim(), [3, 4, 6], 1024, &Device::Cpu).unwrap();
    for (ours, key) in [(&rope.cos, "rope.cos"), (&rope.sin, "rope.sin")] {
        let theirs = &cases[key];
        let (l, d) = theirs.dims2().unwrap();
        let pairs = theirs
            .reshape((l, d / 2, 2))
            .unwrap()
            .narrow(2, 0, 1)
            .unwrap()
            .squeeze(2)
            .unwrap();
        let err = max_abs_diff(ours, &pairs).unwrap();
        assert!(err <= 1e-7, "{key}: {err}");
    }
}

#[test]
fn config_from_shapes_needs_128_wide_heads() {
    // The tiny model has 16-wide heads: from shapes alone its head count is unknowable, and the
    // error says what to pass instead.
    let err = WanModel::from_file(
        fixture("dit_tiny_wan.safetensors"),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--config"), "{err}");
}

#[test]
fn bf16_stays_close_to_f32() {
    let model = model("dit_tiny_diffusers.safetensors", DType::BF16, &Device::Cpu);
    let cases = cases();
    for case in CASES {
        let out = run(&model, &cases, case).to_dtype(DType::F32).unwrap();
        let expected = &cases[&format!("{case}.out")];
        let err = max_abs_diff(&out, expected).unwrap();
        let scale = output_max(expected);
        println!("bf16 {case}: max abs {err:.3e} (output max {scale:.2})");
        // bf16 has 8 mantissa bits: a few percent of the output's range after 2 blocks.
        assert!(err <= 0.05 * scale, "{case}: {err}");
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let model = model("dit_tiny_diffusers.safetensors", DType::F32, &Device::Cpu);
    let cases = cases();
    let get = |k: &str| cases[&format!("batch2.{k}")].clone();
    let (x, t, ctx) = (
        get("hidden_states"),
        get("timestep"),
        get("encoder_hidden_states"),
    );
    let odd = x.narrow(3, 0, 7).unwrap();
    let err = model.forward(&odd, &t, &ctx).unwrap_err().to_string();
    assert!(err.contains("multiples of the patch size"), "{err}");
    let err = model
        .forward(&x.narrow(1, 0, 4).unwrap(), &t, &ctx)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected 16 channels"), "{err}");
    let err = model
        .forward(&x, &t.narrow(0, 0, 1).unwrap(), &ctx)
        .unwrap_err()
        .to_string();
    assert!(err.contains("timestep"), "{err}");
    let err = model
        .forward(&x, &t, &ctx.narrow(2, 0, 20).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("encoder_hidden_states"), "{err}");
}

/// `case` under `execution`.
fn run_planned(
    model: &WanModel,
    cases: &HashMap<String, Tensor>,
    case: &str,
    execution: &Execution,
) -> Tensor {
    let get = |k: &str| cases[&format!("{case}.{k}")].clone();
    model
        .forward_planned(
            &get("hidden_states"),
            &get("timestep"),
            &get("encoder_hidden_states"),
            execution,
        )
        .unwrap()
}

#[test]
fn chunked_attention_does_not_change_the_output() {
    let model = model("dit_tiny_diffusers.safetensors", DType::F32, &Device::Cpu);
    let cases = cases();
    let full = run(&model, &cases, "batch2");
    // A few rows per chunk: 72 tokens in 1-2 KB of scratch.
    let execution = Execution {
        attention_scratch: 2048,
        ..Execution::default()
    };
    let (self_attend, _) = model.attends(&execution, 2, 72, 20);
    assert!(self_attend.chunk.0 < 72, "{self_attend:?}");
    let chunked = run_planned(&model, &cases, "batch2", &execution);
    let err = max_abs_diff(&chunked, &full).unwrap();
    assert!(err <= 1e-5, "{err}");
}

#[test]
fn token_slices_do_not_change_the_output() {
    let model = model("dit_tiny_diffusers.safetensors", DType::F32, &Device::Cpu);
    let cases = cases();
    let whole = run(&model, &cases, "batch2");
    // 72 tokens in 5 slices (the FFN and the self-attention's q, k and v): the last one
    // shorter.
    let execution = Execution {
        token_slices: 5,
        ..Execution::default()
    };
    let sliced = run_planned(&model, &cases, "batch2", &execution);
    let err = max_abs_diff(&sliced, &whole).unwrap();
    assert!(err <= 1e-5, "{err}");
    let estimate = |token_slices| {
        let execution = Execution {
            attention_scratch: 0,
            token_slices,
            ..Execution::default()
        };
        config().activation_bytes_estimate(DType::F32, 2, 72, &execution, false)
    };
    assert!(estimate(5) <= estimate(1));
}

/// The fused CUDA kernels (layer norm + modulation, gated residual, RoPE + head split) against
/// the same diffusers outputs; f32 on the GPU, and bf16 within the CPU bf16 bound.
#[cfg(feature = "cuda")]
#[test]
fn cuda_matches_diffusers() {
    let device = Device::new_cuda(0).unwrap();
    let cases = cases();
    for (dtype, tol_share) in [(DType::F32, None), (DType::BF16, Some(0.05))] {
        let model = model("dit_tiny_wan_fp8.safetensors", dtype, &device);
        for case in CASES {
            let get = |k: &str| cases[&format!("{case}.{k}")].to_device(&device).unwrap();
            let out = model
                .forward(
                    &get("hidden_states"),
                    &get("timestep"),
                    &get("encoder_hidden_states"),
                )
                .unwrap_or_else(|e| panic!("cuda {dtype:?} {case}: {e}"))
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let expected = &cases[&format!("{case}.out_fp8")];
            let err = max_abs_diff(&out, expected).unwrap();
            let tol = match tol_share {
                None => TOL,
                Some(share) => share * output_max(expected),
            };
            println!("cuda {dtype:?} {case}: max abs {err:.3e} (bound {tol:.1e})");
            assert!(err <= tol, "cuda {dtype:?} {case}: {err}");
        }
    }
}

/// The one-pass kernels of a block at the 14B's width (40 heads × 128, rows of 5 120: many
/// warps a row, where the tiny model's rows take one) against the steps they replace, bf16 on
/// the GPU: the q/k RMS norm with RoPE and the head split, the layer norm with modulation,
/// and the plain residual.
#[cfg(feature = "cuda")]
#[test]
fn cuda_one_pass_block_kernels_equal_their_steps_at_14b_width() {
    use vpipe_models::ops::fused;
    let device = Device::new_cuda(0).unwrap();
    let (b, l, heads, d) = (2, 300, 40, 128);
    let dim = heads * d;
    let randn = |shape: &[usize], std: f32| {
        Tensor::randn(0f32, std, shape, &device)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    };
    let x = randn(&[b, l, dim], 3.0);
    let max_of = |t: &Tensor| output_max(&t.to_dtype(DType::F32).unwrap());
    let host_f32 = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };

    // RMS norm + RoPE + head split, against candle's rms_norm then rope_heads.
    let weight = (randn(&[dim], 0.5).abs().unwrap() + 0.5).unwrap();
    let angles = Tensor::rand(0f32, 6.3, (l, d / 2), &device).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let one_pass = fused::rms_rope_heads(&x, (&weight, 1e-6), (&cos, &sin), heads)
        .unwrap()
        .expect("the one-pass kernel takes bf16 rows of 40 × 128");
    let normed = candle_nn::ops::rms_norm(&x, &weight, 1e-6).unwrap();
    let steps = fused::rope_heads(&normed, &cos, &sin, heads).unwrap();
    assert_eq!(one_pass.dims(), &[b, heads, l, d]);
    let err = max_abs_diff(&host_f32(&one_pass), &host_f32(&steps)).unwrap();
    let scale = max_of(&steps);
    println!(
        "rms_rope_heads at 40 × 128: max abs {err:.3e} against the two steps (max {scale:.2})"
    );
    // The sums run in another order: a value may round to the neighbouring bf16 (2⁻⁷ relative).
    assert!(err <= scale / 64.0, "{err} of {scale}");

    // Layer norm with a per-sample modulation, against the f32 steps on the host.
    let mul = Tensor::randn(1f32, 0.2, (b, 1, dim), &device).unwrap();
    let add = Tensor::randn(0f32, 0.2, (b, 1, dim), &device).unwrap();
    let modulated = fused::ln_modulate(&x, &mul, &add, 1e-6).unwrap();
    let xf = host_f32(&x);
    let mean = xf.mean_keepdim(2).unwrap();
    let centred = xf.broadcast_sub(&mean).unwrap();
    let var = centred.sqr().unwrap().mean_keepdim(2).unwrap();
    let expected = centred
        .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&host_f32(&mul))
        .unwrap()
        .broadcast_add(&host_f32(&add))
        .unwrap();
    let err = max_abs_diff(&host_f32(&modulated), &expected).unwrap();
    let scale = output_max(&expected);
    println!("ln_modulate at 5 120 wide: max abs {err:.3e} against f32 (max {scale:.2})");
    assert!(err <= scale / 128.0, "{err} of {scale}");
    // The same rows quantised per row for a float8 product, the kernel's other output: e4m3
    // keeps 3 bits below the leading one, so each value is within 1/16 of itself.
    let (values, scales) = fused::ln_modulate_fp8(&x, (&mul, &add, 1e-6), b * l)
        .unwrap()
        .expect("the eight-wide kernel takes bf16 rows of 5 120");
    let back = values
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .reshape((b * l, dim))
        .unwrap()
        .broadcast_mul(&host_f32(&scales).reshape((b * l, 1)).unwrap())
        .unwrap();
    let expected_rows = expected.reshape((b * l, dim)).unwrap();
    let relative = ((&back - &expected_rows).unwrap().abs().unwrap()
        / (expected_rows.abs().unwrap() + scale / 448.0).unwrap())
    .unwrap()
    .max_all()
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    println!("ln_modulate in float8 rows at 5 120 wide: largest error {relative:.3e} of the value");
    assert!(relative <= 1.0 / 14.0, "{relative}");

    // The plain residual, against candle's add (both round the exact sum once).
    let r = randn(&[b, l, dim], 1.0);
    let sum = fused::residual(&x, &r).unwrap();
    assert_eq!(max_abs_diff(&sum, &(&x + &r).unwrap()).unwrap(), 0.0);
}

/// The DiT with float8 products (`--fp8-compute`) on the GPU, where the layer norms quantise
/// their outputs in their own pass, against the same products emulated on the host (the
/// inputs quantised per row alike, the products in f32), bf16, whole and in token slices
/// (the self-attention's norm per slice).
#[cfg(feature = "cuda")]
#[test]
fn cuda_fp8_products_match_the_hosts_emulation() {
    use vpipe_models::ops::linear::MatmulPrecision;
    let device = Device::new_cuda(0).unwrap();
    let cases = cases();
    let host = model("dit_tiny_diffusers.safetensors", DType::BF16, &Device::Cpu);
    let gpu = model("dit_tiny_diffusers.safetensors", DType::BF16, &device);
    for token_slices in [1, 5] {
        let execution = Execution {
            matmul: MatmulPrecision::Fp8,
            token_slices,
            ..Execution::default()
        };
        let on_host = run_planned(&host, &cases, "batch2", &execution)
            .to_dtype(DType::F32)
            .unwrap();
        let on_gpu_cases: HashMap<String, Tensor> = cases
            .iter()
            .map(|(k, v)| (k.clone(), v.to_device(&device).unwrap()))
            .collect();
        let on_gpu = run_planned(&gpu, &on_gpu_cases, "batch2", &execution)
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let err = max_abs_diff(&on_gpu, &on_host).unwrap();
        let bound = 0.05 * output_max(&on_host);
        println!("cuda fp8 products, {token_slices} slice(s): max abs {err:.3e} against the host (bound {bound:.1e})");
        assert!(err <= bound, "{token_slices} slices: {err}");
    }
}

#[test]
fn guidance_batched_equals_two_passes() {
    // batch2's two contexts play cond and uncond for sample 0's latents.
    let model = model("dit_tiny_diffusers.safetensors", DType::F32, &Device::Cpu);
    let cases = cases();
    let get = |k: &str| cases[&format!("batch2.{k}")].clone();
    let x = get("hidden_states").narrow(0, 0, 1).unwrap();
    let t = get("timestep").narrow(0, 0, 1).unwrap();
    let ctx = get("encoder_hidden_states");
    let (cond, uncond) = (ctx.narrow(0, 0, 1).unwrap(), ctx.narrow(0, 1, 1).unwrap());
    let run = |passes| {
        model
            .forward_guided(&x, &t, &cond, &uncond, 5.0, (passes, &Execution::default()))
            .unwrap()
    };
    let (batched, two) = (run(GuidancePasses::Batched), run(GuidancePasses::TwoPasses));
    let err = max_abs_diff(&batched, &two).unwrap();
    assert!(err <= 1e-5, "batched vs two passes: {err}");
    // The same passes, one forward after the other: the same operations, so the same bits.
    let sequential = run(GuidancePasses::Sequential);
    assert_eq!(max_abs_diff(&sequential, &two).unwrap(), 0.0);
    // One forward of the condition: the uncondition is not even looked at.
    let single = model
        .forward_guided(
            &x,
            &t,
            &cond,
            &cond.narrow(1, 0, 3).unwrap(),
            5.0,
            (GuidancePasses::Single, &Execution::default()),
        )
        .unwrap();
    // uncond + 5 (cond − uncond), from two plain forwards.
    let c = model.forward(&x, &t, &cond).unwrap();
    assert_eq!(max_abs_diff(&single, &c).unwrap(), 0.0);
    let u = model.forward(&x, &t, &uncond).unwrap();
    let manual = (&u + ((c - &u).unwrap() * 5.0).unwrap()).unwrap();
    assert!(max_abs_diff(&two, &manual).unwrap() <= 1e-6);
}

/// The blocks of a checkpoint, given one part at a time with only that part's tensors, as a
/// stream of parts does; records what was asked for.
struct PartsOf {
    tensors: HashMap<String, Tensor>,
    layout: (dit_keys::KeyLayout, &'static str),
    asked: Vec<(usize, BlockPart)>,
}

impl BlockSource for PartsOf {
    fn block(
        &mut self,
        index: usize,
        _dtype: DType,
        _device: &Device,
    ) -> vpipe_models::Result<VarBuilder<'static>> {
        panic!("block {index} asked for whole from a source of parts")
    }

    fn gives_parts(&self) -> bool {
        true
    }

    fn block_part(
        &mut self,
        index: usize,
        part: BlockPart,
        dtype: DType,
        device: &Device,
    ) -> vpipe_models::Result<VarBuilder<'static>> {
        self.asked.push((index, part));
        let (layout, prefix) = self.layout;
        let tensors = self
            .tensors
            .iter()
            .filter(|(k, _)| dit_keys::block_part_of(k, layout, prefix) == Some((index, part)))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        Ok(VarBuilder::from_tensors(tensors, dtype, device))
    }

    fn embeddings(
        &mut self,
        dtype: DType,
        device: &Device,
    ) -> vpipe_models::Result<VarBuilder<'static>> {
        let (layout, prefix) = self.layout;
        let tensors = self
            .tensors
            .iter()
            .filter(|(k, _)| dit_keys::is_source_embedding(k, layout, prefix))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        Ok(VarBuilder::from_tensors(tensors, dtype, device))
    }
}

#[test]
fn blocks_given_in_parts_equal_held_blocks() {
    let cases = cases();
    for file in ["dit_tiny_diffusers.safetensors", "dit_tiny_wan.safetensors"] {
        let held = model(file, DType::F32, &Device::Cpu);
        let tensors = candle_core::safetensors::load(fixture(file), &Device::Cpu).unwrap();
        let contains = |name: &str| tensors.contains_key(name);
        let layout = dit_keys::detect_layout_of(&contains).unwrap();
        // Block 0 held, block 1 and the text and time embeddings from the source.
        let outside: HashMap<String, Tensor> = tensors
            .iter()
            .filter(|(k, _)| {
                !matches!(dit_keys::block_part_of(k, layout.0, layout.1), Some((1, _)))
                    && !dit_keys::is_source_embedding(k, layout.0, layout.1)
            })
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        let vb = VarBuilder::from_tensors(outside, DType::F32, &Device::Cpu);
        let partial = WanModel::from_checkpoint_partial(vb, &config(), &|i| i == 0, false).unwrap();
        let get = |k: &str| cases[&format!("batch2.{k}")].clone();
        let x = get("hidden_states").narrow(0, 0, 1).unwrap();
        let t = get("timestep").narrow(0, 0, 1).unwrap();
        let ctx = get("encoder_hidden_states");
        let (cond, uncond) = (ctx.narrow(0, 0, 1).unwrap(), ctx.narrow(0, 1, 1).unwrap());
        // The step cache's modulations, from the source's embeddings.
        let mut source = PartsOf {
            tensors: tensors.clone(),
            layout,
            asked: Vec::new(),
        };
        let from_source = partial.time_modulations(&[757.25], &mut source).unwrap();
        let from_held = held.time_modulation(757.25).unwrap();
        assert_eq!(max_abs_diff(&from_source[0], &from_held).unwrap(), 0.0);
        assert!(partial.time_modulation(757.25).is_err());
        for passes in [
            GuidancePasses::Batched,
            GuidancePasses::TwoPasses,
            GuidancePasses::Sequential,
        ] {
            let mut source = PartsOf {
                tensors: tensors.clone(),
                layout,
                asked: Vec::new(),
            };
            let streamed = partial
                .forward_guided_with(
                    &x,
                    &t,
                    &cond,
                    &uncond,
                    5.0,
                    StepRun {
                        passes,
                        execution: &Execution::default(),
                        cache: None,
                        image: None,
                    },
                    &mut source,
                )
                .unwrap();
            let whole = held
                .forward_guided(&x, &t, &cond, &uncond, 5.0, (passes, &Execution::default()))
                .unwrap();
            assert_eq!(
                max_abs_diff(&streamed, &whole).unwrap(),
                0.0,
                "{file} {passes:?}"
            );
            let forwards = if passes == GuidancePasses::Sequential {
                2
            } else {
                1
            };
            let expected: Vec<_> = (0..forwards)
                .flat_map(|_| BlockPart::ALL.map(|p| (1, p)))
                .collect();
            assert_eq!(source.asked, expected, "{file} {passes:?}");
        }
    }
}

#[test]
fn a_step_reusing_the_block_cache_adds_what_the_blocks_added() {
    let model = model("dit_tiny_diffusers.safetensors", DType::F32, &Device::Cpu);
    let cases = cases();
    let get = |k: &str| cases[&format!("batch2.{k}")].clone();
    let x = get("hidden_states").narrow(0, 0, 1).unwrap();
    let t = get("timestep").narrow(0, 0, 1).unwrap();
    let ctx = get("encoder_hidden_states");
    let (cond, uncond) = (ctx.narrow(0, 0, 1).unwrap(), ctx.narrow(0, 1, 1).unwrap());
    let execution = Execution::default();
    for passes in [
        GuidancePasses::Batched,
        GuidancePasses::TwoPasses,
        GuidancePasses::Sequential,
        GuidancePasses::Single,
    ] {
        let mut cache = BlockCache::new();
        let mut step = |usage| {
            model.forward_guided_with(
                &x,
                &t,
                &cond,
                &uncond,
                5.0,
                StepRun {
                    passes,
                    execution: &execution,
                    cache: Some((&mut cache, usage)),
                    image: None,
                },
                &mut HeldBlocks,
            )
        };
        // Nothing to reuse yet.
        let err = step(CacheUse::Reuse).unwrap_err().to_string();
        assert!(err.contains("cache"), "{err}");
        // A refreshing step is the uncached step; reusing on the same input gives it back up
        // to the rounding of (x + (after - x)).
        let refreshed = step(CacheUse::Refresh).unwrap();
        let reused = step(CacheUse::Reuse).unwrap();
        let uncached = model
            .forward_guided(&x, &t, &cond, &uncond, 5.0, (passes, &execution))
            .unwrap();
        assert_eq!(
            max_abs_diff(&refreshed, &uncached).unwrap(),
            0.0,
            "{passes:?}"
        );
        let err = max_abs_diff(&reused, &refreshed).unwrap();
        assert!(err <= 1e-5, "{passes:?}: {err}");
    }
    // The modulation a step cache compares: one row of 6 × dim.
    let e0 = model.time_modulation(757.25).unwrap();
    assert_eq!(e0.dims(), &[1, 6 * config().dim]);
    assert!(model.time_modulation(f32::NAN).is_err());
}

/// An image DiT fixture of `tools/fixtures/make_dit_i2v_fixtures.py` (`kind`: `i2v` or
/// `flf2v`): its config, its cases, and the model built from its weights in diffusers' names
/// and in the original ones.
fn image_dit(
    kind: &str,
) -> (
    Config,
    HashMap<String, Tensor>,
    [(&'static str, WanModel); 2],
) {
    image_dit_on(kind, DType::F32, &Device::Cpu)
}

/// [`image_dit`] with the models in `dtype` on `device`.
fn image_dit_on(
    kind: &str,
    dtype: DType,
    device: &Device,
) -> (
    Config,
    HashMap<String, Tensor>,
    [(&'static str, WanModel); 2],
) {
    let cfg = Config::from_diffusers_json(
        &std::fs::read_to_string(fixture(&format!("dit_tiny_{kind}_config.json"))).unwrap(),
    )
    .unwrap();
    let cases = candle_core::safetensors::load(
        fixture(&format!("dit_{kind}_cases.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let diffusers = candle_core::safetensors::load(
        fixture(&format!("dit_tiny_{kind}_diffusers.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let original: HashMap<String, Tensor> = diffusers
        .iter()
        .map(|(k, t)| {
            (
                dit_keys::diffusers_to_wan(k).unwrap_or_else(|| panic!("{k}")),
                t.clone(),
            )
        })
        .collect();
    let build = |tensors| {
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        WanModel::from_checkpoint(vb, Some(&cfg)).unwrap()
    };
    let models = [
        ("diffusers", build(diffusers)),
        ("original", build(original)),
    ];
    (cfg, cases, models)
}

/// The image-to-video DiT (36 input channels, the image embedding, image keys and values in
/// every cross-attention) against diffusers' `WanTransformer3DModel` with `image_dim`
/// (`tools/fixtures/make_dit_i2v_fixtures.py`), in diffusers' names and in the original ones.
#[test]
fn image_to_video_dit_matches_diffusers() {
    let (cfg, i2v, models) = image_dit("i2v");
    assert_eq!((cfg.in_channels, cfg.image_dim), (36, Some(24)));
    for (layout, model) in models {
        let get = |k: &str| i2v[k].clone();
        let out = model
            .forward_with_image(
                &get("hidden_states"),
                &get("timestep"),
                &get("encoder_hidden_states"),
                &get("encoder_hidden_states_image"),
                &Execution::default(),
            )
            .unwrap();
        let err = max_abs_diff(&out, &i2v["out"]).unwrap();
        println!("image-to-video DiT, {layout} names: max abs {err:.3e}");
        assert!(err <= TOL, "{layout}: {err}");
        // Without the image, or with features of another width: named errors.
        let err = model
            .forward(
                &get("hidden_states"),
                &get("timestep"),
                &get("encoder_hidden_states"),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("encoder_hidden_states_image"), "{err}");
        let err = model
            .forward_with_image(
                &get("hidden_states"),
                &get("timestep"),
                &get("encoder_hidden_states"),
                &get("encoder_hidden_states_image").narrow(2, 0, 8).unwrap(),
                &Execution::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("encoder_hidden_states_image"), "{err}");
    }
    // A text-to-video model takes no image.
    let t2v = model("dit_tiny_diffusers.safetensors", DType::F32, &Device::Cpu);
    let t2v_cases = cases();
    let get = |k: &str| t2v_cases[&format!("single.{k}")].clone();
    let err = t2v
        .forward_with_image(
            &get("hidden_states"),
            &get("timestep"),
            &get("encoder_hidden_states"),
            &Tensor::zeros((1, 5, 24), DType::F32, &Device::Cpu).unwrap(),
            &Execution::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("takes no image"), "{err}");
}

/// Guided image-to-video steps give the image to both passes, in every way of passing.
#[test]
fn guided_image_to_video_gives_the_image_to_both_passes() {
    let (_, i2v, [(_, model), _]) = image_dit("i2v");
    let (x, t, image) = (
        &i2v["hidden_states"],
        &i2v["timestep"],
        &i2v["encoder_hidden_states_image"],
    );
    let cond = &i2v["encoder_hidden_states"];
    let uncond = (cond * -0.5).unwrap();
    let execution = Execution::default();
    let step = |passes| {
        model
            .forward_guided_with(
                x,
                t,
                cond,
                &uncond,
                5.0,
                StepRun {
                    passes,
                    execution: &execution,
                    cache: None,
                    image: Some(image),
                },
                &mut HeldBlocks,
            )
            .unwrap()
    };
    let c = model
        .forward_with_image(x, t, cond, image, &execution)
        .unwrap();
    let u = model
        .forward_with_image(x, t, &uncond, image, &execution)
        .unwrap();
    let manual = (&u + ((&c - &u).unwrap() * 5.0).unwrap()).unwrap();
    for passes in [
        GuidancePasses::Batched,
        GuidancePasses::TwoPasses,
        GuidancePasses::Sequential,
    ] {
        let err = max_abs_diff(&step(passes), &manual).unwrap();
        assert!(err <= 1e-5, "{passes:?}: {err}");
    }
    assert_eq!(
        max_abs_diff(&step(GuidancePasses::Single), &c).unwrap(),
        0.0
    );
}

/// The image-to-video and first-last-frame DiTs on the GPU, in both key layouts: f32 within
/// the CPU bound, bf16 within 5 % of the output's largest value.
#[cfg(feature = "cuda")]
#[test]
fn cuda_image_dits_match_diffusers() {
    let device = Device::new_cuda(0).unwrap();
    for kind in ["i2v", "flf2v"] {
        for (dtype, tol_share) in [(DType::F32, None), (DType::BF16, Some(0.05))] {
            let (_, cases, models) = image_dit_on(kind, dtype, &device);
            let get = |k: &str| cases[k].to_device(&device).unwrap();
            let expected = &cases["out"];
            let tol = match tol_share {
                None => TOL,
                Some(share) => share * output_max(expected),
            };
            for (layout, model) in models {
                let out = model
                    .forward_with_image(
                        &get("hidden_states").to_dtype(dtype).unwrap(),
                        &get("timestep"),
                        &get("encoder_hidden_states").to_dtype(dtype).unwrap(),
                        &get("encoder_hidden_states_image").to_dtype(dtype).unwrap(),
                        &Execution::default(),
                    )
                    .unwrap_or_else(|e| panic!("cuda {kind} {dtype:?} {layout}: {e}"))
                    .to_device(&Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let err = max_abs_diff(&out, expected).unwrap();
                println!("cuda {kind} {dtype:?} {layout}: max abs {err:.3e} (bound {tol:.1e})");
                assert!(err <= tol, "cuda {kind} {dtype:?} {layout}: {err}");
            }
        }
    }
}

/// First-last-frame to video: the image tokens of both frames with learned position
/// embeddings (diffusers' `pos_embed_seq_len`), in diffusers' names and in the original ones.
#[test]
fn first_last_frame_dit_matches_diffusers() {
    let (cfg, flf2v, models) = image_dit("flf2v");
    assert_eq!((cfg.image_dim, cfg.image_tokens), (Some(24), Some(10)));
    for (layout, model) in models {
        let get = |k: &str| flf2v[k].clone();
        let run = |image: &Tensor| {
            model.forward_with_image(
                &get("hidden_states"),
                &get("timestep"),
                &get("encoder_hidden_states"),
                image,
                &Execution::default(),
            )
        };
        let out = run(&get("encoder_hidden_states_image")).unwrap();
        let err = max_abs_diff(&out, &flf2v["out"]).unwrap();
        println!("first-last-frame DiT, {layout} names: max abs {err:.3e}");
        assert!(err <= TOL, "{layout}: {err}");
        // One frame's tokens where both frames' are expected: a named error.
        let one_frame = get("encoder_hidden_states_image").narrow(1, 0, 5).unwrap();
        let err = run(&one_frame).unwrap_err().to_string();
        assert!(err.contains("both frames"), "{err}");
    }
}
