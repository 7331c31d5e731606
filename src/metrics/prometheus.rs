//! Prometheus text exposition (format 0.0.4) of pools, workers, connections and errors.

use std::fmt::Write;

use super::acquire::AcquirePath;
use super::histogram::HistogramSnapshot;
use super::pool_stats::PoolTotals;
use super::registry::{ConnState, CLIENTS, ERRORS, SERVERS};

/// One pool's identity and totals, as the renderer needs them.
pub struct PoolView {
    pub database: String,
    pub user: String,
    pub mode: &'static str,
    pub cap: usize,
    pub idle: usize,
    pub waiting: usize,
    /// max_busy_cores in thousandths of a core; 0: no budget.
    pub busy_budget_millicores: u64,
    /// Server busy time (attached to clients) recorded so far, under a budget.
    pub busy_seconds: f64,
    pub totals: PoolTotals,
}

pub struct WorkerView {
    pub id: usize,
    pub core: Option<usize>,
    pub driver: &'static str,
    pub totals: PoolTotals,
}

/// (metric name, help text, how to read it from totals)
type CounterDef = (&'static str, &'static str, fn(&PoolTotals) -> u64);
type HistogramDef = (&'static str, &'static str, fn(&PoolTotals) -> &HistogramSnapshot);

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) {
    for (bound, count) in h.cumulative() {
        let le = match bound {
            Some(us) => format!("{}", us as f64 / 1e6),
            None => "+Inf".to_string(),
        };
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

pub fn render(instance_name: &str, pools: &[PoolView], workers: &[WorkerView]) -> String {
    let mut out = String::with_capacity(8192);
    head(&mut out, "pgsilo_info", "gauge", "pgsilo build and instance.");
    let _ = writeln!(
        out,
        "pgsilo_info{{instance=\"{}\",version=\"{}\"}} 1",
        esc(instance_name),
        env!("CARGO_PKG_VERSION")
    );

    let pl = |p: &PoolView| format!("database=\"{}\",user=\"{}\"", esc(&p.database), esc(&p.user));

    head(
        &mut out,
        "pgsilo_pool_clients",
        "gauge",
        "Clients logged in to the pool, by state.",
    );
    for p in pools {
        let waiting = p.waiting as i64;
        let _ = writeln!(
            out,
            "pgsilo_pool_clients{{{},state=\"active\"}} {}",
            pl(p),
            (p.totals.clients - waiting).max(0)
        );
        let _ = writeln!(out, "pgsilo_pool_clients{{{},state=\"waiting\"}} {}", pl(p), waiting);
    }
    head(
        &mut out,
        "pgsilo_pool_servers",
        "gauge",
        "Server connections of the pool, by state.",
    );
    for p in pools {
        let _ = writeln!(
            out,
            "pgsilo_pool_servers{{{},state=\"active\"}} {}",
            pl(p),
            p.totals.servers_active.max(0)
        );
        let _ = writeln!(out, "pgsilo_pool_servers{{{},state=\"idle\"}} {}", pl(p), p.idle);
        let _ = writeln!(
            out,
            "pgsilo_pool_servers{{{},state=\"login\"}} {}",
            pl(p),
            p.totals.servers_login.max(0)
        );
    }
    head(
        &mut out,
        "pgsilo_pool_size",
        "gauge",
        "Server connection cap of the pool, instance-wide.",
    );
    for p in pools {
        let _ = writeln!(out, "pgsilo_pool_size{{{},pool_mode=\"{}\"}} {}", pl(p), p.mode, p.cap);
    }
    // Only pools with a budget: the time is metered only then.
    head(
        &mut out,
        "pgsilo_pool_busy_cores_max",
        "gauge",
        "max_busy_cores of the pool: server busy time allowed per second.",
    );
    for p in pools.iter().filter(|p| p.busy_budget_millicores > 0) {
        let _ = writeln!(
            out,
            "pgsilo_pool_busy_cores_max{{{}}} {}",
            pl(p),
            p.busy_budget_millicores as f64 / 1000.0
        );
    }
    head(
        &mut out,
        "pgsilo_pool_busy_seconds_total",
        "counter",
        "Time the pool's servers spent attached to clients (metered under max_busy_cores).",
    );
    for p in pools.iter().filter(|p| p.busy_budget_millicores > 0) {
        let _ = writeln!(out, "pgsilo_pool_busy_seconds_total{{{}}} {}", pl(p), p.busy_seconds);
    }
    let counters: [CounterDef; 4] = [
        ("pgsilo_pool_transactions_total", "Transactions completed.", |t| {
            t.xact_count
        }),
        (
            "pgsilo_pool_queries_total",
            "Requests (ReadyForQuery cycles) completed.",
            |t| t.query_count,
        ),
        (
            "pgsilo_pool_received_bytes_total",
            "Bytes received from clients.",
            |t| t.bytes_received,
        ),
        ("pgsilo_pool_sent_bytes_total", "Bytes sent to clients.", |t| {
            t.bytes_sent
        }),
    ];
    for (name, help, f) in counters {
        head(&mut out, name, "counter", help);
        for p in pools {
            let _ = writeln!(out, "{name}{{{}}} {}", pl(p), f(&p.totals));
        }
    }
    let hists: [HistogramDef; 3] = [
        (
            "pgsilo_pool_query_duration_seconds",
            "Time from a request to its ReadyForQuery.",
            |t| &t.query_time,
        ),
        (
            "pgsilo_pool_transaction_duration_seconds",
            "Time from a transaction's first request to its end.",
            |t| &t.xact_time,
        ),
        (
            "pgsilo_pool_wait_duration_seconds",
            "Time clients waited for a server.",
            |t| &t.wait_time,
        ),
    ];
    for (name, help, f) in hists {
        head(&mut out, name, "histogram", help);
        for p in pools {
            histogram(&mut out, name, &pl(p), f(&p.totals));
        }
    }
    let name = "pgsilo_pool_acquire_duration_seconds";
    head(
        &mut out,
        name,
        "histogram",
        "Time clients waited for a server, by how the server came: idle (this worker's idle list), released (handed over by a client of the same worker), other_worker, new (opened meanwhile).",
    );
    for p in pools {
        for path in AcquirePath::ALL {
            let labels = format!("{},path=\"{}\"", pl(p), path.as_str());
            histogram(&mut out, name, &labels, p.totals.acquire.path(path));
        }
    }

    head(
        &mut out,
        "pgsilo_errors_total",
        "counter",
        "ErrorResponses sent to clients, by SQLSTATE.",
    );
    for (code, count) in ERRORS.all() {
        let _ = writeln!(out, "pgsilo_errors_total{{sqlstate=\"{}\"}} {count}", esc(&code));
    }

    let clients = CLIENTS.all();
    let servers = SERVERS.all();
    let wl = |w: &WorkerView| {
        format!(
            "worker=\"{}\",core=\"{}\",driver=\"{}\"",
            w.id,
            w.core.map(|c| c.to_string()).unwrap_or_default(),
            w.driver
        )
    };
    head(
        &mut out,
        "pgsilo_worker_clients",
        "gauge",
        "Client connections served by each worker.",
    );
    for w in workers {
        let n = clients.iter().filter(|c| c.worker() == w.id).count();
        let _ = writeln!(out, "pgsilo_worker_clients{{{}}} {n}", wl(w));
    }
    head(
        &mut out,
        "pgsilo_worker_servers",
        "gauge",
        "Server connections held by each worker, by state.",
    );
    for w in workers {
        for (state, label) in [(ConnState::Active, "active"), (ConnState::Idle, "idle")] {
            let n = servers
                .iter()
                .filter(|s| s.worker() == w.id && s.state() == state)
                .count();
            let _ = writeln!(out, "pgsilo_worker_servers{{{},state=\"{label}\"}} {n}", wl(w));
        }
    }
    let wcounters: [CounterDef; 4] = [
        (
            "pgsilo_worker_transactions_total",
            "Transactions completed by each worker.",
            |t| t.xact_count,
        ),
        (
            "pgsilo_worker_queries_total",
            "Requests completed by each worker.",
            |t| t.query_count,
        ),
        (
            "pgsilo_worker_received_bytes_total",
            "Bytes received from clients by each worker.",
            |t| t.bytes_received,
        ),
        (
            "pgsilo_worker_sent_bytes_total",
            "Bytes sent to clients by each worker.",
            |t| t.bytes_sent,
        ),
    ];
    for (name, help, f) in wcounters {
        head(&mut out, name, "counter", help);
        for w in workers {
            let _ = writeln!(out, "{name}{{{}}} {}", wl(w), f(&w.totals));
        }
    }
    head(
        &mut out,
        "pgsilo_worker_query_duration_seconds",
        "histogram",
        "Request durations per worker.",
    );
    for w in workers {
        histogram(
            &mut out,
            "pgsilo_worker_query_duration_seconds",
            &wl(w),
            &w.totals.query_time,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_pools_and_histograms() {
        let p = PoolView {
            database: "db\"x".into(),
            user: "u".into(),
            mode: "transaction",
            cap: 5,
            idle: 2,
            waiting: 1,
            busy_budget_millicores: 500,
            busy_seconds: 1.25,
            totals: PoolTotals {
                clients: 3,
                xact_count: 7,
                ..Default::default()
            },
        };
        let text = render("t", &[p], &[]);
        assert!(text.contains("pgsilo_pool_clients{database=\"db\\\"x\",user=\"u\",state=\"active\"} 2"));
        assert!(text.contains("pgsilo_pool_transactions_total{database=\"db\\\"x\",user=\"u\"} 7"));
        assert!(text.contains("pgsilo_pool_busy_cores_max{database=\"db\\\"x\",user=\"u\"} 0.5"));
        assert!(text.contains("pgsilo_pool_busy_seconds_total{database=\"db\\\"x\",user=\"u\"} 1.25"));
        assert!(
            text.contains("pgsilo_pool_query_duration_seconds_bucket{database=\"db\\\"x\",user=\"u\",le=\"+Inf\"} 0")
        );
        assert!(text.contains("# TYPE pgsilo_pool_wait_duration_seconds histogram"));
        assert!(text.contains(
            "pgsilo_pool_acquire_duration_seconds_count{database=\"db\\\"x\",user=\"u\",path=\"other_worker\"} 0"
        ));
    }
}
