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

    /// A lease the registry holds in memory (live, or recently ended), without reading the
    /// store.
    pub fn recent(&self, id: &LeaseId) -> Option<Lease> {
        self.get_cached(id)
    }

    /// The live (active or pending) lease that gives `spiffe_id`, if any.
    pub fn holder_of(&self, spiffe_id: &spiffe::SpiffeId) -> Option<LeaseId> {
        let inner = self.inner.read().expect("lease lock poisoned");
        inner
            .active
            .values()
            .map(|s| &*s.lease)
            .chain(inner.pending.values().map(|(l, _)| l))
            .find(|l| &l.spiffe_id == spiffe_id)
            .map(|l| l.id.clone())
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
        if leases.is_empty() {
            return Vec::new();
        }
        // `what` may quote a caller: printable, and within a reason's bounds.
        let mut reason: String = format!("scope violation: {what}")
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        if reason.len() > crate::lease::MAX_REASON_LEN {
            let mut cut = crate::lease::MAX_REASON_LEN - 3;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
            reason.push_str("...");
        }
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

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::audit::MemorySink;
    use crate::lease::{validate_delegation, DelegateInput, LeaseState, LeaseStore, Principal};
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn child_of(parent: &crate::lease::Lease, task: &str, extra: &str) -> crate::lease::Lease {
        let input = DelegateInput {
            task_id: task.into(),
            agent: "executor".into(),
            ttl: Some(Duration::from_secs(30)),
            selectors: vec![extra.into()],
            audiences: vec!["db".into()],
            ..Default::default()
        };
        validate_delegation(
            parent,
            input,
            &crate::lease::test_limits(),
            SystemTime::now(),
            Principal::agent(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn ending_a_lease_ends_its_descendants_at_once() {
        let store = crate::store::MemoryStore::new();
        let r = registry_on(store.clone(), MemorySink::new());
        let mut root = input("root", &["unix:uid:7"], Duration::from_secs(60));
        root.max_delegation_depth = 2;
        let root = r.grant_input(root, Principal::agent()).await.unwrap();
        let child = r.grant(child_of(&root, "c", "unix:gid:1")).await.unwrap();
        let grandchild = r.grant(child_of(&child, "g", "unix:gid:2")).await.unwrap();
        let sibling = r.grant(child_of(&root, "s", "unix:gid:3")).await.unwrap();
        assert_eq!(r.live_children(&root.id), 2);
        let mut changes = store.watch();
        r.end(&root.id, LeaseState::Revoked, Principal::agent(), "done")
            .await
            .unwrap();
        for l in [&child, &grandchild, &sibling] {
            let got = r.get(&l.id).await.unwrap();
            assert_eq!(got.state, LeaseState::ParentEnded);
            assert!(
                got.end_reason.contains(root.id.as_str()),
                "{}",
                got.end_reason
            );
            assert!(
                got.end_reason.contains("revoked: done"),
                "{}",
                got.end_reason
            );
        }
        assert!(r
            .matching(&selectors(&[
                "unix:uid:7",
                "unix:gid:1",
                "unix:gid:2",
                "unix:gid:3"
            ]))
            .is_empty());
        assert_eq!(r.live_children(&root.id), 0);
        assert!(r.inner.read().unwrap().children.is_empty());
        // All four ends are stored.
        let mut stored = 0;
        while let Ok(crate::lease::StoreChange::Put(l)) = changes.try_recv() {
            assert_ne!(l.state, LeaseState::Active);
            stored += 1;
        }
        assert_eq!(stored, 4);
        assert_eq!(r.children_of(&root.id).len(), 2);
    }

    #[tokio::test]
    async fn a_child_whose_parent_ended_while_the_agent_was_down_ends_at_restore() {
        let store = crate::store::MemoryStore::new();
        let r = registry_on(store.clone(), MemorySink::new());
        let mut root = input("root", &["unix:uid:7"], Duration::from_secs(60));
        root.max_delegation_depth = 2;
        let root = r.grant_input(root, Principal::agent()).await.unwrap();
        let child = r.grant(child_of(&root, "c", "unix:gid:1")).await.unwrap();
        let grandchild = r.grant(child_of(&child, "g", "unix:gid:2")).await.unwrap();
        // As if the agent died after storing the root's end and before its descendants'.
        let mut ended = root.clone();
        ended.mark_ended(LeaseState::Revoked, Principal::agent(), "before the crash");
        store.put(&ended).unwrap();
        let audit = MemorySink::new();
        let again = registry_on(store.clone(), audit.clone());
        again
            .restore(store.load().unwrap(), Duration::from_secs(3600))
            .await;
        for l in [&child, &grandchild] {
            let got = again.get(&l.id).await.unwrap();
            assert_eq!(got.state, LeaseState::ParentEnded, "{got:?}");
        }
        assert!(again
            .matching(&selectors(&["unix:uid:7", "unix:gid:1", "unix:gid:2"]))
            .is_empty());
        let stored: Vec<Arc<crate::lease::Lease>> = store.load().unwrap();
        assert!(stored.iter().all(|l| l.state != LeaseState::Active));
        assert_eq!(audit.events(), ["lease_parent_ended", "lease_parent_ended"]);
    }

    #[tokio::test]
    async fn a_child_granted_as_its_parent_ends_is_ended_not_activated() {
        let r = registry();
        let mut root = input("root", &["unix:uid:7"], Duration::from_secs(60));
        root.max_delegation_depth = 1;
        let root = r.grant_input(root, Principal::agent()).await.unwrap();
        let child = child_of(&root, "c", "unix:gid:1");
        r.end(&root.id, LeaseState::Completed, Principal::agent(), "")
            .await
            .unwrap();
        let got = r.grant(child).await.unwrap();
        assert_eq!(got.state, LeaseState::ParentEnded);
        assert!(r
            .matching(&selectors(&["unix:uid:7", "unix:gid:1"]))
            .is_empty());
    }
}
