//! The health server: `/healthz/live`, `/healthz/ready` (naming what is still pending) and
//! `/metrics` in Prometheus text format, on TCP or a Unix socket.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry as PromRegistry;
use tokio_util::sync::CancellationToken;

use crate::config::HealthAddr;
use crate::telemetry::Readiness;

/// Every health answer names the uid the agent runs as, so `mayfly healthcheck` can tell
/// its own user's agent from someone else's.
pub const UID_HEADER: &str = "mayfly-agent-uid";

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
    Unix(crate::server::listen::BindError),
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
                let listener =
                    crate::server::listen::bind(path, 0o600).map_err(HealthBindError::Unix)?;
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
    let failing = s.readiness.failing();
    if !pending.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: pending {}\n", pending.join(", ")),
        )
    } else if !failing.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: failing {}\n", failing.join("; ")),
        )
    } else {
        (StatusCode::OK, "ready\n".into())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::healthcheck::healthcheck;

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
