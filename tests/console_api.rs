//! The API the web console stands on, through the real binary: delivery
//! filters (endpoint, HTTP status, time range) and cursor paging, RFC 3339
//! times, counts, bulk redeliver with a dry run, the read-only viewer role,
//! the live tail (server-sent events) and console sessions with their CSRF
//! checks.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::http::{Reply, request};
use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{ADMIN_KEY, Server, setup};
use crate::support::wait_for;

const T: Duration = Duration::from_secs(20);
pub const VIEWER_KEY: &str = "test-viewer-key-0123456789";

pub fn event(id: &str) -> Value {
    json!({"id": id, "event_type": "update", "entity_type": "defect",
        "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
        "entity": {"id": "2013", "name": "Login fails"},
        "before": {"id": "2013", "name": "Login"}})
}

/// Two rules on two receivers: `ok` answers 200, `broken` answers 500 and
/// is not retried, so its deliveries fail at once.
pub fn two_receivers(name: &str) -> (crate::support::TempDir, Server, Receiver, Receiver) {
    let ok = Receiver::start(vec![Answer::status(200)]);
    let broken = Receiver::start(vec![Answer::status(500)]);
    let rules = format!(
        "rules:\n  - name: ok\n    events: [update]\n    webhook: {{url: \"{}\"}}\n  - name: broken\n    events: [update]\n    webhook: {{url: \"{}\", retry: {{policy: none}}}}\n",
        ok.url("/ok"),
        broken.url("/broken")
    );
    let ports = format!(
        "http_ports: [{}, {}]\nshutdown_grace: 60s\n",
        ok.addr.port(),
        broken.addr.port()
    );
    let (dir, config) = setup(name, &rules, &ports);
    add_viewer_key(&config);
    let server = Server::start(&dir, &config);
    (dir, server, ok, broken)
}

/// Appends a viewer key to a config written by `setup`.
pub fn add_viewer_key(config: &std::path::Path) {
    let text = std::fs::read_to_string(config).expect("read config");
    let text = text.replace(
        "api_keys:\n",
        &format!("api_keys:\n  - {{name: viewer, role: viewer, key: {VIEWER_KEY}}}\n"),
    );
    std::fs::write(config, text).expect("write config");
}

fn as_viewer(server: &Server, method: &str, path: &str, body: &str) -> Reply {
    request(
        server.addr,
        method,
        path,
        &[("Authorization", &format!("Bearer {VIEWER_KEY}"))],
        body.as_bytes(),
    )
}

fn ids(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|d| d["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Posts `n` events and waits until each of their 2 deliveries is final.
fn post_and_settle(server: &Server, prefix: &str, n: usize) {
    for i in 0..n {
        let r = server.post_event(&event(&format!("{prefix}-{i}")));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    wait_for(T, "every delivery final", || {
        let pending = server.deliveries("status=pending&limit=1000").len();
        let all = server.deliveries("limit=1000").len();
        (pending == 0 && all >= 2 * n).then_some(())
    });
}

#[test]
fn filters_by_endpoint_status_code_and_time_and_pages_by_cursor() {
    let (_dir, server, ok, broken) = two_receivers("console-filters");
    let before_all = rulehook::time::rfc3339(rulehook::store::now_ms().saturating_sub(1));
    post_and_settle(&server, "f", 3);
    ok.wait_for(3, T);
    broken.wait_for(3, T);

    let ok_endpoint = format!("http://{}", ok.addr);
    let by_endpoint = server.deliveries(&format!("endpoint={ok_endpoint}"));
    assert_eq!(by_endpoint.len(), 3, "{by_endpoint:?}");
    assert!(by_endpoint.iter().all(|d| d["rule"] == "ok"));

    let server_errors = server.deliveries("status_code=5xx");
    assert_eq!(server_errors.len(), 3);
    assert!(server_errors.iter().all(|d| d["last_status"] == 500));
    assert_eq!(server.deliveries("status_code=200").len(), 3);
    assert_eq!(server.deliveries("status_code=4xx").len(), 0);

    // Time range: all of them after the start, none before it.
    assert_eq!(server.deliveries(&format!("since={before_all}")).len(), 6);
    assert_eq!(server.deliveries(&format!("until={before_all}")).len(), 0);

    // Cursor paging: newest first, no repeats, nothing left out.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let q = match &cursor {
            Some(c) => format!("limit=4&before={c}"),
            None => "limit=4".to_string(),
        };
        let r = server.admin("GET", &format!("/v1/deliveries?{q}"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        let page = r.json();
        seen.extend(ids(page["deliveries"].as_array().expect("list")));
        match page["next_before"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6, "{seen:?}");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    sorted.dedup();
    assert_eq!(seen, sorted, "pages are newest first without repeats");

    // Bad filters name themselves.
    for (q, field) in [
        ("status_code=6xx", "status_code"),
        ("since=yesterday", "since"),
    ] {
        let r = server.admin("GET", &format!("/v1/deliveries?{q}"), None);
        assert_eq!(r.status, 400, "{q}: {}", r.text());
        assert_eq!(r.json()["error"]["field"], field);
    }
}

#[test]
fn times_come_as_rfc3339_beside_milliseconds_and_counts_by_state() {
    let (_dir, server, _ok, _broken) = two_receivers("console-times");
    post_and_settle(&server, "t", 2);
    let list = server.deliveries("");
    let d = &list[0];
    let ms = d["created_at"].as_u64().expect("created_at");
    assert_eq!(d["created_at_rfc3339"], rulehook::time::rfc3339(ms));
    let shown = server.delivery(d["id"].as_str().expect("id"));
    let started = shown["attempts"][0]["started_at"]
        .as_u64()
        .expect("attempt");
    assert_eq!(
        shown["attempts"][0]["started_at_rfc3339"],
        rulehook::time::rfc3339(started)
    );

    let r = server.admin("GET", "/v1/deliveries/counts", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let counts = r.json();
    assert_eq!(counts["counts"]["succeeded"], 2, "{counts}");
    assert_eq!(counts["counts"]["failed"], 2, "{counts}");
    assert_eq!(counts["counts"]["pending"], 0, "{counts}");
    assert_eq!(counts["exact"], true);

    // The CLI prints the RFC 3339 time on each line.
    let out = crate::support::rulehook(&[
        "deliveries",
        "list",
        "--server",
        &format!("http://{}", server.addr),
        "--api-key",
        ADMIN_KEY,
        "--status-code",
        "5xx",
    ]);
    let text = crate::support::stdout(&out);
    assert!(out.status.success(), "{text}");
    let first_failed = server.deliveries("status_code=5xx");
    let stamp = first_failed[0]["created_at_rfc3339"]
        .as_str()
        .expect("time");
    assert!(text.contains(stamp), "{text}");
    assert!(text.contains("2 deliveries"), "{text}");
}

#[test]
fn bulk_redeliver_counts_first_then_resends_exactly_the_matching_ones() {
    let (_dir, server, ok, broken) = two_receivers("console-bulk");
    post_and_settle(&server, "b", 3);
    ok.wait_for(3, T);
    broken.wait_for(3, T);
    let failed = ids(&server.deliveries("status=failed"));
    assert_eq!(failed.len(), 3);

    let dry = server.admin(
        "POST",
        "/v1/deliveries/redeliver",
        Some(&json!({"status": "failed", "dry_run": true})),
    );
    assert_eq!(dry.status, 200, "{}", dry.text());
    assert_eq!(dry.json()["would_redeliver"], 3);
    // A dry run sends nothing.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(broken.received().len(), 3);

    let real = server.admin(
        "POST",
        "/v1/deliveries/redeliver",
        Some(&json!({"status": "failed", "rule": "broken"})),
    );
    assert_eq!(real.status, 202, "{}", real.text());
    assert_eq!(real.json()["redelivered"], 3);
    let got = broken.wait_for(6, T);
    let mut resent: Vec<String> = got[3..]
        .iter()
        .map(|r| {
            r.header("x-rulehook-delivery")
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    resent.sort();
    let mut expected = failed.clone();
    expected.sort();
    assert_eq!(resent, expected, "the same delivery ids, each once");
    // The succeeded ones were not touched.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ok.received().len(), 3);

    // Refusals: no filter at all, a misspelt filter, more than max.
    for (body, code) in [
        (json!({"dry_run": true}), "no_filter"),
        (json!({"stauts": "failed"}), "bad_query"),
        (json!({"rule": "ok", "max": 1}), "too_many"),
    ] {
        let r = server.admin("POST", "/v1/deliveries/redeliver", Some(&body));
        assert!(r.status == 400 || r.status == 422, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], code, "{body}");
    }
}

#[test]
fn a_viewer_sees_everything_and_changes_nothing() {
    let (_dir, server, _ok, _broken) = two_receivers("console-viewer");
    post_and_settle(&server, "v", 1);
    let id = server.deliveries("rule=ok")[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    for path in [
        "/v1/deliveries".to_string(),
        format!("/v1/deliveries/{id}"),
        "/v1/deliveries/counts".to_string(),
        "/v1/rules".to_string(),
        "/v1/endpoints".to_string(),
        "/v1/overview".to_string(),
        "/metrics".to_string(),
    ] {
        let r = as_viewer(&server, "GET", &path, "");
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    }
    for (path, body) in [
        (format!("/v1/deliveries/{id}/redeliver"), ""),
        ("/v1/deliveries/redeliver".to_string(), r#"{"rule":"ok"}"#),
        ("/v1/rules/reload".to_string(), ""),
        ("/v1/rules/ok/test".to_string(), ""),
        (
            "/v1/endpoints/unblock".to_string(),
            r#"{"endpoint":"http://127.0.0.1:1"}"#,
        ),
        ("/v1/events".to_string(), r#"{"event_type":"update"}"#),
    ] {
        let r = as_viewer(&server, "POST", &path, body);
        assert_eq!(r.status, 403, "POST {path}: {}", r.text());
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("viewer"),
            "{}",
            r.text()
        );
    }
    // Nothing was redelivered.
    let after = server.delivery(&id);
    assert_eq!(after["delivery"]["state"], "succeeded", "{after}");
    assert_eq!(after["delivery"]["attempts"], 1, "{after}");
}

#[test]
fn the_live_tail_streams_deliveries_as_they_happen() {
    let (_dir, server, _ok, _broken) = two_receivers("console-stream");
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET /v1/deliveries/stream?rule=ok HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {VIEWER_KEY}\r\n\r\n",
        server.addr
    )
    .expect("send");
    let mut reader = BufReader::new(s);
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    assert!(status.contains("200"), "{status}");
    // Wait for the stream's first bytes, so the event below comes after
    // the subscription.
    let deadline = Instant::now() + T;
    let mut line = String::new();
    while !line.starts_with(": live") {
        line.clear();
        reader.read_line(&mut line).expect("stream opens");
        assert!(Instant::now() < deadline, "no stream start");
    }
    let r = server.post_event(&event("live-1"));
    assert_eq!(r.status, 202);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        line.clear();
        if reader.read_line(&mut line).is_err() {
            break;
        }
        // The body is chunked: chunk sizes sit on lines of their own.
        if let Some(data) = line.strip_prefix("data: ") {
            let d: Value = serde_json::from_str(data.trim()).expect("event data is JSON");
            seen.push(d.clone());
            if d["state"] == "succeeded" {
                break;
            }
        }
    }
    assert!(!seen.is_empty(), "no delivery event arrived");
    assert!(
        seen.iter().all(|d| d["rule"] == "ok"),
        "filtered by rule: {seen:?}"
    );
    assert!(seen.iter().all(|d| d["event_id"] == "live-1"));
    assert_eq!(
        seen.last().map(|d| d["state"].clone()),
        Some(json!("succeeded"))
    );
}

/// Signs the console in; returns the cookie pair and the CSRF token.
pub fn console_session(server: &Server, key: &str) -> (String, String) {
    let r = request(
        server.addr,
        "POST",
        "/v1/session",
        &[("Content-Type", "application/json")],
        json!({"key": key}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let set = r
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.clone())
        .expect("a session cookie");
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    let pair = set.split(';').next().expect("cookie pair").to_string();
    let csrf = r.json()["csrf"].as_str().expect("csrf").to_string();
    (pair, csrf)
}

#[test]
fn console_sessions_need_the_csrf_token_and_origin_to_write() {
    let (_dir, server, _ok, _broken) = two_receivers("console-session");
    post_and_settle(&server, "s", 1);
    let id = ids(&server.deliveries("status=failed"))[0].clone();
    let path = format!("/v1/deliveries/{id}/redeliver");
    let (cookie, csrf) = console_session(&server, ADMIN_KEY);
    let origin = format!("http://{}", server.addr);

    // Reads need only the cookie.
    let r = request(
        server.addr,
        "GET",
        "/v1/deliveries",
        &[("Cookie", &cookie)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let who = request(
        server.addr,
        "GET",
        "/v1/session",
        &[("Cookie", &cookie)],
        b"",
    );
    assert_eq!(who.json()["role"], "admin");

    // A write without the token, or from another origin, is refused.
    let r = request(server.addr, "POST", &path, &[("Cookie", &cookie)], b"");
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "csrf");
    let r = request(
        server.addr,
        "POST",
        &path,
        &[
            ("Cookie", &cookie),
            ("X-Rulehook-CSRF", &csrf),
            ("Origin", "http://evil.example"),
        ],
        b"",
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = request(
        server.addr,
        "POST",
        &path,
        &[
            ("Cookie", &cookie),
            ("X-Rulehook-CSRF", &csrf),
            ("Origin", &origin),
        ],
        b"",
    );
    assert_eq!(r.status, 202, "{}", r.text());

    // A viewer's session reads but cannot write, token or not.
    let (vcookie, vcsrf) = console_session(&server, VIEWER_KEY);
    let r = request(
        server.addr,
        "POST",
        &path,
        &[("Cookie", &vcookie), ("X-Rulehook-CSRF", &vcsrf)],
        b"",
    );
    assert_eq!(r.status, 403, "{}", r.text());

    // A wrong key gets no session; an ingest key may not use the console.
    for (key, status) in [
        ("not-a-key", 401),
        (crate::support::server::INGEST_KEY, 403),
    ] {
        let r = request(
            server.addr,
            "POST",
            "/v1/session",
            &[],
            json!({"key": key}).to_string().as_bytes(),
        );
        assert_eq!(r.status, status, "{}", r.text());
        assert!(
            !r.headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("set-cookie")),
            "no cookie for a refused key"
        );
    }

    // Signing out ends the session.
    let r = request(
        server.addr,
        "POST",
        "/v1/session/sign-out",
        &[("Cookie", &cookie), ("X-Rulehook-CSRF", &csrf)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(
        server.addr,
        "GET",
        "/v1/deliveries",
        &[("Cookie", &cookie)],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.text());
}

#[test]
fn console_sign_in_stops_answering_guesses_after_twenty_failures() {
    let (_dir, server, _ok, _broken) = two_receivers("console-guesses");
    let attempt = |key: &str| {
        request(
            server.addr,
            "POST",
            "/v1/session",
            &[],
            json!({"key": key}).to_string().as_bytes(),
        )
    };
    for i in 0..20 {
        assert_eq!(attempt(&format!("guess-{i}")).status, 401);
    }
    // Past the bound every sign-in waits for the window to end, the right
    // key too, so guessing cannot go on by mixing in a good key.
    for key in ["guess-21", ADMIN_KEY] {
        let r = attempt(key);
        assert_eq!(r.status, 429, "{}", r.text());
        assert!(
            r.headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        );
        assert!(r.text().contains("failed sign-ins"), "{}", r.text());
    }
    // Bearer keys on the API are not affected.
    assert_eq!(server.admin("GET", "/v1/deliveries", None).status, 200);
}

#[test]
fn an_open_live_tail_does_not_hold_up_shutdown() {
    let (_dir, server, _ok, _broken) = two_receivers("console-stream-stop");
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    write!(
        s,
        "GET /v1/deliveries/stream HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\r\n",
        server.addr
    )
    .expect("send");
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    while !line.starts_with(": live") {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("stream opens") > 0,
            "stream closed early"
        );
    }
    // The config's shutdown grace is 60 s; a stream that held its
    // connection open would keep the server up that long.
    let started = Instant::now();
    let status = server.stop();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "stopping took {:?}: the live tail held the connection",
        started.elapsed()
    );
    // And the stream itself ended (the body's last chunk, then EOF).
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
}
