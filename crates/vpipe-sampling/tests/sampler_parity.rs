//! Parity of the Euler and UniPC samplers with diffusers, trajectory by trajectory.
//!
//! Every expected number here was made by `tools/fixtures/make_sampling_fixtures.py`
//! (diffusers 0.42.1, torch 2.15.0, fp32, CPU): the real `FlowMatchEulerDiscreteScheduler(shift)`
//! and `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
//! num_train_timesteps=1000, flow_shift)` driven step by step from a seeded `x0`
//! `[1, 16, 2, 4, 4]` (seed 31001) with seeded model outputs `[30, 1, 16, 2, 4, 4]` (seed 31003);
//! the strength cases follow `WanVideoToVideoPipeline.get_timesteps` and its noising of `x0` with
//! seeded noise (seed 31002). `tests/fixtures/sampling_fixtures.json` lists the cases and
//! versions. Tolerance: 1e-5 max abs on samples, sigmas and timesteps.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use vpipe_sampling::{noise_latents, run_on_schedule, run_schedule, SamplerKind, Schedule};

const TOL: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("sampling_cases.safetensors"), &Device::Cpu).unwrap()
}

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("sampling_fixtures.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn get(t: &HashMap<String, Tensor>, key: &str) -> Tensor {
    t.get(key)
        .unwrap_or_else(|| panic!("fixture tensor {key} missing"))
        .clone()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    d.max(0).unwrap().to_scalar::<f32>().unwrap() as f64
}

fn max_abs_diff_vec(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ: {a:?} vs {b:?}");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Runs the case `name` of the fixture with this crate and compares samples, sigmas and
/// timesteps with diffusers'.
fn check_case(name: &str) {
    let meta = meta();
    let case = meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("case {name} not in sampling_fixtures.json"));
    let kind: SamplerKind = case["sampler"].as_str().unwrap().parse().unwrap();
    let shift = case["shift"].as_f64().unwrap();
    let steps = case["steps"].as_u64().unwrap() as usize;
    let runs = case["steps_run"].as_u64().unwrap() as usize;

    let t = tensors();
    let x0 = get(&t, "x0");
    let outputs = get(&t, "model_outputs").narrow(0, 0, runs).unwrap();
    let run = match case["strength"].as_f64() {
        None => run_schedule(kind, shift, steps, &x0, &outputs).unwrap(),
        Some(strength) => {
            let schedule = Schedule::new(kind, steps, shift)
                .unwrap()
                .for_strength(strength)
                .unwrap();
            let noised = noise_latents(&x0, &get(&t, "noise"), schedule.sigmas()[0]).unwrap();
            run_on_schedule(schedule, &noised, &outputs).unwrap()
        }
    };

    let want_samples = get(&t, &format!("{name}.samples"));
    let want_sigmas: Vec<f64> = get(&t, &format!("{name}.sigmas"))
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let want_timesteps = get(&t, &format!("{name}.timesteps"))
        .to_vec1::<f64>()
        .unwrap();

    let e_samples = max_abs_diff(&run.samples, &want_samples);
    let e_sigmas = max_abs_diff_vec(&run.sigmas, &want_sigmas);
    let e_timesteps = max_abs_diff_vec(&run.timesteps, &want_timesteps);
    // The error at every step, to see whether it grows along the trajectory.
    let per_step: Vec<String> = (0..=runs)
        .map(|i| {
            let e = max_abs_diff(&run.samples.get(i).unwrap(), &want_samples.get(i).unwrap());
            format!("{e:.1e}")
        })
        .collect();
    eprintln!(
        "{name}: {runs} steps, samples {e_samples:.2e} sigmas {e_sigmas:.2e} timesteps \
         {e_timesteps:.2e}; per step [{}]",
        per_step.join(" ")
    );
    assert_eq!(run.samples.dims()[0], runs + 1);
    for (what, e) in [
        ("samples", e_samples),
        ("sigmas", e_sigmas),
        ("timesteps", e_timesteps),
    ] {
        assert!(e <= TOL, "{name} {what}: max abs {e:e} > {TOL:e}");
    }
}

macro_rules! parity_tests {
    ($($test:ident: $case:literal;)*) => {
        $(
            /// The fixture case named in the body vs diffusers, ≤ 1e-5 max abs.
            #[test]
            fn $test() {
                check_case($case);
            }
        )*

        /// Every case the generator wrote has a test above.
        #[test]
        fn every_fixture_case_is_tested() {
            let tested = [$($case),*];
            for case in meta()["cases"].as_array().unwrap() {
                let name = case["name"].as_str().unwrap();
                assert!(tested.contains(&name), "fixture case {name} has no test");
            }
        }
    };
}

parity_tests! {
    euler_shift3_4_steps: "euler_s3_n4";
    euler_shift3_10_steps: "euler_s3_n10";
    euler_shift5_4_steps: "euler_s5_n4";
    euler_shift5_10_steps: "euler_s5_n10";
    unipc_shift3_4_steps: "unipc_s3_n4";
    unipc_shift3_10_steps: "unipc_s3_n10";
    unipc_shift3_30_steps: "unipc_s3_n30";
    unipc_shift5_4_steps: "unipc_s5_n4";
    unipc_shift5_10_steps: "unipc_s5_n10";
    unipc_shift5_30_steps: "unipc_s5_n30";
    euler_strength_0_6: "euler_s3_n10_strength0.6";
    unipc_strength_0_6: "unipc_s5_n10_strength0.6";
    unipc_strength_0_7: "unipc_s3_n10_strength0.7";
}
