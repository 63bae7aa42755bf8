//! The admin API (`mayfly.admin.v1.Tasks`) on the admin socket: grant, inspect, renew and end
//! task leases. Every call is checked against the allowlist of uids/gids using the caller's
//! kernel credentials, and the caller is recorded as the grantor. Status codes are chosen here.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::attest::{Attestor, PeerInfo};
use crate::audit::AuditLog;
use crate::lease::{GrantInput, Lease, LeaseError, LeaseId, LeaseState, Principal, Registry};
use crate::policy::{
    Action as PolicyAction, ContextAttrs, Decision, PolicyEngine, PolicyRequest, PrincipalAttrs,
    ResourceAttrs,
};
use crate::proto::admin as pb;
use crate::proto::admin::tasks_server::{Tasks, TasksServer};
use crate::time::{from_duration, to_duration, to_timestamp};

pub struct AdminApi {
    registry: Arc<Registry>,
    attestor: Arc<Attestor>,
    audit: AuditLog,
    policy: Arc<PolicyEngine>,
    approval_timeout: std::time::Duration,
    allowed_uids: Vec<u32>,
    allowed_gids: Vec<u32>,
    /// Told to every client in each lease, so `mayfly run` points its command here.
    workload_socket: String,
}

/// The admin server's settings from the configuration.
pub struct AdminOptions<'a> {
    pub approval_timeout: std::time::Duration,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    pub workload_socket: &'a std::path::Path,
}

impl AdminApi {
    pub fn new(
        registry: Arc<Registry>,
        attestor: Arc<Attestor>,
        audit: AuditLog,
        policy: Arc<PolicyEngine>,
        options: AdminOptions<'_>,
    ) -> TasksServer<Self> {
        let socket = options.workload_socket;
        TasksServer::new(AdminApi {
            registry,
            attestor,
            audit,
            policy,
            approval_timeout: options.approval_timeout,
            allowed_uids: options.allowed_uids,
            allowed_gids: options.allowed_gids,
            workload_socket: std::path::absolute(socket)
                .unwrap_or_else(|_| socket.to_owned())
                .to_string_lossy()
                .into_owned(),
        })
    }

    fn lease(&self, l: &Lease) -> pb::Lease {
        pb::Lease {
            workload_socket: self.workload_socket.clone(),
            ..lease_to_pb(l)
        }
    }

    /// Authenticates the caller from its peer credentials (primary and supplementary groups
    /// from /proc) and checks the allowlist.
    async fn authorize<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<Principal, Status> {
        Ok(self.caller(req, rpc).await?.0)
    }

    /// The caller as a principal and as Cedar sees it (uid, name, groups), once allowlisted.
    async fn caller<T>(
        &self,
        req: &Request<T>,
        rpc: &'static str,
    ) -> Result<(Principal, PrincipalAttrs), Status> {
        let peer =
            req.extensions().get::<PeerInfo>().cloned().ok_or_else(|| {
                Status::unauthenticated("no peer credentials on the admin socket")
            })?;
        let attestor = self.attestor.clone();
        let att = tokio::task::spawn_blocking(move || attestor.attest(&peer))
            .await
            .map_err(|_| Status::unavailable("caller could not be authenticated"))?
            .map_err(|e| Status::unavailable(format!("caller could not be authenticated: {e}")))?;
        let gids = att.selectors.iter().filter_map(|s| {
            s.strip_prefix("unix:supplementary_gid:")
                .or_else(|| s.strip_prefix("unix:gid:"))
                .and_then(|g| g.parse::<u32>().ok())
        });
        let allowed = self.allowed_uids.contains(&att.uid)
            || gids.into_iter().any(|g| self.allowed_gids.contains(&g));
        let user = att
            .selectors
            .iter()
            .find_map(|s| s.strip_prefix("unix:user:"))
            .map(str::to_owned);
        if !allowed {
            tracing::warn!(
                event = "admin_denied",
                rpc,
                uid = att.uid,
                gid = att.gid,
                pid = att.pid,
                "admin call from a caller outside the allowlist"
            );
            let fields = serde_json::json!({
                "rpc": rpc, "uid": att.uid, "gid": att.gid, "pid": att.pid,
                "selectors": att.selectors, "reason": "caller not in the admin allowlist",
            });
            if let serde_json::Value::Object(fields) = fields {
                if let Err(e) = self.audit.append("admin_denied", fields).await {
                    tracing::error!(error = %e, "could not audit an admin denial");
                }
            }
            return Err(Status::permission_denied(format!(
                "uid {} is not allowed to use the admin API (allowed uids {:?}, gids {:?})",
                att.uid, self.allowed_uids, self.allowed_gids
            )));
        }
        let attrs = PrincipalAttrs {
            uid: att.uid,
            name: user.clone().unwrap_or_default(),
            groups: att
                .selectors
                .iter()
                .filter_map(|s| {
                    s.strip_prefix("unix:group:")
                        .or_else(|| s.strip_prefix("unix:supplementary_group:"))
                })
                .map(str::to_owned)
                .collect(),
            gids: att
                .selectors
                .iter()
                .filter_map(|s| {
                    s.strip_prefix("unix:gid:")
                        .or_else(|| s.strip_prefix("unix:supplementary_gid:"))
                        .and_then(|g| g.parse().ok())
                })
                .collect(),
        };
        let principal = Principal {
            uid: att.uid,
            gid: att.gid,
            pid: Some(att.pid),
            user,
        };
        Ok((principal, attrs))
    }

    /// Asks the policies. A denial is audited with the whole request and answered with
    /// PermissionDenied naming the policies that decided.
    async fn judge(
        &self,
        action: PolicyAction,
        principal: PrincipalAttrs,
        lease: &Lease,
        ttl: std::time::Duration,
    ) -> Result<Decision, Status> {
        let secs = |d: std::time::Duration| d.as_secs();
        let request = PolicyRequest {
            action,
            principal,
            resource: ResourceAttrs {
                agent: lease.agent.clone(),
                spiffe_id: lease.spiffe_id.to_string(),
            },
            context: ContextAttrs {
                task_id: lease.task_id.clone(),
                delegator: lease.delegator.clone(),
                ttl_secs: secs(ttl),
                max_ttl_secs: secs(lease.max_ttl()),
                svid_ttl_secs: secs(lease.svid_ttl),
                jwt_ttl_secs: secs(lease.jwt_ttl),
                audiences: lease.audiences.clone(),
                selectors: lease.selectors.clone(),
                reason: lease.reason.clone(),
                now: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs(),
                grantor_uid: lease.granted_by.uid,
                agent_uid: rustix::process::geteuid().as_raw(),
                max_ttl_limit_secs: secs(self.registry.limits().max_ttl),
            },
        };
        let decision = self.policy.evaluate(&request);
        if let Decision::Deny { policies, errors } = &decision {
            let why = if policies.is_empty() {
                format!("no policy permits this {action}")
            } else {
                format!("denied by policy {}", policies.join(", "))
            };
            tracing::info!(event = "policy_denied", action = %action, lease_id = %lease.id, why = %why, "policy denied the request");
            let fields = serde_json::json!({
                "action": action.as_str(),
                "lease_id": lease.id.as_str(),
                "task_id": lease.task_id,
                "policies": policies,
                "errors": errors,
                "request": request,
            });
            if let serde_json::Value::Object(fields) = fields {
                if let Err(e) = self.audit.append("policy_denied", fields).await {
                    tracing::error!(error = %e, "could not audit a policy denial");
                }
            }
            return Err(Status::permission_denied(why));
        }
        Ok(decision)
    }
}

fn status(e: LeaseError) -> Status {
    match e {
        LeaseError::InvalidField { .. } => Status::invalid_argument(e.to_string()),
        LeaseError::NotFound(_) => Status::not_found(e.to_string()),
        LeaseError::NotActive { .. } => Status::failed_precondition(e.to_string()),
        LeaseError::Unavailable(_) => Status::unavailable(e.to_string()),
        LeaseError::SelfApproval(_) => Status::permission_denied(e.to_string()),
    }
}

fn lease_id(s: &str) -> Result<LeaseId, Status> {
    LeaseId::parse(s).map_err(status)
}

fn duration(
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
    }
}

pub fn lease_to_pb(l: &Lease) -> pb::Lease {
    pb::Lease {
        lease_id: l.id.to_string(),
        task_id: l.task_id.clone(),
        delegator: l.delegator.clone(),
        agent: l.agent.clone(),
        spiffe_id: l.spiffe_id.to_string(),
        selectors: l.selectors.clone(),
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
    }
}

#[tonic::async_trait]
impl Tasks for AdminApi {
    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let (by, attrs) = self.caller(&request, "Grant").await?;
        let r = request.into_inner();
        let input = GrantInput {
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
        };
        let lease = self.registry.prepare(input, by).map_err(|e| {
            tracing::info!(event = "grant_refused", error = %e, "grant refused");
            status(e)
        })?;
        let ttl = lease.ttl();
        let lease = match self.judge(PolicyAction::Grant, attrs, &lease, ttl).await? {
            Decision::RequireApproval { policies } => self
                .registry
                .hold(lease, self.approval_timeout, &policies)
                .await
                .map_err(status)?,
            _ => self.registry.grant(lease).await.map_err(status)?,
        };
        Ok(Response::new(self.lease(&lease)))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::Lease>, Status> {
        self.authorize(&request, "Get").await?;
        let id = lease_id(&request.get_ref().lease_id)?;
        let lease = self.registry.get(&id).await.map_err(status)?;
        Ok(Response::new(self.lease(&lease)))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.authorize(&request, "List").await?;
        let leases = self
            .registry
            .list(request.get_ref().all)
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
        let (_, attrs) = self.caller(&request, "Renew").await?;
        let r = request.into_inner();
        let id = lease_id(&r.lease_id)?;
        let ttl =
            duration("ttl", r.ttl)?.ok_or_else(|| Status::invalid_argument("ttl: is required"))?;
        let lease = self.registry.get(&id).await.map_err(status)?;
        // A renewal that a gate would hold cannot wait for approval: it is refused.
        if let Decision::RequireApproval { policies } =
            self.judge(PolicyAction::Renew, attrs, &lease, ttl).await?
        {
            return Err(Status::permission_denied(format!(
                "renewal requires approval by policy {}; grant a new lease instead",
                policies.join(", ")
            )));
        }
        let lease = self.registry.renew(&id, ttl).await.map_err(status)?;
        Ok(Response::new(self.lease(&lease)))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let (by, attrs) = self.caller(&request, "Revoke").await?;
        let r = request.into_inner();
        let id = lease_id(&r.lease_id)?;
        if r.reason.len() > crate::lease::MAX_REASON_LEN {
            return Err(Status::invalid_argument("reason: too long"));
        }
        let lease = self.registry.get(&id).await.map_err(status)?;
        let remaining = lease
            .expires_at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        self.judge(PolicyAction::Revoke, attrs, &lease, remaining)
            .await?;
        let lease = self
            .registry
            .end(&id, LeaseState::Revoked, by, &r.reason)
            .await
            .map_err(status)?;
        Ok(Response::new(self.lease(&lease)))
    }

    async fn approve(
        &self,
        request: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let (by, attrs) = self.caller(&request, "Approve").await?;
        let r = request.into_inner();
        let id = lease_id(&r.lease_id)?;
        let lease = self.registry.get(&id).await.map_err(status)?;
        if lease.state != LeaseState::Pending {
            return Err(Status::failed_precondition(format!(
                "lease {id} is {}, not pending approval",
                lease.state
            )));
        }
        let ttl = lease.ttl();
        // An approval gate on "approve" itself makes no sense; only an allow approves.
        match self
            .judge(PolicyAction::Approve, attrs, &lease, ttl)
            .await?
        {
            Decision::Allow { .. } => {}
            Decision::RequireApproval { policies } | Decision::Deny { policies, .. } => {
                return Err(Status::permission_denied(format!(
                    "approval not allowed (policy {})",
                    policies.join(", ")
                )))
            }
        }
        let lease = self.registry.approve(&id, by).await.map_err(status)?;
        Ok(Response::new(self.lease(&lease)))
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let by = self.authorize(&request, "Complete").await?;
        let id = lease_id(&request.get_ref().lease_id)?;
        let lease = self
            .registry
            .end(&id, LeaseState::Completed, by, "task completed")
            .await
            .map_err(status)?;
        Ok(Response::new(self.lease(&lease)))
    }
}
