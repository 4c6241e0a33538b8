//! Rule files: from YAML text to validated [`Rule`]s, reporting every mistake.
//!
//! The decoder walks the spanned tree of `yaml` by hand rather than through
//! serde so that it can keep going after a mistake and report all of them,
//! each at its own `file:line:column`, with the nearest valid key for typos.
//! It does no I/O: secrets are resolved through the [`SecretResolver`] the
//! caller passes in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::diag::{Sink, nearest};
use super::model::*;
use super::yaml::{self, Node, Scalar, Span};

/// Looks up the value of a secret reference (`{env: NAME}`, `{file: PATH}`).
/// The error says what is missing, e.g. "environment variable X is not set".
/// A compiled regex for `pattern`, from a process-wide memo when an earlier
/// load compiled the same pattern. Compiling regexes is most of the cost
/// of parsing a large rule set (perf: ~60 % of `check` on 10,000 rules),
/// and a reload re-parses every file while most patterns are unchanged.
/// The memo is invisible to callers: the same pattern always compiles to
/// an equivalent `Regex`, and clones share the compiled program.
fn compile_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    use std::sync::{LazyLock, Mutex, PoisonError};
    static MEMO: LazyLock<Mutex<HashMap<String, regex::Regex>>> = LazyLock::new(Default::default);
    // Bounded, so a long-running server whose patterns keep changing does
    // not keep every pattern it ever saw.
    const MAX: usize = 50_000;
    if let Some(re) = MEMO
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(pattern)
    {
        return Ok(re.clone());
    }
    let re = regex::Regex::new(pattern)?;
    let mut memo = MEMO.lock().unwrap_or_else(PoisonError::into_inner);
    if memo.len() >= MAX {
        memo.clear();
    }
    memo.insert(pattern.to_string(), re.clone());
    Ok(re)
}

/// `Sync`: the files of a directory are parsed on several threads.
pub trait SecretResolver: Sync {
    fn resolve(&self, secret: &SecretRef) -> Result<String, String>;
}

impl<F: Fn(&SecretRef) -> Result<String, String> + Sync> SecretResolver for F {
    fn resolve(&self, secret: &SecretRef) -> Result<String, String> {
        self(secret)
    }
}

/// How deep `all` / `any` / `not` (and bare lists) may nest under `when`.
/// Far more than any real rule needs; it keeps evaluation, `explain` and
/// dropping a rule (all recursive) within a small, fixed stack.
pub const MAX_CONDITION_DEPTH: usize = 32;

/// Rules one file may hold.
pub const MAX_RULES_PER_FILE: usize = 10_000;

pub const FILE_KEYS: &[&str] = &["rules", "labels"];
pub const RULE_KEYS: &[&str] = &[
    "name",
    "description",
    "active",
    "scope",
    "entity_types",
    "events",
    "when",
    "fields",
    "labels",
    "plugins",
    "webhook",
    "ordering",
];
pub const WEBHOOK_KEYS: &[&str] = &[
    "url",
    "method",
    "headers",
    "credentials",
    "secret",
    "signature",
    "signature_header",
    "timeouts",
    "retry",
    "tls",
    "transport",
    "space",
];
const CREDENTIAL_KEYS: &[&str] = &["username", "password"];
const TIMEOUT_KEYS: &[&str] = &["connect", "reply"];
const RETRY_KEYS: &[&str] = &["policy", "interval", "retries", "intervals", "jitter"];
const TLS_KEYS: &[&str] = &["verify"];
pub const ORDERING_KEYS: &[&str] = &["key", "on_failure"];
const PLUGIN_KEYS: &[&str] = &["name", "config", "timeout", "memory"];
const SECRET_KEYS: &[&str] = &["env", "file"];
const GROUP_KEYS: &[&str] = &["all", "any", "not"];
const STANDARD_EVENTS: &[&str] = &["create", "update", "delete"];
/// Headers rulehook sets itself; a rule may not override them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "authorization",
    "transfer-encoding",
    "connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// Decodes one rule file. Mistakes go to `sink`; rules with a mistake are
/// left out of the result, so a `Rule` in the result is always valid.
pub fn parse_file(
    file: &Path,
    text: &str,
    secrets: &dyn SecretResolver,
    sink: &mut Sink,
) -> Vec<Rule> {
    let root = match yaml::parse(text) {
        Ok(Some(root)) => root,
        Ok(None) => return Vec::new(),
        Err(e) => {
            let message = if e.is_syntax() {
                format!("invalid YAML: {}", e.message)
            } else {
                e.message
            };
            sink.error(e.span, message, Some(e.fix));
            return Vec::new();
        }
    };
    let mut d = Decoder {
        sink,
        file: file.to_path_buf(),
        secrets,
    };
    d.file_root(&root)
}

struct Decoder<'a> {
    sink: &'a mut Sink,
    file: PathBuf,
    secrets: &'a dyn SecretResolver,
}

/// The known entries of a mapping, after unknown keys were reported.
struct Entries<'n> {
    span: Span,
    items: Vec<(&'n str, &'n Node, &'n Node)>,
}

impl<'n> Entries<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.items
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| *v)
    }

    fn key_span(&self, key: &str) -> Option<Span> {
        self.items
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, k, _)| k.span)
    }
}

impl<'a> Decoder<'a> {
    fn origin(&self, span: Span) -> Origin {
        Origin {
            file: self.file.clone(),
            span,
        }
    }

    fn expected(&mut self, node: &Node, what: &str, context: &str) {
        self.sink.error(
            node.span,
            format!("{context}: expected {what}, found {}", node.kind()),
            None,
        );
    }

    /// Checks that `node` is a mapping whose keys are all in `keys`.
    fn entries<'n>(&mut self, node: &'n Node, context: &str, keys: &[&str]) -> Option<Entries<'n>> {
        let Some(map) = node.as_map() else {
            self.expected(node, "a mapping", context);
            return None;
        };
        let mut items = Vec::with_capacity(map.len());
        for (k, v) in map {
            let Some(name) = k.as_str() else {
                self.sink.error(
                    k.span,
                    format!("{context}: keys must be names, found {}", k.kind()),
                    None,
                );
                continue;
            };
            if keys.contains(&name) {
                items.push((name, k, v));
            } else {
                let fix = match nearest(name, keys) {
                    Some(n) => format!("did you mean `{n}`?"),
                    None => format!("valid keys are: {}", keys.join(", ")),
                };
                self.sink.error(
                    k.span,
                    format!("unknown key `{name}` in {context}"),
                    Some(fix),
                );
            }
        }
        Some(Entries {
            span: node.span,
            items,
        })
    }

    fn string(&mut self, node: &Node, context: &str) -> Option<String> {
        match node.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                self.expected(node, "a string", context);
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, context: &str) -> Option<bool> {
        match node.value {
            yaml::Value::Scalar(Scalar::Bool(b)) => Some(b),
            _ => {
                self.sink.error(
                    node.span,
                    format!("{context}: expected true or false, found {}", node.kind()),
                    None,
                );
                None
            }
        }
    }

    /// A list of names; a single name is accepted as a one-element list.
    fn names(&mut self, node: &Node, context: &str) -> Option<Vec<String>> {
        if let Some(s) = node.as_str() {
            return Some(vec![s.to_string()]);
        }
        let Some(items) = node.as_seq() else {
            self.expected(node, "a list of names", context);
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for item in items {
            match item.as_str() {
                Some(s) if !s.trim().is_empty() => out.push(s.to_string()),
                _ => {
                    self.expected(item, "a non-empty name", context);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn file_root(&mut self, root: &Node) -> Vec<Rule> {
        if root.as_seq().is_some() {
            self.sink.error(
                root.span,
                "a rule file must be a mapping with a `rules:` list",
                Some("put the list under a top-level `rules:` key".into()),
            );
            return Vec::new();
        }
        let Some(top) = self.entries(root, "rule file", FILE_KEYS) else {
            return Vec::new();
        };
        let file_labels = match top.get("labels") {
            Some(node) => self.labels(node).unwrap_or_default(),
            None => Vec::new(),
        };
        let Some(rules) = top.get("rules") else {
            self.sink.error(
                root.span,
                "rule file has no `rules:` list",
                Some("add `rules:` with one or more rules".into()),
            );
            return Vec::new();
        };
        if rules.is_null() {
            return Vec::new();
        }
        let Some(items) = rules.as_seq() else {
            self.expected(rules, "a list of rules", "rules");
            return Vec::new();
        };
        if let Some(first_past) = items.get(MAX_RULES_PER_FILE) {
            self.sink.error(
                first_past.span,
                format!(
                    "rule file has {} rules, past the limit of {MAX_RULES_PER_FILE} rules in one file",
                    items.len()
                ),
                Some("split the rules over several files".into()),
            );
            return Vec::new();
        }
        items
            .iter()
            .filter_map(|node| self.rule(node, &file_labels))
            .collect()
    }

    fn rule(&mut self, node: &Node, file_labels: &[(String, String)]) -> Option<Rule> {
        let before = self.sink.diagnostics.len();
        let e = self.entries(node, "rule", RULE_KEYS)?;
        let name = match e.get("name") {
            Some(n) => self.rule_name(n),
            None => {
                self.sink.error(
                    e.span,
                    "rule has no `name`",
                    Some(
                        "add `name: some-rule-name`; names are unique across the rules directory"
                            .into(),
                    ),
                );
                None
            }
        };
        let ctx = |what: &str| match &name {
            Some(n) => format!("rule `{n}` {what}"),
            None => format!("rule {what}"),
        };
        let description = e
            .get("description")
            .and_then(|n| self.string(n, &ctx("description")));
        let active = e
            .get("active")
            .map_or(Some(true), |n| self.boolean(n, &ctx("active")));
        let scope = e
            .get("scope")
            .map_or(Some(Vec::new()), |n| self.scope(n, &ctx("scope")));
        let entity_types = e
            .get("entity_types")
            .map_or(Some(Vec::new()), |n| self.names(n, &ctx("entity_types")));
        let events = match e.get("events") {
            Some(n) => self.events(n, &ctx("events")),
            None => {
                self.sink.error(
                    e.span,
                    ctx("has no `events`"),
                    Some("add e.g. `events: [create, update]` (create, update, delete or a custom event name)".into()),
                );
                None
            }
        };
        let when = match e.get("when") {
            Some(n) if !n.is_null() => self.condition(n, "when", 1).map(Some),
            _ => Some(None),
        };
        let mut labels = file_labels.to_vec();
        if let Some(n) = e.get("labels") {
            for (label, udf) in self.labels(n).unwrap_or_default() {
                labels.retain(|(l, _)| *l != label);
                labels.push((label, udf));
            }
        }
        let fields = e
            .get("fields")
            .map_or(Some(Vec::new()), |n| self.fields(n, &labels));
        let plugins = e
            .get("plugins")
            .map_or(Some(Vec::new()), |n| self.plugins(n));
        let webhook = match e.get("webhook") {
            Some(n) => self.webhook(n),
            None => {
                self.sink.error(
                    e.span,
                    ctx("has no `webhook`"),
                    Some("add `webhook:` with at least `url: https://…`".into()),
                );
                None
            }
        };
        let ordering = match e.get("ordering") {
            Some(n) if !n.is_null() => self.ordering(n).map(Some),
            _ => Some(None),
        };
        let clean = !self.sink.diagnostics[before..].iter().any(|d| d.is_error());
        if !clean {
            return None;
        }
        Some(Rule {
            name: name?,
            origin: self.origin(e.key_span("name").unwrap_or(e.span)),
            description,
            active: active?,
            scope: scope?,
            entity_types: entity_types?,
            events: events?,
            when: when?,
            fields: fields?,
            labels,
            plugins: plugins?,
            webhook: webhook?,
            ordering: ordering?,
        })
    }

    /// `ordering: {key: entity | FIELD | $.JSONPATH, on_failure: skip | halt}`.
    fn ordering(&mut self, node: &Node) -> Option<Ordering> {
        let e = self.entries(node, "ordering", ORDERING_KEYS)?;
        let key = match e.get("key") {
            None => Some(OrderKey::Entity),
            Some(n) if n.as_str() == Some("entity") => Some(OrderKey::Entity),
            Some(n) => self.field(n, "ordering key").map(OrderKey::Field),
        };
        let on_failure = match e.get("on_failure") {
            None => Some(OnFailure::Skip),
            Some(n) => match self.string(n, "ordering on_failure")?.as_str() {
                "skip" => Some(OnFailure::Skip),
                "halt" => Some(OnFailure::Halt),
                other => {
                    let fix = nearest(other, &["skip", "halt"])
                        .map_or("use skip or halt".to_string(), |n| {
                            format!("did you mean `{n}`?")
                        });
                    self.sink.error(
                        n.span,
                        format!("ordering on_failure `{other}` is unknown"),
                        Some(fix),
                    );
                    None
                }
            },
        };
        Some(Ordering {
            key: key?,
            on_failure: on_failure?,
        })
    }

    fn rule_name(&mut self, node: &Node) -> Option<String> {
        let name = self.string(node, "rule name")?;
        let valid = !name.is_empty()
            && name.len() <= 100
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            self.sink.error(
                node.span,
                format!("rule name `{name}` is not valid"),
                Some("use 1 to 100 letters, digits, `-`, `_` or `.`".into()),
            );
            return None;
        }
        Some(name)
    }

    fn scope(&mut self, node: &Node, context: &str) -> Option<Vec<(String, Value)>> {
        let Some(map) = node.as_map() else {
            self.expected(node, "a mapping such as {workspace_id: 1002}", context);
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (k, v) in map {
            let key = k.scalar_text();
            match &v.value {
                yaml::Value::Scalar(Scalar::Str(_) | Scalar::Int(_) | Scalar::Bool(_)) => {
                    out.push((key, v.to_json()));
                }
                _ => {
                    self.expected(v, "a string or an integer", &format!("{context} `{key}`"));
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn events(&mut self, node: &Node, context: &str) -> Option<Vec<String>> {
        let events = self.names(node, context)?;
        if events.is_empty() {
            self.sink.error(
                node.span,
                format!("{context}: is empty, so the rule could never fire"),
                Some("list at least one event, e.g. [update]".into()),
            );
            return None;
        }
        // Custom event names are legal, so a near-miss of a standard one is
        // only a warning: `updated` is probably a typo, but might be real.
        for ev in &events {
            if !STANDARD_EVENTS.contains(&ev.as_str())
                && let Some(n) = nearest(ev, STANDARD_EVENTS)
            {
                self.sink.warning(
                    node.span,
                    format!("{context}: `{ev}` is treated as a custom event name"),
                    Some(format!("did you mean `{n}`?")),
                );
            }
        }
        Some(events)
    }

    fn labels(&mut self, node: &Node) -> Option<Vec<(String, String)>> {
        let Some(map) = node.as_map() else {
            self.expected(node, "a mapping of UDF label to UDF name", "labels");
            return None;
        };
        let mut out = Vec::new();
        for (k, v) in map {
            let label = k.scalar_text();
            let Some(udf) = v.as_str() else {
                self.expected(
                    v,
                    "a UDF name such as rework_counter_udf",
                    &format!("label `{label}`"),
                );
                continue;
            };
            if !udf.ends_with("_udf") {
                self.sink.error(
                    v.span,
                    format!("label `{label}` maps to `{udf}`, which is not a UDF name"),
                    Some(
                        "user-defined field names end with `_udf`, e.g. rework_counter_udf".into(),
                    ),
                );
                continue;
            }
            out.push((label, udf.to_string()));
        }
        Some(out)
    }

    fn fields(&mut self, node: &Node, labels: &[(String, String)]) -> Option<Vec<Value>> {
        let Some(items) = node.as_seq() else {
            self.expected(
                node,
                "a list of field names, paths, patterns or {label: …}",
                "fields",
            );
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let context = format!("fields[{i}]");
            if let Some(text) = item.as_str() {
                if text.starts_with('$') {
                    if let Err(e) = jsonpath_rust::parser::parse_json_path(text) {
                        self.bad_jsonpath(item.span, text, &e.to_string());
                        ok = false;
                        continue;
                    }
                } else if text.is_empty() || text.split('.').any(str::is_empty) {
                    self.sink.error(
                        item.span,
                        format!("{context}: `{text}` is not a field name or dotted path"),
                        Some("write a name (`severity`), a path (`phase.id`), a pattern (`*_udf`) or a JSONPath (`$.comments[0]`)".into()),
                    );
                    ok = false;
                    continue;
                }
                out.push(Value::String(text.to_string()));
                continue;
            }
            let Some(e) = self.entries(item, &context, &["label"]) else {
                ok = false;
                continue;
            };
            let Some(label_node) = e.get("label") else {
                self.sink.error(
                    item.span,
                    format!("{context}: missing `label`"),
                    Some("write {label: \"Rework Counter\"}".into()),
                );
                ok = false;
                continue;
            };
            let Some(label) = self.string(label_node, &context) else {
                ok = false;
                continue;
            };
            if !labels.iter().any(|(l, _)| *l == label) {
                let known: Vec<&str> = labels.iter().map(|(l, _)| l.as_str()).collect();
                let fix = match nearest(&label, &known) {
                    Some(n) => format!("did you mean `{n}`?"),
                    None => "add it to `labels:` (label: udf_name) in the rule or at the top of the file".into(),
                };
                self.sink.error(
                    label_node.span,
                    format!("{context}: unknown UDF label `{label}`"),
                    Some(fix),
                );
                ok = false;
                continue;
            }
            out.push(serde_json::json!({ "label": label }));
        }
        ok.then_some(out)
    }

    fn plugins(&mut self, node: &Node) -> Option<Vec<PluginRef>> {
        let Some(items) = node.as_seq() else {
            self.expected(node, "a list of {name, config}", "plugins");
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let context = format!("plugins[{i}]");
            let Some(e) = self.entries(item, &context, PLUGIN_KEYS) else {
                ok = false;
                continue;
            };
            let name_span = e.get("name").map_or(item.span, |n| n.span);
            let Some(name) = e.get("name").and_then(|n| self.string(n, &context)) else {
                if e.get("name").is_none() {
                    self.sink.error(item.span, format!("{context}: missing `name`"), Some("name a bundled plugin (select-fields, udf-labels, redact, octane-format, slack) or a .wasm file in the plugins directory".into()));
                }
                ok = false;
                continue;
            };
            let config = e
                .get("config")
                .map_or(Value::Object(Default::default()), Node::to_json);
            let timeout = match e.get("timeout") {
                None => None,
                Some(n) => {
                    match self.duration(n, &format!("{context}.timeout")) {
                        Some(d) if d.is_zero() => {
                            self.sink.error(
                            n.span,
                            format!("{context}.timeout: a plugin needs some time"),
                            Some("write e.g. 100ms, or leave it out for the server's plugin_timeout".into()),
                        );
                            ok = false;
                            None
                        }
                        Some(d) => Some(d),
                        None => {
                            ok = false;
                            None
                        }
                    }
                }
            };
            let memory = match e.get("memory") {
                None => None,
                Some(n) => {
                    let parsed = parse_size(&n.scalar_text()).filter(|&b| b > 0);
                    if parsed.is_none() {
                        self.sink.error(
                            n.span,
                            format!("{context}.memory: `{}` is not a memory size", n.scalar_text()),
                            Some("write a size such as 64MiB, or leave it out for the server's plugin_memory".into()),
                        );
                        ok = false;
                    }
                    parsed
                }
            };
            out.push(PluginRef {
                name,
                config,
                origin: self.origin(item.span),
                name_origin: self.origin(name_span),
                timeout,
                memory,
            });
        }
        ok.then_some(out)
    }

    fn bad_jsonpath(&mut self, span: Span, text: &str, error: &str) {
        self.sink.error(
            span,
            format!("invalid JSONPath `{text}`: {}", jsonpath_problem(error)),
            Some("write an RFC 9535 JSONPath such as $.entity.comments[?@.author=='bot']".into()),
        );
    }

    /// `depth` counts the condition nodes from `when` (1) down to this
    /// one. Evaluating, explaining and dropping a condition recurse once
    /// per level, so a condition past [`MAX_CONDITION_DEPTH`] is refused
    /// here and never reaches them.
    fn condition(&mut self, node: &Node, path: &str, depth: usize) -> Option<Condition> {
        if depth > MAX_CONDITION_DEPTH {
            self.sink.error(
                node.span,
                format!("{path}: conditions nest deeper than {MAX_CONDITION_DEPTH} levels"),
                Some(
                    "put conditions side by side in one `all` or `any` instead of nesting them"
                        .into(),
                ),
            );
            return None;
        }
        if let Some(items) = node.as_seq() {
            // A bare list reads as `all`.
            return self
                .group(node.span, items, path, "all", depth)
                .map(|c| Condition {
                    path: path.to_string(),
                    span: node.span,
                    kind: ConditionKind::All(c),
                });
        }
        let Some(map) = node.as_map() else {
            self.expected(
                node,
                "a condition ({field, operator}, all, any or not)",
                path,
            );
            return None;
        };
        let group_key = map
            .iter()
            .find_map(|(k, _)| k.as_str().filter(|k| GROUP_KEYS.contains(k)));
        if let Some(group) = group_key {
            if map.len() != 1 {
                self.sink.error(
                    node.span,
                    format!("{path}: `{group}` must be the only key of its condition"),
                    Some(format!(
                        "move the other keys into a condition inside `{group}`"
                    )),
                );
                return None;
            }
            let inner = &map[0].1;
            let child_path = format!("{path}.{group}");
            let kind = match group {
                "not" => {
                    ConditionKind::Not(Box::new(self.condition(inner, &child_path, depth + 1)?))
                }
                _ => {
                    let Some(items) = inner.as_seq() else {
                        self.expected(inner, "a list of conditions", &child_path);
                        return None;
                    };
                    let children = self.group(inner.span, items, &child_path, group, depth)?;
                    if group == "all" {
                        ConditionKind::All(children)
                    } else {
                        ConditionKind::Any(children)
                    }
                }
            };
            return Some(Condition {
                path: path.to_string(),
                span: node.span,
                kind,
            });
        }
        self.leaf(node, path).map(|leaf| Condition {
            path: path.to_string(),
            span: node.span,
            kind: ConditionKind::Leaf(leaf),
        })
    }

    fn group(
        &mut self,
        span: Span,
        items: &[Node],
        path: &str,
        group: &str,
        depth: usize,
    ) -> Option<Vec<Condition>> {
        if items.is_empty() {
            self.sink.error(
                span,
                format!("{path}: `{group}` has no conditions"),
                Some("add at least one condition, or remove it".into()),
            );
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.condition(item, &format!("{path}[{i}]"), depth + 1) {
                Some(c) => out.push(c),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn leaf(&mut self, node: &Node, path: &str) -> Option<Leaf> {
        let mut keys: Vec<&str> = vec!["field", "original"];
        keys.extend_from_slice(GROUP_KEYS);
        keys.extend_from_slice(OPERATORS);
        let before = self.sink.diagnostics.len();
        let e = self.entries(node, &format!("condition {path}"), &keys)?;
        let field = match e.get("field") {
            Some(n) => self.field(n, path),
            None => {
                self.sink.error(
                    node.span,
                    format!("condition {path} has no `field`"),
                    Some(
                        "add `field: NAME` (a name, dotted path, or JSONPath starting with $)"
                            .into(),
                    ),
                );
                None
            }
        };
        let original = e.get("original").map_or(Some(false), |n| {
            self.boolean(n, &format!("{path} original"))
        });
        let ops: Vec<_> = e
            .items
            .iter()
            .filter(|(k, _, _)| OPERATORS.contains(k))
            .collect();
        let op = match ops.as_slice() {
            [] => {
                if self.sink.diagnostics.len() == before {
                    self.sink.error(
                        node.span,
                        format!("condition {path} has no operator"),
                        Some(format!("add one of: {}", OPERATORS.join(", "))),
                    );
                }
                None
            }
            [(name, _, value)] => self.operator(name, value, path),
            [_, (second, k, _), ..] => {
                self.sink.error(
                    k.span,
                    format!("condition {path} has more than one operator (`{second}`)"),
                    Some("use one operator per condition and combine them with `all`".into()),
                );
                None
            }
        };
        Some(Leaf {
            field: field?,
            original: original?,
            op: op?,
        })
    }

    fn field(&mut self, node: &Node, path: &str) -> Option<Field> {
        let text = self.string(node, &format!("{path} field"))?;
        if text.starts_with('$') {
            return match jsonpath_rust::parser::parse_json_path(&text) {
                Ok(query) => Some(Field::JsonPath {
                    text,
                    query: Box::new(query),
                }),
                Err(e) => {
                    self.bad_jsonpath(node.span, &text, &e.to_string());
                    None
                }
            };
        }
        let parts: Vec<String> = text.split('.').map(str::to_string).collect();
        if parts.iter().any(String::is_empty) {
            self.sink.error(
                node.span,
                format!("{path}: `{text}` is not a field name or dotted path"),
                Some("write `name`, `phase.id`, or a JSONPath such as `$.entity.phase.id`".into()),
            );
            return None;
        }
        Some(if parts.len() == 1 {
            Field::Name(text)
        } else {
            Field::Path(parts)
        })
    }

    fn operator(&mut self, name: &str, value: &Node, path: &str) -> Option<Op> {
        let context = format!("{path} {name}");
        let json = value.to_json();
        Some(match name {
            "equals" => Op::Equals(json),
            "not_equals" => Op::NotEquals(json),
            "contains" => Op::Contains(json),
            "changed_from" => Op::ChangedFrom(json),
            "changed_to" => Op::ChangedTo(json),
            "in" | "not_in" => {
                let Value::Array(items) = json else {
                    self.sink.error(
                        value.span,
                        format!("{context}: expected a list, found {}", value.kind()),
                        Some(format!("write `{name}: [a, b]`")),
                    );
                    return None;
                };
                if name == "in" {
                    Op::In(items)
                } else {
                    Op::NotIn(items)
                }
            }
            "matches" => {
                let pattern = self.string(value, &context)?;
                match compile_regex(&pattern) {
                    Ok(re) => Op::Matches(re),
                    Err(e) => {
                        let detail = e
                            .to_string()
                            .lines()
                            .last()
                            .unwrap_or_default()
                            .trim()
                            .to_string();
                        self.sink.error(value.span, format!("{context}: invalid regular expression `{pattern}`: {detail}"), Some("use Rust regex syntax (https://docs.rs/regex); quote the pattern and escape `\\` in double quotes".into()));
                        return None;
                    }
                }
            }
            "gt" | "gte" | "lt" | "lte" => {
                if !matches!(json, Value::Number(_) | Value::String(_)) {
                    self.expected(value, "a number or a string", &context);
                    return None;
                }
                match name {
                    "gt" => Op::Gt(json),
                    "gte" => Op::Gte(json),
                    "lt" => Op::Lt(json),
                    _ => Op::Lte(json),
                }
            }
            "exists" => Op::Exists(self.boolean(value, &context)?),
            "is_empty" => Op::IsEmpty(self.boolean(value, &context)?),
            "is_modified" => Op::IsModified(self.boolean(value, &context)?),
            _ => return None,
        })
    }

    fn webhook(&mut self, node: &Node) -> Option<Webhook> {
        let before = self.sink.diagnostics.len();
        let e = self.entries(node, "webhook", WEBHOOK_KEYS)?;
        let transport = match e.get("transport") {
            None => Some(Transport::Http),
            Some(n) => match n.as_str() {
                Some("http") => Some(Transport::Http),
                Some("websocket") => Some(Transport::WebSocket),
                _ => {
                    self.sink.error(
                        n.span,
                        format!(
                            "webhook transport: expected `http` or `websocket`, found `{}`",
                            n.scalar_text()
                        ),
                        None,
                    );
                    None
                }
            },
        };
        let url = match (e.get("url"), transport) {
            (Some(n), _) => self.url(n).map(Some),
            (None, Some(Transport::WebSocket)) => Some(None),
            (None, _) => {
                self.sink.error(
                    e.span,
                    "webhook has no `url`",
                    Some("add `url: https://…` (or `transport: websocket`)".into()),
                );
                None
            }
        };
        let space = match e.get("space") {
            None => Some(None),
            Some(n) => self.space(n, transport),
        };
        let method = match e.get("method") {
            None => Some(Method::Post),
            Some(n) => match n.as_str().map(str::to_ascii_uppercase).as_deref() {
                Some("POST") => Some(Method::Post),
                Some("PUT") => Some(Method::Put),
                Some("PATCH") => Some(Method::Patch),
                _ => {
                    self.sink.error(
                        n.span,
                        format!("webhook method: `{}` is not supported", n.scalar_text()),
                        Some("use POST, PUT or PATCH".into()),
                    );
                    None
                }
            },
        };
        let headers = e
            .get("headers")
            .map_or(Some(Vec::new()), |n| self.headers(n));
        let credentials = match e.get("credentials") {
            None => Some(None),
            Some(n) => self.credentials(n).map(Some),
        };
        let secrets = match e.get("secret") {
            None => Some(Vec::new()),
            Some(n) => match n.as_seq() {
                Some(items) => items.iter().map(|i| self.secret(i, "secret")).collect(),
                None => self.secret(n, "secret").map(|s| vec![s]),
            },
        };
        let signature = match e.get("signature") {
            None => Some(None),
            Some(n) => self.signature(n).map(Some),
        };
        let signature_header = match e.get("signature_header") {
            None => Some(DEFAULT_SIGNATURE_HEADER.to_string()),
            Some(n) => self.header_name(n, "signature_header"),
        };
        let (connect_timeout, reply_timeout) = match e.get("timeouts") {
            None => (Some(Duration::from_secs(60)), Some(Duration::from_secs(20))),
            Some(n) => self.timeouts(n),
        };
        let retry = e
            .get("retry")
            .map_or(Some(RetryPolicy::default_fixed()), |n| self.retry(n));
        let tls_verify = match e.get("tls") {
            None => Some(true),
            Some(n) => {
                let t = self.entries(n, "webhook tls", TLS_KEYS)?;
                t.get("verify")
                    .map_or(Some(true), |v| self.boolean(v, "tls verify"))
            }
        };
        if tls_verify == Some(false) {
            self.sink.warning(
                e.key_span("tls").unwrap_or(e.span),
                "TLS certificate validation is off for this webhook",
                Some("only for test endpoints; install the endpoint's CA instead".into()),
            );
        }
        // Default: sign with HMAC when there is a secret; a signature style
        // without a secret could never be produced.
        let signature = match (signature, &secrets) {
            (Some(None), Some(s)) if !s.is_empty() => Some(vec![SignatureStyle::HmacSha256]),
            (Some(None), _) => Some(Vec::new()),
            (Some(Some(styles)), Some(s)) if !styles.is_empty() && s.is_empty() => {
                self.sink.error(
                    e.key_span("signature").unwrap_or(e.span),
                    "webhook signature is set but there is no `secret` to sign with",
                    Some("add `secret: {env: NAME}`".into()),
                );
                None
            }
            (Some(Some(styles)), _) => Some(styles),
            (None, _) => None,
        };
        if let (Some(styles), Some(secrets)) = (&signature, &secrets)
            && styles.contains(&SignatureStyle::StandardWebhooks)
        {
            for s in secrets {
                if let Err(why) = crate::rules::check_whsec(&s.value) {
                    self.sink.error(
                        e.key_span("secret").unwrap_or(e.span),
                        format!(
                            "secret from {} is not a Standard Webhooks secret: {why}",
                            s.source
                        ),
                        Some("use `whsec_` followed by base64 of 24 to 64 random bytes".into()),
                    );
                }
            }
        }
        if self.sink.diagnostics[before..].iter().any(|d| d.is_error()) {
            return None;
        }
        Some(Webhook {
            url: url?,
            method: method?,
            headers: headers?,
            credentials: credentials?,
            secrets: secrets?,
            signature: signature?,
            signature_header: signature_header?,
            connect_timeout: connect_timeout?,
            reply_timeout: reply_timeout?,
            retry: retry?,
            tls_verify: tls_verify?,
            transport: transport?,
            space: space?,
        })
    }

    /// `space`: the shared space whose WebSocket clients get the deliveries.
    fn space(&mut self, node: &Node, transport: Option<Transport>) -> Option<Option<String>> {
        let text = match &node.value {
            yaml::Value::Scalar(Scalar::Str(s)) if !s.is_empty() => s.clone(),
            yaml::Value::Scalar(Scalar::Int(i)) => i.to_string(),
            _ => {
                self.expected(node, "a shared space id such as 1001", "webhook space");
                return None;
            }
        };
        if transport == Some(Transport::Http) {
            self.sink.warning(
                node.span,
                "webhook space is only used by `transport: websocket`; this rule sends over HTTP",
                Some("remove `space`, or add `transport: websocket`".into()),
            );
        }
        Some(Some(text))
    }

    fn url(&mut self, node: &Node) -> Option<url::Url> {
        let text = self.string(node, "webhook url")?;
        let url = match url::Url::parse(&text) {
            Ok(u) => u,
            Err(e) => {
                self.sink.error(
                    node.span,
                    format!("webhook url `{text}` is not a valid URL: {e}"),
                    Some("write a full URL such as https://ci.example.com/hooks/octane".into()),
                );
                return None;
            }
        };
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            self.sink.error(
                node.span,
                format!("webhook url `{text}` must be an http or https URL with a host"),
                Some("write https://HOST/PATH".into()),
            );
            return None;
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.sink.error(
                node.span,
                "webhook url must not contain a user name or password",
                Some("move them to `credentials: {username: …, password: {env: …}}`".into()),
            );
            return None;
        }
        Some(url)
    }

    fn header_name(&mut self, node: &Node, context: &str) -> Option<String> {
        let name = self.string(node, context)?;
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            self.sink.error(
                node.span,
                format!("{context}: `{name}` is not a valid HTTP header name"),
                Some("use letters, digits and `-`, e.g. X-Hub-Signature-256".into()),
            );
            return None;
        }
        Some(name)
    }

    /// `headers`: name → text, or name → `{env: NAME}` / `{file: PATH}` for
    /// a value that is a secret (an API key). Text stays text, with no
    /// warning: most headers are not secrets.
    fn headers(&mut self, node: &Node) -> Option<Vec<(String, HeaderValue)>> {
        let Some(map) = node.as_map() else {
            self.expected(node, "a mapping of header name to value", "webhook headers");
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (k, v) in map {
            let Some(name) = self.header_name(k, "webhook headers") else {
                ok = false;
                continue;
            };
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                self.sink.error(
                    k.span,
                    format!("header `{name}` is set by rulehook and cannot be overridden"),
                    Some(
                        "use `credentials` for Authorization and `signature` for signature headers"
                            .into(),
                    ),
                );
                ok = false;
                continue;
            }
            let context = format!("header `{name}`");
            let value = match &v.value {
                yaml::Value::Map(_) => match self.secret(v, &context) {
                    Some(secret) => HeaderValue::Secret(secret),
                    None => {
                        ok = false;
                        continue;
                    }
                },
                yaml::Value::Scalar(Scalar::Null) | yaml::Value::Seq(_) => {
                    self.sink.error(
                        v.span,
                        format!("{context}: expected a text value, found {}", v.kind()),
                        Some("write the value, or `{env: NAME}` / `{file: PATH}` for a secret such as an API key".into()),
                    );
                    ok = false;
                    continue;
                }
                _ => HeaderValue::Text(v.scalar_text()),
            };
            if breaks_header(value.value()) {
                // A secret's value is never quoted, only where it came from.
                let (message, fix) = match &value {
                    HeaderValue::Text(_) => {
                        (format!("{context} value contains a line break"), None)
                    }
                    HeaderValue::Secret(s) => (
                        format!("{context} value from {} contains a line break", s.source),
                        Some(format!(
                            "a header value is one line; remove the line break from {}",
                            s.source
                        )),
                    ),
                };
                self.sink.error(v.span, message, fix);
                ok = false;
                continue;
            }
            out.push((name, value));
        }
        ok.then_some(out)
    }

    fn credentials(&mut self, node: &Node) -> Option<Credentials> {
        let e = self.entries(node, "webhook credentials", CREDENTIAL_KEYS)?;
        let username = match e.get("username") {
            Some(n) => self.string(n, "credentials username"),
            None => {
                self.sink
                    .error(e.span, "credentials have no `username`", None);
                None
            }
        };
        if username.as_deref().is_some_and(|u| u.contains(':')) {
            self.sink.error(e.span, "credentials username must not contain `:` (Basic authentication separates user and password with it)", None);
            return None;
        }
        let password = match e.get("password") {
            Some(n) => self.secret(n, "credentials password"),
            None => {
                self.sink.error(
                    e.span,
                    "credentials have no `password`",
                    Some("add `password: {env: NAME}`".into()),
                );
                None
            }
        };
        Some(Credentials {
            username: username?,
            password: password?,
        })
    }

    fn secret(&mut self, node: &Node, context: &str) -> Option<Secret> {
        let reference = if let Some(text) = node.as_str() {
            self.sink.warning(
                node.span,
                format!("{context} is written inline in the rule file"),
                Some("in production use `{env: NAME}` or `{file: PATH}`".into()),
            );
            SecretRef::Inline(text.to_string())
        } else {
            let e = self.entries(node, context, SECRET_KEYS)?;
            match (e.get("env"), e.get("file")) {
                (Some(n), None) => SecretRef::Env(self.string(n, context)?),
                (None, Some(n)) => SecretRef::File(PathBuf::from(self.string(n, context)?)),
                _ => {
                    self.sink.error(
                        node.span,
                        format!("{context}: write exactly one of `env` or `file`"),
                        Some("e.g. `{env: CI_HOOK_SECRET}`".into()),
                    );
                    return None;
                }
            }
        };
        let source = match &reference {
            SecretRef::Env(n) => format!("env:{n}"),
            SecretRef::File(p) => format!("file:{}", p.display()),
            SecretRef::Inline(_) => "inline".to_string(),
        };
        match self.secrets.resolve(&reference) {
            Ok(value) if !value.is_empty() => Some(Secret { source, value }),
            Ok(_) => {
                self.sink
                    .error(node.span, format!("{context} from {source} is empty"), None);
                None
            }
            Err(why) => {
                self.sink.error(
                    node.span,
                    format!("{context}: {why}"),
                    Some(match reference {
                        SecretRef::Env(n) => format!(
                            "set the environment variable {n} for rulehook, or use {{file: PATH}}"
                        ),
                        _ => format!(
                            "keep secret files as regular files inside the rules directory (or a directory listed in {}), readable by rulehook",
                            super::load::SECRET_DIRS_ENV
                        ),
                    }),
                );
                None
            }
        }
    }

    fn signature(&mut self, node: &Node) -> Option<Vec<SignatureStyle>> {
        let names = self.names(node, "webhook signature")?;
        let mut out = Vec::new();
        for name in names {
            match name.as_str() {
                "hmac-sha256" => out.push(SignatureStyle::HmacSha256),
                "standard-webhooks" => out.push(SignatureStyle::StandardWebhooks),
                other => {
                    let fix = nearest(other, &["hmac-sha256", "standard-webhooks"]).map_or(
                        "use hmac-sha256 and/or standard-webhooks".to_string(),
                        |n| format!("did you mean `{n}`?"),
                    );
                    self.sink.error(
                        node.span,
                        format!("webhook signature: unknown style `{other}`"),
                        Some(fix),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    fn duration(&mut self, node: &Node, context: &str) -> Option<Duration> {
        let parsed = match &node.value {
            yaml::Value::Scalar(Scalar::Int(i)) if *i >= 0 => {
                u64::try_from(*i).ok().map(Duration::from_secs)
            }
            yaml::Value::Scalar(Scalar::Str(s)) => parse_duration(s),
            _ => None,
        };
        if parsed.is_none() {
            self.sink.error(
                node.span,
                format!("{context}: `{}` is not a duration", node.scalar_text()),
                Some("write a number with a unit: 500ms, 20s, 5m, 1h, 1d".into()),
            );
        }
        parsed
    }

    fn timeouts(&mut self, node: &Node) -> (Option<Duration>, Option<Duration>) {
        let Some(e) = self.entries(node, "webhook timeouts", TIMEOUT_KEYS) else {
            return (None, None);
        };
        let mut get = |key: &str, default: u64| match e.get(key) {
            None => Some(Duration::from_secs(default)),
            Some(n) => match self.duration(n, &format!("timeouts {key}")) {
                Some(d) if d.is_zero() => {
                    self.sink.error(
                        n.span,
                        format!("timeouts {key} must be longer than zero"),
                        None,
                    );
                    None
                }
                d => d,
            },
        };
        (get("connect", 60), get("reply", 20))
    }

    fn retry(&mut self, node: &Node) -> Option<RetryPolicy> {
        let e = self.entries(node, "webhook retry", RETRY_KEYS)?;
        let policy = match e.get("policy") {
            None => "fixed".to_string(),
            Some(n) => self.string(n, "retry policy")?,
        };
        let allowed: &[&str] = match policy.as_str() {
            "fixed" => &["policy", "interval", "retries"],
            "exponential" => &["policy", "intervals", "jitter"],
            "none" => &["policy"],
            other => {
                let fix = nearest(other, &["fixed", "exponential", "none"])
                    .map_or("use fixed, exponential or none".to_string(), |n| {
                        format!("did you mean `{n}`?")
                    });
                self.sink.error(
                    e.get("policy").map_or(e.span, |n| n.span),
                    format!("retry policy `{other}` is unknown"),
                    Some(fix),
                );
                return None;
            }
        };
        for (key, k, _) in &e.items {
            if !allowed.contains(key) {
                self.sink.error(
                    k.span,
                    format!("retry `{key}` does not apply to the {policy} policy"),
                    Some(format!("the {policy} policy takes: {}", allowed.join(", "))),
                );
                return None;
            }
        }
        match policy.as_str() {
            "fixed" => {
                let interval = e
                    .get("interval")
                    .map_or(Some(Duration::from_secs(60)), |n| {
                        self.duration(n, "retry interval")
                    })?;
                let retries = match e.get("retries") {
                    None => 3,
                    Some(n) => match n.value {
                        yaml::Value::Scalar(Scalar::Int(i)) if (0..=100).contains(&i) => i as u32,
                        _ => {
                            self.sink.error(n.span, format!("retry retries: expected a whole number from 0 to 100, found `{}`", n.scalar_text()), None);
                            return None;
                        }
                    },
                };
                Some(RetryPolicy::Fixed { interval, retries })
            }
            "exponential" => {
                let intervals = match e.get("intervals") {
                    None => RetryPolicy::default_exponential_intervals(),
                    Some(n) => {
                        let Some(items) = n.as_seq().filter(|i| !i.is_empty()) else {
                            self.expected(n, "a non-empty list of durations", "retry intervals");
                            return None;
                        };
                        items
                            .iter()
                            .map(|i| self.duration(i, "retry intervals"))
                            .collect::<Option<Vec<_>>>()?
                    }
                };
                let jitter = match e.get("jitter") {
                    None => 0.2,
                    Some(n) => match n.to_json().as_f64() {
                        Some(j) if (0.0..=1.0).contains(&j) => j,
                        _ => {
                            self.sink.error(
                                n.span,
                                "retry jitter: expected a fraction from 0 to 1, e.g. 0.2",
                                None,
                            );
                            return None;
                        }
                    },
                };
                Some(RetryPolicy::Exponential { intervals, jitter })
            }
            _ => Some(RetryPolicy::None),
        }
    }
}

/// Condenses jsonpath-rust's multi-line parser report to one line:
/// "at character 17: expected comparable".
fn jsonpath_problem(error: &str) -> String {
    let at = error
        .split("-->")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pos| pos.split(':').nth(1))
        .map(|col| format!("at character {col}: "));
    let what = error
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("= "))
        .unwrap_or_else(|| error.lines().next().unwrap_or(error).trim());
    format!("{}{what}", at.unwrap_or_default())
}

/// `64MiB`, `512KiB`, `1GiB`, or a bare number of bytes: the one grammar
/// of sizes, for a rule entry's `memory:` and the server config alike
/// (here, since the config may use the rules module but not the reverse).
pub fn parse_size(text: &str) -> Option<usize> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: usize = n.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// `500ms`, `20s`, `5m`, `1h`, `1d`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    /// The deepest input the limits let through: a condition at exactly
    /// `MAX_CONDITION_DEPTH` (through `not` and bare lists, one YAML level
    /// each) and a plugin config at exactly `yaml::MAX_DEPTH`, the config
    /// reached through an alias. Parsing, matching, `explain`, cloning and
    /// dropping it must fit in a stack far smaller than any thread's here
    /// (2 MiB for spawned and tokio threads), so no recursive walk can
    /// overflow on input that passed the limits.
    #[test]
    fn the_deepest_accepted_rule_runs_in_a_small_stack() {
        use super::super::{RuleSet, SecretRef, Source, explain::explain, yaml};
        let mut when = String::from("{field: a, equals: 2}");
        for level in 1..super::MAX_CONDITION_DEPTH {
            when = if level % 2 == 1 {
                format!("[{when}]")
            } else {
                format!("{{not: {when}}}")
            };
        }
        // The rule's config mapping sits at level 6 (file, rules, rule,
        // plugins, entry, config); nest it down to the limit.
        let config_levels = yaml::MAX_DEPTH - 5;
        let config = format!(
            "{}1{}",
            "{a: ".repeat(config_levels),
            "}".repeat(config_levels)
        );
        let text = format!(
            "rules:\n  - name: deepest\n    events: [create]\n    when: {when}\n    plugins: [{{name: redact, config: &deep {config}}}, {{name: redact, config: *deep}}]\n    webhook: {{url: \"https://x.test/h\"}}\n"
        );
        let run = move || {
            let source = Source {
                path: "deep.yaml".into(),
                text,
            };
            let no_secrets = |_: &SecretRef| Err("no secrets here".to_string());
            let (set, diagnostics) = RuleSet::compile(std::slice::from_ref(&source), &no_secrets);
            let event = crate::event::Event::from_value(serde_json::json!({
                "event_type": "create", "entity_type": "story", "entity": {"id": "1", "a": 1}
            }))
            .expect("event");
            let matched = set.matching(&event).len();
            let verdicts = explain(&set, &event);
            let copy: Vec<_> = set.rules().to_vec();
            drop(copy);
            (diagnostics, matched, verdicts.len())
        };
        let (diagnostics, matched, verdicts) = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(run)
            .expect("spawn")
            .join()
            .expect("no overflow");
        assert_eq!(
            diagnostics,
            vec![],
            "the rule is at the limits, not past them"
        );
        assert_eq!((matched, verdicts), (1, 1));
    }

    #[test]
    fn durations() {
        let cases = [
            ("500ms", Some(500)),
            ("20s", Some(20_000)),
            ("5m", Some(300_000)),
            ("1h", Some(3_600_000)),
            ("2", Some(2000)),
            ("5 min", None),
            ("-1s", None),
            ("", None),
        ];
        for (text, ms) in cases {
            assert_eq!(
                parse_duration(text),
                ms.map(Duration::from_millis),
                "{text}"
            );
        }
    }
}
