//! A real etcd server for tests: Debian's `etcd-server` (installed by `.ci/run`), or the
//! binary `MAYFLY_ETCD` names, started on loopback ports of its own with a temp data dir.
//! Shared by the unit tests (`src/store/etcd.rs`) and the end-to-end tests.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`, or `https://` for [`Etcd::start_tls`].
    pub endpoint: String,
}

/// What a client needs for an etcd started with [`Etcd::start_tls`]: the CA of its serving
/// certificate, and a client certificate it requires.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The etcd binary, or why there is none.
pub fn binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("MAYFLY_ETCD") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err("no etcd on PATH (Debian: apt-get install etcd-server; or set MAYFLY_ETCD)".into())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Whether etcd's `/health` answers healthy.
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Etcd {
    /// A fresh single-member etcd; waits until it is healthy.
    pub fn start(etcd: &std::path::Path) -> Etcd {
        Self::launch(
            etcd,
            tempfile::tempdir().expect("etcd data dir"),
            "http",
            &[],
        )
    }

    /// A fresh etcd serving TLS (a certificate for 127.0.0.1 from a test CA) and requiring
    /// client certificates from that CA.
    pub fn start_tls(etcd: &std::path::Path) -> (Etcd, EtcdTls) {
        let dir = tempfile::tempdir().expect("etcd data dir");
        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("writing a test certificate");
            p
        };
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "etcd test CA");
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
        let leaf = |cn: &str, names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(names).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            (
                p.signed_by(&key, &issuer).unwrap().pem(),
                key.serialize_pem(),
            )
        };
        let (server, server_key) = leaf(
            "etcd",
            vec!["127.0.0.1".into(), "localhost".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) =
            leaf("mayfly", vec![], rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        let files = EtcdTls {
            ca: write("ca.pem", ca_pem),
            cert: write("client.pem", client),
            key: write("client.key", client_key),
        };
        let args = [
            format!("--cert-file={}", write("server.pem", server).display()),
            format!("--key-file={}", write("server.key", server_key).display()),
            format!("--trusted-ca-file={}", files.ca.display()),
            "--client-cert-auth".to_string(),
        ];
        (Self::launch(etcd, dir, "https", &args), files)
    }

    fn launch(
        etcd: &std::path::Path,
        dir: tempfile::TempDir,
        scheme: &str,
        extra: &[String],
    ) -> Etcd {
        let (client, peer, metrics) = (free_port(), free_port(), free_port());
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new(etcd)
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            // /health in plain HTTP whatever the client port speaks.
            .arg(format!("--listen-metrics-urls=http://127.0.0.1:{metrics}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        let etcd = Etcd {
            child,
            _dir: dir,
            endpoint,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthy(metrics) {
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy: {}",
                etcd.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        etcd
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) {
        signal(self.pid(), "STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// What etcd logged, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("etcd.log")).unwrap_or_default()
    }
}

fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.pid().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
