//! Running a request again when it failed only because of pgsilo's statement sharing.
//!
//! A client's named statement runs on pgsilo's copy of it on whichever server the client
//! lands on. PostgreSQL may reject that copy as stale (a migration changed what its text
//! means). When the request was a Bind of such a statement opening an implicit
//! transaction on an idle server, followed only by Describe, Execute, Flush and its Sync,
//! and one of them is a Describe, nothing of it has run when the Bind fails and the client
//! will learn the result's new shape with the rows: pgsilo swallows the error and its
//! ReadyForQuery and sends the same messages again, and the copy, now marked stale
//! everywhere, is prepared afresh first. A request without a Describe gets the error, as
//! on a direct connection: its client may hold the old RowDescription (asyncpg, pgjdbc,
//! tokio-postgres and Npgsql keep it), and rows of another shape would be misread.
//!
//! To be able to, the bytes of such a request are kept as they pass (a few dozen bytes,
//! copied once) until its ReadyForQuery.

use crate::pool::prepared::StmtHash;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Off,
    /// From a qualifying Bind up to its Sync.
    Recording(StmtHash),
    /// The whole request is kept; nothing was sent after it.
    Ready(StmtHash),
    /// The Bind failed as stale: its error was swallowed, the ReadyForQuery will be.
    Retrying,
    /// The request is to be sent again.
    Replay,
}

#[derive(Debug, Default)]
pub struct StaleRetry {
    state: State,
    bytes: Vec<u8>,
    /// The request asks for the result's description: sent again, the client learns the
    /// new shape with the new rows. Without it the client may hold the old description
    /// (asyncpg, pgjdbc...) and must get the error instead.
    describes: bool,
    /// The request being recorded or replayed is already a retry: no second one.
    replayed: bool,
}

/// Recorded requests larger than this are not kept (a Bind with large parameters).
const RECORD_LIMIT: usize = 8 * 1024;

impl StaleRetry {
    /// A client message (its tag and whole bytes, or None when it streams) has been
    /// processed. `bind` is the statement of a named Bind, `idle_before` whether the
    /// server was idle outside a transaction with nothing in flight before it.
    #[inline]
    pub fn observe(&mut self, tag: u8, msg: Option<&[u8]>, bind: Option<StmtHash>, idle_before: bool) {
        match self.state {
            State::Off => {
                if let (Some(hash), Some(msg), true, false) = (bind, msg, idle_before, self.replayed) {
                    if tag == b'B' && msg.len() <= RECORD_LIMIT {
                        self.bytes.clear();
                        self.bytes.extend_from_slice(msg);
                        self.describes = false;
                        self.state = State::Recording(hash);
                    }
                }
            }
            State::Recording(hash) => match (tag, msg) {
                (b'D' | b'E' | b'H' | b'S', Some(msg)) if self.bytes.len() + msg.len() <= RECORD_LIMIT => {
                    self.bytes.extend_from_slice(msg);
                    self.describes |= tag == b'D';
                    if tag == b'S' {
                        self.state = if self.describes { State::Ready(hash) } else { State::Off };
                    }
                }
                _ => self.stop(),
            },
            // More was sent after the request: a retry would come after it.
            State::Ready(_) => self.stop(),
            State::Retrying | State::Replay => {}
        }
    }

    /// Something the recording cannot follow (a message dropped after an error pgsilo
    /// raised, a message that streams).
    pub fn stop(&mut self) {
        if matches!(self.state, State::Recording(_) | State::Ready(_)) {
            self.state = State::Off;
        }
    }

    /// The request with this Bind may be sent again.
    pub fn armed_for(&self, hash: StmtHash) -> bool {
        self.state == State::Ready(hash)
    }

    /// Its stale error was swallowed; the ReadyForQuery that follows will be too.
    pub fn retrying(&mut self) {
        self.state = State::Retrying;
    }

    pub fn is_retrying(&self) -> bool {
        self.state == State::Retrying
    }

    /// The failed attempt's ReadyForQuery came: the request can go again.
    pub fn attempt_over(&mut self) {
        self.state = State::Replay;
    }

    /// pgsilo is between the failed attempt and sending it again: the client's next
    /// bytes and the server's release wait.
    pub fn busy(&self) -> bool {
        matches!(self.state, State::Retrying | State::Replay)
    }

    /// The bytes to send again, once; the retry is not retried.
    pub fn take_replay(&mut self) -> Option<Vec<u8>> {
        if self.state != State::Replay {
            return None;
        }
        self.state = State::Off;
        self.replayed = true;
        Some(std::mem::take(&mut self.bytes))
    }

    /// A client's request got its ReadyForQuery.
    #[inline]
    pub fn answered(&mut self) {
        if matches!(self.state, State::Recording(_) | State::Ready(_)) {
            self.state = State::Off;
        }
        self.replayed = false;
    }

    /// The session goes idle: an idle client keeps no recording buffer.
    pub fn park(&mut self) {
        if self.state == State::Off {
            self.bytes = Vec::new();
        }
    }

    /// Gives back a buffer the replay used, so the next recording needs no allocation.
    pub fn recycle(&mut self, mut bytes: Vec<u8>) {
        if self.bytes.capacity() == 0 && bytes.capacity() <= RECORD_LIMIT {
            bytes.clear();
            self.bytes = bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_a_bind_to_its_sync_and_replays_it_once() {
        let mut r = StaleRetry::default();
        r.observe(b'B', Some(b"B1"), Some(7), true);
        r.observe(b'D', Some(b"D1"), None, false);
        r.observe(b'E', Some(b"E1"), None, false);
        r.observe(b'S', Some(b"S1"), None, false);
        assert!(r.armed_for(7));
        assert!(!r.armed_for(8));
        r.retrying();
        assert!(r.busy());
        r.attempt_over();
        assert_eq!(r.take_replay().as_deref(), Some(&b"B1D1E1S1"[..]));
        assert!(!r.busy());
        // The replay itself is not recorded again.
        r.observe(b'B', Some(b"B1"), Some(7), true);
        assert!(!r.armed_for(7));
        r.answered();
        r.observe(b'B', Some(b"B1"), Some(7), true);
        r.observe(b'D', Some(b"D1"), None, false);
        r.observe(b'S', Some(b"S1"), None, false);
        assert!(r.armed_for(7));
        // Without a Describe the client may hold the old description: no retry.
        r.answered();
        r.observe(b'B', Some(b"B1"), Some(7), true);
        r.observe(b'E', Some(b"E1"), None, false);
        r.observe(b'S', Some(b"S1"), None, false);
        assert!(!r.armed_for(7));
    }

    #[test]
    fn does_not_record_what_could_not_be_sent_again() {
        let mut r = StaleRetry::default();
        // Not idle before the Bind: something may have run.
        r.observe(b'B', Some(b"B"), Some(7), false);
        r.observe(b'S', Some(b"S"), None, false);
        assert!(!r.armed_for(7));
        // Another Bind inside the request.
        r.observe(b'B', Some(b"B"), Some(7), true);
        r.observe(b'B', Some(b"B"), Some(8), false);
        r.observe(b'S', Some(b"S"), None, false);
        assert!(!r.armed_for(7));
        // More pipelined after the Sync.
        r.answered();
        r.observe(b'B', Some(b"B"), Some(7), true);
        r.observe(b'D', Some(b"D"), None, false);
        r.observe(b'S', Some(b"S"), None, false);
        r.observe(b'Q', Some(b"Q"), None, false);
        assert!(!r.armed_for(7));
        // A streamed message.
        r.observe(b'B', Some(b"B"), Some(7), true);
        r.observe(b'E', None, None, false);
        assert!(!r.armed_for(7));
    }
}
