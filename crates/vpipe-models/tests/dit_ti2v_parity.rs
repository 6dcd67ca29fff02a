//! Parity of the Wan DiT shaped as Wan 2.2 TI2V-5B (48 latent channels, a timestep per token)
//! and of TI2V's conditioning with diffusers.
//!
//! Fixtures: `tools/fixtures/make_dit_ti2v_fixtures.py` (diffusers 0.42.1, fp32, CPU, seed
//! 91001; dim 32 = 2 heads × 16, ffn 64, 2 layers, 48 channels in and out, text_dim 24,
//! freq_dim 16). Cases: `i2v` (batch 2, 3×8×12 latents, the first frame's 24 of 72 tokens at
//! timestep 0, the rest at 757.25), `t2v` (every token at 999), `per_sample` (a [B] timestep
//! on i2v's inputs), `mixed` (samples with different per-token timesteps), `per_token` (a
//! different timestep at each of 8 tokens); `condition.*`: `WanImageToVideoPipeline`'s
//! `prepare_latents` with `expand_timesteps` and its loop's lines.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{device, TOL};
use vpipe_models::ops::max_abs_diff;
use vpipe_models::wan::dit::{
    BlockCache, BlockSource, CacheUse, Config, Execution, GuidancePasses, HeldBlocks, StepRun,
    WanModel,
};
use vpipe_models::wan::{dit_keys, ti2v};

const PER_TOKEN_CASES: [&str; 4] = ["i2v", "t2v", "mixed", "per_token"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dit_ti2v")
        .join(name)
}

fn cases() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("dit_ti2v_cases.safetensors"), &Device::Cpu).unwrap()
}

fn config() -> Config {
    let json = std::fs::read_to_string(fixture("dit_tiny_ti2v_config.json")).unwrap();
    Config::from_diffusers_json(&json).unwrap()
}

/// The fixture model in diffusers' names (`original`: renamed to Wan's), f32, on `device`.
fn model_on(original: bool, device: &Device) -> WanModel {
    let tensors = weights(original);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    WanModel::from_checkpoint(vb, Some(&config())).unwrap()
}

fn weights(original: bool) -> HashMap<String, Tensor> {
    let tensors = candle_core::safetensors::load(
        fixture("dit_tiny_ti2v_diffusers.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    if !original {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(k, t)| (dit_keys::diffusers_to_wan(&k).unwrap(), t))
        .collect()
}

/// A case's tensor (`per_sample` takes i2v's latents and contexts), on `device`.
fn get(cases: &HashMap<String, Tensor>, case: &str, key: &str, device: &Device) -> Tensor {
    let case = if case == "per_sample" && key != "timestep" {
        "i2v"
    } else {
        case
    };
    cases[&format!("{case}.{key}")].to_device(device).unwrap()
}

fn run(model: &WanModel, cases: &HashMap<String, Tensor>, case: &str, device: &Device) -> Tensor {
    let get = |k| get(cases, case, k, device);
    model
        .forward(
            &get("hidden_states"),
            &get("timestep"),
            &get("encoder_hidden_states"),
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"))
        .to_device(&Device::Cpu)
        .unwrap()
}

#[test]
fn per_token_and_per_sample_timesteps_match_diffusers() {
    let device = device();
    let cases = cases();
    for original in [false, true] {
        let model = model_on(original, &device);
        for case in ["per_sample"].into_iter().chain(PER_TOKEN_CASES) {
            let out = run(&model, &cases, case, &device);
            let err = max_abs_diff(&out, &cases[&format!("{case}.out")]).unwrap();
            println!("{case} (original names: {original}): max abs {err:.3e}");
            assert!(err <= TOL, "{case}: {err}");
        }
    }
}

#[test]
fn bf16_per_token_stays_close_to_f32() {
    let device = device();
    let cases = cases();
    let vb = VarBuilder::from_tensors(weights(false), DType::BF16, &device);
    let model = WanModel::from_checkpoint(vb, Some(&config())).unwrap();
    for case in ["i2v", "mixed"] {
        let out = run(&model, &cases, case, &device)
            .to_dtype(DType::F32)
            .unwrap();
        let expected = &cases[&format!("{case}.out")];
        let err = max_abs_diff(&out, expected).unwrap();
        let scale = expected
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        println!("bf16 {case}: max abs {err:.3e} (output max {scale:.2})");
        // bf16 has 8 mantissa bits: a few percent of the output's range after 2 blocks.
        assert!(err <= 0.05 * scale, "{case}: {err}");
    }
}

#[test]
fn config_of_the_5b_checkpoint_shapes() {
    // The preset, and the configuration read back from a checkpoint of its shapes.
    let preset = Config::preset("wan2.2-ti2v-5b").unwrap();
    assert_eq!(preset, Config::wan22_ti2v_5b());
    assert_eq!(
        (preset.dim, preset.num_heads, preset.num_layers),
        (3072, 24, 30)
    );
    assert_eq!((preset.in_channels, preset.out_channels), (48, 48));
    // Wan2.2-TI2V-5B: 4.999 B parameters.
    let count = preset.parameter_count() as f64 / 1e9;
    assert!((count - 5.0).abs() < 0.01, "{count}");
    // A checkpoint with the 5B's shapes (zeros, two blocks): its config is read from the
    // shapes, the layer count from the blocks present.
    let d = preset.dim;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("patch_embedding.weight".into(), vec![d, 48, 1, 2, 2]),
        ("text_embedding.0.weight".into(), vec![d, 4096]),
        ("time_embedding.0.weight".into(), vec![d, 256]),
        ("head.head.bias".into(), vec![48 * 4]),
    ];
    for i in 0..2 {
        shapes.push((format!("blocks.{i}.modulation"), vec![1, 6, d]));
        shapes.push((format!("blocks.{i}.ffn.0.bias"), vec![14336]));
    }
    let tensors = shapes
        .into_iter()
        .map(|(k, s)| (k, Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let read = Config::from_var_builder(&vb).unwrap();
    assert_eq!(
        read,
        Config {
            num_layers: 2,
            ..preset
        }
    );
}

#[test]
fn uniform_per_token_timestep_equals_the_per_sample_one() {
    let device = device();
    let cases = cases();
    let model = model_on(false, &device);
    let get = |k| get(&cases, "i2v", k, &device);
    let (x, ctx) = (get("hidden_states"), get("encoder_hidden_states"));
    let per_sample = Tensor::new(&[757.25f32, 31.5], &device).unwrap();
    let per_token = per_sample
        .unsqueeze(1)
        .unwrap()
        .repeat((1, 72))
        .unwrap()
        .contiguous()
        .unwrap();
    let a = model.forward(&x, &per_sample, &ctx).unwrap();
    let b = model.forward(&x, &per_token, &ctx).unwrap();
    assert_eq!(max_abs_diff(&a, &b).unwrap(), 0.0);
}

#[test]
fn a_per_token_timestep_of_the_wrong_length_is_a_clear_error() {
    let cases = cases();
    let model = model_on(false, &Device::Cpu);
    let get = |k| get(&cases, "i2v", k, &Device::Cpu);
    let (x, t, ctx) = (
        get("hidden_states"),
        get("timestep"),
        get("encoder_hidden_states"),
    );
    for bad in [
        t.narrow(1, 0, 71).unwrap(),
        Tensor::cat(&[&t, &t], 1).unwrap(),
        t.narrow(0, 0, 1).unwrap(),
        t.unsqueeze(2).unwrap(),
    ] {
        let err = model.forward(&x, &bad, &ctx).unwrap_err().to_string();
        assert!(err.contains("timestep") && err.contains("72"), "{err}");
    }
    let nan = t.affine(0.0, f64::NAN).unwrap();
    let err = model.forward(&x, &nan, &ctx).unwrap_err().to_string();
    assert!(err.contains("not a finite number"), "{err}");
}

#[test]
fn per_token_timesteps_under_slices_chunks_and_guidance() {
    let device = Device::Cpu;
    let cases = cases();
    let model = model_on(false, &device);
    let get = |k| get(&cases, "i2v", k, &device);
    let (x, t, ctx) = (
        get("hidden_states"),
        get("timestep"),
        get("encoder_hidden_states"),
    );
    let whole = model.forward(&x, &t, &ctx).unwrap();
    // 72 tokens in 5 slices of 15: the first frame's 24 end inside the second slice.
    for execution in [
        Execution {
            token_slices: 5,
            ..Execution::default()
        },
        Execution {
            attention_scratch: 2048,
            token_slices: 1,
            ..Execution::default()
        },
    ] {
        let out = model.forward_planned(&x, &t, &ctx, &execution).unwrap();
        let err = max_abs_diff(&out, &whole).unwrap();
        assert!(err <= 1e-5, "{execution:?}: {err}");
    }
    // Guided steps of sample 0, its two contexts as cond and uncond, in every way of passing.
    let (x, t) = (x.narrow(0, 0, 1).unwrap(), t.narrow(0, 0, 1).unwrap());
    let (cond, uncond) = (ctx.narrow(0, 0, 1).unwrap(), ctx.narrow(0, 1, 1).unwrap());
    let c = model.forward(&x, &t, &cond).unwrap();
    let u = model.forward(&x, &t, &uncond).unwrap();
    let manual = (&u + ((&c - &u).unwrap() * 5.0).unwrap()).unwrap();
    let execution = Execution::default();
    for passes in [
        GuidancePasses::Batched,
        GuidancePasses::TwoPasses,
        GuidancePasses::Sequential,
    ] {
        let guided = model
            .forward_guided(&x, &t, &cond, &uncond, 5.0, (passes, &execution))
            .unwrap();
        let err = max_abs_diff(&guided, &manual).unwrap();
        assert!(err <= 1e-5, "{passes:?}: {err}");
    }
    let single = model
        .forward_guided(
            &x,
            &t,
            &cond,
            &uncond,
            5.0,
            (GuidancePasses::Single, &execution),
        )
        .unwrap();
    assert_eq!(max_abs_diff(&single, &c).unwrap(), 0.0);
    // The step cache: a refreshing step is the uncached one, reusing adds what it kept.
    let mut cache = BlockCache::new();
    let mut step = |usage| {
        model
            .forward_guided_with(
                &x,
                &t,
                &cond,
                &uncond,
                5.0,
                StepRun {
                    passes: GuidancePasses::TwoPasses,
                    execution: &execution,
                    cache: Some((&mut cache, usage)),
                    image: None,
                },
                &mut HeldBlocks,
            )
            .unwrap()
    };
    let refreshed = step(CacheUse::Refresh);
    let reused = step(CacheUse::Reuse);
    assert!(max_abs_diff(&refreshed, &manual).unwrap() <= 1e-5);
    assert!(max_abs_diff(&reused, &refreshed).unwrap() <= 1e-5);
}

/// Every block from a source, whole, as a stream gives them.
struct WholeBlocks(HashMap<String, Tensor>);

impl BlockSource for WholeBlocks {
    fn block(
        &mut self,
        index: usize,
        dtype: DType,
        device: &Device,
    ) -> vpipe_models::Result<VarBuilder<'static>> {
        let prefix = format!("blocks.{index}.");
        let tensors = self
            .0
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        Ok(VarBuilder::from_tensors(tensors, dtype, device))
    }
}

#[test]
fn streamed_blocks_take_per_token_timesteps() {
    let cases = cases();
    let tensors = weights(true);
    let outside = tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("blocks."))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    let vb = VarBuilder::from_tensors(outside, DType::F32, &Device::Cpu);
    let streamed = WanModel::from_checkpoint_partial(vb, &config(), &|_| false, true).unwrap();
    let get = |k| get(&cases, "i2v", k, &Device::Cpu);
    let (x, t, ctx) = (
        get("hidden_states").narrow(0, 0, 1).unwrap(),
        get("timestep").narrow(0, 0, 1).unwrap(),
        get("encoder_hidden_states"),
    );
    let (cond, uncond) = (ctx.narrow(0, 0, 1).unwrap(), ctx.narrow(0, 1, 1).unwrap());
    let execution = Execution::default();
    let out = streamed
        .forward_guided_with(
            &x,
            &t,
            &cond,
            &uncond,
            5.0,
            StepRun {
                passes: GuidancePasses::Batched,
                execution: &execution,
                cache: None,
                image: None,
            },
            &mut WholeBlocks(tensors),
        )
        .unwrap();
    let held = model_on(true, &Device::Cpu)
        .forward_guided(
            &x,
            &t,
            &cond,
            &uncond,
            5.0,
            (GuidancePasses::Batched, &execution),
        )
        .unwrap();
    assert_eq!(max_abs_diff(&out, &held).unwrap(), 0.0);
}

#[test]
fn conditioning_matches_the_pipeline() {
    let cases = cases();
    let get = |k: &str| cases[&format!("condition.{k}")].clone();
    let device = Device::Cpu;
    let (noise, condition) = (get("noise"), get("condition"));
    let (_, _, f, h, w) = noise.dims5().unwrap();
    let mask = ti2v::first_frame_mask(f, h, w, &device).unwrap();
    assert_eq!(max_abs_diff(&mask, &get("first_frame_mask")).unwrap(), 0.0);
    let input = ti2v::blend_first_frame(&noise, &condition).unwrap();
    let err = max_abs_diff(&input, &get("latent_model_input")).unwrap();
    println!("condition: latent_model_input max abs {err:.3e}");
    assert!(err <= TOL, "latent_model_input: {err}");
    // The condition given once for the batch.
    let shared = ti2v::blend_first_frame(&noise, &condition.narrow(0, 0, 1).unwrap()).unwrap();
    assert_eq!(max_abs_diff(&shared, &input).unwrap(), 0.0);
    let final_latents = ti2v::blend_first_frame(&get("stepped"), &condition).unwrap();
    let err = max_abs_diff(&final_latents, &get("final")).unwrap();
    println!("condition: final latents max abs {err:.3e}");
    assert!(err <= TOL, "final: {err}");
    // The token grid of the 5B's (1, 2, 2) patches.
    let t = get("t").to_vec1::<f32>().unwrap()[0];
    let timestep = ti2v::expanded_timestep(t, 2, [f, h / 2, w / 2], true, &device).unwrap();
    let err = max_abs_diff(&timestep, &get("timestep")).unwrap();
    println!("condition: timestep max abs {err:.3e}");
    assert_eq!(err, 0.0);
}
