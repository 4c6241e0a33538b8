//! Panics: the component traps, and the host must report the panic message on the delivery.

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value};

pub struct Panic;

impl Plugin for Panic {
    fn transform(_: &Context, payload: Value, _: &Value) -> Result<Outcome, String> {
        // Conditional on the input so the compiler cannot see the panic as unconditional.
        if payload.is_object() {
            panic!("boom: test panic");
        }
        Ok(Outcome::Send(payload))
    }
}

rulehook_plugin_sdk::export_plugin!(Panic);
