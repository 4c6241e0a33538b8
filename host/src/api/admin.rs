//! The operator's routes: rules (`GET /v1/rules`, reload, test
//! connection), endpoints (list, unblock) and `/metrics`.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::{Api, Resp, error, json_response};
use crate::store::{Done, Op};

impl Api {
    /// `POST /v1/rules/{name}/test`: what `rulehook test-connection` does,
    /// from the server (its network, its proxy, its running rules).
    pub(super) async fn test_connection(&self, name: &str) -> Resp {
        let rules = self.ingest.rules.load_full();
        let Some(rule) = rules.get(name) else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no rule `{name}` in the running set; see GET /v1/rules"),
                None,
            );
        };
        let cap = self.shared.config.response_body_cap;
        let tested = match crate::deliver::test_connection(&self.shared.sender, rule, cap).await {
            Ok(t) => t,
            Err(why) => {
                return error(StatusCode::UNPROCESSABLE_ENTITY, "not_testable", why, None);
            }
        };
        let mut out = json!({
            "rule": name,
            "method": tested.method,
            "url": tested.url.as_str(),
            "duration_ms": tested.duration.as_millis() as u64,
        });
        match tested.result {
            Ok(r) => {
                out["ok"] = json!((200..300).contains(&r.status));
                out["status"] = json!(r.status);
                out["reason"] = json!(r.reason);
                out["headers"] = json!(r.headers);
                out["body"] = json!(String::from_utf8_lossy(&r.body));
                out["truncated"] = json!(r.truncated);
            }
            Err(e) => {
                out["ok"] = json!(false);
                out["error"] = json!(e.to_string());
            }
        }
        json_response(StatusCode::OK, &out)
    }

    /// Reloads now and answers with the outcome: 200 when the new set
    /// runs, 422 with every diagnostic when the old one keeps running.
    pub(super) async fn reload(&self) -> Resp {
        let loader = self.loader.clone();
        let running = self.ingest.rules.clone();
        match tokio::task::spawn_blocking(move || loader.reload(&running, "api")).await {
            Ok(report) => {
                let status = if report.ok {
                    StatusCode::OK
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                };
                json_response(status, &super::with_times(json!({ "reload": report })))
            }
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
                None,
            ),
        }
    }

    pub(super) fn rules(&self) -> Resp {
        let rules = self.ingest.rules.load();
        let list: Vec<Value> = rules
            .rules()
            .iter()
            .map(|r| {
                json!({
                    "name": r.name, "at": r.origin.to_string(), "active": r.active,
                    "events": r.events, "entity_types": r.entity_types,
                    "url": r.webhook.url.as_ref().map(|u| u.to_string()),
                    "plugins": r.plugins.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let plugins: Vec<Value> = rules
            .plugins
            .list()
            .into_iter()
            .map(|(name, source, sha256)| json!({"name": name, "source": source, "sha256": sha256}))
            .collect();
        json_response(
            StatusCode::OK,
            &super::with_times(
                json!({"rules": list, "plugins": plugins, "last_reload": self.loader.report()}),
            ),
        )
    }

    /// `GET /v1/cluster`: the nodes sharing this store, with their
    /// heartbeat, version and rule-set digest. In embedded mode, this node.
    pub(super) async fn cluster(&self) -> Resp {
        let now = crate::store::now_ms();
        let digest = {
            let rules = self.shared.rules.load();
            crate::cluster::rules_digest(rules.targets.values().map(|t| t.version.0.as_str()))
        };
        let (me, nodes, dead_after) = match &self.shared.cluster {
            Some(node) => (
                node.id.clone(),
                node.nodes(),
                node.dead_after().as_millis() as u64,
            ),
            None => (
                "local".to_string(),
                vec![crate::store::NodeInfo {
                    id: "local".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    rules_digest: digest.clone(),
                    addr: String::new(),
                    started_at: 0,
                    heartbeat_at: now,
                    spaces: self
                        .shared
                        .channel
                        .spaces()
                        .into_iter()
                        .filter(|(_, n)| *n > 0)
                        .map(|(s, _)| s)
                        .collect(),
                }],
                u64::MAX,
            ),
        };
        let alive = |n: &crate::store::NodeInfo| now.saturating_sub(n.heartbeat_at) <= dead_after;
        let mut sets: Vec<&str> = nodes
            .iter()
            .filter(|n| alive(n))
            .map(|n| n.rules_digest.as_str())
            .collect();
        sets.sort_unstable();
        sets.dedup();
        let listed: Vec<Value> = nodes
            .iter()
            .map(|n| {
                let mut v = json!(n);
                v["alive"] = json!(alive(n));
                v["heartbeat_age_ms"] = json!(now.saturating_sub(n.heartbeat_at));
                v["this"] = json!(n.id == me);
                v
            })
            .collect();
        json_response(
            StatusCode::OK,
            &json!({
                "store": self.shared.store.kind(),
                "node": me,
                "rules_digest": digest,
                "rule_sets": sets.len(),
                "warning": (sets.len() > 1).then_some(
                    "live nodes run different rule sets: an event's deliveries depend on which node accepted it; deploy the same rule files to every node"
                ),
                "nodes": listed,
            }),
        )
    }

    pub(super) async fn endpoints(&self) -> Resp {
        let eps: Vec<crate::store::Endpoint> = self
            .shared
            .endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let store = self.shared.store.clone();
        let connected = self.shared.channel.spaces();
        let listed = tokio::task::spawn_blocking(move || {
            let endpoints: Vec<Value> = eps
                .into_iter()
                .map(|ep| {
                    let parked = store.parked_count(&ep.endpoint).unwrap_or(0);
                    let mut v = json!(ep);
                    v["parked"] = json!(parked);
                    v["blocked"] = json!(
                        ep.disabled || ep.blocked_until.is_some_and(|t| t > crate::store::now_ms())
                    );
                    v
                })
                .collect();
            // WebSocket spaces: those with clients and those with
            // deliveries waiting for one (the ones an operator looks for).
            use crate::deliver::channel;
            let mut spaces: std::collections::BTreeMap<String, (usize, u64)> = connected
                .into_iter()
                .map(|(space, clients)| (space, (clients, 0)))
                .collect();
            for (key, parked) in store
                .parked_by_prefix(channel::ENDPOINT_PREFIX)
                .unwrap_or_default()
            {
                if let Some(space) = channel::space_of(&key) {
                    spaces.entry(space.to_string()).or_default().1 = parked;
                }
            }
            let channels: Vec<Value> = spaces
                .into_iter()
                .map(|(space, (clients, parked))| {
                    json!({"space": space, "path": channel::path(&space), "clients": clients, "parked": parked})
                })
                .collect();
            (endpoints, channels)
        })
        .await
        .unwrap_or_default();
        let (with_counts, channels) = listed;
        json_response(
            StatusCode::OK,
            &super::with_times(json!({ "endpoints": with_counts, "channels": channels })),
        )
    }

    pub(super) async fn unblock(&self, req: Request<Incoming>) -> Resp {
        let body = match self.read_body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let Some(endpoint) = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["endpoint"].as_str().map(str::to_string))
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "expected {\"endpoint\": \"https://host:443\"}",
                Some("endpoint"),
            );
        };
        let ep = {
            let mut eps = self
                .shared
                .endpoints
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let Some(ep) = eps.get_mut(&endpoint) else {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no endpoint {endpoint}; list them with GET /v1/endpoints"),
                    Some("endpoint"),
                );
            };
            ep.disabled = false;
            ep.blocked_until = None;
            ep.consecutive_failures = 0;
            ep.updated_at = crate::store::now_ms();
            ep.clone()
        };
        tracing::info!(endpoint = %super::logged(&endpoint), "endpoint unblocked by an admin");
        // The first few thousand now; a larger backlog follows in the
        // background (see `deliver::unpark`).
        match crate::deliver::unpark(
            &self.shared.outbox,
            &self.shared.kick,
            &endpoint,
            vec![Op::PutEndpoint(ep.clone())],
        )
        .await
        {
            Ok(done) => {
                let resumed = match done.get(1) {
                    Some(Done::Unparked(ids)) => ids.len(),
                    _ => 0,
                };
                let more = resumed >= crate::deliver::UNPARK_STEP;
                json_response(
                    StatusCode::OK,
                    &json!({"endpoint": ep, "resumed": resumed, "more": more}),
                )
            }
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage",
                e.to_string(),
                None,
            ),
        }
    }

    pub(super) async fn metrics(&self) -> Resp {
        let mut now = crate::metrics::scrape(&self.shared).await;
        now.connections_open = self.connections.open() as u64;
        now.connections_closed_room = self.connections.closed_for_room();
        now.connections_closed_all_busy = self.connections.refused_all_busy();
        now.sign_ins_failed = self.sign_ins.failed_total();
        now.sign_ins_locked_out = self.sign_ins.refused_total();
        now.rules_loaded = self.ingest.rules.load().len() as u64;
        now.last_reload_ok = self.loader.report().ok;
        let text = self.ingest.metrics.render(&now);
        let mut r = Response::new(super::full(text));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        );
        r
    }
}
