//! The key set on disk: `keys.json` in an owner-only directory, replaced
//! atomically so a crash leaves the old or the new set, never a torn one.

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{JwtError, KeyMaterial, KeySet, Slot};

/// Name of the key set file inside the key directory.
pub(super) const KEYS_FILE: &str = "keys.json";
/// Prefix of temporary files used for atomic replacement of [`KEYS_FILE`].
const TMP_PREFIX: &str = ".keys.json.tmp.";
/// Current on-disk format version.
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize)]
struct FileOut<'a> {
    version: u32,
    keys: Vec<FileKeyOut<'a>>,
}

#[derive(Serialize)]
struct FileKeyOut<'a> {
    kid: &'a str,
    created_at: u64,
    retired_at: Option<u64>,
    pkcs8: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIn {
    version: u32,
    keys: Vec<FileKeyIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeyIn {
    kid: String,
    created_at: u64,
    retired_at: Option<u64>,
    // Wrapped in `Zeroizing` right after parsing (see `load_key_set`).
    pkcs8: String,
}

fn io_err(path: &Path, e: std::io::Error) -> JwtError {
    JwtError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= 128
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Creates `dir` with mode 0700, or tightens an existing one that is open to
/// group/other: the directory guards the temp files of atomic writes too.
pub(super) fn ensure_private_dir(dir: &Path) -> Result<(), JwtError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err(dir, e))?;
    let meta = fs::metadata(dir).map_err(|e| io_err(dir, e))?;
    if !meta.is_dir() {
        return Err(JwtError::Io {
            path: dir.display().to_string(),
            message: "not a directory".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(path = %dir.display(), mode = format!("{mode:o}"), "tightening JWT key directory to 0700");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| io_err(dir, e))?;
    }
    Ok(())
}

pub(super) fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove stale temporary key file");
            }
        }
    }
}

/// Reads `keys.json`; `Ok(None)` when it does not exist yet.
pub(super) fn load_key_set(file: &Path, rng: &SystemRandom) -> Result<Option<KeySet>, JwtError> {
    let mut f = match File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(file, e)),
    };
    let meta = f.metadata().map_err(|e| io_err(file, e))?;
    if !meta.is_file() {
        return Err(JwtError::KeyFile {
            path: file.display().to_string(),
            reason: "not a regular file".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode != 0o600 {
        tracing::warn!(
            path = %file.display(),
            mode = format!("{mode:o}"),
            "JWT key file had mode other than 0600; tightening it (consider rotating the keys)"
        );
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err(file, e))?;
    }
    let mut raw = Zeroizing::new(Vec::new());
    f.read_to_end(&mut raw).map_err(|e| io_err(file, e))?;

    let bad = |reason: String| JwtError::KeyFile {
        path: file.display().to_string(),
        reason,
    };
    // serde_json's error text may quote input; never include it (it could hold key bytes).
    let parsed: FileIn = serde_json::from_slice(&raw).map_err(|e| {
        bad(format!(
            "not a valid key set document (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    if parsed.version != FORMAT_VERSION {
        return Err(bad(format!("unsupported version {}", parsed.version)));
    }

    let mut slots = Vec::with_capacity(parsed.keys.len());
    let mut kids = HashSet::new();
    for entry in parsed.keys {
        if !valid_kid(&entry.kid) {
            return Err(bad("a kid is empty, too long or not URL-safe".into()));
        }
        if !kids.insert(entry.kid.clone()) {
            return Err(bad(format!("duplicate kid {}", entry.kid)));
        }
        let encoded = Zeroizing::new(entry.pkcs8);
        let pkcs8 = Zeroizing::new(
            STANDARD
                .decode(encoded.as_bytes())
                .map_err(|_| bad(format!("key {} is not valid base64", entry.kid)))?,
        );
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, rng)
            .map_err(|e| bad(format!("key {} is not a P-256 PKCS#8 key: {e}", entry.kid)))?;
        slots.push(Slot {
            key: Arc::new(KeyMaterial {
                kid: entry.kid,
                created_at: entry.created_at,
                pkcs8,
                pair,
            }),
            retired_at: entry.retired_at,
        });
    }
    let active = slots.iter().filter(|s| s.retired_at.is_none()).count();
    if active != 1 {
        return Err(bad(format!(
            "expected exactly one active key, found {active}"
        )));
    }
    // Active key first, then the most recently retired.
    slots.sort_by_key(|s| std::cmp::Reverse(s.retired_at.unwrap_or(u64::MAX)));
    Ok(Some(KeySet { slots }))
}

/// Atomically replaces `keys.json` with `set`.
pub(super) fn persist(dir: &Path, file: &Path, set: &KeySet) -> Result<(), JwtError> {
    let encoded: Vec<Zeroizing<String>> = set
        .slots
        .iter()
        .map(|s| Zeroizing::new(STANDARD.encode(s.key.pkcs8.as_slice())))
        .collect();
    let doc = FileOut {
        version: FORMAT_VERSION,
        keys: set
            .slots
            .iter()
            .zip(&encoded)
            .map(|(s, pkcs8)| FileKeyOut {
                kid: &s.key.kid,
                created_at: s.key.created_at,
                retired_at: s.retired_at,
                pkcs8: pkcs8.as_str(),
            })
            .collect(),
    };
    let mut bytes = Zeroizing::new(Vec::new());
    serde_json::to_writer_pretty(&mut *bytes, &doc)
        .map_err(|e| JwtError::Crypto(format!("cannot encode key set: {e}")))?;
    bytes.push(b'\n');

    let rng = SystemRandom::new();
    let mut suffix = [0u8; 8];
    rng.fill(&mut suffix)
        .map_err(|_| JwtError::Crypto("random generator failed".into()))?;
    let tmp = dir.join(format!("{TMP_PREFIX}{}", hex::encode(suffix)));

    let write = || -> Result<(), JwtError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, file).map_err(|e| io_err(file, e))?;
        // Make the rename itself durable.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, e))
    };
    let result = write();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::jwt_keys::test_support::*;
    use crate::authority::jwt_keys::JwtKeys;
    use std::time::SystemTime;

    #[test]
    fn create_then_reload_keeps_key_and_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state").join("jwt");
        let kid = {
            let keys = JwtKeys::load_or_create(&dir, &td(), policy()).unwrap();
            keys.active_kid()
        };
        assert_eq!(kid.len(), 32);
        assert!(kid.bytes().all(|b| b.is_ascii_hexdigit()));

        let dir_mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let file = dir.join(KEYS_FILE);
        let file_mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(file_mode, 0o600);

        let keys = JwtKeys::load_or_create(&dir, &td(), policy()).unwrap();
        assert_eq!(keys.active_kid(), kid);
        // The reloaded key signs tokens that validate: the private key survived.
        let token = keys.sign(&claims()).unwrap();
        keys.validate(&token, AUD, SystemTime::now()).unwrap();
        // No temp files left behind.
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![KEYS_FILE.to_string()]);
    }

    #[test]
    fn loose_file_mode_is_tightened_and_corrupt_file_refused() {
        let (tmp, keys) = setup();
        let dir = tmp.path().join("jwt");
        let file = dir.join(KEYS_FILE);
        let kid = keys.active_kid();
        drop(keys);

        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let keys = JwtKeys::load_or_create(&dir, &td(), policy()).unwrap();
        assert_eq!(keys.active_kid(), kid);
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        drop(keys);

        fs::write(&file, b"{not json").unwrap();
        let err = JwtKeys::load_or_create(&dir, &td(), policy()).unwrap_err();
        assert!(matches!(err, JwtError::KeyFile { .. }), "{err:?}");
        // The corrupt file is not replaced behind the operator's back.
        assert_eq!(fs::read(&file).unwrap(), b"{not json");
    }
}
