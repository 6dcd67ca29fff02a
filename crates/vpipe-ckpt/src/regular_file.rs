//! Opening inputs: regular files only.
//!
//! Opening a FIFO for reading blocks until a writer appears, and reading a character device such
//! as `/dev/zero` never ends, so a checkpoint path is checked with `stat` before it is opened, and
//! the opened file is checked again (the path may have been replaced in between).

use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::InspectError;

/// What a path names when it is neither a regular file nor a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SpecialFile {
    /// A named pipe.
    Fifo,
    /// A character device (`/dev/zero`, a terminal).
    CharDevice,
    /// A block device (a disk).
    BlockDevice,
    /// A Unix domain socket.
    Socket,
    /// Anything else the file system reports.
    Other,
}

impl SpecialFile {
    /// What a file of `file_type`, neither regular nor a directory, is.
    pub fn of(file_type: std::fs::FileType) -> Self {
        if file_type.is_fifo() {
            Self::Fifo
        } else if file_type.is_char_device() {
            Self::CharDevice
        } else if file_type.is_block_device() {
            Self::BlockDevice
        } else if file_type.is_socket() {
            Self::Socket
        } else {
            Self::Other
        }
    }
}

impl fmt::Display for SpecialFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fifo => "a FIFO",
            Self::CharDevice => "a character device",
            Self::BlockDevice => "a block device",
            Self::Socket => "a socket",
            Self::Other => "a special file",
        })
    }
}

/// Checks, without opening it, that `path` (symbolic links followed) is a regular file, and
/// returns its metadata.
///
/// The errors name the file and what it is instead: [`InspectError::NotFound`],
/// [`InspectError::IsDirectory`], [`InspectError::NotRegularFile`] (a FIFO, a device, …),
/// [`InspectError::SymlinkLoop`], or [`InspectError::Io`] for anything else (no permission, …).
pub fn check_regular_file(path: &Path) -> Result<Metadata, InspectError> {
    let metadata = std::fs::metadata(path).map_err(|e| stat_error(path, e))?;
    require_regular(path, &metadata)?;
    Ok(metadata)
}

/// Opens `path` for reading if it is a regular file; see [`check_regular_file`] for the errors.
///
/// The path is checked before it is opened, so a FIFO is never opened. The open itself is
/// non-blocking (it has no effect on a regular file's reads) and the opened file is checked
/// again, so a path swapped for a FIFO or device between the two steps is refused too, not
/// waited on.
pub fn open_regular(path: &Path) -> Result<File, InspectError> {
    check_regular_file(path)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| stat_error(path, e))?;
    let metadata = file.metadata().map_err(|error| InspectError::Io {
        path: path.to_owned(),
        error,
    })?;
    require_regular(path, &metadata)?;
    Ok(file)
}

fn require_regular(path: &Path, metadata: &Metadata) -> Result<(), InspectError> {
    let file_type = metadata.file_type();
    if file_type.is_file() {
        Ok(())
    } else if file_type.is_dir() {
        Err(InspectError::IsDirectory {
            path: path.to_owned(),
        })
    } else {
        Err(InspectError::NotRegularFile {
            path: path.to_owned(),
            kind: SpecialFile::of(file_type),
        })
    }
}

/// Names the two failures of `stat`/`open` that users meet most by what they are.
fn stat_error(path: &Path, error: io::Error) -> InspectError {
    let path = path.to_owned();
    if error.raw_os_error() == Some(libc::ELOOP) {
        InspectError::SymlinkLoop { path }
    } else if error.kind() == io::ErrorKind::NotFound {
        InspectError::NotFound { path }
    } else {
        InspectError::Io { path, error }
    }
}
