//! The store's lifecycle suite: the contract's behaviour, run against both
//! backends (a real redb file, and a real PostgreSQL server started for the
//! tests). Every step of a delivery's life keeps the backend's invariants
//! (`check_invariants`), listing finds what the filters ask for. Then what
//! only one backend has: redb's migration of old files and its due-index
//! cursor, postgres' claims and fencing.

use super::postgres::Postgres;
use super::*;
use ::redb::TableHandle;
use schema::*;

#[path = "../../../tests/support/postgres.rs"]
mod pg;

/// A place a test can open a store in, and open it again (a restart).
trait Db {
    fn open(&self) -> Store;
}

/// A database file in a fresh directory, removed when dropped.
struct TempDb {
    dir: std::path::PathBuf,
}

impl TempDb {
    fn new(name: &str) -> TempDb {
        let dir = std::env::temp_dir().join(format!(
            "rulehook-store-{name}-{}-{:x}",
            std::process::id(),
            DeliveryId::new().0
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDb { dir }
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.join("rulehook.redb")
    }
}

impl TempDb {
    /// The embedded store itself, for tests that reach into its tables.
    fn redb(&self) -> Redb {
        Redb::open_with(
            &self.path(),
            RedbOptions {
                cache_bytes: 1 << 20,
                ..RedbOptions::default()
            },
        )
        .unwrap()
    }
}

impl Db for TempDb {
    fn open(&self) -> Store {
        Store::open(&self.path(), 1 << 20).unwrap()
    }
}

/// A fresh database on the tests' PostgreSQL server.
struct PgDb {
    _server: std::sync::Arc<pg::PgServer>,
    url: String,
    node: String,
}

impl PgDb {
    fn new(name: &str) -> PgDb {
        let (server, url) = pg::fresh_db(name);
        PgDb {
            _server: server,
            url,
            node: "node-a".into(),
        }
    }

    /// The same database as another node sees it.
    fn as_node(&self, node: &str) -> Postgres {
        Postgres::connect(
            &self.url,
            postgres::PgOptions {
                node: node.into(),
                lease: std::time::Duration::from_millis(300),
                ..Default::default()
            },
        )
        .unwrap()
    }
}

impl Db for PgDb {
    fn open(&self) -> Store {
        Store::new(self.as_node(&self.node))
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn new_event(id: &str, rules: &[&str]) -> NewEvent {
    NewEvent {
        id: id.into(),
        deliveries: rules
            .iter()
            .map(|r| NewDelivery {
                id: DeliveryId::new(),
                rule: (*r).into(),
                state: State::Pending,
                reason: None,
                body: bytes::Bytes::from(format!("{{\"event\":\"{id}\",\"rule\":\"{r}\"}}")),
                unbuilt: false,
                space: None,
                rule_version: Some(format!("version-of-{r}")),
                lane: None,
            })
            .collect(),
    }
}

/// An event whose one delivery (rule `r`) joins lane `lane`.
fn ordered_event(id: &str, lane: &str, halt: bool) -> NewEvent {
    let mut ev = new_event(id, &["r"]);
    ev.deliveries[0].lane = Some(NewLane {
        key: lane.into(),
        halt,
    });
    ev
}

/// Accepts the events in one batch: each one's delivery, and whether it waits.
fn accept_ordered(store: &Store, events: Vec<NewEvent>) -> Vec<(DeliveryId, bool)> {
    let done = store
        .apply(events.into_iter().map(Op::Accept).collect())
        .unwrap();
    done.into_iter()
        .map(|d| match d {
            Done::Accepted {
                deliveries,
                waiting,
                ..
            } => (deliveries[0], waiting.contains(&deliveries[0])),
            other => panic!("accept gave {other:?}"),
        })
        .collect()
}

/// Records an attempt and returns what the store says.
fn finish_with(store: &Store, id: DeliveryId, number: u32, next: Next) -> Done {
    store
        .apply(vec![Op::Finish {
            id,
            attempt: Some(attempt(number, 500)),
            next,
            epoch: None,
        }])
        .unwrap()
        .remove(0)
}

/// The ids the due index gives, by id: what may be sent within the next
/// ten minutes. Scanning that far ahead also passes the accepting node's
/// claims (postgres), and what it claims it hands back at once, so the
/// next look finds the same.
fn due_ids(store: &Store) -> Vec<DeliveryId> {
    let found = store
        .due(None, now_ms() + 600_000, 100, &|_| false, 0)
        .unwrap()
        .found;
    let claims: Vec<(DeliveryId, u64)> = found
        .iter()
        .filter_map(|d| d.claim.map(|c| (d.delivery.id, c.epoch)))
        .collect();
    store.release(&claims).unwrap();
    let mut ids: Vec<DeliveryId> = found.into_iter().map(|d| d.delivery.id).collect();
    ids.sort();
    ids
}

fn accept(store: &Store, ev: NewEvent) -> Vec<DeliveryId> {
    match store.apply(vec![Op::Accept(ev)]).unwrap().remove(0) {
        Done::Accepted { deliveries, .. } => deliveries,
        other => panic!("accept gave {other:?}"),
    }
}

fn attempt(number: u32, status: u16) -> Attempt {
    Attempt {
        number,
        started_at: now_ms(),
        duration_ms: 1,
        url: "https://example.test/hook".into(),
        method: "POST".into(),
        request_headers: vec![("content-type".into(), "application/json".into())],
        status: Some(status),
        reason_phrase: None,
        response_headers: Vec::new(),
        response_body: None,
        response_truncated: false,
        error: None,
        outcome: "test".into(),
    }
}

fn finish(store: &Store, id: DeliveryId, number: u32, status: u16, next: Next) {
    let done = store
        .apply(vec![Op::Finish {
            id,
            attempt: Some(attempt(number, status)),
            next,
            epoch: None,
        }])
        .unwrap();
    assert_eq!(done, vec![Done::Finished { promoted: None }]);
}

/// One compaction step: (events removed, where to resume).
fn compact(
    store: &Store,
    before_ms: u64,
    after: Option<u128>,
    limit: usize,
) -> (usize, Option<u128>) {
    let op = Op::Compact {
        before_ms,
        after,
        limit,
    };
    match store.apply(vec![op]).unwrap().remove(0) {
        Done::Compacted { removed, resume } => (removed, resume),
        other => panic!("compact gave {other:?}"),
    }
}

fn ids(list: Vec<Delivery>) -> Vec<DeliveryId> {
    list.into_iter().map(|d| d.id).collect()
}

fn listed(
    store: &Store,
    rule: Option<&str>,
    event: Option<&str>,
    state: Option<State>,
) -> Vec<DeliveryId> {
    let filter = Filter {
        rule: rule.map(Into::into),
        event: event.map(Into::into),
        state,
        ..Filter::default()
    };
    ids(store.list(&filter, None, 100).unwrap())
}

fn a_delivery_moves_through_its_states_with_the_indexes_in_step(db: &dyn Db) {
    let store = db.open();
    let a = accept(&store, new_event("e1", &["r1", "r2"]));
    store.check_invariants();
    assert_eq!(
        store.body(a[0]).unwrap().unwrap(),
        br#"{"event":"e1","rule":"r1"}"#
    );

    // Each step: the op, then the state the delivery must be in.
    let steps: Vec<(Op, State)> = vec![
        (
            Op::Finish {
                id: a[0],
                attempt: Some(attempt(1, 500)),
                next: Next::Retry {
                    at: now_ms() + 60_000,
                },
                epoch: None,
            },
            State::Pending,
        ),
        (
            Op::Finish {
                id: a[0],
                attempt: Some(attempt(2, 503)),
                next: Next::Park {
                    endpoint: "https://example.test:443".into(),
                    reason: "blocked".into(),
                },
                epoch: None,
            },
            State::Parked,
        ),
        (
            Op::Unpark {
                endpoint: "https://example.test:443".into(),
                limit: 10,
            },
            State::Pending,
        ),
        (
            Op::Finish {
                id: a[0],
                attempt: Some(attempt(3, 200)),
                next: Next::Succeeded,
                epoch: None,
            },
            State::Succeeded,
        ),
        (
            Op::Redeliver {
                id: a[0],
                body: Rebuilt::Same,
                rebind: None,
            },
            State::Pending,
        ),
        (
            Op::Finish {
                id: a[0],
                attempt: Some(attempt(4, 400)),
                next: Next::Failed("gave up".into()),
                epoch: None,
            },
            State::Failed,
        ),
    ];
    for (op, want) in steps {
        let what = format!("{op:?}");
        store.apply(vec![op]).unwrap();
        let d = store.delivery(a[0]).unwrap().unwrap();
        assert_eq!(d.state, want, "after {what}");
        store.check_invariants();
        for state in [
            State::Pending,
            State::Parked,
            State::Succeeded,
            State::Failed,
            State::Skipped,
        ] {
            let found = listed(&store, None, None, Some(state)).contains(&a[0]);
            assert_eq!(found, state == want, "listing {state:?} after {what}");
        }
    }
    let numbers: Vec<u32> = store
        .attempts(a[0])
        .unwrap()
        .iter()
        .map(|x| x.number)
        .collect();
    assert_eq!(numbers, [1, 2, 3, 4]);
    assert_eq!(store.delivery(a[0]).unwrap().unwrap().attempts, 4);
    // The other delivery of the event never moved.
    assert_eq!(listed(&store, None, None, Some(State::Pending)), vec![a[1]]);
}

fn listing_filters_combine_and_page_newest_first(db: &dyn Db) {
    let store = db.open();
    let e1 = accept(&store, new_event("e1", &["r1", "r2"]));
    let e2 = accept(&store, new_event("e2", &["r1"]));
    let e3 = accept(&store, new_event("e3", &["r2", "r1"]));
    finish(&store, e1[0], 1, 200, Next::Succeeded);
    finish(&store, e3[1], 1, 200, Next::Succeeded);
    finish(&store, e2[0], 1, 404, Next::Failed("404".into()));
    store.check_invariants();

    let s = Some(State::Succeeded);
    let p = Some(State::Pending);
    // (rule, event, state) → the deliveries listed, newest first.
    type Case<'a> = (
        Option<&'a str>,
        Option<&'a str>,
        Option<State>,
        Vec<DeliveryId>,
    );
    let cases: Vec<Case<'_>> = vec![
        (None, None, None, vec![e3[1], e3[0], e2[0], e1[1], e1[0]]),
        (Some("r1"), None, None, vec![e3[1], e2[0], e1[0]]),
        (None, Some("e1"), None, vec![e1[1], e1[0]]),
        (None, Some("e3"), None, vec![e3[1], e3[0]]),
        (None, Some("nope"), None, vec![]),
        (None, None, s, vec![e3[1], e1[0]]),
        (None, None, p, vec![e3[0], e1[1]]),
        (None, None, Some(State::Failed), vec![e2[0]]),
        (None, None, Some(State::Parked), vec![]),
        (Some("r1"), None, s, vec![e3[1], e1[0]]),
        (Some("r2"), None, p, vec![e3[0], e1[1]]),
        (None, Some("e1"), p, vec![e1[1]]),
        (Some("r2"), Some("e3"), None, vec![e3[0]]),
    ];
    for (rule, event, state, want) in cases {
        assert_eq!(
            listed(&store, rule, event, state),
            want,
            "rule {rule:?} event {event:?} state {state:?}"
        );
    }

    // Pages of two, for each way of listing: together they are the whole list.
    for filter in [
        Filter::default(),
        Filter {
            rule: Some("r1".into()),
            ..Filter::default()
        },
        Filter {
            state: p,
            ..Filter::default()
        },
        Filter {
            state: s,
            ..Filter::default()
        },
        Filter {
            event: Some("e3".into()),
            ..Filter::default()
        },
    ] {
        let whole = ids(store.list(&filter, None, 100).unwrap());
        let mut paged = Vec::new();
        let mut before = None;
        loop {
            let page = ids(store.list(&filter, before, 2).unwrap());
            assert!(page.len() <= 2);
            let Some(last) = page.last().copied() else {
                break;
            };
            paged.extend(page);
            before = Some(last);
        }
        assert_eq!(paged, whole, "{filter:?}");
    }
}

fn the_same_event_id_again_gives_the_same_deliveries_and_stores_nothing(db: &dyn Db) {
    let store = db.open();
    let first = accept(&store, new_event("e1", &["r1"]));
    let done = store
        .apply(vec![Op::Accept(new_event("e1", &["r1", "r2"]))])
        .unwrap();
    assert_eq!(
        done,
        vec![Done::Accepted {
            deliveries: first.clone(),
            duplicate: true,
            claim: None,
            waiting: Vec::new(),
        }]
    );
    assert_eq!(listed(&store, None, None, None), first);
    assert_eq!(store.event("e1").unwrap().unwrap().deliveries, first);
}

fn compaction_removes_old_finished_events_and_keeps_pending_ones(db: &dyn Db) {
    let store = db.open();
    let done = accept(&store, new_event("done", &["r1", "r2"]));
    let waiting = accept(&store, new_event("waiting", &["r1", "r2"]));
    finish(&store, done[0], 1, 200, Next::Succeeded);
    finish(&store, done[1], 1, 410, Next::Failed("gone".into()));
    finish(&store, waiting[0], 1, 200, Next::Succeeded);

    assert_eq!(compact(&store, now_ms() + 1, None, 100), (1, None));
    assert!(store.event("done").unwrap().is_none());
    assert!(store.delivery(done[0]).unwrap().is_none());
    assert!(store.body(done[1]).unwrap().is_none());
    assert!(store.attempts(done[0]).unwrap().is_empty());
    assert_eq!(
        listed(&store, None, None, None),
        vec![waiting[1], waiting[0]]
    );
    store.check_invariants();
}

#[test]
fn a_version_1_file_is_migrated_when_opened() {
    let db = TempDb::new("v1");
    let ids = {
        let store = db.open();
        let ids = accept(&store, new_event("e1", &["r1", "r2"]));
        finish(&store, ids[0], 1, 200, Next::Succeeded);
        // Turn it into what version 1 wrote: events keyed by the sender's id
        // with the event inside, an age index, a by-event index, pending in
        // the state index, version 1.
        drop(store);
        let raw = db.redb();
        let tx = raw.raw_write();
        {
            tx.delete_table(EVENTS).unwrap();
            tx.delete_table(EVENT_IDS).unwrap();
            let record = serde_json::json!({
                "id": "e1", "accepted_at": 1_700_000_000_000u64,
                "event": {"id": "e1", "event_type": "create"},
                "deliveries": ids,
            });
            tx.open_table(EVENTS_V1)
                .unwrap()
                .insert("e1", serde_json::to_vec(&record).unwrap().as_slice())
                .unwrap();
            tx.open_table(EVENT_TIMES_V1)
                .unwrap()
                .insert((1_700_000_000_000u64, "e1"), ())
                .unwrap();
            let mut by_event = tx.open_table(BY_EVENT_V1).unwrap();
            for id in &ids {
                by_event.insert(("e1", id.0), ()).unwrap();
            }
            tx.open_table(BY_STATE)
                .unwrap()
                .insert(("pending", ids[1].0), ())
                .unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", 1)
                .unwrap();
        }
        tx.commit().unwrap();
        ids
    };
    let store = db.open();
    store.check_invariants();
    drop(store);
    let raw = db.redb();
    let tx = raw.read().unwrap();
    let names: Vec<String> = tx
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    for gone in [EVENTS_V1.name(), EVENT_TIMES_V1.name(), BY_EVENT_V1.name()] {
        assert!(
            !names.iter().any(|n| n == gone),
            "{gone} is still there: {names:?}"
        );
    }
    let version = tx
        .open_table(META)
        .unwrap()
        .get("schema_version")
        .unwrap()
        .unwrap()
        .value();
    assert_eq!(version, SCHEMA_VERSION);
    drop(tx);
    drop(raw);
    let store = db.open();
    assert_eq!(listed(&store, None, Some("e1"), None), vec![ids[1], ids[0]]);
    assert_eq!(
        listed(&store, None, None, Some(State::Pending)),
        vec![ids[1]]
    );
    assert_eq!(store.event("e1").unwrap().unwrap().deliveries, ids);
    // Its id still dedupes, and it ages out by its original time.
    let again = store
        .apply(vec![Op::Accept(new_event("e1", &["r1"]))])
        .unwrap();
    assert_eq!(
        again,
        vec![Done::Accepted {
            deliveries: ids.clone(),
            duplicate: true,
            claim: None,
            waiting: Vec::new(),
        }]
    );
    finish(&store, ids[1], 1, 200, Next::Succeeded);
    assert_eq!(compact(&store, 1_700_000_000_001, None, 10), (1, None));
    assert!(store.event("e1").unwrap().is_none());
}

/// Everything a store shows that a crash must keep: every event with its
/// deliveries, bodies and attempts, the endpoints, the lanes.
fn everything(store: &Store) -> String {
    let mut out = String::new();
    let mut after = None;
    loop {
        let part = store.export(after, 50).unwrap();
        out += &format!("{:?}{:?}", part.events, part.deliveries);
        match part.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let lanes = store
        .lanes(&LaneFilter::default(), None, 1000, 100_000)
        .unwrap();
    out + &format!("{:?}{:?}", store.endpoints().unwrap(), lanes)
}

/// A batch of each loggable kind, many times over: accepts (some into
/// ordered lanes), attempts that retry, succeed and park, endpoint state,
/// unparking; and now and then an event too big for the log (a durable
/// commit, which checkpoints it) between the logged batches.
fn logged_work(store: &Store, n: usize) {
    for i in 0..n {
        if i % 40 == 20 {
            let mut ev = new_event(&format!("too-big-{i}"), &["r1"]);
            // Past the log's 256 KiB record limit.
            ev.deliveries[0].body = bytes::Bytes::from(vec![b'y'; 300 << 10]);
            accept(store, ev);
        }
        let mut ev = new_event(&format!("crash-{i}"), &["r1", "r2"]);
        if i % 3 == 0 {
            ev.deliveries[1].lane = Some(NewLane {
                key: format!("r2/k{}", i % 4),
                halt: i % 2 == 0,
            });
        }
        let ids = accept(store, ev);
        let next = match i % 4 {
            0 => Next::Succeeded,
            1 => Next::Retry {
                at: now_ms() + 60_000,
            },
            2 => Next::Park {
                endpoint: "https://example.test:443".into(),
                reason: "blocked".into(),
            },
            _ => Next::Failed("410 Gone".into()),
        };
        store
            .apply(vec![
                Op::Finish {
                    id: ids[0],
                    attempt: Some(attempt(1, 503)),
                    next,
                    epoch: None,
                },
                Op::PutEndpoint(Endpoint {
                    endpoint: "https://example.test:443".into(),
                    consecutive_failures: i as u32,
                    blocks: 1,
                    blocked_until: Some(now_ms() + 1000),
                    disabled: false,
                    last_error: Some(format!("failure {i}")),
                    updated_at: now_ms(),
                }),
            ])
            .unwrap();
        if i % 10 == 9 {
            store
                .apply(vec![Op::Unpark {
                    endpoint: "https://example.test:443".into(),
                    limit: 2,
                }])
                .unwrap();
        }
    }
}

/// What a kill -9 leaves on disk is the two files as they are while the
/// store runs (the batches since the last checkpoint are in redb's memory
/// and in the commit log only): a copy of them taken then opens with every
/// batch that was answered, and with the log's copy removed it does not
/// (so the log is what kept them).
#[test]
fn a_crash_keeps_every_logged_batch() {
    let live = TempDb::new("crash-live");
    let store = live.open();
    logged_work(&store, 120);
    let want = everything(&store);
    let crashed = TempDb::new("crash-copy");
    let log_name = "rulehook.redb.log";
    std::fs::copy(live.path(), crashed.path()).unwrap();
    std::fs::copy(live.dir.join(log_name), crashed.dir.join(log_name)).unwrap();
    let without_log = TempDb::new("crash-nolog");
    std::fs::copy(live.path(), without_log.path()).unwrap();

    let recovered = crashed.open();
    recovered.check_invariants();
    assert_eq!(everything(&recovered), want);
    // It goes on from there: more work, a clean close, a reopen.
    logged_work(&recovered, 5);
    let more = everything(&recovered);
    drop(recovered);
    let reopened = crashed.open();
    reopened.check_invariants();
    assert_eq!(everything(&reopened), more);

    let behind = without_log.open();
    assert_ne!(
        everything(&behind),
        want,
        "the redb file alone held every batch: nothing was left to the log"
    );
    drop(store);
}

/// A log a crash left is applied even when the store is opened with the
/// log turned off, and is then removed: switching it off loses nothing.
#[test]
fn a_crash_log_is_applied_when_the_log_is_turned_off() {
    let live = TempDb::new("crash-off");
    let store = live.open();
    logged_work(&store, 30);
    let want = everything(&store);
    let crashed = TempDb::new("crash-off-copy");
    let log_name = "rulehook.redb.log";
    std::fs::copy(live.path(), crashed.path()).unwrap();
    std::fs::copy(live.dir.join(log_name), crashed.dir.join(log_name)).unwrap();
    let off = RedbOptions {
        cache_bytes: 1 << 20,
        commit_log: false,
        ..RedbOptions::default()
    };
    let recovered = Store::open_with(&crashed.path(), off).unwrap();
    recovered.check_invariants();
    assert_eq!(everything(&recovered), want);
    assert!(!crashed.dir.join(log_name).exists(), "the log was kept");
    drop(store);
}

/// A checkpoint (due here after 4 MiB of log) writes what the batches
/// before it hold; a crash after it needs only the batches since.
#[test]
fn a_crash_after_a_checkpoint_keeps_the_batches_before_and_after_it() {
    let live = TempDb::new("crash-cp");
    let store = live.open();
    let body = vec![b'x'; 64 << 10];
    for i in 0..160 {
        let mut ev = new_event(&format!("big-{i}"), &["r1"]);
        ev.deliveries[0].body = bytes::Bytes::from(body.clone());
        accept(&store, ev);
    }
    let log = live.dir.join("rulehook.redb.log");
    let want = everything(&store);
    let crashed = TempDb::new("crash-cp-copy");
    std::fs::copy(live.path(), crashed.path()).unwrap();
    std::fs::copy(&log, crashed.dir.join("rulehook.redb.log")).unwrap();
    // The log started over at each checkpoint: the file stays near the
    // 4 MiB a checkpoint is due at, not the 10 MiB accepted.
    let len = std::fs::metadata(&log).unwrap().len();
    assert!(len <= 6 << 20, "no checkpoint: the log is {len} bytes");
    let recovered = crashed.open();
    recovered.check_invariants();
    assert_eq!(everything(&recovered), want);
    assert_eq!(recovered.counts(1000).unwrap().0.pending, 160);
    drop(store);
}

#[test]
fn a_file_from_a_newer_rulehook_is_refused_with_its_version() {
    let db = TempDb::new("newer");
    {
        let store = db.open();
        drop(store);
        let raw = db.redb();
        let tx = raw.raw_write();
        tx.open_table(META)
            .unwrap()
            .insert("schema_version", SCHEMA_VERSION + 1)
            .unwrap();
        tx.commit().unwrap();
    }
    let err = Store::open(&db.path(), 1 << 20).err().expect("refused");
    let text = err.to_string();
    assert!(
        text.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
        "{text}"
    );
    assert!(text.contains("upgrade rulehook"), "{text}");
}

#[test]
fn due_scans_resume_behind_their_cursor_and_skip_busy_deliveries() {
    let db = TempDb::new("due");
    let store = db.open();
    let mut all = Vec::new();
    for i in 0..5 {
        all.extend(accept(&store, new_event(&format!("e{i}"), &["r1"])));
    }
    let later = accept(&store, new_event("later", &["r1"]))[0];
    let retry_at = now_ms() + 60_000;
    finish(&store, later, 1, 500, Next::Retry { at: retry_at });
    let now = now_ms();
    let busy = &|id: DeliveryId| id == all[1];
    let ids = |scan: &DueScan| scan.found.iter().map(|d| d.delivery.id).collect::<Vec<_>>();

    let first = store.due(None, now, 2, busy, 1 << 20).unwrap();
    assert_eq!(ids(&first), [all[0], all[2]], "busy ones are skipped");
    assert!(first.more);
    assert_eq!(first.next_due, Some(retry_at), "when to look again");
    assert_eq!(
        first.found[0].body.as_deref(),
        Some(&br#"{"event":"e0","rule":"r1"}"#[..])
    );

    let second = store.due(first.resume, now, 2, busy, 1 << 20).unwrap();
    assert_eq!(
        ids(&second),
        [all[3], all[4]],
        "resumed behind the first scan"
    );
    let third = store.due(second.resume, now, 2, busy, 1 << 20).unwrap();
    assert!(
        third.found.is_empty() && !third.more,
        "the retry is not due yet"
    );

    let small_cap = store.due(None, now, 10, &|_| false, 5).unwrap();
    assert_eq!(ids(&small_cap), all, "all five due now, oldest first");
    assert!(
        small_cap.found.iter().all(|d| d.body.is_none()),
        "bodies over the cap stay in the store"
    );
    assert_eq!(
        store
            .due(None, now + 60_001, 10, &|_| false, 5)
            .unwrap()
            .found
            .len(),
        6
    );
}

fn compaction_walks_past_old_events_that_are_kept(db: &dyn Db) {
    let store = db.open();
    // Five old events still pending at the head, then four finished ones.
    for i in 0..5 {
        accept(&store, new_event(&format!("stuck{i}"), &["r1"]));
    }
    let mut finished = Vec::new();
    for i in 0..4 {
        let ids = accept(&store, new_event(&format!("done{i}"), &["r1"]));
        finish(&store, ids[0], 1, 200, Next::Succeeded);
        finished.push(format!("done{i}"));
    }
    let before_ms = now_ms() + 1;
    let mut after = None;
    let mut removed = 0;
    let mut calls = 0;
    loop {
        calls += 1;
        let (n, resume) = compact(&store, before_ms, after, 2);
        removed += n;
        match resume {
            Some(key) => after = Some(key),
            None => break,
        }
    }
    assert_eq!(removed, 4);
    assert_eq!(calls, 5, "nine events, two at a time");
    for id in &finished {
        assert!(store.event(id).unwrap().is_none(), "{id} removed");
    }
    for i in 0..5 {
        assert!(
            store.event(&format!("stuck{i}")).unwrap().is_some(),
            "stuck{i} kept"
        );
    }
    store.check_invariants();
}

fn parked_deliveries_are_counted_per_endpoint_under_a_prefix(db: &dyn Db) {
    let store = db.open();
    let ids = accept(&store, new_event("e1", &["a", "b", "c", "d", "e"]));
    let park = |endpoint: &str| Next::Park {
        endpoint: endpoint.into(),
        reason: "waiting".into(),
    };
    let places = [
        "websocket:shared_spaces/1001",
        "websocket:shared_spaces/2002",
        "websocket:shared_spaces/2002",
        "https://example.test:443",
        "zzz:after-the-prefix",
    ];
    for (id, place) in ids.iter().zip(places) {
        finish(&store, *id, 1, 503, park(place));
    }
    assert_eq!(
        store.parked_by_prefix("websocket:shared_spaces/").unwrap(),
        [
            ("websocket:shared_spaces/1001".to_string(), 1),
            ("websocket:shared_spaces/2002".to_string(), 2),
        ]
    );
    assert_eq!(store.parked_by_prefix("ftp:").unwrap(), []);
    assert_eq!(store.parked_count("https://example.test:443").unwrap(), 1);
}

fn rule_versions_are_stored_once_and_a_redelivery_can_rebind(db: &dyn Db) {
    let store = db.open();
    let ids = accept(&store, new_event("evt-v", &["r"]));
    assert_eq!(
        store
            .delivery(ids[0])
            .unwrap()
            .unwrap()
            .rule_version
            .as_deref(),
        Some("version-of-r"),
        "ingest's binding is stored with the delivery"
    );
    let put = |rows: &[(&str, &str)]| {
        let rows = rows
            .iter()
            .map(|(v, j)| (v.to_string(), j.as_bytes().to_vec()))
            .collect();
        store
            .apply(vec![Op::PutRuleVersions {
                add: rows,
                running: vec!["v1".into(), "v2".into()],
                at: 1_000,
            }])
            .unwrap()
    };
    assert_eq!(
        put(&[("v1", "{\"a\":1}"), ("v2", "{\"a\":2}")]),
        vec![Done::RuleVersionsSaved]
    );
    // Equal versions have equal specs: an existing one is never rewritten.
    put(&[("v1", "{\"a\":\"other\"}")]);
    let stored = store.rule_versions().unwrap();
    assert_eq!(
        stored,
        vec![
            ("v1".to_string(), b"{\"a\":1}".to_vec()),
            ("v2".to_string(), b"{\"a\":2}".to_vec())
        ]
    );
    drop(store);
    let store = db.open();
    assert_eq!(
        store.rule_versions().unwrap().len(),
        2,
        "kept across a reopen"
    );

    // Redelivering keeps the binding unless asked to rebind.
    let redeliver = |rebind: Option<&str>| {
        store
            .apply(vec![Op::Redeliver {
                id: ids[0],
                body: Rebuilt::Same,
                rebind: rebind.map(str::to_string),
            }])
            .unwrap();
        store.delivery(ids[0]).unwrap().unwrap().rule_version
    };
    assert_eq!(redeliver(None).as_deref(), Some("version-of-r"));
    assert_eq!(redeliver(Some("v2")).as_deref(), Some("v2"));
    store.check_invariants();
}

fn retired_rule_versions_go_once_old_and_unused(db: &dyn Db) {
    let store = db.open();
    let put = |running: &[&str], at: u64| {
        let add = ["in-use", "unused", "back"]
            .iter()
            .map(|v| (v.to_string(), b"{}".to_vec()))
            .collect();
        let running = running.iter().map(|v| v.to_string()).collect();
        store
            .apply(vec![Op::PutRuleVersions { add, running, at }])
            .unwrap();
    };
    put(&["in-use", "unused", "back"], 1_000);
    assert!(
        store.unused_rule_versions(u64::MAX).unwrap().is_empty(),
        "all running"
    );
    // A reload retires all three at t=2,000; a pending delivery is bound to one.
    put(&[], 2_000);
    let mut ev = new_event("evt-gc", &["r"]);
    ev.deliveries[0].rule_version = Some("in-use".into());
    accept(&store, ev);
    assert!(
        store.unused_rule_versions(2_000).unwrap().is_empty(),
        "not old enough"
    );
    assert_eq!(
        store.unused_rule_versions(2_001).unwrap(),
        vec!["back".to_string(), "unused".to_string()],
        "the pending delivery keeps its version"
    );
    // `back` runs again before the clean-up commits: it is kept.
    put(&["back"], 3_000);
    let done = store
        .apply(vec![Op::DropRuleVersions(vec![
            "back".into(),
            "unused".into(),
        ])])
        .unwrap();
    assert_eq!(done, vec![Done::RuleVersionsDropped(vec!["unused".into()])]);
    let left: Vec<String> = store
        .rule_versions()
        .unwrap()
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    assert_eq!(left, vec!["back".to_string(), "in-use".to_string()]);
}

/// Every page of `filter`, `limit` rows and `budget` records at a time,
/// followed to the end: the ids in order, and how many pages it took.
fn all_pages(
    store: &Store,
    filter: &Filter,
    limit: usize,
    budget: usize,
) -> (Vec<DeliveryId>, usize) {
    let (mut out, mut pages, mut before) = (Vec::new(), 0, None);
    loop {
        let page = store.page(filter, before, limit, budget).unwrap();
        assert!(
            page.scanned <= budget,
            "a page looked at more than its budget"
        );
        pages += 1;
        out.extend(ids(page.deliveries));
        match page.next_before {
            Some(next) => before = Some(next),
            None => return (out, pages),
        }
        assert!(pages < 1000, "paging does not end");
    }
}

fn pages_follow_a_cursor_within_a_scan_budget_for_every_source(db: &dyn Db) {
    let store = db.open();
    let mut made = Vec::new();
    for i in 0..12 {
        made.extend(accept(&store, new_event(&format!("e{i}"), &["a", "b"])));
    }
    // Every third delivery fails with a 503, the others succeed; one stays pending.
    for (n, id) in made.iter().enumerate().skip(1) {
        if n % 3 == 0 {
            finish(&store, *id, 1, 503, Next::Failed("HTTP 503".into()));
        } else {
            finish(&store, *id, 1, 200, Next::Succeeded);
        }
    }
    let newest_first = |keep: &dyn Fn(usize) -> bool| -> Vec<DeliveryId> {
        let mut v: Vec<_> = made
            .iter()
            .enumerate()
            .filter(|(n, _)| keep(*n))
            .map(|(_, id)| *id)
            .collect();
        v.reverse();
        v
    };
    let cases: Vec<(Filter, Vec<DeliveryId>)> = vec![
        (Filter::default(), newest_first(&|_| true)),
        (
            Filter {
                rule: Some("a".into()),
                ..Filter::default()
            },
            newest_first(&|n| n % 2 == 0),
        ),
        (
            Filter {
                state: Some(State::Failed),
                ..Filter::default()
            },
            newest_first(&|n| n > 0 && n % 3 == 0),
        ),
        (
            Filter {
                status_code: StatusMatch::parse("5xx"),
                ..Filter::default()
            },
            newest_first(&|n| n > 0 && n % 3 == 0),
        ),
        (
            Filter {
                rule: Some("b".into()),
                status_code: StatusMatch::parse("200"),
                ..Filter::default()
            },
            newest_first(&|n| n % 2 == 1 && n % 3 != 0),
        ),
        (
            Filter {
                rule: Some("b".into()),
                state: Some(State::Failed),
                ..Filter::default()
            },
            newest_first(&|n| n % 2 == 1 && n % 3 == 0),
        ),
        (
            Filter {
                rule: Some("a".into()),
                state: Some(State::Skipped),
                ..Filter::default()
            },
            Vec::new(),
        ),
        (
            Filter {
                state: Some(State::Pending),
                ..Filter::default()
            },
            vec![made[0]],
        ),
        (
            Filter {
                endpoint: Some(EndpointMatch {
                    key: "https://example.test:443".into(),
                    ..Default::default()
                }),
                ..Filter::default()
            },
            newest_first(&|n| n > 0),
        ),
    ];
    for (filter, expected) in &cases {
        for (limit, budget) in [(5, 1000), (100, 1000), (2, 3), (100, 4), (1, 1)] {
            let (got, _) = all_pages(&store, filter, limit, budget);
            assert_eq!(&got, expected, "{filter:?} limit {limit} budget {budget}");
        }
    }
    // A budget smaller than the rows asked for still answers, in more pages.
    // The embedded store checks the status per record it reads, so its
    // budget counts the records behind the 8 matches; PostgreSQL filters in
    // the query and its budget counts only the rows it returns.
    let (_, pages) = all_pages(&store, &cases[3].0, 100, 4);
    let least = if store.kind() == "redb" {
        24 / 4
    } else {
        8 / 4
    };
    assert!(pages >= least, "{pages} pages");
    // Time bounds are id bounds: nothing before the first, all from it.
    let first = made[0].created_ms();
    let until_before = Filter {
        until_ms: Some(first - 1),
        ..Filter::default()
    };
    assert!(all_pages(&store, &until_before, 10, 100).0.is_empty());
    let since_first = Filter {
        since_ms: Some(first),
        ..Filter::default()
    };
    assert_eq!(all_pages(&store, &since_first, 10, 100).0.len(), 24);
}

fn counts_by_state_match_the_indexes(db: &dyn Db) {
    let store = db.open();
    let made = accept(&store, new_event("e", &["a", "b", "c", "d"]));
    finish(&store, made[0], 1, 200, Next::Succeeded);
    finish(&store, made[1], 1, 500, Next::Failed("HTTP 500".into()));
    let park = Next::Park {
        endpoint: "https://x:443".into(),
        reason: "blocked".into(),
    };
    finish(&store, made[2], 1, 500, park);
    let (counts, exact) = store.counts(1000).unwrap();
    assert!(exact);
    assert_eq!(
        counts,
        StateCounts {
            pending: 1,
            parked: 1,
            succeeded: 1,
            failed: 1,
            skipped: 0,
            waiting: 0,
        }
    );
    let (capped, exact) = store.counts(1).unwrap();
    assert!(!exact, "{capped:?}");
}

fn pending_deliveries_are_grouped_by_version_and_space_within_a_budget(db: &dyn Db) {
    let store = db.open();
    let group = |rule: &str, version: Option<&str>, space: Option<&str>| PendingGroup {
        rule: rule.into(),
        version: version.map(String::from),
        space: space.map(String::from),
    };
    let a = accept(&store, new_event("e1", &["a", "b"]));
    accept(&store, new_event("e2", &["a"]));
    let mut old = new_event("e3", &["old"]);
    old.deliveries[0].rule_version = None;
    accept(&store, old);
    let mut ws = new_event("e4", &["w"]);
    ws.deliveries[0].space = Some("team".into());
    accept(&store, ws);
    // Final and parked deliveries are not pending.
    finish(&store, a[1], 1, 200, Next::Succeeded);
    let park = Next::Park {
        endpoint: "https://x:443".into(),
        reason: "blocked".into(),
    };
    let b = accept(&store, new_event("e5", &["b"]));
    finish(&store, b[0], 1, 500, park);
    let all = store.pending_groups(100).unwrap();
    assert_eq!(
        all,
        PendingCounts {
            groups: vec![
                (group("a", Some("version-of-a"), None), 2),
                (group("old", None, None), 1),
                (group("w", Some("version-of-w"), Some("team")), 1),
            ],
            complete: true,
        }
    );
    // Exactly the budget is all; one less is not, and counts that many.
    assert!(store.pending_groups(4).unwrap().complete);
    let part = store.pending_groups(3).unwrap();
    assert!(!part.complete, "{part:?}");
    assert_eq!(part.groups.iter().map(|(_, n)| n).sum::<u64>(), 3);
    assert_eq!(store.pending_groups(0).unwrap().groups, vec![]);
}

#[test]
fn url_endpoint_keys_urls_like_the_dispatcher() {
    for url in [
        "https://example.test/hook",
        "http://127.0.0.1:8080/x?y=1",
        "http://h",
    ] {
        let parsed = url::Url::parse(url).unwrap();
        assert_eq!(
            url_endpoint(url),
            Some(crate::deliver::endpoint_key(&parsed))
        );
    }
    assert_eq!(url_endpoint("not a url"), None);
}

#[test]
fn status_matches_codes_and_classes() {
    assert_eq!(StatusMatch::parse("404"), Some(StatusMatch::Code(404)));
    assert_eq!(StatusMatch::parse("5XX"), Some(StatusMatch::Class(5)));
    for bad in ["6xx", "0xx", "99", "600", "abc", ""] {
        assert_eq!(StatusMatch::parse(bad), None, "{bad}");
    }
    assert!(StatusMatch::Class(5).matches(Some(503)));
    assert!(!StatusMatch::Class(5).matches(Some(499)));
    assert!(!StatusMatch::Code(200).matches(None));
}

/// The claim a fresh accept gives the accepting node.
fn accept_claimed(store: &Store, ev: NewEvent) -> (Vec<DeliveryId>, Claim) {
    match store.apply(vec![Op::Accept(ev)]).unwrap().remove(0) {
        Done::Accepted {
            deliveries,
            claim: Some(claim),
            ..
        } => (deliveries, claim),
        other => panic!("accept gave {other:?}"),
    }
}

fn finish_under(store: &Store, id: DeliveryId, number: u32, epoch: u64) -> Done {
    store
        .apply(vec![Op::Finish {
            id,
            attempt: Some(attempt(number, 200)),
            next: Next::Succeeded,
            epoch: Some(epoch),
        }])
        .unwrap()
        .remove(0)
}

fn due_now(store: &Store) -> Vec<Due> {
    store
        .due(None, now_ms(), 100, &|_| false, 1 << 20)
        .unwrap()
        .found
}

#[test]
fn postgres_a_late_result_from_a_node_that_lost_its_lease_is_refused() {
    let db = PgDb::new("fencing");
    let a = Store::new(db.as_node("node-a"));
    let b = Store::new(db.as_node("node-b"));
    let (ids, claim) = accept_claimed(&a, new_event("e1", &["r1"]));
    assert_eq!(claim.epoch, 1);
    // A holds it under a live lease: B finds nothing to send.
    assert!(due_now(&b).is_empty(), "B claimed a delivery A holds");
    // A is paused past its lease; B takes the delivery over.
    std::thread::sleep(std::time::Duration::from_millis(400));
    let taken = due_now(&b);
    assert_eq!(taken.len(), 1);
    let b_claim = taken[0].claim.expect("claimed");
    assert_eq!(b_claim.epoch, 2);
    // A wakes up and reports its attempt: refused, nothing recorded.
    let late = finish_under(&a, ids[0], 1, claim.epoch);
    assert!(
        matches!(&late, Done::Rejected(why) if why.contains("another node claimed it")),
        "{late:?}"
    );
    assert!(a.attempts(ids[0]).unwrap().is_empty());
    assert_eq!(a.delivery(ids[0]).unwrap().unwrap().state, State::Pending);
    // B's result stands.
    assert_eq!(
        finish_under(&b, ids[0], 1, b_claim.epoch),
        Done::Finished { promoted: None }
    );
    let d = a.delivery(ids[0]).unwrap().unwrap();
    assert_eq!((d.state, d.attempts), (State::Succeeded, 1));
    a.check_invariants();
}

#[test]
fn postgres_a_restarted_node_hands_back_its_earlier_claims_at_once() {
    let db = PgDb::new("restart");
    let a = Store::new(db.as_node("node-a"));
    let b = Store::new(db.as_node("node-b"));
    let (ids, claim) = accept_claimed(&a, new_event("e1", &["r1"]));
    assert!(due_now(&b).is_empty(), "B claimed a delivery A holds");
    // Node A's process dies and starts again under the same id, well
    // inside the lease: the claim is free at once.
    let a_again = Store::new(db.as_node("node-a"));
    let taken = due_now(&b);
    assert_eq!(taken.iter().map(|d| d.delivery.id).collect::<Vec<_>>(), ids);
    // And the dead process's result could not be recorded.
    let late = finish_under(&a, ids[0], 1, claim.epoch);
    assert!(matches!(late, Done::Rejected(_)), "{late:?}");
    let b_claim = taken[0].claim.expect("claimed");
    assert!(b_claim.epoch > claim.epoch);
    assert_eq!(
        finish_under(&b, ids[0], 1, b_claim.epoch),
        Done::Finished { promoted: None }
    );
    a_again.check_invariants();
}

#[test]
fn postgres_renewed_claims_hold_and_released_ones_go_at_once() {
    let db = PgDb::new("leases");
    let a = Store::new(db.as_node("node-a"));
    let b = Store::new(db.as_node("node-b"));
    let (held, _) = accept_claimed(&a, new_event("held", &["r1"]));
    let (freed, claim) = accept_claimed(&a, new_event("freed", &["r1"]));
    a.release(&[(freed[0], claim.epoch)]).unwrap();
    // Released: B takes it at once; the other is still A's.
    let taken: Vec<DeliveryId> = due_now(&b).iter().map(|d| d.delivery.id).collect();
    assert_eq!(taken, freed);
    // Renewed past its first lease, A's claim still holds.
    for _ in 0..4 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        a.renew(&held).unwrap();
    }
    // (B's own claim on `freed` ran out meanwhile, so it may take that again.)
    let taken: Vec<DeliveryId> = due_now(&b).iter().map(|d| d.delivery.id).collect();
    assert!(!taken.contains(&held[0]), "B claimed a renewed delivery");
    // Another node's renewal does not extend a claim it does not own.
    std::thread::sleep(std::time::Duration::from_millis(400));
    b.renew(&held).unwrap();
    let taken: Vec<DeliveryId> = due_now(&b).iter().map(|d| d.delivery.id).collect();
    assert!(
        taken.contains(&held[0]),
        "A's lapsed claim was not taken over: {taken:?}"
    );
}

#[test]
fn postgres_the_same_event_on_many_nodes_at_once_makes_one_set_of_deliveries() {
    let db = PgDb::new("same-event");
    let nodes: Vec<Store> = (0..4)
        .map(|n| Store::new(db.as_node(&format!("node-{n}"))))
        .collect();
    for round in 0..20 {
        let id = format!("event-{round}");
        let answers: Vec<Vec<DeliveryId>> = std::thread::scope(|s| {
            let handles: Vec<_> = nodes
                .iter()
                .map(|store| {
                    let id = id.clone();
                    s.spawn(move || accept(store, new_event(&id, &["r1", "r2"])))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for a in &answers {
            assert_eq!(a, &answers[0], "round {round}: nodes disagree");
        }
        let stored = nodes[0].event(&id).unwrap().unwrap().deliveries;
        assert_eq!(stored.len(), 2);
        let mut sorted = answers[0].clone();
        sorted.sort();
        assert_eq!(stored, sorted);
    }
    nodes[0].check_invariants();
}

#[test]
fn postgres_a_database_of_a_newer_schema_is_refused() {
    let db = PgDb::new("newer-schema");
    drop(db.open());
    db._server.sql_in(
        db.url.rsplit('/').next().unwrap(),
        "UPDATE rulehook_schema SET version = 99",
    );
    let err = Postgres::connect(&db.url, Default::default())
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("schema version 99") && text.contains("upgrade rulehook"),
        "{text}"
    );
}

/// The store's connections plan every statement for its arrays: a generic
/// plan cached while the table was small scans it whole for good (see
/// `Postgres::connect`), and options given in the URL are kept beside it.
#[test]
fn postgres_connections_plan_each_statement_for_its_arrays() {
    let db = PgDb::new("custom-plans");
    let store = db.as_node("node-a");
    assert_eq!(store.setting("plan_cache_mode"), "force_custom_plan");
    let url = format!("{}?options=-c%20work_mem%3D12MB", db.url);
    let store = Postgres::connect(&url, Default::default()).unwrap();
    assert_eq!(store.setting("plan_cache_mode"), "force_custom_plan");
    assert_eq!(store.setting("work_mem"), "12MB");
}

#[test]
fn postgres_an_unreachable_database_is_reported_as_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Postgres::connect(
        &format!("postgres://postgres@127.0.0.1:{port}/none"),
        postgres::PgOptions {
            op_timeout: std::time::Duration::from_secs(2),
            ..Default::default()
        },
    )
    .err()
    .expect("nothing listens there");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
}

/// Each lifecycle test, once per backend: `NAME::redb` and `NAME::postgres`.
fn an_ordered_lane_sends_one_at_a_time_in_acceptance_order(db: &dyn Db) {
    let store = db.open();
    // Two in one batch, one in the next; another lane beside it.
    let first = accept_ordered(
        &store,
        vec![
            ordered_event("a1", "r/defect:1", false),
            ordered_event("a2", "r/defect:1", false),
        ],
    );
    let later = accept_ordered(
        &store,
        vec![
            ordered_event("a3", "r/defect:1", false),
            ordered_event("b1", "r/defect:2", false),
        ],
    );
    store.check_invariants();
    let (a1, a2, a3, b1) = (first[0].0, first[1].0, later[0].0, later[1].0);
    assert_eq!(
        [first[0].1, first[1].1, later[0].1, later[1].1],
        [false, true, true, false],
        "the first of each lane is its head, the rest wait"
    );
    assert_eq!(due_ids(&store), vec![a1, b1], "only the heads are due");
    // Lanes page in lane order, and a rule filter keeps its own.
    let all = LaneFilter::default();
    let page = |after: Option<&str>| -> Vec<String> {
        store
            .lanes(&all, after, 1, 100)
            .unwrap()
            .into_iter()
            .map(|l| l.lane)
            .collect()
    };
    assert_eq!(page(None), ["r/defect:1"]);
    assert_eq!(page(Some("r/defect:1")), ["r/defect:2"]);
    assert!(page(Some("r/defect:2")).is_empty());
    let other_rule = LaneFilter {
        rule: Some("q".into()),
        ..Default::default()
    };
    assert!(store.lanes(&other_rule, None, 10, 100).unwrap().is_empty());
    let d2 = store.delivery(a2).unwrap().unwrap();
    assert_eq!(d2.state, State::Waiting);
    assert_eq!(d2.lane.as_ref().map(|l| l.seq), Some(1));
    let lane = store.lane("r/defect:1").unwrap().unwrap();
    assert_eq!(
        (
            lane.head.id,
            lane.waiting,
            lane.state,
            lane.rule.as_str(),
            lane.key.as_str()
        ),
        (a1, 2, "flowing", "r", "defect:1")
    );
    // A retry keeps the head: the others still wait.
    let retry = Next::Retry {
        at: now_ms() + 3_600_000,
    };
    assert_eq!(
        finish_with(&store, a1, 1, retry),
        Done::Finished { promoted: None }
    );
    store.check_invariants();
    assert_eq!(store.lane("r/defect:1").unwrap().unwrap().state, "retrying");
    assert_eq!(due_ids(&store), vec![b1]);
    // Success: the next in acceptance order is due now.
    assert_eq!(
        finish_with(&store, a1, 2, Next::Succeeded),
        Done::Finished { promoted: Some(a2) }
    );
    store.check_invariants();
    assert_eq!(due_ids(&store), vec![a2, b1]);
    // A head that fails for good in a lane that skips: the next goes.
    assert_eq!(
        finish_with(&store, a2, 1, Next::Failed("gave up".into())),
        Done::Finished { promoted: Some(a3) }
    );
    store.check_invariants();
    assert_eq!(store.delivery(a2).unwrap().unwrap().state, State::Failed);
    // The last one done, the lane is gone.
    assert_eq!(
        finish_with(&store, a3, 1, Next::Succeeded),
        Done::Finished { promoted: None }
    );
    store.check_invariants();
    assert!(store.lane("r/defect:1").unwrap().is_none());
    let lanes = store.lanes(&LaneFilter::default(), None, 10, 100).unwrap();
    assert_eq!(
        lanes.iter().map(|l| l.lane.as_str()).collect::<Vec<_>>(),
        vec!["r/defect:2"]
    );
    // A new event of the emptied lane is its head at once.
    let again = accept_ordered(&store, vec![ordered_event("a4", "r/defect:1", false)]);
    assert!(!again[0].1);
    store.check_invariants();
}

fn a_halted_lane_waits_until_resumed_or_skipped(db: &dyn Db) {
    let store = db.open();
    let made = accept_ordered(
        &store,
        vec![
            ordered_event("h1", "r/k", true),
            ordered_event("h2", "r/k", true),
            ordered_event("h3", "r/k", true),
        ],
    );
    let (h1, h2, h3) = (made[0].0, made[1].0, made[2].0);
    // Skipping a lane that is not halted is refused, naming why.
    match store
        .apply(vec![Op::SkipLane { lane: "r/k".into() }])
        .unwrap()
        .remove(0)
    {
        Done::Rejected(why) => assert!(why.contains("not halted"), "{why}"),
        other => panic!("skip of a flowing lane gave {other:?}"),
    }
    // Its head fails for good: the dispatcher parks it on the lane.
    let halted = on_lane_failure(Next::Failed("HTTP 500".into()), Some("r/k"));
    assert_eq!(
        finish_with(&store, h1, 1, halted.clone()),
        Done::Finished { promoted: None }
    );
    store.check_invariants();
    let lane = store.lane("r/k").unwrap().unwrap();
    assert_eq!((lane.state, lane.waiting, lane.head.id), ("halted", 2, h1));
    assert!(due_ids(&store).is_empty(), "a halted lane sends nothing");
    assert_eq!(store.lane_stats().unwrap().halted, 1);
    let halted_lanes = LaneFilter {
        state: Some("halted".into()),
        ..Default::default()
    };
    assert_eq!(store.lanes(&halted_lanes, None, 10, 100).unwrap().len(), 1);
    // Resume: the head is sent again, still ahead of the others.
    let resumed = store
        .apply(vec![Op::Unpark {
            endpoint: lane_park_key("r/k"),
            limit: 1,
        }])
        .unwrap();
    assert_eq!(resumed, vec![Done::Unparked(vec![h1])]);
    store.check_invariants();
    assert_eq!(due_ids(&store), vec![h1]);
    // It fails again; this time the admin skips it.
    finish_with(&store, h1, 2, halted);
    let skipped = store
        .apply(vec![Op::SkipLane { lane: "r/k".into() }])
        .unwrap();
    assert_eq!(
        skipped,
        vec![Done::LaneSkipped {
            head: h1,
            promoted: Some(h2)
        }]
    );
    store.check_invariants();
    let h1d = store.delivery(h1).unwrap().unwrap();
    assert_eq!(h1d.state, State::Failed);
    assert!(
        h1d.reason
            .as_deref()
            .unwrap_or_default()
            .starts_with("skipped by an admin"),
        "{h1d:?}"
    );
    assert_eq!(due_ids(&store), vec![h2]);
    assert_eq!(store.delivery(h3).unwrap().unwrap().state, State::Waiting);
    assert_eq!(store.lane_stats().unwrap().halted, 0);
}

fn a_redelivered_delivery_of_a_lane_joins_its_end(db: &dyn Db) {
    let store = db.open();
    let made = accept_ordered(
        &store,
        vec![
            ordered_event("x1", "r/k", false),
            ordered_event("x2", "r/k", false),
        ],
    );
    let (x1, x2) = (made[0].0, made[1].0);
    // A waiting one cannot jump the queue.
    let refused = store
        .apply(vec![Op::Redeliver {
            id: x2,
            body: Rebuilt::Same,
            rebind: None,
        }])
        .unwrap();
    assert!(
        matches!(&refused[0], Done::Rejected(why) if why.contains("waits in lane")),
        "{refused:?}"
    );
    finish_with(&store, x1, 1, Next::Succeeded);
    // x2 is the head now; x1 sent again waits behind it.
    let again = store
        .apply(vec![Op::Redeliver {
            id: x1,
            body: Rebuilt::Same,
            rebind: None,
        }])
        .unwrap();
    match &again[0] {
        Done::Redelivered(d) => assert_eq!(d.state, State::Waiting, "{d:?}"),
        other => panic!("redeliver gave {other:?}"),
    }
    store.check_invariants();
    assert_eq!(due_ids(&store), vec![x2]);
    assert_eq!(
        finish_with(&store, x2, 1, Next::Succeeded),
        Done::Finished { promoted: Some(x1) }
    );
    store.check_invariants();
    // Compaction keeps an event whose delivery waits.
    let waiting = accept_ordered(&store, vec![ordered_event("x3", "r/k", false)]);
    assert!(waiting[0].1);
    assert_eq!(
        compact(&store, now_ms() + 1000, None, 100).0,
        1,
        "only x2's event is old and done"
    );
    assert!(store.event("x3").unwrap().is_some());
    store.check_invariants();
}

fn concurrent_accepts_into_one_lane_make_one_head(db: &dyn Db) {
    let store = std::sync::Arc::new(db.open());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..10 {
                    let ev = ordered_event(&format!("c{t}-{i}"), "r/hot", false);
                    store.apply(vec![Op::Accept(ev)]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    store.check_invariants();
    let lane = store.lane("r/hot").unwrap().unwrap();
    assert_eq!(lane.waiting, 39);
    // Sending them all, one at a time, goes through every one once, in
    // the order of their sequence numbers.
    let mut seen = Vec::new();
    let mut head = Some(lane.head.id);
    while let Some(id) = head {
        let d = store.delivery(id).unwrap().unwrap();
        seen.push(d.lane.unwrap().seq);
        assert_eq!(due_ids(&store), vec![id]);
        head = match finish_with(&store, id, 1, Next::Succeeded) {
            Done::Finished { promoted } => promoted,
            other => panic!("finish gave {other:?}"),
        };
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!((seen.len(), sorted), (40, seen.clone()));
    store.check_invariants();
}

#[test]
fn lanes_copied_from_an_embedded_store_into_postgres_keep_their_head_and_order() {
    let file = TempDb::new("lane-copy");
    let src = file.open();
    // Lane r/a: head finished, so the head is the second; r/b: halted head
    // with one behind it; r/c: one alone.
    let a = accept_ordered(
        &src,
        vec![
            ordered_event("a0", "r/a", false),
            ordered_event("a1", "r/a", false),
            ordered_event("a2", "r/a", false),
        ],
    );
    finish_with(&src, a[0].0, 1, Next::Succeeded);
    let b = accept_ordered(
        &src,
        vec![
            ordered_event("b0", "r/b", true),
            ordered_event("b1", "r/b", true),
        ],
    );
    finish_with(
        &src,
        b[0].0,
        1,
        on_lane_failure(Next::Failed("HTTP 500".into()), Some("r/b")),
    );
    accept_ordered(&src, vec![ordered_event("c0", "r/c", false)]);
    let dst_db = PgDb::new("lane_copy");
    let dst = dst_db.open();
    // Slices of two events, so lanes are split across slices, and twice:
    // the second copy adds nothing.
    for round in 0..2 {
        let mut after = None;
        let mut added = 0;
        loop {
            let part = src.export(after, 2).unwrap();
            let next = part.next;
            added += dst.import(part).unwrap();
            match next {
                Some(k) => after = Some(k),
                None => break,
            }
        }
        assert_eq!(added, if round == 0 { 6 } else { 0 }, "round {round}");
        dst.check_invariants();
    }
    let lanes = |s: &Store| -> Vec<(String, DeliveryId, u64, &'static str)> {
        s.lanes(&LaneFilter::default(), None, 10, 100)
            .unwrap()
            .into_iter()
            .map(|l| (l.lane, l.head.id, l.waiting, l.state))
            .collect()
    };
    assert_eq!(lanes(&dst), lanes(&src));
    // The copy goes on in order: a2 after a1, and joining a lane lands behind.
    assert_eq!(
        finish_with(&dst, a[1].0, 1, Next::Succeeded),
        Done::Finished {
            promoted: Some(a[2].0)
        }
    );
    let more = accept_ordered(&dst, vec![ordered_event("a3", "r/a", false)]);
    assert!(more[0].1, "a3 waits behind a2");
    dst.check_invariants();
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn redb() {
                super::$name(&super::TempDb::new(stringify!($name)));
            }

            #[test]
            fn postgres() {
                super::$name(&super::PgDb::new(stringify!($name)));
            }
        }
    )*};
}

on_both_backends!(
    a_delivery_moves_through_its_states_with_the_indexes_in_step,
    listing_filters_combine_and_page_newest_first,
    the_same_event_id_again_gives_the_same_deliveries_and_stores_nothing,
    compaction_removes_old_finished_events_and_keeps_pending_ones,
    compaction_walks_past_old_events_that_are_kept,
    parked_deliveries_are_counted_per_endpoint_under_a_prefix,
    rule_versions_are_stored_once_and_a_redelivery_can_rebind,
    retired_rule_versions_go_once_old_and_unused,
    pages_follow_a_cursor_within_a_scan_budget_for_every_source,
    counts_by_state_match_the_indexes,
    pending_deliveries_are_grouped_by_version_and_space_within_a_budget,
    an_ordered_lane_sends_one_at_a_time_in_acceptance_order,
    a_halted_lane_waits_until_resumed_or_skipped,
    a_redelivered_delivery_of_a_lane_joins_its_end,
    concurrent_accepts_into_one_lane_make_one_head,
);
