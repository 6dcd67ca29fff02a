//! `report.json`: what a run did with memory, rendered from the ledger alone.
//!
//! The schema is documented in `docs/report.md`. Every byte count in it is a meter reading or a
//! difference of two readings; nothing is estimated.

use std::path::Path;

use crate::ledger::{Check, Event, Ledger};
use crate::meter::Reading;
use crate::{Budget, MemError, Tier};

/// Version of the report's schema; bumped on any incompatible change.
pub const REPORT_SCHEMA_VERSION: u32 = 2;

/// The whole report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// [`REPORT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// `cpu` or `cuda`: where models computed.
    pub compute: String,
    /// The name of the meter behind every `compute_*` figure (`pool_used`, `heap`, `rss_anon`).
    pub compute_meter: String,
    /// The budget the run was held to.
    pub budget: Budget,
    /// The empty state, measured at start.
    pub baseline: Reading,
    /// Memory the CPU matmul library keeps for the life of each thread, made and measured
    /// just before the baseline (so part of it).
    #[serde(default)]
    pub compute_workspace: crate::ComputeWorkspace,
    /// Phases in order.
    pub phases: Vec<PhaseReport>,
    /// Every move of weights between tiers, with its verification.
    pub transitions: Vec<TransitionReport>,
    /// Models that computed streamed, and what each stream moved.
    #[serde(default)]
    pub streams: Vec<StreamReport>,
    /// Loads refused by the budget.
    pub refusals: Vec<Refusal>,
    /// Data phases declared as produced for later phases.
    pub outputs: Vec<Output>,
    /// Settings phases chose (tile sizes, precision).
    pub notes: Vec<Fallback>,
    /// Cheaper ways taken after failures.
    pub fallbacks: Vec<Fallback>,
    /// Phases whose peak exceeded the budget.
    pub violations: Vec<Violation>,
    /// Every reading in time order, reduced to what the chart plots.
    pub samples: Vec<Sample>,
}

/// One phase.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhaseReport {
    /// Name.
    pub name: String,
    /// Reading at entry (peaks reset just before).
    pub entry: Reading,
    /// Reading at exit; its high-water marks are the phase's peaks.
    pub exit: Reading,
    /// Compute-tier peak during the phase, above the baseline.
    pub peak_above_baseline: u64,
    /// Compute-tier use at exit, above the baseline.
    pub exit_above_baseline: u64,
    /// On CUDA, the process's device footprint at its highest during the phase (pool
    /// reserved at its high-water mark + outside the pool; what nvidia-smi shows).
    #[serde(default)]
    pub device_footprint_peak: Option<u64>,
    /// Bytes of weights the store held in the compute tier at exit.
    pub resident_compute_bytes: u64,
}

/// One move of a model between tiers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransitionReport {
    /// Phase it happened in.
    pub phase: Option<String>,
    /// Model.
    pub model: String,
    /// From tier.
    pub from: Tier,
    /// To tier.
    pub to: Tier,
    /// Expected change in bytes (negative: freed).
    pub expected_bytes: i64,
    /// Milliseconds the move itself took, device synchronized at its end.
    pub work_ms: f64,
    /// Verifications.
    pub checks: Vec<Check>,
    /// All checks passed.
    pub verified: bool,
}

/// A model that computed streamed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StreamReport {
    /// Phase.
    pub phase: Option<String>,
    /// Model.
    pub model: String,
    /// Where its groups came from.
    pub source: crate::StreamSource,
    /// Arena slots (groups copied ahead: slots − 1).
    pub slots: usize,
    /// Groups streamed (the blocks not held for the whole phase).
    pub groups: usize,
    /// Bytes held for the whole stream.
    pub fixed_bytes: u64,
    /// Bytes of the arena.
    pub arena_bytes: u64,
    /// What it moved.
    pub stats: crate::StreamStats,
}

/// A refused load.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Refusal {
    /// Phase.
    pub phase: Option<String>,
    /// Model.
    pub model: String,
    /// Tier.
    pub tier: Tier,
    /// Bytes needed.
    pub needed: u64,
    /// Bytes in use (measured).
    pub in_use: u64,
    /// Budget.
    pub allowed: u64,
}

/// A phase's declared output.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Output {
    /// Phase.
    pub phase: Option<String>,
    /// What it is.
    pub what: String,
    /// Bytes.
    pub bytes: u64,
}

/// A fallback or a note: what, and the detail.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Fallback {
    /// Phase.
    pub phase: Option<String>,
    /// What fell back.
    pub what: String,
    /// Why and to what.
    pub detail: String,
}

/// A budget violation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Violation {
    /// Phase.
    pub phase: String,
    /// The measured peak the budget bounds: the device footprint on CUDA, the compute tier
    /// above the baseline on the CPU.
    pub peak: u64,
    /// What `peak` measures.
    pub meter: String,
    /// Budget.
    pub budget: u64,
}

/// A reading as the chart plots it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Milliseconds since start.
    pub t_ms: f64,
    /// Compute-tier bytes in use.
    pub compute_used: u64,
    /// Compute-tier high-water mark since the last reset.
    pub compute_peak: u64,
    /// Host RssAnon.
    pub rss_anon: u64,
    /// Host RssFile.
    pub rss_file: u64,
    /// Host RssShmem (where page-locked host copies show).
    #[serde(default)]
    pub rss_shmem: u64,
    /// On CUDA, the pool's reserved bytes.
    #[serde(default)]
    pub pool_reserved: Option<u64>,
    /// On CUDA, the process's device footprint (pool reserved + outside the pool).
    #[serde(default)]
    pub device_footprint: Option<u64>,
}

impl Report {
    /// Renders the report of a ledger. Fails only on a ledger without a baseline.
    pub fn from_ledger(ledger: &Ledger, budget: Budget) -> Result<Self, MemError> {
        let entries = ledger.entries();
        let (baseline, compute_workspace) = entries
            .iter()
            .find_map(|e| match &e.event {
                Event::Baseline {
                    reading,
                    compute_workspace,
                } => Some((*reading, *compute_workspace)),
                _ => None,
            })
            .ok_or_else(|| MemError::Meter {
                meter: "ledger",
                detail: "the ledger has no baseline reading".into(),
            })?;
        let base = baseline.compute_used();
        let mut report = Report {
            schema_version: REPORT_SCHEMA_VERSION,
            compute: if baseline.cuda.is_some() {
                "cuda"
            } else {
                "cpu"
            }
            .into(),
            compute_meter: baseline.compute_meter().into(),
            budget,
            baseline,
            compute_workspace,
            phases: Vec::new(),
            transitions: Vec::new(),
            streams: Vec::new(),
            refusals: Vec::new(),
            outputs: Vec::new(),
            notes: Vec::new(),
            fallbacks: Vec::new(),
            violations: Vec::new(),
            samples: ledger
                .readings()
                .map(|r| Sample {
                    t_ms: r.t_ms,
                    compute_used: r.compute_used(),
                    compute_peak: r.compute_peak(),
                    rss_anon: r.host.anon,
                    rss_file: r.host.file,
                    rss_shmem: r.host.shmem,
                    pool_reserved: r.pool_reserved(),
                    device_footprint: r.device_footprint(),
                })
                .collect(),
        };
        let mut open: Option<(String, Reading)> = None;
        for entry in entries {
            match &entry.event {
                Event::Baseline { .. } | Event::Sample { .. } => {}
                Event::PhaseEnter { phase, reading } => open = Some((phase.clone(), *reading)),
                Event::PhaseExit {
                    phase,
                    reading,
                    resident_compute_bytes,
                    compute_peak,
                } => {
                    let entry_reading = match open.take() {
                        Some((name, r)) if &name == phase => r,
                        _ => *reading,
                    };
                    report.phases.push(PhaseReport {
                        name: phase.clone(),
                        entry: entry_reading,
                        exit: *reading,
                        peak_above_baseline: compute_peak.saturating_sub(base),
                        exit_above_baseline: reading.compute_used().saturating_sub(base),
                        device_footprint_peak: reading.device_footprint_peak(),
                        resident_compute_bytes: *resident_compute_bytes,
                    });
                }
                Event::Transition {
                    model,
                    from,
                    to,
                    expected_bytes,
                    work_ms,
                    checks,
                    ..
                } => report.transitions.push(TransitionReport {
                    phase: entry.phase.clone(),
                    model: model.clone(),
                    from: *from,
                    to: *to,
                    expected_bytes: *expected_bytes,
                    work_ms: *work_ms,
                    checks: checks.clone(),
                    verified: checks.iter().all(|c| c.ok),
                }),
                Event::Stream {
                    model,
                    source,
                    slots,
                    groups,
                    fixed_bytes,
                    arena_bytes,
                    stats,
                } => report.streams.push(StreamReport {
                    phase: entry.phase.clone(),
                    model: model.clone(),
                    source: *source,
                    slots: *slots,
                    groups: *groups,
                    fixed_bytes: *fixed_bytes,
                    arena_bytes: *arena_bytes,
                    stats: stats.clone(),
                }),
                Event::Refusal {
                    model,
                    tier,
                    needed,
                    in_use,
                    allowed,
                } => report.refusals.push(Refusal {
                    phase: entry.phase.clone(),
                    model: model.clone(),
                    tier: *tier,
                    needed: *needed,
                    in_use: *in_use,
                    allowed: *allowed,
                }),
                Event::Output { what, bytes } => report.outputs.push(Output {
                    phase: entry.phase.clone(),
                    what: what.clone(),
                    bytes: *bytes,
                }),
                Event::Note { what, detail } => report.notes.push(Fallback {
                    phase: entry.phase.clone(),
                    what: what.clone(),
                    detail: detail.clone(),
                }),
                Event::Fallback { what, detail } => report.fallbacks.push(Fallback {
                    phase: entry.phase.clone(),
                    what: what.clone(),
                    detail: detail.clone(),
                }),
                Event::Violation {
                    phase,
                    peak,
                    meter,
                    budget,
                } => report.violations.push(Violation {
                    phase: phase.clone(),
                    peak: *peak,
                    meter: meter.clone(),
                    budget: *budget,
                }),
            }
        }
        Ok(report)
    }

    /// Writes the report as pretty JSON (to a temporary file, then renamed into place).
    pub fn write_json(&self, path: &Path) -> Result<(), MemError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| MemError::Write {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
        crate::write_atomically(path, &json)
    }
}
