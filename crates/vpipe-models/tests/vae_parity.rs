//! Parity of the candle Wan VAE with diffusers' `AutoencoderKLWan`.
//!
//! Every expected number here was made by `tools/fixtures/make_vae_fixtures.py` (diffusers
//! 0.42.1, torch 2.15.0, fp32, CPU; weight seed 21001): a tiny VAE with the real structure
//! (base_dim 4, z_dim 16, dim_mult [1, 2, 4, 4], num_res_blocks 2, temperal_downsample
//! [false, true, true]; the real 194-tensor key set) whose parameters are all re-initialised from
//! that seed, run on clips cut from scikit-image stills. The files are in `tests/fixtures/vae/`;
//! `vae_fixtures.json` there records versions, seeds and statistics. The script also checked
//! that the original Wan code (wan22 2.2.11 `WanVAE_`), loaded with the original-named weights
//! (`strict=True`), gives exactly the diffusers outputs (max abs 0.0).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vpipe_models::ops::max_abs_diff;
use vpipe_models::wan::keys::{self, KeyLayout};
use vpipe_models::wan::vae::{Config, WanVae, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD};
use vpipe_models::Error;

mod common;
use common::{case, cases, fixture, TOL};

/// `wan_vae_tiny_diffusers.safetensors`: diffusers names, memory-mapped safetensors.
fn vae_diffusers(dtype: DType) -> WanVae {
    WanVae::from_file(
        fixture("wan_vae_tiny_diffusers.safetensors"),
        dtype,
        &common::device(),
    )
    .unwrap()
}

/// `wan_vae_tiny_wan.pth`: original Wan names, torch.save state dict.
fn vae_wan(dtype: DType) -> WanVae {
    WanVae::from_file(fixture("wan_vae_tiny_wan.pth"), dtype, &common::device()).unwrap()
}

fn tiny_config() -> Config {
    Config {
        base_dim: 4,
        ..Config::wan21()
    }
}

/// Encodes `{clip}.video` and decodes the fixture's `{clip}.mean`; compares mean, logvar,
/// decoded (clamped) and unclamped output with diffusers, each ≤ 1e-4 max abs. Prints the
/// measured errors (`cargo test -- --nocapture`).
fn check_clip(vae: &WanVae, layout: &str, clip: &str) {
    let c = cases();
    let video = case(&c, &format!("{clip}.video"));
    let post = vae.encode_posterior(&video).unwrap();
    let mean_ref = case(&c, &format!("{clip}.mean"));
    let e_mean = max_abs_diff(&post.mean, &mean_ref).unwrap();
    let e_logvar = max_abs_diff(&post.logvar, &case(&c, &format!("{clip}.logvar"))).unwrap();
    let decoded = vae.decode(&mean_ref).unwrap();
    let e_dec = max_abs_diff(&decoded, &case(&c, &format!("{clip}.decoded"))).unwrap();
    let unclamped = vae.decode_unclamped(&mean_ref).unwrap();
    let e_unc = max_abs_diff(&unclamped, &case(&c, &format!("{clip}.decoded_unclamped"))).unwrap();
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
    ($($name:ident: $loader:ident, $layout:literal, $clip:literal;)*) => {$(
        /// Encode and decode of the clip named in the body vs diffusers (fixtures from
        /// `tools/fixtures/make_vae_fixtures.py`, weight seed 21001), ≤ 1e-4 max abs in f32.
        #[test]
        fn $name() {
            check_clip(&$loader(DType::F32), $layout, $clip);
        }
    )*};
}

parity_tests! {
    diffusers_layout_1_frame_8x8: vae_diffusers, "diffusers", "t1_h8_w8";
    diffusers_layout_1_frame_56x72: vae_diffusers, "diffusers", "t1_h56_w72";
    diffusers_layout_5_frames_40x24: vae_diffusers, "diffusers", "t5_h40_w24";
    diffusers_layout_9_frames_24x16: vae_diffusers, "diffusers", "t9_h24_w16";
    wan_layout_1_frame_8x8: vae_wan, "wan", "t1_h8_w8";
    wan_layout_1_frame_56x72: vae_wan, "wan", "t1_h56_w72";
    wan_layout_5_frames_40x24: vae_wan, "wan", "t5_h40_w24";
    wan_layout_9_frames_24x16: vae_wan, "wan", "t9_h24_w16";
}

/// The configuration read from the tensor shapes of both fixture files is the one the generator
/// built (`CONFIG` in `make_vae_fixtures.py`), with Wan 2.1's latent statistics (z_dim 16).
#[test]
fn config_is_detected_from_shapes_in_both_layouts() {
    assert_eq!(vae_diffusers(DType::F32).config(), &tiny_config());
    assert_eq!(vae_wan(DType::F32).config(), &tiny_config());
}

/// Original names in a safetensors file, behind ComfyUI's `first_stage_model.` prefix: the
/// `.pth` fixture's tensors re-saved by candle. Decode must still match diffusers' output for
/// `t9_h24_w16` (fixture from `make_vae_fixtures.py`, seed 21001).
#[test]
fn wan_layout_safetensors_with_prefix() {
    let pth = candle_core::pickle::read_all(fixture("wan_vae_tiny_wan.pth")).unwrap();
    assert_eq!(pth.len(), 194);
    let renamed: HashMap<String, Tensor> = pth
        .into_iter()
        .map(|(k, v)| (format!("first_stage_model.{k}"), v))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wan_2.1_vae.safetensors");
    candle_core::safetensors::save(&renamed, &path).unwrap();
    let vae = WanVae::from_file(&path, DType::F32, &Device::Cpu).unwrap();
    check_clip(&vae, "wan+prefix", "t9_h24_w16");
}

/// The diffusers file's keys, translated by `keys::diffusers_to_wan`, are exactly the `.pth`
/// file's keys (which the generator made with its own inverse map and checked against the
/// original Wan code with a strict load).
#[test]
fn key_translation_matches_fixture_files() {
    let diff =
        candle_core::safetensors::load(fixture("wan_vae_tiny_diffusers.safetensors"), &Device::Cpu)
            .unwrap();
    let wan = candle_core::pickle::read_all(fixture("wan_vae_tiny_wan.pth")).unwrap();
    let mut from_diff: Vec<String> = diff.keys().map(|k| keys::diffusers_to_wan(k, 2)).collect();
    let mut wan_keys: Vec<String> = wan.iter().map(|(k, _)| k.clone()).collect();
    from_diff.sort();
    wan_keys.sort();
    assert_eq!(from_diff.len(), 194);
    assert_eq!(from_diff, wan_keys);
    for k in diff.keys() {
        assert_eq!(&keys::wan_to_diffusers(&keys::diffusers_to_wan(k, 2), 2), k);
    }
}

#[test]
fn layout_detection() {
    let diff = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[fixture("wan_vae_tiny_diffusers.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    assert_eq!(keys::detect_layout(&diff), Some((KeyLayout::Diffusers, "")));
    let wan =
        VarBuilder::from_pth(fixture("wan_vae_tiny_wan.pth"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(keys::detect_layout(&wan), Some((KeyLayout::Wan, "")));
    let empty = VarBuilder::from_tensors(HashMap::new(), DType::F32, &Device::Cpu);
    assert!(matches!(
        WanVae::from_checkpoint(empty),
        Err(Error::UnknownLayout { .. })
    ));
}

/// Half precision runs end to end (weights converted on load, activations in the dtype,
/// matmuls of bf16 in f32 on the CPU). Reference: the f32 diffusers outputs for `t5_h40_w24`
/// (fixture from `make_vae_fixtures.py`, seed 21001). The bounds are loose sanity bounds, set
/// from measurement (printed with `--nocapture`), not a parity claim.
#[test]
fn half_precision_is_close_to_f32() {
    let c = cases();
    let video = case(&c, "t5_h40_w24.video");
    let mean_ref = case(&c, "t5_h40_w24.mean");
    let dec_ref = case(&c, "t5_h40_w24.decoded");
    for (dtype, bound) in [(DType::BF16, 0.15), (DType::F16, 0.05)] {
        let vae = vae_wan(dtype);
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

// ---- Bad input ---------------------------------------------------------------------------------

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn encode_rejects_wrong_channel_count() {
    let err = vae_wan(DType::F32)
        .encode(&zeros(&[1, 4, 1, 8, 8]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Channels {
                tensor: "video",
                expected: 3,
                got: 4,
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

#[test]
fn encode_rejects_frame_counts_other_than_1_plus_4k() {
    let vae = vae_wan(DType::F32);
    for (t, below, above) in [(2, 1, 5), (4, 1, 5), (6, 5, 9), (8, 5, 9)] {
        let err = vae.encode(&zeros(&[1, 3, t, 8, 8])).unwrap_err();
        match &err {
            Error::FrameCount {
                tensor: "video",
                frames,
                below: b,
                above: a,
            } => assert_eq!((*frames, *b, *a), (t, below, above)),
            other => panic!("T = {t}: {other}"),
        }
        assert!(err.to_string().contains("1 + 4k"), "{err}");
    }
}

#[test]
fn encode_and_decode_reject_empty_tensors() {
    let vae = vae_wan(DType::F32);
    for shape in [[0, 3, 1, 8, 8], [1, 3, 0, 8, 8], [1, 3, 1, 0, 8]] {
        let err = vae.encode(&zeros(&shape)).unwrap_err();
        assert!(
            matches!(&err, Error::Empty { tensor: "video", shape: s } if s == &shape),
            "{err}"
        );
    }
    let err = vae.decode(&zeros(&[1, 16, 0, 2, 2])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Empty {
                tensor: "latents",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn encode_rejects_sizes_not_multiple_of_8() {
    let err = vae_wan(DType::F32)
        .encode(&zeros(&[1, 3, 1, 12, 16]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::SpatialSize {
                tensor: "video",
                height: 12,
                width: 16,
                factor: 8
            }
        ),
        "{err}"
    );
}

#[test]
fn wrong_rank_and_latent_channels_are_errors() {
    let vae = vae_wan(DType::F32);
    let err = vae.encode(&zeros(&[3, 1, 8, 8])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Rank {
                tensor: "video",
                ..
            }
        ),
        "{err}"
    );
    let err = vae.decode(&zeros(&[1, 4, 1, 2, 2])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Channels {
                tensor: "latents",
                expected: 16,
                got: 4,
                ..
            }
        ),
        "{err}"
    );
}

// ---- Config and latent normalisation -----------------------------------------------------------

/// The preset is diffusers' `AutoencoderKLWan()` default config (0.42.1) and Wan 2.1's
/// `_video_vae` arguments; a diffusers `config.json` deserializes into it.
#[test]
fn wan21_preset_and_diffusers_config_json() {
    let cfg = Config::wan21();
    assert_eq!((cfg.base_dim, cfg.z_dim, cfg.num_res_blocks), (96, 16, 2));
    assert_eq!(cfg.dim_mult, [1, 2, 4, 4]);
    assert_eq!(cfg.temperal_downsample, [false, true, true]);
    cfg.validate().unwrap();
    // Abridged `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` vae/config.json.
    let json = r#"{"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0.dev0",
        "attn_scales": [], "base_dim": 96, "dim_mult": [1, 2, 4, 4], "dropout": 0.0,
        "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                         0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
        "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
        "num_res_blocks": 2, "temperal_downsample": [false, true, true], "z_dim": 16}"#;
    let parsed: Config = serde_json::from_str(json).unwrap();
    assert_eq!(parsed, cfg);
    let bad = Config {
        temperal_downsample: vec![true],
        ..Config::wan21()
    };
    assert!(matches!(bad.validate(), Err(Error::Config { .. })));
}

#[test]
fn latent_normalisation_round_trips() {
    let vae = vae_wan(DType::F32);
    let z = Tensor::ones((1, 16, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let n = vae.normalize_latents(&z).unwrap();
    let got = n.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (c, g) in got.iter().enumerate() {
        let want = (1.0 - WAN21_LATENTS_MEAN[c]) / WAN21_LATENTS_STD[c];
        assert!(
            (*g as f64 - want).abs() < 1e-6,
            "channel {c}: {g} vs {want}"
        );
    }
    let back = vae.denormalize_latents(&n).unwrap();
    assert!(max_abs_diff(&back, &z).unwrap() < 1e-6);
}
