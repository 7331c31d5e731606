//! Client-to-server bytes: find message boundaries, keep the transaction tracker and the
//! expected-response queue current, and rewrite named prepared statements. Messages
//! that need no change go out as the bytes that came in; only when something must change
//! does the chunk get copied into an output buffer.

use std::rc::Rc;

use std::collections::HashMap;
use std::ops::Range;

use super::expect::{Effect, Expect, ExpectQueue, Kind, Origin, PositionMap, QueryPlan, Rename, Step};
use super::prepared::{
    bind_statement, renamed, split_parse, target, write_bind_prefix, write_close_statement, write_describe_statement,
    write_parse, write_unnamed_parse, ClientStatements, CommandKind, NamedCommand, SqlDef, StmtDef, UnnamedStmt,
};
use super::retry::StaleRetry;
use super::sql_scan::{
    classify, listen_only, may_be_listen_only, mentions_prepared_statements, parse_deallocate, split_statements,
    Classified, Deallocate, SqlCommand,
};
use super::tx_tracker::TxTracker;
use crate::pool::prepared::{invalidation, stamp, Stamp, StmtHash};
use crate::pool::ServerMeta;
use crate::protocol::backend::{error_response, message, Severity};
use crate::protocol::framing::{read_cstr, Header, HEADER_LEN};
use crate::protocol::{ProtocolError, SqlState};

/// PostgreSQL refuses larger messages from clients (PQ_LARGE_MESSAGE_LIMIT).
pub const CLIENT_MESSAGE_LIMIT: u32 = 1 << 30;

/// Simple Queries up to this size are read whole under statement tracking, to find the
/// client's DEALLOCATEs in them; larger ones stream through as they come.
pub const QUERY_SCAN_LIMIT: usize = 64 * 1024;

/// Streaming state of the client-to-server direction.
#[derive(Default, Debug)]
pub struct UpCursor {
    /// Body bytes of a message already announced that are still to pass.
    pub skip: usize,
    /// Those bytes are dropped, not forwarded (a message skipped after an error).
    pub dropping: bool,
}

/// What a quick look at buffered client bytes (before any server is attached) says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Peek {
    /// Some complete message needs a server (anything but stray COPY data or Flush).
    pub needs_server: bool,
    /// Terminate comes before anything that needs a server.
    pub terminate: bool,
    /// Bytes of whole messages, all of which can be dropped when no server is needed.
    pub whole: usize,
}

/// Looks at client bytes without changing any state.
pub fn peek(data: &[u8]) -> Result<Peek, ProtocolError> {
    let mut p = Peek::default();
    let mut at = 0;
    while let Some(h) = Header::peek(&data[at..]) {
        h.validate(CLIENT_MESSAGE_LIMIT)?;
        if h.tag == b'X' {
            p.terminate = !p.needs_server;
            break;
        }
        if !matches!(h.tag, b'd' | b'c' | b'f' | b'H') {
            p.needs_server = true;
            break;
        }
        if data.len() - at < h.total() {
            break;
        }
        at += h.total();
        p.whole = at;
    }
    Ok(p)
}

/// Everything the up direction changes while processing.
pub struct UpState<'a> {
    pub cur: &'a mut UpCursor,
    pub tracker: &'a mut TxTracker,
    pub queue: &'a mut ExpectQueue,
    /// None when statement names pass through unchanged (session mode, or disabled).
    pub statements: Option<&'a mut ClientStatements>,
    pub unnamed: &'a mut UnnamedStmt,
    pub server: &'a mut ServerMeta,
    pub max_prepared: usize,
    pub retry: &'a mut StaleRetry,
    /// Transaction pooling with no LISTEN on the server: pgsilo answers LISTEN/UNLISTEN
    /// queries itself (`session/listen.rs`).
    pub listen_here: bool,
}

/// The outcome of processing a chunk.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UpResult {
    /// Bytes at the front of the input that were dealt with.
    pub consumed: usize,
    /// The output is the first `consumed` input bytes as they are; otherwise it is what
    /// was appended to the output buffer (possibly nothing).
    pub zero_copy: bool,
    /// The client sent Terminate right after the consumed bytes.
    pub terminate: bool,
    /// Bytes the buffer must hold to make progress on a message that must be read whole.
    pub want: usize,
    /// Stopped at a named Parse until everything before it has been answered.
    pub blocked: bool,
}

struct Emit<'a> {
    data: &'a [u8],
    out: &'a mut Vec<u8>,
    copying: bool,
}

impl Emit<'_> {
    /// From here on, output is built in `out`: everything forwarded so far goes first.
    fn start_copying(&mut self, upto: usize) {
        if !self.copying {
            self.out.extend_from_slice(&self.data[..upto]);
            self.copying = true;
        }
    }

    fn forward(&mut self, from: usize, to: usize) {
        if self.copying {
            self.out.extend_from_slice(&self.data[from..to]);
        }
    }
}

/// Processes client bytes for the attached server. `out` must be empty on entry.
pub fn process(data: &[u8], st: &mut UpState, out: &mut Vec<u8>) -> Result<UpResult, ProtocolError> {
    let mut e = Emit {
        data,
        out,
        copying: false,
    };
    let mut res = UpResult::default();
    let mut at = 0;
    loop {
        if st.cur.skip > 0 {
            let n = st.cur.skip.min(data.len() - at);
            if st.cur.dropping {
                e.start_copying(at);
            } else {
                e.forward(at, at + n);
            }
            at += n;
            st.cur.skip -= n;
            if st.cur.skip > 0 {
                break;
            }
            continue;
        }
        let Some(h) = Header::peek(&data[at..]) else {
            res.want = HEADER_LEN;
            break;
        };
        h.validate(CLIENT_MESSAGE_LIMIT)?;
        if h.tag == b'X' {
            res.terminate = true;
            break;
        }
        let have = data.len() - at;
        let whole = have >= h.total();
        let end = at + h.total().min(have);
        let idle_before = st.tracker.is_idle();
        let mut bound: Option<StmtHash> = None;

        if st.queue.skipping {
            st.retry.stop();
            if h.tag == b'S' {
                st.queue.skipping = false;
            } else {
                // Dropped like the server drops messages after an error, up to Sync.
                e.start_copying(at);
                if !whole {
                    st.cur.skip = h.total() - have;
                    st.cur.dropping = true;
                }
                at = end;
                continue;
            }
        }

        let ps = st.statements.is_some();
        match h.tag {
            b'P' | b'D' | b'C' if ps && !whole => {
                res.want = h.total();
                break;
            }
            b'P' if ps => {
                let body = &data[at + HEADER_LEN..end];
                let (name, def_body) = split_parse(body).ok_or(ProtocolError::Malformed("Parse"))?;
                let scanned = name.is_empty() && mentions_prepared_statements(def_body);
                let command = scanned.then(|| NamedCommand::of(def_body)).flatten();
                if command.as_ref().is_some_and(|c| waits_for_answers(c, st)) {
                    wait_for_answers(&mut e, at, &mut res);
                    break;
                }
                if scanned {
                    st.tracker.client_message(h.tag);
                    e.start_copying(at);
                    if rewrite_dealloc_parse(def_body, st, e.out) {
                        st.queue.unnamed_parsed(None);
                    } else if let Some(cmd) = command {
                        parse_unnamed_command(cmd, def_body, st, e.out);
                    } else {
                        st.queue.unnamed_parsed(None);
                        let prev = st.server.unnamed_stmt;
                        st.server.unnamed_stmt = Some(st.unnamed.set(def_body));
                        st.queue.push(Expect::UnnamedParse { prev });
                        e.out.extend_from_slice(&data[at..end]);
                    }
                } else if name.is_empty() {
                    st.tracker.client_message(h.tag);
                    st.queue.unnamed_parsed(None);
                    let prev = st.server.unnamed_stmt;
                    st.server.unnamed_stmt = Some(st.unnamed.set(def_body));
                    st.queue.push(Expect::UnnamedParse { prev });
                    e.forward(at, end);
                } else if st.queue.answers_pending() {
                    // Whether the name exists, and whether the server has the statement,
                    // depends on answers still in flight (a failing Parse, DEALLOCATE ALL,
                    // a failed transaction): decide once they are in.
                    wait_for_answers(&mut e, at, &mut res);
                    break;
                } else {
                    e.start_copying(at);
                    st.tracker.client_message(h.tag);
                    parse_named(name, def_body, st, e.out);
                }
            }
            b'B' if ps => {
                let prefix = &data[at + HEADER_LEN..end];
                let Some((name_at, name, name_end)) = bind_statement(prefix) else {
                    if whole {
                        return Err(ProtocolError::Malformed("Bind"));
                    }
                    res.want = (have + 256).min(h.total());
                    break;
                };
                let portal = &prefix[..name_at - 1];
                let def = (!name.is_empty())
                    .then(|| st.statements.as_ref().and_then(|s| s.get(name).cloned()))
                    .flatten();
                if def
                    .as_ref()
                    .and_then(|d| d.command.as_ref())
                    .is_some_and(|c| waits_for_answers(c, st))
                {
                    wait_for_answers(&mut e, at, &mut res);
                    break;
                }
                st.tracker.client_message(h.tag);
                let mut refused = false;
                match def {
                    Some(def) => {
                        e.start_copying(at);
                        let (def, plan) = resolve_command(def, st, e.out);
                        st.queue.portal_bound(portal, plan);
                        // Does the client ask for the result's description in this same
                        // request (Bind, Describe, Execute, as libpq and psycopg do)?
                        let redescribes = whole && Header::peek(&data[end..]).is_some_and(|n| n.tag == b'D');
                        if ensure_prepared(&def, st, e.out, redescribes) {
                            write_bind_prefix(e.out, h.len, prefix, name_at, name_end, &def.server_name);
                            e.out.extend_from_slice(&prefix[name_end..]);
                            st.queue.push(Expect::NamedBind { hash: def.hash });
                            bound = Some(def.hash);
                        } else {
                            refused = true;
                        }
                    }
                    // A statement the client prepared with SQL, bound by name: its copy.
                    None if sql_statement(name, st).is_some() => {
                        e.start_copying(at);
                        if let Some(sql) = sql_statement(name, st) {
                            ensure_sql_copy(&sql, st, e.out);
                            write_bind_prefix(e.out, h.len, prefix, name_at, name_end, &sql.server_name);
                        }
                        e.out.extend_from_slice(&prefix[name_end..]);
                        st.queue.push(Expect::Forward(Kind::Bind));
                        st.queue.portal_bound(portal, None);
                    }
                    None => {
                        let plan = if name.is_empty() {
                            ensure_unnamed(st, &mut e, at);
                            st.queue.unnamed_bound()
                        } else {
                            None
                        };
                        st.queue.portal_bound(portal, plan);
                        e.forward(at, end);
                        st.queue.push(Expect::Forward(Kind::Bind));
                    }
                }
                if !whole {
                    st.cur.skip = h.total() - have;
                    st.cur.dropping = refused;
                }
            }
            b'D' if ps => {
                let (kind, name) = target(&data[at + HEADER_LEN..end]).ok_or(ProtocolError::Malformed("Describe"))?;
                st.tracker.client_message(h.tag);
                let def = (kind == b'S' && !name.is_empty())
                    .then(|| st.statements.as_ref().and_then(|s| s.get(name).cloned()))
                    .flatten();
                match def {
                    Some(def) => {
                        e.start_copying(at);
                        // The result's description depends on what an EXECUTE runs.
                        let def = match &def.command {
                            Some(cmd) if cmd.kind == CommandKind::Execute => resolve_command(def, st, e.out).0,
                            _ => def,
                        };
                        ensure_prepared(&def, st, e.out, true);
                        write_describe_statement(e.out, &def.server_name);
                    }
                    None if kind == b'S' && sql_statement(name, st).is_some() => {
                        e.start_copying(at);
                        if let Some(sql) = sql_statement(name, st) {
                            ensure_sql_copy(&sql, st, e.out);
                            write_describe_statement(e.out, &sql.server_name);
                        }
                    }
                    None if kind == b'S' && name.is_empty() && ensure_unnamed(st, &mut e, at) => {
                        e.forward(at, end);
                    }
                    None => e.forward(at, end),
                }
                st.queue.push(Expect::Forward(if kind == b'S' {
                    Kind::DescribeStatement
                } else {
                    Kind::DescribePortal
                }));
            }
            b'C' if ps => {
                let (kind, name) = target(&data[at + HEADER_LEN..end]).ok_or(ProtocolError::Malformed("Close"))?;
                st.tracker.client_message(h.tag);
                if kind == b'S' && !name.is_empty() {
                    // The server keeps the statement for others; the client's name goes.
                    e.start_copying(at);
                    let (def, sql) = match st.statements.as_deref_mut() {
                        Some(s) => {
                            let d = s.get(name).cloned();
                            s.remove(name);
                            (d, s.sql_remove(name))
                        }
                        None => (None, None),
                    };
                    st.queue.push(Expect::SynthClose {
                        client_name: name.into(),
                        def,
                        sql,
                    });
                } else {
                    e.forward(at, end);
                    st.queue.push(Expect::Forward(Kind::Close));
                }
            }
            b'Q' if (ps || st.listen_here) && !whole && h.total() <= QUERY_SCAN_LIMIT => {
                res.want = h.total();
                break;
            }
            b'Q' if st.listen_here
                && whole
                && st.tracker.status() == b'I'
                && is_listen_query(&data[at + HEADER_LEN..end]) =>
            {
                // The session answers it once everything sent before it is answered, if
                // that leaves the client outside a transaction block; inside one it goes
                // on to the server (and the client keeps that server).
                wait_for_answers(&mut e, at, &mut res);
                break;
            }
            b'Q' if ps && whole && mentions_prepared_statements(&data[at + HEADER_LEN..end]) => {
                let body = &data[at + HEADER_LEN..end];
                let text = body.strip_suffix(&[0]).unwrap_or(body);
                match sql_commands(text, st) {
                    Some(_) if st.queue.answers_pending() => {
                        // What the names stand for, and which copies the server has,
                        // depends on answers still in flight: plan once they are in.
                        wait_for_answers(&mut e, at, &mut res);
                        break;
                    }
                    Some(commands) => {
                        st.tracker.client_message(h.tag);
                        simple_query_sent(st);
                        e.start_copying(at);
                        let (sql, plan) = plan_query(text, commands, st, e.out);
                        message(e.out, b'Q', |b| {
                            b.extend_from_slice(&sql);
                            b.push(0);
                        });
                        st.queue.push(Expect::PlannedQuery(plan));
                    }
                    None => {
                        st.tracker.client_message(h.tag);
                        simple_query_sent(st);
                        e.forward(at, end);
                        st.queue.push(Expect::Forward(Kind::Query));
                    }
                }
            }
            tag => {
                st.tracker.client_message(tag);
                match tag {
                    b'P' => st.queue.push(Expect::Forward(Kind::Parse)),
                    b'B' => st.queue.push(Expect::Forward(Kind::Bind)),
                    b'D' => st
                        .queue
                        .push(Expect::Forward(describe_kind(&data[at + HEADER_LEN..end]))),
                    b'C' => st.queue.push(Expect::Forward(Kind::Close)),
                    b'E' => {
                        let plan = match read_cstr(&data[at + HEADER_LEN..end], 0) {
                            Some((portal, _)) if ps && whole => st.queue.portal_executed(portal),
                            _ => None,
                        };
                        st.queue.push(match plan {
                            Some(plan) => Expect::PlannedExecute(plan),
                            None => Expect::Forward(Kind::Execute),
                        });
                    }
                    b'S' if !st.queue.in_copy() => st.queue.push(Expect::Forward(Kind::Sync)),
                    b'Q' => {
                        simple_query_sent(st);
                        st.queue.push(Expect::Forward(Kind::Query));
                    }
                    b'F' => st.queue.push(Expect::Forward(Kind::FunctionCall)),
                    b'c' | b'f' => st.queue.client_copy_end(),
                    _ => {}
                }
                e.forward(at, end);
                if !whole {
                    st.cur.skip = h.total() - have;
                    st.cur.dropping = false;
                }
            }
        }
        st.retry
            .observe(h.tag, whole.then(|| &data[at..end]), bound, idle_before);
        at = end;
        if !whole {
            break;
        }
    }
    res.consumed = at;
    res.zero_copy = !e.copying;
    Ok(res)
}

/// Stops before the message at `at` until everything sent before it is answered. The
/// Flush makes the server send what it holds back for a Sync that may not come yet.
fn wait_for_answers(e: &mut Emit, at: usize, res: &mut UpResult) {
    e.start_copying(at);
    e.out.extend_from_slice(&[b'H', 0, 0, 0, 4]);
    res.blocked = true;
}

/// A simple Query's body made only of LISTEN/UNLISTEN statements.
pub fn is_listen_query(body: &[u8]) -> bool {
    let text = body.strip_suffix(&[0]).unwrap_or(body);
    may_be_listen_only(text) && listen_only(text).is_some()
}

/// A simple query destroys the unnamed statement, the client's and the server's.
fn simple_query_sent(st: &mut UpState) {
    st.unnamed.invalidate();
    st.server.unnamed_stmt = None;
    st.queue.unnamed_parsed(None);
}

fn describe_kind(body: &[u8]) -> Kind {
    if body.first() == Some(&b'S') {
        Kind::DescribeStatement
    } else {
        Kind::DescribePortal
    }
}

/// A named Parse: answered by pgsilo when the server already has the statement,
/// otherwise sent under pgsilo's name.
fn parse_named(name: &[u8], def_body: &[u8], st: &mut UpState, out: &mut Vec<u8>) {
    // PostgreSQL refuses any Parse in a failed transaction, before looking at the name;
    // answering it from the server's cache would give the client a statement PostgreSQL
    // would not have. The status is only current when nothing is in flight (a pipelined
    // ROLLBACK may come before this Parse).
    if st.tracker.status() == b'E' && st.tracker.outstanding() == 0 {
        raise(
            st,
            SqlState(*b"25P02"),
            "current transaction is aborted, commands ignored until end of transaction block",
        );
        return;
    }
    let Some(stmts) = st.statements.as_deref_mut() else {
        return;
    };
    if stmts.get(name).is_some() {
        let text = format!(
            "prepared statement \"{}\" already exists",
            String::from_utf8_lossy(name)
        );
        raise(st, SqlState::DUPLICATE_PREPARED_STATEMENT, &text);
        return;
    }
    let def = Rc::new(StmtDef::new(def_body));
    stmts.insert(name, def.clone());
    // Always a fresh copy: one the server already has was made before this Parse, maybe
    // before a schema change the client's statement must see.
    prepare_copy(&def, st, out);
    st.queue.push(Expect::NamedParse {
        hash: def.hash,
        client_name: name.into(),
    });
}

/// An error pgsilo answers for the server, as PostgreSQL would: the message fails and
/// everything up to the next Sync is skipped.
fn raise(st: &mut UpState, code: SqlState, text: &str) {
    let mut msg = Vec::with_capacity(96 + text.len());
    error_response(&mut msg, Severity::Error, code, text);
    st.queue.push(Expect::SynthError(msg.into()));
    st.queue.skipping = true;
}

/// Before a Bind or Describe of the unnamed statement: if the server's unnamed statement
/// is not this client's, prepare the client's there first. Returns whether it did (the
/// output is then being copied).
fn ensure_unnamed(st: &mut UpState, e: &mut Emit, at: usize) -> bool {
    let Some((hash, _)) = st.unnamed.current() else {
        return false;
    };
    let needs = st.unnamed.needs().cloned();
    let copy_missing = needs
        .as_ref()
        .is_some_and(|sql| !st.server.prepared.fresh(sql.hash, sql.born));
    if st.server.unnamed_stmt == Some(hash) && !copy_missing {
        return false;
    }
    e.start_copying(at);
    if let Some(sql) = needs.filter(|_| copy_missing) {
        ensure_sql_copy(&sql, st, e.out);
    }
    let Some((_, body)) = st.unnamed.current() else {
        return true;
    };
    write_unnamed_parse(e.out, body);
    let prev = st.server.unnamed_stmt;
    st.server.unnamed_stmt = Some(hash);
    st.queue.push(Expect::InjectedUnnamed { prev });
    true
}

/// Makes sure the server has a copy of `def` fit for this client before a message that
/// uses it: one made after the client prepared it, and after PostgreSQL last rejected
/// a copy of it as stale anywhere. `redescribes`: the client asks for the statement's
/// description again in this request.
///
/// A client whose statement is older than such a rejection is as stale as PostgreSQL
/// said: a direct connection would keep failing until the client prepares it again.
/// Unless it asks for the description again, it gets PostgreSQL's error here (false is
/// returned; the message is refused): a copy of the new shape would reach a client that
/// has the old RowDescription cached (asyncpg, pgjdbc, tokio-postgres and Npgsql keep
/// it), and rows it cannot read, or misreads, are worse than the error.
fn ensure_prepared(def: &StmtDef, st: &mut UpState, out: &mut Vec<u8>, redescribes: bool) -> bool {
    let born = def.born.get();
    let invalidated = invalidation(def.hash);
    let not_before = born.max(invalidated.as_ref().map_or(0, |i| i.at));
    if st.server.prepared.fresh(def.hash, not_before) {
        return true;
    }
    if let Some(inv) = invalidated.filter(|i| i.at > born) {
        if !redescribes {
            raise(st, inv.code, &inv.message);
            return false;
        }
        // The client learns the new shape with this request.
        def.born.set(stamp());
    }
    prepare_copy(def, st, out);
    st.queue.push(Expect::InjectedParse { hash: def.hash });
    true
}

/// Writes the Parse of a new copy of `def` under pgsilo's name, closing first whatever
/// the server may hold under that name, and making room in the server's cache.
fn prepare_copy(def: &StmtDef, st: &mut UpState, out: &mut Vec<u8>) {
    if st.server.prepared.contains(def.hash) {
        write_close_statement(out, def.hash);
        st.queue.push(Expect::InjectedClose { hash: def.hash });
    }
    if let Some(evicted) = st.server.prepared.insert(def.hash, stamp(), st.max_prepared) {
        write_close_statement(out, evicted);
        st.queue.push(Expect::InjectedClose { hash: evicted });
    }
    write_parse(out, def);
    // Shared only once the transaction it is made in is known not to have rolled back.
    st.server.prepared.made_provisionally(def.hash);
}

/// The client's SQL-level statement of this name, if any.
fn sql_statement(name: &[u8], st: &UpState) -> Option<Rc<SqlDef>> {
    st.statements.as_deref()?.sql_get(name).cloned()
}

/// Whether an SQL command through the extended protocol must wait until everything sent
/// before it is answered: what its name stands for, and which copies the server has,
/// depend on those answers (a PREPARE pipelined before an EXECUTE, a DEALLOCATE ALL). A
/// DEALLOCATE of a protocol-level statement is the exception, rewritten as it is sent
/// (see [`rewrite_dealloc_parse`]).
fn waits_for_answers(cmd: &NamedCommand, st: &UpState) -> bool {
    if !st.queue.answers_pending() {
        return false;
    }
    let protocol_level = st.statements.as_deref().is_some_and(|s| s.get(&cmd.name).is_some());
    !(cmd.kind == CommandKind::Deallocate && protocol_level)
}

/// A protocol-level statement that is an SQL command naming a prepared statement (see
/// [`NamedCommand`]), about to be bound: the statement to bind instead, naming what the
/// client's name stands for now, and the plan for its Execute. pgsilo's statements it
/// needs first go to `out`. Any other statement is bound as it is.
fn resolve_command(def: Rc<StmtDef>, st: &mut UpState, out: &mut Vec<u8>) -> (Rc<StmtDef>, Option<Box<QueryPlan>>) {
    let Some(cmd) = &def.command else {
        return (def, None);
    };
    let text = read_cstr(&def.body, 0).map_or(&[][..], |(text, _)| text);
    let (name, plan) = command_plan(cmd.kind, &cmd.name, cmd.at.clone(), text, st, out);
    match def.naming(&name) {
        Some(derived) => (derived, Some(plan)),
        None => (def, None),
    }
}

/// An unnamed Parse of an SQL command naming a prepared statement (`cmd`, in `def_body`):
/// sent with pgsilo's name in place of the client's, after pgsilo's statements it needs;
/// the plan waits for the statement's Bind.
fn parse_unnamed_command(cmd: NamedCommand, def_body: &[u8], st: &mut UpState, out: &mut Vec<u8>) {
    let text = read_cstr(def_body, 0).map_or(&[][..], |(text, _)| text);
    let (name, plan) = command_plan(cmd.kind, &cmd.name, cmd.at.clone(), text, st, out);
    let body = renamed(def_body, &cmd.at, &name);
    write_unnamed_parse(out, &body);
    let prev = st.server.unnamed_stmt;
    let executes = sql_statement(&cmd.name, st).filter(|_| cmd.kind == CommandKind::Execute);
    let id = match executes {
        Some(sql) => st.unnamed.set_executing(&body, sql),
        None => st.unnamed.set(&body),
    };
    st.server.unnamed_stmt = Some(id);
    st.queue.push(Expect::UnnamedParse { prev });
    st.queue.unnamed_parsed(Some(plan));
}

/// What an SQL command naming the client's statement `name` (at `at` in `text`) becomes
/// through the extended protocol, as [`plan_query`] does it in a simple Query: the name
/// to put in place of the client's, and the plan for its Execute. pgsilo's statements it
/// needs first go to `out`.
fn command_plan(
    kind: CommandKind,
    name: &[u8],
    at: Range<usize>,
    text: &[u8],
    st: &mut UpState,
    out: &mut Vec<u8>,
) -> (Vec<u8>, Box<QueryPlan>) {
    let known = st.statements.as_deref().and_then(|c| {
        c.sql_get(name)
            .map(|d| Known::Sql(d.clone()))
            .or_else(|| c.get(name).map(|d| Known::Protocol(d.clone())))
    });
    let mut step = Step::default();
    let server_name: Vec<u8> = match (kind, known) {
        (CommandKind::Execute, Some(Known::Sql(sql))) => {
            ensure_sql_copy(&sql, st, out);
            step.copy = Some(sql.hash);
            sql.name().to_vec()
        }
        // A name the client does not have (an EXECUTE of a protocol-level statement,
        // which PostgreSQL would run, included).
        (CommandKind::Execute, _) | (CommandKind::Deallocate, None) => MISSING.to_vec(),
        (CommandKind::Deallocate, Some(_)) => {
            // PostgreSQL answers the DEALLOCATE of pgsilo's throwaway statement; the
            // client's name goes when it completes.
            message(out, b'C', |b| {
                b.push(b'S');
                b.extend_from_slice(SCRATCH);
                b.push(0);
            });
            st.queue.push(Expect::ScratchClose);
            inject_prepare(st, out, b"PREPARE pgsilo_d0 AS SELECT", None, false);
            step.effect = Effect::Undefine { name: name.into() };
            SCRATCH.to_vec()
        }
        (CommandKind::Prepare, Some(_)) => {
            if !st.server.dup_probe {
                inject_prepare(st, out, b"PREPARE pgsilo_dup AS SELECT", None, true);
                st.server.dup_probe = true;
            }
            DUPLICATE.to_vec()
        }
        (CommandKind::Prepare, None) => {
            let backslash_quotes = st.server.settings.get("standard_conforming_strings") == Some("off");
            let end = split_statements(text, backslash_quotes)
                .and_then(|r| r.first().map(|r| r.end))
                .unwrap_or(text.len())
                .max(at.end);
            let def = Rc::new(SqlDef::new(&text[at.end..end]));
            if st.server.prepared.contains(def.hash) {
                write_close_statement(out, def.hash);
                st.queue.push(Expect::InjectedClose { hash: def.hash });
                st.server.prepared.remove(def.hash);
            }
            for evicted in st.server.prepared.evict_for(1, st.max_prepared, &[def.hash]) {
                write_close_statement(out, evicted);
                st.queue.push(Expect::InjectedClose { hash: evicted });
            }
            step.copy = Some(def.hash);
            let server_name = def.name().to_vec();
            step.effect = Effect::Define {
                name: name.into(),
                def,
                made: stamp(),
            };
            server_name
        }
    };
    step.rename = Some(Rename::new(&server_name, name));
    let mut rw = Rewriter::new(text, client_utf8(st));
    rw.rename(at, &server_name);
    let (_, positions) = rw.finish();
    let plan = Box::new(QueryPlan {
        steps: vec![step],
        positions,
        ..QueryPlan::default()
    });
    (server_name, plan)
}

/// The client's text is UTF8 (error positions count its characters).
fn client_utf8(st: &UpState) -> bool {
    st.server
        .settings
        .get("client_encoding")
        .is_some_and(|e| e.eq_ignore_ascii_case("UTF8"))
}

/// Makes sure the server has a copy of the client's SQL-level statement `sql` fit for it,
/// from within the extended protocol.
fn ensure_sql_copy(sql: &SqlDef, st: &mut UpState, out: &mut Vec<u8>) {
    if st.server.prepared.fresh(sql.hash, sql.born) {
        return;
    }
    if st.server.prepared.contains(sql.hash) {
        write_close_statement(out, sql.hash);
        st.queue.push(Expect::InjectedClose { hash: sql.hash });
    }
    if let Some(evicted) = st.server.prepared.insert(sql.hash, stamp(), st.max_prepared) {
        write_close_statement(out, evicted);
        st.queue.push(Expect::InjectedClose { hash: evicted });
    }
    st.server.prepared.made_provisionally(sql.hash);
    let mut text = b"PREPARE ".to_vec();
    text.extend_from_slice(sql.name());
    text.push(b' ');
    text.extend_from_slice(&sql.definition);
    inject_prepare(st, out, &text, Some(sql.hash), false);
}

/// A PREPARE of pgsilo's through the extended protocol: its unnamed statement, run in
/// the unnamed portal, all answers swallowed. The server's unnamed statement is then
/// pgsilo's: the client's is prepared again before it is used. `copy`: the copy it
/// makes; `probe`: it makes the probe statement for duplicate names.
fn inject_prepare(st: &mut UpState, out: &mut Vec<u8>, text: &[u8], copy: Option<StmtHash>, probe: bool) {
    let mut body = text.to_vec();
    body.extend_from_slice(&[0, 0, 0]);
    write_unnamed_parse(out, &body);
    let prev = st.server.unnamed_stmt;
    st.server.unnamed_stmt = None;
    st.queue.push(Expect::InjectedUnnamed { prev });
    // Portal "", statement "", no parameters, no result formats.
    message(out, b'B', |b| b.extend_from_slice(&[0; 8]));
    st.queue.push(Expect::InjectedBind);
    message(out, b'E', |b| b.extend_from_slice(&[0; 5]));
    st.queue.push(Expect::InjectedExecute { copy, probe });
}

/// An unnamed Parse of `DEALLOCATE name` for a statement the client prepared with the
/// protocol (psycopg in pipeline mode on libpq before 17 evicts this way): pgsilo first
/// prepares a throwaway statement, and the client's Parse deallocates that instead, so
/// the client's Bind and Execute get PostgreSQL's own answers. Writes both Parses and
/// returns true, or writes nothing and returns false when the text is anything else.
fn rewrite_dealloc_parse(def_body: &[u8], st: &mut UpState, out: &mut Vec<u8>) -> bool {
    let Some((text, at)) = read_cstr(def_body, 0) else {
        return false;
    };
    // No parameters: DEALLOCATE takes none.
    if def_body[at..] != [0, 0] {
        return false;
    }
    let backslash_quotes = st.server.settings.get("standard_conforming_strings") == Some("off");
    let stmts = match split_statements(text, backslash_quotes) {
        Some(r) if r.len() == 1 => r,
        _ => return false,
    };
    let Some(Deallocate::Name(name)) = parse_deallocate(&text[stmts[0].clone()]) else {
        return false;
    };
    let Some(client) = st.statements.as_deref_mut() else {
        return false;
    };
    let Some(def) = client.get(&name).cloned() else {
        return false;
    };
    client.remove(&name);
    st.server.scratch_seq = st.server.scratch_seq.wrapping_add(1);
    let scratch = format!("pgsilo_d{}", st.server.scratch_seq);
    message(out, b'P', |b| {
        b.extend_from_slice(scratch.as_bytes());
        b.extend_from_slice(b"\0SELECT\0\0\0");
    });
    st.queue.push(Expect::ScratchParse);
    let mut body = format!("DEALLOCATE {scratch}").into_bytes();
    body.extend_from_slice(&[0, 0, 0]);
    write_unnamed_parse(out, &body);
    let prev = st.server.unnamed_stmt;
    st.server.unnamed_stmt = Some(st.unnamed.set(&body));
    st.queue.push(Expect::DeallocParse {
        prev,
        client_name: name.into(),
        def,
    });
    true
}

// ---------------------------------------------------------------------------------------
// SQL-level prepared statements in simple Queries
// ---------------------------------------------------------------------------------------
//
// A client's `PREPARE name AS …` becomes `PREPARE pgsilo_s<hash of the definition> AS …`
// on the server it runs on: clients that prepare the same definition share one copy per
// server (as with protocol-level statements, and for the same reason: server memory),
// and the name, derived from the definition, can never be another client's statement of
// another text. pgsilo keeps the client's definitions (recorded when PostgreSQL completes
// the PREPARE: PostgreSQL itself judges every PREPARE), and an EXECUTE on a server that
// lacks the copy gets pgsilo's PREPARE of it first, in the same query string, its
// CommandComplete swallowed. Every other name the client writes in these statements is
// replaced too, so nothing a client names ever reaches a server as it is:
// - a name the client does not have: `pgsilo_none`, which never exists on any server,
//   so PostgreSQL reports "does not exist" in its own words, for the client's name;
// - a PREPARE of a name the client has: `pgsilo_dup`, a statement pgsilo keeps on the
//   server for this, so PostgreSQL analyses the client's statement (its errors first, as
//   directly) and then reports the duplicate;
// - a DEALLOCATE of the client's statement: a throwaway statement's, as for protocol-level
//   statements, so PostgreSQL answers it in its place and the copy stays for others.
// Error messages and positions are put back in the client's terms on the way down
// (`QueryPlan::client_error`).
//
// Prepared statements are not transactional in PostgreSQL: a PREPARE whose transaction
// rolls back stays, and so does the client's definition here. A copy made in a
// transaction that failed is not shared (`PreparedCache::tx_failed`): its next use
// replaces it.

/// A statement name that never exists on a server.
const MISSING: &[u8] = b"pgsilo_none";
/// A statement pgsilo keeps prepared on a server once a client's duplicate PREPARE needed it.
const DUPLICATE: &[u8] = b"pgsilo_dup";
/// The throwaway statement an extended-protocol DEALLOCATE deallocates instead.
const SCRATCH: &[u8] = b"pgsilo_d0";

/// The statements of a simple Query, each with the command pgsilo acts on, if any; None
/// when the query goes to the server as it is: nothing in it names a prepared statement,
/// the splitter does not follow it, or PostgreSQL will reject all of it as a syntax error
/// (which only the text as the client wrote it reproduces exactly).
fn sql_commands(text: &[u8], st: &UpState) -> Option<Vec<(Range<usize>, Option<SqlCommand>)>> {
    let backslash_quotes = st.server.settings.get("standard_conforming_strings") == Some("off");
    let ranges = split_statements(text, backslash_quotes)?;
    let mut named = false;
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let cmd = match classify(&text[r.clone()]) {
            Classified::Command(cmd) => {
                named |= !matches!(cmd, SqlCommand::DropAll);
                Some(cmd)
            }
            Classified::Other => None,
            Classified::SyntaxError => return None,
        };
        out.push((r, cmd));
    }
    named.then_some(out)
}

/// What a name stands for at some point of a query.
enum Known {
    Sql(Rc<SqlDef>),
    Protocol(Rc<StmtDef>),
}

/// The client's names and the server's copies as a query's statements leave them, up to
/// the statement being planned.
struct Simulated {
    /// Names the query defined (Some) or deallocated (None) so far.
    names: HashMap<Box<[u8]>, Option<Rc<SqlDef>>>,
    /// A DEALLOCATE ALL or DISCARD ALL came: names and copies from before are gone.
    cleared: bool,
    /// Whether the server has a copy, for copies the query has used so far.
    copies: HashMap<StmtHash, bool>,
    probe: bool,
}

impl Simulated {
    fn lookup(&self, name: &[u8], client: &ClientStatements) -> Option<Known> {
        if let Some(now) = self.names.get(name) {
            return now.clone().map(Known::Sql);
        }
        if self.cleared {
            return None;
        }
        if let Some(def) = client.sql_get(name) {
            return Some(Known::Sql(def.clone()));
        }
        client.get(name).map(|def| Known::Protocol(def.clone()))
    }

    /// Whether the server has a copy of `hash` fit for this use at this point of the
    /// query. `born`: for an EXECUTE, when the client prepared the statement; a copy made
    /// before then is not used for it. A PREPARE always makes a fresh copy. A copy the
    /// server may hold that is not fit is closed before the query (a Close of what is
    /// not there is no error, and a Close runs even in a failed transaction).
    fn copy_present(
        &mut self,
        hash: StmtHash,
        born: Option<Stamp>,
        server: &mut ServerMeta,
        queue: &mut ExpectQueue,
        out: &mut Vec<u8>,
    ) -> bool {
        if let Some(&present) = self.copies.get(&hash) {
            return present;
        }
        let present = !self.cleared && born.is_some_and(|born| server.prepared.fresh(hash, born));
        if !present && !self.cleared && server.prepared.contains(hash) {
            write_close_statement(out, hash);
            queue.push(Expect::InjectedClose { hash });
            server.prepared.remove(hash);
        }
        self.copies.insert(hash, present);
        present
    }

    fn clear(&mut self) {
        self.names.clear();
        self.cleared = true;
        self.copies.values_mut().for_each(|present| *present = false);
        self.probe = false;
    }
}

/// The text pgsilo sends for a client's query, built from the client's text, pgsilo's
/// names in place of the client's, and statements of pgsilo's own; with where each piece
/// came from, in characters, for error positions.
struct Rewriter<'a> {
    text: &'a [u8],
    sql: Vec<u8>,
    copied: usize,
    utf8: bool,
    /// The map and the characters so far of the text sent and of the client's; None
    /// when characters cannot be counted (non-ASCII text in an encoding other than UTF8).
    map: Option<(PositionMap, usize, usize)>,
}

impl<'a> Rewriter<'a> {
    fn new(text: &'a [u8], utf8: bool) -> Rewriter<'a> {
        Rewriter {
            text,
            sql: Vec::with_capacity(text.len() + 128),
            copied: 0,
            utf8,
            map: (utf8 || text.is_ascii()).then(|| (PositionMap::default(), 0, 0)),
        }
    }

    fn chars(&self, bytes: &[u8]) -> usize {
        if self.utf8 {
            bytes.iter().filter(|&&b| b & 0xc0 != 0x80).count()
        } else {
            bytes.len()
        }
    }

    /// The client's text up to `to`, as it is.
    fn client_upto(&mut self, to: usize) {
        if to <= self.copied {
            return;
        }
        let piece = &self.text[self.copied..to];
        self.sql.extend_from_slice(piece);
        let n = self.chars(piece);
        if let Some((map, sent, client)) = &mut self.map {
            map.push(*sent, n, Origin::Client(*client));
            *sent += n;
            *client += n;
        }
        self.copied = to;
    }

    /// A statement of pgsilo's own, before the client's that starts at `at`.
    fn own(&mut self, at: usize, sql: &[u8]) {
        self.client_upto(at);
        self.sql.push(b' ');
        self.sql.extend_from_slice(sql);
        // A definition may end in a -- comment.
        self.sql.extend_from_slice(b"\n;");
        let n = sql.len() + 3;
        if let Some((map, sent, _)) = &mut self.map {
            map.push(*sent, n, Origin::Own);
            *sent += n;
        }
    }

    /// `name` in place of the client's name at `at`.
    fn rename(&mut self, at: Range<usize>, name: &[u8]) {
        self.client_upto(at.start);
        self.sql.extend_from_slice(name);
        let len = self.chars(&self.text[at.clone()]);
        if let Some((map, sent, client)) = &mut self.map {
            map.push(*sent, name.len(), Origin::Renamed { at: *client, len });
            *sent += name.len();
            *client += len;
        }
        self.copied = at.end;
    }

    fn finish(mut self) -> (Vec<u8>, Option<PositionMap>) {
        self.client_upto(self.text.len());
        (self.sql, self.map.map(|(map, _, _)| map))
    }
}

/// Rewrites a simple Query whose statements name prepared statements (`commands`, from
/// [`sql_commands`]) and plans what each statement's answer means (see the comment
/// above). Messages that must go before the query (Closes of copies that are not fit for
/// use, or evicted) are appended to `out`. Called with nothing in flight, so the
/// client's names and the server's copies are known as they are.
fn plan_query(
    text: &[u8],
    commands: Vec<(Range<usize>, Option<SqlCommand>)>,
    st: &mut UpState,
    out: &mut Vec<u8>,
) -> (Vec<u8>, Box<QueryPlan>) {
    let mut rw = Rewriter::new(text, client_utf8(st));
    let mut plan = Box::<QueryPlan>::default();
    let mut sim = Simulated {
        names: HashMap::new(),
        cleared: false,
        copies: HashMap::new(),
        probe: st.server.dup_probe,
    };
    // Copies the query uses (none is evicted to make room) and those it makes.
    let mut used: Vec<StmtHash> = Vec::new();
    let mut made: Vec<StmtHash> = Vec::new();
    // Only called with statement tracking on; without it, nothing is the client's.
    let mut none = ClientStatements::default();
    let client = match st.statements.as_deref_mut() {
        Some(client) => client,
        None => &mut none,
    };
    for (r, cmd) in commands {
        let Some(cmd) = cmd else {
            plan.steps.push(Step::default());
            continue;
        };
        let (n, at) = match cmd {
            SqlCommand::DropAll => {
                sim.clear();
                plan.steps.push(Step::default());
                continue;
            }
            SqlCommand::Prepare(ref n) | SqlCommand::Execute(ref n) | SqlCommand::Deallocate(ref n) => {
                (n, r.start + n.at.start..r.start + n.at.end)
            }
        };
        let name: Box<[u8]> = n.name.as_slice().into();
        let known = sim.lookup(&name, client);
        match (&cmd, known) {
            (SqlCommand::Prepare(_), Some(_)) => {
                if !sim.probe {
                    rw.own(r.start, b"PREPARE pgsilo_dup AS SELECT");
                    plan.steps.push(Step {
                        own: true,
                        effect: Effect::Probe,
                        ..Step::default()
                    });
                    sim.probe = true;
                }
                rw.rename(at, DUPLICATE);
                plan.steps.push(Step {
                    rename: Some(Rename::new(DUPLICATE, &name)),
                    ..Step::default()
                });
            }
            (SqlCommand::Prepare(_), None) => {
                let def = Rc::new(SqlDef::new(&text[at.end..r.end]));
                let hash = def.hash;
                if sim.copy_present(hash, None, st.server, st.queue, out) {
                    // Made earlier in this same query: replaced, so PostgreSQL judges
                    // this PREPARE too.
                    let mut sql = b"DEALLOCATE ".to_vec();
                    sql.extend_from_slice(def.name());
                    rw.own(r.start, &sql);
                    plan.steps.push(Step {
                        own: true,
                        effect: Effect::Uncopy { hash },
                        copy: Some(hash),
                        ..Step::default()
                    });
                }
                rw.rename(at, def.name());
                sim.copies.insert(hash, true);
                sim.names.insert(name.clone(), Some(def.clone()));
                used.push(hash);
                made.push(hash);
                plan.steps.push(Step {
                    rename: Some(Rename::new(def.name(), &name)),
                    copy: Some(hash),
                    effect: Effect::Define {
                        name,
                        def,
                        made: stamp(),
                    },
                    ..Step::default()
                });
            }
            (SqlCommand::Execute(_), Some(Known::Sql(def))) => {
                let hash = def.hash;
                if !sim.copy_present(hash, Some(def.born), st.server, st.queue, out) {
                    let mut sql = b"PREPARE ".to_vec();
                    sql.extend_from_slice(def.name());
                    sql.push(b' ');
                    sql.extend_from_slice(&def.definition);
                    rw.own(r.start, &sql);
                    plan.steps.push(Step {
                        own: true,
                        effect: Effect::Copy { hash, made: stamp() },
                        copy: Some(hash),
                        ..Step::default()
                    });
                    sim.copies.insert(hash, true);
                    made.push(hash);
                }
                used.push(hash);
                rw.rename(at, def.name());
                plan.steps.push(Step {
                    rename: Some(Rename::new(def.name(), &name)),
                    copy: Some(hash),
                    ..Step::default()
                });
            }
            (SqlCommand::Deallocate(_), Some(known)) => {
                // PostgreSQL answers the DEALLOCATE of a throwaway statement in its place;
                // the copy stays on the server for others.
                st.server.scratch_seq = st.server.scratch_seq.wrapping_add(1);
                let scratch = format!("pgsilo_d{}", st.server.scratch_seq);
                rw.own(r.start, format!("PREPARE {scratch} AS SELECT").as_bytes());
                plan.steps.push(Step {
                    own: true,
                    ..Step::default()
                });
                rw.rename(at, scratch.as_bytes());
                match known {
                    Known::Sql(_) => plan.steps.push(Step {
                        effect: Effect::Undefine { name: name.clone() },
                        ..Step::default()
                    }),
                    Known::Protocol(def) => {
                        client.remove(&name);
                        plan.dropped.push((plan.steps.len(), name.clone(), def));
                        plan.steps.push(Step::default());
                    }
                }
                sim.names.insert(name, None);
            }
            // EXECUTE or DEALLOCATE of a name the client does not have (an EXECUTE of a
            // protocol-level statement, which PostgreSQL would run, included).
            (SqlCommand::Execute(_) | SqlCommand::Deallocate(_), _) => {
                rw.rename(at, MISSING);
                plan.steps.push(Step {
                    rename: Some(Rename::new(MISSING, &name)),
                    ..Step::default()
                });
            }
            (SqlCommand::DropAll, _) => {}
        }
    }
    made.sort_unstable();
    made.dedup();
    let room = made.iter().filter(|&&h| !st.server.prepared.contains(h)).count();
    for evicted in st.server.prepared.evict_for(room, st.max_prepared, &used) {
        write_close_statement(out, evicted);
        st.queue.push(Expect::InjectedClose { hash: evicted });
    }
    let (sql, positions) = rw.finish();
    plan.positions = positions;
    (sql, plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::framing::{scan, Scan};

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    struct Fixture {
        cur: UpCursor,
        tracker: TxTracker,
        queue: ExpectQueue,
        stmts: ClientStatements,
        unnamed: UnnamedStmt,
        server: ServerMeta,
        retry: StaleRetry,
        max_prepared: usize,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                cur: UpCursor::default(),
                tracker: TxTracker::default(),
                queue: ExpectQueue::default(),
                stmts: ClientStatements::default(),
                unnamed: UnnamedStmt::default(),
                server: ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 1),
                retry: StaleRetry::default(),
                max_prepared: 200,
            }
        }

        fn run(&mut self, data: &[u8], ps: bool) -> (UpResult, Vec<u8>) {
            let mut out = Vec::new();
            let mut st = UpState {
                cur: &mut self.cur,
                tracker: &mut self.tracker,
                queue: &mut self.queue,
                statements: if ps { Some(&mut self.stmts) } else { None },
                unnamed: &mut self.unnamed,
                server: &mut self.server,
                max_prepared: self.max_prepared,
                retry: &mut self.retry,
                listen_here: ps,
            };
            let r = process(data, &mut st, &mut out).unwrap();
            (r, out)
        }
    }

    fn tags(bytes: &[u8]) -> Vec<u8> {
        let mut at = 0;
        let mut t = vec![];
        while let Scan::Whole(h) = scan(&bytes[at..]) {
            t.push(h.tag);
            at += h.total();
        }
        assert_eq!(at, bytes.len(), "trailing bytes");
        t
    }

    #[test]
    fn plain_messages_pass_through_without_copying() {
        let mut f = Fixture::new();
        let mut data = msg(b'Q', b"select 1\0");
        data.extend(msg(b'P', b"\0select 2\0\0\0"));
        data.extend(msg(b'S', b""));
        let (r, out) = f.run(&data, true);
        assert!(r.zero_copy);
        assert_eq!(r.consumed, data.len());
        assert!(out.is_empty());
        assert_eq!(f.queue.len(), 3);
    }

    #[test]
    fn named_parse_is_renamed_and_always_makes_a_fresh_copy() {
        let mut f = Fixture::new();
        let mut data = msg(b'P', b"s1\0select 1\0\0\0");
        data.extend(msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
        data.extend(msg(b'E', b"\0\0\0\0\0"));
        data.extend(msg(b'S', b""));
        let (r, out) = f.run(&data, true);
        assert!(!r.zero_copy);
        assert_eq!(tags(&out), b"PBES");
        assert!(out.windows(7).any(|w| w == b"pgsilo_"));
        // The same text prepared again (by this client or another) replaces the server's
        // copy, which predates this Parse and so maybe a schema change.
        f.queue.clear();
        let mut data2 = msg(b'P', b"s2\0select 1\0\0\0");
        data2.extend(msg(b'S', b""));
        let (_, out2) = f.run(&data2, true);
        assert_eq!(tags(&out2), b"CPS");
    }

    #[test]
    fn a_bind_uses_a_copy_only_if_it_is_newer_than_the_clients_parse() {
        let mut f = Fixture::new();
        let old = StmtDef::new(b"select 1\0\0\0");
        // A copy made after the client's Parse: used as it is.
        f.server.prepared.insert(old.hash, stamp(), 200);
        f.stmts.insert(b"s1", Rc::new(old));
        let bind = msg(b'B', b"\0s1\0\0\0\0\0\0\0");
        let (_, out) = f.run(&bind, true);
        assert_eq!(tags(&out), b"B");
        // A client that prepared the same text after that copy was made: replaced first.
        f.queue.clear();
        f.stmts.clear();
        f.stmts.insert(b"s1", Rc::new(StmtDef::new(b"select 1\0\0\0")));
        let (_, out) = f.run(&bind, true);
        assert_eq!(tags(&out), b"CPB");
        // Now fresh for it.
        f.queue.clear();
        let (_, out) = f.run(&bind, true);
        assert_eq!(tags(&out), b"B");
    }

    #[test]
    fn deallocate_of_a_client_statement_is_rewritten_in_its_place() {
        let mut f = Fixture::new();
        f.stmts.insert(b"_pg3_0", Rc::new(StmtDef::new(b"select 1\0\0\0")));
        f.stmts.insert(b"S2", Rc::new(StmtDef::new(b"select 2\0\0\0")));
        let q = msg(
            b'Q',
            b"select ';'; DEALLOCATE _pg3_0; deallocate prepare \"S2\"; DEALLOCATE _pg3_0; DEALLOCATE nope\0",
        );
        let (r, out) = f.run(&q, true);
        assert_eq!(r.consumed, q.len());
        assert_eq!(tags(&out), b"Q");
        let text = String::from_utf8_lossy(&out[5..out.len() - 1]).into_owned();
        // Names the client no longer has (or never had) become one no server has.
        assert_eq!(
            text,
            "select ';'; PREPARE pgsilo_d1 AS SELECT\n; DEALLOCATE pgsilo_d1; PREPARE pgsilo_d2 AS SELECT\n; \
             deallocate prepare pgsilo_d2; DEALLOCATE pgsilo_none; DEALLOCATE pgsilo_none"
        );
        assert!(f.stmts.is_empty());
        // Queries that name no statement pass as they are.
        f.queue.clear();
        let q = msg(b'Q', b"DEALLOCATE ALL; select 'deallocate x'\0");
        let (r, _) = f.run(&q, true);
        assert!(r.zero_copy);
        // A partial Query is read whole first.
        let (r, _) = f.run(&q[..10], true);
        assert_eq!((r.consumed, r.want), (0, q.len()));
    }

    /// The text of the one Query in `out` (after any other messages).
    fn query_text(out: &[u8]) -> String {
        let mut at = 0;
        while let Scan::Whole(h) = scan(&out[at..]) {
            if h.tag == b'Q' {
                return String::from_utf8_lossy(&out[at + 5..at + h.total() - 1]).into_owned();
            }
            at += h.total();
        }
        panic!("no Query in {out:?}");
    }

    impl Fixture {
        /// The server answers with these messages (tag, body), as the down direction
        /// hands them to the queue; returns what the client gets of them.
        fn answer(&mut self, msgs: &[(u8, &[u8])]) -> Vec<u8> {
            use crate::proxy::expect::Disposition;
            let mut client = Vec::new();
            for &(tag, body) in msgs {
                if tag == b'C' {
                    self.server.command_done(body.strip_suffix(&[0]).unwrap_or(body));
                }
                let mut synth = Vec::new();
                if tag == b'E' {
                    if let Some(e) = self.queue.planned_error(None, body, &mut self.server) {
                        self.queue
                            .server_message(tag, &mut self.stmts, &mut self.server, &mut synth);
                        client.extend(synth);
                        client.extend(e);
                        continue;
                    }
                }
                if self
                    .queue
                    .server_message(tag, &mut self.stmts, &mut self.server, &mut synth)
                    == Disposition::Forward
                {
                    client.extend(synth);
                    client.extend(msg(tag, body));
                } else {
                    client.extend(synth);
                }
            }
            client
        }
    }

    #[test]
    fn sql_prepare_runs_under_pgsilos_name_and_counts_once_completed() {
        let mut f = Fixture::new();
        let (r, out) = f.run(&msg(b'Q', b"PREPARE p(int) AS SELECT $1\0"), true);
        assert!(!r.zero_copy);
        let def = SqlDef::new(b"(int) AS SELECT $1");
        let name = String::from_utf8_lossy(def.name()).into_owned();
        assert_eq!(query_text(&out), format!("PREPARE {name}(int) AS SELECT $1"));
        assert!(f.stmts.sql_get(b"p").is_none(), "not before PostgreSQL says so");
        let seen = f.answer(&[(b'C', b"PREPARE\0"), (b'Z', b"I")]);
        assert_eq!(tags(&seen), b"CZ");
        assert_eq!(f.stmts.sql_get(b"p").map(|d| d.hash), Some(def.hash));
        assert!(f.server.prepared.contains(def.hash));
        // The same name again: PostgreSQL judges the statement, then the duplicate, on
        // pgsilo's probe statement, made first.
        let (_, out) = f.run(&msg(b'Q', b"prepare P as select 2\0"), true);
        assert_eq!(
            query_text(&out),
            " PREPARE pgsilo_dup AS SELECT\n;prepare pgsilo_dup as select 2"
        );
        let error = crate::protocol::backend::error_response;
        let mut e = Vec::new();
        error(
            &mut e,
            Severity::Error,
            SqlState::DUPLICATE_PREPARED_STATEMENT,
            "prepared statement \"pgsilo_dup\" already exists",
        );
        let seen = f.answer(&[(b'C', b"PREPARE\0"), (b'E', &e[5..]), (b'Z', b"I")]);
        assert_eq!(tags(&seen), b"EZ");
        assert!(seen.windows(30).any(|w| w == b"prepared statement \"p\" already"));
        assert!(f.server.dup_probe);
        let (_, out) = f.run(&msg(b'Q', b"PREPARE p AS SELECT 3\0"), true);
        assert_eq!(query_text(&out), "PREPARE pgsilo_dup AS SELECT 3");
    }

    #[test]
    fn execute_on_a_server_without_the_copy_prepares_it_first_in_the_same_query() {
        let mut f = Fixture::new();
        let def = Rc::new(SqlDef::new(b"(int) AS SELECT $1 -- one"));
        f.stmts.sql_insert(b"p", def.clone());
        let name = String::from_utf8_lossy(def.name()).into_owned();
        let (_, out) = f.run(&msg(b'Q', b"select 1; EXECUTE p(7)\0"), true);
        assert_eq!(tags(&out), b"Q");
        assert_eq!(
            query_text(&out),
            format!("select 1; PREPARE {name} (int) AS SELECT $1 -- one\n; EXECUTE {name}(7)")
        );
        let seen = f.answer(&[
            (b'T', b""),
            (b'C', b"SELECT 1\0"),
            (b'C', b"PREPARE\0"),
            (b'T', b""),
            (b'C', b"SELECT 1\0"),
            (b'Z', b"I"),
        ]);
        assert_eq!(tags(&seen), b"TCTCZ", "pgsilo's CommandComplete is swallowed");
        assert!(f.server.prepared.contains(def.hash));
        // Now the server has it.
        let (_, out) = f.run(&msg(b'Q', b"EXECUTE p(8)\0"), true);
        assert_eq!(query_text(&out), format!("EXECUTE {name}(8)"));
    }

    #[test]
    fn a_copy_older_than_the_clients_prepare_is_closed_and_made_again() {
        let mut f = Fixture::new();
        let old = stamp();
        let def = Rc::new(SqlDef::new(b"AS SELECT 1"));
        f.server.prepared.insert(def.hash, old, 200);
        f.stmts.sql_insert(b"p", def.clone());
        let (_, out) = f.run(&msg(b'Q', b"EXECUTE p\0"), true);
        assert_eq!(tags(&out), b"CQ");
        assert!(query_text(&out).starts_with(" PREPARE pgsilo_s"));
        // A copy made after it is used as it is; a spoiled one is not.
        f.queue.clear();
        f.server.prepared.insert(def.hash, stamp(), 200);
        let (_, out) = f.run(&msg(b'Q', b"EXECUTE p\0"), true);
        assert_eq!(tags(&out), b"Q");
        f.queue.clear();
        f.server.prepared.spoil(def.hash);
        let (_, out) = f.run(&msg(b'Q', b"EXECUTE p\0"), true);
        assert_eq!(tags(&out), b"CQ");
    }

    #[test]
    fn names_the_client_does_not_have_never_reach_the_server() {
        let mut f = Fixture::new();
        let (_, out) = f.run(&msg(b'Q', b"EXECUTE pgsilo_dup(1); DEALLOCATE \"x\"\0"), true);
        assert_eq!(query_text(&out), "EXECUTE pgsilo_none(1); DEALLOCATE pgsilo_none");
        let mut e = Vec::new();
        crate::protocol::backend::error_response(
            &mut e,
            Severity::Error,
            SqlState::UNDEFINED_PREPARED_STATEMENT,
            "prepared statement \"pgsilo_none\" does not exist",
        );
        let seen = f.answer(&[(b'E', &e[5..]), (b'Z', b"I")]);
        assert!(seen.windows(34).any(|w| w == b"prepared statement \"pgsilo_dup\" do"));
    }

    #[test]
    fn what_postgresql_rejects_whole_goes_as_it_is() {
        let mut f = Fixture::new();
        for q in [
            &b"PREPARE select AS SELECT 1; EXECUTE p\0"[..],
            b"PREPARE TRANSACTION 'x'\0",
            b"select 'EXECUTE p'\0",
            b"DEALLOCATE ALL\0",
        ] {
            let (r, _) = f.run(&msg(b'Q', q), true);
            assert!(r.zero_copy, "{q:?}");
        }
    }

    #[test]
    fn a_query_naming_statements_waits_for_answers_in_flight() {
        let mut f = Fixture::new();
        let mut data = msg(b'Q', b"select 1\0");
        let first = data.len();
        data.extend(msg(b'Q', b"EXECUTE p\0"));
        let (r, out) = f.run(&data, true);
        assert!(r.blocked);
        assert_eq!(r.consumed, first);
        assert_eq!(tags(&out), b"QH");
    }

    #[test]
    fn a_listen_query_stops_for_the_session_to_answer_but_not_inside_a_transaction() {
        let mut f = Fixture::new();
        let mut data = msg(b'Q', b"select 1\0");
        let first = data.len();
        data.extend(msg(b'Q', b"LISTEN ch\0"));
        let (r, out) = f.run(&data, true);
        assert!(r.blocked);
        assert_eq!(r.consumed, first);
        assert_eq!(tags(&out), b"QH");
        // Inside a transaction block it goes to the server as it is.
        let mut f = Fixture::new();
        f.tracker.server_message(b'Z', Some(b'T'));
        let (r, _) = f.run(&msg(b'Q', b"LISTEN ch\0"), true);
        assert!(!r.blocked && r.zero_copy);
        // Mixed with other statements, too.
        let mut f = Fixture::new();
        let (r, _) = f.run(&msg(b'Q', b"LISTEN ch; SELECT 1\0"), true);
        assert!(!r.blocked && r.zero_copy);
    }

    #[test]
    fn room_is_made_without_evicting_what_the_query_uses() {
        let mut f = Fixture::new();
        f.max_prepared = 2;
        let a = Rc::new(SqlDef::new(b"AS SELECT 'a'"));
        let b = Rc::new(SqlDef::new(b"AS SELECT 'b'"));
        f.stmts.sql_insert(b"a", a.clone());
        f.stmts.sql_insert(b"b", b.clone());
        f.server.prepared.insert(a.hash, stamp(), 2);
        f.server.prepared.insert(b.hash, stamp(), 2);
        let (_, out) = f.run(&msg(b'Q', b"EXECUTE a; PREPARE c AS SELECT 'c'\0"), true);
        // b goes (Close), a stays for the EXECUTE.
        assert_eq!(tags(&out), b"CQ");
        assert!(!f.server.prepared.contains(b.hash) && f.server.prepared.contains(a.hash));
        assert!(out.windows(39).any(|w| w == b.name()));
    }

    #[test]
    fn a_protocol_statement_executing_an_sql_one_runs_what_the_name_stands_for_now() {
        let mut f = Fixture::new();
        let p1 = Rc::new(SqlDef::new(b"AS SELECT 1"));
        f.stmts.sql_insert(b"p", p1.clone());
        let mut parse = msg(b'P', b"_pg3_0\0EXECUTE p\0\0\0");
        parse.extend(msg(b'S', b""));
        f.run(&parse, true);
        f.queue.clear();
        let mut run = msg(b'B', b"\0_pg3_0\0\0\0\0\0\0\0");
        run.extend(msg(b'E', b"\0\0\0\0\0"));
        run.extend(msg(b'S', b""));
        let (_, out) = f.run(&run, true);
        // pgsilo's PREPARE (Parse, Bind, Execute of its own), the derived statement's
        // Parse, then the client's Bind of it.
        assert_eq!(tags(&out), b"PBEPBES");
        assert!(out.windows(p1.name().len()).filter(|w| *w == p1.name()).count() >= 2);
        // Redefined: the same protocol statement runs the new definition.
        f.queue.clear();
        let p2 = Rc::new(SqlDef::new(b"AS SELECT 2"));
        f.stmts.sql_insert(b"p", p2.clone());
        let (_, out) = f.run(&run, true);
        assert!(out.windows(p2.name().len()).any(|w| w == p2.name()));
        // Without a statement of that name: one no server has, PostgreSQL says so.
        f.queue.clear();
        f.stmts.sql_remove(b"p");
        let (_, out) = f.run(&run, true);
        assert_eq!(tags(&out), b"PBES");
        assert!(out.windows(11).any(|w| w == b"pgsilo_none"));
    }

    #[test]
    fn prepare_and_deallocate_through_the_protocol_take_effect_when_they_complete() {
        let mut f = Fixture::new();
        let parse_bind_exec = |text: &[u8]| {
            let mut body = b"\0".to_vec();
            body.extend_from_slice(text);
            body.extend_from_slice(b"\0\0\0");
            let mut m = msg(b'P', &body);
            m.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
            m.extend(msg(b'E', b"\0\0\0\0\0"));
            m.extend(msg(b'S', b""));
            m
        };
        let (_, out) = f.run(&parse_bind_exec(b"PREPARE p AS SELECT 1"), true);
        let def = SqlDef::new(b"AS SELECT 1");
        assert_eq!(tags(&out), b"PBES");
        assert!(out.windows(39).any(|w| w == def.name()));
        assert!(f.stmts.sql_get(b"p").is_none());
        f.answer(&[(b'1', b""), (b'2', b""), (b'C', b"PREPARE\0"), (b'Z', b"I")]);
        assert_eq!(f.stmts.sql_get(b"p").map(|d| d.hash), Some(def.hash));
        // A named statement of the same text: the name is taken now.
        let mut named = msg(b'P', b"_pg3_0\0PREPARE p AS SELECT 1\0\0\0");
        let parse_len = named.len();
        named.extend(msg(b'B', b"\0_pg3_0\0\0\0\0\0\0\0"));
        named.extend(msg(b'E', b"\0\0\0\0\0"));
        named.extend(msg(b'S', b""));
        // Its Bind waits for the Parse's answer (what the name stands for may depend on it).
        let (r, out) = f.run(&named, true);
        assert!(r.blocked);
        assert_eq!((r.consumed, tags(&out)), (parse_len, b"PH".to_vec()));
        f.queue.clear();
        let (_, out) = f.run(&named[parse_len..], true);
        assert!(out.windows(10).any(|w| w == b"pgsilo_dup"));
        f.queue.clear();
        // DEALLOCATE: of pgsilo's throwaway statement; the name goes on completion.
        let (_, out) = f.run(&parse_bind_exec(b"DEALLOCATE p"), true);
        assert_eq!(tags(&out), b"CPBEPBES");
        f.answer(&[
            (b'3', b""),
            (b'1', b""),
            (b'2', b""),
            (b'C', b"PREPARE\0"),
            (b'1', b""),
            (b'2', b""),
            (b'C', b"DEALLOCATE\0"),
            (b'Z', b"I"),
        ]);
        assert!(f.stmts.sql_get(b"p").is_none());
        assert!(f.queue.is_empty());
    }

    #[test]
    fn bind_on_a_server_without_the_statement_prepares_it_first() {
        let mut f = Fixture::new();
        f.stmts.insert(b"s1", Rc::new(StmtDef::new(b"select 1\0\0\0")));
        let data = msg(b'B', b"\0s1\0\0\0\0\0\0\0");
        let (_, out) = f.run(&data, true);
        assert_eq!(tags(&out), b"PB");
    }

    #[test]
    fn duplicate_name_raises_an_error_and_skips_to_sync() {
        let mut f = Fixture::new();
        f.stmts.insert(b"s1", Rc::new(StmtDef::new(b"select 1\0\0\0")));
        let mut data = msg(b'P', b"s1\0select 2\0\0\0");
        data.extend(msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
        data.extend(msg(b'S', b""));
        let (r, out) = f.run(&data, true);
        assert_eq!(r.consumed, data.len());
        assert_eq!(tags(&out), b"S");
        assert!(!f.queue.skipping);
    }

    #[test]
    fn parse_in_a_failed_transaction_is_refused_even_when_the_server_has_it() {
        let mut f = Fixture::new();
        let (_, out) = f.run(&msg(b'P', b"s1\0select 1\0\0\0"), true);
        assert_eq!(tags(&out), b"P");
        f.queue.clear();
        // The transaction fails; a second name for the same statement is refused.
        f.tracker.client_message(b'Q');
        f.tracker.server_message(b'Z', Some(b'E'));
        let mut data = msg(b'P', b"s2\0select 1\0\0\0");
        data.extend(msg(b'S', b""));
        let (_, out) = f.run(&data, true);
        assert_eq!(tags(&out), b"S");
        assert!(f.stmts.get(b"s2").is_none());
        let mut synth = Vec::new();
        f.queue.flush_synth(&mut synth);
        assert!(synth.windows(5).any(|w| w == b"25P02"));
    }

    #[test]
    fn close_of_a_named_statement_is_answered_locally() {
        let mut f = Fixture::new();
        f.stmts.insert(b"s1", Rc::new(StmtDef::new(b"select 1\0\0\0")));
        let mut data = msg(b'C', b"Ss1\0");
        data.extend(msg(b'S', b""));
        let (_, out) = f.run(&data, true);
        assert_eq!(tags(&out), b"S");
        assert!(f.stmts.get(b"s1").is_none());
    }

    #[test]
    fn without_statement_tracking_names_pass_through() {
        let mut f = Fixture::new();
        let data = msg(b'P', b"s1\0select 1\0\0\0");
        let (r, _) = f.run(&data, false);
        assert!(r.zero_copy);
    }

    #[test]
    fn a_partial_parse_waits_for_the_rest() {
        let mut f = Fixture::new();
        let data = msg(b'P', b"s1\0select 1\0\0\0");
        let (r, _) = f.run(&data[..8], true);
        assert_eq!(r.consumed, 0);
        assert_eq!(r.want, data.len());
    }

    #[test]
    fn a_large_bind_streams_after_its_rewritten_prefix() {
        let mut f = Fixture::new();
        f.stmts.insert(b"s1", Rc::new(StmtDef::new(b"select $1\0\0\0")));
        let mut body = b"\0s1\0\0\0\0\x01".to_vec();
        body.extend_from_slice(&(20_000i32).to_be_bytes());
        body.extend(vec![b'x'; 20_000]);
        body.extend_from_slice(b"\0\0");
        let data = msg(b'B', &body);
        let (r, out) = f.run(&data[..4096], true);
        assert_eq!(r.consumed, 4096);
        assert!(!r.zero_copy);
        assert_eq!(out[0], b'P');
        assert_eq!(f.cur.skip, data.len() - 4096);
        let (r2, out2) = f.run(&data[4096..], true);
        assert!(r2.zero_copy);
        assert!(out2.is_empty());
        assert_eq!(f.cur.skip, 0);
    }

    #[test]
    fn a_named_parse_waits_for_answers_in_flight() {
        let mut f = Fixture::new();
        let mut data = msg(b'Q', b"DEALLOCATE ALL\0");
        let q_len = data.len();
        data.extend(msg(b'P', b"s1\0select 1\0\0\0"));
        data.extend(msg(b'S', b""));
        let (r, out) = f.run(&data, true);
        assert!(r.blocked);
        assert_eq!(r.consumed, q_len);
        assert_eq!(tags(&out), b"QH");
        f.queue.clear();
        let (r, out) = f.run(&data[q_len..], true);
        assert!(!r.blocked);
        assert_eq!(tags(&out), b"PS");
    }

    #[test]
    fn an_unnamed_statement_follows_the_client_to_another_server() {
        let mut f = Fixture::new();
        let mut data = msg(b'P', b"\0select 1\0\0\0");
        data.extend(msg(b'S', b""));
        let (r, _) = f.run(&data, true);
        assert!(r.zero_copy);
        // Another server, whose unnamed statement is someone else's.
        f.server = ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 2);
        f.queue.clear();
        let mut bind = msg(b'B', b"\0\0\0\0\0\0\0\0");
        bind.extend(msg(b'E', b"\0\0\0\0\0"));
        let (_, out) = f.run(&bind, true);
        assert_eq!(tags(&out), b"PBE");
        // Same server again: nothing to add.
        f.queue.clear();
        let (r, _) = f.run(&bind, true);
        assert!(r.zero_copy);
        // A simple query destroys it: a later Bind must not bring it back.
        f.queue.clear();
        f.run(&msg(b'Q', b"select 2\0"), true);
        f.server = ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 3);
        let (r, _) = f.run(&bind, true);
        assert!(r.zero_copy);
    }

    #[test]
    fn peek_finds_whether_a_server_is_needed() {
        let mut data = msg(b'd', b"x");
        data.extend(msg(b'H', b""));
        assert_eq!(
            peek(&data).unwrap(),
            Peek {
                needs_server: false,
                terminate: false,
                whole: data.len()
            }
        );
        data.extend(msg(b'Q', b"select 1\0"));
        assert!(peek(&data).unwrap().needs_server);
        assert!(peek(&msg(b'X', b"")).unwrap().terminate);
        assert!(peek(&[b'Q', 0, 0, 0, 1]).is_err());
    }

    /// Queries and unnamed Parses of any text from a client that has statements: the
    /// DEALLOCATE rewrites never panic and always produce whole messages.
    #[test]
    fn deallocate_rewrites_of_arbitrary_text_never_panic() {
        const PIECES: &[&str] = &[
            "DEALLOCATE ",
            "deallocate prepare ",
            "s1",
            "\"s1\"",
            "ALL",
            ";",
            "'",
            "$$",
            "/*",
            "*/",
            "--",
            "\n",
            " ",
            "select 1",
            "E'\\'",
            "(",
            ")",
            "\"",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..(next() % 10) {
                text.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            for parse in [false, true] {
                let mut f = Fixture::new();
                f.stmts.insert(b"s1", Rc::new(StmtDef::new(b"select 1\0\0\0")));
                let mut body = Vec::new();
                if parse {
                    body.push(0);
                }
                body.extend_from_slice(text.as_bytes());
                body.push(0);
                if parse {
                    body.extend_from_slice(&[0, 0]);
                }
                let data = msg(if parse { b'P' } else { b'Q' }, &body);
                let (r, out) = f.run(&data, true);
                assert_eq!(r.consumed, data.len(), "{text:?}");
                if !r.zero_copy {
                    tags(&out);
                }
            }
        }
    }
}
