//! How a lease leaves one state for another: held for approval, approved, or ended (in memory at
//! once, then recorded).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::lease::{Lease, LeaseError, LeaseId, LeaseState, Principal};

use super::index::{index_key, Inner};
use super::persist::StoreFailure;
use super::{Leases, ENDED_KEPT};

/// Takes one lease out of the active (or pending) set, marks it ended and keeps it among the
/// recently ended; its own children are left for the caller to end.
pub(super) fn end_one(
    inner: &mut Inner,
    id: &LeaseId,
    state: LeaseState,
    by: Principal,
    reason: &str,
) -> Option<Lease> {
    let mut lease = take_live(inner, id)?;
    lease.mark_ended(state, by, reason);
    keep_ended(inner, lease.clone());
    Some(lease)
}

/// Takes one lease out of the active (or pending) set: from now on it matches nobody, and its
/// SVID cache is torn down (through its `ended` token).
pub(super) fn take_live(inner: &mut Inner, id: &LeaseId) -> Option<Lease> {
    let lease = match inner.active.remove(id) {
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
            if let Some(ended) = slot.ended.get() {
                ended.cancel();
            }
            Arc::unwrap_or_clone(slot.lease)
        }
    };
    if let Some(parent) = lease.parent() {
        if let Some(siblings) = inner.children.get_mut(parent) {
            siblings.remove(id);
            if siblings.is_empty() {
                inner.children.remove(parent);
            }
        }
    }
    Some(lease)
}

/// Keeps a lease that has just ended among the recently ended (the oldest goes when there are
/// too many). A live lease has no ended record yet: one that ended never lives again.
pub(super) fn keep_ended(inner: &mut Inner, lease: Lease) {
    if inner.ended.len() >= ENDED_KEPT {
        inner.ended.pop_front();
    }
    inner.ended.push_back(lease);
}

/// Ends, as `parent_ended`, every live descendant of `first` (which has just ended), breadth
/// first under the caller's lock: no descendant outlives this instant. Returns `first`, then
/// its descendants, parents before their children.
pub(super) fn end_descendants(inner: &mut Inner, first: Lease) -> Vec<Lease> {
    let id = first.id.clone();
    let why = format!(
        "delegated from lease {id}, which ended ({}{}{})",
        first.state,
        if first.end_reason.is_empty() {
            ""
        } else {
            ": "
        },
        first.end_reason
    );
    let mut ended = vec![first];
    let mut next = 0;
    while next < ended.len() {
        let parent = ended[next].id.clone();
        next += 1;
        let Some(children) = inner.children.remove(&parent) else {
            continue;
        };
        let mut children: Vec<LeaseId> = children.into_iter().collect();
        children.sort();
        for child in children {
            if let Some(l) = end_one(
                inner,
                &child,
                LeaseState::ParentEnded,
                Principal::agent(),
                &why,
            ) {
                ended.push(l);
            }
        }
    }
    ended
}

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
        self.place(&mut lease);
        self.persist("pending", &mut lease, &gates.join(", "))
            .await?;
        tracing::info!(
            event = "lease_pending",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            gates = %gates.join(", "),
            "lease held for approval"
        );
        self.park(lease.clone());
        // Its parent may have ended while it was being written: it ends with it.
        let orphans = self.end_orphans();
        self.record_ends(&orphans).await;
        Ok(orphans
            .into_iter()
            .find(|l| l.id == lease.id)
            .unwrap_or(lease))
    }

    /// Ends, as `parent_ended`, every pending lease whose parent is no longer active (a parent
    /// that ended while the child was being held, or while the agent was down).
    pub(super) fn end_orphans(&self) -> Vec<Lease> {
        let mut inner = self.inner.write().expect("lease lock poisoned");
        let orphans: Vec<(LeaseId, LeaseId)> = inner
            .pending
            .values()
            .filter_map(|(l, _)| {
                let p = l.parent()?;
                (!inner.active.contains_key(p)).then(|| (l.id.clone(), p.clone()))
            })
            .collect();
        orphans
            .into_iter()
            .filter_map(|(id, parent)| {
                let why = format!("delegated from lease {parent}, which is no longer active");
                end_one(
                    &mut inner,
                    &id,
                    LeaseState::ParentEnded,
                    Principal::agent(),
                    &why,
                )
            })
            .collect()
    }

    /// Puts a pending lease aside with its approval deadline timer (once: a lease already
    /// held, say one that came back through a shared store's watch, stays as it is).
    pub(super) fn park(&self, lease: Lease) {
        let cancel = CancellationToken::new();
        let deadline = lease.approval_deadline.unwrap_or_else(SystemTime::now);
        {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            if inner.pending.contains_key(&lease.id) || inner.active.contains_key(&lease.id) {
                return;
            }
            if let Some(parent) = lease.parent() {
                inner
                    .children
                    .entry(parent.clone())
                    .or_default()
                    .insert(lease.id.clone());
            }
            inner
                .pending
                .insert(lease.id.clone(), (lease.clone(), cancel.clone()));
        }
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
        let ended = {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            if !inner.pending.contains_key(id) {
                return;
            }
            end_one(
                &mut inner,
                id,
                LeaseState::Expired,
                Principal::agent(),
                "not approved in time",
            )
        };
        if let Some(lease) = ended {
            self.record_end(&lease).await;
        }
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
        if approver.same_party(&lease.granted_by) {
            let who = match &approver.spiffe_id {
                Some(id) => id.clone(),
                None => format!("uid {}", approver.uid),
            };
            return Err(LeaseError::SelfApproval(format!(
                "{who} granted lease {id} and cannot approve it (four eyes)"
            )));
        }
        let now = SystemTime::now();
        let shift = now.duration_since(lease.created_at).unwrap_or_default();
        lease.expires_at = crate::time::floor_secs(lease.expires_at + shift);
        lease.max_expires_at = crate::time::floor_secs(lease.max_expires_at + shift);
        // A delegated lease still ends no later than its parent, however long it waited.
        if let Some(parent) = lease.parent() {
            let Some(parent) = self.get_active(parent) else {
                return Err(LeaseError::Refused(format!(
                    "lease {id} was delegated from lease {parent}, which is no longer active"
                )));
            };
            lease.expires_at = lease.expires_at.min(parent.expires_at);
            lease.max_expires_at = lease.max_expires_at.min(parent.max_expires_at);
        }
        lease.state = LeaseState::Active;
        lease.approved_at = Some(now);
        lease.approved_by = Some(approver);
        self.persist("approved", &mut lease, "").await?;
        let taken = self
            .inner
            .write()
            .expect("lease lock poisoned")
            .pending
            .remove(id);
        let Some((_, timer)) = taken else {
            // On a shared store, this very approval may have come back through the store's
            // watch first, and be active already.
            if let Some(active) = self.get_active(id).filter(|l| l.revision >= lease.revision) {
                return Ok(active);
            }
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
        Ok(self.activate_recorded(lease).await)
    }

    /// Activates a lease that is durable as active: the lease now, or (a delegated lease whose
    /// parent ended meanwhile) the lease as it ended, recorded.
    pub(super) async fn activate_recorded(&self, lease: Lease) -> Lease {
        match self.activate(lease.clone()) {
            None => lease,
            Some(ended) => {
                self.record_end(&ended).await;
                ended
            }
        }
    }

    /// Ends an active (or pending) lease and every lease delegated from it, at any depth: they
    /// stop matching at once, their SVID caches are torn down (through the `ended` tokens) and
    /// every open stream that could match them is woken (through the change signals).
    pub async fn end(
        &self,
        id: &LeaseId,
        state: LeaseState,
        by: Principal,
        reason: &str,
    ) -> Result<Lease, LeaseError> {
        let Some(ended) = self.end_now(id, state, by, reason) else {
            return Err(self.not_active(id).await);
        };
        // The lease and its descendants in one store transaction.
        self.record_ends(&ended).await;
        Ok(ended.into_iter().next().expect("the lease itself"))
    }

    /// The in-memory half of [`Leases::end`]: from here on the lease and its descendants match
    /// nobody. Returns the lease, then its descendants (parents before their children).
    pub(super) fn end_now(
        &self,
        id: &LeaseId,
        state: LeaseState,
        by: Principal,
        reason: &str,
    ) -> Option<Vec<Lease>> {
        let ended = {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            let first = end_one(&mut inner, id, state, by, reason)?;
            end_descendants(&mut inner, first)
        };
        self.wake_for(&ended);
        Some(ended)
    }

    /// Wakes every open stream that could match one of these leases.
    pub(super) fn wake_for(&self, leases: &[Lease]) {
        let mut keys: Vec<_> = leases.iter().map(|l| index_key(&l.selectors)).collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            self.changed(&key);
        }
    }

    /// Logs and persists an end that has already taken effect, and says whether the end is
    /// durable (in the store, so that no restart can undo it). What cannot be recorded now is
    /// retried until it is: see [`Leases::retry_later`].
    pub(super) async fn record_end(&self, lease: &Lease) -> bool {
        self.record_ends(std::slice::from_ref(lease)).await
    }

    /// [`Leases::record_end`] for leases that ended together (a lease and its descendants):
    /// one store transaction for them all, their audit records together.
    pub(super) async fn record_ends(&self, leases: &[Lease]) -> bool {
        if leases.is_empty() {
            return true;
        }
        for lease in leases {
            tracing::info!(
                event = "lease_ended",
                lease_id = %lease.id,
                task_id = %lease.task_id,
                state = %lease.state,
                ended_by_uid = lease.ended_by.as_ref().map(|p| p.uid),
                reason = %lease.end_reason,
                "lease ended"
            );
            self.durable
                .metrics
                .lease_ends
                .get_or_create(&crate::telemetry::StateLabel {
                    state: lease.state.to_string(),
                })
                .inc();
        }
        // The store first: it is what keeps a restart from bringing a lease back.
        let (stored, leases) = match self.store_ends(leases).await {
            Ok(theirs) => {
                // An end another agent made first is theirs to audit; this one only follows.
                let ours: Vec<Lease> = leases
                    .iter()
                    .zip(theirs)
                    .filter_map(|(l, theirs)| theirs.is_none().then(|| l.clone()))
                    .collect();
                (true, ours)
            }
            Err(_) => (false, leases.to_vec()),
        };
        let audited = futures::future::join_all(
            leases
                .iter()
                .map(|l| self.audit_lease(l.state.as_str(), l, &l.end_reason)),
        )
        .await;
        for (lease, audited) in leases.iter().zip(audited) {
            let audited = audited.is_ok();
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
        }
        stored
    }

    /// Writes ends, in one transaction if it can. On a shared store another agent may have
    /// moved some of these leases first: one it ended keeps that end (returned, and kept here
    /// in place of this agent's), one it changed otherwise (a renewal) is ended on top of that
    /// change. Per lease: `None` if this agent's end is what the store holds.
    pub(super) async fn store_ends(
        &self,
        leases: &[Lease],
    ) -> Result<Vec<Option<Lease>>, LeaseError> {
        match self.store_leases(leases).await {
            Ok(()) => return Ok(vec![None; leases.len()]),
            Err(StoreFailure::Unavailable(e)) => return Err(e),
            Err(StoreFailure::Conflict(_)) => {}
        }
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            let mut mine = lease.clone();
            let mut outcome = None;
            for _ in 0..END_ATTEMPTS {
                let now = match self.store_lease(&mine).await {
                    Ok(()) => {
                        outcome = Some(None);
                        break;
                    }
                    Err(StoreFailure::Unavailable(e)) => return Err(e),
                    Err(StoreFailure::Conflict(now)) => now.into_iter().find(|l| l.id == mine.id),
                };
                let Some(now) = now else {
                    // Gone from the store (compacted): nothing there to bring it back.
                    outcome = Some(None);
                    break;
                };
                if matches!(now.state, LeaseState::Active | LeaseState::Pending) {
                    mine.revision = now.revision;
                    continue;
                }
                // Ended already: by this very end (an earlier attempt that did land), or by
                // another agent, whose end stands.
                let same = now.state == mine.state && now.ended_at == mine.ended_at;
                if !same {
                    let theirs = Lease::clone(&now);
                    let mut inner = self.inner.write().expect("lease lock poisoned");
                    replace_ended(&mut inner, theirs.clone());
                    outcome = Some(Some(theirs));
                } else {
                    outcome = Some(None);
                }
                break;
            }
            out.push(outcome.ok_or_else(|| {
                LeaseError::Changed(format!(
                    "lease {} kept changing on other nodes while this agent ended it",
                    lease.id
                ))
            })?);
        }
        Ok(out)
    }
}

/// How many times an end is written again over changes other agents keep making to the lease.
const END_ATTEMPTS: usize = 8;

/// Puts an ended lease among the recently ended, in place of this agent's record of it if it
/// has one.
pub(super) fn replace_ended(inner: &mut Inner, lease: Lease) {
    match inner.ended.iter_mut().rev().find(|l| l.id == lease.id) {
        Some(kept) => *kept = lease,
        None => keep_ended(inner, lease),
    }
}
