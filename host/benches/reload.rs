//! Reload benchmark: how long a reload of 10,000 rules takes in the running
//! server, and the longest ingest stall while it happens.
//!
//! The real binary serves a directory of 10,000 rules (100 files of 100,
//! a tenth of them with `fields`, so the select-fields plugin is in the
//! chain). One client posts events back to back, timing every request,
//! while the main thread asks for reloads through `POST /v1/rules/reload`.
//! Ingest latencies during reloads are compared with those outside.
//!
//! `cargo bench -p rulehook --bench reload`

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../../tests/support/http.rs"]
mod http;

const FILES: usize = 100;
const RULES_PER_FILE: usize = 100;
const RELOADS: usize = 10;

fn write_rules(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in 0..FILES {
        let mut text = String::from("rules:\n");
        for r in 0..RULES_PER_FILE {
            let i = f * RULES_PER_FILE + r;
            // Spread over entity types and workspaces like a real install;
            // rule 0 is the one the posted events match.
            let entity = ["defect", "story", "task", "feature", "test"][i % 5];
            text.push_str(&format!(
                "  - name: rule-{i}\n    entity_types: [{entity}]\n    events: [update]\n    scope: {{workspace_id: {}}}\n    when:\n      all:\n        - {{field: phase.id, equals: phase.{entity}.opened}}\n        - {{field: severity, in: [high, urgent]}}\n        - not: {{field: name, matches: \"^\\\\[test-{i}\\\\]\"}}\n",
                if i == 0 { 1 } else { 1000 + i % 200 },
            ));
            if i.is_multiple_of(10) {
                text.push_str("    fields: [name, severity, phase, \"*_udf\"]\n");
            }
            text.push_str(
                "    webhook:\n      url: \"http://127.0.0.1:9/hook\"\n      retry: {policy: none}\n",
            );
        }
        std::fs::write(dir.join(format!("rules-{f:03}.yaml")), text).unwrap();
    }
}

fn event(n: usize) -> Vec<u8> {
    serde_json::json!({
        "id": format!("reload-bench-{n}"), "event_type": "update", "entity_type": "defect",
        "scope": {"workspace_id": 1},
        "entity": {"id": "1", "name": "x", "severity": "high", "phase": {"id": "phase.defect.opened"}, "a_udf": 1},
        "before": {"id": "1", "name": "x", "severity": "high", "phase": {"id": "phase.defect.fixed"}, "a_udf": 1},
    })
    .to_string()
    .into_bytes()
}

struct Server {
    child: std::process::Child,
    addr: SocketAddr,
    admin: String,
    ingest: String,
}

fn start(root: &Path) -> Server {
    let config = root.join("config.yaml");
    std::fs::write(
        &config,
        "rules_dir: rules\ndata_dir: data\nwatch: false\nallow_http: true\nhttp_ports: [9]\nallow_cidrs: [127.0.0.0/8]\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rulehook"))
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("RULEHOOK_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rulehook serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("data/api-keys.json")).unwrap()).unwrap();
    Server {
        child,
        addr,
        admin: format!("Bearer {}", keys["admin"].as_str().unwrap()),
        ingest: format!("Bearer {}", keys["ingest"].as_str().unwrap()),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let root: PathBuf =
        std::env::temp_dir().join(format!("rulehook-bench-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    write_rules(&root.join("rules"));
    let started = Instant::now();
    let mut server = start(&root);
    println!(
        "{} rules in {FILES} files; server up in {:.0} ms",
        FILES * RULES_PER_FILE,
        ms(started.elapsed())
    );

    // (start, latency) of every ingest request.
    let samples: Arc<Mutex<Vec<(Instant, Duration)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let poster = {
        let (samples, stop, addr, key) = (
            samples.clone(),
            stop.clone(),
            server.addr,
            server.ingest.clone(),
        );
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = event(n);
                let t = Instant::now();
                let r = http::request(
                    addr,
                    "POST",
                    "/v1/events",
                    &[
                        ("Authorization", &key),
                        ("Content-Type", "application/json"),
                    ],
                    &body,
                );
                let took = t.elapsed();
                assert_eq!(r.status, 202, "{}", r.text());
                samples.lock().unwrap().push((t, took));
                n += 1;
            }
        })
    };

    std::thread::sleep(Duration::from_secs(2));
    let mut windows = Vec::new();
    let mut reported = Vec::new();
    for _ in 0..RELOADS {
        let t = Instant::now();
        let r = http::request(
            server.addr,
            "POST",
            "/v1/rules/reload",
            &[("Authorization", &server.admin)],
            b"",
        );
        let took = t.elapsed();
        assert_eq!(r.status, 200, "{}", r.text());
        let report = r.json();
        assert_eq!(report["reload"]["rules"], FILES * RULES_PER_FILE);
        reported.push(report["reload"]["duration_ms"].as_f64().unwrap_or(f64::NAN));
        windows.push((t, t + took));
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    poster.join().unwrap();
    let _ = server.child.kill();
    let _ = server.child.wait();
    let _ = std::fs::remove_dir_all(&root);

    let mut wall: Vec<f64> = windows.iter().map(|(a, b)| ms(*b - *a)).collect();
    wall.sort_by(f64::total_cmp);
    reported.sort_by(f64::total_cmp);
    println!(
        "reload of {} rules ({RELOADS} reloads through the API): median {:.0} ms, max {:.0} ms (server-side: median {:.0} ms)",
        FILES * RULES_PER_FILE,
        wall[RELOADS / 2],
        wall[RELOADS - 1],
        reported[RELOADS / 2],
    );

    let samples = samples.lock().unwrap();
    // A request overlaps a reload if it was in flight at any time during it.
    let overlaps =
        |(s, d): &(Instant, Duration)| windows.iter().any(|(a, b)| *s <= *b && *s + *d >= *a);
    let mut during: Vec<Duration> = samples
        .iter()
        .filter(|x| overlaps(x))
        .map(|x| x.1)
        .collect();
    let mut outside: Vec<Duration> = samples
        .iter()
        .filter(|x| !overlaps(x))
        .map(|x| x.1)
        .collect();
    during.sort();
    outside.sort();
    let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    println!(
        "ingest during reloads: {} requests, median {:.2} ms, p99 {:.2} ms, longest {:.2} ms",
        during.len(),
        ms(pct(&during, 50)),
        ms(pct(&during, 99)),
        ms(*during.last().unwrap()),
    );
    println!(
        "ingest outside reloads: {} requests, median {:.2} ms, p99 {:.2} ms, longest {:.2} ms",
        outside.len(),
        ms(pct(&outside, 50)),
        ms(pct(&outside, 99)),
        ms(*outside.last().unwrap()),
    );
}
