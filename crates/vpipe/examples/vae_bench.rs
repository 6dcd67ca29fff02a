//! VAE benchmark: tiled encode and decode of a clip in one process, for several tile sizes and
//! tile layouts.
//! The first pass of each is timed apart ("cold": it includes the first use of every
//! convolution shape in cuDNN and of every kernel), then the median of `--reps` more ("warm"),
//! which is how `bench/vae_gpu.py warm` measures diffusers.
//!
//! ```text
//! cargo build --release --features cuda -p vpipe --example vae_bench
//! vae_bench --vae vae.safetensors --clip clip.safetensors --latents enc.safetensors \
//!     --tiles 256,320,384 --layouts balanced,diffusers --reps 2 > vae.jsonl
//! vae_bench ... --device cpu --tiles 64          # script check on a small clip
//! ```
//!
//! `--clip` holds `video_in` [1, 3, T, H, W] in [-1, 1], `--latents` holds `enc_mean`
//! [1, 16, T', H/8, W/8]; both stay on the host, as in `vpipe run`. Prints one JSON object per
//! (operation, tile, layout): seconds, and the pool's high-water mark above the memory in use
//! before the first pass (the weights, which are reported apart) through vpipe-mem's meters.
//! Then, for each distinct tile shape of the first tile size's layouts, one tile's device time
//! and its time per megapixel.

use candle_core::{DType, Device, Result, Tensor};
use serde_json::json;
use vpipe_models::tiling::{default_stride, TileLayout, TileSpec};
use vpipe_models::wan::WanVae;

mod common;
use common::{device_and_meters, measure, GIB};

struct Args {
    vae: String,
    clip: String,
    latents: String,
    tiles: Vec<usize>,
    layouts: Vec<TileLayout>,
    reps: usize,
    cpu: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        vae: String::new(),
        clip: String::new(),
        latents: String::new(),
        tiles: vec![256],
        layouts: vec![TileLayout::Balanced],
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
            "--layouts" => {
                args.layouts = value
                    .split(',')
                    .map(|t| t.parse().expect("--layouts balanced,diffusers"))
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

fn main() -> Result<()> {
    let args = parse_args();
    let (device, meters) = device_and_meters(args.cpu)?;
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
        for &layout in &args.layouts {
            let spec = TileSpec {
                tile,
                stride: default_stride(tile),
                layout,
            };
            let encode = measure(&device, &meters, args.reps, || {
                vae.encode_posterior_tiled(&clip, spec)
                    .map(drop)
                    .map_err(candle_core::Error::wrap)
            })?;
            let decode = measure(&device, &meters, args.reps, || {
                vae.decode_tiled(&latents, spec)
                    .map(drop)
                    .map_err(candle_core::Error::wrap)
            })?;
            for (what, m) in [("encode", encode), ("decode", decode)] {
                println!(
                    "{}",
                    json!({"what": what, "tile": tile, "stride": spec.stride, "layout": layout,
                    "tiles": spec.count(h, w), "tile_shapes": spec.tile_shapes(h, w),
                    "cold_s": m.cold_s, "warm_s": m.median_s, "peak_above_weights_gib": m.peak_gib,
                    "peak_with_weights_gib": m.peak_gib + weights})
                );
            }
        }
    }
    // Each distinct tile shape of the first tile size's layouts, alone: the time until the call
    // returns (everything enqueued; the launch queue lets the host run only about a thousand
    // launches ahead) and until the device is done, which is the tile's device time; per
    // pixel, it shows how well small tiles use the GPU.
    let side = args.tiles[0];
    let mut shapes: Vec<(usize, usize)> = args
        .layouts
        .iter()
        .flat_map(|&layout| {
            TileSpec {
                tile: side,
                stride: default_stride(side),
                layout,
            }
            .tile_shapes(h, w)
        })
        .collect();
    shapes.sort_unstable();
    shapes.dedup();
    for (tile_h, tile_w) in shapes {
        let video_tile = clip
            .narrow(3, 0, tile_h)?
            .narrow(4, 0, tile_w)?
            .contiguous()?
            .to_device(&device)?
            .to_dtype(dtype)?;
        let latent_tile = latents
            .narrow(3, 0, tile_h / 8)?
            .narrow(4, 0, tile_w / 8)?
            .contiguous()?
            .to_device(&device)?
            .to_dtype(dtype)?;
        for what in ["encode", "decode"] {
            let pass = || -> Result<Tensor> {
                match what {
                    "encode" => vae.encode_moments(&video_tile),
                    _ => vae.decode_unclamped(&latent_tile),
                }
                .map_err(candle_core::Error::wrap)
            };
            drop(pass()?);
            device.synchronize()?;
            let start = std::time::Instant::now();
            let out = pass()?;
            let returned = start.elapsed().as_secs_f64();
            device.synchronize()?;
            let done = start.elapsed().as_secs_f64();
            drop(out);
            let megapixels = (tile_h * tile_w) as f64 / 1e6;
            println!(
                "{}",
                json!({"what": format!("one {tile_h}x{tile_w}-px tile, {what}"),
                "returned_s": returned, "device_done_s": done,
                "s_per_megapixel": done / megapixels})
            );
        }
    }
    Ok(())
}
