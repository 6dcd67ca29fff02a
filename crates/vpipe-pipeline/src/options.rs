//! What a job is asked to do: the settings a caller (the `vpipe` binary's flags) validated.

use std::path::PathBuf;

/// What `vpipe run` and `vpipe plan` are asked to do, validated.
pub struct RunOptions {
    pub model_dir: Option<PathBuf>,
    pub dit: Option<PathBuf>,
    pub dit_config: Option<vpipe_models::wan::DitConfig>,
    pub vae: Option<PathBuf>,
    pub text_encoder: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub prompt: String,
    pub negative_prompt: String,
    /// Video-to-video input and strength.
    pub input: Option<(PathBuf, f64)>,
    /// Wan 2.2's expert pair: the low-noise expert (`dit` is then the high-noise one).
    pub low_noise: Option<LowNoiseExpert>,
    /// Image-to-video: the first frame (PNG or JPEG), and the last one for first-last-frame
    /// to video.
    pub image: Option<ImageInputs>,
    /// The CLIP vision encoder of image-to-video (else the one in `model_dir`).
    pub clip_vision: Option<PathBuf>,
    /// Its transformers `config.json` (else from the file's tensor shapes).
    pub clip_vision_config: Option<vpipe_models::clip::Config>,
    pub loras: Vec<(PathBuf, f64)>,
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub steps: usize,
    pub guidance: f64,
    /// The step cache (`--cache`); `None`: every step runs the blocks.
    pub step_cache: Option<crate::StepCache>,
    pub shift: f64,
    /// Whether `shift` is a `--shift` the user gave (else a Wan 2.2 pair takes its own).
    pub shift_given: bool,
    pub sampler: vpipe_sampling::SamplerKind,
    pub seed: u64,
    /// `--initial-noise`: a safetensors file with the `noise` tensor that replaces the seed's.
    pub initial_noise: Option<PathBuf>,
    pub tiles: vpipe_models::tiling::TileSpec,
    pub out: PathBuf,
    pub compute: Compute,
}

/// The low-noise expert of a Wan 2.2 pair: its file (else the one the model folder pairs with
/// the high-noise one) and `config.json`, the boundary below which it takes the steps (a
/// share of the 1000 training timesteps, as diffusers' `boundary_ratio`), and its guidance
/// scale (diffusers' `guidance_scale_2`).
#[derive(Debug, Clone)]
pub struct LowNoiseExpert {
    pub dit: Option<PathBuf>,
    pub config: Option<vpipe_models::wan::DitConfig>,
    pub boundary: f64,
    pub guidance: f64,
    /// Its LoRAs and their strengths (`--lora` patches the high-noise expert).
    pub loras: Vec<(PathBuf, f64)>,
}

/// The flow shift of a run without `--shift` (Wan 2.1's).
pub const DEFAULT_SHIFT: f64 = 8.0;

impl LowNoiseExpert {
    /// Wan 2.2's flow shift: 12 for text-to-video (T2V-A14B), 5 for image-to-video.
    pub fn default_shift(image_to_video: bool) -> f64 {
        if image_to_video {
            5.0
        } else {
            12.0
        }
    }

    /// Wan 2.2's boundary: 0.875 for text-to-video (T2V-A14B), 0.9 for image-to-video
    /// (I2V-A14B), as their configs and diffusers' pipelines set `boundary_ratio`.
    pub fn default_boundary(image_to_video: bool) -> f64 {
        if image_to_video {
            0.9
        } else {
            0.875
        }
    }
}

/// The frames an image-to-video run starts from.
#[derive(Debug, Clone)]
pub struct ImageInputs {
    pub first: PathBuf,
    /// First-last-frame to video: the frame the video ends on.
    pub last: Option<PathBuf>,
}

/// Where and how a job computes, and where its report goes.
pub struct Compute {
    pub device: String,
    pub dtype: candle_core::DType,
    /// Whether `dtype` is the device's default rather than a `--dtype` the user gave.
    pub dtype_is_default: bool,
    /// The attention kernel `--attention` asks for; `None`: the plan takes the fastest that
    /// applies.
    pub attention: Option<vpipe_models::ops::attention::AttentionKernel>,
    /// How the DiT blocks' linear layers multiply: exact, or in float8 (`--fp8-compute`).
    pub matmul: vpipe_models::ops::linear::MatmulPrecision,
    pub budget: vpipe_mem::Budget,
    /// Whether `budget.host` is a `--ram-budget` the user gave (else what the OS reported).
    pub ram_budget_given: bool,
    /// What set `budget.compute` (see [`Compute::bound_by_device`]).
    pub budget_source: String,
    /// On CUDA, the device footprint of the process before any work (the context, the
    /// handles), which the budget includes; 0 until [`Compute::bound_by_device`].
    pub device_baseline: u64,
    pub report: Option<PathBuf>,
}

/// What the process takes on the device outside the pool after the baseline reading (the
/// libraries' workspaces), rounded up from the 0.11 GiB measured on the H200 (2026-12-04).
const OUTSIDE_POOL_GROWTH: u64 = 160 << 20;

impl Compute {
    /// Bounds the compute budget by what the device can give: `baseline` is a reading of the
    /// process before any work (its device footprint: the context and handles), to which the
    /// driver can add what it reports free. Keeps the smaller of that and `--vram-budget`
    /// (the whole budget without one) and says which one bound it; remembers the baseline's
    /// footprint, which the plan leaves out of what the models may use. A CPU run is left as
    /// it is.
    pub fn bound_by_device(&mut self, device: &candle_core::Device, baseline: &vpipe_mem::Reading) {
        let (Some(free), Some(taken)) = (
            crate::device::free_bytes(device),
            baseline.device_footprint(),
        ) else {
            return;
        };
        // cuBLAS and cuDNN make their workspaces outside the pool at their first use: NVML's
        // figure for the process grew from 0.57 to 0.68 GiB over a run on the H200.
        self.device_baseline = taken + OUTSIDE_POOL_GROWTH;
        let most = taken + free;
        match self.budget.compute {
            Some(given) if given <= most => {}
            Some(given) => {
                self.budget.compute = Some(most);
                self.budget_source = format!(
                    "what the device can give, less than the --vram-budget of {}",
                    vpipe_mem::fmt_bytes(given)
                );
            }
            None => {
                self.budget.compute = Some(most);
                self.budget_source = "what the device can give (no --vram-budget)".into();
            }
        }
    }

    /// The budget the models of a run may use: on CUDA the compute budget less the device
    /// footprint the process had before any work.
    pub fn model_budget(&self) -> vpipe_mem::Budget {
        vpipe_mem::Budget {
            compute: self
                .budget
                .compute
                .map(|b| b.saturating_sub(self.device_baseline)),
            ..self.budget
        }
    }
}
