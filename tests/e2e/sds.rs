//! Envoy SDS v3 on the workload socket, through real sockets with a tonic client on Envoy's own
//! protobuf types (`envoy-types`): every resource name, ACK, NACK and stale nonces, rotation,
//! withdrawal on revoke, one revoke ending SDS and Workload API streams together, and
//! `DeltaSecrets`. Real Envoys are in `envoy.rs`.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{node::UserAgentVersionType, BuildVersion, Node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate,
};
use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Struct;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures::StreamExt;
use prost::{Message, Name};
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::common::*;
use mayfly::proto::admin as pb;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const WAIT: Duration = Duration::from_secs(10);

async fn client(t: &TestAgent) -> SecretDiscoveryServiceClient<Channel> {
    SecretDiscoveryServiceClient::new(mayfly::cli::connect::unix_channel(&t.socket).await.unwrap())
}

/// A node that says it is Envoy `major.minor`.
fn envoy_node(major: u32, minor: u32) -> Node {
    Node {
        id: "test-envoy".into(),
        cluster: "test".into(),
        user_agent_name: "envoy".into(),
        user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
            version: Some(SemanticVersion {
                major_number: major,
                minor_number: minor,
                patch: 0,
            }),
            metadata: None,
        })),
        ..Node::default()
    }
}

fn request(names: &[&str], nonce: &str, version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        version_info: version.into(),
        type_url: SECRET_TYPE.into(),
        ..DiscoveryRequest::default()
    }
}

/// One `StreamSecrets` stream, as Envoy drives it.
struct SdsStream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl SdsStream {
    async fn open(t: &TestAgent) -> Result<SdsStream, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let rx = client(t)
            .await
            .stream_secrets(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(SdsStream { tx, rx })
    }

    /// Opens a stream and asks for `names` as a first request from Envoy 1.40.
    async fn ask(t: &TestAgent, names: &[&str]) -> SdsStream {
        let s = SdsStream::open(t).await.unwrap();
        let mut first = request(names, "", "");
        first.node = Some(envoy_node(1, 40));
        s.send(first).await;
        s
    }

    async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// The next response (failing the test on a status or after `WAIT`).
    async fn next(&mut self) -> DiscoveryResponse {
        match tokio::time::timeout(WAIT, self.rx.next()).await {
            Ok(Some(Ok(r))) => r,
            other => panic!("expected an SDS response, got {other:?}"),
        }
    }

    /// The status that ends the stream.
    async fn end(&mut self) -> tonic::Status {
        loop {
            match tokio::time::timeout(WAIT, self.rx.next()).await {
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(s))) => return s,
                other => panic!("expected the stream to end with a status, got {other:?}"),
            }
        }
    }

    /// ACKs `r`.
    async fn ack(&self, names: &[&str], r: &DiscoveryResponse) {
        self.send(request(names, &r.nonce, &r.version_info)).await;
    }
}

fn secrets(r: &DiscoveryResponse) -> Vec<Secret> {
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    secrets(r).into_iter().map(|s| s.name).collect()
}

fn tls(s: &Secret) -> &TlsCertificate {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(c)) => c,
        other => panic!("{} is not a TLS certificate: {other:?}", s.name),
    }
}

fn validation(s: &Secret) -> &CertificateValidationContext {
    match &s.r#type {
        Some(secret::Type::ValidationContext(c)) => c,
        other => panic!("{} is not a validation context: {other:?}", s.name),
    }
}

fn inline(d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> Vec<u8> {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        other => panic!("not inline bytes: {other:?}"),
    }
}

fn pem_ders(pem_bytes: &[u8], tag: &str) -> Vec<Vec<u8>> {
    pem::parse_many(pem_bytes)
        .unwrap()
        .into_iter()
        .map(|p| {
            assert_eq!(p.tag(), tag);
            p.into_contents()
        })
        .collect()
}

/// The SPIFFE validator's trust domains (name, roots DER) in a validation context.
fn spiffe_trust_domains(v: &CertificateValidationContext) -> Vec<(String, Vec<Vec<u8>>)> {
    let custom = v
        .custom_validator_config
        .as_ref()
        .expect("the SPIFFE validator");
    assert_eq!(custom.name, "envoy.tls.cert_validator.spiffe");
    let any = custom.typed_config.as_ref().unwrap();
    assert_eq!(any.type_url, SpiffeCertValidatorConfig::type_url());
    let config = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
    config
        .trust_domains
        .iter()
        .map(|td| {
            (
                td.name.clone(),
                pem_ders(&inline(&td.trust_bundle), "CERTIFICATE"),
            )
        })
        .collect()
}

/// Checks a `TlsCertificate` secret: a chain (leaf first, for `spiffe_id`) that verifies to
/// `roots`, and a PKCS#8 key that belongs to the leaf. Returns the leaf's serial.
fn check_certificate(s: &Secret, spiffe_id: &str, roots: &[Vec<u8>]) -> String {
    let c = tls(s);
    let chain = pem_ders(&inline(&c.certificate_chain), "CERTIFICATE");
    let keys = pem_ders(&inline(&c.private_key), "PRIVATE KEY");
    assert_eq!(keys.len(), 1);
    let svid = spiffe::X509Svid::parse_from_der(&chain.concat(), &keys[0]).unwrap();
    assert_eq!(svid.spiffe_id().to_string(), spiffe_id);
    let chain: Vec<CertificateDer> = chain
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let roots: Vec<CertificateDer> = roots
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    verify_chain(&chain, &roots).unwrap();
    serial(&chain[0])
}

/// The own bundle, as served under `ROOTCA` to an Envoy with the SPIFFE validator.
async fn rootca(t: &TestAgent) -> Vec<Vec<u8>> {
    let mut s = SdsStream::ask(t, &["ROOTCA"]).await;
    let r = s.next().await;
    let tds = spiffe_trust_domains(validation(&secrets(&r)[0]));
    assert_eq!(tds.len(), 1);
    assert_eq!(tds[0].0, "example.org", "the name without the scheme");
    tds[0].1.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn default_and_rootca_give_a_certificate_that_verifies_against_the_bundle() {
    let t = start().await;
    let lease = t.grant_me("sds-default", HOUR, None).await;
    let roots = rootca(&t).await;
    let mut s = SdsStream::ask(&t, &["default", "ROOTCA"]).await;
    let r = s.next().await;
    assert_eq!(r.type_url, SECRET_TYPE);
    assert_eq!(r.version_info, "1");
    assert!(!r.nonce.is_empty());
    // Bundles first, as SPIRE orders them.
    assert_eq!(names(&r), ["ROOTCA", "default"]);
    let all = secrets(&r);
    check_certificate(&all[1], &lease.spiffe_id, &roots);
    assert_eq!(spiffe_trust_domains(validation(&all[0]))[0].1, roots);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_resource_name_gives_what_spire_gives() {
    let t = start().await;
    let lease = t.grant_me("sds-names", HOUR, None).await;
    let roots = rootca(&t).await;

    // The SPIFFE ID itself, and the trust domain's ID.
    let mut s = SdsStream::ask(&t, &[&lease.spiffe_id, "spiffe://example.org"]).await;
    let r = s.next().await;
    assert_eq!(
        names(&r),
        ["spiffe://example.org", lease.spiffe_id.as_str()]
    );
    check_certificate(&secrets(&r)[1], &lease.spiffe_id, &roots);

    // ALL: every bundle, sorted by trust domain.
    let mut s = SdsStream::ask(&t, &["ALL"]).await;
    let r = s.next().await;
    let tds = spiffe_trust_domains(validation(&secrets(&r)[0]));
    assert_eq!(tds, [("example.org".to_string(), roots.clone())]);

    // No names: everything the caller may have, each under its own ID.
    let mut s = SdsStream::ask(&t, &[]).await;
    let r = s.next().await;
    assert_eq!(
        names(&r),
        ["spiffe://example.org", lease.spiffe_id.as_str()]
    );

    // A name the caller does not hold ends the stream with InvalidArgument.
    let mut s = SdsStream::ask(&t, &["default", "spiffe://example.org/someone/else"]).await;
    let refused = s.end().await;
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("someone/else"), "{refused:?}");

    // Istio 1.21+ also asks for the files it reads itself: left unanswered, the stream goes on.
    let mut s = SdsStream::ask(
        &t,
        &["file-root:system", "ROOTCA", "file-cert:/a.crt~/a.key"],
    )
    .await;
    let r = s.next().await;
    assert_eq!(names(&r), ["ROOTCA"]);
    s.ack(&["file-root:system", "ROOTCA", "default"], &r).await;
    assert_eq!(names(&s.next().await), ["ROOTCA", "default"]);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn old_envoys_and_nodes_that_turn_the_validator_off_get_trusted_ca() {
    let t = start().await;
    t.grant_me("sds-trusted-ca", HOUR, None).await;
    let roots = rootca(&t).await;
    let trusted_ca = |r: &DiscoveryResponse| {
        let v = validation(&secrets(r)[0]).clone();
        assert!(v.custom_validator_config.is_none());
        pem_ders(&inline(&v.trusted_ca), "CERTIFICATE")
    };
    for node in [
        Some(envoy_node(1, 17)),
        None,
        Some(Node {
            metadata: Some(Struct {
                fields: [(
                    "disable_spiffe_cert_validation".to_string(),
                    envoy_types::pb::google::protobuf::Value {
                        kind: Some(envoy_types::pb::google::protobuf::value::Kind::BoolValue(
                            true,
                        )),
                    },
                )]
                .into(),
            }),
            ..envoy_node(1, 40)
        }),
    ] {
        let mut s = SdsStream::open(&t).await.unwrap();
        let mut first = request(&["ROOTCA"], "", "");
        first.node = node.clone();
        s.send(first).await;
        assert_eq!(trusted_ca(&s.next().await), roots, "node {node:?}");
    }
    t.stop().await;

    // The config turns it off for every node.
    let t = start_with(|f| f.sds.disable_spiffe_cert_validation = true).await;
    t.grant_me("sds-trusted-ca", HOUR, None).await;
    let mut s = SdsStream::ask(&t, &["ROOTCA"]).await;
    assert_eq!(trusted_ca(&s.next().await).len(), 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rootca_can_carry_every_bundle_and_the_aliases_are_configurable() {
    let t = start_with(|f| {
        f.sds.default_all_bundles_name = Some("ROOTCA".into());
        f.sds.default_svid_name = Some("workload".into());
    })
    .await;
    let lease = t.grant_me("sds-aliases", HOUR, None).await;
    let mut s = SdsStream::ask(&t, &["ROOTCA", "workload"]).await;
    let r = s.next().await;
    assert_eq!(names(&r), ["ROOTCA", "workload"]);
    let all = secrets(&r);
    let tds = spiffe_trust_domains(validation(&all[0]));
    assert_eq!(tds.len(), 1);
    check_certificate(&all[1], &lease.spiffe_id, &tds[0].1);
    let mut s = SdsStream::ask(&t, &["default"]).await;
    assert_eq!(
        s.end().await.code(),
        Code::InvalidArgument,
        "default is renamed"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn acks_nacks_and_stale_nonces_follow_the_xds_rules() {
    let t = start().await;
    t.grant_me("sds-acks", HOUR, None).await;
    let mut s = SdsStream::ask(&t, &["default"]).await;
    let first = s.next().await;

    // A stale nonce is ignored: its names are not applied, nothing is sent for it.
    s.send(request(
        &["ROOTCA"],
        "not-the-last-nonce",
        &first.version_info,
    ))
    .await;
    // An ACK is not answered (identical content is not resent)...
    s.ack(&["default"], &first).await;
    // ...but a NACK is still processed: here it also changes the names.
    let mut nack = request(&["default", "ROOTCA"], &first.nonce, "");
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "could not apply the secret".into(),
        details: Vec::new(),
    });
    s.send(nack).await;
    let second = s.next().await;
    assert_eq!(
        second.version_info, "2",
        "no response to the stale request or the ACK"
    );
    assert_ne!(second.nonce, first.nonce);
    assert_eq!(names(&second), ["ROOTCA", "default"]);
    let metrics = t.metrics().await;
    assert!(metrics.contains("mayfly_sds_nacks_total 1"), "{metrics}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_secrets_answers_once_without_version_or_nonce() {
    let t = start().await;
    let lease = t.grant_me("sds-fetch", HOUR, None).await;
    let roots = rootca(&t).await;
    let mut req = request(&["default"], "", "");
    req.node = Some(envoy_node(1, 40));
    let r = client(&t)
        .await
        .fetch_secrets(req)
        .await
        .unwrap()
        .into_inner();
    assert!(r.version_info.is_empty() && r.nonce.is_empty());
    check_certificate(&secrets(&r)[0], &lease.spiffe_id, &roots);
    let unknown = client(&t)
        .await
        .fetch_secrets(request(&["spiffe://example.org/nobody"], "", ""))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_secrets_is_unimplemented_and_a_caller_without_a_lease_gets_nothing() {
    let t = start().await;
    let (_tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let delta = client(&t)
        .await
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(delta.code(), Code::Unimplemented);

    let refused = SdsStream::open(&t)
        .await
        .err()
        .expect("no lease, no stream");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(refused.message(), "no identity issued");
    let fetch = client(&t)
        .await
        .fetch_secrets(request(&["default"], "", ""))
        .await
        .unwrap_err();
    assert_eq!(fetch.code(), Code::PermissionDenied);
    assert!(
        audit_events(&t.data_dir(), "request_denied")
            .iter()
            .any(|r| r["rpc"] == "StreamSecrets"),
        "the denial is audited"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_is_pushed_at_once() {
    let t = start().await;
    let lease = t
        .grant_me("sds-rotation", HOUR, Some(Duration::from_secs(2)))
        .await;
    let roots = rootca(&t).await;
    let mut s = SdsStream::ask(&t, &["default"]).await;
    let first = s.next().await;
    let serial1 = check_certificate(&secrets(&first)[0], &lease.spiffe_id, &roots);
    s.ack(&["default"], &first).await;
    let second = s.next().await;
    let serial2 = check_certificate(&secrets(&second)[0], &lease.spiffe_id, &roots);
    assert_ne!(serial1, serial2, "a new certificate");
    assert_eq!(second.version_info, "2");
    t.stop().await;
}

/// A federated trust domain's bundle is in `ALL` beside the own one, and its trust domain ID
/// names it alone, as with SPIRE; `ROOTCA` stays the own bundle.
#[tokio::test(flavor = "multi_thread")]
async fn all_carries_a_federated_bundle_and_its_id_names_it_alone() {
    use crate::federation::{PartnerBundle, PARTNER};
    let files = tempfile::tempdir().unwrap();
    let partner = PartnerBundle::write(files.path(), 1, 1);
    let entry = partner.entry();
    let t = start_with(|f| f.federation = vec![entry]).await;
    t.grant_me("sds-federated", HOUR, None).await;
    let own = rootca(&t).await;
    let partner_id = format!("spiffe://{PARTNER}");
    let names = ["ALL", partner_id.as_str()];
    let mut s = SdsStream::ask(&t, &names).await;
    let r = s.next().await;
    let all = secrets(&r);
    let by_name = |n: &str| all.iter().find(|x| x.name == n).unwrap();
    assert_eq!(
        spiffe_trust_domains(validation(by_name("ALL"))),
        [
            ("example.org".to_string(), own.clone()),
            (PARTNER.to_string(), partner.roots.clone()),
        ]
    );
    assert_eq!(
        spiffe_trust_domains(validation(by_name(&partner_id))),
        [(PARTNER.to_string(), partner.roots.clone())]
    );
    // A new partner bundle is pushed to both.
    s.ack(&names, &r).await;
    let next = PartnerBundle::write(files.path(), 2, 2);
    let r = s.next().await;
    let all = secrets(&r);
    let tds = spiffe_trust_domains(validation(
        all.iter().find(|x| x.name == partner_id).unwrap(),
    ));
    assert_eq!(tds, [(PARTNER.to_string(), next.roots.clone())]);
    t.stop().await;
}

/// The embedded CA rotating every 8 s: ROOTCA grows to both roots before the new one signs,
/// and `default` follows with a certificate of the new root, each verifying to the bundle
/// pushed with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_ca_rotation_is_pushed_to_rootca_and_default_at_once() {
    let t = start_with(|f| {
        f.ca.ttl = Some("8s".into());
        f.ca.prepare_at = Some(0.3);
        f.ca.activate_at = Some(0.6);
    })
    .await;
    let lease = t.grant_me("sds-ca", HOUR, None).await;
    let names = ["default", "ROOTCA"];
    let mut s = SdsStream::ask(&t, &names).await;
    let mut first_root = None;
    let mut overlap_seen = false;
    let started = std::time::Instant::now();
    loop {
        let r = s.next().await;
        let all = secrets(&r);
        let roots = spiffe_trust_domains(validation(&all[0]))[0].1.clone();
        check_certificate(&all[1], &lease.spiffe_id, &roots);
        let chain = pem_ders(&inline(&tls(&all[1]).certificate_chain), "CERTIFICATE");
        let signed_by = |root: &Vec<u8>| {
            verify_chain(
                &[CertificateDer::from(chain[0].as_slice())],
                &[CertificateDer::from(root.as_slice())],
            )
            .is_ok()
        };
        let first = first_root.get_or_insert_with(|| roots[0].clone()).clone();
        if roots.len() >= 2 && signed_by(&first) {
            overlap_seen = true;
        }
        if !signed_by(&first) {
            assert!(overlap_seen, "the new root was pushed before it signed");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no rotation pushed"
        );
        s.ack(&names, &r).await;
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_withdraws_the_secret_from_every_sds_and_workload_api_stream() {
    let t = start().await;
    let lease = t.grant_me("sds-revoke", HOUR, None).await;
    const N: usize = 40;
    let mut sds = Vec::new();
    for i in 0..N {
        let names: &[&str] = if i % 2 == 0 {
            &["default", "ROOTCA"]
        } else {
            &[]
        };
        let mut s = SdsStream::ask(&t, names).await;
        let r = s.next().await;
        s.ack(names, &r).await;
        sds.push((s, names));
    }
    let mut workload = Vec::new();
    for _ in 0..N {
        let c = t.workload().await;
        let mut stream = c.stream_x509_contexts().await.unwrap();
        stream.next().await.unwrap().unwrap();
        workload.push((c, stream));
    }
    t.revoke(&lease.lease_id, "done").await;
    for (mut s, _) in sds {
        // State of the world: a last response that holds none of its secrets, then the end.
        let last = s.next().await;
        assert!(last.resources.is_empty(), "{:?}", names(&last));
        assert_eq!(last.version_info, "2");
        let end = s.end().await;
        assert_eq!(end.code(), Code::PermissionDenied);
    }
    for (_c, mut stream) in workload {
        let end = tokio::time::timeout(WAIT, stream.next()).await.unwrap();
        assert!(matches!(end, Some(Err(_))), "{end:?}");
    }
    // And a new stream is refused.
    assert_eq!(
        SdsStream::open(&t).await.err().unwrap().code(),
        Code::PermissionDenied
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_extra_socket_serves_sds_as_istio_looks_for_it() {
    let dir = shared_tempdir();
    let socket = dir.path().join("workload-spiffe-uds/socket");
    let t = start_in(dir, |f| f.extra_sockets = Some(vec![socket.clone()])).await;
    let lease = t.grant_me("sds-istio", HOUR, None).await;
    let channel = mayfly::cli::connect::unix_channel(&socket).await.unwrap();
    let mut c = SecretDiscoveryServiceClient::new(channel);
    let mut req = request(&["default", "ROOTCA"], "", "");
    req.node = Some(envoy_node(1, 40));
    let r = c.fetch_secrets(req).await.unwrap().into_inner();
    assert_eq!(names(&r), ["ROOTCA", "default"]);
    let all = secrets(&r);
    let roots = spiffe_trust_domains(validation(&all[0]))[0].1.clone();
    check_certificate(&all[1], &lease.spiffe_id, &roots);
    t.stop().await;
    assert!(!socket.exists(), "removed at stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_whose_lease_ended_is_left_out_while_another_lease_goes_on() {
    let t = start().await;
    let a = t
        .grant(
            "sds-a",
            &[format!("unix:pid:{}", std::process::id())],
            HOUR,
            None,
        )
        .await;
    let b = t
        .grant("sds-b", &[format!("unix:uid:{}", my_uid())], HOUR, None)
        .await;
    let both = [a.spiffe_id.as_str(), b.spiffe_id.as_str()];
    let mut s = SdsStream::ask(&t, &both).await;
    let first = s.next().await;
    assert_eq!(names(&first).len(), 2);
    s.ack(&both, &first).await;
    t.revoke(&a.lease_id, "done").await;
    let second = s.next().await;
    assert_eq!(
        names(&second),
        [b.spiffe_id.as_str()],
        "a's secret withdrawn"
    );
    // Envoy ACKs with the names it still subscribes to: a's is no error, b's goes on.
    s.ack(&both, &second).await;
    t.revoke(&b.lease_id, "done").await;
    let last = s.next().await;
    assert!(last.resources.is_empty());
    assert_eq!(s.end().await.code(), Code::PermissionDenied);
    t.stop().await;
}

/// Issue 16: a lease granted with `end_on_violation` ends when its holder asks SDS for a SPIFFE
/// ID it does not hold; a misspelt name or another trust domain is only refused.
#[tokio::test]
async fn asking_for_a_spiffe_id_not_held_ends_a_lease_that_ends_on_violation() {
    let t = start().await;
    let lease = t
        .admin()
        .await
        .grant(pb::GrantRequest {
            end_on_violation: true,
            ..grant_request("sds-strict", "user/alice", HOUR)
        })
        .await
        .unwrap()
        .into_inner();
    for name in ["defualt", "spiffe://other.test"] {
        let err = client(&t)
            .await
            .fetch_secrets(request(&[name], "", ""))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}");
        assert_eq!(t.lease(&lease.lease_id).await.state, "active", "{name}");
    }
    let err = client(&t)
        .await
        .fetch_secrets(request(&["spiffe://example.org/nobody"], "", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let got = t.lease(&lease.lease_id).await;
    assert_eq!(got.state, "revoked");
    assert!(
        got.end_reason.contains("scope violation") && got.end_reason.contains("nobody"),
        "{}",
        got.end_reason
    );
    t.stop().await;
}

/// Issue 16: ending a lease ends its descendants, and their SDS streams are told like a plain
/// revoke's: the child's secret is withdrawn, then the stream ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_delegated_lease_s_sds_stream_is_told_when_its_parent_ends() {
    use mayfly::proto::delegation as dpb;
    let t = start().await;
    let root = t
        .admin()
        .await
        .grant(pb::GrantRequest {
            selectors: vec![
                format!("unix:pid:{}", std::process::id()),
                format!("unix:uid:{}", my_uid()),
            ],
            max_delegation_depth: 1,
            ..grant_request("sds-root", "user/alice", HOUR)
        })
        .await
        .unwrap()
        .into_inner();
    // A child bound to this very process, narrowed by its gid.
    let mut delegate = tonic::Request::new(dpb::DelegateRequest {
        task_id: "sds-child".into(),
        agent: "executor".into(),
        ttl: Some(mayfly::time::to_duration(Duration::from_secs(600))),
        selectors: vec![
            format!("unix:pid:{}", std::process::id()),
            format!("unix:gid:{}", nix::unistd::getegid()),
        ],
        audiences: vec!["db".into()],
        ..Default::default()
    });
    delegate
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let child = dpb::delegation_client::DelegationClient::new(
        mayfly::cli::connect::unix_channel(&t.socket).await.unwrap(),
    )
    .delegate(delegate)
    .await
    .unwrap()
    .into_inner();
    let name = child.spiffe_id.as_str();
    let mut s = SdsStream::ask(&t, &[name]).await;
    let first = s.next().await;
    assert_eq!(names(&first), [name]);
    s.ack(&[name], &first).await;
    t.revoke(&root.lease_id, "parent done").await;
    let withdrawn = s.next().await;
    assert!(secrets(&withdrawn).is_empty(), "{withdrawn:?}");
    assert_eq!(s.end().await.code(), Code::PermissionDenied);
    assert_eq!(t.lease(&child.lease_id).await.state, "parent_ended");
    t.stop().await;
}
