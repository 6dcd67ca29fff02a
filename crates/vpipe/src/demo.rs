//! `vpipe demo`: the pipeline's phases on a small built-in model, with every memory figure
//! measured and every move of weights verified.
//!
//! The VAE phases run the real Wan 2.1 VAE (narrower than the released one, base width 16
//! instead of 96, with seeded random weights) on a synthetic 9-frame clip, tiled. The text
//! encoder and the denoiser are stand-ins until those models are built: seeded random stacks of
//! linear layers with real matrix work. What the demo shows is the memory discipline: each
//! phase makes one model resident, leases it, computes, and gives it back, and the report
//! proves it with meter readings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use vpipe_mem::{fmt_bytes, Lease, MemorySession, ModelId, Report, Tier};

use crate::flags::Demo;

/// Width of every layer of the stand-in models.
const WIDTH: usize = 1024;
/// Prompt tokens.
const TEXT_TOKENS: usize = 64;
const VOCAB: usize = 1024;
/// The demo clip: frames (1 + 4k), height, width.
const CLIP: (usize, usize, usize) = (9, 64, 96);
/// Base width of the demo's Wan VAE (the released model has 96).
const VAE_BASE_DIM: usize = 16;

/// The stand-in parts: checkpoint name and number of hidden layers.
const STAND_INS: [(&str, usize); 2] = [("text-encoder", 4), ("denoiser", 16)];

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

/// Writes `tensors` as a safetensors file (to a temporary name, then renamed).
fn save_checkpoint(path: &Path, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    let partial = path.with_extension("safetensors.partial");
    candle_core::safetensors::save(tensors, &partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming into {}", path.display()))
}

/// A Wan 2.1 VAE checkpoint (original key names) of width `VAE_BASE_DIM` with seeded weights:
/// matrices and kernels scaled by 1/√fan-in, norm gains near 1, small biases.
fn vae_weights(rng: &mut Rng) -> anyhow::Result<HashMap<String, Tensor>> {
    let cfg = vpipe_models::wan::vae::Config {
        base_dim: VAE_BASE_DIM,
        ..vpipe_models::wan::vae::Config::wan21()
    };
    // Building the model over an empty VarMap lists every weight it needs, with its shape.
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    vpipe_models::wan::WanVae::new(&cfg, vb)?;
    let vars = varmap.data().lock().expect("the VarMap is not shared");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    for name in names {
        let shape = vars[name].shape().clone();
        let count = shape.elem_count();
        let fan_in = shape.dims().iter().skip(1).product::<usize>().max(1);
        let (offset, scale) = if name.ends_with("gamma") {
            (1.0, 0.1)
        } else if shape.rank() > 1 {
            (0.0, (3.0 / fan_in as f32).sqrt())
        } else {
            (0.0, 0.02)
        };
        let values: Vec<f32> = (0..count)
            .map(|_| offset + rng.next_f32() * scale)
            .collect();
        tensors.insert(name.clone(), Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(tensors)
}

/// Writes the built-in checkpoints (unless present) and returns their paths.
fn write_builtin_model(dir: &Path, seed: u64) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let scale = (1.0 / WIDTH as f32).sqrt();
    let mut paths = Vec::new();
    for (name, layers) in STAND_INS {
        let path = dir.join(format!("{name}-seed{seed}.safetensors"));
        if !path.exists() {
            let mut tensors = HashMap::new();
            if name == "text-encoder" {
                tensors.insert("embed.weight".to_owned(), rng.tensor((VOCAB, WIDTH), 1.0)?);
            } else {
                // The denoiser reads and writes latents (16 channels).
                tensors.insert("proj_in.weight".to_owned(), rng.tensor((16, WIDTH), 0.25)?);
                tensors.insert(
                    "proj_out.weight".to_owned(),
                    rng.tensor((WIDTH, 16), scale)?,
                );
            }
            for layer in 0..layers {
                tensors.insert(
                    format!("layers.{layer}.weight"),
                    rng.tensor((WIDTH, WIDTH), scale)?,
                );
            }
            save_checkpoint(&path, &tensors)?;
        }
        paths.push((name, path));
    }
    let path = dir.join(format!("wan-vae-{VAE_BASE_DIM}-seed{seed}.safetensors"));
    if !path.exists() {
        save_checkpoint(&path, &vae_weights(&mut rng)?)?;
    }
    paths.push(("vae", path));
    Ok(paths)
}

/// The demo clip: a smooth pattern drifting across the frame, in [-1, 1].
///
/// # Shapes
/// returns `[1, 3, T, H, W]`
fn demo_clip() -> candle_core::Result<Tensor> {
    let (t, h, w) = CLIP;
    let mut values = Vec::with_capacity(3 * t * h * w);
    for c in 0..3 {
        for f in 0..t {
            for y in 0..h {
                for x in 0..w {
                    let phase = (x + 3 * f) as f32 / 11.0 + y as f32 / 17.0 + c as f32 * 2.1;
                    values.push(phase.sin() * 0.8);
                }
            }
        }
    }
    Tensor::from_vec(values, (1, 3, t, h, w), &Device::Cpu)
}

/// Tiles of the demo clip: 64 px every 48 px, so the 96-px-wide clip takes two tiles a row.
const DEMO_TILES: vpipe_models::tiling::TileSpec = vpipe_models::tiling::TileSpec {
    tile: 64,
    stride: 48,
};

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
    let [text, denoiser, vae] = models[..] else {
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

    let clip = demo_clip()?;
    let latents = with_model(&mut session, "vae encode", vae, "latents", |lease| {
        let vae = crate::leased::wan_vae(lease, DType::F32, &device)?;
        Ok(vae.encode_tiled(&clip, DEMO_TILES)?)
    })?;

    let steps = demo.steps;
    let sampled = with_model(
        &mut session,
        "sample",
        denoiser,
        "denoised latents",
        |lease| {
            // Latents as tokens: [positions, 16 channels].
            let (b, c, t, h, w) = latents.dims5()?;
            let condition = embeddings.to_device(&device)?;
            let mut x = latents
                .to_device(&device)?
                .flatten_from(2)?
                .squeeze(0)?
                .t()?
                .contiguous()?;
            for step in 0..steps {
                let dt = 1.0 / steps as f64;
                let hidden = x
                    .matmul(lease.get("proj_in.weight")?)?
                    .broadcast_add(&condition)?;
                let velocity = forward(lease, hidden)?.matmul(lease.get("proj_out.weight")?)?;
                x = (x - (velocity * dt)?)?;
                tracing::debug!(step, "denoising step done");
            }
            Ok(x.t()?.reshape((b, c, t, h, w))?.to_device(&Device::Cpu)?)
        },
    )?;

    let decoded = with_model(&mut session, "vae decode", vae, "decoded frames", |lease| {
        let vae = crate::leased::wan_vae(lease, DType::F32, &device)?;
        Ok(vae.decode_tiled(&sampled, DEMO_TILES)?)
    })?;

    let out = &demo.out;
    session.phase("write", |_| -> anyhow::Result<()> {
        let map = HashMap::from([("decoded".to_owned(), decoded)]);
        save_checkpoint(&out.join("output.safetensors"), &map)
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
