//! The WebSocket channel's routes: `POST /authentication/sign_in` (an API
//! key's name and value → session cookie) and the upgrade of
//! `/messaging/shared_spaces/{space}/webhooks`. They authenticate the way
//! the channel's clients already do, not with a Bearer API key.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::{Api, Resp, error, json_response};
use crate::config::Role;

impl Api {
    /// The API key a WebSocket client names by `client_id` (the key's name)
    /// and `client_secret` (its value), if it may use the channel.
    pub(super) fn channel_client(&self, client_id: &str, client_secret: &str) -> Option<String> {
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
    pub(super) async fn sign_in(&self, req: Request<Incoming>) -> Resp {
        let peer = super::peer(&req);
        if let Some(refused) = self.sign_in_locked(peer, "channel") {
            return refused;
        }
        let body = match self.read_body_max(req, super::SIGN_IN_MAX_BODY).await {
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
            self.sign_ins.failed(peer);
            // The id is the client's text: escaped, so it cannot forge a line.
            tracing::warn!(client_id = %super::logged(&id), %peer, "WebSocket sign-in refused");
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
    pub(super) fn channel_auth(&self, req: &Request<Incoming>) -> Option<String> {
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
            let (id, secret) = super::bearer(auth)?.split_once(':')?;
            self.channel_client(id, secret)
        })
    }

    /// `GET /messaging/shared_spaces/{space}/webhooks`: upgrades to a
    /// WebSocket that receives the space's deliveries.
    pub(super) fn open_channel(&self, mut req: Request<Incoming>, space: String) -> Resp {
        let Some(client) = self.channel_auth(&req) else {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "sign in with POST /authentication/sign_in and send its LWSSO_COOKIE_KEY cookie, or send Authorization: Bearer CLIENT_ID:CLIENT_SECRET",
                None,
            );
        };
        // A key bound to spaces opens only their channels.
        let bound = self
            .keys
            .iter()
            .find(|k| k.name == client)
            .and_then(|k| k.spaces.as_ref());
        if let Some(spaces) = bound
            && !spaces.contains(&space)
        {
            tracing::warn!(client = %super::logged(&client), space = %super::logged(&space), "WebSocket channel refused: the key is not bound to this space");
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "key `{client}` may open the channels of spaces {} only (its `spaces` in api_keys)",
                    spaces.join(", ")
                ),
                None,
            );
        }
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
        let mut resp = Response::new(super::full(Bytes::new()));
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
}
