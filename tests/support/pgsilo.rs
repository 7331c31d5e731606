//! A real pgsilo process for integration tests: config and auth_file written into a temp
//! dir, the binary started on a free port, its log captured, stopped on drop.
//!
//! ```ignore
//! let cluster = PgCluster::start();
//! let pgsilo = Pgsilo::builder()
//!     .pool_mode("transaction")
//!     .pool_size(2)
//!     .auth_type("scram-sha-256")
//!     .user("user_a", "pass_a")
//!     .database("tenant_a_db", &cluster)
//!     .set("max_client_conn", "5")
//!     .start();
//! let client = pgsilo.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
//! ```
//!
//! Values given to [`PgsiloBuilder::set`] are TOML literals (`"5"`, `"[0, 1]"`,
//! `"\"md5\""`); the typed helpers quote for you. Later settings of the same key win.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::ports::free_port;
use super::postgres::PgCluster;

/// How long a pgsilo may take to start listening (the machine is small and noisy).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long each shutdown signal gets before the next, stronger one.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The line pgsilo logs once every worker accepts clients.
const READY_LINE: &str = "listening on ";

/// The path of the pgsilo binary cargo built for these tests.
pub fn pgsilo_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgsilo")
}

/// Quotes text as a TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A `[databases.NAME]` table.
#[derive(Clone, Debug)]
pub struct Db {
    name: String,
    /// (key, TOML literal), in order.
    keys: Vec<(String, String)>,
}

impl Db {
    /// `NAME` on the cluster: host and port of `cluster`, `dbname = NAME`.
    pub fn on(cluster: &PgCluster, name: &str) -> Db {
        Db::at(cluster.host(), cluster.port(), name)
    }

    /// `NAME` at host:port (e.g. a closed port, for "server unreachable").
    pub fn at(host: &str, port: u16, name: &str) -> Db {
        Db {
            name: name.to_owned(),
            keys: Vec::new(),
        }
        .set("host", &toml_str(host))
        .set("port", &port.to_string())
        .set("dbname", &toml_str(name))
    }

    /// The database on the server, when it differs from the name clients use.
    pub fn dbname(self, dbname: &str) -> Db {
        self.set("dbname", &toml_str(dbname))
    }

    /// Forced server user.
    pub fn user(self, user: &str) -> Db {
        self.set("user", &toml_str(user))
    }

    /// The forced user's password.
    pub fn password(self, password: &str) -> Db {
        self.set("password", &toml_str(password))
    }

    pub fn pool_size(self, n: usize) -> Db {
        self.set("pool_size", &n.to_string())
    }

    pub fn pool_mode(self, mode: &str) -> Db {
        self.set("pool_mode", &toml_str(mode))
    }

    /// Any key, value as a TOML literal; replaces an earlier value of the same key.
    pub fn set(mut self, key: &str, toml_value: &str) -> Db {
        self.keys.retain(|(k, _)| k != key);
        self.keys.push((key.to_owned(), toml_value.to_owned()));
        self
    }
}

/// Options for a pgsilo process; see [`Pgsilo::builder`].
#[derive(Clone, Debug)]
pub struct PgsiloBuilder {
    port: Option<u16>,
    /// `[pgsilo]` (key, TOML literal), in order.
    settings: Vec<(String, String)>,
    /// Raw lines appended to `[pgsilo]` (may be anything, e.g. an unknown key).
    extra: Vec<String>,
    databases: Vec<Db>,
    userlist: Vec<String>,
    /// Extra command-line arguments before the config path (e.g. `--takeover`).
    args: Vec<String>,
    /// RLIMIT_NOFILE (soft, hard) to start the process with; None: this process's.
    nofile: Option<(u64, u64)>,
}

impl PgsiloBuilder {
    /// `name` (default "t"; thread names are `NAME:wN`, Linux keeps 15 bytes).
    pub fn name(self, name: &str) -> Self {
        self.set("name", &toml_str(name))
    }

    /// `listen_port` (default: a free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// `auth_type` (default "scram-sha-256").
    pub fn auth_type(self, auth_type: &str) -> Self {
        self.set("auth_type", &toml_str(auth_type))
    }

    /// `pool_mode` (default "transaction").
    pub fn pool_mode(self, mode: &str) -> Self {
        self.set("pool_mode", &toml_str(mode))
    }

    /// `default_pool_size`.
    pub fn pool_size(self, n: usize) -> Self {
        self.set("default_pool_size", &n.to_string())
    }

    pub fn max_client_conn(self, n: usize) -> Self {
        self.set("max_client_conn", &n.to_string())
    }

    /// `cpus = [..]`.
    pub fn cpus(self, cpus: &[usize]) -> Self {
        let list: Vec<String> = cpus.iter().map(usize::to_string).collect();
        self.set("cpus", &format!("[{}]", list.join(", ")))
    }

    /// Any `[pgsilo]` key, value as a TOML literal (`"5"`, `"\"DISCARD ALL\""`).
    pub fn set(mut self, key: &str, toml_value: &str) -> Self {
        self.settings.retain(|(k, _)| k != key);
        self.settings.push((key.to_owned(), toml_value.to_owned()));
        self
    }

    /// Any `[pgsilo]` key with a string value.
    pub fn set_str(self, key: &str, value: &str) -> Self {
        self.set(key, &toml_str(value))
    }

    /// Removes a `[pgsilo]` key (to fall back to pgsilo's default).
    pub fn unset(mut self, key: &str) -> Self {
        self.settings.retain(|(k, _)| k != key);
        self
    }

    /// Starts pgsilo with this open-file limit (soft, hard) instead of the test's.
    pub fn nofile_limit(mut self, soft: u64, hard: u64) -> Self {
        self.nofile = Some((soft, hard));
        self
    }

    /// An extra command-line argument, given before the config path (e.g. `--takeover`).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// A raw line for the `[pgsilo]` section, written as is after the settings.
    pub fn extra(mut self, line: &str) -> Self {
        self.extra.push(line.to_owned());
        self
    }

    /// An auth_file entry `"user" "secret"`.
    pub fn user(mut self, user: &str, secret: &str) -> Self {
        self.userlist.push(format!(
            "\"{}\" \"{}\"",
            user.replace('"', "\"\""),
            secret.replace('"', "\"\"")
        ));
        self
    }

    /// A raw auth_file line.
    pub fn userlist_line(mut self, line: &str) -> Self {
        self.userlist.push(line.to_owned());
        self
    }

    /// `[databases.NAME]` on the cluster (see [`Db::on`]).
    pub fn database(self, name: &str, cluster: &PgCluster) -> Self {
        self.db(Db::on(cluster, name))
    }

    pub fn db(mut self, db: Db) -> Self {
        self.databases.retain(|d| d.name != db.name);
        self.databases.push(db);
        self
    }

    /// The config file text for `port` (auth_file is `userlist.txt` next to it).
    pub fn config_text(&self, port: u16) -> String {
        let mut t = String::from("[pgsilo]\n");
        let _ = writeln!(t, "listen_port = {port}");
        let _ = writeln!(t, "auth_file = \"userlist.txt\"");
        for (k, v) in &self.settings {
            let _ = writeln!(t, "{k} = {v}");
        }
        for line in &self.extra {
            let _ = writeln!(t, "{line}");
        }
        for db in &self.databases {
            let _ = writeln!(t, "\n[databases.{}]", toml_str(&db.name));
            for (k, v) in &db.keys {
                let _ = writeln!(t, "{k} = {v}");
            }
        }
        t
    }

    pub fn userlist_text(&self) -> String {
        let mut t = self.userlist.join("\n");
        t.push('\n');
        t
    }

    /// Writes `pgsilo.toml` and `userlist.txt` into `dir`; returns the config's path.
    pub fn write_files(&self, dir: &Path, port: u16) -> PathBuf {
        let config = dir.join("pgsilo.toml");
        fs::write(&config, self.config_text(port)).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let users = dir.join("userlist.txt");
        fs::write(&users, self.userlist_text()).unwrap_or_else(|e| panic!("write {}: {e}", users.display()));
        config
    }

    /// Starts pgsilo and waits until it logs that every worker listens. Panics with its
    /// log if it exits first or takes too long. With no port set, a port another process
    /// grabbed in the meantime is retried on a fresh one.
    pub fn start(self) -> Pgsilo {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = self.port.unwrap_or_else(free_port);
            match self.try_start(port) {
                Ok(p) => return p,
                Err(failed) => {
                    let port_taken =
                        failed.stderr.contains("already in use") || failed.stderr.contains("Address already in use");
                    if self.port.is_none() && port_taken && attempt < 5 {
                        continue;
                    }
                    panic!(
                        "pgsilo did not start ({}); config:\n{}\n--- log ---\n{}",
                        failed.status_text(),
                        failed.config,
                        failed.stderr
                    );
                }
            }
        }
    }

    /// Starts pgsilo expecting it to refuse to start: waits (up to a minute) for it to
    /// exit and returns its status and output. Panics (with its log) if it starts
    /// listening instead.
    pub fn expect_failure(self) -> Failed {
        let port = self.port.unwrap_or_else(free_port);
        match self.try_start(port) {
            Ok(p) => panic!(
                "pgsilo started on port {} although it was expected to refuse; log:\n{}",
                p.port(),
                p.log()
            ),
            Err(failed) => failed,
        }
    }

    fn try_start(&self, port: u16) -> Result<Pgsilo, Failed> {
        let dir = tempfile::Builder::new()
            .prefix("pgsilo-test-")
            .tempdir()
            .expect("create temp dir for pgsilo");
        let config_path = self.write_files(dir.path(), port);
        launch(dir, config_path, port, &self.args, self.nofile)
    }
}

/// Starts the binary on `config_path` (in `dir`, which the returned [`Pgsilo`] owns) and
/// waits until it logs that every worker listens, or until it exits.
fn launch(
    dir: tempfile::TempDir,
    config_path: PathBuf,
    port: u16,
    args: &[String],
    nofile: Option<(u64, u64)>,
) -> Result<Pgsilo, Failed> {
    let log_path = dir.path().join("pgsilo.log");
    let log = File::create(&log_path).expect("create pgsilo log file");
    let log_err = log.try_clone().expect("dup log fd");
    let mut command = Command::new(pgsilo_bin());
    if let Some((soft, hard)) = nofile {
        use std::os::unix::process::CommandExt;
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit is async-signal-safe and only reads `lim`, a copy owned by
        // the closure.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = command
        .args(args)
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", pgsilo_bin()));
    let mut p = Pgsilo {
        child: Some(child),
        port,
        log_path,
        config_path,
        status: None,
        dir,
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = p.try_wait() {
            return Err(Failed {
                status: Some(status),
                stderr: p.log(),
                config: p.config_text(),
                port,
            });
        }
        if p.log().contains(READY_LINE) {
            return Ok(p);
        }
        if Instant::now() > deadline {
            let stderr = p.log();
            let config = p.config_text();
            p.kill();
            return Err(Failed {
                status: None,
                stderr: format!("{stderr}\n(not listening after {START_TIMEOUT:?})"),
                config,
                port,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A pgsilo that exited (or had to be killed) instead of starting.
#[derive(Debug)]
pub struct Failed {
    /// None if it was still running at the deadline (then it was killed).
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stderr and stdout.
    pub stderr: String,
    pub config: String,
    pub port: u16,
}

impl Failed {
    pub fn status_text(&self) -> String {
        match self.status {
            Some(s) => s.to_string(),
            None => "did not exit".into(),
        }
    }
}

/// A running pgsilo process. Dropping it stops it ([`Pgsilo::stop`]) and removes its temp
/// dir; drop never panics.
pub struct Pgsilo {
    child: Option<Child>,
    port: u16,
    log_path: PathBuf,
    config_path: PathBuf,
    status: Option<ExitStatus>,
    // Last: removed after the process is gone.
    dir: tempfile::TempDir,
}

impl Pgsilo {
    /// Defaults: name "t", auth_type scram-sha-256, pool_mode transaction, no users, no
    /// databases.
    pub fn builder() -> PgsiloBuilder {
        PgsiloBuilder {
            port: None,
            settings: Vec::new(),
            extra: Vec::new(),
            databases: Vec::new(),
            userlist: Vec::new(),
            args: Vec::new(),
            nofile: None,
        }
        .name("t")
        .set_str("listen_addr", "127.0.0.1")
        .auth_type("scram-sha-256")
        .pool_mode("transaction")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn config_text(&self) -> String {
        fs::read_to_string(&self.config_path).unwrap_or_default()
    }

    /// Everything pgsilo logged so far (stderr and stdout).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Waits until the log contains `needle`; returns the log. Panics after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if Instant::now() > deadline {
                panic!("pgsilo did not log {needle:?} within {timeout:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Key=value connection string for tokio-postgres (or libpq).
    pub fn conn_str(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password='{}' dbname={db} connect_timeout=30",
            self.port,
            password.replace('\\', "\\\\").replace('\'', "\\'")
        )
    }

    /// tokio-postgres config for this pgsilo (no password if `password` is None).
    pub fn pg_config(&self, user: &str, password: Option<&str>, db: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname(db)
            .connect_timeout(Duration::from_secs(30));
        if let Some(p) = password {
            c.password(p);
        }
        c
    }

    /// Connects with tokio-postgres (the connection task is spawned on the current
    /// tokio runtime).
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect_with(&self.pg_config(user, Some(password), db)).await
    }

    /// psql through pgsilo: `-X -A -t -q -v ON_ERROR_STOP=1`, SQL on stdin. Returns trimmed
    /// stdout, or `Err` with the exit status and stderr.
    pub fn psql(&self, user: &str, password: &str, db: &str, sql: &str) -> Result<String, String> {
        super::process::run_psql(
            Command::new(super::postgres::pg_bindir().join("psql"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", user, "-d", db])
                .env("PGPASSWORD", password)
                .env("PGSSLMODE", "disable"),
            sql,
        )
    }

    /// Rewrites `pgsilo.toml` and `userlist.txt` from `builder`, keeping this process's
    /// port (for SIGHUP / RELOAD tests). Nothing is signalled.
    pub fn rewrite(&self, builder: &PgsiloBuilder) {
        builder.write_files(self.dir.path(), self.port);
    }

    /// Replaces the config file's text (e.g. with something broken).
    pub fn write_config(&self, text: &str) {
        fs::write(&self.config_path, text).unwrap_or_else(|e| panic!("write {}: {e}", self.config_path.display()));
    }

    /// Replaces the auth_file's text.
    pub fn write_userlist(&self, text: &str) {
        let path = self.dir.path().join("userlist.txt");
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Starts another pgsilo on a copy of this one's config and auth_file (same port,
    /// same takeover_socket) with `args` (e.g. `["--takeover"]`). Ok once it listens;
    /// Err with its output if it exits first.
    pub fn start_again(&self, args: &[&str]) -> Result<Pgsilo, Failed> {
        let dir = tempfile::Builder::new()
            .prefix("pgsilo-test-")
            .tempdir()
            .expect("create temp dir for pgsilo");
        let config_path = dir.path().join("pgsilo.toml");
        fs::copy(&self.config_path, &config_path).expect("copy pgsilo.toml");
        fs::copy(self.dir.path().join("userlist.txt"), dir.path().join("userlist.txt")).expect("copy userlist.txt");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        launch(dir, config_path, self.port, &args, None)
    }

    /// Sends `sig` (e.g. `libc::SIGHUP`) to the process, unless it has been reaped.
    pub fn send_signal(&self, sig: i32) {
        self.signal(sig);
    }

    /// Waits up to `timeout` for the process to exit; its status, or None if it still
    /// runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.wait_until(Instant::now() + timeout)
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.status {
            return Some(s);
        }
        let child = self.child.as_mut()?;
        if let Ok(Some(s)) = child.try_wait() {
            self.status = Some(s);
        }
        self.status
    }

    fn signal(&self, sig: i32) {
        if self.status.is_some() {
            return;
        }
        if let Some(child) = self.child.as_ref() {
            // SAFETY: our own child, not yet reaped (status is None): the pid is still ours.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
    }

    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGINT (safe shutdown: running transactions finish), a second SIGINT (exit now) if
    /// it is still running after a while, then SIGKILL. Returns the exit status.
    /// Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        for _ in 0..2 {
            self.signal(libc::SIGINT);
            if let Some(s) = self.wait_until(Instant::now() + STOP_TIMEOUT) {
                return Some(s);
            }
        }
        self.kill()
    }

    /// SIGKILL and reap. Idempotent.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.signal(libc::SIGKILL);
        self.wait_until(Instant::now() + STOP_TIMEOUT)
    }
}

impl Drop for Pgsilo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "pgsilo on port {} (pid {}), log:\n{}",
                self.port,
                self.pid(),
                self.log()
            );
        }
        let _ = self.stop();
    }
}

/// Connects with tokio-postgres and spawns the connection on the current runtime.
pub async fn connect_with(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The database error of a tokio-postgres error: (SQLSTATE, message). Panics with the
/// error if it carries none (e.g. an I/O error).
pub fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(d) => (d.code().code().to_owned(), d.message().to_owned()),
        None => panic!("expected an error from the server, got {e:?}"),
    }
}

/// The rows of a simple query (e.g. an admin console `SHOW`), each as column name ->
/// text value (None for NULL), and the column names in order (empty when no row came).
pub async fn simple_rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<(Vec<String>, Vec<std::collections::BTreeMap<String, Option<String>>>), tokio_postgres::Error> {
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in client.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            if columns.is_empty() {
                columns = r.columns().iter().map(|c| c.name().to_owned()).collect();
            }
            let row = r
                .columns()
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name().to_owned(), r.get(i).map(str::to_owned)))
                .collect();
            rows.push(row);
        }
    }
    Ok((columns, rows))
}

/// A multi-threaded tokio runtime for a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The error of a result that must have failed (for results whose Ok side, such as a
/// `Client`, is not `Debug`).
#[track_caller]
pub fn must_fail<T>(result: Result<T, tokio_postgres::Error>, why: &str) -> tokio_postgres::Error {
    match result {
        Ok(_) => panic!("expected an error: {why}"),
        Err(e) => e,
    }
}
