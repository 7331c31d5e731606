//! Client matrix, tokio-postgres (and a raw protocol client for what a driver cannot
//! send): prepared statements shared by several clients over a pool of one, typed
//! parameters, pipelining, COPY in and out (large, streamed, and aborted), statement
//! timeouts and cancels, and the prepared-statement edge cases of transaction pooling.

mod support;

use std::io::Cursor;
use std::time::{Duration, SystemTime};

use futures_util::{future, SinkExt, StreamExt, TryStreamExt};
use support::txpool::{code, fe, runtime, tags, within, Pgsilo, Wire};
use support::PgCluster;
use tokio_postgres::types::Type;

const USER: &str = "scram_user";
const DB: &str = "app_db";

/// Several clients, one server. Each prepares a statement all share (same SQL) and one of
/// its own, in different orders, then uses both across many transactions, interleaved.
/// (tokio-postgres numbers statements process-wide, so its names never collide between
/// clients; colliding names with different SQL are covered by
/// `same_statement_names_different_sql_across_clients`.)
#[test]
fn prepared_statements_reused_across_transactions_on_a_pool_of_one() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    runtime().block_on(async {
        let mut clients = Vec::new();
        for i in 0..5i32 {
            let c = silo.connect(USER, DB).await;
            let own_sql = format!("SELECT $1::int4 * 1000 + {i}, $2::text || '-client{i}'");
            let shared_sql = "SELECT $1::int8 * 2";
            let (shared, own) = if i % 2 == 0 {
                let own = c.prepare(&own_sql).await.unwrap();
                (c.prepare(shared_sql).await.unwrap(), own)
            } else {
                let shared = c.prepare(shared_sql).await.unwrap();
                (shared, c.prepare(&own_sql).await.unwrap())
            };
            clients.push((i, c, shared, own));
        }
        let work = clients.iter_mut().map(|(i, c, shared, own)| async move {
            let i = *i;
            for round in 0..30i32 {
                let n = i64::from(round * 7 + i);
                let row = c.query_one(&*shared, &[&n]).await.unwrap();
                assert_eq!(row.get::<_, i64>(0), n * 2, "client {i} round {round}");
                let row = c.query_one(&*own, &[&round, &format!("r{round}")]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), round * 1000 + i);
                assert_eq!(row.get::<_, String>(1), format!("r{round}-client{i}"));
                if round % 5 == 0 {
                    // Inside an explicit transaction too.
                    let tx = c.transaction().await.unwrap();
                    let a: i64 = tx.query_one(&*shared, &[&n]).await.unwrap().get(0);
                    let b: i32 = tx.query_one(&*own, &[&1i32, &"t"]).await.unwrap().get(0);
                    tx.commit().await.unwrap();
                    assert_eq!((a, b), (n * 2, 1000 + i));
                }
                tokio::task::yield_now().await;
            }
        });
        within(120, "clients", future::join_all(work)).await;
        // One server did all of it.
        let c = silo.connect(USER, DB).await;
        let servers: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'",
                &[&USER],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(servers, 1);
    });
}

/// Two clients use the same statement names for different SQL on one server, and close
/// and re-prepare them; each always gets its own statement's result.
#[test]
fn same_statement_names_different_sql_across_clients() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut a = Wire::connect(silo.port(), USER, DB);
    let mut b = Wire::connect(silo.port(), USER, DB);
    for (w, k) in [(&mut a, "1"), (&mut b, "2")] {
        w.send_all(&[
            fe::parse("s0", &format!("SELECT {k}::int")),
            fe::parse("s1", &format!("SELECT $1::int + {k}0")),
            fe::sync(),
        ]);
        assert_eq!(tags(&w.until_ready()), "11Z");
    }
    for round in 0..20 {
        for (w, k) in [(&mut a, 1), (&mut b, 2)] {
            w.send_all(&[
                fe::bind_exec("s0", &[]),
                fe::bind_exec("s1", &[&round.to_string()]),
                fe::sync(),
            ]);
            let m = w.until_ready();
            assert_eq!(tags(&m), "2DC2DCZ", "round {round}");
            assert_eq!(m[1].first_value().unwrap(), k.to_string());
            assert_eq!(m[4].first_value().unwrap(), (round + k * 10).to_string());
        }
    }
    // a closes s0 and makes it something else; b's s0 is untouched.
    a.send_all(&[
        fe::close_statement("s0"),
        fe::parse("s0", "SELECT 'new'::text"),
        fe::bind_exec("s0", &[]),
        fe::sync(),
    ]);
    let m = a.until_ready();
    assert_eq!(tags(&m), "312DCZ");
    assert_eq!(m[3].first_value().unwrap(), "new");
    b.send_all(&[fe::bind_exec("s0", &[]), fe::sync()]);
    let m = b.until_ready();
    assert_eq!(m[1].first_value().unwrap(), "2");
    a.close();
    b.close();
}

#[test]
fn typed_parameters_round_trip() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    runtime().block_on(async {
        let c1 = silo.connect(USER, DB).await;
        let c2 = silo.connect(USER, DB).await;
        for c in [&c1, &c2] {
            let when = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
            let bytes: Vec<u8> = (0..=255u8).collect();
            let ints = vec![1i32, -2, 3];
            let texts = vec!["a".to_string(), "b c".to_string(), "ü".to_string()];
            let row = c
                .query_one(
                    "SELECT $1::int4 + 1, $2::int8 * 2, $3::text || '!', $4::bytea, $5::float8 / 2, \
                            NOT $6::bool, $7::timestamptz + interval '1 second', \
                            ($8::text::numeric * 3)::text, $9::int4[], $10::text[]",
                    &[
                        &41i32,
                        &(1i64 << 40),
                        &"héllo",
                        &bytes,
                        &3.5f64,
                        &false,
                        &when,
                        &"12345678901234567890.123",
                        &ints,
                        &texts,
                    ],
                )
                .await
                .unwrap();
            assert_eq!(row.get::<_, i32>(0), 42);
            assert_eq!(row.get::<_, i64>(1), 1i64 << 41);
            assert_eq!(row.get::<_, String>(2), "héllo!");
            assert_eq!(row.get::<_, Vec<u8>>(3), bytes);
            assert_eq!(row.get::<_, f64>(4), 1.75);
            assert!(row.get::<_, bool>(5));
            assert_eq!(row.get::<_, SystemTime>(6), when + Duration::from_secs(1));
            assert_eq!(row.get::<_, String>(7), "37037036703703703670.369");
            assert_eq!(row.get::<_, Vec<i32>>(8), ints);
            assert_eq!(row.get::<_, Vec<String>>(9), texts);
            // NULLs, and an explicitly typed unnamed statement.
            let row = c
                .query_typed_one(
                    "SELECT $1::int4 IS NULL, $2",
                    &[(&None::<i32>, Type::INT4), (&"typed", Type::TEXT)],
                )
                .await
                .unwrap();
            assert!(row.get::<_, bool>(0));
            assert_eq!(row.get::<_, String>(1), "typed");
        }
    });
}

/// tokio-postgres pipelines requests whose futures are polled together: many Syncs in
/// flight at once on a shared server.
#[test]
fn pipelined_queries() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    runtime().block_on(async {
        let a = silo.connect(USER, DB).await;
        let b = silo.connect(USER, DB).await;
        let stmt_a = a.prepare("SELECT $1::int4 * 3").await.unwrap();
        let stmt_b = b.prepare("SELECT $1::int4 * 5, pg_sleep(0.001)").await.unwrap();
        for _round in 0..5 {
            let fa = future::try_join_all((0..50i32).map(|i| {
                let a = &a;
                let s = &stmt_a;
                async move { a.query_one(s, &[&i]).await.map(|r| r.get::<_, i32>(0)) }
            }));
            let fb = future::try_join_all((0..50i32).map(|i| {
                let b = &b;
                let s = &stmt_b;
                async move { b.query_one(s, &[&i]).await.map(|r| r.get::<_, i32>(0)) }
            }));
            let (ra, rb) = within(60, "pipelines", future::try_join(fa, fb)).await.unwrap();
            assert_eq!(ra, (0..50).map(|i| i * 3).collect::<Vec<_>>());
            assert_eq!(rb, (0..50).map(|i| i * 5).collect::<Vec<_>>());
        }
        // Unprepared queries pipelined: each is Parse/Describe/Sync, then Bind/Execute
        // and a Close of the statement.
        let r = future::try_join_all((0..20i32).map(|i| {
            let a = &a;
            async move {
                a.query_one(&format!("SELECT {i} + $1::int4"), &[&i])
                    .await
                    .map(|r| r.get::<_, i32>(0))
            }
        }))
        .await
        .unwrap();
        assert_eq!(r, (0..20).map(|i| 2 * i).collect::<Vec<_>>());
        // A deep pipeline: thousands of requests in flight, more than socket buffers hold.
        let r = within(
            120,
            "deep pipeline",
            future::try_join_all((0..3000i32).map(|i| {
                let a = &a;
                let s = &stmt_a;
                async move { a.query_one(s, &[&i]).await.map(|r| r.get::<_, i32>(0)) }
            })),
        )
        .await
        .unwrap();
        assert_eq!(r, (0..3000).map(|i| i * 3).collect::<Vec<_>>());
    });
}

#[test]
fn copy_in_and_out() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    cluster.psql(DB, "CREATE TABLE copied (id int, name text, data bytea)");
    cluster.psql(DB, "GRANT ALL ON copied TO PUBLIC");
    runtime().block_on(async {
        let a = silo.connect(USER, DB).await;
        let b = silo.connect(USER, DB).await;
        // Copy in through a sink, in several chunks, while another client uses the pool.
        let sink = a.copy_in("COPY copied (id, name, data) FROM STDIN").await.unwrap();
        let mut sink = Box::pin(sink);
        for chunk in 0..10 {
            let mut text = String::new();
            for i in 0..100 {
                let id = chunk * 100 + i;
                text.push_str(&format!("{id}\tname {id}\t\\\\x{:02x}ff\n", id % 256));
            }
            sink.send(Cursor::new(text.into_bytes())).await.unwrap();
        }
        let n = sink.as_mut().finish().await.unwrap();
        assert_eq!(n, 1000);
        let other: i64 = b.query_one("SELECT count(*) FROM copied", &[]).await.unwrap().get(0);
        assert_eq!(other, 1000);

        // Copy out.
        let stream = a
            .copy_out("COPY (SELECT id, name FROM copied ORDER BY id) TO STDOUT")
            .await
            .unwrap();
        let chunks: Vec<_> = stream.try_collect().await.unwrap();
        let text: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let text = String::from_utf8(text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert_eq!(lines[0], "0\tname 0");
        assert_eq!(lines[999], "999\tname 999");

        // Copy out in binary, while b runs copies in as well.
        let (out, copied_in) = future::join(
            async {
                let s = a.copy_out("COPY copied TO STDOUT (FORMAT binary)").await.unwrap();
                s.try_fold(0usize, |n, c| async move { Ok(n + c.len()) }).await.unwrap()
            },
            async {
                let mut total = 0;
                for i in 0..5 {
                    let sink = b.copy_in("COPY copied (id) FROM STDIN").await.unwrap();
                    let mut sink = Box::pin(sink);
                    sink.send(Cursor::new(format!("{}\n", 5000 + i).into_bytes()))
                        .await
                        .unwrap();
                    total += sink.as_mut().finish().await.unwrap();
                }
                total
            },
        )
        .await;
        assert!(out > 1000 * 10, "binary copy out: {out} bytes");
        assert_eq!(copied_in, 5);
        let n: i64 = a.query_one("SELECT count(*) FROM copied", &[]).await.unwrap().get(0);
        assert_eq!(n, 1005);
    });
}

/// A client abandons COPY FROM STDIN (tokio-postgres sends CopyFail when the sink is
/// dropped unfinished): nothing is copied, and the connection and the pool still work.
#[test]
fn aborted_copy_in_leaves_connection_usable() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    cluster.psql(DB, "CREATE TABLE aborted (x int); GRANT ALL ON aborted TO PUBLIC");
    runtime().block_on(async {
        let a = silo.connect(USER, DB).await;
        let b = silo.connect(USER, DB).await;
        for round in 0..3 {
            let sink = a.copy_in("COPY aborted FROM STDIN").await.unwrap();
            let mut sink = Box::pin(sink);
            sink.send(Cursor::new(b"1\n2\n3\n".to_vec())).await.unwrap();
            drop(sink);
            let v: i32 = within(30, "query after CopyFail", a.query_one("SELECT 7", &[]))
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e:?}"))
                .get(0);
            assert_eq!(v, 7);
            let n: i64 = within(30, "other client", b.query_one("SELECT count(*) FROM aborted", &[]))
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 0);
        }
        // A COPY inside a transaction, aborted: the transaction is failed, and ROLLBACK
        // ends it.
        a.batch_execute("BEGIN").await.unwrap();
        let sink = a
            .copy_in::<_, Cursor<Vec<u8>>>("COPY aborted FROM STDIN")
            .await
            .unwrap();
        drop(sink);
        let e = a.query_one("SELECT 1", &[]).await.unwrap_err();
        assert_eq!(code(&e), "25P02");
        a.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(a.query_one("SELECT 8", &[]).await.unwrap().get::<_, i32>(0), 8);
        assert_eq!(b.query_one("SELECT 9", &[]).await.unwrap().get::<_, i32>(0), 9);
        // A server-side COPY error (bad data) mid-stream.
        let sink = a.copy_in("COPY aborted FROM STDIN").await.unwrap();
        let mut sink = Box::pin(sink);
        let _ = sink.send(Cursor::new(b"1\nnot a number\n".to_vec())).await;
        let e = sink.as_mut().finish().await.unwrap_err();
        assert_eq!(code(&e), "22P02");
        assert_eq!(a.query_one("SELECT 10", &[]).await.unwrap().get::<_, i32>(0), 10);
    });
}

/// More than 100 MB through COPY FROM STDIN: pgsilo streams it, its peak memory stays
/// a small fraction of the data.
#[test]
fn large_copy_in_streams_with_bounded_memory() {
    const ROW: usize = 4000;
    const ROWS: usize = 28_000; // 112 MB of row data (compressible: small on disk)
                                // Measured: about 7 MB (debug build), before and after; the bound leaves ample margin
                                // while staying far below the data size.
    const LIMIT: u64 = 32 << 20;
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    cluster.psql(
        DB,
        "CREATE UNLOGGED TABLE big (id int, payload text); GRANT ALL ON big TO PUBLIC",
    );
    let before = silo.peak_rss();
    runtime().block_on(async {
        let a = silo.connect(USER, DB).await;
        let b = silo.connect(USER, DB).await;
        let sink = a.copy_in("COPY big FROM STDIN").await.unwrap();
        let mut sink = Box::pin(sink);
        let payload: String = "0123456789abcdef".repeat(ROW / 16);
        let mut chunk = String::with_capacity(1 << 20);
        let mut sent = 0usize;
        for id in 0..ROWS {
            chunk.push_str(&id.to_string());
            chunk.push('\t');
            chunk.push_str(&payload);
            chunk.push('\n');
            if chunk.len() >= 256 * 1024 || id == ROWS - 1 {
                sent += chunk.len();
                sink.send(Cursor::new(std::mem::take(&mut chunk).into_bytes()))
                    .await
                    .unwrap();
                chunk.reserve(1 << 20);
            }
        }
        let n = within(600, "large COPY", sink.as_mut().finish()).await.unwrap();
        assert_eq!(n as usize, ROWS);
        assert!(sent > 100 << 20, "sent only {sent} bytes");
        let row = b
            .query_one("SELECT count(*), sum(length(payload))::int8 FROM big", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0) as usize, ROWS);
        assert_eq!(row.get::<_, i64>(1) as usize, ROWS * ROW);
        println!(
            "COPY IN of {} MB: pgsilo peak RSS {} MB before, {} MB after (limit {} MB)",
            sent >> 20,
            before >> 20,
            silo.peak_rss() >> 20,
            LIMIT >> 20
        );
    });
    let peak = silo.peak_rss();
    assert!(
        peak < LIMIT,
        "pgsilo's peak RSS {} MB: COPY data is buffered, not streamed",
        peak >> 20
    );
}

/// A statement timeout inside a transaction (57014), then the server goes back clean.
#[test]
fn statement_timeout_in_transaction_leaves_pool_clean() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    runtime().block_on(async {
        let mut a = silo.connect(USER, DB).await;
        let b = silo.connect(USER, DB).await;
        for _ in 0..3 {
            let tx = a.transaction().await.unwrap();
            tx.batch_execute("SET statement_timeout = '200ms'").await.unwrap();
            let e = within(30, "timed-out statement", tx.query_one("SELECT pg_sleep(5)", &[]))
                .await
                .unwrap_err();
            assert_eq!(code(&e), "57014");
            let e = tx.query_one("SELECT 1", &[]).await.unwrap_err();
            assert_eq!(code(&e), "25P02");
            tx.rollback().await.unwrap();
            // The setting went with the transaction, for both clients.
            for c in [&a, &b] {
                let row = c
                    .query_one("SELECT current_setting('statement_timeout'), pg_sleep(0.3)::text", &[])
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, String>(0), "0");
            }
        }
        // The same inside a pipeline: the timeout fails one request, its neighbours run.
        let (r1, r2, r3) = within(
            30,
            "pipeline",
            future::join3(
                a.batch_execute("SET LOCAL statement_timeout = '100ms'"),
                a.query_one("SELECT pg_sleep(0.1)::text", &[]),
                a.query_one("SELECT 3", &[]),
            ),
        )
        .await;
        r1.unwrap();
        r2.unwrap();
        assert_eq!(r3.unwrap().get::<_, i32>(0), 3);
        idle_in_transaction_is_zero(&b).await;
    });
}

async fn idle_in_transaction_is_zero(c: &tokio_postgres::Client) {
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "servers left idle in transaction");
}

/// A cancel request (through pgsilo's cancel key) hits the running query of a pipeline;
/// the requests after it run, and the next queries see no leftover state.
#[test]
fn cancel_in_a_pipeline() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    runtime().block_on(async {
        let a = silo.connect(USER, DB).await;
        let b = silo.connect(USER, DB).await;
        let token = a.cancel_token();
        for round in 0..3 {
            let sleeper = a.query_one("SELECT pg_sleep(20)", &[]);
            let after = a.query_one("SELECT 42", &[]);
            let canceller = async {
                // Wait until the sleep really runs on the server.
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                loop {
                    let n: i64 = cluster_sleepers(cluster.port(), "SELECT pg_sleep(20)%").await;
                    if n > 0 {
                        break;
                    }
                    assert!(std::time::Instant::now() < deadline, "pg_sleep never started");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                token.cancel_query(tokio_postgres::NoTls).await.unwrap();
            };
            let (r1, r2, ()) = within(60, "cancelled pipeline", future::join3(sleeper, after, canceller)).await;
            let e = r1.unwrap_err();
            assert_eq!(code(&e), "57014", "round {round}");
            assert_eq!(r2.unwrap().get::<_, i32>(0), 42);
            assert_eq!(a.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
            idle_in_transaction_is_zero(&b).await;
        }
    });
}

/// Sessions running the test's pg_sleep, asked of the cluster directly (a client of the
/// pool would wait for the sleeping server).
async fn cluster_sleepers(cluster_port: u16, like: &str) -> i64 {
    let (c, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={cluster_port} user=postgres dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND state = 'active'",
        &[&like],
    )
    .await
    .unwrap()
    .get(0)
}

// ---------------------------------------------------------------------------------------
// Prepared-statement edge cases, on the raw protocol
// ---------------------------------------------------------------------------------------

fn exec(w: &mut Wire, stmt: &str, params: &[&str]) -> String {
    w.send_all(&[fe::bind_exec(stmt, params), fe::sync()]);
    let m = w.until_ready();
    if let Some(e) = m.iter().find(|m| m.tag == b'E') {
        panic!("execute {stmt}: {:?} {:?}", e.field(b'C'), e.field(b'M'));
    }
    m.iter().find_map(|m| m.first_value()).expect("a row")
}

fn prepare(w: &mut Wire, name: &str, sql: &str) {
    w.send_all(&[fe::parse(name, sql), fe::sync()]);
    let m = w.until_ready();
    assert_eq!(
        tags(&m),
        "1Z",
        "prepare {name}: {:?}",
        m.first().and_then(|m| m.field(b'M'))
    );
}

#[test]
fn deallocate_all_and_discard_all_reset_the_clients_statements() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut w = Wire::connect(silo.port(), USER, DB);
    let mut other = Wire::connect(silo.port(), USER, DB);
    prepare(&mut other, "keep", "SELECT 'other'::text");
    for reset in ["DEALLOCATE ALL", "DISCARD ALL", "deallocate all"] {
        prepare(&mut w, "x", "SELECT 1");
        prepare(&mut w, "y", "SELECT 'y'::text");
        assert_eq!(exec(&mut w, "x", &[]), "1");
        w.send(&fe::query(reset));
        let m = w.until_ready();
        assert_eq!(tags(&m), "CZ", "{reset}");
        // The names are free again, and the old statements are gone for this client.
        w.send_all(&[fe::bind_exec("y", &[]), fe::sync()]);
        let m = w.until_ready();
        let e = m.iter().find(|m| m.tag == b'E').expect("y must be gone");
        assert_eq!(e.field(b'C').unwrap(), "26000", "{reset}");
        prepare(&mut w, "x", "SELECT 2");
        assert_eq!(exec(&mut w, "x", &[]), "2");
        w.send_all(&[fe::close_statement("x"), fe::sync()]);
        assert_eq!(tags(&w.until_ready()), "3Z");
        // The other client's statement survived the reset of the shared server.
        assert_eq!(exec(&mut other, "keep", &[]), "other");
    }
}

/// DEALLOCATE ALL pipelined with Parse messages: PostgreSQL runs them in order, so a name
/// prepared before it is free again after it, and one prepared after it stays.
#[test]
fn deallocate_all_pipelined_with_parse() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut w = Wire::connect(silo.port(), USER, DB);
    // A statement prepared after DEALLOCATE ALL in the same write survives it.
    w.send_all(&[
        fe::query("DEALLOCATE ALL"),
        fe::parse("after", "SELECT 'after'::text"),
        fe::bind_exec("after", &[]),
        fe::sync(),
    ]);
    assert_eq!(tags(&w.until_ready()), "CZ");
    let m = w.until_ready();
    assert_eq!(tags(&m), "12DCZ");
    // pgsilo's record of the server's statements must agree with the server: another
    // client preparing the same SQL gets it (not "pgsilo_... already exists").
    let mut other = Wire::connect(silo.port(), USER, DB);
    prepare(&mut other, "mine", "SELECT 'after'::text");
    assert_eq!(exec(&mut other, "mine", &[]), "after");
    assert_eq!(exec(&mut w, "after", &[]), "after");
    // A name prepared before DEALLOCATE ALL is free after it.
    w.send_all(&[
        fe::parse("z", "SELECT 'z1'::text"),
        fe::sync(),
        fe::query("DEALLOCATE ALL"),
        fe::parse("z", "SELECT 'z2'::text"),
        fe::bind_exec("z", &[]),
        fe::sync(),
    ]);
    assert_eq!(tags(&w.until_ready()), "1Z");
    assert_eq!(tags(&w.until_ready()), "CZ");
    let m = w.until_ready();
    assert_eq!(tags(&m), "12DCZ", "{:?}", m[0].field(b'M'));
    assert_eq!(m[2].first_value().unwrap(), "z2");
}

#[test]
fn duplicate_parse_name_is_an_error_and_the_connection_goes_on() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut w = Wire::connect(silo.port(), USER, DB);
    prepare(&mut w, "dup", "SELECT 'first'::text");
    // Same name again, different SQL: 42P05, the rest up to Sync is skipped.
    w.send_all(&[
        fe::parse("dup", "SELECT 'second'::text"),
        fe::bind_exec("dup", &[]),
        fe::sync(),
    ]);
    let m = w.until_ready();
    assert_eq!(tags(&m), "EZ");
    assert_eq!(m[0].field(b'C').unwrap(), "42P05");
    assert!(m[0].field(b'M').unwrap().contains("\"dup\" already exists"));
    assert_eq!(exec(&mut w, "dup", &[]), "first");
    // Both in one pipeline segment: the first succeeds, the second fails.
    w.send_all(&[
        fe::parse("twice", "SELECT 1"),
        fe::parse("twice", "SELECT 1"),
        fe::sync(),
        fe::bind_exec("twice", &[]),
        fe::sync(),
    ]);
    let m = w.until_ready();
    assert_eq!(tags(&m), "1EZ");
    assert_eq!(m[1].field(b'C').unwrap(), "42P05");
    let m = w.until_ready();
    assert_eq!(tags(&m), "2DCZ");
    // A SQL-level PREPARE of a name the protocol level took: PostgreSQL's namespace is
    // per session, pgsilo's names differ, so this simply works on the server.
    w.send(&fe::query("SELECT 5"));
    assert_eq!(tags(&w.until_ready()), "TDCZ");
}

#[test]
fn close_then_reparse_with_different_sql() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut w = Wire::connect(silo.port(), USER, DB);
    let mut other = Wire::connect(silo.port(), USER, DB);
    for i in 0..5 {
        prepare(&mut w, "c", &format!("SELECT {i}"));
        assert_eq!(exec(&mut w, "c", &[]), i.to_string());
        // Another client prepares the same SQL under the same name meanwhile.
        prepare(&mut other, "c", &format!("SELECT {i}"));
        w.send_all(&[fe::close_statement("c"), fe::sync()]);
        assert_eq!(tags(&w.until_ready()), "3Z");
        assert_eq!(exec(&mut other, "c", &[]), i.to_string());
        other.send_all(&[fe::close_statement("c"), fe::sync()]);
        assert_eq!(tags(&other.until_ready()), "3Z");
    }
    // Close of a name that does not exist is not an error (as in PostgreSQL).
    w.send_all(&[fe::close_statement("nothing"), fe::sync()]);
    assert_eq!(tags(&w.until_ready()), "3Z");
    // Close and re-Parse in the same pipeline.
    prepare(&mut w, "d", "SELECT 'old'::text");
    w.send_all(&[
        fe::close_statement("d"),
        fe::parse("d", "SELECT 'new'::text"),
        fe::describe_statement("d"),
        fe::bind_exec("d", &[]),
        fe::sync(),
    ]);
    let m = w.until_ready();
    assert_eq!(tags(&m), "31tT2DCZ");
    assert_eq!(m[5].first_value().unwrap(), "new");
}

#[test]
fn more_statements_than_max_prepared_statements() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(
        &cluster,
        &[("default_pool_size", "1"), ("max_prepared_statements", "3")],
    );
    let mut a = Wire::connect(silo.port(), USER, DB);
    let mut b = Wire::connect(silo.port(), USER, DB);
    for i in 0..10 {
        prepare(&mut a, &format!("a{i}"), &format!("SELECT {i} + $1::int"));
        prepare(&mut b, &format!("b{i}"), &format!("SELECT {i} * 100 + $1::int"));
    }
    for round in 0..5 {
        for i in 0..10 {
            let r = round.to_string();
            assert_eq!(exec(&mut a, &format!("a{i}"), &[&r]), (i + round).to_string());
            assert_eq!(exec(&mut b, &format!("b{i}"), &[&r]), (i * 100 + round).to_string());
        }
        // All ten in one pipeline segment (more than the server may hold at once).
        let mut msgs = Vec::new();
        for i in 0..10 {
            msgs.push(fe::bind_exec(&format!("a{i}"), &[&round.to_string()]));
        }
        msgs.push(fe::sync());
        a.send_all(&msgs);
        let m = a.until_ready();
        let values: Vec<String> = m.iter().filter_map(|m| m.first_value()).collect();
        assert_eq!(
            values,
            (0..10).map(|i| (i + round).to_string()).collect::<Vec<_>>(),
            "{}",
            tags(&m)
        );
    }
    // The server holds at most 3 of pgsilo's statements.
    let n = cluster.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'scram_user' AND backend_type = 'client backend'",
    );
    assert_eq!(n, "1");
    let mut probe = Wire::connect(silo.port(), USER, DB);
    let held = probe.value("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgsilo_%'");
    assert!(held.parse::<u32>().unwrap() <= 3, "server holds {held} statements");
}

/// Errors inside a pipeline of several Syncs: only the failed segment is skipped, and
/// pgsilo's bookkeeping (statements, response counts) stays right for what follows.
#[test]
fn error_in_a_pipeline_of_several_syncs() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut w = Wire::connect(silo.port(), USER, DB);
    let mut other = Wire::connect(silo.port(), USER, DB);
    w.send_all(&[
        // 1: fine
        fe::parse("p1", "SELECT 1"),
        fe::bind_exec("p1", &[]),
        fe::sync(),
        // 2: fails at execution (division by zero); the statement itself is fine. The
        // volatile term keeps the planner from folding the division at Bind.
        fe::parse("p2", "SELECT 1 / ($1::int + (random() * 0)::int)"),
        fe::bind_exec("p2", &["0"]),
        fe::parse("p_skipped", "SELECT 'skipped'::text"),
        fe::bind_exec("p1", &[]),
        fe::sync(),
        // 3: fails at Parse (syntax error): its name stays free
        fe::parse("p3", "SELEC 3"),
        fe::bind_exec("p3", &[]),
        fe::sync(),
        // 4: fine, uses p1 and p2
        fe::bind_exec("p1", &[]),
        fe::bind_exec("p2", &["1"]),
        fe::sync(),
        // 5: a simple query error
        fe::query("SELECT * FROM no_such_table"),
        // 6: fine
        fe::parse("p4", "SELECT 'four'::text"),
        fe::bind_exec("p4", &[]),
        fe::sync(),
    ]);
    let seg1 = w.until_ready();
    assert_eq!(tags(&seg1), "12DCZ");
    let seg2 = w.until_ready();
    assert_eq!(tags(&seg2), "12EZ");
    assert_eq!(seg2[2].field(b'C').unwrap(), "22012");
    let seg3 = w.until_ready();
    assert_eq!(tags(&seg3), "EZ");
    assert_eq!(seg3[0].field(b'C').unwrap(), "42601");
    let seg4 = w.until_ready();
    assert_eq!(tags(&seg4), "2DC2DCZ");
    let seg5 = w.until_ready();
    assert_eq!(tags(&seg5), "EZ");
    let seg6 = w.until_ready();
    assert_eq!(tags(&seg6), "12DCZ");
    assert_eq!(seg6[2].first_value().unwrap(), "four");
    // The skipped Parse never happened; the failed one left its name free.
    w.send_all(&[fe::bind_exec("p_skipped", &[]), fe::sync()]);
    let m = w.until_ready();
    assert_eq!(m[0].field(b'C').as_deref(), Some("26000"), "{}", tags(&m));
    prepare(&mut w, "p3", "SELECT 3");
    prepare(&mut w, "p_skipped", "SELECT 'now'::text");
    // The pool keeps working for everyone, with the right statements.
    for _ in 0..5 {
        assert_eq!(exec(&mut w, "p1", &[]), "1");
        assert_eq!(exec(&mut w, "p3", &[]), "3");
        assert_eq!(exec(&mut w, "p_skipped", &[]), "now");
        assert_eq!(other.value("SELECT 'other'"), "other");
    }
    assert_eq!(
        other.value("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"),
        "0"
    );
}

/// A large COPY TO STDOUT read chunk by chunk, then the connection goes on.
#[test]
fn copy_out_read_chunk_by_chunk() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    runtime().block_on(async {
        let a = silo.connect(USER, DB).await;
        let stream = a
            .copy_out("COPY (SELECT g FROM generate_series(1, 100000) g) TO STDOUT")
            .await
            .unwrap();
        let mut stream = Box::pin(stream);
        let mut lines = 0;
        while let Some(chunk) = stream.next().await {
            lines += chunk.unwrap().iter().filter(|&&b| b == b'\n').count();
        }
        assert_eq!(lines, 100_000);
        assert_eq!(a.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    });
}

/// Values of many megabytes through a renamed prepared statement: the Bind streams after
/// its rewritten prefix, the DataRow streams back.
#[test]
fn large_values_through_prepared_statements() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    runtime().block_on(async {
        let a = silo.connect(USER, DB).await;
        let b = silo.connect(USER, DB).await;
        let stmt = a
            .prepare("SELECT $1::bytea, length($1::bytea), md5($1::bytea)")
            .await
            .unwrap();
        for size in [1usize << 20, 20 << 20] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let row = within(120, "large bind", a.query_one(&stmt, &[&data])).await.unwrap();
            assert_eq!(row.get::<_, i32>(1) as usize, size);
            assert_eq!(row.get::<_, Vec<u8>>(0), data);
            let n: i64 = b.query_one("SELECT 1::int8", &[]).await.unwrap().get(0);
            assert_eq!(n, 1);
        }
        // A large text value back from a simple query too.
        let rows = a.simple_query("SELECT repeat('x', 30000000)").await.unwrap();
        let len = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::len),
                _ => None,
            })
            .unwrap();
        assert_eq!(len, 30_000_000);
    });
    assert!(silo.peak_rss() < 200 << 20, "peak RSS {} MB", silo.peak_rss() >> 20);
}

/// Parse/Describe answered after a Flush, before any Sync (as asyncpg and others do),
/// also when pgsilo answers the Parse itself because the server already has the statement.
#[test]
fn flush_before_sync() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut other = Wire::connect(silo.port(), USER, DB);
    prepare(&mut other, "o", "SELECT $1::int + 1");
    let mut w = Wire::connect(silo.port(), USER, DB);
    for (name, sql) in [("fresh", "SELECT $1::int + 2"), ("known", "SELECT $1::int + 1")] {
        w.send_all(&[fe::parse(name, sql), fe::describe_statement(name), fe::flush()]);
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(w.recv());
        }
        assert_eq!(tags(&got), "1tT", "{name}");
        w.send_all(&[fe::bind_exec(name, &["40"]), fe::sync()]);
        let m = w.until_ready();
        assert_eq!(tags(&m), "2DCZ", "{name}");
        let want = if name == "fresh" { "42" } else { "41" };
        assert_eq!(m[1].first_value().unwrap(), want);
    }
    assert_eq!(exec(&mut other, "o", &["1"]), "2");
}

/// Execute with a row limit (PortalSuspended) inside a transaction, resumed over several
/// round trips.
#[test]
fn portal_suspended_and_resumed() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut w = Wire::connect(silo.port(), USER, DB);
    let mut other = Wire::connect(silo.port(), USER, DB);
    w.send(&fe::query("BEGIN"));
    assert_eq!(tags(&w.until_ready()), "CZ");
    prepare(&mut w, "series", "SELECT generate_series(1, 10)");
    let exec_limited = |w: &mut Wire, first: bool| {
        let mut msgs = Vec::new();
        if first {
            msgs.push(fe::bind("p1", "series", &[]));
        }
        let mut e = fe::execute("p1");
        let n = e.len();
        e[n - 4..].copy_from_slice(&4i32.to_be_bytes());
        msgs.push(e);
        msgs.push(fe::sync());
        w.send_all(&msgs);
        w.until_ready()
    };
    let m = exec_limited(&mut w, true);
    assert_eq!(tags(&m), "2DDDDsZ");
    let m = exec_limited(&mut w, false);
    assert_eq!(tags(&m), "DDDDsZ");
    let m = exec_limited(&mut w, false);
    assert_eq!(tags(&m), "DDCZ");
    assert_eq!(m[1].first_value().unwrap(), "10");
    w.send(&fe::query("COMMIT"));
    assert_eq!(tags(&w.until_ready()), "CZ");
    assert_eq!(other.value("SELECT 'after'"), "after");
}

/// client_encoding is a reported setting each client keeps: the same text arrives in
/// each client's encoding.
#[test]
fn client_encoding_per_client() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut latin = Wire::connect_with(silo.port(), USER, DB, &[("client_encoding", "LATIN1")]);
    let mut utf8 = Wire::connect_with(silo.port(), USER, DB, &[("client_encoding", "UTF8")]);
    let mut set_later = Wire::connect(silo.port(), USER, DB);
    set_later.send(&fe::query("SET client_encoding = 'LATIN1'"));
    assert_eq!(tags(&set_later.until_ready()), "CZ");
    for _ in 0..3 {
        for (w, want) in [
            (&mut latin, vec![0xe9u8]),
            (&mut utf8, vec![0xc3, 0xa9]),
            (&mut set_later, vec![0xe9]),
        ] {
            w.send(&fe::query("SELECT chr(233)"));
            let m = w.until_ready();
            let row = m.iter().find(|m| m.tag == b'D').expect("row");
            assert_eq!(&row.body[6..], &want[..], "{}", tags(&m));
        }
    }
}

/// What a client sees for a batch: each message's type, with the SQLSTATE of errors and
/// the first value of rows.
fn transcript(w: &mut Wire, batch: &[Vec<u8>], syncs: usize) -> Vec<String> {
    w.send_all(batch);
    let mut seen = Vec::new();
    for _ in 0..syncs {
        for m in w.until_ready() {
            seen.push(match m.tag {
                b'E' => format!("E{}", m.field(b'C').unwrap_or_default()),
                b'D' => format!("D{}", m.first_value().unwrap_or_default()),
                b'Z' => format!("Z{}", m.body[0] as char),
                t => (t as char).to_string(),
            });
        }
    }
    seen
}

/// Message sequences at the edges of the protocol give exactly what PostgreSQL gives
/// directly, although pgsilo renames statements and answers some messages itself (the
/// server already has the statement from another client).
#[test]
fn protocol_edge_cases_match_postgres() {
    use fe::*;
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    // Every statement text below is already prepared on the server by another client, so
    // pgsilo answers Parse messages itself where it can.
    let mut other = Wire::connect(silo.port(), USER, DB);
    for (i, sql) in ["SELECT 1", "SELECT 2", "SELECT $1::int"].iter().enumerate() {
        prepare(&mut other, &format!("o{i}"), sql);
    }
    let cases: Vec<Case> = vec![
        ("BEGIN", vec![query("BEGIN")], 1),
        ("fail the transaction", vec![query("SELECT 1/0")], 1),
        (
            "Parse in the failed transaction (one round trip each)",
            vec![parse("k", "SELECT 1"), sync()],
            1,
        ),
        ("ROLLBACK", vec![query("ROLLBACK")], 1),
        (
            "the name is free after ROLLBACK",
            vec![parse("k", "SELECT 1"), bind_exec("k", &[]), sync()],
            1,
        ),
        ("BEGIN again", vec![query("BEGIN")], 1),
        ("fail it again", vec![query("SELECT 1/0")], 1),
        (
            "a name in use, parsed again in the failed transaction",
            vec![parse("k", "SELECT 2"), sync()],
            1,
        ),
        (
            "ROLLBACK pipelined before a Parse in the failed transaction",
            vec![query("ROLLBACK"), parse("k3", "SELECT 1"), bind_exec("k3", &[]), sync()],
            2,
        ),
        (
            "Bind and Describe of unknown names",
            vec![
                bind_exec("nope", &[]),
                sync(),
                describe_statement("nope"),
                sync(),
                execute("no_portal"),
                sync(),
            ],
            3,
        ),
        (
            "Close of an unknown name, twice",
            vec![close_statement("nope"), close_statement("nope"), sync()],
            1,
        ),
        (
            "Parse, Close, Parse of one name in one segment",
            vec![
                parse("pcp", "SELECT 1"),
                close_statement("pcp"),
                parse("pcp", "SELECT 2"),
                bind_exec("pcp", &[]),
                sync(),
            ],
            1,
        ),
        (
            "duplicate name in one segment, then used",
            vec![
                parse("dd", "SELECT 1"),
                parse("dd", "SELECT 2"),
                bind_exec("dd", &[]),
                sync(),
                bind_exec("dd", &[]),
                sync(),
            ],
            2,
        ),
        (
            "failed Bind (wrong parameter count) leaves the statement",
            vec![
                parse("pb", "SELECT $1::int"),
                bind_exec("pb", &[]),
                sync(),
                bind_exec("pb", &["5"]),
                sync(),
            ],
            2,
        ),
        (
            "unnamed statements across segments",
            vec![
                parse("", "SELECT 2"),
                bind_exec("", &[]),
                sync(),
                parse("", "SELECT $1::int"),
                bind_exec("", &["3"]),
                bind_exec("", &["4"]),
                sync(),
            ],
            2,
        ),
        (
            "named statements inside a transaction block that fails and rolls back",
            vec![
                query("BEGIN"),
                parse("tx1", "SELECT 2"),
                bind_exec("tx1", &[]),
                sync(),
                query("SELECT 1/0"),
                bind_exec("tx1", &[]),
                sync(),
                query("ROLLBACK"),
                bind_exec("tx1", &[]),
                sync(),
            ],
            6,
        ),
        (
            "DISCARD ALL between segments",
            vec![parse("da", "SELECT 1"), sync(), query("DISCARD ALL")],
            2,
        ),
        (
            "the name is free after DISCARD ALL",
            vec![parse("da", "SELECT 2"), bind_exec("da", &[]), sync()],
            1,
        ),
    ];
    compare_with_postgres(&cluster, &silo, &mut other, &cases);
}

type Case = (&'static str, Vec<Vec<u8>>, usize);

/// Runs each case (one round trip: a batch and the number of ReadyForQuery it ends with)
/// on one connection directly to PostgreSQL and on one through pgsilo; the transcripts
/// must be the same.
fn compare_with_postgres(cluster: &PgCluster, silo: &Pgsilo, other: &mut Wire, cases: &[Case]) {
    let mut direct = Wire::connect(cluster.port(), USER, DB);
    let mut pooled = Wire::connect(silo.port(), USER, DB);
    let mut differences = Vec::new();
    for (name, batch, syncs) in cases {
        let d = transcript(&mut direct, batch, *syncs);
        let p = transcript(&mut pooled, batch, *syncs);
        println!("{name}: {}", d.join(" "));
        if d != p {
            differences.push(format!("{name}:\n  direct: {}\n  pgsilo: {}", d.join(" "), p.join(" ")));
        }
        // Another client uses the server between cases (when it is free).
        if p.last().map(String::as_str) == Some("ZI") {
            assert_eq!(exec(other, "o2", &["7"]), "7");
        }
    }
    assert!(
        differences.is_empty(),
        "pgsilo differs from PostgreSQL:\n{}",
        differences.join("\n")
    );
}

/// Named Parse messages whose outcome depends on what the server has not answered yet
/// must get what PostgreSQL would answer.
#[test]
fn parse_decisions_match_postgres() {
    use fe::*;
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut other = Wire::connect(silo.port(), USER, DB);
    for (i, sql) in ["SELECT 1", "SELECT 2"].iter().enumerate() {
        prepare(&mut other, &format!("o{i}"), sql);
    }
    prepare(&mut other, "o2", "SELECT $1::int");
    let cases: Vec<Case> = vec![
        (
            "Parse in a failed transaction, pipelined",
            vec![
                query("BEGIN"),
                query("SELECT 1/0"),
                parse("k2", "SELECT 1"),
                sync(),
                query("ROLLBACK"),
                parse("k2", "SELECT 1"),
                bind_exec("k2", &[]),
                sync(),
            ],
            5,
        ),
        (
            "Parse error, then the same name in the same write",
            vec![
                parse("bad", "SELEC 1"),
                sync(),
                parse("bad", "SELECT 1"),
                bind_exec("bad", &[]),
                sync(),
            ],
            2,
        ),
        (
            "DEALLOCATE ALL, then the same name in the same write",
            vec![
                parse("z", "SELECT 1"),
                sync(),
                query("DEALLOCATE ALL"),
                parse("z", "SELECT 2"),
                bind_exec("z", &[]),
                sync(),
            ],
            3,
        ),
    ];
    compare_with_postgres(&cluster, &silo, &mut other, &cases);
}

/// A cancel request from a client whose transaction is over must not reach the server's
/// next client.
#[test]
fn cancel_from_an_idle_client_hits_nobody_else() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    runtime().block_on(async {
        let a = silo.connect(USER, DB).await;
        let b = silo.connect(USER, DB).await;
        a.query_one("SELECT 1", &[]).await.unwrap();
        let token = a.cancel_token();
        let sleeper = b.query_one("SELECT pg_sleep(1.5)::text", &[]);
        let canceller = async {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while cluster_sleepers(cluster.port(), "SELECT pg_sleep(1.5)%").await == 0 {
                assert!(std::time::Instant::now() < deadline, "pg_sleep never started");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        };
        let (r, ()) = within(60, "sleep with a stray cancel", future::join(sleeper, canceller)).await;
        r.unwrap_or_else(|e| panic!("a's cancel hit b's query: {e:?}"));
    });
}

/// The unnamed statement prepared in one transaction and used in the next: PostgreSQL
/// keeps it for the session, so the client must get its own statement, not whatever the
/// server's previous client left unnamed.
#[test]
fn unnamed_statement_used_in_a_later_transaction() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut a = Wire::connect(silo.port(), USER, DB);
    let mut b = Wire::connect(silo.port(), USER, DB);
    // libpq's PQprepare(conn, "", ...) then PQexecPrepared(conn, "", ...).
    a.send_all(&[fe::parse("", "SELECT 'mine'::text"), fe::sync()]);
    assert_eq!(tags(&a.until_ready()), "1Z");
    b.send_all(&[fe::parse("", "SELECT 'other client'::text"), fe::sync()]);
    assert_eq!(tags(&b.until_ready()), "1Z");
    a.send_all(&[fe::bind_exec("", &[]), fe::sync()]);
    let m = a.until_ready();
    assert_eq!(
        m.iter().find_map(|m| m.first_value()).as_deref(),
        Some("mine"),
        "{}",
        tags(&m)
    );
}
