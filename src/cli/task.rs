//! `mayfly task ...`: leases over the admin socket, printed as text or JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};
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
        Some(p) if !p.spiffe_id.is_empty() => json!({ "spiffe_id": p.spiffe_id }),
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
        "end_durable": l.ended_at.is_some().then_some(l.end_durable),
        "approval_deadline": ts(&l.approval_deadline),
        "approved_at": ts(&l.approved_at),
        "approved_by": principal_json(&l.approved_by),
        "chain": l.chain.iter().map(|c| json!({
            "lease_id": c.lease_id, "spiffe_id": c.spiffe_id, "task_id": c.task_id,
        })).collect::<Vec<_>>(),
        "may_delegate": l.may_delegate,
        "end_on_violation": l.end_on_violation,
    })
}

/// Text as a terminal may show it: control characters escaped (`\n`, `\u{1b}`), so that a
/// value can neither fake more output lines nor drive the terminal.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
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
    let selectors: Vec<String> = l.selectors.iter().map(|s| printable(s)).collect();
    println!("{:<15} {}", "selectors", selectors.join(" "));
    if !l.audiences.is_empty() {
        println!("{:<15} {}", "audiences", l.audiences.join(" "));
    }
    if !l.reason.is_empty() {
        println!("{:<15} {}", "reason", printable(&l.reason));
    }
    // Who the lease acts for, root first: the delegator, then each lease it came from.
    for (i, link) in l.chain.iter().enumerate() {
        let key = if i == 0 { "delegated_from" } else { "" };
        println!(
            "{key:<15} {} task {} lease {}",
            link.spiffe_id, link.task_id, link.lease_id
        );
    }
    if l.may_delegate > 0 {
        println!("{:<15} {} more levels", "may_delegate", l.may_delegate);
    }
    if l.end_on_violation {
        println!("{:<15} yes", "end_on_violation");
    }
    for (key, p) in [
        ("granted_by", &l.granted_by),
        ("approved_by", &l.approved_by),
    ] {
        match p {
            Some(p) if !p.spiffe_id.is_empty() => println!("{key:<15} {}", p.spiffe_id),
            Some(p) => println!(
                "{key:<15} uid={} gid={} pid={} user={}",
                p.uid, p.gid, p.pid, p.user
            ),
            None => {}
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
        println!("{:<15} {}", "end_reason", printable(&l.end_reason));
    }
    if l.ended_at.is_some() {
        let durable = if l.end_durable {
            "yes"
        } else {
            "NO: the agent keeps retrying; a restart before then could undo this end"
        };
        println!("{:<15} {durable}", "end_durable");
    }
}

/// After an end: says so on stderr when the agent could not make it durable yet.
fn warn_if_not_durable(l: &pb::Lease) {
    if l.ended_at.is_some() && !l.end_durable {
        eprintln!(
            "warning: lease {} has ended, but the agent could not record the end yet (is its \
             data dir full?); it keeps retrying, and a restart before it succeeds could bring \
             the lease back",
            l.lease_id
        );
    }
}

/// `task list` as a table whose columns fit their widest value.
pub(super) fn print_lease_table(leases: &[pb::Lease], all: bool) {
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

/// `task list --tree`: each lease under the one it was delegated from (a lease whose parent is
/// not listed shows at the top, with its chain).
fn print_lease_tree(leases: &[pb::Lease]) {
    for line in lease_tree(leases) {
        println!("{line}");
    }
}

fn lease_tree(leases: &[pb::Lease]) -> Vec<String> {
    let listed: std::collections::HashSet<&str> =
        leases.iter().map(|l| l.lease_id.as_str()).collect();
    fn parent(l: &pb::Lease) -> Option<&str> {
        l.chain.last().map(|c| c.lease_id.as_str())
    }
    let mut out = Vec::new();
    fn walk<'a>(
        l: &'a pb::Lease,
        leases: &'a [pb::Lease],
        prefix: &str,
        last: bool,
        top: bool,
        out: &mut Vec<String>,
    ) {
        let branch = match (top, last) {
            (true, _) => "",
            (false, true) => "└─ ",
            (false, false) => "├─ ",
        };
        out.push(format!(
            "{prefix}{branch}{} {} {}",
            l.lease_id, l.state, l.spiffe_id
        ));
        let children: Vec<&pb::Lease> = leases
            .iter()
            .filter(|c| parent(c) == Some(l.lease_id.as_str()))
            .collect();
        let next = match (top, last) {
            (true, _) => prefix.to_owned(),
            (false, true) => format!("{prefix}   "),
            (false, false) => format!("{prefix}│  "),
        };
        for (i, c) in children.iter().enumerate() {
            walk(c, leases, &next, i + 1 == children.len(), false, out);
        }
    }
    for l in leases
        .iter()
        .filter(|l| parent(l).is_none_or(|p| !listed.contains(p)))
    {
        if let Some(p) = parent(l) {
            out.push(format!("(delegated from {p}, not listed)"));
        }
        walk(l, leases, "", true, true, &mut out);
    }
    out
}

pub(super) fn print_lease(l: &pb::Lease, output: Output) {
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
        max_delegation_depth: g.max_delegation_depth,
        end_on_violation: g.end_on_violation,
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
pub(super) fn status_error(s: tonic::Status) -> anyhow::Error {
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
    let output = conn.output;
    let mut client = match &conn.server {
        Some(server) => pb::tasks_client::TasksClient::new(
            crate::cli::remote::channel(&crate::cli::remote::RemoteTarget {
                server,
                svid_from_socket: conn.svid_from_socket,
                workload_socket: conn.workload_socket.as_deref(),
                cert: conn.cert.as_deref(),
                key: conn.key.as_deref(),
                ca: conn.ca.as_deref(),
                server_id: conn.server_id.as_deref(),
            })
            .await?,
        ),
        None => {
            let path = admin_socket(conn);
            crate::cli::connect::connect(&path)
                .await
                .with_context(|| format!("connecting to the admin socket {}", path.display()))?
        }
    };
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
        TaskCommand::List { all, tree, .. } => {
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
                Output::Text if tree => print_lease_tree(&leases),
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
            warn_if_not_durable(&lease);
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
            warn_if_not_durable(&lease);
            print_lease(&lease, output);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{lease_tree, pb, printable};

    #[test]
    fn the_tree_shows_each_lease_under_its_parent() {
        let lease = |id: &str, chain: &[&str]| pb::Lease {
            lease_id: id.into(),
            state: "active".into(),
            spiffe_id: format!("spiffe://td/{id}"),
            chain: chain
                .iter()
                .map(|c| pb::ChainLink {
                    lease_id: c.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let leases = [
            lease("root", &[]),
            lease("a", &["root"]),
            lease("a1", &["root", "a"]),
            lease("b", &["root"]),
            lease("orphan", &["gone"]),
        ];
        assert_eq!(
            lease_tree(&leases),
            [
                "root active spiffe://td/root",
                "├─ a active spiffe://td/a",
                "│  └─ a1 active spiffe://td/a1",
                "└─ b active spiffe://td/b",
                "(delegated from gone, not listed)",
                "orphan active spiffe://td/orphan",
            ]
        );
    }

    #[test]
    fn control_characters_are_printed_escaped() {
        assert_eq!(
            printable("unix:path:/bin/sh\nunix:uid:0"),
            "unix:path:/bin/sh\\nunix:uid:0"
        );
        assert_eq!(printable("x\u{1b}[2J"), "x\\u{1b}[2J");
        assert_eq!(printable("/opt/My App/ünï"), "/opt/My App/ünï");
    }
}
