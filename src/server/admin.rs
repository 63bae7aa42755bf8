//! The admin API (`mayfly.admin.v1.Tasks`) on the admin socket: grant, inspect, renew and end
//! task leases. The caller is authenticated from its kernel credentials and handed, with the
//! request in the lease domain's types, to `lease::TaskService`, which checks the allowlist and
//! the policies. Status codes are chosen in `status` and nowhere else.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::attest::{Attestor, PeerInfo};
use crate::lease::{
    Admitted, Caller, GrantInput, Lease, LeaseError, LeaseId, LeaseState, Principal, TaskError,
    TaskService,
};
use crate::proto::admin as pb;
use crate::proto::admin::tasks_server::{Tasks, TasksServer};
use crate::time::{from_duration, to_duration, to_timestamp};

pub struct AdminApi {
    tasks: TaskService,
    attestor: Arc<Attestor>,
    /// Told to every client in each lease, so `mayfly run` points its command here.
    workload_socket: String,
}

impl AdminApi {
    pub fn new(
        tasks: TaskService,
        attestor: Arc<Attestor>,
        workload_socket: &std::path::Path,
    ) -> TasksServer<Self> {
        // Admin requests are small; a caller's request is held whole before it is judged.
        const MAX_REQUEST: usize = 64 * 1024;
        TasksServer::new(AdminApi {
            tasks,
            attestor,
            workload_socket: std::path::absolute(workload_socket)
                .unwrap_or_else(|_| workload_socket.to_owned())
                .to_string_lossy()
                .into_owned(),
        })
        .max_decoding_message_size(MAX_REQUEST)
    }

    fn lease(&self, l: &Lease) -> pb::Lease {
        let ended = !matches!(l.state, LeaseState::Active | LeaseState::Pending);
        pb::Lease {
            workload_socket: self.workload_socket.clone(),
            end_durable: ended && self.tasks.end_is_durable(&l.id),
            ..lease_to_pb(l)
        }
    }

    /// The caller, from its peer credentials (primary and supplementary groups from /proc),
    /// once the allowlist admits it.
    async fn caller<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<Admitted, Status> {
        // On the remote admin API: the verified client certificate is the caller.
        if let Some(remote) = req
            .extensions()
            .get::<crate::server::remote_admin::RemotePeer>()
        {
            return self
                .tasks
                .admit(Caller::remote(&remote.identity), rpc)
                .await
                .map_err(status);
        }
        let peer =
            req.extensions().get::<PeerInfo>().cloned().ok_or_else(|| {
                Status::unauthenticated("no peer credentials on the admin socket")
            })?;
        let attestor = self.attestor.clone();
        let att = tokio::task::spawn_blocking(move || attestor.attest(&peer))
            .await
            .map_err(|_| Status::unavailable("caller could not be authenticated"))?
            .map_err(|e| Status::unavailable(format!("caller could not be authenticated: {e}")))?;
        self.tasks
            .admit(Caller::from_attestation(&att), rpc)
            .await
            .map_err(status)
    }
}

/// The one place this server turns a refusal into a status. `mayfly run` relies on
/// `FailedPrecondition` meaning "the lease is not in the state this call needs".
fn status(e: TaskError) -> Status {
    match e {
        TaskError::Lease(e) => match e {
            LeaseError::InvalidField { .. } => Status::invalid_argument(e.to_string()),
            LeaseError::NotFound(_) => Status::not_found(e.to_string()),
            LeaseError::NotActive { .. } => Status::failed_precondition(e.to_string()),
            LeaseError::Unavailable(_) => Status::unavailable(e.to_string()),
            LeaseError::Changed(_) => Status::aborted(e.to_string()),
            LeaseError::SelfApproval(_) | LeaseError::Refused(_) => {
                Status::permission_denied(e.to_string())
            }
        },
        TaskError::WrongState(_) => Status::failed_precondition(e.to_string()),
        TaskError::NotAllowed(_) | TaskError::Denied(_) => Status::permission_denied(e.to_string()),
    }
}

fn lease_id(s: &str) -> Result<LeaseId, Status> {
    LeaseId::parse(s).map_err(|e| status(e.into()))
}

/// A `Grant` request as the lease service takes it (the durations checked here, the rest by
/// `validate_grant`).
pub(crate) fn grant_input(r: pb::GrantRequest) -> Result<GrantInput, Status> {
    Ok(GrantInput {
        task_id: r.task_id,
        delegator: r.delegator,
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

pub(crate) fn duration(
    field: &'static str,
    d: Option<prost_types::Duration>,
) -> Result<Option<std::time::Duration>, Status> {
    match d {
        None => Ok(None),
        Some(d) => from_duration(&d).map(Some).ok_or_else(|| {
            Status::invalid_argument(format!("{field}: must be a positive duration"))
        }),
    }
}

fn principal(p: &Principal) -> pb::Principal {
    pb::Principal {
        uid: p.uid,
        gid: p.gid,
        pid: p.pid.unwrap_or(0),
        user: p.user.clone().unwrap_or_default(),
        spiffe_id: p.spiffe_id.clone().unwrap_or_default(),
    }
}

pub fn lease_to_pb(l: &Lease) -> pb::Lease {
    pb::Lease {
        lease_id: l.id.to_string(),
        task_id: l.task_id.clone(),
        delegator: l.delegator.clone(),
        agent: l.agent.clone(),
        spiffe_id: l.spiffe_id.to_string(),
        selectors: l.selectors.to_strings(),
        created_at: Some(to_timestamp(l.created_at)),
        expires_at: Some(to_timestamp(l.expires_at)),
        max_expires_at: Some(to_timestamp(l.max_expires_at)),
        svid_ttl: Some(to_duration(l.svid_ttl)),
        jwt_ttl: Some(to_duration(l.jwt_ttl)),
        audiences: l.audiences.clone(),
        reason: l.reason.clone(),
        granted_by: Some(principal(&l.granted_by)),
        state: l.state.to_string(),
        ended_at: l.ended_at.map(to_timestamp),
        ended_by: l.ended_by.as_ref().map(principal),
        end_reason: l.end_reason.clone(),
        approval_deadline: l.approval_deadline.map(to_timestamp),
        approved_at: l.approved_at.map(to_timestamp),
        approved_by: l.approved_by.as_ref().map(principal),
        workload_socket: String::new(),
        end_durable: false,
        chain: l
            .chain
            .iter()
            .map(|link| pb::ChainLink {
                lease_id: link.lease_id.to_string(),
                spiffe_id: link.spiffe_id.to_string(),
                task_id: link.task_id.clone(),
            })
            .collect(),
        may_delegate: l.may_delegate,
        end_on_violation: l.end_on_violation,
    }
}

#[tonic::async_trait]
impl Tasks for AdminApi {
    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = self.caller(&request, "Grant").await?;
        let input = grant_input(request.into_inner())?;
        let lease = self.tasks.grant(&caller, input).await.map_err(status)?;
        Ok(Response::new(self.lease(&lease)))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::Lease>, Status> {
        let caller = self.caller(&request, "Get").await?;
        let id = lease_id(&request.get_ref().lease_id)?;
        let lease = self.tasks.get(&caller, &id).await.map_err(status)?;
        Ok(Response::new(self.lease(&lease)))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let caller = self.caller(&request, "List").await?;
        let leases = self
            .tasks
            .list(&caller, request.get_ref().all)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListResponse {
            leases: leases.iter().map(|l| self.lease(l)).collect(),
        }))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = self.caller(&request, "Renew").await?;
        let r = request.into_inner();
        let id = lease_id(&r.lease_id)?;
        let ttl =
            duration("ttl", r.ttl)?.ok_or_else(|| Status::invalid_argument("ttl: is required"))?;
        let lease = self.tasks.renew(&caller, &id, ttl).await.map_err(status)?;
        Ok(Response::new(self.lease(&lease)))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = self.caller(&request, "Revoke").await?;
        let r = request.into_inner();
        let id = lease_id(&r.lease_id)?;
        let lease = self
            .tasks
            .revoke(&caller, &id, &r.reason)
            .await
            .map_err(status)?;
        Ok(Response::new(self.lease(&lease)))
    }

    async fn approve(
        &self,
        request: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = self.caller(&request, "Approve").await?;
        let id = lease_id(&request.get_ref().lease_id)?;
        let lease = self.tasks.approve(&caller, &id).await.map_err(status)?;
        Ok(Response::new(self.lease(&lease)))
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = self.caller(&request, "Complete").await?;
        let id = lease_id(&request.get_ref().lease_id)?;
        let lease = self.tasks.complete(&caller, &id).await.map_err(status)?;
        Ok(Response::new(self.lease(&lease)))
    }
}
