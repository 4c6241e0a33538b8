//! The web console: its assets at `/ui/` (embedded in the binary with
//! `include_str!`, so it works offline and needs no build step), the
//! sessions it signs in with, and `GET /v1/overview`, the one route only
//! it needs.
//!
//! Sign-in turns an admin or viewer API key into a session: an
//! `HttpOnly; SameSite=Strict` cookie the page's script cannot read and
//! other sites cannot send. Writes with a session cookie must also carry
//! the session's CSRF token in `X-Rulehook-CSRF` (a header another site
//! cannot set on a cross-site request without CORS, which rulehook never
//! allows) and, when the browser sends one, an `Origin` equal to the
//! server's own. The API itself keeps working with Bearer keys, untouched.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{Api, Refusal, Resp, error, full, json_response};
use crate::config::Role;

/// The console session's cookie.
pub const SESSION_COOKIE: &str = "rulehook_console";
/// The header a cookie-authenticated write carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-rulehook-csrf";
/// How long a console session lasts.
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at once; signing in past that ends the oldest.
const MAX_SESSIONS: usize = 1_000;
/// The console's shared state.
pub struct Console {
    /// Set when the server starts to stop: live tails end so connections
    /// can finish within the shutdown grace.
    closing: watch::Receiver<bool>,
    /// Live-tail streams open now.
    streams: Arc<AtomicUsize>,
    sessions: Mutex<HashMap<String, Session>>,
}

#[derive(Clone)]
struct Session {
    /// The API key's name (never its value).
    name: String,
    role: Role,
    csrf: String,
    expires: Instant,
}

/// A live-tail slot, given back when the stream ends.
pub(super) struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Console {
    pub fn new(closing: watch::Receiver<bool>) -> Console {
        Console {
            closing,
            streams: Arc::default(),
            sessions: Mutex::default(),
        }
    }

    pub(super) fn closing(&self) -> watch::Receiver<bool> {
        self.closing.clone()
    }

    pub(super) fn stream_slot(&self) -> Option<StreamSlot> {
        let n = self.streams.fetch_add(1, Ordering::Relaxed);
        let slot = StreamSlot(self.streams.clone());
        (n < super::deliveries::MAX_STREAMS).then_some(slot)
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(&self, name: String, role: Role) -> (String, Session) {
        let token = random_hex();
        let session = Session {
            name,
            role,
            csrf: random_hex(),
            expires: Instant::now() + SESSION_TTL,
        };
        let mut sessions = self.sessions();
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(t, _)| t.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(token.clone(), session.clone());
        (token, session)
    }

    fn find(&self, token: &str) -> Option<Session> {
        let sessions = self.sessions();
        sessions
            .get(token)
            .filter(|s| s.expires > Instant::now())
            .cloned()
    }
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The session token in the request's cookie, if any.
fn session_token(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Whether the request's `Origin`, if it has one, is this server.
fn same_origin(req: &Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get(http::header::ORIGIN) else {
        return true;
    };
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin = origin.to_str().unwrap_or_default();
    !host.is_empty() && (origin == format!("http://{host}") || origin == format!("https://{host}"))
}

fn cookie(token: &str, max_age: u64) -> Option<http::HeaderValue> {
    http::HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    ))
    .ok()
}

impl Api {
    /// `POST /v1/session` `{"key": "…"}`: signs the console in with an
    /// admin or viewer key.
    pub(super) async fn console_sign_in(&self, req: Request<Incoming>) -> Resp {
        if !same_origin(&req) {
            return error(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "sign in from the console's own page (the Origin is another site)",
                None,
            );
        }
        let peer = super::peer(&req);
        if let Some(refused) = self.sign_in_locked(peer, "console") {
            return refused;
        }
        let body = match self.read_body_max(req, super::SIGN_IN_MAX_BODY).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let Some(key) = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["key"].as_str().map(str::to_string))
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "expected {\"key\": \"an admin or viewer API key\"}",
                Some("key"),
            );
        };
        let Some((name, role)) = self.key_role(key.trim()) else {
            self.sign_ins.failed(peer);
            tracing::warn!("console sign-in refused: unknown API key");
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown API key; use an admin or viewer key from the config (or data/api-keys.json)",
                Some("key"),
            );
        };
        if !matches!(role, Role::Admin | Role::Viewer) {
            tracing::warn!(key = %name, "console sign-in refused: not an admin or viewer key");
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "key `{name}` may not use the console; sign in with an admin or viewer key"
                ),
                Some("key"),
            );
        }
        let (token, session) = self.console.start(name, role);
        tracing::info!(key = %session.name, role = role_name(&session.role), "console signed in");
        let mut resp = json_response(StatusCode::OK, &session_json(&session));
        if let Some(c) = cookie(&token, SESSION_TTL.as_secs()) {
            resp.headers_mut().insert(http::header::SET_COOKIE, c);
        }
        resp
    }

    /// The role of the request's console session. `Ok(None)` without a
    /// valid session; `Err` for a write that fails the CSRF checks.
    pub(super) fn session_role(&self, req: &Request<Incoming>) -> Result<Option<Role>, Refusal> {
        let Some(session) = session_token(req).and_then(|t| self.console.find(&t)) else {
            return Ok(None);
        };
        let writes = !matches!(*req.method(), http::Method::GET | http::Method::HEAD);
        if writes {
            let token_ok = req.headers().get(CSRF_HEADER).is_some_and(|v| {
                crate::sign::constant_time_eq(v.as_bytes(), session.csrf.as_bytes())
            });
            if !token_ok || !same_origin(req) {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    "csrf",
                    "a console write needs the session's X-Rulehook-CSRF header and this server's Origin; reload the console",
                ));
            }
        }
        Ok(Some(session.role))
    }

    /// `GET /v1/session`: who is signed in, with the CSRF token the page
    /// sends on writes (readable only by the console's own origin).
    pub(super) fn session_info(&self, req: &Request<Incoming>) -> Resp {
        match session_token(req).and_then(|t| self.console.find(&t)) {
            Some(s) => json_response(StatusCode::OK, &session_json(&s)),
            None => {
                let role = self.bearer_role(req);
                json_response(
                    StatusCode::OK,
                    &json!({"role": role.as_ref().map(role_name)}),
                )
            }
        }
    }

    /// `POST /v1/session/sign-out`: ends the session and clears the cookie.
    pub(super) fn console_sign_out(&self, req: &Request<Incoming>) -> Resp {
        if let Some(token) = session_token(req) {
            self.console.sessions().remove(&token);
        }
        let mut resp = json_response(StatusCode::OK, &json!({"signed_out": true}));
        if let Some(c) = cookie("", 0) {
            resp.headers_mut().insert(http::header::SET_COOKIE, c);
        }
        resp
    }

    /// `GET /v1/overview`: the last hour per minute (deliveries made,
    /// succeeded, failed), the backlog and attempt latency. Drawn from the
    /// delivery records themselves (their ids are time-ordered, so the last
    /// hour is a range; at most `OVERVIEW_ROWS` newest are read) and the
    /// due and parked indexes; nothing else is kept for it.
    pub(super) async fn overview(&self) -> Resp {
        const OVERVIEW_ROWS: usize = 50_000;
        let store = self.shared.store.clone();
        let now = crate::store::now_ms();
        let start = (now / 60_000).saturating_sub(59) * 60_000;
        let read = tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
            Ok((store.recent(start, OVERVIEW_ROWS)?, store.backlog()?))
        })
        .await;
        let (recent, (due, parked)) = match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage",
                    e.to_string(),
                    None,
                );
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    e.to_string(),
                    None,
                );
            }
        };
        let mut minutes = vec![[0u64; 3]; 60];
        let slot = |t: u64| {
            t.checked_sub(start)
                .map(|d| (d / 60_000) as usize)
                .filter(|i| *i < 60)
        };
        let mut latencies = Vec::new();
        let truncated = recent.len() >= OVERVIEW_ROWS;
        for (d, last) in &recent {
            if let Some(i) = slot(d.id.created_ms()) {
                minutes[i][0] += 1;
            }
            match d.state {
                crate::store::State::Succeeded => {
                    if let Some(i) = slot(d.updated_at) {
                        minutes[i][1] += 1;
                    }
                }
                crate::store::State::Failed => {
                    if let Some(i) = slot(d.updated_at) {
                        minutes[i][2] += 1;
                    }
                }
                _ => {}
            }
            if let Some(a) = last {
                latencies.push(a.duration_ms);
            }
        }
        latencies.sort_unstable();
        let pct =
            |p: usize| (!latencies.is_empty()).then(|| latencies[(latencies.len() - 1) * p / 100]);
        let per_minute: Vec<Value> = minutes
            .iter()
            .enumerate()
            .map(|(i, [made, ok, failed])| {
                let at = start + i as u64 * 60_000;
                json!({"minute_at": at, "minute_at_rfc3339": crate::time::rfc3339(at),
                       "accepted": made, "delivered": ok, "failed": failed})
            })
            .collect();
        json_response(
            StatusCode::OK,
            &json!({
                "per_minute": per_minute,
                "queue_depth": due,
                "parked": parked,
                "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": latencies.last(), "attempts": latencies.len()},
                "truncated": truncated,
                "source": "delivery records of the last hour (time-ordered ids) with their last attempt; queue depth from the due and parked indexes",
            }),
        )
    }
}

fn role_name(role: &Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Viewer => "viewer",
        Role::Ingest => "ingest",
        Role::WebSocket => "websocket",
    }
}

fn session_json(s: &Session) -> Value {
    json!({"name": s.name, "role": role_name(&s.role), "csrf": s.csrf})
}

/// The console's files, compiled in.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("console/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("console/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("console/style.css"),
    ),
];

/// `GET /ui/…` (and `/`, which points there): an embedded asset. Paths
/// the page routes itself (`/ui/deliveries/…`) get `index.html`.
pub(super) fn asset(path: &str) -> Resp {
    if path == "/" || path == "/ui" {
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::FOUND;
        r.headers_mut().insert(
            http::header::LOCATION,
            http::HeaderValue::from_static("/ui/"),
        );
        return r;
    }
    let name = path.trim_start_matches("/ui/");
    let (_, content_type, body) = ASSETS
        .iter()
        .find(|(n, _, _)| *n == name)
        .unwrap_or(&ASSETS[0]);
    let mut r = Response::new(full(*body));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    // Only its own scripts, styles and API: no inline script, no other site.
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    r
}
