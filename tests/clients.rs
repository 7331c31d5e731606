//! Real clients through pgsilo: psql scripts (COPY included) and pgbench in every query
//! mode, with and without a new connection per transaction.

mod support;

use std::process::Command;

use support::{PgCluster, Pgsilo};

const USER: &str = "md5_user";
const PASSWORD: &str = "md5_pass";

fn pgsilo(cluster: &PgCluster, mode: &str) -> Pgsilo {
    Pgsilo::builder()
        .auth_type("md5")
        .pool_mode(mode)
        .pool_size(4)
        .user(USER, PASSWORD)
        .database("app_db", cluster)
        .start()
}

const SCRIPT: &str = r"
CREATE TABLE script_t (id int PRIMARY KEY, name text);
BEGIN;
INSERT INTO script_t VALUES (1, 'one'), (2, 'two');
COPY script_t FROM STDIN;
3	three
4	four
\.
SAVEPOINT s;
INSERT INTO script_t VALUES (5, 'five');
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT count(*) FROM script_t;
SELECT string_agg(name, ',' ORDER BY id) FROM script_t;
PREPARE by_id(int) AS SELECT name FROM script_t WHERE id = $1;
EXECUTE by_id(3);
DEALLOCATE by_id;
\set n 2
SELECT name FROM script_t WHERE id = :n;
COPY (SELECT id, name FROM script_t WHERE id > 2 ORDER BY id) TO STDOUT;
SELECT 'done';
";

#[test]
fn psql_runs_a_multi_statement_script() {
    let cluster = PgCluster::start();
    for mode in ["transaction", "session"] {
        let p = pgsilo(&cluster, mode);
        let out = p
            .psql(USER, PASSWORD, "app_db", SCRIPT)
            .unwrap_or_else(|e| panic!("{mode}: {e}\nlog:\n{}", p.log()));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            ["4", "one,two,three,four", "three", "two", "3\tthree", "4\tfour", "done"],
            "{mode}"
        );
        cluster.psql("app_db", "DROP TABLE script_t");

        // A failing statement stops the script with PostgreSQL's error, and the next
        // session is unaffected.
        let err = p
            .psql(USER, PASSWORD, "app_db", "BEGIN; SELECT 1/0; SELECT 'not reached';")
            .expect_err("division by zero");
        assert!(err.contains("division by zero"), "{err}");
        assert_eq!(p.psql(USER, PASSWORD, "app_db", "SELECT 'fine'").unwrap(), "fine");
    }
}

fn pgbench(cluster: &PgCluster, p: &Pgsilo, args: &[&str]) -> String {
    let out = Command::new(cluster.bin("pgbench"))
        .args(args)
        .args(["-h", "127.0.0.1", "-p", &p.port().to_string(), "-U", USER])
        .arg("app_db")
        .env("PGPASSWORD", PASSWORD)
        .env("PGSSLMODE", "disable")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "pgbench {args:?} failed ({}):\n{stdout}\n{stderr}\npgsilo log:\n{}",
        out.status,
        p.log()
    );
    format!("{stdout}\n{stderr}")
}

/// The number after `label` on its line of pgbench's report.
fn report_number(report: &str, label: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no \"{label}\" in pgbench's report:\n{report}"))
}

#[test]
fn pgbench_in_transaction_mode_has_no_failed_transactions() {
    let cluster = PgCluster::start();
    let p = pgsilo(&cluster, "transaction");
    pgbench(&cluster, &p, &["-i", "-q", "-s", "1"]);
    assert_eq!(
        cluster.psql("app_db", "SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );
    for mode in ["simple", "extended", "prepared"] {
        for reconnect in [false, true] {
            // pgbench (up to 16) prepares with a blocking PQprepare that stalls every
            // client of its thread; with more clients than servers, a thread's client
            // waiting for a server to prepare on would block the thread's clients
            // holding those servers. So in prepared mode, one thread per client.
            let threads = if mode == "prepared" { "8" } else { "2" };
            let mut args = vec!["-c", "8", "-j", threads, "-T", "3", "-M", mode];
            if reconnect {
                args.push("-C");
            }
            let report = pgbench(&cluster, &p, &args);
            let processed = report_number(&report, "number of transactions actually processed:");
            let failed = report_number(&report, "number of failed transactions:");
            eprintln!("pgbench {args:?}: {processed} transactions, {failed} failed");
            assert!(processed > 0, "{args:?}:\n{report}");
            assert_eq!(failed, 0, "{args:?}:\n{report}");
            assert!(!report.contains("aborted"), "{args:?}:\n{report}");
        }
    }
    // The pool stayed within its size throughout.
    let backends = cluster.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'md5_user'",
    );
    assert!(backends.parse::<u32>().unwrap() <= 4, "{backends}");
}
