//! Connections: the one stream type (TCP, Unix socket, TLS) and who is at the other end.

pub mod stream;
pub mod tls_stream;

pub use stream::{stream_of, Stream, StreamParts, StreamRd, StreamWr};
pub use tls_stream::TlsStream;

use std::net::SocketAddr;

/// The other end of a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A Unix-socket client, with the connecting process's pid when the kernel says.
    Unix(Option<u32>),
}

impl Peer {
    /// The address column of SHOW CLIENTS ("unix" for Unix sockets, as PgBouncer).
    pub fn addr_text(&self) -> String {
        match self {
            Peer::Tcp(a) => a.ip().to_string(),
            Peer::Unix(_) => "unix".to_string(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Peer::Tcp(a) => a.port(),
            Peer::Unix(_) => 0,
        }
    }

    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Peer::Tcp(a) => Some(a.ip()),
            Peer::Unix(_) => None,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            // PgBouncer's form: unix(pid).
            Peer::Unix(Some(pid)) => write!(f, "unix({pid})"),
            Peer::Unix(None) => write!(f, "unix"),
        }
    }
}

/// Where a server is: a TCP address, or a Unix socket's path (`dir/.s.PGSQL.port`).
/// Copy, so cancel targets and server records stay plain values: socket paths are
/// interned once per distinct path for the process's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix { path: &'static std::path::Path, port: u16 },
}

impl Endpoint {
    /// The Unix socket of a PostgreSQL (or PgBouncer) listening in `dir` on `port`.
    pub fn unix(dir: &str, port: u16) -> Endpoint {
        static PATHS: std::sync::Mutex<Vec<&'static std::path::Path>> = std::sync::Mutex::new(Vec::new());
        let path = std::path::PathBuf::from(format!("{}/.s.PGSQL.{port}", dir.trim_end_matches('/')));
        let mut known = PATHS.lock().unwrap_or_else(|p| p.into_inner());
        let interned = match known.iter().find(|p| **p == path.as_path()) {
            Some(p) => *p,
            None => {
                let leaked: &'static std::path::Path = Box::leak(path.into_boxed_path());
                known.push(leaked);
                leaked
            }
        };
        Endpoint::Unix { path: interned, port }
    }

    pub fn addr_text(&self) -> String {
        match self {
            Endpoint::Tcp(a) => a.ip().to_string(),
            Endpoint::Unix { .. } => "unix".to_string(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Endpoint::Tcp(a) => a.port(),
            Endpoint::Unix { port, .. } => *port,
        }
    }

    /// Opens a plain connection (TLS, if any, is negotiated on top by the caller).
    pub async fn connect(&self) -> std::io::Result<Stream> {
        match self {
            Endpoint::Tcp(a) => {
                let s = monoio::net::TcpStream::connect_addr(*a).await?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Endpoint::Unix { path, .. } => Ok(Stream::Unix(monoio::net::UnixStream::connect(path).await?)),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix { path, .. } => write!(f, "{}", path.display()),
        }
    }
}
