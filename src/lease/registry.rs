//! The in-memory lease store: active leases indexed for matching, ended leases kept for
//! `task list --all`, one expiry timer per lease, and a change signal for open streams.
//!
//! Matching must stay cheap with thousands of leases: each lease is indexed under one of its
//! selectors (the most specific kind), so a caller with N selectors looks at N index buckets
//! and only the leases in them, never at every lease.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    validate_grant, GrantInput, Lease, LeaseError, LeaseId, LeaseLimits, LeaseState, Principal,
};

/// Ended leases kept in memory for `task list --all` (durable retention comes with the store).
const ENDED_KEPT: usize = 4096;

/// How long after a bound process exits the lease is ended as `process_exited`, unless its
/// wrapper completes it first.
const PROCESS_EXIT_GRACE: Duration = Duration::from_millis(200);

/// The processes a lease is bound to: every `unix:pid:PID:START` selector.
pub fn bound_processes(selectors: &[String]) -> Vec<(i32, u64)> {
    selectors
        .iter()
        .filter_map(|s| {
            let (pid, start) = s.strip_prefix("unix:pid:")?.split_once(':')?;
            Some((pid.parse().ok()?, start.parse().ok()?))
        })
        .collect()
}

/// An active lease as seen by the SVID cache: a snapshot plus the signals that follow it.
#[derive(Clone, Debug)]
pub struct ActiveLease {
    pub lease: Lease,
    /// Cancelled when the lease ends, for whatever reason.
    pub ended: CancellationToken,
    /// The current `expires_at`; changes on renewal.
    pub expires_at: watch::Receiver<SystemTime>,
}

struct Slot {
    lease: Lease,
    ended: CancellationToken,
    expires_at: watch::Sender<SystemTime>,
    index_key: String,
}

#[derive(Default)]
struct Inner {
    active: HashMap<LeaseId, Slot>,
    /// index selector -> leases indexed under it
    index: HashMap<String, HashSet<LeaseId>>,
    ended: VecDeque<Lease>,
}

pub struct Registry {
    limits: LeaseLimits,
    inner: RwLock<Inner>,
    /// Bumped on every grant, renewal and end, so open streams re-evaluate what they match.
    generation: watch::Sender<u64>,
    me: Weak<Registry>,
}

/// The selector a lease is indexed under: the kind that narrows callers most.
fn index_key(selectors: &[String]) -> String {
    const ORDER: [&str; 6] = [
        "unix:pid:",
        "unix:sha256:",
        "unix:path:",
        "unix:uid:",
        "unix:user:",
        "unix:gid:",
    ];
    ORDER
        .iter()
        .find_map(|p| selectors.iter().find(|s| s.starts_with(p)))
        .unwrap_or(&selectors[0])
        .clone()
}

impl Registry {
    pub fn new(limits: LeaseLimits) -> Arc<Self> {
        Arc::new_cyclic(|me| Registry {
            limits,
            inner: RwLock::new(Inner::default()),
            generation: watch::channel(0).0,
            me: me.clone(),
        })
    }

    pub fn limits(&self) -> &LeaseLimits {
        &self.limits
    }

    /// A receiver that changes whenever the set of active leases (or a lease's deadline) changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Validates and stores a lease, and starts its expiry timer. Must run inside a Tokio runtime.
    pub fn grant(&self, input: GrantInput, by: Principal) -> Result<Lease, LeaseError> {
        let lease = validate_grant(input, &self.limits, SystemTime::now(), by)?;
        let ended = CancellationToken::new();
        let (expires_tx, expires_rx) = watch::channel(lease.expires_at);
        let key = index_key(&lease.selectors);
        {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            inner
                .index
                .entry(key.clone())
                .or_default()
                .insert(lease.id.clone());
            inner.active.insert(
                lease.id.clone(),
                Slot {
                    lease: lease.clone(),
                    ended: ended.clone(),
                    expires_at: expires_tx,
                    index_key: key,
                },
            );
        }
        tracing::info!(
            event = "lease_granted",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            delegator = %lease.delegator,
            agent = %lease.agent,
            spiffe_id = %lease.spiffe_id,
            selectors = ?lease.selectors,
            expires_at = %crate::time::rfc3339(lease.expires_at),
            granted_by_uid = lease.granted_by.uid,
            granted_by_pid = ?lease.granted_by.pid,
            reason = %lease.reason,
            "lease granted"
        );
        self.spawn_expiry(lease.id.clone(), ended.clone(), expires_rx);
        self.spawn_process_watch(&lease, ended);
        self.bump();
        Ok(lease)
    }

    /// A lease bound to a process (`unix:pid:PID:START`) ends as `process_exited` when that
    /// process exits. The agent watches the process itself through a pidfd, so the lease ends
    /// even when whoever granted it (say, a killed `mayfly run`) is gone.
    fn spawn_process_watch(&self, lease: &Lease, ended: CancellationToken) {
        for (pid, start) in bound_processes(&lease.selectors) {
            let me = self.me.clone();
            let id = lease.id.clone();
            let ended = ended.clone();
            tokio::spawn(async move {
                let exited = crate::attest::wait_exit(pid, start);
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
                    let _ = registry.end(
                        &id,
                        LeaseState::ProcessExited,
                        Principal::agent(),
                        &format!("bound process {pid} exited"),
                    );
                }
            });
        }
    }

    fn spawn_expiry(
        &self,
        id: LeaseId,
        ended: CancellationToken,
        mut expires_at: watch::Receiver<SystemTime>,
    ) {
        let me = self.me.clone();
        tokio::spawn(async move {
            loop {
                let deadline = *expires_at.borrow_and_update();
                let wait = deadline
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::select! {
                    _ = ended.cancelled() => return,
                    changed = expires_at.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(wait) => {
                        let Some(registry) = me.upgrade() else { return };
                        // A renewal may have raced the timer: only a lease whose deadline has
                        // really passed is expired; otherwise loop and wait for the new one.
                        if registry.expire_if_due(&id) {
                            return;
                        }
                    }
                }
            }
        });
    }

    fn expire_if_due(&self, id: &LeaseId) -> bool {
        let due = {
            let inner = self.inner.read().expect("lease lock poisoned");
            match inner.active.get(id) {
                Some(slot) => slot.lease.expires_at <= SystemTime::now(),
                None => return true,
            }
        };
        if due {
            let _ = self.end(
                id,
                LeaseState::Expired,
                Principal::agent(),
                "expires_at reached",
            );
        }
        due
    }

    pub fn get(&self, id: &LeaseId) -> Result<Lease, LeaseError> {
        let inner = self.inner.read().expect("lease lock poisoned");
        if let Some(slot) = inner.active.get(id) {
            return Ok(slot.lease.clone());
        }
        inner
            .ended
            .iter()
            .find(|l| &l.id == id)
            .cloned()
            .ok_or_else(|| LeaseError::NotFound(id.to_string()))
    }

    /// Active leases (and, with `all`, ended ones still held), oldest first.
    pub fn list(&self, all: bool) -> Vec<Lease> {
        let inner = self.inner.read().expect("lease lock poisoned");
        let mut out: Vec<Lease> = inner.active.values().map(|s| s.lease.clone()).collect();
        if all {
            out.extend(inner.ended.iter().cloned());
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        out
    }

    /// Moves `expires_at` to now + ttl, never earlier than it is and never past `max_expires_at`.
    pub fn renew(&self, id: &LeaseId, ttl: Duration) -> Result<Lease, LeaseError> {
        let lease = {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            let Some(slot) = inner.active.get_mut(id) else {
                drop(inner);
                return Err(self.not_active(id));
            };
            if ttl < super::MIN_TTL {
                return Err(LeaseError::InvalidField {
                    field: "ttl",
                    message: "must be at least 1s".into(),
                });
            }
            let wanted = SystemTime::now() + ttl;
            if wanted > slot.lease.max_expires_at {
                return Err(LeaseError::InvalidField {
                    field: "ttl",
                    message: format!(
                        "would end at {}, past the lease's renewal ceiling max_expires_at {}",
                        crate::time::rfc3339(wanted),
                        crate::time::rfc3339(slot.lease.max_expires_at)
                    ),
                });
            }
            if wanted > slot.lease.expires_at {
                slot.lease.expires_at = wanted;
                slot.expires_at.send_replace(wanted);
            }
            slot.lease.clone()
        };
        tracing::info!(
            event = "lease_renewed",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            expires_at = %crate::time::rfc3339(lease.expires_at),
            "lease renewed"
        );
        self.bump();
        Ok(lease)
    }

    fn not_active(&self, id: &LeaseId) -> LeaseError {
        match self.get(id) {
            Ok(l) => LeaseError::NotActive {
                id: id.to_string(),
                state: l.state,
            },
            Err(e) => e,
        }
    }

    /// Ends an active lease: it stops matching at once, its SVID cache is torn down (through
    /// the `ended` token) and every open stream re-evaluates (through the generation).
    pub fn end(
        &self,
        id: &LeaseId,
        state: LeaseState,
        by: Principal,
        reason: &str,
    ) -> Result<Lease, LeaseError> {
        debug_assert_ne!(state, LeaseState::Active);
        let lease = {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            let Some(mut slot) = inner.active.remove(id) else {
                drop(inner);
                return Err(self.not_active(id));
            };
            if let Some(bucket) = inner.index.get_mut(&slot.index_key) {
                bucket.remove(id);
                if bucket.is_empty() {
                    inner.index.remove(&slot.index_key);
                }
            }
            slot.lease.state = state;
            slot.lease.ended_at = Some(SystemTime::now());
            slot.lease.ended_by = Some(by);
            if inner.ended.len() >= ENDED_KEPT {
                inner.ended.pop_front();
            }
            inner.ended.push_back(slot.lease.clone());
            slot.ended.cancel();
            slot.lease
        };
        tracing::info!(
            event = "lease_ended",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            state = %lease.state,
            ended_by_uid = ?lease.ended_by.as_ref().map(|p| p.uid),
            reason,
            "lease ended"
        );
        self.bump();
        Ok(lease)
    }

    /// The active, unexpired leases whose selectors are all among the caller's, oldest first.
    pub fn matching(&self, caller: &[String]) -> Vec<ActiveLease> {
        let now = SystemTime::now();
        let have: HashSet<&str> = caller.iter().map(String::as_str).collect();
        let inner = self.inner.read().expect("lease lock poisoned");
        let mut out = Vec::new();
        for s in caller {
            let Some(bucket) = inner.index.get(s) else {
                continue;
            };
            for id in bucket {
                let slot = &inner.active[id];
                if slot.lease.expires_at > now
                    && slot
                        .lease
                        .selectors
                        .iter()
                        .all(|s| have.contains(s.as_str()))
                {
                    out.push(ActiveLease {
                        lease: slot.lease.clone(),
                        ended: slot.ended.clone(),
                        expires_at: slot.expires_at.subscribe(),
                    });
                }
            }
        }
        out.sort_by(|a, b| {
            a.lease
                .created_at
                .cmp(&b.lease.created_at)
                .then_with(|| a.lease.id.cmp(&b.lease.id))
        });
        out
    }

    /// Whether the lease is active now (for the cache's check before it installs an entry).
    pub fn is_active(&self, id: &LeaseId) -> bool {
        let inner = self.inner.read().expect("lease lock poisoned");
        inner
            .active
            .get(id)
            .is_some_and(|s| s.lease.expires_at > SystemTime::now())
    }

    pub fn active_count(&self) -> usize {
        self.inner.read().expect("lease lock poisoned").active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{IdTemplate, DEFAULT_TEMPLATE};
    use spiffe::TrustDomain;

    fn registry() -> Arc<Registry> {
        Registry::new(LeaseLimits {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            template: IdTemplate::new(DEFAULT_TEMPLATE).unwrap(),
            max_ttl: Duration::from_secs(3600),
            default_svid_ttl: Duration::from_secs(300),
            max_svid_ttl: Duration::from_secs(3600),
        })
    }

    fn grant(r: &Registry, task: &str, selectors: &[&str], ttl: Duration) -> Lease {
        r.grant(
            GrantInput {
                task_id: task.into(),
                delegator: "alice".into(),
                agent: "a".into(),
                ttl: Some(ttl),
                max_ttl: Some(ttl * 2),
                selectors: selectors.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            Principal::agent(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn matching_needs_every_selector() {
        let r = registry();
        let hour = Duration::from_secs(1800);
        let a = grant(&r, "a", &["unix:uid:1000"], hour);
        let b = grant(&r, "b", &["unix:uid:1000", "unix:path:/bin/x"], hour);
        let _c = grant(&r, "c", &["unix:uid:1001"], hour);
        let ids = |sel: &[&str]| -> Vec<LeaseId> {
            let sel: Vec<String> = sel.iter().map(|s| s.to_string()).collect();
            r.matching(&sel).into_iter().map(|l| l.lease.id).collect()
        };
        assert_eq!(ids(&["unix:uid:1000"]), vec![a.id.clone()]);
        assert_eq!(
            ids(&["unix:uid:1000", "unix:path:/bin/x", "unix:gid:5"]),
            vec![a.id.clone(), b.id.clone()]
        );
        assert!(ids(&["unix:uid:1002"]).is_empty());
    }

    #[tokio::test]
    async fn thousands_of_leases_match_through_the_index() {
        let r = registry();
        for i in 0..5000 {
            grant(
                &r,
                &format!("t{i}"),
                &[&format!("unix:uid:{i}")],
                Duration::from_secs(600),
            );
        }
        let m = r.matching(&["unix:uid:4242".to_string(), "unix:gid:0".to_string()]);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].lease.task_id, "t4242");
    }

    #[tokio::test]
    async fn end_stops_matching_and_signals() {
        let r = registry();
        let mut generation = r.subscribe();
        let l = grant(&r, "a", &["unix:uid:7"], Duration::from_secs(60));
        let m = r.matching(&["unix:uid:7".to_string()]);
        generation.borrow_and_update();
        r.end(&l.id, LeaseState::Revoked, Principal::agent(), "test")
            .unwrap();
        assert!(m[0].ended.is_cancelled());
        assert!(generation.has_changed().unwrap());
        assert!(r.matching(&["unix:uid:7".to_string()]).is_empty());
        assert_eq!(r.get(&l.id).unwrap().state, LeaseState::Revoked);
        assert!(matches!(
            r.end(&l.id, LeaseState::Completed, Principal::agent(), ""),
            Err(LeaseError::NotActive { .. })
        ));
        assert_eq!(r.list(false).len(), 0);
        assert_eq!(r.list(true).len(), 1);
    }

    #[tokio::test]
    async fn expiry_fires_without_anyone_asking() {
        let r = registry();
        let l = grant(&r, "a", &["unix:uid:7"], Duration::from_secs(1));
        let m = r.matching(&["unix:uid:7".to_string()]);
        tokio::time::timeout(Duration::from_secs(5), m[0].ended.cancelled())
            .await
            .expect("lease expired within 5s");
        assert_eq!(r.get(&l.id).unwrap().state, LeaseState::Expired);
    }

    #[tokio::test]
    async fn renewal_is_capped_by_max_expires_at() {
        let r = registry();
        let l = grant(&r, "a", &["unix:uid:7"], Duration::from_secs(60));
        let renewed = r.renew(&l.id, Duration::from_secs(100)).unwrap();
        assert!(renewed.expires_at > l.expires_at);
        let err = r.renew(&l.id, Duration::from_secs(200)).unwrap_err();
        assert!(matches!(err, LeaseError::InvalidField { field: "ttl", .. }));
    }
}
