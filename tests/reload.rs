//! Hot reload under a running server: files edited the ways editors and
//! deploys do while events are posted; every accepted event is matched by
//! one rule set, old or new, never a mix, and none is lost; a broken file
//! keeps the old rules and is reported with its location; SIGHUP, the API
//! and replaced plugins.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{Server, setup};
use crate::support::wait_for;

const T: Duration = Duration::from_secs(30);

fn event(id: &str) -> Value {
    json!({"id": id, "event_type": "create", "entity_type": "story",
        "scope": {"workspace_id": 1002}, "entity": {"id": id, "name": "A story"}})
}

/// A rules file with one rule per name, all matching story creations.
fn rules_yaml(names: &[&str], rx: &Receiver) -> String {
    let mut s = String::from("rules:\n");
    for n in names {
        s.push_str(&format!(
            "  - name: {n}\n    events: [create]\n    webhook: {{url: \"{}\"}}\n",
            rx.url(&format!("/{n}"))
        ));
    }
    s
}

fn rule_names(server: &Server) -> BTreeSet<String> {
    let r = server.admin("GET", "/v1/rules", None);
    r.json()["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str().map(str::to_string))
        .collect()
}

fn wait_rules(server: &Server, names: &[&str]) {
    let want: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
    wait_for(T, &format!("rules {want:?} to run"), || {
        (rule_names(server) == want).then_some(())
    });
}

fn last_reload(server: &Server) -> Value {
    server.admin("GET", "/v1/rules", None).json()["last_reload"].clone()
}

/// Replaces `path` the way most editors save: write a temp file, rename.
fn save_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Truncates then writes in two halves with a pause, as a slow in-place
/// save does: the half-written file is briefly on disk.
fn save_in_place_slowly(path: &Path, text: &str) {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).unwrap();
    let (a, b) = text.split_at(text.len() / 2);
    f.write_all(a.as_bytes()).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    f.write_all(b.as_bytes()).unwrap();
}

#[test]
fn edits_under_load_match_old_or_new_rules_never_a_mix() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let (dir, config) = setup(
        "reload-load",
        &rules_yaml(&["v1-x", "v1-y"], &rx),
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Arc::new(Server::start(&dir, &config));
    let file = dir.path().join("rules/rules.yaml");

    let stop = Arc::new(AtomicBool::new(false));
    let poster = {
        let (server, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut accepted = Vec::new();
            let mut i = 0;
            // Bounded: stops when told, or after 5,000 events.
            while !stop.load(Ordering::Relaxed) && i < 5000 {
                let id = format!("ev-{i}");
                let r = server.post_event(&event(&id));
                assert_eq!(r.status, 202, "{}", r.text());
                accepted.push(id);
                i += 1;
            }
            accepted
        })
    };

    std::thread::sleep(Duration::from_millis(300));
    save_by_rename(&file, &rules_yaml(&["v2-x", "v2-y"], &rx));
    wait_rules(&server, &["v2-x", "v2-y"]);
    save_in_place_slowly(&file, &rules_yaml(&["v3-x", "v3-y"], &rx));
    wait_rules(&server, &["v3-x", "v3-y"]);
    dir.write("rules/extra.yaml", &rules_yaml(&["extra-z"], &rx));
    wait_rules(&server, &["v3-x", "v3-y", "extra-z"]);
    std::fs::remove_file(dir.path().join("rules/extra.yaml")).unwrap();
    wait_rules(&server, &["v3-x", "v3-y"]);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let accepted = poster.join().unwrap();
    assert!(accepted.len() > 20, "only {} events posted", accepted.len());

    // The slow in-place save is not left reported as broken.
    assert_eq!(last_reload(&server)["ok"], true, "{}", last_reload(&server));

    let sets: [&[&str]; 4] = [
        &["v1-x", "v1-y"],
        &["v2-x", "v2-y"],
        &["v3-x", "v3-y"],
        &["extra-z", "v3-x", "v3-y"],
    ];
    let mut seen = BTreeSet::new();
    for id in &accepted {
        let rules: BTreeSet<String> = server
            .deliveries(&format!("event={id}"))
            .iter()
            .map(|d| d["rule"].as_str().unwrap_or_default().to_string())
            .collect();
        let names: Vec<&str> = rules.iter().map(String::as_str).collect();
        let which = sets.iter().position(|s| *s == names.as_slice());
        assert!(
            which.is_some(),
            "event {id} was matched by {names:?}: a mix or a loss"
        );
        seen.insert(which.unwrap());
    }
    // The posting overlapped the changes: old and new sets both matched.
    assert!(
        seen.contains(&0) && seen.contains(&2),
        "sets seen: {seen:?}"
    );
}

#[test]
fn a_broken_file_keeps_the_old_rules_and_is_reported() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let (dir, config) = setup(
        "reload-broken",
        &rules_yaml(&["good"], &rx),
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let file = dir.path().join("rules/rules.yaml");
    save_by_rename(
        &file,
        "rules:\n  - name: changed\n    events: [create]\n    entity_type: [story]\n    webhook: {url: \"https://example.com\"}\n",
    );
    let report = wait_for(T, "the failed reload to be reported", || {
        let r = last_reload(&server);
        (r["ok"] == false).then_some(r)
    });
    let d = &report["diagnostics"][0];
    assert_eq!(d["file"], file.display().to_string(), "{report}");
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(4), Some(5)),
        "{report}"
    );
    assert!(
        d["message"].as_str().unwrap().contains("entity_type"),
        "{report}"
    );
    let metrics = server.admin("GET", "/metrics", None).text();
    assert!(
        metrics.contains("rulehook_rules_last_reload_ok 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rulehook_rule_reloads_total{outcome=\"failed\"} 1"),
        "{metrics}"
    );

    // The old rules still serve.
    assert_eq!(server.post_event(&event("while-broken")).status, 202);
    let got = rx.wait_for(1, T);
    assert_eq!(got[0].path, "/good");

    // Fixing the file reloads on its own.
    save_by_rename(&file, &rules_yaml(&["fixed"], &rx));
    wait_rules(&server, &["fixed"]);
    assert_eq!(last_reload(&server)["ok"], true);
    assert_eq!(server.post_event(&event("after-fix")).status, 202);
    let got = rx.wait_for(2, T);
    assert_eq!(got[1].path, "/fixed");
}

#[test]
fn sighup_and_the_api_reload_when_watching_is_off() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let (dir, config) = setup(
        "reload-signal",
        &rules_yaml(&["first"], &rx),
        &format!("watch: false\nhttp_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let file = dir.path().join("rules/rules.yaml");

    save_by_rename(&file, &rules_yaml(&["second"], &rx));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(rule_names(&server), BTreeSet::from(["first".to_string()]));
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status();
    wait_rules(&server, &["second"]);
    assert_eq!(last_reload(&server)["trigger"], "signal");

    save_by_rename(&file, &rules_yaml(&["third"], &rx));
    let r = server.admin("POST", "/v1/rules/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["reload"]["ok"], true);
    assert_eq!(r.json()["reload"]["trigger"], "api");
    assert_eq!(rule_names(&server), BTreeSet::from(["third".to_string()]));

    save_by_rename(&file, "rules: [oops");
    let r = server.admin("POST", "/v1/rules/reload", None);
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["reload"]["ok"], false);
    assert_eq!(rule_names(&server), BTreeSet::from(["third".to_string()]));
}

#[test]
fn a_plugin_replaced_on_disk_is_recompiled_and_used() {
    let wasm = |name: &str| Path::new(env!("RULEHOOK_WASM_DIR")).join(format!("{name}.wasm"));
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - name: shaped\n    events: [create]\n    plugins: [{{name: shape}}]\n    webhook: {{url: \"{}\"}}\n",
        rx.url("/shaped")
    );
    let (dir, config) = setup(
        "reload-plugin",
        &rules,
        &format!("plugins_dir: plugins\nhttp_ports: [{}]\n", rx.addr.port()),
    );
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let shape = dir.path().join("plugins/shape.wasm");
    std::fs::copy(wasm("noop"), &shape).unwrap();
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&event("before")).status, 202);
    assert_eq!(rx.wait_for(1, T)[0].json()["event_id"], "before");

    // A plugin that does not compile is refused; the old one keeps serving.
    let before_broken = last_reload(&server);
    std::fs::write(&shape, b"\0asm but not really").unwrap();
    let report = wait_for(T, "the broken plugin to be reported", || {
        let r = last_reload(&server);
        (r["loads"] != before_broken["loads"] && r["ok"] == false).then_some(r)
    });
    assert_eq!(
        report["diagnostics"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(
        report["diagnostics"][0]["file"],
        shape.display().to_string(),
        "{report}"
    );
    assert!(
        report["diagnostics"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("plugin shape is not a valid component"),
        "{report}"
    );
    assert_eq!(server.post_event(&event("while-broken")).status, 202);
    assert_eq!(rx.wait_for(2, T)[1].json()["event_id"], "while-broken");

    let old_hash = last_reload(&server);
    let tmp = dir.path().join("plugins/shape.wasm.part");
    std::fs::copy(wasm("read-env"), &tmp).unwrap();
    std::fs::rename(&tmp, &shape).unwrap();
    wait_for(T, "the new plugin to load", || {
        let r = server.admin("GET", "/v1/rules", None).json();
        (r["last_reload"]["loads"] != old_hash["loads"] && r["last_reload"]["ok"] == true)
            .then_some(())
    });
    assert_eq!(server.post_event(&event("after")).status, 202);
    assert_eq!(
        rx.wait_for(3, T)[2].json(),
        json!({"home": null, "vars": 0})
    );
}

#[test]
fn many_changes_at_once_are_one_reload() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let (dir, config) = setup(
        "reload-burst",
        &rules_yaml(&["base"], &rx),
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let before = last_reload(&server)["loads"].as_u64().expect("loads");
    // A deploy copying twelve files, well within the 300 ms quiet period.
    let mut names = vec!["base".to_string()];
    for i in 0..12 {
        let name = format!("burst-{i}");
        dir.write(&format!("rules/{name}.yaml"), &rules_yaml(&[&name], &rx));
        names.push(name);
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    wait_rules(&server, &names);
    // Quiet long enough for a second, stray reload to have happened.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(last_reload(&server)["loads"].as_u64(), Some(before + 1));
}

#[test]
fn a_plugin_dropped_into_a_new_plugins_directory_is_picked_up() {
    let wasm = |name: &str| Path::new(env!("RULEHOOK_WASM_DIR")).join(format!("{name}.wasm"));
    let rx = Receiver::start(vec![Answer::status(200)]);
    let (dir, config) = setup(
        "reload-new-plugin-dir",
        &rules_yaml(&["plain"], &rx),
        &format!("plugins_dir: plugins\nhttp_ports: [{}]\n", rx.addr.port()),
    );
    // The directory does not exist yet: the server creates and watches it.
    let plugins = dir.path().join("plugins");
    assert!(!plugins.exists());
    let server = Server::start(&dir, &config);
    assert!(plugins.is_dir());

    // A rule naming a plugin that is not there yet is refused...
    let rules = format!(
        "rules:\n  - name: late\n    events: [create]\n    plugins: [{{name: late}}]\n    webhook: {{url: \"{}\"}}\n",
        rx.url("/late")
    );
    save_by_rename(&dir.path().join("rules/rules.yaml"), &rules);
    wait_for(T, "the unknown plugin to be reported", || {
        (last_reload(&server)["ok"] == false).then_some(())
    });
    assert_eq!(rule_names(&server), BTreeSet::from(["plain".to_string()]));

    // ...until the plugin arrives: its own change reloads, and the rule runs.
    let tmp = plugins.join("late.wasm.part");
    std::fs::copy(wasm("read-env"), &tmp).unwrap();
    std::fs::rename(&tmp, plugins.join("late.wasm")).unwrap();
    wait_rules(&server, &["late"]);
    assert_eq!(server.post_event(&event("late-1")).status, 202);
    assert_eq!(
        rx.wait_for(1, T)[0].json(),
        json!({"home": null, "vars": 0})
    );
}

/// Generation `g` of the rule set: one rule, `name`, that selects only the
/// entity field `g{g}` and posts to `/{name}/{g}`. A body built under
/// generation `g` therefore names its generation, and so does the path it
/// arrives at: the two must agree.
fn generation(name: &str, g: usize, rx: &Receiver) -> String {
    format!(
        "rules:\n  - name: {name}\n    events: [create]\n    fields: [g{g}]\n    webhook: {{url: \"{}\"}}\n",
        rx.url(&format!("/{name}/{g}"))
    )
}

fn generation_event(id: &str) -> Value {
    let mut entity = serde_json::Map::new();
    entity.insert("id".into(), json!(id));
    for g in 1..=8 {
        entity.insert(format!("g{g}"), json!(g));
    }
    json!({"id": id, "event_type": "create", "entity_type": "story",
        "scope": {"workspace_id": 1002}, "entity": entity})
}

/// Events are posted in a tight loop while the one rule is renamed, changed
/// (same name, new URL and fields) and removed, by file edits and by
/// `POST /v1/rules/reload`. Every event that got its 202 is delivered, once
/// per delivery id, to the target the rule that matched it named then, and
/// none fails for a rule that is gone. A slow receiver keeps a queue of
/// accepted deliveries pending across every swap.
#[test]
fn accepted_deliveries_keep_the_rule_version_that_matched_them() {
    let rx = Receiver::start(vec![Answer::status(200).after(Duration::from_millis(5))]);
    // (name, generation): renamed, changed in place, removed and replaced,
    // an old name brought back with new content.
    let gens = [
        ("a", 1),
        ("b", 2),
        ("b", 3),
        ("c", 4),
        ("c", 5),
        ("a", 6),
        ("d", 7),
        ("d", 8),
    ];
    let (dir, config) = setup(
        "reload-binding",
        &generation("a", 1, &rx),
        &format!(
            "http_ports: [{}]\nmax_in_flight_per_endpoint: 2\n",
            rx.addr.port()
        ),
    );
    let server = Arc::new(Server::start(&dir, &config));
    let file = dir.path().join("rules/rules.yaml");

    let stop = Arc::new(AtomicBool::new(false));
    let poster = {
        let (server, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut accepted = Vec::new();
            let mut i = 0;
            // Bounded: stops when told, or after 2,500 events.
            while !stop.load(Ordering::Relaxed) && i < 2500 {
                let r = server.post_event(&generation_event(&format!("ev-{i}")));
                assert_eq!(r.status, 202, "{}", r.text());
                for d in r.json()["deliveries"].as_array().unwrap() {
                    accepted.push(d.as_str().unwrap().to_string());
                }
                i += 1;
            }
            accepted
        })
    };
    let urls = |server: &Server| -> Vec<String> {
        server.admin("GET", "/v1/rules", None).json()["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["url"].as_str().map(str::to_string))
            .collect()
    };
    std::thread::sleep(Duration::from_millis(200));
    for (i, (name, g)) in gens.iter().enumerate().skip(1) {
        save_by_rename(&file, &generation(name, *g, &rx));
        if i % 2 == 0 {
            // Ask at once instead of waiting for the watcher's debounce.
            let r = server.admin("POST", "/v1/rules/reload", None);
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let want = vec![rx.url(&format!("/{name}/{g}"))];
        wait_for(T, &format!("generation {g} to run"), || {
            (urls(&server) == want).then_some(())
        });
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, Ordering::Relaxed);
    let accepted = poster.join().unwrap();
    assert!(accepted.len() > 50, "only {} deliveries", accepted.len());

    // Until nothing is left to send (a delivery that failed never arrives).
    wait_for(Duration::from_secs(180), "the queue to drain", || {
        server
            .deliveries("status=pending&limit=1")
            .is_empty()
            .then_some(())
    });
    let failed = server.deliveries("status=failed&limit=5");
    assert!(failed.is_empty(), "deliveries failed: {failed:?}");
    let got = rx.received();
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for r in &got {
        let id = r.header("X-Rulehook-Delivery").unwrap().to_string();
        assert!(seen.insert(id.clone()), "{id} arrived twice");
        let body = r.json();
        let built_under: Vec<String> = body["entity"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with('g'))
            .cloned()
            .collect();
        let sent_to = r.path.trim_start_matches('/').to_string();
        let expected = format!(
            "{}/{}",
            body["rule"].as_str().unwrap(),
            built_under.join(",").trim_start_matches('g')
        );
        if sent_to != expected {
            wrong.push(format!("{id}: built as {expected}, sent to /{sent_to}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} deliveries went where the rule said after their acceptance: {:?}",
        wrong.len(),
        got.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(seen.len(), accepted.len());
}

/// A renamed or changed rule's pending deliveries keep the version that
/// matched them across a restart too (the version is read back from the
/// store, its `{file:}` secret resolved again), and an admin can choose to
/// send one with the rule as it runs now instead.
#[test]
fn a_retired_rule_version_outlives_a_restart_and_redeliver_can_follow_the_rule() {
    use hmac::{Hmac, Mac};
    let old_rx = Receiver::start(vec![
        Answer::status(500),
        Answer::status(500),
        Answer::status(200),
    ]);
    let new_rx = Receiver::start(vec![Answer::status(200)]);
    let v1 = format!(
        "rules:\n  - name: old\n    events: [create]\n    webhook:\n      url: \"{}\"\n      secret: {{file: old.secret}}\n      retry: {{policy: fixed, interval: 2s, retries: 3}}\n  - name: same\n    events: [create]\n    webhook:\n      url: \"{}\"\n      retry: {{policy: fixed, interval: 60s, retries: 3}}\n",
        old_rx.url("/old"),
        old_rx.url("/same")
    );
    let v2 = format!(
        "rules:\n  - name: new\n    events: [create]\n    webhook: {{url: \"{}\"}}\n  - name: same\n    events: [create]\n    webhook: {{url: \"{}\"}}\n",
        new_rx.url("/new"),
        new_rx.url("/same")
    );
    let (dir, config) = setup(
        "reload-retired",
        &v1,
        &format!(
            "http_ports: [{}, {}]\n",
            old_rx.addr.port(),
            new_rx.addr.port()
        ),
    );
    dir.write("rules/old.secret", "old-signing-secret-0123\n");
    let server = Server::start(&dir, &config);
    let r = server.post_event(&event("evt-retired"));
    assert_eq!(r.status, 202, "{}", r.text());
    let by_rule = |server: &Server, rule: &str| -> String {
        server.deliveries(&format!("event=evt-retired&rule={rule}"))[0]["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (d_old, d_same) = (by_rule(&server, "old"), by_rule(&server, "same"));
    // Both first attempts got a 500 and wait for their retry.
    old_rx.wait_for(2, T);
    save_by_rename(&dir.path().join("rules/rules.yaml"), &v2);
    wait_rules(&server, &["new", "same"]);
    assert!(server.stop().success());

    let server = Server::start(&dir, &config);
    // The retry goes where `old` said, signed with its secret, and says so.
    let got = old_rx.wait_for(3, T);
    let retry = &got[2];
    assert_eq!(retry.path, "/old");
    assert_eq!(retry.header("X-Rulehook-Delivery"), Some(d_old.as_str()));
    assert_eq!(retry.header("X-Rulehook-Rule"), Some("old"));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"old-signing-secret-0123").unwrap();
    mac.update(&retry.body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        retry.header("X-Rulehook-Signature"),
        Some(format!("sha256={hex}").as_str())
    );
    wait_for(T, "the old rule's delivery to succeed", || {
        (server.delivery(&d_old)["delivery"]["state"] == "succeeded").then_some(())
    });
    let shown = server.delivery(&d_old);
    assert_eq!(shown["bound_to"]["running"], false, "{shown}");
    assert_eq!(shown["bound_to"]["rule"], "old", "{shown}");
    assert_eq!(shown["bound_to"]["url"], old_rx.url("/old"), "{shown}");

    // `old` was renamed: there is no running rule of that name to follow.
    let r = server.admin(
        "POST",
        &format!("/v1/deliveries/{d_old}/redeliver?rule=current"),
        None,
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("not in the running set"), "{}", r.text());
    let r = server.admin(
        "POST",
        &format!("/v1/deliveries/{d_same}/redeliver?rule=sideways"),
        None,
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // `same` kept its name: its pending retry can be sent as it is now.
    let r = server.admin(
        "POST",
        &format!("/v1/deliveries/{d_same}/redeliver?rule=current"),
        None,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let got = new_rx.wait_for(1, T);
    assert_eq!(got[0].path, "/same");
    assert_eq!(got[0].header("X-Rulehook-Delivery"), Some(d_same.as_str()));
    let shown = server.delivery(&d_same);
    assert_eq!(shown["bound_to"]["running"], true, "{shown}");
    assert_eq!(
        old_rx.received().len(),
        3,
        "nothing else went to the old URL"
    );
}
