//! One side leaves while the other is still there. A client that leaves inside a
//! transaction gets a ROLLBACK on its server; outside one, an empty query completes the
//! pending server read; with a request of its own in flight, the server is cancelled and
//! closed. A server that closes or fails under its client is reported to the client.

use std::time::{Duration, Instant};

use monoio::io::AsyncWriteRentExt;

use super::up::UpWrite;
use super::{Flow, SessionError};
use crate::context::cancel::{send_cancel, CancelTarget};
use crate::protocol::backend::{self, Severity};
use crate::protocol::{frontend, MsgBuf, SqlState};
use crate::proxy::expect::{Expect, Kind};

/// How long a departed client's open transaction may take to roll back before the
/// server is closed instead.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What a departed client's server needs, decided between events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Departing {
    /// Nothing now: the client is here, the server is busy or gone, the ROLLBACK was
    /// sent, or only pgsilo's own query runs (it finishes, and the server is clean).
    Wait,
    /// Nothing in flight: roll back (or send an empty query), so the answer completes the
    /// pending server read.
    Rollback,
    /// A request of the client's was in flight: close the server.
    Abandon,
}

impl Flow {
    pub(super) fn departing(&self) -> Departing {
        if !self.client.gone || !self.server_wr_free() || self.rollback_sent {
            return Departing::Wait;
        }
        if self.tracker.is_quiet() {
            return Departing::Rollback;
        }
        // Only pgsilo's own query is running (a settings correction after RESET,
        // or the read-back after SET): let it finish; the server is then clean.
        if self.queue.only_injected() {
            return Departing::Wait;
        }
        // A request was in flight when the client left: its outcome cannot
        // reach anyone, and the server's state is unknown.
        Departing::Abandon
    }

    /// The client left and nothing is in flight, but the server's read half is still in
    /// a pending read: roll back an open transaction (or, outside one, send an empty
    /// query), so the answer completes the read and the server can be reused.
    pub(super) fn inject_rollback(&mut self) {
        self.rollback_sent = true;
        self.timing.rollback_deadline = Some(Instant::now() + ROLLBACK_TIMEOUT);
        let out = self.up.out.get_or_insert_with(|| MsgBuf::with_capacity(64));
        out.clear();
        // Outside a transaction there is nothing to roll back; an empty query gets the
        // server's answer (which the pending read is waiting for) without a WARNING in
        // PostgreSQL's log for every client that leaves.
        let sql = if self.tracker.status() == b'I' { "" } else { "ROLLBACK" };
        frontend::query(out.vec_mut(), sql);
        self.tracker.client_message(b'Q');
        self.queue.push(Expect::Forward(Kind::Query));
        // Anything the client still had buffered is moot.
        let pending = self.up.buf.as_ref().map_or(0, |b| b.len());
        self.up.write = Some(UpWrite::Copy(pending));
    }

    /// Closes a server whose state cannot be known (a query was running when the client
    /// left). Its backend is cancelled so it does not run on with no one to answer.
    pub(super) fn abandon_server(&mut self) {
        let Some(s) = self.server.take() else {
            return;
        };
        self.server_left();
        if let Some(secret) = s.meta.backend_secret {
            let target = CancelTarget {
                addr: s.meta.addr,
                pid: s.meta.backend_pid,
                secret,
            };
            monoio::spawn(async move {
                let _ = send_cancel(target).await;
            });
        }
        log::info!("S-{}: closing because: client left with a request in flight", s.meta.id);
        drop(s);
        self.who.pool.slot_freed();
    }

    /// The server closed or failed under the client. Whatever it said last (often a
    /// FATAL) goes to the client, then pgsilo's own error, so the client always learns why.
    pub(super) async fn server_lost(&mut self) -> Result<(), SessionError> {
        if let Some(s) = self.server.take() {
            log::info!(
                "S-{}: server conn crashed or closed while serving C-{}",
                s.meta.id,
                self.who.id
            );
            self.server_left();
            drop(s);
            self.who.pool.slot_freed();
        }
        if self.client.gone {
            return Ok(());
        }
        if let Some(mut wr) = self.client.wr.take() {
            let mut out = Vec::new();
            if let Some(b) = self.down.buf.as_ref() {
                out.extend_from_slice(&b.data()[..self.down.fwd.min(b.len())]);
            }
            out.extend_from_slice(self.down.pend.data());
            backend::error_response(
                &mut out,
                Severity::Fatal,
                SqlState::CONNECTION_FAILURE,
                "server conn crashed?",
            );
            let _ = wr.write_all(out).await;
        }
        Err(SessionError::ServerGone)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{block_on, query, Kit};
    use super::*;
    use crate::config::PoolMode;
    use crate::proxy::expect::Injected;

    #[test]
    fn nothing_to_do_for_a_client_that_is_still_here_or_a_server_write_in_flight() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            assert_eq!(flow.departing(), Departing::Wait);
            flow.client.gone = true;
            flow.up.write = Some(UpWrite::Range(1));
            assert_eq!(flow.departing(), Departing::Wait);
        })
    }

    #[test]
    fn a_client_gone_between_transactions_leaves_an_empty_query_on_its_server() {
        block_on(async {
            let kit = Kit::new(PoolMode::Session, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            flow.client.gone = true;
            assert_eq!(flow.departing(), Departing::Rollback);
            flow.inject_rollback();
            assert_eq!(flow.up.out.as_ref().unwrap().data(), query(""));
            assert_eq!(flow.up.write, Some(UpWrite::Copy(0)));
            assert!(flow.timing.rollback_deadline.is_some());
            assert_eq!(flow.departing(), Departing::Wait, "sent once");
        })
    }

    #[test]
    fn a_client_gone_inside_a_transaction_has_it_rolled_back_and_its_leftovers_dropped() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            flow.tracker.server_message(b'Z', Some(b'T'));
            flow.up.buf.as_mut().unwrap().extend_from_slice(b"Q\0\0");
            flow.client.gone = true;
            assert_eq!(flow.departing(), Departing::Rollback);
            flow.inject_rollback();
            assert_eq!(flow.up.out.as_ref().unwrap().data(), query("ROLLBACK"));
            assert_eq!(flow.up.write, Some(UpWrite::Copy(3)), "the half message goes too");
        })
    }

    #[test]
    fn a_client_gone_with_a_request_in_flight_has_its_server_closed() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            flow.tracker.client_message(b'Q');
            flow.queue.push(Expect::Forward(Kind::Query));
            flow.client.gone = true;
            assert_eq!(flow.departing(), Departing::Abandon);
            flow.abandon_server();
            assert!(flow.server.is_none());
            assert_eq!(kit.pool.shared.total(), 0, "its slot is free");
        })
    }

    #[test]
    fn only_pgsilos_own_query_in_flight_finishes_and_leaves_the_server_clean() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            flow.tracker.client_message(b'Q');
            flow.queue.push(Expect::InjectedQuery(Injected::Snapshot));
            flow.client.gone = true;
            assert_eq!(flow.departing(), Departing::Wait);
        })
    }
}
