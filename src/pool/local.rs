//! One worker's share of a pool: its idle servers, its waiting clients, and the
//! hand-over protocol that keeps the instance-wide caps without letting a client wait
//! while another worker sits on an idle server.
//!
//! The rule that makes hand-over race-free is Dekker's: a worker publishes its own state
//! (an idle server, a waiting client, a freed slot) before it looks at the other workers'
//! advertisements, with sequentially consistent atomics. Of two workers acting at once,
//! at least one sees the other, and duplicates are harmless (a steal request finding
//! nothing is ignored; a server arriving with no one waiting goes idle; a kick finding
//! nothing to do does nothing).
//!
//! A client waits for one of three reasons, and each has its wake-up:
//! - the pool is at its cap: a released server or a freed slot is handed to it, from this
//!   worker or another (`Handover`, `Slot`); after reserve_pool_timeout it may open one of
//!   reserve_pool_size extra connections (the front waiter's alarm);
//! - server_login_retry: a connect or login failed recently; the front waiter's alarm
//!   goes at the retry time, one attempt (the probe) goes, and its outcome wakes the
//!   others (`Kick`);
//! - max_db_connections: the database is full across its pools. The client whose wait
//!   began earliest, in whichever pool, gets the database's next slot: a pool releasing a
//!   server while an older client of another pool waits closes it instead ("evicted") and
//!   kicks that pool; a waiter finding the database full asks a worker holding an idle
//!   server of another pool to close it (`Evict`).
//!
//! The one-second maintenance tick serves waiters again as a safety net.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_channel::mpsc::UnboundedSender;

mod launch;

use super::connect::connect;
use super::server::{ServerConn, ServerParts};
use super::shared::{Admit, Reserve, SharedPool};
use super::PoolError;
use crate::config::Config;
use crate::metrics::{AcquirePath, ConnState, WorkerPoolStats};

/// Messages between workers about one pool.
pub enum PoolMsg {
    /// "I have clients waiting; send me an idle server if you have one to spare."
    Steal { pool: Arc<SharedPool>, to: usize },
    /// A server moving to the receiving worker.
    Handover {
        pool: Arc<SharedPool>,
        parts: Box<ServerParts>,
    },
    /// One connection slot under the caps, transferred: the receiver may open a server.
    Slot { pool: Arc<SharedPool> },
    /// "Look at your waiting clients again": a slot went back under a cap, the login gate
    /// opened or closed, or another pool of the database freed room.
    Kick { pool: Arc<SharedPool> },
    /// "Close an idle server of this pool": a client of another pool of the same database
    /// waits for room under max_db_connections.
    Evict { pool: Arc<SharedPool> },
}

impl PoolMsg {
    /// The pool the message is about.
    pub fn pool(&self) -> &Arc<SharedPool> {
        match self {
            PoolMsg::Steal { pool, .. }
            | PoolMsg::Handover { pool, .. }
            | PoolMsg::Slot { pool }
            | PoolMsg::Kick { pool }
            | PoolMsg::Evict { pool } => pool,
        }
    }
}

/// The senders of every worker's pool inbox, indexed by worker.
pub type Postman = Arc<Vec<UnboundedSender<PoolMsg>>>;

enum Grant {
    Server(ServerConn),
    /// A reserved slot: the client opens a connection on it (never given to a waiter).
    Slot,
    /// The connection opened for this waiter failed.
    Failed(PoolError),
}

struct Waiter {
    grant: RefCell<Option<Grant>>,
    waker: Cell<Option<Waker>>,
    /// In the pool's queue: taking a served waiter out again needs no search.
    queued: Cell<bool>,
    /// When the client began waiting for this server (kept if it has to wait again): its
    /// place in the queue, its claim on the reserve pool, and its turn in the database.
    since: Instant,
}

/// Idle servers younger than this are handed out without a liveness peek.
const RECENTLY_USED: Duration = Duration::from_millis(100);
/// How long a closed server's backend may take to exit before its slot is given back
/// anyway (a backend stuck in the kernel must not keep the slot forever).
const BACKEND_EXIT_WAIT: Duration = Duration::from_millis(500);

pub struct LocalPool {
    pub shared: Arc<SharedPool>,
    /// This pool itself, for the tasks that close a server and give its slot back only
    /// once PostgreSQL has let the backend go.
    me: std::rc::Weak<LocalPool>,
    worker: usize,
    postman: Postman,
    /// LIFO, like PgBouncer's default: the most recently used server is warmest.
    idle: RefCell<Vec<ServerConn>>,
    /// Ordered by `since`, oldest first.
    waiters: RefCell<VecDeque<Rc<Waiter>>>,
    /// When the front waiter should look again (login retry time, reserve_pool_timeout);
    /// its wait sleeps until then.
    recheck_at: Cell<Option<Instant>>,
    pub server_idle_timeout: Cell<Duration>,
    pub server_lifetime: Cell<Duration>,
    check_delay: Cell<Duration>,
    check_query: RefCell<Option<Rc<str>>>,
    login_retry: Cell<Duration>,
    reserve_size: Cell<usize>,
    /// None: the reserve pool is disabled.
    reserve_timeout: Cell<Option<Duration>>,
    min_size: Cell<usize>,
    /// Servers being opened by launches (`local/launch.rs`).
    launching: Cell<usize>,
}

impl LocalPool {
    pub fn new(shared: Arc<SharedPool>, worker: usize, postman: Postman) -> Rc<LocalPool> {
        Rc::new_cyclic(|me| LocalPool {
            me: me.clone(),
            shared,
            worker,
            postman,
            idle: RefCell::new(Vec::new()),
            waiters: RefCell::new(VecDeque::new()),
            recheck_at: Cell::new(None),
            server_idle_timeout: Cell::new(Duration::from_secs(600)),
            server_lifetime: Cell::new(Duration::from_secs(3600)),
            check_delay: Cell::new(Duration::from_secs(30)),
            check_query: RefCell::new(Some(Rc::from("select 1"))),
            login_retry: Cell::new(Duration::from_secs(15)),
            reserve_size: Cell::new(0),
            reserve_timeout: Cell::new(Some(Duration::from_secs(5))),
            min_size: Cell::new(0),
            launching: Cell::new(0),
        })
    }

    /// Closes a server and frees its slot once PostgreSQL has closed its end (bounded):
    /// the caps (pool size, max_db_connections) then hold as PostgreSQL counts
    /// backends, not only as pgsilo counts sockets. `then` gives the slot back.
    fn close_then(&self, conn: ServerConn, then: fn(&LocalPool)) {
        let me = self.me.clone();
        monoio::spawn(async move {
            conn.terminate_and_wait(BACKEND_EXIT_WAIT).await;
            if let Some(pool) = me.upgrade() {
                then(&pool);
            }
        });
    }

    /// Takes the pool's settings from the configuration (at creation and on reload).
    pub fn configure(&self, config: &Config) {
        let g = &config.general;
        let db = config.databases.get(&self.shared.database);
        self.server_idle_timeout
            .set(g.server_idle_timeout.unwrap_or(Duration::ZERO));
        self.server_lifetime.set(g.server_lifetime);
        self.check_delay.set(g.server_check_delay);
        *self.check_query.borrow_mut() = g.server_check_query.as_deref().map(Rc::from);
        self.login_retry.set(g.server_login_retry);
        self.reserve_timeout.set(g.reserve_pool_timeout);
        self.reserve_size
            .set(db.map_or(g.reserve_pool_size, |d| d.effective_reserve_pool(g)));
        self.min_size
            .set(db.map_or(g.min_pool_size, |d| d.effective_min_pool_size(g)));
        self.shared
            .busy
            .set_budget(db.map_or(g.max_busy_cores, |d| d.effective_max_busy_cores(g)));
        self.shared
            .db
            .set_cap(db.map_or(g.max_db_connections, |d| d.max_db_connections));
    }

    /// This worker's counters for the pool.
    #[inline]
    pub fn stats(&self) -> &WorkerPoolStats {
        self.shared.stats.worker(self.worker)
    }

    pub fn worker(&self) -> usize {
        self.worker
    }

    pub fn idle_len(&self) -> usize {
        self.idle.borrow().len()
    }

    pub fn waiting_len(&self) -> usize {
        self.waiters.borrow().len()
    }

    /// Gets a server for a client: an idle one here, a new one under the caps, or the
    /// next one released anywhere in the instance. Gives up after `wait_timeout` (None:
    /// never).
    pub async fn acquire(self: &Rc<Self>, wait_timeout: Option<Duration>) -> Result<ServerConn, PoolError> {
        let deadline = wait_timeout.map(|t| Instant::now() + t);
        let mut since = None;
        loop {
            // A server straight from the idle list was peeked at a moment ago.
            let (grant, peeked) = match self.grant_now() {
                // A server is opened on the slot while the client waits in line for
                // whichever server comes first (`local/launch.rs`).
                Some(Grant::Slot) => {
                    let since = *since.get_or_insert_with(Instant::now);
                    (self.wait(deadline, since, true).await?, false)
                }
                Some(g) => (g, true),
                None => {
                    let since = *since.get_or_insert_with(Instant::now);
                    (self.wait(deadline, since, false).await?, false)
                }
            };
            match grant {
                Grant::Server(conn) => {
                    if let Some(conn) = self.checked(conn, peeked).await {
                        return Ok(conn);
                    }
                }
                Grant::Failed(e) => return Err(e),
                // Waiters are never handed a slot: it is launched on for them.
                Grant::Slot => self.slot_freed(),
            }
            since.get_or_insert_with(Instant::now);
        }
    }

    /// A server only if one is free now: idle on this worker, or room under the caps to
    /// open one. None when clients already wait, the pool is full or paused, or a new
    /// connection fails (the caller goes on without a server; whoever needs one next
    /// waits as usual).
    pub async fn acquire_if_free(self: &Rc<Self>) -> Option<ServerConn> {
        loop {
            match self.grant_now()? {
                // Always peeked: unlike a client's query, which would hear a dead server's
                // last words at once, a login would keep it for later.
                Grant::Server(conn) if !conn.is_alive() => {
                    self.close(conn, "server conn crashed or was terminated while idle");
                }
                Grant::Server(conn) => return self.checked(conn, true).await,
                Grant::Slot => return self.open().await.ok().map(|c| self.attached(c, None)),
                Grant::Failed(_) => return None,
            }
        }
    }

    /// The common case, without a future: an idle server on this worker that needs no
    /// check query. None sends the caller to [`LocalPool::acquire`].
    pub fn try_acquire_now(&self) -> Option<ServerConn> {
        if self.paused() || !self.waiters.borrow().is_empty() {
            return None;
        }
        // One clock read decides all: whether the server needs server_check_query,
        // whether it sat long enough to need the liveness peek, and max_busy_cores.
        let now = Instant::now();
        let age = now.saturating_duration_since(self.idle.borrow().last()?.meta.last_used);
        if self.check_query.borrow().is_some() && age >= self.check_delay.get() {
            return None;
        }
        if self.busy_held(Some(now)).is_some() {
            return None;
        }
        let conn = if age < RECENTLY_USED {
            let mut conn = self.idle.borrow_mut().pop()?;
            self.shared.idle_add(self.worker, -1);
            conn.meta.via = AcquirePath::Idle;
            conn
        } else {
            self.pop_idle()?
        };
        Some(self.attached(conn, Some(now)))
    }

    /// Whether max_busy_cores holds new attachments back (`Some(when to look again)`);
    /// None when the budget is off, without reading the clock.
    #[inline]
    fn busy_held(&self, now: Option<Instant>) -> Option<Instant> {
        if !self.shared.busy.is_on() {
            return None;
        }
        self.shared.busy.over(now.unwrap_or_else(Instant::now))
    }

    /// A server handed to a client: under max_busy_cores, its busy time starts counting.
    /// It starts at the grant, not when the client's task runs: waiters served together
    /// then see each other's cost.
    #[inline]
    fn attached(&self, mut conn: ServerConn, now: Option<Instant>) -> ServerConn {
        if self.shared.busy.is_on() {
            conn.meta.busy = Some(self.shared.busy.attach(now.unwrap_or_else(Instant::now)));
        }
        conn
    }

    /// A server or a slot at once, unless clients here wait already: they go first.
    fn grant_now(&self) -> Option<Grant> {
        if self.paused() || !self.waiters.borrow().is_empty() || self.busy_held(None).is_some() {
            return None;
        }
        if let Some(conn) = self.pop_idle() {
            return Some(Grant::Server(self.attached(conn, None)));
        }
        if self.launching.get() > 0 {
            // A server is on its way: wait in line for it rather than open another.
            return None;
        }
        let now = Instant::now();
        if self.shared.gate.blocked(now).is_some() || !self.db_turn(SharedPool::stamp_of(now)) {
            return None;
        }
        (self.shared.try_reserve_upto(self.shared.cap()) == Reserve::Done).then_some(Grant::Slot)
    }

    /// Opens a server on a slot this worker holds; the slot goes on to someone else if
    /// the connection fails. `Err(None)`: server_login_retry holds new connections back
    /// for now, and the slot has been given back.
    async fn open(self: &Rc<Self>) -> Result<ServerConn, Option<PoolError>> {
        let probe = match self.shared.gate.admit(Instant::now()) {
            Admit::Open => false,
            Admit::Probe => true,
            Admit::Closed(_) => {
                self.slot_freed();
                return Err(None);
            }
        };
        let mut attempt = Attempt::new(self, probe);
        let (target, client_key) = self.shared.login_material();
        let res = connect(&target, client_key, &self.shared.database, self.worker).await;
        attempt.settled = true;
        let now = Instant::now();
        match res {
            Ok(conn) => {
                if self.shared.gate.report(probe, true, self.login_retry.get(), now) {
                    // The server is back: clients held back by the retry time may go.
                    self.wake_all();
                }
                self.shared.set_welcome(&conn.meta.settings);
                log::info!(
                    "S-{}: {}/{}@{} new connection to server (pid {})",
                    conn.meta.id,
                    self.shared.database,
                    target.user,
                    conn.meta.addr,
                    conn.meta.backend_pid
                );
                Ok(conn)
            }
            Err(e) => {
                log::warn!(
                    "{}/{}@{}:{} could not open a server connection: {e}",
                    self.shared.database,
                    target.user,
                    target.host,
                    target.port
                );
                self.shared.gate.report(probe, false, self.login_retry.get(), now);
                // With the gate closed the slot is not passed on; the waiters here and
                // on the other workers set their alarms for the retry time instead.
                self.slot_freed();
                Err(Some(e))
            }
        }
    }

    /// A server for a client, once it passes the cheap liveness peek and, when it sat
    /// unused longer than server_check_delay, server_check_query. A server failing either
    /// is closed (its slot freed) and None returned.
    async fn checked(&self, conn: ServerConn, peeked: bool) -> Option<ServerConn> {
        // A server handed over straight from its last client is alive: the peek (a
        // system call) is for servers that sat idle.
        if !peeked && conn.meta.last_used.elapsed() >= RECENTLY_USED && !conn.is_alive() {
            self.close(conn, "server conn crashed or was terminated while idle");
            return None;
        }
        // A server that has just logged in (a launch's) needs no check either.
        let query = self.check_query.borrow().clone();
        let due = conn.meta.via != AcquirePath::New && conn.meta.last_used.elapsed() >= self.check_delay.get();
        let Some(query) = query.filter(|_| due) else {
            return Some(conn);
        };
        let limit = self.shared.target().connect_timeout;
        let mut held = Checking {
            pool: self,
            conn: Some(conn),
        };
        let conn = held.conn.as_mut()?;
        let why = match monoio::time::timeout(limit, conn.internal_query(&query)).await {
            Ok(Ok(o)) if o.error.is_none() && o.tx_status == b'I' => return held.conn.take(),
            Ok(Ok(o)) => o
                .error
                .map(|e| e.to_string())
                .unwrap_or_else(|| "it left a transaction open".to_string()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {limit:?}"),
        };
        if let Some(conn) = held.conn.take() {
            self.close(conn, &format!("server_check_query failed: {why}"));
        }
        None
    }

    fn pop_idle(&self) -> Option<ServerConn> {
        loop {
            let mut conn = self.idle.borrow_mut().pop()?;
            self.shared.idle_add(self.worker, -1);
            // A server released moments ago is alive; the peek (a system call) is for
            // those that sat long enough to have been terminated or lost.
            if conn.meta.last_used.elapsed() < RECENTLY_USED || conn.is_alive() {
                conn.meta.via = AcquirePath::Idle;
                return Some(conn);
            }
            log::info!(
                "S-{}: closing because: server conn crashed or was terminated while idle",
                conn.meta.id
            );
            drop(conn);
            self.slot_freed();
        }
    }

    /// Waits in line. `launch`: the client holds a slot; a server is opened on it.
    async fn wait(
        self: &Rc<Self>,
        deadline: Option<Instant>,
        since: Instant,
        launch: bool,
    ) -> Result<Grant, PoolError> {
        let waiter = Rc::new(Waiter {
            grant: RefCell::new(None),
            waker: Cell::new(None),
            queued: Cell::new(false),
            since,
        });
        self.enqueue(&waiter);
        if launch {
            self.launch(Some(waiter.clone()), false);
        }
        // Published as waiting; now look for what others may have freed meanwhile.
        self.serve_waiters();
        let fut = WaitForGrant {
            pool: self,
            waiter,
            alarm: None,
        };
        match deadline {
            None => Ok(fut.await),
            Some(d) => match monoio::time::timeout_at(d.into(), fut).await {
                Ok(g) => Ok(g),
                Err(_) => Err(PoolError::WaitTimeout),
            },
        }
    }

    /// Queues a waiter in order of `since`: one that had to wait again keeps its place.
    fn enqueue(&self, waiter: &Rc<Waiter>) {
        let mut q = self.waiters.borrow_mut();
        let at = q.iter().rposition(|w| w.since <= waiter.since).map_or(0, |i| i + 1);
        q.insert(at, waiter.clone());
        waiter.queued.set(true);
        self.shared.waiting_add(self.worker, 1);
        self.shared.set_oldest(self.worker, q.front().map(|w| w.since));
    }

    /// Hands a waiter its grant, taking it out of the queue.
    fn grant_to(&self, waiter: &Rc<Waiter>, grant: Grant) {
        if !self.remove_waiter(waiter) {
            // Served meanwhile (closing a dead idle server hands out its slot) or gone:
            // the grant must not overwrite another nor be lost.
            match grant {
                Grant::Server(conn) => self.give(conn),
                Grant::Slot => self.slot_freed(),
                Grant::Failed(_) => {}
            }
            return;
        }
        let grant = match grant {
            Grant::Server(conn) => Grant::Server(self.attached(conn, None)),
            other => other,
        };
        *waiter.grant.borrow_mut() = Some(grant);
        if let Some(w) = waiter.waker.take() {
            w.wake();
        }
        // A client of another pool may have deferred to this one for room in the
        // database; if room is left, it is its turn now.
        let db = &self.shared.db;
        if db.cap() > 0 && db.total() < db.cap() {
            self.kick_db();
        }
    }

    /// Takes a waiter out of the queue; false if it was not in it.
    fn remove_waiter(&self, waiter: &Rc<Waiter>) -> bool {
        if !waiter.queued.get() {
            return false;
        }
        let mut q = self.waiters.borrow_mut();
        // Served waiters are mostly at the front.
        let Some(i) = q.iter().position(|w| Rc::ptr_eq(w, waiter)) else {
            return false;
        };
        q.remove(i);
        waiter.queued.set(false);
        self.shared.waiting_add(self.worker, -1);
        self.shared.set_oldest(self.worker, q.front().map(|w| w.since));
        true
    }

    fn next_waiter(&self) -> Option<Rc<Waiter>> {
        self.waiters.borrow().front().cloned()
    }

    fn is_front(&self, waiter: &Rc<Waiter>) -> bool {
        self.waiters.borrow().front().is_some_and(|w| Rc::ptr_eq(w, waiter))
    }

    /// Serves waiting clients in order from idle servers and fresh slots, until one
    /// cannot be served; that one (the front) gets an alarm if the reason has an end time.
    fn serve_waiters(&self) {
        self.recheck_at.set(None);
        while !self.paused() {
            let Some(w) = self.next_waiter() else {
                return;
            };
            if let Some(at) = self.busy_held(None) {
                self.hold_front(&w, Some(at));
                return;
            }
            if let Some(conn) = self.pop_idle() {
                self.grant_to(&w, Grant::Server(conn));
                continue;
            }
            if !self.wants_launch() {
                return;
            }
            match self.reserve(w.since) {
                Ok(()) => self.launch(self.first_uncovered(), false),
                Err(at) => {
                    self.hold_front(&w, at);
                    return;
                }
            }
        }
    }

    /// The front waiter `w` cannot be served now: it sleeps until `at` (its wait is woken
    /// to set the alarm), or (None) until something is freed.
    fn hold_front(&self, w: &Waiter, at: Option<Instant>) {
        self.recheck_at.set(at);
        if at.is_some() {
            if let Some(wk) = w.waker.take() {
                wk.wake();
            }
        }
    }

    /// Claims a slot for a client waiting since `since`, by PgBouncer's rules: not within
    /// server_login_retry of a failure, under the pool's cap (or its reserve, once the
    /// client has waited reserve_pool_timeout), and under max_db_connections, where the
    /// database's longest-waiting client goes first. `Err(at)`: not now; look again at
    /// `at`, or (None) when something is freed.
    fn reserve(&self, since: Instant) -> Result<(), Option<Instant>> {
        let now = Instant::now();
        if let Some(at) = self.shared.gate.blocked(now) {
            return Err(at);
        }
        if !self.db_turn(SharedPool::stamp_of(since)) {
            return Err(None);
        }
        let cap = self.shared.cap();
        match self.shared.try_reserve_upto(cap) {
            Reserve::Done => return Ok(()),
            Reserve::DbFull => return Err(self.make_db_room()),
            Reserve::PoolFull => {}
        }
        if let Some(w) = self.shared.worker_with_idle(self.worker) {
            self.post(
                w,
                PoolMsg::Steal {
                    pool: self.shared.clone(),
                    to: self.worker,
                },
            );
        }
        let extra = self.reserve_size.get();
        let Some(timeout) = self.reserve_timeout.get().filter(|_| extra > 0) else {
            return Err(None);
        };
        let at = since + timeout;
        if now < at {
            return Err(Some(at));
        }
        match self.shared.try_reserve_upto(cap + extra) {
            Reserve::Done => {
                log::warn!(
                    "{}/{}: taking connection from reserve_pool",
                    self.shared.database,
                    self.shared.user
                );
                Ok(())
            }
            Reserve::DbFull => Err(self.make_db_room()),
            Reserve::PoolFull => Err(None),
        }
    }

    /// The pool has room but the database is full: fetch an idle server of this pool from
    /// another worker, or have an idle server of another pool closed, as PgBouncer
    /// evicts one. The freed room comes back as a kick.
    fn make_db_room(&self) -> Option<Instant> {
        if let Some(w) = self.shared.worker_with_idle(self.worker) {
            self.post(
                w,
                PoolMsg::Steal {
                    pool: self.shared.clone(),
                    to: self.worker,
                },
            );
            return None;
        }
        for p in self.shared.db.pools() {
            if Arc::ptr_eq(&p, &self.shared) {
                continue;
            }
            if let Some(w) = p.any_worker_with_idle(self.worker) {
                self.post(w, PoolMsg::Evict { pool: p });
                return None;
            }
        }
        None
    }

    /// Whether a client of another pool of this database is waiting for room under
    /// max_db_connections, and since when (a stamp) and on which worker.
    fn needs_db_room(&self, p: &SharedPool) -> Option<(u64, usize)> {
        if p.paused.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let (oldest, worker) = p.oldest_waiter()?;
        let now = Instant::now();
        if p.gate.blocked(now).is_some() {
            return None;
        }
        let (total, cap) = (p.total(), p.cap());
        if total < cap {
            return Some((oldest, worker));
        }
        // At its cap it may still open a reserve connection for a client that has waited
        // long enough. The database's pools share the reserve settings.
        let extra = self.reserve_size.get();
        let timeout = self.reserve_timeout.get()?;
        let waited = SharedPool::stamp_of(now).saturating_sub(oldest);
        (extra > 0 && total < cap + extra && u128::from(waited) >= timeout.as_millis()).then_some((oldest, worker))
    }

    /// Under max_db_connections, whether a client waiting since `stamp` may take the
    /// database's room: no older client of another pool is waiting for it.
    fn db_turn(&self, stamp: u64) -> bool {
        if self.shared.db.cap() == 0 {
            return true;
        }
        !self
            .shared
            .db
            .pools()
            .iter()
            .filter(|p| !Arc::ptr_eq(p, &self.shared))
            .any(|p| self.needs_db_room(p).is_some_and(|(s, _)| s < stamp))
    }

    /// The database is full and a client of another pool has waited longer than any of
    /// this pool's: a server of this pool should be closed to make room for it.
    fn db_wants_room(&self) -> bool {
        let db = &self.shared.db;
        let cap = db.cap();
        if cap == 0 || db.total() < cap {
            return false;
        }
        let mine = self.shared.oldest_waiter().map(|(s, _)| s);
        db.pools()
            .iter()
            .filter(|p| !Arc::ptr_eq(p, &self.shared))
            .any(|p| self.needs_db_room(p).is_some_and(|(s, _)| mine.is_none_or(|m| s < m)))
    }

    /// Room came free in the database: kick the other pools whose clients wait for it.
    fn kick_db(&self) {
        if self.shared.db.cap() == 0 {
            return;
        }
        for p in self.shared.db.pools() {
            if Arc::ptr_eq(&p, &self.shared) {
                continue;
            }
            if let Some((_, w)) = self.needs_db_room(&p) {
                self.post(w, PoolMsg::Kick { pool: p });
            }
        }
    }

    /// Serves the waiters here and kicks every other worker with waiters of this pool.
    fn wake_all(&self) {
        self.serve_waiters();
        self.kick_waiters_elsewhere();
    }

    fn kick_waiters_elsewhere(&self) {
        for w in self.shared.workers_with_waiters(self.worker) {
            self.post(
                w,
                PoolMsg::Kick {
                    pool: self.shared.clone(),
                },
            );
        }
    }

    /// Returns a server after a client is done with it. `reusable` is false when the
    /// session state is unknown (client left mid-transaction, protocol trouble).
    pub fn release(&self, mut conn: ServerConn, reusable: bool) {
        let now = Instant::now();
        if let Some(ticket) = conn.meta.busy.take() {
            ticket.end(now);
        }
        let lifetime = self.server_lifetime.get();
        if !reusable {
            self.close(conn, "unclean server");
            return;
        }
        if !lifetime.is_zero() && now.saturating_duration_since(conn.meta.created) >= lifetime {
            self.close(conn, "server lifetime over");
            return;
        }
        conn.meta.last_used = now;
        conn.meta.mark(ConnState::Idle, 0);
        conn.meta.via = AcquirePath::Released;
        self.give_at(conn, Some(now));
    }

    fn close(&self, conn: ServerConn, why: &str) {
        log::info!(
            "S-{}: {}/{} closing because: {why}",
            conn.meta.id,
            self.shared.database,
            self.shared.user
        );
        self.close_then(conn, LocalPool::slot_freed);
    }

    /// A usable server: closed to make room if an older client of another pool of the
    /// database waits for room, else to a waiting client here, else idle here, and if
    /// another worker has clients waiting, over there.
    fn give(&self, conn: ServerConn) {
        self.give_at(conn, None);
    }

    /// `give`, with the clock already read (`now`) by a release. Under max_busy_cores,
    /// a server released while the pool is over its budget goes idle, and the clients
    /// waiting here and on other workers set their alarms for when the budget has room.
    fn give_at(&self, mut conn: ServerConn, now: Option<Instant>) {
        // A grant given up (its client went away while it was on the way) is not busy.
        if let Some(ticket) = conn.meta.busy.take() {
            ticket.end(now.unwrap_or_else(Instant::now));
        }
        if !self.paused() {
            if self.db_wants_room() {
                self.evict(conn);
                return;
            }
            if let Some(w) = self.next_waiter() {
                if self.busy_held(now).is_some() {
                    self.idle.borrow_mut().push(conn);
                    self.shared.idle_add(self.worker, 1);
                    // Sets the front waiter's alarm.
                    self.serve_waiters();
                    self.kick_waiters_elsewhere();
                    return;
                }
                match self.older_waiter_elsewhere(w.since) {
                    Some(other) => self.hand_over(other, conn),
                    None => self.grant_to(&w, Grant::Server(conn)),
                }
                return;
            }
        }
        self.idle.borrow_mut().push(conn);
        self.shared.idle_add(self.worker, 1);
        if let Some(w) = self.shared.worker_with_waiters(self.worker) {
            if self.busy_held(now).is_some() {
                // Their front waiters set their alarms; the server waits here until then.
                self.kick_waiters_elsewhere();
                return;
            }
            let conn = self.idle.borrow_mut().pop();
            if let Some(conn) = conn {
                self.shared.idle_add(self.worker, -1);
                self.hand_over(w, conn);
            }
        } else if !self.paused() && self.db_wants_room() {
            // Published as idle; a client of another pool may have begun waiting meanwhile.
            let conn = self.idle.borrow_mut().pop();
            if let Some(conn) = conn {
                self.shared.idle_add(self.worker, -1);
                self.evict(conn);
            }
        }
    }

    /// Another worker whose longest-waiting client has waited clearly longer than this
    /// worker's (`since`): the server goes there. Without this, a worker whose own clients
    /// always wait keeps every server it holds, and the other worker's clients starve for
    /// seconds under saturation. The margin (half the local wait, plus two milliseconds)
    /// keeps servers from crossing over for differences that do not matter: each crossing
    /// costs a message, a wake-up and re-registering the socket, and under even load the
    /// two queues' ages differ a little all the time.
    fn older_waiter_elsewhere(&self, since: Instant) -> Option<usize> {
        let (oldest, worker) = self.shared.oldest_waiter()?;
        if worker == self.worker {
            return None;
        }
        let waited = since.elapsed().as_millis() as u64;
        let margin = 2 + waited / 2;
        (oldest + margin < SharedPool::stamp_of(since)).then_some(worker)
    }

    /// Closes a server so that its room in the database goes to another pool's client.
    fn evict(&self, conn: ServerConn) {
        log::info!(
            "S-{}: {}/{} closing because: evicted",
            conn.meta.id,
            self.shared.database,
            self.shared.user
        );
        self.close_then(conn, |pool| {
            pool.shared.unreserve();
            pool.slot_released();
        });
    }

    /// Another pool's client needs room in the database: close the least recently used
    /// idle server here, unless this pool's own clients wait.
    fn evict_idle(&self) {
        if self.next_waiter().is_some() {
            return;
        }
        let conn = {
            let mut idle = self.idle.borrow_mut();
            if idle.is_empty() {
                return;
            }
            idle.remove(0)
        };
        self.shared.idle_add(self.worker, -1);
        self.evict(conn);
    }

    /// A connection closed (or failed to open): its slot goes to a waiting client here,
    /// else to a worker with waiting clients, else back under the caps (where the
    /// database's other pools may take it).
    pub fn slot_freed(&self) {
        if self.pass_slot_here() {
            return;
        }
        self.shared.unreserve();
        self.slot_released();
    }

    /// Passes a freed slot to the next client here if it may use it: not while paused,
    /// nor within server_login_retry, nor when the slot was a reserve one (above the cap),
    /// nor when an older client of another pool waits for room in the database.
    fn pass_slot_here(&self) -> bool {
        if self.paused() || self.shared.total() > self.shared.cap() || self.busy_held(None).is_some() {
            return false;
        }
        if self.shared.gate.blocked(Instant::now()).is_some() {
            return false;
        }
        let Some(w) = self.next_waiter() else {
            return false;
        };
        if !self.db_turn(SharedPool::stamp_of(w.since)) || !self.wants_launch() {
            return false;
        }
        self.launch(self.first_uncovered(), false);
        true
    }

    /// A slot went back under the caps: serve the clients here by the usual rules, pass
    /// a slot to one other worker with waiting clients and kick the rest (they may need
    /// an alarm for the retry time, or may now use the reserve), and tell the database's
    /// other pools.
    fn slot_released(&self) {
        self.serve_waiters();
        let mut slot_sent = false;
        for w in self.shared.workers_with_waiters(self.worker) {
            let pool = self.shared.clone();
            if !slot_sent && self.may_send_slot() && self.shared.try_reserve() {
                slot_sent = true;
                self.post(w, PoolMsg::Slot { pool });
            } else {
                self.post(w, PoolMsg::Kick { pool });
            }
        }
        self.kick_db();
    }

    fn may_send_slot(&self) -> bool {
        !self.paused()
            && self.busy_held(None).is_none()
            && self.shared.gate.blocked(Instant::now()).is_none()
            && self.shared.oldest_waiter().is_none_or(|(s, _)| self.db_turn(s))
    }

    /// Sends an idle server to another worker.
    fn hand_over(&self, worker: usize, conn: ServerConn) {
        match conn.detach() {
            Some(parts) => self.post(
                worker,
                PoolMsg::Handover {
                    pool: self.shared.clone(),
                    parts: Box::new(parts),
                },
            ),
            None => self.slot_freed(),
        }
    }

    /// Handles a message from another worker about this pool.
    pub fn on_message(&self, msg: PoolMsg) {
        match msg {
            PoolMsg::Steal { to, .. } => {
                if self.next_waiter().is_none() {
                    if let Some(conn) = self.pop_idle() {
                        self.hand_over(to, conn);
                    }
                }
            }
            PoolMsg::Handover { parts, .. } => match ServerConn::adopt(*parts, self.worker) {
                Ok(conn) => self.give(conn),
                Err(e) => {
                    log::warn!("could not adopt a server connection from another worker: {e}");
                    self.slot_freed();
                }
            },
            PoolMsg::Slot { .. } => match self
                .first_uncovered()
                .filter(|_| self.wants_launch() && self.busy_held(None).is_none())
            {
                Some(w) => self.launch(Some(w), false),
                // Launches in flight here will serve the waiters: not passed on again,
                // or two workers could bounce it between them. Under max_busy_cores
                // the waiters set their alarms.
                None if self.next_waiter().is_some() => {
                    self.shared.unreserve();
                    self.wake_all();
                }
                None => {
                    // The waiters it was meant for have gone.
                    self.shared.unreserve();
                    self.slot_released();
                }
            },
            PoolMsg::Kick { .. } => self.serve_waiters(),
            PoolMsg::Evict { .. } => self.evict_idle(),
        }
    }

    fn post(&self, worker: usize, msg: PoolMsg) {
        let Some(tx) = self.postman.get(worker) else {
            return;
        };
        if let Err(e) = tx.unbounded_send(msg) {
            // The receiving worker has stopped: keep the caps honest.
            match e.into_inner() {
                PoolMsg::Handover { .. } | PoolMsg::Slot { .. } => self.shared.unreserve(),
                PoolMsg::Steal { .. } | PoolMsg::Kick { .. } | PoolMsg::Evict { .. } => {}
            }
        }
    }

    /// Periodic upkeep, once a second: expired idle servers; waiting clients served again
    /// (a safety net should a wake-up have been lost); and, when `open_new`, servers
    /// opened in the background up to min_pool_size.
    pub fn maintain(self: &Rc<Self>, open_new: bool) {
        self.close_expired();
        if self.next_waiter().is_some() {
            self.serve_waiters();
        }
        if open_new {
            self.fill_min_pool();
        }
    }

    /// Opens servers in the background until the pool (across workers) has
    /// min_pool_size, never above its cap nor max_db_connections, and only when no client
    /// of the database waits for room and no login failed within server_login_retry.
    fn fill_min_pool(self: &Rc<Self>) {
        let min = self.min_size.get().min(self.shared.cap());
        if min == 0 || self.paused() || !self.shared.can_log_in() {
            return;
        }
        let now = Instant::now();
        if self.shared.gate.blocked(now).is_some() || !self.db_turn(SharedPool::stamp_of(now)) {
            return;
        }
        while self.launching.get() < launch::LOGINS_AT_ONCE && self.shared.try_reserve_upto(min) == Reserve::Done {
            self.launch(None, true);
        }
    }

    /// Closes idle servers past server_idle_timeout (keeping min_pool_size open) or
    /// server_lifetime.
    pub fn close_expired(&self) {
        let idle_timeout = self.server_idle_timeout.get();
        let lifetime = self.server_lifetime.get();
        let keep = self.min_size.get();
        let mut open = self.shared.total();
        let mut expired = Vec::new();
        {
            let mut idle = self.idle.borrow_mut();
            let mut i = 0;
            while i < idle.len() {
                let m = &idle[i].meta;
                let too_idle = !idle_timeout.is_zero() && m.last_used.elapsed() >= idle_timeout && open > keep;
                let too_old = !lifetime.is_zero() && m.created.elapsed() >= lifetime;
                if too_idle || too_old || !idle[i].is_alive() {
                    expired.push(idle.swap_remove(i));
                    open = open.saturating_sub(1);
                } else {
                    i += 1;
                }
            }
        }
        for conn in expired {
            self.shared.idle_add(self.worker, -1);
            self.close(conn, "server idle timeout, lifetime, or lost while idle");
        }
    }

    fn paused(&self) -> bool {
        self.shared.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// After RESUME: serve waiting clients from idle servers or fresh slots.
    pub fn kick(&self) {
        self.serve_waiters();
    }

    /// Closes every idle server (shutdown, KILL, a changed target after reload).
    pub fn close_all_idle(&self, why: &str) {
        let idle = std::mem::take(&mut *self.idle.borrow_mut());
        for conn in idle {
            self.shared.idle_add(self.worker, -1);
            self.close(conn, why);
        }
    }

    /// Idle servers' ids and backend pids, for the admin console.
    pub fn idle_servers(&self) -> Vec<(u64, u32, u16, Instant, Instant)> {
        self.idle
            .borrow()
            .iter()
            .map(|c| {
                (
                    c.meta.id,
                    c.meta.backend_pid,
                    c.meta.local_port,
                    c.meta.created,
                    c.meta.last_used,
                )
            })
            .collect()
    }
}

/// A connection attempt in progress: if the client's task ends before it settles, the
/// slot and the login probe must not be lost with it.
struct Attempt<'a> {
    pool: &'a LocalPool,
    probe: bool,
    settled: bool,
}

impl<'a> Attempt<'a> {
    fn new(pool: &'a LocalPool, probe: bool) -> Attempt<'a> {
        WorkerPoolStats::add(&pool.stats().servers_login, 1);
        Attempt {
            pool,
            probe,
            settled: false,
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        WorkerPoolStats::add(&self.pool.stats().servers_login, -1);
        if !self.settled {
            self.pool.shared.gate.abandon(self.probe);
            self.pool.slot_freed();
            if self.probe {
                self.pool.wake_all();
            }
        }
    }
}

/// A server under server_check_query: closed (its slot freed) if the client's task ends
/// before the check does.
struct Checking<'a> {
    pool: &'a LocalPool,
    conn: Option<ServerConn>,
}

impl Drop for Checking<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.close(conn, "client gave up during server_check_query");
        }
    }
}

struct WaitForGrant<'a> {
    pool: &'a Rc<LocalPool>,
    waiter: Rc<Waiter>,
    /// The front waiter's alarm for `recheck_at`, and the time it is set for.
    alarm: Option<(Instant, Pin<Box<monoio::time::Sleep>>)>,
}

impl Future for WaitForGrant<'_> {
    type Output = Grant;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Grant> {
        let this = &mut *self;
        // Bounded: serve_waiters only sets alarms in the future, but a clock that jumps
        // must not make this spin.
        for _ in 0..4 {
            if let Some(g) = this.waiter.grant.borrow_mut().take() {
                return Poll::Ready(g);
            }
            // The session polls its wait at each of its wake-ups: keep the waker it has
            // unless it changed (a clone is an atomic increment and a decrement later).
            let waker = match this.waiter.waker.take() {
                Some(w) if w.will_wake(cx.waker()) => w,
                _ => cx.waker().clone(),
            };
            this.waiter.waker.set(Some(waker));
            let at = if this.pool.is_front(&this.waiter) {
                this.pool.recheck_at.get()
            } else {
                None
            };
            let Some(at) = at else {
                this.alarm = None;
                return Poll::Pending;
            };
            if this.alarm.as_ref().is_none_or(|(t, _)| *t != at) {
                this.alarm = Some((at, Box::pin(monoio::time::sleep_until(at.into()))));
            }
            let Some((_, sleep)) = this.alarm.as_mut() else {
                return Poll::Pending;
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.alarm = None;
            this.pool.recheck_at.set(None);
            this.pool.serve_waiters();
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for WaitForGrant<'_> {
    /// A wait abandoned (timeout, client gone) must not strand what it was given, nor
    /// the alarm the next client in line may need.
    fn drop(&mut self) {
        let queued = self.pool.remove_waiter(&self.waiter);
        let grant = self.waiter.grant.borrow_mut().take();
        match grant {
            Some(Grant::Server(conn)) => self.pool.give(conn),
            Some(Grant::Slot) => self.pool.slot_freed(),
            Some(Grant::Failed(_)) => {}
            None => {}
        }
        if queued {
            self.pool.serve_waiters();
        }
    }
}
