//! Bad, careless and hostile input through the `vpipe` binary: malformed checkpoints, videos,
//! images, TOML files and flags. The corpus is generated here from the demo's model files.
//!
//! Every case runs the binary under a virtual-memory limit (`ulimit -v`), so that an attempted
//! huge allocation aborts the child instead of passing unnoticed, and under a time limit, so
//! that a hang (a FIFO opened for reading) fails instead of blocking CI. Each case asserts the
//! documented exit code, a message naming the culprit, no panic or abort, and no file left at or
//! next to `--out` / `--report`.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

mod common;

/// Virtual memory a case may reserve, in KiB: ample for the tiny model (thread stacks and
/// allocator arenas included), far below the gigabytes a size taken on trust would ask for.
const MEMORY_LIMIT_KIB: u64 = 8 << 20;
/// Wall time a case may take: every bad input is refused long before this.
const TIME_LIMIT: Duration = Duration::from_secs(30);

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

/// Runs `vpipe args` in `cwd` under the memory and time limits.
fn run_limited(cwd: &Path, args: &[&str]) -> Outcome {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {MEMORY_LIMIT_KIB}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_vpipe"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome {
                code: None,
                stderr: format!("still running after {TIME_LIMIT:?}: a hang"),
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code(),
        stderr: reader.join().unwrap(),
    }
}

/// The files under `dir`, recursively, relative to it.
fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path.clone());
            }
            found.insert(path.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    found
}

/// The demo's model files and a work folder, shared by every case.
struct Bench {
    _root: tempfile::TempDir,
    weights: PathBuf,
    work: PathBuf,
    failures: Vec<String>,
}

impl Bench {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let weights = common::builtin_models(&root.path().join("demo"));
        let work = root.path().join("work");
        std::fs::create_dir(&work).unwrap();
        Self {
            _root: root,
            weights,
            work,
            failures: Vec::new(),
        }
    }

    fn weight(&self, name: &str) -> PathBuf {
        let prefix = match name {
            "dit" => "wan2.1-dit",
            "vae" => "wan2.1-vae",
            "te" => "umt5",
            "lora" => "lora",
            "tok" => "tokenizer.json",
            other => panic!("{other}"),
        };
        std::fs::read_dir(&self.weights)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .unwrap()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// `run` with the demo's models, a 5-frame 64×48 job of 2 steps, and `extra` flags.
    fn run_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "--dit",
            self.weight("dit").to_str().unwrap(),
            "--vae",
            self.weight("vae").to_str().unwrap(),
            "--text-encoder",
            self.weight("te").to_str().unwrap(),
            "--tokenizer",
            self.weight("tok").to_str().unwrap(),
            "--prompt",
            "a cat",
            "--size",
            "64x48",
            "--frames",
            "5",
            "--steps",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Later flags win (the parser lets a flag override itself), so a case can replace any.
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Runs `args`, checks the exit code and that stderr names each of `culprits`, that
    /// nothing panicked or aborted, and that the work folder holds no new file afterwards
    /// (apart from `allowed` new files). Records a failure instead of panicking, so that one
    /// run lists every broken case.
    fn case(&mut self, name: &str, args: &[String], code: i32, culprits: &[&str]) {
        self.case_allowing(name, args, code, culprits, &[]);
    }

    fn case_allowing(
        &mut self,
        name: &str,
        args: &[String],
        code: i32,
        culprits: &[&str],
        allowed: &[&str],
    ) {
        let before = listing(&self.work);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let outcome = run_limited(&self.work, &refs);
        let mut problems = Vec::new();
        if outcome.code != Some(code) {
            problems.push(format!("exit {:?}, expected {code}", outcome.code));
        }
        for culprit in culprits {
            if !outcome.stderr.contains(culprit) {
                problems.push(format!("the message does not name '{culprit}'"));
            }
        }
        for sign in ["panicked", "RUST_BACKTRACE", "memory allocation of"] {
            if outcome.stderr.contains(sign) {
                problems.push(format!("'{sign}' in stderr"));
            }
        }
        let left: Vec<_> = listing(&self.work)
            .difference(&before)
            .filter(|p| !allowed.iter().any(|a| p.to_string_lossy() == *a))
            .cloned()
            .collect();
        if !left.is_empty() {
            problems.push(format!("left behind: {left:?}"));
        }
        if !problems.is_empty() {
            self.failures.push(format!(
                "{name}: {}\n    stderr: {}",
                problems.join("; "),
                outcome.stderr.trim()
            ));
        }
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} case(s) failed:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A copy of the safetensors file `from` with `change` applied to its tensors.
fn rewrite(from: &Path, to: &Path, change: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = common::load(from);
    change(&mut tensors);
    candle_core::safetensors::save(&tensors, to).unwrap();
}

/// A GIF of 35 bytes declaring a 65535×65535 screen and one 65535×65535 frame.
fn gif_bomb() -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00]);
    gif.extend_from_slice(&[0x2c, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x00]);
    gif.extend_from_slice(&[0x02, 0x02, 0x44, 0x01, 0x00, 0x3b]);
    gif
}

#[test]
fn flags_sizes_and_numbers_are_bounded_before_any_allocation() {
    let mut bench = Bench::new();
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "frames a billion",
            &["--frames", "1000000001"],
            &["--frames"],
        ),
        (
            "a width near 2^64",
            &["--size", "18446744073709551600x16"],
            &["--size"],
        ),
        ("size 0", &["--size", "0x0"], &["--size"]),
        ("cfg 1e30", &["--cfg", "1e30"], &["--cfg"]),
        ("cfg NaN", &["--cfg", "NaN"], &["--cfg"]),
        ("shift 1e300", &["--shift", "1e300"], &["--shift"]),
        ("shift inf", &["--shift", "inf"], &["--shift"]),
        ("steps 0", &["--steps", "0"], &["--steps"]),
        ("strength 2", &["--strength", "2"], &["--strength"]),
        ("tile 7", &["--tile", "7"], &["--tile"]),
        (
            "budget in parsecs",
            &["--vram-budget", "8parsecs"],
            &["--vram-budget"],
        ),
        ("dtype f8", &["--dtype", "f8"], &["--dtype"]),
    ];
    for (name, extra, culprits) in cases {
        let args = bench.run_args(extra);
        bench.case(name, &args, 2, culprits);
    }
    // `plan` did the multiplication in u64 and wrapped around to "fits".
    let args = strings(&[
        "plan",
        "--preset",
        "wan2.1-t2v-14b",
        "--size",
        "4294967296x4294967296",
        "--frames",
        "1000000001",
        "--vram-budget",
        "80GiB",
    ]);
    bench.case("plan of an astronomic job", &args, 2, &["--size"]);
    let args = strings(&["plan", "--preset", "wan2.1-t2v-14b", "--size", "4096x4096"]);
    bench.case(
        "more tokens than the DiT takes",
        &args,
        2,
        &["tokens per sample"],
    );
    let file = bench.file("a-file");
    std::fs::write(&file, b"mine").unwrap();
    let args = strings(&["demo", "--out", file.to_str().unwrap()]);
    bench.case("a demo into a file", &args, 2, &["--out", "not a folder"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"mine");
    let lora_spec = format!("{}:abc", bench.weight("lora").display());
    let args = bench.run_args(&["--lora", &lora_spec]);
    bench.case(
        "a LoRA strength that is not a number",
        &args,
        2,
        &["'abc' is not a number"],
    );
    bench.finish();
}

#[test]
fn malformed_and_mistaken_checkpoints_are_bad_input() {
    let mut bench = Bench::new();
    let (dit, vae) = (bench.weight("dit"), bench.weight("vae"));
    let vae_str = vae.to_str().unwrap().to_owned();

    let args = bench.run_args(&["--dit", &vae_str]);
    bench.case(
        "a VAE given as the DiT",
        &args,
        2,
        &["--dit", "Wan 2.1 VAE"],
    );

    let missing = bench.file("dit-missing.safetensors");
    rewrite(&dit, &missing, |t| {
        let key = t
            .keys()
            .find(|k| k.contains("ffn.0.weight"))
            .unwrap()
            .clone();
        t.remove(&key);
    });
    let args = bench.run_args(&["--dit", missing.to_str().unwrap()]);
    bench.case(
        "a DiT missing a tensor",
        &args,
        2,
        &["dit-missing.safetensors"],
    );

    let reshaped = bench.file("dit-reshaped.safetensors");
    rewrite(&dit, &reshaped, |t| {
        let key = t
            .keys()
            .find(|k| k.contains("ffn.2.weight"))
            .unwrap()
            .clone();
        let old = &t[&key];
        let (rows, cols) = old.dims2().unwrap();
        let wrong = Tensor::zeros((rows, cols + 1), old.dtype(), &Device::Cpu).unwrap();
        t.insert(key, wrong);
    });
    let args = bench.run_args(&["--dit", reshaped.to_str().unwrap()]);
    bench.case(
        "a DiT tensor of the wrong shape",
        &args,
        2,
        &["dit-reshaped.safetensors"],
    );

    let truncated = bench.file("dit-truncated.safetensors");
    let bytes = std::fs::read(&dit).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let args = bench.run_args(&["--dit", truncated.to_str().unwrap()]);
    bench.case("a truncated DiT", &args, 2, &["dit-truncated.safetensors"]);

    let huge_header = bench.file("huge-header.safetensors");
    std::fs::write(&huge_header, u64::MAX.to_le_bytes()).unwrap();
    let args = strings(&["inspect", huge_header.to_str().unwrap()]);
    bench.case(
        "a header length of 2^64",
        &args,
        2,
        &["huge-header.safetensors"],
    );

    let folder = bench.file("a-folder.safetensors");
    std::fs::create_dir(&folder).unwrap();
    let args = bench.run_args(&["--dit", folder.to_str().unwrap()]);
    bench.case(
        "a folder as the DiT",
        &args,
        2,
        &["a-folder.safetensors", "folder"],
    );
    let args = bench.run_args(&["--vae", "/dev/null"]);
    bench.case(
        "/dev/null as the VAE",
        &args,
        2,
        &["/dev/null", "character device"],
    );
    let looped = bench.file("loop.safetensors");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let args = bench.run_args(&["--dit", looped.to_str().unwrap()]);
    bench.case(
        "a symlink loop as the DiT",
        &args,
        2,
        &["loop.safetensors", "symbolic links"],
    );
    let args = strings(&["inspect", looped.to_str().unwrap()]);
    bench.case("inspect a symlink loop", &args, 2, &["loop.safetensors"]);

    let fifo = bench.file("fifo.safetensors");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let fifo_str = fifo.to_str().unwrap().to_owned();
    let args = strings(&["inspect", &fifo_str]);
    bench.case("inspect a FIFO", &args, 2, &["fifo.safetensors", "FIFO"]);
    let args = bench.run_args(&["--dit", &fifo_str]);
    bench.case("a FIFO as the DiT", &args, 2, &["fifo.safetensors", "FIFO"]);
    let args = bench.run_args(&["--input", &fifo_str]);
    bench.case(
        "a FIFO as the input clip",
        &args,
        2,
        &["fifo.safetensors", "FIFO"],
    );
    let args = bench.run_args(&["--pipeline", &fifo_str]);
    bench.case(
        "a FIFO as the pipeline file",
        &args,
        2,
        &["--pipeline", "FIFO"],
    );
    let args = bench.run_args(&["--dit-config", &fifo_str]);
    bench.case(
        "a FIFO as the DiT config",
        &args,
        2,
        &["--dit-config", "FIFO"],
    );
    bench.finish();
}

#[test]
fn outputs_are_checked_before_the_work_and_never_overwrite_inputs() {
    let mut bench = Bench::new();
    let dit = bench.weight("dit");
    let dit_bytes = std::fs::read(&dit).unwrap();
    let same = bench.file("x.mp4");
    let same = same.to_str().unwrap().to_owned();
    let args = bench.run_args(&["--out", &same, "--report", &same]);
    bench.case("--report equal to --out", &args, 2, &["the same file"]);
    let args = bench.run_args(&["--out", dit.to_str().unwrap()]);
    bench.case("--out equal to the DiT", &args, 2, &["--out", "--dit"]);
    assert_eq!(
        std::fs::read(&dit).unwrap(),
        dit_bytes,
        "the DiT was changed"
    );
    let avi = bench.file("o.avi");
    let args = bench.run_args(&["--out", avi.to_str().unwrap()]);
    bench.case("an unknown extension", &args, 2, &["--out", ".avi"]);
    let nowhere = bench.file("no/such/folder/o.mp4");
    let args = bench.run_args(&["--out", nowhere.to_str().unwrap()]);
    bench.case("a missing folder", &args, 2, &["--out", "does not exist"]);
    let args = bench.run_args(&["--out", "o.mp4", "--report", nowhere.to_str().unwrap()]);
    bench.case(
        "a report into a missing folder",
        &args,
        2,
        &["--report", "does not exist"],
    );
    let frames = bench.file("frames");
    std::fs::create_dir(&frames).unwrap();
    std::fs::write(frames.join("keep.txt"), b"mine").unwrap();
    let args = bench.run_args(&["--out", frames.to_str().unwrap()]);
    bench.case(
        "a folder that is not empty",
        &args,
        2,
        &["--out", "not empty"],
    );
    // The output's extension in capitals is still known.
    let upper = "O.SAFETENSORS";
    let args = bench.run_args(&["--out", upper]);
    bench.case_allowing("--out in capitals", &args, 0, &[], &[upper]);
    bench.finish();
}

#[test]
fn videos_images_and_toml_files_from_a_careless_or_hostile_hand() {
    let mut bench = Bench::new();
    let bomb = bench.file("bomb.gif");
    std::fs::write(&bomb, gif_bomb()).unwrap();
    let args = bench.run_args(&["--input", bomb.to_str().unwrap()]);
    bench.case("a GIF declaring 65535x65535", &args, 2, &["bomb.gif"]);
    let args = bench.run_args(&["--input", bomb.to_str().unwrap(), "--vram-budget", "1GiB"]);
    bench.case("the GIF under a budget", &args, 2, &["bomb.gif"]);
    let mp4 = bench.file("truncated.mp4");
    std::fs::write(&mp4, b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2").unwrap();
    let args = bench.run_args(&["--input", mp4.to_str().unwrap()]);
    bench.case("a truncated MP4", &args, 2, &["truncated.mp4"]);

    // A folder of PNG frames (capital extensions too) is a clip.
    let pngs = bench.file("pngs");
    std::fs::create_dir(&pngs).unwrap();
    let frame = Tensor::zeros((1, 3, 5, 48, 64), DType::F32, &Device::Cpu).unwrap();
    let clip = vpipe_video::from_tensor(&frame, 16.0).unwrap();
    let written = bench.file("written");
    vpipe_video::write_video(&written, &clip, &vpipe_video::WriteOptions::default()).unwrap();
    for (i, entry) in listing(&written).iter().enumerate() {
        std::fs::rename(written.join(entry), pngs.join(format!("frame{i}.PNG"))).unwrap();
    }
    std::fs::remove_dir(&written).unwrap();
    let args = bench.run_args(&[
        "--input",
        pngs.to_str().unwrap(),
        "--out",
        "v2v.safetensors",
    ]);
    bench.case_allowing("a PNG folder as input", &args, 0, &[], &["v2v.safetensors"]);

    let toml = |bench: &Bench, name: &str, text: &str| {
        let path = bench.file(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let broken = toml(&bench, "broken.toml", "prompt = \"unterminated\n");
    let args = bench.run_args(&["--pipeline", &broken]);
    bench.case("malformed TOML", &args, 2, &["broken.toml"]);
    let table = toml(&bench, "table.toml", "[prompt]\ntext = \"x\"\n");
    let args = bench.run_args(&["--pipeline", &table]);
    bench.case("a TOML table", &args, 2, &["table.toml", "prompt"]);
    let unknown = toml(&bench, "unknown.toml", "promt = \"typo\"\n");
    let args = bench.run_args(&["--pipeline", &unknown]);
    bench.case("an unknown TOML key", &args, 2, &["promt"]);
    // A value that begins with '-' is a value, not a flag.
    let dashed = toml(
        &bench,
        "dashed.toml",
        "negative_prompt = \"--out /etc/passwd\"\nprompt = \"-dash\"\n",
    );
    let mut args = strings(&["plan", "--pipeline", &dashed]);
    args.extend(bench.run_args(&[])[1..].iter().cloned());
    bench.case("TOML strings that begin with '-'", &args, 0, &[]);
    bench.finish();
}

#[test]
fn non_finite_values_and_broken_budgets_do_not_look_like_success() {
    let mut bench = Bench::new();
    let dit = bench.weight("dit");
    let nan_dit = bench.file("dit-nan.safetensors");
    rewrite(&dit, &nan_dit, |t| {
        let key = t.keys().find(|k| k.contains("ffn.2.bias")).unwrap().clone();
        let old = &t[&key];
        let nan = Tensor::full(f32::NAN, old.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(old.dtype())
            .unwrap();
        t.insert(key, nan);
    });
    let report = bench.file("nan-report.json");
    let args = bench.run_args(&[
        "--dit",
        nan_dit.to_str().unwrap(),
        "--out",
        "nan.mp4",
        "--report",
        report.to_str().unwrap(),
    ]);
    bench.case_allowing(
        "a NaN in the DiT",
        &args,
        1,
        &["sample", "step 1/", "NaN"],
        &["nan-report.json", "nan-report.svg"],
    );
    assert!(!bench.file("nan.mp4").exists());

    // A fixed tile and a budget that holds the weights (13.7 MiB) but not the tile's work: the
    // work is done and written, and exit 6 says the budget was not kept.
    let vae = bench.weight("vae");
    let input = bench.file("clip.safetensors");
    let clip = Tensor::zeros((1, 3, 5, 64, 64), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("video_in".to_owned(), clip)]), &input)
        .unwrap();
    let args = strings(&[
        "tensors",
        "vae-encode",
        "--vae",
        vae.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        "latents.safetensors",
        "--tile",
        "64",
        "--vram-budget",
        "16MiB",
    ]);
    bench.case_allowing(
        "a budget that the work exceeds",
        &args,
        6,
        &["budget of 16.00 MiB was not kept", "vae encode"],
        &["latents.safetensors"],
    );
    let written = bench.file("latents.safetensors").exists();
    bench.finish();
    assert!(written, "exit 6 comes after the output is written");
}
