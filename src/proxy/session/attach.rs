//! A server for the session: asking the pool for one when the client's bytes need it,
//! attaching it (with the client's settings), and handing it back when the pool mode
//! allows: clean, or with the statement that must run on it first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ops::{acquire, Acquire};
use super::{Flow, SessionError};
use crate::config::PoolMode;
use crate::context::cancel::{CancelTarget, CANCEL_TIMEOUT};
use crate::metrics::{ConnState, WorkerPoolStats};
use crate::pool::{PoolError, ServerConn, ServerMeta, ServerRd, ServerWr};
use crate::proxy::downstream::Hold;
use crate::proxy::params::{after_sync, sync_statement};
use crate::proxy::upstream;

/// Stands for the configured server_reset_query in [`Flow::release_now`]'s answer.
pub(super) const RESET_QUERY: &str = "server_reset_query";
/// In [`Flow::release_now`]'s answer: no statement, only wait for cancels in flight.
pub(super) const NOTHING: &str = "";

/// The server a client is using, in pieces while the operations own them.
pub(super) struct Attached {
    pub(super) rd: Option<ServerRd>,
    pub(super) wr: Option<ServerWr>,
    pub(super) meta: Box<ServerMeta>,
}

impl Flow {
    /// No server, and the client's buffered bytes hold a message that needs one.
    pub(super) fn wants_acquire(&self) -> bool {
        self.server.is_none()
            && !self.client.gone
            && self.up.want == 0
            && self
                .up
                .buf
                .as_ref()
                .is_some_and(|b| upstream::peek(b.data()).is_ok_and(|p| p.needs_server))
    }

    /// Starts waiting in the pool (no idle server on this worker). query_wait_timeout is
    /// the session timer's (`deadline.rs`), not the pool's.
    pub(super) fn wait_for_server(&mut self) -> Acquire {
        self.timing.wait_started = Some(Instant::now());
        self.timing.probing = false;
        self.who.entry.entry.set_state(ConnState::Waiting);
        acquire(self.who.pool.clone(), None)
    }

    /// A server for the client's pending request: attaches it when its settings already
    /// match the client's (the common case); otherwise hands it back for
    /// [`Flow::sync_then_plug`], which makes them the client's first and which the caller
    /// runs boxed, so its large future does not sit in every session's state.
    pub(super) fn try_plug(&mut self, conn: ServerConn) -> Option<ServerConn> {
        if sync_statement(&self.who.settings, &conn.meta).is_some() {
            return Some(conn);
        }
        self.plug(conn);
        None
    }

    pub(super) async fn sync_then_plug(&mut self, mut conn: ServerConn) -> Result<(), SessionError> {
        if let Some(sql) = sync_statement(&self.who.settings, &conn.meta) {
            match Box::pin(conn.internal_query(&sql)).await {
                Ok(outcome) if outcome.error.is_none() && outcome.tx_status == b'I' => {
                    after_sync(
                        Arc::make_mut(&mut self.who.settings),
                        &mut conn.meta,
                        &self.params.welcome,
                    );
                }
                Ok(outcome) => {
                    self.who.pool.release(conn, false);
                    let msg = outcome
                        .error
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "settings left a transaction open".into());
                    log::warn!("C-{}: could not apply session settings: {msg}", self.who.id);
                    return Err(PoolError::Connect(format!("could not apply session settings: {msg}")).into());
                }
                Err(e) => {
                    self.who.pool.release(conn, false);
                    return Err(e.into());
                }
            }
        }
        self.plug(conn);
        Ok(())
    }

    /// The server becomes the session's: cancel target, bookkeeping, halves.
    fn plug(&mut self, conn: ServerConn) {
        self.who.cancel.set(conn.meta.backend_secret.map(|secret| CancelTarget {
            addr: conn.meta.addr,
            pid: conn.meta.backend_pid,
            secret,
        }));
        WorkerPoolStats::add(&self.who.pool.stats().servers_active, 1);
        conn.meta.mark(ConnState::Active, self.who.id);
        self.who.entry.entry.set_state(ConnState::Active);
        self.who.entry.entry.set_link(conn.meta.id);
        let (rd, wr, meta) = conn.split();
        self.server = Some(Attached {
            rd: Some(rd),
            wr: Some(wr),
            meta,
        });
    }

    /// Bookkeeping for a server leaving this session, whichever way it goes.
    pub(super) fn server_left(&mut self) {
        self.who.cancel.set(None);
        WorkerPoolStats::add(&self.who.pool.stats().servers_active, -1);
        self.who.entry.entry.set_link(0);
    }

    /// Takes the server out of the session; None if its halves are not both here.
    fn detach(&mut self) -> Option<ServerConn> {
        let s = self.server.take()?;
        self.server_left();
        self.queue.clear();
        self.rollback_sent = false;
        self.timing.rollback_deadline = None;
        self.timing.quiet_since = None;
        // As in `client_sent`: only client_idle_timeout reads it, and a clock read per
        // transaction is worth saving.
        if self.timing.timeouts.client_idle.is_some() {
            self.timing.last_activity = Instant::now();
        }
        match (s.rd, s.wr) {
            (Some(rd), Some(wr)) => ServerConn::reunite(rd, wr, s.meta),
            _ => None,
        }
    }

    /// As [`Flow::releasable`], whatever the pool mode: for ending a session-mode client.
    pub(super) fn releasable_when_gone(&self) -> bool {
        let Some(s) = self.server.as_ref() else {
            return false;
        };
        s.rd.is_some() && s.wr.is_some() && self.up.cur.skip == 0 && self.down.skip == 0 && self.down.partial == 0
    }

    /// The server owes nothing, holds no transaction, and no message is half-way across:
    /// it may go back to the pool (transaction mode), or the departed client's session
    /// may be reset (session mode).
    pub(super) fn releasable(&self) -> bool {
        let Some(s) = self.server.as_ref() else {
            return false;
        };
        let whole = s.rd.is_some() && s.wr.is_some() && self.up.write.is_none();
        let nothing_partial = self.up.cur.skip == 0 && self.down.skip == 0 && self.down.partial == 0;
        let mode_allows =
            (self.conf.mode == PoolMode::Transaction && !self.pinned && !self.params.changed) || self.client.gone;
        whole
            && nothing_partial
            && mode_allows
            && self.tracker.is_idle()
            && self.params.hold == Hold::No
            && !self.retry.busy()
    }

    /// Hands the server back: right away in transaction mode, after the reset query when
    /// a session-mode client has left (or always, with server_reset_query_always).
    /// Returns None when it went back at once, else the server with the statement that
    /// must run on it first (see [`Flow::release_after`]).
    pub(super) fn release_now(&mut self) -> Option<(ServerConn, &'static str)> {
        let Some(conn) = self.detach() else {
            self.who.pool.slot_freed();
            return None;
        };
        self.park_buffers();
        self.flush_tally();
        let reset = !self.conf.reset_query.is_empty()
            && ((self.conf.mode == PoolMode::Session && self.client.gone) || self.conf.reset_always);
        // A departed listener's channels must not deliver to the next client, nor a
        // departed client's SET (not yet read back) reach it.
        let unlisten = self.pinned && !reset;
        let unset = self.params.changed && !reset;
        self.params.changed = false;
        let sql = match (reset, unlisten, unset) {
            (true, _, _) => RESET_QUERY,
            (_, true, true) => "UNLISTEN *; RESET ALL",
            (_, true, false) => "UNLISTEN *",
            (_, false, true) => "RESET ALL",
            // A cancel request for this client may still be reaching the server: it
            // must not land on the next client's query (see CancelSlot::in_flight).
            _ if self.who.cancel.in_flight() > 0 => NOTHING,
            _ => {
                self.who.pool.release(conn, true);
                return None;
            }
        };
        Some((conn, sql))
    }

    pub(super) async fn release_after(&mut self, mut conn: ServerConn, sql: &'static str) {
        if self.who.cancel.in_flight() > 0 && !self.cancels_done().await {
            log::warn!(
                "S-{}: closing because: a cancel request to it did not finish",
                conn.meta.id
            );
            self.who.pool.release(conn, false);
            return;
        }
        if sql == NOTHING {
            self.who.pool.release(conn, true);
            return;
        }
        let sql = if sql == RESET_QUERY {
            self.conf.reset_query.as_str()
        } else {
            sql
        };
        match conn.internal_query(sql).await {
            Ok(o) if o.error.is_none() && o.tx_status == b'I' => self.who.pool.release(conn, true),
            Ok(o) => {
                log::warn!(
                    "S-{}: server_reset_query failed: {}",
                    conn.meta.id,
                    o.error.map(|e| e.to_string()).unwrap_or_default()
                );
                self.who.pool.release(conn, false);
            }
            Err(e) => {
                log::warn!("S-{}: server_reset_query failed: {e}", conn.meta.id);
                self.who.pool.release(conn, false);
            }
        }
    }

    /// Waits until the cancel requests sent on for this client are done; false if they
    /// outlast their own timeout.
    async fn cancels_done(&self) -> bool {
        let deadline = Instant::now() + CANCEL_TIMEOUT + Duration::from_secs(1);
        while self.who.cancel.in_flight() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            // Rare (a cancel racing the end of its query) and short: polling will do.
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{block_on, Kit};
    use super::super::up::UpWrite;
    use super::*;

    #[test]
    fn transaction_pooling_hands_back_a_server_that_owes_nothing_and_holds_nothing_half_way() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            assert!(flow.releasable());
            // Each of these keeps it, on its own.
            flow.up.cur.skip = 1;
            assert!(!flow.releasable(), "a client message half-way to the server");
            flow.up.cur.skip = 0;
            flow.down.skip = 1;
            assert!(!flow.releasable(), "a server message half-way to the client");
            flow.down.skip = 0;
            flow.down.partial = 1;
            assert!(!flow.releasable(), "the start of a server message buffered");
            flow.down.partial = 0;
            flow.up.write = Some(UpWrite::Range(5));
            assert!(!flow.releasable(), "a write to the server in flight");
            flow.up.write = None;
            flow.params.hold = Hold::Pending;
            assert!(!flow.releasable(), "a ReadyForQuery held back");
            flow.params.hold = Hold::No;
            flow.tracker.client_message(b'Q');
            assert!(!flow.releasable(), "a request in flight");
        })
    }

    #[test]
    fn a_server_whose_read_half_is_in_a_read_is_not_handed_back() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            let rd = flow.server.as_mut().and_then(|s| s.rd.take());
            assert!(!flow.releasable());
            assert!(!flow.releasable_when_gone());
            flow.server.as_mut().unwrap().rd = rd;
            assert!(flow.releasable());
        })
    }

    #[test]
    fn a_listener_or_unread_settings_keep_the_server_until_the_client_leaves() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            flow.pinned = true;
            assert!(!flow.releasable());
            flow.pinned = false;
            flow.params.changed = true;
            assert!(!flow.releasable());
            flow.client.gone = true;
            assert!(flow.releasable());
        })
    }

    #[test]
    fn session_pooling_keeps_the_server_until_the_client_leaves() {
        block_on(async {
            let kit = Kit::new(PoolMode::Session, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            assert!(!flow.releasable());
            assert!(flow.releasable_when_gone(), "a draining session may end here");
            flow.client.gone = true;
            assert!(flow.releasable());
        })
    }

    #[test]
    fn a_clean_server_goes_straight_back_to_the_pool() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            assert!(flow.release_now().is_none());
            assert!(flow.server.is_none());
            assert_eq!(kit.pool.idle_len(), 1);
        })
    }

    /// The statement `release_now` asks to run before the server goes back.
    fn statement_before_release(mode: PoolMode, set: impl FnOnce(&mut Flow)) -> Option<&'static str> {
        block_on(async {
            let kit = Kit::new(mode, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            set(&mut flow);
            let sql = flow.release_now().map(|(_, sql)| sql);
            assert!(flow.server.is_none(), "detached either way");
            sql
        })
    }

    #[test]
    fn a_departed_listener_or_unread_settings_are_cleared_before_the_next_client() {
        let t = PoolMode::Transaction;
        assert_eq!(statement_before_release(t, |f| f.pinned = true), Some("UNLISTEN *"));
        assert_eq!(
            statement_before_release(t, |f| f.params.changed = true),
            Some("RESET ALL")
        );
        let both = |f: &mut Flow| {
            f.pinned = true;
            f.params.changed = true;
        };
        assert_eq!(statement_before_release(t, both), Some("UNLISTEN *; RESET ALL"));
    }

    #[test]
    fn server_reset_query_runs_when_a_session_mode_client_leaves_or_always_when_asked() {
        let gone = |f: &mut Flow| f.client.gone = true;
        assert_eq!(statement_before_release(PoolMode::Session, gone), Some(RESET_QUERY));
        // It covers a listener too (DISCARD ALL unlistens).
        let listener_gone = |f: &mut Flow| {
            f.client.gone = true;
            f.pinned = true;
        };
        assert_eq!(
            statement_before_release(PoolMode::Session, listener_gone),
            Some(RESET_QUERY)
        );
        let always = |f: &mut Flow| f.conf.reset_always = true;
        assert_eq!(
            statement_before_release(PoolMode::Transaction, always),
            Some(RESET_QUERY)
        );
        let none = |f: &mut Flow| {
            f.conf.reset_always = true;
            f.conf.reset_query.clear();
        };
        assert_eq!(statement_before_release(PoolMode::Transaction, none), None);
    }

    #[test]
    fn a_server_wanted_only_for_a_message_that_needs_one() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            assert!(!flow.wants_acquire(), "nothing buffered");
            flow.up.buf.as_mut().unwrap().extend_from_slice(b"H\0\0\0\x04");
            assert!(!flow.wants_acquire(), "a Flush");
            flow.up
                .buf
                .as_mut()
                .unwrap()
                .extend_from_slice(b"Q\0\0\0\x0dselect 1\0");
            assert!(flow.wants_acquire(), "a Query");
            flow.client.gone = true;
            assert!(!flow.wants_acquire(), "no one to answer");
        })
    }
}
