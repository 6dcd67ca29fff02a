//! `vpipe demo`: the pipeline's phases on a small built-in model, with every memory figure
//! measured and every move of weights verified.
//!
//! The built-in model stands in for the Wan components until they are built: three checkpoints
//! (a text encoder, a VAE, a denoiser) of seeded random weights, each a stack of linear layers
//! with real matrix work in every phase. What the demo shows is the memory discipline: each
//! phase makes one model resident, leases it, computes, and gives it back, and the report
//! proves it with meter readings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use vpipe_mem::{fmt_bytes, Lease, MemorySession, ModelId, Report, Tier};

use crate::flags::Demo;

/// Width of every layer of the built-in model.
const WIDTH: usize = 1024;
/// Tokens the denoiser works on (a stand-in for the latent sequence).
const TOKENS: usize = 512;
/// Prompt tokens.
const TEXT_TOKENS: usize = 64;
const VOCAB: usize = 1024;

/// The built-in model's parts: checkpoint name and number of layers.
const PARTS: [(&str, usize); 3] = [("text-encoder", 4), ("vae", 8), ("denoiser", 16)];

/// A small deterministic generator (xorshift64*), so the built-in weights are the same on
/// every machine without a dependency.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        bits as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    fn tensor(&mut self, shape: (usize, usize), scale: f32) -> candle_core::Result<Tensor> {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| self.next_f32() * scale)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }
}

/// Writes the built-in checkpoints (unless present) and returns their paths.
fn write_builtin_model(dir: &Path, seed: u64) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let scale = (1.0 / WIDTH as f32).sqrt();
    let mut paths = Vec::new();
    for (name, layers) in PARTS {
        let path = dir.join(format!("{name}-seed{seed}.safetensors"));
        if !path.exists() {
            let mut tensors = HashMap::new();
            if name == "text-encoder" {
                tensors.insert("embed.weight".to_owned(), rng.tensor((VOCAB, WIDTH), 1.0)?);
            }
            for layer in 0..layers {
                tensors.insert(
                    format!("layers.{layer}.weight"),
                    rng.tensor((WIDTH, WIDTH), scale)?,
                );
            }
            let partial = dir.join(format!(".{name}-seed{seed}.safetensors.partial"));
            candle_core::safetensors::save(&tensors, &partial)
                .with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, &path)
                .with_context(|| format!("renaming into {}", path.display()))?;
        }
        paths.push((name, path));
    }
    Ok(paths)
}

/// `x ↦ gelu(x · Wᵢ)` through every layer of a leased model.
fn forward(lease: &Lease<'_>, mut x: Tensor) -> anyhow::Result<Tensor> {
    let mut layer = 0;
    while let Ok(weight) = lease.get(&format!("layers.{layer}.weight")) {
        x = x.matmul(weight)?.gelu()?;
        layer += 1;
    }
    Ok(x)
}

/// Leases `model`, runs `work` on it, gives the model back to the disk tier, and declares
/// the work's output (kept for later phases) as `output`.
fn with_model(
    session: &mut MemorySession,
    phase: &str,
    model: ModelId,
    output: &str,
    work: impl FnOnce(&Lease<'_>) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Tensor> {
    session.phase(phase, |p| -> anyhow::Result<Tensor> {
        p.make_resident(model)?;
        let result = work(&p.lease(model)?)?;
        p.offload(model, Tier::Disk)?;
        p.declare_output(
            output,
            (result.elem_count() * result.dtype().size_in_bytes()) as u64,
        );
        Ok(result)
    })
}

pub(crate) fn run(demo: Demo) -> anyhow::Result<ExitCode> {
    let device = crate::device::open(&demo.device)?;
    let weights = write_builtin_model(&demo.out.join("weights"), demo.seed)?;
    let mut session = MemorySession::new(device.clone(), demo.budget)?;
    println!(
        "vpipe demo: built-in model ({} checkpoints, seeded random weights) on {}",
        weights.len(),
        demo.device
    );

    // Phase 1 reads the checkpoints' headers only: nothing is resident yet.
    let models = session.phase("load", |p| -> anyhow::Result<Vec<ModelId>> {
        weights
            .iter()
            .map(|(name, path)| Ok(p.register(name, path, Some(DType::F32))?))
            .collect()
    })?;
    let [text, vae, denoiser] = models[..] else {
        unreachable!("three built-in parts")
    };

    let prompt_ids: Vec<u32> = (0..TEXT_TOKENS as u32)
        .map(|i| (i * 37 + 11) % VOCAB as u32)
        .collect();
    let embeddings = with_model(&mut session, "text", text, "prompt embedding", |lease| {
        let ids = Tensor::new(prompt_ids.as_slice(), &device)?;
        let tokens = lease.get("embed.weight")?.index_select(&ids, 0)?;
        // Host copy: only the small embeddings outlive the phase.
        Ok(forward(lease, tokens)?
            .mean_keepdim(0)?
            .to_device(&Device::Cpu)?)
    })?;

    let mut rng = Rng(demo.seed ^ 0xA5A5_A5A5);
    let frames = rng.tensor((TOKENS, WIDTH), 1.0)?;
    let latents = with_model(&mut session, "vae encode", vae, "latents", |lease| {
        Ok(forward(lease, frames.to_device(&device)?)?.to_device(&Device::Cpu)?)
    })?;

    let steps = demo.steps;
    let sampled = with_model(
        &mut session,
        "sample",
        denoiser,
        "denoised latents",
        |lease| {
            let condition = embeddings.to_device(&device)?;
            let mut x = latents.to_device(&device)?;
            for step in 0..steps {
                let dt = 1.0 / steps as f64;
                let velocity = forward(lease, x.broadcast_add(&condition)?)?;
                x = (x - (velocity * dt)?)?;
                tracing::debug!(step, "denoising step done");
            }
            Ok(x.to_device(&Device::Cpu)?)
        },
    )?;

    let decoded = with_model(&mut session, "vae decode", vae, "decoded frames", |lease| {
        Ok(forward(lease, sampled.to_device(&device)?)?.to_device(&Device::Cpu)?)
    })?;

    let out = &demo.out;
    session.phase("write", |_| -> anyhow::Result<()> {
        let map = HashMap::from([("decoded".to_owned(), decoded)]);
        let partial = out.join(".output.safetensors.partial");
        candle_core::safetensors::save(&map, &partial)
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, out.join("output.safetensors"))
            .with_context(|| format!("renaming into {}", out.display()))?;
        Ok(())
    })?;

    let report = session.report()?;
    report.write_json(&out.join("report.json"))?;
    vpipe_mem::write_svg(&report, &out.join("memory.svg"))?;
    print_summary(&report);
    println!(
        "wrote {}, {} and {}",
        out.join("report.json").display(),
        out.join("memory.svg").display(),
        out.join("output.safetensors").display()
    );
    Ok(ExitCode::SUCCESS)
}

fn print_summary(report: &Report) {
    let base = report.baseline.compute_used();
    println!(
        "baseline ({} meter): {}    all figures below are measured, relative to it",
        report.compute_meter,
        fmt_bytes(base)
    );
    println!(
        "{:<12} {:>12} {:>12} {:>12} {:>10}",
        "phase", "peak", "at exit", "resident", "moves ok"
    );
    for phase in &report.phases {
        let moves: Vec<_> = report
            .transitions
            .iter()
            .filter(|t| t.phase.as_deref() == Some(phase.name.as_str()))
            .collect();
        println!(
            "{:<12} {:>12} {:>12} {:>12} {:>10}",
            phase.name,
            fmt_bytes(phase.peak_above_baseline),
            fmt_bytes(phase.exit_above_baseline),
            fmt_bytes(phase.resident_compute_bytes),
            format!(
                "{}/{}",
                moves.iter().filter(|t| t.verified).count(),
                moves.len()
            )
        );
    }
    for violation in &report.violations {
        println!(
            "VIOLATION: phase '{}' peaked at {} above baseline, budget {}",
            violation.phase,
            fmt_bytes(violation.peak_above_baseline),
            fmt_bytes(violation.budget)
        );
    }
}
