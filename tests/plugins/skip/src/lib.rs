//! Skips every delivery, with the reason given in its config (`{"reason": "..."}`): the host must
//! record the delivery as skipped with that reason and send nothing. `{"repeat": N}` repeats the
//! reason N times (a reason of megabytes the host must cap); `{"fail": true}` answers the reason
//! as an error instead of a skip.

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value};

pub struct Skip;

impl Plugin for Skip {
    fn transform(_: &Context, _: Value, config: &Value) -> Result<Outcome, String> {
        let reason = config["reason"].as_str().unwrap_or("no reason given");
        let repeat = config["repeat"].as_u64().unwrap_or(1) as usize;
        let reason = reason.repeat(repeat);
        if config["fail"].as_bool() == Some(true) {
            return Err(reason);
        }
        Ok(Outcome::Skip(reason))
    }
}

rulehook_plugin_sdk::export_plugin!(Skip);
