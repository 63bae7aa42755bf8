//! The lease-store port: where the registry makes leases durable, and where it reads them back
//! at start-up. The embedded redb store (`crate::store::redb`) implements it; a store shared by
//! many nodes will too, and `crate::store::memory` serves tests.
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
    /// The lease was deleted by compaction.
    Removed(LeaseId),
}

/// Changes committed to a store from the moment of [`LeaseStore::watch`] on. A watcher that
/// falls too far behind gets `RecvError::Lagged`: it has missed changes and must `load` again.
pub type StoreWatch = broadcast::Receiver<StoreChange>;

/// How many changes a watcher may fall behind before it must re-read the store.
pub const WATCH_CAPACITY: usize = 1024;

/// A store failure, with the store's own description of what went wrong.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StoreError(Box<dyn std::error::Error + Send + Sync>);

impl StoreError {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError(Box::new(e))
    }

    /// The store's own error, for callers that know which store they hold.
    pub fn source_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
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

    /// Changes committed from now on, by this agent or (for a shared store) any other.
    fn watch(&self) -> StoreWatch;
}
