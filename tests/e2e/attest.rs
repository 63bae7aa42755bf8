//! Attestation of a real socket peer that is dead by the time we look at it.

use mayfly::attest::{AttestError, Attestor, PeerInfo};

use crate::common::*;

#[tokio::test]
async fn a_peer_that_exited_before_accept_is_not_attested() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // Any client will do: it connects (the kernel queues the connection), then we kill it.
    let mut client = tokio::process::Command::new(BIN)
        .args(["svid", "fetch", "--socket", path.to_str().unwrap()])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The listener turns readable once the connection is queued; we do not accept it yet.
    let mut fds = [rustix::event::PollFd::new(
        &listener,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 10,
        tv_nsec: 0,
    };
    let ready = rustix::event::poll(&mut fds, Some(&timeout)).unwrap();
    assert_eq!(ready, 1, "client never connected");
    client.kill().await.unwrap();

    let (stream, _) = listener.accept().unwrap();
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(stream).unwrap();
    let peer = PeerInfo::from_unix_stream(&stream);
    let attestor = Attestor::new(1 << 30);
    match attestor.attest(&peer) {
        Err(AttestError::ProcessGone) | Err(AttestError::Unprovable(_)) => {}
        other => panic!("a dead peer must not be attested, got {other:?}"),
    }
}

#[tokio::test]
async fn a_live_peer_is_attested_from_kernel_facts() {
    let (a, _b) = tokio::net::UnixStream::pair().unwrap();
    let peer = PeerInfo::from_unix_stream(&a);
    let att = Attestor::new(1 << 30).attest(&peer).unwrap();
    assert_eq!(att.pid, std::process::id() as i32);
    assert!(att.selectors.contains(&format!("unix:uid:{}", my_uid())));
    assert!(att
        .selectors
        .iter()
        .any(|s| s.starts_with(&format!("unix:pid:{}:", att.pid))));
}
