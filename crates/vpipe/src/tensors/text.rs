//! `vpipe tensors text-encode`: the umT5 encoder on token ids.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Tensor};
use vpipe_mem::{MemorySession, Tier};

use crate::flags::TextEncodeJob;

const PHASE: &str = "text";

pub(crate) fn run_text_encode(job: TextEncodeJob) -> anyhow::Result<ExitCode> {
    vpipe_ckpt::inspect(&job.text_encoder)?;
    vpipe_pipeline::check_tensor_outputs(
        &job.output,
        job.compute.report.as_deref(),
        &[
            ("--text-encoder", &job.text_encoder),
            ("--input", &job.input),
        ],
    )?;
    let device = vpipe_pipeline::open_device(&job.compute.device)?;
    let [ids, mask] = super::read_inputs(&job.input, ["input_ids", "attention_mask"])?;
    let mut session = MemorySession::new(device.clone(), job.compute.budget)?;

    let id = session.phase("load", |p| -> anyhow::Result<_> {
        Ok(p.register("text encoder", &job.text_encoder, Some(job.compute.dtype))?)
    })?;
    let output = session.phase(PHASE, |p| -> anyhow::Result<Tensor> {
        p.make_resident(id)?;
        let output = {
            let lease = p.lease(id)?;
            let encoder =
                vpipe_pipeline::umt5(&lease, job.config.as_ref(), job.compute.dtype, &device)
                    .with_context(|| format!("--text-encoder {}", job.text_encoder.display()))?;
            let out = encoder
                .forward(&ids.to_device(&device)?, &mask.to_device(&device)?)
                .context("text encode")?;
            out.to_device(&candle_core::Device::Cpu)?
                .to_dtype(DType::F32)?
        };
        p.offload(id, Tier::Disk)?;
        p.declare_output("last_hidden_state", (output.elem_count() * 4) as u64);
        Ok(output)
    })?;
    session.phase("write", |_| {
        super::write_outputs(
            &job.output,
            &HashMap::from([("last_hidden_state".to_owned(), output.clone())]),
        )
    })?;
    let report = super::finish_report(&session, job.compute.report.as_deref())?;
    println!(
        "text encode: peak {}; wrote 'last_hidden_state' {:?} to {}",
        super::phase_peak(&report, PHASE),
        output.dims(),
        job.output.display()
    );
    vpipe_pipeline::budget_kept(&report, &format!("--output {}", job.output.display()))?;
    Ok(ExitCode::SUCCESS)
}
