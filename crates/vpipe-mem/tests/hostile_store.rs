//! The residency store on hostile and unusual checkpoint files: only regular files are opened,
//! the format is told by content, float8 e5m2 is converted exactly, and a dtype the store could
//! not move to the GPU is refused at registration.
//!
//! Sessions read process-wide meters, so the tests run one at a time (`SERIAL`), with the
//! counting allocator installed as in the other test binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use candle_core::{DType, Device};
use half::f16;
use vpipe_mem::{Budget, MemError, MemorySession, ModelId};

#[global_allocator]
static ALLOC: vpipe_mem::CountingAllocator = vpipe_mem::CountingAllocator;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A safetensors file written by hand: length prefix, JSON header, data.
fn write_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

fn session() -> MemorySession {
    MemorySession::new(Device::Cpu, Budget::default()).unwrap()
}

/// Loads `model` to the host in a phase and returns tensor `name` as f32 values, with its dtype.
fn load_values(session: &mut MemorySession, model: ModelId, name: &str) -> (DType, Vec<f32>) {
    session
        .phase("load", |p| {
            p.load(model)?;
            let lease = p.lease(model)?;
            let t = lease.get(name)?;
            let values = t
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| MemError::Tensor {
                    context: "reading back".into(),
                    source: Box::new(e),
                })?;
            Ok::<_, MemError>((t.dtype(), values))
        })
        .unwrap()
}

fn register_err(path: &Path) -> String {
    let path = path.to_owned();
    let (tx, rx) = mpsc::channel();
    // On its own thread, so that a path opened and waited on fails the test instead of hanging.
    std::thread::spawn(move || {
        let mut session = session();
        let _ = tx.send(session.register("m", &path, None).map(drop));
    });
    let result = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("register blocked on the path");
    result
        .expect_err("registered a path that is no checkpoint file")
        .to_string()
}

#[test]
fn a_fifo_model_is_refused_without_blocking() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    for name in ["f.safetensors", "f.pth"] {
        let fifo = dir.path().join(name);
        assert!(Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let e = register_err(&fifo);
        assert!(
            e.starts_with(&format!("{}: ", fifo.display()))
                && e.ends_with("is not a regular file (a FIFO)"),
            "{e}"
        );
    }
}

#[test]
fn directories_devices_loops_and_missing_files_are_named() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("d.safetensors");
    std::fs::create_dir(&sub).unwrap();
    assert!(register_err(&sub).contains("is a directory"));
    assert!(register_err(Path::new("/dev/null")).contains("(a character device)"));
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let e = register_err(&a);
    assert!(e.contains("too many levels of symbolic links"), "{e}");
    let e = register_err(&dir.path().join("missing.safetensors"));
    assert!(e.ends_with("no such file"), "{e}");
}

#[test]
fn a_safetensors_file_named_ckpt_or_bin_loads_as_safetensors() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = [1.5f32, -2.0, 0.25]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    for name in ["w.ckpt", "w.bin", "w.pt"] {
        let path: PathBuf = dir.path().join(name);
        write_safetensors(
            &path,
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#,
            &data,
        );
        let mut session = session();
        let model = session.register("m", &path, None).unwrap();
        let (dtype, values) = load_values(&mut session, model, "w");
        assert_eq!(dtype, DType::F32, "{name}");
        assert_eq!(values, [1.5, -2.0, 0.25], "{name}");
    }
}

#[test]
fn float8_e5m2_is_held_as_its_exact_f16_values() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e5m2.safetensors");
    // Every byte value: zeros, subnormals, normals, infinities and NaNs of both signs.
    let bytes: Vec<u8> = (0..=255u8).collect();
    write_safetensors(
        &path,
        r#"{"w":{"dtype":"F8_E5M2","shape":[16,16],"data_offsets":[0,256]}}"#,
        &bytes,
    );
    // Known values: 0x3c is 1.0, 0xbc -1.0, 0x01 the smallest subnormal 2^-16, 0x7b 57344.
    let expected: Vec<f16> = bytes
        .iter()
        .map(|&b| f16::from_bits(u16::from(b) << 8))
        .collect();
    assert_eq!(expected[0x3c], f16::ONE);
    assert_eq!(expected[0xbc], f16::NEG_ONE);
    assert_eq!(expected[0x01].to_f64(), 2f64.powi(-16));
    assert_eq!(expected[0x7b].to_f64(), 57344.0);

    // Without a load dtype: f16, bit for bit.
    let mut session = session();
    let model = session.register("m", &path, None).unwrap();
    let held = session
        .phase("load", |p| {
            p.load(model)?;
            let lease = p.lease(model)?;
            let t = lease.get("w")?;
            assert_eq!(t.dtype(), DType::F16);
            assert_eq!(t.dims(), [16, 16]);
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f16>())
                .map_err(|e| MemError::Tensor {
                    context: "reading back".into(),
                    source: Box::new(e),
                })
        })
        .unwrap();
    let held_bits: Vec<u16> = held.iter().map(|v| v.to_bits()).collect();
    let expected_bits: Vec<u16> = expected.iter().map(|v| v.to_bits()).collect();
    assert_eq!(held_bits, expected_bits);
    assert_eq!(session.model_bytes(model), 512);

    // With a load dtype: converted through f16, the same values.
    let mut session = self::session();
    let model = session.register("m", &path, Some(DType::F32)).unwrap();
    assert_eq!(session.model_bytes(model), 1024);
    let (dtype, values) = load_values(&mut session, model, "w");
    assert_eq!(dtype, DType::F32);
    for (i, (got, want)) in values.iter().zip(&expected).enumerate() {
        let want = want.to_f32();
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "byte {i:#04x}: {got} != {want}"
        );
    }
}

#[test]
fn plain_float8_e4m3_stays_float8() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e4m3.safetensors");
    write_safetensors(
        &path,
        r#"{"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}}"#,
        &[0x38, 0xb8, 0x00, 0x40],
    );
    let mut session = session();
    let model = session.register("m", &path, Some(DType::BF16)).unwrap();
    assert_eq!(session.model_bytes(model), 4);
    let (dtype, values) = load_values(&mut session, model, "w");
    assert_eq!(dtype, DType::F8E4M3);
    assert_eq!(values, [1.0, -1.0, 0.0, 2.0]);
}

#[test]
fn a_dtype_that_cannot_reach_the_gpu_is_refused_at_registration() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mx.safetensors");
    write_safetensors(
        &path,
        r#"{"scales":{"dtype":"F8_E8M0","shape":[2],"data_offsets":[0,2]}}"#,
        &[127, 128],
    );
    let e = session()
        .register("m", &path, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'scales'") && e.contains("F8E8M0"), "{e}");
}
