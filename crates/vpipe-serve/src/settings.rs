//! A submitted job's settings: the keys of `run.toml`, checked against what a client may set.
//! Model files resolve inside the models folder and nowhere else (no absolute paths, no `..`,
//! no symbolic link that leads out); outputs, devices and budgets are the server's; images and
//! clips come as uploads.

use std::path::{Component, Path, PathBuf};

use serde_json::Value;

/// A job's settings as submitted: `run.toml`'s keys and values.
pub type Settings = serde_json::Map<String, Value>;

/// Keys naming a model file or folder, resolved inside the models folder.
const MODEL_PATH_KEYS: &[&str] = &[
    "model_dir",
    "dit",
    "dit_config",
    "dit_low_noise",
    "dit_low_noise_config",
    "vae",
    "text_encoder",
    "tokenizer",
    "clip_vision",
    "clip_vision_config",
];
/// Keys of `FILE:STRENGTH` LoRA specs (a string or a list), the file inside the models folder.
const LORA_KEYS: &[&str] = &["lora", "lora_low_noise"];
/// Input files a job brings as uploads (multipart parts of these names).
pub const UPLOAD_KEYS: &[&str] = &["image", "last_image", "input"];
/// Keys that are the server's to set: where a job writes, which device, what budget.
const SERVER_KEYS: &[&str] = &[
    "out",
    "report",
    "pipeline",
    "device",
    "vram_budget",
    "ram_budget",
    "preset",
    "json",
    "comfy_workflow",
    "comfy_models",
    "comfy_input",
    "initial_noise",
];

/// Where the server lets a job read and write, and what it fixes for every job.
pub struct Confinement<'a> {
    /// The models folder, canonical.
    pub models: &'a Path,
    pub device: &'a str,
    pub vram_budget: Option<&'a str>,
    pub ram_budget: Option<&'a str>,
}

/// `settings` key with its (normalised) name: `-` and `_` are the same, as in `run.toml`.
fn key_name(key: &str) -> String {
    key.replace('-', "_")
}

impl Confinement<'_> {
    /// The settings the job runs with: `submitted` with its model paths resolved inside the
    /// models folder, the uploads at `uploads` (key → saved file), the outputs in `job_dir`,
    /// and the server's device and budgets. An error names the key and what was expected.
    ///
    /// With `comfy` (a ComfyUI workflow saved in the job's folder, and the folder of the files
    /// its loaders name), the workflow's model names resolve in the models folder, as ComfyUI
    /// resolves them in its `models/`.
    pub fn job_settings(
        &self,
        submitted: &Settings,
        uploads: &[(&'static str, PathBuf)],
        comfy: Option<(&Path, &Path)>,
        job_dir: &Path,
    ) -> Result<Settings, String> {
        let mut settings = Settings::new();
        for (key, value) in submitted {
            let name = key_name(key);
            if SERVER_KEYS.contains(&name.as_str()) {
                return Err(format!(
                    "{key}: set by the server, not by a job (outputs go to the job's folder; the \
                     device and budgets are `vpipe serve`'s flags)"
                ));
            }
            if UPLOAD_KEYS.contains(&name.as_str()) {
                return Err(format!(
                    "{key}: send the file as an upload (a multipart part named `{name}`), not \
                     as a path"
                ));
            }
            let value = if MODEL_PATH_KEYS.contains(&name.as_str()) {
                let text = value
                    .as_str()
                    .ok_or_else(|| format!("{key}: expected a path (a string)"))?;
                Value::String(self.model_path(key, text)?.to_string_lossy().into_owned())
            } else if LORA_KEYS.contains(&name.as_str()) {
                self.lora_specs(key, value)?
            } else {
                value.clone()
            };
            settings.insert(name, value);
        }
        if !settings.contains_key("model_dir") {
            settings.insert(
                "model_dir".into(),
                Value::String(self.models.to_string_lossy().into_owned()),
            );
        }
        for (key, path) in uploads {
            settings.insert(
                (*key).into(),
                Value::String(path.to_string_lossy().into_owned()),
            );
        }
        let text = |path: &Path| Value::String(path.to_string_lossy().into_owned());
        if let Some((workflow, input)) = comfy {
            settings.insert("comfy_workflow".into(), text(workflow));
            settings.insert("comfy_models".into(), text(self.models));
            settings.insert("comfy_input".into(), text(input));
        }
        let path = |name: &str| Value::String(job_dir.join(name).to_string_lossy().into_owned());
        settings.insert("out".into(), path("video.mp4"));
        settings.insert("report".into(), path("report.json"));
        settings.insert("device".into(), Value::String(self.device.to_owned()));
        if let Some(budget) = self.vram_budget {
            settings.insert("vram_budget".into(), Value::String(budget.to_owned()));
        }
        if let Some(budget) = self.ram_budget {
            settings.insert("ram_budget".into(), Value::String(budget.to_owned()));
        }
        Ok(settings)
    }

    /// `relative` inside the models folder, as an existing canonical path.
    fn model_path(&self, key: &str, relative: &str) -> Result<PathBuf, String> {
        let path = Path::new(relative);
        let plain = path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if relative.is_empty() || !plain {
            return Err(format!(
                "{key}: '{relative}' must be a path relative to the models folder, without '..'"
            ));
        }
        let found = self
            .models
            .join(path)
            .canonicalize()
            .map_err(|e| format!("{key}: '{relative}' is not in the models folder ({e})"))?;
        if !found.starts_with(self.models) {
            return Err(format!(
                "{key}: '{relative}' leads outside the models folder (a symbolic link)"
            ));
        }
        Ok(found)
    }

    /// LoRA specs (`FILE` or `FILE:STRENGTH`, one or a list) with each file resolved.
    fn lora_specs(&self, key: &str, value: &Value) -> Result<Value, String> {
        let one = |spec: &Value| -> Result<Value, String> {
            let text = spec
                .as_str()
                .ok_or_else(|| format!("{key}: expected FILE:STRENGTH strings"))?;
            let (file, strength) = match text.rsplit_once(':') {
                Some((file, strength)) if strength.trim().parse::<f64>().is_ok() => {
                    (file, Some(strength))
                }
                _ => (text, None),
            };
            let path = self.model_path(key, file)?;
            let path = path.to_string_lossy();
            Ok(Value::String(match strength {
                Some(s) => format!("{path}:{s}"),
                None => path.into_owned(),
            }))
        };
        match value {
            Value::Array(items) => Ok(Value::Array(
                items.iter().map(one).collect::<Result<_, _>>()?,
            )),
            other => one(other),
        }
    }
}

/// What kind of job the settings describe, for the job list.
pub fn mode_of(uploads: &[(&'static str, PathBuf)]) -> &'static str {
    let has = |key: &str| uploads.iter().any(|(k, _)| *k == key);
    if has("input") {
        "video-to-video"
    } else if has("last_image") {
        "first-last-frame-to-video"
    } else if has("image") {
        "image-to-video"
    } else {
        "text-to-video"
    }
}

/// The file name an upload is saved under, from its content: PNG or JPEG for images, MP4 or
/// GIF for a clip. Anything else is refused naming the part.
pub fn upload_name(key: &str, bytes: &[u8]) -> Result<String, String> {
    let kind = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        "png"
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "jpg"
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        "gif"
    } else if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        "mp4"
    } else {
        ""
    };
    let image = matches!(kind, "png" | "jpg");
    let clip = matches!(kind, "mp4" | "gif");
    match key {
        "image" | "last_image" if image => Ok(format!("{key}.{kind}")),
        "image" | "last_image" => Err(format!(
            "{key}: the upload is not a PNG or JPEG image ({} bytes)",
            bytes.len()
        )),
        "input" if clip => Ok(format!("{key}.{kind}")),
        "input" => Err(format!(
            "input: the upload is not an H.264 MP4 or a GIF ({} bytes)",
            bytes.len()
        )),
        other => Err(format!(
            "{other}: not an upload a job takes; expected one of {}",
            UPLOAD_KEYS.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confinement(models: &Path) -> Confinement<'_> {
        Confinement {
            models,
            device: "cpu",
            vram_budget: None,
            ram_budget: None,
        }
    }

    fn settings(json: &str) -> Settings {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn model_paths_stay_inside_the_models_folder() {
        let root = tempfile::tempdir().unwrap();
        let models = root.path().join("models");
        std::fs::create_dir(&models).unwrap();
        std::fs::write(models.join("dit.safetensors"), b"x").unwrap();
        std::fs::write(root.path().join("secret.safetensors"), b"x").unwrap();
        std::os::unix::fs::symlink(
            root.path().join("secret.safetensors"),
            models.join("link.safetensors"),
        )
        .unwrap();
        let models = models.canonicalize().unwrap();
        let c = confinement(&models);
        let dir = root.path().join("job");
        let ok = c
            .job_settings(&settings(r#"{"dit": "dit.safetensors"}"#), &[], None, &dir)
            .unwrap();
        assert_eq!(
            ok["dit"].as_str().unwrap(),
            models.join("dit.safetensors").to_str().unwrap()
        );
        assert_eq!(ok["model_dir"].as_str().unwrap(), models.to_str().unwrap());
        for (json, needle) in [
            (r#"{"dit": "../secret.safetensors"}"#, "without '..'"),
            (r#"{"vae": "/etc/passwd"}"#, "relative to the models folder"),
            (r#"{"dit": "link.safetensors"}"#, "leads outside"),
            (r#"{"model-dir": "nope"}"#, "not in the models folder"),
            (
                r#"{"lora": ["dit.safetensors:0.5", "../x:1"]}"#,
                "without '..'",
            ),
            (r#"{"out": "/tmp/x.mp4"}"#, "set by the server"),
            (r#"{"image": "/tmp/x.png"}"#, "as an upload"),
            (r#"{"dit": 3}"#, "expected a path"),
        ] {
            let err = c
                .job_settings(&settings(json), &[], None, &dir)
                .unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
        let lora = c
            .job_settings(
                &settings(r#"{"lora": "dit.safetensors:0.5"}"#),
                &[],
                None,
                &dir,
            )
            .unwrap();
        assert!(lora["lora"]
            .as_str()
            .unwrap()
            .ends_with("dit.safetensors:0.5"));
    }

    #[test]
    fn uploads_are_named_by_their_content() {
        assert_eq!(
            upload_name("image", b"\x89PNG\r\n\x1a\nrest").unwrap(),
            "image.png"
        );
        assert_eq!(
            upload_name("last_image", &[0xFF, 0xD8, 0xFF, 0]).unwrap(),
            "last_image.jpg"
        );
        assert_eq!(upload_name("input", b"GIF89a....").unwrap(), "input.gif");
        assert!(upload_name("image", b"GIF89a....")
            .unwrap_err()
            .contains("PNG or JPEG"));
        assert!(upload_name("input", b"hello").unwrap_err().contains("MP4"));
        assert!(upload_name("../x", b"hello").is_err());
    }

    mod fuzz {
        //! Whatever a request sets, the settings a job runs with read model files inside the
        //! models folder only, write inside the job's folder only, and take the server's
        //! device; or the request is refused. Never a panic.

        use super::*;
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "model_dir",
            "dit",
            "dit-config",
            "vae",
            "text_encoder",
            "tokenizer",
            "clip_vision",
            "dit_low_noise",
            "lora",
            "lora_low_noise",
            "out",
            "report",
            "device",
            "vram_budget",
            "image",
            "input",
            "comfy_workflow",
            "prompt",
            "steps",
            "size",
            "no_such_key",
        ];

        fn value() -> impl Strategy<Value = Value> {
            let path = prop_oneof![
                Just("dit.safetensors".to_owned()),
                Just("sub/../dit.safetensors".to_owned()),
                Just("../dit.safetensors".to_owned()),
                Just("/etc/passwd".to_owned()),
                Just("link.safetensors".to_owned()),
                Just("dit.safetensors:0.5".to_owned()),
                Just("".to_owned()),
                any::<String>(),
            ];
            let leaf = prop_oneof![
                path.clone().prop_map(Value::String),
                any::<i64>().prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
                Just(Value::Null),
            ];
            prop_oneof![
                leaf,
                prop::collection::vec(path.prop_map(Value::String), 0..3).prop_map(Value::Array),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 400, failure_persistence: None, ..ProptestConfig::default()
            })]

            #[test]
            fn any_request_stays_inside_its_folders(
                entries in prop::collection::vec((prop::sample::select(KEYS), value()), 0..6),
            ) {
                let root = tempfile::tempdir().unwrap();
                let models = root.path().join("models");
                std::fs::create_dir(&models).unwrap();
                std::fs::write(models.join("dit.safetensors"), b"x").unwrap();
                std::fs::write(root.path().join("secret"), b"x").unwrap();
                std::os::unix::fs::symlink(root.path().join("secret"), models.join("link.safetensors"))
                    .unwrap();
                let models = models.canonicalize().unwrap();
                let job = root.path().join("job");
                let submitted: Settings =
                    entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                let Ok(settings) = confinement(&models).job_settings(&submitted, &[], None, &job)
                else {
                    return Ok(());
                };
                for (key, value) in &settings {
                    let texts: Vec<&str> = match value {
                        Value::String(s) => vec![s.as_str()],
                        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
                        _ => continue,
                    };
                    for text in texts {
                        let path = text.rsplit_once(':').map_or(text, |(p, _)| p);
                        if MODEL_PATH_KEYS.contains(&key.as_str()) || LORA_KEYS.contains(&key.as_str()) {
                            prop_assert!(Path::new(path).starts_with(&models), "{key} = {text}");
                        }
                        if ["out", "report"].contains(&key.as_str()) {
                            prop_assert!(Path::new(text).starts_with(&job), "{key} = {text}");
                        }
                    }
                }
                prop_assert_eq!(settings["device"].as_str(), Some("cpu"));
                for key in UPLOAD_KEYS {
                    prop_assert!(!settings.contains_key(*key), "{key}");
                }
            }

            #[test]
            fn any_upload_is_named_or_refused(key in prop::sample::select(&["image", "last_image", "input", "x"][..]), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
                if let Ok(name) = upload_name(key, &bytes) {
                    prop_assert!(name.starts_with(key) && !name.contains('/'));
                }
            }
        }
    }
}
