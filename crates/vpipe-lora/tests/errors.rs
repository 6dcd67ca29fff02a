//! Nothing is skipped silently: every defect is an error that names the file and the keys.
//!
//! The model is the fixture DiT of `tools/fixtures/make_lora_fixtures.py` (dim 16, ffn 32).

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Shape, Tensor};
use vpipe_lora::{Error, LoraFile, MergePlan};

mod common;
use common::{diffusers_to_original, fixture, model, shapes};

fn t(dims: &[usize]) -> Tensor {
    Tensor::ones(dims, DType::F32, &Device::Cpu).unwrap()
}

fn scalar(v: f32) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn lora_file(pairs: Vec<(&str, Tensor)>) -> vpipe_lora::Result<LoraFile> {
    let tensors: HashMap<String, Tensor> =
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    LoraFile::from_tensors("bad.safetensors", tensors)
}

fn plan_err(lora: &LoraFile) -> Error {
    MergePlan::new(&[(lora, 1.0)], &shapes(), &diffusers_to_original).unwrap_err()
}

#[test]
fn unmatched_keys_are_all_listed() {
    let lora = lora_file(vec![
        (
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight",
            t(&[4, 16]),
        ),
        (
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight",
            t(&[16, 4]),
        ),
        // A block the model does not have, a typo, a bias delta of a bias-less weight,
        // a kohya name with no model weight, a diffusers name the map does not know.
        (
            "diffusion_model.blocks.7.self_attn.q.lora_A.weight",
            t(&[4, 16]),
        ),
        (
            "diffusion_model.blocks.7.self_attn.q.lora_B.weight",
            t(&[16, 4]),
        ),
        ("diffusion_model.blocks.0.self_attn.qq.diff", t(&[16, 16])),
        ("diffusion_model.blocks.0.self_attn.norm_q.diff_b", t(&[16])),
        (
            "lora_unet_blocks_0_self_attn_x.lora_down.weight",
            t(&[4, 16]),
        ),
        ("lora_unet_blocks_0_self_attn_x.lora_up.weight", t(&[16, 4])),
        (
            "transformer.blocks.0.attn1.to_qkv.lora_A.weight",
            t(&[4, 16]),
        ),
        (
            "transformer.blocks.0.attn1.to_qkv.lora_B.weight",
            t(&[48, 4]),
        ),
    ])
    .unwrap();
    let err = plan_err(&lora);
    let msg = err.to_string();
    eprintln!("{msg}");
    let Error::Unmatched { file, keys } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(file, "bad.safetensors");
    assert_eq!(keys.len(), 8);
    assert!(msg.starts_with("bad.safetensors: 8 LoRA key(s) match no model weight:"));
    for k in [
        "diffusion_model.blocks.7.self_attn.q.lora_A.weight",
        "diffusion_model.blocks.7.self_attn.q.lora_B.weight",
        "diffusion_model.blocks.0.self_attn.qq.diff",
        "diffusion_model.blocks.0.self_attn.norm_q.diff_b",
        "lora_unet_blocks_0_self_attn_x.lora_down.weight",
        "lora_unet_blocks_0_self_attn_x.lora_up.weight",
        "transformer.blocks.0.attn1.to_qkv.lora_A.weight",
        "transformer.blocks.0.attn1.to_qkv.lora_B.weight",
    ] {
        assert!(msg.contains(&format!("\n  {k}")), "{k} missing from: {msg}");
    }
    assert!(!msg.contains("blocks.0.self_attn.q.lora_A"), "{msg}");
}

#[test]
fn shape_mismatch_names_key_and_shapes() {
    // ffn.0 is [32, 16]; this pair makes [16, 16].
    let lora = lora_file(vec![
        ("diffusion_model.blocks.1.ffn.0.lora_A.weight", t(&[4, 16])),
        ("diffusion_model.blocks.1.ffn.0.lora_B.weight", t(&[16, 4])),
    ])
    .unwrap();
    let msg = plan_err(&lora).to_string();
    eprintln!("{msg}");
    assert_eq!(
        msg,
        "bad.safetensors: LoRA key diffusion_model.blocks.1.ffn.0.lora_B.weight has shape \
         up [16, 4] · down [4, 16] but model weight blocks.1.ffn.0.weight has shape [32, 16]"
    );

    let lora = lora_file(vec![("diffusion_model.blocks.0.norm3.diff", t(&[32]))]).unwrap();
    let msg = plan_err(&lora).to_string();
    assert_eq!(
        msg,
        "bad.safetensors: LoRA key diffusion_model.blocks.0.norm3.diff has shape [32] but \
         model weight blocks.0.norm3.weight has shape [16]"
    );

    // A conv pair whose kernel does not fit patch_embedding [16, 4, 1, 2, 2].
    let lora = lora_file(vec![
        (
            "diffusion_model.patch_embedding.lora_down.weight",
            t(&[2, 4, 1, 1, 1]),
        ),
        (
            "diffusion_model.patch_embedding.lora_up.weight",
            t(&[16, 2, 1, 1, 1]),
        ),
    ])
    .unwrap();
    assert!(matches!(plan_err(&lora), Error::ShapeMismatch { .. }));
}

#[test]
fn half_pairs_and_bad_alphas() {
    let err = lora_file(vec![
        (
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight",
            t(&[16, 4]),
        ),
        (
            "diffusion_model.blocks.0.self_attn.k.lora_down.weight",
            t(&[4, 16]),
        ),
        (
            "diffusion_model.blocks.0.self_attn.v.lora_A.weight",
            t(&[4, 16]),
        ),
        (
            "diffusion_model.blocks.0.self_attn.v.lora_B.weight",
            t(&[16, 4]),
        ),
        (
            "diffusion_model.blocks.0.self_attn.v.alpha",
            scalar(f32::NAN),
        ),
        (
            "diffusion_model.blocks.0.self_attn.o.lora_A.weight",
            t(&[4, 16]),
        ),
        (
            "diffusion_model.blocks.0.self_attn.o.lora_B.weight",
            t(&[16, 3]),
        ),
        ("diffusion_model.blocks.0.ffn.0.alpha", scalar(4.0)),
        ("diffusion_model.blocks.0.ffn.2.lora_A.weight", t(&[4, 32])),
        ("diffusion_model.blocks.0.ffn.2.lora_B.weight", t(&[16, 4])),
        ("diffusion_model.blocks.0.ffn.2.alpha", t(&[2])),
    ])
    .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    let Error::Malformed { file, problems } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(file, "bad.safetensors");
    assert_eq!(problems.len(), 6, "{problems:#?}");
    for needle in [
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight: up/lora_B without its down/lora_A",
        "diffusion_model.blocks.0.self_attn.k.lora_down.weight: down/lora_A without its up/lora_B",
        "diffusion_model.blocks.0.self_attn.v.alpha: alpha is NaN, not a finite number",
        "diffusion_model.blocks.0.self_attn.o.lora_B.weight: up [16, 3] and down [4, 16] disagree on the rank",
        "diffusion_model.blocks.0.ffn.0.alpha: alpha without a lora_A/lora_B pair",
        "diffusion_model.blocks.0.ffn.2.alpha: alpha must hold one number, has shape [2]",
    ] {
        assert!(msg.contains(needle), "{needle} missing from: {msg}");
    }
    let err = lora_file(vec![
        ("diffusion_model.head.head.lora_A.weight", t(&[2, 16])),
        ("diffusion_model.head.head.lora_B.weight", t(&[16, 2])),
        ("diffusion_model.head.head.alpha", scalar(f32::INFINITY)),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("alpha is inf"), "{err}");
}

#[test]
fn empty_and_unsupported() {
    let err = lora_file(vec![]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "bad.safetensors: the LoRA holds no patch (no lora_A/lora_B, lora_down/lora_up, diff \
         or diff_b key)"
    );
    // LoKr / DoRA / lora_mid / anything unknown: refused, all listed, never dropped.
    let err = lora_file(vec![
        (
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight",
            t(&[4, 16]),
        ),
        (
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight",
            t(&[16, 4]),
        ),
        (
            "diffusion_model.blocks.0.self_attn.q.dora_scale",
            t(&[16, 1]),
        ),
        ("diffusion_model.blocks.0.self_attn.k.lokr_w1", t(&[4, 4])),
        (
            "diffusion_model.blocks.0.self_attn.k.lora_mid.weight",
            t(&[4, 4]),
        ),
        ("something_else", t(&[1])),
    ])
    .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    let Error::UnsupportedKeys { keys, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        keys,
        &[
            "diffusion_model.blocks.0.self_attn.k.lokr_w1",
            "diffusion_model.blocks.0.self_attn.k.lora_mid.weight",
            "diffusion_model.blocks.0.self_attn.q.dora_scale",
            "something_else",
        ]
    );
    assert!(msg.starts_with("bad.safetensors: 4 key(s) are not a supported LoRA patch"));
}

#[test]
fn ambiguous_flat_name() {
    // `a.b_c` and `a_b.c` both flatten to `a_b_c`.
    let weights: BTreeMap<String, Shape> = [
        ("a.b_c.weight".to_string(), Shape::from((4, 4))),
        ("a_b.c.weight".to_string(), Shape::from((4, 4))),
    ]
    .into();
    let lora = lora_file(vec![
        ("lora_unet_a_b_c.lora_down.weight", t(&[1, 4])),
        ("lora_unet_a_b_c.lora_up.weight", t(&[4, 1])),
    ])
    .unwrap();
    let err = MergePlan::new(&[(&lora, 1.0)], &weights, &|_| None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "bad.safetensors: LoRA key lora_unet_a_b_c is ambiguous; it fits the model weights \
         [\"a.b_c.weight\", \"a_b.c.weight\"]"
    );
}

#[test]
fn one_weight_patched_twice_in_one_file() {
    // The same module under two namings, and a pair plus a diff on one weight.
    let lora = lora_file(vec![
        ("diffusion_model.blocks.0.ffn.2.lora_A.weight", t(&[2, 32])),
        ("diffusion_model.blocks.0.ffn.2.lora_B.weight", t(&[16, 2])),
        ("lora_unet_blocks_0_ffn_2.lora_down.weight", t(&[2, 32])),
        ("lora_unet_blocks_0_ffn_2.lora_up.weight", t(&[16, 2])),
    ])
    .unwrap();
    let err = plan_err(&lora);
    let Error::DuplicateTarget { weight, keys, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(weight, "blocks.0.ffn.2.weight");
    assert_eq!(keys.len(), 2);
    let lora = lora_file(vec![
        ("diffusion_model.head.head.lora_A.weight", t(&[2, 16])),
        ("diffusion_model.head.head.lora_B.weight", t(&[16, 2])),
        ("diffusion_model.head.head.diff", t(&[16, 16])),
    ])
    .unwrap();
    assert!(matches!(plan_err(&lora), Error::DuplicateTarget { .. }));
}

#[test]
fn bad_strength_and_wrong_weight_shape() {
    let lora = lora_file(vec![("diffusion_model.blocks.0.norm3.diff", t(&[16]))]).unwrap();
    let err = MergePlan::new(&[(&lora, f64::NAN)], &shapes(), &diffusers_to_original).unwrap_err();
    assert!(matches!(err, Error::Strength { .. }), "{err}");
    let plan = MergePlan::new(&[(&lora, 1.0)], &shapes(), &diffusers_to_original).unwrap();
    let err = plan.apply("blocks.0.norm3.weight", &t(&[17])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "model weight blocks.0.norm3.weight: the plan was made for shape [16], got [17]"
    );
    // Unpatched weights pass through untouched, whatever their shape.
    let w = &model()["blocks.0.norm3.bias"];
    assert_eq!(
        plan.apply("blocks.0.norm3.bias", w)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        w.to_vec1::<f32>().unwrap()
    );
}

#[test]
fn unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let err = LoraFile::read(&missing).unwrap_err();
    assert!(matches!(err, Error::Read { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("nope.safetensors: cannot read LoRA file"),
        "{err}"
    );

    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    assert!(matches!(LoraFile::read(&junk), Err(Error::Read { .. })));

    // The fixture's real diffusers file with its metadata switched to DoRA.
    let st = candle_core::safetensors::load(fixture("lora_diffusers.safetensors"), &Device::Cpu)
        .unwrap();
    let dora = dir.path().join("dora.safetensors");
    let meta = HashMap::from([(
        "lora_adapter_metadata".to_string(),
        r#"{"transformer.r": 4, "transformer.lora_alpha": 2, "transformer.use_dora": true}"#
            .to_string(),
    )]);
    safetensors::serialize_to_file(st.iter(), Some(meta), &dora).unwrap();
    let err = LoraFile::read(&dora).unwrap_err();
    assert_eq!(
        err.to_string(),
        "dora.safetensors: unsupported adapter metadata: transformer.use_dora = true is not \
         supported"
    );
}
