//! The Prometheus endpoint (`metrics_listen`): a small blocking HTTP server on its own
//! thread, so scrapes never touch the workers' event loops.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::RuntimeError;
use crate::context::instance::Instance;
use crate::metrics::prometheus::{render, PoolView, WorkerView};
use crate::metrics::PoolTotals;

pub fn start(instance: Arc<Instance>, addr: SocketAddr) -> Result<(), RuntimeError> {
    // SO_REUSEPORT so a process taking over can listen before the old one lets go;
    // the caller has checked that no one else holds the port.
    let listener: TcpListener = super::listener::bind_shared(addr.ip(), addr.port(), 64)?;
    listener.set_nonblocking(false).map_err(|source| RuntimeError::Bind {
        addr: addr.ip(),
        port: addr.port(),
        source,
    })?;
    let name = format!("{}:metrics", instance.name);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve(&instance, stream);
            }
        })
        .map_err(|e| RuntimeError::Worker {
            worker: 0,
            reason: format!("metrics thread: {e}"),
        })?;
    log::info!("metrics on http://{addr}/metrics");
    Ok(())
}

fn serve(instance: &Instance, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers; nothing in them matters here.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (status, body, kind) = if path == "/metrics" || path.starts_with("/metrics?") {
        ("200 OK", snapshot(instance), "text/plain; version=0.0.4; charset=utf-8")
    } else {
        ("404 Not Found", "try /metrics\n".to_string(), "text/plain")
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

pub fn snapshot(instance: &Instance) -> String {
    let pools = instance.pools.all();
    let views: Vec<PoolView> = pools
        .iter()
        .map(|p| PoolView {
            database: p.database.clone(),
            user: p.user.clone(),
            mode: p.mode.as_str(),
            cap: p.cap(),
            idle: p.idle_count(),
            waiting: p.waiting_count(),
            busy_budget_millicores: u64::from(p.busy.budget_millicores()),
            busy_seconds: p.busy.total_seconds(),
            totals: p.stats.totals(),
        })
        .collect();
    let workers: Vec<WorkerView> = instance
        .workers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|w| {
            let mut totals = PoolTotals::default();
            for p in &pools {
                totals.add(&p.stats.worker_totals(w.id));
            }
            WorkerView {
                id: w.id,
                core: w.core,
                driver: w.driver,
                totals,
            }
        })
        .collect();
    render(&instance.name, &views, &workers)
}
