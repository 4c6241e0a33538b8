//! Plugin runtime benchmarks, through the same code the server uses:
//!
//! - call overhead of the no-op plugin on a 2 KB payload, warm instance;
//! - select-fields on a 5 KB entity;
//! - loading a plugin after a restart with a warm on-disk cache, against a
//!   cold compile.
//!
//! `cargo bench -p rulehook --bench plugins`

use std::path::Path;
use std::time::{Duration, Instant};

use rulehook::plugins::{CallContext, Limits, Outcome, Runtime};
use serde_json::{Value, json};

fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("RULEHOOK_WASM_DIR")).join(format!("{name}.wasm")))
        .expect("the build made the plugin")
}

/// Median and p99 of `n` timed calls after `warmup` untimed ones.
fn measure(n: usize, warmup: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..warmup {
        f();
    }
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    (times[n / 2], times[n * 99 / 100])
}

fn payload_of_size(bytes: usize, udfs: usize) -> Value {
    let mut entity = serde_json::Map::new();
    entity.insert("id".into(), json!("2013"));
    entity.insert("type".into(), json!("defect"));
    entity.insert("name".into(), json!("Login fails after password reset"));
    entity.insert(
        "severity".into(),
        json!({"id": "list_node.severity.high", "name": "High"}),
    );
    entity.insert(
        "phase".into(),
        json!({"id": "phase.defect.opened", "name": "Opened"}),
    );
    for i in 0..udfs {
        entity.insert(format!("custom_{i}_udf"), json!(format!("value {i}")));
    }
    let mut p = json!({"event_id": "evt-1", "event_type": "update", "entity_type": "defect",
        "rule": "bench", "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
        "user": {"id": "1001", "email": "admin@example.com"}, "entity": entity});
    let mut filler = 0;
    while p.to_string().len() < bytes {
        p["entity"][format!("field_{filler}")] = json!("lorem ipsum dolor sit amet");
        filler += 1;
    }
    p
}

fn main() {
    let ctx = CallContext {
        rule: "bench".into(),
        event_id: "evt-1".into(),
        event_type: "update".into(),
        entity_type: "defect".into(),
    };
    let runtime = Runtime::new(Limits::default(), None).expect("runtime");

    let noop = runtime.load("noop", &wasm("noop")).expect("noop loads");
    let two_kb = payload_of_size(2048, 10).to_string();
    let (median, p99) = measure(100_000, 10_000, || {
        let call = noop.transform(&ctx, &two_kb, "null");
        assert!(matches!(call.result, Ok(Outcome::Send(_))));
    });
    println!(
        "noop plugin, {} B payload, warm instance: median {:.2} µs, p99 {:.2} µs",
        two_kb.len(),
        median.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );

    let select = runtime
        .load("select-fields", &wasm("select-fields"))
        .expect("select-fields loads");
    let five_kb = payload_of_size(5120, 40).to_string();
    let config =
        json!({"fields": ["name", "severity", "phase.id", "*_udf", {"label": "Root Cause"}],
        "labels": {"Root Cause": "custom_3_udf"}})
        .to_string();
    let (median, p99) = measure(50_000, 5_000, || {
        let call = select.transform(&ctx, &five_kb, &config);
        assert!(matches!(call.result, Ok(Outcome::Send(_))));
    });
    println!(
        "select-fields, {} B payload (5 fields incl. a pattern and a label): median {:.2} µs, p99 {:.2} µs",
        five_kb.len(),
        median.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );

    // Restart: a fresh engine each time, as a new process would have.
    let cache = std::env::temp_dir().join(format!("rulehook-bench-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let bytes = wasm("select-fields");
    let first_call = |rt: &std::sync::Arc<Runtime>| {
        let t = Instant::now();
        let p = rt.load("select-fields", &bytes).expect("loads");
        let loaded = t.elapsed();
        let call = p.transform(&ctx, &five_kb, &config);
        assert!(matches!(call.result, Ok(Outcome::Send(_))));
        (loaded, t.elapsed())
    };
    let cold = Runtime::new(Limits::default(), Some(cache.clone())).expect("runtime");
    let (cold_load, cold_total) = first_call(&cold);
    drop(cold);
    let warm = Runtime::new(Limits::default(), Some(cache.clone())).expect("runtime");
    let (warm_load, warm_total) = first_call(&warm);
    println!(
        "select-fields ({} KiB component) after a restart: cold compile {:.1} ms (+ first call: {:.1} ms); warm disk cache {:.2} ms (+ first call: {:.2} ms)",
        bytes.len() / 1024,
        cold_load.as_secs_f64() * 1e3,
        cold_total.as_secs_f64() * 1e3,
        warm_load.as_secs_f64() * 1e3,
        warm_total.as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(&cache);
}
