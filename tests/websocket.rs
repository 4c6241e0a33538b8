//! The WebSocket channel through the real binary: clients sign in (or
//! send a Bearer client id and secret), connect to their shared space, and
//! receive the deliveries of `transport: websocket` rules as text frames;
//! with no client connected a delivery waits in the store, across a
//! restart, until one connects.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

use crate::support::http::{Reply, request};
use crate::support::server::{INGEST_KEY, Server, setup};
use crate::support::wait_for;

const T: Duration = Duration::from_secs(20);
const CLIENT: &str = "ci-bridge";
const SECRET: &str = "ws-secret-0123456789";

pub(crate) const RULES: &str = "rules:
  - name: ws-defects
    events: [update]
    entity_types: [defect]
    webhook: {transport: websocket}
";

/// A key of role websocket; the setup's config ends in its `api_keys`
/// list, so this line joins it.
pub(crate) fn channel_key() -> String {
    format!("  - {{name: {CLIENT}, role: websocket, key: {SECRET}}}\n")
}

pub(crate) fn defect_update(id: &str, scope: Value) -> Value {
    json!({"id": id, "event_type": "update", "entity_type": "defect", "scope": scope,
        "entity": {"id": "2013", "name": "Login fails"},
        "before": {"id": "2013", "name": "Login failed"}})
}

fn sign_in(addr: SocketAddr, id: &str, secret: &str) -> Reply {
    let body = json!({"client_id": id, "client_secret": secret}).to_string();
    request(
        addr,
        "POST",
        "/authentication/sign_in",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

/// Opens the channel of `space`, sending `header` (Cookie or
/// Authorization) with the upgrade; `Err` holds the refusal's status.
pub(crate) fn connect(
    addr: SocketAddr,
    space: &str,
    header: Option<(&str, &str)>,
) -> Result<WebSocket<TcpStream>, u16> {
    let url = format!("ws://{addr}/messaging/shared_spaces/{space}/webhooks");
    let mut req = url.into_client_request().expect("request");
    if let Some((k, v)) = header {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(T)).expect("timeout");
    match tungstenite::client(req, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Err(resp.status().as_u16())
        }
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

/// The next text frame, as JSON (pings are answered on the way).
pub(crate) fn next_frame(ws: &mut WebSocket<TcpStream>) -> Value {
    loop {
        match ws.read().expect("a frame before the timeout") {
            Message::Text(text) => {
                return serde_json::from_str(text.as_str()).expect("JSON frame");
            }
            Message::Close(c) => panic!("the server closed the channel: {c:?}"),
            _ => {}
        }
    }
}

pub(crate) fn bearer() -> String {
    format!("Bearer {CLIENT}:{SECRET}")
}

fn one_delivery(server: &Server, reply: &Reply) -> String {
    assert_eq!(reply.status, 202, "{}", reply.text());
    let ids = reply.json()["deliveries"].as_array().cloned().unwrap();
    assert_eq!(ids.len(), 1, "{}", reply.text());
    let id = ids[0].as_str().unwrap().to_string();
    assert!(server.delivery(&id)["delivery"]["state"].is_string());
    id
}

#[test]
fn clients_sign_in_and_receive_the_deliveries_of_their_space() {
    let (dir, cfg) = setup("ws-receive", RULES, &channel_key());
    let server = Server::start(&dir, &cfg);
    let addr = server.addr;

    // Sign-in: wrong secret, a key of another role, then the right one.
    assert_eq!(sign_in(addr, CLIENT, "wrong-secret-0123456").status, 401);
    assert_eq!(sign_in(addr, "ingest", INGEST_KEY).status, 401);
    let bad = request(
        addr,
        "POST",
        "/authentication/sign_in",
        &[],
        b"{\"client_id\": 1}",
    );
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(bad.json()["error"]["field"], "client_id");
    let ok = sign_in(addr, CLIENT, SECRET);
    assert_eq!(ok.status, 200, "{}", ok.text());
    let cookie = ok
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.split(';').next().unwrap().to_string())
        .expect("a session cookie");
    assert!(cookie.starts_with("LWSSO_COOKIE_KEY="), "{cookie}");

    // No credentials, a made-up session, or the channel key on the admin
    // API: all refused.
    assert_eq!(connect(addr, "1001", None).err(), Some(401));
    let forged = ("Cookie", "LWSSO_COOKIE_KEY=00ff");
    assert_eq!(connect(addr, "1001", Some(forged)).err(), Some(401));
    let as_admin = request(
        addr,
        "GET",
        "/v1/deliveries",
        &[("Authorization", &format!("Bearer {SECRET}"))],
        b"",
    );
    assert_eq!(as_admin.status, 403, "{}", as_admin.text());

    // Authenticated, but not a WebSocket upgrade: 400 says what is wanted.
    let plain = request(
        addr,
        "GET",
        "/messaging/shared_spaces/1001/webhooks",
        &[("Authorization", &bearer())],
        b"",
    );
    assert_eq!(plain.status, 400, "{}", plain.text());
    assert!(
        plain.text().contains("Upgrade: websocket"),
        "{}",
        plain.text()
    );

    let mut space_1001 = connect(addr, "1001", Some(("Cookie", &cookie))).expect("cookie upgrade");
    let mut space_2002 = connect(addr, "2002", Some(("Authorization", &bearer()))).expect("bearer");
    wait_for(T, "both clients counted in /metrics", || {
        let m = server.admin("GET", "/metrics", None).text();
        m.contains("rulehook_websocket_clients 2").then_some(())
    });

    let reply = server.post_event(&defect_update("ws-1", json!({"sharedspace_id": 1001})));
    let id = one_delivery(&server, &reply);
    let frame = next_frame(&mut space_1001);
    let shown = wait_for(T, "the delivery to succeed", || {
        let d = server.delivery(&id);
        (d["delivery"]["state"] == "succeeded").then_some(d)
    });
    // The frame is the payload an HTTP endpoint would get, byte for byte
    // the stored body.
    assert_eq!(frame, shown["body"]);
    assert_eq!(frame["event_id"], "ws-1");
    let attempt = &shown["attempts"][0];
    assert_eq!(attempt["method"], "WEBSOCKET");
    assert_eq!(attempt["url"], "/messaging/shared_spaces/1001/webhooks");
    assert_eq!(attempt["outcome"], format!("succeeded: sent to {CLIENT}"));
    assert_eq!(shown["delivery"]["space"], "1001");

    // The other space's client got nothing of it; its own event, yes.
    let reply = server.post_event(&defect_update("ws-2", json!({"sharedspace_id": "2002"})));
    one_delivery(&server, &reply);
    assert_eq!(next_frame(&mut space_2002)["event_id"], "ws-2");
    space_1001
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        space_1001.read().is_err(),
        "space 1001 got a frame of space 2002"
    );

    // Shutting down closes the channel with "going away", and does not
    // wait on connected clients.
    let mut server = server;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    let status = wait_for(T, "the server to exit", || {
        server.child.try_wait().expect("wait")
    });
    assert!(status.success(), "{status:?}");
    let close = loop {
        match space_2002.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(e) => panic!("the channel ended without a close frame: {e}"),
        }
    };
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1001));
}

#[test]
fn deliveries_wait_in_the_store_for_a_client_even_across_a_restart() {
    let (dir, cfg) = setup("ws-wait", RULES, &channel_key());
    let server = Server::start(&dir, &cfg);

    let reply = server.post_event(&defect_update("wait-1", json!({"sharedspace_id": 1001})));
    let id = one_delivery(&server, &reply);
    let parked = wait_for(T, "the delivery to wait for a client", || {
        let d = server.delivery(&id);
        (d["delivery"]["state"] == "parked").then_some(d)
    });
    let reason = parked["delivery"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("shared space 1001"), "{reason}");
    assert_eq!(parked["attempts"], json!([]), "nothing was sent yet");

    // An event with no shared space cannot reach any client: it fails at
    // once, saying why, instead of waiting forever.
    let reply = server.post_event(&defect_update("nowhere", json!({"workspace_id": 1002})));
    let lost = one_delivery(&server, &reply);
    let d = server.delivery(&lost);
    assert_eq!(d["delivery"]["state"], "failed");
    let why = d["delivery"]["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("sharedspace_id") && why.contains("space"),
        "{why}"
    );

    assert_eq!(
        channels(&server),
        json!([{"space": "1001", "path": "/messaging/shared_spaces/1001/webhooks", "clients": 0, "parked": 1}]),
        "operators see the space waiting for a client"
    );

    let status = server.stop();
    assert!(status.success(), "{status:?}");
    let server = Server::start(&dir, &cfg);
    assert_eq!(server.delivery(&id)["delivery"]["state"], "parked");

    let mut ws = connect(server.addr, "1001", Some(("Authorization", &bearer()))).expect("bearer");
    let frame = next_frame(&mut ws);
    assert_eq!(frame["event_id"], "wait-1");
    let done = wait_for(T, "the delivery to succeed", || {
        let d = server.delivery(&id);
        (d["delivery"]["state"] == "succeeded").then_some(d)
    });
    assert_eq!(done["attempts"].as_array().map(Vec::len), Some(1));
    assert_eq!(done["body"], frame);
    let listed = channels(&server);
    assert_eq!(
        (listed[0]["clients"].as_u64(), listed[0]["parked"].as_u64()),
        (Some(1), Some(0)),
        "{listed}"
    );
    let cli = crate::support::rulehook(&[
        "endpoints",
        "list",
        "--server",
        &format!("http://{}", server.addr),
        "--api-key",
        crate::support::server::ADMIN_KEY,
    ]);
    let text = crate::support::stdout(&cli);
    assert!(
        text.contains("websocket space 1001  clients 1  parked 0"),
        "{text}"
    );
}

/// The WebSocket spaces `GET /v1/endpoints` lists.
fn channels(server: &Server) -> Value {
    let r = server.admin("GET", "/v1/endpoints", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["channels"].clone()
}

#[test]
fn the_channel_command_prints_deliveries_and_refuses_bad_credentials() {
    use std::io::BufRead;
    let (dir, cfg) = setup("ws-cli", RULES, &channel_key());
    let server = Server::start(&dir, &cfg);
    let url = format!("http://{}", server.addr);
    let channel = |secret: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rulehook"))
            .args(["channel", "1001", "--server", &url, "--client-id", CLIENT])
            .env("RULEHOOK_CLIENT_SECRET", secret)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start rulehook channel")
    };

    let refused = channel("wrong-secret-0123456")
        .wait_with_output()
        .expect("wait");
    assert_eq!(refused.status.code(), Some(2));
    let text = String::from_utf8_lossy(&refused.stdout);
    assert!(text.contains("refused client `ci-bridge` (401)"), "{text}");

    let mut child = channel(SECRET);
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut printed = String::new();
    let mut read_until = |want: &str| loop {
        let line = rx
            .recv_timeout(T)
            .unwrap_or_else(|_| panic!("no `{want}` in:\n{printed}"));
        printed.push_str(&line);
        printed.push('\n');
        if line.contains(want) {
            break;
        }
    };
    read_until("connected to ws://");
    let reply = server.post_event(&defect_update("ws-cli-1", json!({"sharedspace_id": 1001})));
    one_delivery(&server, &reply);
    read_until("\"event_id\": \"ws-cli-1\"");
    let _ = child.kill();
    let _ = child.wait();
}
