//! `rulehook serve`: wires the stages together and runs them until told to
//! stop. The entry point is [`run`], which takes a bound listener so tests
//! can use port 0 and learn the address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::conns::Connections;
use crate::api::{Api, Client};
use crate::config::{ApiKey, Config, Role};
use crate::deliver::{self, Shared};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::reload::{self, Loader, Snapshot};
use crate::store::{Op, Store};
use crate::targets::Targets;

/// The API keys file written when the config names none, so a fresh
/// install is never open: `data/api-keys.json`, readable by the owner only.
pub fn keys_file(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("api-keys.json")
}

/// Reads the generated keys, creating them on first use.
pub fn generated_keys(data_dir: &Path) -> anyhow::Result<Vec<ApiKey>> {
    let path = keys_file(data_dir);
    if !path.exists() {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let key = |prefix: &str| {
            let bytes: [u8; 24] = rand::random();
            format!(
                "{prefix}_{}",
                bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )
        };
        let doc = serde_json::json!({"admin": key("rh_admin"), "ingest": key("rh_ingest")});
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(&tmp, &path)?;
    }
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("reading {}", path.display()))?;
    let get = |k: &str| {
        doc[k]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("{} has no `{k}` key", path.display()))
    };
    Ok(vec![
        ApiKey {
            name: "generated admin".into(),
            role: Role::Admin,
            key: get("admin")?,
            spaces: None,
        },
        ApiKey {
            name: "generated ingest".into(),
            role: Role::Ingest,
            key: get("ingest")?,
            spaces: None,
        },
    ])
}

/// Runs the server on `listener` until `shutdown` resolves, then stops
/// gracefully: no new requests, in-flight attempts get the grace period,
/// everything else stays pending in the store for the next start.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let runtime = crate::plugins::Runtime::new(
        config.plugin_limits.clone(),
        Some(config.plugin_cache_dir()),
    )
    .map_err(anyhow::Error::msg)?;
    let metrics = Arc::new(Metrics::new(config.metrics_label_values));
    // A configured plugins directory that does not exist yet is created, so
    // the watcher covers it from the start and the first plugin copied in
    // is picked up without a restart.
    if let Some(dir) = &config.plugins_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the plugins directory {}", dir.display()))?;
    }
    let loader = Arc::new(Loader::new(
        runtime,
        config.rules_dir.clone(),
        config.plugins_dir.clone(),
        metrics.clone(),
    ));
    // The store first: the rule versions the loaded rules bind deliveries
    // to are made durable before the first event is matched.
    let node_id = crate::cluster::node_id(&config);
    let store = {
        let (config, node_id) = (config.clone(), node_id.clone());
        tokio::task::spawn_blocking(move || crate::cluster::open_store(&config, &node_id)).await??
    };
    let store = Arc::new(store);
    let (outbox, writer) = Outbox::start_with_linger(store.clone(), config.record_linger);
    metrics.bind_commit_ops(outbox.stats.batch_ops.clone());
    let started = {
        let loader = loader.clone();
        tokio::task::spawn_blocking(move || loader.load(None)).await?
    };
    let (snapshot, diagnostics) = started.map_err(|diagnostics| {
        let text: Vec<String> = diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(|d| d.to_string())
            .collect();
        anyhow::anyhow!(
            "the rules in {} have errors; fix them (see `rulehook check`):\n{}",
            config.rules_dir.display(),
            text.join("\n")
        )
    })?;
    for d in &diagnostics {
        tracing::warn!(at = %d.location(), warning = %d.message, "rule file warning");
    }
    let targets = Arc::new(Targets::open(
        &store,
        outbox.clone(),
        &config.rules_dir,
        snapshot.targets.values(),
    )?);
    {
        let (targets, running) = (targets.clone(), snapshot.targets.clone());
        tokio::task::spawn_blocking(move || targets.publish(running.values()))
            .await?
            .context("storing the rule versions")?;
    }
    loader.bind_targets(targets.clone());
    loader.started(&snapshot, diagnostics);
    let rules = Arc::new(ArcSwap::from_pointee(snapshot));
    // Edits to rule and plugin files apply on their own; SIGHUP and
    // `POST /v1/rules/reload` ask for the same reload.
    let _watcher = match config
        .watch
        .then(|| reload::watch(loader.clone(), rules.clone()))
        .transpose()
    {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "rule files are not watched; reload with SIGHUP or POST /v1/rules/reload");
            None
        }
    };
    let hangups = tokio::spawn(reload_on_sighup(loader.clone(), rules.clone()));

    let endpoints: HashMap<String, crate::store::Endpoint> = store
        .endpoints()?
        .into_iter()
        .map(|e| (e.endpoint.clone(), e))
        .collect();
    let keys = if config.api_keys.is_empty() {
        generated_keys(&config.data_dir)?
    } else {
        config.api_keys.clone()
    };

    let sender =
        deliver::client::Sender::new(config.outbound.clone()).map_err(anyhow::Error::msg)?;
    let shared = Arc::new(Shared {
        store: store.clone(),
        outbox: outbox.clone(),
        rules: rules.clone(),
        targets,
        sender,
        config: config.clone(),
        metrics: metrics.clone(),
        active: Mutex::new(Default::default()),
        endpoints: Mutex::new(endpoints),
        channel: Default::default(),
        kick: Default::default(),
        cluster: config.store.as_ref().map(|_| {
            let node = crate::cluster::Node::new(node_id.clone(), config.cluster.lease);
            node.set_addr(
                listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            );
            Arc::new(node)
        }),
        releasing: Default::default(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Cluster mode: a heartbeat renews this node's claims, and other
    // nodes' redeliveries and unparks wake its dispatcher.
    let heartbeat = shared.cluster.clone().map(|node| {
        store.watch(shared.kick.clone());
        // It runs until the dispatcher is done: attempts finishing within
        // the shutdown grace still need their leases renewed.
        tokio::spawn(crate::cluster::run(shared.clone(), node))
    });
    let (queue, dispatcher) = deliver::start(shared.clone(), stop_rx.clone());
    let retention = tokio::spawn(retention_loop(
        outbox.clone(),
        (store.clone(), shared.targets.clone()),
        config.retention,
        stop_rx.clone(),
    ));
    // Connections are told to finish when serving stops (see below); the
    // console's live tails watch the same signal.
    let (close_conns, conns_closing) = watch::channel(false);
    let connections = Connections::new(connection_cap(&config));
    let api = Arc::new(Api {
        ingest: Ingest {
            rules: rules.clone(),
            outbox: outbox.clone(),
            queue: queue.clone(),
            metrics,
        },
        shared: shared.clone(),
        queue,
        keys,
        loader: loader.clone(),
        console: crate::api::Console::new(conns_closing.clone()),
        sign_ins: crate::api::sign_ins::SignIns::new(
            config.server.sign_in_failures,
            config.server.sign_in_window,
        ),
        connections: connections.clone(),
    });

    // Connections are told to finish when serving stops, and are kept in a
    // set so the stop can wait for them within the grace and then cut the
    // rest. (hyper-util's GracefulShutdown cannot watch connections that
    // allow upgrades, which the WebSocket channel needs.)
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    // Announced only now, with the rules loaded and the store open: a
    // caller that waits for this line (an operator, a test, a supervisor)
    // finds a server that answers with the configured rules.
    println!(
        "rulehook listening on http://{} (rules: {}, data: {}{})",
        listener.local_addr()?,
        config.rules_dir.display(),
        config.data_dir.display(),
        if config.api_keys.is_empty() {
            format!(", API keys: {}", keys_file(&config.data_dir).display())
        } else {
            String::new()
        }
    );
    {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connections, so the set holds live ones only.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Every slot is serving a request: this connection is
                // closed unanswered (see `api::conns` for why not queued).
                let Some(slot) = connections.admit() else {
                    drop(stream);
                    continue;
                };
                let slot = Arc::new(slot);
                let _ = stream.set_nodelay(true);
                let api = api.clone();
                let client = Client { peer, slot: Some(slot.clone()) };
                let service = service_fn(move |req| api.clone().serve(req, client.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    // Runs from when hyper starts waiting for a request's
                    // head, so it bounds idle keep-alive connections too.
                    .header_read_timeout(config.server.header_timeout)
                    .serve_connection(TokioIo::new(stream), service)
                    // For the WebSocket channel's upgrade.
                    .with_upgrades();
                let mut closing = conns_closing.clone();
                conns.spawn(crate::api::conns::absorb_self_wakes(async move {
                    let mut conn = std::pin::pin!(conn);
                    let ended = tokio::select! {
                        ended = conn.as_mut() => ended,
                        // Waiting or reading the longest at the cap: cut
                        // (no request of it has been read, so none is lost).
                        _ = slot.closed_for_room() => return,
                        _ = async { closing.wait_for(|c| *c).await.map(|_| ()) } => {
                            // Finish the request in progress, take no more.
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }));
            }
        }
    }
    // The stop. Everything below is bounded by one grace from the signal,
    // plus the few milliseconds it takes to commit what was already sent
    // to the outbox: receivers, clients and plugins cannot stretch it.
    let grace = config.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: no new requests or attempts; finishing those in flight"
    );
    drop(listener);
    // At once, not after the connections: no attempt starts from now on.
    let _ = stop_tx.send(true);
    let _ = close_conns.send(true);
    shared.channel.close_all();
    // Requests in progress (an ingest waiting for its commit) finish within
    // the grace; connections still open then are cut.
    let _ = tokio::time::timeout_at(deadline, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if !conns.is_empty() {
        tracing::warn!(
            connections = conns.len(),
            "shutdown grace over: closing connections still open"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    // The dispatcher keeps to the same grace (it saw the stop at the same
    // moment) and cuts what is left.
    let _ = dispatcher.await;
    if let Some(h) = heartbeat {
        h.abort();
    }
    let _ = retention.await;
    hangups.abort();
    // Commit what was sent and stop the writer, whoever still holds a handle.
    outbox.close().await;
    drop(api);
    drop(shared);
    drop(outbox);
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Reloads rules and plugins on each SIGHUP, the daemon convention.
async fn reload_on_sighup(loader: Arc<Loader>, rules: Arc<ArcSwap<Snapshot>>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let (loader, rules) = (loader.clone(), rules.clone());
            let _ = tokio::task::spawn_blocking(move || loader.reload(&rules, "signal")).await;
        }
    }
    #[cfg(not(unix))]
    let _ = (loader, rules);
}

/// Compacts old final deliveries now and then; events with pending
/// deliveries are kept however old.
async fn retention_loop(
    outbox: Outbox,
    (store, targets): (Arc<Store>, Arc<Targets>),
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = Duration::from_secs(3600)
        .min(retention / 4)
        .max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let before = crate::store::now_ms().saturating_sub(retention.as_millis() as u64);
        // In steps of 1,000 events, each its own commit, so ingest never
        // waits long behind a compaction.
        let mut after = None;
        let mut removed = 0;
        // A stop ends a long compaction between two steps.
        while !*stop.borrow() {
            let op = Op::Compact {
                before_ms: before,
                after,
                limit: 1000,
            };
            match outbox.write(vec![op]).await.map(|mut d| d.pop()) {
                Ok(Some(crate::store::Done::Compacted { removed: n, resume })) => {
                    removed += n;
                    match resume {
                        Some(key) => after = Some(key),
                        None => break,
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "retention compaction failed");
                    break;
                }
            }
        }
        if removed > 0 {
            tracing::info!(events = removed, "removed events past the retention period");
        }
        // Rule versions no delivery can use any more go after the events.
        let (store, targets) = (store.clone(), targets.clone());
        match tokio::task::spawn_blocking(move || targets.drop_unused(&store, retention)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                versions = n,
                "removed rule versions retired past the retention period"
            ),
            Ok(Err(e)) => tracing::error!(error = %e, "removing retired rule versions failed"),
            Err(_) => {}
        }
    }
}

/// File descriptors kept free of client connections: the store, plugin
/// files, the listener, and outbound connections beyond `max_in_flight`.
const FD_RESERVE: u64 = 256;

/// The connection cap to run with: `server.max_connections`, lowered (with
/// a warning) to what the process's file-descriptor limit leaves after
/// outbound attempts and `FD_RESERVE`, so clients can never take the
/// descriptors the store and deliveries need.
fn connection_cap(config: &Config) -> usize {
    let wanted = config.server.max_connections;
    let Some(fds) = raise_fd_limit() else {
        return wanted;
    };
    let others = FD_RESERVE + config.max_in_flight as u64;
    let room = fds.saturating_sub(others).max(16) as usize;
    if room < wanted {
        tracing::warn!(
            max_connections = wanted,
            file_limit = fds,
            using = room,
            "the open-file limit (RLIMIT_NOFILE) leaves room for fewer connections than server.max_connections; raise the limit (ulimit -n, LimitNOFILE=) or lower the setting"
        );
        return room;
    }
    wanted
}

/// Raises the soft open-file limit to the hard one and returns it. The
/// soft limit's usual 1024 is a leftover for `select(2)` users; servers on
/// epoll raise it at start (Go's runtime, nginx's `worker_rlimit_nofile`,
/// systemd's own advice for `LimitNOFILE`). `None` if it cannot be read.
fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: as above; a refusal leaves the limit as it was.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        // `rlim_t` is u64 on Linux but not on every unix.
        #[allow(clippy::unnecessary_cast)]
        Some(lim.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    None
}

/// Binds the configured address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr}; is another rulehook running? change `listen` or --listen")
    })
}
