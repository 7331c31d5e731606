//! Opening servers for waiting clients without tying a client to the connection opened
//! for it. A client that finds no idle server but room under the caps has a connection
//! started on that slot (a *launch*, a task of the pool's own) and waits in line like
//! any other: it takes whichever server reaches the front of the line first, a server
//! another client released or the first launch to log in, and a launch's server goes to
//! the next client in line or to the idle list. Under a burst of clients on a cold pool
//! this serves them from the first servers while more log in, instead of each client
//! waiting out a login of its own on a PostgreSQL busy starting all the others.
//!
//! Launches are counted: a slot is claimed for waiting clients only beyond those the
//! launches in flight will serve, and at most [`LOGINS_AT_ONCE`] run at once per pool on
//! a worker (PgBouncer opens one at a time per pool). A launch that fails gives its
//! error to the client it was started for, if that client still waits.

use super::*;

/// Logins in flight per pool on one worker. Each backend costs PostgreSQL a fork and a
/// login; started all at once they share its CPU and the first is ready no sooner than
/// the last. A few at a time serve a burst sooner, and the pool keeps growing for as
/// long as clients wait.
pub(super) const LOGINS_AT_ONCE: usize = 2;

impl LocalPool {
    /// Whether a client waiting here is not yet covered by a launch in flight: only then
    /// is a slot claimed for it, and only while fewer than [`LOGINS_AT_ONCE`] run.
    pub(super) fn wants_launch(&self) -> bool {
        let launching = self.launching.get();
        launching < LOGINS_AT_ONCE && self.waiters.borrow().len() > launching
    }

    /// The first client in line that no launch in flight is for: the one a new launch's
    /// failure goes to (the servers themselves go to whoever is first in line).
    pub(super) fn first_uncovered(&self) -> Option<Rc<Waiter>> {
        self.waiters.borrow().get(self.launching.get()).cloned()
    }

    /// Opens a server on a slot this worker holds, in a task of the pool's own; the
    /// server goes to the front of the line (or idle). `waiter`: the client it is for,
    /// given the error if it fails. `filling`: opened for min_pool_size, which goes on
    /// filling as each login ends rather than at the next maintenance tick.
    pub(super) fn launch(&self, waiter: Option<Rc<Waiter>>, filling: bool) {
        let Some(pool) = self.me.upgrade() else {
            self.slot_freed();
            return;
        };
        self.launching.set(self.launching.get() + 1);
        monoio::spawn(async move {
            let res = pool.open().await;
            pool.launching.set(pool.launching.get().saturating_sub(1));
            match res {
                Ok(mut conn) => {
                    conn.meta.last_used = Instant::now();
                    conn.meta.mark(ConnState::Idle, 0);
                    pool.give(conn);
                    if filling {
                        pool.fill_min_pool();
                    }
                }
                // open() logged it and passed the slot on.
                Err(Some(e)) => {
                    if let Some(w) = waiter {
                        pool.grant_to(&w, Grant::Failed(e));
                    }
                }
                // server_login_retry holds logins back; serve_waiters sets the alarm.
                Err(None) => {}
            }
            // Clients may wait beyond what the launches left in flight will serve.
            pool.serve_waiters();
        });
    }
}
