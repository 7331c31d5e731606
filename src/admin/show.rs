//! SHOW commands, with PgBouncer's column names so tools built for its console work.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::result::{n, t, Outcome, ResultSet};
use crate::config::{cores_text, General};
use crate::context::Instance;
use crate::metrics::{ConnEntry, ConnState, PoolTotals, CLIENTS, SERVERS};
use crate::protocol::backend::ColumnType::{Int8, Text};

pub fn show(instance: &Instance, what: &str) -> Result<Outcome, String> {
    Ok(Outcome::Rows(match what {
        "POOLS" => pools(instance),
        "STATS" => stats(instance),
        "STATS_TOTALS" => stats_totals(instance),
        "STATS_AVERAGES" => stats_averages(instance),
        "CLIENTS" => connections("C", &CLIENTS.all()),
        "SERVERS" => connections("S", &SERVERS.all()),
        "DATABASES" => databases(instance),
        "CONFIG" => config(instance),
        "LISTS" => lists(instance),
        "USERS" => users(instance),
        "VERSION" => version(),
        "WORKERS" => workers(instance),
        "ACQUIRE" => super::acquire::show(instance),
        "HELP" => return Ok(help()),
        other => return Err(format!("unknown SHOW item '{other}', use SHOW HELP;")),
    }))
}

fn help() -> Outcome {
    Outcome::Notice(
        vec![
            "Console usage".into(),
            "\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION|WORKERS".into(),
            "\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|LISTS|ACQUIRE".into(),
            "\tPAUSE [<db>]".into(),
            "\tRESUME [<db>]".into(),
            "\tKILL <db>".into(),
            "\tRELOAD".into(),
            "\tSHUTDOWN".into(),
        ],
        "SHOW",
    )
}

/// Longest current wait of a waiting client in a pool, in microseconds.
fn max_wait_us(clients: &[Arc<ConnEntry>], database: &str, user: &str) -> u64 {
    clients
        .iter()
        .filter(|c| c.database == database && c.user == user)
        .map(|c| c.wait_us())
        .max()
        .unwrap_or(0)
}

fn pools(instance: &Instance) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("user", Text),
        ("cl_active", Int8),
        ("cl_waiting", Int8),
        ("cl_cancel_req", Int8),
        ("sv_active", Int8),
        ("sv_idle", Int8),
        ("sv_used", Int8),
        ("sv_tested", Int8),
        ("sv_login", Int8),
        ("maxwait", Int8),
        ("maxwait_us", Int8),
        ("pool_mode", Text),
        // pgsilo's own, after PgBouncer's: max_busy_cores (0: none), and the servers'
        // busy time in the last second as cores (metered only under a budget).
        ("max_busy_cores", Text),
        ("busy_cores", Text),
    ]);
    let clients = CLIENTS.all();
    for p in instance.pools.all() {
        let tot = p.stats.totals();
        let waiting = p.waiting_count() as i64;
        let wait = max_wait_us(&clients, &p.database, &p.user);
        rs.row(vec![
            t(&p.database),
            t(&p.user),
            n((tot.clients - waiting).max(0)),
            n(waiting),
            n(0),
            n(tot.servers_active.max(0)),
            n(p.idle_count()),
            n(0),
            n(0),
            n(tot.servers_login.max(0)),
            n(wait / 1_000_000),
            n(wait % 1_000_000),
            t(p.mode.as_str()),
            t(cores_text(p.busy.budget_millicores())),
            t(format!("{:.2}", p.busy.used_us(Instant::now()) as f64 / 1e6)),
        ]);
    }
    rs
}

/// Totals per database (PgBouncer aggregates SHOW STATS over users).
fn totals_by_database(instance: &Instance) -> BTreeMap<String, PoolTotals> {
    let mut by_db: BTreeMap<String, PoolTotals> = BTreeMap::new();
    for p in instance.pools.all() {
        by_db.entry(p.database.clone()).or_default().add(&p.stats.totals());
    }
    by_db
}

fn stats(instance: &Instance) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("total_xact_count", Int8),
        ("total_query_count", Int8),
        ("total_received", Int8),
        ("total_sent", Int8),
        ("total_xact_time", Int8),
        ("total_query_time", Int8),
        ("total_wait_time", Int8),
        ("avg_xact_count", Int8),
        ("avg_query_count", Int8),
        ("avg_recv", Int8),
        ("avg_sent", Int8),
        ("avg_xact_time", Int8),
        ("avg_query_time", Int8),
        ("avg_wait_time", Int8),
        // PgBouncer before 1.8 called the query count total_requests; exporters built
        // then (Debian's prometheus-pgbouncer-exporter among them) still read it.
        ("total_requests", Int8),
    ]);
    let averages = instance.averages();
    for (db, tot) in totals_by_database(instance) {
        let a = averages.get(&db).cloned().unwrap_or_default();
        rs.row(vec![
            t(&db),
            n(tot.xact_count),
            n(tot.query_count),
            n(tot.bytes_received),
            n(tot.bytes_sent),
            n(tot.xact_time_us),
            n(tot.query_time_us),
            n(tot.wait_time_us),
            n(a.xact_count),
            n(a.query_count),
            n(a.recv),
            n(a.sent),
            n(a.xact_time),
            n(a.query_time),
            n(a.wait_time),
            n(tot.query_count),
        ]);
    }
    rs
}

fn stats_totals(instance: &Instance) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("xact_count", Int8),
        ("query_count", Int8),
        ("bytes_received", Int8),
        ("bytes_sent", Int8),
        ("xact_time", Int8),
        ("query_time", Int8),
        ("wait_time", Int8),
    ]);
    for (db, tot) in totals_by_database(instance) {
        rs.row(vec![
            t(&db),
            n(tot.xact_count),
            n(tot.query_count),
            n(tot.bytes_received),
            n(tot.bytes_sent),
            n(tot.xact_time_us),
            n(tot.query_time_us),
            n(tot.wait_time_us),
        ]);
    }
    rs
}

fn stats_averages(instance: &Instance) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("xact_count", Int8),
        ("query_count", Int8),
        ("bytes_received", Int8),
        ("bytes_sent", Int8),
        ("xact_time", Int8),
        ("query_time", Int8),
        ("wait_time", Int8),
    ]);
    for (db, a) in instance.averages() {
        rs.row(vec![
            t(&db),
            n(a.xact_count),
            n(a.query_count),
            n(a.recv),
            n(a.sent),
            n(a.xact_time),
            n(a.query_time),
            n(a.wait_time),
        ]);
    }
    rs
}

fn timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

fn connections(kind: &str, entries: &[Arc<ConnEntry>]) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("type", Text),
        ("user", Text),
        ("database", Text),
        ("state", Text),
        ("addr", Text),
        ("port", Int8),
        ("local_addr", Text),
        ("local_port", Int8),
        ("connect_time", Text),
        ("request_time", Text),
        ("wait", Int8),
        ("wait_us", Int8),
        ("close_needed", Int8),
        ("ptr", Text),
        ("link", Text),
        ("remote_pid", Int8),
        ("tls", Text),
        ("application_name", Text),
        ("worker", Int8),
    ]);
    for e in entries {
        let state = match (kind, e.state()) {
            ("S", ConnState::Active) if e.link() == 0 => "used",
            (_, s) => s.as_str(),
        };
        let wait = e.wait_us();
        rs.row(vec![
            t(kind),
            t(&e.user),
            t(&e.database),
            t(state),
            t(&e.addr),
            n(e.port),
            e.local_addr.map(|a| a.ip().to_string()),
            e.local_addr.map(|a| a.port().to_string()),
            t(timestamp(e.connect_time)),
            t(timestamp(e.request_time())),
            n(wait / 1_000_000),
            n(wait % 1_000_000),
            n(0),
            t(format!("{:x}", e.id)),
            (e.link() != 0).then(|| format!("{:x}", e.link())),
            n(e.remote_pid),
            t(&e.tls),
            t(&e.application_name),
            n(e.worker()),
        ]);
    }
    rs
}

fn databases(instance: &Instance) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int8),
        ("database", Text),
        ("force_user", Text),
        ("pool_size", Int8),
        ("min_pool_size", Int8),
        ("reserve_pool", Int8),
        ("pool_mode", Text),
        ("max_connections", Int8),
        ("current_connections", Int8),
        ("paused", Int8),
        ("disabled", Int8),
    ]);
    let config = instance.config();
    let g = &config.general;
    let pools = instance.pools.all();
    for (name, db) in &config.databases {
        let mine: Vec<_> = pools.iter().filter(|p| &p.database == name).collect();
        // Server connections across the database's pools, as max_db_connections counts them.
        let current = instance.pools.db(name).map_or(0, |d| d.total());
        let paused = mine.iter().any(|p| p.paused.load(std::sync::atomic::Ordering::SeqCst));
        rs.row(vec![
            t(name),
            t(&db.host),
            n(db.port),
            t(&db.dbname),
            db.user.clone(),
            n(db.effective_pool_size(g)),
            n(db.effective_min_pool_size(g)),
            n(db.effective_reserve_pool(g)),
            t(db.effective_pool_mode(g).as_str()),
            n(db.max_db_connections),
            n(current),
            n(paused as u8),
            n(0),
        ]);
    }
    // The console itself, as PgBouncer lists it.
    rs.row(vec![
        t("pgsilo"),
        None,
        n(g.listen_port),
        t("pgsilo"),
        t("pgsilo"),
        n(2),
        n(0),
        n(0),
        t("statement"),
        n(0),
        n(0),
        n(0),
        n(0),
    ]);
    rs
}

fn config(instance: &Instance) -> ResultSet {
    let mut rs = ResultSet::new(&[("key", Text), ("value", Text), ("default", Text), ("changeable", Text)]);
    let config = instance.config();
    let defaults: BTreeMap<&str, String> = General::defaults(config.general.name.clone())
        .config_items()
        .into_iter()
        .collect();
    // Settings that need a restart; the rest take effect on RELOAD.
    const FIXED: &[&str] = &[
        "listen_addr",
        "listen_port",
        "listen_backlog",
        "cpus",
        "name",
        "metrics_listen",
        "takeover_socket",
    ];
    for (key, value) in config.config_items() {
        rs.row(vec![
            t(key),
            t(value),
            defaults.get(key).cloned(),
            t(if FIXED.contains(&key) { "no" } else { "yes" }),
        ]);
    }
    rs
}

fn lists(instance: &Instance) -> ResultSet {
    let mut rs = ResultSet::new(&[("list", Text), ("items", Int8)]);
    let config = instance.config();
    let clients = CLIENTS.all();
    let servers = SERVERS.all();
    let used_servers = servers.iter().filter(|s| s.state() == ConnState::Active).count();
    let login_clients = clients.iter().filter(|c| c.state() == ConnState::Login).count();
    let users = instance.userlist().len();
    for (k, v) in [
        ("databases", config.databases.len()),
        ("users", users),
        ("pools", instance.pools.all().len()),
        ("free_clients", 0),
        ("used_clients", clients.len()),
        ("login_clients", login_clients),
        ("free_servers", 0),
        ("used_servers", used_servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        rs.row(vec![t(k), n(v)]);
    }
    rs
}

fn users(instance: &Instance) -> ResultSet {
    let mut rs = ResultSet::new(&[("name", Text), ("pool_mode", Text)]);
    for (name, _) in instance.userlist().users() {
        rs.row(vec![t(name), None]);
    }
    rs
}

fn version() -> ResultSet {
    let mut rs = ResultSet::new(&[("version", Text)]);
    rs.row(vec![t(format!("pgsilo {}", env!("CARGO_PKG_VERSION")))]);
    rs
}

fn workers(instance: &Instance) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("worker", Int8),
        ("core", Int8),
        ("io_driver", Text),
        ("clients", Int8),
        ("servers", Int8),
        ("servers_active", Int8),
        ("servers_idle", Int8),
        ("xact_count", Int8),
        ("query_count", Int8),
    ]);
    let clients = CLIENTS.all();
    let servers = SERVERS.all();
    let pools = instance.pools.all();
    // Workers register as their threads come up, in any order; list them by number.
    let mut workers: Vec<_> = instance.workers.lock().unwrap_or_else(|p| p.into_inner()).clone();
    workers.sort_by_key(|w| w.id);
    for w in &workers {
        let mut tot = PoolTotals::default();
        for p in &pools {
            tot.add(&p.stats.worker_totals(w.id));
        }
        let mine = |e: &&Arc<ConnEntry>| e.worker() == w.id;
        let srv: Vec<_> = servers.iter().filter(mine).collect();
        rs.row(vec![
            n(w.id),
            w.core.map(|c| c.to_string()),
            t(w.driver),
            n(clients.iter().filter(mine).count()),
            n(srv.len()),
            n(srv.iter().filter(|s| s.state() == ConnState::Active).count()),
            n(srv.iter().filter(|s| s.state() == ConnState::Idle).count()),
            n(tot.xact_count),
            n(tot.query_count),
        ]);
    }
    rs
}
