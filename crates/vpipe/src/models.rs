//! Which files a run's models are in: given per flag, or found by their tensors in a model
//! folder (and ComfyUI's subfolders).

use std::path::{Path, PathBuf};

use anyhow::Context;
use vpipe_ckpt::Family;

use crate::exit::BadInput;
use crate::flags::RunJob;

/// The model files of a run.
pub(crate) struct ModelFiles {
    pub(crate) dit: PathBuf,
    pub(crate) dit_config: Option<DitConfig>,
    pub(crate) vae: PathBuf,
    pub(crate) text_encoder: PathBuf,
    pub(crate) text_encoder_config: Option<Umt5Config>,
    /// A `tokenizer.json`; without it, the `spiece_model` tensor of the text-encoder file.
    pub(crate) tokenizer: Option<PathBuf>,
    pub(crate) loras: Vec<(PathBuf, f64)>,
}
use vpipe_models::wan::DitConfig;
use vpipe_text::umt5::Config as Umt5Config;

/// The checkpoint files below `dir` (and its ComfyUI subfolders) whose tensors say they are a
/// model of `family`.
fn find_models(dir: &Path, family: Family) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    for sub in ["diffusion_models", "unet", "vae", "text_encoders", "clip"] {
        folders.push(dir.join(sub));
    }
    for folder in folders.iter().filter(|f| f.is_dir()) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)
            .with_context(|| format!("--model-dir {}", folder.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let extension = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_lowercase);
                matches!(
                    extension.as_deref(),
                    Some("safetensors" | "pth" | "pt" | "ckpt" | "bin")
                ) && crate::paths::input_file_problem(p).is_none()
            })
            .collect();
        entries.sort();
        for path in entries {
            // Files that are not checkpoints at all are skipped, not fatal.
            if let Ok(inspection) = vpipe_ckpt::inspect(&path) {
                if inspection.detection.family == family {
                    found.push(path);
                }
            }
        }
    }
    Ok(found)
}

/// Checks that the checkpoint given with `flag` holds a model of `family`, before anything is
/// loaded: a VAE given as `--dit` is bad input (exit 2), not a failure deep in the run.
fn check_family(flag: &str, path: &Path, family: Family) -> anyhow::Result<()> {
    let inspection =
        vpipe_ckpt::inspect(path).with_context(|| format!("{flag} {}", path.display()))?;
    let found = inspection.detection.family;
    if found == family {
        return Ok(());
    }
    Err(BadInput(format!(
        "{flag} {}: holds a {}, expected a {}",
        path.display(),
        found.describe(),
        family.describe()
    ))
    .into())
}

/// The file for `flag`: given explicitly, or the one model of `family` in the model folder.
fn resolve(
    flag: &str,
    given: &Option<PathBuf>,
    dir: &Option<PathBuf>,
    family: Family,
) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        check_family(flag, path, family)?;
        return Ok(path.clone());
    }
    let Some(dir) = dir else {
        return Err(BadInput(format!(
            "{flag}: required (or --model-dir with the file in it)"
        ))
        .into());
    };
    let found = find_models(dir, family)?;
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(BadInput(format!(
            "--model-dir {}: no {} found; give {flag}",
            dir.display(),
            family.describe()
        ))
        .into()),
        several => Err(BadInput(format!(
            "--model-dir {}: several {} files ({}); choose one with {flag}",
            dir.display(),
            family.describe(),
            several
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .into()),
    }
}

/// The model files of a run: given per file, or found in the model folder.
pub(crate) fn resolve_models(job: &RunJob) -> anyhow::Result<ModelFiles> {
    Ok(ModelFiles {
        dit: resolve("--dit", &job.dit, &job.model_dir, Family::WanDitT2v)?,
        dit_config: job.dit_config.clone(),
        vae: resolve("--vae", &job.vae, &job.model_dir, Family::WanVae)?,
        text_encoder: resolve(
            "--text-encoder",
            &job.text_encoder,
            &job.model_dir,
            Family::Umt5Encoder,
        )?,
        text_encoder_config: None,
        tokenizer: job.tokenizer.clone().or_else(|| {
            job.model_dir
                .as_ref()
                .map(|d| d.join("tokenizer.json"))
                .filter(|p| p.is_file())
        }),
        loras: job.loras.clone(),
    })
}
