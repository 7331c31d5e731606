//! The PostgreSQL v3 wire protocol, as far as a pooler needs it: finding message boundaries,
//! reading startup packets, and writing the messages pgsilo itself originates.

pub mod backend;
pub mod buffer;
pub mod error_fields;
pub mod framing;
pub mod frontend;
pub mod io;
pub mod startup;

pub use buffer::{BufPool, MsgBuf};
pub use error_fields::{ErrorFields, SqlState};
pub use framing::{Header, HEADER_LEN};

use thiserror::Error;

/// Problems with bytes a peer sent. Each maps to an ErrorResponse with SQLSTATE 08P01.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {len} for message type '{tag}'")]
    BadLength { tag: char, len: u32 },
    #[error("message type '{tag}' of {len} bytes exceeds the limit of {limit} bytes")]
    TooLong { tag: char, len: u32, limit: u32 },
    #[error("invalid startup packet length {0}")]
    BadStartupLength(u32),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    BadStartup(&'static str),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("expected {expected} message, got '{got}'")]
    Unexpected { expected: &'static str, got: char },
}
