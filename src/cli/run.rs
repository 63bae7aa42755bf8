//! `mayfly run`: run a command under a task lease bound to its very process.
//!
//! The child is started as `mayfly __exec`, which blocks on a private FIFO before it execs the
//! command. Meanwhile the wrapper reads the child's PID and start time (both survive exec),
//! grants a lease bound to them (`unix:pid:PID:START`), and only then lets the child go, telling
//! it the workload socket of the agent that holds the lease: the command's first fetch can never
//! be denied, nor go to another agent. A command that cannot be found is refused before any
//! grant. The wrapper forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT from its start (one that
//! arrives before the command starts withdraws the lease), completes the lease when it exits, and exits with the command's status
//! (128 + signal when it was killed). Should the wrapper itself die, the agent still sees the
//! bound process exit (it watches the pidfd) and ends the lease as `process_exited`.

use std::ffi::OsString;
use std::io::Write;
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
            if e.is::<NotRunnable>() {
                127
            } else {
                WRAPPER_FAILED
            }
        }
    }
}

async fn run_inner(args: RunArgs) -> Result<i32> {
    // Signals are forwarded from the very start: one that arrives while the lease is being
    // granted or waits for approval withdraws it, rather than killing the wrapper outright.
    let signals = Signals::install()?;
    let program = find_program(&args.command[0])?;
    let admin_path = client_socket(
        args.admin_socket.as_deref(),
        "MAYFLY_ADMIN_SOCKET",
        Defaults::admin_socket,
    );
    let admin = crate::cli::connect::connect(&admin_path)
        .await
        .with_context(|| format!("connecting to the admin socket {}", admin_path.display()))?;
    let command = args.command.clone();
    wrap(Admin { admin, args }, signals, &program, &command).await
}

/// Where a wrapper's lease comes from: the admin API (`mayfly run`) or the Delegation service
/// (`mayfly delegate`).
pub(super) trait LeaseSource {
    /// The wrapper's name, for its messages.
    const NAME: &'static str;
    /// Asks for a lease bound to the held process `pid`.
    async fn obtain(&mut self, pid: i32) -> Result<pb::Lease>;
    /// Waits while an approval gate holds the lease; the lease once active.
    async fn until_active(&mut self, lease: pb::Lease) -> Result<pb::Lease>;
    /// Ends a lease the command will never use (best effort: the wrapper is exiting).
    async fn withdraw(&mut self, lease_id: &str);
    /// Ends the lease once the command has exited (best effort: the agent may have ended it).
    async fn complete(&mut self, lease_id: &str);
    /// The workload socket the command is pointed at.
    fn workload(&self, lease: &pb::Lease) -> Result<PathBuf>;
    /// What is said once the command runs.
    fn announce(&self, lease: &pb::Lease, pid: i32);
}

/// Runs `command` (its `program` found already) held, under the lease `source` gives it: the
/// flow `mayfly run` and `mayfly delegate` share. Returns the status to exit with.
pub(super) async fn wrap<S: LeaseSource>(
    mut source: S,
    mut signals: Signals,
    program: &Path,
    command: &[OsString],
) -> Result<i32> {
    let name = S::NAME;
    let Held {
        sync: _sync,
        go,
        mut child,
        pid,
    } = Held::spawn(program, command)?;

    let granted = tokio::select! {
        r = source.obtain(pid) => r,
        sig = signals.next() => {
            let _ = child.kill().await;
            eprintln!("{name}: interrupted by signal {sig} before the lease was granted");
            return Ok(128 + sig);
        }
    };
    let pending = match granted {
        Ok(lease) => lease,
        Err(e) => {
            let _ = child.kill().await;
            return Err(e);
        }
    };
    let active = tokio::select! {
        r = source.until_active(pending.clone()) => r,
        sig = signals.next() => {
            let _ = child.kill().await;
            source.withdraw(&pending.lease_id).await;
            eprintln!(
                "{name}: interrupted by signal {sig}; lease {} withdrawn, the command was not started",
                pending.lease_id
            );
            return Ok(128 + sig);
        }
    };
    let (workload, lease) = match active.and_then(|l| Ok((source.workload(&l)?, l))) {
        Ok(got) => got,
        Err(e) => {
            let _ = child.kill().await;
            return Err(e);
        }
    };
    let go = release(go, &workload)?;
    source.announce(&lease, pid);
    let status = wait_forwarding(&mut child, &mut signals, pid).await?;
    drop(go);
    source.complete(&lease.lease_id).await;
    Ok(exit_code(status))
}

/// `mayfly run`'s lease: granted on the admin API.
struct Admin {
    admin: pb::tasks_client::TasksClient<tonic::transport::Channel>,
    args: RunArgs,
}

impl LeaseSource for Admin {
    const NAME: &'static str = "mayfly run";

    async fn obtain(&mut self, pid: i32) -> Result<pb::Lease> {
        grant(&mut self.admin, &self.args, pid).await
    }

    async fn until_active(&mut self, lease: pb::Lease) -> Result<pb::Lease> {
        until_active(&mut self.admin, lease).await
    }

    async fn withdraw(&mut self, lease_id: &str) {
        withdraw(&mut self.admin, lease_id).await
    }

    async fn complete(&mut self, lease_id: &str) {
        match self
            .admin
            .complete(pb::CompleteRequest {
                lease_id: lease_id.to_owned(),
            })
            .await
        {
            Ok(_) => {}
            // The agent may have ended it already (expiry, revocation, its own exit watch).
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
            Err(s) => eprintln!("mayfly run: completing lease {lease_id}: {}", s.message()),
        }
    }

    /// The command is pointed at the agent that holds its lease, whatever the environment
    /// says, unless --socket names another socket explicitly.
    fn workload(&self, lease: &pb::Lease) -> Result<PathBuf> {
        Ok(match &self.args.socket {
            Some(s) => std::path::absolute(s).unwrap_or_else(|_| s.clone()),
            None if !lease.workload_socket.is_empty() => PathBuf::from(&lease.workload_socket),
            None => anyhow::bail!("the agent did not say where its workload socket is"),
        })
    }

    fn announce(&self, lease: &pb::Lease, pid: i32) {
        eprintln!(
            "mayfly run: lease {} for {} (pid {pid})",
            lease.lease_id, lease.spiffe_id
        );
    }
}

/// A command started as `mayfly __exec`, held before its exec until released.
struct Held {
    /// Removed when dropped (once the command is released, or was never).
    sync: SyncDir,
    /// The wrapper's end of the sync FIFO.
    go: std::fs::File,
    child: tokio::process::Child,
    pid: i32,
}

impl Held {
    /// Starts `program` (found already) with the arguments after `command[0]`, held.
    fn spawn(program: &Path, command: &[OsString]) -> Result<Held> {
        let sync = SyncDir::create()?;
        // Read-write, so opening never blocks and the FIFO keeps its message until the child
        // reads it, however late the child opens its end. Close-on-exec: the child does not
        // inherit it.
        let go = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(sync.fifo())
            .context("opening the sync FIFO")?;
        let exe = std::env::current_exe().context("locating the mayfly binary")?;
        let child = tokio::process::Command::new(exe)
            .arg("__exec")
            .arg("--sync")
            .arg(sync.fifo())
            .arg("--")
            .arg(program)
            .args(&command[1..])
            .spawn()
            .with_context(|| format!("starting {:?}", command[0]))?;
        let pid = child.id().context("child exited at once")? as i32;
        Ok(Held {
            sync,
            go,
            child,
            pid,
        })
    }
}

/// Lets a held command exec, pointed at the workload socket `workload`. The FIFO is returned
/// to be kept open until the command exits.
fn release(mut go: std::fs::File, workload: &Path) -> Result<std::fs::File> {
    let mut message = b"1".to_vec();
    message.extend_from_slice(format!("unix://{}", workload.display()).as_bytes());
    message.push(0);
    go.write_all(&message).context("releasing the child")?;
    Ok(go)
}

/// Waits for the command, forwarding the signals the wrapper receives to it.
async fn wait_forwarding(
    child: &mut tokio::process::Child,
    signals: &mut Signals,
    pid: i32,
) -> Result<std::process::ExitStatus> {
    loop {
        tokio::select! {
            status = child.wait() => return status.context("waiting for the child"),
            sig = signals.next() => {
                if let Ok(sig) = Signal::try_from(sig) {
                    let _ = kill(Pid::from_raw(pid), sig);
                }
            }
        }
    }
}

/// The status a wrapper exits with: the command's, or 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        _ => WRAPPER_FAILED,
    }
}

/// The signals `mayfly run` forwards (SIGINT, SIGTERM, SIGHUP, SIGQUIT), caught from the start.
pub(super) struct Signals(Vec<(SignalKind, tokio::signal::unix::Signal)>);

impl Signals {
    pub(super) fn install() -> Result<Signals> {
        let mut all = Vec::new();
        for kind in [
            SignalKind::interrupt(),
            SignalKind::terminate(),
            SignalKind::hangup(),
            SignalKind::quit(),
        ] {
            all.push((kind, signal(kind).context("installing signal handlers")?));
        }
        Ok(Signals(all))
    }

    /// The number of the next signal to arrive.
    pub(super) async fn next(&mut self) -> i32 {
        let waits = self
            .0
            .iter_mut()
            .map(|(k, s)| Box::pin(async move { s.recv().await.map(|_| k.as_raw_value()) }));
        match futures::future::select_all(waits).await.0 {
            Some(sig) => sig,
            None => std::future::pending().await,
        }
    }
}

/// Revokes a lease the command will never use; best effort (the wrapper is exiting).
async fn withdraw(
    admin: &mut pb::tasks_client::TasksClient<tonic::transport::Channel>,
    lease_id: &str,
) {
    let r = admin
        .revoke(pb::RevokeRequest {
            lease_id: lease_id.to_owned(),
            reason: "mayfly run interrupted before the command started".into(),
        })
        .await;
    if let Err(s) = r {
        if s.code() != tonic::Code::FailedPrecondition {
            eprintln!("mayfly run: withdrawing lease {lease_id}: {}", s.message());
        }
    }
}

/// The command's executable, found as execvp would find it, so that a missing command is
/// refused before any lease exists.
pub(super) fn find_program(name: &std::ffi::OsStr) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let path = Path::new(name);
    if path.as_os_str().as_encoded_bytes().contains(&b'/') {
        if runnable(path) {
            return Ok(path.to_owned());
        }
        return Err(NotRunnable(path.display().to_string()).into());
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&search)
        .map(|dir| dir.join(name))
        .find(|p| runnable(p))
        .ok_or_else(|| NotRunnable(path.display().to_string()).into())
}

/// The command does not exist or cannot be executed: exit 127, as a shell does.
#[derive(Debug, thiserror::Error)]
#[error("{0}: command not found or not executable; no lease was granted")]
pub struct NotRunnable(String);

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
    // The agent binds the PID to the process's start time itself, from the kernel's facts:
    // the child is alive (it waits for the release), so it is the process bound.
    let bind = vec![
        format!("unix:pid:{pid}"),
        format!("unix:uid:{}", rustix::process::geteuid().as_raw()),
    ];
    let lease = admin
        .grant(crate::cli::task::grant_request(&args.grant, bind))
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

fn read_release(f: std::fs::File) -> std::io::Result<OsString> {
    use std::io::BufRead;
    use std::os::unix::ffi::OsStringExt;
    let mut message = Vec::new();
    std::io::BufReader::new(f).read_until(0, &mut message)?;
    if message.pop() != Some(0) {
        // End of file first: the wrapper is gone.
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    match message.split_first() {
        Some((b'1', endpoint)) if !endpoint.is_empty() => Ok(OsString::from_vec(endpoint.to_vec())),
        _ => Err(std::io::ErrorKind::InvalidData.into()),
    }
}

/// The child side: wait for the wrapper's go, then become the command (same PID).
/// The wrapper's message is `1`, the workload socket's address, and a NUL.
pub fn exec(sync: &Path, command: &[OsString]) -> i32 {
    let Ok(endpoint) = open_sync(sync).and_then(read_release) else {
        // The wrapper gave up (it reports why) or is gone: never run without a lease.
        return WRAPPER_FAILED;
    };
    let err = std::process::Command::new(&command[0])
        .args(&command[1..])
        .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
        .exec();
    eprintln!("mayfly run: cannot run {:?}: {err}", command[0]);
    if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}
