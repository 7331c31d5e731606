//! The forwarding loop: an active stretch of a session. Each turn it decides what the
//! session does between events (hand the server back, read back settings, deal with a
//! client that left, stop for shutdown), arms the operations that can run, waits for
//! the first to finish, and has its handler (`events.rs`) deal with it.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;
use std::time::Instant;

use monoio::io::CancelHandle;

use super::deadline::Deadline;
use super::departure::Departing;
use super::events::Then;
use super::ops::{client_read_op, client_readiness, read_op, write_op, Acquire};
use super::{ClientRd, ClientWr, Flow, SessionError, Stretch};
use crate::context::control::Seen;
use crate::pool::{PoolError, ServerConn, ServerRd, ServerWr};
use crate::protocol::MsgBuf;

enum Event {
    ClientRead(ClientRd, std::io::Result<usize>, MsgBuf),
    ServerWrite(ServerWr, std::io::Result<usize>, MsgBuf),
    Probe(std::io::Result<()>),
    ServerRead(ServerRd, std::io::Result<usize>, MsgBuf),
    ClientWrite(ClientWr, std::io::Result<usize>, MsgBuf),
    Acquired(Result<ServerConn, PoolError>),
    Deadline,
    /// KILL or a shutdown phase reached this session.
    Signal,
}

impl Flow {
    /// An active stretch: forwards both ways until the session can go idle (nothing owed,
    /// no server, the client quiet) or ends.
    pub(super) async fn run(&mut self) -> Result<Stretch, SessionError> {
        let mut crd = pin!(None::<(ClientRd, MsgBuf, CancelHandle)>.map(|(r, b, c)| client_read_op(r, b, c)));
        let mut swr = pin!(None::<(ServerWr, MsgBuf, usize)>.map(|(w, b, n)| write_op(w, b, n)));
        let mut srv = pin!(None::<(ServerRd, MsgBuf)>.map(|(r, b)| read_op(r, b)));
        let mut cli = pin!(None::<(ClientWr, MsgBuf, usize)>.map(|(w, b, n)| write_op(w, b, n)));
        let mut acq: Option<Acquire> = None;
        let mut probe = pin!(None::<&ClientRd>.map(client_readiness));
        // Set once the probe saw data: the client pipelined more; nothing to watch for.
        let mut probe_done = false;
        let mut timer = pin!(None::<Instant>.map(|d| monoio::time::sleep_until(d.into())));
        let mut timer_at: Option<(Instant, Deadline)> = None;
        let signal = self.signal.clone();
        let mut signal_seen = Seen::default();

        loop {
            // A LISTEN/UNLISTEN query pgsilo answers itself (listen.rs).
            if swr.is_none() && crd.is_none() && acq.is_none() {
                if let Some((len, stmts)) = self.listen_query() {
                    Box::pin(self.answer_listen(len, stmts)).await;
                    continue;
                }
            }
            // Client -> server: what is processed goes out; more is read when needed.
            if swr.is_none() {
                match self.next_server_write() {
                    Ok(Some((w, b, n))) => swr.set(Some(write_op(w, b, n))),
                    Ok(None) => {}
                    Err(e) => {
                        Box::pin(self.finish_client_write(cli.as_mut().as_pin_mut())).await;
                        return Err(e);
                    }
                }
            }
            let quiet = crd.is_none() && cli.is_none() && swr.is_none() && acq.is_none() && probe.is_none();
            if self.shrink && quiet && self.idle() {
                self.shrink = false;
                return Ok(Stretch::Idle);
            }
            if crd.is_none() && acq.is_none() {
                match self.next_client_read() {
                    Ok(Some((r, b))) => crd.set(Some(client_read_op(r, b, self.client.read_stop.handle()))),
                    Ok(None) if self.wants_acquire() => {
                        if let Some(conn) = self.who.pool.try_acquire_now() {
                            // An idle server here: no waiting, no future.
                            self.who.pool.stats().acquire.record_at_once(conn.meta.via);
                            if let Some(conn) = self.try_plug(conn) {
                                Box::pin(self.sync_then_plug(conn)).await?;
                            }
                            continue;
                        }
                        acq = Some(self.wait_for_server());
                    }
                    Ok(None) => {}
                    Err(e) => {
                        Box::pin(self.finish_client_write(cli.as_mut().as_pin_mut())).await;
                        return Err(e);
                    }
                }
            }
            // While waiting for a server (past the first moments), notice a client that
            // hangs up.
            if acq.is_some() && self.timing.probing && probe.is_none() && !probe_done && !self.client.gone {
                if let Some(rd) = self.client.rd.as_ref() {
                    probe.set(Some(client_readiness(rd)));
                }
            }
            // Server -> client.
            self.flush_notes(cli.is_some());
            if cli.is_none() {
                if let Some(op) = self.next_client_write() {
                    cli.set(Some(write_op(op.0, op.1, op.2)));
                }
            }
            if srv.is_none() {
                if let Some(op) = self.next_server_read() {
                    srv.set(Some(read_op(op.0, op.1)));
                }
            }
            if self.read_back_settings() {
                continue;
            }
            // Hand the server back, or deal with a departed client's server. The client
            // read may stay armed: it holds no part of the server.
            if self.releasable() {
                if let Some((conn, sql)) = self.release_now() {
                    Box::pin(self.release_after(conn, sql)).await;
                }
                continue;
            }
            match self.departing() {
                Departing::Wait => {}
                Departing::Rollback => {
                    self.inject_rollback();
                    continue;
                }
                Departing::Abandon => {
                    srv.set(None);
                    self.abandon_server();
                }
            }
            if self.client.gone && self.server.is_none() && swr.is_none() && acq.is_none() {
                return Ok(Stretch::Done);
            }
            let output_flushed = cli.is_none() && self.down.fwd == 0 && self.down.pend.is_empty();
            if self.draining && output_flushed && acq.is_none() && self.up.write.is_none() && self.tracker.is_idle() {
                // Between transactions: this is the moment to close the client.
                if self.server.is_some() && self.releasable_when_gone() {
                    self.client.gone = true;
                    if let Some((conn, sql)) = self.release_now() {
                        Box::pin(self.release_after(conn, sql)).await;
                    }
                }
                if self.server.is_none() {
                    return Err(SessionError::Shutdown);
                }
            }
            let next = self.next_deadline();
            if next != timer_at {
                timer_at = next;
                timer.set(next.map(|(at, _)| monoio::time::sleep_until(at.into())));
            }

            // Scoped: the event is settled before anything is awaited, so only `then` takes
            // room in the loop's future across the awaits below.
            let then = {
                let event = poll_fn(|cx| {
                    if let Some(f) = crd.as_mut().as_pin_mut() {
                        if let Poll::Ready((r, res, b)) = f.poll(cx) {
                            crd.set(None);
                            return Poll::Ready(Event::ClientRead(r, res, b));
                        }
                    }
                    if let Some(f) = swr.as_mut().as_pin_mut() {
                        if let Poll::Ready((w, res, b)) = f.poll(cx) {
                            swr.set(None);
                            return Poll::Ready(Event::ServerWrite(w, res, b));
                        }
                    }
                    if let Some(f) = probe.as_mut().as_pin_mut() {
                        if let Poll::Ready(res) = f.poll(cx) {
                            probe.set(None);
                            return Poll::Ready(Event::Probe(res));
                        }
                    }
                    if let Some(f) = srv.as_mut().as_pin_mut() {
                        if let Poll::Ready((r, res, b)) = f.poll(cx) {
                            srv.set(None);
                            return Poll::Ready(Event::ServerRead(r, res, b));
                        }
                    }
                    if let Some(f) = cli.as_mut().as_pin_mut() {
                        if let Poll::Ready((w, res, b)) = f.poll(cx) {
                            cli.set(None);
                            return Poll::Ready(Event::ClientWrite(w, res, b));
                        }
                    }
                    if let Some(f) = acq.as_mut() {
                        if let Poll::Ready(r) = f.as_mut().poll(cx) {
                            acq = None;
                            return Poll::Ready(Event::Acquired(r));
                        }
                    }
                    if let Some(f) = timer.as_mut().as_pin_mut() {
                        if let Poll::Ready(()) = f.poll(cx) {
                            timer.set(None);
                            return Poll::Ready(Event::Deadline);
                        }
                    }
                    if signal.poll_changed(cx, &mut signal_seen).is_ready() {
                        return Poll::Ready(Event::Signal);
                    }
                    Poll::Pending
                })
                .await;

                if log::log_enabled!(log::Level::Trace) {
                    self.trace_event(&event);
                }
                match event {
                    Event::ClientRead(rd, res, buf) => self.on_client_read(rd, res, buf),
                    Event::Probe(res) => self.on_probe(res),
                    Event::ServerWrite(wr, res, buf) => self.on_server_write(wr, res, buf),
                    Event::ServerRead(rd, res, buf) => self.on_server_read(rd, res, buf),
                    Event::ClientWrite(wr, res, buf) => self.on_client_write(wr, res, buf),
                    Event::Acquired(res) => {
                        probe.set(None);
                        probe_done = false;
                        self.on_acquired(res)
                    }
                    Event::Signal => {
                        // A shrink calls off the client read when nothing else is going on.
                        let reading_only = swr.is_none() && cli.is_none() && acq.is_none() && crd.is_some();
                        self.on_signal(reading_only)
                    }
                    Event::Deadline => self.on_deadline(timer_at.take()),
                }
            };
            match then {
                Then::Go => {}
                Then::StopWaiting => acq = None,
                Then::StopProbing => probe_done = true,
                Then::Sync(conn) => Box::pin(self.sync_then_plug(conn)).await?,
                Then::ServerLost => return Box::pin(self.server_lost()).await.map(|()| Stretch::Done),
                Then::Fail(e) => {
                    Box::pin(self.finish_client_write(cli.as_mut().as_pin_mut())).await;
                    return Err(e);
                }
                Then::Abandon(end) => {
                    swr.set(None);
                    srv.set(None);
                    self.abandon_server();
                    return end;
                }
                Then::End(end) => return end,
            }
        }
    }

    /// One line per event at verbose = 2: what happened and the state it found.
    fn trace_event(&self, event: &Event) {
        let what = match event {
            Event::ClientRead(_, r, _) => format!("client read {:?}", r.as_ref().ok()),
            Event::ServerWrite(_, r, _) => format!("server write {:?}", r.as_ref().ok()),
            Event::Probe(r) => format!("probe {:?}", r.as_ref().ok()),
            Event::ServerRead(_, r, _) => format!("server read {:?}", r.as_ref().ok()),
            Event::ClientWrite(_, r, _) => format!("client write {:?}", r.as_ref().ok()),
            Event::Acquired(r) => format!("acquired {}", r.is_ok()),
            Event::Deadline => "deadline".into(),
            Event::Signal => "signal".into(),
        };
        log::trace!(
            "C-{} {what}: server={} tracker={:?} queue={} upw={} blocked={} want={} ubuf={} dfwd={} dpend={} changed={} resetting={:?} gone={}",
            self.who.id,
            self.server.as_ref().map_or(0, |s| s.meta.id),
            self.tracker,
            self.queue.len(),
            self.up.write.is_some(),
            self.up.blocked,
            self.up.want,
            self.up.buf.as_ref().map_or(0, |b| b.len()),
            self.down.fwd,
            self.down.pend.len(),
            self.params.changed,
            self.params.resetting,
            self.client.gone,
        );
    }
}
