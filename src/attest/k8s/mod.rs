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

mod cgroup;
mod kubelet;
pub(crate) mod pods;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use cgroup::{CgroupLayout, PodRef, Qos, DEFAULT_ROOTS};
use kubelet::KubeletClient;

use crate::selector::{K8sKey, Key, Selector};

/// Default for [`KubeletConfig::cache_ttl`].
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(5);
/// Default for [`KubeletConfig::retry_for`].
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(2);
/// Default for [`KubeletConfig::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default for [`KubeletConfig::url`].
pub const DEFAULT_KUBELET_URL: &str = "https://127.0.0.1:10250";

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
    #[error(
        "pod {pod_uid} is {kubelet} per kubelet, but its cgroup sits under the {cgroup} level"
    )]
    QosMismatch {
        pod_uid: String,
        cgroup: &'static str,
        kubelet: String,
    },
    #[error("pod is on node {actual}, this node is {expected}")]
    NodeMismatch { expected: String, actual: String },
}

/// `layout` as this agent can trust it on this host: roots that others can write are
/// dropped, and paths are read relative to the agent's cgroup namespace (learnt from the
/// cgroup of PID 1, the host's init under `hostPID`).
pub fn host_layout(layout: CgroupLayout) -> CgroupLayout {
    let layout = layout.only_root_writable(std::path::Path::new("/sys/fs/cgroup"));
    match std::fs::read_to_string("/proc/1/cgroup") {
        Ok(init) => layout.in_namespace_of(&init),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /proc/1/cgroup; taking the host's cgroup namespace");
            layout
        }
    }
}

// ---------------------------------------------------------------------------------------
// Attestor
// ---------------------------------------------------------------------------------------

/// Kubernetes workload attestor. Cheap to share (`Send + Sync`); holds the pod list cache.
pub struct K8sAttestor {
    kubelet: Option<KubeletClient>,
    layout: CgroupLayout,
    /// Cgroup texts already parsed, and the pod each names: a process's cgroup rarely
    /// changes, and parsing it is most of what a cgroup-only attestation costs.
    parsed: Mutex<HashMap<Box<str>, Option<Arc<CgroupPod>>>>,
}

/// A pod and container a cgroup text names, with their two selectors.
#[derive(Debug)]
struct CgroupPod {
    pod: PodRef,
    /// `k8s:container-id:…` and `k8s:pod-uid:…`, in that (sorted) order.
    selectors: [Selector; 2],
}

/// Distinct cgroup texts remembered at most; the memory is cleared when it fills (a workload
/// that keeps moving between cgroups it creates costs only parsing).
const PARSED_CAPACITY: usize = 1024;

impl fmt::Debug for K8sAttestor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("K8sAttestor")
            .field("kubelet", &self.kubelet.as_ref().map(|k| &k.cfg.url))
            .finish()
    }
}

impl K8sAttestor {
    /// `kubelet: None` → cgroup-only selectors. Pods are looked for only where `layout`
    /// says the kubelet puts them.
    pub fn new(
        kubelet: Option<KubeletConfig>,
        layout: CgroupLayout,
    ) -> Result<K8sAttestor, K8sError> {
        let kubelet = kubelet.map(KubeletClient::new).transpose()?;
        Ok(K8sAttestor {
            kubelet,
            layout,
            parsed: Mutex::new(HashMap::new()),
        })
    }

    /// Selectors for the process, sorted: empty when not in a pod. Reads
    /// /proc/<pid>/cgroup itself (the caller has already proven the pid belongs to the
    /// connected process). Kubelet failures after the retry window → the cgroup-only
    /// selectors plus a logged warning (fail closed).
    pub async fn selectors(&self, pid: i32) -> Vec<Selector> {
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
    pub async fn selectors_for(&self, cgroup_text: &str) -> Vec<Selector> {
        let Some(found) = self.parse(cgroup_text) else {
            return Vec::new();
        };
        let Some(kubelet) = &self.kubelet else {
            return found.selectors.to_vec();
        };
        let mut out: BTreeSet<Selector> = found.selectors.iter().cloned().collect();
        match kubelet.lookup(&found.pod).await {
            Ok(entry) => kubelet.add_selectors(&entry, &mut out),
            Err(e) => tracing::warn!(
                pod_uid = %found.pod.pod_uid,
                container_id = %found.pod.container_id,
                error = %e,
                "kubelet lookup failed; using cgroup-only k8s selectors"
            ),
        }
        out.into_iter().collect()
    }

    /// The pod a cgroup text names, parsed once per distinct text.
    fn parse(&self, cgroup_text: &str) -> Option<Arc<CgroupPod>> {
        let lock = || self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = lock().get(cgroup_text) {
            return known.clone();
        }
        let found = self.layout.parse(cgroup_text).map(|pod| {
            let selectors = [
                Selector::fact(Key::K8s(K8sKey::ContainerId), &pod.container_id),
                Selector::fact(Key::K8s(K8sKey::PodUid), &pod.pod_uid),
            ];
            Arc::new(CgroupPod { pod, selectors })
        });
        let mut parsed = lock();
        if parsed.len() >= PARSED_CAPACITY {
            parsed.clear();
        }
        parsed.insert(cgroup_text.into(), found.clone());
        found
    }
}

#[cfg(test)]
mod test_support {
    pub(super) const PODS_JSON: &str = include_str!("../../../testdata/k8s/pods.json");

    // Pod "shop/web-7d4b9c8f6d-x2kq9" (Burstable) in testdata/k8s/pods.json.
    pub(super) const WEB_UID: &str = "3a5b1f2e-0c1d-4e5f-8a9b-0c1d2e3f4a5b";
    pub(super) const WEB_UID_SYSTEMD: &str = "3a5b1f2e_0c1d_4e5f_8a9b_0c1d2e3f4a5b";
    pub(super) const WEB_CID: &str =
        "107f76d687d52ad32978772850e82de8c6b4a4be2d695311b3c8827eafaf7e0e";
    pub(super) const INIT_CID: &str =
        "f52947d48a80627cf304b309c1d24642291b20cbb44faa1ec0567836f7446363";
    pub(super) const DEBUG_CID: &str =
        "cf064cd98aa7f16b78fa1074eb8ac6ce9af4119082730d9b95642efbb750ef9d";
    // Pod "payments/api-6f8d7b5c4-q9wzt" (Guaranteed).
    pub(super) const API_UID: &str = "c81e728d-9d4c-4f63-b1a2-5e0f7a3d2c19";
    pub(super) const API_CID: &str =
        "cba0d14714195e807b7c1508280354350518ece51612f43c62996ed91a7eb640";
    pub(super) const SHIPPER_CID: &str =
        "22b6cedc0765fc0e00163a095dd3610e5af2082d2e458732206a16f5739dcc14";

    pub(super) fn web_cgroup() -> String {
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{WEB_UID_SYSTEMD}.slice/cri-containerd-{WEB_CID}.scope\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use std::path::Path;

    #[test]
    fn attestor_is_send_sync_and_futures_are_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<K8sAttestor>();
        let att = K8sAttestor::new(None, CgroupLayout::kubelet_default()).unwrap();
        send(&att.selectors(1));
        send(&att.selectors_for(""));
    }

    #[tokio::test]
    async fn cgroup_only_without_kubelet() {
        let att = K8sAttestor::new(None, CgroupLayout::kubelet_default()).unwrap();
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

        let att = K8sAttestor::new(None, CgroupLayout::kubelet_default()).unwrap();
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
