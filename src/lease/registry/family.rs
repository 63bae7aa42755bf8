//! Delegation in the registry: who a lease's children are, and the leases a scope violation
//! ends.

use crate::lease::{Lease, LeaseId, LeaseState, Principal};
use crate::selector::Selectors;

use super::Leases;

impl Leases {
    /// How many live (active or pending) children `id` has.
    pub fn live_children(&self, id: &LeaseId) -> usize {
        let inner = self.inner.read().expect("lease lock poisoned");
        inner.children.get(id).map_or(0, |c| c.len())
    }

    /// The leases delegated from `id`, live and recently ended, oldest first.
    pub fn children_of(&self, id: &LeaseId) -> Vec<Lease> {
        let inner = self.inner.read().expect("lease lock poisoned");
        let mut out: Vec<Lease> = inner
            .children
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|c| {
                inner
                    .active
                    .get(c)
                    .map(|s| Lease::clone(&s.lease))
                    .or_else(|| inner.pending.get(c).map(|(l, _)| l.clone()))
            })
            .chain(
                inner
                    .ended
                    .iter()
                    .filter(|l| l.parent() == Some(id))
                    .cloned(),
            )
            .collect();
        drop(inner);
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        out
    }

    /// A scope violation by a caller with these selectors: every lease it holds that ends on
    /// a violation is revoked now (its descendants with it), with `what` in the reason.
    /// Returns the leases ended.
    pub async fn violated(&self, caller: &Selectors, what: &str) -> Vec<LeaseId> {
        let strict: Vec<LeaseId> = self
            .matching(caller)
            .into_iter()
            .filter(|l| l.lease.end_on_violation)
            .map(|l| l.lease.id.clone())
            .collect();
        self.end_for_violation(strict, what).await
    }

    /// Revokes `leases` (those that end on a violation) for a scope violation.
    pub async fn end_for_violation(&self, leases: Vec<LeaseId>, what: &str) -> Vec<LeaseId> {
        let reason = format!("scope violation: {what}");
        let mut ended = Vec::new();
        for id in leases {
            tracing::warn!(event = "scope_violation", lease_id = %id, what, "scope violation: ending the lease");
            if self
                .end(&id, LeaseState::Revoked, Principal::agent(), &reason)
                .await
                .is_ok()
            {
                ended.push(id);
            }
        }
        ended
    }
}
