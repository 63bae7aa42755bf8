//! The SPIFFE Workload API server (`SpiffeWorkloadAPI`) on the workload socket: a thin
//! adapter between the wire and the identity source (`crate::identity`), which attests every
//! caller and follows its identities.
//!
//! The status codes of this server are chosen in `status` and nowhere else: missing
//! `workload.spiffe.io: true` header or bad input → `InvalidArgument`; attestation failed,
//! audit log unavailable or the agent shutting down → `Unavailable`; attested but no active
//! lease (or no longer one) → `PermissionDenied` "no identity issued".

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::attest::PeerInfo;
use crate::identity::{BundleKind, IdentityError, IdentitySource};
use crate::proto::workload as pb;
use crate::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use crate::svid::wit::WitSvid;
use crate::svid::X509Svid;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct WorkloadApi {
    source: Arc<IdentitySource>,
}

impl WorkloadApi {
    pub fn new(source: Arc<IdentitySource>) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(WorkloadApi { source })
    }
}

/// The one place this server turns a refusal into a status.
fn status(e: IdentityError) -> Status {
    match e {
        IdentityError::NoIdentity | IdentityError::Ended | IdentityError::NotAllowed(_) => {
            Status::permission_denied(e.to_string())
        }
        IdentityError::RateLimited(_) => Status::resource_exhausted(e.to_string()),
        IdentityError::InvalidToken(_) | IdentityError::BadRequest(_) => {
            Status::invalid_argument(e.to_string())
        }
        IdentityError::NotAttested(_)
        | IdentityError::Audit(_)
        | IdentityError::Signing(_)
        | IdentityError::ShuttingDown
        | IdentityError::StoreStale => Status::unavailable(e.to_string()),
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

fn peer<T>(req: &Request<T>) -> Option<PeerInfo> {
    req.extensions().get::<PeerInfo>().cloned()
}

fn x509_response(svids: &[Arc<X509Svid>], source: &IdentitySource) -> pb::X509svidResponse {
    let bundle = source.x509_bundle_now();
    pb::X509svidResponse {
        svids: svids
            .iter()
            .map(|s| pb::X509svid {
                spiffe_id: s.spiffe_id.clone(),
                x509_svid: s.issued.chain_der.clone(),
                x509_svid_key: s.issued.key_pkcs8.to_vec(),
                bundle: bundle.der().to_vec(),
                hint: String::new(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: source.x509_federated(),
    }
}

/// A response stream: `first` at once, then whatever `next` yields until its first error
/// (sent as the stream's status) or its end. It runs only while the connection polls the
/// response body: no task or channel per stream, and a caller that goes away drops it.
fn follow<S, T, F, Fut>(first: T, state: S, next: F) -> ResponseStream<T>
where
    S: Send + 'static,
    T: Send + 'static,
    F: Fn(S) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<(Result<T, Status>, Option<S>)>> + Send + 'static,
{
    let rest = futures::stream::unfold(Some(state), move |state| {
        let step = state.map(&next);
        async move { step?.await }
    });
    Box::pin(futures::stream::once(std::future::ready(Ok(first))).chain(rest))
}

impl WorkloadApi {
    /// A bundle stream: the bundle at once, again whenever it may have changed, and
    /// `PermissionDenied` as soon as the caller no longer holds any identity.
    async fn bundle_stream<T: Send + 'static>(
        &self,
        peer: Option<PeerInfo>,
        rpc: &'static str,
        kind: BundleKind,
        make: impl Fn(&IdentitySource) -> T + Send + Sync + 'static,
    ) -> Result<ResponseStream<T>, Status> {
        let att = self.source.attest(peer, rpc).await.map_err(status)?;
        let updates = self.source.bundles(att, rpc, kind).await.map_err(status)?;
        let first = make(&self.source);
        let source = self.source.clone();
        let make = Arc::new(make);
        Ok(follow(first, updates, move |mut updates| {
            let (source, make) = (source.clone(), make.clone());
            async move {
                match updates.next().await {
                    Ok(true) => Some((Ok(make(&source)), Some(updates))),
                    Ok(false) => None,
                    Err(e) => Some((Err(status(e)), None)),
                }
            }
        }))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        let (first, updates) = self
            .source
            .x509_svids(peer(&request), "FetchX509SVID")
            .await
            .map_err(status)?;
        let response = x509_response(&first, &self.source);
        let source = self.source.clone();
        Ok(Response::new(follow(
            response,
            updates,
            move |mut updates| {
                let source = source.clone();
                async move {
                    match updates.next().await {
                        // The bundle as it is now: the CA may have been swapped since.
                        Ok(svids) => Some((Ok(x509_response(&svids, &source)), Some(updates))),
                        Err(e) => Some((Err(status(e)), None)),
                    }
                }
            },
        )))
    }

    type FetchX509BundlesStream = ResponseStream<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let stream = self
            .bundle_stream(
                peer(&request),
                "FetchX509Bundles",
                BundleKind::X509,
                |s: &IdentitySource| pb::X509BundlesResponse {
                    crl: Vec::new(),
                    bundles: s.x509_bundles(),
                },
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        const RPC: &str = "FetchJWTSVID";
        check_header(&request)?;
        let peer = peer(&request);
        let req = request.into_inner();
        let mut audiences: Vec<String> =
            req.audience.into_iter().filter(|a| !a.is_empty()).collect();
        if audiences.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        audiences.sort();
        audiences.dedup();
        let att = self.source.attest(peer, RPC).await.map_err(status)?;
        let wanted = Some(req.spiffe_id.as_str()).filter(|s| !s.is_empty());
        let svids = self
            .source
            .jwt_svids(&att, RPC, &audiences, wanted)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::JwtsvidResponse {
            svids: svids
                .iter()
                .map(|s| pb::Jwtsvid {
                    spiffe_id: s.spiffe_id.clone(),
                    svid: s.token.clone(),
                    hint: String::new(),
                })
                .collect(),
        }))
    }

    type FetchJWTBundlesStream = ResponseStream<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        let stream = self
            .bundle_stream(
                peer(&request),
                "FetchJWTBundles",
                BundleKind::Jwt,
                |s: &IdentitySource| pb::JwtBundlesResponse {
                    bundles: s.jwt_bundles(),
                },
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let peer = peer(&request);
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // Any local process may validate, but it must be one we can name in the log.
        let att = self
            .source
            .attest(peer, "ValidateJWTSVID")
            .await
            .map_err(status)?;
        let claims = self
            .source
            .validate_jwt(&att, &req.svid, &req.audience)
            .map_err(status)?;
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

    type FetchWITSVIDStream = ResponseStream<pb::WitsvidResponse>;

    async fn fetch_witsvid(
        &self,
        request: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        const RPC: &str = "FetchWITSVID";
        check_header(&request)?;
        let peer = peer(&request);
        let wanted = Some(request.into_inner().spiffe_id).filter(|s| !s.is_empty());
        let (first, updates) = self
            .source
            .wit_svids(peer, RPC, wanted)
            .await
            .map_err(status)?;
        Ok(Response::new(follow(
            wit_response(&first),
            updates,
            |mut updates| async move {
                match updates.next().await {
                    Ok(wits) => Some((Ok(wit_response(&wits)), Some(updates))),
                    Err(e) => Some((Err(status(e)), None)),
                }
            },
        )))
    }

    type FetchWITBundlesStream = ResponseStream<pb::WitBundlesResponse>;

    async fn fetch_wit_bundles(
        &self,
        request: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        check_header(&request)?;
        let stream = self
            .bundle_stream(
                peer(&request),
                "FetchWITBundles",
                BundleKind::Wit,
                |s: &IdentitySource| pb::WitBundlesResponse {
                    bundles: s.wit_bundles(),
                },
            )
            .await?;
        Ok(Response::new(stream))
    }
}

fn wit_response(wits: &[Arc<WitSvid>]) -> pb::WitsvidResponse {
    pb::WitsvidResponse {
        svids: wits
            .iter()
            .map(|w| pb::Witsvid {
                spiffe_id: w.spiffe_id.clone(),
                wit_svid: w.token.clone(),
                wit_svid_key: w.private_jwk.to_string(),
                hint: String::new(),
            })
            .collect(),
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
