//! The rule engine's data-driven tests: every file in `rules/cases/` is a
//! case of rule files and events with the expected diagnostics, matches,
//! misses and payloads, all checked by [`check_case`]. Add a case by adding
//! a file; the format is described in `cases/README.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::explain::explain;
use super::model::{HeaderValue, SecretRef};
use super::{Diagnostic, RuleSet, Source};
use crate::event::Event;

fn render(d: &Diagnostic) -> String {
    let level = if d.is_error() { "error" } else { "warning" };
    let mut s = format!("{}: {level}: {}", d.location(), d.message);
    if let Some(fix) = &d.fix {
        s.push_str(&format!(" [fix: {fix}]"));
    }
    s
}

fn check_case(path: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let text = std::fs::read_to_string(path).expect("case file is readable");
    let case = super::yaml::parse(&text)
        .expect("case file is valid YAML")
        .expect("case file is not empty")
        .to_json();
    let files = case["files"].as_object().expect("case has `files`");
    let sources: Vec<Source> = files
        .iter()
        .map(|(name, text)| Source {
            path: PathBuf::from(name),
            text: text.as_str().expect("file text is a string").to_string(),
        })
        .collect();
    let env: BTreeMap<String, String> = case["env"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let resolver = |s: &SecretRef| match s {
        SecretRef::Inline(v) => Ok(v.clone()),
        SecretRef::Env(n) => env
            .get(n)
            .cloned()
            .ok_or_else(|| format!("environment variable {n} is not set")),
        SecretRef::File(p) => env
            .get(&format!("file:{}", p.display()))
            .cloned()
            .ok_or_else(|| format!("cannot read secret file {}", p.display())),
    };
    let (set, diagnostics) = RuleSet::compile(&sources, &resolver);
    // Every loaded rule is found by its name, and only by it.
    for (i, rule) in set.rules().iter().enumerate() {
        if !set
            .get(&rule.name)
            .is_some_and(|r| std::ptr::eq(r, &set.rules()[i]))
        {
            problems.push(format!("rule `{}` is not found by its name", rule.name));
        }
    }
    if set.get("no such rule").is_some() {
        problems.push("a missing rule name was found".into());
    }
    let got: Vec<String> = diagnostics.iter().map(render).collect();
    let want: Vec<String> = case["diagnostics"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    if got != want && std::env::var_os("UPDATE_EXPECT").is_some() {
        update_diagnostics(path, &text, &got);
    } else if got != want {
        problems.push(format!(
            "diagnostics differ\n  got:  {got:#?}\n  want: {want:#?}"
        ));
    }
    if let Some(n) = case.get("rules").and_then(Value::as_u64)
        && set.len() as u64 != n
    {
        problems.push(format!("loaded {} rules, want {n}", set.len()));
    }
    for (rule, want) in case["headers"].as_object().into_iter().flatten() {
        let Some(r) = set.get(rule) else {
            problems.push(format!("headers: no rule `{rule}`"));
            continue;
        };
        let got = headers_of(&r.webhook.headers);
        if got != *want {
            problems.push(format!(
                "headers of `{rule}`\n  got:  {got}\n  want: {want}"
            ));
        }
    }
    // Whatever a case says: no secret header value is ever shown.
    for r in set.rules() {
        for (name, v) in &r.webhook.headers {
            if let HeaderValue::Secret(s) = v
                && (v.preview().contains(&s.value) || v.recorded().contains(&s.value))
            {
                problems.push(format!(
                    "rule `{}`: header `{name}` shows its secret",
                    r.name
                ));
            }
        }
    }
    for (i, check) in case["checks"].as_array().into_iter().flatten().enumerate() {
        let event = match Event::from_value(check["event"].clone()) {
            Ok(ev) => ev,
            Err(e) => {
                problems.push(format!("checks[{i}]: bad event: {e}"));
                continue;
            }
        };
        let matched: Vec<&str> = set
            .matching(&event)
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        let want_matches: Vec<&str> = check["matches"]
            .as_array()
            .expect("check has `matches`")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if matched != want_matches {
            problems.push(format!(
                "checks[{i}]: matches {matched:?}, want {want_matches:?}"
            ));
        }
        let verdicts = explain(&set, &event);
        // explain and matching must agree, or explain would mislead admins.
        let explained: Vec<&str> = verdicts
            .iter()
            .filter(|v| v.matched)
            .map(|v| v.rule.as_str())
            .collect();
        if explained != matched {
            problems.push(format!(
                "checks[{i}]: explain says {explained:?} match, matching says {matched:?}"
            ));
        }
        for (rule, want) in check["misses"].as_object().into_iter().flatten() {
            let got = verdicts
                .iter()
                .find(|v| v.rule == *rule)
                .and_then(|v| v.reason.as_ref())
                .map(|r| json!({"check": r.check, "why": r.why, "actual": r.actual}));
            if got.as_ref() != Some(want) {
                problems.push(format!(
                    "checks[{i}]: miss of `{rule}`\n  got:  {}\n  want: {want}",
                    got.unwrap_or(Value::Null)
                ));
            }
        }
        // The lane each rule's delivery joins (`null`: not ordered), which
        // explain must report the same for a match.
        for (rule, want) in check["lanes"].as_object().into_iter().flatten() {
            let Some(r) = set.get(rule) else {
                problems.push(format!("checks[{i}]: no rule `{rule}` for lanes"));
                continue;
            };
            let got = json!(r.lane(&super::eval::EventView::new(&event)));
            if got != *want {
                problems.push(format!(
                    "checks[{i}]: lane of `{rule}`\n  got:  {got}\n  want: {want}"
                ));
            }
            let explained = verdicts
                .iter()
                .find(|v| v.rule == *rule && v.matched)
                .and_then(|v| v.ordering.as_ref())
                .map(|o| o.lane.clone());
            if matched.contains(&rule.as_str()) && json!(explained) != *want {
                problems.push(format!(
                    "checks[{i}]: explain puts `{rule}` in lane {explained:?}, want {want}"
                ));
            }
        }
        for (rule, want) in check["payloads"].as_object().into_iter().flatten() {
            let Some(r) = set.get(rule) else {
                problems.push(format!("checks[{i}]: no rule `{rule}` for payload"));
                continue;
            };
            let got = crate::payload::build(&r.name, &event, event.id.as_deref().unwrap_or("evt"));
            if got != *want {
                problems.push(format!(
                    "checks[{i}]: payload of `{rule}`\n  got:  {got}\n  want: {want}"
                ));
            }
        }
    }
    problems
}

/// A rule's own headers as a case writes them: text as a string, a secret
/// as what is sent, what `explain` shows and what attempt records keep.
fn headers_of(headers: &[(String, HeaderValue)]) -> Value {
    headers
        .iter()
        .map(|(name, v)| {
            let v = match v {
                HeaderValue::Text(t) => json!(t),
                HeaderValue::Secret(_) => {
                    json!({"sent": v.value(), "shown": v.preview(), "recorded": v.recorded()})
                }
            };
            (name.clone(), v)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// With `UPDATE_EXPECT=1`, rewrites a case's `diagnostics:` block with what
/// the engine reports now; review the diff before committing it.
fn update_diagnostics(path: &Path, text: &str, got: &[String]) {
    let mut out = String::new();
    let mut skipping = false;
    let mut written = false;
    let block: String = std::iter::once("diagnostics:\n".to_string())
        .chain(
            got.iter()
                .map(|d| format!("  - {}\n", Value::String(d.clone()))),
        )
        .collect();
    for line in text.lines() {
        if line.starts_with("diagnostics:") {
            skipping = true;
            written = true;
            out.push_str(&block);
            continue;
        }
        if skipping && (line.starts_with("  ") || line.is_empty()) {
            continue;
        }
        skipping = false;
        out.push_str(line);
        out.push('\n');
    }
    if !written {
        out.push_str(&block);
    }
    std::fs::write(path, out).expect("case file is writable");
}

#[test]
fn rule_engine_cases() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/rules/cases");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("cases dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 9,
        "expected the case files in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for path in &paths {
        for problem in check_case(path) {
            failures.push(format!(
                "{}: {problem}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems in {} cases:\n{}",
        failures.len(),
        paths.len(),
        failures.join("\n\n")
    );
}
