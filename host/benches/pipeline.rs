//! End-to-end benchmarks of the delivery pipeline with the real binary:
//!
//! - `throughput`: raw hyper POSTs/s on loopback, then durable ingest →
//!   signed POST deliveries/s through `rulehook serve`, in the same run.
//! - `latency`: ingest → first attempt latency (p50/p99) at half that load.
//! - `drain`: delivery alone: deliveries/s from a backlog in the store, and
//!   the CPU each delivery costs the server and the receiver.
//! - `backlog`: RSS with N pending deliveries while the receiver is down,
//!   and the time a restart takes to serve again with that backlog, after
//!   a clean stop and after kill -9 (`--no-quick-repair` to compare redb's
//!   full repair).
//!
//! - `cluster`: postgres mode against redb mode in the same run: end to
//!   end deliveries/s (one event per request, and NDJSON), without and
//!   with a synchronous standby; p99 ingest → first attempt at half load;
//!   CPU per delivery of the server and of the database servers.
//!
//! - `cost`: what a delivery costs the server (CPU, and the pwrite,
//!   fdatasync and socket write syscalls, counted with `perf`) at 100, 500
//!   and 2,000 events/s and at saturation, one event per request and NDJSON.
//!
//! - `telemetry`: end to end deliveries/s and server CPU per delivery with
//!   traces off, exported (10 % of events, then all) to a collector that
//!   answers and to one that never answers, in the same run; and what the
//!   metrics cost per attempt (in process, the handles an attempt uses);
//!   `spans` alone: what one delivery's spans cost the thread making them.
//!
//! `cargo bench -p rulehook --bench pipeline [-- throughput|latency|drain|backlog|cluster|cost|ordering|telemetry|spans] [--backlog N]`

#[path = "../../tests/support/postgres.rs"]
mod pg;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

const KEY: &str = "bench-admin-key-0123456789";

/// Counts requests; records when each event id first arrived.
struct Sink {
    count: AtomicU64,
    first_seen: Mutex<HashMap<String, Instant>>,
    track: bool,
    /// While false, requests wait before they are answered (for `drain`).
    open: tokio::sync::watch::Receiver<bool>,
}

impl Sink {
    fn new(track: bool) -> Arc<Sink> {
        Sink::gated(track, tokio::sync::watch::channel(true).1)
    }

    fn gated(track: bool, open: tokio::sync::watch::Receiver<bool>) -> Arc<Sink> {
        Arc::new(Sink {
            count: AtomicU64::new(0),
            first_seen: Mutex::new(HashMap::new()),
            track,
            open,
        })
    }
}

async fn receiver(sink: Arc<Sink>) -> SocketAddr {
    receiver_on(sink, 0).await
}

async fn receiver_on(sink: Arc<Sink>, port: u16) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let sink = sink.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let sink = sink.clone();
                    async move {
                        let _ = sink.open.clone().wait_for(|open| *open).await;
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        sink.count.fetch_add(1, Relaxed);
                        if sink.track
                            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
                            && let Some(id) = v["event_id"].as_str()
                        {
                            sink.first_seen
                                .lock()
                                .unwrap()
                                .entry(id.to_string())
                                .or_insert_with(Instant::now);
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn body_1k() -> Bytes {
    Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(1000)))
}

/// Bare hyper client → server POSTs for `secs`, with `conns` in parallel.
/// Returns (POSTs/s, µs of CPU per POST for client and server together).
async fn raw_throughput(conns: usize, secs: u64) -> (f64, f64) {
    let sink = Sink::new(false);
    let addr = receiver(sink.clone()).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = body_1k();
    let stop = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let client = client.clone();
            let body = body.clone();
            tokio::spawn(async move {
                while Instant::now() < stop {
                    let req = http::Request::post(format!("http://{addr}/raw"))
                        .body(Full::new(body.clone()))
                        .unwrap();
                    if let Ok(r) = client.request(req).await {
                        let _ = r.into_body().collect().await;
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    let cpu = cpu_secs(std::process::id());
    for t in tasks {
        let _ = t.await;
    }
    let posts = sink.count.load(Relaxed) as f64;
    let cpu_us = (cpu_secs(std::process::id()) - cpu) / posts * 1e6;
    (posts / start.elapsed().as_secs_f64(), cpu_us)
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(dir: &std::path::Path) -> (Server, Duration) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rulehook"))
        .args([
            "serve",
            "--config",
            dir.join("rulehook.yaml").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        // Quiet unless asked (RULEHOOK_LOG=rulehook::deliver=debug shows scans).
        .env(
            "RULEHOOK_LOG",
            std::env::var("RULEHOOK_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rulehook");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("address");
    (Server { child, addr }, started.elapsed())
}

/// Config lines for the store the next servers use (empty: embedded redb).
static STORE: Mutex<String> = Mutex::new(String::new());

/// More config lines for the next servers (the cost run's `record_linger`).
static EXTRA: Mutex<String> = Mutex::new(String::new());

/// The next servers' rule has `ordering: {key: entity}` (the `ordering`
/// run), and events name this many distinct entities (0: each event its
/// own entity).
static ORDERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static ENTITY_KEYS: AtomicU64 = AtomicU64::new(0);

fn setup(name: &str, url: &str, port: u16) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rulehook-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(
        dir.join("rules/bench.yaml"),
        format!(
            "rules:\n  - name: all-stories\n    events: [create]\n{}    webhook:\n      url: {url}\n      secret: bench-secret\n      retry: {{policy: fixed, interval: 60s, retries: 3}}\n",
            if ORDERED.load(Relaxed) { "    ordering: {key: entity}\n" } else { "" }
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("rulehook.yaml"),
        format!("rules_dir: rules\ndata_dir: data\nallow_http: true\nhttp_ports: [{port}]\nallow_cidrs: [127.0.0.0/8]\nmax_body: 8MiB\napi_keys:\n  - {{name: a, role: admin, key: {KEY}}}\n{}{}", STORE.lock().unwrap(), EXTRA.lock().unwrap()),
    )
    .unwrap();
    dir
}

fn event(id: &str) -> String {
    // With `ENTITY_KEYS` set, events name that many entities in turn.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let keys = ENTITY_KEYS.load(Relaxed);
    let entity = if keys == 0 {
        id.to_string()
    } else {
        format!("s{}", NEXT.fetch_add(1, Relaxed) % keys)
    };
    format!(
        "{{\"id\":\"{id}\",\"event_type\":\"create\",\"entity_type\":\"story\",\"scope\":{{\"workspace_id\":1002}},\"entity\":{{\"id\":\"{entity}\",\"name\":\"A story\",\"description\":\"{}\"}}}}",
        "d".repeat(600)
    )
}

async fn post(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    body: String,
    ndjson: bool,
) -> u16 {
    let req = http::Request::post(format!("http://{addr}/v1/events"))
        .header("Authorization", format!("Bearer {KEY}"))
        .header(
            "Content-Type",
            if ndjson {
                "application/x-ndjson"
            } else {
                "application/json"
            },
        )
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    match client.request(req).await {
        Ok(r) => {
            let s = r.status().as_u16();
            let _ = r.into_body().collect().await;
            s
        }
        Err(_) => 0,
    }
}

/// Posts events (`batch` per request) from `conns` connections for `secs`;
/// returns (accepted/s, delivered/s, server CPU µs per delivery).
async fn e2e_throughput(conns: usize, secs: u64, batch: usize) -> (f64, f64, f64) {
    // Event ids unique across runs: in postgres mode the runs share a
    // database, and an id seen by an earlier run is a duplicate (a 202
    // with no new delivery), which this count would wait for in vain.
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Relaxed);
    let sink = Sink::new(false);
    let rx = receiver(sink.clone()).await;
    let dir = setup("e2e", &format!("http://{rx}/hook"), rx.port());
    let (server, _) = start_server(&dir);
    let addr = server.addr;
    let db_before: f64 = DB_PIDS
        .lock()
        .unwrap()
        .iter()
        .map(|&p| tree_cpu_secs(p))
        .sum();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let accepted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let stop = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let client = client.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < stop {
                    let body: String = (0..batch)
                        .map(|k| event(&format!("r{run}-c{c}-{i}-{k}")) + "\n")
                        .collect();
                    if post(&client, addr, body, batch > 1).await == 202 {
                        accepted.fetch_add(batch as u64, Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let ingest_secs = start.elapsed().as_secs_f64();
    let total = accepted.load(Relaxed);
    // Deliveries keep going after ingest stops; measure until all arrived.
    let deadline = Instant::now() + Duration::from_secs(120);
    while sink.count.load(Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered = sink.count.load(Relaxed);
    let all_secs = start.elapsed().as_secs_f64();
    let cpu_us = cpu_secs(server.child.id()) / delivered.max(1) as f64 * 1e6;
    let db_after: f64 = DB_PIDS
        .lock()
        .unwrap()
        .iter()
        .map(|&p| tree_cpu_secs(p))
        .sum();
    *DB_CPU_US.lock().unwrap() = (db_after - db_before).max(0.0) / delivered.max(1) as f64 * 1e6;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    (
        total as f64 / ingest_secs,
        delivered as f64 / all_secs,
        cpu_us,
    )
}

/// Posts at `rate` events/s for `secs`; returns ingest→first-attempt latencies.
async fn latency(rate: f64, secs: u64) -> Vec<Duration> {
    let sink = Sink::new(true);
    let rx = receiver(sink.clone()).await;
    let dir = setup("latency", &format!("http://{rx}/hook"), rx.port());
    let (server, _) = start_server(&dir);
    let addr = server.addr;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let n = (rate * secs as f64) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let client = client.clone();
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("lat-{i}");
            sent.lock().unwrap().insert(id.clone(), Instant::now());
            post(&client, addr, event(&id), false).await
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.count.load(Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    let sent = sent.lock().unwrap();
    let seen = sink.first_seen.lock().unwrap();
    let mut lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, t)| seen.get(id).map(|s| s.saturating_duration_since(*t)))
        .collect();
    lat.sort();
    lat
}

/// The postmasters of the database servers the current run uses, and
/// their CPU seconds as the last `e2e_throughput` left them.
static DB_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Database CPU µs per delivery of the last `e2e_throughput`.
static DB_CPU_US: Mutex<f64> = Mutex::new(0.0);

/// CPU seconds of a process and every process it started: its own, its
/// reaped children's (cutime, cstime) and its live children's.
fn tree_cpu_secs(pid: u32) -> f64 {
    let fields = |p: u32| -> Vec<String> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let rest = stat.rsplit(')').next().unwrap_or_default();
        rest.split_whitespace().map(String::from).collect()
    };
    let ticks = |f: &[String], idx: &[usize]| -> f64 {
        idx.iter()
            .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
            .sum()
    };
    let me = fields(pid);
    let mut total = ticks(&me, &[11, 12, 13, 14]);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let f = fields(child);
        if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            total += ticks(&f, &[11, 12]);
        }
    }
    total / 100.0
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    stat_cpu_secs(&format!("/proc/{pid}/stat"))
}

/// User + system CPU seconds from a `/proc/…/stat` file (a process's or
/// one of its threads').
fn stat_cpu_secs(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// Delivery alone: `n` events are accepted while the receiver holds its
/// answers, so all but the first few wait in the store; then it answers,
/// and the backlog drains. Returns (deliveries/s, server CPU seconds per
/// 1,000 deliveries, bench CPU seconds per 1,000 deliveries).
async fn drain(n: usize) -> (f64, f64, f64) {
    let (open_tx, open_rx) = tokio::sync::watch::channel(false);
    let sink = Sink::gated(false, open_rx);
    let rx = receiver(sink.clone()).await;
    let dir = setup("drain", &format!("http://{rx}/hook"), rx.port());
    let (server, _) = start_server(&dir);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let batch = 500;
    for b in 0..n.div_ceil(batch) {
        let body: String = (0..batch)
            .map(|k| event(&format!("drain-{b}-{k}")) + "\n")
            .collect();
        assert_eq!(post(&client, server.addr, body, true).await, 202);
    }
    let me = std::process::id();
    let (server_cpu, bench_cpu) = (cpu_secs(server.child.id()), cpu_secs(me));
    let start = Instant::now();
    open_tx.send(true).unwrap();
    let total = (n.div_ceil(batch) * batch) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while sink.count.load(Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let delivered = sink.count.load(Relaxed) as f64;
    let per_k = |cpu: f64| cpu / delivered * 1000.0;
    let result = (
        delivered / secs,
        per_k(cpu_secs(server.child.id()) - server_cpu),
        per_k(cpu_secs(me) - bench_cpu),
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn backlog(n: usize, quick_repair: bool) {
    // A port with nothing listening: every delivery stays pending.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = setup("backlog", &format!("http://127.0.0.1:{dead}/down"), dead);
    {
        use std::io::Write as _;
        let mut config = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("rulehook.yaml"))
            .unwrap();
        if !quick_repair {
            writeln!(config, "quick_repair: false").unwrap();
        }
    }
    println!(
        "backlog: quick repair {}",
        if quick_repair { "on" } else { "off" }
    );
    let (server, _) = start_server(&dir);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let batch = 2000;
    let conns = 4;
    let per_conn = n / batch / conns;
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let client = client.clone();
            let addr = server.addr;
            tokio::spawn(async move {
                for b in 0..per_conn {
                    let body: String = (0..batch)
                        .map(|k| event(&format!("bl-{c}-{b}-{k}")) + "\n")
                        .collect();
                    assert_eq!(post(&client, addr, body, true).await, 202, "backlog ingest");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let total = per_conn * batch * conns;
    println!(
        "backlog: ingested {total} events in {:.1} s ({:.0}/s)",
        started.elapsed().as_secs_f64(),
        total as f64 / started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_kib(server.child.id());
    println!(
        "backlog: RSS with {total} pending deliveries (receiver down): {:.0} MiB",
        rss as f64 / 1024.0
    );
    let data = dir.join("data/rulehook.redb");
    println!(
        "backlog: database file {:.0} MiB",
        std::fs::metadata(&data).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0
    );
    let _ = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    let mut server = server;
    let _ = server.child.wait();
    // Restart: time until it answers /healthz and accepts an event.
    let t0 = Instant::now();
    let (server, listening) = start_server(&dir);
    let mut ok = false;
    while t0.elapsed() < Duration::from_secs(30) {
        if post(&client, server.addr, event("after-restart"), false).await == 202 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(ok, "serving again after restart");
    println!(
        "backlog: restart with {total} pending: listening after {:.0} ms, first event accepted after {:.0} ms",
        listening.as_secs_f64() * 1000.0,
        t0.elapsed().as_secs_f64() * 1000.0
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "backlog: RSS 2 s after the restart: {:.0} MiB",
        rss_kib(server.child.id()) as f64 / 1024.0
    );

    // A crash: kill -9 leaves the file as the last commit left it, not
    // cleanly closed. The receiver comes up on the port that was dead, so
    // the restart also shows when the backlog starts moving again.
    let mut server = server;
    let _ = server.child.kill();
    let _ = server.child.wait();
    drop(server);
    let sink = Sink::new(false);
    receiver_on(sink.clone(), dead).await;
    let t0 = Instant::now();
    let (server, listening) = start_server(&dir);
    let mut accepted = None;
    let mut delivered = None;
    while t0.elapsed() < Duration::from_secs(60) && (accepted.is_none() || delivered.is_none()) {
        if accepted.is_none() && post(&client, server.addr, event("after-kill"), false).await == 202
        {
            accepted = Some(t0.elapsed());
            // The dead endpoint was blocked by its failures, which parked the
            // backlog: unblock it, as an operator would once it is back.
            let req = http::Request::post(format!("http://{}/v1/endpoints/unblock", server.addr))
                .header("Authorization", format!("Bearer {KEY}"))
                .body(Full::new(Bytes::from(format!(
                    "{{\"endpoint\":\"http://127.0.0.1:{dead}\"}}"
                ))))
                .unwrap();
            let _ = client.request(req).await;
        }
        if delivered.is_none() && sink.count.load(Relaxed) > 0 {
            delivered = Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ms = |d: Option<Duration>| {
        d.map_or("not within 60 s".to_string(), |d| {
            format!("{:.0} ms", d.as_secs_f64() * 1000.0)
        })
    };
    println!(
        "backlog: restart after kill -9 with {total} pending: listening after {:.0} ms, first event accepted after {}, first delivery (endpoint unblocked at once) after {}",
        listening.as_secs_f64() * 1000.0,
        ms(accepted),
        ms(delivered)
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

// The server's allocator, so the in-process costs (`spans`, the metrics)
// are what they cost in the server: with glibc's malloc the exporter
// thread freeing spans made on this thread contends for its arena's lock.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let want = |m: &str| {
        !args.iter().any(|a| {
            [
                "throughput",
                "latency",
                "backlog",
                "drain",
                "cluster",
                "cost",
                "cost-pg",
                "ordering",
                "telemetry",
                "spans",
            ]
            .contains(&a.as_str())
        }) || args.iter().any(|a| a == m)
    };
    let backlog_n: usize = args
        .iter()
        .position(|a| a == "--backlog")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut e2e_rate = 0.0;
        if want("throughput") || want("latency") {
            let (raw, raw_cpu) = raw_throughput(64, 5).await;
            println!("throughput: raw hyper POST (1 KiB, keep-alive, 64 connections): {raw:.0}/s; CPU {raw_cpu:.1} µs per POST, client and server");
            let (accepted, delivered, cpu) = e2e_throughput(64, 10, 1).await;
            println!("throughput: single-event ingest, 64 connections: accepted {accepted:.0}/s, delivered {delivered:.0}/s = {:.0} % of raw; server CPU {cpu:.1} µs per delivery", delivered / raw * 100.0);
            let (accepted_b, delivered_b, cpu_b) = e2e_throughput(8, 10, 50).await;
            println!("throughput: NDJSON batches of 50, 8 connections: accepted {accepted_b:.0}/s, delivered {delivered_b:.0}/s = {:.0} % of raw; server CPU {cpu_b:.1} µs per delivery", delivered_b / raw * 100.0);
            e2e_rate = delivered;
        }
        if want("latency") {
            // RULEHOOK_LATENCY_RATE sets the rate (events/s) instead of half
            // the measured saturation, to see what a low rate's commit
            // window adds.
            let rate = std::env::var("RULEHOOK_LATENCY_RATE")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or((e2e_rate / 2.0).max(100.0));
            let lat = latency(rate, 10).await;
            let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
            println!("latency: ingest → first attempt at {rate:.0} events/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} events)", pct(0.5), pct(0.99), pct(1.0), lat.len());
        }
        if want("drain") {
            let (rate, server_ms, bench_ms) = drain(200_000).await;
            println!("drain: delivery alone from a backlog of 200,000: {rate:.0} deliveries/s; CPU per delivery: server {:.1} µs, receiver {:.1} µs", server_ms * 1000.0, bench_ms * 1000.0);
        }
        if want("backlog") {
            backlog(backlog_n, !args.iter().any(|a| a == "--no-quick-repair")).await;
        }
        if args.iter().any(|a| a == "cluster") {
            cluster().await;
        }
        if args.iter().any(|a| a == "cost") {
            cost().await;
        }
        if args.iter().any(|a| a == "cost-pg") {
            cost_pg().await;
        }
        if args.iter().any(|a| a == "ordering") {
            ordering().await;
        }
        if args.iter().any(|a| a == "telemetry") {
            telemetry().await;
        } else if args.iter().any(|a| a == "spans") {
            let collector = receiver(Sink::new(false)).await;
            spans(collector).await;
        }
    });
}

/// Throughput with `ordering: {key: entity}` on 10,000 distinct entities
/// against the same rule without it, in one run: off and on alternate
/// twice per ingest shape, so drift in the machine hits both alike.
async fn ordering() {
    ENTITY_KEYS.store(10_000, Relaxed);
    for (name, conns, batch) in [
        ("single events, 64 connections", 64, 1),
        ("NDJSON batches of 50, 8 connections", 8, 50),
    ] {
        let mut off = Vec::new();
        let mut on = Vec::new();
        for round in 0..2 {
            ORDERED.store(false, Relaxed);
            let (_, d_off, cpu_off) = e2e_throughput(conns, 10, batch).await;
            ORDERED.store(true, Relaxed);
            let (_, d_on, cpu_on) = e2e_throughput(conns, 10, batch).await;
            println!(
                "ordering: {name}, round {}: off {d_off:.0}/s ({cpu_off:.1} µs CPU per delivery), on {d_on:.0}/s ({cpu_on:.1} µs) = {:.0} %",
                round + 1,
                d_on / d_off * 100.0
            );
            off.push(d_off);
            on.push(d_on);
        }
        let (off, on) = (off.iter().sum::<f64>() / 2.0, on.iter().sum::<f64>() / 2.0);
        println!(
            "ordering: {name}: mean off {off:.0}/s, on {on:.0}/s = {:.0} % (target ≥ 80 %)",
            on / off * 100.0
        );
    }
    ORDERED.store(false, Relaxed);
    ENTITY_KEYS.store(0, Relaxed);
}

/// The syscalls `cost` counts, with perf's syscall tracepoints (counted in
/// the kernel: no ptrace, which would slow every call it counts).
const COUNTED_SYSCALLS: [&str; 6] = [
    "pwrite64",
    "fdatasync",
    "fsync",
    "write",
    "writev",
    "sendto",
];

/// Counted beside the syscalls: how often a server thread went to sleep
/// (or was preempted). At a low rate each wake-up is a large part of what
/// a delivery costs on this virtual machine.
const SWITCHES: &str = "sched_switch";

/// `perf stat` on `pid`, counting [`COUNTED_SYSCALLS`] until stopped.
struct SyscallCount(Child);

impl SyscallCount {
    fn start(pid: u32) -> Option<SyscallCount> {
        let mut events: Vec<String> = COUNTED_SYSCALLS
            .iter()
            .map(|s| format!("syscalls:sys_enter_{s}"))
            .collect();
        events.push(format!("sched:{SWITCHES}"));
        Command::new("perf")
            .args([
                "stat",
                "-x",
                ",",
                "-e",
                &events.join(","),
                "-p",
                &pid.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()
            .map(SyscallCount)
    }

    /// Stops counting; the count per syscall name.
    fn stop(mut self) -> HashMap<String, u64> {
        // perf prints its counts when interrupted.
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let mut text = String::new();
        if let Some(mut err) = self.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
        }
        let _ = self.0.wait();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let event = f.get(2)?;
                let name = event
                    .strip_prefix("syscalls:sys_enter_")
                    .or_else(|| event.strip_prefix("sched:"))?;
                Some((name.to_string(), f.first()?.trim().parse().ok()?))
            })
            .collect()
    }
}

/// Per server thread, by name (tokio's workers summed): voluntary and
/// involuntary context switches and CPU seconds, from `/proc/PID/task`.
/// Threads that end between two readings are missed, which the cost run's
/// threads (started before the row) do not.
fn threads(pid: u32) -> BTreeMap<String, (u64, u64, f64)> {
    let mut by = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let cpu = stat_cpu_secs(&dir.join("stat").to_string_lossy());
        let e = by.entry(name.trim().to_string()).or_insert((0, 0, 0.0));
        e.0 += field("voluntary_ctxt_switches:");
        e.1 += field("nonvoluntary_ctxt_switches:");
        e.2 += cpu;
    }
    by
}

/// What a delivery costs the server at a fixed rate (`None`: as fast as
/// 64 connections, or 8 with NDJSON, can post): CPU from /proc and the
/// syscalls that write (the store's pwrite/fdatasync, the sockets'
/// write/sendto), per delivery, over a 10 s run and its tail.
async fn cost_run(rate: Option<f64>, batch: usize) -> (f64, f64, f64, HashMap<String, u64>) {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Relaxed);
    let sink = Sink::new(false);
    let rx = receiver(sink.clone()).await;
    let dir = setup("cost", &format!("http://{rx}/hook"), rx.port());
    let (server, _) = start_server(&dir);
    let addr = server.addr;
    let pid = server.child.id();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let accepted = Arc::new(AtomicU64::new(0));
    let body = move |i: u64| -> String {
        (0..batch)
            .map(|k| event(&format!("cost{run}-{i}-{k}")) + "\n")
            .collect()
    };
    let secs = 10.0;
    let cpu_before = cpu_secs(pid);
    let threads_before = threads(pid);
    let counter = SyscallCount::start(pid);
    let start = Instant::now();
    match rate {
        Some(rate) => {
            // Paced: a request every 1/(rate/batch) s, each on its own task
            // so a slow answer does not slow the pace.
            let requests = (rate * secs / batch as f64) as u64;
            let every = Duration::from_secs_f64(batch as f64 / rate);
            let mut tick = tokio::time::interval(every);
            let mut tasks = Vec::new();
            for i in 0..requests {
                tick.tick().await;
                let (client, accepted, body) = (client.clone(), accepted.clone(), body(i));
                tasks.push(tokio::spawn(async move {
                    if post(&client, addr, body, batch > 1).await == 202 {
                        accepted.fetch_add(batch as u64, Relaxed);
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        None => {
            let conns = if batch > 1 { 8 } else { 64 };
            let stop = start + Duration::from_secs_f64(secs);
            let next = Arc::new(AtomicU64::new(0));
            let tasks: Vec<_> = (0..conns)
                .map(|_| {
                    let (client, accepted, next) = (client.clone(), accepted.clone(), next.clone());
                    tokio::spawn(async move {
                        while Instant::now() < stop {
                            let i = next.fetch_add(1, Relaxed);
                            if post(&client, addr, body(i), batch > 1).await == 202 {
                                accepted.fetch_add(batch as u64, Relaxed);
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    let total = accepted.load(Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.count.load(Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let calls = counter.map(SyscallCount::stop).unwrap_or_default();
    let delivered = sink.count.load(Relaxed).max(1);
    let cpu_us = (cpu_secs(pid) - cpu_before) / delivered as f64 * 1e6;
    // Where the switches and the CPU are, thread by thread.
    let per_thread: Vec<String> = threads(pid)
        .into_iter()
        .filter_map(|(name, (v, n, c))| {
            let (v0, n0, c0) = threads_before.get(&name).copied().unwrap_or_default();
            let d = delivered as f64;
            let (v, n, c) = (v.saturating_sub(v0), n.saturating_sub(n0), c - c0);
            (v + n > 0).then(|| {
                format!(
                    "{name}: {:.2}+{:.2} switches, {:.0} µs",
                    v as f64 / d,
                    n as f64 / d,
                    c / d * 1e6
                )
            })
        })
        .collect();
    println!(
        "cost:   threads, per delivery (voluntary+involuntary switches, CPU): {}",
        per_thread.join("; ")
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    (delivered as f64 / elapsed, cpu_us, delivered as f64, calls)
}

/// The cost table: CPU and syscalls per delivery at 100, 500 and 2,000
/// events/s and at saturation, one event per request and NDJSON ×50.
async fn cost() {
    println!(
        "cost: per delivery, server process; rate = events/s offered (saturation: closed loop); syscalls counted with perf tracepoints"
    );
    println!(
        "cost: | posting | offered | commit_log | delivered/s | CPU µs | {} | {SWITCHES} |",
        COUNTED_SYSCALLS.join(" | ")
    );
    // Each row twice, side by side: a durable redb commit per batch
    // (commit_log: false, as before the log existed) and the commit log.
    for batch in [1, 50] {
        for rate in [Some(100.0), Some(500.0), Some(2_000.0), None] {
            for log in ["false", "true"] {
                // RULEHOOK_COST_ROWS picks rows: a comma list of prefixes
                // of `batch/rate/commit_log`, such as `1/500,1/saturation/true`.
                let key = format!(
                    "{batch}/{}/{log}",
                    rate.map_or("saturation".to_string(), |r| format!("{r:.0}"))
                );
                if let Ok(rows) = std::env::var("RULEHOOK_COST_ROWS")
                    && !rows.split(',').any(|p| key.starts_with(p.trim()))
                {
                    continue;
                }
                // RULEHOOK_BENCH_CONFIG adds config lines to every row (such
                // as `quick_repair: false`, to see what its second sync costs).
                let more = std::env::var("RULEHOOK_BENCH_CONFIG").unwrap_or_default();
                *EXTRA.lock().unwrap() = format!("commit_log: {log}\n{more}\n");
                let (got, cpu, n, calls) = cost_run(rate, batch).await;
                let per: Vec<String> = COUNTED_SYSCALLS
                    .iter()
                    .chain([&SWITCHES])
                    .map(|s| format!("{:.2}", *calls.get(*s).unwrap_or(&0) as f64 / n))
                    .collect();
                println!(
                    "cost: | {} | {} | {log} | {got:.0} | {cpu:.1} | {} |",
                    if batch == 1 {
                        "one per request"
                    } else {
                        "NDJSON ×50"
                    },
                    rate.map_or("saturation".to_string(), |r| format!("{r:.0}/s")),
                    per.join(" | ")
                );
            }
        }
    }
    EXTRA.lock().unwrap().clear();
}

/// The cost table for postgres mode: per delivery, the server's and the
/// database's CPU, the statements the server ran, the transactions it
/// committed and the WAL they wrote, and the statements that wrote most;
/// from `pg_stat_statements` (calls, WAL bytes per statement) and
/// `pg_current_wal_lsn()` before and after each row. One PostgreSQL server,
/// no standby (a standby replays the same WAL), a fresh database per row.
async fn cost_pg() {
    let primary = pg::PgServer::start("bench-cost-pg");
    primary.configure(&[
        "shared_preload_libraries = 'pg_stat_statements'",
        "pg_stat_statements.track = all",
    ]);
    primary.stop();
    primary.start_again();
    primary.sql("CREATE EXTENSION pg_stat_statements");
    *DB_PIDS.lock().unwrap() = vec![postmaster(&primary)];
    println!("cost-pg: per delivery; postgres mode, one PostgreSQL server, fsync on");
    println!(
        "cost-pg: | posting | offered | delivered/s | server CPU µs | database CPU µs | statements | commits | WAL bytes |"
    );
    let mut phase = 0;
    for batch in [1, 50] {
        for rate in [Some(500.0), None] {
            phase += 1;
            fresh_database(&primary, Some("costpg"), &format!("r{phase}"));
            let db = format!("costpg_r{phase}");
            primary.sql("SELECT pg_stat_statements_reset()");
            let lsn = primary.sql("SELECT pg_current_wal_lsn()");
            let db_before: f64 = tree_cpu_secs(postmaster(&primary));
            let (got, cpu, n, _) = cost_run(rate, batch).await;
            let db_cpu = (tree_cpu_secs(postmaster(&primary)) - db_before) / n * 1e6;
            let wal: f64 = primary
                .sql(&format!(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn}')"
                ))
                .parse()
                .unwrap_or(0.0);
            let of_db = format!("dbid = (SELECT oid FROM pg_database WHERE datname = '{db}')");
            let totals = primary.sql(&format!(
                "SELECT coalesce(sum(calls), 0), coalesce(sum(calls) FILTER (WHERE query ILIKE 'COMMIT%'), 0) FROM pg_stat_statements WHERE {of_db}"
            ));
            let mut t = totals
                .split('|')
                .map(|v| v.trim().parse::<f64>().unwrap_or(0.0));
            let (statements, commits) = (t.next().unwrap_or(0.0), t.next().unwrap_or(0.0));
            let posting = if batch == 1 {
                "one per request"
            } else {
                "NDJSON ×50"
            };
            let offered = rate.map_or("saturation".to_string(), |r| format!("{r:.0}/s"));
            println!(
                "cost-pg: | {posting} | {offered} | {got:.0} | {cpu:.1} | {db_cpu:.1} | {:.2} | {:.3} | {:.0} |",
                statements / n,
                commits / n,
                wal / n
            );
            // Where the database's time, WAL and statements go, most time first.
            let top = primary.sql(&format!(
                "SELECT calls, wal_bytes, total_exec_time * 1000, regexp_replace(left(query, 110), '\\s+', ' ', 'g') FROM pg_stat_statements WHERE {of_db} AND (wal_bytes > 0 OR calls > {}) ORDER BY total_exec_time DESC LIMIT 8",
                (n / 20.0) as u64
            ));
            for line in top.lines() {
                let f: Vec<&str> = line.splitn(4, '|').collect();
                if let [calls, wal, micros, query] = f[..] {
                    let per = |v: &str| v.trim().parse::<f64>().unwrap_or(0.0) / n;
                    println!(
                        "cost-pg:     {:>6.3} calls, {:>7.0} WAL bytes, {:>6.1} µs executing per delivery: {}",
                        per(calls),
                        per(wal),
                        per(micros),
                        query.trim()
                    );
                }
            }
        }
    }
    STORE.lock().unwrap().clear();
    DB_PIDS.lock().unwrap().clear();
}

/// The postmaster's pid of a test server.
fn postmaster(server: &pg::PgServer) -> u32 {
    std::fs::read_to_string(server.data.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
        .expect("postmaster.pid")
}

/// Points the servers the next run starts at a new database `{db}_{phase}`
/// (postgres mode), after a checkpoint and a pause, so that each run starts
/// from a quiet server: without them a run paid for the vacuum, checkpoint
/// and standby replay of the run before it, and one-per-request figures
/// with a standby moved from 1,557 to 3,618/s between runs.
fn fresh_database(primary: &pg::PgServer, db: Option<&str>, phase: &str) {
    let Some(db) = db else { return };
    primary.sql("CHECKPOINT");
    std::thread::sleep(Duration::from_secs(3));
    let url = primary.create_db(&format!("{db}_{phase}"));
    *STORE.lock().unwrap() =
        format!("store: \"{url}\"\ncluster: {{node_id: bench, pool_size: 8}}\n");
}

/// Postgres mode beside redb mode, same run: one event per request and
/// NDJSON, without and with a synchronous standby; then the latency at
/// half of the standby setup's rate; then a projection for N nodes.
async fn cluster() {
    let primary = pg::PgServer::start("bench-primary");
    let standby = pg::PgServer::standby_of(&primary, "bench-standby");
    let mut rows = Vec::new();
    for (label, store, sync) in [
        ("redb", None, false),
        ("postgres", Some("p1"), false),
        ("postgres + sync standby", Some("p2"), true),
    ] {
        match store {
            None => {
                STORE.lock().unwrap().clear();
                DB_PIDS.lock().unwrap().clear();
            }
            Some(_) => {
                if sync {
                    primary.require_sync_standbys(1, &[&standby]);
                }
                let mut pids = vec![postmaster(&primary)];
                if sync {
                    pids.push(postmaster(&standby));
                }
                *DB_PIDS.lock().unwrap() = pids;
            }
        }
        let (acc1, del1, cpu1) = {
            fresh_database(&primary, store, "single");
            e2e_throughput(64, 10, 1).await
        };
        let db1 = *DB_CPU_US.lock().unwrap();
        let (acc2, del2, cpu2) = {
            fresh_database(&primary, store, "ndjson");
            e2e_throughput(8, 10, 50).await
        };
        let db2 = *DB_CPU_US.lock().unwrap();
        println!(
            "cluster: {label}: single events: accepted {acc1:.0}/s, delivered {del1:.0}/s, server CPU {cpu1:.1} µs/delivery, database CPU {db1:.1} µs/delivery"
        );
        println!(
            "cluster: {label}: NDJSON x50: accepted {acc2:.0}/s, delivered {del2:.0}/s, server CPU {cpu2:.1} µs/delivery, database CPU {db2:.1} µs/delivery"
        );
        rows.push((label, del1, del2, cpu1, db1));
    }
    let redb = rows[0].1;
    let (_, pg_rate, _, pg_cpu, pg_db) = rows[2];
    println!(
        "cluster: postgres + sync standby end to end = {:.0} % of redb mode (single events)",
        pg_rate / redb.max(1.0) * 100.0
    );
    let rate = (pg_rate / 2.0).max(100.0);
    fresh_database(&primary, Some("p2"), "latency");
    let logged = (primary.log().len(), standby.log().len());
    let lat = latency(rate, 10).await;
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    println!(
        "cluster: postgres + sync standby latency at {rate:.0} events/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} events)",
        pct(0.5),
        pct(0.99),
        pct(1.0),
        lat.len()
    );
    // What the servers did meanwhile that stalls commits: checkpoints on
    // the primary, restartpoints on the standby (PostgreSQL 15 logs both).
    for (who, server, from) in [
        ("primary", &primary, logged.0),
        ("standby", &standby, logged.1),
    ] {
        let log = server.log();
        for line in log.get(from..).unwrap_or_default().lines() {
            if line.contains("checkpoint") || line.contains("restartpoint") {
                println!("cluster: {who} during the latency run: {line}");
            }
        }
    }
    // What N nodes sustain: each node spends `pg_cpu` µs per delivery, the
    // database `pg_db` µs (primary and standby together); a database host
    // with C cores saturates at C / pg_db deliveries per µs.
    for (nodes, db_cores) in [(3, 8.0), (6, 16.0), (12, 32.0)] {
        let node_cap = nodes as f64 * 2.0 / (pg_cpu * 1e-6);
        let db_cap = db_cores / (pg_db.max(0.1) * 1e-6);
        println!(
            "cluster: projection: {nodes} nodes of 2 cores on a {db_cores:.0}-core database: ~{:.0} deliveries/s (nodes allow {node_cap:.0}, database {db_cap:.0})",
            node_cap.min(db_cap)
        );
    }
}

/// What the spans of one delivery cost the thread that makes them (an
/// event with one matching rule and one attempt, the server's span sites
/// and tracer), exporting to `collector`, at each sampling ratio.
async fn spans(collector: SocketAddr) {
    // The spans of one delivery (an event with one matching rule and one
    // attempt, as the server makes them), in this process, with the
    // server's tracer exporting to `collector`.
    let url = url::Url::parse(&format!("http://{collector}")).unwrap();
    let telemetry = rulehook::telemetry::init(Some(&url), 1.0).unwrap();
    let n = 50_000;
    for ratio in [0.0, 0.1, 1.0] {
        rulehook::telemetry::set_sample_ratio(ratio);
        let started = Instant::now();
        for i in 0..n {
            one_deliverys_spans(&format!("evt-{i}"));
        }
        let us = started.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!(
            "telemetry: the spans of one delivery, sampled at {ratio}: {us:.2} µs (this thread; the export thread's work not included)"
        );
    }
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
}

/// The span sites of one delivery, the server's (`ingest`, `deliver`).
fn one_deliverys_spans(event_id: &str) {
    use opentelemetry::KeyValue;
    use rulehook::telemetry::{Span, child, root};
    let ingest = root(Some(event_id), "ingest", || [KeyValue::new("events", 1)]);
    ingest.in_scope(|| {
        Span::current().record("event.id", || event_id.to_string());
        let _event = child("event", || {
            [
                KeyValue::new("event.id", event_id.to_string()),
                KeyValue::new("event.type", "create"),
                KeyValue::new("entity.type", "story"),
            ]
        })
        .entered();
        child("match", || []).in_scope(|| ());
        let _plugins = child("plugins", || {
            [
                KeyValue::new("rule", "all-stories"),
                KeyValue::new("delivery.id", "dlv_0123456789abcdef"),
            ]
        })
        .entered();
    });
    drop(ingest.child("commit", || [KeyValue::new("ops", 1)]));
    let attempt = root(Some(event_id), "attempt", || {
        [
            KeyValue::new("event.id", event_id.to_string()),
            KeyValue::new("delivery.id", "dlv_0123456789abcdef"),
            KeyValue::new("rule", "all-stories"),
            KeyValue::new("endpoint", "http://127.0.0.1:9000"),
            KeyValue::new("attempt", 1),
        ]
    });
    attempt.in_scope(|| {
        child("sign", || []).in_scope(|| ());
        child("send", || [KeyValue::new("http.request.method", "POST")]).in_scope(|| ());
        let span = Span::current();
        span.record("http.response.status_code", || 200);
        span.record("outcome", || "succeeded");
    });
    drop(attempt.child("record", || []));
}

/// Traces off, on (a collector that answers), on (one that never
/// answers: every export waits for its timeout while spans queue and are
/// dropped), in the same run: the server's CPU per delivery at a fixed
/// 2,000 events/s (the machine's other load moves saturation figures
/// more than tracing does), then saturation (64 connections, 10 s): "off"
/// and "10 %" three times each, compared on their means, and the
/// collector answering or not, each row with its threads' CPU; then the
/// metrics' own cost.
async fn telemetry() {
    let collector = Sink::new(false);
    let answering = receiver(collector.clone()).await;
    // Listening but never accepting: the kernel completes the handshakes
    // and buffers the requests, and no answer ever comes.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = hole.local_addr().unwrap();
    let off = String::new();
    let on = |at: SocketAddr, ratio: &str| {
        format!("otlp_endpoint: http://{at}\notlp_sample_ratio: {ratio}\n")
    };
    for (name, extra) in [
        ("traces off", off.clone()),
        (
            "traces on, 10 % of events (the default)",
            on(answering, "0.1"),
        ),
        ("traces on, every event", on(answering, "1")),
        ("traces off, again", off.clone()),
    ] {
        *EXTRA.lock().unwrap() = extra;
        let before = collector.count.load(Relaxed);
        let (rate, cpu, _, _) = cost_run(Some(2_000.0), 1).await;
        let exports = collector.count.load(Relaxed) - before;
        println!(
            "telemetry: {name}, 2,000 events/s: delivered {rate:.0}/s; server CPU {cpu:.1} µs per delivery; {exports} OTLP requests"
        );
    }
    // Saturation moves with the machine's other load by more than tracing
    // costs, so "off" and "10 %" run three times each, in the order
    // off-on-on-off-off-on (a steady drift of the machine's speed then
    // weighs on both alike), and are compared on their means. Each row also
    // prints its threads' CPU: the exporter's (`OpenTelemetry.T`, the batch
    // processor) apart from the workers'.
    async fn saturation(name: &str, extra: String) -> f64 {
        *EXTRA.lock().unwrap() = extra;
        let (delivered, cpu, _, _) = cost_run(None, 1).await;
        println!(
            "telemetry: saturation, {name}: delivered {delivered:.0}/s; server CPU {cpu:.1} µs per delivery"
        );
        cpu
    }
    let (mut off_cpu, mut on_cpu) = (0.0, 0.0);
    for traced in [false, true, true, false, false, true] {
        if traced {
            on_cpu += saturation("10 %, collector answering", on(answering, "0.1")).await / 3.0;
        } else {
            off_cpu += saturation("traces off", off.clone()).await / 3.0;
        }
    }
    println!(
        "telemetry: saturation, mean of 3: off {off_cpu:.1} µs, 10 % answering {on_cpu:.1} µs per delivery ({:+.1} %)",
        (on_cpu / off_cpu - 1.0) * 100.0
    );
    for (name, extra) in [
        ("10 %, collector never answering", on(silent, "0.1")),
        ("every event, collector answering", on(answering, "1")),
        ("every event, collector never answering", on(silent, "1")),
    ] {
        saturation(name, extra).await;
    }
    EXTRA.lock().unwrap().clear();
    drop(hole);
    spans(answering).await;
    // The handles one attempt touches: the pair's lookup, its attempt
    // counter and latency histogram, its delivery counter.
    let m = rulehook::metrics::Metrics::default();
    let endpoints: Vec<String> = (0..100).map(|i| format!("http://10.0.0.{i}:443")).collect();
    let n = 2_000_000;
    let started = Instant::now();
    for i in 0..n {
        let s = m.series("rule", &endpoints[i % endpoints.len()]);
        s.attempt(
            rulehook::metrics::Answer::Status(200),
            true,
            Duration::from_micros(300),
        );
        s.delivery(rulehook::metrics::Outcome::Succeeded);
    }
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!(
        "telemetry: metrics per attempt (lookup, attempt counter, histogram, delivery counter; 100 endpoints): {ns:.0} ns"
    );
}
