//! The lease-store port: where the registry makes leases durable, where it reads them back at
//! start-up, and (for a store shared by many nodes) how it hears of changes made elsewhere.
//! The embedded redb store (`crate::store::redb`) and the etcd store (`crate::store::etcd`)
//! implement it; `crate::store::memory` serves tests.
//!
//! Calls block until the change is durable, so the registry makes them on the blocking pool.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

use super::{Lease, LeaseId};

/// What a store tells its watchers, after the change is durable.
#[derive(Clone, Debug)]
pub enum StoreChange {
    /// The lease was written (granted, renewed, approved or ended).
    Put(Arc<Lease>),
    /// The lease was deleted (by compaction, once it had ended; or by hand).
    Removed(LeaseId),
    /// The lease was written in a form this agent cannot read (a newer agent's record
    /// format, or damage): it may have ended, so it is not to be served.
    Unreadable(LeaseId),
    /// Every lease the store could read, as of one moment, after the watch lost its place (it
    /// reconnected, or the store compacted the history it would resume from). A lease the
    /// watcher holds that is not among them may have been deleted, written unreadably, or
    /// written since: [`LeaseStore::read`] tells which.
    Reloaded(Arc<Vec<Arc<Lease>>>),
}

/// One lease as the store holds it now.
#[derive(Clone, Debug)]
pub enum Stored {
    Absent,
    Present(Arc<Lease>),
    /// Present, in a form this agent cannot read.
    Unreadable,
}

/// Changes committed to a store from the moment of [`LeaseStore::watch`] on. A watcher that
/// falls too far behind gets `RecvError::Lagged`: it has missed changes and must `load` again.
pub type StoreWatch = broadcast::Receiver<StoreChange>;

/// How many changes a watcher may fall behind before it must re-read the store.
pub const WATCH_CAPACITY: usize = 1024;

/// A store failure, with the store's own description of what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
    /// Nothing was written: another agent sharing the store changed these leases since this
    /// one read them (their `revision` moved on). They are here as the store holds them now.
    #[error("{} changed on another node since this agent read {}", conflict_names(.0), if .0.len() == 1 { "it" } else { "them" })]
    Conflict(Vec<Arc<Lease>>),
}

fn conflict_names(leases: &[Arc<Lease>]) -> String {
    let ids: Vec<String> = leases.iter().map(|l| format!("lease {}", l.id)).collect();
    ids.join(", ")
}

impl StoreError {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Failed(Box::new(e))
    }

    /// The store's own error, for callers that know which store they hold.
    pub fn source_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match self {
            StoreError::Failed(e) => &**e,
            conflict => conflict,
        }
    }
}

/// How well this agent hears its store. An embedded store is always both; a shared store
/// whose view here has not been known current for its `max_staleness` is stale: this agent
/// may have missed a revocation, so it issues nothing until it is current again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreHealth {
    /// The last request (or watch message) got an answer.
    pub reachable: bool,
    /// This agent's view of the store has not been known current for longer than the
    /// store's `max_staleness`.
    pub stale: bool,
}

impl StoreHealth {
    pub const FINE: StoreHealth = StoreHealth {
        reachable: true,
        stale: false,
    };
}

/// Where leases live. Every method blocks until done; writes are durable when they return.
pub trait LeaseStore: Send + Sync + 'static {
    /// Inserts or replaces these leases (by ID), all or none.
    fn put_all(&self, leases: &[Lease]) -> Result<(), StoreError>;

    /// Inserts or replaces one lease.
    fn put(&self, lease: &Lease) -> Result<(), StoreError> {
        self.put_all(std::slice::from_ref(lease))
    }

    /// Every stored lease, active and ended, in no particular order. An end that `put`
    /// acknowledged is never lost: such a lease loads as ended, across any restart.
    fn load(&self) -> Result<Vec<Arc<Lease>>, StoreError>;

    /// Leases the last `load` found live in the store's main records but ended by an end the
    /// store kept elsewhere (the redb store's reserve, on a full disk): their end may be
    /// missing from the audit log.
    fn take_recovered(&self) -> Vec<LeaseId> {
        Vec::new()
    }

    /// Deletes ended leases that ended before `cutoff`; returns how many went. Never an
    /// active or pending lease.
    fn compact(&self, cutoff: SystemTime) -> Result<usize, StoreError>;

    /// `lease` (found by its ID, and its node where the store keeps nodes apart) as the store
    /// holds it now. Stores that can look one lease up override this full read.
    fn read(&self, lease: &Lease) -> Result<Stored, StoreError> {
        Ok(self
            .load()?
            .into_iter()
            .find(|l| l.id == lease.id)
            .map_or(Stored::Absent, Stored::Present))
    }

    /// Changes committed from now on, by this agent or (for a shared store) any other.
    fn watch(&self) -> StoreWatch;

    /// Whether this agent hears its store, now and as it changes.
    fn health(&self) -> tokio::sync::watch::Receiver<StoreHealth> {
        // The sender goes at once: a receiver whose health never changes.
        tokio::sync::watch::channel(StoreHealth::FINE).1
    }

    /// Whether other agents share this store (and their changes arrive through `watch`).
    fn shared(&self) -> bool {
        false
    }
}
