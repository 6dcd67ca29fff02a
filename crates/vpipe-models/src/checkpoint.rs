//! Opening a checkpoint file as a `VarBuilder`: the one place that knows the file formats.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// A `VarBuilder` over a checkpoint file: `.safetensors` (memory-mapped) or `.pth` / `.pt` /
/// `.ckpt` (a `torch.save` state dict, read without executing pickle code). Tensors are handed
/// out converted to `dtype` on `device` unless a layer asks for another dtype.
pub fn var_builder_from_file(
    path: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let path = path.as_ref();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("safetensors") => {
            // SAFETY: the file is mapped read-only; as with every mmap, it must not be
            // modified while the VarBuilder lives (tensors are copied out when built).
            #[allow(unsafe_code)]
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device)? };
            Ok(vb)
        }
        Some("pth" | "pt" | "ckpt") => Ok(VarBuilder::from_pth(path, dtype, device)?),
        _ => Err(Error::UnsupportedFile {
            path: path.to_path_buf(),
        }),
    }
}
