//! Health, readiness and metrics: `/healthz/live`, `/healthz/ready` (naming what is still
//! pending) and `/metrics` in Prometheus text format, families named `mayfly_*`.
//!
//! Readiness works by guards (as in ztunnel): each start-up step holds a [`ReadyGuard`]; the
//! agent is ready once all are dropped.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as PromRegistry;
use tokio_util::sync::CancellationToken;

/// Root's agent (a DaemonSet, a systemd unit) serves health on this TCP address by default.
/// Any other user's agent serves it on a Unix socket in its own runtime directory instead
/// (`Defaults::health_addr`): two users' agents never compete for one port, and a user's
/// `mayfly healthcheck` never hears another user's agent.
pub const ROOT_HEALTH_ADDR: &str = "127.0.0.1:9095";

/// Where the health endpoint listens: `IP:PORT`, or a Unix socket (`unix:/path`,
/// `unix:///path`, or an absolute path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthAddr {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

impl HealthAddr {
    pub fn parse(s: &str) -> Result<HealthAddr, String> {
        if s.starts_with("unix:") || s.starts_with('/') {
            let path = crate::config::socket_path(s);
            if path.is_absolute() {
                return Ok(HealthAddr::Unix(path));
            }
        }
        s.parse()
            .map(HealthAddr::Tcp)
            .map_err(|_| format!("{s:?}: must be IP:PORT or unix:/absolute/path"))
    }

    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            HealthAddr::Tcp(a) => Some(*a),
            HealthAddr::Unix(_) => None,
        }
    }
}

impl std::fmt::Display for HealthAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HealthAddr::Tcp(a) => write!(f, "{a}"),
            HealthAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Every health answer names the uid the agent runs as, so `mayfly healthcheck` can tell
/// its own user's agent from someone else's.
const UID_HEADER: &str = "mayfly-agent-uid";

/// What is still starting up.
#[derive(Default)]
pub struct Readiness {
    pending: Mutex<BTreeSet<&'static str>>,
}

/// Dropping it marks its step done.
pub struct ReadyGuard {
    readiness: Arc<Readiness>,
    name: &'static str,
}

impl Readiness {
    pub fn register(self: &Arc<Self>, name: &'static str) -> ReadyGuard {
        self.pending
            .lock()
            .expect("readiness poisoned")
            .insert(name);
        ReadyGuard {
            readiness: self.clone(),
            name,
        }
    }

    /// The steps still pending; empty when ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.pending
            .lock()
            .expect("readiness poisoned")
            .iter()
            .copied()
            .collect()
    }
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        self.readiness
            .pending
            .lock()
            .expect("readiness poisoned")
            .remove(self.name);
    }
}

/// Label values are the variant names, so they are spelled as they should read.
#[allow(non_camel_case_types)]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum SvidKind {
    x509,
    jwt,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: SvidKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Every metric the agent exports. Cloning shares the same series.
#[derive(Clone)]
pub struct Metrics {
    pub leases: Family<StateLabel, Gauge>,
    pub lease_ends: Family<StateLabel, Counter>,
    pub svids_issued: Family<KindLabel, Counter>,
    pub issuance_seconds: Family<KindLabel, Histogram>,
    pub attestations: Family<ResultLabel, Counter>,
    pub open_streams: Gauge,
    pub teardown_seconds: Histogram,
    pub audit_write_seconds: Histogram,
    pub ca_not_after: Gauge<i64, AtomicI64>,
    pub svid_not_after: Gauge<i64, AtomicI64>,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    pub fn new(registry: &mut PromRegistry) -> Metrics {
        let m = Metrics {
            leases: Family::default(),
            lease_ends: Family::default(),
            svids_issued: Family::default(),
            issuance_seconds: Family::new_with_constructor(latency_histogram),
            attestations: Family::default(),
            open_streams: Gauge::default(),
            teardown_seconds: latency_histogram(),
            audit_write_seconds: latency_histogram(),
            ca_not_after: Gauge::default(),
            svid_not_after: Gauge::default(),
        };
        let r = registry;
        r.register("mayfly_leases", "Task leases by state", m.leases.clone());
        r.register(
            "mayfly_lease_ends",
            "Task leases ended, by final state",
            m.lease_ends.clone(),
        );
        r.register(
            "mayfly_svids_issued",
            "SVIDs issued, by kind",
            m.svids_issued.clone(),
        );
        r.register(
            "mayfly_svid_issuance_seconds",
            "Time to issue one SVID (key generation, signing, audit)",
            m.issuance_seconds.clone(),
        );
        r.register(
            "mayfly_attestations",
            "Workload attestations, by result",
            m.attestations.clone(),
        );
        r.register(
            "mayfly_open_streams",
            "Open Workload API streams",
            m.open_streams.clone(),
        );
        r.register(
            "mayfly_teardown_seconds",
            "From a lease's end to its identity being withdrawn from open streams",
            m.teardown_seconds.clone(),
        );
        r.register(
            "mayfly_audit_write_seconds",
            "Time for an audit record to become durable",
            m.audit_write_seconds.clone(),
        );
        r.register(
            "mayfly_ca_not_after_timestamp_seconds",
            "Expiry of the signing CA (Unix time)",
            m.ca_not_after.clone(),
        );
        r.register(
            "mayfly_svid_not_after_timestamp_seconds",
            "Expiry of the most recently issued X.509-SVID (Unix time)",
            m.svid_not_after.clone(),
        );
        m
    }

    /// Metrics that are not exported anywhere (tests of single components).
    pub fn unregistered() -> Metrics {
        Metrics::new(&mut PromRegistry::default())
    }

    pub fn set_ca_not_after(&self, t: SystemTime) {
        self.ca_not_after.set(unix(t));
    }

    pub fn set_svid_not_after(&self, t: SystemTime) {
        self.svid_not_after.set(unix(t));
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Times a future into a histogram.
pub async fn timed<T>(h: &Histogram, f: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let out = f.await;
    h.observe(start.elapsed().as_secs_f64());
    out
}

/// Counts a stream as open for as long as it lives.
pub struct StreamGuard(Gauge);

impl StreamGuard {
    pub fn new(g: &Gauge) -> StreamGuard {
        g.inc();
        StreamGuard(g.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct HealthState {
    readiness: Arc<Readiness>,
    registry: PromRegistry,
    /// Refreshes gauges that are read rather than counted (leases by state) before a scrape.
    refresh: Box<dyn Fn() + Send + Sync>,
}

/// The health server, bound before anything else starts so probes get answers (503 while
/// starting) from the first moment.
pub struct HealthServer {
    listener: HealthListener,
    pub addr: HealthAddr,
}

enum HealthListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

#[derive(Debug, thiserror::Error)]
pub enum HealthBindError {
    #[error("{0}")]
    Tcp(std::io::Error),
    #[error("{0}")]
    Unix(crate::listen::BindError),
}

impl HealthServer {
    /// Binds now (a taken address fails start-up); port 0 picks a free port, shown in `addr`.
    /// A Unix socket is for its owner only (mode 0600).
    pub async fn bind(addr: &HealthAddr) -> Result<HealthServer, HealthBindError> {
        match addr {
            HealthAddr::Tcp(a) => {
                let listener = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(HealthBindError::Tcp)?;
                let addr = HealthAddr::Tcp(listener.local_addr().map_err(HealthBindError::Tcp)?);
                Ok(HealthServer {
                    listener: HealthListener::Tcp(listener),
                    addr,
                })
            }
            HealthAddr::Unix(path) => {
                let listener = crate::listen::bind(path, 0o600).map_err(HealthBindError::Unix)?;
                Ok(HealthServer {
                    listener: HealthListener::Unix(listener),
                    addr: addr.clone(),
                })
            }
        }
    }

    pub async fn serve(
        self,
        readiness: Arc<Readiness>,
        registry: PromRegistry,
        refresh: Box<dyn Fn() + Send + Sync>,
        shutdown: CancellationToken,
    ) {
        let state = Arc::new(HealthState {
            readiness,
            registry,
            refresh,
        });
        let app = Router::new()
            .route("/healthz/live", get(|| async { "live\n" }))
            .route("/healthz/ready", get(ready))
            .route("/metrics", get(metrics))
            .layer(axum::middleware::map_response(add_uid))
            .with_state(state);
        let stop = async move { shutdown.cancelled().await };
        let r = match self.listener {
            HealthListener::Tcp(l) => axum::serve(l, app).with_graceful_shutdown(stop).await,
            HealthListener::Unix(l) => {
                let path = match &self.addr {
                    HealthAddr::Unix(p) => Some(p.clone()),
                    HealthAddr::Tcp(_) => None,
                };
                let r = axum::serve(l, app).with_graceful_shutdown(stop).await;
                if let Some(p) = path {
                    let _ = std::fs::remove_file(p);
                }
                r
            }
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "health server failed");
        }
    }
}

async fn add_uid(mut r: axum::response::Response) -> axum::response::Response {
    let uid = rustix::process::geteuid().as_raw();
    r.headers_mut().insert(UID_HEADER, uid.into());
    r
}

async fn ready(State(s): State<Arc<HealthState>>) -> (StatusCode, String) {
    let pending = s.readiness.pending();
    if pending.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: pending {}\n", pending.join(", ")),
        )
    }
}

async fn metrics(
    State(s): State<Arc<HealthState>>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (s.refresh)();
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            e.to_string(),
        ),
    }
}

/// `mayfly healthcheck`: asks `/healthz/ready` over plain HTTP/1.1; Ok when ready.
/// `mayfly healthcheck`: exits 0 when the agent at `addr` is ready. Without an explicit
/// address it asks this user's default one and refuses an answer from an agent of another uid.
pub async fn healthcheck(explicit: Option<&str>) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = match explicit {
        Some(a) => HealthAddr::parse(a).map_err(|e| anyhow::anyhow!("--health-addr {e}"))?,
        None => crate::config::Defaults::for_current_user().health_addr(),
    };
    let request = b"GET /healthz/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let fut = async {
        let mut body = String::new();
        match &addr {
            HealthAddr::Tcp(a) => {
                let mut s = tokio::net::TcpStream::connect(a).await?;
                s.write_all(request).await?;
                s.read_to_string(&mut body).await?;
            }
            HealthAddr::Unix(p) => {
                let mut s = tokio::net::UnixStream::connect(p).await?;
                s.write_all(request).await?;
                s.read_to_string(&mut body).await?;
            }
        }
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within 5s"))?
        .map_err(|e| anyhow::anyhow!("no agent answers at {addr}: {e}"))?;
    let (head, text) = body.split_once("\r\n\r\n").unwrap_or((&body, ""));
    let status = head.lines().next().unwrap_or_default();
    let agent_uid = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(UID_HEADER)
            .then(|| v.trim().parse::<u32>().ok())
            .flatten()
    });
    let me = rustix::process::geteuid().as_raw();
    if explicit.is_none() && agent_uid != Some(me) {
        anyhow::bail!(
            "the agent answering at {addr} runs as uid {}, not as you (uid {me}); \
             pass --health-addr to ask it anyway",
            agent_uid.map_or("unknown".to_owned(), |u| u.to_string())
        );
    }
    let text = text.trim();
    if status.contains(" 200 ") {
        println!("{text}");
        Ok(())
    } else {
        anyhow::bail!("{status}: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_pending() {
        let r = Arc::new(Readiness::default());
        let a = r.register("signing CA");
        let b = r.register("sockets");
        assert_eq!(r.pending(), vec!["signing CA", "sockets"]);
        drop(a);
        assert_eq!(r.pending(), vec!["sockets"]);
        drop(b);
        assert!(r.pending().is_empty());
    }

    #[tokio::test]
    async fn ready_endpoint_reports_pending_steps() {
        let server = HealthServer::bind(&HealthAddr::parse("127.0.0.1:0").unwrap())
            .await
            .unwrap();
        let addr = server.addr.to_string();
        let readiness = Arc::new(Readiness::default());
        let guard = readiness.register("lease store");
        let shutdown = CancellationToken::new();
        tokio::spawn(server.serve(
            readiness.clone(),
            PromRegistry::default(),
            Box::new(|| {}),
            shutdown.clone(),
        ));
        let err = healthcheck(Some(&addr)).await.unwrap_err().to_string();
        assert!(err.contains("503") && err.contains("lease store"), "{err}");
        drop(guard);
        healthcheck(Some(&addr)).await.unwrap();
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_unix_health_socket_is_the_owners_and_names_its_uid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("health.sock");
        let addr = HealthAddr::parse(&format!("unix://{}", path.display())).unwrap();
        let server = HealthServer::bind(&addr).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let shutdown = CancellationToken::new();
        tokio::spawn(server.serve(
            Arc::new(Readiness::default()),
            PromRegistry::default(),
            Box::new(|| {}),
            shutdown.clone(),
        ));
        healthcheck(Some(&addr.to_string())).await.unwrap();
        shutdown.cancel();
    }
}
