//! Waiting for a process to exit, so that what is bound to it (a lease) can end with it:
//! one thread watches the pidfds of all waited-for processes.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use rustix::io::Errno;
use rustix::process::{pidfd_open, Pid, PidfdFlags};

use super::process::{pidfd_exited, process_start_time};

/// pidfds held by [`BoundProcess`]es: part of the descriptor budget the listeners keep.
static PINNED: AtomicUsize = AtomicUsize::new(0);

/// How many pidfds bound processes hold now.
pub fn pinned_pidfds() -> usize {
    PINNED.load(Ordering::Relaxed)
}

/// A process something is bound to (a lease's `unix:pid:PID:START`), pinned by a pidfd
/// opened once, at bind time.
///
/// A pid and a start time do not name a process uniquely: the kernel keeps the start time
/// only to the clock tick, so a process forked onto a just-freed pid within the same tick
/// looks the same. The pidfd does name it uniquely. While the pinned process lives, nobody
/// else can hold its pid, so a live caller with that pid is that process; once it has exited,
/// [`BoundProcess::is_alive`] is false for good, whoever holds the pid next.
#[derive(Debug)]
pub struct BoundProcess {
    pid: i32,
    start_time: u64,
    /// `None` when the process was already gone at bind time, or the kernel has no pidfds.
    pidfd: Option<OwnedFd>,
    /// The kernel has no pidfds: only the start time can be compared.
    no_pidfds: bool,
}

impl BoundProcess {
    /// Pins process `pid` started at `start_time`; a process not running now (or a different
    /// one under the pid) is pinned as gone.
    pub fn pin(pid: i32, start_time: u64) -> BoundProcess {
        let pinned = |pidfd: Option<OwnedFd>, no_pidfds: bool| {
            if pidfd.is_some() {
                PINNED.fetch_add(1, Ordering::Relaxed);
            }
            BoundProcess {
                pid,
                start_time,
                pidfd,
                no_pidfds,
            }
        };
        let Some(raw) = Pid::from_raw(pid).filter(|_| pid > 0) else {
            return pinned(None, false);
        };
        match pidfd_open(raw, PidfdFlags::empty()) {
            // The pidfd was opened first, so the start time read now describes its process.
            Ok(fd) if process_start_time(pid).ok() == Some(start_time) => pinned(Some(fd), false),
            Ok(_) => pinned(None, false),
            Err(Errno::NOSYS) => pinned(None, true),
            Err(_) => pinned(None, false),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the pinned process is still running. Without pidfds, whether a process with
    /// its pid and start time runs (which a reuse within one tick can fool).
    pub fn is_alive(&self) -> bool {
        match &self.pidfd {
            Some(fd) => matches!(pidfd_exited(fd), Ok(false)),
            None if self.no_pidfds => process_start_time(self.pid).ok() == Some(self.start_time),
            None => false,
        }
    }

    /// Resolves when the pinned process has exited (at once if it was gone when pinned).
    pub async fn exited(&self) {
        match &self.pidfd {
            Some(fd) => {
                let Ok(fd) = fd.try_clone() else { return };
                match exit_watcher() {
                    Ok(watcher) => watcher.wait(fd).await,
                    Err(e) => {
                        tracing::warn!(pid = self.pid, error = %e, "cannot watch pidfds; polling the process instead");
                        while self.is_alive() {
                            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                        }
                    }
                }
            }
            None => {
                while self.is_alive() {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
            }
        }
    }
}

impl Drop for BoundProcess {
    fn drop(&mut self) {
        if self.pidfd.is_some() {
            PINNED.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Resolves when process `pid`, started at `start_time`, has exited — at once if it is not
/// running now (or a different process holds the pid). A pidfd becomes readable when its
/// process exits, so there is no polling and no confusion with a recycled pid.
pub async fn wait_exit(pid: i32, start_time: u64) {
    BoundProcess::pin(pid, start_time).exited().await
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

    /// Issue 14, hole 3: a pid and a start time name a process only to the clock tick. The
    /// pinned process, once exited, is never alive again, whatever runs under its pid.
    #[tokio::test]
    async fn a_bound_process_that_exited_is_never_alive_again() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = process_start_time(pid).unwrap();
        let bound = BoundProcess::pin(pid, start);
        assert!(bound.is_alive());
        child.kill().unwrap();
        // Dead but not yet reaped (a zombie): no longer alive.
        tokio::time::timeout(std::time::Duration::from_secs(5), bound.exited())
            .await
            .expect("exit seen");
        assert!(!bound.is_alive());
        child.wait().unwrap();
        assert!(!bound.is_alive());
        // A live process pinned with the wrong start time is another process.
        let me = std::process::id() as i32;
        let wrong = BoundProcess::pin(me, process_start_time(me).unwrap() + 1);
        assert!(!wrong.is_alive());
        assert!(BoundProcess::pin(me, process_start_time(me).unwrap()).is_alive());
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
