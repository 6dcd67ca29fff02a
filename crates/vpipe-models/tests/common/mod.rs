//! Fixture access shared by the parity test binaries (each uses a part of it).
#![allow(dead_code)] // every test binary compiles this module and uses only some of it

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// f32 tolerance against diffusers.
pub const TOL: f64 = 1e-4;

/// Where the models under test run: the first CUDA device when the tests are built with the
/// `cuda` feature (the GPU run of the same parity checks), else the CPU.
pub fn device() -> Device {
    if cfg!(feature = "cuda") {
        Device::new_cuda(0).expect("built with `cuda`: CUDA device 0")
    } else {
        Device::Cpu
    }
}

/// A file of `tests/fixtures/vae/`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vae")
        .join(name)
}

/// Every tensor of `vae_cases.safetensors`.
pub fn cases() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("vae_cases.safetensors"), &Device::Cpu).unwrap()
}

/// One tensor of the cases, by key.
pub fn case(cases: &HashMap<String, Tensor>, key: &str) -> Tensor {
    cases
        .get(key)
        .unwrap_or_else(|| panic!("fixture tensor {key} missing"))
        .clone()
}
