//! Ordered delivery (`ordering:` on a rule): one key's deliveries reach the
//! receiver one at a time, each first success in acceptance order, while
//! the receiver fails at random, while a lane is halted, across a restart
//! and a kill -9, and with three nodes on PostgreSQL with one killed.
//!
//! Events are `KEY.SEQ` (see `support::ordered`); each key's updates are
//! posted one after the other (the next once the previous got its 202), so
//! their acceptance order is SEQ. Every test is bounded by its waits.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::http::try_request;
use crate::support::ordered::{OrderedReceiver, out_of_order};
use crate::support::server::{INGEST_KEY, Server, setup};
use crate::support::{rulehook, stdout, wait_for};

fn update(key: &str, seq: u32) -> Value {
    json!({
        "id": format!("{key}.{seq}"),
        "event_type": "update",
        "entity_type": "defect",
        "entity": {"id": key, "n": seq},
        "before": {"id": key, "n": seq.saturating_sub(1)},
    })
}

/// The nodes' addresses, swapped by a test when it restarts one.
type Nodes = Arc<RwLock<Vec<SocketAddr>>>;

fn nodes_at(addrs: &[SocketAddr]) -> Nodes {
    Arc::new(RwLock::new(addrs.to_vec()))
}

/// Posts until some node answers 202 (a sender's retry: the event id
/// makes it idempotent), trying the nodes in turn from `first`.
fn post_until_accepted(nodes: &Nodes, first: usize, event: &Value) {
    let auth = format!("Bearer {INGEST_KEY}");
    let body = event.to_string();
    wait_for(
        Duration::from_secs(30),
        &format!("a 202 for {}", event["id"]),
        || {
            let nodes = nodes.read().expect("lock").clone();
            for i in 0..nodes.len() {
                let addr = nodes[(first + i) % nodes.len()];
                let r = try_request(
                    addr,
                    "POST",
                    "/v1/events",
                    &[
                        ("Authorization", &auth),
                        ("Content-Type", "application/json"),
                    ],
                    body.as_bytes(),
                );
                if matches!(r, Ok(ref r) if r.status == 202) {
                    return Some(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
            None
        },
    );
}

/// Posts `keys` × `updates` from `threads` threads, each key's updates in
/// order, the keys of a thread interleaved. `nodes` is read at every post,
/// so a test may swap a node's address (a restart) while this runs.
fn post_all(
    nodes: Nodes,
    keys: &[String],
    updates: u32,
    threads: usize,
) -> std::thread::JoinHandle<()> {
    let keys = keys.to_vec();
    std::thread::spawn(move || {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<String> = keys.iter().skip(t).step_by(threads).cloned().collect();
                let nodes = nodes.clone();
                std::thread::spawn(move || {
                    let turn = AtomicUsize::new(t);
                    for seq in 0..updates {
                        for key in &mine {
                            let first = turn.fetch_add(1, Ordering::Relaxed);
                            post_until_accepted(&nodes, first, &update(key, seq));
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a posting thread");
        }
    })
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("e{i}")).collect()
}

fn ordered_rules(rx: &OrderedReceiver, on_failure: &str, retry: &str, unordered: bool) -> String {
    let mut rules = format!(
        "rules:\n  - name: ordered\n    events: [update]\n    ordering: {{key: entity, on_failure: {on_failure}}}\n    webhook: {{url: \"{}\", retry: {retry}}}\n",
        rx.url("/ordered")
    );
    if unordered {
        rules.push_str(&format!(
            // Its failures wait longer than the next update takes to
            // come, so without ordering they are overtaken.
            "  - name: unordered\n    events: [update]\n    webhook: {{url: \"{}\", retry: {{policy: fixed, interval: 300ms, retries: 30}}}}\n",
            rx.url("/unordered")
        ));
    }
    rules
}

/// Every lane runs empty and goes (once the last attempts are recorded,
/// which is just after the receiver answered them).
fn every_lane_goes(server: &Server) {
    wait_for(Duration::from_secs(10), "every lane to run empty", || {
        let r = server.admin("GET", "/v1/lanes", None);
        assert_eq!(r.status, 200, "{}", r.text());
        (r.json()["lanes"] == json!([])).then_some(())
    });
}

fn assert_in_order(rx: &OrderedReceiver, keys: &[String], updates: u32) {
    rx.with("/ordered", |seen| {
        assert!(
            seen.overlaps.is_empty(),
            "two deliveries of one key were in flight at once: {:?}",
            &seen.overlaps[..seen.overlaps.len().min(10)]
        );
        let wrong = out_of_order(seen, keys, updates);
        assert!(
            wrong.is_empty(),
            "{} keys' first successes are not in acceptance order, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    });
}

#[test]
fn one_entitys_updates_arrive_in_acceptance_order_while_the_receiver_fails_a_fifth() {
    let rx = OrderedReceiver::start(20, Duration::from_millis(2), 0x5eed_0001);
    let retry = "{policy: fixed, interval: 50ms, retries: 30}";
    let (dir, config) = setup(
        "ordering-load",
        &ordered_rules(&rx, "skip", retry, true),
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let keys = keys(200);
    let nodes = nodes_at(&[server.addr]);
    post_all(nodes, &keys, 20, 8).join().expect("posting");
    let total = keys.len() * 20;
    wait_for(
        Duration::from_secs(120),
        "every delivery of both rules to succeed",
        || (rx.successes("/ordered") == total && rx.successes("/unordered") == total).then_some(()),
    );
    assert_in_order(&rx, &keys, 20);
    // The same events without `ordering` do arrive out of order, so the
    // check above could have failed.
    let disorder = rx.with("/unordered", |seen| out_of_order(seen, &keys, 20).len());
    assert!(
        disorder > 0,
        "the unordered rule kept every key in order; the receiver's failures did not reorder anything"
    );
    // The ordered rule's retries happened: a fifth of its requests failed.
    let failed = rx.with("/ordered", |s| {
        s.requests.iter().filter(|r| r.2 != 200).count()
    });
    assert!(failed > total / 10, "only {failed} ordered requests failed");
    every_lane_goes(&server);
}

#[test]
fn a_halted_lane_holds_only_its_key_until_an_admin_resumes_or_skips_it() {
    let rx = OrderedReceiver::start(0, Duration::ZERO, 7);
    rx.failing_keys.lock().unwrap().insert("a".into());
    let retry = "{policy: fixed, interval: 50ms, retries: 1}";
    let (dir, config) = setup(
        "ordering-halt",
        &ordered_rules(&rx, "halt", retry, false),
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let nodes = nodes_at(&[server.addr]);
    for seq in 0..5 {
        post_until_accepted(&nodes, 0, &update("a", seq));
        post_until_accepted(&nodes, 0, &update("b", seq));
    }
    // b flows while a's head fails, retries once and halts the lane.
    wait_for(Duration::from_secs(20), "key b to be delivered", || {
        (rx.successes("/ordered") == 5).then_some(())
    });
    let lane = wait_for(Duration::from_secs(20), "lane a to halt", || {
        let r = server.admin("GET", "/v1/lanes?state=halted", None);
        let lanes = r.json()["lanes"].as_array().cloned().unwrap_or_default();
        lanes.into_iter().next()
    });
    assert_eq!(lane["lane"], "ordered/defect:a", "{lane}");
    assert_eq!(lane["waiting"], 4, "{lane}");
    assert_eq!(lane["head"]["event_id"], "a.0", "{lane}");
    assert_eq!(lane["head"]["state"], "parked", "{lane}");
    let sent_a: Vec<u32> = rx.with("/ordered", |s| {
        s.requests
            .iter()
            .filter(|r| r.0 == "a")
            .map(|r| r.1)
            .collect()
    });
    assert_eq!(
        sent_a,
        vec![0, 0],
        "only a's head is sent, once and its one retry"
    );
    let metrics = server.admin("GET", "/metrics", None).text();
    for line in [
        "rulehook_lanes_held 1",
        "rulehook_lane_waiting_deliveries 4",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
    // The CLI lists it and says why it is held.
    let addr = format!("http://{}", server.addr);
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend([
            "--server",
            &addr,
            "--api-key",
            crate::support::server::ADMIN_KEY,
        ]);
        rulehook(&all)
    };
    let listed = cli(&["lanes", "list", "--state", "halted"]);
    assert!(listed.status.success(), "{listed:?}");
    let text = stdout(&listed);
    assert!(
        text.contains("ordered/defect:a") && text.contains("halted") && text.contains("waiting 4"),
        "{text}"
    );
    // A flowing lane cannot be skipped, an unknown one not resumed.
    let skip_b = server.admin(
        "POST",
        "/v1/lanes/skip",
        Some(&json!({"lane": "ordered/defect:b"})),
    );
    assert_eq!(skip_b.status, 404, "{}", skip_b.text());
    let resume_x = server.admin(
        "POST",
        "/v1/lanes/resume",
        Some(&json!({"lane": "ordered/nope"})),
    );
    assert_eq!(resume_x.status, 404, "{}", resume_x.text());
    // A waiting delivery cannot jump the queue.
    let waiting = server.deliveries("state=waiting");
    assert_eq!(waiting.len(), 4, "{waiting:?}");
    let jump = server.admin(
        "POST",
        &format!(
            "/v1/deliveries/{}/redeliver",
            waiting[0]["id"].as_str().unwrap()
        ),
        None,
    );
    assert_eq!(jump.status, 409, "{}", jump.text());
    // The receiver is fixed; resuming sends the head again, then the rest.
    rx.failing_keys.lock().unwrap().clear();
    let resumed = cli(&["lanes", "resume", "ordered/defect:a"]);
    assert!(resumed.status.success(), "{resumed:?}");
    wait_for(
        Duration::from_secs(20),
        "key a to be delivered after the resume",
        || (rx.successes("/ordered") == 10).then_some(()),
    );
    assert_in_order(&rx, &["a".into(), "b".into()], 5);
    // Halted again; this time the head is skipped: it stays failed, and
    // the next one goes.
    rx.failing_keys.lock().unwrap().insert("a".into());
    post_until_accepted(&nodes, 0, &update("a", 5));
    post_until_accepted(&nodes, 0, &update("a", 6));
    wait_for(Duration::from_secs(20), "lane a to halt again", || {
        let r = server.admin("GET", "/v1/lanes?state=halted", None);
        (r.json()["lanes"].as_array().map_or(0, Vec::len) == 1).then_some(())
    });
    rx.failing_keys.lock().unwrap().clear();
    let skipped = server.admin(
        "POST",
        "/v1/lanes/skip",
        Some(&json!({"lane": "ordered/defect:a"})),
    );
    assert_eq!(skipped.status, 200, "{}", skipped.text());
    wait_for(Duration::from_secs(20), "a.6 after the skip", || {
        rx.with("/ordered", |s| {
            s.first_successes.get("a").is_some_and(|v| v.contains(&6))
        })
        .then_some(())
    });
    let a_successes = rx.with("/ordered", |s| s.first_successes["a"].clone());
    assert_eq!(
        a_successes,
        vec![0, 1, 2, 3, 4, 6],
        "a.5 was skipped, never sent after"
    );
    let skipped_id = skipped.json()["skipped"].as_str().unwrap().to_string();
    let record = server.delivery(&skipped_id);
    assert_eq!(record["delivery"]["state"], "failed", "{record}");
    assert_eq!(record["delivery"]["event_id"], "a.5", "{record}");
    assert!(
        record["delivery"]["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("skipped by an admin"),
        "{record}"
    );
    let metrics = server.admin("GET", "/metrics", None).text();
    assert!(metrics.contains("rulehook_lanes_held 0"), "{metrics}");
}

#[test]
fn order_holds_across_a_kill_9_and_a_restart() {
    let rx = OrderedReceiver::start(20, Duration::from_millis(5), 0x5eed_0003);
    let retry = "{policy: fixed, interval: 50ms, retries: 50}";
    let (dir, config) = setup(
        "ordering-restart",
        &ordered_rules(&rx, "skip", retry, false),
        &format!("http_ports: [{}]\nshutdown_grace: 1s\n", rx.addr.port()),
    );
    let keys = keys(40);
    let total = keys.len() * 10;
    let server = Server::start(&dir, &config);
    let nodes = nodes_at(&[server.addr]);
    let posting = post_all(nodes.clone(), &keys, 10, 4);
    wait_for(Duration::from_secs(60), "a first share delivered", || {
        (rx.successes("/ordered") >= total / 5).then_some(())
    });
    server.kill();
    let server = Server::start(&dir, &config);
    *nodes.write().unwrap() = vec![server.addr];
    wait_for(
        Duration::from_secs(60),
        "half delivered after the kill -9",
        || (rx.successes("/ordered") >= total / 2).then_some(()),
    );
    let status = server.stop();
    assert!(status.success(), "{status:?}");
    let server = Server::start(&dir, &config);
    *nodes.write().unwrap() = vec![server.addr];
    posting.join().expect("posting");
    wait_for(
        Duration::from_secs(120),
        "every delivery after the restarts",
        || (rx.successes("/ordered") == total).then_some(()),
    );
    assert_in_order(&rx, &keys, 10);
    every_lane_goes(&server);
}

#[test]
fn three_nodes_on_postgres_keep_each_key_in_order_while_one_is_killed() {
    let pg = crate::support::postgres::PgServer::start("ordering-cluster");
    let url = pg.create_db("rulehook");
    // Answers take 30 ms, so the node killed below has attempts in flight,
    // whose heads wait for its lease.
    let rx = OrderedReceiver::start(20, Duration::from_millis(30), 0x5eed_0004);
    let retry = "{policy: fixed, interval: 50ms, retries: 50}";
    let files: Vec<_> = ["o1", "o2", "o3"]
        .iter()
        .map(|name| {
            setup(
                &format!("ordering-{name}"),
                &ordered_rules(&rx, "skip", retry, false),
                &format!(
                    "http_ports: [{}]\nstore: \"{url}\"\ncluster: {{node_id: {name}, lease: 5s}}\nshutdown_grace: 1s\n",
                    rx.addr.port()
                ),
            )
        })
        .collect();
    let mut servers: Vec<Server> = files.iter().map(|(d, c)| Server::start(d, c)).collect();
    let nodes = nodes_at(&servers.iter().map(|s| s.addr).collect::<Vec<_>>());
    let keys = keys(60);
    let total = keys.len() * 10;
    // Each key's updates go to the nodes in turn, so one key's lane is
    // joined through all three.
    let posting = post_all(nodes.clone(), &keys, 10, 6);
    wait_for(Duration::from_secs(60), "a third delivered", || {
        (rx.successes("/ordered") >= total / 3).then_some(())
    });
    // kill -9 one node: its claimed heads pass to the others when its
    // lease runs out, and no other delivery of those keys goes before.
    // (A live node's lease must not run out: one starved of CPU past its
    // lease may still be sending a head another node takes over, the one
    // overlap the README owns up to. 5 s keeps that out of a loaded CI run.)
    let victim = servers.remove(1);
    let gone = victim.addr;
    victim.kill();
    nodes.write().unwrap().retain(|a| *a != gone);
    posting.join().expect("posting");
    wait_for(
        Duration::from_secs(120),
        "every delivery with a node down",
        || (rx.successes("/ordered") == total).then_some(()),
    );
    assert_in_order(&rx, &keys, 10);
    every_lane_goes(&servers[0]);
}

#[test]
fn a_head_parked_on_a_blocked_endpoint_holds_its_lane_and_the_order_survives_the_unblock() {
    // Nothing listens on the port yet: the first failure blocks the
    // endpoint and the head parks there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rules = format!(
        "rules:\n  - name: ordered\n    events: [update]\n    ordering: {{}}\n    webhook: {{url: \"http://127.0.0.1:{port}/ordered\", retry: {{policy: fixed, interval: 50ms, retries: 5}}}}\n"
    );
    let (dir, config) = setup(
        "ordering-blocked",
        &rules,
        &format!("http_ports: [{port}]\nprotection: {{failures: 1, block: 1h}}\n"),
    );
    let server = Server::start(&dir, &config);
    let nodes = nodes_at(&[server.addr]);
    for seq in 0..5 {
        post_until_accepted(&nodes, 0, &update("x", seq));
    }
    let lane = wait_for(
        Duration::from_secs(20),
        "the head to park on the blocked endpoint",
        || {
            let r = server.admin("GET", "/v1/lanes?state=parked", None);
            r.json()["lanes"]
                .as_array()
                .and_then(|l| l.first().cloned())
        },
    );
    assert_eq!(
        (lane["head"]["event_id"].as_str(), lane["waiting"].as_u64()),
        (Some("x.0"), Some(4)),
        "{lane}"
    );
    // Only the head is parked; the others wait behind it, not on the endpoint.
    assert_eq!(server.deliveries("status=parked").len(), 1);
    let rx = OrderedReceiver::start_on(port, 0, Duration::ZERO, 3);
    let endpoint = format!("http://127.0.0.1:{port}");
    let unblock = server.admin(
        "POST",
        "/v1/endpoints/unblock",
        Some(&json!({"endpoint": endpoint})),
    );
    assert_eq!(unblock.status, 200, "{}", unblock.text());
    wait_for(Duration::from_secs(20), "the five in order", || {
        (rx.successes("/ordered") == 5).then_some(())
    });
    assert_in_order(&rx, &["x".into()], 5);
}

#[test]
fn the_lanes_api_pages_in_lane_order_and_refuses_bad_input_by_name() {
    let rx = OrderedReceiver::start(0, Duration::ZERO, 9);
    rx.failing_keys
        .lock()
        .unwrap()
        .extend(["c".to_string(), "d".to_string()]);
    let (dir, config) = setup(
        "ordering-lanes-api",
        &ordered_rules(&rx, "halt", "{policy: none}", false),
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let nodes = nodes_at(&[server.addr]);
    for key in ["d", "c"] {
        post_until_accepted(&nodes, 0, &update(key, 0));
    }
    wait_for(Duration::from_secs(20), "both lanes to halt", || {
        let r = server.admin("GET", "/v1/lanes?state=halted", None);
        (r.json()["lanes"].as_array().map_or(0, Vec::len) == 2).then_some(())
    });
    // One lane a page, in lane order, `next_after` going on.
    let first = server.admin("GET", "/v1/lanes?limit=1", None).json();
    assert_eq!(first["lanes"][0]["lane"], "ordered/defect:c", "{first}");
    assert_eq!(first["next_after"], "ordered/defect:c", "{first}");
    let second = server
        .admin("GET", "/v1/lanes?limit=1&after=ordered/defect:c", None)
        .json();
    assert_eq!(second["lanes"][0]["lane"], "ordered/defect:d", "{second}");
    assert_eq!(second["next_after"], Value::Null, "{second}");
    let by_rule = server.admin("GET", "/v1/lanes?rule=other", None).json();
    assert_eq!(by_rule["lanes"], json!([]), "{by_rule}");
    // Bad input: refused with the field named, nothing changed.
    for (path, field) in [
        ("/v1/lanes?state=stuck", "state"),
        ("/v1/lanes?limit=0", "limit"),
        ("/v1/lanes?limit=many", "limit"),
        ("/v1/lanes?sort=key", "sort"),
    ] {
        let r = server.admin("GET", path, None);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert_eq!(r.json()["error"]["field"], field, "{path}: {}", r.text());
    }
    for body in [json!({}), json!({"lane": 7}), json!(["ordered/defect:c"])] {
        let r = server.admin("POST", "/v1/lanes/skip", Some(&body));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["field"], "lane", "{}", r.text());
    }
    // Skipping a halted lane with nothing behind its head empties it.
    let skipped = server.admin(
        "POST",
        "/v1/lanes/skip",
        Some(&json!({"lane": "ordered/defect:c"})),
    );
    assert_eq!(skipped.status, 200, "{}", skipped.text());
    assert_eq!(skipped.json()["next"], Value::Null, "{}", skipped.text());
    let left = server.admin("GET", "/v1/lanes", None).json();
    let names: Vec<&str> = left["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lane"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ordered/defect:d"]);
    for verb in ["resume", "skip"] {
        let r = server.admin(
            "POST",
            &format!("/v1/lanes/{verb}"),
            Some(&json!({"lane": "ordered/defect:c"})),
        );
        assert_eq!(r.status, 404, "{verb} of an emptied lane: {}", r.text());
    }
}
