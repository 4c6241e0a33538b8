//! The rule versions deliveries are bound to (see `crate::targets`): stored
//! once each, marked retired when a reload stops running them, and deleted
//! once retired longer than the retention period with no pending or parked
//! delivery bound to them. By then every final delivery made under such a
//! version is compacted too, so nothing can be redelivered with it.

use std::collections::HashSet;

use redb::{ReadableTable, WriteTransaction};

use super::Redb;
use crate::store::schema::{
    DELIVERIES, DUE, LANE_WAIT, PARKED, RULE_VERSIONS, RULE_VERSIONS_RETIRED,
};
use crate::store::{Delivery, Done, Op, StoreError, from_json, io};

/// Applies the two rule-version ops in the batch's transaction.
pub(super) fn apply(tx: &WriteTransaction, op: Op) -> Result<Done, StoreError> {
    let mut versions = tx.open_table(RULE_VERSIONS).map_err(io("rule versions"))?;
    let mut retired = tx
        .open_table(RULE_VERSIONS_RETIRED)
        .map_err(io("rule versions"))?;
    match op {
        Op::PutRuleVersions { add, running, at } => {
            for (version, spec) in add {
                if versions
                    .get(version.as_str())
                    .map_err(io("rule versions"))?
                    .is_none()
                {
                    versions
                        .insert(version.as_str(), spec.as_slice())
                        .map_err(io("rule versions"))?;
                }
            }
            let running: HashSet<String> = running.into_iter().collect();
            let mut stored = Vec::new();
            for item in versions.iter().map_err(io("rule versions"))? {
                let (k, _) = item.map_err(io("rule versions"))?;
                stored.push(k.value().to_string());
            }
            for version in stored {
                if running.contains(&version) {
                    retired
                        .remove(version.as_str())
                        .map_err(io("rule versions"))?;
                } else if retired
                    .get(version.as_str())
                    .map_err(io("rule versions"))?
                    .is_none()
                {
                    retired
                        .insert(version.as_str(), at)
                        .map_err(io("rule versions"))?;
                }
            }
            Ok(Done::RuleVersionsSaved)
        }
        Op::DropRuleVersions(candidates) => {
            let mut dropped = Vec::new();
            for version in candidates {
                // Running again since the caller looked: keep it.
                if retired
                    .remove(version.as_str())
                    .map_err(io("rule versions"))?
                    .is_some()
                {
                    versions
                        .remove(version.as_str())
                        .map_err(io("rule versions"))?;
                    dropped.push(version);
                }
            }
            Ok(Done::RuleVersionsDropped(dropped))
        }
        _ => unreachable!("only rule-version ops come here"),
    }
}

impl Redb {
    /// Every stored rule version and its JSON `TargetSpec`.
    pub(super) fn stored_rule_versions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.read()?;
        let t = tx
            .open_table(RULE_VERSIONS)
            .map_err(io("read rule versions"))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(io("read rule versions"))? {
            let (k, v) = item.map_err(io("read rule versions"))?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Retired rule versions that may be deleted: retired before
    /// `before_ms` and bound to no pending or parked delivery. Looks at the
    /// backlog only when some version is old enough, which is rare.
    pub(super) fn retired_unused_rule_versions(
        &self,
        before_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let tx = self.read()?;
        let retired = tx
            .open_table(RULE_VERSIONS_RETIRED)
            .map_err(io("read rule versions"))?;
        let mut old: HashSet<String> = HashSet::new();
        for item in retired.iter().map_err(io("read rule versions"))? {
            let (k, at) = item.map_err(io("read rule versions"))?;
            if at.value() < before_ms {
                old.insert(k.value().to_string());
            }
        }
        if old.is_empty() {
            return Ok(Vec::new());
        }
        let deliveries = tx.open_table(DELIVERIES).map_err(io("read backlog"))?;
        let mut keep = |id: u128| -> Result<(), StoreError> {
            if let Some(v) = deliveries.get(id).map_err(io("read backlog"))? {
                let d: Delivery = from_json(v.value(), "delivery")?;
                if let Some(version) = d.rule_version {
                    old.remove(&version);
                }
            }
            Ok(())
        };
        let due = tx.open_table(DUE).map_err(io("read backlog"))?;
        for item in due.iter().map_err(io("read backlog"))? {
            keep(item.map_err(io("read backlog"))?.0.value().1)?;
        }
        let parked = tx.open_table(PARKED).map_err(io("read backlog"))?;
        for item in parked.iter().map_err(io("read backlog"))? {
            keep(item.map_err(io("read backlog"))?.0.value().1)?;
        }
        let waiting = tx.open_table(LANE_WAIT).map_err(io("read backlog"))?;
        for item in waiting.iter().map_err(io("read backlog"))? {
            keep(item.map_err(io("read backlog"))?.1.value())?;
        }
        let mut out: Vec<String> = old.into_iter().collect();
        out.sort();
        Ok(out)
    }
}
