//! TLS both ways, end to end: psql (libpq 15) and pgbench as clients, a real PostgreSQL
//! with and without `ssl = on`, certificates made by the tests (support::tls).
//!
//! Clients: client_tls_sslmode require / verify-ca, libpq's sslmode require / verify-ca /
//! verify-full with the right CA, another CA, a wrong host name and an expired
//! certificate; direct TLS (PostgreSQL 17's sslnegotiation=direct) spoken through
//! `openssl s_client -alpn postgresql`, since libpq 15 cannot; client certificates and
//! auth_type cert; SCRAM-SHA-256-PLUS with channel_binding=require; certificates re-read
//! on SIGHUP under load. Servers: server_tls_sslmode in each mode against PostgreSQL with
//! and without TLS.

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{fingerprint_file, psql_conninfo, served_cert_fingerprint, toml_str, Db, PgCluster, Pgsilo, TestCerts};

/// A pgsilo in front of `cluster` (database app_db as trust_user, pool logins as
/// trust_user), with client TLS on the test certificates.
fn tls_pgsilo(cluster: &PgCluster, certs: &TestCerts, sslmode: &str) -> support::PgsiloBuilder {
    Pgsilo::builder()
        .auth_type("trust")
        .user("trust_user", "")
        .user("scram_user", "scram_pass")
        .db(Db::on(cluster, "app_db").user("trust_user"))
        .set_str("client_tls_sslmode", sslmode)
        .set_str("client_tls_cert_file", certs.server_cert().to_str().unwrap())
        .set_str("client_tls_key_file", certs.server_key().to_str().unwrap())
}

fn conninfo(host: &str, port: u16, user: &str, extra: &str) -> String {
    format!("host={host} port={port} user={user} dbname=app_db connect_timeout=10 {extra}")
}

#[test]
fn client_tls_require_serves_tls_and_refuses_plaintext() {
    let cluster = PgCluster::start();
    let certs = TestCerts::temp();
    let silo = tls_pgsilo(&cluster, &certs, "require")
        .set("admin_users", "[\"trust_user\"]")
        .start();
    let port = silo.port();

    // Encrypted: the admin console shows the client's TLS version and cipher.
    let out = psql_conninfo(
        &conninfo("127.0.0.1", port, "trust_user", "sslmode=require"),
        "SELECT 42",
    )
    .unwrap();
    assert_eq!(out.trim(), "42");
    // Plaintext TCP is refused with PgBouncer's words.
    let err = psql_conninfo(
        &conninfo("127.0.0.1", port, "trust_user", "sslmode=disable"),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(err.contains("SSL required"), "{err}");
    // The certificate served is the one configured.
    assert_eq!(
        served_cert_fingerprint("localhost", port, true).as_deref(),
        Some(certs.server_fingerprint().as_str())
    );
    // SHOW CLIENTS names the protocol of a TLS client.
    let clients = psql_conninfo(
        &format!("host=127.0.0.1 port={port} user=trust_user dbname=pgbouncer sslmode=require"),
        "SHOW CLIENTS",
    )
    .unwrap();
    assert!(clients.contains("TLSv1.3/TLS13_"), "{clients}");
}

#[test]
fn libpq_verify_modes_check_ca_name_and_expiry() {
    let cluster = PgCluster::start();
    let certs = TestCerts::temp();
    let ca = certs.ca_cert();
    let ca = ca.to_str().unwrap();
    let silo = tls_pgsilo(&cluster, &certs, "require").start();
    let port = silo.port();
    let run = |host: &str, extra: &str| psql_conninfo(&conninfo(host, port, "trust_user", extra), "SELECT 'ok'");

    assert_eq!(
        run("localhost", &format!("sslmode=verify-full sslrootcert={ca}"))
            .unwrap()
            .trim(),
        "ok"
    );
    assert_eq!(
        run("127.0.0.1", &format!("sslmode=verify-ca sslrootcert={ca}"))
            .unwrap()
            .trim(),
        "ok"
    );
    let other = certs.other_ca_cert();
    let err = run(
        "localhost",
        &format!("sslmode=verify-full sslrootcert={}", other.display()),
    )
    .unwrap_err();
    assert!(err.contains("certificate verify failed"), "wrong CA: {err}");

    // A certificate for another name passes verify-ca and fails verify-full.
    let wrong = Pgsilo::builder()
        .auth_type("trust")
        .user("trust_user", "")
        .db(Db::on(&cluster, "app_db").user("trust_user"))
        .set_str("client_tls_sslmode", "require")
        .set_str("client_tls_cert_file", certs.wronghost_cert().to_str().unwrap())
        .set_str("client_tls_key_file", certs.wronghost_key().to_str().unwrap())
        .start();
    let run2 = |extra: &str| psql_conninfo(&conninfo("localhost", wrong.port(), "trust_user", extra), "SELECT 'ok'");
    assert_eq!(
        run2(&format!("sslmode=verify-ca sslrootcert={ca}")).unwrap().trim(),
        "ok"
    );
    let err = run2(&format!("sslmode=verify-full sslrootcert={ca}")).unwrap_err();
    assert!(err.contains("does not match host name"), "wrong host: {err}");

    // An expired certificate is refused by a verifying client.
    let expired = Pgsilo::builder()
        .auth_type("trust")
        .user("trust_user", "")
        .db(Db::on(&cluster, "app_db").user("trust_user"))
        .set_str("client_tls_sslmode", "require")
        .set_str("client_tls_cert_file", certs.expired_cert().to_str().unwrap())
        .set_str("client_tls_key_file", certs.expired_key().to_str().unwrap())
        .start();
    let err = psql_conninfo(
        &conninfo(
            "localhost",
            expired.port(),
            "trust_user",
            &format!("sslmode=verify-full sslrootcert={ca}"),
        ),
        "SELECT 'ok'",
    )
    .unwrap_err();
    assert!(
        err.contains("certificate has expired") || err.contains("certificate verify failed"),
        "expired: {err}"
    );
}

/// A startup packet for `user` on app_db, as libpq sends it.
fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608u32.to_be_bytes());
    for (k, v) in [("user", user), ("database", "app_db")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Speaks direct TLS (no SSLRequest) through `openssl s_client`, sends a startup packet
/// and a Terminate, and returns what came back in the clear.
fn direct_tls(port: u16, alpn: Option<&str>) -> Vec<u8> {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-quiet",
        "-no_ign_eof",
        "-connect",
        &format!("127.0.0.1:{port}"),
    ]);
    if let Some(a) = alpn {
        cmd.args(["-alpn", a]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&startup_packet("trust_user")).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = stdin.write_all(b"X\0\0\0\x04");
    drop(stdin);
    let mut out = Vec::new();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_to_end(&mut out);
        out
    });
    std::thread::sleep(Duration::from_millis(500));
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap()
}

#[test]
fn direct_tls_with_the_postgresql_alpn_logs_in_and_without_it_is_closed() {
    let cluster = PgCluster::start();
    let certs = TestCerts::temp();
    let silo = tls_pgsilo(&cluster, &certs, "require").start();
    let answer = direct_tls(silo.port(), Some("postgresql"));
    // AuthenticationOk ('R', length 8, code 0) then ReadyForQuery somewhere after.
    assert!(answer.starts_with(b"R\0\0\0\x08\0\0\0\0"), "{answer:?}");
    assert!(answer.windows(6).any(|w| w == b"Z\0\0\0\x05I"), "{answer:?}");
    let refused = direct_tls(silo.port(), Some("http/1.1"));
    assert!(
        !refused.starts_with(b"R"),
        "a client of another protocol must not be served: {refused:?}"
    );
    let no_alpn = direct_tls(silo.port(), None);
    assert!(!no_alpn.starts_with(b"R"), "direct TLS needs the ALPN: {no_alpn:?}");
}

#[test]
fn client_certificates_verify_ca_and_auth_type_cert() {
    let cluster = PgCluster::start();
    let certs = TestCerts::temp();
    let silo = tls_pgsilo(&cluster, &certs, "verify-ca")
        .auth_type("cert")
        .set_str("client_tls_ca_file", certs.ca_cert().to_str().unwrap())
        .start();
    let port = silo.port();
    let with_cert = |user: &str, (crt, key): (std::path::PathBuf, std::path::PathBuf)| {
        psql_conninfo(
            &conninfo(
                "localhost",
                port,
                user,
                &format!("sslmode=require sslcert={} sslkey={}", crt.display(), key.display()),
            ),
            "SELECT current_user",
        )
    };
    // The pool logs in as trust_user (forced), whoever the certificate names.
    assert_eq!(
        with_cert("trust_user", certs.client_cert("trust_user")).unwrap().trim(),
        "trust_user"
    );
    let err = with_cert("trust_user", certs.client_cert("someone_else")).unwrap_err();
    assert!(
        err.contains("certificate authentication failed for user \"trust_user\""),
        "{err}"
    );
    let err = with_cert("trust_user", certs.client_cert_other_ca("trust_user")).unwrap_err();
    assert!(!err.is_empty(), "a certificate of another CA must be refused");
    // No certificate at all: verify-ca refuses in the handshake.
    let err = psql_conninfo(
        &conninfo("localhost", port, "trust_user", "sslmode=require"),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(!err.is_empty());
}

#[test]
fn scram_plus_channel_binding_is_offered_on_tls() {
    let cluster = PgCluster::start();
    let certs = TestCerts::temp();
    let silo = tls_pgsilo(&cluster, &certs, "prefer")
        .auth_type("scram-sha-256")
        .start();
    let port = silo.port();
    let out = psql_conninfo(
        &conninfo(
            "localhost",
            port,
            "scram_user",
            "password=scram_pass sslmode=require channel_binding=require",
        ),
        "SELECT 'bound'",
    )
    .unwrap();
    assert_eq!(out.trim(), "bound");
    let err = psql_conninfo(
        &conninfo(
            "localhost",
            port,
            "scram_user",
            "password=wrong sslmode=require channel_binding=require",
        ),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
    // Without TLS there is nothing to bind to: libpq's channel_binding=require refuses.
    let err = psql_conninfo(
        &conninfo(
            "localhost",
            port,
            "scram_user",
            "password=scram_pass sslmode=disable channel_binding=require",
        ),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(err.contains("channel binding"), "{err}");
}

#[test]
fn certificates_are_reread_on_sighup_under_load_and_a_bad_file_keeps_the_old() {
    let cluster = PgCluster::start();
    let certs = TestCerts::temp();
    let silo = tls_pgsilo(&cluster, &certs, "require").pool_mode("transaction").start();
    let port = silo.port();
    let before = certs.server_fingerprint();
    assert_eq!(
        served_cert_fingerprint("localhost", port, true).as_deref(),
        Some(before.as_str())
    );

    // pgbench over TLS for the whole time: 8 clients that stay connected.
    let pgbench = support::pg_bindir().join("pgbench");
    let init = cluster.psql("app_db", "SELECT 1");
    assert_eq!(init.trim(), "1");
    let mut load = Command::new(&pgbench)
        .args(["-n", "-c", "8", "-j", "2", "-T", "6", "-f", "-"])
        .arg(conninfo("127.0.0.1", port, "trust_user", "sslmode=require"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench");
    load.stdin.take().unwrap().write_all(b"SELECT 1;\n").unwrap();
    std::thread::sleep(Duration::from_secs(1));

    let after = certs.renew_server();
    assert_ne!(before, after);
    silo.send_signal(libc::SIGHUP);
    silo.wait_for_log("reloaded configuration", Duration::from_secs(10));
    assert_eq!(
        served_cert_fingerprint("localhost", port, true).as_deref(),
        Some(after.as_str())
    );

    // A broken certificate file: the running certificate stays, and the log says why.
    std::fs::write(certs.server_cert(), "not a certificate\n").unwrap();
    silo.send_signal(libc::SIGHUP);
    silo.wait_for_log("keeping the running TLS certificates", Duration::from_secs(10));
    assert_eq!(
        served_cert_fingerprint("localhost", port, true).as_deref(),
        Some(after.as_str())
    );

    let out = load.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench: {stdout}\n{stderr}");
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}\n{stderr}"
    );
    assert!(!stderr.contains("error"), "no client may be dropped: {stderr}");
}

/// server_tls_sslmode against `cluster`; returns what `SELECT ssl FROM pg_stat_ssl` says
/// for the server connection, or the client's error.
fn through(cluster: &PgCluster, mode: &str, ca: Option<&std::path::Path>, host: &str) -> Result<String, String> {
    let mut b = Pgsilo::builder()
        .auth_type("trust")
        .user("trust_user", "")
        .db(Db::on(cluster, "app_db")
            .user("trust_user")
            .set("host", &toml_str(host)))
        .set_str("server_tls_sslmode", mode);
    if let Some(ca) = ca {
        b = b.set_str("server_tls_ca_file", ca.to_str().unwrap());
    }
    let silo = b.start();
    psql_conninfo(
        &conninfo("127.0.0.1", silo.port(), "trust_user", "sslmode=disable"),
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .map(|s| s.trim().to_string())
}

#[test]
fn server_tls_modes_against_postgresql_with_tls() {
    let certs = TestCerts::temp();
    let cluster = PgCluster::builder().ssl(&certs).start();
    let ca = certs.ca_cert();
    assert_eq!(through(&cluster, "disable", None, "127.0.0.1").unwrap(), "f");
    assert_eq!(through(&cluster, "prefer", None, "127.0.0.1").unwrap(), "t");
    assert_eq!(through(&cluster, "require", None, "127.0.0.1").unwrap(), "t");
    assert_eq!(through(&cluster, "verify-ca", Some(&ca), "127.0.0.1").unwrap(), "t");
    assert_eq!(through(&cluster, "verify-full", Some(&ca), "localhost").unwrap(), "t");
    let err = through(&cluster, "verify-full", Some(&certs.other_ca_cert()), "localhost").unwrap_err();
    assert!(err.contains("TLS") || err.contains("certificate"), "wrong CA: {err}");
}

#[test]
fn server_tls_verify_full_refuses_a_wrong_host_name_that_verify_ca_accepts() {
    let certs = TestCerts::temp();
    let cluster = PgCluster::builder()
        .ssl_files(&certs.wronghost_cert(), &certs.wronghost_key(), Some(&certs.ca_cert()))
        .start();
    let ca = certs.ca_cert();
    assert_eq!(through(&cluster, "verify-ca", Some(&ca), "localhost").unwrap(), "t");
    let err = through(&cluster, "verify-full", Some(&ca), "localhost").unwrap_err();
    assert!(err.contains("server TLS failed") || err.contains("TLS"), "{err}");
}

#[test]
fn server_tls_against_postgresql_without_tls() {
    let cluster = PgCluster::start();
    // prefer and allow fall back to plaintext; require is an error with SQLSTATE 08001,
    // never a silent plaintext connection.
    assert_eq!(through(&cluster, "prefer", None, "127.0.0.1").unwrap(), "f");
    let err = through(&cluster, "require", None, "127.0.0.1").unwrap_err();
    assert!(err.contains("server does not support TLS"), "{err}");
    let silo = Pgsilo::builder()
        .auth_type("trust")
        .user("trust_user", "")
        .db(Db::on(&cluster, "app_db").user("trust_user"))
        .set_str("server_tls_sslmode", "require")
        .start();
    let rt = support::runtime();
    rt.block_on(async {
        // The first login of a pool meets the server (for its settings): the refusal
        // reaches the client there, with its SQLSTATE.
        let e = silo
            .pg_config("trust_user", None, "app_db")
            .connect(tokio_postgres::NoTls)
            .await
            .map(|_| ())
            .expect_err("no server without TLS");
        assert_eq!(e.code().map(|c| c.code()), Some("08001"), "{e}");
    });
}

#[test]
fn pgbench_over_tls_both_ways_in_transaction_mode() {
    let certs = TestCerts::temp();
    let cluster = PgCluster::builder().ssl(&certs).start();
    let ca = certs.ca_cert();
    let silo = tls_pgsilo(&cluster, &certs, "require")
        .pool_mode("transaction")
        .pool_size(2)
        .set_str("server_tls_sslmode", "verify-full")
        .set_str("server_tls_ca_file", ca.to_str().unwrap())
        .db(Db::on(&cluster, "app_db")
            .user("trust_user")
            .set("host", &toml_str("localhost")))
        .start();
    let pgbench = support::pg_bindir().join("pgbench");
    for mode in ["simple", "extended", "prepared"] {
        let out = Command::new(&pgbench)
            .args(["-n", "-c", "6", "-j", "2", "-t", "200", "-M", mode, "-f", "-"])
            .arg(conninfo("127.0.0.1", silo.port(), "trust_user", "sslmode=require"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(
                    b"\\set a random(1, 1000)\nSELECT :a, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();\n",
                )?;
                c.wait_with_output()
            })
            .expect("pgbench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("number of failed transactions: 0"), "{mode}: {stdout}");
    }
    let ssl = psql_conninfo(
        &conninfo("127.0.0.1", silo.port(), "trust_user", "sslmode=require"),
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'trust_user' AND NOT s.ssl",
    )
    .unwrap();
    assert_eq!(ssl.trim(), "0", "every server connection is TLS");
    let _ = fingerprint_file(&certs.server_cert());
}

#[test]
fn a_certificate_that_does_not_load_fails_the_check_and_the_start() {
    let certs = TestCerts::temp();
    let bad = certs.dir().join("bad.crt");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    let builder = Pgsilo::builder()
        .auth_type("trust")
        .user("trust_user", "")
        .db(Db::at("127.0.0.1", 1, "app_db"))
        .set_str("client_tls_sslmode", "require")
        .set_str("client_tls_cert_file", bad.to_str().unwrap())
        .set_str("client_tls_key_file", certs.server_key().to_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = builder.write_files(dir.path(), support::free_port());
    let out = Command::new(support::pgsilo_bin())
        .arg("--check")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("client_tls_cert_file") && err.contains("bad.crt"), "{err}");
    let failed = builder.expect_failure();
    assert!(failed.stderr.contains("client_tls_cert_file"), "{}", failed.stderr);
}

#[test]
fn client_tls_protocols_and_ciphers_limit_what_is_negotiated() {
    let cluster = PgCluster::start();
    let certs = TestCerts::temp();
    let silo = tls_pgsilo(&cluster, &certs, "require")
        .set_str("client_tls_protocols", "tlsv1.3")
        .set_str("client_tls_ciphers", "TLS13_CHACHA20_POLY1305_SHA256")
        .set("admin_users", "[\"trust_user\"]")
        .start();
    let port = silo.port();
    // libpq capped at TLS 1.2 cannot agree with a TLS 1.3-only pgsilo.
    let err = psql_conninfo(
        &conninfo(
            "127.0.0.1",
            port,
            "trust_user",
            "sslmode=require ssl_max_protocol_version=TLSv1.2",
        ),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(err.to_lowercase().contains("ssl") || err.contains("protocol"), "{err}");
    // TLS 1.3 with the one suite allowed.
    let clients = psql_conninfo(
        &format!("host=127.0.0.1 port={port} user=trust_user dbname=pgbouncer sslmode=require"),
        "SHOW CLIENTS",
    )
    .unwrap();
    assert!(clients.contains("TLSv1.3/TLS13_CHACHA20_POLY1305_SHA256"), "{clients}");
}
