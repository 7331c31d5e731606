//! Pooling as clients and PostgreSQL see it: transaction pooling shares few servers
//! among many clients and never splits a transaction; session pooling hands a server on
//! only when its client leaves, reset; a client that vanishes mid-transaction leaves
//! nothing open behind; cancel requests reach the right query.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{connect_with, runtime, PgCluster, Pgsilo};
use tokio_postgres::{NoTls, SimpleQueryMessage};

const USER: &str = "md5_user";
const PASSWORD: &str = "md5_pass";

fn pgsilo(cluster: &PgCluster, mode: &str, pool_size: usize) -> Pgsilo {
    Pgsilo::builder()
        .auth_type("md5")
        .pool_mode(mode)
        .pool_size(pool_size)
        .user(USER, PASSWORD)
        .database("app_db", cluster)
        .start()
}

async fn superuser(cluster: &PgCluster) -> tokio_postgres::Client {
    let config: tokio_postgres::Config = cluster.superuser_conn_string("app_db").parse().unwrap();
    connect_with(&config).await.unwrap()
}

/// A client whose connection task the test can abort, cutting the socket without a
/// Terminate.
async fn connect_cuttable(
    p: &Pgsilo,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = p
        .pg_config(USER, Some(PASSWORD), "app_db")
        .connect(NoTls)
        .await
        .unwrap();
    (client, tokio::spawn(connection))
}

/// Client backends of `USER` on the server.
async fn backends(su: &tokio_postgres::Client, filter: &str) -> i64 {
    su.query_one(
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{USER}' \
             AND backend_type = 'client backend' {filter}"
        ),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Polls until `f` is true; panics with `what` after `timeout`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
        _ => None,
    })?
}

#[test]
fn transaction_mode_shares_two_servers_among_fifty_clients() {
    let cluster = PgCluster::start();
    cluster.psql(
        "app_db",
        "CREATE TABLE hits (client int, n int); GRANT ALL ON hits TO PUBLIC;",
    );
    let p = pgsilo(&cluster, "transaction", 2);
    runtime().block_on(async {
        let su = superuser(&cluster).await;
        let stop = Arc::new(AtomicBool::new(false));
        let max_seen = Arc::new(AtomicUsize::new(0));
        let watcher = {
            let (stop, max_seen) = (stop.clone(), max_seen.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let n = backends(&su, "").await as usize;
                    max_seen.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                su
            })
        };

        let mut tasks = Vec::new();
        for id in 0..50i32 {
            let config = p.pg_config(USER, Some(PASSWORD), "app_db");
            tasks.push(tokio::spawn(async move {
                let c = connect_with(&config)
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: {e:?}"));
                for n in 0..10i32 {
                    // Extended protocol, with parameters.
                    let row = c.query_one("SELECT $1::int * 2", &[&id]).await.unwrap();
                    assert_eq!(row.get::<_, i32>(0), id * 2);
                    // Simple protocol.
                    let m = c.simple_query("SELECT 'x' || 1").await.unwrap();
                    assert_eq!(first_value(&m).as_deref(), Some("x1"));
                    // A transaction.
                    c.batch_execute(&format!("BEGIN; INSERT INTO hits VALUES ({id}, {n}); COMMIT"))
                        .await
                        .unwrap_or_else(|e| panic!("client {id}: {e:?}"));
                }
                c
            }));
        }
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await.expect("client task"));
        }
        stop.store(true, Ordering::SeqCst);
        let su = watcher.await.unwrap();

        let max = max_seen.load(Ordering::SeqCst);
        eprintln!("most backends PostgreSQL had at once for the pool: {max}");
        assert!(max >= 1, "the watcher never saw a backend");
        assert!(max <= 2, "PostgreSQL saw {max} backends for pool_size = 2");
        assert!(backends(&su, "").await <= 2);
        let rows: i64 = su.query_one("SELECT count(*) FROM hits", &[]).await.unwrap().get(0);
        assert_eq!(rows, 500);
        drop(clients);
    });
}

#[test]
fn a_transaction_keeps_its_server_until_commit() {
    let cluster = PgCluster::start();
    cluster.psql("app_db", "CREATE TABLE t (v text); GRANT ALL ON t TO PUBLIC;");
    let p = pgsilo(&cluster, "transaction", 1);
    runtime().block_on(async {
        let a = p.connect(USER, PASSWORD, "app_db").await.unwrap();
        let b = p.connect(USER, PASSWORD, "app_db").await.unwrap();
        a.batch_execute("BEGIN; INSERT INTO t VALUES ('a')").await.unwrap();
        let a_xid: i64 = a.query_one("SELECT txid_current()", &[]).await.unwrap().get(0);

        let committing = Arc::new(AtomicBool::new(false));
        let b_task = {
            let committing = committing.clone();
            tokio::spawn(async move {
                let row = b
                    .query_one("SELECT count(*), txid_current_if_assigned() FROM t", &[])
                    .await
                    .unwrap();
                let finished_after_commit = committing.load(Ordering::SeqCst);
                (
                    row.get::<_, i64>(0),
                    row.get::<_, Option<i64>>(1),
                    finished_after_commit,
                )
            })
        };
        // Give B every chance to be (wrongly) served in the middle of A's transaction.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..5 {
            let still: i64 = a.query_one("SELECT txid_current()", &[]).await.unwrap().get(0);
            assert_eq!(still, a_xid, "A's transaction must still be open");
        }
        assert!(!b_task.is_finished(), "B ran while A's transaction was open");
        committing.store(true, Ordering::SeqCst);
        a.batch_execute("COMMIT").await.unwrap();

        let (count, b_xid, after_commit) = tokio::time::timeout(Duration::from_secs(60), b_task)
            .await
            .expect("B is served once A commits")
            .unwrap();
        assert!(after_commit, "B was answered before A committed");
        assert_eq!(count, 1, "B sees A's committed row");
        assert_eq!(b_xid, None, "B is not inside A's transaction");
    });
}

#[test]
fn session_mode_returns_the_server_reset_when_the_client_leaves() {
    let cluster = PgCluster::start();
    let p = pgsilo(&cluster, "session", 1);
    runtime().block_on(async {
        let su = superuser(&cluster).await;
        let first = p.connect(USER, PASSWORD, "app_db").await.unwrap();
        first
            .batch_execute(
                "SET work_mem = '7MB'; CREATE TEMP TABLE scratch (x int); \
                 PREPARE p1 AS SELECT 1",
            )
            .await
            .unwrap();
        let pid: i32 = first.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);

        // While the first client stays (idle, no transaction), its server is its own.
        let second = p.connect(USER, PASSWORD, "app_db").await.unwrap();
        let leaving = Arc::new(AtomicBool::new(false));
        let second_task = {
            let leaving = leaving.clone();
            tokio::spawn(async move {
                let row = second
                    .query_one(
                        "SELECT pg_backend_pid(), current_setting('work_mem'), \
                         to_regclass('pg_temp.scratch')::text, \
                         (SELECT count(*) FROM pg_prepared_statements WHERE name = 'p1')",
                        &[],
                    )
                    .await
                    .unwrap();
                (
                    leaving.load(Ordering::SeqCst),
                    row.get::<_, i32>(0),
                    row.get::<_, String>(1),
                    row.get::<_, Option<String>>(2),
                    row.get::<_, i64>(3),
                    second,
                )
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        first.simple_query("SELECT 1").await.unwrap();
        assert!(!second_task.is_finished(), "session mode shared a server");
        assert_eq!(backends(&su, "").await, 1);

        leaving.store(true, Ordering::SeqCst);
        drop(first);
        let (after_leave, second_pid, work_mem, scratch, prepared, _second) =
            tokio::time::timeout(Duration::from_secs(60), second_task)
                .await
                .expect("the second client gets the server once the first leaves")
                .unwrap();
        assert!(after_leave);
        assert_eq!(second_pid, pid, "the same server, handed on");
        assert_eq!(work_mem, "4MB", "server_reset_query reset SET");
        assert_eq!(scratch, None, "server_reset_query dropped the temp table");
        assert_eq!(prepared, 0, "server_reset_query deallocated statements");
    });
}

/// The client's write was rolled back and no backend of USER is left in a transaction.
async fn nothing_left_open(su: &tokio_postgres::Client, marker: &str) {
    eventually("no backend idle in transaction", Duration::from_secs(20), || async {
        backends(su, "AND state LIKE 'idle in transaction%'").await == 0
    })
    .await;
    eventually(
        "no backend still running the client's query",
        Duration::from_secs(20),
        || async { backends(su, "AND state = 'active'").await == 0 },
    )
    .await;
    let rows: i64 = su
        .query_one("SELECT count(*) FROM t WHERE v = $1", &[&marker])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the departed client's write ({marker}) was rolled back");
}

#[test]
fn a_client_gone_mid_transaction_leaves_nothing_open() {
    let cluster = PgCluster::start();
    cluster.psql("app_db", "CREATE TABLE t (v text); GRANT ALL ON t TO PUBLIC;");
    for mode in ["transaction", "session"] {
        let p = pgsilo(&cluster, mode, 2);
        runtime().block_on(async {
            let su = superuser(&cluster).await;

            // tokio-postgres, its socket simply dropped (no Terminate).
            let (client, conn_task) = connect_cuttable(&p).await;
            client
                .batch_execute("BEGIN; INSERT INTO t VALUES ('dropped')")
                .await
                .unwrap();
            assert_eq!(backends(&su, "AND state LIKE 'idle in transaction%'").await, 1);
            conn_task.abort();
            let _ = conn_task.await;
            drop(client);
            nothing_left_open(&su, "dropped").await;

            // psql, killed.
            let mut psql = std::process::Command::new(support::pg_bindir().join("psql"))
                .args(["-X", "-q", "-h", "127.0.0.1", "-p", &p.port().to_string()])
                .args(["-U", USER, "-d", "app_db"])
                .env("PGPASSWORD", PASSWORD)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            {
                use std::io::Write;
                let stdin = psql.stdin.as_mut().unwrap();
                stdin.write_all(b"BEGIN;\nINSERT INTO t VALUES ('killed');\n").unwrap();
                stdin.flush().unwrap();
            }
            eventually("psql's transaction is open", Duration::from_secs(30), || async {
                backends(&su, "AND state LIKE 'idle in transaction%'").await == 1
            })
            .await;
            psql.kill().unwrap();
            psql.wait().unwrap();
            nothing_left_open(&su, "killed").await;

            // A client gone while its query runs: the query is cancelled, not left to
            // run on with no one to answer.
            let (client, conn_task) = connect_cuttable(&p).await;
            client
                .batch_execute("BEGIN; INSERT INTO t VALUES ('mid-query')")
                .await
                .unwrap();
            let sleeper = tokio::spawn(async move {
                let _ = client.simple_query("SELECT pg_sleep(60)").await;
            });
            eventually("pg_sleep is running", Duration::from_secs(30), || async {
                backends(&su, "AND query LIKE '%pg_sleep(60)%' AND state = 'active'").await == 1
            })
            .await;
            conn_task.abort();
            let _ = conn_task.await;
            let _ = sleeper.await;
            nothing_left_open(&su, "mid-query").await;

            // And the pool still serves.
            let c = p.connect(USER, PASSWORD, "app_db").await.unwrap();
            c.batch_execute("BEGIN; INSERT INTO t VALUES ('kept'); COMMIT")
                .await
                .unwrap();
        });
    }
    assert_eq!(cluster.psql("app_db", "SELECT count(*) FROM t WHERE v = 'kept'"), "2");
}

#[test]
fn cancel_request_stops_the_running_query() {
    let cluster = PgCluster::start();
    for mode in ["transaction", "session"] {
        let p = pgsilo(&cluster, mode, 2);
        runtime().block_on(async {
            let su = superuser(&cluster).await;
            // Several rounds, so cancel requests land on either worker.
            for round in 0..4 {
                let client = p.connect(USER, PASSWORD, "app_db").await.unwrap();
                let token = client.cancel_token();
                let started = Instant::now();
                let query = tokio::spawn(async move {
                    let r = client.simple_query("SELECT pg_sleep(30)").await;
                    (r, client)
                });
                let what = format!("{mode} round {round}: pg_sleep(30) is running");
                eventually(&what, Duration::from_secs(30), || async {
                    backends(&su, "AND query LIKE '%pg_sleep(30)%' AND state = 'active'").await == 1
                })
                .await;
                token
                    .cancel_query(NoTls)
                    .await
                    .unwrap_or_else(|e| panic!("{mode} round {round}: cancel: {e:?}"));
                let (result, client) = query.await.unwrap();
                let err = support::must_fail(result, "the query was cancelled");
                let (code, message) = support::db_error(&err);
                assert_eq!(code, "57014", "{mode} round {round}: {message}");
                let took = started.elapsed();
                assert!(
                    took < Duration::from_secs(20),
                    "{mode} round {round}: pg_sleep(30) ended after {took:?}: not cancelled"
                );
                // The client carries on.
                let m = client.simple_query("SELECT 5").await.unwrap();
                assert_eq!(first_value(&m).as_deref(), Some("5"));
            }
        });
    }
}

/// A cancel request that races the end of its query must not cancel the next client's
/// query on the same server: client A's queries are cancelled over and over while B
/// shares A's one server; B never sees a cancellation. (PostgreSQL signals a backend
/// more than once per cancel request, and a cancel looked up just before A's query ends
/// reaches the server after it: pgsilo keeps the server from B until the request is done.)
#[test]
fn a_cancel_racing_the_end_of_its_query_never_cancels_the_next_client() {
    let cluster = PgCluster::start();
    let p = pgsilo(&cluster, "transaction", 1);
    runtime().block_on(async {
        let a = Arc::new(p.connect(USER, PASSWORD, "app_db").await.unwrap());
        let b = p.connect(USER, PASSWORD, "app_db").await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let a_cancelled = Arc::new(AtomicUsize::new(0));
        let runner = {
            let (a, stop, a_cancelled) = (a.clone(), stop.clone(), a_cancelled.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = a.simple_query("SELECT pg_sleep(0.002)").await {
                        let (code, message) = support::db_error(&e);
                        assert_eq!(code, "57014", "client A: {message}");
                        a_cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let canceller = {
            let (token, stop) = (a.cancel_token(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    token.cancel_query(NoTls).await.unwrap();
                }
            })
        };
        let started = Instant::now();
        let mut b_queries = 0;
        while started.elapsed() < Duration::from_secs(3) || a_cancelled.load(Ordering::Relaxed) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no cancel of client A ever landed"
            );
            match b.simple_query("SELECT pg_sleep(0.002)").await {
                Ok(_) => b_queries += 1,
                Err(e) => {
                    let (code, message) = support::db_error(&e);
                    panic!(
                        "client B's query {} failed ({code}: {message}) after {} cancels of client A",
                        b_queries + 1,
                        a_cancelled.load(Ordering::Relaxed)
                    );
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        runner.await.unwrap();
        canceller.await.unwrap();
        eprintln!(
            "client B ran {b_queries} queries untouched while {} of client A's were cancelled",
            a_cancelled.load(Ordering::Relaxed)
        );
    });
}
