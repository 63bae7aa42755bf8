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

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3a5b1f2e-0c1d-4e5f-8a9b-0c1d2e3f4a5b";
    const UID_: &str = "3a5b1f2e_0c1d_4e5f_8a9b_0c1d2e3f4a5b";
    const CID: &str = "a2b40852970380e1fb8df7d1fc81d58a2cd9cc752b3a0fa0f4c2485cbd0cdc10";

    fn pod(uid: &str, cid: &str) -> Option<PodRef> {
        Some(PodRef {
            pod_uid: uid.to_string(),
            container_id: cid.to_string(),
        })
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
}
