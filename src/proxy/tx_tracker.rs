//! Knows, from message headers alone, when a server has answered everything a client
//! sent and sits outside a transaction: the moment transaction pooling may hand it on.

/// Counts requests that will each end with a ReadyForQuery and follows the transaction
/// status byte. Fed with message type bytes in the order they cross the pooler.
#[derive(Clone, Debug)]
pub struct TxTracker {
    /// Query, FunctionCall and Sync messages sent whose ReadyForQuery has not come back.
    outstanding: u32,
    /// Extended-protocol messages sent since the last Sync: the server is inside an
    /// implicit transaction until that Sync arrives.
    since_sync: bool,
    /// Syncs sent after the most recent Execute; if that Execute starts a COPY FROM
    /// STDIN, the server ignores them (it is in copy-in mode when they arrive).
    syncs_after_execute: u32,
    /// The server has asked for COPY data and the client has not yet finished it.
    copy_in: bool,
    /// Status byte of the last ReadyForQuery: I (idle), T (in transaction), E (failed).
    status: u8,
}

impl Default for TxTracker {
    fn default() -> Self {
        TxTracker {
            outstanding: 0,
            since_sync: false,
            syncs_after_execute: 0,
            copy_in: false,
            status: b'I',
        }
    }
}

impl TxTracker {
    /// A message from the client, forwarded to the server.
    #[inline]
    pub fn client_message(&mut self, tag: u8) {
        match tag {
            b'Q' | b'F' => {
                self.outstanding += 1;
                self.since_sync = false;
                self.syncs_after_execute = 0;
            }
            // In copy-in mode the server ignores Sync (and Flush).
            b'S' if !self.copy_in => {
                self.outstanding += 1;
                self.since_sync = false;
                self.syncs_after_execute += 1;
            }
            b'E' => {
                self.since_sync = true;
                self.syncs_after_execute = 0;
            }
            b'P' | b'B' | b'D' | b'C' => self.since_sync = true,
            b'c' | b'f' => self.copy_in = false,
            // Flush, CopyData and anything unknown leave the count alone.
            _ => {}
        }
    }

    /// A message from the server, on its way to the client.
    #[inline]
    pub fn server_message(&mut self, tag: u8, first_body_byte: Option<u8>) {
        match tag {
            b'Z' => {
                self.outstanding = self.outstanding.saturating_sub(1);
                if let Some(s) = first_body_byte {
                    self.status = s;
                }
                // A failed COPY ends copy-in mode from the server's side too.
                if self.outstanding == 0 {
                    self.copy_in = false;
                }
            }
            b'G' => {
                // Syncs the client pipelined behind the COPY's Execute arrived during
                // copy-in mode and will get no ReadyForQuery.
                self.outstanding = self.outstanding.saturating_sub(self.syncs_after_execute);
                self.syncs_after_execute = 0;
                self.copy_in = true;
            }
            _ => {}
        }
    }

    /// Nothing in flight, no half-finished pipeline, outside any transaction.
    #[inline]
    pub fn is_idle(&self) -> bool {
        self.outstanding == 0 && !self.since_sync && !self.copy_in && self.status == b'I'
    }

    /// Nothing in flight, but possibly inside a transaction block: a ROLLBACK would clean up.
    #[inline]
    pub fn is_quiet(&self) -> bool {
        self.outstanding == 0 && !self.since_sync && !self.copy_in
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    pub fn reset(&mut self) {
        *self = TxTracker::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(t: &mut TxTracker, tags: &[u8]) {
        tags.iter().for_each(|&b| t.client_message(b));
    }

    #[test]
    fn simple_query_round_trip() {
        let mut t = TxTracker::default();
        client(&mut t, b"Q");
        assert!(!t.is_idle());
        t.server_message(b'Z', Some(b'I'));
        assert!(t.is_idle());
    }

    #[test]
    fn transaction_block_holds_until_commit() {
        let mut t = TxTracker::default();
        client(&mut t, b"Q");
        t.server_message(b'Z', Some(b'T'));
        assert!(!t.is_idle());
        assert!(t.is_quiet());
        client(&mut t, b"Q");
        t.server_message(b'Z', Some(b'I'));
        assert!(t.is_idle());
    }

    #[test]
    fn pipeline_waits_for_every_sync() {
        let mut t = TxTracker::default();
        client(&mut t, b"PBDES");
        client(&mut t, b"BES");
        client(&mut t, b"BES");
        t.server_message(b'Z', Some(b'I'));
        t.server_message(b'Z', Some(b'I'));
        assert!(!t.is_idle());
        t.server_message(b'Z', Some(b'I'));
        assert!(t.is_idle());
    }

    #[test]
    fn messages_after_the_last_sync_keep_the_server() {
        let mut t = TxTracker::default();
        client(&mut t, b"PBESPB");
        t.server_message(b'Z', Some(b'I'));
        assert!(!t.is_idle());
        client(&mut t, b"ES");
        t.server_message(b'Z', Some(b'I'));
        assert!(t.is_idle());
    }

    #[test]
    fn flush_without_sync_is_not_idle() {
        let mut t = TxTracker::default();
        client(&mut t, b"PH");
        assert!(!t.is_idle());
    }

    #[test]
    fn extended_copy_in_discounts_the_pipelined_sync() {
        let mut t = TxTracker::default();
        // libpq: Parse/Bind/Describe/Execute/Sync, then waits for CopyInResponse.
        client(&mut t, b"PBDES");
        t.server_message(b'G', None);
        client(&mut t, b"dddS"); // a Sync during copy-in is ignored by the server
        assert!(!t.is_idle());
        client(&mut t, b"cS");
        t.server_message(b'Z', Some(b'I'));
        assert!(t.is_idle());
    }

    #[test]
    fn simple_copy_in_and_copy_fail() {
        let mut t = TxTracker::default();
        client(&mut t, b"Q");
        t.server_message(b'G', None);
        client(&mut t, b"dd");
        assert!(!t.is_idle());
        client(&mut t, b"f");
        t.server_message(b'Z', Some(b'I'));
        assert!(t.is_idle());
    }

    #[test]
    fn copy_error_from_server_still_waits_for_client_copy_end() {
        let mut t = TxTracker::default();
        client(&mut t, b"Q");
        t.server_message(b'G', None);
        client(&mut t, b"d");
        // The server rejects a row: ErrorResponse then ReadyForQuery.
        t.server_message(b'Z', Some(b'I'));
        // outstanding reached 0, which ends copy-in from the server's side
        assert!(t.is_idle());
    }

    #[test]
    fn failed_transaction_is_not_idle() {
        let mut t = TxTracker::default();
        client(&mut t, b"Q");
        t.server_message(b'Z', Some(b'E'));
        assert!(!t.is_idle());
    }
}
