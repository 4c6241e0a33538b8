//! The plugin stage: the set of plugins a rule set can name (bundled ones
//! and `*.wasm` files in the plugins directory), checking rules against it,
//! and running a rule's chain on a payload.
//!
//! A chain is the rule's `fields` (the bundled `select-fields` plugin) and
//! then its `plugins`, in order, each getting the previous one's output.
//! Every failure becomes a message that names the plugin and the cause;
//! nothing a plugin does can take the host down.

pub mod imports;
pub mod runtime;
pub mod sandbox;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::rules::{Diagnostic, Rule, RuleSet, Severity};
pub use runtime::{
    Call, CallContext, CallError, Compiled, Limits, LogLine, Outcome, Overrides, Runtime,
};

mod bundled {
    include!(concat!(env!("OUT_DIR"), "/bundled.rs"));
}

/// The plugin a rule's `fields` runs.
pub const SELECT_FIELDS: &str = "select-fields";

/// Where a plugin came from, for messages and `GET /v1/rules`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Bundled,
    File(PathBuf),
}

struct Entry {
    source: Source,
    /// SHA-256 of the component's bytes, hex.
    hash: String,
    /// `None` for a plugin no rule names: it is listed but not compiled.
    compiled: Option<Arc<Compiled>>,
}

/// Every plugin a rule set may name; the ones its rules do name compiled
/// and pre-instantiated.
#[derive(Default)]
pub struct PluginSet {
    entries: HashMap<String, Entry>,
    /// Plugins whose file could not be read or compiled: already reported
    /// as such, so a rule naming one is not reported again as unknown.
    failed: std::collections::HashSet<String>,
}

/// A problem with one plugin file (it could not be read or compiled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    pub file: PathBuf,
    pub message: String,
}

impl PluginError {
    /// As a rule-file diagnostic, so `check`, the log and `GET /v1/rules`
    /// report it like any other mistake.
    pub fn diagnostic(&self) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            file: self.file.clone(),
            line: 1,
            column: 1,
            message: self.message.clone(),
            fix: Some(
                "rebuild the plugin for wasm32-wasip2 with the rulehook plugin SDK, or remove the file"
                    .into(),
            ),
        }
    }
}

/// What running a chain decided for one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum ChainOutcome {
    /// The body to store and send.
    Send(Vec<u8>),
    /// A plugin chose not to send; the reason names it.
    Skip(String),
    /// A plugin failed; the message names it and the cause.
    Failed(String),
}

impl PluginSet {
    /// Loads the bundled plugins and every `*.wasm` in `dir`. A file with a
    /// bundled plugin's name replaces it. Only plugins for which `wanted`
    /// says yes (the ones the rules name) are compiled: compiling is the
    /// expensive part of a load, and a plugin no rule uses needs none.
    /// Components whose bytes did not change since `previous` are taken
    /// from it, warm instances and all, so a reload recompiles only what
    /// changed.
    pub fn load(
        runtime: &Arc<Runtime>,
        dir: Option<&Path>,
        previous: Option<&PluginSet>,
        wanted: &dyn Fn(&str) -> bool,
    ) -> (PluginSet, Vec<PluginError>) {
        let mut set = PluginSet::default();
        let mut errors = Vec::new();
        // Bundled bytes are borrowed from the binary, not copied per reload.
        let mut sources: Vec<(String, Source, Cow<'static, [u8]>)> = bundled::BUNDLED
            .iter()
            .map(|(name, bytes)| (name.to_string(), Source::Bundled, Cow::Borrowed(*bytes)))
            .collect();
        if let Some(dir) = dir {
            match std::fs::read_dir(dir) {
                Ok(entries) => {
                    let mut files: Vec<PathBuf> = entries
                        .flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
                        .collect();
                    files.sort();
                    for path in files {
                        let name = path
                            .file_stem()
                            .map(|s| s.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        match std::fs::read(&path) {
                            Ok(bytes) => {
                                sources.retain(|(n, _, _)| *n != name);
                                sources.push((name, Source::File(path), Cow::Owned(bytes)));
                            }
                            Err(e) => {
                                errors.push(PluginError {
                                    file: path.clone(),
                                    message: format!("cannot read plugin {}: {e}", path.display()),
                                });
                                set.failed.insert(name);
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(PluginError {
                    file: dir.to_path_buf(),
                    message: format!("cannot read the plugins directory {}: {e}", dir.display()),
                }),
            }
        }
        for (name, source, bytes) in sources {
            let hash = runtime::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            let compiled = if wanted(&name) {
                let reused = previous
                    .and_then(|p| p.get(&name))
                    .filter(|c| c.hash == hash)
                    .cloned();
                match reused.map_or_else(
                    || runtime.load_hashed(&name, &bytes, &hash).map(Arc::new),
                    Ok,
                ) {
                    Ok(c) => Some(c),
                    Err(message) => {
                        let file = match &source {
                            Source::File(p) => p.clone(),
                            Source::Bundled => PathBuf::from(format!("<bundled {name}>")),
                        };
                        errors.push(PluginError { file, message });
                        set.failed.insert(name);
                        continue;
                    }
                }
            } else {
                None
            };
            set.entries.insert(
                name,
                Entry {
                    source,
                    hash,
                    compiled,
                },
            );
        }
        (set, errors)
    }

    /// The compiled plugin `name`, if it exists and was wanted at load.
    pub fn get(&self, name: &str) -> Option<&Arc<Compiled>> {
        self.entries.get(name).and_then(|e| e.compiled.as_ref())
    }

    /// The plugin names `rules` refer to: their `plugins` and, for rules
    /// with `fields`, select-fields.
    pub fn referenced(rules: &RuleSet) -> std::collections::HashSet<String> {
        let mut names = std::collections::HashSet::new();
        for rule in rules.rules() {
            if !rule.fields.is_empty() {
                names.insert(SELECT_FIELDS.to_string());
            }
            names.extend(rule.plugins.iter().map(|p| p.name.clone()));
        }
        names
    }

    /// Names and sources, sorted, for listings.
    pub fn list(&self) -> Vec<(String, Source, String)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .map(|(n, e)| (n.clone(), e.source.clone(), e.hash.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every plugin reference of `rules` that names no plugin, and every
    /// config its plugin rejects, at the place it is written.
    pub fn check(&self, rules: &RuleSet) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        let mut known: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        known.sort();
        for rule in rules.rules() {
            if !rule.fields.is_empty() {
                let config = crate::payload::select_fields_config(rule).to_string();
                match self.get(SELECT_FIELDS) {
                    None => out.push(diag(
                        &rule.origin,
                        "the bundled select-fields plugin, which runs `fields`, is missing".into(),
                        None,
                    )),
                    Some(p) => {
                        if let Err(e) = p.validate_config(&config) {
                            out.push(diag(
                                &rule.origin,
                                format!(
                                    "`fields` rejected by the select-fields plugin: {}",
                                    plain(&e)
                                ),
                                Some("fix the entry the message names".into()),
                            ));
                        }
                    }
                }
            }
            for p in &rule.plugins {
                if self.failed.contains(&p.name) {
                    continue;
                }
                let Some(compiled) = self.get(&p.name) else {
                    let near = known
                        .iter()
                        .min_by_key(|k| strsim::levenshtein(k, &p.name))
                        .filter(|k| strsim::levenshtein(k, &p.name) <= 3);
                    out.push(diag(
                        &p.name_origin,
                        format!("unknown plugin `{}`", p.name),
                        Some(match near {
                            Some(k) => {
                                format!("did you mean `{k}`? known plugins: {}", known.join(", "))
                            }
                            None => format!(
                                "put {}.wasm in the plugins directory; known plugins: {}",
                                p.name,
                                known.join(", ")
                            ),
                        }),
                    ));
                    continue;
                };
                let limits = compiled.limits();
                if let Some(t) = p
                    .timeout
                    .filter(|t| *t > limits.timeout_max.max(limits.timeout))
                {
                    out.push(diag(
                        &p.origin,
                        format!(
                            "plugin `{}`: timeout {} ms is above the server's plugin_timeout_max of {} ms",
                            p.name,
                            t.as_millis(),
                            limits.timeout_max.max(limits.timeout).as_millis()
                        ),
                        Some("lower the entry's timeout, or raise plugin_timeout_max in the server's config".into()),
                    ));
                    continue;
                }
                if let Some(m) = p
                    .memory
                    .filter(|m| *m > limits.memory_max.max(limits.memory_bytes))
                {
                    out.push(diag(
                        &p.origin,
                        format!(
                            "plugin `{}`: memory {} MiB is above the server's plugin_memory_max of {} MiB",
                            p.name,
                            m.div_ceil(1 << 20),
                            limits.memory_max.max(limits.memory_bytes) >> 20
                        ),
                        Some("lower the entry's memory, or raise plugin_memory_max in the server's config".into()),
                    ));
                    continue;
                }
                if let Err(e) = compiled.validate_config_with(&p.config.to_string(), &overrides(p))
                {
                    out.push(diag(
                        &p.origin,
                        format!("plugin `{}` rejects its config: {}", p.name, plain(&e)),
                        None,
                    ));
                }
            }
        }
        out
    }

    /// Whether `rule` has anything for the plugin stage to do.
    pub fn has_chain(rule: &Rule) -> bool {
        !rule.fields.is_empty() || !rule.plugins.is_empty()
    }

    /// Runs `rule`'s chain on `payload`. Blocking and CPU-bound: call it
    /// off the async reactor.
    /// A rule without a chain sends the payload as built.
    pub fn run_chain(&self, rule: &Rule, ctx: &CallContext, payload: &Value) -> ChainOutcome {
        self.run_chain_observed(rule, ctx, payload.to_string(), &|_, _, _| {})
    }

    /// `run_chain` on the payload as JSON text (ingest serializes it
    /// straight from the event, `payload::to_string`), telling `observe`
    /// each call's plugin, time and whether it failed (the server's
    /// metrics); each call is a `plugin` span.
    pub fn run_chain_observed(
        &self,
        rule: &Rule,
        ctx: &CallContext,
        payload: String,
        observe: &dyn Fn(&str, std::time::Duration, bool),
    ) -> ChainOutcome {
        if !Self::has_chain(rule) {
            return ChainOutcome::Send(payload.into_bytes());
        }
        let mut text = payload;
        let mut steps: Vec<(&str, String, Overrides)> = Vec::with_capacity(rule.plugins.len() + 1);
        if !rule.fields.is_empty() {
            steps.push((
                SELECT_FIELDS,
                crate::payload::select_fields_config(rule).to_string(),
                Overrides::default(),
            ));
        }
        for p in &rule.plugins {
            steps.push((p.name.as_str(), p.config.to_string(), overrides(p)));
        }
        for (name, config, limits) in steps {
            let Some(plugin) = self.get(name) else {
                return ChainOutcome::Failed(format!(
                    "plugin {name} is not loaded; add it to the plugins directory and redeliver"
                ));
            };
            let span = crate::telemetry::child("plugin", || {
                [opentelemetry::KeyValue::new("plugin", name.to_string())]
            });
            let started = std::time::Instant::now();
            let call = span.in_scope(|| plugin.transform_with(ctx, &text, &config, &limits));
            observe(name, started.elapsed(), call.result.is_err());
            span.record("outcome", || match &call.result {
                Ok(Outcome::Send(_)) => "send",
                Ok(Outcome::Skip(_)) => "skip",
                Err(_) => "failed",
            });
            for line in &call.logs {
                tracing::info!(plugin = name, rule = %rule.name, event = %ctx.event_id, level = line.level, "plugin log: {}", line.message);
            }
            if call.log_lines_dropped > 0 {
                tracing::warn!(
                    plugin = name,
                    rule = %rule.name,
                    event = %ctx.event_id,
                    dropped_lines = call.log_lines_dropped,
                    dropped_bytes = call.logs_dropped,
                    "plugin log volume over the cap; lines dropped"
                );
            }
            match call.result {
                Ok(Outcome::Send(out)) => text = out,
                Ok(Outcome::Skip(reason)) => {
                    return ChainOutcome::Skip(format!("plugin {name} skipped it: {reason}"));
                }
                Err(e) => return ChainOutcome::Failed(format!("plugin {name} {e}")),
            }
        }
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
            return ChainOutcome::Failed(format!("the plugin chain's output is not JSON: {e}"));
        }
        ChainOutcome::Send(text.into_bytes())
    }
}

/// The limits a rule's plugin entry sets for its own calls.
fn overrides(p: &crate::rules::PluginRef) -> Overrides {
    Overrides {
        timeout: p.timeout,
        memory_bytes: p.memory,
    }
}

/// A call error as a clause ("timed out after 50 ms", or the plugin's own message).
fn plain(e: &CallError) -> String {
    match e {
        CallError::Plugin(m) => m.clone(),
        other => other.to_string(),
    }
}

fn diag(origin: &crate::rules::Origin, message: String, fix: Option<String>) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        file: origin.file.clone(),
        line: origin.span.line,
        column: origin.span.column,
        message,
        fix,
    }
}
