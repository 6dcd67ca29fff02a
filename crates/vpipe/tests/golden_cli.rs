//! `vpipe run` end to end against diffusers: `WanPipeline` (text-to-video),
//! `WanVideoToVideoPipeline` (video-to-video) and `WanImageToVideoPipeline` (image-to-video,
//! and first-last-frame to video with `last_image`) in float32 on the CPU, on the same tiny
//! models, tokenizer, prompts, scheduler settings and initial noise (`--initial-noise`). The
//! references and the tiny DiTs come from `tools/fixtures/make_pipeline_fixtures.py`
//! (`tests/fixtures/pipeline/`) and `tools/fixtures/make_i2v_pipeline_fixtures.py`
//! (`tests/fixtures/pipeline_i2v/`: also the tiny CLIP vision encoder and the two PNG frames);
//! the VAE, umT5 and tokenizer are the other crates' fixtures.
//!
//! Both the final latents (the `latents` key of a `.safetensors` output) and the decoded video
//! are compared, to 1e-4; text-to-video also at guidance scale 1, where both run the
//! conditional pass only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

mod common;
use common::{fixture, golden_run_args, load, max_abs, vpipe};

/// The bound on max |vpipe − diffusers| of the decoded video.
const TOL: f64 = 1e-4;

/// A file of this crate's `tests/fixtures/pipeline`.
fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pipeline")
        .join(name)
}

/// A file of this crate's `tests/fixtures/pipeline_i2v`.
fn golden_i2v(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pipeline_i2v")
        .join(name)
}

/// Path as an owned string.
fn arg(path: PathBuf) -> String {
    path.to_str().unwrap().to_owned()
}

/// The flags that swap in a run's image-to-video models and frames: the DiT of `mode` (i2v or
/// flf2v), the tiny CLIP vision encoder, the first frame and, for flf2v, the last.
fn image_flags(mode: &str) -> Vec<String> {
    let mut flags = vec![
        "--dit".to_owned(),
        arg(golden_i2v(&format!("dit_tiny_{mode}_text32.safetensors"))),
        "--dit-config".to_owned(),
        arg(golden_i2v(&format!("dit_tiny_{mode}_text32_config.json"))),
        "--clip-vision".to_owned(),
        arg(golden_i2v("clip_vision_tiny48.safetensors")),
        "--clip-vision-config".to_owned(),
        arg(golden_i2v("clip_vision_tiny48_config.json")),
        "--image".to_owned(),
        arg(golden_i2v("first.png")),
    ];
    if mode == "flf2v" {
        flags.extend(["--last-image".to_owned(), arg(golden_i2v("last.png"))]);
    }
    flags
}

/// The generator's record of the settings (prompts, steps, strength...).
fn settings() -> serde_json::Value {
    let text = std::fs::read_to_string(golden("pipeline_fixtures.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `vpipe run` on the fixture models with the reference's settings (its guidance scale unless
/// `cfg` is given), `--initial-noise` from `noise`, the rest from `extra`; the arguments as
/// owned strings.
fn run_args(
    noise: &Path,
    out: &Path,
    (steps, cfg): (u64, Option<f64>),
    extra: &[String],
) -> Vec<String> {
    let fx = settings();
    let s = &fx["settings"];
    let vae = fixture("vpipe-models", "vae/wan_vae_tiny_diffusers.safetensors");
    let cfg = cfg.map_or_else(|| s["guidance_scale"].to_string(), |c| c.to_string());
    let mut args = golden_run_args(
        (
            &golden("dit_tiny_text32.safetensors"),
            &golden("dit_tiny_text32_config.json"),
            &vae,
        ),
        s,
        (&steps.to_string(), &cfg),
        noise,
        out,
    );
    args.extend(["--shift".to_owned(), s["shift"].to_string()]);
    args.extend_from_slice(extra);
    args
}

/// Runs `vpipe run` for `mode` (t2v, v2v, i2v or flf2v; t2v_cfg1: t2v at guidance scale 1)
/// and returns max |vpipe − diffusers| of the decoded video, and the run's report.
fn video_error(mode: &str) -> (f64, serde_json::Value) {
    let fx = settings();
    let (run, cfg) = match mode {
        "t2v_cfg1" => (&fx["runs"]["t2v"], Some(1.0)),
        // The image runs share the text-to-video settings (the generator asserts it) and take
        // their steps from the same record.
        "i2v" | "flf2v" => (&fx["runs"]["t2v"], None),
        _ => (&fx["runs"][mode], None),
    };
    let reference_file = match mode {
        "i2v" | "flf2v" => golden_i2v(&format!("{mode}.safetensors")),
        _ => golden(&format!("{mode}.safetensors")),
    };
    let reference = load(&reference_file);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let extra = match mode {
        // The clip is `video_in` of the same file as the noise.
        "v2v" => vec![
            "--input".to_owned(),
            reference_file.to_str().unwrap().to_owned(),
            "--strength".to_owned(),
            run["strength"].to_string(),
        ],
        "i2v" | "flf2v" => image_flags(mode),
        _ => vec![],
    };
    let report_file = dir.path().join("report.json");
    let mut extra = extra;
    extra.extend([
        "--report".to_owned(),
        report_file.to_str().unwrap().to_owned(),
    ]);
    let args = run_args(
        &reference_file,
        &out,
        (run["steps"].as_u64().unwrap(), cfg),
        &extra,
    );
    run_against_reference(mode, &args, &reference, (&out, &report_file))
}

/// Runs `vpipe` with `args` (writing `out` and `report_file`), checks the final latents
/// against `reference`'s to [`TOL`], and returns max |vpipe − reference| of the decoded video
/// and the run's report.
fn run_against_reference(
    name: &str,
    args: &[String],
    reference: &HashMap<String, Tensor>,
    (out, report_file): (&Path, &Path),
) -> (f64, serde_json::Value) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = vpipe(&args);
    assert!(
        result.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let made = load(out);
    let latents = max_abs(&made["latents"], &reference["latents"]);
    println!("{name}: max |vpipe - diffusers| of the final latents {latents:.3e}");
    assert!(
        latents <= TOL,
        "{name}: latents max abs {latents:.3e} > {TOL:.0e}"
    );
    let video = &made["video"];
    let expected = &reference["video"];
    assert_eq!(video.dims(), expected.dims(), "{name}");
    let err = max_abs(video, expected);
    println!(
        "{name}: max |vpipe - diffusers| of the decoded video {err:.3e} (bound {TOL:.0e}; video \
         values up to {:.3})",
        max_abs(expected, &expected.zeros_like().unwrap())
    );
    let report = serde_json::from_str(&std::fs::read_to_string(report_file).unwrap()).unwrap();
    (err, report)
}

/// The detail of the report's `sampling` note.
fn sampling_note(report: &serde_json::Value) -> String {
    report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["what"] == "sampling")
        .and_then(|n| n["detail"].as_str())
        .unwrap()
        .to_owned()
}

#[test]
fn text_to_video_matches_diffusers_wan_pipeline() {
    let (err, report) = video_error("t2v");
    assert!(sampling_note(&report).contains("Batched"));
    assert!(err <= TOL, "t2v: max abs {err:.3e} > {TOL:.0e}");
}

#[test]
fn video_to_video_matches_diffusers_video_to_video_pipeline() {
    let (err, _) = video_error("v2v");
    assert!(err <= TOL, "v2v: max abs {err:.3e} > {TOL:.0e}");
}

/// At guidance scale 1 diffusers runs the conditional pass only; so does vpipe, and the
/// report says so.
#[test]
fn text_to_video_at_guidance_1_runs_one_forward_and_matches_diffusers() {
    let (err, report) = video_error("t2v_cfg1");
    let note = sampling_note(&report);
    assert!(note.contains("one forward per step"), "{note}");
    assert!(err <= TOL, "t2v at CFG 1: max abs {err:.3e} > {TOL:.0e}");
}

#[test]
fn image_to_video_matches_diffusers_image_to_video_pipeline() {
    let (err, report) = video_error("i2v");
    let phases = common::phase_names(&report);
    assert!(
        ["clip vision", "vae encode"]
            .iter()
            .all(|p| phases.iter().any(|q| q == p)),
        "{phases:?}"
    );
    assert!(err <= TOL, "i2v: max abs {err:.3e} > {TOL:.0e}");
}

#[test]
fn first_last_frame_to_video_matches_diffusers_with_last_image() {
    let (err, _) = video_error("flf2v");
    assert!(err <= TOL, "flf2v: max abs {err:.3e} > {TOL:.0e}");
}

/// Wan 2.2's text-to-video expert pair against diffusers' `WanPipeline` with `transformer_2`
/// and `boundary_ratio` 0.875 (`tools/fixtures/make_a14b_pipeline_fixtures.py`): the
/// high-noise expert takes the steps at timesteps 999 to 923 at CFG 4, the low-noise one 857
/// and 707 at CFG 3, one UniPC sampler across the switch; each expert in a phase of its own,
/// the first given back (verified) before the second is loaded.
#[test]
fn the_wan22_expert_pair_matches_diffusers_with_transformer_2() {
    let report = expert_pair_error("a14b", "12", &[]);
    let phases = common::phase_names(&report);
    let high = phases
        .iter()
        .position(|p| p == "sample high noise")
        .unwrap();
    assert_eq!(phases[high + 1], "sample low noise", "{phases:?}");
    // Each expert is loaded and given back in its own phase, every move verified.
    let moves: Vec<(String, String)> = report["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["model"].as_str().unwrap().starts_with("dit"))
        .map(|t| {
            assert_eq!(t["verified"], true, "{t}");
            (
                t["phase"].as_str().unwrap().to_owned(),
                t["model"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("sample high noise", "dit"),
        ("sample high noise", "dit"),
        ("sample low noise", "dit low noise"),
        ("sample low noise", "dit low noise"),
    ]
    .map(|(p, m)| (p.to_owned(), m.to_owned()))
    .to_vec();
    assert_eq!(moves, expected);
    let steps: Vec<&str> = report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["what"] == "step")
        .map(|n| n["detail"].as_str().unwrap())
        .collect();
    assert_eq!(steps.len(), 6, "{steps:?}");
    // The switch is timed and measured, in the second expert's phase.
    let switch: Vec<&serde_json::Value> = report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["what"] == "expert switch")
        .collect();
    assert_eq!(switch.len(), 1, "{switch:?}");
    assert_eq!(switch[0]["phase"], "sample low noise");
    assert!(
        switch[0]["detail"].as_str().unwrap().contains("measured"),
        "{switch:?}"
    );
}

/// Wan 2.2's image-to-video expert pair (no CLIP features: the condition alone) against
/// diffusers' `WanImageToVideoPipeline` with `transformer_2` and `boundary_ratio` 0.9
/// (`tools/fixtures/make_i2v_a14b_pipeline_fixtures.py`), first frame only and first and last.
#[test]
fn the_wan22_image_expert_pair_matches_diffusers() {
    let image = |name: &str| arg(golden_i2v(name));
    expert_pair_error("i2v_a14b", "5", &["--image".into(), image("first.png")]);
    expert_pair_error(
        "flf2v_a14b",
        "5",
        &[
            "--image".into(),
            image("first.png"),
            "--last-image".into(),
            image("last.png"),
        ],
    );
}

/// Runs the Wan 2.2 pair fixture `name` (a14b: text-to-video from `pipeline_a14b/`; i2v_a14b
/// and flf2v_a14b from `pipeline_i2v_a14b/`) at flow shift `shift` with `extra` flags, checks
/// the final latents and the video against diffusers' to [`TOL`], and returns the report.
fn expert_pair_error(name: &str, shift: &str, extra: &[String]) -> serde_json::Value {
    let (folder, kind) = match name {
        "a14b" => ("pipeline_a14b", ""),
        _ => ("pipeline_i2v_a14b", "i2v_"),
    };
    let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(folder);
    let file = |name: &str| arg(folder.join(name));
    let reference_file = folder.join(format!("{name}.safetensors"));
    let reference = load(&reference_file);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let report_file = dir.path().join("report.json");
    let boundary = if kind.is_empty() { "0.875" } else { "0.9" };
    let mut flags: Vec<String> = [
        "--dit",
        &file(&format!("dit_tiny_{kind}high_text32.safetensors")),
        "--dit-config",
        &file(&format!("dit_tiny_{kind}high_text32_config.json")),
        "--dit-low-noise",
        &file(&format!("dit_tiny_{kind}low_text32.safetensors")),
        "--dit-low-noise-config",
        &file(&format!("dit_tiny_{kind}low_text32_config.json")),
        "--boundary",
        boundary,
        "--cfg-low-noise",
        "3",
        "--shift",
        shift,
        "--report",
        report_file.to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec();
    flags.extend_from_slice(extra);
    let args = run_args(&reference_file, &out, (6, Some(4.0)), &flags);
    let (err, report) = run_against_reference(name, &args, &reference, (&out, &report_file));
    assert!(err <= TOL, "{name} video: max abs {err:.3e} > {TOL:.0e}");
    report
}

/// A PNG chunk: length, type, data and the CRC of type and data.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(kind);
    hasher.update(data);
    out.extend_from_slice(&hasher.finalize().to_be_bytes());
    out
}

/// A well-formed PNG header declaring `width` × `height` RGB pixels, then a token image.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

/// A real 1×1 PNG, as vpipe writes frames.
fn one_pixel_png(dir: &Path) -> PathBuf {
    let frames = dir.join("one-pixel");
    let video = vpipe_video::Video::new(vec![200, 100, 50], 1, 1, 16.0).unwrap();
    vpipe_video::write_video(&frames, &video, &Default::default()).unwrap();
    let png = std::fs::read_dir(&frames)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    let path = dir.join("one-pixel.png");
    std::fs::rename(png, &path).unwrap();
    path
}

/// Images vpipe cannot start from are bad input (exit 2) naming the flag and the file, before
/// any output is written: a corrupt PNG, a file named as another format, a 1×1 image, a
/// header declaring 20000×20000 pixels, a CMYK JPEG; and so is a last frame without a first.
#[test]
fn bad_images_are_bad_input_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corrupt = d.join("corrupt.png");
    let mut bytes = png_header(64, 48);
    bytes.truncate(40);
    bytes.extend_from_slice(b"not zlib data at all");
    std::fs::write(&corrupt, bytes).unwrap();
    let renamed = d.join("first.bmp");
    std::fs::copy(golden_i2v("first.png"), &renamed).unwrap();
    let huge = d.join("huge.png");
    std::fs::write(&huge, png_header(20_000, 20_000)).unwrap();
    let cases: [(&str, PathBuf, &str); 5] = [
        ("--image", corrupt, "PNG"),
        ("--image", renamed, "expected a PNG or JPEG image"),
        (
            "--image",
            one_pixel_png(d),
            "a 1×1 image; expected at least 16×16",
        ),
        ("--image", huge, "20000"),
        (
            "--last-image",
            fixture("vpipe-video", "cmyk_8x8.jpg"),
            "CMYK",
        ),
    ];
    let noise = golden_i2v("flf2v.safetensors");
    let out = d.join("out.safetensors");
    for (flag, image, message) in cases {
        let mut extra = image_flags("flf2v");
        extra.extend([flag.to_owned(), arg(image.clone())]);
        let args = run_args(&noise, &out, (1, None), &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = vpipe(&args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(2), "{image:?}: {stderr}");
        for needle in [flag, image.to_str().unwrap(), message] {
            assert!(
                stderr.contains(needle),
                "{image:?}: no {needle:?} in {stderr}"
            );
        }
        assert!(!out.exists(), "{image:?}: an output was written");
    }
    // A last frame without a first one.
    let mut extra = image_flags("flf2v");
    extra.retain(|a| a != "--image" && !a.ends_with("first.png"));
    let args = run_args(&noise, &out, (1, None), &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = vpipe(&args);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--last-image: needs --image"), "{stderr}");
}

/// Writes `tensors` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let path = dir.join(name);
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| ((*k).to_owned(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

/// Runs with `noise` as `--initial-noise` (text-to-video) and returns (exit code, stderr).
fn run_with_noise(noise: &Path, out: &Path) -> (Option<i32>, String) {
    let args = run_args(noise, out, (2, None), &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = vpipe(&args);
    (
        result.status.code(),
        String::from_utf8_lossy(&result.stderr).into_owned(),
    )
}

#[test]
fn bad_initial_noise_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    // The run's latents are [1, 16, 3, 6, 8] (9 frames at 64x48).
    let expected = "[1, 16, 3, 6, 8]";
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();

    let wrong = write(
        dir.path(),
        "wrong-shape.safetensors",
        &[("noise", zeros(&[1, 16, 2, 6, 8]))],
    );
    let (code, stderr) = run_with_noise(&wrong, &out);
    assert_eq!(code, Some(2), "{stderr}");
    for needle in [
        "--initial-noise",
        wrong.to_str().unwrap(),
        "[1, 16, 2, 6, 8]",
        expected,
    ] {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }

    let no_key = write(
        dir.path(),
        "no-key.safetensors",
        &[("latents", zeros(&[1, 16, 3, 6, 8]))],
    );
    let (code, stderr) = run_with_noise(&no_key, &out);
    assert_eq!(code, Some(2), "{stderr}");
    for needle in [no_key.to_str().unwrap(), "'noise'", "'latents'", expected] {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }

    let int = write(
        dir.path(),
        "int.safetensors",
        &[(
            "noise",
            zeros(&[1, 16, 3, 6, 8]).to_dtype(DType::I64).unwrap(),
        )],
    );
    let (code, stderr) = run_with_noise(&int, &out);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("dtype"), "{stderr}");

    let not_safetensors = dir.path().join("noise.safetensors");
    std::fs::write(&not_safetensors, b"not a safetensors file").unwrap();
    let (code, stderr) = run_with_noise(&not_safetensors, &out);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(not_safetensors.to_str().unwrap()) && stderr.contains(expected),
        "{stderr}"
    );

    let (code, stderr) = run_with_noise(&dir.path().join("missing.safetensors"), &out);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--initial-noise"), "{stderr}");

    // --out may not overwrite the noise file.
    let good = write(
        dir.path(),
        "good.safetensors",
        &[("noise", zeros(&[1, 16, 3, 6, 8]))],
    );
    let (code, stderr) = run_with_noise(&good, &good);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--initial-noise"), "{stderr}");
    assert!(!out.exists());
}

/// `vpipe run` on the golden models for 8 text-to-video steps with `extra` flags; the final
/// latents and the report.
fn cached_run(dir: &Path, name: &str, extra: &[&str]) -> (Tensor, serde_json::Value) {
    let noise = golden("t2v.safetensors");
    let out = dir.join(format!("{name}.safetensors"));
    let report = dir.join(format!("{name}.json"));
    let mut extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    extra.extend(["--report".to_owned(), report.to_str().unwrap().to_owned()]);
    let args = run_args(&noise, &out, (8, None), &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = vpipe(&args);
    assert!(
        result.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    (load(&out)["latents"].clone(), report)
}

/// The report's `step cache` note.
fn cache_note(report: &serde_json::Value) -> Option<String> {
    report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["what"] == "step cache")
        .map(|n| n["detail"].as_str().unwrap().to_owned())
}

#[test]
fn the_step_cache_changes_nothing_at_threshold_0_and_skips_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let (exact, report) = cached_run(dir.path(), "exact", &[]);
    assert_eq!(cache_note(&report), None);
    let (at_zero, report) = cached_run(
        dir.path(),
        "zero",
        &["--cache", "teacache", "--cache-threshold", "0"],
    );
    let note = cache_note(&report).unwrap();
    assert!(note.contains("skipped at 0 of 8 steps"), "{note}");
    assert_eq!(max_abs(&at_zero, &exact), 0.0);
    // The tiny model's time modulation changes by 0.6 to 1.4 from step to step (random
    // weights): 1.2 skips some steps and not others.
    let cached = ["--cache", "teacache", "--cache-threshold", "1.2"];
    let (first, report) = cached_run(dir.path(), "first", &cached);
    let (again, again_report) = cached_run(dir.path(), "again", &cached);
    let note = cache_note(&report).unwrap();
    assert!(!note.contains("skipped at 0 of"), "{note}");
    assert_eq!(cache_note(&again_report).unwrap(), note);
    assert_eq!(max_abs(&first, &again), 0.0);
    assert!(max_abs(&first, &exact) > 0.0, "{note}");
    // Each skipped step says so.
    let skipped_steps = report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["what"] == "step" && n["detail"].as_str().unwrap().contains("skipped"))
        .count();
    assert!(
        note.contains(&format!("skipped at {skipped_steps} of 8")),
        "{note}"
    );
}

#[test]
fn a_step_cache_that_is_not_built_or_a_bad_threshold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let noise = golden("t2v.safetensors");
    let out = dir.path().join("out.safetensors");
    for (extra, code, says) in [
        (
            ["--cache", "magcache", "--cache-threshold", "0.1"],
            2,
            "--cache magcache",
        ),
        (
            ["--cache", "nocache", "--cache-threshold", "0.1"],
            2,
            "--cache nocache",
        ),
        (
            ["--cache", "teacache", "--cache-threshold=-1", "--seed=1"],
            2,
            "--cache-threshold",
        ),
    ] {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let args = run_args(&noise, &out, (2, None), &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = vpipe(&args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(code), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(!out.exists());
    }
}

/// `--fp8-compute` on the CPU runs the GPU's float8 arithmetic emulated: the same run as exact
/// bf16 but for float8's error (the final latents close to the exact run's and to diffusers'
/// f32 ones, not equal), and the plan and report say so. With f32 activations the flag is bad
/// input naming itself, as is `--attention fp8` (cuDNN's, CUDA only) on the CPU.
#[test]
fn fp8_compute_runs_near_the_exact_products_and_says_so() {
    let fx = settings();
    let run = &fx["runs"]["t2v"];
    let reference_file = golden("t2v.safetensors");
    let reference = load(&reference_file);
    let dir = tempfile::tempdir().unwrap();
    let latents_of = |extra: &[&str]| {
        let out = dir.path().join("out.safetensors");
        let report_file = dir.path().join("report.json");
        let mut extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        extra.extend(["--report".to_owned(), arg(report_file.clone())]);
        let args = run_args(
            &reference_file,
            &out,
            (run["steps"].as_u64().unwrap(), None),
            &extra,
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = vpipe(&args);
        let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
        let made = result.status.success().then(|| {
            let report: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&report_file).unwrap()).unwrap();
            (load(&out)["latents"].clone(), report)
        });
        (result.status.code(), stderr, made)
    };
    let relative = |a: &Tensor, b: &Tensor| {
        let (a, b) = (
            a.to_dtype(DType::F64).unwrap(),
            b.to_dtype(DType::F64).unwrap(),
        );
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        (norm(&(&a - &b).unwrap()) / norm(&b)).sqrt()
    };
    let (_, _, exact) = latents_of(&["--dtype", "bf16"]);
    let (exact, _) = exact.expect("the exact bf16 run");
    let (_, _, fp8) = latents_of(&["--dtype", "bf16", "--fp8-compute"]);
    let (fp8, report) = fp8.expect("the fp8 run");
    let note = sampling_note(&report);
    assert!(note.contains("float8"), "{note}");
    let diffusers = &reference["latents"];
    let (against_exact, exact_against_diffusers, against_diffusers) = (
        relative(&fp8, &exact),
        relative(&exact, diffusers),
        relative(&fp8, diffusers),
    );
    println!(
        "final latents, relative L2: fp8 against exact bf16 {against_exact:.3e}; against \
         diffusers f32 {against_diffusers:.3e} (exact bf16 {exact_against_diffusers:.3e})"
    );
    // The tiny model in bf16 is already far from f32 (its own rounding over two steps);
    // float8 adds its error to that, and must not be a different computation.
    assert!(
        against_exact > 0.0 && against_exact < 0.15,
        "fp8 against exact bf16: {against_exact}"
    );
    assert!(
        against_diffusers < 1.1 * exact_against_diffusers,
        "{against_diffusers} against {exact_against_diffusers}"
    );
    let (code, stderr, made) = latents_of(&["--fp8-compute"]);
    assert!(made.is_none());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--fp8-compute"), "{stderr}");
    // cuDNN's float8 attention has no CPU path: bad input naming the flag.
    let (code, stderr, made) = latents_of(&["--dtype", "bf16", "--attention", "fp8"]);
    assert!(made.is_none());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--attention fp8"), "{stderr}");
}
