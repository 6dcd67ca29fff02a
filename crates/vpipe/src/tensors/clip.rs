//! `vpipe tensors clip-vision`: the CLIP vision encoder on preprocessed images.

use std::process::ExitCode;

use crate::flags::ClipVisionJob;

pub(crate) fn run_clip_vision(mut job: ClipVisionJob) -> anyhow::Result<ExitCode> {
    let checkpoint = vpipe_ckpt::inspect(&job.clip_vision)?;
    vpipe_pipeline::check_tensor_outputs(
        &job.output,
        job.compute.report.as_deref(),
        &[("--clip-vision", &job.clip_vision), ("--input", &job.input)],
    )?;
    let device = vpipe_pipeline::open_device(&job.compute.device)?;
    // The plan's budget is what is left beside the process's own device footprint (the
    // context, the handles), as a run plans it.
    let baseline = vpipe_mem::Meters::for_device(&device)?.read()?;
    job.compute.bound_by_device(&device, &baseline);
    let [pixels] = super::read_inputs(&job.input, ["pixel_values"])?;
    let one = super::OneModel {
        phase: "clip vision",
        model: "clip vision",
        label: "clip vision",
        flag: "--clip-vision",
        checkpoint: &checkpoint,
        output: &job.output,
        output_key: "image_features",
        compute: &job.compute,
    };
    super::run_one_model(one, &device, |p, id| {
        Ok(vpipe_pipeline::clip_vision_features(
            p,
            (id, &checkpoint, &job.config),
            &pixels.to_device(&device)?,
            (job.compute.dtype, &device),
            job.compute.model_budget(),
        )?)
    })
}
