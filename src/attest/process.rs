//! What the kernel says about a process: its start time, credentials and executable from
//! `/proc`, whether it has exited (through its pidfd), and the names of its uid and gids.
//! Reading these is separate from trusting them; see the folder's PID-reuse guard.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use super::AttestError;

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

/// The parent PID and the start time of a process (fields 4 and 22 of `/proc/<pid>/stat`).
pub fn process_parent(pid: i32) -> io::Result<(i32, u64)> {
    let stat = read_proc(&format!("/proc/{pid}/stat"))?;
    parse_stat_parent(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed /proc/{pid}/stat"),
        )
    })
}

fn parse_stat_parent(stat: &str) -> Option<(i32, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let ppid = rest.split_ascii_whitespace().nth(4 - 3)?.parse().ok()?;
    Some((ppid, parse_stat_start_time(stat)?))
}

/// Whether the process `(pid, start)` is `(ancestor, ancestor_start)` itself or one of its
/// descendants, both alive now. The walk up the parent links checks each start time, so a
/// PID reused by another process never passes for the one bound, and a process whose parent
/// died (reparented to init or a subreaper) is no longer anyone's descendant.
pub fn is_descendant(pid: i32, start: u64, ancestor: i32, ancestor_start: u64) -> bool {
    /// Deeper process trees than this are not followed (refused, failing closed).
    const MAX_WALK: usize = 64;
    match process_start_time(ancestor) {
        Ok(s) if s == ancestor_start => {}
        _ => return false,
    }
    let (mut current, mut current_start) = (pid, start);
    for _ in 0..MAX_WALK {
        let Ok((ppid, actual_start)) = process_parent(current) else {
            return false;
        };
        if actual_start != current_start {
            return false;
        }
        if current == ancestor {
            return current_start == ancestor_start;
        }
        if ppid <= 0 {
            return false;
        }
        let Ok(parent_start) = process_start_time(ppid) else {
            return false;
        };
        // A parent starts before its child; a later start is a reused PID.
        if parent_start > current_start {
            return false;
        }
        (current, current_start) = (ppid, parent_start);
    }
    false
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct StatusCreds {
    pub(super) euid: u32,
    pub(super) egid: u32,
    pub(super) groups: Vec<u32>,
}

/// Parse the `Uid:`, `Gid:` and `Groups:` lines. `Uid:`/`Gid:` list real,
/// effective, saved and filesystem ids; access decisions (and SO_PEERCRED)
/// use the effective one, the second value. The three come near the top of a file of some
/// sixty lines, so the scan stops once it has all three.
pub(super) fn parse_status(status: &str) -> Option<StatusCreds> {
    let mut euid = None;
    let mut egid = None;
    let mut groups = None;
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
            groups = Some(
                v.split_ascii_whitespace()
                    .map(|s| s.parse().ok())
                    .collect::<Option<Vec<u32>>>()?,
            );
        }
        if euid.is_some() && egid.is_some() && groups.is_some() {
            break;
        }
    }
    Some(StatusCreds {
        euid: euid?,
        egid: egid?,
        groups: groups.unwrap_or_default(),
    })
}

/// Reads a `/proc` file into a string of its exact size (an attestation keeps some of them as
/// long as its stream is open). A `/proc` file reports size 0, so `fs::read_to_string` would
/// ask for its size (fstat, lseek) and then read 32 bytes and double from there: ten system
/// calls for `/proc/PID/status` instead of four, on every RPC. Here the first read goes
/// straight into 4 KiB of spare capacity (the files read here fit), which is not zeroed first,
/// and the second sees the end.
pub(super) fn read_proc(path: &str) -> io::Result<String> {
    const FITS: usize = 4096;
    let file = File::open(path)?;
    let mut text = Vec::with_capacity(FITS);
    // Through `take`, std reads without asking the file its size.
    (&file).take(u64::MAX).read_to_end(&mut text)?;
    text.shrink_to_fit();
    String::from_utf8(text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The executable path, or `None` if unreadable (EACCES when we lack ptrace
/// access, ENOENT for kernel threads) or not UTF-8. A lossy conversion could
/// make two different paths produce the same selector, so non-UTF-8 paths
/// are omitted. A trailing " (deleted)" is kept: it is what the kernel says.
pub(super) fn read_exe_path(pid: i32) -> Option<String> {
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
pub(super) fn pidfd_exited(pidfd: &OwnedFd) -> io::Result<bool> {
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

pub(super) fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

pub(super) fn group_name(gid: u32) -> Option<String> {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// `/proc/<pid>/...` vanishes (ENOENT) once the process is reaped, and open
/// files of an exited process fail with ESRCH.
pub(super) fn is_gone(e: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(e),
        Some(Errno::SRCH) | Some(Errno::NOENT)
    )
}

pub(super) fn proc_err(path: String, e: io::Error) -> AttestError {
    if is_gone(&e) {
        AttestError::ProcessGone
    } else {
        AttestError::Proc(path, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn finds_this_process_s_ancestry() {
        let me = std::process::id() as i32;
        let (parent, start) = process_parent(me).unwrap();
        assert_eq!(start, process_start_time(me).unwrap());
        let parent_start = process_start_time(parent).unwrap();
        assert!(is_descendant(me, start, me, start));
        assert!(is_descendant(me, start, parent, parent_start));
        assert!(!is_descendant(me, start, parent, parent_start + 1));
        assert!(!is_descendant(me, start + 1, parent, parent_start));
        assert!(!is_descendant(parent, parent_start, me, start));
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
}
