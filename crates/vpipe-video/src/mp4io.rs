//! H.264 in MP4: `mp4` demux/mux around OpenH264 decode/encode.
//!
//! The `mp4` crate parses only the sample entries it knows (avc1, hev1, vp09, mp4a, tx3g) and
//! silently drops the rest, so a small box walker here finds what each track really holds, to
//! name it in errors; it also finds boxes that run past the end of a truncated file before the
//! `mp4` parser turns that into a generic message.

use std::io::{Cursor, Seek, Write};
use std::path::Path;

use openh264::decoder::{DecodedYUV, Decoder, DecoderConfig, Flush};
use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, FrameType, VuiConfig};
use openh264::formats::{RgbSliceU8, YUVBuffer, YUVSource};
use openh264::{OpenH264API, Timestamp};

use crate::error::{Result, VideoError};
use crate::limits::ReadLimits;
use crate::video::Video;

/// What an MP4's header says about its first video track, without decoding it.
#[derive(Debug, Clone, PartialEq)]
pub struct Mp4Info {
    /// Track id of the video track.
    pub track_id: u32,
    /// Sample entry four-character code (`"avc1"` for H.264).
    pub codec: String,
    /// Coded width from the sample entry.
    pub width: u32,
    /// Coded height from the sample entry.
    pub height: u32,
    /// Number of samples (frames) in the track.
    pub frames: usize,
    /// Frames per second: track timescale / sample delta, or frames / track duration when the
    /// deltas vary.
    pub fps: f64,
    /// Track duration in seconds (`mdhd` duration / `mdhd` timescale).
    pub track_duration_secs: f64,
    /// Movie duration in seconds (`mvhd` duration / `mvhd` timescale).
    pub movie_duration_secs: f64,
    /// H.264 `profile_idc` from the SPS (66 Baseline, 77 Main, 100 High, ...).
    pub profile_idc: u8,
}

// ---------------------------------------------------------------------------------------------
// Box walking

struct RawBox {
    kind: [u8; 4],
    /// Where the box's header begins.
    start: usize,
    body: std::ops::Range<usize>,
}

/// Big-endian `u32` at `at`, `None` past the end.
fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Four-character code at `at`, `None` past the end.
fn fourcc_at(buf: &[u8], at: usize) -> Option<[u8; 4]> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some([b[0], b[1], b[2], b[3]])
}

fn fourcc(kind: &[u8; 4]) -> String {
    kind.iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

/// Boxes inside `range` of `buf`; a box that runs past `range` is an error telling how far.
fn boxes(buf: &[u8], range: std::ops::Range<usize>) -> std::result::Result<Vec<RawBox>, String> {
    let mut out = Vec::new();
    let mut pos = range.start;
    if range.end > buf.len() || range.start > range.end {
        return Err(format!(
            "box range {range:?} lies outside the {} bytes of the file",
            buf.len()
        ));
    }
    while pos < range.end {
        let stray = || {
            format!(
                "{} stray bytes at byte {pos} where a box header (8 bytes) should be",
                range.end - pos
            )
        };
        if range.end - pos < 8 {
            return Err(stray());
        }
        let size32 = u64::from(be_u32(buf, pos).ok_or_else(stray)?);
        let kind = fourcc_at(buf, pos + 4).ok_or_else(stray)?;
        let (header, size) = match size32 {
            0 => (8u64, (range.end - pos) as u64),
            1 => {
                let large = (range.end - pos >= 16)
                    .then(|| {
                        Some(
                            (u64::from(be_u32(buf, pos + 8)?) << 32)
                                | u64::from(be_u32(buf, pos + 12)?),
                        )
                    })
                    .flatten();
                let Some(s) = large else {
                    return Err(format!(
                        "box '{}' at byte {pos} has a 64-bit size the data ends before",
                        fourcc(&kind)
                    ));
                };
                (16, s)
            }
            s => (8, s),
        };
        if size < header {
            return Err(format!(
                "box '{}' at byte {pos} declares size {size}, smaller than its header",
                fourcc(&kind)
            ));
        }
        let available = (range.end - pos) as u64;
        if size > available {
            return Err(format!(
                "box '{}' at byte {pos} declares {size} bytes but only {available} remain",
                fourcc(&kind)
            ));
        }
        // `size <= available`, a `usize`: neither conversion nor sum can overflow.
        let end = pos + size as usize;
        out.push(RawBox {
            kind,
            start: pos,
            body: pos + header as usize..end,
        });
        pos = end;
    }
    Ok(out)
}

fn child<'a>(list: &'a [RawBox], kind: &[u8; 4]) -> Option<&'a RawBox> {
    list.iter().find(|b| &b.kind == kind)
}

/// One `trak` as the walker sees it.
struct TrackSummary {
    id: u32,
    handler: [u8; 4],
    entry: Option<[u8; 4]>,
}

fn summarise_track(buf: &[u8], trak: &RawBox) -> std::result::Result<TrackSummary, String> {
    let kids = boxes(buf, trak.body.clone())?;
    let id = child(&kids, b"tkhd")
        .and_then(|tkhd| {
            let b = buf.get(tkhd.body.clone())?;
            let off = if b.first() == Some(&1) { 20 } else { 12 };
            be_u32(b, off)
        })
        .unwrap_or(0);
    let mdia = child(&kids, b"mdia").ok_or_else(|| format!("track {id} has no mdia box"))?;
    let mdia_kids = boxes(buf, mdia.body.clone())?;
    let handler = child(&mdia_kids, b"hdlr")
        .and_then(|h| fourcc_at(buf.get(h.body.clone())?, 8))
        .unwrap_or(*b"????");
    let entry = (|| {
        let minf = child(&mdia_kids, b"minf")?;
        let minf_kids = boxes(buf, minf.body.clone()).ok()?;
        let stbl = child(&minf_kids, b"stbl")?;
        let stbl_kids = boxes(buf, stbl.body.clone()).ok()?;
        let stsd = child(&stbl_kids, b"stsd")?;
        // Full box header (4) + entry count (4), then the first entry's size (4) and type (4).
        fourcc_at(buf.get(stsd.body.clone())?, 12)
    })();
    Ok(TrackSummary { id, handler, entry })
}

fn codec_name(entry: &[u8; 4]) -> &'static str {
    match entry {
        b"mp4v" => "MPEG-4 Part 2 Visual",
        b"hvc1" | b"hev1" => "H.265/HEVC",
        b"vp08" => "VP8",
        b"vp09" => "VP9",
        b"av01" => "AV1",
        b"s263" | b"h263" => "H.263",
        b"avc3" | b"avc4" => "H.264 with in-band parameter sets",
        b"jpeg" | b"mjpa" | b"mjpb" => "Motion JPEG",
        b"apch" | b"apcn" | b"apcs" | b"apco" | b"ap4h" => "Apple ProRes",
        b"encv" => "an encrypted video stream",
        _ => "an unknown codec",
    }
}

fn profile_name(idc: u8) -> &'static str {
    match idc {
        44 => "CAVLC 4:4:4 Intra",
        66 => "Baseline",
        77 => "Main",
        88 => "Extended",
        100 => "High",
        110 => "High 10",
        122 => "High 4:2:2",
        244 => "High 4:4:4 Predictive",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

struct Opened {
    info: Mp4Info,
    length_size: usize,
    sps: Vec<Vec<u8>>,
    pps: Vec<Vec<u8>>,
    /// The video track's sample tables.
    tables: SampleTables,
}

/// The parts of a track's sample tables that locate its samples in the file.
struct SampleTables {
    /// `stsz`: one size for every sample when non-zero, else `sample_sizes`.
    sample_size: u32,
    sample_sizes: Vec<u32>,
    /// `stsc`: (first chunk, 1-based; samples per chunk) runs.
    chunk_runs: Vec<(u32, u32)>,
    /// `stco` or `co64`; `None` when the track has neither.
    chunk_offsets: Option<Vec<u64>>,
}

fn malformed(path: &Path, e: impl std::fmt::Display) -> VideoError {
    VideoError::Malformed {
        path: path.to_path_buf(),
        format: "MP4",
        detail: e.to_string(),
    }
}

/// Parses the `moov` box alone with the `mp4` crate.
///
/// Only `moov` is handed over: the crate's readers of other top-level boxes (`emsg`, `moof`)
/// size buffers by unchecked subtraction. Its sample reader is not used either (sample offsets
/// are resolved by [`sample_ranges`]), as it unwraps and divides by table entries. A panic
/// left in the crate's parsing of hostile data is caught and reported as a malformed file rather
/// than taking the process down.
fn parse_moov(path: &Path, bytes: &[u8], moov: &RawBox) -> Result<mp4::MoovBox> {
    use mp4::ReadBox;
    let body = bytes
        .get(moov.body.clone())
        .ok_or_else(|| malformed(path, "'moov' box lies outside the file"))?;
    // The crate expects the stream positioned after an 8-byte header whose size field is the
    // box's; a 64-bit or "to end of file" header is rewritten into that form.
    let size = u32::try_from(body.len() + 8)
        .map_err(|_| malformed(path, "'moov' box is larger than 4 GiB"))?;
    let header_is_plain =
        moov.body.start - moov.start == 8 && be_u32(bytes, moov.start) == Some(size);
    let rewritten;
    let boxed: &[u8] = if header_is_plain {
        bytes.get(moov.start..moov.body.end).unwrap_or_default()
    } else {
        let mut copy = Vec::with_capacity(body.len() + 8);
        copy.extend_from_slice(&size.to_be_bytes());
        copy.extend_from_slice(b"moov");
        copy.extend_from_slice(body);
        rewritten = copy;
        &rewritten
    };
    let parsed = std::panic::catch_unwind(|| {
        let mut cursor = Cursor::new(boxed);
        cursor.set_position(8);
        let mut reader = BudgetedReader::new(cursor, boxed.len());
        mp4::MoovBox::read_box(&mut reader, u64::from(size))
    });
    match parsed {
        Ok(Ok(moov)) => Ok(moov),
        Ok(Err(e)) => Err(malformed(path, e)),
        Err(_) => Err(malformed(
            path,
            "the MP4 parser failed on the 'moov' box (inconsistent sizes or counts)",
        )),
    }
}

/// A cursor that fails once the parser has made far more reads and seeks than parsing the data
/// once needs. The `mp4` crate loops forever on a nested box of declared size 0 (it seeks back
/// to the box it just read); this turns such a loop into an error.
struct BudgetedReader<'a> {
    inner: Cursor<&'a [u8]>,
    /// Operations left: each read or seek costs 1, plus 1 per byte read.
    budget: u64,
}

impl<'a> BudgetedReader<'a> {
    fn new(inner: Cursor<&'a [u8]>, len: usize) -> Self {
        // One pass reads every byte at most once and seeks about twice per box (>= 8 bytes):
        // four times the length is a wide margin for a real file.
        const SLACK: u64 = 1 << 16;
        let budget = (len as u64).saturating_mul(4).saturating_add(SLACK);
        Self { inner, budget }
    }

    fn spend(&mut self, cost: u64) -> std::io::Result<()> {
        self.budget = self.budget.checked_sub(cost).ok_or_else(|| {
            std::io::Error::other("the MP4 box structure makes the parser loop (a box of size 0?)")
        })?;
        Ok(())
    }
}

impl std::io::Read for BudgetedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.spend(1)?;
        let n = self.inner.read(buf)?;
        self.spend(n as u64)?;
        Ok(n)
    }
}

impl Seek for BudgetedReader<'_> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.spend(1)?;
        self.inner.seek(pos)
    }
}

fn open(path: &Path, bytes: &[u8], limits: &ReadLimits) -> Result<Opened> {
    let truncated = |detail: String| VideoError::Truncated {
        path: path.to_path_buf(),
        detail,
    };
    let top = boxes(bytes, 0..bytes.len()).map_err(truncated)?;
    let moov = child(&top, b"moov").ok_or_else(|| {
        malformed(
            path,
            format!(
                "no 'moov' box (top-level boxes: {}); an unfinished recording or not an MP4",
                top.iter()
                    .map(|b| fourcc(&b.kind))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let moov_kids = boxes(bytes, moov.body.clone()).map_err(|e| malformed(path, e))?;
    let tracks = moov_kids
        .iter()
        .filter(|b| &b.kind == b"trak")
        .map(|t| summarise_track(bytes, t))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| malformed(path, e))?;
    let Some(video) = tracks.iter().find(|t| &t.handler == b"vide") else {
        let found = if tracks.is_empty() {
            "no tracks".to_string()
        } else {
            tracks
                .iter()
                .map(|t| {
                    format!(
                        "track {}: {} ({})",
                        t.id,
                        fourcc(&t.handler),
                        t.entry.map_or("no sample entry".into(), |e| fourcc(&e))
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(VideoError::NoVideoTrack {
            path: path.to_path_buf(),
            found,
        });
    };
    match video.entry {
        Some(e) if &e == b"avc1" => {}
        other => {
            return Err(VideoError::UnsupportedCodec {
                path: path.to_path_buf(),
                track: video.id,
                codec: match other {
                    Some(e) => format!("{} ({})", fourcc(&e), codec_name(&e)),
                    None => "no sample description".into(),
                },
            })
        }
    }
    if child(&top, b"moof").is_some() {
        return Err(VideoError::UnsupportedInput {
            path: path.to_path_buf(),
            found: "a fragmented MP4 (samples in 'moof' fragments); remux it first, e.g. \
                    `ffmpeg -i IN -c copy OUT.mp4`"
                .into(),
        });
    }
    let track_id = video.id;

    let moov = parse_moov(path, bytes, moov)?;
    let mvhd = &moov.mvhd;
    let movie_duration_secs = if mvhd.timescale > 0 {
        mvhd.duration as f64 / mvhd.timescale as f64
    } else {
        0.0
    };
    let trak = moov
        .traks
        .into_iter()
        .find(|t| t.tkhd.track_id == track_id)
        .ok_or_else(|| malformed(path, format!("track {track_id} not parsed")))?;
    let mdhd = trak.mdia.mdhd;
    let mut stbl = trak.mdia.minf.stbl;
    let avc1 = stbl
        .stsd
        .avc1
        .as_ref()
        .ok_or_else(|| malformed(path, format!("track {track_id}: avc1 entry not parsed")))?;
    let avcc = &avc1.avcc;
    let sps: Vec<Vec<u8>> = avcc
        .sequence_parameter_sets
        .iter()
        .map(|n| n.bytes.clone())
        .collect();
    let pps: Vec<Vec<u8>> = avcc
        .picture_parameter_sets
        .iter()
        .map(|n| n.bytes.clone())
        .collect();
    let Some(first_sps) = sps.first().filter(|_| !pps.is_empty()) else {
        return Err(malformed(
            path,
            format!(
                "avcC of track {track_id} holds {} SPS and {} PPS; both are needed",
                sps.len(),
                pps.len()
            ),
        ));
    };
    let profile_idc = first_sps
        .get(1)
        .copied()
        .unwrap_or(avcc.avc_profile_indication);
    if matches!(profile_idc, 44 | 110 | 122 | 244) {
        return Err(VideoError::UnsupportedProfile {
            path: path.to_path_buf(),
            profile_idc,
            profile: profile_name(profile_idc).into(),
        });
    }

    let timescale = mdhd.timescale;
    let frames = stbl.stsz.sample_count;
    if frames == 0 {
        return Err(malformed(
            path,
            format!("video track {track_id} has no samples"),
        ));
    }
    let (width, height) = (u32::from(avc1.width), u32::from(avc1.height));
    // The declared sizes, before anything is sized by them: the sample entry's, then each
    // SPS's (what the decoder allocates by).
    limits.check(
        path,
        "MP4",
        u64::from(width),
        u64::from(height),
        Some(u64::from(frames)),
    )?;
    for nal in &sps {
        check_sps_size(path, nal, u64::from(frames), limits)?;
    }
    let frames = usize::try_from(frames).map_err(|_| malformed(path, "too many samples"))?;
    if timescale == 0 {
        return Err(malformed(path, "track timescale is 0"));
    }
    let track_duration_secs = mdhd.duration as f64 / timescale as f64;
    let stts = &stbl.stts.entries;
    let fps = match stts.first() {
        Some(first)
            if first.sample_delta > 0
                && stts.iter().all(|e| e.sample_delta == first.sample_delta) =>
        {
            timescale as f64 / first.sample_delta as f64
        }
        _ if track_duration_secs > 0.0 => frames as f64 / track_duration_secs,
        _ => {
            return Err(malformed(
                path,
                "cannot derive a frame rate: no sample durations",
            ))
        }
    };
    let info = Mp4Info {
        track_id,
        codec: "avc1".into(),
        width,
        height,
        frames,
        fps,
        track_duration_secs,
        movie_duration_secs,
        profile_idc,
    };
    let length_size = usize::from(avcc.length_size_minus_one & 3) + 1;
    let tables = SampleTables {
        sample_size: stbl.stsz.sample_size,
        sample_sizes: std::mem::take(&mut stbl.stsz.sample_sizes),
        chunk_runs: stbl
            .stsc
            .entries
            .iter()
            .map(|e| (e.first_chunk, e.samples_per_chunk))
            .collect(),
        chunk_offsets: match (stbl.stco.take(), stbl.co64.take()) {
            (Some(stco), _) => Some(stco.entries.into_iter().map(u64::from).collect()),
            (None, Some(co64)) => Some(co64.entries),
            (None, None) => None,
        },
    };
    Ok(Opened {
        info,
        length_size,
        sps,
        pps,
        tables,
    })
}

pub(crate) fn probe(path: &Path, bytes: &[u8], limits: &ReadLimits) -> Result<Mp4Info> {
    open(path, bytes, limits).map(|o| o.info)
}

/// Where each of the first `count` samples lies in the file, from the sample tables (`stsz`
/// sizes, `stsc` samples per chunk, `stco`/`co64` chunk offsets), every sum checked and every
/// range inside the `file_len` bytes of the file.
fn sample_ranges(
    path: &Path,
    tables: &SampleTables,
    file_len: usize,
    count: usize,
) -> Result<Vec<std::ops::Range<usize>>> {
    let size_of = |i: usize| -> Option<u64> {
        if tables.sample_size > 0 {
            Some(u64::from(tables.sample_size))
        } else {
            tables.sample_sizes.get(i).map(|&s| u64::from(s))
        }
    };
    let Some(chunk_offsets) = &tables.chunk_offsets else {
        return Err(malformed(path, "no chunk offsets (stco or co64 box)"));
    };
    let runs = &tables.chunk_runs;
    if runs.first().map(|&(first_chunk, _)| first_chunk) != Some(1) {
        return Err(malformed(
            path,
            "the sample-to-chunk table (stsc) does not start at chunk 1",
        ));
    }
    // `count` was checked against the frame limit, so this is bounded.
    let mut ranges = Vec::with_capacity(count);
    let mut entry = 0usize;
    for (chunk_index, &chunk_offset) in chunk_offsets.iter().enumerate() {
        if ranges.len() == count {
            break;
        }
        let chunk = u64::try_from(chunk_index)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        while runs
            .get(entry + 1)
            .is_some_and(|&(first_chunk, _)| u64::from(first_chunk) <= chunk)
        {
            entry += 1;
        }
        let per_chunk = runs.get(entry).map_or(0, |&(_, per_chunk)| per_chunk);
        let mut offset = chunk_offset;
        for _ in 0..per_chunk {
            let i = ranges.len();
            if i == count {
                break;
            }
            let size = size_of(i).ok_or_else(|| {
                malformed(path, format!("sample {i} of {count} has no size (stsz)"))
            })?;
            let end = offset.checked_add(size).filter(|&e| e <= file_len as u64);
            let Some(end) = end else {
                return Err(VideoError::Truncated {
                    path: path.to_path_buf(),
                    detail: format!(
                        "sample {i} of {count} ({size} bytes at byte {offset}) lies past the end \
                         of the file ({file_len} bytes)"
                    ),
                });
            };
            // Both ends are at most `file_len`, a `usize`.
            ranges.push(offset as usize..end as usize);
            offset = end;
        }
    }
    if ranges.len() < count {
        return Err(malformed(
            path,
            format!(
                "the sample tables place only {} of {count} samples in chunks",
                ranges.len()
            ),
        ));
    }
    Ok(ranges)
}

const START_CODE: [u8; 4] = [0, 0, 0, 1];

/// Length-prefixed NAL units (AVCC) to start-code-prefixed (Annex B), appended to `out`.
fn avcc_to_annexb(
    sample: &[u8],
    length_size: usize,
    out: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    let mut pos = 0;
    while pos < sample.len() {
        let field = sample
            .get(pos..pos.saturating_add(length_size))
            .filter(|f| f.len() == length_size)
            .ok_or_else(|| {
                format!(
                    "{} trailing bytes, shorter than a NAL length field",
                    sample.len() - pos
                )
            })?;
        let len = field
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        pos += length_size;
        let nal = pos
            .checked_add(len)
            .and_then(|end| sample.get(pos..end))
            .ok_or_else(|| {
                format!(
                    "NAL unit of {len} bytes runs past the sample's end ({} bytes left)",
                    sample.len() - pos
                )
            })?;
        out.extend_from_slice(&START_CODE);
        out.extend_from_slice(nal);
        pos += len;
    }
    Ok(())
}

/// NAL units of an Annex B stream as the decoder splits it, at every `00 00 01` start code.
fn annexb_nal_units(stream: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let ends: Vec<usize> = starts
        .iter()
        .skip(1)
        .map(|&s| s - 3)
        .chain(std::iter::once(stream.len()))
        .collect();
    starts
        .into_iter()
        .zip(ends)
        .filter_map(move |(s, e)| stream.get(s..e.max(s)))
}

/// Checks the frame size an SPS NAL unit declares against the limits. Every SPS reaches this
/// before the decoder sees it: OpenH264 sizes its picture buffers by it.
fn check_sps_size(path: &Path, nal: &[u8], frames: u64, limits: &ReadLimits) -> Result<()> {
    let (width, height) = sps_coded_size(nal).ok_or_else(|| {
        malformed(
            path,
            "cannot read the frame size from an H.264 sequence parameter set (SPS)",
        )
    })?;
    limits.check(path, "H.264 SPS", width, height, Some(frames))?;
    Ok(())
}

/// Whether a NAL unit is a sequence parameter set (7) or a subset SPS (15), which begins with
/// the same fields.
fn is_sps(nal: &[u8]) -> bool {
    matches!(nal.first().map(|b| b & 0x1f), Some(7 | 15))
}

/// Reads Exp-Golomb and fixed-width fields of an H.264 RBSP (emulation prevention removed).
struct BitReader {
    bytes: Vec<u8>,
    bit: usize,
}

impl BitReader {
    /// Reads a NAL unit's payload (after its one-byte header), dropping the `03` of every
    /// `00 00 03` emulation prevention sequence.
    fn from_nal(nal: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(nal.len());
        let mut zeros = 0;
        for &b in nal.iter().skip(1) {
            if zeros >= 2 && b == 3 {
                zeros = 0;
                continue;
            }
            zeros = if b == 0 { zeros + 1 } else { 0 };
            bytes.push(b);
        }
        Self { bytes, bit: 0 }
    }

    fn flag(&mut self) -> Option<bool> {
        let byte = *self.bytes.get(self.bit / 8)?;
        let value = (byte >> (7 - self.bit % 8)) & 1 == 1;
        self.bit += 1;
        Some(value)
    }

    fn bits(&mut self, n: u32) -> Option<u64> {
        (0..n).try_fold(0u64, |acc, _| Some((acc << 1) | u64::from(self.flag()?)))
    }

    /// Unsigned Exp-Golomb `ue(v)`; values past 32 bits are malformed in every field read here.
    fn ue(&mut self) -> Option<u64> {
        let mut leading_zeros = 0;
        while !self.flag()? {
            leading_zeros += 1;
            if leading_zeros > 32 {
                return None;
            }
        }
        Some((1u64 << leading_zeros) - 1 + self.bits(leading_zeros)?)
    }

    /// Signed Exp-Golomb `se(v)`.
    fn se(&mut self) -> Option<i64> {
        let k = i64::try_from(self.ue()?).ok()?;
        Some(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }
}

/// Coded frame size (width, height) in pixels that an SPS declares, before cropping: the
/// macroblock counts of H.264 7.3.2.1.1 times 16. `None` if the SPS ends early or is malformed.
fn sps_coded_size(nal: &[u8]) -> Option<(u64, u64)> {
    if !is_sps(nal) {
        return None;
    }
    let mut r = BitReader::from_nal(nal);
    let profile_idc = r.bits(8)?;
    r.bits(16)?; // constraint flags, level_idc
    r.ue()?; // seq_parameter_set_id
    if matches!(
        profile_idc,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        let chroma_format_idc = r.ue()?;
        if chroma_format_idc == 3 {
            r.flag()?; // separate_colour_plane_flag
        }
        r.ue()?; // bit_depth_luma_minus8
        r.ue()?; // bit_depth_chroma_minus8
        r.flag()?; // qpprime_y_zero_transform_bypass_flag
        if r.flag()? {
            // seq_scaling_matrix_present_flag: skip the scaling lists.
            let lists = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.flag()? {
                    let size = if i < 6 { 16 } else { 64 };
                    let (mut last, mut next) = (8i64, 8i64);
                    for _ in 0..size {
                        if next != 0 {
                            next = (last + r.se()? + 256).rem_euclid(256);
                        }
                        if next != 0 {
                            last = next;
                        }
                    }
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?; // log2_max_pic_order_cnt_lsb_minus4
        }
        1 => {
            r.flag()?; // delta_pic_order_always_zero_flag
            r.se()?; // offset_for_non_ref_pic
            r.se()?; // offset_for_top_to_bottom_field
            let cycle = r.ue()?;
            if cycle > 255 {
                return None;
            }
            for _ in 0..cycle {
                r.se()?;
            }
        }
        _ => {}
    }
    r.ue()?; // max_num_ref_frames
    r.flag()?; // gaps_in_frame_num_value_allowed_flag
    let width_in_mbs = r.ue()?.checked_add(1)?;
    let height_in_map_units = r.ue()?.checked_add(1)?;
    let frame_mbs_only = r.flag()?;
    let field_factor = if frame_mbs_only { 1 } else { 2 };
    Some((
        width_in_mbs.checked_mul(16)?,
        height_in_map_units.checked_mul(16 * field_factor)?,
    ))
}

pub(crate) fn read(path: &Path, bytes: &[u8], limits: &ReadLimits) -> Result<Video> {
    let Opened {
        info,
        length_size,
        sps,
        pps,
        tables,
    } = open(path, bytes, limits)?;
    let samples = info.frames;
    let ranges = sample_ranges(path, &tables, bytes.len(), samples)?;
    let decode_error = |sample: usize, detail: String| VideoError::Decode {
        path: path.to_path_buf(),
        sample,
        samples,
        detail,
    };

    // Flushing after every packet (the crate's default) forces pictures out before their
    // reordering delay with B-frames; OpenH264 then fails mid-stream (dsOutOfMemory at sample 7
    // of the test clip). Pictures are taken as they become ready and the rest flushed at the end.
    let config = DecoderConfig::new().flush_after_decode(Flush::NoFlush);
    let mut decoder = Decoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| decode_error(0, format!("cannot create the decoder: {e}")))?;
    let mut frames = Frames::new(path, samples, limits);
    let mut annexb = Vec::new();
    for (i, range) in ranges.into_iter().enumerate() {
        // `sample_ranges` keeps every range inside the file.
        let sample = bytes.get(range).unwrap_or_default();
        annexb.clear();
        if i == 0 {
            for ps in sps.iter().chain(&pps) {
                annexb.extend_from_slice(&START_CODE);
                annexb.extend_from_slice(ps);
            }
        }
        avcc_to_annexb(sample, length_size, &mut annexb)
            .map_err(|e| malformed(path, format!("sample {i}: {e}")))?;
        // Parameter sets may also come in-band, in the samples: check every one the decoder
        // will see, split as it splits them.
        for nal in annexb_nal_units(&annexb).filter(|n| is_sps(n)) {
            check_sps_size(path, nal, samples as u64, limits)?;
        }
        match decoder.decode(&annexb) {
            Ok(Some(yuv)) => frames.push(&yuv)?,
            Ok(None) => {}
            Err(e) => return Err(decode_error(i, decode_message(&e))),
        }
    }
    // Pictures held back for reordering (B-frames) come out here, still in display order.
    let rest = decoder
        .flush_remaining()
        .map_err(|e| decode_error(samples.saturating_sub(1), decode_message(&e)))?;
    for yuv in &rest {
        frames.push(yuv)?;
    }
    if frames.count != samples {
        return Err(decode_error(
            frames.count.min(samples.saturating_sub(1)),
            format!(
                "only {} of {samples} samples produced a picture",
                frames.count
            ),
        ));
    }
    frames.finish(info.fps)
}

/// OpenH264's `Display` appends a backtrace note; keep the code and the user message.
fn openh264_message(e: &openh264::Error) -> String {
    let text = e.to_string();
    let user = text
        .split(". ")
        .find_map(|part| part.strip_prefix("User Message:Some("))
        .map(|m| format!(": {}", m.trim_end_matches(')').trim_matches('"')))
        .unwrap_or_default();
    format!("OpenH264 error code {}{user}", e.native_code())
}

/// The decoder's native code is a DECODING_STATE bit set (codec_def.h); name its bits.
fn decode_message(e: &openh264::Error) -> String {
    const BITS: [(i64, &str); 11] = [
        (0x1, "frame pending"),
        (0x2, "reference lost"),
        (0x4, "bitstream error"),
        (0x8, "dependency layer lost"),
        (0x10, "no parameter sets"),
        (0x20, "data error concealed"),
        (0x40, "reference list null pointers"),
        (0x1000, "invalid argument"),
        (0x2000, "initialisation expected"),
        (0x4000, "out of memory"),
        (0x8000, "destination buffer needs expansion"),
    ];
    let code = e.native_code();
    let names: Vec<&str> = BITS
        .iter()
        .filter(|(bit, _)| code & bit != 0)
        .map(|&(_, name)| name)
        .collect();
    if names.is_empty() {
        openh264_message(e)
    } else {
        format!("OpenH264 decoding state {code:#x} ({})", names.join(", "))
    }
}

/// Decoded pictures gathered as RGB, all of one size.
struct Frames<'p> {
    path: &'p Path,
    limits: &'p ReadLimits,
    data: Vec<u8>,
    size: Option<(usize, usize)>,
    count: usize,
    /// Sample count, to allocate the whole clip once the frame size is known.
    expected: usize,
}

impl<'p> Frames<'p> {
    fn new(path: &'p Path, expected: usize, limits: &'p ReadLimits) -> Self {
        Self {
            path,
            limits,
            data: Vec::new(),
            size: None,
            count: 0,
            expected,
        }
    }

    fn push(&mut self, yuv: &DecodedYUV<'_>) -> Result<()> {
        let (w, h) = yuv.dimensions();
        if self.size.is_none() {
            // The SPS was checked, but the clip is sized by the decoder's actual picture.
            let total = self.limits.check(
                self.path,
                "MP4",
                w as u64,
                h as u64,
                Some(self.expected.max(1) as u64),
            )?;
            self.data
                .try_reserve_exact(total)
                .map_err(|source| VideoError::OutOfMemory {
                    path: self.path.to_path_buf(),
                    bytes: total,
                    source,
                })?;
        }
        let (fw, fh) = *self.size.get_or_insert((w, h));
        if (w, h) != (fw, fh) {
            return Err(VideoError::FrameSizeMismatch {
                path: self.path.to_path_buf(),
                frame: self.count,
                width: u32::try_from(fw).unwrap_or(u32::MAX),
                height: u32::try_from(fh).unwrap_or(u32::MAX),
                got_width: u32::try_from(w).unwrap_or(u32::MAX),
                got_height: u32::try_from(h).unwrap_or(u32::MAX),
            });
        }
        if self.count >= self.expected {
            // Never more pictures than samples: the reservation above holds exactly the clip.
            return Err(malformed(
                self.path,
                format!("the decoder produced more than {} pictures", self.expected),
            ));
        }
        // `w * h * 3` was checked by `limits.check` for the whole clip.
        let start = self.data.len();
        self.data.resize(start + w * h * 3, 0);
        yuv.write_rgb8(&mut self.data[start..]);
        self.count += 1;
        Ok(())
    }

    fn finish(self, fps: f64) -> Result<Video> {
        let (w, h) = self.size.unwrap_or((0, 0));
        let (w, h) = (u32::try_from(w).unwrap_or(0), u32::try_from(h).unwrap_or(0));
        Video::new(self.data, w, h, fps).map_err(|e| VideoError::Malformed {
            path: self.path.to_path_buf(),
            format: "MP4",
            detail: e.to_string(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Default H.264 bitrate: 0.65 bits per pixel per frame (≈ 4.2 Mbps at 832×480 and 16 fps,
/// 7.8 Mbps at 30 fps),
/// clamped to 0.5–50 Mbps.
pub fn default_bitrate(width: u32, height: u32, fps: f64) -> u32 {
    let bps = 0.65 * f64::from(width) * f64::from(height) * fps;
    bps.clamp(500_000.0, 50_000_000.0) as u32
}

/// The track's time base: `fps = timescale / delta` exactly for integer rates and the NTSC
/// family (30000/1001), else to a millihertz.
fn time_base(fps: f64) -> (u32, u32) {
    for delta in [1u32, 1001, 1000] {
        let ts = fps * f64::from(delta);
        if (ts - ts.round()).abs() < 1e-6 * ts && ts.round() >= 1.0 && ts.round() < u32::MAX as f64
        {
            // Integer rates get ×1000 so the timescale is a common one (16000, 24000, ...).
            return if delta == 1 && ts.round() * 1000.0 < u32::MAX as f64 {
                (ts.round() as u32 * 1000, 1000)
            } else {
                (ts.round() as u32, delta)
            };
        }
    }
    ((fps * 1000.0).round().max(1.0) as u32, 1000)
}

/// Splits one encoded frame into NAL units without start codes.
fn nal_units<'a>(layer_nals: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a [u8]> {
    layer_nals.map(|nal| {
        let skip = if nal.starts_with(&[0, 0, 0, 1]) {
            4
        } else if nal.starts_with(&[0, 0, 1]) {
            3
        } else {
            0
        };
        &nal[skip..]
    })
}

/// OpenH264 prints a warning to stderr at initialisation when frame skipping is off (it is, on
/// purpose: see `skip_frames(false)`), and the wrapper lowers the log level only after
/// initialising. The trace level is the one option OpenH264 accepts before initialisation.
#[allow(unsafe_code)]
fn quiet_encoder_log(encoder: &mut Encoder) {
    let mut level = openh264_sys2::WELS_LOG_QUIET as std::ffi::c_int;
    // SAFETY: `raw_api` is the live encoder owned by `encoder`; SetOption(TRACE_LEVEL) reads
    // one int through the pointer during the call and is allowed before initialisation
    // (welsEncoderExt.cpp, CWelsH264SVCEncoder::SetOption). A failure only leaves logging on.
    unsafe {
        encoder.raw_api().set_option(
            openh264_sys2::ENCODER_OPTION_TRACE_LEVEL,
            (&raw mut level).cast(),
        );
    }
}

pub(crate) fn write<W: Write + Seek>(
    out: W,
    path: &Path,
    video: &Video,
    bitrate_bps: Option<u32>,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<W> {
    let encode_error = |detail: String| VideoError::Encode {
        path: path.to_path_buf(),
        detail,
    };
    let (w, h) = (video.width(), video.height());
    if !w.is_multiple_of(2) || !h.is_multiple_of(2) {
        return Err(encode_error(format!(
            "frame size {w}x{h} is odd; H.264 4:2:0 needs even width and height (resize or crop first)"
        )));
    }
    if w > u32::from(u16::MAX) || h > u32::from(u16::MAX) {
        return Err(encode_error(format!("frame size {w}x{h} is too large")));
    }
    let bitrate = bitrate_bps.unwrap_or_else(|| default_bitrate(w, h, video.fps()));
    let config = EncoderConfig::new()
        .bitrate(BitRate::from_bps(bitrate))
        .max_frame_rate(FrameRate::from_hz(video.fps() as f32))
        // Every input frame must become a sample, or the duration and count are wrong.
        .skip_frames(false)
        // Same matrix and range as the crate's RGB→YUV conversion.
        .vui(VuiConfig::bt601());
    let mut encoder =
        Encoder::with_api_config(OpenH264API::from_source(), config).map_err(|e| {
            encode_error(format!(
                "cannot create the encoder: {}",
                openh264_message(&e)
            ))
        })?;
    quiet_encoder_log(&mut encoder);

    let (timescale, delta) = time_base(video.fps());
    let mp4_config = mp4::Mp4Config {
        major_brand: "isom".parse().unwrap(),
        minor_version: 512,
        compatible_brands: ["isom", "iso2", "avc1", "mp41"]
            .iter()
            .map(|b| b.parse().unwrap())
            .collect(),
        // Equal to the track's: the `mp4` crate rounds each sample's duration into the movie
        // timescale, so any other value drifts (16 fps at 1000: 62 ms per frame, not 62.5).
        timescale,
    };
    let mux_error = |e: mp4::Error| match e {
        mp4::Error::IoError(source) => VideoError::io(path, "write", source),
        other => encode_error(format!("MP4 mux: {other}")),
    };
    let mut muxer = mp4::Mp4Writer::write_start(out, &mp4_config).map_err(mux_error)?;

    let mut yuv = YUVBuffer::new(w as usize, h as usize);
    let mut params: Option<(Vec<u8>, Vec<u8>)> = None;
    let mut sample = Vec::new();
    for (i, frame) in video.frames().enumerate() {
        crate::check_stop(stop, path)?;
        yuv.read_rgb8(RgbSliceU8::new(frame, (w as usize, h as usize)));
        let millis = (i as f64 * 1000.0 / video.fps()).round() as u64;
        let bs = encoder
            .encode_at(&yuv, Timestamp::from_millis(millis))
            .map_err(|e| encode_error(format!("frame {i}: {}", openh264_message(&e))))?;
        let frame_type = bs.frame_type();
        if matches!(frame_type, FrameType::Skip | FrameType::Invalid) {
            return Err(encode_error(format!(
                "frame {i}: encoder returned {frame_type:?}"
            )));
        }
        let (mut sps, mut pps) = (None, None);
        sample.clear();
        let layers = (0..bs.num_layers()).filter_map(|l| bs.layer(l));
        for layer in layers {
            let nals = (0..layer.nal_count()).filter_map(|n| layer.nal_unit(n));
            for nal in nal_units(nals) {
                match nal.first().map(|b| b & 0x1f) {
                    None => {}
                    // Parameter sets go to the avcC box; with constant ids they repeat unchanged.
                    Some(7) => sps = Some(nal.to_vec()),
                    Some(8) => pps = Some(nal.to_vec()),
                    Some(_) => {
                        sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                        sample.extend_from_slice(nal);
                    }
                }
            }
        }
        if params.is_none() {
            let (Some(sps), Some(pps)) = (sps, pps) else {
                return Err(encode_error("the first frame carries no SPS/PPS".into()));
            };
            muxer
                .add_track(&mp4::TrackConfig {
                    track_type: mp4::TrackType::Video,
                    timescale,
                    language: "und".into(),
                    media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
                        width: w as u16,
                        height: h as u16,
                        seq_param_set: sps.clone(),
                        pic_param_set: pps.clone(),
                    }),
                })
                .map_err(mux_error)?;
            params = Some((sps, pps));
        }
        muxer
            .write_sample(
                1,
                &mp4::Mp4Sample {
                    start_time: i as u64 * u64::from(delta),
                    duration: delta,
                    rendering_offset: 0,
                    is_sync: frame_type == FrameType::IDR,
                    bytes: mp4::Bytes::copy_from_slice(&sample),
                },
            )
            .map_err(mux_error)?;
    }
    muxer.write_end().map_err(mux_error)?;
    Ok(muxer.into_writer())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_base_is_exact_for_common_rates() {
        assert_eq!(time_base(16.0), (16000, 1000));
        assert_eq!(time_base(24.0), (24000, 1000));
        assert_eq!(time_base(30000.0 / 1001.0), (30000, 1001));
        assert_eq!(time_base(12.5), (12500, 1000));
        for fps in [16.0, 24.0, 30000.0 / 1001.0, 12.5, 7.3] {
            let (ts, d) = time_base(fps);
            assert!((f64::from(ts) / f64::from(d) - fps).abs() < 1e-9, "{fps}");
        }
    }

    #[test]
    fn annexb_conversion_and_bad_lengths() {
        let mut out = Vec::new();
        avcc_to_annexb(&[0, 0, 0, 2, 0x65, 0xaa, 0, 0, 0, 1, 0x41], 4, &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 1, 0x65, 0xaa, 0, 0, 0, 1, 0x41]);
        out.clear();
        assert!(avcc_to_annexb(&[0, 0, 0, 9, 0x65], 4, &mut out).is_err());
        assert!(avcc_to_annexb(&[0, 0], 4, &mut out).is_err());
    }

    #[test]
    fn walker_reports_overrun() {
        // 'free' box claiming 100 bytes in a 16-byte buffer.
        let mut buf = vec![0, 0, 0, 100];
        buf.extend_from_slice(b"free");
        buf.extend_from_slice(&[0; 8]);
        let err = boxes(&buf, 0..buf.len()).err().unwrap();
        assert!(err.contains("'free'") && err.contains("100"), "{err}");
    }

    /// Writes SPS fields MSB first; `ue` is unsigned Exp-Golomb.
    #[derive(Default)]
    struct BitWriter {
        bits: Vec<bool>,
    }

    impl BitWriter {
        fn put(&mut self, value: u64, n: u32) -> &mut Self {
            self.bits
                .extend((0..n).rev().map(|i| (value >> i) & 1 == 1));
            self
        }

        fn ue(&mut self, value: u64) -> &mut Self {
            let coded = value + 1;
            let len = 64 - coded.leading_zeros();
            self.put(0, len - 1).put(coded, len)
        }

        /// NAL header 0x67 (SPS) and the bits, padded with a stop bit and zeros.
        fn nal(&mut self) -> Vec<u8> {
            self.bits.push(true);
            while !self.bits.len().is_multiple_of(8) {
                self.bits.push(false);
            }
            let mut out = vec![0x67];
            out.extend(
                self.bits
                    .chunks(8)
                    .map(|c| c.iter().fold(0u8, |acc, &b| (acc << 1) | u8::from(b))),
            );
            out
        }
    }

    /// A Baseline SPS (profile 66, level 3.0) of `mbs_w`×`mbs_h` macroblocks.
    fn baseline_sps(mbs_w: u64, mbs_h: u64) -> Vec<u8> {
        let mut w = BitWriter::default();
        w.put(66, 8).put(0xc0, 8).put(30, 8); // profile, constraints, level
        w.ue(0).ue(0).ue(0).ue(0); // sps id, log2_max_frame_num-4, poc type 0, log2_max_poc_lsb-4
        w.ue(1).put(0, 1); // max_num_ref_frames, gaps flag
        w.ue(mbs_w - 1).ue(mbs_h - 1).put(1, 1); // size in macroblocks, frame_mbs_only
        w.put(0, 1).put(0, 1).put(0, 1); // direct_8x8, cropping, vui
        w.nal()
    }

    #[test]
    fn sps_sizes_are_read_and_checked() {
        assert_eq!(sps_coded_size(&baseline_sps(52, 30)), Some((832, 480)));
        // 4096 macroblocks a side: 65536 pixels, past the 16384 limit.
        let sps = baseline_sps(4096, 4096);
        assert_eq!(sps_coded_size(&sps), Some((65536, 65536)));
        let err = check_sps_size(Path::new("x.mp4"), &sps, 81, &ReadLimits::default()).unwrap_err();
        assert!(
            matches!(
                &err,
                VideoError::DeclaredSizeTooLarge {
                    format: "H.264 SPS",
                    width: 65536,
                    height: 65536,
                    frames: Some(81),
                    ..
                }
            ),
            "{err:?}"
        );
        // Cut short: no size, an error rather than a guess.
        assert_eq!(sps_coded_size(&sps[..4]), None);
        assert_eq!(sps_coded_size(&[0x68, 0xce]), None); // a PPS
    }

    #[test]
    fn emulation_prevention_bytes_are_dropped() {
        let mut r = BitReader::from_nal(&[0x67, 0x00, 0x00, 0x03, 0x01, 0xff]);
        assert_eq!(r.bits(24), Some(0x000001));
        assert_eq!(r.bits(8), Some(0xff));
        assert_eq!(r.flag(), None);
    }

    #[test]
    fn in_band_parameter_sets_are_found_where_the_decoder_splits() {
        let stream = [0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 1, 0x65];
        let nals: Vec<&[u8]> = annexb_nal_units(&stream).collect();
        assert_eq!(nals, [&[0x67, 1, 2][..], &[0x68, 3], &[0x65]]);
        assert!(is_sps(nals[0]) && !is_sps(nals[1]));
    }

    #[test]
    fn default_bitrate_scales() {
        assert_eq!(default_bitrate(832, 480, 16.0), 4_153_344);
        assert_eq!(default_bitrate(832, 480, 30.0), 7_787_520);
        assert_eq!(default_bitrate(64, 64, 16.0), 500_000);
    }
}
