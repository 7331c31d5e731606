//! `systemd/pgsilo@.service` and `make install` / `make uninstall`, run by a real systemd:
//! a throwaway systemd-nspawn machine on an overlay of this host's root (see
//! `support::nspawn`), with PostgreSQL from `support::PgCluster` on the host.
//!
//! Inside the machine: `make install` (the unit, the user, the example configs as
//! installed), two tenants started with `systemctl start`, each on the core its
//! CPUAffinity= drop-in names, reachable only by its own users; `systemctl reload` picks
//! up a new auth_file user (and refuses a broken auth_file, keeping the service up);
//! `systemctl stop` ends them cleanly; a broken config fails `systemctl start` with the
//! `--check` messages in the journal; `make uninstall` stops the instances and removes the
//! binary and the unit, keeping the configs.
//!
//! Skipped, with the reason printed, unless run as root with systemd-nspawn installed
//! (Debian: `apt-get install systemd-container`), or when PGSILO_SKIP_SYSTEMD_TESTS=1.

mod support;

use std::fs;
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use support::nspawn::Machine;
use support::{free_port, PgCluster};
use tokio_postgres::NoTls;

/// How long to wait for a unit or a login to reach the wanted state (noisy machine).
const WAIT: Duration = Duration::from_secs(60);
const UNIT_A: &str = "pgsilo@tenant_a.service";
const UNIT_B: &str = "pgsilo@tenant_b.service";
const UNIT_BROKEN: &str = "pgsilo@broken.service";

#[test]
fn template_unit_under_systemd() {
    let make_missing = || {
        std::process::Command::new("make")
            .arg("--version")
            .output()
            .is_err()
            .then(|| "make not found (the test runs `make install` in the machine)".to_string())
    };
    if let Some(reason) = support::nspawn::unavailable().or_else(make_missing) {
        println!("SKIPPED systemd_unit::template_unit_under_systemd: {reason}");
        return;
    }
    let t0 = Instant::now();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // PostgreSQL on the host. The roles get the SCRAM verifiers of the example userlists,
    // so the configs `make install` puts in /etc/pgsilo work as installed (passthrough).
    let cluster = PgCluster::start();
    for (user, file) in [("user_a", "userlist_tenant_a.txt"), ("user_b", "userlist_tenant_b.txt")] {
        let verifier = userlist_secret(&src.join("config").join(file), user);
        assert!(verifier.starts_with("SCRAM-SHA-256$"), "{file}: {user}");
        cluster.psql("postgres", &format!("ALTER ROLE {user} PASSWORD '{verifier}'"));
    }
    cluster.psql(
        "postgres",
        "CREATE ROLE user_a2 LOGIN PASSWORD 'pass_a2'; \
         GRANT CONNECT ON DATABASE tenant_a_db TO user_a2;",
    );
    let t_pg = t0.elapsed();

    let machine = Machine::builder()
        .bind_ro(src, "/pgsilo-src")
        .bind_ro(env!("CARGO_BIN_EXE_pgsilo"), "/pgsilo-bin/pgsilo")
        .boot();
    let t_boot = t0.elapsed() - t_pg;
    println!(
        "machine {} (PID 1 = host pid {}) up in {t_boot:.2?}",
        machine.name(),
        machine.leader()
    );

    // --- make install, as an admin would run it (no DESTDIR): user, unit, configs.
    // Whatever the host itself has installed must not leak into the test.
    machine.sh("rm -rf /etc/pgsilo /etc/systemd/system/pgsilo@* /usr/local/bin/pgsilo
         if getent passwd pgsilo >/dev/null; then userdel pgsilo; fi
         if getent group pgsilo >/dev/null; then groupdel pgsilo; fi
         systemctl daemon-reload");
    let out = machine.run_ok(&[
        "make",
        "-C",
        "/pgsilo-src",
        "--no-print-directory",
        "install",
        "PGSILO_BIN=/pgsilo-bin/pgsilo",
    ]);
    println!("--- make install\n{out}");
    let modes = machine.run_ok(&[
        "stat",
        "-c",
        "%n %a %U:%G",
        "/usr/local/bin/pgsilo",
        "/etc/systemd/system/pgsilo@.service",
        "/etc/pgsilo",
        "/etc/pgsilo/tenant_a.toml",
        "/etc/pgsilo/tenant_b.toml",
        "/etc/pgsilo/userlist_tenant_a.txt",
        "/etc/pgsilo/userlist_tenant_b.txt",
    ]);
    assert_eq!(
        modes.lines().collect::<Vec<_>>(),
        [
            "/usr/local/bin/pgsilo 755 root:root",
            "/etc/systemd/system/pgsilo@.service 644 root:root",
            "/etc/pgsilo 750 root:pgsilo",
            "/etc/pgsilo/tenant_a.toml 640 root:pgsilo",
            "/etc/pgsilo/tenant_b.toml 640 root:pgsilo",
            "/etc/pgsilo/userlist_tenant_a.txt 640 root:pgsilo",
            "/etc/pgsilo/userlist_tenant_b.txt 640 root:pgsilo",
        ]
    );
    let user = machine.run_ok(&["getent", "passwd", "pgsilo"]);
    assert!(user.contains(":/nonexistent:"), "{user}");
    // The unit file as installed passes systemd's own checks.
    machine.run_ok(&["systemd-analyze", "verify", UNIT_A]);
    let security = machine.run_ok(&["systemd-analyze", "security", "--no-pager", UNIT_A]);
    println!(
        "systemd-analyze security: {}",
        security.lines().last().unwrap_or("").trim()
    );

    // --- Point the installed configs at the test's PostgreSQL and at free ports; cores
    // come from drop-ins (the installed configs carry no active `cpus` line).
    let allowed = allowed_cores();
    let tenants = [
        (UNIT_A, "tenant_a", 6432, free_port(), allowed[0]),
        (UNIT_B, "tenant_b", 6433, free_port(), allowed[1 % allowed.len()]),
    ];
    for &(unit, tenant, example_port, port, core) in &tenants {
        let path = machine.path(&format!("/etc/pgsilo/{tenant}.toml"));
        let toml = fs::read_to_string(&path).unwrap();
        assert!(
            !toml.lines().any(|l| l.trim_start().starts_with("cpus")),
            "installed {tenant}.toml still pins cores:\n{toml}"
        );
        let listen = format!("listen_port = {example_port}\n");
        let db = "port = 54320\n";
        assert!(toml.contains(&listen) && toml.contains(db), "{toml}");
        let toml = toml
            .replace(&listen, &format!("listen_port = {port}\n"))
            .replace(db, &format!("port = {}\n", cluster.port()));
        fs::write(&path, toml).unwrap(); // same file: owner and mode stay
        let dropin = machine.path(&format!("/etc/systemd/system/{unit}.d"));
        fs::create_dir_all(&dropin).unwrap();
        fs::write(dropin.join("cpus.conf"), format!("[Service]\nCPUAffinity={core}\n")).unwrap();
    }
    machine.run_ok(&["systemctl", "daemon-reload"]);
    let (port_a, port_b) = (tenants[0].3, tenants[1].3);

    // --- Start: Type=notify, so `systemctl start` returns once every worker listens.
    let t = Instant::now();
    machine.run_ok(&["systemctl", "start", UNIT_A, UNIT_B]);
    println!("systemctl start {UNIT_A} {UNIT_B}: {:.2?}", t.elapsed());
    let mut main_pids = Vec::new();
    for &(unit, tenant, _, port, core) in &tenants {
        assert_eq!(machine.unit_state(unit), "active", "{unit}");
        let status = machine.unit_property(unit, "StatusText");
        assert!(
            status.contains(&format!(":{port} with 1 worker(s)")),
            "{unit} STATUS=: {status:?}"
        );
        let pid: u32 = machine.unit_property(unit, "MainPID").parse().unwrap();
        assert!(pid > 0, "{unit} has no main PID");
        // Every thread of the process on the drop-in's core (nspawn gives the machine its
        // own PID namespace: read its /proc from inside).
        let lists = machine.sh(&format!(
            "grep -h '^Cpus_allowed_list:' /proc/{pid}/status /proc/{pid}/task/*/status"
        ));
        let lists: Vec<&str> = lists
            .lines()
            .map(|l| l.trim_start_matches("Cpus_allowed_list:").trim())
            .collect();
        assert!(lists.len() >= 3, "{unit}: process, main thread, worker: {lists:?}");
        assert!(
            lists.iter().all(|l| *l == core.to_string()),
            "{unit} (CPUAffinity={core}): Cpus_allowed_list of pid {pid} and its threads: {lists:?}"
        );
        let journal = machine.journal(unit);
        let driver = journal
            .lines()
            .find_map(|l| l.split_once(" with the ")?.1.strip_suffix(" driver"))
            .unwrap_or_else(|| panic!("{unit}: no worker driver line in the journal:\n{journal}"));
        assert!(matches!(driver, "io_uring" | "epoll"), "{driver}");
        println!("{tenant}: main pid {pid} (in the machine), core {core}, {driver} driver");
        main_pids.push(pid);
    }

    // Each tenant's port lets in its own users only.
    let ok = |port, user, password, db| {
        rt.block_on(login(port, user, password, db))
            .unwrap_or_else(|e| panic!("{user}@{db} on port {port}: {e}"))
    };
    assert_eq!(ok(port_a, "user_a", "pass_a", "tenant_a_db"), "user_a@tenant_a_db");
    assert_eq!(ok(port_b, "user_b", "pass_b", "tenant_b_db"), "user_b@tenant_b_db");
    for (port, user, password, db) in [
        (port_b, "user_a", "pass_a", "tenant_b_db"),
        (port_b, "user_a", "pass_a", "tenant_a_db"),
        (port_a, "user_b", "pass_b", "tenant_a_db"),
    ] {
        let err = rt
            .block_on(login(port, user, password, db))
            .expect_err(&format!("{user} must not log in on port {port}"));
        println!("{user}@{db} on port {port} refused: {err}");
    }

    // --- Reload: a user added to tenant A's auth_file can log in afterwards.
    let userlist = machine.path("/etc/pgsilo/userlist_tenant_a.txt");
    let original = fs::read_to_string(&userlist).unwrap();
    assert!(
        rt.block_on(login(port_a, "user_a2", "pass_a2", "tenant_a_db")).is_err(),
        "user_a2 logged in before being added"
    );
    let with_a2 = format!("{original}\"user_a2\" \"pass_a2\"\n");
    fs::write(&userlist, &with_a2).unwrap();
    machine.run_ok(&["systemctl", "reload", UNIT_A]);
    // systemd 252 has no Type=notify-reload: `reload` returns once SIGHUP is sent.
    let who = machine.wait_for("user_a2 logs in after the reload", WAIT, || {
        rt.block_on(login(port_a, "user_a2", "pass_a2", "tenant_a_db"))
    });
    assert_eq!(who, "user_a2@tenant_a_db");
    machine.wait_for("the reload is logged", WAIT, || {
        let journal = machine.journal(UNIT_A);
        journal
            .contains("reloaded configuration and auth_file")
            .then_some(())
            .ok_or(journal)
    });
    assert_eq!(machine.unit_state(UNIT_A), "active");
    assert_eq!(
        machine.unit_property(UNIT_A, "MainPID"),
        main_pids[0].to_string(),
        "reload must not restart the process"
    );

    // --- systemctl status of both tenants, printed for the record.
    let status = machine.run(&[
        "systemctl",
        "status",
        "--no-pager",
        "--full",
        "--lines=8",
        UNIT_A,
        UNIT_B,
    ]);
    println!(
        "--- systemctl status {UNIT_A} {UNIT_B}\n{}---",
        String::from_utf8_lossy(&status.stdout)
    );
    assert!(status.status.success(), "systemctl status: {}", status.status);

    // A broken auth_file: `systemctl reload` fails (ExecReload runs --check first), the
    // service keeps running with what it had.
    fs::write(&userlist, format!("{with_a2}this is not a userlist line\n")).unwrap();
    let out = machine.run(&["systemctl", "reload", UNIT_A]);
    assert!(!out.status.success(), "reload with a broken auth_file succeeded");
    assert_eq!(machine.unit_state(UNIT_A), "active");
    assert_eq!(ok(port_a, "user_a2", "pass_a2", "tenant_a_db"), "user_a2@tenant_a_db");
    fs::write(&userlist, &with_a2).unwrap();

    // --- Stop: both end cleanly (inactive, not failed), processes and listeners gone.
    let t = Instant::now();
    machine.run_ok(&["systemctl", "stop", UNIT_A, UNIT_B]);
    println!("systemctl stop: {:.2?}", t.elapsed());
    for (&(unit, _, _, port, _), pid) in tenants.iter().zip(&main_pids) {
        assert_eq!(machine.unit_state(unit), "inactive", "{unit}");
        assert_eq!(machine.unit_property(unit, "Result"), "success", "{unit}");
        assert_eq!(machine.unit_property(unit, "MainPID"), "0", "{unit}");
        let gone = machine.run(&["test", "-e", &format!("/proc/{pid}")]);
        assert!(!gone.status.success(), "{unit}: pid {pid} still exists");
        machine.wait_for(
            &format!("port {port} closed"),
            WAIT,
            || match TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(1)) {
                Ok(_) => Err("still accepting".to_string()),
                Err(_) => Ok(()),
            },
        );
        let journal = machine.journal(unit);
        assert!(journal.contains("got SIGINT"), "{unit}: KillSignal=SIGINT:\n{journal}");
    }

    // --- Where io_uring is blocked, the filter's EPERM makes pgsilo fall back to epoll
    // (SystemCallErrorNumber=EPERM: the process is not killed).
    fs::write(
        machine.path(&format!("/etc/systemd/system/{UNIT_B}.d/no-io_uring.conf")),
        "[Service]\nSystemCallFilter=~io_uring_setup io_uring_enter io_uring_register\n",
    )
    .unwrap();
    machine.run_ok(&["systemctl", "daemon-reload"]);
    machine.run_ok(&["systemctl", "start", UNIT_B]);
    let driver = machine
        .journal(UNIT_B)
        .lines()
        .filter_map(|l| l.split_once(" with the ")?.1.strip_suffix(" driver"))
        .next_back()
        .map(str::to_string);
    assert_eq!(driver.as_deref(), Some("epoll"), "io_uring denied: driver");
    assert_eq!(ok(port_b, "user_b", "pass_b", "tenant_b_db"), "user_b@tenant_b_db");
    println!("tenant_b with io_uring denied by the filter: epoll driver, serving");
    machine.run_ok(&["systemctl", "stop", UNIT_B]);
    assert_eq!(machine.unit_property(UNIT_B, "Result"), "success");

    // --- A broken config: `systemctl start` fails, the journal has --check's messages.
    fs::write(
        machine.path("/etc/pgsilo/broken.toml"),
        "[pgsilo]\nlisten_port = 0\nauth_file = \"userlist_tenant_a.txt\"\n\
         pool_mode = \"sometimes\"\n\n[databases.broken_db]\nhost = \"127.0.0.1\"\n",
    )
    .unwrap();
    let check = machine.run(&["/usr/local/bin/pgsilo", "--check", "/etc/pgsilo/broken.toml"]);
    assert!(!check.status.success(), "--check accepted broken.toml");
    let problems = String::from_utf8_lossy(&check.stderr).into_owned();
    assert!(problems.contains("listen_port"), "{problems}");
    let out = machine.run(&["systemctl", "start", UNIT_BROKEN]);
    assert!(!out.status.success(), "systemctl start {UNIT_BROKEN} succeeded");
    let journal = machine.wait_for("--check's messages in the journal", WAIT, || {
        let journal = machine.journal(UNIT_BROKEN);
        match problems.lines().find(|l| !journal.contains(l.trim())) {
            None => Ok(journal),
            Some(missing) => Err(format!("missing {missing:?} in:\n{journal}")),
        }
    });
    println!(
        "--- journalctl -u {UNIT_BROKEN} (first attempt)\n{}\n---",
        journal
            .lines()
            .take(problems.lines().count() + 4)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_ne!(machine.unit_state(UNIT_BROKEN), "active");
    machine.run_ok(&["systemctl", "stop", UNIT_BROKEN]); // ends Restart='s retries
    let _ = machine.run(&["systemctl", "reset-failed", UNIT_BROKEN]);

    // --- make uninstall: stops what runs, removes binary and unit, keeps the configs.
    machine.run_ok(&["systemctl", "start", UNIT_A]);
    let out = machine.run_ok(&["make", "-C", "/pgsilo-src", "--no-print-directory", "uninstall"]);
    println!("--- make uninstall\n{out}");
    assert_ne!(machine.unit_state(UNIT_A), "active");
    assert!(!machine.path("/usr/local/bin/pgsilo").exists());
    assert!(!machine.path("/etc/systemd/system/pgsilo@.service").exists());
    assert!(machine.path("/etc/pgsilo/tenant_a.toml").exists());
    assert!(machine.path("/etc/pgsilo/userlist_tenant_a.txt").exists());

    println!(
        "systemd unit test: {:.2?} in all (PostgreSQL {t_pg:.2?}, boot {t_boot:.2?})",
        t0.elapsed()
    );
    drop(machine);
    drop(cluster);
}

/// The secret of `user` in a userlist.txt (`"user" "secret"` lines).
fn userlist_secret(path: &Path, user: &str) -> String {
    let text = fs::read_to_string(path).unwrap();
    let prefix = format!("\"{user}\" \"");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{user} not in {}", path.display()))
        .to_string()
}

/// The cores this process may run on (Cpus_allowed_list of /proc/self/status).
fn allowed_cores() -> Vec<usize> {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    let mut cores = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cores.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => cores.push(part.parse().unwrap()),
        }
    }
    assert!(!cores.is_empty());
    cores
}

/// Logs in through pgsilo and returns "user@database" as the server sees it.
async fn login(port: u16, user: &str, password: &str, db: &str) -> Result<String, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(db)
        .connect_timeout(Duration::from_secs(20));
    let attempt = async {
        let (client, connection) = config.connect(NoTls).await.map_err(describe)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let row = client
            .query_one("SELECT current_user::text || '@' || current_database()::text", &[])
            .await
            .map_err(describe)?;
        Ok(row.get::<_, String>(0))
    };
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

fn describe(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => format!("{e:?}"),
    }
}
