//! `pgsilo --takeover`: a new process receives the running one's listening sockets and
//! tells it to drain, so clients connecting all along never see a refusal or an error.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{free_port, runtime, toml_str, PgCluster, Pgsilo, PgsiloBuilder};

const USER: &str = "md5_user";
const PASSWORD: &str = "md5_pass";
const LONG: Duration = Duration::from_secs(60);

fn builder(cluster: &PgCluster, socket_dir: &std::path::Path) -> PgsiloBuilder {
    Pgsilo::builder()
        .auth_type("md5")
        .pool_size(4)
        .user(USER, PASSWORD)
        .database("app_db", cluster)
        .set(
            "takeover_socket",
            &toml_str(&socket_dir.join("takeover.sock").display().to_string()),
        )
}

/// Clients connecting as fast as they can, each running one query on its own new
/// connection, counting successes and keeping every failure.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ClientLoop {
    fn start(rt: &tokio::runtime::Runtime, port: u16, tasks: usize) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            handles.push(rt.spawn(async move {
                let mut config = tokio_postgres::Config::new();
                config
                    .host("127.0.0.1")
                    .port(port)
                    .user(USER)
                    .password(PASSWORD)
                    .dbname("app_db")
                    .application_name(format!("loop{t}"))
                    .connect_timeout(Duration::from_secs(30));
                let mut i = 0u64;
                // Bounded: stops when told, or after 10 minutes whatever happens.
                let until = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::SeqCst) && Instant::now() < until {
                    i += 1;
                    let result = async {
                        let client = support::connect_with(&config).await?;
                        let row = client.query_one(&format!("SELECT {i}::int8"), &[]).await?;
                        Ok::<_, tokio_postgres::Error>(row.get::<_, i64>(0))
                    }
                    .await;
                    let mut failures = failures.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok(n) if n == i as i64 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(n) => failures.push(format!("task {t} #{i}: got {n}")),
                        Err(e) => failures.push(format!("task {t} #{i}: {e:?}")),
                    }
                    if failures.len() >= 20 {
                        // Enough to tell what went wrong.
                        return;
                    }
                }
            }));
        }
        ClientLoop {
            stop,
            ok,
            failures,
            tasks: handles,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `n` more queries succeeded than now.
    fn wait_for_more(&self, n: usize) {
        let target = self.ok() + n;
        let deadline = Instant::now() + LONG;
        while self.ok() < target {
            assert!(
                Instant::now() < deadline,
                "the client loop made no progress: {} ok, failures {:?}",
                self.ok(),
                self.failures.lock().unwrap_or_else(|p| p.into_inner())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(self, rt: &tokio::runtime::Runtime) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            rt.block_on(t).unwrap();
        }
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (self.ok.load(Ordering::SeqCst), failures)
    }
}

/// Replaces `old` by a new process started with `--takeover` while the loop runs;
/// returns the new one once the old one has exited 0 and the loop went on through the
/// new one.
fn take_over(old: &mut Pgsilo, clients: &ClientLoop) -> Pgsilo {
    let new = old.start_again(&["--takeover"]).unwrap_or_else(|f| {
        panic!(
            "--takeover did not start ({}):\n{}\n--- old log ---\n{}",
            f.status_text(),
            f.stderr,
            old.log()
        )
    });
    new.wait_for_log("takeover: the previous process is draining", LONG);
    let status = old.wait_exit(LONG).unwrap_or_else(|| {
        panic!(
            "the old process did not exit after the takeover\n--- old log ---\n{}",
            old.log()
        )
    });
    assert!(status.success(), "old process: {status}\n{}", old.log());
    let log = old.log();
    assert!(log.contains("takeover: handed"), "{log}");
    assert!(log.contains("takeover: the new process is serving"), "{log}");
    // Only the new process serves now.
    clients.wait_for_more(200);
    new
}

#[test]
fn takeover_under_a_connection_loop_refuses_nothing_twice_in_a_row() {
    let cluster = PgCluster::start();
    let socket_dir = tempfile::tempdir().unwrap();
    let mut first = builder(&cluster, socket_dir.path()).start();
    let rt = runtime();
    let clients = ClientLoop::start(&rt, first.port(), 4);
    clients.wait_for_more(200);

    let mut second = take_over(&mut first, &clients);
    let third = take_over(&mut second, &clients);

    let (ok, failures) = clients.finish(&rt);
    assert!(
        failures.is_empty(),
        "{} of {} connections failed during the takeovers (the processes' logs follow): {failures:#?}",
        failures.len(),
        ok + failures.len(),
    );
    // The last one served clients of its own and still does.
    assert!(third.log().contains("login attempt"), "{}", third.log());
    assert_eq!(third.psql(USER, PASSWORD, "app_db", "SELECT 'third'").unwrap(), "third");
    eprintln!("{ok} connections, none failed, across two takeovers");
}

#[test]
fn takeover_with_nothing_running_starts_normally() {
    let cluster = PgCluster::start();
    let socket_dir = tempfile::tempdir().unwrap();
    let p = builder(&cluster, socket_dir.path()).arg("--takeover").start();
    let log = p.log();
    assert!(
        log.contains("takeover: no running process answered; starting normally"),
        "{log}"
    );
    assert_eq!(p.psql(USER, PASSWORD, "app_db", "SELECT 'alone'").unwrap(), "alone");
    // It serves takeovers itself.
    assert!(socket_dir.path().join("takeover.sock").exists());
}

#[test]
fn a_second_instance_without_takeover_refuses_to_start() {
    let cluster = PgCluster::start();
    let socket_dir = tempfile::tempdir().unwrap();
    let p = builder(&cluster, socket_dir.path()).start();

    // Same config: the port is in use.
    let failed = match p.start_again(&[]) {
        Ok(mut second) => {
            second.kill();
            panic!("a second instance started on a used port:\n{}", second.log())
        }
        Err(f) => f,
    };
    assert!(
        failed.status.is_some_and(|s| s.code() == Some(1)),
        "{}",
        failed.status_text()
    );
    assert!(
        failed
            .stderr
            .contains(&format!("port {} on 127.0.0.1 is already in use", p.port())),
        "{}",
        failed.stderr
    );

    // Another port but the same takeover socket: told to use --takeover.
    let other = builder(&cluster, socket_dir.path()).port(free_port()).expect_failure();
    assert!(
        other.status.is_some_and(|s| s.code() == Some(1)),
        "{}",
        other.status_text()
    );
    assert!(other.stderr.contains("start with --takeover"), "{}", other.stderr);

    // The first one is unharmed.
    assert_eq!(
        p.psql(USER, PASSWORD, "app_db", "SELECT 'still here'").unwrap(),
        "still here"
    );
}

/// A new process that fails after receiving the sockets (here: its metrics port is
/// taken) never tells the old one to stop: the old one carries on, no client of the loop
/// notices, and a later takeover works.
#[test]
fn a_failed_takeover_leaves_the_old_process_serving() {
    let cluster = PgCluster::start();
    let socket_dir = tempfile::tempdir().unwrap();
    let mut p = builder(&cluster, socket_dir.path()).start();
    let good = p.config_text();
    let rt = runtime();
    let clients = ClientLoop::start(&rt, p.port(), 4);
    clients.wait_for_more(50);

    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap();
    p.write_config(&good.replacen("[pgsilo]\n", &format!("[pgsilo]\nmetrics_listen = \"{taken}\"\n"), 1));
    let (status, log) = match p.start_again(&["--takeover"]) {
        // It may get as far as listening before it fails.
        Ok(mut q) => (q.wait_exit(LONG), q.log()),
        Err(f) => (f.status, f.stderr),
    };
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{log}");
    assert!(log.contains("cannot listen"), "{log}");
    p.wait_for_log("the new process went away before taking over; carrying on", LONG);
    assert!(p.is_running());
    clients.wait_for_more(50);

    p.write_config(&good);
    let _new = take_over(&mut p, &clients);
    let (ok, failures) = clients.finish(&rt);
    assert!(
        failures.is_empty(),
        "{} of {} connections failed (the processes' logs follow): {failures:#?}\n--- failed takeover ---\n{log}",
        failures.len(),
        ok + failures.len(),
    );
}
