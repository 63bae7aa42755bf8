//! Append-only, tamper-evident, fail-closed audit log.
//!
//! The agent records every security-relevant event (for example `svid_issued`) here and hands out a
//! credential only after [`AuditLog::append`] has returned `Ok`, i.e. after the record has been written
//! *and* fsync'd. If the log cannot be written, appends fail and issuance fails closed: an unaudited
//! credential is never handed out.
//!
//! # On-disk format
//!
//! The log lives in one directory (created with mode 0700; files are created with mode 0600):
//!
//! * `audit-00000001.jsonl`, `audit-00000002.jsonl`, … — segments, numbered contiguously from 1.
//!   When the current segment has reached `max_segment_bytes`, the next batch of records starts a new
//!   segment (so a segment may exceed the limit by at most one batch). The hash chain continues across
//!   segments.
//! * `HEAD` — `{"seq":N,"hash":"<64 hex>"}`, the last record known to be durable. It is rewritten
//!   (temp file + rename, not fsync'd) after every batch, so that deleting records from the *end* of the
//!   chain — which leaves the remaining chain perfectly valid — is still detected. After a crash HEAD may
//!   lag behind the chain, never run ahead of it (it is only written after the segment fsync).
//!
//! Each segment holds one JSON object per line (`\n`-terminated), in serde_json's compact form with the
//! keys sorted:
//!
//! ```text
//! {"event":"svid_issued",<fields...>,"hash":"<64 hex>","prev":"<64 hex>","seq":N,"time":"2024-05-01T12:00:00.123456789Z"}
//! ```
//!
//! * `seq` starts at 1 and increases by exactly 1 from record to record, across segments.
//! * `time` is RFC 3339 UTC with nanoseconds, taken when the record is sequenced by the writer.
//! * `prev` is the `hash` of the previous record; for seq 1 it is 64 zeros.
//! * `hash` is the lowercase hex SHA-256 of the record serialized *without* the `hash` key (compact
//!   serde_json: no whitespace, keys sorted, non-ASCII and `/` not escaped). Equivalently: the exact
//!   line with its top-level `,"hash":"…"` member cut out.
//! * The caller's fields are merged in as top-level keys; `event`, `seq`, `time`, `prev` and `hash`
//!   are reserved.
//!
//! So an edited record fails its own hash, and a deleted, inserted (even with a correct own hash),
//! reordered or moved record breaks `seq` continuity and the `prev` link; a deleted tail is caught by
//! `HEAD`. [`verify`] checks all of this and reports the first bad record. The chain is not keyed, so
//! it detects tampering by anyone who does not rewrite the whole chain from the point of the edit
//! onwards (including HEAD); ship the log (or periodic `HEAD` values) elsewhere to cover that.
//!
//! # Durability and group commit
//!
//! A dedicated OS thread owns the segment file. Concurrent appends are queued to it; it takes
//! everything queued (up to [`MAX_BATCH`] records), writes the batch with one `write_all`, calls
//! `sync_data` once and only then answers all of them. If the write or sync fails, every request of
//! that batch gets an error, the segment is truncated back to its length before the batch (so the
//! chain never contains unacknowledged or partial records) and later batches are tried again. If even
//! that truncation fails the log is marked failed and refuses all further appends, because writing after
//! an unknown amount of garbage would break the chain.
//!
//! A single process is assumed to own the directory (the agent runs once per host); two writers on the
//! same directory would interleave and break the chain, which [`verify`] would then report.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

/// `prev` of the very first record.
const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Keys the log itself writes; callers may not supply them.
const RESERVED: [&str; 5] = ["event", "hash", "prev", "seq", "time"];
/// Upper bound on records per write+fsync, so one huge burst does not build an unbounded buffer.
pub const MAX_BATCH: usize = 4096;
const HEAD_FILE: &str = "HEAD";
const HEAD_TMP: &str = "HEAD.tmp";

/// Options for [`AuditLog::open`].
#[derive(Clone, Debug)]
pub struct AuditOptions {
    /// Start a new segment once the current one has reached this size.
    pub max_segment_bytes: u64,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            max_segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Proof that a record is durable.
#[derive(Clone, Debug)]
pub struct Receipt {
    pub seq: u64,
    pub hash: String,
}

/// Why an append (or open) failed. `Clone` because one failure is reported to every request of a batch.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuditError {
    /// An I/O error; the message names the path involved.
    #[error("audit log I/O error: {0}")]
    Io(String),
    /// The caller tried to set one of the envelope keys (`event`, `hash`, `prev`, `seq`, `time`).
    #[error("audit field name {0:?} is reserved")]
    ReservedField(String),
    /// [`AuditLog::close`] was called (or the writer thread is gone).
    #[error("audit log is closed")]
    Closed,
    /// A failed batch could not be rolled back; the log refuses all further appends.
    #[error("audit log has failed and refuses further appends: {0}")]
    Failed(String),
    /// `open` found the end of the chain damaged or contradicting HEAD; continuing it would bless
    /// tampering, so it refuses. Run [`verify`] for details.
    #[error("audit log is inconsistent, refusing to continue the chain: {0}")]
    Inconsistent(String),
    /// A record could not be serialized (not expected to happen for JSON values).
    #[error("cannot encode audit record: {0}")]
    Encode(String),
}

fn io_error(path: &Path, what: &str, err: &io::Error) -> AuditError {
    AuditError::Io(format!("{}: {what}: {err}", path.display()))
}

/// Result of a successful [`verify`].
#[derive(Debug)]
pub struct VerifySummary {
    pub records: u64,
    pub segments: usize,
    /// 0 when the log is empty.
    pub last_seq: u64,
    /// 64 zeros when the log is empty.
    pub last_hash: String,
}

/// The first problem [`verify`] (or [`read_all`]) found. `line` is 1-based; 0 means the problem
/// concerns the file as a whole.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {}{problem}", file.display(), seq.map(|s| format!("record {s}: ")).unwrap_or_default())]
pub struct VerifyError {
    pub file: PathBuf,
    pub line: u64,
    pub seq: Option<u64>,
    pub problem: String,
}

impl VerifyError {
    fn new(file: &Path, line: u64, seq: Option<u64>, problem: impl Into<String>) -> Self {
        VerifyError {
            file: file.to_path_buf(),
            line,
            seq,
            problem: problem.into(),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Head {
    seq: u64,
    hash: String,
}

struct Request {
    event: String,
    fields: Map<String, Value>,
    reply: oneshot::Sender<Result<Receipt, AuditError>>,
}

struct Inner {
    /// `None` once closed. Only this handle holds a sender, so taking it out lets the writer drain
    /// the queue and exit.
    tx: Mutex<Option<mpsc::UnboundedSender<Request>>>,
    /// The writer thread holds the sender; it is dropped when the thread exits.
    done: watch::Receiver<()>,
    syncs: Arc<AtomicU64>,
}

/// Handle to the open log. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("syncs", &self.syncs())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens or creates the log in `dir` and starts the writer thread.
    ///
    /// The chain continues from the last record of the newest non-empty segment. A torn final line
    /// (bytes after the last `\n`, left by a crash mid-write) was never acknowledged, so it is
    /// truncated away with a warning. A damaged last record, or a HEAD that names a record beyond the
    /// end of the chain (tail deleted), makes `open` fail with [`AuditError::Inconsistent`] rather
    /// than silently continuing — and thereby hiding — a tampered chain. A missing or unreadable HEAD
    /// only warns: a crash can legitimately leave it so.
    pub fn open(dir: &Path, options: AuditOptions) -> Result<AuditLog, AuditError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error(dir, "create directory", &e))?;
        match fs::metadata(dir) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => tracing::warn!(
                dir = %dir.display(),
                mode = format!("{:o}", m.permissions().mode() & 0o777),
                "audit log directory is accessible by group/other; expected 0700"
            ),
            Ok(_) => {}
            Err(e) => return Err(io_error(dir, "stat directory", &e)),
        }

        let (segments, _strays) =
            list_segments(dir).map_err(|e| io_error(dir, "list directory", &e))?;
        let head = match read_head(dir) {
            Ok(h) => h,
            Err(problem) => {
                // A crash can leave HEAD empty (it is not fsync'd). Don't brick the agent over it;
                // it is rewritten after the next batch and `verify` reports it until then.
                tracing::warn!(dir = %dir.display(), %problem, "audit HEAD unreadable; ignoring it");
                None
            }
        };

        let (index, path, file, len) = match segments.last() {
            None => {
                let path = dir.join(segment_name(1));
                let file = open_segment(&path)?;
                sync_dir(dir)?;
                (1, path, file, 0)
            }
            Some((index, path)) => {
                let file = open_segment(path)?;
                // Size from metadata, never "read to EOF": the file need not be a regular file.
                let len = file
                    .metadata()
                    .map_err(|e| io_error(path, "stat", &e))?
                    .len();
                let (complete, _) =
                    read_tail(&file, len).map_err(|e| io_error(path, "read tail", &e))?;
                if complete < len {
                    tracing::warn!(
                        segment = %path.display(),
                        torn_bytes = len - complete,
                        "audit log ends in a torn (never acknowledged) record, probably from a crash; truncating it"
                    );
                    file.set_len(complete)
                        .and_then(|()| file.sync_data())
                        .map_err(|e| io_error(path, "truncate torn tail", &e))?;
                }
                (*index, path.clone(), file, complete)
            }
        };

        let (last_seq, last_hash) = last_record(&segments)?;
        if let Some(h) = &head {
            if h.seq > last_seq || (h.seq == last_seq && h.hash != last_hash) {
                return Err(AuditError::Inconsistent(format!(
                    "{}: HEAD names seq {} ({}), but the chain ends at seq {last_seq} ({last_hash}); records were removed or altered",
                    dir.join(HEAD_FILE).display(),
                    h.seq,
                    h.hash
                )));
            }
        } else if last_seq > 0 {
            tracing::warn!(dir = %dir.display(), "audit HEAD missing although the log has records");
        }

        let syncs = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = watch::channel(());
        let writer = Writer {
            dir: dir.to_path_buf(),
            file,
            index,
            path,
            len,
            max_segment_bytes: options.max_segment_bytes,
            next_seq: last_seq + 1,
            prev: last_hash,
            failed: None,
            syncs: syncs.clone(),
        };
        std::thread::Builder::new()
            .name("mayfly-audit".into())
            .spawn(move || {
                writer.run(rx);
                drop(done_tx);
            })
            .map_err(|e| io_error(dir, "spawn writer thread", &e))?;

        Ok(AuditLog {
            inner: Arc::new(Inner {
                tx: Mutex::new(Some(tx)),
                done: done_rx,
                syncs,
            }),
        })
    }

    /// Appends one record and resolves once it is durable (written and fsync'd).
    ///
    /// `fields` are merged into the record as top-level keys. Dropping the returned future does not
    /// withdraw the record: once queued it is written, just nobody is told.
    pub async fn append(
        &self,
        event: &str,
        fields: Map<String, Value>,
    ) -> Result<Receipt, AuditError> {
        if let Some(key) = fields.keys().find(|k| RESERVED.contains(&k.as_str())) {
            return Err(AuditError::ReservedField(key.clone()));
        }
        let (reply, answer) = oneshot::channel();
        {
            let tx = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
            let tx = tx.as_ref().ok_or(AuditError::Closed)?;
            tx.send(Request {
                event: event.to_owned(),
                fields,
                reply,
            })
            .map_err(|_| AuditError::Closed)?;
        }
        // A dropped responder means the writer thread died without answering: not durable.
        answer.await.unwrap_or(Err(AuditError::Closed))
    }

    /// Number of segment fsyncs done so far (one per batch), to demonstrate group commit.
    pub fn syncs(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    /// Waits until everything already queued is durable (or has failed), then stops the writer.
    /// Later appends fail with [`AuditError::Closed`]. Idempotent; every caller waits for the writer.
    pub async fn close(&self) {
        // Dropping the only sender lets the writer drain what is queued and then exit.
        drop(
            self.inner
                .tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        let mut done = self.inner.done.clone();
        // The writer never sends; `changed` errors once the thread has dropped its sender on exit.
        while done.changed().await.is_ok() {}
    }
}

/// The writer thread's state. Only this thread touches the segment files after `open`.
struct Writer {
    dir: PathBuf,
    file: File,
    index: u32,
    path: PathBuf,
    /// Length of the current segment as far as acknowledged records go.
    len: u64,
    max_segment_bytes: u64,
    next_seq: u64,
    prev: String,
    /// Set when a failed batch could not be rolled back.
    failed: Option<String>,
    syncs: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        // Block for the first request, then take whatever else queued up meanwhile: while one
        // batch is being fsync'd the next one accumulates, which is what makes group commit work.
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Request>) {
        if let Some(reason) = &self.failed {
            let err = AuditError::Failed(reason.clone());
            for req in batch {
                let _ = req.reply.send(Err(err.clone()));
            }
            return;
        }
        if self.len > 0 && self.len >= self.max_segment_bytes {
            if let Err(err) = self.rotate() {
                tracing::error!(
                    error = %err,
                    "cannot start a new audit segment; credential issuance will FAIL CLOSED until this is fixed"
                );
                for req in batch {
                    let _ = req.reply.send(Err(err.clone()));
                }
                return;
            }
        }

        // Sequence the batch on a copy of the chain state; it is only adopted once durable.
        let mut buf = Vec::new();
        let mut seq = self.next_seq;
        let mut prev = self.prev.clone();
        let mut pending = Vec::with_capacity(batch.len());
        for req in batch {
            match encode_record(&req.event, req.fields, seq, &prev) {
                Ok((line, hash)) => {
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                    pending.push((
                        req.reply,
                        Receipt {
                            seq,
                            hash: hash.clone(),
                        },
                    ));
                    prev = hash;
                    seq += 1;
                }
                Err(err) => {
                    let _ = req.reply.send(Err(err));
                }
            }
        }
        if pending.is_empty() {
            return;
        }

        let start = self.len;
        let written = self.file.write_all(&buf).and_then(|()| {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            self.file.sync_data()
        });
        if let Err(e) = written {
            let err = io_error(&self.path, "write+fsync audit records", &e);
            tracing::error!(
                error = %err,
                records = pending.len(),
                "audit log write failed; these records are NOT durable and credential issuance will FAIL CLOSED"
            );
            for (reply, _) in pending {
                let _ = reply.send(Err(err.clone()));
            }
            // Cut off whatever part of the batch reached the file so the chain stays intact and the
            // next batch (the disk may recover) continues right after the last acknowledged record.
            // The file is in append mode, so later writes land at the new end.
            match self.file.set_len(start) {
                Ok(()) => {
                    if let Err(e) = self.file.sync_data() {
                        tracing::warn!(segment = %self.path.display(), error = %e, "fsync after rolling back a failed audit batch failed");
                    }
                }
                Err(e) => {
                    let reason = format!(
                        "{}: cannot roll back failed batch to {start} bytes: {e}",
                        self.path.display()
                    );
                    tracing::error!(
                        %reason,
                        "audit log is now FAILED: every further append is refused and credential issuance fails closed until the agent is restarted"
                    );
                    self.failed = Some(reason);
                }
            }
            return;
        }

        self.len = start + buf.len() as u64;
        self.next_seq = seq;
        self.prev = prev;
        // HEAD before answering, so an acknowledged record is covered by HEAD; not fsync'd: the
        // segment fsync is what makes records durable, HEAD merely may lag after a crash.
        if let Err(e) = self.write_head() {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot update audit HEAD (tail-deletion detection lags)");
        }
        for (reply, receipt) in pending {
            let _ = reply.send(Ok(receipt));
        }
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        let index = self.index + 1;
        let path = self.dir.join(segment_name(index));
        // Not create_new: a previous rotation attempt may have created the file and then failed to
        // fsync the directory; an empty leftover is fine to reuse, anything else is not.
        let file = open_segment(&path)?;
        let len = file
            .metadata()
            .map_err(|e| io_error(&path, "stat", &e))?
            .len();
        if len != 0 {
            return Err(AuditError::Io(format!(
                "{}: new segment unexpectedly contains {len} bytes",
                path.display()
            )));
        }
        // Make the new directory entry durable before records in it are acknowledged.
        sync_dir(&self.dir)?;
        self.file = file;
        self.index = index;
        self.path = path;
        self.len = 0;
        Ok(())
    }

    fn write_head(&self) -> io::Result<()> {
        let head = Head {
            seq: self.next_seq - 1,
            hash: self.prev.clone(),
        };
        let text = serde_json::to_string(&head).map_err(io::Error::other)?;
        let tmp = self.dir.join(HEAD_TMP);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        drop(f);
        fs::rename(&tmp, self.dir.join(HEAD_FILE))
    }
}

fn open_segment(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_error(path, "open segment", &e))
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, "fsync directory", &e))
}

fn now_rfc3339() -> Result<String, AuditError> {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .map_err(|e| AuditError::Encode(format!("time: {e}")))
}

/// Builds one record line (without `\n`) and its hash.
fn encode_record(
    event: &str,
    mut record: Map<String, Value>,
    seq: u64,
    prev: &str,
) -> Result<(String, String), AuditError> {
    record.insert("event".into(), Value::String(event.to_owned()));
    record.insert("seq".into(), Value::from(seq));
    record.insert("prev".into(), Value::String(prev.to_owned()));
    record.insert("time".into(), Value::String(now_rfc3339()?));
    let unsigned = serde_json::to_string(&record).map_err(|e| AuditError::Encode(e.to_string()))?;
    let hash = sha256_hex(unsigned.as_bytes());
    record.insert("hash".into(), Value::String(hash.clone()));
    let line = serde_json::to_string(&record).map_err(|e| AuditError::Encode(e.to_string()))?;
    Ok((line, hash))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn segment_name(index: u32) -> String {
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

fn list_segments(dir: &Path) -> io::Result<(Segments, Vec<PathBuf>)> {
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
fn read_head(dir: &Path) -> Result<Option<Head>, String> {
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
fn read_tail(file: &File, len: u64) -> io::Result<(u64, Option<Vec<u8>>)> {
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
fn last_record(segments: &[(u32, PathBuf)]) -> Result<(u64, String), AuditError> {
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

struct CheckedRecord {
    seq: u64,
    prev: String,
    hash: String,
}

/// Checks one line on its own: shape of the envelope and its own hash (not the chain links).
fn check_line(line: &str) -> Result<CheckedRecord, (Option<u64>, String)> {
    let map: Map<String, Value> =
        serde_json::from_str(line).map_err(|e| (None, format!("not a JSON object: {e}")))?;
    let seq = map
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| (None, "missing or invalid \"seq\"".to_owned()))?;
    let bad = |problem: &str| (Some(seq), problem.to_owned());
    let text = |key: &str| map.get(key).and_then(Value::as_str);
    let hash = text("hash")
        .filter(|h| is_hex64(h))
        .ok_or_else(|| bad("missing or invalid \"hash\""))?;
    let prev = text("prev")
        .filter(|h| is_hex64(h))
        .ok_or_else(|| bad("missing or invalid \"prev\""))?;
    text("event").ok_or_else(|| bad("missing or invalid \"event\""))?;
    text("time")
        .filter(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_ok()
        })
        .ok_or_else(|| bad("missing or invalid \"time\""))?;
    let (unsigned, members) = strip_hash_member(line).map_err(|p| bad(&p))?;
    if members != map.len() {
        return Err(bad("duplicate keys"));
    }
    if sha256_hex(unsigned.as_bytes()) != hash {
        return Err(bad("hash mismatch: the record was modified"));
    }
    Ok(CheckedRecord {
        seq,
        prev: prev.to_owned(),
        hash: hash.to_owned(),
    })
}

/// Returns `line` with its top-level `"hash"` member (and one adjacent comma) cut out, plus the
/// number of top-level members.
///
/// The hash is verified against the exact bytes on disk rather than a re-serialization of the parsed
/// record: serde_json's default float parsing is not guaranteed to round-trip, so re-serializing
/// could report tampering where there is none. For records the writer produced both are identical.
/// `line` must already have parsed as a JSON object.
fn strip_hash_member(line: &str) -> Result<(String, usize), String> {
    let b = line.as_bytes();
    if b.len() < 2 || b[0] != b'{' || b[b.len() - 1] != b'}' {
        return Err("record is not a compact JSON object".into());
    }
    let not_compact = || "record is not in compact serde_json form".to_owned();
    let mut i = 1;
    let mut members = 0;
    let mut span = None;
    while i < b.len() - 1 {
        let start = i;
        let key_end = skip_string(b, i).ok_or_else(not_compact)?;
        let key: String = serde_json::from_slice(&b[i..key_end]).map_err(|_| not_compact())?;
        if b.get(key_end) != Some(&b':') {
            return Err(not_compact());
        }
        let end = skip_value(b, key_end + 1).ok_or_else(not_compact)?;
        members += 1;
        if key == "hash" {
            span = Some((start, end));
        }
        match b.get(end) {
            Some(b',') => i = end + 1,
            Some(b'}') if end == b.len() - 1 => i = end,
            _ => return Err(not_compact()),
        }
    }
    let (start, end) = span.ok_or("missing \"hash\"")?;
    // All cut points sit on ASCII punctuation, so the slices are on char boundaries.
    let stripped = if b[start - 1] == b',' {
        [&line[..start - 1], &line[end..]].concat()
    } else if b[end] == b',' {
        [&line[..start], &line[end + 1..]].concat()
    } else {
        [&line[..start], &line[end..]].concat()
    };
    Ok((stripped, members))
}

/// `b[i]` must open a string; returns the index just past its closing quote.
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Returns the index just past the JSON value starting at `b[i]` (valid JSON assumed).
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            while i < b.len() {
                match b[i] {
                    b'"' => {
                        i = skip_string(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            while i < b.len() && !matches!(b[i], b',' | b'}' | b']') {
                i += 1;
            }
            Some(i)
        }
    }
}

/// Reads a segment's complete lines. The size is taken from metadata (never read to EOF). An
/// incomplete final line is tolerated (with a warning) only in the newest segment, where it is a
/// crash remnant or a batch being written right now; it was never acknowledged.
fn read_segment(path: &Path, newest: bool) -> Result<Vec<String>, VerifyError> {
    let io_fail =
        |what: &str, e: io::Error| VerifyError::new(path, 0, None, format!("{what}: {e}"));
    let file = File::open(path).map_err(|e| io_fail("cannot open", e))?;
    let len = file
        .metadata()
        .map_err(|e| io_fail("cannot stat", e))?
        .len();
    let mut data = Vec::new();
    file.take(len)
        .read_to_end(&mut data)
        .map_err(|e| io_fail("cannot read", e))?;
    let mut pieces: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    // After the last '\n' comes either nothing or a torn line.
    let tail = pieces.pop().unwrap_or_default();
    if !tail.is_empty() {
        let line = pieces.len() as u64 + 1;
        if newest {
            tracing::warn!(segment = %path.display(), line, "ignoring incomplete final line (never acknowledged)");
        } else {
            return Err(VerifyError::new(
                path,
                line,
                None,
                "incomplete line in a sealed segment",
            ));
        }
    }
    pieces
        .into_iter()
        .enumerate()
        .map(|(n, bytes)| {
            String::from_utf8(bytes.to_vec())
                .map_err(|_| VerifyError::new(path, n as u64 + 1, None, "line is not UTF-8"))
        })
        .collect()
}

/// Verifies the whole log in `dir`: segment numbering, every record's own hash, `seq` continuity,
/// `prev` links across all segments, and HEAD (must name a record in the chain with that hash; the
/// chain must not end before it). Returns a summary or the first problem found.
///
/// Safe to run while the agent is writing: HEAD is read first and only ever advances after records
/// are durable, and an incomplete last line in the newest segment is ignored.
pub fn verify(dir: &Path) -> Result<VerifySummary, VerifyError> {
    let head_path = dir.join(HEAD_FILE);
    let head = read_head(dir).map_err(|p| VerifyError::new(&head_path, 1, None, p))?;
    let (segments, strays) = list_segments(dir)
        .map_err(|e| VerifyError::new(dir, 0, None, format!("cannot list directory: {e}")))?;
    if let Some(stray) = strays.first() {
        return Err(VerifyError::new(
            stray,
            0,
            None,
            "not a canonical segment name (renamed segment?)",
        ));
    }
    for (pos, (index, path)) in segments.iter().enumerate() {
        let expected = pos as u32 + 1;
        if *index != expected {
            return Err(VerifyError::new(
                path,
                0,
                None,
                format!(
                    "segment numbering gap: {} is missing (deleted or renamed segment)",
                    segment_name(expected)
                ),
            ));
        }
    }

    let mut expected_seq = 1u64;
    let mut prev = ZERO_HASH.to_owned();
    let mut records = 0u64;
    for (pos, (_, path)) in segments.iter().enumerate() {
        let newest = pos + 1 == segments.len();
        let lines = read_segment(path, newest)?;
        if lines.is_empty() && !newest {
            // The writer only ever leaves the newest segment empty (crash right after rotation).
            return Err(VerifyError::new(
                path,
                0,
                None,
                "empty segment before the newest one",
            ));
        }
        for (n, line) in lines.iter().enumerate() {
            let line_no = n as u64 + 1;
            let record =
                check_line(line).map_err(|(seq, p)| VerifyError::new(path, line_no, seq, p))?;
            let fail = |p: String| VerifyError::new(path, line_no, Some(record.seq), p);
            if record.seq != expected_seq {
                return Err(fail(format!(
                    "expected seq {expected_seq}: records were deleted, inserted or reordered"
                )));
            }
            if record.prev != prev {
                return Err(fail(
                    "prev does not match the hash of the previous record".into(),
                ));
            }
            if let Some(h) = head.as_ref().filter(|h| h.seq == record.seq) {
                if h.hash != record.hash {
                    return Err(fail(format!(
                        "HEAD names this seq with hash {}, but the record's hash is {}",
                        h.hash, record.hash
                    )));
                }
            }
            prev = record.hash;
            expected_seq += 1;
            records += 1;
        }
    }

    let last_seq = expected_seq - 1;
    match &head {
        None if records > 0 => {
            return Err(VerifyError::new(
                &head_path,
                0,
                None,
                "HEAD is missing although the log has records (cannot rule out a deleted tail)",
            ))
        }
        Some(h) if h.seq > last_seq => {
            return Err(VerifyError::new(
                &head_path,
                1,
                Some(h.seq),
                format!(
                    "chain ends at seq {last_seq} but HEAD names seq {}: records were deleted from the tail",
                    h.seq
                ),
            ))
        }
        _ => {}
    }
    Ok(VerifySummary {
        records,
        segments: segments.len(),
        last_seq,
        last_hash: prev,
    })
}

/// All records in order, as parsed JSON objects (for `mayfly audit show`).
///
/// This only parses; it does not check the chain, so a damaged log can still be inspected. Use
/// [`verify`] to check integrity.
pub fn read_all(dir: &Path) -> Result<Vec<Map<String, Value>>, VerifyError> {
    let (segments, _) = list_segments(dir)
        .map_err(|e| VerifyError::new(dir, 0, None, format!("cannot list directory: {e}")))?;
    let mut out = Vec::new();
    for (pos, (_, path)) in segments.iter().enumerate() {
        for (n, line) in read_segment(path, pos + 1 == segments.len())?
            .iter()
            .enumerate()
        {
            let map = serde_json::from_str(line).map_err(|e| {
                VerifyError::new(path, n as u64 + 1, None, format!("not a JSON object: {e}"))
            })?;
            out.push(map);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeSet;

    fn fields(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn seg(dir: &Path, n: u32) -> PathBuf {
        dir.join(segment_name(n))
    }

    fn lines_of(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        if !lines.is_empty() {
            text.push('\n');
        }
        fs::write(path, text).unwrap();
    }

    /// A closed log with `n` records `svid_issued {serial: "s-<seq>"}`.
    async fn make_log(dir: &Path, n: u64, options: AuditOptions) -> Vec<Receipt> {
        let log = AuditLog::open(dir, options).unwrap();
        let mut receipts = Vec::new();
        for i in 1..=n {
            let r = log
                .append(
                    "svid_issued",
                    fields(
                        json!({"serial": format!("s-{i}"), "spiffe_id": "spiffe://example.org/w"}),
                    ),
                )
                .await
                .unwrap();
            receipts.push(r);
        }
        log.close().await;
        receipts
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_group_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let log = AuditLog::open(tmp.path(), AuditOptions::default()).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..50 {
            let log = log.clone();
            tasks.spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..40 {
                    let r = log
                        .append("svid_issued", fields(json!({"task": t, "i": i})))
                        .await
                        .unwrap();
                    assert!(is_hex64(&r.hash));
                    seqs.push(r.seq);
                }
                seqs
            });
        }
        let mut all = BTreeSet::new();
        while let Some(seqs) = tasks.join_next().await {
            for s in seqs.unwrap() {
                assert!(all.insert(s), "duplicate seq {s}");
            }
        }
        assert_eq!(all.len(), 2000);
        assert_eq!(
            all.iter().copied().collect::<Vec<_>>(),
            (1..=2000).collect::<Vec<_>>()
        );
        let syncs = log.syncs();
        log.close().await;
        eprintln!("2000 appends, {syncs} fsyncs");
        assert!(
            syncs > 0 && syncs < 500,
            "group commit not effective: {syncs} fsyncs"
        );
        let summary = verify(tmp.path()).unwrap();
        assert_eq!(summary.records, 2000);
        assert_eq!(summary.last_seq, 2000);
        assert_eq!(summary.segments, 1);
    }

    #[tokio::test]
    async fn record_format() {
        let tmp = tempfile::tempdir().unwrap();
        let receipts = make_log(tmp.path(), 2, AuditOptions::default()).await;
        let lines = lines_of(&seg(tmp.path(), 1));
        assert_eq!(lines.len(), 2);
        let first: Map<String, Value> = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["seq"], 1);
        assert_eq!(first["prev"], ZERO_HASH);
        assert_eq!(first["event"], "svid_issued");
        assert_eq!(first["serial"], "s-1");
        assert_eq!(first["hash"], receipts[0].hash.as_str());
        let time = first["time"].as_str().unwrap();
        assert_eq!(time.len(), "2024-05-01T12:00:00.123456789Z".len(), "{time}");
        assert!(time.ends_with('Z'));
        // Keys sorted, compact, and the hash is over the record without "hash".
        assert_eq!(serde_json::to_string(&first).unwrap(), lines[0]);
        let mut unsigned = first.clone();
        unsigned.remove("hash");
        assert_eq!(
            sha256_hex(serde_json::to_string(&unsigned).unwrap().as_bytes()),
            receipts[0].hash
        );
        let second: Map<String, Value> = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["prev"], receipts[0].hash.as_str());
        let head: Head =
            serde_json::from_str(&fs::read_to_string(tmp.path().join(HEAD_FILE)).unwrap()).unwrap();
        assert_eq!(
            head,
            Head {
                seq: 2,
                hash: receipts[1].hash.clone()
            }
        );
        let mode = fs::metadata(seg(tmp.path(), 1))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn tricky_field_values_verify() {
        // Nested "hash" keys, floats, escapes, non-ASCII: the text-level hash check must cope.
        let tmp = tempfile::tempdir().unwrap();
        let log = AuditLog::open(tmp.path(), AuditOptions::default()).unwrap();
        log.append(
            "x",
            fields(json!({
                "a": {"hash": "nested", "list": [1, {"hash": "}\"],"}]},
                "f": 0.1, "g": 1e300, "h": -2.5e-10,
                "s": "line\nbreak \"quoted\" \\ / é 🦀 \u{1}",
                "z": null
            })),
        )
        .await
        .unwrap();
        log.close().await;
        verify(tmp.path()).unwrap();
    }

    #[tokio::test]
    async fn reopen_continues_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let first = make_log(tmp.path(), 3, AuditOptions::default()).await;
        let log = AuditLog::open(tmp.path(), AuditOptions::default()).unwrap();
        let r4 = log.append("svid_issued", Map::new()).await.unwrap();
        let r5 = log.append("svid_issued", Map::new()).await.unwrap();
        log.close().await;
        assert_eq!((r4.seq, r5.seq), (4, 5));
        let records = read_all(tmp.path()).unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(records[3]["prev"], first[2].hash.as_str());
        let summary = verify(tmp.path()).unwrap();
        assert_eq!((summary.records, summary.last_seq), (5, 5));
        assert_eq!(summary.last_hash, r5.hash);
    }

    #[tokio::test]
    async fn detects_edited_record() {
        let tmp = tempfile::tempdir().unwrap();
        make_log(tmp.path(), 5, AuditOptions::default()).await;
        let path = seg(tmp.path(), 1);
        let mut lines = lines_of(&path);
        lines[2] = lines[2].replace("\"s-3\"", "\"s-X\"");
        write_lines(&path, &lines);
        let err = verify(tmp.path()).unwrap_err();
        assert_eq!(
            (err.file.as_path(), err.line, err.seq),
            (path.as_path(), 3, Some(3))
        );
        assert!(err.problem.contains("hash mismatch"), "{err}");
        assert!(
            err.to_string()
                .contains("audit-00000001.jsonl:3: record 3: hash mismatch"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn detects_deleted_inserted_and_swapped_records() {
        let tmp = tempfile::tempdir().unwrap();
        make_log(tmp.path(), 5, AuditOptions::default()).await;
        let path = seg(tmp.path(), 1);
        let original = lines_of(&path);
        verify(tmp.path()).unwrap();

        // Deleted middle line: the next record no longer follows.
        let mut lines = original.clone();
        lines.remove(2);
        write_lines(&path, &lines);
        let err = verify(tmp.path()).unwrap_err();
        assert_eq!((err.line, err.seq), (3, Some(4)), "{err}");

        // Forged line with a correctly computed own hash, linked to record 2.
        let prev: Map<String, Value> = serde_json::from_str(&original[1]).unwrap();
        let (forged, _) = encode_record(
            "svid_issued",
            fields(json!({"serial": "forged"})),
            3,
            prev["hash"].as_str().unwrap(),
        )
        .unwrap();
        assert!(check_line(&forged).is_ok());
        let mut lines = original.clone();
        lines.insert(2, forged);
        write_lines(&path, &lines);
        let err = verify(tmp.path()).unwrap_err();
        assert_eq!((err.line, err.seq), (4, Some(3)), "{err}");

        // Swapped lines.
        let mut lines = original.clone();
        lines.swap(1, 2);
        write_lines(&path, &lines);
        let err = verify(tmp.path()).unwrap_err();
        assert_eq!((err.line, err.seq), (2, Some(3)), "{err}");

        // Deleted last line: the chain is valid, HEAD gives it away.
        let mut lines = original.clone();
        lines.pop();
        write_lines(&path, &lines);
        let err = verify(tmp.path()).unwrap_err();
        assert_eq!(err.file, tmp.path().join(HEAD_FILE));
        assert!(err.problem.contains("deleted from the tail"), "{err}");
        // ...and the agent refuses to continue (and thereby hide) the shortened chain.
        assert!(matches!(
            AuditLog::open(tmp.path(), AuditOptions::default()),
            Err(AuditError::Inconsistent(_))
        ));

        // HEAD deleted as well: reported.
        fs::remove_file(tmp.path().join(HEAD_FILE)).unwrap();
        let err = verify(tmp.path()).unwrap_err();
        assert!(err.problem.contains("HEAD is missing"), "{err}");

        // Restored: fine again.
        write_lines(&path, &original);
        fs::write(
            tmp.path().join(HEAD_FILE),
            format!(
                "{{\"seq\":5,\"hash\":\"{}\"}}",
                serde_json::from_str::<Map<String, Value>>(&original[4]).unwrap()["hash"]
                    .as_str()
                    .unwrap()
            ),
        )
        .unwrap();
        assert_eq!(verify(tmp.path()).unwrap().records, 5);
    }

    #[tokio::test]
    async fn rotation_and_segment_tampering() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // Each record is ~200 bytes and appended alone, so every record after the first two
        // starts a new segment.
        let receipts = make_log(
            dir,
            7,
            AuditOptions {
                max_segment_bytes: 300,
            },
        )
        .await;
        let summary = verify(dir).unwrap();
        assert_eq!(summary.records, 7);
        assert!(summary.segments >= 3, "{summary:?}");
        let records = read_all(dir).unwrap();
        let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
        assert_eq!(records[6]["hash"], receipts[6].hash.as_str());
        let n = summary.segments as u32;

        // Empty newest segment (crash right after rotation): valid, and open continues into it.
        fs::write(seg(dir, n + 1), "").unwrap();
        assert_eq!(verify(dir).unwrap().segments, n as usize + 1);
        let log = AuditLog::open(
            dir,
            AuditOptions {
                max_segment_bytes: 300,
            },
        )
        .unwrap();
        assert_eq!(log.append("e", Map::new()).await.unwrap().seq, 8);
        log.close().await;
        assert_eq!(lines_of(&seg(dir, n + 1)).len(), 1);
        verify(dir).unwrap();

        let backup = tempfile::tempdir().unwrap();
        for i in 1..=n + 1 {
            fs::copy(seg(dir, i), seg(backup.path(), i)).unwrap();
        }
        let restore = || {
            for i in 1..=n + 1 {
                fs::copy(seg(backup.path(), i), seg(dir, i)).unwrap();
            }
            verify(dir).unwrap();
        };

        // A whole middle segment deleted.
        fs::remove_file(seg(dir, 2)).unwrap();
        let err = verify(dir).unwrap_err();
        assert!(
            err.problem.contains("audit-00000002.jsonl is missing"),
            "{err}"
        );
        // ...even if the later ones are renamed down to hide the numbering gap.
        for i in 3..=n + 1 {
            fs::rename(seg(dir, i), seg(dir, i - 1)).unwrap();
        }
        let err = verify(dir).unwrap_err();
        assert_eq!(err.file, seg(dir, 2));
        assert!(err.problem.contains("expected seq"), "{err}");
        restore();

        // Renamed to a non-segment name.
        fs::rename(seg(dir, 2), dir.join("audit-2.jsonl")).unwrap();
        assert!(verify(dir).is_err());
        fs::remove_file(dir.join("audit-2.jsonl")).unwrap();
        restore();

        // A middle segment emptied.
        fs::write(seg(dir, 2), "").unwrap();
        let err = verify(dir).unwrap_err();
        assert_eq!(err.file, seg(dir, 2));
        restore();

        // Two segments swapped.
        fs::copy(seg(backup.path(), 2), seg(dir, 3)).unwrap();
        fs::copy(seg(backup.path(), 3), seg(dir, 2)).unwrap();
        let err = verify(dir).unwrap_err();
        assert_eq!((err.file.as_path(), err.line), (seg(dir, 2).as_path(), 1));
        restore();
    }

    #[tokio::test]
    async fn torn_tail_is_truncated_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        make_log(tmp.path(), 3, AuditOptions::default()).await;
        let path = seg(tmp.path(), 1);
        let good_len = fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"event\":\"svid_issued\",\"ha").unwrap();
        drop(f);
        // verify tolerates (and warns about) the unacknowledged remnant in the newest segment.
        assert_eq!(verify(tmp.path()).unwrap().records, 3);

        let log = AuditLog::open(tmp.path(), AuditOptions::default()).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), good_len);
        assert_eq!(log.append("svid_issued", Map::new()).await.unwrap().seq, 4);
        log.close().await;
        let summary = verify(tmp.path()).unwrap();
        assert_eq!((summary.records, summary.last_seq), (4, 4));
    }

    #[tokio::test]
    async fn write_failure_fails_closed_and_log_stays_valid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let options = AuditOptions {
            max_segment_bytes: 1,
        };
        let receipts = make_log(dir, 2, options.clone()).await;
        assert_eq!(verify(dir).unwrap().segments, 2);
        // The next segment is a device on which every write fails with ENOSPC.
        std::os::unix::fs::symlink("/dev/full", seg(dir, 3)).unwrap();

        let log = AuditLog::open(dir, options).unwrap();
        let err = log.append("svid_issued", Map::new()).await.unwrap_err();
        assert!(matches!(err, AuditError::Io(_)), "{err:?}");
        assert!(err.to_string().contains("audit-00000003.jsonl"), "{err}");
        // A device cannot be truncated back, so the log refuses everything from now on.
        let err = log.append("svid_issued", Map::new()).await.unwrap_err();
        assert!(matches!(err, AuditError::Failed(_)), "{err:?}");
        log.close().await;

        let summary = verify(dir).unwrap();
        assert_eq!(
            (summary.records, summary.last_hash),
            (2, receipts[1].hash.clone())
        );
    }

    #[tokio::test]
    async fn failed_batch_does_not_stop_later_batches() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let options = AuditOptions {
            max_segment_bytes: 1,
        };
        let log = AuditLog::open(dir, options).unwrap();
        log.append("a", Map::new()).await.unwrap();
        // Block the next segment with a directory: the rotation for the next batch fails.
        fs::create_dir(seg(dir, 2)).unwrap();
        let err = log.append("b", Map::new()).await.unwrap_err();
        assert!(matches!(err, AuditError::Io(_)), "{err:?}");
        // The "disk" recovers: later batches succeed and continue the chain without a gap.
        fs::remove_dir(seg(dir, 2)).unwrap();
        assert_eq!(log.append("c", Map::new()).await.unwrap().seq, 2);
        log.close().await;
        assert_eq!(verify(dir).unwrap().records, 2);
    }

    #[tokio::test]
    async fn reserved_fields_and_close() {
        let tmp = tempfile::tempdir().unwrap();
        let log = AuditLog::open(tmp.path(), AuditOptions::default()).unwrap();
        for key in RESERVED {
            let mut f = fields(json!({"ok": 2}));
            f.insert(key.to_owned(), json!(1));
            let err = log.append("x", f).await.unwrap_err();
            assert_eq!(err, AuditError::ReservedField(key.to_owned()));
        }
        let pending = {
            let log = log.clone();
            tokio::spawn(async move { log.append("x", Map::new()).await })
        };
        tokio::task::yield_now().await;
        log.close().await;
        log.close().await;
        // Queued before close: durable; after close: refused.
        match pending.await.unwrap() {
            Ok(r) => assert_eq!(r.seq, 1),
            Err(e) => assert_eq!(e, AuditError::Closed),
        }
        assert_eq!(
            log.append("x", Map::new()).await.unwrap_err(),
            AuditError::Closed
        );
        verify(tmp.path()).unwrap();
    }

    #[test]
    fn handle_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<AuditLog>();
        check::<AuditError>();
    }

    #[test]
    fn empty_dir_verifies() {
        let tmp = tempfile::tempdir().unwrap();
        let summary = verify(tmp.path()).unwrap();
        assert_eq!(
            (summary.records, summary.segments, summary.last_seq),
            (0, 0, 0)
        );
        assert_eq!(summary.last_hash, ZERO_HASH);
        assert!(read_all(tmp.path()).unwrap().is_empty());
    }
}
