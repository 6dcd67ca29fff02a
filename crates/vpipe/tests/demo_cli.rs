//! `vpipe demo` end to end, and the CLI's exit codes.

use std::process::Command;

fn vpipe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vpipe"))
}

#[test]
fn demo_runs_every_phase_and_writes_a_verified_report_and_chart() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let run = vpipe()
        .args(["demo", "--steps", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
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
    let transitions = report["transitions"].as_array().unwrap();
    // Each of the four model phases loads one model and gives it back.
    assert_eq!(transitions.len(), 8);
    assert!(transitions.iter().all(|t| t["verified"] == true));
    for phase in report["phases"].as_array().unwrap() {
        assert_eq!(phase["resident_compute_bytes"], 0, "{phase}");
    }
    // The DiT (8.5 MiB of f32 weights) was really resident while sampling, and the LoRA was
    // checked against it and merged.
    let sample = &report["phases"][5];
    assert!(
        sample["peak_above_baseline"].as_u64().unwrap() >= 8 << 20,
        "{sample}"
    );
    let notes = report["notes"].to_string();
    assert!(notes.contains("4 patches"), "{notes}");
    // The shift phase moved no model.
    assert!(transitions.iter().all(|t| t["phase"] != "shift"));
    let svg = std::fs::read_to_string(out.join("memory.svg")).unwrap();
    assert!(svg.contains("vae decode"));
    // The MP4 decodes back to the clip's frame count and size.
    let video = vpipe_video::read_video(out.join("demo.mp4")).unwrap();
    assert_eq!(
        (video.num_frames(), video.width(), video.height()),
        (9, 96, 64)
    );
    assert!(stdout.contains("measured"), "{stdout}");
}

#[test]
fn demo_over_budget_is_refused_with_exit_code_3() {
    let dir = tempfile::tempdir().unwrap();
    let run = vpipe()
        .args(["demo", "--vram-budget", "8MiB", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("refused to load 'vae'") && stderr.contains("8.00 MiB"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn bad_flags_and_missing_features_get_clear_errors() {
    let budget = vpipe()
        .args(["demo", "--vram-budget", "lots"])
        .output()
        .unwrap();
    assert_eq!(budget.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&budget.stderr).contains("--vram-budget lots"));

    let device = vpipe().args(["demo", "--device", "tpu"]).output().unwrap();
    assert_eq!(device.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&device.stderr).contains("--device tpu"));

    let run = vpipe().args(["run", "--prompt", "a cat"]).output().unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("--dit: required"));
    let image = vpipe()
        .args(["run", "--prompt", "a cat", "--image", "first.png"])
        .output()
        .unwrap();
    assert_eq!(image.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&image.stderr).contains("not built yet"));
}
