//! Property-based fuzzing of the two readers that parse untrusted bytes: the safetensors header
//! reader and the pickle reader (also reached through whole `.pth` archives).
//!
//! Inputs are the seed corpus in `tests/corpus/` and the fixtures in `tests/fixtures/`, mutated
//! (bytes set to boundary values and opcodes, runs inserted, removed, truncated), plus random
//! bytes. The property: the reader returns, `Ok` or `Err`, and never panics; an `Ok` inspection
//! only names bytes inside the input. Case counts are fixed so the whole file runs in a few
//! seconds, and failures are not persisted (no files are written into the source tree): a
//! failure prints its minimal input, which belongs in the corpus once fixed.

use std::io::Cursor;
use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config;

use crate::{inspect_reader, pickle};

fn read_dir_files(dir: &str, ext: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no .{ext} seeds in {}", dir.display());
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    read_dir_files("tests/corpus", "safetensors")
}

fn pickle_seeds() -> Vec<Vec<u8>> {
    read_dir_files("tests/corpus", "pkl")
}

fn pth_seeds() -> Vec<Vec<u8>> {
    read_dir_files("tests/fixtures", "pth")
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..Config::default()
    }
}

/// Bytes that matter to the formats: JSON punctuation and digits, pickle opcodes (MARK, STOP,
/// PROTO, tuples, memo, REDUCE, BUILD, long-length strings), zip magic, boundary values.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x7f, 0x80, 0xff, b'{', b'}', b'[', b']', b'"', b',', b':', b'-', b'0', b'9', b'e',
    b'(', b')', b'.', b'R', b'Q', b'b', b'h', b'j', b'q', b'r', b't', b'u', b's', b'a', b'e', b'X',
    b'K', b'J', b'M', 0x85, 0x86, 0x87, 0x8a, 0x8b, 0x8c, 0x8d, 0x8e, 0x93, 0x94, 0x95, b'P', b'K',
    0x03, 0x04,
];

/// Tokens spliced into safetensors JSON headers: huge and negative numbers, dtypes, keys.
const JSON_TOKENS: &[&str] = &[
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "-1",
    "1e30",
    "0",
    "\"F8_E5M2\"",
    "\"F4\"",
    "\"BOOL\"",
    "\"__metadata__\"",
    "\"data_offsets\"",
    "\"shape\"",
    "[]",
    "{}",
    "null",
    "[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]",
];

#[derive(Debug, Clone)]
enum Mutation {
    Set(Index, u8),
    SetInteresting(Index, Index),
    Insert(Index, Vec<u8>),
    Remove(Index, usize),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, v)| Mutation::SetInteresting(i, v)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Set(i, b) if len > 0 => bytes[i.index(len)] = *b,
            Mutation::SetInteresting(i, v) if len > 0 => {
                bytes[i.index(len)] = INTERESTING[v.index(INTERESTING.len())]
            }
            Mutation::Insert(i, b) => {
                let at = i.index(len + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Mutation::Remove(i, n) if len > 0 => {
                let at = i.index(len);
                bytes.drain(at..(at + n).min(len));
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(len + 1)),
            _ => {}
        }
    }
    bytes
}

/// Inspects `bytes` as if read from a file called `name` and checks an `Ok` result stays inside
/// the input.
fn inspect_bytes(name: &str, bytes: Vec<u8>) {
    let len = bytes.len() as u64;
    if let Ok(info) = inspect_reader(Path::new(name), Cursor::new(bytes), len) {
        for t in &info.tensors {
            assert!(
                t.data.start <= t.data.end && t.data.end <= len,
                "{} claims bytes {}..{} of a {len}-byte input",
                t.name,
                t.data.start,
                t.data.end
            );
        }
        // The summary is printed for every inspected file; it must not panic either.
        let _ = info.to_string();
    }
}

/// The JSON header of a safetensors seed, with `edit` applied, under a fresh length prefix, so
/// that mutations reach the JSON and offset checks instead of stopping at the length.
fn reprefixed(seed: &[u8], edit: impl FnOnce(Vec<u8>) -> Vec<u8>) -> Vec<u8> {
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let header = edit(seed[8..8 + n].to_vec());
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&seed[8 + n..]);
    out
}

#[test]
fn every_truncation_of_every_seed_is_handled() {
    for seed in safetensors_seeds() {
        for cut in 0..seed.len() {
            inspect_bytes("t.safetensors", seed[..cut].to_vec());
        }
    }
    for seed in pickle_seeds() {
        for cut in 0..seed.len() {
            let _ = pickle::read_state_dict(&seed[..cut]);
        }
    }
}

proptest! {
    #![proptest_config(config(10_000))]

    #[test]
    fn safetensors_files_mutated_anywhere(
        seed in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let seeds = safetensors_seeds();
        let seed = seeds[seed.index(seeds.len())].clone();
        inspect_bytes("t.safetensors", apply(seed, &mutations));
    }

    #[test]
    fn safetensors_headers_mutated_under_a_valid_length(
        seed in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
        token in any::<Index>(),
        at in any::<Index>(),
    ) {
        let seeds = safetensors_seeds();
        let seed = &seeds[seed.index(seeds.len())];
        let bytes = reprefixed(seed, |mut header| {
            let token = JSON_TOKENS[token.index(JSON_TOKENS.len())].as_bytes();
            let at = at.index(header.len() + 1);
            header.splice(at..at, token.iter().copied());
            apply(header, &mutations)
        });
        inspect_bytes("t.safetensors", bytes);
    }

    #[test]
    fn pickles_mutated_anywhere(
        seed in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        let seeds = pickle_seeds();
        let seed = seeds[seed.index(seeds.len())].clone();
        let _ = pickle::read_state_dict(&apply(seed, &mutations));
    }

    #[test]
    fn pickles_spliced_from_two_seeds(
        first in any::<Index>(),
        second in any::<Index>(),
        cut_first in any::<Index>(),
        cut_second in any::<Index>(),
    ) {
        let seeds = pickle_seeds();
        let a = &seeds[first.index(seeds.len())];
        let b = &seeds[second.index(seeds.len())];
        let mut bytes = a[..cut_first.index(a.len() + 1)].to_vec();
        bytes.extend_from_slice(&b[cut_second.index(b.len() + 1)..]);
        let _ = pickle::read_state_dict(&bytes);
    }

    #[test]
    fn random_opcode_streams(body in prop::collection::vec(any::<Index>(), 0..256)) {
        let mut bytes = vec![0x80, 2];
        bytes.extend(body.iter().map(|i| INTERESTING[i.index(INTERESTING.len())]));
        bytes.push(b'.');
        let _ = pickle::read_state_dict(&bytes);
    }

    #[test]
    fn random_bytes_under_every_name(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        name in prop::sample::select(vec!["r.safetensors", "r.pth", "r.bin", "r.dat"]),
    ) {
        let _ = pickle::read_state_dict(&bytes);
        inspect_bytes(name, bytes);
    }
}

proptest! {
    // Fewer cases: each parses a zip directory, and most mutations stop at its checks.
    #![proptest_config(config(2_000))]

    #[test]
    fn pth_archives_mutated_anywhere(
        seed in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let seeds = pth_seeds();
        let seed = seeds[seed.index(seeds.len())].clone();
        inspect_bytes("t.pth", apply(seed, &mutations));
    }
}
