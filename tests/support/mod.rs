//! Helpers shared by the integration tests: the real binary as a server,
//! a receiver that records what it gets, and a tiny blocking HTTP client.

#![allow(dead_code)]

pub mod http;
pub mod ordered;
pub mod postgres;
pub mod receiver;
pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The repository root (the tests run from `host/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// Runs the real binary with `args` in the repository root.
pub fn rulehook(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rulehook"))
        .args(args)
        .current_dir(repo())
        .env("RULEHOOK_PLUGIN_CACHE", plugin_cache())
        .output()
        .expect("the rulehook binary runs")
}

/// One compile cache for every test's server and command: a debug build
/// of wasmtime compiles a component in seconds, and each test would
/// otherwise pay that again in its fresh data directory. Entries are keyed
/// by content and engine, so sharing cannot mix up plugins.
pub fn plugin_cache() -> PathBuf {
    repo().join("target/test-plugin-cache")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("rulehook-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.0.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("create parent");
        }
        std::fs::write(&p, text).expect("write file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with
/// `what` after `timeout`. Tests of a separate process cannot pause its
/// clock, so they wait for an observable state with a bound.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
