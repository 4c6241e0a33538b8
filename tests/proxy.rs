//! Delivery through an outbound HTTP proxy: a real CONNECT proxy on
//! 127.0.0.1, written here, that records what it was asked and pipes the
//! tunnel. The tunnel goes to the address rulehook vetted, TLS runs inside
//! it, `no_proxy` goes direct, and a refusing proxy fails the attempt with
//! its answer.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{Server, setup};
use crate::support::{rulehook, wait_for};

const T: Duration = Duration::from_secs(20);

/// A CONNECT request as the proxy got it.
#[derive(Clone, Debug)]
struct Asked {
    request_line: String,
    authorization: Option<String>,
}

struct TestProxy {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<Asked>>>,
}

impl TestProxy {
    /// Answers every CONNECT with `status`; on 200 it pipes the tunnel, on
    /// 0 it never answers.
    fn start(status: u16) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || serve(client, status, &log));
            }
        });
        TestProxy { addr, asked }
    }

    fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

fn serve(client: TcpStream, status: u16, log: &Mutex<Vec<Asked>>) {
    let mut reader = BufReader::new(client.try_clone().expect("clone"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("proxy-authorization")
        {
            authorization = Some(v.trim().to_string());
        }
    }
    let target = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    log.lock().unwrap().push(Asked {
        request_line: request_line.trim_end().to_string(),
        authorization,
    });
    let mut out = client;
    if status == 0 {
        // Hold the connection until the client gives up.
        std::thread::sleep(Duration::from_secs(30));
        return;
    }
    if status != 200 {
        let _ = write!(out, "HTTP/1.1 {status} No\r\nContent-Length: 0\r\n\r\n");
        return;
    }
    let Ok(upstream) = TcpStream::connect(&target) else {
        let _ = write!(out, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let _ = write!(out, "HTTP/1.1 200 Connection established\r\n\r\n");
    // The client speaks first and waits for the reply above, so nothing
    // of the tunnel is in the reader's buffer.
    let mut up_read = upstream.try_clone().expect("clone");
    let mut up_write = upstream;
    let mut down_write = out.try_clone().expect("clone");
    let mut down_read = out;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_read, &mut down_write);
        let _ = down_write.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut down_read, &mut up_write);
    let _ = up_write.shutdown(std::net::Shutdown::Write);
}

fn story(id: &str) -> Value {
    json!({"id": id, "event_type": "create", "entity_type": "story",
        "scope": {"sharedspace_id": 1001}, "entity": {"id": "77", "name": "Checkout"}})
}

fn rules(urls: &[(&str, String)]) -> String {
    let mut r = String::from("rules:\n");
    for (name, url) in urls {
        r.push_str(&format!(
            "  - {{name: {name}, events: [create], webhook: {{url: \"{url}\", secret: s3cret-s3cret, retry: {{policy: none}}}}}}\n"
        ));
    }
    r
}

#[test]
fn deliveries_tunnel_through_the_proxy_to_the_vetted_address() {
    let proxy = TestProxy::start(200);
    let plain = Receiver::start(vec![Answer::status(200)]);
    let tls = Receiver::start_tls(vec![Answer::status(200)]);
    let rules = rules(&[
        ("plain", plain.url("/hook")),
        // By name: rulehook resolves localhost itself and tunnels to the
        // address it vetted; TLS inside the tunnel checks the name.
        (
            "secure",
            format!("https://localhost:{}/secure", tls.addr.port()),
        ),
    ]);
    let extra = format!(
        "http_ports: [{}]\nca_file: ca.pem\nproxy: http://hook:p%40ss@{}\n",
        plain.addr.port(),
        proxy.addr
    );
    let (dir, config) = setup("proxy", &rules, &extra);
    dir.write("ca.pem", tls.cert_pem.as_deref().unwrap());
    let server = Server::start(&dir, &config);

    assert_eq!(server.post_event(&story("via-proxy")).status, 202);
    let got = plain.wait_for(1, T);
    assert_eq!(got[0].json()["event_id"], "via-proxy");
    assert!(
        got[0]
            .header("X-Rulehook-Signature")
            .is_some_and(|s| s.starts_with("sha256="))
    );
    assert_eq!(tls.wait_for(1, T)[0].path, "/secure");
    wait_for(T, "both deliveries to succeed", || {
        (server.deliveries("status=succeeded").len() == 2).then_some(())
    });

    let mut lines: Vec<String> = proxy
        .asked()
        .iter()
        .map(|a| a.request_line.clone())
        .collect();
    lines.sort();
    let mut want = vec![
        format!("CONNECT 127.0.0.1:{} HTTP/1.1", plain.addr.port()),
        format!("CONNECT 127.0.0.1:{} HTTP/1.1", tls.addr.port()),
    ];
    want.sort();
    assert_eq!(
        lines, want,
        "the proxy is asked for vetted addresses, never names"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode("hook:p@ss");
    assert!(
        proxy
            .asked()
            .iter()
            .all(|a| a.authorization.as_deref() == Some(&format!("Basic {basic}"))),
        "{:?}",
        proxy.asked()
    );
}

#[test]
fn no_proxy_goes_direct_and_refusals_name_the_proxy() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let refusing = TestProxy::start(407);

    // no_proxy by network: the proxy is never asked.
    let unused = TestProxy::start(200);
    let extra = format!(
        "http_ports: [{}]\nproxy: http://{}\nno_proxy: [127.0.0.0/8]\n",
        rx.addr.port(),
        unused.addr
    );
    let (dir, config) = setup("no-proxy", &rules(&[("direct", rx.url("/direct"))]), &extra);
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&story("direct-1")).status, 202);
    assert_eq!(rx.wait_for(1, T)[0].path, "/direct");
    drop(server);
    assert!(unused.asked().is_empty(), "{:?}", unused.asked());

    // A proxy that answers 407: the attempt fails with its answer.
    let extra = format!(
        "http_ports: [{}]\nproxy: http://{}\n",
        rx.addr.port(),
        refusing.addr
    );
    let (dir, config) = setup(
        "proxy-407",
        &rules(&[("refused", rx.url("/refused"))]),
        &extra,
    );
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&story("refused-1")).status, 202);
    let failed = wait_for(T, "the delivery to fail", || {
        server.deliveries("status=failed").into_iter().next()
    });
    let id = failed["id"].as_str().unwrap();
    let attempt = &server.delivery(id)["attempts"][0];
    let error = attempt["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("proxy {} refused CONNECT", refusing.addr))
            && error.contains("407"),
        "{error}"
    );
    assert!(rx.received().iter().all(|r| r.path != "/refused"));

    // A proxy that never answers: the connect timeout ends the attempt.
    let silent = TestProxy::start(0);
    let extra = format!(
        "http_ports: [{}]\nproxy: http://{}\n",
        rx.addr.port(),
        silent.addr
    );
    let rules = format!(
        "rules:\n  - {{name: stuck, events: [create], webhook: {{url: \"{}\", timeouts: {{connect: 1s}}, retry: {{policy: none}}}}}}\n",
        rx.url("/stuck")
    );
    let (dir, config) = setup("proxy-silent", &rules, &extra);
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&story("stuck-1")).status, 202);
    let failed = wait_for(T, "the delivery to time out", || {
        server.deliveries("status=failed").into_iter().next()
    });
    let id = failed["id"].as_str().unwrap();
    let error = server.delivery(id)["attempts"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains(&format!(
            "through proxy {} timed out after 1 s",
            silent.addr
        )),
        "{error}"
    );
    drop(server);

    // Vetting comes before the tunnel: with loopback not allowed, the
    // proxy is not even asked.
    let extra = format!("proxy: http://{}\n", refusing.addr);
    let rules = "rules:\n  - {name: inside, events: [create], webhook: {url: \"https://localhost:9/x\", retry: {policy: none}}}\n";
    let (dir, config) = setup("proxy-vetted", rules, &extra);
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("allow_cidrs: [127.0.0.0/8]", "allow_cidrs: []"),
    )
    .unwrap();
    let asked_before = refusing.asked().len();
    let server = Server::start(&dir, &config);
    assert_eq!(server.post_event(&story("inside-1")).status, 202);
    let failed = wait_for(T, "the delivery to be refused", || {
        server.deliveries("status=failed").into_iter().next()
    });
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("private or loopback"), "{reason}");
    assert_eq!(
        refusing.asked().len(),
        asked_before,
        "the proxy was asked for a refused address"
    );
}

#[test]
fn a_bad_proxy_setting_stops_serve_with_a_clear_error() {
    let rules =
        "rules:\n  - {name: any, events: [create], webhook: {url: \"https://ci.example.com/h\"}}\n";
    let (dir, config) = setup("proxy-bad", rules, "proxy: https://proxy.example:3128\n");
    let config = config.to_str().expect("utf-8");
    let out = rulehook(&["serve", "--config", config, "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`proxy`") && err.contains("must be an http:// URL"),
        "{err}"
    );
    drop(dir);
}
