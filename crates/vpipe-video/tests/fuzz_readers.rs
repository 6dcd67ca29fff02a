//! Time-bounded property-based fuzzing of the readers: mutated and truncated copies of the seed
//! corpus (tests/corpus: a GIF, an H.264 MP4, a PNG, a JPEG), of the real clip's header, and
//! random bytes behind each format's signature; each input read as a video and as a still
//! image. Every input must give `Ok` or `Err`: a panic fails the
//! property, an abort or a hang fails the whole test binary.
//!
//! Case counts are fixed and failures are not persisted into the source tree (a found case is
//! printed by proptest; add it to tests/corpus to keep it).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vpipe_video::{
    count_frames, probe_mp4, read_image_with_limits, read_video_with_limits, ReadLimits,
};

/// Limits far below the defaults, so that a mutation declaring a large but allowed size costs
/// milliseconds, not gigabytes.
const FUZZ_LIMITS: ReadLimits = ReadLimits {
    max_frame_side: 1024,
    max_frames: 256,
    max_decoded_bytes: 64 << 20,
    max_file_bytes: 8 << 20,
};

/// Wall-clock budget per property: cases past it are skipped, so the suite stays bounded on a
/// slow machine (2 cores, debug build of this crate).
const TIME_BUDGET: Duration = Duration::from_secs(15);

fn seeds() -> &'static [(String, Vec<u8>)] {
    static SEEDS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
        let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect();
        seeds.sort();
        assert!(
            seeds.len() >= 3,
            "expected GIF, MP4 and PNG seeds in {}",
            dir.display()
        );
        seeds
    })
}

/// One edit of a seed.
#[derive(Debug, Clone)]
enum Mutation {
    /// Set the byte at (position modulo length).
    SetByte(usize, u8),
    /// XOR one bit.
    FlipBit(usize, u8),
    /// Overwrite 4 bytes with a boundary value, big- or little-endian (sizes, counts, dims).
    Boundary(usize, u32, bool),
    /// Cut the file at (position modulo length).
    Truncate(usize),
    /// Remove a run of bytes.
    Delete(usize, usize),
    /// Duplicate a run of bytes in place.
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let boundary = prop_oneof![
        Just(0u32),
        Just(1),
        Just(0x7f),
        Just(0xff),
        Just(0xffff),
        Just(0x1_0000),
        Just(0x7fff_ffff),
        Just(0xffff_ffff),
        any::<u32>(),
    ];
    prop_oneof![
        3 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::SetByte(p, b)),
        3 => (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        3 => (any::<usize>(), boundary, any::<bool>()).prop_map(|(p, v, be)| Mutation::Boundary(p, v, be)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), 1usize..64).prop_map(|(p, n)| Mutation::Delete(p, n)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(p, n)| Mutation::Duplicate(p, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let at = |p: usize| p % bytes.len();
    match *m {
        Mutation::SetByte(p, b) => {
            let i = at(p);
            bytes[i] = b;
        }
        Mutation::FlipBit(p, bit) => {
            let i = at(p);
            bytes[i] ^= 1 << bit;
        }
        Mutation::Boundary(p, v, big_endian) => {
            let i = at(p);
            let value = if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            for (k, b) in value.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
        Mutation::Truncate(p) => {
            let i = at(p);
            bytes.truncate(i);
        }
        Mutation::Delete(p, n) => {
            let i = at(p);
            let end = (i + n).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::Duplicate(p, n) => {
            let i = at(p);
            let end = (i + n).min(bytes.len());
            let run = bytes[i..end].to_vec();
            bytes.splice(i..i, run);
        }
    }
}

/// Writes `bytes` where the reader will look for them (a PNG goes into a folder, next to an
/// intact frame of the same seed, as the reader only takes PNGs in folders) and reads them with
/// every entry point. Any result is fine; returning at all is the property.
fn read_all_ways(dir: &Path, name: &str, bytes: &[u8]) {
    // Every input as a still image too (PNG and JPEG by content, anything else refused).
    let still = dir.join(format!("still-{name}"));
    std::fs::write(&still, bytes).unwrap();
    let _ = read_image_with_limits(&still, &FUZZ_LIMITS);
    let path: PathBuf = if name.to_ascii_lowercase().ends_with(".png") {
        let folder = dir.join("frames");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("b.png"), bytes).unwrap();
        folder
    } else {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let _ = read_video_with_limits(&path, &FUZZ_LIMITS);
    let _ = probe_mp4(&path);
    if name.ends_with(".mp4") {
        // From the header alone for an MP4; for a GIF or a folder it decodes with the default
        // limits, where a mutated header may legitimately ask for a 1 GiB canvas: not here.
        let _ = count_frames(&path);
    }
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        // Nothing written into the source tree; a failing case is printed in full instead.
        failure_persistence: None,
        // Shrinking re-runs the decoder many times; a printed unshrunk case is enough here.
        max_shrink_iters: 64,
        ..Config::default()
    })
}

#[test]
fn mutated_seeds_never_panic() {
    let started = Instant::now();
    let strategy = (
        0..seeds().len(),
        proptest::collection::vec(mutation(), 1..6),
    );
    runner(3000)
        .run(&strategy, |(seed, mutations)| {
            if started.elapsed() > TIME_BUDGET {
                return Ok(());
            }
            let (name, original) = &seeds()[seed];
            let mut bytes = original.clone();
            for m in &mutations {
                apply(&mut bytes, m);
            }
            let dir = tempfile::tempdir().unwrap();
            if name.ends_with(".png") {
                // The intact frame first: the mutated one is then checked against its size.
                std::fs::create_dir_all(dir.path().join("frames")).unwrap();
                std::fs::write(dir.path().join("frames/a.png"), original).unwrap();
            }
            read_all_ways(dir.path(), name, &bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn random_bytes_behind_signatures_never_panic() {
    let started = Instant::now();
    let signatures: [&[u8]; 6] = [
        b"GIF89a",
        b"GIF87a",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
        b"\x00\x00\x00\x18ftypisom",
        b"\xff\xd8\xff\xc0\x00\x11\x08",
        b"",
    ];
    let strategy = (
        0..signatures.len(),
        proptest::collection::vec(any::<u8>(), 0..512),
    );
    runner(2000)
        .run(&strategy, |(sig, tail)| {
            if started.elapsed() > TIME_BUDGET {
                return Ok(());
            }
            let mut bytes = signatures[sig].to_vec();
            bytes.extend_from_slice(&tail);
            let name = match sig {
                0 | 1 => "random.gif",
                2 => "random.png",
                4 => "random.jpg",
                _ => "random.mp4",
            };
            let dir = tempfile::tempdir().unwrap();
            read_all_ways(dir.path(), name, &bytes);
            Ok(())
        })
        .unwrap();
}

/// The real clip's `moov` (at its end) mutated: header parsing only, as a full decode of 81
/// frames per case would not fit the time budget.
#[test]
fn mutated_real_clip_headers_never_panic() {
    let started = Instant::now();
    let clip = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/wan21-cheesecake-832x480x81-h264.mp4"),
    )
    .unwrap();
    let moov = clip.windows(4).rposition(|w| w == b"moov").unwrap() - 4;
    let moov_len = clip.len() - moov;
    let strategy = proptest::collection::vec((0..moov_len, any::<u8>(), 0u8..3), 1..8);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    runner(1500)
        .run(&strategy, |edits| {
            if started.elapsed() > TIME_BUDGET {
                return Ok(());
            }
            let mut bytes = clip.clone();
            for &(offset, value, kind) in &edits {
                let i = moov + offset;
                match kind {
                    0 => bytes[i] = value,
                    1 => bytes[i] ^= 1 << (value % 8),
                    _ => bytes[i] = 0xff,
                }
            }
            std::fs::write(&path, &bytes).unwrap();
            let _ = probe_mp4(&path);
            Ok(())
        })
        .unwrap();
}
