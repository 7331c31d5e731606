//! Listening sockets. Every worker gets its own SO_REUSEPORT socket on each address, so
//! the kernel spreads new connections across workers with no shared accept queue.

use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::RuntimeError;

/// SO_REUSEPORT lets any process of the same user bind the port too, which would let two
/// instances silently split one tenant's traffic. Before binding, a plain bind (no
/// SO_REUSEPORT) proves no one is listening there. SO_REUSEADDR keeps sockets in
/// TIME_WAIT from a previous run from counting as "in use".
pub fn ensure_port_free(addr: IpAddr, port: u16) -> Result<(), RuntimeError> {
    let probe = new_socket(addr).map_err(|source| RuntimeError::Bind { addr, port, source })?;
    let _ = probe.set_reuse_address(true);
    match probe.bind(&SockAddr::from(SocketAddr::new(addr, port))) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(RuntimeError::PortInUse { addr, port }),
        Err(source) => Err(RuntimeError::Bind { addr, port, source }),
    }
}

/// One worker's listener on one address.
pub fn bind_shared(addr: IpAddr, port: u16, backlog: u32) -> Result<std::net::TcpListener, RuntimeError> {
    let err = |source| RuntimeError::Bind { addr, port, source };
    let socket = new_socket(addr).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_reuse_port(true).map_err(err)?;
    if addr.is_ipv6() {
        // "::" serves IPv6 only; "*" adds 0.0.0.0 separately.
        let _ = socket.set_only_v6(true);
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&SockAddr::from(SocketAddr::new(addr, port))).map_err(err)?;
    socket.listen(backlog.min(i32::MAX as u32) as i32).map_err(err)?;
    Ok(socket.into())
}

fn new_socket(addr: IpAddr) -> std::io::Result<Socket> {
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))
}

/// Duplicates a listening socket's descriptor (for handing it to a takeover).
pub fn dup(l: &std::net::TcpListener) -> Result<std::os::fd::OwnedFd, RuntimeError> {
    let addr = l
        .local_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    l.try_clone()
        .map(std::os::fd::OwnedFd::from)
        .map_err(|source| RuntimeError::Bind { addr, port, source })
}

/// Listening sockets received from the process this one takes over from.
pub struct Inherited {
    by_addr: Vec<(SocketAddr, std::net::TcpListener)>,
}

impl Inherited {
    pub fn new(fds: &[std::os::fd::OwnedFd]) -> Inherited {
        let by_addr = fds
            .iter()
            .filter_map(|fd| fd.try_clone().ok())
            .map(std::net::TcpListener::from)
            .filter_map(|l| l.local_addr().ok().map(|a| (a, l)))
            .collect();
        Inherited { by_addr }
    }

    /// One inherited socket bound to `addr`, if any is left.
    pub fn take(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self.by_addr.iter().position(|(a, _)| *a == addr)?;
        Some(self.by_addr.swap_remove(i).1)
    }

    /// What is left for addresses still configured; sockets for addresses no longer in
    /// the config are dropped here (the old process closes its copies as it exits).
    pub fn rest(&mut self, configured: &[SocketAddr]) -> Vec<std::net::TcpListener> {
        std::mem::take(&mut self.by_addr)
            .into_iter()
            .filter(|(a, _)| configured.contains(a))
            .map(|(_, l)| l)
            .collect()
    }
}
