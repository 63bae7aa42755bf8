//! Federation: the bundles of other trust domains, obtained and kept current so that the
//! agent can hand them to its workloads (the Workload API's federated bundles), which then
//! authenticate peers across trust domains (issue 18 point 6). Read-only: the agent fetches
//! foreign bundles; it serves no bundle endpoint of its own.
//!
//! Each `[[federation]]` entry ([`config`]) names one foreign trust domain and where its
//! bundle comes from:
//!
//! - **a file** the operator keeps current (a SPIFFE bundle, or PEM roots). It is read at
//!   start, and re-read every few seconds; only a change of content counts, so a file replaced
//!   in place and a Kubernetes ConfigMap's atomic symlink swap are both seen, and an unchanged
//!   file costs a read and a hash. A local update is the latest bundle whatever its sequence
//!   number (§4.2 of the SPIFFE Federation standard).
//! - **a bundle endpoint** ([`endpoint`]), polled at the operator's `refresh`, else at the
//!   bundle's `spiffe_refresh_hint` (clamped to 5 s..1 h, so that a foreign server can neither
//!   make us hammer it nor stop us from hearing of a revocation for weeks), else every five
//!   minutes (§4.1). A failed poll is retried after min(refresh, 30 s), doubling up to the
//!   refresh interval. The standard (§6.2) says to retry at the next interval; the first few
//!   retries come sooner so that a node that starts while an endpoint blips is not left
//!   without the bundle for a whole interval, and after that it is the standard's pace.
//!
//! A fetch that fails or returns an invalid bundle changes nothing: the last good bundle stays
//! served and `federated_bundle_refresh_failed` says why. A fetched bundle whose
//! `spiffe_sequence` is lower than that of the last bundle fetched from the endpoint is refused
//! as older (§4.2: the sequence orders bundles). A bundle without a sequence number is taken
//! as the latest, as the standard says.
//!
//! `https_spiffe` endpoints ([`verify`]) are authenticated with the current X.509 roots of the
//! endpoint's own trust domain. For a self-serving endpoint that is the bundle being fetched:
//! the operator's bootstrap bundle until the first fetch succeeds, then always the latest one
//! fetched (§5.2.2.4: "the latest available bundle MUST be used"). The bootstrap bundle is also
//! what workloads get until then: the standard has the operator provide "an up-to-date copy"
//! of the foreign bundle to bootstrap with (§5.2.2.2), and a locally provided bundle is the
//! latest until a refresh replaces it (§4.2). A non-self-serving endpoint is authenticated
//! with the bundle of its trust domain, which another entry provides. A trust domain that
//! publishes an empty bundle has revoked every key (Trust Domain and Bundle §4.1.3): that is
//! served, and a self-serving endpoint of it can then no longer be authenticated until the
//! operator bootstraps it again.
//!
//! Every change of what workloads would see (roots or JWT keys; not the sequence alone) bumps
//! the [`Federation::subscribe`] counter; bundles of different trust domains are never merged
//! (§4.2).

pub mod bundle;
pub mod config;
pub mod endpoint;
pub mod verify;

#[cfg(test)]
mod testing;

pub use bundle::{BundleError, FederatedBundle, MAX_BUNDLE_BYTES};
pub use config::{
    resolve, BundleSource, EndpointProfile, EndpointSettings, FederationEntry, FederationSettings,
};
pub use endpoint::FetchError;
pub use verify::SpiffeServerVerifier;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::ClientConfig;
use sha2::{Digest, Sha256};
use spiffe::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use url::Url;

/// Poll interval of an endpoint whose bundle has no refresh hint (§6.1 of the Trust Domain and
/// Bundle standard recommends about five minutes).
const DEFAULT_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Bounds on a bundle's refresh hint.
const MIN_REFRESH_HINT: Duration = Duration::from_secs(5);
const MAX_REFRESH_HINT: Duration = Duration::from_secs(60 * 60);
/// The first retry after a failed poll comes after at most this long.
const FIRST_RETRY: Duration = Duration::from_secs(30);
/// How often bundle files are looked at.
const FILE_POLL: Duration = Duration::from_secs(5);
/// One fetch, connection, TLS, redirects and body together.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a bundle could not be read or fetched. Each names its file or URL.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FederationError {
    #[error("cannot read {}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: Arc<io::Error>,
    },
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: BundleError },
    #[error("web_roots_file {}: {problem}", path.display())]
    WebRoots { path: PathBuf, problem: String },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(
        "{url}: spiffe_sequence {offered} is lower than {current}, that of the last bundle \
         fetched; refused as older"
    )]
    OlderSequence {
        url: String,
        current: u64,
        offered: u64,
    },
}

/// The foreign trust domains' bundles, kept current by [`Federation::run`].
pub struct Federation {
    sources: Vec<Source>,
    /// Trust domain name -> its bundle; a trust domain whose endpoint has not answered yet has
    /// none.
    bundles: RwLock<BTreeMap<String, Arc<FederatedBundle>>>,
    changes: watch::Sender<u64>,
    file_poll: Duration,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("bundles", &self.bundles())
            .finish_non_exhaustive()
    }
}

struct Source {
    trust_domain: TrustDomain,
    kind: Kind,
}

enum Kind {
    File {
        path: PathBuf,
        /// Of the contents read at start.
        digest: [u8; 32],
    },
    Endpoint {
        url: Url,
        refresh: Option<Duration>,
        auth: Auth,
    },
}

enum Auth {
    Web(Arc<ClientConfig>),
    Spiffe(SpiffeId),
}

impl Federation {
    /// Reads every bundle file and bootstrap bundle (and `web_roots_file`) now: a file that
    /// cannot be read or parsed is an error that names it. Endpoints are first fetched by
    /// [`Federation::run`].
    pub fn start(settings: Vec<FederationSettings>) -> Result<Arc<Federation>, FederationError> {
        Self::start_polling(settings, FILE_POLL)
    }

    fn start_polling(
        settings: Vec<FederationSettings>,
        file_poll: Duration,
    ) -> Result<Arc<Federation>, FederationError> {
        let mut initial = Vec::new();
        let mut sources = Vec::new();
        for FederationSettings {
            trust_domain,
            source,
        } in settings
        {
            let kind = match source {
                BundleSource::File(path) => {
                    let contents = read_bounded(&path)?;
                    initial.push((parse_file(&trust_domain, &path, &contents)?, path.clone()));
                    Kind::File {
                        digest: Sha256::digest(&contents).into(),
                        path,
                    }
                }
                BundleSource::Endpoint(e) => {
                    let auth = match e.profile {
                        EndpointProfile::HttpsWeb { web_roots_file } => {
                            Auth::Web(web_tls(web_roots_file.as_deref())?)
                        }
                        EndpointProfile::HttpsSpiffe {
                            endpoint_spiffe_id,
                            bootstrap_bundle_file,
                        } => {
                            if let Some(path) = bootstrap_bundle_file {
                                let contents = read_bounded(&path)?;
                                initial.push((parse_file(&trust_domain, &path, &contents)?, path));
                            }
                            Auth::Spiffe(endpoint_spiffe_id)
                        }
                    };
                    Kind::Endpoint {
                        url: e.url,
                        refresh: e.refresh,
                        auth,
                    }
                }
            };
            sources.push(Source { trust_domain, kind });
        }
        let federation = Federation {
            sources,
            bundles: RwLock::new(BTreeMap::new()),
            changes: watch::Sender::new(0),
            file_poll,
        };
        for (bundle, path) in initial {
            federation.install(bundle, &path.display().to_string());
        }
        Ok(Arc::new(federation))
    }

    /// The current bundles, sorted by trust domain.
    pub fn bundles(&self) -> Vec<Arc<FederatedBundle>> {
        self.read().values().cloned().collect()
    }

    /// The current bundle of one trust domain.
    pub fn bundle(&self, trust_domain: &TrustDomain) -> Option<Arc<FederatedBundle>> {
        self.read().get(trust_domain.as_str()).cloned()
    }

    /// A counter that changes whenever a bundle's roots or JWT keys change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether no foreign trust domain is configured (there is then nothing to serve or run).
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Keeps every bundle current until `shutdown`: files re-read, endpoints polled, the first
    /// fetch at once. Run it once; it returns when `shutdown` is cancelled, a fetch in flight
    /// abandoned.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let keepers = self.sources.iter().map(|source| async {
            match &source.kind {
                Kind::File { path, digest } => {
                    self.keep_file(&source.trust_domain, path, *digest, &shutdown)
                        .await
                }
                Kind::Endpoint { url, refresh, auth } => {
                    self.keep_endpoint(&source.trust_domain, url, *refresh, auth, &shutdown)
                        .await
                }
            }
        });
        futures::future::join_all(keepers).await;
    }

    async fn keep_file(
        &self,
        trust_domain: &TrustDomain,
        path: &Path,
        mut seen: [u8; 32],
        shutdown: &CancellationToken,
    ) {
        // A file that stays broken is reported once, not at every look.
        let mut reported: Option<String> = None;
        while !cancelled_during(self.file_poll, shutdown).await {
            let outcome = read_bounded(path).and_then(|contents| {
                let digest: [u8; 32] = Sha256::digest(&contents).into();
                if digest == seen {
                    return Ok(None);
                }
                seen = digest;
                parse_file(trust_domain, path, &contents).map(Some)
            });
            match outcome {
                Ok(None) => {}
                Ok(Some(bundle)) => {
                    reported = None;
                    self.install(bundle, &path.display().to_string());
                }
                Err(e) => {
                    let reason = e.to_string();
                    if reported.as_ref() != Some(&reason) {
                        tracing::warn!(
                            event = "federated_bundle_refresh_failed",
                            trust_domain = %trust_domain,
                            source = %path.display(),
                            reason = %reason,
                            "the bundle file cannot be used; the last good bundle stays"
                        );
                        reported = Some(reason);
                    }
                }
            }
        }
    }

    async fn keep_endpoint(
        &self,
        trust_domain: &TrustDomain,
        url: &Url,
        refresh: Option<Duration>,
        auth: &Auth,
        shutdown: &CancellationToken,
    ) {
        let mut last_sequence = None;
        let mut retry: Option<Duration> = None;
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                outcome = self.fetch(trust_domain, url, auth, last_sequence) => outcome,
            };
            let interval = refresh.unwrap_or_else(|| self.hinted_refresh(trust_domain));
            let wait = match outcome {
                Ok(sequence) => {
                    last_sequence = sequence;
                    retry = None;
                    // Nodes that started together do not all poll at the same instant.
                    interval.mul_f64(rand::random_range(0.9..=1.0))
                }
                Err(e) => {
                    let next = retry.map_or(interval.min(FIRST_RETRY), |r| (r * 2).min(interval));
                    retry = Some(next);
                    tracing::warn!(
                        event = "federated_bundle_refresh_failed",
                        trust_domain = %trust_domain,
                        source = %url,
                        reason = %e,
                        retry_in = ?next,
                        "the bundle endpoint gave no usable bundle; the last good bundle stays"
                    );
                    next
                }
            };
            if cancelled_during(wait, shutdown).await {
                return;
            }
        }
    }

    /// One poll. Returns the sequence number of the bundle fetched.
    async fn fetch(
        &self,
        trust_domain: &TrustDomain,
        url: &Url,
        auth: &Auth,
        last_sequence: Option<u64>,
    ) -> Result<Option<u64>, FederationError> {
        let tls = match auth {
            Auth::Web(tls) => tls.clone(),
            Auth::Spiffe(id) => {
                let roots = self
                    .bundle(id.trust_domain())
                    .map(|b| b.x509_roots_der.clone())
                    .unwrap_or_default();
                endpoint::spiffe_tls(url, id, &roots)?
            }
        };
        let fetched = endpoint::fetch(trust_domain, url, tls, FETCH_TIMEOUT).await?;
        let sequence = fetched.bundle.sequence;
        if let (Some(current), Some(offered)) = (last_sequence, sequence) {
            if offered < current {
                return Err(FederationError::OlderSequence {
                    url: url.to_string(),
                    current,
                    offered,
                });
            }
        }
        // Federation §7.6: each fetch is a link in a chain of trust; it is logged for forensics.
        tracing::info!(
            event = "federated_bundle_fetched",
            trust_domain = %trust_domain,
            url = %url,
            from = %fetched.from,
            sequence = ?sequence,
        );
        self.install(fetched.bundle, url.as_str());
        Ok(sequence)
    }

    /// Serves `bundle` for its trust domain; announces it if workloads would see a change.
    fn install(&self, bundle: FederatedBundle, source: &str) {
        let bundle = Arc::new(bundle);
        let changed = {
            let mut bundles = self.bundles.write().unwrap_or_else(PoisonError::into_inner);
            let changed = bundles
                .get(bundle.trust_domain.as_str())
                .is_none_or(|old| !old.same_keys(&bundle));
            bundles.insert(bundle.trust_domain.to_string(), bundle.clone());
            changed
        };
        if changed {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
            tracing::info!(
                event = "federated_bundle_updated",
                trust_domain = %bundle.trust_domain,
                source = %source,
                x509_roots = bundle.x509_roots_der.len(),
                jwt_keys = bundle.jwt_keys.len(),
                sequence = ?bundle.sequence,
            );
        }
    }

    fn hinted_refresh(&self, trust_domain: &TrustDomain) -> Duration {
        self.bundle(trust_domain)
            .and_then(|b| b.refresh_hint)
            .map_or(DEFAULT_REFRESH, |hint| {
                hint.clamp(MIN_REFRESH_HINT, MAX_REFRESH_HINT)
            })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<FederatedBundle>>> {
        // A map insert cannot be left half done by a panic: poisoning is ignored.
        self.bundles.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sleeps `wait`; true if `shutdown` came first.
async fn cancelled_during(wait: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
    }
}

/// A file's contents, refused past [`MAX_BUNDLE_BYTES`] without reading further. Bundle files
/// are small and local, so this reads in place rather than on a blocking thread.
fn read_bounded(path: &Path) -> Result<Vec<u8>, FederationError> {
    let read_error = |cause| FederationError::Read {
        path: path.to_path_buf(),
        cause: Arc::new(cause),
    };
    let mut contents = Vec::new();
    std::fs::File::open(path)
        .map_err(read_error)?
        .take(MAX_BUNDLE_BYTES as u64 + 1)
        .read_to_end(&mut contents)
        .map_err(read_error)?;
    if contents.len() > MAX_BUNDLE_BYTES {
        return Err(FederationError::File {
            path: path.to_path_buf(),
            problem: BundleError::TooLarge,
        });
    }
    Ok(contents)
}

fn parse_file(
    trust_domain: &TrustDomain,
    path: &Path,
    contents: &[u8],
) -> Result<FederatedBundle, FederationError> {
    FederatedBundle::parse_file(trust_domain, contents).map_err(|problem| FederationError::File {
        path: path.to_path_buf(),
        problem,
    })
}

fn web_tls(web_roots_file: Option<&Path>) -> Result<Arc<ClientConfig>, FederationError> {
    let Some(path) = web_roots_file else {
        return endpoint::web_tls(None).map_err(|problem| FederationError::WebRoots {
            path: PathBuf::from("(built-in web roots)"),
            problem,
        });
    };
    let roots = bundle::pem_certificates(&read_bounded(path)?).map_err(|problem| {
        FederationError::WebRoots {
            path: path.to_path_buf(),
            problem: problem.to_string(),
        }
    })?;
    endpoint::web_tls(Some(&roots)).map_err(|problem| FederationError::WebRoots {
        path: path.to_path_buf(),
        problem,
    })
}

#[cfg(test)]
mod tests;
