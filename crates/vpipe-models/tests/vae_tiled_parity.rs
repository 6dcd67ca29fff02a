//! Spatial tiling of the Wan VAE ([`vpipe_models::tiling`], [`WanVae::encode_tiled`],
//! [`WanVae::decode_tiled`]) against diffusers' `AutoencoderKLWan.tiled_encode` /
//! `tiled_decode`.
//!
//! Every expected number here comes from the fixtures of `tools/fixtures/make_vae_fixtures.py`
//! (diffusers 0.42.1, torch 2.15.0, fp32, CPU; weight seed 21001; clips cut from scikit-image
//! stills, no random numbers), in `tests/fixtures/vae/` (see `vae_fixtures.json` there). The
//! tiled references are diffusers' `encode(video).latent_dist` and `decode(mean).sample` of the
//! `t5_h40_w24` clip after `vae.enable_tiling(tile_sample_min_height=T,
//! tile_sample_min_width=T, tile_sample_stride_height=S, tile_sample_stride_width=S)`, for
//! (T, S) = (24, 16) and (32, 16) pixels; the tiled decode decodes the *untiled* posterior mean
//! and is clamped. Tests without a tiled diffusers reference compare with the untiled fixtures
//! (diffusers runs untiled when the tile covers the frame) or with vpipe's own untiled output.

use candle_core::{DType, Device, Tensor};
use vpipe_models::ops::max_abs_diff;
use vpipe_models::tiling::{self, TileError, TileSpec};
use vpipe_models::wan::WanVae;
use vpipe_models::Error;

mod common;
use common::{case, cases, fixture, TOL};

/// The tiny fixture VAE, diffusers key names, f32 on the CPU.
fn vae() -> WanVae {
    WanVae::from_file(
        fixture("wan_vae_tiny_diffusers.safetensors"),
        DType::F32,
        &common::device(),
    )
    .unwrap()
}

/// diffusers' layout: these tests compare with diffusers' tiled results and loops.
fn spec(tile: usize, stride: usize) -> TileSpec {
    TileSpec::diffusers(tile, stride)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_finite(t: &Tensor, what: &str) {
    assert!(
        values(t).iter().all(|v| v.is_finite()),
        "{what}: non-finite"
    );
}

/// Tiled encode (mean and clamped log-variance) and tiled decode (clamped) of `t5_h40_w24` vs
/// diffusers with tiling enabled, ≤ 1e-4 max abs each. Expected numbers:
/// `t5_h40_w24.tiled.{name}.{mean,logvar,decoded}` from `make_vae_fixtures.py` (seed 21001),
/// made with `tile_sample_min_* = tile`, `tile_sample_stride_* = stride`. Also checks that
/// tiling changed the result (diffusers' tiled output differs from its untiled one by about
/// 0.5 to 1.2, `vae_fixtures.json`), so the comparison is not an untiled one in disguise.
fn check_tiled_setting(name: &str, tile: usize, stride: usize) {
    let c = cases();
    let vae = vae();
    let spec = spec(tile, stride);
    let video = case(&c, "t5_h40_w24.video");
    let mean_ref = case(&c, "t5_h40_w24.mean");

    let post = vae.encode_posterior_tiled(&video, spec).unwrap();
    let e_mean = max_abs_diff(
        &post.mean,
        &case(&c, &format!("t5_h40_w24.tiled.{name}.mean")),
    )
    .unwrap();
    let e_logvar = max_abs_diff(
        &post.logvar,
        &case(&c, &format!("t5_h40_w24.tiled.{name}.logvar")),
    )
    .unwrap();
    let mean = vae.encode_tiled(&video, spec).unwrap();
    assert_eq!(values(&mean), values(&post.mean));

    let decoded = vae.decode_tiled(&mean_ref, spec).unwrap();
    let decoded_ref = case(&c, &format!("t5_h40_w24.tiled.{name}.decoded"));
    let e_dec = max_abs_diff(&decoded, &decoded_ref).unwrap();
    // The generic tiler with the unclamped decode, clamped afterwards: the same thing.
    let unclamped = tiling::tiled_decode(&mean_ref, spec, tiling::Finish::default(), |t| {
        vae.decode_unclamped(t)
    })
    .unwrap();
    assert_eq!(
        values(&unclamped.clamp(-1f64, 1f64).unwrap()),
        values(&decoded)
    );

    eprintln!(
        "tiled {name}: mean {e_mean:.2e} logvar {e_logvar:.2e} decoded {e_dec:.2e} \
         (unclamped range {:?})",
        (
            unclamped.min_all().unwrap().to_scalar::<f32>().unwrap(),
            unclamped.max_all().unwrap().to_scalar::<f32>().unwrap()
        )
    );
    for (what, e) in [("mean", e_mean), ("logvar", e_logvar), ("decoded", e_dec)] {
        assert!(e <= TOL, "tiled {name} {what}: max abs {e} > {TOL}");
    }
    let untiled_enc = max_abs_diff(&post.mean, &mean_ref).unwrap();
    let untiled_dec = max_abs_diff(&decoded, &case(&c, "t5_h40_w24.decoded")).unwrap();
    assert!(
        untiled_enc > 0.1 && untiled_dec > 0.1,
        "{name}: tiled output is too close to the untiled one ({untiled_enc}, {untiled_dec})"
    );
}

/// diffusers parity, 24-px tiles every 16 px (3×2 tiles on 40×24, edge tiles cut to 8 px;
/// blend 1 latent / 8 px). Fixtures: `make_vae_fixtures.py`, seed 21001, `tile24_stride16`.
#[test]
fn tiled_encode_decode_match_diffusers_tile24_stride16() {
    check_tiled_setting("tile24_stride16", 24, 16);
}

/// diffusers parity, 32-px tiles every 16 px (3×2 tiles on 40×24; blend 2 latents / 16 px).
/// Fixtures: `make_vae_fixtures.py`, seed 21001, `tile32_stride16`.
#[test]
fn tiled_encode_decode_match_diffusers_tile32_stride16() {
    check_tiled_setting("tile32_stride16", 32, 16);
}

/// A tile that covers the frame (equal to it in one or both directions, or larger) runs the
/// untiled path: `encode_tiled`, `encode_posterior_tiled` and `decode_tiled` are bit-identical
/// to `encode`, `encode_posterior` and `decode`, and the tile function runs once. Inputs: the
/// `t5_h40_w24` and `t1_h56_w72` clips and their diffusers posterior means from
/// `make_vae_fixtures.py` (seed 21001); the expected values are vpipe's own untiled outputs.
#[test]
fn a_tile_covering_the_frame_is_exactly_untiled() {
    let c = cases();
    let vae = vae();
    for (clip, specs) in [
        ("t5_h40_w24", [spec(40, 16), spec(48, 48), spec(512, 384)]),
        ("t1_h56_w72", [spec(72, 8), spec(80, 64), spec(512, 512)]),
    ] {
        let video = case(&c, &format!("{clip}.video"));
        let mean_ref = case(&c, &format!("{clip}.mean"));
        let untiled = vae.encode_posterior(&video).unwrap();
        let decoded = vae.decode(&mean_ref).unwrap();
        let unclamped = vae.decode_unclamped(&mean_ref).unwrap();
        for spec in specs {
            let post = vae.encode_posterior_tiled(&video, spec).unwrap();
            assert_eq!(values(&post.mean), values(&untiled.mean), "{clip} {spec:?}");
            assert_eq!(
                values(&post.logvar),
                values(&untiled.logvar),
                "{clip} {spec:?}"
            );
            let mean = vae.encode_tiled(&video, spec).unwrap();
            assert_eq!(values(&mean), values(&untiled.mean), "{clip} {spec:?}");
            let dec = vae.decode_tiled(&mean_ref, spec).unwrap();
            assert_eq!(dec.dims(), decoded.dims());
            assert_eq!(values(&dec), values(&decoded), "{clip} {spec:?}");

            let mut calls = 0;
            let moments = tiling::tiled_encode(&video, spec, |t| {
                calls += 1;
                vae.encode_moments(t)
            })
            .unwrap();
            assert_eq!(calls, 1, "{clip} {spec:?}");
            assert_eq!(
                values(&moments),
                values(&vae.encode_moments(&video).unwrap())
            );
            let mut calls = 0;
            let unc = tiling::tiled_decode(&mean_ref, spec, tiling::Finish::default(), |t| {
                calls += 1;
                vae.decode_unclamped(t)
            })
            .unwrap();
            assert_eq!(calls, 1, "{clip} {spec:?}");
            assert_eq!(values(&unc), values(&unclamped), "{clip} {spec:?}");
        }
    }
}

/// Tile extents along one axis as diffusers' loops cut them: `for i in range(0, len, stride)`,
/// `x[i : i + tile]` (the last tiles cut at the border).
fn diffusers_tiles(len: usize, tile: usize, stride: usize) -> Vec<usize> {
    (0..len)
        .step_by(stride)
        .map(|i| tile.min(len - i))
        .collect()
}

/// The (height, width) of every tile diffusers cuts, row by row.
fn diffusers_tile_shapes(h: usize, w: usize, tile: usize, stride: usize) -> Vec<(usize, usize)> {
    let cols = diffusers_tiles(w, tile, stride);
    diffusers_tiles(h, tile, stride)
        .into_iter()
        .flat_map(|th| cols.iter().map(move |&tw| (th, tw)))
        .collect()
}

/// Odd frame sizes tile: the 1×56×72 clip (7×9 latents, neither a multiple of the tile) with
/// 32-px tiles every 24 px (3×3 tiles of 32/32/8 × 32/32/24 px; latent tiles 4/4/1 × 4/4/3)
/// and 16-px tiles every 8 px (7×9 tiles, the last row and column 8 px). The tile function sees
/// exactly diffusers' tile layout, in diffusers' order; the outputs have the untiled shapes and
/// are finite, and the decoded pixels are clamped. Input: `t1_h56_w72.{video,mean}` from
/// `make_vae_fixtures.py` (seed 21001); no tiled diffusers reference is committed for these
/// settings, so the expected layout is diffusers' loop bounds (`diffusers_tile_shapes`). (A
/// one-off, uncommitted diffusers 0.42.1 run of both settings agreed to within 6e-6.)
#[test]
fn odd_frame_size_56x72_tiles_in_diffusers_layout() {
    let c = cases();
    let vae = vae();
    let video = case(&c, "t1_h56_w72.video");
    let mean_ref = case(&c, "t1_h56_w72.mean");
    for (tile, stride) in [(32, 24), (16, 8)] {
        let spec = spec(tile, stride);
        let mut seen = vec![];
        let moments = tiling::tiled_encode(&video, spec, |t| {
            let (_, _, _, h, w) = t.dims5()?;
            seen.push((h, w));
            vae.encode_moments(t)
        })
        .unwrap();
        assert_eq!(
            seen,
            diffusers_tile_shapes(56, 72, tile, stride),
            "{spec:?}"
        );
        assert_eq!(moments.dims(), [1, 32, 1, 7, 9], "{spec:?}");
        let post = vae.encode_posterior_tiled(&video, spec).unwrap();
        assert_eq!(post.mean.dims(), mean_ref.dims());
        assert_finite(&post.mean, "mean");
        assert_finite(&post.logvar, "logvar");

        let mut seen = vec![];
        tiling::tiled_decode(&mean_ref, spec, tiling::Finish::default(), |t| {
            let (_, _, _, h, w) = t.dims5()?;
            seen.push((h, w));
            vae.decode_unclamped(t)
        })
        .unwrap();
        assert_eq!(
            seen,
            diffusers_tile_shapes(7, 9, tile / 8, stride / 8),
            "{spec:?}"
        );
        let dec = vae.decode_tiled(&mean_ref, spec).unwrap();
        assert_eq!(dec.dims(), [1, 3, 1, 56, 72], "{spec:?}");
        assert_finite(&dec, "decoded");
        assert!(values(&dec).iter().all(|v| v.abs() <= 1.0));
    }
}

/// A single 8×8 frame with any tile (8, 16, 64, 512 px): every tile covers it, so the result is
/// exactly vpipe's untiled one and, like diffusers (which also runs untiled then), within 1e-4
/// of `t1_h8_w8.{mean,logvar,decoded}` from `make_vae_fixtures.py` (seed 21001).
#[test]
fn a_single_8x8_frame_with_any_tile() {
    let c = cases();
    let vae = vae();
    let video = case(&c, "t1_h8_w8.video");
    let mean_ref = case(&c, "t1_h8_w8.mean");
    for spec in [spec(8, 8), spec(16, 8), spec(64, 32), spec(512, 8)] {
        let post = vae.encode_posterior_tiled(&video, spec).unwrap();
        assert_eq!(post.mean.dims(), [1, 16, 1, 1, 1]);
        assert_eq!(values(&post.mean), values(&vae.encode(&video).unwrap()));
        assert!(max_abs_diff(&post.mean, &mean_ref).unwrap() <= TOL);
        assert!(max_abs_diff(&post.logvar, &case(&c, "t1_h8_w8.logvar")).unwrap() <= TOL);
        let dec = vae.decode_tiled(&mean_ref, spec).unwrap();
        assert_eq!(dec.dims(), [1, 3, 1, 8, 8]);
        assert!(max_abs_diff(&dec, &case(&c, "t1_h8_w8.decoded")).unwrap() <= TOL);
    }
}

/// Frame counts 1, 5 and 9 (the `t1_h56_w72`, `t5_h40_w24` and `t9_h24_w16` clips from
/// `make_vae_fixtures.py`, seed 21001) with 16-px tiles every 8 px, which tile every clip in
/// both directions (even the 16-px-wide one: diffusers' loop also starts a second column at
/// 8 px). Each tile keeps its own temporal cache over all frames: the latents have 1, 2 and 3
/// frames, the decoded clips 1, 5 and 9, the shapes are the untiled fixtures' shapes and the
/// values finite. No tiled diffusers reference is committed for 16/8 (the 5-frame clip's 24/16
/// and 32/16 references are checked above; a one-off, uncommitted diffusers 0.42.1 run of 16/8
/// on all three clips agreed to within 6e-6).
#[test]
fn frame_counts_1_5_9_tile16_stride8() {
    let c = cases();
    let vae = vae();
    let spec = spec(16, 8);
    for clip in ["t1_h56_w72", "t5_h40_w24", "t9_h24_w16"] {
        let video = case(&c, &format!("{clip}.video"));
        let mean_ref = case(&c, &format!("{clip}.mean"));
        let mean = vae.encode_tiled(&video, spec).unwrap();
        assert_eq!(mean.dims(), mean_ref.dims(), "{clip}");
        assert_finite(&mean, clip);
        let dec = vae.decode_tiled(&mean_ref, spec).unwrap();
        assert_eq!(dec.dims(), video.dims(), "{clip}");
        assert_finite(&dec, clip);
        eprintln!(
            "{clip} tile16/8 vs untiled diffusers: encode {:.2e} decode {:.2e}",
            max_abs_diff(&mean, &mean_ref).unwrap(),
            max_abs_diff(&dec, &case(&c, &format!("{clip}.decoded"))).unwrap()
        );
    }
}

/// The error type a caller of the generic tiler might use.
#[derive(Debug)]
enum TestError {
    Tile(TileError),
    Candle(candle_core::Error),
}

impl From<TileError> for TestError {
    fn from(e: TileError) -> Self {
        TestError::Tile(e)
    }
}

impl From<candle_core::Error> for TestError {
    fn from(e: candle_core::Error) -> Self {
        TestError::Candle(e)
    }
}

/// Specs that cannot work, and the variant each is refused with.
fn bad_specs() -> Vec<(TileSpec, &'static str)> {
    vec![
        (spec(16, 24), "stride"), // stride > tile: gaps
        (spec(8, 16), "stride"),
        (spec(20, 16), "tile"), // not multiples of 8
        (spec(16, 12), "stride"),
        (spec(0, 0), "tile"), // zero
        (spec(16, 0), "stride"),
        (spec(520, 256), "tile"), // over 512
        (spec(1024, 512), "tile"),
    ]
}

/// Bad tile parameters are a `TileError` before any work: the tile function panics if called.
/// Also when the tile would cover the frame (the 8×8 frame with a 520-px tile), where the
/// untiled path would otherwise run. No fixture numbers; zero inputs.
#[test]
fn bad_tile_parameters_are_refused_before_any_work() {
    for (h, w) in [(8, 8), (40, 24)] {
        let video = Tensor::zeros((1, 3, 1, h, w), DType::F32, &Device::Cpu).unwrap();
        let latents = Tensor::zeros((1, 16, 1, h / 8, w / 8), DType::F32, &Device::Cpu).unwrap();
        for (spec, which) in bad_specs() {
            let enc = tiling::tiled_encode(&video, spec, |_| -> Result<Tensor, TestError> {
                panic!("encode tile function called for {spec:?}")
            });
            let dec = tiling::tiled_decode(
                &latents,
                spec,
                tiling::Finish::default(),
                |_| -> Result<Tensor, TestError> {
                    panic!("decode tile function called for {spec:?}")
                },
            );
            for result in [enc, dec] {
                let err = match result {
                    Err(TestError::Tile(err)) => err,
                    Err(TestError::Candle(err)) => panic!("{spec:?}: candle error {err}"),
                    Ok(_) => panic!("{spec:?}: accepted"),
                };
                let variant = match err {
                    TileError::Tile { tile, .. } => {
                        assert_eq!(tile, spec.tile);
                        "tile"
                    }
                    TileError::Stride { stride, tile, .. } => {
                        assert_eq!((stride, tile), (spec.stride, spec.tile));
                        "stride"
                    }
                    other => panic!("{spec:?}: not a spec error: {other}"),
                };
                assert_eq!(variant, which, "{spec:?}: {err}");
                assert_eq!(spec.validate(), Err(err));
            }
        }
    }
}

/// The `WanVae` methods refuse the same specs (as `Error::Config` carrying the `TileError`
/// message) before they look at the input: an input they would also refuse (2 frames) still
/// gets the tiling error. No fixture numbers; zero inputs.
#[test]
fn wan_vae_tiled_methods_refuse_bad_specs() {
    let vae = vae();
    let video = Tensor::zeros((1, 3, 2, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let latents = Tensor::zeros((1, 16, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    for (spec, _) in bad_specs() {
        let message = format!("tiling: {}", spec.validate().unwrap_err());
        for err in [
            vae.encode_tiled(&video, spec).unwrap_err(),
            vae.encode_posterior_tiled(&video, spec).unwrap_err(),
            vae.decode_tiled(&latents, spec).unwrap_err(),
        ] {
            assert!(
                matches!(&err, Error::Config { reason } if *reason == message),
                "{spec:?}: {err}"
            );
        }
    }
    // A good spec with bad input: the input check, before any tile runs.
    let err = vae.encode_tiled(&video, spec(16, 8)).unwrap_err();
    assert!(matches!(err, Error::FrameCount { frames: 2, .. }), "{err}");
}

/// A 120×200 frame (not a multiple of any tile; seeded ramp input made here, no reference
/// values): tiled encode with 64/48 px cuts 3×5 tiles with partial edge tiles, the latents are
/// 15×25, and decoding them tiled gives a finite 120×200 frame in [-1, 1].
#[test]
fn a_120x200_frame_tiles_with_partial_edge_tiles() {
    let ramp: Vec<f32> = (0..3 * 120 * 200u64)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let video = Tensor::from_vec(ramp, (1, 3, 1, 120, 200), &Device::Cpu).unwrap();
    let vae = vae();
    let tiles = spec(64, 48);
    assert_eq!(tiles.count(120, 200), 3 * 5);
    let z = vae.encode_tiled(&video, tiles).unwrap();
    assert_eq!(z.dims(), [1, 16, 1, 15, 25]);
    assert_finite(&z, "120x200 latents");
    let decoded = vae.decode_tiled(&z, tiles).unwrap();
    assert_eq!(decoded.dims(), [1, 3, 1, 120, 200]);
    assert_finite(&decoded, "120x200 decoded");
    assert!(values(&decoded).iter().all(|v| (-1.0..=1.0).contains(v)));
}

#[test]
fn a_caller_can_stop_a_tiled_pass_between_tiles() {
    let vae = vae();
    let cases = cases();
    let video = case(&cases, "t5_h40_w24.video");
    let mut seen = 0;
    let err = vae
        .encode_posterior_tiled_observed(
            &video,
            spec(24, 16),
            &mut || {
                seen += 1;
                false
            },
            &|| true,
        )
        .unwrap_err();
    assert!(matches!(err, vpipe_models::Error::Stopped), "{err:?}");
    assert_eq!(seen, 1, "stopped after the first tile");
}

/// A stop request inside a tile is heard before the tile's next temporal chunk (encode) or
/// latent frame (decode), not at the tile's end.
#[test]
fn a_caller_can_stop_a_tiled_pass_inside_a_tile() {
    let vae = vae();
    let cases = cases();
    let video = case(&cases, "t5_h40_w24.video");
    let asked = std::cell::Cell::new(0);
    let stop_at_second_chunk = || {
        asked.set(asked.get() + 1);
        asked.get() < 2
    };
    let mut tiles = 0;
    let err = vae
        .encode_posterior_tiled_observed(
            &video,
            spec(48, 40),
            &mut || {
                tiles += 1;
                true
            },
            &stop_at_second_chunk,
        )
        .unwrap_err();
    assert!(matches!(err, vpipe_models::Error::Stopped), "{err:?}");
    assert_eq!(
        (tiles, asked.get()),
        (0, 2),
        "stopped inside the first tile"
    );

    let latents = vae.encode_tiled(&video, spec(48, 40)).unwrap();
    asked.set(0);
    let err = vae
        .decode_tiled_observed(
            &latents,
            spec(48, 40),
            candle_core::DType::F32,
            &mut || true,
            &stop_at_second_chunk,
        )
        .unwrap_err();
    assert!(matches!(err, vpipe_models::Error::Stopped), "{err:?}");
    assert_eq!(asked.get(), 2);
}
