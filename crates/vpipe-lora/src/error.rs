//! The crate's error type.

use candle_core::Shape;

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Joins key names one per line, indented, for messages that list every offending key.
fn list(keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("\n  {k}"))
        .collect::<Vec<_>>()
        .concat()
}

/// Everything that can go wrong reading a LoRA file, resolving it against a model and merging it.
///
/// Every variant names the LoRA file (`file`) it is about; errors that concern several keys list
/// all of them, not just the first.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- Reading --------------------------------------------------------------------------
    /// The file could not be read or is not a valid safetensors file.
    #[error("{path}: cannot read LoRA file: {source}")]
    Read {
        /// The path that was read.
        path: String,
        /// What went wrong (boxed: candle's error is large).
        source: Box<candle_core::Error>,
    },

    /// The safetensors header carries adapter settings this crate does not implement.
    #[error("{file}: unsupported adapter metadata: {reason}")]
    Metadata {
        /// The LoRA file.
        file: String,
        /// What is unsupported.
        reason: String,
    },

    // ---- Key formats ----------------------------------------------------------------------
    /// The file holds no patch at all.
    #[error(
        "{file}: the LoRA holds no patch (no lora_A/lora_B, lora_down/lora_up, diff or diff_b key)"
    )]
    Empty {
        /// The LoRA file.
        file: String,
    },

    /// Keys whose suffix is not a patch kind this crate applies (LoKr, LoHa, DoRA scales,
    /// `lora_mid`, `set_weight`, or simply unknown). Refused rather than skipped so that no part
    /// of a LoRA is silently lost.
    #[error(
        "{file}: {} key(s) are not a supported LoRA patch (supported suffixes: .lora_A.weight, \
         .lora_B.weight, .lora_down.weight, .lora_up.weight, .alpha, .diff, .diff_b, \
         .lora_B.bias):{}",
        keys.len(),
        list(keys)
    )]
    UnsupportedKeys {
        /// The LoRA file.
        file: String,
        /// Every such key, sorted.
        keys: Vec<String>,
    },

    /// Pairs with a missing half, alphas that are not a finite scalar, and similar defects
    /// within the file itself.
    #[error("{file}: {} malformed LoRA key(s):{}", problems.len(), list(problems))]
    Malformed {
        /// The LoRA file.
        file: String,
        /// One line per defect: the key, then what is wrong with it.
        problems: Vec<String>,
    },

    // ---- Resolution against the model -----------------------------------------------------
    /// Keys that name no weight of the model.
    #[error("{file}: {} LoRA key(s) match no model weight:{}", keys.len(), list(keys))]
    Unmatched {
        /// The LoRA file.
        file: String,
        /// Every unmatched key, sorted.
        keys: Vec<String>,
    },

    /// A kohya-style flat name (`lora_unet_blocks_0_ffn_0`) or a bare name fits more than one
    /// model weight.
    #[error("{file}: LoRA key {key} is ambiguous; it fits the model weights {candidates:?}")]
    Ambiguous {
        /// The LoRA file.
        file: String,
        /// The LoRA key.
        key: String,
        /// The model weights it could mean.
        candidates: Vec<String>,
    },

    /// Two entries of one file patch the same model weight (e.g. the same module under two
    /// namings, or a low-rank pair and a `diff` for one weight).
    #[error("{file}: model weight {weight} is patched more than once by this file: {keys:?}")]
    DuplicateTarget {
        /// The LoRA file.
        file: String,
        /// The model weight.
        weight: String,
        /// The LoRA keys that all target it.
        keys: Vec<String>,
    },

    /// The patch's shape does not fit the weight it targets.
    #[error(
        "{file}: LoRA key {key} has shape {lora_shape} but model weight {weight} has shape \
         {weight_shape:?}"
    )]
    ShapeMismatch {
        /// The LoRA file.
        file: String,
        /// The LoRA key (the `up`/`lora_B` key for a pair).
        key: String,
        /// The LoRA tensor shape(s), e.g. `up [16, 4] · down [4, 12]` or `[16]`.
        lora_shape: String,
        /// The model weight.
        weight: String,
        /// Its shape (a boxed slice keeps the error small).
        weight_shape: Box<[usize]>,
    },

    /// A strength that is NaN or infinite.
    #[error("{file}: strength {strength} is not finite")]
    Strength {
        /// The LoRA file.
        file: String,
        /// The strength that was passed.
        strength: f64,
    },

    // ---- Applying ---------------------------------------------------------------------------
    /// [`crate::MergePlan::apply`] got a tensor whose shape differs from the shape the plan was
    /// made for.
    #[error("model weight {weight}: the plan was made for shape {expected:?}, got {got:?}")]
    WeightShape {
        /// The model weight.
        weight: String,
        /// The shape in the plan's model weight list.
        expected: Shape,
        /// The shape of the tensor passed to `apply`.
        got: Shape,
    },

    /// Weights the plan patches were never handed out (see
    /// [`crate::MergePlan::ensure_all_applied`]): the model did not load them under these names.
    #[error("{} patched weight(s) were never loaded by the model:{}", weights.len(), list(weights))]
    NotApplied {
        /// The weights that were planned but never patched.
        weights: Vec<String>,
    },

    /// A tensor operation failed (boxed: candle's error is large).
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    /// Every `Result` of the crate carries this; keep it within clippy's `result_large_err`.
    #[test]
    fn error_is_small() {
        assert!(std::mem::size_of::<super::Error>() < 128);
    }
}
