//! `vpipe demo`: the whole pipeline (every phase of video-to-video, or of image-to-video with
//! `--mode i2v`) on a small built-in model, with every memory figure measured and every move
//! of weights verified.
//!
//! The built-in model is the real Wan 2.1 architecture at a small width: a DiT (dim 256, two
//! 128-wide heads, 2 blocks; the image-to-video one with 36 input channels and image
//! cross-attention), a umT5 encoder (width 64, 2 blocks) with a small SentencePiece Unigram
//! tokenizer, the VAE (base width 16 instead of 96), a LoRA and, for image-to-video, a CLIP
//! vision encoder (width 64, 2 layers, 56-px images in 14-px patches). With `--model
//! wan2.2-ti2v` the DiT is Wan 2.2 TI2V-5B's architecture (48 latent channels in and out) and
//! the VAE Wan 2.2's (patches, residual stages; base widths 16 and 24). Their weights are
//! seeded random numbers made in-process, written in the real file formats (ComfyUI-style
//! safetensors, `tokenizer.json`) and loaded back through the normal loaders. The clip is a
//! built-in synthetic pattern; random weights make the output video noise-like, but every
//! number in the report is a meter reading of real work.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use vpipe_mem::{fmt_bytes, Report};

use vpipe_pipeline::{Job, JobSpec, Mode, ModelFiles};

use crate::flags::{Demo, DemoStart};

/// The demo clip: frames (1 + 4k), height, width.
const CLIP: (usize, usize, usize) = (9, 64, 96);
/// Base width of the demo's Wan VAE (the released model has 96; Wan 2.2's 160).
const VAE_BASE_DIM: usize = 16;
/// Base width of the demo's Wan 2.2 VAE decoder (the released model has 256).
const VAE22_DECODER_BASE_DIM: usize = 24;
/// The demo's prompt, and the start of Wan's default negative prompt.
const PROMPT: &str = "A cheesecake with berries on a plate, slow camera pan, soft light";
const NEGATIVE_PROMPT: &str =
    "色调艳丽，过曝，静态，细节模糊不清，字幕，worst quality, low quality";
/// A small SentencePiece Unigram tokenizer (677 pieces, English + Chinese; trained by
/// `tools/fixtures/make_umt5_fixtures.py`, which also tests it against `sentencepiece`).
const TOKENIZER_JSON: &str = include_str!("../../vpipe-text/tests/fixtures/tokenizer.json");

/// A small deterministic generator (xorshift64*), so the built-in weights are the same on
/// every machine without a dependency.
struct Rng(u64);

impl Rng {
    /// The stream of one file of the built-in model, a pure function of the seed and the file's
    /// name: a file's bytes never depend on which other files are made in the same run, so a
    /// folder missing one file gets back exactly the file it lost.
    fn for_file(seed: u64, file_name: &str) -> Self {
        // FNV-1a of the name, mixed with the seed through splitmix64's finaliser so that nearby
        // seeds and similar names still start far apart; xorshift needs a nonzero state.
        let name_hash = file_name
            .bytes()
            .fold(0xCBF2_9CE4_8422_2325u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3)
            });
        Rng(splitmix64(splitmix64(seed) ^ name_hash) | 1)
    }

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

/// splitmix64's output function: a bijection of `u64` that spreads every input bit.
fn splitmix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The bytes of a safetensors file holding `tensors`; the format orders tensors by dtype and
/// name, so equal tensors always give equal bytes.
fn checkpoint_bytes(tensors: &HashMap<String, Tensor>) -> anyhow::Result<Vec<u8>> {
    Ok(safetensors::serialize(tensors, None)?)
}

/// Seeded weights for every tensor `build` asks a `VarBuilder` for, under the names it asks
/// for: matrices and kernels scaled by 1/√fan-in, norm gains near 1, small biases and
/// modulation tables.
fn seeded_weights(
    mut rng: Rng,
    build: impl FnOnce(candle_nn::VarBuilder) -> anyhow::Result<()>,
) -> anyhow::Result<HashMap<String, Tensor>> {
    // Building the model over an empty VarMap lists every weight it needs, with its shape.
    let varmap = candle_nn::VarMap::new();
    build(candle_nn::VarBuilder::from_varmap(
        &varmap,
        DType::F32,
        &Device::Cpu,
    ))?;
    let vars = varmap.data().lock().expect("the VarMap is not shared");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    for name in names {
        let shape = vars[name].shape().clone();
        let fan_in = shape.dims().iter().skip(1).product::<usize>().max(1);
        let is_gain = name.ends_with("gamma")
            || (shape.rank() == 1 && name.ends_with("weight") && !name.contains("embedding"));
        let (offset, scale) = if is_gain {
            (1.0, 0.1)
        } else if name.ends_with("modulation") {
            (0.0, 0.05)
        } else if shape.rank() > 1 {
            (0.0, (3.0 / fan_in as f32).sqrt())
        } else {
            (0.0, 0.02)
        };
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| offset + rng.next_f32() * scale)
            .collect();
        tensors.insert(name.clone(), Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(tensors)
}

/// The built-in model's configurations.
fn dit_config(text_dim: usize) -> vpipe_models::wan::DitConfig {
    vpipe_models::wan::DitConfig {
        dim: 256,
        ffn_dim: 512,
        num_heads: 2,
        num_layers: 2,
        text_dim,
        ..vpipe_models::wan::DitConfig::wan21_t2v_1_3b()
    }
}

fn text_config(vocab_size: usize) -> vpipe_text::umt5::Config {
    vpipe_text::umt5::Config {
        vocab_size,
        d_model: 64,
        d_kv: 16,
        d_ff: 128,
        num_layers: 2,
        num_heads: 4,
        ..vpipe_text::umt5::Config::umt5_xxl()
    }
}

/// The image-to-video DiT: the text-to-video one with the noise, mask and image latents in
/// (36 channels) and image cross-attention over the CLIP features.
fn image_dit_config(text_dim: usize) -> vpipe_models::wan::DitConfig {
    vpipe_models::wan::DitConfig {
        in_channels: 36,
        image_dim: Some(clip_config().hidden_size),
        ..dit_config(text_dim)
    }
}

fn clip_config() -> vpipe_models::clip::Config {
    vpipe_models::clip::Config {
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        image_size: 56,
        ..vpipe_models::clip::Config::vit_h_14()
    }
}

/// The CLIP vision encoder in transformers' names (`vision_model.*`, as ComfyUI's
/// `clip_vision_h.safetensors`).
fn clip_bytes(rng: Rng) -> anyhow::Result<Vec<u8>> {
    let tensors = seeded_weights(rng, |vb| {
        vpipe_models::clip::ClipVisionEncoder::new(&clip_config(), vb.pp("vision_model"))?;
        Ok(())
    })?;
    checkpoint_bytes(&tensors)
}

fn vae_config(ti2v: bool) -> vpipe_models::wan::vae::Config {
    if ti2v {
        return vpipe_models::wan::vae::Config {
            base_dim: VAE_BASE_DIM,
            decoder_base_dim: Some(VAE22_DECODER_BASE_DIM),
            ..vpipe_models::wan::vae::Config::wan22()
        };
    }
    vpipe_models::wan::vae::Config {
        base_dim: VAE_BASE_DIM,
        ..vpipe_models::wan::vae::Config::wan21()
    }
}

/// The TI2V DiT: the demo's DiT on the Wan 2.2 VAE's 48 latent channels.
fn ti2v_dit_config(text_dim: usize) -> vpipe_models::wan::DitConfig {
    let z = vae_config(true).z_dim;
    vpipe_models::wan::DitConfig {
        in_channels: z,
        out_channels: z,
        ..dit_config(text_dim)
    }
}

/// The umT5 text encoder, ComfyUI-style (no prefix).
fn text_encoder_bytes(cfg: &vpipe_text::umt5::Config, rng: Rng) -> anyhow::Result<Vec<u8>> {
    let tensors = seeded_weights(rng, |vb| {
        vpipe_text::umt5::Umt5Encoder::new(cfg, vb)?;
        Ok(())
    })?;
    checkpoint_bytes(&tensors)
}

/// The DiT under the prefix ComfyUI's diffusion-model files carry.
fn dit_bytes(cfg: &vpipe_models::wan::DitConfig, rng: Rng) -> anyhow::Result<Vec<u8>> {
    let tensors = seeded_weights(rng, |vb| {
        vpipe_models::wan::WanModel::new(cfg, vb)?;
        Ok(())
    })?;
    let prefixed = tensors
        .into_iter()
        .map(|(k, v)| (format!("model.diffusion_model.{k}"), v))
        .collect();
    checkpoint_bytes(&prefixed)
}

/// The VAE with the original Wan names.
fn vae_bytes(ti2v: bool, rng: Rng) -> anyhow::Result<Vec<u8>> {
    let tensors = seeded_weights(rng, |vb| {
        vpipe_models::wan::WanVae::new(&vae_config(ti2v), vb)?;
        Ok(())
    })?;
    checkpoint_bytes(&tensors)
}

/// A LoRA with ComfyUI's PEFT names: rank 4, alpha 2 on the self-attention query and the FFN
/// input of every block.
fn lora_bytes(dit_cfg: &vpipe_models::wan::DitConfig, mut rng: Rng) -> anyhow::Result<Vec<u8>> {
    let mut tensors = HashMap::new();
    for block in 0..dit_cfg.num_layers {
        for (target, rows, cols) in [
            ("self_attn.q", dit_cfg.dim, dit_cfg.dim),
            ("ffn.0", dit_cfg.ffn_dim, dit_cfg.dim),
        ] {
            let key = format!("diffusion_model.blocks.{block}.{target}");
            tensors.insert(format!("{key}.lora_A.weight"), rng.tensor((4, cols), 0.1)?);
            tensors.insert(format!("{key}.lora_B.weight"), rng.tensor((rows, 4), 0.1)?);
            tensors.insert(format!("{key}.alpha"), Tensor::new(2f32, &Device::Cpu)?);
        }
    }
    checkpoint_bytes(&tensors)
}

/// The files of the built-in model.
struct BuiltIn {
    dit: PathBuf,
    vae: PathBuf,
    text_encoder: PathBuf,
    tokenizer: PathBuf,
    lora: PathBuf,
    /// Image-to-video: the CLIP vision encoder.
    clip: Option<PathBuf>,
    /// Wan 2.2: the low-noise expert (`dit` is the high-noise one).
    dit_low_noise: Option<PathBuf>,
}

/// Puts the built-in model's files into `dir` in the formats users have: the DiT and the text
/// encoder as ComfyUI-style safetensors, the tokenizer as `tokenizer.json`, the VAE with
/// original Wan names, a LoRA with ComfyUI's PEFT names.
///
/// Every file is made in memory from `seed` on each run (they are small) and an existing file
/// is kept only when it holds exactly those bytes, so a folder that lost, damaged or mixed
/// files is brought back to what the seed makes, and demos sharing a folder agree.
fn write_builtin_model(dir: &Path, seed: u64, demo: &Demo) -> anyhow::Result<BuiltIn> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text_cfg = text_config(tokenizer_vocab_size(TOKENIZER_JSON)?);
    let image = demo.mode == DemoStart::FirstFrame;
    let (dit_cfg, dit_name) = match (demo.expert_pair, image) {
        // TI2V-5B takes text and an image alike, with no CLIP.
        _ if demo.ti2v => (ti2v_dit_config(text_cfg.d_model), "wan2.2-ti2v-dit"),
        (false, false) => (dit_config(text_cfg.d_model), "wan2.1-dit"),
        (false, true) => (image_dit_config(text_cfg.d_model), "wan2.1-i2v-dit"),
        // Wan 2.2's image experts read the condition's channels and no CLIP features.
        (true, false) => (dit_config(text_cfg.d_model), "wan2.2-t2v-high_noise"),
        (true, true) => (
            vpipe_models::wan::DitConfig {
                in_channels: 36,
                ..dit_config(text_cfg.d_model)
            },
            "wan2.2-i2v-high_noise",
        ),
    };
    let put = |name: String, make: &dyn Fn(Rng) -> anyhow::Result<Vec<u8>>| {
        let bytes = make(Rng::for_file(seed, &name))?;
        put_file(dir, &name, &bytes)
    };
    Ok(BuiltIn {
        tokenizer: put_file(dir, "tokenizer.json", TOKENIZER_JSON.as_bytes())?,
        text_encoder: put(format!("umt5-tiny-seed{seed}.safetensors"), &|rng| {
            text_encoder_bytes(&text_cfg, rng)
        })?,
        dit: put(format!("{dit_name}-tiny-seed{seed}.safetensors"), &|rng| {
            dit_bytes(&dit_cfg, rng)
        })?,
        dit_low_noise: demo
            .expert_pair
            .then(|| {
                let name = dit_name.replace("high_noise", "low_noise");
                put(format!("{name}-tiny-seed{seed}.safetensors"), &|rng| {
                    dit_bytes(&dit_cfg, rng)
                })
            })
            .transpose()?,
        clip: (image && !demo.expert_pair && !demo.ti2v)
            .then(|| {
                put(
                    format!("clip-vision-tiny-seed{seed}.safetensors"),
                    &clip_bytes,
                )
            })
            .transpose()?,
        vae: if demo.ti2v {
            put(
                format!("wan2.2-vae-{VAE_BASE_DIM}-seed{seed}.safetensors"),
                &|rng| vae_bytes(true, rng),
            )?
        } else {
            put(
                format!("wan2.1-vae-{VAE_BASE_DIM}-seed{seed}.safetensors"),
                &|rng| vae_bytes(false, rng),
            )?
        },
        lora: put(format!("lora-tiny-seed{seed}.safetensors"), &|rng| {
            lora_bytes(&dit_cfg, rng)
        })?,
    })
}

/// Makes `dir/name` hold exactly `bytes` and returns its path. A file already holding them is
/// kept; any other file there (another seed's stream, a truncated or damaged copy, one that
/// cannot be read) is replaced atomically, with a notice naming it.
fn put_file(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    // Leftovers of killed demos go whether or not this file needs writing.
    vpipe_pipeline::remove_stale_partials(dir, name);
    match std::fs::read(&path) {
        Ok(found) if found == bytes => return Ok(path),
        Ok(_) => eprintln!(
            "vpipe: {} is not the built-in model's file for this seed; rewriting it",
            path.display()
        ),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => eprintln!(
            "vpipe: {} cannot be read ({err}); rewriting it",
            path.display()
        ),
    }
    vpipe_pipeline::write_atomically(&path, |partial| {
        std::fs::write(partial, bytes).map_err(|source| vpipe_pipeline::Error::Io {
            context: format!("writing {}", path.display()),
            source,
        })
    })?;
    Ok(path)
}

/// The vocabulary size of a `tokenizer.json` (the text encoder's embedding rows).
fn tokenizer_vocab_size(json: &str) -> anyhow::Result<usize> {
    let value: serde_json::Value = serde_json::from_str(json)?;
    value["model"]["vocab"]
        .as_array()
        .map(Vec::len)
        .context("the built-in tokenizer.json has no model.vocab")
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

/// The image-to-video demo's first frame: the demo clip's, as the VAE takes it ([1, 3, H, W]
/// in [-1, 1]) and, with a CLIP vision encoder, as its preprocessing makes it from the RGB
/// bytes.
fn demo_image_mode(clip: bool) -> anyhow::Result<Mode> {
    let first = demo_clip()?.narrow(2, 0, 1)?.squeeze(2)?;
    let (_, _, h, w) = first.dims4()?;
    // [1, 3, H, W] in [-1, 1] → H × W × 3 bytes.
    let rgb: Vec<u8> = ((first.squeeze(0)?.permute((1, 2, 0))? + 1.0)? * 127.5)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1()?;
    let clip_pixels = vpipe_pipeline::clip_pixel_values(
        &rgb,
        (w as u32, h as u32),
        clip_config().image_size as u32,
    )?;
    Ok(Mode::ImageToVideo {
        first,
        last: None,
        clip_pixels: clip.then_some(clip_pixels),
    })
}

/// Tiles of the demo clip: 64 px every 48 px, so the 96-px-wide clip takes two tiles a row.
const DEMO_TILES: vpipe_models::tiling::TileSpec = vpipe_models::tiling::TileSpec::balanced(64, 48);

pub(crate) fn run(demo: Demo) -> anyhow::Result<ExitCode> {
    let device = vpipe_pipeline::open_device(&demo.device)?;
    let files = write_builtin_model(&demo.out.join("weights"), demo.seed, &demo)?;
    println!(
        "vpipe demo: built-in {} model (seeded random weights), {} on {}",
        if demo.expert_pair {
            "Wan 2.2 expert-pair"
        } else if demo.ti2v {
            "Wan 2.2 TI2V-architecture"
        } else {
            "Wan 2.1-architecture"
        },
        match demo.mode {
            DemoStart::Prompt => "text-to-video",
            DemoStart::Clip => "video-to-video",
            DemoStart::FirstFrame => "image-to-video",
        },
        demo.device
    );
    let (frames, height, width) = CLIP;
    let mut models = ModelFiles::inspect(
        &files.dit,
        &files.vae,
        &files.text_encoder,
        Some(files.tokenizer),
        vec![(files.lora, 0.8)],
    )?;
    if let Some(clip) = &files.clip {
        models = models.with_clip_vision(clip, Some(clip_config()))?;
    }
    if let Some(low) = &files.dit_low_noise {
        models = models.with_low_noise_expert(low)?;
    }
    let image = demo.mode == DemoStart::FirstFrame;
    let mode = match demo.mode {
        DemoStart::Prompt => Mode::TextToVideo,
        DemoStart::Clip => Mode::VideoToVideo {
            video: demo_clip()?,
            strength: 0.7,
        },
        DemoStart::FirstFrame => demo_image_mode(files.clip.is_some())?,
    };
    // Wan 2.2's defaults: the boundary of its text or image pair, shift 12 or 5.
    let (low_noise, shift) = if demo.expert_pair {
        let switch = vpipe_pipeline::ExpertSwitch {
            boundary: vpipe_pipeline::LowNoiseExpert::default_boundary(image),
            guidance: 3.0,
        };
        (Some(switch), if image { 5.0 } else { 12.0 })
    } else if demo.ti2v {
        // Wan 2.2 TI2V-5B's flow shift.
        (None, 5.0)
    } else {
        (None, 3.0)
    };
    let spec = JobSpec {
        prompt: PROMPT.into(),
        negative_prompt: NEGATIVE_PROMPT.into(),
        mode,
        frames,
        height,
        width,
        steps: demo.steps,
        guidance: 5.0,
        step_cache: None,
        low_noise,
        shift,
        sampler: vpipe_sampling::SamplerKind::UniPc,
        seed: demo.seed,
        initial_noise: None,
        tiles: DEMO_TILES,
    };
    let job = Job::new(spec, models, device, DType::F32, demo.budget)?;
    let mut session = vpipe_mem::MemorySession::new(job.device().clone(), demo.budget)?;
    let mut observer = crate::progress::Terminal::default();
    let made = vpipe_pipeline::generate(&job, &mut session, &mut observer)?;

    let out = &demo.out;
    let output = out.join("demo.mp4");
    session.phase("write", |p| -> anyhow::Result<()> {
        vpipe_pipeline::write_clip(&output, &made.video, None, made.fps, &mut observer)?;
        p.declare_output("demo.mp4", std::fs::metadata(&output)?.len());
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
        output.display()
    );
    vpipe_pipeline::budget_kept(&report, &format!("{}", output.display()))?;
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
        "{:<18} {:>12} {:>12} {:>12} {:>10}",
        "phase", "peak", "at exit", "resident", "moves ok"
    );
    for phase in &report.phases {
        let moves: Vec<_> = report
            .transitions
            .iter()
            .filter(|t| t.phase.as_deref() == Some(phase.name.as_str()))
            .collect();
        println!(
            "{:<18} {:>12} {:>12} {:>12} {:>10}",
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
            "VIOLATION: phase '{}' peaked at {} ({}), budget {}",
            violation.phase,
            fmt_bytes(violation.peak),
            violation.meter,
            fmt_bytes(violation.budget)
        );
    }
}
