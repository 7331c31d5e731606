//! A logged-in client: forwarding in both directions, attaching a server when the client
//! needs one and handing it back when the pool mode allows, cleaning up when either side
//! leaves.
//!
//! Four owned I/O operations can be in flight: reading the client or writing the server
//! (one slot, in turn), reading the server, and writing the client. Each is kept alive
//! across loop turns rather than raced and dropped: an io_uring read that is cancelled
//! may already have consumed bytes, so no read is abandoned while the session runs.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent, Canceller, Splitable,
};

use super::downstream::{self, DownState, Hold, Resetting};
use super::expect::{Expect, ExpectQueue, Injected, Kind};
use super::login::LoggedIn;
use super::params::{after_sync, apply_snapshot, sync_statement, SNAPSHOT_QUERY};
use super::prepared::{ClientStatements, UnnamedStmt};
use super::retry::StaleRetry;
use super::tx_tracker::TxTracker;
use super::upstream::{self, UpCursor, UpState};
use super::SessionError;
use crate::config::PoolMode;
use crate::context::cancel::{send_cancel, CancelTarget, CANCEL_TIMEOUT};
use crate::context::control::{Seen, SessionSignal};
use crate::context::WorkerCtx;
use crate::metrics::{ConnState, WorkerPoolStats};
use crate::net::{stream_of, Stream, StreamRd, StreamWr};
use crate::pool::{LocalPool, PoolError, ServerConn, ServerMeta, ServerRd, ServerWr, Settings};
use crate::protocol::backend::{self, Severity};
use crate::protocol::{frontend, BufPool, MsgBuf, SqlState};

type ClientRd = StreamRd;
type ClientWr = StreamWr;

/// Stands for the configured server_reset_query in [`Flow::release_now`]'s answer.
const RESET_QUERY: &str = "server_reset_query";
/// In [`Flow::release_now`]'s answer: no statement, only wait for cancels in flight.
const NOTHING: &str = "";

/// How long a departed client's open transaction may take to roll back before the
/// server is closed instead.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a response already on its way to a client may take to finish when the
/// session ends with an error the client should see after it.
const CLIENT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Output buffers of pgsilo's own that stay allocated while idle must be at most this.
const IDLE_BUF: usize = 256;
/// Output pgsilo built for a slow client, beyond which the server is not read further.
const PENDING_OUTPUT_LIMIT: usize = 256 * 1024;
/// Output kept back while a ReadyForQuery is held; beyond it, it goes on ahead.
const HELD_OUTPUT_LIMIT: usize = 64 * 1024;

async fn read_op<R: AsyncReadRent>(mut r: R, buf: MsgBuf) -> (R, std::io::Result<usize>, MsgBuf) {
    let (res, back) = r.read(buf.into_read()).await;
    (r, res, back.into_inner())
}

/// A read of the client that can be called off without losing anything: once cancelled,
/// it still completes, with the bytes it took or with ECANCELED.
async fn client_read_op(mut r: ClientRd, buf: MsgBuf, c: CancelHandle) -> (ClientRd, std::io::Result<usize>, MsgBuf) {
    let (res, back) = r.cancelable_read(buf.into_read(), c).await;
    (r, res, back.into_inner())
}

async fn write_op<W: AsyncWriteRent>(mut w: W, buf: MsgBuf, n: usize) -> (W, std::io::Result<usize>, MsgBuf) {
    let (res, back) = w.write_all(buf.into_write(n)).await;
    (w, res, back.into_inner())
}

/// Readiness of the client socket while the client waits for a server: to notice a client
/// that hangs up. A readiness wait takes nothing from the socket, so dropping it when the
/// server comes loses nothing.
fn client_readiness(rd: &ClientRd) -> impl Future<Output = std::io::Result<()>> + 'static {
    // SAFETY: the stream lives in an Rc held by the session's read half, which the
    // session keeps (in `c_rd`) for longer than this future lives: the future is a local
    // of the forwarding loop and is dropped before the loop returns, and the read half
    // is never dropped while the loop runs. No read runs on the socket meanwhile.
    let stream: &'static mut Stream = unsafe { &mut *rd.0.get() };
    stream.readable()
}

/// Peeks whether a readable client socket has data (Some(true)), was closed
/// (Some(false)), or nothing after all (None).
fn peek_client(rd: &ClientRd) -> Option<bool> {
    stream_of(rd).peek()
}

/// Waits until the client's socket has something to read, holding no buffer.
async fn readable_op(rd: ClientRd) -> (ClientRd, std::io::Result<()>) {
    // The half (moved into this future) keeps the stream alive; while a session is idle
    // no operation runs on the client socket.
    let res = stream_of(&rd).readable().await;
    (rd, res)
}

/// What ended an idle wait.
enum Woke {
    Ready(ClientRd, std::io::Result<()>),
    Timeout,
    Signal,
}

/// Waiting for (or opening) a server: boxed, so the rarely used and large future does not
/// sit in every session's state.
type Acquire = std::pin::Pin<Box<dyn Future<Output = Result<ServerConn, PoolError>>>>;

fn acquire(pool: Rc<LocalPool>, wait: Option<Duration>) -> Acquire {
    Box::pin(async move { pool.acquire(wait).await })
}

enum Event {
    ClientRead(ClientRd, std::io::Result<usize>, MsgBuf),
    ServerWrite(ServerWr, std::io::Result<usize>, MsgBuf),
    Probe(std::io::Result<()>),
    ServerRead(ServerRd, std::io::Result<usize>, MsgBuf),
    ClientWrite(ClientWr, std::io::Result<usize>, MsgBuf),
    Acquired(Result<ServerConn, PoolError>),
    Deadline,
    /// KILL or a shutdown phase reached this session.
    Signal,
}

/// The server a client is using, in pieces while the operations own them.
struct Attached {
    rd: Option<ServerRd>,
    wr: Option<ServerWr>,
    meta: Box<ServerMeta>,
}

/// PgBouncer's session timeouts; None is disabled.
struct Timeouts {
    client_idle: Option<Duration>,
    idle_transaction: Option<Duration>,
    query: Option<Duration>,
}

/// Which deadline the session timer is armed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deadline {
    /// A departed client's ROLLBACK is taking too long.
    Rollback,
    ClientIdle,
    IdleTransaction,
    Query,
}

/// What the up slot is writing to the server, to settle when the write completes.
#[derive(Clone, Copy)]
enum UpWrite {
    /// The first n bytes of the client buffer, as they came.
    Range(usize),
    /// The output buffer; then n bytes of the client buffer are done.
    Copy(usize),
}

/// Per-session counters, folded into the pool's at each release so the shared cache
/// line is touched once per transaction, not per message.
#[derive(Default)]
struct Tally {
    queries: u64,
    xacts: u64,
    bytes_in: u64,
    bytes_out: u64,
    query_time: Duration,
    xact_time: Duration,
}

struct Flow {
    who: LoggedIn,
    mode: PoolMode,
    pkt_buf: usize,
    /// The worker's forwarding buffers.
    bufs: Rc<BufPool>,
    wait_timeout: Option<Duration>,
    reset_query: String,
    reset_always: bool,
    /// Named statements are renamed and carried across servers (transaction pooling).
    track_statements: bool,
    max_prepared: usize,
    welcome: Arc<Settings>,
    initial: Arc<Settings>,

    c_rd: Option<ClientRd>,
    c_wr: Option<ClientWr>,
    server: Option<Attached>,

    /// Client bytes not yet dealt with.
    ubuf: Option<MsgBuf>,
    /// Rewritten client output for the server.
    uout: Option<MsgBuf>,
    up_write: Option<UpWrite>,
    up_want: usize,
    up_cur: UpCursor,

    /// Server bytes: the first `dfwd` are processed and go to the client as they are;
    /// `dpartial` more are the start of a message still arriving.
    dbuf: Option<MsgBuf>,
    dfwd: usize,
    dpartial: usize,
    down_skip: usize,
    /// Client output pgsilo built (rewritten or synthesized), in order after `dfwd`.
    dpend: MsgBuf,
    /// The buffer lent to the client write when it writes `dpend`'s content.
    dspare: Option<MsgBuf>,
    synth: Vec<u8>,

    tracker: TxTracker,
    queue: ExpectQueue,
    statements: ClientStatements,

    /// The client LISTENs: it keeps its server until it leaves, whatever the pool mode.
    pinned: bool,
    unnamed: UnnamedStmt,
    /// A named Parse waits for the answers to everything sent before it.
    up_blocked: bool,
    /// A RESET / DISCARD ALL in progress, or finished and leaving the server with its
    /// own defaults where the client should have its startup values.
    resetting: Resetting,
    /// The client ran SET or RESET in this transaction (see apply_snapshot).
    settings_changed: bool,
    /// The client connected with settings that differ from the server's defaults, so a
    /// RESET on the server does not return it to them: its ReadyForQuery after a SET,
    /// RESET or DISCARD ALL waits until pgsilo has put them right.
    reset_care: bool,
    hold: Hold,
    /// A request that failed on a stale shared statement, to be sent again.
    retry: StaleRetry,
    captured: Vec<(String, String)>,
    signal: Rc<SessionSignal>,
    /// Shutting down: end the session at the first moment no transaction is open.
    draining: bool,
    /// The client has been quiet: go idle (see [`Flow::idle_wait`]) when nothing is owed.
    shrink: bool,
    /// Calls off the client read when shrinking; one for the session's life, so a read
    /// costs no allocation for it.
    read_stop: Canceller,
    /// No more reads from the client: it sent Terminate, closed, or failed.
    client_gone: bool,
    rollback_sent: bool,
    rollback_deadline: Option<Instant>,
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
    tally: Tally,
}

pub async fn serve(ctx: Rc<WorkerCtx>, stream: Stream, mut who: LoggedIn) -> Result<(), SessionError> {
    let config = ctx.instance.config();
    let g = &config.general;
    let pkt_buf = g.pkt_buf.max(1024);
    let mode = who.pool.shared.mode;
    let welcome = who.pool.shared.welcome().unwrap_or_default();
    let reset_care = who
        .settings
        .entries()
        .any(|(lower, _, value)| welcome.get_lower(lower) != Some(value));
    let bound = who.bound.take();
    let (c_rd, c_wr) = stream.into_split();
    WorkerPoolStats::add(&who.pool.stats().clients, 1);
    who.entry.entry.set_state(ConnState::Active);
    let mut flow = Flow {
        mode,
        pkt_buf,
        bufs: ctx.bufs.clone(),
        wait_timeout: g.query_wait_timeout,
        reset_query: g.server_reset_query.clone().unwrap_or_default(),
        reset_always: g.server_reset_query_always,
        track_statements: mode == PoolMode::Transaction && g.max_prepared_statements > 0,
        max_prepared: g.max_prepared_statements,
        welcome,
        initial: who.settings.clone(),
        c_rd: Some(c_rd),
        c_wr: Some(c_wr),
        server: None,
        // Buffers come from the worker's pool when there is something to hold.
        ubuf: Some(MsgBuf::with_capacity(0)),
        uout: Some(MsgBuf::with_capacity(0)),
        up_write: None,
        up_want: 0,
        up_cur: UpCursor::default(),
        // Allocated (from the pool) when a server first has something to say.
        dbuf: Some(MsgBuf::with_capacity(0)),
        dfwd: 0,
        dpartial: 0,
        down_skip: 0,
        dpend: MsgBuf::with_capacity(0),
        dspare: Some(MsgBuf::with_capacity(0)),
        synth: Vec::new(),
        tracker: TxTracker::default(),
        queue: ExpectQueue::default(),
        statements: ClientStatements::default(),
        pinned: false,
        unnamed: UnnamedStmt::default(),
        up_blocked: false,
        resetting: Resetting::No,
        settings_changed: false,
        reset_care,
        hold: Hold::No,
        retry: StaleRetry::default(),
        captured: Vec::new(),
        signal: ctx.sessions.add(&who.database),
        draining: false,
        // A new session starts idle: nothing to forward yet.
        shrink: true,
        read_stop: Canceller::new(),
        client_gone: false,
        rollback_sent: false,
        rollback_deadline: None,
        timeouts: Timeouts {
            client_idle: g.client_idle_timeout,
            idle_transaction: g.idle_transaction_timeout,
            query: g.query_timeout,
        },
        last_activity: Instant::now(),
        quiet_since: None,
        req_started: None,
        xact_started: None,
        wait_started: None,
        tally: Tally::default(),
        who,
    };
    drop(config);
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
        if let (Some((code, message)), Some(mut wr)) = (e.client_error(), flow.c_wr.take()) {
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

    /// Nothing is in flight and nothing is owed: the session can wait without its
    /// forwarding machinery.
    fn idle(&self) -> bool {
        self.server.is_none()
            && !self.client_gone
            && !self.draining
            && !self.up_blocked
            && self.up_write.is_none()
            && self.dfwd == 0
            && self.dpend.is_empty()
            && self.rollback_deadline.is_none()
            && self.hold == Hold::No
            && !self.retry.busy()
            && self.c_rd.is_some()
            && self.c_wr.is_some()
            && self.ubuf.as_ref().is_some_and(|b| b.is_empty())
    }

    /// Waits for the client's next bytes, a signal (KILL, shutdown), or
    /// client_idle_timeout. Returns once there is something for an active stretch. Holds
    /// no buffer while waiting: readiness first, then a non-blocking receive into a
    /// buffer from the worker's pool.
    async fn idle_wait(&mut self) -> Result<(), SessionError> {
        self.park_buffers();
        self.retry.park();
        let mut timer = self
            .timeouts
            .client_idle
            .map(|d| Box::pin(monoio::time::sleep_until((self.last_activity + d).into())));
        let signal = self.signal.clone();
        let mut seen = signal.seen_now();
        loop {
            let Some(rd) = self.c_rd.take() else {
                return Ok(());
            };
            let mut ready = pin!(readable_op(rd));
            let woke = poll_fn(|cx| {
                if let Poll::Ready((rd, res)) = ready.as_mut().poll(cx) {
                    return Poll::Ready(Woke::Ready(rd, res));
                }
                if let Some(t) = timer.as_mut() {
                    if t.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woke::Timeout);
                    }
                }
                // A shrink request changes nothing here (already as small as it gets);
                // only KILL and shutdown end the wait.
                while signal.poll_changed(cx, &mut seen).is_ready() {
                    if signal.killed().is_some() || signal.draining() {
                        return Poll::Ready(Woke::Signal);
                    }
                }
                Poll::Pending
            })
            .await;
            match woke {
                Woke::Ready(rd, Ok(())) => {
                    self.c_rd = Some(rd);
                    // Active again: the next shrink needs a fresh quiet period.
                    self.signal.take_shrink();
                    self.shrink = false;
                    match self.receive_now() {
                        Some(0) => {
                            self.client_gone = true;
                            return Ok(());
                        }
                        Some(n) => {
                            self.client_sent(n);
                            return Ok(());
                        }
                        // Woken without data after all: wait again.
                        None => continue,
                    }
                }
                Woke::Ready(rd, Err(_)) => {
                    self.c_rd = Some(rd);
                    self.client_gone = true;
                    return Ok(());
                }
                // Dropping the readiness wait cancels it; the client is closed either way.
                Woke::Timeout => {
                    return Err(SessionError::TimedOut(
                        SqlState::IDLE_SESSION_TIMEOUT,
                        "client_idle_timeout",
                    ))
                }
                Woke::Signal => {
                    if let Some(why) = self.signal.killed() {
                        return Err(SessionError::Killed(why));
                    }
                    // Draining, and an idle client is between transactions: close it now.
                    return Err(SessionError::Shutdown);
                }
            }
        }
    }

    /// A non-blocking receive of what the client sent, into a pooled buffer. None when
    /// nothing was there after all; Some(0) when the client closed.
    fn receive_now(&mut self) -> Option<usize> {
        let rd = self.c_rd.as_ref()?;
        let buf = self.ubuf.get_or_insert_with(|| MsgBuf::with_capacity(0));
        if buf.capacity() == 0 {
            *buf = self.bufs.take();
        }
        buf.reserve(1);
        stream_of(rd).try_recv(buf.vec_mut())
    }

    async fn run(&mut self) -> Result<Stretch, SessionError> {
        let mut crd = pin!(None::<(ClientRd, MsgBuf, CancelHandle)>.map(|(r, b, c)| client_read_op(r, b, c)));
        let mut swr = pin!(None::<(ServerWr, MsgBuf, usize)>.map(|(w, b, n)| write_op(w, b, n)));
        let mut srv = pin!(None::<(ServerRd, MsgBuf)>.map(|(r, b)| read_op(r, b)));
        let mut cli = pin!(None::<(ClientWr, MsgBuf, usize)>.map(|(w, b, n)| write_op(w, b, n)));
        let mut acq: Option<Acquire> = None;
        let mut probe = pin!(None::<&ClientRd>.map(client_readiness));
        // Set once the probe saw data: the client pipelined more; nothing to watch for.
        let mut probe_done = false;
        let mut timer = pin!(None::<Instant>.map(|d| monoio::time::sleep_until(d.into())));
        let mut timer_at: Option<(Instant, Deadline)> = None;
        let signal = self.signal.clone();
        let mut signal_seen = Seen::default();

        loop {
            // Client -> server: what is processed goes out; more is read when needed.
            if swr.is_none() {
                let next = match self.next_server_write() {
                    Ok(next) => next,
                    Err(e) => {
                        Box::pin(self.finish_client_write(cli.as_mut().as_pin_mut())).await;
                        return Err(e);
                    }
                };
                if let Some((w, b, n)) = next {
                    swr.set(Some(write_op(w, b, n)));
                }
            }
            let quiet = crd.is_none() && cli.is_none() && swr.is_none() && acq.is_none() && probe.is_none();
            if self.shrink && quiet && self.idle() {
                self.shrink = false;
                return Ok(Stretch::Idle);
            }
            if crd.is_none() && acq.is_none() {
                match self.next_client_read() {
                    Ok(Some((r, b))) => crd.set(Some(client_read_op(r, b, self.read_stop.handle()))),
                    Ok(None) => {
                        if self.wants_acquire() {
                            if let Some(conn) = self.who.pool.try_acquire_now() {
                                // An idle server here: no waiting, no future.
                                if let Some(conn) = self.try_plug(conn) {
                                    Box::pin(self.sync_then_plug(conn)).await?;
                                }
                                continue;
                            }
                            self.wait_started = Some(Instant::now());
                            self.who.entry.entry.set_state(ConnState::Waiting);
                            acq = Some(acquire(self.who.pool.clone(), self.wait_timeout));
                        }
                    }
                    Err(e) => {
                        Box::pin(self.finish_client_write(cli.as_mut().as_pin_mut())).await;
                        return Err(e);
                    }
                }
            }
            // While waiting for a server, notice a client that hangs up.
            if acq.is_some() && probe.is_none() && !probe_done && !self.client_gone {
                if let Some(rd) = self.c_rd.as_ref() {
                    probe.set(Some(client_readiness(rd)));
                }
            }
            // Server -> client.
            if cli.is_none() {
                if let Some(op) = self.next_client_write() {
                    cli.set(Some(write_op(op.0, op.1, op.2)));
                }
            }
            if srv.is_none() {
                if let Some(op) = self.next_server_read() {
                    srv.set(Some(read_op(op.0, op.1)));
                }
            }
            // Under transaction pooling, a SET the client ran is read back before the
            // server goes to someone else. The server read may be armed: it will carry
            // the answer.
            if self.client_gone && self.hold != Hold::No {
                // No one to hold a ReadyForQuery for; what runs finishes on its own.
                self.hold = Hold::No;
            }
            if self.settings_changed
                && self.mode == PoolMode::Transaction
                && self.hold == Hold::No
                && !self.client_gone
                && self.server_wr_free()
                && self.up_cur.skip == 0
                && self.tracker.is_idle()
                && self.queue.is_empty()
            {
                self.settings_changed = false;
                self.inject_query(SNAPSHOT_QUERY, Injected::Snapshot);
                continue;
            }
            // Hand the server back, or deal with a departed client's server. The client
            // read may stay armed: it holds no part of the server.
            if self.releasable() {
                if let Some((conn, sql)) = self.release_now() {
                    Box::pin(self.release_after(conn, sql)).await;
                }
                continue;
            }
            if self.client_gone && self.server_wr_free() && !self.rollback_sent {
                if self.tracker.is_quiet() {
                    self.inject_rollback();
                    continue;
                }
                // Only pgsilo's own query is running (a settings correction after RESET,
                // or the read-back after SET): let it finish; the server is then clean.
                if !self.queue.only_injected() {
                    // A request was in flight when the client left: its outcome cannot
                    // reach anyone, and the server's state is unknown.
                    srv.set(None);
                    self.abandon_server();
                }
            }
            if self.client_gone && self.server.is_none() && swr.is_none() && acq.is_none() {
                return Ok(Stretch::Done);
            }
            let output_flushed = cli.is_none() && self.dfwd == 0 && self.dpend.is_empty();
            if self.draining && output_flushed && acq.is_none() && self.up_write.is_none() && self.tracker.is_idle() {
                // Between transactions: this is the moment to close the client.
                if self.server.is_some() && self.releasable_when_gone() {
                    self.client_gone = true;
                    if let Some((conn, sql)) = self.release_now() {
                        Box::pin(self.release_after(conn, sql)).await;
                    }
                }
                if self.server.is_none() {
                    return Err(SessionError::Shutdown);
                }
            }
            let next = self.next_deadline();
            if next != timer_at {
                timer_at = next;
                timer.set(next.map(|(at, _)| monoio::time::sleep_until(at.into())));
            }

            let event = poll_fn(|cx| {
                if let Some(f) = crd.as_mut().as_pin_mut() {
                    if let Poll::Ready((r, res, b)) = f.poll(cx) {
                        crd.set(None);
                        return Poll::Ready(Event::ClientRead(r, res, b));
                    }
                }
                if let Some(f) = swr.as_mut().as_pin_mut() {
                    if let Poll::Ready((w, res, b)) = f.poll(cx) {
                        swr.set(None);
                        return Poll::Ready(Event::ServerWrite(w, res, b));
                    }
                }
                if let Some(f) = probe.as_mut().as_pin_mut() {
                    if let Poll::Ready(res) = f.poll(cx) {
                        probe.set(None);
                        return Poll::Ready(Event::Probe(res));
                    }
                }
                if let Some(f) = srv.as_mut().as_pin_mut() {
                    if let Poll::Ready((r, res, b)) = f.poll(cx) {
                        srv.set(None);
                        return Poll::Ready(Event::ServerRead(r, res, b));
                    }
                }
                if let Some(f) = cli.as_mut().as_pin_mut() {
                    if let Poll::Ready((w, res, b)) = f.poll(cx) {
                        cli.set(None);
                        return Poll::Ready(Event::ClientWrite(w, res, b));
                    }
                }
                if let Some(f) = acq.as_mut() {
                    if let Poll::Ready(r) = f.as_mut().poll(cx) {
                        acq = None;
                        return Poll::Ready(Event::Acquired(r));
                    }
                }
                if let Some(f) = timer.as_mut().as_pin_mut() {
                    if let Poll::Ready(()) = f.poll(cx) {
                        timer.set(None);
                        return Poll::Ready(Event::Deadline);
                    }
                }
                if signal.poll_changed(cx, &mut signal_seen).is_ready() {
                    return Poll::Ready(Event::Signal);
                }
                Poll::Pending
            })
            .await;

            if log::log_enabled!(log::Level::Trace) {
                self.trace_event(&event);
            }
            match event {
                Event::ClientRead(rd, res, buf) => {
                    self.c_rd = Some(rd);
                    self.ubuf = Some(buf);
                    match res {
                        Ok(0) => self.client_gone = true,
                        Ok(n) => {
                            self.shrink = false;
                            self.client_sent(n);
                        }
                        // Called off to shrink: nothing was read.
                        Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {}
                        Err(_) => self.client_gone = true,
                    }
                }
                Event::Probe(res) => {
                    let state = match res {
                        Ok(()) => self.c_rd.as_ref().and_then(peek_client),
                        Err(_) => Some(false),
                    };
                    match state {
                        Some(false) => {
                            // Gone while waiting: stop waiting (the pool takes the wait back).
                            self.client_gone = true;
                            acq = None;
                            self.wait_started = None;
                        }
                        Some(true) => probe_done = true,
                        None => {}
                    }
                }
                Event::ServerWrite(wr, res, buf) => {
                    if let Some(s) = self.server.as_mut() {
                        s.wr = Some(wr);
                    }
                    match self.up_write.take() {
                        Some(UpWrite::Range(n)) => {
                            let mut b = buf;
                            b.consume(n);
                            self.ubuf = Some(b);
                        }
                        Some(UpWrite::Copy(n)) => {
                            let mut b = buf;
                            b.clear();
                            self.uout = Some(b);
                            if let Some(u) = self.ubuf.as_mut() {
                                u.consume(n);
                            }
                        }
                        None => self.uout = Some(buf),
                    }
                    if res.is_err() {
                        return Box::pin(self.server_lost()).await.map(|()| Stretch::Done);
                    }
                }
                Event::ServerRead(rd, res, buf) => {
                    if let Some(s) = self.server.as_mut() {
                        s.rd = Some(rd);
                    }
                    self.dbuf = Some(buf);
                    match res {
                        Ok(0) | Err(_) => return Box::pin(self.server_lost()).await.map(|()| Stretch::Done),
                        Ok(_) => {
                            if let Err(e) = self.process_down() {
                                Box::pin(self.finish_client_write(cli.as_mut().as_pin_mut())).await;
                                return Err(e);
                            }
                        }
                    }
                }
                Event::ClientWrite(wr, res, buf) => {
                    self.c_wr = Some(wr);
                    if let Ok(n) = res {
                        self.tally.bytes_out += n as u64;
                    } else {
                        self.client_gone = true;
                    }
                    self.settle_client_write(buf);
                }
                Event::Acquired(res) => {
                    probe.set(None);
                    probe_done = false;
                    if let Some(t) = self.wait_started.take() {
                        self.who.pool.stats().record_wait(t.elapsed());
                    }
                    self.who.entry.entry.set_state(ConnState::Active);
                    if let Some(conn) = self.try_plug(res?) {
                        Box::pin(self.sync_then_plug(conn)).await?;
                    }
                }
                Event::Signal => {
                    if self.signal.take_shrink() && !self.client_gone {
                        self.shrink = true;
                        // Quiet for a second: if nothing else is going on, stop the read
                        // (it completes, cancelled or with data) and go idle.
                        if self.server.is_none() && swr.is_none() && cli.is_none() && acq.is_none() && crd.is_some() {
                            // Cancelling returns a fresh canceller for later reads.
                            self.read_stop = std::mem::take(&mut self.read_stop).cancel();
                        }
                    }
                    if let Some(why) = self.signal.killed() {
                        swr.set(None);
                        srv.set(None);
                        self.abandon_server();
                        return Err(SessionError::Killed(why));
                    }
                    if self.signal.draining() {
                        self.draining = true;
                    }
                }
                Event::Deadline => {
                    let Some((at, which)) = timer_at.take() else {
                        continue;
                    };
                    if Instant::now() < at {
                        continue;
                    }
                    swr.set(None);
                    srv.set(None);
                    let code = match which {
                        Deadline::Rollback => {
                            log::info!(
                                "C-{}: rollback after client left took too long; closing server",
                                self.who.id
                            );
                            self.abandon_server();
                            return Ok(Stretch::Done);
                        }
                        Deadline::ClientIdle => (SqlState::IDLE_SESSION_TIMEOUT, "client_idle_timeout"),
                        Deadline::IdleTransaction => {
                            (SqlState::IDLE_IN_TRANSACTION_TIMEOUT, "idle_transaction_timeout")
                        }
                        Deadline::Query => (SqlState::QUERY_CANCELED, "query_timeout"),
                    };
                    // The server's state is unknown or a transaction is open: closing it
                    // (and cancelling what runs there) is the only clean way out.
                    self.abandon_server();
                    return Err(SessionError::TimedOut(code.0, code.1));
                }
            }
        }
    }

    /// The earliest deadline that applies in the session's current state.
    fn next_deadline(&self) -> Option<(Instant, Deadline)> {
        if let Some(d) = self.rollback_deadline {
            return Some((d, Deadline::Rollback));
        }
        if self.client_gone {
            return None;
        }
        let t = &self.timeouts;
        if self.wait_started.is_some() {
            // Waiting for a server is query_wait_timeout's business.
            return None;
        }
        if self.tracker.is_idle() && self.ubuf.as_ref().is_none_or(|b| b.is_empty()) {
            return t.client_idle.map(|d| (self.last_activity + d, Deadline::ClientIdle));
        }
        // The remaining deadlines are about a server's transaction or request.
        self.server.as_ref()?;
        if let (Some(d), Some(start)) = (t.query, self.req_started) {
            return Some((start + d, Deadline::Query));
        }
        if let (Some(d), Some(since)) = (t.idle_transaction, self.quiet_since) {
            return Some((since + d, Deadline::IdleTransaction));
        }
        None
    }

    /// One line per event at verbose = 2: what happened and the state it found.
    fn trace_event(&self, event: &Event) {
        let what = match event {
            Event::ClientRead(_, r, _) => format!("client read {:?}", r.as_ref().ok()),
            Event::ServerWrite(_, r, _) => format!("server write {:?}", r.as_ref().ok()),
            Event::Probe(r) => format!("probe {:?}", r.as_ref().ok()),
            Event::ServerRead(_, r, _) => format!("server read {:?}", r.as_ref().ok()),
            Event::ClientWrite(_, r, _) => format!("client write {:?}", r.as_ref().ok()),
            Event::Acquired(r) => format!("acquired {}", r.is_ok()),
            Event::Deadline => "deadline".into(),
            Event::Signal => "signal".into(),
        };
        log::trace!(
            "C-{} {what}: server={} tracker={:?} queue={} upw={} blocked={} want={} ubuf={} dfwd={} dpend={} changed={} resetting={:?} gone={}",
            self.who.id,
            self.server.as_ref().map_or(0, |s| s.meta.id),
            self.tracker,
            self.queue.len(),
            self.up_write.is_some(),
            self.up_blocked,
            self.up_want,
            self.ubuf.as_ref().map_or(0, |b| b.len()),
            self.dfwd,
            self.dpend.len(),
            self.settings_changed,
            self.resetting,
            self.client_gone,
        );
    }

    /// Bookkeeping for bytes the client sent.
    fn client_sent(&mut self, n: usize) {
        self.signal.active();
        self.tally.bytes_in += n as u64;
        self.up_want = 0;
        if self.timeouts.client_idle.is_some() {
            self.last_activity = Instant::now();
        }
    }

    /// The next write to the server: output already prepared, or what processing the
    /// client's buffered bytes (or pgsilo's own needs) produces now.
    fn next_server_write(&mut self) -> Result<Option<(ServerWr, MsgBuf, usize)>, SessionError> {
        if self.up_write.is_none() {
            self.prepare_server_write()?;
        }
        let Some(kind) = self.up_write else {
            return Ok(None);
        };
        let Some(wr) = self.server.as_mut().and_then(|s| s.wr.take()) else {
            return Ok(None);
        };
        let (buf, n) = match kind {
            UpWrite::Range(n) => (self.ubuf.take(), n),
            UpWrite::Copy(_) => {
                let out = self.uout.take();
                let n = out.as_ref().map_or(0, |o| o.len());
                (out, n)
            }
        };
        match buf {
            Some(buf) => Ok(Some((wr, buf, n))),
            None => {
                // The buffer is in another operation; try again when it is back.
                if let Some(s) = self.server.as_mut() {
                    s.wr = Some(wr);
                }
                Ok(None)
            }
        }
    }

    /// Decides what goes to the server next, leaving it in `up_write`.
    fn prepare_server_write(&mut self) -> Result<(), SessionError> {
        if self.server.is_none() || !self.server_wr_free() {
            return Ok(());
        }
        if self.up_blocked {
            if !self.queue.is_empty() {
                return Ok(());
            }
            self.up_blocked = false;
        }
        if self.retry.busy() {
            if self.queue.is_empty() {
                self.replay()?;
            }
            // The failed attempt is still being answered; the client's bytes wait.
            return Ok(());
        }
        match self.hold {
            Hold::No => {}
            Hold::Pending if self.queue.is_empty() && self.up_cur.skip == 0 => {
                self.settings_changed = false;
                self.hold = Hold::Snapshot;
                self.inject_query(SNAPSHOT_QUERY, Injected::Snapshot);
                return Ok(());
            }
            Hold::Correct if self.queue.is_empty() => {
                if self.inject_resync() {
                    self.hold = Hold::Correcting;
                } else {
                    self.release_hold();
                }
                return Ok(());
            }
            // pgsilo's own queries run; the client's next bytes wait for its answer.
            _ => return Ok(()),
        }
        // Not inside the client's transaction block: a query there would take its
        // snapshot. The settings are put right when the block ends.
        if self.resetting == Resetting::Done && self.queue.is_empty() && self.tracker.status() == b'I' {
            self.resetting = Resetting::No;
            if self.inject_resync() {
                return Ok(());
            }
        }
        let has_data = self.ubuf.as_ref().is_some_and(|b| !b.is_empty());
        if has_data && self.up_want == 0 {
            self.process_up()?;
        }
        Ok(())
    }

    /// The next read of the client, when nothing buffered can be acted on without more.
    fn next_client_read(&mut self) -> Result<Option<(ClientRd, MsgBuf)>, SessionError> {
        if self.client_gone || self.up_blocked || matches!(self.up_write, Some(UpWrite::Range(_))) {
            return Ok(None);
        }
        let has_data = self.ubuf.as_ref().is_some_and(|b| !b.is_empty());
        if has_data && self.up_want == 0 {
            if self.server.is_some() {
                // Processing comes first (next_server_write); unprocessed bytes here
                // wait for the server's write half.
                return Ok(None);
            }
            let data = self.ubuf.as_ref().map(|b| b.data()).unwrap_or_default();
            let p = upstream::peek(data)?;
            if p.terminate {
                self.client_gone = true;
                return Ok(None);
            }
            if p.needs_server {
                return Ok(None);
            }
            // Stray COPY data after a failed COPY, or a bare Flush: the server would
            // ignore it, so there is no need to find one.
            if let Some(b) = self.ubuf.as_mut() {
                b.consume(p.whole);
            }
            if p.whole == 0 {
                self.up_want = crate::protocol::HEADER_LEN;
            }
        }
        if self.c_rd.is_none() {
            return Ok(None);
        }
        let Some(mut buf) = self.ubuf.take() else {
            return Ok(None);
        };
        if buf.capacity() == 0 {
            buf = self.bufs.take();
        }
        let need = self.up_want.saturating_sub(buf.len());
        if need > 0 {
            buf.reserve(need);
        } else if buf.spare() == 0 {
            buf.reserve(buf.capacity());
        }
        let Some(rd) = self.c_rd.take() else {
            self.ubuf = Some(buf);
            return Ok(None);
        };
        Ok(Some((rd, buf)))
    }

    fn wants_acquire(&self) -> bool {
        self.server.is_none()
            && !self.client_gone
            && self.up_want == 0
            && self
                .ubuf
                .as_ref()
                .is_some_and(|b| upstream::peek(b.data()).is_ok_and(|p| p.needs_server))
    }

    /// Runs the up-direction processing over buffered client bytes for the attached
    /// server and decides what to write.
    fn process_up(&mut self) -> Result<(), SessionError> {
        if self.server.is_none() {
            return Ok(());
        }
        let Some(buf) = self.ubuf.take() else {
            return Ok(());
        };
        let mut out = self.uout.take().unwrap_or_else(|| MsgBuf::with_capacity(0));
        debug_assert!(out.is_empty());
        let r = self.up_process(buf.data(), out.vec_mut());
        self.ubuf = Some(buf);
        self.uout = Some(out);
        let r = r?;
        if r.terminate {
            if let Some(b) = self.ubuf.as_mut() {
                b.truncate(r.consumed);
            }
            self.client_gone = true;
        }
        if r.blocked {
            self.up_blocked = true;
        } else if r.consumed == 0 {
            self.up_want = r.want;
        }
        if r.consumed > 0 {
            self.quiet_since = None;
        }
        if r.consumed > 0 && self.req_started.is_none() && self.tracker.outstanding() > 0 {
            let now = Instant::now();
            self.req_started = Some(now);
            self.xact_started.get_or_insert(now);
            self.who.entry.entry.touch();
        }
        if r.zero_copy {
            if r.consumed > 0 {
                self.up_write = Some(UpWrite::Range(r.consumed));
            }
        } else if self.uout.as_ref().is_some_and(|o| !o.is_empty()) {
            self.up_write = Some(UpWrite::Copy(r.consumed));
        } else if let Some(b) = self.ubuf.as_mut() {
            // Everything was answered locally or dropped.
            b.consume(r.consumed);
        }
        // Answers pgsilo owes with nothing before them go to the client now.
        self.synth.clear();
        self.queue.flush_synth(&mut self.synth);
        if !self.synth.is_empty() {
            self.dpend.extend_from_slice(&self.synth);
        }
        Ok(())
    }

    /// The client-to-server processing of `data` for the attached server, output in `out`.
    fn up_process(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<upstream::UpResult, SessionError> {
        let Some(server) = self.server.as_mut() else {
            return Ok(upstream::UpResult::default());
        };
        let mut st = UpState {
            cur: &mut self.up_cur,
            tracker: &mut self.tracker,
            queue: &mut self.queue,
            statements: if self.track_statements {
                Some(&mut self.statements)
            } else {
                None
            },
            unnamed: &mut self.unnamed,
            server: &mut server.meta,
            max_prepared: self.max_prepared,
            retry: &mut self.retry,
        };
        Ok(upstream::process(data, &mut st, out)?)
    }

    fn next_server_read(&mut self) -> Option<(ServerRd, MsgBuf)> {
        if self.dfwd > 0 || self.dpend.len() > PENDING_OUTPUT_LIMIT || !self.wants_server_read() {
            return None;
        }
        let mut buf = self.dbuf.take()?;
        let Some(rd) = self.server.as_mut().and_then(|s| s.rd.take()) else {
            self.dbuf = Some(buf);
            return None;
        };
        if buf.capacity() == 0 {
            buf = self.bufs.take();
        }
        let want = self.dpartial_want(&buf);
        buf.reserve(want.max(1024));
        Some((rd, buf))
    }

    fn dpartial_want(&self, buf: &MsgBuf) -> usize {
        match crate::protocol::Header::peek(buf.data()) {
            Some(h) if h.total() > buf.len() && h.total() <= 1 << 20 => h.total() - buf.len(),
            _ => 0,
        }
    }

    fn next_client_write(&mut self) -> Option<(ClientWr, MsgBuf, usize)> {
        if self.client_gone {
            // No one to tell: drop what was meant for the client.
            if self.dfwd > 0 {
                if let Some(b) = self.dbuf.as_mut() {
                    b.consume(self.dfwd);
                    self.dfwd = 0;
                }
            }
            self.dpend.clear();
            return None;
        }
        // The client write half must be free before either buffer is taken.
        self.c_wr.as_ref()?;
        if self.dfwd > 0 {
            let buf = self.dbuf.take()?;
            let wr = self.c_wr.take()?;
            return Some((wr, buf, self.dfwd));
        }
        // While a ReadyForQuery is held, what comes before it waits too (within bounds, so
        // the server is always read): the client gets its answer in one write, not two.
        if self.hold != Hold::No && self.dpend.len() < HELD_OUTPUT_LIMIT {
            return None;
        }
        if !self.dpend.is_empty() {
            let wr = self.c_wr.take()?;
            let mut spare = self.dspare.take().unwrap_or_else(|| MsgBuf::with_capacity(0));
            spare.clear();
            std::mem::swap(&mut spare, &mut self.dpend);
            let n = spare.len();
            return Some((wr, spare, n));
        }
        None
    }

    /// A client write finished: give its buffer back to where it came from.
    fn settle_client_write(&mut self, mut buf: MsgBuf) {
        if self.dbuf.is_none() && self.dfwd > 0 {
            buf.consume(self.dfwd);
            self.dfwd = 0;
            self.dbuf = Some(buf);
        } else {
            buf.clear();
            buf.shrink_to(self.pkt_buf);
            self.dspare = Some(buf);
        }
        self.park_buffers();
    }

    /// Without a server, a session keeps no large buffer: empty ones go back to the
    /// worker's pool (a busy session takes them again at once, so this costs nothing but
    /// a push and a pop per transaction).
    fn park_buffers(&mut self) {
        if self.server.is_some() {
            return;
        }
        if let Some(b) = self.dbuf.as_mut() {
            if b.is_empty() && b.capacity() > 0 {
                let b = std::mem::replace(b, MsgBuf::with_capacity(0));
                self.bufs.give(b);
            }
        }
        if let Some(b) = self.ubuf.as_mut() {
            if b.is_empty() && b.capacity() > 0 && self.c_rd.is_some() {
                let b = std::mem::replace(b, MsgBuf::with_capacity(0));
                self.bufs.give(b);
            }
        }
        if let Some(b) = self.dspare.as_mut() {
            if b.capacity() > 0 {
                *b = MsgBuf::with_capacity(0);
            }
        }
        if self.dpend.is_empty() && self.dpend.capacity() > 0 {
            self.dpend = MsgBuf::with_capacity(0);
        }
        if let Some(b) = self.uout.as_mut() {
            if b.is_empty() && b.capacity() > IDLE_BUF {
                *b = MsgBuf::with_capacity(0);
            }
        }
    }

    /// Before ending the session with an error for the client: a response on its way to
    /// the client right now holds the client's write half, and the error could not
    /// follow it. Let that write finish (bounded), unless it ends inside a message.
    async fn finish_client_write<F>(&mut self, write: Option<Pin<&mut F>>)
    where
        F: Future<Output = (ClientWr, std::io::Result<usize>, MsgBuf)>,
    {
        let Some(write) = write else {
            return;
        };
        if let Ok((wr, Ok(_), buf)) = monoio::time::timeout(CLIENT_FLUSH_TIMEOUT, write).await {
            self.settle_client_write(buf);
            if self.down_skip == 0 {
                self.c_wr = Some(wr);
            }
        }
    }

    /// The up slot is not writing to the server, so pgsilo may write to it.
    fn server_wr_free(&self) -> bool {
        self.up_write.is_none() && self.server.as_ref().is_some_and(|s| s.wr.is_some())
    }

    /// The server read stays armed while a server is attached, except when transaction
    /// pooling is about to hand it back.
    fn wants_server_read(&self) -> bool {
        self.server.as_ref().is_some_and(|s| s.rd.is_some()) && !self.releasable()
    }

    /// As [`Flow::releasable`], whatever the pool mode: for ending a session-mode client.
    fn releasable_when_gone(&self) -> bool {
        let Some(s) = self.server.as_ref() else {
            return false;
        };
        s.rd.is_some() && s.wr.is_some() && self.up_cur.skip == 0 && self.down_skip == 0 && self.dpartial == 0
    }

    /// The server owes nothing, holds no transaction, and no message is half-way across:
    /// it may go back to the pool (transaction mode), or the departed client's session
    /// may be reset (session mode).
    fn releasable(&self) -> bool {
        let Some(s) = self.server.as_ref() else {
            return false;
        };
        let whole = s.rd.is_some() && s.wr.is_some() && self.up_write.is_none();
        let nothing_partial = self.up_cur.skip == 0 && self.down_skip == 0 && self.dpartial == 0;
        let mode_allows =
            (self.mode == PoolMode::Transaction && !self.pinned && !self.settings_changed) || self.client_gone;
        whole && nothing_partial && mode_allows && self.tracker.is_idle() && self.hold == Hold::No && !self.retry.busy()
    }

    fn process_down(&mut self) -> Result<(), SessionError> {
        let (Some(buf), Some(server)) = (self.dbuf.as_ref(), self.server.as_mut()) else {
            return Ok(());
        };
        let mut st = DownState {
            skip: &mut self.down_skip,
            tracker: &mut self.tracker,
            queue: &mut self.queue,
            statements: &mut self.statements,
            server: &mut server.meta,
            client_settings: &mut self.who.settings,
            initial: &self.initial,
            synth: &mut self.synth,
            pinned: &mut self.pinned,
            resetting: &mut self.resetting,
            settings_changed: &mut self.settings_changed,
            captured: &mut self.captured,
            may_hold: self.reset_care && !self.client_gone,
            hold: &mut self.hold,
            retry: &mut self.retry,
        };
        let was_pinned = *st.pinned;
        let r = downstream::process(buf.data(), &mut st, self.dpend.vec_mut())?;
        if self.pinned && !was_pinned && self.mode == PoolMode::Transaction {
            log::info!(
                "C-{}: LISTEN under transaction pooling: the client keeps its server until it disconnects",
                self.who.id
            );
        }
        server.meta.tx_status = self.tracker.status();
        self.tally.queries += r.ready_for_query as u64;
        self.tally.xacts += r.xact_ends as u64;
        let len = buf.len();
        if r.zero_copy {
            self.dfwd = r.consumed;
        } else if let Some(b) = self.dbuf.as_mut() {
            b.consume(r.consumed);
        }
        self.dpartial = len - r.consumed;
        if r.ready_for_query > 0 {
            self.timed(r.xact_ends > 0);
        }
        match self.queue.finished.take() {
            Some(Injected::Resync) => {
                if let Some(server) = self.server.as_mut() {
                    after_sync(Arc::make_mut(&mut self.who.settings), &mut server.meta, &self.welcome);
                }
                if self.hold == Hold::Correcting {
                    self.release_hold();
                }
            }
            Some(Injected::Snapshot) => {
                let captured = std::mem::take(&mut self.captured);
                if let Some(server) = self.server.as_mut() {
                    apply_snapshot(
                        Arc::make_mut(&mut self.who.settings),
                        &mut server.meta,
                        &self.welcome,
                        &self.initial,
                        &captured,
                    );
                }
                if self.hold == Hold::Snapshot {
                    self.hold = Hold::Correct;
                }
            }
            None => {}
        }
        Ok(())
    }

    /// A server for the client's pending request: make its settings the client's, then
    /// let the directions use it.
    /// Attaches the server when its settings already match the client's (the common
    /// case); otherwise hands it back for [`Flow::sync_then_plug`], which the caller runs
    /// boxed so its large future does not sit in every session's state.
    fn try_plug(&mut self, conn: ServerConn) -> Option<ServerConn> {
        if sync_statement(&self.who.settings, &conn.meta).is_some() {
            return Some(conn);
        }
        self.plug(conn);
        None
    }

    async fn sync_then_plug(&mut self, mut conn: ServerConn) -> Result<(), SessionError> {
        if let Some(sql) = sync_statement(&self.who.settings, &conn.meta) {
            match Box::pin(conn.internal_query(&sql)).await {
                Ok(outcome) if outcome.error.is_none() && outcome.tx_status == b'I' => {
                    after_sync(Arc::make_mut(&mut self.who.settings), &mut conn.meta, &self.welcome);
                }
                Ok(outcome) => {
                    self.who.pool.release(conn, false);
                    let msg = outcome
                        .error
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "settings left a transaction open".into());
                    log::warn!("C-{}: could not apply session settings: {msg}", self.who.id);
                    return Err(PoolError::Connect(format!("could not apply session settings: {msg}")).into());
                }
                Err(e) => {
                    self.who.pool.release(conn, false);
                    return Err(e.into());
                }
            }
        }
        self.plug(conn);
        Ok(())
    }

    /// The server becomes the session's: cancel target, bookkeeping, halves.
    fn plug(&mut self, conn: ServerConn) {
        self.who.cancel.set(conn.meta.backend_secret.map(|secret| CancelTarget {
            addr: conn.meta.addr,
            pid: conn.meta.backend_pid,
            secret,
        }));
        WorkerPoolStats::add(&self.who.pool.stats().servers_active, 1);
        conn.meta.mark(ConnState::Active, self.who.id);
        self.who.entry.entry.set_state(ConnState::Active);
        self.who.entry.entry.set_link(conn.meta.id);
        let (rd, wr, meta) = conn.split();
        self.server = Some(Attached {
            rd: Some(rd),
            wr: Some(wr),
            meta,
        });
    }

    /// Takes the server out of the session; None if its halves are not both here.
    fn detach(&mut self) -> Option<ServerConn> {
        let s = self.server.take()?;
        self.server_left();
        self.queue.clear();
        self.rollback_sent = false;
        self.rollback_deadline = None;
        self.quiet_since = None;
        self.last_activity = Instant::now();
        match (s.rd, s.wr) {
            (Some(rd), Some(wr)) => ServerConn::reunite(rd, wr, s.meta),
            _ => None,
        }
    }

    /// Hands the server back: right away in transaction mode, after the reset query when
    /// a session-mode client has left (or always, with server_reset_query_always).
    /// Hands the server back at once, or returns it with the statement that must run
    /// on it first.
    fn release_now(&mut self) -> Option<(ServerConn, &'static str)> {
        let Some(conn) = self.detach() else {
            self.who.pool.slot_freed();
            return None;
        };
        self.park_buffers();
        self.flush_tally();
        let reset =
            !self.reset_query.is_empty() && ((self.mode == PoolMode::Session && self.client_gone) || self.reset_always);
        // A departed listener's channels must not deliver to the next client, nor a
        // departed client's SET (not yet read back) reach it.
        let unlisten = self.pinned && !reset;
        let unset = self.settings_changed && !reset;
        self.settings_changed = false;
        let sql = match (reset, unlisten, unset) {
            (true, _, _) => RESET_QUERY,
            (_, true, true) => "UNLISTEN *; RESET ALL",
            (_, true, false) => "UNLISTEN *",
            (_, false, true) => "RESET ALL",
            // A cancel request for this client may still be reaching the server: it
            // must not land on the next client's query (see CancelSlot::in_flight).
            _ if self.who.cancel.in_flight() > 0 => NOTHING,
            _ => {
                self.who.pool.release(conn, true);
                return None;
            }
        };
        Some((conn, sql))
    }

    async fn release_after(&mut self, mut conn: ServerConn, sql: &'static str) {
        if self.who.cancel.in_flight() > 0 && !self.cancels_done().await {
            log::warn!(
                "S-{}: closing because: a cancel request to it did not finish",
                conn.meta.id
            );
            self.who.pool.release(conn, false);
            return;
        }
        if sql == NOTHING {
            self.who.pool.release(conn, true);
            return;
        }
        let sql = if sql == RESET_QUERY {
            self.reset_query.as_str()
        } else {
            sql
        };
        match conn.internal_query(sql).await {
            Ok(o) if o.error.is_none() && o.tx_status == b'I' => self.who.pool.release(conn, true),
            Ok(o) => {
                log::warn!(
                    "S-{}: server_reset_query failed: {}",
                    conn.meta.id,
                    o.error.map(|e| e.to_string()).unwrap_or_default()
                );
                self.who.pool.release(conn, false);
            }
            Err(e) => {
                log::warn!("S-{}: server_reset_query failed: {e}", conn.meta.id);
                self.who.pool.release(conn, false);
            }
        }
    }

    /// Waits until the cancel requests sent on for this client are done; false if they
    /// outlast their own timeout.
    async fn cancels_done(&self) -> bool {
        let deadline = Instant::now() + CANCEL_TIMEOUT + Duration::from_secs(1);
        while self.who.cancel.in_flight() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            // Rare (a cancel racing the end of its query) and short: polling will do.
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }

    /// After a RESET: sends the statement that gives the server the client's settings
    /// again, its answers swallowed. Returns whether anything had to be sent.
    fn inject_resync(&mut self) -> bool {
        let Some(server) = self.server.as_ref() else {
            return false;
        };
        let Some(sql) = sync_statement(&self.who.settings, &server.meta) else {
            return false;
        };
        self.inject_query(&sql, Injected::Resync);
        true
    }

    /// Sends again the request that failed on a stale shared statement: processed afresh
    /// (the statement is now prepared anew first), written from pgsilo's output buffer.
    fn replay(&mut self) -> Result<(), SessionError> {
        let Some(bytes) = self.retry.take_replay() else {
            return Ok(());
        };
        let mut out = self.uout.take().unwrap_or_else(|| MsgBuf::with_capacity(0));
        out.clear();
        let r = self.up_process(&bytes, out.vec_mut());
        if let Ok(r) = &r {
            if r.zero_copy {
                out.extend_from_slice(&bytes[..r.consumed]);
            }
        }
        self.uout = Some(out);
        r?;
        log::info!(
            "C-{}: request ran on a stale shared statement; sent again after preparing it afresh",
            self.who.id
        );
        self.retry.recycle(bytes);
        self.up_write = Some(UpWrite::Copy(0));
        Ok(())
    }

    /// The settings are right: the client gets the ReadyForQuery it was waiting for, with
    /// the transaction status as it is now.
    fn release_hold(&mut self) {
        self.hold = Hold::No;
        backend::ready_for_query(self.dpend.vec_mut(), self.tracker.status());
    }

    /// Sends a query of pgsilo's own through the up slot; the queue swallows its answers.
    fn inject_query(&mut self, sql: &str, why: Injected) {
        let out = self.uout.get_or_insert_with(|| MsgBuf::with_capacity(64));
        out.clear();
        frontend::query(out.vec_mut(), sql);
        self.tracker.client_message(b'Q');
        self.queue.push(Expect::InjectedQuery(why));
        self.up_write = Some(UpWrite::Copy(0));
    }

    /// The client left and nothing is in flight, but the server's read half is still in
    /// a pending read: roll back an open transaction (or, outside one, send an empty
    /// query), so the answer completes the read and the server can be reused.
    fn inject_rollback(&mut self) {
        self.rollback_sent = true;
        self.rollback_deadline = Some(Instant::now() + ROLLBACK_TIMEOUT);
        let out = self.uout.get_or_insert_with(|| MsgBuf::with_capacity(64));
        out.clear();
        // Outside a transaction there is nothing to roll back; an empty query gets the
        // server's answer (which the pending read is waiting for) without a WARNING in
        // PostgreSQL's log for every client that leaves.
        let sql = if self.tracker.status() == b'I' { "" } else { "ROLLBACK" };
        frontend::query(out.vec_mut(), sql);
        self.tracker.client_message(b'Q');
        self.queue.push(Expect::Forward(Kind::Query));
        // Anything the client still had buffered is moot.
        let pending = self.ubuf.as_ref().map_or(0, |b| b.len());
        self.up_write = Some(UpWrite::Copy(pending));
    }

    /// Closes a server whose state cannot be known (a query was running when the client
    /// left). Its backend is cancelled so it does not run on with no one to answer.
    fn abandon_server(&mut self) {
        let Some(s) = self.server.take() else {
            return;
        };
        self.server_left();
        if let Some(secret) = s.meta.backend_secret {
            let target = CancelTarget {
                addr: s.meta.addr,
                pid: s.meta.backend_pid,
                secret,
            };
            monoio::spawn(async move {
                let _ = send_cancel(target).await;
            });
        }
        log::info!("S-{}: closing because: client left with a request in flight", s.meta.id);
        drop(s);
        self.who.pool.slot_freed();
    }

    /// The server closed or failed under the client. Whatever it said last (often a
    /// FATAL) goes to the client, then pgsilo's own error, so the client always learns why.
    async fn server_lost(&mut self) -> Result<(), SessionError> {
        if let Some(s) = self.server.take() {
            log::info!(
                "S-{}: server conn crashed or closed while serving C-{}",
                s.meta.id,
                self.who.id
            );
            self.server_left();
            drop(s);
            self.who.pool.slot_freed();
        }
        if self.client_gone {
            return Ok(());
        }
        if let Some(mut wr) = self.c_wr.take() {
            let mut out = Vec::new();
            if let Some(b) = self.dbuf.as_ref() {
                out.extend_from_slice(&b.data()[..self.dfwd.min(b.len())]);
            }
            out.extend_from_slice(self.dpend.data());
            backend::error_response(
                &mut out,
                Severity::Fatal,
                SqlState::CONNECTION_FAILURE,
                "server conn crashed?",
            );
            let _ = wr.write_all(out).await;
        }
        Err(SessionError::ServerGone)
    }

    /// A request (or several, pipelined) got its ReadyForQuery: record how long it took,
    /// and how long the transaction took if it ended.
    fn timed(&mut self, xact_ended: bool) {
        let now = Instant::now();
        let stats = self.who.pool.stats();
        if let Some(t) = self.req_started.take() {
            let d = now - t;
            stats.query_time.record(d);
            self.tally.query_time += d;
        }
        if self.tracker.outstanding() > 0 {
            self.req_started = Some(now);
        }
        self.quiet_since = (self.tracker.is_quiet() && self.tracker.status() != b'I').then_some(now);
        if xact_ended && self.tracker.status() == b'I' {
            if let Some(t) = self.xact_started.take() {
                let d = now - t;
                stats.xact_time.record(d);
                self.tally.xact_time += d;
            }
        }
    }

    /// Bookkeeping for a server leaving this session, whichever way it goes.
    fn server_left(&mut self) {
        self.who.cancel.set(None);
        WorkerPoolStats::add(&self.who.pool.stats().servers_active, -1);
        self.who.entry.entry.set_link(0);
    }

    fn flush_tally(&mut self) {
        let stats = self.who.pool.stats();
        let t = std::mem::take(&mut self.tally);
        stats.query_count.fetch_add(t.queries, Relaxed);
        stats.xact_count.fetch_add(t.xacts, Relaxed);
        stats.bytes_received.fetch_add(t.bytes_in, Relaxed);
        stats.bytes_sent.fetch_add(t.bytes_out, Relaxed);
        stats.query_time_us.fetch_add(t.query_time.as_micros() as u64, Relaxed);
        stats.xact_time_us.fetch_add(t.xact_time.as_micros() as u64, Relaxed);
    }

    fn finish_tally(&mut self) {
        self.flush_tally();
        if let Some(s) = self.server.take() {
            // The loop ended with a server still attached (an error path): its state is
            // unknown, so it is closed rather than reused.
            self.server_left();
            drop(s);
            self.who.pool.slot_freed();
        }
        WorkerPoolStats::add(&self.who.pool.stats().clients, -1);
    }
}
