//! Run a plugin natively, the way the host runs the component, from a `#[test]`.
//!
//! [`run`] serializes the payload and config to JSON text, calls the plugin through the same
//! glue as the component export, and parses the output back, so a test sees what the host would
//! (key order included). Logged lines come back with the result.
//!
//! What a native run does not reproduce: the host's CPU deadline (50 ms per call by default), its
//! memory cap (32 MiB), its caps on output size and log volume, and the sandbox (a plugin that
//! reads a file or the environment works here and fails under the host). Build for `wasm32-wasip2` and
//! try `rulehook plugin run` before shipping.

use crate::log::{LogLine, take_captured};
use crate::plugin::glue::{self, WireOutcome};
use crate::{Context, Outcome, Plugin};
use serde_json::{Value, json};

/// Runs `P::transform` on `payload` with `config` as the host would; returns its result and the
/// lines it logged.
pub fn run<P: Plugin>(
    ctx: &Context,
    payload: &Value,
    config: &Value,
) -> (Result<Outcome, String>, Vec<LogLine>) {
    run_text::<P>(ctx, &payload.to_string(), &config.to_string())
}

/// Like [`run`], with the payload and config as JSON text, to test what a plugin does with text
/// that is not JSON.
pub fn run_text<P: Plugin>(
    ctx: &Context,
    payload: &str,
    config: &str,
) -> (Result<Outcome, String>, Vec<LogLine>) {
    take_captured();
    let result = glue::transform::<P>(ctx, payload, config).and_then(|wire| match wire {
        WireOutcome::Send(text) => serde_json::from_str(&text)
            .map(Outcome::Send)
            .map_err(|e| format!("plugin output is not valid JSON ({e}): {text}")),
        WireOutcome::Skip(reason) => Ok(Outcome::Skip(reason)),
    });
    (result, take_captured())
}

/// Runs a [`RawPlugin`](crate::RawPlugin) on JSON text as the host would; returns its result and
/// the lines it logged.
pub fn run_raw<P: crate::RawPlugin>(
    ctx: &Context,
    payload: &str,
    config: &str,
) -> (Result<WireOutcome, String>, Vec<LogLine>) {
    take_captured();
    let result = P::transform_raw(ctx, payload.to_string(), config);
    (result, take_captured())
}

/// Runs `P::validate_config` on `config` as the host does when rules load.
pub fn validate<P: Plugin>(config: &Value) -> (Result<(), String>, Vec<LogLine>) {
    take_captured();
    let result = glue::validate_config::<P>(&config.to_string());
    (result, take_captured())
}

/// Payloads no host builds, as a broken plugin earlier in a chain might send them: a robust
/// plugin answers each with a payload or an error that says what is wrong, never a panic (a panic
/// traps the component and fails the delivery with a less helpful message).
pub fn odd_payloads() -> Vec<Value> {
    vec![
        Value::Null,
        json!(1),
        json!("x"),
        json!([]),
        json!({}),
        json!({"entity": null, "changes": null, "user": null, "scope": null}),
        json!({"entity": [1], "changes": "x", "user": [], "scope": 5}),
        json!({"entity": {}, "changes": {"a": 1, "b": {"old": 1}}}),
        json!({"event_type": 5, "entity": {"id": {"x": 1}, "type": null, "a": {"b": [1, {"c": 2}]}}}),
        json!({"entity": {"comments": [[[]]], "owner": "x"}, "changes": {"owner": {"old": 1, "new": [2]}}}),
    ]
}

/// The context the host would pass along with `payload`, read from the payload's own `rule`,
/// `event_id`, `event_type` and `entity_type` (missing ones are empty).
pub fn context_for(payload: &Value) -> Context {
    let text = |key: &str| {
        payload
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    Context {
        rule: text("rule"),
        event_id: text("event_id"),
        event_type: text("event_type"),
        entity_type: text("entity_type"),
    }
}

/// A payload as the host builds it for an `update` of a defect: a phase change, with UDFs,
/// comments and a nested reference among the entity's fields.
pub fn sample_update() -> Value {
    json!({
        "event_id": "evt-1",
        "event_type": "update",
        "entity_type": "defect",
        "occurred_at": "2026-11-22T10:00:00Z",
        "rule": "defect-reopened",
        "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
        "user": {"id": "1001", "email": "admin@example.com"},
        "entity": {
            "id": "2013",
            "type": "defect",
            "name": "Crash on save",
            "description": "Stack trace mentions customer ACME",
            "severity": {"id": "list_node.severity.high", "name": "High"},
            "phase": {"id": "phase.defect.opened", "name": "Opened"},
            "rework_counter_udf": 2,
            "root_cause_udf": "config",
            "comments": [
                {"author": "bot", "text": "auto-triaged"},
                {"author": "ann", "text": "seen it too"},
                {"author": "bot", "text": "reopened"},
            ],
        },
        "changes": {
            "phase": {
                "old": {"id": "phase.defect.fixed"},
                "new": {"id": "phase.defect.opened"},
            },
            "rework_counter_udf": {"old": 1, "new": 2},
        },
    })
}

/// A payload as the host builds it for a `create` of a defect: no `changes`.
pub fn sample_create() -> Value {
    let mut payload = sample_update();
    if let Value::Object(map) = &mut payload {
        map.insert("event_id".into(), json!("evt-2"));
        map.insert("event_type".into(), json!("create"));
        map.insert("rule".into(), json!("defect-created"));
        map.shift_remove("changes");
    }
    payload
}

/// A payload as the host builds it for a `delete`: no `changes`, no `user`, no `occurred_at`,
/// and only the fields the source still sent.
pub fn sample_delete() -> Value {
    json!({
        "event_id": "evt-3",
        "event_type": "delete",
        "entity_type": "defect",
        "rule": "defect-deleted",
        "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
        "entity": {"id": "2013", "type": "defect", "name": "Crash on save"},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Chatty;

    impl Plugin for Chatty {
        fn transform(ctx: &Context, payload: Value, _: &Value) -> Result<Outcome, String> {
            crate::log::info(format!("rule {}", ctx.rule));
            if payload.get("entity").is_none() {
                return Ok(Outcome::Skip("no entity".into()));
            }
            Ok(Outcome::Send(payload))
        }
    }

    #[test]
    fn run_returns_result_and_logs() {
        let payload = sample_update();
        let (result, logs) = run::<Chatty>(&context_for(&payload), &payload, &Value::Null);
        assert_eq!(result, Ok(Outcome::Send(payload)));
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].message, "rule defect-reopened");

        let (result, _) = run::<Chatty>(&Context::default(), &json!({}), &Value::Null);
        assert_eq!(result, Ok(Outcome::Skip("no entity".into())));
    }

    #[test]
    fn run_text_reports_bad_json() {
        let (result, logs) = run_text::<Chatty>(&Context::default(), "nope", "");
        assert!(result.unwrap_err().starts_with("payload is not valid JSON"));
        assert!(logs.is_empty());
    }

    #[test]
    fn samples_have_the_documented_shape() {
        assert!(sample_update().get("changes").is_some());
        assert!(sample_create().get("changes").is_none());
        assert_eq!(sample_create()["event_type"], "create");
        assert!(sample_delete().get("user").is_none());
        let ctx = context_for(&sample_delete());
        assert_eq!(
            ctx,
            Context::new("defect-deleted", "evt-3", "delete", "defect")
        );
    }
}
