//! The client's settings carried across servers: pgsilo's own queries that read them
//! back after a SET/RESET and put them right on the server, and the ReadyForQuery held
//! meanwhile (see `Params` in mod.rs). None of them runs inside the client's
//! transaction block: it would take the transaction's snapshot.

use std::sync::Arc;

use super::up::UpWrite;
use super::Flow;
use crate::config::PoolMode;
use crate::protocol::{backend, frontend, MsgBuf};
use crate::proxy::downstream::{Hold, Resetting};
use crate::proxy::expect::{Expect, Injected};
use crate::proxy::params::{after_sync, apply_snapshot, sync_statement, SNAPSHOT_QUERY};

impl Flow {
    /// Between events: under transaction pooling, a SET the client ran is read back
    /// before the server goes to someone else. Returns whether the read-back was sent.
    pub(super) fn read_back_settings(&mut self) -> bool {
        if self.client.gone && self.params.hold != Hold::No {
            // No one to hold a ReadyForQuery for; what runs finishes on its own.
            self.params.hold = Hold::No;
        }
        if !self.snapshot_due() {
            return false;
        }
        // The server read may be armed: it will carry the answer.
        self.params.changed = false;
        self.inject_query(SNAPSHOT_QUERY, Injected::Snapshot);
        true
    }

    /// The client changed its settings and the server now sits between transactions,
    /// nothing in flight: the moment to read the settings back.
    fn snapshot_due(&self) -> bool {
        self.params.changed
            && self.conf.mode == PoolMode::Transaction
            && self.params.hold == Hold::No
            && !self.client.gone
            && self.server_wr_free()
            && self.up.cur.skip == 0
            && self.tracker.is_idle()
            && self.queue.is_empty()
    }

    /// Before the client's next bytes go to the server: the next step of a held
    /// ReadyForQuery, or the client's settings put back after a RESET. True when the
    /// client's bytes wait (pgsilo's own query was written or is still running).
    pub(super) fn settings_first(&mut self) -> bool {
        match self.params.hold {
            Hold::No => {}
            Hold::Pending if self.queue.is_empty() && self.up.cur.skip == 0 => {
                self.params.changed = false;
                self.params.hold = Hold::Snapshot;
                self.inject_query(SNAPSHOT_QUERY, Injected::Snapshot);
                return true;
            }
            Hold::Correct if self.queue.is_empty() => {
                if self.inject_resync() {
                    self.params.hold = Hold::Correcting;
                } else {
                    self.release_hold();
                }
                return true;
            }
            // pgsilo's own queries run; the client's next bytes wait for its answer.
            _ => return true,
        }
        // Not inside the client's transaction block: a query there would take its
        // snapshot. The settings are put right when the block ends.
        if self.params.resetting == Resetting::Done && self.queue.is_empty() && self.tracker.status() == b'I' {
            self.params.resetting = Resetting::No;
            if self.inject_resync() {
                return true;
            }
        }
        false
    }

    /// pgsilo's own query has been answered in full (the server's bytes just processed):
    /// what it found becomes the client's settings, and a held ReadyForQuery moves on.
    pub(super) fn settle_injected(&mut self) {
        match self.queue.finished.take() {
            Some(Injected::Resync) => {
                if let Some(server) = self.server.as_mut() {
                    after_sync(
                        Arc::make_mut(&mut self.who.settings),
                        &mut server.meta,
                        &self.params.welcome,
                    );
                }
                if self.params.hold == Hold::Correcting {
                    self.release_hold();
                }
            }
            Some(Injected::Snapshot) => {
                let captured = std::mem::take(&mut self.params.captured);
                if let Some(server) = self.server.as_mut() {
                    apply_snapshot(
                        Arc::make_mut(&mut self.who.settings),
                        &mut server.meta,
                        &self.params.welcome,
                        &self.params.initial,
                        &captured,
                    );
                }
                if self.params.hold == Hold::Snapshot {
                    self.params.hold = Hold::Correct;
                }
            }
            None => {}
        }
    }

    /// After a RESET: sends the statement that gives the server the client's settings
    /// again, its answers swallowed. Returns whether anything had to be sent.
    fn inject_resync(&mut self) -> bool {
        let Some(server) = self.server.as_ref() else {
            return false;
        };
        let Some(sql) = sync_statement(&self.who.settings, &server.meta) else {
            return false;
        };
        self.inject_query(&sql, Injected::Resync);
        true
    }

    /// The settings are right: the client gets the ReadyForQuery it was waiting for, with
    /// the transaction status as it is now.
    fn release_hold(&mut self) {
        self.params.hold = Hold::No;
        backend::ready_for_query(self.down.pend.vec_mut(), self.tracker.status());
    }

    /// Sends a query of pgsilo's own through the up slot; the queue swallows its answers.
    fn inject_query(&mut self, sql: &str, why: Injected) {
        let out = self.up.out.get_or_insert_with(|| MsgBuf::with_capacity(64));
        out.clear();
        frontend::query(out.vec_mut(), sql);
        self.tracker.client_message(b'Q');
        self.queue.push(Expect::InjectedQuery(why));
        self.up.write = Some(UpWrite::Copy(0));
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{block_on, query, Kit};
    use super::*;

    #[test]
    fn a_set_under_transaction_pooling_is_read_back_once_the_server_is_between_transactions() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            assert!(!flow.read_back_settings(), "nothing changed");
            flow.params.changed = true;
            flow.tracker.server_message(b'Z', Some(b'T'));
            assert!(!flow.read_back_settings(), "not inside the client's transaction");
            flow.tracker.server_message(b'Z', Some(b'I'));
            assert!(flow.read_back_settings());
            assert_eq!(flow.up.out.as_ref().unwrap().data(), query(SNAPSHOT_QUERY));
            assert_eq!(flow.up.write, Some(UpWrite::Copy(0)));
            assert_eq!(flow.queue.len(), 1, "its answers are swallowed");
            assert!(!flow.params.changed);
        })
    }

    #[test]
    fn session_pooling_reads_nothing_back() {
        block_on(async {
            let kit = Kit::new(PoolMode::Session, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            flow.params.changed = true;
            assert!(!flow.read_back_settings());
        })
    }

    #[test]
    fn a_departed_client_has_no_ready_for_query_held_for_it() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            flow.params.hold = Hold::Snapshot;
            flow.client.gone = true;
            assert!(!flow.read_back_settings());
            assert_eq!(flow.params.hold, Hold::No);
        })
    }

    #[test]
    fn a_held_ready_for_query_first_reads_the_settings_back_and_the_client_waits_meanwhile() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            assert!(!flow.settings_first(), "nothing held: the client's bytes go");
            flow.params.hold = Hold::Pending;
            assert!(flow.settings_first());
            assert_eq!(flow.params.hold, Hold::Snapshot);
            assert_eq!(flow.up.out.as_ref().unwrap().data(), query(SNAPSHOT_QUERY));
            flow.up.write = None;
            assert!(flow.settings_first(), "the snapshot runs: still waiting");
            assert_eq!(flow.params.hold, Hold::Snapshot);
            assert!(flow.up.write.is_none(), "nothing more sent");
        })
    }

    #[test]
    fn settings_already_right_release_the_held_ready_for_query_at_once() {
        block_on(async {
            let kit = Kit::new(PoolMode::Transaction, |_| {});
            let (mut flow, _client, _server) = kit.attached_flow();
            flow.params.hold = Hold::Correct;
            assert!(flow.settings_first());
            assert_eq!(flow.params.hold, Hold::No);
            assert_eq!(flow.down.pend.data(), b"Z\0\0\0\x05I");
        })
    }
}
