//! Outputs written through a temporary file beside their target and renamed into place, so
//! that no reader ever sees a half-written file, and no temporary file outlives a failed write
//! or, past [`STALE_PARTIAL_AGE`], a killed writer.

use std::path::{Path, PathBuf};

use crate::error::{io_error, Error, Result};

/// Writes `target` by letting `write` fill a fresh temporary file (the path it is given) in the
/// same folder, then syncing it and renaming it into place. Every error path removes the
/// temporary file, and stale ones of earlier killed writers of the same target are removed
/// first.
pub fn write_atomically(target: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::NotAFileName(target.to_owned()))?;
    remove_stale_partials(dir, name);
    let partial = PartialFile::create(dir, name)?;
    write(&partial.path)?;
    partial.sync()?;
    partial.persist()
}

/// A temporary file `.NAME.<pid>.<n>.partial` beside its target, deleted when dropped unless it
/// was renamed into place: every error path (a full disk, a failed sync or rename) removes it.
/// The name is unique (`create_new`), so demos sharing a folder never write into one file.
struct PartialFile {
    path: PathBuf,
    target: PathBuf,
    file: std::fs::File,
    persisted: bool,
}

impl PartialFile {
    fn create(dir: &Path, name: &str) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let pid = std::process::id();
        // Another process may hold the same pid and counter (a separate pid namespace sharing
        // the folder); create_new refuses to open its file, so take the next number.
        for _ in 0..1000 {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = dir.join(format!(".{name}.{pid}.{n}.partial"));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(PartialFile {
                        path,
                        target: dir.join(name),
                        file,
                        persisted: false,
                    })
                }
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(io_error(format!("creating {}", path.display()))(err)),
            }
        }
        Err(Error::NoTemporaryName(dir.join(name)))
    }

    /// Waits until what was written is on disk, so that the rename never publishes a file
    /// whose data a crash could still lose (any descriptor of the file syncs its data).
    fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(io_error(format!("writing {}", self.target.display())))
    }

    fn persist(mut self) -> Result<()> {
        std::fs::rename(&self.path, &self.target).map_err(io_error(format!(
            "renaming {} into place",
            self.target.display()
        )))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A partial file untouched for this long belongs to a writer that is gone.
const STALE_PARTIAL_AGE: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Removes temporary files of `name` left in `dir` by writers that were killed mid-write.
///
/// The rule is age, not the writer's pid: a pid says nothing across pid namespaces or hosts
/// sharing the folder, and may be reused. A live writer keeps writing its file from the moment
/// it creates it, so one not modified for [`STALE_PARTIAL_AGE`] has no writer left;
/// at worst a writer stalled that long fails its rename and reports it. Errors are ignored: a
/// concurrent writer may remove the same file, and a leftover only costs disk space.
pub fn remove_stale_partials(dir: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        if !is_partial_of(file_name, name) {
            continue;
        }
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok());
        if age.is_some_and(|age| age > STALE_PARTIAL_AGE) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether `file_name` is a temporary file of `name`: `.NAME.<pid>.<n>.partial`, or a plain
/// `NAME.partial` (the temporary name older vpipe versions used, which they could leave).
fn is_partial_of(file_name: &str, name: &str) -> bool {
    if file_name.strip_suffix(".partial") == Some(name) {
        return true;
    }
    let numbers = file_name
        .strip_prefix('.')
        .and_then(|rest| rest.strip_prefix(name))
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.strip_suffix(".partial"));
    numbers.is_some_and(|numbers| {
        let mut parts = numbers.split('.');
        let is_number = |part: Option<&str>| {
            part.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        };
        is_number(parts.next()) && is_number(parts.next()) && parts.next().is_none()
    })
}
