//! `mayfly run`: run a command under a task lease bound to its very process.
//!
//! The child is started as `mayfly __exec`, which blocks on a private FIFO before it execs the
//! command. Meanwhile the wrapper reads the child's PID and start time (both survive exec),
//! grants a lease bound to them (`unix:pid:PID:START`), and only then lets the child go: the
//! command's first fetch can never be denied. The wrapper forwards SIGINT, SIGTERM, SIGHUP and
//! SIGQUIT, completes the lease when the command exits, and exits with the command's status
//! (128 + signal when it was killed). Should the wrapper itself die, the agent still sees the
//! bound process exit (it watches the pidfd) and ends the lease as `process_exited`.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::RunArgs;
use crate::config::{client_socket, Defaults};
use crate::proto::admin as pb;

/// Exit status for a failure of `mayfly run` itself, as `env`, `timeout` and `docker run` do.
pub const WRAPPER_FAILED: i32 = 125;

/// A private directory holding the sync FIFO, removed on drop.
struct SyncDir(PathBuf);

impl SyncDir {
    fn create() -> Result<Self> {
        let name = format!(
            "mayfly-run-{}-{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 8]>())
        );
        let dir = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let me = SyncDir(dir);
        nix::unistd::mkfifo(
            &me.fifo(),
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .context("creating the sync FIFO")?;
        Ok(me)
    }

    fn fifo(&self) -> PathBuf {
        self.0.join("sync")
    }
}

impl Drop for SyncDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the wrapper; returns the exit status to exit with.
pub async fn run(args: RunArgs) -> i32 {
    match run_inner(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mayfly run: {e:#}");
            WRAPPER_FAILED
        }
    }
}

async fn run_inner(args: RunArgs) -> Result<i32> {
    let admin_path = client_socket(
        args.admin_socket.as_deref(),
        "MAYFLY_ADMIN_SOCKET",
        Defaults::admin_socket,
    );
    let workload = client_socket(
        args.socket.as_deref(),
        "SPIFFE_ENDPOINT_SOCKET",
        Defaults::socket,
    );
    let workload = std::path::absolute(&workload).unwrap_or(workload);
    let mut admin = crate::admin::connect(&admin_path)
        .await
        .with_context(|| format!("connecting to the admin socket {}", admin_path.display()))?;

    let sync = SyncDir::create()?;
    // Read-write, so opening never blocks and the FIFO keeps its byte until the child reads
    // it, however late the child opens its end. Close-on-exec: the child does not inherit it.
    let mut go = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(sync.fifo())
        .context("opening the sync FIFO")?;

    let exe = std::env::current_exe().context("locating the mayfly binary")?;
    let mut child = tokio::process::Command::new(exe)
        .arg("__exec")
        .arg("--sync")
        .arg(sync.fifo())
        .arg("--")
        .args(&args.command)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", workload.display()),
        )
        .spawn()
        .with_context(|| format!("starting {:?}", args.command[0]))?;
    let pid = child.id().context("child exited at once")? as i32;

    let granted = match grant(&mut admin, &args, pid).await {
        Ok(lease) => until_active(&mut admin, lease).await,
        Err(e) => Err(e),
    };
    let lease = match granted {
        Ok(lease) => lease,
        Err(e) => {
            let _ = child.kill().await;
            return Err(e);
        }
    };
    go.write_all(b"1").context("releasing the child")?;
    eprintln!(
        "mayfly run: lease {} for {} (pid {pid})",
        lease.lease_id, lease.spiffe_id
    );

    let mut signals = Vec::new();
    for kind in [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
        SignalKind::quit(),
    ] {
        signals.push((kind, signal(kind).context("installing signal handlers")?));
    }
    let status = loop {
        let forwarded = async {
            let waits = signals
                .iter_mut()
                .map(|(k, s)| Box::pin(async move { s.recv().await.map(|_| *k) }));
            futures::future::select_all(waits).await.0
        };
        tokio::select! {
            status = child.wait() => break status.context("waiting for the child")?,
            Some(kind) = forwarded => {
                if let Ok(sig) = Signal::try_from(kind.as_raw_value()) {
                    let _ = kill(Pid::from_raw(pid), sig);
                }
            }
        }
    };
    drop(go);

    match admin
        .complete(pb::CompleteRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
    {
        Ok(_) => {}
        // The agent may have ended it already (expiry, revocation, its own exit watch).
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
        Err(s) => eprintln!(
            "mayfly run: completing lease {}: {}",
            lease.lease_id,
            s.message()
        ),
    }
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        _ => WRAPPER_FAILED,
    })
}

/// A lease held for approval: the command waits (unstarted) until someone approves it.
async fn until_active(
    admin: &mut pb::tasks_client::TasksClient<tonic::transport::Channel>,
    mut lease: pb::Lease,
) -> Result<pb::Lease> {
    if lease.state == "pending" {
        eprintln!(
            "mayfly run: lease {} needs approval (mayfly task approve {}); waiting",
            lease.lease_id, lease.lease_id
        );
    }
    while lease.state == "pending" {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        lease = admin
            .get(pb::GetRequest {
                lease_id: lease.lease_id.clone(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("waiting for approval: {}", s.message()))?
            .into_inner();
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

async fn grant(
    admin: &mut pb::tasks_client::TasksClient<tonic::transport::Channel>,
    args: &RunArgs,
    pid: i32,
) -> Result<pb::Lease> {
    let start = crate::attest::process_start_time(pid).context("reading the child's start time")?;
    let bind = vec![
        format!("unix:pid:{pid}:{start}"),
        format!("unix:uid:{}", rustix::process::geteuid().as_raw()),
    ];
    let lease = admin
        .grant(crate::client::grant_request(&args.grant, bind))
        .await
        .map_err(|s| anyhow::anyhow!("granting the lease: {:?}: {}", s.code(), s.message()))?;
    Ok(lease.into_inner())
}

/// Opens the sync FIFO without waiting for a writer (a wrapper that already died would leave
/// a blocking open hanging forever), then switches to blocking reads: the read returns the
/// wrapper's byte, or end-of-file once no writer is left.
fn open_sync(path: &Path) -> std::io::Result<std::fs::File> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_NONBLOCK.bits())
        .open(path)?;
    fcntl(&f, FcntlArg::F_SETFL(OFlag::empty())).map_err(std::io::Error::from)?;
    Ok(f)
}

/// The child side: wait for the wrapper's go, then become the command (same PID).
pub fn exec(sync: &Path, command: &[OsString]) -> i32 {
    let mut byte = [0u8; 1];
    let released = open_sync(sync).and_then(|mut f| f.read_exact(&mut byte));
    if released.is_err() || byte[0] != b'1' {
        // The wrapper gave up (it reports why) or is gone: never run without a lease.
        return WRAPPER_FAILED;
    }
    let err = std::process::Command::new(&command[0])
        .args(&command[1..])
        .exec();
    eprintln!("mayfly run: cannot run {:?}: {err}", command[0]);
    if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}
