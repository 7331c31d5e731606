//! What the session's unit tests stand on: a worker with one pool and no PostgreSQL, a
//! logged-in client whose socket's other end the test holds, and servers that are Unix
//! sockets too, their other end scripted by the test.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::UnixStream;

use super::Flow;
use crate::config::{Config, General, PoolMode, SslMode, Userlist};
use crate::context::instance::Instance;
use crate::context::WorkerCtx;
use crate::metrics::{ConnEntry, Registered, CLIENTS};
use crate::net::{Endpoint, Peer, Stream};
use crate::pool::{Credential, LocalPool, ServerConn, ServerMeta, ServerTarget, Settings};
use crate::proxy::login::LoggedIn;
use crate::tls::TlsContext;

/// Client ids unique in the process: the clients' registry is process-wide.
static NEXT_ID: AtomicU64 = AtomicU64::new(1 << 40);

/// Runs `test` on a runtime like a worker's, on epoll so it runs wherever tests do.
pub(super) fn block_on<F: Future>(test: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("a monoio runtime")
        .block_on(test)
}

/// One worker of a one-worker instance, with one pool (database "db", user "u").
pub(super) struct Kit {
    pub(super) ctx: Rc<WorkerCtx>,
    pub(super) pool: Rc<LocalPool>,
}

impl Kit {
    /// `tune` adjusts the defaults of the [pgsilo] section.
    pub(super) fn new(mode: PoolMode, tune: impl FnOnce(&mut General)) -> Kit {
        let mut general = General::defaults("test".into());
        tune(&mut general);
        let config = Config {
            path: PathBuf::from("/nonexistent/pgsilo.toml"),
            general,
            databases: BTreeMap::new(),
        };
        let userlist = Userlist::parse("", Path::new("userlist.txt")).expect("an empty auth_file");
        let instance = Arc::new(Instance::new(config, userlist, TlsContext::disabled(), 1, |_| {}));
        let shared = instance.pools.get_or_create("db", "u", || (mode, 4, target()));
        let ctx = Rc::new(WorkerCtx::new(instance, 0, Arc::new(Vec::new())));
        let pool = ctx.local_pool(&shared);
        Kit { ctx, pool }
    }

    /// A client as login leaves it, its session's end of the socket, and the test's end.
    pub(super) fn client(&self) -> (LoggedIn, Stream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("a socket pair");
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (cancel_pid, cancel) = self.ctx.instance.cancels.register();
        let entry = ConnEntry::new(id, "u", "db", ("unix".into(), 0), None, 0);
        let who = LoggedIn {
            id,
            user: "u".into(),
            database: "db".into(),
            application_name: String::new(),
            peer: Peer::Unix(None),
            pool: self.pool.clone(),
            settings: Arc::new(Settings::default()),
            cancel_pid,
            cancel,
            entry: Registered::new(&CLIENTS, entry),
            bound: None,
            pending: Vec::new(),
        };
        (who, Stream::Unix(ours), theirs)
    }

    /// A session for a new client (not started), and the client's end of its socket.
    pub(super) fn flow(&self) -> (Flow, UnixStream) {
        let (who, stream, client) = self.client();
        (Flow::new(&self.ctx, stream, who), client)
    }

    /// A server connection counted in the pool (as if opened), and the test's end of it,
    /// where the test plays PostgreSQL.
    pub(super) fn server(&self) -> (ServerConn, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("a socket pair");
        assert!(self.pool.shared.try_reserve(), "room in the test pool");
        let meta = ServerMeta::new(Endpoint::Tcp(([127, 0, 0, 1], 5432).into()), 0);
        (ServerConn::new(Stream::Unix(ours), meta), theirs)
    }

    /// A session with a server attached (its settings already the client's), and the
    /// test's ends of the client and the server.
    pub(super) fn attached_flow(&self) -> (Flow, UnixStream, UnixStream) {
        let (mut flow, client) = self.flow();
        let (conn, server) = self.server();
        assert!(flow.try_plug(conn).is_none(), "no settings to carry");
        (flow, client, server)
    }
}

fn target() -> ServerTarget {
    ServerTarget {
        host: "127.0.0.1".into(),
        port: 5432,
        dbname: "db".into(),
        user: "u".into(),
        credential: Credential::None,
        connect_timeout: Duration::from_secs(1),
        tcp_keepalive: false,
        tls_mode: SslMode::Disable,
        tls: None,
    }
}

/// Writes all of `bytes` to the test's end of a socket.
pub(super) async fn send(s: &mut UnixStream, bytes: &[u8]) {
    let (res, _) = s.write_all(bytes.to_vec()).await;
    res.expect("the test's write");
}

/// Reads exactly `n` bytes from the test's end of a socket, or fails after two seconds.
pub(super) async fn recv(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let read = monoio::time::timeout(Duration::from_secs(2), s.read(Vec::with_capacity(n - got.len())));
        let (res, buf) = read.await.expect("bytes within two seconds");
        match res.expect("the test's read") {
            0 => panic!("closed after {} of {n} bytes: {got:?}", got.len()),
            _ => got.extend_from_slice(&buf),
        }
    }
    got
}

/// Reads until the other end closes; what came before it.
pub(super) async fn recv_to_end(s: &mut UnixStream) -> Vec<u8> {
    let mut got = Vec::new();
    loop {
        let read = monoio::time::timeout(Duration::from_secs(2), s.read(Vec::with_capacity(1024)));
        let (res, buf) = read.await.expect("the end within two seconds");
        match res {
            Ok(0) | Err(_) => return got,
            Ok(_) => got.extend_from_slice(&buf),
        }
    }
}

/// A message as it goes on the wire: tag, length, body.
pub(super) fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A simple Query for `sql`.
pub(super) fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    msg(b'Q', &body)
}
