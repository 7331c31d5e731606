//! Free TCP ports on 127.0.0.1 and waiting for listeners.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Ports this process already handed out, so parallel tests never get the same one.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, read, closed).
///
/// Prefers a random port just below the kernel's ephemeral range, so that outgoing client
/// connections (which take ephemeral ports) cannot grab it between now and the server's
/// bind, nor while a server restarts on it; falls back to binding port 0. Never returns
/// the same port twice within one process. A caller that binds later must still retry on
/// `EADDRINUSE`: another process may take the port in between.
pub fn free_port() -> u16 {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    let low = ephemeral_low();
    let (from, to) = if low > 20_000 {
        (low.saturating_sub(12_000), low)
    } else {
        (0, 0)
    };
    for _ in 0..200 {
        let port = if to > from {
            from + (next_random() % u64::from(to - from)) as u16
        } else {
            0
        };
        let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) else {
            continue;
        };
        let Ok(addr) = listener.local_addr() else {
            continue;
        };
        drop(listener);
        if handed.insert(addr.port()) {
            return addr.port();
        }
    }
    panic!("free_port: could not find a free TCP port on 127.0.0.1");
}

/// Wait until something accepts TCP connections on 127.0.0.1:port, or panic after `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("nothing accepted TCP connections on 127.0.0.1:{port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lower bound of the kernel's ephemeral port range (32768 if unknown).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Small xorshift PRNG seeded from time, pid and a counter (no extra crates needed).
pub(crate) fn next_random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        x = nanos ^ (u64::from(std::process::id()) << 32) | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    x
}
