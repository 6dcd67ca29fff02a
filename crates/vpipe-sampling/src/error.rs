//! The crate's error type.

/// What can go wrong when building a schedule or stepping a sampler.
#[derive(thiserror::Error)]
pub enum Error {
    // ---- configuration ----
    /// A schedule needs at least one step.
    #[error("steps must be at least 1, got 0")]
    ZeroSteps,

    /// The flow shift must be a finite number above zero.
    #[error("shift must be a finite number > 0, got {0}")]
    BadShift(f64),

    /// Denoise strength outside (0, 1].
    #[error("strength must be in (0, 1], got {0}")]
    BadStrength(f64),

    /// The strength keeps no step of the schedule (diffusers' `int(steps * strength)` is 0).
    #[error(
        "strength {strength} with {steps} steps runs no step (int({steps} * {strength}) = 0): \
         raise the strength to at least {min_strength} or use more steps"
    )]
    NoStepLeft {
        /// Steps of the full schedule.
        steps: usize,
        /// The strength asked for.
        strength: f64,
        /// The smallest strength that keeps one step.
        min_strength: f64,
    },

    /// A sigma outside [0, 1] given to a flow-matching function.
    #[error("{what}: sigma must be in [0, 1], got {sigma}")]
    BadSigma {
        /// The function or argument.
        what: &'static str,
        /// The value given.
        sigma: f64,
    },

    /// A sampler name that is neither Euler nor UniPC.
    #[error("unknown sampler {0:?}: expected \"euler\" or \"unipc\" (also \"uni_pc\")")]
    UnknownSampler(String),

    // ---- stepping ----
    /// `step` called after the last step of the schedule.
    #[error("the sampler has already run all {steps} steps of its schedule")]
    ScheduleExhausted {
        /// Steps of the schedule.
        steps: usize,
    },

    /// Two tensors that must have the same shape do not.
    #[error("{what}: expected shape {expected:?}, got shape {got:?}")]
    ShapeMismatch {
        /// Which argument.
        what: &'static str,
        /// The shape it must have.
        expected: Vec<usize>,
        /// The shape it has.
        got: Vec<usize>,
    },

    /// The driver got a number of model predictions other than the number of steps.
    #[error(
        "model_outputs holds {got} predictions along dim 0, the schedule has {expected} steps"
    )]
    OutputCount {
        /// Steps of the schedule.
        expected: usize,
        /// Rows of `model_outputs`.
        got: usize,
    },

    /// A batched CFG prediction whose batch is not [cond; uncond].
    #[error(
        "batched CFG prediction must be [2B, ...] (cond rows first, then uncond), \
         got shape {0:?}"
    )]
    NotCondUncondBatch(Vec<usize>),

    // ---- tensors ----
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

// As candle does: `Debug` shows the message, so that `unwrap` and `?` in `main` read well.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
