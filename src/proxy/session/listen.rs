//! LISTEN/NOTIFY under transaction pooling, the session's side: a simple Query of only
//! LISTEN/UNLISTEN statements, outside a transaction block, is answered by pgsilo itself
//! and changes the client's subscriptions in the instance's registry
//! (`context::listen`); notifications the pool's listener receives are queued on the
//! session's signal and written between the client's transactions or while it is idle,
//! never inside a result.
//!
//! Anything else that LISTENs (inside a transaction block, mixed with other statements,
//! through the extended protocol) goes to the server, and the client keeps that server
//! until it leaves (`Flow::pinned`), as before.

use super::Flow;
use crate::config::PoolMode;
use crate::context::listen::{Change, Subscription, LISTEN_ACK_WAIT};
use crate::protocol::backend;
use crate::protocol::Header;
use crate::proxy::downstream::Hold;
use crate::proxy::sql_scan::{listen_only, may_be_listen_only, ListenStmt};
use crate::proxy::upstream::QUERY_SCAN_LIMIT;

impl Flow {
    /// A simple Query of only LISTEN/UNLISTEN at the front of the client's bytes, under
    /// transaction pooling, with nothing in flight and outside a transaction block (a
    /// server may still be attached, about to go back to the pool): its length and its
    /// statements. Not for a client pinned to its server by an earlier LISTEN there.
    pub(super) fn listen_query(&self) -> Option<(usize, Vec<ListenStmt>)> {
        if self.conf.mode != PoolMode::Transaction
            || self.pinned
            || !self.queue.is_empty()
            || self.client.gone
            || self.up.want != 0
            || self.up.write.is_some()
            || self.retry.busy()
            || self.params.hold != Hold::No
            || !self.tracker.is_idle()
        {
            return None;
        }
        let data = self.up.buf.as_ref()?.data();
        let h = Header::peek(data)?;
        if h.tag != b'Q' || h.total() > data.len() || h.total() > QUERY_SCAN_LIMIT {
            return None;
        }
        // A malformed length is upstream::process's to refuse.
        let sql = data.get(5..h.total())?.strip_suffix(&[0])?;
        if !may_be_listen_only(sql) {
            return None;
        }
        listen_only(sql).map(|s| (h.total(), s))
    }

    /// Answers a LISTEN/UNLISTEN query from [`Flow::listen_query`]: the subscriptions
    /// change, and once a new channel is LISTENed on the pool's listener (or that has
    /// been tried for a while), the client gets a CommandComplete per statement and
    /// ReadyForQuery 'I', as from PostgreSQL.
    pub(super) async fn answer_listen(&mut self, len: usize, stmts: Vec<ListenStmt>) {
        if let Some(b) = self.up.buf.as_mut() {
            b.consume(len);
        }
        let sub = (self.listen.worker, self.who.id);
        let pool = self.who.pool.shared.clone();
        if self.listen.subscription.is_none() {
            self.listen.subscribers.add(self.who.id, &self.signal);
            self.listen.subscription = Some(Subscription {
                instance: self.listen.instance.clone(),
                pool: pool.clone(),
                sub,
            });
        }
        let changes: Vec<Change<'_>> = stmts
            .iter()
            .map(|s| match s {
                ListenStmt::Listen(ch) => Change::Listen(ch),
                ListenStmt::Unlisten(ch) => Change::Unlisten(ch),
                ListenStmt::UnlistenAll => Change::UnlistenAll,
            })
            .collect();
        let instance = self.listen.instance.clone();
        if let Some(placed) = instance.listens.apply(&instance, &pool, sub, &changes) {
            let _ = monoio::time::timeout(LISTEN_ACK_WAIT, placed).await;
        }
        let out = self.down.pend.vec_mut();
        for s in &stmts {
            let tag = match s {
                ListenStmt::Listen(_) => "LISTEN",
                _ => "UNLISTEN",
            };
            backend::command_complete(out, tag);
        }
        backend::ready_for_query(out, b'I');
        self.tally.queries += 1;
    }

    /// Queued notifications go to the client now if it is between transactions and no
    /// output of a result is on its way (`client_writing`: a client write in flight).
    pub(super) fn flush_notes(&mut self, client_writing: bool) {
        if client_writing
            || self.client.gone
            || !self.tracker.is_idle()
            || self.down.fwd > 0
            || self.down.skip > 0
            || self.down.partial > 0
            || !self.down.pend.is_empty()
            || self.params.hold != Hold::No
            || !self.signal.has_notes()
        {
            return;
        }
        let notes = self.signal.take_notes();
        self.down.pend.extend_from_slice(&notes);
    }
}
