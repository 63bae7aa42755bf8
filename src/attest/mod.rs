//! Workload attestation: turning a Unix-socket peer into a set of selectors.
//!
//! A workload is identified only by facts the kernel vouches for — the
//! `SO_PEERCRED` credentials of the connection and what `/proc` says about
//! the connecting process — never by anything the caller sends us.
//!
//! # PID-reuse guard
//!
//! `SO_PEERCRED` reports the pid of the process that called `connect()`. By
//! the time an RPC arrives on that connection the process may have exited and
//! the pid been handed to an unrelated process, so naively reading
//! `/proc/<pid>` at RPC time could attest the *wrong* process. We therefore:
//!
//! 1. **At accept** ([`PeerInfo::from_unix_stream`]): open a pidfd for the pid
//!    and read the process start time `T0` (field 22 of `/proc/<pid>/stat`)
//!    immediately. A pidfd refers to one specific process, never to whatever
//!    later reuses the number. If the process is already gone we remember
//!    that, and every attestation of this peer fails.
//! 2. **At attest** ([`Attestor::attest`]): read every fact from `/proc`
//!    first, and only *then* verify that the pidfd is not readable (a pidfd
//!    becomes readable when its process exits), or, without a pidfd, that the
//!    start time is still `T0`. While the process behind the pidfd is alive
//!    its pid cannot be reused, so a successful check after the reads proves
//!    every fact we read came from the connected process. Checking before the
//!    reads would leave a window in which the pid could be recycled mid-read.
//! 3. The effective uid/gid in `/proc/<pid>/status` must equal the
//!    `SO_PEERCRED` uid/gid captured at connect time. If they differ (e.g. the
//!    process exec'd a setuid binary or called `setuid`), we refuse rather
//!    than guess which identity the connection deserves.
//!
//! `ESRCH`/`ENOENT` while reading `/proc` means the process is gone.
//!
//! `pidfd_open(2)` needs Linux 5.3+. If it fails with `ENOSYS` (or `EPERM`,
//! which is what some seccomp profiles return for syscalls they do not know)
//! we fall back to the start-time check alone: a reused pid would need to
//! get the exact same start tick, which is very unlikely but not impossible
//! (clock ticks are typically 10 ms), so the pidfd is strongly preferred.
//!
//! ## Residual limits
//!
//! * On Linux 6.5+ the pidfd comes from `SO_PEERPIDFD`, which the kernel
//!   records at `connect()`, so it can only ever name the connecting process.
//!   On older kernels it is opened by pid at `accept()`: if the client exits
//!   and its pid is recycled in the short window between the two, we would
//!   capture the new process. Exploiting that requires cycling through the
//!   whole pid space within that window.
//! * `SO_PEERCRED` names the process that connected, not whoever holds the
//!   socket now: a process can connect, fork, and let the parent exec a
//!   different binary. Executable-based selectors (`unix:path`,
//!   `unix:sha256`) therefore only separate workloads that run under
//!   different uids; processes of the same uid can usually ptrace each other
//!   anyway.
//!
//! # Selectors
//!
//! All selectors are `type:key:value` strings, sorted and deduplicated:
//! `unix:uid`, `unix:user`, `unix:gid`, `unix:group`,
//! `unix:supplementary_gid`, `unix:supplementary_group`, `unix:path`,
//! `unix:sha256` and `unix:pid:<pid>:<start_time>`. A fact that cannot be
//! read is omitted; since a lease requires all of its selectors to match,
//! omission can only ever deny, never grant.

pub mod k8s;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::process::{pidfd_open, Pid, PidfdFlags};
use sha2::{Digest, Sha256};

/// Upper bound on cached digests; the cache is cleared when it fills up,
/// which is simpler than LRU and only costs a re-hash.
const DIGEST_CACHE_CAPACITY: usize = 1024;

/// Why attestation failed.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The peer credentials carried no pid (e.g. the peer is in another pid
    /// namespace that ours cannot see).
    #[error("peer credentials carry no pid")]
    NoPid,
    /// The connected process has exited.
    #[error("the connected process has exited")]
    ProcessGone,
    /// The facts cannot be proven to belong to the connected process.
    #[error("cannot prove facts belong to the connected process: {0}")]
    Unprovable(String),
    /// Reading a `/proc` file failed for a reason other than process exit.
    #[error("reading {0}: {1}")]
    Proc(String, io::Error),
}

/// Kernel facts captured at accept time for one connection.
///
/// Cheap to clone: the pidfd is shared behind an `Arc`.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    inner: Arc<PeerInner>,
}

#[derive(Debug)]
struct PeerInner {
    pid: Option<i32>,
    uid: u32,
    gid: u32,
    capture: Capture,
}

/// What we managed to pin down about the process at accept time.
#[derive(Debug)]
enum Capture {
    /// No pid to attest.
    NoPid,
    /// The process had already exited when we looked.
    Gone,
    /// Something else prevented capturing the process; attestation must fail.
    Failed(String),
    /// The process was alive. `pidfd` is `None` only when the kernel lacks
    /// pidfd support, in which case only the start time guards against reuse.
    Live {
        pidfd: Option<OwnedFd>,
        start_time: u64,
    },
}

impl PeerInfo {
    /// Capture the peer of a freshly accepted connection.
    ///
    /// Call this right after `accept()`: the shorter the delay, the smaller
    /// the window in which the connecting pid could be recycled. Never fails;
    /// problems are recorded and surface from [`Attestor::attest`].
    pub fn from_unix_stream(stream: &tokio::net::UnixStream) -> PeerInfo {
        match stream.peer_cred() {
            Ok(cred) => match cred.pid() {
                Some(pid) => {
                    // SO_PEERPIDFD (Linux 6.5+) names the very process that called
                    // connect(), so no pid recycled before accept can slip in. Older
                    // kernels answer ENOPROTOOPT and we open the pidfd by number.
                    // If the kernel says the process is gone, it is: falling back to
                    // the pid number then could capture a recycled pid.
                    let peer_pidfd =
                        nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd);
                    match peer_pidfd {
                        Ok(fd) => PeerInfo::capture(pid, cred.uid(), cred.gid(), Some(fd)),
                        Err(nix::errno::Errno::ESRCH) => {
                            PeerInfo::new(Some(pid), cred.uid(), cred.gid(), Capture::Gone)
                        }
                        Err(_) => PeerInfo::capture(pid, cred.uid(), cred.gid(), None),
                    }
                }
                None => PeerInfo::new(None, cred.uid(), cred.gid(), Capture::NoPid),
            },
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed");
                // u32::MAX is the kernel's "invalid id" ((uid_t)-1); it is only
                // a placeholder, since attestation of this peer always fails.
                PeerInfo::new(
                    None,
                    u32::MAX,
                    u32::MAX,
                    Capture::Failed(format!("SO_PEERCRED failed: {e}")),
                )
            }
        }
    }

    /// Capture the process `pid`, claimed to run with effective `uid`/`gid`.
    ///
    /// Opens the pidfd and reads the start time now, exactly like
    /// [`PeerInfo::from_unix_stream`]. A non-positive pid is treated as "no pid".
    pub fn from_pid(pid: i32, uid: u32, gid: u32) -> PeerInfo {
        PeerInfo::capture(pid, uid, gid, None)
    }

    fn capture(pid: i32, uid: u32, gid: u32, peer_pidfd: Option<OwnedFd>) -> PeerInfo {
        let Some(raw) = Pid::from_raw(pid).filter(|_| pid > 0) else {
            return PeerInfo::new(None, uid, gid, Capture::NoPid);
        };
        // pidfd first: once it is open it pins the process, so the start time
        // read next is guaranteed to describe the same process if the pidfd
        // is still unreadable at attest time.
        let opened = match peer_pidfd {
            Some(fd) => Ok(fd),
            None => pidfd_open(raw, PidfdFlags::empty()),
        };
        let pidfd = match opened {
            Ok(fd) => Some(fd),
            Err(Errno::NOSYS) | Err(Errno::PERM) => {
                tracing::debug!(pid, "pidfd_open unavailable; relying on start time only");
                None
            }
            Err(Errno::SRCH) => return PeerInfo::new(Some(pid), uid, gid, Capture::Gone),
            Err(e) => {
                return PeerInfo::new(
                    Some(pid),
                    uid,
                    gid,
                    Capture::Failed(format!("pidfd_open({pid}) failed: {e}")),
                )
            }
        };
        let capture = match process_start_time(pid) {
            Ok(start_time) => Capture::Live { pidfd, start_time },
            Err(e) if is_gone(&e) => Capture::Gone,
            Err(e) => Capture::Failed(format!("reading start time of {pid}: {e}")),
        };
        PeerInfo::new(Some(pid), uid, gid, capture)
    }

    fn new(pid: Option<i32>, uid: u32, gid: u32, capture: Capture) -> PeerInfo {
        PeerInfo {
            inner: Arc::new(PeerInner {
                pid,
                uid,
                gid,
                capture,
            }),
        }
    }

    /// The connecting pid, if the kernel reported one.
    pub fn pid(&self) -> Option<i32> {
        self.inner.pid
    }

    /// Effective uid of the peer at connect time.
    pub fn uid(&self) -> u32 {
        self.inner.uid
    }

    /// Effective gid of the peer at connect time.
    pub fn gid(&self) -> u32 {
        self.inner.gid
    }
}

/// The attested identity of a connected process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attestation {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub start_time: u64,
    /// Executable path (from `/proc/<pid>/exe`), if readable.
    pub exe_path: Option<String>,
    /// Lowercase hex SHA-256 of the executable, if computed.
    pub exe_sha256: Option<String>,
    /// The text of `/proc/<pid>/cgroup`, read with the other facts (for pod attestation).
    pub cgroup: Option<String>,
    /// Sorted, deduplicated selectors, each formatted `type:key:value`.
    pub selectors: Vec<String>,
}

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
        let mut selectors = BTreeSet::new();
        selectors.insert(format!("unix:uid:{}", creds.euid));
        if let Some(user) = user {
            selectors.insert(format!("unix:user:{user}"));
        }
        selectors.insert(format!("unix:gid:{}", creds.egid));
        if let Some(group) = group {
            selectors.insert(format!("unix:group:{group}"));
        }
        for gid in &creds.groups {
            selectors.insert(format!("unix:supplementary_gid:{gid}"));
            let Some(group) = name(NameKey::Group(*gid)) else {
                return Ok(None);
            };
            if let Some(group) = group {
                selectors.insert(format!("unix:supplementary_group:{group}"));
            }
        }
        if let Some(path) = &exe_path {
            selectors.insert(format!("unix:path:{path}"));
        }
        if let Some(digest) = &exe_sha256 {
            selectors.insert(format!("unix:sha256:{digest}"));
        }
        selectors.insert(format!("unix:pid:{pid}:{start_time}"));

        Ok(Some(Attestation {
            pid,
            uid: creds.euid,
            gid: creds.egid,
            start_time,
            exe_path,
            exe_sha256,
            cgroup,
            selectors: selectors.into_iter().collect(),
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

/// Resolves when process `pid`, started at `start_time`, has exited — at once if it is not
/// running now (or a different process holds the pid). A pidfd becomes readable when its
/// process exits, so there is no polling and no confusion with a recycled pid.
pub async fn wait_exit(pid: i32, start_time: u64) {
    let Some(raw) = Pid::from_raw(pid).filter(|_| pid > 0) else {
        return;
    };
    let Ok(fd) = pidfd_open(raw, PidfdFlags::empty()) else {
        return;
    };
    // The pidfd was opened first, so the start time read now describes the process it pins.
    if process_start_time(pid).ok() != Some(start_time) {
        return;
    }
    match exit_watcher() {
        Ok(watcher) => watcher.wait(fd).await,
        Err(e) => {
            tracing::warn!(pid, error = %e, "cannot watch pidfds; polling the process instead");
            while process_start_time(pid).ok() == Some(start_time) {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    }
}

/// One thread waits on an epoll set of every watched pidfd and wakes the waiter of each
/// process that exits. epoll_ctl is thread-safe, so registering needs no hand-off to it.
struct ExitWatcher {
    epoll: OwnedFd,
    waiters: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<()>>>,
    next: AtomicU64,
}

fn exit_watcher() -> Result<&'static ExitWatcher, String> {
    static WATCHER: std::sync::OnceLock<Result<&'static ExitWatcher, String>> =
        std::sync::OnceLock::new();
    WATCHER.get_or_init(ExitWatcher::start).clone()
}

impl ExitWatcher {
    /// Creates the epoll set and its thread; both live as long as the process.
    fn start() -> Result<&'static ExitWatcher, String> {
        let epoll = rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC)
            .map_err(|e| format!("epoll_create: {e}"))?;
        let watcher: &'static ExitWatcher = Box::leak(Box::new(ExitWatcher {
            epoll,
            waiters: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }));
        std::thread::Builder::new()
            .name("mayfly-exit-watch".into())
            .spawn(move || watcher.run())
            .map_err(|e| format!("spawning the exit watcher: {e}"))?;
        Ok(watcher)
    }

    async fn wait(&self, pidfd: OwnedFd) {
        use rustix::event::epoll;
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Waiter first, then the epoll registration: an exit that fires at once finds it.
        self.waiters
            .lock()
            .expect("exit watcher poisoned")
            .insert(key, tx);
        let _guard = Deregister {
            watcher: self,
            key,
            pidfd: &pidfd,
        };
        let added = epoll::add(
            &self.epoll,
            &pidfd,
            epoll::EventData::new_u64(key),
            epoll::EventFlags::IN | epoll::EventFlags::ONESHOT,
        );
        if added.is_ok() {
            let _ = rx.await;
        }
    }

    fn run(&self) {
        let mut events = Vec::with_capacity(64);
        loop {
            events.clear();
            if let Err(e) = rustix::event::epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                None,
            ) {
                if e != Errno::INTR {
                    tracing::error!(error = %e, "exit watcher stopped");
                    return;
                }
                continue;
            }
            for event in &events {
                self.fire(event.data.u64());
            }
        }
    }

    fn fire(&self, key: u64) {
        let waiter = self
            .waiters
            .lock()
            .expect("exit watcher poisoned")
            .remove(&key);
        if let Some(tx) = waiter {
            let _ = tx.send(());
        }
    }
}

/// Unregisters a waiter when it finishes or goes away early (its lease ended another way).
struct Deregister<'a> {
    watcher: &'a ExitWatcher,
    key: u64,
    pidfd: &'a OwnedFd,
}

impl Drop for Deregister<'_> {
    fn drop(&mut self) {
        self.watcher
            .waiters
            .lock()
            .expect("exit watcher poisoned")
            .remove(&self.key);
        let _ = rustix::event::epoll::delete(&self.watcher.epoll, self.pidfd);
    }
}

/// Start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot) of a
/// live process.
pub fn process_start_time(pid: i32) -> io::Result<u64> {
    let stat = read_proc(&format!("/proc/{pid}/stat"))?;
    parse_stat_start_time(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed /proc/{pid}/stat"),
        )
    })
}

/// Extract field 22 (starttime) from the text of `/proc/<pid>/stat`.
///
/// Field 2 is the command name in parentheses and may itself contain spaces
/// and `)` (a process can name itself anything), so fields are counted from
/// the *last* `)`, after which no field can contain one.
fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state); field 22 is 19 fields further on.
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

/// Credentials parsed from `/proc/<pid>/status`.
#[derive(Debug, PartialEq, Eq)]
struct StatusCreds {
    euid: u32,
    egid: u32,
    groups: Vec<u32>,
}

/// Parse the `Uid:`, `Gid:` and `Groups:` lines. `Uid:`/`Gid:` list real,
/// effective, saved and filesystem ids; access decisions (and SO_PEERCRED)
/// use the effective one, the second value.
fn parse_status(status: &str) -> Option<StatusCreds> {
    let mut euid = None;
    let mut egid = None;
    let mut groups = Vec::new();
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            euid = v
                .split_ascii_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok());
        } else if let Some(v) = line.strip_prefix("Gid:") {
            egid = v
                .split_ascii_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok());
        } else if let Some(v) = line.strip_prefix("Groups:") {
            // An unparsable entry would silently drop a group; refuse instead.
            groups = v
                .split_ascii_whitespace()
                .map(|s| s.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
        }
    }
    Some(StatusCreds {
        euid: euid?,
        egid: egid?,
        groups,
    })
}

/// Reads a `/proc` file in one read when it fits 4 KiB (the files read here do), into a string
/// of its exact size (an attestation keeps some of them as long as its stream is open). A
/// `/proc` file reports size 0, so `fs::read_to_string` starts with a 32-byte read and doubles
/// from there: ten system calls for `/proc/PID/status` instead of four, on every RPC.
fn read_proc(path: &str) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut chunk = [0u8; 4096];
    let mut text = Vec::new();
    loop {
        match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The executable path, or `None` if unreadable (EACCES when we lack ptrace
/// access, ENOENT for kernel threads) or not UTF-8. A lossy conversion could
/// make two different paths produce the same selector, so non-UTF-8 paths
/// are omitted. A trailing " (deleted)" is kept: it is what the kernel says.
fn read_exe_path(pid: i32) -> Option<String> {
    match std::fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(p) => match p.into_os_string().into_string() {
            Ok(s) => Some(s),
            Err(_) => {
                tracing::debug!(pid, "executable path is not UTF-8; no unix:path selector");
                None
            }
        },
        Err(e) => {
            tracing::debug!(pid, error = %e, "cannot read executable path; no unix:path selector");
            None
        }
    }
}

/// Whether the process behind `pidfd` has exited: a pidfd polls readable
/// once its process terminates. Any reported event (including HUP/ERR) is
/// treated as exited, to fail closed.
fn pidfd_exited(pidfd: &OwnedFd) -> io::Result<bool> {
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&zero)) {
            Ok(_) => return Ok(!fds[0].revents().is_empty()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

fn group_name(gid: u32) -> Option<String> {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// `/proc/<pid>/...` vanishes (ENOENT) once the process is reaped, and open
/// files of an exited process fail with ESRCH.
fn is_gone(e: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(e),
        Some(Errno::SRCH) | Some(Errno::NOENT)
    )
}

fn proc_err(path: String, e: io::Error) -> AttestError {
    if is_gone(&e) {
        AttestError::ProcessGone
    } else {
        AttestError::Proc(path, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    fn me() -> (i32, u32, u32) {
        (
            std::process::id() as i32,
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    }

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
    fn read_proc_reads_whole_files_of_any_size() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0, 1, 4095, 4096, 4097, 20_000] {
            let path = dir.path().join(format!("f{size}"));
            let text: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            std::fs::write(&path, &text).unwrap();
            assert_eq!(
                read_proc(path.to_str().unwrap()).unwrap(),
                text,
                "{size} bytes"
            );
        }
        let me = read_proc(&format!("/proc/{}/status", std::process::id())).unwrap();
        assert!(me.contains("\nUid:\t") && me.ends_with('\n'), "{me}");
        assert_eq!(me.capacity(), me.len(), "no slack kept");
        let missing = dir.path().join("missing");
        let err = read_proc(missing.to_str().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
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
            assert!(s.contains(&"unix:user:root".to_string()));
        }
        let mut sorted = s.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(&sorted, s, "selectors must be sorted and deduplicated");
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

    #[tokio::test]
    async fn connected_pair_reports_own_credentials() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let peer = PeerInfo::from_unix_stream(&a);
        let (pid, uid, gid) = me();
        assert_eq!((peer.pid(), peer.uid(), peer.gid()), (Some(pid), uid, gid));
        let p2 = peer.clone();
        let att = tokio::task::spawn_blocking(move || Attestor::new(0).attest(&p2))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(att.pid, pid);
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
    fn missing_pid_is_rejected() {
        let (_, uid, gid) = me();
        let peer = PeerInfo::from_pid(0, uid, gid);
        assert_eq!(peer.pid(), None);
        assert!(matches!(
            Attestor::new(0).attest(&peer),
            Err(AttestError::NoPid)
        ));
    }

    #[test]
    fn parses_stat_with_hostile_comm() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21";
        for comm in ["(sleep)", "(a b c)", "(evil) S 1 2 3)", "()) ) ))", "(x\n)"] {
            let stat = format!("1234 {comm} {tail}");
            assert_eq!(parse_stat_start_time(&stat), Some(424242), "{comm}");
        }
        assert_eq!(parse_stat_start_time("1234 (x) S 1 2"), None);
        assert_eq!(parse_stat_start_time("no paren at all"), None);
        assert_eq!(
            parse_stat_start_time("1 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 nan"),
            None
        );
    }

    #[test]
    fn parses_status_effective_ids() {
        let status =
            "Name:\tx\nUid:\t1000\t2000\t3000\t4000\nGid:\t10\t20\t30\t40\nGroups:\t5 6 7 \n";
        assert_eq!(
            parse_status(status),
            Some(StatusCreds {
                euid: 2000,
                egid: 20,
                groups: vec![5, 6, 7]
            })
        );
        let empty_groups = "Uid:\t1\t1\t1\t1\nGid:\t2\t2\t2\t2\nGroups:\t\n";
        assert_eq!(
            parse_status(empty_groups).unwrap().groups,
            Vec::<u32>::new()
        );
        assert_eq!(parse_status("Gid:\t2\t2\t2\t2\n"), None);
        assert_eq!(
            parse_status("Uid:\t1\t1\t1\t1\nGid:\t2\t2\t2\t2\nGroups:\t1 x\n"),
            None
        );
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
    fn attestor_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Attestor>();
        check::<PeerInfo>();
    }

    #[tokio::test]
    async fn wait_exit_follows_the_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = process_start_time(pid).unwrap();
        let waiting = tokio::spawn(wait_exit(pid, start));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "resolved while the process runs");
        child.kill().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("exit seen")
            .unwrap();
        child.wait().unwrap();
        // Gone (or another process under the pid): resolves at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), wait_exit(pid, start))
            .await
            .expect("dead process resolves at once");
        let me = std::process::id() as i32;
        let wrong_start = process_start_time(me).unwrap() + 1;
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            wait_exit(me, wrong_start),
        )
        .await
        .expect("a different start time is another process");
    }

    #[tokio::test]
    async fn abandoned_exit_waits_are_unregistered() {
        let me = std::process::id() as i32;
        let w = ExitWatcher::start().unwrap();
        let fd = pidfd_open(Pid::from_raw(me).unwrap(), PidfdFlags::empty()).unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), w.wait(fd)).await;
        assert!(r.is_err(), "we are alive");
        assert!(w.waiters.lock().unwrap().is_empty());
    }
}
