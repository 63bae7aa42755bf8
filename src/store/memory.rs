//! A lease store in memory: nothing survives the process. For tests of everything above the
//! store, and as the reference the store contract tests hold every other store to.

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
        }
    }
}

impl MemoryStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
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
        let stored: Vec<Arc<Lease>> = leases.iter().cloned().map(Arc::new).collect();
        let mut map = self.leases.lock().expect("memory store poisoned");
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
}
