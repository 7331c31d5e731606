//! Zero-downtime restart. A new process for the same tenant (`pgsilo --takeover`)
//! connects to the running one's takeover socket and receives its listening sockets
//! (SCM_RIGHTS), so at every moment some process accepts on them: nothing queued in a
//! listen backlog is ever dropped. Once the new process is ready it says STOP, and the
//! old one closes its clients between transactions and exits, like on SIGTERM.
//!
//! The conversation, one line each way per step:
//!   new: "FDS\n"   old: "FDS <n>\n" with n descriptors attached
//!   new: "STOP\n"  old: "OK\n" (after unlinking its socket, so the new one can bind it)

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::RuntimeError;
use crate::context::instance::{Instance, Phase};

/// The most listening sockets one process hands over (workers × addresses).
const MAX_FDS: usize = 252;

/// Serves takeover requests for the running process. `fds` are duplicates of every
/// listening socket; they are released when the process starts shutting down, so that
/// a plain shutdown does not leave a socket open that nobody accepts on.
pub fn serve(instance: Arc<Instance>, path: &Path, fds: Vec<OwnedFd>) -> Result<(), RuntimeError> {
    ensure_free(path)?;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| RuntimeError::Takeover(format!("cannot create takeover socket {}: {e}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| RuntimeError::Takeover(e.to_string()))?;
    let inode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
    };
    let path = path.to_path_buf();
    let fds = Mutex::new(Some(fds));
    std::thread::Builder::new()
        .name(format!("{}:takeover", instance.name))
        .spawn(move || loop {
            if instance.phase() >= Phase::Draining {
                drop(fds.lock().map(|mut f| f.take()));
                remove_if_ours(&path, inode);
                return;
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = handle(&instance, stream, &fds, &path, inode) {
                        log::warn!("takeover request failed: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    log::warn!("takeover socket: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })
        .map_err(|e| RuntimeError::Takeover(e.to_string()))?;
    Ok(())
}

/// Fails when a running process answers on the takeover socket: a second instance for
/// the same tenant must be started with --takeover.
pub fn ensure_free(path: &Path) -> Result<(), RuntimeError> {
    if UnixStream::connect(path).is_ok() {
        return Err(RuntimeError::Takeover(format!(
            "{} is in use by a running pgsilo; start with --takeover to replace it",
            path.display()
        )));
    }
    Ok(())
}

/// Unlinks the socket path only while it still names the socket this process bound
/// (a new process may have bound the path already).
fn remove_if_ours(path: &Path, inode: u64) {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata(path).is_ok_and(|m| m.ino() == inode) {
        let _ = std::fs::remove_file(path);
    }
}

/// Set once a new process serves the listening sockets: the Unix socket's file is then
/// theirs, and this process must not remove it as it exits.
pub static HANDED_OVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn handle(
    instance: &Instance,
    stream: UnixStream,
    fds: &Mutex<Option<Vec<OwnedFd>>>,
    path: &Path,
    inode: u64,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim() != "FDS" {
        return Err(std::io::Error::other(format!("unexpected request {line:?}")));
    }
    let raw: Vec<RawFd> = match fds.lock() {
        Ok(guard) => guard
            .as_ref()
            .map(|v| v.iter().map(|f| f.as_raw_fd()).collect())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    send_fds(stream.as_raw_fd(), &raw, format!("FDS {}\n", raw.len()).as_bytes())?;
    log::info!("takeover: handed {} listening socket(s) to a new process", raw.len());
    line.clear();
    // The new process says STOP once its workers accept; until then this one keeps
    // accepting too. A new process that dies before saying it changes nothing here.
    if reader.read_line(&mut line)? == 0 || line.trim() != "STOP" {
        log::warn!("takeover: the new process went away before taking over; carrying on");
        return Ok(());
    }
    remove_if_ours(path, inode);
    HANDED_OVER.store(true, std::sync::atomic::Ordering::SeqCst);
    (&stream).write_all(b"OK\n")?;
    log::info!("takeover: the new process is serving; closing clients as their transactions end");
    drop(fds.lock().map(|mut f| f.take()));
    let _ = instance;
    // SAFETY: signalling our own process; the signal loop runs the SIGTERM shutdown.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGTERM);
    }
    Ok(())
}

/// The new process's side, between receiving the sockets and saying STOP.
pub struct TakenOver {
    stream: UnixStream,
    pub fds: Vec<OwnedFd>,
    pub path: PathBuf,
}

/// Asks the running process at `path` for its listening sockets. None when no process
/// answers there (nothing to take over: start normally).
pub fn request(path: &Path) -> Result<Option<TakenOver>, RuntimeError> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(RuntimeError::Takeover(format!("{}: {e}", path.display()))),
    };
    let err = |e: std::io::Error| RuntimeError::Takeover(format!("{}: {e}", path.display()));
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(err)?;
    (&stream).write_all(b"FDS\n").map_err(err)?;
    let (header, fds) = recv_fds(stream.as_raw_fd()).map_err(err)?;
    let header = String::from_utf8_lossy(&header);
    let expected: usize = header
        .trim()
        .strip_prefix("FDS ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| RuntimeError::Takeover(format!("unexpected answer {header:?}")))?;
    if expected != fds.len() {
        return Err(RuntimeError::Takeover(format!(
            "expected {expected} sockets, received {}",
            fds.len()
        )));
    }
    Ok(Some(TakenOver {
        stream,
        fds,
        path: path.to_path_buf(),
    }))
}

impl TakenOver {
    /// Tells the old process to stop accepting and drain; returns once it has let go of
    /// the takeover socket path.
    pub fn finish(self) -> Result<(), RuntimeError> {
        let err = |e: std::io::Error| RuntimeError::Takeover(e.to_string());
        (&self.stream).write_all(b"STOP\n").map_err(err)?;
        let mut answer = [0u8; 3];
        (&self.stream).read_exact(&mut answer).map_err(err)?;
        if &answer != b"OK\n" {
            return Err(RuntimeError::Takeover("the old process did not confirm STOP".into()));
        }
        Ok(())
    }
}

fn send_fds(sock: RawFd, fds: &[RawFd], data: &[u8]) -> std::io::Result<()> {
    let fds = &fds[..fds.len().min(MAX_FDS)];
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u8; space.max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(payload) bytes, enough for one header
        // and `payload` bytes of data, as CMSG_FIRSTHDR/CMSG_DATA require.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), payload);
        }
    }
    // SAFETY: msg is fully initialised.
    let n = unsafe { libc::sendmsg(sock, &msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn recv_fds(sock: RawFd) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; 256];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: as in send_fds; the buffers outlive recvmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    data.truncate(n as usize);
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = bytes / std::mem::size_of::<RawFd>();
                let base = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(base.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other("too many sockets to receive"));
    }
    Ok((data, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_cross_a_unix_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send_fds(a.as_raw_fd(), &[l1.as_raw_fd(), l2.as_raw_fd()], b"FDS 2\n").unwrap();
        let (data, fds) = recv_fds(b.as_raw_fd()).unwrap();
        assert_eq!(data, b"FDS 2\n");
        assert_eq!(fds.len(), 2);
        let got = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), l1.local_addr().unwrap());
    }
}
