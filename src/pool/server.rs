//! A logged-in connection to PostgreSQL and what pgsilo knows about its session.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use monoio::io::Splitable;

use super::prepared::PreparedCache;
use super::settings::{parse_parameter_status, Settings};
use super::PoolError;
use crate::metrics::{AcquirePath, ConnState, Registered};
use crate::net::{stream_of, Endpoint, Stream, StreamParts, StreamRd, StreamWr};
use crate::protocol::io::{read_message, write_out};
use crate::protocol::{frontend, ErrorFields, MsgBuf};

pub type ServerRd = StreamRd;
pub type ServerWr = StreamWr;

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// Server messages pgsilo reads whole during login and internal queries stay small;
/// anything beyond this is a broken or hostile peer.
pub const INTERNAL_MESSAGE_LIMIT: u32 = 1 << 20;

pub struct ServerConn {
    /// The socket's two halves, kept apart for the connection's whole life: a session
    /// reads and writes them concurrently, and splitting per transaction would cost an
    /// allocation each time.
    pub(crate) rd: ServerRd,
    pub(crate) wr: ServerWr,
    /// Boxed: it moves with the connection between pool, sessions and workers, and a
    /// session keeps it while attached; a pointer keeps all of those small.
    pub meta: Box<ServerMeta>,
}

/// Everything about a server connection except the socket; `Send`, so a connection can
/// move to another worker as (fd, meta).
#[derive(Debug)]
pub struct ServerMeta {
    pub id: u64,
    pub addr: Endpoint,
    pub local_port: u16,
    pub backend_pid: u32,
    /// None when the server's cancel key is not the 4-byte form of protocol 3.0.
    pub backend_secret: Option<u32>,
    /// The session settings as PostgreSQL last reported them, plus the unreported ones
    /// pgsilo set itself.
    pub settings: Settings,
    /// Lowercase names of settings pgsilo set that ParameterStatus never reports; they
    /// must be RESET for a client that did not ask for them.
    pub unreported: BTreeSet<String>,
    /// The generations (client's, then this server's; see `Settings::generation`) that
    /// last compared as matching, when the server had no unreported settings: the next
    /// client with the same settings skips the comparison (`proxy::params::sync_statement`).
    pub in_sync: std::cell::Cell<Option<(u64, u64)>>,
    pub created: Instant,
    pub last_used: Instant,
    /// The transaction status of the last ReadyForQuery.
    pub tx_status: u8,
    /// Statements prepared on this server under pgsilo's names.
    pub prepared: PreparedCache,
    /// Identity of the unnamed statement the server holds, when pgsilo knows it.
    pub unnamed_stmt: Option<u64>,
    /// Numbers the throwaway statements pgsilo prepares on this server (see
    /// `proxy::upstream`'s DEALLOCATE rewrite), so no two ever share a name.
    pub scratch_seq: u32,
    /// The server holds `pgsilo_dup`, the statement whose name pgsilo prepares again to
    /// have PostgreSQL report a client's duplicate PREPARE (see `proxy::upstream`).
    pub dup_probe: bool,
    /// This connection's row in SHOW SERVERS; removed when the connection is dropped.
    pub entry: Option<Registered>,
    /// How the connection last reached the pool's hands (opened, released, idle, moved
    /// over from another worker): the path its next client is counted under.
    pub via: AcquirePath,
    /// While attached to a client of a pool with max_busy_cores: its busy time, metered.
    pub busy: Option<super::busy::BusyTicket>,
}

impl ServerMeta {
    pub fn new(addr: Endpoint, local_port: u16) -> ServerMeta {
        let now = Instant::now();
        ServerMeta {
            id: NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed),
            addr,
            local_port,
            backend_pid: 0,
            backend_secret: None,
            settings: Settings::default(),
            unreported: BTreeSet::new(),
            in_sync: std::cell::Cell::new(None),
            created: now,
            last_used: now,
            tx_status: b'I',
            prepared: PreparedCache::default(),
            unnamed_stmt: None,
            scratch_seq: 0,
            dup_probe: false,
            entry: None,
            via: AcquirePath::New,
            busy: None,
        }
    }

    /// Records the server's state (and the client it serves) for SHOW SERVERS.
    #[inline]
    pub fn mark(&self, state: ConnState, client: u64) {
        if let Some(e) = &self.entry {
            e.entry.set_state(state);
            e.entry.set_link(client);
        }
    }

    /// What a completed command (its CommandComplete tag) did to the session state
    /// pgsilo keeps about this server.
    pub fn command_done(&mut self, tag: &[u8]) {
        match tag {
            b"DISCARD ALL" => {
                self.prepared.clear();
                self.dup_probe = false;
                self.forget_unreported();
            }
            b"DEALLOCATE ALL" => {
                self.prepared.clear();
                self.dup_probe = false;
            }
            b"RESET" => self.forget_unreported(),
            // ROLLBACK, ROLLBACK TO SAVEPOINT, or COMMIT of a failed transaction.
            b"ROLLBACK" => self.prepared.tx_failed(),
            _ => {}
        }
    }

    /// After RESET ALL / DISCARD ALL every setting is back to the server's default; the
    /// reported ones announce their new values, the unreported ones pgsilo forgets.
    pub fn forget_unreported(&mut self) {
        for name in std::mem::take(&mut self.unreported) {
            self.settings.remove(&name);
        }
    }
}

/// A server connection in transit between workers.
pub struct ServerParts {
    stream: StreamParts,
    pub meta: Box<ServerMeta>,
}

/// What an internal query left behind.
pub struct InternalOutcome {
    pub error: Option<ErrorFields>,
    pub tx_status: u8,
}

impl ServerConn {
    pub fn new(stream: Stream, meta: ServerMeta) -> ServerConn {
        let (rd, wr) = stream.into_split();
        ServerConn {
            rd,
            wr,
            meta: Box::new(meta),
        }
    }

    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        stream_of(&self.rd).local_addr()
    }

    /// "" for a plain connection, else the TLS version and cipher suite, for SHOW SERVERS.
    pub fn tls_text(&self) -> String {
        stream_of(&self.rd)
            .tls()
            .map(|t| crate::tls::describe(t.connection()))
            .unwrap_or_default()
    }

    /// True when the server has neither closed the socket nor sent anything unasked.
    /// An idle server that speaks is being terminated (or reports a setting change after
    /// a server reload); either way it is not safe to hand to a client. Only called on
    /// idle connections, which have no read in flight.
    pub fn is_alive(&self) -> bool {
        stream_of(&self.rd).peek().is_none()
    }

    pub fn split(self) -> (ServerRd, ServerWr, Box<ServerMeta>) {
        (self.rd, self.wr, self.meta)
    }

    /// Puts a connection back together from what a session held.
    pub fn reunite(rd: ServerRd, wr: ServerWr, meta: Box<ServerMeta>) -> Option<ServerConn> {
        Some(ServerConn { rd, wr, meta })
    }

    /// Takes the socket out of this worker's runtime so another worker can adopt it.
    /// Only called on idle connections, which have no operation in flight. None if the
    /// halves do not belong together, which would be a bug; the socket then closes.
    pub fn detach(self) -> Option<ServerParts> {
        let stream = self.rd.reunite(self.wr).ok()?;
        Some(ServerParts {
            stream: stream.detach(),
            meta: self.meta,
        })
    }

    pub fn adopt(parts: ServerParts, worker: usize) -> std::io::Result<ServerConn> {
        if let Some(e) = &parts.meta.entry {
            e.entry.set_worker(worker);
        }
        let (rd, wr) = Stream::adopt(parts.stream)?.into_split();
        let mut meta = parts.meta;
        meta.via = AcquirePath::OtherWorker;
        Ok(ServerConn { rd, wr, meta })
    }

    /// Runs a simple query pgsilo itself needs (reset, settings, rollback) and reads up to
    /// its ReadyForQuery, keeping track of reported settings. Rows are discarded.
    pub async fn internal_query(&mut self, sql: &str) -> Result<InternalOutcome, PoolError> {
        let mut out = Vec::with_capacity(sql.len() + 8);
        frontend::query(&mut out, sql);
        let (res, _) = write_out(&mut self.wr, out).await;
        res?;
        let mut buf = MsgBuf::with_capacity(512);
        let mut error = None;
        loop {
            let (res, back) = read_message(&mut self.rd, buf, INTERNAL_MESSAGE_LIMIT).await;
            buf = back;
            let h = res?;
            let body = &buf.data()[5..h.total()];
            match h.tag {
                b'Z' => {
                    let status = body.first().copied().unwrap_or(b'I');
                    self.meta.tx_status = status;
                    return Ok(InternalOutcome {
                        error,
                        tx_status: status,
                    });
                }
                b'E' => error = Some(ErrorFields::parse(body)),
                b'S' => {
                    if let Some((name, value)) = parse_parameter_status(body) {
                        self.meta.settings.set(name, value);
                    }
                }
                b'C' => self.meta.command_done(body.strip_suffix(&[0]).unwrap_or(body)),
                // COPY cannot be started by pgsilo's own statements; anything else
                // (rows, notices) is of no interest.
                _ => {}
            }
            buf.consume(h.total());
        }
    }

    /// Says goodbye politely so the server logs a clean disconnect, then closes.
    pub async fn terminate(mut self) {
        let mut out = Vec::with_capacity(5);
        frontend::terminate(&mut out);
        let _ = write_out(&mut self.wr, out).await;
    }

    /// Terminate, then wait (at most `limit`) until PostgreSQL has closed its end: its
    /// backend has exited, so a connection opened in its place never makes PostgreSQL
    /// see one more than the caps allow.
    pub async fn terminate_and_wait(mut self, limit: std::time::Duration) {
        let mut out = Vec::with_capacity(5);
        frontend::terminate(&mut out);
        let (res, _) = write_out(&mut self.wr, out).await;
        if res.is_err() {
            return;
        }
        let _ = monoio::time::timeout(limit, async {
            let mut buf = Vec::with_capacity(64);
            loop {
                let (res, back) = monoio::io::AsyncReadRent::read(&mut self.rd, buf).await;
                buf = back;
                buf.clear();
                match res {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}
