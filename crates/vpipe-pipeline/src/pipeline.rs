//! The Wan 2.1 pipeline as phases of one memory session: load, lora, text, clip vision
//! (image-to-video), shift, vae encode (video-to-video: the clip; image-to-video: the frames
//! the video is conditioned on), sample, vae decode, write.
//!
//! Every model lives in the residency store; a phase makes resident what it needs, leases it,
//! computes, and gives it back before the phase ends, and the session verifies each move by
//! measurement. So no phase starts with a model resident that it does not use. The shift
//! phase only computes the schedule and touches no device.

use candle_core::{DType, Device, Tensor};
use vpipe_mem::{fmt_bytes, MemorySession, ModelId, Tier};
use vpipe_models::ops::attention::{cudnn_refusal, fp8_attention_refusal, AttentionKernel};
use vpipe_models::ops::linear::MatmulPrecision;
use vpipe_models::tiling::TileSpec;
use vpipe_models::wan::{
    BlockCache, BlockSource, CacheUse, DitConfig, Execution, GuidancePasses, HeldBlocks, StepRun,
    WanModel,
};
use vpipe_sampling::{noise_latents, Sampler, SamplerKind, Schedule};
use vpipe_text::tokenizer::{Encoded, PromptTokenizer};
use vpipe_text::umt5::Config as Umt5Config;

use crate::error::{Context, Error, Result};
use crate::family::{ModelFamily, VaeSizes};
use crate::models::ModelFiles;
use crate::observer::{stop_point, Observer, Step};
use crate::plan::{EncoderPlan, Holding, ModelSizes, Plan, Residency, SamplePlan, StepWork};
use crate::step_cache::{CacheRule, StepCache};
use crate::tiled_vae::{run_tiled, VaeOp};

/// What the pipeline makes.
pub enum Mode {
    /// From noise.
    TextToVideo,
    /// From a clip: `video` [1, 3, T, H, W] in [-1, 1] at the output size, T = 1 + 4k;
    /// `strength` 1 repaints everything, smaller keeps more of the clip.
    VideoToVideo { video: Tensor, strength: f64 },
    /// From a first frame, and a last one for first-last-frame to video: `first`, `last`
    /// [1, 3, H, W] in [-1, 1] at the output size; `clip_pixels` [n, 3, S, S], each frame
    /// given as the CLIP vision encoder's preprocessing made it
    /// ([`crate::clip_pixel_values`]), for a DiT that takes image features (Wan 2.1's; Wan
    /// 2.2's image experts take none).
    ImageToVideo {
        first: Tensor,
        last: Option<Tensor>,
        clip_pixels: Option<Tensor>,
    },
}

impl Mode {
    /// The image frames given: 0 but for image-to-video.
    fn frames_given(&self) -> usize {
        match self {
            Mode::ImageToVideo { last, .. } => 1 + usize::from(last.is_some()),
            _ => 0,
        }
    }
}

/// What a run makes, and in how many steps: everything but its model files and where it
/// computes.
pub struct JobSpec {
    pub prompt: String,
    pub negative_prompt: String,
    pub mode: Mode,
    /// Output frames (1 + 4k), height and width (multiples of 16).
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub guidance: f64,
    /// The step cache; `None`: every step runs the blocks.
    pub step_cache: Option<StepCache>,
    /// Wan 2.2's expert pair: where the low-noise expert takes over, and its guidance.
    pub low_noise: Option<ExpertSwitch>,
    pub shift: f64,
    pub sampler: SamplerKind,
    pub seed: u64,
    /// The initial noise ([1, C, F, H/f, W/f] f32 on the host: 16 channels and f 8 on the Wan
    /// 2.1 VAE, 48 and 16 on Wan 2.2's) instead of the seed's: the
    /// starting latents of text-to-video, the noise added to the clip's latents for
    /// video-to-video (as diffusers' pipelines take their `latents=`).
    pub initial_noise: Option<Tensor>,
    pub tiles: TileSpec,
}

/// Wan 2.2's expert pair: the steps whose timestep is below `boundary` (a share of the 1000
/// training timesteps, diffusers' `boundary_ratio`) go to the low-noise expert, guided at
/// `guidance` (`guidance_scale_2`); the others to the high-noise expert.
#[derive(Debug, Clone, Copy)]
pub struct ExpertSwitch {
    pub boundary: f64,
    pub guidance: f64,
}

/// A planned run: what it makes, its model files, where it computes, and how the text and
/// sample phases hold their models.
pub struct Job {
    spec: JobSpec,
    models: ModelFiles,
    device: Device,
    dtype: DType,
    /// How the text phase holds the encoder.
    text: EncoderPlan,
    /// The text encoder's configuration (from the file's header).
    text_config: Umt5Config,
    /// How the sample phase holds the DiT and runs a step.
    sample: SamplePlan,
    /// Wan 2.2: the same for the low-noise expert.
    sample_low_noise: Option<SamplePlan>,
    /// The DiT's configuration (from a `config.json` or the file's header).
    dit_config: DitConfig,
    /// The VAE's latent space, and what the run's shape depends on in its models.
    vae: VaeSizes,
    family: ModelFamily,
    /// Image-to-video: the CLIP vision encoder's configuration, and how the clip vision
    /// phase holds it.
    clip: Option<(vpipe_models::clip::Config, EncoderPlan)>,
    /// Which models stay resident past the phases that use them (the planner's decision).
    holding: Holding,
}

impl Job {
    /// The job of `spec` on `models`, computing on `device` in `dtype`, with the text and
    /// sample phases planned for `budget` as `vpipe run` plans them.
    pub fn new(
        spec: JobSpec,
        models: ModelFiles,
        device: Device,
        dtype: DType,
        budget: vpipe_mem::Budget,
    ) -> Result<Self> {
        let sizes = ModelSizes::of(&models, dtype)?;
        let on_cuda = device.is_cuda();
        let images = spec.mode.frames_given();
        let work = StepWork::new(
            &sizes,
            (spec.frames, spec.height, spec.width),
            images,
            (spec.guidance, spec.step_cache.as_ref().map(StepCache::rule)),
        );
        let lora = !models.loras.is_empty();
        let kernels = crate::plan::attention_kernels(None, on_cuda, dtype, sizes.dit.head_dim());
        let kernels = (kernels.as_slice(), MatmulPrecision::Exact);
        Ok(Self {
            clip: sizes.clip.as_ref().map(|c| {
                (
                    c.config.clone(),
                    EncoderPlan::clip(c, images, dtype, budget, on_cuda),
                )
            }),
            text: EncoderPlan::text(&sizes, dtype, budget, on_cuda),
            sample: SamplePlan::new(
                (&sizes.dit, sizes.dit_weights),
                dtype,
                work,
                (budget, on_cuda),
                kernels,
                lora,
            ),
            sample_low_noise: sizes
                .dit_low_noise
                .zip(spec.low_noise)
                .map(|(weights, switch)| {
                    let work = StepWork {
                        guidance: switch.guidance,
                        ..work
                    };
                    let lora = !models.loras_low_noise.is_empty();
                    let way = (budget, on_cuda);
                    SamplePlan::new((&sizes.dit, weights), dtype, work, way, kernels, lora)
                }),
            text_config: sizes.text,
            dit_config: sizes.dit,
            vae: sizes.vae,
            family: sizes.family,
            spec,
            models,
            device,
            dtype,
            holding: Holding::default(),
        })
    }

    /// The job of `spec` on `models` as `plan` decided for models of `sizes`.
    pub(crate) fn planned(
        spec: JobSpec,
        models: ModelFiles,
        device: Device,
        dtype: DType,
        plan: &Plan,
        sizes: ModelSizes,
    ) -> Self {
        Self {
            text: plan.text,
            clip: sizes.clip.map(|c| c.config).zip(plan.clip),
            sample: plan.sample,
            sample_low_noise: plan.sample_low_noise,
            text_config: sizes.text,
            dit_config: sizes.dit,
            vae: sizes.vae,
            family: sizes.family,
            spec,
            models,
            device,
            dtype,
            holding: plan.holding().clone(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// The models registered in the store.
struct Registered {
    dit: ModelId,
    dit_low_noise: Option<ModelId>,
    vae: ModelId,
    text: ModelId,
    clip: Option<ModelId>,
}

/// What a run makes, on the host.
pub struct Generated {
    /// The final latents, [1, C, F, H/f, W/f] f32 (see [`JobSpec::initial_noise`]),
    /// normalised as the DiT sees them (before the VAE's `latents_mean/std` are undone).
    pub latents: Tensor,
    /// The decoded video, [1, 3, T, H, W] in [-1, 1], f32.
    pub video: Tensor,
    /// Its frame rate: the model family's (16 for Wan 2.1 and 2.2 A14B, 24 for TI2V-5B).
    pub fps: u32,
}

/// Runs every phase but `write` in `session` and returns what it made; the caller writes the
/// file in a phase of its own, and can write the report so far when a phase fails or Ctrl-C
/// stops the run (checked between phases and steps). The observer sees the long steps.
pub fn generate(
    job: &Job,
    session: &mut MemorySession,
    observer: &mut dyn Observer,
) -> Result<Generated> {
    let models = &job.models;

    // Every checkpoint's header was read when its file was found ([`ModelFiles`]), by a
    // reader that never executes pickle code, before anything loads it.
    let ids = session.phase("load", |p| -> Result<_> {
        let files =
            3 + u64::from(models.clip_vision.is_some()) + u64::from(models.dit_low_noise.is_some());
        let mut progress = Step::start(observer, "load", files);
        // A model of the same file, dtype and patch still resident from an earlier job of the
        // same session is taken as it is (and noted as carried over).
        let mut carried = Vec::new();
        let mut register =
            |name: &'static str, checkpoint: &crate::models::Checkpoint, patch: &str| {
                let (id, resident) =
                    p.register_reusing(name, &checkpoint.inspection, Some(job.dtype), patch)?;
                if resident {
                    carried.push(id);
                }
                progress.advance(name);
                Ok::<_, Error>(id)
            };
        let patch = |loras| crate::models::patch_name(loras);
        let ids = Registered {
            dit: register("dit", &models.dit, &patch(&models.loras))?,
            dit_low_noise: models
                .dit_low_noise
                .as_ref()
                .map(|(checkpoint, _)| {
                    register("dit low noise", checkpoint, &patch(&models.loras_low_noise))
                })
                .transpose()?,
            vae: register("vae", &models.vae, "none")?,
            text: register("text encoder", &models.text_encoder, "none")?,
            clip: models
                .clip_vision
                .as_ref()
                .map(|clip| register("clip vision", clip, "none"))
                .transpose()?,
        };
        let tokenizer = match &models.tokenizer {
            Some(path) => PromptTokenizer::from_tokenizer_json(path).map_err(Error::from),
            None => models.text_encoder.prompt_tokenizer(),
        }
        .context("the prompt tokenizer")?;
        let loras = (
            crate::leased::read_loras(&models.loras)?,
            crate::leased::read_loras(&models.loras_low_noise)?,
        );
        Ok((ids, tokenizer, loras, carried))
    })?;
    let (ids, tokenizer, loras, carried) = (ids.0, ids.1, ids.2, ids.3);

    stop_point(observer)?;
    // See `leased::plan_loras`: merged by the store as the weights are read. A DiT carried
    // over resident was registered with the same patch name: its weights hold these LoRAs.
    session.phase("lora", |p| {
        let patch = |p: &mut vpipe_mem::Phase<'_>, id, checkpoint, loras, files| {
            if carried.contains(&id) {
                p.note(
                    "lora",
                    &format!(
                        "'{}' carried over with the same LoRA files and strengths merged",
                        p.session().model_name(id)
                    ),
                );
                Ok(())
            } else {
                crate::leased::plan_loras(p, id, checkpoint, loras, files)
            }
        };
        patch(p, ids.dit, &models.dit, &loras.0, &models.loras)?;
        match (ids.dit_low_noise, &models.dit_low_noise) {
            (Some(id), Some((checkpoint, _))) => {
                patch(p, id, checkpoint, &loras.1, &models.loras_low_noise)
            }
            _ => Ok(()),
        }
    })?;

    stop_point(observer)?;
    let context = session.phase("text", |p| -> Result<Tensor> {
        let encoded = [&job.spec.prompt, &job.spec.negative_prompt]
            .into_iter()
            // Wan's and diffusers' cleaning first: HTML entities unescaped, whitespace
            // collapsed (`Tom &amp; Jerry` tokenises as `Tom & Jerry`).
            .map(|text| tokenizer.encode(&vpipe_text::tokenizer::clean_prompt(text)))
            .collect::<Result<Vec<Encoded>, _>>()?;
        for (what, e) in ["prompt", "negative prompt"].into_iter().zip(&encoded) {
            let truncated = if e.truncated { " (truncated)" } else { "" };
            p.note(what, &format!("{} tokens{truncated}", e.true_len));
        }
        let (input_ids, mask) = Encoded::to_tensors(&encoded, &job.device)?;
        let context = match job.text.residency {
            Residency::Resident => {
                p.make_resident(ids.text)?;
                let context = {
                    let lease = p.lease(ids.text)?;
                    let encoder = crate::leased::umt5(&lease, None, job.dtype, &job.device)
                        .with_context(|| {
                            format!("text encoder {}", models.text_encoder.path.display())
                        })?;
                    encoder
                        .forward(&input_ids, &mask)?
                        .to_device(&Device::Cpu)?
                };
                give_back(p, &job.holding, ids.text)?;
                context
            }
            Residency::Streamed {
                held_blocks,
                slots,
                source,
                ..
            } => {
                let (spec, embedding) = crate::leased::umt5_block_stream(
                    p.session().tensors(ids.text),
                    job.text_config.num_layers,
                    held_blocks,
                    slots,
                )?;
                streamed(p, ids.text, source, &spec, |_, streamer| {
                    let encoder = crate::leased::umt5_streamed(
                        streamer,
                        &job.text_config,
                        held_blocks,
                        job.dtype,
                        &job.device,
                    )
                    .with_context(|| {
                        format!("text encoder {}", models.text_encoder.path.display())
                    })?;
                    let mut source = crate::leased::StreamedText {
                        streamer,
                        held: held_blocks,
                        embedding,
                    };
                    Ok(encoder
                        .forward_with(&input_ids, &mask, &mut source)?
                        .to_device(&Device::Cpu)?)
                })?
            }
        };
        ensure_finite(&context, "text: the text encoder's output")?;
        p.declare_output("text context (host)", tensor_bytes(&context));
        Ok(context)
    })?;

    stop_point(observer)?;
    let image_features = match (&job.spec.mode, ids.clip, &job.clip) {
        (
            Mode::ImageToVideo {
                clip_pixels: Some(clip_pixels),
                ..
            },
            Some(id),
            Some((config, plan)),
        ) => {
            Some(session.phase("clip vision", |p| -> Result<Tensor> {
                let context = || {
                    let path = models.clip_vision.as_ref().map(|c| c.path.display());
                    format!("clip vision {}", path.expect("registered from its file"))
                };
                let pixels = clip_pixels.to_device(&job.device)?;
                let features = clip_features(
                    p,
                    (id, config, plan.residency),
                    &pixels,
                    (job.dtype, &job.device),
                    &job.holding,
                )
                .with_context(context)?;
                // Both frames' tokens in one row for first-last-frame to video, as the DiT's
                // image embedding takes them.
                let (n, tokens, width) = features.dims3()?;
                let features = features
                    .reshape((1, n * tokens, width))?
                    .to_device(&Device::Cpu)?;
                ensure_finite(&features, "clip vision: the image features")?;
                p.declare_output("image features (host)", tensor_bytes(&features));
                Ok(features)
            })?)
        }
        (
            Mode::ImageToVideo {
                clip_pixels: Some(_),
                ..
            },
            _,
            _,
        ) => {
            return Err(Error::BadInput(
                "image-to-video needs a CLIP vision encoder (--clip-vision)".into(),
            ))
        }
        _ => None,
    };

    let schedule = session.phase("shift", |p| -> Result<Schedule> {
        let full = Schedule::new(job.spec.sampler, job.spec.steps, job.spec.shift)?;
        let schedule = match &job.spec.mode {
            Mode::TextToVideo | Mode::ImageToVideo { .. } => full,
            Mode::VideoToVideo { strength, .. } => full.for_strength(*strength)?,
        };
        p.note(
            "schedule",
            &format!(
                "{} at shift {}: {} of {} steps, sigmas {:?}",
                job.spec.sampler,
                job.spec.shift,
                schedule.steps(),
                job.spec.steps,
                schedule
                    .sigmas()
                    .iter()
                    .map(|s| (s * 1e4).round() / 1e4)
                    .collect::<Vec<_>>()
            ),
        );
        Ok(schedule)
    })?;

    stop_point(observer)?;
    // The clip's latents (video-to-video), or the conditioning video's (image-to-video).
    let encoded =
        match &job.spec.mode {
            Mode::TextToVideo => None,
            Mode::VideoToVideo { video, .. } => {
                Some(encode(job, session, ids.vae, video, observer)?)
            }
            // TI2V: the image alone, one latent frame.
            Mode::ImageToVideo { first, .. } if job.family.first_frame_conditioning() => Some(
                encode(job, session, ids.vae, &first.unsqueeze(2)?, observer)?,
            ),
            Mode::ImageToVideo { first, last, .. } => {
                let video =
                    crate::image_to_video::condition_video(first, last.as_ref(), job.spec.frames)?;
                let latents = encode(job, session, ids.vae, &video, observer)?;
                Some(crate::image_to_video::image_condition(
                    &latents,
                    job.spec.frames,
                    last.is_some(),
                )?)
            }
        };

    stop_point(observer)?;
    let (clean_latents, condition) = match (&job.spec.mode, &encoded) {
        (Mode::VideoToVideo { .. }, Some(latents)) => (Some(latents), Conditioning::None),
        (Mode::ImageToVideo { .. }, Some(image)) if job.family.first_frame_conditioning() => {
            (None, Conditioning::FirstFrame(image))
        }
        (Mode::ImageToVideo { .. }, Some(condition)) => (None, Conditioning::Channels(condition)),
        _ => (None, Conditioning::None),
    };
    let inputs = SampleInputs {
        schedule: &schedule,
        context: &context,
        condition,
        image_features: image_features.as_ref(),
    };
    let mut denoising = Denoising::start(job, &schedule, clean_latents)?;
    let high_noise_steps = match job.spec.low_noise {
        Some(switch) => schedule
            .timesteps()
            .iter()
            .take_while(|&&t| t >= switch.boundary * 1000.0)
            .count(),
        None => schedule.steps(),
    };
    let high_noise = Expert {
        phase: if job.spec.low_noise.is_some() {
            "sample high noise"
        } else {
            "sample"
        },
        id: ids.dit,
        checkpoint: &models.dit,
        plan: &job.sample,
        guidance: job.spec.guidance,
        end: high_noise_steps,
    };
    let low_noise = match (
        ids.dit_low_noise,
        &models.dit_low_noise,
        &job.sample_low_noise,
    ) {
        (Some(id), Some((checkpoint, _)), Some(plan)) => Some(Expert {
            phase: "sample low noise",
            id,
            checkpoint,
            plan,
            guidance: job.spec.low_noise.map_or(job.spec.guidance, |s| s.guidance),
            end: schedule.steps(),
        }),
        _ => None,
    };
    for expert in std::iter::once(&high_noise).chain(low_noise.as_ref()) {
        if denoising.sampler.step_index() >= expert.end {
            // The boundary leaves this expert no step.
            continue;
        }
        stop_point(observer)?;
        session.phase(expert.phase, |p| {
            run_expert(job, p, expert, &inputs, &mut denoising, observer)
        })?;
    }
    // TI2V: the sampler stepped the first frame too; the image's latent takes its place.
    let latents = match condition {
        Conditioning::FirstFrame(image) => {
            vpipe_models::wan::ti2v::blend_first_frame(&denoising.latents, image)?
        }
        _ => denoising.latents,
    };

    stop_point(observer)?;
    let video = session.phase("vae decode", |p| -> Result<Tensor> {
        p.make_resident(ids.vae)?;
        let video = {
            let lease = p.lease(ids.vae)?;
            let vae = crate::leased::wan_vae(&lease, job.dtype, &job.device)?;
            let raw = vae.denormalize_latents(&latents)?;
            run_tiled(p, &vae, VaeOp::Decode, &raw, job.spec.tiles, observer)?
        };
        give_back(p, &job.holding, ids.vae)?;
        ensure_finite(&video, "vae decode: the decoded video")?;
        p.declare_output("video (host)", tensor_bytes(&video));
        Ok(video)
    })?;
    Ok(Generated {
        latents,
        video,
        fps: job.family.fps(),
    })
}

/// The image features of `pixels` ([n, 3, S, S], CLIP-normalised) by the CLIP vision encoder
/// `id`, registered from the header `inspection`, in phase `p`: held as `budget` allows
/// (resident, else its layers streamed, a note says which), in `dtype` on `device`. What
/// `vpipe tensors clip-vision` runs; a run's clip vision phase is planned with the others.
pub fn clip_vision_features(
    p: &mut vpipe_mem::Phase<'_>,
    (id, inspection, config): (
        ModelId,
        &vpipe_ckpt::Inspection,
        &vpipe_models::clip::Config,
    ),
    pixels: &Tensor,
    (dtype, device): (DType, &Device),
    budget: vpipe_mem::Budget,
) -> Result<Tensor> {
    let sizes = crate::plan::ClipSizes::of(inspection, config.clone(), dtype);
    let images = pixels.dim(0)?;
    let plan = EncoderPlan::clip(&sizes, images, dtype, budget, device.is_cuda());
    p.note(
        "clip vision",
        &match plan.residency {
            Residency::Resident => "resident: every layer held".to_owned(),
            streamed => format!(
                "streamed: {}",
                streamed.describe("clip vision", config.num_layers)
            ),
        },
    );
    let holding = Holding::default();
    clip_features(
        p,
        (id, config, plan.residency),
        pixels,
        (dtype, device),
        &holding,
    )
}

/// Gives `id` back to disk after the phase that used it (verified), unless `holding` keeps it
/// resident to the job's end: then a note says so.
fn give_back(p: &mut vpipe_mem::Phase<'_>, holding: &Holding, id: ModelId) -> Result<()> {
    let name = p.session().model_name(id).to_owned();
    if holding.holds_to_end(&name) {
        let bytes = p.session().model_bytes(id);
        p.note(
            "held",
            &format!(
                "'{name}' stays resident to the job's end ({}, {bytes} B): the plan holds it for a \
                 next job, every phase after this one fitting beside it (estimated)",
                fmt_bytes(bytes)
            ),
        );
        return Ok(());
    }
    Ok(p.offload(id, Tier::Disk)?)
}

/// The CLIP vision encoder `id` of configuration `config`, held as `residency` says
/// (resident, or its layers from the held ones on streamed), on `pixels`: the image features,
/// on `device`. Leaves the encoder on disk, unless `holding` keeps it resident.
///
/// # Shapes
/// - `pixels`: [n, 3, S, S], CLIP-normalised.
/// - output: [n, tokens, width].
pub(crate) fn clip_features(
    p: &mut vpipe_mem::Phase<'_>,
    (id, config, residency): (ModelId, &vpipe_models::clip::Config, Residency),
    pixels: &Tensor,
    (dtype, device): (DType, &Device),
    holding: &Holding,
) -> Result<Tensor> {
    match residency {
        Residency::Resident => {
            p.make_resident(id)?;
            let features = {
                let lease = p.lease(id)?;
                crate::leased::clip_vision(&lease, config, dtype, device)?.image_features(pixels)?
            };
            give_back(p, holding, id)?;
            Ok(features)
        }
        Residency::Streamed {
            held_blocks,
            slots,
            source,
            ..
        } => {
            let spec = crate::leased::clip_layer_stream(
                p.session().tensors(id),
                config.num_layers,
                held_blocks,
                slots,
            );
            streamed(p, id, source, &spec, |_, streamer| {
                let encoder = crate::leased::clip_vision_streamed(
                    streamer,
                    config,
                    held_blocks,
                    dtype,
                    device,
                )?;
                let mut layers = crate::leased::StreamedLayers {
                    streamer,
                    held: held_blocks,
                };
                Ok(encoder.image_features_with(pixels, &mut layers)?)
            })
        }
    }
}

/// The "vae encode" phase: `video` ([1, 3, T, H, W] in [-1, 1]) through the VAE in tiles, its
/// latents normalised as the DiT sees them, on the host.
fn encode(
    job: &Job,
    session: &mut MemorySession,
    vae_id: ModelId,
    video: &Tensor,
    observer: &mut dyn Observer,
) -> Result<Tensor> {
    session.phase("vae encode", |p| -> Result<Tensor> {
        p.make_resident(vae_id)?;
        let latents = {
            let lease = p.lease(vae_id)?;
            let vae = crate::leased::wan_vae(&lease, job.dtype, &job.device)?;
            let mean = run_tiled(p, &vae, VaeOp::Encode, video, job.spec.tiles, observer)?;
            vae.normalize_latents(&mean)?
        };
        give_back(p, &job.holding, vae_id)?;
        ensure_finite(&latents, "vae encode: the latents")?;
        p.declare_output("encoded latents (host)", tensor_bytes(&latents));
        Ok(latents)
    })
}

/// Runs `work` with model `id` streamed by `spec` (read into pinned host memory first when the
/// plan streams from it), ends the stream even when `work` fails (its error comes first), and
/// leaves the model on disk.
fn streamed<R>(
    p: &mut vpipe_mem::Phase<'_>,
    id: vpipe_mem::ModelId,
    source: vpipe_mem::StreamSource,
    spec: &vpipe_mem::StreamSpec,
    work: impl FnOnce(&mut vpipe_mem::Phase<'_>, &mut vpipe_mem::Streamer) -> Result<R>,
) -> Result<R> {
    if source == vpipe_mem::StreamSource::PinnedHost {
        p.load(id)?;
    }
    let mut streamer = p.begin_stream(id, spec)?;
    let result = work(p, &mut streamer);
    let ended = p.end_stream(id, streamer);
    let value = result?;
    ended?;
    p.offload(id, Tier::Disk)?;
    Ok(value)
}

/// What each step of the denoising loop reads: the schedule, the text context of the prompt
/// and the negative prompt, and for image-to-video the condition and the image features when
/// the DiT takes them.
#[derive(Clone, Copy)]
struct SampleInputs<'a> {
    schedule: &'a Schedule,
    context: &'a Tensor,
    condition: Conditioning<'a>,
    image_features: Option<&'a Tensor>,
}

/// How image-to-video conditions each step of the DiT.
#[derive(Clone, Copy)]
enum Conditioning<'a> {
    /// Text- and video-to-video: the latents alone.
    None,
    /// Wan 2.1 / 2.2 A14B: the mask and the frames' latents ([1, 4 + C, F, h, w]) follow the
    /// latents' channels.
    Channels(&'a Tensor),
    /// Wan 2.2 TI2V: the image's normalised latent ([1, C, 1, h, w]) replaces the first latent
    /// frame, whose tokens get timestep 0 (`vpipe_models::wan::ti2v`).
    FirstFrame(&'a Tensor),
}

/// The denoising loop's state between its phases (one per expert): the latents and the
/// sampler, on the host.
struct Denoising {
    latents: Tensor,
    sampler: Sampler,
    /// `--cache magcache-calibrate`: the magnitude ratio of each step so far.
    mag_ratios: Vec<f64>,
    /// When the last step so far ended: the next expert of a Wan 2.2 pair measures its
    /// switch from there.
    last_step_end: Option<std::time::Instant>,
}

impl Denoising {
    /// The loop's start: the seeded (or given) noise, alone or added to the clip's latents
    /// `clean_latents` at the schedule's first sigma.
    fn start(job: &Job, schedule: &Schedule, clean_latents: Option<&Tensor>) -> Result<Self> {
        let [b, c, f, h, w] =
            job.vae
                .latent_shape(job.spec.frames, job.spec.height, job.spec.width);
        let shape = (b, c, f, h, w);
        let noise = match &job.spec.initial_noise {
            Some(noise) => noise.clone(),
            None => seeded_noise(job.spec.seed, shape)?,
        };
        let latents = match clean_latents {
            Some(z0) => noise_latents(z0, &noise, schedule.sigmas()[0])?,
            None => noise,
        };
        Ok(Self {
            latents,
            sampler: Sampler::new(schedule.clone()),
            mag_ratios: Vec::new(),
            last_step_end: None,
        })
    }
}

/// A DiT that takes the steps of the denoising loop up to `end` (exclusive) in phase `phase`:
/// the one DiT, or an expert of a Wan 2.2 pair.
struct Expert<'a> {
    phase: &'static str,
    id: ModelId,
    checkpoint: &'a crate::models::Checkpoint,
    plan: &'a SamplePlan,
    guidance: f64,
    end: usize,
}

/// `expert`'s steps in phase `p`, the DiT held as its plan says (resident, or its blocks
/// streamed), given back to disk after.
fn run_expert(
    job: &Job,
    p: &mut vpipe_mem::Phase<'_>,
    expert: &Expert<'_>,
    inputs: &SampleInputs<'_>,
    denoising: &mut Denoising,
    observer: &mut dyn Observer,
) -> Result<()> {
    let context = || format!("dit {}", expert.checkpoint.path.display());
    match expert.plan.residency {
        Residency::Resident => {
            p.make_resident(expert.id)?;
            let model = {
                let lease = p.lease(expert.id)?;
                crate::leased::wan_dit(&lease, Some(&job.dit_config), job.dtype, &job.device)
                    .with_context(context)?
            };
            sample(job, p, model, inputs, None, observer, (expert, denoising))?;
            give_back(p, &job.holding, expert.id)
        }
        Residency::Streamed {
            held_blocks,
            parts,
            slots,
            source,
            ..
        } => {
            let spec = crate::leased::dit_block_stream(
                p.session().tensors(expert.id),
                (job.dit_config.num_layers, parts),
                held_blocks,
                slots,
            )?;
            streamed(p, expert.id, source, &spec, |p, streamer| {
                let model = crate::leased::wan_dit_streamed(
                    streamer,
                    &job.dit_config,
                    held_blocks,
                    job.dtype,
                    &job.device,
                )
                .with_context(context)?;
                let blocks = crate::leased::StreamedBlocks {
                    streamer,
                    held: held_blocks,
                    parts,
                    embeddings: spec.host_rows.clone(),
                };
                sample(
                    job,
                    p,
                    model,
                    inputs,
                    Some(blocks),
                    observer,
                    (expert, denoising),
                )
            })
        }
    }
}

/// The denoising loop of the sample phase with `model` (which the caller drops and offloads):
/// from the seeded (or given) noise, alone or added to the clip's latents, through every step
/// of `schedule`, a reading after each. The blocks `model` does not hold come from `streamed`.
/// Returns the final latents on the host.
fn sample(
    job: &Job,
    p: &mut vpipe_mem::Phase<'_>,
    model: vpipe_models::wan::WanModel,
    inputs: &SampleInputs<'_>,
    mut streamed: Option<crate::leased::StreamedBlocks<'_>>,
    observer: &mut dyn Observer,
    (expert, denoising): (&Expert<'_>, &mut Denoising),
) -> Result<()> {
    let SampleInputs {
        schedule,
        context,
        condition,
        image_features,
    } = *inputs;
    let plan = expert.plan;
    let guidance = expert.guidance;
    if let Some(end) = denoising.last_step_end {
        // The second expert of a pair, ready to take its first step.
        let reading = p.read()?;
        p.note(
            "expert switch",
            &format!(
                "{:.2} s from the previous expert's last step to this expert's first (that \
                 expert {}; this one made ready); {} in the compute tier now ({}, measured)",
                end.elapsed().as_secs_f64(),
                if job.holding.holds_to_end("dit") {
                    "held resident, as the plan holds it for a next job"
                } else {
                    "given back, verified"
                },
                vpipe_mem::fmt_bytes(reading.compute_used()),
                reading.compute_meter()
            ),
        );
        p.record_sample(reading);
    }
    let (_, _, frames, height, width) = denoising.latents.dims5()?;
    let grid = model.token_grid(frames, height, width)?;
    let tokens: usize = grid.iter().product();
    let execution = Execution {
        attention: plan.attention,
        attention_scratch: plan.attention_scratch,
        token_slices: plan.token_slices,
        matmul: plan.matmul,
    };
    p.note(
        "sampling",
        &format!(
            "{tokens} tokens, CFG {} {:?} ({}), {} token slice(s), {}, {} products, {}: \
             estimated activations {}",
            guidance,
            plan.passes,
            match plan.passes {
                GuidancePasses::Batched => "condition and uncondition in one batch",
                GuidancePasses::TwoPasses => "two passes through each block",
                GuidancePasses::Sequential => "two forwards per step",
                GuidancePasses::Single => "one forward per step, the condition only",
            },
            plan.token_slices,
            plan.attention.describe(),
            match plan.matmul {
                MatmulPrecision::Exact => "exact",
                MatmulPrecision::Fp8 => "float8 (e4m3, per-token scales)",
            },
            match plan.residency {
                Residency::Resident => "every block held".to_owned(),
                Residency::Streamed {
                    held_blocks,
                    streamed_blocks,
                    parts,
                    slots,
                    source,
                } => format!(
                    "{held_blocks} blocks held, {streamed_blocks} streamed in {parts} part(s) \
                     through {slots} slots from the {}",
                    match source {
                        vpipe_mem::StreamSource::PinnedHost => "pinned host copy",
                        vpipe_mem::StreamSource::File => "file",
                    }
                ),
            },
            fmt_bytes(plan.activation_bytes),
        ),
    );
    let mut x = denoising.latents.to_device(&job.device)?;
    let sampler = &mut denoising.sampler;
    sampler.move_history_to(&job.device)?;
    let cond = context.narrow(0, 0, 1)?.to_device(&job.device)?;
    let uncond = context.narrow(0, 1, 1)?.to_device(&job.device)?;
    // Image-to-video: the condition is in every step's input, and both passes attend to the
    // image features (as diffusers' pipelines give them).
    let condition = match condition {
        Conditioning::None => None,
        Conditioning::Channels(c) | Conditioning::FirstFrame(c) => Some(c.to_device(&job.device)?),
    };
    let first_frame = matches!(inputs.condition, Conditioning::FirstFrame(_));
    let image_features = image_features
        .map(|f| f.to_device(&job.device)?.to_dtype(job.dtype))
        .transpose()?;
    // The steps that reuse the block cache, decided before the first one from the timesteps'
    // modulations (the model's time embedding of each step's timestep).
    let phase_steps = sampler.step_index()..expert.end;
    let reuse = match (plan.step_cache, &job.spec.step_cache) {
        (Some(CacheRule::Teacache { threshold }), _) => {
            let source: &mut dyn BlockSource = match streamed.as_mut() {
                Some(blocks) => blocks,
                None => &mut HeldBlocks,
            };
            let changes =
                modulation_changes(&model, &schedule.timesteps()[phase_steps.clone()], source)?;
            let reuse = crate::plan::cache_schedule(&changes, threshold);
            let skipped = skipped_steps(phase_steps.clone(), &reuse);
            let changes: Vec<String> = changes[1..].iter().map(|c| format!("{c:.3}")).collect();
            p.note(
                "step cache",
                &format!(
                    "teacache, threshold {threshold}: the blocks skipped at {} of {} steps {:?} \
                     (counted from 1 in the run, as the step notes) (relative changes of the time \
                     modulation from step to step: {})",
                    skipped.len(),
                    reuse.len(),
                    skipped,
                    changes.join(", ")
                ),
            );
            reuse
        }
        (Some(CacheRule::Magcache(settings)), Some(StepCache::MagCache { ratios, .. })) => {
            let per_step = crate::plan::mag_ratios_for(&ratios.values, schedule.steps());
            let reuse = crate::plan::magcache_schedule(&per_step, phase_steps.clone(), settings);
            let skipped = skipped_steps(phase_steps.clone(), &reuse);
            p.note(
                "step cache",
                &format!(
                    "magcache, threshold {}, at most {} steps skipped in a row, the first {} of \
                     the steps kept: the blocks skipped at {} of {} steps {:?} (counted from 1 \
                     in the run, as the step notes) (magnitude ratios of {}, {} per step of the \
                     run: {:?})",
                    settings.threshold,
                    settings.max_skip,
                    settings.retention,
                    skipped.len(),
                    reuse.len(),
                    skipped,
                    ratios.file.display(),
                    per_step.len(),
                    per_step
                ),
            );
            reuse
        }
        _ => Vec::new(),
    };
    let calibrating = plan.step_cache == Some(CacheRule::MagcacheCalibrate);
    // The norms over channels of the condition's residual at the step before (per phase: each
    // expert keeps its own, as each transformer's hook does in diffusers).
    let mut previous_norms: Option<Tensor> = None;
    let mut cache = BlockCache::new();
    let first = sampler.step_index();
    let mut progress = Step::start(observer, expert.phase, (expert.end - first) as u64);
    let mut last_step_end = None;
    while let Some(t) = sampler
        .timestep()
        .filter(|_| sampler.step_index() < expert.end)
    {
        stop_point(progress.observer())?;
        let _span = tracing::info_span!("denoise step", i = sampler.step_index()).entered();
        let started = std::time::Instant::now();
        let (input, timestep) = match &condition {
            Some(image) if first_frame => (
                vpipe_models::wan::ti2v::blend_first_frame(&x, image)?,
                vpipe_models::wan::ti2v::expanded_timestep(t as f32, 1, grid, true, &job.device)?,
            ),
            Some(condition) => (
                Tensor::cat(&[&x, condition], 1)?,
                Tensor::new(&[t as f32], &job.device)?,
            ),
            // TI2V's text-to-video gives every token the step's timestep: one per sample is
            // the same forward bit for bit.
            None => (x.clone(), Tensor::new(&[t as f32], &job.device)?),
        };
        let input = input.to_dtype(job.dtype)?;
        let reused = reuse
            .get(sampler.step_index() - first)
            .copied()
            .unwrap_or(false);
        let step = StepRun {
            passes: plan.passes,
            execution: &execution,
            cache: plan.step_cache.map(|_| {
                let usage = if reused {
                    CacheUse::Reuse
                } else {
                    CacheUse::Refresh
                };
                (&mut cache, usage)
            }),
            image: image_features.as_ref(),
        };
        let mut reading_blocks = streamed
            .as_mut()
            .map(|blocks| crate::leased::ReadAtEachBlock {
                blocks,
                phase: &*p,
                readings: Vec::new(),
            });
        let source: &mut dyn BlockSource = match reading_blocks.as_mut() {
            Some(blocks) => blocks,
            None => &mut HeldBlocks,
        };
        let velocity =
            model.forward_guided_with(&input, &timestep, &cond, &uncond, guidance, step, source)?;
        for reading in reading_blocks.map(|r| r.readings).unwrap_or_default() {
            p.record_sample(reading);
        }
        // Every step of a calibration runs the blocks, so each leaves its residual.
        if let Some(residual) = calibrating
            .then(|| cache.condition_residual())
            .transpose()?
            .flatten()
        {
            let norms = residual
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_keepdim(candle_core::D::Minus1)?
                .sqrt()?;
            let ratio = match &previous_norms {
                Some(previous) => (&norms / (previous + 1e-8)?)?
                    .mean_all()?
                    .to_scalar::<f32>()?,
                None => 1.0,
            };
            denoising.mag_ratios.push(f64::from(ratio));
            previous_norms = Some(norms);
        }
        x = sampler.step(&velocity, &x)?;
        ensure_finite(
            &x,
            &format!(
                "sample: the latents after step {}/{} (t = {t:.1})",
                sampler.step_index(),
                schedule.steps()
            ),
        )?;
        // The meters synchronise the device first, so the step's time is its compute.
        let reading = p.read()?;
        let seconds = started.elapsed().as_secs_f64();
        p.record_sample(reading);
        p.note(
            "step",
            &format!(
                "{}/{} at t = {t:.1}: {seconds:.2} s{}",
                sampler.step_index(),
                schedule.steps(),
                if reused {
                    " (blocks skipped: the cached residual added)"
                } else {
                    ""
                }
            ),
        );
        progress.advance(&format!("t = {t:.1}, {seconds:.2} s"));
        last_step_end = Some(std::time::Instant::now());
    }
    drop(model);
    if let (AttentionKernel::CudnnFp8, Some(why)) = (plan.attention, fp8_attention_refusal()) {
        p.fallback(
            "attention",
            &format!(
                "cuDNN's float8 attention was refused, its exact attention ran instead: {why}"
            ),
        );
    }
    if let (AttentionKernel::Cudnn | AttentionKernel::CudnnFp8, Some(why)) =
        (plan.attention, cudnn_refusal())
    {
        p.fallback(
            "attention",
            &format!("cuDNN's attention was refused, vpipe's fused kernel ran instead: {why}"),
        );
    }
    denoising.last_step_end = last_step_end.or(denoising.last_step_end);
    if calibrating {
        note_mag_ratios(
            p,
            job,
            expert.end == schedule.steps(),
            &denoising.mag_ratios,
        )?;
    }
    // The latents and the sampler's history leave the device with the phase.
    denoising.latents = x.to_device(&Device::Cpu)?;
    denoising.sampler.move_history_to(&Device::Cpu)?;
    p.declare_output("latents (host)", tensor_bytes(&denoising.latents));
    Ok(())
}

/// The steps of `phase_steps` (indices in the run) that `reuse` marks, counted from 1 in the
/// run as the step notes count them.
fn skipped_steps(phase_steps: std::ops::Range<usize>, reuse: &[bool]) -> Vec<usize> {
    phase_steps
        .zip(reuse)
        .filter(|(_, &reused)| reused)
        .map(|(i, _)| i + 1)
        .collect()
}

/// Notes the magnitude ratios measured so far and, at the end of the run (`last`), writes
/// them to `--mag-ratios` when given.
fn note_mag_ratios(
    p: &mut vpipe_mem::Phase<'_>,
    job: &Job,
    last: bool,
    ratios: &[f64],
) -> Result<()> {
    let out = match &job.spec.step_cache {
        Some(StepCache::MagCacheCalibrate { out }) if last => out.as_deref(),
        _ => None,
    };
    if let Some(file) = out {
        crate::step_cache::write_mag_ratios(file, ratios, job.spec.steps)?;
    }
    p.note(
        "magcache calibration",
        &format!(
            "magnitude ratios of the condition's block residual from step to step (mean over \
             tokens of |residual| / |residual at the step before|, 1 at a phase's first step), \
             {} steps: {ratios:?}{}",
            ratios.len(),
            match out {
                Some(file) => format!("; written to {} (--mag-ratios)", file.display()),
                None => String::new(),
            }
        ),
    );
    Ok(())
}

/// For each timestep but the first, the relative change (mean absolute difference over mean
/// magnitude) of the model's time modulation from the timestep before; 0 for the first. The
/// embeddings come from `source` when the model does not hold them.
fn modulation_changes(
    model: &WanModel,
    timesteps: &[f64],
    source: &mut dyn BlockSource,
) -> Result<Vec<f64>> {
    let timesteps: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let modulations = model.time_modulations(&timesteps, source)?;
    let mut changes = vec![0.0];
    for pair in modulations.windows(2) {
        let change = (&pair[1] - &pair[0])?
            .abs()?
            .mean_all()?
            .to_scalar::<f32>()?;
        let size = pair[0].abs()?.mean_all()?.to_scalar::<f32>()?;
        changes.push(f64::from(change) / f64::from(size).max(f64::MIN_POSITIVE));
    }
    Ok(changes)
}

/// Fails when `t` holds a NaN or an infinity, naming `what` (phase and step): one such value
/// spreads through every later step and the video comes out black, so the run stops where it
/// first appears. One reduction on the tensor's device; a sum of absolute values is finite
/// exactly when every element is (short of an overflow no real latent comes near).
fn ensure_finite(t: &Tensor, what: &str) -> Result<()> {
    let sum = t
        .to_dtype(DType::F32)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    if sum.is_finite() {
        return Ok(());
    }
    Err(Error::NonFinite(format!(
        "{what}: NaN or infinite values; the checkpoint may hold non-finite weights, or \
         --cfg / --shift may be too large"
    )))
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// Standard normal noise of `shape` from `seed`: SplitMix64 uniforms through Box–Muller, on
/// the host, so that a seed gives the same noise on every device and build.
fn seeded_noise(seed: u64, shape: (usize, usize, usize, usize, usize)) -> Result<Tensor> {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // (0, 1]: never 0, so the logarithm below is finite.
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let n = shape.0 * shape.1 * shape.2 * shape.3 * shape.4;
    let mut values = Vec::with_capacity(n + 1);
    while values.len() < n {
        let (u1, u2) = (uniform(), uniform());
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        values.push((radius * angle.cos()) as f32);
        values.push((radius * angle.sin()) as f32);
    }
    values.truncate(n);
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeded_noise_is_standard_normal_and_repeatable() {
        let a = super::seeded_noise(7, (1, 16, 3, 8, 8)).unwrap();
        let b = super::seeded_noise(7, (1, 16, 3, 8, 8)).unwrap();
        let c = super::seeded_noise(8, (1, 16, 3, 8, 8)).unwrap();
        let v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_ne!(v, c.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
