//! What pgsilo writes to stderr, as an operator reads it in the journal: PgBouncer-style
//! lines, login and disconnect lines with reasons, and the periodic stats line.

mod support;

use std::time::{Duration, Instant};

use support::{db_error, must_fail, runtime, PgCluster, Pgsilo};

const LONG: Duration = Duration::from_secs(60);

/// `2026-11-26 04:00:00.123 UTC [4242] NAME LEVEL message`
fn check_line_format(line: &str, pid: i32, name: &str) {
    let b = line.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    let ok = b.len() > 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b' '
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && line[23..].starts_with(&format!(" UTC [{pid}] {name} "));
    assert!(ok, "not a PgBouncer-style line: {line:?}");
    let level = line[23..].split(' ').nth(4).unwrap_or("");
    assert!(
        matches!(level, "LOG" | "WARNING" | "ERROR" | "DEBUG" | "NOISE"),
        "level {level:?} in {line:?}"
    );
}

#[test]
fn login_disconnect_and_stats_lines() {
    let cluster = PgCluster::start();
    let mut p = Pgsilo::builder()
        .name("logtest")
        .user("user_a", "pass_a")
        .database("tenant_a_db", &cluster)
        .set("stats_period", "1")
        .start();
    let rt = runtime();
    rt.block_on(async {
        let mut cfg = p.pg_config("user_a", Some("pass_a"), "tenant_a_db");
        cfg.application_name("logapp");
        let c = support::connect_with(&cfg).await.unwrap();
        c.simple_query("SELECT 1").await.unwrap();
        drop(c);
        p.wait_for_log("closing because: client close request", LONG);

        let e = must_fail(p.connect("user_a", "wrong", "tenant_a_db").await, "wrong password");
        assert_eq!(db_error(&e).0, "28P01");
        p.wait_for_log("pooler error: password authentication failed", LONG);
        let e = must_fail(p.connect("user_a", "pass_a", "nope_db").await, "unknown database");
        assert_eq!(db_error(&e).0, "3D000");

        // Traffic until a stats line reports it.
        let c = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        let deadline = Instant::now() + LONG;
        loop {
            for _ in 0..20 {
                c.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
            }
            let busy = p
                .log()
                .lines()
                .filter_map(|l| l.split_once("stats: ").map(|(_, s)| s.to_string()))
                .any(|s| !s.starts_with("0 xacts/s"));
            if busy {
                break;
            }
            assert!(Instant::now() < deadline, "no stats line with traffic:\n{}", p.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert!(p.stop().is_some_and(|s| s.success()));

    let log = p.log();
    let pid = p.pid();
    for line in log.lines() {
        check_line_format(line, pid, "logtest");
    }
    let login = log
        .lines()
        .find(|l| l.contains("login attempt") && l.contains("application_name=logapp"))
        .unwrap_or_else(|| panic!("a login line:\n{log}"));
    assert!(
        login.contains("tenant_a_db/user_a@127.0.0.1:") && login.contains("db=tenant_a_db user=user_a"),
        "{login}"
    );
    let client = login
        .split_once(" LOG ")
        .and_then(|(_, m)| m.split_once(':'))
        .map(|(id, _)| id.to_string())
        .unwrap_or_default();
    assert!(client.starts_with("C-"), "{login}");
    let close = log
        .lines()
        .find(|l| l.contains(&format!("{client}:")) && l.contains("closing because"))
        .unwrap_or_else(|| panic!("the disconnect line of {client}:\n{log}"));
    assert!(close.contains("closing because: client close request (age="), "{close}");
    // PgBouncer's lines for a refused login: the pooler error, then the disconnect.
    assert!(
        log.lines()
            .any(|l| l.contains(" WARNING C-") && l.contains("pooler error: password authentication failed")),
        "{log}"
    );
    assert!(
        log.contains("closing because: password authentication failed for user \"user_a\" (age="),
        "{log}"
    );
    assert!(login.contains("user=user_a tls=no "), "{login}");
    assert!(log.contains("no such database: nope_db"), "{log}");
    let stats = log
        .lines()
        .find(|l| l.contains(" LOG stats: "))
        .unwrap_or_else(|| panic!("{log}"));
    for part in [
        "xacts/s",
        "queries/s",
        "in ",
        "B/s",
        "out ",
        "xact ",
        "query ",
        "wait ",
        " us",
    ] {
        assert!(stats.contains(part), "{part:?} in {stats}");
    }
    assert!(log.contains("shutting down"), "{log}");
}

#[test]
fn disabled_connection_logging_is_quiet() {
    let cluster = PgCluster::start();
    let p = Pgsilo::builder()
        .user("user_a", "pass_a")
        .database("tenant_a_db", &cluster)
        .set("log_connections", "false")
        .set("log_disconnections", "false")
        .start();
    assert_eq!(p.psql("user_a", "pass_a", "tenant_a_db", "SELECT 1").unwrap(), "1");
    std::thread::sleep(Duration::from_millis(300));
    let log = p.log();
    assert!(!log.contains("login attempt"), "{log}");
    assert!(!log.contains("closing because"), "{log}");
}
