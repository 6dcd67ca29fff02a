//! The safetensors header, read and checked without touching tensor data.
//!
//! Layout (<https://github.com/huggingface/safetensors>, "Format"): an 8-byte little-endian header
//! length `n`, `n` bytes of UTF-8 JSON mapping each tensor name to `{dtype, shape, data_offsets}`
//! (offsets relative to the end of the header) plus an optional `__metadata__` string map, then
//! the tensor bytes. The `safetensors` crate's own check, `SafeTensors::read_metadata`, needs the
//! whole file in memory (it compares the offsets with the buffer length), so the same rules are
//! applied here against the file size instead, each failure with its own error.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::{ByteRange, DType, InspectError, TensorInfo};

/// Largest header the safetensors format accepts (`safetensors` crate, `MAX_HEADER_SIZE`).
pub(crate) const MAX_HEADER_SIZE: u64 = 100_000_000;

/// What the header says.
#[derive(Debug)]
pub(crate) struct Header {
    /// `8 + n`: where the data section starts.
    pub(crate) data_start: u64,
    pub(crate) metadata: Option<BTreeMap<String, String>>,
    /// Tensors in header order.
    pub(crate) tensors: Vec<TensorInfo>,
}

/// Reads the 8-byte length and the JSON header from `file` (positioned at 0) and checks every
/// entry against `file_size`. Reads exactly `8 + n` bytes.
pub(crate) fn read_header(
    path: &Path,
    file: &mut impl Read,
    file_size: u64,
) -> Result<Header, InspectError> {
    if file_size < 8 {
        return Err(InspectError::Truncated {
            path: path.to_owned(),
            file_size,
        });
    }
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|error| InspectError::Io {
            path: path.to_owned(),
            error,
        })?;
    let header_len = u64::from_le_bytes(len);
    if header_len > file_size {
        return Err(InspectError::HeaderPastEnd {
            path: path.to_owned(),
            header_len,
            file_size,
        });
    }
    if header_len > file_size - 8 {
        return Err(InspectError::HeaderTruncated {
            path: path.to_owned(),
            header_len,
            file_size,
        });
    }
    if header_len > MAX_HEADER_SIZE {
        return Err(InspectError::HeaderTooLarge {
            path: path.to_owned(),
            header_len,
            limit: MAX_HEADER_SIZE,
        });
    }
    // header_len <= MAX_HEADER_SIZE, so it fits in usize and is a bounded allocation.
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|error| InspectError::Io {
            path: path.to_owned(),
            error,
        })?;
    parse_header(path, &header, file_size)
}

/// Checks a header (the `n` JSON bytes) of a file of `file_size` bytes.
pub(crate) fn parse_header(
    path: &Path,
    header: &[u8],
    file_size: u64,
) -> Result<Header, InspectError> {
    let p = || path.to_owned();
    let text = std::str::from_utf8(header).map_err(|e| InspectError::HeaderNotUtf8 {
        path: p(),
        valid_up_to: e.valid_up_to(),
    })?;
    // The entries are read straight into their typed form (no `serde_json::Value` tree, which
    // takes ~16× the header's size in memory); `current` names the entry being read so that an
    // error in it can say which.
    let current = RefCell::new(None);
    let mut json = serde_json::Deserializer::from_str(text);
    let entries = EntriesSeed { current: &current }
        .deserialize(&mut json)
        .and_then(|entries| json.end().map(|()| entries))
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Data => InspectError::HeaderInvalid {
                path: p(),
                reason: match current.borrow().as_deref() {
                    Some(METADATA_KEY) => format!(
                        "__metadata__ must map strings to strings: {}",
                        one_line(&e.to_string())
                    ),
                    Some(name) => format!("tensor {name:?}: {}", one_line(&e.to_string())),
                    None => one_line(&e.to_string()),
                },
            },
            _ => InspectError::HeaderNotJson {
                path: p(),
                reason: one_line(&e.to_string()),
            },
        })?;

    let data_start = 8 + header.len() as u64;
    let data_len = file_size.saturating_sub(data_start);
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut seen = HashSet::new();
    for (name, entry) in entries {
        if !seen.insert(name.clone()) {
            return Err(InspectError::HeaderInvalid {
                path: p(),
                reason: format!("the name {name:?} appears twice"),
            });
        }
        let raw = match entry {
            Entry::Metadata(map) => {
                metadata = Some(map);
                continue;
            }
            Entry::Tensor(raw) => raw,
        };
        let Some(dtype) = DType::from_safetensors_name(&raw.dtype) else {
            return Err(InspectError::UnknownDtype {
                path: p(),
                tensor: name,
                dtype: raw.dtype,
            });
        };
        let [begin, end] = raw.data_offsets;
        if end < begin {
            return Err(InspectError::OffsetsReversed {
                path: p(),
                tensor: name,
                begin,
                end,
            });
        }
        let expected = numel(&raw.shape).and_then(|n| dtype.bytes_for(n));
        if expected != Some(end - begin) {
            return Err(InspectError::SizeMismatch {
                path: p(),
                tensor: name,
                dtype,
                shape: raw.shape,
                expected,
                actual: end - begin,
            });
        }
        if end > data_len {
            return Err(InspectError::OffsetsOutOfRange {
                path: p(),
                tensor: name,
                begin,
                end,
                abs_end: data_start.saturating_add(end),
                file_size,
            });
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            shape: raw.shape,
            data: ByteRange {
                start: data_start + begin,
                end: data_start + end,
            },
            pth: None,
        });
    }

    // Tensors must tile the data section exactly: no overlaps, no holes, nothing after the end.
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| (t.data.start, t.data.end));
    let mut covered = data_start;
    let mut last: Option<&TensorInfo> = None;
    for t in order {
        if t.data.start < covered {
            // `last` is set: covered only moves past data_start after a tensor.
            if let Some(prev) = last {
                return Err(InspectError::Overlap {
                    path: p(),
                    first: prev.name.clone(),
                    first_begin: prev.data.start - data_start,
                    first_end: prev.data.end - data_start,
                    second: t.name.clone(),
                    second_begin: t.data.start - data_start,
                    second_end: t.data.end - data_start,
                });
            }
        }
        if t.data.start > covered {
            return Err(InspectError::Gap {
                path: p(),
                at: covered - data_start,
                len: t.data.start - covered,
            });
        }
        if t.data.end >= covered {
            covered = t.data.end;
            last = Some(t);
        }
    }
    if covered - data_start < data_len {
        return Err(InspectError::Gap {
            path: p(),
            at: covered - data_start,
            len: data_len - (covered - data_start),
        });
    }
    Ok(Header {
        data_start,
        metadata,
        tensors,
    })
}

/// Element count of a shape, `None` on overflow.
pub(crate) fn numel(shape: &[usize]) -> Option<u64> {
    shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The key of the header's string map.
const METADATA_KEY: &str = "__metadata__";

/// Most dimensions a tensor may have: far above any model's (Wan's largest is 5), and it bounds
/// what a hostile header can make this reader allocate per tensor.
pub(crate) const MAX_RANK: usize = 64;

/// One tensor entry as written.
#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    #[serde(deserialize_with = "bounded_shape")]
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// A header entry: the metadata map or a tensor.
enum Entry {
    Metadata(BTreeMap<String, String>),
    Tensor(RawEntry),
}

/// Reads the header object's entries in file order (a map type would sort them and merge
/// duplicate names silently), recording in `current` the name of the entry being read.
struct EntriesSeed<'a> {
    current: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Vec<(String, Entry)>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = Vec<(String, Entry)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object mapping tensor names to entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            *self.current.borrow_mut() = Some(name.clone());
            let entry = if name == METADATA_KEY {
                Entry::Metadata(map.next_value()?)
            } else {
                Entry::Tensor(map.next_value()?)
            };
            *self.current.borrow_mut() = None;
            out.push((name, entry));
        }
        Ok(out)
    }
}

/// A shape of at most [`MAX_RANK`] dimensions, refused as soon as the limit is passed.
fn bounded_shape<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<usize>, D::Error> {
    struct Shape;
    impl<'de> Visitor<'de> for Shape {
        type Value = Vec<usize>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a list of at most {MAX_RANK} dimension sizes")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<usize>, A::Error> {
            let mut dims = Vec::new();
            while let Some(n) = seq.next_element::<usize>()? {
                if dims.len() == MAX_RANK {
                    return Err(de::Error::custom(format_args!(
                        "the shape has more than {MAX_RANK} dimensions"
                    )));
                }
                dims.push(n);
            }
            Ok(dims)
        }
    }
    d.deserialize_seq(Shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, data_len: u64) -> Result<Header, InspectError> {
        parse_header(
            Path::new("x.safetensors"),
            json.as_bytes(),
            8 + json.len() as u64 + data_len,
        )
    }

    #[test]
    fn zero_sized_tensors_and_order() {
        // Header order is kept; a zero-element tensor takes no bytes and may share an offset.
        let h = parse(
            r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                "e":{"dtype":"BF16","shape":[0,3],"data_offsets":[8,8]},
                "a":{"dtype":"U8","shape":[],"data_offsets":[8,9]},
                "__metadata__":{"format":"pt"}}"#,
            9,
        )
        .unwrap();
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "e", "a"]);
        assert_eq!(h.metadata.unwrap()["format"], "pt");
        assert_eq!(h.tensors[2].data.len(), 1);
    }

    #[test]
    fn metadata_must_be_strings() {
        let e = parse(r#"{"__metadata__":{"n":1}}"#, 0).unwrap_err();
        assert!(matches!(e, InspectError::HeaderInvalid { .. }), "{e}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let e = parse(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},
                "a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            2,
        )
        .unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
    }

    #[test]
    fn shape_overflow_is_a_size_mismatch() {
        let e = parse(
            r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,1]}}"#,
            1,
        )
        .unwrap_err();
        assert!(
            matches!(e, InspectError::SizeMismatch { expected: None, .. }),
            "{e}"
        );
    }
}
