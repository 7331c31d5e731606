//! The process: worker threads (one per core, pinned), their listeners, signals, and
//! the order things start and stop in.

pub mod error;
pub mod fd_limit;
pub mod listener;
pub mod log;
pub mod metrics_http;
mod min_pools;
pub mod notify;
pub mod stats;
pub mod takeover;
pub mod title;
pub mod worker;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::context::{control, Instance, Phase, WorkerInfo};
pub use error::RuntimeError;

use crate::config::{Config, Userlist};
use crate::pool::PoolMsg;

/// The cores to run on: the configured list, or every core this process may use (so
/// systemd's CPUAffinity= or taskset decides).
pub fn choose_cores(cpus: Option<&[usize]>) -> Result<Vec<core_affinity::CoreId>, RuntimeError> {
    let allowed = core_affinity::get_core_ids()
        .ok_or_else(|| RuntimeError::Cpus("cannot read this process's CPU affinity".into()))?;
    match cpus {
        None => {
            if allowed.is_empty() {
                return Err(RuntimeError::Cpus("the CPU affinity mask is empty".into()));
            }
            Ok(allowed)
        }
        Some(list) => {
            let mut cores = Vec::new();
            for &id in list {
                if !allowed.iter().any(|c| c.id == id) {
                    let ids: Vec<String> = allowed.iter().map(|c| c.id.to_string()).collect();
                    return Err(RuntimeError::Cpus(format!(
                        "cpus: core {id} is not available to this process (allowed: {})",
                        ids.join(",")
                    )));
                }
                if !cores.iter().any(|c: &core_affinity::CoreId| c.id == id) {
                    cores.push(core_affinity::CoreId { id });
                }
            }
            Ok(cores)
        }
    }
}

/// Starts the workers and serves until a shutdown signal. With `takeover`, first asks a
/// running process for the same tenant for its listening sockets, and tells it to drain
/// once this one is ready.
pub fn run(config: Config, userlist: Userlist, takeover: bool) -> Result<(), RuntimeError> {
    let g = config.general.clone();
    let cores = choose_cores(g.cpus.as_deref())?;
    let taken = match (&g.takeover_socket, takeover) {
        (Some(path), true) => takeover::request(path)?,
        (None, true) => {
            return Err(RuntimeError::Takeover(
                "takeover_socket is disabled in the config".into(),
            ))
        }
        _ => None,
    };
    if taken.is_none() {
        if takeover {
            ::log::info!("takeover: no running process answered; starting normally");
        }
        for addr in &g.listen_addr {
            listener::ensure_port_free(*addr, g.listen_port)?;
        }
        // Before any worker accepts, so a refused second instance never takes a client.
        if let Some(path) = &g.takeover_socket {
            takeover::ensure_free(path)?;
        }
    }
    let mut inherited = listener::Inherited::new(taken.as_ref().map(|t| t.fds.as_slice()).unwrap_or_default());
    let mut dups = Vec::new();

    restrict_process_to(&cores)?;
    fd_limit::check(&config, &userlist, true);
    let tls = crate::tls::TlsContext::load(&config.general.front_door).map_err(|e| RuntimeError::Tls(e.to_string()))?;
    let instance = Arc::new(Instance::new(config, userlist, tls, cores.len(), reload));
    let mut senders = Vec::new();
    let mut inboxes = Vec::new();
    let mut control_senders = Vec::new();
    let mut control_inboxes = Vec::new();
    for _ in &cores {
        let (tx, rx) = futures_channel::mpsc::unbounded::<PoolMsg>();
        senders.push(tx);
        inboxes.push(rx);
        let (tx, rx) = futures_channel::mpsc::unbounded::<control::ControlMsg>();
        control_senders.push(tx);
        control_inboxes.push(rx);
    }
    // Before any worker accepts: once this process accepts on sockets taken over from
    // a running one, failing would drop the clients it accepted.
    if let Some(addr) = g.metrics_listen {
        if taken.is_none() {
            listener::ensure_port_free(addr.ip(), addr.port())?;
        }
        metrics_http::start(instance.clone(), addr)?;
    }
    let postman = Arc::new(senders);
    let _ = instance.postman.set(postman.clone());
    let _ = instance.control.set(control_senders);

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    let unix_socket = &g.front_door.unix_socket;
    let unix = match unix_socket
        .dir
        .as_ref()
        .and_then(|d| inherited.take_unix(&listener::unix_path(d, g.listen_port)))
    {
        Some(l) => {
            if let Some(dir) = &unix_socket.dir {
                let path = listener::unix_path(dir, g.listen_port);
                listener::apply_mode(unix_socket, &path).map_err(|reason| RuntimeError::Unix {
                    path: path.display().to_string(),
                    reason,
                })?;
            }
            Some(l)
        }
        None => listener::bind_unix(unix_socket, g.listen_port, g.listen_backlog)?,
    };
    inherited.drop_other_unix();
    if let Some(l) = &unix {
        dups.push(
            l.try_clone()
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| RuntimeError::Unix {
                    path: format!("{:?}", l.local_addr()),
                    reason: e.to_string(),
                })?,
        );
    }
    for (id, ((core, inbox), control_inbox)) in cores.iter().zip(inboxes).zip(control_inboxes).enumerate() {
        let mut listeners = Vec::new();
        for addr in &g.listen_addr {
            let l = match inherited.take(std::net::SocketAddr::new(*addr, g.listen_port)) {
                Some(l) => l,
                None => listener::bind_shared(*addr, g.listen_port, g.listen_backlog)?,
            };
            dups.push(listener::dup(&l)?);
            listeners.push(l);
        }
        if id + 1 == cores.len() {
            // Sockets left over from an old process with more workers: the last worker
            // accepts on them too, so their backlogs are drained.
            let configured: Vec<std::net::SocketAddr> = g
                .listen_addr
                .iter()
                .map(|a| std::net::SocketAddr::new(*a, g.listen_port))
                .collect();
            for l in inherited.rest(&configured) {
                dups.push(listener::dup(&l)?);
                listeners.push(l);
            }
        }
        let spec = worker::WorkerSpec {
            id,
            core: Some(*core),
            listeners,
            unix: match &unix {
                Some(l) => Some(l.try_clone().map_err(|e| RuntimeError::Unix {
                    path: format!("{:?}", l.local_addr()),
                    reason: e.to_string(),
                })?),
                None => None,
            },
            pool_inbox: inbox,
            control_inbox,
            postman: postman.clone(),
        };
        let handle = worker::spawn(instance.clone(), spec, ready_tx.clone()).map_err(|e| RuntimeError::Worker {
            worker: id,
            reason: e.to_string(),
        })?;
        threads.push(handle);
    }
    drop(ready_tx);
    for _ in &cores {
        match ready_rx.recv() {
            Ok(Ok(info)) => {
                ::log::info!(
                    "worker {} running on core {} with the {} driver",
                    info.id,
                    info.core.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    info.driver
                );
                instance.workers.lock().unwrap_or_else(|p| p.into_inner()).push(info);
            }
            Ok(Err(reason)) => return Err(RuntimeError::Worker { worker: 0, reason }),
            Err(_) => {
                return Err(RuntimeError::Worker {
                    worker: 0,
                    reason: "worker thread ended during startup".into(),
                })
            }
        }
    }
    let addrs: Vec<String> = g.listen_addr.iter().map(|a| a.to_string()).collect();
    ::log::info!(
        "listening on {}:{} with {} worker(s); {} database(s), pool_mode={}",
        addrs.join(","),
        g.listen_port,
        cores.len(),
        instance.config().databases.len(),
        g.pool_mode
    );

    // Everything that can fail comes before telling an old process to stop, so a failed
    // takeover leaves the old one serving (the metrics endpoint is bound before the
    // workers start accepting).
    let took_over = taken.is_some();
    if let Some(t) = taken {
        t.finish()?;
        ::log::info!("takeover: the previous process is draining; this one serves the port");
    }
    if let Some(path) = &g.takeover_socket {
        match takeover::serve(instance.clone(), path, dups) {
            Ok(()) => {}
            // Serving already: a missing takeover socket only means the next restart
            // cannot be seamless.
            Err(e) if took_over => ::log::warn!("{e}"),
            Err(e) => return Err(e),
        }
    } else {
        // Nobody to hand them to: holding the duplicates would keep the listening
        // sockets open after the workers stop accepting at shutdown, so new clients
        // would queue unanswered instead of being refused.
        drop(dups);
    }
    stats::spawn(instance.clone());
    notify::notify(&format!(
        "READY=1\nSTATUS=serving {} on {}:{} with {} worker(s)",
        instance.name,
        addrs.join(","),
        g.listen_port,
        cores.len()
    ));

    wait_for_signals(&instance)?;
    notify::notify("STOPPING=1");
    instance.advance(Phase::Exiting);
    // Give the workers a moment to tell the remaining clients why they are closed.
    let grace = Instant::now() + Duration::from_secs(1);
    while instance.clients.load(std::sync::atomic::Ordering::SeqCst) > 0 && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(l) = &unix {
        if !takeover::HANDED_OVER.load(std::sync::atomic::Ordering::SeqCst) {
            listener::remove_unix(l);
        }
    }
    ::log::info!("shutting down");
    Ok(())
}

/// Keeps every thread of the process (main, signals, workers) on the tenant's cores,
/// not only the workers, so a tenant never runs on a neighbour's core.
fn restrict_process_to(cores: &[core_affinity::CoreId]) -> Result<(), RuntimeError> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cores {
        unsafe { libc::CPU_SET(c.id, &mut set) };
    }
    // SAFETY: pid 0 means the calling thread; threads spawned later inherit the mask.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(RuntimeError::Cpus(format!(
            "cannot restrict the process to its cores: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// How a shutdown is going.
enum Stopping {
    No,
    /// SIGINT: new transactions wait, running ones finish, then exit (PgBouncer's safe
    /// shutdown, PAUSE then SHUTDOWN).
    Safe,
    /// SIGTERM: each client is closed when its current transaction ends; exit when all
    /// are gone or at the deadline.
    Closing(Instant),
}

/// Runs signals until the process should exit: SIGHUP reloads; SIGINT and SIGTERM stop
/// as PgBouncer's do; a second SIGINT or SIGTERM exits at once.
fn wait_for_signals(instance: &Arc<Instance>) -> Result<(), RuntimeError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(RuntimeError::Signals)?;
    let mut stopping = Stopping::No;
    loop {
        for sig in signals.pending() {
            match (sig, &stopping) {
                (SIGHUP, _) => {
                    notify::notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", notify::monotonic_usec()));
                    reload(instance);
                    notify::notify("READY=1");
                }
                (SIGINT | SIGTERM, Stopping::Safe | Stopping::Closing(_)) => {
                    ::log::info!("second shutdown signal: exiting now");
                    return Ok(());
                }
                (SIGINT, Stopping::No) => {
                    ::log::info!("got SIGINT, safe shutdown: no new connections, waiting for running transactions");
                    notify::notify("STOPPING=1\nSTATUS=safe shutdown: waiting for running transactions");
                    for p in instance.pools.all() {
                        p.paused.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    instance.advance(Phase::Draining);
                    stopping = Stopping::Safe;
                }
                (SIGTERM, Stopping::No) => {
                    let timeout = instance.config().general.shutdown_timeout;
                    ::log::info!(
                        "got SIGTERM, shutdown: closing clients as their transactions end (at most {}s)",
                        timeout.as_secs()
                    );
                    notify::notify("STOPPING=1\nSTATUS=shutdown: closing clients as their transactions end");
                    instance.advance(Phase::Closing);
                    stopping = Stopping::Closing(Instant::now() + timeout);
                }
                _ => {}
            }
        }
        match stopping {
            Stopping::No => {}
            Stopping::Safe => {
                if instance.active_servers() <= 0 {
                    return Ok(());
                }
            }
            Stopping::Closing(deadline) => {
                let clients = instance.clients.load(std::sync::atomic::Ordering::SeqCst);
                if clients == 0 {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    ::log::info!("shutdown_timeout reached with {clients} client(s) left: closing them");
                    return Ok(());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Settings that are used only as the process starts (sockets bound, threads pinned,
/// names given): a reload reports a change and keeps the running value, so the running
/// configuration (SHOW CONFIG, metrics, the next reload) says what is in force.
fn keep_restart_only_settings(new: &mut crate::config::General, running: &crate::config::General) {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($field:ident),*) => {$(
            if new.$field != running.$field {
                changed.push(stringify!($field));
                new.$field = running.$field.clone();
            }
        )*};
    }
    keep!(
        name,
        listen_addr,
        listen_port,
        listen_backlog,
        cpus,
        metrics_listen,
        takeover_socket
    );
    if new.front_door.unix_socket != running.front_door.unix_socket {
        changed.push("unix_socket_dir, unix_socket_mode, unix_socket_group");
        new.front_door.unix_socket = running.front_door.unix_socket.clone();
    }
    if !changed.is_empty() {
        ::log::warn!(
            "reload: {} take effect only at restart; keeping the running values",
            changed.join(", ")
        );
    }
}

/// Re-reads the config file and the auth_file. Settings that only take effect at start
/// (listen address and port, cpus) are reported and kept.
pub fn reload(instance: &Arc<Instance>) {
    let current = instance.config();
    match crate::config::check(&current.path) {
        Ok((mut config, userlist)) => {
            keep_restart_only_settings(&mut config.general, &current.general);
            // Certificates are read again on every reload; a file that cannot be used
            // keeps the running TLS settings whole (and says why).
            let tls = match crate::tls::TlsContext::load(&config.general.front_door) {
                Ok(t) => Arc::new(t),
                Err(e) => {
                    ::log::error!("reload: {e}; keeping the running TLS certificates and settings");
                    let running = &current.general.front_door;
                    config.general.front_door.client_tls = running.client_tls.clone();
                    config.general.front_door.server_tls = running.server_tls.clone();
                    instance.tls()
                }
            };
            let g = &config.general;
            log::set_verbosity(g.verbose.min(255) as u8);
            fd_limit::check(&config, &userlist, false);
            let users = userlist.len();
            let old_users = instance.userlist();
            for p in instance.pools.all() {
                let secret = userlist.get(&p.user);
                if secret != old_users.get(&p.user) {
                    // A new verifier: the ClientKey a client proved for the old one is void.
                    p.forget_scram_client_key();
                }
                if let Some(db) = config.databases.get(&p.database) {
                    let (_, cap, mut target) =
                        crate::proxy::login::pool_definition(&config, &userlist, &tls, &p.database, &p.user);
                    // A secret auth_query found stays until a login looks it up again.
                    let found = db.user.is_none()
                        && userlist.get(&p.user).is_none()
                        && db.effective_auth_user(&config.general).is_some();
                    if found {
                        target.credential = p.target().credential.clone();
                    }
                    p.set_target(target, cap);
                }
            }
            instance.replace_tls(tls);
            instance.replace_userlist(userlist);
            instance.replace_config(config);
            instance.broadcast(|| control::ControlMsg::Reload);
            ::log::info!("reloaded configuration and auth_file ({users} users)");
        }
        Err(problems) => {
            for p in problems {
                ::log::error!("reload failed, keeping the running configuration: {p}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_keeps_restart_only_settings_and_takes_the_rest() {
        let running = crate::config::General::defaults("t".into());
        let mut new = running.clone();
        new.listen_port = running.listen_port + 1;
        new.cpus = Some(vec![0]);
        new.default_pool_size = running.default_pool_size + 5;
        keep_restart_only_settings(&mut new, &running);
        assert_eq!(new.listen_port, running.listen_port);
        assert_eq!(new.cpus, running.cpus);
        assert_eq!(new.default_pool_size, running.default_pool_size + 5);
    }
}
