//! Shared harness: a real agent in-process on temp sockets, the admin client, and a real
//! verifier for SVID chains.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use mayfly::agent::Agent;
use mayfly::config::{Config, FileConfig, Overrides};
use mayfly::proto::admin as pb;
use mayfly::proto::admin::tasks_client::TasksClient;
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::transport::Channel;

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
    let dir = tempfile::tempdir().unwrap();
    // Other users (the setpriv tests) must reach the workload socket inside.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    start_in(dir, edit).await
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

pub fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

impl TestAgent {
    /// Stops the agent gracefully and starts a new one on the same data.
    pub async fn restart(mut self) -> TestAgent {
        self.agent.take().unwrap().stop().await;
        start_in(self.dir, |_| {}).await
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
        spiffe::WorkloadApiClient::connect_to(format!("unix://{}", self.socket.display()))
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
                task_id: task_id.into(),
                delegator: "user/alice".into(),
                agent: "reporter".into(),
                ttl: Some(mayfly::time::to_duration(ttl)),
                max_ttl: None,
                svid_ttl: svid_ttl.map(mayfly::time::to_duration),
                selectors: selectors.to_vec(),
                reason: "test".into(),
                ..Default::default()
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

    pub fn bin(&self) -> &'static str {
        env!("CARGO_BIN_EXE_mayfly")
    }
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

/// Verifies `chain` (leaf first) to the roots in `bundle` with rustls-webpki, for client and
/// server use.
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

/// Runs `mayfly` as another user via setpriv; `None` when not root (cannot switch users).
pub async fn run_as(uid: u32, args: &[&str]) -> Option<std::process::Output> {
    if my_uid() != 0 {
        eprintln!("skipping the other-uid check: needs root to switch users with setpriv");
        return None;
    }
    // tokio's Command: the agent under test runs on this same runtime and must keep serving.
    let out = tokio::process::Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
            env!("CARGO_BIN_EXE_mayfly"),
        ])
        .args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .await
        .expect("run setpriv");
    Some(out)
}
