//! Command-line flags in two layers: what clap parses (raw strings and numbers), and the
//! validated settings each command runs with.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use vpipe_models::ops::attention::AttentionKernel;
use vpipe_pipeline::Error::BadInput;
use vpipe_pipeline::{require_files, Compute, Error, ImageInputs, RunOptions};

/// Wan 2.1 video diffusion under a memory budget that vpipe keeps and proves.
///
/// Every run measures memory at every phase boundary and verifies that each offload really
/// freed what it should have; the report says what was resident where, measured.
#[derive(Parser, Debug)]
#[command(name = "vpipe", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run the built-in demonstration job on any CPU in about a minute: a small built-in model
    /// goes through the pipeline's phases, and the run writes report.json and memory.svg.
    Demo(DemoArgs),
    /// Generate a video: text-to-video, image-to-video (--image, and --last-image for
    /// first-last-frame to video) or video-to-video (--input), with LoRAs, under a memory
    /// budget. Flags can come from a TOML file (--pipeline).
    #[command(args_override_self = true)]
    Run(PipelineArgs),
    /// Dry run of `run`: what will be resident in each phase, tile sizes, attention chunk,
    /// estimated peak, and whether it fits the budget; also for presets without weights.
    #[command(args_override_self = true)]
    Plan(PipelineArgs),
    /// Describe a checkpoint without loading it: family (Wan DiT T2V/I2V, Wan VAE, umT5, CLIP
    /// vision, LoRA), key layout (original Wan/ComfyUI or diffusers), detected config, dtypes,
    /// parameter count and bytes. Reads .safetensors headers and .pth archives only.
    Inspect(InspectArgs),
    /// Serve jobs over HTTP, one at a time on one device, with a web page: the settings of
    /// `run` as JSON, images as uploads, progress, cancel, the video, report and chart of each
    /// job, and the server's memory at every job boundary.
    Serve(ServeArgs),
    /// Run one component on tensors stored in safetensors files, for parity checks and
    /// debugging, with the same memory accounting as a full run (vae-encode, vae-decode, dit,
    /// text-encode, schedule).
    Tensors(TensorsArgs),
}

/// Flags of `vpipe demo`.
#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Folder for the demo's outputs (report.json, memory.svg, the built-in weights).
    #[arg(long, default_value = "vpipe-demo")]
    out: PathBuf,
    /// Where to compute: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Memory budget of the compute tier (device memory, or host heap on the CPU), e.g. 8GiB.
    #[arg(long)]
    vram_budget: Option<String>,
    /// Denoising steps of the sampling phase.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Seed of the built-in model's weights and inputs.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// What the demo makes: v2v (video-to-video from a built-in clip), i2v (image-to-video
    /// from its first frame) or t2v (text-to-video); default v2v, t2v with `--model wan2.2`
    /// or `wan2.2-ti2v`.
    #[arg(long)]
    mode: Option<String>,
    /// The built-in model: wan2.1 (one DiT; CLIP vision for i2v), wan2.2 (an A14B-style
    /// expert pair: a high-noise and a low-noise DiT, switched at the boundary) or wan2.2-ti2v
    /// (a TI2V-5B-style DiT on a Wan 2.2 VAE: 48 latent channels, 16× per side, a timestep
    /// per token; i2v keeps the image as the first latent frame; 24 fps).
    #[arg(long, default_value = "wan2.1")]
    model: String,
}

/// What `vpipe demo` makes a video from: the prompt alone (text-to-video), the built-in clip
/// (video-to-video) or its first frame (image-to-video).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DemoStart {
    Prompt,
    Clip,
    FirstFrame,
}

/// Validated settings of `vpipe demo`.
pub(crate) struct Demo {
    pub(crate) out: PathBuf,
    pub(crate) device: String,
    pub(crate) budget: vpipe_mem::Budget,
    pub(crate) steps: usize,
    pub(crate) seed: u64,
    pub(crate) mode: DemoStart,
    /// Whether the built-in model is a Wan 2.2 expert pair.
    pub(crate) expert_pair: bool,
    /// Whether the built-in model is a Wan 2.2 TI2V DiT with the Wan 2.2 VAE.
    pub(crate) ti2v: bool,
}

/// Parses a `--flag SIZE` value.
fn parse_budget(flag: &str, value: &Option<String>) -> Result<Option<u64>, Error> {
    value
        .as_deref()
        .map(|text| {
            vpipe_mem::parse_bytes(text).ok_or_else(|| {
                BadInput(format!(
                    "{flag} {text}: expected a size such as 8GiB, 512MiB or 1.5GB"
                ))
            })
        })
        .transpose()
}

impl DemoArgs {
    pub(crate) fn validate(self) -> Result<Demo, Error> {
        if self.steps == 0 || self.steps > 1000 {
            return Err(BadInput(format!(
                "--steps {}: expected 1 to 1000",
                self.steps
            )));
        }
        if let Ok(meta) = std::fs::metadata(&self.out) {
            if !meta.is_dir() {
                return Err(BadInput(format!(
                    "--out {}: exists and is not a folder; the demo writes a folder (weights, \
                     demo.mp4, report.json, memory.svg)",
                    self.out.display()
                )));
            }
        }
        let (expert_pair, ti2v) = match self.model.as_str() {
            "wan2.1" => (false, false),
            "wan2.2" => (true, false),
            "wan2.2-ti2v" => (false, true),
            other => {
                return Err(BadInput(format!(
                    "--model {other}: expected wan2.1, wan2.2 or wan2.2-ti2v"
                )))
            }
        };
        let default_mode = if expert_pair || ti2v { "t2v" } else { "v2v" };
        let mode = match self.mode.as_deref().unwrap_or(default_mode) {
            "t2v" => DemoStart::Prompt,
            "v2v" => DemoStart::Clip,
            "i2v" => DemoStart::FirstFrame,
            other => {
                return Err(BadInput(format!(
                    "--mode {other}: expected v2v, i2v or t2v"
                )))
            }
        };
        Ok(Demo {
            mode,
            expert_pair,
            ti2v,
            out: self.out,
            device: self.device,
            budget: vpipe_mem::Budget {
                compute: parse_budget("--vram-budget", &self.vram_budget)?,
                host: None,
            },
            steps: self.steps,
            seed: self.seed,
        })
    }
}

/// Flags of `vpipe serve`.
#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Address and port to listen on. Loopback by default: anyone who reaches the port can
    /// run jobs on this machine's device.
    #[arg(long, default_value = "127.0.0.1:8190")]
    listen: String,
    /// The models folder (a ComfyUI `models/` folder or any folder of Wan files): a job's model
    /// paths are relative to it, and a job reads no other model files.
    #[arg(long)]
    models: PathBuf,
    /// The outputs folder (made if missing): each job writes `job-N/` inside it (its uploads,
    /// video.mp4, report.json, report.svg); the server writes server-memory.json.
    #[arg(long, default_value = "vpipe-outputs")]
    outputs: PathBuf,
    /// Where every job computes: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Every job's --vram-budget, e.g. 24GiB.
    #[arg(long)]
    vram_budget: Option<String>,
    /// Every job's --ram-budget, e.g. 48GiB.
    #[arg(long)]
    ram_budget: Option<String>,
    /// The largest request taken, uploads included (larger ones get 413).
    #[arg(long, default_value = "64MiB")]
    max_request: String,
    /// How many jobs may wait (more get 503).
    #[arg(long, default_value_t = 64)]
    max_queued: usize,
}

impl ServeArgs {
    pub(crate) fn validate(self) -> Result<vpipe_serve::ServeConfig, Error> {
        let listen = self.listen.parse().map_err(|e| {
            BadInput(format!(
                "--listen {}: {e}; expected ADDRESS:PORT, e.g. 127.0.0.1:8190",
                self.listen
            ))
        })?;
        parse_budget("--vram-budget", &self.vram_budget)?;
        parse_budget("--ram-budget", &self.ram_budget)?;
        let max_request = parse_budget("--max-request", &Some(self.max_request))?
            .unwrap_or_default()
            .try_into()
            .map_err(|_| BadInput("--max-request: too large for this machine".into()))?;
        if self.max_queued == 0 {
            return Err(BadInput("--max-queued: at least 1".into()));
        }
        if !self.models.is_dir() {
            return Err(BadInput(format!(
                "--models {}: not a folder",
                self.models.display()
            )));
        }
        std::fs::create_dir_all(&self.outputs)
            .map_err(|e| BadInput(format!("--outputs {}: {e}", self.outputs.display())))?;
        Ok(vpipe_serve::ServeConfig {
            listen,
            models: self.models,
            outputs: self.outputs,
            device: self.device,
            vram_budget: self.vram_budget,
            ram_budget: self.ram_budget,
            max_request_bytes: max_request,
            max_queued: self.max_queued,
            max_kept: 1000,
        })
    }
}

/// Flags of `vpipe run` and `vpipe plan`.
#[derive(Args, Debug)]
pub(crate) struct PipelineArgs {
    /// A TOML file with any of these flags as keys (`prompt = "..."`, `model_dir = "..."`,
    /// `steps = 30`, `lora = ["a.safetensors:0.8"]`); flags on the command line win.
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Folder with the model files (a ComfyUI `models/` folder or any folder holding one Wan
    /// DiT, one Wan VAE and one umT5 file; each is recognised from its tensor names).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// The DiT file (overrides the one found in --model-dir).
    #[arg(long)]
    dit: Option<PathBuf>,
    /// A diffusers `transformer/config.json` for the DiT (default: from its tensor shapes).
    #[arg(long)]
    dit_config: Option<PathBuf>,
    /// Wan 2.2 expert pair: the low-noise expert's DiT file (ComfyUI's `*_low_noise_*`); --dit
    /// is then the high-noise expert, which takes the steps down to --boundary.
    #[arg(long)]
    dit_low_noise: Option<PathBuf>,
    /// A diffusers `transformer_2/config.json` for the low-noise expert.
    #[arg(long)]
    dit_low_noise_config: Option<PathBuf>,
    /// Where the low-noise expert takes over, as a share of the 1000 training timesteps
    /// (diffusers' `boundary_ratio`): 0.875 for text-to-video, 0.9 for image-to-video.
    #[arg(long)]
    boundary: Option<f64>,
    /// The low-noise expert's guidance scale (default: --cfg; diffusers' `guidance_scale_2`).
    #[arg(long)]
    cfg_low_noise: Option<f64>,
    /// A LoRA for the low-noise expert, FILE:STRENGTH; repeat for several (--lora patches the
    /// high-noise expert, as ComfyUI's two model chains do).
    #[arg(long)]
    lora_low_noise: Vec<String>,
    /// The VAE file (overrides the one found in --model-dir).
    #[arg(long)]
    vae: Option<PathBuf>,
    /// The umT5 text-encoder file (overrides the one found in --model-dir).
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// A `tokenizer.json` (default: the `spiece_model` inside the text-encoder file, or a
    /// tokenizer.json in --model-dir).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Negative prompt.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Input clip for video-to-video: H.264 MP4, GIF or a folder of PNG frames (resized to
    /// cover --size, centre-cropped, the first --frames frames), or a safetensors file with
    /// `video_in` [1,3,T,H,W] in [-1,1] at the output size.
    #[arg(long)]
    input: Option<PathBuf>,
    /// How much of the input clip to repaint (video-to-video), above 0 up to 1.
    #[arg(long, default_value_t = 0.7)]
    strength: f64,
    /// Image-to-video: the first frame, a PNG or JPEG (resized to cover --size and
    /// centre-cropped, with a notice). Needs an image-to-video DiT and, for Wan 2.1's, a CLIP
    /// vision encoder; Wan 2.2 TI2V-5B keeps the image as the first latent frame, no CLIP.
    #[arg(long)]
    image: Option<PathBuf>,
    /// First-last-frame to video: the last frame (with --image and a first-last-frame DiT).
    #[arg(long)]
    last_image: Option<PathBuf>,
    /// The CLIP vision encoder of image-to-video (ComfyUI's clip_vision_h.safetensors or
    /// transformers' CLIPVisionModel; overrides the one found in --model-dir).
    #[arg(long)]
    clip_vision: Option<PathBuf>,
    /// A transformers `config.json` for the CLIP vision encoder (default: from its tensor
    /// shapes, with ViT-H/14's 80-wide heads).
    #[arg(long)]
    clip_vision_config: Option<PathBuf>,
    /// LoRA file and strength, FILE:STRENGTH (strength 1 if left out); repeat for several.
    #[arg(long)]
    lora: Vec<String>,
    /// Frame size WIDTHxHEIGHT (multiples of 16; of 32 for Wan 2.2 TI2V-5B, whose VAE makes
    /// latents 16× smaller per side).
    #[arg(long, default_value = "832x480")]
    size: String,
    /// Number of frames (4k+1). Default 81; with --input, the clip's length cut down to 4k+1
    /// (at most 81).
    #[arg(long)]
    frames: Option<usize>,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 6.0)]
    cfg: f64,
    /// Flow shift (default 8; for a Wan 2.2 expert pair 12, or 5 with --image; 5 for Wan 2.2
    /// TI2V-5B).
    #[arg(long)]
    shift: Option<f64>,
    /// Sampler: euler or unipc.
    #[arg(long, default_value = "unipc")]
    sampler: String,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The initial noise from a safetensors file instead of the seed's: key `noise`,
    /// [1, 16, F, HEIGHT/8, WIDTH/8] with F = 1 + (frames-1)/4 ([1, 48, F, HEIGHT/16,
    /// WIDTH/16] on the Wan 2.2 VAE of TI2V-5B). Text-to-video starts from it;
    /// video-to-video adds it to the clip's latents (diffusers' `latents=` and its drawn
    /// noise), so a run can be compared with a reference run on the same noise.
    #[arg(long)]
    initial_noise: Option<PathBuf>,
    /// Step cache: teacache skips the transformer blocks on steps where the timestep's
    /// modulation changed little since the blocks last ran (their accumulated relative change
    /// below --cache-threshold), adding what the blocks added then; magcache skips them while
    /// the accumulated error of the model's magnitude ratios (--mag-ratios) stays under
    /// --cache-threshold, as diffusers' MagCache; magcache-calibrate runs every step and
    /// measures those ratios. Off by default (exact).
    #[arg(long)]
    cache: Option<String>,
    /// The step cache's threshold: on the accumulated relative change for teacache (default
    /// 0.1; 0: no step skipped), on the accumulated error for magcache (default 0.06).
    #[arg(long)]
    cache_threshold: Option<f64>,
    /// magcache: the most steps in a row that skip the blocks (default 3).
    #[arg(long)]
    cache_max_skip: Option<usize>,
    /// magcache: the share of the first steps that always run the blocks (default 0.2).
    #[arg(long)]
    cache_retention: Option<f64>,
    /// magcache: the model's magnitude ratios, a JSON array (or an object with a `mag_ratios`
    /// array), interpolated to --steps; magcache-calibrate writes them there.
    #[arg(long)]
    mag_ratios: Option<PathBuf>,
    /// VAE tile side in pixels (multiple of 8, at most 512; of 16 for the Wan 2.2 VAE).
    #[arg(long, default_value_t = 256)]
    tile: usize,
    /// VAE tile placement: balanced (the fewest equal tiles no larger than --tile) or
    /// diffusers (a tile every stride from the corner, edge tiles cut: diffusers' result).
    #[arg(long, default_value = "balanced")]
    tile_layout: vpipe_models::tiling::TileLayout,
    /// Output: .mp4 (H.264, 16 fps), .gif, a folder of PNG frames (no extension), or
    /// .safetensors (key `video`, [1,3,T,H,W] in [-1,1]).
    #[arg(long, default_value = "vpipe-out.mp4")]
    out: PathBuf,
    /// A ComfyUI workflow in API format (ComfyUI's "Export (API)") made of the native Wan
    /// nodes: its loaders, prompts, size, length, sampler settings and decoder tile become the
    /// run's (flags given with it apply where the workflow is silent).
    #[arg(long)]
    comfy_workflow: Option<PathBuf>,
    /// ComfyUI's `models/` folder, where the workflow's loaders find their files (default:
    /// --model-dir).
    #[arg(long)]
    comfy_models: Option<PathBuf>,
    /// ComfyUI's `input/` folder, where LoadImage and LoadVideo find theirs (default: the
    /// `input` folder next to the models folder).
    #[arg(long)]
    comfy_input: Option<PathBuf>,
    /// `plan` only: plan for a named architecture without weight files (wan2.1-t2v-14b,
    /// wan2.1-t2v-1.3b, wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p, wan2.1-flf2v-14b-720p,
    /// wan2.2-t2v-a14b, wan2.2-i2v-a14b, wan2.2-ti2v-5b; with umT5-XXL, the Wan 2.1 VAE (Wan
    /// 2.2's for wan2.2-ti2v-5b: 48 latent channels, 16× per side, sizes multiples of 32) and,
    /// for the Wan 2.1 image models, CLIP ViT-H/14).
    #[arg(long)]
    pub(crate) preset: Option<String>,
    /// `plan` only: print the plan as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

impl PipelineArgs {
    /// Validates the flags of `run` (`for_plan` false: a prompt is required, a preset is not
    /// allowed) or `plan`.
    pub(crate) fn validate(self, for_plan: bool) -> Result<RunOptions, Error> {
        if !for_plan && self.preset.is_some() {
            return Err(BadInput(
                "--preset: a preset has no weights to run; use it with `vpipe plan`".into(),
            ));
        }
        if self.last_image.is_some() && self.image.is_none() {
            return Err(BadInput(
                "--last-image: needs --image (the first frame) as well".into(),
            ));
        }
        if self.image.is_some() && self.input.is_some() {
            return Err(BadInput(
                "--image and --input: choose one, image-to-video or video-to-video".into(),
            ));
        }
        let prompt = match self.prompt {
            Some(prompt) => prompt,
            None if for_plan || self.comfy_workflow.is_some() => String::new(),
            None => return Err(BadInput("--prompt: required".into())),
        };
        let step_cache = vpipe_pipeline::StepCache::from_flags(vpipe_pipeline::StepCacheFlags {
            cache: self.cache.as_deref(),
            threshold: self.cache_threshold,
            max_skip: self.cache_max_skip,
            retention: self.cache_retention,
            mag_ratios: self.mag_ratios.as_deref(),
        })?;
        let (width, height) = self
            .size
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse::<usize>().ok()?, h.parse::<usize>().ok()?)))
            .filter(|&(w, h)| {
                (16..=MAX_SIDE).contains(&w)
                    && (16..=MAX_SIDE).contains(&h)
                    && w % 16 == 0
                    && h % 16 == 0
            })
            .ok_or_else(|| {
                BadInput(format!(
                    "--size {}: expected WIDTHxHEIGHT, both multiples of 16 from 16 to \
                     {MAX_SIDE} (e.g. 832x480)",
                    self.size
                ))
            })?;
        let frames = match (self.frames, &self.input) {
            (Some(frames), _) => {
                if frames == 0 || !(frames - 1).is_multiple_of(4) || frames > MAX_FRAMES {
                    return Err(BadInput(format!(
                        "--frames {frames}: expected 4k+1 (1, 5, 9, ..., 81), at most {MAX_FRAMES}"
                    )));
                }
                frames
            }
            (None, Some(input)) => frames_of_clip(input)?,
            (None, None) => DEFAULT_FRAMES,
        };
        if self.last_image.is_some() && frames < 5 {
            return Err(BadInput(format!(
                "--last-image with --frames {frames}: a first and a last frame need at least 5 \
                 frames"
            )));
        }
        // Wan's latents are 4× shorter and 8× smaller per side, cut in 1×2×2 patches.
        let tokens = (1 + (frames - 1) / 4) * (height / 16) * (width / 16);
        if tokens > vpipe_models::wan::dit::MAX_TOKENS {
            return Err(BadInput(format!(
                "--size {}x{} --frames {frames}: {tokens} tokens per sample; the DiT takes at most \
                 {} (e.g. 1280x720 at 81 frames is 75600)",
                width,
                height,
                vpipe_models::wan::dit::MAX_TOKENS
            )));
        }
        if self.steps == 0 || self.steps > 1000 {
            return Err(BadInput(format!(
                "--steps {}: expected 1 to 1000",
                self.steps
            )));
        }
        if !(0.0..=MAX_GUIDANCE).contains(&self.cfg) {
            return Err(BadInput(format!(
                "--cfg {}: expected a number from 0 to {MAX_GUIDANCE}",
                self.cfg
            )));
        }
        if let Some(shift) = self.shift {
            check_shift(shift)?;
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(BadInput(format!(
                "--strength {}: expected above 0, at most 1",
                self.strength
            )));
        }
        let sampler = self
            .sampler
            .parse()
            .map_err(|e| BadInput(format!("--sampler {}: {e}", self.sampler)))?;
        let tiles = vpipe_models::tiling::TileSpec {
            tile: self.tile,
            stride: vpipe_models::tiling::default_stride(self.tile),
            layout: self.tile_layout,
        };
        tiles
            .validate()
            .map_err(|e| BadInput(format!("--tile {}: {e}", self.tile)))?;
        let loras = self
            .lora
            .iter()
            .map(|spec| parse_lora_spec("--lora", spec))
            .collect::<Result<Vec<_>, Error>>()?;
        for (flag, path) in [
            ("--dit", &self.dit),
            ("--vae", &self.vae),
            ("--text-encoder", &self.text_encoder),
            ("--tokenizer", &self.tokenizer),
            ("--initial-noise", &self.initial_noise),
            ("--clip-vision", &self.clip_vision),
        ] {
            if let Some(path) = path {
                require_files(&[(flag, path)])?;
            }
        }
        for (flag, path) in [("--image", &self.image), ("--last-image", &self.last_image)] {
            if let Some(path) = path {
                check_image_path(flag, path)?;
            }
        }
        if let Some(input) = &self.input {
            if let Some(problem) = vpipe_pipeline::input_file_or_folder_problem(input) {
                return Err(BadInput(format!("--input {}: {problem}", input.display())));
            }
        }
        if let Some(dir) = &self.model_dir {
            if !dir.is_dir() {
                return Err(BadInput(format!(
                    "--model-dir {}: no such folder",
                    dir.display()
                )));
            }
        }
        let dit_config = read_dit_config("--dit-config", self.dit_config.as_deref())?;
        let pair_flags = [
            ("--dit-low-noise", self.dit_low_noise.is_some()),
            (
                "--dit-low-noise-config",
                self.dit_low_noise_config.is_some(),
            ),
            ("--boundary", self.boundary.is_some()),
            ("--cfg-low-noise", self.cfg_low_noise.is_some()),
            ("--lora-low-noise", !self.lora_low_noise.is_empty()),
        ];
        let low_noise = match pair_flags.iter().find(|(_, given)| *given) {
            None => None,
            Some((flag, _)) => {
                if self.dit_low_noise.is_none() && self.model_dir.is_none() {
                    return Err(BadInput(format!(
                        "{flag}: for a Wan 2.2 expert pair; give the low-noise expert with \
                         --dit-low-noise (or a --model-dir holding both experts)"
                    )));
                }
                if let Some(dit) = &self.dit_low_noise {
                    require_files(&[("--dit-low-noise", dit)])?;
                }
                let boundary =
                    self.boundary
                        .unwrap_or(vpipe_pipeline::LowNoiseExpert::default_boundary(
                            self.image.is_some(),
                        ));
                if !(boundary > 0.0 && boundary < 1.0) {
                    return Err(BadInput(format!(
                        "--boundary {boundary}: expected a number between 0 and 1 (0.875: the \
                         low-noise expert takes the steps below timestep 875)"
                    )));
                }
                let guidance = self.cfg_low_noise.unwrap_or(self.cfg);
                if !(0.0..=MAX_GUIDANCE).contains(&guidance) {
                    return Err(BadInput(format!(
                        "--cfg-low-noise {guidance}: expected a number from 0 to {MAX_GUIDANCE}"
                    )));
                }
                Some(vpipe_pipeline::LowNoiseExpert {
                    dit: self.dit_low_noise.clone(),
                    config: read_dit_config(
                        "--dit-low-noise-config",
                        self.dit_low_noise_config.as_deref(),
                    )?,
                    boundary,
                    guidance,
                    loras: self
                        .lora_low_noise
                        .iter()
                        .map(|spec| parse_lora_spec("--lora-low-noise", spec))
                        .collect::<Result<_, Error>>()?,
                })
            }
        };
        let clip_vision_config =
            read_clip_config("--clip-vision-config", self.clip_vision_config.as_deref())?;
        let comfy = match &self.comfy_workflow {
            None => None,
            Some(workflow) => {
                require_files(&[("--comfy-workflow", workflow)])?;
                let models = self
                    .comfy_models
                    .clone()
                    .or_else(|| self.model_dir.clone())
                    .ok_or_else(|| {
                        BadInput(
                            "--comfy-workflow: give ComfyUI's models folder with --comfy-models"
                                .into(),
                        )
                    })?;
                let input = self
                    .comfy_input
                    .clone()
                    .unwrap_or_else(|| models.parent().unwrap_or(Path::new(".")).join("input"));
                Some((workflow.clone(), models, input))
            }
        };
        let mut options = RunOptions {
            model_dir: self.model_dir,
            dit: self.dit,
            dit_config,
            vae: self.vae,
            text_encoder: self.text_encoder,
            tokenizer: self.tokenizer,
            prompt,
            negative_prompt: self.negative_prompt,
            input: self.input.map(|p| (p, self.strength)),
            low_noise,
            image: self.image.map(|first| ImageInputs {
                first,
                last: self.last_image,
            }),
            clip_vision: self.clip_vision,
            clip_vision_config,
            loras,
            width,
            height,
            frames,
            steps: self.steps,
            guidance: self.cfg,
            step_cache,
            shift: self.shift.unwrap_or(vpipe_pipeline::DEFAULT_SHIFT),
            shift_given: self.shift.is_some(),
            sampler,
            seed: self.seed,
            initial_noise: self.initial_noise,
            tiles,
            out: self.out,
            compute: self.compute.validate()?,
        };
        if let Some((workflow, models, input)) = comfy {
            let folders = vpipe_pipeline::ComfyFolders {
                models: &models,
                input: &input,
            };
            vpipe_pipeline::apply_comfy_workflow(&workflow, &folders, &mut options)?;
            // A workflow's video, without --frames: its length, as for --input.
            if let (None, Some((input, _))) = (self.frames, &options.input) {
                options.frames = frames_of_clip(input)?;
            }
        }
        Ok(options)
    }
}

/// A `--lora FILE[:STRENGTH]` value. A file whose own name holds a colon is taken whole when it
/// exists and what follows its last colon is not a number.
fn parse_lora_spec(flag: &str, spec: &str) -> Result<(PathBuf, f64), Error> {
    let (path, strength) = match spec.rsplit_once(':') {
        Some((path, text)) => match text.trim().parse::<f64>() {
            Ok(strength) => (path, strength),
            Err(_) if Path::new(spec).is_file() => (spec, 1.0),
            Err(_) => {
                return Err(BadInput(format!(
                    "{flag} {spec}: expected FILE or FILE:STRENGTH, and '{text}' is not a number"
                )))
            }
        },
        None => (spec, 1.0),
    };
    if !strength.is_finite() || strength.abs() > MAX_LORA_STRENGTH {
        return Err(BadInput(format!(
            "{flag} {spec}: the strength must be a finite number from -{MAX_LORA_STRENGTH} to \
             {MAX_LORA_STRENGTH}"
        )));
    }
    let path = PathBuf::from(path);
    require_files(&[(flag, &path)])?;
    Ok((path, strength))
}

/// Largest LoRA strength taken: far beyond any useful one (0 to 2 in practice), small enough
/// that a merged weight cannot overflow to infinity.
const MAX_LORA_STRENGTH: f64 = 100.0;

/// Largest frame side: beyond 4K, which no Wan model was trained anywhere near; it bounds
/// every size computed from the frame before anything is allocated.
pub(crate) const MAX_SIDE: usize = 4096;
/// Most frames in one run (4k+1): 62 s at 16 fps, far beyond Wan's trained 81.
pub(crate) const MAX_FRAMES: usize = 1001;
/// Largest guidance scale taken (useful values are 1 to 20).
const MAX_GUIDANCE: f64 = 100.0;
/// Largest flow shift taken (useful values are 1 to 20).
const MAX_SHIFT: f64 = 100.0;

/// Frames of a run without --frames: Wan 2.1's 81 (5 s at 16 fps).
const DEFAULT_FRAMES: usize = 81;

/// The frames a video-to-video run takes from `input` when --frames is not given: its length,
/// at most [`DEFAULT_FRAMES`], cut down to 4k+1 (the VAE's temporal grid); `read_clip` says
/// so when it drops frames.
fn frames_of_clip(input: &Path) -> Result<usize, Error> {
    let count = if vpipe_pipeline::has_extension(input, "safetensors") {
        let [video] = vpipe_pipeline::read_inputs(input, ["video_in"])?;
        video.dims().get(2).copied().unwrap_or(0)
    } else {
        vpipe_video::count_frames(input).map_err(|e| BadInput(format!("--input: {e}")))?
    };
    if count == 0 {
        return Err(BadInput(format!(
            "--input {}: the clip has no frames",
            input.display()
        )));
    }
    Ok((count.min(DEFAULT_FRAMES) - 1) / 4 * 4 + 1)
}

/// Flags of `vpipe inspect`.
#[derive(Args, Debug)]
pub(crate) struct InspectArgs {
    /// Print JSON instead of the summary.
    #[arg(long)]
    pub(crate) json: bool,
    /// A .safetensors or .pth checkpoint.
    pub(crate) file: PathBuf,
}

/// Flags of `vpipe tensors`.
#[derive(Args, Debug)]
pub(crate) struct TensorsArgs {
    #[command(subcommand)]
    pub(crate) component: TensorsComponent,
}

/// The components `vpipe tensors` runs.
#[derive(Subcommand, Debug)]
pub(crate) enum TensorsComponent {
    /// Wan VAE encode: reads `video_in` ([B,3,T,H,W] in [-1,1], T = 1+4k) and writes `enc_mean`
    /// (the raw posterior mean, before latents_mean/std).
    VaeEncode(VaeArgs),
    /// Wan VAE decode: reads `enc_mean` ([B,16,T,h,w], raw latents) and writes `decoded`
    /// (clamped to [-1,1]).
    VaeDecode(VaeArgs),
    /// Wan DiT forward: reads `hidden_states` ([B,16,F,H,W] latents), `timestep` ([B], σ·1000)
    /// and `encoder_hidden_states` ([B,L,4096] text context), writes `out` (the velocity).
    Dit(DitArgs),
    /// umT5 encoder: reads `input_ids` and `attention_mask` ([B,L], pad 0, L = 512 in Wan) and
    /// writes `last_hidden_state` ([B,L,4096], zero past each prompt's length).
    TextEncode(TextEncodeArgs),
    /// CLIP vision encoder (image-to-video's ViT-H/14): reads `pixel_values` ([B,3,224,224],
    /// normalised as CLIP's image processor does) and writes `image_features` ([B,257,1280]:
    /// the next-to-last layer's output, what the image-to-video DiT consumes).
    ClipVision(ClipVisionArgs),
    /// A sampler over given predictions: reads `x0` and `model_outputs` ([N,...x0 shape]),
    /// writes `samples` ([N+1,...]), `sigmas` and `timesteps`.
    Schedule(ScheduleArgs),
}

/// Flags of `vpipe tensors dit`.
#[derive(Args, Debug)]
pub(crate) struct DitArgs {
    /// The DiT checkpoint (.safetensors or .pth; original Wan / ComfyUI or diffusers layout;
    /// f32, bf16, f16 or ComfyUI's scaled fp8).
    #[arg(long)]
    dit: PathBuf,
    /// A diffusers `transformer/config.json`; without it the config comes from the tensor
    /// shapes (128-wide heads, as every Wan 2.1 model has).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Input safetensors file.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file (written to a temporary file, then renamed).
    #[arg(long)]
    output: PathBuf,
    /// A LoRA to merge into the weights (any Wan LoRA key format); repeat for several.
    #[arg(long)]
    lora: Vec<PathBuf>,
    /// Strength of each --lora, in the same order (default 1.0 for those not given).
    #[arg(long, allow_negative_numbers = true)]
    lora_strength: Vec<f64>,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// Validated settings of a DiT tensor job.
pub(crate) struct DitJob {
    pub(crate) dit: PathBuf,
    pub(crate) config: Option<vpipe_models::wan::DitConfig>,
    pub(crate) input: PathBuf,
    pub(crate) output: PathBuf,
    /// LoRA files with their strengths.
    pub(crate) loras: Vec<(PathBuf, f64)>,
    pub(crate) compute: Compute,
}

impl DitArgs {
    pub(crate) fn validate(self) -> Result<DitJob, Error> {
        require_files(&[("--dit", &self.dit), ("--input", &self.input)])?;
        for lora in &self.lora {
            require_files(&[("--lora", lora)])?;
        }
        if self.lora_strength.len() > self.lora.len() {
            return Err(BadInput(format!(
                "--lora-strength given {} times for {} --lora file(s)",
                self.lora_strength.len(),
                self.lora.len()
            )));
        }
        if let Some(bad) = self.lora_strength.iter().find(|s| !s.is_finite()) {
            return Err(BadInput(format!(
                "--lora-strength {bad}: expected a finite number"
            )));
        }
        let loras = self
            .lora
            .iter()
            .enumerate()
            .map(|(i, path)| {
                (
                    path.clone(),
                    self.lora_strength.get(i).copied().unwrap_or(1.0),
                )
            })
            .collect();
        let config = read_dit_config("--config", self.config.as_deref())?;
        Ok(DitJob {
            dit: self.dit,
            config,
            input: self.input,
            output: self.output,
            compute: self.compute.validate()?,
            loras,
        })
    }
}

/// Flags of `vpipe tensors text-encode`.
#[derive(Args, Debug)]
pub(crate) struct TextEncodeArgs {
    /// The umT5 encoder checkpoint (.safetensors or .pth; transformers / ComfyUI or original
    /// Wan names).
    #[arg(long)]
    text_encoder: PathBuf,
    /// A transformers `config.json`; without it the config comes from the tensor shapes.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Input safetensors file.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file (written to a temporary file, then renamed).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// Validated settings of a text-encode tensor job.
pub(crate) struct TextEncodeJob {
    pub(crate) text_encoder: PathBuf,
    pub(crate) config: Option<vpipe_text::umt5::Config>,
    pub(crate) input: PathBuf,
    pub(crate) output: PathBuf,
    pub(crate) compute: Compute,
}

impl TextEncodeArgs {
    pub(crate) fn validate(self) -> Result<TextEncodeJob, Error> {
        require_files(&[
            ("--text-encoder", &self.text_encoder),
            ("--input", &self.input),
        ])?;
        let config = read_config("--config", self.config.as_deref(), |text| {
            serde_json::from_str::<vpipe_text::umt5::Config>(text)
        })?;
        Ok(TextEncodeJob {
            text_encoder: self.text_encoder,
            config,
            input: self.input,
            output: self.output,
            compute: self.compute.validate()?,
        })
    }
}

/// Flags of `vpipe tensors clip-vision`.
#[derive(Args, Debug)]
pub(crate) struct ClipVisionArgs {
    /// The CLIP vision checkpoint (.safetensors or .pth; transformers' or ComfyUI's
    /// `clip_vision_h` names).
    #[arg(long)]
    clip_vision: PathBuf,
    /// A transformers `config.json` (`CLIPVisionConfig`); without it, ViT-H/14 at 224 px.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Input safetensors file.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file (written to a temporary file, then renamed).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// Validated settings of a clip-vision tensor job.
pub(crate) struct ClipVisionJob {
    pub(crate) clip_vision: PathBuf,
    pub(crate) config: vpipe_models::clip::Config,
    pub(crate) input: PathBuf,
    pub(crate) output: PathBuf,
    pub(crate) compute: Compute,
}

impl ClipVisionArgs {
    pub(crate) fn validate(self) -> Result<ClipVisionJob, Error> {
        require_files(&[
            ("--clip-vision", &self.clip_vision),
            ("--input", &self.input),
        ])?;
        let config = read_clip_config("--config", self.config.as_deref())?
            .unwrap_or_else(vpipe_models::clip::Config::vit_h_14);
        Ok(ClipVisionJob {
            clip_vision: self.clip_vision,
            config,
            input: self.input,
            output: self.output,
            compute: self.compute.validate()?,
        })
    }
}

/// Flags of `vpipe tensors schedule`.
#[derive(Args, Debug)]
pub(crate) struct ScheduleArgs {
    /// euler (FlowMatchEulerDiscreteScheduler) or unipc (UniPCMultistepScheduler, flow).
    #[arg(long)]
    sampler: String,
    /// Flow shift s: σ' = s·σ / (1 + (s−1)·σ).
    #[arg(long)]
    shift: f64,
    /// Number of steps.
    #[arg(long)]
    steps: usize,
    /// Input safetensors file.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file (written to a temporary file, then renamed).
    #[arg(long)]
    output: PathBuf,
}

/// Validated settings of a schedule tensor job.
pub(crate) struct ScheduleJob {
    pub(crate) sampler: vpipe_sampling::SamplerKind,
    pub(crate) shift: f64,
    pub(crate) steps: usize,
    pub(crate) input: PathBuf,
    pub(crate) output: PathBuf,
}

impl ScheduleArgs {
    pub(crate) fn validate(self) -> Result<ScheduleJob, Error> {
        let sampler = self
            .sampler
            .parse()
            .map_err(|e| BadInput(format!("--sampler {}: {e}", self.sampler)))?;
        require_files(&[("--input", &self.input)])?;
        check_shift(self.shift)?;
        if self.steps == 0 || self.steps > 1000 {
            return Err(BadInput(format!(
                "--steps {}: expected 1 to 1000",
                self.steps
            )));
        }
        Ok(ScheduleJob {
            sampler,
            shift: self.shift,
            steps: self.steps,
            input: self.input,
            output: self.output,
        })
    }
}

/// Checks a `--shift` value: finite, above 0, at most [`MAX_SHIFT`].
fn check_shift(shift: f64) -> Result<(), Error> {
    if shift > 0.0 && shift <= MAX_SHIFT {
        Ok(())
    } else {
        Err(BadInput(format!(
            "--shift {shift}: expected a number above 0, at most {MAX_SHIFT}"
        )))
    }
}

/// Where and how a tensor job computes, and where its report goes.
#[derive(Args, Debug)]
pub(crate) struct ComputeArgs {
    /// Where to compute: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the weights and the computation: f32, bf16 or f16 (fp8 DiT weights stay
    /// fp8 in memory and are dequantised per layer). Default: bf16 on CUDA, f32 on the CPU.
    #[arg(long)]
    dtype: Option<String>,
    /// Memory budget of the compute tier, e.g. 8GiB: the plan holds, streams or chunks each
    /// model to keep it (the DiT's and text encoder's blocks, the VAE's tile, the attention
    /// chunk).
    #[arg(long)]
    vram_budget: Option<String>,
    /// Host memory budget of a CUDA run, e.g. 32GiB: the pinned host copies of the weights
    /// (and the rest of the process's anonymous memory). When a model's copy does not fit,
    /// its blocks stream from the file through the page cache. Default: what the OS reports
    /// available (MemAvailable) when the run starts.
    #[arg(long)]
    ram_budget: Option<String>,
    /// Write the memory report here (and the chart next to it, as .svg).
    #[arg(long)]
    report: Option<PathBuf>,
    /// The attention kernel: auto (the fastest that applies: cudnn, then fused, then
    /// chunked), cudnn (cuDNN's fused attention: CUDA, bf16/f16), fused (vpipe's own kernel:
    /// CUDA, bf16/f16, heads of 128), chunked (matmul and softmax over query chunks: any
    /// device and dtype) or fp8 (cuDNN's attention in float8 for the self-attention, q, k and
    /// v quantised with one scale each: Hopper or newer, bf16/f16; faster and less exact,
    /// cuDNN's exact attention where cuDNN refuses it, as the report says).
    #[arg(long, default_value = "auto")]
    attention: String,
    /// Multiply in float8 (e4m3) in the DiT's blocks: the activations quantised per token,
    /// bf16/f16 weights per output channel (scaled-fp8 weights as stored), the products
    /// accumulated in f32 by cuBLASLt (CUDA, compute capability 8.9 or newer; emulated on the
    /// CPU: the same numbers, no faster). Faster and less exact; needs --dtype bf16 or f16.
    #[arg(long)]
    fp8_compute: bool,
}

impl ComputeArgs {
    fn validate(self) -> Result<Compute, Error> {
        let (dtype, dtype_is_default) = match &self.dtype {
            Some(text) => (parse_dtype(text)?, false),
            None => (default_dtype(&self.device), true),
        };
        let attention = match self.attention.as_str() {
            "auto" => None,
            name => Some(AttentionKernel::from_name(name).ok_or_else(|| {
                BadInput(format!(
                    "--attention {name}: expected auto, cudnn, fused, chunked or fp8"
                ))
            })?),
        };
        Ok(Compute {
            dtype,
            dtype_is_default,
            attention,
            matmul: if self.fp8_compute {
                vpipe_models::ops::linear::MatmulPrecision::Fp8
            } else {
                vpipe_models::ops::linear::MatmulPrecision::Exact
            },
            budget: vpipe_mem::Budget {
                compute: parse_budget("--vram-budget", &self.vram_budget)?,
                host: match parse_budget("--ram-budget", &self.ram_budget)? {
                    Some(bytes) => Some(bytes),
                    None if self.device.starts_with("cuda") => vpipe_mem::available_host_memory(),
                    None => None,
                },
            },
            ram_budget_given: self.ram_budget.is_some(),
            device_baseline: 0,
            budget_source: match self.vram_budget {
                Some(_) => "--vram-budget".into(),
                None => "none".into(),
            },
            device: self.device,
            report: self.report,
        })
    }
}

/// Reads the diffusers `transformer/config.json` given with `flag`, if any.
fn read_dit_config(
    flag: &str,
    path: Option<&std::path::Path>,
) -> Result<Option<vpipe_models::wan::DitConfig>, Error> {
    read_config(
        flag,
        path,
        vpipe_models::wan::DitConfig::from_diffusers_json,
    )
}

/// The `config.json` given with `flag`, parsed by `parse`; a file that cannot be read or
/// parsed is bad input naming the flag and the file.
fn read_config<T, E: std::fmt::Display>(
    flag: &str,
    path: Option<&Path>,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<Option<T>, Error> {
    let Some(path) = path else { return Ok(None) };
    let text = vpipe_pipeline::read_settings_file(flag, path)?;
    parse(&text)
        .map(Some)
        .map_err(|e| BadInput(format!("{flag} {}: {e}", path.display())))
}

/// A CLIP vision `config.json` given with `flag`.
fn read_clip_config(
    flag: &str,
    path: Option<&Path>,
) -> Result<Option<vpipe_models::clip::Config>, Error> {
    read_config(
        flag,
        path,
        vpipe_models::clip::Config::from_transformers_json,
    )
}

/// Checks an image flag's file before any work: it exists and is named as a PNG or a JPEG
/// (its content is checked when it is read).
fn check_image_path(flag: &str, path: &Path) -> Result<(), Error> {
    require_files(&[(flag, path)])?;
    let named_as_image = ["png", "jpg", "jpeg"]
        .iter()
        .any(|e| vpipe_pipeline::has_extension(path, e));
    if named_as_image {
        return Ok(());
    }
    Err(BadInput(format!(
        "{flag} {}: expected a PNG or JPEG image (.png, .jpg or .jpeg)",
        path.display()
    )))
}

/// The precision without `--dtype`: bf16 on CUDA (what Wan checkpoints are stored in, half of
/// f32's memory, and the tensor cores' precision), f32 on the CPU (which has no fast bf16).
fn default_dtype(device: &str) -> candle_core::DType {
    if device.starts_with("cuda") {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    }
}

/// Parses a `--dtype` value.
fn parse_dtype(text: &str) -> Result<candle_core::DType, Error> {
    match text {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        "f16" => Ok(candle_core::DType::F16),
        other => Err(BadInput(format!(
            "--dtype {other}: expected f32, bf16 or f16"
        ))),
    }
}

/// Flags of `vpipe tensors vae-encode|vae-decode`.
#[derive(Args, Debug)]
pub(crate) struct VaeArgs {
    /// The VAE checkpoint (.safetensors or .pth; original Wan, ComfyUI or diffusers layout).
    #[arg(long)]
    vae: PathBuf,
    /// Input safetensors file.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file (written to a temporary file, then renamed).
    #[arg(long)]
    output: PathBuf,
    /// Spatial tile side in pixels (multiple of 8, at most 512; of 16 for the Wan 2.2 VAE), or
    /// `auto`: the largest tile that fits the budget by a per-pixel memory model measured on
    /// three small crops. Default: `auto` with --vram-budget, else 256. With the Wan 2.2 VAE
    /// and `--tile-layout diffusers`, diffusers' `enable_tiling(T, T, S, S)` encode is
    /// `--tile 2T --stride 2S` (it tiles the video folded into 2×2 patches), its decode
    /// `--tile T --stride S`.
    #[arg(long)]
    tile: Option<String>,
    /// Distance between tiles in pixels (multiple of 8, at most the tile; of 16 for the Wan
    /// 2.2 VAE). Default: 3/4 of the tile, on the VAE's grid.
    #[arg(long)]
    stride: Option<usize>,
    /// Tile placement: balanced (the fewest equal tiles no larger than --tile, at least its
    /// overlap) or diffusers (a tile every --stride from the corner, edge tiles cut at the
    /// border: the same result as diffusers' tiled encode/decode).
    #[arg(long, default_value = "balanced")]
    tile_layout: vpipe_models::tiling::TileLayout,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// Validated settings of a VAE tensor job.
pub(crate) struct VaeJob {
    pub(crate) vae: PathBuf,
    pub(crate) input: PathBuf,
    pub(crate) output: PathBuf,
    /// `None`: chosen from the budget by calibration.
    pub(crate) tiles: Option<vpipe_models::tiling::TileSpec>,
    /// The placement, also of a chosen tile.
    pub(crate) layout: vpipe_models::tiling::TileLayout,
    /// Whether `tiles.stride` is a `--stride` the user gave (else 3/4 of the tile, put on the
    /// VAE's grid once the VAE is known).
    pub(crate) stride_given: bool,
    pub(crate) compute: Compute,
}

impl VaeArgs {
    pub(crate) fn validate(self) -> Result<VaeJob, Error> {
        let compute = self.compute.validate()?;
        let budget = compute.budget.compute;
        let tile = match self.tile.as_deref() {
            Some("auto") => None,
            None if budget.is_some() => None,
            None => Some(vpipe_models::tiling::TileSpec::DEFAULT.tile),
            Some(text) => Some(text.parse::<usize>().map_err(|_| {
                BadInput(format!(
                    "--tile {text}: expected a number of pixels or auto"
                ))
            })?),
        };
        if tile.is_none() && budget.is_none() {
            return Err(BadInput(
                "--tile auto: needs --vram-budget to choose a tile against".into(),
            ));
        }
        if tile.is_none() && self.stride.is_some() {
            return Err(BadInput(
                "--stride: give it with a numeric --tile; an automatic tile picks its own stride"
                    .into(),
            ));
        }
        let tiles = match tile {
            None => None,
            Some(tile) => {
                let stride = self
                    .stride
                    .unwrap_or(vpipe_models::tiling::default_stride(tile));
                let tiles = vpipe_models::tiling::TileSpec {
                    tile,
                    stride,
                    layout: self.tile_layout,
                };
                tiles
                    .validate()
                    .map_err(|e| BadInput(format!("--tile {tile} --stride {stride}: {e}")))?;
                Some(tiles)
            }
        };
        require_files(&[("--vae", &self.vae), ("--input", &self.input)])?;
        Ok(VaeJob {
            vae: self.vae,
            input: self.input,
            output: self.output,
            tiles,
            layout: self.tile_layout,
            stride_given: self.stride.is_some(),
            compute,
        })
    }
}

/// Parses the command line (clap prints help and usage errors itself, with exit code 2).
pub(crate) fn parse() -> Command {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match with_pipeline_file(args) {
        Ok(args) => Cli::parse_from(args).command,
        Err(err) => {
            eprintln!("vpipe: {err}");
            std::process::exit(2);
        }
    }
}

/// The command-line flags that `settings` (keys = flag names with `_` or `-`: a `--pipeline`
/// file, a job submitted to `vpipe serve`) stand for; `source` names where they came from in
/// errors.
fn settings_flags(settings: &toml::Table, source: &str) -> Result<Vec<std::ffi::OsString>, Error> {
    let mut flags: Vec<std::ffi::OsString> = Vec::new();
    for (key, value) in settings {
        let flag = format!("--{}", key.replace('_', "-"));
        let scalar = |v: &toml::Value| -> Result<String, Error> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                other => Err(BadInput(format!(
                    "{source}: key `{key}` has a {}; expected a string, number, boolean or list",
                    other.type_str()
                ))),
            }
        };
        // `--flag=value` in one argument: a value that begins with '-' (a negative prompt
        // "-blurry", a strength "-0.5") stays a value instead of becoming a flag.
        match value {
            toml::Value::Boolean(true) => flags.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    flags.push(format!("{flag}={}", scalar(item)?).into());
                }
            }
            other => flags.push(format!("{flag}={}", scalar(other)?).into()),
        }
    }
    Ok(flags)
}

/// The settings of a `vpipe run` given as `settings` (the keys of a `--pipeline` file), parsed
/// and validated as the command line would be: the same checks, the same messages, with
/// `source` in place of the command line.
pub(crate) fn run_options_from_settings(
    settings: &toml::Table,
    source: &str,
) -> Result<RunOptions, Error> {
    let mut args: Vec<std::ffi::OsString> = vec!["vpipe".into(), "run".into()];
    args.extend(settings_flags(settings, source)?);
    let cli = Cli::try_parse_from(args).map_err(|e| {
        let rendered = e.render().to_string();
        let first = rendered.lines().next().unwrap_or_default();
        BadInput(format!(
            "{source}: {}",
            first.strip_prefix("error: ").unwrap_or(first)
        ))
    })?;
    match cli.command {
        Command::Run(args) => args.validate(false),
        // The arguments begin with `run`, so clap gives no other subcommand.
        _ => Err(BadInput(format!("{source}: not the settings of a run"))),
    }
}

/// `args` with the flags of a `--pipeline FILE.toml` inserted right after the subcommand, so
/// that the command line's own flags come later and win.
fn with_pipeline_file(args: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>, Error> {
    let Some(at) = args.iter().position(|a| a == "--pipeline") else {
        return Ok(args);
    };
    let Some(path) = args.get(at + 1).map(PathBuf::from) else {
        return Ok(args); // clap reports the missing value
    };
    let text = vpipe_pipeline::read_settings_file("--pipeline", &path)?;
    let table: toml::Table = text.parse().map_err(|e| {
        BadInput(format!(
            "--pipeline {}: not valid TOML: {e}",
            path.display()
        ))
    })?;
    let flags = settings_flags(&table, &format!("--pipeline {}", path.display()))?;
    // After the subcommand (`run` / `plan`), which is the first argument not starting with '-'.
    let sub = args
        .iter()
        .skip(1)
        .position(|a| !a.to_string_lossy().starts_with('-'))
        .map_or(1, |i| i + 2);
    let mut out = args[..sub.min(args.len())].to_vec();
    out.extend(flags);
    out.extend_from_slice(&args[sub.min(args.len())..]);
    Ok(out)
}

#[cfg(test)]
mod fuzz {
    //! Time-bounded fuzzing of the flag and TOML layer: whatever the command line or a
    //! `--pipeline` file holds, parsing and validation end in settings or an error, never a
    //! panic, and never an allocation sized by a number they were given.

    use super::*;
    use proptest::prelude::*;

    /// Every flag of `run`/`plan` that takes a value, and a few that do not exist.
    const FLAGS: &[&str] = &[
        "--size",
        "--frames",
        "--steps",
        "--cfg",
        "--shift",
        "--strength",
        "--seed",
        "--initial-noise",
        "--tile",
        "--tile-layout",
        "--sampler",
        "--dtype",
        "--device",
        "--vram-budget",
        "--ram-budget",
        "--attention",
        "--lora",
        "--prompt",
        "--negative-prompt",
        "--out",
        "--input",
        "--dit",
        "--model-dir",
        "--preset",
        "--report",
        "--no-such-flag",
    ];

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[-+]?[0-9]{0,25}(\\.[0-9]{0,5})?(e[-+]?[0-9]{1,4})?",
            "[0-9]{1,22}x[0-9]{1,22}",
            Just("NaN".to_owned()),
            Just("-inf".to_owned()),
            Just("18446744073709551616".to_owned()),
            "[a-z./:-]{0,20}",
        ]
    }

    /// Parses and validates as `main` does; the result is irrelevant, only that it returns.
    fn parse_and_validate(args: Vec<std::ffi::OsString>) {
        let Ok(args) = with_pipeline_file(args) else {
            return;
        };
        let Ok(cli) = Cli::try_parse_from(args) else {
            return;
        };
        match cli.command {
            Command::Run(args) => drop(args.validate(false)),
            Command::Plan(args) => drop(args.validate(true)),
            _ => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_flags_parse_or_fail_cleanly(
            plan in any::<bool>(),
            pairs in prop::collection::vec((prop::sample::select(FLAGS), value()), 0..8),
        ) {
            let mut args: Vec<std::ffi::OsString> =
                vec!["vpipe".into(), if plan { "plan" } else { "run" }.into()];
            for (flag, value) in pairs {
                args.push(flag.into());
                args.push(value.into());
            }
            parse_and_validate(args);
        }

        #[test]
        fn any_pipeline_file_parses_or_fails_cleanly(
            text in prop_oneof![
                any::<String>(),
                prop::collection::vec(
                    (
                        prop::sample::select(FLAGS).prop_map(|f| f.trim_start_matches('-').replace('-', "_")),
                        prop_oneof![
                            value().prop_map(|v| format!("{v:?}")),
                            "[-+]?[0-9]{1,30}",
                            "[-+]?[0-9]{1,5}\\.[0-9]{1,5}(e[-+]?[0-9]{1,4})?",
                            Just("true".to_owned()),
                            Just("false".to_owned()),
                            Just("[\"a\", \"-b\"]".to_owned()),
                            Just("{ x = 1 }".to_owned()),
                            Just("1979-05-27".to_owned()),
                        ],
                    ),
                    0..8,
                )
                .prop_map(|lines| lines.into_iter().map(|(k, v)| format!("{k} = {v}\n")).collect()),
            ],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("run.toml");
            std::fs::write(&path, text).unwrap();
            let args = ["vpipe", "run", "--pipeline", path.to_str().unwrap(), "--prompt", "x"]
                .map(std::ffi::OsString::from)
                .to_vec();
            parse_and_validate(args);
        }
    }
}
