//! Logins in progress cannot lock a tenant out (issue 12): thousands of sockets that
//! connect from one address and send two bytes, or nothing, and wait, leave clients from
//! another address and from the Unix socket able to log in at once; an address over its
//! share has its extra sockets closed; max_client_conn still counts logged-in clients;
//! silent sockets go after startup_packet_timeout; the open-file limit is raised.
//!
//! Loopback aliases need no setup on Linux: a socket bound to 127.0.0.2 reaches pgsilo
//! on 127.0.0.1 from another address. (libpq cannot bind its source address, and
//! `psql -h 127.0.0.2` connects from 127.0.0.1: the kernel's source for 127/8.)

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::wire::startup_message;
use support::{db_error, psql_conninfo, runtime, PgCluster, Pgsilo, PgsiloBuilder};

const FLOOD_FROM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Far below client_login_timeout (60 s), far above a login on a noisy machine.
const PROMPTLY: Duration = Duration::from_secs(10);

/// md5 for clients, a Unix socket in a temp dir, a backlog deep enough that the flood's
/// connects never wait for SYN retries.
fn builder(cluster: &PgCluster, socket_dir: &tempfile::TempDir) -> PgsiloBuilder {
    Pgsilo::builder()
        .auth_type("md5")
        .user("trust_user", "tpass")
        .database("app_db", cluster)
        .set("listen_backlog", "4096")
        .set_str("unix_socket_dir", socket_dir.path().to_str().unwrap())
}

/// At most 20 logins in progress from one address (10 a worker on two cores); no
/// startup_packet_timeout, so only the budget acts.
fn capped_at_20(cluster: &PgCluster, socket_dir: &tempfile::TempDir) -> Pgsilo {
    builder(cluster, socket_dir)
        .set("max_pending_logins_per_addr", "20")
        .set("startup_packet_timeout", "0")
        .start()
}

fn socket_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("pgsilo-flood").tempdir().unwrap()
}

/// Sockets from one address that sent their first bytes and wait.
struct Flood(Vec<TcpStream>);

impl Flood {
    /// `n` connections from `from` to pgsilo's port, each sending `first`. Connections
    /// pgsilo closes at once are kept too (they read as closed).
    fn start(from: Ipv4Addr, port: u16, n: usize, first: &[u8]) -> Flood {
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut socks = Vec::with_capacity(n);
        for _ in 0..n {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
            s.connect(&to.into()).unwrap_or_else(|e| panic!("flood connect: {e}"));
            let mut s: TcpStream = s.into();
            // A socket pgsilo already closed may refuse the bytes: that is fine.
            let _ = s.write_all(first);
            socks.push(s);
        }
        Flood(socks)
    }

    /// Sockets pgsilo has not closed.
    fn open(&self) -> usize {
        self.0.iter().filter(|s| is_open(s)).count()
    }

    /// Waits until at most `n` sockets are open; panics with the count after `within`.
    fn wait_open_at_most(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let open = self.open();
            if open <= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{open} flood sockets still open, expected at most {n}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Reads (and drops) what is waiting: nothing more yet is open; EOF or a reset is closed.
fn is_open(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let open = loop {
        match (&*s).read(&mut buf) {
            Ok(0) => break false,
            Ok(_) => continue,
            Err(e) => break e.kind() == ErrorKind::WouldBlock,
        }
    };
    s.set_nonblocking(false).unwrap();
    open
}

/// tokio-postgres from `from` (bound source address), then a query; how long it took.
async fn login_from(p: &Pgsilo, from: Ipv4Addr) -> Result<(tokio_postgres::Client, Duration), String> {
    let started = Instant::now();
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::from((from, 0))).map_err(|e| e.to_string())?;
    let stream = sock
        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, p.port())))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (client, connection) = p
        .pg_config("trust_user", Some("tpass"), "app_db")
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(d) => format!("{}: {}", d.code().code(), d.message()),
            None => e.to_string(),
        })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let row = client
        .query_one("SELECT 40 + 2", &[])
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(row.get::<_, i32>(0), 42);
    Ok((client, started.elapsed()))
}

/// psql over the Unix socket; how long it took.
fn psql_over_unix(p: &Pgsilo, dir: &tempfile::TempDir) -> Duration {
    let started = Instant::now();
    let conn = format!(
        "host={} port={} user=trust_user password=tpass dbname=app_db",
        dir.path().display(),
        p.port()
    );
    let out = psql_conninfo(&conn, "SELECT 7").unwrap_or_else(|e| panic!("psql over the Unix socket: {e}"));
    assert_eq!(out.trim(), "7");
    started.elapsed()
}

/// Clients from 127.0.0.2 and from the Unix socket log in and query promptly.
fn others_get_in(p: &Pgsilo, dir: &tempfile::TempDir) {
    let took = runtime().block_on(async {
        let (_client, took) = login_from(p, OTHER)
            .await
            .unwrap_or_else(|e| panic!("client from {OTHER}: {e}"));
        took
    });
    assert!(took < PROMPTLY, "the client from {OTHER} took {took:?}");
    let took = psql_over_unix(p, dir);
    assert!(took < PROMPTLY, "psql over the Unix socket took {took:?}");
}

fn flood_does_not_lock_out_others(first: &[u8]) {
    let cluster = PgCluster::start();
    let dir = socket_dir();
    // Default budgets: nothing set that PgBouncer's keys do not have.
    let p = builder(&cluster, &dir).start();
    let flood = Flood::start(FLOOD_FROM, p.port(), 3000, first);
    others_get_in(&p, &dir);
    // The flood is still there: the clients did not wait for it to time out.
    assert!(flood.open() > 0, "the flood's sockets were all closed");
}

#[test]
fn a_flood_sending_two_bytes_from_one_address_leaves_others_able_to_log_in() {
    flood_does_not_lock_out_others(&[0, 0]);
}

#[test]
fn a_flood_sending_nothing_from_one_address_leaves_others_able_to_log_in() {
    flood_does_not_lock_out_others(&[]);
}

#[test]
fn an_address_over_its_cap_has_its_extra_sockets_closed_while_others_get_in() {
    let cluster = PgCluster::start();
    let dir = socket_dir();
    let p = capped_at_20(&cluster, &dir);
    let flood = Flood::start(FLOOD_FROM, p.port(), 500, &[0, 0]);
    flood.wait_open_at_most(20, PROMPTLY);
    others_get_in(&p, &dir);
    assert!(flood.open() <= 20);
    p.wait_for_log("turned away at an address's cap", Duration::from_secs(15));
}

#[test]
fn a_client_turned_away_at_its_address_cap_is_told_53300() {
    let cluster = PgCluster::start();
    let dir = socket_dir();
    let p = capped_at_20(&cluster, &dir);
    // Logins that sent their startup packet and never answer the password request:
    // nothing tells them from real clients, so they keep their places.
    let startup = startup_message(&[("user", "trust_user"), ("database", "app_db")]);
    let talkers = Flood::start(FLOOD_FROM, p.port(), 100, &startup);
    talkers.wait_open_at_most(20, PROMPTLY);
    runtime().block_on(async {
        let Err(e) = p.connect("trust_user", "tpass", "app_db").await else {
            panic!("a client from an address at its cap got in");
        };
        assert_eq!(
            db_error(&e),
            (
                "53300".to_string(),
                "too many logins in progress from this address (max_pending_logins_per_addr)".to_string()
            )
        );
    });
    others_get_in(&p, &dir);
}

#[test]
fn a_full_budget_evicts_the_flood_for_clients_from_elsewhere() {
    let cluster = PgCluster::start();
    let dir = socket_dir();
    let p = builder(&cluster, &dir)
        .set("max_pending_logins", "100")
        .set("max_pending_logins_per_addr", "0")
        .set("startup_packet_timeout", "0")
        .start();
    let flood = Flood::start(FLOOD_FROM, p.port(), 1000, &[0, 0]);
    flood.wait_open_at_most(100, PROMPTLY);
    let before = flood.open();
    others_get_in(&p, &dir);
    assert!(flood.open() < before, "no flood socket was evicted");
    p.wait_for_log("evicted", Duration::from_secs(15));
}

#[test]
fn max_client_conn_still_refuses_logged_in_clients_beyond_it_with_53300() {
    let cluster = PgCluster::start();
    let dir = socket_dir();
    let p = builder(&cluster, &dir).max_client_conn(2).start();
    // Logins in progress do not count against max_client_conn.
    let _flood = Flood::start(FLOOD_FROM, p.port(), 300, &[0, 0]);
    runtime().block_on(async {
        let (first, _) = login_from(&p, OTHER).await.expect("first client");
        let (_second, _) = login_from(&p, OTHER).await.expect("second client");
        let Err(refused) = login_from(&p, OTHER).await else {
            panic!("a third client is beyond max_client_conn = 2");
        };
        assert_eq!(refused, "53300: no more connections allowed (max_client_conn)");
        // A client that leaves gives its place back.
        drop(first);
        let deadline = Instant::now() + PROMPTLY;
        loop {
            match login_from(&p, OTHER).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    assert!(e.starts_with("53300"), "{e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the place of a client that left was not given back: {e}"),
            }
        }
    });
}

#[test]
fn sockets_without_a_startup_packet_are_closed_after_startup_packet_timeout() {
    let cluster = PgCluster::start();
    let dir = socket_dir();
    let p = builder(&cluster, &dir).set("startup_packet_timeout", "1").start();
    let silent = Flood::start(FLOOD_FROM, p.port(), 5, &[0, 0]);
    // A client that sent its startup packet and is asked for its password is left to
    // client_login_timeout.
    let mut asked = TcpStream::connect((Ipv4Addr::LOCALHOST, p.port())).unwrap();
    asked
        .write_all(&startup_message(&[("user", "trust_user"), ("database", "app_db")]))
        .unwrap();
    asked.set_read_timeout(Some(PROMPTLY)).unwrap();
    let mut tag = [0u8; 1];
    asked.read_exact(&mut tag).expect("the password request");
    assert_eq!(tag[0], b'R');
    silent.wait_open_at_most(0, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(2));
    assert!(is_open(&asked), "a login past its startup packet was closed");
}

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit_and_a_short_one_is_reported() {
    let hard = {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills `lim`.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        lim.rlim_max
    };
    let nowhere = support::Db::at("127.0.0.1", 1, "app_db");
    let raised = Pgsilo::builder()
        .db(nowhere.clone())
        .set("max_pending_logins", "100")
        .nofile_limit(256, hard)
        .start();
    raised.wait_for_log(
        &format!("file descriptor limit raised from 256 to the hard limit {hard}"),
        PROMPTLY,
    );
    let short = Pgsilo::builder().db(nowhere).nofile_limit(256, 256).start();
    let log = short.wait_for_log("max expected fd use", PROMPTLY);
    assert!(
        log.contains("file descriptor limit 256 (hard: 256) is below the"),
        "{log}"
    );
}
