//! Exit codes, so that a job scheduler can tell bad input from a refused budget from a failed
//! run.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the run failed (I/O, device, a bug) |
//! | 2 | bad input: a flag, a file, a tensor is not what was expected |
//! | 3 | refused: the work does not fit the memory budget (nothing was loaded) |
//! | 4 | a memory verification failed: an offload did not free what it should have |
//! | 5 | not built yet |
//! | 6 | the output was written, but a phase's measured peak exceeded the budget |
//! | 130 | interrupted (Ctrl-C, SIGTERM or SIGHUP): the report so far, no output |

use std::process::ExitCode;

use vpipe_mem::MemError;

/// A capability that is on the roadmap but not in this build.
#[derive(Debug)]
pub(crate) struct NotBuiltYet(pub(crate) &'static str);

impl std::fmt::Display for NotBuiltYet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not built yet: {}", self.0)
    }
}

impl std::error::Error for NotBuiltYet {}

/// An error that is its message, and whose type tells [`code_for`] the exit code.
macro_rules! message_error {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub(crate) struct $name(pub(crate) String);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::error::Error for $name {}
    };
}

message_error!(
    /// Bad input found by vpipe itself (flag values, combinations, paths) (exit 2).
    BadInput
);
message_error!(
    /// The plan of a run does not fit its budget: refused before any weight moves (exit 3).
    PlanDoesNotFit
);
message_error!(
    /// A run finished and wrote its output, but a measured peak exceeded `--vram-budget`: the
    /// budget was not kept, so the run must not look like a success (exit 6).
    BudgetExceeded
);
message_error!(
    /// Values that are not finite numbers appeared in the computation (a NaN in a checkpoint,
    /// an overflow): the output would be garbage, so the run stops naming where (exit 1).
    NonFinite
);

/// Exit 6 when the report shows a phase whose measured peak exceeded the budget. Called after
/// the output was written, so that the work is not lost; `what` names the command's output.
pub(crate) fn budget_kept(report: &vpipe_mem::Report, what: &str) -> Result<(), BudgetExceeded> {
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
    Err(BudgetExceeded(format!(
        "the budget of {} was not kept: {phases}, measured; {what} was written, but the run \
         needs more memory than it was given",
        vpipe_mem::fmt_bytes(report.violations[0].budget),
    )))
}

pub(crate) fn code_for(err: &anyhow::Error) -> ExitCode {
    for cause in err.chain() {
        if cause.is::<BadInput>() || cause.is::<vpipe_ckpt::InspectError>() {
            return ExitCode::from(2);
        }
        if let Some(model) = cause.downcast_ref::<vpipe_models::Error>() {
            use vpipe_models::Error::*;
            if matches!(
                model,
                Rank { .. }
                    | Empty { .. }
                    | Channels { .. }
                    | FrameCount { .. }
                    | SpatialSize { .. }
                    | UnsupportedFile { .. }
                    | UnknownLayout { .. }
                    | Config { .. }
                    | NoDit { .. }
                    | DitConfig { .. }
                    | DitInput { .. }
                    | TooLarge { .. }
            ) {
                return ExitCode::from(2);
            }
        }
        // LoRA files, text-encoder inputs and sampler settings: every error but a tensor
        // operation's is about what the user passed.
        let bad_input = cause
            .downcast_ref::<vpipe_lora::Error>()
            .is_some_and(|e| !matches!(e, vpipe_lora::Error::Candle(_)))
            || cause
                .downcast_ref::<vpipe_text::Error>()
                .is_some_and(|e| !matches!(e, vpipe_text::Error::Candle(_)))
            || cause
                .downcast_ref::<vpipe_sampling::Error>()
                .is_some_and(|e| !matches!(e, vpipe_sampling::Error::Candle(_)));
        if bad_input {
            return ExitCode::from(2);
        }
        if tensor_error(cause).is_some_and(is_checkpoint_mismatch) {
            return ExitCode::from(2);
        }
        if cause.is::<crate::progress::Interrupted>() {
            return ExitCode::from(130);
        }
        if cause.is::<PlanDoesNotFit>() {
            return ExitCode::from(3);
        }
        if cause.is::<NotBuiltYet>() {
            return ExitCode::from(5);
        }
        if cause.is::<BudgetExceeded>() {
            return ExitCode::from(6);
        }
        if let Some(mem) = cause.downcast_ref::<MemError>() {
            return ExitCode::from(match mem {
                MemError::OverBudget { .. } => 3,
                MemError::VerificationFailed { .. } | MemError::PhaseLeak { .. } => 4,
                MemError::Checkpoint { .. } => 2,
                _ => 1,
            });
        }
    }
    ExitCode::from(1)
}

/// The tensor library's error behind `cause`: itself, or the one a model crate wraps
/// transparently (which the chain of causes skips).
fn tensor_error<'e>(
    cause: &'e (dyn std::error::Error + 'static),
) -> Option<&'e candle_core::Error> {
    if let Some(e) = cause.downcast_ref::<candle_core::Error>() {
        return Some(e);
    }
    match cause.downcast_ref::<vpipe_models::Error>() {
        Some(vpipe_models::Error::Candle(e)) => return Some(e),
        Some(_) => return None,
        None => {}
    }
    match cause.downcast_ref::<vpipe_text::Error>() {
        Some(vpipe_text::Error::Candle(e)) => Some(e),
        _ => None,
    }
}

/// Whether a tensor-library error says that a checkpoint lacks a tensor the model needs or holds
/// one of another shape: what a model's constructor reports for a file that is not the model
/// its header looked like.
fn is_checkpoint_mismatch(e: &candle_core::Error) -> bool {
    use candle_core::Error as E;
    match e {
        E::UnexpectedShape { .. } | E::CannotFindTensor { .. } => true,
        E::Context { inner, .. } | E::WithPath { inner, .. } | E::WithBacktrace { inner, .. } => {
            is_checkpoint_mismatch(inner)
        }
        _ => false,
    }
}

/// The error and its causes on one line, `: `-separated, each cause once: libraries often
/// repeat their source's text in their own message, which `{:#}` would print twice.
pub(crate) fn message(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

pub(crate) fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        let kind = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => Some(io.kind()),
            // serde_json keeps the I/O error inside, not in the source chain.
            None => cause
                .downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind),
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}
