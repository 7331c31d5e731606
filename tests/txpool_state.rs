//! Client matrix, session state: under transaction pooling each client must keep its own
//! session settings (TimeZone, application_name, DateStyle, startup `options`) whatever
//! server it lands on and whoever used that server before; a LISTEN pgsilo does not
//! answer itself keeps a client on its server and nothing leaks to the next; server
//! failures surface as errors, never hangs.

mod support;

use std::time::{Duration, Instant};

use futures_util::{future, StreamExt};
use support::txpool::{code, connect_with, fe, runtime, tags, within, Pgsilo, Wire};
use support::PgCluster;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, SimpleQueryMessage};

const USER: &str = "scram_user";
const DB: &str = "app_db";

/// The values (first column of each row) a simple query returns, comma-joined per row.
async fn values(c: &Client, sql: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let msgs = c.simple_query(sql).await?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            _ => None,
        })
        .collect())
}

fn direct_config(cluster: &PgCluster) -> Config {
    let mut c = Config::new();
    c.host("127.0.0.1")
        .port(cluster.port())
        .user(USER)
        .password("scram_pass")
        .dbname(DB);
    c
}

struct Scenario {
    name: &'static str,
    options: Option<&'static str>,
    application_name: Option<&'static str>,
    /// SQL run in order; "--other" lets another client use the (single) server.
    steps: &'static [&'static str],
}

const OTHER: &str = "--other";

/// What a client sees for `s`: each step's rows, in order.
async fn play(s: &Scenario, mut config: Config, other: Option<&Client>) -> Vec<String> {
    if let Some(o) = s.options {
        config.options(o);
    }
    if let Some(a) = s.application_name {
        config.application_name(a);
    }
    let c = connect_with(config).await;
    let mut seen = Vec::new();
    for step in s.steps {
        if *step == OTHER {
            if let Some(o) = other {
                // The other client changes what it can of its own session, then uses the
                // server in a transaction of its own.
                o.batch_execute(
                    "SET TimeZone = 'Europe/Paris'; SET application_name = 'intruder'; \
                     SET DateStyle = 'German'; SET IntervalStyle = 'sql_standard'",
                )
                .await
                .unwrap();
                o.batch_execute("BEGIN; SELECT now(); COMMIT").await.unwrap();
            }
            continue;
        }
        match values(&c, step).await {
            Ok(v) => seen.push(format!("{step} -> {}", v.join(" | "))),
            Err(e) => seen.push(format!("{step} -> error {}", code(&e))),
        }
    }
    seen
}

fn setup_schemas(cluster: &PgCluster) {
    cluster.psql(
        DB,
        "CREATE SCHEMA s2; GRANT USAGE ON SCHEMA s2 TO PUBLIC; \
         CREATE TABLE public.t AS SELECT 1 AS x; CREATE TABLE s2.t AS SELECT 2 AS x; \
         GRANT SELECT ON public.t, s2.t TO PUBLIC",
    );
}

/// Runs each scenario directly on PostgreSQL and through pgsilo (pool of one, another
/// client using the server between steps); every result must be the same.
fn compare(scenarios: &[Scenario]) {
    let cluster = PgCluster::start();
    setup_schemas(&cluster);
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut differences = Vec::new();
    runtime().block_on(async {
        let mut other_config = silo.pg_config(USER, DB);
        other_config.options("-c search_path=s2 -c TimeZone=Pacific/Auckland");
        let other = connect_with(other_config).await;
        for s in scenarios {
            let direct = within(60, s.name, play(s, direct_config(&cluster), None)).await;
            let pooled = within(60, s.name, play(s, silo.pg_config(USER, DB), Some(&other))).await;
            println!("{}:", s.name);
            for (d, p) in direct.iter().zip(&pooled) {
                println!("  {d}{}", if d == p { "" } else { "   <-- differs" });
            }
            if direct != pooled {
                differences.push(format!("{}:\n  direct: {direct:#?}\n  pgsilo: {pooled:#?}", s.name));
            }
        }
        // The other client kept its own settings through all of that.
        let v = values(
            &other,
            "SELECT current_setting('TimeZone'), current_setting('search_path'), \
             current_setting('application_name'), current_setting('DateStyle'), (SELECT x FROM t)",
        )
        .await
        .unwrap();
        assert_eq!(v, vec!["Europe/Paris,s2,intruder,German, DMY,2"]);
    });
    assert!(
        differences.is_empty(),
        "session state through pgsilo differs from PostgreSQL's:\n{}",
        differences.join("\n")
    );
}

const CHECK: &str = "SELECT current_setting('TimeZone'), current_setting('application_name'), \
                     current_setting('search_path'), current_setting('DateStyle'), \
                     '2020-01-01 00:00:00+00'::timestamptz::text, (SELECT x FROM t)";

#[test]
fn session_settings_follow_each_client() {
    compare(&[
        Scenario {
            name: "defaults",
            options: None,
            application_name: None,
            steps: &[CHECK, OTHER, CHECK],
        },
        Scenario {
            name: "SET TimeZone outside a transaction",
            options: None,
            application_name: None,
            steps: &[
                "SET TimeZone = 'America/New_York'",
                CHECK,
                OTHER,
                CHECK,
                OTHER,
                "BEGIN",
                CHECK,
                "COMMIT",
            ],
        },
        Scenario {
            name: "startup options and application_name",
            options: Some("-c TimeZone=Asia/Tokyo -c search_path=s2,public"),
            application_name: Some("app_two"),
            steps: &[CHECK, OTHER, CHECK, OTHER, CHECK],
        },
        Scenario {
            name: "SET application_name",
            options: None,
            application_name: Some("app_one"),
            steps: &[
                "SET application_name = 'changed'",
                OTHER,
                CHECK,
                "SET application_name = 'again'",
                OTHER,
                CHECK,
            ],
        },
        Scenario {
            name: "SET rolled back",
            options: Some("-c TimeZone=Asia/Tokyo"),
            application_name: None,
            steps: &[
                "BEGIN",
                "SET TimeZone = 'America/New_York'",
                CHECK,
                "ROLLBACK",
                OTHER,
                CHECK,
            ],
        },
        Scenario {
            name: "SET LOCAL",
            options: None,
            application_name: None,
            steps: &[
                "BEGIN",
                "SET LOCAL TimeZone = 'America/New_York'",
                CHECK,
                "COMMIT",
                OTHER,
                CHECK,
            ],
        },
        Scenario {
            name: "SET in a failed transaction",
            options: None,
            application_name: None,
            steps: &[
                "SET TimeZone = 'Asia/Kolkata'",
                "BEGIN",
                "SET TimeZone = 'America/New_York'",
                "SELECT 1/0",
                "ROLLBACK",
                OTHER,
                CHECK,
            ],
        },
        Scenario {
            name: "DateStyle and a set_config() call",
            options: None,
            application_name: None,
            steps: &[
                "SET DateStyle = 'SQL, DMY'",
                "SELECT set_config('TimeZone', 'Africa/Cairo', false)",
                OTHER,
                CHECK,
            ],
        },
        Scenario {
            name: "several statements in one query",
            options: None,
            application_name: None,
            steps: &[
                "SET TimeZone = 'America/New_York'; SET application_name = 'multi'; SELECT 1",
                OTHER,
                CHECK,
            ],
        },
    ]);
}

/// RESET and DISCARD ALL return settings to the session's startup values, which for a
/// client are what it connected with.
#[test]
fn reset_returns_to_the_clients_startup_values() {
    compare(&[
        Scenario {
            name: "RESET of one setting keeps the others",
            options: None,
            application_name: Some("app_r"),
            steps: &[
                "SET TimeZone = 'America/New_York'",
                "SET application_name = 'x'",
                "RESET application_name",
                OTHER,
                CHECK,
            ],
        },
        Scenario {
            name: "RESET TimeZone with a startup TimeZone",
            options: Some("-c TimeZone=Asia/Tokyo"),
            application_name: None,
            steps: &[
                "SET TimeZone = 'America/New_York'",
                OTHER,
                "RESET TimeZone",
                CHECK,
                OTHER,
                CHECK,
            ],
        },
        Scenario {
            name: "RESET ALL with startup options",
            options: Some("-c TimeZone=Asia/Tokyo -c search_path=s2,public"),
            application_name: Some("app_r"),
            steps: &[
                "SET TimeZone = 'America/New_York'",
                "SET application_name = 'x'",
                OTHER,
                "RESET ALL",
                CHECK,
                OTHER,
                CHECK,
            ],
        },
        Scenario {
            name: "DISCARD ALL with startup options",
            options: Some("-c TimeZone=Asia/Tokyo -c search_path=s2,public"),
            application_name: Some("app_r"),
            steps: &[
                "SET TimeZone = 'America/New_York'",
                OTHER,
                "DISCARD ALL",
                CHECK,
                OTHER,
                CHECK,
            ],
        },
    ]);
}

/// Several clients with settings of their own, at once, over a pool of two: each always
/// sees its own, on whichever server it gets.
#[test]
fn concurrent_clients_keep_their_settings() {
    let cluster = PgCluster::start();
    setup_schemas(&cluster);
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "2")]);
    let zones = [
        "America/New_York",
        "Asia/Tokyo",
        "Europe/Berlin",
        "Australia/Sydney",
        "UTC",
    ];
    runtime().block_on(async {
        let mut clients = Vec::new();
        for (i, zone) in zones.iter().enumerate() {
            let mut cfg = silo.pg_config(USER, DB);
            if i % 2 == 0 {
                cfg.options(format!("-c TimeZone={zone} -c search_path=s2,public"));
            }
            cfg.application_name(format!("start{i}"));
            let c = connect_with(cfg).await;
            if i % 2 == 1 {
                c.batch_execute(&format!("SET TimeZone = '{zone}'; SET application_name = 'set{i}'"))
                    .await
                    .unwrap();
            }
            clients.push((i, *zone, c));
        }
        let work = clients.iter().map(|(i, zone, c)| async move {
            let app = if i % 2 == 0 {
                format!("start{i}")
            } else {
                format!("set{i}")
            };
            let x = if i % 2 == 0 { "2" } else { "1" };
            for round in 0..25 {
                let sql = if round % 3 == 0 {
                    "BEGIN; SELECT current_setting('TimeZone'), current_setting('application_name'), \
                     (SELECT x FROM t)::text, pg_sleep(0.002)::text; COMMIT"
                } else {
                    "SELECT current_setting('TimeZone'), current_setting('application_name'), \
                     (SELECT x FROM t)::text, pg_sleep(0.002)::text"
                };
                let v = values(c, sql).await.unwrap();
                assert_eq!(v, vec![format!("{zone},{app},{x},")], "client {i} round {round}");
            }
        });
        within(120, "clients", future::join_all(work)).await;
    });
}

// ---------------------------------------------------------------------------------------
// LISTEN / NOTIFY
// ---------------------------------------------------------------------------------------

/// A client whose notifications arrive on a channel.
async fn listener(config: Config) -> (Client, mpsc::UnboundedReceiver<(String, String)>) {
    let (client, mut connection) = config.connect(NoTls).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx)).boxed();
    tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

async fn expect_notification(rx: &mut mpsc::UnboundedReceiver<(String, String)>, payload: &str) {
    let got = within(30, "notification", rx.recv()).await;
    assert_eq!(got, Some(("ch".to_string(), payload.to_string())));
}

async fn expect_silence(rx: &mut mpsc::UnboundedReceiver<(String, String)>) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "a notification leaked");
}

#[test]
fn listen_notify_in_session_mode() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("pool_mode", "\"session\""), ("default_pool_size", "3")]);
    runtime().block_on(async {
        let (l, mut rx) = listener(silo.pg_config(USER, DB)).await;
        l.batch_execute("LISTEN ch").await.unwrap();
        let n = silo.connect(USER, DB).await;
        n.batch_execute("NOTIFY ch, 'one'").await.unwrap();
        expect_notification(&mut rx, "one").await;
        n.batch_execute("SELECT pg_notify('ch', 'two')").await.unwrap();
        expect_notification(&mut rx, "two").await;
    });
}

/// Under transaction pooling a client whose LISTEN pgsilo does not answer itself (here:
/// inside a transaction block; a plain LISTEN goes through the pool's listener
/// connection, see tests/txpool_listen.rs) keeps its server until it leaves; then the
/// server forgets its channels before anyone else gets it.
#[test]
fn listen_notify_in_transaction_mode() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "2")]);
    runtime().block_on(async {
        let (l, mut rx) = listener(silo.pg_config(USER, DB)).await;
        l.batch_execute("BEGIN; LISTEN ch; COMMIT").await.unwrap();
        let n = silo.connect(USER, DB).await;
        n.batch_execute("NOTIFY ch, 'one'").await.unwrap();
        expect_notification(&mut rx, "one").await;
        // More transactions of both, then another notification.
        for i in 0..5 {
            l.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
            let v: i32 = l.query_one("SELECT $1::int", &[&i]).await.unwrap().get(0);
            assert_eq!(v, i);
            n.batch_execute("SELECT 2").await.unwrap();
        }
        n.batch_execute("NOTIFY ch, 'two'").await.unwrap();
        expect_notification(&mut rx, "two").await;
        // A notification sent while the listener sits idle between transactions.
        tokio::time::sleep(Duration::from_millis(200)).await;
        n.batch_execute("NOTIFY ch, 'idle'").await.unwrap();
        expect_notification(&mut rx, "idle").await;

        // The listener leaves; the next clients on its server hear nothing.
        drop(l);
        drop(rx);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (a, mut rx_a) = listener(silo.pg_config(USER, DB)).await;
        let (b, mut rx_b) = listener(silo.pg_config(USER, DB)).await;
        // Both servers busy at once, so each of a and b holds one of them.
        let (ra, rb) = future::join(
            a.simple_query("BEGIN; SELECT pg_sleep(0.3); SELECT count(*) FROM pg_listening_channels(); COMMIT"),
            b.simple_query("BEGIN; SELECT pg_sleep(0.3); SELECT count(*) FROM pg_listening_channels(); COMMIT"),
        )
        .await;
        for r in [ra.unwrap(), rb.unwrap()] {
            let count = r
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                    _ => None,
                })
                .nth(1);
            assert_eq!(count.as_deref(), Some("0"), "a server still listens");
        }
        n.batch_execute("NOTIFY ch, 'nobody'").await.unwrap();
        a.batch_execute("SELECT 1").await.unwrap();
        b.batch_execute("SELECT 1").await.unwrap();
        expect_silence(&mut rx_a).await;
        expect_silence(&mut rx_b).await;
    });
}

// ---------------------------------------------------------------------------------------
// Server failures
// ---------------------------------------------------------------------------------------

async fn superuser(cluster: &PgCluster) -> Client {
    let (c, conn) = tokio_postgres::connect(&cluster.superuser_conn_string("postgres"), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

#[test]
fn server_terminated_mid_query() {
    let cluster = PgCluster::start();
    let mut silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    runtime().block_on(async {
        let su = superuser(&cluster).await;
        for round in 0..3 {
            let victim = silo.connect(USER, DB).await;
            let waiting = silo.connect(USER, DB).await;
            let sleeper = victim.query_one("SELECT pg_sleep(60)", &[]);
            let killer = async {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let killed: i64 = su
                        .query_one(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                             WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
                            &[],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    if killed > 0 {
                        return;
                    }
                    assert!(Instant::now() < deadline, "the query never started");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            // Meanwhile another client waits for the only server.
            let queued = waiting.query_one("SELECT 'queued'::text", &[]);
            let (r, (), q) = within(60, "terminated query", future::join3(sleeper, killer, queued)).await;
            let e = r.unwrap_err();
            let c = code(&e);
            assert!(
                c == "57P01" || c == "08006",
                "round {round}: error without the expected SQLSTATE: {e:?}"
            );
            assert_eq!(q.unwrap().get::<_, String>(0), "queued", "round {round}");
            // The dead server left the pool: new clients work.
            let fresh = silo.connect(USER, DB).await;
            let v: i32 = within(30, "query after the kill", fresh.query_one("SELECT 5", &[]))
                .await
                .unwrap()
                .get(0);
            assert_eq!(v, 5);
            assert!(victim.is_closed() || victim.simple_query("SELECT 1").await.is_err());
        }
    });
    silo.assert_alive();
}

#[test]
fn postgres_restart() {
    let mut cluster = PgCluster::start();
    let mut silo = Pgsilo::start(
        &cluster,
        &[
            ("default_pool_size", "2"),
            ("server_connect_timeout", "3"),
            ("query_wait_timeout", "5"),
        ],
    );
    let rt = runtime();
    let (a, b) = rt.block_on(async {
        let a = silo.connect(USER, DB).await;
        let b = silo.connect(USER, DB).await;
        // Two servers in the pool, idle.
        let (x, y) = future::join(
            a.query_one("SELECT pg_sleep(0.2)::text", &[]),
            b.query_one("SELECT pg_sleep(0.2)::text", &[]),
        )
        .await;
        x.unwrap();
        y.unwrap();
        (a, b)
    });
    cluster.restart();
    rt.block_on(async {
        // Idle clients go on; their old servers are found dead and replaced.
        for c in [&a, &b] {
            let v: i32 = within(30, "query after restart", c.query_one("SELECT 1", &[]))
                .await
                .unwrap_or_else(|e| panic!("query after the restart: {e:?}"))
                .get(0);
            assert_eq!(v, 1);
        }
        let c = silo.connect(USER, DB).await;
        assert_eq!(c.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
    });
    // While PostgreSQL is down, a query fails promptly instead of hanging.
    cluster.stop();
    rt.block_on(async {
        let t = Instant::now();
        let r = within(60, "query while down", a.query_one("SELECT 3", &[])).await;
        let e = r.expect_err("a query succeeded with PostgreSQL down");
        println!("while down: {e:?} after {:.1?}", t.elapsed());
        assert!(e.code().is_some() || a.is_closed(), "{e:?}");
        // A new client's login may succeed (pgsilo authenticates itself) but its query
        // fails the same way.
        let cfg = silo.pg_config(USER, DB);
        match within(60, "connect while down", cfg.connect(NoTls)).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                let r = within(60, "new client's query while down", c.query_one("SELECT 4", &[])).await;
                assert!(r.is_err());
            }
            Err(e) => println!("login while down: {e:?}"),
        }
    });
    cluster.restart();
    rt.block_on(async {
        let c = silo.connect(USER, DB).await;
        let v: i32 = within(30, "query after the second restart", c.query_one("SELECT 6", &[]))
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 6);
        let r = within(30, "b after the second restart", b.query_one("SELECT 7", &[])).await;
        assert_eq!(r.unwrap().get::<_, i32>(0), 7);
    });
    silo.assert_alive();
}

/// A client that leaves inside a transaction, in the middle of a query, or in the middle
/// of a COPY: the server is rolled back or closed, and the next client finds nothing of
/// it (no open transaction, no locks, no running query).
/// The value of the row the leaving clients locked, taken with NOWAIT: it fails if a
/// departed client's transaction still holds the lock.
async fn locked_row_free(c: &Client, what: &str) -> i32 {
    within(
        30,
        what,
        c.query_one("SELECT v FROM locked WHERE id = 1 FOR UPDATE NOWAIT", &[]),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e:?}"))
    .get(0)
}

#[test]
fn clients_leaving_at_bad_moments() {
    let cluster = PgCluster::start();
    cluster.psql(
        DB,
        "CREATE TABLE locked (id int PRIMARY KEY, v int); INSERT INTO locked VALUES (1, 0); \
         GRANT ALL ON locked TO PUBLIC",
    );
    let mut silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let rt = runtime();
    rt.block_on(async {
        let su = superuser(&cluster).await;
        // Inside a transaction, holding a row lock, with an uncommitted change.
        let leaver = silo.connect(USER, DB).await;
        leaver
            .batch_execute("BEGIN; UPDATE locked SET v = 99 WHERE id = 1; SELECT * FROM locked FOR UPDATE")
            .await
            .unwrap();
        drop(leaver);
        let next = silo.connect(USER, DB).await;
        assert_eq!(locked_row_free(&next, "row lock after the client left").await, 0);

        // Inside a transaction again, the connection simply cut (no Terminate).
        let mut cut = Wire::connect(silo.port(), USER, DB);
        cut.send(&fe::query("BEGIN; UPDATE locked SET v = 98 WHERE id = 1"));
        assert_eq!(tags(&cut.until_ready()), "CCZ");
        drop(cut);
        assert_eq!(locked_row_free(&next, "row lock after the connection was cut").await, 0);

        // In the middle of a long query. (A tokio-postgres client would keep its
        // connection open until the answer came; the raw client really leaves.)
        let mut leaver = Wire::connect(silo.port(), USER, DB);
        leaver.send(&fe::query("SELECT pg_sleep(60)"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: i64 = su
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the query never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(leaver);
        let v: i32 = within(
            30,
            "query after the client left mid-query",
            next.query_one("SELECT 11", &[]),
        )
        .await
        .unwrap()
        .get(0);
        assert_eq!(v, 11);
        // The abandoned query does not run on.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: i64 = su
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the abandoned pg_sleep still runs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // In the middle of COPY FROM STDIN.
        let mut leaver = Wire::connect(silo.port(), USER, DB);
        leaver.send(&fe::query("COPY locked FROM STDIN"));
        assert_eq!(leaver.recv().tag, b'G');
        leaver.send(&fe::copy_data(b"5\t5\n"));
        drop(leaver);
        let n: i64 = within(
            30,
            "after the client left mid-COPY",
            next.query_one("SELECT count(*) FROM locked", &[]),
        )
        .await
        .unwrap()
        .get(0);
        assert_eq!(n, 1);
        let idle_tx: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(idle_tx, 0);
    });
    silo.assert_alive();
}

/// With the only server held in a transaction, another client's query waits at most
/// query_wait_timeout, then fails with an error; afterwards all is well.
#[test]
fn query_wait_timeout_with_the_pool_busy() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1"), ("query_wait_timeout", "2")]);
    runtime().block_on(async {
        let holder = silo.connect(USER, DB).await;
        holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let waiter = silo.connect(USER, DB).await;
        let t = Instant::now();
        let r = within(30, "waiting client", waiter.query_one("SELECT 1", &[])).await;
        let e = r.expect_err("the query got a server that was held");
        println!("query_wait_timeout: {e:?} after {:.1?}", t.elapsed());
        assert!(e.code().is_some(), "no SQLSTATE: {e:?}");
        assert!(t.elapsed() >= Duration::from_millis(1500));
        holder.batch_execute("COMMIT").await.unwrap();
        let c = silo.connect(USER, DB).await;
        assert_eq!(c.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0), 3);
        assert_eq!(holder.query_one("SELECT 4", &[]).await.unwrap().get::<_, i32>(0), 4);
    });
}

/// A client's `SET search_path` (or any setting PostgreSQL does not report, like
/// statement_timeout) must not reach the next client of its server.
#[test]
fn set_of_an_unreported_setting_stays_with_its_client() {
    let cluster = PgCluster::start();
    setup_schemas(&cluster);
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    runtime().block_on(async {
        let a = silo.connect(USER, DB).await;
        let b = silo.connect(USER, DB).await;
        a.batch_execute("SET search_path = s2; SET statement_timeout = '5s'")
            .await
            .unwrap();
        let seen = values(
            &b,
            "SELECT current_setting('search_path'), current_setting('statement_timeout')",
        )
        .await
        .unwrap();
        assert_eq!(seen, vec!["\"$user\", public,0"]);
        let own = values(
            &a,
            "SELECT current_setting('search_path'), current_setting('statement_timeout')",
        )
        .await
        .unwrap();
        assert_eq!(own, vec!["s2,5s"]);
    });
}

/// A client that ends with RESET and leaves at once, while pgsilo puts its startup
/// settings back on the server: the correction finishes and the server is pooled, never
/// closed as if the client's own request had been cut off.
fn leaving_during_a_settings_correction(mode: &str) {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(
        &cluster,
        &[("pool_mode", &format!("\"{mode}\"")), ("default_pool_size", "1")],
    );
    for _ in 0..30 {
        let mut w = Wire::connect_with(silo.port(), USER, DB, &[("TimeZone", "America/Los_Angeles")]);
        w.value("SET timezone TO 'Asia/Tokyo'; SELECT 1");
        w.send(&fe::query("RESET TIME ZONE"));
        let reply = w.until_ready();
        assert_eq!(tags(&reply), "CZ", "RESET TIME ZONE");
        w.close();
    }
    // The last departure's clean-up has run once a new client gets the server.
    let mut w = Wire::connect(silo.port(), USER, DB);
    assert_eq!(
        w.value("SELECT count(*) FROM pg_stat_activity WHERE usename = 'scram_user'"),
        "1"
    );
    w.close();
    let log = silo.log();
    assert!(
        !log.contains("client left with a request in flight"),
        "{mode} mode: a server was closed for pgsilo's own query:\n{log}"
    );
    assert_eq!(
        log.matches("new connection to server").count(),
        1,
        "{mode} mode: servers were replaced:\n{log}"
    );
}

#[test]
fn leaving_during_a_settings_correction_costs_no_server_transaction_mode() {
    leaving_during_a_settings_correction("transaction");
}

#[test]
fn leaving_during_a_settings_correction_costs_no_server_session_mode() {
    leaving_during_a_settings_correction("session");
}
