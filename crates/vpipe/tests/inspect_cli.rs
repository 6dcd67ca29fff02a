//! `vpipe inspect [--json] FILE`, run as a user would: the built binary on real files.
//!
//! Contract: the summary on stdout names the family; `--json` prints one JSON document with the
//! family, layout and parameter count; a damaged or missing file gives exit code 2 and one line on
//! stderr, `vpipe: <file>: <problem>`, never a panic.
//!
//! Files: a tiny DiT-shaped safetensors file written here with the `safetensors` crate (real
//! ComfyUI key names, 8 tensors, 18,816 parameters), and the torch-written fixtures of
//! `tools/fixtures/make_pth_fixtures.py` in `crates/vpipe-ckpt/tests/fixtures/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vpipe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vpipe"))
        .args(args)
        .output()
        .expect("cannot run vpipe")
}

fn ckpt_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../vpipe-ckpt/tests/fixtures")
        .join(name)
}

/// ComfyUI-style Wan DiT key names with small shapes (dim 128 so that heads = dim / 128 = 1).
fn tiny_dit(dir: &Path) -> (PathBuf, u64) {
    use safetensors::Dtype::{BF16, F32};
    let dim = 128;
    let specs: Vec<(&str, safetensors::Dtype, Vec<usize>)> = vec![
        ("patch_embedding.weight", BF16, vec![dim, 16, 1, 2, 2]),
        ("text_embedding.0.weight", BF16, vec![dim, 8]),
        ("time_embedding.0.weight", BF16, vec![dim, 4]),
        ("blocks.0.ffn.0.weight", BF16, vec![3, dim]),
        ("blocks.0.norm3.weight", F32, vec![dim]),
        ("blocks.1.norm3.weight", F32, vec![dim]),
        ("head.head.weight", BF16, vec![64, dim]),
        ("head.modulation", F32, vec![1, 2, dim]),
    ];
    let data: Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> = specs
        .into_iter()
        .map(|(n, dt, s)| {
            let bytes = s.iter().product::<usize>() * dt.bitsize() / 8;
            (
                format!("model.diffusion_model.{n}"),
                vec![0u8; bytes],
                dt,
                s,
            )
        })
        .collect();
    let params = data
        .iter()
        .map(|(_, _, _, s)| s.iter().product::<usize>() as u64)
        .sum();
    let views = data.iter().map(|(n, b, dt, s)| {
        (
            n.clone(),
            safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
        )
    });
    let path = dir.join("wan_tiny.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    (path, params)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn summary_names_the_family() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny_dit(dir.path());
    let o = vpipe(&["inspect", path.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status,
        stderr(&o)
    );
    let out = stdout(&o);
    assert!(out.contains("Wan 2.1 DiT, text-to-video"), "{out}");
    assert!(out.contains("model.diffusion_model."), "{out}");
    assert!(
        out.lines().count() <= 12,
        "a summary, not the tensor list:\n{out}"
    );

    let o = vpipe(&[
        "inspect",
        ckpt_fixture("tiny_wan_dit_t2v.pth").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert!(
        stdout(&o).contains("Wan 2.1 DiT, text-to-video"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_wan22_expert_is_named_from_its_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny_dit(dir.path());
    for (name, role) in [
        ("wan2.2_t2v_high_noise_14B_fp16.safetensors", "high-noise"),
        ("wan2.2_t2v_low_noise_14B_fp16.safetensors", "low-noise"),
    ] {
        let expert = dir.path().join(name);
        std::fs::copy(&path, &expert).unwrap();
        let o = vpipe(&["inspect", expert.to_str().unwrap()]);
        assert!(o.status.success(), "stderr: {}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains("Wan 2.1 DiT, text-to-video"), "{out}");
        assert!(
            out.contains(&format!("Wan 2.2 A14B {role} expert")),
            "{out}"
        );
    }
    let o = vpipe(&["inspect", path.to_str().unwrap()]);
    assert!(!stdout(&o).contains("A14B"), "{}", stdout(&o));
}

#[test]
fn json_has_family_layout_and_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let (path, params) = tiny_dit(dir.path());
    assert_eq!(params, 8192 + 1024 + 512 + 384 + 256 + 8192 + 256);
    let o = vpipe(&["inspect", "--json", path.to_str().unwrap()]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is not JSON");
    assert_eq!(v["detection"]["family"], "wan_dit_t2v");
    assert_eq!(v["detection"]["layout"], "wan");
    assert_eq!(v["detection"]["prefix"], "model.diffusion_model.");
    assert_eq!(v["detection"]["config"]["dim"], 128);
    assert_eq!(v["parameters"], params);
    assert_eq!(v["tensor_count"], 8);
    assert_eq!(v["tensors"].as_array().map(Vec::len), Some(8));

    // The torch-written fixture: 42 tensors, F32 globals and BF16 block.
    let o = vpipe(&[
        "inspect",
        "--json",
        ckpt_fixture("tiny_wan_dit_t2v.pth").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            v["detection"]["family"].as_str(),
            v["detection"]["layout"].as_str()
        ),
        (Some("wan_dit_t2v"), Some("wan"))
    );
    assert_eq!(v["format"]["kind"], "pth");
    assert_eq!(v["tensor_count"], 42);
    assert_eq!(v["dtypes"].as_array().map(Vec::len), Some(2));
}

/// A failing `vpipe inspect`: exit 2, exactly one stderr line that names the file, no panic.
fn assert_clean_failure(path: &Path, expect: &str) {
    for json in [false, true] {
        let mut args = vec!["inspect"];
        if json {
            args.push("--json");
        }
        args.push(path.to_str().unwrap());
        let o = vpipe(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "stderr: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
        let line = err.lines().next().unwrap();
        assert!(line.starts_with("vpipe: "), "{line}");
        assert!(
            line.contains(path.file_name().unwrap().to_str().unwrap()),
            "does not name the file: {line}"
        );
        assert!(line.contains(expect), "expected {expect:?} in {line}");
        assert!(o.stdout.is_empty(), "stdout: {}", stdout(&o));
    }
}

#[test]
fn damaged_files_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut past_end = 9_999_999u64.to_le_bytes().to_vec();
    past_end.extend_from_slice(b"{\"a\":");
    assert_clean_failure(
        &write("model.safetensors", &past_end),
        "header length 9999999 is larger than the file (13 bytes)",
    );
    assert_clean_failure(&write("empty.safetensors", b""), "empty");
    assert_clean_failure(
        &write("notes.txt", b"hello"),
        "neither a safetensors header nor a PyTorch zip archive",
    );
    assert_clean_failure(&ckpt_fixture("tiny_legacy.pth"), "unsupported legacy");
    let whole = std::fs::read(ckpt_fixture("tiny_wan_dit_t2v.pth")).unwrap();
    assert_clean_failure(
        &write("half.pth", &whole[..whole.len() / 2]),
        "corrupt zip archive",
    );
}

#[test]
fn missing_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    assert_clean_failure(&dir.path().join("nope.safetensors"), "no such file");
}
