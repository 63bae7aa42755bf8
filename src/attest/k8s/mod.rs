//! Kubernetes workload attestation.
//!
//! The agent runs as a DaemonSet with `hostPID: true`, so the pid of a connected
//! workload is a host pid and `/proc/<pid>/cgroup` tells which cgroup the kubelet's
//! container runtime put it in. From that path this module derives the pod UID and the
//! container ID (cgroup v1 and v2; systemd and cgroupfs drivers; containerd, CRI-O and
//! Docker naming) and emits:
//!
//! * `k8s:pod-uid:<uid>` and `k8s:container-id:<64 hex>` from the cgroup alone;
//! * with kubelet access, in addition: `k8s:ns:<namespace>`, `k8s:sa:<service account>`,
//!   `k8s:pod-name:<name>`, `k8s:pod-label:<key>:<value>` (one per label),
//!   `k8s:container-name:<name>`, `k8s:container-image:<image>` and
//!   `k8s:node-name:<node>`.
//!
//! # Trust and failure model
//!
//! * The cgroup path is written by the container runtime, not by the workload, but a
//!   process that can create cgroups (a privileged container, or any process with a
//!   delegated cgroup subtree) can create child cgroups *below its own*. The parser
//!   therefore uses the **outermost** pod/container pair in the path and ignores anything
//!   nested under it. Because nested setups (kind, cgroup namespaces, containerd started
//!   by systemd) put a prefix in front of the kubepods hierarchy, the kubepods part is
//!   searched anywhere in the path; as a consequence a process *outside* Kubernetes that
//!   can create cgroups (e.g. a privileged plain Docker container on the node) could
//!   build a path that looks like a pod. With kubelet access the container must also be
//!   listed by the kubelet in the pod with the same UID, otherwise only the cgroup
//!   selectors are returned; registration entries that need strong guarantees should
//!   therefore use kubelet-derived selectors (`k8s:ns`, `k8s:sa`, ...).
//! * Kubelet problems (unreachable, TLS failure, bad status, unknown container after the
//!   retry window, pod UID or node name mismatch) never produce an error for the caller:
//!   the cgroup-only selectors are returned and a warning is logged. Fewer selectors can
//!   only match fewer registration entries, so this fails closed.
//! * Labels are read from a pod list at most `cache_ttl` old; stale lists are never used
//!   after a failed refresh.
//!
//! # Kubelet client
//!
//! `GET {url}/pods` with `Authorization: Bearer <token>`; the token file is re-read on
//! every fetch because projected service account tokens rotate. `https://` URLs are
//! verified with rustls against `ca_file` (a PEM bundle). `http://` URLs (the deprecated
//! read-only port 10255, tests) are supported as well.
//!
//! `insecure_skip_verify` accepts **any** server certificate (handshake signatures are
//! still checked, so the peer must own the key of the certificate it presents, but
//! nothing ties that certificate to the kubelet). It means the agent trusts whoever
//! answers on that address, and it sends its bearer token to them. It is acceptable only
//! for `https://127.0.0.1:10250` reached from the node's own network namespace
//! (hostNetwork), where only a root process on the node could be listening instead of
//! the kubelet. Prefer `ca_file` with kubelet `serverTLSBootstrap: true` (serving
//! certificates signed by the cluster CA) and a URL whose host is in the certificate
//! (usually the node name or node IP, not 127.0.0.1).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, HOST};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Deserializer};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Default for [`KubeletConfig::cache_ttl`].
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(5);
/// Default for [`KubeletConfig::retry_for`].
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(2);
/// Default for [`KubeletConfig::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default for [`KubeletConfig::url`].
pub const DEFAULT_KUBELET_URL: &str = "https://127.0.0.1:10250";

/// Minimum spacing between two pod list fetches that bypass the cache.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_millis(250);
/// Upper bound on the size of a pod list response body.
const MAX_BODY_BYTES: usize = 64 << 20;
/// Container runtime prefixes accepted in front of a container id in a cgroup name.
/// `crio-conmon-<id>` (CRI-O's monitor process) is deliberately absent.
const RUNTIME_PREFIXES: &[&str] = &["", "cri-containerd", "crio", "docker"];

// ---------------------------------------------------------------------------------------
// cgroup parsing
// ---------------------------------------------------------------------------------------

/// The pod and container a process belongs to, as derived from its cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    /// Pod UID in canonical dashed lowercase form (`3a5b1f2e-0c1d-4e5f-8a9b-0c1d2e3f4a5b`).
    /// Static pods have a 32-hex-digit config hash as UID; it is kept as is.
    pub pod_uid: String,
    /// Container id: 64 lowercase hex digits, without runtime prefix.
    pub container_id: String,
}

/// Parses the text of /proc/<pid>/cgroup. None when the process is not in a pod.
///
/// Every line (`hierarchy-id:controllers:path`) is examined; cgroup v2 has the single
/// `0::<path>` line, v1 one line per hierarchy, hybrid both. If lines disagree about the
/// pod or container the result is `None`.
pub fn parse_cgroup(text: &str) -> Option<PodRef> {
    let mut found: Option<PodRef> = None;
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_id), Some(_controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Some(pod) = parse_cgroup_path(path) else {
            continue;
        };
        match &found {
            None => found = Some(pod),
            Some(prev) if *prev == pod => {}
            Some(prev) => {
                tracing::warn!(
                    first_pod_uid = %prev.pod_uid,
                    first_container_id = %prev.container_id,
                    other_pod_uid = %pod.pod_uid,
                    other_container_id = %pod.container_id,
                    "cgroup hierarchies disagree about the pod; ignoring"
                );
                return None;
            }
        }
    }
    found
}

/// Derives the pod from one cgroup path. The first (outermost) pod component wins and
/// the container must be the component right after it.
fn parse_cgroup_path(path: &str) -> Option<PodRef> {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for (i, comp) in comps.iter().enumerate() {
        // containerd under systemd without a separate scope unit writes
        // `<pod slice>:<runtime>:<container id>` as one component.
        let (head, inline) = match comp.split_once(':') {
            Some((head, rest)) => (head, Some(rest)),
            None => (*comp, None),
        };
        let Some(pod_uid) =
            pod_uid_from_slice(head).or_else(|| pod_uid_from_cgroupfs(&comps, i, head))
        else {
            continue;
        };
        // The outermost pod component decides: never look deeper, nested cgroups may
        // have been created by the workload itself.
        let container = match inline {
            Some(rest) => rest,
            None => comps.get(i + 1)?,
        };
        let container_id = container_id_from_component(container)?;
        return Some(PodRef {
            pod_uid,
            container_id,
        });
    }
    None
}

/// systemd driver: `kubepods-burstable-pod<uid with _>.slice`, `kubepods-pod<uid>.slice`,
/// `kubelet-kubepods-besteffort-pod<uid>.slice` (kind).
fn pod_uid_from_slice(comp: &str) -> Option<String> {
    let stem = comp.strip_suffix(".slice")?;
    let pos = stem.rfind("-pod")?;
    let (prefix, uid) = (&stem[..pos], &stem[pos + 4..]);
    if !prefix.split('-').any(|s| s == "kubepods") {
        return None;
    }
    canonical_uid(&uid.replace('_', "-"))
}

/// cgroupfs driver: `kubepods/pod<uid>` (guaranteed) or `kubepods/<qos>/pod<uid>`. Inside
/// a cgroup namespace the part above the reader's root shows as `..`.
fn pod_uid_from_cgroupfs(comps: &[&str], i: usize, comp: &str) -> Option<String> {
    let uid = comp.strip_prefix("pod")?;
    let at = |back: usize| i.checked_sub(back).map(|j| comps[j]);
    let anchored = match at(1) {
        Some("kubepods" | "..") => true,
        Some("besteffort" | "burstable") => matches!(at(2), Some("kubepods" | "..")),
        _ => false,
    };
    if !anchored {
        return None;
    }
    canonical_uid(uid)
}

/// Accepts a dashed UUID (any case) or a 32-hex-digit static pod hash; returns lowercase.
fn canonical_uid(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let ok = match b.len() {
        36 => b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        }),
        32 => b.iter().all(u8::is_ascii_hexdigit),
        _ => false,
    };
    ok.then(|| s.to_ascii_lowercase())
}

/// `<id>`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, `crio-<id>`, `docker-<id>.scope`
/// or the inline `cri-containerd:<id>`; `<id>` must be 64 hex digits.
fn container_id_from_component(comp: &str) -> Option<String> {
    let comp = comp.strip_suffix(".scope").unwrap_or(comp);
    let (prefix, id) = match comp.rfind(['-', ':']) {
        Some(p) => (&comp[..p], &comp[p + 1..]),
        None => ("", comp),
    };
    if !RUNTIME_PREFIXES.contains(&prefix) {
        return None;
    }
    (id.len() == 64 && id.bytes().all(|c| c.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

// ---------------------------------------------------------------------------------------
// Configuration and errors
// ---------------------------------------------------------------------------------------

/// How to reach the kubelet.
///
/// `Default` gives `https://127.0.0.1:10250`, no token, no CA, 5 s cache, 2 s retry
/// window and 3 s request timeout; an `https` URL additionally needs `ca_file` or
/// `insecure_skip_verify`.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// Base URL, e.g. `https://127.0.0.1:10250` or `http://127.0.0.1:10255`.
    pub url: String,
    /// Bearer token file (re-read on every fetch). None: no Authorization header.
    pub token_file: Option<PathBuf>,
    /// PEM bundle of CA certificates trusted for the kubelet's serving certificate.
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate. See the module documentation before using it.
    pub insecure_skip_verify: bool,
    /// Name of this node: emitted as `k8s:node-name` when the pod does not carry one,
    /// and a pod that the kubelet reports on another node is rejected.
    pub node_name: Option<String>,
    /// How long a fetched pod list is reused (zero: no caching).
    pub cache_ttl: Duration,
    /// How long to keep re-fetching for a container that is not (yet) in the pod list.
    pub retry_for: Duration,
    /// Bound on each request (connect, TLS handshake, response and body). Must be > 0.
    pub timeout: Duration,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        KubeletConfig {
            url: DEFAULT_KUBELET_URL.to_string(),
            token_file: None,
            ca_file: None,
            insecure_skip_verify: false,
            node_name: None,
            cache_ttl: DEFAULT_CACHE_TTL,
            retry_for: DEFAULT_RETRY_FOR,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Errors of the Kubernetes attestor. Only configuration errors reach callers of
/// [`K8sAttestor::new`]; the others are logged by [`K8sAttestor::selectors`].
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("invalid kubelet configuration: {0}")]
    Config(String),
    #[error("reading {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("connecting to the kubelet: {0}")]
    Connect(#[source] std::io::Error),
    #[error("TLS handshake with the kubelet: {0}")]
    TlsHandshake(#[source] std::io::Error),
    #[error("kubelet HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building kubelet request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("kubelet answered HTTP {0}")]
    Status(u16),
    #[error("reading kubelet response body: {0}")]
    Body(String),
    #[error("decoding kubelet pod list: {0}")]
    Json(#[from] serde_json::Error),
    #[error("kubelet request timed out after {0:?}")]
    Timeout(Duration),
    #[error("kubelet unavailable: a concurrent fetch just failed: {0}")]
    Unavailable(String),
    #[error("container {container_id} not found in the kubelet pod list")]
    ContainerNotFound { container_id: String },
    #[error("container id {container_id} is listed in more than one pod")]
    AmbiguousContainer { container_id: String },
    #[error("container {container_id} belongs to pod {kubelet_pod_uid} per kubelet, cgroup says {cgroup_pod_uid}")]
    PodMismatch {
        container_id: String,
        cgroup_pod_uid: String,
        kubelet_pod_uid: String,
    },
    #[error("pod is on node {actual}, this node is {expected}")]
    NodeMismatch { expected: String, actual: String },
}

// ---------------------------------------------------------------------------------------
// Attestor
// ---------------------------------------------------------------------------------------

/// Kubernetes workload attestor. Cheap to share (`Send + Sync`); holds the pod list cache.
pub struct K8sAttestor {
    kubelet: Option<KubeletClient>,
}

impl fmt::Debug for K8sAttestor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("K8sAttestor")
            .field("kubelet", &self.kubelet.as_ref().map(|k| &k.cfg.url))
            .finish()
    }
}

impl K8sAttestor {
    /// `kubelet: None` → cgroup-only selectors.
    pub fn new(kubelet: Option<KubeletConfig>) -> Result<K8sAttestor, K8sError> {
        let kubelet = kubelet.map(KubeletClient::new).transpose()?;
        Ok(K8sAttestor { kubelet })
    }

    /// Selectors for the process, sorted: empty when not in a pod. Reads
    /// /proc/<pid>/cgroup itself (the caller has already proven the pid belongs to the
    /// connected process). Kubelet failures after the retry window → the cgroup-only
    /// selectors plus a logged warning (fail closed).
    pub async fn selectors(&self, pid: i32) -> Vec<String> {
        if pid <= 0 {
            return Vec::new();
        }
        let path = format!("/proc/{pid}/cgroup");
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => self.selectors_for(&text).await,
            Err(e) => {
                tracing::debug!(pid, error = %e, "cannot read {path}; no k8s selectors");
                Vec::new()
            }
        }
    }

    /// Same but from cgroup text (for tests and callers that already read the file).
    pub async fn selectors_for(&self, cgroup_text: &str) -> Vec<String> {
        let Some(pod) = parse_cgroup(cgroup_text) else {
            return Vec::new();
        };
        let mut out = BTreeSet::new();
        out.insert(format!("k8s:pod-uid:{}", pod.pod_uid));
        out.insert(format!("k8s:container-id:{}", pod.container_id));
        if let Some(kubelet) = &self.kubelet {
            match kubelet.lookup(&pod).await {
                Ok(entry) => kubelet.add_selectors(&entry, &mut out),
                Err(e) => tracing::warn!(
                    pod_uid = %pod.pod_uid,
                    container_id = %pod.container_id,
                    error = %e,
                    "kubelet lookup failed; using cgroup-only k8s selectors"
                ),
            }
        }
        out.into_iter().collect()
    }
}

// ---------------------------------------------------------------------------------------
// Kubelet client and pod list cache
// ---------------------------------------------------------------------------------------

struct KubeletClient {
    cfg: KubeletConfig,
    /// Host for the TCP connection (IPv6 without brackets).
    host: String,
    port: u16,
    /// Value of the Host header.
    authority: String,
    /// Origin-form request target, e.g. `/pods`.
    pods_path: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    index: Option<Arc<PodIndex>>,
    /// Incremented on every successful fetch.
    generation: u64,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    /// Start time and message of the last attempt, when it failed.
    last_failure: Option<(Instant, String)>,
}

impl KubeletClient {
    fn new(cfg: KubeletConfig) -> Result<Self, K8sError> {
        let uri: hyper::Uri = cfg
            .url
            .parse()
            .map_err(|e| K8sError::Config(format!("kubelet url {:?}: {e}", cfg.url)))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(K8sError::Config(format!(
                    "kubelet url {:?} must start with https:// or http://",
                    cfg.url
                )))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| K8sError::Config(format!("kubelet url {:?} has no host", cfg.url)))?;
        if authority.as_str().contains('@') {
            return Err(K8sError::Config(
                "kubelet url must not contain userinfo".into(),
            ));
        }
        if uri.query().is_some() {
            return Err(K8sError::Config("kubelet url must not have a query".into()));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let pods_path = format!("{}/pods", uri.path().trim_end_matches('/'));
        if cfg.timeout.is_zero() {
            return Err(K8sError::Config("kubelet timeout must be > 0".into()));
        }

        let tls = if https {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?;
            let mut config = match (&cfg.ca_file, cfg.insecure_skip_verify) {
                (Some(_), true) => {
                    return Err(K8sError::Config(
                        "kubelet ca_file and insecure_skip_verify are mutually exclusive".into(),
                    ))
                }
                (None, false) => {
                    return Err(K8sError::Config(
                        "https kubelet url needs ca_file or insecure_skip_verify".into(),
                    ))
                }
                (Some(ca), false) => builder
                    .with_root_certificates(load_roots(ca)?)
                    .with_no_client_auth(),
                (None, true) => {
                    tracing::warn!(
                        url = %cfg.url,
                        "kubelet TLS verification disabled: trusting whoever answers on this address"
                    );
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert {
                            provider,
                        }))
                        .with_no_client_auth()
                }
            };
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let server_name = ServerName::try_from(host.clone()).map_err(|e| {
                K8sError::Config(format!(
                    "kubelet host {host:?} is not a TLS server name: {e}"
                ))
            })?;
            Some((
                tokio_rustls::TlsConnector::from(Arc::new(config)),
                server_name,
            ))
        } else {
            if cfg.ca_file.is_some() || cfg.insecure_skip_verify {
                return Err(K8sError::Config(
                    "ca_file/insecure_skip_verify given for an http:// kubelet url".into(),
                ));
            }
            None
        };

        Ok(KubeletClient {
            authority: authority.as_str().to_string(),
            host,
            port,
            pods_path,
            tls,
            state: Mutex::new(CacheState::default()),
            cfg,
        })
    }

    /// Finds the container in the pod list, re-fetching (bypassing the cache, at most
    /// every 250 ms) until `retry_for` has elapsed.
    async fn lookup(&self, pod: &PodRef) -> Result<Arc<ContainerEntry>, K8sError> {
        let deadline = Instant::now() + self.cfg.retry_for;
        let mut seen: Option<u64> = None;
        let mut first = true;
        let mut last_err = K8sError::ContainerNotFound {
            container_id: pod.container_id.clone(),
        };
        loop {
            if !first && Instant::now() >= deadline {
                return Err(last_err);
            }
            let asked_at = Instant::now();
            match self
                .index(seen, (!first).then_some(deadline), asked_at)
                .await
            {
                Ok(None) => return Err(last_err),
                Ok(Some((generation, index))) => match index.containers.get(&pod.container_id) {
                    Some(Some(entry)) => return self.check(entry, pod),
                    Some(None) => {
                        return Err(K8sError::AmbiguousContainer {
                            container_id: pod.container_id.clone(),
                        })
                    }
                    None => {
                        seen = Some(generation);
                        last_err = K8sError::ContainerNotFound {
                            container_id: pod.container_id.clone(),
                        };
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "kubelet pod list fetch failed");
                    last_err = e;
                }
            }
            first = false;
        }
    }

    fn check(
        &self,
        entry: &Arc<ContainerEntry>,
        pod: &PodRef,
    ) -> Result<Arc<ContainerEntry>, K8sError> {
        if entry.pod.uid != pod.pod_uid {
            return Err(K8sError::PodMismatch {
                container_id: pod.container_id.clone(),
                cgroup_pod_uid: pod.pod_uid.clone(),
                kubelet_pod_uid: entry.pod.uid.clone(),
            });
        }
        if let Some(expected) = &self.cfg.node_name {
            if !entry.pod.node_name.is_empty() && entry.pod.node_name != *expected {
                return Err(K8sError::NodeMismatch {
                    expected: expected.clone(),
                    actual: entry.pod.node_name.clone(),
                });
            }
        }
        Ok(entry.clone())
    }

    /// Returns a pod index: with `seen == None` the cached one while fresh, otherwise one
    /// fetched after generation `seen`. `Ok(None)` when the next allowed fetch would start
    /// after `deadline`. A fetch that another caller started (and failed) after `asked_at`,
    /// while this one waited for the lock, is not repeated: its error is returned, so a
    /// dead kubelet costs concurrent callers one timeout, not one each in turn.
    async fn index(
        &self,
        seen: Option<u64>,
        deadline: Option<Instant>,
        asked_at: Instant,
    ) -> Result<Option<(u64, Arc<PodIndex>)>, K8sError> {
        // Held across the fetch: concurrent callers share one request.
        let mut st = self.state.lock().await;
        if let (Some(index), Some(fetched_at)) = (&st.index, st.fetched_at) {
            let usable = match seen {
                None => fetched_at.elapsed() < self.cfg.cache_ttl,
                Some(generation) => st.generation > generation,
            };
            if usable {
                return Ok(Some((st.generation, index.clone())));
            }
        }
        if let Some((at, message)) = &st.last_failure {
            if *at >= asked_at {
                return Err(K8sError::Unavailable(message.clone()));
            }
        }
        if let Some(last) = st.last_attempt {
            let next = last + MIN_REFETCH_INTERVAL;
            if next > Instant::now() {
                if deadline.is_some_and(|d| next > d) {
                    return Ok(None);
                }
                tokio::time::sleep_until(next).await;
            }
        }
        let started = Instant::now();
        st.last_attempt = Some(started);
        let result = match tokio::time::timeout(self.cfg.timeout, self.fetch()).await {
            Ok(result) => result,
            Err(_) => Err(K8sError::Timeout(self.cfg.timeout)),
        };
        let index = match result {
            Ok(index) => Arc::new(index),
            Err(e) => {
                st.last_failure = Some((started, e.to_string()));
                return Err(e);
            }
        };
        st.last_failure = None;
        st.generation += 1;
        st.fetched_at = Some(Instant::now());
        st.index = Some(index.clone());
        Ok(Some((st.generation, index)))
    }

    async fn fetch(&self) -> Result<PodIndex, K8sError> {
        let mut req = hyper::Request::get(self.pods_path.as_str())
            .header(HOST, self.authority.as_str())
            .header(ACCEPT, "application/json");
        if let Some(path) = &self.cfg.token_file {
            let token =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| K8sError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
            let token = token.trim();
            if token.is_empty() {
                return Err(K8sError::Config(format!(
                    "token file {} is empty",
                    path.display()
                )));
            }
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                K8sError::Config(format!(
                    "token file {} holds characters not allowed in a header",
                    path.display()
                ))
            })?;
            value.set_sensitive(true);
            req = req.header(AUTHORIZATION, value);
        }
        let req = req.body(Empty::<Bytes>::new())?;

        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(K8sError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (status, body) = match &self.tls {
            Some((connector, server_name)) => {
                let stream = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(K8sError::TlsHandshake)?;
                send(TokioIo::new(stream), req).await?
            }
            None => send(TokioIo::new(tcp), req).await?,
        };
        if status != hyper::StatusCode::OK {
            return Err(K8sError::Status(status.as_u16()));
        }
        let list: PodList = serde_json::from_slice(&body)?;
        tracing::debug!(pods = list.items.len(), "fetched kubelet pod list");
        Ok(PodIndex::build(list))
    }

    fn add_selectors(&self, entry: &ContainerEntry, out: &mut BTreeSet<String>) {
        let pod = &entry.pod;
        let mut add = |kind: &str, value: &str| {
            if !value.is_empty() {
                out.insert(format!("k8s:{kind}:{value}"));
            }
        };
        add("ns", &pod.namespace);
        add("sa", &pod.service_account);
        add("pod-name", &pod.name);
        add("container-name", &entry.name);
        add("container-image", &entry.image);
        let node = if pod.node_name.is_empty() {
            self.cfg.node_name.as_deref().unwrap_or("")
        } else {
            &pod.node_name
        };
        add("node-name", node);
        for (key, value) in &pod.labels {
            out.insert(format!("k8s:pod-label:{key}:{value}"));
        }
    }
}

/// Aborts the connection task when the request is finished or cancelled (timeout).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send<I>(
    io: I,
    req: hyper::Request<Empty<Bytes>>,
) -> Result<(hyper::StatusCode, Bytes), K8sError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "kubelet connection ended with an error");
        }
    }));
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| K8sError::Body(e.to_string()))?
        .to_bytes();
    Ok((status, body))
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, K8sError> {
    let data = std::fs::read(path).map_err(|source| K8sError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    let pems = pem::parse_many(&data)
        .map_err(|e| K8sError::Config(format!("CA file {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for p in pems.iter().filter(|p| p.tag() == "CERTIFICATE") {
        roots.add(CertificateDer::from(p.contents().to_vec()))?;
    }
    if roots.is_empty() {
        return Err(K8sError::Config(format!(
            "CA file {} holds no CERTIFICATE",
            path.display()
        )));
    }
    Ok(roots)
}

/// Accepts any server certificate but still verifies the handshake signatures with the
/// ring provider's algorithms (so the peer holds the private key of what it presents).
#[derive(Debug)]
struct AcceptAnyServerCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------
// Pod list
// ---------------------------------------------------------------------------------------

/// `null` decodes as the default value (Kubernetes omits empty fields, but be lenient).
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize, Default)]
struct PodList {
    #[serde(default, deserialize_with = "null_default")]
    items: Vec<Pod>,
}

#[derive(Deserialize, Default)]
struct Pod {
    #[serde(default, deserialize_with = "null_default")]
    metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    spec: PodSpec,
    #[serde(default, deserialize_with = "null_default")]
    status: PodStatus,
}

#[derive(Deserialize, Default)]
struct ObjectMeta {
    #[serde(default, deserialize_with = "null_default")]
    uid: String,
    #[serde(default, deserialize_with = "null_default")]
    name: String,
    #[serde(default, deserialize_with = "null_default")]
    namespace: String,
    #[serde(default, deserialize_with = "null_default")]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default, deserialize_with = "null_default")]
    service_account_name: String,
    #[serde(default, deserialize_with = "null_default")]
    node_name: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default, deserialize_with = "null_default")]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default, deserialize_with = "null_default")]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default, deserialize_with = "null_default")]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize, Default)]
struct ContainerStatus {
    #[serde(default, deserialize_with = "null_default")]
    name: String,
    #[serde(default, deserialize_with = "null_default")]
    image: String,
    #[serde(rename = "containerID", default, deserialize_with = "null_default")]
    container_id: String,
}

struct PodInfo {
    uid: String,
    name: String,
    namespace: String,
    service_account: String,
    node_name: String,
    labels: BTreeMap<String, String>,
}

struct ContainerEntry {
    pod: Arc<PodInfo>,
    name: String,
    image: String,
}

/// Container id → container; `None` marks an id listed in more than one pod.
struct PodIndex {
    containers: HashMap<String, Option<Arc<ContainerEntry>>>,
}

impl PodIndex {
    fn build(list: PodList) -> PodIndex {
        let mut containers: HashMap<String, Option<Arc<ContainerEntry>>> = HashMap::new();
        for pod in list.items {
            let info = Arc::new(PodInfo {
                uid: pod.metadata.uid.to_ascii_lowercase(),
                name: pod.metadata.name,
                namespace: pod.metadata.namespace,
                service_account: pod.spec.service_account_name,
                node_name: pod.spec.node_name,
                labels: pod.metadata.labels,
            });
            let statuses = pod
                .status
                .container_statuses
                .into_iter()
                .chain(pod.status.init_container_statuses)
                .chain(pod.status.ephemeral_container_statuses);
            for status in statuses {
                // "containerd://<id>", "cri-o://<id>", "docker://<id>"; empty while waiting.
                let id = match status.container_id.split_once("://") {
                    Some((_, id)) => id,
                    None => status.container_id.as_str(),
                }
                .to_ascii_lowercase();
                if id.is_empty() {
                    continue;
                }
                let entry = Arc::new(ContainerEntry {
                    pod: info.clone(),
                    name: status.name,
                    image: status.image,
                });
                containers
                    .entry(id)
                    .and_modify(|slot| {
                        if slot.as_ref().is_some_and(|e| e.pod.uid != info.uid) {
                            *slot = None;
                        }
                    })
                    .or_insert(Some(entry));
            }
        }
        PodIndex { containers }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Full;
    use hyper::{Request, Response, StatusCode};
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::net::TcpListener;

    const PODS_JSON: &str = include_str!("../../../testdata/k8s/pods.json");

    // Pod "shop/web-7d4b9c8f6d-x2kq9" (Burstable) in testdata/k8s/pods.json.
    const WEB_UID: &str = "3a5b1f2e-0c1d-4e5f-8a9b-0c1d2e3f4a5b";
    const WEB_UID_SYSTEMD: &str = "3a5b1f2e_0c1d_4e5f_8a9b_0c1d2e3f4a5b";
    const WEB_CID: &str = "107f76d687d52ad32978772850e82de8c6b4a4be2d695311b3c8827eafaf7e0e";
    const INIT_CID: &str = "f52947d48a80627cf304b309c1d24642291b20cbb44faa1ec0567836f7446363";
    const DEBUG_CID: &str = "cf064cd98aa7f16b78fa1074eb8ac6ce9af4119082730d9b95642efbb750ef9d";
    // Pod "payments/api-6f8d7b5c4-q9wzt" (Guaranteed).
    const API_UID: &str = "c81e728d-9d4c-4f63-b1a2-5e0f7a3d2c19";
    const API_CID: &str = "cba0d14714195e807b7c1508280354350518ece51612f43c62996ed91a7eb640";
    const SHIPPER_CID: &str = "22b6cedc0765fc0e00163a095dd3610e5af2082d2e458732206a16f5739dcc14";

    const UID: &str = "3a5b1f2e-0c1d-4e5f-8a9b-0c1d2e3f4a5b";
    const UID_: &str = "3a5b1f2e_0c1d_4e5f_8a9b_0c1d2e3f4a5b";
    const CID: &str = "a2b40852970380e1fb8df7d1fc81d58a2cd9cc752b3a0fa0f4c2485cbd0cdc10";

    fn pod(uid: &str, cid: &str) -> Option<PodRef> {
        Some(PodRef {
            pod_uid: uid.to_string(),
            container_id: cid.to_string(),
        })
    }

    fn web_cgroup() -> String {
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{WEB_UID_SYSTEMD}.slice/cri-containerd-{WEB_CID}.scope\n"
        )
    }

    // ---------------------------------------------------------------- cgroup parsing

    #[test]
    fn v2_systemd_containerd() {
        let text = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        // Guaranteed QoS has no QoS slice.
        let text =
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
    }

    #[test]
    fn v2_systemd_crio_and_conmon() {
        let text = format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        let conmon = format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{CID}.scope\n");
        assert_eq!(parse_cgroup(&conmon), None);
        // CRI-O with the cgroupfs driver.
        let text = format!("0::/kubepods/besteffort/pod{UID}/crio-{CID}\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        let conmon = format!("0::/kubepods/besteffort/pod{UID}/crio-conmon-{CID}\n");
        assert_eq!(parse_cgroup(&conmon), None);
    }

    #[test]
    fn v2_systemd_docker() {
        let text = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
    }

    #[test]
    fn v2_cgroupfs() {
        let text = format!("0::/kubepods/burstable/pod{UID}/{CID}\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        let text = format!("0::/kubepods/pod{UID}/{CID}\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        let text = format!("0::/kubepods/besteffort/pod{UID}/{CID}\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
    }

    #[test]
    fn v1_cgroupfs_full_file() {
        let p = format!("/kubepods/besteffort/pod{UID}/{CID}");
        let text = format!(
            "12:hugetlb:{p}\n11:memory:{p}\n10:cpu,cpuacct:{p}\n9:pids:{p}\n8:net_cls,net_prio:{p}\n\
             7:devices:{p}\n6:perf_event:{p}\n5:freezer:{p}\n4:blkio:{p}\n3:cpuset:{p}\n2:rdma:/\n\
             1:name=systemd:{p}\n0::/\n"
        );
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
    }

    #[test]
    fn v1_systemd_full_file() {
        let p = format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope");
        let text = format!(
            "12:pids:{p}\n11:devices:{p}\n10:memory:{p}\n9:cpu,cpuacct:{p}\n8:blkio:{p}\n7:freezer:{p}\n\
             6:net_cls,net_prio:{p}\n5:perf_event:{p}\n4:hugetlb:{p}\n3:cpuset:{p}\n2:rdma:/\n\
             1:name=systemd:{p}\n0::/system.slice/containerd.service\n"
        );
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
    }

    #[test]
    fn nested_prefixes() {
        // containerd run by systemd, container without its own scope (kind, some distros).
        let text = format!("0::/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        // kind node (docker container) with cgroup v1 cgroupfs driver.
        let node = "8d2f6a1c9e4b7a3d5f0e1c2b4a6d8f9e0a1b2c3d4e5f60718293a4b5c6d7e8f9";
        let text = format!(
            "4:memory:/docker/{node}/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/docker/{node}/kubepods/besteffort/pod{UID}/{CID}\n"
        );
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        // kind with cgroup v2 and the systemd driver (kubelet cgroup root /kubelet).
        let text = format!("0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        // Read from inside a cgroup namespace rooted elsewhere.
        let text =
            format!("0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        let text = format!("0::/../../../burstable/pod{UID}/{CID}\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        let text = format!("0::/../../../pod{UID}/{CID}\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
    }

    #[test]
    fn outermost_pod_wins_over_cgroups_created_by_the_workload() {
        let other_uid = "0b9c8d7e-6f5a-4b3c-9d2e-1f0a9b8c7d6e";
        let other_cid = "22b6cedc0765fc0e00163a095dd3610e5af2082d2e458732206a16f5739dcc14";
        let text =
            format!("0::/kubepods/burstable/pod{UID}/{CID}/kubepods/pod{other_uid}/{other_cid}\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        // Process sitting in the pod cgroup itself (no container): not attested, and
        // nothing deeper is consulted.
        let text = format!("0::/kubepods/burstable/pod{UID}\n");
        assert_eq!(parse_cgroup(&text), None);
        let text = format!(
            "0::/kubepods/burstable/pod{UID}/not-a-container/kubepods/pod{other_uid}/{other_cid}\n"
        );
        assert_eq!(parse_cgroup(&text), None);
    }

    #[test]
    fn non_pod_processes() {
        for text in [
            "0::/user.slice/user-0.slice/session-1.scope\n",
            "0::/\n",
            "",
            "0::/system.slice/containerd.service\n",
            "0::/system.slice/docker-a2b40852970380e1fb8df7d1fc81d58a2cd9cc752b3a0fa0f4c2485cbd0cdc10.scope\n",
            "12:memory:/\n11:cpu,cpuacct:/user.slice\n1:name=systemd:/user.slice/user-1000.slice/session-3.scope\n0::/user.slice/user-1000.slice/session-3.scope\n",
            // "pod" directory not under kubepods
            "0::/mypods/pod3a5b1f2e-0c1d-4e5f-8a9b-0c1d2e3f4a5b/a2b40852970380e1fb8df7d1fc81d58a2cd9cc752b3a0fa0f4c2485cbd0cdc10\n",
            "garbage without colons\n",
        ] {
            assert_eq!(parse_cgroup(text), None, "{text:?}");
        }
    }

    #[test]
    fn malformed_ids_rejected_and_case_normalised() {
        let short = &CID[..63];
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods/pod{UID}/{short}\n")),
            None
        );
        let bad_uid = "3a5b1f2e-0c1d-4e5f-8a9b-0c1d2e3f4a5";
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods/pod{bad_uid}/{CID}\n")),
            None
        );
        let nonhex = format!("{}z", &CID[..63]);
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods/pod{UID}/{nonhex}\n")),
            None
        );
        let text = format!(
            "0::/kubepods/pod{}/{}\n",
            UID.to_uppercase(),
            CID.to_uppercase()
        );
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        // Unknown runtime prefix.
        let text = format!("0::/kubepods/pod{UID}/libpod-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text), None);
    }

    #[test]
    fn static_pod_hash_uid() {
        let hash = "6c1fe0ec1de1d2d3e4f5a6b7c8d9e0f1";
        let text = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text), pod(hash, CID));
    }

    #[test]
    fn disagreeing_hierarchies_fail_closed() {
        let other = "0b9c8d7e-6f5a-4b3c-9d2e-1f0a9b8c7d6e";
        let text = format!(
            "4:memory:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/kubepods/besteffort/pod{other}/{CID}\n"
        );
        assert_eq!(parse_cgroup(&text), None);
    }

    // ---------------------------------------------------------------- attestor basics

    #[test]
    fn attestor_is_send_sync_and_futures_are_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<K8sAttestor>();
        let att = K8sAttestor::new(None).unwrap();
        send(&att.selectors(1));
        send(&att.selectors_for(""));
    }

    #[tokio::test]
    async fn cgroup_only_without_kubelet() {
        let att = K8sAttestor::new(None).unwrap();
        assert_eq!(
            att.selectors_for(&web_cgroup()).await,
            vec![
                format!("k8s:container-id:{WEB_CID}"),
                format!("k8s:pod-uid:{WEB_UID}"),
            ]
        );
        assert!(att.selectors_for("0::/\n").await.is_empty());
        // Our own process is not in a pod; a pid that does not exist gives nothing.
        assert!(att.selectors(std::process::id() as i32).await.is_empty());
        assert!(att.selectors(i32::MAX).await.is_empty());
        assert!(att.selectors(0).await.is_empty());
        assert!(att.selectors(-5).await.is_empty());
    }

    #[test]
    fn config_errors() {
        let no_trust = KubeletConfig::default();
        assert!(matches!(
            K8sAttestor::new(Some(no_trust)),
            Err(K8sError::Config(_))
        ));
        let bad_scheme = KubeletConfig {
            url: "ftp://127.0.0.1:10250".into(),
            insecure_skip_verify: true,
            ..Default::default()
        };
        assert!(matches!(
            K8sAttestor::new(Some(bad_scheme)),
            Err(K8sError::Config(_))
        ));
        let zero_timeout = KubeletConfig {
            url: "http://127.0.0.1:10255".into(),
            timeout: Duration::ZERO,
            ..Default::default()
        };
        assert!(matches!(
            K8sAttestor::new(Some(zero_timeout)),
            Err(K8sError::Config(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let empty_ca = dir.path().join("ca.pem");
        std::fs::write(&empty_ca, "not a pem\n").unwrap();
        let cfg = KubeletConfig {
            ca_file: Some(empty_ca),
            ..Default::default()
        };
        assert!(matches!(
            K8sAttestor::new(Some(cfg)),
            Err(K8sError::Config(_))
        ));
        let missing_ca = KubeletConfig {
            ca_file: Some(dir.path().join("missing.pem")),
            ..Default::default()
        };
        assert!(matches!(
            K8sAttestor::new(Some(missing_ca)),
            Err(K8sError::ReadFile { .. })
        ));
        let ok = KubeletConfig {
            insecure_skip_verify: true,
            ..Default::default()
        };
        assert!(K8sAttestor::new(Some(ok)).is_ok());
        let d = KubeletConfig::default();
        assert_eq!(
            (d.cache_ttl, d.retry_for, d.timeout),
            (
                Duration::from_secs(5),
                Duration::from_secs(2),
                Duration::from_secs(3)
            )
        );
    }

    #[test]
    fn pod_list_parses_real_document() {
        let index = PodIndex::build(serde_json::from_str(PODS_JSON).unwrap());
        assert_eq!(index.containers.len(), 7);
        let web = index.containers[WEB_CID].as_ref().unwrap();
        assert_eq!(
            (web.name.as_str(), web.pod.namespace.as_str()),
            ("web", "shop")
        );
        let init = index.containers[INIT_CID].as_ref().unwrap();
        assert_eq!(init.name, "init-migrate");
        let dbg = index.containers[DEBUG_CID].as_ref().unwrap();
        assert_eq!(dbg.name, "debugger-7xk2p");
        assert_eq!(dbg.image, "docker.io/library/busybox:1.36");
        // nulls and missing fields are tolerated
        let list: PodList = serde_json::from_str(
            r#"{"items":[{"metadata":{"uid":"x","labels":null},"spec":null,"status":{"containerStatuses":null}}]}"#,
        )
        .unwrap();
        assert!(PodIndex::build(list).containers.is_empty());
    }

    // ---------------------------------------------------------------- test kubelet

    type Responder = Arc<dyn Fn(usize) -> String + Send + Sync>;

    struct TestKubelet {
        addr: SocketAddr,
        requests: Arc<AtomicUsize>,
        token: Arc<std::sync::Mutex<String>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestKubelet {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    struct TestPki {
        ca_pem: String,
        leaf_der: CertificateDer<'static>,
        leaf_key: Vec<u8>,
    }

    fn make_ca() -> (rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "node-a-ca@1715677961");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let pem = ca.pem();
        (ca, pem)
    }

    fn make_pki() -> TestPki {
        let (ca, ca_pem) = make_ca();
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "node-a".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "node-a@1715677961");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = params.signed_by(&key, &ca).unwrap();
        TestPki {
            ca_pem,
            leaf_der: leaf.der().clone(),
            leaf_key: key.serialize_der(),
        }
    }

    fn static_body(body: String) -> Responder {
        Arc::new(move |_| body.clone())
    }

    /// A kubelet stand-in: `GET /pods` with `Authorization: Bearer <token>`, over TLS when
    /// `pki` is given.
    async fn start_kubelet(pki: Option<&TestPki>, token: &str, respond: Responder) -> TestKubelet {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let token = Arc::new(std::sync::Mutex::new(token.to_string()));
        let acceptor = pki.map(|pki| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![pki.leaf_der.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.leaf_key.clone())),
                )
                .unwrap();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        });
        let (req_count, tok) = (requests.clone(), token.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, req_count, tok, respond) = (
                    acceptor.clone(),
                    req_count.clone(),
                    tok.clone(),
                    respond.clone(),
                );
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (req_count, tok, respond) =
                                (req_count.clone(), tok.clone(), respond.clone());
                            async move {
                                let expected = format!("Bearer {}", tok.lock().unwrap());
                                let authorized = req
                                    .headers()
                                    .get(AUTHORIZATION)
                                    .is_some_and(|v| v.as_bytes() == expected.as_bytes());
                                let resp = if req.uri().path() != "/pods"
                                    || req.method() != hyper::Method::GET
                                {
                                    Response::builder()
                                        .status(StatusCode::NOT_FOUND)
                                        .body(Full::new(Bytes::from("404 page not found\n")))
                                } else if !authorized {
                                    Response::builder()
                                        .status(StatusCode::UNAUTHORIZED)
                                        .body(Full::new(Bytes::from("Unauthorized")))
                                } else {
                                    let n = req_count.fetch_add(1, Ordering::SeqCst) + 1;
                                    Response::builder()
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(respond(n))))
                                };
                                Ok::<_, Infallible>(resp.unwrap())
                            }
                        });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        TestKubelet {
            addr,
            requests,
            token,
            task,
        }
    }

    struct Files {
        _dir: tempfile::TempDir,
        token: PathBuf,
        ca: PathBuf,
    }

    fn files(token: &str, ca_pem: &str) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let token_path = dir.path().join("token");
        // projected tokens have no trailing newline, hand-made files often do
        std::fs::write(&token_path, format!("{token}\n")).unwrap();
        let ca = dir.path().join("kubelet-ca.crt");
        std::fs::write(&ca, ca_pem).unwrap();
        Files {
            _dir: dir,
            token: token_path,
            ca,
        }
    }

    fn https_config(k: &TestKubelet, f: &Files) -> KubeletConfig {
        KubeletConfig {
            url: format!("https://{}", k.addr),
            token_file: Some(f.token.clone()),
            ca_file: Some(f.ca.clone()),
            cache_ttl: Duration::from_secs(60),
            retry_for: Duration::from_millis(300),
            timeout: Duration::from_secs(3),
            ..Default::default()
        }
    }

    fn web_full_selectors() -> Vec<String> {
        let mut v = vec![
            format!("k8s:container-id:{WEB_CID}"),
            "k8s:container-image:registry.example.com/shop/web:1.8.2".to_string(),
            "k8s:container-name:web".to_string(),
            "k8s:node-name:node-a".to_string(),
            "k8s:ns:shop".to_string(),
            "k8s:pod-label:app:web".to_string(),
            "k8s:pod-label:app.kubernetes.io/part-of:shop".to_string(),
            "k8s:pod-label:pod-template-hash:7d4b9c8f6d".to_string(),
            "k8s:pod-name:web-7d4b9c8f6d-x2kq9".to_string(),
            format!("k8s:pod-uid:{WEB_UID}"),
            "k8s:sa:web".to_string(),
        ];
        v.sort();
        v
    }

    fn cgroup_only(uid: &str, cid: &str) -> Vec<String> {
        vec![
            format!("k8s:container-id:{cid}"),
            format!("k8s:pod-uid:{uid}"),
        ]
    }

    #[tokio::test]
    async fn kubelet_https_with_ca_gives_all_selectors() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &pki.ca_pem);
        let att = K8sAttestor::new(Some(https_config(&k, &f))).unwrap();

        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());

        // Init and ephemeral containers of the same pod, served from the cache.
        let init = att
            .selectors_for(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{WEB_UID_SYSTEMD}.slice/cri-containerd-{INIT_CID}.scope\n"
            ))
            .await;
        assert!(
            init.contains(&"k8s:container-name:init-migrate".to_string()),
            "{init:?}"
        );
        let dbg = att
            .selectors_for(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{WEB_UID_SYSTEMD}.slice/cri-containerd-{DEBUG_CID}.scope\n"
            ))
            .await;
        assert!(
            dbg.contains(&"k8s:container-name:debugger-7xk2p".to_string()),
            "{dbg:?}"
        );
        assert!(dbg.contains(&"k8s:container-image:docker.io/library/busybox:1.36".to_string()));

        // Second pod, cgroup v1 cgroupfs (Guaranteed QoS).
        let p = format!("/kubepods/pod{API_UID}/{SHIPPER_CID}");
        let shipper = att
            .selectors_for(&format!("11:memory:{p}\n1:name=systemd:{p}\n0::/\n"))
            .await;
        let mut expected = vec![
            format!("k8s:container-id:{SHIPPER_CID}"),
            "k8s:container-image:docker.io/fluent/fluent-bit:3.0.4".to_string(),
            "k8s:container-name:log-shipper".to_string(),
            "k8s:node-name:node-a".to_string(),
            "k8s:ns:payments".to_string(),
            "k8s:pod-label:app:api".to_string(),
            "k8s:pod-label:pod-template-hash:6f8d7b5c4".to_string(),
            "k8s:pod-label:tier:backend".to_string(),
            "k8s:pod-name:api-6f8d7b5c4-q9wzt".to_string(),
            format!("k8s:pod-uid:{API_UID}"),
            "k8s:sa:payments-api".to_string(),
        ];
        expected.sort();
        assert_eq!(shipper, expected);
        // All of the above came from one fetch (cache_ttl 60 s).
        assert_eq!(k.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn wrong_ca_fails_closed_to_cgroup_only() {
        let pki = make_pki();
        let (_other_ca, other_pem) = make_ca();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &other_pem);
        let att = K8sAttestor::new(Some(https_config(&k, &f))).unwrap();
        assert_eq!(
            att.selectors_for(&web_cgroup()).await,
            cgroup_only(WEB_UID, WEB_CID)
        );
        assert_eq!(k.requests.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn wrong_token_fails_closed_and_rotated_token_is_reread() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &pki.ca_pem);
        let cfg = KubeletConfig {
            cache_ttl: Duration::ZERO,
            retry_for: Duration::ZERO,
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg)).unwrap();
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());

        // The kubelet now expects a rotated token the file does not have yet: 401.
        *k.token.lock().unwrap() = "tok-2".into();
        assert_eq!(
            att.selectors_for(&web_cgroup()).await,
            cgroup_only(WEB_UID, WEB_CID)
        );
        // Rotation lands in the file: picked up on the next fetch.
        std::fs::write(&f.token, "tok-2").unwrap();
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
        assert_eq!(k.requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn insecure_skip_verify_works() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", "");
        let cfg = KubeletConfig {
            ca_file: None,
            insecure_skip_verify: true,
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg)).unwrap();
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
    }

    #[tokio::test]
    async fn plain_http_read_only_port() {
        let k = start_kubelet(None, "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", "");
        let cfg = KubeletConfig {
            url: format!("http://{}/", k.addr),
            token_file: Some(f.token.clone()),
            ..Default::default()
        };
        let att = K8sAttestor::new(Some(cfg)).unwrap();
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
    }

    /// The pod list as the kubelet reports it while the `api` container is still being
    /// created: its status has no containerID yet.
    fn pods_with_api_waiting() -> String {
        let mut doc: serde_json::Value = serde_json::from_str(PODS_JSON).unwrap();
        let statuses = doc["items"][1]["status"]["containerStatuses"]
            .as_array_mut()
            .unwrap();
        let api = statuses.iter_mut().find(|s| s["name"] == "api").unwrap();
        let obj = api.as_object_mut().unwrap();
        obj.remove("containerID");
        obj.insert("ready".into(), false.into());
        obj.insert("started".into(), false.into());
        obj.insert(
            "state".into(),
            serde_json::json!({"waiting": {"reason": "ContainerCreating"}}),
        );
        doc.to_string()
    }

    #[tokio::test]
    async fn container_appearing_on_second_fetch_is_found_by_retry() {
        let pki = make_pki();
        let waiting = pods_with_api_waiting();
        let respond: Responder = Arc::new(move |n| {
            if n == 1 {
                waiting.clone()
            } else {
                PODS_JSON.to_string()
            }
        });
        let k = start_kubelet(Some(&pki), "tok-1", respond).await;
        let f = files("tok-1", &pki.ca_pem);
        let cfg = KubeletConfig {
            retry_for: Duration::from_secs(2),
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg)).unwrap();
        let start = Instant::now();
        let sel = att
            .selectors_for(&format!(
                "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{API_CID}.scope\n",
                API_UID.replace('-', "_")
            ))
            .await;
        assert!(
            sel.contains(&"k8s:container-name:api".to_string()),
            "{sel:?}"
        );
        assert!(sel.contains(&"k8s:ns:payments".to_string()), "{sel:?}");
        assert_eq!(k.requests.load(Ordering::SeqCst), 2);
        // The re-fetch respected the 250 ms spacing.
        assert!(start.elapsed() >= MIN_REFETCH_INTERVAL);
    }

    #[tokio::test]
    async fn unknown_container_retries_within_window_then_cgroup_only() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &pki.ca_pem);
        let cfg = KubeletConfig {
            retry_for: Duration::from_millis(700),
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg)).unwrap();
        // Not in the pod list at all (e.g. the pod's sandbox/pause container).
        let cid = "0123456789abcdef".repeat(4);
        let text = format!("0::/kubepods/besteffort/pod{WEB_UID}/{cid}\n");
        let start = Instant::now();
        assert_eq!(att.selectors_for(&text).await, cgroup_only(WEB_UID, &cid));
        let elapsed = start.elapsed();
        let n = k.requests.load(Ordering::SeqCst);
        // first fetch + re-fetches at >= 250 ms spacing inside 700 ms
        assert!((2..=4).contains(&n), "requests {n}");
        assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[tokio::test]
    async fn pod_uid_or_node_mismatch_fails_closed() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &pki.ca_pem);
        let att = K8sAttestor::new(Some(https_config(&k, &f))).unwrap();
        // web's container id claimed under the payments pod's uid
        let text = format!("0::/kubepods/burstable/pod{API_UID}/{WEB_CID}\n");
        assert_eq!(
            att.selectors_for(&text).await,
            cgroup_only(API_UID, WEB_CID)
        );
        // a mismatch is definitive: no retries
        assert_eq!(k.requests.load(Ordering::SeqCst), 1);

        let cfg = KubeletConfig {
            node_name: Some("node-b".into()),
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg)).unwrap();
        assert_eq!(
            att.selectors_for(&web_cgroup()).await,
            cgroup_only(WEB_UID, WEB_CID)
        );
        let cfg = KubeletConfig {
            node_name: Some("node-a".into()),
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg)).unwrap();
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
    }

    #[tokio::test]
    async fn cache_avoids_second_request_within_ttl() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &pki.ca_pem);
        let cfg = KubeletConfig {
            cache_ttl: Duration::from_millis(400),
            ..https_config(&k, &f)
        };
        let att = Arc::new(K8sAttestor::new(Some(cfg)).unwrap());
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
        // concurrent callers within the ttl share the cached list too
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let att = att.clone();
            tasks.push(tokio::spawn(async move {
                att.selectors_for(&web_cgroup()).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), web_full_selectors());
        }
        assert_eq!(k.requests.load(Ordering::SeqCst), 1);
        // after the ttl the list is fetched again
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
        assert_eq!(k.requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn silent_server_is_bounded_by_timeout() {
        // Accepts TCP connections and never says anything (TLS handshake hangs).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.push(s);
            }
        });
        let cfg = KubeletConfig {
            url: format!("https://{addr}"),
            insecure_skip_verify: true,
            timeout: Duration::from_millis(300),
            retry_for: Duration::ZERO,
            ..Default::default()
        };
        let att = K8sAttestor::new(Some(cfg)).unwrap();
        let start = Instant::now();
        assert_eq!(
            att.selectors_for(&web_cgroup()).await,
            cgroup_only(WEB_UID, WEB_CID)
        );
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");

        // Concurrent callers share the failing attempt instead of timing out in turn.
        let att = Arc::new(att);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let att = att.clone();
            tasks.push(tokio::spawn(async move {
                att.selectors_for(&web_cgroup()).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), cgroup_only(WEB_UID, WEB_CID));
        }
        let elapsed = start.elapsed();
        // serialized it would take 6 x 300 ms
        assert!(elapsed < Duration::from_millis(1200), "{elapsed:?}");

        // Same over plain HTTP (server accepts the request and never answers), with a
        // retry window: bounded by retry_for + timeout.
        let cfg = KubeletConfig {
            url: format!("http://{addr}"),
            timeout: Duration::from_millis(300),
            retry_for: Duration::from_millis(400),
            ..Default::default()
        };
        let att = K8sAttestor::new(Some(cfg)).unwrap();
        let start = Instant::now();
        assert_eq!(
            att.selectors_for(&web_cgroup()).await,
            cgroup_only(WEB_UID, WEB_CID)
        );
        let elapsed = start.elapsed();
        assert!(
            elapsed < Duration::from_millis(400 + 300 + 250 + 500),
            "{elapsed:?}"
        );
        hold.abort();
    }

    // ---------------------------------------------------------------- real cgroup

    /// Mount point of a cgroup2 hierarchy: /sys/fs/cgroup when it is v2 (unified),
    /// otherwise the v2 part of a hybrid setup (e.g. /sys/fs/cgroup/unified).
    fn cgroup2_mount() -> Option<PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mut mounts = Vec::new();
        for line in info.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            if post.split_whitespace().next() == Some("cgroup2") {
                if let Some(mp) = pre.split_whitespace().nth(4) {
                    mounts.push(PathBuf::from(mp));
                }
            }
        }
        let preferred = Path::new("/sys/fs/cgroup");
        if mounts.iter().any(|m| m == preferred) {
            return Some(preferred.to_path_buf());
        }
        mounts.into_iter().next()
    }

    struct CgroupFixture {
        created: Vec<PathBuf>,
        child: Option<std::process::Child>,
    }

    impl Drop for CgroupFixture {
        fn drop(&mut self) {
            if let Some(child) = &mut self.child {
                let _ = child.kill();
                let _ = child.wait();
            }
            for dir in self.created.iter().rev() {
                // the cgroup may still count the exiting task for a moment
                for _ in 0..100 {
                    match std::fs::remove_dir(dir) {
                        Err(e) if e.raw_os_error() == Some(16) => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(e) => {
                            eprintln!("cleanup: rmdir {}: {e}", dir.display());
                            break;
                        }
                        Ok(()) => break,
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn real_process_in_pod_like_cgroup() {
        let skip = |why: String| eprintln!("real_process_in_pod_like_cgroup SKIPPED: {why}");
        let Some(root) = cgroup2_mount() else {
            return skip("no cgroup2 hierarchy mounted".into());
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let seed = nanos ^ ((std::process::id() as u128) << 64);
        let a = format!(
            "{:032x}",
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
        );
        let b = format!(
            "{:032x}",
            seed.rotate_left(37) ^ 0x5851_f42d_4c95_7f2d_1405_7b7e_f767_814f
        );
        let cid = format!("{a}{b}");
        let uid = format!(
            "{}-{}-{}-{}-{}",
            &b[..8],
            &b[8..12],
            &b[12..16],
            &b[16..20],
            &b[20..32]
        );
        let uid_ = uid.replace('-', "_");

        // Use /<root>/kubepods.slice as on a node, unless one exists already (a real
        // kubelet on this host): then nest under a private prefix, which the parser
        // accepts just the same.
        let mut base = root.clone();
        let mut fixture = CgroupFixture {
            created: Vec::new(),
            child: None,
        };
        if root.join("kubepods.slice").exists() {
            base = root.join(format!("mayfly-k8s-test-{}.slice", std::process::id()));
        }
        let leaf = base
            .join("kubepods.slice")
            .join("kubepods-besteffort.slice")
            .join(format!("kubepods-besteffort-pod{uid_}.slice"))
            .join(format!("cri-containerd-{cid}.scope"));
        let mut dirs = Vec::new();
        let mut p = leaf.as_path();
        while p != root {
            dirs.push(p.to_path_buf());
            p = p.parent().unwrap();
        }
        for dir in dirs.into_iter().rev() {
            if dir.exists() {
                continue;
            }
            if let Err(e) = std::fs::create_dir(&dir) {
                return skip(format!(
                    "cgroup2 at {} is not writable: mkdir {}: {e}",
                    root.display(),
                    dir.display()
                ));
            }
            fixture.created.push(dir);
        }
        let child = match std::process::Command::new("sleep").arg("30").spawn() {
            Ok(c) => c,
            Err(e) => return skip(format!("cannot spawn sleep: {e}")),
        };
        let pid = child.id();
        fixture.child = Some(child);
        if let Err(e) = std::fs::write(leaf.join("cgroup.procs"), pid.to_string()) {
            return skip(format!(
                "moving pid {pid} into {} failed: {e}",
                leaf.display()
            ));
        }
        let proc_text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        eprintln!("real_process_in_pod_like_cgroup: /proc/{pid}/cgroup =\n{proc_text}");

        let att = K8sAttestor::new(None).unwrap();
        let sel = att.selectors(pid as i32).await;
        assert_eq!(
            sel,
            vec![
                format!("k8s:container-id:{cid}"),
                format!("k8s:pod-uid:{uid}"),
            ]
        );
        drop(fixture);
        assert!(!leaf.exists(), "leaf cgroup was not removed");
    }
}
