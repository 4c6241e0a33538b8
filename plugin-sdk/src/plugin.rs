//! The plugin contract as plain Rust types: what a plugin is given ([`Context`], the payload, its
//! config) and what it answers ([`Outcome`] or an error message).

use serde_json::Value;

/// Where the payload comes from: the rule that matched and the event that matched it.
///
/// The same facts are in the payload the host builds (`rule`, `event_id`, ...), but a plugin
/// earlier in the chain may have reshaped the payload; the context always tells the truth.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Name of the rule whose `plugins:` chain is running; worth putting in log lines.
    pub rule: String,
    /// Id of the event being delivered, to correlate log lines with a delivery.
    pub event_id: String,
    /// `create`, `update`, `delete`, or a custom event type, as the source sent it.
    pub event_type: String,
    /// The entity's type, such as `defect`.
    pub entity_type: String,
}

impl Context {
    /// A context for `rule` and an event of `event_type` on an entity of `entity_type`.
    pub fn new(
        rule: impl Into<String>,
        event_id: impl Into<String>,
        event_type: impl Into<String>,
        entity_type: impl Into<String>,
    ) -> Self {
        Self {
            rule: rule.into(),
            event_id: event_id.into(),
            event_type: event_type.into(),
            entity_type: entity_type.into(),
        }
    }
}

/// What to do with the delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Send this payload on to the next plugin in the chain, or to the endpoint.
    Send(Value),
    /// Do not send; the host records the reason on the delivery.
    Skip(String),
}

/// A transform plugin. Implement it on a unit struct and hand the type to
/// [`export_plugin!`](crate::export_plugin).
///
/// Both functions are associated functions, not methods: the host may run any call on a fresh
/// instance, so a plugin keeps no state between calls.
pub trait Plugin {
    /// Reshapes one payload. `payload` is the event payload built by the host, or the previous
    /// plugin's output; `config` is the rule's `config:` for this plugin (`null` when the rule
    /// gives none).
    ///
    /// An `Err` fails the delivery with the message, so make it say what was wrong and how to fix
    /// it.
    fn transform(ctx: &Context, payload: Value, config: &Value) -> Result<Outcome, String>;

    /// Checks a rule's `config` once, when rules load, so a mistake is reported by
    /// `rulehook check` rather than on every delivery. The default accepts anything.
    fn validate_config(config: &Value) -> Result<(), String> {
        let _ = config;
        Ok(())
    }
}

/// A plugin over the JSON text itself, for the rare plugin that must not pay for parsing: one that
/// passes the payload through untouched (such as the bundled `noop`), or routes on a prefix.
/// Export it with `export_plugin!(raw MyPlugin)`. Almost every plugin should implement
/// [`Plugin`] instead: its payload arrives parsed and its output is always valid JSON.
///
/// A [`RawOutcome::Send`] must hold valid JSON; the host rejects anything else and fails the
/// delivery, naming the plugin.
pub trait RawPlugin {
    /// Reshapes one payload given as JSON text; `config` is the rule's config as JSON text (empty
    /// or `null` when the rule gives none).
    fn transform_raw(ctx: &Context, payload: String, config: &str) -> Result<RawOutcome, String>;

    /// Checks a rule's config text once, when rules load. The default accepts anything.
    fn validate_config_raw(config: &str) -> Result<(), String> {
        let _ = config;
        Ok(())
    }
}

/// What a [`RawPlugin`] answers: the payload to send as JSON text, or the reason to skip.
pub type RawOutcome = glue::WireOutcome;

/// The JSON-text boundary shared by the component exports and [`crate::testing`].
#[doc(hidden)]
pub mod glue {
    use super::{Context, Outcome, Plugin};
    use serde_json::Value;

    /// [`Outcome`] as it crosses the component boundary: the payload as JSON text.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum WireOutcome {
        /// The payload to send, serialized.
        Send(String),
        /// The reason not to send.
        Skip(String),
    }

    /// Runs [`Plugin::transform`] on JSON text, as the host calls it.
    pub fn transform<P: Plugin>(
        ctx: &Context,
        payload: &str,
        config: &str,
    ) -> Result<WireOutcome, String> {
        let payload: Value = serde_json::from_str(payload).map_err(|e| {
            format!(
                "payload is not valid JSON ({e}); the host passes the event payload or the \
                 previous plugin's output, so check the plugin before this one in the chain"
            )
        })?;
        let config = parse_config(config)?;
        match P::transform(ctx, payload, &config)? {
            Outcome::Send(value) => serde_json::to_string(&value)
                .map(WireOutcome::Send)
                .map_err(|e| format!("the plugin's output could not be serialized as JSON: {e}")),
            Outcome::Skip(reason) => Ok(WireOutcome::Skip(reason)),
        }
    }

    /// Runs [`Plugin::validate_config`] on JSON text, as the host calls it.
    pub fn validate_config<P: Plugin>(config: &str) -> Result<(), String> {
        P::validate_config(&parse_config(config)?)
    }

    /// Parses the config text. Empty text means the rule gave no config and reads as `null`, so a
    /// host may pass either `""` or `"null"` for "no config".
    pub fn parse_config(config: &str) -> Result<Value, String> {
        if config.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(config).map_err(|e| {
            format!("config is not valid JSON ({e}); check the rule's `config:` for this plugin")
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use serde_json::json;

        struct Echo;

        impl Plugin for Echo {
            fn transform(_: &Context, payload: Value, config: &Value) -> Result<Outcome, String> {
                if config.get("skip").is_some() {
                    return Ok(Outcome::Skip("asked to".into()));
                }
                Ok(Outcome::Send(json!({"payload": payload, "config": config})))
            }

            fn validate_config(config: &Value) -> Result<(), String> {
                match config {
                    Value::Null | Value::Object(_) => Ok(()),
                    other => Err(format!("config must be an object, found {other}")),
                }
            }
        }

        #[test]
        fn transform_round_trips_json_text_and_keeps_key_order() {
            let out = transform::<Echo>(&Context::default(), r#"{"z":1,"a":2}"#, "").unwrap();
            assert_eq!(
                out,
                WireOutcome::Send(r#"{"payload":{"z":1,"a":2},"config":null}"#.into())
            );
        }

        #[test]
        fn skip_passes_the_reason_through() {
            let out = transform::<Echo>(&Context::default(), "{}", r#"{"skip":1}"#).unwrap();
            assert_eq!(out, WireOutcome::Skip("asked to".into()));
        }

        #[test]
        fn malformed_text_is_an_error_that_says_which_argument() {
            let err = transform::<Echo>(&Context::default(), "{", "{}").unwrap_err();
            assert!(err.starts_with("payload is not valid JSON"), "{err}");
            let err = transform::<Echo>(&Context::default(), "{}", "{x").unwrap_err();
            assert!(err.starts_with("config is not valid JSON"), "{err}");
            let err = validate_config::<Echo>("[").unwrap_err();
            assert!(err.starts_with("config is not valid JSON"), "{err}");
        }

        #[test]
        fn empty_and_null_config_both_read_as_null() {
            for text in ["", "  ", "null"] {
                assert_eq!(parse_config(text).unwrap(), Value::Null, "{text:?}");
                assert_eq!(validate_config::<Echo>(text), Ok(()));
            }
            assert!(validate_config::<Echo>("3").is_err());
        }
    }
}
