//! Parity of the candle umT5 encoder with transformers' `UMT5EncoderModel`, and its loading
//! errors.
//!
//! Every expected number here was made by `tools/fixtures/make_umt5_fixtures.py`
//! (transformers 5.24.0, torch 2.15.0, fp32, CPU; weight seed 31001, input seed 31002): a tiny
//! `UMT5EncoderModel` with umT5's structure (d_model 32, d_kv 8, 4 heads, d_ff 48, 2 layers,
//! vocab 768, 32 buckets, max_distance 128, gated-gelu) whose parameters are all re-initialised
//! from that seed, run on (a) seeded ids of length 192 with true lengths 150 and 41 (every
//! bucket, log and saturated ones included) and (b) two prompts through the HF tokenizer padded
//! to 512. References are `last_hidden_state` with the rows past each true length zeroed
//! (diffusers' trim + zero-pad). The script also checked that Wan's own `T5Encoder` (wan22
//! 2.2.11) on the original-named weights gives exactly transformers' (eager) output (max abs 0.0); see
//! `tests/fixtures/umt5_fixtures.json`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vpipe_text::tokenizer::{Encoded, PromptTokenizer};
use vpipe_text::umt5::{relative_position_bucket, Config, Umt5Encoder};
use vpipe_text::Error;

/// f32 tolerance against transformers.
const TOL: f32 = 1e-4;

/// bf16 bound (max abs vs the f32 reference). torch itself, running the same model in bf16,
/// is off by 0.071 max abs (umt5_fixtures.json, `torch_bf16_vs_fp32_max_abs`), for outputs
/// of max abs 3.8; the bound leaves about twice that.
const BF16_TOL: f32 = 0.15;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn cases() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("umt5_cases.safetensors"), &Device::Cpu).unwrap()
}

fn case(c: &HashMap<String, Tensor>, key: &str) -> Tensor {
    c.get(key)
        .unwrap_or_else(|| panic!("fixture tensor {key} missing"))
        .clone()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn tiny_config() -> Config {
    Config {
        vocab_size: 768,
        d_model: 32,
        d_kv: 8,
        d_ff: 48,
        num_layers: 2,
        num_heads: 4,
        ..Config::umt5_xxl()
    }
}

fn load(file: &str, dtype: DType) -> Umt5Encoder {
    Umt5Encoder::from_file(fixture(file), None, dtype, &Device::Cpu).unwrap()
}

/// Runs case `name` and returns the max abs error against its reference.
fn error(enc: &Umt5Encoder, name: &str, reference: &str) -> f32 {
    let c = cases();
    let h = enc
        .forward(
            &case(&c, &format!("{name}.input_ids")),
            &case(&c, &format!("{name}.attention_mask")),
        )
        .unwrap();
    assert_eq!(h.dtype(), enc.dtype());
    max_abs_diff(&h, &case(&c, &format!("{name}.{reference}")))
}

macro_rules! f32_parity {
    ($($test:ident: $file:literal, $case:literal;)*) => {$(
        /// f32 output vs transformers ≤ 1e-4 max abs (fixtures from
        /// `tools/fixtures/make_umt5_fixtures.py`, weight seed 31001).
        #[test]
        fn $test() {
            let enc = load($file, DType::F32);
            assert_eq!(enc.config(), &tiny_config());
            let e = error(&enc, $case, "last_hidden_state");
            eprintln!("{} {}: max abs {e:.2e}", $file, $case);
            assert!(e <= TOL, "{} {}: max abs {e} > {TOL}", $file, $case);
        }
    )*};
}

f32_parity! {
    transformers_names_random_ids: "umt5_tiny_transformers.safetensors", "random";
    transformers_names_prompts: "umt5_tiny_transformers.safetensors", "prompt";
    comfy_f16_file_random_ids: "umt5_tiny_comfy.safetensors", "random";
    comfy_f16_file_prompts: "umt5_tiny_comfy.safetensors", "prompt";
    wan_names_random_ids: "umt5_tiny_wan.pth", "random";
    wan_names_prompts: "umt5_tiny_wan.pth", "prompt";
}

/// bf16 weights and compute vs the f32 reference, within [`BF16_TOL`]; the error is also
/// reported next to torch's own bf16 error on the same model.
#[test]
fn bf16_run_is_close_to_f32_reference() {
    let enc = load("umt5_tiny_transformers.safetensors", DType::BF16);
    let e = error(&enc, "random", "last_hidden_state");
    let torch = error(&enc, "random", "last_hidden_state_bf16");
    eprintln!("bf16: vs f32 reference {e:.3e}, vs torch bf16 {torch:.3e}");
    assert!(e <= BF16_TOL, "bf16 max abs {e} > {BF16_TOL}");
}

/// f16 runs too (with the fp16 clamp path); on this small model it stays within the bf16 bound.
#[test]
fn f16_run_is_close_to_f32_reference() {
    let enc = load("umt5_tiny_comfy.safetensors", DType::F16);
    let e = error(&enc, "random", "last_hidden_state");
    eprintln!("f16: vs f32 reference {e:.3e}");
    assert!(e <= BF16_TOL, "f16 max abs {e} > {BF16_TOL}");
}

/// Rows past each true length are exactly zero; the others are not.
#[test]
fn padding_rows_are_zero() {
    let c = cases();
    let enc = load("umt5_tiny_transformers.safetensors", DType::F32);
    let h = enc
        .forward(
            &case(&c, "random.input_ids"),
            &case(&c, "random.attention_mask"),
        )
        .unwrap();
    let rows = h.abs().unwrap().sum(2).unwrap().to_vec2::<f32>().unwrap();
    for (b, true_len) in [(0, 150), (1, 41)] {
        assert!(rows[b][..true_len].iter().all(|&s| s > 0.0), "row {b}");
        assert!(rows[b][true_len..].iter().all(|&s| s == 0.0), "row {b}");
    }
}

/// The config from `config.json` equals the one read from the shapes, and loading with it
/// gives the same output.
#[test]
fn config_json_matches_shapes() {
    let cfg_path = fixture("umt5_tiny_config.json");
    assert_eq!(Config::from_json_file(&cfg_path).unwrap(), tiny_config());
    let enc = Umt5Encoder::from_file(
        fixture("umt5_tiny_wan.pth"),
        Some(&cfg_path),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(error(&enc, "random", "last_hidden_state") <= TOL);
}

/// transformers' `_relative_position_bucket` (encoder, 32 buckets, max distance 128) for
/// relative positions -600..=600, as saved by the fixture script.
#[test]
fn buckets_match_transformers() {
    let c = cases();
    let rel = case(&c, "buckets.relative_position")
        .to_vec1::<i64>()
        .unwrap();
    let want = case(&c, "buckets.bucket").to_vec1::<i64>().unwrap();
    for (r, w) in rel.iter().zip(&want) {
        assert_eq!(
            i64::from(relative_position_bucket(*r, 32, 128)),
            *w,
            "relative position {r}"
        );
    }
}

/// Tokenizer → encoder: our tokenizer's ids for the two prompts (from tokenizer.json) are the
/// fixture's, and so is the encoder output.
#[test]
fn tokenizer_then_encoder() {
    let c = cases();
    let tok = PromptTokenizer::from_tokenizer_json(fixture("tokenizer.json")).unwrap();
    let cases_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tokenizer_cases.json")).unwrap())
            .unwrap();
    let text = |name: &str| {
        cases_json["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let encoded: Vec<Encoded> = ["english", "chinese_negative"]
        .iter()
        .map(|n| tok.encode(&text(n)).unwrap())
        .collect();
    let (ids, mask) = Encoded::to_tensors(&encoded, &Device::Cpu).unwrap();
    let want_ids = case(&c, "prompt.input_ids").to_dtype(DType::U32).unwrap();
    assert_eq!(
        ids.to_vec2::<u32>().unwrap(),
        want_ids.to_vec2::<u32>().unwrap()
    );
    let want_mask = case(&c, "prompt.attention_mask")
        .to_dtype(DType::U32)
        .unwrap();
    assert_eq!(
        mask.to_vec2::<u32>().unwrap(),
        want_mask.to_vec2::<u32>().unwrap()
    );
    let enc = load("umt5_tiny_comfy.safetensors", DType::F32);
    let h = enc.forward(&ids, &mask).unwrap();
    let e = max_abs_diff(&h, &case(&c, "prompt.last_hidden_state"));
    assert!(e <= TOL, "max abs {e}");
}

/// A ComfyUI full-checkpoint prefix is stripped; both embedding names are accepted.
#[test]
fn prefixed_checkpoint_loads() {
    let weights =
        candle_core::safetensors::load(fixture("umt5_tiny_transformers.safetensors"), &Device::Cpu)
            .unwrap();
    let prefixed: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, v)| (format!("text_encoders.umt5xxl.transformer.{k}"), v))
        .collect();
    let enc =
        Umt5Encoder::from_checkpoint(VarBuilder::from_tensors(prefixed, DType::F32, &Device::Cpu))
            .unwrap();
    assert!(error(&enc, "random", "last_hidden_state") <= TOL);
}

// ---- Bad input ---------------------------------------------------------------------------------

fn write_safetensors(dir: &tempfile::TempDir, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let path = dir.path().join(name);
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

#[test]
fn file_without_umt5_keys_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let path = write_safetensors(&dir, "vae.safetensors", &[("encoder.conv1.weight", t)]);
    let err = Umt5Encoder::from_file(&path, None, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::UnknownLayout { .. }), "{err:?}");
    let msg = err.to_string();
    for want in [
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "blocks.0.attn.q.weight",
        "text_encoders.umt5xxl.transformer.",
    ] {
        assert!(msg.contains(want), "{msg}");
    }
}

#[test]
fn missing_embedding_names_it() {
    let weights =
        candle_core::safetensors::load(fixture("umt5_tiny_transformers.safetensors"), &Device::Cpu)
            .unwrap();
    let no_emb: HashMap<String, Tensor> = weights
        .into_iter()
        .filter(|(k, _)| k != "shared.weight")
        .collect();
    let err =
        Umt5Encoder::from_checkpoint(VarBuilder::from_tensors(no_emb, DType::F32, &Device::Cpu))
            .unwrap_err()
            .to_string();
    assert!(err.contains("shared.weight"), "{err}");
}

/// ComfyUI's "fp8 scaled" text encoders (`umt5_xxl_fp8_e4m3fn_scaled`): block matrices in
/// float8 e4m3fn with a per-tensor `scale_weight`. Fixture: `tools/fixtures/
/// make_umt5_fp8_fixture.py` (transformers on the dequantised weights, f32).
#[test]
fn fp8_scaled_checkpoint_matches_transformers_on_dequantised_weights() {
    let enc = Umt5Encoder::from_file(
        fixture("umt5_tiny_fp8.safetensors"),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let cases =
        candle_core::safetensors::load(fixture("umt5_cases.safetensors"), &Device::Cpu).unwrap();
    let expected =
        candle_core::safetensors::load(fixture("umt5_fp8_cases.safetensors"), &Device::Cpu)
            .unwrap();
    let out = enc
        .forward(&cases["prompt.input_ids"], &cases["prompt.attention_mask"])
        .unwrap();
    let err = (out - &expected["prompt.last_hidden_state"])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("fp8 scaled: max abs {err:.3e}");
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn unsupported_extension_is_refused() {
    let err = Umt5Encoder::from_file("umt5.gguf", None, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::UnsupportedFile { .. }), "{err:?}");
}

#[test]
fn bad_forward_inputs_are_refused() {
    let enc = load("umt5_tiny_transformers.safetensors", DType::F32);
    let dev = Device::Cpu;
    let ids = Tensor::zeros((2, 8), DType::U32, &dev).unwrap();
    let mask = Tensor::ones((2, 7), DType::U32, &dev).unwrap();
    let err = enc.forward(&ids, &mask).unwrap_err();
    assert!(matches!(err, Error::MaskShape { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("[2, 8]") && msg.contains("[2, 7]"), "{msg}");

    let flat = Tensor::zeros(8, DType::U32, &dev).unwrap();
    let err = enc.forward(&flat, &flat).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Rank {
                tensor: "input_ids",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("[B, L]"), "{err}");

    let big = Tensor::new(&[[5u32, 768]], &dev).unwrap();
    let err = enc.forward(&big, &big.ones_like().unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("input_ids[0][1] = 768") && err.to_string().contains("0..768"),
        "{err}"
    );

    let float_ids = Tensor::zeros((1, 4), DType::F32, &dev).unwrap();
    let err = enc.forward(&float_ids, &float_ids).unwrap_err();
    assert!(matches!(err, Error::InputDType { .. }), "{err:?}");
}
