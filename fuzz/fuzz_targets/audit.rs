//! Audit log lines, read back by `mayfly audit verify` (`audit::verify`), `audit show`
//! (`audit::read_all`) and the agent at start (`AuditLog::open`, which continues the chain).
//!
//! Byte 0: bit 0 set writes a HEAD file. The rest, split at NUL bytes: the HEAD's text (when
//! written), then up to four segments. So that mutations get past the hash checks, the harness
//! fills in placeholders as the writer would have: in each line `"prev":"@"` becomes the hash
//! of the line before, and `"hash":"@"` the line's own hash (of the line without that member);
//! in HEAD, `"hash":"@"` becomes the last line's hash.
//!
//! Never a panic. A log that verifies is read in full by `read_all`, is opened by the agent,
//! and still verifies, one record longer, after the agent appends to it.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mayfly::audit::{read_all, verify, AuditLog, AuditOptions};
use sha2::{Digest, Sha256};

const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = ["/dev/shm", "/tmp"]
            .into_iter()
            .map(PathBuf::from)
            .find(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        base.join(format!("mayfly-fuzz-audit-{}", std::process::id()))
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Fills in the placeholders of one line; returns it and its hash (if it had a placeholder).
fn seal(line: &[u8], prev: &str) -> (Vec<u8>, Option<String>) {
    let Ok(line) = std::str::from_utf8(line) else {
        return (line.to_vec(), None);
    };
    let line = line.replacen(r#""prev":"@""#, &format!(r#""prev":"{prev}""#), 1);
    let unsigned = if line.contains(r#","hash":"@""#) {
        line.replacen(r#","hash":"@""#, "", 1)
    } else if line.contains(r#""hash":"@","#) {
        line.replacen(r#""hash":"@","#, "", 1)
    } else {
        return (line.into_bytes(), None);
    };
    let hash = hex::encode(Sha256::digest(unsigned.as_bytes()));
    let line = line.replacen(r#""hash":"@""#, &format!(r#""hash":"{hash}""#), 1);
    (line.into_bytes(), Some(hash))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let dir = dir();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir(dir).unwrap();
    let mut parts = rest.split(|&b| b == 0);
    let head = if flags & 1 != 0 { parts.next() } else { None };
    let mut prev = ZERO.to_owned();
    for (i, segment) in parts.take(4).enumerate() {
        let mut out = Vec::with_capacity(segment.len() + 64);
        let mut lines = segment.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            let (line, hash) = seal(line, &prev);
            out.extend_from_slice(&line);
            if lines.peek().is_some() {
                out.push(b'\n');
            }
            if let Some(h) = hash {
                prev = h;
            }
        }
        std::fs::write(dir.join(format!("audit-{:08}.jsonl", i + 1)), out).unwrap();
    }
    if let Some(head) = head {
        let head = String::from_utf8_lossy(head).replacen(
            r#""hash":"@""#,
            &format!(r#""hash":"{prev}""#),
            1,
        );
        std::fs::write(dir.join("HEAD"), head).unwrap();
    }

    let read = read_all(dir);
    let Ok(summary) = verify(dir) else {
        return;
    };
    let records = read.expect("a log that verifies can be read");
    assert_eq!(records.len() as u64, summary.records);

    let log = AuditLog::open(dir, AuditOptions::default()).expect("a log that verifies opens");
    runtime().block_on(async {
        let receipt = log
            .append("fuzz", serde_json::Map::new())
            .await
            .expect("append to a log that verifies");
        assert_eq!(receipt.seq, summary.last_seq + 1);
        log.close().await;
    });
    let after = verify(dir).expect("the agent's append keeps the log verifiable");
    assert_eq!(after.records, summary.records + 1);
});
