//! Agent configuration: a TOML file (unknown keys refused) overridden by command-line flags,
//! resolved into typed values by one `resolve()` that reports every problem it finds.

mod addr;

pub use addr::{HealthAddr, ROOT_HEALTH_ADDR};

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use spiffe::TrustDomain;

use crate::authority::federation::{FederationEntry, FederationSettings};
use crate::authority::x509::{CaSource, RotationPolicy};
use crate::lease::{IdTemplate, LeaseLimits, DEFAULT_TEMPLATE};

pub const DEFAULT_TRUST_DOMAIN: &str = "mayfly.internal";

/// The file, as written. Every field optional; defaults come from [`Config::resolve`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub trust_domain: Option<String>,
    pub socket: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    /// More paths the workload socket's services are served on, such as the one Istio looks
    /// for (`/var/run/secrets/workload-spiffe-uds/socket` inside the pod).
    pub extra_sockets: Option<Vec<PathBuf>>,
    pub data_dir: Option<PathBuf>,
    /// Health and metrics HTTP endpoint, HOST:PORT.
    pub health_addr: Option<String>,
    pub spiffe_id_template: Option<String>,
    /// `text` (default) or `json`.
    pub log_format: Option<String>,
    #[serde(default)]
    pub leases: LeaseSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub ca: CaSection,
    #[serde(default)]
    pub attestation: AttestationSection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub jwt: JwtSection,
    #[serde(default)]
    pub kubernetes: KubernetesSection,
    #[serde(default)]
    pub connections: ConnectionsSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub sds: SdsSection,
    #[serde(default)]
    pub delegation: DelegationSection,
    #[serde(default)]
    pub store: StoreSection,
    /// Other trust domains whose bundles are served beside this one's (`[[federation]]`).
    #[serde(default)]
    pub federation: Vec<FederationEntry>,
    /// The remote admin API's TCP address (`IP:PORT`), mutual TLS only; unset: none.
    pub admin_addr: Option<String>,
    /// This node's name: what a lease bound to a process here records, and (on a shared
    /// store) the key range only this agent reads. Default: `kubernetes.node_name`, then
    /// `$NODE_NAME`, then the host name.
    pub node_name: Option<String>,
}

/// Where leases live: `kind = "redb"` (the default, under the data dir) or `"etcd"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub kind: Option<String>,
    pub endpoints: Option<Vec<String>>,
    /// Default `/mayfly/`.
    pub prefix: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Defaults 2s and 2s.
    pub dial_timeout: Option<String>,
    pub request_timeout: Option<String>,
    /// Default 5s.
    pub max_staleness: Option<String>,
}

/// Where this agent keeps its leases.
#[derive(Clone, Debug)]
pub enum StoreSettings {
    /// `leases.redb` under the data dir.
    Redb,
    Etcd(crate::store::EtcdSettings),
}

/// Delegation limits (the Delegation service on the workload socket).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationSection {
    /// The deepest delegation chain any grant may allow (`--max-delegation-depth`), default 4.
    pub max_depth: Option<u32>,
    /// Live children one lease may have at once (default 32).
    pub max_children: Option<u32>,
    /// Delegations one lease may make per second, and at once (default 10 and 20).
    pub rate_per_second: Option<u32>,
    pub rate_burst: Option<u32>,
}

/// Envoy SDS on the workload socket: SPIRE agent's setting names and defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdsSection {
    /// The name that gives the caller's first SVID (default `default`).
    pub default_svid_name: Option<String>,
    /// The name that gives this trust domain's bundle (default `ROOTCA`).
    pub default_bundle_name: Option<String>,
    /// The name that gives every bundle (default `ALL`; set it to `ROOTCA` to make `ROOTCA`
    /// carry every bundle).
    pub default_all_bundles_name: Option<String>,
    /// Bundles as `trusted_ca` rather than the SPIFFE validator, for every node.
    #[serde(default)]
    pub disable_spiffe_cert_validation: bool,
}

/// Cedar policies for the admin API. No files: the embedded default policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// Policy files, or directories of `*.cedar` files.
    pub files: Option<Vec<PathBuf>>,
    /// Cedar schema; default: the embedded one.
    pub schema: Option<PathBuf>,
    /// A lease held for approval that nobody approves by then ends as `expired`.
    pub approval_timeout: Option<String>,
}

/// Kubernetes pod attestation. The cgroup-derived selectors (`k8s:pod-uid`,
/// `k8s:container-id`) need nothing here; the kubelet adds namespace, service account, labels...
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSection {
    pub kubelet_url: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
    pub node_name: Option<String>,
    pub cache_ttl: Option<String>,
    pub retry_for: Option<String>,
    pub timeout: Option<String>,
    /// Where the kubelet puts pods' cgroups (its `--cgroup-root` and `kubepods`); default
    /// `crate::attest::k8s::DEFAULT_ROOTS`.
    pub cgroup_roots: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    /// A new JWT signing key is made when the active one is this old.
    pub key_rotation: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// A new segment file starts when the current one reaches this size.
    pub max_segment_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSection {
    pub max_ttl: Option<String>,
    pub default_svid_ttl: Option<String>,
    pub max_svid_ttl: Option<String>,
    pub default_jwt_ttl: Option<String>,
    pub max_jwt_ttl: Option<String>,
    /// How long ended leases stay listed (`task list --all`) before they are compacted away.
    pub retention: Option<String>,
    /// JWT-SVIDs one lease may mint per second, and at once (default 5 and 20).
    pub jwt_mint_per_second: Option<u32>,
    pub jwt_mint_burst: Option<u32>,
}

/// How many connections the workload socket takes, and how soon a client must speak.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsSection {
    /// Open connections from one uid at most (default 2048).
    pub max_per_uid: Option<usize>,
    /// Open connections in all at most (default 16384, and always within the descriptor limit).
    pub max_total: Option<usize>,
    /// A client that has not sent the HTTP/2 preface by then is disconnected (default 10s).
    pub handshake_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub allowed_uids: Option<Vec<u32>>,
    pub allowed_gids: Option<Vec<u32>>,
    /// Remote admin API callers by SPIFFE ID: exact, or `spiffe://td/path/*` for every ID
    /// below a path.
    pub allowed_spiffe_ids: Option<Vec<String>>,
    /// Remote admin API callers with a certificate from an operator CA and no SPIFFE ID, by
    /// subject common name.
    pub allowed_cert_names: Option<Vec<String>>,
    /// PEM files of the roots client certificates must chain to on the remote admin API
    /// (default: this agent's own trust bundle).
    pub client_ca_files: Option<Vec<PathBuf>>,
    /// DNS names and IP addresses the remote admin API's certificate names beside the agent's
    /// SPIFFE ID, for clients that check the host they dialled (gRPC C-core, grpc-java).
    pub server_names: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSection {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub chain_file: Option<PathBuf>,
    pub bundle_file: Option<PathBuf>,
    pub ttl: Option<String>,
    /// The embedded CA: the share of a root's life after which the next root is made and
    /// published (default 0.5), and after which it signs instead (default 0.75).
    pub prepare_at: Option<f64>,
    pub activate_at: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationSection {
    /// Executables larger than this many bytes get no `unix:sha256` selector.
    pub max_digest_bytes: Option<u64>,
}

/// Flags that override the file (`mayfly agent ...`).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub trust_domain: Option<String>,
    pub socket: Option<PathBuf>,
    /// Added to the file's `extra_sockets`.
    pub extra_sockets: Vec<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub health_addr: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The resolved configuration the agent runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    /// More paths serving what the workload socket serves.
    pub extra_sockets: Vec<PathBuf>,
    pub sds: crate::server::sds::SdsSettings,
    pub admin_socket: PathBuf,
    pub data_dir: PathBuf,
    pub health_addr: crate::config::HealthAddr,
    pub limits: LeaseLimits,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    pub ca: CaSource,
    pub ca_ttl: Duration,
    /// Shares of the embedded CA's life: next root published, then signing.
    pub ca_prepare_at: f64,
    pub ca_activate_at: f64,
    pub max_digest_bytes: u64,
    pub log_format: LogFormat,
    pub retention: Duration,
    pub audit_segment_bytes: u64,
    pub jwt_key_rotation: Duration,
    pub kubelet: Option<crate::attest::k8s::KubeletConfig>,
    pub cgroup_layout: crate::attest::k8s::CgroupLayout,
    pub max_connections_per_uid: usize,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub policy: crate::policy::PolicySource,
    pub approval_timeout: Duration,
    pub store: StoreSettings,
    pub node_name: String,
    /// The remote admin API, if `admin_addr` is set.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Remote callers the admin allowlist admits (`spiffe://` patterns and `cn:NAME`).
    pub allowed_remote: Vec<String>,
    pub admin_client_ca_files: Vec<PathBuf>,
    /// Host names the remote admin API's certificate carries.
    pub admin_server_names: Vec<crate::authority::x509::HostName>,
    /// Other trust domains' bundles, and where they come from.
    pub federation: Vec<FederationSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Where a newcomer's agent and clients meet without any configuration: system paths for root,
/// per-user paths for everyone else.
pub struct Defaults {
    pub runtime_dir: PathBuf,
    pub data_dir: PathBuf,
}

impl Defaults {
    pub fn for_current_user() -> Self {
        let uid = rustix::process::geteuid().as_raw();
        if uid == 0 {
            return Defaults {
                runtime_dir: PathBuf::from("/run/mayfly"),
                data_dir: PathBuf::from("/var/lib/mayfly"),
            };
        }
        let runtime_dir = match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("mayfly"),
            _ => PathBuf::from(format!("/tmp/mayfly-{uid}")),
        };
        let data_dir = match (std::env::var_os("XDG_DATA_HOME"), std::env::var_os("HOME")) {
            (Some(d), _) if !d.is_empty() => PathBuf::from(d).join("mayfly"),
            (_, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".local/share/mayfly"),
            _ => runtime_dir.join("data"),
        };
        Defaults {
            runtime_dir,
            data_dir,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("workload.sock")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.runtime_dir.join("admin.sock")
    }

    /// Root: `127.0.0.1:9095`. Anyone else: a socket in their own runtime directory.
    pub fn health_addr(&self) -> crate::config::HealthAddr {
        use addr::{HealthAddr, ROOT_HEALTH_ADDR};
        if rustix::process::geteuid().is_root() {
            HealthAddr::parse(ROOT_HEALTH_ADDR).expect("a valid address")
        } else {
            HealthAddr::Unix(self.runtime_dir.join("health.sock"))
        }
    }
}

/// The workload socket a client uses when none is given: the caller's own default if an agent
/// listens there, else the system agent's.
/// A socket address in any form `SPIFFE_ENDPOINT_SOCKET` takes: `unix:///path`, `unix:/path`,
/// or a plain path.
pub fn socket_path(v: &str) -> PathBuf {
    let path = v
        .strip_prefix("unix://")
        .or_else(|| v.strip_prefix("unix:"))
        .unwrap_or(v);
    PathBuf::from(path)
}

/// `--socket` and `--admin-socket`: the forms of `socket_path`; anything else (another
/// scheme, an empty path) is refused here, naming the forms.
pub fn parse_socket(v: &str) -> Result<PathBuf, String> {
    let path = socket_path(v);
    let s = path.to_string_lossy();
    if s.is_empty() || (s.contains("://") && !v.starts_with("unix:")) {
        return Err(format!(
            "{v:?} is not a Unix socket: give a path, unix:///path or unix:/path"
        ));
    }
    Ok(path)
}

pub fn client_socket(
    explicit: Option<&Path>,
    env_var: &str,
    pick: fn(&Defaults) -> PathBuf,
) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_owned();
    }
    if let Some(v) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        return socket_path(&v.to_string_lossy());
    }
    let mine = pick(&Defaults::for_current_user());
    if mine.exists() {
        return mine;
    }
    let system = pick(&Defaults {
        runtime_dir: PathBuf::from("/run/mayfly"),
        data_dir: PathBuf::new(),
    });
    if system.exists() {
        system
    } else {
        mine
    }
}

/// The `[store]` section, checked.
fn store_settings(errors: &mut Vec<String>, st: &StoreSection) -> StoreSettings {
    let etcd_only = [
        ("endpoints", st.endpoints.is_some()),
        ("prefix", st.prefix.is_some()),
        ("ca_file", st.ca_file.is_some()),
        ("cert_file", st.cert_file.is_some()),
        ("key_file", st.key_file.is_some()),
        ("dial_timeout", st.dial_timeout.is_some()),
        ("request_timeout", st.request_timeout.is_some()),
        ("max_staleness", st.max_staleness.is_some()),
    ];
    match st.kind.as_deref().unwrap_or("redb") {
        "redb" => {
            for (key, set) in etcd_only {
                if set {
                    errors.push(format!("store.{key}: only for kind = \"etcd\""));
                }
            }
            StoreSettings::Redb
        }
        "etcd" => {
            let endpoints = st.endpoints.clone().unwrap_or_default();
            if endpoints.is_empty() {
                errors.push("store.endpoints: name at least one etcd endpoint".into());
            }
            for e in &endpoints {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    errors.push(format!("store.endpoints: {e:?} is not http:// or https://"));
                }
            }
            let prefix = st.prefix.clone().unwrap_or_else(|| "/mayfly/".into());
            if !prefix.ends_with('/') {
                errors.push(format!("store.prefix {prefix:?}: must end with '/'"));
            }
            if st.cert_file.is_some() != st.key_file.is_some() {
                errors.push("store.cert_file and store.key_file go together".into());
            }
            let timeout = |errors: &mut Vec<String>, key: &str, v: &Option<String>, d: u64| {
                let t = duration(errors, key, v.as_deref(), Duration::from_secs(d));
                if t < Duration::from_millis(100) {
                    errors.push(format!("{key}: must be at least 100ms"));
                }
                t
            };
            let settings = crate::store::EtcdSettings {
                endpoints,
                prefix,
                ca_file: st.ca_file.clone(),
                cert_file: st.cert_file.clone(),
                key_file: st.key_file.clone(),
                dial_timeout: timeout(errors, "store.dial_timeout", &st.dial_timeout, 2),
                request_timeout: timeout(errors, "store.request_timeout", &st.request_timeout, 2),
                max_staleness: timeout(errors, "store.max_staleness", &st.max_staleness, 5),
            };
            if settings.max_staleness < settings.request_timeout {
                errors.push("store.max_staleness: must be at least store.request_timeout".into());
            }
            StoreSettings::Etcd(settings)
        }
        other => {
            errors.push(format!("store.kind {other:?}: \"redb\" or \"etcd\""));
            StoreSettings::Redb
        }
    }
}

/// The kernel's host name (the default node name).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

fn duration(
    errors: &mut Vec<String>,
    key: &str,
    value: Option<&str>,
    default: Duration,
) -> Duration {
    match value {
        None => default,
        Some(v) => match crate::time::parse_duration(v) {
            Ok(d) => d,
            Err(e) => {
                errors.push(format!("{key}: {e}"));
                default
            }
        },
    }
}

impl Config {
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
        let file = match path {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
            }
        };
        Config::resolve(file, overrides)
    }

    pub fn resolve(file: FileConfig, o: Overrides) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let defaults = Defaults::for_current_user();

        let td_text = o
            .trust_domain
            .or(file.trust_domain)
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
        let trust_domain = match TrustDomain::new(&td_text) {
            Ok(td) => Some(td),
            Err(e) => {
                errors.push(format!("trust_domain {td_text:?}: {e}"));
                None
            }
        };
        let template_text = file
            .spiffe_id_template
            .unwrap_or_else(|| DEFAULT_TEMPLATE.to_owned());
        let template = match IdTemplate::new(&template_text) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(format!("spiffe_id_template {template_text:?}: {e}"));
                None
            }
        };
        let l = &file.leases;
        let max_ttl = duration(
            &mut errors,
            "leases.max_ttl",
            l.max_ttl.as_deref(),
            Duration::from_secs(24 * 3600),
        );
        let default_svid_ttl = duration(
            &mut errors,
            "leases.default_svid_ttl",
            l.default_svid_ttl.as_deref(),
            Duration::from_secs(300),
        );
        let max_svid_ttl = duration(
            &mut errors,
            "leases.max_svid_ttl",
            l.max_svid_ttl.as_deref(),
            Duration::from_secs(3600),
        );
        let default_jwt_ttl = duration(
            &mut errors,
            "leases.default_jwt_ttl",
            l.default_jwt_ttl.as_deref(),
            Duration::from_secs(300),
        );
        let max_jwt_ttl = duration(
            &mut errors,
            "leases.max_jwt_ttl",
            l.max_jwt_ttl.as_deref(),
            Duration::from_secs(3600),
        );
        if default_jwt_ttl > max_jwt_ttl {
            errors.push("leases.default_jwt_ttl is above leases.max_jwt_ttl".into());
        }
        if default_svid_ttl > max_svid_ttl {
            errors.push("leases.default_svid_ttl is above leases.max_svid_ttl".into());
        }
        for (key, d) in [
            ("leases.max_ttl", max_ttl),
            ("leases.default_svid_ttl", default_svid_ttl),
            ("leases.max_svid_ttl", max_svid_ttl),
            ("leases.default_jwt_ttl", default_jwt_ttl),
            ("leases.max_jwt_ttl", max_jwt_ttl),
        ] {
            if d < crate::lease::MIN_TTL {
                errors.push(format!("{key}: must be at least 1s"));
            }
        }
        let retention = duration(
            &mut errors,
            "leases.retention",
            l.retention.as_deref(),
            Duration::from_secs(24 * 3600),
        );
        let audit_segment_bytes = file.audit.max_segment_bytes.unwrap_or(64 * 1024 * 1024);
        if audit_segment_bytes < 4096 {
            errors.push("audit.max_segment_bytes: must be at least 4096".into());
        }
        let jwt_key_rotation = duration(
            &mut errors,
            "jwt.key_rotation",
            file.jwt.key_rotation.as_deref(),
            Duration::from_secs(24 * 3600),
        );
        if jwt_key_rotation < Duration::from_secs(1) {
            errors.push("jwt.key_rotation: must be at least 1s".into());
        }
        let k = &file.kubernetes;
        let kubelet = k.kubelet_url.clone().map(|url| {
            let d = crate::attest::k8s::KubeletConfig::default();
            crate::attest::k8s::KubeletConfig {
                url,
                token_file: k.token_file.clone(),
                ca_file: k.ca_file.clone(),
                insecure_skip_verify: k.insecure_skip_verify,
                node_name: k.node_name.clone(),
                cache_ttl: duration(
                    &mut errors,
                    "kubernetes.cache_ttl",
                    k.cache_ttl.as_deref(),
                    d.cache_ttl,
                ),
                retry_for: duration(
                    &mut errors,
                    "kubernetes.retry_for",
                    k.retry_for.as_deref(),
                    d.retry_for,
                ),
                timeout: duration(
                    &mut errors,
                    "kubernetes.timeout",
                    k.timeout.as_deref(),
                    d.timeout,
                ),
            }
        });
        if kubelet.is_none()
            && (k.token_file.is_some() || k.ca_file.is_some() || k.insecure_skip_verify)
        {
            errors.push(
                "kubernetes: token_file/ca_file/insecure_skip_verify need kubelet_url".into(),
            );
        }
        let cgroup_layout = match &k.cgroup_roots {
            None => crate::attest::k8s::CgroupLayout::kubelet_default(),
            Some(roots) => crate::attest::k8s::CgroupLayout::new(roots).unwrap_or_else(|e| {
                errors.push(format!("kubernetes.cgroup_roots: {e}"));
                crate::attest::k8s::CgroupLayout::kubelet_default()
            }),
        };
        let jwt_mint = crate::lease::MintRate {
            per_second: file
                .leases
                .jwt_mint_per_second
                .unwrap_or(crate::lease::DEFAULT_JWT_MINT.per_second),
            burst: file
                .leases
                .jwt_mint_burst
                .unwrap_or(crate::lease::DEFAULT_JWT_MINT.burst),
        };
        if jwt_mint.burst == 0 {
            errors.push("leases.jwt_mint_burst: must be at least 1".into());
        }
        let dd = crate::lease::DelegationLimits::default();
        let dl = &file.delegation;
        let delegation = crate::lease::DelegationLimits {
            max_depth: dl.max_depth.unwrap_or(dd.max_depth),
            max_children: dl.max_children.unwrap_or(dd.max_children),
            rate: crate::lease::MintRate {
                per_second: dl.rate_per_second.unwrap_or(dd.rate.per_second),
                burst: dl.rate_burst.unwrap_or(dd.rate.burst),
            },
        };
        if delegation.max_depth > crate::lease::MAX_DELEGATION_DEPTH {
            errors.push(format!(
                "delegation.max_depth: at most {} allowed",
                crate::lease::MAX_DELEGATION_DEPTH
            ));
        }
        if delegation.rate.burst == 0 {
            errors.push("delegation.rate_burst: must be at least 1".into());
        }
        let c = &file.connections;
        let handshake_timeout = duration(
            &mut errors,
            "connections.handshake_timeout",
            c.handshake_timeout.as_deref(),
            Duration::from_secs(10),
        );
        if handshake_timeout.is_zero() {
            errors.push("connections.handshake_timeout: must be more than 0".into());
        }
        let max_connections_per_uid = c.max_per_uid.unwrap_or(2048);
        let max_connections = c.max_total.unwrap_or(16384);
        if max_connections_per_uid == 0 || max_connections == 0 {
            errors.push("connections: max_per_uid and max_total must be at least 1".into());
        }
        let approval_timeout = duration(
            &mut errors,
            "policy.approval_timeout",
            file.policy.approval_timeout.as_deref(),
            Duration::from_secs(3600),
        );
        let ca_ttl = duration(
            &mut errors,
            "ca.ttl",
            file.ca.ttl.as_deref(),
            Duration::from_secs(365 * 24 * 3600),
        );
        // Short CA lives are for tests of rotation: SVIDs never outlive their CA.
        if ca_ttl < Duration::from_secs(4) {
            errors.push("ca.ttl: must be at least 4s".into());
        }
        let prepare_at = file
            .ca
            .prepare_at
            .unwrap_or(RotationPolicy::DEFAULT_PREPARE_AT);
        let activate_at = file
            .ca
            .activate_at
            .unwrap_or(RotationPolicy::DEFAULT_ACTIVATE_AT);
        if !(prepare_at > 0.0 && prepare_at < activate_at && activate_at < 1.0) {
            errors.push(format!(
                "ca.prepare_at ({prepare_at}) and ca.activate_at ({activate_at}): need \
                 0 < prepare_at < activate_at < 1"
            ));
        }
        let log_format = match file.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                errors.push(format!("log_format {other:?}: must be text or json"));
                LogFormat::Text
            }
        };
        let me = rustix::process::geteuid().as_raw();
        let mut allowed_uids = file.admin.allowed_uids.unwrap_or_else(|| vec![0, me]);
        allowed_uids.sort_unstable();
        allowed_uids.dedup();
        let allowed_gids = file.admin.allowed_gids.unwrap_or_default();
        let mut allowed_remote = Vec::new();
        for p in file.admin.allowed_spiffe_ids.clone().unwrap_or_default() {
            let id = p.strip_suffix("/*").unwrap_or(&p);
            match spiffe::SpiffeId::new(id) {
                Ok(_) => allowed_remote.push(p),
                Err(e) => errors.push(format!(
                    "admin.allowed_spiffe_ids {p:?}: not a SPIFFE ID (or one followed by /*): {e}"
                )),
            }
        }
        for n in file.admin.allowed_cert_names.clone().unwrap_or_default() {
            if n.is_empty() {
                errors.push("admin.allowed_cert_names: an empty name".into());
            }
            allowed_remote.push(format!("cn:{n}"));
        }
        let admin_client_ca_files = file.admin.client_ca_files.clone().unwrap_or_default();
        let mut admin_server_names = Vec::new();
        for n in file.admin.server_names.clone().unwrap_or_default() {
            match n.parse() {
                Ok(name) if !admin_server_names.contains(&name) => admin_server_names.push(name),
                Ok(_) => {}
                Err(e) => errors.push(format!("admin.server_names {n:?}: {e}")),
            }
        }
        let admin_addr = match &file.admin_addr {
            None => None,
            Some(a) => match a.parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    errors.push(format!("admin_addr {a:?}: not IP:PORT: {e}"));
                    None
                }
            },
        };

        let socket = o
            .socket
            .or(file.socket)
            .unwrap_or_else(|| defaults.socket());
        let admin_socket = o
            .admin_socket
            .or(file.admin_socket)
            .unwrap_or_else(|| defaults.admin_socket());
        if socket == admin_socket {
            errors.push("socket and admin_socket must differ".into());
        }
        let mut extra_sockets = file.extra_sockets.unwrap_or_default();
        extra_sockets.extend(o.extra_sockets);
        extra_sockets.sort();
        extra_sockets.dedup();
        for p in &extra_sockets {
            if p == &socket || p == &admin_socket {
                errors.push(format!(
                    "extra_sockets: {} is already the socket or the admin socket",
                    p.display()
                ));
            }
        }
        let d = crate::server::sds::Aliases::default();
        let sds = crate::server::sds::SdsSettings {
            aliases: crate::server::sds::Aliases {
                svid: file.sds.default_svid_name.unwrap_or(d.svid),
                bundle: file.sds.default_bundle_name.unwrap_or(d.bundle),
                all_bundles: file.sds.default_all_bundles_name.unwrap_or(d.all_bundles),
            },
            disable_spiffe_cert_validation: file.sds.disable_spiffe_cert_validation,
        };
        errors.extend(sds.aliases.problems());
        let default_health = defaults.health_addr();
        let data_dir = o.data_dir.or(file.data_dir).unwrap_or(defaults.data_dir);
        let health_addr = match o.health_addr.or(file.health_addr) {
            None => Some(default_health),
            Some(a) => crate::config::HealthAddr::parse(&a)
                .map_err(|e| errors.push(format!("health_addr {e}")))
                .ok(),
        };

        let store = store_settings(&mut errors, &file.store);
        let node_name = file
            .node_name
            .clone()
            .or_else(|| file.kubernetes.node_name.clone())
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(host_name);
        if node_name.is_empty()
            || node_name.len() > 253
            || !node_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            errors.push(format!(
                "node_name {node_name:?}: 1 to 253 letters, digits, '-', '.' or '_'"
            ));
        }
        if matches!(store, StoreSettings::Etcd(_)) && file.ca.cert_file.is_none() {
            errors.push(
                "store.kind = \"etcd\" needs [ca] cert_file and key_file: agents sharing leases \
                 must sign under one trust bundle (for example one intermediate per node under \
                 one root, see deploy/cert-manager/), not each its own embedded CA"
                    .into(),
            );
        }

        let federation = match &trust_domain {
            Some(own) => crate::authority::federation::resolve(&file.federation, own, &mut errors),
            None => Vec::new(),
        };

        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        let trust_domain = trust_domain.expect("checked above");
        Ok(Config {
            socket,
            extra_sockets,
            sds,
            admin_socket,
            data_dir,
            health_addr: health_addr.expect("checked above"),
            limits: LeaseLimits {
                trust_domain,
                template: template.expect("checked above"),
                max_ttl,
                default_svid_ttl,
                max_svid_ttl,
                default_jwt_ttl,
                max_jwt_ttl,
                jwt_mint,
                delegation,
            },
            allowed_uids,
            allowed_gids,
            ca: CaSource {
                cert_file: file.ca.cert_file,
                key_file: file.ca.key_file,
                chain_file: file.ca.chain_file,
                bundle_file: file.ca.bundle_file,
            },
            ca_ttl,
            ca_prepare_at: prepare_at,
            ca_activate_at: activate_at,
            max_digest_bytes: file
                .attestation
                .max_digest_bytes
                .unwrap_or(256 * 1024 * 1024),
            log_format,
            retention,
            audit_segment_bytes,
            jwt_key_rotation,
            kubelet,
            cgroup_layout,
            max_connections_per_uid,
            max_connections,
            handshake_timeout,
            policy: crate::policy::PolicySource {
                policy_files: file.policy.files.unwrap_or_default(),
                schema_file: file.policy.schema,
            },
            approval_timeout,
            store,
            node_name,
            admin_addr,
            allowed_remote,
            admin_client_ca_files,
            admin_server_names,
            federation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<FileConfig>("trust_domian = \"x\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = toml::from_str::<FileConfig>("[leases]\nmax_tll = \"1h\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let file: FileConfig =
            toml::from_str("trust_domain = \"file.org\"\nsocket = \"/tmp/a.sock\"").unwrap();
        let c = Config::resolve(
            file,
            Overrides {
                trust_domain: Some("flag.org".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.limits.trust_domain.as_str(), "flag.org");
        assert_eq!(c.socket, PathBuf::from("/tmp/a.sock"));
    }

    #[test]
    fn every_problem_is_reported() {
        let file: FileConfig = toml::from_str(
            "trust_domain = \"Bad Domain\"\nlog_format = \"xml\"\n[leases]\nmax_ttl = \"soon\"",
        )
        .unwrap();
        match Config::resolve(file, Overrides::default()) {
            Err(ConfigError::Invalid(errs)) => assert_eq!(errs.len(), 3, "{errs:?}"),
            other => panic!("expected errors, got {other:?}"),
        }
    }

    #[test]
    fn admin_server_names_are_hosts_kept_once_in_order() {
        use crate::authority::x509::HostName;
        let file: FileConfig = toml::from_str(
            "[admin]\nserver_names = [\"Admin.Example.org\", \"10.1.2.3\", \"admin.example.org\"]",
        )
        .unwrap();
        let c = Config::resolve(file, Overrides::default()).unwrap();
        assert_eq!(
            c.admin_server_names,
            vec![
                HostName::Dns("admin.example.org".into()),
                HostName::Ip([10, 1, 2, 3].into())
            ]
        );
        let file: FileConfig =
            toml::from_str("[admin]\nserver_names = [\"*.example.org\", \"spiffe://x/y\"]")
                .unwrap();
        match Config::resolve(file, Overrides::default()) {
            Err(ConfigError::Invalid(errs)) => {
                assert_eq!(errs.len(), 2, "{errs:?}");
                assert!(
                    errs.iter().all(|e| e.starts_with("admin.server_names")),
                    "{errs:?}"
                );
            }
            other => panic!("expected errors, got {other:?}"),
        }
    }

    #[test]
    fn defaults_resolve() {
        let c = Config::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.limits.trust_domain.as_str(), DEFAULT_TRUST_DOMAIN);
        assert!(c.allowed_uids.contains(&0));
    }
}

#[cfg(test)]
mod shipped_configs {
    use super::*;

    fn resolve(text: &str) -> Config {
        let file: FileConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        Config::resolve(file, Overrides::default()).unwrap()
    }

    #[test]
    fn the_systemd_example_config_is_valid() {
        resolve(include_str!("../../deploy/systemd/mayfly.toml"));
    }

    /// The TOML block of a ConfigMap, with the init container's placeholders filled in.
    fn configmap(yaml: &str) -> Config {
        let start = yaml.find("mayfly.toml: |").expect("config block") + "mayfly.toml: |".len();
        let block: String = yaml[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        resolve(
            &block
                .replace("@HOST_IP@", "10.0.0.7")
                .replace("@NODE_NAME@", "node-a"),
        )
    }

    #[test]
    fn the_daemonset_config_is_valid() {
        let c = configmap(include_str!("../../deploy/kubernetes/configmap.yaml"));
        let k = c.kubelet.expect("kubelet configured");
        assert_eq!(k.url, "https://10.0.0.7:10250");
        assert_eq!(k.node_name.as_deref(), Some("node-a"));
    }

    #[test]
    fn the_cluster_config_is_valid() {
        let c = configmap(include_str!("../../deploy/kubernetes-cluster/config.yaml"));
        assert!(matches!(c.store, StoreSettings::Etcd(_)), "{:?}", c.store);
        assert!(c.admin_addr.is_some());
        assert_eq!(c.node_name, "node-a");
        assert!(c.admin_server_names.contains(
            &"mayfly-admin.mayfly-system.svc"
                .parse::<crate::authority::x509::HostName>()
                .unwrap()
        ));
    }
}
