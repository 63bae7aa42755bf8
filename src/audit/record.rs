//! One record line: how the writer encodes and hashes it, and how a line is checked on its own
//! (envelope and own hash). In one place so the writer, `open` and `verify` agree on what a valid
//! line is.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::AuditError;

fn now_rfc3339() -> Result<String, AuditError> {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .map_err(|e| AuditError::Encode(format!("time: {e}")))
}

/// Builds one record line (without `\n`) and its hash.
pub(super) fn encode_record(
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

pub(super) fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(super) struct CheckedRecord {
    pub(super) seq: u64,
    pub(super) prev: String,
    pub(super) hash: String,
}

/// Checks one line on its own: shape of the envelope and its own hash (not the chain links).
pub(super) fn check_line(line: &str) -> Result<CheckedRecord, (Option<u64>, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use serde_json::json;

    use crate::audit::test_support::{fields, lines_of, make_log, seg};
    use crate::audit::{verify, AuditLog, AuditOptions, Head, HEAD_FILE, ZERO_HASH};

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
}
