//! What accepted deliveries are bound to: the rule versions they were made
//! under, kept resolvable for as long as the store holds them.
//!
//! A delivery stores the version of the rule that matched it (a hash of the
//! rule's sending part, see `rules::target`). Every attempt sends with that
//! version: its URL, signing, headers, credentials, timeouts and retry
//! policy, even after a reload renamed, changed or removed the rule. A
//! reload makes its versions durable (`PutRuleVersions`, one commit) before
//! the new rules run, so no delivery can name a version the store lacks;
//! after a restart the stored versions are read back and their secret
//! references resolved again. An admin who wants pending work to follow the
//! rule as it is now redelivers it with the current rule (`?rule=current`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use crate::outbox::{Outbox, OutboxError};
use crate::rules::load::EnvSecrets;
use crate::rules::target::{RuleVersion, TargetSpec};
use crate::rules::{Rule, Webhook};
use crate::store::{Op, Store, StoreError};

/// One rule version, ready to send with.
#[derive(Debug)]
pub struct Target {
    pub version: RuleVersion,
    /// The rule's name in that version.
    pub rule: String,
    /// `Err` when a stored version can no longer be sent with (a secret
    /// reference that no longer resolves, or an inline secret, which is not
    /// stored): its deliveries fail with this reason and can be redelivered
    /// with the current rule.
    pub webhook: Result<Webhook, String>,
    spec: TargetSpec,
}

impl Target {
    /// The endpoint this version sends to, keyed as the dispatcher keys it
    /// (`scheme://host:port`, or the WebSocket space's key); `None` when it
    /// names neither.
    pub fn endpoint(&self) -> Option<String> {
        if let Some(space) = &self.spec.space {
            return Some(crate::deliver::channel::endpoint(space));
        }
        crate::store::url_endpoint(self.spec.url.as_deref()?)
    }

    /// The target of a rule that was just loaded (its secrets resolved).
    /// `previous` is reused when the rule's sending part did not change,
    /// so a reload of 10,000 unchanged rules hashes nothing.
    pub fn of(rule: &Rule, previous: Option<&Arc<Target>>) -> Arc<Target> {
        if let Some(p) = previous
            && p.rule == rule.name
            && p.webhook.as_ref().is_ok_and(|w| *w == rule.webhook)
        {
            return p.clone();
        }
        let spec = TargetSpec::of(&rule.name, &rule.webhook);
        Arc::new(Target {
            version: spec.version(),
            rule: rule.name.clone(),
            webhook: Ok(rule.webhook.clone()),
            spec,
        })
    }
}

/// Every rule version this server knows: the running ones and the retired
/// ones read back from the store.
pub struct Targets {
    known: RwLock<HashMap<RuleVersion, Arc<Target>>>,
    outbox: Outbox,
    /// The versions of the last published (running) set. Held while a
    /// publish or a clean-up writes, so the two never interleave.
    running: Mutex<HashSet<RuleVersion>>,
    /// Where relative `file:` secret references of stored versions start.
    rules_dir: std::path::PathBuf,
}

/// A stored version made ready to send with (its secret references
/// resolved on this node); `None`, logged, when its record is unreadable.
fn resolve(secrets: &EnvSecrets, version: RuleVersion, json: &[u8]) -> Option<Arc<Target>> {
    match TargetSpec::from_json(json) {
        Ok(spec) => Some(Arc::new(Target {
            version,
            rule: spec.rule.clone(),
            webhook: spec.to_webhook(secrets),
            spec,
        })),
        Err(why) => {
            tracing::error!(version = %version, error = %why, "a stored rule version is unreadable; its deliveries fail until redelivered with the current rule");
            None
        }
    }
}

impl Targets {
    /// Reads the stored versions that are retired (not among `running`,
    /// the loaded rules' versions) and resolves their secret references
    /// (relative `file:` references from `rules_dir`, as when the rules are
    /// loaded). The running ones were just resolved by the load and come
    /// in with the first `publish`, so no secret is read twice at start-up.
    pub fn open<'a>(
        store: &Store,
        outbox: Outbox,
        rules_dir: &std::path::Path,
        running: impl IntoIterator<Item = &'a Arc<Target>>,
    ) -> Result<Targets, StoreError> {
        let running: HashSet<&RuleVersion> = running.into_iter().map(|t| &t.version).collect();
        let secrets = EnvSecrets::new(rules_dir);
        let mut known = HashMap::new();
        for (version, json) in store.rule_versions()? {
            let version = RuleVersion(version);
            if !running.contains(&version)
                && let Some(target) = resolve(&secrets, version.clone(), &json)
            {
                known.insert(version, target);
            }
        }
        Ok(Targets {
            known: RwLock::new(known),
            outbox,
            running: Mutex::new(HashSet::new()),
            rules_dir: rules_dir.to_path_buf(),
        })
    }

    /// Reads the versions among `wanted` that this node does not know from
    /// the store. In cluster mode another node's reload may have made them,
    /// and this node claimed one of their deliveries. Blocking; returns how
    /// many it learned.
    pub fn learn<'a>(
        &self,
        store: &Store,
        wanted: impl IntoIterator<Item = &'a str>,
    ) -> Result<usize, StoreError> {
        let missing: HashSet<RuleVersion> = {
            let known = self.known.read().unwrap_or_else(|e| e.into_inner());
            wanted
                .into_iter()
                .map(|v| RuleVersion(v.to_string()))
                .filter(|v| !known.contains_key(v))
                .collect()
        };
        if missing.is_empty() {
            return Ok(0);
        }
        let secrets = EnvSecrets::new(&self.rules_dir);
        let mut learned = Vec::new();
        for (version, json) in store.rule_versions()? {
            let version = RuleVersion(version);
            if missing.contains(&version)
                && let Some(target) = resolve(&secrets, version.clone(), &json)
            {
                learned.push((version, target));
            }
        }
        let n = learned.len();
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        for (v, t) in learned {
            known.entry(v).or_insert(t);
        }
        Ok(n)
    }

    pub fn get(&self, version: &RuleVersion) -> Option<Arc<Target>> {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(version)
            .cloned()
    }

    /// Makes the running set's `targets` durable and known, and marks the
    /// versions that no longer run as retired. Call it before the rules
    /// they come from start matching: a delivery must never name a version
    /// the store does not hold. Blocking (it waits for the commit); reload
    /// calls it from its own thread.
    pub fn publish<'a>(
        &self,
        targets: impl IntoIterator<Item = &'a Arc<Target>>,
    ) -> Result<(), OutboxError> {
        let targets: Vec<Arc<Target>> = targets.into_iter().cloned().collect();
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let now: HashSet<RuleVersion> = targets.iter().map(|t| t.version.clone()).collect();
        let fresh: Vec<Arc<Target>> = {
            let known = self.known.read().unwrap_or_else(|e| e.into_inner());
            targets
                .into_iter()
                // A stored version whose secrets did not resolve after a
                // restart is replaced by the loaded one, which did.
                .filter(|t| known.get(&t.version).is_none_or(|k| k.webhook.is_err()))
                .collect()
        };
        if fresh.is_empty() && *running == now {
            return Ok(());
        }
        let add = fresh
            .iter()
            .map(|t| (t.version.0.clone(), t.spec.to_json()))
            .collect();
        self.outbox.write_blocking(vec![Op::PutRuleVersions {
            add,
            running: now.iter().map(|v| v.0.clone()).collect(),
            at: crate::store::now_ms(),
        }])?;
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        for t in fresh {
            known.insert(t.version.clone(), t);
        }
        *running = now;
        Ok(())
    }

    /// Forgets the versions retired longer than `retention` ago that no
    /// pending or parked delivery is bound to (in the store and here), and
    /// returns how many. Blocking: the retention loop runs it off the
    /// reactor, after compaction.
    pub fn drop_unused(
        &self,
        store: &Store,
        retention: std::time::Duration,
    ) -> Result<usize, String> {
        let _running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let before = crate::store::now_ms().saturating_sub(retention.as_millis() as u64);
        let unused = store
            .unused_rule_versions(before)
            .map_err(|e| e.to_string())?;
        if unused.is_empty() {
            return Ok(0);
        }
        let done = self
            .outbox
            .write_blocking(vec![Op::DropRuleVersions(unused)])
            .map_err(|e| e.to_string())?;
        let Some(crate::store::Done::RuleVersionsDropped(dropped)) = done.into_iter().next() else {
            return Ok(0);
        };
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        for v in &dropped {
            known.remove(&RuleVersion(v.clone()));
        }
        Ok(dropped.len())
    }
}
