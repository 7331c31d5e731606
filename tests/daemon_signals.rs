//! The process as an operator drives it with signals: SIGHUP reloads the config and the
//! auth_file without dropping anyone; SIGINT stops accepting and lets running
//! transactions finish; SIGTERM closes clients as their transactions end (or at
//! shutdown_timeout); a second SIGINT/SIGTERM exits at once.

mod support;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::wire::Raw;
use support::{db_error, free_port, must_fail, runtime, simple_rows, PgCluster, Pgsilo, PgsiloBuilder};

const ADMIN: &str = "admin";
const ADMIN_PASS: &str = "admin_pass";
/// Long enough for anything on a busy two-core machine; no test asserts speed.
const LONG: Duration = Duration::from_secs(60);

fn base(cluster: &PgCluster) -> PgsiloBuilder {
    Pgsilo::builder()
        .pool_size(1)
        .user("user_a", "pass_a")
        .user("scram_user", "scram_pass")
        .user(ADMIN, ADMIN_PASS)
        .set("admin_users", "[\"admin\"]")
        .database("tenant_a_db", cluster)
        .database("tenant_b_db", cluster)
        .database("app_db", cluster)
}

/// Polls `f` until it returns true, panicking with `what` after `timeout`.
async fn eventually(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "{what} did not happen within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One row of an admin console SHOW whose `key` column is `value`.
async fn show_row(
    p: &Pgsilo,
    what: &str,
    key: &str,
    value: &str,
) -> Option<std::collections::BTreeMap<String, Option<String>>> {
    let admin = p.connect(ADMIN, ADMIN_PASS, "pgsilo").await.expect("admin login");
    let (_, rows) = simple_rows(&admin, &format!("SHOW {what}")).await.expect("SHOW");
    rows.into_iter()
        .find(|r| r.get(key).cloned().flatten().as_deref() == Some(value))
}

/// True when nothing accepts TCP connections on the port (connection refused).
fn refused(port: u16) -> bool {
    match TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)) {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

#[test]
fn sighup_reloads_users_and_pool_size_without_dropping_a_client() {
    let cluster = PgCluster::start();
    let builder = base(&cluster);
    let p = builder.clone().start();
    let rt = runtime();
    rt.block_on(async {
        let c1 = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        c1.batch_execute("CREATE TABLE reload_t (x int)").await.unwrap();
        // c1 holds the pool's only server in an open transaction across the reload.
        c1.batch_execute("BEGIN; INSERT INTO reload_t VALUES (1)")
            .await
            .unwrap();
        let before_pid: i32 = c1.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);

        // A second client of the same pool waits for the one server.
        let c2 = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        let waiting = tokio::spawn(async move {
            let r: i32 = c2.query_one("SELECT 42", &[]).await.unwrap().get(0);
            (c2, r)
        });
        eventually("a client waiting in SHOW POOLS", LONG, async || {
            show_row(&p, "POOLS", "database", "tenant_a_db")
                .await
                .and_then(|r| r["cl_waiting"].clone())
                .is_some_and(|w| w == "1")
        })
        .await;
        let db = show_row(&p, "DATABASES", "name", "tenant_a_db").await.unwrap();
        assert_eq!(db["pool_size"].as_deref(), Some("1"));

        // scram_user works before; user_b is unknown.
        let s = p.connect("scram_user", "scram_pass", "app_db").await.unwrap();
        s.simple_query("SELECT 1").await.unwrap();
        let e = must_fail(
            p.connect("user_b", "pass_b", "tenant_b_db").await,
            "user_b not yet in the auth_file",
        );
        assert_eq!(db_error(&e).0, "28P01", "{e}");

        // New auth_file: user_b added, scram_user removed; pool_size 1 -> 3.
        let changed = Pgsilo::builder()
            .pool_size(3)
            .user("user_a", "pass_a")
            .user("user_b", "pass_b")
            .user(ADMIN, ADMIN_PASS)
            .set("admin_users", "[\"admin\"]")
            .database("tenant_a_db", &cluster)
            .database("tenant_b_db", &cluster)
            .database("app_db", &cluster);
        p.rewrite(&changed);
        p.send_signal(libc::SIGHUP);
        p.wait_for_log("reloaded configuration and auth_file (3 users)", LONG);

        // The waiting client gets one of the new servers while c1's transaction is
        // still open.
        let (c2, r) = tokio::time::timeout(LONG, waiting)
            .await
            .expect("the waiting client was served after pool_size grew")
            .unwrap();
        assert_eq!(r, 42);
        let db = show_row(&p, "DATABASES", "name", "tenant_a_db").await.unwrap();
        assert_eq!(db["pool_size"].as_deref(), Some("3"));

        // c1 is still in its transaction, on the same server, and commits.
        let pid: i32 = c1.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        assert_eq!(
            pid, before_pid,
            "the transaction stayed on its server across the reload"
        );
        c1.batch_execute("INSERT INTO reload_t VALUES (2); COMMIT")
            .await
            .unwrap();
        let n: i64 = c1.query_one("SELECT count(*) FROM reload_t", &[]).await.unwrap().get(0);
        assert_eq!(n, 2);
        c2.simple_query("SELECT 1").await.unwrap();

        // The new user logs in; the removed one is refused.
        let b = p
            .connect("user_b", "pass_b", "tenant_b_db")
            .await
            .expect("user_b after reload");
        b.simple_query("SELECT 1").await.unwrap();
        let e = must_fail(
            p.connect("scram_user", "scram_pass", "app_db").await,
            "scram_user removed",
        );
        assert_eq!(db_error(&e).0, "28P01", "{e}");
        // A client already logged in as the removed user is not dropped by the reload.
        s.simple_query("SELECT 1").await.expect("existing scram_user session");
    });
}

#[test]
fn sighup_with_a_new_listen_port_keeps_the_old_one() {
    let cluster = PgCluster::start();
    let builder = base(&cluster);
    let p = builder.clone().start();
    let rt = runtime();
    rt.block_on(async {
        let c = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        let other = free_port();
        std::fs::write(
            p.config_path(),
            p.config_text().replace(
                &format!("listen_port = {}", p.port()),
                &format!("listen_port = {other}"),
            ),
        )
        .unwrap();
        p.send_signal(libc::SIGHUP);
        let log = p.wait_for_log("reloaded configuration", LONG);
        assert!(log.contains("take effect only at restart"), "{log}");
        c.simple_query("SELECT 1").await.expect("client kept across the reload");
        let fresh = p
            .connect("user_a", "pass_a", "tenant_a_db")
            .await
            .expect("the old port still serves");
        fresh.simple_query("SELECT 1").await.unwrap();
        assert!(refused(other), "nothing listens on the new port until a restart");
        // The console reports what runs, not what the file says.
        let cfg = show_row(&p, "CONFIG", "key", "listen_port").await.unwrap();
        assert_eq!(cfg["value"].as_deref(), Some(p.port().to_string().as_str()));
    });
}

#[test]
fn a_broken_config_on_sighup_is_logged_and_the_old_one_keeps_serving() {
    let cluster = PgCluster::start();
    let p = base(&cluster).start();
    let good = p.config_text();
    let rt = runtime();
    rt.block_on(async {
        let c = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        // A TOML syntax error, then an unknown key, then a missing auth_file.
        let broken = [
            format!("{good}\nthis is not toml\n"),
            good.replacen("[pgsilo]\n", "[pgsilo]\nno_such_key = 1\n", 1),
            good.replace("auth_file = \"userlist.txt\"", "auth_file = \"missing.txt\""),
        ];
        for (i, text) in broken.iter().enumerate() {
            p.write_config(text);
            p.send_signal(libc::SIGHUP);
            eventually("the reload failure in the log", LONG, async || {
                p.log()
                    .matches("reload failed, keeping the running configuration")
                    .count()
                    > i
            })
            .await;
            c.simple_query("SELECT 1")
                .await
                .expect("existing client after a failed reload");
            let fresh = p
                .connect("user_a", "pass_a", "tenant_a_db")
                .await
                .expect("new client after a failed reload");
            fresh.simple_query("SELECT 1").await.unwrap();
        }
        let log = p.log();
        assert!(log.contains("no_such_key"), "the log names the unknown key:\n{log}");
        assert!(
            log.contains("missing.txt"),
            "the log names the missing auth_file:\n{log}"
        );
        assert!(!log.contains("reloaded configuration"), "{log}");
        // Fixed again, a reload works.
        p.write_config(&good);
        p.send_signal(libc::SIGHUP);
        p.wait_for_log("reloaded configuration", LONG);
    });
}

/// SIGINT: new connections are refused at once, a transaction in flight finishes and
/// commits, then the process exits 0. Also with the takeover socket disabled (the
/// listening sockets must not be kept open by anything else).
#[test]
fn sigint_refuses_new_clients_lets_the_running_transaction_commit_then_exits() {
    let cluster = PgCluster::start();
    for takeover_socket in [true, false] {
        let mut b = base(&cluster);
        if !takeover_socket {
            b = b.set_str("takeover_socket", "");
        }
        let mut p = b.start();
        let rt = runtime();
        rt.block_on(async {
            let c = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
            c.batch_execute("DROP TABLE IF EXISTS sigint_t; CREATE TABLE sigint_t (x int)")
                .await
                .unwrap();
            c.batch_execute("BEGIN; INSERT INTO sigint_t VALUES (1)").await.unwrap();
            let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(2)").await.map(|_| c) });
            tokio::time::sleep(Duration::from_millis(300)).await;
            p.send_signal(libc::SIGINT);
            p.wait_for_log("got SIGINT", LONG);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !refused(p.port()) {
                assert!(
                    Instant::now() < deadline,
                    "new connections still accepted after SIGINT (takeover_socket: {takeover_socket})"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let c = sleeper.await.unwrap().expect("the query in flight completes");
            c.batch_execute("INSERT INTO sigint_t VALUES (2); COMMIT")
                .await
                .expect("the transaction commits");
        });
        let status = p.wait_exit(LONG).expect("pgsilo exits after the transaction");
        assert!(status.success(), "{status}\n{}", p.log());
        let n = cluster.psql("tenant_a_db", "SELECT count(*) FROM sigint_t");
        assert_eq!(n.trim(), "2");
    }
}

#[test]
fn sigterm_closes_idle_clients_lets_transactions_finish_then_exits() {
    let cluster = PgCluster::start();
    let mut p = base(&cluster)
        .auth_type("md5")
        .user("md5_user", "md5_pass")
        .pool_size(2)
        .start();
    let rt = runtime();
    rt.block_on(async {
        // An idle client, on the raw protocol to see what it is told.
        let mut idle = Raw::connect(p.port());
        idle.login("md5_user", "md5_pass", "app_db");
        idle.simple_query("SELECT 1");

        let tx = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        tx.batch_execute("DROP TABLE IF EXISTS sigterm_t; CREATE TABLE sigterm_t (x int)")
            .await
            .unwrap();
        tx.batch_execute("BEGIN; INSERT INTO sigterm_t VALUES (1)")
            .await
            .unwrap();

        p.send_signal(libc::SIGTERM);
        p.wait_for_log("got SIGTERM", LONG);

        let fields = idle.expect_error();
        assert_eq!(fields.get(&b'C').map(String::as_str), Some("57P01"), "{fields:?}");
        assert_eq!(fields.get(&b'S').map(String::as_str), Some("FATAL"), "{fields:?}");
        assert!(idle.is_closed(), "the idle client's connection is closed");

        // The transaction goes on and commits; then its client is closed.
        tx.batch_execute("INSERT INTO sigterm_t VALUES (2)").await.unwrap();
        tx.batch_execute("COMMIT")
            .await
            .expect("COMMIT during SIGTERM shutdown");
        eventually("the client closed after its transaction", LONG, async || tx.is_closed()).await;
        assert!(tx.simple_query("SELECT 1").await.is_err());
    });
    let status = p.wait_exit(LONG).expect("pgsilo exits once every client is gone");
    assert!(status.success(), "{status}\n{}", p.log());
    assert_eq!(
        cluster.psql("tenant_a_db", "SELECT count(*) FROM sigterm_t").trim(),
        "2"
    );
    let log = p.log();
    assert!(!log.contains("shutdown_timeout reached"), "{log}");
}

#[test]
fn sigterm_gives_up_on_an_open_transaction_at_shutdown_timeout() {
    let cluster = PgCluster::start();
    let mut p = base(&cluster).set("shutdown_timeout", "2").start();
    let rt = runtime();
    rt.block_on(async {
        let c = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let signalled = Instant::now();
        p.send_signal(libc::SIGTERM);
        let status = p.wait_exit(LONG).expect("pgsilo exits at shutdown_timeout");
        let took = signalled.elapsed();
        assert!(status.success(), "{status}\n{}", p.log());
        assert!(
            took >= Duration::from_millis(1500),
            "exited after {took:?}, before shutdown_timeout"
        );
        assert!(took < Duration::from_secs(10), "exited only after {took:?}");
        p.wait_for_log("shutdown_timeout reached with 1 client(s) left", LONG);
        assert!(c.simple_query("SELECT 1").await.is_err(), "the client is disconnected");
    });
}

#[test]
fn a_second_signal_exits_at_once() {
    let cluster = PgCluster::start();
    for (first, second) in [
        (libc::SIGINT, libc::SIGINT),
        (libc::SIGTERM, libc::SIGTERM),
        (libc::SIGTERM, libc::SIGINT),
    ] {
        let mut p = base(&cluster).start();
        let rt = runtime();
        rt.block_on(async {
            // A transaction that stays open would hold either shutdown for 30 s.
            let c = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
            c.batch_execute("BEGIN; SELECT 1").await.unwrap();
            p.send_signal(first);
            p.wait_for_log("got SIG", LONG);
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(p.is_running(), "still waiting for the open transaction\n{}", p.log());
            let at = Instant::now();
            p.send_signal(second);
            let status = p.wait_exit(LONG).expect("exits after the second signal");
            assert!(status.success(), "{status}\n{}", p.log());
            assert!(
                at.elapsed() < Duration::from_secs(10),
                "took {:?} after the second signal",
                at.elapsed()
            );
            p.wait_for_log("second shutdown signal: exiting now", LONG);
            assert!(c.simple_query("SELECT 1").await.is_err());
        });
    }
}

/// Reads until an ErrorResponse or the end of the connection, answering an md5
/// password request; the SQLSTATE of the error, if one came.
fn login_until_error(raw: &mut Raw, user: &str, password: &str) -> Option<String> {
    loop {
        let (tag, body) = raw.read_message()?;
        match tag {
            b'R' if body[..4] == 5u32.to_be_bytes() => {
                let salt: [u8; 4] = body[4..8].try_into().unwrap();
                let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
                let mut p = hash.into_bytes();
                p.push(0);
                raw.send(&support::wire::message(b'p', &p));
            }
            b'E' => return support::wire::error_fields(&body).get(&b'C').cloned(),
            _ => {}
        }
    }
}

/// A client accepted before SIGTERM that finishes logging in after it is closed as
/// well (it is between transactions), instead of holding the shutdown for
/// shutdown_timeout; so is a connected admin console.
#[test]
fn sigterm_also_closes_clients_that_log_in_late_and_console_sessions() {
    let cluster = PgCluster::start();
    let mut p = base(&cluster).auth_type("md5").user("md5_user", "md5_pass").start();
    let rt = runtime();
    rt.block_on(async {
        let console = p.connect(ADMIN, ADMIN_PASS, "pgsilo").await.unwrap();
        let mut late = Raw::connect(p.port());
        // Accepted, but not logged in yet.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let at = Instant::now();
        p.send_signal(libc::SIGTERM);
        p.wait_for_log("got SIGTERM", LONG);
        assert!(late.send(&support::wire::startup_message(&[
            ("user", "md5_user"),
            ("database", "app_db")
        ])));
        let code = login_until_error(&mut late, "md5_user", "md5_pass");
        assert_eq!(code.as_deref(), Some("57P01"), "{}", p.log());
        let status = p.wait_exit(LONG).expect("exits");
        assert!(status.success(), "{status}\n{}", p.log());
        assert!(
            at.elapsed() < Duration::from_secs(15),
            "took {:?}: a late client or the console held the shutdown (shutdown_timeout 30 s)\n{}",
            at.elapsed(),
            p.log()
        );
        assert!(console.simple_query("SHOW VERSION").await.is_err());
    });
    assert!(!p.log().contains("shutdown_timeout reached"), "{}", p.log());
}
