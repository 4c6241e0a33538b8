//! Loading the rule set and its plugins, at start-up and on reload, through
//! one code path: read and validate every rule file, compile and
//! pre-instantiate every plugin, check every plugin reference and config,
//! and only when all of it is valid replace the running snapshot in one
//! atomic swap. A bad change keeps the last good snapshot running and is
//! reported here.

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::metrics::Metrics;
use crate::plugins::{PluginSet, Runtime};
use crate::rules::{Diagnostic, RuleSet, Severity};
use crate::targets::{Target, Targets};

/// Rules and the plugins they name, swapped together: an event is matched
/// and transformed by one snapshot, never by a mix of two.
pub struct Snapshot {
    pub rules: RuleSet,
    pub plugins: Arc<PluginSet>,
    /// Some rule has a plugin chain (`fields` or `plugins`).
    pub chains: bool,
    /// Rule name → the version of it that runs: what ingest binds each new
    /// delivery to.
    pub targets: HashMap<String, Arc<Target>>,
}

impl Deref for Snapshot {
    type Target = RuleSet;

    fn deref(&self) -> &RuleSet {
        &self.rules
    }
}

/// The last load's outcome, for `GET /v1/rules` and the logs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    /// Milliseconds since the epoch.
    pub at: u64,
    pub ok: bool,
    /// What asked for the load: `start`, `watch`, `signal`, `api`.
    pub trigger: String,
    /// Rules running after the load (the old count when it failed).
    pub rules: usize,
    /// Errors and warnings, each with file:line:column.
    pub diagnostics: Vec<Diagnostic>,
    /// How long parsing, compiling and checking took.
    pub duration_ms: u64,
    /// Loads since start, and how many failed.
    pub loads: u64,
    pub failures: u64,
}

/// Loads snapshots from the rules and plugins directories.
pub struct Loader {
    pub runtime: Arc<Runtime>,
    pub rules_dir: PathBuf,
    pub plugins_dir: Option<PathBuf>,
    metrics: Arc<Metrics>,
    last: Mutex<LoadReport>,
    /// One load at a time: two overlapping reloads could swap in the older.
    loading: Mutex<()>,
    /// Where a load's rule versions are made durable before it runs; set
    /// once the store is open.
    targets: OnceLock<Arc<Targets>>,
}

impl Loader {
    pub fn new(
        runtime: Arc<Runtime>,
        rules_dir: PathBuf,
        plugins_dir: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Loader {
        Loader {
            runtime,
            rules_dir,
            plugins_dir,
            metrics,
            last: Mutex::new(LoadReport::default()),
            loading: Mutex::new(()),
            targets: OnceLock::new(),
        }
    }

    /// From now on every reload stores its rule versions in `targets`
    /// before it swaps them in.
    pub fn bind_targets(&self, targets: Arc<Targets>) {
        let _ = self.targets.set(targets);
    }

    pub fn report(&self) -> LoadReport {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Builds a snapshot; `Err` carries every diagnostic when any is an
    /// error. Plugins unchanged since `previous` are reused, not recompiled.
    pub fn load(
        &self,
        previous: Option<&Snapshot>,
    ) -> Result<(Snapshot, Vec<Diagnostic>), Vec<Diagnostic>> {
        load(
            &self.runtime,
            &self.rules_dir,
            self.plugins_dir.as_deref(),
            previous,
        )
    }

    /// Loads and, when valid, swaps the running snapshot. Blocking (it
    /// compiles plugins): call it off the async reactor.
    pub fn reload(&self, running: &ArcSwap<Snapshot>, trigger: &str) -> LoadReport {
        let _one = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        let previous = running.load_full();
        let mut report = self.report();
        report.at = crate::store::now_ms();
        report.trigger = trigger.to_string();
        report.loads += 1;
        let started = std::time::Instant::now();
        let loaded = self.load(Some(&previous)).and_then(|(snapshot, diagnostics)| {
            // Before the swap: the first event matched by the new rules
            // must find its rule version in the store.
            match self.targets.get().map(|t| t.publish(snapshot.targets.values())) {
                Some(Err(e)) => Err(vec![Diagnostic {
                    severity: Severity::Error,
                    file: self.rules_dir.clone(),
                    line: 0,
                    column: 0,
                    message: format!("cannot store the new rule versions: {e}"),
                    fix: Some("the running rules are kept; reload again once the store accepts writes".into()),
                }]),
                _ => Ok((snapshot, diagnostics)),
            }
        });
        report.duration_ms = started.elapsed().as_millis() as u64;
        match loaded {
            Ok((snapshot, diagnostics)) => {
                report.ok = true;
                report.rules = snapshot.len();
                report.diagnostics = diagnostics;
                running.store(Arc::new(snapshot));
                self.metrics.reload(true);
                tracing::info!(rules = report.rules, trigger, ms = report.duration_ms, dir = %self.rules_dir.display(), "rules loaded");
            }
            Err(diagnostics) => {
                for d in diagnostics.iter().filter(|d| d.is_error()) {
                    tracing::error!(at = %d.location(), error = %d.message, trigger, "rule or plugin error; keeping the last good rules");
                }
                report.ok = false;
                report.failures += 1;
                self.metrics.reload(false);
                report.rules = previous.len();
                report.diagnostics = diagnostics;
            }
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
        report
    }

    /// Records the start-up load (done with `load`, before serving).
    pub fn started(&self, snapshot: &Snapshot, diagnostics: Vec<Diagnostic>) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = LoadReport {
            at: crate::store::now_ms(),
            ok: true,
            trigger: "start".into(),
            rules: snapshot.len(),
            diagnostics,
            duration_ms: 0,
            loads: 1,
            failures: 0,
        };
    }
}

/// A burst of file events ends after this much quiet: an editor's
/// truncate-then-write, or a deploy copying many files, becomes one reload.
const QUIET: Duration = Duration::from_millis(300);
/// A burst that never goes quiet still reloads this often.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// Watches the rules and plugins directories and reloads after each burst
/// of changes. The watch lasts as long as the returned watcher.
pub fn watch(
    loader: Arc<Loader>,
    running: Arc<ArcSwap<Snapshot>>,
) -> Result<notify::RecommendedWatcher, String> {
    use notify::Watcher as _;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && relevant(&event)
        {
            let _ = tx.send(());
        }
    })
    .map_err(|e| format!("cannot watch files: {e}"))?;
    let mut dirs = vec![loader.rules_dir.clone()];
    dirs.extend(loader.plugins_dir.clone());
    for dir in &dirs {
        if dir.exists() {
            watcher
                .watch(dir, notify::RecursiveMode::Recursive)
                .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        }
    }
    std::thread::Builder::new()
        .name("rulehook-watch".into())
        .spawn(move || {
            // Ends when the watcher, and with it the sender, is dropped.
            while rx.recv().is_ok() {
                let first = std::time::Instant::now();
                while first.elapsed() < MAX_WAIT {
                    match rx.recv_timeout(QUIET) {
                        Ok(()) => continue,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                loader.reload(&running, "watch");
            }
        })
        .map_err(|e| format!("cannot start the watch thread: {e}"))?;
    Ok(watcher)
}

/// Changes worth a reload: not reads, not editors' swap and backup files.
fn relevant(event: &notify::Event) -> bool {
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return false;
    }
    event.paths.iter().any(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        !(name.starts_with('.') && name.ends_with(".swp")
            || name.ends_with('~')
            || name.ends_with(".swx")
            || name.starts_with(".#"))
    })
}

/// Rules from `rules_dir` and plugins (bundled and from `plugins_dir`),
/// checked against each other, with every diagnostic, valid or not: what
/// `rulehook check` prints.
pub fn assemble(
    runtime: &Arc<Runtime>,
    rules_dir: &Path,
    plugins_dir: Option<&Path>,
    previous: Option<&Snapshot>,
) -> (RuleSet, PluginSet, Vec<Diagnostic>) {
    let (rules, mut diagnostics) = crate::rules::load::load_dir(rules_dir);
    let wanted = PluginSet::referenced(&rules);
    let (plugins, errors) = PluginSet::load(
        runtime,
        plugins_dir,
        previous.map(|p| p.plugins.as_ref()),
        &|name| wanted.contains(name),
    );
    diagnostics.extend(errors.iter().map(|e| e.diagnostic()));
    diagnostics.extend(plugins.check(&rules));
    (rules, plugins, diagnostics)
}

/// A snapshot when everything is valid; else every diagnostic. The one
/// code path of start-up and reload.
pub fn load(
    runtime: &Arc<Runtime>,
    rules_dir: &Path,
    plugins_dir: Option<&Path>,
    previous: Option<&Snapshot>,
) -> Result<(Snapshot, Vec<Diagnostic>), Vec<Diagnostic>> {
    let (rules, plugins, diagnostics) = assemble(runtime, rules_dir, plugins_dir, previous);
    if diagnostics.iter().any(Diagnostic::is_error) {
        return Err(diagnostics);
    }
    let chains = rules.rules().iter().any(PluginSet::has_chain);
    let targets = rules
        .rules()
        .iter()
        .map(|r| {
            let before = previous.and_then(|p| p.targets.get(&r.name));
            (r.name.clone(), Target::of(r, before))
        })
        .collect();
    Ok((
        Snapshot {
            rules,
            plugins: Arc::new(plugins),
            chains,
            targets,
        },
        diagnostics,
    ))
}
