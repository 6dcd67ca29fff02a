//! How fast a rank-32 LoRA merges into the rows of one 14B FFN weight (13 824 × 5 120, bf16)
//! on this machine's cores: [`MergePlan::apply_in_place`], as the store merges a LoRA into
//! the weights it has read. A benchmark, not a test:
//!
//!     cargo run --release -p vpipe-lora --example merge_speed [LAYERS]
//!
//! Prints the seconds per weight and the rate in multiply-adds per second; `LAYERS` weights
//! (default 4) are merged after one warm-up.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Shape, Tensor};
use vpipe_lora::{LoraFile, MergePlan};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layers: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(4);
    let (rows, columns, rank) = (13_824, 5_120, 32);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("lora.safetensors");
    let key = "diffusion_model.blocks.0.ffn.0";
    let tensors = [
        (
            format!("{key}.lora_A.weight"),
            Tensor::randn(0f32, 0.02, (rank, columns), &Device::Cpu)?.to_dtype(DType::BF16)?,
        ),
        (
            format!("{key}.lora_B.weight"),
            Tensor::randn(0f32, 0.02, (rows, rank), &Device::Cpu)?.to_dtype(DType::BF16)?,
        ),
        (
            format!("{key}.alpha"),
            Tensor::new(rank as f32, &Device::Cpu)?,
        ),
    ];
    candle_core::safetensors::save(&tensors.into_iter().collect(), &path)?;
    let lora = LoraFile::read(&path)?;
    let shapes: BTreeMap<String, Shape> = [(
        "blocks.0.ffn.0.weight".to_owned(),
        Shape::from((rows, columns)),
    )]
    .into();
    let plan = MergePlan::new(&[(&lora, 0.8)], &shapes, &|_| None)?;
    let weight = Tensor::randn(0f32, 0.02, (rows, columns), &Device::Cpu)?.to_dtype(DType::BF16)?;
    let mut bytes = safetensors::View::data(&weight).into_owned();
    plan.apply_in_place("blocks.0.ffn.0.weight", DType::BF16, &mut bytes)?;
    let started = std::time::Instant::now();
    for _ in 0..layers {
        plan.apply_in_place("blocks.0.ffn.0.weight", DType::BF16, &mut bytes)?;
    }
    let seconds = started.elapsed().as_secs_f64() / layers as f64;
    println!(
        "{rows}x{columns} bf16, rank {rank}, {} threads: {seconds:.3} s per weight, {:.1} G multiply-adds/s",
        rayon::current_num_threads(),
        (rows * columns * rank) as f64 / seconds / 1e9
    );
    Ok(())
}
