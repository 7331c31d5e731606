//! What the fuzz targets share: splitting one fuzz input into several messages, building
//! and checking wire messages, and a session's byte-processor state on in-memory bytes
//! (the fields `proxy/session` keeps for `upstream::process` and `downstream::process`).

use std::sync::Arc;

use pgsilo::pool::{ServerMeta, Settings};
use pgsilo::protocol::framing::{scan, Scan};
use pgsilo::protocol::ProtocolError;
use pgsilo::proxy::downstream::{self, DownResult, DownState, Hold, Resetting};
use pgsilo::proxy::expect::ExpectQueue;
use pgsilo::proxy::prepared::{ClientStatements, UnnamedStmt};
use pgsilo::proxy::retry::StaleRetry;
use pgsilo::proxy::tx_tracker::TxTracker;
use pgsilo::proxy::upstream::{self, UpCursor, UpResult, UpState};

/// A regular message: type byte, length, body.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Panics unless `bytes` is a run of whole messages with sane lengths: what pgsilo itself
/// writes must never be cut or malformed.
pub fn assert_whole_messages(bytes: &[u8]) {
    let mut at = 0;
    while at < bytes.len() {
        match scan(&bytes[at..]) {
            Scan::Whole(h) => {
                assert!(h.len >= 4, "pgsilo wrote a message of length {}", h.len);
                at += h.total();
            }
            Scan::Partial { .. } => panic!("pgsilo wrote a cut message at {at} of {}", bytes.len()),
        }
    }
}

/// Splits a fuzz input into `n` parts at NUL bytes (text messages hold none); missing
/// parts are empty.
pub fn split_nul(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts: Vec<&[u8]> = data.splitn(n, |&b| b == 0).collect();
    parts.resize(n, &[]);
    parts
}

/// `text` with every `listen_addr` key renamed: a listen_addr that is not an IP address
/// is a host name the loader resolves (DNS), which would make the config targets slow,
/// flaky and a load on the machine's resolver. The name keeps its length, so positions
/// in messages stay as they were.
pub fn without_name_lookups(text: &str) -> String {
    let mut bytes = text.as_bytes().to_vec();
    let key = b"listen_addr";
    let mut i = 0;
    while i + key.len() <= bytes.len() {
        if bytes[i..i + key.len()].eq_ignore_ascii_case(key) {
            bytes[i + key.len() - 1] = b'_';
            i += key.len();
        } else {
            i += 1;
        }
    }
    // Only ASCII letters were replaced by an ASCII byte: still UTF-8.
    String::from_utf8(bytes).unwrap_or_default()
}

/// The state a session keeps for its two byte processors while a server is attached.
pub struct Session {
    pub cur: UpCursor,
    pub tracker: TxTracker,
    pub queue: ExpectQueue,
    pub statements: ClientStatements,
    pub unnamed: UnnamedStmt,
    pub server: ServerMeta,
    pub retry: StaleRetry,
    pub skip: usize,
    pub client_settings: Arc<Settings>,
    pub initial: Settings,
    pub synth: Vec<u8>,
    pub pinned: bool,
    pub resetting: Resetting,
    pub settings_changed: bool,
    pub captured: Vec<(String, String)>,
    pub hold: Hold,
    /// Statement tracking (transaction pooling with max_prepared_statements > 0).
    pub track_statements: bool,
    pub max_prepared: usize,
    pub listen_here: bool,
    pub may_hold: bool,
}

impl Session {
    pub fn new(track_statements: bool, max_prepared: usize) -> Session {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 5432));
        Session {
            cur: UpCursor::default(),
            tracker: TxTracker::default(),
            queue: ExpectQueue::default(),
            statements: ClientStatements::default(),
            unnamed: UnnamedStmt::default(),
            server: ServerMeta::new(pgsilo::net::Endpoint::Tcp(addr), 1),
            retry: StaleRetry::default(),
            skip: 0,
            client_settings: Arc::new(Settings::default()),
            initial: Settings::default(),
            synth: Vec::new(),
            pinned: false,
            resetting: Resetting::No,
            settings_changed: false,
            captured: Vec::new(),
            hold: Hold::No,
            track_statements,
            max_prepared,
            listen_here: track_statements,
            may_hold: true,
        }
    }

    /// Client bytes for the server: `upstream::process`; `out` must be empty.
    pub fn up(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<UpResult, ProtocolError> {
        let mut st = UpState {
            cur: &mut self.cur,
            tracker: &mut self.tracker,
            queue: &mut self.queue,
            statements: if self.track_statements {
                Some(&mut self.statements)
            } else {
                None
            },
            unnamed: &mut self.unnamed,
            server: &mut self.server,
            max_prepared: self.max_prepared,
            retry: &mut self.retry,
            listen_here: self.listen_here && !self.pinned,
        };
        upstream::process(data, &mut st, out)
    }

    /// Server bytes for the client: `downstream::process`; output goes after what `out`
    /// already holds.
    pub fn down(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<DownResult, ProtocolError> {
        let mut st = DownState {
            skip: &mut self.skip,
            tracker: &mut self.tracker,
            queue: &mut self.queue,
            statements: &mut self.statements,
            server: &mut self.server,
            client_settings: &mut self.client_settings,
            initial: &self.initial,
            synth: &mut self.synth,
            pinned: &mut self.pinned,
            resetting: &mut self.resetting,
            settings_changed: &mut self.settings_changed,
            captured: &mut self.captured,
            may_hold: self.may_hold,
            hold: &mut self.hold,
            retry: &mut self.retry,
        };
        downstream::process(data, &mut st, out)
    }
}
