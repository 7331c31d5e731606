//! Client matrix, pgbench: TPC-B through pgsilo in transaction mode with a pool smaller
//! than the number of clients, in each query mode, with and without a new connection per
//! transaction (-C). Every transaction must succeed, and pgbench_history must hold exactly
//! one row per transaction pgbench reports as processed.

mod support;

use std::process::Command;

use support::txpool::{password, Pgsilo};
use support::PgCluster;

const USER: &str = "scram_user";
const CLIENTS: u32 = 6;
const POOL: &str = "2";

fn pgbench(cluster: &PgCluster, port: u16, args: &[&str]) -> String {
    let out = Command::new(cluster.bin("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER])
        .args(args)
        .arg("app_db")
        .env("PGPASSWORD", password(USER))
        .env("PGCONNECT_TIMEOUT", "30")
        .env_remove("PGOPTIONS")
        .output()
        .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "pgbench {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// The number after `label` on its line, e.g. "number of failed transactions: 0 (0.000%)".
fn figure(report: &str, label: &str) -> u64 {
    let line = report
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` in pgbench output:\n{report}"));
    let rest = line[label.len()..].trim_start_matches(':').trim();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().unwrap_or_else(|_| panic!("cannot read `{line}`"))
}

/// Sums of the accounts', tellers' and branches' balances.
fn balances(cluster: &PgCluster) -> Vec<i64> {
    cluster
        .psql(
            "app_db",
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ',' || \
                    (SELECT sum(tbalance) FROM pgbench_tellers) || ',' || \
                    (SELECT sum(bbalance) FROM pgbench_branches)",
        )
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect()
}

fn run_mode(mode: &str, threads: u32, per_client: u32) {
    let cluster = PgCluster::start();
    // Initialised directly on the server, as the user the benchmark runs as.
    pgbench(&cluster, cluster.port(), &["-i", "-q", "-s", "1"]);
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", POOL)]);
    for connect_each in [false, true] {
        cluster.psql("app_db", "TRUNCATE pgbench_history");
        let before = balances(&cluster);
        let clients = CLIENTS.to_string();
        let jobs = threads.to_string();
        let txs = per_client.to_string();
        let mut args = vec!["-n", "-M", mode, "-c", &clients, "-j", &jobs, "-t", &txs];
        if connect_each {
            args.push("-C");
        }
        let report = pgbench(&cluster, silo.port(), &args);
        let processed = figure(&report, "number of transactions actually processed");
        let failed = if report.contains("number of failed transactions") {
            figure(&report, "number of failed transactions")
        } else {
            0
        };
        let tps = report
            .lines()
            .filter(|l| l.starts_with("tps") || l.starts_with("latency average"))
            .collect::<Vec<_>>()
            .join("; ");
        println!(
            "pgbench -M {mode}{} -c {CLIENTS} -j {threads} -t {per_client}, pool {POOL}: \
             {processed} processed, {failed} failed; {tps}",
            if connect_each { " -C" } else { "" }
        );
        assert_eq!(failed, 0, "failed transactions:\n{report}");
        assert_eq!(
            processed,
            u64::from(CLIENTS * per_client),
            "not every transaction was processed:\n{report}"
        );
        let rows: u64 = cluster
            .psql("app_db", "SELECT count(*) FROM pgbench_history")
            .parse()
            .unwrap();
        assert_eq!(rows, processed, "pgbench_history rows vs processed");
        // Each transaction moves an account, its teller and its branch by the same delta
        // it writes to the history: the totals must agree.
        let after = balances(&cluster);
        let moved: Vec<i64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let history: i64 = cluster
            .psql("app_db", "SELECT coalesce(sum(delta), 0) FROM pgbench_history")
            .parse()
            .unwrap();
        assert_eq!(moved, vec![history; 3], "accounts/tellers/branches vs history");
    }
    let mut silo = silo;
    silo.assert_alive();
}

#[test]
fn pgbench_simple() {
    run_mode("simple", 2, 40);
}

#[test]
fn pgbench_extended() {
    run_mode("extended", 2, 40);
}

/// `-j` equals `-c` here: with -M prepared pgbench prepares with a synchronous
/// PQprepare, so with transaction pooling, a pool smaller than the client count and
/// several clients per thread, one thread can block on a client waiting for a server
/// while another client of the same thread holds that server inside BEGIN..END (TPC-B).
/// That is pgbench's limitation, not pgsilo's.
#[test]
fn pgbench_prepared() {
    run_mode("prepared", CLIENTS, 40);
}
