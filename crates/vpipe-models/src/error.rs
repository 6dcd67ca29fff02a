//! The crate's error type.

use std::path::PathBuf;

/// Errors of the model components.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- Input validation -------------------------------------------------------------------
    /// A tensor has the wrong number of dimensions.
    #[error("{tensor}: expected a tensor of shape {layout}, got shape {got:?}")]
    Rank {
        /// Which input (e.g. `video`, `latents`).
        tensor: &'static str,
        /// The expected layout, e.g. `[B, 3, T, H, W]`.
        layout: &'static str,
        /// The shape that was passed.
        got: Vec<usize>,
    },

    /// A tensor has a zero-sized dimension.
    #[error("{tensor}: empty tensor of shape {shape:?}; every dimension must be at least 1")]
    Empty {
        /// Which input.
        tensor: &'static str,
        /// The shape that was passed.
        shape: Vec<usize>,
    },

    /// The channel dimension (dimension 1) has the wrong size.
    #[error("{tensor}: expected {expected} channels in dimension 1, got {got} (shape {shape:?})")]
    Channels {
        /// Which input.
        tensor: &'static str,
        /// The channel count the model needs.
        expected: usize,
        /// The channel count that was passed.
        got: usize,
        /// The shape that was passed.
        shape: Vec<usize>,
    },

    /// The VAE encodes 1 + 4k frames only.
    #[error(
        "{tensor}: {frames} frames, but the VAE encodes 1 + 4k frames (1, 5, 9, ..., 81); \
         the nearest valid counts are {below} and {above}"
    )]
    FrameCount {
        /// Which input.
        tensor: &'static str,
        /// The frame count that was passed.
        frames: usize,
        /// The largest valid count below `frames`.
        below: usize,
        /// The smallest valid count above `frames`.
        above: usize,
    },

    /// Height or width is not a multiple of the spatial compression factor.
    #[error(
        "{tensor}: height {height} and width {width} must both be multiples of {factor} \
         (the VAE's spatial compression; diffusers would silently drop the remainder)"
    )]
    SpatialSize {
        /// Which input.
        tensor: &'static str,
        /// Height that was passed.
        height: usize,
        /// Width that was passed.
        width: usize,
        /// The required factor.
        factor: usize,
    },

    /// A size is past what this crate accepts (a frame side, a token count, a product of
    /// sizes that would overflow): refused before anything of that size is allocated.
    #[error("{tensor}: too large: {reason}")]
    TooLarge {
        /// Which input.
        tensor: &'static str,
        /// Which size, and the limit.
        reason: String,
    },

    // ---- Checkpoints and configuration -------------------------------------------------------
    /// The file extension names no checkpoint format this crate reads.
    #[error("{path}: unsupported checkpoint file, expected .safetensors or .pth (.pt, .ckpt)")]
    UnsupportedFile {
        /// The file.
        path: PathBuf,
    },

    /// The checkpoint holds no Wan VAE under any known key layout.
    #[error(
        "no Wan VAE in the checkpoint: found neither `encoder.conv1.weight` (original Wan / \
         ComfyUI names) nor `encoder.conv_in.weight` (diffusers names), with any of the \
         prefixes {prefixes:?}"
    )]
    UnknownLayout {
        /// The key prefixes that were tried.
        prefixes: Vec<&'static str>,
    },

    /// A configuration is inconsistent, or one could not be read from the tensor shapes.
    #[error("VAE config: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },

    /// The checkpoint holds no Wan DiT under any known key layout.
    #[error(
        "no Wan DiT in the checkpoint: found neither `head.modulation` (original Wan / ComfyUI \
         names) nor `condition_embedder.time_embedder.linear_1.weight` (diffusers names), with \
         any of the prefixes {prefixes:?}"
    )]
    NoDit {
        /// The key prefixes that were tried.
        prefixes: Vec<&'static str>,
    },

    /// A DiT configuration is inconsistent, could not be read, or is not supported.
    #[error("DiT config: {reason}")]
    DitConfig {
        /// What is wrong.
        reason: String,
    },

    /// An input of the DiT has the wrong shape or type.
    #[error("DiT input `{tensor}`: {reason}")]
    DitInput {
        /// Which input (`hidden_states`, `timestep`, `encoder_hidden_states`).
        tensor: &'static str,
        /// What was expected and what came.
        reason: String,
    },

    /// A CLIP vision configuration is inconsistent, could not be read, or is not supported.
    #[error("CLIP vision config: {reason}")]
    ClipConfig {
        /// What is wrong.
        reason: String,
    },

    /// An input of the CLIP vision encoder has the wrong shape.
    #[error("CLIP vision input `{tensor}`: {reason}")]
    ClipInput {
        /// Which input (`pixel_values`).
        tensor: &'static str,
        /// What was expected and what came.
        reason: String,
    },

    /// The caller stopped a tiled pass between two tiles (e.g. on Ctrl-C).
    #[error("stopped by the caller between two tiles")]
    Stopped,

    // ---- Wrapped -----------------------------------------------------------------------------
    /// A candle error (tensor operation, missing tensor, shape mismatch while loading).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
