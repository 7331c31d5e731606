//! PgBouncer configs read as they are: the per-tenant setup pgsilo replaces
//! (`pgbouncer_tenant_a.ini`, `userlist_tenant_a.txt`, one process per tenant) run from
//! its own files, and the ini features a migration meets (`%include`, connection strings
//! with quotes, the `*` database, `[users]`, unsupported keys, `--strict`, `convert`),
//! end to end against a real PostgreSQL.

mod support;

use std::fs::{self, File};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{connect_with, db_error, free_port, must_fail, pgsilo_bin, runtime, simple_rows, PgCluster};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A pgsilo started from a config file with `std::process::Command`, as systemd would:
/// `pgsilo FILE`, in `cwd`. Stopped (SIGINT, then SIGKILL) on drop.
struct Bouncer {
    child: Child,
    port: u16,
    log_path: PathBuf,
}

impl Bouncer {
    fn start(config: &Path, cwd: &Path, port: u16) -> Bouncer {
        let log_path = cwd.join(config).with_extension("log");
        let log = File::create(&log_path).unwrap();
        let child = Command::new(pgsilo_bin())
            .arg(config)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", pgsilo_bin()));
        let mut b = Bouncer { child, port, log_path };
        let deadline = Instant::now() + START_TIMEOUT;
        while !b.log().contains("listening on ") {
            if let Ok(Some(status)) = b.child.try_wait() {
                panic!("pgsilo {} exited ({status}):\n{}", config.display(), b.log());
            }
            assert!(Instant::now() < deadline, "pgsilo did not start:\n{}", b.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        b
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Connects through the Unix socket in `dir`, as PgBouncer's clients do when
    /// listen_addr is not set.
    async fn connect_unix(
        &self,
        dir: &str,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(dir)
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(30));
        connect_with(&cfg).await
    }

    async fn connect_tcp(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(30));
        connect_with(&cfg).await
    }

    fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("pgsilo on port {} logged:\n{}", self.port, self.log());
        }
        let pid = self.child.id() as i32;
        // SAFETY: our own child, not yet reaped: the pid is still ours.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(pgsilo_bin())
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("run pgsilo {args:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn who(client: &tokio_postgres::Client) -> (String, String) {
    let row = client
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The seed's two tenants: their ini files and userlists exactly as they run under
/// PgBouncer (only the ports are free ones and the auth_file paths point into the test's
/// folder), with the `[databases]` entry each needs. No listen_addr: as under PgBouncer,
/// clients reach each tenant through its Unix socket in /tmp.
#[test]
fn seed_tenants_run_from_their_pgbouncer_files_unchanged() {
    let cluster = PgCluster::start();
    let dir = tempfile::Builder::new().prefix("pgsilo-ini-").tempdir().unwrap();
    let etc = dir.path();
    fs::write(etc.join("userlist_tenant_a.txt"), "\"user_a\" \"pass_a\"\n").unwrap();
    fs::write(etc.join("userlist_tenant_b.txt"), "\"user_b\" \"pass_b\"\n").unwrap();
    let tenant = |name: &str, port: u16, max_client_conn: u32| {
        let ini = etc.join(format!("pgbouncer_{name}.ini"));
        let text = format!(
            "[pgbouncer]\n\
             listen_port = {port}\n\
             auth_file = {}/userlist_{name}.txt\n\
             max_client_conn = {max_client_conn}\n\
             \n\
             [databases]\n\
             {name}_db = host={} port={} dbname={name}_db\n",
            etc.display(),
            cluster.host(),
            cluster.port(),
        );
        fs::write(&ini, text).unwrap();
        ini
    };
    let (port_a, port_b) = (free_port(), free_port());
    let ini_a = tenant("tenant_a", port_a, 100);
    let ini_b = tenant("tenant_b", port_b, 50);

    // `--check` takes the files as they are.
    for ini in [&ini_a, &ini_b] {
        let out = run(&["--check", ini.to_str().unwrap()], etc);
        assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
        assert!(text(&out.stdout).contains("configuration ok (1 database(s), 1 user(s)"));
        assert!(
            text(&out.stderr)
                .contains("listen_addr is not set: as in PgBouncer, clients connect through the Unix socket"),
            "{}",
            text(&out.stderr)
        );
    }

    // Started from `/`, as systemd starts a unit.
    let a = Bouncer::start(&ini_a, Path::new("/"), port_a);
    let b = Bouncer::start(&ini_b, Path::new("/"), port_b);
    runtime().block_on(async {
        // Each tenant serves its own users on its own port.
        let client = a.connect_unix("/tmp", "user_a", "pass_a", "tenant_a_db").await.unwrap();
        assert_eq!(who(&client).await, ("user_a".into(), "tenant_a_db".into()));
        drop(client);
        let client = b.connect_unix("/tmp", "user_b", "pass_b", "tenant_b_db").await.unwrap();
        assert_eq!(who(&client).await, ("user_b".into(), "tenant_b_db".into()));
        drop(client);

        // Database isolation: tenant A's pooler does not know tenant B's database.
        let err = must_fail(
            a.connect_unix("/tmp", "user_a", "pass_a", "tenant_b_db").await,
            "A must refuse tenant_b_db",
        );
        assert_eq!(db_error(&err), ("3D000".into(), "no such database: tenant_b_db".into()));

        // Authentication isolation: user_a is not in tenant B's userlist.
        let err = must_fail(
            b.connect_unix("/tmp", "user_a", "pass_a", "tenant_b_db").await,
            "B must refuse user_a",
        );
        let (code, message) = db_error(&err);
        assert_eq!(code, "28P01");
        assert!(message.starts_with("password authentication failed"), "{message}");
    });
    // No listen_addr, no TCP: what PgBouncer does with these files.
    for port in [port_a, port_b] {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "TCP port {port} must not be open"
        );
    }

    // PgBouncer's log lines for the same events.
    let log = a.wait_for_log("closing because: no such database: tenant_b_db");
    assert!(
        log.contains("tenant_a_db/user_a@unix") && log.contains("login attempt: db=tenant_a_db user=user_a tls=no"),
        "{log}"
    );
    assert!(log.contains("closing because: client close request (age="), "{log}");
    assert!(log.contains("pooler error: no such database: tenant_b_db"), "{log}");
    let log = b.wait_for_log("closing because: password authentication failed");
    assert!(log.contains("pooler error: password authentication failed"), "{log}");

    // `convert` prints TOML that loads to the same configuration.
    for (ini, max_client_conn) in [(&ini_a, 100), (&ini_b, 50)] {
        let out = run(&["convert", ini.to_str().unwrap()], etc);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let toml_text = text(&out.stdout);
        assert!(
            toml_text.contains(&format!("max_client_conn = {max_client_conn}")),
            "{toml_text}"
        );
        let toml = etc
            .join("converted")
            .join(ini.with_extension("toml").file_name().unwrap());
        fs::create_dir_all(toml.parent().unwrap()).unwrap();
        fs::write(&toml, &toml_text).unwrap();
        let mut from_ini = pgsilo::config::Config::load(ini).unwrap();
        let from_toml = pgsilo::config::Config::load(&toml).unwrap_or_else(|e| panic!("{e}\n{toml_text}"));
        from_ini.path = from_toml.path.clone();
        assert_eq!(from_ini, from_toml);
    }
}

/// A PgBouncer config using what migrations meet: a relative auth_file and `%include`
/// (taken from the directory pgsilo starts in, as PgBouncer does), quoted connection
/// string values, a forced user, the `*` database, a `[users]` pool_mode, comments, and a
/// key pgsilo does not implement (a warning, and an error with `--strict`).
#[test]
fn pgbouncer_ini_features_work_end_to_end() {
    let cluster = PgCluster::start();
    let dir = tempfile::Builder::new().prefix("pgsilo-ini-").tempdir().unwrap();
    let etc = dir.path();
    let port = free_port();
    let (host, pg_port) = (cluster.host(), cluster.port());
    fs::write(
        etc.join("userlist.txt"),
        "\"user_a\" \"pass_a\"\n\"user_b\" \"pass_b\"\n\"admin\" \"admin_pass\"\n",
    )
    .unwrap();
    fs::write(
        etc.join("databases.ini"),
        format!(
            "[databases]\n\
             # the owner's database, as PgBouncer users write it\n\
             tenant_a_db = host={host} port={pg_port}\n\
             ; a forced server login, with quoted values\n\
             as_owner = host={host} port={pg_port} dbname='tenant_a_db' user=user_a password='pass_a'\n\
             * = host={host} port={pg_port} pool_mode=session\n\
             \n\
             [users]\n\
             user_b = pool_mode=transaction\n"
        ),
    )
    .unwrap();
    let ini = etc.join("pgbouncer.ini");
    fs::write(
        &ini,
        format!(
            ";; migrated as it was\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = md5\n\
             auth_file = userlist.txt\n\
             admin_users = admin\n\
             logfile = /var/log/pgbouncer/pgbouncer.log\n\
             syslog = 0\n\
             log_stats = 0\n\
             \n\
             %include databases.ini\n"
        ),
    )
    .unwrap();

    // Unsupported keys are warned about by name (and what pgsilo does instead), or refused.
    let out = run(&["--check", "pgbouncer.ini"], etc);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "warning: pgbouncer.ini line 9: logfile = /var/log/pgbouncer/pgbouncer.log in [pgbouncer]: not supported; pgsilo logs to stderr"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("note: pgbouncer.ini line 10: syslog = 0 in [pgbouncer]"),
        "{stderr}"
    );
    let out = run(&["--check", "--strict", "pgbouncer.ini"], etc);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("logfile = /var/log/pgbouncer/pgbouncer.log in [pgbouncer]: not supported"));
    assert!(text(&out.stderr).contains("(refused with --strict)"));

    let silo = Bouncer::start(Path::new("pgbouncer.ini"), etc, port);
    assert!(
        silo.log().contains("WARNING pgbouncer.ini line 9: logfile"),
        "{}",
        silo.log()
    );
    runtime().block_on(async {
        let client = silo.connect_tcp("user_a", "pass_a", "tenant_a_db").await.unwrap();
        assert_eq!(who(&client).await, ("user_a".into(), "tenant_a_db".into()));

        // The forced user: user_b logs in to pgsilo, the server sees user_a.
        let client = silo.connect_tcp("user_b", "pass_b", "as_owner").await.unwrap();
        assert_eq!(who(&client).await, ("user_a".into(), "tenant_a_db".into()));

        // `*`: a database no entry names goes to the same server, in the database asked
        // for; one that does not exist there is PostgreSQL's answer, not pgsilo's.
        let other = silo.connect_tcp("user_b", "pass_b", "tenant_b_db").await.unwrap();
        assert_eq!(who(&other).await, ("user_b".into(), "tenant_b_db".into()));
        let err = must_fail(
            silo.connect_tcp("user_b", "pass_b", "nope_db").await,
            "nope_db does not exist on the server",
        );
        assert_eq!(db_error(&err).0, "3D000");
        assert!(
            db_error(&err).1.contains("\"nope_db\" does not exist"),
            "{:?}",
            db_error(&err)
        );

        // [users]: user_b's pools are in transaction mode, whatever the database says.
        let admin = silo.connect_tcp("admin", "admin_pass", "pgbouncer").await.unwrap();
        let (_, pools) = simple_rows(&admin, "SHOW POOLS").await.unwrap();
        let mode = |db: &str, user: &str| {
            pools
                .iter()
                .find(|r| r["database"].as_deref() == Some(db) && r["user"].as_deref() == Some(user))
                .and_then(|r| r["pool_mode"].clone())
                .unwrap_or_else(|| panic!("no pool {db}/{user} in {pools:?}"))
        };
        assert_eq!(mode("tenant_a_db", "user_a"), "session");
        assert_eq!(mode("tenant_b_db", "user_b"), "transaction");
        drop(other);

        // SIGHUP reads the ini and what it includes again, from the same directory.
        let mut databases = fs::read_to_string(etc.join("databases.ini")).unwrap();
        databases = databases.replace(
            "* = ",
            &format!("renamed = host={host} port={pg_port} dbname=tenant_a_db\n* = "),
        );
        fs::write(etc.join("databases.ini"), databases).unwrap();
        // SAFETY: our own child, still running.
        unsafe { libc::kill(silo.child.id() as i32, libc::SIGHUP) };
        silo.wait_for_log("reloaded configuration");
        let client = silo.connect_tcp("user_a", "pass_a", "renamed").await.unwrap();
        assert_eq!(who(&client).await, ("user_a".into(), "tenant_a_db".into()));
    });
    assert!(!silo.log().contains(" LOG stats: "), "log_stats = 0");
}
