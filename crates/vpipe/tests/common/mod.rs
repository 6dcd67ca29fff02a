//! Shared by the CLI test binaries (each uses part of it).
#![allow(dead_code)] // every test binary compiles this module and uses only some of it

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

/// A file of another crate's `tests/fixtures`, e.g. `fixture("vpipe-models", "dit/config.json")`.
pub fn fixture(crate_dir: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crate_dir)
        .join("tests/fixtures")
        .join(name)
}

/// Every tensor of a safetensors file.
pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Runs the built `vpipe` binary.
pub fn vpipe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vpipe"))
        .args(args)
        .output()
        .unwrap()
}

/// The names of a report's phases, in order.
pub fn phase_names(report: &serde_json::Value) -> Vec<String> {
    report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Largest element-wise difference.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    vpipe_models::ops::max_abs_diff(a, b).unwrap()
}

/// Runs `vpipe demo` into `dir` and returns the folder with its built-in model files.
pub fn builtin_models(dir: &Path) -> PathBuf {
    let run = vpipe(&["demo", "--steps", "2", "--out", dir.to_str().unwrap()]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    dir.join("weights")
}

/// `vpipe run` as the golden tests compare it with diffusers: the DiT, its config and the VAE
/// of `models` with the tiny umT5 and its tokenizer, the generator's `settings` (prompts, size,
/// frames), `steps` and `cfg`, UniPC, f32 on the CPU, from the initial noise `noise`, writing
/// `out`. Callers add what their reference sets beyond this (the shift, a report, ...).
pub fn golden_run_args(
    (dit, dit_config, vae): (&Path, &Path, &Path),
    settings: &serde_json::Value,
    (steps, cfg): (&str, &str),
    noise: &Path,
    out: &Path,
) -> Vec<String> {
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let text_encoder = fixture("vpipe-text", "umt5_tiny_transformers.safetensors");
    let tokenizer = fixture("vpipe-text", "tokenizer.json");
    [
        "run",
        "--dit",
        &path(dit),
        "--dit-config",
        &path(dit_config),
        "--vae",
        &path(vae),
        "--text-encoder",
        &path(&text_encoder),
        "--tokenizer",
        &path(&tokenizer),
        "--prompt",
        settings["prompt"].as_str().unwrap(),
        "--negative-prompt",
        settings["negative_prompt"].as_str().unwrap(),
        "--size",
        &format!("{}x{}", settings["width"], settings["height"]),
        "--frames",
        &settings["frames"].to_string(),
        "--steps",
        steps,
        "--cfg",
        cfg,
        "--sampler",
        "unipc",
        "--dtype",
        "f32",
        "--device",
        "cpu",
        "--initial-noise",
        &path(noise),
        "--out",
        &path(out),
    ]
    .map(str::to_owned)
    .to_vec()
}
