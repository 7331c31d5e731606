//! Workers: one pinned thread per configured core, the whole process kept on those cores,
//! one pool cap for the whole instance, and servers handed between workers so no client
//! waits while another worker sits on an idle server.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::cores::{available_cores, parse_cpu_list};
use support::{connect_with, runtime, PgCluster, Pgsilo};

const USER: &str = "md5_user";
const PASSWORD: &str = "md5_pass";

/// Every thread of the process: name -> cores it may run on.
fn threads(pid: i32) -> BTreeMap<String, BTreeSet<usize>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = entry.unwrap().path();
        let tid = dir.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list in status");
        out.insert(format!("{} [{tid}]", comm.trim()), parse_cpu_list(list));
    }
    out
}

fn builder(cluster: &PgCluster) -> support::PgsiloBuilder {
    Pgsilo::builder()
        .name("wk")
        .auth_type("md5")
        .user(USER, PASSWORD)
        .database("app_db", cluster)
}

/// A cluster for a two-worker test; None (and the reason printed) with fewer than two
/// cores to pin to.
fn two_cores_and_a_cluster() -> Option<PgCluster> {
    let cores = available_cores();
    if cores.len() < 2 {
        eprintln!("skipped: needs two cores, this process may use {cores:?}");
        return None;
    }
    Some(PgCluster::start())
}

/// Two workers pinned to the first two available cores, transaction pooling with a
/// single server: every client but one waits, on either worker.
fn two_workers_one_server(cluster: &PgCluster) -> support::PgsiloBuilder {
    let cores: Vec<usize> = available_cores().into_iter().take(2).collect();
    builder(cluster).cpus(&cores).pool_mode("transaction").pool_size(1)
}

/// Worker threads by worker number -> their cores; and all threads' cores together.
fn worker_affinity(p: &Pgsilo) -> (BTreeMap<usize, BTreeSet<usize>>, BTreeSet<usize>) {
    let all = threads(p.pid());
    let mut workers = BTreeMap::new();
    let mut union = BTreeSet::new();
    for (name, cpus) in &all {
        union.extend(cpus.iter().copied());
        if let Some(rest) = name.strip_prefix("wk:w") {
            let n: usize = rest.split_whitespace().next().unwrap().parse().unwrap();
            workers.insert(n, cpus.clone());
        }
    }
    (workers, union)
}

fn assert_startup_log(p: &Pgsilo, expected: &[(usize, usize)]) {
    let log = p.log();
    for (worker, core) in expected {
        let io_uring = format!("worker {worker} running on core {core} with the io_uring driver");
        let epoll = format!("worker {worker} running on core {core} with the epoll driver");
        assert!(
            log.contains(&io_uring) || log.contains(&epoll),
            "no startup line for worker {worker} on core {core}:\n{log}"
        );
    }
    assert!(log.contains(&format!("with {} worker(s)", expected.len())), "{log}");
}

#[test]
fn each_worker_is_pinned_to_its_core_and_the_process_stays_on_the_listed_cores() {
    let cores = available_cores();
    if !(cores.contains(&0) && cores.contains(&1)) {
        eprintln!("skipped: needs cores 0 and 1, this process may use {cores:?}");
        return;
    }
    let cluster = PgCluster::start();

    let p = builder(&cluster).cpus(&[0, 1]).start();
    let (workers, union) = worker_affinity(&p);
    assert_eq!(
        workers,
        BTreeMap::from([(0, BTreeSet::from([0])), (1, BTreeSet::from([1]))]),
        "threads: {:#?}",
        threads(p.pid())
    );
    assert!(union.is_subset(&BTreeSet::from([0, 1])), "{union:?}");
    assert_startup_log(&p, &[(0, 0), (1, 1)]);
    drop(p);

    // Workers take the cores in the order listed.
    let p = builder(&cluster).cpus(&[1, 0]).start();
    let (workers, _) = worker_affinity(&p);
    assert_eq!(
        workers,
        BTreeMap::from([(0, BTreeSet::from([1])), (1, BTreeSet::from([0]))])
    );
    assert_startup_log(&p, &[(0, 1), (1, 0)]);
    drop(p);

    // One core: one worker, and every thread of the process (main thread included) on it.
    let p = builder(&cluster).cpus(&[1]).start();
    let all = threads(p.pid());
    let (workers, union) = worker_affinity(&p);
    assert_eq!(workers, BTreeMap::from([(0, BTreeSet::from([1]))]), "{all:#?}");
    assert_eq!(union, BTreeSet::from([1]), "every thread only on core 1: {all:#?}");
    assert_startup_log(&p, &[(0, 1)]);
    // And it serves.
    runtime().block_on(async {
        let c = p.connect(USER, PASSWORD, "app_db").await.unwrap();
        c.simple_query("SELECT 1").await.unwrap();
    });
    let all = threads(p.pid());
    assert!(
        all.values().all(|c| *c == BTreeSet::from([1])),
        "threads after serving: {all:#?}"
    );
}

#[test]
fn a_core_not_available_is_refused_at_start() {
    let failed = Pgsilo::builder()
        .user("u", "p")
        .db(support::Db::at("127.0.0.1", 1, "db"))
        .cpus(&[4095])
        .expect_failure();
    assert_eq!(failed.status.and_then(|s| s.code()), Some(1), "{}", failed.stderr);
    assert!(failed.stderr.contains("4095"), "{}", failed.stderr);
}

#[test]
fn the_pool_cap_holds_across_workers() {
    let cluster = PgCluster::start();
    cluster.psql("app_db", "CREATE TABLE w (n int); GRANT ALL ON w TO PUBLIC;");
    let p = builder(&cluster).pool_mode("transaction").pool_size(3).start();
    let threads_now = threads(p.pid());
    let worker_count = threads_now.keys().filter(|n| n.starts_with("wk:w")).count();
    assert!(worker_count >= 1, "{threads_now:#?}");
    runtime().block_on(async {
        let su = connect_with(&cluster.superuser_conn_string("app_db").parse().unwrap())
            .await
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let max_seen = Arc::new(AtomicUsize::new(0));
        let watcher = {
            let (stop, max_seen) = (stop.clone(), max_seen.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let n: i64 = su
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity \
                             WHERE usename = 'md5_user' AND backend_type = 'client backend'",
                            &[],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    max_seen.fetch_max(n as usize, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        // 40 clients: the kernel spreads them over the workers' listeners.
        let mut tasks = Vec::new();
        for id in 0..40i32 {
            let config = p.pg_config(USER, Some(PASSWORD), "app_db");
            tasks.push(tokio::spawn(async move {
                let c = connect_with(&config).await.unwrap();
                for _ in 0..5 {
                    c.batch_execute(&format!(
                        "BEGIN; INSERT INTO w VALUES ({id}); SELECT pg_sleep(0.005); COMMIT"
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: {e:?}"));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        watcher.await.unwrap();
        let max = max_seen.load(Ordering::SeqCst);
        eprintln!("{worker_count} worker(s); most backends at once: {max}");
        assert!(max >= 1);
        assert!(max <= 3, "PostgreSQL saw {max} backends for pool_size = 3");
    });
    assert_eq!(cluster.psql("app_db", "SELECT count(*) FROM w"), "200");
}

/// Ten clients spread over two workers, one query each in turn on a pool of one server:
/// the server must follow the clients from worker to worker (without hand-over, a client
/// on the other worker would wait for query_wait_timeout and fail). Returns the server
/// pids seen, each with whether PostgreSQL says its connection is TLS.
fn one_server_follows_the_clients(p: &Pgsilo) -> BTreeSet<(i32, bool)> {
    runtime().block_on(async {
        let mut clients = Vec::new();
        for _ in 0..10 {
            clients.push(p.connect(USER, PASSWORD, "app_db").await.unwrap());
        }
        let mut pids = BTreeSet::new();
        for round in 0..3 {
            for (i, c) in clients.iter().enumerate() {
                let row = c
                    .query_one(
                        "SELECT pg_backend_pid(), (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
                        &[],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("round {round}, client {i}: {e:?}"));
                pids.insert((row.get::<_, i32>(0), row.get::<_, bool>(1)));
            }
        }
        pids
    })
}

#[test]
fn no_client_waits_while_another_worker_has_an_idle_server() {
    let Some(cluster) = two_cores_and_a_cluster() else {
        return;
    };
    let p = two_workers_one_server(&cluster).set("query_wait_timeout", "3").start();
    let pids = one_server_follows_the_clients(&p);
    assert_eq!(
        pids.len(),
        1,
        "one server, handed between workers rather than reopened: {pids:?}"
    );
}

/// The same over TLS to the server: a TLS connection moves between workers with its
/// rustls session (not as a bare descriptor, which would leave the keys behind).
#[test]
fn a_tls_server_connection_moves_between_workers_with_its_session() {
    let cores = available_cores();
    if cores.len() < 2 {
        eprintln!("skipped: needs two cores, this process may use {cores:?}");
        return;
    }
    let certs = support::TestCerts::temp();
    let cluster = PgCluster::builder().ssl(&certs).start();
    let p = two_workers_one_server(&cluster)
        .set("query_wait_timeout", "3")
        .set_str("server_tls_sslmode", "verify-full")
        .set_str("server_tls_ca_file", certs.ca_cert().to_str().unwrap())
        .start();
    let pids = one_server_follows_the_clients(&p);
    assert_eq!(pids.len(), 1, "one TLS server, handed between workers: {pids:?}");
    assert!(pids.iter().all(|(_, tls)| *tls), "{pids:?}");
}

/// Under saturation a server goes to the client that has waited longest, whichever
/// worker it is on: one worker whose own clients always wait must not keep the pool's
/// servers while the other worker's clients starve. Forty clients loop on a pool of one
/// server for three seconds; each client must get at least a quarter of the busiest
/// client's share (before, the clients of the worker not holding the server got next to
/// nothing until the other worker's queue happened to run dry).
#[test]
fn waiting_clients_on_both_workers_get_their_turn() {
    let Some(cluster) = two_cores_and_a_cluster() else {
        return;
    };
    let p = two_workers_one_server(&cluster).start();
    runtime().block_on(async {
        let mut clients = Vec::new();
        for _ in 0..40 {
            clients.push(p.connect(USER, PASSWORD, "app_db").await.unwrap());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (id, c) in clients.into_iter().enumerate() {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    c.simple_query("SELECT pg_sleep(0.001)")
                        .await
                        .unwrap_or_else(|e| panic!("client {id}: {e:?}"));
                    done += 1;
                }
                done
            }));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        let mut counts = Vec::new();
        for t in tasks {
            counts.push(t.await.unwrap());
        }
        let mut sorted = counts.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        eprintln!(
            "queries per client: min {} median {median} max {}",
            sorted[0],
            sorted[sorted.len() - 1]
        );
        let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
        assert!(max > 0, "{counts:?}");
        assert!(
            min * 4 >= max,
            "a client got {min} queries while another got {max}: {counts:?}"
        );
    });
}
