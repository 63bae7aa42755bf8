//! Delegation end to end: the Delegation service on the workload socket, `mayfly delegate`
//! from inside a leased process, the narrowing rules and limits over the wire, policies,
//! cascades to open streams, scope violations and restarts, with real processes.

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use mayfly::proto::admin as pb;
use mayfly::proto::delegation as dpb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::Code;

use crate::common::*;

type Client = dpb::delegation_client::DelegationClient<tonic::transport::Channel>;

async fn delegation(t: &TestAgent) -> Client {
    let channel = mayfly::cli::connect::unix_channel(&t.socket).await.unwrap();
    dpb::delegation_client::DelegationClient::new(channel)
}

/// A request with the Workload API's security header.
fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// A root lease for this test process (its pid and uid), allowing `depth` levels below it.
async fn grant_root(t: &TestAgent, task: &str, depth: u32, audiences: &[&str]) -> pb::Lease {
    grant_root_with(t, task, depth, audiences, false).await
}

async fn grant_root_with(
    t: &TestAgent,
    task: &str,
    depth: u32,
    audiences: &[&str],
    end_on_violation: bool,
) -> pb::Lease {
    t.admin()
        .await
        .grant(pb::GrantRequest {
            agent: "planner".into(),
            selectors: vec![
                format!("unix:pid:{}", std::process::id()),
                format!("unix:uid:{}", my_uid()),
            ],
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            max_delegation_depth: depth,
            end_on_violation,
            max_ttl: Some(mayfly::time::to_duration(2 * HOUR)),
            ..grant_request(task, "user/alice", HOUR)
        })
        .await
        .unwrap()
        .into_inner()
}

/// A process to bind children to: a descendant of this test process.
struct Sleeper(std::process::Child);

impl Sleeper {
    fn start() -> Sleeper {
        Sleeper(
            std::process::Command::new("sleep")
                .arg("120")
                .spawn()
                .unwrap(),
        )
    }

    fn selector(&self) -> String {
        format!("unix:pid:{}", self.0.id())
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn child_request(task: &str, selectors: Vec<String>, audiences: &[&str]) -> dpb::DelegateRequest {
    dpb::DelegateRequest {
        task_id: task.into(),
        agent: "executor".into(),
        ttl: Some(mayfly::time::to_duration(Duration::from_secs(600))),
        selectors,
        audiences: audiences.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

fn delegate_cmd(
    t: &TestAgent,
    task: &str,
    audiences: &[&str],
    command: &[&str],
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(BIN);
    c.args([
        "delegate",
        "--task-id",
        task,
        "--agent",
        "executor",
        "--ttl",
        "5m",
    ]);
    for a in audiences {
        c.args(["--audience", a]);
    }
    c.arg("--")
        .args(command)
        .env("SPIFFE_ENDPOINT_SOCKET", t.endpoint())
        .env_remove("MAYFLY_ADMIN_SOCKET")
        .kill_on_drop(true);
    c
}

#[tokio::test]
async fn mayfly_delegate_runs_a_command_under_a_narrower_child_with_the_chain_in_its_jwt() {
    let t = start().await;
    let root = grant_root(&t, "plan-1", 1, &["db", "search"]).await;
    let out = delegate_cmd(
        &t,
        "step-1",
        &["db"],
        &[BIN, "jwt", "fetch", "--audience", "db", "--output", "json"],
    )
    .output()
    .await
    .unwrap();
    let fetched = json(out);
    let token = fetched["token"].as_str().unwrap();
    let c = claims(token);
    let child_id = "spiffe://example.org/agent/executor/task/step-1/delegator/user/alice";
    assert_eq!(c["sub"], child_id);
    assert_eq!(c["urn:mayfly:delegator"], "user/alice");
    // RFC 8693 section 4.1: the current actor outermost, the root lease most deeply nested.
    assert_eq!(c["act"]["sub"], child_id);
    assert_eq!(c["act"]["act"]["sub"], root.spiffe_id);
    assert_eq!(c["act"]["act"]["urn:mayfly:lease_id"], root.lease_id);
    assert!(c["act"]["act"].get("act").is_none());
    assert_eq!(c["urn:mayfly:chain"][0]["sub"], root.spiffe_id);
    assert_eq!(c["urn:mayfly:chain"][0]["urn:mayfly:task_id"], "plan-1");
    // Checked offline, as a relying party would, with the spiffe crate.
    let bundles = t.workload().await.fetch_jwt_bundles().await.unwrap();
    let svid = spiffe::JwtSvid::parse_and_validate(token, &bundles, &["db"]).unwrap();
    assert_eq!(svid.spiffe_id().to_string(), child_id);

    // The child lease: completed when the command exited, with the chain, bound to the
    // command's process and to the parent's uid.
    let leases = t.all_leases().await;
    let child = leases.iter().find(|l| l.spiffe_id == child_id).unwrap();
    assert_eq!(child.state, "completed");
    assert_eq!(child.chain.len(), 1);
    assert_eq!(child.chain[0].lease_id, root.lease_id);
    assert_eq!(child.audiences, ["db"]);
    assert_eq!(child.may_delegate, 0);
    assert!(child.selectors.contains(&format!("unix:uid:{}", my_uid())));
    assert!(child.selectors.iter().any(|s| s.starts_with("unix:pid:")));
    assert!(!child
        .selectors
        .contains(&format!("unix:pid:{}", std::process::id())));
    assert_eq!(t.lease(&root.lease_id).await.state, "active");

    // Every audit record about the child carries the chain.
    let records = audit_records(&t.data_dir());
    let about: Vec<_> = records
        .iter()
        .filter(|r| r.get("lease_id").and_then(|v| v.as_str()) == Some(child.lease_id.as_str()))
        .collect();
    assert!(
        about.len() >= 3,
        "granted, jwt issued, completed: {about:?}"
    );
    for r in about {
        assert_eq!(r["chain"][0]["lease_id"], root.lease_id, "{r:?}");
    }

    // `task get` shows it too.
    let got = json(
        mayfly_async(&[
            "task",
            "get",
            &child.lease_id,
            "--admin-socket",
            t.admin_socket.to_str().unwrap(),
            "--output",
            "json",
        ])
        .await,
    );
    assert_eq!(got["chain"][0]["spiffe_id"], root.spiffe_id);
}

#[tokio::test]
async fn the_narrowing_rules_are_refused_at_their_boundary_and_nothing_changes() {
    let t = start().await;
    let root = grant_root(&t, "plan", 1, &["db"]).await;
    let kid = Sleeper::start();
    let mut d = delegation(&t).await;
    let ok = child_request("ok", vec![kid.selector()], &["db"]);

    // Missing header: InvalidArgument, as on the Workload API.
    let err = d
        .delegate(tonic::Request::new(ok.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let ttl = |secs| Some(mayfly::time::to_duration(Duration::from_secs(secs)));
    let expires = expires_at(&root)
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs();
    let cases: Vec<(dpb::DelegateRequest, Code, &str)> = vec![
        (
            dpb::DelegateRequest {
                ttl: ttl(expires + 2),
                ..ok.clone()
            },
            Code::PermissionDenied,
            "expires_at",
        ),
        (
            dpb::DelegateRequest {
                max_ttl: ttl(2 * 3600 + 10),
                ..ok.clone()
            },
            Code::PermissionDenied,
            "max_expires_at",
        ),
        (
            dpb::DelegateRequest {
                svid_ttl: ttl(301),
                ..ok.clone()
            },
            Code::PermissionDenied,
            "svid_ttl",
        ),
        (
            child_request("a", vec![kid.selector()], &["db", "mail"]),
            Code::PermissionDenied,
            "audiences",
        ),
        (
            child_request("a", vec![kid.selector()], &[]),
            Code::InvalidArgument,
            "audiences",
        ),
        (
            child_request("a", vec!["unix:gid:0".into()], &["db"]),
            Code::PermissionDenied,
            "must be bound",
        ),
        (
            child_request(
                "a",
                vec![format!("unix:pid:{}", std::process::id())],
                &["db"],
            ),
            Code::PermissionDenied,
            "must add",
        ),
        (
            child_request("a", vec!["unix:pid:1".into()], &["db"]),
            Code::PermissionDenied,
            "nor a descendant",
        ),
        (
            dpb::DelegateRequest {
                max_delegation_depth: Some(1),
                ..ok.clone()
            },
            Code::PermissionDenied,
            "max_delegation_depth",
        ),
        (
            dpb::DelegateRequest {
                task_id: "a b".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "task_id",
        ),
        (
            dpb::DelegateRequest {
                parent: "spiffe://example.org/not/mine".into(),
                ..ok.clone()
            },
            Code::PermissionDenied,
            "does not hold",
        ),
    ];
    for (request, code, says) in cases {
        let err = d.delegate(req(request.clone())).await.unwrap_err();
        assert_eq!(err.code(), code, "{request:?}: {err:?}");
        assert!(err.message().contains(says), "{says}: {}", err.message());
    }
    // Nothing was created by any refusal, and each refusal by a rule is audited.
    assert_eq!(t.all_leases().await.len(), 1);
    let refused = audit_events(&t.data_dir(), "delegation_refused");
    assert_eq!(refused.len(), 9, "{refused:?}");
    let by_rule = |rule: &str| {
        refused
            .iter()
            .find(|r| r["reason"].as_str().unwrap().contains(rule))
            .unwrap_or_else(|| panic!("no record for {rule}: {refused:?}"))
    };
    assert_eq!(by_rule("expires_at")["parent_lease_id"], root.lease_id);
    assert_eq!(by_rule("nor a descendant")["uid"], my_uid());
    assert!(by_rule("does not hold")["parent_lease_id"].is_null());

    // Just inside every boundary: accepted.
    let inside = dpb::DelegateRequest {
        ttl: ttl(expires.saturating_sub(2)),
        max_ttl: ttl(3600),
        svid_ttl: ttl(300),
        jwt_ttl: ttl(300),
        ..ok.clone()
    };
    let child = d.delegate(req(inside)).await.unwrap().into_inner();
    assert_eq!(child.state, "active");
    assert!(expires_at(&child) <= expires_at(&root));
    // The child cannot delegate further (its root allowed one level): depth.
    let listed = d
        .list(req(dpb::ListRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.leases.len(), 1);
    assert_eq!(listed.leases[0].lease_id, child.lease_id);
}

#[tokio::test]
async fn a_lease_granted_without_delegation_delegates_nothing_and_a_caller_without_one_is_refused()
{
    let t = start().await;
    let kid = Sleeper::start();
    let mut d = delegation(&t).await;
    let err = d
        .delegate(req(child_request("x", vec![kid.selector()], &["db"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "no identity issued");
    grant_root(&t, "plain", 0, &[]).await;
    let err = d
        .delegate(req(child_request("x", vec![kid.selector()], &["db"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("may not delegate"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn fan_out_and_rate_are_limited_per_parent() {
    let t = start_with(|f| {
        f.delegation.max_children = Some(2);
        f.delegation.rate_per_second = Some(1);
        f.delegation.rate_burst = Some(4);
    })
    .await;
    grant_root(&t, "plan", 1, &[]).await;
    let kids: Vec<Sleeper> = (0..3).map(|_| Sleeper::start()).collect();
    let mut d = delegation(&t).await;
    let a = d
        .delegate(req(child_request("a", vec![kids[0].selector()], &["db"])))
        .await
        .unwrap()
        .into_inner();
    d.delegate(req(child_request("b", vec![kids[1].selector()], &["db"])))
        .await
        .unwrap();
    let err = d
        .delegate(req(child_request("c", vec![kids[2].selector()], &["db"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("fan-out"), "{}", err.message());
    // Ending one frees its place.
    let ended = d
        .end(req(dpb::EndRequest {
            lease_id: a.lease_id.clone(),
            reason: "done early".into(),
            completed: false,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.state, "revoked");
    assert!(ended.end_reason.contains("done early"));
    d.delegate(req(child_request("c", vec![kids[2].selector()], &["db"])))
        .await
        .unwrap();
    // Every request takes from the rate, refused ones too: the fifth in a row is past the
    // burst of four.
    let err = d
        .delegate(req(child_request("d", vec![kids[0].selector()], &["db"])))
        .await
        .unwrap_err();
    assert!(
        err.code() == Code::ResourceExhausted && err.message().contains("rate"),
        "{err:?}"
    );
}

const DELEGATION_POLICY: &str = r#"
@id("admins-manage")
permit (principal, action in [Mayfly::Action::"grant", Mayfly::Action::"revoke", Mayfly::Action::"complete"], resource);

@id("delegate-within-task")
permit (principal, action == Mayfly::Action::"delegate", resource)
when { principal.depth < 2 };

@id("no-prod-audience")
forbid (principal, action == Mayfly::Action::"delegate", resource)
when { context.audiences.contains("prod") };

@id("deployers-need-approval")
@approval("required")
forbid (principal, action == Mayfly::Action::"delegate", resource)
when { resource.agent == "deployer" };

@id("approvers")
permit (principal, action == Mayfly::Action::"approve", resource) when { principal.uid == 65534 };
"#;

#[tokio::test]
async fn policies_allow_deny_and_gate_delegations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), DELEGATION_POLICY).unwrap();
    let policy_dir = dir.path().to_owned();
    let t = start_with(move |f| {
        f.policy.files = Some(vec![policy_dir]);
        f.admin.allowed_uids = Some(vec![0, 65534, my_uid()]);
    })
    .await;
    std::fs::set_permissions(
        &t.admin_socket,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o666),
    )
    .unwrap();
    grant_root(&t, "plan", 2, &[]).await;
    let kid = Sleeper::start();
    let mut d = delegation(&t).await;
    // Allowed.
    let allowed = d
        .delegate(req(child_request("ok", vec![kid.selector()], &["db"])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.state, "active");
    // Denied, naming the policy, and audited with the whole request.
    let err = d
        .delegate(req(child_request("p", vec![kid.selector()], &["prod"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("no-prod-audience"),
        "{}",
        err.message()
    );
    let denied = audit_events(&t.data_dir(), "policy_denied");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["action"], "delegate");
    assert_eq!(denied[0]["request"]["workload"]["depth"], 0);
    assert_eq!(denied[0]["request"]["context"]["audiences"][0], "prod");
    // Gated: a pending child, approved by someone else.
    let gated = d
        .delegate(req(dpb::DelegateRequest {
            agent: "deployer".into(),
            ..child_request("deploy", vec![kid.selector()], &["db"])
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gated.state, "pending");
    let Some(out) = run_as(
        65534,
        &[
            "task",
            "approve",
            &gated.lease_id,
            "--admin-socket",
            t.admin_socket.to_str().unwrap(),
            "--output",
            "json",
        ],
    )
    .await
    else {
        return;
    };
    let approved = json(out);
    assert_eq!(approved["state"], "active");
    assert!(
        expires_at(&t.lease(&gated.lease_id).await)
            <= expires_at(&t.lease(&allowed.chain[0].lease_id).await)
    );
}

/// `mayfly policy check` answers for `delegate` as the agent would: the embedded policy permits
/// it, and a request file's `workload` is the principal a policy sees.
#[test]
fn policy_check_dry_runs_delegations() {
    let out = mayfly(&[
        "policy",
        "check",
        "--action",
        "delegate",
        "--agent",
        "executor",
        "--audience",
        "db",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("delegate"),
        "{out:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), DELEGATION_POLICY).unwrap();
    let request = dir.path().join("request.json");
    let policy = dir.path().join("p.cedar");
    for (depth, code) in [(1, 0), (2, 1)] {
        std::fs::write(
            &request,
            format!(
                r#"{{"action": "delegate", "workload": {{"spiffe_id": "spiffe://example.org/agent/planner", "depth": {depth}}},
                    "resource": {{"agent": "executor"}}, "context": {{"audiences": ["db"]}}}}"#
            ),
        )
        .unwrap();
        let out = mayfly(&[
            "policy",
            "check",
            "--policy",
            policy.to_str().unwrap(),
            "--request",
            request.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(code), "depth {depth}: {out:?}");
    }
}

/// The executor runs `mayfly delegate` itself: planner (this test) → executor (a shell) →
/// tool (`mayfly svid watch`), each bound to its own process.
#[tokio::test]
async fn ending_the_root_ends_every_descendant_and_their_streams_at_once() {
    let t = start().await;
    let root = grant_root(&t, "plan", 2, &[]).await;
    let script = format!(
        "{BIN} delegate --task-id tool-1 --agent tool --ttl 5m --audience db -- {BIN} svid watch --output json"
    );
    let mut executor = delegate_cmd(&t, "exec-1", &["db"], &["sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The tool's first SVID arrives on its stream.
    let mut lines = BufReader::new(executor.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the tool's stream answered")
        .unwrap();
    let Some(first) = first else {
        // Say why: what the executor and the tool wrote before they exited.
        let mut err = String::new();
        let mut stderr = executor.stderr.take().unwrap();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut err)
            .await
            .unwrap();
        panic!(
            "no first SVID; the executor exited ({:?}): {err}",
            executor.wait().await
        );
    };
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    let tool_id = "spiffe://example.org/agent/tool/task/tool-1/delegator/user/alice";
    assert!(first.to_string().contains(tool_id), "{first}");
    let leases = t.all_leases().await;
    let exec = leases.iter().find(|l| l.agent == "executor").unwrap();
    let tool = leases.iter().find(|l| l.agent == "tool").unwrap();
    assert_eq!(tool.chain.len(), 2);
    assert_eq!(tool.chain[0].lease_id, root.lease_id);
    assert_eq!(tool.chain[1].lease_id, exec.lease_id);

    t.revoke(&root.lease_id, "planner misbehaved").await;
    // Both descendants ended with the root, saying so.
    for l in [exec, tool] {
        let got = t.lease(&l.lease_id).await;
        assert_eq!(got.state, "parent_ended", "{got:?}");
        assert!(
            got.end_reason.contains(&root.lease_id),
            "{}",
            got.end_reason
        );
        assert!(
            got.end_reason.contains("planner misbehaved"),
            "{}",
            got.end_reason
        );
    }
    // The tool's stream is told: `svid watch` ends, and so does everything above it.
    let status = tokio::time::timeout(Duration::from_secs(30), executor.wait())
        .await
        .expect("the tool's stream ended and the executor exited")
        .unwrap();
    assert!(!status.success());
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut executor.stderr.take().unwrap(), &mut err)
        .await
        .unwrap();
    assert!(err.contains("no identity issued"), "{err}");
}

#[tokio::test]
async fn a_lease_that_ends_on_violation_is_revoked_for_each_trigger() {
    let t = start().await;
    let kid = Sleeper::start();
    let violated = async |lease: &pb::Lease, says: &str| {
        let got = t.lease(&lease.lease_id).await;
        assert_eq!(got.state, "revoked", "{got:?}");
        assert!(
            got.end_reason.starts_with("scope violation: "),
            "{}",
            got.end_reason
        );
        assert!(got.end_reason.contains(says), "{}", got.end_reason);
    };

    // 1. A JWT audience outside its scope; its child goes with it.
    let root = grant_root_with(&t, "v1", 1, &["db"], true).await;
    let child = delegation(&t)
        .await
        .delegate(req(child_request("c", vec![kid.selector()], &["db"])))
        .await
        .unwrap()
        .into_inner();
    assert!(child.end_on_violation, "inherited");
    let err = t
        .workload()
        .await
        .fetch_jwt_token(["mail"], None)
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("mail"), "{err:?}");
    violated(&root, "mail").await;
    assert_eq!(t.lease(&child.lease_id).await.state, "parent_ended");

    // 2. A delegation its limits refuse.
    let root = grant_root_with(&t, "v2", 1, &["db"], true).await;
    let err = delegation(&t)
        .await
        .delegate(req(child_request("c", vec![kid.selector()], &["mail"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    violated(&root, "audiences").await;

    // 3. A SPIFFE ID it does not hold, on the Workload API and on the Delegation service.
    let root = grant_root_with(&t, "v3", 1, &["db"], true).await;
    let err = t
        .workload()
        .await
        .fetch_jwt_token(
            ["db"],
            Some(&spiffe::SpiffeId::new("spiffe://example.org/someone/else").unwrap()),
        )
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("does not hold"), "{err:?}");
    violated(&root, "does not hold").await;
    let root = grant_root_with(&t, "v4", 1, &["db"], true).await;
    delegation(&t)
        .await
        .delegate(req(dpb::DelegateRequest {
            parent: "spiffe://example.org/someone/else".into(),
            ..child_request("c", vec![kid.selector()], &["db"])
        }))
        .await
        .unwrap_err();
    violated(&root, "does not hold").await;

    // A lease granted without the flag is only refused.
    let plain = grant_root(&t, "v5", 1, &["db"]).await;
    t.workload()
        .await
        .fetch_jwt_token(["mail"], None)
        .await
        .unwrap_err();
    assert_eq!(t.lease(&plain.lease_id).await.state, "active");
    let ended = audit_events(&t.data_dir(), "lease_revoked");
    assert!(
        ended.iter().all(|r| r["end_on_violation"] == true),
        "{ended:?}"
    );
}

#[tokio::test]
async fn a_live_hierarchy_survives_a_restart_and_still_cascades() {
    let dir = shared_tempdir();
    let t = start_in(dir, |_| {}).await;
    let root = grant_root(&t, "plan", 1, &[]).await;
    let kid = Sleeper::start();
    let child = delegation(&t)
        .await
        .delegate(req(child_request("c", vec![kid.selector()], &["db"])))
        .await
        .unwrap()
        .into_inner();
    let dir = t.stop().await;
    let t = start_in(dir, |_| {}).await;
    let got = t.lease(&child.lease_id).await;
    assert_eq!(got.state, "active");
    assert_eq!(got.chain[0].lease_id, root.lease_id);
    t.revoke(&root.lease_id, "after the restart").await;
    assert_eq!(t.lease(&child.lease_id).await.state, "parent_ended");
}

#[tokio::test]
async fn another_uid_cannot_use_a_child_bound_to_the_executor_s_process() {
    let t = start().await;
    grant_root(&t, "plan", 1, &[]).await;
    let kid = Sleeper::start();
    delegation(&t)
        .await
        .delegate(req(child_request("c", vec![kid.selector()], &["db"])))
        .await
        .unwrap();
    let socket = t.endpoint();
    let Some(out) = run_as(65534, &["svid", "fetch", "--socket", &socket]).await else {
        return;
    };
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no identity issued"),
        "{out:?}"
    );
    // Nor may it delegate from, list or end what it does not hold.
    let Some(out) = run_as(
        65534,
        &["delegate", "list", "--socket", t.socket.to_str().unwrap()],
    )
    .await
    else {
        return;
    };
    assert!(!out.status.success(), "{out:?}");
}

/// The runnable demo (`examples/planner-executor/`): a planner under `mayfly run` delegates to
/// two executors (py-spiffe clients) with different audiences, a tool server checks each
/// token's audience and chain with ValidateJWTSVID, and revoking the planner ends both.
#[tokio::test]
async fn the_planner_executor_example_runs() {
    let Some(python) =
        crate::python_clients::required("Python clients", crate::python_clients::python())
    else {
        return;
    };
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/planner-executor/run.sh");
    // Its own process group: should it hang, the whole demo (agent and tool server too) goes.
    let child = tokio::process::Command::new("bash")
        .arg(script)
        .env("MAYFLY", BIN)
        .env("PYTHON", python)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .env_remove("MAYFLY_ADMIN_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let group = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    let out = match tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            panic!("the demo did not finish within 120 s");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "executor search: no token for tool.db",
        "executor db: no token for tool.search",
        "executor search: search ok for spiffe://demo.example/agent/executor/task/search-1/delegator/user/alice, acting for spiffe://demo.example/agent/planner/task/plan-1/delegator/user/alice",
        "executor db: db ok for spiffe://demo.example/agent/executor/task/db-1/delegator/user/alice",
        "executor search: identity gone",
        "executor db: identity gone",
        "both executors' identities ended with the planner",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
}

#[tokio::test]
async fn mayfly_delegate_passes_the_exit_status_on_and_starts_nothing_it_cannot_cover() {
    let t = start().await;
    grant_root(&t, "plan", 1, &[]).await;
    let out = delegate_cmd(&t, "s", &["db"], &["sh", "-c", "exit 7"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    // A command that does not exist: 127, and no child lease.
    let out = delegate_cmd(&t, "m", &["db"], &["/nonexistent/command"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    // A delegation the rules refuse: 125, the rule named, the command never run.
    let marker = t.dir.path().join("ran");
    let out = tokio::process::Command::new(BIN)
        .args([
            "delegate",
            "--task-id",
            "w",
            "--agent",
            "executor",
            "--ttl",
            "5m",
        ])
        .args(["--audience", "db", "--max-delegation-depth", "3", "--"])
        .args(["touch", marker.to_str().unwrap()])
        .env("SPIFFE_ENDPOINT_SOCKET", t.endpoint())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_delegation_depth"),
        "{out:?}"
    );
    assert!(!marker.exists(), "the command ran without a lease");
    let children: Vec<pb::Lease> = t
        .all_leases()
        .await
        .into_iter()
        .filter(|l| !l.chain.is_empty())
        .collect();
    assert_eq!(children.len(), 1, "{children:?}");
    assert_eq!(children[0].state, "completed");
}

/// Review findings 1 and 2: an executor (bound to its own process) cannot act for the lease
/// of the planner that started it, `mayfly delegate` acting for its parent's lease cannot bind
/// a child to a process it did not start, and no child takes an identity a live lease holds.
#[tokio::test]
async fn acting_through_the_parent_process_is_held_to_what_that_process_started() {
    let t = start().await;
    let root = grant_root(&t, "plan", 2, &["db", "search"]).await;
    // An executor that holds its own child lease asks, from inside it, for the planner's
    // other audience: it holds only its own lease, which does not allow it.
    let script = format!(
        "{BIN} delegate --from {} --task-id wide --agent executor --ttl 1m --audience search -- true",
        root.spiffe_id
    );
    let out = delegate_cmd(&t, "exec", &["db"], &["sh", "-c", &script])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not hold"),
        "{out:?}"
    );
    assert_eq!(t.lease(&root.lease_id).await.state, "active");
    // `mayfly delegate` (acting for this process's lease) asked to bind the child to a process
    // it did not start, a sibling of its own: refused, and the command never runs.
    let kid = Sleeper::start();
    let marker = t.dir.path().join("sibling-ran");
    let out = tokio::process::Command::new(BIN)
        .args([
            "delegate",
            "--task-id",
            "other",
            "--agent",
            "executor",
            "--ttl",
            "1m",
        ])
        .args(["--audience", "db", "--selector", &kid.selector(), "--"])
        .args(["touch", marker.to_str().unwrap()])
        .env("SPIFFE_ENDPOINT_SOCKET", t.endpoint())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("processes it started"),
        "{out:?}"
    );
    assert!(!marker.exists());
    // An identity a live lease holds already: refused.
    let mut d = delegation(&t).await;
    let first = d
        .delegate(req(child_request("same", vec![kid.selector()], &["db"])))
        .await
        .unwrap()
        .into_inner();
    let err = d
        .delegate(req(child_request("same", vec![kid.selector()], &["db"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains(&first.lease_id), "{}", err.message());
}

/// A planner cannot delegate itself a remote admin caller's identity: with
/// `admin.allowed_spiffe_ids` naming `agent/orchestrator/*`, a child for agent "orchestrator"
/// is refused (and audited), so delegation never leads to the power to grant.
#[tokio::test]
async fn a_delegated_identity_is_never_one_the_remote_admin_api_admits() {
    let t = start_with(|f| {
        f.admin.allowed_spiffe_ids = Some(vec!["spiffe://example.org/agent/orchestrator/*".into()]);
    })
    .await;
    grant_root(&t, "plan", 1, &["db"]).await;
    let kid = Sleeper::start();
    let mut child = child_request("escalate", vec![kid.selector()], &["db"]);
    child.agent = "orchestrator".into();
    let err = delegation(&t).await.delegate(req(child)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("remote admin API"), "{err:?}");
    let refused = audit_events(&t.data_dir(), "delegation_refused");
    assert!(
        refused.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|w| w.contains("admin.allowed_spiffe_ids"))),
        "{refused:?}"
    );
    // Another agent name is delegated as usual.
    let ok = child_request("fine", vec![kid.selector()], &["db"]);
    delegation(&t).await.delegate(req(ok)).await.unwrap();
}
