use std::path::PathBuf;

/// Everything the memory core can refuse or detect.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    // --- meters ---
    /// A meter could not be read.
    #[error("{meter} meter: {detail}")]
    Meter {
        /// Which meter (`host`, `cuda`).
        meter: &'static str,
        /// What went wrong.
        detail: String,
    },

    // --- checkpoints ---
    /// A checkpoint could not be opened, mapped or parsed.
    #[error("{}: {detail}", path.display())]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },

    // --- store ---
    /// No model of that name is registered.
    #[error("model '{model}' is not registered in the residency store")]
    UnknownModel {
        /// The name asked for.
        model: String,
    },
    /// A model is not in the tier an operation needs.
    #[error(
        "model '{model}': {operation} needs it in the {needed} tier, it is in the {actual} tier"
    )]
    WrongTier {
        /// The model.
        model: String,
        /// What was attempted.
        operation: &'static str,
        /// The tier the operation needs.
        needed: crate::Tier,
        /// Where the model is.
        actual: crate::Tier,
    },
    /// A leased model has no tensor of that name.
    #[error("model '{model}' has no tensor '{tensor}'")]
    UnknownTensor {
        /// The model.
        model: String,
        /// The tensor asked for.
        tensor: String,
    },
    /// Loading would exceed the budget of a tier; nothing was loaded.
    #[error(
        "refused to load '{model}' into the {tier} tier: it needs {} but only {} of the {} budget is left ({} in use)",
        crate::fmt_bytes(*needed),
        crate::fmt_bytes(allowed.saturating_sub(*in_use)),
        crate::fmt_bytes(*allowed),
        crate::fmt_bytes(*in_use)
    )]
    OverBudget {
        /// The model that was to be loaded.
        model: String,
        /// The tier it was to be loaded into.
        tier: crate::Tier,
        /// Bytes the model needs in that tier.
        needed: u64,
        /// Bytes in use in that tier, measured before the load.
        in_use: u64,
        /// The tier's budget.
        allowed: u64,
    },
    /// A transition's measured effect did not match what it should have done.
    #[error(
        "'{model}' {from} -> {to}: {meter} changed by {} but {} was expected (tolerance {}); {hint}",
        crate::fmt_signed_bytes(*measured),
        crate::fmt_signed_bytes(*expected),
        crate::fmt_bytes(*tolerance)
    )]
    VerificationFailed {
        /// The model moved.
        model: String,
        /// Tier it left.
        from: crate::Tier,
        /// Tier it went to.
        to: crate::Tier,
        /// The meter that disagreed.
        meter: String,
        /// Expected change in bytes (negative: freed).
        expected: i64,
        /// Measured change in bytes.
        measured: i64,
        /// Allowed difference.
        tolerance: u64,
        /// What usually causes it.
        hint: &'static str,
    },
    /// A phase added more to the compute tier than its models and outputs explain.
    #[error(
        "phase '{phase}' added {} to the {tier} tier but its resident models and declared outputs explain {} (tolerance {}): memory is accumulating",
        crate::fmt_signed_bytes(*grown),
        crate::fmt_signed_bytes(*explained),
        crate::fmt_bytes(*tolerance)
    )]
    PhaseLeak {
        /// The phase.
        phase: String,
        /// The compute tier.
        tier: crate::Tier,
        /// Measured change of the compute tier over the phase.
        grown: i64,
        /// Change the resident models and declared outputs account for.
        explained: i64,
        /// Allowed difference.
        tolerance: u64,
    },

    // --- device ---
    /// A tensor or device operation failed.
    #[error("{context}: {source}")]
    Tensor {
        /// What was being done.
        context: String,
        /// candle's error.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// Writing a report or chart failed.
    #[error("{}: {source}", path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}
