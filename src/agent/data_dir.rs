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
}
