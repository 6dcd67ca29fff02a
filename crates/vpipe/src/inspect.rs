//! `vpipe inspect`.

use std::io::Write;
use std::process::ExitCode;

use crate::flags::InspectArgs;

pub(crate) fn run(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let inspection = vpipe_ckpt::inspect(&args.file)?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &inspection)?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{inspection}")?;
    }
    Ok(ExitCode::SUCCESS)
}
