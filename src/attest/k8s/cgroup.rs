//! Which pod and container a process is in, as its `/proc/<pid>/cgroup` says: the part
//! of attestation that needs no kubelet.

/// Container runtime prefixes accepted in front of a container id in a cgroup name.
/// `crio-conmon-<id>` (CRI-O's monitor process) is deliberately absent.
const RUNTIME_PREFIXES: &[&str] = &["", "cri-containerd", "crio", "docker"];

/// The pod and container a process belongs to, as derived from its cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    /// Pod UID in canonical dashed lowercase form (`3a5b1f2e-0c1d-4e5f-8a9b-0c1d2e3f4a5b`).
    /// Static pods have a 32-hex-digit config hash as UID; it is kept as is.
    pub pod_uid: String,
    /// Container id: 64 lowercase hex digits, without runtime prefix.
    pub container_id: String,
    /// The QoS level the cgroup path shows, which the kubelet's pod status must agree with.
    pub qos: Qos,
}

/// The kubelet's cgroup roots when none are configured: the systemd driver, the cgroupfs
/// driver, and kind's nodes (kubelet `--cgroup-root=/kubelet` with the systemd driver).
pub const DEFAULT_ROOTS: &[&str] = &[
    "/kubepods.slice",
    "/kubepods",
    "/kubelet.slice/kubelet-kubepods.slice",
];

/// Where a pod's cgroup may be: directly below one of the kubelet's roots (after an
/// optional QoS level), and nowhere else. And where this agent itself sits, for paths read
/// from inside a cgroup namespace.
///
/// A cgroup path is only as trustworthy as whoever could create it. Below the kubelet's root
/// only root (the kubelet and the runtime) creates cgroups; anywhere else, a user with a
/// delegated subtree (systemd gives one to every session) can create a copy of any pod's path.
/// So the pod and the container must sit at fixed depths below a root, and anything nested
/// deeper (created by a workload with a writable cgroupfs) is never looked at.
#[derive(Clone, Debug)]
pub struct CgroupLayout {
    roots: Vec<Vec<String>>,
    /// Per hierarchy (a line's first field: `0` for v2): how deep below the host's root the
    /// agent's cgroup namespace is rooted. Absent: the host's own namespace.
    ns_depth: Vec<(String, usize)>,
}

impl CgroupLayout {
    /// The kubelet's roots (absolute cgroup paths such as `/kubepods.slice`), checked.
    pub fn new<S: AsRef<str>>(roots: &[S]) -> Result<CgroupLayout, String> {
        let mut parsed = Vec::new();
        for root in roots {
            let root = root.as_ref();
            let comps: Vec<String> = root
                .split('/')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            let bad = !root.starts_with('/')
                || comps.is_empty()
                || comps
                    .iter()
                    .any(|c| c == "." || c == ".." || c.chars().any(char::is_control));
            if bad {
                return Err(format!(
                    "{root:?}: a cgroup root is an absolute path such as /kubepods.slice, without . or .."
                ));
            }
            parsed.push(comps);
        }
        if parsed.is_empty() {
            return Err("at least one cgroup root is needed".into());
        }
        Ok(CgroupLayout {
            roots: parsed,
            ns_depth: Vec::new(),
        })
    }

    /// The default roots ([`DEFAULT_ROOTS`]), in the host's cgroup namespace.
    pub fn kubelet_default() -> CgroupLayout {
        CgroupLayout::new(DEFAULT_ROOTS).expect("the default roots are valid")
    }

    /// Learns where the agent's cgroup namespace is rooted from the cgroup of a process known
    /// to be at the host's root level: PID 1 of the host (the agent runs with `hostPID`). Each
    /// `..` its path starts with is one level of the agent's own cgroup below the host's root.
    pub fn in_namespace_of(mut self, init_cgroup: &str) -> CgroupLayout {
        self.ns_depth = init_cgroup
            .lines()
            .filter_map(|line| {
                let mut fields = line.splitn(3, ':');
                let (id, _, path) = (fields.next()?, fields.next()?, fields.next()?);
                let up = path
                    .split('/')
                    .filter(|c| !c.is_empty())
                    .take_while(|c| *c == "..")
                    .count();
                (up > 0).then(|| (id.to_owned(), up))
            })
            .collect();
        self
    }

    /// Drops every root that someone other than root could create cgroups in, as the
    /// cgroup filesystem mounted at `cgroupfs` shows it (v2, or v1's hybrid `unified` and
    /// `systemd` hierarchies). A root that is not there (not a node, or the agent's own
    /// namespace hides it) is kept: nothing shows it to be writable.
    pub fn only_root_writable(mut self, cgroupfs: &std::path::Path) -> CgroupLayout {
        use std::os::unix::fs::MetadataExt;
        self.roots.retain(|root| {
            for mount in ["", "unified", "systemd"] {
                let dir = cgroupfs.join(mount).join(root.join("/"));
                let Ok(meta) = std::fs::metadata(&dir) else {
                    continue;
                };
                if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
                    tracing::error!(
                        event = "cgroup_root_refused",
                        path = %dir.display(),
                        owner = meta.uid(),
                        mode = format!("{:04o}", meta.mode() & 0o7777),
                        "this kubelet cgroup root can be written by others than root; no pod is \
                         attested under it"
                    );
                    return false;
                }
            }
            true
        });
        self
    }

    /// The roots as configured, for messages.
    pub fn roots(&self) -> Vec<String> {
        self.roots
            .iter()
            .map(|r| format!("/{}", r.join("/")))
            .collect()
    }

    fn depth(&self, hierarchy: &str) -> usize {
        self.ns_depth
            .iter()
            .find(|(id, _)| id == hierarchy)
            .map_or(0, |(_, d)| *d)
    }

    /// Parses the text of /proc/<pid>/cgroup. None when the process is not in a pod.
    ///
    /// Every line (`hierarchy-id:controllers:path`) is examined; cgroup v2 has the single
    /// `0::<path>` line, v1 one line per hierarchy, hybrid both. If lines disagree about the
    /// pod or container the result is `None`.
    pub fn parse(&self, text: &str) -> Option<PodRef> {
        let mut found: Option<PodRef> = None;
        for line in text.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(_controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Some(pod) = self.pod_of(id, path) else {
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

    /// The pod of one cgroup path of hierarchy `hierarchy`.
    fn pod_of(&self, hierarchy: &str, path: &str) -> Option<PodRef> {
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let up = comps.iter().take_while(|c| **c == "..").count();
        let depth = self.depth(hierarchy);
        let rest = &comps[up..];
        if up > depth || rest.iter().any(|c| *c == ".." || *c == ".") {
            return None;
        }
        let shared = depth - up;
        self.roots
            .iter()
            .find_map(|root| pod_below(root, depth, shared, rest))
    }
}

/// `rest` is the path below the first `shared` levels of the agent's own cgroup, which sits
/// `depth` levels below the host's root (0: the agent is in the host's namespace, and `rest`
/// is the whole path).
///
/// In a cgroup namespace the agent cannot see the names of the levels it shares with the
/// path; it takes its own cgroup to be a container's, where the kubelet put it (the DaemonSet),
/// and accepts the path only when that makes it a pod's below `root`.
fn pod_below(root: &[String], depth: usize, shared: usize, rest: &[&str]) -> Option<PodRef> {
    let l = root.len();
    let below_root = match shared {
        0 => strip(rest, root)?,
        _ if depth != l + 2 && depth != l + 3 => return None,
        s if s < l => strip(rest, &root[s..])?,
        s if s == l => rest,
        // The agent's own QoS level: the pod comes next.
        s if s == l + 1 && depth == l + 3 => return pod_and_container(rest, Qos::Unknown),
        // In the agent's own pod.
        _ => return None,
    };
    match below_root.first().and_then(|c| qos_level(c)) {
        Some(qos) => pod_and_container(&below_root[1..], qos),
        None => pod_and_container(below_root, Qos::Guaranteed),
    }
}

/// `path` without its leading `prefix`, or None when it does not start with it.
fn strip<'a, 'b>(path: &'a [&'b str], prefix: &[String]) -> Option<&'a [&'b str]> {
    (path.len() >= prefix.len() && path.iter().zip(prefix).all(|(a, b)| *a == b.as_str()))
        .then(|| &path[prefix.len()..])
}

/// The pod's QoS class as the cgroup shows it: the level between the root and the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
    /// Read from a namespace that shares the QoS level with the agent: not shown.
    Unknown,
}

impl Qos {
    /// As the kubelet's pod status names it (`status.qosClass`).
    pub fn class(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => Some("Guaranteed"),
            Qos::Burstable => Some("Burstable"),
            Qos::BestEffort => Some("BestEffort"),
            Qos::Unknown => None,
        }
    }
}

/// `kubepods-burstable.slice`, `kubelet-kubepods-besteffort.slice` (systemd) or `burstable`,
/// `besteffort` (cgroupfs).
fn qos_level(comp: &str) -> Option<Qos> {
    let stem = comp.strip_suffix(".slice").unwrap_or(comp);
    let last = stem.rsplit('-').next().unwrap_or(stem);
    let systemd = stem != last;
    if systemd && (!comp.ends_with(".slice") || !stem.split('-').any(|s| s == "kubepods")) {
        return None;
    }
    match last {
        "burstable" => Some(Qos::Burstable),
        "besteffort" => Some(Qos::BestEffort),
        _ => None,
    }
}

/// The pod level and the container level right below it (or both in one component).
fn pod_and_container(comps: &[&str], qos: Qos) -> Option<PodRef> {
    let first = comps.first()?;
    // containerd under systemd without a separate scope unit writes
    // `<pod slice>:<runtime>:<container id>` as one component.
    let (head, inline) = match first.split_once(':') {
        Some((head, rest)) => (head, Some(rest)),
        None => (*first, None),
    };
    let pod_uid = pod_uid_from_slice(head).or_else(|| canonical_uid(head.strip_prefix("pod")?))?;
    let container = match inline {
        Some(rest) => rest,
        None => comps.get(1)?,
    };
    Some(PodRef {
        pod_uid,
        container_id: container_id_from_component(container)?,
        qos,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3a5b1f2e-0c1d-4e5f-8a9b-0c1d2e3f4a5b";
    const UID_: &str = "3a5b1f2e_0c1d_4e5f_8a9b_0c1d2e3f4a5b";
    const CID: &str = "a2b40852970380e1fb8df7d1fc81d58a2cd9cc752b3a0fa0f4c2485cbd0cdc10";

    fn pod(uid: &str, cid: &str) -> Option<(String, String)> {
        Some((uid.to_string(), cid.to_string()))
    }

    /// The pod and container the default layout finds, in the host's namespace.
    fn parse_cgroup(text: &str) -> Option<(String, String)> {
        parse_in(&CgroupLayout::kubelet_default(), text)
    }

    fn parse_in(layout: &CgroupLayout, text: &str) -> Option<(String, String)> {
        layout.parse(text).map(|p| (p.pod_uid, p.container_id))
    }

    /// The layout as an agent in a pod's cgroup namespace sees it, `depth` levels below the
    /// host's root.
    fn in_pod_namespace(depth: usize) -> CgroupLayout {
        let init = format!("0::/{}init.scope\n", "../".repeat(depth));
        CgroupLayout::kubelet_default().in_namespace_of(&init)
    }

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
    fn other_roots_are_configured() {
        // containerd run by systemd, container without its own scope (some distros).
        let layout = CgroupLayout::new(&["/system.slice/containerd.service"]).unwrap();
        let text = format!("0::/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}\n");
        assert_eq!(parse_in(&layout, &text), pod(UID, CID));
        assert_eq!(parse_cgroup(&text), None, "not a default root");
        // A kind node seen from the host, cgroup v1 with the cgroupfs driver.
        let node = "8d2f6a1c9e4b7a3d5f0e1c2b4a6d8f9e0a1b2c3d4e5f60718293a4b5c6d7e8f9";
        let layout = CgroupLayout::new(&[format!("/docker/{node}/kubepods")]).unwrap();
        let text = format!(
            "4:memory:/docker/{node}/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/docker/{node}/kubepods/besteffort/pod{UID}/{CID}\n"
        );
        assert_eq!(parse_in(&layout, &text), pod(UID, CID));
        // kind with cgroup v2 and the systemd driver (kubelet cgroup root /kubelet): a default.
        let text = format!("0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text), pod(UID, CID));
        for bad in [
            "kubepods.slice",
            "/",
            "/kubepods/../user.slice",
            "/a/./b",
            "/a\nb",
        ] {
            assert!(CgroupLayout::new(&[bad]).is_err(), "{bad:?}");
        }
        assert!(CgroupLayout::new::<&str>(&[]).is_err());
    }

    #[test]
    fn read_from_inside_a_pods_cgroup_namespace() {
        // The agent in a Burstable pod (systemd driver): 4 levels below the host's root.
        let ns = in_pod_namespace(4);
        // A pod of the same QoS class: shares two levels.
        let text =
            format!("0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_in(&ns, &text), pod(UID, CID));
        assert_eq!(ns.parse(&text).unwrap().qos, Qos::Unknown);
        // Another QoS class: shares the root.
        let text = format!("0::/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(ns.parse(&text).unwrap().qos, Qos::BestEffort);
        let text = format!("0::/../../../kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(ns.parse(&text).unwrap().qos, Qos::Guaranteed);
        // The cgroupfs driver.
        let text = format!("0::/../../../burstable/pod{UID}/{CID}\n");
        assert_eq!(parse_in(&ns, &text), pod(UID, CID));
        // Back at the host's root: the whole path, which must start at a root.
        let text = format!(
            "0::/../../../../kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(parse_in(&ns, &text), pod(UID, CID));
        // In the agent's own pod, or its own container: not a workload's pod.
        let text = format!("0::/../cri-containerd-{CID}.scope\n");
        assert_eq!(parse_in(&ns, &text), None);
        assert_eq!(parse_in(&ns, "0::/\n"), None);
        // More `..` than the agent is deep cannot be.
        let text = format!("0::/../../../../../kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_in(&ns, &text), None);
        // An agent whose namespace is no pod's (depth 2) accepts no relative pod path.
        let text =
            format!("0::/../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_in(&in_pod_namespace(2), &text), None);
    }

    /// Issue 14, hole 2: an unprivileged user copied a real pod's cgroup path under the
    /// subtree systemd delegates to their session, and was attested as that pod.
    #[test]
    fn a_pod_path_copied_under_a_delegated_subtree_is_no_pod() {
        let real = format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope");
        for forged in [
            format!("0::/user.slice/user-1000.slice/user@1000.service/app.slice/{real}\n"),
            format!("0::/user.slice/user-1000.slice/user@1000.service/{real}\n"),
            format!("0::/system.slice/delegated.service/{real}\n"),
            format!("0::/user.slice/user-1000.slice/user@1000.service/kubepods/besteffort/pod{UID}/{CID}\n"),
            format!("1:name=systemd:/user.slice/user-1000.slice/session-3.scope/{real}\n"),
        ] {
            assert_eq!(parse_cgroup(&forged), None, "{forged}");
            // Seen from an agent in a pod's namespace, the same path starts back at the host's
            // root, so it must start at a kubelet root too.
            let up = forged.replacen(":/", ":/../../../../", 1);
            assert_eq!(parse_in(&in_pod_namespace(4), &up), None, "{up}");
        }
        assert_eq!(parse_cgroup(&format!("0::/{real}\n")), pod(UID, CID));
    }

    #[test]
    fn a_root_others_can_write_is_dropped() {
        use std::os::unix::fs::PermissionsExt;
        let fs = tempfile::tempdir().unwrap();
        let open = fs.path().join("kubepods.slice");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let layout = CgroupLayout::kubelet_default().only_root_writable(fs.path());
        let text =
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_in(&layout, &text), None);
        assert_eq!(
            layout.roots(),
            ["/kubepods", "/kubelet.slice/kubelet-kubepods.slice"]
        );
        if rustix::process::geteuid().is_root() {
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
            let layout = CgroupLayout::kubelet_default().only_root_writable(fs.path());
            assert_eq!(parse_in(&layout, &text), pod(UID, CID));
        }
    }

    #[test]
    fn the_qos_level_is_reported() {
        let at = |text: String| CgroupLayout::kubelet_default().parse(&text).unwrap().qos;
        assert_eq!(
            at(format!("0::/kubepods/besteffort/pod{UID}/{CID}\n")),
            Qos::BestEffort
        );
        assert_eq!(
            at(format!("0::/kubepods/pod{UID}/{CID}\n")),
            Qos::Guaranteed
        );
        assert_eq!(at(format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n")), Qos::Burstable);
        // Not a QoS level, so no pod either.
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods/other/pod{UID}/{CID}\n")),
            None
        );
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
}
