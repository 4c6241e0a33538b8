//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
        .output()
        .expect("the rulehook binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
