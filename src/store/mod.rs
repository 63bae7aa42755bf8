//! Where leases are kept: the embedded redb store under the data dir (`redb`).

pub mod redb;

pub use self::redb::{LeaseStore, StoreError};
