//! `inspect` on real files: safetensors written by the `safetensors` crate or by hand, `.pth`
//! archives written by torch (the fixtures of `tools/fixtures/make_pth_fixtures.py`) or assembled
//! here with the `zip` writer, and one test per kind of damage, each asserting its own error
//! variant and a one-line message that names the file.
//!
//! Where a damaged safetensors file is small enough, the test also checks that the format's
//! reference implementation (`safetensors::SafeTensors::deserialize` on the whole file) rejects
//! it too, so this crate is never more lenient than the library that later loads the file.

use std::collections::HashMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use vpipe_ckpt::{inspect, DType, Family, FileFormat, InspectError, KeyLayout, ModelConfig};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A safetensors file from a header and a data section of `data_len` bytes (value 0xAB).
fn st(header: &str, data_len: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend(std::iter::repeat_n(0xAB, data_len));
    b
}

/// Inspects bytes that must fail; checks what every error must satisfy and returns it.
fn fails(name: &str, bytes: &[u8]) -> InspectError {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, name, bytes);
    let err = inspect(&path).expect_err("damaged file was accepted");
    assert_one_line_naming(&err, &path);
    if name.ends_with(".safetensors") {
        assert!(
            safetensors::SafeTensors::deserialize(bytes).is_err(),
            "the safetensors crate accepts what vpipe-ckpt rejected: {err}"
        );
    }
    err
}

fn assert_one_line_naming(err: &InspectError, path: &Path) {
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "multi-line message: {msg:?}");
    assert!(
        msg.starts_with(&format!("{}: ", path.display())),
        "message does not start with the path: {msg}"
    );
    assert_eq!(err.path(), path);
    assert!(
        std::error::Error::source(err).is_none(),
        "Display must be complete without a source chain"
    );
}

// ------------------------------------------------------------------------------------------------
// safetensors, valid

/// A tiny ComfyUI-style DiT: real key names (prefix `model.diffusion_model.`), dim 128 so that
/// heads = 1, BF16 weights and F32 norms, plus `__metadata__`.
fn tiny_dit_safetensors(path: &Path) -> Vec<(String, DType, Vec<usize>)> {
    let dim = 128;
    let mut specs: Vec<(String, safetensors::Dtype, Vec<usize>)> = Vec::new();
    let mut add = |name: &str, dt, shape: &[usize]| {
        specs.push((format!("model.diffusion_model.{name}"), dt, shape.to_vec()));
    };
    use safetensors::Dtype::{BF16, F32};
    add("patch_embedding.weight", BF16, &[dim, 16, 1, 2, 2]);
    add("text_embedding.0.weight", BF16, &[dim, 8]);
    add("time_embedding.0.weight", BF16, &[dim, 4]);
    add("blocks.0.ffn.0.weight", BF16, &[3, dim]);
    add("blocks.0.norm3.weight", F32, &[dim]);
    add("blocks.1.norm3.weight", F32, &[dim]);
    add("head.head.weight", BF16, &[64, dim]);
    add("head.modulation", F32, &[1, 2, dim]);
    let data: Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> = specs
        .into_iter()
        .map(|(n, dt, s)| {
            let bytes = s.iter().product::<usize>() * dt.bitsize() / 8;
            (n, vec![7u8; bytes], dt, s)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, b, dt, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([
        ("format".to_owned(), "pt".to_owned()),
        ("modelspec.title".to_owned(), "tiny".to_owned()),
    ]);
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
    data.iter()
        .map(|(n, _, dt, s)| {
            (
                n.clone(),
                DType::from_safetensors_name(&format!("{dt:?}")).unwrap(),
                s.clone(),
            )
        })
        .collect()
}

#[test]
fn safetensors_from_the_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    let specs = tiny_dit_safetensors(&path);
    let info = inspect(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    assert_eq!(info.file_size, bytes.len() as u64);
    let FileFormat::Safetensors { header_bytes } = info.format else {
        panic!("{:?}", info.format)
    };
    assert_eq!(
        header_bytes,
        8 + u64::from_le_bytes(bytes[..8].try_into().unwrap())
    );
    assert_eq!(info.metadata.as_ref().unwrap()["format"], "pt");

    // Family, layout, prefix and config from the shapes.
    let d = &info.detection;
    assert_eq!(
        (d.family, d.layout, d.prefix.as_str()),
        (Family::WanDitT2v, KeyLayout::Wan, "model.diffusion_model.")
    );
    let Some(ModelConfig::Dit(c)) = &d.config else {
        panic!("{d:?}")
    };
    assert_eq!(
        (
            c.dim,
            c.num_heads,
            c.ffn_dim,
            c.num_layers,
            c.in_dim,
            c.out_dim,
            c.text_dim,
            c.freq_dim
        ),
        (128, 1, 3, 2, 16, 16, 8, 4)
    );

    // Counts: every tensor, by dtype.
    let n_params: u64 = specs
        .iter()
        .map(|(_, _, s)| s.iter().product::<usize>() as u64)
        .sum();
    assert_eq!(info.tensor_count, 8);
    assert_eq!(info.parameters, n_params);
    let f32_params = 128 + 128 + 2 * 128; // two norm3 weights and head.modulation
    let bf16 = info.dtypes.iter().find(|s| s.dtype == DType::BF16).unwrap();
    let f32 = info.dtypes.iter().find(|s| s.dtype == DType::F32).unwrap();
    assert_eq!((bf16.tensors, f32.tensors), (5, 3));
    assert_eq!(f32.parameters, f32_params);
    assert_eq!(bf16.bytes, 2 * (n_params - f32_params));
    assert_eq!(info.tensor_bytes, bf16.bytes + f32.bytes);
    assert_eq!(
        info.tensor_bytes + header_bytes,
        info.file_size,
        "tensors tile the data section"
    );

    // Byte ranges agree with the reference implementation's view of the whole file.
    let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, dtype, shape) in &specs {
        let t = info.tensor(name).unwrap();
        assert_eq!((&t.dtype, &t.shape), (dtype, shape));
        let theirs = reference.tensor(name).unwrap();
        let start = theirs.data().as_ptr() as usize - bytes.as_ptr() as usize;
        assert_eq!(
            (t.data.start, t.data.end),
            (start as u64, (start + theirs.data().len()) as u64),
            "{name}"
        );
        assert!(t.pth.is_none());
    }

    // Human summary: a few lines naming the family; JSON with the fields the CLI promises.
    let text = info.to_string();
    assert!(text.contains("Wan 2.1 DiT, text-to-video"), "{text}");
    assert!(text.contains("prefix \"model.diffusion_model.\""), "{text}");
    assert!(text.lines().count() <= 10, "{text}");
    let json: serde_json::Value = serde_json::to_value(&info).unwrap();
    assert_eq!(json["detection"]["family"], "wan_dit_t2v");
    assert_eq!(json["detection"]["layout"], "wan");
    assert_eq!(json["detection"]["config"]["kind"], "dit");
    assert_eq!(json["parameters"], n_params);
    assert_eq!(json["tensors"].as_array().unwrap().len(), 8);
    assert_eq!(
        json["tensors"][0]["dtype"]
            .as_str()
            .map(|s| s == "BF16" || s == "F32"),
        Some(true)
    );
}

#[test]
fn header_length_that_looks_like_a_pickle_start() {
    // A 640-byte header: the file starts 80 02 00 …, like a pickle's PROTO 2.
    let mut h = ONE.to_owned();
    h.push_str(&" ".repeat(640 - ONE.len()));
    let b = st(&h, 8);
    assert_eq!(&b[..2], [0x80, 0x02]);
    let dir = tempfile::tempdir().unwrap();
    for name in ["padded.safetensors", "padded.pth"] {
        let info = inspect(&write(&dir, name, &b)).unwrap();
        assert_eq!(
            info.format,
            FileFormat::Safetensors { header_bytes: 648 },
            "{name}"
        );
    }
    assert!(safetensors::SafeTensors::deserialize(&b).is_ok());
}

#[test]
fn content_decides_the_format_not_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let st_path = dir.path().join("a.safetensors");
    tiny_dit_safetensors(&st_path);
    let as_bin = dir.path().join("weights.bin");
    std::fs::copy(&st_path, &as_bin).unwrap();
    let as_dat = dir.path().join("weights.dat");
    std::fs::copy(&st_path, &as_dat).unwrap();
    for p in [&as_bin, &as_dat] {
        assert!(
            matches!(inspect(p).unwrap().format, FileFormat::Safetensors { .. }),
            "{}",
            p.display()
        );
    }
    let pth_as_st = dir.path().join("really_a_pth.safetensors");
    std::fs::copy(fixture("tiny_wan_dit_t2v.pth"), &pth_as_st).unwrap();
    assert!(matches!(
        inspect(&pth_as_st).unwrap().format,
        FileFormat::Pth { .. }
    ));
}

#[test]
fn empty_safetensors_is_fine() {
    // `{}`: no tensors. Valid for the format; nothing to detect.
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "none.safetensors", &st("{}", 0));
    let info = inspect(&p).unwrap();
    assert_eq!(
        (info.tensor_count, info.parameters, info.detection.family),
        (0, 0, Family::Unknown)
    );
    assert!(safetensors::SafeTensors::deserialize(&st("{}", 0)).is_ok());
}

// ------------------------------------------------------------------------------------------------
// safetensors, damaged: one test per kind

const ONE: &str = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;

#[test]
fn empty_file() {
    assert!(matches!(
        fails("empty.safetensors", b""),
        InspectError::Empty { .. }
    ));
    // Whatever the extension.
    assert!(matches!(
        fails("empty.pth", b""),
        InspectError::Empty { .. }
    ));
}

#[test]
fn shorter_than_the_length_prefix() {
    let e = fails("short.safetensors", &[1, 0, 0, 0, 0]);
    assert!(
        matches!(e, InspectError::Truncated { file_size: 5, .. }),
        "{e}"
    );
}

#[test]
fn header_length_larger_than_the_file() {
    let mut b = 9_999_999u64.to_le_bytes().to_vec();
    b.extend_from_slice(&[b'{'; 1226]);
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "model.safetensors", &b);
    let e = inspect(&p).unwrap_err();
    assert!(matches!(
        e,
        InspectError::HeaderPastEnd {
            header_len: 9_999_999,
            file_size: 1234,
            ..
        }
    ));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: header length 9999999 is larger than the file (1234 bytes)",
            p.display()
        )
    );
    fails("model.safetensors", &b);
}

#[test]
fn header_cut_off() {
    // The header length is 54 and the file 8 + 50 bytes: the JSON ends early.
    let full = st(ONE, 8);
    assert_eq!(ONE.len(), 54);
    let e = fails("cut.safetensors", &full[..58]);
    assert!(
        matches!(
            e,
            InspectError::HeaderTruncated {
                header_len: 54,
                file_size: 58,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn header_over_the_format_limit() {
    // A sparse 150 MB file whose header claims 120 MB: within the file, over the 100 MB limit.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.safetensors");
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&120_000_000u64.to_le_bytes()).unwrap();
    f.set_len(150_000_000).unwrap();
    drop(f);
    let e = inspect(&p).unwrap_err();
    assert_one_line_naming(&e, &p);
    assert!(
        matches!(
            e,
            InspectError::HeaderTooLarge {
                header_len: 120_000_000,
                limit: 100_000_000,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn header_not_utf8() {
    let e = fails(
        "latin1.safetensors",
        &st("{\"\u{e9}\":1}", 0)
            .iter()
            .map(|&b| if b == 0xC3 { 0xE9 } else { b })
            .collect::<Vec<_>>(),
    );
    assert!(
        matches!(e, InspectError::HeaderNotUtf8 { valid_up_to: 2, .. }),
        "{e}"
    );
}

#[test]
fn header_not_json() {
    let e = fails("garbage.safetensors", &st("{\"a\": nope}", 0));
    assert!(matches!(e, InspectError::HeaderNotJson { .. }), "{e}");
    assert!(e.to_string().contains("line 1 column"), "{e}");
}

#[test]
fn header_json_but_not_a_safetensors_header() {
    let e = fails("array.safetensors", &st("[1, 2]", 0));
    assert!(matches!(e, InspectError::HeaderInvalid { .. }), "{e}");
    let e = fails(
        "no_offsets.safetensors",
        &st(r#"{"a":{"dtype":"F32","shape":[2]}}"#, 8),
    );
    assert!(
        matches!(e, InspectError::HeaderInvalid { ref reason, .. } if reason.contains("data_offsets")),
        "{e}"
    );
}

#[test]
fn unknown_dtype() {
    let e = fails(
        "dtype.safetensors",
        &st(
            r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
            16,
        ),
    );
    assert!(
        matches!(e, InspectError::UnknownDtype { ref tensor, ref dtype, .. } if tensor == "a" && dtype == "F128"),
        "{e}"
    );
}

#[test]
fn offsets_reversed() {
    let e = fails(
        "rev.safetensors",
        &st(
            r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}}"#,
            8,
        ),
    );
    assert!(
        matches!(
            e,
            InspectError::OffsetsReversed {
                begin: 8,
                end: 0,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn offsets_past_the_end_of_the_file() {
    // A download cut inside the tensor data: the header is intact.
    let full = st(ONE, 8);
    let e = fails("partial.safetensors", &full[..full.len() - 3]);
    assert!(
        matches!(
            e,
            InspectError::OffsetsOutOfRange {
                begin: 0,
                end: 8,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("past the end of the file"), "{e}");
}

#[test]
fn overlapping_tensors() {
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let e = fails("overlap.safetensors", &st(h, 12));
    assert!(
        matches!(e, InspectError::Overlap { ref first, ref second, second_begin: 4, .. } if first == "a" && second == "b"),
        "{e}"
    );
}

#[test]
fn offsets_inconsistent_with_shape_and_dtype() {
    // BF16 [2, 3] needs 12 bytes; the offsets give 10.
    let e = fails(
        "size.safetensors",
        &st(
            r#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,10]}}"#,
            10,
        ),
    );
    assert!(
        matches!(
            e,
            InspectError::SizeMismatch {
                expected: Some(12),
                actual: 10,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bytes_outside_every_tensor() {
    // A hole between tensors, and bytes after the last one.
    let h = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#;
    let e = fails("hole.safetensors", &st(h, 6));
    assert!(matches!(e, InspectError::Gap { at: 2, len: 2, .. }), "{e}");
    let e = fails("trailing.safetensors", &st(ONE, 11));
    assert!(matches!(e, InspectError::Gap { at: 8, len: 3, .. }), "{e}");
}

#[test]
fn unknown_extension_and_content() {
    let e = fails("notes.txt", b"just some text, not a model\n");
    assert!(
        matches!(e, InspectError::UnknownFormat { ref start, .. } if start.starts_with("6a 75 73 74")),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("neither a safetensors header nor a PyTorch zip archive"),
        "{e}"
    );
}

// ------------------------------------------------------------------------------------------------
// .pth written by torch

fn f32_at(bytes: &[u8], i: usize) -> f32 {
    f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap())
}

fn bf16_at(bytes: &[u8], i: usize) -> f32 {
    let bits = u16::from_le_bytes(bytes[2 * i..2 * i + 2].try_into().unwrap());
    f32::from_bits(u32::from(bits) << 16)
}

#[test]
fn torch_written_tiny_wan_dit() {
    // tools/fixtures/make_pth_fixtures.py: dim 8, ffn 16, 1 block, text_dim 32, freq_dim 16;
    // globals F32, block BF16; every tensor holds arange(numel) % 251.
    let path = fixture("tiny_wan_dit_t2v.pth");
    let info = inspect(&path).unwrap();
    let file = std::fs::read(&path).unwrap();
    assert_eq!(info.file_size, file.len() as u64);
    assert_eq!(
        info.format,
        FileFormat::Pth {
            pickle_entry: "tiny_wan_dit_t2v/data.pkl".into()
        }
    );
    assert_eq!(info.tensor_count, 42);

    let d = &info.detection;
    assert_eq!(
        (d.family, d.layout, d.prefix.as_str()),
        (Family::WanDitT2v, KeyLayout::Wan, "")
    );
    let Some(ModelConfig::Dit(c)) = &d.config else {
        panic!("{d:?}")
    };
    assert_eq!(
        (
            c.dim,
            c.ffn_dim,
            c.num_layers,
            c.in_dim,
            c.out_dim,
            c.text_dim,
            c.freq_dim,
            c.patch_size
        ),
        (8, 16, 1, 16, 16, 32, 16, [1, 2, 2])
    );
    assert!(c.qk_norm && c.cross_attn_norm && !c.image_conditioning);
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("not a multiple of the head size")),
        "{:?}",
        d.notes
    );

    let bf16 = info.dtypes.iter().find(|s| s.dtype == DType::BF16).unwrap();
    let f32 = info.dtypes.iter().find(|s| s.dtype == DType::F32).unwrap();
    assert_eq!((bf16.tensors, f32.tensors, info.dtypes.len()), (27, 15, 2));
    // F32 globals: patch 8·16·4 + 8, text 8·32 + 8 + 64 + 8, time 8·16 + 8 + 64 + 8,
    // time_projection 48·8 + 48, head 64·8 + 64 + 16.
    assert_eq!(f32.parameters, 520 + 336 + 208 + 432 + 592);
    assert_eq!(f32.bytes, 4 * f32.parameters);
    assert_eq!(bf16.bytes, 2 * bf16.parameters);

    // Every reported range holds exactly that tensor's values, and ranges do not overlap.
    let mut ranges = Vec::new();
    for t in &info.tensors {
        let view = t.pth.as_ref().unwrap();
        assert!(view.contiguous && view.storage_offset == 0, "{}", t.name);
        assert!(view.storage_entry.starts_with("tiny_wan_dit_t2v/data/"));
        assert_eq!(t.data.len(), t.nbytes(), "{}", t.name);
        let bytes = &file[t.data.start as usize..t.data.end as usize];
        for i in 0..t.numel() as usize {
            let v = match t.dtype {
                DType::F32 => f32_at(bytes, i),
                DType::BF16 => bf16_at(bytes, i),
                other => panic!("unexpected {other}"),
            };
            assert_eq!(v, (i % 251) as f32, "{} element {i}", t.name);
        }
        ranges.push((t.data.start, t.data.end));
    }
    ranges.sort();
    assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));

    let text = info.to_string();
    assert!(
        text.contains("Wan 2.1 DiT, text-to-video") && text.contains("PyTorch zip archive"),
        "{text}"
    );
}

#[test]
fn torch_written_views_fp8_parameters_and_nested_dicts() {
    let path = fixture("tiny_views.pth");
    let info = inspect(&path).unwrap();
    let file = std::fs::read(&path).unwrap();
    let names: Vec<&str> = info.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["w", "slice", "t", "f8", "p", "nested.x"],
        "`epoch` (an int) is skipped"
    );
    let get = |n: &str| info.tensor(n).unwrap();
    let bytes = |n: &str| {
        let t = get(n);
        &file[t.data.start as usize..t.data.end as usize]
    };

    // `base[4:10].view(2, 3)`: offset 4 into the shared 24-element storage.
    let s = get("slice");
    let v = s.pth.as_ref().unwrap();
    assert_eq!(
        (s.dtype, s.shape.as_slice(), v.storage_offset, v.contiguous),
        (DType::F32, &[2, 3][..], 4, true)
    );
    assert_eq!(
        (0..6)
            .map(|i| f32_at(bytes("slice"), i))
            .collect::<Vec<_>>(),
        [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    );

    // `base.view(4, 6).t()`: same storage, strides (1, 6), spans all 24 elements.
    let t = get("t");
    let tv = t.pth.as_ref().unwrap();
    assert_eq!(
        (t.shape.as_slice(), tv.stride.as_slice(), tv.contiguous),
        (&[6, 4][..], &[1, 6][..], false)
    );
    assert_eq!(tv.storage_entry, v.storage_entry);
    assert_eq!(t.data.len(), 96);
    assert_eq!(f32_at(bytes("t"), 23), 23.0);

    // float8_e4m3fn via `_rebuild_tensor_v3` + UntypedStorage: 0, 1, 2, 3 encode as 00 38 40 44.
    assert_eq!(get("f8").dtype, DType::F8_E4M3);
    assert_eq!(bytes("f8"), [0x00, 0x38, 0x40, 0x44]);

    // nn.Parameter and a nested dict.
    assert_eq!(
        (
            get("p").dtype,
            (0..3).map(|i| f32_at(bytes("p"), i)).sum::<f32>()
        ),
        (DType::F32, 3.0)
    );
    assert_eq!(
        (get("nested.x").dtype, bytes("nested.x")),
        (DType::I64, &[0u8; 16][..])
    );
    assert_eq!(get("w").dtype, DType::BF16);
}

#[test]
fn legacy_pth_is_reported_as_unsupported() {
    let path = fixture("tiny_legacy.pth");
    let e = inspect(&path).unwrap_err();
    assert_one_line_naming(&e, &path);
    assert!(matches!(e, InspectError::LegacyPth { .. }), "{e}");
    assert!(e.to_string().contains("unsupported legacy"), "{e}");
}

// ------------------------------------------------------------------------------------------------
// .pth, damaged

/// The exact `data.pkl` of `torch.save({"w": torch.zeros(2, 3)}, f)` (torch 2.15, protocol 2).
fn torch_plain_pickle() -> Vec<u8> {
    let mut p =
        b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02".to_vec();
    p.extend_from_slice(
        b"((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05",
    );
    p.extend_from_slice(
        b"X\x03\x00\x00\x00cpuq\x06K\x06tq\x07QK\x00K\x02K\x03\x86q\x08K\x03K\x01\x86q\t\x89",
    );
    p.extend_from_slice(b"ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rs.");
    p
}

/// A zip archive with stored entries, as torch.save lays them out.
fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    zip_with(entries, false)
}

/// The same, optionally with ZIP64 headers on every entry (what torch writes for files > 4 GiB).
fn zip_with(entries: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(zip64);
    for (name, data) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn archive_with(pickle: &[u8], storage: &[u8]) -> Vec<u8> {
    zip_of(&[
        ("archive/data.pkl", pickle),
        ("archive/byteorder", b"little"),
        ("archive/data/0", storage),
    ])
}

#[test]
fn hand_built_archive_is_read() {
    // The control for the damaged archives below: the same construction, undamaged.
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "ok.pth",
        &archive_with(&torch_plain_pickle(), &[0; 24]),
    );
    let info = inspect(&p).unwrap();
    assert_eq!(info.tensors.len(), 1);
    assert_eq!(
        (info.tensors[0].shape.as_slice(), info.tensors[0].data.len()),
        (&[2, 3][..], 24)
    );
    // ZIP64 headers: the reported range must still point at the storage bytes.
    let storage: Vec<u8> = (0u8..24).collect();
    let a = zip_with(
        &[
            ("archive/data.pkl", &torch_plain_pickle()),
            ("archive/data/0", &storage),
        ],
        true,
    );
    let p64 = write(&dir, "zip64.pth", &a);
    let t = inspect(&p64).unwrap().tensors.remove(0);
    assert_eq!(&a[t.data.start as usize..t.data.end as usize], &storage[..]);
}

#[test]
fn zip_truncated() {
    let whole = std::fs::read(fixture("tiny_wan_dit_t2v.pth")).unwrap();
    let e = fails("half.pth", &whole[..whole.len() / 2]);
    assert!(matches!(e, InspectError::ZipCorrupt { .. }), "{e}");
}

#[test]
fn zip_garbage_and_non_zip_pth() {
    let e = fails("junk.pth", b"PK\x03\x04 this is not really a zip archive");
    assert!(matches!(e, InspectError::ZipCorrupt { .. }), "{e}");
    let e = fails("text.pth", b"not a checkpoint at all");
    assert!(matches!(e, InspectError::ZipCorrupt { .. }), "{e}");
}

#[test]
fn zip_without_data_pkl() {
    let e = fails(
        "nopkl.pth",
        &zip_of(&[("archive/version", b"3\n"), ("archive/data/0", &[0; 4])]),
    );
    assert!(
        matches!(e, InspectError::NoDataPkl { entries: 2, .. }),
        "{e}"
    );
}

#[test]
fn compressed_pickle_entry() {
    // torch.save never compresses; mark data.pkl as Deflated in both headers.
    let mut a = archive_with(&torch_plain_pickle(), &[0; 24]);
    assert_eq!(&a[..4], b"PK\x03\x04");
    a[8] = 8;
    let cd = a.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    a[cd + 10] = 8;
    let e = fails("deflated.pth", &a);
    assert!(
        matches!(e, InspectError::EntryNotStored { ref entry, ref how, .. } if entry == "archive/data.pkl" && how.contains("Deflated")),
        "{e}"
    );
}

#[test]
fn pickle_truncated() {
    let p = torch_plain_pickle();
    let e = fails("trunc.pth", &archive_with(&p[..p.len() - 10], &[0; 24]));
    assert!(
        matches!(e, InspectError::PickleTruncated { ref entry, .. } if entry == "archive/data.pkl"),
        "{e}"
    );
}

#[test]
fn pickle_with_an_unsupported_opcode() {
    // INST (protocol 0) would construct an arbitrary class instance.
    let e = fails(
        "inst.pth",
        &archive_with(b"\x80\x02ibuiltins\nobject\n.", &[]),
    );
    assert!(
        matches!(
            e,
            InspectError::PickleOpcode {
                opcode: b'i',
                name: "INST",
                offset: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn pickle_with_a_disallowed_global() {
    // The classic payload: os.system("echo pwned"). Refused when named; nothing runs.
    let payload = b"\x80\x02cos\nsystem\nX\x0a\x00\x00\x00echo pwnedq\x00\x85R.";
    let e = fails("evil.pth", &archive_with(payload, &[]));
    assert!(
        matches!(e, InspectError::PickleGlobal { ref module, ref name, .. } if module == "os" && name == "system"),
        "{e}"
    );
    assert!(e.to_string().contains("os.system"), "{e}");
}

#[test]
fn pickle_not_a_state_dict() {
    let e = fails("int.pth", &archive_with(b"\x80\x02K\x07.", &[]));
    assert!(
        matches!(e, InspectError::NotStateDict { ref found, .. } if found == "an int"),
        "{e}"
    );
}

#[test]
fn storage_missing_from_the_archive() {
    let e = fails(
        "nostorage.pth",
        &zip_of(&[("archive/data.pkl", &torch_plain_pickle())]),
    );
    assert!(
        matches!(e, InspectError::MissingStorage { ref entry, .. } if entry == "archive/data/0"),
        "{e}"
    );
}

#[test]
fn storage_size_disagrees_with_the_pickle() {
    // 6 F32 elements need 24 bytes; the entry has 20.
    let e = fails(
        "short_storage.pth",
        &archive_with(&torch_plain_pickle(), &[0; 20]),
    );
    assert!(
        matches!(
            e,
            InspectError::StorageSizeMismatch {
                numel: 6,
                expected: Some(24),
                actual: 20,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn view_outside_its_storage() {
    // Same pickle with size (4, 3) over the 6-element storage.
    let p = torch_plain_pickle();
    let at = p.windows(4).position(|w| w == b"K\x02K\x03").unwrap();
    let mut p2 = p.clone();
    p2[at + 1] = 4;
    let e = fails("view.pth", &archive_with(&p2, &[0; 24]));
    assert!(
        matches!(
            e,
            InspectError::ViewOutOfRange {
                needed: 12,
                available: 6,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn big_endian_archive() {
    let a = zip_of(&[
        ("archive/data.pkl", &torch_plain_pickle()),
        ("archive/byteorder", b"big"),
        ("archive/data/0", &[0; 24]),
    ]);
    let e = fails("be.pth", &a);
    assert!(matches!(e, InspectError::BigEndian { .. }), "{e}");
}

// ------------------------------------------------------------------------------------------------
// No input panics

/// Every prefix of a file, and each byte replaced by a few values: `inspect` returns (Ok or a
/// one-line error naming the file) and never panics.
fn no_panics(name: &str, bytes: &[u8], step: usize, flip_range: std::ops::Range<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let check = |b: &[u8]| {
        std::fs::write(&path, b).unwrap();
        if let Err(e) = inspect(&path) {
            assert_one_line_naming(&e, &path);
        }
    };
    for cut in (0..bytes.len()).step_by(step) {
        check(&bytes[..cut]);
    }
    let mut b = bytes.to_vec();
    for i in flip_range.step_by(step.div_ceil(4).max(1)) {
        let orig = b[i];
        for v in [0x00, 0xff, orig ^ 0x01, b'{', b'"'] {
            b[i] = v;
            check(&b);
        }
        b[i] = orig;
    }
}

#[test]
fn damaged_safetensors_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    tiny_dit_safetensors(&p);
    let bytes = std::fs::read(&p).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    no_panics("t.safetensors", &bytes, 7, 0..header_end);
}

#[test]
fn damaged_pth_never_panics() {
    let bytes = std::fs::read(fixture("tiny_views.pth")).unwrap();
    // Flip bytes in the zip directory at the end (local headers and data follow from truncation).
    let dir_start = bytes.len() - 1100;
    no_panics("v.pth", &bytes, 13, dir_start..bytes.len());
}
