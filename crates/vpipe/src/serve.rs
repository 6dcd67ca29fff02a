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

#[cfg(test)]
mod fuzz {
    //! A job's JSON settings end in run options or an error, never a panic, whatever their
    //! keys and values (the server checks paths before this; here any value reaches the
    //! command line's parser).

    use super::*;
    use proptest::prelude::*;

    const KEYS: &[&str] = &[
        "prompt",
        "size",
        "frames",
        "steps",
        "cfg",
        "shift",
        "seed",
        "strength",
        "tile",
        "sampler",
        "lora",
        "cache",
        "cache_threshold",
        "boundary",
        "dtype",
        "model_dir",
        "no_such_key",
        "vram_budget",
        "out",
    ];

    fn value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value as J;
        let leaf = prop_oneof![
            any::<String>().prop_map(J::String),
            "-?[0-9]{1,12}(\\.[0-9]{1,6})?".prop_map(J::String),
            any::<i64>().prop_map(J::from),
            any::<f64>().prop_map(J::from),
            any::<bool>().prop_map(J::from),
            Just(J::Null),
        ];
        prop_oneof![
            leaf.clone(),
            prop::collection::vec(leaf.clone(), 0..3).prop_map(J::Array),
            prop::collection::vec(("[a-z]{1,4}", leaf), 0..2)
                .prop_map(|e| J::Object(e.into_iter().collect())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 600, failure_persistence: None, ..ProptestConfig::default()
        })]

        #[test]
        fn any_json_settings_parse_or_fail_cleanly(
            entries in prop::collection::vec((prop::sample::select(KEYS), value()), 0..6),
        ) {
            let settings: vpipe_serve::Settings =
                entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let _ = as_table(&settings)
                .and_then(|t| crate::flags::run_options_from_settings(&t, "settings"));
        }
    }
}
