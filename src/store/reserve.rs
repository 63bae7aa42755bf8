//! Room for ends that the database cannot take: a small file of fixed slots, written in full
//! when the store opens, so that recording an end later overwrites blocks the filesystem has
//! already given us and needs no new space.
//!
//! A revocation must never be undone by a restart, and a full disk is exactly when the database
//! cannot commit. The store writes such an end here instead (one slot, then `fdatasync`); loading
//! applies every slot over the database's copy, and the slot is cleared once the database holds
//! the end itself.
//!
//! The file (`<store>.ends`) is [`SLOTS`] slots of [`SLOT_BYTES`]. A slot is all zeros when free,
//! or:
//!
//! ```text
//! 0..4     magic "MFE1"
//! 4..36    lease ID (32 lowercase hex digits)
//! 36       state (1 revoked, 2 expired, 3 completed, 4 process_exited)
//! 37..45   ended_at, seconds since the epoch (u64 little-endian)
//! 45..49   ended_at, nanoseconds (u32 little-endian)
//! 49..53   ended_by uid   53..57 gid   57..61 pid (0: none)
//! 61       end reason length (at most 51 bytes; a longer reason is cut at a char boundary)
//! 62..113  end reason (UTF-8)
//! 113..120 zero
//! 120..128 the first 8 bytes of SHA-256 over bytes 0..120
//! ```
//!
//! A slot that fails its checksum (a write torn by a crash) is ignored: its end was never
//! acknowledged as durable. The residual limit: on a copy-on-write filesystem (btrfs, ZFS) an
//! overwrite needs new blocks too, so there the reserve only helps while some space is left.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::lease::{LeaseId, LeaseState, Principal};

/// Ends the reserve holds at once: more than a full disk should ever have to wait on.
pub const SLOTS: usize = 256;
pub const SLOT_BYTES: usize = 128;

const MAGIC: &[u8; 4] = b"MFE1";
const REASON_MAX: usize = 51;

/// An end as the reserve keeps it: enough to end the lease again at load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservedEnd {
    pub id: LeaseId,
    pub state: LeaseState,
    pub ended_at: SystemTime,
    pub ended_by: Principal,
    pub end_reason: String,
}

#[derive(Debug)]
pub struct EndReserve {
    file: File,
    path: PathBuf,
    /// Which lease each slot holds.
    used: Vec<Option<LeaseId>>,
}

impl EndReserve {
    /// Opens the reserve at `path`, creating it (every slot written, then synced) if missing,
    /// and returns the ends it holds.
    pub fn open(path: &Path) -> io::Result<(EndReserve, Vec<ReservedEnd>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let size = (SLOTS * SLOT_BYTES) as u64;
        let len = file.metadata()?.len();
        if len > size {
            return Err(io::Error::other(format!(
                "{} bytes, more than the {size} of {SLOTS} slots: not an end reserve",
                len
            )));
        }
        if len < size {
            // Real zeros, not a hole: the blocks must exist before the disk fills up.
            let zeros = vec![0u8; size as usize - len as usize];
            file.write_all_at(&zeros, len)?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let mut bytes = vec![0u8; size as usize];
        file.read_exact_at(&mut bytes, 0)?;
        let mut used = vec![None; SLOTS];
        let mut ends = Vec::new();
        for (i, slot) in bytes.chunks_exact(SLOT_BYTES).enumerate() {
            if let Some(end) = decode(slot) {
                used[i] = Some(end.id.clone());
                ends.push(end);
            }
        }
        Ok((
            EndReserve {
                file,
                path: path.to_owned(),
                used,
            },
            ends,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The leases whose ends are held here.
    pub fn held(&self) -> impl Iterator<Item = &LeaseId> {
        self.used.iter().flatten()
    }

    /// Writes `end` into a slot (its own if it has one) and syncs: durable when it returns.
    pub fn put(&mut self, end: &ReservedEnd) -> io::Result<()> {
        let slot = self
            .used
            .iter()
            .position(|u| u.as_ref() == Some(&end.id))
            .or_else(|| self.used.iter().position(Option::is_none))
            .ok_or_else(|| io::Error::other(format!("all {SLOTS} slots are in use")))?;
        let bytes = encode(end)?;
        self.file.write_all_at(&bytes, (slot * SLOT_BYTES) as u64)?;
        self.file.sync_data()?;
        self.used[slot] = Some(end.id.clone());
        Ok(())
    }

    /// Frees the slot of a lease whose end the database now holds. Not synced: a slot left
    /// behind by a crash says what the database says.
    pub fn clear(&mut self, id: &LeaseId) -> io::Result<()> {
        for (i, u) in self.used.iter_mut().enumerate() {
            if u.as_ref() == Some(id) {
                self.file
                    .write_all_at(&[0u8; SLOT_BYTES], (i * SLOT_BYTES) as u64)?;
                *u = None;
            }
        }
        Ok(())
    }
}

fn state_code(state: LeaseState) -> Option<u8> {
    match state {
        LeaseState::Revoked => Some(1),
        LeaseState::Expired => Some(2),
        LeaseState::Completed => Some(3),
        LeaseState::ProcessExited => Some(4),
        LeaseState::ParentEnded => Some(5),
        LeaseState::Pending | LeaseState::Active => None,
    }
}

fn code_state(code: u8) -> Option<LeaseState> {
    Some(match code {
        1 => LeaseState::Revoked,
        2 => LeaseState::Expired,
        3 => LeaseState::Completed,
        4 => LeaseState::ProcessExited,
        5 => LeaseState::ParentEnded,
        _ => return None,
    })
}

fn checksum(bytes: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(bytes);
    digest[..8]
        .try_into()
        .expect("a SHA-256 digest has 8 bytes")
}

fn encode(end: &ReservedEnd) -> io::Result<[u8; SLOT_BYTES]> {
    let state = state_code(end.state)
        .ok_or_else(|| io::Error::other(format!("a {} lease has not ended", end.state)))?;
    let since = end
        .ended_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut reason = end.end_reason.as_str();
    if reason.len() > REASON_MAX {
        let mut cut = REASON_MAX;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason = &reason[..cut];
    }
    let mut b = [0u8; SLOT_BYTES];
    b[0..4].copy_from_slice(MAGIC);
    b[4..36].copy_from_slice(end.id.as_str().as_bytes());
    b[36] = state;
    b[37..45].copy_from_slice(&since.as_secs().to_le_bytes());
    b[45..49].copy_from_slice(&since.subsec_nanos().to_le_bytes());
    b[49..53].copy_from_slice(&end.ended_by.uid.to_le_bytes());
    b[53..57].copy_from_slice(&end.ended_by.gid.to_le_bytes());
    b[57..61].copy_from_slice(&end.ended_by.pid.unwrap_or(0).to_le_bytes());
    b[61] = reason.len() as u8;
    b[62..62 + reason.len()].copy_from_slice(reason.as_bytes());
    let sum = checksum(&b[..120]);
    b[120..].copy_from_slice(&sum);
    Ok(b)
}

fn decode(b: &[u8]) -> Option<ReservedEnd> {
    if &b[0..4] != MAGIC || b[120..] != checksum(&b[..120]) {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let id = LeaseId::parse(std::str::from_utf8(&b[4..36]).ok()?).ok()?;
    let state = code_state(b[36])?;
    let secs = u64::from_le_bytes(b[37..45].try_into().expect("8 bytes"));
    let nanos = u32_at(45);
    if nanos >= 1_000_000_000 {
        return None;
    }
    let ended_at = SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))?;
    let len = b[61] as usize;
    if len > REASON_MAX {
        return None;
    }
    let end_reason = std::str::from_utf8(&b[62..62 + len]).ok()?.to_owned();
    let pid = u32_at(57) as i32;
    Some(ReservedEnd {
        id,
        state,
        ended_at,
        ended_by: Principal {
            uid: u32_at(49),
            gid: u32_at(53),
            pid: (pid != 0).then_some(pid),
            user: None,
            // The reserve keeps a local caller's facts only: a remote caller's identity is
            // in the audit record of the end.
            spiffe_id: None,
        },
        end_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(reason: &str) -> ReservedEnd {
        ReservedEnd {
            id: LeaseId::random(),
            state: LeaseState::Revoked,
            ended_at: SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_789),
            ended_by: Principal {
                uid: 1000,
                gid: 100,
                pid: Some(4242),
                user: Some("alice".into()),
                spiffe_id: None,
            },
            end_reason: reason.into(),
        }
    }

    #[test]
    fn ends_survive_reopening_and_cleared_slots_are_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.ends");
        let (mut reserve, held) = EndReserve::open(&path).unwrap();
        assert!(held.is_empty());
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (SLOTS * SLOT_BYTES) as u64
        );
        let a = end("leaked key");
        let b = end("");
        reserve.put(&a).unwrap();
        reserve.put(&b).unwrap();
        reserve.clear(&b.id).unwrap();
        drop(reserve);
        let (reserve, held) = EndReserve::open(&path).unwrap();
        let mut want = a.clone();
        want.ended_by.user = None;
        assert_eq!(held, [want]);
        assert_eq!(reserve.held().collect::<Vec<_>>(), [&a.id]);
    }

    #[test]
    fn a_second_end_of_the_same_lease_takes_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.ends");
        let (mut reserve, _) = EndReserve::open(&path).unwrap();
        let mut a = end("first");
        reserve.put(&a).unwrap();
        a.end_reason = "second".into();
        reserve.put(&a).unwrap();
        let (_, held) = EndReserve::open(&path).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].end_reason, "second");
    }

    #[test]
    fn a_full_reserve_refuses_and_long_reasons_are_cut_at_a_char_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reserve, _) = EndReserve::open(&dir.path().join("r")).unwrap();
        for _ in 0..SLOTS {
            reserve.put(&end(&"é".repeat(40))).unwrap();
        }
        let err = reserve.put(&end("one too many")).unwrap_err();
        assert!(err.to_string().contains("slots are in use"), "{err}");
        let (_, held) = EndReserve::open(&dir.path().join("r")).unwrap();
        assert_eq!(held.len(), SLOTS);
        assert_eq!(held[0].end_reason, "é".repeat(25));
    }

    #[test]
    fn a_torn_or_foreign_slot_is_ignored_and_a_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.ends");
        let (mut reserve, _) = EndReserve::open(&path).unwrap();
        reserve.put(&end("kept")).unwrap();
        reserve.put(&end("torn")).unwrap();
        drop(reserve);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", (SLOT_BYTES + 70) as u64).unwrap();
        let (_, held) = EndReserve::open(&path).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].end_reason, "kept");
        file.set_len((SLOTS * SLOT_BYTES + 1) as u64).unwrap();
        let err = EndReserve::open(&path).unwrap_err();
        assert!(err.to_string().contains("not an end reserve"), "{err}");
    }

    #[test]
    fn only_ended_states_are_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reserve, _) = EndReserve::open(&dir.path().join("r")).unwrap();
        let mut active = end("");
        active.state = LeaseState::Active;
        assert!(reserve.put(&active).is_err());
        assert_eq!(reserve.held().count(), 0);
    }
}
