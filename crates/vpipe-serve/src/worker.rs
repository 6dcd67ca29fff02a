//! The one worker: takes the queued jobs in order and runs each through the same library call
//! as `vpipe run`, in the server's process, on the one device it keeps open, in one memory
//! session for the server's life. Each job is a record of that session (its own report); the
//! models the job queued next uses stay resident when its plan fits with them, every other is
//! given back, verified. The server reads the session's meters before and after each job.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vpipe_pipeline::{Observer, RunOptions};

use crate::jobs::{JobError, JobState, Jobs, Progress};
use crate::memory::{MemoryLog, ResidentModel};

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

/// What `session` holds resident now.
fn resident_models(session: &vpipe_mem::MemorySession) -> Vec<ResidentModel> {
    session
        .resident_models()
        .into_iter()
        .map(|id| ResidentModel {
            name: session.model_name(id).to_owned(),
            tier: session.tier(id),
            bytes: session.model_bytes(id),
        })
        .collect()
}

/// Runs jobs until the server shuts down in one memory session on `device` under `budget`,
/// made on this thread (the CPU matmul library's buffers, part of its baseline, are this
/// thread's) when the first job comes, so that its baseline is the process ready to run jobs
/// (the HTTP side's buffers made); reads its meters at each job's start and end. `meters`
/// reads the server's start and takes the live samples while a job runs.
pub fn work(
    jobs: Arc<Jobs>,
    memory: Arc<MemoryLog>,
    (device, budget): (candle_core::Device, vpipe_mem::Budget),
    meters: vpipe_mem::Meters,
) {
    let read =
        |at: &'static str, job: Option<u64>, session: &vpipe_mem::MemorySession| match session
            .meters()
            .read()
        {
            Ok(reading) => memory.boundary(at, job, &reading, resident_models(session)),
            Err(e) => tracing::warn!("memory reading at {at}: {e}"),
        };
    match meters.read() {
        Ok(reading) => memory.boundary("server start", None, &reading, Vec::new()),
        Err(e) => tracing::warn!("memory reading at the server's start: {e}"),
    }
    let mut session = None;
    while let Some((id, options, dir)) = jobs.next() {
        let session = match &mut session {
            Some(session) => session,
            None => match vpipe_mem::MemorySession::new(device.clone(), budget) {
                Ok(made) => session.insert(made),
                Err(e) => {
                    let error = JobError {
                        message: format!("the server's memory session could not start: {e}"),
                        exit_code: 1,
                    };
                    jobs.finish(id, JobState::Failed, Some(error), false, false);
                    continue;
                }
            },
        };
        read("job start", Some(id), session);
        tracing::info!("job {id} started");
        let mut observer = JobObserver {
            id,
            jobs: &jobs,
            stop: jobs.stop_flag(),
            meters: &meters,
            memory: &memory,
            last_sample: Instant::now(),
        };
        let (state, error) = run_job(options, session, &jobs, &mut observer);
        // The boundary is on record (and in the file) before the job shows as finished, so
        // that whoever waits for the job finds its end reading.
        read("job end", Some(id), session);
        let (video, report) = (dir.join("video.mp4"), dir.join("report.json"));
        jobs.finish(id, state, error, video.is_file(), report.is_file());
        tracing::info!("job {id} {state:?}");
    }
}

/// Runs one job; a panic inside it fails the job, not the server.
/// At its end, the job queued next then is planned to decide what stays resident for it (a
/// next job whose files cannot be planned keeps nothing: it will fail on its own).
fn run_job(
    options: RunOptions,
    session: &mut vpipe_mem::MemorySession,
    jobs: &Jobs,
    observer: &mut JobObserver<'_>,
) -> (JobState, Option<JobError>) {
    let out = options.out.clone();
    let mut next = || {
        jobs.peek_next(vpipe_pipeline::plan_next)
            .and_then(|planned| planned.ok())
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vpipe_pipeline::run_in_session(options, session, observer, &mut next)
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
