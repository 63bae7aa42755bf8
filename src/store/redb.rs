//! Durable lease state: a small redb database under the agent's data dir.
//!
//! Leases must survive restarts and `kill -9`: the registry writes every grant, renewal and end
//! here, and the write is committed to disk, before the change is acknowledged. At start-up the
//! registry reloads every lease from here.
//!
//! One table, `leases`, maps the lease ID to a `LeaseRecord`. The record is a private,
//! versioned copy of [`Lease`] so that the in-memory model can change without silently changing
//! what is on disk: a record this version does not understand is refused, never guessed at.
//!
//! Format 4 (written now) is the record in postcard, a compact binary serde format, whose
//! first field is the version (varint 4, so the first byte is `0x04`). Format 3 is the same
//! without the last field, the delegation (chain, depth, end on violation); format 2 is format
//! 3 without its last field, the end reason. Format 1 is the record as a JSON object (first
//! byte `{`). All are still read, and a lease is rewritten in format 4 at its next change. Postcard
//! is about 2.5 times smaller than JSON, which makes start-up with many leases faster three
//! ways: less to integrity-check, less to read, and cheaper decoding.

use std::collections::HashMap;
use std::fs::{OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use tokio::sync::broadcast;

use super::reserve::{EndReserve, ReservedEnd};
use crate::lease::store::WATCH_CAPACITY;
use crate::lease::{
    Lease, LeaseId, LeaseState, LeaseStore, Principal, StoreChange, StoreError, StoreWatch,
};

/// Lease ID → encoded `LeaseRecord`.
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");

/// redb caches pages up to this size; its default (1 GiB) is far beyond what lease records need,
/// and the agent should stay small on the node. Leases are read from the store only at start-up
/// and for `task list --all`: 1 MiB costs no grant throughput (16 MiB held ~9 MiB more RSS with
/// 10 000 leases).
const CACHE_SIZE: usize = 1024 * 1024;

/// Threads that decode leases at start-up, at most.
const LOAD_THREADS: usize = 4;

/// Fewer leases than this per thread are not worth a thread.
const LOAD_CHUNK_MIN: usize = 1000;

/// Splits the key space (lease IDs: lowercase hex, uniformly random) into `n` contiguous
/// ranges covering every string, including keys that are not lease IDs at all (those are
/// reported by `decode`).
fn key_ranges(n: usize) -> Vec<(Option<String>, Option<String>)> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bounds: Vec<String> = (1..n)
        .map(|i| (HEX[i * 16 / n] as char).to_string())
        .collect();
    (0..n)
        .map(|i| {
            let from = i.checked_sub(1).map(|j| bounds[j].clone());
            (from, bounds.get(i).cloned())
        })
        .collect()
}

/// The lease database. Every write is one redb transaction committed with
/// [`redb::Durability::Immediate`] (the default), so it is on disk when the call returns.
#[derive(Debug)]
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    /// Told of every committed change (a local store has no other writer).
    changes: broadcast::Sender<StoreChange>,
    reserve: Mutex<Reserve>,
}

/// Ends held in the reserve file because the database could not take them.
#[derive(Debug)]
struct Reserve {
    file: EndReserve,
    /// What the file held at open, applied by the next `load`.
    found: Vec<ReservedEnd>,
    /// The whole ended lease for each end written since, to move into the database.
    waiting: HashMap<LeaseId, Lease>,
    /// Leases that `load` ended from the reserve, for [`LeaseStore::take_recovered`].
    recovered: Vec<LeaseId>,
}

#[derive(Debug, thiserror::Error)]
pub enum RedbError {
    #[error("lease store {path}: cannot {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file exists but is not a usable redb database (corrupt, truncated, not redb at all,
    /// or already opened by another process).
    #[error("lease store {path}: cannot open the database: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    #[error("lease store {path}: {op} failed: {source}")]
    Db {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error(
        "lease store {path}: cannot keep the end of lease {key} ({db}), nor in {reserve}: {source}"
    )]
    Reserve {
        path: PathBuf,
        key: String,
        db: Box<RedbError>,
        reserve: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lease store {path}: cannot encode lease {key}: {reason}")]
    Encode {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("lease store {path}: record {key:?} cannot be decoded: {reason}")]
    Decode {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

impl RedbStore {
    /// Opens the database at `path` (e.g. `<data_dir>/leases.redb`), creating it if missing,
    /// and its end reserve beside it (`leases.ends`, see [`super::reserve`]).
    ///
    /// The file is created mode 0600, and tightened to 0600 if an existing one is more open: it
    /// holds who may hold which identity. The whole file is integrity-checked on open, so a
    /// corrupt file is an error naming the path rather than a panic later.
    pub fn open(path: &Path) -> Result<RedbStore, RedbError> {
        let io_err = |op: &'static str| {
            move |source: io::Error| RedbError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        // redb has no option for the file mode, so we create the file ourselves; the mode only
        // applies on creation, hence the check below for a file that already existed.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_err("open the file"))?;
        let meta = file.metadata().map_err(io_err("stat the file"))?;
        if !meta.is_file() {
            return Err(io_err("use the path")(io::Error::other(
                "not a regular file",
            )));
        }
        if meta.permissions().mode() & 0o7777 != 0o600 {
            file.set_permissions(Permissions::from_mode(0o600))
                .map_err(io_err("set the file mode to 0600"))?;
        }
        let open_err = |source| RedbError::Open {
            path: path.to_owned(),
            source: Box::new(source),
        };
        let backend = redb::backends::FileBackend::new(file).map_err(open_err)?;
        // Without the integrity check redb trusts a cleanly closed file and may panic on one
        // altered outside redb. The check reads the whole file, which is small here.
        let db = Database::builder()
            .set_cache_size(CACHE_SIZE)
            .set_check_integrity_on_open(true)
            .create_with_backend(backend)
            .map_err(open_err)?;
        let reserve_path = path.with_extension("ends");
        let (file, found) = EndReserve::open(&reserve_path).map_err(|source| RedbError::Io {
            op: "open the end reserve",
            path: reserve_path,
            source,
        })?;
        let store = RedbStore {
            db,
            path: path.to_owned(),
            changes: broadcast::channel(WATCH_CAPACITY).0,
            reserve: Mutex::new(Reserve {
                file,
                found,
                waiting: HashMap::new(),
                recovered: Vec::new(),
            }),
        };
        // Create the table up front so that readers never meet a missing table.
        let txn = store
            .db
            .begin_write()
            .map_err(store.db_err("begin write transaction"))?;
        txn.open_table(LEASES)
            .map_err(store.db_err("create the leases table"))?;
        txn.commit().map_err(store.db_err("commit"))?;
        Ok(store)
    }

    /// Inserts or replaces the lease with this ID; durable when it returns.
    pub fn put(&self, lease: &Lease) -> Result<(), RedbError> {
        self.put_all(std::slice::from_ref(lease))
    }

    /// Inserts or replaces several leases in one transaction: all or none are stored, with one
    /// disk sync instead of one per lease.
    ///
    /// Ends are never lost to a database that cannot commit (a full disk): when every lease
    /// written has ended, they go to the end reserve instead, and move into the database with
    /// the next commit that succeeds.
    pub fn put_all(&self, leases: &[Lease]) -> Result<(), RedbError> {
        match self.commit(leases) {
            Ok(()) => self.drain_reserve(),
            Err(e) if !leases.is_empty() && leases.iter().all(is_ended) => {
                self.reserve_ends(leases, e)?
            }
            Err(e) => return Err(e),
        }
        if self.changes.receiver_count() > 0 {
            for lease in leases {
                let _ = self.changes.send(StoreChange::Put(Arc::new(lease.clone())));
            }
        }
        Ok(())
    }

    /// Writes ends the database refused (`db`) into the reserve.
    fn reserve_ends(&self, leases: &[Lease], db: RedbError) -> Result<(), RedbError> {
        let mut reserve = self.reserve.lock().expect("end reserve poisoned");
        for lease in leases {
            let end = reserved(lease).expect("only ended leases are reserved");
            if let Err(source) = reserve.file.put(&end) {
                return Err(RedbError::Reserve {
                    path: self.path.clone(),
                    key: lease.id.to_string(),
                    db: Box::new(db),
                    reserve: reserve.file.path().to_owned(),
                    source,
                });
            }
            reserve.waiting.insert(lease.id.clone(), lease.clone());
        }
        tracing::warn!(
            event = "lease_end_reserved",
            store = %self.path.display(),
            error = %db,
            held = reserve.waiting.len(),
            "the lease store cannot commit; ends are kept in its reserve until it can"
        );
        Ok(())
    }

    /// Moves ends waiting in the reserve into the database; they stay in the reserve (and
    /// durable) if it still cannot take them.
    fn drain_reserve(&self) {
        let mut reserve = self.reserve.lock().expect("end reserve poisoned");
        if reserve.waiting.is_empty() {
            return;
        }
        let waiting: Vec<Lease> = reserve.waiting.values().cloned().collect();
        if self.commit(&waiting).is_err() {
            return;
        }
        for lease in &waiting {
            reserve.waiting.remove(&lease.id);
            if let Err(e) = reserve.file.clear(&lease.id) {
                tracing::warn!(error = %e, "cannot clear a slot of the end reserve");
            }
        }
        tracing::info!(
            event = "lease_end_reserve_drained",
            moved = waiting.len(),
            "ends kept in the reserve are in the lease store now"
        );
    }

    /// One transaction writing `leases`.
    fn commit(&self, leases: &[Lease]) -> Result<(), RedbError> {
        // Encode first so an encoding error never leaves a transaction to abort.
        let encoded = leases
            .iter()
            .map(|l| Ok((l.id.as_str(), self.encode(l)?)))
            .collect::<Result<Vec<_>, RedbError>>()?;
        let txn = self
            .db
            .begin_write()
            .map_err(self.db_err("begin write transaction"))?;
        {
            let mut table = txn
                .open_table(LEASES)
                .map_err(self.db_err("open the leases table"))?;
            for (key, bytes) in &encoded {
                table
                    .insert(*key, bytes.as_slice())
                    .map_err(self.db_err("insert a lease"))?;
            }
        }
        txn.commit().map_err(self.db_err("commit"))
    }

    /// Every stored lease, active and ended, in no particular order.
    ///
    /// Decoding (the record, then the lease ID and SPIFFE ID checks) is most of a start-up with many
    /// leases, so the key space is split into ranges decoded on up to [`LOAD_THREADS`] threads.
    /// Each lease is decoded straight into its `Arc`: the registry keeps it there, and a lease
    /// is ~500 bytes that would otherwise be copied from vector to vector at start-up.
    pub fn load(&self) -> Result<Vec<Arc<Lease>>, RedbError> {
        let txn = self
            .db
            .begin_read()
            .map_err(self.db_err("begin read transaction"))?;
        let table = txn
            .open_table(LEASES)
            .map_err(self.db_err("open the leases table"))?;
        let count = table.len().map_err(self.db_err("count leases"))? as usize;
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(LOAD_THREADS)
            .min(count.div_ceil(LOAD_CHUNK_MIN))
            .max(1);
        let ranges = key_ranges(threads);
        let parts: Vec<Result<Vec<Arc<Lease>>, RedbError>> = std::thread::scope(|scope| {
            let table = &table;
            let handles: Vec<_> = ranges
                .iter()
                .map(|(from, to)| {
                    scope.spawn(move || {
                        let mut out = Vec::new();
                        let entries = match (from.as_deref(), to.as_deref()) {
                            (None, None) => table.iter(),
                            (None, Some(to)) => table.range(..to),
                            (Some(from), None) => table.range(from..),
                            (Some(from), Some(to)) => table.range(from..to),
                        }
                        .map_err(self.db_err("read leases"))?;
                        for entry in entries {
                            let (key, value) = entry.map_err(self.db_err("read a lease"))?;
                            out.push(Arc::new(self.decode(key.value(), value.value())?));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("lease decoding thread panicked"))
                .collect()
        });
        let mut leases = Vec::with_capacity(count);
        for part in parts {
            leases.extend(part?);
        }
        self.apply_reserve(&mut leases);
        Ok(leases)
    }

    /// Ends what the reserve says has ended, whatever the database says, then tries to move
    /// those ends into the database.
    fn apply_reserve(&self, leases: &mut [Arc<Lease>]) {
        let mut reserve = self.reserve.lock().expect("end reserve poisoned");
        if reserve.found.is_empty() && reserve.waiting.is_empty() {
            return;
        }
        let mut found: HashMap<LeaseId, ReservedEnd> = std::mem::take(&mut reserve.found)
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect();
        for lease in leases.iter_mut() {
            if let Some(waiting) = reserve.waiting.get(&lease.id) {
                // Ended in this run, while the database could not take it.
                *lease = Arc::new(waiting.clone());
                continue;
            }
            let Some(end) = found.remove(&lease.id) else {
                continue;
            };
            if is_ended(lease) {
                // The database holds the end too: the slot is left over from before.
                if let Err(e) = reserve.file.clear(&lease.id) {
                    tracing::warn!(error = %e, "cannot clear a slot of the end reserve");
                }
                continue;
            }
            let lease = Arc::make_mut(lease);
            lease.state = end.state;
            lease.ended_at = Some(end.ended_at);
            lease.ended_by = Some(end.ended_by);
            lease.end_reason = end.end_reason;
            tracing::warn!(
                event = "lease_end_recovered",
                lease_id = %lease.id,
                state = %lease.state,
                "the lease store held this lease as live; its end was in the reserve"
            );
            reserve.recovered.push(lease.id.clone());
            reserve.waiting.insert(lease.id.clone(), lease.clone());
        }
        // A reserved end of a lease the database does not hold is left alone, never guessed at.
        drop(reserve);
        self.drain_reserve();
    }

    /// Deletes ended leases whose `ended_at` is before `cutoff` and returns how many went.
    /// Active leases are never deleted, whatever their times say.
    pub fn compact(&self, cutoff: SystemTime) -> Result<usize, RedbError> {
        let txn = self
            .db
            .begin_write()
            .map_err(self.db_err("begin write transaction"))?;
        let removed;
        {
            let mut table = txn
                .open_table(LEASES)
                .map_err(self.db_err("open the leases table"))?;
            // Decode every record (not just peek at two fields): an unreadable record is an
            // error here as in load(), rather than something compaction silently keeps or drops.
            let mut doomed = Vec::new();
            for entry in table.iter().map_err(self.db_err("read leases"))? {
                let (key, value) = entry.map_err(self.db_err("read a lease"))?;
                let lease = self.decode(key.value(), value.value())?;
                let old_enough = lease.ended_at.is_some_and(|t| t < cutoff);
                if lease.state != LeaseState::Active && old_enough {
                    doomed.push(key.value().to_owned());
                }
            }
            for key in &doomed {
                table
                    .remove(key.as_str())
                    .map_err(self.db_err("delete a lease"))?;
            }
            removed = doomed;
        }
        txn.commit().map_err(self.db_err("commit"))?;
        for key in &removed {
            if let Ok(id) = LeaseId::parse(key) {
                let _ = self.changes.send(StoreChange::Removed(id));
            }
        }
        Ok(removed.len())
    }

    fn db_err<E: Into<redb::Error>>(&self, op: &'static str) -> impl FnOnce(E) -> RedbError + '_ {
        move |e| RedbError::Db {
            op,
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    pub(crate) fn encode(&self, lease: &Lease) -> Result<Vec<u8>, RedbError> {
        super::record::encode(lease).map_err(|reason| RedbError::Encode {
            path: self.path.clone(),
            key: lease.id.to_string(),
            reason,
        })
    }

    pub(crate) fn decode(&self, key: &str, bytes: &[u8]) -> Result<Lease, RedbError> {
        super::record::decode(key, bytes).map_err(|reason| RedbError::Decode {
            path: self.path.clone(),
            key: key.to_owned(),
            reason,
        })
    }
}

/// A lease that can no longer issue: the reserve takes only these.
fn is_ended(lease: &Lease) -> bool {
    !matches!(lease.state, LeaseState::Active | LeaseState::Pending)
}

fn reserved(lease: &Lease) -> Option<ReservedEnd> {
    is_ended(lease).then(|| ReservedEnd {
        id: lease.id.clone(),
        state: lease.state,
        ended_at: lease.ended_at.unwrap_or_else(SystemTime::now),
        ended_by: lease.ended_by.clone().unwrap_or_else(Principal::agent),
        end_reason: lease.end_reason.clone(),
    })
}

impl LeaseStore for RedbStore {
    fn put_all(&self, leases: &[Lease]) -> Result<(), StoreError> {
        RedbStore::put_all(self, leases).map_err(StoreError::new)
    }

    fn load(&self) -> Result<Vec<Arc<Lease>>, StoreError> {
        RedbStore::load(self).map_err(StoreError::new)
    }

    fn compact(&self, cutoff: SystemTime) -> Result<usize, StoreError> {
        RedbStore::compact(self, cutoff).map_err(StoreError::new)
    }

    fn watch(&self) -> StoreWatch {
        self.changes.subscribe()
    }

    fn take_recovered(&self) -> Vec<LeaseId> {
        std::mem::take(&mut self.reserve.lock().expect("end reserve poisoned").recovered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;
    use std::time::{Duration, UNIX_EPOCH};

    use spiffe::SpiffeId;

    use super::super::record::{LeaseRecord, DEFAULT_JWT_TTL, FORMAT_JSON};
    use super::super::reserve::{EndReserve, ReservedEnd};
    use crate::selector::Selector;

    fn fixture_selectors() -> crate::selector::Selectors {
        ["unix:pid:77:12345", "unix:uid:1000"]
            .into_iter()
            .map(|s| Selector::parse(s).unwrap())
            .collect()
    }

    fn principal(uid: u32, user: Option<&str>) -> Principal {
        Principal {
            uid,
            gid: uid + 1,
            pid: Some(4242),
            user: user.map(str::to_owned),
            spiffe_id: None,
        }
    }

    fn lease(task: &str) -> Lease {
        // Nanosecond precision on purpose: the round trip must be exact.
        let created = UNIX_EPOCH + Duration::new(1_750_000_000, 123_456_789);
        Lease {
            id: LeaseId::random(),
            task_id: task.to_owned(),
            delegator: "user/alice".to_owned(),
            agent: "reporter".to_owned(),
            spiffe_id: SpiffeId::new(format!(
                "spiffe://example.org/agent/reporter/task/{task}/delegator/user/alice"
            ))
            .unwrap(),
            selectors: fixture_selectors(),
            created_at: created,
            expires_at: created + Duration::from_secs(60),
            max_expires_at: created + Duration::new(3600, 1),
            svid_ttl: Duration::from_millis(300_500),
            jwt_ttl: Duration::from_millis(120_250),
            audiences: vec!["db".into(), "spiffe://example.org/api".into()],
            reason: "nightly report\tfor \"ops\" — ünïcode".to_owned(),
            granted_by: principal(1000, Some("alice")),
            state: LeaseState::Active,
            ended_at: None,
            ended_by: None,
            approval_deadline: None,
            approved_at: None,
            approved_by: None,
            end_reason: String::new(),
            chain: Vec::new(),
            may_delegate: 0,
            end_on_violation: false,
            node: None,
            revision: 0,
        }
    }

    fn ended(task: &str, state: LeaseState, ended_at: SystemTime) -> Lease {
        Lease {
            state,
            ended_at: Some(ended_at),
            ended_by: Some(principal(0, None)),
            ..lease(task)
        }
    }

    /// `Lease` has no `PartialEq`; its `Debug` output shows every field, times to the nanosecond.
    fn same(a: &Lease, b: &Lease) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    fn by_id(leases: Vec<Arc<Lease>>, id: &LeaseId) -> Lease {
        leases
            .into_iter()
            .find(|l| &l.id == id)
            .map(Arc::unwrap_or_clone)
            .expect("lease present")
    }

    fn tempdir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<RedbStore>();
        check::<RedbError>();
    }

    #[test]
    fn put_then_load_round_trips_every_field() {
        let dir = tempdir();
        let store = RedbStore::open(&dir.path().join("leases.redb")).unwrap();
        let active = lease("t-1");
        let mut gone = ended(
            "t-2",
            LeaseState::ProcessExited,
            UNIX_EPOCH + Duration::new(1_750_000_100, 999_999_999),
        );
        gone.delegator = "team/ops/bob".into();
        gone.audiences.clear();
        gone.reason.clear();
        gone.granted_by.pid = None;
        gone.end_reason = "bound process 4242 exited".into();
        let mut early = lease("t-3");
        // A clock set before the epoch still round-trips.
        early.created_at = UNIX_EPOCH - Duration::new(5, 7);
        store.put(&active).unwrap();
        store.put(&gone).unwrap();
        store.put(&early).unwrap();

        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 3);
        for want in [&active, &gone, &early] {
            let got = by_id(loaded.clone(), &want.id);
            assert!(same(&got, want), "got {got:?}\nwant {want:?}");
        }
        let got = by_id(loaded, &gone.id);
        assert_eq!(got.delegator, "team/ops/bob");
        assert_eq!(got.ended_by, Some(principal(0, None)));
        assert_eq!(got.state, LeaseState::ProcessExited);
    }

    #[test]
    fn validated_grant_round_trips() {
        use crate::lease::{validate_grant, GrantInput};
        let limits = crate::lease::test_limits();
        let input = GrantInput {
            task_id: "t-9".into(),
            delegator: "org/team/carol".into(),
            agent: "builder".into(),
            ttl: Some(Duration::from_secs(60)),
            selectors: vec!["unix:uid:1000".into(), "unix:path:/usr/bin/env".into()],
            audiences: vec!["b".into(), "a".into()],
            reason: "ci".into(),
            ..Default::default()
        };
        let lease = validate_grant(input, &limits, SystemTime::now(), Principal::agent()).unwrap();
        let dir = tempdir();
        let store = RedbStore::open(&dir.path().join("leases.redb")).unwrap();
        store.put(&lease).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 1);
        assert!(same(&loaded[0], &lease));
    }

    #[test]
    fn put_of_the_same_id_updates() {
        let dir = tempdir();
        let path = dir.path().join("leases.redb");
        let store = RedbStore::open(&path).unwrap();
        let mut l = lease("t-1");
        store.put(&l).unwrap();
        l.state = LeaseState::Revoked;
        l.ended_at = Some(l.created_at + Duration::from_secs(5));
        l.ended_by = Some(principal(1000, Some("alice")));
        store.put(&l).unwrap();
        drop(store);

        let loaded = RedbStore::open(&path).unwrap().load().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].state, LeaseState::Revoked);
        assert!(same(&loaded[0], &l));
    }

    /// Issue 14, hole 1: on a full disk the database cannot commit an end, and a restart
    /// brought the lease back. What the reserve holds ends the lease whatever the database says.
    #[test]
    fn an_end_in_the_reserve_overrides_a_live_record_and_moves_into_the_database() {
        let dir = tempdir();
        let path = dir.path().join("leases.redb");
        let live = lease("t");
        RedbStore::open(&path).unwrap().put(&live).unwrap();
        // What a full disk leaves behind: the database says active, the reserve revoked.
        let (mut reserve, _) = EndReserve::open(&path.with_extension("ends")).unwrap();
        let ended_at = UNIX_EPOCH + Duration::new(1_800_000_000, 5);
        reserve
            .put(&ReservedEnd {
                id: live.id.clone(),
                state: LeaseState::Revoked,
                ended_at,
                ended_by: principal(1000, None),
                end_reason: "key leaked".into(),
            })
            .unwrap();
        drop(reserve);

        let store = RedbStore::open(&path).unwrap();
        let loaded = by_id(store.load().unwrap(), &live.id);
        assert_eq!(loaded.state, LeaseState::Revoked);
        assert_eq!(loaded.ended_at, Some(ended_at));
        assert_eq!(loaded.ended_by, Some(principal(1000, None)));
        assert_eq!(loaded.end_reason, "key leaked");
        assert_eq!(store.take_recovered(), std::slice::from_ref(&live.id));
        assert!(store.take_recovered().is_empty());
        drop(store);

        // The database holds the end now, and the slot is free again.
        let (_, held) = EndReserve::open(&path.with_extension("ends")).unwrap();
        assert!(held.is_empty());
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(
            by_id(store.load().unwrap(), &live.id).state,
            LeaseState::Revoked
        );
        assert!(store.take_recovered().is_empty());
    }

    #[test]
    fn data_survives_reopening() {
        let dir = tempdir();
        let path = dir.path().join("leases.redb");
        let leases = vec![
            lease("a"),
            ended("b", LeaseState::Completed, SystemTime::now()),
        ];
        {
            let store = RedbStore::open(&path).unwrap();
            store.put_all(&leases).unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 2);
        for want in &leases {
            assert!(same(&by_id(loaded.clone(), &want.id), want));
        }
    }

    #[test]
    fn compact_deletes_only_old_ended_leases() {
        let dir = tempdir();
        let store = RedbStore::open(&dir.path().join("leases.redb")).unwrap();
        let cutoff = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let before = cutoff - Duration::from_nanos(1);
        let old_revoked = ended("old-r", LeaseState::Revoked, before);
        let old_expired = ended(
            "old-e",
            LeaseState::Expired,
            cutoff - Duration::from_secs(86400),
        );
        let at_cutoff = ended("at", LeaseState::Completed, cutoff);
        let recent = ended(
            "new",
            LeaseState::ProcessExited,
            cutoff + Duration::from_secs(1),
        );
        let mut old_active = lease("active");
        old_active.expires_at = before;
        let mut odd_active = lease("odd");
        // Inconsistent, but an active lease is never deleted, whatever its fields say.
        odd_active.ended_at = Some(before);
        store
            .put_all(&[
                old_revoked.clone(),
                old_expired.clone(),
                at_cutoff.clone(),
                recent.clone(),
                old_active.clone(),
                odd_active.clone(),
            ])
            .unwrap();

        assert_eq!(store.compact(cutoff).unwrap(), 2);
        let mut left: Vec<_> = store.load().unwrap().iter().map(|l| l.id.clone()).collect();
        left.sort();
        let mut want = vec![at_cutoff.id, recent.id, old_active.id, odd_active.id];
        want.sort();
        assert_eq!(left, want);
        assert_eq!(store.compact(cutoff).unwrap(), 0);
    }

    #[test]
    fn put_all_ten_thousand() {
        let dir = tempdir();
        let path = dir.path().join("leases.redb");
        let template = lease("bulk");
        let leases: Vec<Lease> = (0..10_000)
            .map(|i| Lease {
                id: LeaseId::random(),
                task_id: format!("t-{i}"),
                ..template.clone()
            })
            .collect();
        {
            let store = RedbStore::open(&path).unwrap();
            store.put_all(&leases).unwrap();
        }
        let mut loaded: Vec<String> = RedbStore::open(&path)
            .unwrap()
            .load()
            .unwrap()
            .into_iter()
            .map(|l| l.task_id.clone())
            .collect();
        let mut want: Vec<String> = leases.into_iter().map(|l| l.task_id).collect();
        loaded.sort();
        want.sort();
        assert_eq!(
            loaded, want,
            "every lease exactly once across the decoding threads"
        );
    }

    #[test]
    fn key_ranges_cover_every_key_once() {
        assert_eq!(key_ranges(1), vec![(None, None)]);
        let four = key_ranges(4);
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            four,
            vec![
                (None, s("4")),
                (s("4"), s("8")),
                (s("8"), s("c")),
                (s("c"), None)
            ]
        );
        for n in 1..=16 {
            let r = key_ranges(n);
            assert_eq!(r.len(), n);
            assert_eq!(r[0].0, None);
            assert_eq!(r[n - 1].1, None);
            for w in r.windows(2) {
                assert_eq!(w[0].1, w[1].0, "contiguous");
            }
        }
    }

    #[test]
    fn file_mode_is_0600() {
        let dir = tempdir();
        let path = dir.path().join("leases.redb");
        drop(RedbStore::open(&path).unwrap());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&path), 0o600);

        // An existing file that is too open is tightened.
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        drop(RedbStore::open(&path).unwrap());
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn corrupt_file_is_an_error_naming_the_path() {
        let dir = tempdir();
        let path = dir.path().join("leases.redb");

        let garbage: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 + 13) as u8).collect();
        for bytes in [&b"not a database"[..], &garbage[..]] {
            fs::write(&path, bytes).unwrap();
            let err = RedbStore::open(&path).unwrap_err();
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }

        // A real database with its data pages overwritten.
        fs::remove_file(&path).unwrap();
        {
            let store = RedbStore::open(&path).unwrap();
            store
                .put_all(
                    &(0..200)
                        .map(|i| lease(&format!("t{i}")))
                        .collect::<Vec<_>>(),
                )
                .unwrap();
        }
        let mut bytes = fs::read(&path).unwrap();
        let len = bytes.len();
        for b in &mut bytes[4096..len] {
            *b ^= 0x5a;
        }
        fs::write(&path, &bytes).unwrap();
        let err = RedbStore::open(&path).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    /// Writes `value` under `key`, bypassing the encoder (records as another version, or
    /// damaged, would leave them).
    fn put_raw(store: &RedbStore, key: &str, value: &[u8]) {
        let txn = store.db.begin_write().unwrap();
        txn.open_table(LEASES).unwrap().insert(key, value).unwrap();
        txn.commit().unwrap();
    }

    fn get_raw(store: &RedbStore, key: &str) -> Vec<u8> {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(LEASES).unwrap();
        let value = table.get(key).unwrap().expect("record present");
        value.value().to_vec()
    }

    /// A record as format 1 (JSON) wrote it.
    fn as_format_1(lease: &Lease) -> Vec<u8> {
        let mut record = LeaseRecord::from(lease);
        record.v = FORMAT_JSON;
        serde_json::to_vec(&record).unwrap()
    }

    /// A lease with every field set, for the frozen records below.
    fn frozen_lease() -> Lease {
        let created = UNIX_EPOCH + Duration::new(1_763_900_000, 123_456_789);
        let person = |uid: u32, pid: i32, name: &str| Principal {
            uid,
            gid: uid,
            pid: Some(pid),
            user: Some(name.to_owned()),
            spiffe_id: None,
        };
        Lease {
            id: LeaseId::parse("9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c").unwrap(),
            task_id: "report-42".into(),
            delegator: "user/alice".into(),
            agent: "reporter".into(),
            spiffe_id: SpiffeId::new(
                "spiffe://example.org/agent/reporter/task/report-42/delegator/user/alice",
            )
            .unwrap(),
            selectors: fixture_selectors(),
            created_at: created,
            expires_at: created + Duration::from_secs(600),
            max_expires_at: created + Duration::from_secs(3600),
            svid_ttl: Duration::from_secs(300),
            jwt_ttl: Duration::from_secs(120),
            audiences: vec!["db".into()],
            reason: "weekly report".into(),
            granted_by: person(1000, 4242, "alice"),
            state: LeaseState::Revoked,
            ended_at: Some(created + Duration::from_secs(60)),
            ended_by: Some(Principal {
                uid: 0,
                gid: 0,
                pid: None,
                user: None,
                spiffe_id: None,
            }),
            approval_deadline: Some(created + Duration::from_secs(30)),
            approved_at: Some(created + Duration::from_secs(10)),
            approved_by: Some(person(1001, 99, "bob")),
            end_reason: String::new(),
            chain: Vec::new(),
            may_delegate: 0,
            end_on_violation: false,
            node: None,
            revision: 0,
        }
    }

    /// `frozen_lease` as format 1 wrote it. Stored records outlive the code that wrote them:
    /// these bytes must decode the same forever.
    const FROZEN_FORMAT_1: &str = r#"{"v":1,"id":"9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c","task_id":"report-42","delegator":"user/alice","agent":"reporter","spiffe_id":"spiffe://example.org/agent/reporter/task/report-42/delegator/user/alice","selectors":["unix:pid:77:12345","unix:uid:1000"],"created_at":1763900000123456789,"expires_at":1763900600123456789,"max_expires_at":1763903600123456789,"svid_ttl_nanos":300000000000,"jwt_ttl_nanos":120000000000,"audiences":["db"],"reason":"weekly report","granted_by":{"uid":1000,"gid":1000,"pid":4242,"user":"alice"},"state":"revoked","ended_at":1763900060123456789,"ended_by":{"uid":0,"gid":0,"pid":null,"user":null},"approval_deadline":1763900030123456789,"approved_at":1763900010123456789,"approved_by":{"uid":1001,"gid":1001,"pid":99,"user":"bob"}}"#;

    /// `frozen_lease` in format 2 (hex). Postcard has no field names: any change to
    /// `LeaseRecord` changes these bytes, and needs a format 3.
    const FROZEN_FORMAT_2: &str = concat!(
        "02203966326334653661386230643166336535613763396231643366356537613963097265706f72742d3432",
        "0a757365722f616c696365087265706f72746572477370696666653a2f2f6578616d706c652e6f72672f6167",
        "656e742f7265706f727465722f7461736b2f7265706f72742d34322f64656c656761746f722f757365722f61",
        "6c6963650211756e69783a7069643a37373a31323334350d756e69783a7569643a31303030aab4dcea8bedd0",
        "fa30aaf4a7978290d1fa30aab4a1f6d1bed2fa3080f092cbdd080180e0ba84bf03010264620d7765656b6c79",
        "207265706f7274e807e80701a4420105616c696365077265766f6b656401aa9497efcaf0d0fa300100000000",
        "01aae4f9acebeed0fa3001aac4bbabd6edd0fa3001e907e90701c6010103626f62",
    );

    /// `frozen_lease` ended for a reason, in format 3 (hex): format 2 with the reason after it.
    /// Any change to `LeaseRecord` changes these bytes, and needs a format 4.
    const FROZEN_FORMAT_3: &str = concat!(
        "03203966326334653661386230643166336535613763396231643366356537613963097265706f72742d3432",
        "0a757365722f616c696365087265706f72746572477370696666653a2f2f6578616d706c652e6f72672f6167",
        "656e742f7265706f727465722f7461736b2f7265706f72742d34322f64656c656761746f722f757365722f61",
        "6c6963650211756e69783a7069643a37373a31323334350d756e69783a7569643a31303030aab4dcea8bedd0",
        "fa30aaf4a7978290d1fa30aab4a1f6d1bed2fa3080f092cbdd080180e0ba84bf03010264620d7765656b6c79",
        "207265706f7274e807e80701a4420105616c696365077265766f6b656401aa9497efcaf0d0fa300100000000",
        "01aae4f9acebeed0fa3001aac4bbabd6edd0fa3001e907e90701c6010103626f62",
        "010d706f6c696379206368616e6765",
    );

    /// `frozen_lease` ended for a reason, delegated from two leases, in format 4 (hex): format 3
    /// with the delegation after it. Any change to `LeaseRecord` changes these bytes, and needs
    /// a format 5.
    const FROZEN_FORMAT_4: &str = concat!(
        "04203966326334653661386230643166336535613763396231643366356537613963097265706f72742d3432",
        "0a757365722f616c696365087265706f72746572477370696666653a2f2f6578616d706c652e6f72672f6167",
        "656e742f7265706f727465722f7461736b2f7265706f72742d34322f64656c656761746f722f757365722f61",
        "6c6963650211756e69783a7069643a37373a31323334350d756e69783a7569643a31303030aab4dcea8bedd0",
        "fa30aaf4a7978290d1fa30aab4a1f6d1bed2fa3080f092cbdd080180e0ba84bf03010264620d7765656b6c79",
        "207265706f7274e807e80701a4420105616c6963650c706172656e745f656e64656401aa9497efcaf0d0fa30",
        "010000000001aae4f9acebeed0fa3001aac4bbabd6edd0fa3001e907e90701c6010103626f62010d706f6c69",
        "6379206368616e67650102203030303030303030303030303030303030303030303030303030303030303031",
        "1f7370696666653a2f2f6578616d706c652e6f72672f6167656e742f726f6f7409726f6f742d7461736b2030",
        "30303030303030303030303030303030303030303030303030303030303032227370696666653a2f2f657861",
        "6d706c652e6f72672f6167656e742f706c616e6e65720c706c616e6e65722d7461736b0101",
    );

    fn frozen_delegated() -> Lease {
        let mut l = frozen_lease();
        l.end_reason = "policy change".into();
        l.state = LeaseState::ParentEnded;
        let link = |id: &str, agent: &str| crate::lease::Link {
            lease_id: LeaseId::parse(id).unwrap(),
            spiffe_id: SpiffeId::new(format!("spiffe://example.org/agent/{agent}")).unwrap(),
            task_id: format!("{agent}-task"),
        };
        l.chain = vec![
            link("00000000000000000000000000000001", "root"),
            link("00000000000000000000000000000002", "planner"),
        ];
        l.may_delegate = 1;
        l.end_on_violation = true;
        l
    }

    #[test]
    fn frozen_records_of_every_format_decode_and_format_5_is_what_is_written() {
        let dir = tempdir();
        let store = RedbStore::open(&dir.path().join("leases.redb")).unwrap();
        let want = frozen_lease();
        let key = want.id.as_str();
        let format_2 = hex::decode(FROZEN_FORMAT_2).unwrap();
        let mut want_3 = want.clone();
        want_3.end_reason = "policy change".into();
        let want_4 = frozen_delegated();
        // Format 5 is format 4 with the node and the remote callers after it, each `None`
        // (one zero byte) or `Some` (a one, then the value: a string's length first). Any
        // other change is a new format version.
        assert_eq!(
            hex::encode(store.encode(&want_4).unwrap()),
            format!("05{}0000", &FROZEN_FORMAT_4[2..]),
            "the format 5 encoding changed: that is a new format version"
        );
        let mut want_5 = want_4.clone();
        want_5.node = Some("node-a".into());
        want_5.granted_by.spiffe_id = Some("spiffe://example.org/orchestrator".into());
        let text = |t: &str| format!("{:02x}{}", t.len(), hex::encode(t));
        let format_5 = format!(
            "05{}01{}0101{}0000",
            &FROZEN_FORMAT_4[2..],
            text("node-a"),
            text("spiffe://example.org/orchestrator"),
        );
        assert_eq!(hex::encode(store.encode(&want_5).unwrap()), format_5);
        let got = store.decode(key, &hex::decode(&format_5).unwrap()).unwrap();
        assert!(same(&got, &want_5), "got {got:?}\nwant {want_5:?}");
        // Without a delegation, format 5 is format 3 with three `None`s after it, and without
        // a reason format 2 with four.
        assert_eq!(
            hex::encode(store.encode(&want_3).unwrap()),
            format!("05{}000000", &FROZEN_FORMAT_3[2..])
        );
        assert_eq!(
            hex::encode(store.encode(&want).unwrap()),
            format!("05{}00000000", &FROZEN_FORMAT_2[2..])
        );
        for bytes in [FROZEN_FORMAT_1.as_bytes(), &format_2] {
            let got = store.decode(key, bytes).unwrap();
            assert!(same(&got, &want), "got {got:?}\nwant {want:?}");
        }
        let got = store
            .decode(key, &hex::decode(FROZEN_FORMAT_3).unwrap())
            .unwrap();
        assert!(same(&got, &want_3), "got {got:?}\nwant {want_3:?}");
        let got = store
            .decode(key, &hex::decode(FROZEN_FORMAT_4).unwrap())
            .unwrap();
        assert!(same(&got, &want_4), "got {got:?}\nwant {want_4:?}");
        assert!(format_2.len() * 2 < FROZEN_FORMAT_1.len());
    }

    #[test]
    fn a_format_2_record_with_bytes_after_its_end_is_still_damage() {
        let dir = tempdir();
        let store = RedbStore::open(&dir.path().join("leases.redb")).unwrap();
        let want = frozen_lease();
        let mut bytes = hex::decode(FROZEN_FORMAT_2).unwrap();
        bytes.push(0);
        let err = store
            .decode(want.id.as_str(), &bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 bytes after its end"), "{err}");
    }

    #[test]
    fn format_1_records_still_load_and_are_rewritten_as_format_5() {
        let dir = tempdir();
        let store = RedbStore::open(&dir.path().join("leases.redb")).unwrap();
        let old = ended("old", LeaseState::Revoked, SystemTime::now());
        let mut renewed = lease("renewed");
        put_raw(&store, old.id.as_str(), &as_format_1(&old));
        put_raw(&store, renewed.id.as_str(), &as_format_1(&renewed));
        // Format 1 records written before JWT TTLs and approval gates lack those fields.
        let mut bare = serde_json::to_value(LeaseRecord {
            v: FORMAT_JSON,
            ..LeaseRecord::from(&lease("bare"))
        })
        .unwrap();
        let fields = bare.as_object_mut().unwrap();
        for added_later in [
            "jwt_ttl_nanos",
            "approval_deadline",
            "approved_at",
            "approved_by",
            "end_reason",
            "delegation",
            "node",
            "remote",
        ] {
            fields.remove(added_later);
        }
        let bare_id = fields["id"].as_str().unwrap().to_owned();
        put_raw(&store, &bare_id, &serde_json::to_vec(&bare).unwrap());
        let fresh = lease("fresh");
        store.put(&fresh).unwrap();

        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 4);
        for want in [&old, &renewed, &fresh] {
            let got = by_id(loaded.clone(), &want.id);
            assert!(same(&got, want), "got {got:?}\nwant {want:?}");
        }
        let bare = by_id(loaded, &LeaseId::parse(&bare_id).unwrap());
        assert_eq!(bare.jwt_ttl, DEFAULT_JWT_TTL);
        assert_eq!(bare.approval_deadline, None);

        assert_eq!(get_raw(&store, fresh.id.as_str())[0], 5);
        assert_eq!(get_raw(&store, renewed.id.as_str())[0], b'{');
        renewed.expires_at += Duration::from_secs(60);
        store.put(&renewed).unwrap();
        let rewritten = get_raw(&store, renewed.id.as_str());
        assert_eq!(rewritten[0], 5, "a changed lease is written in format 5");
        assert!(rewritten.len() * 2 < as_format_1(&renewed).len());
        assert!(same(&by_id(store.load().unwrap(), &renewed.id), &renewed));
    }

    #[test]
    fn bad_records_are_decode_errors_naming_the_key() {
        let dir = tempdir();
        let path = dir.path().join("leases.redb");
        let store = RedbStore::open(&path).unwrap();
        let good = lease("t");
        let key = good.id.to_string();
        let as_json = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = serde_json::from_slice(&as_format_1(&good)).unwrap();
            edit(&mut v);
            serde_json::to_vec(&v).unwrap()
        };
        let as_postcard = |edit: &dyn Fn(&mut LeaseRecord)| {
            let mut record = LeaseRecord::from(&good);
            edit(&mut record);
            postcard::to_stdvec(&record).unwrap()
        };
        let encoded = store.encode(&good).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{not json".to_vec(), "invalid JSON"),
            (as_json(&|v| v["v"] = 6.into()), "unknown format version 6"),
            (as_json(&|v| v["v"] = 5.into()), "format version 5 in JSON"),
            (as_json(&|v| v["v"] = 2.into()), "format version 2 in JSON"),
            (as_json(&|v| v["v"] = 3.into()), "format version 3 in JSON"),
            (
                as_json(&|v| v["spiffe_id"] = "http://nope".into()),
                "spiffe_id",
            ),
            (as_json(&|v| v["state"] = "paused".into()), "unknown state"),
            (as_json(&|v| v["id"] = "ABC".into()), "id"),
            (
                as_json(&|v| v["id"] = LeaseId::random().to_string().into()),
                "holds lease",
            ),
            (Vec::new(), "no format version"),
            (vec![0xff], "no format version"),
            (as_postcard(&|r| r.v = 6), "unknown format version 6"),
            (as_postcard(&|r| r.v = 1), "format version 1 in binary"),
            (encoded[..encoded.len() - 3].to_vec(), "invalid record"),
            ([&encoded[..], &[0]].concat(), "1 bytes after its end"),
            (
                as_postcard(&|r| r.spiffe_id = "http://nope".into()),
                "spiffe_id",
            ),
            (as_postcard(&|r| r.created_at = i128::MAX), "created_at"),
            (
                as_postcard(&|r| r.id = LeaseId::random().to_string()),
                "holds lease",
            ),
        ];
        for (bytes, why) in cases {
            put_raw(&store, &key, &bytes);
            for err in [
                store.load().unwrap_err(),
                store.compact(SystemTime::now()).unwrap_err(),
            ] {
                match &err {
                    RedbError::Decode { key: k, reason, .. } => {
                        assert_eq!(k, &key);
                        assert!(reason.contains(why), "{reason} should mention {why}");
                    }
                    other => panic!("expected a decode error, got {other:?}"),
                }
                assert!(err.to_string().contains(&key), "{err}");
            }
        }
    }
}
