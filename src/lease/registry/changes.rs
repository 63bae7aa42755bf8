//! Change fan-out to open streams: each listener is registered under the selectors it holds, so
//! a change to a lease wakes only the streams it could match.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};

use tokio::sync::Notify;

use crate::selector::{Selector, Selectors};

use super::Leases;

/// Open streams listening for changes, by the selectors they hold.
#[derive(Default)]
pub(super) struct Listeners {
    next: u64,
    /// Listener IDs are a counter, not input: ordered maps keep them without hashing, which
    /// matters because every stream registers and unregisters under each of its selectors.
    by_selector: HashMap<Selector, BTreeMap<u64, Arc<Notify>>>,
}

/// Tells one listener (an open stream) that a lease it could match was granted, renewed or
/// ended. Dropping it unregisters.
pub struct Changes {
    registry: Weak<Leases>,
    id: u64,
    selectors: Selectors,
    notify: Arc<Notify>,
}

impl Changes {
    /// Resolves at the next change after the previous call returned (a change in between is
    /// not lost: it resolves at once).
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut listeners = registry.listeners.lock().expect("listeners poisoned");
        for s in &self.selectors {
            if let Some(set) = listeners.by_selector.get_mut(s.as_str()) {
                set.remove(&self.id);
                if set.is_empty() {
                    listeners.by_selector.remove(s.as_str());
                }
            }
        }
    }
}

impl Leases {
    /// Change signals for a caller holding `selectors`: a grant, renewal or end of any lease
    /// that could match such a caller (exactly those indexed under one of its selectors).
    pub fn changes(&self, selectors: &Selectors) -> Changes {
        let notify = Arc::new(Notify::new());
        let mut listeners = self.listeners.lock().expect("listeners poisoned");
        listeners.next += 1;
        let id = listeners.next;
        let selectors = selectors.clone();
        for s in &selectors {
            listeners
                .by_selector
                .entry(s.clone())
                .or_default()
                .insert(id, notify.clone());
        }
        Changes {
            registry: self.me.clone(),
            id,
            selectors,
            notify,
        }
    }

    /// Wakes every listener (each one once, however many selectors it holds).
    pub(super) fn wake_all(&self) {
        let listeners = self.listeners.lock().expect("listeners poisoned");
        let mut woken = std::collections::HashSet::new();
        for set in listeners.by_selector.values() {
            for (id, notify) in set {
                if woken.insert(*id) {
                    notify.notify_one();
                }
            }
        }
    }

    /// Wakes the listeners a change to a lease indexed under `key` concerns.
    pub(super) fn changed(&self, key: &Selector) {
        let listeners = self.listeners.lock().expect("listeners poisoned");
        if let Some(set) = listeners.by_selector.get(key) {
            for notify in set.values() {
                notify.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::lease::{LeaseError, LeaseState, Principal};
    use std::time::Duration;

    #[tokio::test]
    async fn end_stops_matching_and_signals() {
        let r = registry();
        let caller = selectors(&["unix:uid:7", "unix:gid:7"]);
        let mine = r.changes(&caller);
        let other = r.changes(&selectors(&["unix:uid:8"]));
        let l = grant(&r, "a", &["unix:uid:7"], Duration::from_secs(60)).await;
        let granted = tokio::time::timeout(Duration::from_secs(5), mine.changed()).await;
        assert!(granted.is_ok(), "a grant that could match wakes the caller");
        let m = r.matching(&caller);
        r.end(&l.id, LeaseState::Revoked, Principal::agent(), "test")
            .await
            .unwrap();
        assert!(m[0].ended.is_cancelled());
        let ended = tokio::time::timeout(Duration::from_secs(5), mine.changed()).await;
        assert!(ended.is_ok(), "the end wakes the caller");
        let woken = tokio::time::timeout(Duration::from_millis(50), other.changed()).await;
        assert!(
            woken.is_err(),
            "a caller the lease could never match is not woken"
        );
        drop(mine);
        assert!(!r
            .listeners
            .lock()
            .unwrap()
            .by_selector
            .contains_key("unix:gid:7"));
        assert!(r.matching(&selectors(&["unix:uid:7"])).is_empty());
        assert_eq!(r.get(&l.id).await.unwrap().state, LeaseState::Revoked);
        assert!(matches!(
            r.end(&l.id, LeaseState::Completed, Principal::agent(), "")
                .await,
            Err(LeaseError::NotActive { .. })
        ));
        assert_eq!(r.list(false).await.unwrap().len(), 0);
        assert_eq!(r.list(true).await.unwrap().len(), 1);
    }
}
