//! The command line: its arguments (`args`), and the commands that talk to an agent over its
//! sockets (`task`, `workload`, `run`, `healthcheck`) or need none (`local`). Commands reach
//! the agent only through `connect` and the `spiffe` crate, never through its internals.

pub mod args;
pub mod connect;
pub mod delegate;
pub mod healthcheck;
pub mod local;
pub mod remote;
pub mod run;
pub mod task;
pub mod workload;

pub use args::{
    AdminConn, AgentArgs, AuditCommand, Cli, Command, DelegateArgs, DelegateCommand, GrantArgs,
    JwtCommand, Output, PolicyCommand, RunArgs, SvidCommand, TaskCommand,
};
