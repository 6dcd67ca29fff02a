//! A memory session: the store, the meters, the budget and the ledger of one run, and the
//! phases through which all work on them goes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use candle_core::{DType, Device};

use crate::ledger::{Check, Event, Ledger};
use crate::meter::{Meters, Reading};
use crate::store::{describe_checkpoint, HostCopy, Lease, Model, ModelId, Tier};
use crate::stream::{StreamSource, StreamSpec, Streamer};
use crate::MemError;

/// Limits on what may be resident, in bytes above the run's baseline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Budget {
    /// The compute tier: device memory on CUDA (the pool's live bytes; the context's own
    /// memory, measured at start as the baseline, is not counted), host heap on a CPU run.
    pub compute: Option<u64>,
    /// Host RAM for host copies of weights on a CUDA run (on a CPU run `compute` governs it).
    pub host: Option<u64>,
}

/// How closely a measured change must match the expected one.
#[derive(Debug, Clone, Copy)]
struct Tolerance {
    fraction: f64,
    floor: u64,
}

impl Tolerance {
    fn for_bytes(&self, expected: i64) -> u64 {
        ((expected.unsigned_abs() as f64 * self.fraction) as u64).max(self.floor)
    }
}

const MIB: u64 = 1 << 20;
/// Heap bytes are counted exactly; the slack covers bookkeeping (maps, names) of the move.
const HEAP_TOLERANCE: Tolerance = Tolerance {
    fraction: 0.01,
    floor: MIB,
};
/// RSS moves in pages and with the allocator's own arenas.
const RSS_TOLERANCE: Tolerance = Tolerance {
    fraction: 0.05,
    floor: 8 * MIB,
};
/// The pool counts allocation sizes, rounded up to its granularity per tensor.
const POOL_TOLERANCE: Tolerance = Tolerance {
    fraction: 0.005,
    floor: 16 * MIB,
};
/// What a phase may add beyond its resident models and declared outputs (the ledger's own
/// growth, allocator rounding).
const PHASE_EXIT_TOLERANCE: Tolerance = Tolerance {
    fraction: 0.02,
    floor: 4 * MIB,
};

const CLONE_HINT: &str = "a tensor of the model is still referenced (a clone kept past its lease?)";
const LOAD_HINT: &str = "the copy did not land where it was counted";

/// What makes two registrations the same weights in memory: the file (its path, length and
/// modification time, so that a file replaced in place is a new model), the dtype its weights
/// are loaded in, and the caller's name for the patch applied as they are read (e.g. the LoRA
/// files and strengths merged into them).
#[derive(Debug, Clone, PartialEq)]
struct Identity {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    load_dtype: Option<DType>,
    patch: String,
}

impl Identity {
    /// The identity of `path` now; `None` when its metadata cannot be read (such a model is
    /// never taken for another).
    fn of(path: &Path, load_dtype: Option<DType>, patch: &str) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(Self {
            path: path.to_owned(),
            len: metadata.len(),
            modified: metadata.modified().ok(),
            load_dtype,
            patch: patch.to_owned(),
        })
    }
}

/// The memory side of one run, or of a server's many jobs: each job is a record of its own
/// ([`MemorySession::start_record`]), and models registered by one may stay resident for the
/// next. All moves of weights happen inside [`MemorySession::phase`].
pub struct MemorySession {
    device: Device,
    meters: Meters,
    budget: Budget,
    baseline: Reading,
    compute_workspace: crate::ComputeWorkspace,
    models: Vec<Model>,
    /// Per model: its identity when registered with one ([`Phase::register_reusing`]).
    identities: Vec<Option<Identity>>,
    /// Per model: the record that last registered it.
    registered_in: Vec<u64>,
    /// The current record's number (0 until [`MemorySession::start_record`]).
    record: u64,
    ledger: Ledger,
}

impl MemorySession {
    /// A session computing on `device`. Takes the baseline reading first: the empty process
    /// (CUDA context and handles included, and the CPU matmul library's per-thread buffers,
    /// made first and reported as the report's `compute_workspace`), against which every later
    /// figure is compared.
    pub fn new(device: Device, budget: Budget) -> Result<Self, MemError> {
        let meters = Meters::for_device(&device)?;
        Self::with_meters(device, meters, budget)
    }

    /// Like [`MemorySession::new`], with meters made by the caller (e.g. with an observer).
    pub fn with_meters(device: Device, meters: Meters, budget: Budget) -> Result<Self, MemError> {
        let workspace = crate::prepare_compute_workspace();
        let baseline = meters.read()?;
        let mut ledger = Ledger::default();
        ledger.record(
            None,
            Event::Baseline {
                reading: baseline,
                compute_workspace: workspace,
            },
        );
        Ok(Self {
            device,
            meters,
            budget,
            baseline,
            compute_workspace: workspace,
            models: Vec::new(),
            identities: Vec::new(),
            registered_in: Vec::new(),
            record: 0,
            ledger,
        })
    }

    /// Starts a new record: what [`Self::report`] covers from now on. The entries of the
    /// previous record are dropped (its report already made), so that a session that lives
    /// for many jobs holds one job's ledger at a time. The new record starts from the
    /// session's baseline (the empty process, against which budgets are kept) and a reading
    /// now, which shows the models still resident; its times count from now. Models stay
    /// registered; those on disk that the new record does not register again may have their
    /// ids given to new models.
    pub fn start_record(&mut self) -> Result<(), MemError> {
        self.record += 1;
        self.meters.restart_clock();
        let mut ledger = Ledger::default();
        ledger.record(
            None,
            Event::Baseline {
                reading: self.baseline,
                compute_workspace: self.compute_workspace,
            },
        );
        ledger.record(
            None,
            Event::Sample {
                reading: self.meters.read()?,
            },
        );
        self.ledger = ledger;
        Ok(())
    }

    /// Sets the budget the next phases are held to (a server's jobs may each be bounded anew
    /// by what the device has free).
    pub fn set_budget(&mut self, budget: Budget) {
        self.budget = budget;
    }

    /// Adds `model`, in the slot of a model on disk that no record since the previous one
    /// registered (so that a long-lived session does not grow with every job's models).
    fn add_model(&mut self, model: Model, identity: Option<Identity>) -> ModelId {
        let free = (0..self.models.len())
            .find(|&i| self.registered_in[i] < self.record && self.models[i].tier() == Tier::Disk);
        match free {
            Some(i) => {
                self.models[i] = model;
                self.identities[i] = identity;
                self.registered_in[i] = self.record;
                ModelId(i)
            }
            None => {
                self.models.push(model);
                self.identities.push(identity);
                self.registered_in.push(self.record);
                ModelId(self.models.len() - 1)
            }
        }
    }

    /// The model registered with this identity (see [`Phase::register_reusing`]), if any:
    /// `path` as it is now, loaded in `load_dtype`, patched as the caller's `patch` names.
    pub fn find_registered(
        &self,
        path: &Path,
        load_dtype: Option<DType>,
        patch: &str,
    ) -> Option<ModelId> {
        self.find_identity(&Identity::of(path, load_dtype, patch)?)
    }

    fn find_identity(&self, identity: &Identity) -> Option<ModelId> {
        self.identities
            .iter()
            .position(|i| i.as_ref() == Some(identity))
            .map(ModelId)
    }

    /// The models not on disk (in host memory or on the device), in order of registration.
    pub fn resident_models(&self) -> Vec<ModelId> {
        (0..self.models.len())
            .filter(|&i| self.models[i].tier() != Tier::Disk)
            .map(ModelId)
            .collect()
    }

    /// Registers a checkpoint, .safetensors (header only) or .pth (tensor index only;
    /// check it first with a reader that never executes pickle code): nothing is loaded. With `load_dtype`
    /// the weights are converted when they are read into host memory.
    pub fn register(
        &mut self,
        name: &str,
        path: &Path,
        load_dtype: Option<DType>,
    ) -> Result<ModelId, MemError> {
        let model = describe_checkpoint(name, path, load_dtype)?;
        Ok(self.add_model(model, None))
    }

    /// [`Self::register`] from the checkpoint's inspection (`vpipe_ckpt::inspect`), which
    /// already holds its header or tensor index: the file is not read again.
    pub fn register_inspected(
        &mut self,
        name: &str,
        inspection: &vpipe_ckpt::Inspection,
        load_dtype: Option<DType>,
    ) -> Result<ModelId, MemError> {
        let model = crate::store::describe_inspected(name, inspection, load_dtype)?;
        Ok(self.add_model(model, None))
    }

    /// [`Self::register_inspected`], unless a model of the same identity (the file as it is
    /// now, `load_dtype`, and `patch`: the caller's name for the weight patch it will set, or
    /// will find already set) is registered: then that model, wherever it is. Returns the
    /// model, and whether it was found resident (its weights stay where they are: a later
    /// `make_resident` moves nothing).
    pub fn register_reusing(
        &mut self,
        name: &str,
        inspection: &vpipe_ckpt::Inspection,
        load_dtype: Option<DType>,
        patch: &str,
    ) -> Result<(ModelId, bool), MemError> {
        let identity = Identity::of(&inspection.path, load_dtype, patch);
        if let Some(id) = identity.as_ref().and_then(|i| self.find_identity(i)) {
            self.registered_in[id.0] = self.record;
            name.clone_into(&mut self.models[id.0].name);
            return Ok((id, self.models[id.0].tier() != Tier::Disk));
        }
        let model = crate::store::describe_inspected(name, inspection, load_dtype)?;
        Ok((self.add_model(model, identity), false))
    }

    /// Sets the patch applied to `id`'s weights whenever they are read from disk (see
    /// [`crate::WeightPatch`]). The model must be on disk, so that no copy in memory misses it.
    pub fn set_patch(&mut self, id: ModelId, patch: crate::WeightPatch) -> Result<(), MemError> {
        let model = &mut self.models[id.0];
        if model.tier() != Tier::Disk {
            return Err(MemError::Checkpoint {
                path: model.path.clone(),
                detail: format!(
                    "a weight patch can only be set while '{}' is on disk (it is in {:?})",
                    model.name,
                    model.tier()
                ),
            });
        }
        if let Some(missing) = patch
            .keys
            .iter()
            .find(|k| !model.tensors.iter().any(|t| &t.name == *k))
        {
            return Err(MemError::Checkpoint {
                path: model.path.clone(),
                detail: format!(
                    "the weight patch names '{missing}', which the checkpoint does not have"
                ),
            });
        }
        model.patch = Some(patch);
        Ok(())
    }

    /// The device models compute on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The tier models compute from.
    pub fn compute_tier(&self) -> Tier {
        if self.device.is_cuda() {
            Tier::Device
        } else {
            Tier::Host
        }
    }

    /// The report of everything recorded so far.
    pub fn report(&self) -> Result<crate::Report, MemError> {
        crate::Report::from_ledger(&self.ledger, self.budget)
    }

    /// The budget.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// What the compute budget leaves for weights and activations above the baseline: on
    /// CUDA the budget bounds the whole device footprint, of which the baseline (the
    /// context, the handles) is already taken; on the CPU the budget is above the baseline.
    pub fn compute_allowance(&self) -> Option<u64> {
        let budget = self.budget.compute?;
        Some(budget.saturating_sub(self.baseline.device_footprint().unwrap_or(0)))
    }

    /// The reading taken when the session started.
    pub fn baseline(&self) -> &Reading {
        &self.baseline
    }

    /// The meters (for readings that are not recorded).
    pub fn meters(&self) -> &Meters {
        &self.meters
    }

    /// Everything recorded so far.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Where a model is.
    pub fn tier(&self, id: ModelId) -> Tier {
        self.models[id.0].tier()
    }

    /// A model's name.
    pub fn model_name(&self, id: ModelId) -> &str {
        &self.models[id.0].name
    }

    /// A model's tensors as the store holds them (sorted by key).
    pub fn tensors(&self, id: ModelId) -> &[crate::TensorMeta] {
        &self.models[id.0].tensors
    }

    /// Bytes a model's weights take in memory (after any dtype conversion).
    pub fn model_bytes(&self, id: ModelId) -> u64 {
        self.models[id.0].bytes()
    }

    /// Bytes of weights the store holds in the compute tier.
    pub fn resident_compute_bytes(&self) -> u64 {
        let tier = self.compute_tier();
        self.models
            .iter()
            .filter(|m| m.tier() >= tier)
            .map(Model::bytes)
            .sum()
    }

    /// Runs `work` as the phase `name`: resets the high-water marks, records entry and exit,
    /// then checks that nothing beyond the resident models stayed in the compute tier and
    /// records a violation if the phase's peak exceeded the budget.
    pub fn phase<R, E: From<MemError>>(
        &mut self,
        name: &str,
        work: impl FnOnce(&mut Phase<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        tracing::info!(phase = name, "phase begins");
        self.meters.reset_peaks()?;
        let reading = self.meters.read()?;
        self.ledger.record(
            Some(name),
            Event::PhaseEnter {
                phase: name.to_owned(),
                reading,
            },
        );
        let resident_at_entry = self.resident_compute_bytes();
        let mut phase = Phase {
            session: self,
            name: name.to_owned(),
            outputs: 0,
            peak_floor: 0,
            footprint_floor: 0,
        };
        let result = work(&mut phase);
        let (outputs, floors) = (phase.outputs, (phase.peak_floor, phase.footprint_floor));
        // The exit is recorded even when the work failed; the work's own error comes first.
        let exit = self.exit_phase(name, &reading, resident_at_entry, outputs, floors);
        let value = result?;
        exit?;
        Ok(value)
    }

    /// Records the exit, then checks for accumulation: what the phase added to the compute
    /// tier must be explained by the models it made resident and the outputs it declared.
    fn exit_phase(
        &mut self,
        name: &str,
        entry: &Reading,
        resident_at_entry: u64,
        outputs: u64,
        (peak_floor, footprint_floor): (u64, u64),
    ) -> Result<(), MemError> {
        let reading = self.meters.read()?;
        let resident = self.resident_compute_bytes();
        let compute_peak = reading.compute_peak().max(peak_floor);
        self.ledger.record(
            Some(name),
            Event::PhaseExit {
                phase: name.to_owned(),
                reading,
                resident_compute_bytes: resident,
                compute_peak,
            },
        );
        if let Some(budget) = self.budget.compute {
            // A phase that measured part of its work (see `Phase::measure_peak`) carries the
            // marks it reached before into `compute_peak`.
            let (peak, meter) = reading.budgeted_peak(&self.baseline);
            let peak = match reading.device_footprint_peak() {
                Some(_) => peak.max(footprint_floor),
                None => peak.max(compute_peak.saturating_sub(self.baseline.compute_used())),
            };
            if peak > budget {
                self.ledger.record(
                    Some(name),
                    Event::Violation {
                        phase: name.to_owned(),
                        peak,
                        meter: meter.to_owned(),
                        budget,
                    },
                );
            }
        }
        let grown = reading.compute_used() as i64 - entry.compute_used() as i64;
        let explained = resident as i64 - resident_at_entry as i64 + outputs as i64;
        let tolerance = PHASE_EXIT_TOLERANCE.for_bytes(resident as i64);
        if grown > explained + tolerance as i64 {
            return Err(MemError::PhaseLeak {
                phase: name.to_owned(),
                tier: self.compute_tier(),
                grown,
                explained,
                tolerance,
            });
        }
        Ok(())
    }
}

/// An open phase: the only place where weights move and leases are handed out.
pub struct Phase<'s> {
    session: &'s mut MemorySession,
    name: String,
    outputs: u64,
    peak_floor: u64,
    /// Like `peak_floor`, for the device footprint's high-water mark.
    footprint_floor: u64,
}

fn check(meter: &str, expected: i64, before: u64, after: u64, tolerance: Tolerance) -> Check {
    within(
        meter,
        expected,
        (before, after),
        tolerance.for_bytes(expected),
    )
}

/// The reading's change against `expected`, `tolerance` bytes either way.
fn within(meter: &str, expected: i64, (before, after): (u64, u64), tolerance: u64) -> Check {
    let measured = after as i64 - before as i64;
    Check {
        meter: meter.to_owned(),
        expected,
        measured,
        tolerance,
        ok: measured.abs_diff(expected) <= tolerance,
    }
}

/// [`check`] for a resident-set meter (RssAnon, with shmem for pinned copies), whose readings
/// the allocator moves too: where a move frees memory, a larger fall than expected passes (a
/// free may let malloc give back other freed pages along with the model's, measured at 20 MiB
/// beyond a tiny model's on CI; the heap meter, exact, checks the bytes), and only a smaller
/// one fails (what a tensor still referenced leaves).
fn resident_check(meter: &str, expected: i64, readings: (u64, u64), tolerance: u64) -> Check {
    let mut check = within(meter, expected, readings, tolerance);
    if expected < 0 {
        check.ok = check.measured <= expected.saturating_add(tolerance as i64);
    }
    check
}

impl Phase<'_> {
    /// The phase's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The session (read-only).
    pub fn session(&self) -> &MemorySession {
        self.session
    }

    /// Registers a checkpoint (see [`MemorySession::register`]): phase 1's work.
    pub fn register(
        &mut self,
        name: &str,
        path: &Path,
        load_dtype: Option<DType>,
    ) -> Result<ModelId, MemError> {
        self.session.register(name, path, load_dtype)
    }

    /// See [`MemorySession::register_inspected`].
    pub fn register_inspected(
        &mut self,
        name: &str,
        inspection: &vpipe_ckpt::Inspection,
        load_dtype: Option<DType>,
    ) -> Result<ModelId, MemError> {
        self.session
            .register_inspected(name, inspection, load_dtype)
    }

    /// See [`MemorySession::register_reusing`]. A model found resident is noted as carried
    /// over, with its bytes.
    pub fn register_reusing(
        &mut self,
        name: &str,
        inspection: &vpipe_ckpt::Inspection,
        load_dtype: Option<DType>,
        patch: &str,
    ) -> Result<(ModelId, bool), MemError> {
        let (id, resident) = self
            .session
            .register_reusing(name, inspection, load_dtype, patch)?;
        if resident {
            let bytes = self.session.model_bytes(id);
            let tier = self.session.tier(id);
            self.note(
                "carried over",
                &format!(
                    "'{name}' carried over from the previous job, resident ({tier} tier): {} \
                     ({bytes} B, its weights as the store counts them, verified by measurement \
                     when they were loaded); nothing to load",
                    crate::fmt_bytes(bytes),
                ),
            );
        }
        Ok((id, resident))
    }

    /// See [`MemorySession::set_patch`].
    pub fn set_patch(&mut self, id: ModelId, patch: crate::WeightPatch) -> Result<(), MemError> {
        self.session.set_patch(id, patch)
    }

    /// A reading of every meter now (not recorded).
    pub fn read(&self) -> Result<Reading, MemError> {
        self.session.meters.read()
    }

    /// A reading of every meter now, without waiting for the device (not recorded; see
    /// [`crate::Meters::read_in_flight`]).
    pub fn read_in_flight(&self) -> Result<Reading, MemError> {
        self.session.meters.read_in_flight()
    }

    /// Declares data the phase produces for later phases (embeddings, latents, frames) and
    /// keeps in the compute tier; the accumulation check at the phase's end allows for it.
    pub fn declare_output(&mut self, what: &str, bytes: u64) {
        self.outputs += bytes;
        self.session.ledger.record(
            Some(&self.name),
            Event::Output {
                what: what.to_owned(),
                bytes,
            },
        );
    }

    /// Runs `work` and returns, with its result, the compute-tier high-water mark it reached
    /// above the use at its start (a measurement, e.g. for calibrating tile sizes). The
    /// phase's own peak is kept: the marks reached before are carried into the phase's exit.
    pub fn measure_peak<R, E: From<MemError>>(
        &mut self,
        work: impl FnOnce() -> Result<R, E>,
    ) -> Result<(R, u64), E> {
        let before = self.session.meters.read()?;
        self.peak_floor = self.peak_floor.max(before.compute_peak());
        self.footprint_floor = self
            .footprint_floor
            .max(before.device_footprint_peak().unwrap_or(0));
        self.session.meters.reset_peaks()?;
        let start = self.session.meters.read()?;
        let result = work()?;
        let after = self.session.meters.read()?;
        self.peak_floor = self.peak_floor.max(after.compute_peak());
        self.footprint_floor = self
            .footprint_floor
            .max(after.device_footprint_peak().unwrap_or(0));
        Ok((
            result,
            after.compute_peak().saturating_sub(start.compute_used()),
        ))
    }

    /// Records a reading taken earlier with [`Phase::read`] (samples inside a phase: the
    /// chart's points between the phase's entry and exit).
    pub fn record_sample(&mut self, reading: Reading) {
        self.session
            .ledger
            .record(Some(&self.name), Event::Sample { reading });
    }

    /// Records a setting the phase chose (tile size, precision), for the report.
    pub fn note(&mut self, what: &str, detail: &str) {
        self.session.ledger.record(
            Some(&self.name),
            Event::Note {
                what: what.to_owned(),
                detail: detail.to_owned(),
            },
        );
    }

    /// Records that a cheaper way was taken after a failure.
    pub fn fallback(&mut self, what: &str, detail: &str) {
        self.session.ledger.record(
            Some(&self.name),
            Event::Fallback {
                what: what.to_owned(),
                detail: detail.to_owned(),
            },
        );
    }

    /// Hands out the model's weights in the compute tier for as long as the lease lives.
    pub fn lease(&self, id: ModelId) -> Result<Lease<'_>, MemError> {
        let model = &self.session.models[id.0];
        let tier = self.session.compute_tier();
        let wrong_tier = || MemError::WrongTier {
            model: model.name.clone(),
            operation: "a lease",
            needed: tier,
            actual: model.tier(),
        };
        let tensors = match tier {
            Tier::Device => model.device.as_ref().ok_or_else(wrong_tier)?,
            _ => match &model.host {
                Some(HostCopy::Pageable(tensors)) => tensors,
                _ => return Err(wrong_tier()),
            },
        };
        Ok(Lease {
            model: &model.name,
            tensors,
        })
    }

    /// Brings a model into the compute tier (reading it from disk first if needed).
    pub fn make_resident(&mut self, id: ModelId) -> Result<(), MemError> {
        if self.session.tier(id) == Tier::Disk {
            self.load(id)?;
        }
        if self.session.compute_tier() == Tier::Device && self.session.tier(id) == Tier::Host {
            self.upload(id)?;
        }
        Ok(())
    }

    /// Records a refusal and fails when `needed` more bytes of `id` in `tier` would take its
    /// use past `allowed`.
    fn refuse_over_budget(
        &mut self,
        id: ModelId,
        tier: Tier,
        needed: u64,
        in_use: u64,
        allowed: Option<u64>,
    ) -> Result<(), MemError> {
        let Some(allowed) = allowed else {
            return Ok(());
        };
        let model = &self.session.models[id.0];
        if in_use + needed <= allowed {
            return Ok(());
        }
        let model = model.name.clone();
        self.session.ledger.record(
            Some(&self.name),
            Event::Refusal {
                model: model.clone(),
                tier,
                needed,
                in_use,
                allowed,
            },
        );
        Err(MemError::OverBudget {
            model,
            tier,
            needed,
            in_use,
            allowed,
        })
    }

    /// Host-side checks of a move of `expected` bytes (negative: freed).
    fn host_checks(
        &self,
        id: ModelId,
        expected: i64,
        before: &Reading,
        after: &Reading,
    ) -> Vec<Check> {
        let mut checks = Vec::new();
        let pinned = self.session.compute_tier() == Tier::Device;
        if pinned {
            // Page-locked buffers are not heap allocations; the kernel counts them.
            checks.push(resident_check(
                "rss_anon+shmem",
                expected,
                (
                    before.host.anon + before.host.shmem,
                    after.host.anon + after.host.shmem,
                ),
                RSS_TOLERANCE.for_bytes(expected),
            ));
        } else {
            // With the counting allocator, only blocks it maps directly surely come and go
            // from RssAnon; small tensors live in malloc's arenas, which may or may not take
            // fresh pages or give freed ones back, so their bytes widen the tolerance. The heap
            // check covers every byte exactly.
            let (rss_expected, arena_slack) = if let (Some(b), Some(a)) = (before.heap, after.heap)
            {
                checks.push(check(
                    "heap",
                    expected,
                    b.current,
                    a.current,
                    HEAP_TOLERANCE,
                ));
                let model = &self.session.models[id.0];
                let direct = model.directly_mapped_bytes();
                (expected.signum() * direct as i64, model.bytes() - direct)
            } else {
                (expected, 0)
            };
            checks.push(resident_check(
                "rss_anon",
                rss_expected,
                (before.host.anon, after.host.anon),
                RSS_TOLERANCE.for_bytes(rss_expected) + arena_slack,
            ));
        }
        checks
    }

    fn device_checks(&self, expected: i64, before: &Reading, after: &Reading) -> Vec<Check> {
        #[cfg(feature = "cuda")]
        if let (Some(b), Some(a)) = (before.cuda, after.cuda) {
            return vec![check(
                "pool_used",
                expected,
                b.pool_used,
                a.pool_used,
                POOL_TOLERANCE,
            )];
        }
        let _ = (expected, before, after, POOL_TOLERANCE);
        Vec::new()
    }

    /// Runs `work` (one move of weights, or a stream's start or end), then synchronizes the
    /// device, and returns how long that took in milliseconds.
    fn timed(
        &mut self,
        work: impl FnOnce(&mut MemorySession) -> Result<(), MemError>,
    ) -> Result<f64, MemError> {
        let start = std::time::Instant::now();
        work(self.session)?;
        self.session
            .device
            .synchronize()
            .map_err(|source| MemError::Tensor {
                context: "synchronizing after a move".into(),
                source: Box::new(source),
            })?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }

    /// Moves a model from one tier to the next: runs `work`, reads the meters, verifies the
    /// change against the model's size on the meters of the tier touched, records it, and
    /// fails with the first check that did not pass. `before` is the reading taken before.
    fn move_model(
        &mut self,
        id: ModelId,
        (from, to): (Tier, Tier),
        before: Reading,
        work: impl FnOnce(&mut MemorySession) -> Result<(), MemError>,
    ) -> Result<(), MemError> {
        let work_ms = self.timed(work)?;
        let after = self.session.meters.read()?;
        let bytes = self.session.models[id.0].bytes() as i64;
        let expected = if to > from { bytes } else { -bytes };
        let checks = if to == Tier::Device || from == Tier::Device {
            self.device_checks(expected, &before, &after)
        } else {
            self.host_checks(id, expected, &before, &after)
        };
        self.record_transition(id, (from, to), expected, work_ms, (before, after), checks)
    }

    /// Records a verified move (its checks made) and fails with the first check that did
    /// not pass, naming the model, the meter and both numbers.
    fn record_transition(
        &mut self,
        id: ModelId,
        (from, to): (Tier, Tier),
        expected: i64,
        work_ms: f64,
        (before, after): (Reading, Reading),
        checks: Vec<Check>,
    ) -> Result<(), MemError> {
        let model = self.session.models[id.0].name.clone();
        let failed = checks.iter().find(|c| !c.ok).cloned();
        self.session.ledger.record(
            Some(&self.name),
            Event::Transition {
                model: model.clone(),
                from,
                to,
                expected_bytes: expected,
                work_ms,
                before,
                after,
                checks,
            },
        );
        match failed {
            None => Ok(()),
            Some(c) => Err(MemError::VerificationFailed {
                model,
                from,
                to,
                meter: c.meter,
                expected: c.expected,
                measured: c.measured,
                tolerance: c.tolerance,
                hint: if expected < 0 { CLONE_HINT } else { LOAD_HINT },
            }),
        }
    }

    /// Disk → host: reads the checkpoint into host memory, after checking the budget.
    pub fn load(&mut self, id: ModelId) -> Result<(), MemError> {
        self.expect_tier(id, Tier::Disk, "load")?;
        let before = self.session.meters.read()?;
        let base = &self.session.baseline;
        let (host_in_use, host_budget) = match self.session.compute_tier() {
            // Pinned host copies are not heap: the kernel counts them with the anonymous and
            // shared pages.
            Tier::Device => (
                (before.host.anon + before.host.shmem)
                    .saturating_sub(base.host.anon + base.host.shmem),
                self.session.budget.host,
            ),
            _ => (
                before.host_used().saturating_sub(base.host_used()),
                self.session.budget.compute,
            ),
        };
        let needed = self.session.models[id.0].bytes();
        self.refuse_over_budget(id, Tier::Host, needed, host_in_use, host_budget)?;
        self.move_model(id, (Tier::Disk, Tier::Host), before, |s| {
            let copy = s.models[id.0].read_host_copy(&s.device)?;
            s.models[id.0].host = Some(copy);
            Ok(())
        })
    }

    /// Host → device: one copy per tensor from the pinned host copy, after checking the budget.
    pub fn upload(&mut self, id: ModelId) -> Result<(), MemError> {
        self.expect_tier(id, Tier::Host, "upload")?;
        let before = self.session.meters.read()?;
        let in_use = before
            .compute_used()
            .saturating_sub(self.session.baseline.compute_used());
        let allowed = self.session.compute_allowance();
        let needed = self.session.models[id.0].bytes();
        self.refuse_over_budget(id, Tier::Device, needed, in_use, allowed)?;
        self.move_model(id, (Tier::Host, Tier::Device), before, |s| {
            let device = s.upload_copy(id)?;
            s.models[id.0].device = Some(device);
            Ok(())
        })
    }

    /// Starts computing with `id` streamed ([`StreamSpec`]): its fixed tensors and an arena
    /// of `spec.slots` groups go into the compute tier, the groups come through the arena as
    /// the model asks for them. On CUDA the model must be in the host tier (the stream reads
    /// its pinned copy) or on disk (the stream reads the file through pinned staging
    /// buffers); on the CPU, on disk. Checked against the budget first and verified like a
    /// move: the compute tier grows by [`Streamer::bytes`], measured.
    pub fn begin_stream(&mut self, id: ModelId, spec: &StreamSpec) -> Result<Streamer, MemError> {
        let before = self.session.meters.read()?;
        let in_use = before
            .compute_used()
            .saturating_sub(self.session.baseline.compute_used());
        let compute_tier = self.session.compute_tier();
        let model = &self.session.models[id.0];
        let from = model.tier();
        let needed = crate::stream::stream_bytes(model, spec);
        let allowed = self.session.compute_allowance();
        self.refuse_over_budget(id, compute_tier, needed, in_use, allowed)?;
        let mut started = None;
        let work_ms = self.timed(|s| {
            started = Some(crate::stream::start(&s.models[id.0], &s.device, spec)?);
            Ok(())
        })?;
        let streamer = started.expect("set by the work above");
        let after = self.session.meters.read()?;
        let expected = streamer.bytes() as i64;
        self.record_stream_move(id, (from, compute_tier), expected, work_ms, before, after)?;
        self.note(
            "stream",
            &format!(
                "'{}' from its {}: {} fixed, {} groups through {} slots of {} ({} in all)",
                streamer.model,
                match streamer.source_kind {
                    StreamSource::PinnedHost => "pinned host copy",
                    StreamSource::File => "file",
                },
                crate::fmt_bytes(streamer.fixed_bytes()),
                streamer.groups(),
                streamer.slots(),
                crate::fmt_bytes(streamer.arena_bytes() / streamer.slots().max(1) as u64),
                crate::fmt_bytes(streamer.bytes()),
            ),
        );
        Ok(streamer)
    }

    /// Ends a stream: records what it moved, frees its fixed tensors and arena, and verifies
    /// that the compute tier gave back [`Streamer::bytes`] (so no tensor of it was kept).
    pub fn end_stream(&mut self, id: ModelId, streamer: Streamer) -> Result<(), MemError> {
        self.session.ledger.record(
            Some(&self.name),
            Event::Stream {
                model: streamer.model.clone(),
                source: streamer.source_kind,
                slots: streamer.slots(),
                groups: streamer.groups(),
                fixed_bytes: streamer.fixed_bytes(),
                arena_bytes: streamer.arena_bytes(),
                stats: streamer.stats().clone(),
            },
        );
        let before = self.session.meters.read()?;
        let expected = -(streamer.bytes() as i64);
        let work_ms = self.timed(|_| {
            drop(streamer);
            Ok(())
        })?;
        let after = self.session.meters.read()?;
        let tiers = (
            self.session.compute_tier(),
            self.session.models[id.0].tier(),
        );
        self.record_stream_move(id, tiers, expected, work_ms, before, after)
    }

    /// Records a stream's start or end as a transition, verified on the compute tier's meter.
    fn record_stream_move(
        &mut self,
        id: ModelId,
        (from, to): (Tier, Tier),
        expected: i64,
        work_ms: f64,
        before: Reading,
        after: Reading,
    ) -> Result<(), MemError> {
        let checks = if self.session.compute_tier() == Tier::Device {
            self.device_checks(expected, &before, &after)
        } else {
            match (before.heap, after.heap) {
                (Some(b), Some(a)) => vec![check(
                    "heap",
                    expected,
                    b.current,
                    a.current,
                    HEAP_TOLERANCE,
                )],
                _ => vec![check(
                    "rss_anon",
                    expected,
                    before.host.anon,
                    after.host.anon,
                    RSS_TOLERANCE,
                )],
            }
        };
        self.record_transition(id, (from, to), expected, work_ms, (before, after), checks)
    }

    /// Moves a model down to `to` (device → host drops the device copy; host → disk drops
    /// the host copy), verifying after each step that the memory was really given back.
    pub fn offload(&mut self, id: ModelId, to: Tier) -> Result<(), MemError> {
        if self.session.tier(id) == Tier::Device && to < Tier::Device {
            let before = self.session.meters.read()?;
            self.move_model(id, (Tier::Device, Tier::Host), before, |s| {
                s.models[id.0].device = None;
                Ok(())
            })?;
        }
        if self.session.tier(id) == Tier::Host && to == Tier::Disk {
            let before = self.session.meters.read()?;
            self.move_model(id, (Tier::Host, Tier::Disk), before, |s| {
                s.models[id.0].host = None;
                Ok(())
            })?;
        }
        Ok(())
    }

    fn expect_tier(
        &self,
        id: ModelId,
        needed: Tier,
        operation: &'static str,
    ) -> Result<(), MemError> {
        let model = &self.session.models[id.0];
        if model.tier() == needed {
            Ok(())
        } else {
            Err(MemError::WrongTier {
                model: model.name.clone(),
                operation,
                needed,
                actual: model.tier(),
            })
        }
    }
}

impl MemorySession {
    #[cfg(feature = "cuda")]
    fn upload_copy(&self, id: ModelId) -> Result<BTreeMap<String, candle_core::Tensor>, MemError> {
        let model = &self.models[id.0];
        let (Device::Cuda(cuda), Some(HostCopy::Pinned(host))) = (&self.device, &model.host) else {
            return Err(MemError::WrongTier {
                model: model.name.clone(),
                operation: "upload (needs a CUDA session and a pinned host copy)",
                needed: Tier::Host,
                actual: model.tier(),
            });
        };
        host.iter()
            .map(|(name, pinned)| {
                pinned
                    .upload(cuda)
                    .map(|t| (name.clone(), t))
                    .map_err(|source| MemError::Tensor {
                        context: format!("uploading '{}' tensor '{name}'", model.name),
                        source: Box::new(source),
                    })
            })
            .collect()
    }

    #[cfg(not(feature = "cuda"))]
    fn upload_copy(&self, id: ModelId) -> Result<BTreeMap<String, candle_core::Tensor>, MemError> {
        let model = &self.models[id.0];
        Err(MemError::WrongTier {
            model: model.name.clone(),
            operation: "upload (this build has no CUDA)",
            needed: Tier::Device,
            actual: model.tier(),
        })
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn a_free_passes_the_resident_check_when_more_falls_than_expected() {
        let mib = MIB as i64;
        let freed = |measured: i64| {
            let before = 100 * MIB;
            let after = (before as i64 + measured) as u64;
            resident_check("rss_anon", -2 * mib, (before, after), 15 * MIB).ok
        };
        // The CI case: 1.5 MiB expected, 21.9 MiB fell.
        assert!(freed(-22 * mib));
        assert!(freed(-2 * mib));
        assert!(freed(13 * mib));
        // A model still referenced: nothing fell and more came.
        assert!(!freed(14 * mib));
        // A load stays two-sided.
        let loaded =
            |measured: i64| resident_check("rss_anon", 2 * mib, (0, measured as u64), 15 * MIB).ok;
        assert!(loaded(17 * mib) && loaded(0));
        assert!(!loaded(18 * mib));
    }

    /// The tests here read process-wide meters: one at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A checkpoint of one f32 tensor of 64 MiB: past malloc's largest mmap threshold, so that
    /// its host copy comes and goes from RssAnon whole (this test binary has no counting
    /// allocator; the checks read RSS).
    fn checkpoint(dir: &Path) -> PathBuf {
        let path = dir.join("vae.safetensors");
        let t = candle_core::Tensor::arange(0u32, 1 << 24, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("w".to_owned(), t)]),
            &path,
        )
        .unwrap();
        path
    }

    fn load(
        session: &mut MemorySession,
        inspection: &vpipe_ckpt::Inspection,
        patch: &str,
    ) -> (ModelId, bool) {
        session
            .phase("load", |p| {
                p.register_reusing("vae", inspection, None, patch)
            })
            .unwrap()
    }

    #[test]
    fn a_new_record_reports_what_happened_since_and_finds_resident_models_in_place() {
        let _alone = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let path = checkpoint(dir.path());
        let inspection = vpipe_ckpt::inspect(&path).unwrap();
        let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();

        let (id, carried) = load(&mut session, &inspection, "none");
        assert!(!carried);
        session.phase("work", |p| p.make_resident(id)).unwrap();
        let first = session.report().unwrap();
        assert_eq!(first.transitions.len(), 1, "the load");

        session.start_record().unwrap();
        let (again, carried) = load(&mut session, &inspection, "none");
        assert_eq!(again, id, "the same file, dtype and patch: the same model");
        assert!(carried);
        session
            .phase("work", |p| {
                p.make_resident(again)?;
                p.offload(again, Tier::Disk)
            })
            .unwrap();
        let second = session.report().unwrap();
        assert_eq!(
            second.baseline, first.baseline,
            "both from the empty process"
        );
        let names: Vec<&str> = second.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["load", "work"], "only the new record's phases");
        let moves: Vec<(Tier, Tier)> = second.transitions.iter().map(|t| (t.from, t.to)).collect();
        assert_eq!(moves, [(Tier::Host, Tier::Disk)], "no load, the offload");
        assert!(second.transitions[0].verified);
        let bytes = session.model_bytes(id);
        assert_eq!(bytes, 64 << 20);
        assert!(
            second.notes.iter().any(|n| n.what == "carried over"
                && n.phase.as_deref() == Some("load")
                && n.detail.contains(&format!("({bytes} B"))),
            "{:?}",
            second.notes
        );
        // The record starts with the baseline and a reading at its start, its times from there.
        assert!(second.samples.len() >= 2);
        assert!(second.phases[0].entry.t_ms < first.phases.last().unwrap().exit.t_ms + 1e4);

        // Another patch is another model: it takes the slot of the one on disk.
        session.start_record().unwrap();
        let (other, carried) = load(&mut session, &inspection, "lora a.safetensors at 0.5");
        assert!(!carried);
        assert_eq!(
            other, id,
            "the slot of a model on disk from an earlier record"
        );
        assert_eq!(session.models.len(), 1, "the session does not grow");
        assert_eq!(session.find_registered(&path, None, "none"), None);
        assert_eq!(
            session.find_registered(&path, None, "lora a.safetensors at 0.5"),
            Some(other)
        );
        assert!(session.resident_models().is_empty());
        let third = session.report().unwrap();
        assert!(third.transitions.is_empty() && third.notes.is_empty());
    }

    #[test]
    fn a_resident_model_keeps_its_slot_and_a_file_changed_in_place_is_a_new_model() {
        let _alone = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let path = checkpoint(dir.path());
        let inspection = vpipe_ckpt::inspect(&path).unwrap();
        let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
        let (id, _) = load(&mut session, &inspection, "none");
        session.phase("work", |p| p.make_resident(id)).unwrap();
        session.start_record().unwrap();
        // The same path, rewritten: longer, so its identity differs whatever the clock says.
        let t = candle_core::Tensor::zeros(1 << 19, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("w".to_owned(), t)]),
            &path,
        )
        .unwrap();
        let inspection = vpipe_ckpt::inspect(&path).unwrap();
        let (new, carried) = load(&mut session, &inspection, "none");
        assert!(!carried);
        assert_ne!(new, id, "the resident model keeps its slot");
        assert_eq!(session.resident_models(), [id]);
        session
            .phase("release", |p| p.offload(id, Tier::Disk))
            .unwrap();
        assert!(session.resident_models().is_empty());
    }
}
