//! The tests of the user report vpipe started from (TEST 1–4: offloads that free memory, bounded VAE encodes, phases that start clean) on the CPU tiers, through `vpipe run` on
//! the demo's built-in Wan model (written first by `vpipe demo`). On the CPU the compute tier
//! is the host heap, measured by vpipe's counting allocator.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

mod common;
use common::{builtin_models, vpipe};

const MIB: u64 = 1 << 20;

/// A smooth 5-frame clip of `width`×`height` in [-1, 1].
fn clip(path: &Path, width: usize, height: usize) {
    let mut v = Vec::with_capacity(3 * 5 * height * width);
    for c in 0..3 {
        for f in 0..5 {
            for y in 0..height {
                for x in 0..width {
                    v.push(((x + 2 * f) as f32 / 9.0 + y as f32 / 13.0 + c as f32).sin() * 0.8);
                }
            }
        }
    }
    let t = Tensor::from_vec(v, (1, 3, 5, height, width), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("video_in".to_owned(), t)]), path).unwrap();
}

/// `vpipe run` video-to-video at 192×128 with VAE tiles of `tile` px; returns the report.
fn run_v2v(dir: &Path, models: &Path, tile: usize) -> serde_json::Value {
    let input = dir.join("clip.safetensors");
    if !input.exists() {
        clip(&input, 192, 128);
    }
    let report = dir.join(format!("report-{tile}.json"));
    let out = dir.join(format!("out-{tile}.safetensors"));
    let tile = tile.to_string();
    let run = vpipe(&[
        "run",
        "--model-dir",
        models.to_str().unwrap(),
        "--prompt",
        "waves at dusk",
        "--input",
        input.to_str().unwrap(),
        "--strength",
        "0.5",
        "--steps",
        "2",
        "--size",
        "192x128",
        "--frames",
        "5",
        "--tile",
        &tile,
        "--out",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

fn phase<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
}

#[test]
fn seed_tests_on_the_cpu_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let models = builtin_models(&dir.path().join("demo"));
    let small = run_v2v(dir.path(), &models, 64);
    let large = run_v2v(dir.path(), &models, 128);
    let whole = run_v2v(dir.path(), &models, 256);

    // TEST 1: every offload freed what it should — each move is verified by the meters, and
    // each model went back to disk in the phase that used it.
    let transitions = small["transitions"].as_array().unwrap();
    assert!(transitions.iter().all(|t| t["verified"] == true));
    for model in ["text encoder", "vae", "dit"] {
        let ups = transitions
            .iter()
            .filter(|t| t["model"] == model && t["from"] == "disk")
            .count();
        let downs = transitions
            .iter()
            .filter(|t| t["model"] == model && t["to"] == "disk")
            .count();
        assert!(
            ups > 0 && ups == downs,
            "{model}: {ups} loads, {downs} offloads"
        );
    }

    // TEST 3: each phase starts where the previous one ended, at the baseline plus the small
    // outputs the pipeline carries (text context, latents): nothing accumulates.
    let outputs: u64 = small["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["bytes"].as_u64().unwrap())
        .sum();
    for p in small["phases"].as_array().unwrap() {
        let exit = p["exit_above_baseline"].as_u64().unwrap();
        assert!(
            exit <= outputs + 4 * MIB,
            "phase {} ends {exit} B above baseline",
            p["name"]
        );
        assert_eq!(
            p["resident_compute_bytes"], 0,
            "phase {} ends with a model resident",
            p["name"]
        );
    }

    // TEST 2 and 4: the VAE encode peak follows the tile size, and tiles smaller than the
    // frame never process the full frame: 64-px tiles peak lower than 128-px tiles, which
    // peak lower than one 256-px tile covering the whole 192×128 frame.
    let peak = |r: &serde_json::Value| {
        phase(r, "vae encode")["peak_above_baseline"]
            .as_u64()
            .unwrap()
    };
    let (p64, p128, pwhole) = (peak(&small), peak(&large), peak(&whole));
    println!(
        "vae encode peaks above baseline: 64 px {p64} B, 128 px {p128} B, whole frame {pwhole} B"
    );
    assert!(
        p64 < p128 && p128 < pwhole,
        "encode peaks: 64 px {p64}, 128 px {p128}, whole frame {pwhole}"
    );
    let notes = small["notes"].to_string();
    assert!(
        notes.contains("tile 64 px, stride 48 px, balanced layout, 12 tile(s) of 56x64"),
        "{notes}"
    );
}
