//! umT5-XXL encoder, the text encoder of Wan 2.1 / 2.2 (the "CLIP" of ComfyUI's Wan workflow),
//! in candle: transformers' `UMT5EncoderModel`, which is Wan's `T5Encoder` under other names.
//!
//! - Weights: ComfyUI `split_files/text_encoders/umt5_xxl_fp16.safetensors` (transformers names
//!   plus a `spiece_model` tensor), diffusers `text_encoder/` (transformers names), or Wan's
//!   `models_t5_umt5-xxl-enc-bf16.pth` (original names); see [`keys`].
//! - Upstream code: `transformers/models/umt5/modeling_umt5.py`, `Wan2.1:wan/modules/t5.py`.
//!
//! Architecture: token embedding; 24 pre-norm blocks of self-attention with a **per-layer**
//! relative-position bias (32 buckets, bidirectional, max distance 128), **no 1/√d** scaling,
//! padding keys masked with the dtype's lowest value, and a gated-GELU (tanh) feed-forward
//! `wo(gelu(wi_0·x) · wi_1·x)`; T5 RMS norms (eps 1e-6) before each sub-layer and at the end.
//! In float16 the residual stream is clamped when it overflows, as upstream. candle-transformers'
//! `t5.rs` shares one bias table across layers and cannot load umT5.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::{DType, Device};
//! use vpipe_text::tokenizer::{Encoded, PromptTokenizer};
//! use vpipe_text::umt5::Umt5Encoder;
//!
//! let file = "umt5_xxl_fp16.safetensors";
//! let device = Device::Cpu;
//! let encoder = Umt5Encoder::from_file(file, None, DType::BF16, &device)?;
//! let tokenizer = PromptTokenizer::from_checkpoint_file(file)?;
//! let prompt = vpipe_text::tokenizer::clean_prompt("A cat walks on the grass");
//! let (ids, mask) = Encoded::to_tensors(&[tokenizer.encode(&prompt)?], &device)?;
//! let context = encoder.forward(&ids, &mask)?; // [1, 512, 4096], zero past the prompt
//! # Ok(())
//! # }
//! ```

pub mod keys;
mod model;

pub use model::{relative_position_bucket, Config, Umt5Encoder, Umt5Source};
