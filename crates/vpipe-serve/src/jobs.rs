//! The queue and what the server knows of each job: one worker takes the jobs in order, the
//! HTTP side reads their state and cancels them.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;
use vpipe_pipeline::RunOptions;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// The long step a running job is in (loading, sampling, decoding, writing) and how far along.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub step: Option<&'static str>,
    pub done: u64,
    pub total: u64,
    pub detail: String,
}

/// Why a job did not succeed: the message and exit code `vpipe run` would have given.
#[derive(Debug, Clone, Serialize)]
pub struct JobError {
    pub message: String,
    pub exit_code: u8,
}

/// Notices kept per job (resized inputs, dropped frames): enough for any run, bounded so that
/// a job cannot grow the server.
const MAX_NOTICES: usize = 32;

/// One job as the server shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: u64,
    pub state: JobState,
    pub prompt: String,
    pub mode: &'static str,
    /// Milliseconds since the server started.
    pub submitted_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub progress: Progress,
    pub notices: Vec<String>,
    pub error: Option<JobError>,
    /// Whether the job wrote its video and its report (a failed or cancelled job still has a
    /// report of what it did).
    pub video: bool,
    pub report: bool,
}

struct Record {
    view: JobView,
    /// The job's folder under the outputs folder.
    dir: PathBuf,
    /// The settings, until the worker takes them.
    options: Option<RunOptions>,
}

struct Inner {
    next_id: u64,
    jobs: BTreeMap<u64, Record>,
    queue: VecDeque<u64>,
    running: Option<u64>,
    shutting_down: bool,
}

/// The jobs, shared by the HTTP handlers and the worker.
pub struct Jobs {
    inner: Mutex<Inner>,
    wake: Condvar,
    started: Instant,
    /// The running job's stop flag, set by a cancel or by the server's shutdown; cleared, under
    /// the lock, when the next job starts, so that a cancel cannot reach a later job.
    stop: &'static AtomicBool,
    max_queued: usize,
    max_kept: usize,
}

/// Why a job cannot be queued or cancelled.
#[derive(Debug)]
pub enum Refusal {
    QueueFull(usize),
    ShuttingDown,
    Unknown(u64),
    Finished(u64, JobState),
    NotFinished(u64, JobState),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::QueueFull(n) => write!(f, "the queue holds {n} jobs, its limit; retry later"),
            Refusal::ShuttingDown => write!(f, "the server is shutting down"),
            Refusal::Unknown(id) => write!(f, "no job {id}"),
            Refusal::Finished(id, state) => {
                write!(f, "job {id} has already finished ({state:?})")
            }
            Refusal::NotFinished(id, state) => {
                write!(f, "job {id} is {state:?}; cancel it first")
            }
        }
    }
}

/// Characters of a prompt the job list shows (the job runs with all of it).
const SHOWN_PROMPT_CHARS: usize = 500;

/// The prompt as the job list shows it: cut after [`SHOWN_PROMPT_CHARS`], so that the kept
/// records stay small whatever was submitted.
fn shown_prompt(prompt: &str) -> String {
    match prompt.char_indices().nth(SHOWN_PROMPT_CHARS) {
        Some((end, _)) => format!("{}…", &prompt[..end]),
        None => prompt.to_owned(),
    }
}

/// Milliseconds since `start`.
fn ms_since(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

impl Jobs {
    /// An empty queue whose first job gets `first_id`; at most `max_queued` jobs wait, and the
    /// records of the newest `max_kept` finished jobs are kept (their files stay on disk).
    pub fn new(first_id: u64, max_queued: usize, max_kept: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                next_id: first_id,
                jobs: BTreeMap::new(),
                queue: VecDeque::with_capacity(max_queued),
                running: None,
                shutting_down: false,
            }),
            wake: Condvar::new(),
            started: Instant::now(),
            stop: Box::leak(Box::new(AtomicBool::new(false))),
            max_queued,
            max_kept,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while the lock was held left consistent data (every update is one
        // assignment); the server keeps serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The id the next job will get, for its folder.
    pub fn reserve_id(&self) -> u64 {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        id
    }

    /// Queues job `id` (from [`Self::reserve_id`]) with its validated settings.
    pub fn push(
        &self,
        id: u64,
        dir: PathBuf,
        options: RunOptions,
        mode: &'static str,
    ) -> Result<JobView, Refusal> {
        let mut inner = self.lock();
        if inner.shutting_down {
            return Err(Refusal::ShuttingDown);
        }
        if inner.queue.len() >= self.max_queued {
            return Err(Refusal::QueueFull(inner.queue.len()));
        }
        let view = JobView {
            id,
            state: JobState::Queued,
            prompt: shown_prompt(&options.prompt),
            mode,
            submitted_ms: ms_since(self.started),
            started_ms: None,
            finished_ms: None,
            progress: Progress::default(),
            notices: Vec::new(),
            error: None,
            video: false,
            report: false,
        };
        inner.jobs.insert(
            id,
            Record {
                view: view.clone(),
                dir,
                options: Some(options),
            },
        );
        inner.queue.push_back(id);
        self.forget_old(&mut inner);
        self.wake.notify_all();
        Ok(view)
    }

    /// Drops the records of the oldest finished jobs beyond the kept number.
    fn forget_old(&self, inner: &mut Inner) {
        let finished = inner
            .jobs
            .values()
            .filter(|r| r.view.state.is_finished())
            .count();
        let excess = finished.saturating_sub(self.max_kept);
        if excess == 0 {
            return;
        }
        let old: Vec<u64> = inner
            .jobs
            .iter()
            .filter(|(_, r)| r.view.state.is_finished())
            .map(|(&id, _)| id)
            .take(excess)
            .collect();
        for id in old {
            inner.jobs.remove(&id);
        }
    }

    /// Waits for the next queued job and marks it running; `None` once the server shuts down.
    pub fn next(&self) -> Option<(u64, RunOptions, PathBuf)> {
        let mut inner = self.lock();
        loop {
            if inner.shutting_down {
                return None;
            }
            while let Some(id) = inner.queue.pop_front() {
                let started = ms_since(self.started);
                let Some(record) = inner.jobs.get_mut(&id) else {
                    continue;
                };
                let Some(options) = record.options.take() else {
                    continue;
                };
                record.view.state = JobState::Running;
                record.view.started_ms = Some(started);
                let dir = record.dir.clone();
                inner.running = Some(id);
                self.stop.store(false, Ordering::SeqCst);
                return Some((id, options, dir));
            }
            inner = self.wake.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// `look` at the settings of the job that [`Self::next`] would give now, if any (under the
    /// queue's lock: keep it short).
    pub fn peek_next<R>(&self, look: impl FnOnce(&RunOptions) -> R) -> Option<R> {
        let inner = self.lock();
        let options = inner
            .queue
            .iter()
            .find_map(|id| inner.jobs.get(id)?.options.as_ref())?;
        Some(look(options))
    }

    /// Records how job `id` ended.
    pub fn finish(
        &self,
        id: u64,
        state: JobState,
        error: Option<JobError>,
        video: bool,
        report: bool,
    ) {
        let mut inner = self.lock();
        let finished = ms_since(self.started);
        if let Some(record) = inner.jobs.get_mut(&id) {
            let view = &mut record.view;
            view.state = state;
            view.finished_ms = Some(finished);
            view.error = error;
            view.video = video;
            view.report = report;
        }
        if inner.running == Some(id) {
            inner.running = None;
        }
        self.forget_old(&mut inner);
    }

    /// Cancels job `id`: a queued job never starts; a running one stops at its next step, tile
    /// or frame, as Ctrl-C stops `vpipe run` (the report so far, no video).
    pub fn cancel(&self, id: u64) -> Result<JobView, Refusal> {
        let mut inner = self.lock();
        let running = inner.running;
        let finished = ms_since(self.started);
        let record = inner.jobs.get_mut(&id).ok_or(Refusal::Unknown(id))?;
        match record.view.state {
            JobState::Queued => {
                record.view.state = JobState::Cancelled;
                record.view.finished_ms = Some(finished);
                record.options = None;
                let view = record.view.clone();
                inner.queue.retain(|&q| q != id);
                self.forget_old(&mut inner);
                Ok(view)
            }
            JobState::Running if running == Some(id) => {
                self.stop.store(true, Ordering::SeqCst);
                Ok(record.view.clone())
            }
            state => Err(Refusal::Finished(id, state)),
        }
    }

    /// Forgets finished job `id` and returns its folder, for the caller to remove; a job that
    /// has not finished is refused (cancel it first).
    pub fn remove(&self, id: u64) -> Result<PathBuf, Refusal> {
        let mut inner = self.lock();
        let record = inner.jobs.get(&id).ok_or(Refusal::Unknown(id))?;
        if !record.view.state.is_finished() {
            return Err(Refusal::NotFinished(id, record.view.state));
        }
        let record = inner.jobs.remove(&id).ok_or(Refusal::Unknown(id))?;
        Ok(record.dir)
    }

    /// Stops taking jobs: the running one is stopped, the queued ones are cancelled.
    pub fn shut_down(&self) {
        let mut inner = self.lock();
        inner.shutting_down = true;
        self.stop.store(true, Ordering::SeqCst);
        let finished = ms_since(self.started);
        let queued: Vec<u64> = inner.queue.drain(..).collect();
        for id in queued {
            if let Some(record) = inner.jobs.get_mut(&id) {
                record.view.state = JobState::Cancelled;
                record.view.finished_ms = Some(finished);
                record.options = None;
            }
        }
        self.wake.notify_all();
    }

    /// The running job's stop flag (the observer's).
    pub fn stop_flag(&self) -> &'static AtomicBool {
        self.stop
    }

    pub fn update(&self, id: u64, change: impl FnOnce(&mut JobView)) {
        if let Some(record) = self.lock().jobs.get_mut(&id) {
            change(&mut record.view);
        }
    }

    /// Adds a notice to job `id` (beyond the kept number, the last one says how many more).
    pub fn notice(&self, id: u64, message: &str) {
        self.update(id, |view| match view.notices.len() {
            n if n < MAX_NOTICES - 1 => view.notices.push(message.to_owned()),
            n if n == MAX_NOTICES - 1 => view.notices.push("(more notices not kept)".into()),
            _ => {}
        });
    }

    pub fn view(&self, id: u64) -> Option<JobView> {
        self.lock().jobs.get(&id).map(|r| r.view.clone())
    }

    /// Job `id`'s folder, while its record is kept.
    pub fn dir(&self, id: u64) -> Option<PathBuf> {
        self.lock().jobs.get(&id).map(|r| r.dir.clone())
    }

    /// Every kept job, newest first.
    pub fn list(&self) -> Vec<JobView> {
        self.lock()
            .jobs
            .values()
            .rev()
            .map(|r| r.view.clone())
            .collect()
    }

    pub fn started(&self) -> Instant {
        self.started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_list_shows_the_start_of_a_long_prompt() {
        assert_eq!(shown_prompt("a kite"), "a kite");
        let long = "é".repeat(SHOWN_PROMPT_CHARS + 10);
        let shown = shown_prompt(&long);
        assert_eq!(shown.chars().count(), SHOWN_PROMPT_CHARS + 1);
        assert!(shown.ends_with('…'));
    }
}
