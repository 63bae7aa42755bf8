//! Unix socket listeners for both servers: binding (stale sockets, modes), and accepted
//! connections that carry the peer's kernel facts captured at accept time and hand h2 the
//! client's bytes with `:authority` removed (see `authority`).

pub mod authority;
pub mod hpack;
pub(crate) mod huffman;
pub mod limits;
mod writer;

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

use crate::attest::PeerInfo;
use crate::telemetry::RefusedLabel;
use authority::Rewriter;
use limits::{ConnGuard, ConnLimits};

/// The client preface and the frame header of the SETTINGS frame that must follow it: once
/// these have arrived, the handshake timeout no longer applies.
const HANDSHAKE_BYTES: usize = 24 + 9;

/// The most one read from a client takes. A Workload API or SDS request (headers, a DATA
/// frame, a WINDOW_UPDATE) is a few hundred bytes; this bounds the zeroing each read needs.
const RECV_CHUNK: usize = 2048;

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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .and_then(|()| writer::tag_writers(&listener))
        .map_err(|source| BindError::Bind {
            path: path.to_owned(),
            source,
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
    /// Until the client has sent its preface: when it must have (a connection that sends half
    /// a preface and waits must not hold a descriptor for ever).
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
    received: usize,
    /// This connection's place under its socket's caps.
    _place: Option<ConnGuard>,
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
            handshake: None,
            received: 0,
            _place: None,
        }
    }
}

impl PeerStream {
    /// Reads what the client sent into `buf`, refusing bytes that another process than the
    /// one that connected wrote (see [`writer`]).
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.io.poll_read_ready(cx))?;
            // `recv_tagged` needs initialised memory, and the caller's buffer is fresh on
            // every call (h2 hands over its spare 8 KiB+ each time): zero only what a request
            // usually needs. A longer message is read on the next call.
            let unfilled = buf.initialize_unfilled_to(buf.remaining().min(RECV_CHUNK));
            let io = &self.io;
            match io.try_io(tokio::io::Interest::READABLE, || {
                writer::recv_tagged(io.as_fd(), unfilled)
            }) {
                Ok((0, _)) => return Poll::Ready(Ok(0)),
                Ok((n, writer)) => {
                    let connected = self.peer.pid();
                    if writer.is_none() || writer != connected {
                        tracing::warn!(
                            event = "connection_used_by_another_process",
                            pid = connected,
                            uid = self.peer.uid(),
                            writer,
                            "closing connection: bytes from a process other than the one that connected"
                        );
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            "bytes from a process other than the one that connected",
                        )));
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
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
            if let Some(deadline) = &mut this.handshake {
                if deadline.as_mut().poll(cx).is_ready() {
                    tracing::warn!(
                        pid = this.peer.pid(),
                        uid = this.peer.uid(),
                        "closing connection: no HTTP/2 preface in time"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface in time",
                    )));
                }
            }
            // Read straight into h2's buffer; what passes through unchanged stays there.
            let start = buf.filled().len();
            let read = std::task::ready!(this.poll_recv(cx, buf))?;
            this.received += read;
            if this.received >= HANDSHAKE_BYTES {
                this.handshake = None;
            }
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

/// What a listener admits: its caps, and how long a client has to send its preface.
#[derive(Clone, Debug)]
pub struct Admission {
    /// The socket, for the metric and the log.
    pub name: &'static str,
    pub limits: Arc<ConnLimits>,
    pub handshake_timeout: Duration,
    /// Counts connections closed at accept, by reason.
    pub refused: Family<RefusedLabel, Counter>,
}

/// Accepted connections with their peers' facts, within `admission`'s caps: a connection over
/// them is closed at once. Accept errors (say, out of file descriptors) are logged and
/// skipped after a short pause, so they never end the server.
pub fn incoming(
    listener: UnixListener,
    admission: Admission,
) -> impl Stream<Item = io::Result<PeerStream>> {
    futures::stream::unfold(
        (listener, admission, None::<Instant>),
        |(listener, admission, mut warned)| async move {
            loop {
                match listener.accept().await {
                    Ok((io, _)) => {
                        let peer = PeerInfo::from_unix_stream(&io);
                        let place = match admission.limits.admit(peer.uid()) {
                            Ok(place) => place,
                            Err(refusal) => {
                                admission
                                    .refused
                                    .get_or_create(&RefusedLabel {
                                        socket: admission.name.to_owned(),
                                        reason: refusal.as_str().to_owned(),
                                    })
                                    .inc();
                                // One line a second at most: a flood must not flood the log.
                                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                                    warned = Some(Instant::now());
                                    tracing::warn!(
                                        event = "connection_refused",
                                        socket = admission.name,
                                        uid = peer.uid(),
                                        pid = peer.pid(),
                                        reason = refusal.as_str(),
                                        "closing a new connection: over the connection caps"
                                    );
                                }
                                continue;
                            }
                        };
                        let mut stream = PeerStream::new(io, peer);
                        stream.handshake =
                            Some(Box::pin(tokio::time::sleep(admission.handshake_timeout)));
                        stream._place = Some(place);
                        return Some((Ok(stream), (listener, admission, warned)));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        },
    )
}
