//! Residency benchmark on a CUDA device (seed TEST 1 on the GPU tiers): reads a checkpoint of
//! `--gib` GiB of bf16 weights into pinned host memory, uploads it, offloads it, several times,
//! and reports measured device memory after each step and the upload rate.
//!
//! ```text
//! cargo build --release --features cuda -p vpipe-mem --example residency_bench
//! residency_bench --gib 4 --rounds 3 --out DIR
//! ```
//!
//! Writes DIR/results.json (numbers), DIR/report.json and DIR/memory.svg (from the ledger).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use safetensors::tensor::{Dtype, TensorView};
use vpipe_mem::{fmt_bytes, Budget, MemError, MemorySession, Reading, Tier};

#[global_allocator]
static ALLOC: vpipe_mem::CountingAllocator = vpipe_mem::CountingAllocator;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

struct Args {
    gib: u64,
    rounds: usize,
    tensor_mib: u64,
    out: PathBuf,
    device: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        gib: 4,
        rounds: 3,
        tensor_mib: 256,
        out: PathBuf::from("residency-bench"),
        device: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--gib" => args.gib = value.parse().expect("--gib N"),
            "--rounds" => args.rounds = value.parse().expect("--rounds N"),
            "--tensor-mib" => args.tensor_mib = value.parse().expect("--tensor-mib N"),
            "--out" => args.out = PathBuf::from(value),
            "--device" => args.device = value.parse().expect("--device N"),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

/// Writes `gib` GiB of bf16 tensors with a varying bit pattern (never zeros).
fn write_checkpoint(path: &Path, gib: u64, tensor_mib: u64) {
    let tensor_bytes = (tensor_mib * MIB) as usize;
    let count = (gib * GIB / (tensor_mib * MIB)) as usize;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..tensor_bytes / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Keep every bf16 finite: clear the top exponent bit of each 16-bit lane.
            (state & 0xBFFF_BFFF_BFFF_BFFF).to_le_bytes()
        })
        .collect();
    let side = (tensor_bytes / 2 / 4096, 4096);
    let views: HashMap<String, TensorView<'_>> = (0..count)
        .map(|i| {
            let view = TensorView::new(Dtype::BF16, vec![side.0, side.1], &data).unwrap();
            (format!("blocks.{i}.weight"), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn device_used(r: &Reading) -> u64 {
    let c = r.cuda.expect("a CUDA reading");
    c.driver_total - c.driver_free
}

fn main() -> Result<(), MemError> {
    let args = parse_args();
    std::fs::create_dir_all(&args.out).unwrap();
    let ckpt = std::env::temp_dir().join(format!("vpipe-residency-{}g.safetensors", args.gib));
    let t = std::time::Instant::now();
    write_checkpoint(&ckpt, args.gib, args.tensor_mib);
    println!(
        "checkpoint: {} GiB in {:.1} s",
        args.gib,
        t.elapsed().as_secs_f64()
    );

    let device = Device::new_cuda(args.device).map_err(|source| MemError::Tensor {
        context: "opening the CUDA device".into(),
        source: Box::new(source),
    })?;
    let mut session = MemorySession::new(device.clone(), Budget::default())?;
    let base = *session.baseline();
    println!(
        "baseline: driver used {} (context, handles), pool used {}",
        fmt_bytes(device_used(&base)),
        fmt_bytes(base.cuda.unwrap().pool_used)
    );
    let mut failures: Vec<String> = Vec::new();
    let mut results = serde_json::Map::new();

    let model = session.register("weights", &ckpt, None)?;
    let bytes = session.model_bytes(model);
    // Host-tier verification of pinned memory is reported, not fatal: the benchmark goes on to
    // the device tier either way.
    if let Err(e) = session.phase("load to pinned host", |p| p.load(model)) {
        println!("load verification: {e}");
        failures.push(format!("load: {e}"));
    }

    let mut upload_gbps = Vec::new();
    let mut after_offload_above_base = Vec::new();
    for round in 0..args.rounds {
        session.phase(&format!("upload {round}"), |p| p.upload(model))?;
        let uploaded = session.meters().read()?;
        session.phase(&format!("offload {round}"), |p| {
            p.offload(model, Tier::Host)
        })?;
        let offloaded = session.meters().read()?;
        let report = session.report()?;
        let upload = report
            .transitions
            .iter()
            .rev()
            .find(|t| t.to == Tier::Device)
            .unwrap();
        let gbps = bytes as f64 / 1e9 / (upload.work_ms / 1e3);
        upload_gbps.push(gbps);
        let above = device_used(&offloaded) as i64 - device_used(&base) as i64;
        after_offload_above_base.push(above);
        println!(
            "round {round}: upload {:.1} ms = {gbps:.1} GB/s; device used +{} after upload, {} after offload (pool used {})",
            upload.work_ms,
            fmt_bytes(device_used(&uploaded) - device_used(&base)),
            vpipe_mem::fmt_signed_bytes(above),
            fmt_bytes(offloaded.cuda.unwrap().pool_used),
        );
    }

    // A clone kept past the lease must make the offload's verification fail.
    let leak = session.phase("kept clone", |p| -> Result<(), MemError> {
        p.upload(model)?;
        let kept = p.lease(model)?.get("blocks.0.weight")?.clone();
        let result = p.offload(model, Tier::Host);
        drop(kept);
        result
    });
    let leak_detected = matches!(leak, Err(MemError::VerificationFailed { .. }));
    println!(
        "kept clone: {}",
        match &leak {
            Err(e) => format!("detected: {e}"),
            Ok(()) => "NOT detected".into(),
        }
    );
    if !leak_detected {
        failures.push("a kept clone was not detected".into());
    }

    session.phase("release", |p| p.offload(model, Tier::Disk))?;
    let end = session.meters().read()?;

    // The budget refuses before loading.
    let mut small = MemorySession::new(
        device.clone(),
        Budget {
            compute: Some(GIB),
            host: None,
        },
    )?;
    let again = small.register("weights", &ckpt, None)?;
    let refusal = small.phase("over budget", |p| -> Result<(), MemError> {
        let _ = p.load(again);
        p.upload(again)
    });
    println!(
        "budget 1 GiB: {}",
        match &refusal {
            Err(e) => e.to_string(),
            Ok(()) => "NOT refused".into(),
        }
    );
    if !matches!(refusal, Err(MemError::OverBudget { .. })) {
        failures.push("over-budget upload was not refused".into());
    }
    drop(small);

    let report = session.report()?;
    report.write_json(&args.out.join("report.json"))?;
    vpipe_mem::write_svg(&report, &args.out.join("memory.svg"))?;

    let worst = after_offload_above_base
        .iter()
        .map(|b| b.unsigned_abs())
        .max()
        .unwrap_or(0);
    if worst > 64 * MIB {
        failures.push(format!(
            "device memory after offload was {} away from the baseline (limit 64 MiB)",
            fmt_bytes(worst)
        ));
    }
    let mut sorted = upload_gbps.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let json = |v: serde_json::Value| v;
    results.insert("bytes".into(), json(bytes.into()));
    results.insert("upload_gbps".into(), json(upload_gbps.clone().into()));
    results.insert("upload_gbps_median".into(), json(median.into()));
    results.insert(
        "baseline_driver_used".into(),
        json(device_used(&base).into()),
    );
    results.insert(
        "after_offload_minus_baseline".into(),
        json(after_offload_above_base.clone().into()),
    );
    results.insert(
        "end_minus_baseline".into(),
        json((device_used(&end) as i64 - device_used(&base) as i64).into()),
    );
    results.insert("leak_detected".into(), json(leak_detected.into()));
    results.insert("failures".into(), json(failures.clone().into()));
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_vec_pretty(&results).unwrap(),
    )
    .unwrap();
    std::fs::remove_file(&ckpt).ok();
    println!(
        "median upload {median:.1} GB/s over {} rounds of {}; worst |after offload - baseline| {}",
        args.rounds,
        fmt_bytes(bytes),
        fmt_bytes(worst)
    );
    if failures.is_empty() {
        println!("PASS");
        Ok(())
    } else {
        println!("FAIL: {}", failures.join("; "));
        std::process::exit(1)
    }
}
