//! One fetch from a bundle endpoint: an HTTPS GET (HTTP/1.1) that the endpoint profile
//! authenticates, bounded in time and size, following redirects as the Federation standard
//! says (§5.2.1.4, §5.2.2.4): only to valid bundle endpoint URLs, with the same TLS checks as
//! the configured URL, and never remembered, since every fetch starts again from the URL the
//! operator configured (§7.5.1).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, HOST, LOCATION, USER_AGENT};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use spiffe::{SpiffeId, TrustDomain};
use tokio::net::TcpStream;
use url::{Host, Url};

use super::bundle::{BundleError, FederatedBundle, MAX_BUNDLE_BYTES};
use super::config::check_endpoint_url;
use super::verify::SpiffeServerVerifier;

/// How many redirects one fetch follows; a CDN needs one or two, a loop needs a bound.
const MAX_REDIRECTS: usize = 5;

/// How long a TCP connection may take, inside the fetch's whole timeout: a host that does not
/// answer is named as such rather than as a fetch that took too long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a fetch failed. Each names the URL it was at.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error(
        "no X.509 roots of trust domain {trust_domain} to authenticate {url} with (its bundle \
         is not there yet, or is empty)"
    )]
    NoRoots { url: String, trust_domain: String },
    #[error("{url}: cannot connect: {cause}")]
    Connect {
        url: String,
        cause: Arc<std::io::Error>,
    },
    #[error("{url}: TLS: {cause}")]
    Tls {
        url: String,
        cause: Arc<std::io::Error>,
    },
    #[error("{url}: HTTP: {cause}")]
    Http { url: String, cause: String },
    #[error("{url}: answered HTTP {status}, not 200")]
    Status { url: String, status: u16 },
    #[error("{url}: the bundle is larger than {} bytes", MAX_BUNDLE_BYTES)]
    TooLarge { url: String },
    #[error("{url}: redirect: {problem}")]
    Redirect { url: String, problem: String },
    #[error("{url}: no bundle within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("{url}: {problem}")]
    Bundle { url: String, problem: BundleError },
}

/// A fetched, parsed bundle and where it finally came from (after redirects).
#[derive(Debug)]
pub struct Fetched {
    pub bundle: FederatedBundle,
    pub from: Url,
}

/// TLS for an `https_web` endpoint: web PKI with the host-name check, against `roots` (PEM
/// certificates read by the caller) or else the Mozilla roots built into the binary.
pub fn web_tls(roots: Option<&[Vec<u8>]>) -> Result<Arc<ClientConfig>, String> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Some(roots) => {
            for der in roots {
                store
                    .add(CertificateDer::from(der.as_slice()))
                    .map_err(|e| format!("a root certificate: {e}"))?;
            }
        }
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = builder()?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(finish(config))
}

/// TLS for an `https_spiffe` endpoint: the server must present an X509-SVID for `id` that
/// chains to `roots`, the current X.509 roots of `id`'s trust domain.
pub fn spiffe_tls(
    url: &Url,
    id: &SpiffeId,
    roots: &[Vec<u8>],
) -> Result<Arc<ClientConfig>, FetchError> {
    if roots.is_empty() {
        return Err(FetchError::NoRoots {
            url: url.to_string(),
            trust_domain: id.trust_domain().to_string(),
        });
    }
    let roots: Vec<_> = roots
        .iter()
        .map(|r| CertificateDer::from(r.as_slice()))
        .collect();
    let tls_error = |e: String| FetchError::Tls {
        url: url.to_string(),
        cause: Arc::new(std::io::Error::other(e)),
    };
    let verifier = SpiffeServerVerifier::exactly(&roots, id.to_string()).map_err(tls_error)?;
    let config = builder()
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(finish(config))
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, String> {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
}

fn finish(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Fetches the bundle of `trust_domain` from `url`, all of it (redirects included) within
/// `timeout`.
pub async fn fetch(
    trust_domain: &TrustDomain,
    url: &Url,
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<Fetched, FetchError> {
    let mut at = url.clone();
    let all = async {
        for _ in 0..=MAX_REDIRECTS {
            match get(&at, tls.clone()).await? {
                Answer::Bundle(body) => {
                    let bundle =
                        FederatedBundle::parse(trust_domain, &body).map_err(|problem| {
                            FetchError::Bundle {
                                url: at.to_string(),
                                problem,
                            }
                        })?;
                    return Ok(Fetched {
                        bundle,
                        from: at.clone(),
                    });
                }
                Answer::Redirect(location) => at = redirect_target(&at, &location)?,
            }
        }
        Err(FetchError::Redirect {
            url: at.to_string(),
            problem: format!("more than {MAX_REDIRECTS} redirects"),
        })
    };
    match tokio::time::timeout(timeout, all).await {
        Ok(result) => result,
        Err(_) => Err(FetchError::Timeout {
            url: url.to_string(),
            after: timeout,
        }),
    }
}

enum Answer {
    Bundle(Bytes),
    Redirect(String),
}

/// Where a redirect points, if it is a valid bundle endpoint URL (§5.2.1.3, §5.2.2.3).
fn redirect_target(from: &Url, location: &str) -> Result<Url, FetchError> {
    let problem = |problem: String| FetchError::Redirect {
        url: from.to_string(),
        problem,
    };
    let mut target = from
        .join(location)
        .map_err(|e| problem(format!("Location {location:?}: {e}")))?;
    target.set_fragment(None);
    check_endpoint_url(&target).map_err(|e| problem(format!("to {target}: {e}")))?;
    Ok(target)
}

/// One GET on a connection of its own.
async fn get(url: &Url, tls: Arc<ClientConfig>) -> Result<Answer, FetchError> {
    let http = |cause: hyper::Error| FetchError::Http {
        url: url.to_string(),
        cause: cause.to_string(),
    };
    let (server_name, tcp) = connect(url).await?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|cause| FetchError::Tls {
            url: url.to_string(),
            cause: Arc::new(cause),
        })?;
    let mut authority = url.host_str().unwrap_or_default().to_owned();
    if let Some(port) = url.port() {
        authority.push_str(&format!(":{port}"));
    }
    let request = hyper::Request::get(&url[url::Position::BeforePath..url::Position::AfterQuery])
        .header(HOST, authority)
        .header(ACCEPT, "application/json")
        .header(USER_AGENT, concat!("mayfly/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http {
            url: url.to_string(),
            cause: e.to_string(),
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // The connection is driven only while the exchange needs it; dropping both when the
    // answer is in closes it.
    let exchange = async move {
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        // RFC 7231 §6.4's redirects with a Location to follow; each is taken as temporary.
        if matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| FetchError::Redirect {
                    url: url.to_string(),
                    problem: format!("HTTP {status} without a readable Location"),
                })?;
            return Ok(Answer::Redirect(location.to_owned()));
        }
        if status != StatusCode::OK {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        let body = Limited::new(response.into_body(), MAX_BUNDLE_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge {
                        url: url.to_string(),
                    }
                } else {
                    FetchError::Http {
                        url: url.to_string(),
                        cause: e.to_string(),
                    }
                }
            })?;
        Ok(Answer::Bundle(body.to_bytes()))
    };
    let mut exchange = std::pin::pin!(exchange);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        answer = &mut exchange => answer,
        // Closed first: what the exchange still awaits fails or is already buffered.
        _ = &mut connection => exchange.await,
    }
}

/// A TCP connection to the URL's host and port (each address of a name in turn), and the name
/// the TLS server is known by.
async fn connect(url: &Url) -> Result<(ServerName<'static>, TcpStream), FetchError> {
    let connect_error = |cause: std::io::Error| FetchError::Connect {
        url: url.to_string(),
        cause: Arc::new(cause),
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let (name, tcp) = match url.host() {
        Some(Host::Domain(domain)) => (
            ServerName::try_from(domain.to_owned()).map_err(|e| {
                connect_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
            })?,
            bounded(TcpStream::connect((domain, port))).await,
        ),
        Some(Host::Ipv4(ip)) => (
            ServerName::IpAddress(std::net::IpAddr::V4(ip).into()),
            bounded(TcpStream::connect(SocketAddr::from((ip, port)))).await,
        ),
        Some(Host::Ipv6(ip)) => (
            ServerName::IpAddress(std::net::IpAddr::V6(ip).into()),
            bounded(TcpStream::connect(SocketAddr::from((ip, port)))).await,
        ),
        None => {
            return Err(connect_error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no host",
            )))
        }
    };
    let tcp = tcp.map_err(connect_error)?;
    let _ = tcp.set_nodelay(true);
    Ok((name, tcp))
}

async fn bounded(
    connect: impl std::future::Future<Output = std::io::Result<TcpStream>>,
) -> std::io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            ))
        })
}
