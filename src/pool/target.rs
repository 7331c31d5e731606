//! Where and as whom a pool's server connections log in.

use std::time::Duration;

use crate::auth::ScramSecret;
use crate::config::SslMode;

#[derive(Clone, Debug)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub credential: Credential,
    pub connect_timeout: Duration,
    pub tcp_keepalive: bool,
    /// server_tls_sslmode, and the rustls configuration when it is not disable.
    pub tls_mode: SslMode,
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// What pgsilo can answer a server's password challenge with.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Nothing: only trust (or peer-less) servers will accept the login.
    None,
    /// The password in clear: answers cleartext, md5 and SCRAM challenges.
    Password(String),
    /// `md5...` hash: answers md5 challenges only.
    Md5(String),
    /// A SCRAM verifier: answers SCRAM challenges once a client has logged in with SCRAM
    /// and given away its ClientKey (passthrough, as PgBouncer does).
    Scram(ScramSecret),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::None => "Credential::None",
            Credential::Password(_) => "Credential::Password",
            Credential::Md5(_) => "Credential::Md5",
            Credential::Scram(_) => "Credential::Scram",
        })
    }
}
