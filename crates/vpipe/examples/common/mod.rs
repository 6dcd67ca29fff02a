//! Shared by the GPU benchmark examples: random full-size weights and a timed measurement.
#![allow(dead_code)] // each example uses part of it

use std::time::Instant;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use vpipe_mem::Meters;

pub const GIB: f64 = (1u64 << 30) as f64;

/// Hands out random normal tensors of whatever shape the model asks for (full-size weights
/// without a 28 GB file; speed and memory do not depend on the values).
pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let fan_in = s.dims().get(1).copied().unwrap_or(1).max(1) as f64;
        let (mean, std) = if name.ends_with("weight") && s.rank() == 1 {
            (1.0, 0.05) // norm gains
        } else if name.ends_with("bias") {
            (0.0, 0.02)
        } else {
            (0.0, 1.0 / fan_in.sqrt())
        };
        Tensor::randn(mean as f32, std as f32, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights have no stored shape for {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // Plain bf16 weights: no fp8 scales.
        !name.ends_with("scale_weight") && !name.ends_with("weight_scale")
    }
}

/// The device an example runs on (`cpu`: the host, for a quick check of the script) and its
/// meters.
pub fn device_and_meters(cpu: bool) -> Result<(Device, Meters)> {
    let device = if cpu {
        Device::Cpu
    } else {
        Device::new_cuda(0)?
    };
    let meters = Meters::for_device(&device).expect("meters");
    Ok((device, meters))
}

/// One synchronized run's time measured apart (`cold`: first uses of kernels and cuDNN
/// shapes), the median of `reps` more, and the pool's high-water mark above the memory in
/// use before the first run, in GiB.
pub struct Measured {
    pub cold_s: f64,
    pub median_s: f64,
    pub peak_gib: f64,
}

/// Runs `f` once untimed-for-the-median, then `reps` more times, each followed by a device
/// synchronisation (see [`Measured`]).
pub fn measure(
    device: &Device,
    meters: &Meters,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Measured> {
    let before = meters.read().expect("meter").compute_used();
    meters.reset_peaks().expect("meter");
    let mut times = Vec::new();
    for _ in 0..=reps {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let peak = meters.read().expect("meter").compute_peak();
    let cold_s = times.remove(0);
    times.sort_by(f64::total_cmp);
    Ok(Measured {
        cold_s,
        median_s: times.get(times.len() / 2).copied().unwrap_or(cold_s),
        peak_gib: peak.saturating_sub(before) as f64 / GIB,
    })
}
