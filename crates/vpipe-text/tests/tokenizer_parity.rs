//! Tokenizer parity: our two loading routes against the Python tokenizers they stand for.
//!
//! Expected ids come from `tools/fixtures/make_umt5_fixtures.py` (sentencepiece 0.2.3,
//! transformers 5.24.0, tokenizers 0.23.3): a small Unigram SentencePiece model trained on an
//! English + Chinese text with T5's settings (nmt_nfkc, pad 0, eos 1, unk 2, no bos, byte
//! fallback), stored as the `spiece_model` uint8 tensor of `umt5_tiny_comfy.safetensors`, and
//! the `tokenizer.json` transformers' `T5Tokenizer` converter makes of it. For each prompt in
//! `tokenizer_cases.json`:
//! - `sentencepiece`: `SentencePieceProcessor(add_eos=True).encode(text)` (what ComfyUI runs),
//!   truncated to 512 with EOS kept; our `from_spiece_model` / `from_checkpoint_file` must
//!   match it exactly;
//! - `hf`: `T5Tokenizer(text, truncation=True, max_length=512)` (what diffusers runs); our
//!   `from_tokenizer_json` must match it exactly.
//!
//! The two references disagree on 4 of the 10 prompts: characters outside the vocabulary
//! (HF's converter drops byte fallback and gives `<unk>`, SentencePiece gives `<0xNN>` bytes:
//! `mixed` has "(" and ")", `unknown_characters`), and literal `<extra_id_0>`, `</s>`, `<pad>`,
//! `<unk>` in the text, which HF matches as special tokens.

use std::path::PathBuf;

use candle_core::Device;
use vpipe_text::tokenizer::{clean_prompt, Encoded, PromptTokenizer, MAX_LENGTH};
use vpipe_text::Error;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn cases() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tokenizer_cases.json")).unwrap())
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The `spiece_model` bytes of the ComfyUI-style fixture.
fn spiece_bytes() -> Vec<u8> {
    let st = candle_core::safetensors::load(fixture("umt5_tiny_comfy.safetensors"), &Device::Cpu)
        .unwrap();
    st["spiece_model"].to_vec1::<u8>().unwrap()
}

/// Checks every prompt against the reference `key` (`sentencepiece` or `hf`).
fn check(tok: &PromptTokenizer, key: &str, untruncated_key: &str) {
    let c = cases();
    let prompts = c["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 8);
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let want = ids(&p[key]);
        let enc = tok.encode(p["text"].as_str().unwrap()).unwrap();
        assert_eq!(enc.ids.len(), MAX_LENGTH, "{name}");
        assert_eq!(&enc.ids[..enc.true_len], &want[..], "{name}: ids vs {key}");
        assert!(
            enc.ids[enc.true_len..].iter().all(|&i| i == 0),
            "{name}: padding"
        );
        assert_eq!(
            enc.mask.iter().filter(|&&m| m == 1).count(),
            enc.true_len,
            "{name}"
        );
        assert!(
            enc.mask[..enc.true_len].iter().all(|&m| m == 1),
            "{name}: mask"
        );
        let untruncated = p[untruncated_key].as_u64().unwrap() as usize;
        assert_eq!(
            enc.truncated,
            untruncated > MAX_LENGTH,
            "{name}: truncated flag"
        );
        assert_eq!(
            *enc.ids[..enc.true_len].last().unwrap(),
            1,
            "{name}: EOS last"
        );
    }
}

#[test]
fn tokenizer_json_matches_hf_fast() {
    let tok = PromptTokenizer::from_tokenizer_json(fixture("tokenizer.json")).unwrap();
    check(&tok, "hf", "hf_untruncated_len");
}

#[test]
fn spiece_model_bytes_match_sentencepiece() {
    let tok = PromptTokenizer::from_spiece_model(&spiece_bytes()).unwrap();
    check(&tok, "sentencepiece", "sentencepiece_untruncated_len");
}

#[test]
fn checkpoint_spiece_tensor_matches_sentencepiece() {
    let tok =
        PromptTokenizer::from_checkpoint_file(fixture("umt5_tiny_comfy.safetensors")).unwrap();
    check(&tok, "sentencepiece", "sentencepiece_untruncated_len");
}

/// The fixture really exercises both the agreeing and the disagreeing cases.
#[test]
fn references_disagree_where_documented() {
    let c = cases();
    let disagree: Vec<&str> = c["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["agree"].as_bool().unwrap())
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        disagree,
        [
            "mixed",
            "unknown_characters",
            "extra_id_text",
            "control_piece_text"
        ]
    );
}

#[test]
fn long_prompt_is_truncated_keeping_eos() {
    let tok = PromptTokenizer::from_spiece_model(&spiece_bytes()).unwrap();
    let c = cases();
    let long = c["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "longer_than_512")
        .unwrap();
    let enc = tok.encode(long["text"].as_str().unwrap()).unwrap();
    assert!(enc.truncated);
    assert_eq!(enc.true_len, MAX_LENGTH);
    assert_eq!(enc.ids[MAX_LENGTH - 1], 1);
    let short = tok
        .clone()
        .with_max_length(8)
        .encode("A cat walks on the grass")
        .unwrap();
    assert_eq!(short.ids.len(), 8);
    assert_eq!(short.ids[7], 1);
}

#[test]
fn batch_tensors() {
    let tok = PromptTokenizer::from_tokenizer_json(fixture("tokenizer.json")).unwrap();
    let items = [tok.encode("A cat").unwrap(), tok.encode("").unwrap()];
    let (ids, mask) = Encoded::to_tensors(&items, &Device::Cpu).unwrap();
    assert_eq!(ids.dims(), [2, MAX_LENGTH]);
    assert_eq!(mask.to_vec2::<u32>().unwrap()[1][..2], [1, 0]);
}

/// Wan's `basic_clean` (without ftfy) + `whitespace_clean`, expected strings from Python's
/// `html.unescape` and `re.sub(r"\s+", " ", ...)` in the fixture script.
#[test]
fn prompt_cleaning_matches_wan() {
    for case in cases()["clean"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            clean_prompt(text),
            case["cleaned"].as_str().unwrap(),
            "{text:?}"
        );
    }
}

// ---- Bad input ---------------------------------------------------------------------------------

#[test]
fn truncated_spiece_model_is_refused() {
    let bytes = spiece_bytes();
    for cut in [bytes.len() / 2, bytes.len() - 1, 100] {
        let err = PromptTokenizer::from_spiece_model(&bytes[..cut]).unwrap_err();
        assert!(matches!(err, Error::SpieceModel { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("truncated"), "cut at {cut}: {msg}");
    }
    let err = PromptTokenizer::from_spiece_model(b"not a sentencepiece model").unwrap_err();
    assert!(matches!(err, Error::SpieceModel { .. }), "{err:?}");
    let err = PromptTokenizer::from_spiece_model(&[]).unwrap_err();
    assert!(err.to_string().contains("no vocabulary pieces"), "{err}");
}

#[test]
fn checkpoint_without_spiece_model_is_refused() {
    let err = PromptTokenizer::from_checkpoint_file(fixture("umt5_tiny_transformers.safetensors"))
        .unwrap_err();
    assert!(matches!(err, Error::NoSpieceModel { .. }), "{err:?}");
    assert!(err.to_string().contains("spiece_model"), "{err}");
}

#[test]
fn missing_tokenizer_json_names_the_file() {
    let err = PromptTokenizer::from_tokenizer_json("/nonexistent/tokenizer.json").unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/tokenizer.json"),
        "{err}"
    );
}
