//! `POST /v1/events`: one event as JSON, or a batch as NDJSON.

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::{Api, Resp, error, json_response};
use crate::ingest::IngestError;

impl Api {
    pub(super) async fn post_events(&self, req: Request<Incoming>) -> Resp {
        // Request (headers read) → 202, as the sender waits for it.
        let started = std::time::Instant::now();
        let ndjson = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                // Media types are case-insensitive (RFC 9110 §8.3.1).
                let essence = ct.split(';').next().unwrap_or_default().trim();
                essence.eq_ignore_ascii_case("application/x-ndjson")
                    || essence.eq_ignore_ascii_case("application/jsonl")
            });
        let body = match self.read_body(req).await {
            Ok(b) => b,
            Err(resp) => {
                self.ingest.metrics.event_rejected();
                return resp;
            }
        };
        let events = match crate::ingest::parse_body(&body, ndjson) {
            Ok(e) => e,
            Err(e) => return self.ingest_error(e),
        };
        let batch = ndjson;
        let accepted = self.ingest.accept(events).await;
        match accepted {
            Ok(accepted) => {
                self.ingest.metrics.ingested(started.elapsed());
                if batch {
                    json_response(StatusCode::ACCEPTED, &json!({ "events": accepted }))
                } else {
                    json_response(StatusCode::ACCEPTED, &json!(accepted[0]))
                }
            }
            Err(e) => self.ingest_error(e),
        }
    }

    pub(super) fn ingest_error(&self, e: IngestError) -> Resp {
        match e {
            IngestError::BadEvent { line, error: ev } => {
                self.ingest.metrics.event_rejected();
                let mut resp = json!({"error": {"code": "bad_event", "message": format!("{}{ev}", line.map(|l| format!("line {l}: ")).unwrap_or_default()), "field": ev.field}});
                if let Some(l) = line {
                    resp["error"]["line"] = json!(l);
                }
                json_response(StatusCode::BAD_REQUEST, &resp)
            }
            IngestError::Store(e) => {
                // Nothing of the request was stored (or, after an error at
                // COMMIT, maybe all of it): either way resending the same
                // event ids is safe, since ingest is idempotent by id.
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage",
                    e.to_string(),
                    None,
                );
                r.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("1"),
                );
                r
            }
        }
    }
}
