//! Rule matching with 10,000 rules loaded, where 10 match the event.
//!
//! `cargo bench -p rulehook --bench matching` prints the median and p99 time
//! per event, then what one matching rule's payload costs ingest.
//! The rule set is shaped like a real multi-tenant install: 100
//! workspaces × 5 entity types × 3 events, rules with and without scope,
//! conditions of several operators, and a JSONPath condition among them.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use rulehook::event::Event;
use rulehook::payload;
use rulehook::rules::{RuleSet, SecretRef, Source};

const TYPES: [&str; 5] = ["defect", "story", "feature", "task", "test"];
const EVENTS: [&str; 3] = ["create", "update", "delete"];

fn rules_text() -> String {
    let mut y = String::from("rules:\n");
    let mut n = 0;
    // 9,960 tenant rules: each workspace gets rules for its types and events.
    'outer: for ws in 0..100 {
        for t in TYPES {
            for e in EVENTS {
                for k in 0..10 {
                    if n == 9_960 {
                        break 'outer;
                    }
                    let when = match k {
                        0 => "{field: phase.id, equals: phase.defect.opened}".to_string(),
                        1 => "{all: [{field: phase, is_modified: true}, {field: severity.id, in: [high, urgent]}]}".to_string(),
                        2 => "{field: name, matches: \"^Login\"}".to_string(),
                        3 => "{any: [{field: rework_counter_udf, gt: 2}, {field: owner, exists: false}]}".to_string(),
                        4 => "{not: {field: name, contains: \"[test]\"}}".to_string(),
                        5 => "{field: \"$.entity.comments[?@.author=='bot']\", exists: true}".to_string(),
                        6 => format!("{{field: rework_counter_udf, equals: {}}}", 100 + ws),
                        // Three candidates that fail, as real rule sets have.
                        _ => format!("{{field: phase.id, changed_to: phase.{k}}}"),
                    };
                    writeln!(y, "  - {{name: r{n}, scope: {{workspace_id: {}}}, entity_types: [{t}], events: [{e}], when: {when}, webhook: {{url: \"https://hooks.test/{n}\"}}}}", 1000 + ws).ok();
                    n += 1;
                }
            }
        }
    }
    // 40 unscoped rules: custom events, and three global update rules
    // (candidates for every update) that match.
    for i in 0..37 {
        writeln!(
            y,
            "  - {{name: g{i}, events: [custom{i}], webhook: {{url: \"https://hooks.test/g\"}}}}"
        )
        .ok();
    }
    for i in 0..3 {
        writeln!(y, "  - {{name: global-update-{i}, events: [update], when: {{field: phase.id, is_modified: true}}, webhook: {{url: \"https://hooks.test/g\"}}}}").ok();
    }
    y
}

fn main() {
    let source = Source {
        path: PathBuf::from("bench.yaml"),
        text: rules_text(),
    };
    let resolver = |_: &SecretRef| Err("no secrets in the benchmark".to_string());
    let started = Instant::now();
    let (set, diagnostics) = RuleSet::compile(&[source], &resolver);
    let compile = started.elapsed();
    assert!(
        diagnostics.is_empty(),
        "{:?}",
        &diagnostics[..diagnostics.len().min(3)]
    );
    assert_eq!(set.len(), 10_000);

    let event = Event::from_json(
        r#"{"id": "evt-1", "event_type": "update", "entity_type": "defect",
            "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
            "user": {"id": "1001", "email": "admin@example.com"},
            "entity": {"id": "2013", "name": "Login fails", "phase": {"id": "phase.defect.opened"}, "severity": {"id": "high"}, "rework_counter_udf": 102, "owner": {"id": "7"}, "comments": [{"author": "bot", "text": "build broke"}]},
            "before": {"id": "2013", "name": "Login fails", "phase": {"id": "phase.defect.fixed"}, "severity": {"id": "high"}, "rework_counter_udf": 2, "owner": {"id": "7"}, "comments": []}}"#,
    )
    .expect("valid event");
    let matched = set.matching(&event).len();
    // Workspace 1002's defect/update rules are 10 candidates of which 7
    // match; the 3 global update rules match too.
    assert_eq!(
        matched, 10,
        "the benchmark event must match exactly 10 rules"
    );

    for _ in 0..10_000 {
        black_box(set.matching(black_box(&event)));
    }
    let mut samples = Vec::with_capacity(200_000);
    for _ in 0..200_000 {
        let t = Instant::now();
        black_box(set.matching(black_box(&event)));
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
    println!(
        "rule set: 10,000 rules compiled and indexed in {:.0} ms",
        compile.as_secs_f64() * 1000.0
    );
    println!(
        "matching, 10,000 rules, event matching {matched}: median {:.2} µs, p99 {:.2} µs per event ({} samples)",
        pct(0.5),
        pct(0.99),
        samples.len()
    );

    // What each matching rule's payload costs ingest (`payload::to_string`).
    let make = || payload::to_string("r", black_box(&event), "evt-1");
    let mut took = Vec::with_capacity(200_000);
    for _ in 0..200_000 {
        let t = Instant::now();
        black_box(make());
        took.push(t.elapsed().as_nanos() as u64);
    }
    took.sort_unstable();
    println!(
        "payload of that event ({} bytes), per matching rule: median {:.2} µs, p99 {:.2} µs ({} samples)",
        make().len(),
        took[took.len() / 2] as f64 / 1000.0,
        took[took.len() * 99 / 100] as f64 / 1000.0,
        took.len()
    );
}
