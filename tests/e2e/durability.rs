//! Leases and the audit log across restarts, crashes and tampering.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use mayfly::proto::admin as pb;

fn events(data_dir: &std::path::Path, lease_id: &str) -> Vec<String> {
    audit_records(data_dir)
        .into_iter()
        .filter(|r| r.get("lease_id").and_then(|v| v.as_str()) == Some(lease_id))
        .map(|r| r["event"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_restart_keeps_the_ca_and_active_leases_and_ends_expired_ones() {
    let t = start().await;
    let keep = t.grant_me("keep", HOUR, None).await;
    let brief = t.grant_me("brief", Duration::from_secs(2), None).await;
    let revoked = t.grant_me("revoked", HOUR, None).await;
    t.revoke(&revoked.lease_id, "key leaked").await;
    let before = t.workload().await.fetch_x509_context().await.unwrap();
    let bundle_before = bundle_roots(&before);

    // Down across the short lease's deadline: its timer never fires in this process.
    let dir = t.stop().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let t = start_in(dir, |_| {}).await;

    let kept = t.lease(&keep.lease_id).await;
    assert_eq!(kept.state, "active");
    let ended = t.lease(&brief.lease_id).await;
    assert_eq!(ended.state, "expired");
    assert_eq!(ended.end_reason, "expired while the agent was down");
    assert_eq!(kept.end_reason, "");
    // Why a lease ended is kept with it, across the restart.
    let revoked = t.lease(&revoked.lease_id).await;
    assert_eq!(revoked.state, "revoked");
    assert_eq!(revoked.end_reason, "key leaked");

    let after = t.workload().await.fetch_x509_context().await.unwrap();
    assert_eq!(bundle_roots(&after), bundle_before);
    let ids: Vec<String> = after
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert_eq!(ids, vec![keep.spiffe_id.clone()]);

    let ev = events(&t.data_dir(), &brief.lease_id);
    assert_eq!(ev.first().map(String::as_str), Some("lease_granted"));
    assert!(ev.contains(&"lease_expired".to_string()), "{ev:?}");
    mayfly::audit::verify(&t.data_dir().join("audit")).unwrap();
}

#[tokio::test]
async fn a_restart_ends_leases_whose_process_is_gone() {
    let t = start().await;
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let lease = t
        .grant("bound", &[format!("unix:pid:{}", child.id())], HOUR, None)
        .await;
    let dir = t.stop().await;
    child.kill().unwrap();
    child.wait().unwrap();
    let t = start_in(dir, |_| {}).await;
    let got = t.lease(&lease.lease_id).await;
    assert_eq!(got.state, "process_exited");
    assert_eq!(
        got.end_reason,
        format!(
            "bound process {} exited while the agent was down",
            child.id()
        )
    );
    assert!(events(&t.data_dir(), &lease.lease_id).contains(&"lease_process_exited".to_string()));
}

#[tokio::test]
async fn issuance_grants_and_ends_are_audited_and_the_chain_verifies() {
    let t = start().await;
    let lease = t.grant_me("audited", HOUR, None).await;
    let svid = t.workload().await.fetch_x509_svid().await.unwrap();
    let serial = serial(svid.leaf().as_bytes());
    t.revoke(&lease.lease_id, "done early").await;
    let _ = t.workload().await.fetch_x509_svid().await.unwrap_err();

    let records = audit_records(&t.data_dir());
    let issued = records
        .iter()
        .find(|r| r["event"] == "svid_issued")
        .expect("issuance audited");
    assert_eq!(issued["serial"].as_str().unwrap(), serial);
    assert_eq!(issued["lease_id"].as_str().unwrap(), lease.lease_id);
    assert_eq!(issued["task_id"], "audited");
    assert_eq!(issued["delegator"], "user/alice");
    assert_eq!(issued["pid"], std::process::id());
    assert_eq!(issued["uid"], my_uid());
    assert_eq!(issued["exe_sha256"].as_str().unwrap().len(), 64);
    let revoked = records
        .iter()
        .find(|r| r["event"] == "lease_revoked")
        .expect("revocation audited");
    assert_eq!(revoked["reason_for_change"], "done early");
    let denied = records
        .iter()
        .find(|r| r["event"] == "request_denied")
        .expect("denial audited");
    assert!(denied["selectors"].as_array().unwrap().len() > 2);
    mayfly::audit::verify(&t.data_dir().join("audit")).unwrap();
}

#[tokio::test]
async fn an_edited_or_deleted_audit_line_is_detected() {
    let t = start().await;
    for i in 0..3 {
        t.grant_me(&format!("t{i}"), HOUR, None).await;
    }
    t.workload().await.fetch_x509_svid().await.unwrap();
    let dir = t.stop().await;
    let data = dir.path().join("data");

    let verify = || mayfly(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    ok(verify());

    let segment = data.join("audit/audit-00000001.jsonl");
    let original = std::fs::read_to_string(&segment).unwrap();
    let edited = original.replacen("\"task_id\":\"t1\"", "\"task_id\":\"tX\"", 1);
    assert_ne!(edited, original);
    std::fs::write(&segment, &edited).unwrap();
    let bad = verify();
    assert!(!bad.status.success(), "an edited record went unnoticed");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("audit-00000001.jsonl:"));

    let mut lines: Vec<&str> = original.lines().collect();
    lines.remove(1);
    std::fs::write(&segment, lines.join("\n") + "\n").unwrap();
    let bad = verify();
    assert!(!bad.status.success(), "a deleted record went unnoticed");
}

/// The agent is killed with SIGKILL in the middle of a burst of grants and fetches. Every
/// serial a client received must be in the audit log afterwards, and the chain must verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_issuance_loses_no_audited_serial() {
    let dir = tempfile::tempdir().unwrap();
    let paths = AgentPaths::in_dir(dir.path());
    let AgentPaths {
        socket,
        admin_socket,
        data,
    } = &paths;
    let spawn_agent = || {
        let mut agent = paths.agent();
        agent
            .args(["--trust-domain", "example.org"])
            .args(["--health-addr", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        tokio::process::Command::from(agent)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut agent = spawn_agent();
    wait_for(socket);
    wait_for(admin_socket);

    let received = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (socket, admin_socket) = (socket.clone(), admin_socket.clone());
        let (received, errors, killed) = (received.clone(), errors.clone(), killed.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !killed.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let round = async {
                    let mut admin = mayfly::cli::connect::connect(&admin_socket)
                        .await
                        .map_err(|e| format!("admin connect: {e}"))?;
                    admin
                        .grant(pb::GrantRequest {
                            agent: "burst".into(),
                            ..grant_request(&format!("burst-{w}-{i}"), "user/alice", HOUR)
                        })
                        .await
                        .map_err(|e| format!("grant: {e}"))?;
                    let endpoint = format!("unix://{}", socket.display());
                    let client = spiffe::WorkloadApiClient::connect_to(endpoint)
                        .await
                        .map_err(|e| format!("workload connect: {e}"))?;
                    client
                        .fetch_x509_context()
                        .await
                        .map_err(|e| format!("fetch: {e}"))
                };
                match round.await {
                    Ok(ctx) => {
                        let mut got = received.lock().unwrap();
                        for s in ctx.svids() {
                            got.insert(serial(s.leaf().as_bytes()));
                        }
                    }
                    Err(e) => {
                        if !killed.load(std::sync::atomic::Ordering::Relaxed) {
                            errors.lock().unwrap().push(e);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    // Kill it mid-burst: once clients hold a good number of SVIDs (however slow the machine).
    eventually(Duration::from_secs(120), async || {
        if received.lock().unwrap().len() >= 20 {
            Ok(())
        } else {
            Err(format!(
                "the burst never got going: {:?}",
                errors.lock().unwrap()
            ))
        }
    })
    .await;
    agent.start_kill().unwrap(); // SIGKILL
    agent.wait().await.unwrap();
    killed.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let received = received.lock().unwrap().clone();
    assert!(received.len() >= 20);

    // Restart on the same data: the torn tail (if any) is dropped, the chain continues.
    let mut agent = spawn_agent();
    wait_for(socket);
    ok(mayfly_async(&["audit", "verify", "--data-dir", data.to_str().unwrap()]).await);
    let audited: HashSet<String> = audit_events(data, "svid_issued")
        .into_iter()
        .map(|r| r["serial"].as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<_> = received.difference(&audited).collect();
    assert!(
        missing.is_empty(),
        "serials handed out but not audited: {missing:?}"
    );
    agent.start_kill().unwrap();
}

#[tokio::test]
async fn when_the_audit_log_cannot_be_written_nothing_is_issued_or_granted() {
    // The second audit segment cannot be created (a directory is in its place), so the log
    // fails as soon as the first segment is full.
    let t = start_with(|f| f.audit.max_segment_bytes = Some(4096)).await;
    let blocker = t.data_dir().join("audit/audit-00000002.jsonl");
    std::fs::create_dir(&blocker).unwrap();
    let mut granted = 0;
    let refused = loop {
        let r = t
            .admin()
            .await
            .grant(grant_request(
                &format!("fill-{granted}"),
                "user/alice",
                HOUR,
            ))
            .await;
        match r {
            Ok(_) => granted += 1,
            Err(status) => break status,
        }
        assert!(granted < 100, "the audit log never filled up");
    };
    assert!(granted > 0);
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.message().contains("audit"), "{}", refused.message());

    // Leases granted before the failure match, but no SVID is handed out unaudited.
    let err = t.workload().await.fetch_x509_svid().await.unwrap_err();
    let text = format!("{err:?}");
    assert!(
        text.contains("Unavailable") && text.contains("audit"),
        "{text}"
    );
    mayfly::audit::verify(&t.data_dir().join("audit")).unwrap_err();
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let t = start().await;
    t.grant_me("streaming", HOUR, None).await;
    let client = t.workload().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    futures::StreamExt::next(&mut stream)
        .await
        .unwrap()
        .unwrap();
    let _dir = t.stop().await;
    let end = tokio::time::timeout(
        Duration::from_secs(5),
        futures::StreamExt::next(&mut stream),
    )
    .await
    .expect("stream told");
    let text = format!("{end:?}");
    assert!(text.contains("Unavailable"), "{text}");
}

#[tokio::test]
async fn ended_leases_are_compacted_after_their_retention() {
    let t = start_with(|f| f.leases.retention = Some("1s".into())).await;
    let lease = t.grant_me("short-lived-record", HOUR, None).await;
    let mut admin = t.admin().await;
    admin
        .complete(pb::CompleteRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(t.all_leases().await.len(), 1);
    eventually(Duration::from_secs(10), async || {
        match t.all_leases().await.len() {
            0 => Ok(()),
            _ => Err("never compacted".to_owned()),
        }
    })
    .await;
}

/// A small tmpfs mounted on a path, unmounted when dropped (the mount needs root).
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(path: &std::path::Path, size: &str) -> Result<SmallFs, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(SmallFs(path.to_owned()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes until the filesystem holding `path` has no room left.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let mut byte = [0u8; 1];
    while f.write_all(&byte).is_ok() {
        byte[0] ^= 1;
    }
    let _ = f.sync_all();
}

/// Issue 14, hole 1, as the attack was run: a lease revoked while the data dir's filesystem is
/// full came back, active, after the space returned and the agent restarted.
#[tokio::test]
async fn a_revocation_on_a_full_disk_is_durable_and_survives_a_restart() {
    if my_uid() != 0 {
        eprintln!("skipped: mounting a small filesystem for the data dir needs root");
        return;
    }
    let dir = shared_tempdir();
    let fs = match SmallFs::mount(&dir.path().join("data"), "8m") {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("skipped: cannot mount a tmpfs here ({e})");
            return;
        }
    };
    let t = start_in(dir, |_| {}).await;
    let doomed = t.grant_me("doomed", HOUR, None).await;
    let before = t.workload().await.fetch_x509_context().await.unwrap();
    assert_eq!(before.svids().len(), 1);

    let filler = t.data_dir().join("filler");
    fill(&filler);
    let revoked = t.revoke(&doomed.lease_id, "key leaked").await;
    assert_eq!(revoked.state, "revoked");
    assert!(
        revoked.end_durable,
        "the end is kept in the store's reserve even on a full disk"
    );
    let reserve = std::fs::read(t.data_dir().join("leases.ends")).unwrap();
    assert!(
        reserve.iter().any(|&b| b != 0),
        "the database could not commit, so the end went to the reserve"
    );
    assert!(t.workload().await.fetch_x509_context().await.is_err());

    let dir = t.stop().await;
    std::fs::remove_file(&filler).unwrap();
    let t = start_in(dir, |_| {}).await;
    let after = t.lease(&doomed.lease_id).await;
    assert_eq!(after.state, "revoked");
    assert_eq!(after.end_reason, "key leaked");
    assert!(after.end_durable);
    assert!(
        t.workload().await.fetch_x509_context().await.is_err(),
        "a revoked lease never issues again"
    );
    let ev = events(&t.data_dir(), &doomed.lease_id);
    assert!(
        ev.iter()
            .any(|e| e == "lease_revoked" || e == "lease_end_recovered"),
        "{ev:?}"
    );
    mayfly::audit::verify(&t.data_dir().join("audit")).unwrap();
    let dir = t.stop().await;
    drop(fs);
    drop(dir);
}

/// libfaketime, which shifts the wall clock a process reads through libc (Debian's
/// `faketime`, which `.ci/run` installs).
fn libfaketime() -> Option<&'static str> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

/// Issue 14, hole 10, as the attack was run: with the agent's wall clock stepped back an hour,
/// a short lease went on issuing long past its end. The step is made with libfaketime, which
/// moves the wall clock the agent reads (through libc) but not the boot clock it reads from
/// the kernel itself.
#[tokio::test]
async fn a_wall_clock_stepped_back_does_not_extend_a_lease() {
    let Some(lib) = libfaketime() else {
        if std::env::var_os("CI").is_some() {
            panic!("libfaketime is missing; .ci/run installs Debian's faketime");
        }
        eprintln!("skipped: libfaketime is not installed (apt-get install faketime)");
        return;
    };
    let dir = shared_tempdir();
    let clock = dir.path().join("faketime");
    std::fs::write(&clock, "+0\n").unwrap();
    let paths = AgentPaths::in_dir(dir.path());
    let mut agent = paths.agent();
    agent
        .args([
            "--trust-domain",
            "example.org",
            "--health-addr",
            "127.0.0.1:0",
        ])
        .env("LD_PRELOAD", lib)
        .env("FAKETIME_TIMESTAMP_FILE", &clock)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let (_agent, mut admin) = paths.spawn(agent).await;
    let lease = admin
        .grant(pb::GrantRequest {
            selectors: vec![
                format!("unix:uid:{}", my_uid()),
                format!("unix:pid:{}", std::process::id()),
            ],
            ..grant_request("brief", "user/alice", Duration::from_secs(3))
        })
        .await
        .unwrap()
        .into_inner();
    let endpoint = format!("unix://{}", paths.socket.display());
    let workload = spiffe::WorkloadApiClient::connect_to(endpoint.as_str())
        .await
        .unwrap();
    assert!(workload.fetch_x509_svid().await.is_ok());

    // The agent's wall clock goes back an hour; its lease has 3 s left in real time.
    std::fs::write(&clock, "-1h\n").unwrap();
    let witness = admin
        .grant(pb::GrantRequest {
            selectors: vec!["unix:uid:4242".into()],
            ..grant_request("witness", "user/alice", HOUR)
        })
        .await
        .unwrap()
        .into_inner();
    let behind = std::time::SystemTime::now()
        .duration_since(mayfly::time::from_timestamp(&witness.created_at.unwrap()).unwrap())
        .unwrap_or_default();
    assert!(
        behind > Duration::from_secs(3000),
        "the agent's clock did not move ({behind:?} behind)"
    );
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let err = workload.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "a lease past its end still issued: {err:?}"
    );
    let ended = admin
        .get(pb::GetRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.state, "expired");
}

/// The agent's start-up error on `dir`, which must refuse to start.
async fn refused_start(dir: tempfile::TempDir) -> (String, tempfile::TempDir) {
    let file = mayfly::config::FileConfig {
        trust_domain: Some("example.org".into()),
        ..Default::default()
    };
    let config = mayfly::config::Config::resolve(
        file,
        mayfly::config::Overrides {
            socket: Some(dir.path().join("workload.sock")),
            admin_socket: Some(dir.path().join("admin.sock")),
            data_dir: Some(dir.path().join("data")),
            health_addr: Some("127.0.0.1:0".into()),
            ..Default::default()
        },
    )
    .unwrap();
    match mayfly::agent::Agent::start(config).await {
        Ok(agent) => {
            agent.stop().await;
            panic!("the agent started");
        }
        Err(e) => (e.to_string(), dir),
    }
}

/// Issue 14, hole 9, as the attack was run: deleting the newest audit records together with
/// HEAD, or the whole audit directory, and restarting gave a clean-looking chain that verified.
#[tokio::test]
async fn a_deleted_audit_tail_or_log_refuses_start_until_an_operator_starts_a_new_chain() {
    let t = start().await;
    let l = t.grant_me("evidence", HOUR, None).await;
    t.revoke(&l.lease_id, "covering tracks").await;
    let data = t.data_dir();
    let dir = t.stop().await;

    // The tail (the revocation) and HEAD go.
    let audit = data.join("audit");
    let segment = audit.join("audit-00000001.jsonl");
    let text = std::fs::read_to_string(&segment).unwrap();
    let kept: Vec<&str> = text.lines().take(1).collect();
    std::fs::write(&segment, format!("{}\n", kept.join("\n"))).unwrap();
    std::fs::remove_file(audit.join("HEAD")).unwrap();
    let (err, dir) = refused_start(dir).await;
    assert!(err.contains("HEAD") && err.contains("new-chain"), "{err}");

    // The operator's deliberate way out, recorded in the new chain.
    let out = mayfly(&[
        "audit",
        "new-chain",
        "--data-dir",
        data.to_str().unwrap(),
        "--reason",
        "tail lost in an incident, see ticket 42",
    ]);
    let said = ok(out);
    assert!(said.contains("it ended at seq 1"), "{said}");
    let t = start_in(dir, |_| {}).await;
    let first = audit_records(&t.data_dir()).remove(0);
    assert_eq!(first["event"], "audit_chain_started");
    assert_eq!(first["reason"], "tail lost in an incident, see ticket 42");
    mayfly::audit::verify(&audit).unwrap();
    let dir = t.stop().await;

    // The whole audit directory goes (the old one and the new one).
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("audit")
        {
            std::fs::remove_dir_all(path).unwrap();
        }
    }
    let (err, dir) = refused_start(dir).await;
    assert!(
        err.contains("audit log") && err.contains("is gone"),
        "{err}"
    );
    drop(dir);
}

/// Issue 14, hole 9: a lease store that vanished beside an audit log with records was silently
/// recreated empty, forgetting every lease (and every revocation).
#[tokio::test]
async fn a_vanished_lease_store_beside_the_audit_log_refuses_start() {
    let t = start().await;
    t.grant_me("kept", HOUR, None).await;
    let data = t.data_dir();
    let dir = t.stop().await;
    std::fs::remove_file(data.join("leases.redb")).unwrap();
    let (err, _dir) = refused_start(dir).await;
    assert!(
        err.contains("the lease store") && err.contains("is gone"),
        "{err}"
    );
}
