//! `vpipe`: Wan 2.1 video diffusion under a memory budget that it keeps and proves.
//!
//! `main` stays thin: parse flags, run, turn errors into one line on stderr and an exit code
//! that a scheduler can act on (see [`exit::code_for`]).

use std::process::ExitCode;

#[global_allocator]
static ALLOC: vpipe_mem::CountingAllocator = vpipe_mem::CountingAllocator;

mod demo;
mod exit;
mod flags;
mod inspect;
mod plan;
mod progress;
mod run;
mod serve;
mod tensors;

fn main() -> ExitCode {
    let command = flags::parse();
    init_tracing();
    progress::catch_interrupt();
    match run(command) {
        Ok(code) => code,
        Err(err) => {
            if exit::is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("vpipe: {}", exit::message(&err));
            exit::code_for(&err)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VPIPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // VPIPE_LOG_SPANS=1 adds each span's busy time when it closes (with CUDA_LAUNCH_BLOCKING=1
    // that is device time: a coarse profile without a profiler).
    let spans = if std::env::var_os("VPIPE_LOG_SPANS").is_some() {
        tracing_subscriber::fmt::format::FmtSpan::CLOSE
    } else {
        tracing_subscriber::fmt::format::FmtSpan::NONE
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(spans)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn run(command: flags::Command) -> anyhow::Result<ExitCode> {
    match command {
        flags::Command::Demo(args) => demo::run(args.validate()?),
        flags::Command::Inspect(args) => inspect::run(&args),
        flags::Command::Run(args) => run::run(args.validate(false)?),
        flags::Command::Plan(args) => {
            let (preset, json) = (args.preset.clone(), args.json);
            plan::run(args.validate(true)?, preset.as_deref(), json)
        }
        flags::Command::Serve(args) => serve::run(args.validate()?),
        flags::Command::Tensors(args) => match args.component {
            flags::TensorsComponent::VaeEncode(vae) => {
                tensors::run_vae(vpipe_pipeline::VaeOp::Encode, vae.validate()?)
            }
            flags::TensorsComponent::VaeDecode(vae) => {
                tensors::run_vae(vpipe_pipeline::VaeOp::Decode, vae.validate()?)
            }
            flags::TensorsComponent::Dit(dit) => tensors::run_dit(dit.validate()?),
            flags::TensorsComponent::TextEncode(text) => tensors::run_text_encode(text.validate()?),
            flags::TensorsComponent::ClipVision(clip) => tensors::run_clip_vision(clip.validate()?),
            flags::TensorsComponent::Schedule(schedule) => {
                tensors::run_schedule(schedule.validate()?)
            }
        },
    }
}
