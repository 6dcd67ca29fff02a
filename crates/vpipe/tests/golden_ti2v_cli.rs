//! `vpipe run` with Wan 2.2 TI2V-5B's architecture end to end against diffusers: `WanPipeline`
//! (text-to-video) and `WanImageToVideoPipeline` (image-to-video, no CLIP) with
//! `expand_timesteps=True`, in float32 on the CPU, on a tiny TI2V DiT (48 latent channels) and
//! a tiny Wan 2.2 VAE, the same tokenizer, tiny umT5, prompts, scheduler settings and initial
//! noise (`--initial-noise`). The references, the DiT, the VAE and the image come from
//! `tools/fixtures/make_ti2v_pipeline_fixtures.py` (`tests/fixtures/pipeline_ti2v/`).
//!
//! The final latents and the decoded video are compared to 1e-4. The runs give no `--shift`:
//! the TI2V family's own (5, as the fixtures) is the default. Also here: the mismatched
//! DiT/VAE pairs, sizes off the TI2V grid, a noise of Wan 2.1's shape, `--last-image`, model
//! folder resolution and the preset's plan.

use std::path::{Path, PathBuf};

mod common;
use common::{fixture, golden_run_args, load, max_abs, vpipe};

/// The bound on max |vpipe − diffusers| of the final latents and the decoded video.
const TOL: f64 = 1e-4;

/// A file of this crate's `tests/fixtures/pipeline_ti2v`.
fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pipeline_ti2v")
        .join(name)
}

fn arg(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

/// The generator's record of the settings.
fn settings() -> serde_json::Value {
    let text = std::fs::read_to_string(golden("pipeline_ti2v_fixtures.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["settings"].clone()
}

/// `vpipe run` of the fixture's settings on `dit` (with its config) and `vae`, `--initial-noise`
/// from `noise`, writing `out`, then `extra`.
fn run_args(
    (dit, dit_config, vae): (&Path, &Path, &Path),
    noise: &Path,
    out: &Path,
    extra: &[&str],
) -> Vec<String> {
    let s = settings();
    let mut args = golden_run_args(
        (dit, dit_config, vae),
        &s,
        (&s["steps"].to_string(), &s["guidance_scale"].to_string()),
        noise,
        out,
    );
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// The fixture's TI2V DiT, its config and its Wan 2.2 VAE.
fn ti2v_models() -> (PathBuf, PathBuf, PathBuf) {
    (
        golden("dit_tiny_ti2v_text32.safetensors"),
        golden("dit_tiny_ti2v_text32_config.json"),
        golden("wan22_vae_tiny48_diffusers.safetensors"),
    )
}

fn run(args: &[String]) -> std::process::Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    vpipe(&args)
}

/// Runs `mode` (t2v or i2v) and checks the final latents and the video against diffusers'.
/// Returns the run's report.
fn golden_run(mode: &str, extra: &[&str]) -> serde_json::Value {
    let reference_file = golden(&format!("{mode}.safetensors"));
    let reference = load(&reference_file);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let report_file = dir.path().join("report.json");
    let (dit, config, vae) = ti2v_models();
    let mut flags = vec!["--report", report_file.to_str().unwrap()];
    flags.extend_from_slice(extra);
    let result = run(&run_args(
        (&dit, &config, &vae),
        &reference_file,
        &out,
        &flags,
    ));
    assert!(
        result.status.success(),
        "{mode}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let made = load(&out);
    let latents = max_abs(&made["latents"], &reference["latents"]);
    let video = max_abs(&made["video"], &reference["video"]);
    println!(
        "{mode}: max |vpipe - diffusers| of the final latents {latents:.3e}, of the decoded video \
         {video:.3e} (bound {TOL:.0e})"
    );
    assert_eq!(made["video"].dims(), reference["video"].dims(), "{mode}");
    assert!(latents <= TOL, "{mode}: latents {latents:.3e} > {TOL:.0e}");
    assert!(video <= TOL, "{mode}: video {video:.3e} > {TOL:.0e}");
    serde_json::from_str(&std::fs::read_to_string(report_file).unwrap()).unwrap()
}

/// The detail of the report's note `what`.
fn note(report: &serde_json::Value, what: &str) -> String {
    report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["what"] == what)
        .and_then(|n| n["detail"].as_str())
        .unwrap_or_else(|| panic!("no note {what}"))
        .to_owned()
}

/// Text-to-video: a timestep per sample, every token at it, at TI2V's default shift 5; the
/// video at 24 fps.
#[test]
fn ti2v_text_to_video_matches_diffusers_wan_pipeline() {
    let report = golden_run("t2v", &[]);
    let schedule = note(&report, "schedule");
    assert!(schedule.contains("shift 5:"), "{schedule}");
    let video = note(&report, "video");
    assert!(video.contains("at 24 fps"), "{video}");
}

/// Image-to-video: the image's latent as the first latent frame (timestep 0 on its tokens),
/// blended before every step and after the last; no CLIP phase.
#[test]
fn ti2v_image_to_video_matches_diffusers_image_to_video_pipeline() {
    let image = arg(&golden("first.png"));
    let report = golden_run("i2v", &["--image", &image]);
    let phases = common::phase_names(&report);
    assert!(phases.iter().any(|p| p == "vae encode"), "{phases:?}");
    assert!(!phases.iter().any(|p| p == "clip vision"), "{phases:?}");
}

/// Runs with `args` and expects exit 2 with every one of `needles` in the message.
fn refused(args: &[String], needles: &[&str]) {
    let result = run(args);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
}

#[test]
fn a_dit_and_a_vae_of_different_families_are_bad_input_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let (dit, config, vae) = ti2v_models();
    let wan21_vae = fixture("vpipe-models", "vae/wan_vae_tiny_diffusers.safetensors");
    let noise = golden("t2v.safetensors");
    // The TI2V DiT on the Wan 2.1 VAE.
    refused(
        &run_args((&dit, &config, &wan21_vae), &noise, &out, &[]),
        &[
            "dit_tiny_ti2v_text32.safetensors",
            "wan_vae_tiny_diffusers.safetensors",
            "Wan 2.1 VAE",
        ],
    );
    // A Wan 2.1 DiT (16 channels) on the Wan 2.2 VAE.
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline");
    refused(
        &run_args(
            (
                &pipeline.join("dit_tiny_text32.safetensors"),
                &pipeline.join("dit_tiny_text32_config.json"),
                &vae,
            ),
            &noise,
            &out,
            &[],
        ),
        &[
            "dit_tiny_text32.safetensors",
            "wan22_vae_tiny48_diffusers.safetensors",
            "Wan 2.2 VAE",
        ],
    );
    assert!(!out.exists());
}

#[test]
fn sizes_noise_and_frames_off_the_ti2v_model_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let (dit, config, vae) = ti2v_models();
    let models = (dit.as_path(), config.as_path(), vae.as_path());
    let noise = golden("t2v.safetensors");
    // 48 is a multiple of 16 (the flags' check) but not of 32.
    let mut args = run_args(models, &noise, &out, &[]);
    let size = args.iter().position(|a| a == "--size").unwrap();
    args[size + 1] = "64x48".into();
    refused(&args, &["--size 64x48", "multiple of 32"]);
    // Wan 2.1's latent shape.
    let wan21_noise =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/t2v.safetensors");
    let mut args = run_args(models, &wan21_noise, &out, &[]);
    let size = args.iter().position(|a| a == "--size").unwrap();
    args[size + 1] = "64x64".into();
    refused(&args, &["--initial-noise", "[1, 48, 2, 4, 4]"]);
    // TI2V starts from a first frame only.
    let image = arg(&golden("first.png"));
    refused(
        &run_args(
            models,
            &noise,
            &out,
            &["--image", &image, "--last-image", &image],
        ),
        &["--last-image", "TI2V"],
    );
    // A tile off the Wan 2.2 VAE's 16-px grid.
    refused(
        &run_args(models, &noise, &out, &["--tile", "72"]),
        &["--tile 72", "multiple of 16"],
    );
    assert!(!out.exists());
}

/// A model folder with the TI2V DiT, both VAEs and the text encoder: the TI2V DiT is found for
/// text- and image-to-video, and the VAE of its family is picked.
#[test]
fn a_model_folder_pairs_the_ti2v_dit_with_the_wan22_vae() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    let (dit, config, vae) = ti2v_models();
    for (from, name) in [
        (dit.clone(), "ti2v.safetensors"),
        (vae.clone(), "wan2.2_vae.safetensors"),
        (
            fixture("vpipe-models", "vae/wan_vae_tiny_diffusers.safetensors"),
            "wan_2.1_vae.safetensors",
        ),
        (
            fixture("vpipe-text", "umt5_tiny_transformers.safetensors"),
            "umt5.safetensors",
        ),
        (fixture("vpipe-text", "tokenizer.json"), "tokenizer.json"),
    ] {
        std::fs::copy(from, models.join(name)).unwrap();
    }
    let s = settings();
    let size = format!("{}x{}", s["width"], s["height"]);
    let image = arg(&golden("first.png"));
    for extra in [vec![], vec!["--image", image.as_str()]] {
        let mut args = vec![
            "plan",
            "--model-dir",
            models.to_str().unwrap(),
            "--dit-config",
            config.to_str().unwrap(),
            "--size",
            &size,
            "--frames",
            "5",
            "--device",
            "cpu",
            "--json",
        ];
        args.extend(extra.iter().copied());
        let result = vpipe(&args);
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let mode = if extra.is_empty() {
            "text-to-video"
        } else {
            "image-to-video"
        };
        assert_eq!(plan["mode"], mode, "{stdout}");
    }
}

/// `vpipe plan --preset wan2.2-ti2v-5b` at TI2V-5B's size: planned with the Wan 2.2 VAE (its
/// 704.7 M parameters in the VAE phases' estimates).
#[test]
fn the_ti2v_5b_preset_plans_with_the_wan22_vae() {
    let plan = |preset: &str| -> serde_json::Value {
        let result = vpipe(&[
            "plan", "--preset", preset, "--size", "1280x704", "--frames", "121", "--dtype", "bf16",
            "--device", "cpu", "--json",
        ]);
        assert!(
            result.status.success(),
            "{preset}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        serde_json::from_slice(&result.stdout).unwrap()
    };
    let decode_peak = |plan: &serde_json::Value| {
        plan["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "vae decode")
            .unwrap()["estimated_peak_bytes"]
            .as_u64()
            .unwrap()
    };
    let ti2v = plan("wan2.2-ti2v-5b");
    assert_eq!(ti2v["mode"], "text-to-video");
    // 704.7 M bf16 parameters at least (the Wan 2.1 VAE has 126.9 M).
    assert!(decode_peak(&ti2v) > 1_409_000_000, "{ti2v}");
    assert!(decode_peak(&plan("wan2.1-t2v-1.3b")) < decode_peak(&ti2v));
    // 1280×704×121 on the Wan 2.2 VAE: 31 latent frames of 44×80, 2×2 patches.
    let sample = ti2v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "sample")
        .unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        sample.starts_with(&format!("{} tokens", 31 * 22 * 40)),
        "{sample}"
    );
}
