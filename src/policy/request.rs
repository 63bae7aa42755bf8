//! What is asked: the plain request callers build (also the JSON format of `mayfly policy check
//! --request`) and its translation into a Cedar request and entities, so callers never touch Cedar.

use std::str::FromStr;

use cedar_policy::{Context, Entities, EntityId, EntityTypeName, EntityUid, Request, Schema};
use serde_json::json;

use super::diagnostic::detailed;

/// An admin action, as named in Cedar (`Mayfly::Action::"grant"`, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Grant a task lease.
    #[default]
    Grant,
    /// Renew (extend) a task lease.
    Renew,
    /// Revoke a task lease.
    Revoke,
    /// Approve a grant held back by an approval gate.
    Approve,
    /// Mark a task done, ending its lease.
    Complete,
    /// Read a lease (`task get`, and each lease `task list` shows).
    Read,
    /// Delegate a child lease from a workload's own lease (the Delegation service): the
    /// principal is the delegating workload, not an admin caller.
    Delegate,
}

impl Action {
    /// The Cedar action id (`grant`, `renew`, `revoke`, `approve`, `complete`, `read`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Grant => "grant",
            Action::Renew => "renew",
            Action::Revoke => "revoke",
            Action::Approve => "approve",
            Action::Complete => "complete",
            Action::Read => "read",
            Action::Delegate => "delegate",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Attributes of the caller: `Mayfly::User` on the admin socket, or `Mayfly::Client` (only
/// `spiffe_id`) on the remote admin API.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrincipalAttrs {
    /// Unix uid of the caller.
    pub uid: u32,
    /// User name of the caller ("" if unknown).
    pub name: String,
    /// Group names of the caller.
    pub groups: Vec<String>,
    /// Group ids of the caller.
    pub gids: Vec<u32>,
    /// A remote caller's identity (its certificate's SPIFFE ID, or `cn:NAME`); empty for a
    /// caller on the admin socket. When set, the principal is `Mayfly::Client`.
    pub spiffe_id: String,
}

impl PrincipalAttrs {
    /// This process as the admin API would see it calling: effective uid, its user name, its
    /// primary and supplementary groups (ids and names).
    pub fn of_this_process() -> PrincipalAttrs {
        use nix::unistd::{getegid, geteuid, getgroups, Group, User};
        let uid = geteuid();
        let mut gids = vec![getegid()];
        for g in getgroups().unwrap_or_default() {
            if !gids.contains(&g) {
                gids.push(g);
            }
        }
        PrincipalAttrs {
            uid: uid.as_raw(),
            name: User::from_uid(uid)
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_default(),
            groups: gids
                .iter()
                .filter_map(|g| Group::from_gid(*g).ok().flatten().map(|g| g.name))
                .collect(),
            gids: gids.iter().map(|g| g.as_raw()).collect(),
            spiffe_id: String::new(),
        }
    }
}

/// Attributes of a delegating workload (`Mayfly::Workload`): the lease it delegates from.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadAttrs {
    /// SPIFFE ID of the parent lease.
    pub spiffe_id: String,
    /// Lease ID of the parent lease.
    pub lease_id: String,
    /// Task of the parent lease.
    pub task_id: String,
    /// Who the chain acts for (the root lease's delegator).
    pub delegator: String,
    /// Delegations between the root lease and the parent (0: the parent is a root).
    pub depth: u32,
    /// Uid of the delegating process.
    pub uid: u32,
}

/// Attributes of the identity being leased (`Mayfly::Identity`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceAttrs {
    /// Agent name.
    pub agent: String,
    /// SPIFFE ID of the identity.
    pub spiffe_id: String,
}

/// The Cedar `context` record (same for every action). Durations are in
/// seconds; values above `i64::MAX` are clamped.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContextAttrs {
    /// Task the lease is for.
    pub task_id: String,
    /// Who delegated the task (e.g. "user/alice", "orchestrator/ci").
    pub delegator: String,
    /// Requested lease TTL.
    pub ttl_secs: u64,
    /// Maximum lease lifetime across renewals.
    pub max_ttl_secs: u64,
    /// X.509 SVID TTL.
    pub svid_ttl_secs: u64,
    /// JWT SVID TTL.
    pub jwt_ttl_secs: u64,
    /// JWT audiences.
    pub audiences: Vec<String>,
    /// Workload selectors.
    pub selectors: Vec<String>,
    /// Free-text justification.
    pub reason: String,
    /// Current time, unix seconds.
    pub now: u64,
    /// Uid of whoever granted the lease (for grant: the caller).
    pub grantor_uid: u32,
    /// Uid the agent runs as.
    pub agent_uid: u32,
    /// The configured maximum lease TTL.
    pub max_ttl_limit_secs: u64,
}

/// One authorization question. Also the JSON format of
/// `mayfly policy check --request FILE` (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyRequest {
    /// The action.
    pub action: Action,
    /// The caller of the admin API (every action but `delegate`).
    pub principal: PrincipalAttrs,
    /// The delegating workload (`delegate` only, where it is the principal).
    pub workload: WorkloadAttrs,
    /// The identity being leased.
    pub resource: ResourceAttrs,
    /// The lease being asked for.
    pub context: ContextAttrs,
}

/// Clamps an unsigned value into Cedar's `Long`.
fn long(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uid_of(type_name: &str, id: &str) -> Result<EntityUid, String> {
    let ty = EntityTypeName::from_str(type_name).map_err(|e| e.to_string())?;
    Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
}

/// Builds the Cedar request and entities for `request`, checked against
/// `schema`.
pub(super) fn build_request(
    request: &PolicyRequest,
    schema: &Schema,
) -> Result<(Request, Entities), String> {
    let p = &request.principal;
    let r = &request.resource;
    let c = &request.context;
    let resource_id = if r.spiffe_id.is_empty() {
        r.agent.as_str()
    } else {
        r.spiffe_id.as_str()
    };
    let (principal, principal_entity) = if request.action == Action::Delegate {
        let w = &request.workload;
        let entity = json!({
            "uid": { "type": "Mayfly::Workload", "id": w.spiffe_id },
            "attrs": {
                "spiffe_id": w.spiffe_id,
                "lease_id": w.lease_id,
                "task_id": w.task_id,
                "delegator": w.delegator,
                "depth": i64::from(w.depth),
                "uid": i64::from(w.uid),
            },
            "parents": [],
        });
        (uid_of("Mayfly::Workload", &w.spiffe_id)?, entity)
    } else if !p.spiffe_id.is_empty() {
        let entity = json!({
            "uid": { "type": "Mayfly::Client", "id": p.spiffe_id },
            "attrs": {
                "spiffe_id": p.spiffe_id,
                "uid": -1,
                "name": p.spiffe_id,
                "groups": Vec::<String>::new(),
                "gids": Vec::<i64>::new(),
            },
            "parents": [],
        });
        (uid_of("Mayfly::Client", &p.spiffe_id)?, entity)
    } else {
        let principal_id = p.uid.to_string();
        let entity = json!({
            "uid": { "type": "Mayfly::User", "id": principal_id },
            "attrs": {
                "uid": i64::from(p.uid),
                "name": p.name,
                "groups": p.groups,
                "gids": p.gids.iter().map(|g| i64::from(*g)).collect::<Vec<_>>(),
            },
            "parents": [],
        });
        (uid_of("Mayfly::User", &principal_id)?, entity)
    };
    let resource = uid_of("Mayfly::Identity", resource_id)?;
    let action = uid_of("Mayfly::Action", request.action.as_str())?;

    let entities = json!([
        principal_entity,
        {
            "uid": { "type": "Mayfly::Identity", "id": resource_id },
            "attrs": { "agent": r.agent, "spiffe_id": r.spiffe_id },
            "parents": [],
        },
    ]);
    let entities = Entities::from_json_value(entities, Some(schema))
        .map_err(|e| format!("building Cedar entities: {}", detailed(&e)))?;

    let context = json!({
        "task_id": c.task_id,
        "delegator": c.delegator,
        "ttl_secs": long(c.ttl_secs),
        "max_ttl_secs": long(c.max_ttl_secs),
        "svid_ttl_secs": long(c.svid_ttl_secs),
        "jwt_ttl_secs": long(c.jwt_ttl_secs),
        "audiences": c.audiences,
        "selectors": c.selectors,
        "reason": c.reason,
        "now": long(c.now),
        "grantor_uid": i64::from(c.grantor_uid),
        "agent_uid": i64::from(c.agent_uid),
        "max_ttl_limit_secs": long(c.max_ttl_limit_secs),
    });
    let context = Context::from_json_value(context, Some((schema, &action)))
        .map_err(|e| format!("building Cedar context: {}", detailed(&e)))?;
    let request = Request::new(principal, action, resource, context, Some(schema))
        .map_err(|e| format!("building Cedar request: {}", detailed(&e)))?;
    Ok((request, entities))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::{grant, names, strict, HOUR};
    use crate::policy::{Decision, PolicyEngine, PolicySource};

    #[test]
    fn a_remote_client_is_judged_as_mayfly_client() {
        let mut req = grant(u32::MAX, &[], 900);
        req.principal = PrincipalAttrs {
            uid: u32::MAX,
            name: "spiffe://example.org/orchestrator/ci".into(),
            spiffe_id: "spiffe://example.org/orchestrator/ci".into(),
            ..Default::default()
        };
        let default = PolicyEngine::load(PolicySource::default()).unwrap();
        assert!(
            matches!(default.evaluate(&req), Decision::Allow { .. }),
            "{:?}",
            default.evaluate(&req)
        );
        // The strict example permits only users (by group): a client is denied, not an error.
        assert!(
            matches!(strict().evaluate(&req), Decision::Deny { .. }),
            "{:?}",
            strict().evaluate(&req)
        );
    }

    #[test]
    fn request_json_round_trip() {
        let mut req = grant(1000, &["mayfly-admins", "security"], 900);
        req.action = Action::Approve;
        let json = serde_json::to_string_pretty(&req).unwrap();
        assert!(json.contains("\"action\": \"approve\""), "{json}");
        let back: PolicyRequest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, req);

        // The documented example parses; missing fields default.
        let doc: PolicyRequest = serde_json::from_str(
            r#"{
              "action": "grant",
              "principal": { "uid": 1000, "name": "alice", "groups": ["mayfly-admins"], "gids": [1000, 2000] },
              "resource": { "agent": "payments", "spiffe_id": "spiffe://example.org/agent/payments" },
              "context": {
                "task_id": "task-42", "delegator": "user/alice", "ttl_secs": 600,
                "max_ttl_secs": 3600, "svid_ttl_secs": 300, "jwt_ttl_secs": 300,
                "audiences": ["https://api.example.org"], "selectors": ["unix:uid:1000"],
                "reason": "nightly reconciliation", "now": 1700000000,
                "grantor_uid": 1000, "agent_uid": 998, "max_ttl_limit_secs": 86400
              }
            }"#,
        )
        .unwrap();
        assert_eq!(doc.context.max_ttl_limit_secs, 86400);
        assert_eq!(
            strict().evaluate(&doc),
            Decision::RequireApproval {
                policies: names(&["payments-needs-approval"])
            }
        );
        let minimal: PolicyRequest = serde_json::from_str(r#"{"principal": {"uid": 5}}"#).unwrap();
        assert_eq!(minimal.action, Action::Grant);
        assert_eq!(minimal.principal.uid, 5);
        assert!(serde_json::from_str::<PolicyRequest>(r#"{"actoin": "grant"}"#).is_err());
        assert!(serde_json::from_str::<PolicyRequest>(r#"{"action": "delete"}"#).is_err());
    }

    #[test]
    fn huge_values_are_clamped_not_rejected() {
        let engine = PolicyEngine::load(PolicySource::default()).unwrap();
        let mut req = grant(1000, &[], u64::MAX);
        req.context.max_ttl_limit_secs = u64::MAX;
        req.context.now = u64::MAX;
        assert!(engine.evaluate(&req).is_allow());
        req.context.max_ttl_limit_secs = HOUR;
        assert!(!engine.evaluate(&req).is_allow());
    }
}
