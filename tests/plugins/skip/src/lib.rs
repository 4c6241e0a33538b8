//! Skips every delivery, with the reason given in its config (`{"reason": "..."}`): the host must
//! record the delivery as skipped with that reason and send nothing.

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value};

pub struct Skip;

impl Plugin for Skip {
    fn transform(_: &Context, _: Value, config: &Value) -> Result<Outcome, String> {
        let reason = config["reason"].as_str().unwrap_or("no reason given");
        Ok(Outcome::Skip(reason.to_string()))
    }
}

rulehook_plugin_sdk::export_plugin!(Skip);
