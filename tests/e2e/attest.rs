//! Attestation of a real socket peer that is dead by the time we look at it.

use mayfly::attest::{AttestError, Attestor, PeerInfo};

use std::time::Duration;

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

/// The bytes a gRPC client (tonic) writes for one `FetchX509SVID` call: preface, settings,
/// headers and the request, captured from an in-memory pipe.
async fn fetch_request_bytes() -> Vec<u8> {
    use mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use tokio::io::AsyncReadExt;
    let (client, mut server) = tokio::io::duplex(64 * 1024);
    let client = std::sync::Mutex::new(Some(client));
    let channel = tonic::transport::Endpoint::from_static("http://mayfly.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let io = client.lock().unwrap().take();
            async move {
                io.map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("connected once"))
            }
        }))
        .await
        .unwrap();
    let call = tokio::spawn(async move {
        let mut request = tonic::Request::new(mayfly::proto::workload::X509svidRequest {});
        request
            .metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        let _ = SpiffeWorkloadApiClient::new(channel)
            .fetch_x509svid(request)
            .await;
    });
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(300), server.read(&mut buf)).await
    {
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    call.abort();
    bytes
}

/// Issue 14, hole 7, as the attack was run: a process connects, and another process it
/// shares the socket with (a child that inherited it after a fork, while the parent runs the
/// legitimate binary) sends the requests. The agent attested the connecting process and
/// served the other one its identity. Here the test process (the binary the lease names)
/// connects, and a child writes a real client's `FetchX509SVID` call on the inherited socket.
#[tokio::test]
async fn requests_written_by_another_process_than_the_connecting_one_are_refused() {
    use std::io::Read;
    use std::os::fd::OwnedFd;
    let t = start().await;
    let me = std::fs::read_link("/proc/self/exe").unwrap();
    let lease = t
        .grant(
            "exe-bound",
            &[
                format!("unix:uid:{}", my_uid()),
                format!("unix:path:{}", me.display()),
            ],
            HOUR,
            None,
        )
        .await;
    // The connecting process itself is served (the control).
    let ctx = t.workload().await.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.svids()[0].spiffe_id().to_string(), lease.spiffe_id);

    let request = fetch_request_bytes().await;
    assert!(
        request.starts_with(b"PRI * HTTP/2.0"),
        "not an HTTP/2 client"
    );
    let socket = std::os::unix::net::UnixStream::connect(&t.socket).unwrap();
    let file = t.dir.path().join("request.bin");
    std::fs::write(&file, &request).unwrap();
    let child = tokio::process::Command::new("cat")
        .arg(&file)
        .stdout(std::process::Stdio::from(OwnedFd::from(
            socket.try_clone().unwrap(),
        )))
        .status()
        .await
        .unwrap();
    assert!(child.success());
    // What the agent answers on the socket (read off the runtime the agent runs on).
    let answer = tokio::task::spawn_blocking(move || {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let mut socket = socket;
        while let Ok(n) = socket.read(&mut buf) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        answer
    })
    .await
    .unwrap();
    let id = lease.spiffe_id.as_bytes();
    assert!(
        !answer.windows(id.len()).any(|w| w == id),
        "the SVID went to a process that did not connect"
    );
}
