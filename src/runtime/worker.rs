//! One worker: a pinned thread running its own monoio runtime, accepting on its own
//! listeners and serving its clients with its own share of the server pool.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::mpsc::UnboundedReceiver;
use monoio::net::{TcpListener, UnixListener};

use crate::context::control::ControlMsg;
use crate::context::{Instance, Phase, WorkerCtx, WorkerInfo};
use crate::net::{Peer, Stream};
use crate::pool::{PoolMsg, Postman};
use crate::protocol::io::WireError;
use crate::proxy::login::{login, send_fatal, Opening};
use crate::proxy::session::serve;

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
    let tuned = {
        let mut urb = io_uring::IoUring::builder();
        urb.setup_coop_taskrun().setup_single_issuer();
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .with_entries(1024)
            .uring_builder(urb)
            .build()
    };
    tuned.or_else(|_| {
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
    async fn accept(&self, handle: monoio::io::CancelHandle) -> std::io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.cancelable_accept(handle).await?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Peer::Tcp(peer)))
            }
            Listener::Unix(l) => {
                let (s, _) = l.cancelable_accept(handle).await?;
                let stream = Stream::Unix(s);
                let peer = stream.unix_peer();
                Ok((stream, peer))
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
            Ok((stream, peer)) => {
                ctx.instance.clients.fetch_add(1, Ordering::SeqCst);
                monoio::spawn(client(ctx.clone(), stream, peer));
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

/// Decrements the client count however the client's task ends.
struct ClientCount(Arc<Instance>);

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn client(ctx: Rc<WorkerCtx>, stream: Stream, peer: Peer) {
    let _count = ClientCount(ctx.instance.clone());
    let id = ctx.instance.next_client_id();
    let config = ctx.instance.config();
    let login_timeout = config.general.client_login_timeout;
    let log_disconnections = config.general.log_disconnections;
    let log_pooler_errors = config.general.log_pooler_errors;
    drop(config);
    // PgBouncer's age=: from the connection, login included.
    let started = std::time::Instant::now();
    let mut slot = Some(stream);
    let opening = match login_timeout {
        // Boxed: the login's state (and its timer) is large and needed only once.
        Some(t) => match Box::pin(monoio::time::timeout(t, login(&ctx, &mut slot, peer, id))).await {
            Ok(r) => r,
            Err(_) => Err(crate::proxy::SessionError::LoginTimeout),
        },
        None => Box::pin(login(&ctx, &mut slot, peer, id)).await,
    };
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
