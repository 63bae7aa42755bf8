//! The identity source: what every server on the workload socket needs, whatever its wire
//! protocol. It attests a caller from its kernel facts, hands it the identities its leases give
//! it (X.509-SVIDs, JWT-SVIDs, bundles), follows them as they rotate, change or end, and refuses
//! a caller that holds none with an audit record.
//!
//! Errors are [`IdentityError`]s; each server turns them into its own status codes.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::attest::k8s::K8sAttestor;
use crate::attest::{Attestation, Attestor, PeerInfo};
use crate::audit::{event, Audit, Event};
use crate::authority::federation::Federation;
use crate::authority::jwt_keys::JwtKeys;
use crate::authority::x509::CaHandle;
use crate::lease::{Changes, Leases};
use crate::svid::wit::{WitError, WitIssuer, WitSvid};
use crate::svid::{
    AuditUnavailable, JwtFetchError, JwtSvid, Manager, Requester, Watcher, X509Svid,
};
use crate::telemetry::{Metrics, ResultLabel, StreamGuard};

const NO_IDENTITY: &str = "no identity issued";

/// Why a caller gets no identity (or no more of it).
#[derive(Clone, Debug, thiserror::Error)]
pub enum IdentityError {
    /// The caller's kernel facts could not be read (or it came without any).
    #[error("caller could not be attested: {0}")]
    NotAttested(String),
    /// Attested, but no active lease covers the caller (refused, audited).
    #[error("{NO_IDENTITY}")]
    NoIdentity,
    /// The caller held an identity and no longer does: its lease ended.
    #[error("{NO_IDENTITY}")]
    Ended,
    /// The caller asked for an identity it does not hold, or an audience its lease does not
    /// allow.
    #[error("{0}")]
    NotAllowed(String),
    /// Issuance is refused while its audit record cannot be made durable (fail closed).
    #[error(transparent)]
    Audit(#[from] AuditUnavailable),
    /// Signing failed.
    #[error("{0}")]
    Signing(String),
    /// The request itself is malformed (a field out of bounds).
    #[error("{0}")]
    BadRequest(String),
    /// The caller asks faster than its lease may mint.
    #[error("{0}")]
    RateLimited(String),
    /// A token presented for validation is not a valid JWT-SVID.
    #[error("invalid JWT-SVID: {0}")]
    InvalidToken(String),
    #[error("agent shutting down")]
    ShuttingDown,
    /// This agent has not heard its shared lease store for too long to know of revocations:
    /// it issues nothing until it does.
    #[error("lease store out of reach for longer than store.max_staleness: no identity issued until it answers")]
    StoreStale,
}

/// One trust domain's X.509 roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    /// The trust domain's name, without the scheme.
    pub trust_domain: String,
    /// Each root certificate, DER.
    pub roots_der: Vec<Vec<u8>>,
}

/// Which trust bundle a caller follows.
#[derive(Clone, Copy, Debug)]
pub enum BundleKind {
    X509,
    Jwt,
    Wit,
}

/// The parts of the agent an identity server draws on.
pub struct Parts {
    pub manager: Arc<Manager>,
    pub registry: Arc<Leases>,
    pub ca: Arc<CaHandle>,
    pub jwt_keys: Arc<JwtKeys>,
    /// WIT-SVIDs: their own signing keys, and each lease's current one.
    pub wits: Arc<WitIssuer>,
    /// Other trust domains' bundles, served beside this one's.
    pub federation: Arc<Federation>,
    pub audit: Audit,
    pub attestor: Arc<Attestor>,
    pub k8s: Arc<K8sAttestor>,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
}

pub struct IdentitySource {
    parts: Parts,
    /// Change when this trust domain's X.509 roots or JWT keys change, or a federated bundle.
    x509_changes: watch::Receiver<u64>,
    jwt_changes: watch::Receiver<u64>,
    wit_changes: watch::Receiver<u64>,
}

impl IdentitySource {
    /// Call within the runtime: it starts what merges the bundles' change signals.
    pub fn new(parts: Parts) -> Arc<Self> {
        let federated = parts.federation.subscribe();
        let x509_changes = merged(parts.ca.subscribe(), federated.clone(), &parts.shutdown);
        let jwt_changes = merged(
            parts.jwt_keys.subscribe(),
            federated.clone(),
            &parts.shutdown,
        );
        let wit_changes = merged(parts.wits.keys().subscribe(), federated, &parts.shutdown);
        Arc::new(IdentitySource {
            parts,
            x509_changes,
            jwt_changes,
            wit_changes,
        })
    }

    /// Attests the process behind a request: unix facts from the kernel, then what the
    /// kubelet says about the pod and container whose cgroup it is in.
    pub async fn attest(
        &self,
        peer: Option<PeerInfo>,
        rpc: &'static str,
    ) -> Result<Attestation, IdentityError> {
        let p = &self.parts;
        let mut result = attest_unix(&p.attestor, peer, rpc).await;
        // Pod facts come from the cgroup file read (and proven) with the unix facts; the
        // kubelet only adds what it says about that pod and container.
        if let Ok(att) = &mut result {
            if let Some(cgroup) = &att.cgroup {
                let pod = p.k8s.selectors_for(cgroup).await;
                if !pod.is_empty() {
                    att.selectors.extend(pod);
                }
            }
        }
        let label = ResultLabel {
            result: if result.is_ok() { "ok" } else { "failed" }.into(),
        };
        p.metrics.attestations.get_or_create(&label).inc();
        result
    }

    /// Refuses a caller that holds no identity; the denial is logged and audited.
    pub async fn deny(&self, rpc: &'static str, att: &Attestation) -> IdentityError {
        if self.parts.registry.suspended() {
            return IdentityError::StoreStale;
        }
        tracing::info!(
            event = "request_denied",
            rpc,
            pid = att.pid,
            uid = att.uid,
            selectors = %att.selectors.joined(),
            reason = NO_IDENTITY,
            "no lease matches the caller"
        );
        let who = event::Requester {
            rpc,
            pid: att.pid,
            uid: att.uid,
            exe_sha256: att.exe_sha256.as_deref(),
            selectors: att.selectors.iter().map(|s| s.as_str()).collect(),
        };
        let denied = Event::RequestDenied(who, NO_IDENTITY);
        if let Err(e) = self.parts.audit.record(&denied).await {
            tracing::error!(error = %e, "could not audit a denial");
        }
        IdentityError::NoIdentity
    }

    /// The caller's X.509-SVIDs now (issued if missing), and a follower for what comes next.
    /// A caller that holds none is refused (and audited).
    pub async fn x509_svids(
        self: &Arc<Self>,
        peer: Option<PeerInfo>,
        rpc: &'static str,
    ) -> Result<(Vec<Arc<X509Svid>>, X509Updates), IdentityError> {
        let att = self.attest(peer.clone(), rpc).await?;
        let who = requester(&att);
        let mut watcher = self
            .parts
            .manager
            .watcher(att.selectors.clone(), who.clone());
        let first = watcher.current().await?;
        if first.is_empty() {
            return Err(self.deny(rpc, &att).await);
        }
        let updates = X509Updates {
            source: self.clone(),
            rpc,
            peer,
            att,
            who,
            watcher,
            sent: serials(&first),
            bundle: self.x509_bundle_changes(),
            _open: StreamGuard::new(&self.parts.metrics.open_streams),
        };
        Ok((first, updates))
    }

    /// Follows a trust bundle for an attested caller. A caller that holds no identity is
    /// refused (and audited); one whose identity ends is told so.
    pub async fn bundles(
        self: &Arc<Self>,
        att: Attestation,
        rpc: &'static str,
        kind: BundleKind,
    ) -> Result<BundleUpdates, IdentityError> {
        let p = &self.parts;
        let leases = p.registry.changes(&att.selectors);
        let mut refresh = match kind {
            BundleKind::X509 => self.x509_changes.clone(),
            BundleKind::Jwt => self.jwt_changes.clone(),
            BundleKind::Wit => self.wit_changes.clone(),
        };
        refresh.mark_unchanged();
        if !p.registry.matches_any(&att.selectors) {
            return Err(self.deny(rpc, &att).await);
        }
        Ok(BundleUpdates {
            source: self.clone(),
            rpc,
            att,
            leases,
            refresh,
            _open: StreamGuard::new(&p.metrics.open_streams),
        })
    }

    /// JWT-SVIDs for an attested caller (every identity it holds, or only `spiffe_id`), for
    /// `audiences` (sorted, deduplicated, non-empty).
    pub async fn jwt_svids(
        &self,
        att: &Attestation,
        rpc: &'static str,
        audiences: &[String],
        spiffe_id: Option<&str>,
    ) -> Result<Vec<Arc<JwtSvid>>, IdentityError> {
        // The same bounds as on the audiences a lease may be granted: one caller must not
        // make the agent mint, cache and audit tokens for megabytes of audiences.
        crate::lease::check_audiences("audience", audiences)
            .map_err(|e| IdentityError::BadRequest(e.to_string()))?;
        let who = requester(att);
        match self
            .parts
            .manager
            .jwt_svids(&att.selectors, &who, audiences, spiffe_id)
            .await
        {
            Ok(svids) => Ok(svids),
            Err(JwtFetchError::NoIdentity) => Err(self.deny(rpc, att).await),
            Err(e @ (JwtFetchError::NotHeld(_) | JwtFetchError::AudienceNotAllowed(_))) => {
                tracing::info!(event = "request_denied", rpc, pid = att.pid, uid = att.uid, reason = %e, "jwt-svid refused");
                self.scope_violation(&att.selectors, &format!("{rpc}: {e}"))
                    .await;
                Err(IdentityError::NotAllowed(e.to_string()))
            }
            Err(JwtFetchError::Audit(e)) => Err(IdentityError::Audit(e)),
            Err(e @ JwtFetchError::Signing(_)) => Err(IdentityError::Signing(e.to_string())),
            Err(e @ JwtFetchError::RateLimited { .. }) => {
                Err(IdentityError::RateLimited(e.to_string()))
            }
        }
    }

    /// A caller asked for what its leases do not allow (an audience, a SPIFFE ID it does not
    /// hold): those of its leases granted to end on a scope violation end now, revoked.
    pub async fn scope_violation(&self, caller: &crate::selector::Selectors, what: &str) {
        self.parts.registry.violated(caller, what).await;
    }

    /// Checks a JWT-SVID for `audience` against this trust domain's keys; its claims if valid.
    pub fn validate_jwt(
        &self,
        att: &Attestation,
        token: &str,
        audience: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, IdentityError> {
        self.parts
            .manager
            .validate_jwt(token, audience)
            .map_err(|e| {
                tracing::info!(event = "jwt_invalid", pid = att.pid, uid = att.uid, reason = %e, "jwt-svid validation failed");
                IdentityError::InvalidToken(e)
            })
    }

    /// This agent's trust domain, without the scheme.
    pub fn trust_domain(&self) -> String {
        self.parts.ca.current().trust_domain().to_string()
    }

    /// This trust domain's X.509 bundle, as it is now.
    pub fn x509_bundle_now(&self) -> Arc<crate::authority::x509::Bundle> {
        self.parts.ca.bundle()
    }

    /// This trust domain's X.509 bundle: its ID (`spiffe://td`) and the CA certificates, DER.
    pub fn x509_bundle(&self) -> (String, Vec<u8>) {
        (
            format!("spiffe://{}", self.parts.ca.current().trust_domain()),
            self.parts.ca.bundle().der().to_vec(),
        )
    }

    /// Every X.509 bundle the agent knows, sorted by trust domain: this trust domain's and the
    /// federated ones (each with at least one root).
    pub fn x509_trust_bundles(&self) -> Vec<TrustBundle> {
        let mut all = vec![TrustBundle {
            trust_domain: self.trust_domain(),
            roots_der: self.parts.ca.bundle().roots_der().to_vec(),
        }];
        all.extend(
            self.parts
                .federation
                .bundles()
                .into_iter()
                .filter(|b| !b.x509_roots_der.is_empty())
                .map(|b| TrustBundle {
                    trust_domain: b.trust_domain.to_string(),
                    roots_der: b.x509_roots_der.clone(),
                }),
        );
        all.sort_by(|a, b| a.trust_domain.cmp(&b.trust_domain));
        all
    }

    /// The federated X.509 bundles by trust domain ID (`spiffe://td`), roots as concatenated
    /// DER: `federated_bundles` of the X.509-SVID stream.
    pub fn x509_federated(&self) -> HashMap<String, Vec<u8>> {
        self.parts
            .federation
            .bundles()
            .into_iter()
            .filter(|b| !b.x509_roots_der.is_empty())
            .map(|b| (b.trust_domain.id_string(), b.x509_bundle_der()))
            .collect()
    }

    /// Every X.509 bundle by trust domain ID: this trust domain's and the federated ones.
    pub fn x509_bundles(&self) -> HashMap<String, Vec<u8>> {
        let mut all = self.x509_federated();
        all.extend([self.x509_bundle()]);
        all
    }

    /// Changes whenever the X.509 bundles may have, from now on.
    pub fn x509_bundle_changes(&self) -> watch::Receiver<u64> {
        let mut rx = self.x509_changes.clone();
        rx.mark_unchanged();
        rx
    }

    /// This trust domain's JWT bundle: its ID and the JWKS document.
    pub fn jwt_bundle(&self) -> (String, Vec<u8>) {
        (
            format!("spiffe://{}", self.parts.ca.current().trust_domain()),
            self.parts.jwt_keys.jwks(),
        )
    }

    /// Every JWT bundle by trust domain ID: this trust domain's, and the federated ones that
    /// have JWT keys, each a JWK Set.
    pub fn jwt_bundles(&self) -> HashMap<String, Vec<u8>> {
        let mut all: HashMap<String, Vec<u8>> = self
            .parts
            .federation
            .bundles()
            .into_iter()
            .filter(|b| !b.jwt_keys.is_empty())
            .map(|b| (b.trust_domain.id_string(), b.jwks_document()))
            .collect();
        all.extend([self.jwt_bundle()]);
        all
    }

    /// The WIT bundles by trust domain ID, each a JWK Set (JSON text): this trust domain's WIT
    /// signing keys (`use: wit-svid`). Federated bundles carry no WIT keys yet.
    pub fn wit_bundles(&self) -> HashMap<String, String> {
        let td = format!("spiffe://{}", self.parts.ca.current().trust_domain());
        let jwks = String::from_utf8(self.parts.wits.keys().jwks()).unwrap_or_default();
        HashMap::from([(td, jwks)])
    }

    /// The caller's WIT-SVIDs now (every identity it holds, or only `wanted`), and a follower
    /// for what comes next. A caller that holds none is refused (and audited).
    pub async fn wit_svids(
        self: &Arc<Self>,
        peer: Option<PeerInfo>,
        rpc: &'static str,
        wanted: Option<String>,
    ) -> Result<(Vec<Arc<WitSvid>>, WitUpdates), IdentityError> {
        let att = self.attest(peer.clone(), rpc).await?;
        // Listening before looking: a change in between is not missed.
        let leases = self.parts.registry.changes(&att.selectors);
        let mut keys = self.wit_changes.clone();
        keys.mark_unchanged();
        let who = requester(&att);
        let first = self.current_wits(&att, &who, wanted.as_deref()).await?;
        if first.is_empty() {
            if wanted.is_some() && self.parts.registry.matches_any(&att.selectors) {
                return Err(IdentityError::NotAllowed(format!(
                    "the caller holds no identity {}",
                    wanted.unwrap_or_default()
                )));
            }
            return Err(self.deny(rpc, &att).await);
        }
        let updates = WitUpdates {
            source: self.clone(),
            rpc,
            peer,
            att,
            who,
            wanted,
            leases,
            keys,
            sent: jtis(&first),
            refresh_at: refresh_at(&first),
            _open: StreamGuard::new(&self.parts.metrics.open_streams),
        };
        Ok((first, updates))
    }

    async fn current_wits(
        &self,
        att: &Attestation,
        who: &Requester,
        wanted: Option<&str>,
    ) -> Result<Vec<Arc<WitSvid>>, IdentityError> {
        let mut out = Vec::new();
        for lease in self.parts.registry.matching(&att.selectors) {
            if wanted.is_some_and(|w| lease.lease.spiffe_id.to_string() != w) {
                continue;
            }
            match self.parts.wits.for_lease(&lease, who).await {
                Ok(Some(wit)) => out.push(wit),
                Ok(None) => {}
                Err(WitError::Audit(e)) => return Err(IdentityError::Audit(e)),
                Err(WitError::Signing(e)) => return Err(IdentityError::Signing(e)),
            }
        }
        Ok(out)
    }
}

fn jtis(wits: &[Arc<WitSvid>]) -> Vec<String> {
    wits.iter().map(|w| w.jti.clone()).collect()
}

/// When the first of these should be replaced.
fn refresh_at(wits: &[Arc<WitSvid>]) -> Option<std::time::SystemTime> {
    wits.iter().map(|w| w.refresh_at()).min()
}

/// A caller's WIT-SVIDs after the first answer: new ones when a lease it could match changes,
/// when the signing key changes, or half way through the life of one it holds. Works only
/// while polled, like [`X509Updates`].
pub struct WitUpdates {
    source: Arc<IdentitySource>,
    rpc: &'static str,
    peer: Option<PeerInfo>,
    att: Attestation,
    who: Requester,
    wanted: Option<String>,
    leases: Changes,
    keys: watch::Receiver<u64>,
    sent: Vec<String>,
    refresh_at: Option<std::time::SystemTime>,
    _open: StreamGuard,
}

impl WitUpdates {
    /// The caller's WIT-SVIDs the next time they differ from the last ones handed out; an
    /// error once it holds none (or cannot be attested again), after which the caller is done.
    pub async fn next(&mut self) -> Result<Vec<Arc<WitSvid>>, IdentityError> {
        loop {
            let wait = self
                .refresh_at
                .map(|t| {
                    t.duration_since(std::time::SystemTime::now())
                        .unwrap_or_default()
                })
                .unwrap_or(std::time::Duration::from_secs(3600));
            tokio::select! {
                _ = self.source.parts.shutdown.cancelled() => return Err(IdentityError::ShuttingDown),
                _ = self.leases.changed() => {}
                r = self.keys.changed() => {
                    if r.is_err() {
                        return Err(IdentityError::ShuttingDown);
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
            if !self.source.parts.registry.matches_any(&self.att.selectors) {
                return Err(ended(self.rpc, &self.att, &self.source.parts.registry));
            }
            // The process may have exec'd something else: attest again before handing it
            // anything new, and follow what it holds now.
            let now = Box::pin(self.source.attest(self.peer.clone(), self.rpc)).await?;
            if now.selectors != self.att.selectors {
                self.leases = self.source.parts.registry.changes(&now.selectors);
                self.who = requester(&now);
            }
            self.att = now;
            let wits = Box::pin(self.source.current_wits(
                &self.att,
                &self.who,
                self.wanted.as_deref(),
            ))
            .await?;
            if wits.is_empty() {
                return Err(ended(self.rpc, &self.att, &self.source.parts.registry));
            }
            self.refresh_at = refresh_at(&wits);
            let jtis = jtis(&wits);
            if jtis != self.sent {
                self.sent = jtis;
                return Ok(wits);
            }
        }
    }
}

/// One signal that changes when either of two does, until `shutdown`.
fn merged(
    mut a: watch::Receiver<u64>,
    mut b: watch::Receiver<u64>,
    shutdown: &CancellationToken,
) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0);
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = a.changed() => if r.is_err() { return },
                r = b.changed() => if r.is_err() { return },
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    rx
}

fn requester(att: &Attestation) -> Requester {
    Requester {
        pid: att.pid,
        uid: att.uid,
        exe_sha256: att.exe_sha256.clone(),
    }
}

fn serials(svids: &[Arc<X509Svid>]) -> Vec<String> {
    svids.iter().map(|s| s.issued.serial_hex.clone()).collect()
}

async fn attest_unix(
    attestor: &Arc<Attestor>,
    peer: Option<PeerInfo>,
    rpc: &'static str,
) -> Result<Attestation, IdentityError> {
    let Some(peer) = peer else {
        return Err(IdentityError::NotAttested("no peer credentials".into()));
    };
    // Inline when the executable's digest is cached (the usual case: a few /proc reads); a
    // hand-off to the blocking pool costs more than that. Hashing a new executable blocks.
    let result = match attestor.attest_cached(&peer) {
        Some(r) => (peer, r),
        None => {
            let attestor = attestor.clone();
            tokio::task::spawn_blocking(move || {
                let r = attestor.attest(&peer);
                (peer, r)
            })
            .await
            .map_err(|_| IdentityError::NotAttested("attestation failed".into()))?
        }
    };
    match result {
        (_, Ok(att)) => Ok(att),
        (peer, Err(e)) => {
            tracing::warn!(
                event = "attestation_failed",
                rpc,
                pid = peer.pid(),
                uid = peer.uid(),
                error = %e,
                "caller could not be attested"
            );
            Err(IdentityError::NotAttested(e.to_string()))
        }
    }
}

/// Ends what a caller follows once it no longer holds any identity (its lease ended). Not
/// audited per stream: the lease's end is the audited event, and one revocation can close
/// thousands of streams.
fn ended(rpc: &'static str, att: &Attestation, registry: &Leases) -> IdentityError {
    if registry.suspended() {
        return IdentityError::StoreStale;
    }
    tracing::debug!(
        event = "stream_ended",
        rpc,
        pid = att.pid,
        uid = att.uid,
        "identity gone, stream closed"
    );
    IdentityError::Ended
}

/// A caller's X.509-SVIDs after the first answer. It does its work only while polled: no task
/// per caller, and a caller that goes away drops it.
pub struct X509Updates {
    source: Arc<IdentitySource>,
    rpc: &'static str,
    peer: Option<PeerInfo>,
    att: Attestation,
    who: Requester,
    watcher: Watcher,
    sent: Vec<String>,
    /// Changes with the bundle every response carries.
    bundle: watch::Receiver<u64>,
    _open: StreamGuard,
}

impl X509Updates {
    /// The caller's selectors, as last attested.
    pub fn selectors(&self) -> &crate::selector::Selectors {
        &self.att.selectors
    }

    /// The caller's SVIDs the next time they differ from the last ones handed out; an error
    /// once it holds none (or cannot be attested again), after which the caller is done.
    pub async fn next(&mut self) -> Result<Vec<Arc<X509Svid>>, IdentityError> {
        loop {
            let mut bundle_changed = false;
            tokio::select! {
                _ = self.source.parts.shutdown.cancelled() => return Err(IdentityError::ShuttingDown),
                _ = self.watcher.changed() => {}
                r = self.bundle.changed() => {
                    if r.is_err() {
                        return Err(IdentityError::ShuttingDown);
                    }
                    bundle_changed = true;
                }
            }
            // Telling a caller its identity is gone needs no attestation, and must not wait
            // for one: with a thousand streams on one lease, this is the fan-out.
            if !self.watcher.holds_any() {
                return Err(ended(self.rpc, &self.att, &self.source.parts.registry));
            }
            // The process may have exec'd something else since it opened the stream: attest
            // again before handing it anything new. Boxed, like `current` below: the stream
            // lives long, and its state would otherwise hold room for these rarely run
            // futures inline (~5 KiB per open stream instead of under 1 KiB).
            let now = Box::pin(self.source.attest(self.peer.clone(), self.rpc)).await?;
            if now.selectors != self.att.selectors {
                self.watcher = self
                    .source
                    .parts
                    .manager
                    .watcher(now.selectors.clone(), self.who.clone());
            }
            self.att = now;
            let svids = Box::pin(self.watcher.current()).await?;
            if svids.is_empty() {
                return Err(ended(self.rpc, &self.att, &self.source.parts.registry));
            }
            let serials = serials(&svids);
            if serials != self.sent || bundle_changed {
                self.sent = serials;
                return Ok(svids);
            }
        }
    }
}

/// A bundle a caller follows, after the first answer.
pub struct BundleUpdates {
    source: Arc<IdentitySource>,
    rpc: &'static str,
    att: Attestation,
    leases: Changes,
    refresh: watch::Receiver<u64>,
    _open: StreamGuard,
}

impl BundleUpdates {
    /// Resolves when the bundle may have changed (`Ok(true)`), when nothing will ever change
    /// it again (`Ok(false)`: the agent is going), or with an error once the caller holds no
    /// identity.
    pub async fn next(&mut self) -> Result<bool, IdentityError> {
        loop {
            let refreshed = self.refresh.changed();
            tokio::select! {
                _ = self.source.parts.shutdown.cancelled() => return Err(IdentityError::ShuttingDown),
                _ = self.leases.changed() => {
                    if !self.source.parts.registry.matches_any(&self.att.selectors) {
                        return Err(ended(self.rpc, &self.att, &self.source.parts.registry));
                    }
                }
                // The sender goes only with the agent.
                alive = refreshed => return Ok(alive.is_ok()),
            }
        }
    }
}
