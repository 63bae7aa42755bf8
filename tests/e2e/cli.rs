//! The command line end to end: the built `mayfly` binary as agent and as client.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::*;

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn grant_fetch_write_watch_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let paths = AgentPaths::in_dir(dir.path());
    let (sock_s, admin_s) = (
        paths.socket.to_str().unwrap(),
        paths.admin_socket.to_str().unwrap(),
    );
    let _agent = Running(
        paths
            .agent()
            .args(["--trust-domain", "example.org"])
            .args(["--health-addr", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&paths.admin_socket);
    wait_for(&paths.socket);

    let selector = format!("unix:uid:{}", my_uid());
    let granted = json(mayfly(&[
        "task",
        "grant",
        "--task-id",
        "cli-1",
        "--delegator",
        "user/bob",
        "--agent",
        "writer",
        "--ttl",
        "10m",
        "--svid-ttl",
        "1m",
        "--selector",
        &selector,
        "--reason",
        "cli test",
        "--admin-socket",
        admin_s,
        "--output",
        "json",
    ]));
    for key in [
        "lease_id",
        "task_id",
        "delegator",
        "agent",
        "spiffe_id",
        "selectors",
        "state",
        "created_at",
        "expires_at",
    ] {
        assert!(!granted[key].is_null(), "missing {key}: {granted}");
    }
    assert_eq!(
        granted["spiffe_id"],
        "spiffe://example.org/agent/writer/task/cli-1/delegator/user/bob"
    );
    assert!(granted["expires_at"].as_str().unwrap().ends_with('Z'));
    let lease_id = granted["lease_id"].as_str().unwrap().to_owned();

    let out_dir = dir.path().join("out");
    let fetched = json(mayfly(&[
        "svid",
        "fetch",
        "--socket",
        sock_s,
        "--write",
        out_dir.to_str().unwrap(),
        "--output",
        "json",
    ]));
    assert_eq!(fetched[0]["spiffe_id"], granted["spiffe_id"]);
    // One time format everywhere: RFC 3339, UTC.
    for key in ["not_before", "not_after"] {
        let t = fetched[0][key].as_str().unwrap();
        assert!(
            t.len() == 20 && t.ends_with('Z') && &t[10..11] == "T",
            "{key}: {t}"
        );
    }
    let jwt = json(mayfly(&[
        "jwt",
        "fetch",
        "--audience",
        "svc",
        "--socket",
        sock_s,
        "--output",
        "json",
    ]));
    assert_eq!(jwt["spiffe_id"], granted["spiffe_id"]);
    assert_eq!(jwt["token"].as_str().unwrap().split('.').count(), 3);
    assert!(jwt["expires_at"].as_str().unwrap().ends_with('Z'));
    let key_mode = std::fs::metadata(out_dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let svid_pem = std::fs::read_to_string(out_dir.join("svid.pem")).unwrap();
    assert!(svid_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let bundle_pem = std::fs::read_to_string(out_dir.join("bundle.pem")).unwrap();
    assert!(bundle_pem.contains("BEGIN CERTIFICATE"));
    assert!(std::fs::read_to_string(out_dir.join("key.pem"))
        .unwrap()
        .contains("BEGIN PRIVATE KEY"));

    let listed = json(mayfly(&[
        "task",
        "list",
        "--admin-socket",
        admin_s,
        "--output",
        "json",
    ]));
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // A watch sees the SVID, then ends with "no identity issued" once the lease is revoked.
    let mut watch = mayfly_command(&["svid", "watch", "--socket", sock_s, "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first_line = String::new();
    {
        use std::io::BufRead;
        let stdout = watch.stdout.as_mut().unwrap();
        std::io::BufReader::new(stdout)
            .read_line(&mut first_line)
            .unwrap();
    }
    let update: serde_json::Value = serde_json::from_str(&first_line).unwrap();
    assert_eq!(update["svids"][0]["spiffe_id"], granted["spiffe_id"]);
    assert!(update["svids"][0]["not_after"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let revoked = json(mayfly(&[
        "task",
        "revoke",
        &lease_id,
        "--reason",
        "key leaked",
        "--admin-socket",
        admin_s,
        "--output",
        "json",
    ]));
    assert_eq!(revoked["state"], "revoked");
    assert_eq!(revoked["end_reason"], "key leaked");
    let out = watch.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no identity issued"));

    let err = mayfly(&["svid", "fetch", "--socket", sock_s]);
    assert!(!err.status.success());
    let all = json(mayfly(&[
        "task",
        "list",
        "--all",
        "--admin-socket",
        admin_s,
        "--output",
        "json",
    ]));
    assert_eq!(all[0]["state"], "revoked");
    // Text output shows how the lease ended, and columns hold for long task IDs.
    let got = ok(mayfly(&[
        "task",
        "get",
        &lease_id,
        "--admin-socket",
        admin_s,
    ]));
    assert!(
        got.contains("ended_at") && got.contains("ended_by"),
        "{got}"
    );
    assert!(
        got.lines()
            .any(|l| l.starts_with("end_reason") && l.ends_with(" key leaked")),
        "{got}"
    );
    let long = "a-task-id-much-longer-than-twenty-characters";
    ok(mayfly(&[
        "task",
        "grant",
        "--task-id",
        long,
        "--delegator",
        "user/bob",
        "--agent",
        "writer",
        "--ttl",
        "10m",
        "--selector",
        &selector,
        "--admin-socket",
        admin_s,
    ]));
    let table = ok(mayfly(&[
        "task",
        "list",
        "--all",
        "--admin-socket",
        admin_s,
    ]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains("ENDED"), "{table}");
    let col = |line: &str, word: &str| line.find(word).unwrap();
    let spiffe_col = col(lines[0], "SPIFFE ID");
    for line in &lines[1..] {
        assert_eq!(col(line, "spiffe://"), spiffe_col, "{table}");
    }
    assert!(table.contains(long), "{table}");

    let bad = mayfly(&[
        "task",
        "grant",
        "--task-id",
        "has space",
        "--delegator",
        "x",
        "--agent",
        "a",
        "--ttl",
        "1m",
        "--selector",
        &selector,
        "--admin-socket",
        admin_s,
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("task_id"));
}

/// A fresh user environment for `uid`: its own runtime dir and home, both under `dir`.
fn user_env(dir: &Path, uid: u32) -> (PathBuf, PathBuf) {
    let runtime = dir.join(format!("run-{uid}"));
    let home = dir.join(format!("home-{uid}"));
    for d in [&runtime, &home] {
        std::fs::create_dir(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        rustix::fs::chown(
            d,
            Some(rustix::process::Uid::from_raw(uid)),
            Some(rustix::process::Gid::from_raw(uid)),
        )
        .unwrap();
    }
    (runtime, home)
}

/// `mayfly ARGS` as `uid` in its own user environment, environment otherwise empty.
fn as_user(uid: u32, runtime: &Path, home: &Path, args: &[&str]) -> Command {
    let mut c = as_uid(uid);
    c.args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("XDG_RUNTIME_DIR", runtime);
    c
}

/// Two users each run `mayfly agent` with no flags, at once, beside whatever agent (root's, on
/// its defaults) already runs here: both start, each prints where it is, and each user's
/// `mayfly healthcheck` hears its own agent.
#[test]
fn agent_starts_on_embedded_defaults_for_any_user() {
    if my_uid() != 0 {
        eprintln!("skipping: needs root to run the agent as other users with setpriv");
        return;
    }
    let dir = shared_tempdir();
    let mut agents = Vec::new();
    for uid in [65534, 65533] {
        let (runtime, home) = user_env(dir.path(), uid);
        let stderr = std::fs::File::create(dir.path().join(format!("agent-{uid}.log"))).unwrap();
        let child = as_user(uid, &runtime, &home, &["agent"])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        agents.push((uid, Running(child), runtime, home));
    }
    for (uid, agent, runtime, home) in &mut agents {
        // The agent prints where it listens once it is serving; read until the last such line.
        let mut printed = String::new();
        {
            use std::io::BufRead;
            let stdout = agent.0.stdout.take().unwrap();
            for line in std::io::BufReader::new(stdout).lines() {
                let line = line.unwrap();
                printed.push_str(&line);
                printed.push('\n');
                if line.contains("health") {
                    break;
                }
            }
        }
        let log = std::fs::read_to_string(dir.path().join(format!("agent-{uid}.log"))).unwrap();
        let socket = runtime.join("mayfly/workload.sock");
        assert!(
            printed.contains(socket.to_str().unwrap()),
            "uid {uid} printed:\n{printed}\nlogged:\n{log}"
        );
        assert!(printed.contains("admin.sock"), "{printed}");
        assert!(printed.contains("health.sock"), "{printed}");
        assert!(socket.exists());
        assert!(runtime.join("mayfly/admin.sock").exists());
        assert!(home
            .join(".local/share/mayfly/ca/authorities.json")
            .exists());
        let check = as_user(*uid, runtime, home, &["healthcheck"])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "uid {uid}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    // A user without an agent hears nobody else's.
    let (runtime, home) = user_env(dir.path(), 65532);
    let lonely = as_user(65532, &runtime, &home, &["healthcheck"])
        .output()
        .unwrap();
    assert!(!lonely.status.success());
    assert!(
        String::from_utf8_lossy(&lonely.stderr).contains("health.sock"),
        "{}",
        String::from_utf8_lossy(&lonely.stderr)
    );
}

/// A health port another process holds fails start-up with a message naming the flag.
#[test]
fn a_taken_health_port_names_the_flag_to_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = AgentPaths::in_dir(dir.path())
        .agent()
        .args(["--health-addr", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr) && err.contains("--health-addr"),
        "{err}"
    );
}

/// Issue 14, hole 8: a data dir anyone could write was used as it was; another user swapped
/// in their own CA and audit log.
#[test]
fn a_data_dir_others_can_write_stops_start_up() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let paths = AgentPaths::in_dir(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = paths
        .agent()
        .args(["--health-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&data.display().to_string()) && err.contains("chmod go-w"),
        "{err}"
    );
    assert!(!data.join("ca").exists(), "nothing was written into it");
}

#[test]
fn sigterm_stops_the_agent_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let paths = AgentPaths::in_dir(dir.path());
    let mut agent = paths
        .agent()
        .args(["--health-addr", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for(&paths.admin_socket);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = agent.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        !paths.socket.exists() && !paths.admin_socket.exists(),
        "sockets left behind"
    );
    // Logs into a file carry no colour codes, and no Rust debug rendering of options.
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(log.contains("mayfly agent ready"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in a file:\n{log}");
    assert!(!log.contains("Some("), "{log}");
    ok(mayfly(&[
        "audit",
        "verify",
        "--data-dir",
        paths.data.to_str().unwrap(),
    ]));
}

/// What a user reads says each thing once: no cause repeated, no Rust debug rendering.
#[test]
fn errors_say_each_thing_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-agent.sock");
    for args in [
        vec!["task", "list", "--admin-socket", missing.to_str().unwrap()],
        vec!["svid", "fetch", "--socket", missing.to_str().unwrap()],
    ] {
        let out = mayfly(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
        assert!(!err.contains("Some("), "{err}");
    }
    // A directory the user cannot read is named as such, not as a missing log.
    if my_uid() == 0 {
        let data = dir.path().join("private");
        std::fs::create_dir_all(data.join("audit")).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let out = as_uid(65534)
            .args(["audit", "verify", "--data-dir", data.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Permission denied"), "{err}");
        assert!(!err.contains("no audit log"), "{err}");
    } else {
        eprintln!("skipping the unreadable-directory check: needs root to switch users");
    }
}

/// Logs are coloured for a person at a terminal, and not when NO_COLOR is set. (`script`,
/// from util-linux, gives the agent a terminal.)
#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    for (no_color, want_colour) in [(None, true), (Some("1"), false)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let agent = format!(
            "timeout -s INT 2 {BIN} agent --socket {d}/w.sock --admin-socket {d}/a.sock \
             --data-dir {d}/data --health-addr 127.0.0.1:0"
        );
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &agent, "/dev/null"])
            .env_remove("NO_COLOR");
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("mayfly agent ready"), "{text}");
        assert_eq!(
            text.contains("\x1b["),
            want_colour,
            "NO_COLOR={no_color:?}:\n{text}"
        );
    }
}
