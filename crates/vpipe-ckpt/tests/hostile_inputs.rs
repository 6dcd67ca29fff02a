//! Hostile paths and headers: only regular files are opened, the container is told by content,
//! and numbers from a file never overflow or size an allocation unchecked.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use vpipe_ckpt::{
    check_regular_file, container_of, detect, inspect, open_regular, Container, DType,
    InspectError, SpecialFile, TensorMeta,
};

/// A safetensors file: length prefix, JSON header, data.
fn st(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn small_safetensors() -> Vec<u8> {
    st(
        r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    )
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo failed");
}

/// Runs `f` on another thread and fails the test if it has not returned after 10 s (a FIFO
/// opened for reading would block forever).
fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("blocked: the path was opened and waited on")
}

fn message(e: &InspectError) -> String {
    let m = e.to_string();
    assert!(
        m.starts_with(&format!("{}: ", e.path().display())),
        "does not name the file: {m}"
    );
    m
}

#[test]
fn a_fifo_is_refused_without_being_opened() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("f.safetensors");
    mkfifo(&fifo);
    let path = fifo.clone();
    let (inspected, sniffed, opened) = within_seconds(move || {
        (
            inspect(&path).unwrap_err(),
            container_of(&path).unwrap_err(),
            open_regular(&path).unwrap_err(),
        )
    });
    for e in [&inspected, &sniffed, &opened] {
        assert!(
            matches!(
                e,
                InspectError::NotRegularFile {
                    kind: SpecialFile::Fifo,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            message(e).ends_with("is not a regular file (a FIFO)"),
            "{e}"
        );
        assert_eq!(e.path(), fifo);
    }
}

#[test]
fn a_character_device_is_refused() {
    let e = within_seconds(|| inspect(Path::new("/dev/zero")).unwrap_err());
    assert!(
        matches!(
            e,
            InspectError::NotRegularFile {
                kind: SpecialFile::CharDevice,
                ..
            }
        ),
        "{e}"
    );
    assert!(message(&e).contains("(a character device)"), "{e}");
}

#[test]
fn a_directory_is_named_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("model.safetensors");
    std::fs::create_dir(&sub).unwrap();
    let e = inspect(&sub).unwrap_err();
    assert!(matches!(e, InspectError::IsDirectory { .. }), "{e}");
    assert!(message(&e).contains("is a directory"), "{e}");
    assert!(matches!(
        check_regular_file(&sub),
        Err(InspectError::IsDirectory { .. })
    ));
}

#[test]
fn a_symlink_loop_is_not_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    symlink(&b, &a).unwrap();
    symlink(&a, &b).unwrap();
    let e = inspect(&a).unwrap_err();
    assert!(matches!(e, InspectError::SymlinkLoop { .. }), "{e}");
    assert!(
        message(&e).contains("too many levels of symbolic links"),
        "{e}"
    );
    assert!(!e.to_string().contains("no such file"), "{e}");
}

#[test]
fn only_a_missing_file_is_no_such_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let e = inspect(&missing).unwrap_err();
    assert!(matches!(e, InspectError::NotFound { .. }), "{e}");
    assert!(message(&e).ends_with("no such file"), "{e}");
    assert_eq!(e.detail(), "no such file");
}

#[test]
fn a_symlink_to_a_regular_file_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.safetensors");
    std::fs::write(&real, small_safetensors()).unwrap();
    let link = dir.path().join("link.safetensors");
    symlink(&real, &link).unwrap();
    assert_eq!(inspect(&link).unwrap().tensors.len(), 1);
}

#[test]
fn the_container_is_told_by_content_not_extension() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["w.ckpt", "w.bin", "w.pth", "w.safetensors", "w"] {
        let p = dir.path().join(name);
        std::fs::write(&p, small_safetensors()).unwrap();
        assert_eq!(container_of(&p).unwrap(), Container::Safetensors, "{name}");
        assert_eq!(inspect(&p).unwrap().tensors.len(), 1, "{name}");
    }
    let pth: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_views.pth");
    let renamed = dir.path().join("views.safetensors");
    std::fs::copy(&pth, &renamed).unwrap();
    assert_eq!(container_of(&renamed).unwrap(), Container::Pth);
    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        container_of(&empty),
        Err(InspectError::Empty { .. })
    ));
}

#[test]
fn float8_e5m2_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e5m2.safetensors");
    std::fs::write(
        &p,
        st(
            r#"{"w":{"dtype":"F8_E5M2","shape":[2,2],"data_offsets":[0,4]}}"#,
            &[0x3c, 0xbc, 0x00, 0x7c],
        ),
    )
    .unwrap();
    let info = inspect(&p).unwrap();
    assert_eq!(info.tensors[0].dtype, DType::F8_E5M2);
    assert_eq!(info.tensors[0].nbytes(), 4);
    // candle has no e5m2 type: loaders convert it (exactly, to f16).
    assert_eq!(DType::F8_E5M2.to_candle(), None);
}

#[test]
fn a_huge_header_length_is_refused_before_any_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h.safetensors");
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&p, bytes).unwrap();
    let e = inspect(&p).unwrap_err();
    assert!(matches!(e, InspectError::HeaderPastEnd { .. }), "{e}");
}

#[test]
fn a_shape_of_too_many_dimensions_is_refused_naming_the_tensor() {
    let dims = vec!["1"; 65].join(",");
    let header = format!(r#"{{"deep":{{"dtype":"U8","shape":[{dims}],"data_offsets":[0,1]}}}}"#);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("deep.safetensors");
    std::fs::write(&p, st(&header, &[0])).unwrap();
    let e = inspect(&p).unwrap_err();
    assert!(matches!(e, InspectError::HeaderInvalid { .. }), "{e}");
    let m = message(&e);
    assert!(m.contains("\"deep\"") && m.contains("more than 64"), "{m}");
}

#[test]
fn offsets_at_the_top_of_u64_do_not_overflow() {
    let header = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}}"#;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.safetensors");
    std::fs::write(&p, st(header, &[0])).unwrap();
    let e = inspect(&p).unwrap_err();
    assert!(matches!(e, InspectError::OffsetsOutOfRange { .. }), "{e}");
}

#[test]
fn a_bad_entry_is_named_in_the_error() {
    let header = r#"{"ok":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"bad":{"dtype":"U8","shape":[-1],"data_offsets":[1,2]}}"#;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.safetensors");
    std::fs::write(&p, st(header, &[0, 0])).unwrap();
    let e = inspect(&p).unwrap_err();
    assert!(matches!(e, InspectError::HeaderInvalid { .. }), "{e}");
    assert!(message(&e).contains("tensor \"bad\""), "{e}");
}

#[test]
fn detection_on_absurd_shapes_does_not_overflow() {
    // A Wan-looking DiT whose patch volume overflows usize, and a CLIP position table whose
    // grid would overflow: detection reports what it can and never panics.
    let huge = usize::MAX / 2;
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("patch_embedding.weight", vec![128, 16, huge, huge, huge]),
        ("head.head.weight", vec![huge, 128]),
        ("text_embedding.0.weight", vec![128, 4096]),
        ("time_embedding.0.weight", vec![128, 256]),
        ("blocks.0.ffn.0.weight", vec![512, 128]),
        ("blocks.0.self_attn.q.weight", vec![128, 128]),
    ];
    let _ = detect(shapes.iter().map(|(name, shape)| TensorMeta {
        name,
        shape,
        dtype: DType::F16,
    }));
    let clip: Vec<(&str, Vec<usize>)> = vec![
        ("visual.conv1.weight", vec![1024, 3, huge, huge]),
        ("visual.positional_embedding", vec![usize::MAX, 1024]),
        ("visual.class_embedding", vec![1024]),
        (
            "visual.transformer.resblocks.0.attn.in_proj_weight",
            vec![3072, 1024],
        ),
    ];
    let _ = detect(clip.iter().map(|(name, shape)| TensorMeta {
        name,
        shape,
        dtype: DType::F16,
    }));
}
