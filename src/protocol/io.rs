//! Reading whole messages and writing byte blocks on a monoio stream, for the sequential
//! parts of a connection's life (login, internal queries). The forwarding loop does not
//! use these: it moves byte ranges without waiting for whole messages.

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use thiserror::Error;

use super::buffer::MsgBuf;
use super::framing::{scan, Header, Scan};
use super::ProtocolError;

#[derive(Debug, Error)]
pub enum WireError {
    #[error("connection closed by peer")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
}

/// Reads until one whole message sits at the front of `buf`, growing the buffer when the
/// message is larger than its capacity (up to `limit`, checked before growing).
pub async fn read_message<S: AsyncReadRent>(
    stream: &mut S,
    mut buf: MsgBuf,
    limit: u32,
) -> (Result<Header, WireError>, MsgBuf) {
    loop {
        let need = match scan(buf.data()) {
            Scan::Whole(h) => match h.validate(limit) {
                Ok(()) => return (Ok(h), buf),
                Err(e) => return (Err(e.into()), buf),
            },
            Scan::Partial { header: Some(h), have } => {
                if let Err(e) = h.validate(limit) {
                    return (Err(e.into()), buf);
                }
                h.total() - have
            }
            Scan::Partial { header: None, have } => super::HEADER_LEN - have,
        };
        buf.reserve(need);
        let (res, back) = stream.read(buf.into_read()).await;
        buf = back.into_inner();
        match res {
            Ok(0) => return (Err(WireError::Closed), buf),
            Ok(_) => {}
            Err(e) => return (Err(e.into()), buf),
        }
    }
}

/// Reads until at least `n` bytes are buffered (startup packets have no type byte).
pub async fn read_at_least<S: AsyncReadRent>(
    stream: &mut S,
    mut buf: MsgBuf,
    n: usize,
) -> (Result<(), WireError>, MsgBuf) {
    while buf.len() < n {
        buf.reserve(n - buf.len());
        let (res, back) = stream.read(buf.into_read()).await;
        buf = back.into_inner();
        match res {
            Ok(0) => return (Err(WireError::Closed), buf),
            Ok(_) => {}
            Err(e) => return (Err(e.into()), buf),
        }
    }
    (Ok(()), buf)
}

/// Writes all of `out` and hands the (cleared) vector back for reuse.
pub async fn write_out<S: AsyncWriteRent>(stream: &mut S, out: Vec<u8>) -> (Result<(), WireError>, Vec<u8>) {
    if out.is_empty() {
        return (Ok(()), out);
    }
    let (res, mut out) = stream.write_all(out).await;
    out.clear();
    (res.map(|_| ()).map_err(WireError::from), out)
}
