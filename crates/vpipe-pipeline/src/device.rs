//! `--device cpu|cuda|cuda:N`.

use crate::error::{Error, Result};

/// Opens the device named by a `--device` value.
pub fn open_device(spec: &str) -> Result<candle_core::Device> {
    let ordinal = match spec {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "cuda" => 0,
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(Error::BadInput(format!(
                    "--device {spec}: expected cpu, cuda or cuda:N (N a GPU index)"
                )))
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::BadInput(format!(
            "--device {spec}: this vpipe was built without CUDA; rebuild with `cargo build --release --features cuda`"
        )));
    }
    candle_core::Device::new_cuda(ordinal).map_err(|error| Error::Device {
        spec: spec.to_owned(),
        error: Box::new(error),
    })
}

/// The bytes the driver reports free on a CUDA device (all processes counted), `None` on
/// the CPU or when the driver does not answer.
pub(crate) fn free_bytes(device: &candle_core::Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64),
        _ => None,
    }
}
