//! Builds the agent: load the CA, bind both sockets first (so a taken socket fails start-up
//! loudly and tests can use temp paths), then spawn the servers. Shutdown is one token.

mod ca;
mod data_dir;
mod dir_watch;
mod memory;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::attest::k8s::K8sAttestor;
use crate::attest::Attestor;
use crate::audit::{Audit, AuditLog, AuditOptions, ReportingSink};
use crate::authority::federation::Federation;
use crate::authority::jwt_keys::{JwtKeys, KeyPolicy, TokenProfile};
use crate::authority::x509::{Authorities, RotationPolicy};
use crate::config::Config;
use crate::config::StoreSettings;
use crate::lease::LeaseStore;
use crate::lease::{Durable, Leases};
use crate::policy::PolicyEngine;
use crate::server::health::HealthServer;
use crate::server::remote_admin::RemoteAdmin;
use crate::store::{EtcdStore, RedbStore};
use crate::svid::Manager;
use crate::telemetry::{Metrics, Readiness, StateLabel};
use prometheus_client::registry::Registry as PromRegistry;

/// How long open streams get to drain on shutdown.
const GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    DataDir(#[from] data_dir::DataDirError),
    #[error("signing CA: {0}")]
    Ca(#[from] crate::authority::x509::CaError),
    #[error("lease store: {0}")]
    Store(#[from] crate::store::RedbError),
    #[error("lease store: {0}")]
    Etcd(#[from] crate::store::EtcdError),
    #[error("lease store: {0}")]
    StoreOther(String),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("policies: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("kubernetes attestation: {0}")]
    Kubernetes(#[from] crate::attest::k8s::K8sError),
    #[error("federation: {0}")]
    Federation(#[from] crate::authority::federation::FederationError),
    #[error("JWT signing keys: {0}")]
    Jwt(#[from] crate::authority::jwt_keys::JwtError),
    #[error(
        "health endpoint {addr}: {source} (is another agent using it? choose another with \
         --health-addr, or health_addr in the config)"
    )]
    Health {
        addr: crate::config::HealthAddr,
        source: crate::server::health::HealthBindError,
    },
    #[error("remote admin API: {0}")]
    RemoteAdmin(#[from] crate::server::remote_admin::RemoteAdminError),
    #[error("workload socket: {0}")]
    Workload(crate::server::listen::BindError),
    #[error("admin socket: {0}")]
    Admin(crate::server::listen::BindError),
}

pub struct Agent {
    pub socket: PathBuf,
    pub extra_sockets: Vec<PathBuf>,
    pub admin_socket: PathBuf,
    pub data_dir: PathBuf,
    pub health_addr: crate::config::HealthAddr,
    /// The remote admin API's bound address, if `admin_addr` is set.
    pub admin_addr: Option<std::net::SocketAddr>,
    pub policy: Arc<PolicyEngine>,
    pub registry: Arc<Leases>,
    pub manager: Arc<Manager>,
    audit: AuditLog,
    etcd: Option<Arc<EtcdStore>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Agent {
    pub async fn start(config: Config) -> Result<Agent, StartError> {
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        // The health endpoint comes first, so probes see "not ready: pending ..." while the
        // rest starts, and a taken port fails start-up loudly.
        let health = HealthServer::bind(&config.health_addr)
            .await
            .map_err(|source| StartError::Health {
                addr: config.health_addr.clone(),
                source,
            })?;
        let health_addr = health.addr.clone();
        let readiness = Arc::new(Readiness::default());
        let mut prom = PromRegistry::default();
        let metrics = Metrics::new(&mut prom);
        let ready_ca = readiness.register(ca::READY_PART);
        let ready_store = readiness.register("lease store");
        let ready_audit = readiness.register("audit log");
        let ready_sockets = readiness.register("sockets");

        data_dir::prepare(&config.data_dir)?;
        data_dir::check_continuity(&config.data_dir, config.ca.cert_file.is_none())?;
        let authorities = Authorities::load(
            &config.data_dir,
            &config.limits.trust_domain,
            &config.ca,
            RotationPolicy {
                ttl: config.ca_ttl,
                prepare_at: config.ca_prepare_at,
                activate_at: config.ca_activate_at,
                max_svid_ttl: config.limits.max_svid_ttl,
            },
        )?;
        let ca = authorities.handle();
        metrics.set_ca_not_after(ca.current().not_after());
        metrics.set_ca_next_rotation(authorities.next_rotation());
        drop(ready_ca);
        raise_fd_limit();

        let workload =
            crate::server::listen::bind(&config.socket, 0o666).map_err(StartError::Workload)?;
        let admin =
            crate::server::listen::bind(&config.admin_socket, 0o660).map_err(StartError::Admin)?;
        let extra = config
            .extra_sockets
            .iter()
            .map(|p| crate::server::listen::bind(p, 0o666).map_err(StartError::Workload))
            .collect::<Result<Vec<_>, _>>()?;

        let audit = AuditLog::open(
            &config.data_dir.join("audit"),
            AuditOptions {
                max_segment_bytes: config.audit_segment_bytes,
            },
        )?;
        // Every part records through the sink, which tells readiness while records fail; the
        // agent keeps the log itself to close it.
        let sink: Audit = ReportingSink::new(Arc::new(audit.clone()), readiness.clone());
        let started = std::time::Instant::now();
        let (store, etcd): (Arc<dyn LeaseStore>, _) = match &config.store {
            StoreSettings::Redb => (
                Arc::new(RedbStore::open(&config.data_dir.join("leases.redb"))?),
                None,
            ),
            StoreSettings::Etcd(settings) => {
                let etcd = EtcdStore::connect(settings.clone(), &config.node_name).await?;
                (etcd.clone(), Some(etcd))
            }
        };
        let opened = started.elapsed();
        // Taken before the load: a change another agent makes meanwhile is not missed.
        let changes = store.watch();
        let stored = load_store(&store, &shutdown).await?;
        drop(ready_store);
        let registry = Leases::new(
            config.limits.clone(),
            Durable {
                store: store.clone(),
                audit: sink.clone(),
                metrics: metrics.clone(),
                node: config.node_name.clone(),
            },
        );
        let loaded = started.elapsed();
        let count = stored.len();
        registry.restore(stored, config.retention).await;
        // Only a shared store brings changes this agent did not make itself.
        if store.shared() {
            registry.follow(changes);
        }
        tasks.spawn(report_store_health(
            store.health(),
            readiness.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        tracing::info!(
            event = "store_loaded",
            leases = count,
            open_ms = millis(opened),
            load_ms = millis(loaded - opened),
            restore_ms = millis(started.elapsed() - loaded),
            "lease store opened, read and restored"
        );
        drop(ready_audit);
        // The CAs rotate (embedded) or reload (operator files) from now on.
        tasks.spawn(ca::maintain(
            authorities,
            ca.clone(),
            sink.clone(),
            metrics.clone(),
            readiness.clone(),
            shutdown.clone(),
        ));
        let jwt_keys = Arc::new(JwtKeys::load_or_create(
            &config.data_dir.join("jwt"),
            &config.limits.trust_domain,
            KeyPolicy {
                rotate_after: config.jwt_key_rotation,
                max_token_ttl: config.limits.max_jwt_ttl,
            },
        )?);
        // WIT-SVIDs are signed by keys of their own (`data/wit`), never by the JWT-SVID keys.
        let wit_keys = Arc::new(JwtKeys::load_or_create_for(
            TokenProfile::WitSvid,
            &config.data_dir.join("wit"),
            &config.limits.trust_domain,
            KeyPolicy {
                rotate_after: config.jwt_key_rotation,
                max_token_ttl: config.limits.max_svid_ttl,
            },
        )?);
        let wits = Arc::new(crate::svid::wit::WitIssuer::new(
            wit_keys.clone(),
            sink.clone(),
        ));
        let manager = Manager::new(
            ca.clone(),
            jwt_keys.clone(),
            registry.clone(),
            sink.clone(),
            metrics.clone(),
        );
        let policy = Arc::new(PolicyEngine::load(config.policy.clone())?);
        tracing::info!(event = "policies_loaded", source = %policy.describe(), "admin policies loaded");
        let attestor = Arc::new(Attestor::new(config.max_digest_bytes));
        let k8s = Arc::new(K8sAttestor::new(
            config.kubelet.clone(),
            crate::attest::k8s::host_layout(config.cgroup_layout.clone()),
        )?);
        let refresh = {
            let (registry, metrics) = (registry.clone(), metrics.clone());
            Box::new(move || {
                metrics
                    .leases
                    .get_or_create(&StateLabel {
                        state: "active".into(),
                    })
                    .set(registry.active_count() as i64);
                metrics
                    .leases
                    .get_or_create(&StateLabel {
                        state: "pending".into(),
                    })
                    .set(registry.pending_count() as i64);
            })
        };
        tasks.spawn(health.serve(readiness.clone(), prom, refresh, shutdown.clone()));

        // Other trust domains' bundles: files read now (a broken one fails start-up), endpoints
        // fetched from now on.
        let federation = Federation::start(config.federation.clone())?;
        tasks.spawn(federation.clone().run(shutdown.clone()));
        let identities = crate::identity::IdentitySource::new(crate::identity::Parts {
            manager: manager.clone(),
            registry: registry.clone(),
            ca: ca.clone(),
            jwt_keys: jwt_keys.clone(),
            wits,
            federation,
            audit: sink.clone(),
            attestor: attestor.clone(),
            k8s,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        });
        let workload_api = crate::server::workload_api::WorkloadApi::new(identities.clone());
        let delegation = crate::server::delegation::DelegationApi::new(
            identities.clone(),
            crate::lease::DelegationService::new(
                registry.clone(),
                sink.clone(),
                policy.clone(),
                config.approval_timeout,
                config.allowed_remote.clone(),
            ),
        );
        let sds = crate::server::sds::Sds::new(identities, config.sds.clone(), metrics.clone());
        let tasks_service = crate::lease::TaskService::new(
            registry.clone(),
            sink.clone(),
            policy.clone(),
            crate::lease::Allowlist {
                uids: config.allowed_uids.clone(),
                gids: config.allowed_gids.clone(),
                remote: config.allowed_remote.clone(),
            },
            config.approval_timeout,
        );
        let admin_api =
            crate::server::admin::AdminApi::new(tasks_service, attestor, &config.socket);
        let remote_admin = match config.admin_addr {
            None => None,
            Some(addr) => Some(
                RemoteAdmin::bind(
                    addr,
                    ca.clone(),
                    &config.node_name,
                    &config.admin_client_ca_files,
                    &config.admin_server_names,
                )
                .await?,
            ),
        };
        let admin_addr = remote_admin.as_ref().map(|r| r.addr);
        if let Some(remote) = remote_admin {
            let (api, token) = (admin_api.clone(), shutdown.clone());
            let incoming = remote.incoming(config.handshake_timeout, token.clone());
            tasks.spawn(async move {
                let r = server()
                    .add_service(api)
                    .serve_with_incoming_shutdown(incoming, token.cancelled())
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "remote admin API server failed");
                }
            });
        }

        let (workload_admission, admin_admission) = admissions(&config, &metrics);
        let token = shutdown.clone();
        tasks.spawn(async move {
            // Every workload socket shares one server and one set of connection caps.
            let incoming =
                futures::stream::select_all(std::iter::once(workload).chain(extra).map(|l| {
                    Box::pin(crate::server::listen::incoming(
                        l,
                        workload_admission.clone(),
                    ))
                }));
            let r = server()
                .add_service(workload_api)
                .add_service(delegation)
                .add_service(sds)
                .serve_with_incoming_shutdown(incoming, token.cancelled())
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "workload API server failed");
            }
        });
        let token = shutdown.clone();
        tasks.spawn(async move {
            let r = server()
                .add_service(admin_api)
                .serve_with_incoming_shutdown(
                    crate::server::listen::incoming(admin, admin_admission),
                    token.cancelled(),
                )
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "admin API server failed");
            }
        });
        // Memory freed by a burst of connections goes back to the kernel once they closed.
        let token = shutdown.clone();
        tasks.spawn(async move {
            let mut policy = memory::TrimPolicy::default();
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                let (peak, open) = crate::server::listen::limits::take_peak_connections();
                if policy.observe(peak, open) {
                    let _ = tokio::task::spawn_blocking(memory::trim).await;
                }
            }
        });
        // Ended leases are compacted away once past their retention.
        let (token, r, retention) = (shutdown.clone(), registry.clone(), config.retention);
        tasks.spawn(async move {
            let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(every) => r.compact(retention).await,
                }
            }
        });
        // JWT signing keys rotate on schedule; retired keys leave the bundle once every token
        // they signed has expired.
        let (token, every) = (
            shutdown.clone(),
            (config.jwt_key_rotation / 4)
                .clamp(Duration::from_millis(250), Duration::from_secs(60)),
        );
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                for (keys, kind) in [(jwt_keys.clone(), "JWT"), (wit_keys.clone(), "WIT")] {
                    match tokio::task::spawn_blocking(move || {
                        keys.maintain(std::time::SystemTime::now())
                    })
                    .await
                    {
                        Ok(Ok(true)) => {
                            tracing::info!(
                                event = "jwt_keys_changed",
                                kind,
                                "token signing keys changed"
                            )
                        }
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, kind, "token key maintenance failed")
                        }
                        Err(e) => tracing::error!(error = %e, kind, "token key maintenance failed"),
                    }
                }
            }
        });
        // Policy files are reloaded when they change (and on SIGHUP, see `reload_policies`).
        tasks.spawn(
            policy
                .clone()
                .watch(Duration::from_secs(2), shutdown.clone()),
        );
        tasks.close();
        drop(ready_sockets);

        tracing::info!(
            event = "agent_started",
            trust_domain = %config.limits.trust_domain,
            socket = %config.socket.display(),
            admin_socket = %config.admin_socket.display(),
            data_dir = %config.data_dir.display(),
            "mayfly agent ready"
        );
        Ok(Agent {
            socket: config.socket,
            extra_sockets: config.extra_sockets,
            admin_socket: config.admin_socket,
            data_dir: config.data_dir,
            health_addr,
            admin_addr,
            policy,
            registry,
            manager,
            audit,
            etcd,
            shutdown,
            tasks,
        })
    }

    /// Re-reads the policy files (SIGHUP); a broken set is refused and the old one kept.
    pub fn reload_policies(&self) {
        match self.policy.reload() {
            Ok(()) => {
                tracing::info!(event = "policies_reloaded", source = %self.policy.describe(), "policies reloaded")
            }
            Err(e) => {
                tracing::error!(event = "policy_reload_failed", error = %e, "policy reload failed; keeping the previous policies")
            }
        }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled, then drains (bounded) and removes the sockets.
    pub async fn wait(&self) {
        self.shutdown.cancelled().await;
        if tokio::time::timeout(GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("servers did not drain within {GRACE:?}");
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.admin_socket);
        for p in &self.extra_sockets {
            let _ = std::fs::remove_file(p);
        }
        // Lease tasks stop (leases stay as stored); everything acknowledged is already
        // durable, and closing the audit log drains what is queued.
        self.registry.close().await;
        if let Some(etcd) = &self.etcd {
            etcd.close();
        }
        self.audit.close().await;
        tracing::info!(event = "agent_stopped", "mayfly agent stopped");
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

/// Reads every lease from the store. A shared store that does not answer yet is asked again
/// until it does (the agent is not ready meanwhile); the embedded store's failure is final.
async fn load_store(
    store: &Arc<dyn LeaseStore>,
    shutdown: &CancellationToken,
) -> Result<Vec<Arc<crate::lease::Lease>>, StartError> {
    let mut wait = Duration::from_millis(200);
    loop {
        let s = store.clone();
        let loaded = tokio::task::spawn_blocking(move || s.load())
            .await
            .expect("loading leases");
        match loaded {
            Ok(stored) => return Ok(stored),
            Err(e) if store.shared() && !shutdown.is_cancelled() => {
                tracing::warn!(event = "store_unreachable", error = %e, retry_in = ?wait, "cannot read the lease store yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(match e {
                    crate::lease::StoreError::Failed(e) => {
                        match e.downcast::<crate::store::RedbError>() {
                            Ok(e) => StartError::Store(*e),
                            Err(e) => StartError::StoreOther(e.to_string()),
                        }
                    }
                    other => StartError::StoreOther(other.to_string()),
                })
            }
        }
    }
}

/// Readiness and metrics follow the store's health: not ready while it is stale.
async fn report_store_health(
    mut health: tokio::sync::watch::Receiver<crate::lease::StoreHealth>,
    readiness: Arc<Readiness>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        let h = *health.borrow_and_update();
        metrics.store_reachable.set(h.reachable as i64);
        metrics.store_stale.set(h.stale as i64);
        readiness.set_failing(
            "lease store",
            h.stale.then(|| {
                "not heard from the shared lease store for longer than store.max_staleness: \
                 issuing nothing"
                    .to_string()
            }),
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = health.changed() => if changed.is_err() { return },
        }
    }
}

/// Both servers share these limits: a hostile client costs only its own connection.
fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_max_header_list_size(Some(16 * 1024))
        .max_concurrent_streams(Some(64))
        .concurrency_limit_per_connection(64)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// Milliseconds to a tenth, for logs people read.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Hundreds of idle clients each hold a descriptor: lift the soft limit to the hard one.
/// The caps of both sockets. The admin socket's are small and fixed (its callers are few),
/// and it may use the descriptors the workload socket keeps free.
fn admissions(
    config: &Config,
    metrics: &crate::telemetry::Metrics,
) -> (
    crate::server::listen::Admission,
    crate::server::listen::Admission,
) {
    use crate::server::listen::limits::{ConnLimits, FD_RESERVE};
    use crate::server::listen::Admission;
    let workload = Admission {
        name: "workload",
        limits: ConnLimits::new(
            config.max_connections_per_uid,
            config.max_connections,
            FD_RESERVE,
        ),
        handshake_timeout: config.handshake_timeout,
        refused: metrics.connections_refused.clone(),
    };
    let admin = Admission {
        name: "admin",
        limits: ConnLimits::new(ADMIN_CONNECTIONS_PER_UID, ADMIN_CONNECTIONS, 16),
        ..workload.clone()
    };
    (workload, admin)
}

/// The admin socket's caps: orchestrators and operators, not workloads.
const ADMIN_CONNECTIONS_PER_UID: usize = 64;
const ADMIN_CONNECTIONS: usize = 256;

fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}
