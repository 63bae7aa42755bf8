//! Shared harness and fixtures: a real agent in-process on temp sockets (or as a `mayfly agent`
//! child process), the admin client, the `mayfly` CLI as a client, and a real verifier for
//! SVID chains.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use mayfly::agent::Agent;
use mayfly::config::{Config, FileConfig, Overrides};
use mayfly::proto::admin as pb;
use mayfly::proto::admin::tasks_client::TasksClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::transport::Channel;

/// The built `mayfly` binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_mayfly");

pub const HOUR: Duration = Duration::from_secs(3600);

pub struct TestAgent {
    pub agent: Option<Agent>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub admin_socket: PathBuf,
}

pub async fn start() -> TestAgent {
    start_with(|_| {}).await
}

pub async fn start_with(edit: impl FnOnce(&mut FileConfig)) -> TestAgent {
    start_in(shared_tempdir(), edit).await
}

/// A temp dir other users (the setpriv tests) can reach the sockets inside.
pub fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Starts an agent on `dir`'s sockets and data (a restart when the dir was used before).
pub async fn start_in(dir: tempfile::TempDir, edit: impl FnOnce(&mut FileConfig)) -> TestAgent {
    let mut file = FileConfig {
        trust_domain: Some("example.org".into()),
        ..Default::default()
    };
    edit(&mut file);
    let socket = dir.path().join("workload.sock");
    let admin_socket = dir.path().join("admin.sock");
    let config = Config::resolve(
        file,
        Overrides {
            socket: Some(socket.clone()),
            admin_socket: Some(admin_socket.clone()),
            data_dir: Some(dir.path().join("data")),
            health_addr: Some("127.0.0.1:0".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let agent = Agent::start(config).await.unwrap();
    TestAgent {
        agent: Some(agent),
        dir,
        socket,
        admin_socket,
    }
}

/// Polls `check` every 20 ms until it returns `Ok`; once `within` has passed, fails the test
/// with the last `Err`.
pub async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) => assert!(tokio::time::Instant::now() < deadline, "{why}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocks until `path` exists (an agent's socket, once it serves); fails the test after 20 s.
pub fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

impl TestAgent {
    /// Stops the agent gracefully; its dir comes back, to start again on the same data.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.agent.take().unwrap().stop().await;
        self.dir
    }

    /// The agent's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let addr = self.agent.as_ref().unwrap().health_addr.tcp().unwrap();
        http_get(addr, "/metrics").await.1
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub async fn admin(&self) -> TasksClient<Channel> {
        mayfly::cli::connect::connect(&self.admin_socket)
            .await
            .unwrap()
    }

    pub async fn workload(&self) -> spiffe::WorkloadApiClient {
        spiffe::WorkloadApiClient::connect_to(self.endpoint())
            .await
            .unwrap()
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Grants a lease for `selectors` with the given TTLs.
    pub async fn grant(
        &self,
        task_id: &str,
        selectors: &[String],
        ttl: Duration,
        svid_ttl: Option<Duration>,
    ) -> pb::Lease {
        self.admin()
            .await
            .grant(pb::GrantRequest {
                svid_ttl: svid_ttl.map(mayfly::time::to_duration),
                selectors: selectors.to_vec(),
                reason: "test".into(),
                ..grant_request(task_id, "user/alice", ttl)
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// A lease that matches this test process (by uid and by its own pid).
    pub async fn grant_me(
        &self,
        task_id: &str,
        ttl: Duration,
        svid_ttl: Option<Duration>,
    ) -> pb::Lease {
        let sel = vec![
            format!("unix:uid:{}", my_uid()),
            format!("unix:pid:{}", std::process::id()),
        ];
        self.grant(task_id, &sel, ttl, svid_ttl).await
    }

    pub async fn lease(&self, lease_id: &str) -> pb::Lease {
        self.admin()
            .await
            .get(pb::GetRequest {
                lease_id: lease_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Every lease, ended ones too.
    pub async fn all_leases(&self) -> Vec<pb::Lease> {
        self.admin()
            .await
            .list(pb::ListRequest { all: true })
            .await
            .unwrap()
            .into_inner()
            .leases
    }

    pub async fn revoke(&self, lease_id: &str, reason: &str) -> pb::Lease {
        self.admin()
            .await
            .revoke(pb::RevokeRequest {
                lease_id: lease_id.into(),
                reason: reason.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits (bounded by `within`) until the lease is in state `want`.
    pub async fn wait_state(&self, lease_id: &str, want: &str, within: Duration) {
        eventually(within, async || match self.lease(lease_id).await.state {
            s if s == want => Ok(()),
            s => Err(format!("lease is {s}, wanted {want}")),
        })
        .await
    }
}

/// A plain HTTP/1.1 GET: status and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

/// A grant by `delegator` to agent `reporter` for this test process (by its pid).
pub fn grant_request(task_id: &str, delegator: &str, ttl: Duration) -> pb::GrantRequest {
    pb::GrantRequest {
        task_id: task_id.into(),
        delegator: delegator.into(),
        agent: "reporter".into(),
        ttl: Some(mayfly::time::to_duration(ttl)),
        selectors: vec![format!("unix:pid:{}", std::process::id())],
        ..Default::default()
    }
}

/// `mayfly run` for `task` with the given lease TTL, wrapping `command`, against `t`.
pub fn run_cmd(t: &TestAgent, task: &str, ttl: &str, command: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(BIN);
    c.args([
        "run",
        "--task-id",
        task,
        "--delegator",
        "user/carol",
        "--agent",
        "runner",
    ])
    .args(["--ttl", ttl, "--"])
    .args(command)
    .env("MAYFLY_ADMIN_SOCKET", &t.admin_socket)
    .env("SPIFFE_ENDPOINT_SOCKET", t.endpoint())
    .kill_on_drop(true);
    c
}

/// The lease ID in the line `mayfly run` first prints on stderr
/// ("mayfly run: lease <id> ...").
pub fn reported_lease(line: &str) -> String {
    line.split_whitespace().nth(3).unwrap().to_owned()
}

/// Every audit record under `data_dir`.
pub fn audit_records(data_dir: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    mayfly::audit::read_all(&data_dir.join("audit")).unwrap()
}

/// The audit records under `data_dir` of one kind of event.
pub fn audit_events(
    data_dir: &Path,
    event: &str,
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    audit_records(data_dir)
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

/// `mayfly ARGS`, not told of any agent by the environment.
pub fn mayfly_command(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .env_remove("MAYFLY_ADMIN_SOCKET");
    c
}

/// Runs `mayfly ARGS` to the end (see [`mayfly_command`]); blocks the thread.
pub fn mayfly(args: &[&str]) -> Output {
    mayfly_command(args).output().unwrap()
}

/// Runs `mayfly ARGS` to the end (see [`mayfly_command`]) without blocking the runtime: for
/// tests whose agent runs in-process and must keep serving.
pub async fn mayfly_async(args: &[&str]) -> Output {
    tokio::process::Command::from(mayfly_command(args))
        .output()
        .await
        .unwrap()
}

/// Asserts the command succeeded; its stdout.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts the command succeeded; its stdout as JSON (`--output json`).
pub fn json(out: Output) -> serde_json::Value {
    let stdout = ok(out);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Where a `mayfly agent` child process listens and keeps its data, all in one dir.
pub struct AgentPaths {
    pub socket: PathBuf,
    pub admin_socket: PathBuf,
    pub data: PathBuf,
}

impl AgentPaths {
    pub fn in_dir(dir: &Path) -> AgentPaths {
        AgentPaths {
            socket: dir.join("w.sock"),
            admin_socket: dir.join("a.sock"),
            data: dir.join("data"),
        }
    }

    /// Runs `cmd` (a `mayfly agent` on these paths, perhaps under a wrapper), output discarded,
    /// until the returned child drops; returns once both sockets are there, with an admin
    /// client.
    pub async fn spawn(&self, mut cmd: Command) -> (tokio::process::Child, TasksClient<Channel>) {
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_for(&self.socket);
        wait_for(&self.admin_socket);
        let admin = mayfly::cli::connect::connect(&self.admin_socket)
            .await
            .unwrap();
        (child, admin)
    }

    /// `mayfly agent` on these sockets and data; the caller adds the health address.
    pub fn agent(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("agent")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .arg("--data-dir")
            .arg(&self.data);
        c
    }
}

/// `mayfly` as another user via setpriv (which needs root); the caller adds the arguments.
pub fn as_uid(uid: u32) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
        "--",
        BIN,
    ]);
    c
}

/// Runs `mayfly ARGS` as another user via setpriv; `None` when not root (cannot switch users).
pub async fn run_as(uid: u32, args: &[&str]) -> Option<Output> {
    if my_uid() != 0 {
        eprintln!("skipping the other-uid check: needs root to switch users with setpriv");
        return None;
    }
    let mut cmd = as_uid(uid);
    cmd.args(args).env_remove("SPIFFE_ENDPOINT_SOCKET");
    // tokio's Command: the agent under test runs on this same runtime and must keep serving.
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .expect("run setpriv");
    Some(out)
}

pub fn expires_at(l: &pb::Lease) -> SystemTime {
    mayfly::time::from_timestamp(l.expires_at.as_ref().unwrap()).unwrap()
}

/// notAfter of a DER certificate.
pub fn not_after(der: &[u8]) -> SystemTime {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let secs = cert.validity().not_after.timestamp();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
}

/// The serial as mayfly prints and audits it.
pub fn serial(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    mayfly::authority::x509::serial_hex(cert.raw_serial())
}

/// The trust domain every test agent serves.
pub fn trust_domain() -> spiffe::TrustDomain {
    spiffe::TrustDomain::new("example.org").unwrap()
}

pub fn ders(certs: &[spiffe::cert::Certificate]) -> Vec<CertificateDer<'static>> {
    certs
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect()
}

/// The agent's own X.509 authorities in a fetched context.
pub fn bundle_roots(ctx: &spiffe::X509Context) -> Vec<CertificateDer<'static>> {
    let bundle = ctx.bundle_set().get(&trust_domain()).expect("own bundle");
    ders(bundle.authorities())
}

/// Verifies `chain` (leaf first) to `roots` with rustls-webpki, for client and server use.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0])?;
    let now = UnixTime::now();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            now,
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

/// One root for the trust domain, and a fresh intermediate under it for each agent.
pub struct Pki {
    pub root: CertificateParams,
    pub root_key: KeyPair,
    pub root_pem: String,
}

pub fn ca_params(cn: &str, constrained: bool) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
    p.is_ca = IsCa::Ca(if constrained {
        BasicConstraints::Constrained(0)
    } else {
        BasicConstraints::Unconstrained
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(2);
    p
}

impl Pki {
    pub fn new() -> Pki {
        let root_key = KeyPair::generate().unwrap();
        let root = ca_params("cluster root", false);
        let root_pem = root.self_signed(&root_key).unwrap().pem();
        Pki {
            root,
            root_key,
            root_pem,
        }
    }

    /// A fresh intermediate under the root: (certificate PEM, key PEM).
    pub fn intermediate(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params(&format!("{name} intermediate"), true);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &Issuer::from_params(&self.root, &self.root_key))
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes an intermediate for `node` into `dir`, and points the config at it.
    pub fn node_ca(&self, node: &str, dir: &Path, file: &mut FileConfig) {
        let (cert, key) = self.intermediate(node);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        file.ca.cert_file = Some(write("ca.pem", &cert));
        file.ca.key_file = Some(write("ca.key", &key));
        file.ca.bundle_file = Some(write("root.pem", &self.root_pem));
    }
}
