use thiserror::Error;

use crate::pool::PoolError;
use crate::protocol::io::WireError;
use crate::protocol::{ProtocolError, SqlState};

/// How a client session ends badly. Each case knows what the client is told.
#[derive(Debug, Error)]
pub enum SessionError {
    /// The client went away or its socket failed; nothing can be told.
    #[error("client connection lost: {0}")]
    ClientGone(WireError),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    /// A refusal with a SQLSTATE: unknown database, bad password, limits.
    #[error("{message}")]
    Refused { code: SqlState, message: String },
    #[error("{0}")]
    Pool(#[from] PoolError),
    /// The server went away while serving the client.
    #[error("server conn crashed?")]
    ServerGone,
    #[error("client_login_timeout")]
    LoginTimeout,
    /// The logins-in-progress budget ended a login before its startup packet came:
    /// nothing can be told to a client that has not spoken the protocol yet.
    #[error("{0}")]
    LoginCut(&'static str),
    #[error("pgsilo is shutting down")]
    Shutdown,
    /// Ended by the admin console or shutdown, with the reason the client is told.
    #[error("{0}")]
    Killed(&'static str),
    /// client_idle_timeout, idle_transaction_timeout or query_timeout ran out.
    #[error("{1}")]
    TimedOut(SqlState, &'static str),
}

impl SessionError {
    pub fn refused(code: SqlState, message: impl Into<String>) -> SessionError {
        SessionError::Refused {
            code,
            message: message.into(),
        }
    }

    /// The SQLSTATE and text for the FATAL ErrorResponse, or None when the client
    /// cannot hear it any more.
    pub fn client_error(&self) -> Option<(SqlState, String)> {
        match self {
            SessionError::ClientGone(_) => None,
            SessionError::Protocol(e) => Some((SqlState::PROTOCOL_VIOLATION, e.to_string())),
            SessionError::Refused { code, message } => Some((*code, message.clone())),
            SessionError::Pool(e) => Some(e.client_error()),
            SessionError::ServerGone => Some((SqlState::CONNECTION_FAILURE, self.to_string())),
            SessionError::LoginTimeout => Some((SqlState::PROTOCOL_VIOLATION, self.to_string())),
            SessionError::LoginCut(_) => None,
            SessionError::Shutdown => Some((SqlState::ADMIN_SHUTDOWN, "pgsilo is shutting down".into())),
            SessionError::Killed(why) => Some((SqlState::ADMIN_SHUTDOWN, (*why).into())),
            SessionError::TimedOut(code, what) => Some((*code, (*what).into())),
        }
    }
}

impl From<WireError> for SessionError {
    fn from(e: WireError) -> SessionError {
        match e {
            WireError::Protocol(p) => SessionError::Protocol(p),
            other => SessionError::ClientGone(other),
        }
    }
}
