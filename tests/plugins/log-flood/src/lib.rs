//! Logs 10,000 lines (about 400 KiB), far beyond the host's log cap: the host keeps the first 64 KiB, counts the
//! rest as dropped, and still delivers the payload, which this plugin passes on unchanged.

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value, log};

pub struct LogFlood;

impl Plugin for LogFlood {
    fn transform(ctx: &Context, payload: Value, _: &Value) -> Result<Outcome, String> {
        for i in 0..10_000 {
            log::info(format!("flood line {i} for event {}", ctx.event_id));
        }
        Ok(Outcome::Send(payload))
    }
}

rulehook_plugin_sdk::export_plugin!(LogFlood);
