//! The responses a server owes, in order, so pgsilo can answer for messages it did not
//! forward (a Parse of a statement the server already has, a Close it keeps), swallow
//! answers to messages it added (a Parse on a server that lacks the statement), and keep
//! count when an error makes the server skip everything up to the next Sync.

use std::collections::VecDeque;
use std::rc::Rc;

use super::prepared::{ClientStatements, SqlDef, StmtDef};
use crate::pool::prepared::{Stamp, StmtHash};
use crate::pool::ServerMeta;
use crate::protocol::backend::message;
use crate::protocol::framing::read_cstr;

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
    /// A simple Query in which pgsilo rewrote the client's PREPARE, EXECUTE and
    /// DEALLOCATE statements (see `upstream::plan_query`).
    PlannedQuery(Box<QueryPlan>),
    /// CloseComplete owed for a Close pgsilo answered itself; the statement it closed,
    /// of either kind, comes back if the Close never ran.
    SynthClose {
        client_name: Box<[u8]>,
        def: Option<Rc<StmtDef>>,
        sql: Option<Rc<SqlDef>>,
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
    /// pgsilo's Bind of its own unnamed statement (a PREPARE of a client's SQL-level
    /// statement, see `upstream::ensure_sql_copy`); its BindComplete is swallowed.
    InjectedBind,
    /// pgsilo's Execute of that PREPARE, which makes a copy of `copy`, or pgsilo's probe
    /// statement for duplicate names (`probe`), or a throwaway statement; its
    /// CommandComplete is swallowed.
    InjectedExecute {
        copy: Option<StmtHash>,
        probe: bool,
    },
    /// pgsilo's Close of its throwaway statement; its CloseComplete is swallowed.
    ScratchClose,
    /// The client's Execute of a statement that is an SQL command naming a prepared
    /// statement (see `upstream::command_plan`): a plan of one step.
    PlannedExecute(Box<QueryPlan>),
}

/// What pgsilo changed in a simple Query that names prepared statements, statement by
/// statement of the text it sent: the client's names became pgsilo's, and statements of
/// pgsilo's own came in front of some (a PREPARE of a copy the server lacks). PostgreSQL
/// answers each statement in its place, with a CommandComplete or the error that ends the
/// query, so the n-th CommandComplete answers `steps[n]`: what the step did takes effect
/// then, and not at all when the query ends before it.
#[derive(Default)]
pub struct QueryPlan {
    pub steps: Vec<Step>,
    /// CommandCompletes seen so far: `steps[seen]` is running.
    pub seen: usize,
    /// Protocol-level names the client deallocated, taken from it when the query was
    /// sent (so requests pipelined behind it see them gone), each with the step of its
    /// DEALLOCATE: given back if that step never completed.
    pub dropped: Vec<(usize, Box<[u8]>, Rc<StmtDef>)>,
    /// Where the client's text is in the text sent, for error positions; None when the
    /// positions cannot be counted (non-ASCII text in an encoding other than UTF8).
    pub positions: Option<PositionMap>,
}

/// One statement of a planned query.
#[derive(Default)]
pub struct Step {
    /// pgsilo's own statement: its CommandComplete is not the client's.
    pub own: bool,
    pub effect: Effect,
    /// The statement names a prepared statement under another name than the client's:
    /// PostgreSQL's errors name it, and the client must read its own name there.
    pub rename: Option<Rename>,
    /// The copy this statement uses or makes: if PostgreSQL says it is missing or already
    /// there, pgsilo's account of the server was wrong, and the copy is not trusted again.
    pub copy: Option<StmtHash>,
}

/// A client's statement name, and the name pgsilo put in its place.
pub struct Rename {
    pub server: Box<[u8]>,
    pub client: Box<[u8]>,
}

impl Rename {
    pub fn new(server: &[u8], client: &[u8]) -> Rename {
        Rename {
            server: server.into(),
            client: client.into(),
        }
    }
}

/// What a step's CommandComplete means for pgsilo's accounts.
#[derive(Default)]
pub enum Effect {
    #[default]
    None,
    /// The client's PREPARE: its name stands for `def` from now on, and the server has a
    /// copy of it made at `made`.
    Define {
        name: Box<[u8]>,
        def: Rc<SqlDef>,
        made: Stamp,
    },
    /// pgsilo's PREPARE of a copy, ahead of an EXECUTE of it.
    Copy { hash: StmtHash, made: Stamp },
    /// pgsilo's DEALLOCATE of a copy, ahead of the client's PREPARE of it again.
    Uncopy { hash: StmtHash },
    /// The client's DEALLOCATE of a statement.
    Undefine { name: Box<[u8]> },
    /// pgsilo's probe statement for duplicate names now exists on the server.
    Probe,
}

impl QueryPlan {
    /// The running statement completed: its effect takes place. Returns whether its
    /// CommandComplete is pgsilo's own.
    fn completed(&mut self, client: &mut ClientStatements, server: &mut ServerMeta) -> bool {
        let at = self.seen;
        self.seen += 1;
        let Some(step) = self.steps.get_mut(at) else {
            return false;
        };
        match std::mem::take(&mut step.effect) {
            Effect::None => {}
            Effect::Define { name, def, made } => {
                made_copy(server, def.hash, made);
                client.sql_insert(&name, def);
            }
            Effect::Copy { hash, made } => made_copy(server, hash, made),
            Effect::Uncopy { hash } => server.prepared.remove(hash),
            Effect::Undefine { name } => {
                client.sql_remove(&name);
                client.remove(&name);
            }
            Effect::Probe => server.dup_probe = true,
        }
        step.own
    }

    /// The running statement failed with `code`.
    fn failed(&self, code: &[u8; 5], server: &mut ServerMeta) {
        let Some(step) = self.steps.get(self.seen) else {
            return;
        };
        match (code, step.copy) {
            // Missing, or there already: not what pgsilo thought. The server may hold a
            // statement of that name; it is closed before the next use.
            (b"26000" | b"42P05", Some(hash)) => server.prepared.spoil(hash),
            (b"42P05", None) if matches!(step.effect, Effect::Probe) => server.dup_probe = true,
            _ => {}
        }
    }

    /// The query is over: names whose DEALLOCATE did not complete are the client's again.
    fn restore(self, client: &mut ClientStatements) {
        for (at, name, def) in self.dropped {
            if at >= self.seen {
                client.insert(&name, def);
            }
        }
    }

    /// The ErrorResponse of the running statement as the client should see it: its
    /// position in the client's text, the client's statement name where PostgreSQL named
    /// pgsilo's. None when it needs no change.
    pub fn client_error(&self, body: &[u8]) -> Option<Vec<u8>> {
        let rename = self.steps.get(self.seen).and_then(|s| s.rename.as_ref());
        let mut fields = Vec::new();
        let mut at = 0;
        let mut changed = false;
        while let Some(&kind) = body.get(at) {
            if kind == 0 {
                break;
            }
            let (value, next) = read_cstr(body, at + 1)?;
            at = next;
            match kind {
                b'P' => {
                    let mapped = std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<usize>().ok())
                        .zip(self.positions.as_ref())
                        .map(|(p, map)| map.client_position(p));
                    match mapped {
                        // Within pgsilo's own text: the client has nothing to point at.
                        Some(None) => {
                            changed = true;
                            continue;
                        }
                        Some(Some(p)) if p.to_string().as_bytes() != value => {
                            changed = true;
                            fields.push((kind, p.to_string().into_bytes()));
                            continue;
                        }
                        _ => {}
                    }
                }
                b'M' | b'D' | b'H' => {
                    if let Some(rename) = rename {
                        if let Some(v) = replace_quoted(value, &rename.server, &rename.client) {
                            changed = true;
                            fields.push((kind, v));
                            continue;
                        }
                    }
                }
                _ => {}
            }
            fields.push((kind, value.to_vec()));
        }
        if !changed {
            return None;
        }
        let mut out = Vec::with_capacity(body.len() + 64);
        message(&mut out, b'E', |b| {
            for (kind, value) in &fields {
                b.push(*kind);
                b.extend_from_slice(value);
                b.push(0);
            }
            b.push(0);
        });
        Some(out)
    }
}

fn made_copy(server: &mut ServerMeta, hash: StmtHash, made: Stamp) {
    // Room was made when the query was sent.
    server.prepared.insert(hash, made, 0);
    // Shared only once the transaction it is made in is known not to have rolled back.
    server.prepared.made_provisionally(hash);
}

/// `text` with each `"from"` made `"to"`; None when it has none.
fn replace_quoted(text: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let mut quoted = Vec::with_capacity(from.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(from);
    quoted.push(b'"');
    let mut out = Vec::new();
    let mut copied = 0;
    let mut i = 0;
    while i + quoted.len() <= text.len() {
        if text[i..].starts_with(&quoted) {
            out.extend_from_slice(&text[copied..i]);
            out.push(b'"');
            out.extend_from_slice(to);
            out.push(b'"');
            i += quoted.len();
            copied = i;
        } else {
            i += 1;
        }
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&text[copied..]);
    Some(out)
}

/// Where each piece of the text sent came from, in characters (PostgreSQL's error
/// positions count characters, from 1).
#[derive(Default, Debug)]
pub struct PositionMap {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client's own text, from this character of it on.
    Client(usize),
    /// A name put in place of the client's, which is `len` characters from `at`.
    Renamed { at: usize, len: usize },
    /// pgsilo's own statements.
    Own,
}

#[derive(Debug)]
struct Piece {
    sent: usize,
    len: usize,
    origin: Origin,
}

impl PositionMap {
    pub fn push(&mut self, sent: usize, len: usize, origin: Origin) {
        if len > 0 {
            self.pieces.push(Piece { sent, len, origin });
        }
    }

    /// The client's position for PostgreSQL's (both from 1); None inside pgsilo's text,
    /// and for a position no text could have (the server's number is taken as sent).
    pub fn client_position(&self, sent: usize) -> Option<usize> {
        let p = sent.checked_sub(1)?;
        let i = self.pieces.partition_point(|x| x.sent <= p).checked_sub(1)?;
        let piece = &self.pieces[i];
        // Past the last piece is the end of the text ("at end of input").
        match piece.origin {
            Origin::Client(c) => (p - piece.sent).checked_add(c + 1),
            Origin::Renamed { at, .. } if p < piece.sent + piece.len => Some(at + 1),
            Origin::Renamed { at, len } => (p - piece.sent - piece.len).checked_add(at + len + 1),
            Origin::Own => None,
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
            Expect::InjectedQuery(_) | Expect::PlannedQuery(_) => Kind::Query,
            Expect::NamedBind { .. } | Expect::InjectedBind => Kind::Bind,
            Expect::InjectedExecute { .. } | Expect::PlannedExecute(_) => Kind::Execute,
            Expect::InjectedClose { .. } | Expect::SynthClose { .. } | Expect::ScratchClose => Kind::Close,
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
                | Expect::InjectedBind
                | Expect::InjectedExecute { .. }
                | Expect::ScratchClose
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
            Expect::InjectedParse { hash }
            | Expect::InjectedClose { hash }
            | Expect::InjectedExecute { copy: Some(hash), .. } => server.prepared.spoil(hash),
            Expect::InjectedExecute { copy: None, probe } => {
                if probe {
                    server.dup_probe = false;
                }
            }
            Expect::PlannedQuery(plan) => plan.restore(client),
            Expect::SynthClose { client_name, def, sql } => {
                if let Some(def) = def {
                    client.insert(&client_name, def);
                }
                if let Some(sql) = sql {
                    client.sql_insert(&client_name, sql);
                }
            }
            // A failed Parse of the unnamed statement has already dropped the old one; a
            // skipped one left it in place.
            Expect::UnnamedParse { prev } | Expect::InjectedUnnamed { prev } => {
                server.unnamed_stmt = if skipped { prev } else { None };
            }
            Expect::DeallocParse { prev, client_name, def } => {
                server.unnamed_stmt = if skipped { prev } else { None };
                client.insert(&client_name, def);
            }
            Expect::SynthError(_)
            | Expect::Forward(_)
            | Expect::NamedBind { .. }
            | Expect::ScratchParse
            | Expect::ScratchClose
            | Expect::PlannedExecute(_)
            | Expect::InjectedBind
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
    /// An extended-protocol message failed and the client has not sent its Sync yet: the
    /// server ignores everything up to that Sync, so nothing sent until then is answered.
    ignoring_till_sync: bool,
    /// The plan for the client's next Execute of this portal, bound to a statement that
    /// is an SQL command naming a prepared statement.
    portal_plan: Option<(Box<[u8]>, Box<QueryPlan>)>,
    /// The plan for the next Bind of the unnamed statement, which is such a command.
    unnamed_plan: Option<Box<QueryPlan>>,
}

impl ExpectQueue {
    pub fn push(&mut self, e: Expect) {
        if matches!(e, Expect::Forward(Kind::Sync)) {
            self.ignoring_till_sync = false;
        }
        self.q.push_back(e);
    }

    /// Answers to what was sent are still to come: a message that depends on them waits.
    /// Not while the server ignores everything up to the client's Sync: it would wait
    /// for ever, and the server ignores that message too.
    pub fn answers_pending(&self) -> bool {
        !self.q.is_empty() && !self.ignoring_till_sync
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
            match self.q.front_mut() {
                Some(Expect::PlannedQuery(plan)) => {
                    return if plan.completed(client, server) {
                        Disposition::Swallow
                    } else {
                        Disposition::Forward
                    };
                }
                Some(Expect::PlannedExecute(plan)) => {
                    plan.completed(client, server);
                }
                _ => {}
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
                    self.ignoring_till_sync = self.q.is_empty();
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
                if let Expect::PlannedQuery(plan) = e {
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
        self.portal_plan = None;
        self.unnamed_plan = None;
        self.ignoring_till_sync = false;
    }

    /// A Bind of `portal`: `plan` is for its Execute (None: a statement that needs none).
    pub fn portal_bound(&mut self, portal: &[u8], plan: Option<Box<QueryPlan>>) {
        match plan {
            Some(plan) => self.portal_plan = Some((portal.into(), plan)),
            None if self.portal_plan.as_ref().is_some_and(|(p, _)| **p == *portal) => self.portal_plan = None,
            None => {}
        }
    }

    /// An Execute of `portal`: its plan, if its Bind left one.
    pub fn portal_executed(&mut self, portal: &[u8]) -> Option<Box<QueryPlan>> {
        if self.portal_plan.as_ref().is_some_and(|(p, _)| **p == *portal) {
            return self.portal_plan.take().map(|(_, plan)| plan);
        }
        None
    }

    /// The unnamed statement is now such a command (`plan`), or not (None).
    pub fn unnamed_parsed(&mut self, plan: Option<Box<QueryPlan>>) {
        self.unnamed_plan = plan;
    }

    /// A Bind of the unnamed statement: the plan its Parse left, once.
    pub fn unnamed_bound(&mut self) -> Option<Box<QueryPlan>> {
        self.unnamed_plan.take()
    }

    /// Everything awaited is pgsilo's own queries (settings being put right): the
    /// server's state is known once they are answered, whoever is left to hear them.
    pub fn only_injected(&self) -> bool {
        !self.q.is_empty() && self.q.iter().all(|e| matches!(e, Expect::InjectedQuery(_)))
    }

    /// An ErrorResponse (`body`, with SQLSTATE `code`) is in: if it ends a statement of a
    /// query pgsilo rewrote, the error as the client should see it (see
    /// [`QueryPlan::client_error`]), when that differs. Call before
    /// [`ExpectQueue::server_message`].
    pub fn planned_error(&mut self, code: Option<[u8; 5]>, body: &[u8], server: &mut ServerMeta) -> Option<Vec<u8>> {
        let (Some(Expect::PlannedQuery(plan)) | Some(Expect::PlannedExecute(plan))) = self.q.front() else {
            return None;
        };
        if let Some(code) = code {
            plan.failed(&code, server);
        }
        plan.client_error(body)
    }

    /// An ErrorResponse now would end a query pgsilo rewrote: it is read whole, to be
    /// told in the client's terms.
    pub fn errors_rewritten(&self) -> bool {
        matches!(
            self.q.front(),
            Some(Expect::PlannedQuery(_) | Expect::PlannedExecute(_))
        )
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
            sql: None,
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
    fn error_positions_count_in_the_clients_text() {
        let mut map = PositionMap::default();
        // Client "ab" (2), pgsilo's own 5, client "EXECUTE " (8), the client's 3-character
        // name sent as 11, client "(1)" (3).
        map.push(0, 2, Origin::Client(0));
        map.push(2, 5, Origin::Own);
        map.push(7, 8, Origin::Client(2));
        map.push(15, 11, Origin::Renamed { at: 10, len: 3 });
        map.push(26, 3, Origin::Client(13));
        assert_eq!(map.client_position(1), Some(1));
        assert_eq!(map.client_position(2), Some(2));
        assert_eq!(map.client_position(3), None, "pgsilo's own text");
        assert_eq!(map.client_position(8), Some(3));
        assert_eq!(map.client_position(16), Some(11), "the name's start");
        assert_eq!(map.client_position(26), Some(11));
        assert_eq!(map.client_position(27), Some(14));
        assert_eq!(map.client_position(30), Some(17), "at end of input");
        assert_eq!(map.client_position(0), None);
        // A name that ends the text.
        let mut map = PositionMap::default();
        map.push(0, 8, Origin::Client(0));
        map.push(8, 11, Origin::Renamed { at: 8, len: 1 });
        assert_eq!(map.client_position(20), Some(10));
    }

    /// A server's position near usize::MAX, after a client name longer than pgsilo's,
    /// overflowed the mapping (a panic with overflow checks, a wrong number without).
    #[test]
    fn error_positions_no_text_could_have_are_dropped() {
        let mut map = PositionMap::default();
        map.push(0, 8, Origin::Client(0));
        map.push(8, 10, Origin::Renamed { at: 8, len: 60 });
        map.push(18, 7, Origin::Client(68));
        assert_eq!(map.client_position(usize::MAX), None);
        assert_eq!(map.client_position(25), Some(75));
        let mut map = PositionMap::default();
        map.push(0, 8, Origin::Client(0));
        map.push(8, 10, Origin::Renamed { at: 8, len: 60 });
        assert_eq!(map.client_position(usize::MAX), None);
        assert_eq!(map.client_position(19), Some(69), "at end of input");
    }

    #[test]
    fn an_error_of_a_planned_statement_is_told_in_the_clients_names() {
        let mut map = PositionMap::default();
        map.push(0, 8, Origin::Client(0));
        map.push(8, 10, Origin::Renamed { at: 8, len: 1 });
        map.push(18, 7, Origin::Client(9));
        let plan = QueryPlan {
            steps: vec![Step {
                rename: Some(Rename::new(b"pgsilo_s12", b"p")),
                ..Step::default()
            }],
            positions: Some(map),
            ..QueryPlan::default()
        };
        let body = b"SERROR\0C42601\0Mwrong number of parameters for prepared statement \"pgsilo_s12\"\0P21\0\0";
        let out = plan.client_error(body).expect("changed");
        let e = crate::protocol::ErrorFields::parse(&out[5..]);
        assert_eq!(e.message, "wrong number of parameters for prepared statement \"p\"");
        assert!(out.windows(5).any(|w| w == b"P12\0\0"));
        assert_eq!(
            u32::from_be_bytes(out[1..5].try_into().unwrap()) as usize,
            out.len() - 1
        );
        // Nothing to change: none.
        assert!(plan.client_error(b"SERROR\0C22012\0Mdivision by zero\0\0").is_none());
    }

    #[test]
    fn a_planned_query_applies_what_each_statement_did_when_it_completes() {
        let mut q = ExpectQueue::default();
        let mut client = ClientStatements::default();
        let mut server = ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 1);
        let def = Rc::new(SqlDef::new(b"AS SELECT 1"));
        let made = crate::pool::prepared::stamp();
        q.push(Expect::PlannedQuery(Box::new(QueryPlan {
            steps: vec![
                Step {
                    own: true,
                    effect: Effect::Probe,
                    ..Step::default()
                },
                Step {
                    effect: Effect::Define {
                        name: name("a"),
                        def: def.clone(),
                        made,
                    },
                    ..Step::default()
                },
                Step {
                    effect: Effect::Undefine { name: name("a") },
                    ..Step::default()
                },
            ],
            ..QueryPlan::default()
        })));
        let mut out = Vec::new();
        use Disposition::*;
        assert_eq!(q.server_message(b'C', &mut client, &mut server, &mut out), Swallow);
        assert!(server.dup_probe);
        assert_eq!(q.server_message(b'C', &mut client, &mut server, &mut out), Forward);
        assert!(client.sql_get(b"a").is_some());
        assert!(server.prepared.fresh(def.hash, def.born));
        // The DEALLOCATE fails: the name stays.
        assert_eq!(q.server_message(b'E', &mut client, &mut server, &mut out), Forward);
        assert_eq!(q.server_message(b'Z', &mut client, &mut server, &mut out), Forward);
        assert!(client.sql_get(b"a").is_some());
        assert!(q.is_empty());
    }

    #[test]
    fn a_rewritten_query_swallows_its_own_command_complete_and_restores_names_not_reached() {
        let mut q = ExpectQueue::default();
        let mut client = ClientStatements::default();
        let mut server = ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 1);
        let def = |t: &[u8]| Rc::new(StmtDef::new(t));
        // "select 1; PREPARE d AS SELECT; DEALLOCATE d; select 1/0; PREPARE …; DEALLOCATE …"
        let steps = (0..6)
            .map(|i| Step {
                own: i == 1 || i == 4,
                ..Step::default()
            })
            .collect();
        q.push(Expect::PlannedQuery(Box::new(QueryPlan {
            steps,
            dropped: vec![(2, name("a"), def(b"a\0\0\0")), (5, name("b"), def(b"b\0\0\0"))],
            ..QueryPlan::default()
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
