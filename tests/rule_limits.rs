//! Hostile rule files through the real binary: an alias bomb and nesting
//! thousands of levels deep are refused with a diagnostic at their
//! position by `check`, by a reload (the server keeps its last good rules
//! and keeps serving) and at start-up (a clean refusal, not a crash).
//!
//! Memory is watched from `/proc` while the process runs: one that grows
//! past [`RSS_LIMIT`] is killed and the test fails, so a regression fails
//! the test rather than the machine.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{Server, setup};
use crate::support::{TempDir, plugin_cache, repo};

/// Far above what `check` or an idle test server needs (tens of MiB), far
/// below what an expanded bomb reaches (GiBs).
const RSS_LIMIT: u64 = 512 << 20;
const T: Duration = Duration::from_secs(60);

/// A billion-laughs rule file: nine levels of nine aliases each, 9^8 = 43
/// million copies of `lol` once expanded, from well under 500 bytes.
fn bomb() -> String {
    let mut text = String::from("a0: &a0 [lol]\n");
    for level in 1..9 {
        let items = vec![format!("*a{}", level - 1); 9].join(",");
        text.push_str(&format!("a{level}: &a{level} [{items}]\n"));
    }
    text.push_str("rules: []\n");
    assert!(text.len() < 500, "{} bytes", text.len());
    text
}

/// A rule whose `when` is `levels` lists deep, written as compact block
/// lists (`- - - …`): unlike `[[[…`, which yaml-rust2's scanner stops at
/// 255 levels, these nest without bound, and deep enough overflowed the
/// stack of the tree's recursive walks.
fn deep_rule(levels: usize) -> String {
    format!(
        "rules:\n  - name: deep\n    events: [create]\n    when:\n      {}{{field: a, exists: true}}\n    webhook: {{url: \"https://x.test/h\"}}\n",
        "- ".repeat(levels)
    )
}

/// Where `deep_rule` crosses the depth limit: `when` holds level 4, so the
/// 62nd `- ` (column 7 + 61 × 2) is level 65.
const DEEP_AT: (u64, u64) = (5, 129);

/// The resident memory of `pid`, in bytes.
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Watches a process's memory every 2 ms from a thread, keeps the peak,
/// and kills the process (SIGKILL) once it passes [`RSS_LIMIT`].
struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(now) = rss(pid) else { return };
                    peak.fetch_max(now, Ordering::Relaxed);
                    if now > RSS_LIMIT {
                        let _ = Command::new("kill")
                            .args(["-KILL", &pid.to_string()])
                            .status();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        RssWatch {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching; fails the test if the process went past the limit.
    fn check(mut self, what: &str) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let peak = self.peak.load(Ordering::Relaxed);
        assert!(
            peak <= RSS_LIMIT,
            "{what} grew to {} MiB (limit {} MiB) and was killed",
            peak >> 20,
            RSS_LIMIT >> 20
        );
    }
}

/// Waits for `child` with a bound, killing it if it runs past `T`.
fn wait_bounded(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + T;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process did not finish within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the binary with `args` under the memory watch: (exit status,
/// stdout, stderr).
fn run_watched(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rulehook"))
        .args(args)
        .current_dir(repo())
        .env("RULEHOOK_PLUGIN_CACHE", plugin_cache())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the rulehook binary runs");
    let watch = RssWatch::start(child.id());
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let readers = (
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        }),
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        }),
    );
    let status = wait_bounded(&mut child);
    watch.check(&format!("rulehook {}", args.join(" ")));
    let stdout = readers.0.join().unwrap_or_default();
    let stderr = readers.1.join().unwrap_or_default();
    (status, stdout, stderr)
}

/// `rulehook check DIR --format json` on one file under the memory watch;
/// returns its only diagnostic.
fn check_one(file: &str, text: &str) -> Value {
    let dir = TempDir::new("limits-check");
    dir.write(&format!("rules/{file}"), text);
    let rules = dir.path().join("rules");
    let (status, stdout, stderr) =
        run_watched(&["check", rules.to_str().expect("utf-8"), "--format", "json"]);
    assert_eq!(status.code(), Some(1), "{status}: {stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("JSON output");
    let diagnostics = report["diagnostics"].as_array().expect("diagnostics");
    assert_eq!(diagnostics.len(), 1, "{report:#}");
    assert_eq!(
        diagnostics[0]["file"],
        rules.join(file).display().to_string()
    );
    diagnostics[0].clone()
}

#[test]
fn check_refuses_an_alias_bomb_at_the_alias_within_a_memory_bound() {
    let d = check_one("bomb.yaml", &bomb());
    let message = d["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("alias `*a") && message.contains("past the limit of 1000000 nodes"),
        "{d}"
    );
    // Each `*` of line N + 1 names anchor N - 1; the bomb's first lines
    // expand to little, so the budget runs out on a late line.
    let line = d["line"].as_u64().expect("line") as usize;
    let column = d["column"].as_u64().expect("column") as usize;
    let text = bomb();
    let at = &text.lines().nth(line - 1).expect("line in file")[column - 1..];
    assert!(at.starts_with("*a"), "{d} points at {at:?}");
}

#[test]
fn check_refuses_nesting_thousands_deep_at_the_level_that_crosses_the_limit() {
    let d = check_one("deep.yaml", &deep_rule(2000));
    assert!(
        d["message"]
            .as_str()
            .unwrap_or_default()
            .contains("deeper than 64 levels"),
        "{d}"
    );
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(DEEP_AT.0), Some(DEEP_AT.1)),
        "{d}"
    );
}

#[test]
fn check_refuses_conditions_nested_past_their_limit() {
    // `not` inside `not`, 40 deep: one YAML level each, within the YAML
    // limit, so the condition limit (32) must catch it, at the 33rd.
    let text = format!(
        "rules:\n  - name: deep\n    events: [create]\n    when: {}{{field: a, exists: true}}{}\n    webhook: {{url: \"https://x.test/h\"}}\n",
        "{not: ".repeat(40),
        "}".repeat(40)
    );
    let d = check_one("nots.yaml", &text);
    let message = d["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("conditions nest deeper than 32 levels"),
        "{d}"
    );
    // `when:` starts at column 11; each `{not: ` is 6 characters.
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(4), Some(11 + 32 * 6)),
        "{d}"
    );
}

/// POST /v1/rules/reload with `text` as a new rules file, under the memory
/// watch: the reload is refused with one diagnostic in that file, and the
/// server still delivers with its last good rules.
fn reload_is_refused_and_the_server_keeps_serving(name: &str, text: &str) -> Value {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let good = format!(
        "rules:\n  - name: good\n    events: [create]\n    webhook: {{url: \"{}\"}}\n",
        rx.url("/good")
    );
    let (dir, config) = setup(
        "limits-reload",
        &good,
        &format!("watch: false\nhttp_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    let watch = RssWatch::start(server.child.id());
    let file = dir.write(&format!("rules/{name}"), text);
    let r = server.admin("POST", "/v1/rules/reload", None);
    assert_eq!(r.status, 422, "{}", r.text());
    let report = r.json()["reload"].clone();
    assert_eq!(report["ok"], false, "{report}");
    let diagnostics = report["diagnostics"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(diagnostics.len(), 1, "{report}");
    assert_eq!(
        diagnostics[0]["file"],
        file.display().to_string(),
        "{report}"
    );

    // Still up, still on the last good rules.
    let event = json!({"id": "after", "event_type": "create", "entity_type": "story", "entity": {"id": "1"}});
    assert_eq!(server.post_event(&event).status, 202);
    assert_eq!(rx.wait_for(1, T)[0].path, "/good");
    let rules = server.admin("GET", "/v1/rules", None).json();
    assert_eq!(rules["rules"][0]["name"], "good", "{rules}");
    assert_eq!(rules["last_reload"]["ok"], false, "{rules}");
    watch.check("the server");
    diagnostics[0].clone()
}

#[test]
fn a_reload_with_an_alias_bomb_is_refused_and_the_server_keeps_serving() {
    let d = reload_is_refused_and_the_server_keeps_serving("bomb.yaml", &bomb());
    assert!(
        d["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("alias `*a"),
        "{d}"
    );
}

#[test]
fn a_reload_with_deep_nesting_is_refused_and_the_server_keeps_serving() {
    let d = reload_is_refused_and_the_server_keeps_serving("deep.yaml", &deep_rule(2000));
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(DEEP_AT.0), Some(DEEP_AT.1)),
        "{d}"
    );
}

#[test]
fn start_up_with_deep_nesting_is_a_clean_refusal_not_a_crash() {
    let (dir, config) = setup("limits-start", &deep_rule(2000), "");
    let (status, _stdout, stderr) = run_watched(&[
        "serve",
        "--config",
        config.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
    ]);
    // An exit code, not a signal (a stack overflow aborts with SIGSEGV).
    assert!(
        status.code().is_some_and(|c| c != 0),
        "serve ended with {status}: {stderr}"
    );
    let at = format!(
        "{}:{}:{}",
        dir.path().join("rules/rules.yaml").display(),
        DEEP_AT.0,
        DEEP_AT.1
    );
    assert!(
        stderr.contains(&at) && stderr.contains("deeper than 64 levels"),
        "{stderr}"
    );
}

#[test]
fn check_names_files_past_the_size_limit_and_escapes_without_quoting_them() {
    let dir = TempDir::new("limits-files");
    // 2 MiB of comments: valid YAML, past the 1 MiB limit.
    dir.write(
        "rules/big.yaml",
        &format!("rules: []\n{}", "# padding padding\n".repeat(120_000)),
    );
    dir.write("outside/key", "OUTSIDE-SECRET-VALUE\n");
    dir.write(
        "rules/escape.yaml",
        "rules:\n  - name: escape\n    events: [create]\n    webhook: {url: \"https://x.test/h\", secret: {file: ../outside/key}}\n",
    );
    dir.write("etc/passwd", "root:x:0:0:SYSTEM-LINE:/root:/bin/sh\n");
    std::os::unix::fs::symlink(
        dir.path().join("etc/passwd"),
        dir.path().join("rules/passwd.yaml"),
    )
    .expect("symlink");
    let rules = dir.path().join("rules");
    let (status, stdout, stderr) =
        run_watched(&["check", rules.to_str().expect("utf-8"), "--format", "json"]);
    assert_eq!(status.code(), Some(1), "{status}: {stdout}{stderr}");
    for leak in ["OUTSIDE-SECRET-VALUE", "SYSTEM-LINE", "padding"] {
        assert!(!stdout.contains(leak), "check quotes {leak}: {stdout}");
    }
    let report: Value = serde_json::from_str(&stdout).expect("JSON output");
    let found: Vec<(String, u64, String)> = report["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .map(|d| {
            (
                d["file"].as_str().unwrap_or_default().to_string(),
                d["line"].as_u64().unwrap_or_default(),
                d["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let path = |name: &str| rules.join(name).display().to_string();
    assert_eq!(found.len(), 3, "{report:#}");
    assert_eq!(
        (found[0].0.as_str(), found[0].1),
        (path("big.yaml").as_str(), 1)
    );
    assert!(found[0].2.contains("past the limit of 1 MiB"), "{found:?}");
    assert_eq!(
        (found[1].0.as_str(), found[1].1),
        (path("escape.yaml").as_str(), 4)
    );
    assert!(
        found[1].2.contains("outside the rules directory"),
        "{found:?}"
    );
    assert_eq!(found[2].0, path("passwd.yaml"));
    assert!(
        found[2].2.contains("symbolic link to a file outside"),
        "{found:?}"
    );
}

#[test]
fn a_rule_file_linked_to_a_system_file_is_not_shown_by_the_api() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let good = format!(
        "rules:\n  - name: good\n    events: [create]\n    webhook: {{url: \"{}\"}}\n",
        rx.url("/good")
    );
    let (dir, config) = setup(
        "limits-link",
        &good,
        &format!("watch: false\nhttp_ports: [{}]\n", rx.addr.port()),
    );
    let server = Server::start(&dir, &config);
    dir.write(
        "etc/shadow",
        "root:$6$SYSTEM-HASH:19000:0:99999:7:::\nalice: {SYSTEM-LINE}\n",
    );
    std::os::unix::fs::symlink(
        dir.path().join("etc/shadow"),
        dir.path().join("rules/shadow.yaml"),
    )
    .expect("symlink");
    let r = server.admin("POST", "/v1/rules/reload", None);
    assert_eq!(r.status, 422, "{}", r.text());
    let listing = server.admin("GET", "/v1/rules", None).text();
    for text in [r.text(), listing.clone()] {
        assert!(
            !text.contains("SYSTEM-HASH") && !text.contains("SYSTEM-LINE"),
            "the API shows the linked file's content: {text}"
        );
    }
    assert!(
        listing.contains("symbolic link to a file outside"),
        "{listing}"
    );
    let event = json!({"id": "after", "event_type": "create", "entity_type": "story", "entity": {"id": "1"}});
    assert_eq!(server.post_event(&event).status, 202);
    assert_eq!(rx.wait_for(1, T)[0].path, "/good");
}

#[test]
fn start_up_with_an_alias_bomb_is_a_clean_refusal_within_a_memory_bound() {
    let (dir, config) = setup("limits-start-bomb", &bomb(), "");
    let (status, _stdout, stderr) = run_watched(&[
        "serve",
        "--config",
        config.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(
        status.code().is_some_and(|c| c != 0),
        "serve ended with {status}: {stderr}"
    );
    let file = dir.path().join("rules/rules.yaml").display().to_string();
    // The sixth `*a5` of line 7: each copy of a5 (and a5's anchor) is
    // 125,479 nodes, so the budget of 1,000,000 runs out there.
    assert!(
        stderr.contains(&format!("{file}:7:30")) && stderr.contains("alias `*a5` expands the file"),
        "{stderr}"
    );
}
