//! What can go wrong in a job, typed so that a caller can tell bad input from a refused budget
//! from a failed run (the `vpipe` binary turns each kind into its own exit code).

use std::path::PathBuf;

/// The error of every fallible function of this crate.
///
/// Lower crates' errors are kept whole (`transparent`: their text, their causes), so that a
/// caller can still look at them, e.g. whether a model error is about the input or a bug;
/// boxed, so that a `Result` of this crate stays small.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is not what was expected: a flag value or combination, a path, a file, a
    /// tensor.
    #[error("{0}")]
    BadInput(String),
    /// The plan of a run does not fit its budget: refused before any weight moves.
    #[error("{message}")]
    PlanDoesNotFit {
        message: String,
        /// The least compute budget the run can take.
        least_budget: u64,
    },
    /// A capability that is on the roadmap but not in this build.
    #[error("not built yet: {0}")]
    NotBuiltYet(&'static str),
    /// A job finished and wrote its output, but a measured peak exceeded the budget: the
    /// budget was not kept, so the job must not look like a success.
    #[error("{0}")]
    BudgetExceeded(String),
    /// Values that are not finite numbers appeared in the computation (a NaN in a checkpoint,
    /// an overflow): the output would be garbage, so the job stops naming where.
    #[error("{0}")]
    NonFinite(String),
    /// The observer asked the job to stop (Ctrl-C, SIGTERM or SIGHUP).
    #[error("interrupted (Ctrl-C or SIGTERM); the report so far was written, no output file")]
    Interrupted,
    /// A checkpoint's key layout lacks what the model needs to be streamed.
    #[error("{0}")]
    KeyLayout(&'static str),
    /// `--tile auto` on a frame too small to measure crops of.
    #[error(
        "--tile auto: the frame ({height}x{width} px) is too small to calibrate on; give --tile"
    )]
    FrameTooSmallToCalibrate { height: usize, width: usize },
    /// A CUDA device that exists in the build but could not be opened.
    #[error("--device {spec}: could not open the CUDA device: {error}")]
    Device {
        spec: String,
        error: Box<candle_core::Error>,
    },
    /// A path that cannot be written to (it has no file name).
    #[error("{}: not a file name", .0.display())]
    NotAFileName(PathBuf),
    /// Every temporary name tried for an output exists.
    #[error("creating a temporary file for {}: every name tried exists", .0.display())]
    NoTemporaryName(PathBuf),
    #[error(transparent)]
    Memory(Box<vpipe_mem::MemError>),
    #[error(transparent)]
    Checkpoint(Box<vpipe_ckpt::InspectError>),
    #[error(transparent)]
    Model(Box<vpipe_models::Error>),
    #[error(transparent)]
    Text(Box<vpipe_text::Error>),
    #[error(transparent)]
    Lora(Box<vpipe_lora::Error>),
    #[error(transparent)]
    Sampling(Box<vpipe_sampling::Error>),
    #[error(transparent)]
    Video(Box<vpipe_video::VideoError>),
    #[error(transparent)]
    Tensor(Box<candle_core::Error>),
    #[error(transparent)]
    Safetensors(Box<safetensors::SafeTensorError>),
    #[error(transparent)]
    Json(Box<serde_json::Error>),
    /// An I/O error, with what was being done to which file.
    #[error("{context}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// An error of this crate (boxed: the chain of causes reaches it as an [`Error`]), with
    /// what was being done when it happened.
    #[error("{context}")]
    Context {
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// The lower crate's error this one is, when it is one: what a caller matches on to tell
    /// kinds of failures of that crate apart.
    pub fn lower(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(match self {
            Error::Memory(e) => &**e,
            Error::Checkpoint(e) => &**e,
            Error::Model(e) => &**e,
            Error::Text(e) => &**e,
            Error::Lora(e) => &**e,
            Error::Sampling(e) => &**e,
            Error::Video(e) => &**e,
            Error::Tensor(e) => &**e,
            Error::Safetensors(e) => &**e,
            Error::Json(e) => &**e,
            Error::Io { source, .. } => source,
            _ => return None,
        })
    }
}

/// `From` each lower crate's error, into its boxed variant.
macro_rules! from_lower {
    ($($variant:ident: $error:ty,)*) => {
        $(
            impl From<$error> for Error {
                fn from(e: $error) -> Self {
                    Error::$variant(Box::new(e))
                }
            }
        )*
    };
}

from_lower! {
    Memory: vpipe_mem::MemError,
    Checkpoint: vpipe_ckpt::InspectError,
    Model: vpipe_models::Error,
    Text: vpipe_text::Error,
    Lora: vpipe_lora::Error,
    Sampling: vpipe_sampling::Error,
    Video: vpipe_video::VideoError,
    Tensor: candle_core::Error,
    Safetensors: safetensors::SafeTensorError,
    Json: serde_json::Error,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What was being done when an error happened, added as the error's outer message.
pub(crate) trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context.into(),
            source: Box::new(e.into()) as Box<Error>,
        })
    }

    fn with_context<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context().into(),
            source: Box::new(e.into()) as Box<Error>,
        })
    }
}

/// An I/O error with what was being done (`context`), e.g. `writing out.mp4`.
pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// [`Error::BudgetExceeded`] when the report shows a phase whose measured peak exceeded the
/// budget. Called after the output was written, so that the work is not lost; `what` names the
/// job's output.
pub fn budget_kept(report: &vpipe_mem::Report, what: &str) -> Result<()> {
    if report.violations.is_empty() {
        return Ok(());
    }
    let phases = report
        .violations
        .iter()
        .map(|v| {
            format!(
                "'{}' peaked at {} ({})",
                v.phase,
                vpipe_mem::fmt_bytes(v.peak),
                v.meter
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::BudgetExceeded(format!(
        "the budget of {} was not kept: {phases}, measured; {what} was written, but the run \
         needs more memory than it was given",
        vpipe_mem::fmt_bytes(report.violations[0].budget),
    )))
}

/// `err` and its causes on one line, `: `-separated.
pub(crate) fn chain(err: &Error) -> String {
    let mut line = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
}
