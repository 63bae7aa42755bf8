//! Wakes a task as soon as something changes in the directories that hold some files (Linux
//! inotify), so that a renewed file is used within moments rather than at the next periodic
//! check. Watching the directories, not the files, sees what replaces a file too: a rename
//! over it, and the `..data` symlink swap of a Kubernetes Secret volume. It only wakes; the
//! caller still reads the files and compares them, and keeps its periodic check for what
//! inotify cannot see (a network file system, a directory that did not exist yet).

use std::collections::BTreeSet;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
use tokio::sync::mpsc;

/// How long to wait for more events after the first: a tool that writes a certificate and then
/// its key is read once, whole.
const SETTLE: Duration = Duration::from_millis(100);

/// One thread per watch blocks on the inotify descriptor (a second at a time, to notice that
/// the watch was dropped) and tells the task.
pub struct DirWatch {
    woken: mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl DirWatch {
    /// Watches the directories holding `files`.
    pub fn new<'a>(files: impl IntoIterator<Item = &'a Path>) -> io::Result<DirWatch> {
        let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
        let dirs: BTreeSet<PathBuf> = files
            .into_iter()
            .map(|f| match f.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        let flags = WatchFlags::CLOSE_WRITE
            | WatchFlags::MODIFY
            | WatchFlags::ATTRIB
            | WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO;
        for dir in &dirs {
            inotify::add_watch(&fd, dir.as_path(), flags)?;
        }
        let (tx, woken) = mpsc::channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("mayfly-dir-watch".into())
            .spawn(move || watch(fd, tx, stopped))?;
        Ok(DirWatch { woken, stop })
    }

    /// Resolves once something changed in a watched directory, and things have settled.
    pub async fn changed(&mut self) -> io::Result<()> {
        if self.woken.recv().await.is_none() {
            return Err(io::Error::other("the directory watch stopped"));
        }
        // Whatever else arrives while settling belongs to the same change.
        tokio::time::sleep(SETTLE).await;
        while self.woken.try_recv().is_ok() {}
        Ok(())
    }
}

fn watch(fd: OwnedFd, tx: mpsc::Sender<()>, stop: Arc<AtomicBool>) {
    let second = Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    while !stop.load(Ordering::Acquire) {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&second)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "directory watch failed");
                return;
            }
        }
        match drain(fd.as_fd()) {
            Ok(false) => {}
            // Full: a wake-up is already pending, which is all it takes.
            Ok(true) => match tx.try_send(()) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                Err(mpsc::error::TrySendError::Closed(())) => return,
            },
            Err(e) => {
                tracing::warn!(error = %e, "directory watch failed");
                return;
            }
        }
    }
}

/// Reads every queued event; whether there was any.
fn drain(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
    let mut reader = inotify::Reader::new(fd, &mut buf);
    let mut any = false;
    loop {
        match reader.next() {
            Ok(_) => any = true,
            Err(rustix::io::Errno::AGAIN) => return Ok(any),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rename_over_a_file_and_a_symlink_swap_wake_it() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("tls.crt");
        std::fs::write(&file, "one").unwrap();
        let mut watch = DirWatch::new([file.as_path()]).unwrap();
        let wait = Duration::from_secs(5);

        std::fs::write(tmp.path().join("new"), "two").unwrap();
        std::fs::rename(tmp.path().join("new"), &file).unwrap();
        tokio::time::timeout(wait, watch.changed())
            .await
            .unwrap()
            .unwrap();

        std::os::unix::fs::symlink("elsewhere", tmp.path().join("..data_tmp")).unwrap();
        std::fs::rename(tmp.path().join("..data_tmp"), tmp.path().join("..data")).unwrap();
        tokio::time::timeout(wait, watch.changed())
            .await
            .unwrap()
            .unwrap();

        // Quiet: nothing to wake for.
        let quiet = tokio::time::timeout(Duration::from_millis(200), watch.changed()).await;
        assert!(quiet.is_err(), "woke without a change");
    }
}
