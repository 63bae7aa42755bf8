//! The lease registry: active leases indexed for matching, recently ended leases kept in memory,
//! one expiry task for every deadline, change signals for open streams, and every change written
//! to the lease store and the audit log.
//!
//! Write order is chosen for failing closed: a grant or renewal takes effect only after its
//! audit record and store write are durable; an end takes effect in memory at once (identity
//! must go away even if the disk is failing) and is then written, loudly if that fails.
//!
//! Matching must stay cheap with thousands of leases: each lease is indexed under one of its
//! selectors (the most specific kind), so a caller with N selectors looks at N index buckets
//! and only the leases in them, never at every lease. Change signals follow the same index: a
//! lease can only ever match callers that hold its index selector, so a change to it wakes the
//! open streams listening on that selector and no others.

mod changes;
mod expiry;
mod family;
mod follow;
mod index;
mod lifecycle;
mod persist;
mod unrecorded;

pub use changes::Changes;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::Audit;

use super::{
    validate_grant, GrantInput, Lease, LeaseError, LeaseId, LeaseLimits, LeaseState, LeaseStore,
    Principal,
};
use changes::Listeners;
use index::{index_key, Inner};

/// Ended leases kept in memory, so that recent ends are found without reading the store.
const ENDED_KEPT: usize = 4096;

/// An active lease as seen by the SVID cache: a snapshot plus the signals that follow it.
#[derive(Clone, Debug)]
pub struct ActiveLease {
    /// Shared with the registry (cheap to hand to every fetch); a renewal replaces it.
    pub lease: Arc<Lease>,
    /// Cancelled when the lease ends, for whatever reason.
    pub ended: CancellationToken,
    /// The current `expires_at`; changes on renewal.
    pub expires_at: watch::Receiver<SystemTime>,
}

/// Where lease changes are made durable.
#[derive(Clone)]
pub struct Durable {
    pub store: Arc<dyn LeaseStore>,
    pub audit: Audit,
    pub metrics: crate::telemetry::Metrics,
    /// This agent's node name: what leases bound to a process here record.
    pub node: String,
}

pub struct Leases {
    limits: LeaseLimits,
    durable: Durable,
    inner: RwLock<Inner>,
    /// Who to wake when a lease indexed under a selector changes.
    listeners: Mutex<Listeners>,
    /// One task expires every lease; told when a sooner deadline arrives.
    deadline_moved: Arc<Notify>,
    expiry_started: AtomicBool,
    /// Ends not yet recorded in the store or the audit log, and whether a task retries them.
    unrecorded: Mutex<HashMap<LeaseId, unrecorded::Unrecorded>>,
    retrying: AtomicBool,
    /// Every per-lease task (timers, process watches, SVID rotation), stopped by `close`.
    tasks: TaskTracker,
    closing: CancellationToken,
    me: Weak<Leases>,
}

impl Leases {
    /// A registry whose every change is stored and audited before (or, for ends, right after)
    /// it takes effect.
    pub fn new(limits: LeaseLimits, durable: Durable) -> Arc<Self> {
        Arc::new_cyclic(|me| Leases {
            limits,
            durable,
            inner: RwLock::new(Inner::default()),
            listeners: Mutex::new(Listeners::default()),
            deadline_moved: Arc::new(Notify::new()),
            expiry_started: AtomicBool::new(false),
            unrecorded: Mutex::new(HashMap::new()),
            retrying: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            closing: CancellationToken::new(),
            me: me.clone(),
        })
    }

    pub fn limits(&self) -> &LeaseLimits {
        &self.limits
    }

    /// Runs a per-lease task until it finishes or the registry closes.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let closing = self.closing.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = closing.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Stops every per-lease task and waits for them, so the store can be closed. Leases stay
    /// as they are on disk; the next start takes them over. Ends not yet recorded get one
    /// last try.
    pub async fn close(&self) {
        self.last_retry().await;
        self.closing.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Validates a grant request into a lease (nothing is stored): what policies judge.
    pub fn prepare(&self, input: GrantInput, by: Principal) -> Result<Lease, LeaseError> {
        validate_grant(input, &self.limits, SystemTime::now(), by)
    }

    /// Validates and grants in one step (no policy in between).
    pub async fn grant_input(&self, input: GrantInput, by: Principal) -> Result<Lease, LeaseError> {
        let lease = self.prepare(input, by)?;
        self.grant(lease).await
    }

    /// Makes a prepared lease durable (audit record, then store), and only then activates it.
    /// Must run inside a Tokio runtime.
    pub async fn grant(&self, mut lease: Lease) -> Result<Lease, LeaseError> {
        self.place(&mut lease);
        self.persist("granted", &mut lease, "").await?;
        tracing::info!(
            event = "lease_granted",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            delegator = %lease.delegator,
            agent = %lease.agent,
            spiffe_id = %lease.spiffe_id,
            selectors = %lease.selectors.joined(),
            expires_at = %crate::time::rfc3339(lease.expires_at),
            granted_by_uid = lease.granted_by.uid,
            granted_by_pid = lease.granted_by.pid,
            reason = %lease.reason,
            "lease granted"
        );
        Ok(self.activate_recorded(lease).await)
    }

    /// A lease bound to a process belongs to this node: only this agent matches it (and, on
    /// a shared store, reads it).
    pub(super) fn place(&self, lease: &mut Lease) {
        if lease.selectors.processes().next().is_some() {
            lease.node = Some(self.durable.node.clone());
        }
    }

    /// Whether this agent serves the lease: one of no particular node, or of this one.
    pub(super) fn serves(&self, lease: &Lease) -> bool {
        lease.node.as_ref().is_none_or(|n| *n == self.durable.node)
    }

    pub async fn get(&self, id: &LeaseId) -> Result<Lease, LeaseError> {
        if let Some(lease) = self.get_cached(id) {
            return Ok(lease);
        }
        self.stored()
            .await?
            .into_iter()
            .find(|l| &l.id == id)
            .map(Arc::unwrap_or_clone)
            .ok_or_else(|| LeaseError::NotFound(id.to_string()))
    }

    pub(super) fn get_cached(&self, id: &LeaseId) -> Option<Lease> {
        let inner = self.inner.read().expect("lease lock poisoned");
        if let Some(slot) = inner.active.get(id) {
            return Some(Lease::clone(&slot.lease));
        }
        if let Some((lease, _)) = inner.pending.get(id) {
            return Some(lease.clone());
        }
        inner.ended.iter().find(|l| &l.id == id).cloned()
    }

    /// Active leases (and, with `all`, ended ones still retained), oldest first.
    pub async fn list(&self, all: bool) -> Result<Vec<Lease>, LeaseError> {
        let mut out: Vec<Lease> = {
            let inner = self.inner.read().expect("lease lock poisoned");
            inner
                .active
                .values()
                .map(|s| Lease::clone(&s.lease))
                .chain(inner.pending.values().map(|(l, _)| l.clone()))
                .collect()
        };
        if all {
            out.extend(
                self.stored()
                    .await?
                    .into_iter()
                    .filter(|l| !matches!(l.state, LeaseState::Active | LeaseState::Pending))
                    .map(Arc::unwrap_or_clone),
            );
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Moves `expires_at` to now + ttl, never earlier than it is and never past `max_expires_at`.
    pub async fn renew(&self, id: &LeaseId, ttl: Duration) -> Result<Lease, LeaseError> {
        if ttl < super::MIN_TTL {
            return Err(LeaseError::InvalidField {
                field: "ttl",
                message: "must be at least 1s".into(),
            });
        }
        let Some(wanted) = SystemTime::now().checked_add(ttl) else {
            return Err(LeaseError::InvalidField {
                field: "ttl",
                message: "is beyond any time this agent can represent".into(),
            });
        };
        let wanted = crate::time::floor_secs(wanted);
        let mut lease = match self.get_active(id) {
            Some(l) => l,
            None => return Err(self.not_active(id).await),
        };
        // A delegated lease never outlives its parent's current deadline.
        if let Some(parent) = lease.parent() {
            let Some(parent) = self.get_active(parent) else {
                return Err(LeaseError::Refused(format!(
                    "lease {id} was delegated from lease {parent}, which is no longer active"
                )));
            };
            if wanted > parent.expires_at {
                return Err(LeaseError::Refused(format!(
                    "narrowing rule expires_at: the lease would end at {}, after its parent's expires_at {}",
                    crate::time::rfc3339(wanted),
                    crate::time::rfc3339(parent.expires_at)
                )));
            }
        }
        if wanted > lease.max_expires_at {
            return Err(LeaseError::InvalidField {
                field: "ttl",
                message: format!(
                    "would end at {}, past the lease's renewal ceiling max_expires_at {}",
                    crate::time::rfc3339(wanted),
                    crate::time::rfc3339(lease.max_expires_at)
                ),
            });
        }
        lease.expires_at = lease.expires_at.max(wanted);
        self.persist("renewed", &mut lease, "").await?;
        let renewed = {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            index::extend(&mut inner, id, wanted, lease.revision)
        };
        // It may have ended while the renewal was being written.
        let Some(lease) = renewed else {
            return Err(self.not_active(id).await);
        };
        tracing::info!(
            event = "lease_renewed",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            expires_at = %crate::time::rfc3339(lease.expires_at),
            "lease renewed"
        );
        self.changed(&index_key(&lease.selectors));
        Ok(lease)
    }

    /// The lease, if it is active now.
    pub fn get_active(&self, id: &LeaseId) -> Option<Lease> {
        let inner = self.inner.read().expect("lease lock poisoned");
        inner.active.get(id).map(|s| Lease::clone(&s.lease))
    }

    pub(super) async fn not_active(&self, id: &LeaseId) -> LeaseError {
        match self.get(id).await {
            Ok(l) => LeaseError::NotActive {
                id: id.to_string(),
                state: l.state,
            },
            Err(e) => e,
        }
    }

    /// When an ended lease ended (from memory; for teardown latency).
    pub fn ended_at(&self, id: &LeaseId) -> Option<SystemTime> {
        let inner = self.inner.read().expect("lease lock poisoned");
        inner.ended.iter().rev().find(|l| &l.id == id)?.ended_at
    }

    /// Whether the lease is active now (for the cache's check before it installs an entry).
    pub fn is_active(&self, id: &LeaseId) -> bool {
        let inner = self.inner.read().expect("lease lock poisoned");
        inner
            .active
            .get(id)
            .is_some_and(|s| s.lease.expires_at > SystemTime::now())
    }

    pub fn pending_count(&self) -> usize {
        self.inner
            .read()
            .expect("lease lock poisoned")
            .pending
            .len()
    }

    pub fn active_count(&self) -> usize {
        self.inner.read().expect("lease lock poisoned").active.len()
    }
}

#[cfg(test)]
mod test_support {
    use super::*;
    use crate::audit::MemorySink;
    use crate::selector::{Selector, Selectors};

    pub(super) fn selectors(s: &[&str]) -> Selectors {
        s.iter().map(|s| Selector::parse(s).unwrap()).collect()
    }

    /// A registry on a store and an audit sink in memory (the real ones are tested on their
    /// own, and together end to end).
    pub(super) fn registry() -> Arc<Leases> {
        registry_on(crate::store::MemoryStore::new(), MemorySink::new())
    }

    pub(super) fn registry_on(store: Arc<dyn LeaseStore>, audit: Arc<MemorySink>) -> Arc<Leases> {
        registry_on_node(store, audit, "node-a")
    }

    /// A registry as the agent on `node` has it, following `store` (shared with others).
    pub(super) fn node_on(
        store: Arc<dyn LeaseStore>,
        audit: Arc<MemorySink>,
        node: &str,
    ) -> Arc<Leases> {
        let r = registry_on_node(store.clone(), audit, node);
        r.follow(store.watch());
        r
    }

    pub(super) fn registry_on_node(
        store: Arc<dyn LeaseStore>,
        audit: Arc<MemorySink>,
        node: &str,
    ) -> Arc<Leases> {
        let metrics =
            crate::telemetry::Metrics::new(&mut prometheus_client::registry::Registry::default());
        let limits = crate::lease::test_limits();
        let durable = Durable {
            store,
            audit,
            metrics,
            node: node.into(),
        };
        Leases::new(limits, durable)
    }

    /// A grant request for `task` on `selectors`, renewable to twice `ttl`.
    pub(super) fn input(task: &str, selectors: &[&str], ttl: Duration) -> GrantInput {
        GrantInput {
            task_id: task.into(),
            delegator: "alice".into(),
            agent: "a".into(),
            ttl: Some(ttl),
            max_ttl: Some(ttl * 2),
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    pub(super) async fn grant(r: &Leases, task: &str, selectors: &[&str], ttl: Duration) -> Lease {
        r.grant_input(input(task, selectors, ttl), Principal::agent())
            .await
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[tokio::test]
    async fn renewal_is_capped_by_max_expires_at() {
        let r = registry();
        let l = grant(&r, "a", &["unix:uid:7"], Duration::from_secs(60)).await;
        let renewed = r.renew(&l.id, Duration::from_secs(100)).await.unwrap();
        assert!(renewed.expires_at > l.expires_at);
        let err = r.renew(&l.id, Duration::from_secs(200)).await.unwrap_err();
        assert!(matches!(err, LeaseError::InvalidField { field: "ttl", .. }));
    }
    /// Issue 14, hole 11: `now + ttl` overflowed and panicked a worker.
    #[tokio::test]
    async fn a_renewal_by_a_huge_ttl_is_refused_not_a_panic() {
        let r = registry();
        let l = grant(&r, "a", &["unix:uid:7"], Duration::from_secs(60)).await;
        for ttl in [
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
            Duration::from_secs(1 << 40),
        ] {
            let err = r.renew(&l.id, ttl).await.unwrap_err();
            assert!(
                matches!(err, LeaseError::InvalidField { field: "ttl", .. }),
                "{ttl:?}: {err:?}"
            );
        }
        assert_eq!(r.get(&l.id).await.unwrap().expires_at, l.expires_at);
    }
}
