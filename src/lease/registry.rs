//! The lease registry: active leases indexed for matching, ended leases kept for
//! `task list --all`, one expiry timer per lease, a change signal for open streams, and every
//! change written to the lease store and the audit log.
//!
//! Write order is chosen for failing closed: a grant or renewal takes effect only after its
//! audit record and store write are durable; an end takes effect in memory at once (identity
//! must go away even if the disk is failing) and is then written, loudly if that fails.
//!
//! Matching must stay cheap with thousands of leases: each lease is indexed under one of its
//! selectors (the most specific kind), so a caller with N selectors looks at N index buckets
//! and only the leases in them, never at every lease. Change signals follow the same index: a
//! lease can only ever match callers that hold its index selector, so a change to it wakes the
//! open streams listening on that selector and no others.

use std::collections::BTreeSet;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{event, AuditLog, Event};
use crate::identity::{Selector, Selectors};

use super::{
    validate_grant, GrantInput, Lease, LeaseError, LeaseId, LeaseLimits, LeaseState, LeaseStore,
    Principal,
};

/// Ended leases kept in memory for `task list --all` (durable retention comes with the store).
const ENDED_KEPT: usize = 4096;

/// The expiry task re-reads the wall clock at least this often.
const EXPIRY_MAX_SLEEP: Duration = Duration::from_secs(1);

/// How long after a bound process exits the lease is ended as `process_exited`, unless its
/// wrapper completes it first.
const PROCESS_EXIT_GRACE: Duration = Duration::from_millis(200);

/// An active lease as seen by the SVID cache: a snapshot plus the signals that follow it.
#[derive(Clone, Debug)]
pub struct ActiveLease {
    /// Shared with the registry (cheap to hand to every fetch); a renewal replaces it.
    pub lease: Arc<Lease>,
    /// Cancelled when the lease ends, for whatever reason.
    pub ended: CancellationToken,
    /// The current `expires_at`; changes on renewal.
    pub expires_at: watch::Receiver<SystemTime>,
}

struct Slot {
    lease: Arc<Lease>,
    ended: CancellationToken,
    /// Created when the SVID cache first asks (most leases never need one).
    expires_at: OnceLock<watch::Sender<SystemTime>>,
}

#[derive(Default)]
struct Inner {
    active: HashMap<LeaseId, Slot>,
    /// Held back by an approval gate; never matched, never issued for.
    pending: HashMap<LeaseId, (Lease, CancellationToken)>,
    /// index selector -> leases indexed under it
    index: HashMap<Selector, HashSet<LeaseId>>,
    ended: VecDeque<Lease>,
    /// Every active lease by `expires_at`, soonest first (what the expiry task serves).
    deadlines: BTreeSet<(SystemTime, LeaseId)>,
}

/// Where lease changes are made durable.
#[derive(Clone)]
pub struct Durable {
    pub store: Arc<dyn LeaseStore>,
    pub audit: AuditLog,
    pub metrics: crate::telemetry::Metrics,
}

/// Open streams listening for changes, by the selectors they hold.
#[derive(Default)]
struct Listeners {
    next: u64,
    by_selector: HashMap<Selector, HashMap<u64, Arc<Notify>>>,
}

/// Tells one listener (an open stream) that a lease it could match was granted, renewed or
/// ended. Dropping it unregisters.
pub struct Changes {
    registry: Weak<Leases>,
    id: u64,
    selectors: Selectors,
    notify: Arc<Notify>,
}

impl Changes {
    /// Resolves at the next change after the previous call returned (a change in between is
    /// not lost: it resolves at once).
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut listeners = registry.listeners.lock().expect("listeners poisoned");
        for s in &self.selectors {
            if let Some(set) = listeners.by_selector.get_mut(s.as_str()) {
                set.remove(&self.id);
                if set.is_empty() {
                    listeners.by_selector.remove(s.as_str());
                }
            }
        }
    }
}

pub struct Leases {
    limits: LeaseLimits,
    durable: Durable,
    inner: RwLock<Inner>,
    /// Who to wake when a lease indexed under a selector changes.
    listeners: Mutex<Listeners>,
    /// One task expires every lease; told when a sooner deadline arrives.
    deadline_moved: Arc<Notify>,
    expiry_started: AtomicBool,
    /// Every per-lease task (timers, process watches, SVID rotation), stopped by `close`.
    tasks: TaskTracker,
    closing: CancellationToken,
    me: Weak<Leases>,
}

/// The slots of the active, unexpired leases whose selectors are all among the caller's: each
/// found through the index bucket of one of the caller's selectors, never by scanning.
fn matched<'a>(inner: &'a Inner, caller: &'a Selectors) -> impl Iterator<Item = &'a Slot> + 'a {
    let now = SystemTime::now();
    caller
        .iter()
        .filter_map(|s| inner.index.get(s))
        .flatten()
        .map(|id| &inner.active[id])
        .filter(move |slot| slot.lease.expires_at > now && slot.lease.selectors.all_in(caller))
}

/// Why a lease stored as active cannot resume after a restart, if it cannot: it expired, or a
/// process it is bound to is gone (checked against the start time, so a reused PID is gone).
fn stale(lease: &Lease, now: SystemTime) -> Option<(LeaseState, String)> {
    if lease.expires_at <= now {
        return Some((
            LeaseState::Expired,
            "expired while the agent was down".to_string(),
        ));
    }
    let (pid, _) = lease
        .selectors
        .processes()
        .find(|&(pid, start)| crate::attest::process_start_time(pid).ok() != Some(start))?;
    Some((
        LeaseState::ProcessExited,
        format!("bound process {pid} exited while the agent was down"),
    ))
}

/// The selector a lease is indexed under: the kind that narrows callers most.
fn index_key(selectors: &Selectors) -> Selector {
    selectors
        .index_key()
        .expect("a lease has at least one selector")
        .clone()
}

impl Leases {
    /// A registry whose every change is stored and audited before (or, for ends, right after)
    /// it takes effect.
    pub fn new(limits: LeaseLimits, durable: Durable) -> Arc<Self> {
        Arc::new_cyclic(|me| Leases {
            limits,
            durable,
            inner: RwLock::new(Inner::default()),
            listeners: Mutex::new(Listeners::default()),
            deadline_moved: Arc::new(Notify::new()),
            expiry_started: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            closing: CancellationToken::new(),
            me: me.clone(),
        })
    }

    pub fn limits(&self) -> &LeaseLimits {
        &self.limits
    }

    /// Change signals for a caller holding `selectors`: a grant, renewal or end of any lease
    /// that could match such a caller (exactly those indexed under one of its selectors).
    pub fn changes(&self, selectors: &Selectors) -> Changes {
        let notify = Arc::new(Notify::new());
        let mut listeners = self.listeners.lock().expect("listeners poisoned");
        listeners.next += 1;
        let id = listeners.next;
        let selectors = selectors.clone();
        for s in &selectors {
            listeners
                .by_selector
                .entry(s.clone())
                .or_default()
                .insert(id, notify.clone());
        }
        Changes {
            registry: self.me.clone(),
            id,
            selectors,
            notify,
        }
    }

    /// Runs a per-lease task until it finishes or the registry closes.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let closing = self.closing.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = closing.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Stops every per-lease task and waits for them, so the store can be closed. Leases stay
    /// as they are on disk; the next start takes them over.
    pub async fn close(&self) {
        self.closing.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Wakes the listeners a change to a lease indexed under `key` concerns.
    fn changed(&self, key: &Selector) {
        let listeners = self.listeners.lock().expect("listeners poisoned");
        if let Some(set) = listeners.by_selector.get(key) {
            for notify in set.values() {
                notify.notify_one();
            }
        }
    }

    /// Validates a grant request into a lease (nothing is stored): what policies judge.
    pub fn prepare(&self, input: GrantInput, by: Principal) -> Result<Lease, LeaseError> {
        validate_grant(input, &self.limits, SystemTime::now(), by)
    }

    /// Validates and grants in one step (no policy in between).
    pub async fn grant_input(&self, input: GrantInput, by: Principal) -> Result<Lease, LeaseError> {
        let lease = self.prepare(input, by)?;
        self.grant(lease).await
    }

    /// Makes a prepared lease durable (audit record, then store), and only then activates it.
    /// Must run inside a Tokio runtime.
    pub async fn grant(&self, lease: Lease) -> Result<Lease, LeaseError> {
        self.persist("granted", &lease, "").await?;
        tracing::info!(
            event = "lease_granted",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            delegator = %lease.delegator,
            agent = %lease.agent,
            spiffe_id = %lease.spiffe_id,
            selectors = %lease.selectors.joined(),
            expires_at = %crate::time::rfc3339(lease.expires_at),
            granted_by_uid = lease.granted_by.uid,
            granted_by_pid = lease.granted_by.pid,
            reason = %lease.reason,
            "lease granted"
        );
        self.activate(lease.clone());
        Ok(lease)
    }

    /// Holds a prepared lease as `pending` until someone approves it, or until
    /// `approval_timeout` passes, when it ends as `expired`. `gates` name the policies that
    /// required approval.
    pub async fn hold(
        &self,
        mut lease: Lease,
        approval_timeout: Duration,
        gates: &[String],
    ) -> Result<Lease, LeaseError> {
        lease.state = LeaseState::Pending;
        lease.approval_deadline = Some(SystemTime::now() + approval_timeout);
        self.persist("pending", &lease, &gates.join(", ")).await?;
        tracing::info!(
            event = "lease_pending",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            gates = %gates.join(", "),
            "lease held for approval"
        );
        self.park(lease.clone());
        Ok(lease)
    }

    /// Puts a pending lease aside with its approval deadline timer.
    fn park(&self, lease: Lease) {
        let cancel = CancellationToken::new();
        let deadline = lease.approval_deadline.unwrap_or_else(SystemTime::now);
        self.inner
            .write()
            .expect("lease lock poisoned")
            .pending
            .insert(lease.id.clone(), (lease.clone(), cancel.clone()));
        let me = self.me.clone();
        let id = lease.id;
        self.spawn(async move {
            let wait = deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(wait) => {
                    if let Some(r) = me.upgrade() {
                        r.expire_pending(&id).await;
                    }
                }
            }
        });
    }

    async fn expire_pending(&self, id: &LeaseId) {
        let taken = self
            .inner
            .write()
            .expect("lease lock poisoned")
            .pending
            .remove(id);
        if let Some((mut lease, _)) = taken {
            lease.mark_ended(
                LeaseState::Expired,
                Principal::agent(),
                "not approved in time",
            );
            self.remember_ended(lease.clone());
            self.record_end(&lease).await;
        }
    }

    fn remember_ended(&self, lease: Lease) {
        let mut inner = self.inner.write().expect("lease lock poisoned");
        if inner.ended.len() >= ENDED_KEPT {
            inner.ended.pop_front();
        }
        inner.ended.push_back(lease);
    }

    /// Approves a pending lease: four eyes (the approver is not the grantor), then it becomes
    /// active with its TTLs counted from now.
    pub async fn approve(&self, id: &LeaseId, approver: Principal) -> Result<Lease, LeaseError> {
        let pending = {
            let inner = self.inner.read().expect("lease lock poisoned");
            inner.pending.get(id).map(|(l, _)| l.clone())
        };
        let Some(mut lease) = pending else {
            return Err(self.not_active(id).await);
        };
        if approver.uid == lease.granted_by.uid {
            return Err(LeaseError::SelfApproval(format!(
                "uid {} granted lease {id} and cannot approve it (four eyes)",
                approver.uid
            )));
        }
        let now = SystemTime::now();
        let shift = now.duration_since(lease.created_at).unwrap_or_default();
        lease.expires_at = crate::time::floor_secs(lease.expires_at + shift);
        lease.max_expires_at = crate::time::floor_secs(lease.max_expires_at + shift);
        lease.state = LeaseState::Active;
        lease.approved_at = Some(now);
        lease.approved_by = Some(approver);
        self.persist("approved", &lease, "").await?;
        let taken = self
            .inner
            .write()
            .expect("lease lock poisoned")
            .pending
            .remove(id);
        let Some((_, timer)) = taken else {
            // Expired (or approved by someone else) while this approval was being written.
            return Err(self.not_active(id).await);
        };
        timer.cancel();
        tracing::info!(
            event = "lease_approved",
            lease_id = %lease.id,
            approver_uid = lease.approved_by.as_ref().map(|p| p.uid),
            "lease approved"
        );
        self.activate(lease.clone());
        Ok(lease)
    }

    /// Puts a lease into the active set, under the expiry task's eye.
    fn activate(&self, lease: Lease) {
        self.activate_all(vec![Arc::new(lease)]);
    }

    /// Puts leases into the active set under one write lock (start-up restores thousands).
    fn activate_all(&self, leases: Vec<Arc<Lease>>) {
        let mut keys = Vec::with_capacity(leases.len());
        let mut watched = Vec::new();
        {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            for lease in leases {
                let ended = CancellationToken::new();
                let key = index_key(&lease.selectors);
                inner
                    .index
                    .entry(key.clone())
                    .or_default()
                    .insert(lease.id.clone());
                inner.deadlines.insert((lease.expires_at, lease.id.clone()));
                if lease.selectors.processes().next().is_some() {
                    watched.push((lease.clone(), ended.clone()));
                }
                inner.active.insert(
                    lease.id.clone(),
                    Slot {
                        lease,
                        ended,
                        expires_at: OnceLock::new(),
                    },
                );
                keys.push(key);
            }
        }
        self.start_expiry();
        self.deadline_moved.notify_one();
        for (lease, ended) in watched {
            self.spawn_process_watch(&lease, ended);
        }
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            self.changed(&key);
        }
    }

    /// Writes the audit record, then the store. Either failing refuses the change.
    async fn persist(&self, what: &str, lease: &Lease, reason: &str) -> Result<(), LeaseError> {
        let d = &self.durable;
        let event = Event::Lease(audit_change(what, lease, reason));
        crate::telemetry::timed(&d.metrics.audit_write_seconds, d.audit.record(&event))
            .await
            .map_err(|e| {
            tracing::error!(event = "audit_failed", error = %e, "audit log unavailable: refusing the change");
            LeaseError::Unavailable(format!("audit log unavailable: {e}"))
        })?;
        let store = d.store.clone();
        let record = lease.clone();
        tokio::task::spawn_blocking(move || store.put(&record))
            .await
            .map_err(|e| LeaseError::Unavailable(format!("lease store: {e}")))?
            .map_err(|e| {
                tracing::error!(event = "store_failed", error = %e, "lease store unavailable");
                LeaseError::Unavailable(format!("lease store unavailable: {e}"))
            })
    }

    /// A lease bound to a process (`unix:pid:PID:START`) ends as `process_exited` when that
    /// process exits. The agent watches the process itself through a pidfd, so the lease ends
    /// even when whoever granted it (say, a killed `mayfly run`) is gone.
    fn spawn_process_watch(&self, lease: &Lease, ended: CancellationToken) {
        for (pid, start) in lease.selectors.processes() {
            let me = self.me.clone();
            let id = lease.id.clone();
            let ended = ended.clone();
            self.spawn(async move {
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
    fn start_expiry(&self) {
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

    /// Ends every lease whose `expires_at` has passed (in memory at once; the records are
    /// written by tasks of their own, so a thousand expiries at one instant do not queue
    /// behind each other's fsync). Returns how long to sleep before the next deadline.
    fn expire_due(&self) -> Duration {
        loop {
            let now = SystemTime::now();
            let due: Vec<(SystemTime, LeaseId)> = {
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
                    Some(lease) => {
                        let Some(me) = self.me.upgrade() else { break };
                        self.spawn(async move {
                            me.record_end(&lease).await;
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
        let next = inner.deadlines.first().map(|(at, _)| *at);
        // A deadline that passed since the loop above (microseconds ago) means no sleep at all.
        next.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
        .unwrap_or(EXPIRY_MAX_SLEEP)
        // Wall-clock deadlines, monotonic sleeps: look again at least this often, so a clock
        // step cannot hold a lease open for long.
        .min(EXPIRY_MAX_SLEEP)
    }

    pub async fn get(&self, id: &LeaseId) -> Result<Lease, LeaseError> {
        if let Some(lease) = self.get_cached(id) {
            return Ok(lease);
        }
        self.stored()
            .await?
            .into_iter()
            .find(|l| &l.id == id)
            .map(Arc::unwrap_or_clone)
            .ok_or_else(|| LeaseError::NotFound(id.to_string()))
    }

    fn get_cached(&self, id: &LeaseId) -> Option<Lease> {
        let inner = self.inner.read().expect("lease lock poisoned");
        if let Some(slot) = inner.active.get(id) {
            return Some(Lease::clone(&slot.lease));
        }
        if let Some((lease, _)) = inner.pending.get(id) {
            return Some(lease.clone());
        }
        inner.ended.iter().find(|l| &l.id == id).cloned()
    }

    /// Every lease in the store.
    async fn stored(&self) -> Result<Vec<Arc<Lease>>, LeaseError> {
        let store = self.durable.store.clone();
        tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| LeaseError::Unavailable(format!("lease store: {e}")))?
            .map_err(|e| LeaseError::Unavailable(format!("lease store: {e}")))
    }

    /// Active leases (and, with `all`, ended ones still retained), oldest first.
    pub async fn list(&self, all: bool) -> Result<Vec<Lease>, LeaseError> {
        let mut out: Vec<Lease> = {
            let inner = self.inner.read().expect("lease lock poisoned");
            inner
                .active
                .values()
                .map(|s| Lease::clone(&s.lease))
                .chain(inner.pending.values().map(|(l, _)| l.clone()))
                .collect()
        };
        if all {
            out.extend(
                self.stored()
                    .await?
                    .into_iter()
                    .filter(|l| !matches!(l.state, LeaseState::Active | LeaseState::Pending))
                    .map(Arc::unwrap_or_clone),
            );
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Moves `expires_at` to now + ttl, never earlier than it is and never past `max_expires_at`.
    pub async fn renew(&self, id: &LeaseId, ttl: Duration) -> Result<Lease, LeaseError> {
        if ttl < super::MIN_TTL {
            return Err(LeaseError::InvalidField {
                field: "ttl",
                message: "must be at least 1s".into(),
            });
        }
        let wanted = crate::time::floor_secs(SystemTime::now() + ttl);
        let mut lease = match self.get_active(id) {
            Some(l) => l,
            None => return Err(self.not_active(id).await),
        };
        if wanted > lease.max_expires_at {
            return Err(LeaseError::InvalidField {
                field: "ttl",
                message: format!(
                    "would end at {}, past the lease's renewal ceiling max_expires_at {}",
                    crate::time::rfc3339(wanted),
                    crate::time::rfc3339(lease.max_expires_at)
                ),
            });
        }
        lease.expires_at = lease.expires_at.max(wanted);
        self.persist("renewed", &lease, "").await?;
        let renewed = {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            let Inner {
                active, deadlines, ..
            } = &mut *inner;
            active.get_mut(id).map(|slot| {
                if wanted > slot.lease.expires_at {
                    deadlines.remove(&(slot.lease.expires_at, id.clone()));
                    deadlines.insert((wanted, id.clone()));
                    Arc::make_mut(&mut slot.lease).expires_at = wanted;
                    if let Some(tx) = slot.expires_at.get() {
                        tx.send_replace(wanted);
                    }
                }
                Lease::clone(&slot.lease)
            })
        };
        // It may have ended while the renewal was being written.
        let Some(lease) = renewed else {
            return Err(self.not_active(id).await);
        };
        tracing::info!(
            event = "lease_renewed",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            expires_at = %crate::time::rfc3339(lease.expires_at),
            "lease renewed"
        );
        self.changed(&index_key(&lease.selectors));
        Ok(lease)
    }

    fn get_active(&self, id: &LeaseId) -> Option<Lease> {
        let inner = self.inner.read().expect("lease lock poisoned");
        inner.active.get(id).map(|s| Lease::clone(&s.lease))
    }

    async fn not_active(&self, id: &LeaseId) -> LeaseError {
        match self.get(id).await {
            Ok(l) => LeaseError::NotActive {
                id: id.to_string(),
                state: l.state,
            },
            Err(e) => e,
        }
    }

    /// Ends an active (or pending) lease: it stops matching at once, its SVID cache is torn down (through
    /// the `ended` token) and every open stream re-evaluates (through the generation).
    pub async fn end(
        &self,
        id: &LeaseId,
        state: LeaseState,
        by: Principal,
        reason: &str,
    ) -> Result<Lease, LeaseError> {
        let Some(lease) = self.end_now(id, state, by, reason) else {
            return Err(self.not_active(id).await);
        };
        self.record_end(&lease).await;
        Ok(lease)
    }

    /// The in-memory half of [`Leases::end`]: from here on the lease matches nobody.
    fn end_now(
        &self,
        id: &LeaseId,
        state: LeaseState,
        by: Principal,
        reason: &str,
    ) -> Option<Lease> {
        let lease = {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            let inner = &mut *inner;
            let mut lease = match inner.active.remove(id) {
                // A pending lease can be ended too (revoked before anyone approved it).
                None => {
                    let (lease, timer) = inner.pending.remove(id)?;
                    timer.cancel();
                    lease
                }
                Some(slot) => {
                    // A lease's selectors never change, nor does its index key.
                    let key = index_key(&slot.lease.selectors);
                    if let Some(bucket) = inner.index.get_mut(&key) {
                        bucket.remove(id);
                        if bucket.is_empty() {
                            inner.index.remove(&key);
                        }
                    }
                    inner.deadlines.remove(&(slot.lease.expires_at, id.clone()));
                    slot.ended.cancel();
                    Arc::unwrap_or_clone(slot.lease)
                }
            };
            lease.mark_ended(state, by, reason);
            if inner.ended.len() >= ENDED_KEPT {
                inner.ended.pop_front();
            }
            inner.ended.push_back(lease.clone());
            lease
        };
        self.changed(&index_key(&lease.selectors));
        Some(lease)
    }

    /// Logs and persists an end that has already taken effect. A failure cannot undo it (the
    /// identity is gone either way), so it is reported as loudly as we can.
    async fn record_end(&self, lease: &Lease) {
        let reason = lease.end_reason.as_str();
        tracing::info!(
            event = "lease_ended",
            lease_id = %lease.id,
            task_id = %lease.task_id,
            state = %lease.state,
            ended_by_uid = lease.ended_by.as_ref().map(|p| p.uid),
            reason,
            "lease ended"
        );
        self.durable
            .metrics
            .lease_ends
            .get_or_create(&crate::telemetry::StateLabel {
                state: lease.state.to_string(),
            })
            .inc();
        if let Err(e) = self.persist(lease.state.as_str(), lease, reason).await {
            tracing::error!(
                event = "lease_end_not_recorded",
                lease_id = %lease.id,
                error = %e,
                "lease ended but its end could not be made durable"
            );
        }
    }

    /// Start-up: takes over the stored leases. Leases that expired while the agent was down
    /// end as `expired`, leases bound to a process that is gone end as `process_exited`, and
    /// the rest become active again with their timers.
    pub async fn restore(&self, stored: Vec<Arc<Lease>>, retention: Duration) {
        {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            let active = stored
                .iter()
                .filter(|l| l.state == LeaseState::Active)
                .count();
            inner.active.reserve(active);
            inner.index.reserve(active);
        }
        let now = SystemTime::now();
        let cutoff = now.checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut ended_now = Vec::new();
        let mut ended = Vec::new();
        let mut active = Vec::with_capacity(stored.len());
        for stored in stored {
            // What ends here while the agent was down is copied out of its `Arc` to change
            // its state; what resumes is not copied at all.
            let (state, why) = match stored.state {
                LeaseState::Active => match stale(&stored, now) {
                    None => {
                        active.push(stored);
                        continue;
                    }
                    Some(end) => end,
                },
                // The approval deadline keeps running while the agent is down.
                LeaseState::Pending if stored.approval_deadline.is_some_and(|d| d > now) => {
                    self.park(Arc::unwrap_or_clone(stored));
                    continue;
                }
                LeaseState::Pending => (LeaseState::Expired, "not approved in time".to_string()),
                _ => {
                    if stored.ended_at.is_some_and(|t| t >= cutoff) {
                        ended.push(Arc::unwrap_or_clone(stored));
                    }
                    continue;
                }
            };
            let mut lease = Arc::unwrap_or_clone(stored);
            lease.mark_ended(state, Principal::agent(), &why);
            ended_now.push(lease);
        }
        self.activate_all(active);
        ended.sort_by_key(|l| l.ended_at);
        {
            let mut inner = self.inner.write().expect("lease lock poisoned");
            for l in ended.into_iter().rev().take(ENDED_KEPT).rev() {
                inner.ended.push_back(l);
            }
        }
        for lease in ended_now {
            {
                let mut inner = self.inner.write().expect("lease lock poisoned");
                if inner.ended.len() >= ENDED_KEPT {
                    inner.ended.pop_front();
                }
                inner.ended.push_back(lease.clone());
            }
            self.record_end(&lease).await;
        }
        tracing::info!(
            event = "leases_restored",
            active = self.active_count(),
            "leases restored from the store"
        );
    }

    /// Forgets ended leases older than `retention`, in memory and in the store.
    pub async fn compact(&self, retention: Duration) {
        let cutoff = SystemTime::now()
            .checked_sub(retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.inner
            .write()
            .expect("lease lock poisoned")
            .ended
            .retain(|l| l.ended_at.is_some_and(|t| t >= cutoff));
        let store = self.durable.store.clone();
        match tokio::task::spawn_blocking(move || store.compact(cutoff)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(
                event = "leases_compacted",
                removed = n,
                "ended leases compacted"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "compacting the lease store failed"),
            Err(e) => tracing::warn!(error = %e, "compacting the lease store failed"),
        }
    }

    /// The active, unexpired leases whose selectors are all among the caller's, oldest first.
    pub fn matching(&self, caller: &Selectors) -> Vec<ActiveLease> {
        let inner = self.inner.read().expect("lease lock poisoned");
        let mut out: Vec<ActiveLease> = matched(&inner, caller)
            .map(|slot| ActiveLease {
                lease: slot.lease.clone(),
                ended: slot.ended.clone(),
                expires_at: slot
                    .expires_at
                    .get_or_init(|| watch::channel(slot.lease.expires_at).0)
                    .subscribe(),
            })
            .collect();
        out.sort_by(|a, b| {
            a.lease
                .created_at
                .cmp(&b.lease.created_at)
                .then_with(|| a.lease.id.cmp(&b.lease.id))
        });
        out
    }

    /// Whether any lease matches the caller: [`Leases::matching`] without building its
    /// result, for the streams that only need to know whether their identity is gone.
    pub fn matches_any(&self, caller: &Selectors) -> bool {
        let inner = self.inner.read().expect("lease lock poisoned");
        let any = matched(&inner, caller).next().is_some();
        any
    }

    /// When an ended lease ended (from memory; for teardown latency).
    pub fn ended_at(&self, id: &LeaseId) -> Option<SystemTime> {
        let inner = self.inner.read().expect("lease lock poisoned");
        inner.ended.iter().rev().find(|l| &l.id == id)?.ended_at
    }

    /// Whether the lease is active now (for the cache's check before it installs an entry).
    pub fn is_active(&self, id: &LeaseId) -> bool {
        let inner = self.inner.read().expect("lease lock poisoned");
        inner
            .active
            .get(id)
            .is_some_and(|s| s.lease.expires_at > SystemTime::now())
    }

    pub fn pending_count(&self) -> usize {
        self.inner
            .read()
            .expect("lease lock poisoned")
            .pending
            .len()
    }

    pub fn active_count(&self) -> usize {
        self.inner.read().expect("lease lock poisoned").active.len()
    }
}

fn audit_principal(p: &Principal) -> event::Principal<'_> {
    event::Principal {
        uid: p.uid,
        gid: p.gid,
        pid: p.pid,
        user: p.user.as_deref(),
    }
}

/// The lease as an audit record shows it.
fn audit_change<'a>(what: &'a str, l: &'a Lease, reason: &'a str) -> event::LeaseChange<'a> {
    let rfc = crate::time::rfc3339;
    event::LeaseChange {
        what,
        lease_id: l.id.as_str(),
        task_id: &l.task_id,
        delegator: &l.delegator,
        agent: &l.agent,
        spiffe_id: l.spiffe_id.to_string(),
        selectors: l.selectors.iter().map(|s| s.as_str()).collect(),
        state: l.state.as_str(),
        created_at: rfc(l.created_at),
        expires_at: rfc(l.expires_at),
        max_expires_at: rfc(l.max_expires_at),
        svid_ttl_ms: l.svid_ttl.as_millis() as u64,
        jwt_ttl_ms: l.jwt_ttl.as_millis() as u64,
        audiences: &l.audiences,
        reason: &l.reason,
        granted_by: audit_principal(&l.granted_by),
        ended_at: l.ended_at.map(rfc),
        ended_by: l.ended_by.as_ref().map(audit_principal),
        approval_deadline: l.approval_deadline.map(rfc),
        approved_at: l.approved_at.map(rfc),
        approved_by: l.approved_by.as_ref().map(audit_principal),
        reason_for_change: reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{IdTemplate, DEFAULT_TEMPLATE};
    use spiffe::TrustDomain;

    fn selectors(s: &[&str]) -> Selectors {
        s.iter().map(|s| Selector::parse(s).unwrap()).collect()
    }

    /// A registry on a store in memory and a real audit log in a temporary directory (kept
    /// while the registry is used).
    fn registry() -> (Arc<Leases>, tempfile::TempDir) {
        registry_on(crate::store::MemoryStore::new())
    }

    fn registry_on(store: Arc<dyn LeaseStore>) -> (Arc<Leases>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let audit = AuditLog::open(dir.path(), Default::default()).unwrap();
        let metrics =
            crate::telemetry::Metrics::new(&mut prometheus_client::registry::Registry::default());
        let limits = LeaseLimits {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            template: IdTemplate::new(DEFAULT_TEMPLATE).unwrap(),
            max_ttl: Duration::from_secs(3600),
            default_svid_ttl: Duration::from_secs(300),
            max_svid_ttl: Duration::from_secs(3600),
            default_jwt_ttl: Duration::from_secs(300),
            max_jwt_ttl: Duration::from_secs(3600),
        };
        let durable = Durable {
            store,
            audit,
            metrics,
        };
        (Leases::new(limits, durable), dir)
    }

    async fn grant(r: &Leases, task: &str, selectors: &[&str], ttl: Duration) -> Lease {
        r.grant_input(
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
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn matching_needs_every_selector() {
        let (r, _dir) = registry();
        let hour = Duration::from_secs(1800);
        let a = grant(&r, "a", &["unix:uid:1000"], hour).await;
        let b = grant(&r, "b", &["unix:uid:1000", "unix:path:/bin/x"], hour).await;
        let _c = grant(&r, "c", &["unix:uid:1001"], hour).await;
        let ids = |sel: &[&str]| -> Vec<LeaseId> {
            r.matching(&selectors(sel))
                .into_iter()
                .map(|l| l.lease.id.clone())
                .collect()
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
        let (r, _dir) = registry();
        for i in 0..5000 {
            grant(
                &r,
                &format!("t{i}"),
                &[&format!("unix:uid:{i}")],
                Duration::from_secs(600),
            )
            .await;
        }
        let m = r.matching(&selectors(&["unix:uid:4242", "unix:gid:0"]));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].lease.task_id, "t4242");
    }

    #[tokio::test]
    async fn end_stops_matching_and_signals() {
        let (r, _dir) = registry();
        let caller = selectors(&["unix:uid:7", "unix:gid:7"]);
        let mine = r.changes(&caller);
        let other = r.changes(&selectors(&["unix:uid:8"]));
        let l = grant(&r, "a", &["unix:uid:7"], Duration::from_secs(60)).await;
        let granted = tokio::time::timeout(Duration::from_secs(5), mine.changed()).await;
        assert!(granted.is_ok(), "a grant that could match wakes the caller");
        let m = r.matching(&caller);
        r.end(&l.id, LeaseState::Revoked, Principal::agent(), "test")
            .await
            .unwrap();
        assert!(m[0].ended.is_cancelled());
        let ended = tokio::time::timeout(Duration::from_secs(5), mine.changed()).await;
        assert!(ended.is_ok(), "the end wakes the caller");
        let woken = tokio::time::timeout(Duration::from_millis(50), other.changed()).await;
        assert!(
            woken.is_err(),
            "a caller the lease could never match is not woken"
        );
        drop(mine);
        assert!(!r
            .listeners
            .lock()
            .unwrap()
            .by_selector
            .contains_key("unix:gid:7"));
        assert!(r.matching(&selectors(&["unix:uid:7"])).is_empty());
        assert_eq!(r.get(&l.id).await.unwrap().state, LeaseState::Revoked);
        assert!(matches!(
            r.end(&l.id, LeaseState::Completed, Principal::agent(), "")
                .await,
            Err(LeaseError::NotActive { .. })
        ));
        assert_eq!(r.list(false).await.unwrap().len(), 0);
        assert_eq!(r.list(true).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn expiry_fires_without_anyone_asking() {
        let (r, _dir) = registry();
        let l = grant(&r, "a", &["unix:uid:7"], Duration::from_secs(1)).await;
        let m = r.matching(&selectors(&["unix:uid:7"]));
        tokio::time::timeout(Duration::from_secs(5), m[0].ended.cancelled())
            .await
            .expect("lease expired within 5s");
        assert_eq!(r.get(&l.id).await.unwrap().state, LeaseState::Expired);
    }

    #[tokio::test]
    async fn one_task_expires_each_lease_at_its_own_deadline() {
        let (r, _dir) = registry();
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

    #[tokio::test]
    async fn renewal_is_capped_by_max_expires_at() {
        let (r, _dir) = registry();
        let l = grant(&r, "a", &["unix:uid:7"], Duration::from_secs(60)).await;
        let renewed = r.renew(&l.id, Duration::from_secs(100)).await.unwrap();
        assert!(renewed.expires_at > l.expires_at);
        let err = r.renew(&l.id, Duration::from_secs(200)).await.unwrap_err();
        assert!(matches!(err, LeaseError::InvalidField { field: "ttl", .. }));
    }

    #[tokio::test]
    async fn a_store_that_refuses_writes_refuses_the_grant_and_the_renewal() {
        let store = crate::store::MemoryStore::new();
        let (r, _dir) = registry_on(store.clone());
        let mut changes = store.watch();
        let kept = grant(&r, "kept", &["unix:uid:7"], Duration::from_secs(60)).await;
        match changes.try_recv() {
            Ok(crate::lease::StoreChange::Put(l)) => assert_eq!(l.id, kept.id),
            other => panic!("expected the grant in the store's watch, got {other:?}"),
        }
        store.fail_writes(Some("disk full"));
        let refused = r
            .grant_input(
                GrantInput {
                    task_id: "refused".into(),
                    delegator: "alice".into(),
                    agent: "a".into(),
                    ttl: Some(Duration::from_secs(60)),
                    selectors: vec!["unix:uid:8".into()],
                    ..Default::default()
                },
                Principal::agent(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, LeaseError::Unavailable(m) if m.contains("disk full")),
            "{refused:?}"
        );
        assert!(r.matching(&selectors(&["unix:uid:8"])).is_empty());
        let err = r
            .renew(&kept.id, Duration::from_secs(90))
            .await
            .unwrap_err();
        assert!(matches!(err, LeaseError::Unavailable(_)), "{err:?}");
        assert_eq!(r.get(&kept.id).await.unwrap().expires_at, kept.expires_at);
        store.fail_writes(None);
        r.renew(&kept.id, Duration::from_secs(90)).await.unwrap();
    }
}
