//! Unix sockets both ways: clients on `unix_socket_dir/.s.PGSQL.<port>` (mode, stale
//! file, a live one refused, removed at exit), and servers reached through PostgreSQL's
//! own Unix socket (`host = "/dir"`), with psql and pgbench.

mod support;

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Stdio};

use support::{psql_conninfo, toml_str, Db, PgCluster, Pgsilo};

fn socket_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("pgsilo-unix").tempdir().unwrap()
}

#[test]
fn clients_connect_over_the_unix_socket() {
    let cluster = PgCluster::start();
    let dir = socket_dir();
    let mut silo = Pgsilo::builder()
        .auth_type("trust")
        .user("trust_user", "")
        .db(Db::on(&cluster, "app_db").user("trust_user"))
        .set("admin_users", "[\"trust_user\"]")
        .set_str("unix_socket_dir", dir.path().to_str().unwrap())
        .set_str("unix_socket_mode", "0700")
        .start();
    let path = dir.path().join(format!(".s.PGSQL.{}", silo.port()));
    let meta = std::fs::metadata(&path).expect("the socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);

    let host = dir.path().to_str().unwrap();
    let conn = format!("host={host} port={} user=trust_user dbname=app_db", silo.port());
    assert_eq!(psql_conninfo(&conn, "SELECT 7").unwrap().trim(), "7");
    // SHOW CLIENTS says "unix" for the address, as PgBouncer.
    let admin = format!("host={host} port={} user=trust_user dbname=pgbouncer", silo.port());
    let clients = psql_conninfo(&admin, "SHOW CLIENTS").unwrap();
    assert!(clients.lines().any(|l| l.contains("|unix|")), "{clients}");

    // A second instance on the same port (TCP and socket file) is refused while this one
    // serves, and this one carries on.
    let refused = Pgsilo::builder()
        .port(silo.port())
        .auth_type("trust")
        .user("trust_user", "")
        .db(Db::on(&cluster, "app_db").user("trust_user"))
        .set_str("unix_socket_dir", host)
        .set_str("takeover_socket", "")
        .expect_failure();
    assert!(!refused.status_text().is_empty());
    assert_eq!(psql_conninfo(&conn, "SELECT 8").unwrap().trim(), "8");

    // SIGINT: the file goes with the process.
    silo.stop();
    assert!(!path.exists(), "the socket file is removed at exit");
}

#[test]
fn a_stale_socket_file_is_replaced_and_an_empty_dir_setting_disables_it() {
    let cluster = PgCluster::start();
    let dir = socket_dir();
    let port = support::free_port();
    let path = dir.path().join(format!(".s.PGSQL.{port}"));
    // A socket file nobody listens on, as a killed process leaves.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let silo = Pgsilo::builder()
        .port(port)
        .auth_type("trust")
        .user("trust_user", "")
        .db(Db::on(&cluster, "app_db").user("trust_user"))
        .set_str("unix_socket_dir", dir.path().to_str().unwrap())
        .start();
    let conn = format!(
        "host={} port={port} user=trust_user dbname=app_db",
        dir.path().display()
    );
    assert_eq!(psql_conninfo(&conn, "SELECT 1").unwrap().trim(), "1");
    drop(silo);

    let off = socket_dir();
    let silo = Pgsilo::builder()
        .auth_type("trust")
        .user("trust_user", "")
        .db(Db::on(&cluster, "app_db").user("trust_user"))
        .set_str("unix_socket_dir", "")
        .start();
    assert!(!off.path().join(format!(".s.PGSQL.{}", silo.port())).exists());
    let tmp = std::path::Path::new("/tmp").join(format!(".s.PGSQL.{}", silo.port()));
    assert!(!tmp.exists(), "unix_socket_dir = \"\" makes no socket");
}

#[test]
fn servers_reached_over_postgresqls_unix_socket() {
    let cluster = PgCluster::start();
    let dir = socket_dir();
    let silo = Pgsilo::builder()
        .auth_type("trust")
        .user("trust_user", "")
        .pool_mode("transaction")
        .pool_size(2)
        .db(Db::on(&cluster, "app_db")
            .user("trust_user")
            .set("host", &toml_str(cluster.socket_dir().to_str().unwrap())))
        .set_str("unix_socket_dir", dir.path().to_str().unwrap())
        .start();
    // Unix socket both ways; PostgreSQL sees a local client (no address).
    let conn = format!(
        "host={} port={} user=trust_user dbname=app_db",
        dir.path().display(),
        silo.port()
    );
    assert_eq!(
        psql_conninfo(&conn, "SELECT inet_client_addr() IS NULL")
            .unwrap()
            .trim(),
        "t"
    );
    let pgbench = support::pg_bindir().join("pgbench");
    for mode in ["simple", "extended", "prepared"] {
        let out = Command::new(&pgbench)
            .args(["-n", "-c", "6", "-j", "2", "-t", "200", "-M", mode, "-f", "-"])
            .arg(&conn)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(b"\\set a random(1, 1000)\nSELECT :a, inet_client_addr();\n")?;
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
    // Cancels reach a Unix-socket server too.
    let rt = support::runtime();
    rt.block_on(async {
        let (client, c) = silo
            .pg_config("trust_user", None, "app_db")
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(c);
        let token = client.cancel_token();
        let slow = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let e = slow.await.unwrap().expect_err("cancelled");
        assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    });
}

/// TLS is for TCP: an SSLRequest on the Unix socket is answered N (as PostgreSQL does),
/// even with client_tls_sslmode = require, and the client carries on in the clear.
#[test]
fn an_ssl_request_on_the_unix_socket_is_answered_n() {
    use std::io::Read;
    let cluster = PgCluster::start();
    let certs = support::TestCerts::temp();
    let dir = socket_dir();
    let silo = Pgsilo::builder()
        .auth_type("trust")
        .user("trust_user", "")
        .db(Db::on(&cluster, "app_db").user("trust_user"))
        .set_str("unix_socket_dir", dir.path().to_str().unwrap())
        .set_str("client_tls_sslmode", "require")
        .set_str("client_tls_cert_file", certs.server_cert().to_str().unwrap())
        .set_str("client_tls_key_file", certs.server_key().to_str().unwrap())
        .start();
    let path = dir.path().join(format!(".s.PGSQL.{}", silo.port()));
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    let conn = format!(
        "host={} port={} user=trust_user dbname=app_db",
        dir.path().display(),
        silo.port()
    );
    assert_eq!(psql_conninfo(&conn, "SELECT 'clear'").unwrap().trim(), "clear");
}

/// `--takeover` hands the Unix socket over with the TCP listeners: clients on the socket
/// are served throughout, the file stays for the new process, and a mode changed in the
/// config meanwhile is applied to it.
#[test]
fn takeover_hands_the_unix_socket_over() {
    let cluster = PgCluster::start();
    let dir = socket_dir();
    let takeover = dir.path().join("takeover.sock");
    let builder = |mode: &str| {
        Pgsilo::builder()
            .auth_type("trust")
            .user("trust_user", "")
            .db(Db::on(&cluster, "app_db").user("trust_user"))
            .set_str("unix_socket_dir", dir.path().to_str().unwrap())
            .set_str("unix_socket_mode", mode)
            .set_str("takeover_socket", takeover.to_str().unwrap())
    };
    let mut old = builder("0777").start();
    let port = old.port();
    let path = dir.path().join(format!(".s.PGSQL.{port}"));
    let conn = format!(
        "host={} port={port} user=trust_user dbname=app_db",
        dir.path().display()
    );
    assert_eq!(psql_conninfo(&conn, "SELECT 1").unwrap().trim(), "1");
    old.rewrite(&builder("0770"));
    let new = old
        .start_again(&["--takeover"])
        .unwrap_or_else(|f| panic!("{}\n{}", f.status_text(), f.stderr));
    new.wait_for_log(
        "takeover: the previous process is draining",
        std::time::Duration::from_secs(20),
    );
    assert!(
        old.wait_exit(std::time::Duration::from_secs(20)).is_some(),
        "{}",
        old.log()
    );
    assert!(path.exists(), "the old process must leave the file to the new one");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o770);
    assert_eq!(psql_conninfo(&conn, "SELECT 2").unwrap().trim(), "2");
}
