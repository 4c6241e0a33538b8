//! The web console in a real headless Chromium (Debian `chromium` and
//! `chromium-driver`, which `.ci/run` installs when missing), driven over
//! WebDriver by `fantoccini` against the real binary and real receivers.
//! Each test signs in and does what an admin (or a viewer) would; the
//! screenshots at 1280×800 land in `target/console-screenshots/`, or with
//! `UPDATE_SCREENSHOTS=1` in `docs/console/`, which the README shows.
//!
//! The tests take turns (one Chromium at a time on a 2-core machine), and
//! every wait is bounded.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::console_api::{VIEWER_KEY, event, two_receivers};
use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{ADMIN_KEY, Server, setup};
use crate::support::{TempDir, wait_for};

const T: Duration = Duration::from_secs(20);
/// One browser at a time.
static TURN: Mutex<()> = Mutex::new(());

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// chromedriver and a Chromium session with a fresh profile, ended on drop.
struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: TempDir,
    rt: tokio::runtime::Runtime,
}

impl Browser {
    fn start() -> Browser {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (apt-get install chromium chromium-driver; .ci/run does)");
        wait_for(T, "chromedriver to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let profile = TempDir::new("chromium-profile");
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--no-first-run".into(),
            "--window-size=1280,800".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": args, "binary": "/usr/bin/chromium"}),
        );
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .expect("a Chromium session");
        let browser = Browser {
            driver,
            client: Some(client),
            _profile: profile,
            rt,
        };
        browser.run(|c| async move { c.set_window_size(1280, 800).await });
        browser
    }

    fn c(&self) -> Client {
        self.client.clone().expect("session open")
    }

    /// Runs one WebDriver step to completion.
    fn run<F, Fut, R>(&self, step: F) -> R
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<R, fantoccini::error::CmdError>>,
    {
        self.rt
            .block_on(async { tokio::time::timeout(T, step(self.c())).await })
            .expect("a browser step within the bound")
            .expect("the browser step")
    }

    fn goto(&self, url: &str) {
        let url = url.to_string();
        self.run(|c| async move { c.goto(&url).await });
    }

    /// Waits (bounded) for an element and returns its text.
    fn text_of(&self, css: &str) -> String {
        let css = css.to_string();
        self.run(|c| async move {
            let el = c.wait().at_most(T).for_element(Locator::Css(&css)).await?;
            el.text().await
        })
    }

    fn click(&self, css: &str) {
        let css = css.to_string();
        self.run(|c| async move {
            c.wait()
                .at_most(T)
                .for_element(Locator::Css(&css))
                .await?
                .click()
                .await
        });
    }

    fn type_into(&self, css: &str, text: &str) {
        let (css, text) = (css.to_string(), text.to_string());
        self.run(|c| async move {
            let el = c.wait().at_most(T).for_element(Locator::Css(&css)).await?;
            el.clear().await?;
            el.send_keys(&text).await
        });
    }

    fn exists(&self, css: &str) -> bool {
        let css = css.to_string();
        self.run(|c| async move { Ok(!c.find_all(Locator::Css(&css)).await?.is_empty()) })
    }

    /// Polls (bounded) until the page's text under `css` contains `needle`.
    fn wait_text(&self, css: &str, needle: &str) -> String {
        wait_for(T, &format!("`{needle}` in {css}"), || {
            let css = css.to_string();
            let text = self
                .rt
                .block_on(async {
                    let c = self.c();
                    let el = c.find(Locator::Css(&css)).await.ok()?;
                    el.text().await.ok()
                })
                .unwrap_or_default();
            text.contains(needle).then_some(text)
        })
    }

    fn script(&self, js: &str) -> Value {
        let js = js.to_string();
        self.run(|c| async move { c.execute_async(&js, vec![]).await })
    }

    fn screenshot(&self, name: &str) {
        let png = self.run(|c| async move { c.screenshot().await });
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).expect("create the screenshots directory");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }

    fn sign_in(&self, server: &Server, key: &str) {
        self.goto(&format!("http://{}/ui/", server.addr));
        self.type_into("#sign-in-key", key);
        self.click("#sign-in-submit");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), c.close()).await });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `docs/console/` with `UPDATE_SCREENSHOTS=1` (to refresh the README's
/// pictures on purpose), else `target/console-screenshots/`: a test run
/// leaves the source tree as it was.
fn screenshots_dir() -> PathBuf {
    if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        crate::support::repo().join("docs/console")
    } else {
        crate::support::repo().join("target/console-screenshots")
    }
}

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

fn delivery_header(r: &crate::support::receiver::Received) -> String {
    r.header("x-rulehook-delivery")
        .unwrap_or_default()
        .to_string()
}

#[test]
fn sign_in_live_tail_attempts_and_redeliver() {
    let _turn = turn();
    let rx = Receiver::start(vec![
        Answer::status(201).with_header("x-receiver", "console-test"),
    ]);
    let rules = format!(
        "rules:\n  - name: to-receiver\n    events: [update]\n    webhook: {{url: \"{}\", secret: s3cret}}\n",
        rx.url("/hook")
    );
    let (dir, config) = setup(
        "browser-live",
        &rules,
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let b = Browser::start();

    // A wrong key is refused on the page.
    b.sign_in(&server, "not-a-key");
    let refused = b.wait_text("#sign-in-error", "refused");
    assert!(refused.contains("unknown API key"), "{refused}");

    b.sign_in(&server, ADMIN_KEY);
    b.wait_text("#live-status", "Live tail on");
    // Posted while the page is open: it appears without a reload.
    assert_eq!(server.post_event(&event("live-evt")).status, 202);
    let got = rx.wait_for(1, T);
    let id = delivery_header(&got[0]);
    let row = format!("tr[data-id=\"{id}\"]");
    let text = b.wait_text(&row, "succeeded");
    assert!(
        text.contains("to-receiver") && text.contains("live-evt"),
        "{text}"
    );
    assert!(text.contains("201"), "the last status is shown: {text}");
    b.screenshot("deliveries");

    // The delivery's page: the attempt with the receiver's status and headers.
    b.click(&format!("{row} a"));
    let attempt = b.wait_text("article.attempt", "201");
    assert!(attempt.contains("x-receiver"), "{attempt}");
    assert!(attempt.contains("console-test"), "{attempt}");
    assert!(
        attempt.contains("x-rulehook-signature") || attempt.contains("X-Rulehook-Signature"),
        "{attempt}"
    );
    assert!(!attempt.contains("s3cret"), "the secret is never shown");
    let verify = b.text_of("section[aria-labelledby=verify-h]");
    assert!(verify.contains("HMAC-SHA256"), "{verify}");
    // The rule version it is bound to, as the API reports it.
    let shown = server.delivery(&id);
    let version = shown["bound_to"]["version"].as_str().unwrap().to_string();
    let page = b.text_of("main");
    assert!(
        page.contains(&format!(
            "version {version} of to-receiver, the running version"
        )),
        "{page}"
    );
    b.screenshot("delivery");

    // Redeliver: the receiver gets it again, with the same delivery id.
    b.click("#redeliver");
    let again = rx.wait_for(2, T);
    assert_eq!(delivery_header(&again[1]), id);

    // Narrow screens get the same page.
    b.run(|c| async move { c.set_window_size(390, 844).await });
    b.goto(&format!("http://{}/ui/#/deliveries", server.addr));
    b.wait_text(&row, "succeeded");
    b.screenshot("deliveries-narrow");
}

#[test]
fn bulk_redeliver_resends_exactly_the_filtered_deliveries() {
    let _turn = turn();
    let (_dir, server, ok, broken) = two_receivers("browser-bulk");
    for i in 0..3 {
        assert_eq!(server.post_event(&event(&format!("bulk-{i}"))).status, 202);
    }
    ok.wait_for(3, T);
    let first = broken.wait_for(3, T);
    wait_for(T, "three failed deliveries", || {
        (server.deliveries("status=failed").len() == 3).then_some(())
    });
    let b = Browser::start();
    b.sign_in(&server, ADMIN_KEY);
    b.wait_text("#live-status", "Live tail");
    b.type_into("#filter-rule", "broken");
    b.run(|c| async move {
        c.find(Locator::Css("#filter-status option[value=failed]"))
            .await?
            .click()
            .await
    });
    b.click("#apply-filters");
    b.wait_text("#deliveries-rows", "failed");
    b.click("#bulk-dry-run");
    let dry = b.wait_text("#bulk-result", "would be sent again");
    assert!(dry.starts_with("3 deliveries"), "{dry}");
    // Nothing is sent before the confirmation.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(broken.received().len(), 3);
    b.screenshot("bulk-redeliver");
    b.click("#bulk-confirm");
    b.wait_text("#bulk-result", "Redelivered 3");
    let all = broken.wait_for(6, T);
    let mut before: Vec<String> = first.iter().map(delivery_header).collect();
    let mut again: Vec<String> = all[3..].iter().map(delivery_header).collect();
    before.sort();
    again.sort();
    assert_eq!(before, again, "exactly the failed ones, each once");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ok.received().len(),
        3,
        "the succeeded ones were not sent again"
    );
}

#[test]
fn a_blocked_endpoint_is_unblocked_from_the_page_and_its_parked_deliveries_arrive() {
    let _turn = turn();
    // Nothing listens here yet: attempts fail, and one failure blocks it.
    let port = free_port();
    let rules = format!(
        "rules:\n  - name: flaky\n    events: [update]\n    webhook: {{url: \"http://127.0.0.1:{port}/hook\", retry: {{policy: fixed, interval: 100ms, retries: 5}}}}\n"
    );
    let (dir, config) = setup(
        "browser-unblock",
        &rules,
        &format!("http_ports: [{port}]\nprotection: {{failures: 1, block: 1h}}\n"),
    );
    let server = Server::start(&dir, &config);
    for i in 0..2 {
        assert_eq!(server.post_event(&event(&format!("park-{i}"))).status, 202);
    }
    wait_for(T, "both deliveries parked", || {
        (server.deliveries("status=parked").len() == 2).then_some(())
    });
    let rx = Receiver::start_on(port, vec![Answer::status(200)]);
    let b = Browser::start();
    b.sign_in(&server, ADMIN_KEY);
    b.wait_text("#live-status", "Live tail");
    b.click("nav a[data-page=endpoints]");
    let endpoint = format!("http://127.0.0.1:{port}");
    let row = format!("tr[data-endpoint=\"{endpoint}\"]");
    b.wait_text(&row, "blocked until");
    assert_eq!(b.text_of(&format!("{row} td.parked")), "2");
    b.screenshot("endpoints");
    b.click(&format!("button[data-unblock=\"{endpoint}\"]"));
    b.wait_text("#notice", "unblocked");
    let got = rx.wait_for(2, T);
    let mut events: Vec<String> = got
        .iter()
        .map(|r| {
            r.json()["event_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    events.sort();
    assert_eq!(events, ["park-0", "park-1"]);
    b.wait_text(&format!("{row} .endpoint-state"), "ok");
}

#[test]
fn a_halted_lane_is_shown_and_resumed_from_the_lanes_page() {
    let _turn = turn();
    let rx = crate::support::ordered::OrderedReceiver::start(0, Duration::ZERO, 1);
    rx.failing_keys.lock().unwrap().insert("d1".into());
    let rules = format!(
        "rules:\n  - name: mirror\n    events: [update]\n    ordering: {{on_failure: halt}}\n    webhook: {{url: \"{}\", retry: {{policy: none}}}}\n",
        rx.url("/ordered")
    );
    let (dir, config) = setup(
        "browser-lanes",
        &rules,
        &format!("http_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    for seq in 0..3 {
        let ev = json!({"id": format!("d1.{seq}"), "event_type": "update", "entity_type": "defect",
            "entity": {"id": "d1", "n": seq}, "before": {"id": "d1"}});
        assert_eq!(server.post_event(&ev).status, 202);
    }
    wait_for(T, "the lane to halt", || {
        let r = server.admin("GET", "/v1/lanes?state=halted", None);
        (r.json()["lanes"].as_array().map_or(0, Vec::len) == 1).then_some(())
    });
    let b = Browser::start();
    b.sign_in(&server, ADMIN_KEY);
    b.wait_text("#live-status", "Live tail");
    b.click("nav a[data-page=lanes]");
    let row = "tr[data-lane=\"mirror/defect:d1\"]";
    b.wait_text(&format!("{row} .lane-state"), "halted");
    assert_eq!(b.text_of(&format!("{row} td.waiting")), "2");
    assert!(
        b.text_of(&format!("{row} td.reason"))
            .contains("lane is halted")
    );
    b.screenshot("lanes");
    rx.failing_keys.lock().unwrap().clear();
    b.click("button[data-resume=\"mirror/defect:d1\"]");
    b.wait_text("#notice", "resumed");
    wait_for(T, "the three deliveries in order", || {
        rx.with("/ordered", |s| s.first_successes.get("d1").cloned())
            .filter(|v| v.len() == 3)
    });
    assert_eq!(
        rx.with("/ordered", |s| s.first_successes["d1"].clone()),
        vec![0, 1, 2]
    );
}

#[test]
fn a_broken_rule_file_shows_its_diagnostic_after_reload() {
    let _turn = turn();
    let (_dir, server, ok, broken) = two_receivers("browser-rules");
    for i in 0..4 {
        assert_eq!(server.post_event(&event(&format!("chart-{i}"))).status, 202);
    }
    ok.wait_for(4, T);
    broken.wait_for(4, T);
    let b = Browser::start();
    b.sign_in(&server, ADMIN_KEY);
    b.wait_text("#live-status", "Live tail");
    b.click("nav a[data-page=overview]");
    b.wait_text("#queue-depth", "0");
    let charts = b.text_of(".charts");
    assert!(
        charts.contains("Accepted (deliveries made) per minute — 8 in the last hour"),
        "{charts}"
    );
    assert!(
        charts.contains("Failed per minute — 4 in the last hour"),
        "{charts}"
    );
    b.screenshot("overview");
    b.click("nav a[data-page=rules]");
    b.wait_text("#rules", "broken");
    // A mistake on line 3, column 5 of a second file.
    std::fs::write(
        server.dir.join("rules/typo.yaml"),
        "rules:\n  - name: typo\n    evnts: [update]\n    webhook: {url: \"http://127.0.0.1:9/x\"}\n",
    )
    .expect("write rule file");
    b.click("#reload");
    let report = b.wait_text("#last-reload", "typo.yaml:3:5");
    assert!(report.contains("Failed"), "{report}");
    assert!(report.contains("evnts"), "{report}");
    b.screenshot("rules");
}

#[test]
fn a_viewer_sees_no_write_buttons_and_the_api_refuses_its_writes() {
    let _turn = turn();
    let (_dir, server, _ok, _broken) = two_receivers("browser-viewer");
    assert_eq!(server.post_event(&event("seen")).status, 202);
    let id = wait_for(T, "a final delivery", || {
        let list = server.deliveries("rule=ok&status=succeeded");
        list.first()
            .and_then(|d| d["id"].as_str().map(str::to_string))
    });
    let b = Browser::start();
    b.sign_in(&server, VIEWER_KEY);
    b.wait_text(".who", "viewer");
    b.wait_text(&format!("tr[data-id=\"{id}\"]"), "succeeded");
    assert!(!b.exists("#bulk-dry-run"), "no bulk redeliver for a viewer");
    b.goto(&format!("http://{}/ui/#/delivery/{id}", server.addr));
    b.wait_text("article.attempt", "200");
    assert!(!b.exists("#redeliver"), "no Redeliver button for a viewer");
    // The page's own session, with its CSRF token, still cannot write.
    let answer = b.script(&format!(
        "const done = arguments[0];
         fetch('/v1/session').then(r => r.json()).then(s =>
           fetch('/v1/deliveries/{id}/redeliver', {{method: 'POST', headers: {{'X-Rulehook-CSRF': s.csrf}}}}))
         .then(r => r.status).then(done, e => done(String(e)));"
    ));
    assert_eq!(answer, json!(403));
}
