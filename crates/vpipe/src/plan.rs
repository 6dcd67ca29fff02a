//! `vpipe plan`: what each phase of a run will hold in the compute tier, the tile and the
//! attention chunk it will use, its **estimated** peak, and whether the run fits the budget —
//! without loading any weight. `vpipe run` makes the same plan first and refuses to start
//! when it does not fit (exit 3 here too).

use std::process::ExitCode;

use vpipe_pipeline::RunOptions;

pub(crate) fn run(
    options: RunOptions,
    preset: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let plan = vpipe_pipeline::plan(options, preset)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{plan}");
    }
    Ok(if plan.fits() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
