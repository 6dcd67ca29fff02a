//! The step caches a run can ask for (`--cache`): their settings, defaults and the magnitude
//! ratios MagCache reads. Which steps skip the blocks is decided by the planner
//! (`plan::cache_schedule`, `plan::magcache_schedule`).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// TeaCache's threshold without `--cache-threshold`.
pub const TEACACHE_THRESHOLD: f64 = 0.1;
/// MagCache's settings without flags (diffusers' `MagCacheConfig` defaults).
pub const MAGCACHE_THRESHOLD: f64 = 0.06;
pub const MAGCACHE_MAX_SKIP: usize = 3;
pub const MAGCACHE_RETENTION: f64 = 0.2;

/// The step cache of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum StepCache {
    /// TeaCache: a step skips the blocks while the relative changes of the time modulation,
    /// added up since the blocks last ran, stay under `threshold`.
    TeaCache { threshold: f64 },
    /// MagCache with the magnitude ratios of a calibration run.
    MagCache {
        ratios: MagRatios,
        settings: MagCacheSettings,
    },
    /// Every step runs the blocks and the run measures the magnitude ratios, written to `out`
    /// when given.
    MagCacheCalibrate { out: Option<PathBuf> },
}

/// MagCache's rule (diffusers' `MagCacheConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MagCacheSettings {
    /// The bound on the accumulated error |1 − product of the ratios| since the blocks ran.
    pub threshold: f64,
    /// The most steps in a row that skip the blocks.
    pub max_skip: usize,
    /// The share of the run's first steps that always run the blocks.
    pub retention: f64,
}

/// Magnitude ratios as read from `file`: one per step of the calibration run (in f32, as
/// diffusers holds them), interpolated to the run's step count when it differs.
#[derive(Debug, Clone, PartialEq)]
pub struct MagRatios {
    pub values: Vec<f32>,
    pub file: PathBuf,
}

/// What the planner needs of a [`StepCache`]: its kind and settings, without the ratios.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum CacheRule {
    Teacache { threshold: f64 },
    Magcache(MagCacheSettings),
    MagcacheCalibrate,
}

/// The step cache flags as given (`None`: not given).
#[derive(Debug, Default)]
pub struct StepCacheFlags<'a> {
    pub cache: Option<&'a str>,
    pub threshold: Option<f64>,
    pub max_skip: Option<usize>,
    pub retention: Option<f64>,
    pub mag_ratios: Option<&'a Path>,
}

impl StepCache {
    /// The step cache `flags` ask for, each setting its cache's default when not given; the
    /// ratios file of `--cache magcache` read. Errors name the flag (and the file).
    pub fn from_flags(flags: StepCacheFlags<'_>) -> Result<Option<Self>> {
        let bad = |what: String| Err(Error::BadInput(what));
        let Some(cache) = flags.cache else {
            let given = [
                ("--cache-threshold", flags.threshold.is_some()),
                ("--cache-max-skip", flags.max_skip.is_some()),
                ("--cache-retention", flags.retention.is_some()),
                ("--mag-ratios", flags.mag_ratios.is_some()),
            ];
            return match given.iter().find(|(_, given)| *given) {
                Some((flag, _)) => bad(format!(
                    "{flag}: a step cache setting; give --cache teacache, magcache or \
                     magcache-calibrate with it"
                )),
                None => Ok(None),
            };
        };
        if let Some(threshold) = flags.threshold.filter(|t| !(0.0..=1e6).contains(t)) {
            return bad(format!(
                "--cache-threshold {threshold}: expected a number from 0 to 1e6"
            ));
        }
        if let Some(retention) = flags.retention.filter(|r| !(0.0..=1.0).contains(r)) {
            return bad(format!(
                "--cache-retention {retention}: expected a share from 0 to 1"
            ));
        }
        let magcache_only = [
            ("--cache-max-skip", flags.max_skip.is_some()),
            ("--cache-retention", flags.retention.is_some()),
            ("--mag-ratios", flags.mag_ratios.is_some()),
        ];
        match cache {
            "teacache" => {
                if let Some((flag, _)) = magcache_only.iter().find(|(_, given)| *given) {
                    return bad(format!(
                        "{flag}: a setting of --cache magcache, not teacache"
                    ));
                }
                Ok(Some(Self::TeaCache {
                    threshold: flags.threshold.unwrap_or(TEACACHE_THRESHOLD),
                }))
            }
            "magcache" => {
                let Some(file) = flags.mag_ratios else {
                    return bad(
                        "--cache magcache: needs --mag-ratios FILE.json; the magnitude ratios \
                         are particular to a model (and its scheduler), so measure them once \
                         with --cache magcache-calibrate --mag-ratios FILE.json on the same \
                         model and settings"
                            .into(),
                    );
                };
                Ok(Some(Self::MagCache {
                    ratios: MagRatios::read(file)?,
                    settings: MagCacheSettings {
                        threshold: flags.threshold.unwrap_or(MAGCACHE_THRESHOLD),
                        max_skip: flags.max_skip.unwrap_or(MAGCACHE_MAX_SKIP),
                        retention: flags.retention.unwrap_or(MAGCACHE_RETENTION),
                    },
                }))
            }
            "magcache-calibrate" => {
                if let Some((flag, _)) = [
                    ("--cache-threshold", flags.threshold.is_some()),
                    ("--cache-max-skip", flags.max_skip.is_some()),
                    ("--cache-retention", flags.retention.is_some()),
                ]
                .iter()
                .find(|(_, given)| *given)
                {
                    return bad(format!(
                        "{flag}: --cache magcache-calibrate skips no step; give it with \
                         --cache magcache"
                    ));
                }
                if let Some(file) = flags.mag_ratios {
                    let dir = match file.parent() {
                        Some(p) if !p.as_os_str().is_empty() => p,
                        _ => Path::new("."),
                    };
                    if !dir.is_dir() || file.is_dir() {
                        return bad(format!(
                            "--mag-ratios {}: the calibration writes the ratios there; {}",
                            file.display(),
                            if file.is_dir() {
                                "it is a folder"
                            } else {
                                "its folder does not exist"
                            }
                        ));
                    }
                }
                Ok(Some(Self::MagCacheCalibrate {
                    out: flags.mag_ratios.map(Path::to_owned),
                }))
            }
            other => bad(format!(
                "--cache {other}: expected teacache, magcache or magcache-calibrate"
            )),
        }
    }

    /// Its kind and settings, for the planner.
    pub(crate) fn rule(&self) -> CacheRule {
        match self {
            Self::TeaCache { threshold } => CacheRule::Teacache {
                threshold: *threshold,
            },
            Self::MagCache { settings, .. } => CacheRule::Magcache(*settings),
            Self::MagCacheCalibrate { .. } => CacheRule::MagcacheCalibrate,
        }
    }
}

impl MagRatios {
    /// The ratios in `file`: a JSON array of numbers, or an object whose `mag_ratios` is one
    /// (what `--cache magcache-calibrate` writes).
    pub fn read(file: &Path) -> Result<Self> {
        let text = crate::paths::read_settings_file("--mag-ratios", file)?;
        let fail = |what: &str| {
            Error::BadInput(format!(
                "--mag-ratios {}: {what}; expected a JSON array of magnitude ratios, or an \
                 object with a `mag_ratios` array (what --cache magcache-calibrate writes)",
                file.display()
            ))
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fail(&format!("not JSON ({e})")))?;
        let array = match &value {
            serde_json::Value::Array(a) => a,
            serde_json::Value::Object(o) => match o.get("mag_ratios") {
                Some(serde_json::Value::Array(a)) => a,
                Some(_) => return Err(fail("`mag_ratios` is not an array")),
                None => return Err(fail("an object without `mag_ratios`")),
            },
            _ => return Err(fail("neither an array nor an object")),
        };
        if array.is_empty() {
            return Err(fail("no ratios"));
        }
        let values = array
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64()
                    .map(|r| r as f32)
                    .filter(|r| r.is_finite())
                    .ok_or_else(|| fail(&format!("entry {i} ({v}) is not a finite number")))
            })
            .collect::<Result<Vec<f32>>>()?;
        Ok(Self {
            values,
            file: file.to_owned(),
        })
    }
}

/// Writes calibrated `ratios` to `file` (through a temporary file) in the form
/// [`MagRatios::read`] reads.
pub(crate) fn write_mag_ratios(file: &Path, ratios: &[f64], steps: usize) -> Result<()> {
    let json = serde_json::json!({ "steps": steps, "mag_ratios": ratios });
    let text = serde_json::to_string_pretty(&json).expect("numbers serialise") + "\n";
    crate::partial::write_atomically(file, |partial| {
        std::fs::write(partial, text).map_err(crate::error::io_error(format!(
            "--mag-ratios {}",
            file.display()
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags<'a>(cache: &'a str, ratios: Option<&'a Path>) -> StepCacheFlags<'a> {
        StepCacheFlags {
            cache: Some(cache),
            mag_ratios: ratios,
            ..Default::default()
        }
    }

    #[test]
    fn each_cache_takes_its_own_defaults_and_reads_both_ratio_forms() {
        assert_eq!(
            StepCache::from_flags(flags("teacache", None)).unwrap(),
            Some(StepCache::TeaCache {
                threshold: TEACACHE_THRESHOLD
            })
        );
        let dir = tempfile::tempdir().unwrap();
        let array = dir.path().join("a.json");
        std::fs::write(&array, "[1.0, 0.5]").unwrap();
        let object = dir.path().join("o.json");
        write_mag_ratios(&object, &[1.0, 0.5], 2).unwrap();
        for file in [&array, &object] {
            let Some(StepCache::MagCache { ratios, settings }) =
                StepCache::from_flags(flags("magcache", Some(file))).unwrap()
            else {
                panic!("not magcache");
            };
            assert_eq!(ratios.values, [1.0, 0.5]);
            assert_eq!(settings.threshold, MAGCACHE_THRESHOLD);
            assert_eq!(settings.max_skip, MAGCACHE_MAX_SKIP);
            assert_eq!(settings.retention, MAGCACHE_RETENTION);
        }
    }

    #[test]
    fn bad_step_cache_flags_name_the_flag_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "[1.0, \"x\"]").unwrap();
        let message = |f: StepCacheFlags<'_>| StepCache::from_flags(f).unwrap_err().to_string();
        assert!(message(flags("magcache", None)).contains("--mag-ratios"));
        for file in [&missing, &bad] {
            let m = message(flags("magcache", Some(file)));
            assert!(
                m.contains("--mag-ratios") && m.contains(&*file.to_string_lossy()),
                "{m}"
            );
        }
        let m = message(StepCacheFlags {
            threshold: Some(0.1),
            ..Default::default()
        });
        assert!(m.contains("--cache-threshold"), "{m}");
        let m = message(StepCacheFlags {
            max_skip: Some(2),
            ..flags("teacache", None)
        });
        assert!(m.contains("--cache-max-skip"), "{m}");
    }
}
