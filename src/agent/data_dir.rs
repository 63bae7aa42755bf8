//! The data dir holds the CA key, the lease store and the audit log: whoever can write in it
//! can sign as the agent or rewrite its history. Like sshd's StrictModes, the agent refuses to
//! start when the directory, or anything in it, belongs to someone else or is writable by
//! group or others.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Why the data dir cannot be trusted, naming the path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "data directory: {path} is owned by uid {owner}, not by this agent (uid {me}) or root; \
         someone else could replace the CA, the leases or the audit log (fix: chown {me} {path})"
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "data directory: {path} is writable by group or others (mode {mode:04o}); someone else \
         could replace the CA, the leases or the audit log (fix: chmod go-w {path})"
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "data directory: the audit log {audit} has records, but {missing} is gone; the agent \
         will not create a new one silently (someone may have replaced it). Restore it, or, to \
         start over on purpose, stop here and run `mayfly audit new-chain --reason ...`"
    )]
    Vanished { audit: PathBuf, missing: String },
    #[error(
        "data directory: {present} exists but the audit log {audit} is gone; the agent will not \
         start a clean chain silently (someone may have deleted the history). Restore it, or, \
         to start over on purpose, run `mayfly audit new-chain --reason ...`"
    )]
    AuditGone { audit: PathBuf, present: String },
}

/// Refuses a data dir where part of the agent's state vanished beside the rest: an audit log
/// with records but no lease store, CA or JWT keys (they existed before any record was
/// written), or those without the audit log. Either way something was deleted, and silently
/// starting afresh would launder it. `embedded_ca`: the CA lives in the data dir.
pub fn check_continuity(path: &Path, embedded_ca: bool) -> Result<(), DataDirError> {
    let audit = path.join("audit");
    let parts = [
        ("the lease store", path.join("leases.redb"), true),
        ("the CA", path.join("ca"), embedded_ca),
        ("the JWT signing keys", path.join("jwt"), true),
    ];
    let present: Vec<String> = parts
        .iter()
        .filter(|(_, p, counts)| *counts && p.exists())
        .map(|(what, p, _)| format!("{what} {}", p.display()))
        .collect();
    if !audit.exists() {
        return match present.is_empty() {
            true => Ok(()),
            false => Err(DataDirError::AuditGone {
                audit,
                present: present.join(", "),
            }),
        };
    }
    let has_records = fs::read_dir(&audit)
        .map_err(|source| DataDirError::Io {
            path: audit.clone(),
            source,
        })?
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name().to_string_lossy().starts_with("audit-")
                && e.metadata().is_ok_and(|m| m.len() > 0)
        });
    let missing: Vec<String> = parts
        .iter()
        .filter(|(_, p, counts)| *counts && !p.exists())
        .map(|(what, p, _)| format!("{what} {}", p.display()))
        .collect();
    if has_records && !missing.is_empty() {
        return Err(DataDirError::Vanished {
            audit,
            missing: missing.join(", "),
        });
    }
    Ok(())
}

/// Creates the data dir (mode 0700) if it is missing, then checks it and everything in it.
pub fn prepare(path: &Path) -> Result<(), DataDirError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DataDirError::Io { path, source }
    };
    if !path.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io(path))?;
    }
    check(path, rustix::process::geteuid().as_raw())
}

/// Checks `path` and, for a directory, everything under it (symbolic links are checked, not
/// followed).
fn check(path: &Path, me: u32) -> Result<(), DataDirError> {
    let meta = fs::symlink_metadata(path).map_err(|source| DataDirError::Io {
        path: path.to_owned(),
        source,
    })?;
    if meta.uid() != me && meta.uid() != 0 {
        return Err(DataDirError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    // A symbolic link's own mode means nothing; its owner is checked above.
    let mode = meta.mode() & 0o7777;
    if !meta.file_type().is_symlink() && mode & 0o022 != 0 {
        return Err(DataDirError::Writable {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.is_dir() {
        let entries = fs::read_dir(path).map_err(|source| DataDirError::Io {
            path: path.to_owned(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| DataDirError::Io {
                path: path.to_owned(),
                source,
            })?;
            check(&entry.path(), me)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Issue 14, hole 8: a data dir of mode 0777 was used as it was, and another user swapped
    /// in their own CA and audit log.
    #[test]
    fn a_data_dir_others_can_write_is_refused_naming_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        prepare(&data).unwrap();
        assert_eq!(fs::metadata(&data).unwrap().mode() & 0o777, 0o700);
        let ca = data.join("ca");
        fs::create_dir(&ca).unwrap();
        chmod(&ca, 0o700);
        fs::write(ca.join("ca.key"), "k").unwrap();
        chmod(&ca.join("ca.key"), 0o600);
        prepare(&data).unwrap();

        chmod(&data, 0o777);
        let err = prepare(&data).unwrap_err().to_string();
        assert!(
            err.contains(&data.display().to_string()) && err.contains("0777"),
            "{err}"
        );
        assert!(err.contains("chmod go-w"), "{err}");
        chmod(&data, 0o700);

        chmod(&ca.join("ca.key"), 0o620);
        let err = prepare(&data).unwrap_err().to_string();
        assert!(err.contains("ca.key") && err.contains("0620"), "{err}");
        chmod(&ca.join("ca.key"), 0o600);
        // Readable by others is a different problem (the CA warns of it), not a takeover.
        chmod(&ca, 0o755);
        prepare(&data).unwrap();
    }

    #[test]
    fn a_file_of_another_user_in_the_data_dir_is_refused() {
        let me = rustix::process::geteuid().as_raw();
        if me != 0 {
            eprintln!("skipping: needs root to give a file to another user");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        prepare(&data).unwrap();
        let planted = data.join("audit");
        fs::create_dir(&planted).unwrap();
        chmod(&planted, 0o700);
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
        let err = check(&data, 1000).unwrap_err().to_string();
        assert!(
            err.contains("owned by uid 0") || err.contains("owned by uid 65534"),
            "{err}"
        );
        let err = prepare(&data).unwrap_err().to_string();
        assert!(err.contains("audit") && err.contains("uid 65534"), "{err}");
        assert!(err.contains("chown 0"), "{err}");
    }

    /// Issue 14, hole 9: a store, CA or JWT key that vanished beside an existing audit log was
    /// silently recreated, and so was an audit log that vanished beside the rest.
    #[test]
    fn a_part_that_vanished_beside_the_rest_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        check_continuity(d, true).unwrap();
        fs::create_dir(d.join("audit")).unwrap();
        fs::write(d.join("audit/audit-00000001.jsonl"), "").unwrap();
        // A log without records (an agent that never recorded anything) asks for nothing.
        check_continuity(d, true).unwrap();
        fs::write(d.join("audit/audit-00000001.jsonl"), "{}\n").unwrap();
        let err = check_continuity(d, true).unwrap_err().to_string();
        assert!(
            err.contains("the lease store") && err.contains("new-chain"),
            "{err}"
        );
        fs::write(d.join("leases.redb"), "").unwrap();
        fs::create_dir(d.join("jwt")).unwrap();
        let err = check_continuity(d, true).unwrap_err().to_string();
        assert!(
            err.contains("the CA") && !err.contains("lease store"),
            "{err}"
        );
        // An operator CA lives elsewhere.
        check_continuity(d, false).unwrap();
        fs::create_dir(d.join("ca")).unwrap();
        check_continuity(d, true).unwrap();
        fs::remove_dir_all(d.join("audit")).unwrap();
        let err = check_continuity(d, true).unwrap_err().to_string();
        assert!(err.contains("audit log") && err.contains("the CA"), "{err}");
    }
}
