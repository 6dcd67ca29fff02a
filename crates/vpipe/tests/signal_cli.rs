//! SIGINT and SIGTERM in each phase of a run: exit 130 within seconds (also inside a VAE
//! tile and while the video is written), the report so far, and no output or partial file.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

/// How long a stop may take once the signal is sent: a step, a part of a tile, a frame.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// Runs a video-to-video job large enough that each phase lasts, signals `signal` once the
/// phase `phase` has begun, and checks how the run ended.
fn stop_in_phase(models: &Path, dir: &Path, phase: &str, signal: i32) -> Result<(), String> {
    let out = dir.join(format!("out-{}.mp4", phase.replace(' ', "-")));
    let report = dir.join(format!("report-{}.json", phase.replace(' ', "-")));
    let mut child = Command::new(env!("CARGO_BIN_EXE_vpipe"))
        .args([
            "run",
            "--model-dir",
            models.to_str().unwrap(),
            "--prompt",
            "waves",
            "--input",
            models.join("../demo.mp4").to_str().unwrap(),
            "--size",
            "256x256",
            "--frames",
            "9",
            "--steps",
            "40",
            "--out",
            out.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ])
        .env("VPIPE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let marker = format!("phase begins phase=\"{phase}\"");
    let mut lines = stderr.lines();
    let mut log = Vec::new();
    let mut signalled = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let begins = line.contains(&marker);
        log.push(line);
        if begins {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, signal) };
            signalled = Some(Instant::now());
            break;
        }
    }
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let status = child.wait().unwrap();
    log.extend(drain.join().unwrap());
    let log = log.join("\n");
    let Some(sent) = signalled else {
        return Err(format!("phase '{phase}' never began:\n{log}"));
    };
    let took = sent.elapsed();
    let mut problems = Vec::new();
    if status.code() != Some(130) {
        problems.push(format!("exit {:?}, expected 130", status.code()));
    }
    if took > STOP_WITHIN {
        problems.push(format!("stopped {took:?} after the signal"));
    }
    if !log.contains("interrupted") {
        problems.push("no 'interrupted' message".into());
    }
    match std::fs::read_to_string(&report) {
        Ok(text) => {
            let report: serde_json::Value = serde_json::from_str(&text).unwrap();
            let phases: Vec<_> = report["phases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["name"].as_str().unwrap().to_owned())
                .collect();
            if !phases.iter().any(|p| p == phase) {
                problems.push(format!("the report so far lacks '{phase}': {phases:?}"));
            }
        }
        Err(e) => problems.push(format!("no report so far: {e}")),
    }
    let written: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out-") || n.contains("partial") || n.contains(".tmp"))
        .collect();
    if !written.is_empty() {
        problems.push(format!("left behind: {written:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{phase}, signal {signal}: {}\n{log}",
            problems.join("; ")
        ))
    }
}

#[test]
fn sigint_and_sigterm_stop_every_phase_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let models = common::builtin_models(&root.path().join("demo"));
    let mut failures = Vec::new();
    for (i, phase) in ["text", "vae encode", "sample", "vae decode", "write"]
        .into_iter()
        .enumerate()
    {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            let dir = root.path().join(format!("{i}-{signal}"));
            std::fs::create_dir(&dir).unwrap();
            if let Err(problem) = stop_in_phase(&models, &dir, phase, signal) {
                failures.push(problem);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
