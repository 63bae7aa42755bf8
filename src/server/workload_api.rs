//! The SPIFFE Workload API server (`SpiffeWorkloadAPI`) on the workload socket.
//!
//! Every RPC (and every stream, again before it is handed anything new) is attested from the
//! caller's kernel facts; a stream is told its identity is gone without that wait. Streams wake
//! only for changes to leases they could match (see `Registry::changes`). The status codes of
//! this server are chosen here and nowhere else: missing `workload.spiffe.io: true` header →
//! `InvalidArgument`; attestation failed or the agent shutting down → `Unavailable`; attested
//! but no active lease → `PermissionDenied` "no identity issued".

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::attest::k8s::K8sAttestor;
use crate::attest::{Attestation, Attestor, PeerInfo};
use crate::lease::Changes;
use crate::proto::workload as pb;
use crate::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use crate::svid::{AuditUnavailable, JwtFetchError, Manager, Requester, Watcher, X509Svid};
use crate::telemetry::{Metrics, ResultLabel, StreamGuard};

const NO_IDENTITY: &str = "no identity issued";

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct WorkloadApi {
    manager: Arc<Manager>,
    attestor: Arc<Attestor>,
    k8s: Arc<K8sAttestor>,
    shutdown: CancellationToken,
}

impl WorkloadApi {
    pub fn new(
        manager: Arc<Manager>,
        attestor: Arc<Attestor>,
        k8s: Arc<K8sAttestor>,
        shutdown: CancellationToken,
    ) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(WorkloadApi {
            manager,
            attestor,
            k8s,
            shutdown,
        })
    }
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get("workload.spiffe.io") {
        Some(v) if v == "true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request: workload.spiffe.io: true",
        )),
    }
}

/// Attests the process behind a request.
async fn attest(
    attestor: &Arc<Attestor>,
    k8s: &K8sAttestor,
    metrics: &Metrics,
    peer: Option<PeerInfo>,
    rpc: &'static str,
) -> Result<Attestation, Status> {
    let mut result = attest_inner(attestor, peer, rpc).await;
    // Pod facts come from the cgroup file read (and proven) with the unix facts; the kubelet
    // only adds what it says about that pod and container.
    if let Ok(att) = &mut result {
        if let Some(cgroup) = &att.cgroup {
            let pod = k8s.selectors_for(cgroup).await;
            if !pod.is_empty() {
                att.selectors.extend(pod);
                att.selectors.sort();
                att.selectors.dedup();
            }
        }
    }
    let label = ResultLabel {
        result: if result.is_ok() { "ok" } else { "failed" }.into(),
    };
    metrics.attestations.get_or_create(&label).inc();
    result
}

async fn attest_inner(
    attestor: &Arc<Attestor>,
    peer: Option<PeerInfo>,
    rpc: &'static str,
) -> Result<Attestation, Status> {
    let Some(peer) = peer else {
        return Err(Status::unavailable(
            "caller could not be attested: no peer credentials",
        ));
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
            .map_err(|_| Status::unavailable("attestation failed"))?
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
            Err(Status::unavailable(format!(
                "caller could not be attested: {e}"
            )))
        }
    }
}

/// Refuses a caller that holds no identity; the denial is logged and audited.
async fn deny(manager: &Manager, rpc: &'static str, att: &Attestation) -> Status {
    tracing::info!(
        event = "request_denied",
        rpc,
        pid = att.pid,
        uid = att.uid,
        selectors = %att.selectors.join(" "),
        reason = NO_IDENTITY,
        "no lease matches the caller"
    );
    if let Some(audit) = manager.audit() {
        let fields = serde_json::json!({
            "rpc": rpc,
            "pid": att.pid,
            "uid": att.uid,
            "exe_sha256": att.exe_sha256,
            "selectors": att.selectors,
            "reason": NO_IDENTITY,
        });
        if let serde_json::Value::Object(fields) = fields {
            if let Err(e) = audit.append("request_denied", fields).await {
                tracing::error!(error = %e, "could not audit a denial");
            }
        }
    }
    Status::permission_denied(NO_IDENTITY)
}

/// Ends an open stream whose caller no longer holds any identity (its lease ended). Not
/// audited per stream: the lease's end is the audited event, and one revocation can close
/// thousands of streams.
fn identity_ended(rpc: &'static str, att: &Attestation) -> Status {
    tracing::debug!(
        event = "stream_ended",
        rpc,
        pid = att.pid,
        uid = att.uid,
        "identity gone, stream closed"
    );
    Status::permission_denied(NO_IDENTITY)
}

fn audit_unavailable(e: AuditUnavailable) -> Status {
    Status::unavailable(e.to_string())
}

fn x509_response(svids: &[Arc<X509Svid>], bundle: &[u8]) -> pb::X509svidResponse {
    pb::X509svidResponse {
        svids: svids
            .iter()
            .map(|s| pb::X509svid {
                spiffe_id: s.issued.spiffe_id.to_string(),
                x509_svid: s.issued.chain_der.clone(),
                x509_svid_key: s.issued.key_pkcs8.to_vec(),
                bundle: bundle.to_vec(),
                hint: String::new(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }
}

fn serials(svids: &[Arc<X509Svid>]) -> Vec<String> {
    svids.iter().map(|s| s.issued.serial_hex.clone()).collect()
}

fn x509_bundles(m: &Manager) -> HashMap<String, Vec<u8>> {
    let ca = m.ca();
    HashMap::from([(
        format!("spiffe://{}", ca.trust_domain()),
        ca.bundle_der().to_vec(),
    )])
}

/// The part of a server stream after its first message. It runs only while the connection
/// polls the response body: no task or channel per stream, and a caller that goes away drops it.
trait Follow: Send + 'static {
    type Item: Send + 'static;

    /// Waits for the next message: `Some(Err(_))` ends the stream with that status, `None`
    /// ends it without one.
    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Item, Status>>> + Send;
}

/// A response stream: `first` at once, then what `follower` yields, until its first error.
fn follow<F: Follow>(first: F::Item, follower: F) -> ResponseStream<F::Item> {
    let rest = futures::stream::unfold(Some(follower), |follower| async move {
        let mut follower = follower?;
        let item = follower.next().await?;
        let follower = item.is_ok().then_some(follower);
        Some((item, follower))
    });
    Box::pin(futures::stream::once(std::future::ready(Ok(first))).chain(rest))
}

fn shutting_down() -> Status {
    Status::unavailable("agent shutting down")
}

/// A bundle stream after its first message: another whenever `refresh` changes, and
/// `PermissionDenied` as soon as the caller no longer holds any identity.
struct BundleFollower<M> {
    rpc: &'static str,
    manager: Arc<Manager>,
    att: Attestation,
    leases: Changes,
    refresh: Option<watch::Receiver<u64>>,
    make: M,
    shutdown: CancellationToken,
    _open: StreamGuard,
}

impl<T, M> Follow for BundleFollower<M>
where
    T: Send + 'static,
    M: Fn(&Manager) -> T + Send + Sync + 'static,
{
    type Item = T;

    async fn next(&mut self) -> Option<Result<T, Status>> {
        loop {
            let refreshed = async {
                match self.refresh.as_mut() {
                    Some(r) => r.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return Some(Err(shutting_down())),
                _ = self.leases.changed() => {
                    if !self.manager.registry().matches_any(&self.att.selectors) {
                        return Some(Err(identity_ended(self.rpc, &self.att)));
                    }
                }
                alive = refreshed => {
                    // The sender goes only with the agent.
                    return alive.then(|| Ok((self.make)(&self.manager)));
                }
            }
        }
    }
}

/// A FetchX509SVID stream after its first message: the caller's SVIDs again whenever they
/// change, and `PermissionDenied` as soon as it no longer holds any identity.
struct X509Follower {
    manager: Arc<Manager>,
    attestor: Arc<Attestor>,
    k8s: Arc<K8sAttestor>,
    peer: Option<PeerInfo>,
    att: Attestation,
    who: Requester,
    watcher: Watcher,
    bundle: Vec<u8>,
    sent: Vec<String>,
    shutdown: CancellationToken,
    _open: StreamGuard,
}

impl X509Follower {
    const RPC: &'static str = "FetchX509SVID";
}

impl Follow for X509Follower {
    type Item = pb::X509svidResponse;

    async fn next(&mut self) -> Option<Result<pb::X509svidResponse, Status>> {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Some(Err(shutting_down())),
                _ = self.watcher.changed() => {}
            }
            // Telling a caller its identity is gone needs no attestation, and must not wait
            // for one: with a thousand streams on one lease, this is the fan-out.
            if !self.watcher.holds_any() {
                return Some(Err(identity_ended(Self::RPC, &self.att)));
            }
            // The process may have exec'd something else since it opened the stream: attest
            // again before handing it anything new. Boxed, like `current` below: the stream
            // lives long, and its state would otherwise hold room for these rarely run
            // futures inline (~5 KiB per open stream instead of under 1 KiB).
            let attested = Box::pin(attest(
                &self.attestor,
                &self.k8s,
                self.manager.metrics(),
                self.peer.clone(),
                Self::RPC,
            ));
            let now = match attested.await {
                Ok(now) => now,
                Err(status) => return Some(Err(status)),
            };
            if now.selectors != self.att.selectors {
                self.watcher = self
                    .manager
                    .watcher(now.selectors.clone(), self.who.clone());
            }
            self.att = now;
            let svids = match Box::pin(self.watcher.current()).await {
                Ok(svids) => svids,
                Err(e) => return Some(Err(audit_unavailable(e))),
            };
            if svids.is_empty() {
                return Some(Err(identity_ended(Self::RPC, &self.att)));
            }
            let serials = serials(&svids);
            if serials != self.sent {
                self.sent = serials;
                return Some(Ok(x509_response(&svids, &self.bundle)));
            }
        }
    }
}

impl WorkloadApi {
    /// A bundle stream: the first message at once, then see [`BundleFollower`].
    async fn bundle_stream<T: Send + 'static>(
        &self,
        rpc: &'static str,
        att: Attestation,
        mut refresh: Option<watch::Receiver<u64>>,
        make: impl Fn(&Manager) -> T + Send + Sync + 'static,
    ) -> Result<ResponseStream<T>, Status> {
        let leases = self.manager.registry().changes(&att.selectors);
        if let Some(r) = refresh.as_mut() {
            r.borrow_and_update();
        }
        if !self.manager.registry().matches_any(&att.selectors) {
            return Err(deny(&self.manager, rpc, &att).await);
        }
        let first = make(&self.manager);
        let follower = BundleFollower {
            rpc,
            manager: self.manager.clone(),
            att,
            leases,
            refresh,
            make,
            shutdown: self.shutdown.clone(),
            _open: StreamGuard::new(&self.manager.metrics().open_streams),
        };
        Ok(follow(first, follower))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        const RPC: &str = X509Follower::RPC;
        check_header(&request)?;
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let att = attest(
            &self.attestor,
            &self.k8s,
            self.manager.metrics(),
            peer.clone(),
            RPC,
        )
        .await?;
        let who = Requester {
            pid: att.pid,
            uid: att.uid,
            exe_sha256: att.exe_sha256.clone(),
        };
        let mut watcher = self.manager.watcher(att.selectors.clone(), who.clone());
        let first = watcher.current().await.map_err(audit_unavailable)?;
        if first.is_empty() {
            return Err(deny(&self.manager, RPC, &att).await);
        }
        let bundle = self.manager.ca().bundle_der().to_vec();
        let response = x509_response(&first, &bundle);
        let follower = X509Follower {
            manager: self.manager.clone(),
            attestor: self.attestor.clone(),
            k8s: self.k8s.clone(),
            peer,
            att,
            who,
            watcher,
            bundle,
            sent: serials(&first),
            shutdown: self.shutdown.clone(),
            _open: StreamGuard::new(&self.manager.metrics().open_streams),
        };
        Ok(Response::new(follow(response, follower)))
    }

    type FetchX509BundlesStream = ResponseStream<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        const RPC: &str = "FetchX509Bundles";
        check_header(&request)?;
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let att = attest(&self.attestor, &self.k8s, self.manager.metrics(), peer, RPC).await?;
        // The X.509 trust bundle does not change while the agent runs: no refresh signal.
        let stream = self
            .bundle_stream(RPC, att, None, |m: &Manager| pb::X509BundlesResponse {
                crl: Vec::new(),
                bundles: x509_bundles(m),
            })
            .await?;
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        const RPC: &str = "FetchJWTSVID";
        check_header(&request)?;
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let req = request.into_inner();
        let mut audiences: Vec<String> =
            req.audience.into_iter().filter(|a| !a.is_empty()).collect();
        if audiences.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        audiences.sort();
        audiences.dedup();
        let att = attest(&self.attestor, &self.k8s, self.manager.metrics(), peer, RPC).await?;
        let who = Requester {
            pid: att.pid,
            uid: att.uid,
            exe_sha256: att.exe_sha256.clone(),
        };
        let wanted = Some(req.spiffe_id.as_str()).filter(|s| !s.is_empty());
        match self
            .manager
            .jwt_svids(&att.selectors, &who, &audiences, wanted)
            .await
        {
            Ok(svids) => Ok(Response::new(pb::JwtsvidResponse {
                svids: svids
                    .iter()
                    .map(|s| pb::Jwtsvid {
                        spiffe_id: s.spiffe_id.clone(),
                        svid: s.token.clone(),
                        hint: String::new(),
                    })
                    .collect(),
            })),
            Err(JwtFetchError::NoIdentity) => Err(deny(&self.manager, RPC, &att).await),
            Err(e @ (JwtFetchError::NotHeld(_) | JwtFetchError::AudienceNotAllowed(_))) => {
                tracing::info!(event = "request_denied", rpc = RPC, pid = att.pid, uid = att.uid, reason = %e, "jwt-svid refused");
                Err(Status::permission_denied(e.to_string()))
            }
            Err(JwtFetchError::Audit(e)) => Err(audit_unavailable(e)),
            Err(e @ JwtFetchError::Signing(_)) => Err(Status::unavailable(e.to_string())),
        }
    }

    type FetchJWTBundlesStream = ResponseStream<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        const RPC: &str = "FetchJWTBundles";
        check_header(&request)?;
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let att = attest(&self.attestor, &self.k8s, self.manager.metrics(), peer, RPC).await?;
        let keys = self.manager.jwt_keys().subscribe();
        let stream = self
            .bundle_stream(RPC, att, Some(keys), |m: &Manager| pb::JwtBundlesResponse {
                bundles: HashMap::from([(
                    format!("spiffe://{}", m.ca().trust_domain()),
                    m.jwt_keys().jwks(),
                )]),
            })
            .await?;
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        const RPC: &str = "ValidateJWTSVID";
        check_header(&request)?;
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // Any local process may validate, but it must be one we can name in the log.
        let att = attest(&self.attestor, &self.k8s, self.manager.metrics(), peer, RPC).await?;
        match self.manager.validate_jwt(&req.svid, &req.audience) {
            Ok(claims) => {
                let spiffe_id = claims
                    .get("sub")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                Ok(Response::new(pb::ValidateJwtsvidResponse {
                    spiffe_id,
                    claims: Some(json_struct(claims)),
                }))
            }
            Err(e) => {
                tracing::info!(event = "jwt_invalid", pid = att.pid, uid = att.uid, reason = %e, "jwt-svid validation failed");
                Err(Status::invalid_argument(format!("invalid JWT-SVID: {e}")))
            }
        }
    }

    type FetchWITSVIDStream = ResponseStream<pb::WitsvidResponse>;

    async fn fetch_witsvid(
        &self,
        _request: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }

    type FetchWITBundlesStream = ResponseStream<pb::WitBundlesResponse>;

    async fn fetch_wit_bundles(
        &self,
        _request: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }
}

/// JSON claims as a protobuf Struct (`ValidateJWTSVIDResponse.claims`).
fn json_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, json_value(v))).collect(),
    }
}

fn json_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(json_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}
