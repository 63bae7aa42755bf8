//! Implementations of the lease-store port (`crate::lease::LeaseStore`): the embedded redb
//! store under the data dir (`redb`), the default; etcd, shared by many nodes (`etcd`); and
//! one in memory for tests (`memory`).

pub mod etcd;
pub mod memory;
mod record;
pub mod redb;
pub mod reserve;

pub use self::etcd::{EtcdError, EtcdSettings, EtcdStore};
pub use self::memory::MemoryStore;
pub use self::redb::{RedbError, RedbStore};

/// The contract every store keeps, checked against each one.
#[cfg(test)]
mod contract {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use crate::lease::{Lease, LeaseState, LeaseStore, Principal, StoreChange};

    fn lease(task: &str, state: LeaseState, ended_at: Option<SystemTime>) -> Lease {
        let limits = crate::lease::test_limits();
        let input = crate::lease::GrantInput {
            task_id: task.into(),
            delegator: "alice".into(),
            agent: "a".into(),
            ttl: Some(Duration::from_secs(60)),
            selectors: vec!["unix:uid:7".into()],
            ..Default::default()
        };
        let mut l =
            crate::lease::validate_grant(input, &limits, SystemTime::now(), Principal::agent())
                .unwrap();
        l.state = state;
        l.ended_at = ended_at;
        l
    }

    fn keeps_the_contract(store: &dyn LeaseStore) {
        let mut watch = store.watch();
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        let active = lease("active", LeaseState::Active, None);
        let old = lease("old", LeaseState::Revoked, Some(long_ago));
        let recent = lease("recent", LeaseState::Expired, Some(SystemTime::now()));
        store.put_all(&[active.clone(), old.clone()]).unwrap();
        store.put(&recent).unwrap();
        let mut ids: Vec<String> = store
            .load()
            .unwrap()
            .iter()
            .map(|l| l.id.to_string())
            .collect();
        ids.sort();
        let mut want = vec![
            active.id.to_string(),
            old.id.to_string(),
            recent.id.to_string(),
        ];
        want.sort();
        assert_eq!(ids, want);
        for expected in [&active, &old, &recent] {
            match watch.try_recv() {
                Ok(StoreChange::Put(l)) => assert_eq!(l.id, expected.id),
                other => panic!("expected a put of {}, got {other:?}", expected.id),
            }
        }
        // A renewal replaces the lease under its ID.
        let mut renewed = active.clone();
        renewed.expires_at += Duration::from_secs(30);
        store.put(&renewed).unwrap();
        let loaded: Vec<Arc<Lease>> = store.load().unwrap();
        let got = loaded.iter().find(|l| l.id == active.id).unwrap();
        assert_eq!(got.expires_at, renewed.expires_at);
        assert!(matches!(watch.try_recv(), Ok(StoreChange::Put(_))));
        // Compaction takes only what ended before the cutoff, never an active lease.
        let cutoff = SystemTime::now() - Duration::from_secs(60);
        assert_eq!(store.compact(cutoff).unwrap(), 1);
        match watch.try_recv() {
            Ok(StoreChange::Removed(id)) => assert_eq!(id, old.id),
            other => panic!("expected the removal of {}, got {other:?}", old.id),
        }
        assert_eq!(store.load().unwrap().len(), 2);
        assert_eq!(
            store
                .compact(SystemTime::now() + Duration::from_secs(1))
                .unwrap(),
            1
        );
        let left = store.load().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, active.id);
    }

    #[test]
    fn the_memory_store_keeps_the_contract() {
        keeps_the_contract(&super::MemoryStore::default());
    }

    #[test]
    fn the_redb_store_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::RedbStore::open(&dir.path().join("leases.redb")).unwrap();
        keeps_the_contract(&store);
    }
}
