//! Commands that need no agent: `mayfly audit verify` and `mayfly policy check`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::config::Defaults;

fn audit_dir(data_dir: Option<PathBuf>) -> PathBuf {
    data_dir
        .unwrap_or_else(|| Defaults::for_current_user().data_dir)
        .join("audit")
}

pub async fn audit(cmd: crate::cli::AuditCommand) -> Result<()> {
    use crate::cli::AuditCommand;
    match cmd {
        AuditCommand::NewChain { data_dir, reason } => {
            let data = data_dir.unwrap_or_else(|| Defaults::for_current_user().data_dir);
            if reason.trim().is_empty() {
                bail!("--reason: say why the old chain is set aside");
            }
            // A running agent holds the lease store open (and writes the log): refuse then.
            let store = data.join("leases.redb");
            if store.exists() {
                crate::store::RedbStore::open(&store).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot open {} ({e}); stop the agent first",
                        store.display()
                    )
                })?;
            }
            let me = rustix::process::geteuid().as_raw();
            let done = crate::audit::start_new_chain(&data.join("audit"), &reason, me).await?;
            match (&done.archived, &done.previous) {
                (Some(to), Some(h)) => println!(
                    "the old log is at {}; it ended at seq {} hash {}",
                    to.display(),
                    h.seq,
                    h.hash
                ),
                (Some(to), None) => {
                    println!("the old log is at {}; it had no records", to.display())
                }
                (None, _) => println!("there was no audit log"),
            }
            println!(
                "new chain started: seq {} hash {} (audit_chain_started)",
                done.first.seq, done.first.hash
            );
        }
        AuditCommand::Verify { data_dir } => {
            let dir = audit_dir(data_dir);
            match std::fs::metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => bail!("{} is not a directory", dir.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    bail!("no audit log at {}", dir.display())
                }
                Err(e) => bail!("cannot read the audit log at {}: {e}", dir.display()),
            }
            let summary = crate::audit::verify(&dir)
                .map_err(|e| anyhow::anyhow!("audit log is NOT intact: {e}"))?;
            println!(
                "audit log intact: {} records in {} segments, last seq {} hash {}",
                summary.records, summary.segments, summary.last_seq, summary.last_hash
            );
        }
        AuditCommand::Show {
            data_dir,
            task_id,
            lease_id,
        } => {
            let dir = audit_dir(data_dir);
            let records = crate::audit::read_all(&dir).map_err(|e| anyhow::anyhow!("{e}"))?;
            let wanted = |r: &serde_json::Map<String, Value>, key: &str, want: &Option<String>| {
                want.as_ref()
                    .is_none_or(|w| r.get(key).and_then(Value::as_str) == Some(w.as_str()))
            };
            for r in records
                .iter()
                .filter(|r| wanted(r, "task_id", &task_id) && wanted(r, "lease_id", &lease_id))
            {
                println!("{}", Value::Object(r.clone()));
            }
        }
    }
    Ok(())
}

/// `mayfly policy check`: returns the exit status (0 allow, 2 approval required, 1 deny).
pub fn policy_check(cmd: crate::cli::PolicyCommand) -> Result<i32> {
    use crate::policy::{Action, Decision, PolicyEngine, PolicyRequest, PolicySource};
    let crate::cli::PolicyCommand::Check {
        config,
        policies,
        schema,
        request,
        action,
        uid,
        user,
        groups,
        agent,
        task_id,
        delegator,
        ttl,
        audiences,
        selectors,
    } = cmd;
    let agent_config = crate::config::Config::load(config.as_deref(), Default::default())?;
    let from_file = request.is_some();
    let mut req: PolicyRequest = match request {
        None => PolicyRequest::default(),
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?
            };
            serde_json::from_str(&text).context("parsing the request JSON")?
        }
    };
    if let Some(a) = action {
        req.action = serde_json::from_value::<Action>(Value::String(a.clone())).map_err(|_| {
            anyhow::anyhow!(
                "--action {a:?}: one of grant, renew, revoke, approve, complete, read, delegate"
            )
        })?;
    }
    if !from_file && uid.is_none() {
        // The caller is whoever runs the dry run, as the agent would see them.
        req.principal = crate::policy::PrincipalAttrs::of_this_process();
        req.context.grantor_uid = req.principal.uid;
        req.context.agent_uid = req.principal.uid;
        // A delegation's principal is the delegating workload, run by this user.
        req.workload.uid = req.principal.uid;
    }
    if let Some(u) = uid {
        req.principal.uid = u;
        req.principal.name.clear();
        req.principal.groups.clear();
        req.principal.gids.clear();
        if !from_file {
            req.context.grantor_uid = u;
        }
    }
    if let Some(u) = user {
        req.principal.name = u;
    }
    req.principal.groups.extend(groups);
    if let Some(a) = agent {
        req.resource.agent = a;
    }
    if let Some(t) = task_id {
        req.context.task_id = t;
    }
    if let Some(d) = delegator {
        req.context.delegator = d;
    }
    if let Some(t) = ttl {
        req.context.ttl_secs = t.as_secs();
    }
    req.context.audiences.extend(audiences);
    req.context.selectors.extend(selectors);
    // What the agent fills in from its configuration, unless the request says otherwise.
    let limits = &agent_config.limits;
    let c = &mut req.context;
    if c.max_ttl_limit_secs == 0 {
        c.max_ttl_limit_secs = limits.max_ttl.as_secs();
    }
    if c.max_ttl_secs == 0 {
        c.max_ttl_secs = c.ttl_secs;
    }
    if c.svid_ttl_secs == 0 {
        c.svid_ttl_secs = limits.default_svid_ttl.as_secs();
    }
    if c.jwt_ttl_secs == 0 {
        c.jwt_ttl_secs = limits.default_jwt_ttl.as_secs();
    }
    if req.context.now == 0 {
        req.context.now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
    }
    let source = if policies.is_empty() && schema.is_none() {
        agent_config.policy.clone()
    } else {
        PolicySource {
            policy_files: policies,
            schema_file: schema,
        }
    };
    let engine = PolicyEngine::load(source)?;
    let decision = engine.evaluate(&req);
    let (name, code, errors) = match &decision {
        Decision::Allow { .. } => ("allow", 0, Vec::new()),
        Decision::RequireApproval { .. } => ("approval_required", 2, Vec::new()),
        Decision::Deny { errors, .. } => ("deny", 1, errors.clone()),
    };
    println!(
        "{}",
        json!({ "decision": name, "policies": decision.policies(), "errors": errors, "request": req })
    );
    Ok(code)
}
