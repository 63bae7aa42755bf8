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
//! * actions `Mayfly::Action::"grant"`, `"renew"`, `"revoke"`, `"approve"`, `"complete"`,
//!   `"read"`;
//! * for `Mayfly::Action::"delegate"` (a workload delegating from its own lease, on the
//!   Delegation service) the principal is `Mayfly::Workload::"<parent spiffe_id>"` with
//!   `spiffe_id`, `lease_id`, `task_id`, `delegator`, `depth: Long` and `uid: Long` (the
//!   delegating process), the resource is the child's identity, and the context is the
//!   child's lease (the `workload` object in request JSON);
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

mod decision;
mod diagnostic;
mod load;
mod request;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use cedar_policy::{PolicyId, PolicySet, Schema};
use tokio_util::sync::CancellationToken;

pub use decision::Decision;
pub use request::{
    Action, ContextAttrs, PolicyRequest, PrincipalAttrs, ResourceAttrs, WorkloadAttrs,
};

use load::{fingerprint, load_source};

/// The embedded default policy (used when no policy files are configured).
pub const DEFAULT_POLICY: &str = include_str!("../../policies/default.cedar");
/// Loaded beside every policy set: reads are allowed unless a policy forbids them.
pub const READS_POLICY: &str = include_str!("../../policies/reads.cedar");
/// The embedded Cedar schema (used when no schema file is configured).
pub const DEFAULT_SCHEMA: &str = include_str!("../../policies/mayfly.cedarschema");

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

#[cfg(test)]
pub(super) mod test_support {
    use std::path::{Path, PathBuf};

    use super::{
        Action, ContextAttrs, PolicyEngine, PolicyRequest, PolicySource, PrincipalAttrs,
        ResourceAttrs,
    };

    pub(super) const HOUR: u64 = 3600;

    fn strict_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/strict.cedar")
    }

    pub(super) fn strict() -> PolicyEngine {
        PolicyEngine::load(PolicySource {
            policy_files: vec![strict_path()],
            schema_file: None,
        })
        .expect("strict example loads")
    }

    pub(super) fn grant(uid: u32, groups: &[&str], ttl_secs: u64) -> PolicyRequest {
        PolicyRequest {
            action: Action::Grant,
            principal: PrincipalAttrs {
                uid,
                name: format!("user{uid}"),
                groups: groups.iter().map(|g| g.to_string()).collect(),
                gids: vec![uid],
                ..Default::default()
            },
            workload: Default::default(),
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

    pub(super) fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    pub(super) fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{grant, names, write};
    use super::*;

    #[test]
    fn engine_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<PolicyEngine>();
        check::<Arc<PolicyEngine>>();
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
}
