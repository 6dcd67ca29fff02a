//! Every LoRA key format merges to the weights ComfyUI's formula gives, and to the weights
//! diffusers' own LoRA loading + `fuse_lora` gives.
//!
//! Expected numbers: `tools/fixtures/make_lora_fixtures.py` (see `common/mod.rs` for versions
//! and seeds). Run with `--nocapture` to see the measured errors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vpipe_lora::{LoraBackend, LoraFile, MergePlan, Naming, PairStyle};

mod common;
use common::{case, diffusers_to_original, lora, max_abs_diff, model, shapes, TOL};

fn plan(loras: &[(&LoraFile, f64)]) -> MergePlan {
    MergePlan::new(loras, &shapes(), &diffusers_to_original).unwrap()
}

/// Merges every model weight with `plan` and checks: exactly the case's weights are patched,
/// each within `TOL` of the expected tensor, every other weight comes back bit-identical.
/// Returns the largest error.
fn check(plan: &MergePlan, case_name: &str) -> f32 {
    let expected = case(case_name);
    let patched: BTreeSet<&str> = plan.patched_weights().collect();
    let want: BTreeSet<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(patched, want, "{case_name}: patched weights");
    let mut worst = 0f32;
    for (name, w) in model() {
        let merged = plan.apply(name, w).unwrap();
        assert_eq!(merged.dtype(), DType::F32);
        match expected.get(name) {
            Some(e) => {
                let err = max_abs_diff(&merged, e);
                assert!(err <= TOL, "{case_name}: {name} off by {err}");
                check_row_merge(plan, name, w);
                // A patch that does nothing would pass a loose test on tiny deltas.
                assert!(
                    max_abs_diff(&merged, w) > 1e-3,
                    "{case_name}: {name} unchanged"
                );
                worst = worst.max(err);
            }
            None => assert_eq!(max_abs_diff(&merged, w), 0.0, "{case_name}: {name}"),
        }
    }
    plan.ensure_all_applied().unwrap();
    eprintln!(
        "{case_name}: {} weights, max abs err {worst:.3e}",
        want.len()
    );
    worst
}

/// [`MergePlan::apply_in_place`] (rows merged in the weight's own bytes) gives [`MergePlan::apply`]'s weight up
/// to f32 rounding, in f32, and within one rounding step in bf16 and f16.
fn check_row_merge(plan: &MergePlan, name: &str, w: &Tensor) {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let w = w.to_dtype(dtype).unwrap();
        let whole = plan.apply(name, &w).unwrap().to_dtype(DType::F32).unwrap();
        let mut out = safetensors::View::data(&w).into_owned();
        assert!(
            plan.apply_in_place(name, dtype, &mut out).unwrap(),
            "{name}"
        );
        let rows = Tensor::from_raw_buffer(&out, dtype, w.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let largest = max_abs_diff(&whole, &whole.zeros_like().unwrap());
        let step = match dtype {
            DType::F32 => 1e-6,
            DType::BF16 => 2f32.powi(-7),
            _ => 2f32.powi(-10),
        };
        let err = max_abs_diff(&rows, &whole);
        assert!(err <= step * largest.max(1.0), "{name} {dtype:?}: {err}");
    }
}

#[test]
fn peft_alpha_not_rank() {
    let f = lora("peft");
    assert_eq!(f.namings(), BTreeSet::from([Naming::Original]));
    let p = plan(&[(&f, 1.0)]);
    let s = &p.summary()[0];
    assert_eq!((s.pairs, s.diffs, s.bias_diffs), (20, 0, 0));
    assert_eq!(s.ranks, BTreeSet::from([4]));
    assert_eq!(s.alphas, vec![3.0]);
    assert_eq!(s.pair_styles, BTreeSet::from([PairStyle::Peft]));
    eprintln!("{s}");
    check(&p, "peft_1");
}

#[test]
fn unprefixed_original_names() {
    // DiffSynth-style keys without a prefix: tried as original and as diffusers names.
    let all =
        candle_core::safetensors::load(common::fixture("lora_peft.safetensors"), &Device::Cpu)
            .unwrap();
    let bare: HashMap<String, Tensor> = all
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("diffusion_model.").unwrap().to_string(), v))
        .collect();
    let f = LoraFile::from_tensors("bare.safetensors", bare).unwrap();
    assert_eq!(f.namings(), BTreeSet::from([Naming::Bare]));
    check(&plan(&[(&f, 1.0)]), "peft_1");
}

#[test]
fn strength_scales_the_delta() {
    let f = lora("peft");
    for (strength, name) in [(0.7, "peft_0.7"), (-1.5, "peft_-1.5")] {
        check(&plan(&[(&f, strength)]), name);
    }
    // Strength 0 patches the same weights and leaves them as they were (up to the f32 round
    // trip, which is exact).
    let p = plan(&[(&f, 0.0)]);
    for name in p.patched_weights() {
        let w = &model()[name];
        assert_eq!(max_abs_diff(&p.apply(name, w).unwrap(), w), 0.0);
    }
}

#[test]
fn down_up_conv_and_global_layers() {
    // bf16 on disk, `model.diffusion_model.` prefix, conv patch_embedding [16, 4, 1, 2, 2],
    // head.head, text_embedding.0, time_projection.1 without alpha.
    let f = lora("downup");
    let p = plan(&[(&f, 1.0)]);
    let s = &p.summary()[0];
    assert_eq!(s.pair_styles, BTreeSet::from([PairStyle::DownUp]));
    assert_eq!(s.alphas, vec![0.5, 1.5]);
    assert_eq!(s.pairs_without_alpha, 1);
    assert!(p.is_patched("patch_embedding.weight"));
    eprintln!("{s}");
    check(&p, "downup_1");
}

#[test]
fn diff_and_diff_b() {
    // norm3 diff + diff_b, norm_q diff, modulation diff (no `.weight` suffix), bias diffs of a
    // Linear and of the conv, and a pair next to a diff_b on the same module.
    let f = lora("diff");
    let p = plan(&[(&f, 1.0)]);
    let s = &p.summary()[0];
    assert_eq!((s.pairs, s.diffs, s.bias_diffs), (1, 3, 4));
    for w in [
        "blocks.0.norm3.weight",
        "blocks.0.norm3.bias",
        "blocks.1.modulation",
        "patch_embedding.bias",
    ] {
        assert!(p.is_patched(w), "{w}");
    }
    check(&p, "diff_1");
    check(&plan(&[(&f, 0.4)]), "diff_0.4");
}

#[test]
fn kohya_flat_names() {
    let f = lora("kohya");
    assert_eq!(f.namings(), BTreeSet::from([Naming::KohyaFlat]));
    check(&plan(&[(&f, 0.8)]), "kohya_0.8");
}

#[test]
fn wan_fun_double_underscore() {
    let f = lora("wanfun");
    assert_eq!(f.namings(), BTreeSet::from([Naming::WanFun]));
    check(&plan(&[(&f, 1.0)]), "wanfun_1");
}

#[test]
fn diffusers_native_with_metadata_alpha_and_bias() {
    // `transformer.` names resolved through the diffusers → original map; alpha 2 / rank 4
    // comes from the header's lora_adapter_metadata; lora_B.bias scaled like the pair.
    let f = lora("diffusers");
    assert_eq!(f.namings(), BTreeSet::from([Naming::Diffusers]));
    let p = plan(&[(&f, 1.2)]);
    let s = &p.summary()[0];
    assert_eq!((s.pairs, s.bias_diffs), (4, 4));
    assert_eq!(s.alphas, vec![2.0]);
    check(&p, "diffusers_1.2");
}

#[test]
fn two_loras_summed() {
    let (peft, diff, kohya) = (lora("peft"), lora("diff"), lora("kohya"));
    // Overlap on blocks.0.cross_attn.q.weight (pair + pair).
    check(
        &plan(&[(&peft, 0.7), (&diff, 1.3)]),
        "two_peft_0.7_diff_1.3",
    );
    // Full overlap, one negative strength.
    check(
        &plan(&[(&peft, 0.5), (&kohya, -0.8)]),
        "two_peft_0.5_kohya_-0.8",
    );
}

#[test]
fn bf16_weight_merged_in_f32() {
    let f = lora("peft");
    let p = plan(&[(&f, 0.7)]);
    let expected = case("bf16_peft_0.7");
    let mut worst = 0f32;
    let mut bf16_differs = false;
    for name in p.patched_weights() {
        let w16 = model()[name].to_dtype(DType::BF16).unwrap();
        let merged = p.apply(name, &w16).unwrap();
        assert_eq!(merged.dtype(), DType::BF16);
        // The same merge of the same (bf16-valued) weight in f32, rounded once.
        let via_f32 = p
            .apply(name, &w16.to_dtype(DType::F32).unwrap())
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(max_abs_diff(&merged, &via_f32), 0.0, "{name}");
        // torch: (w.bfloat16().float() + delta).bfloat16(). The f32 sums may differ in the
        // last f32 bit, which can move a bf16 rounding by one step: allow one bf16 ulp.
        let e = &expected[name];
        assert_eq!(e.dtype(), DType::BF16);
        let err = max_abs_diff(&merged, e);
        let ulp = e
            .to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            / 128.0;
        assert!(err <= ulp, "{name}: {err} > one bf16 ulp {ulp}");
        worst = worst.max(err);
        // A merge that rounds the delta to bf16 before adding gives other numbers: the
        // checks above tell the two apart.
        let w32 = w16.to_dtype(DType::F32).unwrap();
        let delta16 = (p.apply(name, &w32).unwrap() - &w32)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let in_bf16 = (&w16 + &delta16).unwrap();
        bf16_differs |= max_abs_diff(&in_bf16, &merged) > 0.0;
    }
    assert!(
        bf16_differs,
        "bf16 arithmetic would give the same result: weak test"
    );
    eprintln!("bf16: max abs err vs torch {worst:.3e}");
}

#[test]
fn f16_weight_merged_and_cast_back() {
    let f = lora("wanfun");
    let p = plan(&[(&f, 1.0)]);
    for name in p.patched_weights() {
        let w = model()[name].to_dtype(DType::F16).unwrap();
        let merged = p.apply(name, &w).unwrap();
        assert_eq!(merged.dtype(), DType::F16);
        let via_f32 = p
            .apply(name, &w.to_dtype(DType::F32).unwrap())
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        assert_eq!(max_abs_diff(&merged, &via_f32), 0.0, "{name}");
    }
}

/// diffusers' result for the same file and strength: every weight diffusers changed must
/// match our merge. Returns the weights diffusers left alone that we patch.
fn cross_check(file: &str, strength: &str) -> Vec<String> {
    let f = lora(file);
    let p = plan(&[(&f, strength.parse().unwrap())]);
    let fused = case(&format!("xcheck_lora_{file}_{strength}"));
    let mut worst = 0f32;
    for (name, want) in &fused {
        assert!(p.is_patched(name), "diffusers changed {name}, we do not");
        let err = max_abs_diff(&p.apply(name, &model()[name]).unwrap(), want);
        assert!(err <= TOL, "{file}: {name} off by {err} from diffusers");
        worst = worst.max(err);
    }
    eprintln!(
        "{file} @ {strength} vs diffusers fuse_lora: {} weights, max abs err {worst:.3e}",
        fused.len()
    );
    p.patched_weights()
        .filter(|w| !fused.contains_key(*w))
        .map(str::to_string)
        .collect()
}

#[test]
fn diffusers_cross_check() {
    assert!(cross_check("peft", "0.7").is_empty());
    assert!(cross_check("kohya", "0.8").is_empty());
    assert!(cross_check("diffusers", "1.2").is_empty());
    // diffusers drops norm diffs ("just zeroed values"), the modulation diff and
    // patch_embedding.diff_b (`_convert_non_diffusers_wan_lora_to_diffusers`); ComfyUI and we
    // apply them (checked against the formula in `diff_and_diff_b`).
    assert_eq!(
        cross_check("diff", "1.0"),
        [
            "blocks.0.norm3.bias",
            "blocks.0.norm3.weight",
            "blocks.1.modulation",
            "blocks.1.self_attn.norm_q.weight",
            "patch_embedding.bias",
        ]
    );
}

#[test]
fn var_builder_gets_merged_weights() {
    let f = lora("peft");
    let plan = Arc::new(plan(&[(&f, 0.7)]));
    let expected = case("peft_0.7");
    // A ComfyUI-style checkpoint prefix stays below the wrapped builder.
    let checkpoint: HashMap<String, Tensor> = model()
        .iter()
        .map(|(k, v)| (format!("model.diffusion_model.{k}"), v.clone()))
        .collect();
    let vb = VarBuilder::from_tensors(checkpoint, DType::F32, &Device::Cpu);
    let vb = LoraBackend::wrap(vb.pp("model.diffusion_model"), plan.clone());
    assert_eq!(plan.unapplied().len(), 20);
    for (name, w) in model() {
        // The way a layer asks: through a prefix path and a shape.
        let (path, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let got = if path.is_empty() {
            vb.get(w.shape(), leaf).unwrap()
        } else {
            vb.pp(path).get(w.shape(), leaf).unwrap()
        };
        let want = expected.get(name).unwrap_or(w);
        assert!(max_abs_diff(&got, want) <= TOL, "{name}");
    }
    plan.ensure_all_applied().unwrap();
}

#[test]
fn var_builder_over_renamed_diffusers_checkpoint() {
    // The DiT loader's situation: the checkpoint has diffusers names under a prefix, the model
    // asks for original names through `rename_f`, and LoRA goes on top of that.
    let to_diffusers: BTreeMap<String, String> = (0..2)
        .flat_map(|i| {
            [
                ("self_attn.q", "attn1.to_q"),
                ("cross_attn.o", "attn2.to_out.0"),
                ("ffn.2", "ffn.net.2"),
            ]
            .map(|(o, d)| {
                (
                    format!("blocks.{i}.{o}.weight"),
                    format!("blocks.{i}.{d}.weight"),
                )
            })
        })
        .collect();
    for (o, d) in &to_diffusers {
        assert_eq!(diffusers_to_original(d).as_deref(), Some(o.as_str()));
    }
    let checkpoint: HashMap<String, Tensor> = to_diffusers
        .iter()
        .map(|(o, d)| (format!("model.{d}"), model()[o].clone()))
        .collect();
    let map = to_diffusers.clone();
    let vb = VarBuilder::from_tensors(checkpoint, DType::F32, &Device::Cpu)
        .rename_f(move |n: &str| format!("model.{}", map.get(n).map_or(n, String::as_str)));
    let shapes = to_diffusers
        .keys()
        .map(|o| (o.clone(), model()[o].shape().clone()))
        .collect();
    let f = lora("kohya");
    let err = MergePlan::new(&[(&f, 0.8)], &shapes, &diffusers_to_original).unwrap_err();
    // This model lacks most modules the kohya file patches: refused, not skipped.
    assert!(matches!(err, vpipe_lora::Error::Unmatched { .. }), "{err}");

    let f = lora("peft");
    let kept: HashMap<String, Tensor> = {
        let all =
            candle_core::safetensors::load(common::fixture("lora_peft.safetensors"), &Device::Cpu)
                .unwrap();
        all.into_iter()
            .filter(|(k, _)| {
                to_diffusers.keys().any(|o| {
                    k.starts_with(&format!(
                        "diffusion_model.{}.",
                        o.trim_end_matches(".weight")
                    ))
                })
            })
            .collect()
    };
    assert_eq!(kept.len(), 6 * 3);
    let sub = LoraFile::from_tensors(f.name(), kept).unwrap();
    let plan = Arc::new(MergePlan::new(&[(&sub, 0.7)], &shapes, &diffusers_to_original).unwrap());
    let vb = LoraBackend::wrap(vb, plan.clone());
    let expected = case("peft_0.7");
    for o in to_diffusers.keys() {
        let got = vb.get(model()[o].shape(), o).unwrap();
        assert!(max_abs_diff(&got, &expected[o]) <= TOL, "{o}");
    }
    plan.ensure_all_applied().unwrap();
}

#[test]
fn unloaded_weights_are_reported() {
    let f = lora("wanfun");
    let plan = Arc::new(plan(&[(&f, 1.0)]));
    let vb = LoraBackend::wrap(
        VarBuilder::from_tensors(model().clone(), DType::F32, &Device::Cpu),
        plan.clone(),
    );
    let w = "blocks.0.self_attn.o.weight";
    vb.get(model()[w].shape(), w).unwrap();
    let err = plan.ensure_all_applied().unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("2 patched weight(s) were never loaded"),
        "{msg}"
    );
    assert!(msg.contains("blocks.0.cross_attn.k.weight"), "{msg}");
    assert!(msg.contains("blocks.1.ffn.0.weight"), "{msg}");
    assert!(!msg.contains(w), "{msg}");
}

#[test]
fn scaled_fp8_weights_stay_float8_with_their_scale() {
    // ComfyUI "fp8 scaled": w8 = w / scale in float8 e4m3, scale = absmax / 448.
    let p = plan(&[(&lora("peft"), 1.0)]);
    let expected = case("peft_1");
    let weights = model();
    let mut checked = 0;
    for name in p.patched_weights() {
        let w = &weights[name];
        let scale = (w.abs().unwrap().max_all().unwrap() / 448.0).unwrap();
        let w8 = w
            .broadcast_div(&scale)
            .unwrap()
            .to_dtype(DType::F8E4M3)
            .unwrap();
        let dequant = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .broadcast_mul(&scale)
                .unwrap()
        };
        let merged = p.apply_scaled_fp8(name, &w8, &scale).unwrap();
        assert_eq!(merged.dtype(), DType::F8E4M3, "{name}");
        // The delta the fixture merges, added to the weight the fp8 file holds, saturated
        // at ±448 · scale: the merged float8 weight is that up to float8's rounding (3
        // mantissa bits: half a step is 1/16 of the value, 2^-10 · scale in the subnormals).
        let delta = (&expected[name] - w).unwrap();
        let s = scale.to_scalar::<f32>().unwrap() as f64;
        let want = (dequant(&w8) + delta)
            .unwrap()
            .clamp(-448.0 * s, 448.0 * s)
            .unwrap();
        let bound = ((want.abs().unwrap() / 16.0).unwrap() + s / 1024.0).unwrap();
        let within = |merged: &Tensor, how: &str| {
            let got = dequant(merged);
            let err = (&got - &want).unwrap().abs().unwrap();
            let over = (err - &bound)
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                over <= 1e-7,
                "{name} {how}: off by {over} beyond float8 rounding"
            );
            assert!(
                max_abs_diff(&got, &dequant(&w8)) > 1e-3,
                "{name} {how}: unchanged"
            );
        };
        within(&merged, "as a tensor");
        // The same merge in place on the weight's bytes (as the store merges a weight where
        // it read it), with the same scale: within the same bound, and the same bytes but
        // where the two sums' order moved a value across a rounding boundary.
        let bits = |t: &Tensor| -> Vec<u8> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<float8::F8E4M3>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        let mut bytes = bits(&w8);
        assert!(p
            .apply_in_place_scaled_fp8(name, s as f32, &mut bytes)
            .unwrap());
        let in_place = Tensor::from_vec(
            bytes
                .iter()
                .map(|&b| float8::F8E4M3::from_bits(b))
                .collect::<Vec<_>>(),
            w8.shape(),
            &Device::Cpu,
        )
        .unwrap();
        within(&in_place, "in place");
        let same = bits(&merged)
            .iter()
            .zip(&bytes)
            .filter(|(a, b)| a == b)
            .count();
        assert!(
            same * 100 >= bytes.len() * 99,
            "{name}: {same} of {} bytes",
            bytes.len()
        );
        checked += 1;
    }
    assert!(checked > 0);
    // A weight the plan does not patch comes back as it was.
    let untouched = weights
        .keys()
        .find(|n| !p.patched_weights().any(|q| q == n.as_str()))
        .unwrap();
    let w8 = weights[untouched.as_str()].to_dtype(DType::F8E4M3).unwrap();
    let one = Tensor::new(1f32, &Device::Cpu).unwrap();
    let mut bytes = vec![0u8; w8.elem_count()];
    assert!(!p
        .apply_in_place_scaled_fp8(untouched, 1.0, &mut bytes)
        .unwrap());
    assert!(
        bytes.iter().all(|&b| b == 0),
        "a weight not patched was written"
    );
    let same = p.apply_scaled_fp8(untouched, &w8, &one).unwrap();
    assert_eq!(
        max_abs_diff(
            &same.to_dtype(DType::F32).unwrap(),
            &w8.to_dtype(DType::F32).unwrap()
        ),
        0.0
    );
}
