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
