//! `vpipe run` with a DiT larger than the budget: the plan streams its blocks, the run
//! completes, and the output is bit-identical to the resident run's (with and without a LoRA
//! on the streamed blocks). The arena's bytes are measured by the stream's verified start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

mod common;
use common::{builtin_models, load, vpipe};

/// Blocks of the deep DiT: the demo's 2 blocks repeated, each copy scaled differently so
/// that a block fetched in the wrong place changes the output.
const BLOCKS: usize = 12;
/// The deep DiT's FFN is this many times the demo's (512 wide), so that a block (19 MB) is
/// large next to the text encoder and the VAE and a small budget streams every block.
const FFN_COPIES: usize = 16;
const PREFIX: &str = "model.diffusion_model.";

struct Models {
    dir: PathBuf,
    dit: PathBuf,
    lora: PathBuf,
    demo_lora: PathBuf,
    /// The demo's text encoder with a 16 times wider FFN and 32 blocks (see [`wide_text`]).
    text: PathBuf,
}

/// The demo's models with the DiT made `BLOCKS` deep, and a LoRA on the demo's two blocks
/// copied onto the last two (which stream under a small budget).
fn deep_models(dir: &Path) -> Models {
    let demo = builtin_models(&dir.join("demo"));
    let dit = load(&demo.join("wan2.1-dit-tiny-seed42.safetensors"));
    let mut deep: HashMap<String, Tensor> = HashMap::new();
    for (name, tensor) in &dit {
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}blocks.")) else {
            deep.insert(name.clone(), tensor.clone());
            continue;
        };
        let (index, inner) = rest.split_once('.').unwrap();
        let index: usize = index.parse().unwrap();
        // The FFN's hidden width, FFN_COPIES times over: the input side repeated, the output
        // side repeated and divided, so that the block computes what the demo's does.
        let tensor = &match inner {
            "ffn.0.weight" | "ffn.0.bias" => Tensor::cat(&[tensor; FFN_COPIES], 0).unwrap(),
            "ffn.2.weight" => {
                (Tensor::cat(&[tensor; FFN_COPIES], 1).unwrap() / FFN_COPIES as f64).unwrap()
            }
            _ => tensor.clone(),
        };
        for copy in (index..BLOCKS).step_by(2) {
            let scale = 1.0 - 0.01 * copy as f64;
            deep.insert(
                format!("{PREFIX}blocks.{copy}.{inner}"),
                (tensor * scale).unwrap(),
            );
        }
    }
    let dit_path = dir.join("deep-dit.safetensors");
    candle_core::safetensors::save(&deep, &dit_path).unwrap();

    let lora = load(&demo.join("lora-tiny-seed42.safetensors"));
    let mut moved: HashMap<String, Tensor> = HashMap::new();
    for (name, tensor) in lora {
        // Widened as the FFN is (see above).
        let tensor = if name.ends_with("ffn.0.lora_B.weight") {
            Tensor::cat(&[&tensor; FFN_COPIES], 0).unwrap()
        } else if name.ends_with("ffn.2.lora_A.weight") {
            (Tensor::cat(&[&tensor; FFN_COPIES], 1).unwrap() / FFN_COPIES as f64).unwrap()
        } else {
            tensor
        };
        moved.insert(name.clone(), tensor.clone());
        for (from, to) in [(0, BLOCKS - 2), (1, BLOCKS - 1)] {
            let from = format!("blocks.{from}.");
            if name.contains(&from) {
                moved.insert(
                    name.replace(&from, &format!("blocks.{to}.")),
                    tensor.clone(),
                );
            }
        }
    }
    let lora_path = dir.join("deep-lora.safetensors");
    candle_core::safetensors::save(&moved, &lora_path).unwrap();
    let text = wide_text(&demo, dir);
    Models {
        demo_lora: demo.join("lora-tiny-seed42.safetensors"),
        dir: demo,
        dit: dit_path,
        lora: lora_path,
        text,
    }
}

/// The demo's umT5 encoder with 32 blocks (its 2 repeated) and an FFN 16 times wider
/// (computing the same), so that its weights (52 MB) do not fit next to its activations.
fn wide_text(demo: &Path, dir: &Path) -> PathBuf {
    const COPIES: usize = 16;
    const TEXT_BLOCKS: usize = 32;
    let text = load(&demo.join("umt5-tiny-seed42.safetensors"));
    let mut wide: HashMap<String, Tensor> = HashMap::new();
    for (name, tensor) in &text {
        let Some(rest) = name.strip_prefix("encoder.block.") else {
            wide.insert(name.clone(), tensor.clone());
            continue;
        };
        let (index, inner) = rest.split_once('.').unwrap();
        let index: usize = index.parse().unwrap();
        let tensor = if inner.ends_with("wi_0.weight") || inner.ends_with("wi_1.weight") {
            Tensor::cat(&[tensor; COPIES], 0).unwrap()
        } else if inner.ends_with("wo.weight") {
            (Tensor::cat(&[tensor; COPIES], 1).unwrap() / COPIES as f64).unwrap()
        } else {
            tensor.clone()
        };
        for copy in (index..TEXT_BLOCKS).step_by(2) {
            wide.insert(format!("encoder.block.{copy}.{inner}"), tensor.clone());
        }
    }
    let path = dir.join("wide-umt5.safetensors");
    candle_core::safetensors::save(&wide, &path).unwrap();
    path
}

/// Which of the large models a run takes.
#[derive(Clone, Copy)]
enum Large {
    /// The deep DiT, the demo's text encoder.
    Dit,
    /// The demo's DiT, the wide text encoder.
    Text,
}

/// Runs text-to-video on the demo's models with the `large` one replaced; returns the video
/// and the report.
fn run(
    models: &Models,
    large: Large,
    out: &Path,
    budget: Option<&str>,
    lora: bool,
) -> (Tensor, serde_json::Value) {
    let report = out.with_extension("json");
    let dir = models.dir.to_str().unwrap();
    let (flag, file) = match large {
        Large::Dit => ("--dit", &models.dit),
        Large::Text => ("--text-encoder", &models.text),
    };
    let mut args = vec![
        "run",
        "--model-dir",
        dir,
        flag,
        file.to_str().unwrap(),
        "--prompt",
        "a red kite over the sea",
        "--size",
        "96x64",
        "--frames",
        "5",
        "--steps",
        "2",
        "--tile",
        "32",
        "--out",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    if let Some(budget) = budget {
        args.extend(["--vram-budget", budget]);
    }
    if lora {
        let file = match large {
            Large::Dit => &models.lora,
            // The demo's LoRA, for the demo's DiT.
            Large::Text => &models.demo_lora,
        };
        args.extend(["--lora", file.to_str().unwrap()]);
    }
    let result = vpipe(&args);
    assert!(
        result.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let video = candle_core::safetensors::load(out, &Device::Cpu).unwrap()["video"].clone();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(report["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["verified"] == true));
    assert!(
        report["violations"].as_array().unwrap().is_empty(),
        "{report}"
    );
    (video, report)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// The DiT's bytes in f32, from the file.
fn dit_bytes(path: &Path) -> u64 {
    load(path)
        .values()
        .map(|t| (t.elem_count() * 4) as u64)
        .sum()
}

#[test]
fn a_dit_larger_than_the_budget_streams_and_matches_the_resident_run() {
    let dir = tempfile::tempdir().unwrap();
    let dir = if std::env::var_os("VPIPE_KEEP_TEST_DIR").is_some() {
        Box::leak(Box::new(dir)).path().to_owned()
    } else {
        dir.path().to_owned()
    };
    let dir = &dir;
    let models = deep_models(dir);
    let dit = dit_bytes(&models.dit);
    let block = dit / BLOCKS as u64;
    for lora in [false, true] {
        // Room for the text encoder and the VAE (tile 32), not for the whole DiT: the smaller
        // budget streams every block, the larger holds some. A LoRA merged as blocks are read
        // from the file needs room for three of a block's largest tensor.
        let budgets = match lora {
            false => [("40MiB", 40u64 << 20, Some(0)), ("96MiB", 96 << 20, None)],
            true => [("64MiB", 64u64 << 20, Some(0)), ("120MiB", 120 << 20, None)],
        };
        for (_, bytes, _) in budgets {
            assert!(
                dit > bytes,
                "the deep DiT ({dit} bytes) must not fit {bytes}"
            );
        }
        let (resident, resident_report) = run(
            &models,
            Large::Dit,
            &dir.join(format!("resident-{lora}.safetensors")),
            None,
            lora,
        );
        assert!(resident_report["streams"].as_array().unwrap().is_empty());

        for (budget, limit, held) in budgets {
            let (streamed, report) = run(
                &models,
                Large::Dit,
                &dir.join(format!("streamed-{budget}-{lora}.safetensors")),
                Some(budget),
                lora,
            );
            assert_eq!(
                bits(&streamed),
                bits(&resident),
                "streamed ({budget}) and resident outputs differ (LoRA: {lora})"
            );
            let streams = report["streams"].as_array().unwrap();
            let stream = streams.iter().find(|s| s["model"] == "dit").unwrap();
            assert_eq!(stream["source"], "file");
            // Each block streams in its three parts (self-attention, cross-attention, FFN),
            // one arena slot each: the three slots together hold one block.
            let groups = stream["groups"].as_u64().unwrap();
            let slots = stream["slots"].as_u64().unwrap();
            assert_eq!(slots, 3, "{stream}");
            assert_eq!(groups % 3, 0, "{stream}");
            let streamed_blocks = groups / 3;
            match held {
                Some(held) => assert_eq!(streamed_blocks, BLOCKS as u64 - held, "{stream}"),
                None => assert!((1..BLOCKS as u64).contains(&streamed_blocks), "{stream}"),
            }
            // Every streamed part is fetched once per step (2 steps, both guidance passes
            // through each part in turn) and copied once, but for the parts copied ahead of a
            // third step that does not come (at most one per slot but the current one's).
            let stats = &stream["stats"];
            assert_eq!(stats["fetches"].as_u64().unwrap(), 2 * groups, "{stream}");
            let copies = stats["copies"].as_u64().unwrap();
            assert!(
                (2 * groups..2 * groups + slots).contains(&copies),
                "{stream}"
            );
            assert_eq!(stats["out_of_order"].as_u64().unwrap(), 0, "{stream}");
            let arena = stream["arena_bytes"].as_u64().unwrap();
            assert!(
                arena <= block + 4096,
                "arena {arena} for the parts of a block of {block}"
            );
            let moved = stats["bytes_moved"].as_u64().unwrap();
            assert!(
                (2 * streamed_blocks * arena..(2 * streamed_blocks + 1) * arena).contains(&moved),
                "{stream}"
            );
            // The stream's start was measured: the heap grew by its fixed part and arena,
            // verified, and the sample phase's measured peak kept the budget.
            let start = report["transitions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| {
                    t["phase"] == "sample"
                        && t["model"] == "dit"
                        && t["expected_bytes"].as_i64().unwrap() > 0
                })
                .unwrap();
            let expected = start["expected_bytes"].as_u64().unwrap();
            assert_eq!(
                expected,
                stream["fixed_bytes"].as_u64().unwrap() + arena,
                "{start}"
            );
            assert!(expected < dit, "{start}");
            let sample = report["phases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "sample")
                .unwrap();
            assert!(sample["peak_above_baseline"].as_u64().unwrap() <= limit);
            // The chart has a reading as each streamed block starts, besides each step's.
            let (entry, exit) = (
                sample["entry"]["t_ms"].as_f64().unwrap(),
                sample["exit"]["t_ms"].as_f64().unwrap(),
            );
            let inside = report["samples"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| (entry..=exit).contains(&r["t_ms"].as_f64().unwrap()))
                .count() as u64;
            assert!(
                inside >= 2 * streamed_blocks + 2,
                "{inside} readings in the sample phase"
            );
        }
    }
}

#[test]
fn a_text_encoder_larger_than_the_budget_streams_and_matches_the_resident_run() {
    let dir = tempfile::tempdir().unwrap();
    let models = deep_models(dir.path());
    let (resident, report) = run(
        &models,
        Large::Text,
        &dir.path().join("text-resident.safetensors"),
        None,
        false,
    );
    assert!(report["streams"].as_array().unwrap().is_empty());
    let (streamed, report) = run(
        &models,
        Large::Text,
        &dir.path().join("text-streamed.safetensors"),
        Some("80MiB"),
        false,
    );
    assert_eq!(bits(&streamed), bits(&resident));
    let streams = report["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1, "{report}");
    let stream = &streams[0];
    assert_eq!(stream["model"], "text encoder");
    assert_eq!(stream["phase"], "text");
    let groups = stream["groups"].as_u64().unwrap();
    assert!((1..=32).contains(&groups), "{stream}");
    // One forward: each streamed block copied once.
    assert_eq!(stream["stats"]["copies"].as_u64().unwrap(), groups);
    // The token embedding is read by rows, never held: the stream's fixed part is the held
    // blocks and the final norm.
    let text = load(&models.text);
    let bytes = |t: &Tensor| (t.elem_count() * 4) as u64;
    let block: u64 = text
        .iter()
        .filter(|(k, _)| k.starts_with("encoder.block.0."))
        .map(|(_, t)| bytes(t))
        .sum();
    let held = 32 - groups;
    let final_norm = bytes(&text["encoder.final_layer_norm.weight"]);
    assert_eq!(
        stream["fixed_bytes"].as_u64().unwrap(),
        held * block + final_norm,
        "{stream}"
    );
}
