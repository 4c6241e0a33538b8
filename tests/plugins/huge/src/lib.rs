//! Returns 2 MiB of JSON: more than the host's output cap (1 MiB by default), which must refuse it
//! rather than store or send it.

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value};

pub struct Huge;

impl Plugin for Huge {
    fn transform(_: &Context, _: Value, _: &Value) -> Result<Outcome, String> {
        Ok(Outcome::Send(Value::String("x".repeat(2 << 20))))
    }
}

rulehook_plugin_sdk::export_plugin!(Huge);
