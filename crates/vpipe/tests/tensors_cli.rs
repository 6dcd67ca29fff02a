//! `vpipe tensors vae-encode|vae-decode` on the tiny VAE fixtures of vpipe-models.
//!
//! Fixtures: `crates/vpipe-models/tests/fixtures/vae/`, made by
//! `tools/fixtures/make_vae_fixtures.py` (diffusers 0.42.1 `AutoencoderKLWan`, base_dim 4,
//! weight seed 21001, f32 CPU). `vae_cases.safetensors` holds each clip's input video and
//! diffusers' outputs, including tiled encodes with tile 24 / stride 16 px.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vpipe-models/tests/fixtures/vae")
}

fn cases() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("vae_cases.safetensors"), &Device::Cpu).unwrap()
}

fn save(path: &Path, key: &str, t: &Tensor) {
    candle_core::safetensors::save(&HashMap::from([(key.to_owned(), t.clone())]), path).unwrap();
}

fn vpipe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vpipe"))
        .args(args)
        .output()
        .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
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

#[test]
fn tiled_encode_through_the_cli_matches_diffusers_tiled_encode() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    let input = dir.path().join("in.safetensors");
    save(&input, "video_in", &cases["t5_h40_w24.video"]);
    let output = dir.path().join("out.safetensors");
    let report = dir.path().join("report.json");
    for vae in ["wan_vae_tiny_wan.pth", "wan_vae_tiny_diffusers.safetensors"] {
        let run = vpipe(&[
            "tensors",
            "vae-encode",
            "--vae",
            fixtures().join(vae).to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--tile",
            "24",
            "--stride",
            "16",
            "--report",
            report.to_str().unwrap(),
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let encoded = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
        let diff = max_abs(
            &encoded["enc_mean"],
            &cases["t5_h40_w24.tiled.tile24_stride16.mean"],
        );
        assert!(diff <= 1e-4, "{vae}: max abs {diff}");
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        assert!(report["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["verified"] == true));
        assert_eq!(
            report["notes"][0]["detail"],
            "tile 24 px, stride 16 px, 6 tile(s), F32"
        );
    }
    assert!(dir.path().join("report.svg").exists());
}

#[test]
fn untiled_decode_through_the_cli_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    let input = dir.path().join("latents.safetensors");
    save(&input, "enc_mean", &cases["t9_h24_w16.mean"]);
    let output = dir.path().join("decoded.safetensors");
    let run = vpipe(&[
        "tensors",
        "vae-decode",
        "--vae",
        fixtures()
            .join("wan_vae_tiny_diffusers.safetensors")
            .to_str()
            .unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let decoded = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
    let diff = max_abs(&decoded["decoded"], &cases["t9_h24_w16.decoded"]);
    assert!(diff <= 1e-4, "max abs {diff}");
}

#[test]
fn bad_tensor_inputs_get_clear_errors_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    let vae = fixtures().join("wan_vae_tiny_wan.pth");
    let output = dir.path().join("out.safetensors");
    let cases_in = [
        // (key, tensor, expected words in the error)
        (
            "video_in",
            cases["t5_h40_w24.video"].narrow(2, 0, 4).unwrap(),
            "1 + 4k",
        ),
        (
            "video_in",
            cases["t5_h40_w24.video"].narrow(1, 0, 2).unwrap(),
            "channels",
        ),
        (
            "frames",
            cases["t5_h40_w24.video"].clone(),
            "no tensor 'video_in'",
        ),
    ];
    for (key, tensor, words) in cases_in {
        let input = dir.path().join("in.safetensors");
        save(&input, key, &tensor);
        let run = vpipe(&[
            "tensors",
            "vae-encode",
            "--vae",
            vae.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(words), "{stderr}");
        assert!(!output.exists(), "a failed run left {}", output.display());
    }
    let run = vpipe(&[
        "tensors",
        "vae-encode",
        "--vae",
        vae.to_str().unwrap(),
        "--input",
        "missing.safetensors",
        "--output",
        output.to_str().unwrap(),
        "--tile",
        "600",
    ]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("at most 512"));
}
