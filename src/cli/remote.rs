//! The remote admin API from the command line: `--server https://HOST:PORT`, presenting the
//! caller's own X.509-SVID from the Workload API (`--svid-from-socket`) or certificate files
//! (`--cert`, `--key`, `--ca`). The agent is verified as SPIFFE peers verify each other: its
//! chain to the roots, and its SPIFFE ID (`--server-id`, or else any agent's,
//! `spiffe://<trust domain>/mayfly/agent/<node>`), never a host name.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tonic::transport::{Channel, Endpoint};

use crate::authority::federation::SpiffeServerVerifier;

/// Who the CLI is on the remote admin API, and whom it trusts.
pub struct RemoteTarget<'a> {
    /// `https://HOST:PORT`
    pub server: &'a str,
    pub svid_from_socket: bool,
    pub workload_socket: Option<&'a Path>,
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub ca: Option<&'a Path>,
    pub server_id: Option<&'a str>,
}

/// What the agent's certificate must name.
#[derive(Debug)]
enum Expect {
    Exactly(String),
    /// `spiffe://<td>/mayfly/agent/...`, in this trust domain or (`None`) any.
    AnyAgent(Option<String>),
}

impl Expect {
    fn check(&self, id: &str) -> Result<(), String> {
        let ok = match self {
            Expect::Exactly(want) => id == want,
            Expect::AnyAgent(td) => {
                let rest = id.strip_prefix("spiffe://").unwrap_or_default();
                match rest.split_once('/') {
                    Some((got_td, path)) => {
                        path.starts_with("mayfly/agent/")
                            && td.as_deref().is_none_or(|td| td == got_td)
                    }
                    None => false,
                }
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!("the server is {id}, not {self:?}"))
        }
    }
}

/// The client's chain and key, the roots it trusts, and its trust domain if it knows it.
type Material = (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    Vec<CertificateDer<'static>>,
    Option<String>,
);

/// This process's own SVID, and its trust domain's bundle, from the Workload API.
async fn from_socket(socket: Option<&Path>) -> Result<Material> {
    let path = crate::config::client_socket(
        socket,
        "SPIFFE_ENDPOINT_SOCKET",
        crate::config::Defaults::socket,
    );
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", path.display()))
        .await
        .with_context(|| format!("connecting to the Workload API at {}", path.display()))?;
    let ctx = client
        .fetch_x509_context()
        .await
        .context("fetching this process's X.509-SVID for --svid-from-socket")?;
    let svid = ctx
        .default_svid()
        .ok_or_else(|| anyhow!("the Workload API issued this process no X.509-SVID"))?;
    let td = svid.spiffe_id().trust_domain();
    let bundle = ctx
        .bundle_set()
        .get(td)
        .ok_or_else(|| anyhow!("the Workload API gave no bundle for {td}"))?;
    let der = |c: &spiffe::cert::Certificate| CertificateDer::from(c.as_ref().to_vec());
    Ok((
        svid.cert_chain().iter().map(der).collect(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        )),
        bundle.authorities().iter().map(der).collect(),
        Some(td.to_string()),
    ))
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("{what} {}", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {}: no CERTIFICATE", path.display());
    }
    Ok(certs)
}

fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Material> {
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("--key {}", key.display()))?;
    Ok((certs(cert, "--cert")?, key, certs(ca, "--ca")?, None))
}

/// A channel to the remote admin API.
pub async fn channel(t: &RemoteTarget<'_>) -> Result<Channel> {
    let authority = t
        .server
        .strip_prefix("https://")
        .ok_or_else(|| anyhow!("--server {}: must be https://HOST:PORT", t.server))?
        .trim_end_matches('/');
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host.trim_matches(['[', ']']),
        _ => bail!("--server {}: must be https://HOST:PORT", t.server),
    };
    let (chain, key, roots, td) = match (t.svid_from_socket, t.cert, t.key, t.ca) {
        (true, None, None, None) => from_socket(t.workload_socket).await?,
        (false, Some(cert), Some(key), Some(ca)) => from_files(cert, key, ca)?,
        _ => bail!("--server needs either --svid-from-socket, or --cert, --key and --ca together"),
    };
    let expect = match t.server_id {
        Some(id) => Expect::Exactly(id.to_owned()),
        None => Expect::AnyAgent(td),
    };
    let verifier = Arc::new(
        SpiffeServerVerifier::new(&roots, move |id| expect.check(id)).map_err(|e| anyhow!(e))?,
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .context("the client certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name =
        ServerName::try_from(host.to_owned()).map_err(|e| anyhow!("--server {}: {e}", t.server))?;
    let authority = authority.to_owned();
    Endpoint::from_shared(format!("http://{authority}"))?
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, name, authority) = (connector.clone(), name.clone(), authority.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(authority.as_str()).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .with_context(|| format!("connecting to the remote admin API at {}", t.server))
}
