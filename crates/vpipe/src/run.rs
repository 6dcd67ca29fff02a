//! `vpipe run`: the pipeline on the user's model files.

use std::path::Path;
use std::process::ExitCode;

use candle_core::Device;
use vpipe_mem::fmt_bytes;

use crate::exit::{BadInput, PlanDoesNotFit};
use crate::flags::RunJob;
use crate::models::resolve_models;
use crate::models::ModelFiles;
use crate::pipeline::{self, Job, Mode};
use crate::plan::{ModelSizes, Plan};

/// The input clip as `[1, 3, T, H, W]` in [-1, 1] at the run's size: a video file (H.264 MP4,
/// GIF, a folder of PNG frames) resized to cover the frame, centre-cropped, and cut to the
/// run's frame count (a notice says what was dropped); or a safetensors file with `video_in`
/// already at that shape.
fn read_clip(path: &Path, job: &RunJob) -> anyhow::Result<candle_core::Tensor> {
    let expected = [1, 3, job.frames, job.height, job.width];
    if crate::paths::has_extension(path, "safetensors") {
        let [video] = crate::files::read_inputs(path, ["video_in"])?;
        if video.dims() != expected {
            return Err(BadInput(format!(
                "--input {}: video_in has shape {:?}, expected {expected:?} (--frames, --size)",
                path.display(),
                video.dims()
            ))
            .into());
        }
        return Ok(video.to_dtype(candle_core::DType::F32)?);
    }
    // The decoded clip lives in host memory: on a CPU run it must fit the compute budget, on a
    // CUDA run the host budget, so a header that declares more is refused before decoding.
    let host_budget = if job.compute.device.starts_with("cuda") {
        job.compute.budget.host
    } else {
        job.compute.budget.compute
    };
    let mut limits = vpipe_video::ReadLimits::default();
    if let Some(budget) = host_budget {
        limits.max_decoded_bytes = limits.max_decoded_bytes.min(budget);
    }
    let mut clip = vpipe_video::read_video_with_limits(path, &limits).map_err(|e| {
        let hint = match (&e, host_budget) {
            (vpipe_video::VideoError::DeclaredSizeTooLarge { .. }, Some(_)) => {
                "; the whole clip is decoded into host memory, which the budget covers: trim the \
                 clip or raise the budget"
            }
            _ => "",
        };
        BadInput(format!("--input: {e}{hint}"))
    })?;
    if clip.num_frames() < job.frames {
        return Err(BadInput(format!(
            "--input {}: {} frames, but --frames {} asks for more",
            path.display(),
            clip.num_frames(),
            job.frames
        ))
        .into());
    }
    if clip.num_frames() > job.frames {
        eprintln!(
            "vpipe: --input {}: using the first {} of {} frames (--frames, 4k+1)",
            path.display(),
            job.frames,
            clip.num_frames()
        );
        clip.truncate(job.frames)?;
    }
    let clip = vpipe_video::resize_center_crop(&clip, job.width as u32, job.height as u32)?;
    Ok(vpipe_video::to_tensor(&clip, &Device::Cpu)?)
}

/// Latent channels of the Wan 2.1 VAE: the second dimension of `--initial-noise`.
const LATENT_CHANNELS: usize = 16;

/// The `--initial-noise` file's `noise` tensor as the run's latent shape
/// `[1, 16, 1 + (frames-1)/4, height/8, width/8]`, f32 on the host. The shape and dtype are
/// checked from the header before the tensor is converted; other tensors in the file are not
/// read. A missing key, a wrong shape, a non-float dtype, a non-finite value or a file that is
/// not safetensors is bad input naming the flag, the file and the expected shape.
fn read_initial_noise(path: &Path, job: &RunJob) -> anyhow::Result<candle_core::Tensor> {
    use candle_core::safetensors::Load;
    let expected = [
        1,
        LATENT_CHANNELS,
        1 + (job.frames - 1) / 4,
        job.height / 8,
        job.width / 8,
    ];
    let wanted = || {
        format!(
            "expected `noise` of shape {expected:?}, f32 ([1, {LATENT_CHANNELS}, 1 + (frames-1)/4, \
             height/8, width/8] for --frames {} --size {}x{})",
            job.frames, job.width, job.height
        )
    };
    let bad = |what: String| BadInput(format!("--initial-noise {}: {what}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        bad(format!(
            "not a readable safetensors file ({e}); {}",
            wanted()
        ))
    })?;
    let view = file.tensor("noise").map_err(|_| {
        let mut found = file.names();
        found.sort();
        bad(format!(
            "no tensor 'noise' (found: {}); {}",
            found
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", "),
            wanted()
        ))
    })?;
    if view.shape() != expected {
        return Err(bad(format!("noise has shape {:?}; {}", view.shape(), wanted())).into());
    }
    use safetensors::Dtype;
    if !matches!(
        view.dtype(),
        Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
    ) {
        return Err(bad(format!(
            "noise has dtype {:?}; expected a float tensor (f32, or f16 / bf16 / f64, converted \
             to f32)",
            view.dtype()
        ))
        .into());
    }
    let noise = view
        .load(&Device::Cpu)
        .map_err(|e| bad(format!("noise cannot be read: {e}")))?
        .to_dtype(candle_core::DType::F32)?;
    let sum = noise.abs()?.sum_all()?.to_scalar::<f32>()?;
    if !sum.is_finite() {
        return Err(bad("noise holds NaN or infinite values".into()).into());
    }
    Ok(noise)
}

/// The kind of file `--out` asks for, checked before any work.
fn out_kind(out: &Path) -> Result<crate::paths::OutputKind, BadInput> {
    use crate::paths::OutputKind;
    match out.extension().and_then(|e| e.to_str()) {
        None => Ok(OutputKind::Folder),
        Some(e)
            if ["mp4", "gif", "safetensors"]
                .iter()
                .any(|k| e.eq_ignore_ascii_case(k)) =>
        {
            Ok(OutputKind::File)
        }
        Some(e) => Err(BadInput(format!(
            "--out {}: unknown extension '.{e}'; expected .mp4, .gif, .safetensors, or no \
             extension for a folder of PNG frames",
            out.display()
        ))),
    }
}

/// Checks every path the run will write, against each other and against every file it reads.
fn check_run_outputs(job: &RunJob, models: &ModelFiles) -> Result<(), BadInput> {
    let out = crate::paths::Output {
        flag: "--out",
        path: &job.out,
        kind: out_kind(&job.out)?,
    };
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("--dit", &models.dit),
        ("--vae", &models.vae),
        ("--text-encoder", &models.text_encoder),
    ];
    inputs.extend(models.tokenizer.as_deref().map(|t| ("--tokenizer", t)));
    inputs.extend(job.input.as_ref().map(|(p, _)| ("--input", p.as_path())));
    inputs.extend(job.initial_noise.as_deref().map(|p| ("--initial-noise", p)));
    inputs.extend(models.loras.iter().map(|(p, _)| ("--lora", p.as_path())));
    crate::paths::check_command_outputs(out, job.compute.report.as_deref(), &inputs)
}

pub(crate) fn run(mut job: RunJob) -> anyhow::Result<ExitCode> {
    let models = resolve_models(&job)?;
    check_run_outputs(&job, &models)?;
    let device = crate::device::open(&job.compute.device)?;
    let meters = vpipe_mem::Meters::for_device(&device)?;
    job.compute.bound_by_device(&device, &meters.read()?);
    // Sampling never starts when the plan does not fit.
    let sizes = ModelSizes::from_files(
        &models.dit,
        models.dit_config.as_ref(),
        &models.vae,
        &models.text_encoder,
        job.compute.dtype,
    )?;
    let plan = Plan::new(&job, &sizes);
    if !plan.fits {
        let worst = plan
            .phases
            .iter()
            .max_by_key(|p| p.estimated_peak_bytes)
            .expect("a plan has phases");
        return Err(PlanDoesNotFit(format!(
            "refused before loading anything: phase '{}' is estimated at {} ({}), over the \
             budget of {} ({}); the least this run can take is {} (phase '{}'); see `vpipe \
             plan` with the same flags",
            worst.name,
            fmt_bytes(worst.estimated_peak_bytes),
            worst.resident.join(", "),
            fmt_bytes(plan.budget_bytes.unwrap_or(0)),
            plan.budget_source,
            fmt_bytes(plan.minimum_bytes),
            plan.minimum_phase,
        ))
        .into());
    }
    // Before the clip, whose decoding may take a while: a wrong noise file fails at once.
    let initial_noise = job
        .initial_noise
        .as_deref()
        .map(|path| read_initial_noise(path, &job))
        .transpose()?;
    let mode = match &job.input {
        None => Mode::TextToVideo,
        Some((path, strength)) => Mode::VideoToVideo {
            video: read_clip(path, &job)?,
            strength: *strength,
        },
    };
    let pipeline_job = Job {
        models,
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone(),
        mode,
        frames: job.frames,
        height: job.height,
        width: job.width,
        steps: job.steps,
        guidance: job.guidance,
        shift: job.shift,
        sampler: job.sampler,
        seed: job.seed,
        initial_noise,
        tiles: job.tiles,
        device,
        dtype: job.compute.dtype,
        budget: job.compute.budget,
        text: plan.text,
        text_config: sizes.text.clone(),
        sample: plan.sample,
        dit_config: sizes.dit.clone(),
    };
    let mut session = vpipe_mem::MemorySession::with_meters(
        pipeline_job.device.clone(),
        meters,
        job.compute.budget,
    )?;
    let written = pipeline::run(&pipeline_job, &mut session).and_then(|made| {
        session.phase("write", |p| -> anyhow::Result<()> {
            crate::progress::check_interrupt()?;
            p.note(
                "video",
                &format!("{:?} at {} fps", made.video.dims(), crate::files::FPS),
            );
            crate::files::write_clip(&job.out, &made.video, Some(&made.latents))
        })
    });
    if let Err(err) = written {
        // The report so far: what ran, what it measured, where it stopped.
        if let Some(path) = job.compute.report.as_deref() {
            if let Err(report_err) = crate::files::finish_report(&session, Some(path)) {
                eprintln!("vpipe: could not write the report so far: {report_err:#}");
            }
        }
        return Err(err);
    }
    let report = crate::files::finish_report(&session, job.compute.report.as_deref())?;
    let peak =
        |f: fn(&vpipe_mem::PhaseReport) -> Option<u64>| report.phases.iter().filter_map(f).max();
    let headline = match peak(|p| p.device_footprint_peak) {
        Some(footprint) => format!(
            "device footprint at most {} (pool reserved + outside the pool, measured), \
             live tensors at most {} above baseline",
            fmt_bytes(footprint),
            fmt_bytes(peak(|p| Some(p.peak_above_baseline)).unwrap_or(0)),
        ),
        None => format!(
            "highest peak {} above baseline ({}, measured)",
            fmt_bytes(peak(|p| Some(p.peak_above_baseline)).unwrap_or(0)),
            report.compute_meter
        ),
    };
    println!(
        "run: {} phases, {headline}, {} violation(s); wrote {}",
        report.phases.len(),
        report.violations.len(),
        job.out.display()
    );
    crate::exit::budget_kept(&report, &format!("--out {}", job.out.display()))?;
    Ok(ExitCode::SUCCESS)
}
