//! Server configuration, layered: built-in defaults, then a YAML file
//! (`--config`), then `RULEHOOK_*` environment variables, then flags.
//! Every default is the safe one: loopback only, HTTPS only, private and
//! loopback destinations refused, API keys required.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::rules::parse::{parse_duration, parse_size};

#[derive(Clone, Debug)]
pub struct Config {
    /// Where the API listens; loopback unless configured otherwise.
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub rules_dir: PathBuf,
    /// Extra plugins (`NAME.wasm`), besides the bundled ones.
    pub plugins_dir: Option<PathBuf>,
    /// Compiled plugins (`.cwasm`); default `data_dir/plugin-cache`.
    pub plugin_cache: Option<PathBuf>,
    pub api_keys: Vec<ApiKey>,
    /// Ingest bodies above this get 413.
    pub max_body_bytes: usize,
    /// Response bodies are kept in attempt records up to this size.
    pub response_body_cap: usize,
    /// Final deliveries and their events are removed after this long.
    pub retention: Duration,
    pub outbound: Outbound,
    /// Attempts in flight at once, overall and per endpoint.
    pub max_in_flight: usize,
    pub max_in_flight_per_endpoint: usize,
    pub protection: Protection,
    /// A `Retry-After` longer than this is cut to it.
    pub retry_after_cap: Duration,
    /// On SIGTERM, in-flight attempts get this long to finish.
    pub shutdown_grace: Duration,
    /// How long attempt records wait to share a commit (see
    /// `Outbox::write_lazily`); zero commits each at once.
    pub record_linger: Duration,
    /// redb page cache; most of the memory a large backlog costs.
    pub cache_bytes: usize,
    /// Save redb's allocator state with every commit, so a restart after a
    /// crash needs no walk of the whole file (see `Store::open_with`).
    pub quick_repair: bool,
    /// Make each batch durable in the commit log beside the redb file and
    /// checkpoint redb about once a second, instead of a durable redb
    /// commit per batch (see `store/redb/commit_log.rs`).
    pub commit_log: bool,
    /// Per-call plugin limits: CPU deadline, memory, output and log size.
    pub plugin_limits: crate::plugins::Limits,
    /// Reload on file changes (off: only SIGHUP and `POST /v1/rules/reload`,
    /// e.g. on network file systems without change notifications).
    pub watch: bool,
    /// Where durable state lives: `None` for the embedded redb file in
    /// `data_dir` (the default), or a PostgreSQL database shared by every
    /// node of a cluster (`store: postgres://…`, `RULEHOOK_STORE`).
    pub store: Option<PgUrl>,
    /// How this node takes part in a cluster (postgres mode only).
    pub cluster: Cluster,
    /// What one client may hold of the HTTP server (`server:` in the file).
    pub server: ServerLimits,
    /// An OpenTelemetry collector's OTLP/HTTP endpoint; traces are exported
    /// there only when this is set (see `telemetry`).
    pub otlp_endpoint: Option<url::Url>,
    /// The share of events (0 to 1) whose ingest and attempts are traced.
    pub otlp_sample_ratio: f64,
    /// Distinct values each metric label (rule, endpoint, plugin) keeps;
    /// later ones are counted under `other` (see `metrics`).
    pub metrics_label_values: usize,
}

/// A PostgreSQL connection string; shown without its password.
#[derive(Clone, PartialEq)]
pub struct PgUrl(pub String);

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match url::Url::parse(&self.0) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                write!(f, "{u}")
            }
            _ => write!(f, "{}", self.0),
        }
    }
}

/// Cluster settings (postgres mode).
#[derive(Clone, Debug)]
pub struct Cluster {
    /// This node's name among the others (`None`: host name and process id).
    pub node_id: Option<String>,
    /// How long a node's claim on a delivery holds without renewal: after a
    /// node dies, others send its deliveries this much later.
    pub lease: Duration,
    /// Database connections per node.
    pub pool_size: usize,
}

/// Where deliveries may go.
#[derive(Clone, Debug)]
pub struct Outbound {
    /// Plain HTTP is refused unless this is on.
    pub allow_http: bool,
    /// With `allow_http`, plain HTTP only to these ports.
    pub http_ports: Vec<u16>,
    /// Private, loopback and other non-global destinations allowed by CIDR.
    /// Link-local and cloud metadata addresses are refused regardless.
    pub allow_cidrs: Vec<IpNet>,
    /// An extra CA certificate (PEM) to trust besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// `http://[user:password@]host:port` of an HTTP proxy to tunnel
    /// through (see `deliver::proxy`).
    pub proxy: Option<ProxyUrl>,
    /// Names, suffixes, IPs or CIDRs that go direct, not through `proxy`.
    pub no_proxy: Vec<String>,
}

/// A proxy URL as configured. It may hold a password, so its `Debug`
/// form shows only where the proxy is.
#[derive(Clone, PartialEq)]
pub struct ProxyUrl(pub String);

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match url::Url::parse(&self.0) {
            Ok(u) => write!(
                f,
                "ProxyUrl({}://{}{}:{})",
                u.scheme(),
                if u.username().is_empty() { "" } else { "***@" },
                u.host_str().unwrap_or_default(),
                u.port_or_known_default().unwrap_or(0)
            ),
            Err(_) => write!(f, "ProxyUrl(***)"),
        }
    }
}

/// The endpoint cool-down: after `failures` failures in a row, blocked for
/// `block`, doubling each time up to `max_block`.
#[derive(Clone, Debug)]
pub struct Protection {
    pub failures: u32,
    pub block: Duration,
    pub max_block: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// May post events only.
    Ingest,
    /// May use every route.
    Admin,
    /// May read every route (deliveries, rules, endpoints, metrics, the
    /// console) and change nothing: every write answers 403.
    Viewer,
    /// May only sign in to the WebSocket channel and receive deliveries
    /// (`client_id` is the key's name, `client_secret` its value).
    WebSocket,
}

#[derive(Clone)]
pub struct ApiKey {
    pub name: String,
    pub role: Role,
    pub key: String,
    /// The shared spaces whose WebSocket channel this key may open; `None`:
    /// every space.
    pub spaces: Option<Vec<String>>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}, {:?}, ***)", self.name, self.role)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            data_dir: PathBuf::from("data"),
            rules_dir: PathBuf::from("rules"),
            plugins_dir: None,
            plugin_cache: None,
            api_keys: Vec::new(),
            max_body_bytes: 1 << 20,
            response_body_cap: 64 << 10,
            retention: Duration::from_secs(7 * 86_400),
            outbound: Outbound {
                allow_http: false,
                http_ports: vec![80],
                allow_cidrs: Vec::new(),
                ca_file: None,
                proxy: None,
                no_proxy: Vec::new(),
            },
            max_in_flight: 256,
            max_in_flight_per_endpoint: 64,
            protection: Protection {
                failures: 5,
                block: Duration::from_secs(300),
                max_block: Duration::from_secs(3600),
            },
            retry_after_cap: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(10),
            record_linger: crate::outbox::LINGER,
            cache_bytes: 64 << 20,
            quick_repair: true,
            commit_log: true,
            plugin_limits: crate::plugins::Limits::default(),
            watch: true,
            store: None,
            cluster: Cluster {
                node_id: None,
                lease: Duration::from_secs(30),
                pool_size: 8,
            },
            server: ServerLimits::default(),
            otlp_endpoint: None,
            otlp_sample_ratio: 0.1,
            metrics_label_values: crate::metrics::DEFAULT_LABEL_VALUES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ConfigError {
    pub source_name: String,
    pub message: String,
}

fn cfg_err(source: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        source_name: source.to_string(),
        message: message.into(),
    }
}

/// The config file's shape; every key optional, unknown keys refused.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    rules_dir: Option<PathBuf>,
    plugins_dir: Option<PathBuf>,
    plugin_cache: Option<PathBuf>,
    api_keys: Option<Vec<FileKey>>,
    max_body: Option<String>,
    response_body_cap: Option<String>,
    retention: Option<String>,
    allow_http: Option<bool>,
    http_ports: Option<Vec<u16>>,
    allow_cidrs: Option<Vec<String>>,
    ca_file: Option<PathBuf>,
    proxy: Option<String>,
    no_proxy: Option<Vec<String>>,
    max_in_flight: Option<usize>,
    max_in_flight_per_endpoint: Option<usize>,
    protection: Option<FileProtection>,
    retry_after_cap: Option<String>,
    shutdown_grace: Option<String>,
    record_linger: Option<String>,
    cache_size: Option<String>,
    quick_repair: Option<bool>,
    commit_log: Option<bool>,
    plugin_timeout: Option<String>,
    plugin_memory: Option<String>,
    plugin_output_max: Option<String>,
    plugin_log_max: Option<String>,
    plugin_log_lines: Option<usize>,
    plugin_message_max: Option<String>,
    plugin_timeout_max: Option<String>,
    plugin_memory_max: Option<String>,
    watch: Option<bool>,
    store: Option<String>,
    cluster: Option<FileCluster>,
    server: Option<FileServerLimits>,
    otlp_endpoint: Option<String>,
    otlp_sample_ratio: Option<f64>,
    metrics_label_values: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    node_id: Option<String>,
    lease: Option<String>,
    pool_size: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    name: String,
    role: String,
    key: FileSecret,
    spaces: Option<Vec<FileSpace>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FileSecret {
    Env { env: String },
    File { file: PathBuf },
    Inline(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProtection {
    failures: Option<u32>,
    block: Option<String>,
    max_block: Option<String>,
}

/// A share of events to trace, 0 to 1.
fn sample_ratio(source: &str, key: &str, r: f64) -> Result<f64, ConfigError> {
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(cfg_err(
            source,
            format!(
                "`{key}`: {r} is not between 0 and 1; write e.g. 0.1 for one event in ten, 1 for all"
            ),
        ))
    }
}

/// An OTLP/HTTP collector URL; empty turns export off.
fn otlp_endpoint(source: &str, key: &str, text: &str) -> Result<Option<url::Url>, ConfigError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    match url::Url::parse(text.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Ok(Some(u)),
        _ => Err(cfg_err(
            source,
            format!(
                "`{key}`: `{text}` is not an http(s) URL of an OTLP collector; write e.g. http://127.0.0.1:4318"
            ),
        )),
    }
}

fn duration(source: &str, key: &str, text: &str) -> Result<Duration, ConfigError> {
    parse_duration(text).ok_or_else(|| {
        cfg_err(
            source,
            format!("`{key}`: `{text}` is not a duration; write e.g. 500ms, 20s, 5m, 1h, 7d"),
        )
    })
}

fn size(source: &str, key: &str, text: &str) -> Result<usize, ConfigError> {
    parse_size(text).ok_or_else(|| {
        cfg_err(
            source,
            format!("`{key}`: `{text}` is not a size; write e.g. 64KiB or 1MiB"),
        )
    })
}

impl Config {
    /// Defaults, then the file (if any), then the environment.
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        if let Some(path) = file {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|e| cfg_err(&name, format!("cannot read: {e}")))?;
            let value = match crate::rules::yaml::parse(&text) {
                Ok(Some(node)) => node.to_json(),
                Ok(None) => serde_json::json!({}),
                Err(e) => {
                    return Err(cfg_err(
                        &name,
                        format!("{}: invalid YAML: {}", e.span, e.message),
                    ));
                }
            };
            let f: FileConfig =
                serde_json::from_value(value).map_err(|e| cfg_err(&name, e.to_string()))?;
            let base = path.parent().unwrap_or(Path::new("."));
            c.apply_file(f, &name, base, env)?;
        }
        c.apply_env(env)?;
        // A proxy that cannot be used is a start-up error, not a failure
        // of every delivery later.
        if let Some(url) = &c.outbound.proxy {
            let source = file.map_or("environment".into(), |p| p.display().to_string());
            crate::deliver::proxy::Proxy::parse(&url.0, &c.outbound.no_proxy)
                .map_err(|e| cfg_err(&source, format!("`proxy`: {e}")))?;
        }
        Ok(c)
    }

    fn apply_file(
        &mut self,
        f: FileConfig,
        src: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(l) = f.listen {
            self.listen = l.parse().map_err(|_| {
                cfg_err(
                    src,
                    format!("`listen`: `{l}` is not an address; write e.g. 127.0.0.1:7700"),
                )
            })?;
        }
        // Paths in the file are relative to the file, so a config works
        // from any working directory.
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        if let Some(p) = f.data_dir {
            self.data_dir = rel(p);
        }
        if let Some(p) = f.rules_dir {
            self.rules_dir = rel(p);
        }
        if let Some(p) = f.plugins_dir {
            self.plugins_dir = Some(rel(p));
        }
        if let Some(p) = f.plugin_cache {
            self.plugin_cache = Some(rel(p));
        }
        if let Some(p) = f.ca_file {
            self.outbound.ca_file = Some(rel(p));
        }
        if let Some(p) = f.proxy {
            self.outbound.proxy = Some(ProxyUrl(p));
        }
        if let Some(list) = f.no_proxy {
            self.outbound.no_proxy = list;
        }
        if let Some(keys) = f.api_keys {
            self.api_keys.clear();
            for k in keys {
                let role = match k.role.as_str() {
                    "ingest" => Role::Ingest,
                    "admin" => Role::Admin,
                    "websocket" => Role::WebSocket,
                    "viewer" => Role::Viewer,
                    other => {
                        return Err(cfg_err(
                            src,
                            format!(
                                "api key `{}`: role `{other}` is unknown; use ingest, admin, viewer or websocket",
                                k.name
                            ),
                        ));
                    }
                };
                let key = match k.key {
                    FileSecret::Env { env: name } => env(&name).ok_or_else(|| {
                        cfg_err(
                            src,
                            format!(
                                "api key `{}`: environment variable {name} is not set",
                                k.name
                            ),
                        )
                    })?,
                    FileSecret::File { file } => std::fs::read_to_string(rel(file.clone()))
                        .map(|s| s.trim().to_string())
                        .map_err(|e| {
                            cfg_err(
                                src,
                                format!(
                                    "api key `{}`: cannot read {}: {e}",
                                    k.name,
                                    file.display()
                                ),
                            )
                        })?,
                    FileSecret::Inline(s) => s,
                };
                if key.len() < 16 {
                    return Err(cfg_err(
                        src,
                        format!(
                            "api key `{}` is shorter than 16 characters; use a long random key",
                            k.name
                        ),
                    ));
                }
                self.api_keys.push(ApiKey {
                    name: k.name,
                    role,
                    key,
                    spaces: k.spaces.map(|s| s.into_iter().map(FileSpace::id).collect()),
                });
            }
        }
        if let Some(s) = f.max_body {
            self.max_body_bytes = size(src, "max_body", &s)?;
        }
        if let Some(s) = f.response_body_cap {
            self.response_body_cap = size(src, "response_body_cap", &s)?;
        }
        if let Some(s) = f.cache_size {
            self.cache_bytes = size(src, "cache_size", &s)?;
        }
        if let Some(e) = f.otlp_endpoint {
            self.otlp_endpoint = otlp_endpoint(src, "otlp_endpoint", &e)?;
        }
        if let Some(r) = f.otlp_sample_ratio {
            self.otlp_sample_ratio = sample_ratio(src, "otlp_sample_ratio", r)?;
        }
        if let Some(n) = f.metrics_label_values {
            if n == 0 {
                return Err(cfg_err(
                    src,
                    "`metrics_label_values`: 0 would fold every rule and endpoint into `other`; write e.g. 1000",
                ));
            }
            self.metrics_label_values = n;
        }
        if let Some(w) = f.watch {
            self.watch = w;
        }
        if let Some(l) = f.server {
            self.server.apply(l, src)?;
        }
        if let Some(q) = f.quick_repair {
            self.quick_repair = q;
        }
        if let Some(c) = f.commit_log {
            self.commit_log = c;
        }
        if let Some(s) = f.plugin_timeout {
            self.plugin_limits.timeout = duration(src, "plugin_timeout", &s)?;
        }
        if let Some(s) = f.plugin_memory {
            self.plugin_limits.memory_bytes = size(src, "plugin_memory", &s)?;
        }
        if let Some(s) = f.plugin_output_max {
            self.plugin_limits.output_bytes = size(src, "plugin_output_max", &s)?;
        }
        if let Some(s) = f.plugin_log_max {
            self.plugin_limits.log_bytes = size(src, "plugin_log_max", &s)?;
        }
        if let Some(n) = f.plugin_log_lines {
            self.plugin_limits.log_lines = n;
        }
        if let Some(s) = f.plugin_message_max {
            // Shorter than this, the cut's own note ("… (N bytes in all; cut
            // to M)") would be most of what is left of the message.
            const MIN: usize = 64;
            let n = size(src, "plugin_message_max", &s)?;
            if n < MIN {
                return Err(cfg_err(
                    src,
                    format!(
                        "`plugin_message_max`: {n} bytes would leave plugin errors unreadable; set at least {MIN} (the default is 4KiB)"
                    ),
                ));
            }
            self.plugin_limits.message_bytes = n;
        }
        // The most a rule's plugin entry may set as its own `timeout` and
        // `memory` (the plugin check refuses more, naming these keys).
        if let Some(s) = f.plugin_timeout_max {
            self.plugin_limits.timeout_max = duration(src, "plugin_timeout_max", &s)?;
        }
        if let Some(s) = f.plugin_memory_max {
            self.plugin_limits.memory_max = size(src, "plugin_memory_max", &s)?;
        }
        if let Some(s) = f.retention {
            self.retention = duration(src, "retention", &s)?;
        }
        if let Some(s) = f.retry_after_cap {
            self.retry_after_cap = duration(src, "retry_after_cap", &s)?;
        }
        if let Some(s) = f.shutdown_grace {
            self.shutdown_grace = duration(src, "shutdown_grace", &s)?;
        }
        if let Some(s) = f.record_linger {
            let d = duration(src, "record_linger", &s)?;
            if d > crate::outbox::MAX_LINGER {
                return Err(cfg_err(
                    src,
                    format!(
                        "`record_linger`: `{s}` is longer than {} ms: a record that waits longer holds back the retry it schedules and the live view; use 0ms to 1s",
                        crate::outbox::MAX_LINGER.as_millis()
                    ),
                ));
            }
            self.record_linger = d;
        }
        if let Some(b) = f.allow_http {
            self.outbound.allow_http = b;
        }
        if let Some(p) = f.http_ports {
            self.outbound.http_ports = p;
        }
        if let Some(cidrs) = f.allow_cidrs {
            self.outbound.allow_cidrs = parse_cidrs(src, &cidrs)?;
        }
        if let Some(n) = f.max_in_flight {
            self.max_in_flight = n.max(1);
        }
        if let Some(n) = f.max_in_flight_per_endpoint {
            self.max_in_flight_per_endpoint = n.max(1);
        }
        if let Some(p) = f.protection {
            if let Some(n) = p.failures {
                self.protection.failures = n.max(1);
            }
            if let Some(s) = p.block {
                self.protection.block = duration(src, "protection.block", &s)?;
            }
            if let Some(s) = p.max_block {
                self.protection.max_block = duration(src, "protection.max_block", &s)?;
            }
        }
        if let Some(s) = f.store {
            self.store = store_url(src, "store", &s)?;
        }
        if let Some(cl) = f.cluster {
            if let Some(id) = cl.node_id {
                self.cluster.node_id = Some(node_id(src, &id)?);
            }
            if let Some(s) = cl.lease {
                let lease = duration(src, "cluster.lease", &s)?;
                if lease < Duration::from_secs(1) {
                    return Err(cfg_err(
                        src,
                        format!(
                            "`cluster.lease`: {s} is too short; a node renews every third of it, use at least 1s"
                        ),
                    ));
                }
                self.cluster.lease = lease;
            }
            if let Some(n) = cl.pool_size {
                self.cluster.pool_size = n.max(2);
            }
        }
        Ok(())
    }

    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env("RULEHOOK_STORE") {
            self.store = store_url("environment", "RULEHOOK_STORE", &v)?;
        }
        if let Some(v) = env("RULEHOOK_OTLP_ENDPOINT") {
            self.otlp_endpoint = otlp_endpoint("environment", "RULEHOOK_OTLP_ENDPOINT", &v)?;
        }
        if let Some(v) = env("RULEHOOK_OTLP_SAMPLE_RATIO") {
            let r = v.trim().parse().map_err(|_| {
                cfg_err(
                    "environment",
                    format!("RULEHOOK_OTLP_SAMPLE_RATIO: `{v}` is not a number; write e.g. 0.1"),
                )
            })?;
            self.otlp_sample_ratio = sample_ratio("environment", "RULEHOOK_OTLP_SAMPLE_RATIO", r)?;
        }
        if let Some(v) = env("RULEHOOK_NODE_ID") {
            self.cluster.node_id = Some(node_id("environment", &v)?);
        }
        let src = "environment";
        if let Some(v) = env("RULEHOOK_LISTEN") {
            self.listen = v
                .parse()
                .map_err(|_| cfg_err(src, format!("RULEHOOK_LISTEN: `{v}` is not an address")))?;
        }
        if let Some(v) = env("RULEHOOK_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("RULEHOOK_RULES_DIR") {
            self.rules_dir = PathBuf::from(v);
        }
        if let Some(v) = env("RULEHOOK_PLUGINS_DIR") {
            self.plugins_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = env("RULEHOOK_PLUGIN_CACHE") {
            self.plugin_cache = Some(PathBuf::from(v));
        }
        if let Some(v) = env("RULEHOOK_ALLOW_HTTP") {
            self.outbound.allow_http = matches!(v.as_str(), "1" | "true" | "yes");
        }
        if let Some(v) = env("RULEHOOK_HTTP_PORTS") {
            self.outbound.http_ports = v
                .split(',')
                .map(|p| {
                    p.trim().parse().map_err(|_| {
                        cfg_err(src, format!("RULEHOOK_HTTP_PORTS: `{p}` is not a port"))
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = env("RULEHOOK_PROXY") {
            self.outbound.proxy = Some(v).filter(|v| !v.is_empty()).map(ProxyUrl);
        }
        if let Some(v) = env("RULEHOOK_NO_PROXY") {
            self.outbound.no_proxy = v.split(',').map(|s| s.trim().to_string()).collect();
        }
        if let Some(v) = env("RULEHOOK_ALLOW_CIDRS") {
            let list: Vec<String> = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            self.outbound.allow_cidrs = parse_cidrs(src, &list)?;
        }
        for (var, role) in [
            ("RULEHOOK_ADMIN_KEY", Role::Admin),
            ("RULEHOOK_INGEST_KEY", Role::Ingest),
        ] {
            if let Some(key) = env(var) {
                if key.len() < 16 {
                    return Err(cfg_err(
                        src,
                        format!("{var} is shorter than 16 characters; use a long random key"),
                    ));
                }
                self.api_keys.push(ApiKey {
                    name: var.to_lowercase(),
                    role,
                    key,
                    spaces: None,
                });
            }
        }
        Ok(())
    }
}

/// `store`: `redb` (or empty) for the embedded store, else a PostgreSQL
/// connection string.
fn store_url(src: &str, key: &str, text: &str) -> Result<Option<PgUrl>, ConfigError> {
    let t = text.trim();
    if t.is_empty() || t == "redb" {
        return Ok(None);
    }
    if !(t.starts_with("postgres://") || t.starts_with("postgresql://")) {
        return Err(cfg_err(
            src,
            format!(
                "`{key}`: expected `redb` or a postgres://… connection string, found `{}`",
                t.split(':').next().unwrap_or(t)
            ),
        ));
    }
    t.parse::<tokio_postgres::Config>().map_err(|e| {
        cfg_err(
            src,
            format!("`{key}`: not a valid PostgreSQL connection string: {e}"),
        )
    })?;
    Ok(Some(PgUrl(t.to_string())))
}

/// Node ids name claims and appear in `/v1/cluster`: short and printable.
fn node_id(src: &str, id: &str) -> Result<String, ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        return Err(cfg_err(
            src,
            format!("`cluster.node_id`: `{id}` must be 1 to 64 letters, digits, `-`, `_` or `.`"),
        ));
    }
    Ok(id.to_string())
}

/// The HTTP server's bounds on what clients can hold: connections, the
/// time to send a request, failed sign-ins. SECURITY.md says why each
/// default is what it is and what happens past it.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Connections open at once. Past it a new connection closes the
    /// oldest one that is not running a request (see `api::conns`).
    pub max_connections: usize,
    /// Time to send a request's headers, counted from when the server
    /// starts waiting for them: from the accept, or on a keep-alive
    /// connection from the end of the previous response (so it is the
    /// idle keep-alive timeout too).
    pub header_timeout: Duration,
    /// Time to send a whole request body, once its headers are in.
    pub body_timeout: Duration,
    /// Failed sign-ins (channel and console) allowed per client address
    /// (IPv6: per /64) in `sign_in_window`.
    pub sign_in_failures: u32,
    pub sign_in_window: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            sign_in_failures: 20,
            sign_in_window: Duration::from_secs(10),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServerLimits {
    max_connections: Option<usize>,
    header_timeout: Option<String>,
    body_timeout: Option<String>,
    sign_in_failures: Option<u32>,
    sign_in_window: Option<String>,
}

/// A shared space id as written: `1001` or `"1001"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum FileSpace {
    Number(u64),
    Text(String),
}

impl FileSpace {
    fn id(self) -> String {
        match self {
            FileSpace::Number(n) => n.to_string(),
            FileSpace::Text(s) => s,
        }
    }
}

impl ServerLimits {
    fn apply(&mut self, f: FileServerLimits, src: &str) -> Result<(), ConfigError> {
        let positive = |key: &str, d: Duration| {
            if d.is_zero() {
                Err(cfg_err(
                    src,
                    format!("`server.{key}` must be longer than 0s"),
                ))
            } else {
                Ok(d)
            }
        };
        if let Some(n) = f.max_connections {
            if n == 0 {
                return Err(cfg_err(src, "`server.max_connections` must be at least 1"));
            }
            self.max_connections = n;
        }
        if let Some(s) = f.header_timeout {
            let d = duration(src, "server.header_timeout", &s)?;
            self.header_timeout = positive("header_timeout", d)?;
        }
        if let Some(s) = f.body_timeout {
            let d = duration(src, "server.body_timeout", &s)?;
            self.body_timeout = positive("body_timeout", d)?;
        }
        if let Some(n) = f.sign_in_failures {
            self.sign_in_failures = n.max(1);
        }
        if let Some(s) = f.sign_in_window {
            let d = duration(src, "server.sign_in_window", &s)?;
            self.sign_in_window = positive("sign_in_window", d)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod server_limits_tests {
    use super::*;

    #[test]
    fn server_limits_load_and_mistakes_name_the_key() {
        let dir =
            std::env::temp_dir().join(format!("rulehook-config-server-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rulehook.yaml");
        std::fs::write(
            &file,
            "server: {max_connections: 500, header_timeout: 5s, body_timeout: 1m, sign_in_failures: 3, sign_in_window: 30s}\napi_keys:\n  - {name: bridge, role: websocket, key: bridge-secret-0123456789, spaces: [1001, team-a]}\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), &|_| None).unwrap();
        assert_eq!(c.server.max_connections, 500);
        assert_eq!(c.server.header_timeout, Duration::from_secs(5));
        assert_eq!(c.server.body_timeout, Duration::from_secs(60));
        assert_eq!(c.server.sign_in_failures, 3);
        assert_eq!(c.server.sign_in_window, Duration::from_secs(30));
        assert_eq!(
            c.api_keys[0].spaces.as_deref(),
            Some(&["1001".to_string(), "team-a".to_string()][..])
        );
        for (text, want) in [
            (
                "server: {max_conections: 5}\n",
                "unknown field `max_conections`",
            ),
            (
                "server: {max_connections: 0}\n",
                "`server.max_connections` must be at least 1",
            ),
            (
                "server: {header_timeout: soon}\n",
                "`server.header_timeout`: `soon` is not a duration",
            ),
            (
                "server: {body_timeout: 0s}\n",
                "`server.body_timeout` must be longer than 0s",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = Config::load(Some(&file), &|_| None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[cfg(test)]
mod record_linger_tests {
    use super::*;

    #[test]
    fn record_linger_defaults_loads_and_refuses_a_long_one() {
        let dir =
            std::env::temp_dir().join(format!("rulehook-config-linger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rulehook.yaml");
        std::fs::write(&file, "retention: 7d\n").unwrap();
        let c = Config::load(Some(&file), &|_| None).unwrap();
        assert_eq!(c.record_linger, Duration::from_millis(20));
        for (text, want) in [
            ("record_linger: 0ms\n", Ok(Duration::ZERO)),
            ("record_linger: 250ms\n", Ok(Duration::from_millis(250))),
            (
                "record_linger: 2s\n",
                Err("`record_linger`: `2s` is longer than 1000 ms"),
            ),
            (
                "record_linger: later\n",
                Err("`record_linger`: `later` is not a duration"),
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            match (Config::load(Some(&file), &|_| None), want) {
                (Ok(c), Ok(d)) => assert_eq!(c.record_linger, d, "{text}"),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{text}: {e}"),
                (got, want) => panic!(
                    "{text}: got {:?}, want {want:?}",
                    got.map(|c| c.record_linger)
                ),
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

fn parse_cidrs(src: &str, list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    cfg_err(
                        src,
                        format!("`allow_cidrs`: `{s}` is not a CIDR such as 10.0.0.0/8"),
                    )
                })
        })
        .collect()
}

impl Config {
    /// Where compiled plugins are cached: `plugin_cache`, else
    /// `data_dir/plugin-cache`.
    pub fn plugin_cache_dir(&self) -> PathBuf {
        self.plugin_cache
            .clone()
            .unwrap_or_else(|| self.data_dir.join("plugin-cache"))
    }
}

/// The compile cache of one-shot commands (`check`, `explain`, `plugin
/// run`), which have no data directory: `RULEHOOK_PLUGIN_CACHE`, else the
/// user's cache directory (`$XDG_CACHE_HOME` or `~/.cache`)
/// `/rulehook/plugin-cache`; none if neither is known.
pub fn user_plugin_cache() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("RULEHOOK_PLUGIN_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("rulehook").join("plugin-cache"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        let dir = std::env::temp_dir().join(format!("rulehook-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rulehook.yaml");
        std::fs::write(&file, "listen: 127.0.0.1:9999\ndata_dir: data\nallow_http: true\nhttp_ports: [8080]\nallow_cidrs: [127.0.0.0/8]\nretention: 2d\napi_keys:\n  - {name: ci, role: ingest, key: {env: CI_KEY}}\n").unwrap();
        let env = |k: &str| match k {
            "CI_KEY" => Some("0123456789abcdef-ci".to_string()),
            "RULEHOOK_LISTEN" => Some("127.0.0.1:7000".to_string()),
            _ => None,
        };
        let c = Config::load(Some(&file), &env).unwrap();
        assert_eq!(c.listen.port(), 7000, "environment beats the file");
        assert!(c.outbound.allow_http);
        assert_eq!(c.outbound.http_ports, [8080]);
        assert_eq!(c.retention, Duration::from_secs(2 * 86_400));
        assert_eq!(c.api_keys[0].role, Role::Ingest);
        assert_eq!(
            c.data_dir,
            dir.join("data"),
            "paths are relative to the file"
        );
        assert_eq!(c.plugin_cache_dir(), dir.join("data/plugin-cache"));
        let with_cache = |k: &str| match k {
            "CI_KEY" => Some("0123456789abcdef-ci".to_string()),
            "RULEHOOK_PLUGIN_CACHE" => Some("/var/cache/rulehook".to_string()),
            _ => None,
        };
        let c = Config::load(Some(&file), &with_cache).unwrap();
        assert_eq!(c.plugin_cache_dir(), PathBuf::from("/var/cache/rulehook"));
        let with_proxy = |k: &str| match k {
            "CI_KEY" => Some("0123456789abcdef-ci".to_string()),
            "RULEHOOK_PROXY" => Some("http://proxy.corp:3128".to_string()),
            "RULEHOOK_NO_PROXY" => Some("localhost, .corp".to_string()),
            _ => None,
        };
        let c = Config::load(Some(&file), &with_proxy).unwrap();
        assert_eq!(
            c.outbound.proxy,
            Some(ProxyUrl("http://proxy.corp:3128".into()))
        );
        let secret = ProxyUrl("http://hook:pa55word@proxy.corp:3128".into());
        assert_eq!(
            format!("{secret:?}"),
            "ProxyUrl(http://***@proxy.corp:3128)"
        );
        assert_eq!(c.outbound.no_proxy, ["localhost", ".corp"]);
        assert_eq!(c.otlp_endpoint, None, "traces are off by default");
        let with_otlp = |k: &str| match k {
            "CI_KEY" => Some("0123456789abcdef-ci".to_string()),
            "RULEHOOK_OTLP_ENDPOINT" => Some("http://127.0.0.1:4318".to_string()),
            _ => None,
        };
        let c = Config::load(Some(&file), &with_otlp).unwrap();
        assert_eq!(
            c.otlp_endpoint.as_ref().map(|u| u.as_str()),
            Some("http://127.0.0.1:4318/")
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn mistakes_name_the_key() {
        let dir = std::env::temp_dir().join(format!("rulehook-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.yaml");
        for (text, want) in [
            ("alow_http: true\n", "unknown field `alow_http`"),
            ("retention: soon\n", "`retention`: `soon` is not a duration"),
            (
                "allow_cidrs: [10.0.0.0/33]\n",
                "`allow_cidrs`: `10.0.0.0/33` is not a CIDR",
            ),
            (
                "api_keys: [{name: a, role: root, key: 0123456789abcdefg}]\n",
                "role `root` is unknown",
            ),
            (
                "proxy: socks5://proxy:1080\n",
                "`proxy`: the proxy must be an http:// URL",
            ),
            (
                "otlp_endpoint: 127.0.0.1:4318\n",
                "`otlp_endpoint`: `127.0.0.1:4318` is not an http(s) URL",
            ),
            (
                "otlp_sample_ratio: 2\n",
                "`otlp_sample_ratio`: 2 is not between 0 and 1",
            ),
            (
                "metrics_label_values: 0\n",
                "`metrics_label_values`: 0 would fold",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = Config::load(Some(&file), &|_| None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn plugin_limit_keys_are_read_and_bounded() {
        let dir = std::env::temp_dir().join(format!("rulehook-config-pl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rulehook.yaml");
        std::fs::write(&file, "plugin_log_lines: 20\nplugin_message_max: 1KiB\nplugin_timeout_max: 2s\nplugin_memory_max: 512MiB\n").unwrap();
        let c = Config::load(Some(&file), &|_| None).unwrap();
        assert_eq!(c.plugin_limits.timeout_max, Duration::from_secs(2));
        assert_eq!(c.plugin_limits.memory_max, 512 << 20);
        assert_eq!(c.plugin_limits.log_lines, 20);
        assert_eq!(c.plugin_limits.message_bytes, 1024);
        std::fs::write(&file, "plugin_message_max: \"10\"\n").unwrap();
        let err = Config::load(Some(&file), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`plugin_message_max`: 10 bytes would leave plugin errors unreadable; set at least 64"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
        // One grammar for the config's sizes and a rule entry's `memory:`.
        for (text, bytes) in [
            ("64MiB", Some(64 << 20)),
            ("512KiB", Some(512 << 10)),
            ("1GiB", Some(1 << 30)),
            ("3", Some(3)),
            ("4 B", Some(4)),
            ("7MB", Some(7 << 20)),
            ("x", None),
            ("", None),
            ("1TiB", None),
            ("99999999999999999999G", None),
        ] {
            assert_eq!(parse_size(text), bytes, "{text}");
        }
    }
}
