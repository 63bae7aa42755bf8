//! `mayfly delegate`: from inside a leased process, run a command under a child lease
//! delegated from the caller's own, on the workload socket's Delegation service, with no admin
//! rights. As `mayfly run` does, the command is started held (`mayfly __exec`), the child
//! lease is bound to its process (`unix:pid:PID`, which the agent binds to the start time),
//! and only then is it let go; signals are forwarded, the child lease is completed when the
//! command exits, and its exit status is passed on.
//!
//! The agent sees this process as the caller. It acts for the lease of its parent process
//! (the planner that runs `mayfly delegate`), as the Delegation service allows for a lease
//! bound to the caller's parent.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::cli::run::{find_program, wrap, LeaseSource, Signals};
use crate::cli::task::{lease_json, print_lease, status_error};
use crate::cli::{DelegateArgs, DelegateCommand, Output};
use crate::config::{client_socket, Defaults};
use crate::proto::admin::Lease;
use crate::proto::delegation as pb;
use crate::time::to_duration;

type Client = pb::delegation_client::DelegationClient<tonic::transport::Channel>;

fn socket(s: Option<&std::path::Path>) -> PathBuf {
    client_socket(s, "SPIFFE_ENDPOINT_SOCKET", Defaults::socket)
}

async fn connect(path: &std::path::Path) -> Result<Client> {
    let channel = crate::cli::connect::unix_channel(path)
        .await
        .with_context(|| format!("connecting to the workload socket {}", path.display()))?;
    Ok(pb::delegation_client::DelegationClient::new(channel))
}

/// A request with the Workload API's security header, which the Delegation service needs too.
fn request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("a valid value"));
    r
}

/// Runs `mayfly delegate`; returns the exit status to exit with.
pub async fn delegate(args: DelegateArgs) -> i32 {
    let result = match args.action {
        Some(DelegateCommand::List {
            from,
            socket: s,
            output,
        }) => list(socket(s.as_deref()), from.unwrap_or_default(), output)
            .await
            .map(|()| 0),
        Some(DelegateCommand::End {
            lease_id,
            reason,
            completed,
            socket: s,
            output,
        }) => end(socket(s.as_deref()), lease_id, reason, completed, output)
            .await
            .map(|()| 0),
        None => spawn(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mayfly delegate: {e:#}");
            if e.is::<crate::cli::run::NotRunnable>() {
                127
            } else {
                crate::cli::run::WRAPPER_FAILED
            }
        }
    }
}

async fn list(path: PathBuf, parent: String, output: Output) -> Result<()> {
    let leases = connect(&path)
        .await?
        .list(request(pb::ListRequest { parent }))
        .await
        .map_err(status_error)?
        .into_inner()
        .leases;
    match output {
        Output::Json => println!("{}", Value::Array(leases.iter().map(lease_json).collect())),
        Output::Text => crate::cli::task::print_lease_table(&leases, true),
    }
    Ok(())
}

async fn end(
    path: PathBuf,
    lease_id: String,
    reason: String,
    completed: bool,
    output: Output,
) -> Result<()> {
    let lease = connect(&path)
        .await?
        .end(request(pb::EndRequest {
            lease_id,
            reason,
            completed,
        }))
        .await
        .map_err(status_error)?
        .into_inner();
    print_lease(&lease, output);
    Ok(())
}

async fn spawn(args: DelegateArgs) -> Result<i32> {
    let signals = Signals::install()?;
    let program = find_program(&args.command[0])?;
    let path = socket(args.socket.as_deref());
    let workload = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
    let client = connect(&path).await?;
    let command = args.command.clone();
    let source = Parent {
        client,
        args,
        workload,
    };
    wrap(source, signals, &program, &command).await
}

/// `mayfly delegate`'s lease: delegated from the caller's own on the Delegation service.
struct Parent {
    client: Client,
    args: DelegateArgs,
    /// The socket the request went to, which the command is pointed at too.
    workload: PathBuf,
}

impl LeaseSource for Parent {
    const NAME: &'static str = "mayfly delegate";

    async fn obtain(&mut self, pid: i32) -> Result<Lease> {
        let a = &self.args;
        let mut selectors = vec![format!("unix:pid:{pid}")];
        selectors.extend(a.selectors.iter().cloned());
        let wanted = pb::DelegateRequest {
            parent: a.from.clone().unwrap_or_default(),
            task_id: a.task_id.clone().unwrap_or_default(),
            agent: a.agent.clone().unwrap_or_default(),
            ttl: a.ttl.map(to_duration),
            max_ttl: a.max_ttl.map(to_duration),
            svid_ttl: a.svid_ttl.map(to_duration),
            jwt_ttl: a.jwt_ttl.map(to_duration),
            selectors,
            audiences: a.audiences.clone(),
            reason: a.reason.clone(),
            max_delegation_depth: a.max_delegation_depth,
            end_on_violation: a.end_on_violation,
        };
        Ok(self
            .client
            .delegate(request(wanted))
            .await
            .map_err(|s| anyhow::anyhow!("delegating: {:?}: {}", s.code(), s.message()))?
            .into_inner())
    }

    async fn until_active(&mut self, lease: Lease) -> Result<Lease> {
        until_active(&mut self.client, lease).await
    }

    async fn withdraw(&mut self, lease_id: &str) {
        finish(&mut self.client, lease_id, false).await
    }

    async fn complete(&mut self, lease_id: &str) {
        finish(&mut self.client, lease_id, true).await
    }

    fn workload(&self, _: &Lease) -> Result<PathBuf> {
        Ok(self.workload.clone())
    }

    fn announce(&self, lease: &Lease, pid: i32) {
        let from = lease.chain.last().map_or("?", |l| l.spiffe_id.as_str());
        eprintln!(
            "mayfly delegate: lease {} for {} (pid {pid}), delegated from {from}",
            lease.lease_id, lease.spiffe_id
        );
    }
}

/// Waits while a policy's approval gate holds the child lease.
async fn until_active(client: &mut Client, mut lease: Lease) -> Result<Lease> {
    if lease.state == "pending" {
        eprintln!(
            "mayfly delegate: lease {} needs approval (mayfly task approve {}); waiting",
            lease.lease_id, lease.lease_id
        );
    }
    let parent = lease
        .chain
        .last()
        .map(|l| l.spiffe_id.clone())
        .unwrap_or_default();
    while lease.state == "pending" {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let children = client
            .list(request(pb::ListRequest {
                parent: parent.clone(),
            }))
            .await
            .map_err(|s| anyhow::anyhow!("waiting for approval: {}", s.message()))?
            .into_inner()
            .leases;
        lease = children
            .into_iter()
            .find(|l| l.lease_id == lease.lease_id)
            .context("waiting for approval: the child lease is gone")?;
    }
    if lease.state != "active" {
        anyhow::bail!(
            "lease {} is {}, the command was not started",
            lease.lease_id,
            lease.state
        );
    }
    Ok(lease)
}

/// Ends the child lease: completed once its command ran, else withdrawn. Best effort: the
/// agent may have ended it already (its parent ended, or its process exited).
async fn finish(client: &mut Client, lease_id: &str, completed: bool) {
    let r = client
        .end(request(pb::EndRequest {
            lease_id: lease_id.to_owned(),
            reason: if completed {
                String::new()
            } else {
                "mayfly delegate interrupted before the command started".into()
            },
            completed,
        }))
        .await;
    match r {
        Ok(_) => {}
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied
            ) => {}
        Err(s) => eprintln!("mayfly delegate: ending lease {lease_id}: {}", s.message()),
    }
}
