//! Plugins through the real runtime: hostile plugins fail their delivery
//! with a clear message and harm nothing else; bundled plugins produce the
//! documented shapes; `check` reports bad plugin references; a plugin from
//! `rulehook plugin new` builds and runs; a delivery failed by a broken
//! plugin is redelivered once the plugin is fixed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{Server, setup};
use crate::support::{TempDir, repo, rulehook, stdout, wait_for};

const T: Duration = Duration::from_secs(30);

/// The components the build made from `plugins/*` and `tests/plugins/*`.
fn wasm(name: &str) -> PathBuf {
    Path::new(env!("RULEHOOK_WASM_DIR")).join(format!("{name}.wasm"))
}

fn story_created(id: &str) -> Value {
    json!({"id": id, "event_type": "create", "entity_type": "story",
        "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
        "user": {"id": "1001", "email": "admin@example.com"},
        "entity": {"id": "77", "name": "Checkout page", "story_points": 5, "owner": {"id": "9", "email": "dev@example.com"}}})
}

/// (plugin, final state, text the delivery's reason must contain).
const HOSTILE: &[(&str, &str, &str)] = &[
    ("spin", "failed", "plugin spin timed out after 50 ms"),
    (
        "membomb",
        "failed",
        "plugin membomb exceeded its memory limit of 32 MiB",
    ),
    ("panic", "failed", "boom: test panic"),
    ("huge", "failed", "more than the 1048576-byte output limit"),
    ("read-file", "failed", "plugin read-file returned an error"),
    (
        "abort",
        "failed",
        "plugin abort trapped: Traceback (most recent call last):",
    ),
    (
        "net",
        "failed",
        "plugin net trapped: plugins have no network access",
    ),
];

#[test]
fn hostile_plugins_fail_their_delivery_and_harm_nothing_else() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let mut rules = String::from("rules:\n");
    for (name, _, _) in HOSTILE
        .iter()
        .chain(&[("read-env", "", ""), ("log-flood", "", "")])
    {
        // The memory and output bombs get the most time an entry may ask
        // for: they must hit their cap, not the deadline, however loaded
        // the machine running the tests is.
        let limits = match *name {
            "membomb" | "huge" => ", timeout: 1s",
            _ => "",
        };
        rules.push_str(&format!(
            "  - name: hostile-{name}\n    events: [create]\n    plugins: [{{name: {name}{limits}}}]\n    webhook: {{url: \"{}\"}}\n",
            rx.url(&format!("/{name}"))
        ));
    }
    rules.push_str(&format!(
        "  - name: plain\n    events: [create]\n    webhook: {{url: \"{}\"}}\n",
        rx.url("/plain")
    ));
    let (dir, config) = setup(
        "hostile",
        &rules,
        &format!("plugins_dir: plugins\nhttp_ports: [{}]\n", rx.addr.port()),
    );
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    for name in [
        "spin",
        "membomb",
        "panic",
        "huge",
        "read-file",
        "abort",
        "net",
        "read-env",
        "log-flood",
    ] {
        std::fs::copy(wasm(name), dir.path().join(format!("plugins/{name}.wasm"))).unwrap();
    }
    let server = Server::start(&dir, &config);

    for round in 0..2 {
        let event_id = format!("hostile-{round}");
        let r = server.post_event(&story_created(&event_id));
        assert_eq!(r.status, 202, "{}", r.text());
        for (name, state, reason) in HOSTILE {
            let list = server.deliveries(&format!("rule=hostile-{name}&event={event_id}"));
            assert_eq!(list.len(), 1, "{name}: {list:?}");
            assert_eq!(list[0]["state"], *state, "{name}: {}", list[0]);
            let why = list[0]["reason"].as_str().unwrap_or_default();
            assert!(
                why.contains(reason),
                "{name}: reason {why:?} lacks {reason:?}"
            );
        }
        // Nothing the hostile plugins did stopped the others.
        let got = rx.wait_for(3 * (round + 1), T);
        let at = |path: &str| {
            got.iter()
                .rfind(|g| g.path == path)
                .unwrap_or_else(|| panic!("nothing at {path}"))
                .json()
        };
        assert_eq!(at("/plain")["event_id"], event_id);
        // WASI granted nothing: no environment variables at all.
        assert_eq!(at("/read-env"), json!({"home": null, "vars": 0}));
        assert_eq!(at("/log-flood")["event_id"], event_id);
    }
    // The file the read-file plugin tried to read never left the sandbox.
    let failed = server.deliveries("rule=hostile-read-file");
    assert!(
        failed
            .iter()
            .all(|d| !d["reason"].as_str().unwrap_or_default().contains("root:")),
        "{failed:?}"
    );
    assert_eq!(server.admin("GET", "/healthz", None).status, 200);
}

#[test]
fn a_delivery_failed_by_a_plugin_is_redelivered_after_the_fix() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - name: shaped\n    events: [create]\n    fields: [name]\n    plugins: [{{name: shaper}}]\n    webhook: {{url: \"{}\"}}\n",
        rx.url("/shaped")
    );
    let (dir, config) = setup(
        "redeliver-plugin",
        &rules,
        &format!("plugins_dir: plugins\nhttp_ports: [{}]\n", rx.addr.port()),
    );
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let shaper = dir.path().join("plugins/shaper.wasm");
    std::fs::copy(wasm("panic"), &shaper).unwrap();
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&story_created("fixme-1")).status, 202);
    let failed = server.deliveries("rule=shaped");
    assert_eq!(failed[0]["state"], "failed", "{failed:?}");
    let id = failed[0]["id"].as_str().unwrap().to_string();
    assert!(rx.received().is_empty());

    // The integrator ships a fixed plugin; the server restarts with it.
    server.stop();
    std::fs::copy(wasm("noop"), &shaper).unwrap();
    let server = Server::start(&dir, &config);
    let r = server.admin("POST", &format!("/v1/deliveries/{id}/redeliver"), None);
    assert_eq!(r.status, 202, "{}", r.text());
    let got = rx.wait_for(1, T);
    // Built now, by the chain as it is now: `fields` kept only the name.
    let body = got[0].json();
    assert_eq!(
        body["entity"],
        json!({"id": "77", "type": "story", "name": "Checkout page"})
    );
    assert_eq!(got[0].header("x-rulehook-delivery"), Some(id.as_str()));
    wait_for(T, "the redelivery to succeed", || {
        (server.delivery(&id)["delivery"]["state"] == "succeeded").then_some(())
    });
}

#[test]
fn a_skip_records_the_delivery_as_skipped_and_sends_nothing() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - name: skipped\n    events: [create]\n    plugins: [{{name: skip, config: {{reason: not for this team}}}}]\n    webhook: {{url: \"{}\"}}\n  - name: sent\n    events: [create]\n    webhook: {{url: \"{}\"}}\n",
        rx.url("/skipped"),
        rx.url("/sent")
    );
    let (dir, config) = setup(
        "skip",
        &rules,
        &format!("plugins_dir: plugins\nhttp_ports: [{}]\n", rx.addr.port()),
    );
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(wasm("skip"), dir.path().join("plugins/skip.wasm")).unwrap();
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&story_created("skip-1")).status, 202);
    let skipped = server.deliveries("rule=skipped");
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0]["state"], "skipped", "{}", skipped[0]);
    assert_eq!(
        skipped[0]["reason"],
        "plugin skip skipped it: not for this team"
    );
    // The other rule's delivery goes out; the skipped one never does.
    let got = rx.wait_for(1, T);
    std::thread::sleep(Duration::from_millis(300));
    let paths: Vec<String> = rx.received().iter().map(|g| g.path.clone()).collect();
    assert_eq!(paths, ["/sent"], "{got:?}");
}

fn plugin_run(plugin: &str, event: &Value, config: &Value) -> Value {
    let dir = TempDir::new("plugin-run");
    let event_file = dir.write("event.json", &event.to_string());
    let out = rulehook(&[
        "plugin",
        "run",
        plugin,
        "--event",
        event_file.to_str().unwrap(),
        "--config",
        &config.to_string(),
        "--format",
        "json",
    ]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn defect_update() -> Value {
    json!({"id": "evt-9", "event_type": "update", "entity_type": "defect",
        "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
        "user": {"id": "1001", "email": "admin@example.com"},
        "entity": {"id": "2013", "name": "Login fails", "severity": "high",
            "phase": {"id": "phase.defect.opened"}, "rework_counter_udf": 3, "root_cause_udf": "config", "notes": "x"},
        "before": {"id": "2013", "name": "Login fails", "severity": "high",
            "phase": {"id": "phase.defect.fixed"}, "rework_counter_udf": 2, "root_cause_udf": "config", "notes": "x"}})
}

#[test]
fn select_fields_keeps_names_patterns_and_labels() {
    // (fields, labels, the entity keys expected besides id and type)
    let cases: &[(Value, Value, &[&str])] = &[
        (json!(["name"]), json!({}), &["name"]),
        (
            json!(["*_udf"]),
            json!({}),
            &["rework_counter_udf", "root_cause_udf"],
        ),
        (
            json!([{"label": "Root Cause"}]),
            json!({"Root Cause": "root_cause_udf"}),
            &["root_cause_udf"],
        ),
        (
            json!(["severity", "phase.id"]),
            json!({}),
            &["severity", "phase"],
        ),
    ];
    for (fields, labels, expected) in cases {
        let out = plugin_run(
            "select-fields",
            &defect_update(),
            &json!({"fields": fields, "labels": labels}),
        );
        assert_eq!(out["outcome"], "send", "{fields}: {out}");
        let entity = out["payload"]["entity"].as_object().expect("entity");
        let mut keys: Vec<&str> = entity.keys().map(String::as_str).collect();
        keys.sort();
        let mut want: Vec<&str> = ["id", "type"]
            .iter()
            .chain(expected.iter())
            .copied()
            .collect();
        want.sort();
        assert_eq!(keys, want, "{fields}: {out}");
    }
}

#[test]
fn octane_format_emits_the_documented_shape() {
    let config = json!({"server_url": "https://alm.example.com"});
    let update = plugin_run("octane-format", &defect_update(), &config);
    assert_eq!(update["outcome"], "send", "{update}");
    let p = &update["payload"];
    assert_eq!(p["server_url"], "https://alm.example.com");
    assert_eq!(p["event_type"], "update");
    assert_eq!(p["sharedspace_id"], 1001);
    assert_eq!(p["workspace_id"], 1002);
    assert_eq!(
        p["username"],
        json!({"id": "1001", "email": "admin@example.com"})
    );
    let data = p["data"].as_array().expect("data");
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["entity"]["type"], "defect");
    assert_eq!(data[0]["entity"]["id"], "2013");
    assert_eq!(
        data[0]["changes"],
        json!({"phase": {"oldValue": {"id": "phase.defect.fixed"}, "newValue": {"id": "phase.defect.opened"}},
               "rework_counter_udf": {"oldValue": 2, "newValue": 3}})
    );
    for kind in ["create", "delete"] {
        let mut ev = defect_update();
        ev["event_type"] = json!(kind);
        ev.as_object_mut().unwrap().remove("before");
        let out = plugin_run("octane-format", &ev, &config);
        assert_eq!(out["payload"]["event_type"], kind, "{out}");
        assert!(
            out["payload"]["data"][0].get("changes").is_none(),
            "{kind}: {out}"
        );
        assert_eq!(out["payload"]["data"][0]["entity"]["name"], "Login fails");
    }
}

#[test]
fn check_reports_unknown_plugins_and_rejected_configs() {
    let dir = TempDir::new("check-plugins");
    dir.write(
        "rules/r.yaml",
        "rules:\n  - name: a\n    events: [create]\n    plugins: [{name: slak}]\n    webhook: {url: \"https://example.com/a\"}\n  - name: b\n    events: [create]\n    plugins:\n      - name: octane-format\n        config: {}\n    webhook: {url: \"https://example.com/b\"}\n",
    );
    let out = rulehook(&["check", dir.path().join("rules").to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let file = dir.path().join("rules/r.yaml");
    assert!(
        text.contains(&format!(
            "{}:4:22: error: unknown plugin `slak`",
            file.display()
        )),
        "{text}"
    );
    assert!(text.contains("did you mean `slack`?"), "{text}");
    assert!(
        text.contains(&format!(
            "{}:9:9: error: plugin `octane-format` rejects its config",
            file.display()
        )),
        "{text}"
    );
    assert!(text.contains("server_url"), "{text}");
}

#[test]
fn a_plugin_from_the_template_builds_and_runs() {
    let dir = TempDir::new("template");
    let out = rulehook(&[
        "plugin",
        "new",
        "my-filter",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let krate = dir.path().join("my-filter");
    // A target directory that outlives the test keeps the rebuild short.
    let target = repo().join("target/template-plugin");
    let build = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(&krate)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cargo runs");
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let component = target.join("wasm32-wasip2/release/my_filter.wasm");
    let result = plugin_run(
        component.to_str().unwrap(),
        &story_created("tpl-1"),
        &json!({}),
    );
    assert_eq!(result["outcome"], "send", "{result}");
    assert_eq!(result["payload"]["source"], "rulehook", "{result}");
    assert_eq!(result["payload"]["event_id"], "tpl-1");
    // And the template's own native tests pass.
    let test = Command::new(env!("CARGO"))
        .args(["test", "--target-dir"])
        .arg(repo().join("target/template-plugin-native"))
        .current_dir(&krate)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("cargo runs");
    assert!(
        test.status.success(),
        "{}",
        String::from_utf8_lossy(&test.stderr)
    );
}

/// Rules for the sleeping plugin: `sleepy` runs it with `config`, `fields`
/// runs select-fields (another plugin, sharing the engine's instance pool).
fn sleepy_rules(rx: &Receiver, config: &str) -> String {
    format!(
        "rules:\n  - name: sleepy\n    events: [create]\n    plugins: [{{name: sleep, config: {config}}}]\n    webhook: {{url: \"{}\"}}\n  - name: fields\n    events: [create]\n    fields: [name]\n    webhook: {{url: \"{}\"}}\n",
        rx.url("/sleepy"),
        rx.url("/fields")
    )
}

fn sleepy_server(name: &str, rx: &Receiver, rules: &str, extra: &str) -> (TempDir, Server) {
    let (dir, config) = setup(
        name,
        rules,
        &format!(
            "plugins_dir: plugins\nhttp_ports: [{}]\n{extra}",
            rx.addr.port()
        ),
    );
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(wasm("sleep"), dir.path().join("plugins/sleep.wasm")).unwrap();
    let server = Server::start(&dir, &config);
    (dir, server)
}

/// How long an answer may take when the plugin deadline is 50 ms; the
/// sleeping plugin asks for 10 s and more, so waiting for it cannot pass.
const ANSWER_BOUND: Duration = Duration::from_secs(5);

#[test]
fn a_plugin_sleeping_in_a_host_call_times_out_in_wall_time() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let (_dir, server) = sleepy_server(
        "sleep-forever",
        &rx,
        &sleepy_rules(&rx, "{forever: true, ms: 10000}"),
        "",
    );
    for round in 0..2 {
        let id = format!("sleep-{round}");
        let started = std::time::Instant::now();
        let r = server.post_event(&story_created(&id));
        let took = started.elapsed();
        assert_eq!(r.status, 202, "{}", r.text());
        assert!(
            took < ANSWER_BOUND,
            "ingest took {took:?} behind a plugin sleeping in a host call"
        );
        let list = server.deliveries(&format!("rule=sleepy&event={id}"));
        assert_eq!(list[0]["state"], "failed", "{}", list[0]);
        assert_eq!(
            list[0]["reason"], "plugin sleep timed out after 50 ms",
            "{}",
            list[0]
        );
    }
    // The other rule's plugin ran and its deliveries went out.
    let got = rx.wait_for(2, T);
    assert!(got.iter().all(|g| g.path == "/fields"), "{got:?}");
}

#[test]
fn sleeping_calls_do_not_hold_ingest_or_starve_other_plugins() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let (_dir, server) = sleepy_server(
        "sleep-many",
        &rx,
        &sleepy_rules(&rx, "{forever: false, ms: 20000}"),
        "",
    );
    const EVENTS: usize = 24;
    let server = &server;
    std::thread::scope(|s| {
        let posts: Vec<_> = (0..EVENTS)
            .map(|i| {
                s.spawn(move || {
                    let started = std::time::Instant::now();
                    let r = server.post_event(&story_created(&format!("many-{i}")));
                    (r.status, started.elapsed())
                })
            })
            .collect();
        for p in posts {
            let (status, took) = p.join().unwrap();
            assert_eq!(status, 202);
            assert!(took < ANSWER_BOUND, "ingest took {took:?}");
        }
    });
    // Sleeps take no real time, so the sleeping plugin passes every payload
    // on, and select-fields on the other rule works for every event.
    let got = rx.wait_for(2 * EVENTS, T);
    let fields = got.iter().filter(|g| g.path == "/fields").count();
    assert_eq!(fields, EVENTS, "{got:?}");
    wait_for(T, "every select-fields delivery to succeed", || {
        let list = server.deliveries("rule=fields&limit=100");
        (list.len() == EVENTS && list.iter().all(|d| d["state"] == "succeeded")).then_some(())
    });
}

#[test]
fn a_sleeping_validate_config_does_not_hold_the_reload() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let good = sleepy_rules(&rx, "{forever: false, ms: 1}");
    let (dir, server) = sleepy_server("sleep-validate", &rx, &good, "watch: false\n");
    let file = dir.path().join("rules/rules.yaml");
    std::fs::write(
        &file,
        sleepy_rules(&rx, "{in: validate, forever: true, ms: 10000}"),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let r = server.admin("POST", "/v1/rules/reload", None);
    let took = started.elapsed();
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(took < ANSWER_BOUND, "the reload took {took:?}");
    let text = r.text();
    assert!(
        text.contains("plugin `sleep` rejects its config: timed out after 50 ms"),
        "{text}"
    );
    // The reload lock is free again: the next reload goes through.
    std::fs::write(&file, &good).unwrap();
    let r = server.admin("POST", "/v1/rules/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// What the entropy plugin saw, through `rulehook plugin run`.
fn entropy_run(event: &Value) -> Value {
    let dir = TempDir::new("entropy-run");
    let event_file = dir.write("event.json", &event.to_string());
    let out = rulehook(&[
        "plugin",
        "run",
        wasm("entropy").to_str().unwrap(),
        "--event",
        event_file.to_str().unwrap(),
        "--rule",
        "entropic",
        "--config",
        "{}",
        "--format",
        "json",
    ]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_sandbox_shows_the_same_clocks_and_random_numbers_on_every_run() {
    let event = story_created("entropy-1");
    let first = entropy_run(&event);
    let second = entropy_run(&event);
    assert_eq!(first["outcome"], "send", "{first}");
    let seen = &first["payload"];
    assert_eq!(seen, &second["payload"], "two runs differ");
    // The wall clock is the documented fixed instant, 2020-01-01T00:00:00Z.
    assert_eq!(
        seen["wall_clock_ns"], 1_577_836_800_000_000_000u64,
        "{seen}"
    );
    // The 10 s sleep moved the monotonic clock, not the real one.
    let slept = seen["slept_ns"].as_u64().unwrap();
    assert!(slept >= 10_000_000_000, "{seen}");
    assert!(
        first["timing"]["first_call_ms"].as_f64().unwrap() < 5_000.0,
        "{first}"
    );
    // Random bytes come from a seed, and differ between interfaces and events.
    let random = seen["random"].as_str().unwrap();
    assert_eq!(random.len(), 32);
    assert_ne!(random, "0".repeat(32));
    assert_ne!(seen["insecure_random"], seen["random"]);
    let other = entropy_run(&story_created("entropy-2"));
    assert_ne!(other["payload"]["random"], seen["random"], "{other}");
    // stdout and stderr reach the call's log.
    let logs = first["logs"].to_string();
    assert!(
        logs.contains("entropy says hello on stdout for entropy-1"),
        "{logs}"
    );
    assert!(logs.contains("entropy says hello on stderr"), "{logs}");

    // The server sees exactly what `plugin run` saw, for the same event.
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - name: entropic\n    events: [create]\n    plugins: [{{name: entropy}}]\n    webhook: {{url: \"{}\"}}\n",
        rx.url("/entropy")
    );
    let (dir, config) = setup(
        "entropy",
        &rules,
        &format!("plugins_dir: plugins\nhttp_ports: [{}]\n", rx.addr.port()),
    );
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(wasm("entropy"), dir.path().join("plugins/entropy.wasm")).unwrap();
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&event).status, 202);
    let got = rx.wait_for(1, T);
    assert_eq!(&got[0].json(), seen);
}

#[test]
fn a_trap_reports_what_the_guest_printed_to_stderr() {
    let out = plugin_run(
        wasm("abort").to_str().unwrap(),
        &story_created("abort-1"),
        &json!({}),
    );
    assert_eq!(out["outcome"], "error", "{out}");
    let error = out["error"].as_str().unwrap();
    assert!(
        error.starts_with("plugin abort trapped: ")
            && error.contains("ValueError: the entity has no owner"),
        "{error}"
    );
    assert!(!error.contains("wasm backtrace"), "{error}");
    // A Rust panic: the panic message, not the backtrace header.
    let out = plugin_run(
        wasm("panic").to_str().unwrap(),
        &story_created("panic-1"),
        &json!({}),
    );
    let error = out["error"].as_str().unwrap();
    assert!(error.contains("boom: test panic"), "{error}");
    assert!(!error.contains("wasm backtrace"), "{error}");
}

#[test]
fn network_calls_trap_with_no_network_access() {
    for config in [json!({}), json!({"lookup": true})] {
        let out = plugin_run(
            wasm("net").to_str().unwrap(),
            &story_created("net-1"),
            &config,
        );
        assert_eq!(out["outcome"], "error", "{out}");
        assert_eq!(
            out["error"], "plugin net trapped: plugins have no network access",
            "{config}: {out}"
        );
    }
}

/// A rule's plugin entry sets its own deadline and memory cap: `check`
/// refuses one above the server's maxima, naming the key to raise, and
/// the server holds a call to the entry's own deadline.
#[test]
fn a_plugin_entry_sets_its_own_limits_within_the_maxima() {
    let dir = TempDir::new("entry-limits");
    dir.write(
        "rules/r.yaml",
        "rules:\n  - name: a\n    events: [create]\n    plugins: [{name: noop, timeout: 5s}]\n    webhook: {url: \"https://example.com/a\"}\n  - name: b\n    events: [create]\n    plugins: [{name: noop, memory: 1GiB}]\n    webhook: {url: \"https://example.com/b\"}\n",
    );
    let out = rulehook(&["check", dir.path().join("rules").to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let file = dir.path().join("rules/r.yaml");
    assert!(
        text.contains(&format!(
            "{}:4:15: error: plugin `noop`: timeout 5000 ms is above the server's plugin_timeout_max of 1000 ms",
            file.display()
        )) && text.contains("raise plugin_timeout_max in the server's config"),
        "{text}"
    );
    assert!(
        text.contains(
            "plugin `noop`: memory 1024 MiB is above the server's plugin_memory_max of 256 MiB"
        ),
        "{text}"
    );

    let rx = Receiver::start(vec![Answer::status(200)]);
    let (dir, config) = setup(
        "entry-limits-serve",
        &format!(
            "rules:\n  - name: patient\n    events: [create]\n    plugins: [{{name: spin, timeout: 120ms}}]\n    webhook: {{url: \"{}\"}}\n",
            rx.url("/patient")
        ),
        &format!("plugins_dir: plugins\nhttp_ports: [{}]\n", rx.addr.port()),
    );
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(wasm("spin"), dir.path().join("plugins/spin.wasm")).unwrap();
    let server = Server::start(&dir, &config);
    let r = server.post_event(&story_created("limits-1"));
    assert_eq!(r.status, 202, "{}", r.text());
    let list = server.deliveries("rule=patient");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["state"], "failed", "{}", list[0]);
    assert_eq!(
        list[0]["reason"], "plugin spin timed out after 120 ms",
        "{}",
        list[0]
    );
}

/// `plugin run --timeout` gives the call the deadline a rule's entry would,
/// within `plugin_timeout_max`, and refuses what the check would refuse.
#[test]
fn plugin_run_takes_an_entry_timeout_within_the_maximum() {
    let dir = TempDir::new("plugin-run-timeout");
    let event_file = dir.write("event.json", &story_created("spin-1").to_string());
    let spin = wasm("spin");
    let run = |timeout: &str| {
        rulehook(&[
            "plugin",
            "run",
            spin.to_str().unwrap(),
            "--event",
            event_file.to_str().unwrap(),
            "--timeout",
            timeout,
            "--format",
            "json",
        ])
    };
    let out = run("120ms");
    let shown: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        shown["error"], "plugin spin timed out after 120 ms",
        "{shown}"
    );
    let cases = [
        (
            "2s",
            "--timeout 2s is more than plugin_timeout_max (1000 ms)",
        ),
        (
            "soon",
            "--timeout \"soon\" is not a duration such as 200ms or 1s",
        ),
        ("0s", "is not a duration"),
    ];
    for (timeout, expected) in cases {
        let out = run(timeout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{timeout}: {err}");
        assert!(err.contains(expected), "{timeout}: {err}");
    }
}
