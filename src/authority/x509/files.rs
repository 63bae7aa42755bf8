//! The CA's files: PEM certificates and keys as operators provide them, and
//! the embedded CA written owner-only and atomically so a crash leaves no torn key.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rcgen::KeyPair;
use x509_parser::pem::Pem;
use zeroize::Zeroizing;

use super::{CaError, CertFile};

fn read_file(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|cause| CaError::Io {
        op: "read",
        path: path.to_path_buf(),
        cause,
    })
}

/// A file holding key material, in a buffer wiped when dropped.
pub(super) fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, CaError> {
    read_file(path).map(Zeroizing::new)
}

/// All `CERTIFICATE` blocks of a PEM file, in order; at least one.
pub(super) fn read_certs_pem(path: &Path) -> Result<Vec<CertFile>, CaError> {
    parse_certs_pem(path, &read_file(path)?)
}

/// All `CERTIFICATE` blocks of PEM text that came from `path`, in order; at least one.
pub(super) fn parse_certs_pem(path: &Path, data: &[u8]) -> Result<Vec<CertFile>, CaError> {
    let mut out = Vec::new();
    for pem in Pem::iter_from_buffer(data) {
        let pem = pem.map_err(|e| CaError::BadFile {
            path: path.to_path_buf(),
            problem: format!("invalid PEM: {e}"),
        })?;
        if pem.label == "CERTIFICATE" {
            out.push(CertFile {
                path: path.to_path_buf(),
                der: pem.contents,
            });
        }
    }
    if out.is_empty() {
        return Err(CaError::BadFile {
            path: path.to_path_buf(),
            problem: "no PEM CERTIFICATE block".into(),
        });
    }
    Ok(out)
}

/// The private key of a PEM file. Only unencrypted PKCS#8 is accepted (what
/// ring can load); other formats get an error saying how to convert them.
pub(super) fn read_key_pem(path: &Path) -> Result<KeyPair, CaError> {
    parse_key_pem(path, &Zeroizing::new(read_file(path)?))
}

/// The private key in PEM text that came from `path`.
pub(super) fn parse_key_pem(path: &Path, data: &[u8]) -> Result<KeyPair, CaError> {
    let unsupported = |problem: String| CaError::UnsupportedKey {
        path: path.to_path_buf(),
        problem,
    };
    const CONVERT: &str = "convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`";
    for pem in Pem::iter_from_buffer(data) {
        let mut pem = pem.map_err(|e| CaError::BadFile {
            path: path.to_path_buf(),
            problem: format!("invalid PEM: {e}"),
        })?;
        let contents = Zeroizing::new(std::mem::take(&mut pem.contents));
        match pem.label.as_str() {
            "PRIVATE KEY" => {
                return KeyPair::try_from(contents.as_slice()).map_err(|e| {
                    unsupported(format!(
                        "PKCS#8 key is not an ECDSA P-256/P-384, Ed25519 or RSA key usable for \
                         signing ({e})"
                    ))
                })
            }
            "EC PRIVATE KEY" => {
                return Err(unsupported(format!(
                    "SEC1 `EC PRIVATE KEY`; PKCS#8 (`PRIVATE KEY`) is required, {CONVERT}"
                )))
            }
            "RSA PRIVATE KEY" => {
                return Err(unsupported(format!(
                    "PKCS#1 `RSA PRIVATE KEY`; PKCS#8 (`PRIVATE KEY`) is required, {CONVERT}"
                )))
            }
            "ENCRYPTED PRIVATE KEY" => {
                return Err(unsupported(format!(
                    "encrypted PKCS#8; an unencrypted PKCS#8 key is required, {CONVERT}"
                )))
            }
            _ => {}
        }
    }
    Err(CaError::BadFile {
        path: path.to_path_buf(),
        problem: "no PEM PRIVATE KEY block".into(),
    })
}

pub(super) fn warn_if_key_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "CA private key file is accessible by group/others; it should be 0600");
        }
    }
}

pub(super) fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(|cause| CaError::Io {
        op: "stat",
        path: path.to_path_buf(),
        cause,
    })
}

/// The CA dir holds the root key: owner-only.
pub(super) fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    let io_err = |op, cause| CaError::Io {
        op,
        path: dir.to_path_buf(),
        cause,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err("create directory", e))?;
    // `mode` does not apply to a directory that already existed.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| io_err("set permissions of", e))
}

/// Writes via a temp file in the same directory + rename, so a crash never
/// leaves a truncated file. The temp file is created with its final `mode`
/// so a secret is never readable by others, not even briefly.
pub(super) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let io_err = |op, p: &Path, cause| CaError::Io {
        op,
        path: p.to_path_buf(),
        cause,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // A stale temp file from a crashed run with the same pid would make
    // create_new fail; it holds nothing of value.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| io_err("create", &tmp, e))?;
        f.write_all(data).map_err(|e| io_err("write", &tmp, e))?;
        f.sync_all().map_err(|e| io_err("sync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| io_err("rename into place", path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("sync directory", dir, e))?;
    }
    Ok(())
}
