//! The SPIFFE Workload API server (`SpiffeWorkloadAPI`) on the workload socket.
//!
//! Every RPC (and every stream, again at each update) is attested from the caller's kernel
//! facts; the status codes of this server are chosen here and nowhere else:
//! missing `workload.spiffe.io: true` header → `InvalidArgument`; attestation failed or the
//! agent shutting down → `Unavailable`; attested but no active lease → `PermissionDenied`
//! "no identity issued".

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::attest::{Attestation, Attestor, PeerInfo};
use crate::proto::workload as pb;
use crate::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use crate::svid::{AuditUnavailable, Manager, Requester, X509Svid};

const NO_IDENTITY: &str = "no identity issued";

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct WorkloadApi {
    manager: Arc<Manager>,
    attestor: Arc<Attestor>,
    shutdown: CancellationToken,
}

impl WorkloadApi {
    pub fn new(
        manager: Arc<Manager>,
        attestor: Arc<Attestor>,
        shutdown: CancellationToken,
    ) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(WorkloadApi {
            manager,
            attestor,
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

/// Attests the process behind a request. Reading /proc (and hashing an executable the first
/// time) blocks, so it runs on the blocking pool.
async fn attest(
    attestor: &Arc<Attestor>,
    peer: Option<PeerInfo>,
    rpc: &'static str,
) -> Result<Attestation, Status> {
    let Some(peer) = peer else {
        return Err(Status::unavailable(
            "caller could not be attested: no peer credentials",
        ));
    };
    let attestor = attestor.clone();
    let result = tokio::task::spawn_blocking(move || {
        let r = attestor.attest(&peer);
        (peer, r)
    })
    .await
    .map_err(|_| Status::unavailable("attestation failed"))?;
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
        selectors = ?att.selectors,
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

impl WorkloadApi {
    fn bundles(&self) -> HashMap<String, Vec<u8>> {
        let ca = self.manager.ca();
        HashMap::from([(
            format!("spiffe://{}", ca.trust_domain()),
            ca.bundle_der().to_vec(),
        )])
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        const RPC: &str = "FetchX509SVID";
        check_header(&request)?;
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let mut att = attest(&self.attestor, peer.clone(), RPC).await?;
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
        let (tx, rx) = mpsc::channel(2);
        tx.try_send(Ok(x509_response(&first, &bundle)))
            .expect("fresh channel has room");
        let mut sent = serials(&first);
        drop(first);

        let attestor = self.attestor.clone();
        let manager = self.manager.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("agent shutting down"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                    _ = watcher.changed() => {}
                }
                // The process may have exec'd something else since it opened the stream:
                // attest again before handing it anything new.
                match attest(&attestor, peer.clone(), RPC).await {
                    Ok(now) => {
                        if now.selectors != att.selectors {
                            watcher = manager.watcher(now.selectors.clone(), who.clone());
                        }
                        att = now;
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
                let svids = match watcher.current().await {
                    Ok(svids) => svids,
                    Err(e) => {
                        let _ = tx.send(Err(audit_unavailable(e))).await;
                        return;
                    }
                };
                if svids.is_empty() {
                    let _ = tx.send(Err(deny(&manager, RPC, &att).await)).await;
                    return;
                }
                let now = serials(&svids);
                if now != sent {
                    if tx.send(Ok(x509_response(&svids, &bundle))).await.is_err() {
                        return;
                    }
                    sent = now;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type FetchX509BundlesStream = ResponseStream<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        const RPC: &str = "FetchX509Bundles";
        check_header(&request)?;
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let att = attest(&self.attestor, peer, RPC).await?;
        let registry = self.manager.registry().clone();
        let mut generation = registry.subscribe();
        generation.borrow_and_update();
        if registry.matching(&att.selectors).is_empty() {
            return Err(deny(&self.manager, RPC, &att).await);
        }
        let (tx, rx) = mpsc::channel(2);
        tx.try_send(Ok(pb::X509BundlesResponse {
            crl: Vec::new(),
            bundles: self.bundles(),
        }))
        .expect("fresh channel has room");
        let shutdown = self.shutdown.clone();
        let manager = self.manager.clone();
        // The trust bundle does not change while the agent runs; what can change is whether
        // the caller still holds an identity that entitles it to the stream.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("agent shutting down"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                    r = generation.changed() => if r.is_err() { return },
                }
                if registry.matching(&att.selectors).is_empty() {
                    let _ = tx.send(Err(deny(&manager, RPC, &att).await)).await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_jwtsvid(
        &self,
        _request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        Err(Status::unimplemented("JWT-SVIDs are not supported yet"))
    }

    type FetchJWTBundlesStream = ResponseStream<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        _request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("JWT-SVIDs are not supported yet"))
    }

    async fn validate_jwtsvid(
        &self,
        _request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("JWT-SVIDs are not supported yet"))
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
