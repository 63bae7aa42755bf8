//! The active set and its selector index: what makes matching a caller cost the buckets of its
//! selectors, not a scan of every lease.

use std::collections::BTreeSet;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::attest::BoundProcess;
use crate::lease::{Lease, LeaseId, LeaseState};
use crate::selector::{Selector, Selectors};
use crate::time::Boot;

use super::{ActiveLease, Leases};

pub(super) struct Slot {
    pub(super) lease: Arc<Lease>,
    /// Cancelled when the lease ends; created when something first waits on it (a stream's
    /// match, or the watch of a bound process), since most stored leases never have one.
    pub(super) ended: OnceLock<CancellationToken>,
    /// Created when the SVID cache first asks (most leases never need one).
    pub(super) expires_at: OnceLock<watch::Sender<SystemTime>>,
    /// The processes its `unix:pid` selectors bind it to, pinned when it became active: it
    /// matches only while every one of them runs (a pid and a start time alone can be reused).
    pub(super) bound: Vec<Arc<BoundProcess>>,
    /// `expires_at` on the boot clock, which a step of the wall clock does not move.
    pub(super) deadline: Boot,
}

#[derive(Default)]
pub(super) struct Inner {
    pub(super) active: HashMap<LeaseId, Slot>,
    /// Held back by an approval gate; never matched, never issued for.
    pub(super) pending: HashMap<LeaseId, (Lease, CancellationToken)>,
    /// index selector -> leases indexed under it
    pub(super) index: HashMap<Selector, HashSet<LeaseId>>,
    pub(super) ended: VecDeque<Lease>,
    /// Parent -> its live (active or pending) children: what an end takes along.
    pub(super) children: HashMap<LeaseId, HashSet<LeaseId>>,
    /// Every active lease by its deadline on the boot clock, soonest first (what the expiry
    /// task serves).
    pub(super) deadlines: BTreeSet<(Boot, LeaseId)>,
    /// Set while this agent has not heard its shared store for longer than it may go without
    /// (see [`StoreHealth`](crate::lease::StoreHealth)): no lease matches.
    pub(super) suspended: bool,
}

/// The slots of the active, unexpired leases whose selectors are all among the caller's: each
/// found through the index bucket of one of the caller's selectors, never by scanning.
fn matched<'a>(inner: &'a Inner, caller: &'a Selectors) -> impl Iterator<Item = &'a Slot> + 'a {
    // Either clock saying the lease is over is enough: the boot clock cannot be stepped back,
    // and a wall clock stepped forward makes certificates that end before they are issued.
    let (now, boot) = (SystemTime::now(), Boot::now());
    // A stale view of a shared store may miss a revocation: nothing matches until it is fresh.
    let suspended = inner.suspended;
    caller
        .iter()
        .filter(move |_| !suspended)
        .filter_map(|s| inner.index.get(s))
        .flatten()
        .map(|id| &inner.active[id])
        .filter(move |slot| {
            slot.deadline > boot
                && slot.lease.expires_at > now
                && slot.lease.selectors.all_in(caller)
                && slot.bound.iter().all(|p| p.is_alive())
        })
}

/// Moves an active lease's end to `wanted` if that is later, and records the store revision
/// the change has: the lease as it is now, or `None` if it is not active.
pub(super) fn extend(
    inner: &mut Inner,
    id: &LeaseId,
    wanted: SystemTime,
    revision: u64,
) -> Option<Lease> {
    let Inner {
        active, deadlines, ..
    } = inner;
    let slot = active.get_mut(id)?;
    if wanted > slot.lease.expires_at {
        deadlines.remove(&(slot.deadline, id.clone()));
        slot.deadline = Boot::at_wall(wanted);
        deadlines.insert((slot.deadline, id.clone()));
        Arc::make_mut(&mut slot.lease).expires_at = wanted;
        if let Some(tx) = slot.expires_at.get() {
            tx.send_replace(wanted);
        }
    }
    if revision > slot.lease.revision {
        Arc::make_mut(&mut slot.lease).revision = revision;
    }
    Some(Lease::clone(&slot.lease))
}

/// The selector a lease is indexed under: the kind that narrows callers most.
pub(super) fn index_key(selectors: &Selectors) -> Selector {
    selectors
        .index_key()
        .expect("a lease has at least one selector")
        .clone()
}

impl Leases {
    /// Puts a lease into the active set, under the expiry task's eye. A delegated lease whose
    /// parent is no longer active is ended instead, as `parent_ended`: returned so, for the
    /// caller to record.
    pub(super) fn activate(&self, lease: Lease) -> Option<Lease> {
        self.activate_all(vec![Arc::new(lease)]).pop()
    }

    /// Puts leases into the active set under one write lock (start-up restores thousands).
    /// Returns the delegated ones that ended at once because their parent is not active (a
    /// parent that ended meanwhile, or while the agent was down), for the caller to record.
    pub(super) fn activate_all(&self, leases: Vec<Arc<Lease>>) -> Vec<Lease> {
        let mut keys = Vec::with_capacity(leases.len());
        let mut watched = Vec::new();
        let mut orphans = Vec::new();
        let delegated: Vec<LeaseId> = leases
            .iter()
            .filter(|l| l.parent().is_some())
            .map(|l| l.id.clone())
            .collect();
        // Pinned before the lock: a pidfd per bound process.
        let leases: Vec<(Arc<Lease>, Vec<Arc<BoundProcess>>)> = leases
            .into_iter()
            .map(|lease| {
                let bound = lease
                    .selectors
                    .processes()
                    .map(|(pid, start)| Arc::new(BoundProcess::pin(pid, start)))
                    .collect();
                (lease, bound)
            })
            .collect();
        let clocks = Boot::clocks();
        {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            for (lease, bound) in leases {
                // Once: a lease that came back through a shared store's watch before its
                // grant finished here is active already, with its streams' tokens.
                if inner.active.contains_key(&lease.id) {
                    continue;
                }
                let ended = OnceLock::new();
                let key = index_key(&lease.selectors);
                inner
                    .index
                    .entry(key.clone())
                    .or_default()
                    .insert(lease.id.clone());
                if let Some(parent) = lease.parent() {
                    inner
                        .children
                        .entry(parent.clone())
                        .or_default()
                        .insert(lease.id.clone());
                }
                let deadline = Boot::at_wall_from(lease.expires_at, clocks);
                inner.deadlines.insert((deadline, lease.id.clone()));
                if !bound.is_empty() {
                    let token = ended.get_or_init(CancellationToken::new).clone();
                    watched.push((lease.clone(), token, bound.clone()));
                }
                inner.active.insert(
                    lease.id.clone(),
                    Slot {
                        lease,
                        ended,
                        expires_at: OnceLock::new(),
                        bound,
                        deadline,
                    },
                );
                keys.push(key);
            }
            // After the whole batch is in: a parent restored with its children is active.
            loop {
                let orphan = delegated.iter().find(|id| {
                    inner.active.get(*id).is_some_and(|slot| {
                        slot.lease
                            .parent()
                            .is_some_and(|p| !inner.active.contains_key(p))
                    })
                });
                let Some(id) = orphan.cloned() else { break };
                let parent = inner.active[&id].lease.parent().cloned();
                let why = format!(
                    "delegated from lease {}, which is no longer active",
                    parent.expect("a delegated lease")
                );
                if let Some(l) = super::lifecycle::end_one(
                    &mut inner,
                    &id,
                    LeaseState::ParentEnded,
                    crate::lease::Principal::agent(),
                    &why,
                ) {
                    orphans.push(l);
                }
            }
        }
        self.start_expiry();
        self.deadline_moved.notify_one();
        for (lease, ended, bound) in watched {
            self.spawn_process_watch(&lease, ended, bound);
        }
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            self.changed(&key);
        }
        orphans
    }

    /// The active, unexpired leases whose selectors are all among the caller's, oldest first.
    pub fn matching(&self, caller: &Selectors) -> Vec<ActiveLease> {
        let inner = self.inner.read().expect("lease lock poisoned");
        let mut out: Vec<ActiveLease> = matched(&inner, caller)
            .map(|slot| ActiveLease {
                lease: slot.lease.clone(),
                ended: slot.ended.get_or_init(CancellationToken::new).clone(),
                expires_at: slot
                    .expires_at
                    .get_or_init(|| watch::channel(slot.lease.expires_at).0)
                    .subscribe(),
            })
            .collect();
        out.sort_by(|a, b| {
            a.lease
                .created_at
                .cmp(&b.lease.created_at)
                .then_with(|| a.lease.id.cmp(&b.lease.id))
        });
        out
    }

    /// Whether any lease matches the caller: [`Leases::matching`] without building its
    /// result, for the streams that only need to know whether their identity is gone.
    pub fn matches_any(&self, caller: &Selectors) -> bool {
        let inner = self.inner.read().expect("lease lock poisoned");
        let any = matched(&inner, caller).next().is_some();
        any
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::lease::LeaseId;
    use std::time::Duration;

    #[tokio::test]
    async fn matching_needs_every_selector() {
        let r = registry();
        let hour = Duration::from_secs(1800);
        let a = grant(&r, "a", &["unix:uid:1000"], hour).await;
        let b = grant(&r, "b", &["unix:uid:1000", "unix:path:/bin/x"], hour).await;
        let _c = grant(&r, "c", &["unix:uid:1001"], hour).await;
        let ids = |sel: &[&str]| -> Vec<LeaseId> {
            r.matching(&selectors(sel))
                .into_iter()
                .map(|l| l.lease.id.clone())
                .collect()
        };
        assert_eq!(ids(&["unix:uid:1000"]), vec![a.id.clone()]);
        assert_eq!(
            ids(&["unix:uid:1000", "unix:path:/bin/x", "unix:gid:5"]),
            vec![a.id.clone(), b.id.clone()]
        );
        assert!(ids(&["unix:uid:1002"]).is_empty());
    }

    #[tokio::test]
    async fn thousands_of_leases_match_through_the_index() {
        let r = registry();
        for i in 0..5000 {
            grant(
                &r,
                &format!("t{i}"),
                &[&format!("unix:uid:{i}")],
                Duration::from_secs(600),
            )
            .await;
        }
        let m = r.matching(&selectors(&["unix:uid:4242", "unix:gid:0"]));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].lease.task_id, "t4242");
    }
}
