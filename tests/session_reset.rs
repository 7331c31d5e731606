//! RESET, RESET ALL, DISCARD ALL and `SET … TO DEFAULT` return a client to the settings it
//! connected with, as on a direct connection, and what the client is told
//! (ParameterStatus, which libpq's PQparameterStatus and drivers read) agrees with what
//! SHOW says, by the time each request's ReadyForQuery arrives outside a transaction
//! block. Inside a block pgsilo runs no query of its own (it would take the transaction's
//! snapshot), so a RESET there shows the server's default until the block ends. In both
//! pool modes, with another client using the same server between steps.

mod support;

use support::txpool::{compare_with_direct, fe, run_py, Msg, Pgsilo, Wire};
use support::PgCluster;

const USER: &str = "scram_user";
const DB: &str = "app_db";

/// What the client connects with: all differ from the server's defaults.
const STARTUP: &[(&str, &str)] = &[
    ("DateStyle", "Postgres, MDY"),
    ("TimeZone", "America/Los_Angeles"),
    ("IntervalStyle", "postgres_verbose"),
    ("application_name", "app_r"),
    ("options", "-c statement_timeout=5s"),
];

/// Settings PostgreSQL reports with ParameterStatus, compared with SHOW.
const REPORTED: &[&str] = &["DateStyle", "TimeZone", "IntervalStyle", "application_name"];

const CHECK: &str = "--check";
const OTHER: &str = "--other";

const STEPS: &[&str] = &[
    CHECK,
    "SET datestyle TO iso",
    "RESET datestyle",
    CHECK,
    "SET timezone TO 'Asia/Tokyo'; RESET timezone",
    CHECK,
    "SET intervalstyle TO sql_standard",
    OTHER,
    "RESET intervalstyle",
    CHECK,
    "SET datestyle TO sql",
    "SET datestyle TO DEFAULT",
    CHECK,
    "SET timezone TO 'UTC'",
    "SET TIME ZONE LOCAL",
    CHECK,
    "SET timezone TO 'Asia/Tokyo'",
    "SET statement_timeout = '1s'",
    "SET application_name = 'x'",
    OTHER,
    "RESET ALL",
    CHECK,
    "SET timezone TO 'Asia/Tokyo'",
    "SET intervalstyle TO iso_8601",
    "DISCARD ALL",
    CHECK,
    "BEGIN; SET LOCAL timezone TO 'Asia/Tokyo'; COMMIT",
    CHECK,
    "BEGIN",
    "SET datestyle TO iso",
    "ROLLBACK",
    CHECK,
    "SET statement_timeout = '2s'",
    OTHER,
    "RESET statement_timeout",
    CHECK,
    // Inside a transaction block pgsilo runs no query of its own (it would take the
    // transaction's snapshot): a RESET there shows the server's default until the block
    // ends, and the client's value from then on. Not compared inside the block.
    "BEGIN",
    "SET timezone TO 'Asia/Tokyo'",
    "RESET timezone",
    "COMMIT",
    CHECK,
    // PostgreSQL's `transactions` regression test: SET TRANSACTION must come before any
    // query of the transaction, so pgsilo must not have sent one.
    "BEGIN",
    "SET TRANSACTION READ ONLY",
    "SET TRANSACTION READ WRITE",
    "SET TRANSACTION READ ONLY",
    "SELECT 1",
    "SET TRANSACTION READ WRITE",
    "ROLLBACK",
    "BEGIN",
    "RESET ALL",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SHOW transaction_isolation",
    "COMMIT",
    CHECK,
    "SET timezone TO 'Asia/Tokyo'",
    "BEGIN",
    "RESET timezone",
    "ROLLBACK",
    CHECK,
];

fn check(w: &mut Wire) -> String {
    w.send(&fe::query(
        "SELECT current_setting('DateStyle'), current_setting('TimeZone'), \
         current_setting('IntervalStyle'), current_setting('application_name'), \
         current_setting('statement_timeout'), \
         '2020-01-02 03:04:05+00'::timestamptz::text, interval '1 day 2 hours'::text",
    ));
    let msgs = w.until_ready();
    let row = msgs.iter().find(|m| m.tag == b'D').map(Msg::values).unwrap_or_default();
    let reported: Vec<String> = REPORTED
        .iter()
        .map(|k| w.reported.get(*k).cloned().unwrap_or_default())
        .collect();
    // What SHOW says and what the client was told must agree.
    let agree = row.len() >= 4 && row[..4] == reported[..];
    format!(
        "show [{}] reported [{}]{}",
        row.join(" | "),
        reported.join(" | "),
        if agree { "" } else { "  <-- DISAGREE" }
    )
}

fn transcript(port: u16) -> Vec<String> {
    let mut c = Wire::connect_with(port, USER, DB, STARTUP);
    let mut other = Wire::connect_with(port, USER, DB, &[("DateStyle", "German"), ("TimeZone", "Europe/Paris")]);
    let mut lines = Vec::new();
    for step in STEPS {
        match *step {
            CHECK => lines.push(check(&mut c)),
            OTHER => {
                // Uses the pool's only server (transaction mode) between c's requests.
                other.send(&fe::query(
                    "SET IntervalStyle TO sql_standard; SET statement_timeout = '7s'; SELECT 1",
                ));
                other.until_ready();
            }
            sql => {
                c.send(&fe::query(sql));
                let msgs = c.until_ready();
                let errors: Vec<String> = msgs
                    .iter()
                    .filter(|m| m.tag == b'E')
                    .filter_map(|m| m.field(b'C'))
                    .collect();
                let status = msgs.last().map_or('?', |z| z.body[0] as char);
                // What the client has been told by this ReadyForQuery, not later; outside
                // a transaction block, where the settings are final.
                let told: Vec<String> = REPORTED
                    .iter()
                    .map(|k| c.reported.get(*k).cloned().unwrap_or_default())
                    .collect();
                if status == 'I' {
                    lines.push(format!("{sql} -> {status} {errors:?} told [{}]", told.join(" | ")));
                } else {
                    lines.push(format!("{sql} -> {status} {errors:?}"));
                }
            }
        }
    }
    c.close();
    other.close();
    lines
}

fn like_direct(mode: &str) {
    compare_with_direct(mode, |_| {}, transcript);
}

#[test]
fn reset_and_reported_settings_as_directly_transaction_mode() {
    like_direct("transaction");
}

#[test]
fn reset_and_reported_settings_as_directly_session_mode() {
    like_direct("session");
}

/// The same through libpq, as applications see it: psycopg's conn.info.parameter_status
/// and SHOW, directly and through pgsilo.
fn libpq_like_direct(mode: &str) {
    let cluster = PgCluster::start();
    let direct = run_py(
        "reported_settings.py",
        &[&cluster.conn_string(USER, "scram_pass", DB)],
        120,
    );
    let pool = if mode == "session" { "2" } else { "1" };
    let silo = Pgsilo::start(
        &cluster,
        &[("pool_mode", &format!("\"{mode}\"")), ("default_pool_size", pool)],
    );
    let pooled = run_py("reported_settings.py", &[&silo.conninfo(USER, DB)], 120);
    assert!(!direct.contains("DISAGREE"), "directly:\n{direct}");
    assert_eq!(
        pooled, direct,
        "{mode} mode: what libpq reports differs from a direct connection"
    );
}

#[test]
fn libpq_reports_the_clients_settings_after_reset_transaction_mode() {
    libpq_like_direct("transaction");
}

#[test]
fn libpq_reports_the_clients_settings_after_reset_session_mode() {
    libpq_like_direct("session");
}
