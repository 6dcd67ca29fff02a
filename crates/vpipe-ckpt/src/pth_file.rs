//! `torch.save` zip archives (`.pth`, `.pt`, `.bin`, `.ckpt`), read without running any pickle code
//! and without reading tensor data.
//!
//! The archive holds `<dir>/data.pkl` (the pickled object, with each tensor's storage replaced by a
//! persistent id), one stored (uncompressed) entry `<dir>/data/<key>` per storage, and small
//! entries such as `<dir>/byteorder` and `<dir>/version`. This reader reads the zip central
//! directory, `data.pkl` and `byteorder`; the local header of each storage entry (to learn where
//! its bytes start); and nothing else: no byte of tensor data is read. Storage sizes come from
//! the central directory.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use zip::result::ZipError;
use zip::{CompressionMethod, ZipArchive};

use crate::pickle::{self, PickleError};
use crate::{ByteRange, InspectError, PthView, TensorInfo};

/// Largest `data.pkl` accepted. A state dict's pickle is about 150 bytes per tensor (the 825-tensor
/// Wan DiT needs ~100 KB), so this leaves room for large training checkpoints while bounding memory.
pub(crate) const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// What the archive holds.
#[derive(Debug)]
pub(crate) struct Archive {
    /// Name of the pickle entry (`<dir>/data.pkl`).
    pub(crate) pickle_entry: String,
    pub(crate) tensors: Vec<TensorInfo>,
}

/// One storage entry, from the central directory and its local header.
#[derive(Clone, Copy)]
struct StorageEntry {
    /// Absolute offset of the first data byte.
    data_start: u64,
    /// Size in bytes.
    size: u64,
}

fn zip_error(path: &Path, e: ZipError) -> InspectError {
    let reason = match e {
        ZipError::Io(io) => format!("read error: {io}"),
        other => other.to_string(),
    };
    InspectError::ZipCorrupt {
        path: path.to_owned(),
        reason: reason.replace(['\n', '\r'], " "),
    }
}

/// Reads the archive at `path` (already opened as `file`, `file_size` bytes long).
pub(crate) fn read_archive<R: Read + Seek>(
    path: &Path,
    file: R,
    file_size: u64,
) -> Result<Archive, InspectError> {
    // Unbuffered on purpose: a read buffer would pull tensor bytes that follow each local header
    // into memory. Without one, only the bytes the zip reader asks for are read (a few thousand
    // small reads for a large model).
    let mut zip = ZipArchive::new(file).map_err(|e| zip_error(path, e))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();

    // `torch.save` writes `<dir>/data.pkl` with one directory level; prefer that, accept any
    // `…/data.pkl` or a bare `data.pkl`.
    let pickle_entry = names
        .iter()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| (n.matches('/').count() != 1, n.len()))
        .cloned()
        .ok_or(InspectError::NoDataPkl {
            path: path.to_owned(),
            entries: zip.len(),
        })?;
    let dir = pickle_entry
        .strip_suffix("data.pkl")
        .unwrap_or_default()
        .to_owned();

    let data = read_small_entry(path, &mut zip, &pickle_entry, MAX_PICKLE_BYTES, file_size)?;
    let byteorder = format!("{dir}byteorder");
    if zip.index_for_name(&byteorder).is_some() {
        let order = read_small_entry(path, &mut zip, &byteorder, 64, file_size)?;
        if order.trim_ascii() == b"big" {
            return Err(InspectError::BigEndian {
                path: path.to_owned(),
                entry: byteorder,
            });
        }
    }

    let pickled =
        pickle::read_state_dict(&data).map_err(|e| pickle_error(path, &pickle_entry, e))?;

    let mut entries: HashMap<String, StorageEntry> = HashMap::new();
    let mut tensors = Vec::with_capacity(pickled.len());
    for (name, t) in pickled {
        let entry_name = format!("{dir}data/{}", t.storage.key);
        let entry = match entries.get(&entry_name) {
            Some(e) => *e,
            None => {
                let e = storage_entry(path, &mut zip, &entry_name, &name, file_size)?;
                // Element count from the pickle against the size from the zip directory. An untyped
                // storage (`_rebuild_tensor_v3`) counts bytes.
                let unit = t.storage.dtype.unwrap_or(crate::DType::U8);
                let expected = unit.bytes_for(t.storage.numel);
                if expected != Some(e.size) {
                    return Err(InspectError::StorageSizeMismatch {
                        path: path.to_owned(),
                        entry: entry_name,
                        dtype: unit,
                        numel: t.storage.numel,
                        expected,
                        actual: e.size,
                    });
                }
                entries.insert(entry_name.clone(), e);
                e
            }
        };
        tensors.push(view(path, name, entry_name, entry, t)?);
    }
    Ok(Archive {
        pickle_entry,
        tensors,
    })
}

/// Checks that the view lies inside its storage and computes its byte range in the file.
fn view(
    path: &Path,
    name: String,
    entry_name: String,
    entry: StorageEntry,
    t: pickle::Tensor,
) -> Result<TensorInfo, InspectError> {
    let bits = t.dtype.bits();
    let available = entry.size.saturating_mul(8) / bits;
    let empty = t.shape.contains(&0);
    // One past the last element the view touches.
    let needed = if empty {
        Some(t.storage_offset)
    } else {
        t.shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.storage_offset.checked_add(1), |acc, (&n, &s)| {
                let reach = (n as u64 - 1).checked_mul(s as u64)?;
                Some(acc?.checked_add(reach))
            })
            .flatten()
    };
    let out_of_range = || InspectError::ViewOutOfRange {
        path: path.to_owned(),
        tensor: name.clone(),
        shape: t.shape.clone(),
        stride: t.stride.clone(),
        storage_offset: t.storage_offset,
        needed: needed.unwrap_or(u64::MAX),
        available,
    };
    let Some(end_el) = needed.filter(|&n| n <= available) else {
        return Err(out_of_range());
    };
    let start_el = if empty { end_el } else { t.storage_offset };
    let (Some(start_b), Some(end_b)) = (t.dtype.bytes_for(start_el), t.dtype.bytes_for(end_el))
    else {
        return Err(out_of_range());
    };
    let contiguous = is_contiguous(&t.shape, &t.stride);
    Ok(TensorInfo {
        name,
        dtype: t.dtype,
        shape: t.shape,
        data: ByteRange {
            start: entry.data_start + start_b,
            end: entry.data_start + end_b,
        },
        pth: Some(PthView {
            storage_entry: entry_name,
            storage_offset: t.storage_offset,
            stride: t.stride,
            contiguous,
        }),
    })
}

/// Row-major contiguity; dimensions of size 1 may have any stride (as in torch).
pub(crate) fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    true
}

/// Central-directory size and data start of a storage entry; it must be stored and inside the file.
fn storage_entry<R: Read + Seek>(
    path: &Path,
    zip: &mut ZipArchive<R>,
    entry: &str,
    tensor: &str,
    file_size: u64,
) -> Result<StorageEntry, InspectError> {
    let Some(index) = zip.index_for_name(entry) else {
        return Err(InspectError::MissingStorage {
            path: path.to_owned(),
            tensor: tensor.to_owned(),
            entry: entry.to_owned(),
        });
    };
    // `by_index_raw` reads the local header to find the data start; it does not read the data.
    let file = zip.by_index_raw(index).map_err(|e| zip_error(path, e))?;
    check_stored(path, entry, file.compression(), file.encrypted())?;
    let size = file.size();
    let Some(data_start) = file.data_start() else {
        return Err(InspectError::ZipCorrupt {
            path: path.to_owned(),
            reason: format!("no data offset for {entry}"),
        });
    };
    if data_start
        .checked_add(size)
        .is_none_or(|end| end > file_size)
    {
        return Err(InspectError::ZipCorrupt {
            path: path.to_owned(),
            reason: format!(
                "entry {entry} ({size} bytes at offset {data_start}) extends past the end of the file ({file_size} bytes)"
            ),
        });
    }
    Ok(StorageEntry { data_start, size })
}

fn check_stored(
    path: &Path,
    entry: &str,
    compression: CompressionMethod,
    encrypted: bool,
) -> Result<(), InspectError> {
    let how = if encrypted {
        "encrypted".to_owned()
    } else if compression != CompressionMethod::Stored {
        format!("compressed ({compression})")
    } else {
        return Ok(());
    };
    Err(InspectError::EntryNotStored {
        path: path.to_owned(),
        entry: entry.to_owned(),
        how,
    })
}

/// Reads a whole entry of at most `limit` bytes (checking its CRC).
fn read_small_entry<R: Read + Seek>(
    path: &Path,
    zip: &mut ZipArchive<R>,
    entry: &str,
    limit: u64,
    file_size: u64,
) -> Result<Vec<u8>, InspectError> {
    let index = zip
        .index_for_name(entry)
        .ok_or_else(|| InspectError::ZipCorrupt {
            path: path.to_owned(),
            reason: format!("entry {entry} vanished"),
        })?;
    {
        // Check the method on the raw entry first: opening a compressed entry for reading fails
        // in the zip reader (built without decompressors) with a less precise message.
        let raw = zip.by_index_raw(index).map_err(|e| zip_error(path, e))?;
        check_stored(path, entry, raw.compression(), raw.encrypted())?;
    }
    let mut file = zip.by_index(index).map_err(|e| zip_error(path, e))?;
    let size = file.size();
    if size > limit {
        return Err(InspectError::PickleTooLarge {
            path: path.to_owned(),
            entry: entry.to_owned(),
            size,
            limit,
        });
    }
    if size > file_size {
        return Err(InspectError::ZipCorrupt {
            path: path.to_owned(),
            reason: format!(
                "entry {entry} claims {size} bytes, more than the file ({file_size} bytes)"
            ),
        });
    }
    // size <= limit <= 256 MiB and <= file size: a bounded allocation.
    let mut buf = Vec::with_capacity(size as usize);
    file.by_ref()
        .take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| InspectError::ZipCorrupt {
            path: path.to_owned(),
            reason: format!("cannot read {entry}: {e}").replace(['\n', '\r'], " "),
        })?;
    if buf.len() as u64 != size {
        return Err(InspectError::ZipCorrupt {
            path: path.to_owned(),
            reason: format!(
                "entry {entry} holds {} bytes, the directory says {size}",
                buf.len()
            ),
        });
    }
    Ok(buf)
}

fn pickle_error(path: &Path, entry: &str, e: PickleError) -> InspectError {
    let (path, entry) = (path.to_owned(), entry.to_owned());
    match e {
        PickleError::Truncated { offset, context } => InspectError::PickleTruncated {
            path,
            entry,
            offset,
            context,
        },
        PickleError::Opcode {
            opcode,
            name,
            offset,
        } => InspectError::PickleOpcode {
            path,
            entry,
            opcode,
            name,
            offset,
        },
        PickleError::Global {
            module,
            name,
            offset,
        } => InspectError::PickleGlobal {
            path,
            entry,
            module,
            name,
            offset,
        },
        PickleError::Malformed { offset, reason } => InspectError::PickleMalformed {
            path,
            entry,
            offset,
            reason,
        },
        PickleError::NotStateDict { found } => InspectError::NotStateDict { path, entry, found },
        PickleError::Duplicate { name } => InspectError::DuplicateTensor { path, tensor: name },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(!is_contiguous(&[3, 4], &[1, 3]));
    }
}
