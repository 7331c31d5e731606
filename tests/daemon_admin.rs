//! The admin console as operators and their tools use it: PgBouncer's SHOW columns with
//! values that follow the traffic, who may do what, PAUSE/RESUME/KILL/RELOAD/SHUTDOWN,
//! psql and tokio-postgres (simple and extended protocol), and Debian's
//! prometheus-pgbouncer-exporter reading it.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{db_error, free_port, must_fail, runtime, simple_rows, PgCluster, Pgsilo, PgsiloBuilder};

const ADMIN: &str = "admin";
const ADMIN_PASS: &str = "admin_pass";
const STATS: &str = "stats";
const STATS_PASS: &str = "stats_pass";
const LONG: Duration = Duration::from_secs(60);

type Row = BTreeMap<String, Option<String>>;

fn builder(cluster: &PgCluster) -> PgsiloBuilder {
    Pgsilo::builder()
        .pool_size(1)
        .user("user_a", "pass_a")
        .user("scram_user", "scram_pass")
        .user(ADMIN, ADMIN_PASS)
        .user(STATS, STATS_PASS)
        .set("admin_users", "[\"admin\"]")
        .set("stats_users", "[\"stats\"]")
        .database("tenant_a_db", cluster)
        .database("app_db", cluster)
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + LONG;
    while !f().await {
        assert!(Instant::now() < deadline, "{what} did not happen within {LONG:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn show(admin: &tokio_postgres::Client, what: &str) -> (Vec<String>, Vec<Row>) {
    simple_rows(admin, &format!("SHOW {what}"))
        .await
        .unwrap_or_else(|e| panic!("SHOW {what}: {e}"))
}

fn find<'a>(rows: &'a [Row], key: &str, value: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.get(key).cloned().flatten().as_deref() == Some(value))
}

fn num(row: &Row, col: &str) -> i64 {
    row.get(col)
        .unwrap_or_else(|| panic!("no column {col} in {row:?}"))
        .as_deref()
        .unwrap_or_else(|| panic!("{col} is NULL in {row:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{col} in {row:?}: {e}"))
}

fn has_columns(what: &str, columns: &[String], wanted: &[&str]) {
    for w in wanted {
        assert!(
            columns.iter().any(|c| c == w),
            "SHOW {what} lacks column {w}: {columns:?}"
        );
    }
}

/// Connects and keeps the connection's outcome: Err carries what ended it (e.g. the
/// server's FATAL 57P01).
async fn connect_watched(
    p: &Pgsilo,
    user: &str,
    password: &str,
    db: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = p
        .pg_config(user, Some(password), db)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {user}/{db}: {e}"));
    (client, tokio::spawn(connection))
}

#[test]
fn every_show_has_pgbouncers_columns_and_values_follow_the_traffic() {
    let cluster = PgCluster::start();
    let p = builder(&cluster).start();
    let rt = runtime();
    rt.block_on(async {
        let admin = p.connect(ADMIN, ADMIN_PASS, "pgsilo").await.unwrap();
        let mut cfg = p.pg_config("user_a", Some("pass_a"), "tenant_a_db");
        cfg.application_name("holder");
        let c1 = support::connect_with(&cfg).await.unwrap();
        for _ in 0..5 {
            c1.batch_execute("BEGIN; SELECT 1; SELECT 2; COMMIT").await.unwrap();
        }
        let (_, stats0) = show(&admin, "STATS").await;
        let before = find(&stats0, "database", "tenant_a_db")
            .expect("SHOW STATS row")
            .clone();
        assert!(num(&before, "total_xact_count") >= 5, "{before:?}");
        // A simple-protocol Query message is one request, however many statements.
        assert!(num(&before, "total_query_count") >= 5, "{before:?}");
        assert!(num(&before, "total_received") > 0, "{before:?}");
        assert!(num(&before, "total_sent") > 0, "{before:?}");
        assert!(num(&before, "total_xact_time") > 0, "{before:?}");
        assert!(num(&before, "total_query_time") > 0, "{before:?}");
        for _ in 0..5 {
            c1.simple_query("SELECT 3").await.unwrap();
        }

        // c1 holds the only server in a transaction; c2 waits for it.
        c1.batch_execute("BEGIN").await.unwrap();
        let backend_pid: i32 = c1.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        let c2 = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        let waiter = tokio::spawn(async move { c2.simple_query("SELECT 'waited'").await.map(|_| c2) });

        let mut pools = Vec::new();
        eventually("cl_waiting = 1", async || {
            let (cols, rows) = show(&admin, "POOLS").await;
            assert_eq!(
                cols,
                [
                    "database",
                    "user",
                    "cl_active",
                    "cl_waiting",
                    "cl_cancel_req",
                    "sv_active",
                    "sv_idle",
                    "sv_used",
                    "sv_tested",
                    "sv_login",
                    "maxwait",
                    "maxwait_us",
                    "pool_mode",
                    "max_busy_cores",
                    "busy_cores"
                ]
            );
            pools = rows;
            find(&pools, "database", "tenant_a_db").is_some_and(|r| num(r, "cl_waiting") == 1)
        })
        .await;
        let pool = find(&pools, "database", "tenant_a_db").unwrap();
        assert_eq!(pool["user"].as_deref(), Some("user_a"));
        assert_eq!(num(pool, "cl_active"), 1, "{pool:?}");
        assert_eq!(num(pool, "sv_active"), 1, "{pool:?}");
        assert_eq!(pool["pool_mode"].as_deref(), Some("transaction"));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (_, pools) = show(&admin, "POOLS").await;
        let pool = find(&pools, "database", "tenant_a_db").unwrap();
        assert!(
            num(pool, "maxwait") >= 1 || num(pool, "maxwait_us") > 0,
            "the waiting client's wait shows: {pool:?}"
        );

        let conn_cols = [
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "local_addr",
            "local_port",
            "connect_time",
            "request_time",
            "wait",
            "wait_us",
            "close_needed",
            "ptr",
            "link",
            "remote_pid",
            "tls",
            "application_name",
        ];
        let (cols, servers) = show(&admin, "SERVERS").await;
        has_columns("SERVERS", &cols, &conn_cols);
        let server = find(&servers, "remote_pid", &backend_pid.to_string())
            .unwrap_or_else(|| panic!("the held server (pid {backend_pid}) in SHOW SERVERS: {servers:?}"));
        assert_eq!(server["type"].as_deref(), Some("S"));
        assert_eq!(server["user"].as_deref(), Some("user_a"));
        assert_eq!(server["database"].as_deref(), Some("tenant_a_db"));
        assert_eq!(server["state"].as_deref(), Some("active"));
        assert_eq!(server["port"].as_deref(), Some(cluster.port().to_string().as_str()));
        let server_ptr = server["ptr"].clone().unwrap();
        let client_ptr = server["link"]
            .clone()
            .expect("an active server is linked to its client");

        let (cols, clients) = show(&admin, "CLIENTS").await;
        has_columns("CLIENTS", &cols, &conn_cols);
        let holder = find(&clients, "ptr", &client_ptr).unwrap_or_else(|| panic!("{clients:?}"));
        assert_eq!(holder["type"].as_deref(), Some("C"));
        assert_eq!(holder["application_name"].as_deref(), Some("holder"));
        assert_eq!(holder["state"].as_deref(), Some("active"));
        assert_eq!(holder["link"].as_deref(), Some(server_ptr.as_str()));
        assert_eq!(holder["addr"].as_deref(), Some("127.0.0.1"));
        assert_eq!(holder["local_port"].as_deref(), Some(p.port().to_string().as_str()));
        let waiting: Vec<&Row> = clients
            .iter()
            .filter(|c| c["database"].as_deref() == Some("tenant_a_db") && c["state"].as_deref() == Some("waiting"))
            .collect();
        assert_eq!(waiting.len(), 1, "one waiting client: {clients:?}");
        assert!(
            find(&clients, "database", "pgsilo").is_some(),
            "the console's own client: {clients:?}"
        );

        c1.batch_execute("COMMIT").await.unwrap();
        let c2 = tokio::time::timeout(LONG, waiter).await.unwrap().unwrap().unwrap();
        c2.simple_query("SELECT 1").await.unwrap();

        let (cols, stats) = show(&admin, "STATS").await;
        has_columns(
            "STATS",
            &cols,
            &[
                "database",
                "total_xact_count",
                "total_query_count",
                "total_received",
                "total_sent",
                "total_xact_time",
                "total_query_time",
                "total_wait_time",
                "avg_xact_count",
                "avg_query_count",
                "avg_recv",
                "avg_sent",
                "avg_xact_time",
                "avg_query_time",
                "avg_wait_time",
            ],
        );
        let after = find(&stats, "database", "tenant_a_db").unwrap();
        for col in ["total_xact_count", "total_query_count", "total_received", "total_sent"] {
            assert!(
                num(after, col) > num(&before, col),
                "{col} grew: {before:?} -> {after:?}"
            );
        }
        assert!(num(after, "total_wait_time") > 0, "c2 waited: {after:?}");

        let (cols, totals) = show(&admin, "STATS_TOTALS").await;
        has_columns(
            "STATS_TOTALS",
            &cols,
            &[
                "database",
                "xact_count",
                "query_count",
                "bytes_received",
                "bytes_sent",
                "xact_time",
                "query_time",
                "wait_time",
            ],
        );
        assert!(num(find(&totals, "database", "tenant_a_db").unwrap(), "xact_count") > 5);
        let (cols, _) = show(&admin, "STATS_AVERAGES").await;
        // Averages appear after the first stats_period; the columns are there at once
        // only once a row exists, so check them when present.
        if !cols.is_empty() {
            has_columns("STATS_AVERAGES", &cols, &["database", "xact_count", "query_count"]);
        }

        let (cols, dbs) = show(&admin, "DATABASES").await;
        has_columns(
            "DATABASES",
            &cols,
            &[
                "name",
                "host",
                "port",
                "database",
                "force_user",
                "pool_size",
                "min_pool_size",
                "reserve_pool",
                "pool_mode",
                "max_connections",
                "current_connections",
                "paused",
                "disabled",
            ],
        );
        let db = find(&dbs, "name", "tenant_a_db").unwrap();
        assert_eq!(num(db, "pool_size"), 1);
        assert_eq!(num(db, "current_connections"), 1);
        assert_eq!(num(db, "paused"), 0);
        assert!(find(&dbs, "name", "app_db").is_some());

        let (cols, config) = show(&admin, "CONFIG").await;
        assert_eq!(cols, ["key", "value", "default", "changeable"]);
        let port = find(&config, "key", "listen_port").unwrap();
        assert_eq!(port["value"].as_deref(), Some(p.port().to_string().as_str()));
        assert_eq!(port["changeable"].as_deref(), Some("no"));
        assert_eq!(
            find(&config, "key", "default_pool_size").unwrap()["value"].as_deref(),
            Some("1")
        );

        let (cols, lists) = show(&admin, "LISTS").await;
        assert_eq!(cols, ["list", "items"]);
        assert_eq!(num(find(&lists, "list", "databases").unwrap(), "items"), 2);
        assert_eq!(num(find(&lists, "list", "users").unwrap(), "items"), 4);
        assert!(num(find(&lists, "list", "used_clients").unwrap(), "items") >= 3);

        let (cols, users) = show(&admin, "USERS").await;
        has_columns("USERS", &cols, &["name", "pool_mode"]);
        assert_eq!(users.len(), 4, "{users:?}");
        let (cols, version) = show(&admin, "VERSION").await;
        assert_eq!(cols, ["version"]);
        assert!(version[0]["version"].as_deref().unwrap().starts_with("pgsilo "));

        let (cols, workers) = show(&admin, "WORKERS").await;
        has_columns("WORKERS", &cols, &["worker", "core", "io_driver", "clients", "servers"]);
        let log = p.log();
        let count: usize = log
            .lines()
            .find(|l| l.contains(" LOG listening on "))
            .and_then(|l| l.split(" with ").nth(1))
            .and_then(|s| s.split(" worker(s)").next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("worker count in the log:\n{log}"));
        assert_eq!(workers.len(), count, "{workers:?}");
        for (i, w) in workers.iter().enumerate() {
            assert_eq!(num(w, "worker"), i as i64);
            assert!(matches!(w["io_driver"].as_deref(), Some("io_uring" | "epoll")), "{w:?}");
        }
        assert!(
            workers.iter().map(|w| num(w, "clients")).sum::<i64>() >= 3,
            "{workers:?}"
        );
        assert!(
            workers.iter().map(|w| num(w, "servers")).sum::<i64>() >= 1,
            "{workers:?}"
        );

        // HELP answers with notices and a command tag; an unknown SHOW is an error.
        admin.simple_query("SHOW HELP").await.expect("SHOW HELP");
        let e = admin.simple_query("SHOW NOTHING").await.unwrap_err();
        assert_eq!(db_error(&e).0, "42601", "{e}");
        // The same session carries on after an error.
        show(&admin, "VERSION").await;
    });
}

#[test]
fn stats_users_only_look_and_others_are_refused() {
    let cluster = PgCluster::start();
    let p = builder(&cluster).start();
    let rt = runtime();
    rt.block_on(async {
        let stats = p
            .connect(STATS, STATS_PASS, "pgbouncer")
            .await
            .expect("stats user logs in");
        for what in ["POOLS", "STATS", "CLIENTS", "SERVERS", "DATABASES", "CONFIG", "WORKERS"] {
            show(&stats, what).await;
        }
        for cmd in [
            "RELOAD",
            "PAUSE",
            "PAUSE tenant_a_db",
            "RESUME",
            "KILL tenant_a_db",
            "SHUTDOWN",
        ] {
            let e = stats.simple_query(cmd).await.unwrap_err();
            assert_eq!(db_error(&e).0, "42501", "{cmd}: {e}");
        }
        assert!(!p.log().contains("PAUSE"), "nothing was paused");
        // A database user is no console user.
        let e = must_fail(p.connect("user_a", "pass_a", "pgsilo").await, "user_a on the console");
        assert_eq!(db_error(&e).0, "42501", "{e}");
        // Nor is anyone with a wrong password.
        let e = must_fail(p.connect(ADMIN, "wrong", "pgsilo").await, "a wrong password");
        assert_eq!(db_error(&e).0, "28P01", "{e}");
        // The pooler still serves.
        let c = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        c.simple_query("SELECT 1").await.unwrap();
    });
}

#[test]
fn pause_waits_for_the_transaction_and_resume_lets_the_waiting_query_run() {
    let cluster = PgCluster::start();
    let p = builder(&cluster).pool_size(2).start();
    let rt = runtime();
    rt.block_on(async {
        let admin = p.connect(ADMIN, ADMIN_PASS, "pgsilo").await.unwrap();
        let c1 = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        let other = p.connect("scram_user", "scram_pass", "app_db").await.unwrap();
        c1.batch_execute("DROP TABLE IF EXISTS pause_t; CREATE TABLE pause_t (x int)")
            .await
            .unwrap();
        c1.batch_execute("BEGIN; INSERT INTO pause_t VALUES (1)").await.unwrap();

        let pause = tokio::spawn(async move { admin.simple_query("PAUSE tenant_a_db").await.map(|_| admin) });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!pause.is_finished(), "PAUSE returned while a transaction ran");
        // The running transaction goes on, and another database is not paused.
        c1.batch_execute("INSERT INTO pause_t VALUES (2)").await.unwrap();
        other.simple_query("SELECT 1").await.unwrap();
        c1.batch_execute("COMMIT").await.unwrap();
        let admin = tokio::time::timeout(LONG, pause)
            .await
            .expect("PAUSE returns once the transaction ended")
            .unwrap()
            .unwrap();
        let (_, dbs) = show(&admin, "DATABASES").await;
        assert_eq!(num(find(&dbs, "name", "tenant_a_db").unwrap(), "paused"), 1);
        assert_eq!(num(find(&dbs, "name", "app_db").unwrap(), "paused"), 0);

        // New work waits: a query of the connected client and a new client's.
        let q1 = tokio::spawn(async move {
            c1.query_one("SELECT count(*) FROM pause_t", &[])
                .await
                .map(|r| r.get::<_, i64>(0))
        });
        let q2 = {
            let cfg = p.pg_config("user_a", Some("pass_a"), "tenant_a_db");
            tokio::spawn(async move {
                let c = support::connect_with(&cfg).await?;
                c.query_one("SELECT 7", &[]).await.map(|r| r.get::<_, i32>(0))
            })
        };
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!q1.is_finished() && !q2.is_finished(), "queries ran while paused");
        other.simple_query("SELECT 1").await.unwrap();
        admin.simple_query("RESUME tenant_a_db").await.unwrap();
        assert_eq!(tokio::time::timeout(LONG, q1).await.unwrap().unwrap().unwrap(), 2);
        assert_eq!(tokio::time::timeout(LONG, q2).await.unwrap().unwrap().unwrap(), 7);
        let (_, dbs) = show(&admin, "DATABASES").await;
        assert_eq!(num(find(&dbs, "name", "tenant_a_db").unwrap(), "paused"), 0);

        // PAUSE of every database, and an unknown one.
        admin.simple_query("PAUSE").await.unwrap();
        admin.simple_query("RESUME").await.unwrap();
        let e = admin.simple_query("PAUSE no_such_db").await.unwrap_err();
        assert_eq!(db_error(&e).0, "22023", "{e}");
        other.simple_query("SELECT 1").await.unwrap();
    });
}

#[test]
fn kill_disconnects_the_databases_clients_and_new_ones_wait_for_resume() {
    let cluster = PgCluster::start();
    let p = builder(&cluster).pool_size(2).start();
    let rt = runtime();
    rt.block_on(async {
        let admin = p.connect(ADMIN, ADMIN_PASS, "pgsilo").await.unwrap();
        let (idle, idle_conn) = connect_watched(&p, "user_a", "pass_a", "tenant_a_db").await;
        idle.simple_query("SELECT 1").await.unwrap();
        let (busy, busy_conn) = connect_watched(&p, "user_a", "pass_a", "tenant_a_db").await;
        let (other, other_conn) = connect_watched(&p, "scram_user", "scram_pass", "app_db").await;
        busy.batch_execute("BEGIN; SELECT 1").await.unwrap();

        admin.simple_query("KILL tenant_a_db").await.unwrap();
        for (name, conn) in [("idle", idle_conn), ("in a transaction", busy_conn)] {
            let ended = tokio::time::timeout(LONG, conn)
                .await
                .unwrap_or_else(|_| panic!("the {name} client was not disconnected"))
                .unwrap();
            let e = ended.expect_err("disconnected with an error");
            assert_eq!(db_error(&e).0, "57P01", "{name}: {e}");
        }
        assert!(idle.simple_query("SELECT 1").await.is_err());
        // Another database's client is untouched.
        other.simple_query("SELECT 1").await.unwrap();
        assert!(!other_conn.is_finished());

        let cfg = p.pg_config("user_a", Some("pass_a"), "tenant_a_db");
        let fresh = tokio::spawn(async move {
            let c = support::connect_with(&cfg).await?;
            c.query_one("SELECT 8", &[]).await.map(|r| r.get::<_, i32>(0))
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!fresh.is_finished(), "a new client ran a query before RESUME");
        admin.simple_query("RESUME tenant_a_db").await.unwrap();
        assert_eq!(tokio::time::timeout(LONG, fresh).await.unwrap().unwrap().unwrap(), 8);

        let e = admin.simple_query("KILL no_such_db").await.unwrap_err();
        assert_eq!(db_error(&e).0, "22023", "{e}");
    });
    let log = p.log();
    assert!(log.contains("KILL tenant_a_db issued by admin"), "{log}");
}

#[test]
fn reload_picks_up_a_changed_userlist() {
    let cluster = PgCluster::start();
    let b = builder(&cluster);
    let p = b.clone().start();
    let rt = runtime();
    rt.block_on(async {
        let admin = p.connect(ADMIN, ADMIN_PASS, "pgsilo").await.unwrap();
        let e = must_fail(p.connect("md5_user", "md5_pass", "app_db").await, "md5_user unknown");
        assert_eq!(db_error(&e).0, "28P01");
        p.rewrite(&b.clone().user("md5_user", "md5_pass"));
        let done = admin.simple_query("RELOAD").await.unwrap();
        assert!(
            done.iter()
                .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(_))),
            "{done:?}"
        );
        let c = p
            .connect("md5_user", "md5_pass", "app_db")
            .await
            .expect("md5_user after RELOAD");
        c.simple_query("SELECT 1").await.unwrap();
        let (_, users) = show(&admin, "USERS").await;
        assert!(find(&users, "name", "md5_user").is_some(), "{users:?}");
    });
    assert!(p.log().contains("RELOAD command issued by admin"), "{}", p.log());
}

/// SHUTDOWN from a console that stays connected: the process exits (0) without waiting
/// for shutdown_timeout, and every client, the console included, is disconnected.
#[test]
fn shutdown_stops_the_process() {
    let cluster = PgCluster::start();
    let mut p = builder(&cluster).start();
    let rt = runtime();
    rt.block_on(async {
        let admin = p.connect(ADMIN, ADMIN_PASS, "pgsilo").await.unwrap();
        let watcher = p.connect(STATS, STATS_PASS, "pgsilo").await.unwrap();
        let c = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        c.simple_query("SELECT 1").await.unwrap();
        let at = Instant::now();
        let _ = admin.simple_query("SHUTDOWN").await;
        let status = p.wait_exit(LONG).expect("pgsilo exits after SHUTDOWN");
        assert!(status.success(), "{status}\n{}", p.log());
        assert!(
            at.elapsed() < Duration::from_secs(15),
            "SHUTDOWN took {:?} (shutdown_timeout is 30 s): open console sessions held it",
            at.elapsed()
        );
        assert!(c.simple_query("SELECT 1").await.is_err());
        assert!(watcher.simple_query("SHOW VERSION").await.is_err());
    });
    assert!(p.log().contains("SHUTDOWN issued by admin"), "{}", p.log());
}

#[test]
fn the_console_speaks_psql_and_both_tokio_postgres_protocols() {
    let cluster = PgCluster::start();
    let p = builder(&cluster).start();
    // psql, simple protocol, both database names.
    for db in ["pgsilo", "pgbouncer"] {
        let out = p.psql(ADMIN, ADMIN_PASS, db, "SHOW VERSION;").unwrap();
        assert!(out.starts_with("pgsilo "), "{out}");
        let out = p.psql(STATS, STATS_PASS, db, "SHOW POOLS; SHOW WORKERS;").unwrap();
        assert!(!out.is_empty());
    }
    let err = p.psql(STATS, STATS_PASS, "pgsilo", "PAUSE;").unwrap_err();
    assert!(err.contains("admin access needed"), "{err}");
    let rt = runtime();
    rt.block_on(async {
        let c = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        c.simple_query("SELECT 1").await.unwrap();
        let admin = p.connect(ADMIN, ADMIN_PASS, "pgsilo").await.unwrap();
        // Several commands in one simple query.
        let msgs = admin.simple_query("SHOW VERSION; SHOW LISTS").await.unwrap();
        let rows = msgs
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        assert!(rows >= 13, "{rows} rows");

        // Extended protocol: prepared, typed columns (tokio-postgres asks for binary).
        let rows = admin
            .query("SHOW POOLS", &[])
            .await
            .expect("SHOW POOLS, extended protocol");
        let pool = rows
            .iter()
            .find(|r| r.get::<_, &str>("database") == "tenant_a_db")
            .expect("tenant_a_db pool");
        assert_eq!(pool.get::<_, &str>("user"), "user_a");
        assert_eq!(pool.get::<_, i64>("cl_active"), 1);
        assert_eq!(pool.get::<_, i64>("cl_waiting"), 0);
        assert_eq!(pool.get::<_, &str>("pool_mode"), "transaction");
        let stats = admin.query("SHOW STATS", &[]).await.unwrap();
        let row = stats
            .iter()
            .find(|r| r.get::<_, &str>("database") == "tenant_a_db")
            .unwrap();
        assert!(row.get::<_, i64>("total_query_count") >= 1);
        let workers = admin.query("SHOW WORKERS", &[]).await.unwrap();
        assert!(!workers.is_empty());
        let _: i64 = workers[0].get("worker");
        let _: Option<&str> = workers[0].get("io_driver");
        // A prepared statement runs again; an action too.
        let st = admin.prepare("SHOW VERSION").await.unwrap();
        for _ in 0..2 {
            let v = admin.query_one(&st, &[]).await.unwrap();
            assert!(v.get::<_, &str>(0).starts_with("pgsilo "));
        }
        admin.execute("RELOAD", &[]).await.expect("RELOAD, extended protocol");
        let e = admin.query("SHOW NOTHING", &[]).await.unwrap_err();
        assert_eq!(db_error(&e).0, "42601", "{e}");
        // Still in step after an error.
        assert_eq!(admin.query("SHOW VERSION", &[]).await.unwrap().len(), 1);
    });
}

/// Debian's prometheus-pgbouncer-exporter (python, psycopg2) scraping the console.
#[test]
fn prometheus_pgbouncer_exporter_reads_the_console() {
    let exporter = "/usr/bin/prometheus-pgbouncer-exporter";
    if !std::path::Path::new(exporter).exists() {
        eprintln!("SKIP: {exporter} is not installed (Debian package prometheus-pgbouncer-exporter)");
        return;
    }
    let cluster = PgCluster::start();
    let p = builder(&cluster).auth_type("md5").start();
    p.psql("user_a", "pass_a", "tenant_a_db", "SELECT 1").unwrap();
    let port = free_port();
    let mut child = Command::new(exporter)
        .args(["--pgbouncer-host", "127.0.0.1"])
        .args(["--pgbouncer-port", &p.port().to_string()])
        .args(["--pgbouncer-user", STATS])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("PGPASSWORD", STATS_PASS)
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the exporter");
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = Instant::now() + LONG;
    let body = loop {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the exporter exited ({status}): {}{}\n--- pgsilo ---\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                p.log()
            );
        }
        if let Some((status, body)) = http_get(port, "/metrics") {
            assert_eq!(status, 200, "{body}");
            break body;
        }
        assert!(Instant::now() < deadline, "the exporter did not answer");
        std::thread::sleep(Duration::from_millis(200));
    };
    let _reap = Reap(child);
    for metric in [
        "pgbouncer_active_clients{database=\"tenant_a_db\",user=\"user_a\"}",
        "pgbouncer_waiting_clients",
        "pgbouncer_requests_total{database=\"tenant_a_db\"}",
        "pgbouncer_received_bytes_total",
        "pgbouncer_sent_bytes_total",
        "pgbouncer_query_microseconds_total",
        "pgbouncer_pool_size{database=\"tenant_a_db\"}",
        "pgbouncer_databases",
        "pgbouncer_used_clients",
    ] {
        assert!(
            body.contains(metric),
            "{metric} missing from the exporter's output:\n{body}"
        );
    }
}

/// A minimal HTTP/1.0 GET: (status, body), or None if nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}
