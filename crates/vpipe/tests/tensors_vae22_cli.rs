//! `vpipe tensors vae-encode|vae-decode` on the Wan 2.2 VAE fixtures of vpipe-models: the VAE
//! recognised from the file, its tiles on its 16-px grid.
//!
//! Fixtures: `crates/vpipe-models/tests/fixtures/vae22/`, made by
//! `tools/fixtures/make_vae22_fixtures.py` (diffusers 0.42.1 `AutoencoderKLWan` with the Wan 2.2
//! structure, base_dim 4, z_dim 12, patch 2, f32 CPU). The 5-frame 48×80 clip has diffusers'
//! tiled encode and decode for `enable_tiling(32, 32, 16, 16)` and `(48, 48, 16, 16)`; diffusers
//! tiles its encode over the video folded into 2×2 patches, so its `enable_tiling(T, T, S, S)`
//! encode is vpipe's `--tile 2T --stride 2S`, and its decode `--tile T --stride S`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

mod common;
use common::{max_abs, vpipe};

/// The bound on max |vpipe − diffusers| (the parity tests measure 2e-6).
const TOL: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    common::fixture("vpipe-models", "vae22").join(name)
}

fn cases() -> HashMap<String, Tensor> {
    common::load(&fixture("vae22_cases.safetensors"))
}

fn save(path: &Path, key: &str, t: &Tensor) {
    candle_core::safetensors::save(&HashMap::from([(key.to_owned(), t.clone())]), path).unwrap();
}

/// `vpipe tensors OP --vae (the tiny Wan 2.2 VAE) --input IN --output OUT` plus `extra`.
fn tensors(op: &str, input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    let vae = fixture("wan22_vae_tiny_diffusers.safetensors");
    let mut args = vec![
        "tensors",
        op,
        "--vae",
        vae.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--device",
        "cpu",
        "--dtype",
        "f32",
    ];
    args.extend_from_slice(extra);
    vpipe(&args)
}

fn run_ok(op: &str, input: &Path, output: &Path, extra: &[&str]) -> HashMap<String, Tensor> {
    let run = tensors(op, input, output, extra);
    assert!(
        run.status.success(),
        "{op} {extra:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    common::load(output)
}

#[test]
fn the_wan22_vae_encodes_and_decodes_through_the_cli_as_diffusers_does_tiled() {
    let cases = cases();
    let dir = tempfile::tempdir().unwrap();
    let video_in = dir.path().join("video_in.safetensors");
    save(&video_in, "video_in", &cases["t5_h48_w80.video"]);
    let mean_in = dir.path().join("enc_mean.safetensors");
    save(&mean_in, "enc_mean", &cases["t5_h48_w80.mean"]);
    let out = dir.path().join("out.safetensors");
    for (setting, tile, stride) in [("tile32_stride16", 32, 16), ("tile48_stride16", 48, 16)] {
        let expected = |what: &str| &cases[&format!("t5_h48_w80.tiled.{setting}.{what}")];
        let (tile2, stride2) = ((2 * tile).to_string(), (2 * stride).to_string());
        let encoded = run_ok(
            "vae-encode",
            &video_in,
            &out,
            &[
                "--tile",
                &tile2,
                "--stride",
                &stride2,
                "--tile-layout",
                "diffusers",
            ],
        );
        let err = max_abs(&encoded["enc_mean"], expected("mean"));
        println!("{setting} encode: max |vpipe - diffusers| {err:.3e}");
        assert!(err <= TOL, "{setting} encode: {err:.3e}");
        let (tile, stride) = (tile.to_string(), stride.to_string());
        let decoded = run_ok(
            "vae-decode",
            &mean_in,
            &out,
            &[
                "--tile",
                &tile,
                "--stride",
                &stride,
                "--tile-layout",
                "diffusers",
            ],
        );
        let err = max_abs(&decoded["decoded"], expected("decoded"));
        println!("{setting} decode: max |vpipe - diffusers| {err:.3e}");
        assert!(err <= TOL, "{setting} decode: {err:.3e}");
    }
    // The report names the tiles that ran: laid over the video folded into 2x2 patches (a
    // tile every 8 folded px from the corner, 16 wide, edge tiles cut), in video pixels.
    let report = dir.path().join("report.json");
    run_ok(
        "vae-decode",
        &mean_in,
        &out,
        &[
            "--tile",
            "32",
            "--stride",
            "16",
            "--tile-layout",
            "diffusers",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let tiles = report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["what"] == "vae tiles")
        .and_then(|n| n["detail"].as_str())
        .unwrap();
    assert!(
        tiles.contains("15 tile(s) of 16x16/16x32/32x16/32x32"),
        "{tiles}"
    );
    // Untiled: a tile that covers the frame.
    let encoded = run_ok("vae-encode", &video_in, &out, &["--tile", "96"]);
    let err = max_abs(&encoded["enc_mean"], &cases["t5_h48_w80.mean"]);
    assert!(err <= TOL, "untiled encode: {err:.3e}");
    // A tile without --stride gets a stride on the 16-px grid (3/4 of 80 is 60, not on it).
    run_ok("vae-encode", &video_in, &out, &["--tile", "80"]);
}

#[test]
fn tiles_off_the_wan22_grid_and_files_that_are_not_a_vae_are_bad_input() {
    let cases = cases();
    let dir = tempfile::tempdir().unwrap();
    let video_in = dir.path().join("video_in.safetensors");
    save(&video_in, "video_in", &cases["t5_h48_w80.video"]);
    let out = dir.path().join("out.safetensors");
    for (extra, needle) in [
        (vec!["--tile", "40"], "--tile 40"),
        (vec!["--tile", "64", "--stride", "24"], "--stride 24"),
    ] {
        let run = tensors("vae-encode", &video_in, &out, &extra);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(needle) && stderr.contains("multiple of 16"),
            "{stderr}"
        );
    }
    // A DiT given as --vae.
    let dit = common::fixture(
        "vpipe-models",
        "dit_ti2v/dit_tiny_ti2v_diffusers.safetensors",
    );
    let run = vpipe(&[
        "tensors",
        "vae-encode",
        "--vae",
        dit.to_str().unwrap(),
        "--input",
        video_in.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--vae") && stderr.contains("VAE"),
        "{stderr}"
    );
    assert!(!out.exists());
}
