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

impl Server {
    pub fn start(dir: &TempDir, config: &std::path::Path) -> Server {
        Server::start_inner(dir, config, Stdio::inherit())
    }

    /// Like `start`, with the server's log (stderr) written to `log`.
    pub fn start_logging_to(
        dir: &TempDir,
        config: &std::path::Path,
        log: &std::path::Path,
    ) -> Server {
        let file = std::fs::File::create(log).expect("create the log file");
        Server::start_inner(dir, config, Stdio::from(file))
    }

    fn start_inner(dir: &TempDir, config: &std::path::Path, stderr: Stdio) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rulehook"))
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
