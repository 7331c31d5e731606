//! One worker's state, shared by the worker's tasks (never across threads): its side of
//! each pool, its sessions, its forwarding buffers, and how it acts on control messages.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use monoio::io::{CancelHandle, Canceller};

use super::control::{ControlMsg, Sessions};
use super::instance::{Instance, Phase};
use super::logins::PendingLogins;
use crate::pool::{AuthLookups, LocalPool, Postman, SharedPool};
use crate::protocol::BufPool;

/// Per-worker state, shared by the worker's tasks (never across threads).
pub struct WorkerCtx {
    pub instance: Arc<Instance>,
    pub id: usize,
    postman: Postman,
    pools: RefCell<HashMap<usize, Rc<LocalPool>>>,
    /// The worker's client sessions, for KILL and shutdown.
    pub sessions: Sessions,
    /// Stops the accept loops (cancelling their in-flight accepts) when draining.
    accept_stop: RefCell<Option<Canceller>>,
    /// Forwarding buffers of pkt_buf bytes, shared by the worker's sessions.
    pub bufs: Rc<BufPool>,
    /// auth_query: this worker's lookup connections and the secrets they found.
    pub auth_lookups: AuthLookups,
    /// Connections accepted here that have not authenticated yet, and their budget.
    pub logins: Rc<PendingLogins>,
}

impl WorkerCtx {
    /// This worker's side of a pool, created on first use.
    pub fn local_pool(&self, shared: &Arc<SharedPool>) -> Rc<LocalPool> {
        if let Some(p) = self.pools.borrow().get(&shared.id) {
            return p.clone();
        }
        let pool = LocalPool::new(shared.clone(), self.id, self.postman.clone());
        self.apply_timeouts(&pool);
        self.pools.borrow_mut().insert(shared.id, pool.clone());
        pool
    }

    pub fn local_pools(&self) -> Vec<Rc<LocalPool>> {
        self.pools.borrow().values().cloned().collect()
    }

    fn local_pools_of(&self, database: Option<&str>) -> Vec<Rc<LocalPool>> {
        self.local_pools()
            .into_iter()
            .filter(|p| database.is_none_or(|d| p.shared.database == d))
            .collect()
    }

    /// A worker's state for `instance`, its pools empty, accepting.
    pub fn new(instance: Arc<Instance>, id: usize, postman: Postman) -> WorkerCtx {
        let bufs = Rc::new(BufPool::new(instance.config().general.pkt_buf.max(1024)));
        WorkerCtx {
            instance,
            id,
            postman,
            pools: RefCell::new(HashMap::new()),
            sessions: Sessions::default(),
            accept_stop: RefCell::new(Some(Canceller::new())),
            bufs,
            auth_lookups: AuthLookups::default(),
            logins: Rc::new(PendingLogins::default()),
        }
    }

    /// What an accept loop's accepts are cancelled with; None once the worker stopped
    /// accepting.
    pub fn accept_handle(&self) -> Option<CancelHandle> {
        self.accept_stop.borrow().as_ref().map(|c| c.handle())
    }

    /// The worker has stopped accepting (draining).
    pub fn stopped_accepting(&self) -> bool {
        self.accept_stop.borrow().is_none()
    }

    fn stop_accepting(&self) {
        if let Some(c) = self.accept_stop.borrow_mut().take() {
            let _ = c.cancel();
        }
    }

    /// Acts on a control message from the main thread or an admin session.
    pub fn on_control(&self, msg: ControlMsg) {
        match msg {
            ControlMsg::Phase(phase) => {
                if phase >= Phase::Draining {
                    self.stop_accepting();
                }
                self.sessions.enter_phase(phase);
            }
            ControlMsg::Kill { database } => {
                self.sessions.each(|s| {
                    if database.as_deref().is_none_or(|d| d == s.database) {
                        s.kill("database connections killed by the admin console (KILL)");
                    }
                });
                for pool in self.local_pools_of(database.as_deref()) {
                    pool.close_all_idle("KILL");
                }
            }
            ControlMsg::CloseIdle { database } => {
                for pool in self.local_pools_of(database.as_deref()) {
                    pool.close_all_idle("PAUSE");
                }
            }
            ControlMsg::Kick => {
                for pool in self.local_pools() {
                    pool.kick();
                }
            }
            ControlMsg::Notify { to, msg } => self.sessions.subscribers.notify(&to, &msg),
            ControlMsg::Reload => {
                self.auth_lookups.reset();
                for pool in self.local_pools() {
                    self.apply_timeouts(&pool);
                }
            }
        }
    }

    fn apply_timeouts(&self, pool: &LocalPool) {
        pool.configure(&self.instance.config());
    }
}
