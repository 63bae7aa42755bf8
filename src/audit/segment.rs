//! The files of the log directory: segment naming, listing and opening, HEAD, and finding the end
//! of the chain (reading backwards from the end, never to EOF) so `open` can continue it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::record::{check_line, is_hex64};
use super::{io_error, AuditError, Head, HEAD_FILE, ZERO_HASH};

pub(super) fn open_segment(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_error(path, "open segment", &e))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, "fsync directory", &e))
}

pub(super) fn segment_name(index: u32) -> String {
    format!("audit-{index:08}.jsonl")
}

fn parse_segment_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let index: u32 = digits.parse().ok()?;
    // Only the canonical spelling counts, so a renamed file cannot masquerade as a segment.
    (index > 0 && segment_name(index) == name).then_some(index)
}

/// Segments sorted by number, plus "stray" files that look like (renamed) segments but are not
/// canonical segment names.
type Segments = Vec<(u32, PathBuf)>;

pub(super) fn list_segments(dir: &Path) -> io::Result<(Segments, Vec<PathBuf>)> {
    let mut segments = Vec::new();
    let mut strays = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            strays.push(entry.path());
            continue;
        };
        match parse_segment_name(name) {
            Some(index) => segments.push((index, entry.path())),
            None if name.starts_with("audit-") => strays.push(entry.path()),
            None => {}
        }
    }
    segments.sort();
    strays.sort();
    Ok((segments, strays))
}

/// `Ok(None)` if there is no HEAD; `Err(problem)` if it exists but cannot be used.
pub(super) fn read_head(dir: &Path) -> Result<Option<Head>, String> {
    let path = dir.join(HEAD_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read HEAD: {e}")),
    };
    let head: Head = serde_json::from_str(&text).map_err(|e| format!("HEAD is not valid: {e}"))?;
    if !is_hex64(&head.hash) {
        return Err("HEAD hash is not 64 lowercase hex digits".into());
    }
    Ok(Some(head))
}

/// Finds the end of the complete data in a file of (metadata) length `len` by reading backwards:
/// returns the length up to and including the last `\n`, and the last complete line (without `\n`).
pub(super) fn read_tail(file: &File, len: u64) -> io::Result<(u64, Option<Vec<u8>>)> {
    let mut window: u64 = 64 * 1024;
    loop {
        let size = window.min(len);
        let start = len - size;
        let mut buf = vec![0; size as usize];
        file.read_exact_at(&mut buf, start)?;
        match buf.iter().rposition(|&b| b == b'\n') {
            None if start == 0 => return Ok((0, None)),
            None => {}
            Some(nl) => {
                let complete = start + nl as u64 + 1;
                match buf[..nl].iter().rposition(|&b| b == b'\n') {
                    Some(p) => return Ok((complete, Some(buf[p + 1..nl].to_vec()))),
                    None if start == 0 => return Ok((complete, Some(buf[..nl].to_vec()))),
                    None => {}
                }
            }
        }
        // The last line is longer than the window: look further back.
        window = window.saturating_mul(2);
    }
}

/// The (seq, hash) the chain continues from: the last record of the newest non-empty segment, or
/// (0, zeros) for an empty log. Only that record is checked here; `verify` checks everything.
pub(super) fn last_record(segments: &[(u32, PathBuf)]) -> Result<(u64, String), AuditError> {
    for (pos, (_, path)) in segments.iter().enumerate().rev() {
        let file = File::open(path).map_err(|e| io_error(path, "open segment", &e))?;
        let len = file
            .metadata()
            .map_err(|e| io_error(path, "stat", &e))?
            .len();
        let (complete, line) =
            read_tail(&file, len).map_err(|e| io_error(path, "read tail", &e))?;
        // The newest segment's torn tail was truncated by `open`; an older one must be whole.
        if complete < len && pos + 1 != segments.len() {
            return Err(AuditError::Inconsistent(format!(
                "{}: sealed segment ends in an incomplete line",
                path.display()
            )));
        }
        let Some(line) = line else { continue };
        let line = String::from_utf8(line).map_err(|_| {
            AuditError::Inconsistent(format!("{}: last record is not UTF-8", path.display()))
        })?;
        let record = check_line(&line).map_err(|(seq, problem)| {
            AuditError::Inconsistent(format!(
                "{}: last record (seq {seq:?}): {problem}",
                path.display()
            ))
        })?;
        return Ok((record.seq, record.hash));
    }
    Ok((0, ZERO_HASH.to_owned()))
}
