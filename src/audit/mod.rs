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
//!   (temp file, synced, then renamed over the old one; the rename is not synced) after every batch, so that deleting records from the *end* of the
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

pub mod event;
mod reader;
mod record;
mod segment;
pub mod sink;
mod writer;

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot, watch};

pub use event::Event;
pub use reader::{read_all, verify, VerifyError, VerifySummary};
pub use sink::{Audit, AuditSink, MemorySink, ReportingSink};

use segment::{
    last_record, list_segments, open_segment, read_head, read_tail, segment_name, sync_dir,
};
use writer::Writer;

/// `prev` of the very first record.
const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Keys the log itself writes; callers may not supply them.
const RESERVED: [&str; 5] = ["event", "hash", "prev", "seq", "time"];
/// Upper bound on records per write+fsync, so one huge burst does not build an unbounded buffer.
pub const MAX_BATCH: usize = 4096;
const HEAD_FILE: &str = "HEAD";
const HEAD_TMP: &str = "HEAD.tmp";

/// What an operator does about a log whose newest records may be gone.
const NEW_CHAIN: &str = "If you know why (say, the disk was restored from a backup), keep this \
    log aside and start a new chain that records where it ended: `mayfly audit new-chain \
    --reason ...`";

/// What [`start_new_chain`] did.
#[derive(Debug)]
pub struct NewChain {
    /// Where the previous log went (`None`: there was none).
    pub archived: Option<std::path::PathBuf>,
    /// The previous log's last record as far as it can be read, `{"seq":..,"hash":..}`.
    pub previous: Option<Head>,
    /// The new chain's first record.
    pub first: Receipt,
}

/// The operator's way past a log that cannot be continued (its tail or HEAD deleted, or gone
/// altogether): moves it aside as `audit.replaced-<unix time>` (evidence is never deleted) and
/// starts a new chain whose first record, `audit_chain_started`, names where the old one ended,
/// who started the new one and why. The agent must not be running.
pub async fn start_new_chain(
    dir: &Path,
    reason: &str,
    by_uid: u32,
) -> Result<NewChain, AuditError> {
    let (previous, problem) = match verify(dir) {
        Ok(summary) => (
            Some(Head {
                seq: summary.last_seq,
                hash: summary.last_hash,
            })
            .filter(|h| h.seq > 0),
            None,
        ),
        Err(e) => {
            let (segments, _) = list_segments(dir).unwrap_or_default();
            let last = last_record(&segments)
                .ok()
                .filter(|(seq, _)| *seq > 0)
                .map(|(seq, hash)| Head { seq, hash });
            (last, Some(e.to_string()))
        }
    };
    let archived = if dir.exists() {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let name = format!(
            "{}.replaced-{since}",
            dir.file_name()
                .map_or("audit".into(), |n| n.to_string_lossy())
        );
        let to = dir.with_file_name(name);
        fs::rename(dir, &to).map_err(|e| io_error(dir, "move the old log aside", &e))?;
        Some(to)
    } else {
        None
    };
    let log = AuditLog::open(dir, AuditOptions::default())?;
    let mut fields = Map::new();
    fields.insert("reason".into(), reason.into());
    fields.insert("by_uid".into(), by_uid.into());
    fields.insert(
        "previous_head".into(),
        serde_json::to_value(&previous).unwrap_or(Value::Null),
    );
    fields.insert(
        "previous_problem".into(),
        problem.map_or(Value::Null, Value::from),
    );
    fields.insert(
        "archived_to".into(),
        archived
            .as_ref()
            .map_or(Value::Null, |p| p.display().to_string().into()),
    );
    let first = log.append("audit_chain_started", fields).await;
    log.close().await;
    Ok(NewChain {
        archived,
        previous,
        first: first?,
    })
}

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

/// The newest record a log holds: what `HEAD` says.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
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
    /// than silently continuing — and thereby hiding — a tampered chain. So does a missing or
    /// unreadable HEAD beside records: HEAD is synced before it replaces the previous one, so a
    /// crash cannot leave it so. Only [`start_new_chain`], an operator's deliberate act, gets past
    /// such a log.
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
        // HEAD is synced before it replaces the old one, so a crash leaves a HEAD, never an empty
        // one: a missing or unreadable HEAD beside records means a deleted tail.
        let head = read_head(dir).map_err(|problem| {
            AuditError::Inconsistent(format!(
                "{}: {problem}; the newest records may have been deleted with it. {NEW_CHAIN}",
                dir.join(HEAD_FILE).display()
            ))
        })?;

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
            return Err(AuditError::Inconsistent(format!(
                "{}: missing, although the log has {last_seq} records; the newest records may have \
                 been deleted with it. {NEW_CHAIN}",
                dir.join(HEAD_FILE).display()
            )));
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

    /// Records one event; resolves once it is durable, like [`AuditLog::append`].
    pub async fn record(&self, event: &Event<'_>) -> Result<Receipt, AuditError> {
        self.append(&event.name(), event.fields()).await
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

#[cfg(test)]
pub(super) mod test_support {
    use std::fs;
    use std::path::{Path, PathBuf};

    use serde_json::{json, Map, Value};

    use super::segment::segment_name;
    use super::{AuditLog, AuditOptions, Receipt};

    pub(super) fn fields(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    pub(super) fn seg(dir: &Path, n: u32) -> PathBuf {
        dir.join(segment_name(n))
    }

    pub(super) fn lines_of(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// A closed log with `n` records `svid_issued {serial: "s-<seq>"}`.
    pub(super) async fn make_log(dir: &Path, n: u64, options: AuditOptions) -> Vec<Receipt> {
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
}

#[cfg(test)]
mod tests {
    use super::test_support::{fields, make_log, seg};
    use super::*;
    use serde_json::json;
    use std::fs::OpenOptions;
    use std::io::Write;

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
}

#[cfg(test)]
mod laundering {
    use super::test_support::make_log;
    use super::*;

    /// Issue 14, hole 9: deleting the newest records together with HEAD left a shorter chain
    /// that was perfectly valid, and the agent carried on from it.
    #[tokio::test]
    async fn a_log_without_its_head_is_refused_until_an_operator_starts_a_new_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("audit");
        let receipts = make_log(&dir, 3, AuditOptions::default()).await;
        for head in ["", "{\"seq\":"] {
            fs::write(dir.join(HEAD_FILE), head).unwrap();
            let err = AuditLog::open(&dir, AuditOptions::default()).unwrap_err();
            assert!(matches!(err, AuditError::Inconsistent(_)), "{err:?}");
        }
        fs::remove_file(dir.join(HEAD_FILE)).unwrap();
        let err = AuditLog::open(&dir, AuditOptions::default()).unwrap_err();
        assert!(err.to_string().contains("audit new-chain"), "{err}");

        let done = start_new_chain(&dir, "restored from backup", 0)
            .await
            .unwrap();
        let previous = done.previous.unwrap();
        assert_eq!((previous.seq, previous.hash), (3, receipts[2].hash.clone()));
        let archived = done.archived.unwrap();
        assert!(archived.join("audit-00000001.jsonl").exists());
        // The new chain verifies, and its first record says where the old one ended and why.
        assert_eq!(verify(&dir).unwrap().records, 1);
        let first = &read_all(&dir).unwrap()[0];
        assert_eq!(first["event"], "audit_chain_started");
        assert_eq!(first["reason"], "restored from backup");
        assert_eq!(first["previous_head"]["seq"], 3);
        assert!(first["previous_problem"].as_str().unwrap().contains("HEAD"));
        AuditLog::open(&dir, AuditOptions::default())
            .unwrap()
            .close()
            .await;
    }

    #[tokio::test]
    async fn a_new_chain_where_there_was_no_log_records_that() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("audit");
        let done = start_new_chain(&dir, "audit dir lost", 0).await.unwrap();
        assert!(done.archived.is_none() && done.previous.is_none());
        assert_eq!(read_all(&dir).unwrap()[0]["previous_head"], Value::Null);
    }
}
