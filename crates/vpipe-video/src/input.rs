//! Opening inputs: only regular files are read, and only folders are listed.
//!
//! Reading a FIFO blocks until a writer appears (forever, for a forgotten `mkfifo`), a terminal
//! waits for typing, and `/dev/zero` never ends. So the type is checked before opening, and the
//! open itself is non-blocking and re-checked on the opened file, in case the path was swapped
//! for a FIFO between the check and the open.

use std::fs::{File, FileType, Metadata};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Result, VideoError};

/// What an input path names, after following symbolic links.
pub(crate) enum InputKind {
    /// A regular file.
    File,
    /// A folder (read as PNG frames).
    Folder,
}

/// Classifies `path` without opening it; anything but a regular file or a folder is an error
/// naming what it is.
pub(crate) fn classify(path: &Path) -> Result<InputKind> {
    let meta = std::fs::metadata(path).map_err(|e| stat_error(path, e))?;
    if meta.is_dir() {
        Ok(InputKind::Folder)
    } else if meta.is_file() {
        Ok(InputKind::File)
    } else {
        Err(not_regular(path, &meta.file_type()))
    }
}

/// Opens a regular file for reading, never blocking on a FIFO or device put in its place.
pub(crate) fn open_regular_file(path: &Path) -> Result<(File, Metadata)> {
    if let InputKind::Folder = classify(path)? {
        return Err(VideoError::NotRegularFile {
            path: path.to_path_buf(),
            kind: "a folder",
        });
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO for reading blocks until a writer opens it; O_NONBLOCK returns at
        // once. On a regular file the flag changes nothing.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| stat_error(path, e))?;
    // The path may have been replaced between `classify` and `open`: trust only the opened
    // file's own metadata.
    let meta = file
        .metadata()
        .map_err(|e| VideoError::io(path, "read metadata", e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    Ok((file, meta))
}

/// Reads a whole regular file, refusing one larger than `max_bytes` before reading it.
pub(crate) fn read_regular_file(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let (file, meta) = open_regular_file(path)?;
    let too_large = |bytes: u64| VideoError::InputFileTooLarge {
        path: path.to_path_buf(),
        bytes,
        limit: max_bytes,
    };
    if meta.len() > max_bytes {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::new();
    let expected = usize::try_from(meta.len()).map_err(|_| too_large(meta.len()))?;
    bytes
        .try_reserve_exact(expected)
        .map_err(|source| VideoError::OutOfMemory {
            path: path.to_path_buf(),
            bytes: expected,
            source,
        })?;
    // A file still growing after the size check stops at the limit, plus one byte to notice.
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| VideoError::io(path, "read", e))?;
    let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if read > max_bytes {
        return Err(too_large(read));
    }
    Ok(bytes)
}

/// A failed `stat` or `open`, told apart where the OS error alone misleads: a symbolic link loop
/// and a link to a missing target would otherwise read as "no such file".
pub(crate) fn stat_error(path: &Path, e: std::io::Error) -> VideoError {
    #[cfg(unix)]
    if e.raw_os_error() == Some(libc::ELOOP) {
        return VideoError::SymlinkLoop {
            path: path.to_path_buf(),
        };
    }
    if e.kind() == std::io::ErrorKind::NotFound {
        let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        if is_link {
            return VideoError::BrokenSymlink {
                path: path.to_path_buf(),
                target: std::fs::read_link(path).unwrap_or_else(|_| PathBuf::from("?")),
            };
        }
    }
    VideoError::io(path, "open", e)
}

fn not_regular(path: &Path, file_type: &FileType) -> VideoError {
    VideoError::NotRegularFile {
        path: path.to_path_buf(),
        kind: kind_name(file_type),
    }
}

/// "a FIFO", "a character device", ...: what a non-regular file is, for the error message.
pub(crate) fn kind_name(file_type: &FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_socket() {
            return "a socket";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
    }
    if file_type.is_dir() {
        "a folder"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "an unknown file type"
    }
}
