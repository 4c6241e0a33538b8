//! Reports the environment it can see: `{"home": $HOME or null, "vars": count}`. Under the host's
//! deny-all WASI context that is `{"home": null, "vars": 0}`.

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value, json};

pub struct ReadEnv;

impl Plugin for ReadEnv {
    fn transform(_: &Context, _: Value, _: &Value) -> Result<Outcome, String> {
        Ok(Outcome::Send(json!({
            "home": std::env::var("HOME").ok(),
            "vars": std::env::vars().count(),
        })))
    }
}

rulehook_plugin_sdk::export_plugin!(ReadEnv);
