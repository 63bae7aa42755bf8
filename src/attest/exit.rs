//! Waiting for a process to exit, so that what is bound to it (a lease) can end with it:
//! one thread watches the pidfds of all waited-for processes.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rustix::io::Errno;
use rustix::process::{pidfd_open, Pid, PidfdFlags};

use super::process::process_start_time;

/// Resolves when process `pid`, started at `start_time`, has exited — at once if it is not
/// running now (or a different process holds the pid). A pidfd becomes readable when its
/// process exits, so there is no polling and no confusion with a recycled pid.
pub async fn wait_exit(pid: i32, start_time: u64) {
    let Some(raw) = Pid::from_raw(pid).filter(|_| pid > 0) else {
        return;
    };
    let Ok(fd) = pidfd_open(raw, PidfdFlags::empty()) else {
        return;
    };
    // The pidfd was opened first, so the start time read now describes the process it pins.
    if process_start_time(pid).ok() != Some(start_time) {
        return;
    }
    match exit_watcher() {
        Ok(watcher) => watcher.wait(fd).await,
        Err(e) => {
            tracing::warn!(pid, error = %e, "cannot watch pidfds; polling the process instead");
            while process_start_time(pid).ok() == Some(start_time) {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    }
}

/// One thread waits on an epoll set of every watched pidfd and wakes the waiter of each
/// process that exits. epoll_ctl is thread-safe, so registering needs no hand-off to it.
struct ExitWatcher {
    epoll: OwnedFd,
    waiters: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<()>>>,
    next: AtomicU64,
}

fn exit_watcher() -> Result<&'static ExitWatcher, String> {
    static WATCHER: std::sync::OnceLock<Result<&'static ExitWatcher, String>> =
        std::sync::OnceLock::new();
    WATCHER.get_or_init(ExitWatcher::start).clone()
}

impl ExitWatcher {
    /// Creates the epoll set and its thread; both live as long as the process.
    fn start() -> Result<&'static ExitWatcher, String> {
        let epoll = rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC)
            .map_err(|e| format!("epoll_create: {e}"))?;
        let watcher: &'static ExitWatcher = Box::leak(Box::new(ExitWatcher {
            epoll,
            waiters: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }));
        std::thread::Builder::new()
            .name("mayfly-exit-watch".into())
            .spawn(move || watcher.run())
            .map_err(|e| format!("spawning the exit watcher: {e}"))?;
        Ok(watcher)
    }

    async fn wait(&self, pidfd: OwnedFd) {
        use rustix::event::epoll;
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Waiter first, then the epoll registration: an exit that fires at once finds it.
        self.waiters
            .lock()
            .expect("exit watcher poisoned")
            .insert(key, tx);
        let _guard = Deregister {
            watcher: self,
            key,
            pidfd: &pidfd,
        };
        let added = epoll::add(
            &self.epoll,
            &pidfd,
            epoll::EventData::new_u64(key),
            epoll::EventFlags::IN | epoll::EventFlags::ONESHOT,
        );
        if added.is_ok() {
            let _ = rx.await;
        }
    }

    fn run(&self) {
        let mut events = Vec::with_capacity(64);
        loop {
            events.clear();
            if let Err(e) = rustix::event::epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                None,
            ) {
                if e != Errno::INTR {
                    tracing::error!(error = %e, "exit watcher stopped");
                    return;
                }
                continue;
            }
            for event in &events {
                self.fire(event.data.u64());
            }
        }
    }

    fn fire(&self, key: u64) {
        let waiter = self
            .waiters
            .lock()
            .expect("exit watcher poisoned")
            .remove(&key);
        if let Some(tx) = waiter {
            let _ = tx.send(());
        }
    }
}

/// Unregisters a waiter when it finishes or goes away early (its lease ended another way).
struct Deregister<'a> {
    watcher: &'a ExitWatcher,
    key: u64,
    pidfd: &'a OwnedFd,
}

impl Drop for Deregister<'_> {
    fn drop(&mut self) {
        self.watcher
            .waiters
            .lock()
            .expect("exit watcher poisoned")
            .remove(&self.key);
        let _ = rustix::event::epoll::delete(&self.watcher.epoll, self.pidfd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_exit_follows_the_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = process_start_time(pid).unwrap();
        let waiting = tokio::spawn(wait_exit(pid, start));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "resolved while the process runs");
        child.kill().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("exit seen")
            .unwrap();
        child.wait().unwrap();
        // Gone (or another process under the pid): resolves at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), wait_exit(pid, start))
            .await
            .expect("dead process resolves at once");
        let me = std::process::id() as i32;
        let wrong_start = process_start_time(me).unwrap() + 1;
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            wait_exit(me, wrong_start),
        )
        .await
        .expect("a different start time is another process");
    }

    #[tokio::test]
    async fn abandoned_exit_waits_are_unregistered() {
        let me = std::process::id() as i32;
        let w = ExitWatcher::start().unwrap();
        let fd = pidfd_open(Pid::from_raw(me).unwrap(), PidfdFlags::empty()).unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), w.wait(fd)).await;
        assert!(r.is_err(), "we are alive");
        assert!(w.waiters.lock().unwrap().is_empty());
    }
}
