//! The one error type of the authentication state machines.
//!
//! Messages describe what was wrong with a message or which check failed; they never carry
//! a password, key, proof or signature. The only peer-supplied text that reaches a message
//! is a PostgreSQL server's `e=` error value, sanitised and truncated.

use thiserror::Error;

use super::scram_common::MAX_ITERATIONS;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    /// A SCRAM message that does not follow the RFC 5802 grammar.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),

    /// The client asked for channel binding (`p=`) with a mechanism or binding type that
    /// does not allow it (SCRAM-SHA-256 without -PLUS, or a type other than
    /// tls-server-end-point).
    #[error("unsupported SCRAM channel binding: {0}")]
    UnsupportedChannelBinding(&'static str),

    /// The client's SASLInitialResponse names a mechanism the server did not offer (an
    /// unknown one, or SCRAM-SHA-256-PLUS on a connection without TLS).
    #[error("client selected an invalid SASL authentication mechanism")]
    InvalidMechanism,

    /// The client says it supports channel binding but thinks the server does not (`y`),
    /// while the server offered SCRAM-SHA-256-PLUS: someone may have removed it from the
    /// mechanism list on the way (RFC 5802 section 6).
    #[error(
        "SCRAM channel binding negotiation error: the client supports channel binding but \
         thinks the server does not, and the server does"
    )]
    ChannelBindingDowngrade,

    /// None of the server's SASL mechanisms is one the pooler can use.
    #[error("server offers no SASL mechanism pgsilo supports")]
    NoSupportedMechanism,

    /// A well-formed SCRAM feature the pooler (like PostgreSQL) does not implement.
    #[error("unsupported SCRAM feature: {0}")]
    Unsupported(&'static str),

    /// The nonce in a later message does not continue the one agreed so far.
    #[error("SCRAM nonce mismatch: {0}")]
    NonceMismatch(&'static str),

    /// The client-final `c=` is not the gs2 header of the client-first message followed,
    /// with SCRAM-SHA-256-PLUS, by the connection's channel binding data.
    #[error("SCRAM channel binding data does not match the client-first message and the connection")]
    ChannelBindingMismatch,

    /// Wrong password, unknown user, or a user whose secret cannot do this method.
    /// Deliberately one case so that none of these can be told apart.
    #[error("password authentication failed")]
    PasswordMismatch,

    /// The server's `v=` is not the signature a server knowing the verifier would send.
    #[error("SCRAM server signature mismatch: the server did not prove it knows the password")]
    ServerSignatureMismatch,

    /// The server ended the exchange with `e=<server-error-value>`.
    #[error("server rejected SCRAM authentication: {0}")]
    ServerError(String),

    /// SCRAM passthrough needs the server to use the auth_file verifier's salt and iteration
    /// count; the server's verifier for this user differs.
    #[error(
        "SCRAM passthrough impossible: the server's salt or iteration count differs from the \
         auth_file verifier (the server's password for this user is not the auth_file's)"
    )]
    PassthroughMismatch,

    /// A server-sent iteration count of 0 or above the cap (a malicious server could
    /// otherwise make the pooler spin on key derivation).
    #[error("SCRAM iteration count {0} out of range 1..={max}", max = MAX_ITERATIONS)]
    IterationsOutOfRange(u64),

    /// A message arrived in a state that does not expect it (including after the exchange
    /// ended, successfully or not).
    #[error("SCRAM message out of order: {0}")]
    OutOfOrder(&'static str),
}
