//! `vpipe demo` end to end, its built-in weights, and the CLI's exit codes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

mod common;

fn vpipe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vpipe"))
}

#[test]
fn demo_runs_every_phase_and_writes_a_verified_report_and_chart() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let (stdout, report) = demo_report(&["--steps", "2"], &out);
    let phases = common::phase_names(&report);
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
    assert_eq!(image.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&image.stderr).contains("--image first.png"));
    let mode = vpipe().args(["demo", "--mode", "t2i"]).output().unwrap();
    assert_eq!(mode.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&mode.stderr).contains("--mode t2i: expected v2v, i2v or t2v"));
}

/// `--model wan2.2`: a built-in expert pair, each expert sampling in a phase of its own (the
/// first given back before the second is loaded), text-to-video and image-to-video.
#[test]
fn the_wan22_demo_switches_experts() {
    for mode in ["t2v", "i2v"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("demo");
        let (stdout, report) =
            demo_report(&["--model", "wan2.2", "--mode", mode, "--steps", "4"], &out);
        assert!(stdout.contains("Wan 2.2 expert-pair"), "{stdout}");
        let phases = common::phase_names(&report);
        let high = phases.iter().position(|p| p == "sample high noise");
        let low = phases.iter().position(|p| p == "sample low noise");
        assert!(
            matches!((high, low), (Some(h), Some(l)) if l == h + 1),
            "{phases:?}"
        );
        // No phase ends with a model resident: the high-noise expert is gone before the
        // low-noise one loads.
        for phase in report["phases"].as_array().unwrap() {
            assert_eq!(phase["resident_compute_bytes"], 0, "{phase}");
        }
        let transitions = report["transitions"].as_array().unwrap();
        assert!(transitions.iter().all(|t| t["verified"] == true));
        // No CLIP vision for Wan 2.2's image experts.
        assert!(!phases.iter().any(|p| p == "clip vision"), "{phases:?}");
    }
}

/// `--mode i2v`: the image-to-video phases (a CLIP vision phase, the first frame's
/// conditioning encoded by the VAE), every move verified, the video written.
#[test]
fn image_to_video_demo_runs_the_clip_vision_phase_and_writes_the_video() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let (stdout, report) = demo_report(&["--mode", "i2v", "--steps", "2"], &out);
    assert!(stdout.contains("image-to-video"), "{stdout}");
    let phases = common::phase_names(&report);
    assert_eq!(
        phases,
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
        ]
    );
    let transitions = report["transitions"].as_array().unwrap();
    // Five model phases, each loading one model and giving it back.
    assert_eq!(transitions.len(), 10);
    assert!(transitions.iter().all(|t| t["verified"] == true));
    assert!(transitions
        .iter()
        .any(|t| t["phase"] == "clip vision" && t["model"] == "clip vision"));
    let video = vpipe_video::read_video(out.join("demo.mp4")).unwrap();
    assert_eq!(
        (video.num_frames(), video.width(), video.height()),
        (9, 96, 64)
    );
}

/// Runs `vpipe demo` with `args` into `out` and returns its standard output and its report.
fn demo_report(args: &[&str], out: &Path) -> (String, serde_json::Value) {
    let run = vpipe()
        .arg("demo")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    (stdout, report)
}

/// Every file of a folder, by name.
fn folder_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            (name, std::fs::read(entry.path()).unwrap())
        })
        .collect()
}

/// Runs `vpipe demo` (2 steps, the default seed) into `out` and returns its stderr.
fn run_demo(out: &Path) -> String {
    let run = vpipe()
        .args(["demo", "--steps", "2", "--out"])
        .arg(out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stderr}");
    stderr
}

/// The weight files of one fresh demo into an empty folder: what every demo folder must hold.
fn fresh_demo_weights() -> &'static BTreeMap<String, Vec<u8>> {
    static WEIGHTS: OnceLock<BTreeMap<String, Vec<u8>>> = OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        run_demo(dir.path());
        let weights = folder_files(&dir.path().join("weights"));
        assert_eq!(
            weights.keys().collect::<Vec<_>>(),
            [
                "lora-tiny-seed42.safetensors",
                "tokenizer.json",
                "umt5-tiny-seed42.safetensors",
                "wan2.1-dit-tiny-seed42.safetensors",
                "wan2.1-vae-16-seed42.safetensors",
            ]
        );
        weights
    })
}

/// A demo folder holding the fresh demo's weight files, as a finished demo leaves it.
fn demo_folder_with_fresh_weights() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("weights");
    std::fs::create_dir(&weights).unwrap();
    for (name, bytes) in fresh_demo_weights() {
        std::fs::write(weights.join(name), bytes).unwrap();
    }
    dir
}

fn assert_same_files(found: &BTreeMap<String, Vec<u8>>, expected: &BTreeMap<String, Vec<u8>>) {
    assert_eq!(
        found.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in expected {
        assert!(found[name] == *bytes, "{name} differs from a fresh demo's");
    }
}

#[test]
fn a_deleted_weight_file_is_rebuilt_byte_for_byte() {
    let dir = demo_folder_with_fresh_weights();
    // The VAE is made between other files: its bytes must not depend on which of them are
    // made in the same run.
    let vae = dir.path().join("weights/wan2.1-vae-16-seed42.safetensors");
    std::fs::remove_file(&vae).unwrap();
    let stderr = run_demo(dir.path());
    assert_same_files(
        &folder_files(&dir.path().join("weights")),
        fresh_demo_weights(),
    );
    // A missing file is simply made; only a file that was there and wrong gets a notice.
    assert!(!stderr.contains("rewriting"), "{stderr}");
}

#[test]
fn a_damaged_weight_file_is_rewritten_and_stale_partial_files_are_swept() {
    let dir = demo_folder_with_fresh_weights();
    let weights = dir.path().join("weights");
    let dit = weights.join("wan2.1-dit-tiny-seed42.safetensors");
    let mut bytes = std::fs::read(&dit).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&dit, bytes).unwrap();

    // Temporary files of demos killed mid-write: those untouched for over ten minutes go,
    // a recent one may belong to a demo still writing and stays.
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let stale = [
        ".tokenizer.json.4242.0.partial",
        ".wan2.1-dit-tiny-seed42.safetensors.4242.3.partial",
        "tokenizer.json.partial",
    ];
    for name in stale {
        let file = std::fs::File::create(weights.join(name)).unwrap();
        file.set_modified(an_hour_ago).unwrap();
    }
    let recent = ".tokenizer.json.4243.0.partial";
    std::fs::write(weights.join(recent), b"half a tokeni").unwrap();

    let stderr = run_demo(dir.path());
    assert!(
        stderr.contains("wan2.1-dit-tiny-seed42.safetensors") && stderr.contains("rewriting"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("rewriting").count(), 1, "{stderr}");
    let mut found = folder_files(&weights);
    assert!(found.remove(recent).is_some());
    assert_same_files(&found, fresh_demo_weights());
}

#[test]
fn concurrent_demos_in_one_folder_write_a_fresh_demos_weights() {
    let dir = tempfile::tempdir().unwrap();
    let demos: Vec<_> = (0..4)
        .map(|_| {
            vpipe()
                .args(["demo", "--steps", "2", "--out"])
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for demo in demos {
        let run = demo.wait_with_output().unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    assert_same_files(
        &folder_files(&dir.path().join("weights")),
        fresh_demo_weights(),
    );
    // The weights folder holds nothing else (above); neither does the output folder.
    let outputs: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        outputs
            .iter()
            .all(|name| !name.ends_with(".partial") && !name.ends_with(".tmp")),
        "{outputs:?}"
    );
}

#[test]
fn a_demo_stopped_by_a_full_disk_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    // A file-size limit of 1 MiB refuses the DiT's 8.5 MiB part way, as a full disk does.
    // With SIGXFSZ ignored (inherited across exec) the write fails with EFBIG instead of the
    // signal killing the demo.
    let run = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 1024; exec \"$0\" demo --steps 2 --out \"$1\"")
        .arg(env!("CARGO_BIN_EXE_vpipe"))
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("wan2.1-dit-tiny-seed42.safetensors"),
        "{stderr}"
    );
    let mut left: Vec<String> = std::fs::read_dir(dir.path().join("weights"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    // The files under the limit were written; nothing else is there.
    assert_eq!(
        left,
        ["tokenizer.json", "umt5-tiny-seed42.safetensors"],
        "{stderr}"
    );
}
