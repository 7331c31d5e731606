//! Every client and server connection of the process, for SHOW CLIENTS / SHOW SERVERS.
//! Entries are added at login and removed at close (never per transaction); what changes
//! per transaction (state, link) is a relaxed atomic store by the owning worker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnState {
    Login = 0,
    /// Client: logged in, with or without a server; server: linked to a client.
    Active = 1,
    /// Client: waiting for a server.
    Waiting = 2,
    /// Server: idle in the pool.
    Idle = 3,
}

impl ConnState {
    fn from_u8(v: u8) -> ConnState {
        match v {
            1 => ConnState::Active,
            2 => ConnState::Waiting,
            3 => ConnState::Idle,
            _ => ConnState::Login,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Login => "login",
            ConnState::Active => "active",
            ConnState::Waiting => "waiting",
            ConnState::Idle => "idle",
        }
    }
}

/// One connection's row in SHOW CLIENTS / SHOW SERVERS.
pub struct ConnEntry {
    pub id: u64,
    pub user: String,
    pub database: String,
    /// The peer's address as SHOW CLIENTS/SERVERS print it ("unix" for Unix sockets).
    pub addr: String,
    pub port: u16,
    /// "" for plain connections, else the TLS protocol version and cipher suite.
    pub tls: String,
    pub local_addr: Option<SocketAddr>,
    pub connect_time: SystemTime,
    pub application_name: String,
    /// Client: the cancel key's pid pgsilo issued; server: the backend pid.
    pub remote_pid: u32,
    worker: AtomicUsize,
    state: AtomicU8,
    /// The connection at the other end (server id for a client, client id for a server).
    link: AtomicU64,
    /// Microseconds since the epoch of the last request / state change.
    request_time_us: AtomicU64,
    wait_since_us: AtomicU64,
}

impl ConnEntry {
    pub fn new(
        id: u64,
        user: &str,
        database: &str,
        addr: (String, u16),
        local_addr: Option<SocketAddr>,
        worker: usize,
    ) -> ConnEntry {
        ConnEntry {
            id,
            user: user.to_string(),
            database: database.to_string(),
            addr: addr.0,
            port: addr.1,
            tls: String::new(),
            local_addr,
            connect_time: SystemTime::now(),
            application_name: String::new(),
            remote_pid: 0,
            worker: AtomicUsize::new(worker),
            state: AtomicU8::new(ConnState::Login as u8),
            link: AtomicU64::new(0),
            request_time_us: AtomicU64::new(now_us()),
            wait_since_us: AtomicU64::new(0),
        }
    }

    #[inline]
    pub fn set_state(&self, s: ConnState) {
        self.state.store(s as u8, Relaxed);
        if s == ConnState::Waiting {
            self.wait_since_us.store(now_us(), Relaxed);
        }
    }

    pub fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Relaxed))
    }

    #[inline]
    pub fn set_link(&self, other: u64) {
        self.link.store(other, Relaxed);
    }

    pub fn link(&self) -> u64 {
        self.link.load(Relaxed)
    }

    #[inline]
    pub fn touch(&self) {
        self.request_time_us.store(now_us(), Relaxed);
    }

    pub fn request_time(&self) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_micros(self.request_time_us.load(Relaxed))
    }

    /// How long a waiting client has waited, in microseconds (0 when not waiting).
    pub fn wait_us(&self) -> u64 {
        if self.state() != ConnState::Waiting {
            return 0;
        }
        now_us().saturating_sub(self.wait_since_us.load(Relaxed))
    }

    pub fn set_worker(&self, w: usize) {
        self.worker.store(w, Relaxed);
    }

    pub fn worker(&self) -> usize {
        self.worker.load(Relaxed)
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
pub struct Registry {
    entries: Mutex<BTreeMap<u64, Arc<ConnEntry>>>,
}

impl Registry {
    pub fn add(&self, e: ConnEntry) -> Arc<ConnEntry> {
        let e = Arc::new(e);
        self.lock().insert(e.id, e.clone());
        e
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn all(&self) -> Vec<Arc<ConnEntry>> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ConnEntry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Client connections of this process.
pub static CLIENTS: LazyLock<Registry> = LazyLock::new(Registry::default);
/// Server connections of this process.
pub static SERVERS: LazyLock<Registry> = LazyLock::new(Registry::default);

/// Removes a connection's entry when dropped.
pub struct Registered {
    pub entry: Arc<ConnEntry>,
    registry: &'static Registry,
}

impl Registered {
    pub fn new(registry: &'static Registry, e: ConnEntry) -> Registered {
        Registered {
            entry: registry.add(e),
            registry,
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.remove(self.entry.id);
    }
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registered({})", self.entry.id)
    }
}

/// SQLSTATE error counts of the process (errors are rare enough for one lock).
#[derive(Default)]
pub struct ErrorCounts {
    counts: Mutex<BTreeMap<[u8; 5], u64>>,
}

impl ErrorCounts {
    pub fn count(&self, code: [u8; 5]) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code)
            .or_insert(0) += 1;
    }

    pub fn all(&self) -> Vec<(String, u64)> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), *v))
            .collect()
    }
}

/// Errors sent to clients, from servers or from pgsilo itself.
pub static ERRORS: LazyLock<ErrorCounts> = LazyLock::new(ErrorCounts::default);
