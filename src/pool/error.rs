use thiserror::Error;

use crate::protocol::io::WireError;
use crate::protocol::{ErrorFields, SqlState};

/// Why a server connection could not be had or kept.
#[derive(Debug, Error)]
pub enum PoolError {
    /// TCP connect, DNS, or the server vanished during login: the client sees 08006.
    #[error("server connection failed: {0}")]
    Connect(String),
    /// PostgreSQL refused the login; the client sees PostgreSQL's own error and SQLSTATE.
    #[error("server login failed: {0}")]
    ServerRefused(ErrorFields),
    /// pgsilo cannot log in with what the auth_file holds (e.g. no password for SCRAM).
    #[error("server login failed: {0}")]
    Login(String),
    /// TLS with the server could not be set up as server_tls_sslmode demands: 08001.
    #[error("server TLS failed: {0}")]
    Tls(String),
    #[error("query_wait_timeout")]
    WaitTimeout,
    /// An internal query (reset, settings) failed on the server.
    #[error("{0}")]
    Query(ErrorFields),
    #[error("server connection lost: {0}")]
    Wire(#[from] WireError),
    #[error("pool is shutting down")]
    Shutdown,
}

impl PoolError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            PoolError::Connect(_) | PoolError::Wire(_) => SqlState::CONNECTION_FAILURE,
            PoolError::Login(_) => SqlState::CONNECTION_FAILURE,
            PoolError::Tls(_) => SqlState::UNABLE_TO_CONNECT,
            PoolError::WaitTimeout => SqlState::PROTOCOL_VIOLATION,
            PoolError::Shutdown => SqlState::CANNOT_CONNECT_NOW,
            // Codes from the server are passed on as they came, via client_error().
            PoolError::ServerRefused(_) | PoolError::Query(_) => SqlState::CONNECTION_FAILURE,
        }
    }

    /// The (SQLSTATE, message) a client should see. Server-originated errors keep their
    /// own code and text, as PgBouncer passes them through.
    pub fn client_error(&self) -> (SqlState, String) {
        match self {
            PoolError::ServerRefused(f) | PoolError::Query(f) => (
                SqlState::parse(&f.code).unwrap_or(SqlState::CONNECTION_FAILURE),
                f.message.clone(),
            ),
            PoolError::WaitTimeout => (self.sqlstate(), "query_wait_timeout".to_string()),
            other => (other.sqlstate(), other.to_string()),
        }
    }
}
