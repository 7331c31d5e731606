//! The aggressor tenant: the noisy neighbour. Its errors are expected and only counted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::errors::{ErrLabel, ErrorCounts};
use crate::scenario::{Aggressor, AggressorKind};
use crate::target::Target;

/// What one aggressor scenario did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindStats {
    pub clients: usize,
    pub connect_ok: u64,
    pub connect_errors: ErrorCounts,
    pub queries_ok: u64,
    pub query_errors: ErrorCounts,
    /// Connections held right now / at most at once.
    pub held_now: u64,
    pub held_peak: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct AggressorStats {
    pub by_kind: BTreeMap<String, KindStats>,
    /// How long the aggressor ran.
    pub seconds: f64,
}

type Shared = Arc<Mutex<AggressorStats>>;

fn with<R>(stats: &Shared, kind: AggressorKind, f: impl FnOnce(&mut KindStats) -> R) -> R {
    let mut s = stats.lock().unwrap();
    f(s.by_kind.entry(kind.as_str().to_string()).or_default())
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// Sleep, unless stopped first; true when stopped.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = stopped(stop) => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Connect, retrying after `retry` until it works or `stop`; `None` when stopped.
async fn connect_until(
    target: &Target,
    kind: AggressorKind,
    timeout: Duration,
    retry: Duration,
    stats: &Shared,
    stop: &mut watch::Receiver<bool>,
) -> Option<Client> {
    loop {
        if *stop.borrow() {
            return None;
        }
        let attempt = tokio::select! {
            _ = stopped(stop) => return None,
            r = target.connect(timeout) => r,
        };
        match attempt {
            Ok(client) => {
                with(stats, kind, |k| {
                    k.connect_ok += 1;
                    k.held_now += 1;
                    k.held_peak = k.held_peak.max(k.held_now);
                });
                return Some(client);
            }
            Err(e) => {
                with(stats, kind, |k| k.connect_errors.add(&e));
                if pause(stop, retry).await {
                    return None;
                }
            }
        }
    }
}

fn released(stats: &Shared, kind: AggressorKind) {
    with(stats, kind, |k| k.held_now = k.held_now.saturating_sub(1));
}

/// A client of the `connections` or `throughput` scenario: connect (retrying), run
/// `query` in a loop until stopped, reconnect when the connection breaks.
#[allow(clippy::too_many_arguments)]
async fn looping_client(
    target: Target,
    kind: AggressorKind,
    query: String,
    connect_timeout: Duration,
    retry: Duration,
    delay: Duration,
    stats: Shared,
    mut stop: watch::Receiver<bool>,
) {
    if pause(&mut stop, delay).await {
        return;
    }
    'connect: loop {
        let Some(client) = connect_until(&target, kind, connect_timeout, retry, &stats, &mut stop).await else {
            return;
        };
        loop {
            let r = tokio::select! {
                _ = stopped(&mut stop) => { released(&stats, kind); return; }
                r = client.simple_query(&query) => r,
            };
            match r {
                Ok(_) => with(&stats, kind, |k| k.queries_ok += 1),
                Err(e) => {
                    with(&stats, kind, |k| k.query_errors.add(&ErrLabel::from_pg(&e)));
                    if client.is_closed() {
                        released(&stats, kind);
                        if pause(&mut stop, retry).await {
                            return;
                        }
                        continue 'connect;
                    }
                    if pause(&mut stop, retry).await {
                        released(&stats, kind);
                        return;
                    }
                }
            }
        }
    }
}

/// A client of the `idle-in-transaction` scenario: `BEGIN; SELECT 1`, then sit on the
/// server connection until stopped (reconnecting if the pooler drops it).
async fn idle_in_tx_client(
    target: Target,
    connect_timeout: Duration,
    retry: Duration,
    stats: Shared,
    mut stop: watch::Receiver<bool>,
) {
    let kind = AggressorKind::IdleInTransaction;
    loop {
        let Some(client) = connect_until(&target, kind, connect_timeout, retry, &stats, &mut stop).await else {
            return;
        };
        let r = tokio::select! {
            _ = stopped(&mut stop) => { released(&stats, kind); return; }
            r = client.simple_query("BEGIN; SELECT 1") => r,
        };
        match r {
            Ok(_) => with(&stats, kind, |k| k.queries_ok += 1),
            Err(e) => with(&stats, kind, |k| k.query_errors.add(&ErrLabel::from_pg(&e))),
        }
        // Sit in the transaction; check now and then that we still hold it.
        while !client.is_closed() {
            if pause(&mut stop, Duration::from_millis(500)).await {
                released(&stats, kind);
                return;
            }
        }
        released(&stats, kind);
        if pause(&mut stop, retry).await {
            return;
        }
    }
}

/// Run the aggressor's scenarios until `stop` turns true; returns once every client has
/// let go (clients that do not within `grace` are aborted, closing their sockets).
pub async fn run(target: Target, cfg: Aggressor, stats: Shared, stop: watch::Receiver<bool>, grace: Duration) {
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    // Idle transactions first, so they are the ones that end up holding the servers.
    let mut kinds = cfg.scenarios.clone();
    kinds.sort_by_key(|k| match k {
        AggressorKind::IdleInTransaction => 0,
        AggressorKind::Connections => 1,
        AggressorKind::Throughput => 2,
    });
    for kind in kinds {
        let clients = match kind {
            AggressorKind::Connections => cfg.connections.clients,
            AggressorKind::Throughput => cfg.throughput.clients,
            AggressorKind::IdleInTransaction => cfg.idle_in_transaction.clients,
        };
        with(&stats, kind, |k| k.clients = clients);
        for i in 0..clients {
            let (t, s, st) = (target.clone(), stats.clone(), stop.clone());
            let ct = cfg.connect_timeout;
            match kind {
                AggressorKind::Connections => {
                    let c = &cfg.connections;
                    let delay = c.ramp.mul_f64(i as f64 / clients as f64);
                    let q = c.query.clone();
                    tasks.spawn(looping_client(t, kind, q, ct, c.retry, delay, s, st));
                }
                AggressorKind::Throughput => {
                    let q = cfg.throughput.query.clone();
                    let retry = Duration::from_millis(100);
                    let z = Duration::ZERO;
                    tasks.spawn(looping_client(t, kind, q, ct, retry, z, s, st));
                }
                AggressorKind::IdleInTransaction => {
                    let retry = cfg.connections.retry;
                    tasks.spawn(idle_in_tx_client(t, ct, retry, s, st));
                }
            }
        }
        // Let this scenario's clients get going before the next one piles on.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stop_wait = stop.clone();
    stopped(&mut stop_wait).await;
    stats.lock().unwrap().seconds = started.elapsed().as_secs_f64();
    let deadline = tokio::time::Instant::now() + grace;
    while !tasks.is_empty() {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
}
