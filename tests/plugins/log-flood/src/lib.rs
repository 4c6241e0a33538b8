//! Logs 3,000 lines (about 110 KiB), well beyond the host's 64 KiB log cap: the host keeps the first 64 KiB, counts the
//! rest as dropped, and still delivers the payload, which this plugin passes on unchanged.

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value, log};

pub struct LogFlood;

impl Plugin for LogFlood {
    fn transform(ctx: &Context, payload: Value, _: &Value) -> Result<Outcome, String> {
        // Few enough that the calls fit the 50 ms deadline on a loaded CI
        // machine (the deadline is wall time), enough to pass the cap.
        for i in 0..3_000 {
            log::info(format!("flood line {i} for event {}", ctx.event_id));
        }
        Ok(Outcome::Send(payload))
    }
}

rulehook_plugin_sdk::export_plugin!(LogFlood);
