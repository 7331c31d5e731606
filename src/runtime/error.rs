use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("port {port} on {addr} is already in use by another process; refusing to share it")]
    PortInUse { addr: std::net::IpAddr, port: u16 },
    #[error("cannot listen on {addr}:{port}: {source}")]
    Bind {
        addr: std::net::IpAddr,
        port: u16,
        source: std::io::Error,
    },
    #[error("{0}")]
    Cpus(String),
    #[error("worker {worker} failed to start: {reason}")]
    Worker { worker: usize, reason: String },
    #[error("{0}")]
    Signals(std::io::Error),
    #[error("takeover: {0}")]
    Takeover(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("unix socket {path}: {reason}")]
    Unix { path: String, reason: String },
}
