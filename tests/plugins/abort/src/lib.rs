//! Writes a traceback to stderr and aborts, the way an interpreter (Python, a JS engine) reports
//! an uncaught exception before it traps. No SDK panic hook is involved: the host must take the
//! trap's cause from the captured stderr, not report the backtrace header.

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value};

pub struct Abort;

impl Plugin for Abort {
    fn transform(_: &Context, payload: Value, _: &Value) -> Result<Outcome, String> {
        // Conditional on the input so the compiler cannot see the abort as unconditional.
        if payload.is_object() {
            eprintln!("Traceback (most recent call last):");
            eprintln!("  File \"app.py\", line 3, in transform");
            eprintln!("ValueError: the entity has no owner");
            std::process::abort();
        }
        Ok(Outcome::Send(payload))
    }
}

rulehook_plugin_sdk::export_plugin!(Abort);
