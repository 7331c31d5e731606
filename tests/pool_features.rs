//! Pool features PgBouncer users rely on, through the real pgsilo binary against real
//! PostgreSQL: server_login_retry, server_check_delay/server_check_query, min_pool_size,
//! reserve_pool_size/reserve_pool_timeout and max_db_connections.
//!
//! Timing is only ever bounded from above to prove that nothing hangs (generously: the
//! machine is small and shared), or from below where waiting is the behaviour under test.

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{free_port, PgCluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// How long a pgsilo may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for anything that must merely "not hang".
const HANG: Duration = Duration::from_secs(60);

/// A pgsilo process with a generated config, its stderr captured to a file; stopped
/// (SIGINT, then SIGKILL) on drop.
struct Silo {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

const USERLIST: &str = r#""user_a" "pass_a"
"scram_user" "scram_pass"
"md5_user" "md5_pass"
"admin" "admin_pass"
"#;

impl Silo {
    /// Starts pgsilo in transaction mode with tenant_a_db and app_db on `cluster`;
    /// `general` holds extra `[pgsilo]` lines, `app_db_extra` extra `[databases.app_db]` ones.
    fn start(cluster: &PgCluster, general: &str, app_db_extra: &str) -> Silo {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir");
            fs::write(dir.path().join("userlist.txt"), USERLIST).expect("write userlist");
            let port = free_port();
            let config = format!(
                r#"[pgsilo]
name = "poolfeat"
listen_addr = "127.0.0.1"
listen_port = {port}
auth_type = "scram-sha-256"
auth_file = "userlist.txt"
pool_mode = "transaction"
takeover_socket = ""
admin_users = ["admin"]
{general}

[databases.tenant_a_db]
host = "127.0.0.1"
port = {pg}

[databases.app_db]
host = "127.0.0.1"
port = {pg}
{app_db_extra}
"#,
                pg = cluster.port()
            );
            let path = dir.path().join("pgsilo.toml");
            fs::write(&path, config).expect("write config");
            let log = dir.path().join("pgsilo.log");
            let child = Command::new(env!("CARGO_BIN_EXE_pgsilo"))
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("spawn pgsilo");
            let mut silo = Silo {
                child,
                port,
                log,
                _dir: dir,
            };
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if silo.log_text().contains("listening on ") {
                    return silo;
                }
                if let Ok(Some(status)) = silo.child.try_wait() {
                    let text = silo.log_text();
                    // Another process took the port in between: try another.
                    assert!(
                        text.contains("in use"),
                        "pgsilo exited ({status}) before listening:\n{text}"
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "pgsilo did not listen within {START_TIMEOUT:?}:\n{}",
                    silo.log_text()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not find a free port for pgsilo");
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of pgsilo's log containing `needle`.
    fn count(&self, needle: &str) -> usize {
        self.log_text().lines().filter(|l| l.contains(needle)).count()
    }

    async fn connect(&self, user: &str, password: &str, db: &str) -> Result<Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(30));
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

impl Drop for Silo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- pgsilo log ---\n{}", self.log_text());
        }
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: a signal to our own child, which has not been reaped yet.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Client backends of `users` on `db`, as PostgreSQL sees them.
async fn backends(pg: &Client, db: &str, users: &[&str]) -> i64 {
    let users: Vec<String> = users.iter().map(|u| u.to_string()).collect();
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND datname = $1 AND usename = ANY($2)",
        &[&db, &users],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}

/// Polls until `backends` reaches `want`, or panics after `HANG`.
async fn await_backends(pg: &Client, db: &str, users: &[&str], want: i64) {
    let deadline = Instant::now() + HANG;
    loop {
        let n = backends(pg, db, users).await;
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{users:?} on {db}: {n} backends, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn one_int(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

fn code(e: &tokio_postgres::Error) -> Option<SqlState> {
    e.as_db_error().map(|d| d.code().clone())
}

/// The server's (here: pgsilo's) message, or the client library's description.
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_login_retry_holds_attempts_back_and_clients_resume() {
    let mut cluster = PgCluster::start();
    let silo = Silo::start(
        &cluster,
        "server_login_retry = 1\nquery_wait_timeout = 60\ndefault_pool_size = 4",
        "",
    );
    let warm = silo.connect("user_a", "pass_a", "tenant_a_db").await.expect("login");
    warm.simple_query("SELECT 1")
        .await
        .expect("query while PostgreSQL is up");
    drop(warm);

    cluster.stop();
    let down = Instant::now();
    // The pooled server was released moments ago: pgsilo hands out a server released
    // less than 100 ms before without a liveness peek (a system call per transaction
    // saved), and a client would hear that server's own goodbye (57P01) instead. This
    // test is about a new connection failing, so it waits that window out.
    tokio::time::sleep(Duration::from_millis(150)).await;

    // The client whose connection attempt fails hears why, at once: not a hang.
    let c = silo
        .connect("user_a", "pass_a", "tenant_a_db")
        .await
        .expect("login needs no server");
    let e = tokio::time::timeout(HANG, c.simple_query("SELECT 1"))
        .await
        .expect("a query with PostgreSQL down must fail, not hang")
        .expect_err("PostgreSQL is down");
    assert_eq!(code(&e), Some(SqlState::CONNECTION_FAILURE), "{e:?}");
    assert!(message(&e).contains("server connection failed"), "{e:?}");

    // Clients keep asking for 3 seconds, each reconnecting and retrying as soon as it
    // hears an error. Without server_login_retry that would be hundreds of attempts.
    let window = Duration::from_secs(3);
    let errors = Arc::new(AtomicUsize::new(0));
    let silo = Arc::new(silo);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (silo, errors) = (silo.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            // Until it succeeds: while PostgreSQL is down this either fails fast (the
            // probe) or waits in the queue; once it is back, it must succeed.
            loop {
                match silo.connect("user_a", "pass_a", "tenant_a_db").await {
                    Ok(c) => match c.simple_query("SELECT 1").await {
                        Ok(_) => return started.elapsed(),
                        Err(_) => errors.fetch_add(1, Ordering::SeqCst),
                    },
                    Err(_) => errors.fetch_add(1, Ordering::SeqCst),
                };
                assert!(started.elapsed() < HANG * 2, "no success after PostgreSQL came back");
            }
        }));
    }
    tokio::time::sleep(window).await;
    let attempts_while_down = silo.count("could not open a server connection");
    let secs_down = down.elapsed().as_secs_f64();
    // One attempt per retry interval, plus the first failure and some slack for a busy
    // machine: far below what retrying clients would cause unchecked.
    assert!(
        (attempts_while_down as f64) <= secs_down + 3.0,
        "{attempts_while_down} connection attempts in {secs_down:.1} s with server_login_retry = 1"
    );
    assert!(attempts_while_down >= 2, "the retry must try again after its delay");

    // PostgreSQL comes back: the waiting clients (and those retrying) all succeed.
    cluster.restart();
    for t in tasks {
        tokio::time::timeout(HANG * 3, t)
            .await
            .expect("waiting clients must succeed once PostgreSQL is back")
            .expect("task");
    }
    let total_attempts = silo.count("could not open a server connection");
    let total_secs = down.elapsed().as_secs_f64();
    assert!(
        (total_attempts as f64) <= total_secs + 3.0,
        "{total_attempts} connection attempts in {total_secs:.1} s with server_login_retry = 1"
    );
    let c = silo.connect("user_a", "pass_a", "tenant_a_db").await.expect("login");
    c.simple_query("SELECT 1").await.expect("a new query after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_check_query_replaces_dead_and_failing_servers() {
    let cluster = PgCluster::builder().setting("log_statement", "all").start();
    let pg = cluster.superuser_client().await;

    // server_check_delay = 0: every reuse is checked; a terminated backend is replaced.
    let silo = Silo::start(
        &cluster,
        "server_check_delay = 0\nserver_check_query = \"select 'poolfeat check'\"\ndefault_pool_size = 2",
        "",
    );
    let c = silo.connect("user_a", "pass_a", "tenant_a_db").await.expect("login");
    let first = one_int(&c, "SELECT pg_backend_pid()::int8").await;
    let again = one_int(&c, "SELECT pg_backend_pid()::int8").await;
    assert_eq!(first, again, "a healthy server is reused after its check");
    assert!(
        cluster.log().contains("statement: select 'poolfeat check'"),
        "with server_check_delay = 0 the reused server is checked first"
    );
    assert!(cluster.kill_backends("user_a") >= 1);
    let replaced = one_int(&c, "SELECT pg_backend_pid()::int8").await;
    assert_ne!(replaced, first, "the terminated server is replaced transparently");
    drop(c);
    drop(silo);

    // A check that fails closes the server; the client gets another.
    let silo = Silo::start(
        &cluster,
        "server_check_delay = 0\nserver_check_query = \"select 1/0\"\ndefault_pool_size = 2",
        "",
    );
    let c = silo.connect("scram_user", "scram_pass", "app_db").await.expect("login");
    let first = one_int(&c, "SELECT pg_backend_pid()::int8").await;
    let second = one_int(&c, "SELECT pg_backend_pid()::int8").await;
    assert_ne!(first, second, "the server that failed its check is not used");
    assert!(
        silo.count("server_check_query failed") >= 1,
        "the failed check is logged:\n{}",
        silo.log_text()
    );
    assert!(silo.log_text().contains("division by zero"));
    // And PostgreSQL sees it closed.
    let deadline = Instant::now() + HANG;
    while pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&(first as i32)],
        )
        .await
        .expect("pg_stat_activity")
        .get::<_, i64>(0)
        != 0
    {
        assert!(
            Instant::now() < deadline,
            "the server whose check failed was not closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn min_pool_size_keeps_servers_open_without_clients() {
    let cluster = PgCluster::start();
    let pg = cluster.superuser_client().await;
    let silo = Silo::start(&cluster, "min_pool_size = 3\ndefault_pool_size = 5", "");
    let c = silo.connect("user_a", "pass_a", "tenant_a_db").await.expect("login");
    c.simple_query("SELECT 1").await.expect("query");
    drop(c);

    await_backends(&pg, "tenant_a_db", &["user_a"], 3).await;
    // Never more than asked for.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(backends(&pg, "tenant_a_db", &["user_a"]).await, 3);

    // Lost servers are replaced in the background too.
    assert_eq!(cluster.kill_backends("user_a"), 3);
    await_backends(&pg, "tenant_a_db", &["user_a"], 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reserve_pool_serves_a_client_that_waited_reserve_pool_timeout() {
    let cluster = PgCluster::start();
    let pg = cluster.superuser_client().await;
    let silo = Silo::start(
        &cluster,
        "default_pool_size = 1\nreserve_pool_size = 1\nreserve_pool_timeout = 1\nquery_wait_timeout = 10",
        "",
    );
    let holder = silo.connect("user_a", "pass_a", "tenant_a_db").await.expect("login");
    holder.batch_execute("BEGIN; SELECT 1").await.expect("begin");

    let waiter = silo.connect("user_a", "pass_a", "tenant_a_db").await.expect("login");
    let asked = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(9), waiter.simple_query("SELECT 1")).await;
    let waited = asked.elapsed();
    res.expect("served from the reserve before query_wait_timeout")
        .expect("query on a reserve connection");
    assert!(
        waited >= Duration::from_millis(950),
        "the reserve is for clients that waited reserve_pool_timeout; served after {waited:?}"
    );
    assert_eq!(backends(&pg, "tenant_a_db", &["user_a"]).await, 2);
    assert_eq!(silo.count("taking connection from reserve_pool"), 1);

    holder.batch_execute("COMMIT").await.expect("commit");
    // The reserve is bounded: a third concurrent transaction cannot get a third server.
    holder.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    waiter.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    let third = silo.connect("user_a", "pass_a", "tenant_a_db").await.expect("login");
    let e = tokio::time::timeout(HANG, third.simple_query("SELECT 1"))
        .await
        .expect("query_wait_timeout ends the wait")
        .expect_err("pool and reserve are both busy");
    assert!(message(&e).contains("query_wait_timeout"), "{e:?}");
    assert_eq!(backends(&pg, "tenant_a_db", &["user_a"]).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_db_connections_caps_a_database_across_users_without_starving_any() {
    let cluster = PgCluster::start();
    let pg = cluster.superuser_client().await;
    let users = ["scram_user", "md5_user"];
    let silo = Arc::new(Silo::start(
        &cluster,
        "default_pool_size = 10\nquery_wait_timeout = 60",
        "max_db_connections = 2",
    ));

    // Idle servers of one user fill the database's cap...
    let a1 = silo.connect("scram_user", "scram_pass", "app_db").await.expect("login");
    let a2 = silo.connect("scram_user", "scram_pass", "app_db").await.expect("login");
    a1.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    a2.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    a1.batch_execute("COMMIT").await.expect("commit");
    a2.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(backends(&pg, "app_db", &["scram_user"]).await, 2);
    // ...and the other user still gets a server, from an evicted one.
    let b = silo.connect("md5_user", "md5_pass", "app_db").await.expect("login");
    tokio::time::timeout(Duration::from_secs(20), b.simple_query("SELECT 1"))
        .await
        .expect("another user's idle servers must not block the database")
        .expect("query");
    assert!(silo.count("closing because: evicted") >= 1, "{}", silo.log_text());
    assert!(backends(&pg, "app_db", &users).await <= 2);
    drop((a1, a2, b));

    // Both users busy at once: PostgreSQL never sees more than 2 backends for app_db and
    // every query of both users succeeds.
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        let pg = cluster.superuser_client().await;
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let n = backends(&pg, "app_db", &users).await as usize;
                peak.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..8 {
        let silo = silo.clone();
        let (user, password) = if i % 2 == 0 {
            ("scram_user", "scram_pass")
        } else {
            ("md5_user", "md5_pass")
        };
        tasks.push(tokio::spawn(async move {
            let c = silo.connect(user, password, "app_db").await.expect("login");
            for _ in 0..10 {
                let rows = c
                    .simple_query("SELECT pg_sleep(0.02), current_user")
                    .await
                    .unwrap_or_else(|e| panic!("{user}: {e}"));
                assert!(!rows.is_empty());
            }
            user
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(
            tokio::time::timeout(HANG * 2, t)
                .await
                .expect("no client may wait forever")
                .expect("every query succeeds"),
        );
    }
    assert_eq!(done.iter().filter(|u| **u == "md5_user").count(), 4);

    // One user keeps the database busy without a pause; a query of the other user must
    // not wait for that load to end: the client waiting longest gets the next room.
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (silo, busy) = (silo.clone(), busy.clone());
        load.push(tokio::spawn(async move {
            let c = silo.connect("scram_user", "scram_pass", "app_db").await.expect("login");
            while busy.load(Ordering::SeqCst) {
                c.simple_query("SELECT pg_sleep(0.02)").await.expect("scram_user query");
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = silo.connect("md5_user", "md5_pass", "app_db").await.expect("login");
    let served = tokio::time::timeout(HANG, b.simple_query("SELECT 1")).await;
    let load_still_running = load.iter().all(|t| !t.is_finished());
    busy.store(false, Ordering::SeqCst);
    served.expect("md5_user must not starve").expect("md5_user query");
    assert!(
        load_still_running,
        "md5_user was served only once scram_user's load had ended"
    );
    for t in load {
        tokio::time::timeout(HANG, t)
            .await
            .expect("load ends")
            .expect("load task");
    }

    stop.store(true, Ordering::SeqCst);
    sampler.await.expect("sampler");
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak <= 2,
        "PostgreSQL saw {peak} backends for app_db with max_db_connections = 2"
    );
    assert!(peak >= 1);

    // SHOW DATABASES counts the database's servers across its pools.
    let admin = silo
        .connect("admin", "admin_pass", "pgsilo")
        .await
        .expect("admin login");
    let rows = admin.simple_query("SHOW DATABASES").await.expect("SHOW DATABASES");
    let app = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("name") == Some("app_db") => Some(r),
            _ => None,
        })
        .expect("app_db row");
    assert_eq!(app.get("max_connections"), Some("2"));
    let current: i64 = app
        .get("current_connections")
        .and_then(|v| v.parse().ok())
        .expect("current");
    assert!((1..=2).contains(&current), "current_connections = {current}");
}
