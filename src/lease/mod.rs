//! Task leases: the model, the validation of grant input, and the SPIFFE ID template.
//!
//! A lease says: *this task, approved by this delegator, may hold this identity, for processes
//! matching these selectors, until this deadline*. Values that exist here are valid: a
//! [`Lease`] is only built by [`validate_grant`], which refuses (never rewrites) bad input and
//! names the field that was wrong.

mod delegation;
mod narrow;
mod rate;
mod registry;
pub mod service;
pub mod store;

pub use delegation::{DelegationError, DelegationService, Holder};
pub use narrow::{validate_delegation, DelegateInput};
pub use rate::Budget;
pub use registry::{ActiveLease, Changes, Durable, Leases};
pub use service::{Admitted, Allowlist, Caller, TaskError, TaskService};
pub use store::{LeaseStore, StoreChange, StoreError, StoreHealth, StoreWatch, Stored};

use std::fmt;
use std::time::{Duration, SystemTime};

use spiffe::{SpiffeId, TrustDomain};

use crate::selector::{Selector, Selectors};

/// Longest task ID, agent name or delegator segment we accept.
pub const MAX_NAME_LEN: usize = 128;
/// Longest delegator (all segments with their `/`).
pub const MAX_DELEGATOR_LEN: usize = 255;
/// The SPIFFE ID spec caps URIs at 2048 bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
pub const MAX_SELECTORS: usize = 32;
pub const MAX_AUDIENCES: usize = 32;
pub const MAX_AUDIENCE_LEN: usize = 256;
pub const MAX_REASON_LEN: usize = 1024;
/// The deepest delegation chain the configuration may allow: each level adds an ancestor to
/// every JWT-SVID of the leases below it.
pub const MAX_DELEGATION_DEPTH: u32 = 16;
/// Lease and SVID TTLs below this are refused: X.509 validity has second precision.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// A random, unguessable lease identifier (128 bits, lowercase hex).
///
/// Held inline (32 ASCII bytes, no heap allocation): every active lease's ID is kept four times
/// over (the lease, the active map, the selector index, the deadline queue).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId([u8; 32]);

impl LeaseId {
    pub fn random() -> Self {
        let bytes: [u8; 16] = rand::random();
        let mut hex = [0u8; 32];
        hex::encode_to_slice(bytes, &mut hex).expect("16 bytes are 32 hex digits");
        LeaseId(hex)
    }

    /// Parses a lease ID given by a client; anything but 32 lowercase hex digits is refused.
    pub fn parse(s: &str) -> Result<Self, LeaseError> {
        match <[u8; 32]>::try_from(s.as_bytes()) {
            Ok(bytes)
                if bytes
                    .iter()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) =>
            {
                Ok(LeaseId(bytes))
            }
            _ => Err(LeaseError::invalid(
                "lease_id",
                "must be 32 lowercase hex digits",
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("lease IDs are ASCII hex digits")
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LeaseId").field(&self.as_str()).finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Held back by an approval gate: issues nothing until approved.
    Pending,
    Active,
    Revoked,
    Expired,
    Completed,
    ProcessExited,
    /// The lease it was delegated from ended (for whatever reason), and took it along.
    ParentEnded,
}

impl LeaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Pending => "pending",
            LeaseState::Active => "active",
            LeaseState::Revoked => "revoked",
            LeaseState::Expired => "expired",
            LeaseState::Completed => "completed",
            LeaseState::ProcessExited => "process_exited",
            LeaseState::ParentEnded => "parent_ended",
        }
    }
}

impl fmt::Display for LeaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller of the admin API: from its socket's peer credentials, or (on the
/// remote admin API) from its client certificate, whose SPIFFE ID (or subject name) it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub user: Option<String>,
    /// A remote caller's identity: the SPIFFE ID of its X.509-SVID, or `cn:NAME` for a
    /// certificate from an operator CA without one. `None` for a local caller.
    pub spiffe_id: Option<String>,
}

impl Principal {
    /// The agent itself (for expiry, which no caller asked for).
    pub fn agent() -> Self {
        Principal {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            pid: Some(std::process::id() as i32),
            user: Some("mayfly-agent".to_owned()),
            spiffe_id: None,
        }
    }

    /// A caller of the remote admin API, known by its certificate alone: no uid, gid or pid
    /// (uid and gid are `u32::MAX`, which no local caller has).
    pub fn remote(identity: String) -> Self {
        Principal {
            uid: u32::MAX,
            gid: u32::MAX,
            pid: None,
            user: None,
            spiffe_id: Some(identity),
        }
    }

    /// Whether two principals are the same party (for four eyes): the same remote identity,
    /// or the same local uid.
    pub fn same_party(&self, other: &Principal) -> bool {
        match (&self.spiffe_id, &other.spiffe_id) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self.uid == other.uid,
            _ => false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Lease {
    pub id: LeaseId,
    pub task_id: String,
    pub delegator: String,
    pub agent: String,
    pub spiffe_id: SpiffeId,
    /// All must match the caller.
    pub selectors: Selectors,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    pub max_expires_at: SystemTime,
    pub svid_ttl: Duration,
    /// Lifetime of each JWT-SVID (never past `expires_at` either).
    pub jwt_ttl: Duration,
    pub audiences: Vec<String>,
    pub reason: String,
    pub granted_by: Principal,
    pub state: LeaseState,
    pub ended_at: Option<SystemTime>,
    pub ended_by: Option<Principal>,
    /// Why it ended, in words (the reason given to revoke, or what the agent saw); empty
    /// while the lease lives.
    pub end_reason: String,
    /// A pending lease not approved by then ends as `expired`.
    pub approval_deadline: Option<SystemTime>,
    pub approved_at: Option<SystemTime>,
    pub approved_by: Option<Principal>,
    /// The leases this one was delegated from, the root (granted on the admin API) first and
    /// the parent last; empty for a lease granted on the admin API. The root's delegator is
    /// this lease's delegator: who the whole chain acts for.
    pub chain: Vec<Link>,
    /// How many levels of delegation may still be made below this lease (0: it delegates
    /// nothing).
    pub may_delegate: u32,
    /// A scope violation by a process holding it (an audience, identity or delegation it was
    /// refused) ends it at once, revoked.
    pub end_on_violation: bool,
    /// The node a lease bound to a process (`unix:pid`) belongs to: only that node's agent
    /// matches it, and on a shared store only that node reads it. `None` for a lease any node
    /// may serve.
    pub node: Option<String>,
    /// How many times the store has written this lease, as this agent last saw it: what a
    /// shared store compares before it takes a change, so that two agents cannot both move
    /// the lease from one state. Not stored in the record; 0 for a lease never written.
    pub revision: u64,
}

/// One ancestor in a delegation chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub lease_id: LeaseId,
    pub spiffe_id: SpiffeId,
    pub task_id: String,
}

impl Lease {
    /// The lease this one was delegated from, if any.
    pub fn parent(&self) -> Option<&LeaseId> {
        self.chain.last().map(|l| &l.lease_id)
    }

    /// The chain as audit records show it, root first.
    pub fn audit_chain(&self) -> Vec<crate::audit::event::Link<'_>> {
        self.chain
            .iter()
            .map(|l| crate::audit::event::Link {
                lease_id: l.lease_id.as_str(),
                spiffe_id: l.spiffe_id.to_string(),
                task_id: &l.task_id,
            })
            .collect()
    }

    /// Delegations between the root and this lease (0 for a root).
    pub fn depth(&self) -> u32 {
        self.chain.len() as u32
    }

    /// Marks this lease ended: in `state`, now, by `by`, for `reason`.
    pub fn mark_ended(&mut self, state: LeaseState, by: Principal, reason: &str) {
        debug_assert_ne!(state, LeaseState::Active);
        self.state = state;
        self.ended_at = Some(SystemTime::now());
        self.ended_by = Some(by);
        self.end_reason = reason.to_owned();
    }

    /// The lifetime asked for at grant (an approved lease's deadline also includes the wait
    /// for approval, so this is meant for new and pending leases).
    pub fn ttl(&self) -> Duration {
        self.expires_at
            .duration_since(self.created_at)
            .unwrap_or_default()
    }

    /// The renewal ceiling asked for at grant (same caveat as [`Lease::ttl`]).
    pub fn max_ttl(&self) -> Duration {
        self.max_expires_at
            .duration_since(self.created_at)
            .unwrap_or_default()
    }
}

/// What a client asks for; checked by [`validate_grant`].
#[derive(Clone, Debug, Default)]
pub struct GrantInput {
    pub task_id: String,
    pub delegator: String,
    pub agent: String,
    pub ttl: Option<Duration>,
    pub max_ttl: Option<Duration>,
    pub svid_ttl: Option<Duration>,
    pub jwt_ttl: Option<Duration>,
    pub selectors: Vec<String>,
    pub audiences: Vec<String>,
    pub reason: String,
    /// Levels of delegation the lease may make below itself (0, the default: none).
    pub max_delegation_depth: u32,
    pub end_on_violation: bool,
}

/// The limits every unit test uses: trust domain `example.org`, the default template, an hour
/// at most, five-minute SVIDs and JWTs by default.
#[cfg(test)]
pub(crate) fn test_limits() -> LeaseLimits {
    LeaseLimits {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        template: IdTemplate::new(DEFAULT_TEMPLATE).unwrap(),
        max_ttl: Duration::from_secs(3600),
        default_svid_ttl: Duration::from_secs(300),
        max_svid_ttl: Duration::from_secs(3600),
        default_jwt_ttl: Duration::from_secs(300),
        max_jwt_ttl: Duration::from_secs(3600),
        jwt_mint: DEFAULT_JWT_MINT,
        delegation: DelegationLimits::default(),
    }
}

/// Bounds and defaults from the agent's configuration.
#[derive(Clone, Debug)]
pub struct LeaseLimits {
    pub trust_domain: TrustDomain,
    pub template: IdTemplate,
    pub max_ttl: Duration,
    pub default_svid_ttl: Duration,
    pub max_svid_ttl: Duration,
    pub default_jwt_ttl: Duration,
    pub max_jwt_ttl: Duration,
    /// How fast one lease's JWT-SVIDs may be minted.
    pub jwt_mint: MintRate,
    pub delegation: DelegationLimits,
}

/// Bounds on delegation, from the `[delegation]` config section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DelegationLimits {
    /// The deepest chain: no grant may allow more levels below it than this.
    pub max_depth: u32,
    /// Live (active or pending) children one lease may have at once.
    pub max_children: u32,
    /// How fast one lease may delegate.
    pub rate: MintRate,
}

impl Default for DelegationLimits {
    fn default() -> Self {
        DelegationLimits {
            max_depth: 4,
            max_children: 32,
            rate: MintRate {
                per_second: 10,
                burst: 20,
            },
        }
    }
}

/// How fast one lease's tokens may be minted: `burst` at once, then `per_second`. What is
/// served from the cache does not count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MintRate {
    pub per_second: u32,
    pub burst: u32,
}

/// A workload asks for a handful of audience sets; a flood of new ones (each minted, signed
/// and audited) is held to this, per lease.
pub const DEFAULT_JWT_MINT: MintRate = MintRate {
    per_second: 5,
    burst: 20,
};

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("{field}: {message}")]
    InvalidField {
        field: &'static str,
        message: String,
    },
    #[error("lease {0} not found")]
    NotFound(String),
    #[error("lease {id} is {state}, not active")]
    NotActive { id: String, state: LeaseState },
    #[error("{0}")]
    SelfApproval(String),
    /// A delegation rule refused the request (narrowing, depth, fan-out or rate): the rule is
    /// named.
    #[error("{0}")]
    Refused(String),
    /// The change could not be made durable (audit log or lease store), so it was refused.
    #[error("{0}")]
    Unavailable(String),
    /// Another agent sharing the lease store changed the lease first; nothing was changed
    /// here. Asking again acts on the lease as it is now.
    #[error("{0}")]
    Changed(String),
}

impl LeaseError {
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        LeaseError::InvalidField {
            field,
            message: message.into(),
        }
    }
}

/// A SPIFFE ID template such as
/// `spiffe://{trust_domain}/agent/{agent}/task/{task_id}/delegator/{delegator}`.
#[derive(Clone, Debug)]
pub struct IdTemplate(String);

pub const DEFAULT_TEMPLATE: &str =
    "spiffe://{trust_domain}/agent/{agent}/task/{task_id}/delegator/{delegator}";

impl IdTemplate {
    /// Checks the template once, at start-up: it must name the trust domain as its authority, use
    /// only known placeholders, embed the task ID and the delegator, and render to a valid ID.
    pub fn new(template: &str) -> Result<Self, String> {
        if !template.starts_with("spiffe://{trust_domain}/") {
            return Err("must start with spiffe://{trust_domain}/".into());
        }
        for needed in ["{task_id}", "{delegator}"] {
            if !template.contains(needed) {
                return Err(format!(
                    "must contain {needed}: the identity names the task"
                ));
            }
        }
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| "unclosed '{'".to_string())?;
            let name = &rest[open + 1..open + close];
            if !["trust_domain", "agent", "task_id", "delegator"].contains(&name) {
                return Err(format!("unknown placeholder {{{name}}}"));
            }
            rest = &rest[open + close + 1..];
        }
        let t = IdTemplate(template.to_owned());
        let td = TrustDomain::new("example.org").expect("valid trust domain");
        let sample = t.render(&td, "agent", "task", "user/alice");
        SpiffeId::new(&sample).map_err(|e| format!("renders an invalid SPIFFE ID: {e}"))?;
        Ok(t)
    }

    fn render(&self, td: &TrustDomain, agent: &str, task_id: &str, delegator: &str) -> String {
        self.0
            .replace("{trust_domain}", td.as_str())
            .replace("{agent}", agent)
            .replace("{task_id}", task_id)
            .replace("{delegator}", delegator)
    }
}

/// One SPIFFE path segment: `[A-Za-z0-9._-]+`, not `.` or `..` (SPIFFE ID spec, section 2.2).
fn check_segment(field: &'static str, value: &str, max: usize) -> Result<(), LeaseError> {
    if value.is_empty() {
        return Err(LeaseError::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(LeaseError::invalid(
            field,
            format!("is {} bytes, at most {max} allowed", value.len()),
        ));
    }
    if value == "." || value == ".." {
        return Err(LeaseError::invalid(field, "must not be '.' or '..'"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(LeaseError::invalid(
            field,
            format!("character {c:?} is not allowed (only A-Z a-z 0-9 . _ -)"),
        ));
    }
    Ok(())
}

fn check_delegator(value: &str) -> Result<(), LeaseError> {
    if value.len() > MAX_DELEGATOR_LEN {
        return Err(LeaseError::invalid(
            "delegator",
            format!(
                "is {} bytes, at most {MAX_DELEGATOR_LEN} allowed",
                value.len()
            ),
        ));
    }
    if value.is_empty() {
        return Err(LeaseError::invalid("delegator", "must not be empty"));
    }
    for segment in value.split('/') {
        check_segment("delegator", segment, MAX_NAME_LEN).map_err(|e| match e {
            LeaseError::InvalidField { message, .. } => {
                LeaseError::invalid("delegator", format!("segment {segment:?}: {message}"))
            }
            other => other,
        })?;
    }
    Ok(())
}

fn check_ttl(
    field: &'static str,
    ttl: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), LeaseError> {
    if ttl < min {
        return Err(LeaseError::invalid(
            field,
            format!(
                "{} is below the minimum {}",
                humantime::format_duration(ttl),
                humantime::format_duration(min)
            ),
        ));
    }
    if ttl > max {
        return Err(LeaseError::invalid(
            field,
            format!(
                "{} is above the maximum {}",
                humantime::format_duration(ttl),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

/// Checks one selector from a grant. A bare `unix:pid:PID` is bound here to the live process's
/// start time (`unix:pid:PID:START`), so that a reused PID never matches.
pub fn check_selector(raw: &str) -> Result<Selector, LeaseError> {
    let bad = |m: String| LeaseError::invalid("selectors", m);
    let selector = Selector::parse(raw).map_err(|e| bad(e.to_string()))?;
    match selector.unbound_pid() {
        None => Ok(selector),
        Some(pid) => match crate::attest::process_start_time(pid) {
            Ok(start) => Ok(Selector::process(pid, start)),
            Err(e) => Err(bad(format!("{raw:?}: no such process to bind to ({e})"))),
        },
    }
}

/// Checks the selectors of a new lease: at least one, at most [`MAX_SELECTORS`], each bound
/// (see [`check_selector`]).
fn check_selectors(raw: &[String]) -> Result<Selectors, LeaseError> {
    if raw.is_empty() {
        return Err(LeaseError::invalid(
            "selectors",
            "at least one selector is required (a lease must not match every process)",
        ));
    }
    if raw.len() > MAX_SELECTORS {
        return Err(LeaseError::invalid(
            "selectors",
            format!("at most {MAX_SELECTORS} allowed"),
        ));
    }
    raw.iter().map(|s| check_selector(s)).collect()
}

/// The audiences of a new lease, checked, sorted and deduplicated.
fn sorted_audiences(mut audiences: Vec<String>) -> Result<Vec<String>, LeaseError> {
    check_audiences("audiences", &audiences)?;
    audiences.sort();
    audiences.dedup();
    Ok(audiences)
}

/// Checks a reason given to grant or revoke: it is printed and logged as it is, so at most
/// [`MAX_REASON_LEN`] bytes and no control character but tab.
pub fn check_reason(reason: &str) -> Result<(), LeaseError> {
    if reason.len() > MAX_REASON_LEN {
        return Err(LeaseError::invalid(
            "reason",
            format!(
                "is {} bytes, at most {MAX_REASON_LEN} allowed",
                reason.len()
            ),
        ));
    }
    if reason.chars().any(|c| c.is_control() && c != '\t') {
        return Err(LeaseError::invalid(
            "reason",
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks a list of JWT audiences, granted or asked for: at most [`MAX_AUDIENCES`], each 1 to
/// [`MAX_AUDIENCE_LEN`] bytes without control characters.
pub fn check_audiences(field: &'static str, audiences: &[String]) -> Result<(), LeaseError> {
    if audiences.len() > MAX_AUDIENCES {
        return Err(LeaseError::invalid(
            field,
            format!("at most {MAX_AUDIENCES} allowed"),
        ));
    }
    for a in audiences {
        if a.is_empty() || a.len() > MAX_AUDIENCE_LEN || a.chars().any(char::is_control) {
            return Err(LeaseError::invalid(
                field,
                format!("{a:?}: must be 1 to {MAX_AUDIENCE_LEN} bytes without control characters"),
            ));
        }
    }
    Ok(())
}

/// The SPIFFE ID the template gives, checked.
fn render_id(
    limits: &LeaseLimits,
    agent: &str,
    task_id: &str,
    delegator: &str,
) -> Result<SpiffeId, LeaseError> {
    let rendered = limits
        .template
        .render(&limits.trust_domain, agent, task_id, delegator);
    if rendered.len() > MAX_SPIFFE_ID_LEN {
        return Err(LeaseError::invalid(
            "spiffe_id",
            format!(
                "would be {} bytes, at most {MAX_SPIFFE_ID_LEN} allowed",
                rendered.len()
            ),
        ));
    }
    SpiffeId::new(&rendered)
        .map_err(|e| LeaseError::invalid("spiffe_id", format!("{rendered:?} is invalid: {e}")))
}

/// A deadline `d` after `now`, in whole seconds (the instant shown is the instant it ends).
/// Checked: the config file's limits can reach past any time a `SystemTime` holds.
fn deadline(field: &'static str, now: SystemTime, d: Duration) -> Result<SystemTime, LeaseError> {
    now.checked_add(d)
        .map(crate::time::floor_secs)
        .ok_or_else(|| LeaseError::invalid(field, "is beyond any time this agent can represent"))
}

/// Checks a grant request against the limits and builds the lease. Nothing is stored here.
pub fn validate_grant(
    input: GrantInput,
    limits: &LeaseLimits,
    now: SystemTime,
    granted_by: Principal,
) -> Result<Lease, LeaseError> {
    check_segment("task_id", &input.task_id, MAX_NAME_LEN)?;
    check_delegator(&input.delegator)?;
    check_segment("agent", &input.agent, MAX_NAME_LEN)?;

    let ttl = input
        .ttl
        .ok_or_else(|| LeaseError::invalid("ttl", "is required"))?;
    check_ttl("ttl", ttl, MIN_TTL, limits.max_ttl)?;
    let max_ttl = input.max_ttl.unwrap_or(ttl);
    check_ttl("max_ttl", max_ttl, ttl, limits.max_ttl)?;
    let svid_ttl = input.svid_ttl.unwrap_or(limits.default_svid_ttl);
    check_ttl("svid_ttl", svid_ttl, MIN_TTL, limits.max_svid_ttl)?;
    let jwt_ttl = input.jwt_ttl.unwrap_or(limits.default_jwt_ttl);
    check_ttl("jwt_ttl", jwt_ttl, MIN_TTL, limits.max_jwt_ttl)?;
    let expires_at = deadline("ttl", now, ttl)?;
    let max_expires_at = deadline("max_ttl", now, max_ttl)?;

    let selectors = check_selectors(&input.selectors)?;
    let audiences = sorted_audiences(input.audiences)?;

    check_reason(&input.reason)?;

    if input.max_delegation_depth > limits.delegation.max_depth {
        return Err(LeaseError::invalid(
            "max_delegation_depth",
            format!(
                "{} is above the maximum {} (delegation.max_depth)",
                input.max_delegation_depth, limits.delegation.max_depth
            ),
        ));
    }

    let spiffe_id = render_id(limits, &input.agent, &input.task_id, &input.delegator)?;

    Ok(Lease {
        id: LeaseId::random(),
        task_id: input.task_id,
        delegator: input.delegator,
        agent: input.agent,
        spiffe_id,
        selectors,
        created_at: now,
        expires_at,
        max_expires_at,
        svid_ttl,
        jwt_ttl,
        audiences,
        reason: input.reason,
        granted_by,
        state: LeaseState::Active,
        ended_at: None,
        ended_by: None,
        end_reason: String::new(),
        approval_deadline: None,
        approved_at: None,
        approved_by: None,
        chain: Vec::new(),
        may_delegate: input.max_delegation_depth,
        end_on_violation: input.end_on_violation,
        // Set by the registry, which knows the node, for a lease bound to a process.
        node: None,
        revision: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LeaseLimits {
        test_limits()
    }

    fn input() -> GrantInput {
        GrantInput {
            task_id: "t-1".into(),
            delegator: "user/alice".into(),
            agent: "reporter".into(),
            ttl: Some(Duration::from_secs(60)),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        }
    }

    fn field_of(r: Result<Lease, LeaseError>) -> &'static str {
        match r {
            Err(LeaseError::InvalidField { field, .. }) => field,
            other => panic!("expected InvalidField, got {other:?}"),
        }
    }

    /// Found while fuzzing admin requests (fuzz/fuzz_targets/admin.rs, the input below): under
    /// limits as large as the config file holds (`leases.max_ttl = "300000000000y"`), a grant
    /// whose TTL ends past the last time a `SystemTime` holds panicked computing its deadline.
    #[test]
    fn a_deadline_past_any_representable_time_is_refused() {
        use prost::Message as _;
        // GrantRequest{task_id "t", delegator "d", agent "a", ttl {seconds i64::MAX},
        // selectors ["unix:uid:1"]}, as the fuzz target decoded it.
        const GRANT: &[u8] = b"\x0a\x01t\x12\x01d\x1a\x01a\x22\x0a\x08\xff\xff\xff\xff\xff\xff\xff\xff\x7f\x3a\x0aunix:uid:1";
        let r = crate::proto::admin::GrantRequest::decode(GRANT).unwrap();
        let ttl = r.ttl.as_ref().and_then(crate::time::from_duration);
        let largest = Duration::new(u64::MAX, 999_999_999);
        let limits = LeaseLimits {
            max_ttl: largest,
            max_svid_ttl: largest,
            max_jwt_ttl: largest,
            ..limits()
        };
        let grant = GrantInput {
            task_id: r.task_id,
            delegator: r.delegator,
            agent: r.agent,
            ttl,
            selectors: r.selectors,
            ..Default::default()
        };
        let now = SystemTime::now();
        let r = validate_grant(grant.clone(), &limits, now, Principal::agent());
        assert_eq!(field_of(r), "ttl");
        let r = validate_grant(
            GrantInput {
                ttl: Some(Duration::from_secs(60)),
                max_ttl: ttl,
                ..grant
            },
            &limits,
            now,
            Principal::agent(),
        );
        assert_eq!(field_of(r), "max_ttl");
    }

    #[test]
    fn grant_renders_the_spiffe_id() {
        let lease =
            validate_grant(input(), &limits(), SystemTime::now(), Principal::agent()).unwrap();
        assert_eq!(
            lease.spiffe_id.to_string(),
            "spiffe://example.org/agent/reporter/task/t-1/delegator/user/alice"
        );
        assert_eq!(lease.max_expires_at, lease.expires_at);
        assert_eq!(lease.svid_ttl, Duration::from_secs(300));
    }

    #[test]
    fn bad_fields_are_named() {
        let now = SystemTime::now();
        let l = limits();
        let p = Principal::agent;
        let mut i = input();
        i.task_id = "a b".into();
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "task_id");
        let mut i = input();
        i.task_id = "..".into();
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "task_id");
        let mut i = input();
        i.task_id = "x".repeat(MAX_NAME_LEN + 1);
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "task_id");
        let mut i = input();
        i.delegator = "user//alice".into();
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "delegator");
        let mut i = input();
        i.delegator = "user/../root".into();
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "delegator");
        let mut i = input();
        i.agent = "a/b".into();
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "agent");
        let mut i = input();
        i.ttl = Some(Duration::from_millis(500));
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "ttl");
        let mut i = input();
        i.ttl = Some(Duration::from_secs(7200));
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "ttl");
        let mut i = input();
        i.max_ttl = Some(Duration::from_secs(30));
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "max_ttl");
        let mut i = input();
        i.svid_ttl = Some(Duration::from_secs(7200));
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "svid_ttl");
        let mut i = input();
        i.selectors = vec![];
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "selectors");
        for bad in [
            "unix:uid:abc",
            "unix:uid",
            "k8s:nope:prod",
            "unix:sha256:XYZ",
            "unix:path:relative",
            "unix:nope:1",
            "unix:pid:0",
        ] {
            let mut i = input();
            i.selectors = vec![bad.into()];
            assert_eq!(
                field_of(validate_grant(i, &l, now, p())),
                "selectors",
                "{bad}"
            );
        }
        let mut i = input();
        i.reason = "r".repeat(MAX_REASON_LEN + 1);
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "reason");
        let mut i = input();
        i.audiences = vec![String::new()];
        assert_eq!(field_of(validate_grant(i, &l, now, p())), "audiences");
        let mut i = input();
        i.max_delegation_depth = l.delegation.max_depth + 1;
        assert_eq!(
            field_of(validate_grant(i, &l, now, p())),
            "max_delegation_depth"
        );
        let mut i = input();
        i.max_delegation_depth = l.delegation.max_depth;
        assert_eq!(
            validate_grant(i, &l, now, p()).unwrap().may_delegate,
            l.delegation.max_depth
        );
    }

    #[test]
    fn bare_pid_is_bound_to_its_start_time() {
        let me = std::process::id();
        let s = check_selector(&format!("unix:pid:{me}")).unwrap();
        let start = crate::attest::process_start_time(me as i32).unwrap();
        assert_eq!(s, format!("unix:pid:{me}:{start}"));
    }

    #[test]
    fn templates_are_checked() {
        assert!(IdTemplate::new("spiffe://{trust_domain}/task/{task_id}").is_err());
        assert!(IdTemplate::new("spiffe://other/{task_id}/{delegator}").is_err());
        assert!(IdTemplate::new("spiffe://{trust_domain}/{task_id}/{delegator}/{oops}").is_err());
        assert!(IdTemplate::new("spiffe://{trust_domain}/t/{task_id}/d/{delegator}").is_ok());
    }

    #[test]
    fn lease_ids_parse_strictly() {
        let id = LeaseId::random();
        assert_eq!(LeaseId::parse(id.as_str()).unwrap(), id);
        assert!(LeaseId::parse("../etc").is_err());
        assert!(LeaseId::parse(&id.as_str().to_uppercase()).is_err());
    }
}
