//! Ends that took effect but could not yet be recorded: retried, with backoff, until both the
//! store and the audit log hold them. Until the store does, the end is not durable, and the
//! admin API says so.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::lease::{Lease, LeaseId};

use super::Leases;

/// The first retry comes soon (a disk that filled for a moment), later ones less often.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LAST_RETRY: Duration = Duration::from_secs(10);

/// An ended lease, and which of its two records are durable.
#[derive(Clone, Debug)]
pub(super) struct Unrecorded {
    lease: Lease,
    stored: bool,
    audited: bool,
}

impl Leases {
    /// Keeps an end whose records are not all durable, and makes sure one task retries it.
    pub(super) fn retry_later(&self, lease: Lease, stored: bool, audited: bool) {
        let mut unrecorded = self.unrecorded.lock().expect("unrecorded ends poisoned");
        unrecorded.insert(
            lease.id.clone(),
            Unrecorded {
                lease,
                stored,
                audited,
            },
        );
        self.durable
            .metrics
            .lease_ends_unrecorded
            .set(unrecorded.len() as i64);
        // Decided under the lock, as the task decides to stop under it: never zero tasks
        // for a waiting end, never two.
        if self.retrying.swap(true, Ordering::AcqRel) {
            return;
        }
        drop(unrecorded);
        let me = self.me.clone();
        self.spawn(async move {
            let mut wait = FIRST_RETRY;
            loop {
                tokio::time::sleep(wait).await;
                let Some(registry) = me.upgrade() else { return };
                if registry.retry_unrecorded().await == 0 {
                    return;
                }
                wait = (wait * 2).min(LAST_RETRY);
            }
        });
    }

    /// Whether the end of lease `id` is in the store (an end not made yet is not).
    pub fn end_is_durable(&self, id: &LeaseId) -> bool {
        let unrecorded = self.unrecorded.lock().expect("unrecorded ends poisoned");
        unrecorded.get(id).is_none_or(|u| u.stored)
    }

    /// One attempt at every waiting end; returns how many still wait. At none, the retrying
    /// task is over.
    pub(super) async fn retry_unrecorded(&self) -> usize {
        let waiting: Vec<Unrecorded> = {
            let unrecorded = self.unrecorded.lock().expect("unrecorded ends poisoned");
            unrecorded.values().cloned().collect()
        };
        for mut u in waiting {
            if !u.stored {
                match self.store_ends(std::slice::from_ref(&u.lease)).await {
                    Ok(theirs) => {
                        u.stored = true;
                        // Another agent's end stands, and is its to audit.
                        if theirs.into_iter().flatten().next().is_some() {
                            u.audited = true;
                        }
                    }
                    Err(_) => u.stored = false,
                }
            }
            if !u.audited {
                let reason = u.lease.end_reason.as_str();
                u.audited = self
                    .audit_lease(u.lease.state.as_str(), &u.lease, reason)
                    .await
                    .is_ok();
            }
            let mut unrecorded = self.unrecorded.lock().expect("unrecorded ends poisoned");
            if u.stored && u.audited {
                unrecorded.remove(&u.lease.id);
                tracing::info!(
                    event = "lease_end_recorded",
                    lease_id = %u.lease.id,
                    "the end of this lease is recorded now"
                );
            } else {
                unrecorded.insert(u.lease.id.clone(), u);
            }
        }
        let unrecorded = self.unrecorded.lock().expect("unrecorded ends poisoned");
        let left = unrecorded.len();
        self.durable.metrics.lease_ends_unrecorded.set(left as i64);
        if left == 0 {
            self.retrying.store(false, Ordering::Release);
        }
        left
    }

    /// At shutdown: a last attempt, and a loud word about every end still not durable (a
    /// restart before it is recorded could bring the lease back).
    pub(super) async fn last_retry(&self) {
        if self.retry_unrecorded().await == 0 {
            return;
        }
        let unrecorded = self.unrecorded.lock().expect("unrecorded ends poisoned");
        for u in unrecorded.values() {
            tracing::error!(
                event = "lease_end_lost",
                lease_id = %u.lease.id,
                stored = u.stored,
                audited = u.audited,
                "stopping with this lease's end not recorded"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_support::*;
    use crate::audit::MemorySink;
    use crate::lease::{LeaseState, LeaseStore, Principal};

    /// Issue 14, hole 1: a revocation on a full disk was kept only in memory, and nothing tried
    /// again; a restart brought the lease back.
    #[tokio::test]
    async fn an_end_the_disk_refused_is_retried_until_store_and_audit_hold_it() {
        let store = crate::store::MemoryStore::new();
        let audit = MemorySink::new();
        let r = registry_on(store.clone(), audit.clone());
        let l = grant(&r, "t", &["unix:uid:7"], Duration::from_secs(60)).await;
        store.fail_writes(Some("disk full"));
        audit.fail(Some("disk full"));
        let ended = r
            .end(&l.id, LeaseState::Revoked, Principal::agent(), "leaked")
            .await
            .unwrap();
        assert_eq!(ended.state, LeaseState::Revoked);
        assert!(r.matching(&selectors(&["unix:uid:7"])).is_empty());
        assert!(
            !r.end_is_durable(&l.id),
            "the caller learns it is not durable"
        );
        assert_eq!(r.durable.metrics.lease_ends_unrecorded.get(), 1);
        // Still failing after a few retries: nothing recorded, nothing forgotten.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(store.load().unwrap()[0].state, LeaseState::Active);
        assert!(!r.end_is_durable(&l.id));
        // The disk has room again: the next retry records both.
        store.fail_writes(None);
        audit.fail(None);
        for _ in 0..200 {
            if r.durable.metrics.lease_ends_unrecorded.get() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(r.end_is_durable(&l.id));
        let stored = store.load().unwrap();
        assert_eq!(stored[0].state, LeaseState::Revoked);
        assert_eq!(stored[0].end_reason, "leaked");
        assert_eq!(audit.events(), ["lease_granted", "lease_revoked"]);

        // And a restart on that store keeps it ended.
        let again = registry_on(store.clone(), MemorySink::new());
        again
            .restore(store.load().unwrap(), Duration::from_secs(3600))
            .await;
        assert!(again.matching(&selectors(&["unix:uid:7"])).is_empty());
        assert_eq!(again.get(&l.id).await.unwrap().state, LeaseState::Revoked);
    }

    #[tokio::test]
    async fn an_end_stored_but_not_audited_is_durable_and_still_audited_later() {
        let store = crate::store::MemoryStore::new();
        let audit = MemorySink::new();
        let r = registry_on(store.clone(), audit.clone());
        let l = grant(&r, "t", &["unix:uid:7"], Duration::from_secs(60)).await;
        audit.fail(Some("disk full"));
        r.end(&l.id, LeaseState::Completed, Principal::agent(), "done")
            .await
            .unwrap();
        assert!(r.end_is_durable(&l.id));
        assert_eq!(store.load().unwrap()[0].state, LeaseState::Completed);
        audit.fail(None);
        r.last_retry().await;
        assert_eq!(audit.events(), ["lease_granted", "lease_completed"]);
        assert_eq!(r.durable.metrics.lease_ends_unrecorded.get(), 0);
    }
}
