//! Sleeps through `std::thread::sleep` (on wasm32-wasip2: `wasi:clocks/monotonic-clock`
//! `subscribe-duration` and a blocking poll). The host's deadline must hold in wall time while the
//! guest waits in a host call, and one plugin's sleeping calls must not starve other plugins.
//!
//! Config: `{"forever": true}` (the default) sleeps 10 s at a time, forever, so only the deadline
//! ends the call; `{"forever": false, "ms": N}` sleeps once for N ms and passes the payload on;
//! `{"in": "validate"}` does the sleeping in `validate-config` instead, where it holds a reload.

use std::time::Duration;

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value};

pub struct Sleep;

fn sleep_as_configured(config: &Value) {
    let forever = config
        .get("forever")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let ms = config.get("ms").and_then(Value::as_u64).unwrap_or(10_000);
    loop {
        std::thread::sleep(Duration::from_millis(ms));
        if !forever {
            return;
        }
    }
}

fn sleeps_in(config: &Value) -> &str {
    config
        .get("in")
        .and_then(Value::as_str)
        .unwrap_or("transform")
}

impl Plugin for Sleep {
    fn transform(_: &Context, payload: Value, config: &Value) -> Result<Outcome, String> {
        if sleeps_in(config) == "transform" {
            sleep_as_configured(config);
        }
        Ok(Outcome::Send(payload))
    }

    fn validate_config(config: &Value) -> Result<(), String> {
        if sleeps_in(config) == "validate" {
            sleep_as_configured(config);
        }
        Ok(())
    }
}

rulehook_plugin_sdk::export_plugin!(Sleep);
