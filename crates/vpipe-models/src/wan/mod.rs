//! Wan 2.1 (Wan-AI, 2025) model components: the causal 3D video VAE and the text-to-video
//! diffusion transformer (DiT, [`WanModel`]).
//!
//! - Paper and code: <https://github.com/Wan-Video/Wan2.1> (`wan/modules/vae.py`)
//! - diffusers port: `AutoencoderKLWan`
//!   (<https://github.com/huggingface/diffusers>, `src/diffusers/models/autoencoders/autoencoder_kl_wan.py`)
//! - Weights: `Wan2.1_VAE.pth` in <https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B>, ComfyUI's
//!   `split_files/vae/wan_2.1_vae.safetensors` in
//!   <https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged>, or the diffusers layout in
//!   `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` (`vae/diffusion_pytorch_model.safetensors`).
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use vpipe_models::wan::vae::WanVae;
//!
//! let vae = WanVae::from_file("wan_2.1_vae.safetensors", DType::F32, &Device::Cpu)?;
//! let video = Tensor::zeros((1, 3, 9, 64, 64), DType::F32, &Device::Cpu)?; // [-1, 1]
//! let z = vae.encode(&video)?; // [1, 16, 3, 8, 8], raw
//! let back = vae.decode(&z)?; // [1, 3, 9, 64, 64], clamped to [-1, 1]
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Parity with diffusers is tested in `crates/vpipe-models/tests/vae_parity.rs` and
//! `dit_parity.rs` on fixtures made by `tools/fixtures/make_vae_fixtures.py` and
//! `make_dit_fixtures.py`. From the command line:
//!
//! ```text
//! vpipe tensors dit --dit wan2.1_t2v_14B_bf16.safetensors --input in.safetensors \
//!     --output out.safetensors --device cuda:0 --dtype bf16 --vram-budget 60GiB
//! ```

pub mod dit;
pub mod dit_keys;
pub mod keys;
pub mod ti2v;
pub mod vae;

pub use dit::{
    BlockCache, BlockPart, BlockSource, CacheUse, Config as DitConfig, Execution, GuidancePasses,
    HeldBlocks, ParallelRun, StepRun, WanModel,
};
pub use vae::{Config as VaeConfig, Posterior, WanVae};
