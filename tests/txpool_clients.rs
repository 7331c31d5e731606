//! Client matrix, psycopg 3 and psql through pgsilo in transaction mode, with pools smaller
//! than the number of clients.
//!
//! The psycopg scripts live in tests/py/ and run with the interpreter of target/venv
//! (`make target/venv/.ok` creates it; PGSILO_PYTHON overrides it). Without it these
//! tests fail and say how to create it.

mod support;

use std::fs;
use std::process::{Command, Output};

use support::txpool::{password, run_py, Pgsilo};
use support::{PgCluster, TestCerts};

const USER: &str = "scram_user";
const DB: &str = "app_db";

fn psycopg_clients(pool: &str, clients: usize, rounds: usize) {
    psycopg_clients_on(pool, clients, rounds, None)
}

/// With `tls`, PostgreSQL has `ssl = on`, pgsilo requires TLS from clients and verifies
/// the server's certificate (verify-full), and the clients verify pgsilo's.
fn psycopg_clients_on(pool: &str, clients: usize, rounds: usize, tls: Option<&TestCerts>) {
    let cluster = match tls {
        Some(certs) => PgCluster::builder().ssl(certs).start(),
        None => PgCluster::start(),
    };
    cluster.psql(
        DB,
        "CREATE TABLE py_counter (n int); INSERT INTO py_counter VALUES (0); \
         GRANT ALL ON py_counter TO PUBLIC",
    );
    let quoted = |p: std::path::PathBuf| format!("\"{}\"", p.display());
    let mut settings = vec![("default_pool_size", pool.to_string())];
    if let Some(certs) = tls {
        settings.extend([
            ("client_tls_sslmode", "\"require\"".to_string()),
            ("client_tls_cert_file", quoted(certs.server_cert())),
            ("client_tls_key_file", quoted(certs.server_key())),
            ("server_tls_sslmode", "\"verify-full\"".to_string()),
            ("server_tls_ca_file", quoted(certs.ca_cert())),
        ]);
    }
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut silo = Pgsilo::start(&cluster, &settings);
    let mut conninfo = silo.conninfo(USER, DB);
    if let Some(certs) = tls {
        conninfo.push_str(&format!(
            " sslmode=verify-full sslrootcert={}",
            certs.ca_cert().display()
        ));
    }
    let threads: Vec<_> = (0..clients)
        .map(|cid| {
            let conninfo = conninfo.clone();
            std::thread::spawn(move || {
                run_py(
                    "txpool_psycopg.py",
                    &[&conninfo, &cid.to_string(), &rounds.to_string()],
                    300,
                )
            })
        })
        .collect();
    let outputs: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (cid, out) in outputs.iter().enumerate() {
        assert!(
            out.contains(&format!("client {cid}: all ")),
            "client {cid} did not finish:\n{out}"
        );
    }
    let n = cluster.psql(DB, "SELECT n FROM py_counter");
    assert_eq!(n, (clients * (rounds / 5)).to_string(), "shared counter");
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
        ),
        "0"
    );
    let servers: usize = cluster
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'scram_user'",
        )
        .parse()
        .unwrap();
    assert!(
        servers <= pool.parse().unwrap(),
        "{servers} servers for a pool of {pool}"
    );
    if tls.is_some() {
        let plain = cluster.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.usename = 'scram_user' AND NOT s.ssl",
        );
        assert_eq!(plain, "0", "every server connection is TLS");
    }
    silo.assert_alive();
}

#[test]
fn psycopg_six_clients_pool_of_two_over_tls_both_ways() {
    let certs = TestCerts::temp();
    psycopg_clients_on("2", 6, 30, Some(&certs));
}

#[test]
fn psycopg_four_clients_pool_of_one() {
    psycopg_clients("1", 4, 30);
}

#[test]
fn psycopg_six_clients_pool_of_two() {
    psycopg_clients("2", 6, 20);
}

// ---------------------------------------------------------------------------------------
// psql
// ---------------------------------------------------------------------------------------

fn psql(cluster: &PgCluster, silo: &Pgsilo, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(cluster.bin("psql"))
        .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p"])
        .arg(silo.port().to_string())
        .args(["-U", USER, "-d", DB])
        .args(args)
        .env("PGPASSWORD", password(USER))
        .env("PGCONNECT_TIMEOUT", "30")
        .env_remove("PGOPTIONS")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run psql");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn psql_copy_multi_statement_and_errors() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let dir = silo.dir().to_path_buf();
    cluster.psql(
        DB,
        "CREATE TABLE psql_t (id int, name text); GRANT ALL ON psql_t TO PUBLIC",
    );

    // \copy in and out.
    let input = dir.join("in.tsv");
    let mut rows = String::new();
    for i in 0..5000 {
        rows.push_str(&format!("{i}\tname\\t{i}\n"));
    }
    fs::write(&input, &rows).unwrap();
    let out = psql(
        &cluster,
        &silo,
        &["-c", &format!("\\copy psql_t from '{}'", input.display())],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "COPY 5000");
    let output = dir.join("out.tsv");
    let out = psql(
        &cluster,
        &silo,
        &[
            "-c",
            &format!("\\copy (SELECT * FROM psql_t ORDER BY id) to '{}'", output.display()),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fs::read_to_string(&output).unwrap(), rows);
    // \copy from stdin within a script, between other statements.
    let out = psql(
        &cluster,
        &silo,
        &["-v", "ON_ERROR_STOP=1", "-f", "-"],
        Some("SELECT 'before';\n\\copy psql_t from stdin\n9001\tx\n9002\ty\n\\.\nSELECT count(*) FROM psql_t;\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "before\nCOPY 2\n5002");

    // Several statements in one simple query.
    let out = psql(&cluster, &silo, &["-c", "select 1; select 2; select 'three'"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "1\n2\nthree");
    // ... including a transaction block that spans them.
    let out = psql(
        &cluster,
        &silo,
        &[
            "-c",
            "BEGIN; INSERT INTO psql_t VALUES (-1, 'tx'); SELECT count(*) FROM psql_t WHERE id = -1; COMMIT",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "BEGIN\nINSERT 0 1\n1\nCOMMIT");

    // An error mid-script: without ON_ERROR_STOP later statements still run.
    let script = "SELECT 'one';\nSELECT * FROM no_such_table;\nSELECT 'three';\n";
    let out = psql(&cluster, &silo, &["-f", "-"], Some(script));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "one\nthree");
    assert!(text(&out.stderr).contains("no_such_table"));
    // With ON_ERROR_STOP they don't, and psql exits 3.
    let out = psql(&cluster, &silo, &["-v", "ON_ERROR_STOP=1", "-f", "-"], Some(script));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "one");
    // An error inside an explicit transaction: the rest of the block fails, COMMIT
    // rolls back, and the statements after it run normally.
    let script = "BEGIN;\nINSERT INTO psql_t VALUES (-2, 'lost');\nSELECT 1/0;\n\
                  INSERT INTO psql_t VALUES (-3, 'lost');\nCOMMIT;\n\
                  SELECT count(*) FROM psql_t WHERE id IN (-2, -3);\n";
    let out = psql(&cluster, &silo, &["-f", "-"], Some(script));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // (COMMIT of a failed transaction answers ROLLBACK.)
    assert_eq!(text(&out.stdout).trim(), "BEGIN\nINSERT 0 1\nROLLBACK\n0");
    assert!(text(&out.stderr).contains("current transaction is aborted"));

    // Many psql clients at once over the pool of one.
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let port = silo.port();
            let bin = cluster.bin("psql");
            std::thread::spawn(move || {
                let out = Command::new(bin)
                    .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
                    .args(["-p", &port.to_string(), "-U", USER, "-d", DB])
                    .args([
                        "-c",
                        &format!(
                            "BEGIN; INSERT INTO psql_t SELECT g, 'c{i}' FROM generate_series(1, 100) g; COMMIT; \
                             SELECT count(*) FROM psql_t WHERE name = 'c{i}'"
                        ),
                    ])
                    .env("PGPASSWORD", password(USER))
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", text(&out.stderr));
                assert_eq!(text(&out.stdout).trim(), "BEGIN\nINSERT 0 100\nCOMMIT\n100");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
        ),
        "0"
    );
}
