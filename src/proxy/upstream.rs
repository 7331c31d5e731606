//! Client-to-server bytes: find message boundaries, keep the transaction tracker and the
//! expected-response queue current, and rewrite named prepared statements. Messages
//! that need no change go out as the bytes that came in; only when something must change
//! does the chunk get copied into an output buffer.

use std::rc::Rc;

use super::expect::{Expect, ExpectQueue, Kind};
use super::prepared::{
    bind_statement, split_parse, target, write_bind_prefix, write_close_statement, write_describe_statement,
    write_parse, write_unnamed_parse, ClientStatements, StmtDef, UnnamedStmt,
};
use super::tx_tracker::TxTracker;
use crate::pool::ServerMeta;
use crate::protocol::backend::{error_response, Severity};
use crate::protocol::framing::{Header, HEADER_LEN};
use crate::protocol::{ProtocolError, SqlState};

/// PostgreSQL refuses larger messages from clients (PQ_LARGE_MESSAGE_LIMIT).
pub const CLIENT_MESSAGE_LIMIT: u32 = 1 << 30;

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

        if st.queue.skipping {
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
                if name.is_empty() {
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
                match def {
                    Some(def) => {
                        e.start_copying(at);
                        ensure_prepared(&def, st, e.out);
                        write_bind_prefix(e.out, h.len, prefix, name_at, name_end, &def);
                        e.out.extend_from_slice(&prefix[name_end..]);
                    }
                    None if name.is_empty() && ensure_unnamed(st, &mut e, at) => {
                        e.forward(at, end);
                    }
                    None => e.forward(at, end),
                }
                st.queue.push(Expect::Forward(Kind::Bind));
                if !whole {
                    st.cur.skip = h.total() - have;
                    st.cur.dropping = false;
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
                        ensure_prepared(&def, st, e.out);
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
                        // A simple query destroys the unnamed statement.
                        st.unnamed.invalidate();
                        st.server.unnamed_stmt = None;
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
        at = end;
        if !whole {
            break;
        }
    }
    res.consumed = at;
    res.zero_copy = !e.copying;
    Ok(res)
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
            SqlState("25P02"),
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
    if st.server.prepared.touch(def.hash) {
        st.queue.push(Expect::SynthParse {
            client_name: name.into(),
        });
        return;
    }
    if let Some(evicted) = st.server.prepared.insert(def.hash, st.max_prepared) {
        write_close_statement(out, evicted);
        st.queue.push(Expect::InjectedClose { hash: evicted });
    }
    write_parse(out, &def);
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

/// Makes sure the server has `def` before a message that uses it.
fn ensure_prepared(def: &StmtDef, st: &mut UpState, out: &mut Vec<u8>) {
    if st.server.prepared.touch(def.hash) {
        return;
    }
    if let Some(evicted) = st.server.prepared.insert(def.hash, st.max_prepared) {
        write_close_statement(out, evicted);
        st.queue.push(Expect::InjectedClose { hash: evicted });
    }
    write_parse(out, def);
    st.queue.push(Expect::InjectedParse { hash: def.hash });
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
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                cur: UpCursor::default(),
                tracker: TxTracker::default(),
                queue: ExpectQueue::default(),
                stmts: ClientStatements::default(),
                unnamed: UnnamedStmt::default(),
                server: ServerMeta::new("127.0.0.1:5432".parse().unwrap(), 1),
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
    fn named_parse_is_renamed_then_answered_locally_on_the_same_server() {
        let mut f = Fixture::new();
        let mut data = msg(b'P', b"s1\0select 1\0\0\0");
        data.extend(msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
        data.extend(msg(b'E', b"\0\0\0\0\0"));
        data.extend(msg(b'S', b""));
        let (r, out) = f.run(&data, true);
        assert!(!r.zero_copy);
        assert_eq!(tags(&out), b"PBES");
        assert!(out.windows(7).any(|w| w == b"pgsilo_"));
        // Once answered, a second statement with the same text on the same server: no
        // Parse sent.
        f.queue.clear();
        let mut data2 = msg(b'P', b"s2\0select 1\0\0\0");
        data2.extend(msg(b'S', b""));
        let (_, out2) = f.run(&data2, true);
        assert_eq!(tags(&out2), b"S");
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
        f.server = ServerMeta::new("127.0.0.1:5432".parse().unwrap(), 2);
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
        f.server = ServerMeta::new("127.0.0.1:5432".parse().unwrap(), 3);
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
}
