//! How fast a rank-32 LoRA merges into the rows of one 14B FFN weight (13 824 × 5 120, bf16)
//! on this machine's cores: [`MergePlan::apply_in_place`], as the store merges a LoRA into
//! the weights it has read; then the same weight as ComfyUI's scaled fp8, merged in place
//! ([`MergePlan::apply_in_place_scaled_fp8`]) and through tensors
//! ([`MergePlan::apply_scaled_fp8`]). A benchmark, not a test:
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
    // The weight in scaled fp8: float8 e4m3 with one scale (its largest |value| over 448).
    let scale = weight
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .affine(1.0 / 448.0, 0.0)?;
    let weight8 = weight
        .to_dtype(DType::F32)?
        .broadcast_div(&scale)?
        .to_dtype(DType::F8E4M3)?;
    let mut bytes8 = safetensors::View::data(&weight8).into_owned();
    let scale_value = scale.to_scalar::<f32>()?;
    let timed = |what: &str, merge: &mut dyn FnMut() -> Result<(), Box<dyn std::error::Error>>| {
        let started = std::time::Instant::now();
        for _ in 0..layers {
            merge()?;
        }
        let seconds = started.elapsed().as_secs_f64() / layers as f64;
        println!("{rows}x{columns} scaled fp8, rank {rank}, {what}: {seconds:.3} s per weight");
        Ok::<(), Box<dyn std::error::Error>>(())
    };
    timed("in place", &mut || {
        plan.apply_in_place_scaled_fp8("blocks.0.ffn.0.weight", scale_value, &mut bytes8)?;
        Ok(())
    })?;
    timed("through tensors", &mut || {
        plan.apply_scaled_fp8("blocks.0.ffn.0.weight", &weight8, &scale)?;
        Ok(())
    })?;
    Ok(())
}
