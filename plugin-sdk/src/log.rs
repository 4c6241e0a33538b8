//! Log lines from a plugin.
//!
//! In the component they go to the host's `log` import, which writes them to rulehook's log under
//! the plugin's name and caps their volume per call (lines past the cap are dropped, so log what
//! helps diagnose a delivery, not every field). Natively they are echoed to stderr and captured
//! per thread, so a test can assert on them through [`crate::testing::run`] or [`take_captured`].
//!
//! Never log secrets: payloads can hold personal data and the host log is kept.

use std::fmt;

/// How important a log line is; the host maps it onto its own log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Step-by-step detail, off in production.
    Trace,
    /// Detail for diagnosing a rule.
    Debug,
    /// Something an operator may want to know happened.
    Info,
    /// Something unexpected that the plugin worked around.
    Warn,
    /// Something failed.
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        })
    }
}

/// One line a plugin logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Its level.
    pub level: Level,
    /// Its text.
    pub message: String,
}

/// Logs `message` at `level`.
pub fn log(level: Level, message: impl AsRef<str>) {
    imp::write(level, message.as_ref());
}

/// Logs at [`Level::Trace`].
pub fn trace(message: impl AsRef<str>) {
    log(Level::Trace, message);
}

/// Logs at [`Level::Debug`].
pub fn debug(message: impl AsRef<str>) {
    log(Level::Debug, message);
}

/// Logs at [`Level::Info`].
pub fn info(message: impl AsRef<str>) {
    log(Level::Info, message);
}

/// Logs at [`Level::Warn`].
pub fn warn(message: impl AsRef<str>) {
    log(Level::Warn, message);
}

/// Logs at [`Level::Error`].
pub fn error(message: impl AsRef<str>) {
    log(Level::Error, message);
}

/// Takes the lines logged on this thread since the last call (native builds only).
///
/// Each test runs on its own thread, so tests running in parallel do not see each other's lines.
#[cfg(not(target_arch = "wasm32"))]
pub fn take_captured() -> Vec<LogLine> {
    imp::take()
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::Level;
    use crate::__private::bindings::rulehook::plugin::host;

    pub(super) fn write(level: Level, message: &str) {
        let level = match level {
            Level::Trace => host::Level::Trace,
            Level::Debug => host::Level::Debug,
            Level::Info => host::Level::Info,
            Level::Warn => host::Level::Warn,
            Level::Error => host::Level::Error,
        };
        host::log(level, message);
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::{Level, LogLine};
    use std::cell::RefCell;

    thread_local! {
        static CAPTURED: RefCell<Vec<LogLine>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn write(level: Level, message: &str) {
        // Echoed so `cargo test -- --nocapture` shows what the host log would.
        eprintln!("[plugin {level}] {message}");
        CAPTURED.with(|lines| {
            lines.borrow_mut().push(LogLine {
                level,
                message: message.to_owned(),
            });
        });
    }

    pub(super) fn take() -> Vec<LogLine> {
        CAPTURED.with(|lines| std::mem::take(&mut *lines.borrow_mut()))
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    #[test]
    fn lines_are_captured_in_order_and_taken_once() {
        take_captured();
        info("one");
        warn(String::from("two"));
        log(Level::Trace, "three");
        assert_eq!(
            take_captured(),
            vec![
                LogLine {
                    level: Level::Info,
                    message: "one".into()
                },
                LogLine {
                    level: Level::Warn,
                    message: "two".into()
                },
                LogLine {
                    level: Level::Trace,
                    message: "three".into()
                },
            ]
        );
        assert!(take_captured().is_empty());
    }

    #[test]
    fn levels_are_ordered_and_print_lowercase() {
        assert!(Level::Trace < Level::Debug && Level::Warn < Level::Error);
        assert_eq!(Level::Warn.to_string(), "warn");
    }
}
