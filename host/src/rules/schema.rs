//! The rule file format as types, for `rulehook schema`: a JSON Schema that
//! editors use to complete and validate rule files. The decoder in `parse`
//! is the authority; a test keeps the key sets of both the same.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde_json::Value;

/// A rule file: one or more rules, and UDF labels shared by them.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
pub struct RuleFile {
    pub rules: Vec<Rule>,
    /// UDF label → UDF name, for `fields: [{label: …}]`.
    pub labels: Option<BTreeMap<String, String>>,
}

/// When an event matters and where it goes.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Rule {
    /// Unique across the rules directory: letters, digits, `-`, `_`, `.`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9._-]{1,100}$"))]
    pub name: String,
    pub description: Option<String>,
    /// An inactive rule never fires. Default true.
    pub active: Option<bool>,
    /// Every key must equal the event's scope value.
    pub scope: Option<BTreeMap<String, ScopeValue>>,
    /// Omitted or empty: any entity type.
    pub entity_types: Option<OneOrMany>,
    /// create, update, delete, or any custom event name.
    pub events: OneOrMany,
    /// Conditions; omitted: always.
    pub when: Option<Condition>,
    /// Extra entity fields to send: names, dotted paths, patterns (`*_udf`),
    /// JSONPaths (`$…`), or `{label: …}`.
    pub fields: Option<Vec<FieldSelector>>,
    /// UDF label → UDF name for this rule.
    pub labels: Option<BTreeMap<String, String>>,
    /// Plugins run in order on the payload.
    pub plugins: Option<Vec<PluginRef>>,
    pub webhook: Webhook,
    /// Send the deliveries of one key (by default the entity) one at a time,
    /// in acceptance order.
    pub ordering: Option<Ordering>,
}

/// A rule's ordering promise.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Ordering {
    /// `entity` (type and id, the default), a field of the entity
    /// (`phase.id`) or a JSONPath over the event (`$.scope.workspace_id`).
    pub key: Option<String>,
    /// When a delivery fails for good: `skip` (default; record it and send
    /// the next) or `halt` (hold the key until an admin resumes or skips).
    pub on_failure: Option<OnFailure>,
}

#[derive(JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum OnFailure {
    Skip,
    Halt,
}

#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum ScopeValue {
    Text(String),
    Number(i64),
    Flag(bool),
}

#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum FieldSelector {
    Name(String),
    Label { label: String },
}

/// A condition: a group (`all`, `any`, `not`) or a field test.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum Condition {
    All { all: Vec<Condition> },
    Any { any: Vec<Condition> },
    Not { not: Box<Condition> },
    Leaf(Box<Leaf>),
    List(Vec<Condition>),
}

/// `field` and exactly one operator.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Leaf {
    /// A name, a dotted path (`phase.id`) or a JSONPath starting with `$`.
    pub field: String,
    /// Read the value before the change.
    pub original: Option<bool>,
    pub equals: Option<Value>,
    pub not_equals: Option<Value>,
    #[serde(rename = "in")]
    pub in_: Option<Vec<Value>>,
    pub not_in: Option<Vec<Value>>,
    pub contains: Option<Value>,
    /// A regular expression (Rust regex syntax).
    pub matches: Option<String>,
    pub gt: Option<Value>,
    pub gte: Option<Value>,
    pub lt: Option<Value>,
    pub lte: Option<Value>,
    pub exists: Option<bool>,
    pub is_empty: Option<bool>,
    pub is_modified: Option<bool>,
    pub changed_from: Option<Value>,
    pub changed_to: Option<Value>,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
pub struct PluginRef {
    /// A bundled plugin or a `.wasm` file name (without extension) in the plugins directory.
    pub name: String,
    pub config: Option<Value>,
    /// This entry's deadline per call (e.g. `200ms`), instead of the server's `plugin_timeout`; at most `plugin_timeout_max` (default 1s).
    pub timeout: Option<String>,
    /// This entry's memory cap (e.g. `64MiB`), instead of the server's `plugin_memory`; at most `plugin_memory_max` (default 256MiB).
    pub memory: Option<String>,
}

/// Where and how to send.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Webhook {
    /// https://… (http only when the server allows it).
    pub url: Option<String>,
    /// POST (default), PUT or PATCH.
    pub method: Option<String>,
    /// Header name → value: text, or `{env: NAME}` / `{file: PATH}` for a
    /// secret such as an API key (sent, but redacted in records).
    pub headers: Option<BTreeMap<String, HeaderValue>>,
    pub credentials: Option<Credentials>,
    /// One secret, or several during a rotation.
    pub secret: Option<SecretOrMany>,
    /// hmac-sha256 and/or standard-webhooks.
    pub signature: Option<OneOrMany>,
    /// Default X-Rulehook-Signature.
    pub signature_header: Option<String>,
    pub timeouts: Option<Timeouts>,
    pub retry: Option<Retry>,
    pub tls: Option<Tls>,
    /// http (default) or websocket.
    pub transport: Option<String>,
    /// websocket only: the shared space whose connected clients get the
    /// deliveries (default: the event's scope.sharedspace_id).
    pub space: Option<ScopeValue>,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum SecretOrMany {
    One(Secret),
    Many(Vec<Secret>),
}

/// `{env: NAME}`, `{file: PATH}`, or (not in production) the value inline.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum Secret {
    Env { env: String },
    File { file: String },
    Inline(String),
}

/// A header's text, or a secret: `{env: NAME}`, `{file: PATH}`.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum HeaderValue {
    Text(String),
    Env { env: String },
    File { file: String },
}

/// Durations such as 500ms, 20s, 5m, 1h.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Timeouts {
    pub connect: Option<String>,
    pub reply: Option<String>,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Retry {
    /// fixed (default), exponential or none.
    pub policy: Option<String>,
    /// fixed: the wait between attempts (default 60s).
    pub interval: Option<String>,
    /// fixed: how many retries after the first attempt (default 3).
    pub retries: Option<u32>,
    /// exponential: the waits (default 5s, 5m, 30m, 2h, 5h, 10h, 14h, 20h, 24h).
    pub intervals: Option<Vec<String>>,
    /// exponential: ± fraction applied to each wait (default 0.2).
    pub jitter: Option<f64>,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Tls {
    /// Validate the endpoint's certificate (default true).
    pub verify: Option<bool>,
}

/// The JSON Schema of a rule file.
pub fn json_schema() -> Value {
    let schema = schemars::schema_for!(RuleFile);
    serde_json::to_value(&schema).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::json_schema;
    use crate::rules::model::OPERATORS;
    use crate::rules::parse::{FILE_KEYS, ORDERING_KEYS, RULE_KEYS, WEBHOOK_KEYS};

    fn keys(schema: &serde_json::Value, pointer: &str) -> Vec<String> {
        let mut k: Vec<String> = schema
            .pointer(pointer)
            .and_then(|v| v.as_object())
            .unwrap_or_else(|| panic!("no {pointer} in schema"))
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    }

    fn sorted(k: &[&str]) -> Vec<String> {
        let mut k: Vec<String> = k.iter().map(|s| s.to_string()).collect();
        k.sort();
        k
    }

    #[test]
    fn schema_keys_match_the_decoder() {
        let s = json_schema();
        assert_eq!(keys(&s, "/properties"), sorted(FILE_KEYS));
        assert_eq!(keys(&s, "/$defs/Rule/properties"), sorted(RULE_KEYS));
        assert_eq!(keys(&s, "/$defs/Webhook/properties"), sorted(WEBHOOK_KEYS));
        assert_eq!(
            keys(&s, "/$defs/Ordering/properties"),
            sorted(ORDERING_KEYS)
        );
        let mut leaf = sorted(OPERATORS);
        leaf.extend(["field".to_string(), "original".to_string()]);
        leaf.sort();
        assert_eq!(keys(&s, "/$defs/Leaf/properties"), leaf);
    }
}
