//! LISTEN/NOTIFY under transaction pooling: the instance-wide subscription registry and,
//! per pool, one listener connection that holds the union of its clients' LISTENs.
//!
//! A client's `LISTEN ch` / `UNLISTEN ch` / `UNLISTEN *` (a simple Query of only these,
//! outside a transaction block) changes only that client's entry here; the pool's
//! listener is asked to LISTEN or UNLISTEN as the union changes. The listener is a server
//! connection of its own, opened with `pool::connect` like the pool's servers but outside
//! the pool's size cap (it never serves a client's queries). Each NotificationResponse it
//! receives goes, as it came, to every subscribed client of the instance: one
//! [`ControlMsg::Notify`] per worker that has some, through the workers' control inboxes,
//! so a client sees its notifications in the listener's order. The process id in them is
//! the listener backend's, as with PgBouncer.
//!
//! When the listener connection dies it is opened again (with backoff) and LISTENs to the
//! whole union again; every subscribed client gets a NOTICE that notifications may have
//! been missed meanwhile. When the union is empty the listener closes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures_channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures_channel::oneshot;
use futures_core::Stream;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

use super::control::ControlMsg;
use super::instance::Instance;
use crate::pool::connect::connect;
use crate::pool::{ServerConn, ServerRd, SharedPool};
use crate::protocol::backend::{cstr, message};
use crate::protocol::{frontend, Header, MsgBuf};

/// A subscriber: (worker, client id).
type Sub = (usize, u64);

/// What a pool's listener task is asked to do.
enum Cmd {
    /// Bring the server's LISTENs in line with the union; answer once done (or tried).
    Sync(Option<oneshot::Sender<()>>),
}

#[derive(Default)]
struct PoolListens {
    channels: HashMap<Vec<u8>, BTreeSet<Sub>>,
    /// The listener task's inbox; None when no task runs.
    task: Option<UnboundedSender<Cmd>>,
}

/// One change to a client's subscriptions.
pub enum Change<'a> {
    Listen(&'a [u8]),
    Unlisten(&'a [u8]),
    UnlistenAll,
}

/// Every pool's subscriptions, instance-wide.
#[derive(Default)]
pub struct ListenHub {
    pools: Mutex<HashMap<usize, PoolListens>>,
}

/// The most a session waits for its LISTEN to be in place on the listener before
/// answering anyway (the listener keeps trying, and the client gets the NOTICE).
pub const LISTEN_ACK_WAIT: Duration = Duration::from_secs(10);
/// The listener's reconnect backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl ListenHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, PoolListens>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a client's changes. Returns what to wait on when a channel joined the
    /// union (answered once the listener LISTENs to it). Must run on a worker: a listener
    /// task that is needed and missing is started on this one.
    pub fn apply(
        &self,
        instance: &Arc<Instance>,
        pool: &Arc<SharedPool>,
        sub: Sub,
        changes: &[Change<'_>],
    ) -> Option<oneshot::Receiver<()>> {
        let mut pools = self.lock();
        let p = pools.entry(pool.id).or_default();
        let mut grew = false;
        let mut shrank = false;
        for c in changes {
            match c {
                Change::Listen(ch) => {
                    let subs = p.channels.entry(ch.to_vec()).or_default();
                    grew |= subs.is_empty();
                    subs.insert(sub);
                }
                Change::Unlisten(ch) => {
                    if let Some(subs) = p.channels.get_mut(*ch) {
                        subs.remove(&sub);
                        if subs.is_empty() {
                            p.channels.remove(*ch);
                            shrank = true;
                        }
                    }
                }
                Change::UnlistenAll => shrank |= remove_everywhere(p, sub),
            }
        }
        if grew {
            let (tx, rx) = oneshot::channel();
            let task = p.task.get_or_insert_with(|| {
                let (cmd_tx, cmd_rx) = unbounded();
                monoio::spawn(listener(instance.clone(), pool.clone(), sub.0, cmd_rx));
                cmd_tx
            });
            let _ = task.unbounded_send(Cmd::Sync(Some(tx)));
            return Some(rx);
        }
        if shrank {
            if let Some(task) = &p.task {
                let _ = task.unbounded_send(Cmd::Sync(None));
            }
        }
        None
    }

    /// A client that leaves: all its subscriptions go.
    pub fn forget(&self, pool: usize, sub: Sub) {
        let mut pools = self.lock();
        let Some(p) = pools.get_mut(&pool) else {
            return;
        };
        if remove_everywhere(p, sub) {
            if let Some(task) = &p.task {
                let _ = task.unbounded_send(Cmd::Sync(None));
            }
        }
    }

    /// The channels some client of the pool listens to.
    fn union(&self, pool: usize) -> BTreeSet<Vec<u8>> {
        self.lock()
            .get(&pool)
            .map(|p| p.channels.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The listener task may end: nobody listens. Decided under the lock, so a client
    /// that subscribes at the same moment starts a new task.
    fn retire_if_unused(&self, pool: usize) -> bool {
        let mut pools = self.lock();
        match pools.get_mut(&pool) {
            Some(p) if p.channels.is_empty() => {
                p.task = None;
                true
            }
            None => true,
            Some(_) => false,
        }
    }

    /// Sends `msg` to the subscribers of `channel` (every subscriber of the pool with None).
    fn deliver(&self, instance: &Instance, pool: usize, channel: Option<&[u8]>, msg: &[u8]) {
        let mut by_worker: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        {
            let pools = self.lock();
            let Some(p) = pools.get(&pool) else {
                return;
            };
            let mut add = |subs: &BTreeSet<Sub>| {
                for &(w, c) in subs {
                    let v = by_worker.entry(w).or_default();
                    if !v.contains(&c) {
                        v.push(c);
                    }
                }
            };
            match channel {
                Some(ch) => {
                    if let Some(subs) = p.channels.get(ch) {
                        add(subs);
                    }
                }
                None => p.channels.values().for_each(add),
            }
        }
        if by_worker.is_empty() {
            return;
        }
        let msg: Arc<[u8]> = Arc::from(msg);
        if let Some(workers) = instance.control.get() {
            for (w, to) in by_worker {
                if let Some(inbox) = workers.get(w) {
                    let _ = inbox.unbounded_send(ControlMsg::Notify { to, msg: msg.clone() });
                }
            }
        }
    }
}

fn remove_everywhere(p: &mut PoolListens, sub: Sub) -> bool {
    let before = p.channels.len();
    p.channels.retain(|_, subs| {
        subs.remove(&sub);
        !subs.is_empty()
    });
    p.channels.len() != before
}

/// A client's subscriptions, dropped with its session: the client unsubscribes however
/// the session ends.
pub struct Subscription {
    pub instance: Arc<Instance>,
    pub pool: Arc<SharedPool>,
    pub sub: Sub,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.instance.listens.forget(self.pool.id, self.sub);
    }
}

/// The NOTICE a subscribed client gets when the listener connection was lost.
fn missed_notice(out: &mut Vec<u8>) {
    message(out, b'N', |b| {
        for (field, value) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', "01000"),
            (
                b'M',
                "pgsilo: the LISTEN connection to the server was lost and re-established; notifications may have been missed",
            ),
        ] {
            b.push(field);
            cstr(b, value);
        }
        b.push(0);
    });
}

/// A channel name as an SQL identifier (always quoted: the name is already resolved).
fn quote_ident(out: &mut String, name: &[u8]) {
    out.push('"');
    for c in String::from_utf8_lossy(name).chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
}

/// A pool's listener: keeps one server connection LISTENing to the union of the pool's
/// subscriptions and hands on what it receives.
async fn listener(instance: Arc<Instance>, pool: Arc<SharedPool>, worker: usize, mut cmds: UnboundedReceiver<Cmd>) {
    let hub = &instance.listens;
    let mut backoff = BACKOFF_MIN;
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    // Set after a connection was lost or could not be opened: the clients are told,
    // once a new one listens, that they may have missed notifications.
    let mut lost = false;
    loop {
        if hub.retire_if_unused(pool.id) {
            return;
        }
        let (target, client_key) = pool.login_material();
        let conn = match connect(&target, client_key, &pool.database, worker).await {
            Ok(c) => c,
            Err(e) => {
                log::warn!(
                    "{}/{}: cannot open the LISTEN connection: {e}; retrying in {backoff:?}",
                    pool.database,
                    pool.user
                );
                // Nobody waits for a connection that may take long.
                let _ = drain_cmds(&mut cmds, &mut waiting);
                answer_all(&mut waiting);
                monoio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                lost = true;
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        log::info!(
            "{}/{}: LISTEN connection S-{} (pid {}) open",
            pool.database,
            pool.user,
            conn.meta.id,
            conn.meta.backend_pid
        );
        let end = serve_listener(&instance, &pool, conn, &mut cmds, &mut waiting, &mut lost).await;
        match end {
            ListenerEnd::Retired => return,
            ListenerEnd::Lost => {
                lost = true;
                log::warn!(
                    "{}/{}: the LISTEN connection was lost; opening it again",
                    pool.database,
                    pool.user
                );
            }
        }
    }
}

enum ListenerEnd {
    Retired,
    Lost,
}

/// Tells the sessions waiting for their LISTEN to be placed that it is done (or tried).
fn answer_all(waiting: &mut Vec<oneshot::Sender<()>>) {
    for w in waiting.drain(..) {
        let _ = w.send(());
    }
}

/// Takes the commands already sent; true if there were any (the union may have changed).
fn drain_cmds(cmds: &mut UnboundedReceiver<Cmd>, waiting: &mut Vec<oneshot::Sender<()>>) -> bool {
    let mut any = false;
    while let Ok(Cmd::Sync(w)) = cmds.try_recv() {
        waiting.extend(w);
        any = true;
    }
    any
}

/// One listener connection's life: a read always in flight; LISTEN/UNLISTEN queries
/// written as the union changes, one at a time.
async fn serve_listener(
    instance: &Arc<Instance>,
    pool: &Arc<SharedPool>,
    conn: ServerConn,
    cmds: &mut UnboundedReceiver<Cmd>,
    waiting: &mut Vec<oneshot::Sender<()>>,
    lost: &mut bool,
) -> ListenerEnd {
    let hub = &instance.listens;
    let ServerConn { rd, mut wr, meta } = conn;
    let mut listening: BTreeSet<Vec<u8>> = BTreeSet::new();
    // Answers owed once the query in flight is done.
    let mut in_flight: Option<Vec<oneshot::Sender<()>>> = None;
    let mut dirty = true;
    let mut read = pin!(read_some(rd, MsgBuf::with_capacity(8192)));
    let mut pending = MsgBuf::with_capacity(8192);
    loop {
        dirty |= drain_cmds(cmds, waiting);
        if in_flight.is_none() && (dirty || !waiting.is_empty()) {
            dirty = false;
            let want = hub.union(pool.id);
            if want.is_empty() && hub.retire_if_unused(pool.id) {
                answer_all(waiting);
                let mut out = Vec::new();
                frontend::terminate(&mut out);
                let _ = wr.write_all(out).await;
                log::info!(
                    "{}/{}: LISTEN connection S-{} closed: nobody listens",
                    pool.database,
                    pool.user,
                    meta.id
                );
                return ListenerEnd::Retired;
            }
            let mut sql = String::new();
            for ch in want.difference(&listening) {
                sql.push_str("LISTEN ");
                quote_ident(&mut sql, ch);
                sql.push_str("; ");
            }
            for ch in listening.difference(&want) {
                sql.push_str("UNLISTEN ");
                quote_ident(&mut sql, ch);
                sql.push_str("; ");
            }
            if sql.is_empty() {
                answer_all(waiting);
            } else {
                let mut out = Vec::new();
                frontend::query(&mut out, sql.trim_end().trim_end_matches(';'));
                let (res, _) = wr.write_all(out).await;
                if res.is_err() {
                    return ListenerEnd::Lost;
                }
                listening = want;
                in_flight = Some(std::mem::take(waiting));
            }
        }
        enum Ev {
            Read(ServerRd, std::io::Result<usize>, MsgBuf),
            Cmd(Option<Cmd>),
        }
        let ev = poll_fn(|cx| {
            if let Poll::Ready((rd, res, buf)) = read.as_mut().poll(cx) {
                return Poll::Ready(Ev::Read(rd, res, buf));
            }
            if let Poll::Ready(c) = std::pin::Pin::new(&mut *cmds).poll_next(cx) {
                return Poll::Ready(Ev::Cmd(c));
            }
            Poll::Pending
        })
        .await;
        match ev {
            Ev::Cmd(Some(Cmd::Sync(w))) => {
                dirty = true;
                waiting.extend(w);
            }
            // The instance is going away.
            Ev::Cmd(None) => return ListenerEnd::Retired,
            Ev::Read(_, Ok(0) | Err(_), _) => return ListenerEnd::Lost,
            Ev::Read(rd, Ok(_), mut buf) => {
                pending.extend_from_slice(buf.data());
                buf.clear();
                while let Some(h) = Header::peek(pending.data()) {
                    if pending.len() < h.total() {
                        break;
                    }
                    let msg = &pending.data()[..h.total()];
                    match h.tag {
                        b'A' if msg.len() > 9 => {
                            // The process id becomes the listener backend's (PgBouncer
                            // does the same): the client's own "server" is the listener.
                            pending.data_mut()[5..9].copy_from_slice(&meta.backend_pid.to_be_bytes());
                            let msg = &pending.data()[..h.total()];
                            if let Some(end) = msg[9..].iter().position(|&c| c == 0) {
                                hub.deliver(instance, pool.id, Some(&msg[9..9 + end]), msg);
                            }
                        }
                        b'Z' => {
                            if let Some(mut done) = in_flight.take() {
                                answer_all(&mut done);
                                if std::mem::take(lost) {
                                    let mut out = Vec::new();
                                    missed_notice(&mut out);
                                    hub.deliver(instance, pool.id, None, &out);
                                    log::info!("{}/{}: LISTEN connection back", pool.database, pool.user);
                                }
                            }
                        }
                        b'E' => log::warn!(
                            "{}/{}: the LISTEN connection's query failed: {}",
                            pool.database,
                            pool.user,
                            String::from_utf8_lossy(&msg[5..])
                        ),
                        _ => {}
                    }
                    pending.consume(h.total());
                }
                read.set(read_some(rd, buf));
            }
        }
    }
}

async fn read_some(mut rd: ServerRd, buf: MsgBuf) -> (ServerRd, std::io::Result<usize>, MsgBuf) {
    let mut buf = buf;
    buf.reserve(4096);
    let (res, back) = rd.read(buf.into_read()).await;
    (rd, res, back.into_inner())
}
