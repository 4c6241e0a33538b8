//! Accepting events: validate, match, build, store durably, hand over.
//!
//! Matching and payload building happen here, before the commit, so one
//! commit stores the event together with every delivery it produces:
//! after a crash either all of them exist or none does (and the sender,
//! who got no 202, sends again; the event id makes that idempotent). The
//! alternative, committing the raw event and dispatching later, costs a
//! second commit per event and a recovery state machine for nothing:
//! matching takes microseconds.

use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::deliver::{Queue, Work, channel};
use crate::event::{Event, EventError};
use crate::metrics::{Metrics, Outcome as Counted};
use crate::outbox::{Outbox, OutboxError};
use crate::plugins::{CallContext, ChainOutcome, PluginSet};
use crate::reload::Snapshot;
use crate::rules::target::RuleVersion;
use crate::rules::{OnFailure, Transport};
use crate::store::{DeliveryId, Done, NewDelivery, NewEvent, NewLane, Op, State};
use crate::telemetry;
use opentelemetry::KeyValue;

/// A delivery to hand to the dispatcher after the commit.
struct Fresh {
    id: DeliveryId,
    rule: String,
    version: Option<RuleVersion>,
    body: Bytes,
    space: Option<String>,
    /// The ordered lane it joined (as its head: waiting ones are not
    /// handed over).
    lane: Option<NewLane>,
}

/// The deliveries of one event to hand to the dispatcher after the commit.
type Handover = Vec<Fresh>;

pub struct Ingest {
    pub rules: Arc<ArcSwap<crate::reload::Snapshot>>,
    pub outbox: Outbox,
    pub queue: Queue,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The event (or, in a batch, the line) is wrong; nothing was stored.
    #[error("{}{error}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
    BadEvent {
        line: Option<usize>,
        error: EventError,
    },
    #[error(transparent)]
    Store(#[from] OutboxError),
}

/// The answer for one accepted event.
#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct Accepted {
    pub event_id: String,
    pub deliveries: Vec<DeliveryId>,
    /// The event id was accepted before: nothing new was created.
    pub duplicate: bool,
}

/// Parses one JSON event (`line` for NDJSON batches, 1-based).
pub fn parse_event(value: Value, line: Option<usize>) -> Result<Event, IngestError> {
    Event::from_value(value).map_err(|error| IngestError::BadEvent { line, error })
}

/// Parses a request body: one JSON event, or NDJSON (one per line).
pub fn parse_body(body: &[u8], ndjson: bool) -> Result<Vec<Event>, IngestError> {
    let bad = |line, problem: String| IngestError::BadEvent {
        line,
        error: EventError {
            field: "(body)".into(),
            problem,
        },
    };
    // Strict JSON: duplicate keys and integers past 64 bits are refused
    // by name (see `event::parse_json`).
    let json = |text: &[u8], line| {
        crate::event::parse_json(text).map_err(|error| IngestError::BadEvent { line, error })
    };
    if !ndjson {
        return Ok(vec![parse_event(json(body, None)?, None)?]);
    }
    let text = std::str::from_utf8(body).map_err(|_| bad(None, "not UTF-8".into()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = json(line.as_bytes(), Some(i + 1))?;
        out.push(parse_event(value, Some(i + 1))?);
    }
    if out.is_empty() {
        return Err(bad(None, "no events in the body".into()));
    }
    Ok(out)
}

impl Ingest {
    /// Matches, builds, transforms and durably stores the events (all in
    /// one commit), then hands their deliveries to the dispatcher.
    pub async fn accept(&self, events: Vec<Event>) -> Result<Vec<Accepted>, IngestError> {
        // One snapshot for the whole batch: a reload in the middle never
        // splits an event between old and new rules, or old and new plugins.
        let snapshot = self.rules.load_full();
        // One trace per request (exported only with `otlp_endpoint`).
        let span = telemetry::root(
            events.first().and_then(|e| e.id.as_deref()),
            "ingest",
            || [KeyValue::new("events", events.len() as i64)],
        );
        let metrics = self.metrics.clone();
        let (ops, handovers) = if snapshot.chains || snapshot.queries_jsonpath() {
            // Plugin calls are CPU-bound and may run up to their deadline,
            // and a JSONPath query may take milliseconds on a large event
            // (up to `rules::eval::MAX_JSONPATH_WORK`): keep them off the
            // reactor threads, so `/healthz` and other requests never wait.
            let span = span.clone();
            tokio::task::spawn_blocking(move || {
                span.in_scope(|| prepare(&snapshot, events, &metrics))
            })
            .await
            .expect("preparing events does not panic")
        } else {
            span.in_scope(|| prepare(&snapshot, events, &metrics))
        };
        let commit = span.child("commit", || [KeyValue::new("ops", ops.len() as i64)]);
        let results = commit.instrument(self.outbox.write(ops)).await?;
        let mut out = Vec::with_capacity(results.len());
        for (done, (event_id, handover)) in results.into_iter().zip(handovers) {
            let Done::Accepted {
                deliveries,
                duplicate,
                claim,
                waiting,
            } = done
            else {
                continue;
            };
            if duplicate {
                self.metrics.event_duplicate();
            } else {
                self.metrics.event_accepted();
                for fresh in &handover {
                    self.metrics.delivery_created(&fresh.rule);
                }
                // Those behind their lane's head are sent when it is final
                // (the store makes them due then).
                for fresh in handover.into_iter().filter(|f| !waiting.contains(&f.id)) {
                    self.queue.enqueue(Work {
                        id: fresh.id,
                        rule: fresh.rule,
                        version: fresh.version,
                        event_id: event_id.clone(),
                        attempts: 0,
                        body: Some(fresh.body),
                        space: fresh.space,
                        claim,
                        lane: fresh.lane,
                    });
                }
            }
            out.push(Accepted {
                event_id,
                deliveries,
                duplicate,
            });
        }
        Ok(out)
    }
}

/// Matches each event, builds each matching rule's payload and runs its
/// plugin chain: the store operations to commit, and what to hand over.
fn prepare(
    snapshot: &Snapshot,
    events: Vec<Event>,
    metrics: &Metrics,
) -> (Vec<Op>, Vec<(String, Handover)>) {
    let mut ops = Vec::with_capacity(events.len());
    let mut handovers: Vec<(String, Handover)> = Vec::with_capacity(events.len());
    let one = events.len() == 1;
    for mut event in events {
        let id = event
            .id
            .clone()
            .unwrap_or_else(|| format!("evt_{}", uuid::Uuid::now_v7().simple()));
        event.id = Some(id.clone());
        if one {
            telemetry::Span::current().record("event.id", || id.clone());
        }
        let _event = telemetry::child("event", || {
            [
                KeyValue::new("event.id", id.clone()),
                KeyValue::new("event.type", event.event_type.to_string()),
                KeyValue::new("entity.type", event.entity_type.to_string()),
            ]
        })
        .entered();
        let mut deliveries = Vec::new();
        let mut handover = Vec::new();
        let view = crate::rules::eval::EventView::new(&event);
        let matched = telemetry::child("match", || []).in_scope(|| snapshot.matching(&event));
        for rule in matched {
            let did = DeliveryId::new();
            let _plugins = telemetry::child("plugins", || {
                [
                    KeyValue::new("rule", rule.name.clone()),
                    KeyValue::new("delivery.id", did.to_string()),
                ]
            })
            .entered();
            // Serialized straight from the event: building it as a `Value`
            // first took six to seven times as long (BENCHMARKS.md,
            // "allocations counted per delivery"). A rule with no chain
            // sends it as is.
            let payload = crate::payload::to_string(&rule.name, &event, &id);
            let outcome = if PluginSet::has_chain(rule) {
                let ctx = CallContext::for_event(&rule.name, &id, &event);
                snapshot
                    .plugins
                    .run_chain_observed(rule, &ctx, payload, &|plugin, took, failed| {
                        metrics.plugin_call(plugin, took, failed)
                    })
            } else {
                ChainOutcome::Send(payload.into_bytes())
            };
            // The payload as built, kept when the chain failed (to redeliver).
            let base = || Bytes::from(crate::payload::to_string(&rule.name, &event, &id));
            // Counted when decided: a batch whose commit then fails gets a
            // 503, and is counted again when its sender posts it again.
            let settled = |outcome| {
                // The key its attempts would have used: the URL's origin,
                // or the WebSocket space's.
                let endpoint = match rule.webhook.transport {
                    Transport::Http => rule.webhook.url.as_ref().map(crate::deliver::endpoint_key),
                    Transport::WebSocket => {
                        channel::space_for(rule.webhook.space.as_deref(), &event.scope)
                            .ok()
                            .map(|space| channel::endpoint(&space))
                    }
                };
                metrics
                    .series(
                        &rule.name,
                        endpoint.as_deref().unwrap_or(crate::metrics::NO_ENDPOINT),
                    )
                    .delivery(outcome);
                endpoint
            };
            let (mut state, mut reason, body, unbuilt) = match outcome {
                ChainOutcome::Send(body) => (State::Pending, None, Bytes::from(body), false),
                ChainOutcome::Skip(why) => {
                    settled(Counted::Skipped);
                    (State::Skipped, Some(why), Bytes::new(), false)
                }
                ChainOutcome::Failed(why) => {
                    let endpoint = settled(Counted::Failed);
                    tracing::warn!(event = %id, delivery = %did, rule = %rule.name, endpoint = %endpoint.as_deref().unwrap_or(crate::metrics::NO_ENDPOINT), error = %why, "plugin chain failed; the delivery is recorded as failed and can be redelivered");
                    (State::Failed, Some(why), base(), true)
                }
            };
            // A WebSocket delivery is bound to a shared space now: the event
            // is not kept, and its scope decides which clients get it.
            let space = match rule.webhook.transport {
                Transport::Http => None,
                Transport::WebSocket => {
                    match channel::space_for(rule.webhook.space.as_deref(), &event.scope) {
                        Ok(space) => Some(space),
                        Err(why) => {
                            if state == State::Pending {
                                (state, reason) = (State::Failed, Some(why));
                            }
                            None
                        }
                    }
                }
            };
            // Bound to the version that matched: a reload after the commit
            // cannot change where it goes (see `targets`).
            let version = snapshot.targets.get(&rule.name).map(|t| t.version.clone());
            let lane = rule.lane(&view).map(|key| NewLane {
                key,
                halt: rule
                    .ordering
                    .as_ref()
                    .is_some_and(|o| o.on_failure == OnFailure::Halt),
            });
            if state == State::Pending {
                handover.push(Fresh {
                    id: did,
                    rule: rule.name.clone(),
                    version: version.clone(),
                    body: body.clone(),
                    space: space.clone(),
                    lane: lane.clone(),
                });
            }
            deliveries.push(NewDelivery {
                id: did,
                rule: rule.name.clone(),
                state,
                reason,
                body,
                unbuilt,
                space,
                rule_version: version.map(|v| v.0),
                lane,
            });
        }
        ops.push(Op::Accept(NewEvent {
            id: id.clone(),
            deliveries,
        }));
        handovers.push((id, handover));
    }
    (ops, handovers)
}
