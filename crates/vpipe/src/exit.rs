//! The process's exit code and its one-line error message (the table of codes is
//! `vpipe_pipeline::exit_code`'s, which `vpipe serve` reports with each failed job too).

use std::process::ExitCode;

pub(crate) fn code_for(err: &anyhow::Error) -> ExitCode {
    ExitCode::from(vpipe_pipeline::exit_code(err.chain()))
}

/// The error and its causes on one line.
pub(crate) fn message(err: &anyhow::Error) -> String {
    vpipe_pipeline::one_line(err.chain())
}

pub(crate) fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        let cause = cause
            .downcast_ref::<vpipe_pipeline::Error>()
            .and_then(vpipe_pipeline::Error::lower)
            .unwrap_or(cause);
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
