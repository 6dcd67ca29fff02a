//! umT5-XXL encoder benchmark at full size: random bf16 weights, 512 tokens, batch 1 and 2;
//! time and measured device memory (the CUDA pool's high-water mark above the weights).
//!
//! ```text
//! cargo build --release --features cuda -p vpipe --example umt5_bench
//! umt5_bench --reps 5 > umt5.jsonl
//! ```

use std::time::Instant;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde_json::json;
use vpipe_text::umt5::{Config, Umt5Encoder};

mod common;
use common::{device_and_meters, measure, Measured, RandomWeights, GIB};

fn main() -> Result<()> {
    let mut reps = 5;
    let mut cpu = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--reps" => reps = value.parse().expect("--reps N"),
            "--device" => cpu = value == "cpu",
            other => panic!("unknown flag {other}"),
        }
    }
    let (device, meters) = device_and_meters(cpu)?;
    let mut cfg = Config::umt5_xxl();
    if device.is_cpu() {
        // A script check only: two layers.
        cfg.num_layers = 2;
    }
    let start = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::BF16, device.clone());
    let model = Umt5Encoder::new(&cfg, vb).map_err(candle_core::Error::wrap)?;
    device.synchronize()?;
    println!(
        "{}",
        json!({"what": "umt5 build", "weights_gib": meters.read().expect("meter").compute_used() as f64 / GIB,
            "build_s": start.elapsed().as_secs_f64(), "layers": cfg.num_layers})
    );
    for batch in [1usize, 2] {
        let ids: Vec<u32> = (0..batch * 512)
            .map(|i| (i as u32 * 7919) % cfg.vocab_size as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (batch, 512), &device)?;
        let mask = Tensor::ones((batch, 512), DType::U32, &device)?;
        let Measured {
            median_s: t,
            peak_gib: peak,
            ..
        } = measure(&device, &meters, reps, || {
            model
                .forward(&ids, &mask)
                .map(drop)
                .map_err(candle_core::Error::wrap)
        })?;
        println!(
            "{}",
            json!({"what": "umt5 encode", "batch": batch, "tokens": 512, "encode_s": t, "peak_above_weights_gib": peak})
        );
    }
    Ok(())
}
