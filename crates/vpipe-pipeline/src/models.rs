//! Which files a run's models are in: given per flag, or found by their tensors in a model
//! folder (and ComfyUI's subfolders). Each checkpoint's header is read once, here, and what it
//! says travels with the path to the planner and the phases.

use std::path::{Path, PathBuf};

use vpipe_ckpt::{Family, Inspection};
use vpipe_models::wan::DitConfig;
use vpipe_text::tokenizer::PromptTokenizer;

use crate::error::{io_error, Context, Error, Result};
use crate::options::RunOptions;

/// A checkpoint file and what its header says: family, key layout, configuration, tensors.
pub struct Checkpoint {
    pub path: PathBuf,
    pub inspection: Inspection,
}

impl Checkpoint {
    /// Reads the header of the checkpoint at `path` (a `.pth` archive's directory; no pickle
    /// code runs).
    pub fn inspect(path: &Path) -> Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            inspection: vpipe_ckpt::inspect(path)?,
        })
    }

    /// Whether the checkpoint is a DiT that takes CLIP image features (Wan 2.1's
    /// image-to-video models): it holds an image embedding ([`Self::image_embedding`]).
    pub fn takes_image_features(&self) -> bool {
        self.image_embedding().is_some()
    }

    /// An image-to-video DiT's image embedding, from its tensor shapes: the width of the image
    /// features it takes, and for first-last-frame to video the image tokens its position
    /// embedding covers. `None` for a model without one.
    pub(crate) fn image_embedding(&self) -> Option<(usize, Option<usize>)> {
        let shape = |suffixes: [&str; 2]| {
            self.inspection
                .tensors
                .iter()
                .find(|t| suffixes.iter().any(|s| t.name.ends_with(s)))
                .map(|t| t.shape.clone())
        };
        let width = shape([
            "img_emb.proj.0.weight",
            "condition_embedder.image_embedder.norm1.weight",
        ])?
        .first()
        .copied()?;
        let tokens =
            shape(["img_emb.emb_pos", "image_embedder.pos_embed"]).and_then(|s| s.get(1).copied());
        Some((width, tokens))
    }

    /// A CLIP vision encoder's configuration from its tensor shapes (width, MLP width,
    /// layers, patch and image size). The head count is not in the shapes: 16 for ViT-H/14's
    /// 1280 width (80-wide heads), else CLIP's usual 64-wide heads; other encoders need their
    /// `config.json`.
    pub(crate) fn clip_config(&self) -> Result<vpipe_models::clip::Config> {
        let bad = |what: String| {
            Error::BadInput(format!(
                "{}: {what}; give its transformers config.json with --clip-vision-config",
                self.path.display()
            ))
        };
        let Some(vpipe_ckpt::ModelConfig::Clip(c)) = &self.inspection.detection.config else {
            return Err(bad("no CLIP vision configuration in its header".into()));
        };
        let (Some(intermediate_size), Some(image_size)) = (c.mlp_dim, c.image_size) else {
            return Err(bad(format!(
                "the MLP width or the image size is missing from its shapes ({c:?})"
            )));
        };
        const VIT_H_WIDTH: usize = 1280;
        let head_width = if c.width == VIT_H_WIDTH { 80 } else { 64 };
        if c.width == 0 || !c.width.is_multiple_of(head_width) {
            return Err(bad(format!(
                "its width {} is not a multiple of {head_width}, so the head count cannot be \
                 derived",
                c.width
            )));
        }
        let config = vpipe_models::clip::Config {
            hidden_size: c.width,
            intermediate_size,
            num_layers: c.num_layers,
            num_heads: c.width / head_width,
            image_size,
            patch_size: c.patch_size,
            ..vpipe_models::clip::Config::vit_h_14()
        };
        config.validate().map_err(|e| bad(e.to_string()))?;
        Ok(config)
    }

    /// The prompt tokenizer from the SentencePiece model a ComfyUI text-encoder file carries
    /// (`spiece_model`, or a key ending in `.spiece_model`: 1-D uint8), its bytes read where
    /// the inspection says they are, without parsing the header again.
    pub(crate) fn prompt_tokenizer(&self) -> Result<PromptTokenizer> {
        let no_model = || vpipe_text::Error::NoSpieceModel {
            path: self.path.clone(),
        };
        let tensor = self
            .inspection
            .tensors
            .iter()
            .filter(|t| t.name == "spiece_model" || t.name.ends_with(".spiece_model"))
            .min_by_key(|t| t.name.len())
            .filter(|_| {
                matches!(
                    self.inspection.format,
                    vpipe_ckpt::FileFormat::Safetensors { .. }
                )
            })
            .ok_or_else(no_model)?;
        if tensor.dtype != vpipe_ckpt::DType::U8 || tensor.shape.len() != 1 {
            return Err(vpipe_text::Error::SpieceModel {
                reason: format!(
                    "{}: `{}` is {:?} of shape {:?}, expected a 1-D uint8 tensor",
                    self.path.display(),
                    tensor.name,
                    tensor.dtype,
                    tensor.shape
                ),
            }
            .into());
        }
        let mut bytes = vec![0u8; tensor.data.len() as usize];
        let read = |what: &str| io_error(format!("{what} {}", self.path.display()));
        let file = std::fs::File::open(&self.path).map_err(read("opening"))?;
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, tensor.data.start)
            .map_err(read(&format!("reading `{}` of", tensor.name)))?;
        Ok(PromptTokenizer::from_spiece_model(&bytes)?)
    }
}

/// The model files of a run.
pub struct ModelFiles {
    pub(crate) dit: Checkpoint,
    pub(crate) dit_config: Option<DitConfig>,
    /// Wan 2.2: the low-noise expert, and its configuration when one was given.
    pub(crate) dit_low_noise: Option<(Checkpoint, Option<DitConfig>)>,
    /// The low-noise expert's LoRAs (`loras` patch the other DiT).
    pub(crate) loras_low_noise: Vec<(PathBuf, f64)>,
    pub(crate) vae: Checkpoint,
    pub(crate) text_encoder: Checkpoint,
    /// A `tokenizer.json`; without it, the `spiece_model` tensor of the text-encoder file.
    pub(crate) tokenizer: Option<PathBuf>,
    pub(crate) loras: Vec<(PathBuf, f64)>,
    /// Image-to-video: the CLIP vision encoder, and its configuration when one was given.
    pub(crate) clip_vision: Option<Checkpoint>,
    pub(crate) clip_config: Option<vpipe_models::clip::Config>,
}

/// The name of the weight patch a DiT gets from `loras` (files and strengths), as the memory
/// session tells registrations apart ([`vpipe_mem::MemorySession::register_reusing`]): each
/// file with its strength, length and modification time, so that the same files at the same
/// strengths name the same merged weights; `none` without LoRAs.
pub(crate) fn patch_name(loras: &[(PathBuf, f64)]) -> String {
    if loras.is_empty() {
        return "none".into();
    }
    loras
        .iter()
        .map(|(path, strength)| {
            let stamp = std::fs::metadata(path)
                .map(|m| format!("{} B, modified {:?}", m.len(), m.modified().ok()))
                .unwrap_or_else(|e| format!("unreadable: {e}"));
            format!("{} at {strength} ({stamp})", path.display())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl ModelFiles {
    /// Each model of the run as the pipeline registers it: its name, its file and the name of
    /// its weight patch ([`patch_name`]).
    pub(crate) fn registered(&self) -> Vec<(&'static str, &Path, String)> {
        let none = || "none".to_owned();
        let mut models = vec![("dit", self.dit.path.as_path(), patch_name(&self.loras))];
        if let Some((low, _)) = &self.dit_low_noise {
            models.push((
                "dit low noise",
                low.path.as_path(),
                patch_name(&self.loras_low_noise),
            ));
        }
        models.push(("vae", self.vae.path.as_path(), none()));
        models.push(("text encoder", self.text_encoder.path.as_path(), none()));
        if let Some(clip) = &self.clip_vision {
            models.push(("clip vision", clip.path.as_path(), none()));
        }
        models
    }

    /// The given files, as they are (their families are not checked), with the DiT's
    /// configuration from its header.
    pub fn inspect(
        dit: &Path,
        vae: &Path,
        text_encoder: &Path,
        tokenizer: Option<PathBuf>,
        loras: Vec<(PathBuf, f64)>,
    ) -> Result<Self> {
        Ok(Self {
            dit: Checkpoint::inspect(dit)?,
            dit_config: None,
            dit_low_noise: None,
            loras_low_noise: Vec::new(),
            vae: Checkpoint::inspect(vae)?,
            text_encoder: Checkpoint::inspect(text_encoder)?,
            tokenizer,
            loras,
            clip_vision: None,
            clip_config: None,
        })
    }

    /// These files with the low-noise expert of a Wan 2.2 pair at `path` (the DiT given first
    /// is then the high-noise one).
    pub fn with_low_noise_expert(mut self, path: &Path) -> Result<Self> {
        self.dit_low_noise = Some((Checkpoint::inspect(path)?, None));
        Ok(self)
    }

    /// These files with a CLIP vision encoder for image-to-video (its configuration from
    /// `config`, else from its tensor shapes).
    pub fn with_clip_vision(
        mut self,
        path: &Path,
        config: Option<vpipe_models::clip::Config>,
    ) -> Result<Self> {
        self.clip_vision = Some(Checkpoint::inspect(path)?);
        self.clip_config = config;
        Ok(self)
    }
}

/// The families as a message names them: "Wan 2.1 VAE or Wan 2.2 VAE".
fn describe(families: &[Family]) -> String {
    families
        .iter()
        .map(|f| f.describe())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The checkpoint files below `dir` (and its ComfyUI subfolders) whose tensors say they are a
/// model of one of `families`.
fn find_models(dir: &Path, families: &[Family]) -> Result<Vec<Checkpoint>> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    for sub in [
        "diffusion_models",
        "unet",
        "vae",
        "text_encoders",
        "clip",
        "clip_vision",
    ] {
        folders.push(dir.join(sub));
    }
    for folder in folders.iter().filter(|f| f.is_dir()) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)
            .map_err(io_error(format!("--model-dir {}", folder.display())))?
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
            if let Ok(checkpoint) = Checkpoint::inspect(&path) {
                if families.contains(&checkpoint.inspection.detection.family) {
                    found.push(checkpoint);
                }
            }
        }
    }
    Ok(found)
}

/// The checkpoint given with `flag`, checked to hold a model of one of `families` before
/// anything is loaded: a VAE given as `--dit` is bad input, not a failure deep in the run.
fn given(flag: &str, path: &Path, families: &[Family]) -> Result<Checkpoint> {
    let checkpoint =
        Checkpoint::inspect(path).with_context(|| format!("{flag} {}", path.display()))?;
    let found = checkpoint.inspection.detection.family;
    if families.contains(&found) {
        return Ok(checkpoint);
    }
    Err(Error::BadInput(format!(
        "{flag} {}: holds a {}, expected a {}",
        path.display(),
        found.describe(),
        describe(families)
    )))
}

/// The file for `flag`: given explicitly (a model of one of `accepted`), or the one model of
/// `found` in the model folder.
fn resolve(
    flag: &str,
    given_path: &Option<PathBuf>,
    dir: &Option<PathBuf>,
    (accepted, family): (&[Family], &[Family]),
) -> Result<Checkpoint> {
    if let Some(path) = given_path {
        return given(flag, path, accepted);
    }
    let Some(dir) = dir else {
        return Err(Error::BadInput(format!(
            "{flag}: required (or --model-dir with the file in it)"
        )));
    };
    let mut found = find_models(dir, family)?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::BadInput(format!(
            "--model-dir {}: no {} found{}; give {flag}",
            dir.display(),
            describe(&family[..1]),
            match &family[1..] {
                [] => String::new(),
                others => format!(" (nor a {})", describe(others)),
            }
        ))),
        _ => Err(Error::BadInput(format!(
            "--model-dir {}: several {} files ({}); choose one with {flag}",
            dir.display(),
            describe(family),
            found
                .iter()
                .map(|c| c.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The two experts of a Wan 2.2 pair in `dir`, high noise first: the two DiTs of `family`
/// there when their file names say `high_noise` and `low_noise` (ComfyUI's names); `None`
/// for any other set of DiTs.
fn expert_pair(dir: &Path, family: Family) -> Result<Option<(Checkpoint, Checkpoint)>> {
    let mut found = find_models(dir, &[family])?;
    if found.len() != 2 {
        return Ok(None);
    }
    use vpipe_ckpt::ExpertRole::{HighNoise, LowNoise};
    let role = |c: &Checkpoint| vpipe_ckpt::expert_role(&c.path);
    if role(&found[1]) == Some(HighNoise) {
        found.swap(0, 1);
    }
    let low = found.pop().expect("two files");
    let high = found.pop().expect("two files");
    Ok((role(&high) == Some(HighNoise) && role(&low) == Some(LowNoise)).then_some((high, low)))
}

/// The model files of a run: given per file, or found in the model folder. An image-to-video
/// run (`--image`) takes an image-to-video DiT, and a CLIP vision encoder when the DiT takes
/// image features; any other run a text-to-video DiT; a Wan 2.2 TI2V DiT takes either.
pub(crate) fn resolve_models(options: &RunOptions) -> Result<ModelFiles> {
    let image_to_video = options.image.is_some();
    let dit_family = if image_to_video {
        Family::WanDitI2v
    } else {
        Family::WanDitT2v
    };
    let dit_families = [dit_family, Family::WanDitTi2v];
    // ComfyUI's Wan 2.2 folders hold both experts (`*_high_noise_*`, `*_low_noise_*`).
    let low_noise_file = options.low_noise.as_ref().and_then(|e| e.dit.as_ref());
    let pair = match (&options.dit, low_noise_file, &options.model_dir) {
        (None, None, Some(dir)) => expert_pair(dir, dit_family)?,
        _ => None,
    };
    let loras_low_noise = options
        .low_noise
        .as_ref()
        .map(|expert| expert.loras.clone())
        .unwrap_or_default();
    if let Some((high, low)) = pair {
        let config = options.low_noise.as_ref().and_then(|e| e.config.clone());
        return Ok(ModelFiles {
            dit_low_noise: Some((low, config)),
            loras_low_noise,
            ..resolve_others(options, high, image_to_video)?
        });
    }
    if let (Some(_), None, Some(dir)) = (&options.low_noise, low_noise_file, &options.model_dir) {
        return Err(Error::BadInput(format!(
            "--model-dir {}: no Wan 2.2 expert pair (two DiTs named *high_noise* and \
             *low_noise*); give --dit and --dit-low-noise",
            dir.display()
        )));
    }
    let dit = resolve(
        "--dit",
        &options.dit,
        &options.model_dir,
        (&dit_families, &dit_families),
    )
    .map_err(|e| match (&e, image_to_video) {
        (Error::BadInput(message), false) if message.contains(Family::WanDitI2v.describe()) => {
            Error::BadInput(format!(
                "{message}; an image-to-video DiT needs --image (the first frame)"
            ))
        }
        _ => e,
    })?;
    let dit_low_noise = options
        .low_noise
        .as_ref()
        .and_then(|expert| expert.dit.as_ref().map(|dit| (dit, expert.config.clone())))
        .map(|(dit, config)| -> Result<_> {
            Ok((given("--dit-low-noise", dit, &[dit_family])?, config))
        })
        .transpose()?;
    Ok(ModelFiles {
        dit_low_noise,
        loras_low_noise,
        ..resolve_others(options, dit, image_to_video)?
    })
}

/// The files of a run besides the low-noise expert, with `dit` its DiT.
fn resolve_others(
    options: &RunOptions,
    dit: Checkpoint,
    image_to_video: bool,
) -> Result<ModelFiles> {
    // Wan 2.1's image-to-video DiTs take CLIP image features; Wan 2.2's image experts do not.
    let takes_features = dit.takes_image_features()
        || options
            .dit_config
            .as_ref()
            .is_some_and(|c| c.image_dim.is_some());
    let clip_vision = (image_to_video && takes_features)
        .then(|| {
            resolve(
                "--clip-vision",
                &options.clip_vision,
                &options.model_dir,
                (&[Family::ClipVision], &[Family::ClipVision]),
            )
        })
        .transpose()?;
    // Either VAE may be given (the planner says when it does not suit the DiT); in a model
    // folder, the one of the DiT's family.
    let vae_families = [Family::WanVae, Family::WanVae22];
    let ti2v = dit.inspection.detection.family == Family::WanDitTi2v
        || options
            .dit_config
            .as_ref()
            .is_some_and(|c| c.out_channels == vpipe_models::wan::vae::Config::wan22().z_dim);
    let vae_family = if ti2v {
        Family::WanVae22
    } else {
        Family::WanVae
    };
    Ok(ModelFiles {
        dit,
        dit_config: options.dit_config.clone(),
        dit_low_noise: None,
        loras_low_noise: Vec::new(),
        vae: resolve(
            "--vae",
            &options.vae,
            &options.model_dir,
            (&vae_families, &[vae_family]),
        )?,
        text_encoder: resolve(
            "--text-encoder",
            &options.text_encoder,
            &options.model_dir,
            (&[Family::Umt5Encoder], &[Family::Umt5Encoder]),
        )?,
        tokenizer: options.tokenizer.clone().or_else(|| {
            options
                .model_dir
                .as_ref()
                .map(|d| d.join("tokenizer.json"))
                .filter(|p| p.is_file())
        }),
        loras: options.loras.clone(),
        clip_vision,
        clip_config: options.clip_vision_config.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../vpipe-text/tests/fixtures")
            .join(name)
    }

    #[test]
    fn the_tokenizer_read_through_the_inspection_equals_the_files() {
        let path = text_fixture("umt5_tiny_comfy.safetensors");
        let inspected = Checkpoint::inspect(&path)
            .unwrap()
            .prompt_tokenizer()
            .unwrap();
        let read = PromptTokenizer::from_checkpoint_file(&path).unwrap();
        for prompt in ["A cat on a mat", "一只猫", "waves, (sunset)"] {
            let (a, b) = (
                inspected.encode(prompt).unwrap(),
                read.encode(prompt).unwrap(),
            );
            assert_eq!(a.ids, b.ids, "{prompt}");
        }
    }

    #[test]
    fn a_text_encoder_without_a_tokenizer_is_named() {
        let path = text_fixture("umt5_tiny_transformers.safetensors");
        let err = Checkpoint::inspect(&path)
            .unwrap()
            .prompt_tokenizer()
            .unwrap_err();
        let expected = vpipe_text::Error::NoSpieceModel { path: path.clone() }.to_string();
        assert_eq!(err.to_string(), expected);
    }
}
