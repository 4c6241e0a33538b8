//! The real `rulehook serve`, started on a free port with a config of the
//! test's own, and stopped (or killed) by the test.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::TempDir;
use super::http::{Reply, request};

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const INGEST_KEY: &str = "test-ingest-key-0123456789";

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
}

/// A test's rules and data. `config_extra` is appended to a config that
/// allows plain HTTP and loopback destinations (the receivers live there).
pub fn setup(name: &str, rules: &str, config_extra: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(name);
    dir.write("rules/rules.yaml", rules);
    let config = dir.write(
        "rulehook.yaml",
        &format!(
            "rules_dir: rules\ndata_dir: data\nallow_http: true\nallow_cidrs: [127.0.0.0/8]\napi_keys:\n  - {{name: admin, role: admin, key: {ADMIN_KEY}}}\n  - {{name: ingest, role: ingest, key: {INGEST_KEY}}}\n{config_extra}"
        ),
    );
    (dir, config)
}

/// The environment variable that runs the suite in postgres mode:
/// `RULEHOOK_TEST_STORE=postgres cargo test -p rulehook --test integration`
/// (the second run in `.ci/run`).
pub const TEST_STORE: &str = "RULEHOOK_TEST_STORE";

/// Whether this run puts every server on PostgreSQL.
pub fn postgres_mode() -> bool {
    match std::env::var(TEST_STORE).as_deref() {
        Ok("postgres") => true,
        Ok("redb") | Ok("") | Err(_) => false,
        Ok(other) => panic!("{TEST_STORE}={other}: use postgres or redb"),
    }
}

/// In postgres mode, the store of a server whose config names none: a
/// database of its own on the suite's PostgreSQL server, created at its
/// first start and remembered in its directory, so a restart (or a kill -9
/// and a start) finds the same data, as with redb.
fn test_store(dir: &TempDir, config: &std::path::Path) -> Option<String> {
    if !postgres_mode() {
        return None;
    }
    let text = std::fs::read_to_string(config).expect("read the test's config");
    if text.lines().any(|l| l.starts_with("store:")) {
        return None;
    }
    let remembered = dir.path().join("test-store-url");
    if let Ok(url) = std::fs::read_to_string(&remembered) {
        return Some(url);
    }
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let url =
        super::postgres::for_process().create_db(&format!("suite_{}_{n}", std::process::id()));
    std::fs::write(&remembered, &url).expect("remember the test's database");
    Some(url)
}

impl Server {
    pub fn start(dir: &TempDir, config: &std::path::Path) -> Server {
        Server::start_inner(dir, config, Stdio::inherit(), &[])
    }

    /// Like `start`, with `env` set for the server process only (secrets
    /// from `{env: NAME}`), so tests neither change this process's
    /// environment nor see each other's variables.
    pub fn start_with_env(dir: &TempDir, config: &std::path::Path, env: &[(&str, &str)]) -> Server {
        Server::start_inner(dir, config, Stdio::inherit(), env)
    }

    /// Like `start`, with the server's log (stderr) written to `log`.
    pub fn start_logging_to(
        dir: &TempDir,
        config: &std::path::Path,
        log: &std::path::Path,
    ) -> Server {
        let file = std::fs::File::create(log).expect("create the log file");
        Server::start_inner(dir, config, Stdio::from(file), &[])
    }

    /// Like `start_logging_to`, with `env` set for the server process only
    /// (e.g. `RULEHOOK_LOG_FORMAT=json`).
    pub fn start_logging_with_env(
        dir: &TempDir,
        config: &std::path::Path,
        log: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Server {
        let file = std::fs::File::create(log).expect("create the log file");
        Server::start_inner(dir, config, Stdio::from(file), env)
    }

    fn start_inner(
        dir: &TempDir,
        config: &std::path::Path,
        stderr: Stdio,
        env: &[(&str, &str)],
    ) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rulehook"));
        command.envs(env.iter().copied());
        let store = test_store(dir, config);
        if let Some(url) = &store {
            // A fixed node id per data directory: a restart is the same
            // node coming back, which takes its own claims back at once.
            command
                .env("RULEHOOK_STORE", url)
                .env("RULEHOOK_NODE_ID", "test-node");
        }
        let mut child = command
            .args([
                "serve",
                "--config",
                config.to_str().expect("utf-8"),
                "--listen",
                "127.0.0.1:0",
            ])
            .env("RULEHOOK_LOG", "warn")
            .env("RULEHOOK_PLUGIN_CACHE", super::plugin_cache())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start rulehook serve");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("serve did not print its address: {line:?}"));
        if let Some(url) = &store {
            // The run is in postgres mode only if the server really is:
            // its migrations ran before it listened.
            let db = url.rsplit('/').next().expect("a database name");
            let schema =
                super::postgres::for_process().sql_in(db, "SELECT count(*) FROM rulehook_schema");
            assert_eq!(schema, "1", "the server did not use its database {url}");
        }
        Server {
            child,
            addr,
            dir: dir.path().to_path_buf(),
            config: config.to_path_buf(),
        }
    }

    pub fn post_event(&self, event: &Value) -> Reply {
        request(
            self.addr,
            "POST",
            "/v1/events",
            &[
                ("Authorization", &format!("Bearer {INGEST_KEY}")),
                ("Content-Type", "application/json"),
            ],
            event.to_string().as_bytes(),
        )
    }

    /// Posts a batch of events, one JSON per line, with the ingest key.
    pub fn post_ndjson(&self, body: &str) -> Reply {
        request(
            self.addr,
            "POST",
            "/v1/events",
            &[
                ("Authorization", &format!("Bearer {INGEST_KEY}")),
                ("Content-Type", "application/x-ndjson"),
            ],
            body.as_bytes(),
        )
    }

    pub fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        request(
            self.addr,
            method,
            path,
            &[("Authorization", &format!("Bearer {ADMIN_KEY}"))],
            body.as_bytes(),
        )
    }

    pub fn deliveries(&self, query: &str) -> Vec<Value> {
        let r = self.admin("GET", &format!("/v1/deliveries?{query}"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["deliveries"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn delivery(&self, id: &str) -> Value {
        let r = self.admin("GET", &format!("/v1/deliveries/{id}"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("wait for rulehook");
        std::mem::forget(self);
        status
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
