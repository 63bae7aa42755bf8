//! Envoy's Secret Discovery Service (SDS v3, `envoy.service.secret.v3.SecretDiscoveryService`)
//! on the workload socket, beside the Workload API: the same callers, attested the same way,
//! get the same identities as Envoy secrets. It answers as SPIRE agent does, so that a mesh
//! configured for SPIRE works unchanged (`names`: what each resource name gives; `session`: the
//! xDS state-of-the-world rules; `secrets`: the Envoy messages).
//!
//! Status codes are chosen in `status` and nowhere else: attestation failed, audit log
//! unavailable or the agent going away → `Unavailable`; attested but holding no identity (or no
//! longer) → `PermissionDenied` "no identity issued"; a name the caller does not hold, a wrong
//! type or a request out of bounds → `InvalidArgument`; `DeltaSecrets` → `Unimplemented`.
//!
//! When a caller's last lease ends, each of its streams gets a last response that no longer
//! holds its secrets, then `PermissionDenied`. What Envoy does with that is described in the
//! README's "Service meshes" section: it keeps the certificate it has until the certificate's
//! notAfter, which is never past the lease's end.

mod names;
mod secrets;
mod session;

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status, Streaming};

use crate::attest::PeerInfo;
use crate::identity::{IdentityError, IdentitySource, TrustBundle, X509Updates};
use crate::svid::X509Svid;
use crate::telemetry::{Metrics, StreamGuard};

pub use names::Aliases;
use names::{resolve, Pick, Resolved};
use secrets::{validation_for, Validation};
use session::{check_request, Fingerprint, Received, Session};

/// The `[sds]` settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SdsSettings {
    pub aliases: Aliases,
    /// Bundles as `trusted_ca` for every node, not the SPIFFE validator (a node's metadata
    /// `disable_spiffe_cert_validation` overrides this either way).
    pub disable_spiffe_cert_validation: bool,
}

/// Why a request gets no answer.
#[derive(Debug)]
pub enum Refusal {
    Identity(IdentityError),
    /// Names nothing gives the caller (sorted).
    Unknown(Vec<String>),
    BadRequest(String),
}

impl From<IdentityError> for Refusal {
    fn from(e: IdentityError) -> Self {
        Refusal::Identity(e)
    }
}

/// The one place this server turns a refusal into a status.
fn status(r: Refusal) -> Status {
    match r {
        Refusal::Identity(e) => match e {
            IdentityError::NoIdentity | IdentityError::Ended | IdentityError::NotAllowed(_) => {
                Status::permission_denied(e.to_string())
            }
            IdentityError::RateLimited(_) => Status::resource_exhausted(e.to_string()),
            IdentityError::BadRequest(_) | IdentityError::InvalidToken(_) => {
                Status::invalid_argument(e.to_string())
            }
            IdentityError::NotAttested(_)
            | IdentityError::Audit(_)
            | IdentityError::Signing(_)
            | IdentityError::ShuttingDown
            | IdentityError::StoreStale => Status::unavailable(e.to_string()),
        },
        Refusal::Unknown(names) => {
            const SHOWN: usize = 8;
            let more = names.len().saturating_sub(SHOWN);
            let mut shown: Vec<&str> = names.iter().take(SHOWN).map(String::as_str).collect();
            let tail = format!("and {more} more");
            if more > 0 {
                shown.push(&tail);
            }
            Status::invalid_argument(format!(
                "workload is not authorized for the requested identities {shown:?}"
            ))
        }
        Refusal::BadRequest(m) => Status::invalid_argument(m),
    }
}

pub struct Sds {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<IdentitySource>,
    settings: SdsSettings,
    metrics: Metrics,
}

impl Sds {
    pub fn new(
        source: Arc<IdentitySource>,
        settings: SdsSettings,
        metrics: Metrics,
    ) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(Sds {
            inner: Arc::new(Inner {
                source,
                settings,
                metrics,
            }),
        })
    }
}

/// What a caller holds now.
struct Holdings {
    svids: Vec<Arc<X509Svid>>,
    bundles: Vec<TrustBundle>,
}

/// An answer: the secrets for the names asked, and what they hold.
struct Answer {
    resolved: Resolved,
    fingerprint: Fingerprint,
}

impl Inner {
    /// Names refused because the caller does not hold them: asking for a SPIFFE ID it does not
    /// hold is a scope violation (a trust domain or a misspelt alias is not).
    async fn violation(&self, caller: &crate::selector::Selectors, refused: &[String]) {
        let ids: Vec<&str> = refused
            .iter()
            .map(String::as_str)
            .filter(|n| spiffe::SpiffeId::new(*n).is_ok_and(|id| !id.path().is_empty()))
            .collect();
        if !ids.is_empty() {
            let what = format!("SDS: the caller does not hold {}", ids.join(", "));
            self.source.scope_violation(caller, &what).await;
        }
    }

    fn answer(&self, names: &BTreeSet<String>, held: &Holdings, how: Validation) -> Answer {
        let own = self.source.trust_domain();
        let tds: Vec<String> = held
            .bundles
            .iter()
            .map(|b| b.trust_domain.clone())
            .collect();
        let ids: Vec<String> = held
            .svids
            .iter()
            .map(|s| s.issued.spiffe_id.to_string())
            .collect();
        let resolved = resolve(names, &self.settings.aliases, &own, &tds, &ids);
        let items = resolved
            .picks
            .iter()
            .map(|p| {
                let content = match p {
                    Pick::Svid { index, .. } => held.svids[*index].issued.serial_hex.clone(),
                    Pick::Bundle { trust_domain, .. } => bundle_digest(
                        held.bundles
                            .iter()
                            .filter(|b| &b.trust_domain == trust_domain),
                    ),
                    Pick::AllBundles { .. } => bundle_digest(held.bundles.iter()),
                };
                (p.name().to_owned(), content)
            })
            .collect();
        Answer {
            resolved,
            fingerprint: Fingerprint {
                validation: Some(how),
                items,
            },
        }
    }

    /// The secrets of an answer, encoded (only when they are sent: they hold keys).
    fn resources(picks: &[Pick], held: &Holdings, how: Validation) -> Vec<Any> {
        picks
            .iter()
            .map(|p| {
                let secret = match p {
                    Pick::Svid { name, index } => {
                        secrets::tls_certificate(name, &held.svids[*index])
                    }
                    Pick::Bundle { name, trust_domain } => {
                        let one: Vec<&TrustBundle> = held
                            .bundles
                            .iter()
                            .filter(|b| &b.trust_domain == trust_domain)
                            .collect();
                        secrets::validation_context(name, &one, how)
                    }
                    Pick::AllBundles { name } => {
                        let all: Vec<&TrustBundle> = held.bundles.iter().collect();
                        secrets::validation_context(name, &all, how)
                    }
                };
                secrets::resource(&secret)
            })
            .collect()
    }

    fn validation(&self, session: &Session) -> Validation {
        validation_for(session.node(), self.settings.disable_spiffe_cert_validation)
    }
}

fn bundle_digest<'a>(bundles: impl Iterator<Item = &'a TrustBundle>) -> String {
    let mut h = Sha256::new();
    for b in bundles {
        h.update(b.trust_domain.as_bytes());
        for r in &b.roots_der {
            h.update((r.len() as u64).to_be_bytes());
            h.update(r);
        }
    }
    hex::encode(&h.finalize()[..16])
}

fn peer<T>(req: &Request<T>) -> Option<PeerInfo> {
    req.extensions().get::<PeerInfo>().cloned()
}

/// What moves a stream on.
enum Event {
    Request(Box<DiscoveryRequest>),
    /// The client closed its side, or went away.
    RequestsDone,
    Svids(Result<Vec<Arc<X509Svid>>, IdentityError>),
    Bundles,
}

type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// One open `StreamSecrets`: it runs only while the connection polls it (no task per stream).
struct Driver {
    inner: Arc<Inner>,
    events: Events,
    session: Session,
    held: Holdings,
    /// The caller's identity is gone: the stream ends after the withdrawal.
    ended: bool,
    /// The caller's selectors, for the leases a scope violation ends.
    caller: crate::selector::Selectors,
    _open: StreamGuard,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Driver {
    fn new(
        inner: Arc<Inner>,
        requests: Streaming<DiscoveryRequest>,
        first: Vec<Arc<X509Svid>>,
        updates: X509Updates,
    ) -> Driver {
        let requests = requests
            .map(|r| match r {
                Ok(req) => Event::Request(Box::new(req)),
                Err(_) => Event::RequestsDone,
            })
            .chain(futures::stream::once(async { Event::RequestsDone }));
        let caller = updates.selectors().clone();
        // `X509Updates::next` must not be dropped half way (it would lose a change), so it
        // runs as a stream of its own, merged with the others rather than raced against them.
        let svids = futures::stream::unfold(Some(updates), |updates| async move {
            let mut updates = updates?;
            let next = updates.next().await;
            let more = next.is_ok().then_some(updates);
            Some((Event::Svids(next), more))
        });
        let bundles =
            tokio_stream::wrappers::WatchStream::from_changes(inner.source.x509_bundle_changes())
                .map(|_| Event::Bundles);
        let events: Events = Box::pin(futures::stream::select(
            requests,
            futures::stream::select(svids, bundles),
        ));
        let held = Holdings {
            svids: first,
            bundles: inner.source.x509_trust_bundles(),
        };
        Driver {
            _open: StreamGuard::new(&inner.metrics.sds_streams),
            inner,
            events,
            session: Session::default(),
            held,
            ended: false,
            caller,
        }
    }

    /// The next response, or the status that ends the stream (`Err`), or the end (`None`).
    async fn next(&mut self) -> Option<Result<DiscoveryResponse, Refusal>> {
        loop {
            let on_request = match self.events.next().await? {
                Event::Request(req) => {
                    let nack = match self.session.receive(*req) {
                        Ok(Received::Stale) => continue,
                        Ok(Received::Applied { nack }) => nack,
                        Err(r) => return Some(Err(r)),
                    };
                    if let Some(reason) = nack {
                        self.inner.metrics.sds_nacks.inc();
                        tracing::warn!(
                            event = "sds_nack",
                            names = ?self.session.names(),
                            version = %self.session.version(),
                            reason = %reason,
                            "Envoy rejected the secrets it was sent"
                        );
                    }
                    true
                }
                Event::RequestsDone => return None,
                Event::Svids(Ok(svids)) => {
                    self.held.svids = svids;
                    false
                }
                Event::Svids(Err(IdentityError::Ended)) => return Some(self.withdraw()),
                Event::Svids(Err(e)) => return Some(Err(e.into())),
                Event::Bundles => {
                    self.held.bundles = self.inner.source.x509_trust_bundles();
                    false
                }
            };
            let Some(names) = self.session.names().cloned() else {
                continue; // nothing asked yet
            };
            let how = self.inner.validation(&self.session);
            let answer = self.inner.answer(&names, &self.held, how);
            // A name the caller never held is refused; one this stream was given and the
            // caller no longer holds (its lease ended while another goes on) is left out, on
            // Envoy's ACK as on the update: that is how state of the world withdraws it.
            if on_request {
                let session = &self.session;
                let never: Vec<String> = answer
                    .resolved
                    .unknown
                    .iter()
                    .filter(|n| !session.has_sent(n))
                    .cloned()
                    .collect();
                if !never.is_empty() {
                    self.inner.violation(&self.caller, &never).await;
                    return Some(Err(Refusal::Unknown(never)));
                }
            }
            if on_request && !answer.resolved.skipped.is_empty() {
                tracing::debug!(names = ?answer.resolved.skipped, "SDS names for files left unanswered");
            }
            let (held, picks) = (&self.held, &answer.resolved.picks);
            if let Some(resp) = self
                .session
                .respond(answer.fingerprint, || Inner::resources(picks, held, how))
            {
                self.inner.metrics.sds_pushes.inc();
                return Some(Ok(resp));
            }
        }
    }

    /// The caller's last lease ended: a last response without its secrets, if it has been
    /// sent any, then the stream ends.
    fn withdraw(&mut self) -> Result<DiscoveryResponse, Refusal> {
        self.held.svids.clear();
        self.ended = true;
        let empty = Fingerprint::default();
        match self.session.respond(empty, Vec::new) {
            Some(resp) => {
                self.inner.metrics.sds_pushes.inc();
                Ok(resp)
            }
            None => Err(IdentityError::Ended.into()),
        }
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "DeltaSecrets is not implemented; use StreamSecrets",
        ))
    }

    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let peer = peer(&request);
        let (first, updates) = self
            .inner
            .source
            .x509_svids(peer, "StreamSecrets")
            .await
            .map_err(|e| status(e.into()))?;
        let driver = Driver::new(self.inner.clone(), request.into_inner(), first, updates);
        // After a withdrawal response, the stream still ends with the refusal.
        let stream = futures::stream::unfold(Some(driver), |state| async move {
            let mut driver = state?;
            if driver.ended {
                return Some((Err(status(IdentityError::Ended.into())), None));
            }
            match driver.next().await? {
                Ok(resp) => Some((Ok(resp), Some(driver))),
                Err(r) => Some((Err(status(r)), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let peer = peer(&request);
        let req = request.into_inner();
        let names = check_request(&req).map_err(status)?;
        let (svids, updates) = self
            .inner
            .source
            .x509_svids(peer, "FetchSecrets")
            .await
            .map_err(|e| status(e.into()))?;
        let held = Holdings {
            svids,
            bundles: self.inner.source.x509_trust_bundles(),
        };
        let how = validation_for(
            req.node.as_ref(),
            self.inner.settings.disable_spiffe_cert_validation,
        );
        let answer = self.inner.answer(&names, &held, how);
        if !answer.resolved.unknown.is_empty() {
            self.inner
                .violation(updates.selectors(), &answer.resolved.unknown)
                .await;
            return Err(status(Refusal::Unknown(answer.resolved.unknown)));
        }
        // Unary: no version and no nonce.
        Ok(Response::new(DiscoveryResponse {
            resources: Inner::resources(&answer.resolved.picks, &held, how),
            type_url: secrets::secret_type_url(),
            ..DiscoveryResponse::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_refusal_has_the_status_spire_gives() {
        let code = |r: Refusal| status(r).code();
        assert_eq!(
            code(IdentityError::NotAttested("gone".into()).into()),
            Code::Unavailable
        );
        assert_eq!(code(IdentityError::ShuttingDown.into()), Code::Unavailable);
        assert_eq!(
            code(IdentityError::NoIdentity.into()),
            Code::PermissionDenied
        );
        assert_eq!(code(IdentityError::Ended.into()), Code::PermissionDenied);
        assert_eq!(code(Refusal::BadRequest("x".into())), Code::InvalidArgument);
        let many: Vec<String> = (0..20).map(|i| format!("spiffe://td/{i}")).collect();
        let s = status(Refusal::Unknown(many));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("and 12 more"), "{}", s.message());
    }
}
