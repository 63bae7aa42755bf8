//! Unix socket listeners for both servers: binding (stale sockets, modes), and accepted
//! connections that carry the peer's kernel facts captured at accept time and hand h2 the
//! client's bytes with `:authority` removed (see `authority`).

pub mod authority;
pub mod hpack;
pub(crate) mod huffman;

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

use crate::attest::PeerInfo;
use authority::Rewriter;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("creating socket directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("another agent is already listening on {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket directory {path} is {problem}; refusing to listen there")]
    UnsafeDir { path: PathBuf, problem: String },
    #[error("binding {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}

/// Binds a Unix socket at `path` with permission bits `mode`. A stale socket left by a dead
/// agent is replaced; a live one is an error, and so is any other file in the way.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|source| BindError::Dir {
                path: dir.to_owned(),
                source,
            })?;
            // Other users must be able to reach the workload socket inside it.
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
        check_dir(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => return Err(BindError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| BindError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        BindError::Bind {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Whoever controls the socket's directory can swap our socket for theirs and impersonate the
/// agent, so the directory must belong to us or root and be writable by nobody else (a sticky
/// directory such as /tmp is fine: others cannot remove our entries there).
fn check_dir(dir: &Path) -> Result<(), BindError> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_dir = |problem: String| BindError::UnsafeDir {
        path: dir.to_owned(),
        problem,
    };
    let meta = std::fs::metadata(dir).map_err(|source| BindError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(unsafe_dir(format!("owned by uid {}", meta.uid())));
    }
    let sticky = meta.mode() & 0o1000 != 0;
    if meta.mode() & 0o022 != 0 && !sticky {
        return Err(unsafe_dir(format!(
            "writable by other users (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// An accepted connection plus its peer's kernel facts, handed to tonic; the facts reach each
/// request as the `PeerInfo` extension. Reads go through the authority rewriter.
pub struct PeerStream {
    io: UnixStream,
    peer: PeerInfo,
    rewriter: Rewriter,
    /// Rewritten bytes h2 has not read yet, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
}

impl PeerStream {
    /// The error that ends a connection whose client sent what the rewriter refuses.
    fn malformed(&self, e: authority::RewriteError) -> io::Error {
        tracing::warn!(
            pid = self.peer.pid(),
            uid = self.peer.uid(),
            error = %e,
            "closing connection: malformed HTTP/2 from the client"
        );
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    pub fn new(io: UnixStream, peer: PeerInfo) -> PeerStream {
        PeerStream {
            io,
            peer,
            rewriter: Rewriter::default(),
            out: Vec::new(),
            out_pos: 0,
        }
    }
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out_pos = 0;
                    // Idle connections are many: keep no large buffer between requests.
                    if this.out.capacity() > 4 * 1024 {
                        this.out = Vec::new();
                    } else {
                        this.out.clear();
                    }
                }
                return Poll::Ready(Ok(()));
            }
            // Input the rewriter set aside (its output per call is bounded) comes first.
            if this.rewriter.has_backlog() {
                if let Err(e) = this.rewriter.resume(&mut this.out) {
                    return Poll::Ready(Err(this.malformed(e)));
                }
                continue;
            }
            // Read straight into h2's buffer; what passes through unchanged stays there.
            let start = buf.filled().len();
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            let read = buf.filled().len() - start;
            if read == 0 {
                return Poll::Ready(Ok(()));
            }
            let kept = this.rewriter.verbatim_prefix(read);
            this.rewriter.pass(kept);
            if kept == read {
                return Poll::Ready(Ok(()));
            }
            let rest = start + kept;
            let r = this.rewriter.feed(&buf.filled()[rest..], &mut this.out);
            buf.set_filled(rest);
            if let Err(e) = r {
                return Poll::Ready(Err(this.malformed(e)));
            }
            if kept > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepted connections with their peers' facts. Accept errors (say, out of file descriptors)
/// are logged and skipped after a short pause, so they never end the server.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<PeerStream>> {
    futures::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((io, _)) => {
                    let peer = PeerInfo::from_unix_stream(&io);
                    return Some((Ok(PeerStream::new(io, peer)), listener));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
}
