//! A logged-in client: forwarding in both directions, attaching a server when the client
//! needs one and handing it back when the pool mode allows, cleaning up when either side
//! leaves.
//!
//! Four owned I/O operations can be in flight: reading the client or writing the server
//! (one slot, in turn), reading the server, and writing the client. Each is kept alive
//! across loop turns rather than raced and dropped: an io_uring read that is cancelled
//! may already have consumed bytes, so no read is abandoned while the session runs.
//!
//! This file holds the session's state (`Flow` and the groups it is made of) and its
//! top level, [`serve`]. The rest, one concern a file:
//! - `ops.rs`: the owned I/O operations, which take a half and a buffer and give both back;
//! - `idle.rs`: waiting for the client with no server and no buffer;
//! - `forward.rs`: the forwarding loop (an active stretch): it arms the operations, waits
//!   for the next event, and does what the event handler decided;
//! - `events.rs`: one handler per event kind;
//! - `up.rs` (client to server) and `down.rs` (server to client): the two paths' buffers;
//! - `attach.rs`: getting a server, and handing it back;
//! - `listen.rs`: LISTEN/UNLISTEN answered by pgsilo, notifications written between
//!   transactions;
//! - `settings.rs`: pgsilo's own queries that carry the client's settings across servers;
//! - `departure.rs`: a client or a server that leaves while the other is still there;
//! - `deadline.rs`: the session's timeouts; `tally.rs`: its counts for the pool's stats;
//! - tests only: `testkit.rs` (a worker, clients and servers on Unix socket pairs) and
//!   `scenarios.rs` (whole sessions).

mod attach;
mod deadline;
mod departure;
mod down;
mod events;
mod forward;
mod idle;
mod listen;
mod ops;
mod settings;
mod tally;
mod up;

#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod testkit;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use monoio::io::{AsyncWriteRentExt, Canceller, Splitable};

use self::attach::Attached;
use self::deadline::Timeouts;
use self::tally::Tally;
use self::up::UpWrite;
use super::downstream::{Hold, Resetting};
use super::expect::ExpectQueue;
use super::login::LoggedIn;
use super::prepared::{ClientStatements, UnnamedStmt};
use super::retry::StaleRetry;
use super::tx_tracker::TxTracker;
use super::upstream::UpCursor;
use super::SessionError;
use crate::config::PoolMode;
use crate::context::control::SessionSignal;
use crate::context::WorkerCtx;
use crate::metrics::{ConnState, WorkerPoolStats};
use crate::net::{Stream, StreamRd, StreamWr};
use crate::pool::Settings;
use crate::protocol::backend::{self, Severity};
use crate::protocol::{BufPool, MsgBuf};

type ClientRd = StreamRd;
type ClientWr = StreamWr;

/// A client session's whole state. Grouped by concern; the groups' methods live in the
/// files named above.
struct Flow {
    who: LoggedIn,
    conf: Conf,
    /// The worker's forwarding buffers.
    bufs: Rc<BufPool>,
    client: Client,
    server: Option<Attached>,
    up: Up,
    down: Down,

    /// Where the server stands, from message types alone: requests owed, transaction status.
    tracker: TxTracker,
    /// The answers the server owes, in order, and what to do with each.
    queue: ExpectQueue,
    statements: ClientStatements,
    unnamed: UnnamedStmt,
    /// A request that failed on a stale shared statement, to be sent again.
    retry: StaleRetry,
    /// The client LISTENed on a server (a LISTEN pgsilo did not answer itself, see
    /// `listen.rs`): it keeps its server until it leaves, whatever the pool mode.
    pinned: bool,
    listen: Listen,
    params: Params,

    signal: Rc<SessionSignal>,
    /// Shutting down: end the session at the first moment no transaction is open.
    draining: bool,
    /// The client has been quiet: go idle (see [`Flow::idle_wait`]) when nothing is owed.
    shrink: bool,
    /// A departed client's server has been sent its ROLLBACK (or empty query).
    rollback_sent: bool,
    timing: Timing,
    tally: Tally,
}

/// The client's LISTENs through the pool's listener connection (`context::listen`).
struct Listen {
    instance: Arc<crate::context::Instance>,
    worker: usize,
    subscribers: Rc<crate::context::control::Subscribers>,
    /// Set at the client's first LISTEN; dropped with the session, which unsubscribes it.
    subscription: Option<crate::context::listen::Subscription>,
}

/// The configuration as the session began; a reload applies to sessions that begin
/// after it.
struct Conf {
    mode: PoolMode,
    pkt_buf: usize,
    /// server_reset_query ("" for none).
    reset_query: String,
    reset_always: bool,
    /// Named statements are renamed and carried across servers (transaction pooling).
    track_statements: bool,
    max_prepared: usize,
}

/// The client's end of the session.
struct Client {
    rd: Option<ClientRd>,
    wr: Option<ClientWr>,
    /// No more reads from the client: it sent Terminate, closed, or failed.
    gone: bool,
    /// Calls off the client read when shrinking; one for the session's life, so a read
    /// costs no allocation for it.
    read_stop: Canceller,
}

/// Client to server: what the client sent, what pgsilo rewrote of it, and what the up
/// slot is writing.
struct Up {
    /// Client bytes not yet dealt with.
    buf: Option<MsgBuf>,
    /// Rewritten client output for the server.
    out: Option<MsgBuf>,
    /// What the server write in flight (or about to start) takes its bytes from.
    write: Option<UpWrite>,
    /// Bytes `buf` must hold before processing can go on; 0 once the client sent more.
    want: usize,
    /// A message partly passed to the server, its rest still to come from the client.
    cur: UpCursor,
    /// A named Parse waits for the answers to everything sent before it.
    blocked: bool,
}

/// Server to client: what the server sent, how far it is dealt with, and the output
/// pgsilo built for the client.
struct Down {
    /// Server bytes: the first `fwd` are processed and go to the client as they are;
    /// `partial` more are the start of a message still arriving.
    buf: Option<MsgBuf>,
    fwd: usize,
    partial: usize,
    /// Body bytes of a streamed server message still to pass.
    skip: usize,
    /// Client output pgsilo built (rewritten or synthesized), in order after `fwd`.
    pend: MsgBuf,
    /// The buffer lent to the client write when it writes `pend`'s content.
    spare: Option<MsgBuf>,
    /// Answers pgsilo gives the client itself, reused between calls.
    synth: Vec<u8>,
}

/// The client's settings as pgsilo carries them from server to server (the settings
/// themselves are `who.settings`).
struct Params {
    /// What a fresh server of the pool reports at login.
    welcome: Arc<Settings>,
    /// What the client logged in with: where RESET takes it back to.
    initial: Arc<Settings>,
    /// A RESET / DISCARD ALL in progress, or finished and leaving the server with its
    /// own defaults where the client should have its startup values.
    resetting: Resetting,
    /// The client ran SET or RESET in this transaction (see apply_snapshot).
    changed: bool,
    /// The client connected with settings that differ from the server's defaults, so a
    /// RESET on the server does not return it to them: its ReadyForQuery after a SET,
    /// RESET or DISCARD ALL waits until pgsilo has put them right.
    reset_care: bool,
    hold: Hold,
    /// Rows of pgsilo's settings snapshot: (name, value).
    captured: Vec<(String, String)>,
}

/// The session's timeouts and the moments they count from, which the pool's timing
/// stats also use.
struct Timing {
    timeouts: Timeouts,
    /// Last time the client sent anything (kept only when client_idle_timeout is on).
    last_activity: Instant,
    /// Since when the server has sat in a transaction with nothing in flight.
    quiet_since: Option<Instant>,
    /// When the request now in flight was sent, when its transaction began, and when
    /// the client started waiting for a server.
    req_started: Option<Instant>,
    xact_started: Option<Instant>,
    wait_started: Option<Instant>,
    /// The client waiting for a server is watched for a hang-up (see
    /// `deadline::PROBE_AFTER`).
    probing: bool,
    /// A departed client's ROLLBACK is given up on (and the server closed) at this time.
    rollback_deadline: Option<Instant>,
}

pub async fn serve(ctx: Rc<WorkerCtx>, stream: Stream, mut who: LoggedIn) -> Result<(), SessionError> {
    let bound = who.bound.take();
    WorkerPoolStats::add(&who.pool.stats().clients, 1);
    who.entry.entry.set_state(ConnState::Active);
    let mut flow = Flow::new(&ctx, stream, who);
    let result = match bound {
        // Bound at login (session mode): the client's settings go on it first.
        Some(conn) => Box::pin(flow.sync_then_plug(conn)).await,
        None => Ok(()),
    };
    let result = match result {
        Ok(()) => flow.serve().await,
        Err(e) => Err(e),
    };
    flow.finish_tally();
    if let Err(e) = &result {
        if let (Some((code, message)), Some(mut wr)) = (e.client_error(), flow.client.wr.take()) {
            let mut out = Vec::with_capacity(64 + message.len());
            backend::error_response(&mut out, Severity::Fatal, code, &message);
            let _ = Box::pin(wr.write_all(out)).await;
        }
    }
    result
}

/// How a stretch of activity ended.
enum Stretch {
    /// The session owes nothing and has no server: wait cheaply for the client.
    Idle,
    /// The session is over.
    Done,
}

impl Flow {
    /// A session for a client that has just logged in, with no server yet. Takes the
    /// configuration as it is now.
    fn new(ctx: &WorkerCtx, stream: Stream, mut who: LoggedIn) -> Flow {
        let config = ctx.instance.config();
        let g = &config.general;
        let mode = who.pool.shared.mode;
        let welcome = who.pool.shared.welcome().unwrap_or_default();
        let reset_care = who
            .settings
            .entries()
            .any(|(lower, _, value)| welcome.get_lower(lower) != Some(value));
        let (c_rd, c_wr) = stream.into_split();
        let pending = std::mem::take(&mut who.pending);
        let mut flow = Flow {
            conf: Conf {
                mode,
                pkt_buf: g.pkt_buf.max(1024),
                reset_query: g.server_reset_query.clone().unwrap_or_default(),
                reset_always: g.server_reset_query_always,
                track_statements: mode == PoolMode::Transaction && g.max_prepared_statements > 0,
                max_prepared: g.max_prepared_statements,
            },
            bufs: ctx.bufs.clone(),
            client: Client {
                rd: Some(c_rd),
                wr: Some(c_wr),
                gone: false,
                read_stop: Canceller::new(),
            },
            server: None,
            up: Up {
                // Buffers come from the worker's pool when there is something to hold.
                buf: Some(MsgBuf::with_capacity(0)),
                out: Some(MsgBuf::with_capacity(0)),
                write: None,
                want: 0,
                cur: UpCursor::default(),
                blocked: false,
            },
            down: Down {
                // Allocated (from the pool) when a server first has something to say.
                buf: Some(MsgBuf::with_capacity(0)),
                fwd: 0,
                partial: 0,
                skip: 0,
                pend: MsgBuf::with_capacity(0),
                spare: Some(MsgBuf::with_capacity(0)),
                synth: Vec::new(),
            },
            tracker: TxTracker::default(),
            queue: ExpectQueue::default(),
            statements: ClientStatements::default(),
            unnamed: UnnamedStmt::default(),
            retry: StaleRetry::default(),
            pinned: false,
            listen: Listen {
                instance: ctx.instance.clone(),
                worker: ctx.id,
                subscribers: ctx.sessions.subscribers.clone(),
                subscription: None,
            },
            params: Params {
                welcome,
                initial: who.settings.clone(),
                resetting: Resetting::No,
                changed: false,
                reset_care,
                hold: Hold::No,
                captured: Vec::new(),
            },
            signal: ctx.sessions.add(&who.database),
            draining: false,
            // A new session starts idle: nothing to forward yet.
            shrink: true,
            rollback_sent: false,
            timing: Timing {
                timeouts: Timeouts {
                    client_idle: g.client_idle_timeout,
                    idle_transaction: g.idle_transaction_timeout,
                    query: g.query_timeout,
                    query_wait: g.query_wait_timeout,
                },
                last_activity: Instant::now(),
                quiet_since: None,
                req_started: None,
                xact_started: None,
                wait_started: None,
                probing: false,
                rollback_deadline: None,
            },
            tally: Tally::default(),
            who,
        };
        if !pending.is_empty() {
            // Bytes that came with the login: as if just received.
            let mut buf = MsgBuf::with_capacity(pending.len());
            buf.extend_from_slice(&pending);
            flow.up.buf = Some(buf);
            flow.shrink = false;
            flow.client_sent(pending.len());
        }
        flow
    }

    /// Alternates between active stretches (the forwarding loop, boxed: its operations
    /// and state are large) and idle waits that hold little more than one read of the
    /// client, so thousands of idle clients cost little memory.
    async fn serve(&mut self) -> Result<(), SessionError> {
        loop {
            match Box::pin(self.run()).await? {
                Stretch::Done => return Ok(()),
                Stretch::Idle => self.idle_wait().await?,
            }
        }
    }
}
