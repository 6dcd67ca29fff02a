//! What a checkpoint file is, without loading it.
//!
//! `vpipe inspect FILE` is [`inspect`]: it reads the header of a `.safetensors` file (the 8-byte
//! length and the JSON, never the tensor bytes) or the directory and pickle of a PyTorch zip
//! archive (`.pth`; the pickle is interpreted by a small reader that only knows the opcodes and
//! globals a state dict needs, so nothing in the file is ever executed), then reports:
//!
//! - the tensor list — name, dtype, shape, absolute byte range in the file — which later code uses
//!   to load or memory-map tensors ([`Inspection::tensors`]);
//! - the model family (Wan 2.1 DiT T2V / I2V, Wan VAE, umT5 encoder, CLIP vision, LoRA for the Wan
//!   DiT), the key layout (original Wan / ComfyUI, or diffusers / transformers) and any key prefix,
//!   and the configuration the shapes imply ([`detect`], a pure function usable on its own);
//! - per-dtype tensor, parameter and byte counts, totals, the file size and the safetensors
//!   `__metadata__`.
//!
//! Damaged or hostile files give an [`InspectError`] whose message is one line naming the file and
//! the problem; no input makes this crate panic or allocate more than the header or pickle size
//! (bounded) plus the tensor list.
//!
//! ```no_run
//! let info = vpipe_ckpt::inspect(std::path::Path::new("wan2.1_t2v_1.3B_bf16.safetensors"))?;
//! println!("{info}"); // a few lines: family, layout, config, totals
//! for t in &info.tensors {
//!     println!("{} {} {:?} bytes {}..{}", t.name, t.dtype, t.shape, t.data.start, t.data.end);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Key names and shapes follow the published Wan 2.1 checkpoints (the DiT, the VAE, umT5) and
//! the LoRA formats in use.

#![forbid(unsafe_code)]
#![deny(missing_docs, unreachable_pub)]

mod detect;
mod dtype;
mod error;
mod pickle;
mod pth_file;
mod regular_file;
mod safetensors_file;

#[cfg(test)]
mod fuzz_tests;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use crate::detect::{
    detect, ClipConfig, Detection, DitConfig, Family, KeyLayout, LoraConfig, LoraFormat,
    ModelConfig, TensorMeta, Umt5Config, VaeConfig,
};
pub use crate::dtype::DType;
pub use crate::error::InspectError;
pub use crate::regular_file::{check_regular_file, open_regular, SpecialFile};

/// A half-open byte range `[start, end)` of absolute file offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// How a `.pth` tensor views its storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PthView {
    /// The archive entry holding the storage (`archive/data/3`).
    pub storage_entry: String,
    /// First element of the view in the storage, in elements.
    pub storage_offset: u64,
    /// Strides in elements.
    pub stride: Vec<usize>,
    /// Whether the view is row-major contiguous (then [`TensorInfo::data`] is exactly its bytes).
    pub contiguous: bool,
}

/// One tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    /// Key, exactly as in the file.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Where the tensor's bytes are in the file. For safetensors exactly its data; for a `.pth`
    /// tensor the span from its first to its last element inside the (uncompressed) storage entry,
    /// which is exactly its data when [`PthView::contiguous`] holds.
    pub data: ByteRange,
    /// `.pth` only: storage entry, offset and strides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pth: Option<PthView>,
}

impl TensorInfo {
    /// Number of elements (saturating at `u64::MAX`).
    pub fn numel(&self) -> u64 {
        safetensors_file::numel(&self.shape).unwrap_or(u64::MAX)
    }

    /// Bytes of the tensor's elements (`numel × dtype size`), saturating.
    pub fn nbytes(&self) -> u64 {
        self.dtype.bytes_for(self.numel()).unwrap_or(u64::MAX)
    }

    /// The view [`detect`] takes.
    pub fn meta(&self) -> TensorMeta<'_> {
        TensorMeta {
            name: &self.name,
            shape: &self.shape,
            dtype: self.dtype,
        }
    }
}

/// The container format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileFormat {
    /// safetensors.
    Safetensors {
        /// Bytes before the data section (8 + JSON header length).
        header_bytes: u64,
    },
    /// A `torch.save` zip archive.
    Pth {
        /// The pickle entry that was read (`archive/data.pkl`).
        pickle_entry: String,
    },
}

/// Totals for one dtype.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DTypeStats {
    /// The dtype.
    pub dtype: DType,
    /// Tensors of this dtype.
    pub tensors: u64,
    /// Their elements.
    pub parameters: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Everything [`inspect`] found out about a file.
///
/// `Display` gives a short summary (a few lines, no tensor list); `Serialize` gives all of it,
/// tensor list included (`vpipe inspect --json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inspection {
    /// The file, as given.
    #[serde(serialize_with = "serialize_path")]
    pub path: PathBuf,
    /// Container format.
    pub format: FileFormat,
    /// File size in bytes (from the file system).
    pub file_size: u64,
    /// safetensors `__metadata__`, when present.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Family, layout, prefix, configuration.
    pub detection: Detection,
    /// Per-dtype totals, by dtype.
    pub dtypes: Vec<DTypeStats>,
    /// Number of tensors.
    pub tensor_count: u64,
    /// Total elements over all tensors.
    pub parameters: u64,
    /// Total bytes over all tensors (`Σ numel × dtype size`; for `.pth` views that share a
    /// storage the shared bytes count once per view).
    pub tensor_bytes: u64,
    /// All tensors, in file order (safetensors header order; pickle order for `.pth`).
    pub tensors: Vec<TensorInfo>,
}

fn serialize_path<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

/// Which expert of a Wan 2.2 A14B pair a DiT is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertRole {
    /// Takes the steps above the boundary timestep.
    HighNoise,
    /// Takes the steps below it.
    LowNoise,
}

impl std::fmt::Display for ExpertRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExpertRole::HighNoise => "high-noise",
            ExpertRole::LowNoise => "low-noise",
        })
    }
}

/// The expert a DiT file is by its name, as Wan-AI and ComfyUI name them (`high_noise`,
/// `low_noise`, any case): the two experts have the same architecture as Wan 2.1's 14B, so
/// nothing in their tensors tells them apart.
pub fn expert_role(path: &Path) -> Option<ExpertRole> {
    let name = path.file_name()?.to_str()?.to_lowercase();
    match (name.contains("high_noise"), name.contains("low_noise")) {
        (true, false) => Some(ExpertRole::HighNoise),
        (false, true) => Some(ExpertRole::LowNoise),
        _ => None,
    }
}

impl Inspection {
    /// Builds the summary from a tensor list (detection, per-dtype and total counts).
    fn new(
        path: &Path,
        format: FileFormat,
        file_size: u64,
        metadata: Option<BTreeMap<String, String>>,
        tensors: Vec<TensorInfo>,
    ) -> Self {
        let mut detection = detect(tensors.iter().map(TensorInfo::meta));
        if let (Family::WanDitT2v | Family::WanDitI2v, Some(role)) =
            (detection.family, expert_role(path))
        {
            detection.notes.push(format!(
                "the file name says Wan 2.2 A14B {role} expert (the experts have the Wan 2.1 \
                 14B architecture, which the tensors show)"
            ));
        }
        let mut by: BTreeMap<DType, DTypeStats> = BTreeMap::new();
        for t in &tensors {
            let s = by.entry(t.dtype).or_insert(DTypeStats {
                dtype: t.dtype,
                tensors: 0,
                parameters: 0,
                bytes: 0,
            });
            s.tensors += 1;
            s.parameters = s.parameters.saturating_add(t.numel());
            s.bytes = s.bytes.saturating_add(t.nbytes());
        }
        let dtypes: Vec<DTypeStats> = by.into_values().collect();
        Self {
            path: path.to_owned(),
            format,
            file_size,
            metadata,
            detection,
            tensor_count: tensors.len() as u64,
            parameters: dtypes
                .iter()
                .fold(0u64, |a, s| a.saturating_add(s.parameters)),
            tensor_bytes: dtypes.iter().fold(0u64, |a, s| a.saturating_add(s.bytes)),
            dtypes,
            tensors,
        }
    }

    /// The tensor called `name`, if any.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Reads what `path` is. See the crate documentation.
///
/// The format is taken from the content: a zip archive is read as a PyTorch checkpoint, an 8-byte
/// length followed by `{` as safetensors. When the content is neither, the extension decides which
/// format's error to report (`.safetensors`; `.pth`/`.pt`/`.bin`/`.ckpt`), and any other file gives
/// [`InspectError::UnknownFormat`]. Only regular files are opened (see [`open_regular`]).
pub fn inspect(path: &Path) -> Result<Inspection, InspectError> {
    let (file, file_size) = open_regular_sized(path)?;
    inspect_reader(path, file, file_size)
}

/// [`open_regular`], and the file's size.
fn open_regular_sized(path: &Path) -> Result<(std::fs::File, u64), InspectError> {
    let file = open_regular(path)?;
    let size = file
        .metadata()
        .map_err(|error| InspectError::Io {
            path: path.to_owned(),
            error,
        })?
        .len();
    Ok((file, size))
}

/// [`inspect`] on any seekable reader of `file_size` bytes (a file already opened, bytes in
/// memory); `path` only names it in errors and, for content that matches no format, breaks the
/// tie by its extension.
pub fn inspect_reader<R: Read + Seek>(
    path: &Path,
    mut file: R,
    file_size: u64,
) -> Result<Inspection, InspectError> {
    let io = |error| InspectError::Io {
        path: path.to_owned(),
        error,
    };
    match sniff(path, &mut file, file_size)? {
        Container::Safetensors => {
            file.rewind().map_err(io)?;
            let header = safetensors_file::read_header(path, &mut file, file_size)?;
            Ok(Inspection::new(
                path,
                FileFormat::Safetensors {
                    header_bytes: header.data_start,
                },
                file_size,
                header.metadata,
                header.tensors,
            ))
        }
        Container::Pth => {
            file.rewind().map_err(io)?;
            let archive = pth_file::read_archive(path, file, file_size)?;
            Ok(Inspection::new(
                path,
                FileFormat::Pth {
                    pickle_entry: archive.pickle_entry,
                },
                file_size,
                None,
                archive.tensors,
            ))
        }
    }
}

/// A checkpoint container, as told apart by a file's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Container {
    /// safetensors: an 8-byte header length, then the JSON header.
    Safetensors,
    /// A `torch.save` zip archive (`.pth`, `.pt`, `.bin`, `.ckpt`).
    Pth,
}

/// Which container the regular file at `path` is, decided exactly as [`inspect`] decides it: by
/// content, the extension only choosing which error a file that matches neither format gets.
/// Reads at most 9 bytes.
///
/// Loaders use this instead of the extension, so a safetensors file named `.ckpt` or `.bin` is
/// read as safetensors. Errors: those of [`open_regular`], [`InspectError::Empty`],
/// [`InspectError::LegacyPth`] and [`InspectError::UnknownFormat`].
pub fn container_of(path: &Path) -> Result<Container, InspectError> {
    let (mut file, file_size) = open_regular_sized(path)?;
    sniff(path, &mut file, file_size)
}

/// Reads the first bytes of `file` (positioned at 0) and decides the container.
fn sniff(path: &Path, file: &mut impl Read, file_size: u64) -> Result<Container, InspectError> {
    if file_size == 0 {
        return Err(InspectError::Empty {
            path: path.to_owned(),
        });
    }
    // Nine bytes tell the formats apart (safetensors: 8-byte length, then `{`), and they are all
    // header bytes: the data section of a safetensors file starts after at least 10.
    let mut head = [0u8; 9];
    let n = read_up_to(file, &mut head).map_err(|error| InspectError::Io {
        path: path.to_owned(),
        error,
    })?;
    let head = &head[..n];
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();

    // The content decides; the extension only breaks ties for files that match nothing.
    // A safetensors header length can itself start with 0x80 0x02 (e.g. 640 = 0x280), so the
    // `{` at byte 8 is checked before the pickle signature.
    let looks_safetensors = head.len() >= 9 && head[8] == b'{';
    let is_zip = head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06");
    // Legacy torch.save: a bare pickle stream, which starts with PROTO (0x80) and a protocol.
    let is_pickle = head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]);
    let pth_ext = matches!(ext.as_str(), "pth" | "pt" | "bin" | "ckpt");
    let st_ext = matches!(ext.as_str(), "safetensors" | "sft");

    if looks_safetensors || (st_ext && !is_zip && !is_pickle) {
        return Ok(Container::Safetensors);
    }
    if is_pickle {
        return Err(InspectError::LegacyPth {
            path: path.to_owned(),
        });
    }
    if is_zip || pth_ext {
        return Ok(Container::Pth);
    }
    Err(InspectError::UnknownFormat {
        path: path.to_owned(),
        start: head
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
    })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `1234567` → `"1,234,567"`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Decimal size: `2.84 GB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Decimal count: `1.42 B`.
fn human_count(n: u64) -> String {
    match n {
        0..1_000_000 => thousands(n),
        1_000_000..1_000_000_000 => format!("{:.2} M", n as f64 / 1e6),
        _ => format!("{:.2} B", n as f64 / 1e9),
    }
}

impl fmt::Display for DitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [pt, ph, pw] = self.patch_size;
        write!(
            f,
            "dim {}, ffn_dim {}, layers {}, heads {}, in_dim {}, out_dim {}, text_dim {}, freq_dim {}, patch {pt}x{ph}x{pw}",
            self.dim, self.ffn_dim, self.num_layers, self.num_heads, self.in_dim, self.out_dim, self.text_dim, self.freq_dim
        )
    }
}

impl fmt::Display for VaeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "base dim {}, z_dim {}", self.base_dim, self.z_dim)?;
        if let Some(m) = &self.dim_mult {
            write!(f, ", dim_mult {m:?}")?;
        }
        if let Some(n) = self.num_res_blocks {
            write!(f, ", res blocks {n}")?;
        }
        if let Some(t) = &self.temporal_downsample {
            write!(f, ", temporal downsample {t:?}")?;
        }
        if let Some(d) = self.decoder_base_dim {
            write!(f, ", decoder base dim {d}")?;
        }
        if let Some(p) = self.patch_size {
            write!(f, ", patch {p}x{p}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Umt5Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "d_model {}, d_ff {}, layers {}, heads {}, d_kv {}, vocab {}, buckets {}",
            self.d_model,
            self.d_ff,
            self.num_layers,
            self.num_heads,
            self.d_kv,
            self.vocab_size,
            self.num_buckets
        )?;
        if self.has_tokenizer {
            f.write_str(", tokenizer included")?;
        }
        Ok(())
    }
}

impl fmt::Display for ClipConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "width {}, layers {}, patch {}",
            self.width, self.num_layers, self.patch_size
        )?;
        if let Some(m) = self.mlp_dim {
            write!(f, ", mlp {m}")?;
        }
        if let Some(s) = self.image_size {
            write!(f, ", image {s}px")?;
        }
        if let Some(p) = self.projection_dim {
            write!(f, ", projection {p}")?;
        }
        if self.has_text_tower {
            f.write_str(", with text tower")?;
        }
        Ok(())
    }
}

impl fmt::Display for LoraConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let format = match self.format {
            LoraFormat::PeftAB => "lora_A/lora_B",
            LoraFormat::DownUp => "lora_down/lora_up",
            LoraFormat::KohyaFlat => "kohya flat (lora_unet_…)",
            LoraFormat::WanFunFlat => "Wan-Fun flat (lora_unet__…)",
            LoraFormat::DiffOnly => "diff patches only",
        };
        write!(
            f,
            "{format}, rank {:?}, {} targets in {} blocks",
            self.ranks, self.targets, self.blocks
        )?;
        write!(
            f,
            ", {}",
            if self.alphas > 0 {
                format!("{} alphas", self.alphas)
            } else {
                "no alpha".into()
            }
        )?;
        if self.diffs + self.bias_diffs > 0 {
            write!(f, ", {} diff + {} diff_b", self.diffs, self.bias_diffs)?;
        }
        if let Some(d) = self.base_dim {
            write!(f, ", base dim {d}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dit(c) => c.fmt(f),
            Self::Vae(c) => c.fmt(f),
            Self::Umt5(c) => c.fmt(f),
            Self::Clip(c) => c.fmt(f),
            Self::Lora(c) => c.fmt(f),
        }
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.detection;
        writeln!(f, "{}", self.path.display())?;
        let format = match &self.format {
            FileFormat::Safetensors { header_bytes } => {
                format!("safetensors (header {} bytes)", thousands(*header_bytes))
            }
            FileFormat::Pth { pickle_entry } => format!("PyTorch zip archive ({pickle_entry})"),
        };
        writeln!(
            f,
            "  format:   {format}, {} bytes ({})",
            thousands(self.file_size),
            human_bytes(self.file_size)
        )?;
        let size = match &d.config {
            Some(ModelConfig::Dit(c)) => c.size_name,
            Some(ModelConfig::Clip(c)) => c.size_name,
            Some(ModelConfig::Lora(c)) => c.base_size,
            _ => None,
        };
        match size {
            Some(s) => writeln!(f, "  family:   {}, {s}", d.family)?,
            None => writeln!(f, "  family:   {}", d.family)?,
        }
        if d.family != Family::Unknown || d.layout != KeyLayout::Unknown {
            if d.prefix.is_empty() {
                writeln!(f, "  layout:   {}", d.layout_description())?;
            } else {
                writeln!(
                    f,
                    "  layout:   {}, prefix {:?}",
                    d.layout_description(),
                    d.prefix
                )?;
            }
        }
        if let Some(c) = &d.config {
            writeln!(f, "  config:   {c}")?;
        }
        let params = if self.parameters >= 1_000_000 {
            format!(
                "{} parameters ({})",
                thousands(self.parameters),
                human_count(self.parameters)
            )
        } else {
            format!("{} parameters", thousands(self.parameters))
        };
        let bytes = if self.tensor_bytes >= 1000 {
            format!(
                "{} bytes ({})",
                thousands(self.tensor_bytes),
                human_bytes(self.tensor_bytes)
            )
        } else {
            human_bytes(self.tensor_bytes)
        };
        writeln!(
            f,
            "  tensors:  {}, {params}, {bytes}",
            thousands(self.tensor_count)
        )?;
        // Largest share first.
        let mut by_bytes: Vec<&DTypeStats> = self.dtypes.iter().collect();
        by_bytes.sort_by_key(|s| std::cmp::Reverse(s.bytes));
        let dtypes: Vec<String> = by_bytes
            .iter()
            .map(|s| {
                let plural = if s.tensors == 1 { "" } else { "s" };
                format!(
                    "{} {} tensor{plural}, {} params, {}",
                    s.dtype,
                    s.tensors,
                    human_count(s.parameters),
                    human_bytes(s.bytes)
                )
            })
            .collect();
        if !dtypes.is_empty() {
            writeln!(f, "  dtypes:   {}", dtypes.join("; "))?;
        }
        if let Some(m) = &self.metadata {
            const SHOWN: usize = 6;
            let mut keys: Vec<String> = m
                .iter()
                .take(SHOWN)
                .map(|(k, v)| {
                    let v: String = v
                        .chars()
                        .take(40)
                        .collect::<String>()
                        .replace(['\n', '\r'], " ");
                    let cut = if v.chars().count() < m[k].chars().count() {
                        "…"
                    } else {
                        ""
                    };
                    format!("{k}={v}{cut}")
                })
                .collect();
            if m.len() > SHOWN {
                keys.push(format!("and {} more", m.len() - SHOWN));
            }
            writeln!(f, "  metadata: {}", keys.join(", "))?;
        }
        for note in &d.notes {
            writeln!(f, "  note:     {note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::io::{Cursor, SeekFrom};
    use std::rc::Rc;

    /// A reader that records the byte ranges it hands out.
    struct Recording {
        inner: Cursor<Vec<u8>>,
        reads: Rc<RefCell<Vec<(u64, u64)>>>,
    }

    impl Read for Recording {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let at = self.inner.position();
            let n = self.inner.read(buf)?;
            if n > 0 {
                self.reads.borrow_mut().push((at, at + n as u64));
            }
            Ok(n)
        }
    }

    impl Seek for Recording {
        fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(to)
        }
    }

    /// Inspects `bytes` and returns the inspection and every byte range that was read.
    fn recorded(name: &str, bytes: Vec<u8>) -> (Inspection, Vec<(u64, u64)>) {
        let reads = Rc::new(RefCell::new(Vec::new()));
        let len = bytes.len() as u64;
        let r = Recording {
            inner: Cursor::new(bytes),
            reads: Rc::clone(&reads),
        };
        let info = inspect_reader(Path::new(name), r, len).unwrap();
        let reads = reads.borrow().clone();
        (info, reads)
    }

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.1 && b.0 < a.1
    }

    #[test]
    fn safetensors_data_is_never_read() {
        // Header `{"a": F32 [4]}` padded to 8 bytes, then 16 data bytes.
        let header = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        b.extend_from_slice(&[0xAB; 16]);
        let data = ((8 + header.len()) as u64, b.len() as u64);
        let (info, reads) = recorded("a.safetensors", b);
        assert_eq!(info.tensors[0].data.start, data.0);
        assert!(!reads.is_empty());
        for r in reads {
            assert!(
                !overlaps(r, data),
                "read {r:?} touches tensor data {data:?}"
            );
        }
    }

    #[test]
    fn pth_storage_bytes_are_never_read() {
        // The torch-written fixture: 42 storages. Reads may touch the zip directory, data.pkl,
        // byteorder and local headers, never a storage entry's data.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny_wan_dit_t2v.pth"
        );
        let (info, reads) = recorded("t.pth", std::fs::read(path).unwrap());
        assert_eq!(info.tensors.len(), 42);
        for t in &info.tensors {
            let data = (t.data.start, t.data.end);
            for &r in &reads {
                assert!(
                    !overlaps(r, data),
                    "read {r:?} touches {} at {data:?}",
                    t.name
                );
            }
        }
    }

    #[test]
    fn number_formatting() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_418_996_800), "1,418,996,800");
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(2_837_993_600), "2.84 GB");
        assert_eq!(human_count(126_900_000), "126.90 M");
        assert_eq!(human_count(14_289_000_000), "14.29 B");
    }
}
