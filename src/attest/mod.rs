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
//!   different binary while the child keeps the socket. The listeners close a
//!   connection on the first bytes written by any other process than the one
//!   that connected (the kernel tags each chunk with its writer's pid:
//!   `crate::server::listen`), so what is attested is who is asking. Processes
//!   of the same uid can usually ptrace each other, which no socket check
//!   prevents: executable selectors separate workloads best across uids.
//!
//! # Selectors
//!
//! All selectors are `type:key:value` strings, sorted and deduplicated:
//! `unix:uid`, `unix:user`, `unix:gid`, `unix:group`,
//! `unix:supplementary_gid`, `unix:supplementary_group`, `unix:path`,
//! `unix:sha256` and `unix:pid:<pid>:<start_time>`. A fact that cannot be
//! read is omitted; since a lease requires all of its selectors to match,
//! omission can only ever deny, never grant.

mod exit;
pub mod k8s;
mod peer;
mod process;
mod unix;

use crate::selector::Selectors;

use std::io;

pub use exit::{pinned_pidfds, wait_exit, BoundProcess};
pub use peer::PeerInfo;
pub use process::{is_descendant, process_parent, process_start_time};
pub use unix::Attestor;

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
    /// What the facts above say, as selectors.
    pub selectors: Selectors,
}

#[cfg(test)]
mod test_support {
    pub(super) fn me() -> (i32, u32, u32) {
        (
            std::process::id() as i32,
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    }
}
