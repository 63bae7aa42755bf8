//! Who wrote the bytes a client sends. With `SO_PASSCRED` on the listening socket (accepted
//! sockets inherit it) the kernel tags every chunk it queues with the writing process's pid,
//! even chunks sent before `accept`, and never hands out the chunks of two writers in one read.
//!
//! A connection stands for the process that connected (`SO_PEERCRED`), and that is the process
//! attested. A process can connect, fork, and have the parent `exec` another binary while the
//! child keeps using the socket; or pass the socket to another process. Bytes from any process
//! but the connecting one therefore close the connection: what is attested is always who is
//! asking.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};

/// Asks the kernel to tag what clients of `listener` send with their credentials.
pub fn tag_writers(listener: &tokio::net::UnixListener) -> io::Result<()> {
    setsockopt(listener, sockopt::PassCred, &true).map_err(io::Error::from)
}

/// Reads what is there into `buf` (never blocks: `WouldBlock` when nothing is), with the pid
/// of the process that wrote it (`None`: the kernel did not say).
pub fn recv_tagged(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<i32>)> {
    // Room for the credentials and nothing else: file descriptors a client tries to pass
    // do not fit, so the kernel closes them instead of installing them here.
    let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut pid = None;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmCredentials(creds) = cmsg {
            pid = Some(creds.pid());
        }
    }
    Ok((msg.bytes, pid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::{AsFd, OwnedFd};

    #[tokio::test]
    async fn every_chunk_names_its_writer_even_before_accept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tag_writers(&listener).unwrap();
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        client.write_all(b"early").unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // A child writing on the socket it inherited (as its stdout).
        let inherited = OwnedFd::from(client.try_clone().unwrap());
        let status = std::process::Command::new("sh")
            .args(["-c", "printf child"])
            .stdout(std::process::Stdio::from(inherited))
            .status()
            .unwrap();
        assert!(status.success());
        let mut buf = [0u8; 64];
        server.readable().await.unwrap();
        let (n, pid) = recv_tagged(server.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"early");
        assert_eq!(pid, Some(std::process::id() as i32));
        server.readable().await.unwrap();
        let (n, pid) = recv_tagged(server.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"child");
        assert!(
            pid.is_some_and(|p| p != std::process::id() as i32),
            "{pid:?}"
        );
    }
}
