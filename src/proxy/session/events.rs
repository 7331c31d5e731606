//! What each event of the forwarding loop does to the session: one handler per kind.
//! A handler settles the operation's half and buffer back into the session and says, as
//! a [`Then`], what the loop must do with its own operations or whether the stretch ends.

use std::time::Instant;

use super::deadline::Deadline;
use super::ops::peek_client;
use super::{ClientRd, ClientWr, Flow, SessionError, Stretch};
use crate::metrics::ConnState;
use crate::pool::{PoolError, ServerConn, ServerRd, ServerWr};
use crate::protocol::MsgBuf;

/// What the forwarding loop does once an event has been dealt with.
pub(super) enum Then {
    /// Go round again.
    Go,
    /// The client hung up while waiting for a server: stop waiting (the pool takes the
    /// wait back).
    StopWaiting,
    /// The client sent more while waiting for a server: nothing more to watch for.
    StopProbing,
    /// A server whose settings must first be made the client's
    /// ([`Flow::sync_then_plug`]).
    Sync(ServerConn),
    /// The server closed or failed: the client learns why, and the session ends.
    ServerLost,
    /// An error the client should see after the response already on its way to it.
    Fail(SessionError),
    /// Stop the server's operations, close the server, and end the stretch so.
    Abandon(Result<Stretch, SessionError>),
    /// End the stretch so.
    End(Result<Stretch, SessionError>),
}

impl Flow {
    pub(super) fn on_client_read(&mut self, rd: ClientRd, res: std::io::Result<usize>, buf: MsgBuf) -> Then {
        self.client.rd = Some(rd);
        self.up.buf = Some(buf);
        match res {
            Ok(0) => self.client.gone = true,
            Ok(n) => {
                self.shrink = false;
                self.client_sent(n);
            }
            // Called off to shrink: nothing was read.
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {}
            Err(_) => self.client.gone = true,
        }
        Then::Go
    }

    /// The client's socket became readable while it waits for a server.
    pub(super) fn on_probe(&mut self, res: std::io::Result<()>) -> Then {
        let state = match res {
            Ok(()) => self.client.rd.as_ref().and_then(peek_client),
            Err(_) => Some(false),
        };
        match state {
            Some(false) => {
                // Gone while waiting: stop waiting (the pool takes the wait back).
                self.client.gone = true;
                self.timing.wait_started = None;
                Then::StopWaiting
            }
            Some(true) => Then::StopProbing,
            None => Then::Go,
        }
    }

    pub(super) fn on_server_write(&mut self, wr: ServerWr, res: std::io::Result<usize>, buf: MsgBuf) -> Then {
        if let Some(s) = self.server.as_mut() {
            s.wr = Some(wr);
        }
        self.settle_server_write(buf);
        if res.is_err() {
            return Then::ServerLost;
        }
        Then::Go
    }

    pub(super) fn on_server_read(&mut self, rd: ServerRd, res: std::io::Result<usize>, buf: MsgBuf) -> Then {
        if let Some(s) = self.server.as_mut() {
            s.rd = Some(rd);
        }
        self.down.buf = Some(buf);
        match res {
            Ok(0) | Err(_) => Then::ServerLost,
            Ok(_) => match self.process_down() {
                Ok(()) => Then::Go,
                Err(e) => Then::Fail(e),
            },
        }
    }

    pub(super) fn on_client_write(&mut self, wr: ClientWr, res: std::io::Result<usize>, buf: MsgBuf) -> Then {
        self.client.wr = Some(wr);
        if let Ok(n) = res {
            self.tally.bytes_out += n as u64;
        } else {
            self.client.gone = true;
        }
        self.settle_client_write(buf);
        Then::Go
    }

    /// The pool's answer to the client's wait for a server.
    pub(super) fn on_acquired(&mut self, res: Result<ServerConn, PoolError>) -> Then {
        if let Some(t) = self.timing.wait_started.take() {
            let waited = t.elapsed();
            self.who.pool.stats().record_wait(waited);
            if let Ok(conn) = &res {
                self.who.pool.stats().acquire.record(conn.meta.via, waited);
            }
        }
        self.who.entry.entry.set_state(ConnState::Active);
        match res {
            Ok(conn) => match self.try_plug(conn) {
                Some(conn) => Then::Sync(conn),
                None => Then::Go,
            },
            Err(e) => Then::End(Err(e.into())),
        }
    }

    /// KILL, a shutdown phase, or the worker's request to shrink a quiet session.
    /// `reading_only`: of the operations that run without a server, only the client
    /// read is in flight.
    pub(super) fn on_signal(&mut self, reading_only: bool) -> Then {
        if self.signal.take_shrink() && !self.client.gone {
            self.shrink = true;
            // Quiet for a second: if nothing else is going on, stop the read
            // (it completes, cancelled or with data) and go idle.
            if self.server.is_none() && reading_only {
                // Cancelling returns a fresh canceller for later reads.
                self.client.read_stop = std::mem::take(&mut self.client.read_stop).cancel();
            }
        }
        if let Some(why) = self.signal.killed() {
            return Then::Abandon(Err(SessionError::Killed(why)));
        }
        if self.signal.draining() {
            self.draining = true;
        }
        Then::Go
    }

    /// The session timer fired for `due`, the deadline it was armed for (None if it has
    /// been disarmed since).
    pub(super) fn on_deadline(&mut self, due: Option<(Instant, Deadline)>) -> Then {
        let Some((at, which)) = due else {
            return Then::Go;
        };
        if Instant::now() < at {
            return Then::Go;
        }
        match which {
            Deadline::WaitProbe => {
                self.timing.probing = true;
                return Then::Go;
            }
            // As when the pool gave up: the same error, the wait recorded.
            Deadline::QueryWait => return self.on_acquired(Err(PoolError::WaitTimeout)),
            _ => {}
        }
        let Some((code, setting)) = which.client_error() else {
            log::info!(
                "C-{}: rollback after client left took too long; closing server",
                self.who.id
            );
            return Then::Abandon(Ok(Stretch::Done));
        };
        // The server's state is unknown or a transaction is open: closing it
        // (and cancelling what runs there) is the only clean way out.
        Then::Abandon(Err(SessionError::TimedOut(code, setting)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testkit::{block_on, send, Kit};
    use super::*;
    use crate::config::PoolMode;
    use crate::protocol::SqlState;

    /// A client read completing with `res`.
    fn client_read(flow: &mut Flow, res: std::io::Result<usize>) -> Then {
        let rd = flow.client.rd.take().expect("the read half");
        let buf = flow.up.buf.take().expect("the client buffer");
        flow.on_client_read(rd, res, buf)
    }

    #[test]
    fn a_client_read_of_nothing_or_an_error_means_the_client_is_gone_but_a_called_off_one_does_not() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            let cancelled = std::io::Error::from_raw_os_error(libc::ECANCELED);
            assert!(matches!(client_read(&mut flow, Err(cancelled)), Then::Go));
            assert!(!flow.client.gone);
            assert!(
                flow.client.rd.is_some() && flow.up.buf.is_some(),
                "half and buffer are back"
            );
            client_read(&mut flow, Err(std::io::Error::from_raw_os_error(libc::ECONNRESET)));
            assert!(flow.client.gone);
            let (mut flow, _client) = kit.flow();
            client_read(&mut flow, Ok(0));
            assert!(flow.client.gone);
        })
    }

    #[test]
    fn bytes_from_the_client_count_as_activity() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            client_read(&mut flow, Ok(12));
            assert!(!flow.shrink, "busy: no shrinking now");
            assert_eq!(flow.tally.bytes_in, 12);
            assert!(!flow.client.gone);
        })
    }

    #[test]
    fn a_client_that_hangs_up_while_waiting_for_a_server_stops_the_wait() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, client) = kit.flow();
            flow.timing.wait_started = Some(Instant::now());
            assert!(matches!(flow.on_probe(Ok(())), Then::Go), "still there, nothing sent");
            drop(client);
            assert!(matches!(flow.on_probe(Ok(())), Then::StopWaiting));
            assert!(flow.client.gone);
            assert!(flow.timing.wait_started.is_none(), "no wait to record");
        })
    }

    #[test]
    fn a_client_that_pipelines_more_while_waiting_needs_no_more_watching() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, mut client) = kit.flow();
            send(&mut client, b"Q").await;
            assert!(matches!(flow.on_probe(Ok(())), Then::StopProbing));
            assert!(!flow.client.gone);
        })
    }

    #[test]
    fn a_failed_wait_for_a_server_ends_the_stretch_with_the_pools_error() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            flow.timing.wait_started = Some(Instant::now());
            let then = flow.on_acquired(Err(PoolError::WaitTimeout));
            assert!(matches!(
                then,
                Then::End(Err(SessionError::Pool(PoolError::WaitTimeout)))
            ));
            assert!(flow.timing.wait_started.is_none());
        })
    }

    #[test]
    fn a_server_with_the_clients_settings_is_attached_at_once() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            let (conn, _server) = kit.server();
            assert!(matches!(flow.on_acquired(Ok(conn)), Then::Go));
            assert!(flow.server.is_some());
        })
    }

    #[test]
    fn a_deadline_ends_the_session_only_once_it_has_passed() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            assert!(matches!(flow.on_deadline(None), Then::Go), "disarmed meanwhile");
            let later = Instant::now() + Duration::from_secs(60);
            assert!(matches!(flow.on_deadline(Some((later, Deadline::Query))), Then::Go));
            let passed = Instant::now();
            assert!(matches!(
                flow.on_deadline(Some((passed, Deadline::Query))),
                Then::Abandon(Err(SessionError::TimedOut(SqlState::QUERY_CANCELED, "query_timeout")))
            ));
            assert!(matches!(
                flow.on_deadline(Some((passed, Deadline::Rollback))),
                Then::Abandon(Ok(Stretch::Done))
            ));
        })
    }

    #[test]
    fn kill_closes_the_server_and_drain_waits_for_the_transaction_to_end() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            flow.signal.drain();
            assert!(matches!(flow.on_signal(true), Then::Go));
            assert!(flow.draining);
            flow.signal.kill("the test");
            assert!(matches!(
                flow.on_signal(true),
                Then::Abandon(Err(SessionError::Killed("the test")))
            ));
        })
    }

    #[test]
    fn a_quiet_session_is_asked_to_shrink() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            flow.shrink = false;
            flow.signal.tick();
            assert!(matches!(flow.on_signal(false), Then::Go));
            assert!(flow.shrink);
            // A departed client has nothing to shrink for.
            flow.shrink = false;
            flow.client.gone = true;
            flow.signal.tick();
            flow.on_signal(true);
            assert!(!flow.shrink);
        })
    }
}
