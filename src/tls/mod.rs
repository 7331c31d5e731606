//! TLS with rustls, both towards clients and towards PostgreSQL.

mod context;
pub mod der;

pub use context::{describe, TlsContext, TlsError, ALPN_POSTGRESQL};
