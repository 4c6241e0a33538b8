//! The HTTP API (JSON, versioned under `/v1`), `/healthz` and `/metrics`.
//! Every route but `/healthz` needs an API key (`Authorization: Bearer
//! KEY`); ingest keys may only post events.
//!
//! This file routes, checks keys and roles, and shapes errors; the routes
//! live beside it by what they serve: `events` (ingest), `deliveries`
//! (records, redeliver, live tail), `admin` (rules, endpoints, metrics),
//! `channel` (the WebSocket channel's sign-in and upgrade) and `console`
//! (the web console at `/ui/` and its sessions).
//!
//! Who may do what: `admin` keys everything; `viewer` keys read every
//! route and change nothing (any method but GET answers 403); `ingest`
//! keys only post events; `websocket` keys only use the channel. The
//! console signs in with an admin or viewer key and then carries a
//! session cookie instead of the key (see `console`).

mod admin;
mod channel;
pub mod conns;
mod console;
mod deliveries;
mod events;
mod lanes;
pub mod sign_ins;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::config::{ApiKey, Role};
use crate::deliver::{Queue, Shared};
use crate::ingest::Ingest;
use crate::reload::Loader;

pub struct Api {
    pub ingest: Ingest,
    pub shared: Arc<Shared>,
    pub queue: Queue,
    pub keys: Vec<ApiKey>,
    pub loader: Arc<Loader>,
    /// Console sessions, live-tail streams and the shutdown signal.
    pub console: console::Console,
    /// Failed sign-ins per client address (channel and console).
    pub sign_ins: sign_ins::SignIns,
    /// The server's open connections (for `/metrics`).
    pub connections: Arc<conns::Connections>,
}

/// Who sent a request, put in its extensions by the server: the peer's
/// address (for per-client limits) and its connection's slot (whose phase
/// decides whether the connection may be closed to make room).
#[derive(Clone)]
pub struct Client {
    pub peer: SocketAddr,
    pub slot: Option<Arc<conns::Slot>>,
}

/// A response body that moves its connection back to `Waiting` once it is
/// written out (or dropped): until then the request is being served.
struct Tracked {
    inner: Body,
    _served: Served,
}

struct Served(Option<Arc<conns::Slot>>);

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(slot) = &self.0 {
            slot.set(conns::Phase::Waiting);
        }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A client's text as it may be logged: control characters (and the
/// Unicode line separators) escaped, so a newline cannot forge a log line,
/// and cut to 128 characters.
pub fn logged(text: &str) -> String {
    const MAX: usize = 128;
    let escaped = crate::plugins::runtime::escape_controls(text);
    match escaped.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}… ({} bytes)", &escaped[..at], text.len()),
        None => escaped.into_owned(),
    }
}

/// The credentials of an `Authorization: Bearer …` header. The scheme is
/// matched without regard to case, as HTTP says (RFC 9110 §11.1).
pub(crate) fn bearer(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|c| !c.is_empty())
}

/// The largest sign-in body (channel and console): credentials are a few
/// hundred bytes, and these routes are open to anyone, so they take far
/// less than `max_body`.
pub(super) const SIGN_IN_MAX_BODY: usize = 8 << 10;

/// The client address of a request (unspecified if the server did not
/// say, as in unit tests).
pub(super) fn peer(req: &Request<Incoming>) -> std::net::IpAddr {
    req.extensions()
        .get::<Client>()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |c| c.peer.ip())
}

/// `Connection: close` on an answer given without reading the request's
/// body: the unread bytes would be taken for the next request.
fn closing(mut resp: Resp) -> Resp {
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

pub use console::Console;

/// A response body: whole (JSON, assets) or streamed (the live tail).
pub type Body = BoxBody<Bytes, Infallible>;
type Resp = Response<Body>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(status: StatusCode, body: &Value) -> Resp {
    let mut r = Response::new(full(serde_json::to_vec(body).unwrap_or_default()));
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

/// A refused request, as data until it becomes the JSON error answer
/// (`error`); small, so helpers can return it in a `Result`.
pub(super) struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl Refusal {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn field(mut self, field: &str) -> Refusal {
        self.field = Some(field.to_string());
        self
    }

    pub fn answer(self) -> Resp {
        error(self.status, self.code, self.message, self.field.as_deref())
    }
}

impl Api {
    /// A `429` while `peer` has failed to sign in too often, given before
    /// its body is read. Not logged each time: the failures that led to it
    /// were, and a client hammering a locked door would flood the log.
    fn sign_in_locked(&self, peer: std::net::IpAddr, route: &str) -> Option<Resp> {
        let wait = self.sign_ins.locked(peer)?;
        tracing::debug!(%peer, route, "sign-in refused: too many failed sign-ins from this address");
        let secs = wait.as_secs() + 1;
        let mut resp = closing(error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sign_ins",
            format!(
                "more than {} failed sign-ins from your address in {} s (server.sign_in_failures, server.sign_in_window); try again in {secs} s",
                self.sign_ins.max_failures(),
                self.sign_ins.window().as_secs()
            ),
            None,
        ));
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        Some(resp)
    }

    /// The role of the Bearer key the request carries, if any.
    fn bearer_role(&self, req: &Request<Incoming>) -> Option<Role> {
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)?
            .to_str()
            .ok()?;
        let presented = bearer(header)?;
        self.key_role(presented).map(|(_, role)| role)
    }

    /// The name and role of an API key's value. Every key is compared,
    /// always, so timing says nothing about which key (or how much of one)
    /// matched.
    fn key_role(&self, presented: &str) -> Option<(String, Role)> {
        let mut found = None;
        for k in &self.keys {
            if crate::sign::constant_time_eq(k.key.as_bytes(), presented.as_bytes()) {
                found = Some((k.name.clone(), k.role.clone()));
            }
        }
        found
    }

    /// Serves one request of a connection: its phase is `Reading` until
    /// its body is read (`Busy` at once when it has none) and `Busy` until
    /// the answer is written.
    pub async fn serve(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        client: Client,
    ) -> Result<Resp, Infallible> {
        use hyper::body::Body as _;
        let slot = client.slot.clone();
        if let Some(slot) = &slot {
            slot.set(if req.body().is_end_stream() {
                conns::Phase::Busy
            } else {
                conns::Phase::Reading
            });
        }
        req.extensions_mut().insert(client);
        let resp = self.handle(req).await?;
        let served = Served(slot);
        Ok(resp.map(|inner| {
            Tracked {
                inner,
                _served: served,
            }
            .boxed()
        }))
    }

    /// `GET /healthz`: 200 while the node can take events; 503 while its
    /// store's writes fail (ingest then answers 503 too, and no attempt
    /// starts), with the error and since when, so a load balancer sends
    /// events to another node and an operator sees why.
    fn healthz(&self) -> Resp {
        match self.shared.store.failing() {
            None => json_response(StatusCode::OK, &json!({"status": "ok"})),
            Some(f) => {
                let mut resp = json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "store_failing", "store": {
                        "error": f.error,
                        "since": crate::time::rfc3339(f.since_ms),
                    }}),
                );
                resp.headers_mut().insert(
                    hyper::header::RETRY_AFTER,
                    hyper::header::HeaderValue::from_static("1"),
                );
                resp
            }
        }
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Resp, Infallible> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        if path == "/healthz" {
            return Ok(self.healthz());
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            // The WebSocket channel authenticates the way its clients
            // already do (see `deliver::channel`), not with a Bearer key.
            (&Method::POST, ["authentication", "sign_in"]) => return Ok(self.sign_in(req).await),
            (&Method::GET, ["messaging", "shared_spaces", space, "webhooks"]) => {
                let space = space.to_string();
                return Ok(self.open_channel(req, space));
            }
            // The console's page and assets hold no data; signing in
            // turns a key into a session.
            (&Method::GET, ["ui", ..]) | (&Method::GET, [""]) => {
                return Ok(console::asset(&path));
            }
            (&Method::POST, ["v1", "session"]) => return Ok(self.console_sign_in(req).await),
            _ => {}
        }
        let role = match self.bearer_role(&req) {
            Some(role) => role,
            None => match self.session_role(&req) {
                Ok(Some(role)) => role,
                Ok(None) => {
                    return Ok(error(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "missing or unknown API key; send Authorization: Bearer KEY (or sign in to the console at /ui/)",
                        None,
                    ));
                }
                Err(refused) => return Ok(refused.answer()),
            },
        };
        let is_ingest = method == Method::POST && path == "/v1/events";
        let reads = method == Method::GET || method == Method::HEAD;
        let allowed = match role {
            Role::Admin => true,
            Role::Viewer => reads,
            Role::Ingest => is_ingest,
            Role::WebSocket => false,
        };
        if !allowed {
            let why = if role == Role::Viewer {
                "viewer keys can read every route but change nothing; this needs an admin key"
            } else {
                "this route needs an admin key; ingest keys may only POST /v1/events, and websocket keys only sign in to the WebSocket channel"
            };
            return Ok(error(StatusCode::FORBIDDEN, "forbidden", why, None));
        }
        // Authenticated, and not waiting for a body it would read: from now
        // on the request is being served (a reload, a test connection) and
        // its connection is not given up for room. Routes that read their
        // body stay `Reading` until it is in (see `read_body_max`).
        let reads_body = method == Method::POST
            && matches!(
                segments.as_slice(),
                ["v1", "events"]
                    | ["v1", "deliveries", "redeliver"]
                    | ["v1", "endpoints", "unblock"]
                    | ["v1", "lanes", "resume" | "skip"]
            );
        if !reads_body
            && let Some(slot) = req
                .extensions()
                .get::<Client>()
                .and_then(|c| c.slot.as_ref())
        {
            slot.set(conns::Phase::Busy);
        }
        let query = req.uri().query().unwrap_or("").to_string();
        let resp = match (method, segments.as_slice()) {
            (Method::POST, ["v1", "events"]) => self.post_events(req).await,
            (Method::GET, ["v1", "deliveries"]) => self.list_deliveries(&query).await,
            (Method::GET, ["v1", "deliveries", "counts"]) => self.counts().await,
            (Method::GET, ["v1", "deliveries", "stream"]) => self.stream(&query),
            (Method::POST, ["v1", "deliveries", "redeliver"]) => self.bulk_redeliver(req).await,
            (Method::GET, ["v1", "deliveries", id]) => self.show_delivery(id).await,
            (Method::POST, ["v1", "deliveries", id, "redeliver"]) => {
                self.redeliver(id, req.uri().query().unwrap_or("")).await
            }
            (Method::GET, ["v1", "overview"]) => self.overview().await,
            (Method::GET, ["v1", "session"]) => self.session_info(&req),
            (Method::POST, ["v1", "session", "sign-out"]) => self.console_sign_out(&req),
            (Method::GET, ["v1", "rules"]) => self.rules(),
            (Method::POST, ["v1", "rules", "reload"]) => self.reload().await,
            (Method::POST, ["v1", "rules", name, "test"]) => self.test_connection(name).await,
            (Method::GET, ["v1", "endpoints"]) => self.endpoints().await,
            (Method::GET, ["v1", "cluster"]) => self.cluster().await,
            (Method::POST, ["v1", "endpoints", "unblock"]) => self.unblock(req).await,
            (Method::GET, ["v1", "lanes"]) => self.list_lanes(&query).await,
            (Method::POST, ["v1", "lanes", "resume"]) => self.resume_lane(req).await,
            (Method::POST, ["v1", "lanes", "skip"]) => self.skip_lane(req).await,
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

    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, Resp> {
        self.read_body_max(req, self.shared.config.max_body_bytes)
            .await
    }

    /// The request's body, at most `max` bytes within `server.body_timeout`.
    /// A declared `Content-Length` over `max` is refused before a byte of
    /// the body is read.
    async fn read_body_max(&self, req: Request<Incoming>, max: usize) -> Result<Bytes, Resp> {
        use hyper::body::Body as _;
        if let Some(declared) = req.body().size_hint().exact()
            && declared > max as u64
        {
            return Err(closing(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the body is {declared} bytes (Content-Length), larger than the {max} bytes this route takes (max_body)"
                ),
                None,
            )));
        }
        let slot = req
            .extensions()
            .get::<Client>()
            .and_then(|c| c.slot.clone());
        let timeout = self.shared.config.server.body_timeout;
        let read = Limited::new(req.into_body(), max).collect();
        let Ok(read) = tokio::time::timeout(timeout, read).await else {
            return Err(closing(error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the body did not arrive within {} s (server.body_timeout); send it whole and at once",
                    timeout.as_secs_f64()
                ),
                None,
            )));
        };
        if let Some(slot) = slot {
            slot.set(conns::Phase::Busy);
        }
        match read {
            Ok(b) => Ok(b.to_bytes()),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(closing(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the body is larger than {max} bytes (max_body)"),
                    None,
                )))
            }
            Err(e) => Err(error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("cannot read the body: {e}"),
                None,
            )),
        }
    }
}

/// `value` with an RFC 3339 copy (`…_rfc3339`) beside every timestamp in
/// milliseconds (`at` and keys ending in `_at` or `_until`), at any depth: people
/// read the one, programs keep using the other.
pub fn with_times(mut value: Value) -> Value {
    add_times(&mut value);
    value
}

fn add_times(value: &mut Value) {
    match value {
        Value::Object(map) => {
            let stamps: Vec<(String, String)> = map
                .iter()
                .filter(|(k, _)| *k == "at" || k.ends_with("_at") || k.ends_with("_until"))
                .filter_map(|(k, v)| {
                    Some((format!("{k}_rfc3339"), crate::time::rfc3339(v.as_u64()?)))
                })
                .collect();
            for v in map.values_mut() {
                add_times(v);
            }
            for (k, v) in stamps {
                map.insert(k, Value::String(v));
            }
        }
        Value::Array(items) => items.iter_mut().for_each(add_times),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_is_logged_on_one_line_and_cut() {
        assert_eq!(logged("ci-bridge"), "ci-bridge");
        assert_eq!(
            logged("a\nb\r\u{1b}[2J\u{2028}"),
            "a\\nb\\r\\u{1b}[2J\\u{2028}"
        );
        let long = "é".repeat(300);
        let cut = logged(&long);
        assert!(cut.starts_with(&"é".repeat(128)), "{cut}");
        assert!(cut.ends_with("… (600 bytes)"), "{cut}");
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("BEARER abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
    }

    #[test]
    fn times_get_an_rfc3339_twin_at_any_depth() {
        let v = with_times(json!({
            "created_at": 0, "name": "x", "blocked_until": 1_795_341_600_123u64,
            "attempts": [{"started_at": 1000}], "next_attempt_at": null
        }));
        assert_eq!(v["created_at_rfc3339"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["blocked_until_rfc3339"], "2026-11-22T10:00:00.123Z");
        assert_eq!(
            v["attempts"][0]["started_at_rfc3339"],
            "1970-01-01T00:00:01.000Z"
        );
        assert!(v.get("next_attempt_at_rfc3339").is_none());
        assert!(v.get("name_rfc3339").is_none());
    }
}
