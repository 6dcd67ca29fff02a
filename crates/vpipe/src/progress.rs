//! Progress of long steps: a bar on a terminal, log lines (`VPIPE_LOG=info`) otherwise, so
//! that logs and CI output stay quiet and parseable.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler of Ctrl-C, SIGTERM and SIGHUP (all three stop a run the same way): the
/// run stops at the next step, tile or phase boundary, writes the report so far, and leaves no
/// half-written output (outputs are renamed into place).
pub(crate) fn catch_interrupt() {
    // A second handler cannot be installed (e.g. in tests that call this twice): ignore.
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
}

/// The run was interrupted (Ctrl-C, SIGTERM or SIGHUP).
#[derive(Debug)]
pub(crate) struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "interrupted (Ctrl-C or SIGTERM); the report so far was written, no output file",
        )
    }
}

impl std::error::Error for Interrupted {}

/// An error when the run was asked to stop since it started.
pub(crate) fn check_interrupt() -> Result<(), Interrupted> {
    if interrupted() {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

/// Whether the run was asked to stop, for work that checks between its own units (tiles,
/// frames) through a callback.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The flag a stop request sets, for libraries that check it themselves (the video writer,
/// before each frame).
pub(crate) fn stop_flag() -> &'static AtomicBool {
    &INTERRUPTED
}

/// One long step's progress.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: &'static str,
    total: u64,
    done: u64,
}

impl Progress {
    /// Progress of `total` units of `label` (e.g. "sample", 30 steps).
    pub(crate) fn new(label: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label);
            bar
        });
        Self {
            bar,
            label,
            total,
            done: 0,
        }
    }

    /// One unit done; `detail` goes next to the bar or into the log line.
    pub(crate) fn inc(&mut self, detail: &str) {
        self.done += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_message(detail.to_owned());
                bar.inc(1);
            }
            None => tracing::info!("{} {}/{} {detail}", self.label, self.done, self.total),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
