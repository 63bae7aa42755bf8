//! The store port and the audit log: every change written before (or, for ends, right after) it
//! takes effect, and read back at start-up.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::audit::{event, Event};
use crate::lease::{Lease, LeaseError, LeaseState, Principal, StoreError};

/// Why a store write did not happen.
#[derive(Debug)]
pub(super) enum StoreFailure {
    /// Another agent sharing the store moved these leases first: the leases as stored now.
    Conflict(Vec<Arc<Lease>>),
    /// The store could not be written (or reached).
    Unavailable(LeaseError),
}

use super::{Leases, ENDED_KEPT};

/// Why a lease stored as active cannot resume after a restart, if it cannot: it expired, or a
/// process it is bound to is gone (checked against the start time, so a reused PID is gone).
fn stale(lease: &Lease, now: SystemTime) -> Option<(LeaseState, String)> {
    if lease.expires_at <= now {
        return Some((
            LeaseState::Expired,
            "expired while the agent was down".to_string(),
        ));
    }
    let (pid, _) = lease
        .selectors
        .processes()
        .find(|&(pid, start)| crate::attest::process_start_time(pid).ok() != Some(start))?;
    Some((
        LeaseState::ProcessExited,
        format!("bound process {pid} exited while the agent was down"),
    ))
}

impl Leases {
    /// Writes the audit record, then the store. Either failing refuses the change. Once
    /// written, the lease is at its next revision.
    pub(super) async fn persist(
        &self,
        what: &str,
        lease: &mut Lease,
        reason: &str,
    ) -> Result<(), LeaseError> {
        self.audit_lease(what, lease, reason).await?;
        match self.store_lease(lease).await {
            Ok(()) => {
                lease.revision += 1;
                Ok(())
            }
            Err(StoreFailure::Conflict(_)) => Err(LeaseError::Changed(format!(
                "lease {} was changed on another node at the same time; nothing was changed \
                 here, ask again",
                lease.id
            ))),
            Err(StoreFailure::Unavailable(e)) => Err(e),
        }
    }

    pub(super) async fn audit_lease(
        &self,
        what: &str,
        lease: &Lease,
        reason: &str,
    ) -> Result<(), LeaseError> {
        let d = &self.durable;
        let event = Event::Lease(audit_change(what, lease, reason));
        crate::telemetry::timed(&d.metrics.audit_write_seconds, d.audit.record(&event))
            .await
            .map(drop)
            .map_err(|e| {
            tracing::error!(event = "audit_failed", error = %e, "audit log unavailable: refusing the change");
            LeaseError::Unavailable(format!("audit log unavailable: {e}"))
        })
    }

    pub(super) async fn store_lease(&self, lease: &Lease) -> Result<(), StoreFailure> {
        self.store_leases(std::slice::from_ref(lease)).await
    }

    /// Writes leases in one store transaction: all or none.
    pub(super) async fn store_leases(&self, leases: &[Lease]) -> Result<(), StoreFailure> {
        let store = self.durable.store.clone();
        let records = leases.to_vec();
        let written = tokio::task::spawn_blocking(move || store.put_all(&records))
            .await
            .map_err(|e| {
                StoreFailure::Unavailable(LeaseError::Unavailable(format!("lease store: {e}")))
            })?;
        match written {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict(now)) => Err(StoreFailure::Conflict(now)),
            Err(e) => {
                tracing::error!(event = "store_failed", error = %e, "lease store unavailable");
                Err(StoreFailure::Unavailable(LeaseError::Unavailable(format!(
                    "lease store unavailable: {e}"
                ))))
            }
        }
    }

    /// Every lease in the store.
    pub(super) async fn stored(&self) -> Result<Vec<Arc<Lease>>, LeaseError> {
        let store = self.durable.store.clone();
        tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| LeaseError::Unavailable(format!("lease store: {e}")))?
            .map_err(|e| LeaseError::Unavailable(format!("lease store: {e}")))
    }

    /// Start-up: takes over the stored leases. Leases that expired while the agent was down
    /// end as `expired`, leases bound to a process that is gone end as `process_exited`, and
    /// the rest become active again with their timers.
    pub async fn restore(&self, stored: Vec<Arc<Lease>>, retention: Duration) {
        {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            let active = stored
                .iter()
                .filter(|l| l.state == LeaseState::Active)
                .count();
            inner.active.reserve(active);
            inner.index.reserve(active);
        }
        let now = SystemTime::now();
        let cutoff = now.checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut ended_now = Vec::new();
        let mut ended = Vec::new();
        let mut active = Vec::with_capacity(stored.len());
        for stored in stored {
            // A lease bound to a process on another node is that node's (a shared store).
            if !self.serves(&stored) {
                continue;
            }
            // What ends here while the agent was down is copied out of its `Arc` to change
            // its state; what resumes is not copied at all.
            let (state, why) = match stored.state {
                LeaseState::Active => match stale(&stored, now) {
                    None => {
                        active.push(stored);
                        continue;
                    }
                    Some(end) => end,
                },
                // The approval deadline keeps running while the agent is down.
                LeaseState::Pending if stored.approval_deadline.is_some_and(|d| d > now) => {
                    self.park(Arc::unwrap_or_clone(stored));
                    continue;
                }
                LeaseState::Pending => (LeaseState::Expired, "not approved in time".to_string()),
                _ => {
                    if stored.ended_at.is_some_and(|t| t >= cutoff) {
                        ended.push(Arc::unwrap_or_clone(stored));
                    }
                    continue;
                }
            };
            let mut lease = Arc::unwrap_or_clone(stored);
            lease.mark_ended(state, Principal::agent(), &why);
            ended_now.push(lease);
        }
        // A child whose parent did not come back (it expired, say) ends with it.
        let mut orphans = self.activate_all(active);
        orphans.extend(self.end_orphans());
        ended.sort_by_key(|l| l.ended_at);
        {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            for l in ended.into_iter().rev().take(ENDED_KEPT).rev() {
                inner.ended.push_back(l);
            }
        }
        // Ends the store kept aside (on a full disk) may be missing from the audit log: record
        // them now, once more if need be.
        for id in self.durable.store.take_recovered() {
            let Some(lease) = self.get_cached(&id) else {
                continue;
            };
            let why = "its end was kept in the lease store's reserve";
            if self
                .audit_lease("end_recovered", &lease, why)
                .await
                .is_err()
            {
                self.retry_later(lease, true, false);
            }
        }
        for lease in ended_now {
            {
                let mut inner = self.inner.write().expect("lease lock poisoned");
                if inner.ended.len() >= ENDED_KEPT {
                    inner.ended.pop_front();
                }
                inner.ended.push_back(lease.clone());
            }
            self.record_end(&lease).await;
        }
        self.record_ends(&orphans).await;
        tracing::info!(
            event = "leases_restored",
            active = self.active_count(),
            "leases restored from the store"
        );
    }

    /// Forgets ended leases older than `retention`, in memory and in the store.
    pub async fn compact(&self, retention: Duration) {
        let cutoff = SystemTime::now()
            .checked_sub(retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.inner
            .write()
            .expect("lease lock poisoned")
            .ended
            .retain(|l| l.ended_at.is_some_and(|t| t >= cutoff));
        let store = self.durable.store.clone();
        match tokio::task::spawn_blocking(move || store.compact(cutoff)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(
                event = "leases_compacted",
                removed = n,
                "ended leases compacted"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "compacting the lease store failed"),
            Err(e) => tracing::warn!(error = %e, "compacting the lease store failed"),
        }
    }
}

fn audit_principal(p: &Principal) -> event::Principal<'_> {
    event::Principal {
        uid: p.uid,
        gid: p.gid,
        pid: p.pid,
        user: p.user.as_deref(),
        spiffe_id: p.spiffe_id.as_deref(),
    }
}

/// The lease as an audit record shows it.
fn audit_change<'a>(what: &'a str, l: &'a Lease, reason: &'a str) -> event::LeaseChange<'a> {
    let rfc = crate::time::rfc3339;
    event::LeaseChange {
        what,
        lease_id: l.id.as_str(),
        task_id: &l.task_id,
        delegator: &l.delegator,
        agent: &l.agent,
        spiffe_id: l.spiffe_id.to_string(),
        selectors: l.selectors.iter().map(|s| s.as_str()).collect(),
        state: l.state.as_str(),
        created_at: rfc(l.created_at),
        expires_at: rfc(l.expires_at),
        max_expires_at: rfc(l.max_expires_at),
        svid_ttl_ms: l.svid_ttl.as_millis() as u64,
        jwt_ttl_ms: l.jwt_ttl.as_millis() as u64,
        audiences: &l.audiences,
        reason: &l.reason,
        granted_by: audit_principal(&l.granted_by),
        ended_at: l.ended_at.map(rfc),
        ended_by: l.ended_by.as_ref().map(audit_principal),
        approval_deadline: l.approval_deadline.map(rfc),
        approved_at: l.approved_at.map(rfc),
        approved_by: l.approved_by.as_ref().map(audit_principal),
        reason_for_change: reason,
        chain: l.audit_chain(),
        may_delegate: l.may_delegate,
        end_on_violation: l.end_on_violation,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::audit::MemorySink;
    use crate::lease::{LeaseError, LeaseState, LeaseStore, Principal};
    use std::time::Duration;

    #[tokio::test]
    async fn a_store_that_refuses_writes_refuses_the_grant_and_the_renewal() {
        let store = crate::store::MemoryStore::new();
        let r = registry_on(store.clone(), MemorySink::new());
        let mut changes = store.watch();
        let kept = grant(&r, "kept", &["unix:uid:7"], Duration::from_secs(60)).await;
        match changes.try_recv() {
            Ok(crate::lease::StoreChange::Put(l)) => assert_eq!(l.id, kept.id),
            other => panic!("expected the grant in the store's watch, got {other:?}"),
        }
        store.fail_writes(Some("disk full"));
        let refused = r
            .grant_input(
                input("refused", &["unix:uid:8"], Duration::from_secs(60)),
                Principal::agent(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, LeaseError::Unavailable(m) if m.contains("disk full")),
            "{refused:?}"
        );
        assert!(r.matching(&selectors(&["unix:uid:8"])).is_empty());
        let err = r
            .renew(&kept.id, Duration::from_secs(90))
            .await
            .unwrap_err();
        assert!(matches!(err, LeaseError::Unavailable(_)), "{err:?}");
        assert_eq!(r.get(&kept.id).await.unwrap().expires_at, kept.expires_at);
        store.fail_writes(None);
        r.renew(&kept.id, Duration::from_secs(90)).await.unwrap();
    }

    #[tokio::test]
    async fn an_audit_log_that_refuses_records_refuses_the_change_and_stores_nothing() {
        let store = crate::store::MemoryStore::new();
        let audit = MemorySink::new();
        let r = registry_on(store.clone(), audit.clone());
        let kept = grant(&r, "kept", &["unix:uid:7"], Duration::from_secs(60)).await;
        assert_eq!(audit.events(), ["lease_granted"]);
        audit.fail(Some("disk full"));
        let refused = input("refused", &["unix:uid:8"], Duration::from_secs(60));
        let refused = r
            .grant_input(refused, Principal::agent())
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, LeaseError::Unavailable(m) if m.contains("audit log unavailable")),
            "{refused:?}"
        );
        assert!(r.matching(&selectors(&["unix:uid:8"])).is_empty());
        assert_eq!(
            store.load().unwrap().len(),
            1,
            "the refused grant was not stored"
        );
        // An end takes effect even so (identity must go away), and is logged as unrecorded.
        let ended = r
            .end(&kept.id, LeaseState::Revoked, Principal::agent(), "test")
            .await
            .unwrap();
        assert_eq!(ended.state, LeaseState::Revoked);
        assert!(r.matching(&selectors(&["unix:uid:7"])).is_empty());
        audit.fail(None);
        assert_eq!(audit.events(), ["lease_granted"]);
    }
}
