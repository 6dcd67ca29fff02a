//! The DiT over several ranks (threads of this process, [`InProcessCommunicator`]) against the
//! same model on one: Ulysses sequence parallelism ([`WanModel::forward_sharded`]), guidance
//! parallelism and both together ([`WanModel::forward_guided_parallel`]), on the tiny fixtures
//! of `dit_parity.rs` (2 heads × 16) and `dit_ti2v_parity.rs` (per-token timesteps). Four
//! sequence ranks need four heads: the same weights read as 4 heads × 8 (every weight's shape
//! depends on the width alone).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use vpipe_models::ops::max_abs_diff;
use vpipe_models::parallel::{Communicator, InProcessCommunicator};
use vpipe_models::wan::dit::{
    Config, Execution, GuidancePasses, HeldBlocks, ParallelRun, StepRun, WanModel,
};
use vpipe_models::Error;

/// Sharded against whole, f32: the same sums over the same tokens, to rounding.
const TOL: f64 = 1e-5;
/// Long enough for a debug-build forward of the tiny model on a loaded CI machine.
const TIMEOUT: Duration = Duration::from_secs(60);

fn fixture(dir: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(dir)
        .join(name)
}

fn load_cases(dir: &str, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(dir, file), &Device::Cpu).unwrap()
}

fn config(dir: &str, file: &str) -> Config {
    Config::from_diffusers_json(&std::fs::read_to_string(fixture(dir, file)).unwrap()).unwrap()
}

/// The text-to-video fixture model with `heads` heads (2 as made, or 4 × 8 wide).
fn t2v_model(heads: usize) -> WanModel {
    let cfg = Config {
        num_heads: heads,
        ..config("dit", "config.json")
    };
    WanModel::from_file(
        fixture("dit", "dit_tiny_diffusers.safetensors"),
        Some(&cfg),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// Wan 2.2 TI2V's fixture model (a timestep per token) with `heads` heads.
fn ti2v_model(heads: usize) -> WanModel {
    let cfg = Config {
        num_heads: heads,
        ..config("dit_ti2v", "dit_tiny_ti2v_config.json")
    };
    WanModel::from_file(
        fixture("dit_ti2v", "dit_tiny_ti2v_diffusers.safetensors"),
        Some(&cfg),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// Runs `f` on each communicator in a thread of its own; the results in the given order.
fn on_ranks<C: Send, T: Send>(comms: Vec<C>, f: impl Fn(C) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| s.spawn(move || f(comm)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The inputs of a case: latents, timestep, context.
fn inputs(cases: &HashMap<String, Tensor>, case: &str) -> (Tensor, Tensor, Tensor) {
    let get = |k: &str| cases[&format!("{case}.{k}")].clone();
    (
        get("hidden_states"),
        get("timestep"),
        get("encoder_hidden_states"),
    )
}

/// The largest difference of any rank's sharded output from the whole forward's.
fn sharded_error(
    model: &WanModel,
    (x, t, ctx): &(Tensor, Tensor, Tensor),
    ranks: usize,
    execution: &Execution,
) -> f64 {
    let whole = model.forward_planned(x, t, ctx, execution).unwrap();
    let outputs = on_ranks(InProcessCommunicator::group(ranks, TIMEOUT), |comm| {
        model.forward_sharded(x, t, ctx, execution, &comm).unwrap()
    });
    largest_error(&outputs, &whole)
}

/// The largest max |out − whole| over every rank's output.
fn largest_error(outputs: &[Tensor], whole: &Tensor) -> f64 {
    outputs
        .iter()
        .map(|out| max_abs_diff(out, whole).unwrap())
        .fold(0.0, f64::max)
}

#[test]
fn ulysses_on_2_and_4_ranks_matches_one() {
    let cases = load_cases("dit", "dit_cases.safetensors");
    // batch2: 72 tokens (36 or 18 per rank); single: 15 tokens, uneven (8 + 7; 4+4+4+3).
    for (heads, ranks) in [(2, 2), (4, 2), (4, 4)] {
        let model = t2v_model(heads);
        for case in ["batch2", "single"] {
            let err = sharded_error(&model, &inputs(&cases, case), ranks, &Execution::default());
            println!("ulysses {heads} heads, {ranks} ranks, {case}: max abs {err:.3e}");
            assert!(err <= TOL, "{heads} heads, {ranks} ranks, {case}: {err}");
        }
    }
}

#[test]
fn ulysses_with_a_rank_of_padding_alone_matches_one() {
    // 5 tokens over 4 ranks: 2 + 2 + 1 + 0, the last rank holding padding only.
    let model = t2v_model(4);
    let cases = load_cases("dit", "dit_cases.safetensors");
    let (_, _, ctx) = inputs(&cases, "single");
    let x = Tensor::randn(0f32, 1., (1, 16, 1, 2, 10), &Device::Cpu).unwrap();
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let err = sharded_error(&model, &(x, t, ctx), 4, &Execution::default());
    println!("ulysses 5 tokens, 4 ranks: max abs {err:.3e}");
    assert!(err <= TOL, "{err}");
}

#[test]
fn ulysses_in_token_slices_matches_one() {
    // The sliced self-attention path (q, k, v made slice by slice) under sharding.
    let model = t2v_model(2);
    let cases = load_cases("dit", "dit_cases.safetensors");
    let execution = Execution {
        token_slices: 3,
        ..Execution::default()
    };
    for case in ["batch2", "single"] {
        let err = sharded_error(&model, &inputs(&cases, case), 2, &execution);
        println!("ulysses in 3 slices, {case}: max abs {err:.3e}");
        assert!(err <= TOL, "{case}: {err}");
    }
}

#[test]
fn ulysses_with_per_token_timesteps_matches_one() {
    // i2v: the first frame's 24 of 72 tokens at timestep 0, so a shard may hold both runs,
    // one, or the tail of one; per_token: a timestep change at each of 8 tokens.
    let cases = load_cases("dit_ti2v", "dit_ti2v_cases.safetensors");
    for (heads, ranks) in [(2, 2), (4, 4)] {
        let model = ti2v_model(heads);
        for case in ["i2v", "mixed", "per_token"] {
            let err = sharded_error(&model, &inputs(&cases, case), ranks, &Execution::default());
            println!("ulysses TI2V {case}, {ranks} ranks: max abs {err:.3e}");
            assert!(err <= TOL, "{case}, {ranks} ranks: {err}");
        }
    }
}

/// One sample's guided inputs from the batch2 case: its first latents and timestep, the
/// first context as the condition, the second as the uncondition.
fn guided_inputs() -> (Tensor, Tensor, Tensor, Tensor) {
    let cases = load_cases("dit", "dit_cases.safetensors");
    let (x, t, ctx) = inputs(&cases, "batch2");
    let first = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();
    (first(&x, 0), first(&t, 0), first(&ctx, 0), first(&ctx, 1))
}

const SCALE: f64 = 5.0;

/// The (sequence, guidance) communicators of 4 ranks, Ulysses 2 × guidance 2.
fn mesh_2x2() -> Vec<(InProcessCommunicator, InProcessCommunicator)> {
    // Rank (g, s): shard s of pass g (condition 0, uncondition 1). Its sequence group is
    // pass g's ranks, its guidance group the ranks holding shard s.
    let mut sequence: Vec<Vec<_>> = (0..2)
        .map(|_| InProcessCommunicator::group(2, TIMEOUT))
        .collect();
    let mut guidance: Vec<Vec<_>> = (0..2)
        .map(|_| InProcessCommunicator::group(2, TIMEOUT))
        .collect();
    let mut ranks = Vec::new();
    for g in (0..2).rev() {
        for s in (0..2).rev() {
            let seq = sequence[g].remove(s);
            let guide = guidance[s].remove(g);
            assert_eq!((seq.rank(), guide.rank()), (s, g));
            ranks.push((seq, guide));
        }
    }
    ranks
}

#[test]
fn guidance_on_2_ranks_matches_one() {
    let model = t2v_model(2);
    let (x, t, cond, uncond) = guided_inputs();
    let execution = Execution::default();
    let whole = model
        .forward_guided(
            &x,
            &t,
            &cond,
            &uncond,
            SCALE,
            (GuidancePasses::TwoPasses, &execution),
        )
        .unwrap();
    let outputs = on_ranks(InProcessCommunicator::group(2, TIMEOUT), |comm| {
        let run = ParallelRun {
            execution: &execution,
            sequence: None,
            guidance: Some(&comm),
            image: None,
        };
        model
            .forward_guided_parallel(&x, &t, &cond, &uncond, SCALE, run)
            .unwrap()
    });
    let err = largest_error(&outputs, &whole);
    println!("guidance on 2 ranks, every rank: max abs {err:.3e}");
    assert!(err <= TOL, "{err}");
}

#[test]
fn ulysses_times_guidance_on_4_ranks_matches_one() {
    let model = t2v_model(2);
    let (x, t, cond, uncond) = guided_inputs();
    let execution = Execution::default();
    let whole = model
        .forward_guided(
            &x,
            &t,
            &cond,
            &uncond,
            SCALE,
            (GuidancePasses::Sequential, &execution),
        )
        .unwrap();
    let outputs = on_ranks(mesh_2x2(), |(seq, guide)| {
        let run = ParallelRun {
            execution: &execution,
            sequence: Some(&seq),
            guidance: Some(&guide),
            image: None,
        };
        model
            .forward_guided_parallel(&x, &t, &cond, &uncond, SCALE, run)
            .unwrap()
    });
    let err = largest_error(&outputs, &whole);
    println!("ulysses 2 × guidance 2, every rank: max abs {err:.3e}");
    assert!(err <= TOL, "{err}");
}

#[test]
fn image_to_video_ulysses_times_guidance_on_4_ranks_matches_one() {
    // The image-to-video fixture (36 channels, image keys and values in every
    // cross-attention): the image features reach every rank's shard of both passes.
    let cfg = config("dit", "dit_tiny_i2v_config.json");
    let model = WanModel::from_file(
        fixture("dit", "dit_tiny_i2v_diffusers.safetensors"),
        Some(&cfg),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let i2v = load_cases("dit", "dit_i2v_cases.safetensors");
    let (x, t, image, cond) = (
        &i2v["hidden_states"],
        &i2v["timestep"],
        &i2v["encoder_hidden_states_image"],
        &i2v["encoder_hidden_states"],
    );
    let uncond = (cond * -0.5).unwrap();
    let execution = Execution::default();
    let whole = model
        .forward_guided_with(
            x,
            t,
            cond,
            &uncond,
            SCALE,
            StepRun {
                passes: GuidancePasses::TwoPasses,
                execution: &execution,
                cache: None,
                image: Some(image),
            },
            &mut HeldBlocks,
        )
        .unwrap();
    let outputs = on_ranks(mesh_2x2(), |(seq, guide)| {
        let run = ParallelRun {
            execution: &execution,
            sequence: Some(&seq),
            guidance: Some(&guide),
            image: Some(image),
        };
        model
            .forward_guided_parallel(x, t, cond, &uncond, SCALE, run)
            .unwrap()
    });
    let err = largest_error(&outputs, &whole);
    println!("image-to-video, ulysses 2 × guidance 2, every rank: max abs {err:.3e}");
    assert!(err <= TOL, "{err}");
}

/// The message of a collective's error as a forward returns it (candle's wrapped error,
/// which keeps the [`CommError`]'s message).
fn comm_error(err: &Error) -> String {
    match err {
        Error::Candle(candle_core::Error::Wrapped(inner)) => inner.to_string(),
        other => panic!("not a collective's error: {other}"),
    }
}

#[test]
fn a_rank_that_panics_or_returns_early_fails_the_others_at_once() {
    let model = t2v_model(4);
    let cases = load_cases("dit", "dit_cases.safetensors");
    let (x, t, ctx) = inputs(&cases, "batch2");
    let execution = Execution::default();
    for panics in [true, false] {
        let comms = InProcessCommunicator::group(4, TIMEOUT);
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let (x, t, ctx, model, execution) = (&x, &t, &ctx, &model, &execution);
                    s.spawn(move || {
                        if comm.rank() == 2 {
                            if panics {
                                panic!("rank 2 fails on purpose");
                            }
                            return None;
                        }
                        let start = Instant::now();
                        let err = model
                            .forward_sharded(x, t, ctx, execution, &comm)
                            .unwrap_err();
                        Some((err, start.elapsed()))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect::<Vec<_>>()
        });
        let mut messages = Vec::new();
        for (rank, result) in results.into_iter().enumerate() {
            match (rank, result) {
                (2, Err(_)) if panics => {}
                (2, Ok(None)) if !panics => {}
                (_, Ok(Some((err, elapsed)))) => {
                    println!("rank {rank} after {elapsed:?}: {err}");
                    // A rank may first see another survivor leave, after that one failed.
                    let message = comm_error(&err);
                    assert!(message.contains("left the group"), "{message}");
                    messages.push(message);
                    // At once: far within the timeout.
                    assert!(elapsed < TIMEOUT / 4, "{elapsed:?}");
                }
                (rank, other) => panic!("rank {rank}: unexpected {:?}", other.is_ok()),
            }
        }
        assert!(
            messages.iter().any(|m| m.contains("rank 2 left the group")),
            "{messages:?}"
        );
    }
}

#[test]
fn a_rank_that_stops_fails_the_others_after_the_timeout() {
    let model = t2v_model(2);
    let cases = load_cases("dit", "dit_cases.safetensors");
    let (x, t, ctx) = inputs(&cases, "single");
    let timeout = Duration::from_millis(500);
    let results = on_ranks(InProcessCommunicator::group(2, timeout), |comm| {
        if comm.rank() == 1 {
            // Holds its end of the group but never calls.
            std::thread::sleep(timeout * 6);
            return None;
        }
        let start = Instant::now();
        let err = model
            .forward_sharded(&x, &t, &ctx, &Execution::default(), &comm)
            .unwrap_err();
        Some((err, start.elapsed()))
    });
    let (err, elapsed) = results[0].as_ref().unwrap();
    println!("rank 0 after {elapsed:?}: {err}");
    let message = comm_error(err);
    assert!(
        message.contains("rank 1 sent nothing") && message.contains("within 500ms"),
        "{message}"
    );
    assert!(*elapsed < timeout * 4, "{elapsed:?}");
}

#[test]
fn heads_that_do_not_divide_among_the_ranks_are_an_error() {
    let model = t2v_model(2);
    let cases = load_cases("dit", "dit_cases.safetensors");
    let (x, t, ctx) = inputs(&cases, "single");
    // Refused before any collective: one rank alone gets the error, nothing waits.
    let comms = InProcessCommunicator::group(4, Duration::from_secs(1));
    let err = model
        .forward_sharded(&x, &t, &ctx, &Execution::default(), &comms[0])
        .unwrap_err();
    assert!(matches!(err, Error::DitConfig { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("2 heads") && message.contains("4 ranks"),
        "{message}"
    );
}

#[test]
fn guidance_over_other_than_two_ranks_is_an_error() {
    let model = t2v_model(2);
    let (x, t, cond, uncond) = guided_inputs();
    let comms = InProcessCommunicator::group(3, Duration::from_secs(1));
    let run = ParallelRun {
        execution: &Execution::default(),
        sequence: None,
        guidance: Some(&comms[0]),
        image: None,
    };
    let err = model
        .forward_guided_parallel(&x, &t, &cond, &uncond, SCALE, run)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DitInput {
                tensor: "guidance",
                ..
            }
        ),
        "{err}"
    );
}
