//! The HTTP API (JSON, versioned under `/v1`), `/healthz` and `/metrics`.
//! Every route but `/healthz` needs an API key (`Authorization: Bearer
//! KEY`); ingest keys may only post events.
//!
//! This file routes, checks keys and roles, and shapes errors; the routes
//! live beside it by what they serve: `events` (ingest), `deliveries`
//! (records, redeliver), `admin` (rules, endpoints, metrics) and `channel`
//! (the WebSocket channel's sign-in and upgrade).

mod admin;
mod channel;
mod deliveries;
mod events;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
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
            (Method::POST, ["v1", "deliveries", id, "redeliver"]) => self.redeliver(id).await,
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
}
