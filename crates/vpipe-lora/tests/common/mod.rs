//! Fixture access shared by the integration tests.
//!
//! The fixtures in `tests/fixtures/lora/` were written by `tools/fixtures/make_lora_fixtures.py`
//! (torch 2.15.0, diffusers 0.42.1, peft 0.21.2; model seed 31001, LoRA seeds 31002..31007): a
//! tiny Wan 2.1 DiT (2 layers, dim 16, ffn 32, 4 channels in/out, text_dim 32, freq_dim 16)
//! under original Wan names, one LoRA file per key format, and the merged weights computed in
//! torch with ComfyUI's formula (`expected.safetensors`, `{case}/{weight}`), plus the weights
//! diffusers' own LoRA loading and `fuse_lora` produce (`xcheck_{file}_{strength}/{weight}`).
//! `lora_fixtures.json` there lists the cases.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Shape, Tensor};
use vpipe_lora::LoraFile;

/// Max |merged − expected| for f32 merges (the fixtures' torch f32 vs candle f32).
pub const TOL: f32 = 1e-6;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lora")
        .join(name)
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

/// The tiny DiT's weights, original Wan names, f32.
pub fn model() -> &'static HashMap<String, Tensor> {
    static M: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    M.get_or_init(|| load("dit_tiny_wan.safetensors"))
}

/// Name → shape of every model weight.
pub fn shapes() -> BTreeMap<String, Shape> {
    model()
        .iter()
        .map(|(k, v)| (k.clone(), v.shape().clone()))
        .collect()
}

/// `expected.safetensors`.
pub fn expected() -> &'static HashMap<String, Tensor> {
    static E: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    E.get_or_init(|| load("expected.safetensors"))
}

/// `{weight: tensor}` of one case of `expected.safetensors`.
pub fn case(case: &str) -> BTreeMap<String, Tensor> {
    let prefix = format!("{case}/");
    let out: BTreeMap<String, Tensor> = expected()
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v.clone())))
        .collect();
    assert!(!out.is_empty(), "no case {case} in expected.safetensors");
    out
}

/// `lora_{name}.safetensors`.
pub fn lora(name: &str) -> LoraFile {
    LoraFile::read(fixture(&format!("lora_{name}.safetensors"))).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
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

/// diffusers → original Wan name of a Wan 2.1 T2V DiT weight: the rename table of
/// the diffusers ↔ Wan key rename rule read backwards (written here so that this crate does
/// not depend on the DiT's key map).
pub fn diffusers_to_original(name: &str) -> Option<String> {
    const GLOBAL: [(&str, &str); 8] = [
        (
            "condition_embedder.time_embedder.linear_1",
            "time_embedding.0",
        ),
        (
            "condition_embedder.time_embedder.linear_2",
            "time_embedding.2",
        ),
        (
            "condition_embedder.text_embedder.linear_1",
            "text_embedding.0",
        ),
        (
            "condition_embedder.text_embedder.linear_2",
            "text_embedding.2",
        ),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("scale_shift_table", "head.modulation"),
        ("proj_out", "head.head"),
        ("patch_embedding", "patch_embedding"),
    ];
    const BLOCK: [(&str, &str); 18] = [
        ("attn1.to_q", "self_attn.q"),
        ("attn1.to_k", "self_attn.k"),
        ("attn1.to_v", "self_attn.v"),
        ("attn1.to_out.0", "self_attn.o"),
        ("attn1.norm_q", "self_attn.norm_q"),
        ("attn1.norm_k", "self_attn.norm_k"),
        ("attn2.to_q", "cross_attn.q"),
        ("attn2.to_k", "cross_attn.k"),
        ("attn2.to_v", "cross_attn.v"),
        ("attn2.to_out.0", "cross_attn.o"),
        ("attn2.norm_q", "cross_attn.norm_q"),
        ("attn2.norm_k", "cross_attn.norm_k"),
        ("ffn.net.0.proj", "ffn.0"),
        ("ffn.net.2", "ffn.2"),
        // The only block norm with weights: diffusers norm2 is original norm3.
        ("norm2", "norm3"),
        ("scale_shift_table", "modulation"),
        ("norm1", "norm1"),
        ("norm3", "norm2"),
    ];
    fn sub(name: &str, table: &[(&str, &str)]) -> Option<String> {
        table.iter().find_map(|(d, o)| {
            let tail = name.strip_prefix(d)?;
            (tail.is_empty() || tail.starts_with('.')).then(|| format!("{o}{tail}"))
        })
    }
    if let Some(n) = sub(name, &GLOBAL) {
        return Some(n);
    }
    let (i, rest) = name.strip_prefix("blocks.")?.split_once('.')?;
    Some(format!("blocks.{i}.{}", sub(rest, &BLOCK)?))
}
