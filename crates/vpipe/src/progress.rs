//! What a run shows while it works, and how Ctrl-C stops it: a bar on a terminal, log lines
//! (`VPIPE_LOG=info`) otherwise, so that logs and CI output stay quiet and parseable.

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

/// The flag [`catch_interrupt`]'s handler sets: what stops `vpipe serve`.
pub(crate) fn interrupt_flag() -> &'static AtomicBool {
    &INTERRUPTED
}

/// The observer of every command: progress on stderr, stopped by [`catch_interrupt`]'s flag.
#[derive(Default)]
pub(crate) struct Terminal {
    step: Option<Step>,
}

/// The long step under way.
struct Step {
    bar: Option<indicatif::ProgressBar>,
    label: &'static str,
    total: u64,
    done: u64,
}

impl vpipe_pipeline::Observer for Terminal {
    fn start(&mut self, label: &'static str, total: u64) {
        self.finish();
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
        self.step = Some(Step {
            bar,
            label,
            total,
            done: 0,
        });
    }

    fn advance(&mut self, detail: &str) {
        let Some(step) = &mut self.step else { return };
        step.done += 1;
        match &step.bar {
            Some(bar) => {
                bar.set_message(detail.to_owned());
                bar.inc(1);
            }
            None => tracing::info!("{} {}/{} {detail}", step.label, step.done, step.total),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.step.take().and_then(|s| s.bar) {
            bar.finish_and_clear();
        }
    }

    fn notice(&mut self, message: &str) {
        eprintln!("vpipe: {message}");
    }

    fn should_stop(&self) -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }

    fn stop_flag(&self) -> Option<&'static AtomicBool> {
        Some(&INTERRUPTED)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        vpipe_pipeline::Observer::finish(self);
    }
}
