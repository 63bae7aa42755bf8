//! End-to-end load generator against a real `mayfly agent` process.
//!
//! ```sh
//! cargo build --release
//! cargo run --release --example loadgen -- <scenario> [options]
//! ```
//!
//! Scenarios: `fetch`, `grant-to-svid`, `teardown`, `sds-teardown`, `delegate-to-svid`,
//! `delegate-cascade`, `memory`, `burst`, `startup`, `scale`, `cluster`, `staleness`, `all`.
//!
//! Options:
//!   --agent-bin PATH      agent binary (default target/release/mayfly)
//!   --duration SECS       per-measurement duration of `fetch` (default 3)
//!   --clients LIST        `fetch` concurrency levels (default 1,16,64,256)
//!   --iterations N        `grant-to-svid` iterations per variant, `delegate-to-svid`
//!                         iterations (default 200)
//!   --children N          `delegate-cascade`: children of the parent, each its own process
//!                         (default 100)
//!   --streams LIST        `teardown` and `sds-teardown` stream counts (default 1,100,1000)
//!   --reps N              `teardown` revocations per stream count (default 10), `startup` starts (default 10),
//!                         `delegate-cascade` parents ended (default 10), `scale` revocations per
//!                         stream count and restarts per lease count (default 5), `burst`
//!                         bursts of 2000 connections (default 3)
//!   --expiry-reps N       `teardown` expiries per stream count (default 3)
//!   --leases N            leases for `memory` and `startup` (default 10000); `scale` takes a
//!                         list, one fresh agent per count (default 1000,10000,100000)
//!   --interval-ms MS      `fetch`: each client starts a fetch every MS (default: back to back)
//!   --wrap "CMD ARGS"     run the agent under a wrapper, e.g. `heaptrack -o /tmp/ht` or
//!                         `perf record -g -o /tmp/perf.data --`; RSS and CPU figures then
//!                         describe the wrapper's process, not the agent
//!   --nodes LIST          `staleness`: how many nodes' lease stores watch one etcd (default 100,1000)
//!   --staleness LIST      `staleness`: `store.max_staleness` values in seconds (default 1,5,20)
//!   --hold-secs N         `memory`: keep the agent, its leases and streams N seconds after the
//!                         last measurement (a profiler can attach, or stop the agent, meanwhile)
//!   --callgrind DIR       `fetch`: run the agent and the null baseline under valgrind's callgrind
//!                         and count the instructions each executes per fetch over the measured
//!                         window (repeatable where CPU time is not); profiles are left in DIR
//!                         for `callgrind_annotate`. Throughput under valgrind means nothing.
//!
//! `fetch` also measures a null baseline at each client count: `loadgen null-server SOCKET
//! FILE`, a tonic server answering the agent's own response from memory (see `mod null`).
//!
//! Every scenario starts its own agent on a temp dir (sockets, data, audit log) with
//! `--health-addr 127.0.0.1:0`, and stops it with SIGTERM. The loadgen's leases are bound to
//! its own process (`unix:pid:<pid>`), so only it can fetch them. Each measurement prints one
//! line: scenario, parameters, count, throughput, p50, p99, max.
//!
//! The load generator runs on the same machine as the agent, so both share the CPUs: the
//! numbers include the client's own cost (gRPC, X.509 parsing in the `spiffe` crate).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::{StreamExt, TryStreamExt};
use mayfly::proto::admin as pb;
use mayfly::proto::admin::tasks_client::TasksClient;
use spiffe::{WorkloadApiClient, WorkloadApiError};
use tonic::transport::Channel;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A uid no process on the machine uses: leases bound to it are stored and indexed, never issued.
const UNUSED_UID: u32 = 54_321;
const HOUR: Duration = Duration::from_secs(3600);

#[derive(Clone)]
struct Opts {
    agent_bin: PathBuf,
    duration: Duration,
    clients: Vec<usize>,
    iterations: usize,
    streams: Vec<usize>,
    reps: Option<usize>,
    expiry_reps: usize,
    leases: usize,
    /// `scale`: the lease counts, when `--leases` was given.
    lease_counts: Option<Vec<usize>>,
    children: usize,
    /// Fetch scenario: each client waits this long between fetch starts (None: back to back).
    interval: Option<Duration>,
    /// A command (and its arguments) the agent runs under, for profiling.
    wrap: Vec<String>,
    /// Memory scenario: how long to keep everything open after the last measurement.
    hold: Duration,
    /// Staleness scenario: node counts, and `max_staleness` values.
    nodes: Vec<usize>,
    staleness: Vec<Duration>,
    /// Fetch scenario: count the servers' instructions with callgrind, profiles in this dir.
    callgrind: Option<PathBuf>,
}

fn parse_args() -> Res<(String, Opts)> {
    let mut args = std::env::args().skip(1);
    let scenario = args
        .next()
        .ok_or("usage: loadgen <fetch|grant-to-svid|teardown|memory|startup|all> [options]")?;
    let mut o = Opts {
        agent_bin: PathBuf::from("target/release/mayfly"),
        duration: Duration::from_secs(3),
        clients: vec![1, 16, 64, 256],
        iterations: 200,
        streams: vec![1, 100, 1000],
        reps: None,
        expiry_reps: 3,
        leases: 10_000,
        lease_counts: None,
        children: 100,
        wrap: Vec::new(),
        hold: Duration::ZERO,
        interval: None,
        nodes: vec![100, 1000],
        staleness: [1, 5, 20].map(Duration::from_secs).to_vec(),
        callgrind: None,
    };
    let list = |s: String| -> Res<Vec<usize>> {
        s.split(',')
            .map(|x| x.trim().parse::<usize>().map_err(|e| e.into()))
            .collect()
    };
    while let Some(flag) = args.next() {
        let mut val = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--agent-bin" => o.agent_bin = PathBuf::from(val()?),
            "--duration" => o.duration = Duration::from_secs_f64(val()?.parse()?),
            "--clients" => o.clients = list(val()?)?,
            "--iterations" => o.iterations = val()?.parse()?,
            "--streams" => o.streams = list(val()?)?,
            "--reps" => o.reps = Some(val()?.parse()?),
            "--expiry-reps" => o.expiry_reps = val()?.parse()?,
            "--leases" => {
                let counts = list(val()?)?;
                o.leases = counts.last().copied().ok_or("--leases needs a count")?;
                o.lease_counts = Some(counts);
            }
            "--children" => o.children = val()?.parse()?,
            "--interval-ms" => {
                o.interval = Some(Duration::from_secs_f64(val()?.parse::<f64>()? / 1e3))
            }
            "--wrap" => o.wrap = val()?.split_whitespace().map(String::from).collect(),
            "--hold-secs" => o.hold = Duration::from_secs(val()?.parse()?),
            "--callgrind" => o.callgrind = Some(PathBuf::from(val()?)),
            "--nodes" => o.nodes = list(val()?)?,
            "--staleness" => {
                o.staleness = val()?
                    .split(',')
                    .map(|x| x.trim().parse::<f64>().map(Duration::from_secs_f64))
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    Ok((scenario, o))
}

fn main() -> Res<()> {
    // The null baseline runs as its own process, as the agent does (`fetch` starts it).
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some(null::SUBCOMMAND) {
        let (socket, response) = (args.next(), args.next());
        let (Some(socket), Some(response)) = (socket, response) else {
            return Err(format!("usage: loadgen {} SOCKET RESPONSE_FILE", null::SUBCOMMAND).into());
        };
        return null::serve(Path::new(&socket), Path::new(&response));
    }
    let (scenario, opts) = parse_args()?;
    if !opts.agent_bin.exists() {
        return Err(format!(
            "agent binary {} not found: run `cargo build --release` first or pass --agent-bin",
            opts.agent_bin.display()
        )
        .into());
    }
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match scenario.as_str() {
            "fetch" => fetch(&opts).await,
            "grant-to-svid" => grant_to_svid(&opts).await,
            "teardown" => teardown(&opts).await,
            "sds-teardown" => sds_teardown(&opts).await,
            "delegate-to-svid" => delegate_to_svid(&opts).await,
            "delegate-cascade" => delegate_cascade(&opts).await,
            "memory" => memory(&opts).await,
            "burst" => burst(&opts).await,
            "startup" => startup(&opts).await,
            "scale" => scale(&opts).await,
            "cluster" => cluster(&opts).await,
            "staleness" => staleness(&opts).await,
            "all" => {
                fetch(&opts).await?;
                grant_to_svid(&opts).await?;
                teardown(&opts).await?;
                sds_teardown(&opts).await?;
                delegate_to_svid(&opts).await?;
                delegate_cascade(&opts).await?;
                memory(&opts).await?;
                startup(&opts).await?;
                cluster(&opts).await?;
                staleness(&opts).await
            }
            other => Err(format!("unknown scenario {other}").into()),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The agent process

struct AgentProc {
    child: Child,
    socket: PathBuf,
    admin_socket: PathBuf,
}

fn agent_command(o: &Opts, dir: &Path, health: &str) -> Command {
    let mut cmd = match o.wrap.split_first() {
        Some((wrapper, args)) => {
            let mut cmd = Command::new(wrapper);
            cmd.args(args).arg(&o.agent_bin);
            cmd
        }
        None => Command::new(&o.agent_bin),
    };
    cmd.arg("agent")
        .arg("--socket")
        .arg(dir.join("workload.sock"))
        .arg("--admin-socket")
        .arg(dir.join("admin.sock"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--health-addr")
        .arg(health)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // Logs (one line per grant and issuance) go to a file, as they would to a journal.
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
    {
        Ok(f) => cmd.stderr(f),
        Err(_) => cmd.stderr(Stdio::null()),
    };
    cmd
}

/// Reads the agent's stdout until the health line, then keeps draining it in the background.
fn health_from_stdout(child: &mut Child) -> Res<SocketAddr> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            // "health/metrics  127.0.0.1:PORT  (...)"; agents before 2026-12 printed
            // "health/metrics  http://127.0.0.1:PORT/healthz/ready  /metrics".
            if let Some(rest) = line.split("health/metrics").nth(1) {
                let word = rest.split_whitespace().next().unwrap_or_default();
                let addr = word.trim_start_matches("http://");
                let addr = addr.split('/').next().unwrap_or_default().to_owned();
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr);
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| "agent did not print its health address")?;
    Ok(addr.parse()?)
}

impl AgentProc {
    async fn start(o: &Opts, dir: &Path) -> Res<AgentProc> {
        Self::start_configured(o, dir, None).await
    }

    /// An agent with a config file holding `toml` as well as the flags.
    async fn start_configured(o: &Opts, dir: &Path, toml: Option<&str>) -> Res<AgentProc> {
        let mut cmd = agent_command(o, dir, "127.0.0.1:0");
        if let Some(toml) = toml {
            let path = dir.join("mayfly.toml");
            std::fs::write(&path, toml)?;
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd.spawn()?;
        let health = tokio::task::block_in_place(|| health_from_stdout(&mut child))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(health) {
            if Instant::now() > deadline {
                return Err("agent not ready within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(AgentProc {
            child,
            socket: dir.join("workload.sock"),
            admin_socket: dir.join("admin.sock"),
        })
    }

    /// An agent process already started on `dir` (stopped by `stop`, or killed on drop).
    fn from(child: Child, dir: &Path) -> AgentProc {
        AgentProc {
            child,
            socket: dir.join("workload.sock"),
            admin_socket: dir.join("admin.sock"),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    async fn admin(&self) -> Res<TasksClient<Channel>> {
        Ok(mayfly::cli::connect::connect(&self.admin_socket).await?)
    }

    /// (VmRSS, VmHWM) in KiB.
    /// VmRSS, VmHWM, RssAnon (heap, stacks), RssFile (the mapped binary and libraries).
    fn rss_kib(&self) -> [u64; 4] {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        [
            field("VmRSS:"),
            field("VmHWM:"),
            field("RssAnon:"),
            field("RssFile:"),
        ]
    }

    fn stop(mut self) -> Res<()> {
        sigterm(&self.child);
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn sigterm(child: &Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
}

/// `GET /healthz/ready` answered 200.
fn ready(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

/// utime + stime of `/proc/<pid>/stat` in seconds (clock ticks of 10 ms).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name `(...)`: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn free_port() -> Res<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}

fn temp_dir() -> Res<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("mayfly-loadgen-")
        .tempdir()?)
}

// ---------------------------------------------------------------------------------------------
// Leases and clients

fn my_selectors() -> Vec<String> {
    vec![format!("unix:pid:{}", std::process::id())]
}

async fn grant(
    admin: &mut TasksClient<Channel>,
    task_id: &str,
    selectors: Vec<String>,
    ttl: Duration,
) -> Res<pb::Lease> {
    Ok(admin
        .grant(pb::GrantRequest {
            task_id: task_id.into(),
            delegator: "user/bench".into(),
            agent: "bench".into(),
            ttl: Some(mayfly::time::to_duration(ttl)),
            selectors,
            reason: "loadgen".into(),
            ..Default::default()
        })
        .await?
        .into_inner())
}

async fn revoke(admin: &mut TasksClient<Channel>, lease_id: &str) -> Res<()> {
    admin
        .revoke(pb::RevokeRequest {
            lease_id: lease_id.into(),
            reason: "loadgen".into(),
        })
        .await?;
    Ok(())
}

/// Grants `n` leases bound to an unused uid, `concurrency` at a time over a few connections.
async fn grant_many(agent: &AgentProc, n: usize, prefix: &str, ttl: Duration) -> Res<Duration> {
    let mut admins = Vec::new();
    for _ in 0..4 {
        admins.push(agent.admin().await?);
    }
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let mut admin = admins[i % admins.len()].clone();
            async move {
                grant(
                    &mut admin,
                    &format!("{prefix}-{i}"),
                    vec![format!("unix:uid:{UNUSED_UID}")],
                    ttl,
                )
                .await
            }
        })
        .buffer_unordered(64)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(started.elapsed())
}

/// `n` Workload API clients, each on its own connection.
async fn connect_clients(agent: &AgentProc, n: usize) -> Res<Vec<Arc<WorkloadApiClient>>> {
    connect_to(&agent.endpoint(), n).await
}

async fn connect_to(endpoint: &str, n: usize) -> Res<Vec<Arc<WorkloadApiClient>>> {
    let endpoint = endpoint.to_owned();
    futures::stream::iter(0..n)
        .map(|_| {
            let endpoint = endpoint.clone();
            async move {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Arc::new(
                    WorkloadApiClient::connect_to(endpoint).await?,
                ))
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await
}

// ---------------------------------------------------------------------------------------------
// Statistics

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3}ms", d.as_secs_f64() * 1e3)
}

/// One summary line. `elapsed` gives the throughput; `None` prints `-`.
fn summary(
    scenario: &str,
    params: &str,
    mut lat: Vec<Duration>,
    elapsed: Option<Duration>,
    extra: &str,
) {
    lat.sort();
    let n = lat.len();
    let thr = match elapsed {
        Some(e) if e > Duration::ZERO => format!("{:.1}/s", n as f64 / e.as_secs_f64()),
        _ => "-".into(),
    };
    println!(
        "{scenario:<14} {params:<28} count={n:<7} throughput={thr:<10} p50={:<10} p99={:<10} max={:<10}{}{extra}",
        ms(pct(&lat, 0.50)),
        ms(pct(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
        if extra.is_empty() { "" } else { " " },
    );
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Cached X.509 fetches by `c` concurrent clients, each on its own connection: the agent, then
/// the null baseline (a tonic server answering the same response from memory, no attestation),
/// alternating at each client count, and mayfly's throughput and CPU as a ratio of the
/// baseline's.
async fn fetch(o: &Opts) -> Res<()> {
    let dir = temp_dir()?;
    let (agent_counter, null_counter) = match &o.callgrind {
        Some(out) => {
            std::fs::create_dir_all(out)?;
            (
                Some(Callgrind::new(out, "mayfly")),
                Some(Callgrind::new(out, "null")),
            )
        }
        None => (None, None),
    };
    let mut agent_opts = o.clone();
    if let Some(c) = &agent_counter {
        agent_opts.wrap = c.wrap();
    }
    let agent = AgentProc::start(&agent_opts, dir.path()).await?;
    let mut admin = agent.admin().await?;
    grant(&mut admin, "fetch", my_selectors(), HOUR).await?;
    let null_wrap = null_counter
        .as_ref()
        .map(Callgrind::wrap)
        .unwrap_or_default();
    let baseline = null::Baseline::start(&agent.endpoint(), dir.path(), &null_wrap).await?;
    for &c in &o.clients {
        let ours =
            measure_fetch(o, &agent.endpoint(), agent.pid(), c, agent_counter.as_ref()).await?;
        ours.print("fetch", c, o);
        let null = measure_fetch(
            o,
            &baseline.endpoint(),
            baseline.pid(),
            c,
            null_counter.as_ref(),
        )
        .await?;
        null.print("fetch-null", c, o);
        let instructions = match (ours.instructions_per_fetch(), null.instructions_per_fetch()) {
            (Some(a), Some(b)) => format!(" instructions_per_fetch={:.2}", a / b.max(1.0)),
            _ => String::new(),
        };
        println!(
            "{:<14} {:<28} throughput={:.2} agent_cpu_per_fetch={:.2}{instructions}",
            "fetch-ratio",
            format!("clients={c}"),
            ours.throughput() / null.throughput().max(f64::MIN_POSITIVE),
            ours.server_cpu_per_fetch() / null.server_cpu_per_fetch().max(f64::MIN_POSITIVE),
        );
    }
    baseline.stop();
    agent.stop()
}

/// Counts a server's instructions with valgrind's callgrind: the server starts with
/// instrumentation off, and [`Callgrind::count`] measures one window of it. User-space
/// instructions only; the kernel's share (socket I/O, `/proc`) is not in the count.
struct Callgrind {
    /// Profiles are written to `{prefix}.{pid}` and `{prefix}.{pid}.{n}` for each dump.
    prefix: PathBuf,
}

impl Callgrind {
    fn new(dir: &Path, name: &str) -> Callgrind {
        Callgrind {
            prefix: dir.join(name),
        }
    }

    /// The wrapper to start the server under.
    fn wrap(&self) -> Vec<String> {
        vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            "--instr-atstart=no".into(),
            format!("--callgrind-out-file={}.%p", self.prefix.display()),
        ]
    }

    fn control(pid: u32, arg: &str) -> Res<()> {
        let out = Command::new("callgrind_control")
            .arg(arg)
            .arg(pid.to_string())
            .output()?;
        if !out.status.success() {
            return Err(format!("callgrind_control {arg} {pid} failed").into());
        }
        Ok(())
    }

    /// Starts counting from zero.
    fn start(&self, pid: u32) -> Res<()> {
        Self::control(pid, "--zero")?;
        Self::control(pid, "--instr=on")
    }

    /// Stops counting and returns the instructions counted since [`Callgrind::start`],
    /// from the profile it dumps.
    fn stop(&self, pid: u32) -> Res<u64> {
        Self::control(pid, "--instr=off")?;
        let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        let stem = format!("{}.{pid}.", name(&self.prefix).unwrap_or_default());
        let dir = self.prefix.parent().ok_or("callgrind dir")?;
        let dumps =
            |dir: &Path| -> Res<std::collections::BTreeSet<(std::time::SystemTime, PathBuf)>> {
                let mut out = std::collections::BTreeSet::new();
                for e in std::fs::read_dir(dir)? {
                    let p = e?.path();
                    if name(&p).is_some_and(|n| n.starts_with(&stem)) {
                        out.insert((std::fs::metadata(&p)?.modified()?, p));
                    }
                }
                Ok(out)
            };
        let before = dumps(dir)?;
        Self::control(pid, "--dump")?;
        let newest = dumps(dir)?
            .difference(&before)
            .last()
            .map(|(_, p)| p.clone())
            .ok_or("callgrind wrote no dump")?;
        let text = std::fs::read_to_string(&newest)?;
        text.lines()
            .find_map(|l| l.strip_prefix("totals:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("no totals in {}", newest.display()).into())
    }
}

/// One `fetch` measurement.
struct FetchRun {
    lat: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
    server_cpu: f64,
    own_cpu: f64,
    /// The server's instructions over the run, when counted.
    instructions: Option<u64>,
}

impl FetchRun {
    fn n(&self) -> f64 {
        self.lat.len().max(1) as f64
    }

    fn throughput(&self) -> f64 {
        self.lat.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn server_cpu_per_fetch(&self) -> f64 {
        self.server_cpu / self.n()
    }

    fn instructions_per_fetch(&self) -> Option<f64> {
        self.instructions.map(|i| i as f64 / self.n())
    }

    fn print(&self, scenario: &str, c: usize, o: &Opts) {
        let label = match o.interval {
            Some(every) => format!("clients={c} every={}ms", every.as_secs_f64() * 1e3),
            None => format!("clients={c}"),
        };
        summary(
            scenario,
            &label,
            self.lat.clone(),
            Some(self.elapsed),
            &format!(
                "errors={} agent_cpu={:.0}us/fetch loadgen_cpu={:.0}us/fetch{}",
                self.errors,
                self.server_cpu_per_fetch() * 1e6,
                self.own_cpu / self.n() * 1e6,
                self.instructions_per_fetch()
                    .map(|i| format!(" agent_instructions={i:.0}/fetch"))
                    .unwrap_or_default(),
            ),
        );
    }
}

/// `c` clients on their own connections to `endpoint` fetch for `o.duration`, after one warm-up
/// fetch each; `pid` is the server whose CPU (and, with `counter`, instructions) is counted.
async fn measure_fetch(
    o: &Opts,
    endpoint: &str,
    pid: u32,
    c: usize,
    counter: Option<&Callgrind>,
) -> Res<FetchRun> {
    let clients = connect_to(endpoint, c).await?;
    // Warm up: the first fetch issues the SVID; every later one is served from the cache.
    for cl in &clients {
        cl.fetch_x509_svid().await?;
    }
    if let Some(counter) = counter {
        counter.start(pid)?;
    }
    let cpu0 = (cpu_secs(&pid.to_string()), cpu_secs("self"));
    let deadline = Instant::now() + o.duration;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let interval = o.interval;
    for (i, cl) in clients.iter().map(Arc::clone).enumerate() {
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            // Paced clients start staggered over one interval, so they do not fire in step.
            let mut pace = interval.map(|every| {
                let first = tokio::time::Instant::now() + every.mul_f64(i as f64 / c as f64);
                let mut t = tokio::time::interval_at(first, every);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            while Instant::now() < deadline {
                if let Some(p) = pace.as_mut() {
                    p.tick().await;
                }
                let t = Instant::now();
                match cl.fetch_x509_svid().await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        });
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (l, e) = r?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    let server_cpu = cpu_secs(&pid.to_string()) - cpu0.0;
    let own_cpu = cpu_secs("self") - cpu0.1;
    let instructions = counter.map(|c| c.stop(pid)).transpose()?;
    Ok(FetchRun {
        lat,
        errors,
        elapsed,
        server_cpu,
        own_cpu,
        instructions,
    })
}

/// Grant returning → first fetch that carries the new lease's SPIFFE ID.
async fn grant_to_svid(o: &Opts) -> Res<()> {
    let dir = temp_dir()?;
    let agent = AgentProc::start(o, dir.path()).await?;
    let mut admin = agent.admin().await?;
    for fresh in [false, true] {
        let mut reused = Some(WorkloadApiClient::connect_to(agent.endpoint()).await?);
        let mut lat = Vec::with_capacity(o.iterations);
        let mut retries = 0u64;
        let started = Instant::now();
        for i in 0..o.iterations {
            let task = format!("g2s-{}-{i}", if fresh { "fresh" } else { "reuse" });
            let lease = grant(&mut admin, &task, my_selectors(), HOUR).await?;
            let t0 = Instant::now();
            if fresh {
                reused = Some(WorkloadApiClient::connect_to(agent.endpoint()).await?);
            }
            let client = reused.as_ref().expect("client");
            loop {
                match client.fetch_x509_context().await {
                    Ok(ctx)
                        if ctx
                            .svids()
                            .iter()
                            .any(|s| s.spiffe_id().to_string() == lease.spiffe_id) =>
                    {
                        break
                    }
                    _ => retries += 1,
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    return Err(format!("lease {} never reached a fetch", lease.lease_id).into());
                }
            }
            lat.push(t0.elapsed());
            // One lease at a time, so every fetch carries exactly one SVID.
            revoke(&mut admin, &lease.lease_id).await?;
        }
        let elapsed = started.elapsed();
        summary(
            "grant-to-svid",
            &format!("client={}", if fresh { "fresh" } else { "reused" }),
            lat,
            None,
            &format!(
                "retries={retries} loop={:.1} grant+fetch+revoke/s",
                o.iterations as f64 / elapsed.as_secs_f64()
            ),
        );
    }
    agent.stop()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum End {
    NoIdentity,
    OtherError,
    Update,
    Closed,
}

/// Opens one `stream_x509_svids` per client, waits for every first message, then spawns a task
/// per stream that waits for its next item and returns when (Instant, SystemTime) it came.
async fn open_streams(
    clients: &[Arc<WorkloadApiClient>],
) -> Res<tokio::task::JoinSet<(Instant, SystemTime, End)>> {
    let streams: Vec<_> = futures::stream::iter(clients.iter().cloned())
        .map(|cl| async move {
            let mut s = cl.stream_x509_svids().await?;
            match s.next().await {
                Some(Ok(_)) => Ok::<_, Box<dyn std::error::Error + Send + Sync>>(s),
                Some(Err(e)) => Err(e.into()),
                None => Err("stream ended before its first message".into()),
            }
        })
        .buffer_unordered(64)
        .try_collect()
        .await?;
    let mut set = tokio::task::JoinSet::new();
    for mut s in streams {
        set.spawn(async move {
            let end = match s.next().await {
                Some(Err(WorkloadApiError::NoIdentityIssued)) => End::NoIdentity,
                Some(Err(_)) => End::OtherError,
                Some(Ok(_)) => End::Update,
                None => End::Closed,
            };
            (Instant::now(), SystemTime::now(), end)
        });
    }
    // Let every task reach its first poll before the lease ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(set)
}

/// Waits for every stream of `set` to be told, counting how each ended into `kinds`: when each
/// was, and how long after `t0`.
async fn told(
    set: tokio::task::JoinSet<(Instant, SystemTime, End)>,
    t0: Instant,
    kinds: &mut std::collections::BTreeMap<End, usize>,
) -> Res<(Vec<(Instant, SystemTime)>, Vec<Duration>)> {
    let (got, k) = collect(set).await?;
    for (kind, c) in k {
        *kinds.entry(kind).or_insert(0) += c;
    }
    let lat = got
        .iter()
        .map(|(i, _)| i.saturating_duration_since(t0))
        .collect();
    Ok((got, lat))
}

async fn collect(
    mut set: tokio::task::JoinSet<(Instant, SystemTime, End)>,
) -> Res<(
    Vec<(Instant, SystemTime)>,
    std::collections::BTreeMap<End, usize>,
)> {
    let mut got = Vec::new();
    let mut kinds = std::collections::BTreeMap::new();
    let deadline = Duration::from_secs(30);
    while let Some(r) = tokio::time::timeout(deadline, set.join_next())
        .await
        .map_err(|_| "streams not notified within 30 s")?
    {
        let (i, s, k) = r?;
        got.push((i, s));
        *kinds.entry(k).or_insert(0) += 1;
    }
    Ok((got, kinds))
}

fn kinds_str(k: &std::collections::BTreeMap<End, usize>) -> String {
    k.iter()
        .map(|(k, v)| format!("{k:?}:{v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Revoke (and expiry) → every open stream on the lease told.
async fn teardown(o: &Opts) -> Res<()> {
    let dir = temp_dir()?;
    let agent = AgentProc::start(o, dir.path()).await?;
    let mut admin = agent.admin().await?;
    let reps = o.reps.unwrap_or(10);
    let mut seq = 0;
    for &n in &o.streams {
        let clients = connect_clients(&agent, n).await?;
        let mut all = Vec::new();
        let mut per_stream = Vec::new();
        let mut from_call = Vec::new();
        let mut kinds = std::collections::BTreeMap::new();
        for _ in 0..reps {
            seq += 1;
            let lease = grant(&mut admin, &format!("td-{seq}"), my_selectors(), HOUR).await?;
            let set = open_streams(&clients).await?;
            let called = Instant::now();
            revoke(&mut admin, &lease.lease_id).await?;
            let t0 = Instant::now();
            let (got, lat) = told(set, t0, &mut kinds).await?;
            all.push(lat.iter().copied().max().unwrap_or_default());
            per_stream.extend(lat);
            let last = got.iter().map(|(i, _)| *i).max().unwrap_or(called);
            from_call.push(last.saturating_duration_since(called));
        }
        summary(
            "teardown",
            &format!("revoke streams={n} all"),
            all,
            None,
            &format!("ends={}", kinds_str(&kinds)),
        );
        summary(
            "teardown",
            &format!("revoke streams={n} each"),
            per_stream,
            None,
            "",
        );
        summary(
            "teardown",
            &format!("revoke-call streams={n} all"),
            from_call,
            None,
            "(from sending Revoke)",
        );

        // Expiry: the lease ends on its own timer at expires_at.
        let mut all = Vec::new();
        let mut kinds = std::collections::BTreeMap::new();
        let mut late_open = 0;
        for _ in 0..o.expiry_reps {
            seq += 1;
            let ttl = Duration::from_secs(2);
            let lease = grant(&mut admin, &format!("td-{seq}"), my_selectors(), ttl).await?;
            let expires_at = lease
                .expires_at
                .as_ref()
                .and_then(mayfly::time::from_timestamp)
                .ok_or("lease without expires_at")?;
            let set = open_streams(&clients).await?;
            if SystemTime::now() >= expires_at {
                late_open += 1;
            }
            let (got, k) = collect(set).await?;
            for (kind, c) in k {
                *kinds.entry(kind).or_insert(0) += c;
            }
            let last = got.iter().map(|(_, s)| *s).max().unwrap_or(expires_at);
            all.push(last.duration_since(expires_at).unwrap_or_default());
        }
        summary(
            "teardown",
            &format!("expiry streams={n} all"),
            all,
            None,
            &format!("ends={} opened_after_expiry={late_open}", kinds_str(&kinds)),
        );
        drop(clients);
    }
    agent.stop()
}

/// Delegation limits wide enough for the delegation scenarios (a benchmark, not a policy).
const DELEGATION_CONFIG: &str =
    "[delegation]\nmax_children = 100000\nrate_per_second = 100000\nrate_burst = 100000\n";

fn delegation_request<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("a valid value"));
    r
}

/// A parent lease for this process that may delegate one level.
async fn grant_parent(admin: &mut TasksClient<Channel>, task_id: &str) -> Res<pb::Lease> {
    Ok(admin
        .grant(pb::GrantRequest {
            task_id: task_id.into(),
            delegator: "user/bench".into(),
            agent: "planner".into(),
            ttl: Some(mayfly::time::to_duration(HOUR)),
            selectors: my_selectors(),
            reason: "loadgen".into(),
            max_delegation_depth: 1,
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// Delegate → the child's first X.509-SVID: this process delegates a child bound to itself
/// (its pid and its gid), then fetches until the child's SVID is in the answer; then ends it.
async fn delegate_to_svid(o: &Opts) -> Res<()> {
    use mayfly::proto::delegation as dpb;
    let dir = temp_dir()?;
    let agent = AgentProc::start_configured(o, dir.path(), Some(DELEGATION_CONFIG)).await?;
    let mut admin = agent.admin().await?;
    grant_parent(&mut admin, "d2s-parent").await?;
    let mut delegation = dpb::delegation_client::DelegationClient::new(
        mayfly::cli::connect::unix_channel(&agent.socket).await?,
    );
    let client = WorkloadApiClient::connect_to(agent.endpoint()).await?;
    // The parent's SVID is issued (and cached) before the first measurement.
    client.fetch_x509_context().await?;
    let selectors = vec![
        format!("unix:pid:{}", std::process::id()),
        format!("unix:gid:{}", rustix::process::getegid().as_raw()),
    ];
    let mut lat = Vec::with_capacity(o.iterations);
    let mut call = Vec::with_capacity(o.iterations);
    let mut retries = 0u64;
    let started = Instant::now();
    for i in 0..o.iterations {
        let t0 = Instant::now();
        let child = delegation
            .delegate(delegation_request(dpb::DelegateRequest {
                task_id: format!("d2s-{i}"),
                agent: "executor".into(),
                ttl: Some(mayfly::time::to_duration(Duration::from_secs(600))),
                selectors: selectors.clone(),
                audiences: vec!["bench".into()],
                ..Default::default()
            }))
            .await?
            .into_inner();
        call.push(t0.elapsed());
        loop {
            let ctx = client.fetch_x509_context().await?;
            if ctx
                .svids()
                .iter()
                .any(|s| s.spiffe_id().to_string() == child.spiffe_id)
            {
                break;
            }
            retries += 1;
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!("child {} never reached a fetch", child.lease_id).into());
            }
        }
        lat.push(t0.elapsed());
        // One child at a time, so every fetch carries the parent's SVID and one child's.
        delegation
            .end(delegation_request(dpb::EndRequest {
                lease_id: child.lease_id,
                reason: String::new(),
                completed: true,
            }))
            .await?;
    }
    let elapsed = started.elapsed();
    summary("delegate-to-svid", "delegate-call", call, None, "");
    summary(
        "delegate-to-svid",
        "client=reused",
        lat,
        None,
        &format!(
            "retries={retries} loop={:.1} delegate+fetch+end/s",
            o.iterations as f64 / elapsed.as_secs_f64()
        ),
    );
    agent.stop()
}

/// Ending a parent with N children → every child's stream told. Each child is its own
/// process: a shell, held until its child lease exists (bound to the shell's pid, a descendant
/// of this process, which holds the parent), that then execs `mayfly svid watch` in the same
/// process. The time is from Revoke (of the parent) to each `svid watch` reporting its
/// stream's end on stderr.
async fn delegate_cascade(o: &Opts) -> Res<()> {
    use mayfly::proto::delegation as dpb;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = temp_dir()?;
    let agent = AgentProc::start_configured(o, dir.path(), Some(DELEGATION_CONFIG)).await?;
    let mut admin = agent.admin().await?;
    let mut delegation = dpb::delegation_client::DelegationClient::new(
        mayfly::cli::connect::unix_channel(&agent.socket).await?,
    );
    let reps = o.reps.unwrap_or(10);
    let n = o.children;
    let socket = agent.socket.display().to_string();
    let mut all = Vec::new();
    let mut each = Vec::new();
    let mut from_call = Vec::new();
    for rep in 0..reps {
        let parent = grant_parent(&mut admin, &format!("cascade-{rep}")).await?;
        let mut ends = tokio::task::JoinSet::new();
        for i in 0..n {
            let mut child = tokio::process::Command::new("sh")
                .args([
                    "-c",
                    r#"read _ && exec "$0" svid watch --output json --socket "$1""#,
                ])
                .arg(&o.agent_bin)
                .arg(&socket)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let pid = child.id().ok_or("child exited")?;
            delegation
                .delegate(delegation_request(dpb::DelegateRequest {
                    task_id: format!("c{rep}-{i}"),
                    agent: "executor".into(),
                    ttl: Some(mayfly::time::to_duration(Duration::from_secs(600))),
                    selectors: vec![format!("unix:pid:{pid}")],
                    audiences: vec!["bench".into()],
                    ..Default::default()
                }))
                .await?;
            let mut stdin = child.stdin.take().ok_or("no stdin")?;
            stdin.write_all(b"go\n").await?;
            let mut out =
                tokio::io::BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
            tokio::time::timeout(Duration::from_secs(30), out.next_line())
                .await
                .map_err(|_| "a child's stream never answered")??
                .ok_or("a child's stream ended before its first SVID")?;
            let stderr = child.stderr.take().ok_or("no stderr")?;
            ends.spawn(async move {
                let (_child, _stdin, _out) = (child, stdin, out);
                let mut err = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = err.next_line().await {
                    if line.contains("no identity issued") {
                        return Some(Instant::now());
                    }
                }
                None
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let called = Instant::now();
        revoke(&mut admin, &parent.lease_id).await?;
        let t0 = Instant::now();
        let mut got = Vec::with_capacity(n);
        while let Some(r) = tokio::time::timeout(Duration::from_secs(30), ends.join_next())
            .await
            .map_err(|_| "child streams not told within 30 s")?
        {
            got.push(r?.ok_or("a child's stream ended without its denial")?);
        }
        let lat: Vec<Duration> = got
            .iter()
            .map(|i| i.saturating_duration_since(called))
            .collect();
        all.push(lat.iter().copied().max().unwrap_or_default());
        each.extend(lat);
        from_call.push(t0.saturating_duration_since(called));
    }
    summary(
        "delegate-cascade",
        &format!("children={n} all"),
        all,
        None,
        "(from sending Revoke)",
    );
    summary(
        "delegate-cascade",
        &format!("children={n} each"),
        each,
        None,
        "(from sending Revoke)",
    );
    summary(
        "delegate-cascade",
        &format!("revoke-call children={n}"),
        from_call,
        None,
        "(Revoke's own latency: it returns once every end is recorded)",
    );
    agent.stop()
}

/// Revoke → every open SDS stream on the lease updated (its withdrawal response received), one
/// connection per stream as one Envoy per workload would have, each stream subscribed to
/// `default` and `ROOTCA` and its first response ACKed, as Envoy does.
async fn sds_teardown(o: &Opts) -> Res<()> {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    let request = |nonce: &str, version: &str| DiscoveryRequest {
        resource_names: vec!["default".into(), "ROOTCA".into()],
        response_nonce: nonce.into(),
        version_info: version.into(),
        type_url: SECRET.into(),
        ..DiscoveryRequest::default()
    };
    let dir = temp_dir()?;
    let agent = AgentProc::start(o, dir.path()).await?;
    let mut admin = agent.admin().await?;
    let reps = o.reps.unwrap_or(10);
    for (seq, &n) in o.streams.iter().enumerate() {
        let channels: Vec<Channel> = futures::stream::iter(0..n)
            .map(|_| mayfly::cli::connect::unix_channel(&agent.socket))
            .buffer_unordered(32)
            .try_collect()
            .await?;
        let (mut from_return, mut from_call, mut per_stream) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..reps {
            let lease = grant(
                &mut admin,
                &format!("sds-{seq}-{rep}"),
                my_selectors(),
                HOUR,
            )
            .await?;
            let streams: Vec<_> = futures::stream::iter(channels.iter().cloned())
                .map(|ch| async move {
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    tx.send(request("", "")).await?;
                    let mut s = SecretDiscoveryServiceClient::new(ch)
                        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?
                        .into_inner();
                    let first = s.next().await.ok_or("no first SDS response")??;
                    tx.send(request(&first.nonce, &first.version_info)).await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>((tx, s))
                })
                .buffer_unordered(64)
                .try_collect()
                .await?;
            let mut set = tokio::task::JoinSet::new();
            for (tx, mut s) in streams {
                set.spawn(async move {
                    let withdrawn = matches!(s.next().await, Some(Ok(r)) if r.resources.is_empty());
                    drop(tx);
                    (Instant::now(), withdrawn)
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let called = Instant::now();
            revoke(&mut admin, &lease.lease_id).await?;
            let returned = Instant::now();
            let mut last = returned;
            let mut withdrawn = 0;
            while let Some(r) = tokio::time::timeout(Duration::from_secs(30), set.join_next())
                .await
                .map_err(|_| "SDS streams not updated within 30 s")?
            {
                let (at, ok) = r?;
                withdrawn += usize::from(ok);
                per_stream.push(at.saturating_duration_since(returned));
                last = last.max(at);
            }
            if withdrawn != n {
                return Err(format!("{withdrawn} of {n} SDS streams got the withdrawal").into());
            }
            from_return.push(last.saturating_duration_since(returned));
            from_call.push(last.saturating_duration_since(called));
        }
        summary(
            "sds-teardown",
            &format!("revoke streams={n} all"),
            from_return,
            None,
            "",
        );
        summary(
            "sds-teardown",
            &format!("revoke streams={n} each"),
            per_stream,
            None,
            "",
        );
        summary(
            "sds-teardown",
            &format!("revoke-call streams={n} all"),
            from_call,
            None,
            "(from sending Revoke)",
        );
    }
    agent.stop()
}

/// Agent RSS idle, with many leases, and with many open streams.
async fn memory(o: &Opts) -> Res<()> {
    let dir = temp_dir()?;
    let agent = AgentProc::start(o, dir.path()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = |what: &str, [rss, hwm, anon, file]: [u64; 4]| {
        let mib = |k: u64| k as f64 / 1024.0;
        println!(
            "{:<14} {what:<28} rss={:.1}MiB peak_rss={:.1}MiB anon={:.1}MiB file={:.1}MiB",
            "memory",
            mib(rss),
            mib(hwm),
            mib(anon),
            mib(file)
        );
    };
    report("idle", agent.rss_kib());
    let took = grant_many(&agent, o.leases, "mem", HOUR).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    report(&format!("leases={}", o.leases), agent.rss_kib());
    println!(
        "{:<14} {:<28} count={:<7} throughput={:.1}/s (64 concurrent grants, each stored and audited)",
        "grant",
        format!("leases={}", o.leases),
        o.leases,
        o.leases as f64 / took.as_secs_f64()
    );
    let mut admin = agent.admin().await?;
    grant(&mut admin, "mem-streams", my_selectors(), HOUR).await?;
    let n = o.streams.iter().copied().max().unwrap_or(1000);
    let clients = connect_clients(&agent, n).await?;
    let set = open_streams(&clients).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    report(&format!("leases={} streams={n}", o.leases), agent.rss_kib());
    if !o.hold.is_zero() {
        eprintln!(
            "holding for {:?}: agent (or its wrapper) is pid {}",
            o.hold,
            agent.pid()
        );
        tokio::time::sleep(o.hold).await;
    }
    drop(set);
    drop(clients);
    agent.stop()
}

/// Connections in one `burst`.
const BURST_CONNECTIONS: usize = 2000;

/// Memory before and after bursts of connections that each fetch and keep a stream open, then
/// all close: the agent trims the heap once enough connections closed (`agent::memory`, checked
/// every 2 s), so the level after a burst should come back near the level before it.
async fn burst(o: &Opts) -> Res<()> {
    let dir = temp_dir()?;
    let agent = AgentProc::start(o, dir.path()).await?;
    let mut admin = agent.admin().await?;
    grant(&mut admin, "burst", my_selectors(), HOUR).await?;
    // One fetch first, so the pre-burst level includes a cached SVID and a served request.
    let warm = connect_clients(&agent, 1).await?;
    warm[0].fetch_x509_svid().await?;
    drop(warm);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mib = |k: u64| k as f64 / 1024.0;
    let before = agent.rss_kib();
    let line = |what: &str, [rss, hwm, anon, file]: [u64; 4]| {
        println!(
            "{:<14} {what:<28} rss={:.1}MiB (x{:.2}) anon={:.1}MiB (x{:.2}) file={:.1}MiB peak_rss={:.1}MiB",
            "burst",
            mib(rss),
            rss as f64 / before[0] as f64,
            mib(anon),
            anon as f64 / before[2] as f64,
            mib(file),
            mib(hwm)
        );
    };
    line("before", before);
    for round in 1..=o.reps.unwrap_or(3) {
        let clients = connect_clients(&agent, BURST_CONNECTIONS).await?;
        let set = open_streams(&clients).await?;
        line(
            &format!("round={round} open={BURST_CONNECTIONS}"),
            agent.rss_kib(),
        );
        drop(set);
        drop(clients);
        // Two trim checks (every 2 s) after the connections are gone.
        tokio::time::sleep(Duration::from_secs(5)).await;
        line(&format!("round={round} closed"), agent.rss_kib());
    }
    agent.stop()
}

/// Process start → `/healthz/ready` 200, with an existing data dir.
async fn startup(o: &Opts) -> Res<()> {
    let reps = o.reps.unwrap_or(10);
    for leases in [0, o.leases] {
        let dir = temp_dir()?;
        let agent = AgentProc::start(o, dir.path()).await?;
        if leases > 0 {
            grant_many(&agent, leases, "start", 24 * HOUR).await?;
        }
        agent.stop()?;
        let mut lat = Vec::new();
        for _ in 0..reps {
            let (child, took) = spawn_until_ready(o, dir.path(), Duration::from_secs(30))?;
            AgentProc::from(child, dir.path()).stop()?;
            lat.push(took?);
        }
        summary(
            "startup",
            &format!("stored_leases={leases}"),
            lat,
            None,
            "(spawn to /healthz/ready 200, CA on disk)",
        );
    }
    Ok(())
}

/// Spawns an agent on `dir` (on a port of its own for health) and waits until it is ready:
/// the process, and how long from spawn to `/healthz/ready` 200 (an error if it exited or was
/// not ready within `limit`; the process is returned either way, to be stopped).
fn spawn_until_ready(o: &Opts, dir: &Path, limit: Duration) -> Res<(Child, Res<Duration>)> {
    let addr = free_port()?;
    let t0 = Instant::now();
    let mut child = agent_command(o, dir, &addr.to_string())
        .stdout(Stdio::null())
        .spawn()?;
    let took = tokio::task::block_in_place(|| {
        while !ready(addr) {
            if t0.elapsed() > limit {
                return Err("agent not ready in time".into());
            }
            if let Ok(Some(_)) = child.try_wait() {
                return Err("agent exited before it was ready".into());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(t0.elapsed())
    });
    Ok((child, took))
}

/// One lease count's results in `scale`, for the closing table.
#[derive(Default)]
struct ScaleRow {
    leases: usize,
    grants_per_sec: f64,
    grant_cpu_us: f64,
    rss: [u64; 4],
    fetch: Vec<(String, f64, Duration)>,
    revoke: Vec<(usize, Duration, Duration)>,
    startup: (Duration, Duration),
    store_loaded: Vec<[f64; 3]>,
    restarted_rss: [u64; 4],
}

/// `open_ms`, `load_ms` and `restore_ms` of the last `store_loaded` line of an agent log, in
/// either log format (`key=value` or JSON).
fn store_loaded(log: &Path) -> Option<[f64; 3]> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains("store_loaded"))?;
    let field = |key: &str| -> Option<f64> {
        let at = line
            .find(&format!("{key}="))
            .map(|i| i + key.len() + 1)
            .or_else(|| line.find(&format!("\"{key}\":")).map(|i| i + key.len() + 3))?;
        let num: String = line[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        num.parse().ok()
    };
    Some([field("open_ms")?, field("load_ms")?, field("restore_ms")?])
}

/// How each cost grows with the number of leases (issue 19, point 4). For each count, on a
/// fresh agent and data dir: grant that many leases no client here matches (in tenths, to see
/// whether grants slow down as the store grows), RSS, cached fetches at 16 and 64 clients back
/// to back and 64 paced at ~80 % of the measured capacity, revoke → every stream told, then
/// restarts on the same data dir (time to ready, the agent's `store_loaded` split, RSS).
async fn scale(o: &Opts) -> Res<()> {
    let counts = o
        .lease_counts
        .clone()
        .unwrap_or_else(|| vec![1_000, 10_000, 100_000]);
    let reps = o.reps.unwrap_or(5);
    let mib = |k: u64| k as f64 / 1024.0;
    let memory_line = |what: &str, [rss, hwm, anon, file]: [u64; 4]| {
        println!(
            "{:<14} {what:<28} rss={:.1}MiB peak_rss={:.1}MiB anon={:.1}MiB file={:.1}MiB",
            "scale-memory",
            mib(rss),
            mib(hwm),
            mib(anon),
            mib(file)
        )
    };
    let mut rows = Vec::new();
    for &n in &counts {
        let mut row = ScaleRow {
            leases: n,
            ..ScaleRow::default()
        };
        let began = Instant::now();
        let dir = temp_dir()?;
        let agent = AgentProc::start(o, dir.path()).await?;
        let pid = agent.pid().to_string();

        // Grants, a tenth at a time.
        let tenth = (n / 10).max(1);
        let (cpu0, mut took, mut granted) = (cpu_secs(&pid), Duration::ZERO, 0);
        let mut tenths = Vec::new();
        while granted < n {
            let k = tenth.min(n - granted);
            let t = grant_many(&agent, k, &format!("scale-{granted}"), 24 * HOUR).await?;
            tenths.push(format!("{:.0}", k as f64 / t.as_secs_f64()));
            took += t;
            granted += k;
        }
        row.grants_per_sec = n as f64 / took.as_secs_f64();
        row.grant_cpu_us = (cpu_secs(&pid) - cpu0) / n as f64 * 1e6;
        println!(
            "{:<14} {:<28} count={n:<7} throughput={:.1}/s agent_cpu={:.0}us/grant per_tenth/s=[{}]",
            "scale-grant",
            format!("leases={n}"),
            row.grants_per_sec,
            row.grant_cpu_us,
            tenths.join(",")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        row.rss = agent.rss_kib();
        memory_line(&format!("leases={n} granted"), row.rss);

        // Cached fetches of the loadgen's own lease, among n it does not match.
        let mut admin = agent.admin().await?;
        let own = grant(&mut admin, "scale-fetch", my_selectors(), 24 * HOUR).await?;
        let back_to_back = Opts {
            interval: None,
            ..o.clone()
        };
        let mut capacity = 0.0;
        for c in [16, 64] {
            let run = measure_fetch(&back_to_back, &agent.endpoint(), agent.pid(), c, None).await?;
            run.print("scale-fetch", c, &back_to_back);
            let mut lat = run.lat.clone();
            lat.sort();
            row.fetch
                .push((format!("{c}"), run.throughput(), pct(&lat, 0.99)));
            capacity = run.throughput();
        }
        // 64 clients paced at ~80 % of the capacity just measured.
        if capacity > 0.0 {
            let paced = Opts {
                interval: Some(Duration::from_secs_f64(64.0 / (0.8 * capacity))),
                ..o.clone()
            };
            let run = measure_fetch(&paced, &agent.endpoint(), agent.pid(), 64, None).await?;
            run.print("scale-fetch", 64, &paced);
            let mut lat = run.lat.clone();
            lat.sort();
            row.fetch
                .push(("64 paced".into(), run.throughput(), pct(&lat, 0.99)));
        }

        // Revoke → every stream on the lease told, among n unrelated leases. The fetch lease
        // goes first, so each revocation leaves the streams no identity (as in `teardown`).
        revoke(&mut admin, &own.lease_id).await?;
        let mut kinds = std::collections::BTreeMap::new();
        for &streams in &o.streams {
            let clients = connect_clients(&agent, streams).await?;
            let (mut all, mut call) = (Vec::new(), Vec::new());
            for rep in 0..reps {
                let lease = grant(
                    &mut admin,
                    &format!("scale-td-{streams}-{rep}"),
                    my_selectors(),
                    HOUR,
                )
                .await?;
                let set = open_streams(&clients).await?;
                let sent = Instant::now();
                revoke(&mut admin, &lease.lease_id).await?;
                call.push(sent.elapsed());
                let (_, lat) = told(set, sent, &mut kinds).await?;
                all.push(lat.iter().copied().max().unwrap_or_default());
            }
            summary(
                "scale-revoke",
                &format!("leases={n} streams={streams} all"),
                all.clone(),
                None,
                "(from sending Revoke)",
            );
            summary(
                "scale-revoke",
                &format!("leases={n} streams={streams} call"),
                call,
                None,
                "(Revoke's own latency)",
            );
            all.sort();
            row.revoke.push((streams, pct(&all, 0.50), pct(&all, 0.99)));
        }
        println!("{:<14} ends={}", "scale-revoke", kinds_str(&kinds));
        drop(admin);
        agent.stop()?;

        // Restarts on the same data dir: the n leases (and the few left by the steps above).
        let mut lat = Vec::new();
        for rep in 0..reps {
            let (child, took) = spawn_until_ready(o, dir.path(), Duration::from_secs(60))?;
            let agent = AgentProc::from(child, dir.path());
            lat.push(took?);
            if rep + 1 == reps {
                tokio::time::sleep(Duration::from_millis(500)).await;
                row.restarted_rss = agent.rss_kib();
            }
            agent.stop()?;
            row.store_loaded
                .extend(store_loaded(&dir.path().join("agent.log")));
        }
        let splits = row
            .store_loaded
            .iter()
            .map(|[a, b, c]| format!("{a}/{b}/{c}"))
            .collect::<Vec<_>>()
            .join(",");
        lat.sort();
        row.startup = (pct(&lat, 0.50), pct(&lat, 0.99));
        summary(
            "scale-startup",
            &format!("leases={n}"),
            lat,
            None,
            &format!("open/load/restore_ms=[{splits}]"),
        );
        memory_line(&format!("leases={n} restarted"), row.restarted_rss);
        println!(
            "{:<14} {:<28} took {:.0} s",
            "scale",
            format!("leases={n}"),
            began.elapsed().as_secs_f64()
        );
        rows.push(row);
    }

    // One table, one row per lease count.
    println!();
    println!("| leases | grants/s (agent µs/grant) | RSS anon / file after grants | fetch/s, p99 | revoke → streams told p50 / p99 | start-up p50 / p99 (open / load / restore ms, median) | RSS anon / file after restart |");
    println!("|---|---|---|---|---|---|---|");
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    for r in &rows {
        let fetch = r
            .fetch
            .iter()
            .map(|(c, thr, p99)| format!("{c}: {:.1}k/s, {}", thr / 1e3, ms(*p99)))
            .collect::<Vec<_>>()
            .join("; ");
        let revoke = r
            .revoke
            .iter()
            .map(|(s, p50, p99)| format!("{s}: {} / {}", ms(*p50), ms(*p99)))
            .collect::<Vec<_>>()
            .join("; ");
        let split = |i: usize| median(r.store_loaded.iter().map(|s| s[i]).collect());
        println!(
            "| {} | {:.0} ({:.0}) | {:.1} / {:.1} MiB | {fetch} | {revoke} | {} / {} ({} / {} / {}) | {:.1} / {:.1} MiB |",
            r.leases,
            r.grants_per_sec,
            r.grant_cpu_us,
            mib(r.rss[2]),
            mib(r.rss[3]),
            ms(r.startup.0),
            ms(r.startup.1),
            split(0),
            split(1),
            split(2),
            mib(r.restarted_rss[2]),
            mib(r.restarted_rss[3]),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Many nodes: three agents on one etcd (Debian's etcd-server on PATH)

#[path = "../tests/support/etcd.rs"]
mod etcd_server;

/// A root and one intermediate per node (as cert-manager would issue them), written into each
/// node's dir; the config for an agent on `etcd` with that CA.
fn cluster_config(
    etcd: &str,
    node: &str,
    dir: &Path,
    root: &(rcgen::CertificateParams, rcgen::KeyPair, String),
) -> Res<String> {
    let (root_params, root_key, root_pem) = root;
    let key = rcgen::KeyPair::generate()?;
    let cert = ca_params(node, true)
        .signed_by(&key, &rcgen::Issuer::from_params(root_params, root_key))?;
    std::fs::write(dir.join("ca.pem"), cert.pem())?;
    std::fs::write(dir.join("ca.key"), key.serialize_pem())?;
    std::fs::write(dir.join("root.pem"), root_pem)?;
    Ok(format!(
        "trust_domain = \"example.org\"\nnode_name = \"{node}\"\n\n[ca]\ncert_file = {:?}\nkey_file = {:?}\nbundle_file = {:?}\n\n[store]\nkind = \"etcd\"\nendpoints = [\"{etcd}\"]\n",
        dir.join("ca.pem"),
        dir.join("ca.key"),
        dir.join("root.pem"),
    ))
}

fn ca_params(cn: &str, intermediate: bool) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org".try_into().expect("a URI"),
    )];
    p.is_ca = rcgen::IsCa::Ca(if intermediate {
        rcgen::BasicConstraints::Constrained(0)
    } else {
        rcgen::BasicConstraints::Unconstrained
    });
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.use_authority_key_identifier_extension = intermediate;
    p
}

/// Waits until `agent` holds lease `id` as active (it came through etcd's watch).
async fn until_active(admin: &mut TasksClient<Channel>, id: &str) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = admin
            .get(pb::GetRequest {
                lease_id: id.into(),
            })
            .await;
        if got.is_ok_and(|l| l.into_inner().state == "active") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("lease {id} never became active on another node").into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A revocation on node A (from sending Revoke) until the streams open on nodes B and C (half
/// each) are told; and grants per second through etcd.
async fn cluster(o: &Opts) -> Res<()> {
    let bin = etcd_server::binary()?;
    let etcd = tokio::task::block_in_place(|| etcd_server::Etcd::start(&bin));
    let root_key = rcgen::KeyPair::generate()?;
    let root_params = ca_params("root", false);
    let root_pem = root_params.self_signed(&root_key)?.pem();
    let root = (root_params, root_key, root_pem);
    let mut dirs = Vec::new();
    let mut agents = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        let dir = temp_dir()?;
        let toml = cluster_config(&etcd.endpoint, node, dir.path(), &root)?;
        agents.push(AgentProc::start_configured(o, dir.path(), Some(&toml)).await?);
        dirs.push(dir);
    }
    let (mut a, mut b, mut c) = (
        agents[0].admin().await?,
        agents[1].admin().await?,
        agents[2].admin().await?,
    );
    let uid = format!("unix:uid:{}", rustix::process::geteuid().as_raw());
    let reps = o.reps.unwrap_or(10);
    let mut seq = 0;
    for &n in &o.streams {
        let mut clients = connect_clients(&agents[1], n / 2).await?;
        clients.extend(connect_clients(&agents[2], n - n / 2).await?);
        let mut all = Vec::new();
        let mut per_stream = Vec::new();
        let mut kinds = std::collections::BTreeMap::new();
        for _ in 0..reps {
            seq += 1;
            let lease = grant(&mut a, &format!("cl-{seq}"), vec![uid.clone()], HOUR).await?;
            until_active(&mut b, &lease.lease_id).await?;
            until_active(&mut c, &lease.lease_id).await?;
            let set = open_streams(&clients).await?;
            // From sending Revoke to node A: the call's own write to etcd is part of it.
            let t0 = Instant::now();
            revoke(&mut a, &lease.lease_id).await?;
            let (_, lat) = told(set, t0, &mut kinds).await?;
            all.push(lat.iter().copied().max().unwrap_or_default());
            per_stream.extend(lat);
        }
        summary(
            "cluster",
            &format!("revoke-on-A streams={n} on B+C all"),
            all,
            None,
            &format!("ends={}", kinds_str(&kinds)),
        );
        summary(
            "cluster",
            &format!("revoke-on-A streams={n} on B+C each"),
            per_stream,
            None,
            "",
        );
    }
    for n in [500usize, 2000] {
        let took = grant_many(&agents[0], n, &format!("gr-{n}"), HOUR).await?;
        println!(
            "cluster  grants through etcd n={n} (64 in flight)  {:.0}/s",
            n as f64 / took.as_secs_f64()
        );
    }
    drop(agents);
    drop(dirs);
    drop(etcd);
    Ok(())
}

/// What `store.max_staleness` costs: `nodes` real etcd lease stores (one client connection,
/// one watch stream and one staleness clock each, as in N agents) follow one etcd for
/// `--duration`, reading their change markers every quarter of `max_staleness` as agents do.
/// Reports etcd's CPU, the stores' own CPU (this process), and how many stores went stale
/// though etcd was up: a false suspension would end a node's streams for nothing.
async fn staleness(o: &Opts) -> Res<()> {
    use mayfly::lease::LeaseStore;
    use mayfly::store::{EtcdSettings, EtcdStore};
    let bin = etcd_server::binary()?;
    let etcd = tokio::task::block_in_place(|| etcd_server::Etcd::start(&bin));
    let etcd_pid = etcd.pid().to_string();
    let me = std::process::id().to_string();
    let idle = |secs: f64| -> f64 {
        let before = cpu_secs(&etcd_pid);
        std::thread::sleep(Duration::from_secs_f64(secs));
        (cpu_secs(&etcd_pid) - before) / secs
    };
    let base = tokio::task::block_in_place(|| idle(o.duration.as_secs_f64()));
    println!(
        "staleness  etcd alone  etcd CPU {:.2} % of a core",
        base * 100.0
    );
    for &max_staleness in &o.staleness {
        for &n in &o.nodes {
            let settings = EtcdSettings {
                endpoints: vec![etcd.endpoint.clone()],
                prefix: "/mayfly/".into(),
                ca_file: None,
                cert_file: None,
                key_file: None,
                dial_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(2),
                max_staleness,
            };
            let mut stores = Vec::with_capacity(n);
            for i in 0..n {
                let store = EtcdStore::connect(settings.clone(), &format!("node-{i}")).await?;
                // The first read starts the watch, as at an agent's start.
                let s = store.clone();
                tokio::task::spawn_blocking(move || s.load()).await??;
                stores.push(store);
            }
            // Count every turn to stale from here on.
            let went_stale = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for s in &stores {
                let mut health = s.health();
                let went_stale = went_stale.clone();
                tokio::spawn(async move {
                    while health.changed().await.is_ok() {
                        if health.borrow_and_update().stale {
                            went_stale.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
            // Settle: every watch open and its first marker read in.
            tokio::time::sleep(max_staleness.max(Duration::from_secs(2))).await;
            let stale_now = stores.iter().filter(|s| s.health().borrow().stale).count();
            let (e0, m0, t0) = (cpu_secs(&etcd_pid), cpu_secs(&me), Instant::now());
            tokio::time::sleep(o.duration).await;
            let secs = t0.elapsed().as_secs_f64();
            let etcd_cpu = (cpu_secs(&etcd_pid) - e0) / secs;
            let own_cpu = (cpu_secs(&me) - m0) / secs;
            println!(
                "staleness  max_staleness={:?} nodes={n}  marker reads {:.0}/s  etcd CPU {:.1} % of a core ({:.1} % above idle)  stores' CPU {:.1} %  stale at start {stale_now}, went stale {}",
                max_staleness,
                n as f64 * 4.0 / max_staleness.as_secs_f64(),
                etcd_cpu * 100.0,
                (etcd_cpu - base) * 100.0,
                own_cpu * 100.0,
                went_stale.load(std::sync::atomic::Ordering::Relaxed),
            );
            for s in &stores {
                s.close();
            }
            drop(stores);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    drop(etcd);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The null baseline

/// What the gRPC stack costs by itself: a tonic server on a Unix socket that answers every
/// `FetchX509SVID` with one response built once, of the agent's own response's size, with no
/// attestation, no lease lookup and no audit. It runs as its own process (this binary,
/// `null-server`), as the agent does, so its CPU is counted alone, and keeps each stream open
/// after its one message, as the agent does.
mod null {
    use super::*;
    use mayfly::proto::workload as wpb;
    use prost::Message;
    use tonic::{Request, Response, Status};
    use wpb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};

    pub const SUBCOMMAND: &str = "null-server";

    type Stream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

    pub struct Baseline {
        child: Child,
        socket: PathBuf,
    }

    impl Baseline {
        /// Takes one real response from the agent at `agent` and starts the null server,
        /// answering it, on a socket in `dir`.
        pub async fn start(agent: &str, dir: &Path, wrap: &[String]) -> Res<Baseline> {
            let ctx = WorkloadApiClient::connect_to(agent)
                .await?
                .fetch_x509_context()
                .await?;
            let svid = ctx.svids().first().ok_or("the agent issued no SVID")?;
            let td = svid.spiffe_id().trust_domain();
            let bundle = ctx
                .bundle_set()
                .get(td)
                .map(|b| {
                    b.authorities()
                        .iter()
                        .flat_map(|c| c.as_bytes().to_vec())
                        .collect()
                })
                .unwrap_or_default();
            let response = wpb::X509svidResponse {
                svids: vec![wpb::X509svid {
                    spiffe_id: svid.spiffe_id().to_string(),
                    x509_svid: svid
                        .cert_chain()
                        .iter()
                        .flat_map(|c| c.as_bytes().to_vec())
                        .collect(),
                    x509_svid_key: svid.private_key().as_bytes().to_vec(),
                    bundle,
                    hint: String::new(),
                }],
                ..Default::default()
            };
            let file = dir.join("null-response.pb");
            std::fs::write(&file, response.encode_to_vec())?;
            let socket = dir.join("null.sock");
            let exe = std::env::current_exe()?;
            let mut cmd = match wrap.split_first() {
                Some((wrapper, args)) => {
                    let mut cmd = Command::new(wrapper);
                    cmd.args(args).arg(exe);
                    cmd
                }
                None => Command::new(exe),
            };
            let child = cmd
                .arg(SUBCOMMAND)
                .arg(&socket)
                .arg(&file)
                .stdin(Stdio::null())
                .spawn()?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                if Instant::now() > deadline {
                    return Err("the null server did not start".into());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Baseline { child, socket })
        }

        pub fn endpoint(&self) -> String {
            format!("unix://{}", self.socket.display())
        }

        pub fn pid(&self) -> u32 {
            self.child.id()
        }

        pub fn stop(mut self) {
            sigterm(&self.child);
            let _ = self.child.wait();
        }
    }

    struct Null(Arc<wpb::X509svidResponse>);

    #[tonic::async_trait]
    impl SpiffeWorkloadApi for Null {
        type FetchX509SVIDStream = Stream<wpb::X509svidResponse>;

        async fn fetch_x509svid(
            &self,
            _: Request<wpb::X509svidRequest>,
        ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
            let first = futures::stream::once(std::future::ready(Ok((*self.0).clone())));
            Ok(Response::new(Box::pin(
                first.chain(futures::stream::pending()),
            )))
        }

        type FetchX509BundlesStream = Stream<wpb::X509BundlesResponse>;

        async fn fetch_x509_bundles(
            &self,
            _: Request<wpb::X509BundlesRequest>,
        ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
            Err(Status::unimplemented("null server"))
        }

        async fn fetch_jwtsvid(
            &self,
            _: Request<wpb::JwtsvidRequest>,
        ) -> Result<Response<wpb::JwtsvidResponse>, Status> {
            Err(Status::unimplemented("null server"))
        }

        type FetchJWTBundlesStream = Stream<wpb::JwtBundlesResponse>;

        async fn fetch_jwt_bundles(
            &self,
            _: Request<wpb::JwtBundlesRequest>,
        ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
            Err(Status::unimplemented("null server"))
        }

        async fn validate_jwtsvid(
            &self,
            _: Request<wpb::ValidateJwtsvidRequest>,
        ) -> Result<Response<wpb::ValidateJwtsvidResponse>, Status> {
            Err(Status::unimplemented("null server"))
        }

        type FetchWITSVIDStream = Stream<wpb::WitsvidResponse>;

        async fn fetch_witsvid(
            &self,
            _: Request<wpb::WitsvidRequest>,
        ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
            Err(Status::unimplemented("null server"))
        }

        type FetchWITBundlesStream = Stream<wpb::WitBundlesResponse>;

        async fn fetch_wit_bundles(
            &self,
            _: Request<wpb::WitBundlesRequest>,
        ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
            Err(Status::unimplemented("null server"))
        }
    }

    /// The `null-server` process: serves until killed.
    pub fn serve(socket: &Path, response: &Path) -> Res<()> {
        let response = wpb::X509svidResponse::decode(std::fs::read(response)?.as_slice())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let _ = std::fs::remove_file(socket);
            let listener = tokio::net::UnixListener::bind(socket)?;
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(Null(Arc::new(response))))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await?;
            Ok(())
        })
    }
}
