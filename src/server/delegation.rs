//! The Delegation service (`mayfly.delegation.v1.Delegation`) on the workload socket: a thin
//! adapter between the wire and `lease::DelegationService`. The caller is attested as on the
//! Workload API, and needs the same `workload.spiffe.io: true` header.
//!
//! The status codes of this server are chosen in `status` and nowhere else: bad input (a field
//! named) or a missing header → `InvalidArgument`; a narrowing rule, a limit, a policy, or a
//! lease the caller does not hold → `PermissionDenied`, naming the rule or policy; no lease at
//! all → `PermissionDenied` "no identity issued"; the parent's delegation rate exceeded →
//! `ResourceExhausted`; attestation failed or the store or audit log unavailable →
//! `Unavailable`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::attest::{Attestation, PeerInfo};
use crate::identity::{IdentityError, IdentitySource};
use crate::lease::{
    DelegateInput, DelegationError, DelegationService, Holder, LeaseError, LeaseId,
};
use crate::proto::admin as admin_pb;
use crate::proto::delegation as pb;
use crate::proto::delegation::delegation_server::{Delegation, DelegationServer};
use crate::server::admin::{duration, lease_to_pb};

pub struct DelegationApi {
    source: Arc<IdentitySource>,
    delegation: DelegationService,
}

impl DelegationApi {
    pub fn new(
        source: Arc<IdentitySource>,
        delegation: DelegationService,
    ) -> DelegationServer<Self> {
        DelegationServer::new(DelegationApi { source, delegation })
    }

    /// The caller, attested; its header checked first.
    async fn holder<T>(
        &self,
        req: &Request<T>,
        rpc: &'static str,
    ) -> Result<(Attestation, Holder), Status> {
        match req.metadata().get("workload.spiffe.io") {
            Some(v) if v == "true" => {}
            _ => {
                return Err(Status::invalid_argument(
                    "security header missing from request: workload.spiffe.io: true",
                ))
            }
        }
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let att = self
            .source
            .attest(peer, rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let holder = Holder::from_attestation(&att);
        Ok((att, holder))
    }

    /// The one place this server turns a refusal into a status. A caller that holds no
    /// lease is refused as on the Workload API, and audited.
    async fn status(&self, rpc: &'static str, att: &Attestation, e: DelegationError) -> Status {
        match e {
            DelegationError::NoLease => match self.source.deny(rpc, att).await {
                IdentityError::NoIdentity => Status::permission_denied(e.to_string()),
                other @ IdentityError::StoreStale => Status::unavailable(other.to_string()),
                other => Status::permission_denied(other.to_string()),
            },
            DelegationError::Lease(ref l) => match l {
                LeaseError::InvalidField { .. } => Status::invalid_argument(e.to_string()),
                LeaseError::NotFound(_) => Status::not_found(e.to_string()),
                LeaseError::NotActive { .. } => Status::failed_precondition(e.to_string()),
                LeaseError::Unavailable(_) => Status::unavailable(e.to_string()),
                LeaseError::Changed(_) => Status::aborted(e.to_string()),
                LeaseError::Refused(_) | LeaseError::SelfApproval(_) => {
                    Status::permission_denied(e.to_string())
                }
            },
            DelegationError::Ambiguous(..) => Status::invalid_argument(e.to_string()),
            DelegationError::NotHeld(_) | DelegationError::Denied(_) => {
                Status::permission_denied(e.to_string())
            }
            DelegationError::RateLimited(_) => Status::resource_exhausted(e.to_string()),
        }
    }
}

/// A `Delegate` request as the lease service takes it (the durations checked here, the rest by
/// the narrowing rules).
pub(crate) fn delegate_input(r: pb::DelegateRequest) -> Result<DelegateInput, Status> {
    Ok(DelegateInput {
        task_id: r.task_id,
        agent: r.agent,
        ttl: duration("ttl", r.ttl)?,
        max_ttl: duration("max_ttl", r.max_ttl)?,
        svid_ttl: duration("svid_ttl", r.svid_ttl)?,
        jwt_ttl: duration("jwt_ttl", r.jwt_ttl)?,
        selectors: r.selectors,
        audiences: r.audiences,
        reason: r.reason,
        max_delegation_depth: r.max_delegation_depth,
        end_on_violation: r.end_on_violation,
    })
}

#[tonic::async_trait]
impl Delegation for DelegationApi {
    async fn delegate(
        &self,
        request: Request<pb::DelegateRequest>,
    ) -> Result<Response<admin_pb::Lease>, Status> {
        const RPC: &str = "Delegate";
        let (att, holder) = self.holder(&request, RPC).await?;
        let r = request.into_inner();
        let parent = r.parent.clone();
        let input = delegate_input(r)?;
        match self.delegation.delegate(&holder, &parent, input).await {
            Ok(lease) => Ok(Response::new(lease_to_pb(&lease))),
            Err(e) => Err(self.status(RPC, &att, e).await),
        }
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        const RPC: &str = "List";
        let (att, holder) = self.holder(&request, RPC).await?;
        match self
            .delegation
            .list(&holder, &request.get_ref().parent)
            .await
        {
            Ok(leases) => Ok(Response::new(pb::ListResponse {
                leases: leases.iter().map(lease_to_pb).collect(),
            })),
            Err(e) => Err(self.status(RPC, &att, e).await),
        }
    }

    async fn end(
        &self,
        request: Request<pb::EndRequest>,
    ) -> Result<Response<admin_pb::Lease>, Status> {
        const RPC: &str = "End";
        let (att, holder) = self.holder(&request, RPC).await?;
        let r = request.into_inner();
        let id = match LeaseId::parse(&r.lease_id) {
            Ok(id) => id,
            Err(e) => return Err(self.status(RPC, &att, e.into()).await),
        };
        match self
            .delegation
            .end(&holder, &id, r.completed, &r.reason)
            .await
        {
            Ok(lease) => Ok(Response::new(lease_to_pb(&lease))),
            Err(e) => Err(self.status(RPC, &att, e).await),
        }
    }
}
