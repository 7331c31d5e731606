//! Client-to-server bytes: find message boundaries, keep the transaction tracker and the
//! expected-response queue current, and rewrite named prepared statements. Messages
//! that need no change go out as the bytes that came in; only when something must change
//! does the chunk get copied into an output buffer.

use std::rc::Rc;

use super::expect::{DeallocPlan, Expect, ExpectQueue, Kind};
use super::prepared::{
    bind_statement, split_parse, target, write_bind_prefix, write_close_statement, write_describe_statement,
    write_parse, write_unnamed_parse, ClientStatements, StmtDef, UnnamedStmt,
};
use super::retry::StaleRetry;
use super::sql_scan::{mentions_deallocate, parse_deallocate, split_statements, Deallocate};
use super::tx_tracker::TxTracker;
use crate::pool::prepared::{invalidation, stamp, StmtHash};
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
                if name.is_empty() && mentions_deallocate(def_body) {
                    st.tracker.client_message(h.tag);
                    e.start_copying(at);
                    if !rewrite_dealloc_parse(def_body, st, e.out) {
                        let prev = st.server.unnamed_stmt;
                        st.server.unnamed_stmt = Some(st.unnamed.set(def_body));
                        st.queue.push(Expect::UnnamedParse { prev });
                        e.out.extend_from_slice(&data[at..end]);
                    }
                } else if name.is_empty() {
                    st.tracker.client_message(h.tag);
                    let prev = st.server.unnamed_stmt;
                    st.server.unnamed_stmt = Some(st.unnamed.set(def_body));
                    st.queue.push(Expect::UnnamedParse { prev });
                    e.forward(at, end);
                } else if !st.queue.is_empty() {
                    // Whether the name exists, and whether the server has the statement,
                    // depends on answers still in flight (a failing Parse, DEALLOCATE ALL,
                    // a failed transaction): decide once they are in. The Flush makes the
                    // server send what it holds back for a Sync that may not come yet.
                    e.start_copying(at);
                    e.out.extend_from_slice(&[b'H', 0, 0, 0, 4]);
                    res.blocked = true;
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
                st.tracker.client_message(h.tag);
                let def = (!name.is_empty())
                    .then(|| st.statements.as_ref().and_then(|s| s.get(name).cloned()))
                    .flatten();
                let mut refused = false;
                match def {
                    Some(def) => {
                        e.start_copying(at);
                        // Does the client ask for the result's description in this same
                        // request (Bind, Describe, Execute, as libpq and psycopg do)?
                        let redescribes = whole && Header::peek(&data[end..]).is_some_and(|n| n.tag == b'D');
                        if ensure_prepared(&def, st, e.out, redescribes) {
                            write_bind_prefix(e.out, h.len, prefix, name_at, name_end, &def);
                            e.out.extend_from_slice(&prefix[name_end..]);
                            st.queue.push(Expect::NamedBind { hash: def.hash });
                            bound = Some(def.hash);
                        } else {
                            refused = true;
                        }
                    }
                    None => {
                        if name.is_empty() {
                            ensure_unnamed(st, &mut e, at);
                        }
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
                        ensure_prepared(&def, st, e.out, true);
                        write_describe_statement(e.out, &def);
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
                    let def = st.statements.as_mut().and_then(|s| {
                        let d = s.get(name).cloned();
                        s.remove(name);
                        d
                    });
                    st.queue.push(Expect::SynthClose {
                        client_name: name.into(),
                        def,
                    });
                } else {
                    e.forward(at, end);
                    st.queue.push(Expect::Forward(Kind::Close));
                }
            }
            b'Q' if ps && !whole && h.total() <= QUERY_SCAN_LIMIT => {
                res.want = h.total();
                break;
            }
            b'Q' if ps && whole && mentions_deallocate(&data[at + HEADER_LEN..end]) => {
                st.tracker.client_message(h.tag);
                simple_query_sent(st);
                let body = &data[at + HEADER_LEN..end];
                let text = body.strip_suffix(&[0]).unwrap_or(body);
                match rewrite_deallocates(text, st) {
                    Some((sql, plan)) => {
                        e.start_copying(at);
                        message(e.out, b'Q', |b| {
                            b.extend_from_slice(&sql);
                            b.push(0);
                        });
                        st.queue.push(Expect::DeallocQuery(plan));
                    }
                    None => {
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
                    b'E' => st.queue.push(Expect::Forward(Kind::Execute)),
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

/// A simple query destroys the unnamed statement, the client's and the server's.
fn simple_query_sent(st: &mut UpState) {
    st.unnamed.invalidate();
    st.server.unnamed_stmt = None;
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
    let Some((hash, body)) = st.unnamed.current() else {
        return false;
    };
    if st.server.unnamed_stmt == Some(hash) {
        return false;
    }
    e.start_copying(at);
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

/// A simple Query that DEALLOCATEs statements the client prepared with the protocol:
/// the server knows them under pgsilo's names, shared with other clients, so each such
/// `DEALLOCATE name` becomes `PREPARE pgsilo_dN AS SELECT; DEALLOCATE pgsilo_dN`.
/// PostgreSQL then answers in its own words and place: `DEALLOCATE`, or the error a
/// failed transaction gives, and nothing after an earlier statement's error. The
/// PREPARE's CommandComplete is swallowed. None when nothing needs rewriting (no such
/// name, DEALLOCATE ALL, text the splitter does not follow); the server answers as is.
fn rewrite_deallocates(text: &[u8], st: &mut UpState) -> Option<(Vec<u8>, Box<DeallocPlan>)> {
    let backslash_quotes = st.server.settings.get("standard_conforming_strings") == Some("off");
    let ranges = split_statements(text, backslash_quotes)?;
    let stmts = st.statements.as_deref_mut()?;
    let mut sql = Vec::with_capacity(text.len() + 64);
    let mut plan = DeallocPlan::default();
    let mut copied = 0;
    for (i, r) in ranges.into_iter().enumerate() {
        let Some(Deallocate::Name(name)) = parse_deallocate(&text[r.clone()]) else {
            continue;
        };
        // A name deallocated earlier in the same string is gone: the server says so.
        let Some(def) = stmts.get(&name).cloned() else {
            continue;
        };
        stmts.remove(&name);
        st.server.scratch_seq = st.server.scratch_seq.wrapping_add(1);
        let scratch = format!("pgsilo_d{}", st.server.scratch_seq);
        sql.extend_from_slice(&text[copied..r.start]);
        sql.extend_from_slice(format!(" PREPARE {scratch} AS SELECT; DEALLOCATE {scratch}").as_bytes());
        copied = r.end;
        // Each rewrite adds one statement before the ones that follow.
        let at = i + plan.swallow.len();
        plan.swallow.push(at);
        plan.dropped.push((at + 1, name.into(), def));
    }
    if plan.dropped.is_empty() {
        return None;
    }
    sql.extend_from_slice(&text[copied..]);
    Some((sql, Box::new(plan)))
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
                max_prepared: 200,
                retry: &mut self.retry,
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
        assert_eq!(
            text,
            "select ';'; PREPARE pgsilo_d1 AS SELECT; DEALLOCATE pgsilo_d1; PREPARE pgsilo_d2 AS SELECT; \
             DEALLOCATE pgsilo_d2; DEALLOCATE _pg3_0; DEALLOCATE nope"
        );
        assert!(f.stmts.is_empty());
        // Queries that name none of the client's statements pass as they are.
        f.queue.clear();
        let q = msg(b'Q', b"DEALLOCATE ALL; deallocate other\0");
        let (r, _) = f.run(&q, true);
        assert!(r.zero_copy);
        // A partial Query is read whole first.
        let (r, _) = f.run(&q[..10], true);
        assert_eq!((r.consumed, r.want), (0, q.len()));
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
