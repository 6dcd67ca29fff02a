//! The server's own memory record: a reading of every meter at each job boundary (the proof
//! that jobs give back what they took), and a bounded series of live samples for the page's
//! chart. Both are measured; neither grows without bound.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use vpipe_mem::Reading;

/// Live samples kept: ten minutes at [`SAMPLE_EVERY`].
const MAX_SAMPLES: usize = 1200;
/// How often the sampler reads the host meters.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// Job boundaries kept besides the server's first reading (two per job).
const MAX_BOUNDARIES: usize = 4000;

/// One reading, as the page draws it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Milliseconds since the server started.
    pub t_ms: u64,
    /// Live heap bytes (the counting allocator), when installed.
    pub heap: Option<u64>,
    /// Anonymous resident host pages.
    pub host_anon: u64,
    /// Resident shared-memory pages (where the driver maps pinned host memory).
    pub host_shmem: u64,
    /// The process's whole device footprint (pool reserved + outside the pool), on CUDA.
    pub device_footprint: Option<u64>,
}

impl Sample {
    fn of(reading: &Reading, t_ms: u64) -> Self {
        Self {
            t_ms,
            heap: reading.heap.map(|h| h.current),
            host_anon: reading.host.anon,
            host_shmem: reading.host.shmem,
            device_footprint: reading.device_footprint(),
        }
    }
}

/// A model the server's memory session holds resident at a boundary (kept for the next job).
#[derive(Debug, Clone, Serialize)]
pub struct ResidentModel {
    pub name: String,
    /// `host` or `device`.
    pub tier: vpipe_mem::Tier,
    /// Its weights as the store counts them (verified by measurement when loaded).
    pub bytes: u64,
}

/// A reading at a job boundary.
#[derive(Debug, Clone, Serialize)]
pub struct Boundary {
    /// `server start`, `job start` or `job end`.
    pub at: &'static str,
    pub job: Option<u64>,
    #[serde(flatten)]
    pub sample: Sample,
    /// Resident file-backed pages (mapped checkpoints, the binary).
    pub host_file: u64,
    /// The CUDA pool's reserve, on CUDA.
    pub pool_reserved: Option<u64>,
    /// The compute tier's use as the session's meter reads it (`pool_used` on CUDA, the heap
    /// or RssAnon on the CPU), and that meter's name.
    pub compute_used: u64,
    pub compute_meter: &'static str,
    /// The models the session holds resident across this boundary (none at a job's end but
    /// those kept for the job queued next).
    pub resident_models: Vec<ResidentModel>,
}

/// The whole record, as `GET /api/memory` returns it and `server-memory.json` holds it.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryRecord {
    pub device: String,
    /// The compute budget (device footprint on CUDA, heap on the CPU), when set.
    pub vram_budget: Option<u64>,
    pub ram_budget: Option<u64>,
    pub first: Option<Boundary>,
    pub boundaries: Vec<Boundary>,
    pub samples: Vec<Sample>,
}

struct Inner {
    first: Option<Boundary>,
    boundaries: VecDeque<Boundary>,
    samples: VecDeque<Sample>,
}

/// Appends `item`, dropping the oldest when `queue` already holds `cap`.
fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, cap: usize) {
    if queue.len() == cap {
        queue.pop_front();
    }
    queue.push_back(item);
}

/// The server's memory record.
pub struct MemoryLog {
    inner: Mutex<Inner>,
    started: Instant,
    device: String,
    budget: vpipe_mem::Budget,
    /// Where the record is written at each boundary.
    path: PathBuf,
}

impl MemoryLog {
    pub fn new(started: Instant, device: String, budget: vpipe_mem::Budget, path: PathBuf) -> Self {
        Self {
            inner: Mutex::new(Inner {
                first: None,
                boundaries: VecDeque::with_capacity(MAX_BOUNDARIES),
                samples: VecDeque::with_capacity(MAX_SAMPLES),
            }),
            started,
            device,
            budget,
            path,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Adds a live sample (the oldest goes when the series is full).
    pub fn sample(&self, reading: &Reading) {
        let sample = Sample::of(reading, self.now_ms());
        push_bounded(&mut self.lock().samples, sample, MAX_SAMPLES);
    }

    /// Records a boundary reading and writes the record to its file (through a temporary
    /// file, renamed into place).
    pub fn boundary(
        &self,
        at: &'static str,
        job: Option<u64>,
        reading: &Reading,
        resident_models: Vec<ResidentModel>,
    ) {
        self.keep_boundary(at, job, reading, resident_models);
        if let Err(e) = self.write() {
            tracing::warn!("could not write {}: {e}", self.path.display());
        }
    }

    /// Records a boundary reading (the oldest but the first goes when the record is full).
    fn keep_boundary(
        &self,
        at: &'static str,
        job: Option<u64>,
        reading: &Reading,
        resident_models: Vec<ResidentModel>,
    ) {
        let boundary = Boundary {
            at,
            job,
            sample: Sample::of(reading, self.now_ms()),
            host_file: reading.host.file,
            pool_reserved: reading.pool_reserved(),
            compute_used: reading.compute_used(),
            compute_meter: reading.compute_meter(),
            resident_models,
        };
        let mut inner = self.lock();
        push_bounded(&mut inner.samples, boundary.sample, MAX_SAMPLES);
        if inner.first.is_none() {
            inner.first = Some(boundary);
        } else {
            push_bounded(&mut inner.boundaries, boundary, MAX_BOUNDARIES);
        }
    }

    pub fn record(&self) -> MemoryRecord {
        let inner = self.lock();
        MemoryRecord {
            device: self.device.clone(),
            vram_budget: self.budget.compute,
            ram_budget: self.budget.host,
            first: inner.first.clone(),
            boundaries: inner.boundaries.iter().cloned().collect(),
            samples: inner.samples.iter().copied().collect(),
        }
    }

    fn write(&self) -> vpipe_pipeline::Result<()> {
        let mut record = self.record();
        // The file is the boundary record; live samples are for the page.
        record.samples.clear();
        let json = serde_json::to_vec_pretty(&record)?;
        vpipe_pipeline::write_atomically(&self.path, |partial| {
            std::fs::write(partial, &json).map_err(|source| vpipe_pipeline::Error::Io {
                context: format!("writing {}", partial.display()),
                source,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(anon: u64) -> Reading {
        Reading {
            t_ms: 0.0,
            host: vpipe_mem::HostRss {
                anon,
                file: 0,
                shmem: 0,
            },
            heap: None,
            cuda: None,
        }
    }

    #[test]
    fn the_record_is_bounded_and_written_at_each_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server-memory.json");
        let log = MemoryLog::new(
            Instant::now(),
            "cpu".into(),
            vpipe_mem::Budget::default(),
            path.clone(),
        );
        for i in 0..(2 * MAX_SAMPLES as u64) {
            log.sample(&reading(i));
        }
        log.boundary("server start", None, &reading(1), Vec::new());
        for job in 0..(MAX_BOUNDARIES as u64 + 9) {
            log.keep_boundary("job end", Some(job), &reading(2), Vec::new());
        }
        let kept = ResidentModel {
            name: "dit".into(),
            tier: vpipe_mem::Tier::Host,
            bytes: 5,
        };
        log.boundary(
            "job end",
            Some(MAX_BOUNDARIES as u64 + 9),
            &reading(2),
            vec![kept],
        );
        let record = log.record();
        assert_eq!(record.samples.len(), MAX_SAMPLES);
        assert_eq!(record.boundaries.len(), MAX_BOUNDARIES);
        assert_eq!(record.first.as_ref().map(|b| b.at), Some("server start"));
        assert_eq!(
            record.boundaries.last().and_then(|b| b.job),
            Some(MAX_BOUNDARIES as u64 + 9)
        );
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            written["boundaries"].as_array().unwrap().len(),
            MAX_BOUNDARIES
        );
        assert!(written["samples"].as_array().unwrap().is_empty());
        let last = written["boundaries"].as_array().unwrap().last().unwrap();
        assert_eq!(last["resident_models"][0]["name"], "dit");
        assert_eq!(last["compute_used"], 2, "RssAnon without the heap meter");
    }
}
