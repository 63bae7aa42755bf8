//! The task use cases: grant, get, list, renew, revoke, approve and complete, each in the same
//! order: the allowlist, then the policies, then the change to the registry, with every refusal
//! audited. Servers only convert their wire types to these calls and the errors to their own
//! status codes.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::attest::Attestation;
use crate::audit::{event, Audit, Event};
use crate::policy::{
    Action, ContextAttrs, Decision, PolicyEngine, PolicyRequest, PrincipalAttrs, ResourceAttrs,
};
use crate::selector::{Key, Selectors, UnixKey};

use super::{GrantInput, Lease, LeaseError, LeaseId, LeaseState, Leases, Principal};

/// Why a task call was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The caller is not on the admin allowlist.
    #[error("{0}")]
    NotAllowed(String),
    /// A policy denied the call (or a gate asked for approval where none can be waited for).
    #[error("{0}")]
    Denied(String),
    /// The lease is not in the state the call needs (say, approving a lease not pending).
    #[error("{0}")]
    WrongState(String),
}

/// Who may call at all: uids, and gids (primary or supplementary), on the admin socket; on the
/// remote admin API, certificate identities.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// `spiffe://...` exactly, `spiffe://.../*` for every ID below a path, or `cn:NAME`.
    pub remote: Vec<String>,
}

/// Whether an allowlist pattern admits a remote identity: the same string, or (a pattern
/// ending in `/*`) any SPIFFE ID strictly below that path.
pub fn remote_allowed(pattern: &str, identity: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) if prefix.ends_with('/') && prefix.starts_with("spiffe://") => {
            identity.len() > prefix.len() && identity.starts_with(prefix)
        }
        _ => pattern == identity,
    }
}

/// A caller of the task API, from its kernel facts.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
    /// As the policies see it.
    pub attrs: PrincipalAttrs,
    /// The attestation it came from, for the audit record of a refusal.
    selectors: Selectors,
}

impl Caller {
    /// The caller an attestation describes: its uid and gid, its user and group names, and
    /// every group it is in.
    /// A caller of the remote admin API, by its client certificate's identity alone.
    pub fn remote(identity: &str) -> Caller {
        Caller {
            principal: Principal::remote(identity.to_owned()),
            attrs: PrincipalAttrs {
                uid: u32::MAX,
                name: identity.to_owned(),
                spiffe_id: identity.to_owned(),
                ..Default::default()
            },
            selectors: Selectors::default(),
        }
    }

    pub fn from_attestation(att: &Attestation) -> Caller {
        let values = |keys: &[UnixKey]| -> Vec<&str> {
            let keys: Vec<Key> = keys.iter().map(|k| Key::Unix(*k)).collect();
            att.selectors.values(&keys)
        };
        let user = values(&[UnixKey::User]).first().map(|s| s.to_string());
        let attrs = PrincipalAttrs {
            uid: att.uid,
            name: user.clone().unwrap_or_default(),
            groups: values(&[UnixKey::Group, UnixKey::SupplementaryGroup])
                .into_iter()
                .map(str::to_owned)
                .collect(),
            gids: values(&[UnixKey::Gid, UnixKey::SupplementaryGid])
                .into_iter()
                .filter_map(|g| g.parse().ok())
                .collect(),
            spiffe_id: String::new(),
        };
        Caller {
            principal: Principal {
                uid: att.uid,
                spiffe_id: None,
                gid: att.gid,
                pid: Some(att.pid),
                user,
            },
            attrs,
            selectors: att.selectors.clone(),
        }
    }
}

/// A caller the allowlist admitted: what every use case takes, so none can run without the
/// check (made by [`TaskService::admit`], and only there).
#[derive(Debug)]
pub struct Admitted(Caller);

impl Admitted {
    pub fn caller(&self) -> &Caller {
        &self.0
    }
}

pub struct TaskService {
    registry: Arc<Leases>,
    audit: Audit,
    policy: Arc<PolicyEngine>,
    allowlist: Allowlist,
    approval_timeout: Duration,
}

impl TaskService {
    pub fn new(
        registry: Arc<Leases>,
        audit: Audit,
        policy: Arc<PolicyEngine>,
        allowlist: Allowlist,
        approval_timeout: Duration,
    ) -> Self {
        TaskService {
            registry,
            audit,
            policy,
            allowlist,
            approval_timeout,
        }
    }

    /// Refuses (and audits) a caller outside the allowlist.
    pub async fn admit(&self, caller: Caller, rpc: &'static str) -> Result<Admitted, TaskError> {
        let a = &self.allowlist;
        let admitted = match &caller.principal.spiffe_id {
            Some(id) => a.remote.iter().any(|p| remote_allowed(p, id)),
            None => {
                a.uids.contains(&caller.principal.uid)
                    || caller.attrs.gids.iter().any(|g| a.gids.contains(g))
            }
        };
        if admitted {
            return Ok(Admitted(caller));
        }
        let p = &caller.principal;
        tracing::warn!(
            event = "admin_denied",
            rpc,
            uid = p.uid,
            gid = p.gid,
            pid = p.pid,
            "admin call from a caller outside the allowlist"
        );
        let denied = Event::AdminDenied(event::AdminDenied {
            rpc,
            uid: p.uid,
            gid: p.gid,
            pid: p.pid,
            selectors: caller.selectors.iter().map(|s| s.as_str()).collect(),
            spiffe_id: p.spiffe_id.as_deref(),
            reason: "caller not in the admin allowlist",
        });
        if let Err(e) = self.audit.record(&denied).await {
            tracing::error!(error = %e, "could not audit an admin denial");
        }
        Err(TaskError::NotAllowed(match &p.spiffe_id {
            Some(id) => format!(
                "{id} is not allowed to use the admin API (admin.allowed_spiffe_ids and \
                 admin.allowed_cert_names name who is)"
            ),
            None => format!(
                "uid {} is not allowed to use the admin API (allowed uids {:?}, gids {:?})",
                p.uid, a.uids, a.gids
            ),
        }))
    }

    /// Grants a lease, or holds it pending approval when a policy says so.
    pub async fn grant(&self, caller: &Admitted, input: GrantInput) -> Result<Lease, TaskError> {
        let lease = self
            .registry
            .prepare(input, caller.0.principal.clone())
            .inspect_err(
                |e| tracing::info!(event = "grant_refused", error = %e, "grant refused"),
            )?;
        let ttl = lease.ttl();
        Ok(
            match self.judge(Action::Grant, caller, &lease, ttl).await? {
                Decision::RequireApproval { policies } => {
                    self.registry
                        .hold(lease, self.approval_timeout, &policies)
                        .await?
                }
                _ => self.registry.grant(lease).await?,
            },
        )
    }

    /// Reading needs only admission; no policy judges reads.
    /// A lease, if the policies let the caller read it (a denial is audited).
    pub async fn get(&self, caller: &Admitted, id: &LeaseId) -> Result<Lease, TaskError> {
        let lease = self.registry.get(id).await?;
        match self
            .judge(Action::Read, caller, &lease, remaining(&lease))
            .await?
        {
            Decision::Allow { .. } => Ok(lease),
            // A gate on a read means nothing: only an allow reads.
            Decision::RequireApproval { policies } | Decision::Deny { policies, .. } => Err(
                TaskError::Denied(format!("read not allowed (policy {})", policies.join(", "))),
            ),
        }
    }

    /// The leases the policies let the caller read; the others are left out, unaudited (a list
    /// is many reads, and leaving one out tells nothing).
    pub async fn list(&self, caller: &Admitted, all: bool) -> Result<Vec<Lease>, TaskError> {
        let leases = self.registry.list(all).await?;
        Ok(leases
            .into_iter()
            .filter(|l| {
                let request = self.policy_request(Action::Read, caller, l, remaining(l));
                self.policy.evaluate(&request).is_allow()
            })
            .collect())
    }

    /// Moves an active lease's deadline to `ttl` from now (within its `max_expires_at`).
    pub async fn renew(
        &self,
        caller: &Admitted,
        id: &LeaseId,
        ttl: Duration,
    ) -> Result<Lease, TaskError> {
        let lease = self.registry.get(id).await?;
        // A renewal that a gate would hold cannot wait for approval: it is refused.
        if let Decision::RequireApproval { policies } =
            self.judge(Action::Renew, caller, &lease, ttl).await?
        {
            return Err(TaskError::Denied(format!(
                "renewal requires approval by policy {}; grant a new lease instead",
                policies.join(", ")
            )));
        }
        Ok(self.registry.renew(id, ttl).await?)
    }

    /// Whether the end of lease `id` is durable (see [`Leases::end_is_durable`]).
    pub fn end_is_durable(&self, id: &LeaseId) -> bool {
        self.registry.end_is_durable(id)
    }

    pub async fn revoke(
        &self,
        caller: &Admitted,
        id: &LeaseId,
        reason: &str,
    ) -> Result<Lease, TaskError> {
        super::check_reason(reason)?;
        let lease = self.registry.get(id).await?;
        let remaining = lease
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        self.judge(Action::Revoke, caller, &lease, remaining)
            .await?;
        Ok(self
            .registry
            .end(id, LeaseState::Revoked, caller.0.principal.clone(), reason)
            .await?)
    }

    /// Approves a pending lease: only an allow approves (a gate on approval itself means
    /// nothing).
    pub async fn approve(&self, caller: &Admitted, id: &LeaseId) -> Result<Lease, TaskError> {
        let lease = self.registry.get(id).await?;
        if lease.state != LeaseState::Pending {
            return Err(TaskError::WrongState(format!(
                "lease {id} is {}, not pending approval",
                lease.state
            )));
        }
        let ttl = lease.ttl();
        match self.judge(Action::Approve, caller, &lease, ttl).await? {
            Decision::Allow { .. } => {}
            Decision::RequireApproval { policies } | Decision::Deny { policies, .. } => {
                return Err(TaskError::Denied(format!(
                    "approval not allowed (policy {})",
                    policies.join(", ")
                )))
            }
        }
        Ok(self
            .registry
            .approve(id, caller.0.principal.clone())
            .await?)
    }

    /// Ends a lease whose task is done: decided by the policies like a revocation.
    pub async fn complete(&self, caller: &Admitted, id: &LeaseId) -> Result<Lease, TaskError> {
        let lease = self.registry.get(id).await?;
        let remaining = lease
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        self.judge(Action::Complete, caller, &lease, remaining)
            .await?;
        Ok(self
            .registry
            .end(
                id,
                LeaseState::Completed,
                caller.0.principal.clone(),
                "task completed",
            )
            .await?)
    }

    /// Asks the policies. A denial is audited with the whole request and refused naming the
    /// policies that decided.
    async fn judge(
        &self,
        action: Action,
        caller: &Admitted,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<Decision, TaskError> {
        let request = self.policy_request(action, caller, lease, ttl);
        judge(&self.policy, &self.audit, request, lease)
            .await
            .map_err(TaskError::Denied)
    }

    /// What the policies are asked about `action` on `lease` by `caller`.
    fn policy_request(
        &self,
        action: Action,
        caller: &Admitted,
        lease: &Lease,
        ttl: Duration,
    ) -> PolicyRequest {
        PolicyRequest {
            action,
            principal: caller.0.attrs.clone(),
            workload: Default::default(),
            resource: resource_of(lease),
            context: context_of(lease, ttl, self.registry.limits().max_ttl),
        }
    }
}

/// Asks the policies about `lease`. A denial is audited with the whole request, and refused
/// naming the policies that decided.
pub(super) async fn judge(
    policy: &PolicyEngine,
    audit: &Audit,
    request: PolicyRequest,
    lease: &Lease,
) -> Result<Decision, String> {
    let action = request.action;
    let decision = policy.evaluate(&request);
    if let Decision::Deny { policies, errors } = &decision {
        let why = if policies.is_empty() {
            format!("no policy permits this {action}")
        } else {
            format!("denied by policy {}", policies.join(", "))
        };
        tracing::info!(event = "policy_denied", action = %action, lease_id = %lease.id, why = %why, "policy denied the request");
        let denied = Event::PolicyDenied(event::PolicyDenied {
            action: action.as_str(),
            lease_id: lease.id.as_str(),
            task_id: &lease.task_id,
            policies,
            errors,
            request: serde_json::to_value(&request).unwrap_or_default(),
        });
        if let Err(e) = audit.record(&denied).await {
            tracing::error!(error = %e, "could not audit a policy denial");
        }
        return Err(why);
    }
    Ok(decision)
}

/// The identity a lease gives, as the policies see it.
pub(super) fn resource_of(lease: &Lease) -> ResourceAttrs {
    ResourceAttrs {
        agent: lease.agent.clone(),
        spiffe_id: lease.spiffe_id.to_string(),
    }
}

/// The lease as the policies' context sees it, for a request of `ttl`.
pub(super) fn context_of(lease: &Lease, ttl: Duration, max_ttl_limit: Duration) -> ContextAttrs {
    let secs = |d: Duration| d.as_secs();
    ContextAttrs {
        task_id: lease.task_id.clone(),
        delegator: lease.delegator.clone(),
        ttl_secs: secs(ttl),
        max_ttl_secs: secs(lease.max_ttl()),
        svid_ttl_secs: secs(lease.svid_ttl),
        jwt_ttl_secs: secs(lease.jwt_ttl),
        audiences: lease.audiences.clone(),
        selectors: lease.selectors.to_strings(),
        reason: lease.reason.clone(),
        now: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        grantor_uid: lease.granted_by.uid,
        agent_uid: rustix::process::geteuid().as_raw(),
        max_ttl_limit_secs: secs(max_ttl_limit),
    }
}

/// How long a lease has left (zero once ended or past its deadline).
fn remaining(lease: &Lease) -> Duration {
    lease
        .expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

#[cfg(test)]
mod remote_allowlist_tests {
    use super::remote_allowed;

    #[test]
    fn patterns_match_exactly_or_strictly_below_a_path() {
        let p = "spiffe://example.org/orchestrator/*";
        assert!(remote_allowed(p, "spiffe://example.org/orchestrator/ci"));
        assert!(remote_allowed(p, "spiffe://example.org/orchestrator/ci/eu"));
        assert!(!remote_allowed(p, "spiffe://example.org/orchestrator/"));
        assert!(!remote_allowed(p, "spiffe://example.org/orchestrator"));
        assert!(!remote_allowed(p, "spiffe://example.org/orchestratorx/ci"));
        assert!(!remote_allowed(p, "spiffe://evil.org/orchestrator/ci"));
        assert!(remote_allowed(
            "spiffe://example.org/a",
            "spiffe://example.org/a"
        ));
        assert!(!remote_allowed(
            "spiffe://example.org/a",
            "spiffe://example.org/a/b"
        ));
        assert!(remote_allowed("cn:deployer", "cn:deployer"));
        assert!(!remote_allowed("cn:deployer", "cn:deployer2"));
        // A bare `*` is not a wildcard: only a path ending in `/*` is.
        assert!(!remote_allowed("*", "spiffe://example.org/a"));
        assert!(!remote_allowed("cn:*", "cn:anyone"));
    }
}
