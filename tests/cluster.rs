//! Cluster mode with real parts: PostgreSQL servers started for the test
//! (`support::postgres`), several real `rulehook serve` nodes on one
//! database, a receiver, and faults: nodes killed and paused, the
//! database restarted, the primary killed and a standby promoted.
//!
//! Each test is bounded: load runs for a few seconds, waits have timeouts.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::TempDir;
use crate::support::http::{request, try_request};
use crate::support::postgres::PgServer;
use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{INGEST_KEY, Server, setup};
use crate::support::wait_for;

fn event(id: &str) -> Value {
    json!({"id": id, "event_type": "create", "entity_type": "story", "entity": {"id": id}})
}

/// One rule to the receiver, retried quickly.
fn rules(rx: &Receiver) -> String {
    format!(
        "rules:\n  - {{name: mirror, events: [create], webhook: {{url: \"{}\", retry: {{policy: fixed, interval: 200ms, retries: 30}}}}}}\n",
        rx.url("/hook")
    )
}

/// A node's files: rules, data dir and a config on the shared database.
struct NodeFiles {
    dir: TempDir,
    config: std::path::PathBuf,
}

fn node_files(name: &str, url: &str, rx: &Receiver, lease: &str) -> NodeFiles {
    let (dir, config) = setup(
        name,
        &rules(rx),
        &format!(
            "http_ports: [{}]\nstore: \"{url}\"\ncluster: {{node_id: {name}, lease: {lease}}}\nshutdown_grace: 1s\n",
            rx.addr.port()
        ),
    );
    NodeFiles { dir, config }
}

fn start(files: &NodeFiles) -> Server {
    Server::start(&files.dir, &files.config)
}

/// Posts `id` to `addr`: `Some(status)`, or `None` when the node is gone.
fn post(addr: SocketAddr, id: &str) -> Option<u16> {
    let auth = format!("Bearer {INGEST_KEY}");
    try_request(
        addr,
        "POST",
        "/v1/events",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        event(id).to_string().as_bytes(),
    )
    .ok()
    .map(|r| r.status)
}

/// Event ids the receiver got, with how many times each delivery id came.
fn received(rx: &Receiver) -> (HashSet<String>, HashMap<String, usize>) {
    let mut events = HashSet::new();
    let mut per_delivery = HashMap::new();
    for r in rx.received() {
        events.insert(
            r.json()["event_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        *per_delivery
            .entry(
                r.header("X-Rulehook-Delivery")
                    .unwrap_or_default()
                    .to_string(),
            )
            .or_default() += 1;
    }
    (events, per_delivery)
}

/// Every delivery record, through `server`'s admin API.
fn all_deliveries(server: &Server) -> Vec<Value> {
    let mut out = Vec::new();
    let mut before = String::new();
    loop {
        let page = server.deliveries(&format!("limit=1000{before}"));
        out.extend(page.iter().cloned());
        if page.len() < 1000 {
            return out;
        }
        before = format!("&before={}", page.last().unwrap()["id"].as_str().unwrap());
    }
}

/// Waits until every event of `accepted` reached the receiver and every
/// record says succeeded; then checks the records against what arrived:
/// one delivery per event, each recorded success one the receiver got.
fn assert_all_delivered(server: &Server, rx: &Receiver, accepted: &[String]) {
    let want: HashSet<String> = accepted.iter().cloned().collect();
    wait_for(
        Duration::from_secs(90),
        "every accepted event at the receiver",
        || {
            let (got, _) = received(rx);
            want.is_subset(&got).then_some(())
        },
    );
    let records = wait_for(
        Duration::from_secs(60),
        "every delivery record to succeed",
        || {
            let list = all_deliveries(server);
            (list.len() >= want.len() && list.iter().all(|d| d["state"] == "succeeded"))
                .then_some(list)
        },
    );
    let (_, per_delivery) = received(rx);
    let mut per_event: HashMap<&str, usize> = HashMap::new();
    for d in &records {
        *per_event
            .entry(d["event_id"].as_str().unwrap())
            .or_default() += 1;
        let id = d["id"].as_str().unwrap();
        assert!(
            per_delivery.get(id).copied().unwrap_or(0) >= 1,
            "{id} is recorded as succeeded but the receiver never got it"
        );
    }
    for id in accepted {
        assert_eq!(per_event.get(id.as_str()), Some(&1), "deliveries of {id}");
    }
}

#[test]
fn nodes_on_one_database_share_the_work_and_see_every_delivery() {
    let pg = PgServer::start("cluster-basic");
    let url = pg.create_db("rulehook");
    let rx = Receiver::start(vec![Answer::status(200)]);
    let files: Vec<NodeFiles> = ["n1", "n2"]
        .iter()
        .map(|n| node_files(n, &url, &rx, "3s"))
        .collect();
    let nodes: Vec<Server> = files.iter().map(start).collect();
    let mut accepted = Vec::new();
    for i in 0..40 {
        let id = format!("basic-{i}");
        assert_eq!(post(nodes[i % 2].addr, &id), Some(202));
        accepted.push(id);
    }
    // Any node lists every delivery, whichever node accepted it.
    assert_all_delivered(&nodes[1], &rx, &accepted);
    assert_eq!(all_deliveries(&nodes[0]).len(), 40);
    // Both nodes know each other and agree on the rules.
    let cluster = wait_for(Duration::from_secs(10), "both nodes listed", || {
        let v = nodes[0].admin("GET", "/v1/cluster", None).json();
        (v["nodes"].as_array().map_or(0, |n| n.len()) == 2).then_some(v)
    });
    assert_eq!(cluster["store"], "postgres");
    assert_eq!(cluster["rule_sets"], 1, "{cluster}");
    assert!(
        cluster["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["alive"] == true)
    );
    // An event id already accepted by one node is a duplicate at the other.
    let again = nodes[1].post_event(&event("basic-0"));
    assert_eq!(again.status, 202);
    assert_eq!(again.json()["duplicate"], true);
}

#[test]
fn the_same_event_posted_to_every_node_at_once_makes_one_set_of_deliveries() {
    let pg = PgServer::start("cluster-same");
    let url = pg.create_db("rulehook");
    let rx = Receiver::start(vec![Answer::status(200)]);
    let files: Vec<NodeFiles> = ["s1", "s2", "s3"]
        .iter()
        .map(|n| node_files(n, &url, &rx, "3s"))
        .collect();
    let nodes: Vec<Server> = files.iter().map(start).collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let mut ids = Vec::new();
    for round in 0..15 {
        let id = format!("same-{round}");
        let answers: Vec<Value> = std::thread::scope(|s| {
            let hs: Vec<_> = addrs
                .iter()
                .map(|&a| {
                    let id = id.clone();
                    s.spawn(move || {
                        let auth = format!("Bearer {INGEST_KEY}");
                        try_request(
                            a,
                            "POST",
                            "/v1/events",
                            &[("Authorization", &auth)],
                            event(&id).to_string().as_bytes(),
                        )
                        .expect("posted")
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    let r = h.join().unwrap();
                    assert_eq!(r.status, 202, "{}", r.text());
                    r.json()
                })
                .collect()
        });
        let sets: HashSet<String> = answers
            .iter()
            .map(|a| a["deliveries"].to_string())
            .collect();
        assert_eq!(
            sets.len(),
            1,
            "nodes answered different deliveries: {answers:?}"
        );
        assert_eq!(
            answers.iter().filter(|a| a["duplicate"] == false).count(),
            1,
            "exactly one node created them: {answers:?}"
        );
        ids.push(id);
    }
    assert_all_delivered(&nodes[0], &rx, &ids);
}

/// Posts from four threads to whichever nodes are up, for `for_how_long`;
/// returns the ids that got a 202 and whether any other answer than 202 or
/// 503 came.
fn load(
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    prefix: &str,
    for_how_long: Duration,
) -> (Vec<String>, Vec<u16>) {
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let odd = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (addrs, accepted, odd) = (addrs.clone(), accepted.clone(), odd.clone());
            s.spawn(move || {
                let mut i = 0;
                while started.elapsed() < for_how_long {
                    let list = addrs.lock().unwrap().clone();
                    let addr = list[(i + t) % list.len()];
                    let id = format!("{prefix}-{t}-{i}");
                    match post(addr, &id) {
                        Some(202) => accepted.lock().unwrap().push(id),
                        Some(503) | None => std::thread::sleep(Duration::from_millis(20)),
                        Some(other) => odd.lock().unwrap().push(other),
                    }
                    i += 1;
                }
            });
        }
    });
    let a = accepted.lock().unwrap().clone();
    let o = odd.lock().unwrap().clone();
    (a, o)
}

#[test]
fn killing_nodes_under_load_loses_no_accepted_event() {
    let pg = PgServer::start("cluster-kill");
    let url = pg.create_db("rulehook");
    let rx = Receiver::start(vec![Answer::status(200).after(Duration::from_millis(20))]);
    let files: Vec<NodeFiles> = ["k1", "k2", "k3"]
        .iter()
        .map(|n| node_files(n, &url, &rx, "2s"))
        .collect();
    let nodes: Arc<Mutex<Vec<Option<Server>>>> =
        Arc::new(Mutex::new(files.iter().map(|f| Some(start(f))).collect()));
    let addrs = Arc::new(Mutex::new(
        nodes
            .lock()
            .unwrap()
            .iter()
            .map(|n| n.as_ref().unwrap().addr)
            .collect::<Vec<_>>(),
    ));
    let done = Arc::new(AtomicBool::new(false));
    // Every 1.5 s one node is killed (kill -9) and started again.
    let killer = {
        let (nodes, addrs, done) = (nodes.clone(), addrs.clone(), done.clone());
        let files: Vec<(std::path::PathBuf, std::path::PathBuf)> = files
            .iter()
            .map(|f| (f.dir.path().to_path_buf(), f.config.clone()))
            .collect();
        std::thread::spawn(move || {
            let mut victim = 0;
            let mut kills = 0;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1500));
                let old = nodes.lock().unwrap()[victim].take();
                if let Some(n) = old {
                    n.kill();
                    kills += 1;
                }
                let dir = TempDir(files[victim].0.clone());
                let fresh = Server::start(&dir, &files[victim].1);
                std::mem::forget(dir); // the test's NodeFiles owns the directory
                addrs.lock().unwrap()[victim] = fresh.addr;
                nodes.lock().unwrap()[victim] = Some(fresh);
                victim = (victim + 1) % 3;
            }
            kills
        })
    };
    let (accepted, odd) = load(addrs.clone(), "kill", Duration::from_secs(7));
    done.store(true, Ordering::Relaxed);
    let kills = killer.join().unwrap();
    assert!(kills >= 3, "only {kills} kills");
    assert!(odd.is_empty(), "answers other than 202/503: {odd:?}");
    assert!(accepted.len() > 100, "only {} accepted", accepted.len());
    let nodes = nodes.lock().unwrap();
    assert_all_delivered(nodes[0].as_ref().unwrap(), &rx, &accepted);
}

#[test]
fn a_paused_node_that_lost_its_lease_cannot_overwrite_the_record_of_the_node_that_took_over() {
    let pg = PgServer::start("cluster-pause");
    let url = pg.create_db("rulehook");
    // Slow answers keep the paused node's attempts in flight.
    let rx = Receiver::start(vec![Answer::status(200).after(Duration::from_millis(800))]);
    let fa = node_files("pa", &url, &rx, "2s");
    let fb = node_files("pb", &url, &rx, "2s");
    let a = start(&fa);
    let mut accepted = Vec::new();
    for i in 0..10 {
        let id = format!("pause-{i}");
        assert_eq!(post(a.addr, &id), Some(202));
        accepted.push(id);
    }
    // A's attempts are on the wire: pause it for longer than its lease.
    wait_for(
        Duration::from_secs(10),
        "A's first attempts to arrive",
        || (!rx.received().is_empty()).then_some(()),
    );
    let b = start(&fb);
    let pid = a.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    // B takes the deliveries over once A's leases run out, and sends them.
    let want: HashSet<String> = accepted.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let by_b: HashSet<String> = all_deliveries(&b)
            .iter()
            .filter(|d| d["state"] == "succeeded")
            .map(|d| d["event_id"].as_str().unwrap().to_string())
            .collect();
        if want.is_subset(&by_b) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    // A wakes up, its old attempts end; their results must be refused.
    let lost = wait_for(
        Duration::from_secs(20),
        "A to report refused results",
        || {
            let m = a.admin("GET", "/metrics", None).text();
            let n: u64 = m
                .lines()
                .find(|l| l.starts_with("rulehook_claims_lost_total "))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (n > 0).then_some(n)
        },
    );
    assert!(lost >= 1);
    assert_all_delivered(&b, &rx, &accepted);
    // Records are consistent: attempt numbers run 1..=attempts, no gaps or
    // doubles from two writers.
    for d in all_deliveries(&b) {
        let full = b.delivery(d["id"].as_str().unwrap());
        let numbers: Vec<u64> = full["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["number"].as_u64().unwrap())
            .collect();
        let n = full["delivery"]["attempts"].as_u64().unwrap();
        assert_eq!(numbers, (1..=n).collect::<Vec<_>>(), "{full}");
    }
}

#[test]
fn a_database_restart_under_load_is_ridden_out_without_restarting_the_nodes() {
    let pg = PgServer::start("cluster-pgrestart");
    let url = pg.create_db("rulehook");
    let rx = Receiver::start(vec![Answer::status(200)]);
    let files: Vec<NodeFiles> = ["r1", "r2"]
        .iter()
        .map(|n| node_files(n, &url, &rx, "3s"))
        .collect();
    let nodes: Vec<Server> = files.iter().map(start).collect();
    let addrs = Arc::new(Mutex::new(nodes.iter().map(|n| n.addr).collect::<Vec<_>>()));
    let first = nodes[0].addr;
    let healthz = move || request(first, "GET", "/healthz", &[], b"").status;
    let (restarter, down_health) = {
        let pg = &pg;
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                std::thread::sleep(Duration::from_millis(1500));
                pg.stop();
                // While the database is down, the node says so.
                let until = Instant::now() + Duration::from_secs(2);
                let mut seen = healthz();
                while seen != 503 && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                    seen = healthz();
                }
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                pg.start_again();
                seen
            });
            let out = load(addrs.clone(), "pgr", Duration::from_secs(7));
            let seen = h.join().unwrap();
            (out, seen)
        })
    };
    assert_eq!(
        down_health, 503,
        "/healthz did not report the database down"
    );
    wait_for(Duration::from_secs(20), "/healthz to be 200 again", || {
        (healthz() == 200).then_some(())
    });
    let (accepted, odd) = restarter;
    assert!(odd.is_empty(), "answers other than 202/503: {odd:?}");
    assert!(accepted.len() > 50, "only {} accepted", accepted.len());
    // After the restart both nodes accept again by themselves.
    for (i, n) in nodes.iter().enumerate() {
        let id = format!("after-restart-{i}");
        wait_for(Duration::from_secs(20), "ingest to work again", || {
            (post(n.addr, &id) == Some(202)).then_some(())
        });
    }
    let mut all = accepted.clone();
    all.extend((0..nodes.len()).map(|i| format!("after-restart-{i}")));
    assert_all_delivered(&nodes[0], &rx, &all);
}

#[test]
fn killing_the_primary_and_promoting_a_synchronous_standby_loses_no_accepted_event() {
    let primary = PgServer::start("cluster-primary");
    let url_db = primary.create_db("rulehook");
    let db = url_db.rsplit('/').next().unwrap().to_string();
    let s1 = PgServer::standby_of(&primary, "standby-one");
    let s2 = PgServer::standby_of(&primary, "standby-two");
    // Every commit flushed on both standbys: whichever is promoted has it.
    primary.require_sync_standbys(2, &[&s1, &s2]);
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write&connect_timeout=2",
        primary.port, s1.port, s2.port
    );
    let rx = Receiver::start(vec![Answer::status(200)]);
    let files: Vec<NodeFiles> = ["f1", "f2"]
        .iter()
        .map(|n| node_files(n, &url, &rx, "3s"))
        .collect();
    let nodes: Vec<Server> = files.iter().map(start).collect();
    let addrs = Arc::new(Mutex::new(nodes.iter().map(|n| n.addr).collect::<Vec<_>>()));
    let (accepted, odd) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(1500));
            primary.kill();
            // No primary for a while: nothing may be answered 202 then
            // (checked below: every 202'd event must be delivered).
            std::thread::sleep(Duration::from_secs(1));
            s1.promote();
        });
        let out = load(addrs.clone(), "failover", Duration::from_secs(7));
        h.join().unwrap();
        out
    });
    assert!(odd.is_empty(), "answers other than 202/503: {odd:?}");
    assert!(accepted.len() > 50, "only {} accepted", accepted.len());
    for (i, n) in nodes.iter().enumerate() {
        let id = format!("after-failover-{i}");
        wait_for(Duration::from_secs(30), "ingest on the new primary", || {
            (post(n.addr, &id) == Some(202)).then_some(())
        });
    }
    let mut all = accepted.clone();
    all.extend((0..nodes.len()).map(|i| format!("after-failover-{i}")));
    assert_all_delivered(&nodes[1], &rx, &all);
}

#[test]
fn a_websocket_client_on_one_node_gets_the_deliveries_another_node_accepted() {
    use crate::websocket::{RULES, bearer, channel_key, connect, defect_update, next_frame};
    let pg = PgServer::start("cluster-ws");
    let url = pg.create_db("rulehook");
    let files: Vec<(TempDir, std::path::PathBuf)> = ["wa", "wb"]
        .iter()
        .map(|n| {
            setup(
                n,
                RULES,
                &format!(
                    "{}store: \"{url}\"\ncluster: {{node_id: {n}, lease: 3s}}\n",
                    channel_key()
                ),
            )
        })
        .collect();
    let a = Server::start(&files[0].0, &files[0].1);
    let b = Server::start(&files[1].0, &files[1].1);
    // Accepted by B while no client is connected anywhere: it waits parked.
    let early = b.post_event(&defect_update("ws-early", json!({"sharedspace_id": 1001})));
    assert_eq!(early.status, 202, "{}", early.text());
    let early_id = early.json()["deliveries"][0].as_str().unwrap().to_string();
    wait_for(
        Duration::from_secs(20),
        "the early delivery to park",
        || (b.delivery(&early_id)["delivery"]["state"] == "parked").then_some(()),
    );
    // A client connects to A: the delivery B parked comes to it.
    let mut client = connect(a.addr, "1001", Some(("Authorization", &bearer()))).expect("upgrade");
    let first = next_frame(&mut client);
    assert_eq!(first["event_id"], "ws-early", "{first}");
    // Deliveries B accepts from now on reach the client on A, never parked.
    let mut sent = Vec::new();
    for i in 0..5 {
        let id = format!("ws-{i}");
        let r = b.post_event(&defect_update(&id, json!({"sharedspace_id": 1001})));
        assert_eq!(r.status, 202, "{}", r.text());
        sent.push(id);
    }
    let mut got: Vec<String> = (0..5)
        .map(|_| {
            next_frame(&mut client)["event_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    got.sort();
    assert_eq!(got, sent);
    // Each sent once, and recorded by the node that sent it.
    wait_for(Duration::from_secs(20), "every record to succeed", || {
        let list = all_deliveries(&a);
        (list.len() == 6 && list.iter().all(|d| d["state"] == "succeeded")).then_some(())
    });
    for d in all_deliveries(&b) {
        assert_eq!(d["attempts"], 1, "{d}");
    }
}

#[test]
fn moving_an_embedded_store_into_postgres_loses_and_resends_nothing() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    // `later` sends to a port where nothing listens yet.
    let later_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rules = format!(
        "rules:\n  - {{name: ok, events: [create], webhook: {{url: \"{}\"}}}}\n  - {{name: later, events: [create], webhook: {{url: \"http://127.0.0.1:{later_port}/later\", retry: {{policy: fixed, interval: 1s, retries: 100}}}}}}\n",
        rx.url("/ok")
    );
    let (dir, config) = setup(
        "copy-redb",
        &rules,
        // No endpoint protection: `later` stays pending, retried each second.
        &format!(
            "http_ports: [{}, {later_port}]\nshutdown_grace: 1s\nprotection: {{failures: 1000}}\n",
            rx.addr.port()
        ),
    );
    let embedded = Server::start(&dir, &config);
    let ids: Vec<String> = (0..10).map(|i| format!("move-{i}")).collect();
    for id in &ids {
        assert_eq!(embedded.post_event(&event(id)).status, 202);
    }
    rx.wait_for(10, Duration::from_secs(20));
    let before = wait_for(
        Duration::from_secs(20),
        "`later` attempted once each",
        || {
            let list = all_deliveries(&embedded);
            let tried = list
                .iter()
                .filter(|d| d["rule"] == "later" && d["attempts"].as_u64() >= Some(1))
                .count();
            (list.len() == 20 && tried == 10).then_some(list)
        },
    );
    let pg = PgServer::start("cluster-copy");
    let url = pg.create_db("rulehook");
    let db_file = dir.path().join("data/rulehook.redb");
    let from = format!("redb:{}", db_file.display());
    // While the server runs, the copy refuses: it must see no new writes.
    let busy = crate::support::rulehook(&["store", "copy", "--from", &from, "--to", &url]);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    embedded.stop();
    let first = crate::support::rulehook(&["store", "copy", "--from", &from, "--to", &url]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        crate::support::stdout(&first).contains("copied 10 events, 20 deliveries added"),
        "{}",
        crate::support::stdout(&first)
    );
    let again = crate::support::rulehook(&["store", "copy", "--from", &from, "--to", &url]);
    assert!(
        crate::support::stdout(&again).contains("copied 10 events, 0 deliveries added"),
        "{}",
        crate::support::stdout(&again)
    );
    // A node on the database: what was pending goes out with its delivery
    // id once the endpoint is up; what had succeeded is not sent again.
    let (pdir, pconfig) = setup(
        "copy-pg",
        &rules,
        &format!(
            "http_ports: [{}, {later_port}]\nstore: \"{url}\"\ncluster: {{node_id: moved, lease: 3s}}\nprotection: {{failures: 1000}}\n",
            rx.addr.port()
        ),
    );
    let node = Server::start(&pdir, &pconfig);
    let late_rx = Receiver::start_on(later_port, vec![Answer::status(200)]);
    let got = late_rx.wait_for(10, Duration::from_secs(30));
    let want: HashSet<String> = before
        .iter()
        .filter(|d| d["rule"] == "later")
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    let sent: HashSet<String> = got
        .iter()
        .map(|r| r.header("X-Rulehook-Delivery").unwrap().to_string())
        .collect();
    assert_eq!(sent, want, "the pending deliveries, with their ids");
    let after = wait_for(Duration::from_secs(20), "all 20 succeeded", || {
        let list = all_deliveries(&node);
        (list.len() == 20 && list.iter().all(|d| d["state"] == "succeeded")).then_some(list)
    });
    for d in &after {
        let old = before
            .iter()
            .find(|b| b["id"] == d["id"])
            .expect("same ids");
        if d["rule"] == "ok" {
            assert_eq!(d["attempts"], old["attempts"], "{d}");
        } else {
            assert!(d["attempts"].as_u64() > old["attempts"].as_u64(), "{d}");
        }
    }
    assert_eq!(
        rx.received().len(),
        10,
        "nothing that had succeeded was sent again"
    );
    // Idempotency moved too.
    let dup = node.post_event(&event("move-3"));
    assert_eq!(dup.json()["duplicate"], true, "{}", dup.text());
}
