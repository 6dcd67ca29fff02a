//! Wan's text side for vpipe: the umT5-XXL encoder in candle and its SentencePiece Unigram
//! tokenizer.
//!
//! - [`umt5::Umt5Encoder`]: token ids + attention mask → the text context Wan's DiT
//!   cross-attends to (rows past each prompt zeroed, as Wan's pipelines do), loaded from
//!   transformers, ComfyUI or original Wan checkpoints in f32, bf16 or f16.
//! - [`tokenizer::PromptTokenizer`]: prompt → 512 padded ids with EOS, from a `tokenizer.json`
//!   or from the SentencePiece model ComfyUI embeds in its umT5 files.
//! - [`Error`]: the crate's error type.

#![deny(missing_docs)]
#![deny(unsafe_code)]

mod error;
pub mod tokenizer;
pub mod umt5;

pub use error::{Error, Result};
