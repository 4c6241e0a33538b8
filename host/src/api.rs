//! The HTTP API (JSON, versioned under `/v1`), `/healthz` and `/metrics`.
//! Every route but `/healthz` needs an API key (`Authorization: Bearer
//! KEY`); ingest keys may only post events.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::config::{ApiKey, Role};
use crate::deliver::{Queue, Shared};
use crate::ingest::{Ingest, IngestError};
use crate::plugins::ChainOutcome;
use crate::reload::Loader;
use crate::store::{DeliveryId, Done, Filter, Op, Rebuilt, State};

pub struct Api {
    pub ingest: Ingest,
    pub shared: Arc<Shared>,
    pub queue: Queue,
    pub keys: Vec<ApiKey>,
    pub loader: Arc<Loader>,
}

type Resp = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Errors as `{"error": {"code": …, "message": …, "field": …}}`.
fn error(status: StatusCode, code: &str, message: impl Into<String>, field: Option<&str>) -> Resp {
    let mut e = json!({"code": code, "message": message.into()});
    if let Some(f) = field {
        e["field"] = json!(f);
    }
    json_response(status, &json!({ "error": e }))
}

impl Api {
    fn role_of(&self, req: &Request<Incoming>) -> Option<Role> {
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)?
            .to_str()
            .ok()?;
        let presented = header.strip_prefix("Bearer ")?.trim().as_bytes();
        // Compare against every key, always, so timing says nothing about
        // which key (or how much of one) matched.
        let mut found = None;
        for k in &self.keys {
            if crate::sign::constant_time_eq(k.key.as_bytes(), presented) {
                found = Some(k.role.clone());
            }
        }
        found
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Resp, std::convert::Infallible> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        if path == "/healthz" {
            return Ok(json_response(StatusCode::OK, &json!({"status": "ok"})));
        }
        // The WebSocket channel authenticates the way its clients already
        // do (see `deliver::channel`), not with a Bearer API key.
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            (&Method::POST, ["authentication", "sign_in"]) => return Ok(self.sign_in(req).await),
            (&Method::GET, ["messaging", "shared_spaces", space, "webhooks"]) => {
                let space = space.to_string();
                return Ok(self.open_channel(req, space));
            }
            _ => {}
        }
        let Some(role) = self.role_of(&req) else {
            return Ok(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or unknown API key; send Authorization: Bearer KEY",
                None,
            ));
        };
        let is_ingest = method == Method::POST && path == "/v1/events";
        let allowed = match role {
            Role::Admin => true,
            Role::Ingest => is_ingest,
            Role::WebSocket => false,
        };
        if !allowed {
            return Ok(error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this route needs an admin key; ingest keys may only POST /v1/events, and websocket keys only sign in to the WebSocket channel",
                None,
            ));
        }
        let resp = match (method, segments.as_slice()) {
            (Method::POST, ["v1", "events"]) => self.post_events(req).await,
            (Method::GET, ["v1", "deliveries"]) => {
                self.list_deliveries(req.uri().query().unwrap_or("")).await
            }
            (Method::GET, ["v1", "deliveries", id]) => self.show_delivery(id).await,
            (Method::POST, ["v1", "deliveries", id, "redeliver"]) => {
                self.redeliver(id, req.uri().query().unwrap_or("")).await
            }
            (Method::GET, ["v1", "rules"]) => self.rules(),
            (Method::POST, ["v1", "rules", "reload"]) => self.reload().await,
            (Method::POST, ["v1", "rules", name, "test"]) => self.test_connection(name).await,
            (Method::GET, ["v1", "endpoints"]) => self.endpoints().await,
            (Method::POST, ["v1", "endpoints", "unblock"]) => self.unblock(req).await,
            (Method::GET, ["metrics"]) => self.metrics().await,
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {path}"),
                None,
            ),
        };
        Ok(resp)
    }

    /// The API key a WebSocket client names by `client_id` (the key's name)
    /// and `client_secret` (its value), if it may use the channel.
    fn channel_client(&self, client_id: &str, client_secret: &str) -> Option<String> {
        // Every key is compared, always, so timing says nothing about which
        // one matched or how much of it.
        let mut found = None;
        for k in &self.keys {
            let name_ok = crate::sign::constant_time_eq(k.name.as_bytes(), client_id.as_bytes());
            let key_ok = crate::sign::constant_time_eq(k.key.as_bytes(), client_secret.as_bytes());
            if name_ok & key_ok && matches!(k.role, Role::WebSocket | Role::Admin) {
                found = Some(k.name.clone());
            }
        }
        found
    }

    /// `POST /authentication/sign_in` `{"client_id", "client_secret"}`:
    /// answers 200 with the session cookie the channel's upgrade carries.
    async fn sign_in(&self, req: Request<Incoming>) -> Resp {
        let body = match self.read_body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let Ok(creds) = serde_json::from_slice::<Value>(&body) else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body is not JSON; send {\"client_id\": …, \"client_secret\": …}",
                None,
            );
        };
        let field = |name: &str| creds.get(name).and_then(Value::as_str).map(str::to_string);
        let (Some(id), Some(secret)) = (field("client_id"), field("client_secret")) else {
            let missing = if field("client_id").is_none() {
                "client_id"
            } else {
                "client_secret"
            };
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("`{missing}` is missing or not a string"),
                Some(missing),
            );
        };
        let Some(client) = self.channel_client(&id, &secret) else {
            tracing::warn!(client_id = %id, "WebSocket sign-in refused");
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown client_id or wrong client_secret (the API key's name and value, of role websocket or admin)",
                None,
            );
        };
        let token = self.shared.channel.sign_in(&client);
        let mut resp = json_response(StatusCode::OK, &json!({"client_id": client}));
        let cookie = format!(
            "{}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            crate::deliver::channel::SESSION_COOKIE,
            crate::deliver::channel::SESSION_TTL.as_secs()
        );
        if let Ok(v) = http::HeaderValue::from_str(&cookie) {
            resp.headers_mut().insert(http::header::SET_COOKIE, v);
        }
        resp
    }

    /// Who opens the channel: the session cookie's client, or the client
    /// named by `Authorization: Bearer CLIENT_ID:CLIENT_SECRET`.
    fn channel_auth(&self, req: &Request<Incoming>) -> Option<String> {
        let headers = req.headers();
        let from_cookie = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| *k == crate::deliver::channel::SESSION_COOKIE)
            .and_then(|(_, token)| self.shared.channel.session(token));
        from_cookie.or_else(|| {
            let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
            let (id, secret) = auth.strip_prefix("Bearer ")?.trim().split_once(':')?;
            self.channel_client(id, secret)
        })
    }

    /// `GET /messaging/shared_spaces/{space}/webhooks`: upgrades to a
    /// WebSocket that receives the space's deliveries.
    fn open_channel(&self, mut req: Request<Incoming>, space: String) -> Resp {
        let Some(client) = self.channel_auth(&req) else {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "sign in with POST /authentication/sign_in and send its LWSSO_COOKIE_KEY cookie, or send Authorization: Bearer CLIENT_ID:CLIENT_SECRET",
                None,
            );
        };
        let header = |name: http::header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_ascii_lowercase()
        };
        let upgrade = header(http::header::UPGRADE) == "websocket"
            && header(http::header::CONNECTION)
                .split(',')
                .any(|t| t.trim() == "upgrade")
            && header(http::header::SEC_WEBSOCKET_VERSION) == "13";
        let Some(key) = req
            .headers()
            .get(http::header::SEC_WEBSOCKET_KEY)
            .filter(|_| upgrade)
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "this route is a WebSocket (version 13); send Upgrade: websocket with Sec-WebSocket-Key",
                None,
            );
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on_upgrade = hyper::upgrade::on(&mut req);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "WebSocket upgrade failed");
                    return;
                }
            };
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                hyper_util::rt::TokioIo::new(upgraded),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                Some(crate::deliver::channel::server_config()),
            )
            .await;
            let registration = shared.channel.register(&space, &client);
            tracing::info!(space, client, "WebSocket client connected");
            crate::deliver::resume_channel(&shared, &space).await;
            registration.serve(ws).await;
            tracing::info!(space, client, "WebSocket client disconnected");
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(
            http::header::UPGRADE,
            http::HeaderValue::from_static("websocket"),
        );
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("Upgrade"),
        );
        if let Ok(v) = http::HeaderValue::from_str(&accept) {
            h.insert(http::header::SEC_WEBSOCKET_ACCEPT, v);
        }
        resp
    }

    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, Resp> {
        let max = self.shared.config.max_body_bytes;
        match Limited::new(req.into_body(), max).collect().await {
            Ok(b) => Ok(b.to_bytes()),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the body is larger than {max} bytes (max_body)"),
                    None,
                ))
            }
            Err(e) => Err(error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("cannot read the body: {e}"),
                None,
            )),
        }
    }

    async fn post_events(&self, req: Request<Incoming>) -> Resp {
        let ndjson = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.starts_with("application/x-ndjson") || ct.starts_with("application/jsonl")
            });
        let body = match self.read_body(req).await {
            Ok(b) => b,
            Err(resp) => {
                self.ingest.metrics.events_rejected.fetch_add(1, Relaxed);
                return resp;
            }
        };
        let events = match crate::ingest::parse_body(&body, ndjson) {
            Ok(e) => e,
            Err(e) => return self.ingest_error(e),
        };
        let batch = ndjson;
        match self.ingest.accept(events).await {
            Ok(accepted) if !batch => json_response(StatusCode::ACCEPTED, &json!(accepted[0])),
            Ok(accepted) => json_response(StatusCode::ACCEPTED, &json!({ "events": accepted })),
            Err(e) => self.ingest_error(e),
        }
    }

    fn ingest_error(&self, e: IngestError) -> Resp {
        match e {
            IngestError::BadEvent { line, error: ev } => {
                self.ingest.metrics.events_rejected.fetch_add(1, Relaxed);
                let mut resp = json!({"error": {"code": "bad_event", "message": format!("{}{ev}", line.map(|l| format!("line {l}: ")).unwrap_or_default()), "field": ev.field}});
                if let Some(l) = line {
                    resp["error"]["line"] = json!(l);
                }
                json_response(StatusCode::BAD_REQUEST, &resp)
            }
            IngestError::Store(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage",
                e.to_string(),
                None,
            ),
        }
    }

    async fn list_deliveries(&self, query: &str) -> Resp {
        let mut filter = Filter::default();
        let mut limit = 50usize;
        let mut before = None;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "rule" => filter.rule = Some(v.into_owned()),
                "event" => filter.event = Some(v.into_owned()),
                "status" | "state" => match State::parse(&v) {
                    Some(s) => filter.state = Some(s),
                    None => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "bad_query",
                            format!(
                                "status `{v}` is unknown; use pending, parked, succeeded, failed or skipped"
                            ),
                            Some("status"),
                        );
                    }
                },
                "limit" => limit = v.parse().unwrap_or(50).clamp(1, 1000),
                "before" => match DeliveryId::parse(&v) {
                    Some(id) => before = Some(id),
                    None => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "bad_query",
                            format!("`{v}` is not a delivery id"),
                            Some("before"),
                        );
                    }
                },
                _ => {}
            }
        }
        let store = self.shared.store.clone();
        let found = tokio::task::spawn_blocking(move || store.list(&filter, before, limit)).await;
        match found {
            Ok(Ok(list)) => {
                let next = (list.len() == limit)
                    .then(|| list.last().map(|d| d.id.to_string()))
                    .flatten();
                json_response(
                    StatusCode::OK,
                    &json!({"deliveries": list, "next_before": next}),
                )
            }
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

    async fn show_delivery(&self, id: &str) -> Resp {
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
                    &json!({"delivery": d, "bound_to": bound_to, "body": body, "attempts": attempts}),
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
    async fn redeliver(&self, id: &str, query: &str) -> Resp {
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
                    json_response(StatusCode::ACCEPTED, &json!({ "delivery": d }))
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
    async fn rebuild(
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

    /// Reloads now and answers with the outcome: 200 when the new set
    /// runs, 422 with every diagnostic when the old one keeps running.
    /// `POST /v1/rules/{name}/test`: what `rulehook test-connection` does,
    /// from the server (its network, its proxy, its running rules).
    async fn test_connection(&self, name: &str) -> Resp {
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

    async fn reload(&self) -> Resp {
        let loader = self.loader.clone();
        let running = self.ingest.rules.clone();
        match tokio::task::spawn_blocking(move || loader.reload(&running, "api")).await {
            Ok(report) => {
                let status = if report.ok {
                    StatusCode::OK
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                };
                json_response(status, &json!({ "reload": report }))
            }
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
                None,
            ),
        }
    }

    fn rules(&self) -> Resp {
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
            &json!({"rules": list, "plugins": plugins, "last_reload": self.loader.report()}),
        )
    }

    async fn endpoints(&self) -> Resp {
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
            &json!({ "endpoints": with_counts, "channels": channels }),
        )
    }

    async fn unblock(&self, req: Request<Incoming>) -> Resp {
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
        tracing::info!(endpoint = %endpoint, "endpoint unblocked by an admin");
        match self
            .shared
            .outbox
            .write(vec![
                Op::PutEndpoint(ep.clone()),
                Op::Unpark {
                    endpoint: endpoint.clone(),
                    limit: usize::MAX,
                },
            ])
            .await
        {
            Ok(done) => {
                let resumed = match done.get(1) {
                    Some(Done::Unparked(ids)) => ids.len(),
                    _ => 0,
                };
                self.queue.kick();
                json_response(StatusCode::OK, &json!({"endpoint": ep, "resumed": resumed}))
            }
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage",
                e.to_string(),
                None,
            ),
        }
    }

    async fn metrics(&self) -> Resp {
        let store = self.shared.store.clone();
        let (due, parked) = tokio::task::spawn_blocking(move || store.backlog().unwrap_or((0, 0)))
            .await
            .unwrap_or((0, 0));
        let active = self
            .shared
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len() as u64;
        let text = self.ingest.metrics.render(&[
            (
                "rulehook_queue_depth",
                "Deliveries waiting for an attempt (pending).",
                due,
            ),
            (
                "rulehook_parked_deliveries",
                "Deliveries waiting for a blocked or disabled endpoint, or for a WebSocket client.",
                parked,
            ),
            (
                "rulehook_websocket_clients",
                "Clients connected to the WebSocket channel, over all shared spaces.",
                self.shared.channel.spaces().iter().map(|(_, n)| *n as u64).sum(),
            ),
            (
                "rulehook_deliveries_in_flight",
                "Deliveries queued in memory or being attempted.",
                active,
            ),
            (
                "rulehook_outbox_commits",
                "Durable commits made by the outbox.",
                self.shared.outbox.stats.commits.load(Relaxed),
            ),
            (
                "rulehook_rules_loaded",
                "Rules in the running set.",
                self.ingest.rules.load().len() as u64,
            ),
            (
                "rulehook_rules_last_reload_ok",
                "1 when the last rule/plugin load succeeded, 0 when it failed and the previous set kept running.",
                u64::from(self.loader.report().ok),
            ),
        ]);
        let mut r = Response::new(Full::new(Bytes::from(text)));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    }
}
