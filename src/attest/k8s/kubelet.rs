//! The kubelet client: fetches `GET /pods` over TLS with the bearer token, and keeps the
//! pod list cache that concurrent lookups share, so a slow or dead kubelet costs one
//! request, not one per attestation.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, HOST};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::pods::{ContainerEntry, PodIndex, PodList};
use super::{K8sError, KubeletConfig, PodRef};
use crate::selector::{K8sKey, Key, Selector};

/// Minimum spacing between two pod list fetches that bypass the cache.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_millis(250);
/// Upper bound on the size of a pod list response body.
const MAX_BODY_BYTES: usize = 64 << 20;

pub(super) struct KubeletClient {
    pub(super) cfg: KubeletConfig,
    /// Host for the TCP connection (IPv6 without brackets).
    host: String,
    port: u16,
    /// Value of the Host header.
    authority: String,
    /// Origin-form request target, e.g. `/pods`.
    pods_path: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    index: Option<Arc<PodIndex>>,
    /// Incremented on every successful fetch.
    generation: u64,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    /// Start time and message of the last attempt, when it failed.
    last_failure: Option<(Instant, String)>,
}

impl KubeletClient {
    pub(super) fn new(cfg: KubeletConfig) -> Result<Self, K8sError> {
        let uri: hyper::Uri = cfg
            .url
            .parse()
            .map_err(|e| K8sError::Config(format!("kubelet url {:?}: {e}", cfg.url)))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(K8sError::Config(format!(
                    "kubelet url {:?} must start with https:// or http://",
                    cfg.url
                )))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| K8sError::Config(format!("kubelet url {:?} has no host", cfg.url)))?;
        if authority.as_str().contains('@') {
            return Err(K8sError::Config(
                "kubelet url must not contain userinfo".into(),
            ));
        }
        if uri.query().is_some() {
            return Err(K8sError::Config("kubelet url must not have a query".into()));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let pods_path = format!("{}/pods", uri.path().trim_end_matches('/'));
        if cfg.timeout.is_zero() {
            return Err(K8sError::Config("kubelet timeout must be > 0".into()));
        }

        let tls = if https {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?;
            let mut config = match (&cfg.ca_file, cfg.insecure_skip_verify) {
                (Some(_), true) => {
                    return Err(K8sError::Config(
                        "kubelet ca_file and insecure_skip_verify are mutually exclusive".into(),
                    ))
                }
                (None, false) => {
                    return Err(K8sError::Config(
                        "https kubelet url needs ca_file or insecure_skip_verify".into(),
                    ))
                }
                (Some(ca), false) => builder
                    .with_root_certificates(load_roots(ca)?)
                    .with_no_client_auth(),
                (None, true) => {
                    tracing::warn!(
                        url = %cfg.url,
                        "kubelet TLS verification disabled: trusting whoever answers on this address"
                    );
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert {
                            provider,
                        }))
                        .with_no_client_auth()
                }
            };
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let server_name = ServerName::try_from(host.clone()).map_err(|e| {
                K8sError::Config(format!(
                    "kubelet host {host:?} is not a TLS server name: {e}"
                ))
            })?;
            Some((
                tokio_rustls::TlsConnector::from(Arc::new(config)),
                server_name,
            ))
        } else {
            if cfg.ca_file.is_some() || cfg.insecure_skip_verify {
                return Err(K8sError::Config(
                    "ca_file/insecure_skip_verify given for an http:// kubelet url".into(),
                ));
            }
            None
        };

        Ok(KubeletClient {
            authority: authority.as_str().to_string(),
            host,
            port,
            pods_path,
            tls,
            state: Mutex::new(CacheState::default()),
            cfg,
        })
    }

    /// Finds the container in the pod list, re-fetching (bypassing the cache, at most
    /// every 250 ms) until `retry_for` has elapsed.
    pub(super) async fn lookup(&self, pod: &PodRef) -> Result<Arc<ContainerEntry>, K8sError> {
        let deadline = Instant::now() + self.cfg.retry_for;
        let mut seen: Option<u64> = None;
        let mut first = true;
        let mut last_err = K8sError::ContainerNotFound {
            container_id: pod.container_id.clone(),
        };
        loop {
            if !first && Instant::now() >= deadline {
                return Err(last_err);
            }
            let asked_at = Instant::now();
            match self
                .index(seen, (!first).then_some(deadline), asked_at)
                .await
            {
                Ok(None) => return Err(last_err),
                Ok(Some((generation, index))) => match index.containers.get(&pod.container_id) {
                    Some(Some(entry)) => return self.check(entry, pod),
                    Some(None) => {
                        return Err(K8sError::AmbiguousContainer {
                            container_id: pod.container_id.clone(),
                        })
                    }
                    None => {
                        seen = Some(generation);
                        last_err = K8sError::ContainerNotFound {
                            container_id: pod.container_id.clone(),
                        };
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "kubelet pod list fetch failed");
                    last_err = e;
                }
            }
            first = false;
        }
    }

    fn check(
        &self,
        entry: &Arc<ContainerEntry>,
        pod: &PodRef,
    ) -> Result<Arc<ContainerEntry>, K8sError> {
        if entry.pod.uid != pod.pod_uid {
            return Err(K8sError::PodMismatch {
                container_id: pod.container_id.clone(),
                cgroup_pod_uid: pod.pod_uid.clone(),
                kubelet_pod_uid: entry.pod.uid.clone(),
            });
        }
        // The QoS level in the cgroup path is where the kubelet put the pod's cgroup.
        if let Some(class) = pod.qos.class() {
            if !entry.pod.qos_class.is_empty() && entry.pod.qos_class != class {
                return Err(K8sError::QosMismatch {
                    pod_uid: pod.pod_uid.clone(),
                    cgroup: class,
                    kubelet: entry.pod.qos_class.clone(),
                });
            }
        }
        if let Some(expected) = &self.cfg.node_name {
            if !entry.pod.node_name.is_empty() && entry.pod.node_name != *expected {
                return Err(K8sError::NodeMismatch {
                    expected: expected.clone(),
                    actual: entry.pod.node_name.clone(),
                });
            }
        }
        Ok(entry.clone())
    }

    /// Returns a pod index: with `seen == None` the cached one while fresh, otherwise one
    /// fetched after generation `seen`. `Ok(None)` when the next allowed fetch would start
    /// after `deadline`. A fetch that another caller started (and failed) after `asked_at`,
    /// while this one waited for the lock, is not repeated: its error is returned, so a
    /// dead kubelet costs concurrent callers one timeout, not one each in turn.
    async fn index(
        &self,
        seen: Option<u64>,
        deadline: Option<Instant>,
        asked_at: Instant,
    ) -> Result<Option<(u64, Arc<PodIndex>)>, K8sError> {
        // Held across the fetch: concurrent callers share one request.
        let mut st = self.state.lock().await;
        if let (Some(index), Some(fetched_at)) = (&st.index, st.fetched_at) {
            let usable = match seen {
                None => fetched_at.elapsed() < self.cfg.cache_ttl,
                Some(generation) => st.generation > generation,
            };
            if usable {
                return Ok(Some((st.generation, index.clone())));
            }
        }
        if let Some((at, message)) = &st.last_failure {
            if *at >= asked_at {
                return Err(K8sError::Unavailable(message.clone()));
            }
        }
        if let Some(last) = st.last_attempt {
            let next = last + MIN_REFETCH_INTERVAL;
            if next > Instant::now() {
                if deadline.is_some_and(|d| next > d) {
                    return Ok(None);
                }
                tokio::time::sleep_until(next).await;
            }
        }
        let started = Instant::now();
        st.last_attempt = Some(started);
        let result = match tokio::time::timeout(self.cfg.timeout, self.fetch()).await {
            Ok(result) => result,
            Err(_) => Err(K8sError::Timeout(self.cfg.timeout)),
        };
        let index = match result {
            Ok(index) => Arc::new(index),
            Err(e) => {
                st.last_failure = Some((started, e.to_string()));
                return Err(e);
            }
        };
        st.last_failure = None;
        st.generation += 1;
        st.fetched_at = Some(Instant::now());
        st.index = Some(index.clone());
        Ok(Some((st.generation, index)))
    }

    async fn fetch(&self) -> Result<PodIndex, K8sError> {
        let mut req = hyper::Request::get(self.pods_path.as_str())
            .header(HOST, self.authority.as_str())
            .header(ACCEPT, "application/json");
        if let Some(path) = &self.cfg.token_file {
            let token =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| K8sError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
            let token = token.trim();
            if token.is_empty() {
                return Err(K8sError::Config(format!(
                    "token file {} is empty",
                    path.display()
                )));
            }
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                K8sError::Config(format!(
                    "token file {} holds characters not allowed in a header",
                    path.display()
                ))
            })?;
            value.set_sensitive(true);
            req = req.header(AUTHORIZATION, value);
        }
        let req = req.body(Empty::<Bytes>::new())?;

        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(K8sError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (status, body) = match &self.tls {
            Some((connector, server_name)) => {
                let stream = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(K8sError::TlsHandshake)?;
                send(TokioIo::new(stream), req).await?
            }
            None => send(TokioIo::new(tcp), req).await?,
        };
        if status != hyper::StatusCode::OK {
            return Err(K8sError::Status(status.as_u16()));
        }
        let list: PodList = serde_json::from_slice(&body)?;
        tracing::debug!(pods = list.items.len(), "fetched kubelet pod list");
        Ok(PodIndex::build(list))
    }

    pub(super) fn add_selectors(&self, entry: &ContainerEntry, out: &mut BTreeSet<Selector>) {
        let pod = &entry.pod;
        let mut add = |key: K8sKey, value: &str| {
            if !value.is_empty() {
                out.insert(Selector::fact(Key::K8s(key), value));
            }
        };
        add(K8sKey::Ns, &pod.namespace);
        add(K8sKey::Sa, &pod.service_account);
        add(K8sKey::PodName, &pod.name);
        add(K8sKey::ContainerName, &entry.name);
        add(K8sKey::ContainerImage, &entry.image);
        let node = if pod.node_name.is_empty() {
            self.cfg.node_name.as_deref().unwrap_or("")
        } else {
            &pod.node_name
        };
        add(K8sKey::NodeName, node);
        for (key, value) in &pod.labels {
            out.insert(Selector::fact(
                Key::K8s(K8sKey::PodLabel),
                format_args!("{key}:{value}"),
            ));
        }
    }
}

/// Aborts the connection task when the request is finished or cancelled (timeout).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send<I>(
    io: I,
    req: hyper::Request<Empty<Bytes>>,
) -> Result<(hyper::StatusCode, Bytes), K8sError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "kubelet connection ended with an error");
        }
    }));
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| K8sError::Body(e.to_string()))?
        .to_bytes();
    Ok((status, body))
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, K8sError> {
    let data = std::fs::read(path).map_err(|source| K8sError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    let pems = pem::parse_many(&data)
        .map_err(|e| K8sError::Config(format!("CA file {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for p in pems.iter().filter(|p| p.tag() == "CERTIFICATE") {
        roots.add(CertificateDer::from(p.contents().to_vec()))?;
    }
    if roots.is_empty() {
        return Err(K8sError::Config(format!(
            "CA file {} holds no CERTIFICATE",
            path.display()
        )));
    }
    Ok(roots)
}

/// Accepts any server certificate but still verifies the handshake signatures with the
/// ring provider's algorithms (so the peer holds the private key of what it presents).
#[derive(Debug)]
struct AcceptAnyServerCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{CgroupLayout, K8sAttestor};
    use super::*;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Full;
    use hyper::{Request, Response, StatusCode};
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::net::TcpListener;

    #[test]
    fn config_errors() {
        let no_trust = KubeletConfig::default();
        assert!(matches!(
            K8sAttestor::new(Some(no_trust), CgroupLayout::kubelet_default()),
            Err(K8sError::Config(_))
        ));
        let bad_scheme = KubeletConfig {
            url: "ftp://127.0.0.1:10250".into(),
            insecure_skip_verify: true,
            ..Default::default()
        };
        assert!(matches!(
            K8sAttestor::new(Some(bad_scheme), CgroupLayout::kubelet_default()),
            Err(K8sError::Config(_))
        ));
        let zero_timeout = KubeletConfig {
            url: "http://127.0.0.1:10255".into(),
            timeout: Duration::ZERO,
            ..Default::default()
        };
        assert!(matches!(
            K8sAttestor::new(Some(zero_timeout), CgroupLayout::kubelet_default()),
            Err(K8sError::Config(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let empty_ca = dir.path().join("ca.pem");
        std::fs::write(&empty_ca, "not a pem\n").unwrap();
        let cfg = KubeletConfig {
            ca_file: Some(empty_ca),
            ..Default::default()
        };
        assert!(matches!(
            K8sAttestor::new(Some(cfg), CgroupLayout::kubelet_default()),
            Err(K8sError::Config(_))
        ));
        let missing_ca = KubeletConfig {
            ca_file: Some(dir.path().join("missing.pem")),
            ..Default::default()
        };
        assert!(matches!(
            K8sAttestor::new(Some(missing_ca), CgroupLayout::kubelet_default()),
            Err(K8sError::ReadFile { .. })
        ));
        let ok = KubeletConfig {
            insecure_skip_verify: true,
            ..Default::default()
        };
        assert!(K8sAttestor::new(Some(ok), CgroupLayout::kubelet_default()).is_ok());
        let d = KubeletConfig::default();
        assert_eq!(
            (d.cache_ttl, d.retry_for, d.timeout),
            (
                Duration::from_secs(5),
                Duration::from_secs(2),
                Duration::from_secs(3)
            )
        );
    }

    // ---------------------------------------------------------------- test kubelet

    type Responder = Arc<dyn Fn(usize) -> String + Send + Sync>;

    struct TestKubelet {
        addr: SocketAddr,
        requests: Arc<AtomicUsize>,
        token: Arc<std::sync::Mutex<String>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestKubelet {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    struct TestPki {
        ca_pem: String,
        leaf_der: CertificateDer<'static>,
        leaf_key: Vec<u8>,
    }

    fn make_ca() -> (rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "node-a-ca@1715677961");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let pem = ca.pem();
        (ca, pem)
    }

    fn make_pki() -> TestPki {
        let (ca, ca_pem) = make_ca();
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "node-a".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "node-a@1715677961");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = params.signed_by(&key, &ca).unwrap();
        TestPki {
            ca_pem,
            leaf_der: leaf.der().clone(),
            leaf_key: key.serialize_der(),
        }
    }

    fn static_body(body: String) -> Responder {
        Arc::new(move |_| body.clone())
    }

    /// A kubelet stand-in: `GET /pods` with `Authorization: Bearer <token>`, over TLS when
    /// `pki` is given.
    async fn start_kubelet(pki: Option<&TestPki>, token: &str, respond: Responder) -> TestKubelet {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let token = Arc::new(std::sync::Mutex::new(token.to_string()));
        let acceptor = pki.map(|pki| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![pki.leaf_der.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.leaf_key.clone())),
                )
                .unwrap();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        });
        let (req_count, tok) = (requests.clone(), token.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, req_count, tok, respond) = (
                    acceptor.clone(),
                    req_count.clone(),
                    tok.clone(),
                    respond.clone(),
                );
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (req_count, tok, respond) =
                                (req_count.clone(), tok.clone(), respond.clone());
                            async move {
                                let expected = format!("Bearer {}", tok.lock().unwrap());
                                let authorized = req
                                    .headers()
                                    .get(AUTHORIZATION)
                                    .is_some_and(|v| v.as_bytes() == expected.as_bytes());
                                let resp = if req.uri().path() != "/pods"
                                    || req.method() != hyper::Method::GET
                                {
                                    Response::builder()
                                        .status(StatusCode::NOT_FOUND)
                                        .body(Full::new(Bytes::from("404 page not found\n")))
                                } else if !authorized {
                                    Response::builder()
                                        .status(StatusCode::UNAUTHORIZED)
                                        .body(Full::new(Bytes::from("Unauthorized")))
                                } else {
                                    let n = req_count.fetch_add(1, Ordering::SeqCst) + 1;
                                    Response::builder()
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(respond(n))))
                                };
                                Ok::<_, Infallible>(resp.unwrap())
                            }
                        });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        TestKubelet {
            addr,
            requests,
            token,
            task,
        }
    }

    struct Files {
        _dir: tempfile::TempDir,
        token: PathBuf,
        ca: PathBuf,
    }

    fn files(token: &str, ca_pem: &str) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let token_path = dir.path().join("token");
        // projected tokens have no trailing newline, hand-made files often do
        std::fs::write(&token_path, format!("{token}\n")).unwrap();
        let ca = dir.path().join("kubelet-ca.crt");
        std::fs::write(&ca, ca_pem).unwrap();
        Files {
            _dir: dir,
            token: token_path,
            ca,
        }
    }

    fn https_config(k: &TestKubelet, f: &Files) -> KubeletConfig {
        KubeletConfig {
            url: format!("https://{}", k.addr),
            token_file: Some(f.token.clone()),
            ca_file: Some(f.ca.clone()),
            cache_ttl: Duration::from_secs(60),
            retry_for: Duration::from_millis(300),
            timeout: Duration::from_secs(3),
            ..Default::default()
        }
    }

    fn web_full_selectors() -> Vec<String> {
        let mut v = vec![
            format!("k8s:container-id:{WEB_CID}"),
            "k8s:container-image:registry.example.com/shop/web:1.8.2".to_string(),
            "k8s:container-name:web".to_string(),
            "k8s:node-name:node-a".to_string(),
            "k8s:ns:shop".to_string(),
            "k8s:pod-label:app:web".to_string(),
            "k8s:pod-label:app.kubernetes.io/part-of:shop".to_string(),
            "k8s:pod-label:pod-template-hash:7d4b9c8f6d".to_string(),
            "k8s:pod-name:web-7d4b9c8f6d-x2kq9".to_string(),
            format!("k8s:pod-uid:{WEB_UID}"),
            "k8s:sa:web".to_string(),
        ];
        v.sort();
        v
    }

    fn cgroup_only(uid: &str, cid: &str) -> Vec<String> {
        vec![
            format!("k8s:container-id:{cid}"),
            format!("k8s:pod-uid:{uid}"),
        ]
    }

    #[tokio::test]
    async fn kubelet_https_with_ca_gives_all_selectors() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &pki.ca_pem);
        let att =
            K8sAttestor::new(Some(https_config(&k, &f)), CgroupLayout::kubelet_default()).unwrap();

        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());

        // Init and ephemeral containers of the same pod, served from the cache.
        let init = att
            .selectors_for(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{WEB_UID_SYSTEMD}.slice/cri-containerd-{INIT_CID}.scope\n"
            ))
            .await;
        assert!(
            init.iter().any(|s| s == "k8s:container-name:init-migrate"),
            "{init:?}"
        );
        let dbg = att
            .selectors_for(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{WEB_UID_SYSTEMD}.slice/cri-containerd-{DEBUG_CID}.scope\n"
            ))
            .await;
        assert!(
            dbg.iter().any(|s| s == "k8s:container-name:debugger-7xk2p"),
            "{dbg:?}"
        );
        assert!(dbg
            .iter()
            .any(|s| s == "k8s:container-image:docker.io/library/busybox:1.36"));

        // Second pod, cgroup v1 cgroupfs (Guaranteed QoS).
        let p = format!("/kubepods/pod{API_UID}/{SHIPPER_CID}");
        let shipper = att
            .selectors_for(&format!("11:memory:{p}\n1:name=systemd:{p}\n0::/\n"))
            .await;
        let mut expected = vec![
            format!("k8s:container-id:{SHIPPER_CID}"),
            "k8s:container-image:docker.io/fluent/fluent-bit:3.0.4".to_string(),
            "k8s:container-name:log-shipper".to_string(),
            "k8s:node-name:node-a".to_string(),
            "k8s:ns:payments".to_string(),
            "k8s:pod-label:app:api".to_string(),
            "k8s:pod-label:pod-template-hash:6f8d7b5c4".to_string(),
            "k8s:pod-label:tier:backend".to_string(),
            "k8s:pod-name:api-6f8d7b5c4-q9wzt".to_string(),
            format!("k8s:pod-uid:{API_UID}"),
            "k8s:sa:payments-api".to_string(),
        ];
        expected.sort();
        assert_eq!(shipper, expected);
        // All of the above came from one fetch (cache_ttl 60 s).
        assert_eq!(k.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn wrong_ca_fails_closed_to_cgroup_only() {
        let pki = make_pki();
        let (_other_ca, other_pem) = make_ca();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &other_pem);
        let att =
            K8sAttestor::new(Some(https_config(&k, &f)), CgroupLayout::kubelet_default()).unwrap();
        assert_eq!(
            att.selectors_for(&web_cgroup()).await,
            cgroup_only(WEB_UID, WEB_CID)
        );
        assert_eq!(k.requests.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn wrong_token_fails_closed_and_rotated_token_is_reread() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &pki.ca_pem);
        let cfg = KubeletConfig {
            cache_ttl: Duration::ZERO,
            retry_for: Duration::ZERO,
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg), CgroupLayout::kubelet_default()).unwrap();
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());

        // The kubelet now expects a rotated token the file does not have yet: 401.
        *k.token.lock().unwrap() = "tok-2".into();
        assert_eq!(
            att.selectors_for(&web_cgroup()).await,
            cgroup_only(WEB_UID, WEB_CID)
        );
        // Rotation lands in the file: picked up on the next fetch.
        std::fs::write(&f.token, "tok-2").unwrap();
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
        assert_eq!(k.requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn insecure_skip_verify_works() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", "");
        let cfg = KubeletConfig {
            ca_file: None,
            insecure_skip_verify: true,
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg), CgroupLayout::kubelet_default()).unwrap();
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
    }

    #[tokio::test]
    async fn plain_http_read_only_port() {
        let k = start_kubelet(None, "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", "");
        let cfg = KubeletConfig {
            url: format!("http://{}/", k.addr),
            token_file: Some(f.token.clone()),
            ..Default::default()
        };
        let att = K8sAttestor::new(Some(cfg), CgroupLayout::kubelet_default()).unwrap();
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
    }

    /// The pod list as the kubelet reports it while the `api` container is still being
    /// created: its status has no containerID yet.
    fn pods_with_api_waiting() -> String {
        let mut doc: serde_json::Value = serde_json::from_str(PODS_JSON).unwrap();
        let statuses = doc["items"][1]["status"]["containerStatuses"]
            .as_array_mut()
            .unwrap();
        let api = statuses.iter_mut().find(|s| s["name"] == "api").unwrap();
        let obj = api.as_object_mut().unwrap();
        obj.remove("containerID");
        obj.insert("ready".into(), false.into());
        obj.insert("started".into(), false.into());
        obj.insert(
            "state".into(),
            serde_json::json!({"waiting": {"reason": "ContainerCreating"}}),
        );
        doc.to_string()
    }

    #[tokio::test]
    async fn container_appearing_on_second_fetch_is_found_by_retry() {
        let pki = make_pki();
        let waiting = pods_with_api_waiting();
        let respond: Responder = Arc::new(move |n| {
            if n == 1 {
                waiting.clone()
            } else {
                PODS_JSON.to_string()
            }
        });
        let k = start_kubelet(Some(&pki), "tok-1", respond).await;
        let f = files("tok-1", &pki.ca_pem);
        let cfg = KubeletConfig {
            retry_for: Duration::from_secs(2),
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg), CgroupLayout::kubelet_default()).unwrap();
        let start = Instant::now();
        let sel = att
            .selectors_for(&format!(
                "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{API_CID}.scope\n",
                API_UID.replace('-', "_")
            ))
            .await;
        assert!(sel.iter().any(|s| s == "k8s:container-name:api"), "{sel:?}");
        assert!(sel.iter().any(|s| s == "k8s:ns:payments"), "{sel:?}");
        assert_eq!(k.requests.load(Ordering::SeqCst), 2);
        // The re-fetch respected the 250 ms spacing.
        assert!(start.elapsed() >= MIN_REFETCH_INTERVAL);
    }

    #[tokio::test]
    async fn unknown_container_retries_within_window_then_cgroup_only() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &pki.ca_pem);
        let cfg = KubeletConfig {
            retry_for: Duration::from_millis(700),
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg), CgroupLayout::kubelet_default()).unwrap();
        // Not in the pod list at all (e.g. the pod's sandbox/pause container).
        let cid = "0123456789abcdef".repeat(4);
        let text = format!("0::/kubepods/besteffort/pod{WEB_UID}/{cid}\n");
        let start = Instant::now();
        assert_eq!(att.selectors_for(&text).await, cgroup_only(WEB_UID, &cid));
        let elapsed = start.elapsed();
        let n = k.requests.load(Ordering::SeqCst);
        // first fetch + re-fetches at >= 250 ms spacing inside 700 ms
        assert!((2..=4).contains(&n), "requests {n}");
        assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[tokio::test]
    async fn pod_uid_or_node_mismatch_fails_closed() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &pki.ca_pem);
        let att =
            K8sAttestor::new(Some(https_config(&k, &f)), CgroupLayout::kubelet_default()).unwrap();
        // web's container id claimed under the payments pod's uid
        let text = format!("0::/kubepods/burstable/pod{API_UID}/{WEB_CID}\n");
        assert_eq!(
            att.selectors_for(&text).await,
            cgroup_only(API_UID, WEB_CID)
        );
        // a mismatch is definitive: no retries
        assert_eq!(k.requests.load(Ordering::SeqCst), 1);

        let cfg = KubeletConfig {
            node_name: Some("node-b".into()),
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg), CgroupLayout::kubelet_default()).unwrap();
        assert_eq!(
            att.selectors_for(&web_cgroup()).await,
            cgroup_only(WEB_UID, WEB_CID)
        );
        let cfg = KubeletConfig {
            node_name: Some("node-a".into()),
            ..https_config(&k, &f)
        };
        let att = K8sAttestor::new(Some(cfg), CgroupLayout::kubelet_default()).unwrap();
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
    }

    #[tokio::test]
    async fn cache_avoids_second_request_within_ttl() {
        let pki = make_pki();
        let k = start_kubelet(Some(&pki), "tok-1", static_body(PODS_JSON.to_string())).await;
        let f = files("tok-1", &pki.ca_pem);
        let cfg = KubeletConfig {
            cache_ttl: Duration::from_millis(400),
            ..https_config(&k, &f)
        };
        let att = Arc::new(K8sAttestor::new(Some(cfg), CgroupLayout::kubelet_default()).unwrap());
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
        // concurrent callers within the ttl share the cached list too
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let att = att.clone();
            tasks.push(tokio::spawn(async move {
                att.selectors_for(&web_cgroup()).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), web_full_selectors());
        }
        assert_eq!(k.requests.load(Ordering::SeqCst), 1);
        // after the ttl the list is fetched again
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(att.selectors_for(&web_cgroup()).await, web_full_selectors());
        assert_eq!(k.requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn silent_server_is_bounded_by_timeout() {
        // Accepts TCP connections and never says anything (TLS handshake hangs).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.push(s);
            }
        });
        let cfg = KubeletConfig {
            url: format!("https://{addr}"),
            insecure_skip_verify: true,
            timeout: Duration::from_millis(300),
            retry_for: Duration::ZERO,
            ..Default::default()
        };
        let att = K8sAttestor::new(Some(cfg), CgroupLayout::kubelet_default()).unwrap();
        let start = Instant::now();
        assert_eq!(
            att.selectors_for(&web_cgroup()).await,
            cgroup_only(WEB_UID, WEB_CID)
        );
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");

        // Concurrent callers share the failing attempt instead of timing out in turn.
        let att = Arc::new(att);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let att = att.clone();
            tasks.push(tokio::spawn(async move {
                att.selectors_for(&web_cgroup()).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), cgroup_only(WEB_UID, WEB_CID));
        }
        let elapsed = start.elapsed();
        // serialized it would take 6 x 300 ms
        assert!(elapsed < Duration::from_millis(1200), "{elapsed:?}");

        // Same over plain HTTP (server accepts the request and never answers), with a
        // retry window: bounded by retry_for + timeout.
        let cfg = KubeletConfig {
            url: format!("http://{addr}"),
            timeout: Duration::from_millis(300),
            retry_for: Duration::from_millis(400),
            ..Default::default()
        };
        let att = K8sAttestor::new(Some(cfg), CgroupLayout::kubelet_default()).unwrap();
        let start = Instant::now();
        assert_eq!(
            att.selectors_for(&web_cgroup()).await,
            cgroup_only(WEB_UID, WEB_CID)
        );
        let elapsed = start.elapsed();
        assert!(
            elapsed < Duration::from_millis(400 + 300 + 250 + 500),
            "{elapsed:?}"
        );
        hold.abort();
    }
}
