//! `vpipe tensors text-encode`: the umT5 encoder on token ids.

use std::process::ExitCode;

use crate::flags::TextEncodeJob;

pub(crate) fn run_text_encode(job: TextEncodeJob) -> anyhow::Result<ExitCode> {
    let checkpoint = vpipe_ckpt::inspect(&job.text_encoder)?;
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
    let one = super::OneModel {
        phase: "text",
        model: "text encoder",
        label: "text encode",
        flag: "--text-encoder",
        checkpoint: &checkpoint,
        output: &job.output,
        output_key: "last_hidden_state",
        compute: &job.compute,
    };
    super::run_one_model(one, &device, |p, id| {
        super::resident(p, id, |lease| {
            let encoder =
                vpipe_pipeline::umt5(lease, job.config.as_ref(), job.compute.dtype, &device)?;
            Ok(encoder.forward(&ids.to_device(&device)?, &mask.to_device(&device)?)?)
        })
    })
}
