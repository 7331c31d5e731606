//! Listening sockets. Every worker gets its own SO_REUSEPORT socket on each address, so
//! the kernel spreads new connections across workers with no shared accept queue.

use std::net::{IpAddr, SocketAddr};

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::config::UnixSocket;

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

/// `dir/.s.PGSQL.<port>`, the name libpq looks for.
pub fn unix_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// The instance's Unix socket. A socket file left by a process that died is replaced; one
/// that still answers belongs to a live process and is an error, as PgBouncer does.
pub fn bind_unix(u: &UnixSocket, port: u16, backlog: u32) -> Result<Option<UnixListener>, RuntimeError> {
    let Some(dir) = &u.dir else {
        return Ok(None);
    };
    let path = unix_path(dir, port);
    let err = |reason: String| RuntimeError::Unix {
        path: path.display().to_string(),
        reason,
    };
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        // Only a socket nobody answers on is stale (a process that died left it). A
        // live one, one we may not reach, or something that is not a socket stays.
        if !meta.file_type().is_socket() {
            return Err(err("exists and is not a socket".into()));
        }
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => return Err(err("in use by another process; refusing to share it".into())),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(&path).map_err(|e| err(format!("cannot remove the stale socket: {e}")))?
            }
            Err(e) => return Err(err(format!("exists and cannot be checked: {e}"))),
        }
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(|e| err(e.to_string()))?;
    let addr = SockAddr::unix(&path).map_err(|e| err(e.to_string()))?;
    socket.bind(&addr).map_err(|e| err(e.to_string()))?;
    // Mode and group before listen: until then nobody can connect, so no one the mode
    // excludes gets a connection queued in between.
    apply_mode(u, &path).map_err(err)?;
    socket
        .listen(backlog.min(i32::MAX as u32) as i32)
        .map_err(|e| err(e.to_string()))?;
    socket.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
    Ok(Some(socket.into()))
}

/// unix_socket_mode and unix_socket_group on the socket's file (also on one taken over,
/// whose settings may have changed).
pub fn apply_mode(u: &UnixSocket, path: &Path) -> Result<(), String> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(u.mode))
        .map_err(|e| format!("unix_socket_mode: {e}"))?;
    if let Some(group) = &u.group {
        let gid = group_id(group).ok_or_else(|| format!("unix_socket_group: no group \"{group}\""))?;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| format!("unix_socket_group: {e}"))?;
    }
    Ok(())
}

/// A group name (or number) to its id.
fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    let name = std::ffi::CString::new(group).ok()?;
    // SAFETY: getgrnam reads a NUL-terminated name and returns a pointer into static
    // storage (or null); the id is copied out at once, on the main thread at start-up.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    if entry.is_null() {
        return None;
    }
    // SAFETY: non-null, so it points at a valid group entry.
    Some(unsafe { (*entry).gr_gid })
}

/// Removes the Unix socket's file as the process exits. Only called when no successor
/// took the socket over; while this process listens, no other instance can bind the
/// path (bind_unix refuses a socket that answers), so the file is this process's.
pub fn remove_unix(l: &UnixListener) {
    let Some(path) = l.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)) else {
        return;
    };
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&path);
    }
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
    unix: Vec<(PathBuf, UnixListener)>,
}

impl Inherited {
    pub fn new(fds: &[std::os::fd::OwnedFd]) -> Inherited {
        let mut by_addr = Vec::new();
        let mut unix = Vec::new();
        for fd in fds.iter().filter_map(|fd| fd.try_clone().ok()) {
            let local = socket2::SockRef::from(&fd).local_addr().ok();
            match local {
                Some(a) if a.as_socket().is_some() => {
                    let l = std::net::TcpListener::from(fd);
                    if let Ok(a) = l.local_addr() {
                        by_addr.push((a, l));
                    }
                }
                Some(a) => {
                    if let Some(path) = a.as_pathname().map(Path::to_path_buf) {
                        unix.push((path, UnixListener::from(fd)));
                    }
                }
                None => {}
            }
        }
        Inherited { by_addr, unix }
    }

    /// The inherited Unix socket bound to `path`, if the old process had one there.
    pub fn take_unix(&mut self, path: &Path) -> Option<UnixListener> {
        let i = self.unix.iter().position(|(p, _)| p == path)?;
        Some(self.unix.swap_remove(i).1)
    }

    /// Unix sockets of the old process this one does not serve (the folder or port
    /// changed, or the socket is off now): closed, and their files removed, so no client
    /// queues on a socket nobody accepts on.
    pub fn drop_other_unix(&mut self) {
        for (path, l) in std::mem::take(&mut self.unix) {
            drop(l);
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(&path);
            }
        }
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
