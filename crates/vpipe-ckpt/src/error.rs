//! The one error type of this crate.

use std::path::PathBuf;

/// Why a checkpoint could not be inspected.
///
/// Every variant carries the path of the file, and its `Display` is one line that starts with that
/// path and then names the problem, e.g.
/// `model.safetensors: header length 9999999 is larger than the file (1234 bytes)`.
/// The message is complete on its own: no variant exposes a [`std::error::Error::source`], so
/// printing the error with or without its chain gives the same single line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    // ---- any file ----
    /// The file could not be opened or read.
    #[error("{}: cannot read the file: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// Nothing exists at the path (or a symbolic link there points nowhere).
    #[error("{}: no such file", path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The path names a directory, not a file.
    #[error("{}: is a directory, not a checkpoint file", path.display())]
    IsDirectory {
        /// The path.
        path: PathBuf,
    },
    /// The path names a FIFO, a device, a socket, …: reading one could block forever or never
    /// end, so it is refused before it is opened.
    #[error("{}: is not a regular file ({kind})", path.display())]
    NotRegularFile {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: crate::SpecialFile,
    },
    /// Resolving the path's symbolic links goes round in a loop.
    #[error("{}: too many levels of symbolic links (a symbolic link loop)", path.display())]
    SymlinkLoop {
        /// The path.
        path: PathBuf,
    },
    /// The file has no bytes at all.
    #[error("{}: the file is empty (0 bytes)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// Neither a safetensors header nor a zip archive was found, and the extension does not say
    /// which format was meant.
    #[error(
        "{}: not a checkpoint this tool knows: neither a safetensors header nor a PyTorch zip \
         archive (the file starts with {start})",
        path.display()
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// The first bytes of the file, hex-encoded.
        start: String,
    },

    // ---- safetensors ----
    /// The file is shorter than the 8-byte header length that starts every safetensors file.
    #[error(
        "{}: truncated: the file is {file_size} bytes long, shorter than the 8-byte safetensors header length",
        path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        file_size: u64,
    },
    /// The header length is larger than the whole file (not a safetensors file, or a badly
    /// truncated one).
    #[error(
        "{}: header length {header_len} is larger than the file ({file_size} bytes)",
        path.display()
    )]
    HeaderPastEnd {
        /// The file.
        path: PathBuf,
        /// The header length read from the first 8 bytes.
        header_len: u64,
        /// The file size.
        file_size: u64,
    },
    /// The header length fits in the file size but the file ends before the header does.
    #[error(
        "{}: header cut off: the header length says {header_len} bytes, so the file needs at least {} bytes, but it has {file_size}",
        path.display(),
        8 + *header_len
    )]
    HeaderTruncated {
        /// The file.
        path: PathBuf,
        /// The header length read from the first 8 bytes.
        header_len: u64,
        /// The file size.
        file_size: u64,
    },
    /// The header length exceeds the format's limit of 100,000,000 bytes.
    #[error(
        "{}: header length {header_len} exceeds the safetensors limit of {limit} bytes",
        path.display()
    )]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// The header length read from the first 8 bytes.
        header_len: u64,
        /// The limit.
        limit: u64,
    },
    /// The header bytes are not UTF-8.
    #[error(
        "{}: the safetensors header is not valid UTF-8 (bad byte at header offset {valid_up_to})",
        path.display()
    )]
    HeaderNotUtf8 {
        /// The file.
        path: PathBuf,
        /// Offset of the first invalid byte inside the header.
        valid_up_to: usize,
    },
    /// The header is not JSON.
    #[error("{}: the safetensors header is not valid JSON: {reason}", path.display())]
    HeaderNotJson {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        reason: String,
    },
    /// The header is JSON but not a safetensors header (not an object, an entry without
    /// `data_offsets`, a duplicate name, a `__metadata__` that is not string → string, …).
    #[error("{}: invalid safetensors header: {reason}", path.display())]
    HeaderInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's dtype string is not one the safetensors format defines.
    #[error("{}: tensor {tensor:?} has unknown dtype {dtype:?}", path.display())]
    UnknownDtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The dtype string as written.
        dtype: String,
    },
    /// A tensor's `data_offsets` end before they begin.
    #[error(
        "{}: tensor {tensor:?} has data_offsets [{begin}, {end}] that end before they begin",
        path.display()
    )]
    OffsetsReversed {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Start offset as written (relative to the end of the header).
        begin: u64,
        /// End offset as written.
        end: u64,
    },
    /// A tensor's bytes reach past the end of the file.
    #[error(
        "{}: tensor {tensor:?} data_offsets [{begin}, {end}] reach byte {abs_end}, past the end of the file ({file_size} bytes)",
        path.display()
    )]
    OffsetsOutOfRange {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Start offset as written (relative to the end of the header).
        begin: u64,
        /// End offset as written.
        end: u64,
        /// Absolute file offset the tensor would end at.
        abs_end: u64,
        /// The file size.
        file_size: u64,
    },
    /// A tensor's byte span does not match its shape and dtype.
    #[error(
        "{}: tensor {tensor:?} ({dtype} {shape:?}) needs {} bytes but its data_offsets span {actual}",
        path.display(),
        count(expected)
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Its dtype.
        dtype: crate::DType,
        /// Its shape.
        shape: Vec<usize>,
        /// `elements × dtype size`; `None` if that overflows or is not a whole number of bytes.
        expected: Option<u64>,
        /// `end − begin`.
        actual: u64,
    },
    /// Two tensors share bytes.
    #[error(
        "{}: tensors {first:?} [{first_begin}, {first_end}] and {second:?} [{second_begin}, {second_end}] overlap",
        path.display()
    )]
    Overlap {
        /// The file.
        path: PathBuf,
        /// The tensor that starts first.
        first: String,
        /// Its start offset (relative to the end of the header).
        first_begin: u64,
        /// Its end offset.
        first_end: u64,
        /// The tensor that starts inside it.
        second: String,
        /// Its start offset.
        second_begin: u64,
        /// Its end offset.
        second_end: u64,
    },
    /// The data section has bytes that no tensor covers (the format requires a fully indexed
    /// buffer, and the safetensors library refuses such files).
    #[error(
        "{}: {len} bytes at data offset {at} belong to no tensor (safetensors allows no gaps or trailing bytes)",
        path.display()
    )]
    Gap {
        /// The file.
        path: PathBuf,
        /// First uncovered offset (relative to the end of the header).
        at: u64,
        /// Number of uncovered bytes.
        len: u64,
    },

    // ---- .pth ----
    /// A pickle file without the zip container: the legacy `torch.save` format (before torch 1.6,
    /// or `_use_new_zipfile_serialization=False`).
    #[error(
        "{}: unsupported legacy (non-zip) PyTorch format; re-save it with a current torch.save or convert it to safetensors",
        path.display()
    )]
    LegacyPth {
        /// The file.
        path: PathBuf,
    },
    /// The zip container is damaged or is no zip archive.
    #[error("{}: corrupt zip archive: {reason}", path.display())]
    ZipCorrupt {
        /// The file.
        path: PathBuf,
        /// What the zip reader said.
        reason: String,
    },
    /// The zip archive has no `data.pkl`, so it is not a `torch.save` archive.
    #[error(
        "{}: the zip archive has no data.pkl, so it is not a torch.save checkpoint ({entries} entries)",
        path.display()
    )]
    NoDataPkl {
        /// The file.
        path: PathBuf,
        /// How many entries the archive has.
        entries: usize,
    },
    /// An archive entry that must be read or addressed directly is compressed or encrypted
    /// (`torch.save` stores every entry uncompressed).
    #[error("{}: archive entry {entry} is {how}; torch.save writes entries uncompressed", path.display())]
    EntryNotStored {
        /// The file.
        path: PathBuf,
        /// The entry name.
        entry: String,
        /// "compressed with Deflated", "encrypted", ….
        how: String,
    },
    /// The archive says it was written big-endian.
    #[error("{}: the archive stores tensors big-endian ({entry}), which is not supported", path.display())]
    BigEndian {
        /// The file.
        path: PathBuf,
        /// The `byteorder` entry.
        entry: String,
    },
    /// `data.pkl` is too large to be a state dict's pickle.
    #[error("{}: {entry} is {size} bytes, more than the {limit}-byte limit for a pickle", path.display())]
    PickleTooLarge {
        /// The file.
        path: PathBuf,
        /// The entry name.
        entry: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The pickle ends in the middle of an opcode or before its STOP.
    #[error("{}: {entry} is truncated: it ends at byte {offset} {context}", path.display())]
    PickleTruncated {
        /// The file.
        path: PathBuf,
        /// The pickle entry name.
        entry: String,
        /// Where the data ran out.
        offset: u64,
        /// What was being read.
        context: String,
    },
    /// The pickle uses an opcode this reader does not implement (torch.save never writes it).
    #[error(
        "{}: {entry} uses the unsupported pickle opcode {name} (0x{opcode:02x}) at byte {offset}",
        path.display()
    )]
    PickleOpcode {
        /// The file.
        path: PathBuf,
        /// The pickle entry name.
        entry: String,
        /// The opcode byte.
        opcode: u8,
        /// Its pickletools name, or "unknown".
        name: &'static str,
        /// Where it is.
        offset: u64,
    },
    /// The pickle names a Python global outside the short list a state dict needs. Nothing is ever
    /// executed; such files are refused.
    #[error(
        "{}: {entry} refers to the Python global {module}.{name}, which is not allowed in a state dict (byte {offset})",
        path.display()
    )]
    PickleGlobal {
        /// The file.
        path: PathBuf,
        /// The pickle entry name.
        entry: String,
        /// The module.
        module: String,
        /// The attribute.
        name: String,
        /// Where it is.
        offset: u64,
    },
    /// The pickle is well-formed bytes but does not describe a state dict this reader understands
    /// (stack underflow, wrong argument types, a tensor without storage, …).
    #[error("{}: {entry}: {reason} (byte {offset})", path.display())]
    PickleMalformed {
        /// The file.
        path: PathBuf,
        /// The pickle entry name.
        entry: String,
        /// Where the problem was found.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The unpickled object is not a dict of tensors.
    #[error("{}: {entry} holds {found}, not a state dict (a dict of tensors)", path.display())]
    NotStateDict {
        /// The file.
        path: PathBuf,
        /// The pickle entry name.
        entry: String,
        /// What it holds instead.
        found: String,
    },
    /// A tensor refers to a storage entry that is not in the archive.
    #[error("{}: tensor {tensor:?} refers to storage {entry}, which is not in the archive", path.display())]
    MissingStorage {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The missing entry.
        entry: String,
    },
    /// A storage entry's size in the zip directory disagrees with the element count in the pickle.
    #[error(
        "{}: storage {entry} is {actual} bytes in the archive but the pickle declares {numel} {dtype} elements ({} bytes)",
        path.display(),
        count(expected)
    )]
    StorageSizeMismatch {
        /// The file.
        path: PathBuf,
        /// The storage entry.
        entry: String,
        /// Its dtype.
        dtype: crate::DType,
        /// Element count from the pickle.
        numel: u64,
        /// Bytes that count implies (`None` on overflow).
        expected: Option<u64>,
        /// Bytes according to the zip directory.
        actual: u64,
    },
    /// A tensor view reaches outside its storage.
    #[error(
        "{}: tensor {tensor:?} (shape {shape:?}, stride {stride:?}, offset {storage_offset}) reaches element {needed} but its storage has {available}",
        path.display()
    )]
    ViewOutOfRange {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Shape of the view.
        shape: Vec<usize>,
        /// Strides of the view, in elements.
        stride: Vec<usize>,
        /// First element of the view in the storage.
        storage_offset: u64,
        /// One past the last element the view touches (`u64::MAX` if that overflows).
        needed: u64,
        /// Elements in the storage.
        available: u64,
    },
    /// Two tensors of a state dict (after flattening nested dicts) have the same name.
    #[error("{}: tensor name {tensor:?} appears twice", path.display())]
    DuplicateTensor {
        /// The file.
        path: PathBuf,
        /// The name.
        tensor: String,
    },
}

/// Formats a count that may have overflowed.
fn count(n: &Option<u64>) -> String {
    match n {
        Some(n) => n.to_string(),
        None => "an overflowing number of".to_owned(),
    }
}

impl InspectError {
    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            Self::Io { path, .. }
            | Self::NotFound { path }
            | Self::IsDirectory { path }
            | Self::NotRegularFile { path, .. }
            | Self::SymlinkLoop { path }
            | Self::Empty { path }
            | Self::UnknownFormat { path, .. }
            | Self::Truncated { path, .. }
            | Self::HeaderPastEnd { path, .. }
            | Self::HeaderTruncated { path, .. }
            | Self::HeaderTooLarge { path, .. }
            | Self::HeaderNotUtf8 { path, .. }
            | Self::HeaderNotJson { path, .. }
            | Self::HeaderInvalid { path, .. }
            | Self::UnknownDtype { path, .. }
            | Self::OffsetsReversed { path, .. }
            | Self::OffsetsOutOfRange { path, .. }
            | Self::SizeMismatch { path, .. }
            | Self::Overlap { path, .. }
            | Self::Gap { path, .. }
            | Self::LegacyPth { path }
            | Self::ZipCorrupt { path, .. }
            | Self::NoDataPkl { path, .. }
            | Self::EntryNotStored { path, .. }
            | Self::BigEndian { path, .. }
            | Self::PickleTooLarge { path, .. }
            | Self::PickleTruncated { path, .. }
            | Self::PickleOpcode { path, .. }
            | Self::PickleGlobal { path, .. }
            | Self::PickleMalformed { path, .. }
            | Self::NotStateDict { path, .. }
            | Self::MissingStorage { path, .. }
            | Self::StorageSizeMismatch { path, .. }
            | Self::ViewOutOfRange { path, .. }
            | Self::DuplicateTensor { path, .. } => path,
        }
    }

    /// The message without the leading `path: `, for callers that name the file themselves.
    pub fn detail(&self) -> String {
        let message = self.to_string();
        let prefix = format!("{}: ", self.path().display());
        match message.strip_prefix(&prefix) {
            Some(rest) => rest.to_owned(),
            None => message,
        }
    }
}
