//! umT5's tokenizer for prompts: SentencePiece Unigram, EOS appended, padded to 512.
//!
//! Two sources, matching the two upstream pipelines:
//!
//! - [`PromptTokenizer::from_tokenizer_json`]: a Hugging Face `tokenizer.json` (diffusers'
//!   `tokenizer/` folder), run as the `tokenizers` library runs it: the ids equal
//!   `T5TokenizerFast(text, truncation=True, max_length=512)`.
//! - [`PromptTokenizer::from_spiece_model`] / [`PromptTokenizer::from_checkpoint_file`]: the
//!   SentencePiece `ModelProto` bytes that ComfyUI's umT5 safetensors embed as a uint8
//!   `spiece_model` tensor. The protobuf is read by a small wire-format reader and turned into a
//!   `tokenizers` Unigram model with transformers' T5 pipeline (the charsmap as a `Precompiled`
//!   normaliser, whitespace split, `Metaspace('▁', prepend always, split)`) and SentencePiece's
//!   own byte fallback; the ids equal `SentencePieceProcessor(add_eos=True).encode(text)`, which
//!   is what ComfyUI runs.
//!
//! The two differ where transformers' converter departs from SentencePiece: it drops byte
//! fallback (a character outside the vocabulary becomes `<unk>` = 2 instead of its UTF-8
//! `<0xNN>` byte pieces, umT5's model having byte fallback on), and it adds `<pad>`, `</s>`,
//! `<unk>` and `<extra_id_N>` as special tokens matched in the raw text (SentencePiece never
//! produces control pieces from text). Plain prompts in the vocabulary tokenise the same.
//!
//! Truncation: a prompt longer than 512 tokens keeps its first 511 and the EOS (as HF truncation
//! does) and a `tracing` warning says how many were dropped. [`clean_prompt`] is Wan's prompt
//! cleaning (without ftfy).

mod clean;
mod spiece;

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{Encoding, Tokenizer, TruncationDirection};

pub use clean::clean_prompt;
use spiece::PieceType;

use crate::{Error, Result};

/// Wan's text length (`text_len` upstream, diffusers' `max_sequence_length`).
pub const MAX_LENGTH: usize = 512;

/// A tokenised prompt, padded to the tokenizer's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, EOS last, then the pad id (0) up to the tokenizer's length.
    pub ids: Vec<u32>,
    /// 1 for each token (EOS included), 0 for padding.
    pub mask: Vec<u32>,
    /// Tokens before padding (EOS included): the rows of the encoder output that are kept.
    pub true_len: usize,
    /// Whether the prompt had more tokens than fit (the last ones were dropped, EOS kept).
    pub truncated: bool,
}

impl Encoded {
    /// Stacks encodings of equal length into the encoder's inputs.
    ///
    /// # Shapes
    /// - output: (`input_ids` [B, L] u32, `attention_mask` [B, L] u32), B = `items.len()`.
    pub fn to_tensors(items: &[Encoded], device: &Device) -> Result<(Tensor, Tensor)> {
        let l = items.first().map_or(0, |e| e.ids.len());
        if let Some(bad) = items.iter().find(|e| e.ids.len() != l) {
            return Err(Error::MaskShape {
                input_ids: vec![1, l],
                attention_mask: vec![1, bad.ids.len()],
            });
        }
        let ids: Vec<u32> = items.iter().flat_map(|e| e.ids.iter().copied()).collect();
        let mask: Vec<u32> = items.iter().flat_map(|e| e.mask.iter().copied()).collect();
        Ok((
            Tensor::from_vec(ids, (items.len(), l), device)?,
            Tensor::from_vec(mask, (items.len(), l), device)?,
        ))
    }
}

/// umT5's prompt tokenizer.
#[derive(Debug, Clone)]
pub struct PromptTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    max_length: usize,
}

impl PromptTokenizer {
    /// Loads a Hugging Face `tokenizer.json` (with its post-processor appending `</s>`, as T5's
    /// has). The pad id is that of `<pad>` (0 for T5).
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = Tokenizer::from_file(path).map_err(|source| Error::Tokenizer {
            context: path.display().to_string(),
            source,
        })?;
        let pad_id = inner.token_to_id("<pad>").unwrap_or(0);
        Ok(Self {
            inner,
            pad_id,
            max_length: MAX_LENGTH,
        })
    }

    /// Builds the tokenizer from the bytes of a SentencePiece `ModelProto` (`spiece.model`, or
    /// ComfyUI's `spiece_model` tensor). The model must be a Unigram model with SentencePiece's
    /// default whitespace handling (T5's and umT5's are) and an EOS id.
    pub fn from_spiece_model(bytes: &[u8]) -> Result<Self> {
        let m = spiece::parse(bytes)?;
        let unsupported = |what: String| Err(Error::SpieceModel { reason: what });
        if m.model_type != 1 {
            return unsupported(format!(
                "model_type {} is not UNIGRAM (1); umT5's model is a Unigram model",
                m.model_type
            ));
        }
        if !(m.add_dummy_prefix && m.remove_extra_whitespaces && m.escape_whitespaces)
            || m.treat_whitespace_as_suffix
        {
            return unsupported(format!(
                "whitespace settings add_dummy_prefix {}, remove_extra_whitespaces {}, \
                 escape_whitespaces {}, treat_whitespace_as_suffix {} are not supported (T5's \
                 are true, true, true, false)",
                m.add_dummy_prefix,
                m.remove_extra_whitespaces,
                m.escape_whitespaces,
                m.treat_whitespace_as_suffix
            ));
        }
        let n = m.pieces.len();
        let id_in_range = |id: i32, what: &str| -> Result<u32> {
            u32::try_from(id)
                .ok()
                .filter(|&i| (i as usize) < n)
                .ok_or_else(|| Error::SpieceModel {
                    reason: format!("{what} {id} is not a piece id (the model has {n} pieces)"),
                })
        };
        let unk_id = id_in_range(m.unk_id, "unk_id")?;
        let eos_id = id_in_range(m.eos_id, "eos_id")?;
        // T5 pads with 0 whether or not the model names a pad piece.
        let pad_id = u32::try_from(m.pad_id).unwrap_or(0);
        let eos_piece = m.pieces[eos_id as usize].piece.clone();
        // SentencePiece never matches control, unknown or unused pieces against text, but a
        // `tokenizers` Unigram matches every vocabulary string: give those pieces a name with a
        // space, which cannot survive the whitespace split. (Byte pieces keep their `<0xNN>`
        // names: byte fallback looks them up by name.)
        let vocab: Vec<(String, f64)> = m
            .pieces
            .iter()
            .map(|p| {
                let name = match p.kind {
                    PieceType::Control | PieceType::Unknown | PieceType::Unused => {
                        format!("{} (not matched)", p.piece)
                    }
                    _ => p.piece.clone(),
                };
                (name, f64::from(p.score))
            })
            .collect();
        let model = tokenizers::models::unigram::Unigram::from(
            vocab,
            Some(unk_id as usize),
            m.byte_fallback,
        )
        .map_err(|source| Error::Tokenizer {
            context: "building the Unigram model from the SentencePiece pieces".to_string(),
            source,
        })?;
        let mut inner = Tokenizer::new(model);
        if !m.precompiled_charsmap.is_empty() {
            let charsmap =
                Precompiled::from(&m.precompiled_charsmap).map_err(|e| Error::SpieceModel {
                    reason: format!(
                        "precompiled_charsmap of normalizer `{}` is unreadable: {e}",
                        m.normalizer_name
                    ),
                })?;
            inner
                .with_normalizer(Some(charsmap))
                .map_err(|source| Error::Tokenizer {
                    context: "setting the normalizer".to_string(),
                    source,
                })?;
        }
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            WhitespaceSplit.into(),
            Metaspace::new('▁', PrependScheme::Always, true).into(),
        ])));
        let post = TemplateProcessing::builder()
            .try_single(format!("$A {eos_piece}"))
            .and_then(|b| {
                b.special_tokens(vec![(eos_piece.clone(), eos_id)])
                    .build()
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| Error::SpieceModel {
                reason: format!("EOS piece `{eos_piece}` (id {eos_id}) is unusable: {e}"),
            })?;
        inner.with_post_processor(Some(post));
        Ok(Self {
            inner,
            pad_id,
            max_length: MAX_LENGTH,
        })
    }

    /// Reads the `spiece_model` tensor (uint8 bytes of a SentencePiece model) from a
    /// text-encoder `.safetensors` file, as ComfyUI does for Wan, and builds the tokenizer from
    /// it. Only that tensor is read; the file is memory-mapped.
    pub fn from_checkpoint_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // SAFETY: the file is mapped read-only and must not be modified while mapped; the one
        // tensor read is copied out before the map is dropped.
        #[allow(unsafe_code)]
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path)? };
        let name = st
            .tensors()
            .into_iter()
            .map(|(name, _)| name)
            .filter(|n| n == "spiece_model" || n.ends_with(".spiece_model"))
            .min_by_key(String::len)
            .ok_or_else(|| Error::NoSpieceModel {
                path: path.to_path_buf(),
            })?;
        let t = st.load(&name, &Device::Cpu)?;
        if t.dtype() != candle_core::DType::U8 || t.rank() != 1 {
            return Err(Error::SpieceModel {
                reason: format!(
                    "{}: `{name}` is {:?} of shape {:?}, expected a 1-D uint8 tensor",
                    path.display(),
                    t.dtype(),
                    t.dims()
                ),
            });
        }
        Self::from_spiece_model(&t.to_vec1::<u8>()?)
    }

    /// Sets the padded length (512 by default, Wan's).
    pub fn with_max_length(mut self, max_length: usize) -> Self {
        self.max_length = max_length.max(1);
        self
    }

    /// The padded length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenises one prompt as given (see [`clean_prompt`] for Wan's cleaning): ids with EOS,
    /// truncated to the maximum length keeping EOS last, padded with the pad id.
    pub fn encode(&self, prompt: &str) -> Result<Encoded> {
        let tok_err = |source| Error::Tokenizer {
            context: "encode".to_string(),
            source,
        };
        let mut enc: Encoding = self.inner.encode(prompt, false).map_err(tok_err)?;
        let added = self
            .inner
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        let room = self.max_length.saturating_sub(added);
        let n = enc.len();
        let truncated = n > room;
        if truncated {
            tracing::warn!(
                dropped = n - room,
                tokens = n + added,
                max_length = self.max_length,
                "prompt longer than the text encoder's length: its last {} tokens are dropped",
                n - room
            );
            enc.truncate(room, 0, TruncationDirection::Right);
        }
        let enc = self.inner.post_process(enc, None, true).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        let true_len = ids.len().min(self.max_length);
        ids.truncate(self.max_length);
        let mut mask = vec![1; true_len];
        ids.resize(self.max_length, self.pad_id);
        mask.resize(self.max_length, 0);
        Ok(Encoded {
            ids,
            mask,
            true_len,
            truncated,
        })
    }
}
