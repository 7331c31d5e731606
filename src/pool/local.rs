//! One worker's share of a pool: its idle servers, its waiting clients, and the
//! hand-over protocol that keeps the instance-wide cap without letting a client wait
//! while another worker sits on an idle server.
//!
//! The rule that makes hand-over race-free is Dekker's: a worker publishes its own state
//! (an idle server, a waiting client, a freed slot) before it looks at the other workers'
//! advertisements, with sequentially consistent atomics. Of two workers acting at once,
//! at least one sees the other, and duplicates are harmless (a steal request finding
//! nothing is ignored; a server arriving with no one waiting goes idle).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_channel::mpsc::UnboundedSender;

use super::connect::connect;
use super::server::{ServerConn, ServerParts};
use super::shared::SharedPool;
use super::PoolError;
use crate::metrics::{ConnState, WorkerPoolStats};

/// Messages between workers about one pool.
pub enum PoolMsg {
    /// "I have clients waiting; send me an idle server if you have one to spare."
    Steal { pool: Arc<SharedPool>, to: usize },
    /// A server moving to the receiving worker.
    Handover {
        pool: Arc<SharedPool>,
        parts: Box<ServerParts>,
    },
    /// One connection slot under the cap, transferred: the receiver may open a server.
    Slot { pool: Arc<SharedPool> },
}

/// The senders of every worker's pool inbox, indexed by worker.
pub type Postman = Arc<Vec<UnboundedSender<PoolMsg>>>;

enum Grant {
    Server(Box<ServerConn>),
    /// A reserved slot: the waiter opens the connection itself.
    Slot,
}

struct Waiter {
    grant: RefCell<Option<Grant>>,
    waker: Cell<Option<Waker>>,
}

pub struct LocalPool {
    pub shared: Arc<SharedPool>,
    worker: usize,
    postman: Postman,
    /// LIFO, like PgBouncer's default: the most recently used server is warmest.
    idle: RefCell<Vec<ServerConn>>,
    waiters: RefCell<VecDeque<Rc<Waiter>>>,
    pub server_idle_timeout: Cell<Duration>,
    pub server_lifetime: Cell<Duration>,
}

impl LocalPool {
    pub fn new(shared: Arc<SharedPool>, worker: usize, postman: Postman) -> LocalPool {
        LocalPool {
            shared,
            worker,
            postman,
            idle: RefCell::new(Vec::new()),
            waiters: RefCell::new(VecDeque::new()),
            server_idle_timeout: Cell::new(Duration::from_secs(600)),
            server_lifetime: Cell::new(Duration::from_secs(3600)),
        }
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

    /// Gets a server for a client: an idle one here, a new one under the cap, or the next
    /// one released anywhere in the instance. Gives up after `wait_timeout` (None: never).
    pub async fn acquire(self: &Rc<Self>, wait_timeout: Option<Duration>) -> Result<ServerConn, PoolError> {
        let deadline = wait_timeout.map(|t| Instant::now() + t);
        loop {
            if !self.paused() {
                if let Some(conn) = self.pop_idle() {
                    return Ok(conn);
                }
                if self.shared.try_reserve() {
                    return self.open().await;
                }
            }
            match self.wait(deadline).await? {
                Grant::Server(conn) if conn.is_alive() => return Ok(*conn),
                Grant::Server(conn) => {
                    drop(conn);
                    self.slot_freed();
                }
                Grant::Slot => return self.open().await,
            }
        }
    }

    /// Opens a server on a slot this worker already holds; the slot goes on to someone
    /// else if the connection fails.
    async fn open(self: &Rc<Self>) -> Result<ServerConn, PoolError> {
        let stats = self.stats();
        WorkerPoolStats::add(&stats.servers_login, 1);
        let target = self.shared.target();
        let res = connect(
            &target,
            self.shared.scram_client_key(),
            &self.shared.database,
            self.worker,
        )
        .await;
        WorkerPoolStats::add(&stats.servers_login, -1);
        match res {
            Ok(conn) => {
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
                self.slot_freed();
                Err(e)
            }
        }
    }

    fn pop_idle(&self) -> Option<ServerConn> {
        loop {
            let conn = self.idle.borrow_mut().pop()?;
            self.shared.idle_add(self.worker, -1);
            if conn.is_alive() {
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

    async fn wait(self: &Rc<Self>, deadline: Option<Instant>) -> Result<Grant, PoolError> {
        let waiter = Rc::new(Waiter {
            grant: RefCell::new(None),
            waker: Cell::new(None),
        });
        self.waiters.borrow_mut().push_back(waiter.clone());
        self.shared.waiting_add(self.worker, 1);
        // Published as waiting; now look for what others may have freed meanwhile.
        if !self.paused() && self.shared.try_reserve() {
            self.grant_to(&waiter, Grant::Slot);
        } else if let Some(w) = self.shared.worker_with_idle(self.worker) {
            self.post(
                w,
                PoolMsg::Steal {
                    pool: self.shared.clone(),
                    to: self.worker,
                },
            );
        }
        let fut = WaitForGrant { pool: self, waiter };
        match deadline {
            None => Ok(fut.await),
            Some(d) => match monoio::time::timeout_at(d.into(), fut).await {
                Ok(g) => Ok(g),
                Err(_) => Err(PoolError::WaitTimeout),
            },
        }
    }

    /// Hands a waiter its grant. The waiter has already been removed from the queue.
    fn grant_to(&self, waiter: &Rc<Waiter>, grant: Grant) {
        self.remove_waiter(waiter);
        *waiter.grant.borrow_mut() = Some(grant);
        if let Some(w) = waiter.waker.take() {
            w.wake();
        }
    }

    fn remove_waiter(&self, waiter: &Rc<Waiter>) {
        let mut q = self.waiters.borrow_mut();
        if let Some(i) = q.iter().position(|w| Rc::ptr_eq(w, waiter)) {
            q.remove(i);
            self.shared.waiting_add(self.worker, -1);
        }
    }

    fn next_waiter(&self) -> Option<Rc<Waiter>> {
        self.waiters.borrow().front().cloned()
    }

    /// Returns a server after a client is done with it. `reusable` is false when the
    /// session state is unknown (client left mid-transaction, protocol trouble).
    pub fn release(&self, mut conn: ServerConn, reusable: bool) {
        let lifetime = self.server_lifetime.get();
        if !reusable {
            self.close(conn, "unclean server");
            return;
        }
        if !lifetime.is_zero() && conn.meta.created.elapsed() >= lifetime {
            self.close(conn, "server lifetime over");
            return;
        }
        conn.meta.last_used = Instant::now();
        conn.meta.mark(ConnState::Idle, 0);
        self.give(conn);
    }

    fn close(&self, conn: ServerConn, why: &str) {
        log::info!(
            "S-{}: {}/{} closing because: {why}",
            conn.meta.id,
            self.shared.database,
            self.shared.user
        );
        drop(conn);
        self.slot_freed();
    }

    /// A usable server: to a waiting client here, else idle here, and if another worker
    /// has clients waiting, over there.
    fn give(&self, conn: ServerConn) {
        if let Some(w) = self.next_waiter().filter(|_| !self.paused()) {
            self.grant_to(&w, Grant::Server(Box::new(conn)));
            return;
        }
        self.idle.borrow_mut().push(conn);
        self.shared.idle_add(self.worker, 1);
        if let Some(w) = self.shared.worker_with_waiters(self.worker) {
            if let Some(conn) = self.idle.borrow_mut().pop() {
                self.shared.idle_add(self.worker, -1);
                self.post(
                    w,
                    PoolMsg::Handover {
                        pool: self.shared.clone(),
                        parts: Box::new(conn.detach()),
                    },
                );
            }
        }
    }

    /// A connection closed (or failed to open): its slot goes to a waiting client here,
    /// else to a worker with waiting clients, else back under the cap.
    pub fn slot_freed(&self) {
        if let Some(w) = self.next_waiter().filter(|_| !self.paused()) {
            self.grant_to(&w, Grant::Slot);
            return;
        }
        self.shared.unreserve();
        if self.shared.worker_with_waiters(self.worker).is_some() && self.shared.try_reserve() {
            match self.shared.worker_with_waiters(self.worker) {
                Some(w) => self.post(
                    w,
                    PoolMsg::Slot {
                        pool: self.shared.clone(),
                    },
                ),
                None => self.shared.unreserve(),
            }
        }
    }

    /// Handles a message from another worker about this pool.
    pub fn on_message(&self, msg: PoolMsg) {
        match msg {
            PoolMsg::Steal { to, .. } => {
                if self.next_waiter().is_none() {
                    if let Some(conn) = self.pop_idle() {
                        self.post(
                            to,
                            PoolMsg::Handover {
                                pool: self.shared.clone(),
                                parts: Box::new(conn.detach()),
                            },
                        );
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
            PoolMsg::Slot { .. } => match self.next_waiter() {
                Some(w) => self.grant_to(&w, Grant::Slot),
                None => self.slot_freed_elsewhere(),
            },
        }
    }

    /// A slot arrived for waiters that have gone: pass it on or give it back.
    fn slot_freed_elsewhere(&self) {
        match self.shared.worker_with_waiters(self.worker) {
            Some(w) => self.post(
                w,
                PoolMsg::Slot {
                    pool: self.shared.clone(),
                },
            ),
            None => self.shared.unreserve(),
        }
    }

    fn post(&self, worker: usize, msg: PoolMsg) {
        let Some(tx) = self.postman.get(worker) else {
            return;
        };
        if let Err(e) = tx.unbounded_send(msg) {
            // The receiving worker has stopped: keep the cap honest.
            match e.into_inner() {
                PoolMsg::Handover { .. } | PoolMsg::Slot { .. } => self.shared.unreserve(),
                PoolMsg::Steal { .. } => {}
            }
        }
    }

    /// Closes idle servers past server_idle_timeout or server_lifetime. Run periodically.
    pub fn close_expired(&self) {
        let idle_timeout = self.server_idle_timeout.get();
        let lifetime = self.server_lifetime.get();
        let mut expired = Vec::new();
        {
            let mut idle = self.idle.borrow_mut();
            let mut i = 0;
            while i < idle.len() {
                let m = &idle[i].meta;
                let too_idle = !idle_timeout.is_zero() && m.last_used.elapsed() >= idle_timeout;
                let too_old = !lifetime.is_zero() && m.created.elapsed() >= lifetime;
                if too_idle || too_old || !idle[i].is_alive() {
                    expired.push(idle.swap_remove(i));
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
        while !self.paused() {
            let Some(w) = self.next_waiter() else {
                return;
            };
            if let Some(conn) = self.pop_idle() {
                self.grant_to(&w, Grant::Server(Box::new(conn)));
            } else if self.shared.try_reserve() {
                self.grant_to(&w, Grant::Slot);
            } else {
                return;
            }
        }
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

struct WaitForGrant<'a> {
    pool: &'a Rc<LocalPool>,
    waiter: Rc<Waiter>,
}

impl Future for WaitForGrant<'_> {
    type Output = Grant;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Grant> {
        if let Some(g) = self.waiter.grant.borrow_mut().take() {
            return Poll::Ready(g);
        }
        self.waiter.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

impl Drop for WaitForGrant<'_> {
    /// A wait abandoned (timeout, client gone) must not strand what it was given.
    fn drop(&mut self) {
        self.pool.remove_waiter(&self.waiter);
        match self.waiter.grant.borrow_mut().take() {
            Some(Grant::Server(conn)) => self.pool.give(*conn),
            Some(Grant::Slot) => self.pool.slot_freed(),
            None => {}
        }
    }
}
