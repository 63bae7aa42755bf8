//! Cedar policies on the admin API, approval gates, hot reload and `mayfly policy check`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use mayfly::proto::admin as pb;

const STRICT: &str = r#"
@id("may-manage")
permit (principal, action in [Mayfly::Action::"grant", Mayfly::Action::"renew", Mayfly::Action::"revoke", Mayfly::Action::"complete"], resource);

@id("ttl-at-most-1h")
forbid (principal, action == Mayfly::Action::"grant", resource) when { context.ttl_secs > 3600 };

@id("known-delegator")
forbid (principal, action == Mayfly::Action::"grant", resource) unless { context.delegator like "user/*" };

@id("long-grant-needs-approval")
@approval("required")
forbid (principal, action == Mayfly::Action::"grant", resource) when { context.ttl_secs > 900 };

@id("approvers")
permit (principal, action == Mayfly::Action::"approve", resource) when { principal.uid == 0 || principal.uid == 65534 };
"#;

async fn strict_agent(policy_dir: &Path, approval_timeout: &str) -> TestAgent {
    std::fs::write(policy_dir.join("strict.cedar"), STRICT).unwrap();
    let dir = policy_dir.to_owned();
    let timeout = approval_timeout.to_owned();
    let t = start_with(move |f| {
        f.policy.files = Some(vec![dir]);
        f.policy.approval_timeout = Some(timeout);
        f.admin.allowed_uids = Some(vec![0, 65533, 65534]);
    })
    .await;
    // uid 65534 must reach the admin socket to approve; the peer-credential allowlist and the
    // policies are what decide.
    std::fs::set_permissions(&t.admin_socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    t
}

#[tokio::test]
async fn the_default_policy_grants_within_the_configured_maximum() {
    let t = start_with(|f| f.leases.max_ttl = Some("2h".into())).await;
    let mut admin = t.admin().await;
    admin
        .grant(grant_request("ok", "user/alice", Duration::from_secs(3600)))
        .await
        .unwrap();
    // Above the maximum, validation refuses it before any policy is asked.
    let err = admin
        .grant(grant_request(
            "long",
            "user/alice",
            Duration::from_secs(3 * 3600),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_stricter_policy_denies_and_names_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let t = strict_agent(dir.path(), "1h").await;
    let mut admin = t.admin().await;
    let err = admin
        .grant(grant_request(
            "too-long",
            "user/alice",
            Duration::from_secs(2 * 3600),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("ttl-at-most-1h"),
        "{}",
        err.message()
    );
    let err = admin
        .grant(grant_request("who", "robot/x", Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("known-delegator"),
        "{}",
        err.message()
    );
    // Nothing was granted, and both denials are audited with the whole request.
    assert!(t.all_leases().await.is_empty());
    let denials = audit_events(&t.data_dir(), "policy_denied");
    assert_eq!(denials.len(), 2);
    assert_eq!(denials[1]["request"]["context"]["delegator"], "robot/x");
    assert_eq!(
        denials[1]["policies"],
        serde_json::json!(["known-delegator"])
    );
    // A short grant by a known delegator passes.
    admin
        .grant(grant_request(
            "fine",
            "user/alice",
            Duration::from_secs(600),
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn approval_gates_hold_a_lease_until_someone_else_approves() {
    let dir = tempfile::tempdir().unwrap();
    let t = strict_agent(dir.path(), "1h").await;
    let mut admin = t.admin().await;
    let lease = admin
        .grant(grant_request(
            "gated",
            "user/alice",
            Duration::from_secs(1800),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.state, "pending");
    assert!(lease.approval_deadline.is_some());
    // Pending issues nothing.
    let err = t.workload().await.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );

    // The grantor (root) may approve by policy, but not its own grant (four eyes).
    let err = admin
        .approve(pb::ApproveRequest {
            lease_id: lease.lease_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("four eyes"), "{}", err.message());

    // uid 65533 is allowlisted but no policy lets it approve.
    let admin_socket = t.admin_socket.display().to_string();
    let approve_args = [
        "task",
        "approve",
        &lease.lease_id,
        "--admin-socket",
        &admin_socket,
        "--output",
        "json",
    ];
    let Some(out) = run_as(65533, &approve_args).await else {
        return;
    };
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PermissionDenied"), "{stderr}");

    // uid 65534, allowed by the policy and not the grantor, approves it.
    let approved = json(run_as(65534, &approve_args).await.unwrap());
    assert_eq!(approved["state"], "active");
    assert_eq!(approved["approved_by"]["uid"], 65534);

    let got = t.lease(&lease.lease_id).await;
    assert_eq!(got.state, "active");
    assert_eq!(got.approved_by.unwrap().uid, 65534);
    let svid = t.workload().await.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), lease.spiffe_id);

    let pending = audit_events(&t.data_dir(), "lease_pending");
    assert_eq!(pending[0]["reason_for_change"], "long-grant-needs-approval");
    let approvals = audit_events(&t.data_dir(), "lease_approved");
    assert_eq!(approvals[0]["approved_by"]["uid"], 65534);
}

#[tokio::test]
async fn a_pending_lease_can_be_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let t = strict_agent(dir.path(), "1h").await;
    let mut admin = t.admin().await;
    let lease = admin
        .grant(grant_request(
            "withdrawn",
            "user/alice",
            Duration::from_secs(1800),
        ))
        .await
        .unwrap()
        .into_inner();
    let revoked = t.revoke(&lease.lease_id, "changed my mind").await;
    assert_eq!(revoked.state, "revoked");
    let err = admin
        .approve(pb::ApproveRequest {
            lease_id: lease.lease_id,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn a_pending_lease_not_approved_in_time_expires() {
    let dir = tempfile::tempdir().unwrap();
    let t = strict_agent(dir.path(), "1s").await;
    let mut admin = t.admin().await;
    let lease = admin
        .grant(grant_request(
            "forgotten",
            "user/alice",
            Duration::from_secs(1800),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.state, "pending");
    t.wait_state(&lease.lease_id, "expired", Duration::from_secs(10))
        .await;
    let err = admin
        .approve(pb::ApproveRequest {
            lease_id: lease.lease_id,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn policies_reload_on_change_and_a_broken_file_keeps_the_old_set() {
    let dir = tempfile::tempdir().unwrap();
    let t = strict_agent(dir.path(), "1h").await;
    let mut admin = t.admin().await;
    admin
        .grant(grant_request(
            "before",
            "user/alice",
            Duration::from_secs(60),
        ))
        .await
        .unwrap();

    // A broken file: the reload fails and the previous policies stay in force.
    std::fs::write(
        dir.path().join("strict.cedar"),
        "permit (principal, action, resource) when {",
    )
    .unwrap();
    t.agent.as_ref().unwrap().reload_policies();
    admin
        .grant(grant_request(
            "still",
            "user/alice",
            Duration::from_secs(60),
        ))
        .await
        .unwrap();

    // A valid stricter file is picked up by the file watch, without touching existing leases.
    let stricter = STRICT.replace("context.ttl_secs > 3600", "context.ttl_secs > 30");
    std::fs::write(dir.path().join("strict.cedar"), stricter).unwrap();
    eventually(Duration::from_secs(15), async || {
        match admin
            .grant(grant_request(
                "after",
                "user/alice",
                Duration::from_secs(60),
            ))
            .await
        {
            Err(e) if e.message().contains("ttl-at-most-1h") => Ok(()),
            Ok(_) | Err(_) => Err("the new policy never took effect".to_owned()),
        }
    })
    .await;
    let active = admin
        .list(pb::ListRequest { all: false })
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert!(active
        .iter()
        .any(|l| l.task_id == "before" && l.state == "active"));
}

#[tokio::test]
async fn policy_check_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("strict.cedar");
    std::fs::write(&file, STRICT).unwrap();
    let check = |args: &[&str]| {
        mayfly_command(&["policy", "check", "--policy", file.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let ok = check(&["--action", "grant", "--delegator", "user/a", "--ttl", "5m"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let gated = check(&["--action", "grant", "--delegator", "user/a", "--ttl", "30m"]);
    assert_eq!(gated.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&gated.stdout).unwrap();
    assert_eq!(v["decision"], "approval_required");
    assert_eq!(
        v["policies"],
        serde_json::json!(["long-grant-needs-approval"])
    );
    let denied = check(&["--action", "grant", "--delegator", "bot/a", "--ttl", "5m"]);
    assert_eq!(denied.status.code(), Some(1));
    // The same as JSON on stdin.
    let json = r#"{"action":"approve","principal":{"uid":65534},"context":{"grantor_uid":0}}"#;
    let mut child = mayfly_command(&[
        "policy",
        "check",
        "--policy",
        file.to_str().unwrap(),
        "--request",
        "-",
    ])
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(json.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    // A broken policy file is an error with Cedar's message.
    std::fs::write(&file, "permit (principal, action, resource) when {").unwrap();
    let broken = check(&["--action", "grant"]);
    assert!(!broken.status.success());
    assert!(String::from_utf8_lossy(&broken.stderr).contains("strict.cedar"));
}

#[tokio::test]
async fn mayfly_run_waits_for_approval_before_starting_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let t = strict_agent(dir.path(), "1h").await;
    let mut run = run_cmd(
        &t,
        "gated-run",
        "30m",
        &[BIN, "svid", "fetch", "--output", "json"],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(run.stderr.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    assert!(line.contains("needs approval"), "{line}");
    let lease_id = reported_lease(&line);
    let admin_socket = t.admin_socket.display().to_string();
    let Some(out) = run_as(
        65534,
        &[
            "task",
            "approve",
            &lease_id,
            "--admin-socket",
            &admin_socket,
        ],
    )
    .await
    else {
        return;
    };
    ok(out);
    let done = tokio::time::timeout(Duration::from_secs(20), run.wait_with_output())
        .await
        .expect("the command ran after approval")
        .unwrap();
    let svids = json(done);
    assert!(svids[0]["spiffe_id"]
        .as_str()
        .unwrap()
        .contains("/task/gated-run/"));
}

/// A signal while `mayfly run` waits for approval withdraws the pending lease and exits
/// 128 + signal; the command never starts.
#[tokio::test]
async fn interrupting_a_pending_run_withdraws_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let t = strict_agent(dir.path(), "1h").await;
    let marker = dir.path().join("ran");
    let mut run = run_cmd(&t, "gated-int", "30m", &["touch", marker.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(run.stderr.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    assert!(line.contains("needs approval"), "{line}");
    let lease_id = reported_lease(&line);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .expect("the wrapper exits")
        .unwrap();
    assert_eq!(status.code(), Some(128 + 2));
    assert_eq!(t.lease(&lease_id).await.state, "revoked");
    assert!(!marker.exists(), "the command must not have run");
}

/// The dry run answers as the agent would: the embedded default policy grants what the agent
/// grants, the agent's --config limits apply, and the README's strict example is gated.
#[test]
fn policy_check_answers_as_the_agent_would() {
    let check = |args: &[&str]| {
        let out = mayfly_command(&["policy", "check"])
            .args(args)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        (
            out.status.code(),
            v["decision"].as_str().unwrap().to_owned(),
        )
    };
    let grant = ["--action", "grant", "--delegator", "user/a", "--ttl", "30m"];
    assert_eq!(check(&grant), (Some(0), "allow".into()));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mayfly.toml");
    std::fs::write(&config, "[leases]\nmax_ttl = \"10m\"\n").unwrap();
    let with_config = [&["--config", config.to_str().unwrap()][..], &grant].concat();
    assert_eq!(check(&with_config), (Some(1), "deny".into()));
    let strict = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies/examples/strict.cedar"
    );
    let readme = [
        &["--policy", strict, "--group", "mayfly-admins"][..],
        &grant,
    ]
    .concat();
    assert_eq!(check(&readme), (Some(2), "approval_required".into()));
}

/// An agent on `policy` (one file) that admits uid 65534 to the admin socket too, and the
/// directory holding the policy.
async fn agent_admitting_nobody(policy: &str) -> (TestAgent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.cedar"), policy).unwrap();
    let policy_dir = dir.path().to_owned();
    let t = start_with(move |f| {
        f.policy.files = Some(vec![policy_dir]);
        f.admin.allowed_uids = Some(vec![0, 65534]);
    })
    .await;
    std::fs::set_permissions(&t.admin_socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    (t, dir)
}

/// Issue 14, hole 6: an allowlisted caller that the policies refuse `revoke` could end the
/// same lease with `complete`, which no policy decided.
#[tokio::test]
async fn complete_is_decided_by_the_policies() {
    let (t, _policy) = agent_admitting_nobody(
        r#"
@id("root-grants")
permit (principal, action == Mayfly::Action::"grant", resource) when { principal.uid == 0 };

@id("grantor-ends")
permit (principal, action in [Mayfly::Action::"revoke", Mayfly::Action::"complete"], resource)
when { principal.uid == context.grantor_uid };
"#,
    )
    .await;
    let lease = t.grant_me("mine", HOUR, None).await;
    let admin_socket = t.admin_socket.display().to_string();
    for verb in ["revoke", "complete"] {
        let args = [
            "task",
            verb,
            &lease.lease_id,
            "--admin-socket",
            &admin_socket,
        ];
        let Some(out) = run_as(65534, &args).await else {
            return;
        };
        assert!(!out.status.success(), "uid 65534 may not {verb}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("PermissionDenied"), "{verb}: {stderr}");
        assert_eq!(t.lease(&lease.lease_id).await.state, "active", "{verb}");
    }
    let denied = audit_events(&t.data_dir(), "policy_denied");
    let actions: Vec<&str> = denied
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["revoke", "complete"]);
    // The grantor (this process, uid 0) completes its own task.
    let done = t
        .admin()
        .await
        .complete(pb::CompleteRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, "completed");
}

/// Issue 14, hole 6: reads (`get`, `list`) are decided by the policies too. The embedded
/// reads policy allows them as before; a forbid narrows who sees which leases.
#[tokio::test]
async fn reads_are_decided_by_the_policies() {
    let (t, _policy) = agent_admitting_nobody(
        r#"
@id("root-grants")
permit (principal, action == Mayfly::Action::"grant", resource) when { principal.uid == 0 };

@id("grantor-reads")
forbid (principal, action == Mayfly::Action::"read", resource)
unless { principal.uid == context.grantor_uid };
"#,
    )
    .await;
    let lease = t.grant_me("mine", HOUR, None).await;
    // The grantor reads it, and lists it.
    assert_eq!(t.lease(&lease.lease_id).await.task_id, "mine");
    assert_eq!(t.all_leases().await.len(), 1);
    let admin_socket = t.admin_socket.display().to_string();
    let get = [
        "task",
        "get",
        &lease.lease_id,
        "--admin-socket",
        &admin_socket,
    ];
    let Some(out) = run_as(65534, &get).await else {
        return;
    };
    assert!(!out.status.success(), "uid 65534 read another's lease");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("grantor-reads"),
        "{stderr}"
    );
    let list = [
        "task",
        "list",
        "--all",
        "--output",
        "json",
        "--admin-socket",
        &admin_socket,
    ];
    let listed = json(run_as(65534, &list).await.unwrap());
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let denied = audit_events(&t.data_dir(), "policy_denied");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["action"], "read");
}
