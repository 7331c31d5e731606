//! pgsilo-loadtest end to end: a few-second noisy-neighbour run against two real pgsilo
//! processes (one per tenant) in front of a throwaway PostgreSQL. Checks the report files
//! exist and parse, and that the victim's queries add up to rate × duration. No latency
//! is asserted: this machine is too noisy for that, and that is the demo's job.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgsilo_loadtest::hist::{parse_percentile_distribution, read_interval_log};
use pgsilo_loadtest::run::{read_summary, run, RunSpec};
use pgsilo_loadtest::scenario::{AggressorKind, Scenario};
use pgsilo_loadtest::target::Target;
use pgsilo_loadtest::victim::Phase;
use support::{free_port, wait_for_port, PgCluster};

/// A pgsilo process, stopped on drop.
struct Pgsilo {
    child: Child,
    log: PathBuf,
}

impl Pgsilo {
    /// Start one tenant serving `db`, with the given client budget and pool size.
    fn start(
        dir: &Path,
        name: &str,
        pg: &PgCluster,
        db: &str,
        max_client_conn: usize,
        pool_size: usize,
    ) -> (Pgsilo, u16) {
        let port = free_port();
        let config = dir.join(format!("{name}.toml"));
        fs::write(
            &config,
            format!(
                r#"
[pgsilo]
name = "{name}"
listen_addr = "127.0.0.1"
listen_port = {port}
auth_type = "scram-sha-256"
auth_file = "userlist.txt"
pool_mode = "transaction"
max_client_conn = {max_client_conn}
default_pool_size = {pool_size}

[databases.{db}]
host = "{host}"
port = {pg_port}
dbname = "{db}"
"#,
                host = pg.host(),
                pg_port = pg.port()
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pgsilo"))
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start pgsilo");
        wait_for_port(port, Duration::from_secs(30));
        (Pgsilo { child, log }, port)
    }
}

impl Drop for Pgsilo {
    fn drop(&mut self) {
        // SAFETY: a plain signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} ---\n{}",
                self.log.display(),
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

#[test]
fn a_short_noisy_neighbour_run_writes_complete_parseable_reports() {
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    // Plain passwords: pgsilo does SCRAM with clients and logs in to PostgreSQL with them.
    fs::write(
        dir.path().join("userlist.txt"),
        "\"user_a\" \"pass_a\"\n\"user_b\" \"pass_b\"\n",
    )
    .unwrap();
    // Tenant A (the aggressor) has small limits, so the aggressor passes them at once;
    // tenant B's pool covers the victim's connections and its connect probe.
    let (_a, port_a) = Pgsilo::start(dir.path(), "tenant_a", &pg, "tenant_a_db", 10, 3);
    let (_b, port_b) = Pgsilo::start(dir.path(), "tenant_b", &pg, "tenant_b_db", 20, 8);

    let mut scenario = Scenario::default();
    scenario.phases.warmup = Duration::from_millis(500);
    scenario.phases.duration = Duration::from_secs(2);
    scenario.victim.rate = 100.0;
    scenario.victim.connections = 4;
    scenario.victim.probe_rate = 2.0;
    // Every aggressor scenario, sized past tenant A's limits (10 clients, pool of 3): the
    // clients beyond 10 are refused as soon as they send their startup packet.
    scenario.aggressor.scenarios = vec![
        AggressorKind::Connections,
        AggressorKind::IdleInTransaction,
        AggressorKind::Throughput,
    ];
    scenario.aggressor.connections.clients = 12;
    scenario.aggressor.connections.retry = Duration::from_millis(300);
    scenario.aggressor.connections.ramp = Duration::from_millis(100);
    scenario.aggressor.idle_in_transaction.clients = 4;
    scenario.aggressor.throughput.clients = 2;

    let out = dir.path().join("report");
    let spec = RunSpec {
        label: "dedicated".into(),
        victim: Target::parse(
            &format!("host=127.0.0.1 port={port_b} user=user_b password=pass_b dbname=tenant_b_db"),
            "it-victim",
        )
        .unwrap(),
        aggressor: Some(
            Target::parse(
                &format!("host=127.0.0.1 port={port_a} user=user_a password=pass_a dbname=tenant_a_db"),
                "it-aggressor",
            )
            .unwrap(),
        ),
        scenario: scenario.clone(),
        out_dir: out.clone(),
    };
    let result = run(&spec).expect("the run completes");
    let s = &result.summary;
    eprintln!("{}", pgsilo_loadtest::report::full_text(s));

    // Every file is there.
    for name in [
        "victim_baseline.hgrm",
        "victim_contention.hgrm",
        "victim_recovery.hgrm",
        "victim_connect_baseline.hgrm",
        "victim_connect_contention.hgrm",
        "victim_connect_recovery.hgrm",
        "victim.hlog",
        "victim_latency.svg",
        "summary.txt",
        "summary.json",
    ] {
        let path = out.join(name);
        assert!(path.is_file(), "{} is missing", path.display());
        assert!(fs::metadata(&path).unwrap().len() > 0, "{name} is empty");
    }

    // Each phase scheduled rate × duration victim queries, and every one is accounted
    // for (answered or failed): none skipped, none lost.
    let expected = scenario.expected_per_phase();
    let mut logged_total = 0;
    for p in Phase::ALL {
        let ph = s.phase(p);
        assert!(
            (ph.queries as f64 - expected).abs() <= 2.0,
            "{}: {} queries accounted for, expected {expected}",
            ph.phase,
            ph.queries
        );
        // The .hgrm parses and holds every successful query of the phase.
        let text = fs::read_to_string(out.join(format!("victim_{}.hgrm", p.name()))).unwrap();
        let (rows, footer) = parse_percentile_distribution(&text).expect("hgrm parses");
        assert_eq!(footer.total_count, ph.latency.count);
        assert_eq!(ph.latency.count + ph.errors, ph.queries);
        assert!(!rows.is_empty() || ph.latency.count == 0);
        if let Some(last) = rows.last() {
            assert_eq!(last.total_count, footer.total_count);
            assert_eq!(last.percentile, 1.0);
        }
        let text = fs::read_to_string(out.join(format!("victim_connect_{}.hgrm", p.name()))).unwrap();
        let (_, footer) = parse_percentile_distribution(&text).expect("connect hgrm parses");
        assert_eq!(
            footer.total_count,
            ph.connect_attempts - ph.connect_errors,
            "{}: connect histogram",
            ph.phase
        );
        logged_total += ph.latency.count;
    }

    // The interval log decodes, tagged by phase, and adds up to the same queries.
    let log = read_interval_log(&fs::read(out.join("victim.hlog")).unwrap()).expect("hlog parses");
    assert!(log.len() >= 6, "{} intervals", log.len());
    assert_eq!(log.iter().map(|i| i.hist.len()).sum::<u64>(), logged_total);
    for p in Phase::ALL {
        assert!(log.iter().any(|i| i.tag.as_deref() == Some(p.name())));
    }

    // The chart names its lines and axes; the summaries carry the same numbers.
    let svg = fs::read_to_string(out.join("victim_latency.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    for text in ["baseline", "contention", "recovery", "percentile", "latency"] {
        assert!(svg.contains(text), "chart lacks {text:?}");
    }
    let json = read_summary(&out.join("summary.json")).expect("summary.json parses");
    assert_eq!(
        json["phases"][1]["queries"].as_u64(),
        Some(s.phase(Phase::Contention).queries)
    );
    let txt = fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(txt.contains("VERDICT [dedicated]"));

    // The aggressor really went past its limits: refused at max_client_conn, and all
    // three scenarios ran (the throughput clients may get no query through: the idle
    // transactions hold every server of the pool, which is the point).
    let agg = &s.aggressor_stats.by_kind;
    assert_eq!(agg.len(), 3, "{agg:?}");
    let conns = &agg["connections"];
    assert!(
        conns.connect_errors.by_code.contains_key("53300"),
        "the aggressor was never refused: {conns:?}"
    );
    for (kind, k) in agg {
        assert!(
            k.connect_ok + k.connect_errors.total() > 0,
            "{kind} never tried to connect"
        );
    }
    assert!(agg["idle-in-transaction"].queries_ok > 0, "{agg:?}");
}
