//! One worker: a pinned thread running its own monoio runtime, accepting on its own
//! listeners and serving its clients with its own share of the server pool.

use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_channel::mpsc::UnboundedReceiver;
use monoio::net::{TcpListener, UnixListener};

use crate::context::control::ControlMsg;
use crate::context::logins::{Admission, Cut, LoginKey, LoginLimits, Refused, Refusing};
use crate::context::{Instance, Phase, WorkerCtx, WorkerInfo};
use crate::net::{Peer, Stream};
use crate::pool::{PoolMsg, Postman};
use crate::protocol::io::WireError;
use crate::protocol::SqlState;
use crate::proxy::login::{login, send_fatal, Opening};
use crate::proxy::session::serve;
use crate::proxy::SessionError;

/// Everything a worker thread needs, built on the main thread.
pub struct WorkerSpec {
    pub id: usize,
    pub core: Option<core_affinity::CoreId>,
    pub listeners: Vec<std::net::TcpListener>,
    /// The instance's Unix socket (unix_socket_dir), shared by every worker: Unix
    /// sockets have no SO_REUSEPORT spreading, so each worker accepts on its own copy of
    /// the one listening socket.
    pub unix: Option<std::os::unix::net::UnixListener>,
    pub pool_inbox: UnboundedReceiver<PoolMsg>,
    pub control_inbox: UnboundedReceiver<ControlMsg>,
    pub postman: Postman,
}

/// Starts the worker thread. It reports once, on `ready`, when its listeners accept (or
/// why it could not start), then runs until the instance exits.
pub fn spawn(
    instance: Arc<Instance>,
    spec: WorkerSpec,
    ready: std::sync::mpsc::Sender<Result<WorkerInfo, String>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let name = format!("{}:w{}", instance.name, spec.id);
    std::thread::Builder::new().name(name.clone()).spawn(move || {
        super::title::set_thread_name(&name);
        if let Some(core) = spec.core {
            if !core_affinity::set_for_current(core) {
                let _ = ready.send(Err(format!("cannot pin to core {}", core.id)));
                return;
            }
        }
        let mut rt = match build_runtime() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(format!("cannot build the runtime: {e}")));
                return;
            }
        };
        let driver = match &rt {
            monoio::FusionRuntime::Uring(_) => "io_uring",
            monoio::FusionRuntime::Legacy(_) => "epoll",
        };
        let info = WorkerInfo {
            id: spec.id,
            core: spec.core.map(|c| c.id),
            driver,
        };
        rt.block_on(run(instance, spec, info, ready));
    })
}

type Runtime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// io_uring with the flags that suit one thread owning its ring (fewer interrupts for
/// task work, no cross-thread submission locking), falling back to a plain ring on
/// kernels without them, and to epoll where io_uring is missing or forbidden.
fn build_runtime() -> std::io::Result<Runtime> {
    if std::env::var("PGSILO_IO_DRIVER").is_ok_and(|v| v == "epoll") {
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .with_entries(1024)
            .build()?;
        return Ok(monoio::FusionRuntime::Legacy(rt));
    }
    let with = |defer: bool| {
        let mut urb = io_uring::IoUring::builder();
        urb.setup_coop_taskrun().setup_single_issuer();
        if defer {
            urb.setup_defer_taskrun();
        }
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .with_entries(1024)
            .uring_builder(urb)
            .build()
    };
    let defer = !std::env::var("PGSILO_IO_DEFER").is_ok_and(|v| v == "0");
    with(defer).or_else(|_| with(false)).or_else(|_| {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .with_entries(1024)
            .build()
    })
}

async fn run(
    instance: Arc<Instance>,
    spec: WorkerSpec,
    info: WorkerInfo,
    ready: std::sync::mpsc::Sender<Result<WorkerInfo, String>>,
) {
    let ctx = Rc::new(WorkerCtx::new(instance.clone(), spec.id, spec.postman));
    let mut listeners = Vec::new();
    for l in spec.listeners {
        match TcpListener::from_std(l) {
            Ok(l) => listeners.push(Listener::Tcp(l)),
            Err(e) => {
                let _ = ready.send(Err(format!("cannot adopt listener: {e}")));
                return;
            }
        }
    }
    if let Some(l) = spec.unix {
        match UnixListener::from_std(l) {
            Ok(l) => listeners.push(Listener::Unix(l)),
            Err(e) => {
                let _ = ready.send(Err(format!("cannot adopt the unix socket: {e}")));
                return;
            }
        }
    }
    for l in listeners {
        monoio::spawn(accept_loop(ctx.clone(), l));
    }
    monoio::spawn(pool_inbox(ctx.clone(), spec.pool_inbox));
    monoio::spawn(control_inbox(ctx.clone(), spec.control_inbox));
    let _ = ready.send(Ok(info));
    drop(ready);
    super::min_pools::open_ahead(&ctx);
    for pool in ctx.local_pools() {
        pool.maintain(true);
    }

    loop {
        monoio::time::sleep(Duration::from_secs(1)).await;
        // min_pool_size is kept only while the instance runs normally.
        ctx.sessions.drain_due();
        let open_new = instance.phase() == Phase::Running;
        if open_new {
            super::min_pools::open_ahead(&ctx);
        }
        ctx.sessions.each(|s| s.tick());
        if let Some(t) = ctx.logins.report_due(std::time::Instant::now()) {
            log::warn!(
                "logins in progress (max_pending_logins, max_pending_logins_per_addr): \
                 {} new connection(s) turned away at an address's cap, {} with the budget full, \
                 {} evicted, {} without a startup packet within startup_packet_timeout; {} in progress on this worker",
                t.refused_addr,
                t.refused_full,
                t.evicted,
                t.startup_timeouts,
                ctx.logins.len()
            );
        }
        for pool in ctx.local_pools() {
            pool.maintain(open_new);
        }
        let config = instance.config();
        ctx.auth_lookups
            .close_expired(config.general.server_idle_timeout, config.general.server_lifetime);
        if instance.phase() >= Phase::Exiting && ctx.sessions.live() == 0 {
            for pool in ctx.local_pools() {
                pool.close_all_idle("shutdown");
            }
            ctx.auth_lookups.close_all();
            return;
        }
    }
}

async fn pool_inbox(ctx: Rc<WorkerCtx>, mut inbox: UnboundedReceiver<PoolMsg>) {
    use futures_core::Stream;
    while let Some(msg) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut inbox).poll_next(cx)).await {
        let shared = msg.pool().clone();
        ctx.local_pool(&shared).on_message(msg);
    }
}

async fn control_inbox(ctx: Rc<WorkerCtx>, mut inbox: UnboundedReceiver<ControlMsg>) {
    use futures_core::Stream;
    while let Some(msg) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut inbox).poll_next(cx)).await {
        ctx.on_control(msg);
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// A new connection, who it is from, and whose share of the logins in progress it
    /// counts against.
    async fn accept(&self, handle: monoio::io::CancelHandle) -> std::io::Result<(Stream, Peer, LoginKey)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.cancelable_accept(handle).await?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Peer::Tcp(peer), LoginKey::of_ip(peer.ip())))
            }
            Listener::Unix(l) => {
                let (s, _) = l.cancelable_accept(handle).await?;
                let stream = Stream::Unix(s);
                let peer = stream.unix_peer();
                let key = LoginKey::Local(stream.unix_uid());
                Ok((stream, peer, key))
            }
        }
    }
}

async fn accept_loop(ctx: Rc<WorkerCtx>, listener: Listener) {
    loop {
        if ctx.instance.phase() >= Phase::Draining {
            return;
        }
        let Some(handle) = ctx.accept_handle() else {
            return;
        };
        // A cancelled accept still completes with the connection if one raced in, so
        // stopping never drops a client the kernel already handed over.
        match listener.accept(handle).await {
            Ok((stream, peer, key)) => {
                let limits = {
                    let config = ctx.instance.config();
                    let g = &config.general;
                    LoginLimits::share(
                        g.max_pending_logins,
                        g.max_pending_logins_per_addr,
                        ctx.instance.worker_count,
                    )
                };
                match ctx.logins.admit(key, limits, std::time::Instant::now()) {
                    Ok(admission) => {
                        ctx.instance.clients.fetch_add(1, Ordering::SeqCst);
                        monoio::spawn(client(ctx.clone(), stream, peer, admission));
                    }
                    // Told why while few are being told, else closed at once (the
                    // worker's periodic report counts them either way).
                    Err(refused) => {
                        if let Some(telling) = ctx.logins.refusing(limits.total) {
                            monoio::spawn(refuse(stream, refused, telling));
                        }
                    }
                }
            }
            Err(_) if ctx.stopped_accepting() => return,
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                log::warn!("accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long a turned-away connection is given to read why and hang up.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Tells a connection the login budget turned away why, as PostgreSQL tells a client it
/// cannot serve before reading its startup packet (libpq reports an ErrorResponse in
/// place of the answer to its startup packet or SSLRequest). What the client sends
/// meanwhile is read and dropped until it hangs up, for at most [`REFUSAL_LINGER`]:
/// closing with unread bytes would reset the connection and could lose the error.
async fn refuse(mut stream: Stream, why: Refused, _telling: Refusing) {
    use monoio::io::AsyncReadRent;
    let message = match why {
        Refused::AddrFull => "too many logins in progress from this address (max_pending_logins_per_addr)",
        Refused::Full => "too many logins in progress (max_pending_logins)",
    };
    send_fatal(&mut stream, SqlState::TOO_MANY_CONNECTIONS, message).await;
    let drain = async {
        let mut buf = Vec::with_capacity(1024);
        let mut taken = 0;
        while taken < 64 * 1024 {
            let (res, back) = stream.read(buf).await;
            buf = back;
            match res {
                Ok(n) if n > 0 => {
                    taken += n;
                    buf.clear();
                }
                _ => return,
            }
        }
    };
    let _ = monoio::time::timeout(REFUSAL_LINGER, drain).await;
}

/// Decrements the client count however the client's task ends.
struct ClientCount(Arc<Instance>);

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs the login, cut short by client_login_timeout or by the logins-in-progress
/// budget (evicted, or no startup packet within startup_packet_timeout).
async fn login_within(
    ctx: &Rc<WorkerCtx>,
    slot: &mut Option<Stream>,
    peer: Peer,
    id: u64,
    admission: &Admission,
    limits: (Option<Duration>, Option<Duration>),
) -> Result<Opening, SessionError> {
    let (login_timeout, startup_timeout) = limits;
    // Boxed: the login's state (and its timer) is large and needed only once.
    let mut running = Box::pin(async {
        match login_timeout {
            Some(t) => monoio::time::timeout(t, login(ctx, slot, peer, id, admission))
                .await
                .unwrap_or(Err(SessionError::LoginTimeout)),
            None => login(ctx, slot, peer, id, admission).await,
        }
    });
    let mut cut = std::pin::pin!(admission.cut(startup_timeout));
    let cut = poll_fn(|cx| {
        if let Poll::Ready(r) = running.as_mut().poll(cx) {
            return Poll::Ready(Ok(r));
        }
        cut.as_mut().poll(cx).map(Err)
    })
    .await;
    match cut {
        Ok(r) => r,
        Err(Cut::Evicted) if admission.has_startup() => Err(SessionError::refused(
            SqlState::TOO_MANY_CONNECTIONS,
            "too many logins in progress (max_pending_logins)",
        )),
        Err(Cut::Evicted) => Err(SessionError::LoginCut("evicted (max_pending_logins)")),
        Err(Cut::StartupTimeout) => Err(SessionError::LoginCut("startup_packet_timeout")),
    }
}

async fn client(ctx: Rc<WorkerCtx>, stream: Stream, peer: Peer, admission: Admission) {
    let _count = ClientCount(ctx.instance.clone());
    let id = ctx.instance.next_client_id();
    let config = ctx.instance.config();
    let timeouts = (
        config.general.client_login_timeout,
        config.general.startup_packet_timeout,
    );
    let log_disconnections = config.general.log_disconnections;
    let log_pooler_errors = config.general.log_pooler_errors;
    drop(config);
    // PgBouncer's age=: from the connection, login included.
    let started = std::time::Instant::now();
    let mut slot = Some(stream);
    let opening = login_within(&ctx, &mut slot, peer, id, &admission, timeouts).await;
    let Some(mut stream) = slot else {
        // A TLS handshake failed half-way: nothing more can be said.
        if let Err(e) = opening {
            if log_pooler_errors {
                log::info!("C-{id}: {peer} login failed: {e}");
            }
        }
        return;
    };
    match opening {
        Ok(Opening::Cancel) => {}
        Ok(Opening::Admin(admin)) => Box::pin(crate::admin::serve(ctx.clone(), stream, admin)).await,
        Ok(Opening::Session(who)) => {
            let cancel_pid = who.cancel_pid;
            let label = format!("{}/{}@{}", who.database, who.user, who.peer);
            let result = serve(ctx.clone(), stream, who).await;
            ctx.instance.cancels.unregister(cancel_pid);
            if log_disconnections {
                // PgBouncer's reasons where it has the same event.
                let why = match &result {
                    Ok(()) => "client close request".to_string(),
                    Err(crate::proxy::SessionError::ClientGone(WireError::Closed)) => {
                        "client unexpected eof".to_string()
                    }
                    Err(e) => e.to_string(),
                };
                log::info!(
                    "C-{id}: {label} closing because: {why} (age={}s)",
                    started.elapsed().as_secs()
                );
            }
        }
        Err(e) => {
            if let Some((code, message)) = e.client_error() {
                // PgBouncer's two lines for a refused login.
                if log_pooler_errors {
                    log::warn!("C-{id}: {peer} pooler error: {message}");
                }
                if log_disconnections {
                    log::info!(
                        "C-{id}: {peer} closing because: {message} (age={}s)",
                        started.elapsed().as_secs()
                    );
                }
                Box::pin(send_fatal(&mut stream, code, &message)).await;
            }
        }
    }
}
