//! Plugin runtime benchmarks, through the same code the server uses:
//!
//! - call overhead of the no-op plugin on a 2 KB payload, warm instance;
//! - select-fields on a 5 KB entity;
//! - loading a plugin after a restart with a warm on-disk cache, against a
//!   cold compile;
//! - the same template plugin (add `source`, skip listed types) in Rust,
//!   JavaScript (QuickJS) and Python: cold compile, load from the disk
//!   cache, a fresh instance's first call and warm calls, on 2 KB and
//!   100 KB payloads (and warm calls on 800 KB).
//!
//! `cargo bench -p rulehook --bench plugins`. The template components are
//! the ones the integration tests build (`cargo test -p rulehook --test
//! integration -- template`); a missing one is named with that command.

use std::path::{Path, PathBuf};
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

    languages(&ctx);
}

/// The newest `dir/*/NAME.wasm` (the integration tests' build cache keeps
/// one directory per source hash).
fn newest(dir: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path().join(name))
        .filter(|p| p.exists())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// The template plugin in each language, as the integration tests left it.
fn template_components() -> Vec<(&'static str, PathBuf)> {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let builds = target.join("plugin-language-builds");
    let found = [
        (
            "Rust",
            Some(target.join("template-plugin/wasm32-wasip2/release/my_filter.wasm"))
                .filter(|p| p.exists()),
        ),
        ("JavaScript (QuickJS)", newest(&builds, "tpl-js.wasm")),
        ("Python", newest(&builds, "tpl-python.wasm")),
    ];
    found
        .into_iter()
        .map(|(lang, path)| {
            let path = path.unwrap_or_else(|| {
                panic!(
                    "the {lang} template component is missing; build it with `cargo test -p rulehook --test integration -- template`"
                )
            });
            (lang, path)
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Cold compile, cached load, fresh instance and warm calls per language.
fn languages(ctx: &CallContext) {
    // (payload, warm calls timed, whether a fresh instance is measured)
    let sizes = [
        (payload_of_size(2_000, 3).to_string(), 2_000, true),
        (payload_of_size(100_000, 6).to_string(), 200, true),
        (payload_of_size(800_000, 10).to_string(), 40, false),
    ];
    println!();
    println!(
        "template plugin per language ({} B, {} B and {} B payloads; fresh instance = first call after a load, minus a warm call of the same payload):",
        sizes[0].0.len(),
        sizes[1].0.len(),
        sizes[2].0.len()
    );
    // A deadline far above any call here: this measures what a call costs
    // (an 800 KB payload through CPython's json takes tens of ms, past the
    // 50 ms default), not whether it fits.
    let limits = Limits {
        timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let sent = |call: &rulehook::plugins::Call| {
        assert!(
            matches!(call.result, Ok(Outcome::Send(_))),
            "{:?}",
            call.result
        )
    };
    for (lang, path) in template_components() {
        let bytes = std::fs::read(&path).expect("read the component");
        let cache = std::env::temp_dir().join(format!(
            "rulehook-bench-lang-{}-{}",
            std::process::id(),
            bytes.len()
        ));
        let _ = std::fs::remove_dir_all(&cache);
        let cold = Runtime::new(limits.clone(), Some(cache.clone())).expect("runtime");
        let t = Instant::now();
        drop(cold.load("tpl", &bytes).expect("compiles"));
        let compile = t.elapsed();
        drop(cold);

        // A new runtime per load, as after a restart; the call after each
        // load runs on a fresh instance: 10 loads per measured payload.
        let mut loads = Vec::new();
        let mut firsts: Vec<Vec<Duration>> = vec![Vec::new(); sizes.len()];
        for (k, (payload, _, fresh)) in sizes.iter().enumerate() {
            if !fresh {
                continue;
            }
            for _ in 0..10 {
                let rt = Runtime::new(limits.clone(), Some(cache.clone())).expect("runtime");
                let t = Instant::now();
                let p = rt.load("tpl", &bytes).expect("loads from the cache");
                loads.push(t.elapsed());
                let call = p.transform(ctx, payload, "{}");
                sent(&call);
                firsts[k].push(call.elapsed);
            }
        }
        let rt = Runtime::new(limits.clone(), Some(cache.clone())).expect("runtime");
        let p = rt.load("tpl", &bytes).expect("loads");
        let mut line = format!(
            "  {lang}: {:.1} MB component; cold compile {:.0} ms, load from cache {:.1} ms",
            bytes.len() as f64 / 1e6,
            ms(compile),
            ms(median(loads)),
        );
        for (k, (payload, n, fresh)) in sizes.iter().enumerate() {
            let (med, p99) = measure(*n, n / 10 + 1, || sent(&p.transform(ctx, payload, "{}")));
            line += &format!(
                "; {} KB: warm median {:.3} ms (p99 {:.3} ms)",
                payload.len() / 1000,
                ms(med),
                ms(p99)
            );
            if *fresh {
                let first = median(std::mem::take(&mut firsts[k]));
                line += &format!(", fresh instance {:.3} ms", ms(first.saturating_sub(med)));
            }
        }
        println!("{line}");
        let _ = std::fs::remove_dir_all(&cache);
    }
}
