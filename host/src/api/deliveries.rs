//! Delivery records: `GET /v1/deliveries` (filtered, paged),
//! `GET /v1/deliveries/{id}` (with attempts and body) and
//! `POST /v1/deliveries/{id}/redeliver`.

use http::StatusCode;
use serde_json::{Value, json};

use super::{Api, Resp, error, json_response};
use crate::plugins::ChainOutcome;
use crate::store::{DeliveryId, Done, Filter, Op, Rebuilt, State};

impl Api {
    pub(super) async fn list_deliveries(&self, query: &str) -> Resp {
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
                json_response(
                    StatusCode::OK,
                    &json!({"delivery": d, "body": body, "attempts": attempts}),
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

    pub(super) async fn redeliver(&self, id: &str) -> Resp {
        let Some(id) = DeliveryId::parse(id) else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_id",
                format!("`{id}` is not a delivery id"),
                None,
            );
        };
        if self.shared.is_active(id) {
            return error(
                StatusCode::CONFLICT,
                "in_flight",
                format!("delivery {id} is being attempted right now; try again when it finishes"),
                None,
            );
        }
        let body = match self.rebuild(id).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        match self
            .shared
            .outbox
            .write(vec![Op::Redeliver { id, body }])
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
    /// the rule and plugins running now, so a fixed plugin takes effect.
    pub(super) async fn rebuild(&self, id: DeliveryId) -> Result<Rebuilt, Resp> {
        let store = self.shared.store.clone();
        let found = tokio::task::spawn_blocking(move || {
            let d = store.delivery(id)?;
            let body = store.body(id)?;
            Ok::<_, crate::store::StoreError>((d, body))
        })
        .await;
        let (delivery, body) = match found {
            Ok(Ok((Some(d), body))) => (d, body),
            Ok(Ok((None, _))) => return Ok(Rebuilt::Same),
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
        if !delivery.unbuilt {
            return Ok(Rebuilt::Same);
        }
        let snapshot = self.ingest.rules.load_full();
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
        Ok(match outcome {
            ChainOutcome::Send(b) => Rebuilt::Body(b),
            ChainOutcome::Skip(why) => Rebuilt::Skipped(why),
            ChainOutcome::Failed(why) => Rebuilt::Failed(why),
        })
    }
}
