//! Streams: every group a model asks for, in cycles and out of order, reaches the arena equal
//! to the file, for bf16 and float8 e4m3 blocks with their f32 scales, whole blocks or blocks
//! in parts of different layouts; starting and ending a stream are verified moves that leave
//! the compute tier as it was. On CUDA (the `cuda` feature and a device) from the pinned host
//! copy (copied ahead on the second stream) and from the file (through the pinned staging
//! buffers); on the CPU from the file.

use candle_core::{DType, Device, Tensor};
use vpipe_mem::{Budget, MemorySession, StreamSpec, Tier};

const BLOCKS: usize = 5;
const ROWS: usize = 64;
const COLUMNS: usize = 96;

/// A checkpoint of `BLOCKS` blocks (a bf16 matrix, a float8 e4m3 matrix and its f32 scale
/// each) and one tensor outside the blocks; every byte depends on its block and position.
fn write_blocks(path: &std::path::Path) {
    let mut header = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let mut add = |name: String, dtype: &str, shape: &[usize], bytes: Vec<u8>| {
        let start = data.len();
        data.extend_from_slice(&bytes);
        header.push(format!(
            r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{start},{}]}}"#,
            data.len()
        ));
    };
    for b in 0..BLOCKS {
        let bf16: Vec<u8> = (0..ROWS * COLUMNS)
            .flat_map(|i| half::bf16::from_f32((b * 1000 + i % 977) as f32 / 64.0).to_le_bytes())
            .collect();
        add(
            format!("blocks.{b}.a.weight"),
            "BF16",
            &[ROWS, COLUMNS],
            bf16,
        );
        // e4m3 bytes whose exponent is never all ones (no NaN): 0x00..=0x77 and their negatives.
        let fp8: Vec<u8> = (0..ROWS * COLUMNS)
            .map(|i| ((i + 7 * b) % 0x78) as u8 | if i % 3 == 0 { 0x80 } else { 0 })
            .collect();
        add(
            format!("blocks.{b}.b.weight"),
            "F8_E4M3",
            &[ROWS, COLUMNS],
            fp8,
        );
        add(
            format!("blocks.{b}.b.scale_weight"),
            "F32",
            &[],
            (0.5 + b as f32).to_le_bytes().to_vec(),
        );
    }
    add(
        "head.weight".into(),
        "F32",
        &[ROWS],
        (0..ROWS).flat_map(|i| (i as f32).to_le_bytes()).collect(),
    );
    let header = format!("{{{}}}", header.join(","));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).unwrap();
}

/// The tensor's values as f32 on the host (float8 and bf16 are exact in f32).
fn values(t: &Tensor) -> Vec<f32> {
    // On the host first: CUDA has no conversion out of float8.
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap()
}

fn group(b: usize) -> Vec<String> {
    ["a.weight", "b.scale_weight", "b.weight"]
        .iter()
        .map(|n| format!("blocks.{b}.{n}"))
        .collect()
}

/// Whole blocks 2..5 (blocks 0 and 1 held) through 2 slots.
fn whole_blocks() -> StreamSpec {
    StreamSpec {
        groups: (2..BLOCKS).map(group).collect(),
        slots: 2,
        host_rows: Vec::new(),
    }
}

/// Blocks 2..5 in two parts of different layouts (the bf16 matrix; the float8 matrix and its
/// scale) through one slot per part.
fn block_parts() -> StreamSpec {
    StreamSpec {
        groups: (2..BLOCKS)
            .flat_map(|b| {
                let [a, scale, fp8] = group(b).try_into().unwrap();
                [vec![a], vec![scale, fp8]]
            })
            .collect(),
        slots: 2,
        host_rows: Vec::new(),
    }
}

/// Streams `spec` on `device` from each source (`pinned`: the pinned host copy, else the
/// file), asking for the groups in three cycles, the last again, then out of order (one of
/// them twice),
/// and checks every tensor against the file and the report's verifications.
fn check_streams(device: &Device, spec: &StreamSpec, sources: &[bool]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blocks.safetensors");
    write_blocks(&path);
    let file = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut session = MemorySession::new(device.clone(), Budget::default()).unwrap();
    let id = session
        .register("blocks", &path, Some(DType::BF16))
        .unwrap();
    let n = spec.groups.len();
    let mut order: Vec<usize> = (0..3).flat_map(|_| 0..n).collect();
    order.extend([n - 1, 1, 1, 0]);
    for &pinned in sources {
        session
            .phase(if pinned { "pinned" } else { "file" }, |p| {
                if pinned {
                    p.load(id)?;
                }
                let mut streamer = p.begin_stream(id, spec)?;
                for held in ["blocks.0.a.weight", "blocks.1.b.weight", "head.weight"] {
                    assert_eq!(
                        values(&streamer.fixed()[held]),
                        values(&file[held]),
                        "{held}"
                    );
                }
                for &g in &order {
                    let tensors = streamer.group(g)?;
                    assert_eq!(tensors.len(), spec.groups[g].len());
                    for (name, t) in &tensors {
                        assert_eq!(t.device().is_cuda(), device.is_cuda(), "{name}");
                        assert_eq!(values(t), values(&file[name]), "{name} (pinned {pinned})");
                        if name.ends_with("b.weight") {
                            assert_eq!(t.dtype(), DType::F8E4M3);
                        }
                    }
                }
                let stats = streamer.stats().clone();
                assert_eq!(stats.fetches, order.len() as u64);
                assert!(stats.out_of_order >= 1, "{stats:?}");
                p.end_stream(id, streamer)?;
                p.offload(id, Tier::Disk)
            })
            .unwrap();
    }
    let report = session.report().unwrap();
    assert!(report.transitions.iter().all(|t| t.verified));
    assert_eq!(report.streams.len(), sources.len());
    // The device gives back every byte; the process's heap may keep some of its pages.
    if device.is_cuda() {
        for phase in &report.phases {
            assert_eq!(phase.exit_above_baseline, 0, "{phase:?}");
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn streamed_groups_reach_the_device_equal_to_the_file() {
    let device = Device::new_cuda(0).unwrap();
    check_streams(&device, &whole_blocks(), &[true, false]);
    check_streams(&device, &block_parts(), &[true, false]);
}

#[test]
fn streamed_groups_reach_the_heap_equal_to_the_file() {
    check_streams(&Device::Cpu, &whole_blocks(), &[false]);
    check_streams(&Device::Cpu, &block_parts(), &[false]);
}

#[test]
fn an_arena_without_a_slot_for_each_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blocks.safetensors");
    write_blocks(&path);
    let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
    let id = session
        .register("blocks", &path, Some(DType::BF16))
        .unwrap();
    let spec = StreamSpec {
        slots: 1,
        ..block_parts()
    };
    let err = session
        .phase("one slot", |p| p.begin_stream(id, &spec).map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 layouts"), "{err}");
}

#[test]
fn a_checkpoint_registered_from_its_inspection_is_described_as_from_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blocks.safetensors");
    write_blocks(&path);
    let inspection = vpipe_ckpt::inspect(&path).unwrap();
    let mut session = MemorySession::new(Device::Cpu, Budget::default()).unwrap();
    for load_dtype in [None, Some(DType::BF16), Some(DType::F32)] {
        let read = session.register("read", &path, load_dtype).unwrap();
        let inspected = session
            .register_inspected("inspected", &inspection, load_dtype)
            .unwrap();
        assert_eq!(session.tensors(read), session.tensors(inspected));
        assert_eq!(session.model_bytes(read), session.model_bytes(inspected));
    }
}
