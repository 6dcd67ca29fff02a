//! Checks on the paths a command reads and writes, made before anything is loaded: a run that
//! would fail at its end (hours into a real job) because of its output path fails at once with
//! exit 2 instead, and no output can overwrite an input or another output.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::Error::{self, BadInput};

/// What is wrong with `path` as an input file, or `None` when it is a regular file (after
/// following symbolic links). Only regular files are ever opened: reading a FIFO or a device
/// would block or never end.
pub fn input_file_problem(path: &Path) -> Option<String> {
    use vpipe_ckpt::InspectError as E;
    Some(match vpipe_ckpt::check_regular_file(path).err()? {
        E::NotFound { .. } => "no such file".into(),
        E::IsDirectory { .. } => "is a folder, not a regular file".into(),
        E::NotRegularFile { kind, .. } => format!("is {kind}, not a regular file"),
        E::SymlinkLoop { .. } => "too many levels of symbolic links (a symbolic link loop)".into(),
        E::Io { error, .. } => error.to_string(),
        other => other.to_string(),
    })
}

/// Like [`input_file_problem`], for an input that may also be a folder (of PNG frames).
pub fn input_file_or_folder_problem(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => None,
        _ => input_file_problem(path),
    }
}

/// Whether `path`'s extension is `extension`, in any case (`.SAFETENSORS` too).
pub fn has_extension(path: &Path, extension: &str) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(extension))
}

/// Largest settings file vpipe reads (a `--pipeline` TOML, a `config.json`): far beyond any
/// real one, so that a file of gigabytes given by mistake is refused before it is read.
const MAX_SETTINGS_FILE_BYTES: u64 = 1 << 20;

/// The text of the settings file given with `flag`: a regular file (a FIFO would block the
/// read forever) of at most [`MAX_SETTINGS_FILE_BYTES`].
pub fn read_settings_file(flag: &str, path: &Path) -> Result<String, Error> {
    let fail = |what: String| BadInput(format!("{flag} {}: {what}", path.display()));
    if let Some(problem) = input_file_problem(path) {
        return Err(fail(problem));
    }
    let size = std::fs::metadata(path)
        .map_err(|e| fail(e.to_string()))?
        .len();
    if size > MAX_SETTINGS_FILE_BYTES {
        return Err(fail(format!(
            "{size} bytes; a settings file is at most {MAX_SETTINGS_FILE_BYTES}"
        )));
    }
    std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))
}

/// Checks that each `(flag, path)` is a regular file.
pub fn require_files<P: AsRef<Path>>(files: &[(&str, P)]) -> Result<(), Error> {
    for (flag, path) in files {
        let path = path.as_ref();
        if let Some(problem) = input_file_problem(path) {
            return Err(BadInput(format!("{flag} {}: {problem}", path.display())));
        }
    }
    Ok(())
}

/// What an output path may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A file to be created or replaced.
    File,
    /// A folder to be created (PNG frames): it must not exist, or be empty.
    Folder,
}

/// One path a command will write, with the flag that named it.
pub struct Output<'a> {
    pub flag: &'a str,
    pub path: &'a Path,
    pub kind: OutputKind,
}

/// Checks, before any work, that every output can be written where it is going, that no two
/// outputs are the same file, and that no output is one of `inputs` (which would be
/// overwritten: a checkpoint given as `--out`, the video given as `--report`).
pub fn check_outputs(outputs: &[Output<'_>], inputs: &[(&str, &Path)]) -> Result<(), Error> {
    for output in outputs {
        check_writable(output)?;
    }
    for (i, a) in outputs.iter().enumerate() {
        for b in &outputs[i + 1..] {
            if same_path(a.path, b.path) {
                return Err(BadInput(format!(
                    "{} {} and {} {}: the same file; each output needs a path of its own",
                    a.flag,
                    a.path.display(),
                    b.flag,
                    b.path.display()
                )));
            }
        }
        for (flag, input) in inputs {
            if same_path(a.path, input) {
                return Err(BadInput(format!(
                    "{} {}: is the input of {flag}; writing it would destroy that input",
                    a.flag,
                    a.path.display()
                )));
            }
        }
    }
    Ok(())
}

fn check_writable(output: &Output<'_>) -> Result<(), Error> {
    let Output { flag, path, kind } = *output;
    let fail = |what: String| BadInput(format!("{flag} {}: {what}", path.display()));
    if path.file_name().is_none() {
        return Err(fail("expected a file name".into()));
    }
    match (std::fs::symlink_metadata(path), kind) {
        (Ok(meta), OutputKind::File) if meta.is_dir() => {
            return Err(fail("is a folder; expected a file name".into()))
        }
        (Ok(meta), OutputKind::File) if !meta.is_file() && !meta.file_type().is_symlink() => {
            let kind = vpipe_ckpt::SpecialFile::of(meta.file_type());
            return Err(fail(format!("is {kind}; expected a file name")));
        }
        (Ok(meta), OutputKind::Folder) if meta.is_dir() => {
            let empty = std::fs::read_dir(path)
                .map_err(|e| fail(e.to_string()))?
                .next()
                .is_none();
            if !empty {
                return Err(fail(
                    "a folder that is not empty; PNG frames go into a new or empty folder".into(),
                ));
            }
        }
        (Ok(_), OutputKind::Folder) => {
            return Err(fail(
                "exists and is not a folder; PNG frames go into a new or empty folder".into(),
            ))
        }
        _ => {}
    }
    let parent = parent_of(path);
    match std::fs::metadata(&parent) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(fail(format!("{} is not a folder", parent.display()))),
        Err(_) => {
            return Err(fail(format!(
                "the folder {} does not exist",
                parent.display()
            )))
        }
    }
    // Whether the folder takes a new file is known only by making one (permissions, a
    // read-only mount, quotas); outputs are written as a temporary file renamed into place,
    // so this is exactly what the write will need.
    let probe = parent.join(format!(".vpipe-write-check.{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(fail(format!("cannot write into {}: {e}", parent.display()))),
    }
}

/// The folder `path` is in (`.` for a bare file name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Whether `a` and `b` name the same file: the same inode when both exist (hard links and
/// symbolic links included), else the same canonical folder and name.
fn same_path(a: &Path, b: &Path) -> bool {
    if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return ma.dev() == mb.dev() && ma.ino() == mb.ino();
    }
    let canonical = |p: &Path| {
        std::fs::canonicalize(parent_of(p))
            .ok()
            .zip(p.file_name().map(|n| n.to_owned()))
    };
    match (canonical(a), canonical(b)) {
        (Some((da, na)), Some((db, nb))) => da == db && na == nb,
        _ => a == b,
    }
}

/// The chart a report at `report` is drawn next to.
pub fn chart_of(report: &Path) -> PathBuf {
    report.with_extension("svg")
}

/// [`check_outputs`] for a command's main output, its `--report` and the report's chart.
pub fn check_command_outputs(
    main: Output<'_>,
    report: Option<&Path>,
    inputs: &[(&str, &Path)],
) -> Result<(), Error> {
    let chart = report.map(chart_of);
    let mut outputs = vec![main];
    if let (Some(report), Some(chart)) = (report, chart.as_deref()) {
        outputs.push(Output {
            flag: "--report",
            path: report,
            kind: OutputKind::File,
        });
        outputs.push(Output {
            flag: "--report (its chart)",
            path: chart,
            kind: OutputKind::File,
        });
    }
    check_outputs(&outputs, inputs)
}

/// [`check_command_outputs`] for a `vpipe tensors` job: one safetensors `--output`.
pub fn check_tensor_outputs(
    output: &Path,
    report: Option<&Path>,
    inputs: &[(&str, &Path)],
) -> Result<(), Error> {
    let main = Output {
        flag: "--output",
        path: output,
        kind: OutputKind::File,
    };
    check_command_outputs(main, report, inputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_may_not_alias_inputs_or_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("dit.safetensors");
        std::fs::write(&input, b"x").unwrap();
        let out = dir.path().join("o.mp4");
        let file = |flag, path| Output {
            flag,
            path,
            kind: OutputKind::File,
        };
        let err = check_outputs(&[file("--out", &input)], &[("--dit", &input)]).unwrap_err();
        assert!(err.to_string().contains("is the input of --dit"), "{err}");
        let err = check_outputs(&[file("--out", &out), file("--report", &out)], &[]).unwrap_err();
        assert!(err.to_string().contains("the same file"), "{err}");
        // Through a relative spelling of the same folder.
        let dotted = dir.path().join(".").join("o.mp4");
        assert!(check_outputs(&[file("--out", &out), file("--report", &dotted)], &[]).is_err());
        check_outputs(&[file("--out", &out)], &[("--dit", &input)]).unwrap();
        assert!(!out.exists(), "the check writes nothing");
    }

    #[test]
    fn unwritable_places_are_found_before_the_work() {
        let dir = tempfile::tempdir().unwrap();
        let file = |path| Output {
            flag: "--out",
            path,
            kind: OutputKind::File,
        };
        let missing = dir.path().join("no/such/folder/o.mp4");
        let err = check_outputs(&[file(&missing)], &[]).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = check_outputs(&[file(dir.path())], &[]).unwrap_err();
        assert!(err.to_string().contains("is a folder"), "{err}");
        let full = dir.path().join("frames");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("0.png"), b"x").unwrap();
        let folder = Output {
            flag: "--out",
            path: &full,
            kind: OutputKind::Folder,
        };
        let err = check_outputs(&[folder], &[]).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn non_regular_inputs_are_named() {
        assert!(input_file_problem(Path::new("/dev/null"))
            .unwrap()
            .contains("a character device"));
        assert!(input_file_problem(Path::new("/"))
            .unwrap()
            .contains("a folder"));
        let dir = tempfile::tempdir().unwrap();
        let looped = dir.path().join("loop");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let problem = input_file_problem(&looped).unwrap();
        assert!(problem.contains("symbolic links"), "{problem}");
        assert_eq!(
            input_file_problem(&dir.path().join("missing")).unwrap(),
            "no such file"
        );
    }
}
