//! Parity of the candle Wan 2.2 VAE (the TI2V-5B VAE: 2×2 patches, residual stages, 16×
//! spatial compression) with diffusers' `AutoencoderKLWan`, untiled and tiled.
//!
//! Every expected number here was made by `tools/fixtures/make_vae22_fixtures.py` (diffusers
//! 0.42.1, torch 2.15.0, fp32, CPU; weight seed 22001, input seed 22002): a tiny VAE with Wan
//! 2.2's structure (base_dim 4, decoder_base_dim 6, z_dim 12, dim_mult [1, 2, 4, 4],
//! num_res_blocks 2, temperal_downsample [false, true, true], is_residual, patch_size 2; the
//! real 196-tensor key set) whose parameters are all re-initialised from that seed, run on
//! smooth synthetic clips. The files are in `tests/fixtures/vae22/`; `vae22_fixtures.json` there
//! records versions, seeds, statistics and the original Wan names of the weights. The script also
//! checked that the original Wan 2.2 code (wan22 2.2.11 `vae2_2.WanVAE_`), loaded with those
//! original names (`strict=True`), gives exactly the diffusers outputs (max abs 0.0).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use vpipe_models::ops::max_abs_diff;
use vpipe_models::tiling::TileSpec;
use vpipe_models::wan::keys;
use vpipe_models::wan::vae::{Config, WanVae, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD};
use vpipe_models::Error;

mod common;
use common::TOL;

/// A file of `tests/fixtures/vae22/`.
fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vae22")
        .join(name)
}

/// Every tensor of `vae22_cases.safetensors`.
fn cases() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("vae22_cases.safetensors"), &Device::Cpu).unwrap()
}

fn case(cases: &HashMap<String, Tensor>, key: &str) -> Tensor {
    cases
        .get(key)
        .unwrap_or_else(|| panic!("fixture tensor {key} missing"))
        .clone()
}

/// `wan22_vae_tiny_diffusers.safetensors`: diffusers names, memory-mapped safetensors.
fn vae(dtype: DType) -> WanVae {
    WanVae::from_file(
        fixture("wan22_vae_tiny_diffusers.safetensors"),
        dtype,
        &common::device(),
    )
    .unwrap()
}

/// The original Wan names of the fixture's weights, as the generator wrote them
/// (`wan_keys` in `vae22_fixtures.json`, checked there against the original code).
fn wan_keys() -> Vec<String> {
    let text = std::fs::read_to_string(fixture("vae22_fixtures.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["wan_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

/// The fixture's weights under original Wan 2.2 names (renamed by
/// `keys::diffusers_to_wan22`, which `key_translation_matches_the_generator` checks), with
/// `prefix` in front, in a safetensors file.
fn wan_layout_file(dir: &tempfile::TempDir, prefix: &str) -> PathBuf {
    let diff = candle_core::safetensors::load(
        fixture("wan22_vae_tiny_diffusers.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let renamed: HashMap<String, Tensor> = diff
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{}", keys::diffusers_to_wan22(&k, 2)), v))
        .collect();
    let path = dir.path().join("wan2.2_vae.safetensors");
    candle_core::safetensors::save(&renamed, &path).unwrap();
    path
}

/// The generator's configuration (`CONFIG` in `make_vae22_fixtures.py`), with no latent
/// statistics (z_dim 12 is no real model's).
fn tiny_config() -> Config {
    Config {
        base_dim: 4,
        decoder_base_dim: Some(6),
        z_dim: 12,
        latents_mean: vec![0.0; 12],
        latents_std: vec![1.0; 12],
        ..Config::wan22()
    }
}

/// Encodes `{clip}.video` and decodes the fixture's `{clip}.mean`; compares mean, logvar,
/// decoded (clamped) and unclamped output with diffusers, each ≤ 1e-4 max abs. Returns the
/// errors (printed with `cargo test -- --nocapture`).
fn check_clip(vae: &WanVae, layout: &str, clip: &str) {
    let c = cases();
    let video = case(&c, &format!("{clip}.video"));
    let post = vae.encode_posterior(&video).unwrap();
    let mean_ref = case(&c, &format!("{clip}.mean"));
    let e_mean = max_abs_diff(&post.mean, &mean_ref).unwrap();
    let e_logvar = max_abs_diff(&post.logvar, &case(&c, &format!("{clip}.logvar"))).unwrap();
    let unclamped_ref = case(&c, &format!("{clip}.decoded_unclamped"));
    let unclamped = vae.decode_unclamped(&mean_ref).unwrap();
    let e_unc = max_abs_diff(&unclamped, &unclamped_ref).unwrap();
    // diffusers' `decode(mean).sample` is exactly the unclamped decode clamped (asserted by
    // the generator).
    let decoded = vae.decode(&mean_ref).unwrap();
    let e_dec = max_abs_diff(&decoded, &unclamped_ref.clamp(-1f64, 1f64).unwrap()).unwrap();
    assert_eq!(decoded.dims(), unclamped_ref.dims());
    eprintln!(
        "{layout} {clip}: mean {e_mean:.2e} logvar {e_logvar:.2e} decoded {e_dec:.2e} \
         unclamped {e_unc:.2e}"
    );
    for (what, e) in [
        ("mean", e_mean),
        ("logvar", e_logvar),
        ("decoded", e_dec),
        ("unclamped", e_unc),
    ] {
        assert!(e <= TOL, "{layout} {clip} {what}: max abs {e} > {TOL}");
    }
}

macro_rules! parity_tests {
    ($($name:ident: $clip:literal;)*) => {$(
        /// Encode and decode of the clip named in the body vs diffusers (fixtures from
        /// `tools/fixtures/make_vae22_fixtures.py`, weight seed 22001), ≤ 1e-4 max abs in f32.
        #[test]
        fn $name() {
            check_clip(&vae(DType::F32), "diffusers", $clip);
        }
    )*};
}

parity_tests! {
    one_frame_16x16: "t1_h16_w16";
    one_frame_48x32: "t1_h48_w32";
    nine_frames_32x16: "t9_h32_w16";
    five_frames_48x80: "t5_h48_w80";
}

/// The same weights under original Wan 2.2 / ComfyUI names, plain and behind ComfyUI's
/// `first_stage_model.` prefix, give the same parity on the 9-frame clip (fixture from
/// `make_vae22_fixtures.py`, seed 22001) and the same configuration.
#[test]
fn wan_layout_names_load_and_match() {
    let dir = tempfile::tempdir().unwrap();
    for prefix in ["", "first_stage_model."] {
        let path = wan_layout_file(&dir, prefix);
        let vae = WanVae::from_file(&path, DType::F32, &common::device()).unwrap();
        assert_eq!(vae.config(), &tiny_config(), "prefix {prefix:?}");
        check_clip(&vae, &format!("wan {prefix}"), "t9_h32_w16");
    }
}

/// The configuration read from the diffusers file's tensor shapes is the one the generator
/// built: residual, 2×2 patches, a decoder base width of its own, 16× spatial compression.
#[test]
fn config_is_detected_from_shapes() {
    let vae = vae(DType::F32);
    let cfg = vae.config();
    assert_eq!(cfg, &tiny_config());
    assert_eq!(cfg.spatial_factor(), 16);
    assert_eq!((cfg.video_in_channels(), cfg.video_out_channels()), (3, 3));
}

/// `keys::diffusers_to_wan22` gives, for every tensor of the diffusers file, the original name
/// the generator gave it (and loaded with `strict=True` into the original Wan 2.2 code), and
/// `keys::wan_to_diffusers` maps each back.
#[test]
fn key_translation_matches_the_generator() {
    let diff = candle_core::safetensors::load(
        fixture("wan22_vae_tiny_diffusers.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut from_diff: Vec<String> = diff
        .keys()
        .map(|k| keys::diffusers_to_wan22(k, 2))
        .collect();
    from_diff.sort();
    let expected = wan_keys();
    assert_eq!(from_diff.len(), 196);
    assert_eq!(from_diff, expected);
    for k in diff.keys() {
        assert_eq!(
            &keys::wan_to_diffusers(&keys::diffusers_to_wan22(k, 2), 2),
            k
        );
    }
}

// ---- Tiling ------------------------------------------------------------------------------------

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Tiled encode (mean, clamped log-variance) and tiled decode (clamped) of `t5_h48_w80` vs
/// diffusers with `enable_tiling(tile_sample_min_*=tile, tile_sample_stride_*=stride)`, ≤ 1e-4
/// max abs each. Fixtures: `t5_h48_w80.tiled.{name}.{mean,logvar,decoded}` from
/// `make_vae22_fixtures.py` (seed 22001). diffusers lays its encode tiles over the video
/// folded into 2×2 patches, so its encode is vpipe's with twice the tile and stride in video
/// pixels; its decode tiles are video pixels already. Also checks that tiling changed the
/// result (by 0.09 to 1.3, `vae22_fixtures.json`), so that the comparison is not an untiled
/// one in disguise.
fn check_tiled_setting(name: &str, tile: usize, stride: usize) {
    let c = cases();
    let vae = vae(DType::F32);
    let clip = "t5_h48_w80";
    let video = case(&c, &format!("{clip}.video"));
    let mean_ref = case(&c, &format!("{clip}.mean"));

    let post = vae
        .encode_posterior_tiled(&video, TileSpec::diffusers(2 * tile, 2 * stride))
        .unwrap();
    let tiled = |what: &str| case(&c, &format!("{clip}.tiled.{name}.{what}"));
    let e_mean = max_abs_diff(&post.mean, &tiled("mean")).unwrap();
    let e_logvar = max_abs_diff(&post.logvar, &tiled("logvar")).unwrap();

    let spec = TileSpec::diffusers(tile, stride);
    let decoded = vae.decode_tiled(&mean_ref, spec).unwrap();
    let e_dec = max_abs_diff(&decoded, &tiled("decoded")).unwrap();
    let unclamped = vae.decode_tiled_unclamped(&mean_ref, spec).unwrap();
    assert_eq!(
        values(&unclamped.clamp(-1f64, 1f64).unwrap()),
        values(&decoded)
    );
    eprintln!("tiled {name}: mean {e_mean:.2e} logvar {e_logvar:.2e} decoded {e_dec:.2e}");
    for (what, e) in [("mean", e_mean), ("logvar", e_logvar), ("decoded", e_dec)] {
        assert!(e <= TOL, "tiled {name} {what}: max abs {e} > {TOL}");
    }
    let untiled_enc = max_abs_diff(&post.mean, &mean_ref).unwrap();
    let untiled_ref = case(&c, &format!("{clip}.decoded_unclamped"))
        .clamp(-1f64, 1f64)
        .unwrap();
    let untiled_dec = max_abs_diff(&decoded, &untiled_ref).unwrap();
    assert!(
        untiled_enc > 0.05 && untiled_dec > 0.5,
        "{name}: tiled output is too close to the untiled one ({untiled_enc}, {untiled_dec})"
    );
}

/// diffusers parity, tile 32 every 16: decode tiles of 2 latents every 1 (3×5 tiles), encode
/// tiles of 32 folded pixels every 16 (2×3). Fixtures: `make_vae22_fixtures.py`, seed 22001,
/// `tile32_stride16`.
#[test]
fn tiled_encode_decode_match_diffusers_tile32_stride16() {
    check_tiled_setting("tile32_stride16", 32, 16);
}

/// diffusers parity, tile 48 every 16: decode tiles of 3 latents every 1, encode tiles of 48
/// folded pixels every 16, edge tiles cut; the encode is tiled although one tile would cover
/// the 24×40 folded frame, because diffusers compares the tile with the unfolded 48×80 frame
/// ([`vpipe_models::tiling::tiled_encode_patches`]). Fixtures: `make_vae22_fixtures.py`, seed 22001,
/// `tile48_stride16`.
#[test]
fn tiled_encode_decode_match_diffusers_tile48_stride16() {
    check_tiled_setting("tile48_stride16", 48, 16);
}

/// A tile covering the frame runs the untiled path: exactly the untiled result, in both
/// layouts (vpipe's own untiled output; no tiled reference needed). (diffusers' layout makes
/// one exception on encode, where diffusers compares its tile with the unfolded frame:
/// `tile48_stride16` above is such a case, tiled although one 48-px folded tile covers the
/// 24×40 folded frame.) The balanced layout's tiles on a frame larger than one tile give a
/// result of the right shape inside [-1, 1].
#[test]
fn a_tile_covering_the_frame_is_exactly_untiled() {
    let c = cases();
    let vae = vae(DType::F32);
    let video = case(&c, "t5_h48_w80.video");
    let mean = case(&c, "t5_h48_w80.mean");
    let untiled_mean = vae.encode(&video).unwrap();
    let untiled_dec = vae.decode(&mean).unwrap();
    for spec in [
        TileSpec::balanced(96, 64),
        TileSpec::balanced(160, 128),
        TileSpec::diffusers(160, 128),
    ] {
        assert_eq!(
            values(&vae.encode_tiled(&video, spec).unwrap()),
            values(&untiled_mean),
            "{spec:?}"
        );
        assert_eq!(
            values(&vae.decode_tiled(&mean, spec).unwrap()),
            values(&untiled_dec),
            "{spec:?}"
        );
    }
    let balanced = vae.decode_tiled(&mean, TileSpec::balanced(48, 32)).unwrap();
    assert_eq!(balanced.dims(), untiled_dec.dims());
    assert!(values(&balanced).iter().all(|v| (-1.0..=1.0).contains(v)));
}

// ---- Hostile input -----------------------------------------------------------------------------

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

/// The encoder takes 12 channels, but a caller gives the video, 3 channels: a video already
/// folded into patches (12 channels) is refused, naming the channel count.
#[test]
fn encode_rejects_a_video_with_the_folded_channel_count() {
    let err = vae(DType::F32)
        .encode(&zeros(&[1, 12, 1, 16, 16]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Channels {
                tensor: "video",
                expected: 3,
                got: 12,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("video: expected 3 channels"),
        "{err}"
    );
}

/// Wan 2.1's 16 latent channels given to this 12-channel VAE, tiled or not: an error naming
/// both counts.
#[test]
fn decode_rejects_the_wrong_latent_channel_count() {
    let vae = vae(DType::F32);
    let latents = zeros(&[1, 16, 1, 2, 2]);
    for err in [
        vae.decode(&latents).unwrap_err(),
        vae.decode_tiled(&latents, TileSpec::DEFAULT).unwrap_err(),
    ] {
        assert!(
            matches!(
                err,
                Error::Channels {
                    tensor: "latents",
                    expected: 12,
                    got: 16,
                    ..
                }
            ),
            "{err}"
        );
    }
}

/// Frames whose sides are multiples of 8 but not of 16 (fine for Wan 2.1) are refused with the
/// factor 16.
#[test]
fn encode_rejects_sizes_not_multiple_of_16() {
    let err = vae(DType::F32)
        .encode(&zeros(&[1, 3, 1, 24, 32]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::SpatialSize {
                tensor: "video",
                height: 24,
                width: 32,
                factor: 16
            }
        ),
        "{err}"
    );
}

/// A tile or stride on Wan 2.1's 8-px grid but not on this VAE's 16-px one is refused before
/// any work, naming the factor.
#[test]
fn tiles_off_the_16_px_grid_are_refused() {
    let vae = vae(DType::F32);
    let video = zeros(&[1, 3, 1, 48, 80]);
    let latents = zeros(&[1, 12, 1, 3, 5]);
    for spec in [TileSpec::diffusers(24, 16), TileSpec::balanced(32, 8)] {
        for err in [
            vae.encode_tiled(&video, spec).unwrap_err(),
            vae.decode_tiled(&latents, spec).unwrap_err(),
        ] {
            assert!(
                matches!(&err, Error::Config { reason } if reason.contains("multiples of 16")),
                "{spec:?}: {err}"
            );
        }
    }
}

// ---- Config ------------------------------------------------------------------------------------

/// The preset is diffusers' Wan 2.2 config (`convert_wan_to_diffusers.py`, `vae22_diffusers_config`,
/// as in `Wan-AI/Wan2.2-TI2V-5B-Diffusers` vae/config.json); such a config.json deserializes into
/// it; inconsistent variants are refused.
#[test]
fn wan22_preset_and_diffusers_config_json() {
    let cfg = Config::wan22();
    cfg.validate().unwrap();
    assert_eq!((cfg.spatial_factor(), cfg.video_in_channels()), (16, 3));
    assert_eq!(Config::wan21().spatial_factor(), 8);
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let json = format!(
        r#"{{"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.0.dev0",
        "attn_scales": [], "base_dim": 160, "decoder_base_dim": 256, "dim_mult": [1, 2, 4, 4],
        "dropout": 0.0, "in_channels": 12, "is_residual": true,
        "latents_mean": [{}], "latents_std": [{}], "num_res_blocks": 2, "out_channels": 12,
        "patch_size": 2, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
        "temperal_downsample": [false, true, true], "z_dim": 48, "clip_output": false}}"#,
        list(&WAN22_LATENTS_MEAN),
        list(&WAN22_LATENTS_STD)
    );
    let parsed: Config = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed, cfg);
    for bad in [
        Config {
            patch_size: Some(0),
            ..Config::wan22()
        },
        Config {
            in_channels: 10,
            ..Config::wan22()
        },
        Config {
            decoder_base_dim: Some(0),
            ..Config::wan22()
        },
        // 160 · 4 cells do not average into 3 · 160 channels.
        Config {
            dim_mult: vec![3, 2, 4, 4],
            ..Config::wan22()
        },
    ] {
        assert!(
            matches!(bad.validate(), Err(Error::Config { .. })),
            "{bad:?}"
        );
    }
}

/// Half precision runs end to end. Reference: the f32 diffusers outputs for `t9_h32_w16`
/// (fixture from `make_vae22_fixtures.py`, seed 22001). The bounds are loose sanity bounds, not
/// a parity claim.
#[test]
fn half_precision_is_close_to_f32() {
    let c = cases();
    let video = case(&c, "t9_h32_w16.video");
    let mean_ref = case(&c, "t9_h32_w16.mean");
    let dec_ref = case(&c, "t9_h32_w16.decoded_unclamped")
        .clamp(-1f64, 1f64)
        .unwrap();
    for (dtype, bound) in [(DType::BF16, 0.15), (DType::F16, 0.05)] {
        let vae = vae(dtype);
        let mean = vae.encode(&video).unwrap();
        assert_eq!(mean.dtype(), dtype);
        let dec = vae.decode(&mean_ref).unwrap();
        let e_enc = max_abs_diff(&mean, &mean_ref).unwrap();
        let e_dec = max_abs_diff(&dec, &dec_ref).unwrap();
        eprintln!("{dtype:?}: encode max abs {e_enc:.2e}, decode max abs {e_dec:.2e}");
        assert!(
            e_enc < bound && e_dec < bound,
            "{dtype:?}: {e_enc}, {e_dec}"
        );
    }
}
