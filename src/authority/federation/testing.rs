//! A real HTTPS bundle endpoint for tests (tokio-rustls and hyper's server on 127.0.0.1:0),
//! and the certificates it and its clients need.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{
    CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

pub(super) use super::bundle::test_support::{document, jwt_jwk, root, x509_jwk};

/// A certificate and its key, as a TLS server presents them.
#[derive(Clone)]
pub(super) struct ServerCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pkcs8: Vec<u8>,
}

/// An X509-SVID leaf's parameters for a TLS server, with these URI (SPIFFE ID) or DNS SANs.
pub(super) fn server_params(uris: &[&str], dns: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .chain(
            dns.iter()
                .map(|d| SanType::DnsName((*d).try_into().unwrap())),
        )
        .collect();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p
}

/// `params` signed by `issuer`, with a fresh key.
pub(super) fn issue(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    params: CertificateParams,
) -> ServerCert {
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    ServerCert {
        chain: vec![cert.der().clone()],
        key_pkcs8: key.serialize_der(),
    }
}

/// A TLS server's leaf signed by `issuer`.
pub(super) fn server_cert(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    uris: &[&str],
    dns: &[&str],
) -> ServerCert {
    issue(issuer, server_params(uris, dns))
}

/// What the endpoint answers on one path.
#[derive(Clone)]
pub(super) enum Reply {
    Bundle(Vec<u8>),
    Status(u16),
    Redirect(u16, String),
}

/// An HTTPS server that answers each path as told, with the certificate it is given now.
pub(super) struct TestEndpoint {
    pub addr: SocketAddr,
    replies: Arc<Mutex<HashMap<String, Reply>>>,
    cert: Arc<Mutex<ServerCert>>,
    /// TCP connections accepted: each fetch makes one, whether or not TLS then succeeds.
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestEndpoint {
    pub async fn start(cert: ServerCert) -> TestEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let replies = Arc::new(Mutex::new(HashMap::new()));
        let cert = Arc::new(Mutex::new(cert));
        let connections = Arc::new(AtomicUsize::new(0));
        let (r, c, n) = (replies.clone(), cert.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor(&c.lock().unwrap());
                let replies = r.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        let reply = replies.lock().unwrap().get(req.uri().path()).cloned();
                        async move { Ok::<_, Infallible>(respond(reply)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TestEndpoint {
            addr,
            replies,
            cert,
            connections,
            task,
        }
    }

    pub fn reply(&self, path: &str, reply: Reply) {
        self.replies.lock().unwrap().insert(path.into(), reply);
    }

    pub fn set_cert(&self, cert: ServerCert) {
        *self.cert.lock().unwrap() = cert;
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// `https://<host>:<port><path>`
    pub fn url(&self, host: &str, path: &str) -> url::Url {
        url::Url::parse(&format!("https://{host}:{}{path}", self.addr.port())).unwrap()
    }

    /// Waits (briefly) until `more` further connections have come in.
    pub async fn wait_connections(&self, more: usize) {
        let target = self.connections() + more;
        eventually("connections to the endpoint", || {
            self.connections() >= target
        })
        .await;
    }
}

fn acceptor(cert: &ServerCert) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            cert.chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pkcs8.clone())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn respond(reply: Option<Reply>) -> Response<Full<Bytes>> {
    let builder = Response::builder();
    match reply {
        Some(Reply::Bundle(body)) => builder
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body))),
        Some(Reply::Status(status)) => builder.status(status).body(Full::default()),
        Some(Reply::Redirect(status, location)) => builder
            .status(status)
            .header("location", location)
            .body(Full::default()),
        None => builder.status(404).body(Full::default()),
    }
    .unwrap()
}

/// Polls `done` until it holds, failing the test after a few seconds.
pub(super) async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
