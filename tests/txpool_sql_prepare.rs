//! SQL-level prepared statements (`PREPARE`, `EXECUTE`, `DEALLOCATE` in simple queries)
//! under transaction pooling, as a direct connection has them: with more clients than
//! servers, each client's EXECUTE runs wherever it lands, also on servers that never saw
//! its PREPARE; names are the client's own (two clients, one name, two statements); and
//! errors are PostgreSQL's, word for word, position for position. In session mode the
//! statements pass through as they are, and the same transcripts must hold.

mod support;

use std::process::Command;

use support::txpool::{compare_with_direct, fe, password, run_py, Msg, Pgsilo, Wire};
use support::PgCluster;

const USER: &str = "scram_user";
const DB: &str = "app_db";

/// What a client sees of a reply, in detail: command tags, rows, and errors with their
/// SQLSTATE, message, detail and position, e.g. `C[PREPARE] Z[I]`.
fn seen(msgs: &[Msg]) -> String {
    msgs.iter()
        .map(|m| match m.tag {
            b'C' => format!("C[{}]", m.tag_text()),
            b'E' => format!(
                "E[{} {} | detail {:?} | position {:?}]",
                m.field(b'C').unwrap_or_default(),
                m.field(b'M').unwrap_or_default(),
                m.field(b'D'),
                m.field(b'P'),
            ),
            b'D' => format!("D[{}]", m.values().join("|")),
            b'Z' => format!("Z[{}]", m.body.first().map_or('?', |&b| b as char)),
            t => (t as char).to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Clients taking turns, and what each saw, a line per turn.
struct Turns {
    clients: Vec<Wire>,
    lines: Vec<String>,
}

impl Turns {
    fn new(port: u16, n: usize) -> Turns {
        Turns {
            clients: (0..n).map(|_| Wire::connect(port, USER, DB)).collect(),
            lines: Vec::new(),
        }
    }

    fn send(&mut self, who: usize, what: &str, parts: &[Vec<u8>]) {
        let who = who % self.clients.len();
        let c = &mut self.clients[who];
        c.send_all(parts);
        let reply = seen(&c.until_ready());
        self.lines
            .push(format!("{} {what}: {reply}", (b'a' + who as u8) as char));
    }

    fn sql(&mut self, who: usize, sql: &str) {
        self.send(who, sql, &[fe::query(sql)]);
    }

    fn finish(self) -> Vec<String> {
        for c in self.clients {
            c.close();
        }
        self.lines
    }
}

/// Three clients taking turns. Under transaction pooling they share the pool's one
/// server, whose copies of their statements come and go with other clients' DEALLOCATE
/// ALL and DISCARD ALL.
fn clients_transcript(port: u16) -> Vec<String> {
    turns_transcript(Turns::new(port, 3))
}

/// The same turns by two clients (c's are b's): in session mode each client keeps one of
/// the pool's two servers.
fn two_clients_transcript(port: u16) -> Vec<String> {
    turns_transcript(Turns::new(port, 2))
}

fn turns_transcript(mut t: Turns) -> Vec<String> {
    let (a, b, c) = (0, 1, 2);
    // One name, two clients, two definitions; parameter types.
    t.sql(a, "PREPARE p(int, text) AS SELECT $1 * 2, $2 || '!'");
    t.sql(b, "PREPARE p AS SELECT 'b'::text");
    t.sql(a, "EXECUTE p(1, 'x')");
    t.sql(b, "EXECUTE p");
    // The server forgets every statement; the clients do not.
    t.sql(c, "DEALLOCATE ALL");
    t.sql(a, "EXECUTE p(2, 'y')");
    t.sql(b, "EXECUTE p");
    t.sql(c, "DISCARD ALL");
    t.sql(b, "execute P");
    // The same definition under two names, by two clients.
    t.sql(c, "PREPARE q1 AS SELECT 42");
    t.sql(b, "PREPARE q2 AS SELECT 42");
    t.sql(c, "EXECUTE q1");
    t.sql(b, "EXECUTE q2");
    // Errors, as PostgreSQL words and places them.
    t.sql(a, "EXECUTE p(1)");
    t.sql(a, "EXECUTE p('z', 'y')");
    t.sql(a, "  /* here */ EXECUTE   p(1, 2, 3)");
    t.sql(b, "PREPARE p AS SELECT 2");
    t.sql(b, "PREPARE p AS SELECT * FROM no_such_table");
    t.sql(b, "PREPARE r AS SELECT * FROM no_such_table");
    t.sql(b, "PREPARE r AS SELEC 1");
    t.sql(c, "EXECUTE p");
    t.sql(c, "DEALLOCATE p");
    t.sql(c, "DEALLOCATE PREPARE \"Q\"");
    t.sql(c, "EXECUTE nope(1, 2)");
    t.sql(a, "PREPARE select AS SELECT 1");
    t.sql(a, "EXECUTE p(1,");
    t.sql(a, "EXECUTE p(1, 'a'); EXECUTE p('q', 'b')");
    t.sql(a, "EXECUTE p(1, 'a'); SELECT 1 +");
    t.sql(a, "PREPARE \"ünï\"(text) AS SELECT $1 || 'é'");
    t.sql(a, "EXECUTE \"ünï\"('à'); SELECT 'é' + 1");
    t.sql(a, "EXECUTE pgsilo_none");
    t.sql(a, "DEALLOCATE pgsilo_dup");
    // A PREPARE in a transaction that rolls back stays, as prepared statements do.
    t.sql(c, "BEGIN");
    t.sql(c, "PREPARE t AS SELECT 't'");
    t.sql(c, "EXECUTE t");
    t.sql(c, "ROLLBACK");
    t.sql(c, "EXECUTE t");
    // In a failed transaction nothing is prepared, and nothing is executed.
    t.sql(c, "BEGIN");
    t.sql(c, "SELECT 1/0");
    t.sql(c, "PREPARE u AS SELECT 1");
    t.sql(c, "EXECUTE t");
    t.sql(c, "DEALLOCATE t");
    t.sql(c, "ROLLBACK");
    t.sql(c, "EXECUTE u");
    t.sql(c, "EXECUTE t");
    // A copy made in a transaction that rolled back is not used again; in a failed
    // transaction the client's EXECUTE gets PostgreSQL's refusal.
    t.sql(b, "BEGIN");
    t.sql(b, "PREPARE w AS SELECT 'w'");
    t.sql(b, "ROLLBACK");
    t.sql(b, "BEGIN");
    t.sql(b, "SELECT 1/0");
    t.sql(b, "EXECUTE w");
    t.sql(b, "ROLLBACK");
    t.sql(b, "EXECUTE w");
    // Several statements in one query, with an error part-way.
    t.sql(
        a,
        "PREPARE m1 AS SELECT 'm'; EXECUTE m1; PREPARE m2 AS SELECT 'm'; EXECUTE m2; \
         DEALLOCATE m1; EXECUTE m2; PREPARE m1 AS SELECT 'm1 again'; EXECUTE m1; EXECUTE m3",
    );
    t.sql(a, "EXECUTE m1; EXECUTE m2");
    t.sql(a, "SELECT 1/0; PREPARE never AS SELECT 1");
    t.sql(a, "EXECUTE never");
    t.sql(b, "PREPARE sel AS SELECT 1; PREPARE sel AS SELECT 2; SELECT 3");
    t.sql(b, "EXECUTE sel");
    t.sql(b, "PREPARE x AS SELECT 1; DEALLOCATE ALL; EXECUTE x");
    t.sql(
        b,
        "PREPARE x AS SELECT 1; DEALLOCATE ALL; PREPARE x AS SELECT 2; EXECUTE x",
    );
    t.sql(b, "EXECUTE x");
    t.sql(
        c,
        "BEGIN; PREPARE in_block AS SELECT 'ib'; EXECUTE in_block; COMMIT; EXECUTE in_block",
    );
    // Quoted names, a statement called "transaction", EXPLAIN, a trailing comment.
    t.sql(a, "PREPARE \"Mixed Case\" AS SELECT 'mc'");
    t.sql(a, "EXECUTE \"Mixed Case\"; EXECUTE mixed case");
    t.sql(a, "PREPARE transaction AS SELECT 'tx'");
    t.sql(a, "EXECUTE transaction");
    t.sql(a, "EXPLAIN (COSTS OFF) EXECUTE p(1, 'e')");
    t.sql(a, "PREPARE cm AS SELECT 'cm' -- a comment to the end");
    t.sql(c, "DEALLOCATE ALL");
    t.sql(a, "EXECUTE cm");
    // Statements that write, and a CREATE TABLE AS of one.
    t.sql(b, "DROP TABLE IF EXISTS sp_t; CREATE TABLE sp_t (v int)");
    t.sql(b, "PREPARE ins(int) AS INSERT INTO sp_t VALUES ($1)");
    t.sql(c, "DISCARD ALL");
    t.sql(b, "EXECUTE ins(7); EXECUTE ins(8)");
    t.sql(b, "SELECT sum(v) FROM sp_t");
    t.sql(b, "DROP TABLE sp_t");
    // Names are one namespace with protocol-level statements.
    t.send(a, "Parse proto", &[fe::parse("proto", "select 'proto'"), fe::sync()]);
    t.sql(a, "PREPARE proto AS SELECT 1");
    t.sql(a, "DEALLOCATE proto");
    t.sql(a, "PREPARE proto AS SELECT 'sql now'");
    t.sql(a, "EXECUTE proto");
    // DEALLOCATE ALL forgets the client's statements of both kinds.
    t.sql(a, "DEALLOCATE ALL");
    t.sql(a, "EXECUTE p(1, 'x')");
    t.sql(b, "EXECUTE p");
    t.finish()
}

/// Clients create the tables they use.
fn allow_create(cluster: &PgCluster) {
    cluster.psql(DB, "GRANT CREATE ON SCHEMA public TO PUBLIC");
}

fn nothing(_: &PgCluster) {}

#[test]
fn sql_prepared_statements_as_directly_transaction_mode() {
    compare_with_direct("transaction", allow_create, clients_transcript);
}

#[test]
fn sql_prepared_statements_as_directly_transaction_mode_two_clients() {
    compare_with_direct("transaction", allow_create, two_clients_transcript);
}

#[test]
fn sql_prepared_statements_as_directly_session_mode() {
    compare_with_direct("session", allow_create, two_clients_transcript);
}

/// psycopg prepares a query it runs often (prepare_threshold, 5 runs), an `EXECUTE p(1)`
/// too: the protocol-level statement's text names the client's SQL-level statement, which
/// PostgreSQL resolves each time it runs. A client that redefines `p` then runs the new
/// definition.
fn extended_execute_transcript(port: u16) -> Vec<String> {
    let mut a = Wire::connect(port, USER, DB);
    let mut b = Wire::connect(port, USER, DB);
    let mut lines = Vec::new();
    let mut step = |w: &mut Wire, what: &str, parts: Vec<Vec<u8>>| {
        w.send_all(&parts);
        lines.push(format!("{what}: {}", seen(&w.until_ready())));
    };
    step(
        &mut a,
        "a prepares p",
        vec![fe::query("PREPARE p(int) AS SELECT $1 + 100")],
    );
    step(
        &mut b,
        "b prepares p",
        vec![fe::query("PREPARE p(int) AS SELECT $1 + 200")],
    );
    step(
        &mut a,
        "a parses EXECUTE p(1)",
        vec![fe::parse("_pg3_0", "EXECUTE p(1)"), fe::sync()],
    );
    step(
        &mut b,
        "b parses EXECUTE p(1)",
        vec![fe::parse("_pg3_0", "EXECUTE p(1)"), fe::sync()],
    );
    for round in 0..3 {
        step(
            &mut a,
            &format!("a runs it, round {round}"),
            vec![fe::bind_exec("_pg3_0", &[]), fe::sync()],
        );
        step(
            &mut b,
            &format!("b runs it, round {round}"),
            vec![fe::bind_exec("_pg3_0", &[]), fe::sync()],
        );
        // The server forgets every statement: b's own too, which b makes again.
        step(
            &mut b,
            "b forgets the server's statements",
            vec![fe::query("DISCARD ALL")],
        );
        step(
            &mut b,
            "b prepares p again",
            vec![fe::query("PREPARE p(int) AS SELECT $1 + 200")],
        );
        step(
            &mut b,
            "b parses EXECUTE p(1) again",
            vec![fe::parse("_pg3_0", "EXECUTE p(1)"), fe::sync()],
        );
    }
    step(
        &mut a,
        "a redefines p",
        vec![fe::query("DEALLOCATE p; PREPARE p(int) AS SELECT $1 * 1000")],
    );
    step(
        &mut a,
        "a runs the new p",
        vec![fe::bind_exec("_pg3_0", &[]), fe::sync()],
    );
    step(&mut a, "a deallocates p", vec![fe::query("DEALLOCATE p")]);
    step(
        &mut a,
        "a runs it without p",
        vec![fe::bind_exec("_pg3_0", &[]), fe::sync()],
    );
    step(
        &mut a,
        "a prepares p once more",
        vec![fe::query("PREPARE p(int) AS SELECT -$1")],
    );
    step(
        &mut a,
        "unnamed",
        vec![
            fe::parse("", "EXECUTE p(5)"),
            fe::bind("", "", &[]),
            fe::execute(""),
            fe::sync(),
        ],
    );
    step(
        &mut b,
        "b forgets the server's statements",
        vec![fe::query("DISCARD ALL")],
    );
    step(
        &mut a,
        "unnamed again, elsewhere",
        vec![fe::bind("", "", &[]), fe::execute(""), fe::sync()],
    );
    // A statement prepared with SQL, used with the protocol: Bind, Describe, Close.
    step(
        &mut a,
        "a prepares sq",
        vec![fe::query("PREPARE sq(int) AS SELECT $1 * 3 AS n")],
    );
    step(
        &mut b,
        "b forgets the server's statements",
        vec![fe::query("DISCARD ALL")],
    );
    step(&mut a, "a binds sq", vec![fe::bind_exec("sq", &["4"]), fe::sync()]);
    step(
        &mut b,
        "b forgets the server's statements",
        vec![fe::query("DISCARD ALL")],
    );
    step(&mut a, "a describes sq", vec![fe::describe_statement("sq"), fe::sync()]);
    step(&mut a, "a closes sq", vec![fe::close_statement("sq"), fe::sync()]);
    step(&mut a, "sq is gone", vec![fe::query("EXECUTE sq(1)")]);
    // PREPARE and DEALLOCATE through the protocol: unnamed, as JDBC sends a statement...
    let unnamed = |sql: &str| vec![fe::parse("", sql), fe::bind("", "", &[]), fe::execute(""), fe::sync()];
    step(&mut a, "unnamed PREPARE", unnamed("PREPARE ep AS SELECT 'ep'"));
    step(&mut a, "unnamed PREPARE again", unnamed("PREPARE ep AS SELECT 'ep2'"));
    step(
        &mut a,
        "unnamed PREPARE, error in the body",
        unnamed("PREPARE bad AS SELECT * FROM no_such_table"),
    );
    step(
        &mut b,
        "b forgets the server's statements",
        vec![fe::query("DISCARD ALL")],
    );
    step(&mut a, "EXECUTE ep", vec![fe::query("EXECUTE ep")]);
    step(&mut a, "unnamed EXECUTE", unnamed("EXECUTE ep"));
    step(&mut a, "unnamed DEALLOCATE", unnamed("DEALLOCATE ep"));
    step(&mut a, "unnamed DEALLOCATE again", unnamed("DEALLOCATE ep"));
    step(&mut a, "ep is gone", vec![fe::query("EXECUTE ep")]);
    // ... in a pipeline, as psycopg's pipeline mode sends them: each waits for the
    // answers before it.
    step(
        &mut a,
        "pipeline",
        [
            unnamed("PREPARE pp(int) AS SELECT $1 * 5"),
            unnamed("EXECUTE pp(2)"),
            unnamed("PREPARE pp AS SELECT 1"),
            unnamed("DEALLOCATE pp"),
            unnamed("EXECUTE pp(3)"),
        ]
        .into_iter()
        .flat_map(|m| m.into_iter().take(3))
        .chain([fe::sync()])
        .collect(),
    );
    step(
        &mut a,
        "pipeline, redefined",
        [
            unnamed("EXECUTE pp(2)"),
            unnamed("DEALLOCATE pp"),
            unnamed("PREPARE pp(int) AS SELECT $1 * 7"),
            unnamed("EXECUTE pp(3)"),
        ]
        .into_iter()
        .flat_map(|m| m.into_iter().take(3))
        .chain([fe::sync()])
        .collect(),
    );
    step(
        &mut a,
        "pipeline, the last ones skipped",
        [
            unnamed("PREPARE pq AS SELECT 1"),
            unnamed("EXECUTE nope"),
            unnamed("EXECUTE pq"),
        ]
        .into_iter()
        .flat_map(|m| m.into_iter().take(3))
        .chain([fe::sync()])
        .collect(),
    );
    step(&mut a, "pq stayed", vec![fe::query("EXECUTE pq")]);
    // ... and named, as psycopg prepares a statement it runs often.
    step(
        &mut a,
        "named PREPARE, EXECUTE, DEALLOCATE",
        vec![
            fe::parse("_pg3_7", "PREPARE lp(int) AS SELECT $1 + 1"),
            fe::parse("_pg3_8", "EXECUTE lp(41)"),
            fe::parse("_pg3_9", "DEALLOCATE lp"),
            fe::sync(),
        ],
    );
    for round in 0..3 {
        for stmt in ["_pg3_7", "_pg3_8", "_pg3_9", "_pg3_8", "_pg3_9"] {
            step(
                &mut a,
                &format!("{stmt}, round {round}"),
                vec![fe::bind_exec(stmt, &[]), fe::sync()],
            );
        }
        step(
            &mut b,
            "b forgets the server's statements",
            vec![fe::query("DISCARD ALL")],
        );
    }
    a.close();
    b.close();
    lines
}

#[test]
fn execute_prepared_with_the_protocol_as_directly_transaction_mode() {
    compare_with_direct("transaction", nothing, extended_execute_transcript);
}

#[test]
fn execute_prepared_with_the_protocol_as_directly_session_mode() {
    compare_with_direct("session", nothing, extended_execute_transcript);
}

/// A psql script for client `k`: its own statements, one every client has under the same
/// name and text, one every client has under the same name with its own text; each run
/// over many transactions, some in blocks, some of them rolled back, redefined halfway.
fn psql_script(k: usize) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "PREPARE own_{k}(int) AS SELECT $1 + {k}000 AS own;\n\
         PREPARE same(int, text) AS SELECT $1 * 2 AS twice, $2 || '!' AS loud;\n\
         PREPARE mine AS SELECT 'client {k}'::text AS who;\n"
    ));
    for i in 0..30 {
        match i % 5 {
            0 => s.push_str(&format!("EXECUTE own_{k}({i});\n")),
            1 => s.push_str(&format!("EXECUTE same({i}, 'r{i}');\nEXECUTE mine;\n")),
            2 => s.push_str(&format!("BEGIN;\nEXECUTE own_{k}({i});\nEXECUTE mine;\nCOMMIT;\n")),
            3 => s.push_str(&format!(
                "BEGIN;\nEXECUTE same({i}, 'b');\nPREPARE tmp_{i} AS SELECT {i};\nROLLBACK;\nEXECUTE tmp_{i};\n"
            )),
            _ => s.push_str(&format!("EXECUTE own_{k}('x{i}');\nEXECUTE mine(1);\n")),
        }
        if i == 15 {
            s.push_str(&format!(
                "PREPARE mine AS SELECT 'again';\nDEALLOCATE mine;\nEXECUTE mine;\n\
                 PREPARE mine AS SELECT 'client {k}, redefined'::text AS who;\n"
            ));
        }
    }
    s.push_str(&format!(
        "DEALLOCATE ALL;\nEXECUTE own_{k}(1);\nEXECUTE same(1, 'x');\n"
    ));
    s
}

/// Runs `script` with psql on `port`; stdout and stderr together.
fn run_psql(cluster: &PgCluster, port: u16, script: &str, dir: &std::path::Path, k: usize) -> String {
    let file = dir.join(format!("script_{k}.sql"));
    std::fs::write(&file, script).unwrap();
    let out = Command::new(cluster.bin("psql"))
        .args(["-X", "-v", "VERBOSITY=verbose", "-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["-U", USER, "-d", DB, "-f"])
        .arg(&file)
        .env("PGPASSWORD", password(USER))
        .env("PGCONNECT_TIMEOUT", "30")
        .env_remove("PGOPTIONS")
        .output()
        .expect("run psql");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

/// `clients` psql scripts at once through pgsilo, each against what it prints alone on
/// a direct connection. Returns pgsilo's log.
fn psql_scripts(settings: &[(&str, &str)], clients: usize) -> String {
    let cluster = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let direct: Vec<String> = (0..clients)
        .map(|k| run_psql(&cluster, cluster.port(), &psql_script(k), dir.path(), k))
        .collect();
    assert!(direct[0].contains("client 0, redefined"), "{}", direct[0]);
    let mut silo = Pgsilo::start(&cluster, settings);
    let port = silo.port();
    let pooled: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..clients)
            .map(|k| {
                let (cluster, dir) = (&cluster, dir.path());
                s.spawn(move || run_psql(cluster, port, &psql_script(k), dir, k))
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (k, (d, p)) in direct.iter().zip(&pooled).enumerate() {
        if d != p {
            for (dl, pl) in d.lines().zip(p.lines()) {
                if dl != pl {
                    println!("client {k} direct: {dl}\nclient {k} pgsilo: {pl}");
                    break;
                }
            }
            panic!("client {k}: differs from a direct connection:\n{p}");
        }
    }
    silo.assert_alive();
    silo.log()
}

/// Every transaction on a server of its own (server_lifetime under the time a
/// transaction takes): no EXECUTE runs where its PREPARE did.
#[test]
fn psql_scripts_on_servers_that_never_saw_the_prepare() {
    let log = psql_scripts(
        &[
            ("default_pool_size", "2"),
            ("server_lifetime", "0.001"),
            ("server_login_retry", "0"),
        ],
        4,
    );
    let servers = log.matches("new connection to server").count();
    assert!(servers > 100, "{servers} server connections:\n{log}");
}

/// Six clients on two servers with room for two statements each: copies shared, evicted
/// and made again all the time.
#[test]
fn psql_scripts_sharing_servers_with_few_statements_each() {
    psql_scripts(&[("default_pool_size", "2"), ("max_prepared_statements", "2")], 6);
}

fn psycopg_clients(pool: &str, clients: usize) {
    let cluster = PgCluster::start();
    let mut silo = Pgsilo::start(&cluster, &[("default_pool_size", pool)]);
    let conninfo = silo.conninfo(USER, DB);
    let outputs: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..clients)
            .map(|k| {
                let conninfo = conninfo.clone();
                s.spawn(move || run_py("sql_prepare.py", &[&conninfo, &k.to_string(), "12"], 300))
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (k, out) in outputs.iter().enumerate() {
        assert!(out.contains(&format!("client {k}: all ")), "{out}");
    }
    silo.assert_alive();
}

#[test]
fn psycopg_clients_prepare_and_execute_through_execute_pool_of_1() {
    psycopg_clients("1", 4);
}

#[test]
fn psycopg_clients_prepare_and_execute_through_execute_pool_of_2() {
    psycopg_clients("2", 6);
}
