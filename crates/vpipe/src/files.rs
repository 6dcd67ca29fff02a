//! The files runs read and write besides model weights: tensors in safetensors files, the
//! output video, the report.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};
use vpipe_mem::{MemorySession, Report};

use crate::exit::BadInput;

/// Frames per second of Wan 2.1's output.
pub(crate) const FPS: u32 = 16;

/// Reads the tensors `keys` from a safetensors file, on the host; a missing key is bad input
/// that lists what the file holds.
pub(crate) fn read_inputs<const N: usize>(
    path: &Path,
    keys: [&str; N],
) -> anyhow::Result<[Tensor; N]> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        BadInput(format!(
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
        return Err(BadInput(format!(
            "--input {}: no tensor {} (found: {})",
            path.display(),
            missing
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", "),
            found.join(", ")
        ))
        .into());
    }
    Ok(taken)
}

/// Writes `tensors` to `path` through a temporary file in the same folder, so that an
/// interrupted run never leaves a half-written output.
pub(crate) fn write_outputs(path: &Path, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    crate::partial::write_atomically(path, |partial| {
        candle_core::safetensors::save(tensors, partial)
            .with_context(|| format!("writing {}", path.display()))
    })
}

/// Renders the session's report, writes it (and its chart) when asked, and returns it.
pub(crate) fn finish_report(
    session: &MemorySession,
    path: Option<&Path>,
) -> anyhow::Result<Report> {
    let report = session.report()?;
    if let Some(path) = path {
        report.write_json(path)?;
        vpipe_mem::write_svg(&report, &path.with_extension("svg"))?;
    }
    Ok(report)
}

/// Writes the decoded video by the output's extension: `.mp4` (H.264), `.gif`, `.safetensors`
/// (key `video`, and `latents` when given: the final latents, for comparisons with a reference
/// pipeline's), or no extension for a folder of PNG frames; always through a temporary name,
/// renamed into place.
pub(crate) fn write_clip(
    path: &Path,
    video: &candle_core::Tensor,
    latents: Option<&candle_core::Tensor>,
) -> anyhow::Result<()> {
    if crate::paths::has_extension(path, "safetensors") {
        let mut tensors = HashMap::from([("video".to_owned(), video.clone())]);
        tensors.extend(latents.map(|l| ("latents".to_owned(), l.clone())));
        return write_outputs(path, &tensors);
    }
    let clip = vpipe_video::from_tensor(video, FPS as f64)?;
    let mut progress = crate::progress::Progress::new("write", 1);
    let options = vpipe_video::WriteOptions {
        stop: Some(crate::progress::stop_flag()),
        ..vpipe_video::WriteOptions::default()
    };
    vpipe_video::write_video(path, &clip, &options).map_err(|e| match e {
        vpipe_video::VideoError::Stopped { .. } => anyhow::Error::new(crate::progress::Interrupted),
        other => anyhow::Error::new(other).context(format!("--out {}", path.display())),
    })?;
    progress.inc(&path.display().to_string());
    Ok(())
}
