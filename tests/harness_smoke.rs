//! Smoke test of the integration-test harness (`tests/support`): real clusters, roles,
//! authentication methods, restart and cleanup; TLS certificates and PostgreSQL with TLS.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{fingerprint, fingerprint_file, free_port, pg_bindir, wait_for_port, PgCluster, TestCerts};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// The first authentication request the server sends for a startup message, read straight
/// off the wire: proves which pg_hba method applies (tokio-postgres doesn't tell).
#[derive(Debug, PartialEq)]
enum AuthRequest {
    Ok,
    Cleartext,
    Md5,
    Sasl(String),
}

fn first_auth_request(port: u16, user: &str, db: &str) -> AuthRequest {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut body = Vec::new();
    body.extend_from_slice(&196_608i32.to_be_bytes()); // protocol 3.0
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    stream.write_all(&msg).unwrap();

    let mut header = [0u8; 5];
    stream.read_exact(&mut header).unwrap();
    let len = i32::from_be_bytes(header[1..5].try_into().unwrap()) as usize - 4;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    assert_eq!(
        header[0],
        b'R',
        "expected an authentication request for {user}, got {:?}: {}",
        header[0] as char,
        String::from_utf8_lossy(&payload)
    );
    match i32::from_be_bytes(payload[0..4].try_into().unwrap()) {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => AuthRequest::Md5,
        10 => AuthRequest::Sasl(String::from_utf8_lossy(&payload[4..]).trim_end_matches('\0').to_owned()),
        other => panic!("unexpected authentication request {other}"),
    }
}

async fn connect(
    cluster: &PgCluster,
    user: &str,
    password: Option<&str>,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(cluster.host())
        .port(cluster.port())
        .user(user)
        .dbname(db)
        .connect_timeout(Duration::from_secs(30));
    if let Some(password) = password {
        config.password(password);
    }
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn check_cluster(cluster: &PgCluster) {
    // Each role logs in to its database with its password, by the expected method.
    let cases: &[(&str, Option<&str>, &str, AuthRequest)] = &[
        ("postgres", None, "postgres", AuthRequest::Ok),
        (
            "scram_user",
            Some("scram_pass"),
            "app_db",
            AuthRequest::Sasl("SCRAM-SHA-256".into()),
        ),
        ("md5_user", Some("md5_pass"), "app_db", AuthRequest::Md5),
        ("trust_user", None, "app_db", AuthRequest::Ok),
        (
            "user_a",
            Some("pass_a"),
            "tenant_a_db",
            AuthRequest::Sasl("SCRAM-SHA-256".into()),
        ),
        (
            "user_b",
            Some("pass_b"),
            "tenant_b_db",
            AuthRequest::Sasl("SCRAM-SHA-256".into()),
        ),
        ("pwd_user", Some("pwd_pass"), "app_db", AuthRequest::Cleartext),
    ];
    for (user, password, db, method) in cases {
        assert_eq!(
            first_auth_request(cluster.port(), user, db),
            *method,
            "auth method for {user}"
        );
        let client = connect(cluster, user, *password, db)
            .await
            .unwrap_or_else(|e| panic!("{user} -> {db}: {e:?}"));
        let row = client
            .query_one("SELECT current_user::text, current_database()::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), *user);
        assert_eq!(row.get::<_, String>(1), *db);
        if *db == "app_db" {
            // Everyone may create in app_db's public schema.
            let table = format!("t_{user}");
            client
                .batch_execute(&format!("CREATE TABLE {table} (x int); DROP TABLE {table}"))
                .await
                .unwrap_or_else(|e| panic!("{user} CREATE TABLE in app_db: {e:?}"));
        }

        if let Some(password) = password {
            let wrong = format!("{password}-wrong");
            let err = connect(cluster, user, Some(&wrong), db)
                .await
                .err()
                .unwrap_or_else(|| panic!("{user} logged in with a wrong password"));
            assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{user}: {err:?}");
        }
    }

    // Tenants can't reach each other's database.
    let err = connect(cluster, "user_b", Some("pass_b"), "tenant_a_db")
        .await
        .err()
        .unwrap_or_else(|| panic!("user_b must not connect to tenant_a_db"));
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    // Unknown users go through SCRAM and fail as a wrong password would.
    let err = connect(cluster, "nobody_here", Some("x"), "app_db")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));

    let su = connect(cluster, "postgres", None, "postgres").await.unwrap();
    for (setting, expected) in [
        ("password_encryption", "scram-sha-256"),
        ("max_connections", "200"),
        ("fsync", "off"),
        ("listen_addresses", "127.0.0.1"),
    ] {
        let row = su.query_one(&format!("SHOW {setting}"), &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), expected, "SHOW {setting}");
    }
    // Passwords are stored as requested.
    let rows = su
        .query(
            "SELECT rolname::text, CASE \
               WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram' \
               WHEN rolpassword ~ '^md5[0-9a-f]{32}$' THEN 'md5' \
               ELSE rolpassword END \
             FROM pg_authid WHERE rolpassword IS NOT NULL ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let stored: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let expected: Vec<(String, String)> = [
        ("md5_user", "md5"),
        ("pwd_user", "scram"),
        ("scram_user", "scram"),
        ("user_a", "scram"),
        ("user_b", "scram"),
    ]
    .iter()
    .map(|(u, k)| (u.to_string(), k.to_string()))
    .collect();
    assert_eq!(stored, expected);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn two_clusters_in_parallel_with_all_roles() {
    let started = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(|| {
                let t = Instant::now();
                let cluster = PgCluster::start();
                (cluster, t.elapsed())
            })
        })
        .collect();
    let clusters: Vec<(PgCluster, Duration)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!(
        "two clusters up in {:.2?} (each: {:.2?}, {:.2?})",
        started.elapsed(),
        clusters[0].1,
        clusters[1].1
    );
    assert_ne!(clusters[0].0.port(), clusters[1].0.port());
    assert_ne!(clusters[0].0.socket_dir(), clusters[1].0.socket_dir());

    let rt = runtime();
    for (cluster, _) in &clusters {
        rt.block_on(check_cluster(cluster));
        assert!(cluster
            .socket_dir()
            .join(format!(".s.PGSQL.{}", cluster.port()))
            .exists());
    }

    let dirs: Vec<_> = clusters.iter().map(|(c, _)| c.socket_dir().to_path_buf()).collect();
    drop(clusters);
    for dir in dirs {
        assert!(!dir.exists(), "{} still exists after drop", dir.display());
    }
}

#[test]
fn restart_keeps_port_and_drop_cleans_up() {
    let t = Instant::now();
    let mut cluster = PgCluster::builder()
        .max_connections(37)
        .setting("work_mem", "7MB")
        .start();
    eprintln!("builder cluster up in {:.2?}", t.elapsed());
    let port = cluster.port();
    assert_eq!(cluster.psql("postgres", "SHOW max_connections"), "37");
    assert_eq!(cluster.psql("postgres", "SHOW work_mem"), "7MB");
    cluster.psql("app_db", "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42);");

    let rt = runtime();
    let clients = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(
                connect(&cluster, "scram_user", Some("scram_pass"), "app_db")
                    .await
                    .unwrap(),
            );
        }
        clients
    });
    assert_eq!(cluster.kill_backends("scram_user"), 3);
    assert_eq!(cluster.kill_backends("scram_user"), 0);
    rt.block_on(async {
        for client in &clients {
            assert!(client.simple_query("SELECT 1").await.is_err());
        }
    });

    let t = Instant::now();
    cluster.restart();
    eprintln!("restart in {:.2?}", t.elapsed());
    assert_eq!(cluster.port(), port);
    wait_for_port(port, Duration::from_secs(5));
    assert_eq!(cluster.psql("app_db", "SELECT x FROM kept"), "42");

    cluster.stop();
    cluster.stop(); // idempotent
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    cluster.restart();
    assert_eq!(cluster.port(), port);
    assert_eq!(cluster.psql("app_db", "SELECT count(*) FROM kept"), "1");

    let dir = cluster.socket_dir().to_path_buf();
    assert!(dir.join("data").join("PG_VERSION").exists());
    drop(cluster);
    assert!(!dir.exists());
}

#[test]
fn tools_and_helpers() {
    let cluster = PgCluster::start();
    assert_eq!(cluster.bindir(), pg_bindir());
    assert_eq!(cluster.host(), "127.0.0.1");
    assert!(cluster.bin("pgbench").exists());
    assert!(cluster.bin("psql").exists());
    assert_eq!(cluster.psql("postgres", "SELECT 1 + 1"), "2");
    assert_eq!(
        cluster.psql(
            "postgres",
            "CREATE DATABASE scratch_db; SELECT datname FROM pg_database WHERE datname = 'scratch_db';"
        ),
        "scratch_db"
    );
    let conn = cluster.superuser_conn_string("app_db");
    runtime().block_on(async {
        let (client, connection) = tokio_postgres::connect(&conn, NoTls).await.unwrap();
        tokio::spawn(connection);
        let row = client.query_one("SELECT current_database()::text", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "app_db");
    });

    // psql failures carry the server's message.
    let err = cluster
        .try_psql("postgres", "SELECT 1; SELECT * FROM no_such_table; SELECT 2")
        .unwrap_err();
    assert!(err.contains("no_such_table"), "{err}");

    // pgbench from the same install runs against it.
    let out = std::process::Command::new(cluster.bin("pgbench"))
        .args(["-i", "-q", "-s", "1", "-h", cluster.host()])
        .args(["-p", &cluster.port().to_string(), "-U", "postgres", "app_db"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let port = free_port();
    assert_ne!(port, cluster.port());
    assert_ne!(port, free_port());
}

/// `psql` over TCP to the cluster as `postgres`, with the server name `localhost` (for
/// verify-full) at 127.0.0.1, and TLS options.
fn psql_tls(cluster: &PgCluster, sslmode: &str, root: &std::path::Path, sql: &str) -> Result<String, String> {
    support::tls::psql_conninfo(
        &format!(
            "host=localhost hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode={sslmode} \
             sslrootcert='{}' sslcert=/nonexistent sslkey=/nonexistent connect_timeout=30",
            cluster.port(),
            root.display()
        ),
        sql,
    )
}

const SSL_CHECK: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

#[test]
fn tls_certificates_and_postgres_with_ssl() {
    use std::os::unix::fs::PermissionsExt;
    use support::tls;

    let certs = TestCerts::temp();
    // The files, their modes, and what openssl makes of them.
    for (path, mode) in [
        (certs.ca_cert(), 0o644),
        (certs.ca_key(), 0o600),
        (certs.other_ca_cert(), 0o644),
        (certs.server_cert(), 0o644),
        (certs.server_key(), 0o600),
        (certs.expired_cert(), 0o644),
        (certs.expired_key(), 0o600),
        (certs.wronghost_cert(), 0o644),
        (certs.wronghost_key(), 0o600),
    ] {
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "mode of {}", path.display());
    }
    let verify = |ca: &std::path::Path, cert: &std::path::Path, extra: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(ca)
            .args(extra)
            .arg(cert)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = verify(
        &certs.ca_cert(),
        &certs.server_cert(),
        &["-purpose", "sslserver", "-verify_hostname", "localhost"],
    );
    assert!(ok, "{out}");
    let (ok, out) = verify(&certs.ca_cert(), &certs.server_cert(), &["-verify_ip", "127.0.0.1"]);
    assert!(ok, "{out}");
    let (ok, out) = verify(&certs.other_ca_cert(), &certs.server_cert(), &[]);
    assert!(!ok, "server.crt verified with the other CA: {out}");
    let (ok, out) = verify(&certs.ca_cert(), &certs.expired_cert(), &[]);
    assert!(!ok && out.contains("expired"), "{out}");
    let (ok, out) = verify(
        &certs.ca_cert(),
        &certs.wronghost_cert(),
        &["-verify_hostname", "localhost"],
    );
    assert!(!ok, "wronghost.crt verified for localhost: {out}");
    let (ok, out) = verify(
        &certs.ca_cert(),
        &certs.wronghost_cert(),
        &["-verify_hostname", "example.invalid"],
    );
    assert!(ok, "{out}");
    let (client_crt, client_key) = certs.client_cert("cert_user");
    assert_eq!(
        std::fs::metadata(&client_key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (ok, out) = verify(&certs.ca_cert(), &client_crt, &["-purpose", "sslclient"]);
    assert!(ok, "{out}");
    let subject = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-nameopt", "sep_multiline", "-in"])
        .arg(&client_crt)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&subject.stdout).contains("CN=cert_user"));
    let (other_crt, _) = certs.client_cert_other_ca("cert_user");
    let (ok, _) = verify(&certs.ca_cert(), &other_crt, &[]);
    assert!(!ok, "client cert of the other CA verified with ca.crt");

    // Our fingerprint is openssl's.
    let original = certs.server_fingerprint();
    assert_eq!(original.len(), 64);
    assert_eq!(original, tls::openssl_fingerprint(&certs.server_cert()));
    assert_eq!(
        fingerprint(&std::fs::read(certs.ca_cert()).unwrap()),
        tls::openssl_fingerprint(&certs.ca_cert())
    );

    // PostgreSQL with TLS; a hostssl-only role (by client certificate).
    let cluster = PgCluster::builder()
        .ssl(&certs)
        .hba_prepend("hostssl all cert_user 127.0.0.1/32 cert")
        .hba_prepend("hostnossl all cert_user 127.0.0.1/32 reject")
        .start();
    assert!(cluster.ssl_enabled());
    cluster.psql("postgres", "CREATE ROLE cert_user LOGIN");
    assert_eq!(cluster.psql("postgres", "SHOW ssl"), "on");
    let key_meta = std::fs::metadata(cluster.data_dir().join("pgsilo_server.key")).unwrap();
    assert_eq!(key_meta.permissions().mode() & 0o777, 0o600);

    assert_eq!(
        psql_tls(&cluster, "verify-full", &certs.ca_cert(), SSL_CHECK).unwrap(),
        "t"
    );
    // Plain connections still work (host lines match both).
    assert_eq!(psql_tls(&cluster, "disable", &certs.ca_cert(), SSL_CHECK).unwrap(), "f");
    let err = psql_tls(&cluster, "verify-full", &certs.other_ca_cert(), SSL_CHECK).unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");
    // verify-ca doesn't check the name, but still the CA.
    assert_eq!(
        psql_tls(&cluster, "verify-ca", &certs.ca_cert(), SSL_CHECK).unwrap(),
        "t"
    );

    // Which certificate the server presents.
    assert_eq!(
        support::served_cert_fingerprint("127.0.0.1", cluster.port(), true).as_deref(),
        Some(original.as_str())
    );
    assert_eq!(
        support::served_cert_fingerprint("localhost", cluster.port(), true).as_deref(),
        Some(original.as_str())
    );
    // No direct TLS on PostgreSQL 15's port.
    assert_eq!(
        support::served_cert_fingerprint("127.0.0.1", cluster.port(), false),
        None
    );

    // Client certificates: cert_user only over TLS, with a certificate from our CA.
    let cert_login = |crt: &std::path::Path, key: &std::path::Path, sslmode: &str| {
        support::tls::psql_conninfo(
            &format!(
                "host=localhost hostaddr=127.0.0.1 port={} user=cert_user dbname=app_db sslmode={sslmode} \
                 sslrootcert='{}' sslcert='{}' sslkey='{}' connect_timeout=30",
                cluster.port(),
                certs.ca_cert().display(),
                crt.display(),
                key.display()
            ),
            "SELECT current_user || ' ' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
    };
    assert_eq!(
        cert_login(&client_crt, &client_key, "verify-full").unwrap(),
        "cert_user true"
    );
    let (other_crt, other_key) = certs.client_cert_other_ca("cert_user");
    assert!(cert_login(&other_crt, &other_key, "verify-full").is_err());
    let err = cert_login(&client_crt, &client_key, "disable").unwrap_err();
    assert!(err.contains("rejects connection"), "{err}");
    let (alice_crt, alice_key) = certs.client_cert("alice");
    let err = cert_login(&alice_crt, &alice_key, "verify-full").unwrap_err();
    assert!(err.contains("certificate authentication failed"), "{err}");

    // A renewed certificate: served after reload_ssl, and still verifies.
    let renewed = certs.renew_server();
    assert_ne!(renewed, original);
    assert_eq!(renewed, certs.server_fingerprint());
    assert_eq!(cluster.reload_ssl(), renewed);
    assert_eq!(
        support::served_cert_fingerprint("localhost", cluster.port(), true).as_deref(),
        Some(renewed.as_str())
    );
    assert_eq!(
        psql_tls(&cluster, "verify-full", &certs.ca_cert(), SSL_CHECK).unwrap(),
        "t"
    );
    drop(cluster);

    // A server with the wrong host name: verify-ca passes, verify-full doesn't.
    let cluster = PgCluster::builder()
        .ssl_files(&certs.wronghost_cert(), &certs.wronghost_key(), None)
        .start();
    assert_eq!(
        psql_tls(&cluster, "verify-ca", &certs.ca_cert(), SSL_CHECK).unwrap(),
        "t"
    );
    let err = psql_tls(&cluster, "verify-full", &certs.ca_cert(), SSL_CHECK).unwrap_err();
    assert!(err.contains("does not match host name"), "{err}");
    assert_eq!(
        support::served_cert_fingerprint("127.0.0.1", cluster.port(), true),
        Some(fingerprint_file(&certs.wronghost_cert()))
    );
}
