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
        /// A directory of extra plugins (`NAME.wasm`) the rules may name.
        #[arg(long)]
        plugins: Option<PathBuf>,
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
        /// A directory of extra plugins (`NAME.wasm`) the rules may name.
        #[arg(long)]
        plugins: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Print the JSON Schema of the rule file format.
    Schema,
    /// Run the server: ingest API, rules, durable delivery.
    Serve {
        /// A YAML config file (layered over the defaults; RULEHOOK_* env vars override it).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The address to listen on (default 127.0.0.1:7700).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Receive webhooks locally: print them, verify signature and basic auth.
    Listen {
        #[arg(long, default_value_t = 9000)]
        port: u16,
        /// Verify signatures with this secret (whsec_… for Standard Webhooks).
        #[arg(long)]
        secret: Option<String>,
        #[arg(long, default_value = "X-Rulehook-Signature")]
        signature_header: String,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        password: Option<String>,
        /// The status to answer with.
        #[arg(long, default_value_t = 200)]
        status: u16,
    },
    /// Receive a shared space's WebSocket deliveries from a running server
    /// and print them; reconnects when the connection drops.
    Channel {
        /// The shared space to receive (e.g. 1001).
        space: String,
        /// The server's address.
        #[arg(long, default_value = "http://127.0.0.1:7700")]
        server: String,
        /// The API key's name (role websocket or admin).
        #[arg(long)]
        client_id: String,
        /// The API key itself.
        #[arg(long, env = "RULEHOOK_CLIENT_SECRET", hide_env_values = true)]
        client_secret: String,
    },
    /// List, show and redeliver deliveries (through the running server).
    Deliveries {
        #[command(subcommand)]
        command: DeliveriesCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List endpoints and unblock them (through the running server).
    Endpoints {
        #[command(subcommand)]
        command: EndpointsCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Ordered lanes of rules with `ordering`: list them, resume or skip a
    /// halted one (through the running server).
    Lanes {
        #[command(subcommand)]
        command: LanesCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// The nodes sharing this server's store (through the running server).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Move a store's contents (see `store copy --help`).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Write and try plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// POST a test request to a rule's URL (with ?test=true) and show the answer.
    TestConnection {
        rule: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// The server's base URL (default: from the config's `listen`).
    #[arg(long, global = true)]
    server: Option<String>,
    /// An admin API key (default: RULEHOOK_API_KEY, then data/api-keys.json).
    #[arg(long, global = true)]
    api_key: Option<String>,
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Human, global = true)]
    format: Format,
}

#[derive(Subcommand, Debug)]
pub enum DeliveriesCommand {
    List {
        #[arg(long)]
        rule: Option<String>,
        #[arg(long)]
        event: Option<String>,
        /// pending, parked, succeeded, failed or skipped.
        #[arg(long)]
        status: Option<String>,
        /// The endpoint it goes to: scheme://host:port.
        #[arg(long)]
        endpoint: Option<String>,
        /// The last attempt's HTTP status: a code (404) or a class (5xx).
        #[arg(long)]
        status_code: Option<String>,
        /// Made at or after this time (RFC 3339, or ms since the epoch).
        #[arg(long)]
        since: Option<String>,
        /// Made at or before this time (RFC 3339, or ms since the epoch).
        #[arg(long)]
        until: Option<String>,
        /// Older than this delivery id (the `next_before` of the last page).
        #[arg(long)]
        before: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    Show {
        id: String,
    },
    /// Send it again with the same id. It keeps the rule version it is
    /// bound to (the rule as it was when the event was accepted) unless
    /// `--current-rule` says to send it with the rule as it runs now.
    Redeliver {
        id: String,
        #[arg(long)]
        current_rule: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Create a ready-to-build plugin project NAME (in DIR/NAME), in Rust (on
    /// the SDK), JavaScript, TypeScript or Python.
    New {
        name: String,
        /// Where to create it.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The language: a Rust crate on the SDK, or a JavaScript,
        /// TypeScript (both built with componentize-qjs) or Python
        /// (componentize-py) project with the WIT and a build script.
        #[arg(long, value_enum, default_value_t = Lang::Rust)]
        lang: Lang,
        /// The plugin-sdk directory a Rust plugin depends on (default: the
        /// one this rulehook was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Run a plugin on an event the way the server does and print the
    /// outcome, the timing and the plugin's logs.
    Run {
        /// The component (`.wasm`), or the name of a bundled plugin.
        plugin: String,
        /// A JSON file holding one event; the plugin gets its payload.
        #[arg(long)]
        event: PathBuf,
        /// The plugin's config, as JSON.
        #[arg(long, default_value = "null")]
        config: String,
        /// The rule name the payload and context carry.
        #[arg(long, default_value = "plugin-run")]
        rule: String,
        /// The call's deadline, as a rule's plugin entry may set it (e.g.
        /// `200ms`; default the server's 50ms, at most 1s).
        #[arg(long)]
        timeout: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
}

#[derive(Subcommand, Debug)]
pub enum EndpointsCommand {
    List,
    /// Unblock (or re-enable after 410) an endpoint such as https://host:443.
    Unblock {
        endpoint: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum LanesCommand {
    /// Lanes with a delivery pending or held: the head, how many wait
    /// behind it and why it is held.
    List {
        #[arg(long)]
        rule: Option<String>,
        /// flowing, retrying, parked or halted.
        #[arg(long)]
        state: Option<String>,
        /// Go on after this lane (the previous page's `next_after`).
        #[arg(long)]
        after: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Send a halted lane's head again (it stays ahead of the rest).
    Resume {
        /// The lane, as `rule/key` (see `lanes list`).
        lane: String,
    },
    /// Give up a halted lane's head (it stays failed) and send the next.
    Skip {
        /// The lane, as `rule/key` (see `lanes list`).
        lane: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Copy events, deliveries (pending, parked and final, with bodies and
    /// attempts), endpoint states and rule versions from an embedded store
    /// into PostgreSQL, to switch to cluster mode. Stop the server first.
    /// Idempotent: a second run adds nothing.
    Copy {
        /// The source: redb:PATH of a data directory's rulehook.redb.
        #[arg(long)]
        from: String,
        /// The target: a postgres://… connection string (or RULEHOOK_STORE).
        #[arg(long, env = "RULEHOOK_STORE")]
        to: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Every node with its heartbeat, version and rule-set digest.
    Status,
}

/// The languages `rulehook plugin new` has a template for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    Js,
    Ts,
    Python,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            dir,
            plugins,
            format,
        } => check(&dir, plugins.as_deref(), format),
        Command::Explain {
            event,
            rules,
            plugins,
            format,
        } => explain(&event, &rules, plugins.as_deref(), format),
        Command::Plugin { command } => crate::plugin_cli::run(command),
        Command::Schema => {
            println!("{}", pretty(&rules::schema::json_schema()));
            ExitCode::SUCCESS
        }
        Command::Serve { config, listen } => serve(config.as_deref(), listen),
        Command::Listen {
            port,
            secret,
            signature_header,
            user,
            password,
            status,
        } => {
            let opts = crate::listen::Options {
                secret,
                signature_header,
                user,
                password,
                status,
            };
            runtime(async move {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
                println!(
                    "rulehook listen: receiving on http://{}",
                    listener.local_addr()?
                );
                let out: std::sync::Arc<std::sync::Mutex<dyn std::io::Write + Send>> =
                    std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
                crate::listen::run(listener, opts, out).await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Channel {
            space,
            server,
            client_id,
            client_secret,
        } => {
            let opts = crate::channel_cli::Options {
                server,
                space,
                client_id,
                client_secret,
            };
            runtime(async move { crate::channel_cli::run(opts, &mut std::io::stdout()).await })
        }
        Command::Deliveries { command, server } => {
            admin(server, move |c| Box::pin(deliveries(c, command)))
        }
        Command::Endpoints { command, server } => {
            admin(server, move |c| Box::pin(endpoints(c, command)))
        }
        Command::Lanes { command, server } => admin(server, move |c| Box::pin(lanes(c, command))),
        Command::Store {
            command: StoreCommand::Copy { from, to },
        } => {
            let mut last = std::time::Instant::now();
            let result = crate::store_cli::copy(&from, &to, &mut |c| {
                if last.elapsed() >= std::time::Duration::from_secs(1) {
                    eprintln!(
                        "copied {} events ({} deliveries added)",
                        c.events, c.deliveries_added
                    );
                    last = std::time::Instant::now();
                }
            });
            match result {
                Ok(c) => {
                    println!(
                        "copied {} events, {} deliveries added (the rest were there already), {} endpoints, {} rule versions",
                        c.events, c.deliveries_added, c.endpoints, c.rule_versions
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Cluster {
            command: ClusterCommand::Status,
            server,
        } => admin(server, move |c| {
            Box::pin(async move {
                let (status, value) = c.call("GET", "/v1/cluster", None).await?;
                ok_or(status, value)
            })
        }),
        Command::TestConnection { rule, config } => test_connection(&rule, config.as_deref()),
    }
}

fn runtime(f: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match rt.block_on(f) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    };
    // Dropping a runtime waits for every `spawn_blocking` task to return; a
    // stop must not wait on a reload or plugin call that is still running
    // (each is bounded on its own, but the exit should not add them up).
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

fn load_config(file: Option<&Path>) -> anyhow::Result<crate::config::Config> {
    Ok(crate::config::Config::load(file, &|k| {
        std::env::var(k).ok()
    })?)
}

fn serve(config: Option<&Path>, listen: Option<std::net::SocketAddr>) -> ExitCode {
    runtime(async move {
        let mut config = load_config(config)?;
        if let Some(addr) = listen {
            config.listen = addr;
        }
        // After the config (it names the trace collector), inside the
        // runtime (the exporter sends through it).
        let telemetry =
            crate::telemetry::init(config.otlp_endpoint.as_ref(), config.otlp_sample_ratio)?;
        let listener = crate::serve::bind(config.listen).await?;
        let served = crate::serve::run(listener, config, shutdown_signal()).await;
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        served?;
        Ok(ExitCode::SUCCESS)
    })
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

type AdminFuture = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<(ExitCode, Value)>>>>;

fn admin(
    args: ServerArgs,
    f: impl FnOnce(crate::admin_client::AdminClient) -> AdminFuture,
) -> ExitCode {
    let config = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let server = args
        .server
        .unwrap_or_else(|| format!("http://{}", config.listen));
    let client = match crate::admin_client::AdminClient::new(server, args.api_key, &config.data_dir)
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let format = args.format;
    runtime(async move {
        let (code, value) = f(client).await?;
        match format {
            Format::Json => println!("{}", pretty(&value)),
            Format::Human => print_admin(&value),
        }
        Ok(code)
    })
}

fn ok_or(status: u16, value: Value) -> anyhow::Result<(ExitCode, Value)> {
    if (200..300).contains(&status) {
        Ok((ExitCode::SUCCESS, value))
    } else {
        let msg = value["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        anyhow::bail!("the server answered {status}: {msg}")
    }
}

async fn deliveries(
    c: crate::admin_client::AdminClient,
    cmd: DeliveriesCommand,
) -> anyhow::Result<(ExitCode, Value)> {
    let (status, value) = match cmd {
        DeliveriesCommand::List {
            rule,
            event,
            status,
            endpoint,
            status_code,
            since,
            until,
            before,
            limit,
        } => {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            let filters = [
                ("rule", rule),
                ("event", event),
                ("status", status),
                ("endpoint", endpoint),
                ("status_code", status_code),
                ("since", since),
                ("until", until),
                ("before", before),
            ];
            for (name, value) in filters {
                if let Some(v) = value {
                    q.append_pair(name, &v);
                }
            }
            q.append_pair("limit", &limit.to_string());
            c.call("GET", &format!("/v1/deliveries?{}", q.finish()), None)
                .await?
        }
        DeliveriesCommand::Show { id } => {
            c.call("GET", &format!("/v1/deliveries/{id}"), None).await?
        }
        DeliveriesCommand::Redeliver { id, current_rule } => {
            let query = if current_rule { "?rule=current" } else { "" };
            c.call(
                "POST",
                &format!("/v1/deliveries/{id}/redeliver{query}"),
                None,
            )
            .await?
        }
    };
    ok_or(status, value)
}

async fn endpoints(
    c: crate::admin_client::AdminClient,
    cmd: EndpointsCommand,
) -> anyhow::Result<(ExitCode, Value)> {
    let (status, value) = match cmd {
        EndpointsCommand::List => c.call("GET", "/v1/endpoints", None).await?,
        EndpointsCommand::Unblock { endpoint } => {
            c.call(
                "POST",
                "/v1/endpoints/unblock",
                Some(json!({ "endpoint": endpoint })),
            )
            .await?
        }
    };
    ok_or(status, value)
}

async fn lanes(
    c: crate::admin_client::AdminClient,
    cmd: LanesCommand,
) -> anyhow::Result<(ExitCode, Value)> {
    let (status, value) = match cmd {
        LanesCommand::List {
            rule,
            state,
            after,
            limit,
        } => {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in [("rule", rule), ("state", state), ("after", after)] {
                if let Some(v) = v {
                    q.append_pair(k, &v);
                }
            }
            if let Some(n) = limit {
                q.append_pair("limit", &n.to_string());
            }
            c.call("GET", &format!("/v1/lanes?{}", q.finish()), None)
                .await?
        }
        LanesCommand::Resume { lane } => {
            c.call("POST", "/v1/lanes/resume", Some(json!({ "lane": lane })))
                .await?
        }
        LanesCommand::Skip { lane } => {
            c.call("POST", "/v1/lanes/skip", Some(json!({ "lane": lane })))
                .await?
        }
    };
    ok_or(status, value)
}

/// Human output for admin answers: one line per delivery or endpoint, or
/// the whole record for `show`.
fn print_admin(value: &Value) {
    if let Some(list) = value["deliveries"].as_array() {
        for d in list {
            println!(
                "{}  {}  {:<9}  attempts {}  rule {}  event {}{}",
                d["created_at_rfc3339"].as_str().unwrap_or_default(),
                d["id"].as_str().unwrap_or_default(),
                d["state"].as_str().unwrap_or_default(),
                d["attempts"],
                d["rule"].as_str().unwrap_or_default(),
                d["event_id"].as_str().unwrap_or_default(),
                d["reason"]
                    .as_str()
                    .map(|r| format!("  ({r})"))
                    .unwrap_or_default()
            );
        }
        println!("{} deliveries", list.len());
        if let Some(next) = value["next_before"].as_str() {
            println!("older: --before {next}");
        }
    } else if let Some(list) = value["lanes"].as_array() {
        for l in list {
            let head = &l["head"];
            println!(
                "{}  {:<8}  head {} ({}, attempts {})  waiting {}{}",
                l["lane"].as_str().unwrap_or_default(),
                l["state"].as_str().unwrap_or_default(),
                head["id"].as_str().unwrap_or_default(),
                head["state"].as_str().unwrap_or_default(),
                head["attempts"],
                l["waiting"],
                head["reason"]
                    .as_str()
                    .map(|r| format!("  ({r})"))
                    .unwrap_or_default()
            );
        }
        println!("{} lanes", list.len());
        if let Some(next) = value["next_after"].as_str() {
            println!("more: --after '{next}'");
        }
    } else if let Some(list) = value["endpoints"].as_array() {
        for e in list {
            println!(
                "{}  {}  failures {}  parked {}{}",
                e["endpoint"].as_str().unwrap_or_default(),
                if e["disabled"] == true {
                    "disabled (410)"
                } else if e["blocked"] == true {
                    "blocked"
                } else {
                    "ok"
                },
                e["consecutive_failures"],
                e["parked"],
                e["last_error"]
                    .as_str()
                    .map(|r| format!("  last error: {r}"))
                    .unwrap_or_default()
            );
            if let Some(until) = e["blocked_until_rfc3339"].as_str() {
                println!("  blocked until {until}");
            }
        }
        for c in value["channels"].as_array().into_iter().flatten() {
            println!(
                "websocket space {}  clients {}  parked {}",
                c["space"].as_str().unwrap_or_default(),
                c["clients"],
                c["parked"]
            );
        }
    } else if let Some(list) = value["nodes"].as_array() {
        println!(
            "store {}  this node {}  rule sets {}",
            value["store"].as_str().unwrap_or_default(),
            value["node"].as_str().unwrap_or_default(),
            value["rule_sets"]
        );
        for n in list {
            println!(
                "{}{}  {}  version {}  rules {}  heartbeat {} ms ago  {}",
                n["id"].as_str().unwrap_or_default(),
                if n["this"] == true { " (this)" } else { "" },
                if n["alive"] == true {
                    "alive"
                } else {
                    "silent"
                },
                n["version"].as_str().unwrap_or_default(),
                n["rules_digest"].as_str().unwrap_or_default(),
                n["heartbeat_age_ms"],
                n["addr"].as_str().unwrap_or_default()
            );
        }
        if let Some(w) = value["warning"].as_str() {
            println!("warning: {w}");
        }
    } else {
        println!("{}", pretty(value));
    }
}

fn test_connection(rule_name: &str, config: Option<&Path>) -> ExitCode {
    runtime(async move {
        let config = load_config(config)?;
        let (set, diagnostics) = rules::load::load_dir(&config.rules_dir);
        report_rule_errors(&diagnostics);
        let Some(rule) = set.get(rule_name) else {
            anyhow::bail!("no rule `{rule_name}` in {}", config.rules_dir.display());
        };
        let sender = crate::deliver::client::Sender::new(config.outbound.clone())
            .map_err(anyhow::Error::msg)?;
        let tested = crate::deliver::test_connection(&sender, rule, config.response_body_cap)
            .await
            .map_err(anyhow::Error::msg)?;
        println!("{} {}", tested.method, tested.url);
        match tested.result {
            Ok(r) => {
                println!(
                    "=> {} {} in {} ms",
                    r.status,
                    r.reason.unwrap_or_default(),
                    tested.duration.as_millis()
                );
                for (k, v) in &r.headers {
                    println!("{k}: {v}");
                }
                println!("\n{}", String::from_utf8_lossy(&r.body));
                Ok(if (200..300).contains(&r.status) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            }
            Err(e) => {
                println!("=> no answer: {e}");
                Ok(ExitCode::from(1))
            }
        }
    })
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn check(dir: &Path, plugins: Option<&Path>, format: Format) -> ExitCode {
    let runtime = match plugin_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let (set, _, diagnostics) = crate::reload::assemble(&runtime, dir, plugins, None);
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
            let warnings = count(warnings, "warning");
            if errors == 0 {
                println!(
                    "{}: {} ok, {warnings}",
                    dir.display(),
                    count(set.len(), "rule")
                );
            } else {
                println!("{}: {}, {warnings}", dir.display(), count(errors, "error"));
            }
        }
    }
    if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn explain(event_file: &Path, dir: &Path, plugins: Option<&Path>, format: Format) -> ExitCode {
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
    let runtime = match plugin_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let (set, plugin_set, diagnostics) = crate::reload::assemble(&runtime, dir, plugins, None);
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
            // The text ingest would run the chain on, so what is shown is
            // what would be sent.
            let payload = crate::payload::to_string(&rule.name, &event, &event_id);
            let ctx = crate::plugins::CallContext::for_event(&rule.name, &event_id, &event);
            match plugin_set.run_chain_observed(rule, &ctx, payload, &|_, _, _| {}) {
                crate::plugins::ChainOutcome::Send(body) => {
                    entry["payload"] = serde_json::from_slice(&body).unwrap_or(Value::Null);
                }
                crate::plugins::ChainOutcome::Skip(why) => entry["skipped"] = json!(why),
                crate::plugins::ChainOutcome::Failed(why) => entry["failed"] = json!(why),
            }
            if rule.webhook.transport == crate::rules::Transport::WebSocket {
                use crate::deliver::channel;
                let space = channel::space_for(rule.webhook.space.as_deref(), &event.scope);
                entry["channel"] = json!(match space {
                    Ok(space) => format!(
                        "a text frame to the WebSocket clients of shared space {space} ({})",
                        channel::path(&space)
                    ),
                    Err(why) => format!("nowhere: {why}"),
                });
            } else {
                entry["headers"] = json!(preview_headers(rule));
            }
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

/// A plugin runtime for one-shot commands: default limits, the user's
/// compile cache.
pub(crate) fn plugin_runtime() -> Result<std::sync::Arc<crate::plugins::Runtime>, ExitCode> {
    crate::plugins::Runtime::new(
        crate::plugins::Limits::default(),
        crate::config::user_plugin_cache(),
    )
    .map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
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
        if let Some(o) = entry.get("ordering") {
            println!(
                "  ordered: lane {} (key {}, on_failure {}): sent once the lane's earlier deliveries are final",
                o["lane"].as_str().unwrap_or_default(),
                o["key"].as_str().unwrap_or_default(),
                o["on_failure"].as_str().unwrap_or_default()
            );
        }
        if let Some(channel) = entry["channel"].as_str() {
            println!("  sent as: {channel}");
        } else {
            println!("  headers:");
        }
        for h in entry["headers"].as_array().into_iter().flatten() {
            println!(
                "    {}: {}",
                h[0].as_str().unwrap_or_default(),
                h[1].as_str().unwrap_or_default()
            );
        }
        if let Some(why) = entry["skipped"].as_str() {
            println!("  skipped: {why}");
        } else if let Some(why) = entry["failed"].as_str() {
            println!("  failed: {why}");
        } else {
            println!("  payload:");
            for line in pretty(&entry["payload"]).lines() {
                println!("    {line}");
            }
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
    let fields = (!rule.fields.is_empty()).then(|| crate::plugins::SELECT_FIELDS.to_string());
    fields
        .into_iter()
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
        h.push((k.clone(), v.preview()));
    }
    for style in &w.signature {
        match style {
            SignatureStyle::HmacSha256 => h.push((
                w.signature_header.clone(),
                "sha256=<HMAC-SHA256 of the body, hex>".into(),
            )),
            SignatureStyle::StandardWebhooks => {
                h.push((crate::sign::WEBHOOK_ID.into(), "<delivery id>".into()));
                h.push((
                    crate::sign::WEBHOOK_TIMESTAMP.into(),
                    "<unix seconds at send>".into(),
                ));
                h.push((
                    crate::sign::WEBHOOK_SIGNATURE.into(),
                    "v1,<base64 HMAC-SHA256 of id.timestamp.body>".into(),
                ));
            }
        }
    }
    h
}

/// `1 error`, `2 errors`: counts in human output read as English.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
