//! TLS over a monoio TCP stream, with rustls doing the cryptography on buffers pgsilo
//! owns: ciphertext comes in through one owned buffer and goes out through another;
//! plaintext is copied once between rustls and the caller's buffer.
//!
//! A session reads and writes a connection at the same time (monoio's split halves share
//! one stream), so the read side and the write side keep separate buffers and touch the
//! rustls state only between awaits, never across one: each operation is a short
//! synchronous step on the connection, then socket I/O on its own buffer.

use std::io::{BufRead, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent};
use monoio::net::TcpStream;
use monoio::BufResult;

/// Ciphertext read per system call: several TLS records (16 KiB of plaintext each at
/// most) so a large result crosses in few reads.
const CIPHER_READ: usize = 64 * 1024;

pub struct TlsStream {
    tcp: TcpStream,
    conn: rustls::Connection,
    /// Ciphertext read from the socket and not yet handed to rustls (`rd[rpos..]`).
    rd: Vec<u8>,
    rpos: usize,
    /// The peer closed the TCP stream.
    eof: bool,
    /// Ciphertext on its way out; kept allocated between writes.
    wr: Vec<u8>,
}

/// A TLS connection taken out of its runtime to move to another worker: the socket and
/// the session's keys and buffered data, which travel together.
pub struct TlsParts {
    fd: OwnedFd,
    conn: rustls::Connection,
    rd: Vec<u8>,
    rpos: usize,
}

fn tls_error(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Runs the handshake on `tcp`. `early` is ciphertext already read from the socket
    /// (the first bytes of a direct-TLS ClientHello).
    pub async fn handshake(tcp: TcpStream, conn: rustls::Connection, early: &[u8]) -> std::io::Result<TlsStream> {
        let mut s = TlsStream {
            tcp,
            conn,
            rd: Vec::with_capacity(CIPHER_READ.max(early.len())),
            rpos: 0,
            eof: false,
            wr: Vec::new(),
        };
        s.rd.extend_from_slice(early);
        // No plaintext may be buffered behind the handshake: the write side of a
        // finished handshake sends at once.
        s.conn.set_buffer_limit(None);
        loop {
            s.flush_tls().await?;
            if !s.conn.is_handshaking() {
                break;
            }
            if !s.feed_pending()? {
                if s.eof {
                    return Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "connection closed during the TLS handshake",
                    ));
                }
                s.fill(None).await?;
            }
        }
        s.wr = Vec::new();
        Ok(s)
    }

    pub fn connection(&self) -> &rustls::Connection {
        &self.conn
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }

    /// Hands whatever ciphertext is buffered to rustls. True if it took any. An error
    /// from rustls (a bad record, an alert) leaves an alert to send; the next flush
    /// sends it.
    fn feed_pending(&mut self) -> std::io::Result<bool> {
        if self.rpos >= self.rd.len() {
            return Ok(false);
        }
        let mut slice = &self.rd[self.rpos..];
        let taken = self.conn.read_tls(&mut slice)?;
        self.rpos += taken;
        if self.rpos >= self.rd.len() {
            self.rd.clear();
            self.rpos = 0;
        }
        self.conn.process_new_packets().map_err(tls_error)?;
        Ok(taken > 0)
    }

    /// Reads more ciphertext from the socket (only called with none buffered). With a
    /// cancel handle the socket wait can be called off; whatever it took stays buffered.
    async fn fill(&mut self, cancel: Option<&CancelHandle>) -> std::io::Result<()> {
        let mut v = std::mem::take(&mut self.rd);
        v.clear();
        self.rpos = 0;
        if v.capacity() < CIPHER_READ {
            v.reserve(CIPHER_READ);
        }
        let (res, v) = match cancel {
            Some(c) => self.tcp.cancelable_read(v, c.clone()).await,
            None => self.tcp.read(v).await,
        };
        self.rd = v;
        self.take_read(res)
    }

    fn take_read(&mut self, res: std::io::Result<usize>) -> std::io::Result<()> {
        match res {
            Ok(0) => {
                self.eof = true;
                // Tells rustls the stream ended, so a missing close_notify shows.
                let _ = self.conn.read_tls(&mut &[][..]);
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sends every TLS record rustls has ready (handshake messages, encrypted data,
    /// alerts, key updates).
    async fn flush_tls(&mut self) -> std::io::Result<()> {
        while self.conn.wants_write() {
            let mut out = std::mem::take(&mut self.wr);
            out.clear();
            while self.conn.wants_write() {
                self.conn.write_tls(&mut out)?;
            }
            let (res, back) = self.tcp.write_all(out).await;
            self.wr = back;
            res?;
        }
        Ok(())
    }

    /// Copies buffered plaintext into `buf`: Some(n) with n > 0 when there was some,
    /// Some(0) at a clean end of the stream, None when more ciphertext is needed.
    fn take_plaintext<T: IoBufMut>(&mut self, buf: &mut T) -> std::io::Result<Option<usize>> {
        let want = buf.bytes_total();
        let mut reader = self.conn.reader();
        match reader.fill_buf() {
            Ok([]) => Ok(Some(0)),
            Ok(chunk) => {
                let n = chunk.len().min(want);
                // SAFETY: `buf` has room for `bytes_total()` bytes at `write_ptr()`; n is
                // at most that, and set_init covers exactly what was written.
                unsafe {
                    std::ptr::copy_nonoverlapping(chunk.as_ptr(), buf.write_ptr(), n);
                    buf.set_init(n);
                }
                reader.consume(n);
                Ok(Some(n))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            // The peer closed without close_notify: PostgreSQL clients do that after a
            // Terminate, so it is an ordinary end of the stream.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(Some(0)),
            Err(e) => Err(e),
        }
    }

    /// True when plaintext or unprocessed ciphertext is waiting, so a reader would not
    /// have to wait for the socket.
    pub fn has_buffered(&mut self) -> bool {
        if self.rpos < self.rd.len() {
            return true;
        }
        // Plaintext, or the end of the stream (close_notify or EOF seen): either way a
        // read would not wait.
        !matches!(self.conn.reader().fill_buf(), Err(e) if e.kind() == ErrorKind::WouldBlock)
    }

    /// Gives back the read and write buffers when nothing is buffered: an idle TLS
    /// connection then holds no more than a plain one (rustls' own state aside).
    pub fn release_buffers(&mut self) {
        if self.rpos >= self.rd.len() {
            self.rd = Vec::new();
            self.rpos = 0;
        }
        self.wr = Vec::new();
    }

    pub async fn readable(&self, relaxed: bool) -> std::io::Result<()> {
        // A shared view cannot ask rustls; `has_buffered` is checked by the caller
        // through `Stream::readable`.
        self.tcp.readable(relaxed).await
    }

    /// A non-blocking read of whatever is there into the spare capacity of `v`: Some(n)
    /// bytes of plaintext, Some(0) when the peer closed, None when nothing (or only TLS
    /// housekeeping records) arrived.
    pub fn try_recv(&mut self, v: &mut Vec<u8>) -> Option<usize> {
        loop {
            let len = v.len();
            let spare = v.capacity() - len;
            if spare == 0 {
                return None;
            }
            {
                let mut reader = self.conn.reader();
                match reader.fill_buf() {
                    Ok([]) => return Some(0),
                    Ok(chunk) => {
                        let n = chunk.len().min(spare);
                        v.extend_from_slice(&chunk[..n]);
                        reader.consume(n);
                        return Some(n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Some(0),
                    Err(_) => return Some(0),
                }
            }
            match self.feed_pending() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(_) => return Some(0),
            }
            if self.eof {
                return Some(0);
            }
            self.rd.clear();
            self.rpos = 0;
            if self.rd.capacity() < CIPHER_READ {
                self.rd.reserve(CIPHER_READ);
            }
            match super::stream::recv_now(self.raw_fd(), &mut self.rd) {
                Some(0) => {
                    self.eof = true;
                    let _ = self.conn.read_tls(&mut &[][..]);
                }
                Some(_) => {}
                None => return None,
            }
        }
    }

    /// What a one-byte peek at the socket says, with buffered plaintext counting as data.
    pub fn peek(&mut self) -> Option<bool> {
        match self.conn.reader().fill_buf() {
            Ok([]) => return Some(false),
            Ok(_) => return Some(true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return Some(false),
        }
        if self.rpos < self.rd.len() {
            return Some(true);
        }
        if self.eof {
            return Some(false);
        }
        super::stream::peek_fd(self.raw_fd())
    }

    /// The connection with nothing unsent and no partial record is what can move; a
    /// connection is only moved while idle.
    pub fn detach(self) -> TlsParts {
        let TlsStream {
            tcp, conn, rd, rpos, ..
        } = self;
        let raw = tcp.into_raw_fd();
        // SAFETY: into_raw_fd hands over sole ownership of a valid, open descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        TlsParts { fd, conn, rd, rpos }
    }

    pub fn adopt(parts: TlsParts) -> std::io::Result<TlsStream> {
        let std_stream = std::net::TcpStream::from(parts.fd);
        std_stream.set_nonblocking(true)?;
        let tcp = TcpStream::from_std(std_stream)?;
        Ok(TlsStream {
            tcp,
            conn: parts.conn,
            rd: parts.rd,
            rpos: parts.rpos,
            eof: false,
            wr: Vec::new(),
        })
    }

    pub async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        self.read_with(buf, None).await
    }

    /// A read whose socket wait can be called off: the ciphertext it took, if any,
    /// stays buffered for the next read, so nothing is lost.
    pub async fn cancelable_read<T: IoBufMut>(&mut self, buf: T, c: CancelHandle) -> BufResult<usize, T> {
        self.read_with(buf, Some(&c)).await
    }

    async fn read_with<T: IoBufMut>(&mut self, mut buf: T, cancel: Option<&CancelHandle>) -> BufResult<usize, T> {
        loop {
            match self.take_plaintext(&mut buf) {
                Ok(Some(n)) => return (Ok(n), buf),
                Ok(None) => {}
                Err(e) => return (Err(e), buf),
            }
            match self.feed_pending() {
                Ok(true) => continue,
                Ok(false) => {}
                // The alert rustls queued goes out with the next write or the close: a
                // write of this side could interleave with one in flight on the other.
                Err(e) => return (Err(e), buf),
            }
            if self.eof {
                return (Ok(0), buf);
            }
            if let Err(e) = self.fill(cancel).await {
                return (Err(e), buf);
            }
        }
    }

    pub async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: `buf` holds `bytes_init()` initialised bytes at `read_ptr()`.
        let data = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let n = match std::io::Write::write(&mut self.conn.writer(), data) {
            Ok(n) => n,
            Err(e) => return (Err(e), buf),
        };
        match self.flush_tls().await {
            Ok(()) => (Ok(n), buf),
            Err(e) => (Err(e), buf),
        }
    }

    pub async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let mut total = 0;
        let (ptr, count) = (buf.read_iovec_ptr(), buf.read_iovec_len());
        for i in 0..count {
            // SAFETY: `buf` describes `count` valid iovecs at `ptr`.
            let iov = unsafe { &*ptr.add(i) };
            // SAFETY: each iovec points at `iov_len` initialised bytes.
            let data = unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len) };
            match std::io::Write::write(&mut self.conn.writer(), data) {
                Ok(n) => total += n,
                Err(e) => return (Err(e), buf),
            }
        }
        match self.flush_tls().await {
            Ok(()) => (Ok(total), buf),
            Err(e) => (Err(e), buf),
        }
    }

    /// The synchronous part of a close: a close_notify if the socket takes it at once,
    /// then the TCP half-close. (Called from a write half's drop, which cannot wait.)
    pub fn shutdown_now(&mut self) -> std::io::Result<()> {
        self.conn.send_close_notify();
        let mut out = Vec::new();
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut out).is_err() {
                break;
            }
        }
        if !out.is_empty() {
            // SAFETY: a non-blocking send of a local buffer on a descriptor self owns. A
            // short send leaves a partial record; the FIN right after ends the stream
            // either way.
            let _ = unsafe {
                libc::send(
                    self.raw_fd(),
                    out.as_ptr().cast(),
                    out.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
        // SAFETY: shutdown on a descriptor self owns.
        match unsafe { libc::shutdown(self.raw_fd(), libc::SHUT_WR) } {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        }
    }
}
