//! The crate's error type.

use std::path::PathBuf;

/// Errors of the umT5 encoder and its tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- Encoder inputs ---------------------------------------------------------------------
    /// An input tensor has the wrong number of dimensions or a zero-sized one.
    #[error("{tensor}: expected a tensor of shape {layout} with every dimension at least 1, got shape {got:?}")]
    Rank {
        /// Which input (`input_ids`, `attention_mask`).
        tensor: &'static str,
        /// The expected layout, e.g. `[B, L]`.
        layout: &'static str,
        /// The shape that was passed.
        got: Vec<usize>,
    },

    /// `input_ids` and `attention_mask` differ in shape.
    #[error(
        "input_ids has shape {input_ids:?} but attention_mask has shape {attention_mask:?}; \
         both must be [B, L] with the same B and L"
    )]
    MaskShape {
        /// Shape of `input_ids`.
        input_ids: Vec<usize>,
        /// Shape of `attention_mask`.
        attention_mask: Vec<usize>,
    },

    /// An input tensor has a dtype the encoder cannot take.
    #[error("{tensor}: dtype {got:?} is not accepted, expected {expected}")]
    InputDType {
        /// Which input.
        tensor: &'static str,
        /// What is accepted.
        expected: &'static str,
        /// The dtype that was passed.
        got: candle_core::DType,
    },

    /// A token id is outside the embedding table.
    #[error(
        "input_ids[{row}][{position}] = {id} is outside the vocabulary (ids must be in 0..{vocab_size})"
    )]
    TokenId {
        /// Batch row.
        row: usize,
        /// Position in the row.
        position: usize,
        /// The offending id.
        id: i64,
        /// Rows of the embedding table.
        vocab_size: usize,
    },

    // ---- Checkpoints and configuration ------------------------------------------------------
    /// The file extension names no checkpoint format this crate reads.
    #[error("{path}: unsupported checkpoint file, expected .safetensors or .pth (.pt, .bin)")]
    UnsupportedFile {
        /// The file.
        path: PathBuf,
    },

    /// The checkpoint holds no umT5 encoder under any known key layout.
    #[error(
        "no umT5 encoder in the checkpoint: looked for {looked_for:?} (transformers / ComfyUI \
         names, then original Wan t5.py names) with each of the prefixes {prefixes:?}"
    )]
    UnknownLayout {
        /// The marker keys that were tried (without prefix).
        looked_for: Vec<&'static str>,
        /// The key prefixes that were tried.
        prefixes: Vec<&'static str>,
    },

    /// A configuration is inconsistent, or could not be read from the tensor shapes.
    #[error("umT5 config: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },

    /// A `config.json` could not be parsed.
    #[error("{path}: not a transformers umT5 config.json: {source}")]
    ConfigJson {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },

    // ---- Tokenizer --------------------------------------------------------------------------
    /// The bytes are not a SentencePiece `ModelProto` this crate can use.
    #[error("SentencePiece model: {reason}")]
    SpieceModel {
        /// What is wrong, with the byte offset where it went wrong.
        reason: String,
    },

    /// A text-encoder file holds no `spiece_model` tensor.
    #[error(
        "{path}: no `spiece_model` tensor (looked for `spiece_model` and `*.spiece_model`); \
         ComfyUI's umT5 files embed the SentencePiece model under that name, other files need \
         a tokenizer.json"
    )]
    NoSpieceModel {
        /// The file.
        path: PathBuf,
    },

    /// The `tokenizers` library refused a tokenizer or a text.
    #[error("tokenizer ({context}): {source}")]
    Tokenizer {
        /// What was being done (a path, or `encode`).
        context: String,
        /// The library's error.
        source: tokenizers::Error,
    },

    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    // ---- Wrapped ----------------------------------------------------------------------------
    /// A candle error (tensor operation, missing tensor, shape mismatch while loading).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
