//! Cluster mode, seen from one node: which store it opens, its id, and the
//! heartbeat that keeps it a member (ARCHITECTURE.md, "Cluster mode").
//!
//! Every node is equal and stateless: the database holds the events,
//! deliveries, endpoint states and rule versions. What a node holds is
//! only its claims on the deliveries it is sending. Every third of a lease
//! its heartbeat renews them, records the node as alive (with its version
//! and the digest of its rule set), and reads back the endpoint states the
//! other nodes wrote, so a block or a 410 seen by one node holds for all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::config::Config;
use crate::deliver::Shared;
use crate::store::postgres::{PgOptions, Postgres};
use crate::store::{Claim, NodeInfo, Store, StoreError, now_ms};

/// A claim is sent under only while this much of its lease is left, so an
/// attempt never starts on a lease about to run out.
const LEASE_MARGIN_MS: u64 = 1_000;

/// This node as a member of the cluster.
pub struct Node {
    pub id: String,
    pub lease: Duration,
    started_at: u64,
    /// Where this node's API listens, as the others are told.
    addr: RwLock<String>,
    /// When the last renewal that covered every delivery held here started.
    renewed_at: AtomicU64,
    /// The nodes the store listed at the last heartbeat.
    nodes: RwLock<Vec<NodeInfo>>,
    /// The rule-set digests that differed at the last heartbeat, so the
    /// warning is logged when that changes, not every heartbeat.
    disagreement: RwLock<Vec<String>>,
}

impl Node {
    pub fn new(id: String, lease: Duration) -> Node {
        Node {
            id,
            lease,
            started_at: now_ms(),
            addr: RwLock::new(String::new()),
            renewed_at: AtomicU64::new(0),
            nodes: RwLock::new(Vec::new()),
            disagreement: RwLock::new(Vec::new()),
        }
    }

    pub fn set_addr(&self, addr: String) {
        *self.addr.write().unwrap_or_else(|e| e.into_inner()) = addr;
    }

    /// Whether this node may still start an attempt under `claim`: the
    /// claim, or the last renewal since, leaves more than the margin of
    /// its lease. When it does not, another node may have the delivery by
    /// now; this one leaves it.
    pub fn holds(&self, claim: &Claim, now: u64) -> bool {
        let lease = self.lease.as_millis() as u64;
        // A renewal only covers what was held when it started, which
        // includes this claim only if it was made before.
        let renewed = self.renewed_at.load(Ordering::Relaxed);
        let from = if renewed > claim.at {
            renewed
        } else {
            claim.at
        };
        now + LEASE_MARGIN_MS < from + lease
    }

    /// The nodes seen at the last heartbeat (this one included).
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How long a node may stay silent before it counts as gone.
    pub fn dead_after(&self) -> Duration {
        self.lease
    }
}

/// This node's id: the configured one, else host name and process id
/// (unique per process, so a restarted node never inherits old claims).
pub fn node_id(config: &Config) -> String {
    if let Some(id) = &config.cluster.node_id {
        return id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(40)
        .collect();
    let host = if host.is_empty() { "node".into() } else { host };
    format!("{host}-{}", std::process::id())
}

/// Opens the configured store: the embedded file in `data_dir`, or the
/// PostgreSQL database (cluster mode) with `node` as the owner of this
/// process's claims. Blocking.
pub fn open_store(config: &Config, node: &str) -> Result<Store, StoreError> {
    match &config.store {
        None => Store::open_with(
            &config.data_dir.join("rulehook.redb"),
            crate::store::RedbOptions {
                cache_bytes: config.cache_bytes,
                quick_repair: config.quick_repair,
                commit_log: config.commit_log,
            },
        ),
        Some(url) => Ok(Store::new(Postgres::connect(
            &url.0,
            PgOptions {
                node: node.to_string(),
                lease: config.cluster.lease,
                pool_size: config.cluster.pool_size,
                ..PgOptions::default()
            },
        )?)),
    }
}

/// The digest of a rule set: its rule versions, sorted, hashed (16 hex
/// digits). Nodes running the same rule files have the same digest.
pub fn rules_digest<'a>(versions: impl IntoIterator<Item = &'a str>) -> String {
    let mut v: Vec<&str> = versions.into_iter().collect();
    v.sort_unstable();
    let mut h = Sha256::new();
    for x in v {
        h.update(x.as_bytes());
        h.update(b"\n");
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The heartbeat, until the task is aborted: renews this node's claims,
/// records it as alive, reads the members and the endpoint states back.
pub async fn run(shared: Arc<Shared>, node: Arc<Node>) {
    let every = (node.lease / 3).max(Duration::from_millis(300));
    loop {
        beat(&shared, &node).await;
        tokio::time::sleep(every).await;
    }
}

/// Records this node's WebSocket spaces at once (a client connected), so
/// deliveries of the space are routed here before the next heartbeat.
pub async fn announce(shared: &Shared) {
    if let Some(node) = &shared.cluster {
        beat(shared, node).await;
    }
}

async fn beat(shared: &Shared, node: &Node) {
    let started = now_ms();
    let held: Vec<_> = shared
        .active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect();
    let digest = {
        let rules = shared.rules.load();
        rules_digest(rules.targets.values().map(|t| t.version.0.as_str()))
    };
    let me = NodeInfo {
        id: node.id.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        rules_digest: digest.clone(),
        addr: node.addr.read().unwrap_or_else(|e| e.into_inner()).clone(),
        started_at: node.started_at,
        heartbeat_at: started,
        spaces: shared
            .channel
            .spaces()
            .into_iter()
            .filter(|(_, clients)| *clients > 0)
            .map(|(space, _)| space)
            .collect(),
    };
    let store = shared.store.clone();
    let result = tokio::task::spawn_blocking(move || {
        let renewed = store.renew(&held);
        let members = store.heartbeat(&me);
        let endpoints = store.endpoints();
        (renewed, members, endpoints)
    })
    .await;
    let Ok((renewed, members, endpoints)) = result else {
        return;
    };
    match renewed {
        Ok(()) => node.renewed_at.store(started, Ordering::Relaxed),
        Err(e) => {
            tracing::warn!(error = %e, "could not renew this node's claims; deliveries whose lease runs out are left to other nodes")
        }
    }
    match members {
        Ok(list) => {
            let alive_since = started.saturating_sub(node.dead_after().as_millis() as u64);
            let alive: Vec<&NodeInfo> = list
                .iter()
                .filter(|n| n.heartbeat_at >= alive_since)
                .collect();
            let mut digests: Vec<String> = alive.iter().map(|n| n.rules_digest.clone()).collect();
            digests.sort();
            digests.dedup();
            let m = &shared.metrics;
            m.cluster(alive.len() as u64, digests.len() as u64);
            let mut last = node.disagreement.write().unwrap_or_else(|e| e.into_inner());
            if digests.len() > 1 && *last != digests {
                let others: Vec<String> = alive
                    .iter()
                    .filter(|n| n.rules_digest != digest)
                    .map(|n| format!("{} ({})", n.id, n.rules_digest))
                    .collect();
                tracing::warn!(
                    node = %node.id,
                    rules = %digest,
                    others = %others.join(", "),
                    "nodes of this cluster run different rule sets; deliveries depend on which node accepts an event until they agree"
                );
            }
            *last = if digests.len() > 1 {
                digests
            } else {
                Vec::new()
            };
            *node.nodes.write().unwrap_or_else(|e| e.into_inner()) = list;
        }
        Err(e) => tracing::warn!(error = %e, "cluster heartbeat failed"),
    }
    if let Ok(stored) = endpoints {
        merge_endpoints(
            &mut shared.endpoints.lock().unwrap_or_else(|e| e.into_inner()),
            stored,
        );
    }
}

/// Takes the stored endpoint states that are newer than this node's: a
/// block, an unblock or a 410 another node recorded.
fn merge_endpoints(
    local: &mut HashMap<String, crate::store::Endpoint>,
    stored: Vec<crate::store::Endpoint>,
) {
    for ep in stored {
        match local.get(&ep.endpoint) {
            Some(mine) if mine.updated_at >= ep.updated_at => {}
            _ => {
                local.insert(ep.endpoint.clone(), ep);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Endpoint;

    #[test]
    fn a_claim_is_held_while_its_lease_or_a_later_renewal_leaves_a_margin() {
        let node = Node::new("a".into(), Duration::from_secs(10));
        let claim = Claim {
            epoch: 1,
            at: 100_000,
        };
        // (renewed at, now, held)
        let cases = [
            (0, 100_000, true),
            (0, 108_999, true),
            (0, 109_000, false),
            (0, 111_000, false),
            // A renewal after the claim extends it…
            (105_000, 111_000, true),
            (105_000, 114_000, false),
            // …one before it does not.
            (99_000, 109_500, false),
        ];
        for (renewed, now, held) in cases {
            node.renewed_at.store(renewed, Ordering::Relaxed);
            assert_eq!(node.holds(&claim, now), held, "renewed {renewed} now {now}");
        }
    }

    #[test]
    fn the_newer_endpoint_state_wins() {
        let ep = |name: &str, at: u64, disabled: bool| Endpoint {
            endpoint: name.into(),
            disabled,
            updated_at: at,
            ..Default::default()
        };
        let mut local: HashMap<String, Endpoint> = [
            ("a".to_string(), ep("a", 10, false)),
            ("b".to_string(), ep("b", 30, false)),
        ]
        .into();
        merge_endpoints(
            &mut local,
            vec![ep("a", 20, true), ep("b", 20, true), ep("c", 5, true)],
        );
        assert!(local["a"].disabled, "newer stored state taken");
        assert!(!local["b"].disabled, "older stored state ignored");
        assert!(local["c"].disabled, "unknown endpoint learned");
    }

    #[test]
    fn rule_set_digests_ignore_order() {
        assert_eq!(rules_digest(["b", "a"]), rules_digest(["a", "b"]));
        assert_ne!(rules_digest(["a"]), rules_digest(["a", "b"]));
        assert_eq!(rules_digest(["a"]).len(), 16);
    }
}
