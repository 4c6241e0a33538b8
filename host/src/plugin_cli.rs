//! `rulehook plugin new` (a plugin crate from the template) and
//! `rulehook plugin run` (one call through the same runtime and limits the
//! server uses, with the outcome, timing and logs printed).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use serde_json::{Value, json};

use crate::cli::{Format, PluginCommand};
use crate::plugins::{CallContext, Outcome};

/// The template's files: (path in the new crate, contents).
const TEMPLATE: &[(&str, &str)] = &[
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

pub fn run(command: PluginCommand) -> ExitCode {
    let result = match command {
        PluginCommand::New { name, dir, sdk } => new(&name, &dir, sdk),
        PluginCommand::Run {
            plugin,
            event,
            config,
            rule,
            format,
        } => run_once(&plugin, &event, &config, &rule, format),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn new(name: &str, dir: &Path, sdk: Option<PathBuf>) -> Result<ExitCode, String> {
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
    let sdk = sdk.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk"));
    let sdk = sdk.canonicalize().map_err(|e| {
        format!(
            "the plugin SDK is not at {} ({e}); pass --sdk PATH to the rulehook plugin-sdk directory",
            sdk.display()
        )
    })?;
    let root = dir.join(name);
    if root.exists() {
        return Err(format!(
            "{} already exists; choose another name or --dir",
            root.display()
        ));
    }
    let crate_name = name.replace('-', "_");
    for (path, text) in TEMPLATE {
        let file = root.join(path);
        let text = text
            .replace("{{name}}", name)
            .replace("{{crate_name}}", &crate_name)
            .replace("{{sdk_path}}", &sdk.display().to_string());
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    }
    println!("created plugin crate {}", root.display());
    println!("  test:   cd {} && cargo test", root.display());
    println!("  build:  cargo build --release --target wasm32-wasip2");
    println!(
        "  try:    rulehook plugin run target/wasm32-wasip2/release/{crate_name}.wasm --event EVENT.json --config '{{}}'"
    );
    Ok(ExitCode::SUCCESS)
}

fn run_once(
    plugin: &str,
    event_file: &Path,
    config: &str,
    rule: &str,
    format: Format,
) -> Result<ExitCode, String> {
    let config_value: Value =
        serde_json::from_str(config).map_err(|e| format!("--config is not valid JSON: {e}"))?;
    let text = std::fs::read_to_string(event_file)
        .map_err(|e| format!("cannot read {}: {e}", event_file.display()))?;
    let event = crate::event::Event::from_json(&text)
        .map_err(|e| format!("{}: {e}", event_file.display()))?;
    let event_id = event.id.clone().unwrap_or_else(|| "evt_plugin_run".into());
    let payload = crate::payload::build(rule, &event, &event_id);

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

    if let Err(e) = compiled.validate_config(&config_value.to_string()) {
        let out =
            json!({"plugin": compiled.name, "outcome": "invalid-config", "error": e.to_string()});
        print_outcome(&out, format);
        return Ok(ExitCode::from(1));
    }
    let ctx = CallContext::for_event(rule, &event_id, &event);
    let input = payload.to_string();
    let call = compiled.transform(&ctx, &input, &config_value.to_string());
    // A second call on the now-warm instance shows what the server pays
    // per delivery once the plugin is loaded.
    let warm = compiled.transform(&ctx, &input, &config_value.to_string());
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
