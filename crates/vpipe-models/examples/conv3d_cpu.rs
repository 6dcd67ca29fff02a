//! Times the CPU causal conv3d on a VAE-like shape (96 → 96 channels, 3×3×3 kernel, 4 frames
//! plus the 2-frame cache, 64×64 px), f32 and bf16: `cargo run --release -p vpipe-models
//! --example conv3d_cpu`. Prints the median of 5 runs after one warm-up.

use candle_core::{DType, Device, Tensor};
use vpipe_models::ops::{CausalConv3d, Conv3dConfig};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let weight = Tensor::randn(0f32, 0.05, (96, 96, 3, 3, 3), &dev)?.to_dtype(dtype)?;
        let bias = Tensor::randn(0f32, 0.05, 96, &dev)?.to_dtype(dtype)?;
        let conv = CausalConv3d::new(weight, Some(bias), Conv3dConfig::padded(1))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let x = Tensor::randn(0f32, 1.0, (1, 96, 4, 64, 64), &dev)?.to_dtype(dtype)?;
        let cache = Tensor::randn(0f32, 1.0, (1, 96, 2, 64, 64), &dev)?.to_dtype(dtype)?;
        let mut times = Vec::new();
        for _ in 0..6 {
            let start = std::time::Instant::now();
            let y = conv
                .forward(&x, Some(&cache))
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            y.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.remove(0);
        times.sort_by(f64::total_cmp);
        println!("{dtype:?}: {:.1} ms (median of 5)", times[2]);
    }
    Ok(())
}
