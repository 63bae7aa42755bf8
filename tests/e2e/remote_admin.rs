//! The admin API over TCP with mutual TLS: an orchestrator holding an X.509-SVID from the agent
//! itself grants with it; no certificate, an untrusted one, and one whose SPIFFE ID the
//! allowlist or a policy rejects are refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mayfly::proto::admin as pb;
use mayfly::proto::admin::tasks_client::TasksClient;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tonic::transport::{Channel, Endpoint};

use crate::common::{self, TestAgent};
use crate::mtls::SpiffeVerifier;

const ORCHESTRATORS: &str = "spiffe://example.org/agent/orchestrator/*";

/// An agent serving the remote admin API on a loopback port, admitting orchestrators by SPIFFE
/// ID, with a policy that refuses one task's orchestrator.
async fn agent() -> TestAgent {
    agent_with(|_| {}).await
}

async fn agent_with(edit: impl FnOnce(&mut mayfly::config::FileConfig)) -> TestAgent {
    let policies = common::shared_tempdir();
    let extra = policies.path().join("remote.cedar");
    std::fs::write(
        &extra,
        r#"@id("no-denied-orchestrator")
forbid (principal is Mayfly::Client, action == Mayfly::Action::"grant", resource)
when { principal.spiffe_id like "*/task/denied/*" };
"#,
    )
    .unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let t = common::start_with(|f| {
        f.admin_addr = Some("127.0.0.1:0".into());
        f.node_name = Some("node-a".into());
        f.admin.allowed_spiffe_ids = Some(vec![ORCHESTRATORS.into()]);
        f.policy.files = Some(vec![root.join("default.cedar"), extra]);
        edit(f);
    })
    .await;
    std::mem::forget(policies);
    t
}

fn addr(t: &TestAgent) -> SocketAddr {
    t.agent
        .as_ref()
        .unwrap()
        .admin_addr
        .expect("admin_addr bound")
}

/// An X.509-SVID of this process from the agent's Workload API, for a lease granted to agent
/// `agent` for task `task`: what an orchestrator would use.
async fn svid(
    t: &TestAgent,
    agent: &str,
    task: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    svid_lasting(t, agent, task, None).await
}

/// [`svid`], with SVIDs that live `svid_ttl`.
async fn svid_lasting(
    t: &TestAgent,
    agent: &str,
    task: &str,
    svid_ttl: Option<Duration>,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let lease = t
        .admin()
        .await
        .grant(pb::GrantRequest {
            agent: agent.into(),
            svid_ttl: svid_ttl.map(mayfly::time::to_duration),
            ..common::grant_request(task, "user/alice", Duration::from_secs(300))
        })
        .await
        .unwrap()
        .into_inner();
    let ctx = t.workload().await.fetch_x509_context().await.unwrap();
    let svid = ctx
        .svids()
        .iter()
        .find(|s| s.spiffe_id().to_string() == lease.spiffe_id)
        .expect("the lease's SVID");
    let chain = common::ders(svid.cert_chain());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    (chain, key)
}

/// A client verifying the agent as SPIFFE peers do (its chain to the bundle, its SPIFFE ID),
/// presenting `cert` if given.
async fn client(
    t: &TestAgent,
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<TasksClient<Channel>, String> {
    let roots = common::bundle_roots(&t.workload().await.fetch_x509_context().await.unwrap());
    let verifier = SpiffeVerifier::new(roots, "spiffe://example.org/mayfly/agent/node-a");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target = addr(t);
    let channel = Endpoint::from_shared(format!("http://{target}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(target).await?;
                let name = ServerName::try_from("mayfly").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(TasksClient::new(channel))
}

fn grant(task: &str) -> pb::GrantRequest {
    pb::GrantRequest {
        selectors: vec!["unix:uid:4242".into()],
        ..common::grant_request(task, "orchestrator/ci", Duration::from_secs(60))
    }
}

#[tokio::test]
async fn an_orchestrator_grants_with_its_svid_and_is_the_grantor() {
    let t = agent().await;
    let cert = svid(&t, "orchestrator", "orchestrate").await;
    let orchestrator_id = spiffe::cert::spiffe_id_from_der(cert.0[0].as_ref())
        .unwrap()
        .to_string();
    let mut admin = client(&t, Some(cert)).await.unwrap();
    let lease = admin.grant(grant("remote-1")).await.unwrap().into_inner();
    let by = lease.granted_by.unwrap();
    assert_eq!(by.spiffe_id, orchestrator_id);
    assert_eq!(by.uid, u32::MAX);
    // The same lease on the admin socket, with its remote grantor recorded.
    let local = t.lease(&lease.lease_id).await;
    assert_eq!(local.granted_by.unwrap().spiffe_id, orchestrator_id);
    let granted = common::audit_events(&t.data_dir(), "lease_granted");
    let record = granted
        .iter()
        .find(|r| r["lease_id"] == lease.lease_id.as_str())
        .unwrap();
    assert_eq!(record["granted_by"]["spiffe_id"], orchestrator_id.as_str());
    // And it ends it again.
    admin
        .revoke(pb::RevokeRequest {
            lease_id: lease.lease_id.clone(),
            reason: "done".into(),
        })
        .await
        .unwrap();
    t.wait_state(&lease.lease_id, "revoked", Duration::from_secs(5))
        .await;
}

#[tokio::test]
async fn callers_without_a_trusted_allowed_certificate_are_refused() {
    let t = agent().await;
    // (This process holds an SVID whose SPIFFE ID the allowlist does not name.)
    let other = svid(&t, "reporter", "report").await;
    // No client certificate: the handshake fails.
    let refused = match client(&t, None).await {
        Err(e) => e,
        Ok(mut admin) => format!("{:?}", admin.grant(grant("no-cert")).await.unwrap_err()),
    };
    assert!(!refused.is_empty());
    // A certificate from a CA the agent does not trust, naming an allowed SPIFFE ID.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/agent/orchestrator/task/x/delegator/user/alice"
            .try_into()
            .unwrap(),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let forged = params.self_signed(&key).unwrap();
    let forged = (
        vec![forged.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    );
    let refused = match client(&t, Some(forged)).await {
        Err(e) => e,
        Ok(mut admin) => format!("{:?}", admin.grant(grant("forged")).await.unwrap_err()),
    };
    assert!(!refused.contains("lease_id"), "{refused}");
    // A trusted SVID whose SPIFFE ID the allowlist does not name.
    let mut admin = client(&t, Some(other)).await.unwrap();
    let err = admin.grant(grant("other")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not allowed"), "{err:?}");
    let denied = common::audit_events(&t.data_dir(), "admin_denied");
    assert!(
        denied.iter().any(|r| r["spiffe_id"]
            .as_str()
            .is_some_and(|id| id.contains("/agent/reporter/"))),
        "{denied:?}"
    );
    // An allowed SPIFFE ID a policy refuses.
    let denied = svid(&t, "orchestrator", "denied").await;
    let mut admin = client(&t, Some(denied)).await.unwrap();
    let err = admin.grant(grant("by-policy")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("no-denied-orchestrator"), "{err:?}");
    // None of them granted anything.
    assert!(t
        .all_leases()
        .await
        .iter()
        .all(|l| l.selectors != vec!["unix:uid:4242".to_string()]));
}

/// PEM of DER blocks with one tag.
fn pem_of(tag: &str, ders: &[&[u8]]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new(tag, d.to_vec())))
        .collect()
}

#[tokio::test]
async fn the_cli_grants_remotely_with_its_own_svid_or_with_certificate_files() {
    let t = agent().await;
    // The CLI is another process: it holds an orchestrator SVID by this user's uid.
    t.admin()
        .await
        .grant(pb::GrantRequest {
            agent: "orchestrator".into(),
            selectors: vec![format!("unix:uid:{}", common::my_uid())],
            ..common::grant_request("cli", "user/alice", Duration::from_secs(300))
        })
        .await
        .unwrap();
    let server = format!("https://{}", addr(&t));
    let socket = t.socket.display().to_string();
    let grant_args = |task: &'static str| {
        vec![
            "task",
            "grant",
            "--server",
            server.as_str(),
            "--task-id",
            task,
            "--delegator",
            "orchestrator/ci",
            "--agent",
            "worker",
            "--ttl",
            "1m",
            "--selector",
            "unix:uid:4243",
            "--output",
            "json",
        ]
    };
    let mut args = grant_args("by-svid");
    args.extend(["--svid-from-socket", "--workload-socket", socket.as_str()]);
    let lease = common::json(common::mayfly_async(&args).await);
    let by = lease["granted_by"]["spiffe_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(by.contains("/agent/orchestrator/task/cli/"), "{lease}");

    // Certificate files: an SVID and the bundle written out, as an operator would have them.
    let (chain, key) = svid(&t, "orchestrator", "files").await;
    let roots = common::bundle_roots(&t.workload().await.fetch_x509_context().await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let cert = write(
        "cert.pem",
        pem_of(
            "CERTIFICATE",
            &chain.iter().map(|c| c.as_ref()).collect::<Vec<_>>(),
        ),
    );
    let key = write("key.pem", pem_of("PRIVATE KEY", &[key.secret_der()]));
    let ca = write(
        "ca.pem",
        pem_of(
            "CERTIFICATE",
            &roots.iter().map(|c| c.as_ref()).collect::<Vec<_>>(),
        ),
    );
    let mut args = grant_args("by-files");
    args.extend([
        "--cert",
        cert.as_str(),
        "--key",
        key.as_str(),
        "--ca",
        ca.as_str(),
    ]);
    let lease = common::json(common::mayfly_async(&args).await);
    assert!(
        lease["granted_by"]["spiffe_id"]
            .as_str()
            .unwrap()
            .contains("/task/files/"),
        "{lease}"
    );
    // The wrong server identity is refused before anything is sent.
    args.extend(["--server-id", "spiffe://example.org/someone-else"]);
    let out = common::mayfly_async(&args).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("remote admin API"), "{err}");
    // Without a way to authenticate, the CLI says what it needs.
    let out = common::mayfly_async(&grant_args("none")).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--svid-from-socket"), "{err}");
}

#[tokio::test]
async fn a_certificate_from_an_operator_ca_is_admitted_by_its_common_name() {
    // An operator CA the agent is told to trust for clients, and a certificate it issued to a
    // deployer, with no SPIFFE ID.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "operator CA");
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issue = |cn: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p
            .signed_by(&key, &rcgen::Issuer::from_params(&ca, &ca_key))
            .unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("operator-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let t = agent_with(|f| {
        f.admin.allowed_cert_names = Some(vec!["deployer".into()]);
        f.admin.client_ca_files = Some(vec![ca_file.clone()]);
    })
    .await;
    // (This process holds an SVID, so that the test can fetch the agent's bundle.)
    let orchestrator = svid(&t, "orchestrator", "bundle").await;
    let mut admin = client(&t, Some(issue("deployer"))).await.unwrap();
    let lease = admin.grant(grant("deploy")).await.unwrap().into_inner();
    assert_eq!(lease.granted_by.unwrap().spiffe_id, "cn:deployer");
    // Another name from the same CA is not on the allowlist.
    let mut admin = client(&t, Some(issue("intern"))).await.unwrap();
    let err = admin.grant(grant("intern")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // With client_ca_files set, only those roots are trusted: the agent's own SVIDs are not.
    let refused = match client(&t, Some(orchestrator)).await {
        Err(e) => e,
        Ok(mut admin) => format!("{:?}", admin.grant(grant("svid")).await.unwrap_err()),
    };
    assert!(
        !refused.contains("PermissionDenied"),
        "refused at the handshake: {refused}"
    );
}

/// An orchestrator with a fresh SVID for `task` is served.
async fn orchestrator_gets_in(t: &TestAgent, task: &str) {
    let orchestrator = svid(t, "orchestrator", task).await;
    client(t, Some(orchestrator))
        .await
        .unwrap()
        .list(pb::ListRequest::default())
        .await
        .unwrap();
}

fn dup(
    cert: &(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (cert.0.clone(), cert.1.clone_key())
}

/// The attack: a workload whose SVID the default roots accept, though the allowlist does not
/// name it, opens connections until none are left for orchestrators. It gets its share, and
/// no more; orchestrators still get in.
#[tokio::test]
async fn one_caller_holds_only_its_share_of_connections() {
    use mayfly::server::remote_admin::MAX_CONNECTIONS_PER_CALLER;
    let t = agent().await;
    let stranger = svid(&t, "reporter", "flood").await;
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_CALLER {
        let mut admin = client(&t, Some(dup(&stranger))).await.unwrap();
        let err = admin.list(pb::ListRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        held.push(admin);
    }
    // One more from the same caller is closed as it opens.
    let refused = match client(&t, Some(dup(&stranger))).await {
        Err(e) => e,
        Ok(mut admin) => {
            let err = admin.list(pb::ListRequest::default()).await.unwrap_err();
            assert_ne!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
            format!("{err:?}")
        }
    };
    assert!(!refused.is_empty());
    // An orchestrator still gets in.
    orchestrator_gets_in(&t, "still-in").await;
    // A connection the caller closes is one it may open again.
    held.pop();
    common::eventually(Duration::from_secs(5), async || {
        let mut admin = client(&t, Some(dup(&stranger))).await?;
        match admin.list(pb::ListRequest::default()).await {
            Err(e) if e.code() == tonic::Code::PermissionDenied => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// A connection is as good as the certificate that opened it: when that expires, so does the
/// connection, though the client keeps it open.
#[tokio::test]
async fn a_connection_ends_with_the_certificate_that_opened_it() {
    let t = agent().await;
    let cert = svid_lasting(&t, "orchestrator", "brief", Some(Duration::from_secs(5))).await;
    let not_after = {
        let (_, leaf) = x509_parser::parse_x509_certificate(cert.0[0].as_ref()).unwrap();
        std::time::UNIX_EPOCH + Duration::from_secs(leaf.validity().not_after.timestamp() as u64)
    };
    let mut admin = client(&t, Some(cert)).await.unwrap();
    admin.list(pb::ListRequest::default()).await.unwrap();
    let left = not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_secs(1)).await;
    let err = admin.list(pb::ListRequest::default()).await.unwrap_err();
    assert_ne!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}

/// An admin request is small: one far larger is refused before it is judged.
#[tokio::test]
async fn an_oversized_request_is_refused() {
    let t = agent().await;
    let cert = svid(&t, "orchestrator", "big").await;
    let mut admin = client(&t, Some(cert)).await.unwrap();
    let err = admin
        .grant(pb::GrantRequest {
            reason: "x".repeat(1 << 20),
            ..grant("oversized")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(t
        .all_leases()
        .await
        .iter()
        .all(|l| l.selectors != vec!["unix:uid:4242".to_string()]));
}

/// The attack: one host opens connections and never finishes their handshakes, to hold every
/// connection the listener has. It gets its share, and no more; another host still gets in.
#[tokio::test]
async fn one_address_holds_only_its_share_of_connections() {
    use mayfly::server::remote_admin::MAX_CONNECTIONS_PER_ADDRESS;
    use tokio::io::AsyncReadExt;
    let t = agent().await;
    let target = addr(&t);
    let from = |ip: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind((std::net::Ipv4Addr::from(ip), 0).into())
            .unwrap();
        socket.connect(target).await.unwrap()
    };
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_ADDRESS {
        held.push(from([127, 0, 0, 2]).await);
    }
    // One more from that address is closed at once, before any handshake.
    let mut extra = from([127, 0, 0, 2]).await;
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
        .await
        .expect("closed, not left waiting");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // An orchestrator on another address still gets in.
    orchestrator_gets_in(&t, "other-host").await;
    drop(held);
}
