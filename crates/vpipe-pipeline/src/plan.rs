//! The plan of a run: what each phase of a run will hold in the compute tier, the tile and the
//! attention chunk it will use, its **estimated** peak, and whether the run fits the budget —
//! without loading any weight. `vpipe run` makes the same plan first and refuses to start
//! when it does not fit.
//!
//! Weights are counted exactly (from the file headers, or the preset's architecture).
//! Activations are estimates: the DiT's from its block structure
//! ([`DitConfig::activation_bytes_estimate`], 1 % under the H100 measurement with the fused
//! attention kernel in BENCHMARKS.md), the VAE's from per-pixel constants measured on the H100 (256-px tiles,
//! 2026-11-27), the text encoder's from its layer structure.

use candle_core::DType;
use serde::Serialize;
use vpipe_mem::fmt_bytes;
use vpipe_models::ops::attention::{AttentionKernel, QueryChunk};
use vpipe_models::ops::linear::MatmulPrecision;
use vpipe_models::wan::dit::{Execution, DEFAULT_ATTENTION_SCRATCH};
use vpipe_models::wan::{dit_keys, BlockPart, DitConfig, GuidancePasses};
use vpipe_text::umt5::{keys as umt5_keys, Config as Umt5Config};

use crate::error::{Error, Result};
use crate::family::{ModelFamily, VaeSizes};
use crate::models::{Checkpoint, ModelFiles};
use crate::options::{Compute, RunOptions};
use crate::step_cache::{CacheRule, MagCacheSettings, StepCache};

/// The VAE's memory model on one kind of device: activation bytes per (base channel × tile
/// pixel × element byte), and the copies of its weights it makes beyond the resident ones.
struct VaeMemoryModel {
    encode_bytes_per_unit: u64,
    decode_bytes_per_unit: u64,
    /// The decoder of a VAE that folds frames into patches (Wan 2.2), on the folded pixels.
    folded_decode_bytes_per_unit: u64,
    weight_copies: f64,
}

/// Measured on the H100 (full-size VAE, bf16, 256-px tiles, 81 frames, channels-last CUDA path:
/// 0.44 GiB for encode and 0.66 GiB for decode above the 0.24 GiB of weights, rounded up;
/// `bench/results/2026-11-27-h100-vae-cl-1128-vae_warm.log`, BENCHMARKS.md "Wan 2.1 VAE").
/// cuDNN takes the whole kernels: no copies.
/// The Wan 2.2 decoder measured on the H200 (bf16, 256-px tiles over 1280×704×121, 2026-12-05):
/// 0.93–0.99 GiB reserved above its 1.31 GiB of weights, against 0.80 GiB from the 2.1 rate;
/// its encoder is still scaled from the 2.1 rate (not measured).
const VAE_CUDA: VaeMemoryModel = VaeMemoryModel {
    encode_bytes_per_unit: 38,
    decode_bytes_per_unit: 57,
    folded_decode_bytes_per_unit: 72,
    weight_copies: 0.0,
};

/// Measured on the CPU (the demo's VAE, f32, 5 frames at 64×48 and 128×96, one tile each: a
/// line through both peaks, rounded up). The CPU path convolves one temporal tap at a time
/// from per-tap copies of the kernels, which are nearly all of the weights: one copy more.
const VAE_CPU: VaeMemoryModel = VaeMemoryModel {
    encode_bytes_per_unit: 50,
    decode_bytes_per_unit: 60,
    folded_decode_bytes_per_unit: 60,
    weight_copies: 1.2,
};
/// Share of what the budget leaves after the DiT's weights that attention scores may take.
const ATTENTION_BUDGET_SHARE: f64 = 0.25;
/// Bytes of attention-score scratch a DiT forward gets: a share of what `budget` leaves over
/// `in_use` (at least 64 MiB), or the model's default without a budget. One rule for `plan`,
/// `run` and `tensors dit`.
pub fn attention_scratch(budget: Option<u64>, in_use: u64) -> u64 {
    match budget {
        Some(budget) => {
            ((budget.saturating_sub(in_use) as f64 * ATTENTION_BUDGET_SHARE) as u64).max(1 << 26)
        }
        None => DEFAULT_ATTENTION_SCRATCH,
    }
}

/// How a model's weights are held while it computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub(crate) enum Residency {
    /// Every weight in the compute tier.
    Resident,
    /// The first `held_blocks` blocks and the tensors outside the blocks in the compute tier
    /// (but a token embedding, read by rows on the host); the other blocks stream through
    /// `slots` arena slots from `source`, each block in `parts` groups (3 for the DiT: its
    /// self-attention, cross-attention and FFN, one slot each, each part copied while the one
    /// before it computes; 1: whole blocks, `slots − 1` copied ahead of the compute).
    Streamed {
        held_blocks: usize,
        streamed_blocks: usize,
        parts: usize,
        slots: usize,
        source: vpipe_mem::StreamSource,
    },
}

impl Residency {
    /// What a phase holds of `model` (of `blocks` blocks), for the plan's table.
    pub(crate) fn describe(&self, model: &str, blocks: usize) -> String {
        match self {
            Residency::Resident => model.to_owned(),
            Residency::Streamed {
                held_blocks,
                parts: 1,
                slots,
                ..
            } => format!("{model}: {held_blocks} of {blocks} blocks + {slots} streamed"),
            Residency::Streamed { held_blocks, .. } => {
                format!("{model}: {held_blocks} of {blocks} blocks + 1 streamed in parts")
            }
        }
    }
}

/// What the text phase (the umT5 encoder) or the clip vision phase (the CLIP vision encoder)
/// does: the encoder's residency, decided from the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct EncoderPlan {
    pub(crate) residency: Residency,
    /// **Estimated** activations of the prompt and the negative prompt together.
    pub(crate) activation_bytes: u64,
    /// Weights held plus the arena plus the estimated activations.
    pub(crate) estimated_peak_bytes: u64,
    /// The least budget any strategy runs in (one streamed slot).
    pub(crate) minimum_bytes: u64,
}

impl EncoderPlan {
    /// The text phase for an encoder of `sizes` in `dtype`: resident when it fits the
    /// budget, else streamed (the token embedding read by rows on the host).
    pub(crate) fn text(
        sizes: &ModelSizes,
        dtype: DType,
        budget: vpipe_mem::Budget,
        on_cuda: bool,
    ) -> Self {
        let t = &sizes.text;
        let elem = dtype.size_in_bytes() as u64;
        let (b, l) = (2u64, TEXT_TOKENS as u64);
        // Attention holds, per layer, the scores with their biased and masked copies for each
        // prompt, and the position bias shared by both, counted in f32 (the softmax's
        // precision), plus the position buckets (u32, one per query-key pair).
        let score_matrix = t.num_heads as u64 * l * l * 4;
        let activation_bytes = with_pool_slack(
            b * l * elem * (6 * t.d_model as u64 + 3 * t.d_ff as u64)
                + (3 * b + 1) * score_matrix
                + l * l * 4,
            on_cuda,
            TEXT_POOL_SLACK,
        );
        Self::of(sizes.text_weights, activation_bytes, budget, on_cuda)
    }

    /// The clip vision phase for the CLIP vision encoder `clip` over `images` images:
    /// resident when it fits the budget, else its layers streamed.
    pub(crate) fn clip(
        clip: &ClipSizes,
        images: usize,
        dtype: DType,
        budget: vpipe_mem::Budget,
        on_cuda: bool,
    ) -> Self {
        let activation_bytes = with_pool_slack(
            clip_activation_bytes(&clip.config, images, dtype),
            on_cuda,
            DIT_POOL_SLACK,
        );
        Self::of(clip.weights, activation_bytes, budget, on_cuda)
    }

    /// An encoder of `weights` next to `activation_bytes`: resident when it fits the budget,
    /// else streamed.
    fn of(
        weights: BlockWeights,
        activation_bytes: u64,
        budget: vpipe_mem::Budget,
        on_cuda: bool,
    ) -> Self {
        let minimum_bytes = weights.minimum(activation_bytes);
        let resident = (Residency::Resident, weights.total + activation_bytes);
        let (residency, estimated_peak_bytes) = match budget.compute.map(planning_limit) {
            None => resident,
            Some(limit) => weights
                .residency(
                    activation_bytes,
                    limit,
                    on_cuda,
                    pinned_fits(on_cuda, weights.total, budget),
                )
                .unwrap_or(resident),
        };
        Self {
            residency,
            activation_bytes,
            estimated_peak_bytes,
            minimum_bytes,
        }
    }
}

/// A model's weights as a stream sees them: blocks of one size, and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockWeights {
    /// Every weight, in bytes (as loaded).
    pub(crate) total: u64,
    /// Transformer blocks.
    pub(crate) blocks: usize,
    /// Bytes of the largest block (what one arena slot holds, or the slots of its parts).
    pub(crate) block: u64,
    /// Groups a block streams in (see [`Residency::Streamed`]).
    pub(crate) parts: usize,
    /// Bytes a stream keeps on the host: read by rows (a token embedding), or brought to the
    /// compute tier whole at each forward (`host_uploaded`: the DiT's text and time
    /// embeddings).
    pub(crate) host_rows: u64,
    pub(crate) host_uploaded: bool,
    /// Bytes of the largest tensor in a block: what a read from the file converts (or, with
    /// a LoRA, merges) at a time.
    pub(crate) largest_tensor: u64,
    /// Whether a LoRA is merged into the weights as they are read (see [`Self::residency`]).
    pub(crate) patched: bool,
    /// Whether a block's tensors are converted from their stored dtype when read.
    pub(crate) converted: bool,
}

impl BlockWeights {
    /// Bytes a stream holds in the compute tier for the whole phase, besides held blocks and
    /// the arena.
    fn outside_blocks(&self) -> u64 {
        self.total
            .saturating_sub(self.block.saturating_mul(self.blocks as u64))
            .saturating_sub(self.host_rows)
    }

    /// What a stream holds next to its weights at the most: `activations`, or the host-side
    /// tensors a forward brings to the compute tier before its blocks run.
    fn stream_activations(&self, activations: u64) -> u64 {
        if self.host_uploaded {
            activations.max(self.host_rows)
        } else {
            activations
        }
    }

    /// The least budget a stream of these weights needs next to `activations` (one slot).
    fn minimum(&self, activations: u64) -> u64 {
        self.outside_blocks()
            .saturating_add(self.stream_activations(activations))
            .saturating_add(self.block)
            .saturating_add(self.staging(false))
    }

    /// Bytes a read from the file converts (or, with a LoRA, merges: the tensor, its update
    /// and the sum) at a time; the pinned host copy, and a file in the dtype the run holds,
    /// are copied as they are.
    fn staging(&self, pinned: bool) -> u64 {
        match (pinned, self.patched, self.converted) {
            (true, _, _) | (false, false, false) => 0,
            (false, false, true) => self.largest_tensor,
            (false, true, _) => 3 * self.largest_tensor,
        }
    }

    /// Resident, with its estimated peak, when the weights and `activations` fit `limit` (and,
    /// on CUDA, the pinned host copy the upload reads fits the host: `pinned`).
    fn resident(
        &self,
        activations: u64,
        limit: u64,
        on_cuda: bool,
        pinned: bool,
    ) -> Option<(Residency, u64)> {
        let peak = self.total.saturating_add(activations);
        (peak <= limit && (pinned || !on_cuda)).then_some((Residency::Resident, peak))
    }

    /// [`Self::resident`] when it fits, else streamed with as many blocks held as fit next to
    /// the activations and the arena: one slot per part of a block, or up to [`most_slots`]
    /// whole-block slots (fewer when the budget has no room for them); `None` when not even
    /// the smallest arena fits.
    /// Returns the residency and its estimated peak. The stream reads the pinned host copy
    /// when `pinned` (the host has room for it), else the file.
    fn residency(
        &self,
        activations: u64,
        limit: u64,
        on_cuda: bool,
        pinned: bool,
    ) -> Option<(Residency, u64)> {
        // On CUDA a resident model is uploaded from its pinned host copy.
        if let Some(resident) = self.resident(activations, limit, on_cuda, pinned) {
            return Some(resident);
        }
        let block = self.block.max(1);
        let staging = self.staging(pinned);
        let activations = self.stream_activations(activations);
        // (slots, arena bytes), largest first: the slots of a block's parts together hold one
        // block.
        let arenas: Vec<(usize, u64)> = if self.parts > 1 {
            vec![(self.parts, block)]
        } else {
            (1..=most_slots(on_cuda))
                .rev()
                .map(|slots| (slots, block.saturating_mul(slots as u64)))
                .collect()
        };
        for (slots, arena) in arenas {
            let fixed = self
                .outside_blocks()
                .saturating_add(activations)
                .saturating_add(staging)
                .saturating_add(arena);
            if fixed > limit || self.blocks == 0 {
                continue;
            }
            // At least one block streams: holding them all did not fit above.
            let held_blocks = (((limit - fixed) / block) as usize).min(self.blocks - 1);
            let streamed_blocks = self.blocks - held_blocks;
            let (slots, arena) = if self.parts > 1 {
                (slots, arena)
            } else {
                let slots = slots.min(streamed_blocks);
                (slots, block * slots as u64)
            };
            let source = if pinned {
                vpipe_mem::StreamSource::PinnedHost
            } else {
                vpipe_mem::StreamSource::File
            };
            let peak =
                self.outside_blocks() + block * held_blocks as u64 + arena + activations + staging;
            return Some((
                Residency::Streamed {
                    held_blocks,
                    streamed_blocks,
                    parts: self.parts,
                    slots,
                    source,
                },
                peak,
            ));
        }
        None
    }
}

/// The least budget whose [`planning_limit`] is `bytes`.
fn least_budget(bytes: u64) -> u64 {
    // limit = budget − max(budget / 50, 4 MiB)
    (bytes.saturating_add(4 << 20)).max(bytes.saturating_mul(50).div_ceil(49))
}

/// What a strategy may plan to use of `budget`: it leaves 2 % (at least 4 MiB) for what the
/// estimates do not count (the tokenizer, earlier phases' outputs, bookkeeping).
fn planning_limit(budget: u64) -> u64 {
    budget.saturating_sub((budget / 50).max(4 << 20))
}

/// Arena slots a stream takes when the budget has room for them: on CUDA one group computes
/// while the next is copied; the CPU reads each group when it is needed.
fn most_slots(on_cuda: bool) -> usize {
    if on_cuda {
        CUDA_STREAM_SLOTS
    } else {
        1
    }
}

/// Whether a CUDA stream can read a pinned host copy of `total` bytes within the host budget.
fn pinned_fits(on_cuda: bool, total: u64, budget: vpipe_mem::Budget) -> bool {
    on_cuda && budget.host.is_none_or(|h| total <= h)
}

/// What one denoising step computes over, as the sample phase's plan needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepWork {
    /// Video tokens per sample.
    pub(crate) tokens: usize,
    /// Tokens each cross-attention reads: the text's, and the image's for image-to-video.
    pub(crate) context_tokens: usize,
    pub(crate) guidance: f64,
    /// The step cache's kind and settings; `None`: every step runs the blocks.
    pub(crate) step_cache: Option<CacheRule>,
}

impl StepWork {
    /// The step of a video of `frames` × `height` × `width` on a DiT of `sizes`, with
    /// `frames_given` image frames for image-to-video.
    pub(crate) fn new(
        sizes: &ModelSizes,
        (frames, height, width): (usize, usize, usize),
        frames_given: usize,
        (guidance, step_cache): (f64, Option<CacheRule>),
    ) -> Self {
        Self {
            tokens: video_tokens(&sizes.dit, &sizes.vae, frames, height, width),
            context_tokens: TEXT_TOKENS + sizes.image_tokens(frames_given),
            guidance,
            step_cache,
        }
    }
}

/// What the sample phase does, decided once from the budget and the model's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct SamplePlan {
    pub(crate) residency: Residency,
    #[serde(serialize_with = "serialize_passes")]
    pub(crate) passes: GuidancePasses,
    /// Token slices the FFN and the self-attention's input run over in turn (1: all at once;
    /// see `vpipe_models::wan::Execution::token_slices`).
    pub(crate) token_slices: usize,
    /// The attention kernel.
    #[serde(serialize_with = "serialize_kernel")]
    pub(crate) attention: AttentionKernel,
    /// Bytes of attention-score scratch a forward gets (0 but for the chunked path).
    pub(crate) attention_scratch: u64,
    /// How the blocks' linear layers multiply (`--fp8-compute`).
    #[serde(serialize_with = "serialize_matmul")]
    pub(crate) matmul: MatmulPrecision,
    /// The step cache's kind and settings ([`cache_schedule`], [`magcache_schedule`]);
    /// `None`: every step runs the blocks.
    pub(crate) step_cache: Option<CacheRule>,
    /// **Estimated** activations of one step (on CUDA with the pool's reserve beyond them).
    pub(crate) activation_bytes: u64,
    /// Weights held plus the arena plus the estimated activations.
    pub(crate) estimated_peak_bytes: u64,
    /// The least budget any strategy runs in (every block streamed, sequential passes, the
    /// FFN in slices).
    pub(crate) minimum_bytes: u64,
}

fn serialize_kernel<S: serde::Serializer>(
    kernel: &AttentionKernel,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(kernel.name())
}

fn serialize_matmul<S: serde::Serializer>(
    matmul: &MatmulPrecision,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(match matmul {
        MatmulPrecision::Exact => "exact",
        MatmulPrecision::Fp8 => "fp8",
    })
}

fn serialize_passes<S: serde::Serializer>(
    passes: &GuidancePasses,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(match passes {
        GuidancePasses::Batched => "batched",
        GuidancePasses::TwoPasses => "two_passes",
        GuidancePasses::Sequential => "sequential",
        GuidancePasses::Single => "single",
    })
}

/// Groups a streamed DiT block moves in: its parts, one arena slot each.
const DIT_BLOCK_PARTS: usize = BlockPart::ALL.len();

/// Arena slots a CUDA stream takes when the budget has room: one group computes while the
/// next is copied.
const CUDA_STREAM_SLOTS: usize = 2;

impl SamplePlan {
    /// The sample phase of a DiT of `sizes` in `dtype` for `tokens` tokens per sample. In
    /// order of preference, the first that fits `budget.compute`: resident with CFG batched,
    /// resident in two passes (interleaved through each block, then one forward after the
    /// other), then streamed in the same order with as many blocks held as the budget leaves
    /// room for after the activations and the arena. On CUDA the
    /// stream reads the pinned host copy when `budget.host` has room for it, else the file.
    /// Without a budget, or when nothing fits, resident and batched (the caller compares the
    /// estimate with the budget). At guidance scale 1 each step is one forward of the
    /// condition ([`GuidancePasses::Single`]). Each way of stepping tries the attention
    /// `kernels` in their order (a kernel that writes its output over the queries needs less
    /// in token slices).
    pub(crate) fn new(
        (dit, dit_weights): (&DitConfig, BlockWeights),
        dtype: DType,
        work: StepWork,
        (budget, on_cuda): (vpipe_mem::Budget, bool),
        (kernels, matmul): (&[AttentionKernel], MatmulPrecision),
        lora: bool,
    ) -> Self {
        let StepWork {
            tokens,
            context_tokens,
            guidance,
            step_cache,
        } = work;
        let scratch_for = |kernel| match kernel {
            AttentionKernel::Chunked => attention_scratch(budget.compute, dit_weights.total),
            AttentionKernel::Cudnn | AttentionKernel::Fused | AttentionKernel::CudnnFp8 => 0,
        };
        let elem = dtype.size_in_bytes() as u64;
        // Two passes keep the second pass's residual stream while the first runs a block.
        let residual = tokens as u64 * dit.dim as u64 * elem;
        // The text side, per sample: the context through the text embedding (its input,
        // the two linear outputs and the GELU's) and a block's cross-attention keys and
        // values, with their normed and transposed copies: ten context-sized tensors, the
        // bulk of a small video's activations (measured 6.9 MiB at 256 wide on the CPU).
        // The image tokens of image-to-video go the same way.
        let text_side = 10 * context_tokens as u64 * dit.dim as u64 * elem;
        let activations = |((passes, token_slices), attention): (Step, AttentionKernel)| {
            let execution = Execution {
                attention,
                attention_scratch: scratch_for(attention),
                token_slices,
                matmul,
            };
            let live = match passes {
                GuidancePasses::Batched => dit
                    .activation_bytes_estimate(dtype, 2, tokens, &execution, on_cuda)
                    .saturating_add(2 * text_side),
                GuidancePasses::TwoPasses => dit
                    .activation_bytes_estimate(dtype, 1, tokens, &execution, on_cuda)
                    .saturating_add(residual)
                    .saturating_add(2 * text_side),
                // One residual stream and one context at a time.
                GuidancePasses::Sequential | GuidancePasses::Single => dit
                    .activation_bytes_estimate(dtype, 1, tokens, &execution, on_cuda)
                    .saturating_add(text_side),
            };
            // A step cache keeps what the blocks added for each sample, and the residual
            // stream before them while they run.
            let samples = if passes == GuidancePasses::Single {
                1
            } else {
                2
            };
            let cached = if step_cache.is_some() {
                2 * samples * residual
            } else {
                0
            };
            let slack = match passes {
                GuidancePasses::Batched => DIT_POOL_SLACK,
                _ => DIT_POOL_SLACK_ONE_SAMPLE,
            };
            with_pool_slack(live.saturating_add(cached), on_cuda, slack)
        };
        let weights = BlockWeights {
            patched: lora,
            ..dit_weights
        };
        let single = guidance == 1.0;
        let smallest = if single {
            (GuidancePasses::Single, MOST_TOKEN_SLICES)
        } else {
            (GuidancePasses::Sequential, MOST_TOKEN_SLICES)
        };
        // The kernel that needs the least in the smallest way of stepping.
        let least_kernel = kernels
            .iter()
            .copied()
            .min_by_key(|&kernel| activations((smallest, kernel)))
            .unwrap_or(AttentionKernel::Chunked);
        let smallest = (smallest, least_kernel);
        let minimum_bytes = weights.minimum(activations(smallest));
        let plan = |way: (Step, AttentionKernel), (residency, estimated_peak_bytes)| Self {
            residency,
            passes: way.0 .0,
            token_slices: way.0 .1,
            attention: way.1,
            attention_scratch: scratch_for(way.1),
            matmul,
            step_cache,
            activation_bytes: activations(way),
            estimated_peak_bytes,
            minimum_bytes,
        };
        // Token slices cost about 8 % of a forward with cuDNN's attention (measured on the
        // H200 at 832×480×81, B = 1), more than passing the guidance one sample at a time
        // does (two B = 1 forwards took 0.5 % more than one of B = 2) and more than streaming
        // the blocks once more a step (about 1 %): every way of passing is tried whole before
        // any in slices.
        let guided = [
            (GuidancePasses::Batched, 1),
            (GuidancePasses::TwoPasses, 1),
            (GuidancePasses::Sequential, 1),
            (GuidancePasses::Batched, TOKEN_SLICES),
            (GuidancePasses::TwoPasses, TOKEN_SLICES),
            (GuidancePasses::Sequential, TOKEN_SLICES),
            smallest.0,
        ];
        let unguided = [
            (GuidancePasses::Single, 1),
            (GuidancePasses::Single, TOKEN_SLICES),
            smallest.0,
        ];
        let steps: &[Step] = if single { &unguided } else { &guided };
        let ways: Vec<(Step, AttentionKernel)> = steps
            .iter()
            .flat_map(|&step| kernels.iter().map(move |&kernel| (step, kernel)))
            .collect();
        let Some(limit) = budget.compute.map(planning_limit) else {
            let way = ways[0];
            return plan(way, (Residency::Resident, weights.total + activations(way)));
        };
        let pinned = pinned_fits(on_cuda, weights.total, budget);
        // Held whole, in the fastest way of stepping that fits, first; then streamed.
        for &way in &ways {
            if let Some(resident) = weights.resident(activations(way), limit, on_cuda, pinned) {
                return plan(way, resident);
            }
        }
        for &way in &ways {
            if let Some(streamed) = weights.residency(activations(way), limit, on_cuda, pinned) {
                return plan(way, streamed);
            }
        }
        plan(
            smallest,
            (Residency::Resident, weights.total + activations(smallest)),
        )
    }
}

/// How a denoising step runs: the guidance passes and the token slices.
type Step = (GuidancePasses, usize);

/// Token slices the FFN and the self-attention's input run over when the budget needs it: an
/// eighth of the FFN's hidden state and of the projections' intermediates at a time (4 096
/// tokens of the 32 760 of 832×480×81, still large matrix products).
const TOKEN_SLICES: usize = 8;

/// Token slices of the smallest way of stepping, where nothing else fits: a slice's own
/// tensors halve again, the whole residual, keys and values staying (about 0.15 GiB less than
/// 8 slices at 832×480×81 on the 14B).
const MOST_TOKEN_SLICES: usize = 16;

/// What a CUDA run holds on the host before its models and video: the binary, the CUDA
/// driver's and libraries' host memory, the tokenizer (a refused run peaked at 0.33 GiB RSS
/// on the H200, `bench/results/2026-12-04-h200-parts-callC.log`), rounded up.
const HOST_PROCESS_BYTES: u64 = 512 << 20;

/// What the CUDA pool reserves beyond its live allocations at its high-water mark, as a share
/// of a phase's activations (freed blocks that the next allocations do not fit). Measured on
/// the H200 on 2026-12-04 (BENCHMARKS.md "Streamed DiT"): 1.32 GiB over 4.28 GiB of estimated
/// activations in the sample phase, resident and streamed alike (`bench/gpu-stream.sh`); in
/// token slices, 0.56 GiB over 1.73 GiB measured at B = 1 and 1.06 over 3.31 at B = 2
/// (`bench/gpu-parts.sh B`).
const DIT_POOL_SLACK: f64 = 0.33;
/// The same for a step that passes one sample at a time (two passes, sequential, or one pass
/// at guidance scale 1), whose live set is smaller and less cut up. Measured with cuDNN's
/// attention on the H100 on 2026-12-05 (`bench/gpu-parts.sh F` and `M`): two passes 0.30 GiB
/// over 2.26 GiB whole (13 %) and 0.24 over 1.79 in 8 token slices (13 %); one sample after
/// the other, whole, 0.43 over 1.94 (22 %); rounded up.
const DIT_POOL_SLACK_ONE_SAMPLE: f64 = 0.25;
/// The same for the text encoder: 0.08 GiB over 0.54 GiB.
const TEXT_POOL_SLACK: f64 = 0.15;
/// The same for the VAE (256-px tiles): 0.43 GiB over 0.55 GiB at most.
const VAE_POOL_SLACK: f64 = 0.8;

/// `live` activations plus what the CUDA pool reserves beyond them (`slack` of them); the
/// CPU heap has no such reserve.
fn with_pool_slack(live: u64, on_cuda: bool, slack: f64) -> u64 {
    if on_cuda {
        live.saturating_add((live as f64 * slack) as u64)
    } else {
        live
    }
}

/// Which steps reuse the block cache instead of running the blocks (TeaCache's rule):
/// `changes[i]` is the relative change of the timestep's modulation from step i − 1 to step i
/// (`changes[0]` is not read). The changes add up from the last step that ran the blocks; a
/// step reuses while the sum stays under `threshold`, and runs the blocks (starting the sum
/// again) once it does not. The first and the last step always run the blocks; at threshold 0
/// every step does.
pub(crate) fn cache_schedule(changes: &[f64], threshold: f64) -> Vec<bool> {
    let mut reuse = vec![false; changes.len()];
    let mut sum = 0.0;
    for i in 1..changes.len().saturating_sub(1) {
        sum += changes[i];
        if sum < threshold {
            reuse[i] = true;
        } else {
            sum = 0.0;
        }
    }
    reuse
}

/// MagCache's ratios for a run of `steps` steps from those of a calibration run: nearest
/// neighbours, as diffusers' `nearest_interp` picks them (the index scaled and rounded in f32,
/// halves to even).
pub(crate) fn mag_ratios_for(ratios: &[f32], steps: usize) -> Vec<f32> {
    match (ratios.len(), steps) {
        (0, _) | (_, 0) => Vec::new(),
        (_, 1) => vec![ratios[ratios.len() - 1]],
        (n, _) if n == steps => ratios.to_vec(),
        (n, _) => {
            let scale = ((n - 1) as f64 / (steps - 1) as f64) as f32;
            (0..steps)
                .map(|i| ratios[((i as f32 * scale).round_ties_even() as usize).min(n - 1)])
                .collect()
        }
    }
}

/// Which steps of `phase` (a range of a run's step indices) reuse the block cache instead of
/// running the blocks (MagCache's rule, diffusers' `MagCacheHeadHook`), from `ratios` (one per
/// step of the run, [`mag_ratios_for`]). Steps before `retention` × the run's steps
/// (rounded) run the blocks. From there each step multiplies the accumulated ratio by its
/// own, adds |1 − that product| to the accumulated error and counts itself; it reuses while
/// the error stays at most `threshold` and the count at most `max_skip`, else runs the blocks
/// and starts the three again. The first step of a phase has no residual to reuse (an expert
/// keeps its own), so it runs the blocks. In f32, as diffusers' tensors of ratios make it: at
/// threshold 0 no step reuses unless its ratios multiply to exactly 1.
pub(crate) fn magcache_schedule(
    ratios: &[f32],
    phase: std::ops::Range<usize>,
    settings: MagCacheSettings,
) -> Vec<bool> {
    let retention = (settings.retention * ratios.len() as f64 + 0.5) as usize;
    let threshold = settings.threshold as f32;
    let (mut ratio, mut err, mut count) = (1.0f32, 0.0f32, 0usize);
    let first = phase.start;
    phase
        .map(|i| {
            if i < retention {
                return false;
            }
            ratio *= ratios.get(i).copied().unwrap_or(1.0);
            count += 1;
            err += (1.0 - ratio).abs();
            let reuse = i > first && err <= threshold && count <= settings.max_skip;
            if !reuse {
                (ratio, err, count) = (1.0, 0.0, 0);
            }
            reuse
        })
        .collect()
}

/// Tokens per sample of a video of `frames` × `height` × `width`: its latent on `vae` (4×
/// shorter after the first frame, the VAE's spatial factor smaller in each side) cut into the
/// DiT's patches.
pub(crate) fn video_tokens(
    dit: &DitConfig,
    vae: &VaeSizes,
    frames: usize,
    height: usize,
    width: usize,
) -> usize {
    let [_, _, latent_frames, h, w] = vae.latent_shape(frames, height, width);
    let [pt, ph, pw] = dit.patch_size;
    (latent_frames / pt.max(1)) * (h / ph.max(1)) * (w / pw.max(1))
}

/// Wan's text context length.
const TEXT_TOKENS: usize = 512;

/// Floating-point operations of one forward of `dit` over `tokens` video tokens for each of
/// `samples` samples: the matrix products of its blocks (projections, feed-forward, and the
/// attentions' scores and weighted values), which are nearly all of its work. The second
/// number is the self-attention's share.
pub(crate) fn dit_forward_flops(dit: &DitConfig, tokens: usize, samples: usize) -> (f64, f64) {
    let (l, d, f) = (tokens as f64, dit.dim as f64, dit.ffn_dim as f64);
    let text = TEXT_TOKENS as f64;
    let image = dit.image_tokens.map_or(0.0, |t| t as f64);
    let projections = 2.0 * l * d * d * 6.0 // self q, k, v, o and cross q, o
        + 2.0 * (text + image) * d * d * 2.0 // cross k, v of the text and the image tokens
        + 2.0 * l * d * f * 2.0; // the feed-forward's two layers
    let self_attention = 4.0 * l * l * d;
    let cross_attention = 4.0 * l * (text + image) * d;
    let per_sample = dit.num_layers as f64;
    let samples = samples as f64;
    (
        per_sample * samples * (projections + self_attention + cross_attention),
        per_sample * samples * self_attention,
    )
}

/// Rates measured on one card (14B, bf16 activations, 32 760 tokens, B = 2; BENCHMARKS.md), as
/// FLOP per second: the self-attention of each kernel measured there, and everything else of
/// the forward with exact and with float8 products.
struct MeasuredRates {
    card: &'static str,
    cudnn_attention: f64,
    fused_attention: f64,
    fp8_attention: f64,
    other_exact: f64,
    other_fp8: f64,
}

/// The H200 (BENCHMARKS.md, 2026-12-05 19:34 UTC, one call, unless said): in the 14B's forward
/// at B = 2 a self-attention layer of cuDNN's exact attention 0.0789 s; the float8 attention's
/// layer alone 0.0600 s (q, k and v quantised and centred in the call); vpipe's fused kernel's
/// layer 0.146 s (2026-12-05 04:25); the rest of the forward 2.787 s with exact products
/// (5.942 − 40 · 0.0789) and 1.908 s with float8 ones (4.951 − 40 · 0.0761).
const H200_RATES: MeasuredRates = MeasuredRates {
    card: "an H200",
    cudnn_attention: 557e12,
    fused_attention: 301e12,
    fp8_attention: 733e12,
    other_exact: 573e12,
    other_fp8: 837e12,
};

/// **Estimated** seconds of one forward with the attention `kernel` and the blocks' products
/// in `matmul`, from its FLOPs (see [`dit_forward_flops`]) at the rates measured on a card,
/// with the card's name; `None` where the card measured no rate for the kernel (the chunked
/// path).
pub(crate) fn measured_forward_seconds(
    (total, self_attention): (f64, f64),
    kernel: AttentionKernel,
    matmul: MatmulPrecision,
) -> Option<(f64, &'static str)> {
    let rates = H200_RATES;
    let attention = match kernel {
        AttentionKernel::Cudnn => rates.cudnn_attention,
        AttentionKernel::Fused => rates.fused_attention,
        AttentionKernel::CudnnFp8 => rates.fp8_attention,
        AttentionKernel::Chunked => return None,
    };
    let other = match matmul {
        MatmulPrecision::Exact => rates.other_exact,
        MatmulPrecision::Fp8 => rates.other_fp8,
    };
    let seconds = self_attention / attention + (total - self_attention) / other;
    Some((seconds, rates.card))
}

/// The sizes a plan needs, from files or a preset.
pub(crate) struct ModelSizes {
    pub(crate) dit: DitConfig,
    pub(crate) dit_weights: BlockWeights,
    pub(crate) vae: VaeSizes,
    /// Decided from the DiT and the VAE, once.
    pub(crate) family: ModelFamily,
    pub(crate) text: Umt5Config,
    pub(crate) text_weights: BlockWeights,
    /// Image-to-video: the CLIP vision encoder.
    pub(crate) clip: Option<ClipSizes>,
    /// Wan 2.2: the low-noise expert's weights (its architecture is `dit`'s).
    pub(crate) dit_low_noise: Option<BlockWeights>,
}

/// The CLIP vision encoder of an image-to-video run.
pub(crate) struct ClipSizes {
    pub(crate) config: vpipe_models::clip::Config,
    /// Its weights once loaded, its layers the blocks.
    pub(crate) weights: BlockWeights,
}

impl ClipSizes {
    /// The encoder of configuration `config` in a checkpoint of header `inspection`, loaded in
    /// `dtype`.
    pub(crate) fn of(
        inspection: &vpipe_ckpt::Inspection,
        config: vpipe_models::clip::Config,
        dtype: DType,
    ) -> Self {
        let weights = block_weights(inspection, dtype, &vpipe_models::clip::layer_of, 1, &|_| {
            false
        });
        Self { weights, config }
    }
}

impl ModelSizes {
    /// The image tokens each DiT block attends to besides the text: the CLIP tokens of each
    /// frame given (both for first-last-frame to video); 0 for text-to-video.
    pub(crate) fn image_tokens(&self, frames_given: usize) -> usize {
        match (&self.clip, self.dit.image_tokens) {
            (_, Some(tokens)) => tokens,
            (Some(clip), None) => clip.config.tokens() * frames_given,
            (None, None) => 0,
        }
    }
}

/// Bytes of a checkpoint's tensors once the store has loaded them in `dtype`
/// ([`vpipe_mem::resident_dtype`]: float8 weights and their scales keep their stored dtype).
fn loaded_bytes(inspection: &vpipe_ckpt::Inspection, dtype: DType) -> u64 {
    inspection
        .tensors
        .iter()
        .map(|t| tensor_loaded_bytes(t, dtype))
        .sum()
}

/// Whether the store converts this checkpoint tensor when it loads it in `dtype`.
fn is_converted(t: &vpipe_ckpt::TensorInfo, dtype: DType) -> bool {
    match t.dtype.to_candle() {
        Some(stored) => vpipe_mem::resident_dtype(stored, &t.shape, Some(dtype)) != stored,
        None => true,
    }
}

/// Bytes of one checkpoint tensor once the store has loaded it in `dtype`.
fn tensor_loaded_bytes(t: &vpipe_ckpt::TensorInfo, dtype: DType) -> u64 {
    let elems: u64 = t.shape.iter().map(|&d| d as u64).product();
    // float8 e5m2 has no candle dtype; the store reads it as its exact f16 values.
    let read_as = match t.dtype {
        vpipe_ckpt::DType::F8_E5M2 => Some(DType::F16),
        other => other.to_candle(),
    };
    match read_as {
        Some(stored) => {
            let resident = vpipe_mem::resident_dtype(stored, &t.shape, Some(dtype));
            elems * resident.size_in_bytes() as u64
        }
        // A dtype candle cannot hold: its stored size.
        None => t.dtype.bytes_for(elems).unwrap_or(0),
    }
}

/// A checkpoint's weights once loaded in `dtype`, by block (`block_of` names the block of a
/// key, which streams in `parts` groups) and by what a stream reads by rows (`host_rows`).
fn block_weights(
    inspection: &vpipe_ckpt::Inspection,
    dtype: DType,
    block_of: &dyn Fn(&str) -> Option<usize>,
    parts: usize,
    host_rows: &dyn Fn(&str) -> bool,
) -> BlockWeights {
    let mut blocks: std::collections::BTreeMap<usize, u64> = Default::default();
    let mut rows = 0;
    let mut largest_tensor = 0;
    let mut converted = false;
    for t in &inspection.tensors {
        let bytes = tensor_loaded_bytes(t, dtype);
        if let Some(index) = block_of(&t.name) {
            largest_tensor = largest_tensor.max(bytes);
            converted |= is_converted(t, dtype);
            *blocks.entry(index).or_default() += bytes;
        } else if host_rows(&t.name) {
            rows += bytes;
        }
    }
    BlockWeights {
        total: loaded_bytes(inspection, dtype),
        blocks: blocks.len(),
        block: blocks.values().copied().max().unwrap_or(0),
        parts,
        host_rows: rows,
        host_uploaded: false,
        largest_tensor,
        patched: false,
        converted,
    }
}

/// The DiT's weights from its header.
fn dit_weights(inspection: &vpipe_ckpt::Inspection, dtype: DType) -> BlockWeights {
    let prefix = inspection.detection.prefix.clone();
    let contains = |name: &str| inspection.tensors.iter().any(|t| t.name == name);
    let layout = dit_keys::detect_layout_of(&contains);
    let weights = block_weights(
        inspection,
        dtype,
        &|name| dit_keys::block_of(name, &prefix).map(|(index, _)| index),
        DIT_BLOCK_PARTS,
        &|name| {
            layout
                .is_some_and(|(layout, prefix)| dit_keys::is_source_embedding(name, layout, prefix))
        },
    );
    // A streamed DiT's forward brings its text and time embeddings to the device.
    BlockWeights {
        host_uploaded: true,
        ..weights
    }
}

/// The umT5 encoder's weights from its header: the token embedding is read by rows.
fn text_weights(inspection: &vpipe_ckpt::Inspection, dtype: DType) -> BlockWeights {
    let contains = |name: &str| inspection.tensors.iter().any(|t| t.name == name);
    match umt5_keys::detect_layout_of(&contains) {
        Some((layout, prefix)) => block_weights(
            inspection,
            dtype,
            &|name| umt5_keys::block_of(name, layout, prefix),
            1,
            &|name| umt5_keys::is_embedding(name, layout, prefix),
        ),
        None => BlockWeights {
            total: loaded_bytes(inspection, dtype),
            blocks: 0,
            block: 0,
            parts: 1,
            host_rows: 0,
            host_uploaded: false,
            largest_tensor: 0,
            patched: false,
            converted: false,
        },
    }
}

impl ModelSizes {
    /// A named preset's sizes (no weights needed): one of [`DitConfig::PRESETS`], with its
    /// VAE (Wan 2.2's for TI2V-5B, else Wan 2.1's), umT5-XXL and, for the image-to-video
    /// models, CLIP ViT-H/14.
    pub(crate) fn preset(name: &str, dtype: DType) -> Option<Self> {
        let dit = DitConfig::preset(name)?;
        let elem = dtype.size_in_bytes() as u64;
        let vae = if dit.out_channels == vpipe_models::wan::vae::Config::wan22().z_dim {
            VaeSizes::wan22(elem)
        } else {
            VaeSizes::wan21(elem)
        };
        let family = ModelFamily::of(&dit, &vae, (name, name)).ok()?;
        let clip = dit.image_dim.map(|_| {
            let config = vpipe_models::clip::Config::vit_h_14();
            let elem = dtype.size_in_bytes() as u64;
            ClipSizes {
                weights: BlockWeights {
                    total: config.parameter_count() * elem,
                    blocks: config.num_layers,
                    block: config.layer_parameter_count() * elem,
                    parts: 1,
                    host_rows: 0,
                    host_uploaded: false,
                    largest_tensor: (config.hidden_size * config.intermediate_size) as u64 * elem,
                    patched: false,
                    converted: false,
                },
                config,
            }
        });
        let text = Umt5Config::umt5_xxl();
        let elem = dtype.size_in_bytes() as u64;
        let (d, ff) = (text.d_model as u64, text.d_ff as u64);
        let text_embedding = text.vocab_size as u64 * d;
        let text_block = 4 * d * d
            + 3 * d * ff
            + 2 * d
            + (text.relative_attention_num_buckets * text.num_heads) as u64;
        let dit_weights = BlockWeights {
            total: dit.parameter_count() * elem,
            blocks: dit.num_layers,
            block: dit.block_parameter_count() * elem,
            parts: DIT_BLOCK_PARTS,
            host_rows: dit.source_embedding_parameter_count() * elem,
            host_uploaded: true,
            largest_tensor: (dit.dim * dit.ffn_dim) as u64 * elem,
            patched: false,
            // A preset is planned as a file in the run's dtype.
            converted: false,
        };
        Some(Self {
            dit_weights,
            dit,
            vae,
            family,
            text_weights: BlockWeights {
                total: (text_embedding + text.num_layers as u64 * text_block + d) * elem,
                blocks: text.num_layers,
                block: text_block * elem,
                parts: 1,
                host_rows: text_embedding * elem,
                host_uploaded: false,
                largest_tensor: d * ff * elem,
                patched: false,
                converted: false,
            },
            text,
            clip,
            // A Wan 2.2 A14B preset is a pair of experts of one architecture.
            dit_low_noise: is_expert_pair_preset(name).then_some(dit_weights),
        })
    }

    /// The sizes of the given model files, from their headers.
    pub(crate) fn of(models: &ModelFiles, dtype: DType) -> Result<Self> {
        let (vae, text_encoder) = (&models.vae.path, &models.text_encoder.path);
        let dit_header = &models.dit.inspection;
        let vae_header = &models.vae.inspection;
        let text_header = &models.text_encoder.inspection;
        let dit_cfg = dit_config_of(&models.dit, models.dit_config.as_ref())?;
        let dit_low_noise = models
            .dit_low_noise
            .as_ref()
            .map(|(checkpoint, config)| -> Result<BlockWeights> {
                let low = dit_config_of(checkpoint, config.as_ref())?;
                if low != dit_cfg {
                    return Err(Error::BadInput(format!(
                        "--dit-low-noise {}: an expert of another architecture than --dit {} \
                         ({low:?} against {dit_cfg:?}); the two experts of a pair share one",
                        checkpoint.path.display(),
                        models.dit.path.display()
                    )));
                }
                Ok(dit_weights(&checkpoint.inspection, dtype))
            })
            .transpose()?;
        let vae_sizes = VaeSizes::of_header(vae_header, loaded_bytes(vae_header, dtype))
            .ok_or_else(|| {
                Error::BadInput(format!(
                    "{}: no Wan VAE configuration in its header (a tensor missing or misshapen?)",
                    vae.display()
                ))
            })?;
        let family = ModelFamily::of(
            &dit_cfg,
            &vae_sizes,
            (
                &format!("--dit {}", models.dit.path.display()),
                &format!("--vae {}", vae.display()),
            ),
        )?;
        let text = match &text_header.detection.config {
            Some(vpipe_ckpt::ModelConfig::Umt5(c)) => Umt5Config {
                vocab_size: c.vocab_size,
                d_model: c.d_model,
                d_kv: c.d_kv,
                d_ff: c.d_ff,
                num_layers: c.num_layers,
                num_heads: c.num_heads,
                ..Umt5Config::umt5_xxl()
            },
            _ => {
                return Err(Error::BadInput(format!(
                    "{}: no umT5 configuration in its header (a tensor missing or misshapen?)",
                    text_encoder.display()
                )))
            }
        };
        let clip = clip_sizes(models, &dit_cfg, dtype)?;
        Ok(Self {
            clip,
            dit_low_noise,
            dit: dit_cfg,
            dit_weights: dit_weights(dit_header, dtype),
            vae: vae_sizes,
            family,
            text,
            text_weights: text_weights(text_header, dtype),
        })
    }
}

/// The attention kernels a sample phase may use, in the order its plan tries them: the one
/// `--attention` names; else the fastest that applies, and vpipe's fused kernel after cuDNN's
/// (it needs less memory in token slices, writing its output over the queries).
pub(crate) fn attention_kernels(
    requested: Option<AttentionKernel>,
    on_cuda: bool,
    dtype: DType,
    head_dim: usize,
) -> Vec<AttentionKernel> {
    let fastest = AttentionKernel::fastest(on_cuda, dtype, head_dim);
    let fused = AttentionKernel::Fused;
    match requested {
        Some(kernel) => vec![kernel],
        None if fastest == AttentionKernel::Cudnn
            && fused.applies(on_cuda, dtype, head_dim).is_ok() =>
        {
            vec![fastest, fused]
        }
        None => vec![fastest],
    }
}

/// The attention kernel for heads of `head_dim` under `compute` where no budget weighs in:
/// the one `--attention` names (an error where it cannot run), else the fastest that applies.
/// One rule for `plan`, `run` and `tensors dit`.
pub fn attention_kernel(compute: &Compute, head_dim: usize) -> Result<AttentionKernel> {
    let on_cuda = compute.device.starts_with("cuda");
    if let Some(kernel) = compute.attention {
        kernel
            .applies(on_cuda, compute.dtype, head_dim)
            .map_err(|why| Error::BadInput(format!("--attention {}: {why}", kernel.name())))?;
    }
    Ok(attention_kernels(compute.attention, on_cuda, compute.dtype, head_dim)[0])
}

/// Settles the run's settings that depend on its models, once, for models of `sizes`: the
/// flow shift of a family that has its own when no `--shift` was given, the frame size
/// checked against the latent grid the DiT's patches cut, the VAE tile checked against the
/// VAE's grid (a tile covers whole latent cells) and its stride put on that grid (rounded
/// down: more overlap, never a gap), and first-last-frame refused where the family has none.
pub(crate) fn settle_for_models(job: &mut RunOptions, sizes: &ModelSizes) -> Result<()> {
    if let (false, Some(shift)) = (job.shift_given, sizes.family.default_shift()) {
        job.shift = shift;
    }
    let factor = sizes.vae.spatial_factor;
    let [_, ph, pw] = sizes.dit.patch_size;
    let (mh, mw) = (factor * ph.max(1), factor * pw.max(1));
    if !job.height.is_multiple_of(mh) || !job.width.is_multiple_of(mw) {
        return Err(Error::BadInput(format!(
            "--size {}x{}: the {} makes latents {factor}× smaller per side and the DiT cuts them \
             in {ph}×{pw} patches; expected a width that is a multiple of {mw} and a height that \
             is a multiple of {mh}",
            job.width,
            job.height,
            sizes.vae.describe()
        )));
    }
    if !job.tiles.tile.is_multiple_of(factor) {
        return Err(Error::BadInput(format!(
            "--tile {}: the {} needs tiles of whole latent cells, a multiple of {factor} px",
            job.tiles.tile,
            sizes.vae.describe()
        )));
    }
    job.tiles.stride = (job.tiles.stride / factor * factor).max(factor);
    attention_kernel(&job.compute, sizes.dit.head_dim())?;
    if job.compute.matmul == MatmulPrecision::Fp8 && job.compute.dtype == DType::F32 {
        return Err(Error::BadInput(
            "--fp8-compute: the float8 products take bf16 or f16 activations; with --dtype f32 \
             every product stays exact (give --dtype bf16)"
                .into(),
        ));
    }
    if sizes.family.first_frame_conditioning()
        && job.image.as_ref().is_some_and(|i| i.last.is_some())
    {
        return Err(Error::BadInput(
            "--last-image: Wan 2.2 TI2V-5B starts a video from its first frame only; leave out \
             --last-image"
                .into(),
        ));
    }
    Ok(())
}

/// Whether the preset `name` is a Wan 2.2 A14B expert pair.
pub(crate) fn is_expert_pair_preset(name: &str) -> bool {
    name.starts_with("wan2.2-") && name.ends_with("-a14b")
}

/// The DiT configuration of `checkpoint`: `given` (a `config.json`), else from its header.
fn dit_config_of(checkpoint: &Checkpoint, given: Option<&DitConfig>) -> Result<DitConfig> {
    let image_embedding = checkpoint.image_embedding();
    match (given, &checkpoint.inspection.detection.config) {
        (Some(cfg), _) => Ok(cfg.clone()),
        (None, Some(vpipe_ckpt::ModelConfig::Dit(c))) => Ok(DitConfig {
            dim: c.dim,
            ffn_dim: c.ffn_dim,
            num_heads: c.num_heads,
            num_layers: c.num_layers,
            in_channels: c.in_dim,
            out_channels: c.out_dim,
            text_dim: c.text_dim,
            freq_dim: c.freq_dim,
            patch_size: c.patch_size,
            image_dim: image_embedding.map(|(width, _)| width),
            image_tokens: image_embedding.and_then(|(_, tokens)| tokens),
            ..DitConfig::wan21_t2v_14b()
        }),
        _ => Err(Error::BadInput(format!(
            "{}: no Wan DiT configuration in its header (a tensor missing or misshapen?)",
            checkpoint.path.display()
        ))),
    }
}

/// The CLIP vision encoder of a run whose DiT is `dit`: `None` for text-to-video; for
/// image-to-video the file's (its configuration given, or from its shapes), checked to give
/// the features the DiT's image embedding takes.
fn clip_sizes(models: &ModelFiles, dit: &DitConfig, dtype: DType) -> Result<Option<ClipSizes>> {
    let Some(image_dim) = dit.image_dim else {
        return Ok(None);
    };
    let Some(clip) = &models.clip_vision else {
        return Err(Error::BadInput(format!(
            "{}: an image-to-video DiT; it needs --image (the first frame) and a CLIP vision \
             encoder (--clip-vision, or one in --model-dir)",
            models.dit.path.display()
        )));
    };
    let config = match &models.clip_config {
        Some(config) => config.clone(),
        None => clip.clip_config()?,
    };
    if config.hidden_size != image_dim {
        return Err(Error::BadInput(format!(
            "--clip-vision {}: gives {}-wide image features, but the DiT {} takes {image_dim}",
            clip.path.display(),
            config.hidden_size,
            models.dit.path.display()
        )));
    }
    Ok(Some(ClipSizes::of(&clip.inspection, config, dtype)))
}

/// One phase of a plan.
#[derive(Debug, Serialize)]
pub(crate) struct PhasePlan {
    pub(crate) name: &'static str,
    /// Models in the compute tier during the phase.
    pub(crate) resident: Vec<String>,
    /// Weights plus estimated activations, in bytes.
    pub(crate) estimated_peak_bytes: u64,
    pub(crate) detail: String,
    /// The models the phase holds whole, by the names the pipeline registers them under, and
    /// their bytes as loaded: what may stay resident past the phase ([`Holding`]).
    #[serde(skip)]
    pub(crate) whole: Vec<(&'static str, u64)>,
}

/// A model held resident outside the phases that use it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HeldModel {
    /// The name the pipeline registers it under (`dit`, `vae`, `text encoder`, …).
    pub(crate) model: String,
    /// Its weights as loaded (exact, from the checkpoint's header).
    pub(crate) bytes: u64,
}

/// Which models stay resident outside the phases that use them, decided once per job by
/// [`Plan::decide_holding`]: models carried in from the previous job (held until their first
/// use), and models held from their first use to the job's end for the next one. A model is
/// held only where every phase it spans fits with it: each phase's estimated peak plus the
/// bytes held beside it within the compute allowance (the budget less what the process holds
/// before any work). Without a budget (a CPU run without `--vram-budget`) nothing bounds it.
/// Streamed models are never held: their phase has no room for them whole.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Holding {
    /// Carried over resident from the previous job and used by this one.
    pub(crate) carried: Vec<HeldModel>,
    /// Offered by the previous job but not taken: this job does not hold them whole, or its
    /// phases before their first use have no room for them. Given back at the job's start.
    pub(crate) refused: Vec<HeldModel>,
    /// Held from their first use to the job's end, rather than given back after each phase
    /// that uses them (only in `vpipe serve`, where the next job may take them).
    pub(crate) held_to_end: Vec<HeldModel>,
}

impl Holding {
    /// Whether `model` stays resident after the phases that use it.
    pub(crate) fn holds_to_end(&self, model: &str) -> bool {
        self.held_to_end.iter().any(|h| h.model == model)
    }

    /// Whether `model`, carried in, is taken.
    pub(crate) fn takes(&self, model: &str) -> bool {
        self.carried.iter().any(|h| h.model == model)
    }

    fn describe(list: &[HeldModel]) -> String {
        if list.is_empty() {
            return "none".into();
        }
        list.iter()
            .map(|h| format!("{} ({})", h.model, fmt_bytes(h.bytes)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The decision in words, for the plan's table and the report's notes.
    pub(crate) fn summary(&self) -> String {
        format!(
            "carried over from the previous job: {}; given back at the start: {}; held to the \
             job's end for the next job: {} (each where every phase it spans fits beside it: \
             estimated peaks + held bytes within the allowance)",
            Self::describe(&self.carried),
            Self::describe(&self.refused),
            Self::describe(&self.held_to_end),
        )
    }
}

/// A run's plan.
#[derive(Debug, Serialize)]
pub struct Plan {
    pub(crate) phases: Vec<PhasePlan>,
    pub(crate) budget_bytes: Option<u64>,
    /// What set the compute budget: `--vram-budget`, the device's free memory, or none.
    pub(crate) budget_source: String,
    /// The host budget of a CUDA run (pinned copies), and what set it.
    pub(crate) host_budget_bytes: Option<u64>,
    pub(crate) host_budget_source: &'static str,
    /// On CUDA, the least host budget the run can take (**estimated**): the process itself,
    /// the page-locked staging buffers of a stream from the file, and the video in memory.
    pub(crate) host_minimum_bytes: Option<u64>,
    /// Every phase's estimated peak within the budget (true without a budget), and the host
    /// budget above the host's least.
    pub(crate) fits: bool,
    /// Every phase's estimated peak within the device budget.
    #[serde(skip)]
    pub(crate) device_fits: bool,
    /// The least compute budget this run can take (streaming every block it can), and the
    /// phase that needs it.
    pub(crate) minimum_bytes: u64,
    pub(crate) minimum_phase: &'static str,
    /// What the run makes: text-to-video, image-to-video, first-last-frame-to-video or
    /// video-to-video.
    pub(crate) mode: &'static str,
    pub(crate) guidance: &'static str,
    /// How the text encoder is held.
    pub(crate) text: EncoderPlan,
    /// Image-to-video: how the CLIP vision encoder is held.
    pub(crate) clip: Option<EncoderPlan>,
    /// How the DiT is held while sampling, and what its step needs.
    pub(crate) sample: SamplePlan,
    /// Wan 2.2: the same for the low-noise expert.
    pub(crate) sample_low_noise: Option<SamplePlan>,
    pub(crate) attention_query_rows: usize,
    pub(crate) vae_tile_px: usize,
    /// The precision of the weights and the computation, and why it is that one.
    pub(crate) dtype: String,
    /// Device bytes the process holds before any work (on CUDA), left out of what the
    /// models may use.
    #[serde(skip)]
    pub(crate) taken: u64,
    /// Which models this run holds outside the phases that use them: `vpipe run` holds none
    /// (within one run no model is used again after a later phase but the VAE of a
    /// video- or image-to-video run, which stays as it is, given back and read again), so
    /// every phase starts from the baseline; `vpipe serve` decides per job.
    pub(crate) holding: Holding,
    /// What `vpipe serve` would hold to this job's end for a next job (nothing carried in).
    pub(crate) serve_holding: Holding,
}

impl Plan {
    /// The plan of `job` for models of `sizes`.
    pub(crate) fn new(job: &RunOptions, sizes: &ModelSizes) -> Self {
        let dtype = job.compute.dtype;
        let elem = dtype.size_in_bytes() as u64;
        let budget = job.compute.budget.compute;
        let frames_given = frames_given(job, sizes);
        let work = StepWork::new(
            sizes,
            (job.frames, job.height, job.width),
            frames_given,
            (job.guidance, job.step_cache.as_ref().map(StepCache::rule)),
        );
        let tokens = work.tokens;

        let on_cuda = job.compute.device.starts_with("cuda");
        let model_budget = job.compute.model_budget();
        let text = EncoderPlan::text(sizes, dtype, model_budget, on_cuda);
        let clip = sizes
            .clip
            .as_ref()
            .map(|c| EncoderPlan::clip(c, frames_given, dtype, model_budget, on_cuda));
        let kernels =
            attention_kernels(job.compute.attention, on_cuda, dtype, sizes.dit.head_dim());
        let sample = SamplePlan::new(
            (&sizes.dit, sizes.dit_weights),
            dtype,
            work,
            (model_budget, on_cuda),
            (&kernels, job.compute.matmul),
            !job.loras.is_empty(),
        );
        let sample_low_noise =
            sizes
                .dit_low_noise
                .zip(job.low_noise.as_ref())
                .map(|(weights, expert)| {
                    SamplePlan::new(
                        (&sizes.dit, weights),
                        dtype,
                        StepWork {
                            guidance: expert.guidance,
                            ..work
                        },
                        (model_budget, on_cuda),
                        (&kernels, job.compute.matmul),
                        false,
                    )
                });
        let fused = sample.attention != AttentionKernel::Chunked;
        let passes = sample.passes;
        let batch = match passes {
            GuidancePasses::Batched => 2,
            GuidancePasses::TwoPasses | GuidancePasses::Sequential | GuidancePasses::Single => 1,
        };
        // A fused kernel (cuDNN's or vpipe's) takes every query row in one launch.
        let rows = if fused {
            tokens
        } else {
            QueryChunk::for_budget(
                sample.attention_scratch,
                batch,
                sizes.dit.num_heads,
                tokens,
                sizes.dit.head_dim(),
                dtype,
            )
            .0
            .min(tokens)
        };
        let scratch = sample.attention_scratch;

        let (tile_h, tile_w) = job.tiles.largest_tile(job.height, job.width);
        // The measured memory model's unit, a base channel times a tile pixel, on the pixels the
        // VAE's stages see: a VAE that folds frames into patches runs on 1/p² of them, its
        // encoder and decoder at widths of their own (Wan 2.2; scaled, not measured).
        let folded_pixels = (tile_h * tile_w / (sizes.vae.patch * sizes.vae.patch)) as u64;
        let vae_unit = |base: usize| base as u64 * folded_pixels * elem;
        let vae = if on_cuda { VAE_CUDA } else { VAE_CPU };
        let mut phases = vec![
            PhasePlan {
                name: "load",
                resident: vec![],
                estimated_peak_bytes: 0,
                detail: "headers only".into(),
                whole: vec![],
            },
            PhasePlan {
                name: "lora",
                resident: vec![],
                estimated_peak_bytes: 0,
                detail: format!(
                    "{} LoRA file(s) checked against the DiT's keys",
                    job.loras.len()
                ),
                whole: vec![],
            },
            PhasePlan {
                name: "text",
                resident: vec![text
                    .residency
                    .describe("text encoder", sizes.text.num_layers)],
                estimated_peak_bytes: text.estimated_peak_bytes,
                detail: format!("prompt and negative prompt, {TEXT_TOKENS} tokens each"),
                whole: whole_if(text.residency, "text encoder", sizes.text_weights.total),
            },
            PhasePlan {
                name: "shift",
                resident: vec![],
                estimated_peak_bytes: 0,
                detail: format!(
                    "{} schedule, shift {}, no device work",
                    job.sampler, job.shift
                ),
                whole: vec![],
            },
        ];
        let vae_phase = |name, bytes_per_unit: u64, base| PhasePlan {
            name,
            resident: vec!["vae".into()],
            estimated_peak_bytes: sizes.vae.bytes
                + (sizes.vae.bytes as f64 * vae.weight_copies) as u64
                + with_pool_slack(bytes_per_unit * vae_unit(base), on_cuda, VAE_POOL_SLACK),
            detail: format!(
                "tile {} px, stride {} px, {} layout",
                job.tiles.tile, job.tiles.stride, job.tiles.layout
            ),
            whole: vec![("vae", sizes.vae.bytes)],
        };
        if let (Some(clip), Some(plan)) = (&sizes.clip, &clip) {
            // Before the shift phase, as the pipeline runs it.
            let shift = phases.len() - 1;
            phases.insert(
                shift,
                PhasePlan {
                    name: "clip vision",
                    resident: vec![plan
                        .residency
                        .describe("clip vision", clip.config.num_layers)],
                    estimated_peak_bytes: plan.estimated_peak_bytes,
                    detail: format!(
                        "{frames_given} image(s) at {0}×{0} px, {1} tokens each",
                        clip.config.image_size,
                        clip.config.tokens()
                    ),
                    whole: whole_if(plan.residency, "clip vision", clip.weights.total),
                },
            );
        }
        if job.input.is_some() || frames_given > 0 {
            phases.push(vae_phase(
                "vae encode",
                vae.encode_bytes_per_unit,
                sizes.vae.encoder_base_dim,
            ));
        }
        let held = sample.residency.describe("dit", sizes.dit.num_layers);
        let attention = if fused {
            format!("{} (no score scratch)", sample.attention.describe())
        } else {
            format!(
                "attention in chunks of {rows} query rows ({} of score scratch)",
                fmt_bytes(scratch)
            )
        };
        let samples = if matches!(passes, GuidancePasses::Single) {
            1
        } else {
            2
        };
        let flops = dit_forward_flops(&sizes.dit, tokens, samples);
        let attention = match (sample.matmul, on_cuda) {
            (MatmulPrecision::Exact, _) => attention,
            (MatmulPrecision::Fp8, true) => {
                format!("{attention}, float8 products in the blocks (cuBLASLt, per-token scales)")
            }
            (MatmulPrecision::Fp8, false) => format!(
                "{attention}, float8 products in the blocks emulated on the CPU (the GPU's \
                 numbers, no faster)"
            ),
        };
        let rates = measured_forward_seconds(flops, sample.attention, sample.matmul);
        let work = match rates {
            Some((seconds, card)) => format!(
                ", {:.2} PFLOP a step (about {seconds:.1} s on {card} at the rates measured \
                 there: an estimate)",
                flops.0 / 1e15,
            ),
            None => format!(", {:.2} PFLOP a step", flops.0 / 1e15),
        };
        let cache = match sample.step_cache {
            Some(CacheRule::Teacache { threshold }) => {
                format!(", step cache teacache at {threshold}")
            }
            Some(CacheRule::Magcache(m)) => format!(
                ", step cache magcache at {} (at most {} steps skipped in a row, the first {} of \
                 the steps kept)",
                m.threshold, m.max_skip, m.retention
            ),
            Some(CacheRule::MagcacheCalibrate) => {
                ", step cache magcache-calibrate (every step runs the blocks)".to_owned()
            }
            None => String::new(),
        };
        match (&sample_low_noise, &job.low_noise) {
            (Some(low), Some(expert)) => {
                let boundary = format!("timestep {:.0}", expert.boundary * 1000.0);
                phases.push(PhasePlan {
                    name: "sample high noise",
                    resident: vec![held],
                    estimated_peak_bytes: sample.estimated_peak_bytes,
                    detail: format!(
                        "the high-noise expert down to {boundary}: {tokens} tokens, CFG \
                         {passes:?}, {attention}{work}{cache}"
                    ),
                    whole: whole_if(sample.residency, "dit", sizes.dit_weights.total),
                });
                phases.push(PhasePlan {
                    name: "sample low noise",
                    resident: vec![low
                        .residency
                        .describe("dit low noise", sizes.dit.num_layers)],
                    estimated_peak_bytes: low.estimated_peak_bytes,
                    detail: format!(
                        "the low-noise expert below {boundary}, CFG {} {:?}",
                        expert.guidance, low.passes
                    ),
                    whole: whole_if(
                        low.residency,
                        "dit low noise",
                        sizes.dit_low_noise.map_or(0, |w| w.total),
                    ),
                });
            }
            _ => phases.push(PhasePlan {
                name: "sample",
                resident: vec![held],
                estimated_peak_bytes: sample.estimated_peak_bytes,
                detail: format!(
                    "{tokens} tokens, {} steps, CFG {passes:?}, {attention}{work}{cache}",
                    job.steps
                ),
                whole: whole_if(sample.residency, "dit", sizes.dit_weights.total),
            }),
        }
        let decode_bytes_per_unit = if sizes.vae.patch > 1 {
            vae.folded_decode_bytes_per_unit
        } else {
            vae.decode_bytes_per_unit
        };
        phases.push(vae_phase(
            "vae decode",
            decode_bytes_per_unit,
            sizes.vae.decoder_base_dim,
        ));
        phases.push(PhasePlan {
            name: "write",
            resident: vec![],
            estimated_peak_bytes: 0,
            detail: format!("{}", job.out.display()),
            whole: vec![],
        });
        // On CUDA the budget also holds what the process took before any work.
        let taken = job.compute.device_baseline;
        let host_minimum_bytes = on_cuda.then(|| {
            // Streamed from the file, a model reads its groups through one staging buffer per
            // slot: at the least, the parts of one DiT block, or one umT5 block. The decoded
            // video (f32) and its frames (u8), and the input clip's, are on the host too.
            let staging = sizes.dit_weights.block.max(sizes.text_weights.block);
            let clips = 1 + u64::from(job.input.is_some() || frames_given > 0);
            let video = (job.frames * job.height * job.width * 3) as u64 * 5 * clips;
            HOST_PROCESS_BYTES + staging + video
        });
        let host_fits = match (job.compute.budget.host, host_minimum_bytes) {
            (Some(host), Some(least)) => least <= host,
            _ => true,
        };
        let device_fits = budget.is_none_or(|budget| {
            phases
                .iter()
                .all(|p| p.estimated_peak_bytes + taken <= budget)
        });
        let fits = host_fits && device_fits;
        // The least budget: the text and sample phases at their smallest strategy (a budget
        // is planned with a headroom, see `planning_limit`), every other phase as planned.
        let (minimum_phase, minimum_bytes) = phases
            .iter()
            .map(|p| {
                let least = match (p.name, &clip) {
                    ("text", _) => least_budget(text.minimum_bytes),
                    ("clip vision", Some(clip)) => least_budget(clip.minimum_bytes),
                    ("sample" | "sample high noise", _) => least_budget(sample.minimum_bytes),
                    ("sample low noise", _) => least_budget(
                        sample_low_noise
                            .as_ref()
                            .map_or(sample.minimum_bytes, |low| low.minimum_bytes),
                    ),
                    _ => p.estimated_peak_bytes,
                };
                (p.name, least)
            })
            .max_by_key(|(_, least)| *least)
            .map(|(phase, least)| (phase, least + taken))
            .expect("a plan has phases");
        let mut plan = Self {
            phases,
            budget_bytes: budget,
            budget_source: job.compute.budget_source.clone(),
            host_budget_bytes: job.compute.budget.host,
            host_minimum_bytes,
            host_budget_source: if job.compute.ram_budget_given {
                "--ram-budget"
            } else if job.compute.budget.host.is_some() {
                "available host memory (MemAvailable)"
            } else {
                "none"
            },
            fits,
            device_fits,
            minimum_bytes,
            minimum_phase,
            mode: match (job.input.is_some(), frames_given) {
                (true, _) => "video-to-video",
                (false, 0) => "text-to-video",
                (false, 1) => "image-to-video",
                (false, _) => "first-last-frame-to-video",
            },
            sample,
            sample_low_noise,
            text,
            clip,
            guidance: match passes {
                GuidancePasses::Batched => "batched",
                GuidancePasses::TwoPasses => "two passes",
                GuidancePasses::Sequential => "sequential",
                GuidancePasses::Single => "single",
            },
            attention_query_rows: rows,
            vae_tile_px: job.tiles.tile,
            dtype: format!(
                "{}{}",
                dtype.as_str(),
                if job.compute.dtype_is_default {
                    " (the default on this device; --dtype to change)"
                } else {
                    " (--dtype)"
                }
            ),
            taken,
            holding: Holding::default(),
            serve_holding: Holding::default(),
        };
        plan.serve_holding = plan.holding_for(&[], true);
        plan
    }

    /// Decides which models this job holds outside the phases that use them (see
    /// [`Holding`]): of `carried` (models the previous job left resident that this job uses,
    /// as loaded), those that fit until their first use; and with `hold_to_end`, the models it
    /// holds whole that fit from their first use to the job's end. The largest first: they
    /// cost the most to read again.
    pub(crate) fn decide_holding(&mut self, carried: &[&str], hold_to_end: bool) {
        self.holding = self.holding_for(carried, hold_to_end);
    }

    /// The decision of [`Self::decide_holding`], made for `carried` and `hold_to_end`.
    pub(crate) fn holding_for(&self, carried: &[&str], hold_to_end: bool) -> Holding {
        let allowance = self.budget_bytes.map(|b| b.saturating_sub(self.taken));
        let mut models: Vec<(&'static str, u64)> = Vec::new();
        for &(model, bytes) in self.phases.iter().flat_map(|p| &p.whole) {
            if !models.iter().any(|(m, _)| *m == model) {
                models.push((model, bytes));
            }
        }
        models.sort_by_key(|&(_, bytes)| std::cmp::Reverse(bytes));
        let uses = |model: &str| -> Vec<usize> {
            (0..self.phases.len())
                .filter(|&i| self.phases[i].whole.iter().any(|(m, _)| *m == model))
                .collect()
        };
        // Bytes held beside each phase's own estimate so far.
        let mut beside = vec![0u64; self.phases.len()];
        let hold = |span: &[usize], bytes: u64, beside: &mut [u64]| {
            let fits = allowance.is_none_or(|allowed| {
                span.iter()
                    .all(|&i| self.phases[i].estimated_peak_bytes + beside[i] + bytes <= allowed)
            });
            if fits {
                span.iter().for_each(|&i| beside[i] += bytes);
            }
            fits
        };
        let mut holding = Holding::default();
        for offered in carried {
            let used = uses(offered);
            let known = models.iter().find(|(m, _)| m == offered);
            match (used.first(), known) {
                (Some(&first), Some(&(model, bytes))) => {
                    let span: Vec<usize> = (0..first).collect();
                    let held = HeldModel {
                        model: model.to_owned(),
                        bytes,
                    };
                    if hold(&span, bytes, &mut beside) {
                        holding.carried.push(held);
                    } else {
                        holding.refused.push(held);
                    }
                }
                // Not held whole by this job (streamed, or not one of its models).
                _ => holding.refused.push(HeldModel {
                    model: (*offered).to_owned(),
                    bytes: 0,
                }),
            }
        }
        if hold_to_end {
            for &(model, bytes) in &models {
                let used = uses(model);
                let Some(&first) = used.first() else { continue };
                let span: Vec<usize> = (first + 1..self.phases.len())
                    .filter(|i| !used.contains(i))
                    .collect();
                if hold(&span, bytes, &mut beside) {
                    holding.held_to_end.push(HeldModel {
                        model: model.to_owned(),
                        bytes,
                    });
                }
            }
        }
        holding
    }

    /// The holding decision this run takes.
    pub(crate) fn holding(&self) -> &Holding {
        &self.holding
    }
}

/// A model's entry in [`PhasePlan::whole`] when `residency` holds it whole.
fn whole_if(residency: Residency, model: &'static str, bytes: u64) -> Vec<(&'static str, u64)> {
    match residency {
        Residency::Resident => vec![(model, bytes)],
        Residency::Streamed { .. } => vec![],
    }
}

impl Plan {
    /// Whether every phase's estimated peak is within the budget (true without a budget).
    pub fn fits(&self) -> bool {
        self.fits
    }

    /// The error of a run refused before loading anything because its plan does not fit.
    pub(crate) fn refusal(&self) -> Error {
        if let (Some(host), Some(least)) = (self.host_budget_bytes, self.host_minimum_bytes) {
            if least > host && self.device_fits {
                return Error::PlanDoesNotFit {
                    message: format!(
                        "refused before loading anything: the host budget of {} ({}) is below \
                         the least this run needs on the host, {} (estimated: the process, the \
                         page-locked buffers to stream a model from its file, the video in \
                         memory); see `vpipe plan` with the same flags",
                        fmt_bytes(host),
                        self.host_budget_source,
                        fmt_bytes(least),
                    ),
                    least_budget: least,
                };
            }
        }
        let worst = self
            .phases
            .iter()
            .max_by_key(|p| p.estimated_peak_bytes)
            .expect("a plan has phases");
        Error::PlanDoesNotFit {
            message: format!(
                "refused before loading anything: phase '{}' is estimated at {} ({}), over the \
                 budget of {} ({}); the least this run can take is {} (phase '{}'); see `vpipe \
                 plan` with the same flags",
                worst.name,
                fmt_bytes(worst.estimated_peak_bytes),
                worst.resident.join(", "),
                fmt_bytes(self.budget_bytes.unwrap_or(0)),
                self.budget_source,
                fmt_bytes(self.minimum_bytes),
                self.minimum_phase,
            ),
            least_budget: self.minimum_bytes,
        }
    }
}

/// The image frames an image-to-video run is given: the first, and the last for
/// first-last-frame to video; without `--image` (a plan of a preset), as many as the DiT
/// takes (both for a first-last-frame model). 0 for a model without an image embedding.
fn frames_given(job: &RunOptions, sizes: &ModelSizes) -> usize {
    match &job.image {
        Some(image) => 1 + usize::from(image.last.is_some()),
        None if sizes.dit.in_channels > sizes.vae.latent_channels => {
            1 + usize::from(sizes.dit.image_tokens.is_some())
        }
        None => 0,
    }
}

/// **Estimated** activations of the CLIP vision encoder over `images` images: per layer the
/// tokens' hidden state, its normed copy, q, k, v, the attention output and the MLP's hidden
/// state, and the attention scores in f32.
fn clip_activation_bytes(cfg: &vpipe_models::clip::Config, images: usize, dtype: DType) -> u64 {
    let (t, d, i) = (
        cfg.tokens() as u64,
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
    );
    let b = images.max(1) as u64;
    b * t * (7 * d + i) * dtype.size_in_bytes() as u64 + b * cfg.num_heads as u64 * t * t * 4
}

/// The plan as a table (estimates are marked as such).
impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<11} {:<14} {:>16}  detail",
            "phase", "resident", "estimated peak"
        )?;
        for phase in &self.phases {
            writeln!(
                f,
                "{:<11} {:<14} {:>16}  {}",
                phase.name,
                if phase.resident.is_empty() {
                    "-".to_string()
                } else {
                    phase.resident.join(", ")
                },
                fmt_bytes(phase.estimated_peak_bytes),
                phase.detail
            )?;
        }
        writeln!(f, "mode {}, precision {}", self.mode, self.dtype)?;
        writeln!(
            f,
            "models held outside their phases: {}",
            if self.holding.carried.is_empty() && self.holding.held_to_end.is_empty() {
                "none, each given back after the phase that uses it".to_owned()
            } else {
                self.holding.summary()
            }
        )?;
        writeln!(
            f,
            "in vpipe serve, held to the job's end for a next job that uses them: {} (estimated)",
            Holding::describe(&self.serve_holding.held_to_end)
        )?;
        match self.budget_bytes {
            Some(budget) => writeln!(
                f,
                "budget {} ({}): {} (estimates: weights exact, activations estimated)",
                fmt_bytes(budget),
                self.budget_source,
                if self.device_fits {
                    "fits".to_owned()
                } else {
                    format!(
                        "does NOT fit; the least this run can take is {} (phase '{}')",
                        fmt_bytes(self.minimum_bytes),
                        self.minimum_phase
                    )
                }
            )?,
            None => writeln!(
                f,
                "no budget given (estimates: weights exact, activations estimated)"
            )?,
        }
        if let Some(host) = self.host_budget_bytes {
            match self.host_minimum_bytes.filter(|&least| least > host) {
                Some(least) => writeln!(
                    f,
                    "host budget {} ({}): does NOT fit; the least this run can take on the host \
                     is {} (estimated)",
                    fmt_bytes(host),
                    self.host_budget_source,
                    fmt_bytes(least)
                )?,
                None => writeln!(
                    f,
                    "host budget {} ({}): pinned host copies where they fit, else streamed from \
                     the file",
                    fmt_bytes(host),
                    self.host_budget_source
                )?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{
        cache_schedule, dit_forward_flops, mag_ratios_for, magcache_schedule,
        measured_forward_seconds, AttentionKernel, DitConfig,
    };
    use crate::step_cache::MagCacheSettings;

    #[test]
    fn a_14b_step_is_the_work_the_cards_measured() {
        use super::MatmulPrecision::{Exact, Fp8};
        // 14B, 832x480x81 (32 760 tokens), CFG batched, one forward on the H200 (2026-12-05,
        // 19:34 UTC): the rest of the forward 2.787 s with exact products and 1.908 s with
        // float8 ones, plus 40 self-attention layers of 0.0789 s (cuDNN's, in the forward:
        // 5.942 s measured whole), 0.146 s (vpipe's kernel, 04:25) or 0.0600 s (float8, the
        // layer alone).
        let dit = DitConfig::wan21_t2v_14b();
        let flops = dit_forward_flops(&dit, 32_760, 2);
        assert!((flops.0 / 1e15 - 3.356).abs() < 0.01, "{flops:?}");
        assert!((flops.1 / flops.0 - 0.524).abs() < 0.01, "{flops:?}");
        for (kernel, layer) in [
            (AttentionKernel::Cudnn, 0.0789),
            (AttentionKernel::Fused, 0.146),
            (AttentionKernel::CudnnFp8, 0.0600),
        ] {
            for (matmul, rest) in [(Exact, 2.787), (Fp8, 1.908)] {
                let measured = rest + 40.0 * layer;
                let (seconds, on) = measured_forward_seconds(flops, kernel, matmul).unwrap();
                assert_eq!(on, "an H200", "{kernel:?} {matmul:?}");
                assert!(
                    (seconds - measured).abs() / measured < 0.01,
                    "{kernel:?} {matmul:?}: {seconds} against {measured}"
                );
            }
        }
        let (whole, _) = measured_forward_seconds(flops, AttentionKernel::Cudnn, Exact).unwrap();
        assert!((whole - 5.942).abs() / 5.942 < 0.01, "{whole}");
        for matmul in [Exact, Fp8] {
            assert_eq!(
                measured_forward_seconds(flops, AttentionKernel::Chunked, matmul),
                None
            );
        }
        // At CFG 1 one sample: half the work.
        let single = dit_forward_flops(&dit, 32_760, 1);
        assert!((single.0 * 2.0 - flops.0).abs() < 1.0);
    }

    /// The 14B's sample plan on CUDA at 832×480×81 with CFG, cuDNN's attention first.
    fn plan_14b(compute: u64) -> super::SamplePlan {
        let sizes =
            super::ModelSizes::preset("wan2.1-t2v-14b", candle_core::DType::BF16).expect("preset");
        let work = super::StepWork {
            tokens: 32_760,
            context_tokens: 512,
            guidance: 6.0,
            step_cache: None,
        };
        let budget = vpipe_mem::Budget {
            compute: Some(compute),
            host: None,
        };
        super::SamplePlan::new(
            (&sizes.dit, sizes.dit_weights),
            candle_core::DType::BF16,
            work,
            (budget, true),
            (
                &[AttentionKernel::Cudnn, AttentionKernel::Fused],
                super::MatmulPrecision::Exact,
            ),
            false,
        )
    }

    #[test]
    fn the_least_14b_plan_is_16_slices_with_the_kernel_that_needs_least() {
        use super::GuidancePasses;
        let least = plan_14b(u64::MAX).minimum_bytes;
        let plan = plan_14b(super::least_budget(least));
        assert_eq!(
            (plan.passes, plan.token_slices, plan.attention),
            (GuidancePasses::Sequential, 16, AttentionKernel::Cudnn),
            "{plan:?}"
        );
        assert!(plan.estimated_peak_bytes <= super::planning_limit(super::least_budget(least)));
        // Below the least nothing fits.
        assert!(plan_14b(least / 2).estimated_peak_bytes > least / 2);
        // What a 4 GiB budget leaves beside the CUDA context and the libraries' workspaces
        // (0.57 GiB measured on the H100 and the H200, plus the 160 MiB the run allows them):
        // one sample after the other, whole (the FFN's bias and GELU added in place leave
        // cuDNN's attention the larger live set); with less, one sample at a time in 8 slices.
        let plan = plan_14b((4u64 << 30) - (746 << 20));
        assert_eq!(
            (plan.passes, plan.token_slices, plan.attention),
            (GuidancePasses::Sequential, 1, AttentionKernel::Cudnn),
            "{plan:?}"
        );
        let plan = plan_14b(2800 << 20);
        assert_eq!(
            (plan.passes, plan.token_slices, plan.attention),
            (GuidancePasses::Sequential, 8, AttentionKernel::Cudnn),
            "{plan:?}"
        );
    }

    const MAGCACHE: MagCacheSettings = MagCacheSettings {
        threshold: 0.06,
        max_skip: 3,
        retention: 0.2,
    };

    #[test]
    fn mag_ratios_are_interpolated_to_the_nearest_step() {
        let ratios = [1.0, 1.2, 1.05, 1.01, 0.99, 1.0, 0.98, 0.95];
        // Step i takes ratio round(i * 7/9): 0, 0.78, 1.56, 2.33, 3.11, 3.89, 4.67, 5.44,
        // 6.22, 7.
        assert_eq!(
            mag_ratios_for(&ratios, 10),
            [1.0, 1.2, 1.05, 1.05, 1.01, 0.99, 1.0, 1.0, 0.98, 0.95]
        );
        assert_eq!(mag_ratios_for(&ratios, 8), ratios);
        assert_eq!(mag_ratios_for(&ratios, 1), [0.95]);
        // 3 → 5: scale 0.5, so steps 1 and 3 fall on halves and round to even (0 and 2).
        assert_eq!(
            mag_ratios_for(&[1.0, 2.0, 3.0], 5),
            [1.0, 1.0, 2.0, 3.0, 3.0]
        );
        assert!(mag_ratios_for(&ratios, 0).is_empty());
    }

    #[test]
    fn the_magcache_schedule_accumulates_the_ratios_error_and_count() {
        let ratios = [1.0, 1.2, 1.05, 1.05, 1.01, 0.99, 1.0, 1.0, 0.98, 0.95];
        // Retention int(0.2 * 10 + 0.5) = 2: steps 0 and 1 run. Step 2: error 0.05 (reused);
        // step 3: product 1.1025, error 0.1525 (runs, all start again); steps 4–6: products
        // 1.01, 0.9999, 0.9999, errors 0.01, 0.0101, 0.0102 (reused); step 7 would be the
        // fourth in a row (runs); step 8: 0.02 (reused); step 9: product 0.931, error 0.089
        // (runs).
        let reuse = magcache_schedule(&ratios, 0..10, MAGCACHE);
        let skipped: Vec<usize> = (0..10).filter(|&i| reuse[i]).collect();
        assert_eq!(skipped, [2, 4, 5, 6, 8]);
        // At most one in a row.
        let one = MagCacheSettings {
            max_skip: 1,
            ..MAGCACHE
        };
        let reuse = magcache_schedule(&ratios, 0..10, one);
        let skipped: Vec<usize> = (0..10).filter(|&i| reuse[i]).collect();
        assert_eq!(skipped, [2, 4, 6, 8]);
        // Threshold 0: only ratios of exactly 1 would reuse, and none multiply to 1 after a
        // reset here but steps 6 and 7 (1.0 each after step 5 ran).
        let zero = MagCacheSettings {
            threshold: 0.0,
            ..MAGCACHE
        };
        let reuse = magcache_schedule(&ratios, 0..10, zero);
        let skipped: Vec<usize> = (0..10).filter(|&i| reuse[i]).collect();
        assert_eq!(skipped, [6, 7]);
        // A phase of an expert pair (steps 5..10): its first step runs the blocks.
        let reuse = magcache_schedule(&ratios, 5..10, MAGCACHE);
        assert_eq!(reuse, [false, true, true, true, false]);
        // Retention 1: no step reuses.
        let all_kept = MagCacheSettings {
            retention: 1.0,
            ..MAGCACHE
        };
        assert!(magcache_schedule(&ratios, 0..10, all_kept)
            .iter()
            .all(|&r| !r));
    }

    #[test]
    fn the_step_cache_schedule_accumulates_changes_and_keeps_the_ends() {
        let changes = [0.0, 0.05, 0.05, 0.3, 0.02, 0.02, 0.02, 0.5];
        // Threshold 0: every step runs the blocks.
        assert!(cache_schedule(&changes, 0.0).iter().all(|&r| !r));
        // 0.12: steps 1 and 2 add up to 0.10 (reused), step 3 to 0.40 (runs, the sum starts
        // again), steps 4–6 to 0.06 (reused); the last step always runs.
        assert_eq!(
            cache_schedule(&changes, 0.12),
            [false, true, true, false, true, true, true, false]
        );
        // However large the threshold, the first and the last step run.
        let all = cache_schedule(&changes, 1e6);
        assert!(!all[0] && !all[7] && all[1..7].iter().all(|&r| r));
        assert!(cache_schedule(&[], 0.5).is_empty());
        assert_eq!(cache_schedule(&[0.0], 0.5), [false]);
    }
}
