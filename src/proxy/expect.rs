//! The responses a server owes, in order, so pgsilo can answer for messages it did not
//! forward (a Parse of a statement the server already has, a Close it keeps), swallow
//! answers to messages it added (a Parse on a server that lacks the statement), and keep
//! count when an error makes the server skip everything up to the next Sync.

use std::collections::VecDeque;
use std::rc::Rc;

use super::prepared::{ClientStatements, StmtDef};
use crate::pool::prepared::StmtHash;
use crate::pool::ServerMeta;

/// Which client message a forwarded entry stands for; it decides which server message
/// completes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Parse,
    Bind,
    DescribeStatement,
    DescribePortal,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
}

pub enum Expect {
    Forward(Kind),
    /// A client Parse sent under pgsilo's name; undone if the server never runs it.
    NamedParse {
        hash: StmtHash,
        client_name: Box<[u8]>,
    },
    /// pgsilo's own Parse ahead of a Bind or Describe; its ParseComplete is swallowed.
    InjectedParse {
        hash: StmtHash,
    },
    /// pgsilo's own Close evicting a statement; its CloseComplete is swallowed.
    InjectedClose {
        hash: StmtHash,
    },
    /// A Bind of a client's named statement, sent as pgsilo's copy of it: if PostgreSQL
    /// rejects the copy as stale, it is not used again anywhere.
    NamedBind {
        hash: StmtHash,
    },
    /// pgsilo's Parse of a throwaway statement for a rewritten DEALLOCATE; its
    /// ParseComplete is swallowed.
    ScratchParse,
    /// The client's unnamed Parse of `DEALLOCATE name`, rewritten to deallocate a
    /// throwaway statement instead (see `upstream::rewrite_dealloc_parse`); the name comes
    /// back if the server does not take it.
    DeallocParse {
        prev: Option<u64>,
        client_name: Box<[u8]>,
        def: Rc<StmtDef>,
    },
    /// A simple Query in which pgsilo rewrote the client's DEALLOCATEs of its own
    /// statements (see `upstream::rewrite_deallocates`).
    DeallocQuery(Box<DeallocPlan>),
    /// CloseComplete owed for a Close pgsilo answered itself.
    SynthClose {
        client_name: Box<[u8]>,
        def: Option<Rc<StmtDef>>,
    },
    /// An ErrorResponse pgsilo raises in the client's stream (whole message bytes).
    SynthError(Box<[u8]>),
    /// The client's Parse of the unnamed statement; `prev` is what the server's unnamed
    /// statement was before, which stays if the server skips this Parse.
    UnnamedParse {
        prev: Option<u64>,
    },
    /// pgsilo's Parse of the client's unnamed statement on a server that has another
    /// client's; its ParseComplete is swallowed.
    InjectedUnnamed {
        prev: Option<u64>,
    },
    /// A query pgsilo sends on its own; all its answers are swallowed except
    /// ParameterStatus, which the client should see.
    InjectedQuery(Injected),
}

/// What pgsilo changed in a simple Query: each `DEALLOCATE name` of a client statement
/// became `PREPARE pgsilo_dN AS SELECT; DEALLOCATE pgsilo_dN`, so PostgreSQL itself
/// answers it (its tag, or its error in a failed transaction) in its place in the string.
#[derive(Default)]
pub struct DeallocPlan {
    /// Statements (by position in the rewritten text) whose CommandComplete is pgsilo's.
    pub swallow: Vec<usize>,
    /// The client names deallocated, each with its DEALLOCATE's position and the
    /// definition to give back if the server never got that far.
    pub dropped: Vec<(usize, Box<[u8]>, Rc<StmtDef>)>,
    /// CommandCompletes seen so far.
    pub seen: usize,
}

impl DeallocPlan {
    /// The query is over: names whose DEALLOCATE did not complete are the client's again.
    fn restore(self, client: &mut ClientStatements) {
        for (at, name, def) in self.dropped {
            if at >= self.seen {
                client.insert(&name, def);
            }
        }
    }
}

/// Why pgsilo sent a query of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    /// Giving the server the client's settings again after a RESET.
    Resync,
    /// Reading the session's settings after the client ran SET or RESET; its rows are
    /// captured.
    Snapshot,
}

impl Expect {
    fn is_synth(&self) -> bool {
        matches!(self, Expect::SynthClose { .. } | Expect::SynthError(_))
    }

    fn kind(&self) -> Kind {
        match self {
            Expect::Forward(k) => *k,
            Expect::NamedParse { .. }
            | Expect::InjectedParse { .. }
            | Expect::ScratchParse
            | Expect::DeallocParse { .. }
            | Expect::UnnamedParse { .. }
            | Expect::InjectedUnnamed { .. } => Kind::Parse,
            Expect::InjectedQuery(_) | Expect::DeallocQuery(_) => Kind::Query,
            Expect::NamedBind { .. } => Kind::Bind,
            Expect::InjectedClose { .. } | Expect::SynthClose { .. } => Kind::Close,
            // An error pgsilo raised behaves like a message the server failed.
            Expect::SynthError(_) => Kind::Parse,
        }
    }

    fn swallowed(&self) -> bool {
        matches!(
            self,
            Expect::InjectedParse { .. }
                | Expect::ScratchParse
                | Expect::InjectedClose { .. }
                | Expect::InjectedUnnamed { .. }
                | Expect::InjectedQuery(_)
        )
    }

    fn completed_by(&self, tag: u8) -> bool {
        match self.kind() {
            Kind::Parse => tag == b'1',
            Kind::Bind => tag == b'2',
            Kind::DescribeStatement | Kind::DescribePortal => tag == b'T' || tag == b'n',
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Close => tag == b'3',
            Kind::Sync | Kind::Query | Kind::FunctionCall => tag == b'Z',
        }
    }

    /// The server did not run this message: it failed (`skipped` false) or an earlier
    /// one did and the server skipped to Sync (`skipped` true). Take back what was
    /// recorded when it was sent.
    fn undo(self, client: &mut ClientStatements, server: &mut ServerMeta, skipped: bool) {
        match self {
            // The server may or may not hold a statement of that name now (a replaced
            // copy's Close may have run): it is closed before it is prepared again.
            Expect::NamedParse { hash, client_name } => {
                server.prepared.spoil(hash);
                client.remove(&client_name);
            }
            Expect::InjectedParse { hash } | Expect::InjectedClose { hash } => server.prepared.spoil(hash),
            Expect::DeallocQuery(plan) => plan.restore(client),
            Expect::SynthClose {
                client_name,
                def: Some(def),
            } => client.insert(&client_name, def),
            // A failed Parse of the unnamed statement has already dropped the old one; a
            // skipped one left it in place.
            Expect::UnnamedParse { prev } | Expect::InjectedUnnamed { prev } => {
                server.unnamed_stmt = if skipped { prev } else { None };
            }
            Expect::DeallocParse { prev, client_name, def } => {
                server.unnamed_stmt = if skipped { prev } else { None };
                client.insert(&client_name, def);
            }
            Expect::SynthClose { def: None, .. }
            | Expect::SynthError(_)
            | Expect::Forward(_)
            | Expect::NamedBind { .. }
            | Expect::ScratchParse
            | Expect::InjectedQuery(_) => {}
        }
    }
}

/// What to do with one server message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    Forward,
    Swallow,
}

#[derive(Default)]
pub struct ExpectQueue {
    q: VecDeque<Expect>,
    /// Between the server's CopyInResponse and the client's CopyDone/CopyFail: the
    /// server ignores Syncs then, so none are expected for them.
    copy_in: bool,
    /// An error pgsilo raised itself: drop client messages up to the next Sync, as the
    /// server would have.
    pub skipping: bool,
    /// An injected query has been answered.
    pub finished: Option<Injected>,
}

impl ExpectQueue {
    pub fn push(&mut self, e: Expect) {
        self.q.push_back(e);
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// A client message is about to go to the server (or be answered by pgsilo).
    pub fn client_copy_end(&mut self) {
        self.copy_in = false;
    }

    pub fn in_copy(&self) -> bool {
        self.copy_in
    }

    /// Emits every owed synthesized response now at the head of the queue.
    pub fn flush_synth(&mut self, out: &mut Vec<u8>) {
        while self.q.front().is_some_and(|e| e.is_synth()) {
            if let Some(e) = self.q.pop_front() {
                write_synth(&e, out);
                if let Expect::SynthError(_) = e {
                    self.after_synth_error();
                }
            }
        }
    }

    /// Decides about one server message (its type byte) and applies its effects. Owed
    /// synthesized responses that come before it are appended to `out` first; the caller
    /// appends the message itself, then calls [`ExpectQueue::flush_synth`] for those
    /// that follow it.
    pub fn server_message(
        &mut self,
        tag: u8,
        client: &mut ClientStatements,
        server: &mut ServerMeta,
        out: &mut Vec<u8>,
    ) -> Disposition {
        self.flush_synth(out);
        if matches!(tag, b'N' | b'S' | b'A') {
            return Disposition::Forward;
        }
        // The n-th CommandComplete of a rewritten Query answers its n-th statement.
        if tag == b'C' {
            if let Some(Expect::DeallocQuery(plan)) = self.q.front_mut() {
                let at = plan.seen;
                plan.seen += 1;
                return if plan.swallow.contains(&at) {
                    Disposition::Swallow
                } else {
                    Disposition::Forward
                };
            }
        }
        let Some(head) = self.q.front() else {
            return Disposition::Forward;
        };
        if tag == b'G' {
            self.copy_in = true;
            // Syncs pipelined behind the COPY arrived during copy-in mode: ignored.
            let mut i = 1;
            while i < self.q.len() {
                if matches!(self.q[i], Expect::Forward(Kind::Sync)) {
                    self.q.remove(i);
                } else {
                    i += 1;
                }
            }
            return Disposition::Forward;
        }
        if tag == b'E' {
            if matches!(head, Expect::InjectedQuery(_)) {
                log::warn!("restoring a client's settings failed on server S-{}", server.id);
                return Disposition::Swallow;
            }
            return match head.kind() {
                // Inside a simple query an error ends that statement, not the query; at a
                // Sync it is a commit failure; both still end with ReadyForQuery.
                Kind::Query | Kind::FunctionCall | Kind::Sync => Disposition::Forward,
                _ => {
                    if let Some(failed) = self.q.pop_front() {
                        failed.undo(client, server, false);
                    }
                    self.skip_to_sync(client, server);
                    Disposition::Forward
                }
            };
        }
        if tag == b'Z' {
            // Pop up to and including the entry this ReadyForQuery ends; anything before
            // it was skipped by the server.
            let mut disposition = Disposition::Forward;
            while let Some(e) = self.q.pop_front() {
                if let Expect::InjectedQuery(why) = e {
                    self.finished = Some(why);
                    disposition = Disposition::Swallow;
                    break;
                }
                if let Expect::DeallocQuery(plan) = e {
                    plan.restore(client);
                    break;
                }
                if !matches!(e.kind(), Kind::Sync | Kind::Query | Kind::FunctionCall) {
                    e.undo(client, server, true);
                    continue;
                }
                break;
            }
            self.copy_in = false;
            return disposition;
        }
        let disposition = if head.swallowed() {
            Disposition::Swallow
        } else {
            Disposition::Forward
        };
        if head.completed_by(tag) {
            self.q.pop_front();
        }
        disposition
    }

    /// A message failed: the server skips to the next Sync, so the entries before that
    /// Sync will never be answered.
    fn skip_to_sync(&mut self, client: &mut ClientStatements, server: &mut ServerMeta) {
        while self.q.front().is_some_and(|e| !matches!(e.kind(), Kind::Sync)) {
            if let Some(e) = self.q.pop_front() {
                e.undo(client, server, true);
            }
        }
    }

    /// An error pgsilo raised: nothing was sent for the client's messages up to the next
    /// Sync (they are dropped before reaching the server), so there is nothing to undo
    /// on the server.
    fn after_synth_error(&mut self) {
        while self.q.front().is_some_and(|e| !matches!(e.kind(), Kind::Sync)) {
            self.q.pop_front();
        }
    }

    pub fn clear(&mut self) {
        self.q.clear();
        self.copy_in = false;
        self.skipping = false;
        self.finished = None;
    }

    /// Everything awaited is pgsilo's own queries (settings being put right): the
    /// server's state is known once they are answered, whoever is left to hear them.
    pub fn only_injected(&self) -> bool {
        !self.q.is_empty() && self.q.iter().all(|e| matches!(e, Expect::InjectedQuery(_)))
    }

    /// The statement of the Bind now awaiting its answer, when it is a pooled copy.
    pub fn bind_in_flight(&self) -> Option<StmtHash> {
        match self.q.front() {
            Some(Expect::NamedBind { hash }) => Some(*hash),
            _ => None,
        }
    }

    /// The rows now arriving answer pgsilo's settings snapshot.
    pub fn capturing(&self) -> bool {
        matches!(self.q.front(), Some(Expect::InjectedQuery(Injected::Snapshot)))
    }
}

fn write_synth(e: &Expect, out: &mut Vec<u8>) {
    match e {
        Expect::SynthClose { .. } => out.extend_from_slice(&[b'3', 0, 0, 0, 4]),
        Expect::SynthError(bytes) => out.extend_from_slice(bytes),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Box<[u8]> {
        s.as_bytes().into()
    }

    #[test]
    fn synthesized_close_complete_comes_before_the_bind_complete() {
        let mut q = ExpectQueue::default();
        let mut client = ClientStatements::default();
        let mut server = ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 1);
        q.push(Expect::SynthClose {
            client_name: name("s1"),
            def: None,
        });
        q.push(Expect::Forward(Kind::Bind));
        q.push(Expect::Forward(Kind::Execute));
        q.push(Expect::Forward(Kind::Sync));
        let mut out = Vec::new();
        q.flush_synth(&mut out);
        assert_eq!(out, vec![b'3', 0, 0, 0, 4]);
        assert_eq!(
            q.server_message(b'2', &mut client, &mut server, &mut out),
            Disposition::Forward
        );
        out.clear();
        for tag in [b'D', b'C', b'Z'] {
            assert_eq!(
                q.server_message(tag, &mut client, &mut server, &mut out),
                Disposition::Forward
            );
        }
        assert!(out.is_empty());
        assert!(q.is_empty());
    }

    #[test]
    fn injected_parse_is_swallowed_and_an_error_skips_to_sync() {
        let mut q = ExpectQueue::default();
        let mut client = ClientStatements::default();
        let mut server = ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 1);
        server.prepared.insert(7, 5, 10);
        server.prepared.insert(8, 5, 10);
        client.insert(b"s2", Rc::new(StmtDef::new(b"x\0\0\0")));
        q.push(Expect::InjectedParse { hash: 7 });
        q.push(Expect::Forward(Kind::Bind));
        q.push(Expect::Forward(Kind::Execute));
        q.push(Expect::NamedParse {
            hash: 8,
            client_name: name("s2"),
        });
        q.push(Expect::Forward(Kind::Sync));
        let mut out = Vec::new();
        assert_eq!(
            q.server_message(b'1', &mut client, &mut server, &mut out),
            Disposition::Swallow
        );
        // The Bind fails: Execute and the later Parse are skipped by the server.
        assert_eq!(
            q.server_message(b'E', &mut client, &mut server, &mut out),
            Disposition::Forward
        );
        assert!(server.prepared.fresh(7, 0));
        // The skipped Parse may or may not have replaced a copy: never used as it is.
        assert!(server.prepared.contains(8) && !server.prepared.fresh(8, 0));
        assert!(client.get(b"s2").is_none());
        assert_eq!(
            q.server_message(b'Z', &mut client, &mut server, &mut out),
            Disposition::Forward
        );
        assert!(q.is_empty());
    }

    #[test]
    fn synthesized_error_drops_what_follows_until_sync() {
        let mut q = ExpectQueue::default();
        let mut client = ClientStatements::default();
        let mut server = ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 1);
        q.push(Expect::SynthError(name("Exx")));
        q.push(Expect::Forward(Kind::Sync));
        let mut out = Vec::new();
        q.flush_synth(&mut out);
        assert_eq!(out, b"Exx");
        assert_eq!(q.len(), 1);
        assert_eq!(
            q.server_message(b'Z', &mut client, &mut server, &mut out),
            Disposition::Forward
        );
        assert!(q.is_empty());
    }

    #[test]
    fn copy_in_drops_pipelined_syncs() {
        let mut q = ExpectQueue::default();
        let mut client = ClientStatements::default();
        let mut server = ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 1);
        let mut out = Vec::new();
        for k in [Kind::Parse, Kind::Bind, Kind::Execute, Kind::Sync] {
            q.push(Expect::Forward(k));
        }
        for tag in [b'1', b'2'] {
            q.server_message(tag, &mut client, &mut server, &mut out);
        }
        q.server_message(b'G', &mut client, &mut server, &mut out);
        assert_eq!(q.len(), 1);
        assert!(q.in_copy());
        q.client_copy_end();
        q.push(Expect::Forward(Kind::Sync));
        for tag in [b'C', b'Z'] {
            q.server_message(tag, &mut client, &mut server, &mut out);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn a_rewritten_query_swallows_its_own_command_complete_and_restores_names_not_reached() {
        let mut q = ExpectQueue::default();
        let mut client = ClientStatements::default();
        let mut server = ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 1);
        let def = |t: &[u8]| Rc::new(StmtDef::new(t));
        // "select 1; PREPARE d AS SELECT; DEALLOCATE d; select 1/0; PREPARE …; DEALLOCATE …"
        q.push(Expect::DeallocQuery(Box::new(DeallocPlan {
            swallow: vec![1, 4],
            dropped: vec![(2, name("a"), def(b"a\0\0\0")), (5, name("b"), def(b"b\0\0\0"))],
            seen: 0,
        })));
        let mut out = Vec::new();
        let got: Vec<Disposition> = [b'T', b'D', b'C', b'C', b'C', b'E']
            .iter()
            .map(|&t| q.server_message(t, &mut client, &mut server, &mut out))
            .collect();
        use Disposition::*;
        assert_eq!(got, [Forward, Forward, Forward, Swallow, Forward, Forward]);
        assert_eq!(q.server_message(b'Z', &mut client, &mut server, &mut out), Forward);
        assert!(q.is_empty());
        // "a" was deallocated; the error came before "b"'s DEALLOCATE.
        assert!(client.get(b"a").is_none());
        assert!(client.get(b"b").is_some());
    }
}
