//! A run on the user's model files, and its plan: what `vpipe run` and `vpipe plan` do.

use std::path::Path;

use candle_core::Device;
use vpipe_mem::Report;

use crate::error::{Error, Result};
use crate::family::VaeSizes;
use crate::models::{resolve_models, ModelFiles};
use crate::observer::{stop_point, Observer};
use crate::options::{ImageInputs, RunOptions};
use crate::pipeline::{generate, Job, JobSpec, Mode};
use crate::plan::{ModelSizes, Plan};
use vpipe_mem::MemorySession;

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

/// Smallest image side taken for image-to-video: the smallest frame side a run makes.
const MIN_IMAGE_SIDE: u32 = 16;

/// One image of an image-to-video run, given with `flag`: read (PNG or JPEG, by content; its
/// declared size checked against the limits and the host budget before decoding), then as
/// the VAE takes it, resized to cover the run's size and centre-cropped (a notice says when
/// that changes it), [1, 3, H, W] in [-1, 1]; and, for a run with a CLIP vision encoder of
/// `clip_size` px, as CLIP's preprocessing makes it from the image as read (diffusers'
/// pipeline gives the encoder the original image), [1, 3, S, S].
fn read_frame(
    flag: &str,
    path: &Path,
    job: &RunOptions,
    clip_size: Option<usize>,
    observer: &mut dyn Observer,
) -> Result<(candle_core::Tensor, Option<candle_core::Tensor>)> {
    let bad = |what: String| Error::BadInput(format!("{flag} {}: {what}", path.display()));
    let mut limits = vpipe_video::ReadLimits::default();
    if let Some(budget) = job.compute.budget.host {
        limits.max_decoded_bytes = limits.max_decoded_bytes.min(budget);
    }
    let image = vpipe_video::read_image_with_limits(path, &limits)
        .map_err(|e| Error::BadInput(format!("{flag}: {e}")))?;
    let (width, height) = (image.width(), image.height());
    if width.min(height) < MIN_IMAGE_SIDE {
        return Err(bad(format!(
            "a {width}×{height} image; expected at least {MIN_IMAGE_SIDE}×{MIN_IMAGE_SIDE} pixels"
        )));
    }
    let rgb = image.frame(0).ok_or_else(|| bad("no pixels".into()))?;
    let clip_pixels = clip_size
        .map(|size| crate::image_to_video::clip_pixel_values(rgb, (width, height), size as u32))
        .transpose()?;
    let (w, h) = (job.width as u32, job.height as u32);
    if (width, height) != (w, h) {
        observer.notice(&format!(
            "{flag} {}: {width}×{height} resized to cover {w}×{h} and centre-cropped (--size)",
            path.display()
        ));
    }
    let frame = vpipe_video::resize_center_crop(&image, w, h).map_err(|e| bad(e.to_string()))?;
    let frame = vpipe_video::to_tensor(&frame, &Device::Cpu)?.squeeze(2)?;
    Ok((frame, clip_pixels))
}

/// The mode of an image-to-video run: its first frame, its last one when given, and both as
/// the CLIP vision encoder of `sizes` takes them when the run has one (Wan 2.2's image
/// experts have none).
fn read_images(
    images: &ImageInputs,
    job: &RunOptions,
    sizes: &ModelSizes,
    observer: &mut dyn Observer,
) -> Result<Mode> {
    let clip_size = sizes.clip.as_ref().map(|c| c.config.image_size);
    let (first, first_pixels) = read_frame("--image", &images.first, job, clip_size, observer)?;
    let (last, clip_pixels) = match &images.last {
        Some(path) => {
            let (last, last_pixels) = read_frame("--last-image", path, job, clip_size, observer)?;
            let both = first_pixels
                .zip(last_pixels)
                .map(|(a, b)| candle_core::Tensor::cat(&[&a, &b], 0))
                .transpose()?;
            (Some(last), both)
        }
        None => (None, first_pixels),
    };
    Ok(Mode::ImageToVideo {
        first,
        last,
        clip_pixels,
    })
}

/// Checks that the frames given suit the DiT of `sizes`: a first-last-frame model (learned
/// positions for both frames' image tokens) needs `--last-image`, and its tokens must be two
/// frames' of the CLIP encoder.
fn check_image_frames(job: &RunOptions, sizes: &ModelSizes) -> Result<()> {
    let (Some(images), Some(clip), Some(tokens)) =
        (&job.image, &sizes.clip, sizes.dit.image_tokens)
    else {
        return Ok(());
    };
    if images.last.is_none() {
        return Err(Error::BadInput(
            "--image: the DiT is a first-last-frame model (image position embeddings for two \
             frames); give the last frame with --last-image"
                .into(),
        ));
    }
    let per_frame = clip.config.tokens();
    if tokens != 2 * per_frame {
        return Err(Error::BadInput(format!(
            "--clip-vision: {per_frame} tokens per image, but the first-last-frame DiT's \
             position embeddings cover {tokens} (two frames of {})",
            tokens / 2
        )));
    }
    Ok(())
}

/// The `--initial-noise` file's `noise` tensor as the run's latent shape on `vae`
/// `[1, C, 1 + (frames-1)/4, height/f, width/f]` (C and f: 16 and 8 for the Wan 2.1 VAE, 48
/// and 16 for Wan 2.2's), f32 on the host. The shape and dtype are
/// checked from the header before the tensor is converted; other tensors in the file are not
/// read. A missing key, a wrong shape, a non-float dtype, a non-finite value or a file that is
/// not safetensors is bad input naming the flag, the file and the expected shape.
fn read_initial_noise(
    path: &Path,
    job: &RunOptions,
    vae: &VaeSizes,
) -> Result<candle_core::Tensor> {
    use candle_core::safetensors::Load;
    let expected = vae.latent_shape(job.frames, job.height, job.width);
    let wanted = || {
        let (c, f) = (vae.latent_channels, vae.spatial_factor);
        format!(
            "expected `noise` of shape {expected:?}, f32 ([1, {c}, 1 + (frames-1)/4, \
             height/{f}, width/{f}] for --frames {} --size {}x{} on the {})",
            job.frames,
            job.width,
            job.height,
            vae.describe()
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

/// Gives `job` the expert switch of a Wan 2.2 pair whose low-noise expert is `dit` when no
/// flag gave one: the default boundary of a text- or `image_to_video` pair, the low-noise
/// expert guided as `--cfg` says; and the pair's flow shift without a `--shift`.
fn with_expert_switch(job: &mut RunOptions, dit: std::path::PathBuf, image_to_video: bool) {
    if !job.shift_given {
        job.shift = crate::options::LowNoiseExpert::default_shift(image_to_video);
    }
    if job.low_noise.is_none() {
        job.low_noise = Some(crate::options::LowNoiseExpert {
            dit: Some(dit),
            config: None,
            boundary: crate::options::LowNoiseExpert::default_boundary(image_to_video),
            guidance: job.guidance,
            loras: Vec::new(),
        });
    }
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
    if let Some(images) = &job.image {
        inputs.push(("--image", &images.first));
        inputs.extend(images.last.as_deref().map(|p| ("--last-image", p)));
    }
    inputs.extend(
        models
            .clip_vision
            .as_ref()
            .map(|c| ("--clip-vision", c.path.as_path())),
    );
    inputs.extend(job.initial_noise.as_deref().map(|p| ("--initial-noise", p)));
    inputs.extend(models.loras.iter().map(|(p, _)| ("--lora", p.as_path())));
    if let Some((low, _)) = &models.dit_low_noise {
        inputs.push(("--dit-low-noise", low.path.as_path()));
    }
    inputs.extend(
        models
            .loras_low_noise
            .iter()
            .map(|(p, _)| ("--lora-low-noise", p.as_path())),
    );
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
                "--preset {name}: expected one of {}",
                vpipe_models::wan::DitConfig::PRESETS.join(", ")
            ))
        })?,
        None => {
            let models = resolve_models(&job)?;
            if let Some((low, _)) = &models.dit_low_noise {
                let image_to_video = job.image.is_some();
                with_expert_switch(&mut job, low.path.clone(), image_to_video);
            }
            ModelSizes::of(&models, job.compute.dtype)?
        }
    };
    check_image_frames(&job, &sizes)?;
    if preset.is_some_and(crate::plan::is_expert_pair_preset) {
        let image_to_video = sizes.dit.in_channels > sizes.vae.latent_channels;
        with_expert_switch(&mut job, std::path::PathBuf::new(), image_to_video);
    }
    crate::plan::settle_for_models(&mut job, &sizes)?;
    Ok(Plan::new(&job, &sizes))
}

/// Runs `job`: resolves and checks its files, plans it and refuses it when the plan does not
/// fit (before loading anything), runs every phase and writes the output and the report.
/// When a phase fails or the observer stops the run, the report so far is still written.
/// Returns the report; whether it kept the budget is the caller's to check
/// ([`budget_kept`](crate::budget_kept)), after the output it names.
pub fn run(job: RunOptions, observer: &mut dyn Observer) -> Result<Report> {
    run_opening(job, observer, crate::device::open_device)
}

/// [`run`] on `device`, which the caller keeps open from one job to the next (`vpipe serve`'s
/// worker: one context, stream and set of library handles for every job, rather than a new set
/// per job); `job`'s `--device` must name it.
pub fn run_on(
    job: RunOptions,
    device: &candle_core::Device,
    observer: &mut dyn Observer,
) -> Result<Report> {
    run_opening(job, observer, |_| Ok(device.clone()))
}

/// A run's files resolved and checked (the Wan 2.2 pair's switch set when a model folder
/// paired it), before the device is touched.
fn resolve_checked(job: &mut RunOptions, observer: &mut dyn Observer) -> Result<ModelFiles> {
    let models = resolve_models(job)?;
    if let Some((low, _)) = &models.dit_low_noise {
        let from_folder = job.low_noise.as_ref().is_none_or(|e| e.dit.is_none());
        let image_to_video = job.image.is_some();
        with_expert_switch(job, low.path.clone(), image_to_video);
        if from_folder {
            observer.notice(&format!(
                "--model-dir: the Wan 2.2 expert pair {} (high noise) and {} (low noise), \
                 boundary {}, shift {}",
                models.dit.path.display(),
                low.path.display(),
                job.low_noise.as_ref().map_or(0.0, |e| e.boundary),
                job.shift
            ));
        }
    }
    check_run_outputs(job, &models)?;
    Ok(models)
}

/// The plan of `job` on `models` (its budget already bounded by the device), refused when it
/// does not fit: sampling never starts then.
fn plan_checked(job: &mut RunOptions, models: &ModelFiles) -> Result<(Plan, ModelSizes)> {
    let sizes = ModelSizes::of(models, job.compute.dtype)?;
    check_image_frames(job, &sizes)?;
    crate::plan::settle_for_models(job, &sizes)?;
    let plan = Plan::new(job, &sizes);
    if !plan.fits() {
        return Err(plan.refusal());
    }
    Ok((plan, sizes))
}

/// What the run makes: its inputs read (the noise file first, so that a wrong one fails at
/// once, before the clip, whose decoding may take a while).
fn job_spec(job: &RunOptions, sizes: &ModelSizes, observer: &mut dyn Observer) -> Result<JobSpec> {
    let initial_noise = job
        .initial_noise
        .as_deref()
        .map(|path| read_initial_noise(path, job, &sizes.vae))
        .transpose()?;
    let mode = match (&job.input, &job.image) {
        (Some((path, strength)), _) => Mode::VideoToVideo {
            video: read_clip(path, job, observer)?,
            strength: *strength,
        },
        (None, Some(images)) => read_images(images, job, sizes, observer)?,
        (None, None) => Mode::TextToVideo,
    };
    Ok(JobSpec {
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone(),
        mode,
        frames: job.frames,
        height: job.height,
        width: job.width,
        steps: job.steps,
        guidance: job.guidance,
        step_cache: job.step_cache.clone(),
        low_noise: job
            .low_noise
            .as_ref()
            .map(|expert| crate::pipeline::ExpertSwitch {
                boundary: expert.boundary,
                guidance: expert.guidance,
            }),
        shift: job.shift,
        sampler: job.sampler,
        seed: job.seed,
        initial_noise,
        tiles: job.tiles,
    })
}

/// Every phase of `pipeline_job`, then the write phase.
fn generate_and_write(
    pipeline_job: &Job,
    session: &mut MemorySession,
    job: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<()> {
    let made = generate(pipeline_job, session, observer)?;
    session.phase("write", |p| -> Result<()> {
        stop_point(observer)?;
        p.note(
            "video",
            &format!("{:?} at {} fps", made.video.dims(), made.fps),
        );
        crate::files::write_clip(
            &job.out,
            &made.video,
            Some(&made.latents),
            made.fps,
            observer,
        )
    })
}

/// Writes the report (the report so far when `outcome` is a failure, which is returned).
fn finish(
    outcome: Result<()>,
    session: &MemorySession,
    job: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<Report> {
    if let Err(err) = outcome {
        // The report so far: what ran, what it measured, where it stopped.
        if let Some(path) = job.compute.report.as_deref() {
            if let Err(report_err) = crate::files::finish_report(session, Some(path)) {
                observer.notice(&format!(
                    "could not write the report so far: {}",
                    crate::error::chain(&report_err)
                ));
            }
        }
        return Err(err);
    }
    crate::files::finish_report(session, job.compute.report.as_deref())
}

/// [`run`], the device opened by `open` from the job's `--device` once the job's files are
/// checked.
fn run_opening(
    mut job: RunOptions,
    observer: &mut dyn Observer,
    open: impl FnOnce(&str) -> Result<candle_core::Device>,
) -> Result<Report> {
    let models = resolve_checked(&mut job, observer)?;
    let device = open(&job.compute.device)?;
    if job.compute.matmul == vpipe_models::ops::linear::MatmulPrecision::Fp8 {
        vpipe_models::ops::fp8::runs_on(&device)
            .map_err(|why| Error::BadInput(format!("--fp8-compute: {why}")))?;
    }
    let meters = vpipe_mem::Meters::for_device(&device)?;
    job.compute.bound_by_device(&device, &meters.read()?);
    let (plan, sizes) = plan_checked(&mut job, &models)?;
    let spec = job_spec(&job, &sizes, observer)?;
    let pipeline_job = Job::planned(spec, models, device, job.compute.dtype, &plan, sizes);
    let mut session =
        MemorySession::with_meters(pipeline_job.device().clone(), meters, job.compute.budget)?;
    let outcome = generate_and_write(&pipeline_job, &mut session, &job, observer);
    finish(outcome, &session, &job, observer)
}

/// The next queued job as the job before it sees it, to decide which of its models stay
/// resident: its plan, and its models' names, files and patches as the pipeline registers
/// them.
pub struct NextJob {
    plan: Plan,
    models: Vec<(&'static str, std::path::PathBuf, String)>,
    dtype: candle_core::DType,
}

/// Plans `job`, queued next, without reading its inputs: its files resolved, its plan made
/// with its budget as given (its own start bounds it by what the device has free then, and
/// gives back what no longer fits).
pub fn plan_next(job: &RunOptions) -> Result<NextJob> {
    let models = resolve_models(job)?;
    let sizes = ModelSizes::of(&models, job.compute.dtype)?;
    let plan = Plan::new(job, &sizes);
    Ok(NextJob {
        plan,
        models: models
            .registered()
            .into_iter()
            .map(|(name, path, patch)| (name, path.to_owned(), patch))
            .collect(),
        dtype: job.compute.dtype,
    })
}

/// `models` (name, file, patch) that `session` holds resident under the same identity, by
/// name with their ids.
fn resident_of<'m>(
    session: &MemorySession,
    models: impl Iterator<Item = (&'m str, &'m Path, &'m str)>,
    dtype: candle_core::DType,
) -> Vec<(&'m str, vpipe_mem::ModelId)> {
    models
        .filter_map(|(name, path, patch)| {
            let id = session.find_registered(path, Some(dtype), patch)?;
            (session.tier(id) != vpipe_mem::Tier::Disk).then_some((name, id))
        })
        .collect()
}

/// Gives back to disk, verified, every resident model but `keep`, in the phase `phase` (none
/// when nothing is resident and there is no `decision` to note), noting the planner's
/// `decision`, why each model is given back (`why_given_back`) and why each is kept.
fn release(
    session: &mut MemorySession,
    (phase, decision): (&str, Option<&str>),
    keep: &[vpipe_mem::ModelId],
    why_given_back: &str,
    why_kept: &str,
) -> Result<()> {
    let resident = session.resident_models();
    if resident.is_empty() && decision.is_none() {
        return Ok(());
    }
    session.phase(phase, |p| -> Result<()> {
        if let Some(decision) = decision {
            p.note("holding", decision);
        }
        for id in resident {
            let name = p.session().model_name(id).to_owned();
            let bytes = p.session().model_bytes(id);
            let size = format!("{}, {bytes} B", vpipe_mem::fmt_bytes(bytes));
            if keep.contains(&id) {
                p.note(
                    "kept",
                    &format!("'{name}' stays resident ({size}): {why_kept}"),
                );
            } else {
                p.note(
                    "given back",
                    &format!("'{name}' ({size}): {why_given_back}"),
                );
                p.offload(id, vpipe_mem::Tier::Disk)?;
            }
        }
        Ok(())
    })
}

/// [`run_on`] in `session`, a memory session that lives across jobs (`vpipe serve`'s worker
/// keeps one): the job is a new record of it (its report, the same as `vpipe run`'s, covers
/// this job alone), takes the models an earlier job left resident when the planner says they
/// fit (noted as carried over; no load), and holds its models to its end where the plan has
/// room. At its end `next` says which job is queued next ([`plan_next`]); the models that job
/// uses stay resident when its plan fits with them held, and every other is given back,
/// verified, in the job's phase "release". A job that fails gives every model back.
pub fn run_in_session(
    mut job: RunOptions,
    session: &mut MemorySession,
    observer: &mut dyn Observer,
    next: &mut dyn FnMut() -> Option<NextJob>,
) -> Result<Report> {
    let models = resolve_checked(&mut job, observer)?;
    let device = session.device().clone();
    // The device's free memory is less the models still resident, which the plan counts in
    // its phases' peaks: they are added back to what the device can give.
    let given = job.compute.budget.compute;
    job.compute.bound_by_device(&device, session.baseline());
    if job.compute.budget.compute != given {
        let resident = session.resident_compute_bytes();
        job.compute.budget.compute = job
            .compute
            .budget
            .compute
            .map(|bound| (bound + resident).min(given.unwrap_or(u64::MAX)));
    }
    let (mut plan, sizes) = plan_checked(&mut job, &models)?;
    let spec = job_spec(&job, &sizes, observer)?;
    session.start_record()?;
    session.set_budget(job.compute.budget);
    let registered = models.registered();
    let offered = resident_of(
        session,
        registered
            .iter()
            .map(|(n, p, patch)| (*n, *p, patch.as_str())),
        job.compute.dtype,
    );
    let names: Vec<&str> = offered.iter().map(|(name, _)| *name).collect();
    plan.decide_holding(&names, true);
    let taken: Vec<_> = offered
        .into_iter()
        .filter(|(name, _)| plan.holding().takes(name))
        .map(|(_, id)| id)
        .collect();
    drop(registered);
    let pipeline_job = Job::planned(spec, models, device, job.compute.dtype, &plan, sizes);
    let outcome = release(
        session,
        ("hold", Some(&plan.holding().summary())),
        &taken,
        "this job does not hold it whole, or its phases before the model's first use have no \
         room for it (the plan's estimates)",
        "this job uses it",
    )
    .and_then(|()| generate_and_write(&pipeline_job, session, &job, observer));
    let kept = match (&outcome, next()) {
        (Ok(()), Some(next)) => {
            let offered = resident_of(
                session,
                next.models
                    .iter()
                    .map(|(n, p, patch)| (*n, p.as_path(), patch.as_str())),
                next.dtype,
            );
            let names: Vec<&str> = offered.iter().map(|(name, _)| *name).collect();
            let holding = next.plan.holding_for(&names, true);
            let kept: Vec<_> = offered
                .into_iter()
                .filter(|(name, _)| holding.takes(name))
                .map(|(_, id)| id)
                .collect();
            let decision = format!("for the next job: {}", holding.summary());
            release(
                session,
                ("release", Some(&decision)),
                &kept,
                "the next queued job does not use it (the same file, dtype and LoRAs), or its \
                 phases before the model's first use have no room for it (the next job's plan: \
                 estimated peaks + held bytes within its allowance)",
                "the next queued job uses the same file, dtype and LoRAs, and its phases before \
                 the model's first use fit beside it (the next job's plan: estimated peaks + \
                 held bytes within its allowance)",
            )
        }
        (Ok(()), None) => release(session, ("release", None), &[], "no job is queued next", ""),
        (Err(_), _) => release(
            session,
            ("release", None),
            &[],
            "the job did not finish",
            "",
        ),
    };
    let outcome = match outcome {
        Ok(()) => kept,
        Err(err) => {
            if let Err(release_err) = kept {
                observer.notice(&format!(
                    "giving the models back after the failure: {}",
                    crate::error::chain(&release_err)
                ));
            }
            Err(err)
        }
    };
    finish(outcome, session, &job, observer)
}
