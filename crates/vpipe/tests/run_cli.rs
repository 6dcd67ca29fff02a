//! `vpipe run` on the demo's built-in model files (written by `vpipe demo` into a temporary
//! folder first): text-to-video and video-to-video through every phase, and bad input.

use std::collections::HashMap;
use std::path::Path;

mod common;
use common::{builtin_models, load, vpipe};

fn phases(report: &Path) -> Vec<String> {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    assert!(report["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["verified"] == true));
    common::phase_names(&report)
}

#[test]
fn text_to_video_and_video_to_video_run_every_phase() {
    let dir = tempfile::tempdir().unwrap();
    let models = builtin_models(&dir.path().join("demo"));
    let models = models.to_str().unwrap();
    let out = dir.path().join("t2v.safetensors");
    let report = dir.path().join("t2v.json");
    let common = [
        "--prompt",
        "a red kite over the sea",
        "--size",
        "96x64",
        "--frames",
        "9",
        "--tile",
        "64",
    ];
    let mut args = vec!["run", "--model-dir", models, "--steps", "2"];
    args.extend_from_slice(&common);
    args.extend_from_slice(&[
        "--out",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let run = vpipe(&args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        phases(&report),
        [
            "load",
            "lora",
            "text",
            "shift",
            "sample",
            "vae decode",
            "write"
        ]
    );
    let video = &load(&out)["video"];
    assert_eq!(video.dims(), &[1, 3, 9, 64, 96]);
    let max = video
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max <= 1.0, "decoded values are clamped: {max}");

    // Video-to-video from that output, with a LoRA.
    let input = dir.path().join("in.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([("video_in".to_owned(), video.clone())]),
        &input,
    )
    .unwrap();
    let lora = format!("{models}/lora-tiny-seed42.safetensors:0.5");
    let out2 = dir.path().join("v2v.safetensors");
    let mut args = vec![
        "run",
        "--model-dir",
        models,
        "--steps",
        "4",
        "--input",
        input.to_str().unwrap(),
    ];
    args.extend_from_slice(&common);
    args.extend_from_slice(&[
        "--strength",
        "0.5",
        "--lora",
        &lora,
        "--out",
        out2.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let run = vpipe(&args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        phases(&report),
        [
            "load",
            "lora",
            "text",
            "shift",
            "vae encode",
            "sample",
            "vae decode",
            "write"
        ]
    );
    assert_eq!(load(&out2)["video"].dims(), &[1, 3, 9, 64, 96]);
}

/// A model folder with a Wan 2.2 expert pair as ComfyUI names it (`*_high_noise_*`,
/// `*_low_noise_*`): the run finds both, samples with each in a phase of its own, and says so;
/// the plan of the A14B presets has both phases too.
#[test]
fn a_model_folder_with_an_expert_pair_samples_with_both() {
    let dir = tempfile::tempdir().unwrap();
    let models = builtin_models(&dir.path().join("demo"));
    let pair = dir.path().join("pair");
    std::fs::create_dir(&pair).unwrap();
    for entry in std::fs::read_dir(&models).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.starts_with("wan2.1-dit") {
            for expert in ["high_noise", "low_noise"] {
                std::fs::copy(
                    &path,
                    pair.join(format!("wan2.2_t2v_{expert}_tiny.safetensors")),
                )
                .unwrap();
            }
        } else if !name.starts_with("lora") {
            std::fs::copy(&path, pair.join(&name)).unwrap();
        }
    }
    let out = dir.path().join("pair.safetensors");
    let report = dir.path().join("pair.json");
    let run_pair = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--model-dir",
            pair.to_str().unwrap(),
            "--prompt",
            "a red kite over the sea",
            "--size",
            "96x64",
            "--frames",
            "9",
            "--steps",
            "4",
            "--shift",
            "12",
            "--out",
            out.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let run = vpipe(&args);
        let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
        assert!(run.status.success(), "{stderr}");
        stderr
    };
    let stderr = run_pair(&[]);
    assert!(stderr.contains("expert pair"), "{stderr}");
    assert_eq!(
        phases(&report),
        [
            "load",
            "lora",
            "text",
            "shift",
            "sample high noise",
            "sample low noise",
            "vae decode",
            "write"
        ]
    );
    // A LoRA for each expert, the boundary and the low-noise guidance given for the pair the
    // folder holds.
    let lora = models
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("lora"))
        .unwrap();
    let lora = lora.to_str().unwrap();
    run_pair(&[
        "--lora",
        &format!("{lora}:0.8"),
        "--lora-low-noise",
        &format!("{lora}:0.5"),
        "--boundary",
        "0.9",
        "--cfg-low-noise",
        "3",
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let lora_notes: Vec<&str> = json["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["what"] == "lora" && n["detail"].as_str().unwrap().contains("strength"))
        .map(|n| n["detail"].as_str().unwrap())
        .collect();
    assert_eq!(lora_notes.len(), 2, "{lora_notes:?}");
    assert!(lora_notes[0].contains("strength 0.8") && lora_notes[1].contains("strength 0.5"));
    // The pair's flags without a pair.
    let run = vpipe(&["run", "--prompt", "x", "--boundary", "0.9", "--dit", lora]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("--boundary: for a Wan 2.2 expert pair"));
    for preset in ["wan2.2-t2v-a14b", "wan2.2-i2v-a14b"] {
        let plan = plan_preset(preset, "832x480", ("8GiB", "48GiB"), true);
        assert!(plan.status.success(), "{preset}");
        let json: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
        let names: Vec<&str> = json["phases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"sample high noise") && names.contains(&"sample low noise"),
            "{preset}: {names:?}"
        );
        assert_eq!(json["fits"], true, "{preset}");
    }
}

#[test]
fn bad_run_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let cases: [(&[&str], i32, &str); 5] = [
        (&["run", "--model-dir", d], 2, "--prompt"),
        (
            &["run", "--model-dir", d, "--prompt", "x", "--frames", "10"],
            2,
            "--frames 10",
        ),
        (
            &["run", "--model-dir", d, "--prompt", "x", "--size", "100x64"],
            2,
            "--size 100x64",
        ),
        (
            &["run", "--model-dir", d, "--prompt", "x", "--image", "a.png"],
            2,
            "--image a.png",
        ),
        (
            &["run", "--model-dir", d, "--prompt", "x"],
            2,
            "no Wan 2.1 DiT, text-to-video found",
        ),
    ];
    for (args, code, message) in cases {
        let run = vpipe(args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn plan_for_a_preset_needs_no_weights_and_says_whether_it_fits() {
    // A host with room for the pinned copies, whatever this machine has.
    let plan = |budget: &str| plan_14b(budget, "64GiB");
    let run = plan("78GiB");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(json["fits"], true);
    let names: Vec<_> = json["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "load",
            "lora",
            "text",
            "shift",
            "sample",
            "vae decode",
            "write"
        ]
    );
    // The 14B DiT's weights alone are 28.6 GB (26.6 GiB) in bf16.
    let sample = json["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "sample")
        .unwrap();
    assert!(sample["estimated_peak_bytes"].as_u64().unwrap() > 28_576_000_000);
    assert_eq!(json["sample"]["residency"]["strategy"], "resident");
    // A 24 GiB card holds most blocks and streams the rest.
    let run = plan("24GiB");
    assert!(run.status.success());
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(json["fits"], true);
    let residency = &json["sample"]["residency"];
    assert_eq!(residency["strategy"], "streamed", "{json}");
    let held = residency["held_blocks"].as_u64().unwrap();
    assert!((1..40).contains(&held), "{json}");
    assert_eq!(held + residency["streamed_blocks"].as_u64().unwrap(), 40);
    // Below what any strategy needs: refused, naming the minimum.
    let run = plan("1GiB");
    assert_eq!(run.status.code(), Some(3));
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(json["fits"], false);
    let minimum = json["minimum_bytes"].as_u64().unwrap();
    assert!(minimum > 1 << 30 && minimum < 5 << 30, "{json}");
    assert_eq!(json["minimum_phase"], "sample");
}

/// `vpipe plan --json` for the 14B preset on cuda:0 in bf16 at 832×480×81.
fn plan_14b(vram: &str, ram: &str) -> std::process::Output {
    plan_preset("wan2.1-t2v-14b", "832x480", (vram, ram), true)
}

/// `vpipe plan` (`--json` when `json`) for `preset` on cuda:0 in bf16 at `size` and 81 frames,
/// under the device and host budgets `vram` and `ram`.
fn plan_preset(
    preset: &str,
    size: &str,
    (vram, ram): (&str, &str),
    json: bool,
) -> std::process::Output {
    let mut args = vec![
        "plan",
        "--preset",
        preset,
        "--dtype",
        "bf16",
        "--device",
        "cuda:0",
        "--size",
        size,
        "--frames",
        "81",
        "--vram-budget",
        vram,
        "--ram-budget",
        ram,
    ];
    if json {
        args.push("--json");
    }
    vpipe(&args)
}

/// The image-to-video presets plan a CLIP vision phase and the conditioning's encode, and say
/// what they make; 720p (75,600 tokens) fits 24 GiB by streaming.
#[test]
fn plan_for_the_image_to_video_presets() {
    for (preset, mode, images) in [
        ("wan2.1-i2v-14b-480p", "image-to-video", "1 image(s)"),
        ("wan2.1-i2v-14b-720p", "image-to-video", "1 image(s)"),
        (
            "wan2.1-flf2v-14b-720p",
            "first-last-frame-to-video",
            "2 image(s)",
        ),
    ] {
        let run = plan_preset(preset, "1280x720", ("24GiB", "96GiB"), true);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{preset}: {stderr}");
        let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        assert_eq!(json["mode"], mode, "{preset}");
        assert_eq!(json["fits"], true, "{preset}");
        let phases = json["phases"].as_array().unwrap();
        let names: Vec<_> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "load",
                "lora",
                "text",
                "clip vision",
                "shift",
                "vae encode",
                "sample",
                "vae decode",
                "write"
            ],
            "{preset}"
        );
        let detail = phases[3]["detail"].as_str().unwrap();
        assert!(detail.contains(images), "{preset}: {detail}");
        // CLIP ViT-H/14 is 0.63 G parameters: 1.2 GiB in bf16.
        let clip = phases[3]["estimated_peak_bytes"].as_u64().unwrap();
        assert!((1200 << 20..1400 << 20).contains(&clip), "{preset}: {clip}");
        assert_eq!(
            json["sample"]["residency"]["strategy"], "streamed",
            "{preset}"
        );
    }
}

/// The 14B's least budget at this size is about 4.3 GiB of models (the activations of one
/// guidance pass at 32,760 tokens, one streamed block, the pool's reserve; plus the CUDA
/// context where the plan can read it): 5 GiB is planned by streaming every block.
#[test]
fn plan_streams_the_14b_into_5_gib_from_pinned_memory_or_from_the_file() {
    for (ram, source) in [("64GiB", "pinned_host"), ("16GiB", "file")] {
        let run = plan_14b("5GiB", ram);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        assert_eq!(json["fits"], true, "{json}");
        let dit = &json["sample"]["residency"];
        assert_eq!(dit["strategy"], "streamed", "{json}");
        assert_eq!(dit["source"], source, "{json}");
        // The 11 GB text encoder streams too; its embedding stays on the host.
        assert_eq!(json["text"]["residency"]["strategy"], "streamed", "{json}");
        let peak = json["sample"]["estimated_peak_bytes"].as_u64().unwrap();
        assert!(peak <= 5 << 30, "{json}");
        assert_eq!(
            json["host_budget_bytes"].as_u64(),
            vpipe_mem::parse_bytes(ram)
        );
    }
}

#[test]
fn a_run_whose_plan_does_not_fit_is_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let models = builtin_models(&dir.path().join("demo"));
    let out = dir.path().join("never.safetensors");
    let run = vpipe(&[
        "run",
        "--model-dir",
        models.to_str().unwrap(),
        "--prompt",
        "x",
        "--size",
        "96x64",
        "--frames",
        "9",
        "--tile",
        "64",
        "--vram-budget",
        "4MiB",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("refused before loading anything"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn video_to_video_from_a_real_mp4_to_an_mp4() {
    // The real Wan 2.1 clip (832×480, 81 frames, MIT; crates/vpipe-video/tests/fixtures),
    // resized and cropped to 96×64, its first 5 frames.
    let dir = tempfile::tempdir().unwrap();
    let models = builtin_models(&dir.path().join("demo"));
    let clip = common::fixture("vpipe-video", "wan21-cheesecake-832x480x81-h264.mp4");
    let out = dir.path().join("v2v.mp4");
    let run = vpipe(&[
        "run",
        "--model-dir",
        models.to_str().unwrap(),
        "--prompt",
        "a cheesecake",
        "--input",
        clip.to_str().unwrap(),
        "--size",
        "96x64",
        "--frames",
        "5",
        "--steps",
        "2",
        "--tile",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("using the first 5 of 81 frames"),
        "{stderr}"
    );
    let video = vpipe_video::read_video(&out).unwrap();
    assert_eq!(
        (video.num_frames(), video.width(), video.height()),
        (5, 96, 64)
    );
    // Wan's 16 fps, and a duration of exactly 5/16 s.
    let info = vpipe_video::probe_mp4(&out).unwrap();
    assert_eq!(
        (info.codec.as_str(), info.frames, info.fps),
        ("avc1", 5, 16.0),
        "{info:?}"
    );
    assert!(
        (info.movie_duration_secs - 5.0 / 16.0).abs() < 1e-9,
        "{info:?}"
    );
}

#[test]
fn flags_come_from_a_toml_pipeline_file_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pipeline.toml");
    std::fs::write(
        &file,
        "preset = \"wan2.1-t2v-1.3b\"\ndtype = \"bf16\"\nsteps = 12\nsize = \"480x320\"\nframes = 33\njson = true\n",
    )
    .unwrap();
    let run = vpipe(&[
        "plan",
        "--pipeline",
        file.to_str().unwrap(),
        "--steps",
        "20",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let sample = json["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "sample")
        .unwrap();
    // 33 frames → 9 latent frames; 480×320 → 30×20 patches: 5400 tokens; 20 steps from the
    // command line over the file's 12.
    let detail = sample["detail"].as_str().unwrap();
    assert!(detail.starts_with("5400 tokens, 20 steps"), "{detail}");

    std::fs::write(&file, "steps = [1\n").unwrap();
    let run = vpipe(&["plan", "--pipeline", file.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("not valid TOML"));
}

#[test]
fn without_frames_a_clip_is_cut_to_4k_plus_1_with_a_notice() {
    // A 7-frame GIF: Wan's VAE takes 4k+1 frames, so the run uses its first 5.
    let dir = tempfile::tempdir().unwrap();
    let models = builtin_models(&dir.path().join("demo"));
    let (w, h) = (96u32, 64u32);
    let frames: Vec<Vec<u8>> = (0..7u8)
        .map(|i| {
            (0..w * h)
                .flat_map(|p| [(p % 251) as u8, i * 30, (p / w) as u8 * 3])
                .collect()
        })
        .collect();
    let clip = dir.path().join("seven.gif");
    let video = vpipe_video::Video::from_frames(&frames, w, h, 16.0).unwrap();
    vpipe_video::write_video(&clip, &video, &Default::default()).unwrap();
    let out = dir.path().join("v2v.safetensors");
    let args = [
        "--model-dir",
        models.to_str().unwrap(),
        "--prompt",
        "stripes",
        "--input",
        clip.to_str().unwrap(),
        "--size",
        "96x64",
        "--steps",
        "2",
        "--tile",
        "64",
        "--out",
        out.to_str().unwrap(),
    ];
    let plan = vpipe(&[&["plan", "--json"], &args[..]].concat());
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let run = vpipe(&[&["run"], &args[..]].concat());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("using the first 5 of 7 frames (--frames, 4k+1)"),
        "{stderr}"
    );
    assert_eq!(load(&out)["video"].dims(), &[1, 3, 5, 64, 96]);
}

/// Every move is verified, and passes, with a LoRA merged into the DiT as it is read, in
/// text-to-video and video-to-video (the merge multiplies matrices inside the load, which on
/// some CPUs made the matmul library's per-thread buffers look like part of the DiT).
/// `a_copy_that_does_not_land_fails_the_load_verification` in vpipe-mem shows the same
/// verification failing when a copy really goes missing.
#[test]
fn a_lora_run_verifies_every_move_in_text_and_video_to_video() {
    let dir = tempfile::tempdir().unwrap();
    let models = builtin_models(&dir.path().join("demo"));
    let lora = format!(
        "{}:0.8",
        models.join("lora-tiny-seed42.safetensors").display()
    );
    let input = dir.path().join("demo/demo.mp4");
    for (name, extra) in [
        ("t2v", vec![]),
        ("v2v", vec!["--input", input.to_str().unwrap()]),
    ] {
        let report = dir.path().join(format!("{name}.json"));
        let out = dir.path().join(format!("{name}.safetensors"));
        let mut args = vec![
            "run",
            "--model-dir",
            models.to_str().unwrap(),
            "--prompt",
            "cat",
            "--size",
            "64x48",
            "--frames",
            "5",
            "--steps",
            "2",
            "--lora",
            &lora,
            "--out",
            out.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ];
        args.extend(extra);
        let run = vpipe(&args);
        assert!(
            run.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        // `phases` asserts that every transition was verified.
        assert!(phases(&report).contains(&"lora".to_owned()));
        let text = std::fs::read_to_string(&report).unwrap();
        assert!(text.contains("merged as they are read from disk"), "{name}");
    }
}

/// A host budget below what streaming from the file needs (its page-locked buffers, the video
/// in memory, the process) is refused, naming the least host budget.
#[test]
fn a_host_budget_below_any_strategy_is_refused_naming_the_least() {
    let run = plan_14b("5GiB", "1MiB");
    assert_eq!(run.status.code(), Some(3));
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(json["fits"], false, "{json}");
    let least = json["host_minimum_bytes"].as_u64().unwrap();
    // One DiT block's staging (0.65 GiB) and the 81 frames of 832×480 at least.
    assert!(least > 1 << 30 && least < 4 << 30, "{json}");
    let text = plan_preset("wan2.1-t2v-14b", "832x480", ("5GiB", "1MiB"), false);
    assert_eq!(text.status.code(), Some(3));
    let table = String::from_utf8_lossy(&text.stdout);
    assert!(
        table.contains("host budget 1.00 MiB (--ram-budget): does NOT fit"),
        "{table}"
    );
}
