//! The attestor: reads a peer's facts, proves they came from the process that connected,
//! and turns them into `unix:` selectors. It caches executable digests and user and group
//! names, so repeated attestations of a workload stay cheap.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::peer::{Capture, PeerInfo, PeerInner};
use super::process::{
    group_name, parse_status, pidfd_exited, proc_err, process_start_time, read_exe_path, read_proc,
    user_name, StatusCreds,
};
use super::{AttestError, Attestation};
use crate::selector::{Key, Selector, Selectors, UnixKey};

/// Upper bound on cached digests; the cache is cleared when it fills up,
/// which is simpler than LRU and only costs a re-hash.
const DIGEST_CACHE_CAPACITY: usize = 1024;

/// Identity of an executable's contents as far as the kernel tells us.
/// Keyed on the inode rather than the path, so replacing the file at a path
/// (new inode, or same inode rewritten with a new mtime/size) never serves a
/// stale digest. mtime alone is not enough: a file's owner can set it to any
/// value with `utimensat`, and filesystems reuse freed inode numbers, so a
/// forged file could otherwise reproduce a cached binary's key. ctime cannot
/// be set from userspace and changes on every write or attribute change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DigestKey {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
    size: u64,
}

impl DigestKey {
    fn of(meta: &std::fs::Metadata) -> DigestKey {
        DigestKey {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
            size: meta.size(),
        }
    }
}

/// Attests peers. Shareable across threads; holds the executable digest cache.
pub struct Attestor {
    max_digest_bytes: u64,
    cache: Mutex<HashMap<DigestKey, String>>,
    /// Number of files actually hashed (cache misses); lets tests observe
    /// cache behaviour.
    hashes: AtomicU64,
    names: Mutex<HashMap<NameKey, (Option<String>, Instant)>>,
}

/// A user or group name lookup, cached for [`NAME_TTL`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum NameKey {
    User(u32),
    Group(u32),
}

/// How long a uid's or gid's name is reused. glibc re-reads `/etc/passwd` and `/etc/group` on
/// every lookup (a tenth of an attestation's cost); a renamed user or group shows in selectors
/// within this long.
const NAME_TTL: Duration = Duration::from_secs(5);

/// Distinct uids and gids kept at most (a host has few; the bound is against growth).
const NAME_CACHE_CAPACITY: usize = 4096;

/// Whether an attestation may do blocking work: hash an executable (I/O over the whole file)
/// or look up a user or group name (NSS may ask a directory server).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Blocking {
    Allowed,
    /// Only a cached digest and cached names may be used; otherwise the attestation is not
    /// done (and is done again where blocking is fine).
    CachedOnly,
}

/// What an attestation read that its `unix:` selectors depend on (besides the connection's pid
/// and start time): equal facts make equal selectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct UnixFacts {
    creds: StatusCreds,
    user: Option<String>,
    group: Option<String>,
    /// The name of each of `creds.groups`, in order, where it has one.
    group_names: Vec<Option<String>>,
    exe_path: Option<String>,
    exe_sha256: Option<String>,
}

/// The facts a connection's last attestation read, and the selectors built from them.
#[derive(Debug)]
pub(super) struct Remembered {
    facts: UnixFacts,
    selectors: Selectors,
}

/// The `unix:` selectors of a process.
fn unix_selectors(pid: i32, start_time: u64, facts: &UnixFacts) -> Selectors {
    let fact = |key, value: &dyn std::fmt::Display| Selector::fact(Key::Unix(key), value);
    let creds = &facts.creds;
    let mut selectors = vec![
        fact(UnixKey::Uid, &creds.euid),
        fact(UnixKey::Gid, &creds.egid),
        Selector::process(pid, start_time),
    ];
    if let Some(user) = &facts.user {
        selectors.push(fact(UnixKey::User, user));
    }
    if let Some(group) = &facts.group {
        selectors.push(fact(UnixKey::Group, group));
    }
    for (gid, group) in creds.groups.iter().zip(&facts.group_names) {
        selectors.push(fact(UnixKey::SupplementaryGid, gid));
        if let Some(group) = group {
            selectors.push(fact(UnixKey::SupplementaryGroup, group));
        }
    }
    if let Some(path) = &facts.exe_path {
        selectors.push(fact(UnixKey::Path, path));
    }
    if let Some(digest) = &facts.exe_sha256 {
        selectors.push(fact(UnixKey::Sha256, digest));
    }
    selectors.into_iter().collect()
}

impl Attestor {
    /// Executables larger than `max_digest_bytes` get no `unix:sha256`
    /// selector, bounding the time and I/O one RPC can cost us.
    pub fn new(max_digest_bytes: u64) -> Attestor {
        Attestor {
            max_digest_bytes,
            cache: Mutex::new(HashMap::new()),
            hashes: AtomicU64::new(0),
            names: Mutex::new(HashMap::new()),
        }
    }

    /// Attest `peer`. Blocking (reads `/proc`, may hash a large file): run it
    /// on a blocking thread.
    pub fn attest(&self, peer: &PeerInfo) -> Result<Attestation, AttestError> {
        self.attest_with(peer, Blocking::Allowed)
            .expect("blocking allowed: always attests")
    }

    /// Attests `peer` if that needs no blocking work (the executable's digest and the user and
    /// group names are cached), which makes it quick enough to run on an async thread: a few
    /// reads of `/proc`, whose files are generated in memory. `None`: call
    /// [`Attestor::attest`] on a blocking thread.
    pub fn attest_cached(&self, peer: &PeerInfo) -> Option<Result<Attestation, AttestError>> {
        self.attest_with(peer, Blocking::CachedOnly)
    }

    fn attest_with(
        &self,
        peer: &PeerInfo,
        blocking: Blocking,
    ) -> Option<Result<Attestation, AttestError>> {
        let inner = &*peer.inner;
        let (pidfd, start_time) = match &inner.capture {
            Capture::NoPid => return Some(Err(AttestError::NoPid)),
            Capture::Gone => return Some(Err(AttestError::ProcessGone)),
            Capture::Failed(why) => return Some(Err(AttestError::Unprovable(why.clone()))),
            Capture::Live { pidfd, start_time } => (pidfd.as_ref(), *start_time),
        };
        let Some(pid) = inner.pid else {
            return Some(Err(AttestError::NoPid));
        };
        // The digest first: when it would need hashing and blocking is not allowed here, nothing
        // else has been read for nothing.
        let exe_sha256 = self.exe_digest(pid, blocking)?;
        self.facts(inner, pid, pidfd, start_time, exe_sha256, blocking)
            .transpose()
    }

    fn facts(
        &self,
        inner: &PeerInner,
        pid: i32,
        pidfd: Option<&OwnedFd>,
        start_time: u64,
        exe_sha256: Option<String>,
        blocking: Blocking,
    ) -> Result<Option<Attestation>, AttestError> {
        // --- Gather every fact first; none of it is trusted until verified. ---
        let status_path = format!("/proc/{pid}/status");
        let status = read_proc(&status_path).map_err(|e| proc_err(status_path.clone(), e))?;
        let creds = parse_status(&status).ok_or_else(|| {
            AttestError::Proc(
                status_path.clone(),
                io::Error::new(io::ErrorKind::InvalidData, "missing Uid/Gid lines"),
            )
        })?;
        let exe_path = read_exe_path(pid);
        // Read here, before the proof below, so the Kubernetes selectors derived from it are
        // as certain to describe the connected process as the rest.
        let cgroup = read_proc(&format!("/proc/{pid}/cgroup")).ok();

        // --- Then prove the facts came from the process that connected. ---
        match pidfd {
            // Alive now, so it was alive through the reads above: the pid was its all along.
            Some(fd) => {
                if pidfd_exited(fd).map_err(|e| AttestError::Proc(format!("pidfd of {pid}"), e))? {
                    return Err(AttestError::ProcessGone);
                }
            }
            None => {
                let now = process_start_time(pid)
                    .map_err(|e| proc_err(format!("/proc/{pid}/stat"), e))?;
                if now != start_time {
                    return Err(AttestError::Unprovable(format!(
                        "start time of pid {pid} changed ({start_time} -> {now}); pid was reused"
                    )));
                }
            }
        }
        if creds.euid != inner.uid || creds.egid != inner.gid {
            return Err(AttestError::Unprovable(format!(
                "credentials changed since connect (uid {} -> {}, gid {} -> {})",
                inner.uid, creds.euid, inner.gid, creds.egid
            )));
        }

        let name = |key| self.name(key, blocking);
        let (Some(user), Some(group)) = (
            name(NameKey::User(creds.euid)),
            name(NameKey::Group(creds.egid)),
        ) else {
            return Ok(None);
        };
        let mut group_names = Vec::with_capacity(creds.groups.len());
        for gid in &creds.groups {
            let Some(group) = name(NameKey::Group(*gid)) else {
                return Ok(None);
            };
            group_names.push(group);
        }
        let facts = UnixFacts {
            creds,
            user,
            group,
            group_names,
            exe_path,
            exe_sha256,
        };
        // Every fact above was read afresh; only the building of selectors from them is
        // skipped when they are the ones this connection's last attestation read.
        let selectors = {
            let mut last = inner.last.lock().unwrap_or_else(|p| p.into_inner());
            match last.as_ref() {
                Some(r) if r.facts == facts => r.selectors.clone(),
                _ => {
                    let selectors = unix_selectors(pid, start_time, &facts);
                    *last = Some(Remembered {
                        facts: facts.clone(),
                        selectors: selectors.clone(),
                    });
                    selectors
                }
            }
        };
        Ok(Some(Attestation {
            pid,
            uid: facts.creds.euid,
            gid: facts.creds.egid,
            start_time,
            exe_path: facts.exe_path,
            exe_sha256: facts.exe_sha256,
            cgroup,
            selectors,
        }))
    }

    /// The name of a uid or gid (inner `None`: it has none), from the system's databases at
    /// most [`NAME_TTL`] ago. `None` when it is not cached and `blocking` forbids a lookup.
    fn name(&self, key: NameKey, blocking: Blocking) -> Option<Option<String>> {
        let now = Instant::now();
        {
            let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((name, at)) = names.get(&key) {
                if now.duration_since(*at) < NAME_TTL {
                    return Some(name.clone());
                }
            }
        }
        if blocking == Blocking::CachedOnly {
            return None;
        }
        // Not under the lock: a slow directory server must not hold up other attestations.
        let name = match key {
            NameKey::User(uid) => user_name(uid),
            NameKey::Group(gid) => group_name(gid),
        };
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if names.len() >= NAME_CACHE_CAPACITY {
            names.clear();
        }
        names.insert(key, (name.clone(), now));
        Some(name)
    }

    /// SHA-256 of the process's executable, or `None` if it cannot or should
    /// not be computed. Opening `/proc/<pid>/exe` yields the inode actually
    /// mapped by the process, even if the path has since been replaced or
    /// deleted, so the digest describes what is running, not what is on disk.
    /// `None` when the digest is not cached and `blocking` does not allow computing it; the
    /// inner `None` when there is no digest to be had.
    fn exe_digest(&self, pid: i32, blocking: Blocking) -> Option<Option<String>> {
        let path = format!("/proc/{pid}/exe");
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(pid, error = %e, "cannot open executable; no unix:sha256 selector");
                return Some(None);
            }
        };
        match self.digest_file(&file, blocking) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(pid, error = %e, "cannot hash executable; no unix:sha256 selector");
                Some(None)
            }
        }
    }

    /// Digest of an open file, through the cache. `Some(None)` when the file
    /// exceeds the size limit or changed while being hashed; `None` when it is not
    /// cached and `blocking` forbids hashing it.
    fn digest_file(&self, file: &File, blocking: Blocking) -> io::Result<Option<Option<String>>> {
        let key = DigestKey::of(&file.metadata()?);
        if key.size > self.max_digest_bytes {
            tracing::debug!(
                size = key.size,
                limit = self.max_digest_bytes,
                "executable too large; no unix:sha256 selector"
            );
            return Ok(Some(None));
        }
        if let Some(d) = self.lock_cache().get(&key) {
            return Ok(Some(Some(d.clone())));
        }
        if blocking == Blocking::CachedOnly {
            return Ok(None);
        }

        self.hashes.fetch_add(1, Ordering::Relaxed);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        // `take` bounds the work even if the file grows after the fstat.
        let mut reader = file.take(self.max_digest_bytes.saturating_add(1));
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        // If the file was modified while we read it, the bytes we hashed may
        // be a mix of old and new content; such a digest matches nothing real
        // and must not be cached under either key.
        let after = DigestKey::of(&file.metadata()?);
        if after != key || total != key.size {
            tracing::debug!("executable changed while hashing; no unix:sha256 selector");
            return Ok(Some(None));
        }
        let digest = hex::encode(hasher.finalize());

        let mut cache = self.lock_cache();
        if cache.len() >= DIGEST_CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(key, digest.clone());
        Ok(Some(Some(digest)))
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<DigestKey, String>> {
        // The cache holds only complete entries, so a panic elsewhere cannot
        // leave it inconsistent; recover rather than propagate the poison.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::test_support::me;
    use rustix::process::Pid;
    use std::process::{Child, Command};

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn spawn_sleep() -> Child {
        Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep")
    }

    #[test]
    fn attests_own_process() {
        let (pid, uid, gid) = me();
        let peer = PeerInfo::from_pid(pid, uid, gid);
        assert_eq!(peer.pid(), Some(pid));
        let att = Attestor::new(u64::MAX).attest(&peer).expect("attest self");

        let start = process_start_time(pid).unwrap();
        assert_eq!(
            (att.pid, att.uid, att.gid, att.start_time),
            (pid, uid, gid, start)
        );
        let s = &att.selectors;
        assert!(s.contains(&format!("unix:uid:{uid}")));
        assert!(s.contains(&format!("unix:gid:{gid}")));
        assert!(s.contains(&format!("unix:pid:{pid}:{start}")));

        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_str().unwrap();
        assert_eq!(att.exe_path.as_deref(), Some(exe));
        assert!(s.contains(&format!("unix:path:{exe}")));

        let digest = sha256_hex(&std::fs::read(exe).unwrap());
        assert_eq!(att.exe_sha256.as_deref(), Some(digest.as_str()));
        assert!(s.contains(&format!("unix:sha256:{digest}")));

        if uid == 0 {
            assert!(s.contains("unix:user:root"));
        }
        let mut sorted = s.to_strings();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted,
            s.to_strings(),
            "selectors must be sorted and deduplicated"
        );
        assert!(s.iter().all(|x| x.starts_with("unix:")));
    }

    #[test]
    fn supplementary_groups_match_status() {
        let (pid, uid, gid) = me();
        let att = Attestor::new(0)
            .attest(&PeerInfo::from_pid(pid, uid, gid))
            .unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        for g in parse_status(&status).unwrap().groups {
            assert!(att
                .selectors
                .contains(&format!("unix:supplementary_gid:{g}")));
        }
    }

    #[test]
    fn reaped_process_is_gone() {
        let (_, uid, gid) = me();
        let mut child = spawn_sleep();
        let peer = PeerInfo::from_pid(child.id() as i32, uid, gid);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(
            Attestor::new(u64::MAX).attest(&peer),
            Err(AttestError::ProcessGone)
        ));
        // Captured after death: recorded as gone at accept time.
        let late = PeerInfo::from_pid(child.id() as i32, uid, gid);
        assert!(matches!(
            Attestor::new(u64::MAX).attest(&late),
            Err(AttestError::ProcessGone)
        ));
    }

    #[test]
    fn zombie_is_gone_via_pidfd() {
        // An exited-but-unreaped process still has its /proc entry and start
        // time, so only the pidfd can tell us it is gone.
        let (_, uid, gid) = me();
        let mut child = spawn_sleep();
        let pid = child.id() as i32;
        let peer = PeerInfo::from_pid(pid, uid, gid);
        assert!(matches!(
            &peer.inner.capture,
            Capture::Live { pidfd: Some(_), .. }
        ));
        nix_kill(pid);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let state = stat.rsplit_once(')').unwrap().1.trim_start().chars().next();
            if state == Some('Z') {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "child never became a zombie"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let res = Attestor::new(u64::MAX).attest(&peer);
        child.wait().unwrap();
        assert!(matches!(res, Err(AttestError::ProcessGone)), "{res:?}");
    }

    /// SIGKILL without reaping (std's `Child::kill` would be fine too, but
    /// this keeps the zombie test explicit about not waiting).
    fn nix_kill(pid: i32) {
        let pid = Pid::from_raw(pid).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    }

    #[test]
    fn start_time_mismatch_is_unprovable() {
        // With a pidfd the start time is not read again: the pidfd and the start time are
        // captured together at accept and the pidfd alone proves the process is the same.
        let (pid, uid, gid) = me();
        let real = process_start_time(pid).unwrap();
        // Without a pidfd (pre-5.3 kernels) the start time alone must catch it.
        let peer = PeerInfo::new(
            Some(pid),
            uid,
            gid,
            Capture::Live {
                pidfd: None,
                start_time: real + 1,
            },
        );
        let res = Attestor::new(0).attest(&peer);
        assert!(matches!(res, Err(AttestError::Unprovable(_))), "{res:?}");
    }

    #[test]
    fn credential_mismatch_is_unprovable() {
        let (pid, uid, gid) = me();
        let res = Attestor::new(0).attest(&PeerInfo::from_pid(pid, uid.wrapping_add(1), gid));
        assert!(matches!(res, Err(AttestError::Unprovable(_))), "{res:?}");
        let res = Attestor::new(0).attest(&PeerInfo::from_pid(pid, uid, gid.wrapping_add(1)));
        assert!(matches!(res, Err(AttestError::Unprovable(_))), "{res:?}");
    }

    #[test]
    fn digest_is_cached_across_attestations() {
        let (pid, uid, gid) = me();
        let attestor = Attestor::new(u64::MAX);
        let peer = PeerInfo::from_pid(pid, uid, gid);
        let a = attestor.attest(&peer).unwrap();
        let b = attestor.attest(&peer).unwrap();
        assert!(a.exe_sha256.is_some());
        assert_eq!(a, b);
        assert_eq!(attestor.hashes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn cached_only_attestation_never_hashes() {
        let (pid, uid, gid) = me();
        let attestor = Attestor::new(u64::MAX);
        let peer = PeerInfo::from_pid(pid, uid, gid);
        assert!(
            attestor.attest_cached(&peer).is_none(),
            "digest not cached yet: must defer to a blocking attest"
        );
        assert_eq!(attestor.hashes.load(Ordering::Relaxed), 0);
        let full = attestor.attest(&peer).unwrap();
        let quick = attestor
            .attest_cached(&peer)
            .expect("digest cached")
            .unwrap();
        assert_eq!(full, quick);
        assert_eq!(attestor.hashes.load(Ordering::Relaxed), 1);
        // Too large to hash at all: once the names are cached, it attests inline.
        let small = Attestor::new(1);
        assert!(small.attest_cached(&peer).is_none(), "names not cached yet");
        small.attest(&peer).unwrap();
        let att = small
            .attest_cached(&peer)
            .expect("nothing left that blocks")
            .unwrap();
        assert_eq!(att.exe_sha256, None);
        assert_eq!(small.hashes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn size_limit_skips_digest() {
        let (pid, uid, gid) = me();
        let attestor = Attestor::new(1);
        let att = attestor.attest(&PeerInfo::from_pid(pid, uid, gid)).unwrap();
        assert_eq!(att.exe_sha256, None);
        assert!(!att.selectors.iter().any(|s| s.starts_with("unix:sha256:")));
        assert!(att.exe_path.is_some());
        assert_eq!(attestor.hashes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn digest_cache_keys_on_file_identity_not_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let link = dir.path().join("link");
        let b = dir.path().join("b");
        std::fs::write(&a, b"first contents").unwrap();
        std::fs::hard_link(&a, &link).unwrap();
        std::fs::write(&b, b"first contents").unwrap();
        let attestor = Attestor::new(u64::MAX);
        let digest = |p: &std::path::Path| {
            attestor
                .digest_file(&File::open(p).unwrap(), Blocking::Allowed)
                .unwrap()
                .expect("blocking allowed")
        };

        let expected = sha256_hex(b"first contents");
        assert_eq!(digest(&a).as_deref(), Some(expected.as_str()));
        // Same inode under another name: served from the cache.
        assert_eq!(digest(&link).as_deref(), Some(expected.as_str()));
        assert_eq!(attestor.hashes.load(Ordering::Relaxed), 1);
        // Different inode with identical bytes: hashed on its own.
        assert_eq!(digest(&b).as_deref(), Some(expected.as_str()));
        assert_eq!(attestor.hashes.load(Ordering::Relaxed), 2);

        // Replacing the file at the same path must not serve the old digest.
        std::fs::remove_file(&a).unwrap();
        std::fs::write(&a, b"replaced").unwrap();
        assert_eq!(digest(&a), Some(sha256_hex(b"replaced")));
        // Rewriting the same inode in place changes size/mtime: re-hashed.
        std::fs::write(&link, b"rewritten in place!").unwrap();
        assert_eq!(digest(&link), Some(sha256_hex(b"rewritten in place!")));
        assert_eq!(attestor.hashes.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn digest_cache_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let attestor = Attestor::new(u64::MAX);
        for i in 0..DIGEST_CACHE_CAPACITY + 5 {
            let p = dir.path().join(i.to_string());
            std::fs::write(&p, i.to_string()).unwrap();
            attestor
                .digest_file(&File::open(&p).unwrap(), Blocking::Allowed)
                .unwrap();
        }
        assert!(attestor.lock_cache().len() <= DIGEST_CACHE_CAPACITY);
    }

    #[test]
    fn deleted_executable_still_hashed() {
        let (_, uid, gid) = me();
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("sleepy");
        let sleep = which_sleep();
        std::fs::copy(&sleep, &copy).unwrap();
        let expected = sha256_hex(&std::fs::read(&copy).unwrap());
        // Another test thread forking while `copy` was open for writing can
        // hold a writable fd briefly (ETXTBSY); retry a few times.
        let mut child = (0..50)
            .find_map(|_| match Command::new(&copy).arg("30").spawn() {
                Ok(c) => Some(c),
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                }
            })
            .expect("spawn copied sleep");
        let peer = PeerInfo::from_pid(child.id() as i32, uid, gid);
        std::fs::remove_file(&copy).unwrap();
        let res = Attestor::new(u64::MAX).attest(&peer);
        child.kill().unwrap();
        child.wait().unwrap();
        let att = res.unwrap();
        let want_path = format!("{} (deleted)", copy.to_str().unwrap());
        assert_eq!(att.exe_path.as_deref(), Some(want_path.as_str()));
        assert_eq!(att.exe_sha256.as_deref(), Some(expected.as_str()));
        assert!(att.selectors.contains(&format!("unix:path:{want_path}")));
    }

    fn which_sleep() -> std::path::PathBuf {
        ["/bin/sleep", "/usr/bin/sleep"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
            .expect("sleep binary")
    }

    #[test]
    fn a_connection_s_unchanged_facts_reuse_its_selectors() {
        let (pid, uid, gid) = me();
        let peer = PeerInfo::from_pid(pid, uid, gid);
        let attestor = Attestor::new(u64::MAX);
        let first = attestor.attest(&peer).unwrap();
        let again = attestor.attest(&peer).unwrap();
        assert_eq!(first, again);
        // The same text, not a copy: built once, reused while the facts read are the same.
        let text = |a: &Attestation| a.selectors.iter().map(|s| s.as_ptr()).collect::<Vec<_>>();
        assert_eq!(text(&first), text(&again));
        // Another connection of the same process builds its own.
        let other = attestor.attest(&PeerInfo::from_pid(pid, uid, gid)).unwrap();
        assert_eq!(other.selectors, first.selectors);
        assert_ne!(text(&other), text(&first));
    }

    /// The selectors remembered for a connection are never served once its process has exec'd
    /// another program: every fact is read again on every attestation.
    #[test]
    fn a_connection_s_process_that_execs_is_attested_anew() {
        use std::io::Write;
        let (_, uid, gid) = me();
        let sleep = which_sleep();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("read go; exec {} 30", sleep.display()))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let peer = PeerInfo::from_pid(pid, uid, gid);
        let attestor = Attestor::new(u64::MAX);
        let shell = attestor.attest(&peer).unwrap();
        assert_eq!(attestor.attest(&peer).unwrap(), shell);
        let sleep_path = std::fs::canonicalize(&sleep).unwrap();
        let sleep_path = sleep_path.to_str().unwrap();
        assert_ne!(shell.exe_path.as_deref(), Some(sleep_path));

        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let after = loop {
            let att = attestor.attest(&peer).unwrap();
            if att.exe_path.as_deref() == Some(sleep_path) || Instant::now() > deadline {
                break att;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let digest = sha256_hex(&std::fs::read(sleep_path).unwrap());
        assert_eq!(after.exe_path.as_deref(), Some(sleep_path), "exec seen");
        assert!(after.selectors.contains(&format!("unix:path:{sleep_path}")));
        assert!(after.selectors.contains(&format!("unix:sha256:{digest}")));
        assert!(!after
            .selectors
            .contains(&format!("unix:path:{}", shell.exe_path.as_deref().unwrap())));
        assert_eq!((after.pid, after.start_time), (shell.pid, shell.start_time));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn attestor_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Attestor>();
        check::<PeerInfo>();
    }
}
