//! Server-to-client bytes: find message boundaries, follow ReadyForQuery and COPY,
//! record reported settings, and insert or drop the few messages pgsilo answers for
//! itself. As upstream, untouched chunks go out as the bytes that came in.

use super::expect::{Disposition, ExpectQueue};
use super::prepared::ClientStatements;
use super::retry::StaleRetry;
use super::tx_tracker::TxTracker;
use crate::metrics::ERRORS;
use crate::pool::prepared::invalidate;
use crate::pool::settings::{is_tracked_reported, parse_parameter_status};
use crate::pool::{ServerMeta, Settings};
use crate::protocol::framing::{Header, HEADER_LEN};
use crate::protocol::{ErrorFields, ProtocolError, SqlState};
use std::sync::Arc;

pub const SERVER_MESSAGE_LIMIT: u32 = i32::MAX as u32;

/// Where a client's RESET / DISCARD ALL stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Resetting {
    #[default]
    No,
    During,
    /// Finished; the server's settings need restoring to the client's.
    Done,
}

/// A ReadyForQuery pgsilo keeps from the client while it puts the session's settings
/// right, so that what the client was told (ParameterStatus) and what SHOW says agree
/// when the client goes on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hold {
    #[default]
    No,
    /// Held; the settings snapshot is still to be sent.
    Pending,
    /// The snapshot is running.
    Snapshot,
    /// The snapshot is in; the correction (if any) is still to be sent.
    Correct,
    /// The correction is running.
    Correcting,
}

pub struct DownState<'a> {
    /// Body bytes of a streamed message still to pass.
    pub skip: &'a mut usize,
    pub tracker: &'a mut TxTracker,
    pub queue: &'a mut ExpectQueue,
    pub statements: &'a mut ClientStatements,
    pub server: &'a mut ServerMeta,
    /// The settings this client expects (shared until changed), and those it logged in with.
    pub client_settings: &'a mut Arc<Settings>,
    pub initial: &'a Settings,
    /// Synthesized bytes, reused between calls.
    pub synth: &'a mut Vec<u8>,
    /// Set when the client LISTENs: notifications only reach it while it keeps this
    /// server, so transaction pooling keeps the server with the client from then on.
    pub pinned: &'a mut bool,
    /// Between a RESET / DISCARD ALL and its ReadyForQuery: settings the server reports
    /// go back to what this client logged in with (PostgreSQL's RESET semantics), not to
    /// the pooled server's own defaults.
    pub resetting: &'a mut Resetting,
    /// The client ran SET or RESET: what it changed may be a setting PostgreSQL does not
    /// report, so the session's settings are read back before the server is released.
    pub settings_changed: &'a mut bool,
    /// Rows of pgsilo's settings snapshot: (name, value).
    pub captured: &'a mut Vec<(String, String)>,
    /// The client's ReadyForQuery may be held (see [`Hold`]): the client has startup
    /// settings PostgreSQL's own RESET would not return to, and is still there.
    pub may_hold: bool,
    pub hold: &'a mut Hold,
    pub retry: &'a mut StaleRetry,
}

impl DownState<'_> {
    fn parameter_status(&mut self, body: &[u8]) {
        if let Some((name, value)) = parse_parameter_status(body) {
            self.server.settings.set(name, value);
            if !is_tracked_reported(&name.to_ascii_lowercase()) {
                return;
            }
            // The client changed it (SET) or the server did: either way the client now
            // has it. After RESET the client's own startup value is what it should have.
            let wanted = if *self.resetting == Resetting::During {
                self.initial.get(name).unwrap_or(value)
            } else {
                value
            };
            if self.client_settings.get(name) != Some(wanted) {
                let wanted = wanted.to_string();
                Arc::make_mut(self.client_settings).set(name, &wanted);
            }
        }
    }

    fn command_complete(&mut self, tag: &[u8]) {
        self.server.command_done(tag);
        match tag {
            b"DEALLOCATE ALL" => self.statements.clear(),
            b"DISCARD ALL" => {
                self.statements.clear();
                *self.resetting = Resetting::During;
                *self.settings_changed = true;
            }
            b"RESET" => {
                *self.resetting = Resetting::During;
                *self.settings_changed = true;
            }
            b"SET" => *self.settings_changed = true,
            b"LISTEN" => *self.pinned = true,
            _ => {}
        }
    }
}

/// PostgreSQL's verdict on a prepared statement whose objects changed under it: its
/// result type changed (0A000), or a type it refers to is gone (XX000).
fn stale_statement(code: &[u8; 5], body: &[u8]) -> Option<(SqlState, String)> {
    let prefix = match code {
        b"0A000" => "cached plan must not change result type",
        b"XX000" => "cache lookup failed",
        _ => return None,
    };
    let message = ErrorFields::parse(body).message;
    message.starts_with(prefix).then_some((SqlState(*code), message))
}

/// A DataRow of two text columns.
fn text_pair(body: &[u8]) -> Option<(String, String)> {
    let count = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
    if count != 2 {
        return None;
    }
    let mut at = 2;
    let mut col = || -> Option<String> {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        let len = usize::try_from(len).ok()?;
        let v = String::from_utf8_lossy(body.get(at..at + len)?).into_owned();
        at += len;
        Some(v)
    };
    Some((col()?, col()?))
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct DownResult {
    pub consumed: usize,
    /// Output is the consumed input as it is; otherwise it was appended to `out`.
    pub zero_copy: bool,
    pub ready_for_query: u32,
    pub xact_ends: u32,
    /// Bytes the buffer must hold to get past a message that must be read whole.
    pub want: usize,
}

/// Processes server bytes. When `out` already holds bytes waiting for the client, new
/// output is appended after them so order is kept.
pub fn process(data: &[u8], st: &mut DownState, out: &mut Vec<u8>) -> Result<DownResult, ProtocolError> {
    let mut res = DownResult::default();
    let mut copying = !out.is_empty();
    let mut at = 0;
    loop {
        if *st.skip > 0 {
            let n = (*st.skip).min(data.len() - at);
            if copying {
                out.extend_from_slice(&data[at..at + n]);
            }
            at += n;
            *st.skip -= n;
            if *st.skip > 0 {
                break;
            }
            continue;
        }
        let Some(h) = Header::peek(&data[at..]) else {
            res.want = HEADER_LEN;
            break;
        };
        h.validate(SERVER_MESSAGE_LIMIT)?;
        let have = data.len() - at;
        let whole = have >= h.total();
        // These are read whole (all small); anything else may stream through, except an
        // error pgsilo tells in the client's terms.
        if !whole
            && (matches!(h.tag, b'Z' | b'S' | b'C' | b'1' | b'2' | b'3' | b'n' | b'G')
                || (h.tag == b'E' && st.queue.errors_rewritten()))
        {
            res.want = h.total();
            break;
        }
        let body = &data[at + HEADER_LEN..at + h.total().min(have)];
        let mut stale: Option<crate::pool::prepared::StmtHash> = None;
        let mut client_error: Option<Vec<u8>> = None;
        if h.tag == b'D' && whole && st.queue.capturing() {
            if let Some(row) = text_pair(body) {
                st.captured.push(row);
            }
        }
        match h.tag {
            b'Z' => {
                if *st.resetting == Resetting::During {
                    // The server now has its own defaults; the client's values go back
                    // before its next request.
                    *st.resetting = Resetting::Done;
                }
                let status = body.first().copied();
                if status == Some(b'I') {
                    st.server.prepared.tx_ended();
                }
                st.tracker.server_message(b'Z', status);
                res.ready_for_query += 1;
                if status == Some(b'I') {
                    res.xact_ends += 1;
                }
            }
            b'S' => st.parameter_status(body),
            b'C' => st.command_complete(body.strip_suffix(&[0]).unwrap_or(body)),
            b'E' => {
                let code = whole.then(|| ErrorFields::code_of(body)).flatten();
                if whole {
                    client_error = st.queue.planned_error(code, body, st.server);
                }
                if let Some(code) = code {
                    ERRORS.count(code);
                    if let Some(hash) = st.queue.bind_in_flight() {
                        if let Some((code, message)) = stale_statement(&code, body) {
                            // Its text now means something else (a migration): no copy
                            // made before now is used again, on any server.
                            invalidate(hash, code, message);
                            st.server.prepared.spoil(hash);
                            stale = Some(hash);
                            log::info!(
                                "S-{}: a shared prepared statement is stale after a schema change; it is prepared again on next use",
                                st.server.id
                            );
                        }
                    }
                }
                st.server.prepared.tx_failed();
            }
            tag => st.tracker.server_message(tag, None),
        }
        st.synth.clear();
        let mut disposition = st.queue.server_message(h.tag, st.statements, st.server, st.synth);
        if let Some(error) = client_error {
            st.synth.extend_from_slice(&error);
            disposition = Disposition::Swallow;
        }
        // A request that failed only on a stale copy, with nothing else in flight: the
        // error and its ReadyForQuery are pgsilo's business; the request goes again.
        if let Some(hash) = stale {
            if st.retry.armed_for(hash) && st.queue.len() == 1 {
                st.retry.retrying();
                disposition = Disposition::Swallow;
            }
        } else if h.tag == b'Z' && st.retry.is_retrying() {
            st.retry.attempt_over();
            disposition = Disposition::Swallow;
        } else if h.tag == b'Z' && disposition == Disposition::Forward {
            st.retry.answered();
        }
        // The client's request ran SET, RESET or DISCARD ALL and nothing else is in
        // flight: its ReadyForQuery waits until the settings are known to be right. Only
        // outside a transaction block: a query of pgsilo's inside the client's
        // transaction would take its snapshot (SET TRANSACTION ISOLATION LEVEL / READ
        // WRITE would then fail, and REPEATABLE READ would see an earlier state).
        if h.tag == b'Z'
            && disposition == Disposition::Forward
            && st.may_hold
            && *st.settings_changed
            && *st.hold == Hold::No
            && st.queue.is_empty()
            && body.first() == Some(&b'I')
        {
            *st.hold = Hold::Pending;
            // The snapshot finds what RESET touched; it decides the correction.
            *st.resetting = Resetting::No;
            disposition = Disposition::Swallow;
        }
        if !st.synth.is_empty() || disposition == Disposition::Swallow {
            if !copying {
                out.extend_from_slice(&data[..at]);
                copying = true;
            }
            out.extend_from_slice(st.synth);
        }
        let end = at + h.total().min(have);
        if disposition == Disposition::Forward && copying {
            out.extend_from_slice(&data[at..end]);
        }
        if !whole {
            *st.skip = h.total() - have;
            at = end;
            break;
        }
        at = end;
        st.synth.clear();
        st.queue.flush_synth(st.synth);
        if !st.synth.is_empty() {
            if !copying {
                out.extend_from_slice(&data[..at]);
                copying = true;
            }
            out.extend_from_slice(st.synth);
        }
    }
    res.consumed = at;
    res.zero_copy = !copying;
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::expect::{Expect, Kind};

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    struct Fixture {
        skip: usize,
        tracker: TxTracker,
        queue: ExpectQueue,
        stmts: ClientStatements,
        server: ServerMeta,
        settings: Arc<Settings>,
        initial: Settings,
        synth: Vec<u8>,
        pinned: bool,
        resetting: Resetting,
        changed: bool,
        captured: Vec<(String, String)>,
        may_hold: bool,
        hold: Hold,
        retry: StaleRetry,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                skip: 0,
                tracker: TxTracker::default(),
                queue: ExpectQueue::default(),
                stmts: ClientStatements::default(),
                server: ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 1),
                settings: Arc::new(Settings::default()),
                initial: Settings::default(),
                synth: Vec::new(),
                pinned: false,
                resetting: Resetting::No,
                changed: false,
                captured: Vec::new(),
                may_hold: true,
                hold: Hold::No,
                retry: StaleRetry::default(),
            }
        }

        fn run(&mut self, data: &[u8], out: &mut Vec<u8>) -> DownResult {
            let mut st = DownState {
                skip: &mut self.skip,
                tracker: &mut self.tracker,
                queue: &mut self.queue,
                statements: &mut self.stmts,
                server: &mut self.server,
                client_settings: &mut self.settings,
                initial: &self.initial,
                synth: &mut self.synth,
                pinned: &mut self.pinned,
                resetting: &mut self.resetting,
                settings_changed: &mut self.changed,
                captured: &mut self.captured,
                may_hold: self.may_hold,
                hold: &mut self.hold,
                retry: &mut self.retry,
            };
            process(data, &mut st, out).unwrap()
        }
    }

    #[test]
    fn plain_responses_are_not_copied() {
        let mut f = Fixture::new();
        f.tracker.client_message(b'Q');
        f.queue.push(Expect::Forward(Kind::Query));
        let mut data = msg(b'T', b"\0\0");
        data.extend(msg(b'D', b"\0\0"));
        data.extend(msg(b'S', b"TimeZone\0UTC\0"));
        data.extend(msg(b'C', b"SELECT 1\0"));
        data.extend(msg(b'Z', b"I"));
        let mut out = Vec::new();
        let r = f.run(&data, &mut out);
        assert!(r.zero_copy);
        assert_eq!(r.consumed, data.len());
        assert_eq!(r.xact_ends, 1);
        assert!(f.tracker.is_idle());
        assert_eq!(f.settings.get("timezone"), Some("UTC"));
        assert_eq!(f.server.settings.get("TimeZone"), Some("UTC"));
    }

    #[test]
    fn reset_returns_reported_settings_to_the_startup_values() {
        let mut f = Fixture::new();
        // A client whose ReadyForQuery is not held: the correction comes after it.
        f.may_hold = false;
        f.initial.set("TimeZone", "Asia/Tokyo");
        Arc::make_mut(&mut f.settings).set("TimeZone", "America/New_York");
        let mut data = msg(b'C', b"RESET\0");
        data.extend(msg(b'S', b"TimeZone\0Etc/UTC\0"));
        data.extend(msg(b'Z', b"I"));
        data.extend(msg(b'S', b"TimeZone\0Europe/Paris\0"));
        let mut out = Vec::new();
        f.run(&data, &mut out);
        // During the RESET: the client's startup value; the server has its default.
        assert_eq!(f.server.settings.get("TimeZone"), Some("Europe/Paris"));
        assert_eq!(f.settings.get("TimeZone"), Some("Europe/Paris"));
        assert_eq!(f.resetting, Resetting::Done);
    }

    #[test]
    fn snapshot_rows_are_captured_and_swallowed() {
        use crate::proxy::expect::{Expect, Injected};
        let mut f = Fixture::new();
        f.queue.push(Expect::InjectedQuery(Injected::Snapshot));
        let mut row = vec![0, 2];
        for v in [&b"work_mem"[..], b"64MB"] {
            row.extend_from_slice(&(v.len() as i32).to_be_bytes());
            row.extend_from_slice(v);
        }
        let mut data = msg(b'T', b"\0\0");
        data.extend(msg(b'D', &row));
        data.extend(msg(b'C', b"SELECT 1\0"));
        data.extend(msg(b'Z', b"I"));
        let mut out = Vec::new();
        f.run(&data, &mut out);
        assert!(out.is_empty());
        assert_eq!(f.captured, vec![("work_mem".to_string(), "64MB".to_string())]);
        assert_eq!(f.queue.finished, Some(Injected::Snapshot));
    }

    #[test]
    fn listen_pins_the_server() {
        let mut f = Fixture::new();
        let mut out = Vec::new();
        f.run(&msg(b'C', b"LISTEN\0"), &mut out);
        assert!(f.pinned);
    }

    #[test]
    fn deallocate_all_forgets_statements() {
        let mut f = Fixture::new();
        f.server.prepared.insert(5, 1, 10);
        f.stmts
            .insert(b"s", std::rc::Rc::new(crate::proxy::prepared::StmtDef::new(b"x\0\0\0")));
        let mut out = Vec::new();
        f.run(&msg(b'C', b"DEALLOCATE ALL\0"), &mut out);
        assert!(f.server.prepared.is_empty());
        assert!(f.stmts.is_empty());
    }

    #[test]
    fn swallows_injected_parse_complete_and_inserts_synthesized_ones() {
        let mut f = Fixture::new();
        f.queue.push(Expect::InjectedParse { hash: 1 });
        f.queue.push(Expect::Forward(Kind::Bind));
        f.queue.push(Expect::SynthClose {
            client_name: b"x".to_vec().into(),
            def: None,
            sql: None,
        });
        f.queue.push(Expect::Forward(Kind::Sync));
        let mut data = msg(b'1', b"");
        data.extend(msg(b'2', b""));
        data.extend(msg(b'Z', b"I"));
        let mut out = Vec::new();
        let r = f.run(&data, &mut out);
        assert!(!r.zero_copy);
        let mut expect = msg(b'2', b"");
        expect.extend(msg(b'3', b""));
        expect.extend(msg(b'Z', b"I"));
        assert_eq!(out, expect);
    }

    #[test]
    fn waits_for_a_whole_ready_for_query_and_streams_big_rows() {
        let mut f = Fixture::new();
        let row = msg(b'D', &vec![1u8; 9000]);
        let mut out = Vec::new();
        let r = f.run(&row[..4000], &mut out);
        assert_eq!(r.consumed, 4000);
        assert_eq!(f.skip, row.len() - 4000);
        f.skip = 0;
        let z = msg(b'Z', b"I");
        let r = f.run(&z[..3], &mut out);
        assert_eq!(r.consumed, 0);
        assert_eq!(r.want, 5);
    }

    #[test]
    fn appends_after_output_already_waiting() {
        let mut f = Fixture::new();
        let mut out = b"earlier".to_vec();
        let data = msg(b'N', b"\0");
        let r = f.run(&data, &mut out);
        assert!(!r.zero_copy);
        assert_eq!(&out[7..], &data[..]);
    }

    #[test]
    fn ready_for_query_after_a_reset_is_held_until_settings_are_right() {
        let mut f = Fixture::new();
        f.tracker.client_message(b'Q');
        f.queue.push(Expect::Forward(Kind::Query));
        let mut data = msg(b'C', b"RESET\0");
        data.extend(msg(b'Z', b"I"));
        let mut out = Vec::new();
        let r = f.run(&data, &mut out);
        assert_eq!(
            out,
            msg(b'C', b"RESET\0"),
            "CommandComplete goes on, ReadyForQuery waits"
        );
        assert_eq!(r.ready_for_query, 1);
        assert_eq!(f.hold, Hold::Pending);
        assert_eq!(f.resetting, Resetting::No);
        // Not held inside a transaction block, nor with more requests in flight.
        let mut f = Fixture::new();
        f.changed = true;
        let mut out = Vec::new();
        for status in [b"T", b"E"] {
            f.queue.push(Expect::Forward(Kind::Query));
            f.run(&msg(b'Z', status), &mut out);
            assert_eq!(f.hold, Hold::No);
        }
        f.queue.push(Expect::Forward(Kind::Query));
        f.queue.push(Expect::Forward(Kind::Query));
        f.run(&msg(b'Z', b"I"), &mut out);
        assert_eq!(f.hold, Hold::No);
    }
}
