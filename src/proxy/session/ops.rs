//! The session's owned I/O operations. Each takes a socket half and a buffer by value
//! and gives both back with its result, so the kernel reads into and writes from the
//! session's own buffers, and an operation can live across turns of the forwarding loop
//! without borrowing the session.

use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent};

use super::ClientRd;
use crate::net::{stream_of, Stream};
use crate::pool::{LocalPool, PoolError, ServerConn};
use crate::protocol::MsgBuf;

pub(super) async fn read_op<R: AsyncReadRent>(mut r: R, buf: MsgBuf) -> (R, std::io::Result<usize>, MsgBuf) {
    let (res, back) = r.read(buf.into_read()).await;
    (r, res, back.into_inner())
}

/// A read of the client that can be called off without losing anything: once cancelled,
/// it still completes, with the bytes it took or with ECANCELED.
pub(super) async fn client_read_op(
    mut r: ClientRd,
    buf: MsgBuf,
    c: CancelHandle,
) -> (ClientRd, std::io::Result<usize>, MsgBuf) {
    let (res, back) = r.cancelable_read(buf.into_read(), c).await;
    (r, res, back.into_inner())
}

pub(super) async fn write_op<W: AsyncWriteRent>(
    mut w: W,
    buf: MsgBuf,
    n: usize,
) -> (W, std::io::Result<usize>, MsgBuf) {
    let (res, back) = w.write_all(buf.into_write(n)).await;
    (w, res, back.into_inner())
}

/// Readiness of the client socket while the client waits for a server: to notice a client
/// that hangs up. A readiness wait takes nothing from the socket, so dropping it when the
/// server comes loses nothing.
pub(super) fn client_readiness(rd: &ClientRd) -> impl Future<Output = std::io::Result<()>> + 'static {
    // SAFETY: the stream lives in an Rc held by the session's read half, which the
    // session keeps (in `client.rd`) for longer than this future lives: the future is a
    // local of the forwarding loop and is dropped before the loop returns, and the read
    // half is never dropped while the loop runs. No read runs on the socket meanwhile.
    let stream: &'static mut Stream = unsafe { &mut *rd.0.get() };
    stream.readable()
}

/// Peeks whether a readable client socket has data (Some(true)), was closed
/// (Some(false)), or nothing after all (None).
pub(super) fn peek_client(rd: &ClientRd) -> Option<bool> {
    stream_of(rd).peek()
}

/// Waits until the client's socket has something to read, holding no buffer.
pub(super) async fn readable_op(rd: ClientRd) -> (ClientRd, std::io::Result<()>) {
    // The half (moved into this future) keeps the stream alive; while a session is idle
    // no operation runs on the client socket.
    let res = stream_of(&rd).readable().await;
    (rd, res)
}

/// Waiting for (or opening) a server: boxed, so the rarely used and large future does not
/// sit in every session's state.
pub(super) type Acquire = std::pin::Pin<Box<dyn Future<Output = Result<ServerConn, PoolError>>>>;

pub(super) fn acquire(pool: Rc<LocalPool>, wait: Option<Duration>) -> Acquire {
    Box::pin(async move { pool.acquire(wait).await })
}
