//! Errors a client or an operator sees: waiting too long for a server, a server that
//! cannot be reached, malformed bytes before and after login, and a port that is taken.
//! After every bad client, pgsilo keeps serving the others.

mod support;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use support::wire::{self, Raw};
use support::{db_error, free_port, must_fail, runtime, Db, PgCluster, Pgsilo, PgsiloBuilder};

/// md5 for clients; pgsilo logs in to PostgreSQL as trust_user (pg_hba trust).
fn builder(cluster: &PgCluster) -> PgsiloBuilder {
    Pgsilo::builder()
        .auth_type("md5")
        .user("trust_user", "tpass")
        .database("app_db", cluster)
}

/// A normal client still gets served.
async fn still_serves(p: &Pgsilo) {
    let c = p
        .connect("trust_user", "tpass", "app_db")
        .await
        .unwrap_or_else(|e| panic!("pgsilo stopped serving: {e:?}"));
    let row = c.query_one("SELECT 40 + 2", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
}

#[test]
fn query_wait_timeout_ends_the_waiting_client_with_08p01() {
    let cluster = PgCluster::start();
    let p = builder(&cluster).pool_size(1).set("query_wait_timeout", "1").start();
    runtime().block_on(async {
        let holder = p.connect("trust_user", "tpass", "app_db").await.unwrap();
        holder
            .batch_execute("BEGIN; SELECT 1")
            .await
            .expect("holder's transaction");
        let waiter = p.connect("trust_user", "tpass", "app_db").await.unwrap();
        let started = Instant::now();
        let err = waiter
            .simple_query("SELECT 1")
            .await
            .expect_err("the only server is held by a transaction");
        let waited = started.elapsed();
        assert_eq!(db_error(&err), ("08P01".into(), "query_wait_timeout".into()));
        assert!(
            waited >= Duration::from_millis(900),
            "gave up after {waited:?}, before query_wait_timeout = 1 s"
        );
        assert!(waited < Duration::from_secs(30), "waited {waited:?}");
        assert!(
            waiter.simple_query("SELECT 1").await.is_err(),
            "the waiting client is disconnected"
        );

        // The holder is unaffected; once it commits, others get the server.
        holder.batch_execute("COMMIT").await.unwrap();
        still_serves(&p).await;
    });
}

#[test]
fn unreachable_server_fails_with_08006() {
    // A port nothing listens on: bound and closed again.
    let closed = free_port();
    let p = Pgsilo::builder()
        .auth_type("md5")
        .user("trust_user", "tpass")
        .db(Db::at("127.0.0.1", closed, "app_db"))
        .set("server_connect_timeout", "5")
        .start();
    runtime().block_on(async {
        let err = must_fail(p.connect("trust_user", "tpass", "app_db").await, "no server to reach");
        let (code, message) = db_error(&err);
        assert_eq!(code, "08006", "{message}");
        assert!(message.starts_with("server connection failed: "), "{message}");
    });
}

/// Sends `bytes` as the opening of a connection and expects a 08P01 ErrorResponse,
/// then the connection closed.
fn expect_protocol_violation(port: u16, what: &str, bytes: &[u8]) -> String {
    let mut raw = Raw::connect(port);
    raw.send(bytes);
    let fields = raw.expect_error();
    assert_eq!(
        fields.get(&b'C').map(String::as_str),
        Some("08P01"),
        "{what}: {fields:?}"
    );
    assert_eq!(
        fields.get(&b'S').map(String::as_str),
        Some("FATAL"),
        "{what}: {fields:?}"
    );
    assert!(raw.is_closed(), "{what}: connection left open");
    fields.get(&b'M').cloned().unwrap_or_default()
}

#[test]
fn malformed_startup_packets_get_08p01_and_others_are_still_served() {
    let cluster = PgCluster::start();
    let p = builder(&cluster).start();
    let rt = runtime();
    rt.block_on(still_serves(&p));

    // A length that cannot even hold the protocol version.
    let m = expect_protocol_violation(p.port(), "length 3", &[0, 0, 0, 3]);
    assert!(m.contains("length"), "{m}");

    // A length beyond any real startup packet (PostgreSQL's limit is 10000).
    let mut big = 100_000u32.to_be_bytes().to_vec();
    big.extend_from_slice(&wire::PROTOCOL_3_0.to_be_bytes());
    big.extend_from_slice(b"user\0");
    let m = expect_protocol_violation(p.port(), "length 100000", &big);
    assert!(m.contains("length"), "{m}");

    // A protocol version that is neither 3.x nor a special request.
    let mut garbage = 0x1234_5678u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(b"user\0trust_user\0\0");
    let m = expect_protocol_violation(p.port(), "bad version", &wire::with_length(&garbage));
    assert!(m.contains("protocol"), "{m}");

    // Parameters without the final terminator.
    let mut unterminated = wire::PROTOCOL_3_0.to_be_bytes().to_vec();
    unterminated.extend_from_slice(b"user\0trust_user\0database\0app_db\0");
    expect_protocol_violation(p.port(), "no terminator", &wire::with_length(&unterminated));

    // A name without a value.
    let mut no_value = wire::PROTOCOL_3_0.to_be_bytes().to_vec();
    no_value.extend_from_slice(b"user");
    expect_protocol_violation(p.port(), "no value", &wire::with_length(&no_value));

    rt.block_on(still_serves(&p));
}

#[test]
fn ssl_request_is_declined_and_startup_continues_in_clear() {
    let cluster = PgCluster::start();
    let p = builder(&cluster).start();
    let mut raw = Raw::connect(p.port());
    let mut ssl = 8u32.to_be_bytes().to_vec();
    ssl.extend_from_slice(&wire::SSL_REQUEST.to_be_bytes());
    assert!(raw.send(&ssl));
    assert_eq!(raw.read_byte(), Some(b'N'), "SSLRequest must be answered 'N'");
    raw.login("trust_user", "tpass", "app_db");
    let reply = raw.simple_query("SELECT 'clear'");
    let row = reply.iter().find(|(tag, _)| *tag == b'D').expect("a DataRow");
    assert!(row.1.ends_with(b"clear"), "{:?}", row.1);

    // libpq's default sslmode=prefer falls back to clear text too.
    assert_eq!(
        p.psql("trust_user", "tpass", "app_db", "SELECT 7")
            .unwrap_or_else(|e| panic!("{e}")),
        "7"
    );
}

#[test]
fn garbage_after_login_gets_08p01_and_closes_only_that_client() {
    let cluster = PgCluster::start();
    let p = builder(&cluster).start();
    let rt = runtime();
    let bystander = rt.block_on(async {
        let c = p.connect("trust_user", "tpass", "app_db").await.unwrap();
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        c
    });

    let mut raw = Raw::connect(p.port());
    raw.login("trust_user", "tpass", "app_db");
    raw.simple_query("SELECT 1");
    // A message whose length (2) cannot even hold itself.
    raw.send(&[b'Q', 0, 0, 0, 2]);
    let fields = raw.expect_error();
    assert_eq!(fields.get(&b'C').map(String::as_str), Some("08P01"), "{fields:?}");
    assert!(raw.is_closed(), "connection left open after a protocol violation");

    // Also in the middle of a transaction on an attached server.
    let mut raw = Raw::connect(p.port());
    raw.login("trust_user", "tpass", "app_db");
    raw.simple_query("BEGIN");
    raw.send(&[b'Q', 0, 0, 0, 1]);
    let fields = raw.expect_error();
    assert_eq!(fields.get(&b'C').map(String::as_str), Some("08P01"), "{fields:?}");
    assert!(raw.is_closed());

    rt.block_on(async {
        // The client in its own transaction never noticed.
        bystander.batch_execute("SELECT 1; COMMIT").await.unwrap();
        still_serves(&p).await;
    });
}

#[test]
fn a_port_bound_by_another_process_makes_pgsilo_refuse_to_start() {
    // Bound without SO_REUSEPORT, listening.
    let (listener, port) = loop {
        let port = free_port();
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            break (l, port);
        }
    };
    let failed = Pgsilo::builder()
        .user("u", "p")
        .db(Db::at("127.0.0.1", 1, "db"))
        .port(port)
        .expect_failure();
    assert_eq!(failed.status.and_then(|s| s.code()), Some(1), "{}", failed.stderr);
    assert!(
        failed.stderr.contains(&port.to_string()),
        "the message must name port {port}:\n{}",
        failed.stderr
    );
    assert!(failed.stderr.contains("in use"), "{}", failed.stderr);
    // The other process still owns its port.
    assert_eq!(listener.local_addr().unwrap().port(), port);
}

#[test]
fn a_second_pgsilo_on_the_same_port_refuses_to_start() {
    let cluster = PgCluster::start();
    let first = builder(&cluster).start();
    let failed = builder(&cluster).port(first.port()).expect_failure();
    assert_eq!(failed.status.and_then(|s| s.code()), Some(1), "{}", failed.stderr);
    assert!(
        failed.stderr.contains(&first.port().to_string()) && failed.stderr.contains("in use"),
        "the message must name port {}:\n{}",
        first.port(),
        failed.stderr
    );
    // The first one keeps all of its clients.
    let rt = runtime();
    for _ in 0..8 {
        rt.block_on(still_serves(&first));
    }
}

/// A server's SQLSTATE reaches the client as it is, whatever it is: here PostgreSQL
/// refuses a new server connection with 42501 (CONNECT revoked) while the client's login
/// is already done. pgsilo used to turn codes it did not list into 08006.
#[test]
fn a_servers_refusal_reaches_the_client_with_its_own_sqlstate() {
    use support::txpool::{fe, Pgsilo as TxSilo, Wire};
    let cluster = PgCluster::start();
    let silo = TxSilo::start(
        &cluster,
        &[("pool_mode", "\"transaction\""), ("default_pool_size", "2")],
    );
    // The first client keeps the only server in a transaction, so the next needs a new one.
    let mut a = Wire::connect(silo.port(), "scram_user", "app_db");
    a.send(&fe::query("BEGIN; SELECT 1"));
    a.until_ready();
    let mut b = Wire::connect(silo.port(), "scram_user", "app_db");
    cluster.psql("postgres", "REVOKE CONNECT ON DATABASE app_db FROM PUBLIC");
    b.send(&fe::query("SELECT 1"));
    let err = loop {
        let m = b.recv();
        if m.tag == b'E' {
            break m;
        }
    };
    assert_eq!(err.field(b'C').as_deref(), Some("42501"), "{:?}", err.field(b'M'));
    assert!(
        err.field(b'M').unwrap_or_default().contains("permission denied"),
        "{:?}",
        err.field(b'M')
    );
    a.close();
}
