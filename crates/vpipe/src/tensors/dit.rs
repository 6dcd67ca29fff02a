//! `vpipe tensors dit`: one forward of the Wan DiT.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Tensor};
use vpipe_mem::{fmt_bytes, MemorySession, Tier};
use vpipe_models::wan::Execution;

use crate::flags::DitJob;
use vpipe_pipeline::{attention_scratch, Checkpoint};

const PHASE: &str = "dit";

pub(crate) fn run_dit(job: DitJob) -> anyhow::Result<ExitCode> {
    // A reader that never executes pickle code checks the file before anything loads it; the
    // LoRAs are checked against what it read.
    let dit = Checkpoint::inspect(&job.dit)?;
    let mut inputs: Vec<(&str, &std::path::Path)> =
        vec![("--dit", &job.dit), ("--input", &job.input)];
    inputs.extend(job.loras.iter().map(|(p, _)| ("--lora", p.as_path())));
    vpipe_pipeline::check_tensor_outputs(&job.output, job.compute.report.as_deref(), &inputs)?;
    let device = vpipe_pipeline::open_device(&job.compute.device)?;
    let [latents, timestep, context] = super::read_inputs(
        &job.input,
        ["hidden_states", "timestep", "encoder_hidden_states"],
    )?;
    // An image-to-video DiT also reads the image features (the CLIP vision encoder's).
    let image = if dit.takes_image_features() {
        let [image] = super::read_inputs(&job.input, ["encoder_hidden_states_image"])?;
        Some(image)
    } else {
        None
    };
    let mut session = MemorySession::new(device.clone(), job.compute.budget)?;

    let dit_id = session.phase("load", |p| -> anyhow::Result<_> {
        let id = p.register_inspected("dit", &dit.inspection, Some(job.compute.dtype))?;
        let loras = vpipe_pipeline::read_loras(&job.loras)?;
        vpipe_pipeline::plan_loras(p, id, &dit, &loras, &job.loras)?;
        Ok(id)
    })?;
    let output = session.phase(PHASE, |p| -> anyhow::Result<Tensor> {
        p.make_resident(dit_id)?;
        let output = {
            let lease = p.lease(dit_id)?;
            let model =
                vpipe_pipeline::wan_dit(&lease, job.config.as_ref(), job.compute.dtype, &device)
                    .with_context(|| format!("--dit {}", job.dit.display()))?;
            let in_use = p
                .read()?
                .compute_used()
                .saturating_sub(p.session().baseline().compute_used());
            let scratch = attention_scratch(job.compute.budget.compute, in_use);
            let execution = Execution {
                attention: vpipe_pipeline::attention_kernel(&job.compute, model.config().head_dim())?,
                attention_scratch: scratch,
                ..Execution::default()
            };
            let (b, _, f, h, w) = latents.dims5().unwrap_or((0, 0, 0, 0, 0));
            if let Ok(grid) = model.token_grid(f, h, w) {
                let tokens = grid.iter().product();
                let (self_attend, cross_attend) =
                    model.attends(&execution, b, tokens, context.dim(1).unwrap_or(0));
                p.note(
                    "attention chunks",
                    &format!(
                        "{tokens} tokens, {}; {} of score scratch: {} query rows per self-attention pass, {} per cross-attention pass",
                        execution.attention.describe(),
                        fmt_bytes(scratch),
                        self_attend.chunk.0.min(tokens),
                        cross_attend.chunk.0.min(tokens)
                    ),
                );
            }
            let on_device = |t: &Tensor| t.to_device(&device);
            let (latents, timestep, context) = (
                on_device(&latents)?,
                on_device(&timestep)?,
                on_device(&context)?,
            );
            let out = match &image {
                Some(image) => model.forward_with_image(
                    &latents,
                    &timestep,
                    &context,
                    &on_device(image)?,
                    &execution,
                ),
                None => model.forward_planned(&latents, &timestep, &context, &execution),
            }
            .context("dit forward")?;
            out.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F32)?
        };
        p.offload(dit_id, Tier::Disk)?;
        p.declare_output("out", (output.elem_count() * 4) as u64);
        Ok(output)
    })?;
    session.phase("write", |_| {
        super::write_outputs(
            &job.output,
            &HashMap::from([("out".to_owned(), output.clone())]),
        )
    })?;

    let report = super::finish_report(&session, job.compute.report.as_deref())?;
    println!(
        "dit: peak {}; wrote 'out' {:?} to {}",
        super::phase_peak(&report, PHASE),
        output.dims(),
        job.output.display()
    );
    vpipe_pipeline::budget_kept(&report, &format!("--output {}", job.output.display()))?;
    Ok(ExitCode::SUCCESS)
}
