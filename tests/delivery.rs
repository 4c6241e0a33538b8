//! Durable delivery through the real binary to real receivers on 127.0.0.1:
//! payloads and headers, signatures, retries, Retry-After, 410, redelivery,
//! outbound refusals, bad input, idempotency, HTTPS.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{INGEST_KEY, Server, setup};
use crate::support::wait_for;

const T: Duration = Duration::from_secs(20);

fn defect_update(id: &str) -> Value {
    json!({"id": id, "event_type": "update", "entity_type": "defect",
        "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
        "user": {"id": "1001", "email": "admin@example.com"},
        "occurred_at": "2026-11-22T10:00:00Z",
        "entity": {"id": "2013", "name": "Login fails", "phase": {"id": "phase.defect.opened"}, "rework_counter_udf": 3},
        "before": {"id": "2013", "name": "Login fails", "phase": {"id": "phase.defect.fixed"}, "rework_counter_udf": 2}})
}

fn rule(name: &str, url: &str, webhook_extra: &str) -> String {
    format!(
        "rules:\n  - name: {name}\n    events: [update]\n    entity_types: [defect]\n    webhook:\n      url: {url}\n{webhook_extra}"
    )
}

fn hmac_hex(key: &[u8], body: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("key");
    m.update(body);
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Standard Webhooks verification written from the specification, not
/// with rulehook's own signing code: HMAC-SHA256 over "id.timestamp.body"
/// with the base64-decoded part of the whsec_ secret.
fn standard_webhooks_valid(secret: &str, id: &str, ts: &str, body: &[u8], header: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("base64 secret");
    let mut m = Hmac::<Sha256>::new_from_slice(&key).expect("key");
    m.update(format!("{id}.{ts}.").as_bytes());
    m.update(body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
    );
    header.split(' ').any(|s| s == expected)
}

#[test]
fn delivers_the_payload_with_every_header_signed() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let rules = rule(
        "defect-reopened",
        &rx.url("/hooks/qa"),
        "      headers: {X-Team: qa}\n      credentials: {username: octane, password: {env: TEST_HOOK_PASSWORD}}\n      secret: [{env: TEST_HOOK_SECRET}, {env: TEST_OLD_SECRET}]\n      signature: [hmac-sha256, standard-webhooks]\n",
    );
    let (dir, config) = setup(
        "happy",
        &rules,
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    // Secrets come from the environment of the server process.
    unsafe_env(&[
        ("TEST_HOOK_PASSWORD", "p4ss"),
        ("TEST_HOOK_SECRET", whsec),
        ("TEST_OLD_SECRET", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"),
    ]);
    let server = Server::start(&dir, &config);
    let reply = server.post_event(&defect_update("evt-1"));
    assert_eq!(reply.status, 202, "{}", reply.text());
    let accepted = reply.json();
    assert_eq!(accepted["event_id"], "evt-1");
    assert_eq!(accepted["duplicate"], false);
    let delivery_id = accepted["deliveries"][0]
        .as_str()
        .expect("a delivery id")
        .to_string();

    let got = rx.wait_for(1, T);
    let r = &got[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/hooks/qa"));
    let body = r.json();
    assert_eq!(body["event_id"], "evt-1");
    assert_eq!(body["rule"], "defect-reopened");
    assert_eq!(body["entity"]["id"], "2013");
    assert_eq!(body["entity"]["type"], "defect");
    assert_eq!(
        body["changes"]["phase"],
        json!({"old": {"id": "phase.defect.fixed"}, "new": {"id": "phase.defect.opened"}})
    );
    assert_eq!(body["scope"]["workspace_id"], 1002);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-team"), Some("qa"));
    assert_eq!(r.header("x-rulehook-delivery"), Some(delivery_id.as_str()));
    assert_eq!(r.header("x-rulehook-event"), Some("evt-1"));
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("octane:p4ss")
    );
    assert_eq!(r.header("authorization"), Some(basic.as_str()));
    assert_eq!(
        r.header("x-rulehook-signature"),
        Some(format!("sha256={}", hmac_hex(whsec.as_bytes(), &r.body)).as_str())
    );
    assert_eq!(r.header("webhook-id"), Some(delivery_id.as_str()));
    let ts = r.header("webhook-timestamp").expect("webhook-timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        ts.parse::<u64>().unwrap().abs_diff(now) < 60,
        "fresh timestamp"
    );
    let sig = r.header("webhook-signature").expect("webhook-signature");
    assert_eq!(
        sig.split(' ').count(),
        2,
        "one signature per secret during rotation: {sig}"
    );
    assert!(
        standard_webhooks_valid(whsec, &delivery_id, ts, &r.body, sig),
        "{sig}"
    );
    assert!(standard_webhooks_valid(
        "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
        &delivery_id,
        ts,
        &r.body,
        sig
    ));

    // The record: the attempt with redacted credentials and the answer.
    let record = wait_for(T, "the delivery to succeed", || {
        let d = server.delivery(&delivery_id);
        (d["delivery"]["state"] == "succeeded").then_some(d)
    });
    let attempt = &record["attempts"][0];
    assert_eq!(attempt["number"], 1);
    assert_eq!(attempt["status"], 200);
    assert_eq!(attempt["response_body"], "{\"ok\":true}");
    let headers: Vec<(String, String)> =
        serde_json::from_value(attempt["request_headers"].clone()).unwrap();
    assert!(
        headers.contains(&("Authorization".into(), "Basic ***".into())),
        "{headers:?}"
    );
    assert!(
        !attempt.to_string().contains("p4ss"),
        "the password never appears in records"
    );
    assert_eq!(record["body"], body, "the stored body is the one sent");
    server.stop();
}

/// A header value from `{env: NAME}` (an API key) reaches the receiver,
/// while the attempt record shows `***` and neither the record, the rules
/// listing nor the data directory holds the value. After a restart with
/// the rule changed, a redelivery bound to the old version resolves its
/// stored reference again and sends the rotated value.
#[test]
fn a_header_from_the_environment_is_sent_but_never_shown_or_stored() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let (token, rotated) = ("tok-3c9f1e7a-api-key", "tok-rotated-51d0b2");
    let headers = "      headers: {X-Team: qa, X-Api-Key: {env: TEST_HEADER_TOKEN}}\n";
    let (dir, config) = setup(
        "header-secret",
        &rule("api-key", &rx.url("/h"), headers),
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start_with_env(&dir, &config, &[("TEST_HEADER_TOKEN", token)]);
    let reply = server.post_event(&defect_update("evt-header"));
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["deliveries"][0]
        .as_str()
        .expect("a delivery id")
        .to_string();
    let got = rx.wait_for(1, T);
    assert_eq!(got[0].header("x-api-key"), Some(token));
    assert_eq!(got[0].header("x-team"), Some("qa"));

    let record = wait_for(T, "the delivery to succeed", || {
        let d = server.delivery(&id);
        (d["delivery"]["state"] == "succeeded").then_some(d)
    });
    let recorded: Vec<(String, String)> =
        serde_json::from_value(record["attempts"][0]["request_headers"].clone()).unwrap();
    assert!(
        recorded.contains(&("X-Api-Key".into(), "***".into())),
        "{recorded:?}"
    );
    assert!(
        recorded.contains(&("X-Team".into(), "qa".into())),
        "{recorded:?}"
    );
    assert!(!record.to_string().contains(token), "{record}");
    let rules = server.admin("GET", "/v1/rules", None);
    assert_eq!(rules.status, 200, "{}", rules.text());
    assert_eq!(rules.json()["rules"][0]["name"], "api-key");
    assert!(!rules.text().contains(token), "{}", rules.text());
    assert!(server.stop().success());

    // A new URL makes a new version; the delivery stays bound to the old
    // one, which start-up reads back from the store and resolves anew.
    dir.write(
        "rules/rules.yaml",
        &rule("api-key", &rx.url("/moved"), headers),
    );
    let server = Server::start_with_env(&dir, &config, &[("TEST_HEADER_TOKEN", rotated)]);
    let r = server.admin("POST", &format!("/v1/deliveries/{id}/redeliver"), None);
    assert_eq!(r.status, 202, "{}", r.text());
    let got = rx.wait_for(2, T);
    assert_eq!(got[1].path, "/h", "sent with the version it is bound to");
    assert_eq!(got[1].header("x-api-key"), Some(rotated));
    let record = wait_for(T, "the redelivery to succeed", || {
        let d = server.delivery(&id);
        (d["delivery"]["state"] == "succeeded" && d["attempts"].as_array()?.len() == 2).then_some(d)
    });
    assert!(!record.to_string().contains(rotated), "{record}");
    assert!(server.stop().success());
    if !crate::support::server::postgres_mode() {
        for file in files_under(&dir.path().join("data")) {
            let bytes = std::fs::read(&file).unwrap_or_default();
            for value in [token, rotated] {
                assert!(
                    !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                    "{} holds a header secret",
                    file.display()
                );
            }
        }
    }
}

/// Every file under `dir`, at any depth.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    assert!(!out.is_empty(), "no files under {}", dir.display());
    out
}

/// Sets variables the server processes started after this inherit. Tests
/// use distinct names, so running in parallel does not make them clash.
fn unsafe_env(vars: &[(&str, &str)]) {
    for (k, v) in vars {
        // SAFETY: each test sets its own variable names, never read or
        // written concurrently by another thread of this test binary.
        unsafe { std::env::set_var(k, v) };
    }
}

#[test]
fn retries_on_the_fixed_policy_with_the_same_delivery_id() {
    let rx = Receiver::start(vec![
        Answer::status(500),
        Answer::status(404),
        Answer::status(503),
        Answer::status(200),
    ]);
    let rules = rule(
        "r",
        &rx.url("/h"),
        "      retry: {policy: fixed, interval: 300ms, retries: 3}\n",
    );
    let (dir, config) = setup(
        "fixed",
        &rules,
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&defect_update("evt-r")).status, 202);
    let got = rx.wait_for(4, T);
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.header("x-rulehook-delivery").unwrap().to_string())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    let attempts: Vec<_> = got
        .iter()
        .map(|r| r.header("x-rulehook-attempt").unwrap().to_string())
        .collect();
    assert_eq!(attempts, ["1", "2", "3", "4"]);
    for pair in got.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(280),
            "retried after {gap:?}, interval is 300ms"
        );
    }
    let d = wait_for(T, "success", || {
        let d = server.delivery(&ids[0]);
        (d["delivery"]["state"] == "succeeded").then_some(d)
    });
    let statuses: Vec<_> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(500), json!(404), json!(503), json!(200)]);
    assert!(
        d["attempts"][0]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("retry in"),
        "{}",
        d["attempts"][0]
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.received().len(), 4, "no send after success");
}

#[test]
fn gives_up_after_the_exponential_schedule() {
    let rx = Receiver::start(vec![Answer::status(502)]);
    let rules = rule(
        "r",
        &rx.url("/h"),
        "      retry: {policy: exponential, intervals: [200ms, 600ms], jitter: 0}\n",
    );
    let (dir, config) = setup(
        "expo",
        &rules,
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let id = server.post_event(&defect_update("evt-x")).json()["deliveries"][0]
        .as_str()
        .unwrap()
        .to_string();
    let got = rx.wait_for(3, T);
    let gaps: Vec<Duration> = got.windows(2).map(|p| p[1].at - p[0].at).collect();
    assert!(
        gaps[0] >= Duration::from_millis(190) && gaps[0] < Duration::from_millis(550),
        "{gaps:?}"
    );
    assert!(gaps[1] >= Duration::from_millis(590), "{gaps:?}");
    let d = wait_for(T, "failure", || {
        let d = server.delivery(&id);
        (d["delivery"]["state"] == "failed").then_some(d)
    });
    assert_eq!(
        d["delivery"]["reason"],
        "gave up after 3 attempts; last: HTTP 502"
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(rx.received().len(), 3, "no fourth send");
    // A failed delivery is listed by status, and redelivery keeps its id.
    let failed = server.deliveries("status=failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(
        server
            .admin("POST", &format!("/v1/deliveries/{id}/redeliver"), None)
            .status,
        202
    );
    let again = rx.wait_for(4, T);
    assert_eq!(again[3].header("x-rulehook-delivery"), Some(id.as_str()));
    assert_eq!(again[3].header("x-rulehook-attempt"), Some("4"));
}

#[test]
fn honours_retry_after() {
    let rx = Receiver::start(vec![
        Answer::status(429).with_header("Retry-After", "2"),
        Answer::status(200),
    ]);
    let rules = rule(
        "r",
        &rx.url("/h"),
        "      retry: {policy: fixed, interval: 100ms, retries: 3}\n",
    );
    let (dir, config) = setup(
        "retry-after",
        &rules,
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&defect_update("evt-ra")).status, 202);
    let got = rx.wait_for(2, T);
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "Retry-After: 2 was not honoured: {gap:?}"
    );
}

#[test]
fn gone_disables_the_endpoint_until_an_admin_unblocks_it() {
    let rx = Receiver::start(vec![Answer::status(410), Answer::status(200)]);
    let rules = rule(
        "r",
        &rx.url("/h"),
        "      retry: {policy: fixed, interval: 100ms, retries: 3}\n",
    );
    let (dir, config) = setup(
        "gone",
        &rules,
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let first = server.post_event(&defect_update("evt-g1")).json()["deliveries"][0]
        .as_str()
        .unwrap()
        .to_string();
    rx.wait_for(1, T);
    wait_for(T, "the 410 delivery to park", || {
        (server.delivery(&first)["delivery"]["state"] == "parked").then_some(())
    });
    let second = server.post_event(&defect_update("evt-g2")).json()["deliveries"][0]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(T, "the next delivery to park", || {
        (server.delivery(&second)["delivery"]["state"] == "parked").then_some(())
    });
    assert_eq!(
        rx.received().len(),
        1,
        "nothing is sent to a disabled endpoint"
    );
    let eps = server.admin("GET", "/v1/endpoints", None).json();
    let ep = &eps["endpoints"][0];
    assert_eq!(ep["disabled"], true);
    assert_eq!(ep["parked"], 2);
    let endpoint = ep["endpoint"].as_str().unwrap().to_string();
    let r = server.admin(
        "POST",
        "/v1/endpoints/unblock",
        Some(&json!({"endpoint": endpoint})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["resumed"], 2);
    let got = rx.wait_for(3, T);
    let ids: Vec<_> = got[1..]
        .iter()
        .map(|r| r.header("x-rulehook-delivery").unwrap().to_string())
        .collect();
    assert!(ids.contains(&first) && ids.contains(&second), "{ids:?}");
}

#[test]
fn refuses_forbidden_destinations_without_sending() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - {{name: wrong-port, events: [update], webhook: {{url: \"{}\"}}}}\n  - {{name: metadata, events: [update], webhook: {{url: \"https://169.254.169.254/latest\"}}}}\n  - {{name: private, events: [update], webhook: {{url: \"https://10.1.2.3/h\"}}}}\n  - {{name: loopback-name, events: [update], webhook: {{url: \"https://localhost:1/h\"}}}}\n",
        rx.url("/h")
    );
    // http_ports does not list the receiver's port; loopback is not allowed.
    let dir = crate::support::TempDir::new("refuse");
    dir.write("rules/rules.yaml", &rules);
    let config = dir.write(
        "rulehook.yaml",
        &format!("rules_dir: rules\ndata_dir: data\nallow_http: true\napi_keys:\n  - {{name: a, role: admin, key: {}}}\n  - {{name: i, role: ingest, key: {INGEST_KEY}}}\n", crate::support::server::ADMIN_KEY),
    );
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&defect_update("evt-ssrf")).status, 202);
    let reasons = wait_for(T, "every delivery to fail", || {
        let list = server.deliveries("status=failed");
        (list.len() == 4).then(|| {
            list.iter()
                .map(|d| {
                    (
                        d["rule"].as_str().unwrap().to_string(),
                        d["reason"].as_str().unwrap().to_string(),
                    )
                })
                .collect::<Vec<_>>()
        })
    });
    let reason = |rule: &str| {
        reasons
            .iter()
            .find(|(r, _)| r == rule)
            .map(|(_, why)| why.clone())
            .unwrap()
    };
    assert!(
        reason("wrong-port").contains("plain HTTP to port"),
        "{}",
        reason("wrong-port")
    );
    assert!(
        reason("metadata").contains("169.254.169.254 is a link-local, metadata"),
        "{}",
        reason("metadata")
    );
    assert!(
        reason("private").contains("10.1.2.3 is a private or loopback address"),
        "{}",
        reason("private")
    );
    assert!(
        reason("loopback-name").contains("is a private or loopback address"),
        "{}",
        reason("loopback-name")
    );
    assert!(rx.received().is_empty(), "nothing was sent");
}

#[test]
fn bad_input_is_refused_and_nothing_is_stored() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let (dir, config) = setup(
        "bad-input",
        &rule("r", &rx.url("/h"), ""),
        &format!("http_ports: [{}]\nmax_body: 4KiB\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let auth = format!("Bearer {INGEST_KEY}");
    let post = |body: &[u8], ct: &str| {
        crate::support::http::request(
            server.addr,
            "POST",
            "/v1/events",
            &[("Authorization", &auth), ("Content-Type", ct)],
            body,
        )
    };

    let r = post(
        br#"{"event_type": "update", "entity_type": "defect", "entity": {"id": "1"}}"#,
        "application/json",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["field"], "before");
    let r = post(b"{not json", "application/json");
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    // A batch with one bad line stores none of its events.
    let good = defect_update("evt-batch-1").to_string();
    let r = post(
        format!("{good}\n{{\"event_type\": \"create\"}}\n").as_bytes(),
        "application/x-ndjson",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["line"], 2);
    let big = format!(
        "{{\"event_type\": \"create\", \"entity_type\": \"d\", \"entity\": {{\"id\": \"1\", \"x\": \"{}\"}}}}",
        "a".repeat(8000)
    );
    assert_eq!(post(big.as_bytes(), "application/json").status, 413);
    // Keys: none is 401, an ingest key on an admin route is 403.
    assert_eq!(
        crate::support::http::request(server.addr, "GET", "/v1/deliveries", &[], b"").status,
        401
    );
    assert_eq!(
        crate::support::http::request(
            server.addr,
            "GET",
            "/v1/deliveries",
            &[("Authorization", &auth)],
            b""
        )
        .status,
        403
    );
    assert_eq!(
        crate::support::http::request(server.addr, "GET", "/healthz", &[], b"").status,
        200
    );

    assert!(server.deliveries("").is_empty(), "nothing was stored");
    std::thread::sleep(Duration::from_millis(300));
    assert!(rx.received().is_empty());
    // Then a good batch of two is accepted in one request.
    let two = format!("{good}\n{}\n", defect_update("evt-batch-2"));
    let r = post(two.as_bytes(), "application/x-ndjson");
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["events"].as_array().unwrap().len(), 2);
    rx.wait_for(2, T);
}

#[test]
fn the_same_event_id_twice_delivers_once() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let (dir, config) = setup(
        "idempotent",
        &rule("r", &rx.url("/h"), ""),
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let first = server.post_event(&defect_update("evt-same")).json();
    let second = server.post_event(&defect_update("evt-same")).json();
    assert_eq!(first["deliveries"], second["deliveries"]);
    assert_eq!(second["duplicate"], true);
    rx.wait_for(1, T);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.received().len(), 1);
    // Restarted, the id is still known.
    server.stop();
    let server = Server::start(&dir, &config);
    assert_eq!(
        server.post_event(&defect_update("evt-same")).json()["duplicate"],
        true
    );
}

#[test]
fn https_receivers_with_a_trusted_ca_or_verification_off() {
    let rx = Receiver::start_tls(vec![Answer::status(200)]);
    let url = format!("https://localhost:{}/secure", rx.addr.port());
    let rules = format!(
        "rules:\n  - {{name: trusted, events: [update], webhook: {{url: \"{url}\"}}}}\n  - {{name: unverified, events: [update], webhook: {{url: \"{url}\", tls: {{verify: false}}}}}}\n"
    );
    let (dir, config) = setup("tls", &rules, "ca_file: ca.pem\n");
    dir.write("ca.pem", rx.cert_pem.as_deref().unwrap());
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&defect_update("evt-tls")).status, 202);
    let got = rx.wait_for(2, T);
    assert!(got.iter().all(|r| r.path == "/secure"));
    wait_for(T, "both to succeed", || {
        (server.deliveries("status=succeeded").len() == 2).then_some(())
    });
}

#[test]
fn an_untrusted_certificate_fails_the_attempt() {
    let rx = Receiver::start_tls(vec![Answer::status(200)]);
    let url = format!("https://localhost:{}/secure", rx.addr.port());
    let rules = format!(
        "rules:\n  - {{name: strict, events: [update], webhook: {{url: \"{url}\", retry: {{policy: none}}}}}}\n"
    );
    let (dir, config) = setup("tls-strict", &rules, "");
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&defect_update("evt-tls2")).status, 202);
    let d = wait_for(T, "the delivery to fail", || {
        server.deliveries("status=failed").into_iter().next()
    });
    assert!(
        d["reason"].as_str().unwrap().contains("certificate"),
        "{}",
        d["reason"]
    );
    assert!(rx.received().is_empty());
}

#[test]
fn finished_events_past_retention_are_compacted_and_pending_ones_kept() {
    let ok = Receiver::start(vec![Answer::status(200)]);
    let failing = Receiver::start(vec![Answer::status(500)]);
    let rules = format!(
        "rules:\n  - name: defects\n    events: [update]\n    entity_types: [defect]\n    webhook:\n      url: {}\n  - name: stories\n    events: [update]\n    entity_types: [story]\n    webhook:\n      url: {}\n",
        ok.url("/ok"),
        failing.url("/failing"),
    );
    let (dir, config) = setup(
        "retention",
        &rules,
        &format!(
            "http_ports: [{}, {}]\nretention: 2s\n",
            ok.addr.port(),
            failing.addr.port()
        ),
    );
    let server = Server::start(&dir, &config);
    let done = server.post_event(&defect_update("old-done"));
    assert_eq!(done.status, 202, "{}", done.text());
    let done_id = done.json()["deliveries"][0].as_str().unwrap().to_string();
    let mut story = defect_update("old-pending");
    story["entity_type"] = json!("story");
    let pending = server.post_event(&story);
    assert_eq!(pending.status, 202, "{}", pending.text());
    let pending_id = pending.json()["deliveries"][0]
        .as_str()
        .unwrap()
        .to_string();
    ok.wait_for(1, T);
    failing.wait_for(1, T);

    // The retention pass runs every second here; the succeeded delivery's
    // event is two seconds old soon after.
    wait_for(T, "the finished event to be compacted", || {
        (server
            .admin("GET", &format!("/v1/deliveries/{done_id}"), None)
            .status
            == 404)
            .then_some(())
    });
    let kept = server.delivery(&pending_id);
    assert_eq!(kept["delivery"]["state"], "pending", "{kept}");
    let listed: Vec<String> = server
        .deliveries("")
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, vec![pending_id]);
    // Past retention the id is forgotten: the same event is new again.
    let again = server.post_event(&defect_update("old-done"));
    assert_eq!(again.status, 202, "{}", again.text());
    assert_eq!(again.json()["duplicate"], false, "{}", again.text());
    assert_ne!(again.json()["deliveries"][0].as_str().unwrap(), done_id);
}

/// The reply timeout counts from when the request is written, not from the
/// start of the attempt with the connect timeout added; on a reused
/// keep-alive connection there is no connect at all. A receiver that is
/// connected but answers after 4 s is cut at about the 1 s `reply`, and the
/// record says so with the time that really went by.
#[test]
fn the_reply_timeout_counts_from_the_request_on_fresh_and_reused_connections() {
    let stall = Answer::status(200).after(Duration::from_secs(4));
    // The first request, on a fresh connection, stalls.
    let fresh = Receiver::start(vec![stall.clone(), Answer::status(200)]);
    // The first answers at once, so the second reuses its connection.
    let reused = Receiver::start(vec![Answer::status(200), stall]);
    let timeouts =
        "      timeouts: {connect: 2s, reply: 1s}\n      retry: {policy: none}\n".to_string();
    let rules = format!(
        "rules:\n  - name: fresh\n    events: [update]\n    webhook:\n      url: {}\n{timeouts}  - name: reused\n    events: [update]\n    webhook:\n      url: {}\n{timeouts}",
        fresh.url("/f"),
        reused.url("/r")
    );
    let (dir, config) = setup(
        "reply-timeout",
        &rules,
        &format!(
            "http_ports: [{}, {}]\n",
            fresh.addr.port(),
            reused.addr.port()
        ),
    );
    let server = Server::start(&dir, &config);
    let ids = |r: crate::support::http::Reply| -> Vec<String> {
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect()
    };
    let first = ids(server.post_event(&defect_update("evt-rt-1")));
    reused.wait_for(1, T);
    fresh.wait_for(1, T);
    // The reused receiver's first delivery succeeds; then the second event.
    for id in &first {
        wait_for(T, "the first event's deliveries to finish", || {
            let s = server.delivery(id)["delivery"]["state"].clone();
            (s == "succeeded" || s == "failed").then_some(())
        });
    }
    let second = ids(server.post_event(&defect_update("evt-rt-2")));
    let got = reused.wait_for(2, T);
    assert_eq!(
        got[0].conn, got[1].conn,
        "the second request came on the first one's keep-alive connection"
    );
    let cut: Vec<Value> = first
        .iter()
        .chain(&second)
        .filter_map(|id| {
            let d = wait_for(T, "the delivery to finish", || {
                let d = server.delivery(id);
                (d["delivery"]["state"] != "pending").then_some(d)
            });
            (d["delivery"]["state"] == "failed").then(|| d["attempts"][0].clone())
        })
        .collect();
    assert_eq!(cut.len(), 2, "one stalled attempt per receiver: {cut:?}");
    for attempt in &cut {
        let ms = attempt["duration_ms"].as_u64().unwrap();
        assert!(
            (900..2000).contains(&ms),
            "cut after {ms} ms, not at about the 1 s reply timeout: {attempt}"
        );
        let error = attempt["error"].as_str().unwrap_or_default();
        assert!(error.contains("within 1 s"), "{attempt}");
    }
}
