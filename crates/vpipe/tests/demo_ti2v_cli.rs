//! `vpipe demo --model wan2.2-ti2v`: the built-in Wan 2.2 TI2V-architecture model (a DiT of 48
//! latent channels on a Wan 2.2 VAE) on the CPU, text-to-video and image-to-video.

use std::path::Path;
use std::process::Command;

mod common;

/// Runs `vpipe demo --model wan2.2-ti2v` with `args` into `out`; its standard output and report.
fn demo(args: &[&str], out: &Path) -> (String, serde_json::Value) {
    let run = Command::new(env!("CARGO_BIN_EXE_vpipe"))
        .args(["demo", "--model", "wan2.2-ti2v", "--steps", "2"])
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

#[test]
fn the_ti2v_demo_runs_text_to_video_at_24_fps_on_its_own_model_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let (stdout, report) = demo(&[], &out);
    assert!(
        stdout.contains("TI2V") && stdout.contains("text-to-video"),
        "{stdout}"
    );
    assert_eq!(
        common::phase_names(&report),
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
    let report_text = report.to_string();
    assert!(report_text.contains("shift 5"), "{report_text}");
    let transitions = report["transitions"].as_array().unwrap();
    assert!(transitions.iter().all(|t| t["verified"] == true));
    let video = vpipe_video::read_video(out.join("demo.mp4")).unwrap();
    assert_eq!(
        (video.num_frames(), video.width(), video.height()),
        (9, 96, 64)
    );
    assert_eq!(video.fps(), 24.0);
    // The built-in files are recognised as what they are.
    for (file, family) in [
        (
            "wan2.2-ti2v-dit-tiny-seed42.safetensors",
            "Wan 2.2 DiT, text-image-to-video (TI2V)",
        ),
        ("wan2.2-vae-16-seed42.safetensors", "Wan 2.2 VAE"),
    ] {
        let path = out.join("weights").join(file);
        let run = common::vpipe(&["inspect", path.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success() && text.contains(family), "{text}");
    }
}

#[test]
fn the_ti2v_demo_runs_image_to_video_without_clip() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let (stdout, report) = demo(&["--mode", "i2v"], &out);
    assert!(stdout.contains("image-to-video"), "{stdout}");
    assert_eq!(
        common::phase_names(&report),
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
    let video = vpipe_video::read_video(out.join("demo.mp4")).unwrap();
    assert_eq!((video.num_frames(), video.fps()), (9, 24.0));
}
