//! Reading rule files from disk and secrets from the environment: the only
//! I/O of the rules module, kept here so everything else stays pure.

use std::path::{Path, PathBuf};

use super::model::SecretRef;
use super::{Diagnostic, RuleSet, SecretResolver, Severity, Source};

/// Reads every `*.yaml` / `*.yml` file directly in `dir`, sorted by name so
/// rule order (and so delivery order) does not depend on the file system.
pub fn read_dir(dir: &Path) -> Result<Vec<Source>, std::io::Error> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_rule_file(p))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)?;
            Ok(Source { path, text })
        })
        .collect()
}

/// Editors leave swap and backup files next to the real ones; only the
/// YAML extensions count, and hidden files never do.
pub fn is_rule_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    !hidden
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml")
}

/// Secrets from the process environment and from files. Relative file
/// paths are taken from `base` (the rules directory).
pub struct EnvSecrets {
    pub base: PathBuf,
}

impl SecretResolver for EnvSecrets {
    fn resolve(&self, secret: &SecretRef) -> Result<String, String> {
        match secret {
            SecretRef::Inline(v) => Ok(v.clone()),
            SecretRef::Env(name) => {
                std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
            }
            SecretRef::File(path) => {
                let full = self.base.join(path);
                std::fs::read_to_string(&full)
                    // A trailing newline from `echo x > file` is not part of the secret.
                    .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                    .map_err(|e| format!("cannot read secret file {}: {e}", full.display()))
            }
        }
    }
}

/// Loads and validates a rules directory. An unreadable directory is
/// reported as a diagnostic on the directory itself.
pub fn load_dir(dir: &Path) -> (RuleSet, Vec<Diagnostic>) {
    match read_dir(dir) {
        Ok(sources) => RuleSet::compile(
            &sources,
            &EnvSecrets {
                base: dir.to_path_buf(),
            },
        ),
        Err(e) => (
            RuleSet::default(),
            vec![Diagnostic {
                severity: Severity::Error,
                file: dir.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("cannot read the rules directory: {e}"),
                fix: Some("pass an existing directory of *.yaml rule files".into()),
            }],
        ),
    }
}
