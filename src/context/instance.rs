//! The state one pgsilo process shares between its workers: configuration, the auth_file,
//! pools, client accounting, cancel keys, and the shutdown phase.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use futures_channel::mpsc::UnboundedSender;

use super::control::ControlMsg;
pub use super::control::Phase;
use crate::auth::ScramSecret;
use crate::config::{Config, Userlist};
use crate::context::cancel::CancelRegistry;
use crate::metrics::Averages;
use crate::pool::{PoolRegistry, Postman};
use crate::tls::TlsContext;

/// What a worker reports about itself, for logs and SHOW WORKERS.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub id: usize,
    pub core: Option<usize>,
    pub driver: &'static str,
}

/// A logged-in client's place under max_client_conn, given back when dropped.
pub struct ClientSlot(Arc<Instance>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.logged_in.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Instance {
    pub name: String,
    config: RwLock<Arc<Config>>,
    userlist: RwLock<Arc<Userlist>>,
    /// The certificates and rustls settings in use; a reload swaps them whole, and
    /// connections keep the generation they started with.
    tls: RwLock<Arc<TlsContext>>,
    pub pools: PoolRegistry,
    pub cancels: CancelRegistry,
    /// LISTEN/NOTIFY under transaction pooling: who listens to what, per pool.
    pub listens: super::listen::ListenHub,
    pub postman: OnceLock<Postman>,
    /// Each worker's control inbox.
    pub control: OnceLock<Vec<UnboundedSender<ControlMsg>>>,
    /// Connections open (logging in or logged in): shutdown waits for them.
    pub clients: AtomicUsize,
    /// Clients past authentication, for max_client_conn (see [`ClientSlot`]).
    logged_in: AtomicUsize,
    next_client_id: AtomicU64,
    /// Key for deterministic mock SCRAM salts, so unknown users look like known ones.
    pub mock_key: [u8; 32],
    /// SCRAM verifiers derived from plain-text auth_file passwords, cached because
    /// deriving one costs thousands of HMAC rounds.
    scram_cache: Mutex<HashMap<(String, String), ScramSecret>>,
    pub started: Instant,
    pub workers: Mutex<Vec<WorkerInfo>>,
    /// How this process re-reads its config and auth_file (the runtime's, which also
    /// knows the logger and the pools' definitions): for the console's RELOAD.
    reloader: fn(&Arc<Instance>),
    pub worker_count: usize,
    phase: AtomicU8,
    averages: Mutex<BTreeMap<String, Averages>>,
}

impl Instance {
    /// Re-reads the config file and the auth_file, as SIGHUP does.
    pub fn reload(self: &Arc<Self>) {
        (self.reloader)(self)
    }

    pub fn new(
        config: Config,
        userlist: Userlist,
        tls: TlsContext,
        worker_count: usize,
        reloader: fn(&Arc<Instance>),
    ) -> Instance {
        Instance {
            name: config.general.name.clone(),
            config: RwLock::new(Arc::new(config)),
            userlist: RwLock::new(Arc::new(userlist)),
            tls: RwLock::new(Arc::new(tls)),
            pools: PoolRegistry::new(worker_count),
            cancels: CancelRegistry::default(),
            listens: Default::default(),
            postman: OnceLock::new(),
            control: OnceLock::new(),
            clients: AtomicUsize::new(0),
            logged_in: AtomicUsize::new(0),
            next_client_id: AtomicU64::new(1),
            mock_key: rand::random(),
            scram_cache: Mutex::new(HashMap::new()),
            started: Instant::now(),
            reloader,
            workers: Mutex::new(Vec::new()),
            worker_count,
            phase: AtomicU8::new(Phase::Running as u8),
            averages: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn userlist(&self) -> Arc<Userlist> {
        self.userlist.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn tls(&self) -> Arc<TlsContext> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace_tls(&self, tls: Arc<TlsContext>) {
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
    }

    pub fn replace_config(&self, config: Config) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }

    pub fn replace_userlist(&self, userlist: Userlist) {
        *self.userlist.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(userlist);
        self.scram_cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The last stats_period's averages per database.
    pub fn averages(&self) -> BTreeMap<String, Averages> {
        self.averages.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_averages(&self, a: BTreeMap<String, Averages>) {
        *self.averages.lock().unwrap_or_else(|p| p.into_inner()) = a;
    }

    /// Clients logged in, as max_client_conn counts them.
    pub fn logged_in(&self) -> usize {
        self.logged_in.load(Ordering::SeqCst)
    }

    /// A place among `max` logged-in clients, or None when they are all taken.
    pub fn take_client_slot(self: &Arc<Self>, max: usize) -> Option<ClientSlot> {
        self.logged_in
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
            .ok()?;
        Some(ClientSlot(self.clone()))
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Running,
            1 => Phase::Draining,
            2 => Phase::Closing,
            _ => Phase::Exiting,
        }
    }

    /// Moves to a later phase (never back) and tells the workers.
    pub fn advance(&self, to: Phase) {
        let before = self.phase.fetch_max(to as u8, Ordering::SeqCst);
        if before < to as u8 {
            self.broadcast(|| ControlMsg::Phase(to));
        }
    }

    /// Sends a control message to every worker.
    pub fn broadcast(&self, msg: impl Fn() -> ControlMsg) {
        if let Some(workers) = self.control.get() {
            for w in workers {
                let _ = w.unbounded_send(msg());
            }
        }
    }

    /// Server connections attached to clients, across pools and workers.
    pub fn active_servers(&self) -> i64 {
        self.pools.all().iter().map(|p| p.stats.totals().servers_active).sum()
    }

    /// The SCRAM verifier for a plain-text password, derived once per (user, password).
    pub fn scram_for_plain(&self, user: &str, password: &str) -> ScramSecret {
        let key = (user.to_string(), password.to_string());
        if let Some(s) = self.scram_cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return s.clone();
        }
        let secret = crate::auth::new_scram_secret(password);
        self.scram_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, secret.clone());
        secret
    }
}
