//! A real process placed into a cgroup shaped like a Kubernetes pod's is attested with that
//! pod's UID and container ID, and gets the SVID of a lease bound to them.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;

const POD_UID: &str = "5e1b7c3a-9d2f-4b6e-8a1c-0f2e3d4c5b6a";
const CONTAINER: &str = "8c2f6a0e4b1d9f3a7c5e2b8d0a6f4c1e9b3d7a5f2c8e0b6d4a1f9c3e7b5d2a8f";

fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if !right.starts_with("cgroup2 ") {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Runs `mayfly svid fetch` from a process moved into the cgroup `path` (below the cgroup2
/// mount), creating it first and removing it after. `Err` says why the test cannot run here.
async fn fetch_from_cgroup(t: &TestAgent, path: &str) -> Result<std::process::Output, String> {
    let root = cgroup2_mount().ok_or("no cgroup v2 hierarchy is mounted here")?;
    let leaf = root.join(path);
    let created: Vec<PathBuf> = leaf
        .ancestors()
        .take_while(|p| *p != root)
        .filter(|p| !p.exists())
        .map(PathBuf::from)
        .collect();
    std::fs::create_dir_all(&leaf).map_err(|e| {
        format!(
            "cannot create {} ({e}); needs root and a writable cgroup2",
            leaf.display()
        )
    })?;
    // The shell moves itself into the cgroup, then becomes the client (same process).
    let script = format!(
        "echo $$ > {} && exec {} svid fetch --socket {} --output json",
        leaf.join("cgroup.procs").display(),
        BIN,
        t.socket.display()
    );
    let out = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    for dir in &created {
        let _ = std::fs::remove_dir(dir);
    }
    if String::from_utf8_lossy(&out.stderr).contains("cgroup.procs") {
        return Err(format!(
            "cannot move a process into the cgroup: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

/// The test's kubelet root: a cgroup of its own, so that nothing real is touched.
const ROOT: &str = "mayfly-test-kubepods.slice";

fn pod_path() -> String {
    let underscored = POD_UID.replace('-', "_");
    format!("kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/cri-containerd-{CONTAINER}.scope")
}

async fn agent_with_root() -> TestAgent {
    start_with(|c| c.kubernetes.cgroup_roots = Some(vec![format!("/{ROOT}")])).await
}

async fn grant_pod(t: &TestAgent) -> mayfly::proto::admin::Lease {
    t.grant(
        "in-pod",
        &[
            format!("k8s:pod-uid:{POD_UID}"),
            format!("k8s:container-id:{CONTAINER}"),
        ],
        Duration::from_secs(600),
        None,
    )
    .await
}

#[tokio::test]
async fn a_process_in_a_pod_cgroup_gets_the_pods_identity() {
    let t = agent_with_root().await;
    let lease = grant_pod(&t).await;
    let out = match fetch_from_cgroup(&t, &format!("{ROOT}/{}", pod_path())).await {
        Ok(out) => out,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    let svids = json(out);
    assert_eq!(svids[0]["spiffe_id"], lease.spiffe_id.as_str());

    // The same client outside the pod gets nothing.
    let err = t.workload().await.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );
}

/// Issue 14, hole 2, as the attack was run: a copy of a real pod's cgroup path, made below a
/// subtree someone else can create cgroups in (systemd delegates one to every session), got
/// that pod's SVID.
#[tokio::test]
async fn a_copy_of_a_pods_cgroup_path_elsewhere_gets_nothing() {
    let t = agent_with_root().await;
    grant_pod(&t).await;
    let forged = format!(
        "mayfly-test-user.slice/user@1000.service/{ROOT}/{}",
        pod_path()
    );
    let out = match fetch_from_cgroup(&t, &forged).await {
        Ok(out) => out,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no identity") || stderr.contains("PermissionDenied"),
        "{stderr}"
    );
}
