//! `vpipe serve`: vpipe as a long-lived service. A JSON API over HTTP takes jobs (the settings
//! of `run.toml`, images and clips as uploads), one worker runs them in order through the same
//! library call as `vpipe run`, and a small web page submits jobs, shows the queue, the
//! progress, the live memory chart and the result.
//!
//! Every job gets the `report.json` and chart that `vpipe run --report` writes. The server
//! itself reads every meter at each job boundary (`GET /api/memory`, and `server-memory.json`
//! in the outputs folder), so that a long-lived process shows with its own measurements that
//! it gives back what each job took.
//!
//! The caller (the `vpipe` binary) supplies how a job's settings become [`RunOptions`] (the
//! same parsing and checks as its command line), and a stop flag (Ctrl-C, SIGTERM).

mod error;
mod http;
mod jobs;
mod memory;
mod settings;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use error::ServeError;
pub use jobs::{JobState, JobView};
pub use memory::{Boundary, MemoryRecord, ResidentModel, Sample};
pub use settings::Settings;
use vpipe_pipeline::RunOptions;

/// Turns a job's settings (keys of `run.toml`) into validated run options, with the same
/// checks and messages as the command line.
pub type JobParser = Arc<dyn Fn(&Settings) -> vpipe_pipeline::Result<RunOptions> + Send + Sync>;

/// How the server runs.
pub struct ServeConfig {
    /// Where to listen (loopback by default: the API runs jobs on this machine's GPU).
    pub listen: SocketAddr,
    /// The models folder: jobs name model files relative to it, and read nothing else.
    pub models: PathBuf,
    /// The outputs folder: each job writes in a folder of its own inside it.
    pub outputs: PathBuf,
    /// The device every job computes on (`cpu`, `cuda:0`).
    pub device: String,
    /// `--vram-budget` and `--ram-budget` of every job, as given.
    pub vram_budget: Option<String>,
    pub ram_budget: Option<String>,
    /// The largest request body taken (uploads included); larger ones get 413.
    pub max_request_bytes: usize,
    /// How many jobs may wait in the queue; more get 503.
    pub max_queued: usize,
    /// How many finished jobs the server keeps records of (their files stay on disk).
    pub max_kept: usize,
}

/// Shared by the handlers.
pub(crate) struct App {
    pub config: ServeConfig,
    pub parse: JobParser,
    pub jobs: Arc<jobs::Jobs>,
    pub memory: Arc<memory::MemoryLog>,
}

/// The first free job number in `outputs` (folders `job-N`), so that a restarted server does
/// not write into an earlier job's folder.
fn first_free_id(outputs: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(outputs) else {
        return 1;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("job-"))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .max()
        .map_or(1, |n| n + 1)
}

/// Runs the server until `stop` is set; `on_ready` gets the address it listens on (with port
/// 0, the one the system chose). A job running then is stopped as Ctrl-C stops `vpipe run`,
/// and queued jobs are cancelled.
pub fn serve(
    mut config: ServeConfig,
    parse: JobParser,
    stop: &'static AtomicBool,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    for (flag, folder) in [
        ("--models", &mut config.models),
        ("--outputs", &mut config.outputs),
    ] {
        *folder = folder
            .canonicalize()
            .map_err(|e| ServeError::BadConfig(format!("{flag} {}: {e}", folder.display())))?;
        if !folder.is_dir() {
            return Err(ServeError::BadConfig(format!(
                "{flag} {}: not a folder",
                folder.display()
            )));
        }
    }
    let budget = vpipe_mem::Budget {
        compute: config
            .vram_budget
            .as_deref()
            .and_then(vpipe_mem::parse_bytes),
        host: config
            .ram_budget
            .as_deref()
            .and_then(vpipe_mem::parse_bytes),
    };
    let device = vpipe_pipeline::open_device(&config.device)?;
    let meters = vpipe_mem::Meters::for_device(&device)?;
    let jobs = Arc::new(jobs::Jobs::new(
        first_free_id(&config.outputs),
        config.max_queued,
        config.max_kept,
    ));
    let memory = Arc::new(memory::MemoryLog::new(
        jobs.started(),
        config.device.clone(),
        budget,
        config.outputs.join("server-memory.json"),
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(error::io("starting the server's runtime"))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.listen))
        .map_err(error::io(format!("--listen {}", config.listen)))?;
    let address = listener
        .local_addr()
        .map_err(error::io(format!("--listen {}", config.listen)))?;

    let worker = {
        let (jobs, memory) = (jobs.clone(), memory.clone());
        std::thread::Builder::new()
            .name("vpipe-worker".into())
            .spawn(move || worker::work(jobs, memory, (device, budget), meters))
            .map_err(error::io("starting the worker"))?
    };
    let sampler_done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (memory, done) = (memory.clone(), sampler_done.clone());
        std::thread::Builder::new()
            .name("vpipe-memory".into())
            .spawn(move || sample_host(&memory, &done))
            .map_err(error::io("starting the memory sampler"))?
    };

    let app = Arc::new(App {
        config,
        parse,
        jobs: jobs.clone(),
        memory,
    });
    on_ready(address);
    let served = runtime.block_on(async move {
        let router = http::router(app);
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            })
            .await
    });
    jobs.shut_down();
    let _ = worker.join();
    sampler_done.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    served.map_err(error::io(format!("serving on {address}")))
}

/// Reads the host meters every [`memory::SAMPLE_EVERY`] for the live chart (the device is read
/// at the job boundaries, on the worker's thread, where its context is current).
fn sample_host(memory: &memory::MemoryLog, done: &AtomicBool) {
    let meters = vpipe_mem::Meters::host();
    while !done.load(Ordering::SeqCst) {
        if let Ok(reading) = meters.read_in_flight() {
            memory.sample(&reading);
        }
        std::thread::sleep(memory::SAMPLE_EVERY);
    }
}
