//! What a stop promises, with receivers that do not cooperate: at SIGTERM
//! no new attempt starts; attempts in flight get at most `shutdown_grace`;
//! what they did not finish stays pending and is sent after the restart
//! with the same delivery id; the process exits within the grace plus a
//! small bound, whatever the receivers do.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{Server, setup};
use crate::support::wait_for;

fn event(id: &str) -> Value {
    json!({"id": id, "event_type": "create", "entity_type": "story",
        "scope": {"workspace_id": 1002}, "entity": {"id": id}})
}

fn one_rule(rx: &Receiver) -> String {
    format!(
        "rules:\n  - {{name: r, events: [create], webhook: {{url: \"{}\"}}}}\n",
        rx.url("/r")
    )
}

/// Posts `n` events and returns their delivery ids (one each).
fn post(server: &Server, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let r = server.post_event(&event(&format!("{prefix}-{i}")));
            assert_eq!(r.status, 202, "{}", r.text());
            r.json()["deliveries"][0]
                .as_str()
                .expect("a delivery id")
                .to_string()
        })
        .collect()
}

/// How many times each delivery id reached the receiver.
fn arrivals(rx: &Receiver) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for r in rx.received() {
        if let Some(id) = r.header("X-Rulehook-Delivery") {
            *n.entry(id.to_string()).or_default() += 1;
        }
    }
    n
}

/// The grace bounds the stop even when every receiver holds its request for
/// ten times longer: the attempts are cut, stay pending, and are sent again
/// after the restart with the same delivery ids.
#[test]
fn a_stop_ends_within_the_grace_whatever_the_receivers_do() {
    let slow = Answer::status(200).after(Duration::from_secs(10));
    let rx = Receiver::start(vec![slow.clone(), slow.clone(), slow, Answer::status(200)]);
    let (dir, config) = setup(
        "stop-grace",
        &one_rule(&rx),
        &format!("http_ports: [{}]\nshutdown_grace: 1s\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let ids = post(&server, "evt-g", 3);
    // All three are at the receiver, which holds each for 10 s.
    rx.wait_for(3, Duration::from_secs(20));
    let signalled = Instant::now();
    let status = server.stop();
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_millis(3500),
        "with shutdown_grace 1s and receivers that answer after 10 s the stop took {took:?}"
    );

    let server = Server::start(&dir, &config);
    for id in &ids {
        wait_for(Duration::from_secs(30), &format!("{id} to succeed"), || {
            (server.delivery(id)["delivery"]["state"] == "succeeded").then_some(())
        });
    }
    let got = arrivals(&rx);
    for id in &ids {
        assert_eq!(
            got.get(id),
            Some(&2),
            "{id}: cut once by the stop, sent again after the restart with its id ({got:?})"
        );
    }
}

/// With a slow receiver and a long queue, the attempts in flight at the
/// signal finish within the grace, and not one more starts: the queued
/// deliveries stay pending and are sent, once each, after the restart.
#[test]
fn no_attempt_starts_after_sigterm() {
    let rx = Receiver::start(vec![Answer::status(200).after(Duration::from_millis(700))]);
    let (dir, config) = setup(
        "stop-no-new",
        &one_rule(&rx),
        &format!(
            "http_ports: [{}]\nshutdown_grace: 5s\nmax_in_flight_per_endpoint: 2\n",
            rx.addr.port()
        ),
    );
    let server = Server::start(&dir, &config);
    let ids = post(&server, "evt-q", 20);
    rx.wait_for(2, Duration::from_secs(20));
    let signalled = Instant::now();
    let status = server.stop();
    assert!(status.success(), "exit status {status:?}");
    // A request that started before the signal has arrived within a few
    // milliseconds of it (loopback, a small body).
    let late: Vec<Duration> = rx
        .received()
        .iter()
        .filter(|r| r.at > signalled + Duration::from_millis(300))
        .map(|r| r.at - signalled)
        .collect();
    assert!(
        late.is_empty(),
        "{} attempts started after SIGTERM (at {late:?} after it)",
        late.len()
    );
    let before_restart = rx.received().len();
    assert!(
        before_restart < ids.len(),
        "some deliveries were left queued"
    );

    let server = Server::start(&dir, &config);
    wait_for(Duration::from_secs(60), "every delivery to arrive", || {
        (arrivals(&rx).len() == ids.len()).then_some(())
    });
    for id in &ids {
        wait_for(Duration::from_secs(30), &format!("{id} to succeed"), || {
            (server.delivery(id)["delivery"]["state"] == "succeeded").then_some(())
        });
    }
    let got = arrivals(&rx);
    assert!(
        got.values().all(|n| *n == 1),
        "each delivery arrives exactly once: the ones in flight at the signal finished and were recorded ({got:?})"
    );
}
