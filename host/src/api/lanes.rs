//! Ordered lanes (rules with `ordering`): `GET /v1/lanes` lists them with
//! their head and how many wait behind it, `POST /v1/lanes/resume` sends a
//! halted lane's head again and `POST /v1/lanes/skip` gives it up and sends
//! the next. A lane is named `rule/key`; the body names it as
//! `{"lane": "rule/key"}` (a key may hold any character, so it is not put
//! in the path).

use http::StatusCode;
use serde_json::{Value, json};

use super::{Api, Resp, error, json_response, with_times};
use crate::store::{Done, LaneFilter, NO_LANE, Op, StoreError, lane_park_key, split_lane};

/// Lanes one page shows by default, and at most.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1_000;
/// Lanes one list request looks at, at most (a state filter skips some).
const SCAN_BUDGET: usize = 20_000;
/// The lane states a filter may name (see `LaneInfo::state_of`).
const STATES: &[&str] = &["flowing", "retrying", "parked", "halted"];

fn storage(e: impl std::fmt::Display) -> Resp {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage",
        e.to_string(),
        None,
    )
}

impl Api {
    /// `GET /v1/lanes?rule=&state=&after=&limit=`, in lane order;
    /// `next_after` pages on.
    pub(super) async fn list_lanes(&self, query: &str) -> Resp {
        let mut filter = LaneFilter::default();
        let mut after = None;
        let mut limit = PAGE_DEFAULT;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "rule" => filter.rule = Some(v.into_owned()),
                "state" if STATES.contains(&v.as_ref()) => filter.state = Some(v.into_owned()),
                "state" => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_query",
                        format!(
                            "lane state `{v}` is unknown; use one of {}",
                            STATES.join(", ")
                        ),
                        Some("state"),
                    );
                }
                "after" => after = Some(v.into_owned()),
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=PAGE_MAX).contains(&n) => limit = n,
                    _ => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "bad_query",
                            format!("limit `{v}`: expected a whole number from 1 to {PAGE_MAX}"),
                            Some("limit"),
                        );
                    }
                },
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_query",
                        format!(
                            "`{other}` is unknown; filter lanes by rule and state, page with after and limit"
                        ),
                        Some(other),
                    );
                }
            }
        }
        let store = self.shared.store.clone();
        let found = tokio::task::spawn_blocking(move || {
            // One more than asked tells whether another page follows.
            store.lanes(&filter, after.as_deref(), limit + 1, SCAN_BUDGET)
        })
        .await;
        let mut lanes = match found {
            Ok(Ok(lanes)) => lanes,
            Ok(Err(e)) => return storage(e),
            Err(e) => return storage(e),
        };
        let more = lanes.len() > limit;
        lanes.truncate(limit);
        let next_after = more.then(|| lanes.last().map(|l| l.lane.clone())).flatten();
        json_response(
            StatusCode::OK,
            &with_times(json!({"lanes": lanes, "next_after": next_after})),
        )
    }

    /// `POST /v1/lanes/resume`: a halted lane's head is sent again now,
    /// still ahead of the rest of its lane.
    pub(super) async fn resume_lane(&self, req: http::Request<hyper::body::Incoming>) -> Resp {
        let lane = match self.lane_of(req).await {
            Ok(lane) => lane,
            Err(resp) => return resp,
        };
        let op = Op::Unpark {
            endpoint: lane_park_key(&lane),
            limit: 1,
        };
        match self.shared.outbox.write(vec![op]).await {
            Ok(done) => match done.into_iter().next() {
                Some(Done::Unparked(ids)) if !ids.is_empty() => {
                    self.queue.kick();
                    let (rule, _) = split_lane(&lane);
                    tracing::info!(lane = %super::logged(&lane), rule = %super::logged(rule), delivery = %ids[0], "lane resumed by an admin");
                    json_response(
                        StatusCode::OK,
                        &json!({"lane": lane, "resumed": ids[0].to_string()}),
                    )
                }
                _ => self.not_halted(&lane).await,
            },
            Err(e) => storage(e),
        }
    }

    /// `POST /v1/lanes/skip`: a halted lane's head is given up (it stays
    /// failed, with its attempts) and the next delivery of the lane is sent.
    pub(super) async fn skip_lane(&self, req: http::Request<hyper::body::Incoming>) -> Resp {
        let lane = match self.lane_of(req).await {
            Ok(lane) => lane,
            Err(resp) => return resp,
        };
        let op = Op::SkipLane { lane: lane.clone() };
        match self.shared.outbox.write(vec![op]).await {
            Ok(done) => match done.into_iter().next() {
                Some(Done::LaneSkipped { head, promoted }) => {
                    if promoted.is_some() {
                        self.queue.kick();
                    }
                    let (rule, _) = split_lane(&lane);
                    tracing::info!(lane = %super::logged(&lane), rule = %super::logged(rule), delivery = %head, next = ?promoted.map(|id| id.to_string()), "lane head skipped by an admin");
                    json_response(
                        StatusCode::OK,
                        &json!({
                            "lane": lane,
                            "skipped": head.to_string(),
                            "next": promoted.map(|id| id.to_string()),
                        }),
                    )
                }
                Some(Done::Rejected(why)) if why.starts_with(NO_LANE) => {
                    error(StatusCode::NOT_FOUND, "not_found", why, Some("lane"))
                }
                Some(Done::Rejected(why)) => {
                    error(StatusCode::CONFLICT, "not_halted", why, Some("lane"))
                }
                _ => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "unexpected store answer",
                    None,
                ),
            },
            Err(e) => storage(e),
        }
    }

    /// The lane a resume or skip body names.
    async fn lane_of(&self, req: http::Request<hyper::body::Incoming>) -> Result<String, Resp> {
        let body = self.read_body(req).await?;
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["lane"].as_str().map(str::to_string))
            .ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    "expected {\"lane\": \"rule/key\"}; list lanes with GET /v1/lanes",
                    Some("lane"),
                )
            })
    }

    /// The answer to resuming a lane that is not halted: 404 when it has
    /// no head, else 409 with its state.
    async fn not_halted(&self, lane: &str) -> Resp {
        let store = self.shared.store.clone();
        let name = lane.to_string();
        let found = tokio::task::spawn_blocking(move || store.lane(&name)).await;
        match found {
            Ok(Ok(Some(info))) => error(
                StatusCode::CONFLICT,
                "not_halted",
                format!(
                    "lane {lane} is not halted: its head {} is {}; only a halted lane is resumed",
                    info.head.id, info.state
                ),
                Some("lane"),
            ),
            Ok(Ok(None)) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no lane {lane}: it has no delivery pending or held; list lanes with GET /v1/lanes"
                ),
                Some("lane"),
            ),
            Ok(Err(e)) => storage(e),
            Err(e) => storage(StoreError::Io {
                op: "lane",
                message: e.to_string(),
            }),
        }
    }
}
