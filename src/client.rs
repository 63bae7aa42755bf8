//! The client side of the CLI: `mayfly task ...` over the admin socket and `mayfly svid ...`
//! over the Workload API with the `spiffe` crate, the client real workloads use.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::cli::{AdminConn, GrantArgs, Output, TaskCommand};
use crate::config::{client_socket, Defaults};
use crate::proto::admin as pb;
use crate::time::{from_timestamp, rfc3339, to_duration};

fn ts(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref()
        .and_then(from_timestamp)
        .map(|t| Value::String(rfc3339(t)))
        .unwrap_or(Value::Null)
}

fn principal_json(p: &Option<pb::Principal>) -> Value {
    match p {
        None => Value::Null,
        Some(p) => json!({ "uid": p.uid, "gid": p.gid, "pid": p.pid, "user": p.user }),
    }
}

pub fn lease_json(l: &pb::Lease) -> Value {
    json!({
        "lease_id": l.lease_id,
        "task_id": l.task_id,
        "delegator": l.delegator,
        "agent": l.agent,
        "spiffe_id": l.spiffe_id,
        "selectors": l.selectors,
        "state": l.state,
        "created_at": ts(&l.created_at),
        "expires_at": ts(&l.expires_at),
        "max_expires_at": ts(&l.max_expires_at),
        "svid_ttl": l.svid_ttl.as_ref().and_then(crate::time::from_duration)
            .map(|d| humantime::format_duration(d).to_string()),
        "jwt_ttl": l.jwt_ttl.as_ref().and_then(crate::time::from_duration)
            .map(|d| humantime::format_duration(d).to_string()),
        "audiences": l.audiences,
        "reason": l.reason,
        "granted_by": principal_json(&l.granted_by),
        "ended_at": ts(&l.ended_at),
        "ended_by": principal_json(&l.ended_by),
        "end_reason": l.end_reason,
        "approval_deadline": ts(&l.approval_deadline),
        "approved_at": ts(&l.approved_at),
        "approved_by": principal_json(&l.approved_by),
    })
}

fn print_lease_text(l: &pb::Lease) {
    let v = lease_json(l);
    for key in [
        "lease_id",
        "task_id",
        "delegator",
        "agent",
        "spiffe_id",
        "state",
        "created_at",
        "expires_at",
        "max_expires_at",
        "svid_ttl",
    ] {
        match &v[key] {
            Value::String(s) => println!("{key:<15} {s}"),
            Value::Null => {}
            other => println!("{key:<15} {other}"),
        }
    }
    println!("{:<15} {}", "selectors", l.selectors.join(" "));
    if !l.audiences.is_empty() {
        println!("{:<15} {}", "audiences", l.audiences.join(" "));
    }
    if !l.reason.is_empty() {
        println!("{:<15} {}", "reason", l.reason);
    }
    for (key, p) in [
        ("granted_by", &l.granted_by),
        ("approved_by", &l.approved_by),
    ] {
        if let Some(p) = p {
            println!(
                "{key:<15} uid={} gid={} pid={} user={}",
                p.uid, p.gid, p.pid, p.user
            );
        }
    }
    if let Value::String(d) = &v["approval_deadline"] {
        println!("{:<15} {d}", "approve_by");
    }
    if let Value::String(d) = &v["ended_at"] {
        println!("{:<15} {d}", "ended_at");
    }
    if let Some(p) = &l.ended_by {
        println!(
            "{:<15} uid={} gid={} pid={} user={}",
            "ended_by", p.uid, p.gid, p.pid, p.user
        );
    }
    if !l.end_reason.is_empty() {
        println!("{:<15} {}", "end_reason", l.end_reason);
    }
}

/// `task list` as a table whose columns fit their widest value.
fn print_lease_table(leases: &[pb::Lease], all: bool) {
    let text = |t: &Option<prost_types::Timestamp>| {
        ts(t)
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| "-".into())
    };
    let mut rows = vec![vec![
        "LEASE".to_owned(),
        "STATE".into(),
        "TASK".into(),
        "EXPIRES".into(),
    ]];
    if all {
        rows[0].push("ENDED".into());
    }
    rows[0].push("SPIFFE ID".into());
    for l in leases {
        let mut row = vec![
            l.lease_id.clone(),
            l.state.clone(),
            l.task_id.clone(),
            text(&l.expires_at),
        ];
        if all {
            row.push(text(&l.ended_at));
        }
        row.push(l.spiffe_id.clone());
        rows.push(row);
    }
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == cols {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        println!("{line}");
    }
}

fn print_lease(l: &pb::Lease, output: Output) {
    match output {
        Output::Json => println!("{}", lease_json(l)),
        Output::Text => print_lease_text(l),
    }
}

/// The admin request for grant flags; `bind` selectors (e.g. `mayfly run`'s process) first.
pub fn grant_request(g: &GrantArgs, bind: Vec<String>) -> pb::GrantRequest {
    let mut selectors = bind;
    selectors.extend(g.selectors.iter().cloned());
    pb::GrantRequest {
        task_id: g.task_id.clone(),
        delegator: g.delegator.clone(),
        agent: g.agent.clone(),
        ttl: Some(to_duration(g.ttl)),
        max_ttl: g.max_ttl.map(to_duration),
        svid_ttl: g.svid_ttl.map(to_duration),
        jwt_ttl: g.jwt_ttl.map(to_duration),
        selectors,
        audiences: g.audiences.clone(),
        reason: g.reason.clone(),
    }
}

fn admin_socket(conn: &AdminConn) -> PathBuf {
    client_socket(
        conn.admin_socket.as_deref(),
        "MAYFLY_ADMIN_SOCKET",
        Defaults::admin_socket,
    )
}

/// gRPC status → a one-line error a person can act on.
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

pub async fn task(cmd: TaskCommand) -> Result<()> {
    let conn = match &cmd {
        TaskCommand::Grant { conn, .. }
        | TaskCommand::Get { conn, .. }
        | TaskCommand::List { conn, .. }
        | TaskCommand::Renew { conn, .. }
        | TaskCommand::Revoke { conn, .. }
        | TaskCommand::Approve { conn, .. }
        | TaskCommand::Complete { conn, .. } => conn,
    };
    let path = admin_socket(conn);
    let output = conn.output;
    let mut client = crate::admin::connect(&path)
        .await
        .with_context(|| format!("connecting to the admin socket {}", path.display()))?;
    match cmd {
        TaskCommand::Grant { grant, .. } => {
            let lease = client
                .grant(grant_request(&grant, Vec::new()))
                .await
                .map_err(status_error)?
                .into_inner();
            print_lease(&lease, output);
        }
        TaskCommand::Get { lease_id, .. } => {
            let lease = client
                .get(pb::GetRequest { lease_id })
                .await
                .map_err(status_error)?
                .into_inner();
            print_lease(&lease, output);
        }
        TaskCommand::List { all, .. } => {
            let leases = client
                .list(pb::ListRequest { all })
                .await
                .map_err(status_error)?
                .into_inner()
                .leases;
            match output {
                Output::Json => {
                    println!("{}", Value::Array(leases.iter().map(lease_json).collect()))
                }
                Output::Text => print_lease_table(&leases, all),
            }
        }
        TaskCommand::Renew { lease_id, ttl, .. } => {
            let lease = client
                .renew(pb::RenewRequest {
                    lease_id,
                    ttl: Some(to_duration(ttl)),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_lease(&lease, output);
        }
        TaskCommand::Revoke {
            lease_id, reason, ..
        } => {
            let lease = client
                .revoke(pb::RevokeRequest { lease_id, reason })
                .await
                .map_err(status_error)?
                .into_inner();
            print_lease(&lease, output);
        }
        TaskCommand::Approve {
            lease_id, reason, ..
        } => {
            let lease = client
                .approve(pb::ApproveRequest { lease_id, reason })
                .await
                .map_err(status_error)?
                .into_inner();
            print_lease(&lease, output);
        }
        TaskCommand::Complete { lease_id, .. } => {
            let lease = client
                .complete(pb::CompleteRequest { lease_id })
                .await
                .map_err(status_error)?
                .into_inner();
            print_lease(&lease, output);
        }
    }
    Ok(())
}

fn workload_socket(explicit: Option<&Path>) -> PathBuf {
    client_socket(explicit, "SPIFFE_ENDPOINT_SOCKET", Defaults::socket)
}

async fn workload_client(socket: Option<&Path>) -> Result<spiffe::WorkloadApiClient> {
    let path = workload_socket(socket);
    spiffe::WorkloadApiClient::connect_to(format!("unix://{}", path.display()))
        .await
        .with_context(|| format!("connecting to the Workload API at {}", path.display()))
}

/// A Workload API error as one line: a gRPC status is its message (the agent's messages say
/// what went wrong), not the client library's rendering of the whole status.
fn workload_error(e: spiffe::WorkloadApiError) -> anyhow::Error {
    use spiffe::transport::TransportError;
    match &e {
        spiffe::WorkloadApiError::Transport(TransportError::Status(s)) => {
            anyhow::anyhow!("{}", s.message())
        }
        _ => e.into(),
    }
}

/// Facts about one certificate for printing.
fn describe(svid: &spiffe::X509Svid) -> Value {
    let leaf = svid.leaf().as_bytes();
    let (serial, not_before, not_after) = match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, cert)) => (
            crate::ca::serial_hex(cert.raw_serial()),
            asn1_rfc3339(cert.validity().not_before),
            asn1_rfc3339(cert.validity().not_after),
        ),
        Err(_) => Default::default(),
    };
    json!({
        "spiffe_id": svid.spiffe_id().to_string(),
        "serial": serial,
        "not_before": not_before,
        "not_after": not_after,
    })
}

fn asn1_rfc3339(t: x509_parser::time::ASN1Time) -> String {
    let secs = t.timestamp().max(0) as u64;
    rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

fn pem_blocks(tag: &str, ders: impl IntoIterator<Item = Vec<u8>>) -> String {
    ders.into_iter()
        .map(|d| pem::encode(&pem::Pem::new(tag, d)))
        .collect()
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    // Write beside the target and rename, so a reader never sees half a key.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_svid(dir: &Path, ctx: &spiffe::X509Context) -> Result<()> {
    let svid = ctx
        .default_svid()
        .context("the Workload API returned no SVID")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let chain = pem_blocks(
        "CERTIFICATE",
        svid.cert_chain().iter().map(|c| c.as_bytes().to_vec()),
    );
    write_file(&dir.join("svid.pem"), chain.as_bytes(), 0o644)?;
    let key = zeroize::Zeroizing::new(pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        svid.private_key().as_bytes().to_vec(),
    )));
    write_file(&dir.join("key.pem"), key.as_bytes(), 0o600)?;
    let bundle = ctx
        .bundle_set()
        .get(svid.spiffe_id().trust_domain())
        .context("the Workload API returned no bundle for the SVID's trust domain")?;
    let bundle = pem_blocks(
        "CERTIFICATE",
        bundle.authorities().iter().map(|c| c.as_bytes().to_vec()),
    );
    write_file(&dir.join("bundle.pem"), bundle.as_bytes(), 0o644)?;
    Ok(())
}

pub async fn svid_fetch(
    socket: Option<PathBuf>,
    write: Option<PathBuf>,
    output: Output,
) -> Result<()> {
    let client = workload_client(socket.as_deref()).await?;
    let ctx = client.fetch_x509_context().await.map_err(workload_error)?;
    if let Some(dir) = &write {
        write_svid(dir, &ctx)?;
    }
    let svids: Vec<Value> = ctx.svids().iter().map(|s| describe(s)).collect();
    match output {
        Output::Json => println!("{}", Value::Array(svids)),
        Output::Text => {
            for s in &svids {
                println!("spiffe_id  {}", s["spiffe_id"].as_str().unwrap_or(""));
                println!("serial     {}", s["serial"].as_str().unwrap_or(""));
                println!("not_after  {}", s["not_after"].as_str().unwrap_or(""));
            }
            if let Some(dir) = &write {
                println!(
                    "wrote      {}/{{svid.pem,key.pem,bundle.pem}}",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

/// Prints every update: text lines, or with `--output json` one JSON object per update
/// (`time`, `svids`), one per line.
pub async fn svid_watch(socket: Option<PathBuf>, output: Output) -> Result<()> {
    let client = workload_client(socket.as_deref()).await?;
    let mut stream = client
        .stream_x509_contexts()
        .await
        .map_err(workload_error)?;
    while let Some(update) = stream.next().await {
        let ctx = update.map_err(workload_error)?;
        let now = rfc3339(std::time::SystemTime::now());
        if let Output::Json = output {
            let svids: Vec<Value> = ctx.svids().iter().map(|s| describe(s)).collect();
            println!("{}", json!({ "time": now, "svids": svids }));
            continue;
        }
        for s in ctx.svids() {
            let d = describe(s);
            println!(
                "{now} {} serial={} not_after={}",
                d["spiffe_id"].as_str().unwrap_or(""),
                d["serial"].as_str().unwrap_or(""),
                d["not_after"].as_str().unwrap_or("")
            );
        }
    }
    bail!("the Workload API ended the stream")
}

fn audit_dir(data_dir: Option<PathBuf>) -> PathBuf {
    data_dir
        .unwrap_or_else(|| Defaults::for_current_user().data_dir)
        .join("audit")
}

pub fn audit(cmd: crate::cli::AuditCommand) -> Result<()> {
    use crate::cli::AuditCommand;
    match cmd {
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

/// The claims of a compact JWS, unverified (for printing what the agent issued or validated).
fn jwt_claims(token: &str) -> Value {
    token
        .split('.')
        .nth(1)
        .and_then(|p| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .unwrap_or(Value::Null)
}

pub async fn jwt(cmd: crate::cli::JwtCommand) -> Result<()> {
    use crate::cli::JwtCommand;
    match cmd {
        JwtCommand::Fetch {
            audiences,
            spiffe_id,
            socket,
            output,
        } => {
            let client = workload_client(socket.as_deref()).await?;
            let id = spiffe_id
                .map(|s| spiffe::SpiffeId::new(&s).with_context(|| format!("--spiffe-id {s:?}")))
                .transpose()?;
            let token = client
                .fetch_jwt_token(&audiences, id.as_ref())
                .await
                .map_err(workload_error)?;
            match output {
                Output::Text => println!("{token}"),
                Output::Json => {
                    let claims = jwt_claims(&token);
                    let exp = claims["exp"].as_u64().map(|e| {
                        rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(e))
                    });
                    println!(
                        "{}",
                        json!({
                            "token": token,
                            "spiffe_id": claims["sub"],
                            "audiences": claims["aud"],
                            "expires_at": exp,
                            "claims": claims,
                        })
                    );
                }
            }
        }
        JwtCommand::Validate {
            audience,
            token,
            socket,
        } => {
            let client = workload_client(socket.as_deref()).await?;
            let svid = client
                .validate_jwt_token(&audience, &token)
                .await
                .map_err(workload_error)?;
            // The agent has validated it; show everything the token says.
            let claims = jwt_claims(&token);
            println!(
                "{}",
                json!({ "spiffe_id": svid.spiffe_id().to_string(), "claims": claims })
            );
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
        req.action = serde_json::from_value::<Action>(Value::String(a.clone()))
            .map_err(|_| anyhow::anyhow!("--action {a:?}: one of grant, renew, revoke, approve"))?;
    }
    if !from_file && uid.is_none() {
        // The caller is whoever runs the dry run, as the agent would see them.
        req.principal = crate::policy::PrincipalAttrs::of_this_process();
        req.context.grantor_uid = req.principal.uid;
        req.context.agent_uid = req.principal.uid;
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
