//! The health, readiness and metrics endpoints, and `mayfly healthcheck`.

use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn live_ready_and_metrics() {
    let t = start().await;
    let addr = t.agent.as_ref().unwrap().health_addr.tcp().unwrap();
    assert_eq!(http_get(addr, "/healthz/live").await.0, 200);
    let (code, body) = http_get(addr, "/healthz/ready").await;
    assert_eq!((code, body.trim()), (200, "ready"));

    let lease = t.grant_me("metered", Duration::from_secs(600), None).await;
    t.workload().await.fetch_x509_svid().await.unwrap();
    let _ = t
        .workload()
        .await
        .fetch_jwt_token(["svc"], None)
        .await
        .unwrap();
    t.revoke(&lease.lease_id, "").await;
    let (code, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for needle in [
        "mayfly_leases{state=\"active\"} 0",
        "mayfly_lease_ends_total{state=\"revoked\"} 1",
        "mayfly_svids_issued_total{kind=\"x509\"} 1",
        "mayfly_svids_issued_total{kind=\"jwt\"} 1",
        "mayfly_svid_issuance_seconds_count{kind=\"x509\"} 1",
        "mayfly_attestations_total{result=\"ok\"}",
        "mayfly_open_streams",
        "mayfly_teardown_seconds_count",
        "mayfly_audit_write_seconds_count",
        "mayfly_ca_not_after_timestamp_seconds",
        "mayfly_svid_not_after_timestamp_seconds",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}

#[tokio::test]
async fn healthcheck_command() {
    let t = start().await;
    let addr = t.agent.as_ref().unwrap().health_addr.to_string();
    ok(mayfly_async(&["healthcheck", "--health-addr", &addr]).await);
    // Nothing listening: the probe fails.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = free.local_addr().unwrap().to_string();
    drop(free);
    let bad = mayfly_async(&["healthcheck", "--health-addr", &dead]).await;
    assert!(!bad.status.success());
}

/// The `mayfly_open_streams` gauge, read from `/metrics`.
async fn open_streams(addr: std::net::SocketAddr) -> u64 {
    let (_, metrics) = http_get(addr, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("mayfly_open_streams "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no mayfly_open_streams in\n{metrics}"))
}

/// Waits (bounded) until the gauge shows `want`.
async fn open_streams_become(addr: std::net::SocketAddr, want: u64) {
    eventually(Duration::from_secs(10), async || {
        match open_streams(addr).await {
            now if now == want => Ok(()),
            now => Err(format!("open streams stayed at {now}, expected {want}")),
        }
    })
    .await
}

#[tokio::test]
async fn a_stream_the_caller_drops_is_released() {
    use futures::StreamExt;
    let t = start().await;
    let addr = t.agent.as_ref().unwrap().health_addr.tcp().unwrap();
    let mine = [format!("unix:uid:{}", my_uid())];
    t.grant("dropped", &mine, Duration::from_secs(600), None)
        .await;
    let x509 = t.workload().await;
    let mut svids = x509.stream_x509_svids().await.unwrap();
    svids.next().await.unwrap().unwrap();
    // A workload in another process, which will die without a word.
    let mut watch = tokio::process::Command::new(BIN)
        .args(["svid", "watch", "--socket"])
        .arg(&t.socket)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = tokio::io::BufReader::new(watch.stdout.take().unwrap());
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut first)
        .await
        .unwrap();
    assert!(first.contains("/task/dropped/"), "{first}");
    open_streams_become(addr, 2).await;
    // Cancelled by its caller, on a connection that stays open.
    drop(svids);
    open_streams_become(addr, 1).await;
    // Its process killed: the kernel closes the connection, nobody cancels the stream.
    watch.start_kill().unwrap();
    watch.wait().await.unwrap();
    open_streams_become(addr, 0).await;
    drop(x509);
}
