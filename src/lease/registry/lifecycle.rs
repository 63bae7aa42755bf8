//! How a lease leaves one state for another: held for approval, approved, or ended (in memory at
//! once, then recorded).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::lease::{Lease, LeaseError, LeaseId, LeaseState, Principal};

use super::index::index_key;
use super::{Leases, ENDED_KEPT};

impl Leases {
    /// Holds a prepared lease as `pending` until someone approves it, or until
    /// `approval_timeout` passes, when it ends as `expired`. `gates` name the policies that
    /// required approval.
    pub async fn hold(
        &self,
        mut lease: Lease,
        approval_timeout: Duration,
        gates: &[String],
    ) -> Result<Lease, LeaseError> {
        lease.state = LeaseState::Pending;
        lease.approval_deadline = Some(SystemTime::now() + approval_timeout);
        self.persist("pending", &lease, &gates.join(", ")).await?;
        tracing::info!(
            event = "lease_pending",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            gates = %gates.join(", "),
            "lease held for approval"
        );
        self.park(lease.clone());
        Ok(lease)
    }

    /// Puts a pending lease aside with its approval deadline timer.
    pub(super) fn park(&self, lease: Lease) {
        let cancel = CancellationToken::new();
        let deadline = lease.approval_deadline.unwrap_or_else(SystemTime::now);
        self.inner
            .write()
            .expect("lease lock poisoned")
            .pending
            .insert(lease.id.clone(), (lease.clone(), cancel.clone()));
        let me = self.me.clone();
        let id = lease.id;
        self.spawn(async move {
            let wait = deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(wait) => {
                    if let Some(r) = me.upgrade() {
                        r.expire_pending(&id).await;
                    }
                }
            }
        });
    }

    async fn expire_pending(&self, id: &LeaseId) {
        let taken = self
            .inner
            .write()
            .expect("lease lock poisoned")
            .pending
            .remove(id);
        if let Some((mut lease, _)) = taken {
            lease.mark_ended(
                LeaseState::Expired,
                Principal::agent(),
                "not approved in time",
            );
            self.remember_ended(lease.clone());
            self.record_end(&lease).await;
        }
    }

    fn remember_ended(&self, lease: Lease) {
        let mut inner = self.inner.write().expect("lease lock poisoned");
        if inner.ended.len() >= ENDED_KEPT {
            inner.ended.pop_front();
        }
        inner.ended.push_back(lease);
    }

    /// Approves a pending lease: four eyes (the approver is not the grantor), then it becomes
    /// active with its TTLs counted from now.
    pub async fn approve(&self, id: &LeaseId, approver: Principal) -> Result<Lease, LeaseError> {
        let pending = {
            let inner = self.inner.read().expect("lease lock poisoned");
            inner.pending.get(id).map(|(l, _)| l.clone())
        };
        let Some(mut lease) = pending else {
            return Err(self.not_active(id).await);
        };
        if approver.uid == lease.granted_by.uid {
            return Err(LeaseError::SelfApproval(format!(
                "uid {} granted lease {id} and cannot approve it (four eyes)",
                approver.uid
            )));
        }
        let now = SystemTime::now();
        let shift = now.duration_since(lease.created_at).unwrap_or_default();
        lease.expires_at = crate::time::floor_secs(lease.expires_at + shift);
        lease.max_expires_at = crate::time::floor_secs(lease.max_expires_at + shift);
        lease.state = LeaseState::Active;
        lease.approved_at = Some(now);
        lease.approved_by = Some(approver);
        self.persist("approved", &lease, "").await?;
        let taken = self
            .inner
            .write()
            .expect("lease lock poisoned")
            .pending
            .remove(id);
        let Some((_, timer)) = taken else {
            // Expired (or approved by someone else) while this approval was being written.
            return Err(self.not_active(id).await);
        };
        timer.cancel();
        tracing::info!(
            event = "lease_approved",
            lease_id = %lease.id,
            approver_uid = lease.approved_by.as_ref().map(|p| p.uid),
            "lease approved"
        );
        self.activate(lease.clone());
        Ok(lease)
    }

    /// Ends an active (or pending) lease: it stops matching at once, its SVID cache is torn down
    /// (through the `ended` token) and every open stream that could match it is woken (through
    /// the change signals).
    pub async fn end(
        &self,
        id: &LeaseId,
        state: LeaseState,
        by: Principal,
        reason: &str,
    ) -> Result<Lease, LeaseError> {
        let Some(lease) = self.end_now(id, state, by, reason) else {
            return Err(self.not_active(id).await);
        };
        self.record_end(&lease).await;
        Ok(lease)
    }

    /// The in-memory half of [`Leases::end`]: from here on the lease matches nobody.
    pub(super) fn end_now(
        &self,
        id: &LeaseId,
        state: LeaseState,
        by: Principal,
        reason: &str,
    ) -> Option<Lease> {
        let lease = {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            let inner = &mut *inner;
            let mut lease = match inner.active.remove(id) {
                // A pending lease can be ended too (revoked before anyone approved it).
                None => {
                    let (lease, timer) = inner.pending.remove(id)?;
                    timer.cancel();
                    lease
                }
                Some(slot) => {
                    // A lease's selectors never change, nor does its index key.
                    let key = index_key(&slot.lease.selectors);
                    if let Some(bucket) = inner.index.get_mut(&key) {
                        bucket.remove(id);
                        if bucket.is_empty() {
                            inner.index.remove(&key);
                        }
                    }
                    inner.deadlines.remove(&(slot.deadline, id.clone()));
                    slot.ended.cancel();
                    Arc::unwrap_or_clone(slot.lease)
                }
            };
            lease.mark_ended(state, by, reason);
            if inner.ended.len() >= ENDED_KEPT {
                inner.ended.pop_front();
            }
            inner.ended.push_back(lease.clone());
            lease
        };
        self.changed(&index_key(&lease.selectors));
        Some(lease)
    }

    /// Logs and persists an end that has already taken effect, and says whether the end is
    /// durable (in the store, so that no restart can undo it). What cannot be recorded now is
    /// retried until it is: see [`Leases::retry_later`].
    pub(super) async fn record_end(&self, lease: &Lease) -> bool {
        let reason = lease.end_reason.as_str();
        tracing::info!(
            event = "lease_ended",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            state = %lease.state,
            ended_by_uid = lease.ended_by.as_ref().map(|p| p.uid),
            reason,
            "lease ended"
        );
        self.durable
            .metrics
            .lease_ends
            .get_or_create(&crate::telemetry::StateLabel {
                state: lease.state.to_string(),
            })
            .inc();
        // The store first: it is what keeps a restart from bringing the lease back.
        let stored = self.store_lease(lease).await.is_ok();
        let audited = self
            .audit_lease(lease.state.as_str(), lease, reason)
            .await
            .is_ok();
        if !(stored && audited) {
            tracing::error!(
                event = "lease_end_not_recorded",
                lease_id = %lease.id,
                stored,
                audited,
                "lease ended but its end is not yet recorded; retrying until it is"
            );
            self.retry_later(lease.clone(), stored, audited);
        }
        stored
    }
}
