//! Tries to read a host file and list the root directory; the deny-all WASI context grants no
//! directories, so both must fail. It returns what it got as an error, so a test can check that
//! no file content ever left the sandbox.

use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value};

pub struct ReadFile;

impl Plugin for ReadFile {
    fn transform(_: &Context, _: Value, _: &Value) -> Result<Outcome, String> {
        let file = match std::fs::read_to_string("/etc/passwd") {
            Ok(text) => format!("read /etc/passwd: {text}"),
            Err(e) => format!("cannot read /etc/passwd: {e}"),
        };
        let dir = match std::fs::read_dir("/") {
            Ok(entries) => format!("listed / ({} entries)", entries.count()),
            Err(e) => format!("cannot list /: {e}"),
        };
        Err(format!("{file}; {dir}"))
    }
}

rulehook_plugin_sdk::export_plugin!(ReadFile);
