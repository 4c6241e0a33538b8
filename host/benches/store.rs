//! The store alone: what one delivery costs the outbox writer, the single
//! thread every durable write goes through. Each round commits, in one
//! transaction, 150 accepted events (one delivery each, 1.3 KiB bodies)
//! and the successful attempts of the previous round's deliveries, which
//! is what the writer sees under end-to-end load.
//!
//! `cargo bench -p rulehook --bench store [-- --rounds N] [--sequential-ids] [--per-round N] [--no-quick-repair] [--no-commit-log]`
//!
//! `--per-round 1` is the low-rate case: one event and one attempt record per
//! commit, as a server at a few hundred events/s commits.

use std::time::Instant;

use rulehook::store::{Attempt, DeliveryId, Done, NewDelivery, NewEvent, Next, Op, State, Store};

/// Events (and attempts) per commit, unless `--per-round` says otherwise.
const PER_ROUND: usize = 150;

fn attempt() -> Attempt {
    Attempt {
        number: 1,
        started_at: 0,
        duration_ms: 1,
        url: "http://127.0.0.1:9999/hook".into(),
        method: "POST".into(),
        request_headers: [
            ("Content-Type", "application/json"),
            ("User-Agent", "rulehook/0.1.0"),
            (
                "X-Rulehook-Delivery",
                "dlv_0194f5c2a4a87c3d9a6e1f2b3c4d5e6f",
            ),
            ("X-Rulehook-Event", "c3-000001234-17"),
            ("X-Rulehook-Rule", "all-stories"),
            ("X-Rulehook-Attempt", "1"),
            (
                "X-Rulehook-Signature",
                "sha256=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        status: Some(200),
        reason_phrase: Some("OK".into()),
        response_headers: vec![("content-length".into(), "2".into())],
        response_body: Some("ok".into()),
        response_truncated: false,
        error: None,
        outcome: "succeeded".into(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let sequential = args.iter().any(|a| a == "--sequential-ids");
    let quick_repair = !args.iter().any(|a| a == "--no-quick-repair");
    let commit_log = !args.iter().any(|a| a == "--no-commit-log");
    let per_round: usize = args
        .iter()
        .position(|a| a == "--per-round")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(PER_ROUND);
    let dir = std::env::temp_dir().join(format!("rulehook-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = rulehook::store::RedbOptions {
        cache_bytes: 64 << 20,
        quick_repair,
        commit_log,
    };
    let store = Store::open_with(&dir.join("rulehook.redb"), options).expect("open the store");
    let body = bytes::Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(1300)));
    let mut previous: Vec<DeliveryId> = Vec::new();
    let mut serial = 0u64;
    let started = Instant::now();
    let cpu_before = thread_cpu_ns();
    let mut round_times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let mut ops = Vec::with_capacity(2 * per_round);
        for id in previous.drain(..) {
            ops.push(Op::Finish {
                id,
                attempt: Some(attempt()),
                next: Next::Succeeded,
                epoch: None,
            });
        }
        for _ in 0..per_round {
            serial += 1;
            // Senders' ids are usually random (UUIDv4), which scatters
            // the event index's inserts over its pages.
            let id = if sequential {
                format!("{serial:016x}")
            } else {
                format!("{:016x}", serial.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            };
            ops.push(Op::Accept(NewEvent {
                id,
                deliveries: vec![NewDelivery {
                    id: DeliveryId::new(),
                    rule: "all-stories".into(),
                    state: State::Pending,
                    reason: None,
                    body: body.clone(),
                    unbuilt: false,
                    space: None,
                    // As ingest stores it: 16 hex digits per delivery.
                    rule_version: Some("0123456789abcdef".into()),
                    lane: None,
                }],
            }));
        }
        let t = Instant::now();
        for done in store.apply(ops).expect("commit") {
            if let Done::Accepted { deliveries, .. } = done {
                previous.extend(deliveries);
            }
        }
        round_times.push(t.elapsed());
        if round == 0 {
            assert_eq!(previous.len(), per_round);
        }
    }
    let total = started.elapsed();
    let cpu = (thread_cpu_ns() - cpu_before) as f64 / 1e9;
    let deliveries = (rounds * per_round) as f64;
    round_times.sort();
    let median = round_times[round_times.len() / 2];
    println!(
        "store ({} event ids, quick repair {}): {rounds} commits of {per_round} accepts + {per_round} finishes: {:.1} µs of writer time per delivery, of which {:.1} µs on the CPU ({:.0} deliveries/s on one thread), median commit {:.2} ms",
        if sequential { "sequential" } else { "random" },
        if quick_repair { "on" } else { "off" },
        total.as_secs_f64() * 1e6 / deliveries,
        cpu * 1e6 / deliveries,
        deliveries / total.as_secs_f64(),
        median.as_secs_f64() * 1e3
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Nanoseconds this thread has run on a CPU (the writer's work without the
/// time it waits for fsync), from the scheduler's own accounting.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/thread-self/schedstat is readable on Linux")
}
