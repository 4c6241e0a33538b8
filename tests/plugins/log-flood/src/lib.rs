//! Logs 3,000 lines (about 110 KiB), well beyond the host's 64 KiB log cap: the host keeps the first 64 KiB, counts the
//! rest as dropped, and still delivers the payload, which this plugin passes on unchanged.
//!
//! `{"empty": N}` logs N empty messages instead (no bytes, so only a cap on lines stops them);
//! `{"message": "..."}` logs that one message (to show control characters are escaped).

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value, log};

pub struct LogFlood;

impl Plugin for LogFlood {
    fn transform(ctx: &Context, payload: Value, config: &Value) -> Result<Outcome, String> {
        if let Some(n) = config["empty"].as_u64() {
            for _ in 0..n {
                log::info("");
            }
            return Ok(Outcome::Send(payload));
        }
        if let Some(message) = config["message"].as_str() {
            log::warn(message);
            return Ok(Outcome::Send(payload));
        }
        // Few enough that the calls fit the 50 ms deadline on a loaded CI
        // machine (the deadline is wall time), enough to pass the cap.
        for i in 0..3_000 {
            log::info(format!("flood line {i} for event {}", ctx.event_id));
        }
        Ok(Outcome::Send(payload))
    }
}

rulehook_plugin_sdk::export_plugin!(LogFlood);
