//! What a client can hold of the HTTP server, through the real binary:
//! connections past the cap, slow headers and bodies, declared bodies
//! over the limit, unauthenticated bodies, failed sign-ins per address,
//! log injection, and events whose JSON is ambiguous (duplicate keys,
//! integers past 64 bits). Each ends with the server still serving.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::server::{ADMIN_KEY, INGEST_KEY, Server, setup};
use crate::support::{TempDir, wait_for};

const T: Duration = Duration::from_secs(20);

/// Every `create` of a defect goes to a port nothing listens on: the
/// deliveries stay pending, which is all these tests look at.
const RULES: &str = "rules:
  - name: defects
    events: [create]
    entity_types: [defect]
    webhook: {url: \"http://127.0.0.1:9/hook\"}
";

fn server(name: &str, extra: &str) -> (TempDir, Server) {
    let (dir, config) = setup(name, RULES, extra);
    let server = Server::start(&dir, &config);
    (dir, server)
}

fn event(id: &str) -> Value {
    json!({"id": id, "event_type": "create", "entity_type": "defect", "entity": {"id": id}})
}

/// A connection that has sent `bytes` and waits for the answer.
fn send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(T)).ok();
    s.write_all(bytes).expect("write");
    s
}

/// The status and text of the answer on `s`, read up to the end of its
/// body (by `Content-Length`) or of the connection; `Err` when none came
/// within the read timeout or the connection closed without one.
fn answer(s: &mut TcpStream) -> Result<(u16, String), String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + len {
                let text = String::from_utf8_lossy(&raw).into_owned();
                let status = text
                    .split(' ')
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or("no status")?;
                return Ok((status, text));
            }
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("closed without an answer: {raw:?}")),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("no answer: {e}")),
        }
    }
}

/// Whether the server has closed `s`: a read that ends (or is reset)
/// rather than one that would block.
fn closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).ok();
    let mut buf = [0u8; 1024];
    let gone = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).ok();
    gone
}

fn open_fds(server: &Server) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.child.id()))
        .expect("read the server's fds")
        .count()
}

#[test]
fn slow_clients_past_the_cap_leave_healthz_and_ingest_answering() {
    // Timeouts far longer than the test: only the cap can free slots.
    let (_dir, server) = server(
        "limits-cap",
        "server: {max_connections: 100, header_timeout: 5m, body_timeout: 5m}\n",
    );
    let addr = server.addr;
    assert_eq!(
        crate::support::http::request(addr, "GET", "/healthz", &[], b"").status,
        200
    );
    let baseline = open_fds(&server);
    // Three kinds of slow client, 300 in all: headers never finished,
    // an authenticated ingest body never finished, and an anonymous
    // sign-in body never finished.
    let mut slow: Vec<TcpStream> = (0..300)
        .map(|i| {
            let head = match i % 3 {
                0 => "POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_string(),
                1 => format!(
                    "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {INGEST_KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"id\": "
                ),
                _ => "POST /authentication/sign_in HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"client_id\": ".to_string(),
            };
            send(addr, head.as_bytes())
        })
        .collect();
    // The cap holds: the oldest slow clients were closed to make room.
    wait_for(T, "200 slow clients closed to make room", || {
        let n = slow
            .iter_mut()
            .filter_map(|s| closed(s).then_some(()))
            .count();
        (n >= 200).then_some(())
    });
    let fds = open_fds(&server);
    assert!(
        fds <= baseline + 100 + 8,
        "{fds} fds open with a cap of 100 connections (baseline {baseline})"
    );
    // Health and ingest answer, each taking the stalest slot.
    let health = crate::support::http::request(addr, "GET", "/healthz", &[], b"");
    assert_eq!(health.status, 200, "{}", health.text());
    let mut accepted = Vec::new();
    for i in 0..10 {
        let r = server.post_event(&event(&format!("evt-cap-{i}")));
        assert_eq!(r.status, 202, "{}", r.text());
        accepted.push(r.json()["event_id"].as_str().expect("id").to_string());
    }
    // Nothing accepted is lost: every 202'd event has its delivery.
    for id in &accepted {
        let d = server.deliveries(&format!("event={id}"));
        assert_eq!(d.len(), 1, "event {id}: {d:?}");
    }
    // The operator sees it in the metrics.
    let metrics = server.admin("GET", "/metrics", None).text();
    let room: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rulehook_connections_closed_total{reason=\"room\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no closed-for-room counter: {metrics}"));
    assert!(room >= 200, "{metrics}");
    // (Plus the deliveries' outbound sockets, which close at once: nothing
    // listens on their port.)
    let fds = open_fds(&server);
    assert!(
        fds <= baseline + 100 + 8 + 10,
        "{fds} fds open after ingest"
    );
}

#[test]
fn a_declared_body_over_the_limit_is_refused_before_it_is_sent() {
    let (_dir, server) = server("limits-413", "max_body: 1KiB\n");
    // Headers only: the server must answer without waiting for the body.
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {INGEST_KEY}\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    );
    let mut s = send(server.addr, head.as_bytes());
    let (status, text) = answer(&mut s).expect("an answer before the body");
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("5000 bytes"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    // Sign-in takes far less than max_body, and is open to anyone.
    let head = "POST /authentication/sign_in HTTP/1.1\r\nHost: x\r\nContent-Length: 9000\r\n\r\n";
    let mut s = send(server.addr, head.as_bytes());
    let (status, text) = answer(&mut s).expect("an answer before the body");
    assert_eq!(status, 413, "{text}");
}

#[test]
fn a_request_without_a_key_is_refused_before_its_body_is_read() {
    let (_dir, server) = server("limits-401", "");
    let head = "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n";
    let mut s = send(server.addr, head.as_bytes());
    let (status, text) = answer(&mut s).expect("an answer before the body");
    assert_eq!(status, 401, "{text}");
}

#[test]
fn a_body_that_does_not_arrive_in_time_gets_408() {
    let (_dir, server) = server("limits-408", "server: {body_timeout: 1s}\n");
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {INGEST_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\": "
    );
    let mut s = send(server.addr, head.as_bytes());
    let (status, text) = answer(&mut s).expect("an answer after the body timeout");
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("server.body_timeout"), "{text}");
    // The server goes on serving.
    assert_eq!(server.post_event(&event("evt-after-408")).status, 202);
}

#[test]
fn slow_headers_and_idle_keep_alive_connections_are_closed() {
    let (_dir, server) = server("limits-headers", "server: {header_timeout: 1s}\n");
    // Headers that never end.
    let mut s = send(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
    let mut rest = Vec::new();
    let ended = s.read_to_end(&mut rest);
    assert!(
        ended.is_ok()
            || ended
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
        "the server did not close a connection whose headers never ended: {ended:?}"
    );
    // A keep-alive connection that goes quiet after one request.
    let mut s = send(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _) = answer(&mut s).expect("healthz");
    assert_eq!(status, 200);
    let ended = s.read_to_end(&mut rest);
    assert!(
        ended.is_ok()
            || ended
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
        "the server did not close an idle keep-alive connection: {ended:?}"
    );
}

/// A connection from `src` (any 127.0.0.0/8 address is loopback).
fn connect_from(src: IpAddr, addr: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let s = rt
        .block_on(async {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(src, 0))?;
            sock.connect(addr).await?.into_std()
        })
        .expect("connect from the given address");
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(T)).ok();
    s
}

fn sign_in_from(src: IpAddr, addr: SocketAddr, id: &str, secret: &str) -> (u16, String) {
    let body = json!({"client_id": id, "client_secret": secret}).to_string();
    let mut s = connect_from(src, addr);
    write!(
        s,
        "POST /authentication/sign_in HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    answer(&mut s).expect("sign-in answer")
}

#[test]
fn failed_sign_ins_lock_out_only_the_address_they_come_from() {
    let (_dir, server) = server(
        "limits-sign-in",
        "server: {sign_in_failures: 3, sign_in_window: 5m}\n",
    );
    let attacker: IpAddr = "127.0.0.1".parse().unwrap();
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    for _ in 0..3 {
        let (status, text) = sign_in_from(attacker, server.addr, "admin", "guess-0123456789");
        assert_eq!(status, 401, "{text}");
    }
    // The attacker's address is locked, even with the right key, and is
    // told so before its body is read.
    let (status, text) = sign_in_from(attacker, server.addr, "admin", ADMIN_KEY);
    assert_eq!(status, 429, "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after:"), "{text}");
    let mut s = connect_from(attacker, server.addr);
    s.write_all(b"POST /authentication/sign_in HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n")
        .expect("write");
    assert_eq!(answer(&mut s).expect("answer before the body").0, 429);
    // The console's sign-in counts the same failures.
    let mut s = connect_from(attacker, server.addr);
    let body = json!({"key": ADMIN_KEY}).to_string();
    write!(
        s,
        "POST /v1/session HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    assert_eq!(answer(&mut s).expect("console answer").0, 429);
    // Everyone else signs in as before.
    let (status, text) = sign_in_from(other, server.addr, "admin", ADMIN_KEY);
    assert_eq!(status, 200, "{text}");
    let metrics = server.admin("GET", "/metrics", None).text();
    assert!(
        metrics.contains("rulehook_sign_ins_total{result=\"failed\"} 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rulehook_sign_ins_total{result=\"locked_out\"} 3\n"),
        "{metrics}"
    );
}

#[test]
fn a_client_id_cannot_forge_a_log_line() {
    let (dir, config) = setup("limits-log", RULES, "");
    let log = dir.path().join("server.log");
    let server = Server::start_logging_to(&dir, &config, &log);
    let body = json!({"client_id": "evil\nFORGED ERROR rulehook: all keys leaked\u{1b}[2J", "client_secret": "nope-0123456789"});
    let r = crate::support::http::request(
        server.addr,
        "POST",
        "/authentication/sign_in",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 401, "{}", r.text());
    let text = wait_for(T, "the refused sign-in in the log", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("sign-in refused").then_some(text)
    });
    for line in text.lines().filter(|l| l.contains("FORGED")) {
        assert!(
            line.contains("sign-in refused") && line.contains("evil\\nFORGED"),
            "a client's text began a log line of its own: {line:?}\n{text}"
        );
    }
    // (The log's own colours are escape sequences too; the client's is not.)
    assert!(
        !text.contains("\u{1b}[2J"),
        "the client's escape sequence reached the log: {text}"
    );
}

#[test]
fn ambiguous_event_json_is_refused_naming_the_field() {
    let (_dir, server) = server("limits-json", "");
    let post = |body: &str| {
        crate::support::http::request(
            server.addr,
            "POST",
            "/v1/events",
            &[
                ("Authorization", &format!("Bearer {INGEST_KEY}")),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
    };
    // Duplicate keys: serde would keep the last one silently.
    for (body, field) in [
        (
            r#"{"event_type": "create", "entity_type": "defect", "entity": {"id": "1", "name": "a", "name": "b"}}"#,
            "entity.name",
        ),
        (
            r#"{"event_type": "create", "event_type": "delete", "entity_type": "defect", "entity": {"id": "1"}}"#,
            "event_type",
        ),
        (
            r#"{"event_type": "create", "entity_type": "defect", "entity": {"id": "1", "tags": [{"k": 1, "k": 2}]}}"#,
            "entity.tags[0].k",
        ),
    ] {
        let r = post(body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["field"], field, "{body}: {e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("duplicate key"),
            "{e}"
        );
    }
    // Integers past 64 bits would be rounded: refused, naming the field.
    for (body, field) in [
        (
            r#"{"event_type": "create", "entity_type": "defect", "entity": {"id": 18446744073709551616}}"#,
            "entity.id",
        ),
        (
            r#"{"event_type": "create", "entity_type": "defect", "scope": {"w": -9223372036854775809}, "entity": {"id": "1"}}"#,
            "scope.w",
        ),
    ] {
        let r = post(body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["field"], field, "{body}: {e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("64 bits"),
            "{e}"
        );
    }
    // The 64-bit extremes and floats are kept exactly as sent.
    let r = post(
        r#"{"id": "evt-exact", "event_type": "create", "entity_type": "defect", "entity": {"id": 18446744073709551615, "low": -9223372036854775808, "f": 1e300}}"#,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let d = server.deliveries("event=evt-exact");
    let shown = server.delivery(d[0]["id"].as_str().expect("id"));
    let body = shown.to_string();
    assert!(body.contains("18446744073709551615"), "{body}");
    // The same key in different objects is no duplicate.
    let r = post(
        r#"{"event_type": "create", "entity_type": "defect", "entity": {"id": "2", "a": {"name": 1}, "b": {"name": 2}}}"#,
    );
    assert_eq!(r.status, 202, "{}", r.text());
}

#[test]
fn media_types_and_the_bearer_scheme_match_without_regard_to_case() {
    let (_dir, server) = server("limits-case", "");
    let body = format!("{}\n{}\n", event("evt-case-1"), event("evt-case-2"));
    let r = crate::support::http::request(
        server.addr,
        "POST",
        "/v1/events",
        &[
            ("Authorization", &format!("bearer {INGEST_KEY}")),
            ("Content-Type", "Application/X-NDJSON; charset=UTF-8"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["events"].as_array().map(Vec::len), Some(2));
    let r = crate::support::http::request(
        server.addr,
        "GET",
        "/v1/deliveries",
        &[("Authorization", &format!("BEARER {ADMIN_KEY}"))],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_jsonpath_too_costly_for_the_event_is_not_run() {
    let rules = "rules:
  - name: everything-below-everything
    events: [create]
    entity_types: [defect]
    when: {field: \"$..*..*\", exists: true}
    webhook: {url: \"http://127.0.0.1:9/hook\"}
";
    let (dir, config) = setup("limits-jsonpath", rules, "");
    let server = Server::start(&dir, &config);
    // 40 chains 60 deep, 17 KB: `$..*..*` could visit 2,457 nodes × 63² ≈
    // 9.8 million times (it took 6.6 s and 670 MB in a debug build).
    fn chain(depth: usize) -> Value {
        (0..depth).fold(json!(1), |inner, _| json!({"x": inner}))
    }
    let deep: Vec<Value> = (0..40).map(|_| chain(60)).collect();
    let hostile = json!({"id": "evt-deep", "event_type": "create", "entity_type": "defect",
        "entity": {"id": "1", "items": deep}});
    let r = server.post_event(&hostile);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["deliveries"], json!([]), "the costly query ran");
    // The same rule on an ordinary event runs and matches.
    let r = server.post_event(&json!({"id": "evt-small", "event_type": "create",
        "entity_type": "defect", "entity": {"id": "2", "a": {"b": 1}}}));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["deliveries"].as_array().map(Vec::len), Some(1));
    let health = crate::support::http::request(server.addr, "GET", "/healthz", &[], b"");
    assert_eq!(health.status, 200);
}

#[test]
fn a_channel_key_bound_to_spaces_opens_only_their_channels() {
    // The setup's config ends in its `api_keys` list: these lines join it.
    let keys = "  - {name: bridge, role: websocket, key: bridge-secret-0123456789, spaces: [1001, \"team-a\"]}\n  - {name: any, role: websocket, key: any-secret-0123456789}\n";
    let (_dir, server) = server("limits-spaces", keys);
    let upgrade = |space: &str, id: &str, secret: &str| {
        let head = format!(
            "GET /messaging/shared_spaces/{space}/webhooks HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {id}:{secret}\r\n\r\n"
        );
        let mut s = send(server.addr, head.as_bytes());
        answer(&mut s).expect("an answer to the upgrade")
    };
    for space in ["1001", "team-a"] {
        let (status, text) = upgrade(space, "bridge", "bridge-secret-0123456789");
        assert_eq!(status, 101, "{space}: {text}");
    }
    let (status, text) = upgrade("1002", "bridge", "bridge-secret-0123456789");
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("1001, team-a"), "{text}");
    // A session from sign-in is bound the same way.
    let body = json!({"client_id": "bridge", "client_secret": "bridge-secret-0123456789"});
    let r = crate::support::http::request(
        server.addr,
        "POST",
        "/authentication/sign_in",
        &[],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let cookie = r
        .headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .and_then(|(_, v)| v.split(';').next())
        .expect("session cookie")
        .to_string();
    let head = format!(
        "GET /messaging/shared_spaces/1002/webhooks HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nCookie: {cookie}\r\n\r\n"
    );
    let mut s = send(server.addr, head.as_bytes());
    assert_eq!(answer(&mut s).expect("answer").0, 403);
    // A key without `spaces` opens any space, as before.
    let (status, text) = upgrade("1002", "any", "any-secret-0123456789");
    assert_eq!(status, 101, "{text}");
}

#[test]
fn oversized_headers_and_deep_json_are_refused() {
    let (_dir, server) = server("limits-head", "");
    // 500 KiB of one header: past hyper's read buffer.
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(500 << 10)
    );
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(T)).ok();
    // The server may stop reading (and answer) before all of it is sent.
    let _ = s.write_all(head.as_bytes());
    let (status, text) = answer(&mut s).expect("an answer to oversized headers");
    assert_eq!(status, 431, "{text}");
    // JSON nested 200 deep is refused by name, not by a stack overflow.
    let mut body = String::from(
        r#"{"event_type": "create", "entity_type": "defect", "entity": {"id": "1", "deep": "#,
    );
    body.push_str(&"[".repeat(200));
    body.push_str(&"]".repeat(200));
    body.push_str("}}");
    let r = crate::support::http::request(
        server.addr,
        "POST",
        "/v1/events",
        &[("Authorization", &format!("Bearer {INGEST_KEY}"))],
        body.as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("recursion limit"), "{}", r.text());
    assert_eq!(server.post_event(&event("evt-after-deep")).status, 202);
}

#[test]
fn a_connection_being_served_keeps_its_slot_at_the_cap() {
    let (_dir, server) = server(
        "limits-busy",
        "server: {max_connections: 10, header_timeout: 5m, body_timeout: 5m}\n",
    );
    // A live tail is a request being served for as long as it is open.
    let mut tail = send(
        server.addr,
        format!("GET /v1/deliveries/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\r\n")
            .as_bytes(),
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tail.read(&mut buf).expect("the tail's answer");
        assert!(n > 0, "the tail closed: {seen:?}");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    // 30 slow clients for the 9 other slots: 21 of them give way, the tail
    // does not.
    let mut slow: Vec<TcpStream> = (0..30)
        .map(|_| send(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "))
        .collect();
    wait_for(T, "21 slow clients closed to make room", || {
        let n = slow
            .iter_mut()
            .filter_map(|s| closed(s).then_some(()))
            .count();
        (n >= 21).then_some(())
    });
    assert!(!closed(&mut tail), "the live tail was closed to make room");
    // And it still works: an event accepted now shows up on it.
    let r = server.post_event(&event("evt-busy"));
    assert_eq!(r.status, 202, "{}", r.text());
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("evt-busy") {
        let n = tail.read(&mut buf).expect("the tail's events");
        assert!(n > 0, "the tail closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn the_open_file_limit_is_raised_and_bounds_the_cap() {
    use std::io::BufRead as _;
    use std::os::unix::process::CommandExt as _;
    let (dir, config) = setup("limits-nofile", RULES, "");
    let log = dir.path().join("server.log");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rulehook"));
    cmd.args([
        "serve",
        "--config",
        config.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
    ])
    .env("RULEHOOK_LOG", "warn")
    .env("RULEHOOK_LOG_FORMAT", "json")
    .env("RULEHOOK_PLUGIN_CACHE", crate::support::plugin_cache())
    .stdout(std::process::Stdio::piped())
    .stderr(std::fs::File::create(&log).expect("log file"));
    // SAFETY: setrlimit is async-signal-safe; the child runs nothing else
    // before exec.
    unsafe {
        cmd.pre_exec(|| {
            // A soft limit of 512 under a hard one of 700, as a service
            // manager might leave them.
            let lim = libc::rlimit {
                rlim_cur: 512,
                rlim_max: 700,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start rulehook serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the listening line");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("limits");
    let _ = child.kill();
    let _ = child.wait();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("the open-files line");
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(
        numbers,
        ["700", "700"],
        "soft limit not raised: {open_files}"
    );
    // 700 less 256 kept for the store and files, less max_in_flight (256).
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("leaves room for fewer connections") && text.contains("\"using\":188"),
        "{text}"
    );
}
