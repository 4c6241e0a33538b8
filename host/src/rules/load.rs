//! Reading rule files from disk and secrets from the environment: the only
//! I/O of the rules module, kept here so everything else stays pure.
//!
//! Everything read here is bounded and confined. Rule files are read only
//! when they are (or link to) regular files inside the rules directory and
//! within the size limits; `{file:}` secrets only from inside the rules
//! directory or a directory listed in `RULEHOOK_SECRET_DIRS`. Diagnostics
//! name the file and the limit, never what a refused file contains.

use std::io::Read as _;
use std::path::{Component, Path, PathBuf};

use super::model::SecretRef;
use super::{Diagnostic, RuleSet, SecretResolver, Severity, Source};

/// Largest rule file read, in bytes.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Rule files one directory may hold.
pub const MAX_FILES: usize = 10_000;
/// All rule files of a directory together, in bytes: reading holds every
/// file's text at once, so this bounds a reload's memory.
pub const MAX_DIR_BYTES: u64 = 64 << 20;
/// Rules one directory may hold (after the per-file limit of `parse`).
pub const MAX_RULES: usize = 100_000;
/// Largest secret file read, in bytes: a secret is a key or a password.
pub const MAX_SECRET_BYTES: usize = 64 << 10;
/// Directories (besides the rules directory) that `{file:}` secrets may
/// be read from, separated like `PATH` (e.g. `/run/secrets`).
pub const SECRET_DIRS_ENV: &str = "RULEHOOK_SECRET_DIRS";

/// Reads every `*.yaml` / `*.yml` file directly in `dir`, sorted by name so
/// rule order (and so delivery order) does not depend on the file system.
/// Files that are not read (a link out of the directory, past a limit, not
/// UTF-8) come back as diagnostics; an error is the directory's own.
pub fn read_dir(dir: &Path) -> Result<(Vec<Source>, Vec<Diagnostic>), std::io::Error> {
    let root = dir.canonicalize()?;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_rule_file(p))
        .collect();
    paths.sort();
    let mut diagnostics = Vec::new();
    let mut wanted = Vec::new();
    let mut total: u64 = 0;
    for path in paths {
        // Directories named `x.yaml`, FIFOs and dangling links are not
        // rule files, as before; only regular files (or links to them).
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let linked = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
        if linked
            && !path
                .canonicalize()
                .is_ok_and(|real| real.starts_with(&root))
        {
            diagnostics.push(file_error(
                &path,
                "rule file is a symbolic link to a file outside the rules directory; it is not read".into(),
                "copy the file into the rules directory, or link to a file inside it",
            ));
            continue;
        }
        if meta.len() > MAX_FILE_BYTES as u64 {
            diagnostics.push(too_large(&path, meta.len()));
            continue;
        }
        total += meta.len();
        wanted.push(path);
    }
    if wanted.len() > MAX_FILES {
        diagnostics.push(dir_error(
            dir,
            format!(
                "the rules directory has {} rule files, past the limit of {MAX_FILES}",
                wanted.len()
            ),
            "merge rules into fewer files",
        ));
        return Ok((Vec::new(), diagnostics));
    }
    if total > MAX_DIR_BYTES {
        diagnostics.push(dir_error(
            dir,
            format!(
                "the rule files add up to {total} bytes, past the limit of {} MiB for a directory",
                MAX_DIR_BYTES >> 20
            ),
            "remove rule files that are not needed; no rule set needs this much text",
        ));
        return Ok((Vec::new(), diagnostics));
    }
    let mut sources = Vec::with_capacity(wanted.len());
    for path in wanted {
        match read_capped(&path, MAX_FILE_BYTES) {
            Ok(text) => sources.push(Source { path, text }),
            Err(Capped::TooLarge) => diagnostics.push(too_large(&path, MAX_FILE_BYTES as u64 + 1)),
            Err(Capped::NotUtf8) => diagnostics.push(file_error(
                &path,
                "rule file is not UTF-8 text".into(),
                "save it as UTF-8",
            )),
            Err(Capped::Io(e)) => diagnostics.push(file_error(
                &path,
                format!("cannot read rule file: {e}"),
                "make it readable by rulehook",
            )),
        }
    }
    Ok((sources, diagnostics))
}

/// Why [`read_capped`] returned no text.
#[derive(Debug)]
enum Capped {
    TooLarge,
    NotUtf8,
    Io(std::io::Error),
}

/// Reads at most `cap` bytes of text: a file that grew since its size was
/// checked is refused, not read to the end.
fn read_capped(path: &Path, cap: usize) -> Result<String, Capped> {
    let file = std::fs::File::open(path).map_err(Capped::Io)?;
    let mut bytes = Vec::new();
    file.take(cap as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(Capped::Io)?;
    if bytes.len() > cap {
        return Err(Capped::TooLarge);
    }
    String::from_utf8(bytes).map_err(|_| Capped::NotUtf8)
}

fn file_error(path: &Path, message: String, fix: &str) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        file: path.to_path_buf(),
        line: 1,
        column: 1,
        message,
        fix: Some(fix.into()),
    }
}

fn too_large(path: &Path, size: u64) -> Diagnostic {
    file_error(
        path,
        format!(
            "rule file is {size} bytes, past the limit of {} MiB for one file",
            MAX_FILE_BYTES >> 20
        ),
        "split its rules over several files",
    )
}

/// A diagnostic on the directory itself (line and column 0).
fn dir_error(dir: &Path, message: String, fix: &str) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        file: dir.to_path_buf(),
        line: 0,
        column: 0,
        message,
        fix: Some(fix.into()),
    }
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
/// paths are taken from `base` (the rules directory); a file is read only
/// if, links resolved, it lies inside one of `roots`.
pub struct EnvSecrets {
    pub base: PathBuf,
    /// Canonical directories secret files may come from: the rules
    /// directory and those of [`SECRET_DIRS_ENV`].
    pub roots: Vec<PathBuf>,
}

impl EnvSecrets {
    /// The resolver for the rules directory `base`.
    pub fn new(base: &Path) -> EnvSecrets {
        let extra = std::env::var_os(SECRET_DIRS_ENV).unwrap_or_default();
        let roots = std::iter::once(base.to_path_buf())
            .chain(std::env::split_paths(&extra).filter(|p| p.is_absolute()))
            // A directory that does not exist holds no secret to read.
            .filter_map(|p| p.canonicalize().ok())
            .collect();
        EnvSecrets {
            base: base.to_path_buf(),
            roots,
        }
    }

    fn read_file(&self, path: &Path) -> Result<String, String> {
        let outside = || {
            format!(
                "secret file {} is outside the rules directory (and {SECRET_DIRS_ENV})",
                path.display()
            )
        };
        // `..` is refused even when it would land inside: the rule is
        // simpler to state and to check than the exceptions.
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(outside());
        }
        let full = self.base.join(path);
        let real = full
            .canonicalize()
            .map_err(|e| format!("cannot read secret file {}: {e}", full.display()))?;
        if !self.roots.iter().any(|root| real.starts_with(root)) {
            return Err(outside());
        }
        let meta = std::fs::metadata(&real)
            .map_err(|e| format!("cannot read secret file {}: {e}", full.display()))?;
        // A FIFO or a device would block the reload or never end.
        if !meta.is_file() {
            return Err(format!(
                "secret file {} is not a regular file",
                path.display()
            ));
        }
        let too_long = || {
            format!(
                "secret file {} is longer than {} KiB; a secret is a key or a password",
                path.display(),
                MAX_SECRET_BYTES >> 10
            )
        };
        if meta.len() > MAX_SECRET_BYTES as u64 {
            return Err(too_long());
        }
        match read_capped(&real, MAX_SECRET_BYTES) {
            // A trailing newline from `echo x > file` is not part of the secret.
            Ok(text) => Ok(text.trim_end_matches(['\n', '\r']).to_string()),
            Err(Capped::TooLarge) => Err(too_long()),
            Err(Capped::NotUtf8) => {
                Err(format!("secret file {} is not UTF-8 text", path.display()))
            }
            Err(Capped::Io(e)) => Err(format!("cannot read secret file {}: {e}", full.display())),
        }
    }
}

impl SecretResolver for EnvSecrets {
    fn resolve(&self, secret: &SecretRef) -> Result<String, String> {
        match secret {
            SecretRef::Inline(v) => Ok(v.clone()),
            SecretRef::Env(name) => {
                std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
            }
            SecretRef::File(path) => self.read_file(path),
        }
    }
}

/// Loads and validates a rules directory. An unreadable directory is
/// reported as a diagnostic on the directory itself.
pub fn load_dir(dir: &Path) -> (RuleSet, Vec<Diagnostic>) {
    let (sources, mut unread) = match read_dir(dir) {
        Ok(read) => read,
        Err(e) => {
            return (
                RuleSet::default(),
                vec![dir_error(
                    dir,
                    format!("cannot read the rules directory: {e}"),
                    "pass an existing directory of *.yaml rule files",
                )],
            );
        }
    };
    let (set, mut diagnostics) = RuleSet::compile(&sources, &EnvSecrets::new(dir));
    if set.len() > MAX_RULES {
        diagnostics.push(dir_error(
            dir,
            format!(
                "the rules directory holds {} rules, past the limit of {MAX_RULES}",
                set.len()
            ),
            "remove rules that are not needed, or run another rulehook for the rest",
        ));
    }
    diagnostics.append(&mut unread);
    diagnostics.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    (set, diagnostics)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::load_dir;
    use crate::rules::Diagnostic;

    /// A fresh directory with `rules/` inside, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("rulehook-load-{name}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("rules")).expect("create scratch dir");
            Scratch(dir)
        }

        fn rules(&self) -> PathBuf {
            self.0.join("rules")
        }

        fn write(&self, rel: &str, text: &str) -> PathBuf {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, text).expect("write");
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rule_with_secret(path: &str) -> String {
        format!(
            "rules:\n  - name: r\n    events: [create]\n    webhook: {{url: \"https://x.test/h\", secret: {{file: \"{path}\"}}}}\n"
        )
    }

    /// The errors of loading `dir`, as text, checked never to quote `leak`.
    fn errors(dir: &Path, leak: &str) -> Vec<String> {
        let (_, diagnostics) = load_dir(dir);
        let errors: Vec<String> = diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(Diagnostic::to_string)
            .collect();
        for e in &errors {
            assert!(!e.contains(leak), "a diagnostic quotes what it read: {e}");
        }
        errors
    }

    #[test]
    fn secret_files_inside_the_rules_directory_are_read() {
        let s = Scratch::new("secret-inside");
        s.write("rules/secrets/hook", "s3cret-value\n");
        s.write("rules/r.yaml", &rule_with_secret("secrets/hook"));
        let (set, diagnostics) = load_dir(&s.rules());
        assert!(diagnostics.iter().all(|d| !d.is_error()), "{diagnostics:?}");
        assert_eq!(set.rules()[0].webhook.secrets[0].value, "s3cret-value");
    }

    #[test]
    fn secret_files_outside_the_rules_directory_are_refused() {
        let s = Scratch::new("secret-outside");
        let outside = s.write("outside/key", "TOP-SECRET-OUTSIDE\n");
        let cases = [
            "../outside/key".to_string(),
            outside.display().to_string(),
            "secrets/../../outside/key".to_string(),
        ];
        for path in cases {
            s.write("rules/r.yaml", &rule_with_secret(&path));
            let errors = errors(&s.rules(), "TOP-SECRET-OUTSIDE");
            assert_eq!(errors.len(), 1, "{path}: {errors:?}");
            assert!(
                errors[0].contains("outside the rules directory"),
                "{path}: {}",
                errors[0]
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_link_out_of_the_rules_directory_is_refused() {
        let s = Scratch::new("secret-link");
        let outside = s.write("outside/key", "TOP-SECRET-LINKED\n");
        std::os::unix::fs::symlink(&outside, s.rules().join("key")).expect("symlink");
        s.write("rules/r.yaml", &rule_with_secret("key"));
        let errors = errors(&s.rules(), "TOP-SECRET-LINKED");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("outside the rules directory"),
            "{}",
            errors[0]
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_that_is_not_a_regular_file_is_refused_without_reading_it() {
        // A FIFO would block the reload forever if it were opened.
        let s = Scratch::new("secret-fifo");
        let fifo = s.rules().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        s.write("rules/r.yaml", &rule_with_secret("fifo"));
        // Bounded: a loader that opens the FIFO blocks until a writer
        // comes, so the load runs on a thread the test gives up on.
        let (tx, rx) = std::sync::mpsc::channel();
        let rules = s.rules();
        std::thread::spawn(move || {
            let _ = tx.send(errors(&rules, "\u{0}"));
        });
        let errors = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("loading the rules blocked on the FIFO for 10 s");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("not a regular file"), "{}", errors[0]);
    }

    #[test]
    fn an_allowed_secret_directory_is_read_from() {
        let s = Scratch::new("secret-allowed");
        let key = s.write("run/secrets/hook", "from-run-secrets\n");
        let resolver = super::EnvSecrets {
            base: s.rules(),
            roots: vec![
                s.rules().canonicalize().expect("rules"),
                s.0.join("run/secrets").canonicalize().expect("secrets"),
            ],
        };
        let got = crate::rules::SecretResolver::resolve(
            &resolver,
            &crate::rules::SecretRef::File(key.clone()),
        );
        assert_eq!(got, Ok("from-run-secrets".to_string()));
        // Without the allow, the same absolute path is refused.
        let only_rules = super::EnvSecrets::new(&s.rules());
        let got =
            crate::rules::SecretResolver::resolve(&only_rules, &crate::rules::SecretRef::File(key));
        assert!(got.is_err_and(|e| e.contains("outside the rules directory")));
    }

    #[test]
    fn an_oversized_secret_file_is_refused() {
        let s = Scratch::new("secret-big");
        s.write("rules/big", &"k".repeat(super::MAX_SECRET_BYTES + 1));
        s.write("rules/r.yaml", &rule_with_secret("big"));
        let errors = errors(&s.rules(), "kkkkkkkk");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("longer than 64 KiB"), "{}", errors[0]);
    }

    #[cfg(unix)]
    #[test]
    fn a_rule_file_linked_from_outside_is_not_read() {
        let s = Scratch::new("rule-link");
        let outside = s.write("etc/passwd", "root:x:0:0:SYSTEM-LINE:/root:/bin/sh\n");
        std::os::unix::fs::symlink(&outside, s.rules().join("passwd.yaml")).expect("symlink");
        // A link to a rule file inside the directory is fine.
        s.write("rules/shared/base.yaml", "rules: []\n");
        std::os::unix::fs::symlink(
            s.rules().join("shared/base.yaml"),
            s.rules().join("base.yaml"),
        )
        .expect("symlink");
        let errors = errors(&s.rules(), "SYSTEM-LINE");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("passwd.yaml") && errors[0].contains("outside the rules directory"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn a_rule_file_past_the_size_limit_is_refused_by_name() {
        let s = Scratch::new("rule-big");
        let mut text = String::from("rules: []\n");
        text.push_str(&"# padding\n".repeat(super::MAX_FILE_BYTES / 10 + 1));
        s.write("rules/big.yaml", &text);
        s.write("rules/ok.yaml", "rules: []\n");
        let errors = errors(&s.rules(), "padding");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("big.yaml:1:1") && errors[0].contains("past the limit of 1 MiB"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn a_rule_file_that_is_not_utf8_is_reported_by_name() {
        let s = Scratch::new("rule-binary");
        std::fs::write(s.rules().join("bin.yaml"), b"rules: [\xff\xfe]\n").expect("write");
        s.write("rules/ok.yaml", "rules: []\n");
        let errors = errors(&s.rules(), "\u{fffd}");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("bin.yaml:1:1") && errors[0].contains("not UTF-8"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn too_many_rules_in_one_file_are_refused_at_the_first_past_the_limit() {
        let s = Scratch::new("rule-count");
        let mut text = String::from("rules:\n");
        for i in 0..=super::super::parse::MAX_RULES_PER_FILE {
            text.push_str(&format!(
                "  - {{name: r{i}, events: [create], webhook: {{url: \"https://x.test/h\"}}}}\n"
            ));
        }
        s.write("rules/many.yaml", &text);
        let (set, diagnostics) = load_dir(&s.rules());
        let errors: Vec<_> = diagnostics.iter().filter(|d| d.is_error()).collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].line, errors[0].column),
            (super::super::parse::MAX_RULES_PER_FILE + 2, 5)
        );
        assert!(
            errors[0]
                .message
                .contains("past the limit of 10000 rules in one file"),
            "{}",
            errors[0]
        );
        assert_eq!(set.len(), 0);
    }
}
