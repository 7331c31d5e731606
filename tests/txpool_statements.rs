//! Prepared statements over their whole life, as a direct connection has them: SQL
//! `DEALLOCATE` of protocol-level statements (what psycopg 3 on libpq before 17 sends to
//! evict them) and statements shared between clients across schema changes, in both
//! pool modes, with pools smaller than the clients.

mod support;

use support::txpool::{compare_with_direct, fe, run_py, Msg, Pgsilo, Wire};
use support::PgCluster;

const USER: &str = "scram_user";
const DB: &str = "app_db";

/// What a client sees of a reply: message types, with command tags, SQLSTATEs and
/// first values, e.g. `C[DEALLOCATE] Z[I]`.
fn seen(msgs: &[Msg]) -> String {
    msgs.iter()
        .map(|m| match m.tag {
            b'C' => format!("C[{}]", m.tag_text()),
            b'E' => format!("E[{}]", m.field(b'C').unwrap_or_default()),
            b'D' => format!("D[{}]", m.first_value().unwrap_or_default()),
            b'Z' => format!("Z[{}]", m.body.first().map_or('?', |&b| b as char)),
            t => (t as char).to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the DEALLOCATE script on `port` and returns one line per step. A second client
/// runs the same statements between steps, so under transaction pooling the server
/// copies are shared and the two clients take turns on a pool of one.
fn deallocate_transcript(port: u16) -> Vec<String> {
    let mut c = Wire::connect(port, USER, DB);
    let mut other = Wire::connect(port, USER, DB);
    let mut lines = Vec::new();
    let mut step = |c: &mut Wire, other: &mut Wire, what: &str, parts: Vec<Vec<u8>>| {
        c.send_all(&parts);
        let reply = c.until_ready();
        lines.push(format!("{what}: {}", seen(&reply)));
        // While `c` is in a transaction block it keeps the pool's only server.
        if reply.last().and_then(|z| z.body.first()) != Some(&b'I') {
            return;
        }
        // The other client prepares the same text under the same name and uses it.
        other.send_all(&[
            fe::parse("s1", "select 1"),
            fe::bind_exec("s1", &[]),
            fe::close_statement("s1"),
            fe::sync(),
        ]);
        other.until_ready();
    };
    let prepare: Vec<Vec<u8>> = [
        ("s1", "select 1"),
        ("S1", "select 2"),
        ("s3", "select 3"),
        ("s4", "select 4"),
        ("s5", "select 5"),
    ]
    .iter()
    .map(|(n, q)| fe::parse(n, q))
    .chain([fe::sync()])
    .collect();
    step(&mut c, &mut other, "prepare", prepare);
    step(&mut c, &mut other, "deallocate", vec![fe::query("DEALLOCATE s1")]);
    step(
        &mut c,
        &mut other,
        "bind deallocated",
        vec![fe::bind_exec("s1", &[]), fe::sync()],
    );
    step(
        &mut c,
        &mut other,
        "multi-statement, quoted",
        vec![fe::query("select 1; Deallocate \"S1\"; select 2")],
    );
    step(
        &mut c,
        &mut other,
        "bind quoted",
        vec![fe::bind_exec("S1", &[]), fe::sync()],
    );
    step(&mut c, &mut other, "unknown name", vec![fe::query("DEALLOCATE s9")]);
    step(
        &mut c,
        &mut other,
        "failed transaction",
        vec![fe::query("BEGIN; select 1/0")],
    );
    step(
        &mut c,
        &mut other,
        "deallocate in it",
        vec![fe::query("deallocate prepare s3")],
    );
    step(&mut c, &mut other, "rollback", vec![fe::query("ROLLBACK")]);
    step(
        &mut c,
        &mut other,
        "s3 still there",
        vec![fe::bind_exec("s3", &[]), fe::sync()],
    );
    step(
        &mut c,
        &mut other,
        "error before it",
        vec![fe::query("select 1/0; DEALLOCATE s4")],
    );
    step(
        &mut c,
        &mut other,
        "s4 still there",
        vec![fe::bind_exec("s4", &[]), fe::sync()],
    );
    step(
        &mut c,
        &mut other,
        "twice",
        vec![fe::query("DEALLOCATE s4; /* again */ DEALLOCATE s4")],
    );
    step(
        &mut c,
        &mut other,
        "in a transaction block",
        vec![fe::query("BEGIN; DEALLOCATE s5; COMMIT")],
    );
    step(
        &mut c,
        &mut other,
        "name reused",
        vec![fe::parse("s5", "select 55"), fe::bind_exec("s5", &[]), fe::sync()],
    );
    // The extended protocol, as psycopg sends it in pipeline mode.
    let extended = |sql: &str| vec![fe::parse("", sql), fe::bind("", "", &[]), fe::execute(""), fe::sync()];
    step(
        &mut c,
        &mut other,
        "prepare s6, s7",
        vec![fe::parse("s6", "select 6"), fe::parse("s7", "select 7"), fe::sync()],
    );
    step(&mut c, &mut other, "extended deallocate", extended("DEALLOCATE s6"));
    step(
        &mut c,
        &mut other,
        "s6 gone",
        vec![fe::bind_exec("s6", &[]), fe::sync()],
    );
    step(&mut c, &mut other, "extended, unknown name", extended("DEALLOCATE s6"));
    step(
        &mut c,
        &mut other,
        "failed transaction again",
        vec![fe::query("BEGIN; select 1/0")],
    );
    step(
        &mut c,
        &mut other,
        "extended deallocate in it",
        extended("deallocate s7"),
    );
    step(&mut c, &mut other, "rollback again", vec![fe::query("ROLLBACK")]);
    step(
        &mut c,
        &mut other,
        "s7 still there",
        vec![fe::bind_exec("s7", &[]), fe::sync()],
    );
    step(&mut c, &mut other, "deallocate all", vec![fe::query("DEALLOCATE ALL")]);
    step(
        &mut c,
        &mut other,
        "after all",
        vec![fe::bind_exec("s5", &[]), fe::sync()],
    );
    step(
        &mut c,
        &mut other,
        "prepare s8, s9; close s9",
        vec![
            fe::parse("s8", "select 8"),
            fe::parse("s9", "select 9"),
            fe::close_statement("s9"),
            fe::sync(),
        ],
    );
    step(
        &mut c,
        &mut other,
        "s9 closed",
        vec![fe::bind_exec("s9", &[]), fe::sync()],
    );
    step(&mut c, &mut other, "discard all", vec![fe::query("DISCARD ALL")]);
    step(
        &mut c,
        &mut other,
        "s8 discarded",
        vec![fe::bind_exec("s8", &[]), fe::sync()],
    );
    step(&mut c, &mut other, "still usable", vec![fe::query("select 42")]);
    c.close();
    other.close();
    lines
}

/// The cluster for the transcripts here: clients create the types they use.
fn allow_create(cluster: &PgCluster) {
    cluster.psql(DB, "GRANT CREATE ON SCHEMA public TO PUBLIC");
}

fn like_direct(mode: &str, transcript: fn(u16) -> Vec<String>) {
    compare_with_direct(mode, allow_create, transcript);
}

#[test]
fn sql_deallocate_acts_on_protocol_statements_as_directly_transaction_mode() {
    like_direct("transaction", deallocate_transcript);
}

#[test]
fn sql_deallocate_acts_on_protocol_statements_as_directly_session_mode() {
    like_direct("session", deallocate_transcript);
}

fn psycopg_scenario(mode: &str, scenario: &str, pool: &str) {
    let cluster = PgCluster::start();
    let mut silo = Pgsilo::start(
        &cluster,
        &[("pool_mode", &format!("\"{mode}\"")), ("default_pool_size", pool)],
    );
    let out = run_py(
        "stmt_lifecycle.py",
        &[
            scenario,
            &silo.conninfo(USER, DB),
            &cluster.superuser_conn_string(DB),
            mode,
        ],
        300,
    );
    assert!(out.contains(&format!("{scenario}: all ")), "{out}");
    silo.assert_alive();
}

#[test]
fn psycopg_system_libpq_thousand_statements_prepared_max_2_transaction_mode() {
    psycopg_scenario("transaction", "many", "1");
}

#[test]
fn psycopg_system_libpq_thousand_statements_prepared_max_2_session_mode() {
    psycopg_scenario("session", "many", "2");
}

#[test]
fn psycopg_pipeline_evicts_with_extended_deallocate_transaction_mode() {
    psycopg_scenario("transaction", "pipeline", "1");
}

#[test]
fn psycopg_pipeline_evicts_with_extended_deallocate_session_mode() {
    psycopg_scenario("session", "pipeline", "2");
}

#[test]
fn shared_statements_after_alter_table_transaction_mode() {
    psycopg_scenario("transaction", "alter", "1");
}

#[test]
fn shared_statements_after_alter_table_session_mode() {
    psycopg_scenario("session", "alter", "2");
}

#[test]
fn shared_statements_after_drop_and_create_type_transaction_mode() {
    psycopg_scenario("transaction", "type", "1");
}

#[test]
fn shared_statements_after_drop_and_create_type_session_mode() {
    psycopg_scenario("session", "type", "2");
}

#[test]
fn shared_statements_after_own_statement_from_before_a_migration_transaction_mode() {
    psycopg_scenario("transaction", "own", "1");
}

#[test]
fn shared_statements_after_own_statement_from_before_a_migration_session_mode() {
    psycopg_scenario("session", "own", "2");
}

#[test]
fn stale_statement_in_a_transaction_block_fails_once_transaction_mode() {
    psycopg_scenario("transaction", "own_block", "1");
}

#[test]
fn stale_statement_in_a_transaction_block_fails_as_directly_session_mode() {
    psycopg_scenario("session", "own_block", "2");
}

/// B prepares a statement whose parameter type is an enum; A, inside a savepoint,
/// replaces the type and prepares the same text (PostgreSQL fixes the parameter's type
/// OID in a statement), then rolls back to the savepoint. Directly, B's statement still
/// works: the original type is back. Through pgsilo, the copy A's Parse made refers to a
/// type that never committed, and must not be what B's Bind runs on. psycopg hides this
/// by sending DEALLOCATE ALL after DROP and ROLLBACK; JDBC and tokio-postgres do not.
fn savepoint_transcript(port: u16) -> Vec<String> {
    let mut a = Wire::connect(port, USER, DB);
    let mut b = Wire::connect(port, USER, DB);
    let mut lines = Vec::new();
    let mut step = |w: &mut Wire, what: &str, parts: Vec<Vec<u8>>| {
        w.send_all(&parts);
        lines.push(format!("{what}: {}", seen(&w.until_ready())));
    };
    let q = "SELECT $1::sp_mood::text";
    step(
        &mut a,
        "create type",
        vec![fe::query(
            "DROP TYPE IF EXISTS sp_mood; CREATE TYPE sp_mood AS ENUM ('ok', 'sad')",
        )],
    );
    step(
        &mut b,
        "b prepares",
        vec![fe::parse("b1", q), fe::bind_exec("b1", &["sad"]), fe::sync()],
    );
    step(
        &mut a,
        "a replaces the type in a savepoint",
        vec![fe::query(
            "BEGIN; SAVEPOINT sp; DROP TYPE sp_mood; CREATE TYPE sp_mood AS ENUM ('sad')",
        )],
    );
    step(
        &mut a,
        "a prepares there",
        vec![fe::parse("a1", q), fe::bind_exec("a1", &["sad"]), fe::sync()],
    );
    step(
        &mut a,
        "a rolls back to the savepoint",
        vec![fe::query("ROLLBACK TO SAVEPOINT sp; COMMIT")],
    );
    for round in 0..3 {
        step(
            &mut b,
            &format!("b runs its statement, round {round}"),
            vec![fe::bind_exec("b1", &["ok"]), fe::sync()],
        );
    }
    // A's own statement is not compared: directly it fails (its type never committed);
    // pgsilo, having dropped that copy, prepares it again and it works.
    a.close();
    b.close();
    lines
}

#[test]
fn statements_prepared_in_a_rolled_back_savepoint_are_not_shared_transaction_mode() {
    like_direct("transaction", savepoint_transcript);
}

#[test]
fn statements_prepared_in_a_rolled_back_savepoint_are_not_shared_session_mode() {
    like_direct("session", savepoint_transcript);
}

/// How asyncpg, pgjdbc, tokio-postgres and Npgsql use a statement: Parse and Describe
/// once, then Bind/Execute with the RowDescription they keep. After a migration changes
/// the statement's result, PostgreSQL refuses it on a direct connection every time until
/// the client prepares it again; through pgsilo the client must get the same refusal,
/// never rows of a shape it was not told (a copy prepared afresh behind its back).
fn cached_description_transcript(port: u16) -> Vec<String> {
    let mut c = Wire::connect(port, USER, DB);
    let mut ddl = Wire::connect(port, USER, DB);
    let mut lines = Vec::new();
    let mut step = |w: &mut Wire, what: &str, parts: Vec<Vec<u8>>| {
        w.send_all(&parts);
        lines.push(format!("{what}: {}", seen(&w.until_ready())));
    };
    step(
        &mut ddl,
        "table",
        vec![fe::query("DROP TABLE IF EXISTS shp; CREATE TABLE shp AS SELECT 1 AS a")],
    );
    step(
        &mut c,
        "prepare and describe once",
        vec![
            fe::parse("s1", "SELECT * FROM shp"),
            fe::describe_statement("s1"),
            fe::sync(),
        ],
    );
    step(&mut c, "run", vec![fe::bind_exec("s1", &[]), fe::sync()]);
    step(
        &mut ddl,
        "migration",
        vec![fe::query("ALTER TABLE shp ADD COLUMN b int DEFAULT 2")],
    );
    for round in 0..3 {
        step(
            &mut c,
            &format!("run after the migration, {round}"),
            vec![fe::bind_exec("s1", &[]), fe::sync()],
        );
    }
    step(
        &mut c,
        "prepared again",
        vec![
            fe::parse("s2", "SELECT * FROM shp"),
            fe::describe_statement("s2"),
            fe::sync(),
        ],
    );
    step(&mut c, "run the new one", vec![fe::bind_exec("s2", &[]), fe::sync()]);
    c.close();
    ddl.close();
    lines
}

#[test]
fn a_stale_statement_with_a_cached_description_fails_as_directly_transaction_mode() {
    like_direct("transaction", cached_description_transcript);
}

#[test]
fn a_stale_statement_with_a_cached_description_fails_as_directly_session_mode() {
    like_direct("session", cached_description_transcript);
}

/// A client that asks for the description with every execution (libpq's
/// PQexecPrepared, psycopg) learns the new shape with the rows: under transaction
/// pooling pgsilo runs its stale statement on a fresh copy instead of failing it.
#[test]
fn a_stale_statement_described_again_gets_the_new_shape_transaction_mode() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(
        &cluster,
        &[("pool_mode", "\"transaction\""), ("default_pool_size", "1")],
    );
    cluster.psql(DB, "CREATE TABLE shp2 AS SELECT 1 AS a; GRANT SELECT ON shp2 TO PUBLIC");
    let mut c = Wire::connect(silo.port(), USER, DB);
    let run = |c: &mut Wire| {
        c.send_all(&[fe::bind("", "s1", &[]), describe_portal(), fe::execute(""), fe::sync()]);
        seen(&c.until_ready())
    };
    c.send_all(&[fe::parse("s1", "SELECT * FROM shp2"), fe::sync()]);
    c.until_ready();
    assert_eq!(run(&mut c), "2 T D[1] C[SELECT 1] Z[I]");
    cluster.psql(DB, "ALTER TABLE shp2 ADD COLUMN b int DEFAULT 2");
    for _ in 0..2 {
        c.send_all(&[fe::bind("", "s1", &[]), describe_portal(), fe::execute(""), fe::sync()]);
        let msgs = c.until_ready();
        assert_eq!(seen(&msgs), "2 T D[1] C[SELECT 1] Z[I]");
        let row = msgs.iter().find(|m| m.tag == b'D').unwrap();
        assert_eq!(row.values(), ["1", "2"], "the new shape, with its description");
    }
    c.close();
}

fn describe_portal() -> Vec<u8> {
    let mut m = vec![b'D', 0, 0, 0, 6, b'P', 0];
    m[1..5].copy_from_slice(&6u32.to_be_bytes());
    m
}
