//! Loading the rule set, at start-up and on reload, through one code path:
//! read and validate every file, and only when all of it is valid replace
//! the running set in one atomic swap. A bad change keeps the last good
//! set running and is reported here.

use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::rules::{Diagnostic, RuleSet};

/// The last load's outcome, for `GET /v1/rules` and the logs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    /// Milliseconds since the epoch.
    pub at: u64,
    pub ok: bool,
    pub rules: usize,
    /// Errors and warnings, each with file:line:column.
    pub diagnostics: Vec<Diagnostic>,
}

#[derive(Default)]
pub struct RulesStatus {
    last: Mutex<LoadReport>,
}

impl RulesStatus {
    pub fn snapshot(&self) -> LoadReport {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, report: LoadReport) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = report;
    }
}

/// Loads the directory; `Err` carries every diagnostic when any is an error.
pub fn load(dir: &Path) -> Result<(RuleSet, Vec<Diagnostic>), Vec<Diagnostic>> {
    let (set, diagnostics) = crate::rules::load::load_dir(dir);
    if diagnostics.iter().any(Diagnostic::is_error) {
        return Err(diagnostics);
    }
    Ok((set, diagnostics))
}

/// Loads and, when valid, swaps the running set. Returns the report.
pub fn reload(dir: &Path, running: &ArcSwap<RuleSet>, status: &RulesStatus) -> LoadReport {
    let report = match load(dir) {
        Ok((set, diagnostics)) => {
            let rules = set.len();
            running.store(Arc::new(set));
            tracing::info!(rules, dir = %dir.display(), "rules loaded");
            LoadReport {
                at: crate::store::now_ms(),
                ok: true,
                rules,
                diagnostics,
            }
        }
        Err(diagnostics) => {
            for d in diagnostics.iter().filter(|d| d.is_error()) {
                tracing::error!(at = %d.location(), error = %d.message, "rule file error; keeping the last good rules");
            }
            LoadReport {
                at: crate::store::now_ms(),
                ok: false,
                rules: running.load().len(),
                diagnostics,
            }
        }
    };
    status.set(report.clone());
    report
}
