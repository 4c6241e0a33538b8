//! `rulehook check`, `explain` and `schema` on real files.

use serde_json::Value;

use crate::support::{rulehook, stdout};

/// `rulehook explain ARGS --format json`, which must succeed.
fn explain_json(args: &[&str]) -> Value {
    let mut all = vec!["explain"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--format", "json"]);
    let out = rulehook(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

#[test]
fn check_passes_on_the_example_rules() {
    let out = rulehook(&["check", "rules"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("6 rules ok"), "{}", stdout(&out));
}

#[test]
fn check_reports_every_mistake_with_its_location() {
    let out = rulehook(&["check", "tests/fixtures/broken-rules"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let locations: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(": error: "))
        .map(|l| l.split(": error: ").next().unwrap_or_default())
        .collect();
    assert_eq!(
        locations,
        [
            "tests/fixtures/broken-rules/alm.yaml:3:5",
            "tests/fixtures/broken-rules/alm.yaml:7:29",
            "tests/fixtures/broken-rules/alm.yaml:8:34",
            "tests/fixtures/broken-rules/alm.yaml:11:15",
            "tests/fixtures/broken-rules/scm.yaml:4:78",
            "tests/fixtures/broken-rules/scm.yaml:7:14",
            "tests/fixtures/broken-rules/scm.yaml:8:20",
        ],
        "{text}"
    );
    assert!(
        text.contains("unknown key `entity_type` in rule\n  fix: did you mean `entity_types`?"),
        "{text}"
    );
    assert!(
        text.contains("environment variable RULEHOOK_TEST_SURELY_UNSET is not set"),
        "{text}"
    );
    assert!(
        text.contains("retry `intervals` does not apply to the fixed policy"),
        "{text}"
    );
    assert!(text.ends_with("7 errors, 0 warnings\n"), "{text}");
}

#[test]
fn check_json_output_is_for_tools() {
    let out = rulehook(&["check", "tests/fixtures/broken-rules", "--format", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(report["ok"], false);
    assert_eq!(report["errors"], 7);
    let first = &report["diagnostics"][0];
    assert_eq!(first["file"], "tests/fixtures/broken-rules/alm.yaml");
    assert_eq!(
        (first["line"].as_u64(), first["column"].as_u64()),
        (Some(3), Some(5))
    );
    assert_eq!(first["severity"], "error");
    assert_eq!(first["fix"], "did you mean `entity_types`?");
}

#[test]
fn duplicate_names_are_reported_only_when_both_rules_are_valid() {
    // alm.yaml's `defect-reopened` has errors and is left out, so the
    // scm.yaml rule of the same name is not a duplicate of a loaded rule.
    let out = rulehook(&["check", "tests/fixtures/broken-rules"]);
    assert!(
        !stdout(&out).contains("duplicate rule name"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn explain_shows_matches_payloads_and_the_failed_condition() {
    let report = explain_json(&["--event", "rules/events/defect-reopened.json"]);
    let rules = report["rules"].as_array().expect("rules");
    let get = |name: &str| {
        rules
            .iter()
            .find(|r| r["rule"] == name)
            .expect(name)
            .clone()
    };
    let reopened = get("defect-reopened");
    assert_eq!(reopened["matched"], true);
    assert_eq!(
        reopened["payload"]["changes"]["phase"]["new"]["id"],
        "phase.defect.opened"
    );
    assert_eq!(reopened["payload"]["entity"]["type"], "defect");
    let headers = reopened["headers"].as_array().expect("headers");
    assert!(
        headers.iter().any(|h| h[0] == "X-Team" && h[1] == "qa"),
        "{headers:?}"
    );
    let story = get("story-created-in-workspace");
    assert_eq!(story["matched"], false);
    assert_eq!(story["reason"]["check"], "events");
    assert_eq!(story["reason"]["actual"], "update");
}

#[test]
fn explain_names_the_bad_field_of_a_bad_event() {
    let dir = std::env::temp_dir().join(format!("rulehook-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("event.json");
    std::fs::write(
        &file,
        r#"{"event_type": "update", "entity_type": "defect", "entity": {"id": "1"}}"#,
    )
    .expect("write");
    let out = rulehook(&["explain", "--event", file.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("before: missing; an update event must carry the entity as it was before"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn explain_says_where_a_websocket_rule_sends() {
    let dir = crate::support::TempDir::new("explain-ws");
    dir.write(
        "rules/ws.yaml",
        "rules:\n  - name: to-space\n    events: [create]\n    webhook: {transport: websocket}\n  - name: fixed-space\n    events: [create]\n    webhook: {transport: websocket, space: 7}\n",
    );
    let explain = |scope: &str| {
        let event = dir.write(
            "event.json",
            &format!(r#"{{"event_type": "create", "entity_type": "story", "scope": {scope}, "entity": {{"id": "1"}}}}"#),
        );
        let rules = dir.path().join("rules");
        let v = explain_json(&[
            "--event",
            event.to_str().expect("utf-8"),
            "--rules",
            rules.to_str().expect("utf-8"),
        ]);
        let channel = |rule: &str| {
            let entry = v["rules"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["rule"] == rule)
                .cloned()
                .unwrap();
            assert!(
                entry["headers"].is_null(),
                "no HTTP headers for {rule}: {entry}"
            );
            entry["channel"].as_str().unwrap_or_default().to_string()
        };
        (channel("to-space"), channel("fixed-space"))
    };
    let (from_event, fixed) = explain(r#"{"sharedspace_id": 1001}"#);
    assert!(
        from_event.contains("shared space 1001 (/messaging/shared_spaces/1001/webhooks)"),
        "{from_event}"
    );
    assert!(fixed.contains("shared space 7"), "{fixed}");
    let (nowhere, fixed) = explain(r#"{"workspace_id": 1002}"#);
    assert!(
        nowhere.starts_with("nowhere:") && nowhere.contains("sharedspace_id"),
        "{nowhere}"
    );
    assert!(fixed.contains("shared space 7"), "{fixed}");
}

#[test]
fn explain_and_check_know_an_ordered_rule() {
    let dir = crate::support::TempDir::new("explain-ordering");
    dir.write(
        "rules/ordered.yaml",
        "rules:\n  - name: mirror\n    events: [update]\n    ordering: {key: phase.id, on_failure: halt}\n    webhook: {url: \"https://x.test/h\"}\n",
    );
    let event = dir.write(
        "event.json",
        r#"{"event_type": "update", "entity_type": "defect", "entity": {"id": "9", "phase": {"id": "opened"}}, "before": {"id": "9"}}"#,
    );
    let rules = dir.path().join("rules");
    let (event, rules) = (event.to_str().unwrap(), rules.to_str().unwrap());
    let v = explain_json(&["--event", event, "--rules", rules]);
    let entry = &v["rules"][0];
    assert_eq!(entry["matched"], true, "{v}");
    assert_eq!(
        entry["ordering"],
        serde_json::json!({"lane": "mirror/opened", "key": "phase.id", "on_failure": "halt"}),
        "{v}"
    );
    let human = rulehook(&["explain", "--event", event, "--rules", rules]);
    assert!(
        stdout(&human).contains("ordered: lane mirror/opened (key phase.id, on_failure halt)"),
        "{}",
        stdout(&human)
    );
    // A typo in the option is an error at its place, with the fix.
    dir.write(
        "rules/ordered.yaml",
        "rules:\n  - name: mirror\n    events: [update]\n    ordering: {on_failure: stop}\n    webhook: {url: \"https://x.test/h\"}\n",
    );
    let out = rulehook(&["check", rules]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("ordered.yaml:4:27: error: ordering on_failure `stop` is unknown [fix: use skip or halt]")
            || stdout(&out).contains("ordering on_failure `stop` is unknown"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn schema_describes_the_rule_format() {
    let out = rulehook(&["schema"]);
    assert!(out.status.success());
    let schema: Value = serde_json::from_slice(&out.stdout).expect("JSON schema");
    assert_eq!(schema["title"], "RuleFile");
    assert!(schema["$defs"]["Webhook"]["properties"]["signature_header"].is_object());
    assert!(!schema["$defs"]["Leaf"]["properties"]["changed_from"].is_null());
    assert_eq!(
        schema["$defs"]["Leaf"]["properties"]["matches"]["type"],
        serde_json::json!(["string", "null"])
    );
}

#[test]
fn check_points_at_the_construct_left_open() {
    // Each file leaves one construct open; `check` must name the opener's
    // line and column, not the end of the file where YAML gave up.
    let dir = crate::support::TempDir::new("check-unclosed");
    let files = [
        (
            "a-list.yaml",
            "rules:\n  - name: [oops\n",
            (2, 11),
            "this `[` is never closed",
        ),
        (
            "b-map.yaml",
            "rules:\n  - name: x\n    scope: {workspace_id: 1002\n",
            (3, 12),
            "this `{` is never closed",
        ),
        (
            "c-single.yaml",
            "rules:\n  - name: x\n    description: 'never closed\n",
            (3, 18),
            "this `'` is never closed",
        ),
        (
            "d-double.yaml",
            "rules:\n  - name: x\n    description: \"never closed\n",
            (3, 18),
            "this `\"` is never closed",
        ),
        (
            "e-inner.yaml",
            "rules:\n  - name: x\n    events: [create, {a: 1\n",
            (3, 22),
            "this `{` is never closed",
        ),
    ];
    for (name, text, _, _) in &files {
        dir.write(&format!("rules/{name}"), text);
    }
    let rules = dir.path().join("rules");
    let out = rulehook(&["check", rules.to_str().expect("utf-8"), "--format", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let diagnostics = report["diagnostics"].as_array().expect("diagnostics");
    assert_eq!(diagnostics.len(), files.len(), "{report:#}");
    for ((name, _, (line, column), message), d) in files.iter().zip(diagnostics) {
        assert_eq!(d["file"], rules.join(name).display().to_string(), "{d}");
        assert_eq!(
            (d["line"].as_u64(), d["column"].as_u64()),
            (Some(*line), Some(*column)),
            "{name}: {d}"
        );
        assert!(
            d["message"].as_str().unwrap_or_default().contains(message),
            "{name}: {d}"
        );
        assert!(
            d["fix"].as_str().unwrap_or_default().starts_with("add "),
            "{name}: {d}"
        );
    }
}
