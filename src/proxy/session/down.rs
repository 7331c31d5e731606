//! Server to client: reading the server while it has something to say and the client
//! keeps up, processing its bytes (`downstream::process`), and the client writes. What
//! the server sent goes to the client as it came; pgsilo's own output follows it in order.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::{ClientWr, Flow, SessionError};
use crate::config::PoolMode;
use crate::pool::ServerRd;
use crate::protocol::MsgBuf;
use crate::proxy::downstream::{self, DownState, Hold};

/// How long a response already on its way to a client may take to finish when the
/// session ends with an error the client should see after it.
const CLIENT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Output pgsilo built for a slow client, beyond which the server is not read further.
const PENDING_OUTPUT_LIMIT: usize = 256 * 1024;
/// Output kept back while a ReadyForQuery is held; beyond it, it goes on ahead.
const HELD_OUTPUT_LIMIT: usize = 64 * 1024;

impl Flow {
    /// The server read stays armed while a server is attached, except when transaction
    /// pooling is about to hand it back.
    fn wants_server_read(&self) -> bool {
        self.server.as_ref().is_some_and(|s| s.rd.is_some()) && !self.releasable()
    }

    pub(super) fn next_server_read(&mut self) -> Option<(ServerRd, MsgBuf)> {
        if self.down.fwd > 0 || self.down.pend.len() > PENDING_OUTPUT_LIMIT || !self.wants_server_read() {
            return None;
        }
        let mut buf = self.down.buf.take()?;
        let Some(rd) = self.server.as_mut().and_then(|s| s.rd.take()) else {
            self.down.buf = Some(buf);
            return None;
        };
        if buf.capacity() == 0 {
            buf = self.bufs.take();
        }
        let want = partial_want(&buf);
        buf.reserve(want.max(1024));
        Some((rd, buf))
    }

    pub(super) fn next_client_write(&mut self) -> Option<(ClientWr, MsgBuf, usize)> {
        if self.client.gone {
            // No one to tell: drop what was meant for the client.
            if self.down.fwd > 0 {
                if let Some(b) = self.down.buf.as_mut() {
                    b.consume(self.down.fwd);
                    self.down.fwd = 0;
                }
            }
            self.down.pend.clear();
            return None;
        }
        // The client write half must be free before either buffer is taken.
        self.client.wr.as_ref()?;
        if self.down.fwd > 0 {
            let buf = self.down.buf.take()?;
            let wr = self.client.wr.take()?;
            return Some((wr, buf, self.down.fwd));
        }
        // While a ReadyForQuery is held, what comes before it waits too (within bounds, so
        // the server is always read): the client gets its answer in one write, not two.
        if self.params.hold != Hold::No && self.down.pend.len() < HELD_OUTPUT_LIMIT {
            return None;
        }
        if !self.down.pend.is_empty() {
            let wr = self.client.wr.take()?;
            let mut spare = self.down.spare.take().unwrap_or_else(|| MsgBuf::with_capacity(0));
            spare.clear();
            std::mem::swap(&mut spare, &mut self.down.pend);
            let n = spare.len();
            return Some((wr, spare, n));
        }
        None
    }

    /// A client write finished: give its buffer back to where it came from.
    pub(super) fn settle_client_write(&mut self, mut buf: MsgBuf) {
        if self.down.buf.is_none() && self.down.fwd > 0 {
            buf.consume(self.down.fwd);
            self.down.fwd = 0;
            self.down.buf = Some(buf);
        } else {
            buf.clear();
            buf.shrink_to(self.conf.pkt_buf);
            self.down.spare = Some(buf);
        }
        self.park_buffers();
    }

    /// Before ending the session with an error for the client: a response on its way to
    /// the client right now holds the client's write half, and the error could not
    /// follow it. Let that write finish (bounded), unless it ends inside a message.
    pub(super) async fn finish_client_write<F>(&mut self, write: Option<Pin<&mut F>>)
    where
        F: Future<Output = (ClientWr, std::io::Result<usize>, MsgBuf)>,
    {
        let Some(write) = write else {
            return;
        };
        if let Ok((wr, Ok(_), buf)) = monoio::time::timeout(CLIENT_FLUSH_TIMEOUT, write).await {
            self.settle_client_write(buf);
            if self.down.skip == 0 {
                self.client.wr = Some(wr);
            }
        }
    }

    pub(super) fn process_down(&mut self) -> Result<(), SessionError> {
        let (Some(buf), Some(server)) = (self.down.buf.as_ref(), self.server.as_mut()) else {
            return Ok(());
        };
        let mut st = DownState {
            skip: &mut self.down.skip,
            tracker: &mut self.tracker,
            queue: &mut self.queue,
            statements: &mut self.statements,
            server: &mut server.meta,
            client_settings: &mut self.who.settings,
            initial: &self.params.initial,
            synth: &mut self.down.synth,
            pinned: &mut self.pinned,
            resetting: &mut self.params.resetting,
            settings_changed: &mut self.params.changed,
            captured: &mut self.params.captured,
            may_hold: self.params.reset_care && !self.client.gone,
            hold: &mut self.params.hold,
            retry: &mut self.retry,
        };
        let was_pinned = *st.pinned;
        let r = downstream::process(buf.data(), &mut st, self.down.pend.vec_mut())?;
        if self.pinned && !was_pinned && self.conf.mode == PoolMode::Transaction {
            log::info!(
                "C-{}: LISTEN under transaction pooling: the client keeps its server until it disconnects",
                self.who.id
            );
        }
        server.meta.tx_status = self.tracker.status();
        self.tally.queries += r.ready_for_query as u64;
        self.tally.xacts += r.xact_ends as u64;
        let len = buf.len();
        if r.zero_copy {
            self.down.fwd = r.consumed;
        } else if let Some(b) = self.down.buf.as_mut() {
            b.consume(r.consumed);
        }
        self.down.partial = len - r.consumed;
        if r.ready_for_query > 0 {
            self.timed(r.xact_ends > 0);
            // Counted before the client can see its answer: whoever reads the pool's
            // stats after a client got its ReadyForQuery finds that query in them (the
            // release, which flushed them before, comes only once the client write is
            // done).
            self.flush_tally();
        }
        self.settle_injected();
        Ok(())
    }
}

/// Bytes still to come of a message whose header is at the front of `buf`, for the next
/// server read to ask for; none for a message over 1 MiB, which streams through in pieces.
fn partial_want(buf: &MsgBuf) -> usize {
    match crate::protocol::Header::peek(buf.data()) {
        Some(h) if h.total() > buf.len() && h.total() <= 1 << 20 => h.total() - buf.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf_of(bytes: &[u8]) -> MsgBuf {
        let mut b = MsgBuf::with_capacity(bytes.len());
        b.extend_from_slice(bytes);
        b
    }

    #[test]
    fn a_read_asks_for_the_rest_of_a_message_that_has_begun() {
        // DataRow of 100 bytes in all (length field 99), 10 bytes of it here.
        let mut head = vec![b'D'];
        head.extend_from_slice(&99u32.to_be_bytes());
        head.extend_from_slice(&[0; 5]);
        assert_eq!(partial_want(&buf_of(&head)), 90);
    }

    #[test]
    fn a_read_asks_for_nothing_in_particular_between_messages_or_for_huge_ones() {
        assert_eq!(partial_want(&buf_of(b"")), 0);
        assert_eq!(partial_want(&buf_of(b"Z\0\0")), 0);
        assert_eq!(partial_want(&buf_of(b"Z\0\0\0\x05I")), 0);
        let mut huge = vec![b'D'];
        huge.extend_from_slice(&(4u32 << 20).to_be_bytes());
        assert_eq!(partial_want(&buf_of(&huge)), 0);
    }
}
