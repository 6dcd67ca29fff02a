//! Inputs a caller may pass by mistake or on purpose: each is a typed error naming the input,
//! never a panic, an abort or an allocation sized from a bogus size. And float8 checkpoints
//! without scales: every tensor of the DiT in plain e4m3 loads and computes what its f32 twin
//! does.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vpipe_models::ops::attention::AttentionKernel;
use vpipe_models::ops::max_abs_diff;
use vpipe_models::tiling::{
    halving_on_failure, tiled_decode, tiled_encode, Finish, TileError, TileSpec, MAX_FRAME_SIDE,
};
use vpipe_models::wan::dit::{Config, Execution, GuidancePasses, Rope, WanModel, MAX_TOKENS};
use vpipe_models::wan::WanVae;
use vpipe_models::Error;

mod common;

fn dit_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dit")
        .join(name)
}

/// The fixture DiT's config: 16 latent channels, text_dim 24, patch (1, 2, 2).
fn dit_config() -> Config {
    Config::from_diffusers_json(&std::fs::read_to_string(dit_fixture("config.json")).unwrap())
        .unwrap()
}

fn tiny_dit() -> WanModel {
    WanModel::from_file(
        dit_fixture("dit_tiny_wan.safetensors"),
        Some(&dit_config()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

/// Valid inputs for one sample: latents [1, 16, 1, 4, 6], t = 500, 5 context rows.
fn valid_inputs() -> (Tensor, Tensor, Tensor) {
    (
        zeros(&[1, 16, 1, 4, 6]),
        Tensor::new(&[500f32], &Device::Cpu).unwrap(),
        zeros(&[1, 5, 24]),
    )
}

/// The DiT refuses with `DitInput` naming `tensor`, and a reason containing `needle`.
fn assert_dit_input(result: vpipe_models::Result<Tensor>, tensor: &str, needle: &str) {
    match result {
        Err(Error::DitInput { tensor: t, reason }) => {
            assert_eq!(t, tensor, "{reason}");
            assert!(
                reason.contains(needle),
                "{tensor}: {reason:?} lacks {needle:?}"
            );
        }
        other => panic!("expected DitInput for {tensor}, got {other:?}"),
    }
}

#[test]
fn the_valid_inputs_run() {
    let (latents, t, context) = valid_inputs();
    let out = tiny_dit().forward(&latents, &t, &context).unwrap();
    assert_eq!(out.dims(), latents.dims());
}

#[test]
fn an_empty_text_context_is_a_typed_error() {
    let model = tiny_dit();
    let (latents, t, _) = valid_inputs();
    assert_dit_input(
        model.forward(&latents, &t, &zeros(&[1, 0, 24])),
        "encoder_hidden_states",
        "L = 0",
    );
    // Also through guidance, whichever way it runs.
    for passes in [
        GuidancePasses::Batched,
        GuidancePasses::TwoPasses,
        GuidancePasses::Sequential,
    ] {
        let empty = zeros(&[1, 0, 24]);
        let result = model.forward_guided(
            &latents,
            &t,
            &empty,
            &empty,
            5.0,
            (passes, &Execution::default()),
        );
        assert_dit_input(result, "encoder_hidden_states", "L = 0");
    }
}

#[test]
fn zero_sized_latent_dimensions_are_a_typed_error() {
    let model = tiny_dit();
    let (_, t, context) = valid_inputs();
    for shape in [
        [1, 16, 0, 4, 6],
        [1, 16, 1, 0, 6],
        [1, 16, 1, 4, 0],
        [1, 0, 1, 4, 6],
    ] {
        assert_dit_input(
            model.forward(&zeros(&shape), &t, &context),
            "hidden_states",
            "",
        );
    }
    // An empty batch with inputs that agree on it.
    assert_dit_input(
        model.forward(&zeros(&[0, 16, 1, 4, 6]), &zeros(&[0]), &zeros(&[0, 5, 24])),
        "hidden_states",
        "empty dimension",
    );
    // Wrong ranks.
    assert_dit_input(
        model.forward(&zeros(&[16, 1, 4, 6]), &t, &context),
        "hidden_states",
        "expected [B, 16, F, H, W]",
    );
    assert_dit_input(
        model.forward(&zeros(&[1, 16, 1, 4, 6]), &t, &zeros(&[5, 24])),
        "encoder_hidden_states",
        "expected [B, L, 24]",
    );
    // Sides that are not multiples of the patch.
    assert_dit_input(
        model.forward(&zeros(&[1, 16, 1, 3, 6]), &t, &context),
        "hidden_states",
        "patch size",
    );
}

#[test]
fn mismatched_batches_are_a_typed_error() {
    let model = tiny_dit();
    let (latents, t, context) = valid_inputs();
    let two = Tensor::new(&[500f32, 400.0], &Device::Cpu).unwrap();
    assert_dit_input(
        model.forward(&zeros(&[2, 16, 1, 4, 6]), &two, &context),
        "encoder_hidden_states",
        "expected [2, L, 24]",
    );
    assert_dit_input(
        model.forward(&zeros(&[2, 16, 1, 4, 6]), &t, &zeros(&[2, 5, 24])),
        "timestep",
        "expected [2]",
    );
    assert_dit_input(
        model.forward(&latents, &two, &context),
        "timestep",
        "expected [1]",
    );
    // [B] only: a [1, 1] timestep is not one.
    assert_dit_input(
        model.forward(&latents, &zeros(&[1, 1]), &context),
        "timestep",
        "",
    );
    // Batched guidance needs condition and uncondition of one shape.
    assert_dit_input(
        model.forward_guided(
            &latents,
            &t,
            &context,
            &zeros(&[1, 7, 24]),
            5.0,
            (GuidancePasses::Batched, &Execution::default()),
        ),
        "encoder_hidden_states",
        "differ in shape",
    );
    // A wrong text width.
    assert_dit_input(
        model.forward(&latents, &t, &zeros(&[1, 5, 23])),
        "encoder_hidden_states",
        "expected [1, L, 24]",
    );
}

#[test]
fn a_non_finite_timestep_is_a_typed_error() {
    let model = tiny_dit();
    let (latents, _, context) = valid_inputs();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let t = Tensor::new(&[bad], &Device::Cpu).unwrap();
        assert_dit_input(
            model.forward(&latents, &t, &context),
            "timestep",
            "not a finite number",
        );
    }
    // One bad value among good ones.
    let t = Tensor::new(&[500f32, f32::NAN], &Device::Cpu).unwrap();
    assert_dit_input(
        model.forward(&zeros(&[2, 16, 1, 4, 6]), &t, &zeros(&[2, 5, 24])),
        "timestep",
        "NaN",
    );
    let (latents, t, context) = valid_inputs();
    assert_dit_input(
        model.forward_guided(
            &latents,
            &t,
            &context,
            &context,
            f64::NAN,
            (GuidancePasses::TwoPasses, &Execution::default()),
        ),
        "guidance",
        "not a finite number",
    );
}

#[test]
fn a_huge_token_grid_is_refused_before_any_table_is_made() {
    // A broadcast view: the latent of 2^22 tokens takes no memory, its tables would.
    let model = tiny_dit();
    let (_, t, context) = valid_inputs();
    let latents = zeros(&[1, 1, 1, 1, 1])
        .broadcast_as((1, 16, 1024, 64, 256))
        .unwrap();
    assert_dit_input(
        model.forward(&latents, &t, &context),
        "hidden_states",
        "tokens per sample",
    );
    let huge = Rope::new(128, [1024, 1024, 1024], usize::MAX, &Device::Cpu).unwrap_err();
    assert!(huge.to_string().contains("tokens"), "{huge}");
    let overflow = Rope::new(128, [usize::MAX, 2, 2], usize::MAX, &Device::Cpu).unwrap_err();
    assert!(matches!(overflow, Error::DitInput { .. }), "{overflow}");
    assert!(Rope::new(128, [0, 2, 2], 1024, &Device::Cpu).is_err());
    assert!(Rope::new(1 << 40, [1, 1, 2], 1024, &Device::Cpu).is_err());
    // The cap leaves room for an 81-frame 1280×720 video (21 × 45 × 80 tokens).
    const { assert!(MAX_TOKENS >= 21 * 45 * 80) };
}

#[test]
fn estimates_from_absurd_sizes_saturate_instead_of_overflowing() {
    let cfg = Config::wan21_t2v_14b();
    let execution = Execution {
        attention: AttentionKernel::Chunked,
        attention_scratch: u64::MAX,
        token_slices: 1,
        matmul: vpipe_models::ops::linear::MatmulPrecision::Fp8,
    };
    let bytes = cfg.activation_bytes_estimate(DType::F32, usize::MAX, usize::MAX, &execution, true);
    assert_eq!(bytes, u64::MAX);
    let absurd = Config {
        dim: 1 << 40,
        num_heads: 1 << 33,
        ..cfg
    };
    assert_eq!(absurd.parameter_count(), u64::MAX);
    assert!(matches!(absurd.validate(), Err(Error::DitConfig { .. })));
}

// ---- Tiler ----------------------------------------------------------------------------------

#[test]
fn huge_frames_are_refused_by_the_tiler_without_allocating() {
    const HUGE: usize = 18_446_744_073_709_551_600;
    for spec in [TileSpec::DEFAULT, TileSpec::diffusers(256, 192)] {
        for (h, w) in [
            (HUGE, 16),
            (16, HUGE),
            (HUGE, HUGE),
            (MAX_FRAME_SIDE + 8, 480),
            (0, 480),
        ] {
            let err = spec.try_count(h, w).unwrap_err();
            assert!(matches!(err, TileError::Frame { .. }), "{err}");
            assert!(spec.try_tile_shapes(h, w).is_err());
            assert!(spec.try_largest_tile(h, w).is_err());
            assert!(spec.try_strip_pixels(h, w).is_err());
            // The infallible forms answer at once with nothing.
            assert_eq!(spec.count(h, w), 0);
            assert!(spec.tile_shapes(h, w).is_empty());
            assert_eq!(spec.largest_tile(h, w), (0, 0));
            assert_eq!(spec.strip_pixels(h, w), 0);
        }
        // The largest frame allowed has a plan.
        let side = MAX_FRAME_SIDE;
        assert!(spec.try_count(side, side).unwrap() > 1);
        assert!(spec.try_largest_tile(side, side).unwrap().0 <= 256);
        assert!(spec.try_strip_pixels(side, side).unwrap() > 0);
    }
    // A spec validate refuses is refused here too (stride 0 used to loop or divide by 0).
    for spec in [
        TileSpec::diffusers(256, 0),
        TileSpec::balanced(256, 0),
        TileSpec::balanced(0, 0),
    ] {
        assert!(matches!(
            spec.try_count(480, 832),
            Err(TileError::Stride { .. } | TileError::Tile { .. })
        ));
        assert_eq!(spec.count(480, 832), 0);
        assert_eq!(spec.strip_pixels(480, 832), 0);
    }
}

#[test]
fn the_tiled_passes_refuse_huge_or_empty_frames_before_the_first_tile() {
    let never = |_: &Tensor| -> vpipe_models::Result<Tensor> {
        panic!("no tile may run for a refused frame")
    };
    // Views of absurd size: no memory behind them.
    let wide_video = zeros(&[1, 1, 1, 1, 1])
        .broadcast_as((1, 3, 1, 64, MAX_FRAME_SIDE + 64))
        .unwrap();
    let err = tiled_encode(&wide_video, TileSpec::DEFAULT, never).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("16384"), "{err}");
    let wide_latents = zeros(&[1, 1, 1, 1, 1])
        .broadcast_as((1, 16, 1, 8, usize::MAX / 4))
        .unwrap();
    let err = tiled_decode(&wide_latents, TileSpec::DEFAULT, Finish::default(), never).unwrap_err();
    assert!(err.to_string().contains("16384"), "{err}");
    for shape in [[1, 3, 1, 0, 64], [0, 3, 1, 64, 64]] {
        let err = tiled_encode(&zeros(&shape), TileSpec::DEFAULT, never).unwrap_err();
        assert!(err.to_string().contains("no empty dimension"), "{err}");
    }
    let err = tiled_decode(
        &zeros(&[1, 16, 8, 8]),
        TileSpec::DEFAULT,
        Finish::default(),
        never,
    )
    .unwrap_err();
    assert!(err.to_string().contains("[B, C, T, h, w]"), "{err}");
}

#[test]
fn halving_ends_even_when_every_tile_fails_and_no_floor_is_given() {
    let mut attempts = 0;
    let result = halving_on_failure(
        TileSpec::DEFAULT,
        0,
        |_: &&str| true,
        |_, _| {},
        |_| {
            attempts += 1;
            Err::<(), _>("out of memory")
        },
    );
    assert!(result.is_err());
    // 256, 128, 64, 32, 16, 8 px.
    assert_eq!(attempts, 6);
}

// ---- VAE ------------------------------------------------------------------------------------

fn tiny_vae() -> WanVae {
    WanVae::from_file(
        common::fixture("wan_vae_tiny_diffusers.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn the_vae_refuses_empty_and_huge_inputs_with_typed_errors() {
    let vae = tiny_vae();
    let z = vae.config().z_dim;
    for shape in [[1, z, 0, 2, 2], [1, z, 1, 0, 2], [0, z, 1, 2, 2]] {
        let latents = zeros(&shape);
        assert!(
            matches!(vae.decode(&latents), Err(Error::Empty { .. })),
            "{shape:?}"
        );
        assert!(matches!(
            vae.decode_tiled(&latents, TileSpec::DEFAULT),
            Err(Error::Empty { .. })
        ));
    }
    assert!(matches!(
        vae.encode(&zeros(&[1, 3, 1, 0, 8])),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        vae.encode(&zeros(&[3, 1, 8, 8])),
        Err(Error::Rank { .. })
    ));
    // A latent frame whose pixels would pass the frame limit, as a view of no memory.
    let huge = zeros(&[1, 1, 1, 1, 1])
        .broadcast_as((1, z, 1, 8, MAX_FRAME_SIDE / 8 + 1))
        .unwrap();
    for result in [
        vae.decode(&huge),
        vae.decode_tiled(&huge, TileSpec::DEFAULT),
    ] {
        match result {
            Err(Error::TooLarge { tensor, reason }) => {
                assert_eq!(tensor, "latents");
                assert!(reason.contains("16384"), "{reason}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }
    let huge_video = zeros(&[1, 1, 1, 1, 1])
        .broadcast_as((1, 3, 1, MAX_FRAME_SIDE + 8, 8))
        .unwrap();
    assert!(matches!(
        vae.encode(&huge_video),
        Err(Error::TooLarge { .. })
    ));
}

// ---- Plain float8 ---------------------------------------------------------------------------

/// The fixture DiT with every floating tensor in plain e4m3 (no scale in the file), given a
/// `scale_weight` of exactly 1 next to each `…weight` as the `vpipe` binary does; and its f32
/// twin, the same e4m3 values in f32. Linear weights stay float8; norms, modulation tables,
/// biases and the patch embedding are converted on load (on CUDA through the host, see
/// `ops::linear::get_in_dtype`).
#[test]
fn a_plain_fp8_dit_matches_its_f32_twin() {
    let device = common::device();
    let file =
        candle_core::safetensors::load(dit_fixture("dit_tiny_wan.safetensors"), &Device::Cpu)
            .unwrap();
    let mut fp8 = HashMap::new();
    let mut twin = HashMap::new();
    for (name, tensor) in file {
        let stored = tensor.to_dtype(DType::F8E4M3).unwrap();
        twin.insert(name.clone(), stored.to_dtype(DType::F32).unwrap());
        if let Some(stem) = name.strip_suffix("weight") {
            fp8.insert(
                format!("{stem}scale_weight"),
                Tensor::new(1f32, &Device::Cpu).unwrap(),
            );
        }
        fp8.insert(name, stored);
    }
    let cfg = dit_config();
    let build = |tensors: HashMap<String, Tensor>| {
        WanModel::from_checkpoint(
            VarBuilder::from_tensors(tensors, DType::F32, &device),
            Some(&cfg),
        )
        .unwrap()
    };
    let (plain, reference) = (build(fp8), build(twin));
    let latents = Tensor::randn(0f32, 1.0, (1, 16, 2, 4, 6), &device).unwrap();
    let t = Tensor::new(&[731.5f32], &device).unwrap();
    let context = Tensor::randn(0f32, 1.0, (1, 7, 24), &device).unwrap();
    let out = plain.forward(&latents, &t, &context).unwrap();
    let expected = reference.forward(&latents, &t, &context).unwrap();
    let finite = out
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite());
    assert!(finite);
    let err = max_abs_diff(&out, &expected).unwrap();
    assert!(err <= 1e-5, "plain fp8 vs f32 twin: max abs {err}");
}
