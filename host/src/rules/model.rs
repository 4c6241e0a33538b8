//! A rule as the engine uses it: validated, with regexes and JSONPaths
//! compiled and secrets resolved. Built only by `parse`, so every `Rule`
//! that exists is a valid one.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use jsonpath_rust::parser::model::JpQuery;
use regex::Regex;
use serde_json::Value;

use super::yaml::Span;

/// Where a rule (or a part of it) was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub span: Span,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.span)
    }
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub origin: Origin,
    pub description: Option<String>,
    /// An inactive rule is loaded and checked but never fires.
    pub active: bool,
    /// Every key must equal the event's scope value (`1002` = `"1002"`).
    pub scope: Vec<(String, Value)>,
    /// Empty: any entity type.
    pub entity_types: Vec<String>,
    /// `create`, `update`, `delete` or custom event names; never empty.
    pub events: Vec<String>,
    pub when: Option<Condition>,
    /// The rule's `fields` as written, passed to the select-fields plugin.
    pub fields: Vec<Value>,
    /// UDF label → UDF name (`Rework Counter` → `rework_counter_udf`), the
    /// file's `labels` merged with the rule's own.
    pub labels: Vec<(String, String)>,
    pub plugins: Vec<PluginRef>,
    pub webhook: Webhook,
    /// `ordering:`: the rule's deliveries with one key are sent one at a
    /// time, in acceptance order.
    pub ordering: Option<Ordering>,
}

/// A rule's ordering promise: deliveries whose events have the same key
/// go one at a time, each after the one accepted before it is final.
#[derive(Clone, Debug)]
pub struct Ordering {
    pub key: OrderKey,
    pub on_failure: OnFailure,
}

/// What groups a rule's deliveries into one ordered lane.
#[derive(Clone, Debug)]
pub enum OrderKey {
    /// The entity: its type and id (`defect:2013`).
    Entity,
    /// A field of the entity or a JSONPath over the event, as in `when`.
    Field(Field),
}

/// What a lane does when its head delivery fails for good (retries spent,
/// or a permanent error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Keep the failure on record and send the next one.
    Skip,
    /// Hold the lane until an admin resumes (sends the head again) or
    /// skips it.
    Halt,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Skip => "skip",
            OnFailure::Halt => "halt",
        }
    }
}

impl fmt::Display for OrderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrderKey::Entity => f.write_str("entity"),
            OrderKey::Field(field) => field.fmt(f),
        }
    }
}

/// One step of a rule's plugin chain, run later by the plugin runtime.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginRef {
    pub name: String,
    pub config: Value,
    /// The `{name, config}` entry, where config problems are reported.
    pub origin: Origin,
    /// The name itself, where an unknown plugin is reported.
    pub name_origin: Origin,
    /// This entry's own deadline per call (`timeout:`), instead of the
    /// server's `plugin_timeout`; at most `plugin_timeout_max`, which the
    /// plugin check (it knows the server's limits) enforces.
    pub timeout: Option<Duration>,
    /// This entry's own memory cap (`memory:`), at most `plugin_memory_max`.
    pub memory: Option<usize>,
}

/// A condition node. `path` says where it sits in the rule (`when.all[1]`)
/// so `explain` can point at the one that failed.
#[derive(Clone, Debug)]
pub struct Condition {
    pub path: String,
    pub span: Span,
    pub kind: ConditionKind,
}

#[derive(Clone, Debug)]
pub enum ConditionKind {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Leaf(Leaf),
}

/// `field` + operator + value.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub field: Field,
    /// Read the value from `before` rather than the entity.
    pub original: bool,
    pub op: Op,
}

/// How a condition addresses a value.
#[derive(Clone, Debug)]
pub enum Field {
    /// A top-level entity field: `severity`.
    Name(String),
    /// A dotted path into the entity: `phase.id`, `comments.0.author`.
    Path(Vec<String>),
    /// An RFC 9535 JSONPath over the whole event document: `$.entity.x`.
    JsonPath { text: String, query: Box<JpQuery> },
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Name(n) => f.write_str(n),
            Field::Path(p) => f.write_str(&p.join(".")),
            Field::JsonPath { text, .. } => f.write_str(text),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Op {
    Equals(Value),
    NotEquals(Value),
    In(Vec<Value>),
    NotIn(Vec<Value>),
    Contains(Value),
    Matches(Regex),
    Gt(Value),
    Gte(Value),
    Lt(Value),
    Lte(Value),
    Exists(bool),
    IsEmpty(bool),
    IsModified(bool),
    ChangedFrom(Value),
    ChangedTo(Value),
}

/// The operator keys, in the order the docs list them.
pub const OPERATORS: &[&str] = &[
    "equals",
    "not_equals",
    "in",
    "not_in",
    "contains",
    "matches",
    "gt",
    "gte",
    "lt",
    "lte",
    "exists",
    "is_empty",
    "is_modified",
    "changed_from",
    "changed_to",
];

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Equals(_) => "equals",
            Op::NotEquals(_) => "not_equals",
            Op::In(_) => "in",
            Op::NotIn(_) => "not_in",
            Op::Contains(_) => "contains",
            Op::Matches(_) => "matches",
            Op::Gt(_) => "gt",
            Op::Gte(_) => "gte",
            Op::Lt(_) => "lt",
            Op::Lte(_) => "lte",
            Op::Exists(_) => "exists",
            Op::IsEmpty(_) => "is_empty",
            Op::IsModified(_) => "is_modified",
            Op::ChangedFrom(_) => "changed_from",
            Op::ChangedTo(_) => "changed_to",
        }
    }

    /// The operand as JSON, for messages.
    pub fn operand(&self) -> Value {
        match self {
            Op::Equals(v)
            | Op::NotEquals(v)
            | Op::Contains(v)
            | Op::Gt(v)
            | Op::Gte(v)
            | Op::Lt(v)
            | Op::Lte(v)
            | Op::ChangedFrom(v)
            | Op::ChangedTo(v) => v.clone(),
            Op::In(vs) | Op::NotIn(vs) => Value::Array(vs.clone()),
            Op::Matches(re) => Value::String(re.as_str().to_string()),
            Op::Exists(b) | Op::IsEmpty(b) | Op::IsModified(b) => Value::Bool(*b),
        }
    }
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let original = if self.original { " (original)" } else { "" };
        write!(
            f,
            "{}{original} {} {}",
            self.field,
            self.op.name(),
            self.op.operand()
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Post,
    Put,
    Patch,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Http,
    WebSocket,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureStyle {
    /// `X-Rulehook-Signature: sha256=<hex>` (header name configurable).
    HmacSha256,
    /// `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`.
    StandardWebhooks,
}

/// Where a secret comes from. The value never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    /// `env:NAME`, `file:PATH` or `inline`, for messages.
    pub source: String,
    pub value: String,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({}, ***)", self.source)
    }
}

/// A reference to a secret as written in a rule file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
    Inline(String),
}

/// The value of one of a rule's own `headers`: text as written, or a
/// secret (`{env: NAME}`, `{file: PATH}`) such as an API key, which is sent
/// but never shown: records say `***`, `explain` names its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderValue {
    Text(String),
    Secret(Secret),
}

impl HeaderValue {
    /// What the request carries.
    pub fn value(&self) -> &str {
        match self {
            HeaderValue::Text(t) => t,
            HeaderValue::Secret(s) => &s.value,
        }
    }

    /// What an attempt record keeps: the text, or `***` for a secret.
    pub fn recorded(&self) -> &str {
        match self {
            HeaderValue::Text(t) => t,
            HeaderValue::Secret(_) => "***",
        }
    }

    /// What `explain` shows: the text, or where the secret comes from.
    pub fn preview(&self) -> String {
        match self {
            HeaderValue::Text(t) => t.clone(),
            HeaderValue::Secret(s) => format!("<secret from {}>", s.source),
        }
    }
}

/// Whether a header value would split the request (CR, LF) or end it (NUL).
/// Checked when rules are parsed and again when a stored version's
/// secrets are resolved, since a secret can change in between.
pub fn breaks_header(value: &str) -> bool {
    value.chars().any(|c| c == '\r' || c == '\n' || c == '\0')
}

#[derive(Clone, Debug, PartialEq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RetryPolicy {
    /// The same wait between attempts.
    Fixed { interval: Duration, retries: u32 },
    /// Waits from a schedule, each varied by ±`jitter` (a fraction).
    Exponential {
        intervals: Vec<Duration>,
        jitter: f64,
    },
    /// One attempt only.
    None,
}

impl RetryPolicy {
    /// The default of DESIGN.md: every 60 s, 3 retries (4 sends in all).
    pub fn default_fixed() -> Self {
        RetryPolicy::Fixed {
            interval: Duration::from_secs(60),
            retries: 3,
        }
    }

    /// The Standard Webhooks schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h.
    pub fn default_exponential_intervals() -> Vec<Duration> {
        [5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]
            .into_iter()
            .map(Duration::from_secs)
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Webhook {
    /// Required for HTTP; optional for WebSocket delivery.
    pub url: Option<url::Url>,
    pub method: Method,
    /// The rule's own headers, in the order written.
    pub headers: Vec<(String, HeaderValue)>,
    pub credentials: Option<Credentials>,
    /// Several during a rotation; each is used to sign.
    pub secrets: Vec<Secret>,
    pub signature: Vec<SignatureStyle>,
    pub signature_header: String,
    pub connect_timeout: Duration,
    pub reply_timeout: Duration,
    pub retry: RetryPolicy,
    pub tls_verify: bool,
    pub transport: Transport,
    /// For `transport: websocket`: the shared space whose connected clients
    /// get the deliveries. Default: the event's `scope.sharedspace_id`.
    pub space: Option<String>,
}

pub const DEFAULT_SIGNATURE_HEADER: &str = "X-Rulehook-Signature";
