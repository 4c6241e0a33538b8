//! `rulehook store copy --from redb:PATH --to postgres://…`: moves what an
//! embedded store holds (events, pending, parked and final deliveries with
//! their bodies and attempts, endpoint states, rule versions) into a
//! PostgreSQL store, so an operator can switch to cluster mode without
//! losing or re-sending work. Run it with the server stopped: redb lets one
//! process open its file, so a running server makes it refuse. Every row is
//! written only if it is not there yet, so a second run adds nothing.

use std::path::PathBuf;

use crate::store::postgres::{PgOptions, Postgres};
use crate::store::{Backend, Op, Redb, RedbOptions, Store, now_ms};

/// Events per transaction: big enough for few round trips, small enough
/// that one slice of large bodies stays a few megabytes.
const SLICE: usize = 500;

/// A store named on the command line.
enum Spec {
    Redb(PathBuf),
    Postgres(String),
}

fn parse(text: &str) -> anyhow::Result<Spec> {
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return Ok(Spec::Postgres(text.to_string()));
    }
    let path = text.strip_prefix("redb:").unwrap_or(text);
    if path.is_empty() {
        anyhow::bail!("`{text}`: write redb:PATH (the .redb file) or postgres://…");
    }
    Ok(Spec::Redb(PathBuf::from(path)))
}

fn open(spec: &Spec, must_exist: bool) -> anyhow::Result<Store> {
    Ok(match spec {
        Spec::Redb(path) => {
            if must_exist && !path.is_file() {
                anyhow::bail!(
                    "{} does not exist; name the data directory's rulehook.redb",
                    path.display()
                );
            }
            let redb = Redb::open_with(path, RedbOptions::default()).map_err(|e| {
                let text = e.to_string();
                if text.contains("already open") || text.contains("lock") {
                    anyhow::anyhow!(
                        "{} is in use by a running rulehook; stop it first (a copy must see no new writes)",
                        path.display()
                    )
                } else {
                    anyhow::anyhow!(text)
                }
            })?;
            Store::new(redb)
        }
        Spec::Postgres(url) => Store::new(Postgres::connect(
            url,
            PgOptions {
                node: "store-copy".into(),
                ..PgOptions::default()
            },
        )?),
    })
}

/// What a copy did.
#[derive(Debug, Default, PartialEq)]
pub struct Copied {
    pub events: usize,
    pub deliveries_added: usize,
    pub endpoints: usize,
    pub rule_versions: usize,
}

/// Copies everything from `from` to `to`; `progress` is told after each slice.
pub fn copy(from: &str, to: &str, progress: &mut dyn FnMut(&Copied)) -> anyhow::Result<Copied> {
    let (from_spec, to_spec) = (parse(from)?, parse(to)?);
    if matches!(to_spec, Spec::Redb(_)) {
        anyhow::bail!("copying into an embedded store is not supported; --to takes postgres://…");
    }
    let src = open(&from_spec, true)?;
    let dst = open(&to_spec, false)?;
    copy_between(&*src, &*dst, progress)
}

fn copy_between(
    src: &dyn Backend,
    dst: &dyn Backend,
    progress: &mut dyn FnMut(&Copied),
) -> anyhow::Result<Copied> {
    let mut done = Copied::default();
    // Versions first: every delivery names one, and a node must find it.
    let versions = src.rule_versions()?;
    done.rule_versions = versions.len();
    dst.apply(vec![Op::PutRuleVersions {
        add: versions,
        running: Vec::new(),
        at: now_ms(),
    }])?;
    let endpoints = src.endpoints()?;
    done.endpoints = endpoints.len();
    if !endpoints.is_empty() {
        dst.apply(endpoints.into_iter().map(Op::PutEndpoint).collect())?;
    }
    let mut after = None;
    loop {
        let part = src.export(after, SLICE)?;
        let next = part.next;
        done.events += part.events.len();
        done.deliveries_added += dst.import(part)?;
        progress(&done);
        match next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    Ok(done)
}
