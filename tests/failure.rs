//! Failures: the server killed under load, endpoints that stop answering,
//! and a graceful stop with an attempt in flight.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{Server, setup};
use crate::support::wait_for;

fn event(id: &str) -> serde_json::Value {
    json!({"id": id, "event_type": "create", "entity_type": "story", "scope": {"workspace_id": 1002}, "entity": {"id": id, "name": "Story"}})
}

#[test]
fn a_kill_under_load_loses_no_accepted_event() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - {{name: a, events: [create], webhook: {{url: \"{0}\", retry: {{policy: fixed, interval: 200ms, retries: 20}}}}}}\n  - {{name: b, events: [create], webhook: {{url: \"{1}\", retry: {{policy: fixed, interval: 200ms, retries: 20}}}}}}\n",
        rx.url("/a"),
        rx.url("/b")
    );
    let (dir, config) = setup(
        "crash",
        &rules,
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let addr = server.addr;
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    // Four senders post until the server dies (at most 3 s, 2,000 events each).
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let accepted = accepted.clone();
            std::thread::spawn(move || {
                let auth = format!("Bearer {}", crate::support::server::INGEST_KEY);
                for i in 0..2000 {
                    if started.elapsed() > Duration::from_secs(3) {
                        break;
                    }
                    let id = format!("evt-{t}-{i}");
                    let body = event(&id).to_string();
                    match crate::support::http::try_request(
                        addr,
                        "POST",
                        "/v1/events",
                        &[("Authorization", &auth)],
                        body.as_bytes(),
                    ) {
                        Ok(r) if r.status == 202 => accepted.lock().unwrap().push(id),
                        Ok(_) => {}
                        Err(_) => break, // the server is gone
                    }
                }
            })
        })
        .collect();
    wait_for(
        Duration::from_secs(10),
        "some events to be accepted",
        || (accepted.lock().unwrap().len() > 200).then_some(()),
    );
    server.kill();
    for s in senders {
        let _ = s.join();
    }
    let accepted: Vec<String> = accepted.lock().unwrap().clone();
    assert!(accepted.len() > 200, "load reached the server");

    let server = Server::start(&dir, &config);
    let want: HashSet<(String, String)> = accepted
        .iter()
        .flat_map(|id| {
            [
                (id.clone(), "/a".to_string()),
                (id.clone(), "/b".to_string()),
            ]
        })
        .collect();
    wait_for(
        Duration::from_secs(60),
        "every accepted event delivered to both endpoints",
        || {
            let got: HashSet<(String, String)> = rx
                .received()
                .iter()
                .map(|r| {
                    (
                        r.json()["event_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        r.path.clone(),
                    )
                })
                .collect();
            want.is_subset(&got).then_some(())
        },
    );
    // Records: every accepted event has exactly its two deliveries, each
    // succeeded with at least one attempt recorded. A delivery sent just
    // before the kill but not yet recorded is sent again after the restart
    // (at least once), so wait for the records to settle.
    let all = || {
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
    };
    let records = wait_for(
        Duration::from_secs(60),
        "every delivery record to succeed",
        || {
            let list = all();
            list.iter()
                .all(|d| d["state"] == "succeeded")
                .then_some(list)
        },
    );
    let mut per_event: HashMap<String, usize> = HashMap::new();
    for d in &records {
        assert!(d["attempts"].as_u64().unwrap() >= 1, "{d}");
        *per_event
            .entry(d["event_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for id in &accepted {
        assert_eq!(
            per_event.get(id),
            Some(&2),
            "event {id} must have exactly 2 deliveries"
        );
    }
}

#[test]
fn an_endpoint_that_stops_answering_is_blocked_then_resumed() {
    // A port with nothing listening: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/h");
    let rules = format!(
        "rules:\n  - {{name: r, events: [create], webhook: {{url: \"{url}\", retry: {{policy: fixed, interval: 50ms, retries: 50}}}}}}\n"
    );
    let (dir, config) = setup(
        "block",
        &rules,
        &format!("http_ports: [{port}]\nprotection: {{failures: 5, block: 1s, max_block: 10s}}\n"),
    );
    let server = Server::start(&dir, &config);
    let first = server.post_event(&event("evt-b1")).json()["deliveries"][0]
        .as_str()
        .unwrap()
        .to_string();
    let d = wait_for(Duration::from_secs(20), "the delivery to park", || {
        let d = server.delivery(&first);
        (d["delivery"]["state"] == "parked").then_some(d)
    });
    assert_eq!(
        d["attempts"].as_array().unwrap().len(),
        5,
        "blocked after 5 failures in a row"
    );
    assert!(
        d["delivery"]["reason"]
            .as_str()
            .unwrap()
            .contains("blocked after repeated failures"),
        "{}",
        d["delivery"]["reason"]
    );
    let eps = server.admin("GET", "/v1/endpoints", None).json();
    assert_eq!(eps["endpoints"][0]["blocked"], true, "{eps}");
    // The endpoint comes back; the block expires; the parked delivery goes.
    let rx = Receiver::start_on(port, vec![Answer::status(200)]);
    let got = rx.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].header("x-rulehook-delivery"), Some(first.as_str()));
    assert_eq!(
        got[0].header("x-rulehook-attempt"),
        Some("6"),
        "parking did not use up attempts"
    );
    wait_for(Duration::from_secs(20), "success", || {
        (server.delivery(&first)["delivery"]["state"] == "succeeded").then_some(())
    });
}

#[test]
fn sigterm_lets_the_attempt_in_flight_finish_and_record() {
    let rx = Receiver::start(vec![Answer::status(200).after(Duration::from_millis(1500))]);
    let rules = format!(
        "rules:\n  - {{name: r, events: [create], webhook: {{url: \"{}\"}}}}\n",
        rx.url("/slow")
    );
    let (dir, config) = setup(
        "sigterm",
        &rules,
        &format!("http_ports: [{}]\nshutdown_grace: 10s\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let id = server.post_event(&event("evt-t")).json()["deliveries"][0]
        .as_str()
        .unwrap()
        .to_string();
    rx.wait_for(1, Duration::from_secs(10));
    let status = server.stop();
    assert!(status.success(), "exit status {status:?}");
    let server = Server::start(&dir, &config);
    let d = server.delivery(&id);
    assert_eq!(d["delivery"]["state"], "succeeded", "{d}");
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.received().len(), 1, "not sent again after the restart");
}

/// More deliveries pile up than memory holds (the hand-over queue and the
/// waiting list take about 18,000), while a stalled endpoint holds every
/// connection. The rest wait only in the store and are found by scans of
/// the due index, in batches. Every delivery must arrive exactly once: none
/// lost with the overflow, none sent twice.
#[test]
fn a_backlog_larger_than_memory_is_delivered_exactly_once() {
    const EVENTS: usize = 24_000;
    const BATCH: usize = 500;
    // The first 64 requests (all the endpoint's connections) stall for 3 s.
    let mut script = vec![Answer::status(200).after(Duration::from_secs(3)); 64];
    script.push(Answer::status(200));
    let rx = Receiver::start(script);
    let rules = format!(
        "rules:\n  - {{name: all, events: [create], webhook: {{url: \"{}\"}}}}\n",
        rx.url("/all")
    );
    let (dir, config) = setup(
        "overflow",
        &rules,
        &format!("http_ports: [{}]\nmax_body: 8MiB\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let mut sent: HashSet<String> = HashSet::new();
    for b in 0..EVENTS / BATCH {
        let body: String = (0..BATCH)
            .map(|k| event(&format!("ovf-{b}-{k}")).to_string() + "\n")
            .collect();
        let r = server.post_ndjson(&body);
        assert_eq!(r.status, 202, "{}", r.text());
        for e in r.json()["events"].as_array().unwrap() {
            sent.insert(e["deliveries"][0].as_str().unwrap().to_string());
        }
    }
    assert_eq!(sent.len(), EVENTS);
    let got = rx.wait_for(EVENTS, Duration::from_secs(120));
    // Let anything sent twice arrive too before counting.
    std::thread::sleep(Duration::from_millis(500));
    let got = if rx.received().len() > got.len() {
        rx.received()
    } else {
        got
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *seen
            .entry(r.header("X-Rulehook-Delivery").unwrap().to_string())
            .or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    let received: HashSet<String> = seen.into_keys().collect();
    assert_eq!(received, sent, "every delivery arrived, and only those");
}

/// An unblock over more parked deliveries than one commit moves
/// (`UNPARK_STEP`, 5,000) answers after the first step and resumes the rest
/// in the background: every parked delivery arrives, once. Before, one
/// transaction moved them all, holding the writer (and every ingest) for
/// seconds with a large backlog.
#[test]
fn an_unblock_over_a_large_parked_backlog_resumes_every_delivery() {
    const EVENTS: usize = 6_000;
    const BATCH: usize = 500;
    let rx = Receiver::start(vec![Answer::status(410), Answer::status(200)]);
    let rules = format!(
        "rules:\n  - {{name: r, events: [create], webhook: {{url: \"{}\"}}}}\n",
        rx.url("/gone")
    );
    let (dir, config) = setup(
        "unpark-steps",
        &rules,
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    // The first delivery's 410 disables the endpoint; the rest park.
    assert_eq!(server.post_event(&event("first")).status, 202);
    rx.wait_for(1, Duration::from_secs(20));
    for b in 0..EVENTS / BATCH {
        let body: String = (0..BATCH)
            .map(|k| event(&format!("parked-{b}-{k}")).to_string() + "\n")
            .collect();
        let r = server.post_ndjson(&body);
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let endpoint = format!("http://127.0.0.1:{}", rx.addr.port());
    wait_for(Duration::from_secs(60), "every delivery to park", || {
        let eps = server.admin("GET", "/v1/endpoints", None).json();
        (eps["endpoints"][0]["parked"].as_u64() == Some(EVENTS as u64 + 1)).then_some(())
    });
    let r = server.admin(
        "POST",
        "/v1/endpoints/unblock",
        Some(&serde_json::json!({"endpoint": endpoint})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["resumed"], 5000, "{}", r.text());
    assert_eq!(r.json()["more"], true, "{}", r.text());
    let got = rx.wait_for(EVENTS + 2, Duration::from_secs(120));
    let ids: std::collections::BTreeSet<&str> = got[1..]
        .iter()
        .filter_map(|r| r.header("X-Rulehook-Delivery"))
        .collect();
    assert_eq!(ids.len(), EVENTS + 1, "every parked delivery arrived, once");
}
