//! `mayfly`: parse the command line, set up logging, run.

use anyhow::Result;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use mayfly::cli::{AgentArgs, Cli, Command, SvidCommand};
use mayfly::config::{Config, LogFormat, Overrides};

fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_env("MAYFLY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal (never in a file or the journal), and never
    // when NO_COLOR is set (no-color.org).
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn agent(args: AgentArgs) -> Result<()> {
    let config = Config::load(
        args.config.as_deref(),
        Overrides {
            trust_domain: args.trust_domain,
            socket: args.socket,
            extra_sockets: args.extra_sockets,
            admin_socket: args.admin_socket,
            data_dir: args.data_dir,
            health_addr: args.health_addr,
        },
    )?;
    init_logs(config.log_format);
    // Handlers first: a SIGTERM that arrives while the agent is starting must still mean a
    // clean stop, not the default instant death.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let agent = mayfly::agent::Agent::start(config.clone()).await?;
    println!("mayfly agent running");
    println!("  trust domain    {}", config.limits.trust_domain);
    println!(
        "  workload socket {}   (export SPIFFE_ENDPOINT_SOCKET=unix://{})",
        agent.socket.display(),
        agent.socket.display()
    );
    println!(
        "  admin socket    {}   (export MAYFLY_ADMIN_SOCKET={})",
        agent.admin_socket.display(),
        agent.admin_socket.display()
    );
    println!("  data dir        {}", agent.data_dir.display());
    println!(
        "  health/metrics  {}  (/healthz/ready, /metrics; mayfly healthcheck)",
        agent.health_addr
    );
    let agent = std::sync::Arc::new(agent);
    let token = agent.shutdown_token();
    let on_signal = agent.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => on_signal.reload_policies(),
            }
        }
        tracing::info!("shutting down");
        token.cancel();
    });
    agent.wait().await;
    Ok(())
}

/// Threads for blocking work: lease store writes, attestations that must hash a new executable
/// or look up a user or group name, policy file reads. Queued work waits for a free thread. Tokio's default (512) let a
/// burst of grants start one thread, and one malloc arena, per concurrent store write, memory
/// that stayed after the burst; a handful serves the same burst faster.
const BLOCKING_THREADS: usize = 8;

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(cli: Cli) {
    let result = match cli.command {
        Command::Agent(args) => agent(args).await,
        Command::Task(cmd) => mayfly::cli::task::task(cmd).await,
        Command::Svid(SvidCommand::Fetch {
            socket,
            write,
            output,
        }) => mayfly::cli::workload::svid_fetch(socket, write, output).await,
        Command::Svid(SvidCommand::Watch { socket, output }) => {
            mayfly::cli::workload::svid_watch(socket, output).await
        }
        Command::Audit(cmd) => mayfly::cli::local::audit(cmd).await,
        Command::Policy(cmd) => match mayfly::cli::local::policy_check(cmd) {
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
        Command::Healthcheck { health_addr } => {
            mayfly::cli::healthcheck::healthcheck(health_addr.as_deref()).await
        }
        Command::Jwt(cmd) => mayfly::cli::workload::jwt(cmd).await,
        Command::Run(args) => std::process::exit(mayfly::cli::run::run(args).await),
        Command::Delegate(args) => std::process::exit(mayfly::cli::delegate::delegate(args).await),
        Command::Exec { sync, command } => {
            std::process::exit(mayfly::cli::run::exec(&sync, &command))
        }
    };
    if let Err(e) = result {
        eprintln!("error: {}", report(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, each cause once: many errors already name their
/// cause in their own message, and repeating it helps nobody.
fn report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}
