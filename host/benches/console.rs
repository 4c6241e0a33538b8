//! The console's first data request with 1,000,000 delivery records
//! stored: `GET /v1/deliveries?rule=R&status=S&limit=50`, whose server
//! work is one `Store::page` (the rows), one `Store::last_attempts` (their
//! endpoint and duration) and the JSON answer. Those three run here, in a
//! loop, on a store filled the way a busy server leaves it: 10 rules,
//! 90 % succeeded, 5 % failed, 5 % pending, one attempt each for the final
//! ones. Also the unfiltered first page, filters that match nothing (and
//! so use the whole scan budget), and the counts by state.
//!
//! `cargo bench -p rulehook --bench console [-- --records N] [--keep DIR]`
//! (the fill takes about two minutes on 2 cores; `--keep DIR` reuses a
//! store filled by an earlier run).

use std::time::{Duration, Instant};

use rulehook::store::{
    Attempt, DeliveryId, Done, Filter, NewDelivery, NewEvent, Next, Op, State, StatusMatch, Store,
};

const RULES: usize = 10;
const PER_EVENT: usize = 10;

fn attempt(status: u16) -> Attempt {
    Attempt {
        number: 1,
        started_at: 0,
        duration_ms: 3,
        url: "http://127.0.0.1:9999/hook".into(),
        method: "POST".into(),
        request_headers: vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-Rulehook-Rule".into(), "rule-3".into()),
        ],
        status: Some(status),
        reason_phrase: Some("OK".into()),
        response_headers: vec![("content-length".into(), "2".into())],
        response_body: Some("ok".into()),
        response_truncated: false,
        error: None,
        outcome: "test".into(),
    }
}

fn fill(store: &Store, records: usize) {
    let body = bytes::Bytes::from(vec![b'x'; 600]);
    let started = Instant::now();
    let mut made = 0usize;
    while made < records {
        let mut ops = Vec::new();
        let mut finish = Vec::new();
        for _ in 0..100 {
            let deliveries: Vec<NewDelivery> = (0..PER_EVENT)
                .map(|i| NewDelivery {
                    id: DeliveryId::new(),
                    rule: format!("rule-{}", (made + i) % RULES),
                    state: State::Pending,
                    reason: None,
                    body: body.clone(),
                    unbuilt: false,
                    space: None,
                    rule_version: Some("0123456789abcdef".into()),
                    lane: None,
                })
                .collect();
            for (i, d) in deliveries.iter().enumerate() {
                // The state by a stride other than the rule's, so every
                // rule has deliveries in every state: of each rule's, one
                // in 20 stays pending and one in 20 fails.
                match ((made + i) / RULES) % 20 {
                    0 => {}
                    10 => finish.push((d.id, 503, Next::Failed("HTTP 503".into()))),
                    _ => finish.push((d.id, 200, Next::Succeeded)),
                }
            }
            made += deliveries.len();
            ops.push(Op::Accept(NewEvent {
                id: format!("evt-{made}"),
                deliveries,
            }));
        }
        store.apply(ops).expect("accept");
        let ops = finish
            .into_iter()
            .map(|(id, status, next)| Op::Finish {
                id,
                attempt: Some(attempt(status)),
                next,
                epoch: None,
            })
            .collect();
        let done = store.apply(ops).expect("finish");
        assert!(done.iter().all(|d| matches!(d, Done::Finished { .. })));
        if made.is_multiple_of(100_000) {
            eprintln!("  {made} records ({:.0?})", started.elapsed());
        }
    }
}

/// The handler's work for one list request: page, last attempts, JSON.
fn first_page(store: &Store, filter: &Filter) -> (usize, usize) {
    let page = store.page(filter, None, 50, 20_000).expect("page");
    let last = store.last_attempts(&page.deliveries).expect("attempts");
    let rows: Vec<serde_json::Value> = page
        .deliveries
        .iter()
        .zip(&last)
        .map(|(d, a)| {
            let mut v = serde_json::json!(d);
            v["duration_ms"] = serde_json::json!(a.as_ref().map(|a| a.duration_ms));
            v
        })
        .collect();
    let text = serde_json::to_vec(&serde_json::json!({"deliveries": rows})).expect("json");
    (page.deliveries.len(), text.len())
}

fn measure(name: &str, runs: usize, mut f: impl FnMut() -> usize) {
    let mut times: Vec<Duration> = Vec::with_capacity(runs);
    let mut rows = 0;
    for _ in 0..runs {
        let t = Instant::now();
        rows = f();
        times.push(t.elapsed());
    }
    times.sort();
    let at = |p: usize| times[(times.len() - 1) * p / 100];
    println!(
        "{name:<44} rows {rows:>3}  median {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}",
        at(50),
        at(99),
        times[times.len() - 1]
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let records: usize = arg("--records")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let (dir, keep) = match arg("--keep") {
        Some(d) => (std::path::PathBuf::from(d), true),
        None => (
            std::env::temp_dir().join(format!("rulehook-bench-console-{}", std::process::id())),
            false,
        ),
    };
    let path = dir.join("rulehook.redb");
    let fresh = !path.exists();
    let store = Store::open(&path, 64 << 20).expect("open store");
    if fresh {
        eprintln!("filling {records} records into {}", path.display());
        fill(&store, records);
    }
    let by = |rule: Option<&str>, state: Option<State>| Filter {
        rule: rule.map(str::to_string),
        state,
        ..Filter::default()
    };
    let runs = 200;
    measure("rule + failed (the console's first request)", runs, || {
        first_page(&store, &by(Some("rule-3"), Some(State::Failed))).0
    });
    measure("rule + succeeded", runs, || {
        first_page(&store, &by(Some("rule-3"), Some(State::Succeeded))).0
    });
    measure("rule + pending", runs, || {
        first_page(&store, &by(Some("rule-3"), Some(State::Pending))).0
    });
    measure("rule + skipped (none stored: scan budget)", 50, || {
        first_page(&store, &by(Some("rule-3"), Some(State::Skipped))).0
    });
    measure("state failed only", runs, || {
        first_page(&store, &by(None, Some(State::Failed))).0
    });
    measure("no filter", runs, || first_page(&store, &by(None, None)).0);
    let rare = Filter {
        status_code: StatusMatch::parse("404"),
        ..Filter::default()
    };
    measure("status_code=404 (no match: scan budget)", 20, || {
        first_page(&store, &rare).0
    });
    measure("counts by state", 20, || {
        let (c, _) = store.counts(200_000).expect("counts");
        (c.failed > 0) as usize
    });
    drop(store);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
