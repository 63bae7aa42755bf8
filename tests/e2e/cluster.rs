//! Many nodes on one etcd: three agents on this machine share a real etcd server (Debian's
//! `etcd-server`, started per test on loopback ports with a temp data dir), each with its own
//! intermediate CA under one root, as cert-manager would issue them.

use std::time::Duration;

use crate::common::{self, eventually, my_uid, Pki, TestAgent};
use futures::StreamExt;
use mayfly::config::{FileConfig, StoreSection};
use mayfly::proto::admin as pb;

#[path = "../support/etcd.rs"]
mod etcd_server;
use etcd_server::Etcd;

/// A real etcd, or `None` (the test skips, saying why) outside CI.
fn etcd() -> Option<Etcd> {
    let bin = crate::python_clients::required("etcd", etcd_server::binary())?;
    Some(Etcd::start(&bin))
}

struct Cluster {
    etcd: Etcd,
    pki: Pki,
}

impl Cluster {
    fn new() -> Option<Cluster> {
        Some(Cluster {
            etcd: etcd()?,
            pki: Pki::new(),
        })
    }

    async fn agent(&self, node: &str) -> TestAgent {
        self.agent_in(node, common::shared_tempdir()).await
    }

    async fn agent_in(&self, node: &str, dir: tempfile::TempDir) -> TestAgent {
        self.agent_at(node, dir, &self.etcd.endpoint).await
    }

    /// An agent that reaches etcd at `endpoint` (a [`Relay`] to it, say).
    async fn agent_at(&self, node: &str, dir: tempfile::TempDir, endpoint: &str) -> TestAgent {
        let path = dir.path().to_path_buf();
        common::start_in(dir, |f| {
            f.node_name = Some(node.into());
            f.store = StoreSection {
                kind: Some("etcd".into()),
                endpoints: Some(vec![endpoint.into()]),
                request_timeout: Some("1s".into()),
                max_staleness: Some("2s".into()),
                ..Default::default()
            };
            self.pki.node_ca(node, &path, f);
        })
        .await
    }
}

/// A TCP relay to etcd for one agent, which can cut that agent (and only it) off: while cut,
/// no byte crosses either way and new connections hang, as across a network partition.
struct Relay {
    endpoint: String,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn to(upstream: &str) -> Relay {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let ((down_r, down_w), (up_r, up_w)) = (down.into_split(), up.into_split());
                tokio::spawn(Self::pipe(down_r, up_w, cut_rx.clone()));
                tokio::spawn(Self::pipe(up_r, down_w, cut_rx.clone()));
            }
        });
        Relay { endpoint, cut }
    }

    /// Copies one way, holding every byte while the link is cut.
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut cut: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if cut.wait_for(|cut| !cut).await.is_err() {
                return;
            }
            let n = tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => {
                        let _ = to.shutdown().await;
                        return;
                    }
                    Ok(n) => n,
                },
                _ = cut.changed() => continue,
            };
            // Bytes read as the cut came are held until it heals.
            if cut.wait_for(|cut| !cut).await.is_err() {
                return;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }

    fn heal(&self) {
        self.cut.send_replace(false);
    }
}

/// Waits until `agent` issues this process an X.509-SVID.
async fn serves(agent: &TestAgent) {
    eventually(Duration::from_secs(10), async || {
        agent
            .workload()
            .await
            .fetch_x509_svid()
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
}

/// Whether metrics say the agent is stale (`mayfly_store_stale 1`, the sample, not its help).
fn stale(metrics: &str) -> bool {
    metrics.lines().any(|l| l.trim() == "mayfly_store_stale 1")
}

/// A lease for this test process by its uid only: one any node serves.
fn mine() -> Vec<String> {
    vec![format!("unix:uid:{}", my_uid())]
}

/// Opens an X.509 stream on `agent` and waits for its first answer.
async fn open_stream(
    agent: &TestAgent,
) -> impl futures::Stream<
    Item = Result<spiffe::X509Context, spiffe::workload_api::error::WorkloadApiError>,
> {
    let client = agent.workload().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a first answer")
        .expect("a stream item");
    assert!(first.is_ok(), "{first:?}");
    stream
}

/// Waits until the stream ends or fails: the identity is gone.
async fn closed(
    stream: &mut (impl futures::Stream<
        Item = Result<spiffe::X509Context, spiffe::workload_api::error::WorkloadApiError>,
    > + Unpin),
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => panic!("the stream was not told within {within:?}"),
            Ok(None) | Ok(Some(Err(_))) => return,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_on_one_agent_is_served_by_another_and_revoke_and_renew_reach_every_node() {
    let Some(cluster) = Cluster::new() else {
        return;
    };
    let a = cluster.agent("node-a").await;
    let b = cluster.agent("node-b").await;
    let c = cluster.agent("node-c").await;
    let lease = a
        .admin()
        .await
        .grant(pb::GrantRequest {
            selectors: mine(),
            max_ttl: Some(mayfly::time::to_duration(Duration::from_secs(600))),
            ..common::grant_request("cluster", "user/alice", Duration::from_secs(120))
        })
        .await
        .unwrap()
        .into_inner();
    // Served by B: an SVID for the lease's SPIFFE ID, chaining to the one root.
    eventually(Duration::from_secs(5), async || {
        let svid = b
            .workload()
            .await
            .fetch_x509_svid()
            .await
            .map_err(|e| e.to_string())?;
        (svid.spiffe_id().to_string() == lease.spiffe_id)
            .then_some(())
            .ok_or_else(|| format!("B issued {}", svid.spiffe_id()))
    })
    .await;
    // Renewed on C, seen by A.
    let renewed = c
        .admin()
        .await
        .renew(pb::RenewRequest {
            lease_id: lease.lease_id.clone(),
            ttl: Some(mayfly::time::to_duration(Duration::from_secs(200))),
        })
        .await
        .unwrap()
        .into_inner();
    eventually(Duration::from_secs(5), async || {
        let seen = a.lease(&lease.lease_id).await;
        (seen.expires_at == renewed.expires_at)
            .then_some(())
            .ok_or_else(|| format!("A has expires_at {:?}", seen.expires_at))
    })
    .await;
    // Revoked on B: the streams open on A and C are told.
    let mut on_a = Box::pin(open_stream(&a).await);
    let mut on_c = Box::pin(open_stream(&c).await);
    b.revoke(&lease.lease_id, "task cancelled").await;
    closed(&mut on_a, Duration::from_secs(5)).await;
    closed(&mut on_c, Duration::from_secs(5)).await;
    for agent in [&a, &c] {
        agent
            .wait_state(&lease.lease_id, "revoked", Duration::from_secs(5))
            .await;
        let err = agent.workload().await.fetch_x509_svid().await.unwrap_err();
        assert!(err.to_string().contains("no identity"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_racing_to_end_one_lease_produce_one_end() {
    let Some(cluster) = Cluster::new() else {
        return;
    };
    let a = cluster.agent("node-a").await;
    let b = cluster.agent("node-b").await;
    for round in 0..5 {
        let lease = a
            .grant(
                &format!("race-{round}"),
                &mine(),
                Duration::from_secs(120),
                None,
            )
            .await;
        eventually(Duration::from_secs(5), async || {
            let l = b.lease(&lease.lease_id).await;
            (l.state == "active").then_some(()).ok_or(l.state)
        })
        .await;
        let revoke = |agent: &TestAgent, why: &'static str| {
            let id = lease.lease_id.clone();
            let socket = agent.admin_socket.clone();
            async move {
                let mut admin = mayfly::cli::connect::connect(&socket).await.unwrap();
                admin
                    .revoke(pb::RevokeRequest {
                        lease_id: id,
                        reason: why.into(),
                    })
                    .await
            }
        };
        let (ra, rb) = tokio::join!(revoke(&a, "by a"), revoke(&b, "by b"));
        assert!(ra.is_ok() || rb.is_ok(), "{ra:?} {rb:?}");
        // One end stands, the same on both nodes, audited once in all.
        eventually(Duration::from_secs(5), async || {
            let (la, lb) = (
                a.lease(&lease.lease_id).await,
                b.lease(&lease.lease_id).await,
            );
            (la.state == "revoked" && la.end_reason == lb.end_reason && la.ended_at == lb.ended_at)
                .then_some(())
                .ok_or_else(|| {
                    format!(
                        "A: {} {:?}; B: {} {:?}",
                        la.state, la.end_reason, lb.state, lb.end_reason
                    )
                })
        })
        .await;
        let ends = |agent: &TestAgent| {
            common::audit_records(&agent.data_dir())
                .iter()
                .filter(|r| {
                    r.get("event").and_then(|e| e.as_str()) == Some("lease_revoked")
                        && r.get("lease_id").and_then(|e| e.as_str()) == Some(&lease.lease_id)
                })
                .count()
        };
        eventually(Duration::from_secs(5), async || {
            let n = ends(&a) + ends(&b);
            (n == 1).then_some(()).ok_or(format!("{n} ends audited"))
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_restarted_during_changes_catches_up() {
    let Some(cluster) = Cluster::new() else {
        return;
    };
    let a = cluster.agent("node-a").await;
    let c = cluster.agent("node-c").await;
    let kept = a
        .grant("kept", &mine(), Duration::from_secs(120), None)
        .await;
    let doomed = a
        .grant("doomed", &mine(), Duration::from_secs(120), None)
        .await;
    c.wait_state(&doomed.lease_id, "active", Duration::from_secs(5))
        .await;
    let dir = c.stop().await;
    a.revoke(&doomed.lease_id, "while C was down").await;
    let late = a
        .grant("late", &mine(), Duration::from_secs(120), None)
        .await;
    let c = cluster.agent_in("node-c", dir).await;
    for (id, state) in [
        (&kept.lease_id, "active"),
        (&doomed.lease_id, "revoked"),
        (&late.lease_id, "active"),
    ] {
        c.wait_state(id, state, Duration::from_secs(5)).await;
    }
    // And it follows what happens next.
    a.revoke(&kept.lease_id, "after the restart").await;
    c.wait_state(&kept.lease_id, "revoked", Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_etcd_refuses_grants_then_ends_streams_then_recovers() {
    let Some(cluster) = Cluster::new() else {
        return;
    };
    let a = cluster.agent("node-a").await;
    let lease = a
        .grant("partition", &mine(), Duration::from_secs(120), None)
        .await;
    let mut stream = Box::pin(open_stream(&a).await);
    cluster.etcd.freeze();
    let refused = a
        .admin()
        .await
        .grant(pb::GrantRequest {
            selectors: mine(),
            ..common::grant_request("refused", "user/alice", Duration::from_secs(60))
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // Past max_staleness (2s) the agent cannot know of revocations: it ends its streams,
    // issues nothing, and says so in readiness and metrics.
    closed(&mut stream, Duration::from_secs(6)).await;
    let err = a.workload().await.fetch_x509_svid().await.unwrap_err();
    assert!(err.to_string().contains("max_staleness"), "{err}");
    let health = a.agent.as_ref().unwrap().health_addr.tcp().unwrap();
    let (code, body) = common::http_get(health, "/healthz/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("lease store"), "{body}");
    let metrics = a.metrics().await;
    assert!(stale(&metrics), "{metrics}");
    cluster.etcd.thaw();
    serves(&a).await;
    let (code, body) = common::http_get(health, "/healthz/ready").await;
    assert_eq!(code, 200, "{body}");
    assert!(!stale(&a.metrics().await));
    a.revoke(&lease.lease_id, "done").await;
}

#[test]
fn an_etcd_store_with_an_embedded_ca_is_refused() {
    let file = FileConfig {
        store: StoreSection {
            kind: Some("etcd".into()),
            endpoints: Some(vec!["http://127.0.0.1:2379".into()]),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = mayfly::config::Config::resolve(file, Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("one trust bundle"), "{err}");
}

/// The attack: a node cut off from etcd while a lease is revoked elsewhere must not serve
/// that lease when the link heals, not even for the moment its watch takes to catch up. It is
/// current again only once it has read every lease anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_etcd_never_serves_a_lease_revoked_meanwhile() {
    let Some(cluster) = Cluster::new() else {
        return;
    };
    let relay = Relay::to(&cluster.etcd.endpoint).await;
    let a = cluster
        .agent_at("node-a", common::shared_tempdir(), &relay.endpoint)
        .await;
    let b = cluster.agent("node-b").await;
    let lease = b
        .grant("cut-off", &mine(), Duration::from_secs(120), None)
        .await;
    serves(&a).await;
    relay.cut();
    eventually(Duration::from_secs(15), async || {
        let m = a.metrics().await;
        stale(&m).then_some(()).ok_or(m)
    })
    .await;
    b.revoke(&lease.lease_id, "revoked while node-a was cut off")
        .await;
    relay.heal();
    // From the moment the link heals until well after node-a is current again, it issues
    // nothing for the revoked lease.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut current_since = None;
    let mut tries = 0;
    loop {
        tries += 1;
        if let Ok(svid) = a.workload().await.fetch_x509_svid().await {
            panic!(
                "node-a issued {} for a lease revoked while it was cut off (try {tries})",
                svid.spiffe_id()
            );
        }
        if tries % 20 == 0 && !stale(&a.metrics().await) {
            let since = *current_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node-a never became current again"
        );
    }
    let on_a = a.lease(&lease.lease_id).await;
    assert_eq!(on_a.state, "revoked", "{on_a:?}");
}
