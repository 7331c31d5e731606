//! Session mode tells the truth about the backend: a client bound to a server at login
//! (one was free) is given that server's process id in BackendKeyData, so the key,
//! `pg_backend_pid()` and the pid of notifications agree, as on a direct connection.
//! Cancels still go through pgsilo. A client that finds no free server at login gets a
//! key of pgsilo's, and its cancels work as well.

mod support;

use std::time::{Duration, Instant};

use support::txpool::{fe, Pgsilo, Wire};
use support::PgCluster;

const USER: &str = "scram_user";
const DB: &str = "app_db";

/// Sends `pg_sleep(30)`, cancels it with the client's own key, and returns the SQLSTATE
/// the query ended with and how long it ran.
fn cancelled(w: &mut Wire, port: u16) -> (String, Duration) {
    let start = Instant::now();
    w.send(&fe::query("SELECT pg_sleep(30)"));
    // Let the query start on the server.
    std::thread::sleep(Duration::from_millis(300));
    w.cancel_via(port);
    let msgs = w.until_ready();
    let code = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .and_then(|m| m.field(b'C'))
        .unwrap_or_else(|| "none".into());
    (code, start.elapsed())
}

#[test]
fn session_mode_client_is_told_its_real_backend_pid() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("pool_mode", "\"session\""), ("default_pool_size", "1")]);

    let mut c = Wire::connect(silo.port(), USER, DB);
    let (pid, _) = c.key.expect("BackendKeyData");
    assert_eq!(
        c.value("SELECT pg_backend_pid()"),
        pid.to_string(),
        "BackendKeyData pid"
    );

    // A notification the client sends itself carries its own pid, as directly.
    c.send(&fe::query("LISTEN ch; NOTIFY ch, 'hello'"));
    let mut notified = None;
    loop {
        let m = c.recv();
        if m.tag == b'A' {
            notified = Some(u32::from_be_bytes(m.body[0..4].try_into().unwrap()));
        }
        if m.tag == b'Z' {
            break;
        }
    }
    assert_eq!(notified, Some(pid), "Notify pid");

    // A cancel with that key reaches the query, through pgsilo.
    let (code, took) = cancelled(&mut c, silo.port());
    assert_eq!(code, "57014", "query cancelled");
    assert!(took < Duration::from_secs(20), "cancel took {took:?}");
    assert_eq!(
        c.value("SELECT pg_backend_pid()"),
        pid.to_string(),
        "same server after the cancel"
    );

    // The pool's only server is bound: the next client still logs in at once, with a key
    // of pgsilo's, and gets the server when the first leaves.
    let start = Instant::now();
    let mut d = Wire::connect(silo.port(), USER, DB);
    assert!(start.elapsed() < Duration::from_secs(5), "login waited for a server");
    let (d_pid, _) = d.key.expect("BackendKeyData");
    assert_ne!(d_pid, pid);
    c.close();
    let d_backend = d.value("SELECT pg_backend_pid()");
    assert_eq!(d_backend, pid.to_string(), "d got the server c left");
    let (code, _) = cancelled(&mut d, silo.port());
    assert_eq!(code, "57014", "cancel with pgsilo's key");
    d.close();
}

#[test]
fn transaction_mode_keys_are_pgsilos_own() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(
        &cluster,
        &[("pool_mode", "\"transaction\""), ("default_pool_size", "1")],
    );
    let mut c = Wire::connect(silo.port(), USER, DB);
    let (pid, _) = c.key.expect("BackendKeyData");
    // Under transaction pooling a client has no one backend: the key is pgsilo's.
    assert_ne!(c.value("SELECT pg_backend_pid()"), pid.to_string());
    let (code, _) = cancelled(&mut c, silo.port());
    assert_eq!(code, "57014");
    c.close();
}

/// A session-mode client that leaves outside a transaction: pgsilo resets its server for
/// the next client without a ROLLBACK PostgreSQL would warn about ("there is no
/// transaction in progress", once per client in the server's log).
#[test]
fn leaving_outside_a_transaction_leaves_no_warning_in_the_server_log() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("pool_mode", "\"session\""), ("default_pool_size", "1")]);
    for _ in 0..5 {
        let mut c = Wire::connect(silo.port(), USER, DB);
        assert_eq!(c.value("SELECT 1"), "1");
        c.close();
    }
    // The last departure has been dealt with once the next client has the server.
    let mut c = Wire::connect(silo.port(), USER, DB);
    assert_eq!(c.value("SELECT 2"), "2");
    c.close();
    let log = cluster.log();
    assert!(
        !log.contains("there is no transaction in progress"),
        "PostgreSQL warned about pgsilo's clean-up:\n{log}"
    );
    assert_eq!(
        silo.log().matches("new connection to server").count(),
        1,
        "the server was reused"
    );
}
