//! The ledger: an append-only record of what happened to memory, made of meter readings.
//!
//! Reports and charts are rendered from the ledger alone, so that no number can reach a user
//! without having been measured first.

use crate::meter::Reading;
use crate::Tier;

/// One comparison of an expected change with a measured one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Check {
    /// The meter compared (`heap`, `rss_anon`, `rss_anon+shmem`, `pool_used`).
    pub meter: String,
    /// Expected change in bytes (negative: freed).
    pub expected: i64,
    /// Measured change in bytes.
    pub measured: i64,
    /// Largest allowed |measured − expected|.
    pub tolerance: u64,
    /// Whether the measured change is within tolerance.
    pub ok: bool,
}

/// Something that happened, with the readings that prove it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The empty state the run starts from.
    Baseline {
        /// Readings of the empty process (context and handles only).
        reading: Reading,
        /// The CPU matmul library's per-thread buffers, made just before the reading and so
        /// part of it.
        #[serde(default)]
        compute_workspace: crate::ComputeWorkspace,
    },
    /// A phase began (its peaks were reset just before this reading).
    PhaseEnter {
        /// Phase name.
        phase: String,
        /// Reading at entry.
        reading: Reading,
    },
    /// A phase ended; `reading` carries the phase's high-water marks.
    PhaseExit {
        /// Phase name.
        phase: String,
        /// Reading at exit.
        reading: Reading,
        /// Bytes of model weights the store had in the compute tier at exit.
        resident_compute_bytes: u64,
        /// Compute-tier high-water mark of the whole phase: the exit reading's mark, or a
        /// higher one read before the phase reset the marks to measure a part of its work.
        compute_peak: u64,
    },
    /// A model moved between tiers; `checks` compare expected and measured change.
    Transition {
        /// Model name.
        model: String,
        /// Tier before.
        from: Tier,
        /// Tier after.
        to: Tier,
        /// Bytes the move should add (positive) or free (negative) in the tier it touches.
        expected_bytes: i64,
        /// Milliseconds the move itself took, device synchronized at its end (no meter reads).
        work_ms: f64,
        /// Reading before the move.
        before: Reading,
        /// Reading after the move.
        after: Reading,
        /// The verifications made.
        checks: Vec<Check>,
    },
    /// A load was refused by the budget; nothing was loaded.
    Refusal {
        /// Model name.
        model: String,
        /// Tier it was to go to.
        tier: Tier,
        /// Bytes needed.
        needed: u64,
        /// Measured bytes in use in the tier.
        in_use: u64,
        /// The tier's budget.
        allowed: u64,
    },
    /// A model computed streamed; recorded when the stream ended.
    Stream {
        /// Model name.
        model: String,
        /// Where the groups came from.
        source: crate::StreamSource,
        /// Arena slots.
        slots: usize,
        /// Streamed groups.
        groups: usize,
        /// Bytes of the tensors held for the whole stream.
        fixed_bytes: u64,
        /// Bytes of the arena.
        arena_bytes: u64,
        /// What it moved.
        stats: crate::StreamStats,
    },
    /// A reading taken inside a phase (e.g. after each tile), for the chart.
    Sample {
        /// The reading.
        reading: Reading,
    },
    /// A setting a phase chose (tile size, precision, …), so the report says how it ran.
    Note {
        /// What was chosen.
        what: String,
        /// The choice.
        detail: String,
    },
    /// Data a phase produced for later phases and keeps in the compute tier.
    Output {
        /// What it is.
        what: String,
        /// Its size.
        bytes: u64,
    },
    /// A cheaper way was taken after a failure (smaller tile, streamed blocks, …).
    Fallback {
        /// What fell back.
        what: String,
        /// Why and to what.
        detail: String,
    },
    /// A phase's measured peak exceeded the budget.
    Violation {
        /// The phase.
        phase: String,
        /// The measured peak the budget bounds ([`Reading::budgeted_peak`]).
        peak: u64,
        /// What `peak` measures.
        meter: String,
        /// The budget.
        budget: u64,
    },
}

/// An event and the phase it happened in.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// The phase that was open, if any.
    pub phase: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// Append-only list of entries.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    entries: Vec<Entry>,
}

impl Ledger {
    /// Appends an event.
    pub fn record(&mut self, phase: Option<&str>, event: Event) {
        self.entries.push(Entry {
            phase: phase.map(str::to_owned),
            event,
        });
    }

    /// Everything recorded, in order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Every reading in the ledger, in order of time (transitions give two).
    pub fn readings(&self) -> impl Iterator<Item = &Reading> {
        self.entries.iter().flat_map(|e| match &e.event {
            Event::Baseline { reading, .. }
            | Event::PhaseEnter { reading, .. }
            | Event::PhaseExit { reading, .. }
            | Event::Sample { reading } => vec![reading],
            Event::Transition { before, after, .. } => vec![before, after],
            _ => vec![],
        })
    }
}
