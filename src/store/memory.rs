//! A lease store in memory: nothing survives the process. For tests of everything above the
//! store, and as the reference the store contract tests hold every other store to. Made with
//! [`MemoryStore::shared`], it checks revisions as a store shared by many agents does, so
//! that two registries on one of them behave as two nodes on etcd.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::lease::store::WATCH_CAPACITY;
use crate::lease::{Lease, LeaseId, LeaseState, LeaseStore, StoreChange, StoreError, StoreWatch};

pub struct MemoryStore {
    leases: Mutex<HashMap<LeaseId, Arc<Lease>>>,
    changes: broadcast::Sender<StoreChange>,
    /// While set, every write fails (a full disk, an unreachable cluster).
    failing: Mutex<Option<String>>,
    /// Writes compare each lease's revision with the stored one (see [`MemoryStore::shared`]).
    shared: bool,
}

/// What a failing [`MemoryStore`] answers.
#[derive(Debug, thiserror::Error)]
#[error("memory store: {0}")]
pub struct Refused(String);

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            leases: Mutex::new(HashMap::new()),
            changes: broadcast::channel(WATCH_CAPACITY).0,
            failing: Mutex::new(None),
            shared: false,
        }
    }
}

impl MemoryStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A store that takes a write only if every lease in it is at the revision stored, as
    /// the etcd store does for agents sharing it.
    pub fn shared() -> Arc<Self> {
        Arc::new(MemoryStore {
            shared: true,
            ..Self::default()
        })
    }

    /// From now on every write fails with `why` (`None`: writes succeed again).
    pub fn fail_writes(&self, why: Option<&str>) {
        *self.failing.lock().expect("memory store poisoned") = why.map(str::to_owned);
    }

    fn check(&self) -> Result<(), StoreError> {
        match &*self.failing.lock().expect("memory store poisoned") {
            Some(why) => Err(StoreError::new(Refused(why.clone()))),
            None => Ok(()),
        }
    }
}

impl LeaseStore for MemoryStore {
    fn put_all(&self, leases: &[Lease]) -> Result<(), StoreError> {
        self.check()?;
        let mut map = self.leases.lock().expect("memory store poisoned");
        if self.shared {
            let moved: Vec<Arc<Lease>> = leases
                .iter()
                .filter_map(|l| {
                    let now = map.get(&l.id);
                    (now.map_or(0, |n| n.revision) != l.revision).then(|| now.cloned())?
                })
                .collect();
            if !moved.is_empty()
                || leases
                    .iter()
                    .any(|l| l.revision > 0 && !map.contains_key(&l.id))
            {
                return Err(StoreError::Conflict(moved));
            }
        }
        let stored: Vec<Arc<Lease>> = leases
            .iter()
            .map(|l| {
                let mut l = l.clone();
                if self.shared {
                    l.revision += 1;
                }
                Arc::new(l)
            })
            .collect();
        for lease in &stored {
            map.insert(lease.id.clone(), lease.clone());
        }
        drop(map);
        for lease in stored {
            // No watcher is not an error.
            let _ = self.changes.send(StoreChange::Put(lease));
        }
        Ok(())
    }

    fn load(&self) -> Result<Vec<Arc<Lease>>, StoreError> {
        let map = self.leases.lock().expect("memory store poisoned");
        Ok(map.values().cloned().collect())
    }

    fn compact(&self, cutoff: SystemTime) -> Result<usize, StoreError> {
        self.check()?;
        let mut map = self.leases.lock().expect("memory store poisoned");
        let doomed: Vec<LeaseId> = map
            .values()
            .filter(|l| {
                !matches!(l.state, LeaseState::Active | LeaseState::Pending)
                    && l.ended_at.is_some_and(|t| t < cutoff)
            })
            .map(|l| l.id.clone())
            .collect();
        for id in &doomed {
            map.remove(id);
        }
        drop(map);
        for id in &doomed {
            let _ = self.changes.send(StoreChange::Removed(id.clone()));
        }
        Ok(doomed.len())
    }

    fn watch(&self) -> StoreWatch {
        self.changes.subscribe()
    }

    fn shared(&self) -> bool {
        self.shared
    }
}
