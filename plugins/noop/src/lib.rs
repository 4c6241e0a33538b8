//! `noop`: sends the payload on unchanged.
//!
//! It exists to measure what the plugin boundary itself costs (copying the payload into the
//! component and back, instantiating or reusing an instance), so benchmarks of the host's plugin
//! runtime have a baseline with no work inside. It is a [`RawPlugin`]: the JSON text goes back
//! out as it came in, never parsed, so the figure is the host's overhead and not serde's. It
//! accepts any config.

use rulehook_plugin_sdk::{Context, RawOutcome, RawPlugin};

/// The plugin: the identity transform.
pub struct Noop;

impl RawPlugin for Noop {
    fn transform_raw(_ctx: &Context, payload: String, _config: &str) -> Result<RawOutcome, String> {
        Ok(RawOutcome::Send(payload))
    }
}

rulehook_plugin_sdk::export_plugin!(raw Noop);

#[cfg(test)]
mod tests {
    use super::*;
    use rulehook_plugin_sdk::testing;

    #[test]
    fn sends_every_sample_payload_unchanged_byte_for_byte() {
        for payload in [
            testing::sample_update(),
            testing::sample_create(),
            testing::sample_delete(),
        ] {
            let text = payload.to_string();
            let ctx = testing::context_for(&payload);
            let (result, logs) = testing::run_raw::<Noop>(&ctx, &text, "");
            assert_eq!(result, Ok(RawOutcome::Send(text)));
            assert!(logs.is_empty());
        }
    }

    #[test]
    fn accepts_any_config() {
        for config in ["", "null", r#"{"x": 1}"#, "not even json"] {
            assert_eq!(Noop::validate_config_raw(config), Ok(()), "{config}");
        }
    }
}
