//! A pool's cold start, through the real pgsilo binary against real PostgreSQL:
//! min_pool_size opening servers ahead of any client (PgBouncer's rule: pools of a
//! database with a forced user), within pool_size and max_db_connections, kept up after
//! PostgreSQL ends backends and across RELOAD; and SHOW ACQUIRE counting how clients got
//! their servers.
//!
//! Timing is only ever bounded from above, to prove that nothing hangs.

mod support;

use std::time::{Duration, Instant};

use support::{free_port, PgCluster, Pgsilo, PgsiloBuilder};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Upper bound for anything that must merely "not hang".
const HANG: Duration = Duration::from_secs(60);
/// Long enough for several maintenance ticks (one a second) to have opened too many.
const SETTLE: Duration = Duration::from_millis(2500);

/// Client backends of `user` on `db`, as PostgreSQL sees them.
async fn backends(pg: &Client, db: &str, user: &str) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND datname = $1 AND usename = $2",
        &[&db, &user],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}

/// Polls until `backends` reaches `want`, or panics after `HANG`.
async fn await_backends(pg: &Client, db: &str, user: &str, want: i64) {
    let deadline = Instant::now() + HANG;
    loop {
        let n = backends(pg, db, user).await;
        if n == want {
            return;
        }
        assert!(Instant::now() < deadline, "{user} on {db}: {n} backends, want {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// user_a's servers forced on `db`, with its password in the section: pgsilo can log in
/// without any client.
fn forced_db(cluster: &PgCluster, db: &str) -> support::Db {
    support::Db::on(cluster, db).user("user_a").password("pass_a")
}

fn builder() -> PgsiloBuilder {
    Pgsilo::builder()
        .user("admin", "admin_pass")
        .set("admin_users", "[\"admin\"]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_opens_servers_before_any_client_and_replaces_lost_ones() {
    let cluster = PgCluster::start();
    let pg = cluster.superuser_client().await;
    // user_b's auth_file entry is a SCRAM verifier only: pgsilo cannot log in as user_b
    // until a client's SCRAM login, so that pool waits for one (as with PgBouncer).
    let verifier: String = pg
        .query_one("SELECT rolpassword FROM pg_authid WHERE rolname = 'user_b'", &[])
        .await
        .expect("user_b's verifier")
        .get(0);
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let silo = builder()
        .user("user_b", &verifier)
        .db(forced_db(&cluster, "app_db").pool_size(5).set("min_pool_size", "3"))
        .db(support::Db::on(&cluster, "tenant_b_db")
            .user("user_b")
            .set("min_pool_size", "2"))
        .start();

    await_backends(&pg, "app_db", "user_a", 3).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        backends(&pg, "app_db", "user_a").await,
        3,
        "never more than min_pool_size"
    );
    assert_eq!(
        backends(&pg, "tenant_b_db", "user_b").await,
        0,
        "a SCRAM verifier alone cannot log in"
    );

    assert_eq!(cluster.kill_backends("user_a"), 3);
    await_backends(&pg, "app_db", "user_a", 3).await;
    drop(silo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_ahead_stays_within_pool_size_and_max_db_connections() {
    let cluster = PgCluster::start();
    let pg = cluster.superuser_client().await;
    let _silo = builder()
        .db(forced_db(&cluster, "app_db").pool_size(2).set("min_pool_size", "6"))
        .db(forced_db(&cluster, "tenant_a_db")
            .pool_size(6)
            .set("min_pool_size", "6")
            .set("max_db_connections", "3"))
        .start();

    await_backends(&pg, "app_db", "user_a", 2).await;
    await_backends(&pg, "tenant_a_db", "user_a", 3).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        backends(&pg, "app_db", "user_a").await,
        2,
        "pool_size caps min_pool_size"
    );
    assert_eq!(
        backends(&pg, "tenant_a_db", "user_a").await,
        3,
        "max_db_connections caps min_pool_size"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_follows_reload() {
    let cluster = PgCluster::start();
    let pg = cluster.superuser_client().await;
    let before = builder().db(forced_db(&cluster, "app_db").set("min_pool_size", "1"));
    let silo = before.clone().start();
    await_backends(&pg, "app_db", "user_a", 1).await;

    // More for the running pool, and a database the reload adds.
    let after = builder()
        .db(forced_db(&cluster, "app_db").set("min_pool_size", "3"))
        .db(forced_db(&cluster, "tenant_a_db").set("min_pool_size", "2"));
    silo.rewrite(&after);
    silo.send_signal(libc::SIGHUP);
    await_backends(&pg, "app_db", "user_a", 3).await;
    await_backends(&pg, "tenant_a_db", "user_a", 2).await;
}

/// SHOW ACQUIRE's count for (database, path).
async fn acquired(admin: &Client, db: &str, path: &str) -> i64 {
    let rows = admin.simple_query("SHOW ACQUIRE").await.expect("SHOW ACQUIRE");
    rows.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .find(|r| r.get("database") == Some(db) && r.get("path") == Some(path))
        .and_then(|r| r.get("count"))
        .unwrap_or_else(|| panic!("no SHOW ACQUIRE row for {db} {path}"))
        .parse()
        .expect("a count")
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics_listen");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// The Prometheus sample `pgsilo_pool_acquire_duration_seconds_count` for the path.
fn acquired_metric(metrics_port: u16, db: &str, path: &str) -> f64 {
    let text = http_get(metrics_port, "/metrics");
    let prefix =
        format!("pgsilo_pool_acquire_duration_seconds_count{{database=\"{db}\",user=\"user_a\",path=\"{path}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        .parse()
        .expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_acquire_counts_new_idle_and_released_servers() {
    let cluster = PgCluster::start();
    let metrics_port = free_port();
    let silo = builder()
        .cpus(&[0])
        .user("user_a", "pass_a")
        .database("tenant_a_db", &cluster)
        .pool_size(1)
        .set_str("metrics_listen", &format!("127.0.0.1:{metrics_port}"))
        .start();
    silo.wait_for_log("metrics on http://", Duration::from_secs(10));
    let admin = silo
        .connect("admin", "admin_pass", "pgsilo")
        .await
        .expect("admin login");

    // The first client's login needs a server (the pool's first): a new one.
    let holder = silo.connect("user_a", "pass_a", "tenant_a_db").await.expect("login");
    assert_eq!(acquired(&admin, "tenant_a_db", "new").await, 1);
    // Its query finds that server idle.
    holder.simple_query("SELECT 1").await.expect("query");
    assert_eq!(acquired(&admin, "tenant_a_db", "idle").await, 1);
    assert_eq!(acquired(&admin, "tenant_a_db", "released").await, 0);

    // A client waiting while the only server is in a transaction gets it at COMMIT.
    holder.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    let config = silo.pg_config("user_a", Some("pass_a"), "tenant_a_db");
    let waiting = tokio::spawn(async move {
        let waiter = support::connect_with(&config).await?;
        waiter.simple_query("SELECT 2").await.map(|_| ())
    });
    let deadline = Instant::now() + HANG;
    while pools_sum(&admin, "cl_waiting").await == 0 {
        assert!(Instant::now() < deadline, "the second client never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder.batch_execute("COMMIT").await.expect("commit");
    tokio::time::timeout(HANG, waiting)
        .await
        .expect("the waiter was served")
        .expect("task")
        .expect("query");
    assert_eq!(acquired(&admin, "tenant_a_db", "released").await, 1);
    assert_eq!(acquired(&admin, "tenant_a_db", "new").await, 1);
    assert_eq!(acquired_metric(metrics_port, "tenant_a_db", "released"), 1.0);
    assert_eq!(acquired_metric(metrics_port, "tenant_a_db", "new"), 1.0);
    assert_eq!(acquired_metric(metrics_port, "tenant_a_db", "other_worker"), 0.0);
}

/// A SHOW POOLS column, summed over the pools.
async fn pools_sum(admin: &Client, column: &str) -> i64 {
    let rows = admin.simple_query("SHOW POOLS").await.expect("SHOW POOLS");
    rows.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(column).and_then(|v| v.parse::<i64>().ok()),
            _ => None,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_acquire_counts_servers_moved_from_another_worker() {
    let cores: Vec<usize> = support::cores::available_cores().into_iter().collect();
    if cores.len() < 2 {
        eprintln!("skipped: needs two cores, this process may use {cores:?}");
        return;
    }
    let cluster = PgCluster::start();
    let silo = builder()
        .cpus(&cores[..2])
        .user("user_a", "pass_a")
        .database("tenant_a_db", &cluster)
        .pool_size(1)
        .start();
    // Ten clients, spread by the kernel over the two workers, take turns on one server:
    // it follows them from worker to worker.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(silo.connect("user_a", "pass_a", "tenant_a_db").await.expect("login"));
    }
    for _ in 0..3 {
        for c in &clients {
            c.simple_query("SELECT 1").await.expect("query");
        }
    }
    let admin = silo
        .connect("admin", "admin_pass", "pgsilo")
        .await
        .expect("admin login");
    assert!(acquired(&admin, "tenant_a_db", "other_worker").await > 0);
}

/// A TCP relay to PostgreSQL that holds each new connection back for `delay` before
/// passing bytes on: server logins through it are slow. Returns its port.
async fn slow_relay(pg_port: u16, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let port = listener.local_addr().expect("relay address").port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", pg_port)).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_a_new_server_takes_one_released_meanwhile() {
    let cluster = PgCluster::start();
    let relay = slow_relay(cluster.port(), Duration::from_secs(2)).await;
    let silo = builder()
        .cpus(&[0])
        .user("user_a", "pass_a")
        .db(support::Db::at("127.0.0.1", relay, "tenant_a_db").pool_size(2))
        .start();
    let admin = silo
        .connect("admin", "admin_pass", "pgsilo")
        .await
        .expect("admin login");

    let holder = silo.connect("user_a", "pass_a", "tenant_a_db").await.expect("login");
    holder.batch_execute("BEGIN").await.expect("begin");
    let held: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);

    // The pool has room for a second server, whose login takes seconds; meanwhile the
    // holder commits, and the waiting client takes the server it released.
    let config = silo.pg_config("user_a", Some("pass_a"), "tenant_a_db");
    let waiting = tokio::spawn(async move {
        let waiter = support::connect_with(&config).await.expect("login");
        waiter
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    let deadline = Instant::now() + HANG;
    while pools_sum(&admin, "sv_login").await == 0 {
        assert!(Instant::now() < deadline, "no second server was opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder.batch_execute("COMMIT").await.expect("commit");
    let got = tokio::time::timeout(HANG, waiting)
        .await
        .expect("the waiter was served")
        .expect("task")
        .expect("query");
    assert_eq!(got, held, "served by the released server, not the one still logging in");
    assert_eq!(acquired(&admin, "tenant_a_db", "released").await, 1);
}
