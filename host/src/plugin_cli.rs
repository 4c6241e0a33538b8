//! `rulehook plugin new` (a plugin project from a template: Rust,
//! JavaScript, TypeScript or Python) and
//! `rulehook plugin run` (one call through the same runtime and limits the
//! server uses, with the outcome, timing and logs printed).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use serde_json::{Value, json};

use crate::cli::{Format, Lang, PluginCommand};
use crate::plugins::{CallContext, Outcome};

/// A template file: (path in the new project, contents with `{{…}}`
/// placeholders).
type TemplateFile = (&'static str, &'static str);

/// The Rust crate on the SDK.
const RUST: &[TemplateFile] = &[
    (
        "Cargo.toml",
        include_str!("../templates/plugin/Cargo.toml.tmpl"),
    ),
    (
        "src/lib.rs",
        include_str!("../templates/plugin/src/lib.rs.tmpl"),
    ),
    (
        "README.md",
        include_str!("../templates/plugin/README.md.tmpl"),
    ),
    (
        ".gitignore",
        include_str!("../templates/plugin/gitignore.tmpl"),
    ),
];

/// The WIT, copied into the JavaScript, TypeScript and Python projects:
/// their toolchains read it from a directory of the project (componentize
/// tools run in a sandbox that sees only the working directory).
const WIT: TemplateFile = (
    "wit/plugin.wit",
    include_str!("../../plugin-sdk/wit/plugin.wit"),
);

/// The native-test route shared by the JavaScript and TypeScript projects:
/// node's test runner, with the host interface resolved to a stub.
const NODE_TEST: &[TemplateFile] = &[
    (
        "test/index.test.js",
        include_str!("../templates/plugin-js/test/index.test.js.tmpl"),
    ),
    (
        "test/register.js",
        include_str!("../templates/plugin-js/test/register.js.tmpl"),
    ),
    (
        "test/hooks.js",
        include_str!("../templates/plugin-js/test/hooks.js.tmpl"),
    ),
    (
        "test/host.js",
        include_str!("../templates/plugin-js/test/host.js.tmpl"),
    ),
];

const JS: &[TemplateFile] = &[
    (
        "package.json",
        include_str!("../templates/plugin-js/package.json.tmpl"),
    ),
    (
        "src/index.js",
        include_str!("../templates/plugin-js/src/index.js.tmpl"),
    ),
    (
        "README.md",
        include_str!("../templates/plugin-js/README.md.tmpl"),
    ),
    (
        ".gitignore",
        include_str!("../templates/plugin-js/gitignore.tmpl"),
    ),
];

const TS: &[TemplateFile] = &[
    (
        "package.json",
        include_str!("../templates/plugin-ts/package.json.tmpl"),
    ),
    (
        "tsconfig.json",
        include_str!("../templates/plugin-ts/tsconfig.json.tmpl"),
    ),
    (
        "src/index.ts",
        include_str!("../templates/plugin-ts/src/index.ts.tmpl"),
    ),
    (
        "src/rulehook.d.ts",
        include_str!("../templates/plugin-ts/src/rulehook.d.ts.tmpl"),
    ),
    (
        "README.md",
        include_str!("../templates/plugin-ts/README.md.tmpl"),
    ),
    (
        ".gitignore",
        include_str!("../templates/plugin-ts/gitignore.tmpl"),
    ),
];

const PYTHON: &[TemplateFile] = &[
    (
        "app.py",
        include_str!("../templates/plugin-python/app.py.tmpl"),
    ),
    (
        "test_app.py",
        include_str!("../templates/plugin-python/test_app.py.tmpl"),
    ),
    (
        "build.sh",
        include_str!("../templates/plugin-python/build.sh.tmpl"),
    ),
    (
        "requirements-dev.txt",
        include_str!("../templates/plugin-python/requirements-dev.txt.tmpl"),
    ),
    (
        "pyproject.toml",
        include_str!("../templates/plugin-python/pyproject.toml.tmpl"),
    ),
    (
        "README.md",
        include_str!("../templates/plugin-python/README.md.tmpl"),
    ),
    (
        ".gitignore",
        include_str!("../templates/plugin-python/gitignore.tmpl"),
    ),
];

/// The toolchain versions rulehook's tests build plugins with
/// (`plugin-sdk/toolchains/`, installed by `.ci/run`). The templates pin
/// the same ones, read from those files so the two cannot drift.
const TOOLCHAIN_NPM: &str = include_str!("../../plugin-sdk/toolchains/package.json");
const TOOLCHAIN_PYPI: &str = include_str!("../../plugin-sdk/toolchains/requirements.txt");

/// The version `plugin-sdk/toolchains/package.json` pins for `package`.
fn npm_pin(package: &str) -> String {
    let manifest: Value = serde_json::from_str(TOOLCHAIN_NPM).unwrap_or(Value::Null);
    manifest["devDependencies"][package]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The version `plugin-sdk/toolchains/requirements.txt` pins for `package`.
fn pypi_pin(package: &str) -> String {
    TOOLCHAIN_PYPI
        .lines()
        .filter_map(|l| l.trim().split_once("=="))
        .find(|(name, _)| name.trim() == package)
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default()
}

pub fn run(command: PluginCommand) -> ExitCode {
    let result = match command {
        PluginCommand::New {
            name,
            dir,
            lang,
            sdk,
        } => new(&name, &dir, lang, sdk),
        PluginCommand::Run {
            plugin,
            event,
            config,
            rule,
            timeout,
            format,
        } => run_once(&plugin, &event, &config, &rule, timeout.as_deref(), format),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn new(name: &str, dir: &Path, lang: Lang, sdk: Option<PathBuf>) -> Result<ExitCode, String> {
    let valid = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        return Err(format!(
            "`{name}` is not a usable plugin name; use lowercase letters, digits and dashes, starting with a letter (e.g. my-filter)"
        ));
    }
    let root = dir.join(name);
    if root.exists() {
        return Err(format!(
            "{} already exists; choose another name or --dir",
            root.display()
        ));
    }
    let files = template(lang);
    let values = placeholders(name, lang, sdk)?;
    for (path, text) in &files {
        let file = root.join(path);
        let mut text = text.to_string();
        for (key, value) in &values {
            text = text.replace(&format!("{{{{{key}}}}}"), value);
        }
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        // The Python template's build script is run as `./build.sh`.
        #[cfg(unix)]
        if path.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("cannot make {} executable: {e}", file.display()))?;
        }
    }
    let at = root.display();
    let crate_name = name.replace('-', "_");
    let (what, test, build, component) = match lang {
        Lang::Rust => (
            "plugin crate",
            "cargo test".to_string(),
            "cargo build --release --target wasm32-wasip2".to_string(),
            format!("target/wasm32-wasip2/release/{crate_name}.wasm"),
        ),
        Lang::Js | Lang::Ts => (
            "plugin project",
            "npm install && npm test".to_string(),
            "npm run build".to_string(),
            format!("{name}.wasm"),
        ),
        Lang::Python => (
            "plugin project",
            "pip install -r requirements-dev.txt && ./build.sh && pytest".to_string(),
            "./build.sh".to_string(),
            format!("{name}.wasm"),
        ),
    };
    println!("created {what} {at}");
    println!("  test:   cd {at} && {test}");
    println!("  build:  {build}");
    println!("  try:    rulehook plugin run {component} --event EVENT.json --config '{{}}'");
    Ok(ExitCode::SUCCESS)
}

/// The files of `lang`'s template.
fn template(lang: Lang) -> Vec<TemplateFile> {
    match lang {
        Lang::Rust => RUST.to_vec(),
        Lang::Js => [JS, NODE_TEST, &[WIT]].concat(),
        Lang::Ts => [TS, NODE_TEST, &[WIT]].concat(),
        Lang::Python => [PYTHON, &[WIT]].concat(),
    }
}

/// The values of the `{{…}}` placeholders in `lang`'s template.
fn placeholders(
    name: &str,
    lang: Lang,
    sdk: Option<PathBuf>,
) -> Result<Vec<(&'static str, String)>, String> {
    let mut values = vec![
        ("name", name.to_string()),
        ("crate_name", name.replace('-', "_")),
    ];
    match lang {
        Lang::Rust => {
            let sdk =
                sdk.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk"));
            let sdk = sdk.canonicalize().map_err(|e| {
                format!(
                    "the plugin SDK is not at {} ({e}); pass --sdk PATH to the rulehook plugin-sdk directory",
                    sdk.display()
                )
            })?;
            values.push(("sdk_path", sdk.display().to_string()));
        }
        Lang::Js | Lang::Ts => {
            values.push(("componentize_qjs_version", npm_pin("componentize-qjs")));
            values.push(("typescript_version", npm_pin("typescript")));
            // The tests import what the build compiles: the source itself
            // in JavaScript, tsc's output in TypeScript.
            let entry = if lang == Lang::Js {
                "src/index.js"
            } else {
                "dist/index.js"
            };
            values.push(("entry", entry.to_string()));
        }
        Lang::Python => {
            values.push(("componentize_py_version", pypi_pin("componentize-py")));
            values.push(("pytest_version", pypi_pin("pytest")));
        }
    }
    Ok(values)
}

/// `--timeout`, checked as the plugin check checks a rule entry's
/// `timeout`: a duration, at most the default `plugin_timeout_max`.
fn run_overrides(timeout: Option<&str>) -> Result<crate::plugins::Overrides, String> {
    let Some(text) = timeout else {
        return Ok(Default::default());
    };
    let max = crate::plugins::Limits::default().timeout_max;
    let t = crate::rules::parse::parse_duration(text)
        .filter(|t| !t.is_zero())
        .ok_or_else(|| format!("--timeout {text:?} is not a duration such as 200ms or 1s"))?;
    if t > max {
        return Err(format!(
            "--timeout {text} is more than plugin_timeout_max ({} ms), the most a rule's plugin entry may set",
            max.as_millis()
        ));
    }
    Ok(crate::plugins::Overrides {
        timeout: Some(t),
        memory_bytes: None,
    })
}

fn run_once(
    plugin: &str,
    event_file: &Path,
    config: &str,
    rule: &str,
    timeout: Option<&str>,
    format: Format,
) -> Result<ExitCode, String> {
    let overrides = run_overrides(timeout)?;
    let config_value: Value =
        serde_json::from_str(config).map_err(|e| format!("--config is not valid JSON: {e}"))?;
    let text = std::fs::read_to_string(event_file)
        .map_err(|e| format!("cannot read {}: {e}", event_file.display()))?;
    let event = crate::event::Event::from_json(&text)
        .map_err(|e| format!("{}: {e}", event_file.display()))?;
    let event_id = event.id.clone().unwrap_or_else(|| "evt_plugin_run".into());
    let input = crate::payload::to_string(rule, &event, &event_id);

    let runtime = crate::cli::plugin_runtime().map_err(|_| "cannot start the plugin runtime")?;
    let path = Path::new(plugin);
    let started = Instant::now();
    let compiled = if path.exists() {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::sync::Arc::new(runtime.load(&name, &bytes)?)
    } else {
        let (set, errors) = crate::plugins::PluginSet::load(&runtime, None, None, &|n| n == plugin);
        if let Some(e) = errors.first() {
            return Err(e.message.clone());
        }
        set.get(plugin).cloned().ok_or_else(|| {
            format!("{plugin} is neither a file nor a bundled plugin ({})", {
                let names: Vec<String> = set.list().into_iter().map(|(n, _, _)| n).collect();
                names.join(", ")
            })
        })?
    };
    let compile_ms = started.elapsed().as_secs_f64() * 1000.0;

    if let Err(e) = compiled.validate_config_with(&config_value.to_string(), &overrides) {
        let out =
            json!({"plugin": compiled.name, "outcome": "invalid-config", "error": e.to_string()});
        print_outcome(&out, format);
        return Ok(ExitCode::from(1));
    }
    let ctx = CallContext::for_event(rule, &event_id, &event);
    let call = compiled.transform_with(&ctx, &input, &config_value.to_string(), &overrides);
    // A second call on the now-warm instance shows what the server pays
    // per delivery once the plugin is loaded.
    let warm = compiled.transform_with(&ctx, &input, &config_value.to_string(), &overrides);
    let mut out = json!({
        "plugin": compiled.name,
        "timing": {
            "load_ms": round(compile_ms),
            "first_call_ms": round(call.elapsed.as_secs_f64() * 1000.0),
            "warm_call_ms": round(warm.elapsed.as_secs_f64() * 1000.0),
        },
        "logs": call.logs,
    });
    if call.logs_dropped > 0 {
        out["logs_dropped_bytes"] = json!(call.logs_dropped);
    }
    let code = match call.result {
        Ok(Outcome::Send(text)) => {
            out["outcome"] = json!("send");
            out["payload"] = serde_json::from_str(&text).unwrap_or(Value::String(text));
            ExitCode::SUCCESS
        }
        Ok(Outcome::Skip(reason)) => {
            out["outcome"] = json!("skip");
            out["reason"] = json!(reason);
            ExitCode::SUCCESS
        }
        Err(e) => {
            out["outcome"] = json!("error");
            out["error"] = json!(format!("plugin {} {e}", compiled.name));
            ExitCode::from(1)
        }
    };
    print_outcome(&out, format);
    Ok(code)
}

fn round(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

fn print_outcome(out: &Value, format: Format) {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(out).unwrap_or_default());
        return;
    }
    println!("plugin {}", out["plugin"].as_str().unwrap_or_default());
    match out["outcome"].as_str().unwrap_or_default() {
        "send" => {
            println!("outcome: send");
            let text = serde_json::to_string_pretty(&out["payload"]).unwrap_or_default();
            for line in text.lines() {
                println!("  {line}");
            }
        }
        "skip" => println!(
            "outcome: skip: {}",
            out["reason"].as_str().unwrap_or_default()
        ),
        _ => println!("outcome: {}", out["error"].as_str().unwrap_or_default()),
    }
    if let Some(t) = out.get("timing") {
        println!(
            "timing: load {} ms, first call {} ms, warm call {} ms",
            t["load_ms"], t["first_call_ms"], t["warm_call_ms"]
        );
    }
    let logs = out["logs"].as_array().cloned().unwrap_or_default();
    if !logs.is_empty() {
        println!("logs:");
        for l in logs {
            println!(
                "  [{}] {}",
                l["level"].as_str().unwrap_or_default(),
                l["message"].as_str().unwrap_or_default()
            );
        }
    }
    if let Some(n) = out.get("logs_dropped_bytes") {
        println!("  ({n} bytes of logs dropped over the cap)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TypeScript template's `rulehook.d.ts` is written by hand (jco
    /// 1.35's `guest-types` fails to read a WIT directory with the same
    /// "os error 44" as its `componentize`), so this keeps it from drifting:
    /// every record field (camelCase), enum case and variant case of
    /// `plugin.wit` must appear in it the way componentize-qjs maps them.
    #[test]
    fn the_typescript_types_cover_every_name_in_the_wit() {
        let wit = include_str!("../../plugin-sdk/wit/plugin.wit");
        let dts = include_str!("../templates/plugin-ts/src/rulehook.d.ts.tmpl");
        let camel = |name: &str| {
            let mut out = String::new();
            let mut upper = false;
            for c in name.chars() {
                if c == '-' {
                    upper = true;
                } else if upper {
                    out.extend(c.to_uppercase());
                    upper = false;
                } else {
                    out.push(c);
                }
            }
            out
        };
        let mut expected = Vec::new();
        let mut block: Option<&str> = None;
        for line in wit.lines().map(str::trim) {
            if line.starts_with("//") {
                continue;
            }
            if let Some(rest) = line.strip_prefix("enum ") {
                // `enum level { trace, debug, … }` on one line.
                let cases = rest
                    .split_once('{')
                    .map_or("", |(_, c)| c.trim_end_matches('}'));
                expected.extend(cases.split(',').map(|c| format!("'{}'", c.trim())));
            } else if line.starts_with("record ") {
                block = Some("record");
            } else if line.starts_with("variant ") {
                block = Some("variant");
            } else if line.starts_with('}') {
                block = None;
            } else if let (Some(kind), Some((name, _))) = (block, line.split_once([':', '('])) {
                let name = name.trim();
                expected.push(match kind {
                    "record" => format!("{}: ", camel(name)),
                    _ => format!("tag: '{name}'"),
                });
            }
        }
        assert!(
            expected.len() >= 10,
            "read too little of the WIT: {expected:?}"
        );
        let missing: Vec<&String> = expected
            .iter()
            .filter(|e| !dts.contains(e.as_str()))
            .collect();
        assert!(missing.is_empty(), "rulehook.d.ts lacks {missing:?}");
    }

    #[test]
    fn templates_pin_the_toolchain_versions_the_tests_build_with() {
        // An empty pin would write `"componentize-qjs": ""` into every new
        // project; these are the names the templates look up.
        for package in ["componentize-qjs", "typescript"] {
            let v = npm_pin(package);
            assert!(
                v.chars().next().is_some_and(|c| c.is_ascii_digit()),
                "{package}: {v:?}"
            );
        }
        for package in ["componentize-py", "pytest"] {
            let v = pypi_pin(package);
            assert!(
                v.chars().next().is_some_and(|c| c.is_ascii_digit()),
                "{package}: {v:?}"
            );
        }
    }

    #[test]
    fn every_placeholder_in_a_template_has_a_value() {
        for lang in [Lang::Rust, Lang::Js, Lang::Ts, Lang::Python] {
            let values = placeholders("my-plugin", lang, None).expect("the SDK is in the tree");
            for (path, text) in template(lang) {
                let mut text = text.to_string();
                for (key, value) in &values {
                    text = text.replace(&format!("{{{{{key}}}}}"), value);
                }
                assert!(!text.contains("{{"), "{lang:?} {path} keeps a placeholder");
            }
        }
    }
}
