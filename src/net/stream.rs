//! The one connection type under client sessions, logins, the admin console and server
//! connections: TCP, a Unix socket, or TLS over TCP. Nothing outside this module reads a
//! raw file descriptor; readiness, non-blocking receives and peeks go through here, so
//! they mean the same on a TLS stream (where a record is not a message) as on a plain one.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, CancelHandle, CancelableAsyncReadRent, OwnedReadHalf, OwnedWriteHalf, Split,
};
use monoio::net::{TcpStream, UnixStream};
use monoio::BufResult;

use super::tls_stream::{TlsParts, TlsStream};
use super::Peer;

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Boxed: the TLS state is large, and plain streams should stay small.
    Tls(Box<TlsStream>),
}

// SAFETY: as for monoio's TcpStream: a read and a write may run at the same time on one
// stream through the split halves. Plain streams keep no state of their own; a TLS
// stream's read and write sides keep separate buffers and touch the shared rustls state
// only in synchronous steps (see tls_stream.rs).
unsafe impl Split for Stream {}

pub type StreamRd = OwnedReadHalf<Stream>;
pub type StreamWr = OwnedWriteHalf<Stream>;

/// A connection in transit between workers.
pub enum StreamParts {
    Tcp(OwnedFd),
    Unix(OwnedFd),
    Tls(Box<TlsParts>),
}

impl Stream {
    pub fn kind(&self) -> &'static str {
        match self {
            Stream::Tcp(_) => "tcp",
            Stream::Unix(_) => "unix",
            Stream::Tls(_) => "tls",
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    pub fn tls(&self) -> Option<&TlsStream> {
        match self {
            Stream::Tls(t) => Some(t),
            _ => None,
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.raw_fd(),
        }
    }

    /// The local end, for SHOW CLIENTS/SERVERS; None on Unix sockets.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Stream::Tcp(s) => s.local_addr().ok(),
            Stream::Unix(_) => None,
            Stream::Tls(s) => s.tcp().local_addr().ok(),
        }
    }

    pub fn set_nodelay(&self) {
        match self {
            Stream::Tcp(s) => {
                let _ = s.set_nodelay(true);
            }
            Stream::Tls(s) => {
                let _ = s.tcp().set_nodelay(true);
            }
            Stream::Unix(_) => {}
        }
    }

    /// Waits until a read would not block. Takes nothing from the stream, so dropping
    /// the wait loses nothing. On TLS, buffered plaintext or ciphertext counts as ready.
    pub async fn readable(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable(false).await,
            Stream::Unix(s) => s.readable(false).await,
            Stream::Tls(s) => {
                if s.has_buffered() {
                    return Ok(());
                }
                // Waiting means idle: the TLS buffers go until there is something to read.
                s.release_buffers();
                s.readable(false).await
            }
        }
    }

    /// A non-blocking receive into the spare capacity of `v`: Some(n) bytes, Some(0)
    /// when the peer closed (or the stream failed), None when there was nothing after
    /// all.
    pub fn try_recv(&mut self, v: &mut Vec<u8>) -> Option<usize> {
        match self {
            Stream::Tls(s) => s.try_recv(v),
            _ => recv_now(self.raw_fd(), v),
        }
    }

    /// Whether the peer sent something (Some(true)), closed (Some(false)), or neither
    /// (None), without taking anything.
    pub fn peek(&mut self) -> Option<bool> {
        match self {
            Stream::Tls(s) => s.peek(),
            _ => peek_fd(self.raw_fd()),
        }
    }

    /// Takes the connection out of this worker's runtime. Only for connections with no
    /// operation in flight.
    pub fn detach(self) -> StreamParts {
        match self {
            Stream::Tcp(s) => StreamParts::Tcp(owned(s.into_raw_fd())),
            Stream::Unix(s) => StreamParts::Unix(owned(s.into_raw_fd())),
            Stream::Tls(s) => StreamParts::Tls(Box::new(s.detach())),
        }
    }

    pub fn adopt(parts: StreamParts) -> std::io::Result<Stream> {
        match parts {
            StreamParts::Tcp(fd) => {
                let s = std::net::TcpStream::from(fd);
                s.set_nonblocking(true)?;
                Ok(Stream::Tcp(TcpStream::from_std(s)?))
            }
            StreamParts::Unix(fd) => {
                let s = std::os::unix::net::UnixStream::from(fd);
                s.set_nonblocking(true)?;
                Ok(Stream::Unix(UnixStream::from_std(s)?))
            }
            StreamParts::Tls(p) => Ok(Stream::Tls(Box::new(TlsStream::adopt(*p)?))),
        }
    }

    /// The peer of a Unix-socket client: the connecting process's pid, when the kernel
    /// says.
    pub fn unix_peer(&self) -> Peer {
        match self {
            Stream::Unix(s) => Peer::Unix(s.peer_cred().ok().and_then(|c| c.pid()).map(|p| p as u32)),
            _ => Peer::Unix(None),
        }
    }

    /// The user id of a Unix-socket client's process, when the kernel says.
    pub fn unix_uid(&self) -> Option<u32> {
        match self {
            Stream::Unix(s) => s.peer_cred().ok().map(|c| c.uid()),
            _ => None,
        }
    }
}

fn owned(raw: RawFd) -> OwnedFd {
    // SAFETY: into_raw_fd hands over sole ownership of a valid, open descriptor.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// A shared view of the stream behind a read half, for readiness and peeks. Callers hold
/// the half and run no read on it meanwhile.
#[allow(clippy::mut_from_ref)]
pub fn stream_of(rd: &StreamRd) -> &mut Stream {
    // SAFETY: the half owns a reference-counted cell with the stream; pgsilo calls this
    // only while no read runs on that half (an idle client, an idle server, a client
    // waiting for a server), and single-threaded, so nothing else borrows the read side.
    unsafe { &mut *rd.0.get() }
}

/// A non-blocking recv into the spare capacity of `v`.
pub(super) fn recv_now(fd: RawFd, v: &mut Vec<u8>) -> Option<usize> {
    let len = v.len();
    let spare = v.capacity() - len;
    // SAFETY: recv writes at most `spare` bytes into the vector's spare capacity, and
    // set_len covers exactly the bytes it wrote.
    let n = unsafe {
        let n = libc::recv(fd, v.as_mut_ptr().add(len).cast(), spare, libc::MSG_DONTWAIT);
        if n > 0 {
            v.set_len(len + n as usize);
        }
        n
    };
    match n {
        n if n > 0 => Some(n as usize),
        0 => Some(0),
        _ => {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                None
            } else {
                Some(0)
            }
        }
    }
}

/// A one-byte MSG_PEEK: data (Some(true)), closed or failed (Some(false)), nothing (None).
pub(super) fn peek_fd(fd: RawFd) -> Option<bool> {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a valid local.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        n if n > 0 => Some(true),
        0 => Some(false),
        _ => {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                None
            } else {
                Some(false)
            }
        }
    }
}

/// pgsilo never reads vectored; a TLS stream has no use for it.
fn no_vectored_tls() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Unsupported, "vectored read on TLS")
}

impl AsyncReadRent for Stream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Tcp(s) => s.read(buf).await,
            Stream::Unix(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Tcp(s) => s.readv(buf).await,
            Stream::Unix(s) => s.readv(buf).await,
            Stream::Tls(_) => (Err(no_vectored_tls()), buf),
        }
    }
}

impl CancelableAsyncReadRent for Stream {
    async fn cancelable_read<T: IoBufMut>(&mut self, buf: T, c: CancelHandle) -> BufResult<usize, T> {
        match self {
            Stream::Tcp(s) => s.cancelable_read(buf, c).await,
            Stream::Unix(s) => s.cancelable_read(buf, c).await,
            Stream::Tls(s) => s.cancelable_read(buf, c).await,
        }
    }

    async fn cancelable_readv<T: IoVecBufMut>(&mut self, buf: T, c: CancelHandle) -> BufResult<usize, T> {
        match self {
            Stream::Tcp(s) => s.cancelable_readv(buf, c).await,
            Stream::Unix(s) => s.cancelable_readv(buf, c).await,
            Stream::Tls(_) => (Err(no_vectored_tls()), buf),
        }
    }
}

impl AsyncWriteRent for Stream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Tcp(s) => s.write(buf).await,
            Stream::Unix(s) => s.write(buf).await,
            Stream::Tls(s) => s.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Tcp(s) => s.writev(buf).await,
            Stream::Unix(s) => s.writev(buf).await,
            Stream::Tls(s) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    // Not an async fn: a write half's drop runs only the part before the first await,
    // so the whole shutdown happens synchronously, before the future is returned.
    #[allow(clippy::manual_async_fn)]
    fn shutdown(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> {
        let res = match self {
            Stream::Tls(s) => s.shutdown_now(),
            _ => {
                // SAFETY: shutdown on a descriptor the stream owns.
                match unsafe { libc::shutdown(self.raw_fd(), libc::SHUT_WR) } {
                    -1 => Err(std::io::Error::last_os_error()),
                    _ => Ok(()),
                }
            }
        };
        async move { res }
    }
}
