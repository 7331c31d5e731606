//! The instance-wide side of a pool: the hard cap on server connections for one
//! (database, user), and what each worker advertises so others can find idle servers
//! and waiting clients without locks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};

use super::settings::Settings;
use super::target::ServerTarget;
use crate::config::PoolMode;
use crate::metrics::PoolStats;

pub struct SharedPool {
    pub id: usize,
    /// The database name clients ask for.
    pub database: String,
    /// The user clients log in as (the pool key; the server login user may be forced).
    pub user: String,
    pub mode: PoolMode,
    target: RwLock<Arc<ServerTarget>>,
    cap: AtomicUsize,
    /// Server connections open or being opened, across all workers. Never above `cap`.
    total: AtomicUsize,
    /// Per worker: idle servers it holds / clients it has waiting. Advertisements for the
    /// other workers; the owning worker's lists are the truth.
    idle: Box<[Padded]>,
    waiting: Box<[Padded]>,
    /// Settings a fresh server connection reports at login, handed to each new client.
    welcome: Mutex<Option<Arc<Settings>>>,
    /// ClientKey recovered from a client's SCRAM proof, for SCRAM passthrough.
    scram_client_key: Mutex<Option<[u8; 32]>>,
    /// (setting, value as a client sent it) -> value as the server normalised it.
    validated: Mutex<HashMap<(String, String), String>>,
    pub paused: AtomicBool,
    pub stats: PoolStats,
}

impl SharedPool {
    pub fn new(
        id: usize,
        database: &str,
        user: &str,
        mode: PoolMode,
        cap: usize,
        target: ServerTarget,
        workers: usize,
    ) -> SharedPool {
        let counters = |n| (0..n).map(|_| Padded::default()).collect::<Vec<_>>().into_boxed_slice();
        SharedPool {
            id,
            database: database.to_string(),
            user: user.to_string(),
            mode,
            target: RwLock::new(Arc::new(target)),
            cap: AtomicUsize::new(cap),
            total: AtomicUsize::new(0),
            idle: counters(workers),
            waiting: counters(workers),
            welcome: Mutex::new(None),
            scram_client_key: Mutex::new(None),
            validated: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            stats: PoolStats::new(workers),
        }
    }

    pub fn target(&self) -> Arc<ServerTarget> {
        match self.target.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A reload may change where and how servers log in; connections made before keep
    /// running until they are released.
    pub fn set_target(&self, target: ServerTarget, cap: usize) {
        match self.target.write() {
            Ok(mut t) => *t = Arc::new(target),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(target),
        }
        self.cap.store(cap, SeqCst);
    }

    pub fn cap(&self) -> usize {
        self.cap.load(SeqCst)
    }

    pub fn total(&self) -> usize {
        self.total.load(SeqCst)
    }

    /// Claims one connection slot under the cap.
    pub fn try_reserve(&self) -> bool {
        let cap = self.cap.load(SeqCst);
        self.total
            .fetch_update(SeqCst, SeqCst, |t| (t < cap).then_some(t + 1))
            .is_ok()
    }

    pub fn unreserve(&self) {
        let _ = self.total.fetch_update(SeqCst, SeqCst, |t| t.checked_sub(1));
    }

    pub(crate) fn idle_add(&self, worker: usize, delta: isize) {
        add(&self.idle[worker].0, delta);
    }

    pub(crate) fn waiting_add(&self, worker: usize, delta: isize) {
        add(&self.waiting[worker].0, delta);
    }

    pub fn idle_count(&self) -> usize {
        self.idle.iter().map(|c| c.0.load(SeqCst)).sum()
    }

    pub fn waiting_count(&self) -> usize {
        self.waiting.iter().map(|c| c.0.load(SeqCst)).sum()
    }

    /// Another worker with clients waiting, starting after `me` so no worker is always first.
    pub(crate) fn worker_with_waiters(&self, me: usize) -> Option<usize> {
        self.find_other(&self.waiting, me)
    }

    pub(crate) fn worker_with_idle(&self, me: usize) -> Option<usize> {
        self.find_other(&self.idle, me)
    }

    fn find_other(&self, counters: &[Padded], me: usize) -> Option<usize> {
        let n = counters.len();
        (1..n).map(|i| (me + i) % n).find(|&w| counters[w].0.load(SeqCst) > 0)
    }

    pub fn welcome(&self) -> Option<Arc<Settings>> {
        lock(&self.welcome).clone()
    }

    pub fn set_welcome(&self, settings: &Settings) {
        let mut w = lock(&self.welcome);
        if w.is_none() {
            *w = Some(Arc::new(settings.clone()));
        }
    }

    pub fn scram_client_key(&self) -> Option<[u8; 32]> {
        *lock(&self.scram_client_key)
    }

    pub fn set_scram_client_key(&self, key: [u8; 32]) {
        *lock(&self.scram_client_key) = Some(key);
    }

    pub fn forget_scram_client_key(&self) {
        *lock(&self.scram_client_key) = None;
    }

    pub fn validated(&self, name: &str, value: &str) -> Option<String> {
        lock(&self.validated)
            .get(&(name.to_ascii_lowercase(), value.to_string()))
            .cloned()
    }

    pub fn remember_validated(&self, name: &str, value: &str, normalised: &str) {
        let mut v = lock(&self.validated);
        // Bounded: a client cycling through values must not grow memory without end.
        if v.len() < 1024 {
            v.insert((name.to_ascii_lowercase(), value.to_string()), normalised.to_string());
        }
    }
}

/// A counter on its own cache line: each worker writes its own on every transaction,
/// and sharing a line would bounce it between cores.
#[repr(align(64))]
#[derive(Default)]
struct Padded(AtomicUsize);

fn add(counter: &AtomicUsize, delta: isize) {
    if delta >= 0 {
        counter.fetch_add(delta as usize, SeqCst);
    } else {
        let _ = counter.fetch_update(SeqCst, SeqCst, |c| c.checked_sub(delta.unsigned_abs()));
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take every later login down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// All pools of the instance, created on first use.
pub struct PoolRegistry {
    workers: usize,
    pools: Mutex<Vec<Arc<SharedPool>>>,
}

impl PoolRegistry {
    pub fn new(workers: usize) -> PoolRegistry {
        PoolRegistry {
            workers,
            pools: Mutex::new(Vec::new()),
        }
    }

    pub fn get_or_create(
        &self,
        database: &str,
        user: &str,
        make: impl FnOnce() -> (PoolMode, usize, ServerTarget),
    ) -> Arc<SharedPool> {
        let mut pools = lock(&self.pools);
        if let Some(p) = pools.iter().find(|p| p.database == database && p.user == user) {
            return p.clone();
        }
        let (mode, cap, target) = make();
        let pool = Arc::new(SharedPool::new(
            pools.len(),
            database,
            user,
            mode,
            cap,
            target,
            self.workers,
        ));
        pools.push(pool.clone());
        pool
    }

    pub fn all(&self) -> Vec<Arc<SharedPool>> {
        lock(&self.pools).clone()
    }

    pub fn by_id(&self, id: usize) -> Option<Arc<SharedPool>> {
        lock(&self.pools).get(id).cloned()
    }
}
