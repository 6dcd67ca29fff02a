//! A run on the user's model files, and its plan: what `vpipe run` and `vpipe plan` do.

use std::path::Path;

use candle_core::Device;
use vpipe_mem::Report;

use crate::error::{Error, Result};
use crate::models::{resolve_models, ModelFiles};
use crate::observer::{stop_point, Observer};
use crate::options::RunOptions;
use crate::pipeline::{generate, Job, JobSpec, Mode, LATENT_CHANNELS};
use crate::plan::{ModelSizes, Plan};

/// The input clip as `[1, 3, T, H, W]` in [-1, 1] at the run's size: a video file (H.264 MP4,
/// GIF, a folder of PNG frames) resized to cover the frame, centre-cropped, and cut to the
/// run's frame count (a notice says what was dropped); or a safetensors file with `video_in`
/// already at that shape.
fn read_clip(
    path: &Path,
    job: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<candle_core::Tensor> {
    let expected = [1, 3, job.frames, job.height, job.width];
    if crate::paths::has_extension(path, "safetensors") {
        let [video] = crate::files::read_inputs(path, ["video_in"])?;
        if video.dims() != expected {
            return Err(Error::BadInput(format!(
                "--input {}: video_in has shape {:?}, expected {expected:?} (--frames, --size)",
                path.display(),
                video.dims()
            )));
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
        Error::BadInput(format!("--input: {e}{hint}"))
    })?;
    if clip.num_frames() < job.frames {
        return Err(Error::BadInput(format!(
            "--input {}: {} frames, but --frames {} asks for more",
            path.display(),
            clip.num_frames(),
            job.frames
        )));
    }
    if clip.num_frames() > job.frames {
        observer.notice(&format!(
            "--input {}: using the first {} of {} frames (--frames, 4k+1)",
            path.display(),
            job.frames,
            clip.num_frames()
        ));
        clip.truncate(job.frames)?;
    }
    let clip = vpipe_video::resize_center_crop(&clip, job.width as u32, job.height as u32)?;
    Ok(vpipe_video::to_tensor(&clip, &Device::Cpu)?)
}

/// The `--initial-noise` file's `noise` tensor as the run's latent shape
/// `[1, 16, 1 + (frames-1)/4, height/8, width/8]`, f32 on the host. The shape and dtype are
/// checked from the header before the tensor is converted; other tensors in the file are not
/// read. A missing key, a wrong shape, a non-float dtype, a non-finite value or a file that is
/// not safetensors is bad input naming the flag, the file and the expected shape.
fn read_initial_noise(path: &Path, job: &RunOptions) -> Result<candle_core::Tensor> {
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
    let bad = |what: String| Error::BadInput(format!("--initial-noise {}: {what}", path.display()));
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
        return Err(bad(format!(
            "noise has shape {:?}; {}",
            view.shape(),
            wanted()
        )));
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
        )));
    }
    let noise = view
        .load(&Device::Cpu)
        .map_err(|e| bad(format!("noise cannot be read: {e}")))?
        .to_dtype(candle_core::DType::F32)?;
    let sum = noise.abs()?.sum_all()?.to_scalar::<f32>()?;
    if !sum.is_finite() {
        return Err(bad("noise holds NaN or infinite values".into()));
    }
    Ok(noise)
}

/// The kind of file `--out` asks for, checked before any work.
fn out_kind(out: &Path) -> Result<crate::paths::OutputKind> {
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
        Some(e) => Err(Error::BadInput(format!(
            "--out {}: unknown extension '.{e}'; expected .mp4, .gif, .safetensors, or no \
             extension for a folder of PNG frames",
            out.display()
        ))),
    }
}

/// Checks every path the run will write, against each other and against every file it reads.
fn check_run_outputs(job: &RunOptions, models: &ModelFiles) -> Result<()> {
    let out = crate::paths::Output {
        flag: "--out",
        path: &job.out,
        kind: out_kind(&job.out)?,
    };
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("--dit", &models.dit.path),
        ("--vae", &models.vae.path),
        ("--text-encoder", &models.text_encoder.path),
    ];
    inputs.extend(models.tokenizer.as_deref().map(|t| ("--tokenizer", t)));
    inputs.extend(job.input.as_ref().map(|(p, _)| ("--input", p.as_path())));
    inputs.extend(job.initial_noise.as_deref().map(|p| ("--initial-noise", p)));
    inputs.extend(models.loras.iter().map(|(p, _)| ("--lora", p.as_path())));
    crate::paths::check_command_outputs(out, job.compute.report.as_deref(), &inputs)
}

/// The plan `vpipe run` would make for `job`: on a machine with the device, bounded by what the
/// device can give, less what the process holds on it before any work; without one (a plan
/// made elsewhere), the budget as given. With `preset`, for that architecture without weight
/// files.
pub fn plan(mut job: RunOptions, preset: Option<&str>) -> Result<Plan> {
    if job.compute.device.starts_with("cuda") {
        if let Ok(device) = crate::device::open_device(&job.compute.device) {
            let meters = vpipe_mem::Meters::for_device(&device)?;
            job.compute.bound_by_device(&device, &meters.read()?);
        }
    }
    let sizes = match preset {
        Some(name) => ModelSizes::preset(name, job.compute.dtype).ok_or_else(|| {
            Error::BadInput(format!(
                "--preset {name}: expected wan2.1-t2v-14b or wan2.1-t2v-1.3b"
            ))
        })?,
        None => ModelSizes::of(&resolve_models(&job)?, job.compute.dtype)?,
    };
    Ok(Plan::new(&job, &sizes))
}

/// Runs `job`: resolves and checks its files, plans it and refuses it when the plan does not
/// fit (before loading anything), runs every phase and writes the output and the report.
/// When a phase fails or the observer stops the run, the report so far is still written.
/// Returns the report; whether it kept the budget is the caller's to check
/// ([`budget_kept`](crate::budget_kept)), after the output it names.
pub fn run(mut job: RunOptions, observer: &mut dyn Observer) -> Result<Report> {
    let models = resolve_models(&job)?;
    check_run_outputs(&job, &models)?;
    let device = crate::device::open_device(&job.compute.device)?;
    let meters = vpipe_mem::Meters::for_device(&device)?;
    job.compute.bound_by_device(&device, &meters.read()?);
    // Sampling never starts when the plan does not fit.
    let sizes = ModelSizes::of(&models, job.compute.dtype)?;
    let plan = Plan::new(&job, &sizes);
    if !plan.fits() {
        return Err(plan.refusal());
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
            video: read_clip(path, &job, observer)?,
            strength: *strength,
        },
    };
    let spec = JobSpec {
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone(),
        mode,
        frames: job.frames,
        height: job.height,
        width: job.width,
        steps: job.steps,
        guidance: job.guidance,
        step_cache: job.step_cache,
        shift: job.shift,
        sampler: job.sampler,
        seed: job.seed,
        initial_noise,
        tiles: job.tiles,
    };
    let pipeline_job = Job::planned(spec, models, device, job.compute.dtype, &plan, sizes);
    let mut session = vpipe_mem::MemorySession::with_meters(
        pipeline_job.device().clone(),
        meters,
        job.compute.budget,
    )?;
    let written = generate(&pipeline_job, &mut session, observer).and_then(|made| {
        session.phase("write", |p| -> Result<()> {
            stop_point(observer)?;
            p.note(
                "video",
                &format!("{:?} at {} fps", made.video.dims(), crate::files::FPS),
            );
            crate::files::write_clip(&job.out, &made.video, Some(&made.latents), observer)
        })
    });
    if let Err(err) = written {
        // The report so far: what ran, what it measured, where it stopped.
        if let Some(path) = job.compute.report.as_deref() {
            if let Err(report_err) = crate::files::finish_report(&session, Some(path)) {
                observer.notice(&format!(
                    "could not write the report so far: {}",
                    crate::error::chain(&report_err)
                ));
            }
        }
        return Err(err);
    }
    crate::files::finish_report(&session, job.compute.report.as_deref())
}
