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

#[tokio::test]
async fn a_process_in_a_pod_cgroup_gets_the_pods_identity() {
    let Some(root) = cgroup2_mount() else {
        eprintln!("skipped: no cgroup v2 hierarchy is mounted here");
        return;
    };
    let underscored = POD_UID.replace('-', "_");
    let top = root.join("mayfly-test-kubepods.slice");
    let leaf = top
        .join(format!("kubepods-besteffort-pod{underscored}.slice"))
        .join(format!("cri-containerd-{CONTAINER}.scope"));
    if let Err(e) = std::fs::create_dir_all(&leaf) {
        eprintln!(
            "skipped: cannot create {} ({e}); needs root and a writable cgroup2",
            leaf.display()
        );
        return;
    }
    let t = start().await;
    let lease = t
        .grant(
            "in-pod",
            &[
                format!("k8s:pod-uid:{POD_UID}"),
                format!("k8s:container-id:{CONTAINER}"),
            ],
            Duration::from_secs(600),
            None,
        )
        .await;
    // The shell moves itself into the pod's cgroup, then becomes the client (same process).
    let procs = leaf.join("cgroup.procs");
    let script = format!(
        "echo $$ > {} && exec {} svid fetch --socket {} --output json",
        procs.display(),
        BIN,
        t.socket.display()
    );
    let out = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    let cleanup = || {
        let _ = std::fs::remove_dir(&leaf);
        let _ = std::fs::remove_dir(leaf.parent().unwrap());
        let _ = std::fs::remove_dir(&top);
    };
    if String::from_utf8_lossy(&out.stderr).contains("cgroup.procs") {
        cleanup();
        eprintln!(
            "skipped: cannot move a process into the cgroup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    cleanup();
    let svids = json(out);
    assert_eq!(svids[0]["spiffe_id"], lease.spiffe_id.as_str());

    // The same client outside the pod gets nothing.
    let err = t.workload().await.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );
}
