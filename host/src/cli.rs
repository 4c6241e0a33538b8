//! The `rulehook` command line. Commands print for people by default and
//! for tools with `--format json`; exit codes: 0 ok, 1 problems found in
//! rules, 2 bad usage or unreadable input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::event::Event;
use crate::rules::{self, Diagnostic, Rule, SignatureStyle};

#[derive(Parser, Debug)]
#[command(
    name = "rulehook",
    version,
    about = "Webhook rule engine: rules decide, plugins reshape, signed deliveries go out durably"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate the rule files of a directory and report every mistake.
    Check {
        /// The rules directory.
        #[arg(default_value = "rules")]
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Show, for a sample event, which rules match, why the others don't,
    /// and the payload and headers each match would send.
    Explain {
        /// A JSON file holding one event.
        #[arg(long)]
        event: PathBuf,
        /// The rules directory.
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Print the JSON Schema of the rule file format.
    Schema,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { dir, format } => check(&dir, format),
        Command::Explain {
            event,
            rules,
            format,
        } => explain(&event, &rules, format),
        Command::Schema => {
            println!("{}", pretty(&rules::schema::json_schema()));
            ExitCode::SUCCESS
        }
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn check(dir: &Path, format: Format) -> ExitCode {
    let (set, diagnostics) = rules::load::load_dir(dir);
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = diagnostics.len() - errors;
    match format {
        Format::Json => println!(
            "{}",
            pretty(
                &json!({"ok": errors == 0, "rules": set.len(), "errors": errors, "warnings": warnings, "diagnostics": diagnostics})
            )
        ),
        Format::Human => {
            for d in &diagnostics {
                println!("{d}");
            }
            if errors == 0 {
                println!(
                    "{}: {} rules ok, {warnings} warnings",
                    dir.display(),
                    set.len()
                );
            } else {
                println!("{}: {errors} errors, {warnings} warnings", dir.display());
            }
        }
    }
    if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn explain(event_file: &Path, dir: &Path, format: Format) -> ExitCode {
    let event = match std::fs::read_to_string(event_file)
        .map_err(|e| format!("cannot read {}: {e}", event_file.display()))
        .and_then(|text| {
            Event::from_json(&text).map_err(|e| format!("{}: {e}", event_file.display()))
        }) {
        Ok(ev) => ev,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (set, diagnostics) = rules::load::load_dir(dir);
    report_rule_errors(&diagnostics);
    let event_id = event
        .id
        .clone()
        .unwrap_or_else(|| "(assigned at ingest)".into());
    let verdicts = rules::explain::explain(&set, &event);
    let mut out = Vec::new();
    for v in &verdicts {
        let mut entry = serde_json::to_value(v).unwrap_or(Value::Null);
        if v.matched
            && let Some(rule) = set.get(&v.rule)
        {
            let payload = crate::payload::build(rule, &event, &event_id);
            entry["payload"] = payload;
            entry["headers"] = json!(preview_headers(rule));
            entry["plugins"] = json!(plugin_chain(rule));
        }
        out.push(entry);
    }
    match format {
        Format::Json => println!("{}", pretty(&json!({"event": event_id, "rules": out}))),
        Format::Human => {
            println!(
                "event {event_id}: {} {} {}\n",
                event.event_type,
                event.entity_type,
                event.entity_id()
            );
            for entry in &out {
                print_verdict(entry);
            }
            let n = verdicts.iter().filter(|v| v.matched).count();
            println!("{n} of {} rules match", verdicts.len());
        }
    }
    if diagnostics.iter().any(Diagnostic::is_error) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn report_rule_errors(diagnostics: &[Diagnostic]) {
    let errors: Vec<_> = diagnostics.iter().filter(|d| d.is_error()).collect();
    if !errors.is_empty() {
        eprintln!(
            "{} errors in the rules; rules with errors are left out:",
            errors.len()
        );
        for d in errors {
            eprintln!("{d}");
        }
        eprintln!();
    }
}

fn print_verdict(entry: &Value) {
    let name = entry["rule"].as_str().unwrap_or_default();
    let at = entry["at"].as_str().unwrap_or_default();
    if entry["matched"] == Value::Bool(true) {
        println!("MATCH    {name} ({at})");
        println!("  plugins: {}", entry["plugins"]);
        println!("  headers:");
        for h in entry["headers"].as_array().into_iter().flatten() {
            println!(
                "    {}: {}",
                h[0].as_str().unwrap_or_default(),
                h[1].as_str().unwrap_or_default()
            );
        }
        println!("  payload (before plugins):");
        for line in pretty(&entry["payload"]).lines() {
            println!("    {line}");
        }
    } else {
        let r = &entry["reason"];
        println!("no match {name} ({at})");
        println!(
            "  {}: {}",
            r["check"].as_str().unwrap_or_default(),
            r["why"].as_str().unwrap_or_default()
        );
        println!(
            "    expected: {}",
            r["expected"].as_str().unwrap_or_default()
        );
        println!("    actual:   {}", r["actual"]);
    }
    println!();
}

/// The chain a rule's payload goes through, in order.
fn plugin_chain(rule: &Rule) -> Vec<String> {
    std::iter::once("select-fields".to_string())
        .chain(rule.plugins.iter().map(|p| p.name.clone()))
        .collect()
}

/// The headers a delivery of this rule carries. Values computed per attempt
/// (ids, timestamps, signatures) and secrets are shown as placeholders.
pub fn preview_headers(rule: &Rule) -> Vec<(String, String)> {
    let w = &rule.webhook;
    let mut h = vec![
        ("Content-Type".to_string(), "application/json".to_string()),
        (
            "X-Rulehook-Delivery".to_string(),
            "<delivery id, stable across retries>".to_string(),
        ),
    ];
    if let Some(c) = &w.credentials {
        h.push((
            "Authorization".into(),
            format!("Basic <{}:{} in base64>", c.username, "***"),
        ));
    }
    for (k, v) in &w.headers {
        h.push((k.clone(), v.clone()));
    }
    for style in &w.signature {
        match style {
            SignatureStyle::HmacSha256 => h.push((
                w.signature_header.clone(),
                "sha256=<HMAC-SHA256 of the body, hex>".into(),
            )),
            SignatureStyle::StandardWebhooks => {
                h.push(("webhook-id".into(), "<delivery id>".into()));
                h.push(("webhook-timestamp".into(), "<unix seconds at send>".into()));
                h.push((
                    "webhook-signature".into(),
                    "v1,<base64 HMAC-SHA256 of id.timestamp.body>".into(),
                ));
            }
        }
    }
    h
}
