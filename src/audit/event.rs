//! Every kind of record the agent writes to the audit log, as types, and the one place they
//! become a record's fields. The log adds `seq`, `ts`, `event`, `prev` and `hash` around them.
//!
//! Field names and shapes are a contract with whoever reads the log: change them only with a
//! new event name.

use serde::Serialize;
use serde_json::{Map, Value};

/// What happened, with what the record must say about it.
// Built on the stack for one `record` call and passed by reference: the size of the largest
// variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event<'a> {
    /// An X.509-SVID was signed (before it is handed out).
    SvidIssued(SvidIssued<'a>),
    /// A JWT-SVID was signed (before it is handed out).
    JwtIssued(JwtIssued<'a>),
    /// A WIT-SVID was minted, bound to a key made for it.
    WitIssued(WitIssued<'a>),
    /// A workload asked for an identity it does not hold.
    RequestDenied(Requester<'a>, &'a str),
    /// An admin call came from a caller outside the allowlist.
    AdminDenied(AdminDenied<'a>),
    /// A policy denied an admin call or a delegation.
    PolicyDenied(PolicyDenied<'a>),
    /// A narrowing rule or a limit refused a delegation.
    DelegationRefused(DelegationRefused<'a>),
    /// A lease changed: granted, pending, approved, renewed or ended (`lease_<state>`).
    Lease(LeaseChange<'a>),
    /// The trust domain's CAs changed (`ca_<what>`): prepared, published, activated, retired,
    /// removed, or changed CA files refused (`ca_reload_refused`).
    Ca(CaChange<'a>),
}

/// A CA and what happened to it.
#[derive(Debug, Serialize)]
pub struct CaChange<'a> {
    #[serde(skip)]
    pub what: &'a str,
    /// The CA certificate (absent for a refused reload).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaCert<'a>>,
    /// A retired CA's root leaves the bundle then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_bundle_until: Option<String>,
    /// Why changed CA files were refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct CaCert<'a> {
    pub serial: &'a str,
    pub fingerprint_sha256: &'a str,
    pub subject: &'a str,
    pub not_before: String,
    pub not_after: String,
}

/// The process that asked, as attested.
#[derive(Debug, Serialize)]
pub struct Requester<'a> {
    pub rpc: &'a str,
    pub pid: i32,
    pub uid: u32,
    pub exe_sha256: Option<&'a str>,
    pub selectors: Vec<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct SvidIssued<'a> {
    pub serial: &'a str,
    pub spiffe_id: String,
    pub not_before: String,
    pub not_after: String,
    pub lease_id: &'a str,
    pub task_id: &'a str,
    pub delegator: &'a str,
    /// The fetching process; none for a rotation nobody asked for.
    pub pid: Option<i32>,
    pub uid: Option<u32>,
    pub exe_sha256: Option<&'a str>,
    /// `fetch`, `rotation`, or `ca_change` (a new signing CA replaced the one that signed the
    /// lease's SVID).
    pub trigger: &'a str,
    /// The leases it was delegated from, root first (absent for a lease granted directly).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<Link<'a>>,
}

#[derive(Debug, Serialize)]
pub struct JwtIssued<'a> {
    pub jti: &'a str,
    pub audiences: &'a [String],
    pub spiffe_id: String,
    pub expires_at: String,
    pub lease_id: &'a str,
    pub task_id: &'a str,
    pub delegator: &'a str,
    pub kid: &'a str,
    pub pid: i32,
    pub uid: u32,
    pub exe_sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<Link<'a>>,
}

/// A WIT-SVID: its token's `jti`, and the thumbprint (RFC 7638) of the key it is bound to.
#[derive(Debug, Serialize)]
pub struct WitIssued<'a> {
    pub jti: &'a str,
    pub key_thumbprint: &'a str,
    pub spiffe_id: &'a str,
    pub expires_at: String,
    pub lease_id: &'a str,
    pub task_id: &'a str,
    pub delegator: &'a str,
    pub kid: &'a str,
    pub pid: i32,
    pub uid: u32,
    pub exe_sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<Link<'a>>,
}

#[derive(Debug, Serialize)]
pub struct AdminDenied<'a> {
    pub rpc: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub selectors: Vec<&'a str>,
    /// A remote caller's certificate identity (absent on the admin socket).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<&'a str>,
    pub reason: &'a str,
}

/// A delegation a narrowing rule or a limit refused (a policy's refusal is `policy_denied`).
#[derive(Debug, Serialize)]
pub struct DelegationRefused<'a> {
    /// The lease delegated from; none when the caller named a lease it does not hold.
    pub parent_lease_id: Option<&'a str>,
    pub parent_spiffe_id: Option<String>,
    pub task_id: Option<&'a str>,
    pub pid: Option<i32>,
    pub uid: u32,
    /// The rule or limit, in words.
    pub reason: &'a str,
    /// The parent's own chain, root first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<Link<'a>>,
}

#[derive(Debug, Serialize)]
pub struct PolicyDenied<'a> {
    pub action: &'a str,
    pub lease_id: &'a str,
    pub task_id: &'a str,
    pub policies: &'a [String],
    pub errors: &'a [String],
    /// The whole request the policies saw.
    pub request: Value,
}

/// Who did something to a lease.
/// One ancestor of a delegated lease, root first (the chain in every record about it).
#[derive(Debug, Serialize)]
pub struct Link<'a> {
    pub lease_id: &'a str,
    pub spiffe_id: String,
    pub task_id: &'a str,
}

#[derive(Debug, Serialize)]
pub struct Principal<'a> {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub user: Option<&'a str>,
    /// A remote admin caller's certificate identity (absent for a local caller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<&'a str>,
}

/// A lease as its records show it, and why it changed.
#[derive(Debug, Serialize)]
pub struct LeaseChange<'a> {
    /// `granted`, `pending`, `approved`, `renewed`, the state it ended in, or `withdrawn`
    /// (no longer served on this node: its record in a shared store cannot be read here).
    #[serde(skip)]
    pub what: &'a str,
    pub lease_id: &'a str,
    pub task_id: &'a str,
    pub delegator: &'a str,
    pub agent: &'a str,
    pub spiffe_id: String,
    pub selectors: Vec<&'a str>,
    pub state: &'a str,
    pub created_at: String,
    pub expires_at: String,
    pub max_expires_at: String,
    pub svid_ttl_ms: u64,
    pub jwt_ttl_ms: u64,
    pub audiences: &'a [String],
    pub reason: &'a str,
    pub granted_by: Principal<'a>,
    pub ended_at: Option<String>,
    pub ended_by: Option<Principal<'a>>,
    pub approval_deadline: Option<String>,
    pub approved_at: Option<String>,
    pub approved_by: Option<Principal<'a>>,
    /// Why it changed (a revocation's reason, the gates that hold it); left out when empty.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub reason_for_change: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<Link<'a>>,
    /// Levels of delegation it may still make (absent: none).
    #[serde(skip_serializing_if = "is_zero")]
    pub may_delegate: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub end_on_violation: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Event<'_> {
    /// The record's `event`.
    pub fn name(&self) -> String {
        match self {
            Event::SvidIssued(_) => "svid_issued".into(),
            Event::JwtIssued(_) => "jwt_issued".into(),
            Event::WitIssued(_) => "wit_issued".into(),
            Event::RequestDenied(..) => "request_denied".into(),
            Event::AdminDenied(_) => "admin_denied".into(),
            Event::PolicyDenied(_) => "policy_denied".into(),
            Event::DelegationRefused(_) => "delegation_refused".into(),
            Event::Lease(change) => format!("lease_{}", change.what),
            Event::Ca(change) => format!("ca_{}", change.what),
        }
    }

    /// The record's own fields.
    pub fn fields(&self) -> Map<String, Value> {
        #[derive(Serialize)]
        struct Denied<'a> {
            #[serde(flatten)]
            who: &'a Requester<'a>,
            reason: &'a str,
        }
        let value = match self {
            Event::SvidIssued(e) => serde_json::to_value(e),
            Event::JwtIssued(e) => serde_json::to_value(e),
            Event::WitIssued(e) => serde_json::to_value(e),
            Event::RequestDenied(who, reason) => serde_json::to_value(Denied { who, reason }),
            Event::AdminDenied(e) => serde_json::to_value(e),
            Event::PolicyDenied(e) => serde_json::to_value(e),
            Event::DelegationRefused(e) => serde_json::to_value(e),
            Event::Lease(e) => serde_json::to_value(e),
            Event::Ca(e) => serde_json::to_value(e),
        };
        match value {
            Ok(Value::Object(fields)) => fields,
            // Every event is a struct of plain fields, which serialise to an object.
            _ => unreachable!("audit events serialise to JSON objects"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_their_names_and_fields() {
        let who = Requester {
            rpc: "FetchX509SVID",
            pid: 7,
            uid: 1000,
            exe_sha256: None,
            selectors: vec!["unix:uid:1000"],
        };
        let e = Event::RequestDenied(who, "no identity issued");
        assert_eq!(e.name(), "request_denied");
        assert_eq!(
            Value::Object(e.fields()),
            serde_json::json!({
                "rpc": "FetchX509SVID", "pid": 7, "uid": 1000, "exe_sha256": null,
                "selectors": ["unix:uid:1000"], "reason": "no identity issued",
            })
        );
        let p = || Principal {
            uid: 0,
            gid: 0,
            pid: None,
            user: None,
            spiffe_id: None,
        };
        let change = |reason| LeaseChange {
            what: "revoked",
            lease_id: "ab",
            task_id: "t",
            delegator: "d",
            agent: "a",
            spiffe_id: "spiffe://example.org/x".into(),
            selectors: vec!["unix:uid:1"],
            state: "revoked",
            created_at: "c".into(),
            expires_at: "e".into(),
            max_expires_at: "m".into(),
            svid_ttl_ms: 1,
            jwt_ttl_ms: 2,
            audiences: &[],
            reason: "",
            granted_by: p(),
            ended_at: Some("x".into()),
            ended_by: Some(p()),
            approval_deadline: None,
            approved_at: None,
            approved_by: None,
            reason_for_change: reason,
            chain: Vec::new(),
            may_delegate: 0,
            end_on_violation: false,
        };
        let e = Event::Lease(change(""));
        assert_eq!(e.name(), "lease_revoked");
        let fields = e.fields();
        assert!(!fields.contains_key("reason_for_change") && !fields.contains_key("what"));
        assert_eq!(fields["ended_by"]["uid"], 0);
        assert!(!fields.contains_key("chain") && !fields.contains_key("may_delegate"));
        let fields = Event::Lease(change("key leaked")).fields();
        assert_eq!(fields["reason_for_change"], "key leaked");
        let delegated = LeaseChange {
            chain: vec![Link {
                lease_id: "cd",
                spiffe_id: "spiffe://example.org/p".into(),
                task_id: "plan",
            }],
            may_delegate: 1,
            ..change("")
        };
        let fields = Event::Lease(delegated).fields();
        assert_eq!(
            fields["chain"],
            serde_json::json!([{"lease_id": "cd", "spiffe_id": "spiffe://example.org/p", "task_id": "plan"}])
        );
        assert_eq!(fields["may_delegate"], 1);
    }
}
