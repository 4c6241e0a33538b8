//! Delivery records: `GET /v1/deliveries` (filtered, cursor-paged),
//! `GET /v1/deliveries/counts`, `GET /v1/deliveries/{id}` (with attempts
//! and body), `POST /v1/deliveries/{id}/redeliver`, the bulk
//! `POST /v1/deliveries/redeliver` by filter, and the live tail
//! `GET /v1/deliveries/stream` (server-sent events).

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};

use super::{Api, Refusal, Resp, error, json_response, with_times};
use crate::plugins::ChainOutcome;
use crate::store::{
    DeliveryId, Done, EndpointMatch, Filter, Op, Rebuilt, State, StatusMatch, StoreError,
};

/// Records one list request looks at, at most: a filter that matches
/// rarely answers within this with a cursor to go on from, instead of
/// walking a million records.
const SCAN_BUDGET: usize = 20_000;
/// Failed and skipped deliveries counted one by one, at most (see `Store::counts`).
const COUNT_CAP: u64 = 200_000;
/// Bulk redeliver: default and largest `max`, and records looked at, at most.
const BULK_DEFAULT: usize = 1_000;
const BULK_MAX: usize = 10_000;
const BULK_SCAN: usize = 200_000;
/// Bulk redeliveries per commit.
const BULK_COMMIT: usize = 500;
/// Live-tail streams open at once, at most.
pub(super) const MAX_STREAMS: usize = 32;

/// A delivery list request's filters and paging.
pub(super) struct Query {
    pub filter: Filter,
    pub before: Option<DeliveryId>,
    pub limit: usize,
}

/// `a=b&c=d` as owned pairs.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn storage_error(e: StoreError) -> Resp {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "storage",
        e.to_string(),
        None,
    )
}

fn internal(e: impl std::fmt::Display) -> Resp {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        e.to_string(),
        None,
    )
}

impl Api {
    pub(super) async fn list_deliveries(&self, query: &str) -> Resp {
        let q = match self.parse_query(&query_pairs(query), false) {
            Ok(q) => q,
            Err(refused) => return refused.answer(),
        };
        let store = self.shared.store.clone();
        let (filter, before, limit) = (q.filter, q.before, q.limit);
        let found = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let page = store.page(&filter, before, limit, SCAN_BUDGET)?;
            let last = store.last_attempts(&page.deliveries)?;
            Ok((page, last))
        })
        .await;
        match found {
            Ok(Ok((page, last))) => {
                let rows: Vec<Value> = page
                    .deliveries
                    .iter()
                    .zip(&last)
                    .map(|(d, a)| self.row(d, a.as_ref()))
                    .collect();
                json_response(
                    StatusCode::OK,
                    &with_times(json!({
                        "deliveries": rows,
                        "next_before": page.next_before.map(|id| id.to_string()),
                        "scanned": page.scanned,
                    })),
                )
            }
            Ok(Err(e)) => storage_error(e),
            Err(e) => internal(e),
        }
    }

    /// A delivery as the list shows it: the record, plus where it goes
    /// (`endpoint`: the last attempt's, the one it is parked on, its
    /// WebSocket space's, else its rule's now) and the last attempt's
    /// `duration_ms`.
    pub(super) fn row(
        &self,
        d: &crate::store::Delivery,
        last: Option<&crate::store::Attempt>,
    ) -> Value {
        let endpoint = d
            .parked_on
            .clone()
            .or_else(|| d.space.as_deref().map(crate::deliver::channel::endpoint))
            .or_else(|| last.and_then(|a| crate::store::url_endpoint(&a.url)))
            .or_else(|| {
                let rules = self.ingest.rules.load();
                let url = rules.get(&d.rule)?.webhook.url.clone()?;
                Some(crate::deliver::endpoint_key(&url))
            });
        let mut v = json!(d);
        v["endpoint"] = json!(endpoint);
        v["duration_ms"] = json!(last.map(|a| a.duration_ms));
        v
    }

    /// Reads the filters of `GET /v1/deliveries` (also the stream's and,
    /// from a JSON body, the bulk redeliver's). `strict` refuses names it
    /// does not know, for the bulk route, where a typo must not widen the
    /// filter to more deliveries than meant.
    pub(super) fn parse_query(
        &self,
        pairs: &[(String, String)],
        strict: bool,
    ) -> Result<Query, Refusal> {
        let mut q = Query {
            filter: Filter::default(),
            before: None,
            limit: 50,
        };
        let bad = |field: &str, message: String| {
            Err(Refusal::new(StatusCode::BAD_REQUEST, "bad_query", message).field(field))
        };
        for (k, v) in pairs {
            match k.as_str() {
                "rule" => q.filter.rule = Some(v.clone()),
                "event" => q.filter.event = Some(v.clone()),
                "status" | "state" => match State::parse(v) {
                    Some(s) => q.filter.state = Some(s),
                    None => {
                        return bad(
                            "status",
                            format!(
                                "status `{v}` is unknown; use pending, parked, succeeded, failed or skipped"
                            ),
                        );
                    }
                },
                "status_code" => match StatusMatch::parse(v) {
                    Some(m) => q.filter.status_code = Some(m),
                    None => {
                        return bad(
                            "status_code",
                            format!(
                                "status_code `{v}` is neither an HTTP status (100-599) nor a class (1xx-5xx)"
                            ),
                        );
                    }
                },
                "endpoint" => q.filter.endpoint = Some(self.endpoint_match(v)),
                "since" | "until" => match crate::time::parse_time(v) {
                    Ok(ms) if k == "since" => q.filter.since_ms = Some(ms),
                    Ok(ms) => q.filter.until_ms = Some(ms),
                    Err(e) => return bad(k, e.to_string()),
                },
                "limit" => match v.parse::<usize>() {
                    Ok(n) => q.limit = n.clamp(1, 1000),
                    Err(_) => return bad("limit", format!("limit `{v}` is not a number (1-1000)")),
                },
                "before" => match DeliveryId::parse(v) {
                    Some(id) => q.before = Some(id),
                    None => return bad("before", format!("`{v}` is not a delivery id")),
                },
                other if strict => {
                    return bad(
                        other,
                        format!(
                            "`{other}` is not a filter; use rule, event, status, endpoint, status_code, since, until (and dry_run, max)"
                        ),
                    );
                }
                _ => {}
            }
        }
        Ok(q)
    }

    /// An endpoint filter, with the running rules that send there (for
    /// deliveries not attempted yet, which have no URL of their own).
    fn endpoint_match(&self, key: &str) -> EndpointMatch {
        let snapshot = self.ingest.rules.load();
        let rules = snapshot
            .rules()
            .iter()
            .filter(|r| {
                r.webhook
                    .url
                    .as_ref()
                    .is_some_and(|u| crate::deliver::endpoint_key(u) == key)
            })
            .map(|r| r.name.clone())
            .collect();
        EndpointMatch {
            key: key.to_string(),
            rules,
            space: crate::deliver::channel::space_of(key).map(str::to_string),
        }
    }

    /// `GET /v1/deliveries/counts`: deliveries by state.
    pub(super) async fn counts(&self) -> Resp {
        let store = self.shared.store.clone();
        match tokio::task::spawn_blocking(move || store.counts(COUNT_CAP)).await {
            Ok(Ok((counts, exact))) => {
                json_response(StatusCode::OK, &json!({"counts": counts, "exact": exact}))
            }
            Ok(Err(e)) => storage_error(e),
            Err(e) => internal(e),
        }
    }

    /// `POST /v1/deliveries/redeliver` with the list's filters as a JSON
    /// object, plus `dry_run` (count, change nothing) and `max` (default
    /// 1,000, at most 10,000). More matches than `max` are refused whole,
    /// so a broad filter never half-happens; deliveries already pending
    /// are left as they are, so repeating a request sends nothing twice.
    pub(super) async fn bulk_redeliver(&self, req: http::Request<hyper::body::Incoming>) -> Resp {
        let body = match self.read_body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body) else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "expected a JSON object of filters, e.g. {\"rule\": \"r\", \"status\": \"failed\", \"dry_run\": true}",
                None,
            );
        };
        let mut dry_run = false;
        let mut max = BULK_DEFAULT;
        let mut pairs = Vec::new();
        for (k, v) in fields {
            match (k.as_str(), v) {
                ("dry_run", Value::Bool(b)) => dry_run = b,
                ("max", Value::Number(n))
                    if n.as_u64()
                        .is_some_and(|n| (1..=BULK_MAX as u64).contains(&n)) =>
                {
                    max = n.as_u64().unwrap_or(BULK_DEFAULT as u64) as usize;
                }
                ("dry_run" | "max", _) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        format!(
                            "`dry_run` is true or false; `max` is a number from 1 to {BULK_MAX}"
                        ),
                        Some(&k),
                    );
                }
                (_, Value::String(s)) => pairs.push((k, s)),
                (_, Value::Number(n)) => pairs.push((k, n.to_string())),
                (_, Value::Null) => {}
                (_, _) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        format!("filter `{k}` must be a string or a number"),
                        Some(&k),
                    );
                }
            }
        }
        if pairs.is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "no_filter",
                "name at least one filter (rule, event, status, endpoint, status_code, since, until); redelivering everything is not a bulk action",
                None,
            );
        }
        let q = match self.parse_query(&pairs, true) {
            Ok(q) => q,
            Err(refused) => return refused.answer(),
        };
        let store = self.shared.store.clone();
        let filter = q.filter.clone();
        // One more than `max`, to tell "exactly max" from "too many".
        let found = tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
            let mut matched = Vec::new();
            let mut before = None;
            let mut scanned = 0;
            loop {
                let page = store.page(&filter, before, max + 1 - matched.len(), SCAN_BUDGET)?;
                scanned += page.scanned;
                matched.extend(page.deliveries);
                match page.next_before {
                    Some(next) if matched.len() <= max && scanned < BULK_SCAN => {
                        before = Some(next)
                    }
                    Some(_) if matched.len() <= max => return Ok((matched, false)),
                    _ => return Ok((matched, true)),
                }
            }
        })
        .await;
        let (matched, complete) = match found {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return storage_error(e),
            Err(e) => return internal(e),
        };
        if !complete {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "too_broad",
                format!(
                    "looked at {BULK_SCAN} deliveries without reaching the end of this filter; narrow it (rule, status, since/until)"
                ),
                None,
            );
        }
        if matched.len() > max {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "too_many",
                format!(
                    "more than {max} deliveries match; narrow the filter or pass a larger max (up to {BULK_MAX})"
                ),
                None,
            );
        }
        let (pending, todo): (Vec<_>, Vec<_>) = matched
            .into_iter()
            .partition(|d| d.state == State::Pending || self.shared.is_active(d.id));
        if dry_run {
            return json_response(
                StatusCode::OK,
                &json!({
                    "dry_run": true,
                    "matched": todo.len() + pending.len(),
                    "would_redeliver": todo.len(),
                    "already_pending": pending.len(),
                }),
            );
        }
        let mut ops = Vec::with_capacity(todo.len());
        for d in &todo {
            // Only a delivery its plugins failed is built again.
            let (body, rebind) = if d.unbuilt {
                match self.rebuild(d.id, false).await {
                    Ok(b) => b,
                    Err(resp) => return resp,
                }
            } else {
                (Rebuilt::Same, None)
            };
            ops.push(Op::Redeliver {
                id: d.id,
                body,
                rebind,
            });
        }
        let ids: Vec<String> = todo.iter().map(|d| d.id.to_string()).collect();
        // In commits of a few hundred, so ingest never waits behind one
        // long transaction; each delivery's redelivery stands on its own.
        let mut redelivered = 0;
        let mut written = Ok(());
        while !ops.is_empty() {
            let chunk: Vec<Op> = ops.drain(..ops.len().min(BULK_COMMIT)).collect();
            match self.shared.outbox.write(chunk).await {
                Ok(done) => {
                    redelivered += done
                        .iter()
                        .filter(|d| matches!(d, Done::Redelivered(_)))
                        .count();
                }
                Err(e) => {
                    written = Err(e);
                    break;
                }
            }
        }
        if redelivered > 0 {
            self.queue.kick();
        }
        match written {
            Ok(()) => {
                tracing::info!(
                    redelivered,
                    already_pending = pending.len(),
                    rule = ?q.filter.rule,
                    state = ?q.filter.state,
                    "bulk redelivery by an admin"
                );
                json_response(
                    StatusCode::ACCEPTED,
                    &json!({
                        "redelivered": redelivered,
                        "already_pending": pending.len(),
                        "deliveries": ids,
                    }),
                )
            }
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage",
                format!(
                    "{e}; {redelivered} of the {} deliveries were redelivered before it",
                    ids.len()
                ),
                None,
            ),
        }
    }

    pub(super) async fn show_delivery(&self, id: &str) -> Resp {
        let Some(id) = DeliveryId::parse(id) else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_id",
                format!("`{id}` is not a delivery id (dlv_ and 32 hex digits)"),
                None,
            );
        };
        let store = self.shared.store.clone();
        let found = tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
            Ok((store.delivery(id)?, store.attempts(id)?, store.body(id)?))
        })
        .await;
        match found {
            Ok(Ok((Some(d), attempts, body))) => {
                let body = body.map(|b| {
                    serde_json::from_slice::<Value>(&b)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into_owned()))
                });
                let bound_to = self.binding(&d);
                json_response(
                    StatusCode::OK,
                    &with_times(
                        json!({"delivery": d, "bound_to": bound_to, "body": body, "attempts": attempts}),
                    ),
                )
            }
            Ok(Ok((None, _, _))) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no delivery {id}"),
                None,
            ),
            Ok(Err(e)) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage",
                e.to_string(),
                None,
            ),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
                None,
            ),
        }
    }

    /// `POST /v1/deliveries/{id}/redeliver[?rule=current]`: sends it again
    /// with the rule version it is bound to, or with `rule=current` the
    /// version of its rule that runs now (the admin's explicit choice to
    /// let pending or failed work follow a changed rule).
    pub(super) async fn redeliver(&self, id: &str, query: &str) -> Resp {
        let Some(id) = DeliveryId::parse(id) else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_id",
                format!("`{id}` is not a delivery id"),
                None,
            );
        };
        let mut current = false;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match (k.as_ref(), v.as_ref()) {
                ("rule", "current") => current = true,
                ("rule", "bound") => current = false,
                (k, v) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_query",
                        format!(
                            "`{k}={v}` is unknown; use rule=current to send with the running version of its rule, or leave it out to keep the version it is bound to"
                        ),
                        Some(k),
                    );
                }
            }
        }
        if self.shared.is_active(id) {
            return error(
                StatusCode::CONFLICT,
                "in_flight",
                format!("delivery {id} is being attempted right now; try again when it finishes"),
                None,
            );
        }
        let (body, rebind) = match self.rebuild(id, current).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        match self
            .shared
            .outbox
            .write(vec![Op::Redeliver { id, body, rebind }])
            .await
        {
            Ok(done) => match done.into_iter().next() {
                Some(Done::Redelivered(d)) => {
                    self.queue.kick();
                    json_response(StatusCode::ACCEPTED, &with_times(json!({ "delivery": d })))
                }
                Some(Done::Rejected(why)) if why.contains(crate::store::WAITS_IN_LANE) => {
                    error(StatusCode::CONFLICT, "waiting_in_lane", why, None)
                }
                Some(Done::Rejected(why)) => error(StatusCode::NOT_FOUND, "not_found", why, None),
                _ => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "unexpected store answer",
                    None,
                ),
            },
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage",
                e.to_string(),
                None,
            ),
        }
    }

    /// For a delivery whose plugin chain failed, runs the chain again with
    /// the rule and plugins running now, so a fixed plugin takes effect;
    /// such a delivery, and any with `current`, is then bound to the
    /// running version of its rule (the second value).
    pub(super) async fn rebuild(
        &self,
        id: DeliveryId,
        current: bool,
    ) -> Result<(Rebuilt, Option<String>), Resp> {
        let store = self.shared.store.clone();
        let found = tokio::task::spawn_blocking(move || {
            let d = store.delivery(id)?;
            let body = store.body(id)?;
            Ok::<_, crate::store::StoreError>((d, body))
        })
        .await;
        let (delivery, body) = match found {
            Ok(Ok((Some(d), body))) => (d, body),
            Ok(Ok((None, _))) => return Ok((Rebuilt::Same, None)),
            Ok(Err(e)) => {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage",
                    e.to_string(),
                    None,
                ));
            }
            Err(e) => {
                return Err(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    e.to_string(),
                    None,
                ));
            }
        };
        let snapshot = self.ingest.rules.load_full();
        let running = snapshot
            .targets
            .get(&delivery.rule)
            .map(|t| t.version.0.clone());
        if !delivery.unbuilt {
            if !current {
                return Ok((Rebuilt::Same, None));
            }
            return match running {
                Some(v) => Ok((Rebuilt::Same, Some(v))),
                None => Err(error(
                    StatusCode::CONFLICT,
                    "rule_gone",
                    format!(
                        "rule `{}` is not in the running set, so delivery {id} cannot follow it; restore the rule, or redeliver without ?rule=current to send with the version it is bound to",
                        delivery.rule
                    ),
                    None,
                )),
            };
        }
        if snapshot.get(&delivery.rule).is_none() {
            return Err(error(
                StatusCode::CONFLICT,
                "rule_gone",
                format!(
                    "delivery {id} was never built and its rule `{}` no longer exists; restore the rule to redeliver it",
                    delivery.rule
                ),
                None,
            ));
        }
        let input: Value = body
            .as_deref()
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or(Value::Null);
        let outcome = tokio::task::spawn_blocking(move || {
            let rule = snapshot.get(&delivery.rule).expect("checked above");
            let text = |k: &str| input[k].as_str().unwrap_or_default().to_string();
            let ctx = crate::plugins::CallContext {
                rule: rule.name.clone(),
                event_id: delivery.event_id.clone(),
                event_type: text("event_type"),
                entity_type: text("entity_type"),
            };
            snapshot.plugins.run_chain(rule, &ctx, &input)
        })
        .await
        .map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
                None,
            )
        })?;
        let rebuilt = match outcome {
            ChainOutcome::Send(b) => Rebuilt::Body(b),
            ChainOutcome::Skip(why) => Rebuilt::Skipped(why),
            ChainOutcome::Failed(why) => Rebuilt::Failed(why),
        };
        // Built by the running rule, so sent with its version.
        Ok((rebuilt, running))
    }

    /// The rule version a delivery is bound to, for `GET /v1/deliveries/{id}`:
    /// whether it is the one running now, and where it sends.
    fn binding(&self, d: &crate::store::Delivery) -> Value {
        let Some(version) = &d.rule_version else {
            return json!({"rule": d.rule, "version": null, "running": true,
                "note": "stored before rule versions existed: sent with the running rule of this name"});
        };
        let running = self
            .ingest
            .rules
            .load()
            .targets
            .get(&d.rule)
            .is_some_and(|t| t.version.0 == *version);
        let target = self
            .shared
            .targets
            .get(&crate::rules::target::RuleVersion(version.clone()));
        let (url, problem) = match target.as_deref().map(|t| &t.webhook) {
            Some(Ok(w)) => (w.url.as_ref().map(|u| u.to_string()), None),
            Some(Err(why)) => (None, Some(why.clone())),
            None => (None, Some("this version is not in the store".to_string())),
        };
        json!({"rule": d.rule, "version": version, "running": running, "url": url, "problem": problem})
    }
}

impl Api {
    /// `GET /v1/deliveries/stream` (the list's filters): server-sent
    /// events, a `delivery` event with the record each time a delivery
    /// passing the filters is made or changes, `lagged` when this stream
    /// fell behind (reload the list), a comment every 15 s. It ends when
    /// the client goes or the server stops.
    pub(super) fn stream(&self, query: &str) -> Resp {
        let q = match self.parse_query(&query_pairs(query), false) {
            Ok(q) => q,
            Err(refused) => return refused.answer(),
        };
        let Some(slot) = self.console.stream_slot() else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                format!("{MAX_STREAMS} live tails are open already; close one and try again"),
                None,
            );
        };
        let mut changes = self.shared.outbox.subscribe();
        let store = self.shared.store.clone();
        let mut closing = self.console.closing();
        let filter = Arc::new(q.filter);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            let _slot = slot;
            if tx
                .send(Bytes::from_static(b"retry: 2000\n: live\n\n"))
                .await
                .is_err()
            {
                return;
            }
            let mut beat = tokio::time::interval(std::time::Duration::from_secs(15));
            beat.tick().await;
            loop {
                use tokio::sync::broadcast::error::RecvError;
                let frame = tokio::select! {
                    got = changes.recv() => match got {
                        Ok(ids) => {
                            let (store, filter) = (store.clone(), filter.clone());
                            let built = tokio::task::spawn_blocking(move || {
                                changed_frames(&store, &filter, &ids)
                            });
                            match built.await {
                                Ok(f) => f,
                                Err(_) => break,
                            }
                        }
                        Err(RecvError::Lagged(n)) => Bytes::from(format!(
                            "event: lagged\ndata: {{\"missed_commits\": {n}}}\n\n"
                        )),
                        Err(RecvError::Closed) => break,
                    },
                    _ = beat.tick() => Bytes::from_static(b": keep-alive\n\n"),
                    _ = async { closing.wait_for(|c| *c).await.map(|_| ()) } => break,
                };
                if !frame.is_empty() && tx.send(frame).await.is_err() {
                    break;
                }
            }
        });
        let mut resp = http::Response::new(http_body_util::BodyExt::boxed(LiveBody(rx)));
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-cache"),
        );
        resp
    }
}

/// The `delivery` events for the deliveries of one commit that pass
/// `filter`, as one chunk (empty when none does).
fn changed_frames(store: &crate::store::Store, filter: &Filter, ids: &[DeliveryId]) -> Bytes {
    let mut out = String::new();
    let mut seen = std::collections::HashSet::new();
    for id in ids {
        if !seen.insert(*id) {
            continue;
        }
        let Ok(Some(d)) = store.delivery(*id) else {
            continue;
        };
        let last = store.last_attempt(&d).ok().flatten();
        if filter.matches(&d, last.as_ref()) {
            // The list's row shape, as far as the record tells (a delivery
            // not attempted yet has no endpoint here; the page keeps the
            // one it showed).
            let mut row = json!(d);
            let endpoint = d
                .parked_on
                .clone()
                .or_else(|| d.space.as_deref().map(crate::deliver::channel::endpoint))
                .or_else(|| {
                    last.as_ref()
                        .and_then(|a| crate::store::url_endpoint(&a.url))
                });
            if let Some(ep) = endpoint {
                row["endpoint"] = json!(ep);
            }
            if let Some(a) = &last {
                row["duration_ms"] = json!(a.duration_ms);
            }
            let data = with_times(row).to_string();
            out.push_str("event: delivery\ndata: ");
            out.push_str(&data);
            out.push_str("\n\n");
        }
    }
    Bytes::from(out)
}

/// A streamed body fed by the live tail's task; it ends when the task
/// drops its sender.
struct LiveBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for LiveBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}
