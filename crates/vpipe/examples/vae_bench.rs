//! VAE benchmark: tiled encode and decode of a clip in one process, for several tile sizes.
//! The first pass of each is timed apart ("cold": it includes the first use of every
//! convolution shape in cuDNN and of every kernel), then the median of `--reps` more ("warm"),
//! which is how `bench/vae_gpu.py warm` measures diffusers.
//!
//! ```text
//! cargo build --release --features cuda -p vpipe --example vae_bench
//! vae_bench --vae vae.safetensors --clip clip.safetensors --latents enc.safetensors \
//!     --tiles 256,320,384 --reps 2 > vae.jsonl
//! vae_bench ... --device cpu --tiles 64          # script check on a small clip
//! ```
//!
//! `--clip` holds `video_in` [1, 3, T, H, W] in [-1, 1], `--latents` holds `enc_mean`
//! [1, 16, T', H/8, W/8]; both stay on the host, as in `vpipe run`. Prints one JSON object per
//! (operation, tile): seconds, and the pool's high-water mark above the memory in use before the
//! first pass (the weights, which are reported apart) through vpipe-mem's meters.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use serde_json::json;
use vpipe_mem::Meters;
use vpipe_models::tiling::{default_stride, TileSpec};
use vpipe_models::wan::WanVae;

mod common;
use common::GIB;

struct Args {
    vae: String,
    clip: String,
    latents: String,
    tiles: Vec<usize>,
    reps: usize,
    cpu: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        vae: String::new(),
        clip: String::new(),
        latents: String::new(),
        tiles: vec![256],
        reps: 2,
        cpu: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--vae" => args.vae = value,
            "--clip" => args.clip = value,
            "--latents" => args.latents = value,
            "--tiles" => {
                args.tiles = value
                    .split(',')
                    .map(|t| t.parse().expect("--tiles 256,320"))
                    .collect()
            }
            "--reps" => args.reps = value.parse().expect("--reps N"),
            "--device" => args.cpu = value == "cpu",
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(
        !args.vae.is_empty() && !args.clip.is_empty() && !args.latents.is_empty(),
        "--vae, --clip and --latents are required"
    );
    args
}

fn read(path: &str, key: &str) -> Result<Tensor> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    tensors
        .remove(key)
        .ok_or_else(|| candle_core::Error::Msg(format!("{path}: no tensor '{key}'")))
}

/// Seconds of the first pass, the median of `reps` more, and the high-water mark above the
/// memory in use before the first, in GiB.
fn passes(
    device: &Device,
    meters: &Meters,
    reps: usize,
    mut pass: impl FnMut() -> Result<()>,
) -> Result<(f64, f64, f64)> {
    let before = meters.read().expect("meter").compute_used();
    meters.reset_peaks().expect("meter");
    let mut times = Vec::new();
    for _ in 0..=reps {
        let start = Instant::now();
        pass()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let peak = meters.read().expect("meter").compute_peak();
    let cold = times.remove(0);
    times.sort_by(f64::total_cmp);
    let warm = times.get(times.len() / 2).copied().unwrap_or(cold);
    Ok((cold, warm, peak.saturating_sub(before) as f64 / GIB))
}

fn main() -> Result<()> {
    let args = parse_args();
    let device = if args.cpu {
        Device::Cpu
    } else {
        Device::new_cuda(0)?
    };
    let meters = Meters::for_device(&device).expect("meters");
    let dtype = DType::BF16;
    let vae = WanVae::from_file(&args.vae, dtype, &device).map_err(candle_core::Error::wrap)?;
    device.synchronize()?;
    let weights = meters.read().expect("meter").compute_used() as f64 / GIB;
    let clip = read(&args.clip, "video_in")?;
    let latents = read(&args.latents, "enc_mean")?;
    println!(
        "{}",
        json!({"what": "build", "weights_gib": weights, "clip": clip.dims(), "latents": latents.dims()})
    );
    let (_, _, _, h, w) = clip.dims5()?;
    for &tile in &args.tiles {
        let spec = TileSpec {
            tile,
            stride: default_stride(tile),
        };
        let (cold, warm, peak) = passes(&device, &meters, args.reps, || {
            vae.encode_posterior_tiled(&clip, spec)
                .map(drop)
                .map_err(candle_core::Error::wrap)
        })?;
        println!(
            "{}",
            json!({"what": "encode", "tile": tile, "stride": spec.stride, "tiles": spec.count(h, w),
            "cold_s": cold, "warm_s": warm, "peak_above_weights_gib": peak,
            "peak_with_weights_gib": peak + weights})
        );
        let (cold, warm, peak) = passes(&device, &meters, args.reps, || {
            vae.decode_tiled(&latents, spec)
                .map(drop)
                .map_err(candle_core::Error::wrap)
        })?;
        println!(
            "{}",
            json!({"what": "decode", "tile": tile, "stride": spec.stride, "tiles": spec.count(h, w),
            "cold_s": cold, "warm_s": warm, "peak_above_weights_gib": peak,
            "peak_with_weights_gib": peak + weights})
        );
    }
    Ok(())
}
