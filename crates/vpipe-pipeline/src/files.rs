//! The files runs read and write besides model weights: tensors in safetensors files, the
//! output video, the report.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use vpipe_mem::{MemorySession, Report};

use crate::error::{Context, Error, Result};
use crate::observer::{Observer, Step};

/// Reads the tensors `keys` from a safetensors file, on the host; a missing key is bad input
/// that lists what the file holds.
pub fn read_inputs<const N: usize>(path: &Path, keys: [&str; N]) -> Result<[Tensor; N]> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::BadInput(format!(
            "--input {}: not a readable safetensors file: {e}",
            path.display()
        ))
    })?;
    let mut found: Vec<_> = tensors.keys().cloned().collect();
    found.sort();
    let mut missing = Vec::new();
    let taken = keys.map(|key| {
        tensors.remove(key).unwrap_or_else(|| {
            missing.push(key);
            Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu).expect("an empty tensor")
        })
    });
    if !missing.is_empty() {
        return Err(Error::BadInput(format!(
            "--input {}: no tensor {} (found: {})",
            path.display(),
            missing
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", "),
            found.join(", ")
        )));
    }
    Ok(taken)
}

/// Writes `tensors` to `path` through a temporary file in the same folder, so that an
/// interrupted run never leaves a half-written output.
pub fn write_outputs(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    crate::partial::write_atomically(path, |partial| {
        candle_core::safetensors::save(tensors, partial)
            .with_context(|| format!("writing {}", path.display()))
    })
}

/// Renders the session's report, writes it (and its chart) when asked, and returns it.
pub fn finish_report(session: &MemorySession, path: Option<&Path>) -> Result<Report> {
    let report = session.report()?;
    if let Some(path) = path {
        report.write_json(path)?;
        vpipe_mem::write_svg(&report, &path.with_extension("svg"))?;
    }
    Ok(report)
}

/// Writes the decoded video by the output's extension: `.mp4` (H.264), `.gif`, `.safetensors`
/// (key `video`, and `latents` when given: the final latents, for comparisons with a reference
/// pipeline's), or no extension for a folder of PNG frames, at `fps` frames per second (the
/// model family's, [`crate::Generated::fps`]); always through a temporary name, renamed into
/// place. The observer sees the write as a step, and can stop it between frames.
pub fn write_clip(
    path: &Path,
    video: &Tensor,
    latents: Option<&Tensor>,
    fps: u32,
    observer: &mut dyn Observer,
) -> Result<()> {
    if crate::paths::has_extension(path, "safetensors") {
        let mut tensors = HashMap::from([("video".to_owned(), video.clone())]);
        tensors.extend(latents.map(|l| ("latents".to_owned(), l.clone())));
        return write_outputs(path, &tensors);
    }
    let clip = vpipe_video::from_tensor(video, f64::from(fps))?;
    let options = vpipe_video::WriteOptions {
        stop: observer.stop_flag(),
        ..vpipe_video::WriteOptions::default()
    };
    let mut progress = Step::start(observer, "write", 1);
    vpipe_video::write_video(path, &clip, &options).map_err(|e| match e {
        vpipe_video::VideoError::Stopped { .. } => Error::Interrupted,
        other => Error::Context {
            context: format!("--out {}", path.display()),
            source: Box::new(Error::from(other)),
        },
    })?;
    progress.advance(&path.display().to_string());
    Ok(())
}
