//! Two task SVIDs from the agent authenticate each other in a real rustls mTLS handshake, each
//! side verifying the peer's chain to the bundle and checking the peer's SPIFFE ID.

use std::sync::Arc;

use crate::common::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Accepts exactly one SPIFFE ID whose chain verifies to the trust bundle.
#[derive(Debug)]
pub(crate) struct SpiffeVerifier {
    roots: Vec<CertificateDer<'static>>,
    expect: String,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeVerifier {
    pub(crate) fn new(roots: Vec<CertificateDer<'static>>, expect: &str) -> Arc<Self> {
        Arc::new(SpiffeVerifier {
            roots,
            expect: expect.to_owned(),
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }

    fn check(
        &self,
        ee: &CertificateDer<'_>,
        rest: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        let mut chain = vec![ee.clone().into_owned()];
        chain.extend(rest.iter().map(|c| c.clone().into_owned()));
        verify_chain(&chain, &self.roots)
            .map_err(|e| rustls::Error::General(format!("chain: {e}")))?;
        let id = spiffe::cert::spiffe_id_from_der(ee.as_ref())
            .map_err(|e| rustls::Error::General(format!("no SPIFFE ID: {e}")))?;
        if id.to_string() != self.expect {
            return Err(rustls::Error::General(format!("unexpected peer {id}")));
        }
        Ok(())
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn identity(svid: &spiffe::X509Svid) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = ders(svid.cert_chain());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    (chain, key)
}

/// Runs one handshake plus an echo; the server accepts only a client with the SPIFFE ID
/// `server_expects`, the client only a server with `client_expects`.
async fn handshake(
    server: &spiffe::X509Svid,
    client: &spiffe::X509Svid,
    roots: Vec<CertificateDer<'static>>,
    server_expects: &str,
    client_expects: &str,
) -> Result<(), String> {
    let both = [roots.clone(), roots];
    handshake_trusting(server, client, both, server_expects, client_expects).await
}

/// A handshake where each side trusts its own bundle: `[server's, client's]`.
pub(crate) async fn handshake_trusting(
    server: &spiffe::X509Svid,
    client: &spiffe::X509Svid,
    [server_roots, roots]: [Vec<CertificateDer<'static>>; 2],
    server_expects: &str,
    client_expects: &str,
) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key) = identity(server);
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(SpiffeVerifier::new(server_roots, server_expects))
        .with_single_cert(chain, key)
        .unwrap();
    let (chain, key) = identity(client);
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeVerifier::new(roots, client_expects))
        .with_client_auth_cert(chain, key)
        .unwrap();

    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let server_side = async move {
        let mut tls = acceptor.accept(a).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let client_side = async move {
        let name = ServerName::try_from("peer.invalid").unwrap();
        let mut tls = connector
            .connect(name, b)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        Ok::<_, String>(())
    };
    match tokio::join!(server_side, client_side) {
        (Ok(()), Ok(())) => Ok(()),
        (s, c) => Err(format!("server: {s:?}; client: {c:?}")),
    }
}

#[tokio::test]
async fn two_task_svids_authenticate_each_other() {
    let t = start().await;
    let a = t.grant_me("task-a", HOUR, None).await;
    let b = t.grant_me("task-b", HOUR, None).await;
    let ctx = t.workload().await.fetch_x509_context().await.unwrap();
    let by_id = |id: &str| {
        ctx.svids()
            .iter()
            .find(|s| s.spiffe_id().to_string() == id)
            .expect("svid for lease")
            .clone()
    };
    let (svid_a, svid_b) = (by_id(&a.spiffe_id), by_id(&b.spiffe_id));
    let roots = bundle_roots(&ctx);

    handshake(&svid_a, &svid_b, roots.clone(), &b.spiffe_id, &a.spiffe_id)
        .await
        .expect("mutual TLS between task-a (server) and task-b (client)");

    // A client that expects another task refuses the server.
    let wrong = "spiffe://example.org/agent/reporter/task/task-c/delegator/user/alice";
    let err = handshake(&svid_a, &svid_b, roots, &b.spiffe_id, wrong)
        .await
        .unwrap_err();
    assert!(err.contains("unexpected peer"), "{err}");
}
