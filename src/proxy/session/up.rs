//! Client to server: reading the client when nothing buffered can be acted on, processing
//! its bytes for the attached server (`upstream::process`), and the up slot's writes.
//! Bytes go out as they came unless pgsilo must change them.

use std::time::Instant;

use super::{ClientRd, Flow, SessionError};
use crate::pool::ServerWr;
use crate::protocol::MsgBuf;
use crate::proxy::upstream::{self, UpState};

/// What the up slot is writing to the server, to settle when the write completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UpWrite {
    /// The first n bytes of the client buffer, as they came.
    Range(usize),
    /// The output buffer; then n bytes of the client buffer are done.
    Copy(usize),
}

impl Flow {
    /// Bookkeeping for bytes the client sent.
    pub(super) fn client_sent(&mut self, n: usize) {
        self.signal.active();
        self.tally.bytes_in += n as u64;
        self.up.want = 0;
        if self.timing.timeouts.client_idle.is_some() {
            self.timing.last_activity = Instant::now();
        }
    }

    /// The up slot is not writing to the server, so pgsilo may write to it.
    pub(super) fn server_wr_free(&self) -> bool {
        self.up.write.is_none() && self.server.as_ref().is_some_and(|s| s.wr.is_some())
    }

    /// The next write to the server: output already prepared, or what processing the
    /// client's buffered bytes (or pgsilo's own needs) produces now.
    pub(super) fn next_server_write(&mut self) -> Result<Option<(ServerWr, MsgBuf, usize)>, SessionError> {
        if self.up.write.is_none() {
            self.prepare_server_write()?;
        }
        let Some(kind) = self.up.write else {
            return Ok(None);
        };
        let Some(wr) = self.server.as_mut().and_then(|s| s.wr.take()) else {
            return Ok(None);
        };
        let (buf, n) = match kind {
            UpWrite::Range(n) => (self.up.buf.take(), n),
            UpWrite::Copy(_) => {
                let out = self.up.out.take();
                let n = out.as_ref().map_or(0, |o| o.len());
                (out, n)
            }
        };
        match buf {
            Some(buf) => Ok(Some((wr, buf, n))),
            None => {
                // The buffer is in another operation; try again when it is back.
                if let Some(s) = self.server.as_mut() {
                    s.wr = Some(wr);
                }
                Ok(None)
            }
        }
    }

    /// Decides what goes to the server next, leaving it in `up.write`.
    fn prepare_server_write(&mut self) -> Result<(), SessionError> {
        if self.server.is_none() || !self.server_wr_free() {
            return Ok(());
        }
        if self.up.blocked {
            if !self.queue.is_empty() {
                return Ok(());
            }
            self.up.blocked = false;
        }
        if self.retry.busy() {
            if self.queue.is_empty() {
                self.replay()?;
            }
            // The failed attempt is still being answered; the client's bytes wait.
            return Ok(());
        }
        if self.settings_first() {
            return Ok(());
        }
        let has_data = self.up.buf.as_ref().is_some_and(|b| !b.is_empty());
        if has_data && self.up.want == 0 {
            self.process_up()?;
        }
        Ok(())
    }

    /// A server write finished: its buffer goes back to where it came from, and what it
    /// wrote of the client's bytes is done.
    pub(super) fn settle_server_write(&mut self, buf: MsgBuf) {
        match self.up.write.take() {
            Some(UpWrite::Range(n)) => {
                let mut b = buf;
                b.consume(n);
                self.up.buf = Some(b);
            }
            Some(UpWrite::Copy(n)) => {
                let mut b = buf;
                b.clear();
                self.up.out = Some(b);
                if let Some(u) = self.up.buf.as_mut() {
                    u.consume(n);
                }
            }
            None => self.up.out = Some(buf),
        }
    }

    /// The next read of the client, when nothing buffered can be acted on without more.
    pub(super) fn next_client_read(&mut self) -> Result<Option<(ClientRd, MsgBuf)>, SessionError> {
        if self.client.gone || self.up.blocked || matches!(self.up.write, Some(UpWrite::Range(_))) {
            return Ok(None);
        }
        let has_data = self.up.buf.as_ref().is_some_and(|b| !b.is_empty());
        if has_data && self.up.want == 0 {
            if self.server.is_some() {
                // Processing comes first (next_server_write); unprocessed bytes here
                // wait for the server's write half.
                return Ok(None);
            }
            let data = self.up.buf.as_ref().map(|b| b.data()).unwrap_or_default();
            let p = upstream::peek(data)?;
            if p.terminate {
                self.client.gone = true;
                return Ok(None);
            }
            if p.needs_server {
                return Ok(None);
            }
            // Stray COPY data after a failed COPY, or a bare Flush: the server would
            // ignore it, so there is no need to find one.
            if let Some(b) = self.up.buf.as_mut() {
                b.consume(p.whole);
            }
            if p.whole == 0 {
                self.up.want = crate::protocol::HEADER_LEN;
            }
        }
        if self.client.rd.is_none() {
            return Ok(None);
        }
        let Some(mut buf) = self.up.buf.take() else {
            return Ok(None);
        };
        if buf.capacity() == 0 {
            buf = self.bufs.take();
        }
        let need = self.up.want.saturating_sub(buf.len());
        if need > 0 {
            buf.reserve(need);
        } else if buf.spare() == 0 {
            buf.reserve(buf.capacity());
        }
        let Some(rd) = self.client.rd.take() else {
            self.up.buf = Some(buf);
            return Ok(None);
        };
        Ok(Some((rd, buf)))
    }

    /// Runs the up-direction processing over buffered client bytes for the attached
    /// server and decides what to write.
    fn process_up(&mut self) -> Result<(), SessionError> {
        if self.server.is_none() {
            return Ok(());
        }
        let Some(buf) = self.up.buf.take() else {
            return Ok(());
        };
        let mut out = self.up.out.take().unwrap_or_else(|| MsgBuf::with_capacity(0));
        debug_assert!(out.is_empty());
        let r = self.up_process(buf.data(), out.vec_mut());
        self.up.buf = Some(buf);
        self.up.out = Some(out);
        let r = r?;
        if r.terminate {
            if let Some(b) = self.up.buf.as_mut() {
                b.truncate(r.consumed);
            }
            self.client.gone = true;
        }
        if r.blocked {
            self.up.blocked = true;
        } else if r.consumed == 0 {
            self.up.want = r.want;
        }
        if r.consumed > 0 {
            self.timing.quiet_since = None;
        }
        if r.consumed > 0 && self.timing.req_started.is_none() && self.tracker.outstanding() > 0 {
            let now = Instant::now();
            self.timing.req_started = Some(now);
            self.timing.xact_started.get_or_insert(now);
            self.who.entry.entry.touch();
        }
        if r.zero_copy {
            if r.consumed > 0 {
                self.up.write = Some(UpWrite::Range(r.consumed));
            }
        } else if self.up.out.as_ref().is_some_and(|o| !o.is_empty()) {
            self.up.write = Some(UpWrite::Copy(r.consumed));
        } else if let Some(b) = self.up.buf.as_mut() {
            // Everything was answered locally or dropped.
            b.consume(r.consumed);
        }
        // Answers pgsilo owes with nothing before them go to the client now.
        self.down.synth.clear();
        self.queue.flush_synth(&mut self.down.synth);
        if !self.down.synth.is_empty() {
            self.down.pend.extend_from_slice(&self.down.synth);
        }
        Ok(())
    }

    /// The client-to-server processing of `data` for the attached server, output in `out`.
    fn up_process(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<upstream::UpResult, SessionError> {
        let Some(server) = self.server.as_mut() else {
            return Ok(upstream::UpResult::default());
        };
        let mut st = UpState {
            cur: &mut self.up.cur,
            tracker: &mut self.tracker,
            queue: &mut self.queue,
            statements: if self.conf.track_statements {
                Some(&mut self.statements)
            } else {
                None
            },
            unnamed: &mut self.unnamed,
            server: &mut server.meta,
            max_prepared: self.conf.max_prepared,
            retry: &mut self.retry,
            listen_here: self.conf.mode == crate::config::PoolMode::Transaction && !self.pinned,
        };
        Ok(upstream::process(data, &mut st, out)?)
    }

    /// Sends again the request that failed on a stale shared statement: processed afresh
    /// (the statement is now prepared anew first), written from pgsilo's output buffer.
    fn replay(&mut self) -> Result<(), SessionError> {
        let Some(bytes) = self.retry.take_replay() else {
            return Ok(());
        };
        let mut out = self.up.out.take().unwrap_or_else(|| MsgBuf::with_capacity(0));
        out.clear();
        let r = self.up_process(&bytes, out.vec_mut());
        if let Ok(r) = &r {
            if r.zero_copy {
                out.extend_from_slice(&bytes[..r.consumed]);
            }
        }
        self.up.out = Some(out);
        r?;
        log::info!(
            "C-{}: request ran on a stale shared statement; sent again after preparing it afresh",
            self.who.id
        );
        self.retry.recycle(bytes);
        self.up.write = Some(UpWrite::Copy(0));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{block_on, msg, query, Kit};
    use super::*;
    use crate::config::PoolMode;

    #[test]
    fn terminate_before_anything_that_needs_a_server_ends_the_client_without_one() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            flow.up.buf.as_mut().unwrap().extend_from_slice(&msg(b'X', b""));
            assert!(flow.next_client_read().unwrap().is_none());
            assert!(flow.client.gone);
            assert!(!flow.wants_acquire());
        })
    }

    #[test]
    fn a_message_that_needs_a_server_stops_reading_until_one_is_attached() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            flow.up.buf.as_mut().unwrap().extend_from_slice(&query("select 1"));
            assert!(flow.next_client_read().unwrap().is_none());
            assert!(!flow.client.gone);
            assert!(flow.wants_acquire());
        })
    }

    #[test]
    fn a_flush_without_a_server_is_dropped_and_reading_goes_on() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            flow.up.buf.as_mut().unwrap().extend_from_slice(&msg(b'H', b""));
            let (_rd, buf) = flow.next_client_read().unwrap().expect("a read");
            assert!(buf.is_empty());
            assert!(buf.capacity() > 0, "a buffer from the worker's pool");
        })
    }

    #[test]
    fn a_header_cut_short_asks_the_read_for_the_rest_of_it() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client) = kit.flow();
            flow.up.buf.as_mut().unwrap().extend_from_slice(b"Q\0\0");
            let (_rd, buf) = flow.next_client_read().unwrap().expect("a read");
            assert_eq!(flow.up.want, crate::protocol::HEADER_LEN);
            assert_eq!(buf.data(), b"Q\0\0", "kept");
        })
    }

    #[test]
    fn a_query_goes_to_the_server_from_the_clients_own_buffer() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            let q = query("select 1");
            flow.up.buf.as_mut().unwrap().extend_from_slice(&q);
            assert!(flow.next_client_read().unwrap().is_none(), "processing first");
            let (wr, buf, n) = flow.next_server_write().unwrap().expect("a server write");
            assert_eq!(flow.up.write, Some(UpWrite::Range(q.len())), "no copy");
            assert_eq!(&buf.data()[..n], q);
            assert!(flow.up.buf.is_none(), "lent to the write");
            assert!(flow.timing.req_started.is_some(), "a request in flight");
            flow.server.as_mut().unwrap().wr = Some(wr);
            flow.settle_server_write(buf);
            assert!(flow.up.write.is_none());
            assert!(flow.up.buf.as_ref().is_some_and(|b| b.is_empty()), "done with and back");
        })
    }
}
