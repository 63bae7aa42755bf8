//! The peer of an accepted connection, pinned down at accept: its credentials and a pidfd
//! (or its start time), so that a later attestation can prove it reads the same process.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use rustix::io::Errno;
use rustix::process::{pidfd_open, Pid, PidfdFlags};

use super::process::{is_gone, process_start_time};
use super::unix::Remembered;

/// Kernel facts captured at accept time for one connection.
///
/// Cheap to clone: the pidfd is shared behind an `Arc`.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub(super) inner: Arc<PeerInner>,
}

#[derive(Debug)]
pub(super) struct PeerInner {
    pub(super) pid: Option<i32>,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) capture: Capture,
    /// The facts the last attestation on this connection read, and the selectors it built.
    pub(super) last: Mutex<Option<Remembered>>,
}

/// What we managed to pin down about the process at accept time.
#[derive(Debug)]
pub(super) enum Capture {
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
    /// problems are recorded and surface from [`Attestor::attest`](super::Attestor::attest).
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

    pub(super) fn new(pid: Option<i32>, uid: u32, gid: u32, capture: Capture) -> PeerInfo {
        PeerInfo {
            inner: Arc::new(PeerInner {
                pid,
                uid,
                gid,
                capture,
                last: Mutex::new(None),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::test_support::me;
    use crate::attest::{AttestError, Attestor};

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
    fn missing_pid_is_rejected() {
        let (_, uid, gid) = me();
        let peer = PeerInfo::from_pid(0, uid, gid);
        assert_eq!(peer.pid(), None);
        assert!(matches!(
            Attestor::new(0).attest(&peer),
            Err(AttestError::NoPid)
        ));
    }
}
