//! `vpipe serve`: the server library, given the command line's way of reading a job's
//! settings, so that a job submitted over HTTP is checked exactly as `vpipe run` checks flags.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use vpipe_pipeline::Error::BadInput;

/// A job's JSON settings as the TOML table of a `--pipeline` file (same keys, same values).
fn as_table(settings: &vpipe_serve::Settings) -> vpipe_pipeline::Result<toml::Table> {
    fn value(key: &str, v: &serde_json::Value) -> vpipe_pipeline::Result<toml::Value> {
        use serde_json::Value as J;
        Ok(match v {
            J::String(s) => toml::Value::String(s.clone()),
            J::Bool(b) => toml::Value::Boolean(*b),
            J::Number(n) => match n.as_i64() {
                Some(i) => toml::Value::Integer(i),
                None => toml::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            J::Array(items) => toml::Value::Array(
                items
                    .iter()
                    .map(|item| value(key, item))
                    .collect::<Result<_, _>>()?,
            ),
            J::Null | J::Object(_) => {
                return Err(BadInput(format!(
                    "settings: key `{key}` has a {}; expected a string, number, boolean or list",
                    if v.is_null() { "null" } else { "object" }
                )))
            }
        })
    }
    settings
        .iter()
        .map(|(k, v)| Ok((k.clone(), value(k, v)?)))
        .collect()
}

pub(crate) fn run(config: vpipe_serve::ServeConfig) -> anyhow::Result<ExitCode> {
    let parse: vpipe_serve::JobParser = Arc::new(|settings| {
        crate::flags::run_options_from_settings(&as_table(settings)?, "settings")
    });
    let served = vpipe_serve::serve(
        config,
        parse,
        crate::progress::interrupt_flag(),
        |address| {
            println!("vpipe serve: listening on http://{address}");
            let _ = std::io::stdout().flush();
        },
    );
    match served {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(vpipe_serve::ServeError::BadConfig(message)) => Err(BadInput(message).into()),
        Err(vpipe_serve::ServeError::Pipeline(e)) => Err(e.into()),
        Err(other) => Err(other.into()),
    }
}
