//! A reader for the few fields of a SentencePiece `ModelProto` (sentencepiece_model.proto) that
//! the umT5 tokenizer needs, straight from the protobuf wire format.
//!
//! | message | field | number |
//! |---|---|---|
//! | ModelProto | pieces (repeated SentencePiece) | 1 |
//! | ModelProto | trainer_spec | 2 |
//! | ModelProto | normalizer_spec | 3 |
//! | SentencePiece | piece (string), score (float), type (enum, default NORMAL = 1) | 1, 2, 3 |
//! | TrainerSpec | model_type (UNIGRAM = 1), byte_fallback, unk_id, bos_id, eos_id, pad_id, treat_whitespace_as_suffix | 3, 35, 40, 41, 42, 43, 24 |
//! | NormalizerSpec | name, precompiled_charsmap, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces | 1, 2, 3, 4, 5 |
//!
//! Everything else is skipped by wire type.

use crate::{Error, Result};

/// `SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Option<Self> {
        Some(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone)]
pub(crate) struct Piece {
    pub(crate) piece: String,
    pub(crate) score: f32,
    pub(crate) kind: PieceType,
}

/// The parts of a `ModelProto` the tokenizer uses.
#[derive(Debug, Clone)]
pub(crate) struct SpModel {
    pub(crate) pieces: Vec<Piece>,
    pub(crate) model_type: i32,
    pub(crate) byte_fallback: bool,
    pub(crate) treat_whitespace_as_suffix: bool,
    pub(crate) unk_id: i32,
    pub(crate) eos_id: i32,
    pub(crate) pad_id: i32,
    pub(crate) normalizer_name: String,
    pub(crate) precompiled_charsmap: Vec<u8>,
    pub(crate) add_dummy_prefix: bool,
    pub(crate) remove_extra_whitespaces: bool,
    pub(crate) escape_whitespaces: bool,
}

fn fail<T>(reason: String) -> Result<T> {
    Err(Error::SpieceModel { reason })
}

/// A cursor over one message's bytes; `base` is its offset in the whole model, for errors.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize, what: &'static str) -> Self {
        Self {
            buf,
            pos: 0,
            base,
            what,
        }
    }

    fn truncated<T>(&self, reading: &str) -> Result<T> {
        fail(format!(
            "truncated or corrupt: {reading} in {} runs past its end (byte {} of the model)",
            self.what,
            self.base + self.buf.len()
        ))
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.buf.get(self.pos) else {
                return self.truncated("a varint");
            };
            self.pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        fail(format!(
            "corrupt: a varint longer than 10 bytes in {} at byte {}",
            self.what,
            self.base + self.pos
        ))
    }

    /// The next field's number and wire type, or `None` at the end of the message.
    fn key(&mut self) -> Result<Option<(u64, u8)>> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        Ok(Some((key >> 3, (key & 7) as u8)))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() - self.pos {
            return self.truncated(&format!("a {n}-byte field"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A length-delimited field's bytes and their offset in the model.
    fn len_delimited(&mut self) -> Result<(&'a [u8], usize)> {
        let n = self.varint()? as usize;
        let at = self.base + self.pos;
        Ok((self.bytes(n)?, at))
    }

    fn fixed32(&mut self) -> Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn skip(&mut self, field: u64, wire: u8) -> Result<()> {
        match wire {
            0 => drop(self.varint()?),
            1 => drop(self.bytes(8)?),
            2 => drop(self.len_delimited()?),
            5 => drop(self.fixed32()?),
            _ => {
                return fail(format!(
                    "corrupt: field {field} of {} has wire type {wire} (byte {})",
                    self.what,
                    self.base + self.pos
                ))
            }
        }
        Ok(())
    }

    /// Checks that a field has the wire type its schema gives it.
    fn expect(&self, field: u64, wire: u8, want: u8) -> Result<()> {
        if wire == want {
            Ok(())
        } else {
            fail(format!(
                "not a SentencePiece model: field {field} of {} has wire type {wire}, expected \
                 {want} (byte {})",
                self.what,
                self.base + self.pos
            ))
        }
    }
}

fn utf8(bytes: &[u8], at: usize, what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).or_else(|_| fail(format!("{what} at byte {at} is not UTF-8")))
}

fn parse_piece(buf: &[u8], base: usize) -> Result<Piece> {
    let mut r = Reader::new(buf, base, "a vocabulary piece");
    let mut p = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => {
                r.expect(field, wire, 2)?;
                let (s, at) = r.len_delimited()?;
                p.piece = utf8(s, at, "a piece")?;
            }
            2 => {
                r.expect(field, wire, 5)?;
                p.score = f32::from_bits(r.fixed32()?);
            }
            3 => {
                r.expect(field, wire, 0)?;
                let v = r.varint()?;
                p.kind = PieceType::from_proto(v).ok_or_else(|| Error::SpieceModel {
                    reason: format!("piece at byte {base} has unknown type {v}"),
                })?;
            }
            _ => r.skip(field, wire)?,
        }
    }
    Ok(p)
}

/// Parses a serialised `ModelProto`.
pub(crate) fn parse(bytes: &[u8]) -> Result<SpModel> {
    let mut m = SpModel {
        pieces: vec![],
        model_type: 1,
        byte_fallback: false,
        treat_whitespace_as_suffix: false,
        unk_id: 0,
        eos_id: 2,
        pad_id: -1,
        normalizer_name: String::new(),
        precompiled_charsmap: vec![],
        add_dummy_prefix: true,
        remove_extra_whitespaces: true,
        escape_whitespaces: true,
    };
    let (mut has_trainer, mut has_normalizer) = (false, false);
    let mut r = Reader::new(bytes, 0, "ModelProto");
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => {
                r.expect(field, wire, 2)?;
                let (b, at) = r.len_delimited()?;
                m.pieces.push(parse_piece(b, at)?);
            }
            2 => {
                r.expect(field, wire, 2)?;
                let (b, at) = r.len_delimited()?;
                has_trainer = true;
                let mut t = Reader::new(b, at, "trainer_spec");
                while let Some((field, wire)) = t.key()? {
                    // Varint-encoded int32: negative values are sign-extended to 64 bits.
                    match (field, wire) {
                        (3, 0) => m.model_type = t.varint()? as i64 as i32,
                        (24, 0) => m.treat_whitespace_as_suffix = t.varint()? != 0,
                        (35, 0) => m.byte_fallback = t.varint()? != 0,
                        (40, 0) => m.unk_id = t.varint()? as i64 as i32,
                        (42, 0) => m.eos_id = t.varint()? as i64 as i32,
                        (43, 0) => m.pad_id = t.varint()? as i64 as i32,
                        _ => t.skip(field, wire)?,
                    }
                }
            }
            3 => {
                r.expect(field, wire, 2)?;
                let (b, at) = r.len_delimited()?;
                has_normalizer = true;
                let mut n = Reader::new(b, at, "normalizer_spec");
                while let Some((field, wire)) = n.key()? {
                    match (field, wire) {
                        (1, 2) => {
                            let (s, at) = n.len_delimited()?;
                            m.normalizer_name = utf8(s, at, "the normalizer name")?;
                        }
                        (2, 2) => m.precompiled_charsmap = n.len_delimited()?.0.to_vec(),
                        (3, 0) => m.add_dummy_prefix = n.varint()? != 0,
                        (4, 0) => m.remove_extra_whitespaces = n.varint()? != 0,
                        (5, 0) => m.escape_whitespaces = n.varint()? != 0,
                        _ => n.skip(field, wire)?,
                    }
                }
            }
            _ => r.skip(field, wire)?,
        }
    }
    if m.pieces.is_empty() {
        return fail(format!(
            "no vocabulary pieces in {} bytes: not a SentencePiece ModelProto",
            bytes.len()
        ));
    }
    for (has, name) in [
        (has_trainer, "trainer_spec (field 2)"),
        (has_normalizer, "normalizer_spec (field 3)"),
    ] {
        if !has {
            return fail(format!(
                "no {name} after {} pieces: the model is truncated or not a SentencePiece model",
                m.pieces.len()
            ));
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-encoded: two pieces, a trainer spec with eos_id 1 and unk_id 2 (negative pad_id),
    /// a normalizer spec with a name and add_dummy_prefix false, and an unknown field to skip.
    #[test]
    fn parses_hand_encoded_model() {
        let mut b = vec![];
        // pieces: {piece: "a", score: -1.5, type: 2}, {piece: "▁"}
        let p1 = [
            &[0x0a, 0x01, b'a', 0x15][..],
            &(-1.5f32).to_le_bytes(),
            &[0x18, 0x02],
        ]
        .concat();
        b.extend([0x0a, p1.len() as u8]);
        b.extend(&p1);
        let p2 = [&[0x0a, 0x03][..], "▁".as_bytes()].concat();
        b.extend([0x0a, p2.len() as u8]);
        b.extend(&p2);
        // trainer_spec: eos_id (42) = 1, unk_id (40) = 2, pad_id (43) = -1, byte_fallback (35) = 1
        let mut t = vec![0xd0, 0x02, 0x01, 0xc0, 0x02, 0x02, 0xd8, 0x02];
        t.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        t.extend([0x98, 0x02, 0x01]);
        b.extend([0x12, t.len() as u8]);
        b.extend(&t);
        // unknown field 9, fixed64
        b.extend([0x49, 1, 2, 3, 4, 5, 6, 7, 8]);
        // normalizer_spec: name "x", add_dummy_prefix false
        b.extend([0x1a, 0x05, 0x0a, 0x01, b'x', 0x18, 0x00]);
        let m = parse(&b).unwrap();
        assert_eq!(m.pieces.len(), 2);
        assert_eq!(m.pieces[0].piece, "a");
        assert_eq!(m.pieces[0].score, -1.5);
        assert_eq!(m.pieces[0].kind, PieceType::Unknown);
        assert_eq!(m.pieces[1].piece, "▁");
        assert_eq!(m.pieces[1].kind, PieceType::Normal);
        assert_eq!((m.eos_id, m.unk_id, m.pad_id), (1, 2, -1));
        assert!(m.byte_fallback);
        assert_eq!(m.normalizer_name, "x");
        assert!(!m.add_dummy_prefix);
        assert!(m.remove_extra_whitespaces);

        let err = parse(&b[..b.len() - 3]).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
