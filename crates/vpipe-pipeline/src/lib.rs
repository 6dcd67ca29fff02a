//! The Wan 2.1 pipeline under a memory budget: a run's model files, its plan (what each phase
//! holds, estimated against the budget before any weight moves), the phases that run it in one
//! memory session, the tiled VAE, and the files a run reads and writes.
//!
//! A caller validates its settings into [`RunOptions`], then [`plan`]s or [`run`]s them with
//! an [`Observer`] that shows progress and says when to stop. Every error is an [`Error`],
//! whose kind tells bad input from a refused budget from a failed run.
//!
//! Modules depend only on those below them: `error`, `observer`; `paths`, `partial`,
//! `device`; `step_cache`, `options`, `files`, `family`, `models`; `plan`, `leased`, `tiled_vae`; `pipeline`; `run`.

mod comfy;
mod device;
mod error;
mod exit_code;
mod family;
mod files;
mod image_to_video;
mod leased;
mod models;
mod observer;
mod options;
mod partial;
mod paths;
mod pipeline;
mod plan;
mod run;
mod step_cache;
mod tiled_vae;

pub use comfy::{apply_comfy_workflow, ComfyFolders};
pub use device::open_device;
pub use error::{budget_kept, Error, Result};
pub use exit_code::{causes, exit_code, one_line};
pub use files::{finish_report, read_inputs, write_clip, write_outputs};
pub use image_to_video::{clip_pixel_values, condition_mask, condition_video, image_condition};
pub use leased::{clip_vision, plan_loras, read_loras, umt5, wan_dit, wan_vae};
pub use models::{Checkpoint, ModelFiles};
pub use observer::Observer;
pub use options::{Compute, ImageInputs, LowNoiseExpert, RunOptions, DEFAULT_SHIFT};
pub use partial::{remove_stale_partials, write_atomically};
pub use paths::{
    check_tensor_outputs, has_extension, input_file_or_folder_problem, read_settings_file,
    require_files,
};
pub use pipeline::{clip_vision_features, generate, ExpertSwitch, Generated, Job, JobSpec, Mode};
pub use plan::{attention_kernel, attention_scratch, Plan};
pub use run::{plan, plan_next, run, run_in_session, run_on, NextJob};
pub use step_cache::{
    MagCacheSettings, MagRatios, StepCache, StepCacheFlags, MAGCACHE_MAX_SKIP, MAGCACHE_RETENTION,
    MAGCACHE_THRESHOLD, TEACACHE_THRESHOLD,
};
pub use tiled_vae::{calibrate, choose_tile, run_tiled, TileMemoryModel, VaeOp};
