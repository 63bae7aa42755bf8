//! Issuance, the per-lease SVID cache, rotation and teardown.
//!
//! One SVID per lease, shared by every process the lease matches. It is issued on first demand
//! (so the log names the process that asked), rotated at about half its lifetime with jitter
//! by a task that lives exactly as long as the lease, and torn down when the lease ends: the
//! cache entry is dropped, its watch channel is told (`None`), and once the last open stream
//! lets go of it, the key is zeroized (`IssuedX509` holds it in `Zeroizing`).
//!
//! Lease changes flow in as signals (the lease's `ended` token, its `expires_at` watch and the
//! registry's generation); streams flow out through per-lease `watch` channels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::watch;

mod jwt;
pub mod wit;

pub use jwt::{JwtFetchError, JwtSvid, CLAIM_DELEGATOR, CLAIM_LEASE_ID, CLAIM_TASK_ID};

use crate::audit::{event, Audit, Event};
use crate::authority::jwt_keys::JwtKeys;
use crate::authority::x509::{CaHandle, IssuedX509};
use crate::lease::{ActiveLease, Changes, LeaseId, Leases};
use crate::selector::Selectors;
use crate::telemetry::{timed, KindLabel, Metrics, SvidKind};

/// One issued X.509-SVID as held by the cache and sent to streams.
#[derive(Debug)]
pub struct X509Svid {
    pub lease_id: LeaseId,
    pub task_id: String,
    /// `issued.spiffe_id` as text, as every response carries it.
    pub spiffe_id: String,
    pub issued: IssuedX509,
    /// When we signed it (its notBefore is backdated, so it cannot tell us).
    pub issued_at: SystemTime,
}

/// Who asked for an issuance, for the audit log.
#[derive(Clone, Debug)]
pub struct Requester {
    pub pid: i32,
    pub uid: u32,
    pub exe_sha256: Option<String>,
}

/// Issuance is refused when its audit record cannot be made durable (fail closed).
#[derive(Clone, Debug, thiserror::Error)]
#[error("audit log unavailable, no SVID issued: {0}")]
pub struct AuditUnavailable(pub String);

/// Why an SVID is issued (the audit record's `trigger`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// A caller fetched and the lease had no fresh SVID.
    Fetch,
    /// Its time came while a stream watches.
    Rotation,
    /// The signing CA changed (noticed by a fetch or by the lease's task).
    CaChange,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Fetch => "fetch",
            Trigger::Rotation => "rotation",
            Trigger::CaChange => "ca_change",
        }
    }
}

/// How one issuance attempt went.
enum Issued {
    Yes,
    /// Signing failed (logged); the lease simply has no SVID now.
    NotSigned,
    Unaudited(AuditUnavailable),
}

type SvidCell = Option<Arc<X509Svid>>;

struct Entry {
    lease: ActiveLease,
    current: watch::Sender<SvidCell>,
    /// Serializes issuance for one lease, so concurrent first fetches share one SVID.
    issuing: tokio::sync::Mutex<()>,
    /// Told whenever a caller subscribes to `current`: the rotation task, idle while nobody
    /// watches, wakes to rotate for the new watcher.
    watched: tokio::sync::Notify,
}

impl Entry {
    /// Whether an open stream holds this lease's SVID (the rotation task holds one receiver).
    fn is_watched(&self) -> bool {
        self.current.receiver_count() > 1
    }
}

pub struct Manager {
    ca: Arc<CaHandle>,
    jwt_keys: Arc<JwtKeys>,
    registry: Arc<Leases>,
    audit: Audit,
    metrics: Metrics,
    jwt_cache: jwt::JwtCache,
    entries: Mutex<HashMap<LeaseId, Arc<Entry>>>,
    me: Weak<Manager>,
}

/// What a stream currently holds, plus what to wait on for the next change.
pub struct Watcher {
    manager: Arc<Manager>,
    selectors: Selectors,
    who: Requester,
    leases: Changes,
    cells: Vec<watch::Receiver<SvidCell>>,
}

impl Watcher {
    /// The caller's SVIDs now (issuing any that are missing), oldest lease first.
    pub async fn current(&mut self) -> Result<Vec<Arc<X509Svid>>, AuditUnavailable> {
        let (svids, cells) = self.manager.collect(&self.selectors, &self.who).await?;
        self.cells = cells;
        Ok(svids)
    }

    /// Whether the caller (with the selectors it had) still matches any lease: cheap, and
    /// no SVID is issued to find out.
    pub fn holds_any(&self) -> bool {
        self.manager.registry.matches_any(&self.selectors)
    }

    /// Resolves when something this stream depends on changed: a lease it could match was
    /// granted, renewed or ended, or one of its SVIDs was rotated or torn down.
    pub async fn changed(&mut self) {
        if self.cells.is_empty() {
            self.leases.changed().await;
            return;
        }
        let cells = self.cells.iter_mut().map(|c| Box::pin(c.changed()));
        let any_cell = futures::future::select_all(cells);
        tokio::select! {
            _ = self.leases.changed() => {}
            _ = any_cell => {}
        }
    }
}

impl Manager {
    /// `audit`: where every issuance is recorded before the SVID is handed out.
    pub fn new(
        ca: Arc<CaHandle>,
        jwt_keys: Arc<JwtKeys>,
        registry: Arc<Leases>,
        audit: Audit,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Manager {
            ca,
            jwt_keys,
            registry,
            audit,
            metrics,
            jwt_cache: Default::default(),
            entries: Mutex::new(HashMap::new()),
            me: me.clone(),
        })
    }

    pub fn watcher(self: &Arc<Self>, selectors: Selectors, who: Requester) -> Watcher {
        Watcher {
            manager: self.clone(),
            leases: self.registry.changes(&selectors),
            selectors,
            who,
            cells: Vec::new(),
        }
    }

    #[allow(clippy::type_complexity)]
    async fn collect(
        &self,
        selectors: &Selectors,
        who: &Requester,
    ) -> Result<(Vec<Arc<X509Svid>>, Vec<watch::Receiver<SvidCell>>), AuditUnavailable> {
        let mut svids = Vec::new();
        let mut cells = Vec::new();
        for lease in self.registry.matching(selectors) {
            let Some(entry) = self.entry(lease) else {
                continue;
            };
            let mut rx = entry.current.subscribe();
            let now = SystemTime::now();
            let expires_at = *entry.lease.expires_at.borrow();
            let held = rx.borrow_and_update().clone();
            // An SVID of a CA that no longer signs is replaced because the CA changed, whoever
            // notices first: this fetch or the lease's own task.
            let signer = *self.ca.current().fingerprint();
            let trigger = match &held {
                Some(s) if s.issued.signed_by != signer => Trigger::CaChange,
                _ => Trigger::Fetch,
            };
            let fresh = held.filter(|s| !self.is_stale(s, expires_at, now));
            let svid = match fresh {
                Some(s) => Some(s),
                None => {
                    if let Issued::Unaudited(e) = self.issue(&entry, Some(who), trigger).await {
                        return Err(e);
                    }
                    rx.borrow_and_update().clone()
                }
            };
            if let Some(svid) = svid {
                svids.push(svid);
            }
            // After the fetch above made the SVID fresh, so the rotation task schedules from it
            // rather than racing it.
            entry.watched.notify_one();
            cells.push(rx);
        }
        Ok((svids, cells))
    }

    /// The cache entry of an active lease, created (with its rotation task) on first use.
    fn entry(&self, lease: ActiveLease) -> Option<Arc<Entry>> {
        let mut entries = self.entries.lock().expect("svid cache poisoned");
        if let Some(e) = entries.get(&lease.lease.id) {
            return Some(e.clone());
        }
        // Checked under the cache lock: a lease that ended after `matching` must not get an
        // entry, because its teardown (which takes this lock) may already have run.
        if lease.ended.is_cancelled() || !self.registry.is_active(&lease.lease.id) {
            return None;
        }
        let entry = Arc::new(Entry {
            lease,
            current: watch::channel(None).0,
            issuing: tokio::sync::Mutex::new(()),
            watched: tokio::sync::Notify::new(),
        });
        entries.insert(entry.lease.lease.id.clone(), entry.clone());
        let me = self.me.upgrade().expect("manager alive while used");
        self.registry.spawn(me.run_entry(entry.clone()));
        Some(entry)
    }

    /// Issues a fresh SVID for the entry unless another caller just did. The SVID is
    /// published only after its audit record is durable.
    async fn issue(&self, entry: &Entry, who: Option<&Requester>, trigger: Trigger) -> Issued {
        let _guard = entry.issuing.lock().await;
        let started = std::time::Instant::now();
        let now = SystemTime::now();
        let lease = &entry.lease.lease;
        if trigger != Trigger::Rotation {
            let expires_at = *entry.lease.expires_at.borrow();
            if let Some(s) = entry.current.borrow().as_ref() {
                if !self.is_stale(s, expires_at, now) {
                    return Issued::Yes;
                }
            }
        }
        if entry.lease.ended.is_cancelled() {
            return Issued::Yes;
        }
        let expires_at = *entry.lease.expires_at.borrow();
        let cap = now
            .checked_add(lease.svid_ttl)
            .map_or(expires_at, |t| t.min(expires_at));
        let issued = match self.ca.current().issue_x509_svid(&lease.spiffe_id, cap) {
            Ok(issued) => issued,
            Err(e) => {
                tracing::warn!(
                    event = "svid_issue_failed",
                    lease_id = %lease.id,
                    error = %e,
                    "could not issue x509-svid"
                );
                return Issued::NotSigned;
            }
        };
        let trigger = trigger.name();
        {
            let audit = &self.audit;
            let event = Event::SvidIssued(event::SvidIssued {
                serial: &issued.serial_hex,
                spiffe_id: lease.spiffe_id.to_string(),
                not_before: crate::time::rfc3339(issued.not_before),
                not_after: crate::time::rfc3339(issued.not_after),
                lease_id: lease.id.as_str(),
                task_id: &lease.task_id,
                delegator: &lease.delegator,
                pid: who.map(|w| w.pid),
                uid: who.map(|w| w.uid),
                exe_sha256: who.and_then(|w| w.exe_sha256.as_deref()),
                trigger,
                chain: lease.audit_chain(),
            });
            let appended = timed(&self.metrics.audit_write_seconds, audit.record(&event));
            if let Err(e) = appended.await {
                // Fail closed: the SVID and its key are dropped (and zeroized) unused.
                tracing::error!(
                    event = "svid_not_audited",
                    lease_id = %lease.id,
                    serial = %issued.serial_hex,
                    error = %e,
                    "AUDIT LOG UNAVAILABLE: refusing to hand out an unaudited SVID"
                );
                return Issued::Unaudited(AuditUnavailable(e.to_string()));
            }
        }
        tracing::info!(
            event = "svid_issued",
            serial = %issued.serial_hex,
            spiffe_id = %lease.spiffe_id,
            not_after = %crate::time::rfc3339(issued.not_after),
            lease_id = %lease.id,
            task_id = %lease.task_id,
            pid = who.map(|w| w.pid),
            uid = who.map(|w| w.uid),
            trigger,
            "x509-svid issued"
        );
        let kind = KindLabel {
            kind: SvidKind::x509,
        };
        self.metrics.svids_issued.get_or_create(&kind).inc();
        self.metrics
            .issuance_seconds
            .get_or_create(&kind)
            .observe(started.elapsed().as_secs_f64());
        self.metrics.set_svid_not_after(issued.not_after);
        let svid = Arc::new(X509Svid {
            lease_id: lease.id.clone(),
            task_id: lease.task_id.clone(),
            spiffe_id: issued.spiffe_id.to_string(),
            issued,
            issued_at: now,
        });
        // The lease may have ended while we signed; never publish after teardown.
        if !entry.lease.ended.is_cancelled() {
            entry.current.send_replace(Some(svid));
        }
        Issued::Yes
    }

    /// When the current SVID should be replaced, or `None` when a new one could not live any
    /// longer (it already runs to the lease's end or the CA's), in which case only a renewal
    /// wakes us.
    fn next_refresh(&self, current: &SvidCell, expires_at: SystemTime) -> Option<SystemTime> {
        let share = rand::rng().random_range(0.45..0.55);
        let ca_end = self.ca.current().not_after();
        replace_at(current.as_ref()?, expires_at, ca_end, share)
    }

    /// Past half its life, an SVID that a new one could outlive is stale: a caller that
    /// arrives then gets a fresh one (rotation happens only while a stream watches).
    fn is_stale(&self, svid: &X509Svid, expires_at: SystemTime, now: SystemTime) -> bool {
        let ca = self.ca.current();
        svid.issued.not_after <= now
            || svid.issued.signed_by != *ca.fingerprint()
            || replace_at(svid, expires_at, ca.not_after(), 0.5).is_some_and(|at| now >= at)
    }

    /// Rotates the entry's SVID on schedule while a stream watches it; with nobody watching
    /// it waits for a watcher instead (a later one-shot fetch of a stale SVID mints a fresh
    /// one itself), and ends the entry when the lease ends.
    async fn run_entry(self: Arc<Self>, entry: Arc<Entry>) {
        let mut expires = entry.lease.expires_at.clone();
        let mut current = entry.current.subscribe();
        let mut ca = self.ca.subscribe();
        loop {
            let wake = {
                let expires_at = *expires.borrow_and_update();
                let cell = current.borrow_and_update().clone();
                self.next_refresh(&cell, expires_at)
            };
            let sleep = async {
                match wake {
                    Some(at) => {
                        let d = at.duration_since(SystemTime::now()).unwrap_or_default();
                        tokio::time::sleep(d).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = entry.lease.ended.cancelled() => break,
                r = expires.changed() => if r.is_err() { break },
                r = current.changed() => if r.is_err() { break },
                // A new signing CA: an SVID of the old one is replaced at once on the streams
                // that hold it (an unwatched one is replaced when next fetched).
                r = ca.changed() => {
                    if r.is_err() { break }
                    let signer = *self.ca.current().fingerprint();
                    let old = current.borrow().as_ref().is_some_and(|s| s.issued.signed_by != signer);
                    if old && entry.is_watched() {
                        self.issue(&entry, None, Trigger::CaChange).await;
                    }
                }
                _ = sleep => {
                    if !entry.is_watched() {
                        tokio::select! {
                            _ = entry.lease.ended.cancelled() => break,
                            _ = entry.watched.notified() => {}
                        }
                        continue;
                    }
                    // Never spin on a failing signer: wait a second before the next try.
                    if !matches!(self.issue(&entry, None, Trigger::Rotation).await, Issued::Yes) {
                        tokio::select! {
                            _ = entry.lease.ended.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        }
        self.teardown(&entry);
    }

    fn teardown(&self, entry: &Arc<Entry>) {
        let id = &entry.lease.lease.id;
        {
            let mut entries = self.entries.lock().expect("svid cache poisoned");
            if entries.get(id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
                entries.remove(id);
            }
        }
        let old = entry.current.send_replace(None);
        if let Some(at) = self.registry.ended_at(id) {
            if let Ok(d) = SystemTime::now().duration_since(at) {
                self.metrics.teardown_seconds.observe(d.as_secs_f64());
            }
        }
        tracing::info!(
            event = "svid_teardown",
            lease_id = %id,
            task_id = %entry.lease.lease.task_id,
            serial = old.as_ref().map(|s| s.issued.serial_hex.as_str()),
            "identity torn down"
        );
    }
}

/// The instant `share` of the SVID's life has passed, or `None` when no new SVID could outlive
/// it (it already runs to the lease's end, whole seconds, or its CA's, `ca_end`).
fn replace_at(
    svid: &X509Svid,
    expires_at: SystemTime,
    ca_end: SystemTime,
    share: f64,
) -> Option<SystemTime> {
    let cap = crate::time::floor_secs(expires_at).min(ca_end);
    if svid.issued.not_after >= cap {
        return None;
    }
    let life = svid
        .issued
        .not_after
        .duration_since(svid.issued_at)
        .unwrap_or(Duration::ZERO);
    Some(svid.issued_at + life.mul_f64(share))
}
