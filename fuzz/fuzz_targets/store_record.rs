//! Stored lease records as the redb store decodes them (`RedbStore::decode`: format 1 JSON,
//! formats 2 to 5 postcard), for the key of the frozen records in the store's tests. Never a
//! panic; a record that decodes is written back (format 5) to bytes that decode to a lease
//! written the same way again.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mayfly::fuzzing::{store_decode, store_encode};
use mayfly::store::RedbStore;

const KEY: &str = "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c";

fn store() -> &'static RedbStore {
    static STORE: OnceLock<RedbStore> = OnceLock::new();
    STORE.get_or_init(|| {
        let base = ["/dev/shm", "/tmp"]
            .into_iter()
            .map(PathBuf::from)
            .find(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("mayfly-fuzz-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        RedbStore::open(&dir.join("leases.redb")).expect("a store")
    })
}

fuzz_target!(|data: &[u8]| {
    let store = store();
    let Ok(lease) = store_decode(store, KEY, data) else {
        return;
    };
    let bytes = store_encode(store, &lease).expect("a decoded lease encodes");
    let again = store_decode(store, KEY, &bytes).expect("what the store writes, it reads");
    assert_eq!(store_encode(store, &again).unwrap(), bytes);
    assert_eq!(lease.id.as_str(), KEY);
});
