//! The writer thread: it alone appends to the segment files. Batching appends into one write and
//! one fsync (group commit) keeps durability cheap; a batch that fails is rolled back so the chain
//! never holds unacknowledged records.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::record::encode_record;
use super::segment::{open_segment, segment_name, sync_dir};
use super::{io_error, AuditError, Head, Receipt, Request, HEAD_FILE, HEAD_TMP, MAX_BATCH};

/// The writer thread's state. Only this thread touches the segment files after `open`.
pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) file: File,
    pub(super) index: u32,
    pub(super) path: PathBuf,
    /// Length of the current segment as far as acknowledged records go.
    pub(super) len: u64,
    pub(super) max_segment_bytes: u64,
    pub(super) next_seq: u64,
    pub(super) prev: String,
    /// Set when a failed batch could not be rolled back.
    pub(super) failed: Option<String>,
    pub(super) syncs: Arc<AtomicU64>,
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
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
        // HEAD before answering, so an acknowledged record is covered by HEAD. Its rename is not
        // synced: the segment fsync is what makes records durable, HEAD merely may lag.
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
        // Synced before the rename, so that after a crash HEAD is the old one or the new one,
        // never empty: a missing or empty HEAD beside records refuses start (tail deleted).
        f.sync_data()?;
        drop(f);
        let head = self.dir.join(HEAD_FILE);
        let first = !head.exists();
        fs::rename(&tmp, &head)?;
        if first {
            // The first HEAD of a log must survive a crash too (later ones may lag).
            super::segment::sync_dir(&self.dir).map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fs;

    use serde_json::{json, Map};

    use crate::audit::record::is_hex64;
    use crate::audit::test_support::{fields, make_log, seg};
    use crate::audit::{verify, AuditError, AuditLog, AuditOptions};

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
}
