//! An idle session: no server, nothing owed. It waits for the client's next bytes holding
//! no buffer (readiness first, then a non-blocking receive), so thousands of idle clients
//! cost a few KiB each.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;

use monoio::io::AsyncWriteRentExt;

use super::ops::readable_op;
use super::{ClientRd, Flow, SessionError};
use crate::net::stream_of;
use crate::protocol::{MsgBuf, SqlState};
use crate::proxy::downstream::Hold;

/// Output buffers of pgsilo's own that stay allocated while idle must be at most this.
const IDLE_BUF: usize = 256;

/// What ended an idle wait.
enum Woke {
    Ready(ClientRd, std::io::Result<()>),
    Timeout,
    Signal,
    /// Notifications for the client (LISTEN through the pool's listener).
    Notes,
}

impl Flow {
    /// Nothing is in flight and nothing is owed: the session can wait without its
    /// forwarding machinery.
    pub(super) fn idle(&self) -> bool {
        self.server.is_none()
            && !self.client.gone
            && !self.draining
            && !self.up.blocked
            && self.up.write.is_none()
            && self.down.fwd == 0
            && self.down.pend.is_empty()
            && self.timing.rollback_deadline.is_none()
            && self.params.hold == Hold::No
            && !self.retry.busy()
            && self.client.rd.is_some()
            && self.client.wr.is_some()
            && self.up.buf.as_ref().is_some_and(|b| b.is_empty())
    }

    /// Waits for the client's next bytes, a signal (KILL, shutdown), or
    /// client_idle_timeout. Returns once there is something for an active stretch. Holds
    /// no buffer while waiting: readiness first, then a non-blocking receive into a
    /// buffer from the worker's pool.
    pub(super) async fn idle_wait(&mut self) -> Result<(), SessionError> {
        self.park_buffers();
        self.retry.park();
        let mut timer = self
            .timing
            .timeouts
            .client_idle
            .map(|d| Box::pin(monoio::time::sleep_until((self.timing.last_activity + d).into())));
        let signal = self.signal.clone();
        let mut seen = signal.seen_now();
        loop {
            let Some(rd) = self.client.rd.take() else {
                return Ok(());
            };
            let mut ready = pin!(readable_op(rd));
            let woke = poll_fn(|cx| {
                if let Poll::Ready((rd, res)) = ready.as_mut().poll(cx) {
                    return Poll::Ready(Woke::Ready(rd, res));
                }
                if let Some(t) = timer.as_mut() {
                    if t.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woke::Timeout);
                    }
                }
                // A shrink request changes nothing here (already as small as it gets);
                // only KILL and shutdown end the wait.
                while signal.poll_changed(cx, &mut seen).is_ready() {
                    if signal.killed().is_some() || signal.draining() {
                        return Poll::Ready(Woke::Signal);
                    }
                }
                if signal.has_notes() {
                    return Poll::Ready(Woke::Notes);
                }
                Poll::Pending
            })
            .await;
            match woke {
                Woke::Ready(rd, Ok(())) => {
                    self.client.rd = Some(rd);
                    // Active again: the next shrink needs a fresh quiet period.
                    self.signal.take_shrink();
                    self.shrink = false;
                    match self.receive_now() {
                        Some(0) => {
                            self.client.gone = true;
                            return Ok(());
                        }
                        Some(n) => {
                            self.client_sent(n);
                            return Ok(());
                        }
                        // Woken without data after all: wait again.
                        None => continue,
                    }
                }
                Woke::Ready(rd, Err(_)) => {
                    self.client.rd = Some(rd);
                    self.client.gone = true;
                    return Ok(());
                }
                // Dropping the readiness wait cancels it; the client is closed either way.
                Woke::Timeout => {
                    return Err(SessionError::TimedOut(
                        SqlState::IDLE_SESSION_TIMEOUT,
                        "client_idle_timeout",
                    ))
                }
                // Dropping the readiness wait takes nothing from the socket.
                Woke::Notes => {
                    if !self.write_notes().await? {
                        self.client.gone = true;
                        return Ok(());
                    }
                }
                Woke::Signal => {
                    if let Some(why) = self.signal.killed() {
                        return Err(SessionError::Killed(why));
                    }
                    // Draining, and an idle client is between transactions: close it now.
                    return Err(SessionError::Shutdown);
                }
            }
        }
    }

    /// Writes the notifications queued for an idle client; false if the client is gone.
    /// A client that does not read is given up on when KILL or shutdown comes: the write
    /// is dropped with the session.
    async fn write_notes(&mut self) -> Result<bool, SessionError> {
        let Some(mut wr) = self.client.wr.take() else {
            return Ok(false);
        };
        let notes = self.signal.take_notes();
        let n = notes.len();
        let signal = self.signal.clone();
        let mut seen = signal.seen_now();
        let mut write = pin!(async move {
            let (res, _) = wr.write_all(notes).await;
            (wr, res)
        });
        let done = poll_fn(|cx| {
            if let Poll::Ready(r) = write.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            while signal.poll_changed(cx, &mut seen).is_ready() {
                if signal.killed().is_some() {
                    return Poll::Ready(None);
                }
            }
            Poll::Pending
        })
        .await;
        let Some((wr, res)) = done else {
            return Err(SessionError::Killed(self.signal.killed().unwrap_or("killed")));
        };
        self.client.wr = Some(wr);
        self.tally.bytes_out += n as u64;
        Ok(res.is_ok())
    }

    /// A non-blocking receive of what the client sent, into a pooled buffer. None when
    /// nothing was there after all; Some(0) when the client closed.
    fn receive_now(&mut self) -> Option<usize> {
        let rd = self.client.rd.as_ref()?;
        let buf = self.up.buf.get_or_insert_with(|| MsgBuf::with_capacity(0));
        if buf.capacity() == 0 {
            *buf = self.bufs.take();
        }
        buf.reserve(1);
        stream_of(rd).try_recv(buf.vec_mut())
    }

    /// Without a server, a session keeps no large buffer: empty ones go back to the
    /// worker's pool (a busy session takes them again at once, so this costs nothing but
    /// a push and a pop per transaction).
    pub(super) fn park_buffers(&mut self) {
        if self.server.is_some() {
            return;
        }
        if let Some(b) = self.down.buf.as_mut() {
            if b.is_empty() && b.capacity() > 0 {
                let b = std::mem::replace(b, MsgBuf::with_capacity(0));
                self.bufs.give(b);
            }
        }
        if let Some(b) = self.up.buf.as_mut() {
            if b.is_empty() && b.capacity() > 0 && self.client.rd.is_some() {
                let b = std::mem::replace(b, MsgBuf::with_capacity(0));
                self.bufs.give(b);
            }
        }
        if let Some(b) = self.down.spare.as_mut() {
            if b.capacity() > 0 {
                *b = MsgBuf::with_capacity(0);
            }
        }
        if self.down.pend.is_empty() && self.down.pend.capacity() > 0 {
            self.down.pend = MsgBuf::with_capacity(0);
        }
        if let Some(b) = self.up.out.as_mut() {
            if b.is_empty() && b.capacity() > IDLE_BUF {
                *b = MsgBuf::with_capacity(0);
            }
        }
    }
}
