//! Following a store that other agents share: their grants, renewals, approvals and ends
//! arrive through the store's watch and take effect here as if made here (streams are told,
//! SVID caches torn down), and a store this agent has not heard for too long suspends every
//! lease until it hears again.
//!
//! Each change carries the lease's store revision. A change at or below the revision this
//! agent holds is one it made itself (its echo) or an old one, and is ignored; a lease that
//! ended here never lives again, whatever arrives later (this agent's end is being written on
//! top of it).

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;

use crate::lease::{
    Lease, LeaseId, LeaseState, Principal, StoreChange, StoreHealth, StoreWatch, Stored,
};

use super::index::{extend, index_key};
use super::lifecycle::{end_descendants, keep_ended, replace_ended, take_live};
use super::Leases;

/// How many times a lease missing from a full read is looked up before it is left as it is.
const LOOK_UP_ATTEMPTS: u32 = 3;

/// What this agent holds of a lease, for comparing with a change from the store.
enum Held {
    Active(u64),
    Pending(u64),
    Ended(u64),
}

impl Leases {
    /// Applies the store's changes (from `changes`, taken before the store was loaded, so
    /// that nothing between the load and now is missed) and follows its health, until the
    /// registry closes.
    pub fn follow(self: &Arc<Self>, mut changes: StoreWatch) {
        let me = Arc::downgrade(self);
        let mut health = self.durable.store.health();
        let closing = self.closing.clone();
        self.tasks.spawn(async move {
            let mut health_open = true;
            loop {
                tokio::select! {
                    // Changes before health: a store that has become current again sends what
                    // it missed first, and every bit of it is applied before leases resume.
                    biased;
                    _ = closing.cancelled() => return,
                    change = changes.recv() => {
                        let Some(r) = me.upgrade() else { return };
                        match change {
                            Ok(change) => {
                                r.apply(change).await;
                                // Turning stale waits for no change: a store behind on its
                                // changes must not keep this node serving by sending them.
                                if health_open && health.borrow().stale && !r.suspended() {
                                    let now = *health.borrow_and_update();
                                    r.set_health(now);
                                }
                            }
                            Err(RecvError::Lagged(missed)) => {
                                tracing::warn!(event = "store_watch_lagged", missed, "fell behind the lease store's changes; reading it again");
                                match r.stored().await {
                                    Ok(all) => r.reconcile(&all).await,
                                    Err(e) => tracing::error!(error = %e, "reading the lease store again failed"),
                                }
                            }
                            Err(RecvError::Closed) => return,
                        }
                    }
                    changed = health.changed(), if health_open => {
                        if changed.is_err() {
                            health_open = false;
                            continue;
                        }
                        let now = *health.borrow_and_update();
                        let Some(r) = me.upgrade() else { return };
                        r.set_health(now);
                    }
                }
            }
        });
    }

    /// Suspends every lease while the store is stale, and resumes them when it is not: either
    /// way every open stream is woken to look again (and, suspended, finds nothing).
    fn set_health(&self, health: StoreHealth) {
        let changed = {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            let was = std::mem::replace(&mut inner.suspended, health.stale);
            was != health.stale
        };
        if !changed {
            return;
        }
        if health.stale {
            tracing::error!(
                event = "store_stale",
                "not heard from the lease store for longer than store.max_staleness: issuing nothing and ending streams until it answers"
            );
        } else {
            tracing::info!(
                event = "store_fresh",
                "the lease store answers again: issuing"
            );
        }
        self.wake_all();
    }

    /// Whether leases are suspended because the shared store is stale.
    pub fn suspended(&self) -> bool {
        self.inner.read().expect("lease lock poisoned").suspended
    }

    pub(super) async fn apply(&self, change: StoreChange) {
        match change {
            StoreChange::Put(lease) => self.apply_put(lease).await,
            StoreChange::Removed(id) => {
                // Compaction deletes ended leases only: a live one was deleted by hand, and
                // ends here (its end written back, and kept among the recent ends).
                if self.held_live(&id) {
                    self.end_deleted(&id).await;
                } else {
                    let mut inner = self.inner.write().expect("lease lock poisoned");
                    inner.ended.retain(|l| l.id != id);
                }
            }
            StoreChange::Unreadable(id) => self.withdraw(&id).await,
            StoreChange::Reloaded(all) => self.reconcile(&all).await,
        }
    }

    /// Takes a full read of the store: every lease in it applied. A live lease this agent
    /// holds that the read lacks is looked up again, since it may have been written after the
    /// read: gone, it ends here (someone deleted it); unreadable, it is withdrawn; there, it
    /// is applied.
    pub(super) async fn reconcile(&self, all: &[Arc<Lease>]) {
        for lease in all {
            self.apply_put(lease.clone()).await;
        }
        let present: std::collections::HashSet<&LeaseId> = all.iter().map(|l| &l.id).collect();
        let missing: Vec<Lease> = {
            let inner = self.inner.read().expect("lease lock poisoned");
            inner
                .active
                .values()
                .map(|slot| Lease::clone(&slot.lease))
                .chain(inner.pending.values().map(|(l, _)| l.clone()))
                .filter(|l| !present.contains(&l.id))
                .collect()
        };
        for lease in missing {
            match self.look_up(&lease).await {
                Some(Stored::Present(now)) => self.apply_put(now).await,
                Some(Stored::Absent) => self.end_deleted(&lease.id).await,
                Some(Stored::Unreadable) => self.withdraw(&lease.id).await,
                // Left as it is: a store that cannot be read for long turns stale, and its
                // next full read looks again.
                None => {}
            }
        }
    }

    /// `lease` as the store holds it now, asked a few times; `None` if the store never says.
    async fn look_up(&self, lease: &Lease) -> Option<Stored> {
        for attempt in 1..=LOOK_UP_ATTEMPTS {
            let store = self.durable.store.clone();
            let asked = lease.clone();
            let why = match tokio::task::spawn_blocking(move || store.read(&asked)).await {
                Ok(Ok(stored)) => return Some(stored),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(lease_id = %lease.id, attempt, error = %why, "looking a lease up in the store failed");
            tokio::time::sleep(std::time::Duration::from_millis(200) * attempt).await;
        }
        None
    }

    fn held_live(&self, id: &LeaseId) -> bool {
        matches!(self.held(id), Some(Held::Active(_) | Held::Pending(_)))
    }

    /// Ends a live lease the store no longer holds, and writes that end back.
    async fn end_deleted(&self, id: &LeaseId) {
        let why = "deleted from the lease store";
        let _ = self
            .end(id, LeaseState::Revoked, Principal::agent(), why)
            .await;
    }

    /// Stops serving a lease the store holds in a form this agent cannot read (written by a
    /// newer agent, or damaged): it may have ended, so it ends here, with its descendants.
    /// Nothing is written to the store, over that record or about the descendants (newer
    /// agents still read the lease, and judge it and its children themselves); each is audited
    /// here as `lease_withdrawn`.
    async fn withdraw(&self, id: &LeaseId) {
        let why = "its record in the lease store cannot be read by this agent";
        let ended = {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            take_live(&mut inner, id).map(|mut lease| {
                lease.mark_ended(LeaseState::Revoked, Principal::agent(), why);
                keep_ended(&mut inner, lease.clone());
                end_descendants(&mut inner, lease)
            })
        };
        let Some(ended) = ended else { return };
        self.wake_for(&ended);
        tracing::error!(
            event = "lease_withdrawn",
            lease_id = %id,
            task_id = %ended[0].task_id,
            reason = why,
            "lease withdrawn on this node"
        );
        for lease in &ended {
            if let Err(e) = self
                .audit_lease("withdrawn", lease, &lease.end_reason)
                .await
            {
                tracing::error!(lease_id = %lease.id, error = %e, "the withdrawal is not in the audit log");
            }
        }
    }

    fn held(&self, id: &LeaseId) -> Option<Held> {
        let inner = self.inner.read().expect("lease lock poisoned");
        if let Some(slot) = inner.active.get(id) {
            return Some(Held::Active(slot.lease.revision));
        }
        if let Some((l, _)) = inner.pending.get(id) {
            return Some(Held::Pending(l.revision));
        }
        inner
            .ended
            .iter()
            .rev()
            .find(|l| &l.id == id)
            .map(|l| Held::Ended(l.revision))
    }

    async fn apply_put(&self, lease: Arc<Lease>) {
        if !self.serves(&lease) {
            return;
        }
        let held = self.held(&lease.id);
        let revision = match &held {
            Some(Held::Active(r) | Held::Pending(r) | Held::Ended(r)) => Some(*r),
            None => None,
        };
        if revision.is_some_and(|r| r >= lease.revision) {
            return;
        }
        let live = matches!(lease.state, LeaseState::Active | LeaseState::Pending);
        match (held, lease.state) {
            // Granted (or approved) on another node.
            (None, LeaseState::Active) => {
                let orphans = self.activate_all(vec![lease]);
                self.record_ends(&orphans).await;
            }
            (None, LeaseState::Pending) => self.park(Lease::clone(&lease)),
            // Renewed on another node.
            (Some(Held::Active(_)), LeaseState::Active) => {
                let extended = {
                    let mut inner = self.inner.write().expect("lease lock poisoned");
                    extend(&mut inner, &lease.id, lease.expires_at, lease.revision)
                };
                if extended.is_some() {
                    self.changed(&index_key(&lease.selectors));
                }
            }
            // Approved on another node.
            (Some(Held::Pending(_)), LeaseState::Active) => {
                let taken = {
                    let mut inner = self.inner.write().expect("lease lock poisoned");
                    inner.pending.remove(&lease.id)
                };
                if let Some((_, timer)) = taken {
                    timer.cancel();
                    let orphans = self.activate_all(vec![lease]);
                    self.record_ends(&orphans).await;
                }
            }
            (Some(Held::Pending(_)), LeaseState::Pending) => {
                let mut inner = self.inner.write().expect("lease lock poisoned");
                if let Some((held, _)) = inner.pending.get_mut(&lease.id) {
                    *held = Lease::clone(&lease);
                }
            }
            // Ended on another node: it ends here too, with its descendants, which this agent
            // records (a child bound to a process here is known to no other node).
            (Some(Held::Active(_) | Held::Pending(_)), _) if !live => {
                let ended = {
                    let mut inner = self.inner.write().expect("lease lock poisoned");
                    match take_live(&mut inner, &lease.id) {
                        None => None,
                        Some(_) => {
                            keep_ended(&mut inner, Lease::clone(&lease));
                            Some(end_descendants(&mut inner, Lease::clone(&lease)))
                        }
                    }
                };
                if let Some(ended) = ended {
                    self.wake_for(&ended);
                    tracing::info!(
                        event = "lease_ended_elsewhere",
                        lease_id = %lease.id,
                        task_id = %lease.task_id,
                        state = %lease.state,
                        "lease ended by another agent"
                    );
                    self.record_ends(&ended[1..]).await;
                }
            }
            // Known ended (or never seen, and ended): kept among the recent ends.
            (Some(Held::Ended(_)) | None, _) if !live => {
                let mut inner = self.inner.write().expect("lease lock poisoned");
                replace_ended(&mut inner, Lease::clone(&lease));
            }
            // Ended here, live in the store: this agent's end is being written over it.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::audit::MemorySink;
    use crate::lease::{LeaseError, LeaseState, LeaseStore, Principal, StoreChange, StoreHealth};
    use std::time::Duration;

    /// Waits (briefly) until `check` holds: changes reach the other registry through the
    /// store's watch, on another task.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("never happened: {what}");
    }

    #[tokio::test]
    async fn a_grant_renewal_and_revocation_on_one_node_take_effect_on_the_other() {
        let store = crate::store::MemoryStore::shared();
        let a = node_on(store.clone(), MemorySink::new(), "a");
        let b = node_on(store.clone(), MemorySink::new(), "b");
        let caller = selectors(&["unix:uid:7"]);
        let l = grant(&a, "t", &["unix:uid:7"], Duration::from_secs(60)).await;
        eventually("B serves A's grant", || !b.matching(&caller).is_empty()).await;
        let on_b = b.matching(&caller).remove(0);
        let renewed = b.renew(&l.id, Duration::from_secs(100)).await.unwrap();
        eventually("A sees B's renewal", || {
            a.get_active(&l.id).unwrap().expires_at == renewed.expires_at
        })
        .await;
        // A renews again on top of B's renewal: its revision followed.
        a.renew(&l.id, Duration::from_secs(110)).await.unwrap();
        a.end(&l.id, LeaseState::Revoked, Principal::agent(), "done")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), on_b.ended.cancelled())
            .await
            .expect("B's SVID cache for the lease is torn down");
        assert!(b.matching(&caller).is_empty());
        eventually("B keeps A's end", || {
            b.get_cached(&l.id)
                .is_some_and(|l| l.state == LeaseState::Revoked)
        })
        .await;
        let stored = store.load().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].state, LeaseState::Revoked);
        assert_eq!(stored[0].end_reason, "done");
    }

    #[tokio::test]
    async fn two_nodes_ending_one_lease_at_once_record_one_end() {
        let store = crate::store::MemoryStore::shared();
        let (audit_a, audit_b) = (MemorySink::new(), MemorySink::new());
        let a = node_on(store.clone(), audit_a.clone(), "a");
        let b = node_on(store.clone(), audit_b.clone(), "b");
        let l = grant(&a, "t", &["unix:uid:7"], Duration::from_secs(60)).await;
        eventually("B holds the lease", || b.get_active(&l.id).is_some()).await;
        let (ra, rb) = tokio::join!(
            a.end(&l.id, LeaseState::Revoked, Principal::agent(), "by a"),
            b.end(&l.id, LeaseState::Completed, Principal::agent(), "by b"),
        );
        ra.unwrap();
        rb.unwrap();
        let stored = store.load().unwrap();
        assert_eq!(stored.len(), 1);
        let ended = &stored[0];
        let ends = |audit: &MemorySink| {
            audit
                .events()
                .iter()
                .filter(|e| e.ends_with("revoked") || e.ends_with("completed"))
                .count()
        };
        assert_eq!(
            ends(&audit_a) + ends(&audit_b),
            1,
            "one end audited, by the node whose end the store holds"
        );
        // Both nodes come to hold the end that stands.
        for r in [&a, &b] {
            eventually("the end that stands is kept", || {
                r.get_cached(&l.id)
                    .is_some_and(|got| got.state == ended.state)
            })
            .await;
        }
    }

    #[tokio::test]
    async fn a_renewal_racing_a_remote_revocation_loses_and_the_lease_stays_ended() {
        let store = crate::store::MemoryStore::shared();
        let a = node_on(store.clone(), MemorySink::new(), "a");
        // B does not follow the store: its view goes stale, as during a slow watch.
        let b = registry_on_node(store.clone(), MemorySink::new(), "b");
        let l = grant(&a, "t", &["unix:uid:7"], Duration::from_secs(60)).await;
        b.restore(store.load().unwrap(), Duration::from_secs(60))
            .await;
        a.end(&l.id, LeaseState::Revoked, Principal::agent(), "x")
            .await
            .unwrap();
        let err = b.renew(&l.id, Duration::from_secs(90)).await.unwrap_err();
        assert!(matches!(err, LeaseError::Changed(_)), "{err:?}");
        assert_eq!(store.load().unwrap()[0].state, LeaseState::Revoked);
    }

    #[tokio::test]
    async fn a_lease_bound_to_a_process_is_served_only_by_its_node() {
        let store = crate::store::MemoryStore::shared();
        let a = node_on(store.clone(), MemorySink::new(), "a");
        let b = node_on(store.clone(), MemorySink::new(), "b");
        let me = std::process::id() as i32;
        let start = crate::attest::process_start_time(me).unwrap();
        let pid = format!("unix:pid:{me}:{start}");
        let bound = grant(&a, "bound", &[&pid], Duration::from_secs(60)).await;
        assert_eq!(bound.node.as_deref(), Some("a"));
        let shared = grant(&a, "shared", &["unix:uid:7"], Duration::from_secs(60)).await;
        assert_eq!(shared.node, None);
        eventually("B serves the shared lease", || {
            b.get_active(&shared.id).is_some()
        })
        .await;
        assert!(
            b.get_active(&bound.id).is_none(),
            "B never takes A's bound lease"
        );
        assert!(a.get_active(&bound.id).is_some());
    }

    #[tokio::test]
    async fn a_lease_held_for_approval_on_one_node_is_approved_on_another() {
        let store = crate::store::MemoryStore::shared();
        let a = node_on(store.clone(), MemorySink::new(), "a");
        let b = node_on(store.clone(), MemorySink::new(), "b");
        let lease = a
            .prepare(
                input("gated", &["unix:uid:7"], Duration::from_secs(60)),
                Principal::agent(),
            )
            .unwrap();
        let held = a
            .hold(lease, Duration::from_secs(60), &["gate".into()])
            .await
            .unwrap();
        eventually("B holds it pending", || {
            b.get_cached(&held.id)
                .is_some_and(|l| l.state == LeaseState::Pending)
        })
        .await;
        let approver = Principal {
            uid: 4242,
            ..Principal::agent()
        };
        b.approve(&held.id, approver).await.unwrap();
        eventually("A serves it, approved", || {
            !a.matching(&selectors(&["unix:uid:7"])).is_empty()
        })
        .await;
        assert_eq!(a.pending_count(), 0);
    }

    #[tokio::test]
    async fn every_node_expires_a_lease_itself_and_the_store_holds_one_end() {
        let store = crate::store::MemoryStore::shared();
        let (audit_a, audit_b) = (MemorySink::new(), MemorySink::new());
        let a = node_on(store.clone(), audit_a.clone(), "a");
        let b = node_on(store.clone(), audit_b.clone(), "b");
        let l = grant(&a, "short", &["unix:uid:7"], Duration::from_secs(1)).await;
        eventually("B holds the lease", || b.get_active(&l.id).is_some()).await;
        for r in [&a, &b] {
            for _ in 0..400 {
                if r.get_active(&l.id).is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                r.get_active(&l.id).is_none(),
                "every node ends it at its deadline"
            );
        }
        eventually("the end is stored", || {
            store.load().unwrap()[0].state == LeaseState::Expired
        })
        .await;
        let expired = |audit: &MemorySink| {
            audit
                .events()
                .iter()
                .filter(|e| e.ends_with("expired"))
                .count()
        };
        eventually("one end audited", || {
            expired(&audit_a) + expired(&audit_b) == 1
        })
        .await;
    }

    #[tokio::test]
    async fn a_stale_store_suspends_every_lease_and_wakes_the_streams() {
        let r = registry();
        let caller = selectors(&["unix:uid:7"]);
        grant(&r, "t", &["unix:uid:7"], Duration::from_secs(60)).await;
        let changes = r.changes(&caller);
        r.set_health(StoreHealth {
            reachable: false,
            stale: true,
        });
        tokio::time::timeout(Duration::from_secs(1), changes.changed())
            .await
            .expect("the stream is woken");
        assert!(r.suspended());
        assert!(r.matching(&caller).is_empty());
        assert!(!r.matches_any(&caller));
        r.set_health(StoreHealth::FINE);
        assert_eq!(r.matching(&caller).len(), 1, "the lease serves again");
    }

    #[tokio::test]
    async fn a_full_read_taken_before_a_grant_does_not_end_it() {
        let store = crate::store::MemoryStore::shared();
        let a = node_on(store.clone(), MemorySink::new(), "a");
        // A full read of the store, taken just before another lease was granted here (as a
        // watch that reconnects reads while grants go on).
        let before = store.load().unwrap();
        let l = grant(&a, "t", &["unix:uid:7"], Duration::from_secs(60)).await;
        a.reconcile(&before).await;
        assert!(a.get_active(&l.id).is_some(), "the new lease stands");
        assert_eq!(store.load().unwrap()[0].state, LeaseState::Active);
    }

    /// A lease granted on a node of a shared store, then `change(id)` applied there: the
    /// lease must be gone from matching, its SVID cache torn down.
    async fn applied_to_a_held_lease(
        change: impl FnOnce(crate::lease::LeaseId) -> StoreChange,
    ) -> (
        std::sync::Arc<crate::store::MemoryStore>,
        std::sync::Arc<MemorySink>,
        std::sync::Arc<super::super::Leases>,
        crate::lease::Lease,
    ) {
        let store = crate::store::MemoryStore::shared();
        let audit = MemorySink::new();
        let a = node_on(store.clone(), audit.clone(), "a");
        let caller = selectors(&["unix:uid:7"]);
        let l = grant(&a, "t", &["unix:uid:7"], Duration::from_secs(60)).await;
        let held = a.matching(&caller).remove(0);
        a.apply(change(l.id.clone())).await;
        tokio::time::timeout(Duration::from_secs(1), held.ended.cancelled())
            .await
            .expect("the lease's SVID cache is torn down");
        assert!(a.matching(&caller).is_empty());
        (store, audit, a, l)
    }

    #[tokio::test]
    async fn a_live_lease_deleted_from_the_store_ends() {
        let (_, audit, a, l) = applied_to_a_held_lease(StoreChange::Removed).await;
        let ended = a.get_cached(&l.id).unwrap();
        assert_eq!(ended.state, LeaseState::Revoked);
        assert_eq!(ended.end_reason, "deleted from the lease store");
        assert!(audit.events().iter().any(|e| e == "lease_revoked"));
    }

    #[tokio::test]
    async fn a_lease_this_agent_cannot_read_is_withdrawn_and_not_overwritten() {
        let (store, audit, a, l) = applied_to_a_held_lease(StoreChange::Unreadable).await;
        assert!(a.get_active(&l.id).is_none());
        assert!(audit.events().iter().any(|e| e == "lease_withdrawn"));
        // The record it cannot read (a newer agent's) is left as it is.
        let stored = store.load().unwrap();
        assert_eq!(stored[0].state, LeaseState::Active);
        assert_eq!(stored[0].revision, l.revision);
    }
}
