//! The one worker: takes the queued jobs in order and runs each through the same library call
//! as `vpipe run`, in the server's process, on the one device it keeps open. Every job loads its models and gives them back,
//! verified by its own memory session; the server reads every meter before and after each job.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vpipe_pipeline::{Observer, RunOptions};

use crate::jobs::{JobError, JobState, Jobs, Progress};
use crate::memory::MemoryLog;

/// A job's observer: its progress and notices go to the job's record, and it stops when the
/// job is cancelled or the server shuts down.
struct JobObserver<'a> {
    id: u64,
    jobs: &'a Jobs,
    stop: &'static AtomicBool,
    /// The live chart's device readings: taken here, on the thread whose device context is
    /// current, at most every [`crate::memory::SAMPLE_EVERY`].
    meters: &'a vpipe_mem::Meters,
    memory: &'a MemoryLog,
    last_sample: Instant,
}

impl JobObserver<'_> {
    fn sample(&mut self) {
        if self.last_sample.elapsed() < crate::memory::SAMPLE_EVERY {
            return;
        }
        self.last_sample = Instant::now();
        if let Ok(reading) = self.meters.read_in_flight() {
            self.memory.sample(&reading);
        }
    }
}

impl Observer for JobObserver<'_> {
    fn start(&mut self, label: &'static str, total: u64) {
        self.jobs.update(self.id, |view| {
            view.progress = Progress {
                step: Some(label),
                done: 0,
                total,
                detail: String::new(),
            }
        });
        self.sample();
    }

    fn advance(&mut self, detail: &str) {
        self.jobs.update(self.id, |view| {
            view.progress.done += 1;
            view.progress.detail.clear();
            view.progress.detail.push_str(detail);
        });
        self.sample();
    }

    fn finish(&mut self) {}

    fn notice(&mut self, message: &str) {
        self.jobs.notice(self.id, message);
    }

    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn stop_flag(&self) -> Option<&'static AtomicBool> {
        Some(self.stop)
    }
}

/// Runs jobs until the server shuts down, reading `meters` at each job's start and end.
pub fn work(
    jobs: Arc<Jobs>,
    memory: Arc<MemoryLog>,
    device: candle_core::Device,
    meters: vpipe_mem::Meters,
) {
    let read = |at: &'static str, job: Option<u64>| match meters.read() {
        Ok(reading) => memory.boundary(at, job, &reading),
        Err(e) => tracing::warn!("memory reading at {at}: {e}"),
    };
    read("server start", None);
    while let Some((id, options, dir)) = jobs.next() {
        read("job start", Some(id));
        tracing::info!("job {id} started");
        let mut observer = JobObserver {
            id,
            jobs: &jobs,
            stop: jobs.stop_flag(),
            meters: &meters,
            memory: &memory,
            last_sample: Instant::now(),
        };
        let (state, error) = run_job(options, &device, &mut observer);
        let (video, report) = (dir.join("video.mp4"), dir.join("report.json"));
        jobs.finish(id, state, error, video.is_file(), report.is_file());
        tracing::info!("job {id} {state:?}");
        read("job end", Some(id));
    }
}

/// Runs one job; a panic inside it fails the job, not the server.
fn run_job(
    options: RunOptions,
    device: &candle_core::Device,
    observer: &mut JobObserver<'_>,
) -> (JobState, Option<JobError>) {
    let out = options.out.clone();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vpipe_pipeline::run_on(options, device, observer)
            .and_then(|report| vpipe_pipeline::budget_kept(&report, &output_name(&out)))
    }));
    match outcome {
        Ok(Ok(())) => (JobState::Succeeded, None),
        Ok(Err(err)) => {
            let exit_code = vpipe_pipeline::exit_code(vpipe_pipeline::causes(&err));
            let state = if exit_code == 130 {
                JobState::Cancelled
            } else {
                JobState::Failed
            };
            let message = vpipe_pipeline::one_line(vpipe_pipeline::causes(&err));
            (state, Some(JobError { message, exit_code }))
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            (
                JobState::Failed,
                Some(JobError {
                    message: format!("internal error: {what}"),
                    exit_code: 1,
                }),
            )
        }
    }
}

/// How a job's output is named in messages: its file name (the folder is the server's).
fn output_name(out: &Path) -> String {
    out.file_name().map_or_else(
        || out.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
