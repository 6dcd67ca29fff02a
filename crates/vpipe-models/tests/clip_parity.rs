//! Parity of the CLIP vision encoder with transformers' `CLIPVisionModel`.
//!
//! Fixtures: `tools/fixtures/make_clip_fixtures.py` (transformers 5.24.0, f32, CPU, seed 41001;
//! a tiny configuration with ViT-H/14's structure: width 32 = 4 heads × 8, MLP 64, 3 layers,
//! 56-px images in 14-px patches: 17 tokens). Cases: two random images; `penultimate` is
//! `hidden_states[-2]`, the features Wan's image-to-video pipeline takes.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use vpipe_models::clip::{ClipVisionEncoder, Config};
use vpipe_models::ops::max_abs_diff;

const TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clip")
        .join(name)
}

fn config() -> Config {
    Config::from_transformers_json(
        &std::fs::read_to_string(fixture("clip_vision_tiny_config.json")).unwrap(),
    )
    .unwrap()
}

fn cases() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("clip_cases.safetensors"), &Device::Cpu).unwrap()
}

/// The bound on max |vpipe − transformers| of `expected`: [`TOL`] in f32; in bf16, `share` of
/// the largest value (bf16 keeps 8 bits of mantissa, 0.4 % per rounding).
fn bound(expected: &Tensor, share: Option<f64>) -> f64 {
    match share {
        None => TOL,
        Some(share) => {
            share
                * f64::from(
                    expected
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                )
        }
    }
}

fn check(file: &str, device: &Device, dtype: DType, share: Option<f64>) {
    let encoder = ClipVisionEncoder::from_file(fixture(file), &config(), dtype, device).unwrap();
    let cases = cases();
    let pixels = cases["pixel_values"].to_device(device).unwrap();
    let f32_host = |t: Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let features = f32_host(encoder.image_features(&pixels).unwrap());
    for (key, made) in [
        ("penultimate", features),
        (
            "last_hidden_state",
            f32_host(encoder.hidden_states(&pixels, 3).unwrap()),
        ),
    ] {
        let expected = &cases[key];
        let (err, tol) = (
            max_abs_diff(&made, expected).unwrap(),
            bound(expected, share),
        );
        println!("{file} {dtype:?} on {device:?}: {key} max abs {err:.3e} (bound {tol:.1e})");
        assert!(err <= tol, "{file} {dtype:?}: {key} {err}");
    }
}

#[test]
fn transformers_layout_matches_clip_vision_model() {
    check(
        "clip_vision_tiny.safetensors",
        &Device::Cpu,
        DType::F32,
        None,
    );
    // bf16 on the CPU, with the bound the GPU is held to.
    check(
        "clip_vision_tiny.safetensors",
        &Device::Cpu,
        DType::BF16,
        Some(BF16_SHARE),
    );
}

#[test]
fn comfyui_layout_matches_clip_vision_model() {
    check(
        "clip_vision_tiny_comfy.safetensors",
        &Device::Cpu,
        DType::F32,
        None,
    );
}

/// The bf16 bound as a share of the largest feature: the H200 measured 1.3 % (0.237 of 17.7).
const BF16_SHARE: f64 = 0.025;

#[cfg(feature = "cuda")]
#[test]
fn cuda_matches_clip_vision_model() {
    let device = Device::new_cuda(0).unwrap();
    check("clip_vision_tiny.safetensors", &device, DType::F32, None);
    check(
        "clip_vision_tiny.safetensors",
        &device,
        DType::BF16,
        Some(BF16_SHARE),
    );
}

#[test]
fn vit_h_14_has_257_tokens_and_bad_inputs_are_named() {
    let cfg = Config::vit_h_14();
    assert_eq!(cfg.tokens(), 257);
    assert_eq!(cfg.hidden_size / cfg.num_heads, 80);
    let encoder = ClipVisionEncoder::from_file(
        fixture("clip_vision_tiny.safetensors"),
        &config(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for shape in [[2usize, 3, 28, 28], [1, 4, 56, 56], [0, 3, 56, 56]] {
        let err = encoder
            .image_features(&Tensor::zeros(&shape, DType::F32, &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("pixel_values"), "{shape:?}: {err}");
    }
    let err = encoder
        .hidden_states(&cases()["pixel_values"], 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 layers"), "{err}");
    let bad = Config::from_transformers_json(r#"{"hidden_size": 30, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 56, "patch_size": 14}"#)
        .unwrap_err()
        .to_string();
    assert!(bad.contains("heads"), "{bad}");
}
