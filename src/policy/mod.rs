//! Cedar authorization of mayfly admin calls.
//!
//! Every admin call (Grant, Renew, Revoke, Approve) is authorized by [Cedar]
//! policies that security teams write and test. The caller hands in a plain
//! [`PolicyRequest`]; this module turns it into Cedar entities and a Cedar
//! request, evaluates it against the current policy set and reports a
//! [`Decision`] naming the policies that decided.
//!
//! [Cedar]: https://www.cedarpolicy.com/
//!
//! # The Cedar model
//!
//! The schema lives in `policies/mayfly.cedarschema` (embedded in the binary;
//! a different one can be configured with [`PolicySource::schema_file`]):
//!
//! * principal `Mayfly::User::"<uid>"` with `uid: Long`, `name: String`,
//!   `groups: Set<String>`, `gids: Set<Long>`;
//! * actions `Mayfly::Action::"grant"`, `"renew"`, `"revoke"`, `"approve"`;
//! * resource `Mayfly::Identity::"<spiffe_id>"` (or `"<agent>"` when the
//!   SPIFFE ID is empty) with `agent: String`, `spiffe_id: String`;
//! * context (the same record for every action): `task_id`, `delegator`,
//!   `ttl_secs`, `max_ttl_secs`, `svid_ttl_secs`, `jwt_ttl_secs`, `audiences`,
//!   `selectors`, `reason`, `now`, `grantor_uid`, `agent_uid`,
//!   `max_ttl_limit_secs` (see [`ContextAttrs`]).
//!
//! Policies are validated against the schema (strict mode) when they are
//! loaded or reloaded; any parse or validation error is reported with Cedar's
//! own message, prefixed with `file:line:column`.
//!
//! # Approval gates
//!
//! A `forbid` policy annotated `@approval("required")` does not refuse a
//! request, it requires approval:
//!
//! 1. The request is evaluated with the full policy set. Allow →
//!    [`Decision::Allow`] (naming the permits that matched).
//! 2. Deny, and every determining policy is a `forbid` annotated
//!    `@approval("required")` → the request is evaluated again without the
//!    approval-annotated policies. If that allows →
//!    [`Decision::RequireApproval`] naming the approval policies that matched;
//!    otherwise [`Decision::Deny`].
//! 3. Otherwise [`Decision::Deny`], naming the forbids that matched. A deny
//!    with an empty `policies` list means that no `permit` matched.
//!
//! A plain `forbid` therefore always wins over an approval gate. `@approval`
//! is only accepted on `forbid` policies and only with the value `"required"`;
//! anything else is a load error (a typo must not silently turn a gate into a
//! hard deny, or the reverse).
//!
//! Policies are named by their `@id("...")` annotation if present, else by
//! their Cedar policy id (`policy0`, `policy1`, ... numbered across all loaded
//! files in load order). Two policies with the same `@id` are a load error.
//!
//! # Policy files
//!
//! [`PolicySource::policy_files`] lists files or directories; a directory
//! contributes its `*.cedar` files (not recursively, sorted by name). With no
//! files configured the embedded `policies/default.cedar` is used, which
//! allows grant/renew up to `max_ttl_limit_secs` and revoke/approve
//! unconditionally (the agent's uid/gid allowlist is checked before policies).
//! Policy templates are not supported.
//!
//! [`PolicyEngine::reload`] re-reads the files and swaps the policy set
//! atomically; on any error the previous set stays in force.
//! [`PolicyEngine::watch`] polls modification times and reloads on change.
//!
//! # Request JSON (`mayfly policy check --request FILE`)
//!
//! [`PolicyRequest`] is also the JSON format of a request file. Every field is
//! optional (missing fields take their zero value) and unknown fields are
//! rejected, so typos do not go unnoticed:
//!
//! ```json
//! {
//!   "action": "grant",
//!   "principal": { "uid": 1000, "name": "alice", "groups": ["mayfly-admins"], "gids": [1000, 2000] },
//!   "resource": { "agent": "payments", "spiffe_id": "spiffe://example.org/agent/payments" },
//!   "context": {
//!     "task_id": "task-42",
//!     "delegator": "user/alice",
//!     "ttl_secs": 600,
//!     "max_ttl_secs": 3600,
//!     "svid_ttl_secs": 300,
//!     "jwt_ttl_secs": 300,
//!     "audiences": ["https://api.example.org"],
//!     "selectors": ["unix:uid:1000"],
//!     "reason": "nightly reconciliation",
//!     "now": 1700000000,
//!     "grantor_uid": 1000,
//!     "agent_uid": 998,
//!     "max_ttl_limit_secs": 86400
//!   }
//! }
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use cedar_policy::ffi::DetailedError;
use cedar_policy::{
    Authorizer, Context, Effect, Entities, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, Schema, ValidationMode, Validator,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The embedded default policy (used when no policy files are configured).
pub const DEFAULT_POLICY: &str = include_str!("../../policies/default.cedar");
/// The embedded Cedar schema (used when no schema file is configured).
pub const DEFAULT_SCHEMA: &str = include_str!("../../policies/mayfly.cedarschema");

const DEFAULT_POLICY_NAME: &str = "<embedded default.cedar>";
const DEFAULT_SCHEMA_NAME: &str = "<embedded mayfly.cedarschema>";
const APPROVAL_ANNOTATION: &str = "approval";
const APPROVAL_REQUIRED: &str = "required";

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
}

impl Action {
    /// The Cedar action id (`grant`, `renew`, `revoke`, `approve`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Grant => "grant",
            Action::Renew => "renew",
            Action::Revoke => "revoke",
            Action::Approve => "approve",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Attributes of the caller (`Mayfly::User`).
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
        }
    }
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
    /// The admin action.
    pub action: Action,
    /// The caller.
    pub principal: PrincipalAttrs,
    /// The identity being leased.
    pub resource: ResourceAttrs,
    /// The lease being asked for.
    pub context: ContextAttrs,
}

/// The outcome of [`PolicyEngine::evaluate`]. Policy names are `@id`
/// annotations (or Cedar policy ids), sorted.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Allowed; `policies` are the permits that matched.
    Allow { policies: Vec<String> },
    /// Allowed once approved; `policies` are the approval gates that matched.
    RequireApproval { policies: Vec<String> },
    /// Denied; `policies` are the forbids that matched (empty: no permit
    /// matched). `errors` are evaluation errors (policies that errored are
    /// skipped by Cedar) or the reason the request could not be built.
    Deny {
        policies: Vec<String>,
        errors: Vec<String>,
    },
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The policies named by the decision.
    pub fn policies(&self) -> &[String] {
        match self {
            Decision::Allow { policies }
            | Decision::RequireApproval { policies }
            | Decision::Deny { policies, .. } => policies,
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Allow { policies } => write!(f, "allow (by {})", policies.join(", ")),
            Decision::RequireApproval { policies } => {
                write!(f, "requires approval (by {})", policies.join(", "))
            }
            Decision::Deny { policies, errors } => {
                if policies.is_empty() {
                    f.write_str("deny (no policy permits this)")?;
                } else {
                    write!(f, "deny (by {})", policies.join(", "))?;
                }
                if !errors.is_empty() {
                    write!(f, "; errors: {}", errors.join("; "))?;
                }
                Ok(())
            }
        }
    }
}

/// Where policies come from.
#[derive(Clone, Debug, Default)]
pub struct PolicySource {
    /// Policy files, or directories whose `*.cedar` files are loaded (not
    /// recursively, sorted by name). Empty: the embedded default policy.
    pub policy_files: Vec<PathBuf>,
    /// Cedar schema (human-readable syntax; JSON syntax if the name ends in
    /// `.json`). `None`: the embedded schema.
    pub schema_file: Option<PathBuf>,
}

impl PolicySource {
    fn is_embedded(&self) -> bool {
        self.policy_files.is_empty() && self.schema_file.is_none()
    }
}

/// Errors loading policies. Messages include the file name and Cedar's own
/// message.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The schema could not be parsed.
    #[error("invalid Cedar schema: {message}")]
    Schema { path: PathBuf, message: String },
    /// A policy file could not be parsed.
    #[error("cannot parse Cedar policies in {}:\n{message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// A policy file does not validate against the schema.
    #[error("Cedar policies in {} do not validate against the schema:\n{message}", path.display())]
    Validation { path: PathBuf, message: String },
    /// A policy file is valid Cedar but not acceptable to mayfly (templates,
    /// misused `@approval`, duplicate `@id`).
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    /// Policy files are configured but contain no policies.
    #[error("no Cedar policies found in {0}")]
    NoPolicies(String),
}

/// Evaluates [`PolicyRequest`]s against the current Cedar policy set.
/// `Send + Sync`; reloads swap the whole set atomically.
pub struct PolicyEngine {
    source: PolicySource,
    state: RwLock<Arc<Loaded>>,
    /// Serializes reloads so an older read never replaces a newer one.
    reloading: Mutex<()>,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("source", &self.source)
            .field("policies", &self.describe())
            .finish()
    }
}

/// One consistent, validated policy set.
struct Loaded {
    policies: PolicySet,
    /// `policies` without the approval gates.
    without_approval: PolicySet,
    approval: HashSet<PolicyId>,
    names: HashMap<PolicyId, String>,
    schema: Schema,
    description: String,
    /// File state observed before the files were read.
    fingerprint: Fingerprint,
}

type Fingerprint = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

impl PolicyEngine {
    /// No files configured → the embedded default policy + schema. Files
    /// configured → parse and validate them against the schema (the embedded
    /// schema when `schema_file` is `None`); any parse or validation error
    /// fails with Cedar's own message, including the file name.
    pub fn load(source: PolicySource) -> Result<PolicyEngine, PolicyError> {
        let loaded = load_source(&source)?;
        tracing::info!(policies = %loaded.description, "loaded Cedar policies");
        Ok(PolicyEngine {
            source,
            state: RwLock::new(Arc::new(loaded)),
            reloading: Mutex::new(()),
        })
    }

    /// Re-reads the files. On failure keeps the previous set, logs why and
    /// returns the error. With the embedded default this is a no-op.
    pub fn reload(&self) -> Result<(), PolicyError> {
        if self.source.is_embedded() {
            return Ok(());
        }
        let _serial = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        match load_source(&self.source) {
            Ok(loaded) => {
                tracing::info!(policies = %loaded.description, "reloaded Cedar policies");
                let loaded = Arc::new(loaded);
                *self.state.write().unwrap_or_else(|e| e.into_inner()) = loaded;
                Ok(())
            }
            Err(err) => {
                tracing::error!(
                    error = %err,
                    "reloading Cedar policies failed; keeping the previous policies"
                );
                Err(err)
            }
        }
    }

    /// Polls the files' modification times every `every` and reloads on
    /// change until `cancel` fires. A broken file is reported once per change
    /// (the previous policies stay in force).
    pub async fn watch(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        if self.source.is_embedded() {
            cancel.cancelled().await;
            return;
        }
        let mut seen = self.current().fingerprint.clone();
        let mut ticker = tokio::time::interval(every.max(Duration::from_millis(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let engine = Arc::clone(&self);
            let seen_now = seen.clone();
            let task = tokio::task::spawn_blocking(move || {
                let now = fingerprint(&engine.source);
                if now != seen_now {
                    tracing::info!("Cedar policy files changed; reloading");
                    // Errors are logged by reload().
                    let _ = engine.reload();
                }
                now
            });
            tokio::select! {
                _ = cancel.cancelled() => return,
                res = task => match res {
                    Ok(now) => seen = now,
                    Err(err) => tracing::error!(error = %err, "policy watch task failed"),
                }
            }
        }
    }

    /// Evaluates one request. Never fails: a request that cannot be turned
    /// into a valid Cedar request is denied with the reason in `errors`.
    pub fn evaluate(&self, request: &PolicyRequest) -> Decision {
        let loaded = self.current();
        let decision = loaded.evaluate(request);
        tracing::debug!(
            action = %request.action,
            uid = request.principal.uid,
            spiffe_id = %request.resource.spiffe_id,
            decision = %decision,
            "policy decision"
        );
        decision
    }

    /// Where the current policies came from (for logs).
    pub fn describe(&self) -> String {
        self.current().description.clone()
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Loaded {
    fn evaluate(&self, request: &PolicyRequest) -> Decision {
        let (cedar_request, entities) = match build_request(request, &self.schema) {
            Ok(built) => built,
            Err(err) => {
                return Decision::Deny {
                    policies: Vec::new(),
                    errors: vec![err],
                }
            }
        };
        let authorizer = Authorizer::new();
        let first = authorizer.is_authorized(&cedar_request, &self.policies, &entities);
        let first_reason: Vec<&PolicyId> = first.diagnostics().reason().collect();
        let mut errors: Vec<String> = first
            .diagnostics()
            .errors()
            .map(ToString::to_string)
            .collect();
        if first.decision() == cedar_policy::Decision::Allow {
            return Decision::Allow {
                policies: self.names_of(first_reason),
            };
        }
        let only_gates =
            !first_reason.is_empty() && first_reason.iter().all(|id| self.approval.contains(id));
        if !only_gates {
            return Decision::Deny {
                policies: self.names_of(first_reason),
                errors,
            };
        }
        let second = authorizer.is_authorized(&cedar_request, &self.without_approval, &entities);
        if second.decision() == cedar_policy::Decision::Allow {
            return Decision::RequireApproval {
                policies: self.names_of(first_reason),
            };
        }
        for err in second.diagnostics().errors() {
            let err = err.to_string();
            if !errors.contains(&err) {
                errors.push(err);
            }
        }
        Decision::Deny {
            policies: self.names_of(second.diagnostics().reason()),
            errors,
        }
    }

    fn names_of<'a>(&self, ids: impl IntoIterator<Item = &'a PolicyId>) -> Vec<String> {
        let mut names: Vec<String> = ids
            .into_iter()
            .map(|id| {
                self.names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| id.to_string())
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }
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
fn build_request(request: &PolicyRequest, schema: &Schema) -> Result<(Request, Entities), String> {
    let p = &request.principal;
    let r = &request.resource;
    let c = &request.context;
    let principal_id = p.uid.to_string();
    let resource_id = if r.spiffe_id.is_empty() {
        r.agent.as_str()
    } else {
        r.spiffe_id.as_str()
    };
    let principal = uid_of("Mayfly::User", &principal_id)?;
    let resource = uid_of("Mayfly::Identity", resource_id)?;
    let action = uid_of("Mayfly::Action", request.action.as_str())?;

    let entities = json!([
        {
            "uid": { "type": "Mayfly::User", "id": principal_id },
            "attrs": {
                "uid": i64::from(p.uid),
                "name": p.name,
                "groups": p.groups,
                "gids": p.gids.iter().map(|g| i64::from(*g)).collect::<Vec<_>>(),
            },
            "parents": [],
        },
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

/// Cedar's message for an error, with its causes and help.
fn detailed<E: std::error::Error + ?Sized>(err: &E) -> String
where
    for<'a> DetailedError: From<&'a E>,
{
    render(None, None, &DetailedError::from(err))
}

/// Renders a Cedar diagnostic as `file:line:col: message` (plus help and
/// related diagnostics). `src` is the text the spans point into.
fn render(path: Option<&Path>, src: Option<&str>, err: &DetailedError) -> String {
    let mut out = String::new();
    if let Some(path) = path {
        out.push_str(&path.display().to_string());
        if let (Some(src), Some(label)) = (src, err.source_locations.first()) {
            let (line, col) = line_col(src, label.loc.start);
            out.push_str(&format!(":{line}:{col}"));
        }
        out.push_str(": ");
    }
    out.push_str(&err.message);
    if let Some(src) = src {
        if let Some(label) = err.source_locations.first() {
            let start = label.loc.start.min(src.len());
            let end = label.loc.end.clamp(start, src.len());
            let snippet = src.get(start..end).unwrap_or("").trim();
            if !snippet.is_empty() {
                let first_line = snippet.lines().next().unwrap_or("");
                out.push_str(&format!("\n    at: {first_line}"));
                if let Some(text) = &label.label {
                    out.push_str(&format!(" ({text})"));
                }
            }
        }
    }
    if let Some(help) = &err.help {
        out.push_str(&format!("\n    help: {help}"));
    }
    for related in &err.related {
        out.push('\n');
        out.push_str(&render(path, src, related));
    }
    out
}

/// 1-based line and column of byte `offset` in `src`.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.chars().count(), |nl| {
        before[nl + 1..].chars().count()
    }) + 1;
    (line, col)
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The policy files a source stands for (directories expanded).
fn policy_files(source: &PolicySource) -> Result<Vec<PathBuf>, PolicyError> {
    let mut files = Vec::new();
    for path in &source.policy_files {
        let io = |source| PolicyError::Io {
            path: path.clone(),
            source,
        };
        if std::fs::metadata(path).map_err(io)?.is_dir() {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(path).map_err(io)? {
                let entry = entry.map_err(io)?;
                let file = entry.path();
                if file.extension().is_some_and(|e| e == "cedar") && file.is_file() {
                    found.push(file);
                }
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Modification time and size of every configured file, every `*.cedar` file
/// in configured directories, and the directories themselves.
fn fingerprint(source: &PolicySource) -> Fingerprint {
    fn stat(path: &Path) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }
    let mut out = Vec::new();
    for path in source.policy_files.iter().chain(source.schema_file.iter()) {
        out.push((path.clone(), stat(path)));
        if path.is_dir() {
            if let Ok(entries) = std::fs::read_dir(path) {
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "cedar"))
                    .collect();
                files.sort();
                out.extend(files.into_iter().map(|f| {
                    let s = stat(&f);
                    (f, s)
                }));
            }
        }
    }
    out
}

fn load_schema(source: &PolicySource) -> Result<(Schema, String), PolicyError> {
    let (path, text, name) = match &source.schema_file {
        Some(path) => (path.clone(), read(path)?, path.display().to_string()),
        None => (
            PathBuf::from(DEFAULT_SCHEMA_NAME),
            DEFAULT_SCHEMA.to_string(),
            "embedded default".to_string(),
        ),
    };
    let is_json = path.extension().is_some_and(|e| e == "json");
    let schema = if is_json {
        Schema::from_json_str(&text).map_err(|e| PolicyError::Schema {
            message: render(Some(&path), Some(&text), &DetailedError::from(&e)),
            path: path.clone(),
        })?
    } else {
        let (schema, warnings) =
            Schema::from_cedarschema_str(&text).map_err(|e| PolicyError::Schema {
                message: render(Some(&path), Some(&text), &DetailedError::from(&e)),
                path: path.clone(),
            })?;
        for warning in warnings {
            tracing::warn!(schema = %path.display(), "{warning}");
        }
        schema
    };
    // The schema must accept the requests mayfly builds.
    build_request(&PolicyRequest::default(), &schema).map_err(|message| PolicyError::Schema {
        path: path.clone(),
        message: format!(
            "{}: the schema does not match the requests mayfly sends: {message}",
            path.display()
        ),
    })?;
    Ok((schema, name))
}

fn load_source(source: &PolicySource) -> Result<Loaded, PolicyError> {
    // Observe file state before reading, so a change during the read is seen
    // by the next poll.
    let fingerprint = fingerprint(source);
    let (schema, schema_name) = load_schema(source)?;
    let texts: Vec<(PathBuf, String)> = if source.policy_files.is_empty() {
        vec![(
            PathBuf::from(DEFAULT_POLICY_NAME),
            DEFAULT_POLICY.to_string(),
        )]
    } else {
        let files = policy_files(source)?;
        let mut texts = Vec::with_capacity(files.len());
        for file in files {
            let text = read(&file)?;
            texts.push((file, text));
        }
        texts
    };

    let validator = Validator::new(schema.clone());
    let mut policies = PolicySet::new();
    let mut without_approval = PolicySet::new();
    let mut approval = HashSet::new();
    let mut names: HashMap<PolicyId, String> = HashMap::new();
    let mut named_in: HashMap<String, PathBuf> = HashMap::new();
    let mut next = 0usize;
    for (path, text) in &texts {
        let parsed = PolicySet::from_str(text).map_err(|errs| PolicyError::Parse {
            path: path.clone(),
            message: errs
                .iter()
                .map(|e| render(Some(path), Some(text), &DetailedError::from(e)))
                .collect::<Vec<_>>()
                .join("\n"),
        })?;
        if parsed.templates().next().is_some() {
            return Err(PolicyError::Invalid {
                path: path.clone(),
                message: "Cedar policy templates are not supported".to_string(),
            });
        }
        // Renumber so ids are unique across files (policy0, policy1, ...).
        let mut file_set = PolicySet::new();
        for policy in parsed.policies() {
            let id = PolicyId::new(format!("policy{next}"));
            next += 1;
            let policy = policy.new_id(id);
            file_set.add(policy).map_err(|e| PolicyError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
        let result = validator.validate(&file_set, ValidationMode::Strict);
        if !result.validation_passed() {
            // Cedar reports a mistake once per action it applies to; show
            // each location once.
            let mut seen = HashSet::new();
            let mut messages = Vec::new();
            for err in result.validation_errors() {
                let detail = DetailedError::from(err);
                let key = (
                    err.policy_id().clone(),
                    detail
                        .source_locations
                        .first()
                        .map(|l| (l.loc.start, l.loc.end)),
                    detail.help.clone(),
                );
                if !seen.insert(key) {
                    continue;
                }
                let mut message = render(Some(path), Some(text), &detail);
                if let Some(name) = file_set
                    .policy(err.policy_id())
                    .and_then(|p| p.annotation("id"))
                {
                    message.push_str(&format!("\n    policy: {name}"));
                }
                messages.push(message);
            }
            return Err(PolicyError::Validation {
                path: path.clone(),
                message: messages.join("\n"),
            });
        }
        for warning in result.validation_warnings() {
            tracing::warn!(
                "{}",
                render(Some(path), Some(text), &DetailedError::from(warning))
            );
        }
        for policy in file_set.policies() {
            let id = policy.id().clone();
            let name = policy
                .annotation("id")
                .map_or_else(|| id.to_string(), str::to_string);
            let line = policy_line(text, policy);
            let at = format!("{}:{line}", path.display());
            if let Some(other) = named_in.insert(name.clone(), PathBuf::from(&at)) {
                return Err(PolicyError::Invalid {
                    path: path.clone(),
                    message: format!(
                        "line {line}: duplicate policy name `{name}` (also at {})",
                        other.display()
                    ),
                });
            }
            let is_gate = match policy.annotation(APPROVAL_ANNOTATION) {
                None => false,
                Some(APPROVAL_REQUIRED) if policy.effect() == Effect::Forbid => true,
                Some(APPROVAL_REQUIRED) => {
                    return Err(PolicyError::Invalid {
                        path: path.clone(),
                        message: format!(
                            "line {line}: policy `{name}`: @approval(\"required\") is only \
                             meaningful on forbid policies"
                        ),
                    })
                }
                Some(other) => {
                    return Err(PolicyError::Invalid {
                        path: path.clone(),
                        message: format!(
                            "line {line}: policy `{name}`: unknown @approval value {other:?} \
                             (the only accepted value is \"required\")"
                        ),
                    })
                }
            };
            names.insert(id.clone(), name);
            let add_err = |e: cedar_policy::PolicySetError| PolicyError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            };
            policies.add(policy.clone()).map_err(add_err)?;
            if is_gate {
                approval.insert(id);
            } else {
                without_approval.add(policy.clone()).map_err(add_err)?;
            }
        }
    }
    if policies.is_empty() {
        let list = texts
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>();
        let list = if list.is_empty() {
            source
                .policy_files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
        } else {
            list
        };
        return Err(PolicyError::NoPolicies(list.join(", ")));
    }

    let description = if source.is_embedded() {
        "embedded default".to_string()
    } else {
        let files = if source.policy_files.is_empty() {
            "embedded default".to_string()
        } else {
            texts
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "policies: {files} ({} policies, {} approval gates); schema: {schema_name}",
            names.len(),
            approval.len()
        )
    };
    Ok(Loaded {
        policies,
        without_approval,
        approval,
        names,
        schema,
        description,
        fingerprint,
    })
}

/// Line (1-based) where `policy` starts in `text` (0 if unknown). Cedar
/// keeps each policy's exact source text, so it can be found in the file.
fn policy_line(text: &str, policy: &cedar_policy::Policy) -> usize {
    let src = policy.to_string();
    match text.find(src.as_str()) {
        Some(offset) if !src.is_empty() => line_col(text, offset).0,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3600;

    fn strict_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/strict.cedar")
    }

    fn strict() -> PolicyEngine {
        PolicyEngine::load(PolicySource {
            policy_files: vec![strict_path()],
            schema_file: None,
        })
        .expect("strict example loads")
    }

    fn grant(uid: u32, groups: &[&str], ttl_secs: u64) -> PolicyRequest {
        PolicyRequest {
            action: Action::Grant,
            principal: PrincipalAttrs {
                uid,
                name: format!("user{uid}"),
                groups: groups.iter().map(|g| g.to_string()).collect(),
                gids: vec![uid],
            },
            resource: ResourceAttrs {
                agent: "builder".into(),
                spiffe_id: "spiffe://example.org/agent/builder".into(),
            },
            context: ContextAttrs {
                task_id: "task-1".into(),
                delegator: "user/alice".into(),
                ttl_secs,
                max_ttl_secs: 4 * HOUR,
                svid_ttl_secs: 300,
                jwt_ttl_secs: 300,
                audiences: vec!["https://api.example.org".into()],
                selectors: vec!["unix:uid:1000".into()],
                reason: "test".into(),
                now: 1_700_000_000,
                grantor_uid: uid,
                agent_uid: 998,
                max_ttl_limit_secs: 4 * HOUR,
            },
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn engine_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<PolicyEngine>();
        check::<Arc<PolicyEngine>>();
    }

    #[test]
    fn default_policy_and_schema_load() {
        let engine = PolicyEngine::load(PolicySource::default()).unwrap();
        assert_eq!(engine.describe(), "embedded default");
        // The shipped schema file is the embedded one.
        let engine =
            PolicyEngine::load(PolicySource {
                policy_files: vec![
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.cedar")
                ],
                schema_file: Some(
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/mayfly.cedarschema"),
                ),
            })
            .unwrap();
        assert!(
            engine.describe().contains("default.cedar"),
            "{}",
            engine.describe()
        );
        assert!(
            engine.describe().contains("mayfly.cedarschema"),
            "{}",
            engine.describe()
        );
    }

    #[test]
    fn default_allows_grant_within_limit_and_denies_above() {
        let engine = PolicyEngine::load(PolicySource::default()).unwrap();
        let ok = grant(1000, &[], 4 * HOUR);
        assert_eq!(
            engine.evaluate(&ok),
            Decision::Allow {
                policies: names(&["grant-renew-within-max-ttl"])
            }
        );
        let mut renew = grant(1000, &[], HOUR);
        renew.action = Action::Renew;
        assert!(engine.evaluate(&renew).is_allow());

        let too_long = grant(1000, &[], 4 * HOUR + 1);
        assert_eq!(
            engine.evaluate(&too_long),
            Decision::Deny {
                policies: vec![],
                errors: vec![]
            },
            "nothing permits a grant above max_ttl_limit_secs"
        );
        renew.context.ttl_secs = 5 * HOUR;
        assert!(!engine.evaluate(&renew).is_allow());
    }

    #[test]
    fn default_allows_revoke_and_approve() {
        let engine = PolicyEngine::load(PolicySource::default()).unwrap();
        let mut req = grant(1000, &[], 100 * HOUR);
        req.action = Action::Revoke;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Allow {
                policies: names(&["revoke"])
            }
        );
        req.action = Action::Approve;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Allow {
                policies: names(&["approve"])
            }
        );
    }

    #[test]
    fn strict_admin_grant_allowed_non_admin_denied() {
        let engine = strict();
        assert_eq!(
            engine.evaluate(&grant(1000, &["mayfly-admins"], 600)),
            Decision::Allow {
                policies: names(&["admins-may-grant"])
            }
        );
        assert_eq!(
            engine.evaluate(&grant(1001, &["developers"], 600)),
            Decision::Deny {
                policies: vec![],
                errors: vec![]
            }
        );
    }

    #[test]
    fn strict_ttl_over_an_hour_denied_by_forbid() {
        let engine = strict();
        let d = engine.evaluate(&grant(1000, &["mayfly-admins"], 2 * HOUR));
        let Decision::Deny { policies, errors } = d else {
            panic!("expected deny, got {d:?}")
        };
        assert!(
            policies.contains(&"ttl-at-most-1h".to_string()),
            "{policies:?}"
        );
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn strict_unknown_delegator_denied() {
        let engine = strict();
        let mut req = grant(1000, &["mayfly-admins"], 600);
        req.context.delegator = "robot/x".into();
        assert_eq!(
            engine.evaluate(&req),
            Decision::Deny {
                policies: names(&["known-delegator"]),
                errors: vec![]
            }
        );
        req.context.delegator = "orchestrator/ci".into();
        assert!(engine.evaluate(&req).is_allow());
    }

    #[test]
    fn strict_long_grant_requires_approval() {
        let engine = strict();
        assert_eq!(
            engine.evaluate(&grant(1000, &["mayfly-admins"], 30 * 60)),
            Decision::RequireApproval {
                policies: names(&["long-grant-needs-approval"])
            }
        );
    }

    #[test]
    fn strict_payments_requires_approval() {
        let engine = strict();
        let mut req = grant(1000, &["mayfly-admins"], 600);
        req.resource.agent = "payments".into();
        req.resource.spiffe_id = "spiffe://example.org/agent/payments".into();
        assert_eq!(
            engine.evaluate(&req),
            Decision::RequireApproval {
                policies: names(&["payments-needs-approval"])
            }
        );
        // Both gates at once are listed.
        req.context.ttl_secs = 30 * 60;
        assert_eq!(
            engine.evaluate(&req),
            Decision::RequireApproval {
                policies: names(&["long-grant-needs-approval", "payments-needs-approval"])
            }
        );
    }

    #[test]
    fn strict_gate_without_permit_is_deny() {
        // A non-admin asking for payments: only a gate forbids, but nothing
        // permits the grant once the gate is set aside.
        let engine = strict();
        let mut req = grant(1001, &["developers"], 600);
        req.resource.agent = "payments".into();
        assert_eq!(
            engine.evaluate(&req),
            Decision::Deny {
                policies: vec![],
                errors: vec![]
            }
        );
    }

    #[test]
    fn strict_forbid_plus_gate_is_deny() {
        let engine = strict();
        let mut req = grant(1000, &["mayfly-admins"], 600);
        req.resource.agent = "payments".into();
        req.context.delegator = "robot/x".into();
        assert_eq!(
            engine.evaluate(&req),
            Decision::Deny {
                policies: names(&["known-delegator", "payments-needs-approval"]),
                errors: vec![]
            }
        );
        // 2h: the hard TTL limit plus the long-grant gate → deny.
        let d = engine.evaluate(&grant(1000, &["mayfly-admins"], 2 * HOUR));
        assert_eq!(
            d,
            Decision::Deny {
                policies: names(&["long-grant-needs-approval", "ttl-at-most-1h"]),
                errors: vec![]
            }
        );
    }

    #[test]
    fn strict_approve_only_by_security() {
        let engine = strict();
        let mut req = grant(2000, &["security"], 30 * 60);
        req.action = Action::Approve;
        req.context.grantor_uid = 1000;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Allow {
                policies: names(&["security-may-approve"])
            }
        );
        let mut other = req.clone();
        other.principal.groups = vec!["mayfly-admins".into()];
        assert_eq!(
            engine.evaluate(&other),
            Decision::Deny {
                policies: vec![],
                errors: vec![]
            }
        );
        // Four eyes: a security member cannot approve their own grant.
        req.context.grantor_uid = 2000;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Deny {
                policies: names(&["no-self-approval"]),
                errors: vec![]
            }
        );
    }

    #[test]
    fn strict_renew_and_revoke() {
        let engine = strict();
        let mut req = grant(1001, &[], 600);
        req.context.grantor_uid = 1001;
        req.action = Action::Renew;
        assert!(engine.evaluate(&req).is_allow());
        req.action = Action::Revoke;
        assert!(engine.evaluate(&req).is_allow());
        req.context.grantor_uid = 1000;
        assert!(!engine.evaluate(&req).is_allow());
        req.principal.uid = 0;
        assert!(engine.evaluate(&req).is_allow());
    }

    #[test]
    fn policy_without_id_is_named_by_cedar_id() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.cedar");
        write(
            &file,
            "permit (principal, action == Mayfly::Action::\"revoke\", resource);\n\
             permit (principal, action == Mayfly::Action::\"approve\", resource);\n",
        );
        let engine = PolicyEngine::load(PolicySource {
            policy_files: vec![dir.path().to_path_buf()],
            schema_file: None,
        })
        .unwrap();
        let mut req = grant(1, &[], 1);
        req.action = Action::Approve;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Allow {
                policies: names(&["policy1"])
            }
        );
    }

    #[test]
    fn directory_loads_cedar_files_with_unique_ids() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("a.cedar"),
            "permit (principal, action == Mayfly::Action::\"revoke\", resource);",
        );
        write(
            &dir.path().join("b.cedar"),
            "permit (principal, action == Mayfly::Action::\"approve\", resource);",
        );
        write(&dir.path().join("notes.txt"), "not cedar");
        let engine = PolicyEngine::load(PolicySource {
            policy_files: vec![dir.path().to_path_buf()],
            schema_file: None,
        })
        .unwrap();
        let mut req = grant(1, &[], 1);
        req.action = Action::Approve;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Allow {
                policies: names(&["policy1"])
            }
        );
        assert!(engine.describe().contains("b.cedar"));
    }

    #[test]
    fn syntax_error_names_file_and_cedar_message() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broken.cedar");
        write(
            &file,
            "// comment\n@id(\"x\")\npermit (principal, action, resource) when { context.ttl_secs <= };\n",
        );
        let err = PolicyEngine::load(PolicySource {
            policy_files: vec![file.clone()],
            schema_file: None,
        })
        .unwrap_err();
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(matches!(err, PolicyError::Parse { .. }), "{err:?}");
        assert!(msg.contains("broken.cedar:3:"), "{msg}");
        assert!(msg.contains("unexpected token"), "{msg}");
    }

    #[test]
    fn validation_error_names_file_and_cedar_message() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("typo.cedar");
        write(
            &file,
            "@id(\"typo\")\npermit (principal, action, resource)\nwhen { context.ttl_sec <= 60 };\n",
        );
        let err = PolicyEngine::load(PolicySource {
            policy_files: vec![file.clone()],
            schema_file: None,
        })
        .unwrap_err();
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(matches!(err, PolicyError::Validation { .. }), "{err:?}");
        assert!(msg.contains("typo.cedar:3:"), "{msg}");
        assert!(msg.contains("ttl_sec"), "{msg}");
        assert!(
            msg.contains("does not have the attribute") || msg.contains("attribute"),
            "{msg}"
        );

        // Unknown entity type.
        write(
            &file,
            "permit (principal == Mayfly::Usr::\"0\", action, resource);",
        );
        let msg = PolicyEngine::load(PolicySource {
            policy_files: vec![file],
            schema_file: None,
        })
        .unwrap_err()
        .to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains("typo.cedar:1:") && msg.contains("Mayfly::Usr"),
            "{msg}"
        );
    }

    #[test]
    fn schema_errors_name_the_schema_file() {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("bad.cedarschema");
        write(&schema, "namespace Mayfly { entity User = { uid: Long, ; }");
        let err = PolicyEngine::load(PolicySource {
            policy_files: vec![],
            schema_file: Some(schema.clone()),
        })
        .unwrap_err();
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(matches!(err, PolicyError::Schema { .. }), "{err:?}");
        assert!(msg.contains("bad.cedarschema"), "{msg}");

        // Parses, but lacks attributes mayfly sends.
        write(
            &schema,
            "namespace Mayfly { entity User; entity Identity; \
             action grant, renew, revoke, approve appliesTo { principal: User, resource: Identity }; }",
        );
        let msg = PolicyEngine::load(PolicySource {
            policy_files: vec![],
            schema_file: Some(schema),
        })
        .unwrap_err()
        .to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains("does not match the requests mayfly sends"),
            "{msg}"
        );
    }

    #[test]
    fn bad_approval_annotations_and_duplicates_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.cedar");
        let load = |text: &str| {
            write(&file, text);
            PolicyEngine::load(PolicySource {
                policy_files: vec![file.clone()],
                schema_file: None,
            })
        };
        let err = load("@approval(\"required\")\npermit (principal, action, resource);")
            .unwrap_err()
            .to_string();
        assert!(err.contains("only meaningful on forbid"), "{err}");
        let err = load("@approval(\"require\")\nforbid (principal, action, resource);")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown @approval value"), "{err}");
        let err = load(
            "@id(\"a\")\npermit (principal, action, resource);\n@id(\"a\")\nforbid (principal, action, resource);",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("duplicate policy name `a`") && err.contains("line 3"),
            "{err}"
        );
        let err = load("permit (principal == ?principal, action, resource);")
            .unwrap_err()
            .to_string();
        assert!(err.contains("templates"), "{err}");
        let err = load("// nothing here\n").unwrap_err();
        assert!(matches!(err, PolicyError::NoPolicies(_)), "{err:?}");
        let err = PolicyEngine::load(PolicySource {
            policy_files: vec![dir.path().join("missing.cedar")],
            schema_file: None,
        })
        .unwrap_err();
        assert!(matches!(err, PolicyError::Io { .. }) && err.to_string().contains("missing.cedar"));
    }

    const ALLOW_REVOKE: &str =
        "@id(\"revoke-ok\")\npermit (principal, action == Mayfly::Action::\"revoke\", resource);\n";
    const DENY_REVOKE_NON_ROOT: &str = "@id(\"revoke-root-only\")\n\
        permit (principal, action == Mayfly::Action::\"revoke\", resource) when { principal.uid == 0 };\n";

    #[test]
    fn reload_keeps_old_set_on_error_and_swaps_on_success() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.cedar");
        write(&file, ALLOW_REVOKE);
        let engine = PolicyEngine::load(PolicySource {
            policy_files: vec![file.clone()],
            schema_file: None,
        })
        .unwrap();
        let mut req = grant(1000, &[], 1);
        req.action = Action::Revoke;
        let allowed = Decision::Allow {
            policies: names(&["revoke-ok"]),
        };
        assert_eq!(engine.evaluate(&req), allowed);

        write(&file, "permit (principal, action, resource");
        let err = engine.reload().unwrap_err();
        assert!(err.to_string().contains("p.cedar"), "{err}");
        assert_eq!(engine.evaluate(&req), allowed, "old set still in force");

        write(
            &file,
            "permit (principal, action, resource) when { context.nope };",
        );
        assert!(matches!(
            engine.reload(),
            Err(PolicyError::Validation { .. })
        ));
        assert_eq!(engine.evaluate(&req), allowed, "old set still in force");

        write(&file, DENY_REVOKE_NON_ROOT);
        engine.reload().unwrap();
        assert_eq!(
            engine.evaluate(&req),
            Decision::Deny {
                policies: vec![],
                errors: vec![]
            }
        );
        req.principal.uid = 0;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Allow {
                policies: names(&["revoke-root-only"])
            }
        );
    }

    #[test]
    fn reload_of_embedded_default_is_noop() {
        let engine = PolicyEngine::load(PolicySource::default()).unwrap();
        engine.reload().unwrap();
        assert_eq!(engine.describe(), "embedded default");
    }

    async fn wait_for(engine: &PolicyEngine, req: &PolicyRequest, want: &Decision) -> bool {
        for _ in 0..200 {
            if engine.evaluate(req) == *want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn watch_picks_up_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.cedar");
        write(&file, ALLOW_REVOKE);
        let engine = Arc::new(
            PolicyEngine::load(PolicySource {
                policy_files: vec![dir.path().to_path_buf()],
                schema_file: None,
            })
            .unwrap(),
        );
        let cancel = CancellationToken::new();
        let task =
            tokio::spawn(Arc::clone(&engine).watch(Duration::from_millis(20), cancel.clone()));

        let mut req = grant(1000, &[], 1);
        req.action = Action::Revoke;
        let allowed = Decision::Allow {
            policies: names(&["revoke-ok"]),
        };
        let denied = Decision::Deny {
            policies: vec![],
            errors: vec![],
        };
        assert_eq!(engine.evaluate(&req), allowed);

        tokio::time::sleep(Duration::from_millis(50)).await;
        write(&file, DENY_REVOKE_NON_ROOT);
        assert!(wait_for(&engine, &req, &denied).await, "change picked up");

        // A broken edit keeps the previous set.
        tokio::time::sleep(Duration::from_millis(50)).await;
        write(&file, "permit (");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(engine.evaluate(&req), denied);

        // A new file in the watched directory is picked up too.
        write(
            &dir.path().join("q.cedar"),
            &ALLOW_REVOKE.replace("revoke-ok", "revoke-q"),
        );
        write(&file, DENY_REVOKE_NON_ROOT);
        let both = Decision::Allow {
            policies: names(&["revoke-q"]),
        };
        assert!(wait_for(&engine, &req, &both).await, "new file picked up");

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("watch stops on cancel")
            .unwrap();
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
