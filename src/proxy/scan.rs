//! Header scans over buffered bytes, one per direction. They decide how many bytes may be
//! forwarded now, feed the transaction tracker, and look inside only the few messages a
//! pooler must read (ReadyForQuery's status byte, ParameterStatus, COPY starts).
//! A message too big for the buffer streams through: its header is seen once, the rest of
//! its body is counted off as it passes.

use super::tx_tracker::TxTracker;
use crate::protocol::framing::{Header, HEADER_LEN};
use crate::protocol::ProtocolError;

/// PostgreSQL refuses larger messages from clients (PQ_LARGE_MESSAGE_LIMIT).
pub const CLIENT_MESSAGE_LIMIT: u32 = 1 << 30;
pub const SERVER_MESSAGE_LIMIT: u32 = i32::MAX as u32;

/// Streaming state of one direction.
#[derive(Default, Debug)]
pub struct Cursor {
    /// Body bytes of a message already announced (and counted) that are still to pass.
    pub skip: usize,
}

#[derive(Default, Debug, PartialEq, Eq)]
pub struct ClientScan {
    /// Bytes at the front that may go to the server now.
    pub ready: usize,
    /// Something among them needs a server (anything but stray COPY data or Flush).
    pub needs_server: bool,
    /// The client sent Terminate at offset `ready`; nothing after it matters.
    pub terminate: bool,
}

/// Scans client bytes. `data` starts at the first byte not yet scanned.
pub fn scan_client(
    data: &[u8],
    cur: &mut Cursor,
    tracker: &mut TxTracker,
) -> Result<ClientScan, ProtocolError> {
    let mut out = ClientScan::default();
    let mut at = take_skip(data.len(), cur);
    if at > 0 {
        out.needs_server = true;
    }
    while let Some(h) = Header::peek(&data[at..]) {
        h.validate(CLIENT_MESSAGE_LIMIT)?;
        if h.tag == b'X' {
            out.terminate = true;
            break;
        }
        tracker.client_message(h.tag);
        if !matches!(h.tag, b'd' | b'c' | b'f' | b'H') {
            out.needs_server = true;
        }
        let have = data.len() - at;
        if have >= h.total() {
            at += h.total();
        } else {
            cur.skip = h.total() - have;
            at = data.len();
            break;
        }
    }
    out.ready = at;
    Ok(out)
}

/// What one pass over server bytes found.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct ServerScan {
    /// Bytes at the front that may go to the client now.
    pub ready: usize,
    /// ReadyForQuery messages seen, and how many of them closed a transaction.
    pub ready_for_query: u32,
    pub xact_ends: u32,
}

/// What the session wants told about messages it must read whole.
pub trait ServerEvents {
    fn parameter_status(&mut self, body: &[u8]);
    fn error(&mut self, body: &[u8]);
}

/// Scans server bytes. A ReadyForQuery or ParameterStatus cut off by the end of the
/// buffer stops the scan there, so the caller reads more before forwarding it.
pub fn scan_server(
    data: &[u8],
    cur: &mut Cursor,
    tracker: &mut TxTracker,
    events: &mut impl ServerEvents,
) -> Result<ServerScan, ProtocolError> {
    let mut out = ServerScan::default();
    let mut at = take_skip(data.len(), cur);
    while let Some(h) = Header::peek(&data[at..]) {
        h.validate(SERVER_MESSAGE_LIMIT)?;
        let have = data.len() - at;
        let whole = have >= h.total();
        match h.tag {
            b'Z' | b'S' if !whole => break,
            b'Z' => {
                let status = data.get(at + HEADER_LEN).copied();
                tracker.server_message(b'Z', status);
                out.ready_for_query += 1;
                if status == Some(b'I') {
                    out.xact_ends += 1;
                }
            }
            b'S' => events.parameter_status(&data[at + HEADER_LEN..at + h.total()]),
            b'E' if whole => events.error(&data[at + HEADER_LEN..at + h.total()]),
            tag => tracker.server_message(tag, None),
        }
        if whole {
            at += h.total();
        } else {
            cur.skip = h.total() - have;
            at = data.len();
            break;
        }
    }
    out.ready = at;
    Ok(out)
}

/// Counts off the streamed remainder of a message; returns how many bytes it covered.
#[inline]
fn take_skip(len: usize, cur: &mut Cursor) -> usize {
    let n = cur.skip.min(len);
    cur.skip -= n;
    n
}

/// How many more bytes the buffer must hold before the scan can move past a cut-off
/// message it must read whole (0 if there is none).
pub fn bytes_wanted(rest: &[u8]) -> usize {
    match Header::peek(rest) {
        Some(h) if rest.len() < h.total() => h.total(),
        Some(_) => 0,
        None => HEADER_LEN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[derive(Default)]
    struct Seen {
        params: Vec<Vec<u8>>,
        errors: usize,
    }

    impl ServerEvents for Seen {
        fn parameter_status(&mut self, body: &[u8]) {
            self.params.push(body.to_vec());
        }
        fn error(&mut self, _: &[u8]) {
            self.errors += 1;
        }
    }

    #[test]
    fn client_scan_forwards_whole_messages_and_keeps_a_split_header() {
        let mut data = msg(b'Q', b"select 1\0");
        let q_len = data.len();
        data.extend_from_slice(&msg(b'Q', b"select 2\0")[..3]);
        let mut cur = Cursor::default();
        let mut t = TxTracker::default();
        let s = scan_client(&data, &mut cur, &mut t).unwrap();
        assert_eq!(s.ready, q_len);
        assert!(s.needs_server);
        assert_eq!(t.outstanding(), 1);
    }

    #[test]
    fn client_scan_streams_a_large_message() {
        let big = msg(b'd', &vec![7u8; 10_000]);
        let mut cur = Cursor::default();
        let mut t = TxTracker::default();
        let s = scan_client(&big[..4096], &mut cur, &mut t).unwrap();
        assert_eq!(s.ready, 4096);
        assert_eq!(cur.skip, big.len() - 4096);
        let s = scan_client(&big[4096..8192], &mut cur, &mut t).unwrap();
        assert_eq!(s.ready, 4096);
        let mut rest = big[8192..].to_vec();
        rest.extend(msg(b'c', b""));
        let s = scan_client(&rest, &mut cur, &mut t).unwrap();
        assert_eq!(s.ready, rest.len());
        assert_eq!(cur.skip, 0);
    }

    #[test]
    fn client_scan_stops_at_terminate_and_spots_stray_copy_data() {
        let mut data = msg(b'd', b"x");
        data.extend(msg(b'X', b""));
        let mut cur = Cursor::default();
        let mut t = TxTracker::default();
        let s = scan_client(&data, &mut cur, &mut t).unwrap();
        assert!(s.terminate);
        assert!(!s.needs_server);
        assert_eq!(s.ready, 6);
    }

    #[test]
    fn client_scan_rejects_bad_lengths() {
        let mut cur = Cursor::default();
        let mut t = TxTracker::default();
        assert!(scan_client(&[b'Q', 0, 0, 0, 2], &mut cur, &mut t).is_err());
        assert!(scan_client(&[b'Q', 0x7f, 0xff, 0xff, 0xff], &mut cur, &mut t).is_err());
    }

    #[test]
    fn server_scan_waits_for_a_whole_ready_for_query() {
        let mut data = msg(b'C', b"SELECT 1\0");
        let c_len = data.len();
        let z = msg(b'Z', b"I");
        data.extend_from_slice(&z[..5]);
        let mut cur = Cursor::default();
        let mut t = TxTracker::default();
        t.client_message(b'Q');
        let mut seen = Seen::default();
        let s = scan_server(&data, &mut cur, &mut t, &mut seen).unwrap();
        assert_eq!(s.ready, c_len);
        assert!(!t.is_idle());
        data.push(b'I');
        let s = scan_server(&data[c_len..], &mut cur, &mut t, &mut seen).unwrap();
        assert_eq!(s.ready, 6);
        assert_eq!(s.xact_ends, 1);
        assert!(t.is_idle());
    }

    #[test]
    fn server_scan_reports_parameter_status_and_errors() {
        let mut data = msg(b'S', b"TimeZone\0UTC\0");
        data.extend(msg(b'E', b"SERROR\0C42601\0\0"));
        data.extend(msg(b'Z', b"E"));
        let mut cur = Cursor::default();
        let mut t = TxTracker::default();
        t.client_message(b'Q');
        let mut seen = Seen::default();
        let s = scan_server(&data, &mut cur, &mut t, &mut seen).unwrap();
        assert_eq!(s.ready, data.len());
        assert_eq!(seen.params, vec![b"TimeZone\0UTC\0".to_vec()]);
        assert_eq!(seen.errors, 1);
        assert_eq!(t.status(), b'E');
    }

    #[test]
    fn server_scan_streams_large_rows() {
        let row = msg(b'D', &vec![1u8; 9000]);
        let mut cur = Cursor::default();
        let mut t = TxTracker::default();
        let mut seen = Seen::default();
        let s = scan_server(&row[..4000], &mut cur, &mut t, &mut seen).unwrap();
        assert_eq!(s.ready, 4000);
        assert_eq!(cur.skip, row.len() - 4000);
    }

    #[test]
    fn bytes_wanted_reports_what_a_cut_message_needs() {
        assert_eq!(bytes_wanted(&[b'S', 0]), 5);
        assert_eq!(bytes_wanted(&[b'S', 0, 0, 0, 20]), 21);
        assert_eq!(bytes_wanted(&msg(b'Z', b"I")), 0);
    }
}
