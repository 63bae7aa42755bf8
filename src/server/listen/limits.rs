//! How many connections a socket takes: in all, and from any one uid (by `SO_PEERCRED`, a
//! kernel fact), within the file descriptors the agent has. Some descriptors are kept back
//! from the workload socket, so that a flood of connections there leaves the admin socket
//! reachable and the work of existing connections (attestation opens `/proc` files) possible.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Descriptors the workload socket never takes: the admin socket's connections, and what
/// requests in flight open for a moment.
pub const FD_RESERVE: usize = 256;

/// Descriptors open before any connection: listeners, the store, the audit log, epoll, the
/// runtime. An estimate with room to spare.
const FD_BASE: usize = 64;

/// Connections open on every socket, for the descriptor budget.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// The most connections open at once since the last [`take_peak_connections`].
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Connections open now, on every socket.
pub fn open_connections() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// The most connections that were open at once since the last call (or start), and the
/// number open now; the peak starts again from now. A burst that opens and closes between two
/// calls still shows in the peak, where a sample of [`open_connections`] would miss it.
pub fn take_peak_connections() -> (usize, usize) {
    let now = OPEN.load(Ordering::Relaxed);
    (PEAK.swap(now, Ordering::Relaxed).max(now), now)
}

/// Why a connection was closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This uid has as many connections open as one uid may.
    PerUid,
    /// The socket has as many connections open as it takes.
    Total,
    /// Taking it would leave too few file descriptors for the rest of the agent.
    Descriptors,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PerUid => "per_uid",
            Refusal::Total => "total",
            Refusal::Descriptors => "descriptors",
        }
    }
}

/// The caps of one socket.
#[derive(Debug)]
pub struct ConnLimits {
    per_uid: usize,
    total: usize,
    /// Descriptors this socket leaves free: [`FD_RESERVE`] for the workload socket, a few
    /// for the admin socket.
    keep_free: usize,
    /// The agent's descriptor limit (the soft `RLIMIT_NOFILE`, raised at start).
    fd_limit: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

/// Holds a connection's place; dropping it (the connection closes) frees the place.
#[derive(Debug)]
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    uid: u32,
}

impl ConnLimits {
    pub fn new(per_uid: usize, total: usize, keep_free: usize) -> Arc<ConnLimits> {
        let fd_limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        Arc::new(ConnLimits {
            per_uid,
            total,
            keep_free,
            fd_limit,
            open: Mutex::new(Open::default()),
        })
    }

    /// The same caps under another descriptor limit (tests).
    #[cfg(test)]
    fn with_fd_limit(self: Arc<Self>, fd_limit: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            fd_limit,
            per_uid: self.per_uid,
            total: self.total,
            keep_free: self.keep_free,
            open: Mutex::new(Open::default()),
        })
    }

    /// Takes a place for a connection from `uid`, or says why there is none.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<ConnGuard, Refusal> {
        let mut open = self.open.lock().expect("connection limits poisoned");
        let mine = open.by_uid.get(&uid).copied().unwrap_or(0);
        if mine >= self.per_uid {
            return Err(Refusal::PerUid);
        }
        if open.total >= self.total {
            return Err(Refusal::Total);
        }
        let in_use = FD_BASE + OPEN.load(Ordering::Relaxed) + crate::attest::pinned_pidfds();
        if in_use + 1 + self.keep_free > self.fd_limit {
            return Err(Refusal::Descriptors);
        }
        open.total += 1;
        *open.by_uid.entry(uid).or_default() += 1;
        let now = OPEN.fetch_add(1, Ordering::Relaxed) + 1;
        PEAK.fetch_max(now, Ordering::Relaxed);
        Ok(ConnGuard {
            limits: self.clone(),
            uid,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
        let mut open = self.limits.open.lock().expect("connection limits poisoned");
        open.total -= 1;
        if let Some(n) = open.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                open.by_uid.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_uid_cannot_take_every_place_and_places_come_back() {
        let limits = ConnLimits::new(2, 3, 0);
        let a1 = limits.admit(1000).unwrap();
        let _a2 = limits.admit(1000).unwrap();
        assert_eq!(limits.admit(1000).unwrap_err(), Refusal::PerUid);
        let _b = limits.admit(1001).unwrap();
        assert_eq!(limits.admit(1002).unwrap_err(), Refusal::Total);
        drop(a1);
        let _a3 = limits.admit(1000).unwrap();
    }

    #[test]
    fn descriptors_are_kept_back() {
        let limits = ConnLimits::new(100, 100, 10).with_fd_limit(FD_BASE + 12);
        let mut held = Vec::new();
        while let Ok(g) = limits.admit(7) {
            held.push(g);
            assert!(held.len() <= 2, "took descriptors it should keep free");
        }
        assert_eq!(limits.admit(8).unwrap_err(), Refusal::Descriptors);
    }
}
