//! The admin API over TCP (`admin_addr`), mutual TLS only: for orchestrators that are not on
//! this node. The same `mayfly.admin.v1.Tasks` service as on the admin socket; the caller is
//! its client certificate, verified against the configured roots (by default this agent's own
//! trust bundle, so an orchestrator holding an X.509-SVID of this trust domain can call).
//!
//! The caller's identity is its certificate's SPIFFE ID (its one `spiffe://` URI SAN), or
//! `cn:NAME` for a certificate from an operator CA without one; the admin allowlist and the
//! policies judge that identity (see `lease::service`). The server presents an X.509-SVID of
//! its own, `spiffe://<trust domain>/mayfly/agent/<node>`, issued from the signing CA and
//! renewed long before it expires: clients verify it as SPIFFE peers do, by chain and ID.
//! For clients that can only check the host they dialled (gRPC C-core, grpc-java), it also
//! names `admin.server_names`, such as the Service in front of the agents.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use spiffe::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::authority::x509::{cert_identity as caller_of, CaHandle, HostName};

/// How long the server's own certificate lives, and how often it is replaced.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);
const SERVING_RENEW: Duration = Duration::from_secs(3600);

/// Connections open at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;

/// Connections one caller (one identity) may hold open at once. Every workload of the trust
/// domain holds a certificate the default roots accept, whether or not the allowlist names
/// it, so without this one workload could hold every connection and shut orchestrators out.
pub const MAX_CONNECTIONS_PER_CALLER: usize = 16;

/// Connections from one address, in their handshake or open: one host cannot hold every
/// connection with handshakes it never finishes.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;

/// The caller on the remote admin API, as its verified client certificate names it.
#[derive(Clone, Debug)]
pub struct RemotePeer {
    /// Its SPIFFE ID, or `cn:NAME`.
    pub identity: String,
    pub addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteAdminError {
    #[error("binding {addr}: {source} (is it taken? choose another admin_addr)")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("reading admin.client_ca_files {path}: {problem}")]
    Roots { path: String, problem: String },
    #[error("remote admin TLS: {0}")]
    Tls(String),
}

/// The server's certificate, replaced as it ages (and when the signing CA changes).
struct ServingCert {
    ca: Arc<CaHandle>,
    id: SpiffeId,
    hosts: Vec<HostName>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("id", &self.id.to_string())
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl ServingCert {
    fn issue(
        ca: &CaHandle,
        id: &SpiffeId,
        hosts: &[HostName],
    ) -> Result<Arc<CertifiedKey>, RemoteAdminError> {
        let issued = ca
            .current()
            .issue_server_svid(id, SystemTime::now() + SERVING_TTL, hosts)
            .map_err(|e| RemoteAdminError::Tls(e.to_string()))?;
        let chain: Vec<CertificateDer<'static>> = issued
            .chain_certs()
            .into_iter()
            .map(|der| CertificateDer::from(der.to_vec()))
            .collect();
        // Borrowed, so that the only copy of the key outside the signer is wiped with `issued`.
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(&issued.key_pkcs8[..]));
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| RemoteAdminError::Tls(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(chain, key)))
    }

    async fn renew(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changed = self.ca.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SERVING_RENEW) => {}
                r = changed.changed() => if r.is_err() { return },
            }
            match Self::issue(&self.ca, &self.id, &self.hosts) {
                Ok(key) => *self.current.write().expect("serving cert poisoned") = key,
                Err(e) => {
                    tracing::error!(error = %e, "renewing the remote admin API's certificate failed")
                }
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("serving cert poisoned").clone())
    }
}

/// What the TLS side is built from. It is built again when the trust bundle changes, so
/// that clients whose SVIDs a rotated or reloaded CA signed are admitted.
struct Tls {
    ca: Arc<CaHandle>,
    serving: Arc<ServingCert>,
    client_ca_files: Vec<std::path::PathBuf>,
}

impl Tls {
    fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, RemoteAdminError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(client_roots(&self.ca, &self.client_ca_files)?),
            provider.clone(),
        )
        .build()
        .map_err(|e| RemoteAdminError::Tls(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| RemoteAdminError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.serving.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No resumption: a resumed session skips the client certificate's verification, and
        // would carry an identity past its certificate's expiry.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// Builds the acceptor again whenever the bundle changes; a failure keeps the last one.
    async fn follow(
        self,
        acceptor: Arc<RwLock<tokio_rustls::TlsAcceptor>>,
        shutdown: CancellationToken,
    ) {
        let mut changed = self.ca.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changed.changed() => if r.is_err() { return },
            }
            match self.acceptor() {
                Ok(a) => *acceptor.write().expect("acceptor poisoned") = a,
                Err(e) => tracing::error!(error = %e,
                    "remote admin API: client roots not renewed; keeping the previous ones"),
            }
        }
    }
}

/// A bound listener and what it needs to serve mutual TLS.
pub struct RemoteAdmin {
    listener: TcpListener,
    acceptor: Arc<RwLock<tokio_rustls::TlsAcceptor>>,
    tls: Tls,
    serving: Arc<ServingCert>,
    pub addr: SocketAddr,
}

/// The roots client certificates must chain to: the PEM files named, or else this agent's own
/// trust bundle.
fn client_roots(
    ca: &CaHandle,
    files: &[std::path::PathBuf],
) -> Result<rustls::RootCertStore, RemoteAdminError> {
    let mut roots = rustls::RootCertStore::empty();
    let ders: Vec<Vec<u8>> = if files.is_empty() {
        ca.bundle().roots_der().to_vec()
    } else {
        let mut ders = Vec::new();
        for path in files {
            let bad = |problem: String| RemoteAdminError::Roots {
                path: path.display().to_string(),
                problem,
            };
            let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let blocks = pem::parse_many(&text).map_err(|e| bad(e.to_string()))?;
            let certs: Vec<Vec<u8>> = blocks
                .into_iter()
                .filter(|b| b.tag() == "CERTIFICATE")
                .map(|b| b.into_contents())
                .collect();
            if certs.is_empty() {
                return Err(bad("no CERTIFICATE block".into()));
            }
            ders.extend(certs);
        }
        ders
    };
    for der in ders {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| RemoteAdminError::Tls(format!("a client root: {e}")))?;
    }
    Ok(roots)
}

impl RemoteAdmin {
    /// Binds `addr` (a taken port fails start-up) and prepares the TLS side: this agent's
    /// serving SVID, also naming `hosts`, and client certificates required and verified
    /// against `client_ca_files` (or the agent's own bundle).
    pub async fn bind(
        addr: SocketAddr,
        ca: Arc<CaHandle>,
        node: &str,
        client_ca_files: &[std::path::PathBuf],
        hosts: &[HostName],
    ) -> Result<RemoteAdmin, RemoteAdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RemoteAdminError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| RemoteAdminError::Bind { addr, source })?;
        let td = ca.current().trust_domain().to_string();
        let id = SpiffeId::new(format!("spiffe://{td}/mayfly/agent/{node}"))
            .map_err(|e| RemoteAdminError::Tls(format!("the agent's own SPIFFE ID: {e}")))?;
        let serving = Arc::new(ServingCert {
            current: RwLock::new(ServingCert::issue(&ca, &id, hosts)?),
            ca: ca.clone(),
            id,
            hosts: hosts.to_vec(),
        });
        let tls = Tls {
            ca,
            serving: serving.clone(),
            client_ca_files: client_ca_files.to_vec(),
        };
        let acceptor = Arc::new(RwLock::new(tls.acceptor()?));
        Ok(RemoteAdmin {
            listener,
            acceptor,
            tls,
            serving,
            addr,
        })
    }

    /// Accepted connections whose handshake succeeded and whose client certificate names an
    /// identity; handshakes run concurrently, each within `handshake_timeout`. Also keeps the
    /// serving certificate fresh until `shutdown`.
    pub fn incoming(
        self,
        handshake_timeout: Duration,
        shutdown: CancellationToken,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<RemoteConn>> {
        tokio::spawn(self.serving.clone().renew(shutdown.clone()));
        tokio::spawn(self.tls.follow(self.acceptor.clone(), shutdown.clone()));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let (callers, addresses) = (Counts::default(), Counts::default());
        let (listener, acceptor) = (self.listener, self.acceptor);
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    a = listener.accept() => a,
                };
                let (tcp, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "remote admin API: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(from) =
                    addresses.take(&addr.ip().to_string(), MAX_CONNECTIONS_PER_ADDRESS)
                else {
                    tracing::warn!(event = "remote_admin_refused", peer = %addr, limit = MAX_CONNECTIONS_PER_ADDRESS, "remote admin API: this address holds as many connections as it may");
                    continue;
                };
                let acceptor = acceptor.read().expect("acceptor poisoned").clone();
                let (tx, callers) = (tx.clone(), callers.clone());
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::warn!(event = "remote_admin_refused", peer = %addr, error = %e, "remote admin API: TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(event = "remote_admin_refused", peer = %addr, "remote admin API: TLS handshake timed out");
                            return;
                        }
                    };
                    let leaf = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec());
                    let caller = match leaf.as_deref().map(caller_of) {
                        Some(Ok(caller)) => caller,
                        Some(Err(why)) => {
                            tracing::warn!(event = "remote_admin_refused", peer = %addr, reason = %why, "remote admin API: client certificate names no identity");
                            return;
                        }
                        None => return,
                    };
                    let Some(slot) = callers.take(&caller.identity, MAX_CONNECTIONS_PER_CALLER)
                    else {
                        tracing::warn!(event = "remote_admin_refused", peer = %addr, identity = %caller.identity, limit = MAX_CONNECTIONS_PER_CALLER, "remote admin API: this caller holds as many connections as it may");
                        return;
                    };
                    // The connection ends when the certificate that admitted it does.
                    let Ok(left) = caller.not_after.duration_since(SystemTime::now()) else {
                        tracing::warn!(event = "remote_admin_refused", peer = %addr, identity = %caller.identity, "remote admin API: client certificate expired");
                        return;
                    };
                    let conn = RemoteConn {
                        io: tls,
                        peer: RemotePeer {
                            identity: caller.identity,
                            addr,
                        },
                        expires: Box::pin(tokio::time::sleep(left)),
                        _slots: [slot, from],
                        _permit: permit,
                    };
                    let _ = tx.send(Ok(conn)).await;
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// How many connections each caller (or address) holds.
#[derive(Clone, Default)]
struct Counts(Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

impl Counts {
    /// One more connection for `who`, or `None` if it holds `limit` already.
    fn take(&self, who: &str, limit: usize) -> Option<Slot> {
        let mut held = self.0.lock().expect("connection counts poisoned");
        let n = held.entry(who.to_owned()).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: self.clone(),
            who: who.to_owned(),
        })
    }
}

/// One connection of a caller or address; dropped with the connection.
struct Slot {
    counts: Counts,
    who: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.counts.0.lock().expect("connection counts poisoned");
        if let Some(n) = held.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.who);
            }
        }
    }
}

/// One mutual-TLS connection on the remote admin API, with its caller. It fails (and so
/// closes) when the caller's certificate expires: the identity it admitted is no longer
/// vouched for.
pub struct RemoteConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    peer: RemotePeer,
    expires: Pin<Box<tokio::time::Sleep>>,
    /// Its caller's, and its address's.
    _slots: [Slot; 2],
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl RemoteConn {
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.expires.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client certificate expired",
            )
        })
    }
}

impl Connected for RemoteConn {
    type ConnectInfo = RemotePeer;

    fn connect_info(&self) -> RemotePeer {
        self.peer.clone()
    }
}

impl AsyncRead for RemoteConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Some(e) = me.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut me.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for RemoteConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if let Some(e) = me.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut me.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::x509::identity_of;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};
    use std::time::UNIX_EPOCH;

    fn cert(uris: &[&str], cn: Option<&str>) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn a_certificate_names_one_spiffe_id_or_else_its_common_name() {
        let id = "spiffe://example.org/orchestrator/ci";
        assert_eq!(identity_of(&cert(&[id], Some("ignored"))).unwrap(), id);
        assert_eq!(
            identity_of(&cert(&["https://example.org/deployer"], Some("deployer"))).unwrap(),
            "cn:deployer"
        );
        assert_eq!(
            identity_of(&cert(&[], Some("deployer"))).unwrap(),
            "cn:deployer"
        );
        assert!(identity_of(&cert(&[], None)).is_err());
    }

    /// The attacks: a certificate that is not an X509-SVID (a SPIFFE ID beside another URI, or
    /// two), or one whose SPIFFE ID is spelled to slip past a check, names no one; in
    /// particular it is never taken for its common name.
    #[test]
    fn a_certificate_that_is_not_an_x509_svid_names_no_one() {
        let id = "spiffe://example.org/orchestrator/ci";
        for uris in [
            vec![id, "https://example.org/other"],
            vec![id, "spiffe://example.org/other"],
            vec!["SPIFFE://example.org/orchestrator/ci"],
            vec!["spiffe://example.org/a/../orchestrator/ci"],
        ] {
            let got = identity_of(&cert(&uris, Some("deployer")));
            assert!(got.is_err(), "{uris:?} named {got:?}");
        }
    }

    #[test]
    fn a_caller_is_known_until_its_certificate_expires() {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "deployer");
        p.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let der = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let caller = caller_of(der.der()).unwrap();
        let want = UNIX_EPOCH + Duration::from_secs(1_925_078_400);
        assert_eq!(caller.not_after, want);
    }
}
