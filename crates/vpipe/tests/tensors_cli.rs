//! `vpipe tensors vae-encode|vae-decode` on the tiny VAE fixtures of vpipe-models.
//!
//! Fixtures: `crates/vpipe-models/tests/fixtures/vae/`, made by
//! `tools/fixtures/make_vae_fixtures.py` (diffusers 0.42.1 `AutoencoderKLWan`, base_dim 4,
//! weight seed 21001, f32 CPU). `vae_cases.safetensors` holds each clip's input video and
//! diffusers' outputs, including tiled encodes with tile 24 / stride 16 px.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

mod common;
use common::{max_abs, vpipe};

fn fixtures() -> PathBuf {
    common::fixture("vpipe-models", "vae")
}

fn cases() -> HashMap<String, Tensor> {
    common::load(&fixtures().join("vae_cases.safetensors"))
}

fn save(path: &Path, key: &str, t: &Tensor) {
    candle_core::safetensors::save(&HashMap::from([(key.to_owned(), t.clone())]), path).unwrap();
}

/// `vpipe tensors vae-encode --vae VAE --input IN --output OUT` plus `extra` flags.
fn encode(vae: &Path, input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "tensors",
        "vae-encode",
        "--vae",
        vae.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    vpipe(&args)
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
        let run = encode(
            &fixtures().join(vae),
            &input,
            &output,
            &[
                "--tile",
                "24",
                "--stride",
                "16",
                "--tile-layout",
                "diffusers",
                "--report",
                report.to_str().unwrap(),
            ],
        );
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
            "tile 24 px, stride 16 px, diffusers layout, 6 tile(s) of 8x8/8x24/24x8/24x24, F32"
        );
        // The chart gets a reading after each of the 6 tiles, besides the 4 of the two moves.
        let phase = &report["phases"][1];
        let start = phase["entry"]["t_ms"].as_f64().unwrap();
        let end = phase["exit"]["t_ms"].as_f64().unwrap();
        let inside = report["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["t_ms"].as_f64().unwrap())
            .filter(|t| *t > start && *t < end)
            .count();
        assert_eq!(inside, 6 + 4, "{phase}");
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
        let run = encode(&vae, &input, &output, &[]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(words), "{stderr}");
        assert!(!output.exists(), "a failed run left {}", output.display());
    }
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, b"\x40\x00\x00\x00\x00\x00\x00\x00{\"video_in\"").unwrap();
    let run = encode(&vae, &truncated, &output, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("truncated.safetensors") && !stderr.contains("panicked"));
    let run = encode(
        &vae,
        Path::new("missing.safetensors"),
        &output,
        &["--tile", "600"],
    );
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("at most 512"));
}

/// `--vram-budget` without `--tile`: the tile is chosen from a per-pixel model measured on three
/// crops, the run stays inside the budget, and a budget too small for the smallest tile is a
/// refusal (exit code 3). Input: a seeded 5×128×160 ramp clip (made here), tiny fixture VAE.
#[test]
fn an_automatic_tile_keeps_the_budget_or_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let values: Vec<f32> = (0..3 * 5 * 128 * 160u64)
        .map(|i: u64| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let video = Tensor::from_vec(values, (1, 3, 5, 128, 160), &Device::Cpu).unwrap();
    save(&input, "video_in", &video);
    let output = dir.path().join("out.safetensors");
    let report = dir.path().join("report.json");
    let vae = fixtures().join("wan_vae_tiny_wan.pth");
    let with_budget = |budget: &str| {
        encode(
            &vae,
            &input,
            &output,
            &[
                "--vram-budget",
                budget,
                "--report",
                report.to_str().unwrap(),
            ],
        )
    };
    let run = with_budget("20MiB");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let notes: Vec<&str> = report_json["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["what"].as_str().unwrap())
        .collect();
    assert_eq!(
        notes,
        ["vae tile calibration", "vae tile choice", "vae tiles"]
    );
    let phase = &report_json["phases"][1];
    assert_eq!(phase["name"], "vae encode");
    assert!(
        phase["peak_above_baseline"].as_u64().unwrap() <= 20 << 20,
        "{phase}"
    );
    assert!(report_json["violations"].as_array().unwrap().is_empty());

    let refused = with_budget("2MiB");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("64-px tile"), "{stderr}");
}
