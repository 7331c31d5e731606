//! LISTEN/NOTIFY under transaction pooling (issue 13, part 2): a client's LISTEN is held
//! by the pool's listener connection, not by a server the client keeps, so a pool of one
//! still serves everyone; notifications reach every subscribed client, in order, between
//! its transactions or while it is idle; UNLISTEN and a client's departure shrink what
//! the listener connection LISTENs to; a listener connection that dies comes back, with
//! a NOTICE to the clients that they may have missed notifications.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::txpool::{fe, password, run_py, runtime, within, Msg, Pgsilo, Wire};
use support::PgCluster;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Config, NoTls, SimpleQueryMessage};

const USER: &str = "scram_user";
const DB: &str = "app_db";

/// A NotificationResponse: (process id, channel, payload).
fn notification(m: &Msg) -> (u32, String, String) {
    assert_eq!(m.tag, b'A', "not a notification: {m:?}");
    let pid = u32::from_be_bytes(m.body[..4].try_into().unwrap());
    let mut parts = m.body[4..]
        .split(|&b| b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    (pid, parts.next().unwrap(), parts.next().unwrap())
}

/// The next notification, skipping nothing else: anything else arriving is a failure.
fn next_notification(w: &mut Wire) -> (u32, String, String) {
    notification(&w.recv())
}

/// Runs a query and checks it succeeded, returning the tags of its answer.
fn run(w: &mut Wire, sql: &str) -> Vec<Msg> {
    w.send(&fe::query(sql));
    let msgs = w.until_ready();
    if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
        panic!("{sql}: {:?}", e.field(b'M'));
    }
    msgs
}

/// A query answered by pgsilo itself: CommandComplete per statement, then ReadyForQuery.
fn listen(w: &mut Wire, sql: &str) -> Vec<String> {
    let msgs = run(w, sql);
    assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"I".to_vec()));
    msgs.iter().filter(|m| m.tag == b'C').map(Msg::tag_text).collect()
}

/// Rows of a query run as the cluster's superuser (first column of each row).
fn su_values(cluster: &PgCluster, sql: &str) -> Vec<String> {
    let conn = cluster.superuser_conn_string("postgres");
    let sql = sql.to_string();
    runtime().block_on(async move {
        let (c, conn) = tokio_postgres::connect(&conn, NoTls).await.unwrap();
        tokio::spawn(conn);
        c.simple_query(&sql)
            .await
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
                _ => None,
            })
            .collect()
    })
}

/// What the pool's listener connection last ran, as pg_stat_activity shows it.
const LISTENER_QUERY: &str =
    "SELECT pid::text || ' ' || query FROM pg_stat_activity WHERE backend_type = 'client backend' AND query ~ '^(UN)?LISTEN '";

/// Waits until the listener connection's last query is `want` (None: no listener).
fn wait_listener_query(cluster: &PgCluster, want: Option<&str>) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rows = su_values(cluster, LISTENER_QUERY);
        let found: Vec<(u32, String)> = rows
            .iter()
            .map(|r| {
                let (pid, q) = r.split_once(' ').unwrap();
                (pid.parse().unwrap(), q.to_string())
            })
            .collect();
        match (want, found.as_slice()) {
            (None, []) => return None,
            (Some(w), [(pid, q)]) if q == w => return Some(*pid),
            _ => {}
        }
        if Instant::now() > deadline {
            panic!("listener connection: want {want:?}, found {found:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// psql's way (a plain simple-protocol LISTEN) under a pool of one, with another client
/// running transactions that NOTIFY all the while: the listening client does not hold
/// the only server, and its notifications come between its own results, never inside
/// one, in the order they were sent, carrying the listener backend's pid.
#[test]
fn listen_under_a_pool_of_one_while_others_run_transactions() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut a = Wire::connect(silo.port(), USER, DB);
    assert_eq!(listen(&mut a, "LISTEN jobs"), ["LISTEN"]);
    let listener_pid = wait_listener_query(&cluster, Some("LISTEN \"jobs\""));

    const N: usize = 30;
    let port = silo.port();
    let other = std::thread::spawn(move || {
        let mut b = Wire::connect(port, USER, DB);
        for i in 0..N {
            run(
                &mut b,
                &format!("BEGIN; SELECT pg_notify('jobs', 'n{i}'); SELECT generate_series(1, 200); COMMIT"),
            );
            run(&mut b, "SELECT 1");
        }
        b.close();
    });
    let mut got = Vec::new();
    // The listening client runs queries of its own meanwhile.
    for round in 0..20 {
        a.send(&fe::query("SELECT generate_series(1, 100)"));
        let mut answered = false;
        loop {
            let m = a.recv();
            match m.tag {
                b'A' => {
                    assert!(!answered, "round {round}: a notification inside a result");
                    got.push(notification(&m));
                }
                b'Z' => break,
                _ => answered = true,
            }
        }
    }
    other.join().unwrap();
    while got.len() < N {
        got.push(notification(&a.recv()));
    }
    let want: Vec<(Option<u32>, String, String)> = (0..N)
        .map(|i| (listener_pid, "jobs".to_string(), format!("n{i}")))
        .collect();
    let got: Vec<(Option<u32>, String, String)> = got.into_iter().map(|(p, c, m)| (Some(p), c, m)).collect();
    assert_eq!(got, want);
    // Still outside any transaction, still usable.
    assert_eq!(a.value("SELECT 7"), "7");
}

/// Each client hears the channels it LISTENs to and no others; two clients on one
/// channel both hear it.
#[test]
fn clients_hear_their_own_channels_and_share_a_channel() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut a = Wire::connect(silo.port(), USER, DB);
    let mut b = Wire::connect(silo.port(), USER, DB);
    let mut c = Wire::connect(silo.port(), USER, DB);
    assert_eq!(listen(&mut a, "LISTEN alpha"), ["LISTEN"]);
    assert_eq!(listen(&mut b, "listen \"Beta\""), ["LISTEN"]);
    assert_eq!(listen(&mut c, "LISTEN ALPHA; LISTEN \"Beta\";"), ["LISTEN", "LISTEN"]);
    let mut n = Wire::connect(silo.port(), USER, DB);
    run(&mut n, "NOTIFY alpha, 'a1'");
    run(&mut n, "SELECT pg_notify('Beta', 'b1')");
    run(&mut n, "NOTIFY beta, 'not-Beta'");
    run(&mut n, "NOTIFY alpha, 'a2'");
    let payloads = |w: &mut Wire, k: usize| -> Vec<(String, String)> {
        (0..k).map(|_| next_notification(w)).map(|(_, c, p)| (c, p)).collect()
    };
    let s = |c: &str, p: &str| (c.to_string(), p.to_string());
    assert_eq!(payloads(&mut a, 2), [s("alpha", "a1"), s("alpha", "a2")]);
    assert_eq!(payloads(&mut b, 1), [s("Beta", "b1")]);
    assert_eq!(
        payloads(&mut c, 3),
        [s("alpha", "a1"), s("Beta", "b1"), s("alpha", "a2")]
    );
    // Nothing more for b: its next answer comes with nothing before it.
    b.send(&fe::query("SELECT 1"));
    assert_eq!(b.recv().tag, b'T');
    b.until_ready();
}

/// UNLISTEN ch stops that channel, UNLISTEN * all of them, for that client only.
#[test]
fn unlisten_and_unlisten_all_stop_delivery() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut a = Wire::connect(silo.port(), USER, DB);
    let mut other = Wire::connect(silo.port(), USER, DB);
    assert_eq!(listen(&mut a, "LISTEN one; LISTEN two; LISTEN three"), ["LISTEN"; 3]);
    assert_eq!(listen(&mut other, "LISTEN one"), ["LISTEN"]);
    assert_eq!(listen(&mut a, "UNLISTEN one"), ["UNLISTEN"]);
    let mut n = Wire::connect(silo.port(), USER, DB);
    run(&mut n, "NOTIFY one, '1'; NOTIFY two, '2'");
    assert_eq!(next_notification(&mut a).2, "2");
    assert_eq!(next_notification(&mut other).2, "1", "the other client still listens");
    assert_eq!(listen(&mut a, "UNLISTEN *; LISTEN marker"), ["UNLISTEN", "LISTEN"]);
    run(&mut n, "NOTIFY two, 'x'; NOTIFY three, 'y'; NOTIFY marker, 'm'");
    let (_, channel, payload) = next_notification(&mut a);
    assert_eq!((channel.as_str(), payload.as_str()), ("marker", "m"));
    // The listener connection no longer LISTENs to what nobody wants.
    wait_listener_query(
        &cluster,
        Some("LISTEN \"marker\"; UNLISTEN \"three\"; UNLISTEN \"two\""),
    );
}

/// A client that leaves takes its channels with it: the listener connection UNLISTENs
/// them, and closes when nobody listens any more.
#[test]
fn a_departing_client_is_unlistened_on_the_listener_connection() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut a = Wire::connect(silo.port(), USER, DB);
    let mut b = Wire::connect(silo.port(), USER, DB);
    listen(&mut a, "LISTEN leaving");
    wait_listener_query(&cluster, Some("LISTEN \"leaving\""));
    listen(&mut b, "LISTEN staying");
    wait_listener_query(&cluster, Some("LISTEN \"staying\""));
    a.close();
    wait_listener_query(&cluster, Some("UNLISTEN \"leaving\""));
    let mut n = Wire::connect(silo.port(), USER, DB);
    run(&mut n, "NOTIFY staying, 'still'");
    assert_eq!(next_notification(&mut b).2, "still");
    b.close();
    wait_listener_query(&cluster, None);
}

/// Two workers: the listener connection runs on one, and clients on both get every
/// notification in order.
#[test]
fn notifications_reach_clients_on_every_worker() {
    let cores: Vec<usize> = support::cores::available_cores().into_iter().collect();
    if cores.len() < 2 {
        eprintln!("skipped: needs two cores, this process may use {cores:?}");
        return;
    }
    let cluster = PgCluster::start();
    let cpus = format!("[{}, {}]", cores[0], cores[1]);
    let admins = format!("[\"{USER}\"]");
    let silo = Pgsilo::start(
        &cluster,
        &[("default_pool_size", "1"), ("cpus", &cpus), ("admin_users", &admins)],
    );
    // Enough clients that the kernel's spreading puts some on each worker.
    let mut clients: Vec<Wire> = (0..12).map(|_| Wire::connect(silo.port(), USER, DB)).collect();
    for c in &mut clients {
        listen(c, "LISTEN fanout");
    }
    let mut console = Wire::connect(silo.port(), USER, "pgsilo");
    console.send(&fe::query("SHOW CLIENTS"));
    let workers: BTreeSet<String> = console
        .until_ready()
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|m| m.values())
        .filter(|v| v.get(2).map(String::as_str) == Some(DB))
        .filter_map(|v| v.last().cloned())
        .collect();
    assert_eq!(workers.len(), 2, "clients on both workers: {workers:?}");
    let mut n = Wire::connect(silo.port(), USER, DB);
    for i in 0..5 {
        run(&mut n, &format!("NOTIFY fanout, '{i}'"));
    }
    for (k, c) in clients.iter_mut().enumerate() {
        let got: Vec<String> = (0..5).map(|_| next_notification(c).2).collect();
        assert_eq!(got, ["0", "1", "2", "3", "4"], "client {k}");
    }
    let log = silo.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// The listener connection is terminated: each subscribed client gets a NOTICE that
/// notifications may have been missed, and later notifications arrive through the new
/// listener connection.
#[test]
fn a_killed_listener_connection_comes_back_with_a_notice() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut a = Wire::connect(silo.port(), USER, DB);
    listen(&mut a, "LISTEN k");
    let mut n = Wire::connect(silo.port(), USER, DB);
    run(&mut n, "NOTIFY k, 'before'");
    let (old_pid, _, payload) = next_notification(&mut a);
    assert_eq!(payload, "before");
    let killed = su_values(&cluster, &format!("SELECT pg_terminate_backend({old_pid})::text"));
    assert_eq!(killed, ["true"]);
    let notice = a.recv();
    assert_eq!(notice.tag, b'N', "{notice:?}");
    assert_eq!(notice.field(b'C').as_deref(), Some("01000"));
    assert!(notice.field(b'M').unwrap().contains("may have been missed"));
    // Notify until the new listener connection hears it (it may take a moment to open).
    let stop = Arc::new(AtomicBool::new(false));
    let port = silo.port();
    let notifier = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = Wire::connect(port, USER, DB);
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && i < 200 {
                run(&mut n, &format!("NOTIFY k, 'after{i}'"));
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let (new_pid, channel, payload) = next_notification(&mut a);
    stop.store(true, Ordering::SeqCst);
    notifier.join().unwrap();
    assert_eq!(channel, "k");
    assert!(payload.starts_with("after"), "{payload}");
    assert_ne!(new_pid, old_pid, "a new listener connection");
    // The client itself never lost its session.
    assert_eq!(a.value("SELECT 1"), "1");
}

/// tokio-postgres: notifications come through the connection's message stream
/// (AsyncMessage::Notification), under a pool of one, with the client running queries.
#[test]
fn tokio_postgres_notifications_under_a_pool_of_one() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    runtime().block_on(async {
        let config: Config = silo.pg_config(USER, DB);
        let (client, mut connection) = config.connect(NoTls).await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
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
        client.batch_execute("LISTEN tok").await.unwrap();
        let other = silo.connect(USER, DB).await;
        for i in 0..10 {
            other
                .batch_execute(&format!("BEGIN; SELECT pg_notify('tok', '{i}'); COMMIT"))
                .await
                .unwrap();
            // The listening client goes on with its own work, on the same single server.
            let v: i32 = client.query_one("SELECT $1::int", &[&i]).await.unwrap().get(0);
            assert_eq!(v, i);
        }
        for i in 0..10 {
            let got = within(30, "notification", rx.recv()).await;
            assert_eq!(got, Some(("tok".to_string(), i.to_string())));
        }
        client.batch_execute("UNLISTEN tok").await.unwrap();
        other.batch_execute("NOTIFY tok, 'late'").await.unwrap();
        client.batch_execute("SELECT 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let late = rx.try_recv();
        assert!(late.is_err(), "a notification after UNLISTEN: {late:?}");
    });
}

/// psycopg 3: `conn.notifies()` under a pool of one while another connection notifies.
#[test]
fn psycopg_notifies_under_a_pool_of_one() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let out = run_py("listen_notify.py", &[&silo.conninfo(USER, DB)], 120);
    assert_eq!(out.trim(), "p0,p1,p2,p3,p4\n42");
}

/// psql itself: a script that LISTENs and notifies its own channel sees psql's
/// "Asynchronous notification" line, with the listener connection's pid, under a pool of one.
#[test]
fn psql_prints_notifications_under_a_pool_of_one() {
    use std::io::Write;
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "1")]);
    let mut child = std::process::Command::new(cluster.bin("psql"))
        .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p"])
        .arg(silo.port().to_string())
        .args(["-U", USER, "-d", DB])
        .env("PGPASSWORD", password(USER))
        .env_remove("PGOPTIONS")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run psql");
    let script = "LISTEN psql_ch;\nSELECT pg_notify('psql_ch', 'from psql');\nSELECT pg_sleep(0.5);\nSELECT 'done';\n";
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "Asynchronous notification \"psql_ch\" with payload \"from psql\" received from server process with PID"
        ),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("done"), "{stdout}");
}

/// The fallback: a LISTEN pgsilo does not answer itself (here inside a transaction
/// block) goes to the server, and the client keeps that server until it leaves.
#[test]
fn listen_inside_a_transaction_block_still_pins_the_server() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::start(&cluster, &[("default_pool_size", "2")]);
    let mut a = Wire::connect(silo.port(), USER, DB);
    run(&mut a, "BEGIN; LISTEN pinned; COMMIT");
    let mut n = Wire::connect(silo.port(), USER, DB);
    run(&mut n, "NOTIFY pinned, 'p'");
    let (_, _, payload) = next_notification(&mut a);
    assert_eq!(payload, "p");
    // a's own server LISTENs.
    assert_eq!(a.value("SELECT count(*) FROM pg_listening_channels()"), "1");
}
