//! Wan 2.1 model components for vpipe, in candle: the video VAE (causal 3D convolutions with a
//! chunked feature cache), the conv3d it needs, and checkpoint key translation.
//!
//! - [`wan::WanModel`]: the text-to-video diffusion transformer (DiT), with query-chunked
//!   attention ([`ops::attention`]) and scaled-fp8 weights ([`ops::linear`]).
//! - [`wan::WanVae`]: encode / decode, loaded from original Wan, ComfyUI or diffusers
//!   checkpoints (`.safetensors` or `.pth`).
//! - [`ops::CausalConv3d`]: Wan's causal 3D convolution as a sum of candle 2D convolutions.
//! - [`clip::ClipVisionEncoder`]: the CLIP ViT-H/14 image encoder of the image-to-video models.
//! - [`parallel::Communicator`]: the collectives of multi-device forwards (sequence and
//!   guidance parallelism), with an in-process communicator whose ranks are threads.
//! - [`Error`]: the crate's error type.

#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod checkpoint;
pub mod clip;
mod error;
pub mod ops;
pub mod parallel;
pub mod tiling;
pub mod wan;

pub use error::{Error, Result};
