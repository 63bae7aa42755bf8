//! A flood of connections from one local user: it is capped, and it never cuts off the
//! admin socket, existing streams, or other users.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// The unprivileged user the flood comes from.
const NOBODY: u32 = 65534;

#[tokio::test]
async fn a_connection_that_never_finishes_its_preface_is_closed() {
    let t = start_with(|c| c.connections.handshake_timeout = Some("300ms".into())).await;
    // The agent runs on this test's runtime: the client must not block it.
    let mut half = tokio::net::UnixStream::connect(&t.socket).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 256];
        // The server may send its SETTINGS first; then it closes.
        loop {
            match half.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a half-open connection was kept for 10 s");
    // A client that speaks is not cut off.
    t.grant_me("ok", HOUR, None).await;
    let ctx = t.workload().await.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.svids().len(), 1);
}

/// Issue 14, hole 4, as the attack was run: thousands of half-open connections from `nobody`
/// took the agent to its descriptor limit; fetches failed, an open stream was killed and the
/// admin socket became unreachable. Here the agent runs with a descriptor limit of 400, and
/// `nobody` tries to open 600 connections.
#[tokio::test]
async fn a_flood_from_one_user_leaves_the_admin_socket_streams_and_other_users_working() {
    if my_uid() != 0 {
        eprintln!("skipped: the flood comes from another uid, and switching users needs root");
        return;
    }
    let dir = shared_tempdir();
    let paths = AgentPaths::in_dir(dir.path());
    let config = dir.path().join("mayfly.toml");
    std::fs::write(
        &config,
        "trust_domain = \"example.org\"\n[connections]\nmax_per_uid = 50\n",
    )
    .unwrap();
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=400:400", "--", BIN]);
    cmd.args(&paths.agent().get_args().collect::<Vec<_>>()[..])
        .arg("--config")
        .arg(&config)
        .args(["--health-addr", "127.0.0.1:0"]);
    let (_agent, mut admin) = paths.spawn(cmd).await;
    let grant = |task: &str| mayfly::proto::admin::GrantRequest {
        selectors: vec![format!("unix:uid:{}", my_uid())],
        ..grant_request(task, "user/alice", HOUR)
    };
    admin.grant(grant("before")).await.unwrap();
    let endpoint = format!("unix://{}", paths.socket.display());
    let streaming = spiffe::WorkloadApiClient::connect_to(endpoint.as_str())
        .await
        .unwrap();
    let mut updates = streaming.stream_x509_contexts().await.unwrap();
    use futures::StreamExt;
    assert_eq!(updates.next().await.unwrap().unwrap().svids().len(), 1);

    // nobody opens as many half-open connections as it can and holds them.
    let flood = format!(
        "import socket, time\n\
         held = []\n\
         for i in range(600):\n\
         \x20   s = socket.socket(socket.AF_UNIX)\n\
         \x20   try:\n\
         \x20       s.connect({:?})\n\
         \x20       s.send(b'PRI * HTTP/2.0\\r\\n')\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         \x20   held.append(s)\n\
         print('held', flush=True)\n\
         time.sleep(60)\n",
        paths.socket.display().to_string()
    );
    let mut flooder = tokio::process::Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
            // The system's Python: nobody may not reach a per-user one.
            "/usr/bin/python3",
            "-c",
            &flood,
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    tokio::io::BufReader::new(flooder.stdout.take().unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    assert_eq!(line.trim(), "held");

    // The admin socket answers, and a change reaches the open stream.
    admin.grant(grant("during")).await.unwrap();
    let ctx = tokio::time::timeout(Duration::from_secs(10), updates.next())
        .await
        .expect("the open stream still gets updates")
        .unwrap()
        .unwrap();
    assert_eq!(ctx.svids().len(), 2);
    // Another user (root here) still connects and fetches.
    let fresh = spiffe::WorkloadApiClient::connect_to(endpoint.as_str())
        .await
        .unwrap();
    assert_eq!(fresh.fetch_x509_context().await.unwrap().svids().len(), 2);
    drop(flooder);
}
