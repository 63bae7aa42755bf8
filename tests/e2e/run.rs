//! `mayfly run` end to end: the built binary wraps real commands against a real agent.

use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Starts `mayfly run` and returns it with the lease ID and child PID it reports.
async fn spawn_run(t: &TestAgent, task: &str, command: &[&str]) -> (Child, String, i32) {
    let mut child = run_cmd(t, task, "5m", command)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let line = lines
        .next_line()
        .await
        .unwrap()
        .expect("wrapper reports its lease");
    // "mayfly run: lease <id> for <spiffe id> (pid <pid>)"
    let lease_id = reported_lease(&line);
    let pid = line
        .rsplit("pid ")
        .next()
        .unwrap()
        .trim_end_matches(')')
        .parse()
        .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, lease_id, pid)
}

#[tokio::test]
async fn the_child_gets_its_task_svid_and_the_lease_completes() {
    let t = start().await;
    let out = run_cmd(
        &t,
        "run-1",
        "5m",
        &[BIN, "svid", "fetch", "--output", "json"],
    )
    .output()
    .await
    .unwrap();
    let svids = json(out);
    assert_eq!(
        svids[0]["spiffe_id"],
        "spiffe://example.org/agent/runner/task/run-1/delegator/user/carol"
    );
    let leases = t.all_leases().await;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].state, "completed");
    assert!(leases[0]
        .selectors
        .iter()
        .any(|s| s.starts_with("unix:pid:")));
}

#[tokio::test]
async fn exit_status_comes_back() {
    let t = start().await;
    let s = run_cmd(&t, "exit-7", "5m", &["sh", "-c", "exit 7"])
        .status()
        .await
        .unwrap();
    assert_eq!(s.code(), Some(7));
    let s = run_cmd(&t, "killed", "5m", &["sh", "-c", "kill -TERM $$"])
        .status()
        .await
        .unwrap();
    assert_eq!(s.code(), Some(128 + 15));
}

/// A command that does not exist is refused before anything is granted or audited.
#[tokio::test]
async fn a_missing_command_grants_nothing() {
    let t = start().await;
    for missing in ["/nonexistent/program", "no-such-command-anywhere"] {
        let out = run_cmd(&t, "missing", "5m", &[missing])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(127));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not found"), "{err}");
    }
    let leases = t.all_leases().await;
    assert!(leases.is_empty(), "{leases:?}");
    let audit = audit_records(&t.data_dir());
    assert!(
        !audit.iter().any(|r| r["event"] == "lease_granted"),
        "{audit:?}"
    );
}

/// With only --admin-socket (and a SPIFFE_ENDPOINT_SOCKET naming some other agent), the
/// command is pointed at the workload socket of the agent that granted its lease.
#[tokio::test]
async fn the_command_talks_to_the_agent_that_granted_its_lease() {
    let t = start().await;
    let out = Command::new(BIN)
        .args(["run", "--task-id", "where", "--delegator", "user/carol"])
        .args(["--agent", "runner", "--ttl", "5m"])
        .arg("--admin-socket")
        .arg(&t.admin_socket)
        .args([
            "--",
            "sh",
            "-c",
            "echo \"$SPIFFE_ENDPOINT_SOCKET\"; exec \"$0\" svid fetch --output json",
        ])
        .arg(BIN)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            "unix:///nonexistent/other-agent.sock",
        )
        .env_remove("MAYFLY_ADMIN_SOCKET")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = stdout.lines().next().unwrap();
    assert_eq!(first, t.endpoint());
    assert!(stdout.contains("/task/where/"), "{stdout}");
}

/// `--socket` and `--admin-socket` take every form SPIFFE_ENDPOINT_SOCKET takes.
#[tokio::test]
async fn socket_flags_take_unix_urls() {
    let t = start().await;
    for (admin, workload) in [
        (format!("unix://{}", t.admin_socket.display()), t.endpoint()),
        (
            format!("unix:{}", t.admin_socket.display()),
            format!("unix:{}", t.socket.display()),
        ),
        (
            t.admin_socket.display().to_string(),
            t.socket.display().to_string(),
        ),
    ] {
        let out = Command::new(BIN)
            .args(["run", "--task-id", "urls", "--delegator", "user/carol"])
            .args(["--agent", "runner", "--ttl", "5m"])
            .args(["--admin-socket", &admin, "--socket", &workload])
            .args(["--", BIN, "svid", "fetch", "--socket", &workload])
            .env_remove("MAYFLY_ADMIN_SOCKET")
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{admin} {workload}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn a_process_outside_the_run_gets_nothing() {
    let t = start().await;
    let (mut run, lease_id, _) = spawn_run(&t, "inside", &["sleep", "30"]).await;
    assert_eq!(t.lease(&lease_id).await.state, "active");
    // Same uid, different process: the lease is bound to the child's PID and start time.
    let err = t.workload().await.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );
    run.kill().await.unwrap();
}

#[tokio::test]
async fn signals_are_forwarded_to_the_child() {
    let t = start().await;
    let (mut run, lease_id, _) = spawn_run(&t, "sig", &["sleep", "30"]).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .expect("child ended")
        .unwrap();
    assert_eq!(status.code(), Some(128 + 15));
    assert_eq!(t.lease(&lease_id).await.state, "completed");
}

#[tokio::test]
async fn the_agent_ends_the_lease_when_an_orphaned_child_exits() {
    let t = start().await;
    let (mut run, lease_id, child_pid) = spawn_run(&t, "orphan", &["sleep", "30"]).await;
    // Once the command runs (it has exec'd), kill the wrapper.
    let comm = format!("/proc/{child_pid}/comm");
    eventually(Duration::from_secs(10), async || {
        if std::fs::read_to_string(&comm).unwrap_or_default() == "sleep\n" {
            Ok(())
        } else {
            Err("the command never started".to_owned())
        }
    })
    .await;
    run.start_kill().unwrap(); // SIGKILL: the wrapper cannot complete anything
    run.wait().await.unwrap();
    assert_eq!(
        t.lease(&lease_id).await.state,
        "active",
        "the child still runs"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    t.wait_state(&lease_id, "process_exited", Duration::from_secs(5))
        .await;
}
