//! Cluster mode: the store in one PostgreSQL database shared by every
//! rulehook node (see ARCHITECTURE.md, "Cluster mode").
//!
//! - **Group commit** as in the embedded store: a batch is one transaction
//!   and a few multi-row statements (one per kind of op), not one per event.
//! - **Idempotent ingest**: the sender's event id is the `events` table's
//!   unique key, for as long as the event is kept (not a time window).
//! - **Claims, not locks**: a node takes due deliveries with one
//!   `UPDATE … FOR UPDATE SKIP LOCKED` that sets it as owner with a lease
//!   and bumps the delivery's epoch; no transaction stays open while it
//!   sends. Recording the attempt names that epoch, so a node that lost
//!   its lease (paused, cut off) cannot overwrite the record of the node
//!   that took over.
//! - The contract's methods block; they run the async client on a small
//!   runtime of the store's own, so a slow database never ties up the
//!   server's reactor threads.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::schema::POSTGRES_MIGRATIONS;
use super::*;

/// How a node finds and holds work in the shared database.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// This node's id: the owner of its claims.
    pub node: String,
    /// How long a claim holds without renewal. A node that dies keeps its
    /// deliveries this long; one that is alive renews every third of it.
    pub lease: Duration,
    /// Connections in the pool.
    pub pool_size: usize,
    /// The longest any one statement or batch may take before the store
    /// reports the database unreachable (nothing is assumed stored).
    pub op_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            node: "node".into(),
            lease: Duration::from_secs(30),
            pool_size: 8,
            op_timeout: Duration::from_secs(10),
        }
    }
}

pub struct Postgres {
    pool: Pool,
    /// The runtime the client's connections live on; `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    opts: PgOptions,
    /// The WebSocket spaces with a client on this node, as last recorded:
    /// claims of such deliveries go to a node that has a client.
    spaces: std::sync::Mutex<Vec<String>>,
    /// The parsed connection string (for the `LISTEN` connection).
    config: tokio_postgres::Config,
    /// The connection string with any password removed, for messages.
    shown: String,
}

/// The notification channel that wakes idle nodes when work was made due
/// by someone else (a redelivery, an unpark, released claims).
const WAKE_CHANNEL: &str = "rulehook_due";

/// Advisory lock key that lets one node at a time run retention compaction.
const COMPACT_LOCK: i64 = 0x7275_6c65_686f_6f6b; // "rulehook"

/// Advisory lock key held while migrations run, so nodes starting together
/// do not migrate twice.
const MIGRATE_LOCK: i64 = 0x7275_6c65_6d69_6772;

/// Nodes silent this long are forgotten (with their presence rows).
const FORGET_NODE_MS: i64 = 10 * 60 * 1000;

/// Columns of a delivery as `row_delivery` reads them.
const COLS: &str = "d.id, d.event_id, d.rule, d.state, d.attempts, d.next_attempt_at, d.created_at, \
     d.updated_at, d.parked_on, d.reason, d.last_status, d.unbuilt, d.space, d.rule_version, \
     d.lane, d.lane_seq, d.lane_halt";

/// How many columns `COLS` has: what a query selects after them starts here.
const NCOLS: usize = 17;

fn uuid(id: u128) -> Uuid {
    Uuid::from_u128(id)
}

/// The connection string without its password, for logs and errors.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "postgres://(unparsable)".into(),
    }
}

/// A client error as the contract's error: lost connections and timeouts
/// are `Unavailable` (trying again later may work), SQL errors are `Io`.
fn pg(op: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |e| {
        if e.is_closed() || e.code().is_none() {
            StoreError::Unavailable {
                op,
                message: e.to_string(),
            }
        } else if e.code().is_some_and(|c| c.code().starts_with("40")) {
            // Class 40, transaction rollback (a deadlock, a serialization
            // failure): the transaction lost a race and did nothing.
            StoreError::Conflict {
                op,
                message: e.to_string(),
            }
        } else {
            // The server's message with its detail, not tokio-postgres' "db error".
            let message = match e.as_db_error() {
                Some(db) => format!("{} ({})", db.message(), db.code().code()),
                None => e.to_string(),
            };
            StoreError::Io { op, message }
        }
    }
}

fn pool_error(op: &'static str) -> impl Fn(deadpool_postgres::PoolError) -> StoreError {
    move |e| match e {
        deadpool_postgres::PoolError::Backend(e) => pg(op)(e),
        other => StoreError::Unavailable {
            op,
            message: other.to_string(),
        },
    }
}

fn state_of(text: &str) -> Result<State, StoreError> {
    State::parse(text).ok_or_else(|| StoreError::Corrupt(format!("unknown state `{text}`")))
}

fn row_delivery(row: &tokio_postgres::Row) -> Result<Delivery, StoreError> {
    let id: Uuid = row.get(0);
    let opt_u64 = |i: usize| row.get::<_, Option<i64>>(i).map(|v| v as u64);
    Ok(Delivery {
        id: DeliveryId(id.as_u128()),
        event_id: row.get(1),
        rule: row.get(2),
        state: state_of(row.get(3))?,
        attempts: row.get::<_, i32>(4) as u32,
        next_attempt_at: opt_u64(5),
        created_at: row.get::<_, i64>(6) as u64,
        updated_at: row.get::<_, i64>(7) as u64,
        parked_on: row.get(8),
        reason: row.get(9),
        last_status: row.get::<_, Option<i32>>(10).map(|s| s as u16),
        unbuilt: row.get(11),
        space: row.get(12),
        rule_version: row.get(13),
        lane: row.get::<_, Option<String>>(14).map(|key| Lane {
            key,
            seq: row.get::<_, Option<i64>>(15).unwrap_or(0) as u64,
            halt: row.get(16),
        }),
    })
}

/// A lane from `COLS` of its head, then its key, how many wait and the
/// first waiting one's id.
fn row_lane(r: &tokio_postgres::Row) -> Result<LaneInfo, StoreError> {
    let head = row_delivery(r)?;
    let lane: String = r.get(NCOLS);
    let waiting: i64 = r.get(NCOLS + 1);
    let first: Option<Uuid> = r.get(NCOLS + 2);
    let oldest = first.map(|u| DeliveryId(u.as_u128()).created_ms());
    Ok(LaneInfo::new(lane, head, waiting as u64, oldest))
}

fn attempt_of(text: Option<String>) -> Result<Option<Attempt>, StoreError> {
    text.map(|t| from_json(t.as_bytes(), "attempt")).transpose()
}

impl Postgres {
    /// Connects, runs the embedded migrations (refusing a database of a
    /// newer schema) and returns the store. Fails with the reason when the
    /// database cannot be reached within `op_timeout`.
    pub fn connect(url: &str, opts: PgOptions) -> Result<Postgres, StoreError> {
        let shown = redact(url);
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| StoreError::Io {
            op: "parse the postgres connection string",
            message: format!("{shown}: {e}"),
        })?;
        // Every statement planned for the arrays it gets. The batched
        // statements join `unnest` of their arrays to `deliveries`; a
        // cached generic plan guesses 100 rows from `unnest`, and one made
        // while the table was small (a new database) scans all of it, on
        // that connection for good: measured, the attempt statement took
        // 740 µs of database time per delivery on such connections against
        // 44 on others. A custom plan sees the arrays' lengths; planning
        // costs a few µs per statement, once per batch.
        let options = match config.get_options() {
            Some(o) => format!("{o} -c plan_cache_mode=force_custom_plan"),
            None => "-c plan_cache_mode=force_custom_plan".to_string(),
        };
        config.options(&options);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rulehook-postgres")
            .enable_all()
            .build()
            .map_err(io("start the postgres client runtime"))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                // A connection the server closed (restart, failover) is
                // noticed when it is next taken and replaced.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = {
            let _guard = rt.enter();
            Pool::builder(manager)
                .max_size(opts.pool_size.max(2))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(opts.op_timeout))
                .create_timeout(Some(opts.op_timeout))
                .recycle_timeout(Some(opts.op_timeout))
                .build()
                .map_err(|e| StoreError::Io {
                    op: "create the postgres pool",
                    message: e.to_string(),
                })?
        };
        let store = Postgres {
            pool,
            rt: Some(rt),
            opts,
            spaces: Default::default(),
            config,
            shown,
        };
        let shown = store.shown.clone();
        store.run(move |c| Box::pin(migrate(c, shown)))?;
        store.release_own_claims()?;
        tracing::info!(database = %store.shown, node = %store.opts.node, "postgres store ready");
        Ok(store)
    }

    /// Hands back the claims a previous process with this node id still
    /// holds: a process that is just starting sends nothing, so they are
    /// leftovers of one that died, and a node with a fixed `node_id`
    /// restarted after a crash picks its work up at once instead of after
    /// the lease. Each released claim's epoch is raised, so a late result
    /// of that process is refused like any lost claim's.
    fn release_own_claims(&self) -> Result<(), StoreError> {
        let node = self.opts.node.clone();
        let released = self.run(move |c| {
            Box::pin(async move {
                c.execute(
                    "UPDATE deliveries SET owner = NULL, lease_until = NULL, epoch = epoch + 1 \
                     WHERE owner = $1 AND state = 'pending'",
                    &[&node],
                )
                .await
                .map_err(pg("release this node's old claims"))
            })
        })?;
        if released > 0 {
            tracing::info!(released, node = %self.opts.node, "released the claims an earlier process of this node held");
        }
        Ok(())
    }

    /// A setting as this store's connections see it (tests).
    #[cfg(test)]
    pub(super) fn setting(&self, name: &str) -> String {
        let sql = format!("SHOW {name}");
        self.run(move |c| {
            Box::pin(async move {
                let row = c.query_one(sql.as_str(), &[]).await.map_err(pg("show"))?;
                Ok(row.get::<_, String>(0))
            })
        })
        .unwrap()
    }

    /// This node's id (the owner of its claims).
    pub fn node(&self) -> &str {
        &self.opts.node
    }

    fn lease_ms(&self) -> u64 {
        self.opts.lease.as_millis() as u64
    }

    /// Runs `f` with a pooled connection on the store's runtime, within the
    /// op timeout, and waits for it. A timeout is `Unavailable`: nothing is
    /// assumed stored. Callable from any thread: a plain one (the outbox),
    /// a blocking task, or (briefly, as at start-up) async code, where the
    /// wait is announced to tokio with `block_in_place`.
    fn run<T: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(
            &'c mut deadpool_postgres::Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'c>,
        > + Send
        + 'static,
    ) -> Result<T, StoreError> {
        let rt = self
            .rt
            .as_ref()
            .expect("runtime lives as long as the store");
        let pool = self.pool.clone();
        let timeout = self.opts.op_timeout;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let work = async {
                let mut client = pool.get().await.map_err(pool_error("connect"))?;
                f(&mut client).await
            };
            let r = match tokio::time::timeout(timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Unavailable {
                    op: "wait for the database",
                    message: format!("no answer within {} ms", timeout.as_millis()),
                }),
            };
            let _ = tx.send(r);
        });
        let wait = move || {
            rx.recv().unwrap_or_else(|_| {
                Err(StoreError::Unavailable {
                    op: "wait for the database",
                    message: "the postgres client stopped".into(),
                })
            })
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }

    /// Keeps a connection that `LISTEN`s for work made due elsewhere and
    /// wakes `wake` for each notification; reconnects by itself.
    fn listen_for_work(&self, wake: Arc<tokio::sync::Notify>) {
        let Some(rt) = self.rt.as_ref() else { return };
        let config = self.config.clone();
        rt.spawn(async move {
            loop {
                if let Err(e) = listen(&config, &wake).await {
                    tracing::debug!(error = %e, "postgres notification connection lost; reconnecting");
                }
                // Whatever was missed while reconnecting, the scan finds.
                wake.notify_one();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Dropping a runtime from async code panics; this does not wait.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn listen(
    config: &tokio_postgres::Config,
    wake: &tokio::sync::Notify,
) -> Result<(), tokio_postgres::Error> {
    use futures_util::StreamExt as _;
    let (client, mut conn) = config.connect(NoTls).await?;
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    let sql = format!("LISTEN {WAKE_CHANNEL}");
    let listening = client.batch_execute(&sql);
    tokio::pin!(listening);
    // The LISTEN completes only while the connection is polled.
    loop {
        tokio::select! {
            r = &mut listening => { r?; break; }
            m = messages.next() => match m {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    }
    while let Some(m) = messages.next().await {
        if let tokio_postgres::AsyncMessage::Notification(_) = m? {
            wake.notify_one();
        }
    }
    Ok(())
}

/// Brings the schema up to date under an advisory lock; refuses a database
/// a newer rulehook migrated.
async fn migrate(client: &mut deadpool_postgres::Client, shown: String) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg("migrate"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(pg("migrate"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS rulehook_schema (version bigint NOT NULL); \
         INSERT INTO rulehook_schema SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM rulehook_schema)",
    )
    .await
    .map_err(pg("migrate"))?;
    let found: i64 = tx
        .query_one("SELECT version FROM rulehook_schema", &[])
        .await
        .map_err(pg("migrate"))?
        .get(0);
    let known = POSTGRES_MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::TooNew {
            path: shown,
            found: found as u64,
            known: known as u64,
        });
    }
    for (i, sql) in POSTGRES_MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(sql).await.map_err(pg("migrate"))?;
        tracing::info!(database = %shown, to = i + 1, "postgres schema migrated");
    }
    tx.execute("UPDATE rulehook_schema SET version = $1", &[&known])
        .await
        .map_err(pg("migrate"))?;
    tx.commit().await.map_err(pg("migrate"))?;
    Ok(())
}

/// One batch's ops, grouped so each group is one statement, in an order
/// with the batch's effect: accepts first (they touch only new rows, so
/// they commute with the rest), then the others in their order, runs of
/// finishes and endpoint saves merged as long as no delivery repeats.
// A batch has a few groups; `One` holding its op inline costs nothing.
#[allow(clippy::large_enum_variant)]
enum Group {
    Accept(Vec<(usize, NewEvent)>),
    Finish(Vec<Finishing>),
    Endpoints(Vec<(usize, Endpoint)>),
    One(usize, Op),
}

/// One `Op::Finish` of a group, with its place in the batch.
struct Finishing {
    index: usize,
    id: DeliveryId,
    attempt: Option<Attempt>,
    next: Next,
    epoch: Option<u64>,
}

fn group(ops: Vec<Op>) -> Vec<Group> {
    let mut accepts = Vec::new();
    let mut rest: Vec<Group> = Vec::new();
    let mut finishing: HashSet<DeliveryId> = HashSet::new();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Accept(ev) => accepts.push((i, ev)),
            Op::Finish {
                id,
                attempt,
                next,
                epoch,
            } => {
                let fresh = finishing.insert(id);
                let f = Finishing {
                    index: i,
                    id,
                    attempt,
                    next,
                    epoch,
                };
                match rest.last_mut() {
                    Some(Group::Finish(v)) if fresh => v.push(f),
                    _ => {
                        finishing.clear();
                        finishing.insert(id);
                        rest.push(Group::Finish(vec![f]));
                    }
                }
            }
            Op::PutEndpoint(ep) => match rest.last_mut() {
                Some(Group::Endpoints(v)) => v.push((i, ep)),
                _ => rest.push(Group::Endpoints(vec![(i, ep)])),
            },
            op => {
                finishing.clear();
                rest.push(Group::One(i, op));
            }
        }
    }
    let mut out = Vec::with_capacity(rest.len() + 1);
    if !accepts.is_empty() {
        out.push(Group::Accept(accepts));
    }
    out.extend(rest);
    out
}

/// What a batch needs besides its ops.
#[derive(Clone)]
struct Ctx {
    node: String,
    lease_ms: u64,
    now: u64,
    /// Some op made work due that any node may take: wake the others.
    wake: bool,
}

/// How many times a batch runs when it keeps losing races (deadlocks).
const CONFLICT_TRIES: u32 = 3;

async fn apply_batch(
    client: &mut deadpool_postgres::Client,
    ops: Vec<Op>,
    mut ctx: Ctx,
) -> Result<Vec<Done>, StoreError> {
    let n = ops.len();
    let tx = client.transaction().await.map_err(pg("begin"))?;
    let mut out: Vec<Option<Done>> = vec![None; n];
    for g in group(ops) {
        match g {
            Group::Accept(v) => accept(&tx, v, &ctx, &mut out).await?,
            Group::Finish(v) => finish(&tx, v, &mut ctx, &mut out).await?,
            Group::Endpoints(v) => put_endpoints(&tx, v, &mut out).await?,
            Group::One(i, op) => out[i] = Some(one(&tx, op, &mut ctx).await?),
        }
    }
    if ctx.wake {
        // Delivered to listeners when (and only if) the commit succeeds.
        tx.batch_execute(&format!("NOTIFY {WAKE_CHANNEL}"))
            .await
            .map_err(pg("notify"))?;
    }
    tx.commit().await.map_err(pg("commit"))?;
    Ok(out
        .into_iter()
        .map(|d| d.unwrap_or_else(|| Done::Rejected("op not applied".into())))
        .collect())
}

type Tx<'a> = deadpool_postgres::Transaction<'a>;

async fn accept(
    tx: &Tx<'_>,
    events: Vec<(usize, NewEvent)>,
    ctx: &Ctx,
    out: &mut [Option<Done>],
) -> Result<(), StoreError> {
    // The first of an id in the batch is the one stored; later ones in the
    // same batch are its duplicates.
    let mut first: HashMap<String, usize> = HashMap::new();
    let mut primary = Vec::new();
    let mut repeats = Vec::new();
    for (i, ev) in events {
        match first.get(&ev.id) {
            Some(&j) => repeats.push((i, j)),
            None => {
                first.insert(ev.id.clone(), i);
                primary.push((i, ev));
            }
        }
    }
    let keys: Vec<Uuid> = primary.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>();
    let ids: Vec<&str> = primary.iter().map(|(_, ev)| ev.id.as_str()).collect();
    let now = ctx.now as i64;
    let stmt = tx
        .prepare_cached(
            "INSERT INTO events (key, id, accepted_at) \
             SELECT k, i, $3 FROM unnest($1::uuid[], $2::text[]) AS u(k, i) \
             ON CONFLICT (id) DO NOTHING RETURNING id",
        )
        .await
        .map_err(pg("accept"))?;
    let inserted: HashSet<String> = tx
        .query(&stmt, &[&keys, &ids, &now])
        .await
        .map_err(pg("accept"))?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    // Deliveries of the events stored now, in one multi-row insert.
    let claim = Claim {
        epoch: 1,
        at: ctx.now,
    };
    let lease_until = (ctx.now + ctx.lease_ms) as i64;
    // Ordered deliveries of the events stored now join their lanes, in
    // the batch's order, under the lanes' row locks: a lane without a
    // head gets this one as its head, else it waits behind.
    let stored = || {
        primary
            .iter()
            .filter(|(_, ev)| inserted.contains(&ev.id))
            .flat_map(|(_, ev)| ev.deliveries.iter())
    };
    let mut keys: Vec<&str> = stored()
        .filter(|d| d.state == State::Pending)
        .filter_map(|d| d.lane.as_ref().map(|l| l.key.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut lanes = lock_lanes(tx, &keys, Missing::Make).await?;
    // delivery → (its seq, the head it waits behind if it waits)
    let mut placed: HashMap<DeliveryId, (i64, Option<Uuid>)> = HashMap::new();
    for d in stored().filter(|d| d.state == State::Pending) {
        let Some(lane) = &d.lane else { continue };
        let Some((head, next_seq)) = lanes.get_mut(lane.key.as_str()) else {
            continue;
        };
        let behind = *head;
        if head.is_none() {
            *head = Some(uuid(d.id.0));
        }
        placed.insert(d.id, (*next_seq, behind));
        *next_seq += 1;
    }
    save_lanes(tx, &lanes).await?;
    let reasons: HashMap<DeliveryId, String> = placed
        .iter()
        .filter_map(|(id, (_, behind))| {
            behind.map(|h| {
                (
                    *id,
                    format!("waits behind {} in its lane", DeliveryId(h.as_u128())),
                )
            })
        })
        .collect();
    let mut c = AcceptCols::default();
    for (_, ev) in primary.iter().filter(|(_, ev)| inserted.contains(&ev.id)) {
        for d in &ev.deliveries {
            let place = placed.get(&d.id);
            let waits = place.is_some_and(|(_, behind)| behind.is_some());
            let pending = d.state == State::Pending && !waits;
            c.id.push(uuid(d.id.0));
            c.event.push(ev.id.as_str());
            c.rule.push(d.rule.as_str());
            c.state.push(if waits {
                State::Waiting.as_str()
            } else {
                d.state.as_str()
            });
            c.next_at.push(pending.then_some(now));
            c.reason.push(match reasons.get(&d.id) {
                Some(r) => Some(r.as_str()),
                None => d.reason.as_deref(),
            });
            c.lane
                .push(place.and(d.lane.as_ref()).map(|l| l.key.as_str()));
            c.lane_seq.push(place.map(|(seq, _)| *seq));
            c.lane_halt
                .push(place.is_some() && d.lane.as_ref().is_some_and(|l| l.halt));
            c.unbuilt.push(d.unbuilt);
            c.space.push(d.space.as_deref());
            c.version.push(d.rule_version.as_deref());
            c.body.push(d.body.as_ref());
            // The accepting node holds what it is about to send itself.
            c.owner.push(pending.then_some(ctx.node.as_str()));
            c.lease.push(pending.then_some(lease_until));
            c.epoch.push(if pending { 1 } else { 0 });
        }
    }
    if !c.id.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO deliveries (id, event_id, rule, state, next_attempt_at, created_at, \
                 updated_at, reason, unbuilt, space, rule_version, body, owner, lease_until, epoch, \
                 lane, lane_seq, lane_halt) \
                 SELECT id, ev, rule, st, nxt, $13, $13, reason, unbuilt, space, ver, body, owner, \
                 lease, epoch, lane, seq, halt FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], \
                 $5::bigint[], $6::text[], $7::bool[], $8::text[], $9::text[], $10::bytea[], \
                 $11::text[], $12::bigint[], $14::bigint[], $15::text[], $16::bigint[], $17::bool[]) \
                 AS u(id, ev, rule, st, nxt, reason, unbuilt, space, ver, body, owner, lease, epoch, \
                 lane, seq, halt)",
            )
            .await
            .map_err(pg("accept"))?;
        let params: [&(dyn ToSql + Sync); 17] = [
            &c.id,
            &c.event,
            &c.rule,
            &c.state,
            &c.next_at,
            &c.reason,
            &c.unbuilt,
            &c.space,
            &c.version,
            &c.body,
            &c.owner,
            &c.lease,
            &now,
            &c.epoch,
            &c.lane,
            &c.lane_seq,
            &c.lane_halt,
        ];
        tx.execute(&stmt, &params).await.map_err(pg("accept"))?;
    }
    // Events stored before this batch: answer with their deliveries.
    let dup_ids: Vec<&str> = primary
        .iter()
        .filter(|(_, ev)| !inserted.contains(&ev.id))
        .map(|(_, ev)| ev.id.as_str())
        .collect();
    let mut stored: HashMap<String, Vec<DeliveryId>> = HashMap::new();
    if !dup_ids.is_empty() {
        let stmt = tx
            .prepare_cached(
                "SELECT event_id, id FROM deliveries WHERE event_id = ANY($1) ORDER BY id",
            )
            .await
            .map_err(pg("accept"))?;
        for row in tx.query(&stmt, &[&dup_ids]).await.map_err(pg("accept"))? {
            let id: Uuid = row.get(1);
            stored
                .entry(row.get(0))
                .or_default()
                .push(DeliveryId(id.as_u128()));
        }
    }
    for (i, ev) in &primary {
        out[*i] = Some(if inserted.contains(&ev.id) {
            let waits = |d: &NewDelivery| reasons.contains_key(&d.id);
            let has_pending = ev
                .deliveries
                .iter()
                .any(|d| d.state == State::Pending && !waits(d));
            Done::Accepted {
                deliveries: ev.deliveries.iter().map(|d| d.id).collect(),
                duplicate: false,
                claim: has_pending.then_some(claim),
                waiting: ev
                    .deliveries
                    .iter()
                    .filter(|d| waits(d))
                    .map(|d| d.id)
                    .collect(),
            }
        } else {
            Done::Accepted {
                deliveries: stored.remove(&ev.id).unwrap_or_default(),
                duplicate: true,
                claim: None,
                waiting: Vec::new(),
            }
        });
    }
    for (i, j) in repeats {
        let deliveries = match &out[j] {
            Some(Done::Accepted { deliveries, .. }) => deliveries.clone(),
            _ => Vec::new(),
        };
        out[i] = Some(Done::Accepted {
            deliveries,
            duplicate: true,
            claim: None,
            waiting: Vec::new(),
        });
    }
    Ok(())
}

/// Column arrays of a multi-row delivery insert.
#[derive(Default)]
struct AcceptCols<'a> {
    id: Vec<Uuid>,
    event: Vec<&'a str>,
    rule: Vec<&'a str>,
    state: Vec<&'a str>,
    next_at: Vec<Option<i64>>,
    reason: Vec<Option<&'a str>>,
    unbuilt: Vec<bool>,
    space: Vec<Option<&'a str>>,
    version: Vec<Option<&'a str>>,
    body: Vec<&'a [u8]>,
    owner: Vec<Option<&'a str>>,
    lease: Vec<Option<i64>>,
    epoch: Vec<i64>,
    lane: Vec<Option<&'a str>>,
    lane_seq: Vec<Option<i64>>,
    lane_halt: Vec<bool>,
}

/// Lanes by key: (head, next sequence number).
type LaneRows = HashMap<String, (Option<Uuid>, i64)>;

/// Whether `lock_lanes` makes the rows it does not find: a join needs its
/// lane's row; an advance or a skip only looks at lanes that have one.
#[derive(Clone, Copy, PartialEq)]
enum Missing {
    Make,
    Skip,
}

/// Locks the rows of `keys` (sorted, so two batches lock in one order and
/// cannot deadlock on them), making the missing ones when asked. The lock is what
/// makes a lane's joins and advances one at a time across nodes; it is
/// taken in a statement of its own so that what the transaction reads
/// next sees every write of the transactions it waited for.
async fn lock_lanes(tx: &Tx<'_>, keys: &[&str], missing: Missing) -> Result<LaneRows, StoreError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    if missing == Missing::Make {
        let make = tx
            .prepare_cached(
                "INSERT INTO lanes (key) SELECT k FROM unnest($1::text[]) AS u(k) ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(pg("join lane"))?;
        tx.execute(&make, &[&keys]).await.map_err(pg("join lane"))?;
    }
    let lock = tx
        .prepare_cached(
            "SELECT key, head, next_seq FROM lanes WHERE key = ANY($1) ORDER BY key FOR UPDATE",
        )
        .await
        .map_err(pg("join lane"))?;
    let rows: LaneRows = tx
        .query(&lock, &[&keys])
        .await
        .map_err(pg("join lane"))?
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    if missing == Missing::Make && rows.len() < keys.len() {
        // An empty lane's row was removed (by compaction) between the two
        // statements: run the batch again.
        return Err(StoreError::Conflict {
            op: "join lane",
            message: "a lane's row went while joining it".into(),
        });
    }
    Ok(rows)
}

async fn save_lanes(tx: &Tx<'_>, lanes: &LaneRows) -> Result<(), StoreError> {
    if lanes.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = lanes.keys().map(String::as_str).collect();
    let heads: Vec<Option<Uuid>> = keys.iter().map(|k| lanes[*k].0).collect();
    let next: Vec<i64> = keys.iter().map(|k| lanes[*k].1).collect();
    let stmt = tx
        .prepare_cached(
            "UPDATE lanes SET head = u.h, next_seq = u.n \
             FROM unnest($1::text[], $2::uuid[], $3::bigint[]) AS u(k, h, n) WHERE lanes.key = u.k",
        )
        .await
        .map_err(pg("join lane"))?;
    tx.execute(&stmt, &[&keys, &heads, &next])
        .await
        .map_err(pg("join lane"))?;
    Ok(())
}

/// The lanes whose heads (`done`: lane → the head that became final) are
/// final now move on: each one's next waiting delivery becomes pending,
/// due now and held by no node, and the lane's head; a lane with none
/// waiting is left empty. Returns head → the delivery promoted after it.
async fn advance_lanes(
    tx: &Tx<'_>,
    done: &[(String, DeliveryId)],
    ctx: &mut Ctx,
) -> Result<HashMap<DeliveryId, DeliveryId>, StoreError> {
    if done.is_empty() {
        return Ok(HashMap::new());
    }
    let mut keys: Vec<&str> = done.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let rows = lock_lanes(tx, &keys, Missing::Skip).await?;
    // Only a lane whose head is the one that finished moves on.
    let moving: Vec<(&str, DeliveryId)> = done
        .iter()
        .filter(|(k, id)| rows.get(k).and_then(|r| r.0) == Some(uuid(id.0)))
        .map(|(k, id)| (k.as_str(), *id))
        .collect();
    if moving.is_empty() {
        return Ok(HashMap::new());
    }
    let lanes: Vec<&str> = moving.iter().map(|(k, _)| *k).collect();
    let stmt = tx
        .prepare_cached(
            "WITH nxt AS (SELECT DISTINCT ON (d.lane) d.lane, d.id FROM deliveries d \
               WHERE d.lane = ANY($1) AND d.state = 'waiting' ORDER BY d.lane, d.lane_seq), \
             prom AS (UPDATE deliveries d SET state = 'pending', next_attempt_at = $2, \
               updated_at = $2, reason = NULL FROM nxt WHERE d.id = nxt.id RETURNING d.id, d.lane), \
             heads AS (UPDATE lanes SET head = prom.id FROM prom WHERE lanes.key = prom.lane), \
             emptied AS (UPDATE lanes SET head = NULL WHERE lanes.key = ANY($1) \
               AND NOT EXISTS (SELECT 1 FROM nxt WHERE nxt.lane = lanes.key)) \
             SELECT lane, id FROM prom",
        )
        .await
        .map_err(pg("advance lane"))?;
    let now = ctx.now as i64;
    let promoted: HashMap<String, Uuid> = tx
        .query(&stmt, &[&lanes, &now])
        .await
        .map_err(pg("advance lane"))?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ctx.wake |= !promoted.is_empty();
    Ok(moving
        .into_iter()
        .filter_map(|(k, id)| promoted.get(k).map(|p| (id, DeliveryId(p.as_u128()))))
        .collect())
}

/// Records attempts and moves deliveries on, one statement for the group.
/// A row whose epoch no longer matches (another node claimed it since) is
/// left alone, and so is its attempt record.
async fn finish(
    tx: &Tx<'_>,
    v: Vec<Finishing>,
    ctx: &mut Ctx,
    out: &mut [Option<Done>],
) -> Result<(), StoreError> {
    let mut ids = Vec::with_capacity(v.len());
    let mut epochs: Vec<Option<i64>> = Vec::with_capacity(v.len());
    let mut states = Vec::with_capacity(v.len());
    let mut next_at: Vec<Option<i64>> = Vec::with_capacity(v.len());
    let mut parked: Vec<Option<String>> = Vec::with_capacity(v.len());
    let mut reasons: Vec<Option<String>> = Vec::with_capacity(v.len());
    let mut numbers: Vec<Option<i32>> = Vec::with_capacity(v.len());
    let mut statuses: Vec<Option<i32>> = Vec::with_capacity(v.len());
    let mut records: Vec<Option<String>> = Vec::with_capacity(v.len());
    for Finishing {
        id,
        attempt,
        next,
        epoch,
        ..
    } in &v
    {
        let step = Step::after(attempt.as_ref(), next.clone());
        // Handed back to be sent at once (by a node with a WebSocket
        // client of its space): wake the others rather than wait for a scan.
        ctx.wake |=
            step.state == State::Pending && step.next_attempt_at.is_some_and(|t| t <= ctx.now);
        ids.push(uuid(id.0));
        epochs.push(epoch.map(|e| e as i64));
        states.push(step.state.as_str());
        next_at.push(step.next_attempt_at.map(|t| t as i64));
        parked.push(step.parked_on);
        reasons.push(step.reason);
        numbers.push(attempt.as_ref().map(|a| a.number as i32));
        statuses.push(attempt.as_ref().and_then(|a| a.status).map(i32::from));
        records.push(
            attempt
                .as_ref()
                .map(|a| String::from_utf8(to_json(a)).unwrap_or_default()),
        );
    }
    let stmt = tx
        .prepare_cached(
            "WITH u AS (SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bigint[], \
               $5::text[], $6::text[], $7::int[], $8::int[], $9::text[]) \
               AS u(id, epoch, st, nxt, parked, reason, num, status, rec)), \
             upd AS (UPDATE deliveries d SET state = u.st, next_attempt_at = u.nxt, \
               parked_on = u.parked, reason = u.reason, updated_at = $10, \
               attempts = CASE WHEN u.num IS NULL THEN d.attempts ELSE GREATEST(d.attempts, u.num) END, \
               last_status = CASE WHEN u.num IS NULL THEN d.last_status ELSE u.status END, \
               owner = NULL, lease_until = NULL \
               FROM u WHERE d.id = u.id AND (u.epoch IS NULL OR d.epoch = u.epoch) \
               AND d.state <> 'waiting' RETURNING d.id, d.lane, d.state), \
             ins AS (INSERT INTO attempts (delivery, number, record) \
               SELECT u.id, u.num, u.rec::json FROM u JOIN upd ON upd.id = u.id WHERE u.num IS NOT NULL \
               ON CONFLICT (delivery, number) DO UPDATE SET record = EXCLUDED.record) \
             SELECT id, lane, state FROM upd",
        )
        .await
        .map_err(pg("record attempts"))?;
    let now = ctx.now as i64;
    let params: [&(dyn ToSql + Sync); 10] = [
        &ids, &epochs, &states, &next_at, &parked, &reasons, &numbers, &statuses, &records, &now,
    ];
    let rows = tx
        .query(&stmt, &params)
        .await
        .map_err(pg("record attempts"))?;
    let done: HashSet<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    // Heads of lanes that became final: their lanes move on.
    let finals: Vec<(String, DeliveryId)> = rows
        .iter()
        .filter(|r| State::parse(r.get(2)).is_some_and(State::is_final))
        .filter_map(|r| {
            let lane: Option<String> = r.get(1);
            lane.map(|l| (l, DeliveryId(r.get::<_, Uuid>(0).as_u128())))
        })
        .collect();
    let promoted = advance_lanes(tx, &finals, ctx).await?;
    for Finishing {
        index: i,
        id,
        epoch,
        ..
    } in v
    {
        out[i] = Some(if done.contains(&uuid(id.0)) {
            Done::Finished {
                promoted: promoted.get(&id).copied(),
            }
        } else {
            match epoch {
                Some(e) => Done::Rejected(format!(
                    "delivery {id} is no longer held under claim {e}: another node claimed it after this node's lease ran out (or it was deleted); this attempt's record is dropped"
                )),
                None => Done::Rejected(format!("no delivery {id}")),
            }
        });
    }
    Ok(())
}

async fn put_endpoints(
    tx: &Tx<'_>,
    v: Vec<(usize, Endpoint)>,
    out: &mut [Option<Done>],
) -> Result<(), StoreError> {
    // One row per endpoint: the last state in the batch wins.
    let mut last: HashMap<&str, &Endpoint> = HashMap::new();
    for (_, ep) in &v {
        last.insert(ep.endpoint.as_str(), ep);
    }
    let names: Vec<&str> = last.keys().copied().collect();
    let records: Vec<String> = names
        .iter()
        .map(|n| String::from_utf8(to_json(last[n])).unwrap_or_default())
        .collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO endpoints (endpoint, record) \
             SELECT e, r::json FROM unnest($1::text[], $2::text[]) AS u(e, r) \
             ON CONFLICT (endpoint) DO UPDATE SET record = EXCLUDED.record",
        )
        .await
        .map_err(pg("save endpoint"))?;
    tx.execute(&stmt, &[&names, &records])
        .await
        .map_err(pg("save endpoint"))?;
    for (i, _) in v {
        out[i] = Some(Done::EndpointSaved);
    }
    Ok(())
}

async fn load_for_update(tx: &Tx<'_>, id: DeliveryId) -> Result<Option<Delivery>, StoreError> {
    let sql = format!("SELECT {COLS} FROM deliveries d WHERE d.id = $1 FOR UPDATE");
    let stmt = tx.prepare_cached(&sql).await.map_err(pg("read delivery"))?;
    tx.query_opt(&stmt, &[&uuid(id.0)])
        .await
        .map_err(pg("read delivery"))?
        .map(|r| row_delivery(&r))
        .transpose()
}

/// Writes a delivery's whole progress (not its body), releasing any claim.
async fn save(tx: &Tx<'_>, d: &Delivery) -> Result<(), StoreError> {
    let stmt = tx
        .prepare_cached(
            "UPDATE deliveries SET state = $2, next_attempt_at = $3, parked_on = $4, reason = $5, \
             updated_at = $6, unbuilt = $7, rule_version = $8, lane_seq = $9, owner = NULL, \
             lease_until = NULL WHERE id = $1",
        )
        .await
        .map_err(pg("save delivery"))?;
    let next_at = d.next_attempt_at.map(|t| t as i64);
    tx.execute(
        &stmt,
        &[
            &uuid(d.id.0),
            &d.state.as_str(),
            &next_at,
            &d.parked_on,
            &d.reason,
            &(d.updated_at as i64),
            &d.unbuilt,
            &d.rule_version,
            &d.lane.as_ref().map(|l| l.seq as i64),
        ],
    )
    .await
    .map_err(pg("save delivery"))?;
    Ok(())
}

async fn one(tx: &Tx<'_>, op: Op, ctx: &mut Ctx) -> Result<Done, StoreError> {
    let now = ctx.now as i64;
    match op {
        Op::Accept(_) | Op::Finish { .. } | Op::PutEndpoint(_) => {
            unreachable!("grouped ops are written by their group")
        }
        Op::Unpark { endpoint, limit } => {
            let stmt = tx
                .prepare_cached(
                    "UPDATE deliveries d SET state = 'pending', parked_on = NULL, \
                     next_attempt_at = $3, updated_at = $3, owner = NULL, lease_until = NULL \
                     FROM (SELECT id FROM deliveries WHERE state = 'parked' AND parked_on = $1 \
                           ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) p \
                     WHERE d.id = p.id RETURNING d.id",
                )
                .await
                .map_err(pg("unpark"))?;
            let mut ids: Vec<DeliveryId> = tx
                .query(&stmt, &[&endpoint, &(limit as i64), &now])
                .await
                .map_err(pg("unpark"))?
                .into_iter()
                .map(|r| DeliveryId(r.get::<_, Uuid>(0).as_u128()))
                .collect();
            ids.sort();
            ctx.wake |= !ids.is_empty();
            Ok(Done::Unparked(ids))
        }
        Op::Redeliver { id, body, rebind } => {
            let Some(old) = load_for_update(tx, id).await? else {
                return Ok(Done::Rejected(format!("no delivery {id}")));
            };
            if old.state == State::Waiting {
                return Ok(Done::Rejected(waits_in_lane(&old)));
            }
            let was_final = old.state.is_final();
            let (mut d, new_body) = redelivered(old, body, rebind, ctx.now);
            // A final delivery of a lane sent again goes to the lane's end,
            // so it never runs beside the lane's head.
            if let Some(lane) = d.lane.as_mut()
                && was_final
                && d.state == State::Pending
            {
                let mut rows = lock_lanes(tx, &[lane.key.as_str()], Missing::Make).await?;
                if let Some((head, next_seq)) = rows.get_mut(&lane.key) {
                    lane.seq = *next_seq as u64;
                    *next_seq += 1;
                    match *head {
                        Some(h) if h != uuid(id.0) => {
                            d.state = State::Waiting;
                            d.next_attempt_at = None;
                            d.reason = Some(format!(
                                "waits behind {} in its lane",
                                DeliveryId(h.as_u128())
                            ));
                        }
                        _ => *head = Some(uuid(id.0)),
                    }
                }
                save_lanes(tx, &rows).await?;
            }
            if let Some(bytes) = new_body {
                let stmt = tx
                    .prepare_cached("UPDATE deliveries SET body = $2 WHERE id = $1")
                    .await
                    .map_err(pg("redeliver"))?;
                tx.execute(&stmt, &[&uuid(id.0), &bytes])
                    .await
                    .map_err(pg("redeliver"))?;
            }
            save(tx, &d).await?;
            ctx.wake |= d.state == State::Pending;
            Ok(Done::Redelivered(d))
        }
        Op::SkipLane { lane } => {
            let rows = lock_lanes(tx, &[lane.as_str()], Missing::Skip).await?;
            let Some(head) = rows.get(&lane).and_then(|r| r.0) else {
                return Ok(Done::Rejected(no_lane(&lane)));
            };
            let head = DeliveryId(head.as_u128());
            let Some(old) = load_for_update(tx, head).await? else {
                return Err(StoreError::Corrupt(format!(
                    "lane {lane} names a missing head {head}"
                )));
            };
            if let Err(why) = skippable(&old, &lane) {
                return Ok(Done::Rejected(why));
            }
            let d = skipped_head(old, ctx.now);
            save(tx, &d).await?;
            let promoted = advance_lanes(tx, &[(lane, head)], ctx).await?;
            Ok(Done::LaneSkipped {
                head,
                promoted: promoted.get(&head).copied(),
            })
        }
        Op::PutRuleVersions { add, running, at } => {
            let (names, specs): (Vec<&str>, Vec<&[u8]>) =
                add.iter().map(|(v, s)| (v.as_str(), s.as_slice())).unzip();
            tx.execute(
                "INSERT INTO rule_versions (version, spec) \
                 SELECT * FROM unnest($1::text[], $2::bytea[]) ON CONFLICT (version) DO NOTHING",
                &[&names, &specs],
            )
            .await
            .map_err(pg("rule versions"))?;
            // Which versions run is per node: a version retires when no
            // node runs it any more, not when one node's reload drops it.
            tx.execute(
                "DELETE FROM rule_versions_running WHERE node = $1",
                &[&ctx.node],
            )
            .await
            .map_err(pg("rule versions"))?;
            tx.execute(
                "INSERT INTO rule_versions_running (node, version) \
                 SELECT $1, v FROM unnest($2::text[]) AS u(v) ON CONFLICT DO NOTHING",
                &[&ctx.node, &running],
            )
            .await
            .map_err(pg("rule versions"))?;
            tx.execute(
                "UPDATE rule_versions v SET retired_at = CASE \
                   WHEN EXISTS (SELECT 1 FROM rule_versions_running r WHERE r.version = v.version) \
                   THEN NULL ELSE COALESCE(v.retired_at, $1) END",
                &[&(at as i64)],
            )
            .await
            .map_err(pg("rule versions"))?;
            Ok(Done::RuleVersionsSaved)
        }
        Op::DropRuleVersions(candidates) => {
            let rows = tx
                .query(
                    "DELETE FROM rule_versions WHERE version = ANY($1) AND retired_at IS NOT NULL \
                     RETURNING version",
                    &[&candidates],
                )
                .await
                .map_err(pg("rule versions"))?;
            let mut dropped: Vec<String> = rows.into_iter().map(|r| r.get(0)).collect();
            dropped.sort();
            Ok(Done::RuleVersionsDropped(dropped))
        }
        Op::Compact {
            before_ms,
            after,
            limit,
        } => {
            // One node at a time: the others skip this round.
            let mine: bool = tx
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&COMPACT_LOCK])
                .await
                .map_err(pg("compact"))?
                .get(0);
            if !mine {
                return Ok(Done::Compacted {
                    removed: 0,
                    resume: None,
                });
            }
            let end = uuid(u128::from(before_ms) << 80);
            let start = uuid(after.unwrap_or(0));
            let inclusive = after.is_none();
            let row = tx
                .query_one(
                    "WITH cand AS (SELECT key, id FROM events \
                       WHERE (key > $1 OR ($4 AND key = $1)) AND key < $2 ORDER BY key LIMIT $3), \
                     keep AS (SELECT DISTINCT d.event_id FROM deliveries d JOIN cand c ON d.event_id = c.id \
                       WHERE d.state IN ('pending', 'parked', 'waiting')), \
                     gone AS (DELETE FROM events e USING cand c WHERE e.key = c.key \
                       AND NOT EXISTS (SELECT 1 FROM keep k WHERE k.event_id = c.id) RETURNING e.id), \
                     dd AS (DELETE FROM deliveries d USING gone g WHERE d.event_id = g.id RETURNING d.id), \
                     da AS (DELETE FROM attempts a USING dd WHERE a.delivery = dd.id) \
                     SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM cand), \
                            (SELECT key FROM cand ORDER BY key DESC LIMIT 1)",
                    &[&start, &end, &(limit as i64), &inclusive],
                )
                .await
                .map_err(pg("compact"))?;
            // Empty lanes' rows (a lane that is joined again gets a new one).
            tx.execute("DELETE FROM lanes WHERE head IS NULL", &[])
                .await
                .map_err(pg("compact"))?;
            let removed: i64 = row.get(0);
            let looked: i64 = row.get(1);
            let last: Option<Uuid> = row.get(2);
            let resume = (looked as usize >= limit)
                .then(|| last.map(|k| k.as_u128()))
                .flatten();
            Ok(Done::Compacted {
                removed: removed as usize,
                resume,
            })
        }
    }
}

/// `Backend::import`: one transaction per slice, every row `ON CONFLICT DO
/// NOTHING`, deliveries unclaimed (any node takes the pending ones).
async fn import(client: &mut deadpool_postgres::Client, part: Export) -> Result<usize, StoreError> {
    let tx = client.transaction().await.map_err(pg("import"))?;
    let keys: Vec<Uuid> = part.events.iter().map(|(k, _)| uuid(*k)).collect();
    let ids: Vec<&str> = part.events.iter().map(|(_, e)| e.id.as_str()).collect();
    let at: Vec<i64> = part
        .events
        .iter()
        .map(|(_, e)| e.accepted_at as i64)
        .collect();
    tx.execute(
        "INSERT INTO events (key, id, accepted_at) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[]) ON CONFLICT DO NOTHING",
        &[&keys, &ids, &at],
    )
    .await
    .map_err(pg("import"))?;
    let ds = &part.deliveries;
    let col = |f: &dyn Fn(&Delivery) -> Option<i64>| -> Vec<Option<i64>> {
        ds.iter().map(|(d, _, _)| f(d)).collect()
    };
    let id: Vec<Uuid> = ds.iter().map(|(d, _, _)| uuid(d.id.0)).collect();
    let event: Vec<&str> = ds.iter().map(|(d, _, _)| d.event_id.as_str()).collect();
    let rule: Vec<&str> = ds.iter().map(|(d, _, _)| d.rule.as_str()).collect();
    let state: Vec<&str> = ds.iter().map(|(d, _, _)| d.state.as_str()).collect();
    let attempts: Vec<i32> = ds.iter().map(|(d, _, _)| d.attempts as i32).collect();
    let next_at = col(&|d| d.next_attempt_at.map(|t| t as i64));
    let created = col(&|d| Some(d.created_at as i64));
    let updated = col(&|d| Some(d.updated_at as i64));
    let parked: Vec<Option<&str>> = ds.iter().map(|(d, _, _)| d.parked_on.as_deref()).collect();
    let reason: Vec<Option<&str>> = ds.iter().map(|(d, _, _)| d.reason.as_deref()).collect();
    let status: Vec<Option<i32>> = ds
        .iter()
        .map(|(d, _, _)| d.last_status.map(i32::from))
        .collect();
    let unbuilt: Vec<bool> = ds.iter().map(|(d, _, _)| d.unbuilt).collect();
    let space: Vec<Option<&str>> = ds.iter().map(|(d, _, _)| d.space.as_deref()).collect();
    let version: Vec<Option<&str>> = ds
        .iter()
        .map(|(d, _, _)| d.rule_version.as_deref())
        .collect();
    let body: Vec<&[u8]> = ds.iter().map(|(_, b, _)| b.as_slice()).collect();
    let lane: Vec<Option<&str>> = ds
        .iter()
        .map(|(d, _, _)| d.lane.as_ref().map(|l| l.key.as_str()))
        .collect();
    let lane_seq = col(&|d| d.lane.as_ref().map(|l| l.seq as i64));
    let lane_halt: Vec<bool> = ds
        .iter()
        .map(|(d, _, _)| d.lane.as_ref().is_some_and(|l| l.halt))
        .collect();
    let params: [&(dyn ToSql + Sync); 18] = [
        &id, &event, &rule, &state, &attempts, &next_at, &created, &updated, &parked, &reason,
        &status, &unbuilt, &space, &version, &body, &lane, &lane_seq, &lane_halt,
    ];
    let added = tx
        .execute(
            "INSERT INTO deliveries (id, event_id, rule, state, attempts, next_attempt_at, \
             created_at, updated_at, parked_on, reason, last_status, unbuilt, space, rule_version, \
             body, lane, lane_seq, lane_halt) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], \
             $6::bigint[], $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::int[], \
             $12::bool[], $13::text[], $14::text[], $15::bytea[], $16::text[], $17::bigint[], \
             $18::bool[]) ON CONFLICT DO NOTHING",
            &params,
        )
        .await
        .map_err(pg("import"))?;
    // The lanes of what came: each one's head (its pending or parked
    // delivery) and next sequence number, from every delivery of the lane
    // stored so far, so a lane split across slices comes out whole.
    let mut lanes: Vec<&str> = lane.iter().flatten().copied().collect();
    lanes.sort_unstable();
    lanes.dedup();
    if !lanes.is_empty() {
        tx.execute(
            "INSERT INTO lanes (key, head, next_seq) \
             SELECT lane, (array_agg(id) FILTER (WHERE state IN ('pending', 'parked')))[1], \
                    max(lane_seq) + 1 \
             FROM deliveries WHERE lane = ANY($1) GROUP BY lane \
             ON CONFLICT (key) DO UPDATE SET head = COALESCE(EXCLUDED.head, lanes.head), \
               next_seq = GREATEST(lanes.next_seq, EXCLUDED.next_seq)",
            &[&lanes],
        )
        .await
        .map_err(pg("import"))?;
    }
    let mut a_id = Vec::new();
    let mut a_num = Vec::new();
    let mut a_rec = Vec::new();
    for (d, _, list) in ds {
        for a in list {
            a_id.push(uuid(d.id.0));
            a_num.push(a.number as i32);
            a_rec.push(String::from_utf8(to_json(a)).unwrap_or_default());
        }
    }
    tx.execute(
        "INSERT INTO attempts (delivery, number, record) \
         SELECT i, n, r::json FROM unnest($1::uuid[], $2::int[], $3::text[]) AS u(i, n, r) \
         ON CONFLICT DO NOTHING",
        &[&a_id, &a_num, &a_rec],
    )
    .await
    .map_err(pg("import"))?;
    tx.commit().await.map_err(pg("import"))?;
    Ok(added as usize)
}

impl Postgres {
    fn read<T: Send + 'static>(
        &self,
        op: &'static str,
        sql: String,
        params: Vec<Box<dyn ToSql + Sync + Send>>,
        map: impl Fn(Vec<tokio_postgres::Row>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.run(move |c| {
            Box::pin(async move {
                let stmt = c.prepare_cached(&sql).await.map_err(pg(op))?;
                let refs: Vec<&(dyn ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                let rows = c.query(&stmt, &refs).await.map_err(pg(op))?;
                map(rows)
            })
        })
    }
}

fn boxed<T: ToSql + Sync + Send + 'static>(v: T) -> Box<dyn ToSql + Sync + Send> {
    Box::new(v)
}

impl Backend for Postgres {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        // (what is wrong, rows where it is)
        let checks = [
            (
                "pending without a due time, or due while not pending",
                "SELECT count(*) FROM deliveries WHERE (state = 'pending') <> (next_attempt_at IS NOT NULL)",
            ),
            (
                "parked without an endpoint, or an endpoint while not parked",
                "SELECT count(*) FROM deliveries WHERE (state = 'parked') <> (parked_on IS NOT NULL)",
            ),
            (
                "a claim on a delivery that is not pending",
                "SELECT count(*) FROM deliveries WHERE state <> 'pending' AND owner IS NOT NULL",
            ),
            (
                "an attempt of a delivery that is gone",
                "SELECT count(*) FROM attempts a WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = a.delivery)",
            ),
            (
                "a delivery of an event that is gone",
                "SELECT count(*) FROM deliveries d WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = d.event_id)",
            ),
            (
                "a waiting delivery without a lane",
                "SELECT count(*) FROM deliveries WHERE state = 'waiting' AND (lane IS NULL OR lane_seq IS NULL)",
            ),
            (
                "a lane's head that is not pending or parked, or of another lane",
                "SELECT count(*) FROM lanes l JOIN deliveries d ON d.id = l.head \
                 WHERE d.state NOT IN ('pending', 'parked') OR d.lane IS DISTINCT FROM l.key",
            ),
            (
                "a pending or parked delivery of a lane that is not its lane's head",
                "SELECT count(*) FROM deliveries d WHERE d.lane IS NOT NULL \
                 AND d.state IN ('pending', 'parked') \
                 AND NOT EXISTS (SELECT 1 FROM lanes l WHERE l.key = d.lane AND l.head = d.id)",
            ),
            (
                "a waiting delivery in a lane without a head, or ahead of its head",
                "SELECT count(*) FROM deliveries w WHERE w.state = 'waiting' AND NOT EXISTS \
                 (SELECT 1 FROM lanes l JOIN deliveries h ON h.id = l.head \
                  WHERE l.key = w.lane AND h.lane_seq < w.lane_seq AND w.lane_seq < l.next_seq)",
            ),
            (
                "more attempts counted than recorded",
                "SELECT count(*) FROM deliveries d WHERE d.attempts > (SELECT count(*) FROM attempts a WHERE a.delivery = d.id)",
            ),
        ];
        for (what, sql) in checks {
            let n = self
                .read("check", sql.into(), vec![], |rows| {
                    Ok(rows[0].get::<_, i64>(0))
                })
                .unwrap();
            assert_eq!(n, 0, "{what}: {n} rows");
        }
    }

    /// A write that changes nothing, on the primary, committed as any
    /// batch is (so with a synchronous standby configured, it waits for
    /// it too).
    fn probe(&self) -> Result<(), StoreError> {
        self.run(|c| {
            Box::pin(async move {
                c.execute("UPDATE rulehook_schema SET version = version", &[])
                    .await
                    .map(|_| ())
                    .map_err(pg("probe"))
            })
        })
    }

    /// Up to 4 batches in flight, within the pool (other work needs
    /// connections too: claims, reads, the heartbeat).
    fn writers(&self) -> usize {
        (self.opts.pool_size / 2).clamp(1, 4)
    }

    fn apply(&self, ops: Vec<Op>) -> Result<Vec<Done>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let ctx = Ctx {
            node: self.opts.node.clone(),
            lease_ms: self.lease_ms(),
            now: now_ms(),
            wake: false,
        };
        self.run(move |c| {
            Box::pin(async move {
                // A batch that lost a race (a deadlock with another
                // transaction on the same rows) was rolled back whole, so
                // it is simply run again.
                let mut tries = 0;
                loop {
                    tries += 1;
                    match apply_batch(c, ops.clone(), ctx.clone()).await {
                        Err(StoreError::Conflict { op, message }) if tries < CONFLICT_TRIES => {
                            tracing::debug!(op, %message, tries, "batch lost a race; running it again");
                        }
                        r => return r,
                    }
                }
            })
        })
    }

    fn delivery(&self, id: DeliveryId) -> Result<Option<Delivery>, StoreError> {
        self.read(
            "read delivery",
            format!("SELECT {COLS} FROM deliveries d WHERE d.id = $1"),
            vec![boxed(uuid(id.0))],
            |rows| rows.first().map(row_delivery).transpose(),
        )
    }

    fn body(&self, id: DeliveryId) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(
            "read body",
            "SELECT body FROM deliveries WHERE id = $1".into(),
            vec![boxed(uuid(id.0))],
            |rows| Ok(rows.first().map(|r| r.get(0))),
        )
    }

    fn attempts(&self, id: DeliveryId) -> Result<Vec<Attempt>, StoreError> {
        self.read(
            "read attempts",
            "SELECT record::text FROM attempts WHERE delivery = $1 ORDER BY number".into(),
            vec![boxed(uuid(id.0))],
            |rows| {
                rows.iter()
                    .map(|r| from_json(r.get::<_, String>(0).as_bytes(), "attempt"))
                    .collect()
            },
        )
    }

    fn event(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        self.read(
            "read event",
            "SELECT e.accepted_at, d.id FROM events e LEFT JOIN deliveries d ON d.event_id = e.id \
             WHERE e.id = $1 ORDER BY d.id"
                .into(),
            vec![boxed(id.to_string())],
            {
                let id = id.to_string();
                move |rows| {
                    let Some(first) = rows.first() else {
                        return Ok(None);
                    };
                    Ok(Some(EventRecord {
                        id: id.clone(),
                        accepted_at: first.get::<_, i64>(0) as u64,
                        deliveries: rows
                            .iter()
                            .filter_map(|r| r.get::<_, Option<Uuid>>(1))
                            .map(|u| DeliveryId(u.as_u128()))
                            .collect(),
                    }))
                }
            },
        )
    }

    fn due(
        &self,
        _after: Option<DueKey>,
        now: u64,
        limit: usize,
        _busy: &dyn Fn(DeliveryId) -> bool,
        body_cap: usize,
    ) -> Result<DueScan, StoreError> {
        // Deliveries this node holds are leased, so the claim cannot find
        // them: neither a cursor nor the busy check is needed.
        let node = self.opts.node.clone();
        let lease_until = (now + self.lease_ms()) as i64;
        let now = now as i64;
        let limit = limit as i64;
        let cap = body_cap.min(i32::MAX as usize) as i32;
        // A WebSocket delivery goes to a node with a client of its space,
        // or to any node (which parks it) when no live node has one.
        let spaces = self
            .spaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let alive_since = now - self.lease_ms() as i64;
        self.run(move |c| {
            Box::pin(async move {
                let mut scan = DueScan::default();
                if limit > 0 {
                    let sql = format!(
                        "WITH c AS (SELECT id FROM deliveries w WHERE state = 'pending' \
                           AND next_attempt_at <= $1 AND (lease_until IS NULL OR lease_until < $1) \
                           AND (w.space IS NULL OR w.space = ANY($6) OR NOT EXISTS \
                             (SELECT 1 FROM nodes n WHERE n.id <> $3 AND n.heartbeat_at > $7 \
                              AND w.space = ANY(n.spaces))) \
                           ORDER BY next_attempt_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
                         UPDATE deliveries d SET owner = $3, lease_until = $4, epoch = d.epoch + 1 \
                         FROM c WHERE d.id = c.id \
                         RETURNING {COLS}, d.epoch, \
                           CASE WHEN octet_length(d.body) <= $5 THEN d.body END"
                    );
                    let stmt = c.prepare_cached(&sql).await.map_err(pg("claim"))?;
                    let rows = c
                        .query(
                            &stmt,
                            &[
                                &now,
                                &limit,
                                &node,
                                &lease_until,
                                &cap,
                                &spaces,
                                &alive_since,
                            ],
                        )
                        .await
                        .map_err(pg("claim"))?;
                    for r in &rows {
                        scan.found.push(Due {
                            delivery: row_delivery(r)?,
                            body: r.get(NCOLS + 1),
                            claim: Some(Claim {
                                epoch: r.get::<_, i64>(NCOLS) as u64,
                                at: now as u64,
                            }),
                        });
                    }
                    scan.found
                        .sort_by_key(|d| (d.delivery.next_attempt_at.unwrap_or(0), d.delivery.id));
                    scan.more = scan.found.len() as i64 >= limit;
                } else {
                    scan.more = true;
                }
                let stmt = c
                    .prepare_cached(
                        "SELECT min(next_attempt_at) FROM deliveries \
                         WHERE state = 'pending' AND next_attempt_at > $1",
                    )
                    .await
                    .map_err(pg("claim"))?;
                let next: Option<i64> = c
                    .query_one(&stmt, &[&now])
                    .await
                    .map_err(pg("claim"))?
                    .get(0);
                scan.next_due = next.map(|t| t as u64);
                Ok(scan)
            })
        })
    }

    fn watch(&self, wake: Arc<tokio::sync::Notify>) {
        self.listen_for_work(wake);
    }

    fn renew(&self, ids: &[DeliveryId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = ids.iter().map(|d| uuid(d.0)).collect();
        let until = (now_ms() + self.lease_ms()) as i64;
        let node = self.opts.node.clone();
        self.run(move |c| {
            Box::pin(async move {
                // Rows another transaction holds are skipped, not waited
                // for: renewing hundreds of rows in whatever order they
                // come deadlocked with this node's own batch of finishes
                // (40P01, seen in the database-restart test). A row held is
                // being finished or changed right now, and one that is not
                // is renewed again a third of a lease later.
                let stmt = c
                    .prepare_cached(
                        "UPDATE deliveries d SET lease_until = $1 \
                         FROM (SELECT id FROM deliveries WHERE id = ANY($2) AND owner = $3 \
                               FOR UPDATE SKIP LOCKED) c \
                         WHERE d.id = c.id",
                    )
                    .await
                    .map_err(pg("renew leases"))?;
                c.execute(&stmt, &[&until, &ids, &node])
                    .await
                    .map_err(pg("renew leases"))?;
                Ok(())
            })
        })
    }

    fn release(&self, claims: &[(DeliveryId, u64)]) -> Result<(), StoreError> {
        if claims.is_empty() {
            return Ok(());
        }
        let (ids, epochs): (Vec<Uuid>, Vec<i64>) =
            claims.iter().map(|(d, e)| (uuid(d.0), *e as i64)).unzip();
        let node = self.opts.node.clone();
        self.run(move |c| {
            Box::pin(async move {
                let stmt = c
                    .prepare_cached(
                        "UPDATE deliveries d SET owner = NULL, lease_until = NULL \
                         FROM unnest($1::uuid[], $2::bigint[]) AS u(id, epoch) \
                         WHERE d.id = u.id AND d.epoch = u.epoch AND d.owner = $3",
                    )
                    .await
                    .map_err(pg("release claims"))?;
                c.execute(&stmt, &[&ids, &epochs, &node])
                    .await
                    .map_err(pg("release claims"))?;
                c.batch_execute(&format!("NOTIFY {WAKE_CHANNEL}"))
                    .await
                    .map_err(pg("release claims"))?;
                Ok(())
            })
        })
    }

    fn space_elsewhere(&self, space: &str) -> Result<bool, StoreError> {
        self.read(
            "find websocket clients",
            "SELECT EXISTS (SELECT 1 FROM nodes WHERE id <> $1 AND heartbeat_at > $2 \
             AND $3 = ANY(spaces))"
                .into(),
            vec![
                boxed(self.opts.node.clone()),
                boxed(now_ms() as i64 - self.lease_ms() as i64),
                boxed(space.to_string()),
            ],
            |rows| Ok(rows[0].get(0)),
        )
    }

    fn heartbeat(&self, me: &NodeInfo) -> Result<Vec<NodeInfo>, StoreError> {
        *self.spaces.lock().unwrap_or_else(|e| e.into_inner()) = me.spaces.clone();
        let me = me.clone();
        self.run(move |c| {
            Box::pin(async move {
                let now = now_ms() as i64;
                c.execute(
                    "INSERT INTO nodes (id, version, rules_digest, addr, started_at, heartbeat_at, spaces) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET \
                     version = EXCLUDED.version, rules_digest = EXCLUDED.rules_digest, \
                     addr = EXCLUDED.addr, heartbeat_at = EXCLUDED.heartbeat_at, \
                     spaces = EXCLUDED.spaces",
                    &[
                        &me.id,
                        &me.version,
                        &me.rules_digest,
                        &me.addr,
                        &(me.started_at as i64),
                        &now,
                        &me.spaces,
                    ],
                )
                .await
                .map_err(pg("heartbeat"))?;
                c.execute(
                    "WITH gone AS (DELETE FROM nodes WHERE heartbeat_at < $1 RETURNING id) \
                     DELETE FROM rule_versions_running r USING gone WHERE r.node = gone.id",
                    &[&(now - FORGET_NODE_MS)],
                )
                .await
                .map_err(pg("heartbeat"))?;
                let rows = c
                    .query(
                        "SELECT id, version, rules_digest, addr, started_at, heartbeat_at, spaces \
                         FROM nodes ORDER BY id",
                        &[],
                    )
                    .await
                    .map_err(pg("heartbeat"))?;
                Ok(rows
                    .iter()
                    .map(|r| NodeInfo {
                        id: r.get(0),
                        version: r.get(1),
                        rules_digest: r.get(2),
                        addr: r.get(3),
                        started_at: r.get::<_, i64>(4) as u64,
                        heartbeat_at: r.get::<_, i64>(5) as u64,
                        spaces: r.get(6),
                    })
                    .collect())
            })
        })
    }

    fn lanes(
        &self,
        filter: &LaneFilter,
        after: Option<&str>,
        limit: usize,
        budget: usize,
    ) -> Result<Vec<LaneInfo>, StoreError> {
        let limit = limit.min(budget.max(1)).min(i64::MAX as usize) as i64;
        let sql = format!(
            "SELECT {COLS}, l.key, \
               (SELECT count(*) FROM deliveries w WHERE w.lane = l.key AND w.state = 'waiting'), \
               (SELECT w.id FROM deliveries w WHERE w.lane = l.key AND w.state = 'waiting' \
                ORDER BY w.lane_seq LIMIT 1) \
             FROM lanes l JOIN deliveries d ON d.id = l.head \
             WHERE ($1::text IS NULL OR l.key > $1) \
               AND ($2::text IS NULL OR starts_with(l.key, $2 || '/')) \
             ORDER BY l.key LIMIT $3"
        );
        let filter = filter.clone();
        self.read(
            "lanes",
            sql,
            vec![
                boxed(after.map(str::to_string)),
                boxed(filter.rule.clone()),
                boxed(limit),
            ],
            move |rows| {
                let mut out = Vec::new();
                for r in &rows {
                    let info = row_lane(r)?;
                    if filter.keeps(&info) {
                        out.push(info);
                    }
                }
                Ok(out)
            },
        )
    }

    fn lane(&self, lane: &str) -> Result<Option<LaneInfo>, StoreError> {
        let sql = format!(
            "SELECT {COLS}, l.key, \
               (SELECT count(*) FROM deliveries w WHERE w.lane = l.key AND w.state = 'waiting'), \
               (SELECT w.id FROM deliveries w WHERE w.lane = l.key AND w.state = 'waiting' \
                ORDER BY w.lane_seq LIMIT 1) \
             FROM lanes l JOIN deliveries d ON d.id = l.head WHERE l.key = $1"
        );
        self.read("lane", sql, vec![boxed(lane.to_string())], |rows| {
            rows.first().map(row_lane).transpose()
        })
    }

    fn lane_stats(&self) -> Result<LaneStats, StoreError> {
        self.read(
            "lane stats",
            "SELECT (SELECT count(*) FROM lanes WHERE head IS NOT NULL), \
                    (SELECT count(*) FROM deliveries WHERE state = 'parked' AND starts_with(parked_on, $1)), \
                    (SELECT count(*) FROM deliveries WHERE state = 'waiting'), \
                    (SELECT id FROM deliveries WHERE state = 'waiting' ORDER BY id LIMIT 1)"
                .into(),
            vec![boxed(LANE_PARK_PREFIX.to_string())],
            |rows| {
                let r = &rows[0];
                let oldest: Option<Uuid> = r.get(3);
                Ok(LaneStats {
                    lanes: r.get::<_, i64>(0) as u64,
                    halted: r.get::<_, i64>(1) as u64,
                    waiting: r.get::<_, i64>(2) as u64,
                    oldest_waiting_at: oldest.map(|u| DeliveryId(u.as_u128()).created_ms()),
                })
            },
        )
    }

    fn backlog(&self) -> Result<(u64, u64), StoreError> {
        self.read(
            "count",
            "SELECT (SELECT count(*) FROM deliveries WHERE state = 'pending'), \
                    (SELECT count(*) FROM deliveries WHERE state = 'parked')"
                .into(),
            vec![],
            |rows| {
                let r = &rows[0];
                Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
            },
        )
    }

    fn endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        self.read(
            "endpoints",
            "SELECT record::text FROM endpoints ORDER BY endpoint".into(),
            vec![],
            |rows| {
                rows.iter()
                    .map(|r| from_json(r.get::<_, String>(0).as_bytes(), "endpoint"))
                    .collect()
            },
        )
    }

    fn parked_count(&self, endpoint: &str) -> Result<u64, StoreError> {
        self.read(
            "parked",
            "SELECT count(*) FROM deliveries WHERE state = 'parked' AND parked_on = $1".into(),
            vec![boxed(endpoint.to_string())],
            |rows| Ok(rows[0].get::<_, i64>(0) as u64),
        )
    }

    fn pending_groups(&self, budget: usize) -> Result<PendingCounts, StoreError> {
        // The budget's worth due first, through the due index, and one row
        // more: whether it exists says whether that was all.
        self.read(
            "pending",
            "SELECT rule, rule_version, space, count(*) FILTER (WHERE n <= $1::bigint), max(n) FROM \
             (SELECT rule, rule_version, space, \
                     row_number() OVER (ORDER BY next_attempt_at, id) AS n \
              FROM deliveries WHERE state = 'pending' \
              ORDER BY next_attempt_at, id LIMIT $1::bigint + 1) d \
             GROUP BY rule, rule_version, space ORDER BY rule, rule_version, space"
                .into(),
            vec![boxed(budget as i64)],
            move |rows| {
                let complete = rows.iter().all(|r| r.get::<_, i64>(4) <= budget as i64);
                let groups = rows
                    .iter()
                    .map(|r| {
                        let group = PendingGroup {
                            rule: r.get(0),
                            version: r.get(1),
                            space: r.get(2),
                        };
                        (group, r.get::<_, i64>(3) as u64)
                    })
                    .filter(|(_, n)| *n > 0)
                    .collect();
                Ok(PendingCounts { groups, complete })
            },
        )
    }

    fn parked_by_prefix(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(
            "parked",
            "SELECT parked_on, count(*) FROM deliveries \
             WHERE state = 'parked' AND starts_with(parked_on, $1) \
             GROUP BY parked_on ORDER BY parked_on"
                .into(),
            vec![boxed(prefix.to_string())],
            |rows| {
                Ok(rows
                    .iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
                    .collect())
            },
        )
    }

    fn page(
        &self,
        filter: &Filter,
        before: Option<DeliveryId>,
        limit: usize,
        budget: usize,
    ) -> Result<Page, StoreError> {
        let (lower, upper) = filter.id_range(before);
        if limit == 0 || lower > upper {
            return Ok(Page::default());
        }
        let mut sql = format!(
            "SELECT {COLS}, a.record::text FROM deliveries d \
             LEFT JOIN attempts a ON a.delivery = d.id AND a.number = d.attempts \
             WHERE d.id BETWEEN $1 AND $2"
        );
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> =
            vec![boxed(uuid(lower)), boxed(uuid(upper))];
        let mut arg = |sql: &mut String, cond: &str, v: Box<dyn ToSql + Sync + Send>| {
            params.push(v);
            sql.push_str(&cond.replace('?', &format!("${}", params.len())));
        };
        if let Some(rule) = &filter.rule {
            arg(&mut sql, " AND d.rule = ?", boxed(rule.clone()));
        }
        if let Some(event) = &filter.event {
            arg(&mut sql, " AND d.event_id = ?", boxed(event.clone()));
        }
        if let Some(state) = filter.state {
            arg(
                &mut sql,
                " AND d.state = ?",
                boxed(state.as_str().to_string()),
            );
        }
        match filter.status_code {
            Some(StatusMatch::Code(c)) => {
                arg(&mut sql, " AND d.last_status = ?", boxed(i32::from(c)))
            }
            Some(StatusMatch::Class(c)) => arg(
                &mut sql,
                " AND d.last_status / 100 = ?",
                boxed(i32::from(c)),
            ),
            None => {}
        }
        // The endpoint filter needs the last attempt's URL: up to the
        // budget of candidates are checked here. One row more than is
        // looked at tells whether older ones exist.
        let post = filter.endpoint.clone();
        let cap = if post.is_some() {
            budget.max(1)
        } else {
            limit.min(budget.max(1))
        };
        arg(
            &mut sql,
            " ORDER BY d.id DESC LIMIT ?",
            boxed(cap.saturating_add(1).min(i64::MAX as usize) as i64),
        );
        self.read("list", sql, params, move |rows| {
            let mut page = Page::default();
            let mut last = None;
            for r in rows.iter().take(cap) {
                let d = row_delivery(r)?;
                let a = attempt_of(r.get(NCOLS))?;
                page.scanned += 1;
                last = Some(d.id);
                if post.as_ref().is_none_or(|ep| ep.matches(&d, a.as_ref())) {
                    page.deliveries.push(d);
                    if page.deliveries.len() >= limit {
                        break;
                    }
                }
            }
            // A fetched row not looked at: something older may match.
            if rows.len() > page.scanned {
                page.next_before = last;
            }
            Ok(page)
        })
    }

    fn counts(&self, cap: u64) -> Result<(StateCounts, bool), StoreError> {
        let cap = cap.min(i64::MAX as u64) as i64;
        self.read(
            "count",
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM deliveries WHERE state = 'pending' LIMIT $1) x), \
                    (SELECT count(*) FROM (SELECT 1 FROM deliveries WHERE state = 'parked' LIMIT $1) x), \
                    (SELECT count(*) FROM (SELECT 1 FROM deliveries WHERE state = 'succeeded' LIMIT $1) x), \
                    (SELECT count(*) FROM (SELECT 1 FROM deliveries WHERE state = 'failed' LIMIT $1) x), \
                    (SELECT count(*) FROM (SELECT 1 FROM deliveries WHERE state = 'skipped' LIMIT $1) x), \
                    (SELECT count(*) FROM (SELECT 1 FROM deliveries WHERE state = 'waiting' LIMIT $1) x)"
                .into(),
            vec![boxed(cap)],
            move |rows| {
                let r = &rows[0];
                let n: Vec<i64> = (0..6).map(|i| r.get(i)).collect();
                let exact = n.iter().all(|&v| v < cap);
                Ok((
                    StateCounts {
                        pending: n[0] as u64,
                        parked: n[1] as u64,
                        succeeded: n[2] as u64,
                        failed: n[3] as u64,
                        skipped: n[4] as u64,
                        waiting: n[5] as u64,
                    },
                    exact,
                ))
            },
        )
    }

    fn recent(
        &self,
        since_ms: u64,
        limit: usize,
    ) -> Result<Vec<(Delivery, Option<Attempt>)>, StoreError> {
        self.read(
            "recent",
            format!(
                "SELECT {COLS}, a.record::text FROM deliveries d \
                 LEFT JOIN attempts a ON a.delivery = d.id AND a.number = d.attempts \
                 WHERE d.id >= $1 ORDER BY d.id DESC LIMIT $2"
            ),
            vec![
                boxed(uuid(u128::from(since_ms) << 80)),
                boxed(limit.min(i64::MAX as usize) as i64),
            ],
            |rows| {
                rows.iter()
                    .map(|r| Ok((row_delivery(r)?, attempt_of(r.get(NCOLS))?)))
                    .collect()
            },
        )
    }

    fn last_attempts(&self, list: &[Delivery]) -> Result<Vec<Option<Attempt>>, StoreError> {
        let wanted: Vec<&Delivery> = list.iter().filter(|d| d.attempts > 0).collect();
        if wanted.is_empty() {
            return Ok(vec![None; list.len()]);
        }
        let ids: Vec<Uuid> = wanted.iter().map(|d| uuid(d.id.0)).collect();
        let numbers: Vec<i32> = wanted.iter().map(|d| d.attempts as i32).collect();
        let mut found = self.read(
            "read attempts",
            "SELECT a.delivery, a.record::text FROM attempts a \
             JOIN unnest($1::uuid[], $2::int[]) AS u(id, n) ON a.delivery = u.id AND a.number = u.n"
                .into(),
            vec![boxed(ids), boxed(numbers)],
            |rows| {
                let mut m = HashMap::new();
                for r in &rows {
                    let id: Uuid = r.get(0);
                    m.insert(
                        id.as_u128(),
                        from_json::<Attempt>(r.get::<_, String>(1).as_bytes(), "attempt")?,
                    );
                }
                Ok(m)
            },
        )?;
        Ok(list
            .iter()
            .map(|d| {
                if d.attempts == 0 {
                    None
                } else {
                    found.remove(&d.id.0)
                }
            })
            .collect())
    }

    fn import(&self, part: Export) -> Result<usize, StoreError> {
        self.run(move |c| Box::pin(import(c, part)))
    }

    fn rule_versions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(
            "read rule versions",
            "SELECT version, spec FROM rule_versions ORDER BY version".into(),
            vec![],
            |rows| Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect()),
        )
    }

    fn unused_rule_versions(&self, before_ms: u64) -> Result<Vec<String>, StoreError> {
        self.read(
            "read rule versions",
            "SELECT v.version FROM rule_versions v WHERE v.retired_at < $1 AND NOT EXISTS \
             (SELECT 1 FROM deliveries d WHERE d.rule_version = v.version \
              AND d.state IN ('pending', 'parked', 'waiting')) ORDER BY v.version"
                .into(),
            vec![boxed(before_ms as i64)],
            |rows| Ok(rows.iter().map(|r| r.get(0)).collect()),
        )
    }
}
