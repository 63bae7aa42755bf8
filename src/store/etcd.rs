//! The lease store on etcd, shared by every agent that names the same endpoints and prefix.
//!
//! Layout, under the configured prefix:
//! - `leases/shared/<id>`: leases any node may serve;
//! - `leases/node/<node>/<id>`: leases bound to a process on `<node>`, read and watched by
//!   that node's agent only.
//!
//! Every value is the lease record of `record.rs`. A write compares each key's etcd `version`
//! (how many times it was written) with the lease's `revision` in one transaction, so that of
//! two agents moving the same lease from what they both read, one wins and the other is told
//! ([`StoreError::Conflict`], with the lease as it is now).
//!
//! Every write also touches a marker for its key range (`changes/shared`, `changes/node/<node>`)
//! in the same transaction, so a marker's revision is that of the range's latest change.
//!
//! One task watches both key ranges on one stream, from the revision of the last full read
//! on. Every quarter of `max_staleness` it reads this node's two markers (a linearizable read)
//! and waits for the watch to deliver up to their revisions: then this agent has every change
//! committed before it asked, and its view is current as of that moment. It is also current
//! as of the start of a full read. When it has not been current for `max_staleness`, the store
//! is stale (see [`StoreHealth`]). Nothing else counts: not a write that succeeded, nor any
//! message on the watch (a watch may be created, and etcd may answer a progress request,
//! before the watch has caught up). A watch that stops, or that stays behind for
//! `max_staleness`, starts again from a full read (sent as [`StoreChange::Reloaded`]), so that
//! a node coming back from a partition is current before it serves, and never trusts a watch
//! to catch up on what it missed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::lease::store::WATCH_CAPACITY;
use crate::lease::{
    Lease, LeaseId, LeaseState, LeaseStore, StoreChange, StoreError, StoreHealth, StoreWatch,
    Stored,
};

/// Leases written in one transaction at most (etcd refuses more than 128 operations by
/// default); a larger batch is written in several, each all or none.
const TXN_LEASES: usize = 100;

/// The pause before a failed watch or read is tried again: doubling from the first to the
/// last, plus up to as much again at random, so that nodes cut off together do not all come
/// back at the same instant.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_LAST: Duration = Duration::from_secs(2);

/// How a node reaches etcd (`[store]` with `kind = "etcd"`).
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// Every key starts with it; agents sharing leases share it.
    pub prefix: String,
    /// The CA that signs etcd's serving certificates (TLS when set, or when endpoints are
    /// `https://`).
    pub ca_file: Option<PathBuf>,
    /// This agent's client certificate and key, for etcd's client-certificate auth.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub dial_timeout: Duration,
    pub request_timeout: Duration,
    /// How long this agent may go without hearing from etcd before it issues nothing.
    pub max_staleness: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        source: etcd_client::Error,
    },
    #[error("etcd {op}: no answer within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd key {key}: {reason}")]
    Decode { key: String, reason: String },
    #[error("etcd store: {0}")]
    Config(String),
}

pub struct EtcdStore {
    me: std::sync::Weak<EtcdStore>,
    client: Client,
    runtime: tokio::runtime::Handle,
    /// `<prefix>leases/`, and in it the shared range and this node's own.
    leases: String,
    shared: String,
    mine: String,
    /// The markers of the shared range and of this node's.
    markers: [String; 2],
    settings: EtcdSettings,
    changes: broadcast::Sender<StoreChange>,
    health: watch::Sender<StoreHealth>,
    heard: Mutex<Heard>,
    /// Set by the first `load`: the watch starts right after the revision it read.
    watching: Mutex<bool>,
    closing: CancellationToken,
}

/// What this agent has heard from etcd.
struct Heard {
    /// Every change etcd had committed by this instant has reached this agent: the start of
    /// its last full read, or of the last read of the markers its watch then caught up with.
    current_as_of: Instant,
    /// The last call or watch message got an answer.
    reachable: bool,
}

impl EtcdStore {
    /// Connects (lazily: an unreachable etcd is found at the first call) and starts the
    /// staleness clock. Must run inside a Tokio runtime, which the store's calls then use.
    pub async fn connect(settings: EtcdSettings, node: &str) -> Result<Arc<Self>, EtcdError> {
        if settings.endpoints.is_empty() {
            return Err(EtcdError::Config(
                "store.endpoints: name at least one".into(),
            ));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(settings.dial_timeout)
            .with_timeout(settings.request_timeout)
            .with_keep_alive(settings.max_staleness / 4, settings.request_timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from its leader answers nothing rather than old data.
            .with_require_leader(true);
        let tls = settings.ca_file.is_some()
            || settings.cert_file.is_some()
            || settings.endpoints.iter().any(|e| e.starts_with("https://"));
        if !tls {
            for endpoint in settings.endpoints.iter().filter(|e| !loopback(e)) {
                tracing::warn!(
                    event = "store_plaintext",
                    endpoint = %endpoint,
                    "etcd without TLS off this host: whoever is on the path can read and forge leases (set store.ca_file, and cert_file/key_file)"
                );
            }
        }
        if tls {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|source| EtcdError::Read {
                    path: p.clone(),
                    source,
                })
            };
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &settings.ca_file {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            match (&settings.cert_file, &settings.key_file) {
                (Some(c), Some(k)) => {
                    t = t.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
                }
                (None, None) => {}
                _ => {
                    return Err(EtcdError::Config(
                        "store.cert_file and store.key_file go together".into(),
                    ))
                }
            }
            options = options.with_tls(t);
        }
        let client = Client::connect(&settings.endpoints, Some(options))
            .await
            .map_err(|source| EtcdError::Etcd {
                op: "connect",
                source,
            })?;
        let leases = format!("{}leases/", settings.prefix);
        let store = Arc::new_cyclic(|me| EtcdStore {
            me: me.clone(),
            client,
            runtime: tokio::runtime::Handle::current(),
            shared: format!("{leases}shared/"),
            mine: format!("{leases}node/{node}/"),
            markers: [
                marker(&settings.prefix, None),
                marker(&settings.prefix, Some(node)),
            ],
            leases,
            settings,
            changes: broadcast::channel(WATCH_CAPACITY).0,
            health: watch::channel(StoreHealth::FINE).0,
            // Current as of now: nothing has been read yet, and the first `load` reads it all.
            heard: Mutex::new(Heard {
                current_as_of: Instant::now(),
                reachable: true,
            }),
            watching: Mutex::new(false),
            closing: CancellationToken::new(),
        });
        tokio::spawn(staleness_clock(Arc::downgrade(&store)));
        Ok(store)
    }

    /// Stops the watch and the staleness clock.
    pub fn close(&self) {
        self.closing.cancel();
    }

    fn key(&self, lease: &Lease) -> String {
        match &lease.node {
            None => format!("{}{}", self.shared, lease.id),
            Some(node) => format!("{}node/{node}/{}", self.leases, lease.id),
        }
    }

    /// The marker of `lease`'s key range, written with every change to it.
    fn marker(&self, lease: &Lease) -> String {
        marker(&self.settings.prefix, lease.node.as_deref())
    }

    /// Puts of the markers of `leases`' ranges, one each.
    fn touch_markers<'a>(&self, leases: impl IntoIterator<Item = &'a Lease>) -> Vec<TxnOp> {
        let mut markers: Vec<String> = leases.into_iter().map(|l| self.marker(l)).collect();
        markers.sort();
        markers.dedup();
        markers
            .into_iter()
            .map(|m| TxnOp::put(m, Vec::<u8>::new(), None))
            .collect()
    }

    /// The revisions of the latest changes to the two ranges this node reads (0: none yet),
    /// by a linearizable read.
    async fn latest_changes(&self) -> Result<[i64; 2], EtcdError> {
        let txn = Txn::new().and_then(
            self.markers
                .iter()
                .map(|m| TxnOp::get(m.as_str(), None))
                .collect::<Vec<_>>(),
        );
        let mut kv = self.client.kv_client();
        let timeout = self.settings.request_timeout;
        let read = tokio::time::timeout(timeout, kv.txn(txn))
            .await
            .map_err(|_| EtcdError::Timeout { op: "txn", timeout })?
            .map_err(|source| EtcdError::Etcd { op: "txn", source })?;
        let mut latest = [0; 2];
        for (slot, op) in latest.iter_mut().zip(read.op_responses()) {
            if let TxnOpResponse::Get(get) = op {
                *slot = get.kvs().first().map_or(0, |kv| kv.mod_revision());
            }
        }
        Ok(latest)
    }

    fn with_heard(&self, f: impl FnOnce(&mut Heard)) {
        f(&mut self.heard.lock().expect("etcd state poisoned"));
        self.update_health();
    }

    /// Whether etcd answered a call or sent a watch message.
    fn answered(&self, ok: bool) {
        self.with_heard(|h| h.reachable = ok);
    }

    /// Every change etcd had committed at `at` has reached this agent's watchers.
    fn current_as_of(&self, at: Instant) {
        self.with_heard(|h| {
            h.current_as_of = h.current_as_of.max(at);
            h.reachable = true;
        });
    }

    /// Publishes health as `heard` says, under its lock, so that two callers never publish
    /// out of order (nothing that locks `heard` runs while the sender's lock is held).
    fn update_health(&self) {
        let heard = self.heard.lock().expect("etcd state poisoned");
        let now = StoreHealth {
            reachable: heard.reachable,
            stale: heard.current_as_of.elapsed() > self.settings.max_staleness,
        };
        self.health
            .send_if_modified(|h| std::mem::replace(h, now) != now);
    }

    /// Runs an etcd call on the store's runtime, within the request timeout, noting whether
    /// etcd answered (which says nothing of what this agent may have missed).
    fn call<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        self.block(op, async {
            f.await.map_err(|source| EtcdError::Etcd { op, source })
        })
    }

    /// [`EtcdStore::call`] for a future that makes several calls.
    fn block<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, EtcdError>>,
    ) -> Result<T, EtcdError> {
        let timeout = self.settings.request_timeout;
        let r = self.runtime.block_on(async {
            tokio::time::timeout(timeout, f)
                .await
                .unwrap_or(Err(EtcdError::Timeout { op, timeout }))
        });
        self.answered(r.is_ok());
        r
    }

    fn decode(&self, kv: &KeyValue) -> Result<Lease, EtcdError> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let id = key.rsplit('/').next().unwrap_or_default();
        let mut lease =
            super::record::decode(id, kv.value()).map_err(|reason| EtcdError::Decode {
                key: key.clone(),
                reason,
            })?;
        lease.revision = kv.version() as u64;
        Ok(lease)
    }

    /// Hands one watched change to the watchers.
    fn send_change(&self, kind: EventType, kv: &KeyValue) {
        let key = String::from_utf8_lossy(kv.key());
        let Ok(id) = LeaseId::parse(key.rsplit('/').next().unwrap_or_default()) else {
            tracing::warn!(key = %key, "a key under the lease prefix that names no lease; ignored");
            return;
        };
        let change = match kind {
            EventType::Put => self
                .readable(kv)
                .map_or(StoreChange::Unreadable(id), StoreChange::Put),
            EventType::Delete => StoreChange::Removed(id),
        };
        // No watcher is not an error.
        let _ = self.changes.send(change);
    }

    /// A lease read from etcd, or `None` (said in the log) for a record this agent cannot
    /// read: it is not served here.
    fn readable(&self, kv: &KeyValue) -> Option<Arc<Lease>> {
        match self.decode(kv) {
            Ok(lease) => Some(Arc::new(lease)),
            Err(e) => {
                tracing::error!(event = "lease_unreadable", error = %e, "a lease in etcd cannot be read: not served here");
                None
            }
        }
    }

    /// Every lease this node reads, at one revision, and that revision. A record this agent
    /// cannot read is left out, and said: it is not served here (a later look-up finds it
    /// unreadable, see [`LeaseStore::read`]).
    async fn read_all(&self) -> Result<(Vec<Arc<Lease>>, i64), EtcdError> {
        let mut kv = self.client.kv_client();
        let first = kv
            .get(self.shared.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|source| EtcdError::Etcd {
                op: "range",
                source,
            })?;
        let revision = first.header().map_or(0, |h| h.revision());
        let second = kv
            .get(
                self.mine.as_str(),
                Some(GetOptions::new().with_prefix().with_revision(revision)),
            )
            .await
            .map_err(|source| EtcdError::Etcd {
                op: "range",
                source,
            })?;
        let leases = first
            .kvs()
            .iter()
            .chain(second.kvs())
            .filter_map(|kv| self.readable(kv))
            .collect();
        Ok((leases, revision))
    }

    /// Reads every lease again and hands them to the watchers ([`StoreChange::Reloaded`]),
    /// then counts this agent current as of the moment the read began. Returns the revision
    /// read.
    async fn snapshot(&self) -> Result<i64, EtcdError> {
        let began = Instant::now();
        let timeout = self.settings.request_timeout;
        let read = tokio::time::timeout(timeout, self.read_all())
            .await
            .unwrap_or(Err(EtcdError::Timeout {
                op: "range",
                timeout,
            }));
        let (leases, revision) = match read {
            Ok(read) => read,
            Err(e) => {
                self.answered(false);
                return Err(e);
            }
        };
        // The leases first: the registry applies them before it hears that it is current.
        let _ = self.changes.send(StoreChange::Reloaded(Arc::new(leases)));
        self.current_as_of(began);
        Ok(revision)
    }

    fn put_chunk(&self, leases: &[Lease]) -> Result<(), StoreError> {
        let keys: Vec<String> = leases.iter().map(|l| self.key(l)).collect();
        let mut compares = Vec::with_capacity(leases.len());
        let mut puts = Vec::with_capacity(leases.len());
        for (lease, key) in leases.iter().zip(&keys) {
            let value = super::record::encode(lease).map_err(|reason| {
                StoreError::new(EtcdError::Decode {
                    key: key.clone(),
                    reason,
                })
            })?;
            compares.push(Compare::version(
                key.as_str(),
                CompareOp::Equal,
                lease.revision as i64,
            ));
            puts.push(TxnOp::put(key.as_str(), value, None));
        }
        puts.extend(self.touch_markers(leases));
        let gets: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.as_str(), None)).collect();
        let txn = Txn::new().when(compares).and_then(puts).or_else(gets);
        let mut kv = self.client.kv_client();
        let resp = self.call("txn", kv.txn(txn)).map_err(StoreError::new)?;
        if resp.succeeded() {
            return Ok(());
        }
        let mut moved = Vec::new();
        for (op, lease) in resp.op_responses().into_iter().zip(leases) {
            let TxnOpResponse::Get(get) = op else {
                continue;
            };
            match get.kvs().first() {
                Some(kv) if kv.version() as u64 != lease.revision => {
                    moved.push(Arc::new(self.decode(kv).map_err(StoreError::new)?));
                }
                Some(_) => {}
                // Deleted (compacted) since it was read: nothing to hand back.
                None => {}
            }
        }
        Err(StoreError::Conflict(moved))
    }

    /// Starts the watch once, from just after `revision`.
    fn start_watch(&self, revision: i64) {
        let mut watching = self.watching.lock().expect("etcd state poisoned");
        if std::mem::replace(&mut *watching, true) {
            return;
        }
        let me = self.me.clone();
        let closing = self.closing.clone();
        self.runtime.spawn(async move {
            tokio::select! {
                _ = closing.cancelled() => {}
                _ = follow(me, revision) => {}
            }
        });
    }
}

/// The marker of the shared range (`node` none) or of a node's range.
fn marker(prefix: &str, node: Option<&str>) -> String {
    match node {
        None => format!("{prefix}changes/shared"),
        Some(node) => format!("{prefix}changes/node/{node}"),
    }
}

/// Whether an etcd endpoint (`[http://]host[:port]`) is on this host.
fn loopback(endpoint: &str) -> bool {
    let rest = endpoint
        .strip_prefix("http://")
        .unwrap_or(endpoint)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => rest.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Keeps `StoreHealth::stale` true to the clock, even while nothing at all arrives.
async fn staleness_clock(store: std::sync::Weak<EtcdStore>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else { return };
        if store.closing.is_cancelled() {
            return;
        }
        store.update_health();
    }
}

/// Why a watch stream stopped.
enum Stop {
    /// etcd compacted the history it would resume from.
    Compacted,
    /// The watch did not deliver what the markers said in `max_staleness`.
    Behind(String),
    Failed(String),
}

/// The watch: both key ranges, from just after the last full read. Whenever a watch stops,
/// this agent reads every lease again before it watches from there: what it missed meanwhile
/// arrives in that read, and it is current again only once that read is in.
async fn follow(store: std::sync::Weak<EtcdStore>, from: i64) {
    let mut from = Some(from);
    let mut retry = RETRY_FIRST;
    loop {
        let Some(s) = store.upgrade() else { return };
        let start = match from.take() {
            Some(revision) => revision,
            None => match s.snapshot().await {
                Ok(revision) => revision,
                Err(e) => {
                    tracing::warn!(event = "store_read_failed", error = %e, retry_in = ?retry, "reading the lease store again failed");
                    drop(s);
                    retry = pause(retry).await;
                    continue;
                }
            },
        };
        let (stop, heard) = watch_once(&s, start + 1).await;
        if heard {
            retry = RETRY_FIRST;
        }
        match stop {
            Stop::Compacted => tracing::warn!(
                event = "store_watch_compacted",
                "etcd compacted the history this agent would resume from; reading every lease again"
            ),
            Stop::Behind(why) => tracing::warn!(
                event = "store_watch_behind",
                detail = %why,
                "the etcd watch fell behind; reading every lease again"
            ),
            Stop::Failed(why) => {
                s.answered(false);
                tracing::warn!(event = "store_watch_failed", error = %why, retry_in = ?retry, "etcd watch stopped; reading every lease again, then watching");
                drop(s);
                retry = pause(retry).await;
            }
        }
    }
}

/// Sleeps `retry` and up to as much again; returns the next pause.
async fn pause(retry: Duration) -> Duration {
    let jitter = retry.mul_f64(rand::random::<f64>());
    tokio::time::sleep(retry + jitter).await;
    (retry * 2).min(RETRY_LAST)
}

/// One watch stream over both ranges, from revision `from`, until it stops; and whether etcd
/// said anything on it.
async fn watch_once(s: &Arc<EtcdStore>, from: i64) -> (Stop, bool) {
    let ranges = [s.shared.clone(), s.mine.clone()];
    let options = |i: usize| {
        WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_watch_id(i as i64 + 1)
    };
    let mut client = s.client.watch_client();
    let mut stream = match client.watch(ranges[0].as_str(), Some(options(0))).await {
        Ok(stream) => stream,
        Err(e) => return (Stop::Failed(e.to_string()), false),
    };
    if let Err(e) = stream.watch(ranges[1].as_str(), Some(options(1))).await {
        return (Stop::Failed(e.to_string()), false);
    }
    let max_staleness = s.settings.max_staleness;
    let mut heard = false;
    // Per range, the revision up to which every change has been delivered.
    let mut delivered = [from - 1; 2];
    // The markers' revisions and when they were asked for, until the watch delivers them.
    let mut target: Option<(Instant, [i64; 2])> = None;
    let mut asking = false;
    let (answers, mut answered) = tokio::sync::mpsc::channel(1);
    let mut check = tokio::time::interval(max_staleness / 4);
    loop {
        tokio::select! {
            _ = check.tick() => {
                match target {
                    Some((asked, latest)) if asked.elapsed() > max_staleness => {
                        return (
                            Stop::Behind(format!(
                                "delivered {delivered:?} of the markers' {latest:?} in max_staleness"
                            )),
                            heard,
                        );
                    }
                    Some(_) => {}
                    None if asking => {}
                    None => {
                        asking = true;
                        let (s, answers) = (s.clone(), answers.clone());
                        tokio::spawn(async move {
                            let asked = Instant::now();
                            let _ = answers.send((asked, s.latest_changes().await)).await;
                        });
                    }
                }
            }
            Some((asked, latest)) = answered.recv() => {
                asking = false;
                match latest {
                    Ok(latest) => {
                        s.answered(true);
                        target = Some((asked, latest));
                    }
                    Err(e) => {
                        s.answered(false);
                        tracing::debug!(error = %e, "reading the change markers failed");
                    }
                }
            }
            message = stream.message() => {
                let resp = match message {
                    Ok(Some(resp)) => resp,
                    Ok(None) => return (Stop::Failed("the watch stream ended".into()), heard),
                    Err(e) => return (Stop::Failed(e.to_string()), heard),
                };
                heard = true;
                s.answered(true);
                if resp.compact_revision() > 0 {
                    return (Stop::Compacted, heard);
                }
                if resp.canceled() {
                    return (
                        Stop::Failed(format!("watch cancelled: {}", resp.cancel_reason())),
                        heard,
                    );
                }
                let slot = match resp.watch_id() {
                    1 => 0,
                    2 => 1,
                    _ => continue,
                };
                for event in resp.events() {
                    if let Some(kv) = event.kv() {
                        delivered[slot] = delivered[slot].max(kv.mod_revision());
                        s.send_change(event.event_type(), kv);
                    }
                }
            }
        }
        if let Some((asked, latest)) = target {
            if delivered[0] >= latest[0] && delivered[1] >= latest[1] {
                s.current_as_of(asked);
                target = None;
            }
        }
    }
}

impl LeaseStore for EtcdStore {
    fn put_all(&self, leases: &[Lease]) -> Result<(), StoreError> {
        for chunk in leases.chunks(TXN_LEASES) {
            self.put_chunk(chunk)?;
        }
        Ok(())
    }

    fn load(&self) -> Result<Vec<Arc<Lease>>, StoreError> {
        let first = !*self.watching.lock().expect("etcd state poisoned");
        let began = Instant::now();
        let (leases, revision) = self
            .block("range", self.read_all())
            .map_err(StoreError::new)?;
        // The first read is what the registry starts from: it is current as of then. A later
        // one (an admin's listing, say) reaches no registry, and counts for nothing.
        if first {
            self.current_as_of(began);
        }
        // The first read starts the watch: from here on, nothing is missed.
        self.start_watch(revision);
        Ok(leases)
    }

    fn read(&self, lease: &Lease) -> Result<Stored, StoreError> {
        let key = self.key(lease);
        let mut kv = self.client.kv_client();
        let got = self
            .call("range", kv.get(key.as_str(), None))
            .map_err(StoreError::new)?;
        Ok(match got.kvs().first() {
            None => Stored::Absent,
            Some(kv) => self
                .readable(kv)
                .map_or(Stored::Unreadable, Stored::Present),
        })
    }

    fn compact(&self, cutoff: SystemTime) -> Result<usize, StoreError> {
        let (all, _) = self
            .block("range", self.read_all())
            .map_err(StoreError::new)?;
        let mut removed = 0;
        for lease in all.iter().filter(|l| {
            !matches!(l.state, LeaseState::Active | LeaseState::Pending)
                && l.ended_at.is_some_and(|t| t < cutoff)
        }) {
            let key = self.key(lease);
            // Only the record that was read: never one another agent has just rewritten.
            let txn = Txn::new()
                .when([Compare::version(
                    key.as_str(),
                    CompareOp::Equal,
                    lease.revision as i64,
                )])
                .and_then(
                    [TxnOp::delete(key.as_str(), None::<DeleteOptions>)]
                        .into_iter()
                        .chain(self.touch_markers([lease.as_ref()]))
                        .collect::<Vec<_>>(),
                );
            let mut kv = self.client.kv_client();
            if self
                .call("txn", kv.txn(txn))
                .map_err(StoreError::new)?
                .succeeded()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn watch(&self) -> StoreWatch {
        self.changes.subscribe()
    }

    fn health(&self) -> watch::Receiver<StoreHealth> {
        self.health.subscribe()
    }

    fn shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[path = "../../tests/support/etcd.rs"]
mod etcd_server;

#[cfg(test)]
mod tests {
    use super::etcd_server::{binary, Etcd};
    use super::*;
    use crate::lease::{GrantInput, Principal};

    /// The etcd binary, or `None` (the test skips, saying why) outside CI; in CI it must be
    /// there.
    fn etcd_binary() -> Option<std::path::PathBuf> {
        match binary() {
            Ok(bin) => Some(bin),
            Err(why) if std::env::var_os("CI").is_none() => {
                eprintln!("skipping: {why}");
                None
            }
            Err(why) => panic!("etcd is required in CI: {why}"),
        }
    }

    fn etcd() -> Option<Etcd> {
        etcd_binary().map(|bin| Etcd::start(&bin))
    }

    fn settings(etcd: &Etcd) -> EtcdSettings {
        EtcdSettings {
            endpoints: vec![etcd.endpoint.clone()],
            prefix: "/test/".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            max_staleness: Duration::from_secs(2),
        }
    }

    fn lease(task: &str, selectors: &[&str]) -> Lease {
        let input = GrantInput {
            task_id: task.into(),
            delegator: "alice".into(),
            agent: "a".into(),
            ttl: Some(Duration::from_secs(60)),
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        crate::lease::validate_grant(
            input,
            &crate::lease::test_limits(),
            SystemTime::now(),
            Principal::agent(),
        )
        .unwrap()
    }

    /// A store call from a test's async body, as the registry makes it from the blocking pool.
    fn blocking<T>(f: impl FnOnce() -> T) -> T {
        tokio::task::block_in_place(f)
    }

    async fn next_put(watch: &mut StoreWatch) -> Arc<Lease> {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), watch.recv()).await {
                Ok(Ok(StoreChange::Put(l))) => return l,
                Ok(Ok(_)) => continue,
                other => panic!("expected a put, got {other:?}"),
            }
        }
    }

    /// A store on `settings`, loaded and watched, holding one lease its watch has delivered.
    async fn one_lease_watched(settings: EtcdSettings) -> (Arc<EtcdStore>, StoreWatch, Lease) {
        let a = EtcdStore::connect(settings, "node-a").await.unwrap();
        let mut watch = a.watch();
        blocking(|| a.load()).unwrap();
        let l = lease("t", &["unix:uid:7"]);
        blocking(|| a.put(&l)).unwrap();
        assert_eq!(next_put(&mut watch).await.id, l.id);
        (a, watch, l)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_compare_revisions_and_two_agents_see_each_others_changes() {
        let Some(etcd) = etcd() else { return };
        let a = EtcdStore::connect(settings(&etcd), "node-a").await.unwrap();
        let b = EtcdStore::connect(settings(&etcd), "node-b").await.unwrap();
        let mut b_watch = b.watch();
        assert!(blocking(|| b.load()).unwrap().is_empty());
        let mut l = lease("t", &["unix:uid:7"]);
        blocking(|| a.put(&l)).unwrap();
        let seen = next_put(&mut b_watch).await;
        assert_eq!((seen.id.clone(), seen.revision), (l.id.clone(), 1));
        // A write from the old revision (what a second agent would do) is refused, with the
        // lease as it is now.
        let stale = l.clone();
        l.revision = 1;
        l.expires_at += Duration::from_secs(10);
        blocking(|| b.put(&l)).unwrap();
        match blocking(|| a.put(&stale)) {
            Err(StoreError::Conflict(now)) => {
                assert_eq!(now.len(), 1);
                assert_eq!(now[0].revision, 2);
                assert_eq!(now[0].expires_at, l.expires_at);
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        // A lease bound to node B's process is B's alone.
        let mut bound = lease("bound", &["unix:uid:8"]);
        bound.node = Some("node-b".into());
        blocking(|| b.put(&bound)).unwrap();
        let ids = |s: &EtcdStore| -> Vec<LeaseId> {
            let mut ids: Vec<LeaseId> = blocking(|| s.load())
                .unwrap()
                .iter()
                .map(|l| l.id.clone())
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(ids(&a), vec![l.id.clone()]);
        let mut both = vec![l.id.clone(), bound.id.clone()];
        both.sort();
        assert_eq!(ids(&b), both);
        // Compaction deletes only what ended before the cutoff.
        l.revision = 2;
        l.mark_ended(LeaseState::Revoked, Principal::agent(), "done");
        blocking(|| a.put(&l)).unwrap();
        assert_eq!(
            blocking(|| a.compact(SystemTime::now() - Duration::from_secs(60))).unwrap(),
            0
        );
        assert_eq!(
            blocking(|| a.compact(SystemTime::now() + Duration::from_secs(1))).unwrap(),
            1
        );
        assert_eq!(ids(&a), Vec::<LeaseId>::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_resuming_from_compacted_history_reads_everything_again() {
        let Some(etcd) = etcd() else { return };
        let a = EtcdStore::connect(settings(&etcd), "node-a").await.unwrap();
        let first = lease("first", &["unix:uid:7"]);
        blocking(|| a.put(&first)).unwrap();
        let mut client = a.client.clone();
        let revision = client
            .get("x", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        client.compact(revision, None).await.unwrap();
        let mut watch = a.watch();
        // As if the agent had read the store long ago, before the compaction.
        a.start_watch(0);
        match tokio::time::timeout(Duration::from_secs(5), watch.recv()).await {
            Ok(Ok(StoreChange::Reloaded(all))) => {
                assert_eq!(all.len(), 1);
                assert_eq!(all[0].id, first.id);
            }
            other => panic!("expected a full read, got {other:?}"),
        }
        // And it follows from there.
        let second = lease("second", &["unix:uid:7"]);
        blocking(|| a.put(&second)).unwrap();
        assert_eq!(next_put(&mut watch).await.id, second.id);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_etcd_with_tls_and_client_certificates_is_reached_with_the_configured_files() {
        let Some(bin) = etcd_binary() else { return };
        let (etcd, tls) = Etcd::start_tls(&bin);
        let mut s = settings(&etcd);
        assert!(s.endpoints[0].starts_with("https://"));
        // Without a client certificate, etcd refuses.
        s.ca_file = Some(tls.ca.clone());
        let without = EtcdStore::connect(s.clone(), "node-a").await.unwrap();
        assert!(blocking(|| without.load()).is_err());
        s.cert_file = Some(tls.cert.clone());
        s.key_file = Some(tls.key.clone());
        let with = EtcdStore::connect(s, "node-a").await.unwrap();
        let l = lease("tls", &["unix:uid:7"]);
        blocking(|| with.put(&l)).unwrap();
        assert_eq!(blocking(|| with.load()).unwrap()[0].id, l.id);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frozen_etcd_makes_the_store_stale_and_it_recovers_on_its_own() {
        let Some(etcd) = etcd() else { return };
        let a = EtcdStore::connect(settings(&etcd), "node-a").await.unwrap();
        blocking(|| a.load()).unwrap();
        let mut health = a.health();
        etcd.freeze();
        let refused = blocking(|| a.put(&lease("t", &["unix:uid:7"])));
        assert!(matches!(refused, Err(StoreError::Failed(_))), "{refused:?}");
        tokio::time::timeout(
            Duration::from_secs(10),
            health.wait_for(|h| h.stale && !h.reachable),
        )
        .await
        .expect("stale within max_staleness")
        .unwrap();
        etcd.thaw();
        tokio::time::timeout(
            Duration::from_secs(10),
            health.wait_for(|h| *h == StoreHealth::FINE),
        )
        .await
        .expect("fresh again once etcd answers")
        .unwrap();
        blocking(|| a.put(&lease("u", &["unix:uid:7"]))).unwrap();
    }

    /// A record this agent cannot read (a newer agent's format, or damage) is never served:
    /// the watch says so, a look-up says so, and a full read leaves it out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_this_agent_cannot_read_is_reported_and_not_served() {
        let Some(etcd) = etcd() else { return };
        let (a, mut watch, l) = one_lease_watched(settings(&etcd)).await;
        // Record format 99, as a later version of mayfly might write it.
        let mut client = a.client.clone();
        client
            .put(a.key(&l), vec![99u8, 1, 2, 3], None)
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(5), watch.recv()).await {
            Ok(Ok(StoreChange::Unreadable(id))) => assert_eq!(id, l.id),
            other => panic!("expected an unreadable lease, got {other:?}"),
        }
        assert!(matches!(
            blocking(|| a.read(&l)).unwrap(),
            Stored::Unreadable
        ));
        assert!(blocking(|| a.load()).unwrap().is_empty());
        let gone = lease("gone", &["unix:uid:7"]);
        assert!(matches!(
            blocking(|| a.read(&gone)).unwrap(),
            Stored::Absent
        ));
    }

    /// A quiet, healthy etcd keeps the store current: the markers' reads find nothing the
    /// watch has not delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_store_stays_current() {
        let Some(etcd) = etcd() else { return };
        let mut s = settings(&etcd);
        s.max_staleness = Duration::from_millis(1500);
        let a = EtcdStore::connect(s, "node-a").await.unwrap();
        blocking(|| a.load()).unwrap();
        let mut health = a.health();
        let went_stale =
            tokio::time::timeout(Duration::from_secs(5), health.wait_for(|h| h.stale)).await;
        assert!(
            went_stale.is_err(),
            "stale while etcd answered: {went_stale:?}"
        );
    }

    /// The attack on the clock: a watch that has not delivered a change must not count as
    /// current however much else etcd says, nor may a read that reaches no registry (an
    /// admin's listing) make it current. Here the change is one the watch cannot see (the
    /// marker moved with no lease written, as if its event were stuck): the store turns stale,
    /// then reads everything again and is current as of that read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_the_watch_has_not_delivered_holds_the_clock_back() {
        let Some(etcd) = etcd() else { return };
        let mut s = settings(&etcd);
        s.max_staleness = Duration::from_secs(3);
        let (a, mut watch, l) = one_lease_watched(s).await;
        let mut client = a.client.clone();
        client
            .put(a.marker(&l), Vec::<u8>::new(), None)
            .await
            .unwrap();
        let mut health = a.health();
        tokio::time::timeout(Duration::from_secs(8), health.wait_for(|h| h.stale))
            .await
            .expect("stale: the watch never delivered the marker's revision")
            .unwrap();
        blocking(|| a.load()).unwrap();
        assert!(
            a.health().borrow().stale,
            "a listing made the store current"
        );
        loop {
            match tokio::time::timeout(Duration::from_secs(5), watch.recv()).await {
                Ok(Ok(StoreChange::Reloaded(all))) => {
                    assert_eq!(all.len(), 1);
                    break;
                }
                Ok(Ok(_)) => continue,
                other => panic!("expected a full read, got {other:?}"),
            }
        }
        tokio::time::timeout(Duration::from_secs(5), health.wait_for(|h| !h.stale))
            .await
            .expect("current again after the full read")
            .unwrap();
    }

    #[test]
    fn loopback_endpoints_are_told_apart() {
        for e in [
            "http://127.0.0.1:2379",
            "localhost:2379",
            "[::1]:2379",
            "http://[::1]:2379",
        ] {
            assert!(loopback(e), "{e}");
        }
        for e in [
            "http://10.0.0.5:2379",
            "etcd.mayfly-system.svc:2379",
            "http://[2001:db8::1]:2379",
        ] {
            assert!(!loopback(e), "{e}");
        }
    }
}
