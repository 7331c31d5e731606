//! The instance-wide side of a pool: the hard cap on server connections for one
//! (database, user), the database's cap across its pools (max_db_connections), the
//! server_login_retry gate, and what each worker advertises so others can find idle
//! servers and waiting clients without locks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use super::busy::BusyMeter;
use super::settings::Settings;
use super::target::ServerTarget;
use crate::config::PoolMode;
use crate::metrics::PoolStats;

/// What claiming a connection slot came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserve {
    Done,
    /// The pool is at the limit asked for.
    PoolFull,
    /// The pool had room, the database (max_db_connections) did not.
    DbFull,
}

/// One database's side, shared by its (database, user) pools: server connections across
/// them all, against max_db_connections.
pub struct DbShared {
    pub name: String,
    /// 0: unlimited.
    cap: AtomicUsize,
    /// Server connections open or being opened for all the database's pools.
    total: AtomicUsize,
    pools: RwLock<Vec<Weak<SharedPool>>>,
}

impl DbShared {
    fn new(name: &str) -> DbShared {
        DbShared {
            name: name.to_string(),
            cap: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            pools: RwLock::new(Vec::new()),
        }
    }

    /// max_db_connections; 0 is unlimited.
    pub fn cap(&self) -> usize {
        self.cap.load(SeqCst)
    }

    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, SeqCst);
    }

    pub fn total(&self) -> usize {
        self.total.load(SeqCst)
    }

    fn try_reserve(&self) -> bool {
        let cap = self.cap.load(SeqCst);
        self.total
            .fetch_update(SeqCst, SeqCst, |t| (cap == 0 || t < cap).then_some(t + 1))
            .is_ok()
    }

    fn unreserve(&self) {
        let _ = self.total.fetch_update(SeqCst, SeqCst, |t| t.checked_sub(1));
    }

    /// The database's pools.
    pub fn pools(&self) -> Vec<Arc<SharedPool>> {
        let pools = match self.pools.read() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        pools.iter().filter_map(Weak::upgrade).collect()
    }

    fn add_pool(&self, pool: &Arc<SharedPool>) {
        match self.pools.write() {
            Ok(mut p) => p.push(Arc::downgrade(pool)),
            Err(poisoned) => poisoned.into_inner().push(Arc::downgrade(pool)),
        }
    }
}

/// server_login_retry: after a failed connect or login, no new connection is tried for
/// the pool until the retry time; then one attempt (the probe) goes, and the others wait
/// for its outcome, as PgBouncer launches one connection at a time.
#[derive(Default)]
pub struct LoginGate {
    /// Fast path: false while logins succeed, so the mutex is only taken after a failure.
    failed: AtomicBool,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    retry_at: Option<Instant>,
    probing: bool,
}

/// May a connection be opened now?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Open,
    /// The first attempt after a failure; it must be reported.
    Probe,
    /// Not yet: try again at the time given, or (None) when the probe in flight reports.
    Closed(Option<Instant>),
}

impl LoginGate {
    /// Whether an attempt would be admitted, without claiming the probe: `None` if so,
    /// else when to look again (None inside: when the probe in flight reports).
    pub fn blocked(&self, now: Instant) -> Option<Option<Instant>> {
        match self.look(now, false) {
            Admit::Closed(at) => Some(at),
            Admit::Open | Admit::Probe => None,
        }
    }

    /// Admits an attempt, claiming the probe if this is the first one after a failure.
    pub fn admit(&self, now: Instant) -> Admit {
        self.look(now, true)
    }

    fn look(&self, now: Instant, claim: bool) -> Admit {
        if !self.failed.load(SeqCst) {
            return Admit::Open;
        }
        let mut st = lock(&self.state);
        if st.probing {
            return Admit::Closed(None);
        }
        match st.retry_at {
            Some(at) if now < at => Admit::Closed(Some(at)),
            Some(_) => {
                if claim {
                    st.probing = true;
                }
                Admit::Probe
            }
            // A success raced in between the flag and the lock.
            None => Admit::Open,
        }
    }

    /// The outcome of an admitted attempt. Returns true when this opened a closed gate
    /// (waiters held back by it may go now).
    pub fn report(&self, probe: bool, ok: bool, retry: Duration, now: Instant) -> bool {
        let mut st = lock(&self.state);
        if probe {
            st.probing = false;
        }
        if ok {
            let was_closed = self.failed.swap(false, SeqCst);
            st.retry_at = None;
            return was_closed;
        }
        if !retry.is_zero() {
            st.retry_at = Some(now + retry);
            self.failed.store(true, SeqCst);
        }
        false
    }

    /// A probe given up before it finished (the client went away): someone else may try.
    pub fn abandon(&self, probe: bool) {
        if probe {
            lock(&self.state).probing = false;
        }
    }
}

/// Milliseconds since the first pool was made, plus one: 0 means "nobody".
fn stamp(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    at.saturating_duration_since(epoch).as_millis() as u64 + 1
}

/// The startup parameters (name, value) that decide a client's initial settings.
type StartupKey = Vec<(String, String)>;

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
    /// Per worker: when its longest-waiting client started waiting (`stamp`), 0 if none;
    /// lets pools of one database serve their waiters oldest first under
    /// max_db_connections.
    oldest: Box<[AtomicU64]>,
    /// The database this pool belongs to, with its other pools.
    pub db: Arc<DbShared>,
    pub gate: LoginGate,
    /// Settings a fresh server connection reports at login, handed to each new client.
    welcome: Mutex<Option<Arc<Settings>>>,
    /// ClientKey recovered from a client's SCRAM proof, for SCRAM passthrough.
    scram_client_key: Mutex<Option<[u8; 32]>>,
    /// Client settings by the startup parameters that produced them, so clients that log
    /// in alike share one copy (a pool may have thousands of idle clients).
    settings_cache: Mutex<HashMap<StartupKey, Arc<Settings>>>,
    /// (setting, value as a client sent it) -> value as the server normalised it.
    validated: Mutex<HashMap<(String, String), String>>,
    pub paused: AtomicBool,
    /// max_busy_cores: the busy time of the pool's servers in the last second.
    pub busy: Arc<BusyMeter>,
    pub stats: PoolStats,
}

impl SharedPool {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: usize,
        database: &str,
        user: &str,
        mode: PoolMode,
        cap: usize,
        target: ServerTarget,
        workers: usize,
        db: Arc<DbShared>,
    ) -> SharedPool {
        // Fixes the epoch of waiting-time stamps before any client can wait.
        stamp(Instant::now());
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
            oldest: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            db,
            gate: LoginGate::default(),
            welcome: Mutex::new(None),
            scram_client_key: Mutex::new(None),
            validated: Mutex::new(HashMap::new()),
            settings_cache: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            busy: Arc::new(BusyMeter::default()),
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

    /// Claims one connection slot under the cap and under the database's cap.
    pub fn try_reserve(&self) -> bool {
        self.try_reserve_upto(self.cap()) == Reserve::Done
    }

    /// Claims one connection slot with the pool below `limit` (the cap, the cap plus the
    /// reserve pool, or min_pool_size) and the database below max_db_connections.
    pub fn try_reserve_upto(&self, limit: usize) -> Reserve {
        if self
            .total
            .fetch_update(SeqCst, SeqCst, |t| (t < limit).then_some(t + 1))
            .is_err()
        {
            return Reserve::PoolFull;
        }
        if !self.db.try_reserve() {
            let _ = self.total.fetch_update(SeqCst, SeqCst, |t| t.checked_sub(1));
            return Reserve::DbFull;
        }
        Reserve::Done
    }

    /// Gives a slot back, to the pool and to the database.
    pub fn unreserve(&self) {
        if self.total.fetch_update(SeqCst, SeqCst, |t| t.checked_sub(1)).is_ok() {
            self.db.unreserve();
        }
    }

    pub(crate) fn idle_add(&self, worker: usize, delta: isize) {
        add(&self.idle[worker].0, delta);
    }

    pub(crate) fn waiting_add(&self, worker: usize, delta: isize) {
        add(&self.waiting[worker].0, delta);
    }

    /// Advertises when this worker's longest-waiting client started waiting.
    pub(crate) fn set_oldest(&self, worker: usize, since: Option<Instant>) {
        self.oldest[worker].store(since.map_or(0, stamp), SeqCst);
    }

    /// When the longest-waiting client across workers started waiting (a `stamp`), and on
    /// which worker.
    pub(crate) fn oldest_waiter(&self) -> Option<(u64, usize)> {
        self.oldest
            .iter()
            .enumerate()
            .map(|(w, s)| (s.load(SeqCst), w))
            .filter(|(s, _)| *s != 0)
            .min()
    }

    pub(crate) fn stamp_of(at: Instant) -> u64 {
        stamp(at)
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

    /// Every other worker with clients waiting, starting after `me`.
    pub(crate) fn workers_with_waiters(&self, me: usize) -> Vec<usize> {
        let n = self.waiting.len();
        (1..n)
            .map(|i| (me + i) % n)
            .filter(|&w| self.waiting[w].0.load(SeqCst) > 0)
            .collect()
    }

    pub(crate) fn worker_with_idle(&self, me: usize) -> Option<usize> {
        self.find_other(&self.idle, me)
    }

    /// A worker holding idle servers, `me` first.
    pub(crate) fn any_worker_with_idle(&self, me: usize) -> Option<usize> {
        let n = self.idle.len();
        (0..n).map(|i| (me + i) % n).find(|&w| self.idle[w].0.load(SeqCst) > 0)
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

    /// The secret auth_query found for the pool's user, and the ClientKey the client
    /// just proved with it (SCRAM): servers log in with these from now on. Both change
    /// together, under the key's lock, so a new verifier is never paired with a key
    /// proved for an old one.
    pub fn use_found_secret(&self, credential: super::Credential, client_key: Option<[u8; 32]>) {
        let mut key = lock(&self.scram_client_key);
        let current = self.target();
        if current.credential != credential {
            let mut target = (*current).clone();
            target.credential = credential;
            match self.target.write() {
                Ok(mut t) => *t = Arc::new(target),
                Err(poisoned) => *poisoned.into_inner() = Arc::new(target),
            }
            *key = client_key;
        } else if client_key.is_some() {
            *key = client_key;
        }
    }

    /// Whether a server can log in without a client's help: not with a SCRAM verifier
    /// alone, until a client's SCRAM login has given its ClientKey.
    pub fn can_log_in(&self) -> bool {
        let (target, key) = self.login_material();
        !matches!(target.credential, super::Credential::Scram(_)) || key.is_some()
    }

    /// Where and how a new server logs in, with the ClientKey for SCRAM passthrough,
    /// read together (see `use_found_secret`).
    pub fn login_material(&self) -> (Arc<ServerTarget>, Option<[u8; 32]>) {
        let key = lock(&self.scram_client_key);
        (self.target(), *key)
    }

    pub fn shared_settings(&self, key: &[(String, String)]) -> Option<Arc<Settings>> {
        lock(&self.settings_cache).get(key).cloned()
    }

    pub fn share_settings(&self, key: Vec<(String, String)>, settings: Settings) -> Arc<Settings> {
        let settings = Arc::new(settings);
        let mut cache = lock(&self.settings_cache);
        // Bounded: clients with ever-new parameters get their own copies.
        if cache.len() < 256 {
            cache.insert(key, settings.clone());
        }
        settings
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

/// All pools of the instance, created on first use, and their databases.
pub struct PoolRegistry {
    workers: usize,
    pools: Mutex<Vec<Arc<SharedPool>>>,
    dbs: Mutex<HashMap<String, Arc<DbShared>>>,
}

impl PoolRegistry {
    pub fn new(workers: usize) -> PoolRegistry {
        PoolRegistry {
            workers,
            pools: Mutex::new(Vec::new()),
            dbs: Mutex::new(HashMap::new()),
        }
    }

    /// The database's shared side, if any of its pools exists.
    pub fn db(&self, database: &str) -> Option<Arc<DbShared>> {
        lock(&self.dbs).get(database).cloned()
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
        let db = lock(&self.dbs)
            .entry(database.to_string())
            .or_insert_with(|| Arc::new(DbShared::new(database)))
            .clone();
        let pool = Arc::new(SharedPool::new(
            pools.len(),
            database,
            user,
            mode,
            cap,
            target,
            self.workers,
            db.clone(),
        ));
        db.add_pool(&pool);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Credential;

    fn target() -> ServerTarget {
        ServerTarget {
            host: "127.0.0.1".into(),
            port: 5432,
            dbname: "app".into(),
            user: "u".into(),
            credential: Credential::None,
            connect_timeout: Duration::from_secs(1),
            tcp_keepalive: false,
            tls_mode: crate::config::SslMode::Disable,
            tls: None,
        }
    }

    #[test]
    fn login_gate_holds_back_until_the_retry_time_then_admits_one_probe() {
        let gate = LoginGate::default();
        let t0 = Instant::now();
        let retry = Duration::from_secs(15);
        assert_eq!(gate.admit(t0), Admit::Open);
        assert!(!gate.report(false, false, retry, t0));
        let at = t0 + retry;
        assert_eq!(gate.blocked(t0), Some(Some(at)));
        assert_eq!(gate.admit(t0 + Duration::from_secs(1)), Admit::Closed(Some(at)));
        // After the retry time, one attempt goes; the others wait for its outcome.
        assert_eq!(gate.blocked(at), None);
        assert_eq!(gate.admit(at), Admit::Probe);
        assert_eq!(gate.admit(at), Admit::Closed(None));
        // It fails: another retry interval.
        gate.report(true, false, retry, at);
        assert_eq!(gate.admit(at), Admit::Closed(Some(at + retry)));
        // A probe given up lets the next one go.
        assert_eq!(gate.admit(at + retry), Admit::Probe);
        gate.abandon(true);
        assert_eq!(gate.admit(at + retry), Admit::Probe);
        // Success opens the gate, and says so once.
        assert!(gate.report(true, true, retry, at + retry));
        assert_eq!(gate.admit(at + retry), Admit::Open);
        assert!(!gate.report(false, true, retry, at + retry));
    }

    #[test]
    fn login_gate_with_zero_retry_never_closes() {
        let gate = LoginGate::default();
        let now = Instant::now();
        gate.report(false, false, Duration::ZERO, now);
        assert_eq!(gate.admit(now), Admit::Open);
    }

    #[test]
    fn reservations_respect_the_pool_limit_and_the_database_cap() {
        let registry = PoolRegistry::new(2);
        let a = registry.get_or_create("app", "a", || (PoolMode::Transaction, 2, target()));
        let b = registry.get_or_create("app", "b", || (PoolMode::Transaction, 2, target()));
        let other = registry.get_or_create("other", "a", || (PoolMode::Transaction, 2, target()));
        assert!(Arc::ptr_eq(&a.db, &b.db) && !Arc::ptr_eq(&a.db, &other.db));
        assert_eq!(a.db.pools().len(), 2);
        a.db.set_cap(3);
        assert_eq!(a.try_reserve_upto(2), Reserve::Done);
        assert_eq!(a.try_reserve_upto(2), Reserve::Done);
        assert_eq!(a.try_reserve_upto(2), Reserve::PoolFull);
        // The reserve pool lets the pool past its cap, but not the database.
        assert_eq!(b.try_reserve_upto(2), Reserve::Done);
        assert_eq!(a.try_reserve_upto(3), Reserve::DbFull);
        assert_eq!((a.total(), b.total(), a.db.total()), (2, 1, 3));
        // Another database is not affected.
        assert_eq!(other.try_reserve_upto(2), Reserve::Done);
        a.unreserve();
        assert_eq!(b.try_reserve_upto(2), Reserve::Done);
        assert_eq!((a.total(), b.total(), a.db.total()), (1, 2, 3));
        // Unlimited when max_db_connections is 0.
        a.db.set_cap(0);
        assert_eq!(a.try_reserve_upto(5), Reserve::Done);
        assert_eq!(registry.db("app").map(|d| d.total()), Some(4));
    }

    #[test]
    fn the_oldest_waiter_is_found_across_workers() {
        let registry = PoolRegistry::new(3);
        let p = registry.get_or_create("app", "a", || (PoolMode::Transaction, 2, target()));
        assert_eq!(p.oldest_waiter(), None);
        let t = Instant::now();
        p.set_oldest(2, Some(t + Duration::from_millis(50)));
        p.set_oldest(1, Some(t));
        assert_eq!(p.oldest_waiter().map(|(_, w)| w), Some(1));
        p.set_oldest(1, None);
        assert_eq!(p.oldest_waiter().map(|(_, w)| w), Some(2));
    }
}
