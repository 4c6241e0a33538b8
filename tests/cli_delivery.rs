//! `rulehook listen`, `test-connection` and `deliveries` as a user runs them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;

use crate::support::http::request;
use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{ADMIN_KEY, Server, setup};
use crate::support::wait_for;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn listen_verifies_signatures_and_basic_auth() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rulehook"))
        .args([
            "listen",
            "--port",
            &port.to_string(),
            "--secret",
            "s3cret",
            "--user",
            "u",
            "--password",
            "p",
            "--status",
            "202",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start listen");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains(&format!("127.0.0.1:{port}")), "{first}");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let body = br#"{"event_id":"evt-1"}"#;
    let sig = rulehook::sign::hmac_sha256_header("s3cret", body);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("u:p")
    );
    let good = request(
        addr,
        "POST",
        "/hook",
        &[("X-Rulehook-Signature", &sig), ("Authorization", &auth)],
        body,
    );
    assert_eq!(good.status, 202);
    let tampered = request(
        addr,
        "POST",
        "/hook",
        &[("X-Rulehook-Signature", &sig), ("Authorization", &auth)],
        b"{}",
    );
    assert_eq!(tampered.status, 401);
    assert!(
        tampered.text().contains("does not match"),
        "{}",
        tampered.text()
    );
    let wrong_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("u:nope")
    );
    assert_eq!(
        request(
            addr,
            "POST",
            "/hook",
            &[
                ("X-Rulehook-Signature", &sig),
                ("Authorization", &wrong_auth)
            ],
            body
        )
        .status,
        401
    );
    let mut printed = String::new();
    while !printed.contains("=> 401\n=> 401") && !printed.matches("=> ").count().eq(&3) {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        printed.push_str(&line);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        printed.contains("signature: ok (X-Rulehook-Signature)"),
        "{printed}"
    );
    assert!(printed.contains("\"event_id\": \"evt-1\""), "{printed}");
    assert!(
        printed.contains("auth: WRONG: wrong basic authentication"),
        "{printed}"
    );
    assert!(!printed.contains("dTpw"), "credentials are not printed");
}

#[test]
fn test_connection_posts_with_test_true() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - {{name: ci, events: [create], webhook: {{url: \"{}\", secret: {{env: TC_SECRET}}}}}}\n",
        rx.url("/hooks/ci")
    );
    let (dir, config) = setup(
        "test-connection",
        &rules,
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_rulehook"))
        .args([
            "test-connection",
            "ci",
            "--config",
            config.to_str().unwrap(),
        ])
        .env("TC_SECRET", "tc-secret-value")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("=> 200"), "{text}");
    let got = rx.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/hooks/ci?test=true");
    assert_eq!(got[0].json()["test"], true);
    let sig = rulehook::sign::hmac_sha256_header("tc-secret-value", &got[0].body);
    assert_eq!(got[0].header("x-rulehook-signature"), Some(sig.as_str()));
    drop(dir);
}

#[test]
fn the_admin_api_tests_a_connection_from_the_server() {
    let rx = Receiver::start(vec![Answer::status(204).with_header("X-Seen", "yes")]);
    let rules = format!(
        "rules:\n  - {{name: ci, events: [create], webhook: {{url: \"{}\", secret: tc-secret-value}}}}\n  - {{name: ws, events: [create], webhook: {{transport: websocket}}}}\n  - {{name: refused, events: [create], webhook: {{url: \"http://169.254.169.254/x\"}}}}\n",
        rx.url("/hooks/ci")
    );
    let (dir, config) = setup(
        "test-connection-api",
        &rules,
        &format!("http_ports: [{}, 80]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let r = server.admin("POST", "/v1/rules/ci/test", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["ok"].as_bool(), v["status"].as_u64()),
        (Some(true), Some(204)),
        "{v}"
    );
    assert_eq!(v["url"], rx.url("/hooks/ci?test=true"));
    assert!(v["headers"].to_string().contains("x-seen"), "{v}");
    let got = rx.received();
    assert_eq!(got.len(), 1, "one test request");
    assert_eq!(got[0].json()["test"], true);
    let sig = rulehook::sign::hmac_sha256_header("tc-secret-value", &got[0].body);
    assert_eq!(got[0].header("x-rulehook-signature"), Some(sig.as_str()));
    assert!(server.deliveries("").is_empty(), "a test stores nothing");

    let refused = server.admin("POST", "/v1/rules/refused/test", None).json();
    assert_eq!(refused["ok"], false, "{refused}");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("refused by the outbound policy") && error.contains("169.254.169.254"),
        "{error}"
    );
    let ws = server.admin("POST", "/v1/rules/ws/test", None);
    assert_eq!(ws.status, 422, "{}", ws.text());
    assert!(ws.text().contains("WebSocket"), "{}", ws.text());
    assert_eq!(
        server.admin("POST", "/v1/rules/nope/test", None).status,
        404
    );
}

#[test]
fn deliveries_commands_list_show_and_redeliver() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - {{name: r, events: [create], webhook: {{url: \"{}\"}}}}\n",
        rx.url("/h")
    );
    let (dir, config) = setup(
        "cli-deliveries",
        &rules,
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let id = server.post_event(&json!({"id": "evt-cli", "event_type": "create", "entity_type": "task", "entity": {"id": "t1"}})).json()["deliveries"][0]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(Duration::from_secs(20), "success", || {
        (server.delivery(&id)["delivery"]["state"] == "succeeded").then_some(())
    });
    let server_url = format!("http://{}", server.addr);
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--server", &server_url, "--api-key", ADMIN_KEY]);
        let out = Command::new(env!("CARGO_BIN_EXE_rulehook"))
            .args(&all)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let list = run(&["deliveries", "list", "--rule", "r"]);
    assert!(
        list.contains(&id) && list.contains("succeeded") && list.contains("1 deliveries"),
        "{list}"
    );
    let show = run(&["deliveries", "show", &id, "--format", "json"]);
    let shown: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(shown["attempts"][0]["status"], 200);
    run(&["deliveries", "redeliver", &id]);
    let got = rx.wait_for(2, Duration::from_secs(20));
    assert_eq!(got[1].header("x-rulehook-delivery"), Some(id.as_str()));
    let eps = run(&["endpoints", "list"]);
    assert!(
        eps.contains(&format!("http://127.0.0.1:{}", rx.addr.port())) && eps.contains(" ok "),
        "{eps}"
    );
    // A wrong key is reported, not ignored.
    let out = Command::new(env!("CARGO_BIN_EXE_rulehook"))
        .args([
            "deliveries",
            "list",
            "--server",
            &server_url,
            "--api-key",
            "wrong-key-0123456789",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
