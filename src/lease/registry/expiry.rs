//! What ends leases without anyone asking: the one task that serves every deadline, and a watch
//! on each process a lease is bound to.

use std::sync::atomic::Ordering;
use std::time::Duration;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::attest::BoundProcess;
use crate::lease::{Lease, LeaseId, LeaseState, Principal};
use crate::time::Boot;

use super::Leases;

/// The expiry task re-reads the boot clock at least this often.
const EXPIRY_MAX_SLEEP: Duration = Duration::from_secs(1);

/// How long after a bound process exits the lease is ended as `process_exited`, unless its
/// wrapper completes it first.
const PROCESS_EXIT_GRACE: Duration = Duration::from_millis(200);

impl Leases {
    /// A lease bound to a process (`unix:pid:PID:START`) ends as `process_exited` when that
    /// process exits. The agent watches the process itself through a pidfd, so the lease ends
    /// even when whoever granted it (say, a killed `mayfly run`) is gone.
    ///
    /// It stops matching the moment the process exits (see [`index`](super::index)); the end
    /// itself waits a moment for `mayfly run` to complete the lease instead.
    pub(super) fn spawn_process_watch(
        &self,
        lease: &Lease,
        ended: CancellationToken,
        bound: Vec<Arc<BoundProcess>>,
    ) {
        for process in bound {
            let me = self.me.clone();
            let id = lease.id.clone();
            let ended = ended.clone();
            let pid = process.pid();
            self.spawn(async move {
                let exited = process.exited();
                tokio::select! {
                    _ = ended.cancelled() => return,
                    _ = exited => {}
                }
                // `mayfly run` completes its lease right after its child exits; give that
                // call a moment to land so the lease records `completed`, not a race.
                tokio::select! {
                    _ = ended.cancelled() => return,
                    _ = tokio::time::sleep(PROCESS_EXIT_GRACE) => {}
                }
                if let Some(registry) = me.upgrade() {
                    let _ = registry
                        .end(
                            &id,
                            LeaseState::ProcessExited,
                            Principal::agent(),
                            &format!("bound process {pid} exited"),
                        )
                        .await;
                }
            });
        }
    }

    /// Starts the one task that expires leases (on the first activation, inside the runtime).
    pub(super) fn start_expiry(&self) {
        if self.expiry_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.me.clone();
        let moved = self.deadline_moved.clone();
        self.spawn(async move {
            loop {
                let Some(registry) = me.upgrade() else { return };
                let next = registry.expire_due();
                drop(registry);
                tokio::select! {
                    _ = moved.notified() => {}
                    _ = tokio::time::sleep(next) => {}
                }
            }
        });
    }

    /// Ends every lease whose deadline has passed on the boot clock (in memory at once; the
    /// records are written by tasks of their own, so a thousand expiries at one instant do not
    /// queue behind each other's fsync). Returns how long to sleep before the next deadline.
    fn expire_due(&self) -> Duration {
        loop {
            let now = Boot::now();
            let due: Vec<(Boot, LeaseId)> = {
                let inner = self.inner.read().expect("lease lock poisoned");
                inner
                    .deadlines
                    .iter()
                    .take_while(|(at, _)| *at <= now)
                    .cloned()
                    .collect()
            };
            if due.is_empty() {
                break;
            }
            for (at, id) in due {
                match self.end_now(
                    &id,
                    LeaseState::Expired,
                    Principal::agent(),
                    "expires_at reached",
                ) {
                    Some(ended) => {
                        let Some(me) = self.me.upgrade() else { break };
                        self.spawn(async move {
                            me.record_ends(&ended).await;
                        });
                    }
                    // Not active (cannot happen: ends remove their deadline); never spin on it.
                    None => {
                        self.inner
                            .write()
                            .expect("lease lock poisoned")
                            .deadlines
                            .remove(&(at, id));
                    }
                }
            }
        }
        let inner = self.inner.read().expect("lease lock poisoned");
        // A deadline that passed since the loop above (microseconds ago) means no sleep at all.
        let next = inner.deadlines.first().map(|(at, _)| at.remaining());
        // Tokio sleeps on the monotonic clock, which stops during suspend; the boot clock does
        // not: look again at least this often, so a resumed machine ends what expired meanwhile.
        next.unwrap_or(EXPIRY_MAX_SLEEP).min(EXPIRY_MAX_SLEEP)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::lease::{Lease, LeaseId, LeaseState};
    use std::time::{Duration, SystemTime};

    /// Issue 14, hole 3: a victim bound to `unix:pid:P` was killed, and an attacker forked onto
    /// P within the same clock tick, so its pid and start time were the victim's. During the
    /// exit grace the lease still matched, and the attacker got the victim's SVID.
    #[tokio::test]
    async fn a_bound_process_that_exited_never_matches_again_even_within_the_grace() {
        let r = registry();
        let mut victim = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = victim.id() as i32;
        let start = crate::attest::process_start_time(pid).unwrap();
        let bound = format!("unix:pid:{pid}:{start}");
        let l = grant(
            &r,
            "victim",
            &[&bound, "unix:uid:7"],
            Duration::from_secs(60),
        )
        .await;
        // What the victim, or anyone presenting its very pid and start time, shows.
        let same = selectors(&[&bound, "unix:uid:7"]);
        assert_eq!(r.matching(&same).len(), 1);
        victim.kill().unwrap();
        victim.wait().unwrap();
        // At once, well inside the grace that lets `mayfly run` complete the lease first.
        assert!(r.matching(&same).is_empty(), "an exited process matched");
        assert!(!r.matches_any(&same));
        // And then it ends.
        for _ in 0..100 {
            if r.get(&l.id).await.unwrap().state == LeaseState::ProcessExited {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the lease did not end after its process exited");
    }

    #[tokio::test]
    async fn expiry_fires_without_anyone_asking() {
        let r = registry();
        let l = grant(&r, "a", &["unix:uid:7"], Duration::from_secs(1)).await;
        let m = r.matching(&selectors(&["unix:uid:7"]));
        tokio::time::timeout(Duration::from_secs(5), m[0].ended.cancelled())
            .await
            .expect("lease expired within 5s");
        assert_eq!(r.get(&l.id).await.unwrap().state, LeaseState::Expired);
    }

    #[tokio::test]
    async fn one_task_expires_each_lease_at_its_own_deadline() {
        let r = registry();
        let second = Duration::from_secs(1);
        let renewed = grant(&r, "renewed", &["unix:uid:1"], 2 * second).await;
        let plain = grant(&r, "plain", &["unix:uid:2"], second).await;
        let uids: Vec<String> = (0..200).map(|i| format!("unix:uid:{}", 100 + i)).collect();
        let many: Vec<Lease> = futures::future::join_all(uids.iter().map(|u| {
            let r = &r;
            async move { grant(r, "many", &[u.as_str()], second).await }
        }))
        .await;
        // From a deadline at ~2s to one at ~3s: the old deadline must not end it. Deadlines
        // are whole seconds, so the checks are timed from the deadlines the leases show.
        let renewed_until = r.renew(&renewed.id, 3 * second).await.unwrap().expires_at;
        let state = |id: LeaseId| {
            let r = r.clone();
            async move { r.get(&id).await.unwrap().state }
        };
        let until = |t: SystemTime| {
            tokio::time::sleep(t.duration_since(SystemTime::now()).unwrap_or_default())
        };
        let half = Duration::from_millis(500);
        let last_short = many.iter().map(|l| l.expires_at).max().unwrap();
        until(last_short.max(plain.expires_at) + half).await;
        assert_eq!(state(plain.id.clone()).await, LeaseState::Expired);
        for l in &many {
            assert_eq!(state(l.id.clone()).await, LeaseState::Expired);
        }
        assert!(renewed_until > renewed.expires_at);
        until(renewed.expires_at + half).await;
        assert_eq!(state(renewed.id.clone()).await, LeaseState::Active);
        until(renewed_until + half).await;
        assert_eq!(state(renewed.id.clone()).await, LeaseState::Expired);
        assert!(r.inner.read().unwrap().deadlines.is_empty());
    }
}
