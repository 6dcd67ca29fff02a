//! `vpipe tensors dit` and `vpipe tensors schedule` against the diffusers fixtures of
//! vpipe-models (`tools/fixtures/make_dit_fixtures.py`: tiny `WanTransformer3DModel`, f32, seed
//! 31001) and vpipe-sampling (`tools/fixtures/make_sampling_fixtures.py`: diffusers 0.42.1
//! schedulers driven with seeded model outputs).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

mod common;
use common::{load, max_abs, vpipe};

fn fixture(crate_dir: &str, name: &str) -> std::path::PathBuf {
    common::fixture(
        crate_dir,
        name.strip_prefix("tests/fixtures/").unwrap_or(name),
    )
}

#[test]
fn dit_through_the_cli_matches_diffusers_in_both_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let cases = load(&fixture("vpipe-models", "dit/dit_cases.safetensors"));
    let report = dir.path().join("report.json");
    for file in ["dit_tiny_wan.safetensors", "dit_tiny_diffusers.safetensors"] {
        let run = dit_run(dir.path(), file, &["--report", report.to_str().unwrap()]);
        assert!(
            run.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let out = &load(&dir.path().join("out.safetensors"))["out"];
        let err = max_abs(out, &cases["batch2.out"]);
        assert!(err <= 1e-4, "{file}: max abs {err}");
        // The phases are recorded: the model came and went through the store.
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let phases: Vec<_> = report["phases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(phases, ["load", "dit", "write"]);
    }
}

#[test]
fn dit_input_without_a_key_is_bad_input_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let t = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("timestep".to_owned(), t)]), &input).unwrap();
    let dit = fixture(
        "vpipe-models",
        "tests/fixtures/dit/dit_tiny_diffusers.safetensors",
    );
    let run = vpipe(&[
        "tensors",
        "dit",
        "--dit",
        dit.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        dir.path().join("o.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("'hidden_states'") && stderr.contains("'encoder_hidden_states'"),
        "{stderr}"
    );
}

#[test]
fn schedule_through_the_cli_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let cases = load(&fixture(
        "vpipe-sampling",
        "tests/fixtures/sampling_cases.safetensors",
    ));
    for (sampler, shift, steps, case) in [
        ("euler", "5", 10, "euler_s5_n10"),
        ("unipc", "3", 30, "unipc_s3_n30"),
    ] {
        let expected = &cases[&format!("{case}.samples")];
        let input = dir.path().join("in.safetensors");
        let x0 = expected.get(0).unwrap();
        let outputs = cases["model_outputs"].narrow(0, 0, steps).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("x0".to_owned(), x0), ("model_outputs".to_owned(), outputs)]),
            &input,
        )
        .unwrap();
        let output = dir.path().join("out.safetensors");
        let run = vpipe(&[
            "tensors",
            "schedule",
            "--sampler",
            sampler,
            "--shift",
            shift,
            "--steps",
            &steps.to_string(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        assert!(
            run.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let got = load(&output);
        for key in ["samples", "sigmas", "timesteps"] {
            let want = cases[&format!("{case}.{key}")]
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            let err = max_abs(&got[key], &want);
            assert!(err <= 1e-5, "{case} {key}: max abs {err}");
        }
    }
    let run = vpipe(&[
        "tensors",
        "schedule",
        "--sampler",
        "ddim",
        "--shift",
        "3",
        "--steps",
        "4",
        "--input",
        "x",
        "--output",
        "y",
    ]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("--sampler ddim"));
}

/// `vpipe tensors dit` with the batch2 inputs of the DiT fixtures, plus `extra` flags.
fn dit_run(dir: &Path, file: &str, extra: &[&str]) -> std::process::Output {
    let dit = fixture("vpipe-models", &format!("tests/fixtures/dit/{file}"));
    dit_run_file(dir, &dit, extra)
}

/// [`dit_run`] on the DiT checkpoint at `dit`.
fn dit_run_file(dir: &Path, dit: &Path, extra: &[&str]) -> std::process::Output {
    let cases = load(&fixture(
        "vpipe-models",
        "tests/fixtures/dit/dit_cases.safetensors",
    ));
    let input = dir.join("in.safetensors");
    let inputs: HashMap<String, Tensor> = ["hidden_states", "timestep", "encoder_hidden_states"]
        .into_iter()
        .map(|k| (k.to_owned(), cases[&format!("batch2.{k}")].clone()))
        .collect();
    candle_core::safetensors::save(&inputs, &input).unwrap();
    let config = fixture("vpipe-models", "tests/fixtures/dit/config.json");
    let output = dir.join("out.safetensors");
    let mut args = vec![
        "tensors",
        "dit",
        "--dit",
        dit.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    vpipe(&args)
}

#[test]
fn dit_with_a_comfy_lora_matches_diffusers_with_merged_weights() {
    // make_dit_fixtures.py: rank 4, alpha 3, strength 0.8 on self/cross q,k,v,o and ffn.0/2 of
    // both blocks. out_lora = diffusers with W + 0.8 · 3/4 · B·A; out_fp8_lora = the same delta
    // merged into the fp8 file's dequantised weights, each stored back as float8 with its own
    // scale (RNE, saturating at 448), then dequantised for diffusers.
    let dir = tempfile::tempdir().unwrap();
    let cases = load(&fixture(
        "vpipe-models",
        "tests/fixtures/dit/dit_cases.safetensors",
    ));
    let lora = fixture(
        "vpipe-models",
        "tests/fixtures/dit/lora_tiny_peft.safetensors",
    );
    let report = dir.path().join("report.json");
    let merged_in_f32 = "20 weights merged as they are read from disk\"";
    let kept_fp8 =
        "20 weights merged as they are read from disk (20 of them scaled fp8, kept in float8)";
    for (file, expected, other, note) in [
        ("dit_tiny_wan.safetensors", "out_lora", "out", merged_in_f32),
        (
            "dit_tiny_diffusers.safetensors",
            "out_lora",
            "out",
            merged_in_f32,
        ),
        // The fp8 rounding of the merged weights is visible: out_lora is another answer.
        (
            "dit_tiny_wan_fp8.safetensors",
            "out_fp8_lora",
            "out_lora",
            kept_fp8,
        ),
    ] {
        let run = dit_run(
            dir.path(),
            file,
            &[
                "--lora",
                lora.to_str().unwrap(),
                "--lora-strength",
                "0.8",
                "--report",
                report.to_str().unwrap(),
            ],
        );
        assert!(
            run.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let out = &load(&dir.path().join("out.safetensors"))["out"];
        let err = max_abs(out, &cases[&format!("batch2.{expected}")]);
        println!("{file} with the LoRA: max abs {err:.3e}");
        assert!(err <= 1e-4, "{file}: max abs {err}");
        // The test can fail: the nearest wrong answer is far.
        assert!(max_abs(out, &cases[&format!("batch2.{other}")]) > 1e-2);
        let text = std::fs::read_to_string(&report).unwrap();
        assert!(
            text.contains("lora_tiny_peft.safetensors at strength 0.8"),
            "{text}"
        );
        assert!(text.contains(note), "{file}: {text}");
    }
}

#[test]
fn a_lora_that_matches_no_weight_is_bad_input_listing_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let lora = dir.path().join("stray.safetensors");
    let t =
        |shape: (usize, usize)| Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([
            (
                "diffusion_model.blocks.9.self_attn.q.lora_A.weight".to_owned(),
                t((4, 32)),
            ),
            (
                "diffusion_model.blocks.9.self_attn.q.lora_B.weight".to_owned(),
                t((32, 4)),
            ),
        ]),
        &lora,
    )
    .unwrap();
    let run = dit_run(
        dir.path(),
        "dit_tiny_wan.safetensors",
        &["--lora", lora.to_str().unwrap()],
    );
    assert_eq!(
        run.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("blocks.9.self_attn.q") && stderr.contains("stray.safetensors"),
        "{stderr}"
    );
}

#[test]
fn text_encode_through_the_cli_matches_transformers() {
    // make_umt5_fixtures.py: tiny UMT5EncoderModel (transformers 5.24.0, f32), two prompts
    // padded to 512, output trimmed to each prompt's length and zero-padded.
    let dir = tempfile::tempdir().unwrap();
    let cases = load(&fixture(
        "vpipe-text",
        "tests/fixtures/umt5_cases.safetensors",
    ));
    let input = dir.path().join("in.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([
            ("input_ids".to_owned(), cases["prompt.input_ids"].clone()),
            (
                "attention_mask".to_owned(),
                cases["prompt.attention_mask"].clone(),
            ),
        ]),
        &input,
    )
    .unwrap();
    let config = fixture("vpipe-text", "tests/fixtures/umt5_tiny_config.json");
    let output = dir.path().join("out.safetensors");
    for (file, with_config) in [
        ("umt5_tiny_transformers.safetensors", true),
        ("umt5_tiny_comfy.safetensors", false),
    ] {
        let encoder = fixture("vpipe-text", &format!("tests/fixtures/{file}"));
        let mut args = vec![
            "tensors",
            "text-encode",
            "--text-encoder",
            encoder.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ];
        if with_config {
            args.extend_from_slice(&["--config", config.to_str().unwrap()]);
        }
        let run = vpipe(&args);
        assert!(
            run.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let out = &load(&output)["last_hidden_state"];
        let err = max_abs(out, &cases["prompt.last_hidden_state"]);
        assert!(err <= 1e-4, "{file}: max abs {err}");
    }
}

/// A plain float8 e4m3 checkpoint (no scales, as some exporters write them) gives what its f32
/// twin holding the same values gives: its weights are taken with a scale of exactly 1.
#[test]
fn a_plain_fp8_dit_matches_its_f32_twin() {
    let dir = tempfile::tempdir().unwrap();
    let scaled = load(&fixture("vpipe-models", "dit/dit_tiny_wan_fp8.safetensors"));
    let mut plain = HashMap::new();
    let mut twin = HashMap::new();
    for (key, tensor) in &scaled {
        if key.ends_with("scale_weight") || key == "scaled_fp8" {
            continue;
        }
        plain.insert(key.clone(), tensor.clone());
        let f32 = tensor.to_dtype(candle_core::DType::F32).unwrap();
        twin.insert(key.clone(), f32);
    }
    assert!(plain
        .values()
        .any(|t| t.dtype() == candle_core::DType::F8E4M3));
    let mut outs = Vec::new();
    for (name, tensors) in [("plain", &plain), ("twin", &twin)] {
        let path = dir.path().join(format!("{name}.safetensors"));
        candle_core::safetensors::save(tensors, &path).unwrap();
        let run = dit_run_file(dir.path(), &path, &[]);
        assert!(
            run.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        outs.push(load(&dir.path().join("out.safetensors"))["out"].clone());
    }
    let err = max_abs(&outs[0], &outs[1]);
    assert!(err <= 1e-5, "plain fp8 against its f32 twin: max abs {err}");

    // Kept in float8 as the scaled file is: the phase's peak is the scaled file's, not that
    // plus a converted copy of the weights (4 bytes for each float8 one).
    let report = dir.path().join("report.json");
    let peak = |dit: &Path| {
        let run = dit_run_file(dir.path(), dit, &["--report", report.to_str().unwrap()]);
        assert!(run.status.success());
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let dit_phase = report["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "dit")
            .unwrap()
            .clone();
        dit_phase["peak_above_baseline"].as_i64().unwrap()
    };
    let fp8_bytes: usize = plain
        .values()
        .filter(|t| t.dtype() == candle_core::DType::F8E4M3)
        .map(|t| t.elem_count())
        .sum();
    let scaled_file = fixture("vpipe-models", "dit/dit_tiny_wan_fp8.safetensors");
    let (plain_peak, scaled_peak) = (
        peak(&dir.path().join("plain.safetensors")),
        peak(&scaled_file),
    );
    assert!(
        (plain_peak - scaled_peak).unsigned_abs() < 2 * fp8_bytes as u64,
        "dit phase peak: plain fp8 {plain_peak} B, scaled fp8 {scaled_peak} B ({fp8_bytes} B of float8 weights)"
    );
}

/// The float8 checkpoints through the store onto the GPU (pinned host copy, upload, the
/// model's per-layer dequantisation): ComfyUI's scaled fp8 against diffusers with the
/// dequantised weights, alone and with a LoRA merged as the weights are read, and a plain fp8
/// file against its f32 twin, in f32 and bf16.
#[cfg(feature = "cuda")]
#[test]
fn fp8_checkpoints_run_on_the_gpu_through_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let cases = load(&fixture("vpipe-models", "dit/dit_cases.safetensors"));
    let lora = fixture("vpipe-models", "dit/lora_tiny_peft.safetensors");
    let lora = lora.to_str().unwrap();
    let out = || load(&dir.path().join("out.safetensors"))["out"].clone();
    let run_ok = |dit: &Path, extra: &[&str]| {
        let run = dit_run_file(dir.path(), dit, extra);
        assert!(
            run.status.success(),
            "{} {extra:?}: {}",
            dit.display(),
            String::from_utf8_lossy(&run.stderr)
        );
    };
    let scaled = fixture("vpipe-models", "dit/dit_tiny_wan_fp8.safetensors");
    for (dtype, share) in [("f32", None), ("bf16", Some(0.05))] {
        for (extra, expected) in [
            (vec![], "out_fp8"),
            (
                vec!["--lora", lora, "--lora-strength", "0.8"],
                "out_fp8_lora",
            ),
        ] {
            let mut args = vec!["--device", "cuda:0", "--dtype", dtype];
            args.extend(extra);
            run_ok(&scaled, &args);
            let expected = &cases[&format!("batch2.{expected}")];
            let bound = match share {
                None => 1e-4,
                Some(share) => share * max_abs(expected, &expected.zeros_like().unwrap()),
            };
            let err = max_abs(&out(), expected);
            println!(
                "scaled fp8 on cuda:0, {dtype} {args:?}: max abs {err:.3e} (bound {bound:.1e})"
            );
            assert!(err <= bound, "{dtype} {args:?}: max abs {err}");
        }
    }

    let mut plain = HashMap::new();
    let mut twin = HashMap::new();
    for (key, tensor) in load(&scaled) {
        if key.ends_with("scale_weight") || key == "scaled_fp8" {
            continue;
        }
        twin.insert(
            key.clone(),
            tensor.to_dtype(candle_core::DType::F32).unwrap(),
        );
        plain.insert(key, tensor);
    }
    let mut outs = Vec::new();
    for (name, tensors) in [("plain", &plain), ("twin", &twin)] {
        let path = dir.path().join(format!("{name}.safetensors"));
        candle_core::safetensors::save(tensors, &path).unwrap();
        run_ok(&path, &["--device", "cuda:0", "--dtype", "f32"]);
        outs.push(out());
    }
    let err = max_abs(&outs[0], &outs[1]);
    println!("plain fp8 on cuda:0 against its f32 twin: max abs {err:.3e}");
    assert!(
        err <= 1e-4,
        "plain fp8 against its f32 twin on cuda:0: {err}"
    );
}

/// A plain float8 e5m2 DiT (candle has no e5m2 dtype; the store reads each byte as the f16 it
/// is the high byte of) gives what its f32 twin holding the same values gives.
#[test]
fn a_plain_e5m2_dit_matches_its_f32_twin() {
    use safetensors::tensor::TensorView;
    let dir = tempfile::tempdir().unwrap();
    let original = load(&fixture("vpipe-models", "dit/dit_tiny_wan.safetensors"));
    // name → (e5m2 bytes and shape) for the block matrices; every tensor's f32 twin.
    let mut e5m2: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    let mut twin = HashMap::new();
    let mut f32_bytes: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (key, tensor) in &original {
        let values: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        let shape = tensor.dims().to_vec();
        if key.contains("blocks.") && shape.len() == 2 {
            let bytes: Vec<u8> = values
                .iter()
                .map(|&v| (half::f16::from_f32(v).to_bits() >> 8) as u8)
                .collect();
            let exact: Vec<f32> = bytes
                .iter()
                .map(|&b| half::f16::from_bits(u16::from(b) << 8).to_f32())
                .collect();
            twin.insert(
                key.clone(),
                Tensor::from_vec(exact, shape.clone(), &Device::Cpu).unwrap(),
            );
            e5m2.push((key.clone(), bytes, shape));
        } else {
            twin.insert(key.clone(), tensor.clone());
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            f32_bytes.push((key.clone(), bytes, shape));
        }
    }
    assert!(!e5m2.is_empty());
    let plain = dir.path().join("plain_e5m2.safetensors");
    let views = e5m2
        .iter()
        .map(|(k, b, s)| {
            (
                k.clone(),
                TensorView::new(safetensors::Dtype::F8_E5M2, s.clone(), b).unwrap(),
            )
        })
        .chain(f32_bytes.iter().map(|(k, b, s)| {
            (
                k.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        }));
    safetensors::serialize_to_file(views, None, &plain).unwrap();
    let twin_path = dir.path().join("twin.safetensors");
    candle_core::safetensors::save(&twin, &twin_path).unwrap();
    let mut outs = Vec::new();
    for path in [&plain, &twin_path] {
        let run = dit_run_file(dir.path(), path, &[]);
        assert!(
            run.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&run.stderr)
        );
        outs.push(load(&dir.path().join("out.safetensors"))["out"].clone());
    }
    let err = max_abs(&outs[0], &outs[1]);
    assert!(
        err <= 1e-5,
        "plain e5m2 against its f32 twin: max abs {err}"
    );
}

#[test]
fn clip_vision_through_the_cli_matches_transformers() {
    // make_clip_fixtures.py: tiny CLIPVisionModel (transformers 5.24.0, f32); the features are
    // hidden_states[-2]. Without --config the encoder is ViT-H/14, which the tiny file is not.
    let dir = tempfile::tempdir().unwrap();
    let cases = load(&fixture(
        "vpipe-models",
        "tests/fixtures/clip/clip_cases.safetensors",
    ));
    let input = dir.path().join("in.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([("pixel_values".to_owned(), cases["pixel_values"].clone())]),
        &input,
    )
    .unwrap();
    let config = fixture(
        "vpipe-models",
        "tests/fixtures/clip/clip_vision_tiny_config.json",
    );
    let output = dir.path().join("out.safetensors");
    for file in [
        "clip_vision_tiny.safetensors",
        "clip_vision_tiny_comfy.safetensors",
    ] {
        let encoder = fixture("vpipe-models", &format!("tests/fixtures/clip/{file}"));
        let run = |with_config: bool| {
            let mut args = vec![
                "tensors",
                "clip-vision",
                "--clip-vision",
                encoder.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
            ];
            if with_config {
                args.extend_from_slice(&["--config", config.to_str().unwrap()]);
            }
            vpipe(&args)
        };
        let ok = run(true);
        assert!(
            ok.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let out = &load(&output)["image_features"];
        let err = max_abs(out, &cases["penultimate"]);
        assert!(err <= 1e-4, "{file}: max abs {err}");
        std::fs::remove_file(&output).unwrap();
        // As ViT-H/14 the tiny weights have the wrong shapes: bad input, no output.
        let wrong = run(false);
        assert_eq!(wrong.status.code(), Some(2), "{file}");
        assert!(!output.exists());
    }
}

/// A CLIP vision encoder of 12.6 MB (width 256, 4 layers, seeded random weights) under a
/// budget below its resident need: its layers stream, the report says so, and the features
/// equal the resident run's bit for bit.
#[test]
fn clip_vision_streams_its_layers_under_a_small_budget() {
    use candle_core::DType;
    let dir = tempfile::tempdir().unwrap();
    let config = vpipe_models::clip::Config {
        hidden_size: 256,
        intermediate_size: 1024,
        num_layers: 4,
        num_heads: 4,
        image_size: 56,
        ..vpipe_models::clip::Config::vit_h_14()
    };
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    vpipe_models::clip::ClipVisionEncoder::new(&config, vb.pp("vision_model")).unwrap();
    for (i, var) in varmap.all_vars().iter().enumerate() {
        let shape = var.shape().clone();
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|j| (((i * 7919 + j * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        var.set(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap())
            .unwrap();
    }
    let encoder = dir.path().join("clip.safetensors");
    varmap.save(&encoder).unwrap();
    let config_file = dir.path().join("config.json");
    std::fs::write(
        &config_file,
        r#"{"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_channels": 3, "image_size": 56, "patch_size": 14,
            "hidden_act": "gelu", "layer_norm_eps": 1e-05}"#,
    )
    .unwrap();
    let input = dir.path().join("in.safetensors");
    let pixels = Tensor::randn(0f32, 1.0, (2, 3, 56, 56), &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("pixel_values".to_owned(), pixels)]),
        &input,
    )
    .unwrap();
    let run = |name: &str, budget: Option<&str>| {
        let output = dir.path().join(format!("{name}.safetensors"));
        let report = dir.path().join(format!("{name}.json"));
        let mut args = vec![
            "tensors",
            "clip-vision",
            "--clip-vision",
            encoder.to_str().unwrap(),
            "--config",
            config_file.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ];
        if let Some(budget) = budget {
            args.extend_from_slice(&["--vram-budget", budget]);
        }
        let run = vpipe(&args);
        assert!(
            run.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let held = report["notes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["what"] == "clip vision")
            .map(|n| n["detail"].as_str().unwrap().to_owned())
            .unwrap();
        (load(&output)["image_features"].clone(), held)
    };
    let (resident, held) = run("resident", None);
    assert!(held.contains("resident"), "{held}");
    let (streamed, held) = run("streamed", Some("12MiB"));
    assert!(held.contains("streamed"), "{held}");
    assert_eq!(max_abs(&streamed, &resident), 0.0);
}

#[test]
fn an_image_to_video_dit_through_the_cli_matches_diffusers() {
    // make_dit_i2v_fixtures.py: diffusers WanTransformer3DModel with image_dim (f32); the input
    // file holds the image features under `encoder_hidden_states_image`.
    let dir = tempfile::tempdir().unwrap();
    let cases = fixture(
        "vpipe-models",
        "tests/fixtures/dit/dit_i2v_cases.safetensors",
    );
    let dit = fixture(
        "vpipe-models",
        "tests/fixtures/dit/dit_tiny_i2v_diffusers.safetensors",
    );
    let config = fixture(
        "vpipe-models",
        "tests/fixtures/dit/dit_tiny_i2v_config.json",
    );
    let output = dir.path().join("out.safetensors");
    let run = vpipe(&[
        "tensors",
        "dit",
        "--dit",
        dit.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--input",
        cases.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let err = max_abs(&load(&output)["out"], &load(&cases)["out"]);
    assert!(err <= 1e-4, "max abs {err}");
}
