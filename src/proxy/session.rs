//! A logged-in client: forwarding in both directions, attaching a server when the client
//! needs one and handing it back when the pool mode allows, cleaning up when either side
//! leaves.
//!
//! Each direction is one owned I/O operation at a time (read, then write what was read),
//! kept alive across loop turns rather than raced and dropped: an io_uring read that is
//! cancelled may already have consumed bytes, so no read is ever abandoned while the
//! session runs. The loop polls both directions and the pool wait together.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;
use std::time::{Duration, Instant};

use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;

use super::cancel::{send_cancel, CancelTarget};
use super::login::LoggedIn;
use super::params::{after_sync, sync_statement};
use super::scan::{bytes_wanted, scan_client, scan_server, Cursor, ServerEvents};
use super::tx_tracker::TxTracker;
use super::SessionError;
use crate::config::PoolMode;
use crate::pool::settings::parse_parameter_status;
use crate::pool::{LocalPool, PoolError, ServerConn, ServerMeta, ServerRd, ServerWr, Settings};
use crate::protocol::backend::{self, Severity};
use crate::protocol::{frontend, ErrorFields, MsgBuf, SqlState};
use crate::runtime::worker::WorkerCtx;

type ClientRd = OwnedReadHalf<TcpStream>;
type ClientWr = OwnedWriteHalf<TcpStream>;

/// How long a departed client's open transaction may take to roll back before the
/// server is closed instead.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(10);

enum Step<R, W> {
    Read(R, MsgBuf),
    Write(W, MsgBuf, usize),
}

enum Done<R, W> {
    Read(R, std::io::Result<usize>, MsgBuf),
    Write(W, std::io::Result<usize>, MsgBuf),
}

async fn run_step<R: AsyncReadRent, W: AsyncWriteRent>(step: Step<R, W>) -> Done<R, W> {
    match step {
        Step::Read(mut r, buf) => {
            let (res, back) = r.read(buf.into_read()).await;
            Done::Read(r, res, back.into_inner())
        }
        Step::Write(mut w, buf, n) => {
            let (res, back) = w.write_all(buf.into_write(n)).await;
            Done::Write(w, res, back.into_inner())
        }
    }
}

async fn acquire(pool: Rc<LocalPool>, wait: Option<Duration>) -> Result<ServerConn, PoolError> {
    pool.acquire(wait).await
}

enum Event {
    Up(Done<ClientRd, ServerWr>),
    Down(Done<ServerRd, ClientWr>),
    Acquired(Result<ServerConn, PoolError>),
    Deadline,
}

/// The server a client is using, in pieces while the directions own them.
struct Attached {
    rd: Option<ServerRd>,
    wr: Option<ServerWr>,
    meta: ServerMeta,
    since: Instant,
}

/// Per-session counters, folded into the pool's at each release so the shared cache
/// line is touched once per transaction, not per message.
#[derive(Default)]
struct Tally {
    queries: u64,
    xacts: u64,
    bytes_in: u64,
    bytes_out: u64,
    server_time: Duration,
}

struct Flow {
    who: LoggedIn,
    mode: PoolMode,
    pkt_buf: usize,
    wait_timeout: Option<Duration>,
    reset_query: String,
    reset_always: bool,
    welcome: Rc<Settings>,
    c_rd: Option<ClientRd>,
    c_wr: Option<ClientWr>,
    server: Option<Attached>,
    ubuf: Option<MsgBuf>,
    dbuf: Option<MsgBuf>,
    up_ready: usize,
    up_cur: Cursor,
    up_needs_server: bool,
    down_ready: usize,
    down_cur: Cursor,
    tracker: TxTracker,
    /// No more reads from the client: it sent Terminate, closed, or failed.
    client_gone: bool,
    rollback_deadline: Option<Instant>,
    tally: Tally,
}

/// Reported settings and errors seen while forwarding.
struct Seen<'a> {
    client: &'a mut Settings,
    server: &'a mut ServerMeta,
}

impl ServerEvents for Seen<'_> {
    fn parameter_status(&mut self, body: &[u8]) {
        if let Some((name, value)) = parse_parameter_status(body) {
            // The client changed it (SET) or the server did: either way it is now what
            // this client has, and what the server has.
            self.server.settings.set(name, value);
            if crate::pool::settings::is_tracked_reported(&name.to_ascii_lowercase()) {
                self.client.set(name, value);
            }
        }
    }

    fn error(&mut self, body: &[u8]) {
        if let Some(code) = ErrorFields::code_of(body) {
            log::debug!("server error {}", String::from_utf8_lossy(&code));
        }
    }
}

pub async fn serve(
    ctx: Rc<WorkerCtx>,
    stream: TcpStream,
    who: LoggedIn,
) -> Result<(), SessionError> {
    let config = ctx.instance.config();
    let g = &config.general;
    let pkt_buf = g.pkt_buf.max(1024);
    let mode = who.pool.shared.mode;
    let welcome = Rc::new(
        who.pool
            .shared
            .welcome()
            .map(|w| (*w).clone())
            .unwrap_or_default(),
    );
    let (c_rd, c_wr) = stream.into_split();
    let mut flow = Flow {
        mode,
        pkt_buf,
        wait_timeout: g.query_wait_timeout,
        reset_query: g.server_reset_query.clone().unwrap_or_default(),
        reset_always: g.server_reset_query_always,
        welcome,
        c_rd: Some(c_rd),
        c_wr: Some(c_wr),
        server: None,
        ubuf: Some(MsgBuf::with_capacity(pkt_buf)),
        dbuf: Some(MsgBuf::with_capacity(pkt_buf)),
        up_ready: 0,
        up_cur: Cursor::default(),
        up_needs_server: false,
        down_ready: 0,
        down_cur: Cursor::default(),
        tracker: TxTracker::default(),
        client_gone: false,
        rollback_deadline: None,
        tally: Tally::default(),
        who,
    };
    drop(config);
    let result = flow.run().await;
    flow.finish_tally();
    result
}

impl Flow {
    async fn run(&mut self) -> Result<(), SessionError> {
        let mut up = pin!(None::<Step<ClientRd, ServerWr>>.map(run_step));
        let mut down = pin!(None::<Step<ServerRd, ClientWr>>.map(run_step));
        let mut acq = pin!(None::<(Rc<LocalPool>, Option<Duration>)>.map(|(p, w)| acquire(p, w)));
        let mut timer = pin!(None::<Instant>.map(|d| monoio::time::sleep_until(d.into())));

        loop {
            // Start whatever each direction can do next.
            if up.is_none() && acq.is_none() {
                if self.up_ready > 0 && !self.up_needs_server && self.server.is_none() {
                    // Stray COPY data after a failed COPY, or a bare Flush: the server
                    // would ignore it, so there is no need to find one.
                    if let Some(b) = self.ubuf.as_mut() {
                        b.consume(self.up_ready);
                    }
                    self.up_ready = 0;
                }
                if self.up_ready > 0 {
                    if let Some(wr) = self.server.as_mut().and_then(|s| s.wr.take()) {
                        let buf = self.take_ubuf();
                        up.set(Some(run_step(Step::Write(wr, buf, self.up_ready))));
                    } else if self.server.is_none() {
                        acq.set(Some(acquire(self.who.pool.clone(), self.wait_timeout)));
                    }
                } else if !self.client_gone {
                    if let (Some(rd), Some(mut buf)) = (self.c_rd.take(), self.ubuf.take()) {
                        buf.reserve(bytes_wanted(buf.data()).max(1024).min(self.pkt_buf));
                        up.set(Some(run_step(Step::Read(rd, buf))));
                    }
                }
            }
            if down.is_none() {
                if self.down_ready > 0 {
                    if self.client_gone {
                        if let Some(b) = self.dbuf.as_mut() {
                            b.consume(self.down_ready);
                        }
                        self.down_ready = 0;
                    } else if let (Some(wr), Some(buf)) = (self.c_wr.take(), self.dbuf.take()) {
                        down.set(Some(run_step(Step::Write(wr, buf, self.down_ready))));
                    }
                }
                if down.is_none() && self.down_ready == 0 && self.wants_server_read() {
                    if let (Some(rd), Some(mut buf)) = (
                        self.server.as_mut().and_then(|s| s.rd.take()),
                        self.dbuf.take(),
                    ) {
                        let want = bytes_wanted(buf.data());
                        buf.reserve(want.max(1024));
                        down.set(Some(run_step(Step::Read(rd, buf))));
                    }
                }
            }
            if self.server.is_some() && up.is_none() && down.is_none() && self.releasable() {
                self.release().await;
            }
            if self.client_gone && up.is_none() && acq.is_none() {
                if self.server.is_none() {
                    return Ok(());
                }
                if down.is_none() && !self.releasable() {
                    // Server mid-request, client gone, nothing left to read: give up on it.
                    self.abandon_server();
                    return Ok(());
                }
            }
            let deadline = self.rollback_deadline;
            if timer.is_none() {
                if let Some(d) = deadline {
                    timer.set(Some(monoio::time::sleep_until(d.into())));
                }
            }

            let event = poll_fn(|cx| {
                if let Some(f) = up.as_mut().as_pin_mut() {
                    if let Poll::Ready(d) = f.poll(cx) {
                        up.set(None);
                        return Poll::Ready(Event::Up(d));
                    }
                }
                if let Some(f) = down.as_mut().as_pin_mut() {
                    if let Poll::Ready(d) = f.poll(cx) {
                        down.set(None);
                        return Poll::Ready(Event::Down(d));
                    }
                }
                if let Some(f) = acq.as_mut().as_pin_mut() {
                    if let Poll::Ready(r) = f.poll(cx) {
                        acq.set(None);
                        return Poll::Ready(Event::Acquired(r));
                    }
                }
                if let Some(f) = timer.as_mut().as_pin_mut() {
                    if let Poll::Ready(()) = f.poll(cx) {
                        timer.set(None);
                        return Poll::Ready(Event::Deadline);
                    }
                }
                Poll::Pending
            })
            .await;

            match event {
                Event::Up(Done::Read(rd, res, buf)) => {
                    self.c_rd = Some(rd);
                    self.ubuf = Some(buf);
                    match res {
                        Ok(0) | Err(_) => self.client_left(),
                        Ok(n) => {
                            self.tally.bytes_in += n as u64;
                            self.scan_up()?;
                        }
                    }
                }
                Event::Up(Done::Write(wr, res, mut buf)) => {
                    if let Some(s) = self.server.as_mut() {
                        s.wr = Some(wr);
                    }
                    match res {
                        Ok(_) => {
                            buf.consume(self.up_ready);
                            self.up_ready = 0;
                            self.ubuf = Some(buf);
                            // Anything left is a partial message; scan it again after the
                            // next read (the cursor already knows about streamed bodies).
                        }
                        Err(_) => {
                            self.ubuf = Some(buf);
                            return self.server_lost().await;
                        }
                    }
                }
                Event::Down(Done::Read(rd, res, buf)) => {
                    if let Some(s) = self.server.as_mut() {
                        s.rd = Some(rd);
                    }
                    self.dbuf = Some(buf);
                    match res {
                        Ok(0) | Err(_) => return self.server_lost().await,
                        Ok(_) => self.scan_down()?,
                    }
                }
                Event::Down(Done::Write(wr, res, mut buf)) => {
                    self.c_wr = Some(wr);
                    match res {
                        Ok(n) => {
                            self.tally.bytes_out += n as u64;
                            buf.consume(self.down_ready);
                            self.down_ready = 0;
                            if self.server.is_none() {
                                buf.shrink_to(self.pkt_buf);
                            }
                        }
                        Err(_) => {
                            buf.consume(self.down_ready);
                            self.down_ready = 0;
                            self.client_left();
                        }
                    }
                    self.dbuf = Some(buf);
                }
                Event::Acquired(Ok(conn)) => self.attach(conn).await?,
                Event::Acquired(Err(e)) => return Err(e.into()),
                Event::Deadline => {
                    if self.rollback_deadline.is_some_and(|d| Instant::now() >= d) {
                        log::info!(
                            "C-{}: rollback after client left took too long; closing server",
                            self.who.id
                        );
                        self.rollback_deadline = None;
                        // Dropping the in-flight operations closes the server socket.
                        up.set(None);
                        down.set(None);
                        self.abandon_server();
                        return Ok(());
                    }
                }
            }
        }
    }

    fn take_ubuf(&mut self) -> MsgBuf {
        self.ubuf
            .take()
            .unwrap_or_else(|| MsgBuf::with_capacity(self.pkt_buf))
    }

    /// The server read stays armed while a server is attached, except when transaction
    /// pooling is about to hand it back.
    fn wants_server_read(&self) -> bool {
        let Some(s) = self.server.as_ref() else {
            return false;
        };
        if s.rd.is_none() {
            return false;
        }
        !self.releasable()
    }

    /// The server owes nothing, holds no transaction, and no message is half-way across:
    /// it may go back to the pool (transaction mode), or the departed client's session
    /// may be reset (session mode).
    fn releasable(&self) -> bool {
        let Some(s) = self.server.as_ref() else {
            return false;
        };
        let whole = s.rd.is_some() && s.wr.is_some();
        let nothing_partial = self.up_cur.skip == 0
            && self.down_cur.skip == 0
            && self
                .dbuf
                .as_ref()
                .is_none_or(|b| b.len() == self.down_ready);
        let mode_allows = self.mode == PoolMode::Transaction || self.client_gone;
        whole && nothing_partial && mode_allows && self.tracker.is_idle()
    }

    fn scan_up(&mut self) -> Result<(), SessionError> {
        let Some(buf) = self.ubuf.as_ref() else {
            return Ok(());
        };
        let scan = scan_client(
            &buf.data()[self.up_ready..],
            &mut self.up_cur,
            &mut self.tracker,
        )?;
        self.up_ready += scan.ready;
        self.up_needs_server |= scan.needs_server;
        if scan.terminate {
            // Whatever came before Terminate still goes out; nothing after it matters.
            let keep = self.up_ready;
            if let Some(b) = self.ubuf.as_mut() {
                b.truncate(keep);
            }
            self.client_left();
        }
        Ok(())
    }

    fn scan_down(&mut self) -> Result<(), SessionError> {
        let (Some(buf), Some(server)) = (self.dbuf.as_ref(), self.server.as_mut()) else {
            return Ok(());
        };
        let mut seen = Seen {
            client: &mut self.who.settings,
            server: &mut server.meta,
        };
        let scan = scan_server(
            &buf.data()[self.down_ready..],
            &mut self.down_cur,
            &mut self.tracker,
            &mut seen,
        )?;
        self.down_ready += scan.ready;
        self.tally.queries += scan.ready_for_query as u64;
        self.tally.xacts += scan.xact_ends as u64;
        server.meta.tx_status = self.tracker.status();
        Ok(())
    }

    /// A server for the client's pending request: make its settings the client's, then
    /// let the directions use it.
    async fn attach(&mut self, mut conn: ServerConn) -> Result<(), SessionError> {
        if let Some(sql) = sync_statement(&self.who.settings, &conn.meta) {
            match conn.internal_query(&sql).await {
                Ok(outcome) if outcome.error.is_none() && outcome.tx_status == b'I' => {
                    after_sync(&mut self.who.settings, &mut conn.meta, &self.welcome);
                }
                Ok(outcome) => {
                    self.who.pool.release(conn, false);
                    let msg = outcome
                        .error
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "settings left a transaction open".into());
                    log::warn!("C-{}: could not apply session settings: {msg}", self.who.id);
                    return Err(PoolError::Connect(format!(
                        "could not apply session settings: {msg}"
                    ))
                    .into());
                }
                Err(e) => {
                    self.who.pool.release(conn, false);
                    return Err(e.into());
                }
            }
        }
        self.who
            .cancel
            .set(conn.meta.backend_secret.map(|secret| CancelTarget {
                addr: conn.meta.addr,
                pid: conn.meta.backend_pid,
                secret,
            }));
        self.who
            .pool
            .shared
            .stats
            .servers_active
            .fetch_add(1, Relaxed);
        let (rd, wr, meta) = conn.split();
        self.server = Some(Attached {
            rd: Some(rd),
            wr: Some(wr),
            meta,
            since: Instant::now(),
        });
        Ok(())
    }

    fn detach(&mut self) -> Option<ServerConn> {
        let s = self.server.take()?;
        self.who.cancel.set(None);
        self.who
            .pool
            .shared
            .stats
            .servers_active
            .fetch_sub(1, Relaxed);
        self.tally.server_time += s.since.elapsed();
        match (s.rd, s.wr) {
            (Some(rd), Some(wr)) => ServerConn::reunite(rd, wr, s.meta),
            _ => None,
        }
    }

    /// Hands the server back: right away in transaction mode, after the reset query when
    /// a session-mode client has left.
    async fn release(&mut self) {
        self.up_needs_server = false;
        self.rollback_deadline = None;
        let run_reset = self.mode == PoolMode::Session || self.reset_always;
        let Some(mut conn) = self.detach() else {
            self.who.pool.slot_freed();
            return;
        };
        self.flush_tally();
        if run_reset && !self.reset_query.is_empty() && (self.client_gone || self.reset_always) {
            match conn.internal_query(&self.reset_query).await {
                Ok(o) if o.error.is_none() && o.tx_status == b'I' => conn.meta.forget_unreported(),
                Ok(o) => {
                    log::warn!(
                        "S-{}: server_reset_query failed: {}",
                        conn.meta.id,
                        o.error.map(|e| e.to_string()).unwrap_or_default()
                    );
                    self.who.pool.release(conn, false);
                    return;
                }
                Err(e) => {
                    log::warn!("S-{}: server_reset_query failed: {e}", conn.meta.id);
                    self.who.pool.release(conn, false);
                    return;
                }
            }
        }
        self.who.pool.release(conn, true);
    }

    /// The client is done sending (Terminate, EOF, or an error). If its server sits in
    /// a transaction with nothing in flight, roll it back and reuse it; if a request is
    /// in flight, the loop closes the server once nothing more can be learned.
    fn client_left(&mut self) {
        if self.client_gone {
            return;
        }
        self.client_gone = true;
        let Some(server) = self.server.as_ref() else {
            return;
        };
        if self.tracker.is_quiet()
            && self.tracker.status() != b'I'
            && self.up_ready == 0
            && server.wr.is_some()
        {
            let buf = self.ubuf.get_or_insert_with(|| MsgBuf::with_capacity(64));
            buf.clear();
            frontend::query(buf.vec_mut(), "ROLLBACK");
            self.up_ready = buf.len();
            self.up_needs_server = true;
            self.tracker.client_message(b'Q');
            self.rollback_deadline = Some(Instant::now() + ROLLBACK_TIMEOUT);
        }
    }

    /// Closes a server whose state cannot be known (a query was running when the client
    /// left). Its backend is cancelled so it does not run on with no one to answer.
    fn abandon_server(&mut self) {
        let Some(s) = self.server.take() else {
            return;
        };
        self.who.cancel.set(None);
        self.who
            .pool
            .shared
            .stats
            .servers_active
            .fetch_sub(1, Relaxed);
        if !self.tracker.is_quiet() {
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
        }
        log::info!(
            "S-{}: closing because: client left with a request in flight",
            s.meta.id
        );
        drop(s);
        self.who.pool.slot_freed();
    }

    /// The server closed or failed under the client. Whatever it said last (often a
    /// FATAL) has been forwarded; pgsilo adds its own so the client always learns why.
    async fn server_lost(&mut self) -> Result<(), SessionError> {
        if let Some(s) = self.server.take() {
            log::info!(
                "S-{}: server conn crashed or closed while serving C-{}",
                s.meta.id,
                self.who.id
            );
            self.who.cancel.set(None);
            self.who
                .pool
                .shared
                .stats
                .servers_active
                .fetch_sub(1, Relaxed);
            drop(s);
            self.who.pool.slot_freed();
        }
        if self.client_gone {
            return Ok(());
        }
        // Flush what was already read from the server, then the error.
        if let (Some(mut wr), Some(mut buf)) = (self.c_wr.take(), self.dbuf.take()) {
            buf.truncate(self.down_ready);
            let mut out = buf.data().to_vec();
            backend::error_response(
                &mut out,
                Severity::Fatal,
                SqlState::CONNECTION_FAILURE,
                "server conn crashed?",
            );
            let _ = wr.write_all(out).await;
        }
        Err(SessionError::ClientGone(
            crate::protocol::io::WireError::Closed,
        ))
    }

    fn flush_tally(&mut self) {
        let stats = &self.who.pool.shared.stats;
        let t = std::mem::take(&mut self.tally);
        stats.query_count.fetch_add(t.queries, Relaxed);
        stats.xact_count.fetch_add(t.xacts, Relaxed);
        stats.bytes_received.fetch_add(t.bytes_in, Relaxed);
        stats.bytes_sent.fetch_add(t.bytes_out, Relaxed);
        stats
            .xact_time_us
            .fetch_add(t.server_time.as_micros() as u64, Relaxed);
    }

    fn finish_tally(&mut self) {
        self.flush_tally();
        if let Some(s) = self.server.take() {
            // The loop ended with a server still attached (an error path): its state is
            // unknown, so it is closed rather than reused.
            self.who.cancel.set(None);
            self.who
                .pool
                .shared
                .stats
                .servers_active
                .fetch_sub(1, Relaxed);
            drop(s);
            self.who.pool.slot_freed();
        }
    }
}
