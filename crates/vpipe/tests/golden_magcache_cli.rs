//! `vpipe run --cache magcache` and `--cache magcache-calibrate` against diffusers'
//! `WanPipeline` with `transformer.enable_cache(MagCacheConfig(...))`, in float32 on the CPU,
//! on the text-to-video golden's tiny models, settings and initial noise (`tests/fixtures/
//! pipeline/`) at 10 steps. The references come from
//! `tools/fixtures/make_magcache_fixtures.py` (`tests/fixtures/pipeline_magcache/`): the steps
//! whose blocks diffusers skipped, its final latents and decoded video, and the ratios its
//! calibration measured for the condition.

use std::path::{Path, PathBuf};

use candle_core::Tensor;

mod common;
use common::{fixture, golden_run_args, load, max_abs, vpipe};

/// The bound on max |vpipe − diffusers| of the latents and the video, and on the relative
/// error of each calibrated ratio.
const TOL: f64 = 1e-4;

fn pipeline(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pipeline")
        .join(name)
}

fn magcache(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pipeline_magcache")
        .join(name)
}

fn fixtures() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(magcache("magcache_fixtures.json")).unwrap())
        .unwrap()
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// `vpipe run` on the golden models with the reference's settings, writing `out` (and the
/// report next to it), `extra` flags added.
fn args(out: &Path, extra: &[String]) -> Vec<String> {
    let fx = fixtures();
    let s = &fx["settings"];
    let vae = fixture("vpipe-models", "vae/wan_vae_tiny_diffusers.safetensors");
    let mut args = golden_run_args(
        (
            &pipeline("dit_tiny_text32.safetensors"),
            &pipeline("dit_tiny_text32_config.json"),
            &vae,
        ),
        s,
        (&s["steps"].to_string(), &s["guidance_scale"].to_string()),
        &pipeline("t2v.safetensors"),
        out,
    );
    args.extend([
        "--shift".to_owned(),
        s["shift"].to_string(),
        "--report".to_owned(),
        path(&out.with_extension("json")),
    ]);
    args.extend_from_slice(extra);
    args
}

/// Runs `vpipe` in `dir` as `name` with `extra` flags; the final latents, the video and the
/// report.
fn run(dir: &Path, name: &str, extra: &[&str]) -> (Tensor, Tensor, serde_json::Value) {
    let out = dir.join(format!("{name}.safetensors"));
    let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    let args = args(&out, &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = vpipe(&args);
    assert!(
        result.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report = std::fs::read_to_string(out.with_extension("json")).unwrap();
    let made = load(&out);
    (
        made["latents"].clone(),
        made["video"].clone(),
        serde_json::from_str(&report).unwrap(),
    )
}

fn note(report: &serde_json::Value, what: &str) -> Option<String> {
    report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["what"] == what)
        .map(|n| n["detail"].as_str().unwrap().to_owned())
}

/// The steps (counted from 0, as diffusers' hook counts them) whose note says the blocks were
/// skipped.
fn skipped_steps(report: &serde_json::Value) -> Vec<u64> {
    report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["what"] == "step")
        .map(|n| n["detail"].as_str().unwrap())
        .filter(|d| d.contains("blocks skipped"))
        .map(|d| d.split('/').next().unwrap().parse::<u64>().unwrap() - 1)
        .collect()
}

fn numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn magcache_skips_the_steps_diffusers_skips_and_matches_its_video() {
    let fx = fixtures();
    let m = &fx["magcache"];
    let dir = tempfile::tempdir().unwrap();
    let (latents, video, report) = run(
        dir.path(),
        "magcache",
        &[
            "--cache",
            "magcache",
            "--mag-ratios",
            &path(&magcache("mag_ratios.json")),
            "--cache-threshold",
            &m["threshold"].to_string(),
            "--cache-max-skip",
            &m["max_skip_steps"].to_string(),
            "--cache-retention",
            &m["retention_ratio"].to_string(),
        ],
    );
    let expected: Vec<u64> = m["skipped_steps"]["cond"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(skipped_steps(&report), expected);
    let note = note(&report, "step cache").unwrap();
    assert!(
        note.contains("magcache")
            && note.contains(&format!("skipped at {} of 10", expected.len()))
            && note.contains("mag_ratios.json"),
        "{note}"
    );
    let reference = load(&magcache("magcache.safetensors"));
    let latents_err = max_abs(&latents, &reference["latents"]);
    let video_err = max_abs(&video, &reference["video"]);
    println!(
        "magcache: skipped {expected:?}; max |vpipe - diffusers| latents {latents_err:.3e}, \
         video {video_err:.3e}"
    );
    assert!(latents_err <= TOL, "latents {latents_err:.3e}");
    assert!(video_err <= TOL, "video {video_err:.3e}");
}

#[test]
fn calibration_measures_diffusers_ratios_and_threshold_0_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ratios_file = dir.path().join("ratios.json");
    let (exact, _, _) = run(dir.path(), "exact", &[]);
    let (calibrated, _, report) = run(
        dir.path(),
        "calibrate",
        &[
            "--cache",
            "magcache-calibrate",
            "--mag-ratios",
            &path(&ratios_file),
        ],
    );
    // Calibration runs every step.
    assert_eq!(max_abs(&calibrated, &exact), 0.0);
    assert!(note(&report, "magcache calibration").is_some());
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ratios_file).unwrap()).unwrap();
    let made = numbers(&written["mag_ratios"]);
    let expected = numbers(&fixtures()["calibration"]["ratios"]["cond"]);
    assert_eq!(made.len(), expected.len());
    let worst = made
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs() / b.abs())
        .fold(0.0, f64::max);
    println!("calibration: ratios {made:?}; worst relative error {worst:.3e}");
    assert!(worst <= TOL, "{made:?} vs {expected:?}");
    // At threshold 0 only ratios that multiply to exactly 1 would skip; the measured ones
    // (read back in the form calibration writes) never do after the first step.
    let (at_zero, _, report) = run(
        dir.path(),
        "zero",
        &[
            "--cache",
            "magcache",
            "--mag-ratios",
            &path(&ratios_file),
            "--cache-threshold",
            "0",
        ],
    );
    assert!(skipped_steps(&report).is_empty());
    assert!(note(&report, "step cache")
        .unwrap()
        .contains("skipped at 0 of 10"));
    assert_eq!(max_abs(&at_zero, &exact), 0.0);
}

#[test]
fn missing_or_bad_mag_ratios_are_refused_naming_the_flag_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let missing = dir.path().join("missing.json");
    let not_json = dir.path().join("not_json.json");
    std::fs::write(&not_json, "1.0, 0.9").unwrap();
    let no_ratios = dir.path().join("no_ratios.json");
    std::fs::write(&no_ratios, r#"{"ratios": [1.0]}"#).unwrap();
    let not_numbers = dir.path().join("not_numbers.json");
    std::fs::write(&not_numbers, r#"[1.0, "fast"]"#).unwrap();
    let cases: Vec<(Vec<String>, Vec<String>)> = [&missing, &not_json, &no_ratios, &not_numbers]
        .iter()
        .map(|file| {
            (
                vec![
                    "--cache".into(),
                    "magcache".into(),
                    "--mag-ratios".into(),
                    path(file),
                ],
                vec!["--mag-ratios".into(), path(file)],
            )
        })
        .chain([(
            vec!["--cache".into(), "magcache".into()],
            vec!["--mag-ratios".into(), "magcache-calibrate".into()],
        )])
        .collect();
    for (extra, says) in cases {
        let args = args(&out, &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = vpipe(&args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(2), "{extra:?}: {stderr}");
        for s in says {
            assert!(stderr.contains(&s), "{extra:?}: {stderr}");
        }
        assert!(!out.exists());
    }
}

/// Sets the value that follows `flag` in `args`.
fn set(args: &mut [String], flag: &str, value: &str) {
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1] = value.to_owned();
}

/// Runs the Wan 2.2 expert pair of `tests/fixtures/pipeline_a14b/` (6 steps, CFG 4, boundary
/// 0.875, shift 12) as `name` with `extra` flags; the final latents and the report.
fn pair_run(dir: &Path, name: &str, extra: &[&str]) -> (Tensor, serde_json::Value) {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline_a14b");
    let file = |n: &str| path(&folder.join(n));
    let out = dir.join(format!("{name}.safetensors"));
    let mut extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    extra.extend(
        [
            "--dit-low-noise",
            &file("dit_tiny_low_text32.safetensors"),
            "--dit-low-noise-config",
            &file("dit_tiny_low_text32_config.json"),
            "--boundary",
            "0.875",
            "--cfg-low-noise",
            "3",
        ]
        .map(str::to_owned),
    );
    let mut args = args(&out, &extra);
    set(
        &mut args,
        "--dit",
        &file("dit_tiny_high_text32.safetensors"),
    );
    set(
        &mut args,
        "--dit-config",
        &file("dit_tiny_high_text32_config.json"),
    );
    set(&mut args, "--steps", "6");
    set(&mut args, "--cfg", "4");
    set(&mut args, "--shift", "12");
    set(&mut args, "--initial-noise", &file("a14b.safetensors"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = vpipe(&args);
    assert!(
        result.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report = std::fs::read_to_string(out.with_extension("json")).unwrap();
    (
        load(&out)["latents"].clone(),
        serde_json::from_str(&report).unwrap(),
    )
}

/// Each expert of a Wan 2.2 pair keeps its own residual, as each transformer's hook does in
/// diffusers: calibration measures 1 at the first step of each, and MagCache runs the blocks
/// there however large the threshold; the ratios span the whole run.
#[test]
fn each_expert_of_a_pair_keeps_its_own_residual() {
    let dir = tempfile::tempdir().unwrap();
    let ratios_file = dir.path().join("pair_ratios.json");
    let (exact, _) = pair_run(dir.path(), "exact", &[]);
    let (calibrated, report) = pair_run(
        dir.path(),
        "calibrate",
        &[
            "--cache",
            "magcache-calibrate",
            "--mag-ratios",
            &path(&ratios_file),
        ],
    );
    assert_eq!(max_abs(&calibrated, &exact), 0.0);
    let calibration_notes = report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["what"] == "magcache calibration")
        .count();
    assert_eq!(calibration_notes, 2);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ratios_file).unwrap()).unwrap();
    let ratios = numbers(&written["mag_ratios"]);
    assert_eq!(ratios.len(), 6);
    let firsts: Vec<usize> = (0..6).filter(|&i| ratios[i] == 1.0).collect();
    assert_eq!(firsts.len(), 2, "{ratios:?}");
    assert_eq!(firsts[0], 0);
    let (_, report) = pair_run(
        dir.path(),
        "skip_all",
        &[
            "--cache",
            "magcache",
            "--mag-ratios",
            &path(&ratios_file),
            "--cache-threshold",
            "1e6",
            "--cache-max-skip",
            "100",
            "--cache-retention",
            "0",
        ],
    );
    let expected: Vec<u64> = (1..6u64).filter(|&i| i as usize != firsts[1]).collect();
    assert_eq!(skipped_steps(&report), expected);
}
