//! Hostile inputs: headers declaring huge sizes, inputs that are not regular files, symbolic
//! link loops, PNG folders with odd names. Every case must end in a typed error naming the
//! file and the problem, promptly, without a large allocation.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use vpipe_video::{
    count_frames, probe_mp4, read_video, read_video_with_limits, resize_center_crop, write_video,
    ReadLimits, Video, VideoError, WriteOptions,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn corpus(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(name)
}

const CLIP: &str = "wan21-cheesecake-832x480x81-h264.mp4";

fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Runs `f` on another thread and fails the test if it has not returned within 20 s: an input
/// that blocks (a FIFO) must fail fast, not hang the test run.
fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} did not return within 20 s (blocked on the input?)"))
}

// -------------------------------------------------------------------------------------------
// Declared sizes

/// A 35-byte GIF whose logical screen and only frame declare 65535×65535 pixels: decoding it
/// naively asks for 17 GB (65535² RGBA) and aborts the process.
fn gif_bomb() -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    // Logical screen descriptor: width, height (little-endian), no colour table.
    gif.extend([0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00]);
    // Image descriptor at (0, 0), 65535×65535, no local colour table.
    gif.extend([0x2c, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // LZW minimum code size 2, one sub-block of 8 bytes, block terminator, trailer.
    gif.extend([
        0x02, 0x08, 0x84, 0x8f, 0xa9, 0xcb, 0xed, 0x0f, 0x63, 0x2b, 0x00, 0x3b,
    ]);
    assert_eq!(gif.len(), 35);
    gif
}

/// The real clip with its avc1 sample entry's width and height set to 65535.
fn mp4_with_huge_track() -> Vec<u8> {
    let mut clip = std::fs::read(fixture(CLIP)).unwrap();
    let stsd = clip.windows(4).position(|w| w == b"stsd").unwrap();
    let avc1 = stsd + clip[stsd..].windows(4).position(|w| w == b"avc1").unwrap();
    // After the type: 6 reserved, 2 data reference index, 16 pre-defined/reserved bytes, then
    // width and height (big-endian u16).
    let at = avc1 + 4 + 24;
    assert_eq!(
        &clip[at..at + 4],
        &[0x03, 0x40, 0x01, 0xe0],
        "832x480 expected"
    );
    clip[at..at + 4].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    clip
}

/// A small MP4 of ours whose `stsz` declares 4294967295 samples of one byte each.
fn mp4_with_huge_sample_count() -> Vec<u8> {
    let mut mp4 = std::fs::read(corpus("tiny-32x24x3.mp4")).unwrap();
    let stsz = mp4.windows(4).position(|w| w == b"stsz").unwrap();
    // After the type: version and flags (4), sample size (4), sample count (4).
    mp4[stsz + 8..stsz + 12].copy_from_slice(&1u32.to_be_bytes());
    mp4[stsz + 12..stsz + 16].copy_from_slice(&u32::MAX.to_be_bytes());
    mp4
}

/// CRC-32 (ISO-HDLC, as PNG uses) of `bytes`.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(data);
    out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    out
}

/// A well-formed PNG header (valid CRCs) declaring 100000×100000 RGB pixels, with a token IDAT.
fn png_bomb() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = 100_000u32.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter, no interlace
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

#[test]
fn png_crc_matches_a_known_value() {
    // The IEND chunk's CRC is fixed by the format.
    assert_eq!(crc32(b"IEND"), 0xae42_6082);
}

fn assert_declared_too_large(
    err: &VideoError,
    file: &str,
    format: &str,
    size: (u64, u64),
    limit: &str,
) {
    let msg = err.to_string();
    assert!(
        matches!(err, VideoError::DeclaredSizeTooLarge { format: f, width, height, .. }
            if *f == format && (*width, *height) == size),
        "{err:?}"
    );
    let dims = format!("{}x{}", size.0, size.1);
    for part in [file, dims.as_str(), limit] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
}

/// Every huge-declared-size case; also run in a child process under a small address-space
/// limit, where any large allocation before the check would fail.
fn huge_declared_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();

    let gif = write_tmp(dir.path(), "bomb.gif", &gif_bomb());
    let err = read_video(&gif).unwrap_err();
    assert_declared_too_large(
        &err,
        "bomb.gif",
        "GIF",
        (65535, 65535),
        "at most 16384 pixels per side",
    );

    let mp4 = write_tmp(dir.path(), "huge-track.mp4", &mp4_with_huge_track());
    for err in [read_video(&mp4).unwrap_err(), probe_mp4(&mp4).unwrap_err()] {
        assert_declared_too_large(
            &err,
            "huge-track.mp4",
            "MP4",
            (65535, 65535),
            "at most 16384 pixels per side",
        );
    }

    let mp4 = write_tmp(
        dir.path(),
        "many-samples.mp4",
        &mp4_with_huge_sample_count(),
    );
    let err = read_video(&mp4).unwrap_err();
    assert!(
        matches!(
            &err,
            VideoError::DeclaredSizeTooLarge {
                frames: Some(4294967295),
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("many-samples.mp4") && msg.contains("at most 1048576 frames"),
        "{msg}"
    );

    let folder = dir.path().join("png-bomb");
    std::fs::create_dir(&folder).unwrap();
    write_tmp(&folder, "frame_0.png", &png_bomb());
    let err = read_video(&folder).unwrap_err();
    assert_declared_too_large(
        &err,
        "frame_0.png",
        "PNG",
        (100_000, 100_000),
        "at most 16384 pixels per side",
    );

    // A target size is the caller's declaration: bounded the same way.
    let tiny = Video::new(vec![0; 12], 2, 2, 16.0).unwrap();
    let err = resize_center_crop(&tiny, 100_000, 100_000).unwrap_err();
    assert!(err.to_string().contains("16384"), "{err}");
}

#[test]
fn huge_declared_sizes_fail_with_the_size_error() {
    huge_declared_sizes_are_refused();
}

const CHILD_ENV: &str = "VPIPE_VIDEO_SMALL_ADDRESS_SPACE_CHILD";

/// Only does something inside the child process started by
/// [`huge_declared_sizes_allocate_nothing_large`].
#[test]
fn huge_declared_sizes_child() {
    if std::env::var_os(CHILD_ENV).is_some() {
        huge_declared_sizes_are_refused();
    }
}

/// The same cases with the address space limited to 1 GiB (`ulimit -v`): the bombs declare
/// 12-40 GB of frames, so an allocation sized by them before the check would abort the child.
#[cfg(unix)]
#[test]
fn huge_declared_sizes_allocate_nothing_large() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(
            "ulimit -v 1048576 && exec \"$0\" --exact huge_declared_sizes_child \
             --test-threads=1 --nocapture",
        )
        .arg(&exe)
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child under ulimit -v failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// A GIF declares no frame count: the decoded total is checked as frames arrive.
#[test]
fn gif_frames_past_the_byte_limit_are_refused() {
    let gif = corpus("tiny-16x12x3.gif");
    let limits = ReadLimits {
        max_decoded_bytes: 2 * 16 * 12 * 3,
        ..ReadLimits::default()
    };
    let err = read_video_with_limits(&gif, &limits).unwrap_err();
    assert!(
        matches!(
            &err,
            VideoError::DeclaredSizeTooLarge {
                frames: Some(3),
                width: 16,
                height: 12,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("1.1 KiB"), "{err}");
    assert_eq!(read_video(&gif).unwrap().num_frames(), 3);
}

// -------------------------------------------------------------------------------------------
// Not regular files

#[cfg(unix)]
fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

#[cfg(unix)]
#[test]
fn a_fifo_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("input.mp4");
    mkfifo(&fifo);
    let (p1, p2, p3) = (fifo.clone(), fifo.clone(), fifo.clone());
    let errors = [
        within_deadline("read_video", move || read_video(&p1).unwrap_err()),
        within_deadline("probe_mp4", move || probe_mp4(&p2).unwrap_err()),
        within_deadline("count_frames", move || count_frames(&p3).unwrap_err()),
    ];
    for err in errors {
        assert!(
            matches!(&err, VideoError::NotRegularFile { kind: "a FIFO", path } if *path == fifo),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("input.mp4: not a regular file (a FIFO)"),
            "{msg}"
        );
    }
}

#[cfg(unix)]
#[test]
fn devices_and_sockets_are_refused() {
    for (dev, kind) in [
        ("/dev/null", "a character device"),
        ("/dev/zero", "a character device"),
    ] {
        let err = within_deadline(dev, move || read_video(dev).unwrap_err());
        assert!(
            matches!(&err, VideoError::NotRegularFile { kind: k, .. } if *k == kind),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{dev}: not a regular file ({kind})")),
            "{msg}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("clip.gif");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let err = read_video(&socket).unwrap_err();
    assert!(
        err.to_string()
            .contains("clip.gif: not a regular file (a socket)"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn symlink_loops_and_broken_links_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.mp4"), dir.path().join("b.mp4"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let err = read_video(&a).unwrap_err();
    assert!(
        matches!(&err, VideoError::SymlinkLoop { path } if *path == a),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("a.mp4: symbolic link loop") && !msg.contains("No such file"),
        "{msg}"
    );

    let dangling = dir.path().join("gone.mp4");
    std::os::unix::fs::symlink(dir.path().join("missing.mp4"), &dangling).unwrap();
    let err = read_video(&dangling).unwrap_err();
    assert!(
        matches!(&err, VideoError::BrokenSymlink { path, target } if *path == dangling && target.ends_with("missing.mp4")),
        "{err:?}"
    );

    // A link to a real file is followed.
    let link = dir.path().join("link.gif");
    std::os::unix::fs::symlink(corpus("tiny-16x12x3.gif"), &link).unwrap();
    assert_eq!(read_video(&link).unwrap().num_frames(), 3);
}

// -------------------------------------------------------------------------------------------
// PNG folders

fn gradient_video(w: u32, h: u32, frames: usize) -> Video {
    let data = (0..frames)
        .flat_map(|t| {
            (0..h).flat_map(move |y| {
                (0..w).flat_map(move |x| [(x * 9) as u8, (y * 13) as u8, (t * 40) as u8])
            })
        })
        .collect();
    Video::new(data, w, h, 16.0).unwrap()
}

#[test]
fn png_folder_with_uppercase_extensions_reads_in_name_order() {
    let video = gradient_video(20, 14, 11);
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("frames");
    std::fs::create_dir(&folder).unwrap();
    for (i, frame) in video.frames().enumerate() {
        // F1.PNG .. F11.PNG, alternating case: natural order puts F10 after F9.
        let ext = if i % 2 == 0 { "PNG" } else { "Png" };
        image::save_buffer_with_format(
            folder.join(format!("F{}.{ext}", i + 1)),
            frame,
            20,
            14,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .unwrap();
    }
    // Ignored: another file, a folder named like a frame.
    std::fs::write(folder.join("README.txt"), "not a frame").unwrap();
    std::fs::create_dir(folder.join("F99.png")).unwrap();
    #[cfg(unix)]
    mkfifo(&folder.join("F100.png"));
    let back = within_deadline("read_video on a PNG folder", {
        let folder = folder.clone();
        move || read_video(&folder).unwrap()
    });
    assert_eq!(
        (back.width(), back.height(), back.num_frames()),
        (20, 14, 11)
    );
    assert_eq!(back.data(), video.data());
    assert_eq!(count_frames(&folder).unwrap(), 11);

    // And what `write_video` writes reads back the same.
    let written = dir.path().join("written");
    write_video(&written, &video, &WriteOptions::default()).unwrap();
    assert_eq!(read_video(&written).unwrap().data(), video.data());
}

#[test]
fn a_png_folder_frame_that_is_not_a_png_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("frames");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(corpus("tiny-16x12.png"), folder.join("a.png")).unwrap();
    std::fs::copy(corpus("tiny-16x12x3.gif"), folder.join("b.png")).unwrap();
    let err = read_video(&folder).unwrap_err();
    assert!(
        matches!(&err, VideoError::Malformed { format: "PNG", path, .. } if path.ends_with("b.png")),
        "{err:?}"
    );
    std::fs::write(folder.join("b.png"), &png_bomb()[..20]).unwrap();
    let err = read_video(&folder).unwrap_err();
    assert!(
        matches!(&err, VideoError::Truncated { path, .. } if path.ends_with("b.png")),
        "{err:?}"
    );
}

/// Still images (image-to-video's inputs): PNG and JPEG by content; a huge declared size, a
/// cut file, CMYK colour and a file that is no image are typed errors naming the file.
#[test]
fn still_images_are_read_and_bad_ones_refused() {
    use image::ImageEncoder;
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (5u32, 3u32);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 17 % 256) as u8).collect();
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&rgb, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 100)
        .write_image(&rgb, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    // Named as the other format: the content decides.
    let png_path = write_tmp(dir.path(), "frame.jpg", &png);
    let frame = vpipe_video::read_image(&png_path).unwrap();
    assert_eq!(
        (frame.width(), frame.height(), frame.num_frames()),
        (w, h, 1)
    );
    assert_eq!(frame.data(), rgb.as_slice());
    let jpeg_path = write_tmp(dir.path(), "frame.png", &jpeg);
    let frame = vpipe_video::read_image(&jpeg_path).unwrap();
    assert_eq!((frame.width(), frame.height()), (w, h));
    let worst = frame
        .data()
        .iter()
        .zip(&rgb)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 64, "JPEG at quality 100 off by {worst}");

    let bomb = write_tmp(dir.path(), "bomb.png", &png_bomb());
    let err = vpipe_video::read_image(&bomb).unwrap_err();
    assert!(
        matches!(err, VideoError::DeclaredSizeTooLarge { .. }),
        "{err}"
    );
    let cut = write_tmp(dir.path(), "cut.png", &png[..png.len() - 20]);
    let err = vpipe_video::read_image(&cut).unwrap_err().to_string();
    assert!(err.contains("cut.png"), "{err}");
    let err = vpipe_video::read_image(fixture("cmyk_8x8.jpg"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("CMYK") && err.contains("cmyk_8x8.jpg"),
        "{err}"
    );
    let text = write_tmp(dir.path(), "notes.png", b"not an image at all");
    let err = vpipe_video::read_image(&text).unwrap_err();
    assert!(matches!(err, VideoError::UnsupportedInput { .. }), "{err}");
    let empty = write_tmp(dir.path(), "empty.jpg", b"");
    assert!(vpipe_video::read_image(&empty).is_err());
}
