//! The memory core's promises, measured on the host tiers (seed TEST 1, 3 and 5 on the CPU).
//!
//! Every test here reads process-wide meters, so they run one at a time (`SERIAL`), and this
//! file is its own test binary with the counting allocator installed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use vpipe_mem::{
    heap_stats, Budget, Event, MemError, MemorySession, Meters, Reading, Report, Tier,
};

#[global_allocator]
static ALLOC: vpipe_mem::CountingAllocator = vpipe_mem::CountingAllocator;

static SERIAL: Mutex<()> = Mutex::new(());

const MIB: u64 = 1 << 20;

/// Runs `body` alone (no other test of this file runs meanwhile), on a thread of its own that
/// ends before the next test starts: a thread's exit frees its thread-local buffers (the matmul
/// library's packing buffer, one L2 cache in size), which would move the heap counters under
/// the next test's measurements if a test thread ended while another measured.
fn serially(body: impl FnOnce() + Send) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::scope(|scope| {
        if let Err(panic) = scope.spawn(body).join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// Writes a safetensors checkpoint of `tensors` f32 tensors of `mib_each` MiB, filled with a
/// non-constant pattern (so that no page is shared or skipped), and frees the source buffers
/// before returning.
fn write_checkpoint(dir: &Path, name: &str, tensors: usize, mib_each: usize) -> PathBuf {
    let path = dir.join(name);
    let elems = mib_each * (1 << 20) / 4;
    let mut map = std::collections::HashMap::new();
    for i in 0..tensors {
        let t = Tensor::arange(0u32, elems as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(1e-3, i as f64)
            .unwrap();
        map.insert(format!("blocks.{i}.weight"), t);
    }
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

/// RssAnon read by the test's own parser, not the library's. It reads into a static buffer
/// (touched once before the comparisons start): a fresh heap or stack page touched here would
/// move the very figure being compared.
fn independent_rss_anon() -> u64 {
    use std::io::Read;
    static BUFFER: Mutex<[u8; 16384]> = Mutex::new([0; 16384]);
    let mut guard = BUFFER.lock().unwrap();
    let buf = &mut *guard;
    let mut file = std::fs::File::open("/proc/self/status").unwrap();
    let mut len = 0;
    loop {
        let n = file.read(&mut buf[len..]).unwrap();
        if n == 0 {
            break;
        }
        len += n;
    }
    let status = std::str::from_utf8(&buf[..len]).unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn within(measured: i64, expected: i64, fraction: f64) -> bool {
    (measured - expected).unsigned_abs() as f64 <= expected.unsigned_abs() as f64 * fraction
}

#[test]
fn host_tier_load_raises_rss_by_the_weights_and_offload_gives_it_back() {
    serially(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "big.safetensors", 4, 64);
        let bytes = 256 * MIB as i64;

        let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
        let model = session.register("big", &path, None).unwrap();
        assert_eq!(session.model_bytes(model), bytes as u64);

        let start = independent_rss_anon() as i64;
        session.phase("load", |p| p.load(model)).unwrap();
        let loaded = independent_rss_anon() as i64;
        assert!(
            within(loaded - start, bytes, 0.05),
            "load raised RssAnon by {} bytes, expected {bytes} ± 5%",
            loaded - start
        );
        assert_eq!(session.tier(model), Tier::Host);

        session
            .phase("offload", |p| p.offload(model, Tier::Disk))
            .unwrap();
        let offloaded = independent_rss_anon() as i64;
        assert!(
            within(offloaded - loaded, -bytes, 0.05),
            "offload changed RssAnon by {} bytes, expected -{bytes} ± 5%",
            offloaded - loaded
        );
        assert_eq!(session.tier(model), Tier::Disk);

        // The store verified both moves itself, with the same meters.
        let report = session.report().unwrap();
        assert_eq!(report.transitions.len(), 2);
        assert!(report.transitions.iter().all(|t| t.verified), "{report:#?}");
    });
}

/// A field of /proc/self/status in bytes, read by the test itself.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn reading_a_checkpoint_does_not_hold_its_mapped_pages_next_to_the_copy() {
    serially(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "big.safetensors", 4, 64);
        let bytes = 256 * MIB;
        let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
        let model = session.register("big", &path, None).unwrap();

        // Writing 5 to clear_refs resets VmHWM, the kernel's peak RSS (anon + file + shmem).
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let before = status_bytes("VmRSS:");
        session.phase("load", |p| p.load(model)).unwrap();
        let peak_rise = status_bytes("VmHWM:").saturating_sub(before);
        // The host copy is 256 MiB; every page read through the map as well would be 512 MiB. One
        // 64 MiB tensor's pages may be mapped while it is copied.
        assert!(
            peak_rise < bytes + 96 * MIB,
            "peak RSS rose by {} MiB while reading a {} MiB checkpoint",
            peak_rise / MIB,
            bytes / MIB
        );
        session
            .phase("offload", |p| p.offload(model, Tier::Disk))
            .unwrap();
    });
}

#[test]
fn three_phases_in_sequence_leave_no_accumulation() {
    serially(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "m.safetensors", 2, 16);
        let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
        let model = session.register("m", &path, None).unwrap();
        let heap_at_start = heap_stats().unwrap().current;

        let mut after_each = Vec::new();
        for phase in ["text", "sample", "decode"] {
            session
                .phase(phase, |p| -> Result<(), MemError> {
                    p.make_resident(model)?;
                    {
                        let lease = p.lease(model)?;
                        let w = lease.get("blocks.0.weight")?;
                        // Real work on the leased weight: activations come and go inside the phase.
                        let activations = w.reshape((1024, 4096)).unwrap().sqr().unwrap();
                        let _sum = activations.sum_all().unwrap().to_scalar::<f32>().unwrap();
                    }
                    p.offload(model, Tier::Disk)
                })
                .unwrap();
            after_each.push(heap_stats().unwrap().current);
        }
        for (i, heap) in after_each.iter().enumerate() {
            assert!(
                heap.abs_diff(heap_at_start) < MIB,
                "heap after phase {i}: {heap}, at start {heap_at_start}: memory accumulated"
            );
        }
        let report = session.report().unwrap();
        assert_eq!(report.phases.len(), 3);
        for phase in &report.phases {
            assert!(phase.exit_above_baseline < MIB, "{phase:#?}");
            // The phase really held the weights and its activations at its peak.
            assert!(phase.peak_above_baseline >= 32 * MIB, "{phase:#?}");
        }
    });
}

#[test]
fn a_clone_kept_past_its_lease_fails_the_offload_verification() {
    serially(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "m.safetensors", 2, 16);
        let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
        let model = session.register("leaky", &path, None).unwrap();

        let mut kept = None;
        let result = session.phase("leak", |p| -> Result<(), MemError> {
            p.make_resident(model)?;
            kept = Some(p.lease(model)?.get("blocks.1.weight")?.clone());
            p.offload(model, Tier::Disk)
        });
        let error = result.unwrap_err();
        match &error {
            MemError::VerificationFailed {
                model,
                meter,
                expected,
                measured,
                ..
            } => {
                assert_eq!(model, "leaky");
                assert_eq!(meter, "heap");
                assert_eq!(*expected, -(32 * MIB as i64));
                // The kept tensor (16 MiB) did not come back.
                assert!(
                    (*measured + 16 * MIB as i64).abs() < MIB as i64,
                    "measured {measured}"
                );
            }
            other => panic!("expected a failed verification, got {other}"),
        }
        let message = error.to_string();
        assert!(
            message.contains("'leaky'") && message.contains("32.00 MiB"),
            "{message}"
        );
        let report = session.report().unwrap();
        assert!(!report.transitions.last().unwrap().verified);
        drop(kept);
    });
}

#[test]
fn over_budget_is_refused_before_anything_is_loaded() {
    serially(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "m.safetensors", 1, 16);
        let budget = Budget {
            compute: Some(8 * MIB),
            host: None,
        };
        let mut session = MemorySession::new(Device::Cpu, budget).unwrap();
        let model = session.register("too-big", &path, None).unwrap();
        let heap_before = heap_stats().unwrap().current;
        let error = session.phase("load", |p| p.load(model)).unwrap_err();
        assert!(heap_stats().unwrap().current.abs_diff(heap_before) < MIB);
        assert_eq!(session.tier(model), Tier::Disk);
        match &error {
            MemError::OverBudget {
                needed, allowed, ..
            } => {
                assert_eq!(*needed, 16 * MIB);
                assert_eq!(*allowed, 8 * MIB);
            }
            other => panic!("expected a refusal, got {other}"),
        }
        let message = error.to_string();
        assert!(
            message.contains("too-big")
                && message.contains("16.00 MiB")
                && message.contains("8.00 MiB"),
            "{message}"
        );
        assert_eq!(session.report().unwrap().refusals.len(), 1);
    });
}

/// The test's own reading at the instant of each library reading, keyed by its timestamp.
/// RssAnon is read twice a few microseconds apart while candle's worker threads may still be
/// settling; between the two reads their stacks can touch a page or two. Heap figures have no
/// such excuse and must be equal to the byte.
const RSS_READ_SLACK: u64 = 2 * 4096;

#[derive(Debug, Clone, Copy)]
struct Independent {
    t_ms: f64,
    heap_current: u64,
    heap_peak: u64,
    rss_anon: u64,
}

#[test]
fn every_number_in_the_report_equals_an_independent_reading() {
    serially(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "m.safetensors", 2, 16);
        independent_rss_anon(); // touch the reader's buffer before any comparison
        let seen: Arc<Mutex<Vec<Independent>>> = Arc::new(Mutex::new(Vec::with_capacity(256)));
        let sink = seen.clone();
        let meters = Meters::host().with_observer(Box::new(move |r: &Reading| {
            // The allocator counters first, through the public accessor, then /proc through the
            // test's own parser.
            let heap = heap_stats().unwrap();
            let rss_anon = independent_rss_anon();
            sink.lock().unwrap().push(Independent {
                t_ms: r.t_ms,
                heap_current: heap.current,
                heap_peak: heap.peak,
                rss_anon,
            });
        }));
        let mut session =
            MemorySession::with_meters(Device::Cpu, meters, Budget::default()).unwrap();
        let model = session.register("m", &path, None).unwrap();
        for phase in ["load", "work", "offload"] {
            session
                .phase(phase, |p| -> Result<(), MemError> {
                    match phase {
                        "load" => p.load(model),
                        "work" => {
                            let lease = p.lease(model)?;
                            let _ = lease.get("blocks.0.weight")?.sqr().unwrap();
                            Ok(())
                        }
                        _ => p.offload(model, Tier::Disk),
                    }
                })
                .unwrap();
        }
        let out = dir.path().join("report.json");
        session.report().unwrap().write_json(&out).unwrap();
        let report: Report = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();

        let seen = seen.lock().unwrap().clone();
        let find = |r: &Reading| -> Independent {
            *seen
                .iter()
                .find(|i| i.t_ms == r.t_ms)
                .unwrap_or_else(|| panic!("no independent reading at t = {} ms", r.t_ms))
        };
        let mut compared = 0;
        let mut compare = |r: &Reading| {
            let i = find(r);
            let heap = r.heap.unwrap();
            assert_eq!(heap.current, i.heap_current, "heap at {} ms", r.t_ms);
            assert_eq!(heap.peak, i.heap_peak, "heap peak at {} ms", r.t_ms);
            assert!(
                r.host.anon.abs_diff(i.rss_anon) <= RSS_READ_SLACK,
                "RssAnon at {} ms: report {}, independent {}",
                r.t_ms,
                r.host.anon,
                i.rss_anon
            );
            compared += 1;
        };
        compare(&report.baseline);
        for p in &report.phases {
            compare(&p.entry);
            compare(&p.exit);
            let i = find(&p.exit);
            let base = report.baseline.heap.unwrap().current;
            assert_eq!(p.peak_above_baseline, i.heap_peak - base);
            assert_eq!(p.exit_above_baseline, i.heap_current.saturating_sub(base));
        }
        for s in &report.samples {
            let i = find(&Reading {
                t_ms: s.t_ms,
                ..report.baseline
            });
            assert_eq!(s.compute_used, i.heap_current);
            assert_eq!(s.compute_peak, i.heap_peak);
            assert!(s.rss_anon.abs_diff(i.rss_anon) <= RSS_READ_SLACK);
        }
        // Transitions: the measured change of each check is the difference of two readings.
        let ledger_transitions = session
            .ledger()
            .entries()
            .iter()
            .filter_map(|e| match &e.event {
                Event::Transition { before, after, .. } => Some((*before, *after)),
                _ => None,
            });
        for ((before, after), t) in ledger_transitions.zip(&report.transitions) {
            let (b, a) = (find(&before), find(&after));
            let heap_check = t.checks.iter().find(|c| c.meter == "heap").unwrap();
            assert_eq!(
                heap_check.measured,
                a.heap_current as i64 - b.heap_current as i64
            );
            let rss_check = t.checks.iter().find(|c| c.meter == "rss_anon").unwrap();
            let independent = a.rss_anon as i64 - b.rss_anon as i64;
            assert!(rss_check.measured.abs_diff(independent) <= 2 * RSS_READ_SLACK);
        }
        assert!(compared >= 7);
        assert_eq!(report.transitions.len(), 2);
    });
}

#[test]
fn the_chart_shows_every_phase_and_the_budget() {
    serially(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "m.safetensors", 1, 4);
        let budget = Budget {
            compute: Some(64 * MIB),
            host: None,
        };
        let mut session = MemorySession::new(Device::Cpu, budget).unwrap();
        let model = session.register("m", &path, None).unwrap();
        session.phase("load <1>", |p| p.load(model)).unwrap();
        session
            .phase("unload", |p| p.offload(model, Tier::Disk))
            .unwrap();
        let svg = vpipe_mem::render_svg(&session.report().unwrap());
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("load &lt;1&gt;") && svg.contains("unload"));
        assert!(svg.contains("budget + baseline"));
        assert!(svg.contains("in use (") && svg.contains("RssAnon") && svg.contains("RssFile"));
    });
}

/// A `.pth` written by torch (fixture of vpipe-ckpt, made by tools/fixtures/make_pth_fixtures.py:
/// 42 tensors, 10,256 bytes, values `arange % 251`) is registered, loaded and leased.
#[test]
fn pth_checkpoints_load_into_the_host_tier() {
    serially(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../vpipe-ckpt/tests/fixtures/tiny_wan_dit_t2v.pth");
        let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
        let model = session.register("tiny dit", &path, None).unwrap();
        assert_eq!(session.model_bytes(model), 10_256);
        session
            .phase("load", |p| -> Result<(), MemError> {
                p.load(model)?;
                let lease = p.lease(model)?;
                assert_eq!(lease.iter().count(), 42);
                let (name, tensor) = lease.iter().next().unwrap();
                let values = tensor
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert!(values.iter().any(|v| *v != 0.0), "{name} is all zeros");
                p.offload(model, Tier::Disk)
            })
            .unwrap();
    });
}

/// A weight patch replaces the patched weights as they are read: the loaded tensor is the
/// patched one, the byte accounting is unchanged, and bad patches are errors.
#[test]
fn a_weight_patch_replaces_weights_as_they_are_read() {
    serially(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "small.safetensors", 2, 1);
        let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
        let model = session.register("small", &path, None).unwrap();
        let double = |keys: &[&str]| vpipe_mem::WeightPatch {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            apply: std::sync::Arc::new(|_: &str, t: &Tensor| t * 2.0),
            apply_in_place: None,
            #[cfg(feature = "cuda")]
            apply_on_device: None,
        };
        let err = session
            .set_patch(model, double(&["blocks.9.weight"]))
            .unwrap_err();
        assert!(err.to_string().contains("'blocks.9.weight'"), "{err}");
        session
            .set_patch(model, double(&["blocks.1.weight"]))
            .unwrap();
        let (first, second) = session
            .phase("use", |p| -> Result<(f32, f32), vpipe_mem::MemError> {
                p.make_resident(model)?;
                let read = |lease: &vpipe_mem::Lease<'_>, key: &str| {
                    lease
                        .get(key)
                        .unwrap()
                        .get(5)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                };
                let values = {
                    let lease = p.lease(model)?;
                    (
                        read(&lease, "blocks.0.weight"),
                        read(&lease, "blocks.1.weight"),
                    )
                };
                // Still on the host: a patch cannot be set now.
                assert!(p.set_patch(model, double(&["blocks.0.weight"])).is_err());
                p.offload(model, Tier::Disk)?;
                Ok(values)
            })
            .unwrap();
        // write_checkpoint: tensor i holds arange · 1e-3 + i; element 5 of tensor 1 is 1.005.
        assert!((first - 0.005).abs() < 1e-6, "{first}");
        assert!((second - 2.0 * 1.005).abs() < 1e-6, "{second}");

        // A patch that changes a weight's shape fails the load, naming the tensor.
        let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
        let model = session.register("small", &path, None).unwrap();
        let reshape = vpipe_mem::WeightPatch {
            keys: ["blocks.0.weight".to_string()].into(),
            apply: std::sync::Arc::new(|_: &str, t: &Tensor| t.narrow(0, 0, 4)),
            apply_in_place: None,
            #[cfg(feature = "cuda")]
            apply_on_device: None,
        };
        session.set_patch(model, reshape).unwrap();
        let err = session.phase("load", |p| p.load(model)).unwrap_err();
        assert!(
            err.to_string().contains("patching 'blocks.0.weight'"),
            "{err}"
        );
    });
}

/// A copy that does not land where it is counted fails the load: here a patch hands back one
/// shared tensor for every weight, so the host copy is a quarter of the model's bytes.
#[test]
fn a_copy_that_does_not_land_fails_the_load_verification() {
    serially(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "m.safetensors", 4, 4);
        let shared = Tensor::zeros(MIB as usize, DType::F32, &Device::Cpu).unwrap();
        let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
        let model = session.register("hollow", &path, None).unwrap();
        session
            .set_patch(
                model,
                vpipe_mem::WeightPatch {
                    keys: (0..4).map(|i| format!("blocks.{i}.weight")).collect(),
                    apply: Arc::new(move |_: &str, _: &Tensor| Ok(shared.clone())),
                    apply_in_place: None,
                    #[cfg(feature = "cuda")]
                    apply_on_device: None,
                },
            )
            .unwrap();
        let error = session.phase("load", |p| p.load(model)).unwrap_err();
        match &error {
            MemError::VerificationFailed {
                meter,
                expected,
                measured,
                ..
            } => {
                assert_eq!(meter, "heap");
                assert_eq!(*expected, 16 * MIB as i64);
                assert!(measured.abs() < MIB as i64, "measured {measured}");
            }
            other => panic!("expected a failed verification, got {other}"),
        }
    });
}

/// The CPU matmul library keeps a packing buffer per thread from the thread's first matmul on.
/// A load whose patch multiplies matrices (a LoRA merge does) on a thread that never ran one
/// must not count that buffer as the model's: the session makes it before its baseline, and
/// reports it on its own line.
#[test]
fn a_matmul_library_workspace_is_not_counted_as_the_model() {
    serially(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "m.safetensors", 2, 1);
        let fresh_thread = std::thread::spawn(move || {
            let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
            let model = session.register("merged", &path, None).unwrap();
            session
                .set_patch(
                    model,
                    vpipe_mem::WeightPatch {
                        keys: ["blocks.0.weight".to_string()].into(),
                        apply: Arc::new(|_: &str, t: &Tensor| {
                            let m = t.reshape((512, 512))?;
                            (m.matmul(&m.t()?)? * 0.0)?.reshape(t.dims())? + t
                        }),
                        apply_in_place: None,
                        #[cfg(feature = "cuda")]
                        apply_on_device: None,
                    },
                )
                .unwrap();
            session
                .phase("load", |p| {
                    p.load(model)?;
                    p.offload(model, Tier::Disk)
                })
                .unwrap();
            session.report().unwrap()
        });
        let report = fresh_thread.join().unwrap();
        assert!(report.transitions.iter().all(|t| t.verified));
        let workspace = report.compute_workspace;
        assert!(workspace.threads >= 1, "{workspace:?}");
        assert!(heap_stats().is_some());
        // Made once per process: by this test or an earlier one, it was measured then.
        let first = vpipe_mem::prepare_compute_workspace();
        assert_eq!(first, workspace);
    });
}
