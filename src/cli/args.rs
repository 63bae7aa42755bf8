//! The command line's arguments: one enum of subcommands. Names and shapes are a contract
//! with scripts; flags may grow.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "mayfly",
    version,
    about = "Task-scoped SPIFFE workload identity agent"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: serve the SPIFFE Workload API and the admin API.
    Agent(AgentArgs),
    /// Manage task leases through the admin socket.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Fetch X.509-SVIDs from the Workload API, as a workload would.
    #[command(subcommand)]
    Svid(SvidCommand),
    /// Fetch or validate JWT-SVIDs through the Workload API.
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// Run a command under a task lease bound to its process; the lease ends when it exits.
    Run(RunArgs),
    /// From inside a leased process: run a command under a child lease, delegated from your
    /// own and narrower, bound to the command's process; or list and end your children.
    Delegate(DelegateArgs),
    /// Check or print the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Test Cedar policies before deploying them.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Exit 0 when the agent at --health-addr is ready (for probes).
    Healthcheck {
        /// Health endpoint, IP:PORT or unix:/path (default: as `mayfly agent` chooses for
        /// this user: 127.0.0.1:9095 for root, else $XDG_RUNTIME_DIR/mayfly/health.sock).
        #[arg(long)]
        health_addr: Option<String>,
    },
    /// Internal: the child side of `mayfly run` (waits for the lease, then execs).
    #[command(name = "__exec", hide = true)]
    Exec {
        /// The wrapper's sync FIFO.
        #[arg(long)]
        sync: PathBuf,
        /// The command to exec once released.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Fetch a JWT-SVID for an audience and print the token.
    Fetch {
        /// Audience the token is for (repeatable).
        #[arg(long = "audience", required = true)]
        audiences: Vec<String>,
        /// Which of the caller's identities (default: the first).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Workload socket (default: $SPIFFE_ENDPOINT_SOCKET, else the default path).
        #[arg(long, value_parser = crate::config::parse_socket)]
        socket: Option<PathBuf>,
        /// text: the token alone; json: token, SPIFFE ID, audiences, expiry and claims.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Validate a JWT-SVID for an audience; prints its SPIFFE ID and claims.
    Validate {
        /// The audience the token must be for.
        #[arg(long)]
        audience: String,
        /// The token (JWS compact serialization).
        token: String,
        /// Workload socket (default: $SPIFFE_ENDPOINT_SOCKET, else the default path).
        #[arg(long, value_parser = crate::config::parse_socket)]
        socket: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Evaluate one request against a policy set and print the decision and the policies
    /// that decided. Exit status: 0 allow, 2 approval required, 1 deny.
    Check {
        /// The agent's configuration: its [policy] files and its lease limits and defaults
        /// decide, as in the agent (default: the agent's embedded defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Policy file or directory of *.cedar files (repeatable; default: the --config
        /// file's [policy] files, else the embedded policy).
        #[arg(long = "policy")]
        policies: Vec<PathBuf>,
        /// Cedar schema (default: the embedded one).
        #[arg(long)]
        schema: Option<PathBuf>,
        /// The request as JSON (see the README); `-` reads stdin. Flags below override it.
        #[arg(long)]
        request: Option<PathBuf>,
        /// grant, renew, revoke or approve (default: grant).
        #[arg(long)]
        action: Option<String>,
        /// The caller's uid (default: yours, with your user name and groups).
        #[arg(long)]
        uid: Option<u32>,
        /// The caller's user name.
        #[arg(long)]
        user: Option<String>,
        /// A group the caller is in (repeatable; added to the caller's groups).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// The lease's agent name.
        #[arg(long)]
        agent: Option<String>,
        /// The lease's task ID.
        #[arg(long)]
        task_id: Option<String>,
        /// The lease's delegator.
        #[arg(long)]
        delegator: Option<String>,
        /// The lease TTL asked for.
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        /// A JWT audience of the lease (repeatable).
        #[arg(long = "audience")]
        audiences: Vec<String>,
        /// A selector of the lease (repeatable).
        #[arg(long = "selector")]
        selectors: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Set the audit log aside (as audit.replaced-<time>) and start a new chain whose first
    /// record names where the old one ended, who did it and why. For a log the agent refuses
    /// (its newest records or HEAD gone, or no log beside an existing store or CA). The agent
    /// must be stopped.
    NewChain {
        /// The agent's data directory (default: the agent's default for this user).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Why (recorded in the new chain's first record).
        #[arg(long)]
        reason: String,
    },
    /// Check the whole hash chain; names the first bad record and exits non-zero.
    Verify {
        /// The agent's data directory (default: the agent's default for this user).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Print audit records as JSON lines, optionally only those of one task or lease.
    Show {
        /// The agent's data directory (default: the agent's default for this user).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Only the records of this task ID.
        #[arg(long = "task")]
        task_id: Option<String>,
        /// Only the records of this lease ID.
        #[arg(long = "lease")]
        lease_id: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub grant: GrantArgs,
    /// Admin socket (default: $MAYFLY_ADMIN_SOCKET, else the default path).
    #[arg(long, value_parser = crate::config::parse_socket)]
    pub admin_socket: Option<PathBuf>,
    /// Workload socket handed to the command (default: the socket of the agent that granted the lease).
    #[arg(long, value_parser = crate::config::parse_socket)]
    pub socket: Option<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct DelegateArgs {
    #[command(subcommand)]
    pub action: Option<DelegateCommand>,
    /// The SPIFFE ID of your lease to delegate from (needed when you hold several).
    #[arg(long = "from")]
    pub from: Option<String>,
    /// The child's task, one SPIFFE path segment.
    #[arg(long, required = true)]
    pub task_id: Option<String>,
    /// The child's workload class, e.g. executor.
    #[arg(long, required = true)]
    pub agent: Option<String>,
    /// The child lease's lifetime (never past your lease's end).
    #[arg(long, value_parser = duration, required = true)]
    pub ttl: Option<Duration>,
    /// Renewal ceiling from now (default: the TTL).
    #[arg(long, value_parser = duration)]
    pub max_ttl: Option<Duration>,
    /// Lifetime of each X.509-SVID (default: your lease's).
    #[arg(long, value_parser = duration)]
    pub svid_ttl: Option<Duration>,
    /// Lifetime of each JWT-SVID (default: your lease's).
    #[arg(long, value_parser = duration)]
    pub jwt_ttl: Option<Duration>,
    /// JWT audience the child may use (repeatable, at least one; within your lease's).
    #[arg(long = "audience", required = true)]
    pub audiences: Vec<String>,
    /// Selector the child also needs, beyond your lease's and the command's process.
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    /// Why the child needs this identity.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Levels the child may delegate below itself (default: one less than yours).
    #[arg(long)]
    pub max_delegation_depth: Option<u32>,
    /// Revoke the child at once on a scope violation (always so if your lease is).
    #[arg(long)]
    pub end_on_violation: bool,
    /// Workload socket (default: $SPIFFE_ENDPOINT_SOCKET, else the default path).
    #[arg(long, value_parser = crate::config::parse_socket)]
    pub socket: Option<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Subcommand)]
pub enum DelegateCommand {
    /// The leases delegated from yours, live and recently ended.
    List {
        /// Only the children of your lease with this SPIFFE ID.
        #[arg(long = "from")]
        from: Option<String>,
        /// Workload socket (default: $SPIFFE_ENDPOINT_SOCKET, else the default path).
        #[arg(long, value_parser = crate::config::parse_socket)]
        socket: Option<PathBuf>,
        /// text: a table; json: an array of leases.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// End a lease delegated (at any depth) from yours.
    End {
        /// The lease to end.
        lease_id: String,
        /// Why, for the lease and the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        /// The child's task is done: end it as completed, not revoked.
        #[arg(long)]
        completed: bool,
        /// Workload socket (default: $SPIFFE_ENDPOINT_SOCKET, else the default path).
        #[arg(long, value_parser = crate::config::parse_socket)]
        socket: Option<PathBuf>,
        /// text or json.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML configuration file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The SPIFFE trust domain to issue in (default: mayfly.internal).
    #[arg(long)]
    pub trust_domain: Option<String>,
    #[arg(long, value_parser = crate::config::parse_socket, help = default_help("Workload API socket", |d| d.socket().display().to_string()))]
    pub socket: Option<PathBuf>,
    /// Another path serving what the workload socket serves (repeatable), such as Istio's
    /// `/var/run/secrets/workload-spiffe-uds/socket`.
    #[arg(long = "extra-socket", value_parser = crate::config::parse_socket)]
    pub extra_sockets: Vec<PathBuf>,
    #[arg(long, value_parser = crate::config::parse_socket, help = default_help("Admin API socket", |d| d.admin_socket().display().to_string()))]
    pub admin_socket: Option<PathBuf>,
    #[arg(long, help = default_help("Data directory: CA, leases, audit log", |d| d.data_dir.display().to_string()))]
    pub data_dir: Option<PathBuf>,
    #[arg(long, help = default_help("Health and metrics endpoint, IP:PORT or unix:/path", |d| d.health_addr().to_string()))]
    pub health_addr: Option<String>,
}

/// Help naming this user's default, as `mayfly agent` would pick it.
fn default_help(what: &str, pick: fn(&crate::config::Defaults) -> String) -> String {
    format!(
        "{what} (default for you: {})",
        pick(&crate::config::Defaults::for_current_user())
    )
}

#[derive(Debug, Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct AdminConn {
    /// Admin socket (default: $MAYFLY_ADMIN_SOCKET, else the default path).
    #[arg(long, value_parser = crate::config::parse_socket, conflicts_with = "server")]
    pub admin_socket: Option<PathBuf>,
    /// The remote admin API instead, https://HOST:PORT (mutual TLS; see --svid-from-socket
    /// and --cert).
    #[arg(long)]
    pub server: Option<String>,
    /// With --server: present this process's own X.509-SVID from the Workload API, and trust
    /// its trust domain's bundle.
    #[arg(long, requires = "server")]
    pub svid_from_socket: bool,
    /// The Workload API for --svid-from-socket (default: $SPIFFE_ENDPOINT_SOCKET, else the
    /// default path).
    #[arg(long, value_parser = crate::config::parse_socket, requires = "svid_from_socket")]
    pub workload_socket: Option<PathBuf>,
    /// With --server: a client certificate chain (PEM), with --key and --ca.
    #[arg(long, requires_all = ["server", "key", "ca"], conflicts_with = "svid_from_socket")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// The roots the agent's certificate must chain to (PEM).
    #[arg(long, requires = "cert")]
    pub ca: Option<PathBuf>,
    /// With --server: the agent's SPIFFE ID (default: any spiffe://<trust domain>/mayfly/agent/...).
    #[arg(long, requires = "server")]
    pub server_id: Option<String>,
    /// text for people, json for programs (one object; `task list`: an array).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

fn duration(s: &str) -> Result<Duration, String> {
    crate::time::parse_duration(s)
}

#[derive(Debug, Args)]
pub struct GrantArgs {
    /// The task, one SPIFFE path segment ([A-Za-z0-9._-]).
    #[arg(long)]
    pub task_id: String,
    /// Who approved the task, e.g. user/alice.
    #[arg(long)]
    pub delegator: String,
    /// The workload class, e.g. reporter.
    #[arg(long)]
    pub agent: String,
    /// Lease lifetime, e.g. 90s, 5m, 1h.
    #[arg(long, value_parser = duration)]
    pub ttl: Duration,
    /// Renewal ceiling from now (default: the TTL).
    #[arg(long, value_parser = duration)]
    pub max_ttl: Option<Duration>,
    /// Lifetime of each X.509-SVID (default from the agent's config).
    #[arg(long, value_parser = duration)]
    pub svid_ttl: Option<Duration>,
    /// Lifetime of each JWT-SVID (default from the agent's config).
    #[arg(long, value_parser = duration)]
    pub jwt_ttl: Option<Duration>,
    /// Selector the caller must have, e.g. unix:uid:1000 (repeatable; all must match).
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    /// JWT audience the task may use (repeatable).
    #[arg(long = "audience")]
    pub audiences: Vec<String>,
    /// Why the task needs this identity, for the lease and the audit log.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Levels of delegation a process holding the lease may create below it with
    /// `mayfly delegate` (default 0: none).
    #[arg(long, default_value_t = 0)]
    pub max_delegation_depth: u32,
    /// Revoke the lease (and its descendants) at once when a process holding it asks for a
    /// JWT audience, SPIFFE ID or delegation it is refused.
    #[arg(long)]
    pub end_on_violation: bool,
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Grant a task lease.
    Grant {
        #[command(flatten)]
        grant: GrantArgs,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Show one lease.
    Get {
        /// The lease's ID (lease_id).
        lease_id: String,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// List active leases (with --all, ended ones too).
    List {
        /// Ended leases too (kept for the retention period).
        #[arg(long)]
        all: bool,
        /// Show each delegated lease under the lease it was delegated from.
        #[arg(long)]
        tree: bool,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Extend a lease to now + TTL, up to its max TTL.
    Renew {
        /// The lease's ID (lease_id).
        lease_id: String,
        /// New lifetime from now, e.g. 10m.
        #[arg(long, value_parser = duration)]
        ttl: Duration,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// End a lease now; its identity is torn down.
    Revoke {
        /// The lease's ID (lease_id).
        lease_id: String,
        /// Why; kept with the lease as its end_reason, and in the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Approve a lease that a policy holds as pending (not your own grant).
    Approve {
        /// The lease's ID (lease_id).
        lease_id: String,
        /// Why, for the log.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Mark a task done; its identity is torn down.
    Complete {
        /// The lease's ID (lease_id).
        lease_id: String,
        #[command(flatten)]
        conn: AdminConn,
    },
}

#[derive(Debug, Subcommand)]
pub enum SvidCommand {
    /// Fetch the caller's X.509-SVIDs once.
    Fetch {
        /// Workload socket (default: $SPIFFE_ENDPOINT_SOCKET, else the default path).
        #[arg(long, value_parser = crate::config::parse_socket)]
        socket: Option<PathBuf>,
        /// Write svid.pem, key.pem (0600) and bundle.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        /// text for people; json: an array of the SVIDs (SPIFFE ID, serial, validity).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print every update of the caller's X.509-SVIDs until the stream ends.
    Watch {
        /// Workload socket (default: $SPIFFE_ENDPOINT_SOCKET, else the default path).
        #[arg(long, value_parser = crate::config::parse_socket)]
        socket: Option<PathBuf>,
        /// text: a line per SVID per update; json: one object per update, one per line.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand says what it is for.
    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "mayfly", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn agent_help_shows_the_default_paths() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("agent")
            .unwrap()
            .render_help()
            .to_string();
        let d = crate::config::Defaults::for_current_user();
        for path in [d.socket(), d.admin_socket(), d.data_dir.clone()] {
            assert!(help.contains(&*path.to_string_lossy()), "{help}");
        }
    }
}
