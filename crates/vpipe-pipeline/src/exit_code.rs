//! What kind of failure an error is, as the exit code that a job scheduler acts on: the `vpipe`
//! binary exits with it and `vpipe serve` reports it with each failed job, so both tell bad
//! input from a refused budget from a failed run the same way.
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
//! | 130 | interrupted (Ctrl-C, SIGTERM or SIGHUP; a cancelled job): the report so far, no output |

use std::error::Error as StdError;

use vpipe_mem::MemError;

use crate::error::Error;

/// The exit code of an error whose causes are `chain` (the error first): the first cause that
/// decides one, else 1.
pub fn exit_code<'e>(chain: impl IntoIterator<Item = &'e (dyn StdError + 'static)>) -> u8 {
    chain.into_iter().find_map(code_of).unwrap_or(1)
}

/// The error and its causes (the error first).
pub fn causes<'e>(
    err: &'e (dyn StdError + 'static),
) -> impl Iterator<Item = &'e (dyn StdError + 'static)> {
    let mut next = Some(err);
    std::iter::from_fn(move || {
        let current: &'e (dyn StdError + 'static) = next?;
        next = current.source();
        Some(current)
    })
}

/// The error and its causes on one line, `: `-separated, each cause once: libraries often
/// repeat their source's text in their own message, which `{:#}` would print twice.
pub fn one_line<'e>(chain: impl IntoIterator<Item = &'e (dyn StdError + 'static)>) -> String {
    let mut line = String::new();
    for cause in chain {
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

/// The exit code `cause` decides, or `None` when its causes (next in the chain) decide.
fn code_of(cause: &(dyn StdError + 'static)) -> Option<u8> {
    let Some(err) = cause.downcast_ref::<Error>() else {
        return lower_code(cause);
    };
    match err {
        Error::BadInput(_) => Some(2),
        Error::PlanDoesNotFit { .. } => Some(3),
        Error::NotBuiltYet(_) => Some(5),
        Error::BudgetExceeded(_) => Some(6),
        Error::Interrupted => Some(130),
        _ => err.lower().and_then(lower_code),
    }
}

/// The exit code an error of a lower crate decides.
fn lower_code(cause: &(dyn StdError + 'static)) -> Option<u8> {
    if cause.is::<vpipe_ckpt::InspectError>() {
        return Some(2);
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
                | ClipConfig { .. }
                | ClipInput { .. }
                | TooLarge { .. }
        ) {
            return Some(2);
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
        return Some(2);
    }
    if tensor_error(cause).is_some_and(is_checkpoint_mismatch) {
        return Some(2);
    }
    let mem = cause.downcast_ref::<MemError>()?;
    Some(match mem {
        MemError::OverBudget { .. } => 3,
        MemError::VerificationFailed { .. } | MemError::PhaseLeak { .. } => 4,
        MemError::Checkpoint { .. } => 2,
        _ => 1,
    })
}

/// The tensor library's error behind `cause`: itself, or the one a model crate wraps
/// transparently (which the chain of causes skips).
fn tensor_error<'e>(cause: &'e (dyn StdError + 'static)) -> Option<&'e candle_core::Error> {
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
