//! Throwaway PostgreSQL clusters copied from a cached template data directory.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use super::ports::{free_port, next_random};
use super::process::{
    chown_to_server, force_kill_postmaster, is_executable, process_alive, remove_dir_quietly, run_ok, run_psql,
    scratch_base, server_command, write_server_file, FileLock,
};
use super::tls::{fingerprint_file, served_cert_fingerprint, TestCerts};

/// Bump when the template layout changes in a way the hashed texts below don't show.
const TEMPLATE_FORMAT: u32 = 1;

/// Roles and databases of every test cluster (run once, into the template, by psql).
const SETUP_SQL: &str = r#"
SET password_encryption = 'scram-sha-256';
CREATE ROLE scram_user LOGIN PASSWORD 'scram_pass';
CREATE ROLE trust_user LOGIN;
CREATE ROLE user_a LOGIN PASSWORD 'pass_a';
CREATE ROLE user_b LOGIN PASSWORD 'pass_b';
CREATE ROLE pwd_user LOGIN PASSWORD 'pwd_pass';
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD 'md5_pass';
RESET password_encryption;

CREATE DATABASE tenant_a_db OWNER user_a;
CREATE DATABASE tenant_b_db OWNER user_b;
CREATE DATABASE app_db OWNER postgres;
-- Tenants are isolated: only the owner (and superusers) may connect to a tenant database.
REVOKE CONNECT, TEMPORARY ON DATABASE tenant_a_db FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE tenant_b_db FROM PUBLIC;
GRANT CONNECT, CREATE, TEMPORARY ON DATABASE app_db TO PUBLIC;
\connect app_db
GRANT ALL ON SCHEMA public TO PUBLIC;
"#;

/// pg_hba.conf of every test cluster (replaces initdb's). The same method applies over the
/// Unix socket and over 127.0.0.1.
const PG_HBA: &str = "\
# pgsilo test harness
# TYPE  DATABASE  USER        ADDRESS        METHOD
local   all       postgres                   trust
host    all       postgres    127.0.0.1/32   trust
local   all       trust_user                 trust
host    all       trust_user  127.0.0.1/32   trust
local   all       scram_user                 scram-sha-256
host    all       scram_user  127.0.0.1/32   scram-sha-256
local   all       md5_user                   md5
host    all       md5_user    127.0.0.1/32   md5
local   all       user_a                     scram-sha-256
host    all       user_a      127.0.0.1/32   scram-sha-256
local   all       user_b                     scram-sha-256
host    all       user_b      127.0.0.1/32   scram-sha-256
local   all       pwd_user                   password
host    all       pwd_user    127.0.0.1/32   password
local   all       all                        scram-sha-256
host    all       all         127.0.0.1/32   scram-sha-256
";

/// Appended to the template's postgresql.conf. Per-cluster settings (port, listen address,
/// socket dir, max_connections, builder settings) go to `pgsilo_cluster.conf`, included last.
const BASE_CONF: &str = "
# --- pgsilo test harness ---
listen_addresses = ''
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
shared_buffers = 32MB
max_connections = 200
lc_messages = 'C'
log_line_prefix = '%m [%p] %q%u@%d '
min_wal_size = 16MB
max_wal_size = 256MB
include_if_exists = 'pgsilo_cluster.conf'
";

/// initdb options of the template.
const INITDB_ARGS: &[&str] = &[
    "--auth=trust",
    "-U",
    "postgres",
    "--encoding=UTF8",
    "--locale=C",
    "--no-sync",
    // 1 MB WAL segments keep the template (copied for every cluster) small.
    "--wal-segsize=1",
];

/// Per-cluster config while building the template: Unix socket only (no TCP port to race
/// for), and little recycled WAL left at shutdown.
const BUILD_CONF: &str = "listen_addresses = ''\nport = 5432\nmin_wal_size = 2MB\nmax_wal_size = 4MB\n";

const CLUSTER_CONF: &str = "pgsilo_cluster.conf";
/// Copies of the TLS files in the data directory (see [`PgClusterBuilder::ssl_files`]).
const SSL_CERT: &str = "pgsilo_server.crt";
const SSL_KEY: &str = "pgsilo_server.key";
const SSL_CA: &str = "pgsilo_root.crt";
const DEFAULT_MAX_CONNECTIONS: u32 = 200;
/// Wait limits (seconds) for a server to start and to stop: generous, the machine is noisy.
const START_TIMEOUT_SECS: u64 = 90;
const STOP_TIMEOUT_SECS: u64 = 60;

// ---------------------------------------------------------------------------------------
// Finding the installation
// ---------------------------------------------------------------------------------------

/// Directory with PostgreSQL's programs: `$PG_BINDIR`; else where `pg_ctl`/`initdb` on PATH
/// really live (symlinks resolved); else `pg_config --bindir`; else the highest version
/// under `/usr/lib/postgresql/*/bin`. Panics with install instructions if none.
pub fn pg_bindir() -> PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(find_bindir).clone()
}

fn has_server(dir: &Path) -> bool {
    ["postgres", "initdb", "pg_ctl"]
        .iter()
        .all(|p| is_executable(&dir.join(p)))
}

fn find_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BINDIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if !has_server(&dir) {
            panic!(
                "PG_BINDIR={} does not contain the PostgreSQL server programs \
                 (postgres, initdb, pg_ctl)",
                dir.display()
            );
        }
        return dir;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            for name in ["pg_ctl", "initdb"] {
                let candidate = dir.join(name);
                if !is_executable(&candidate) {
                    continue;
                }
                let real = fs::canonicalize(&candidate).unwrap_or(candidate);
                if let Some(parent) = real.parent() {
                    if has_server(parent) {
                        return parent.to_path_buf();
                    }
                }
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server(&dir) {
                return dir;
            }
        }
    }
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(version) = name.split('.').map(str::parse::<u32>).collect::<Result<Vec<_>, _>>() else {
                continue;
            };
            let bin = entry.path().join("bin");
            if has_server(&bin) && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    if let Some((_, bin)) = best {
        return bin;
    }
    panic!(
        "PostgreSQL server binaries not found: integration tests need a local PostgreSQL \
         installation. Install it (Debian/Ubuntu: `apt-get install postgresql`), or point \
         PG_BINDIR at the directory holding postgres, initdb and pg_ctl."
    );
}

/// `postgres --version` of the install, e.g. "15.18", and the full line.
fn pg_version(bindir: &Path) -> (String, String) {
    static VERSION: OnceLock<(String, String)> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let line = run_ok(Command::new(bindir.join("postgres")).arg("--version"), None);
            let line = line.trim().to_owned();
            // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
            let version = line
                .split_whitespace()
                .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
                .unwrap_or("unknown")
                .to_owned();
            (version, line)
        })
        .clone()
}

// ---------------------------------------------------------------------------------------
// Template
// ---------------------------------------------------------------------------------------

/// Folder for cached templates: cargo's per-target tmp dir for integration tests.
fn cache_root() -> PathBuf {
    match option_env!("CARGO_TARGET_TMPDIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
    }
}

/// FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(&[0xff]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The template data directory, built if missing. Serialised by an in-process mutex and an
/// `flock`, so neither parallel tests nor concurrent test binaries build it twice; it is
/// built elsewhere and renamed into place, so nobody sees a half-built one.
fn template_dir() -> PathBuf {
    static TEMPLATE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut guard = TEMPLATE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = guard.as_ref() {
        return dir.clone();
    }
    let bindir = pg_bindir();
    let (version, version_line) = pg_version(&bindir);
    let hash = fnv1a(&[
        SETUP_SQL.as_bytes(),
        PG_HBA.as_bytes(),
        BASE_CONF.as_bytes(),
        BUILD_CONF.as_bytes(),
        INITDB_ARGS.join(" ").as_bytes(),
        version_line.as_bytes(),
        bindir.as_os_str().as_encoded_bytes(),
        &TEMPLATE_FORMAT.to_le_bytes(),
    ]);
    let root = cache_root();
    fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
    let name = format!("pgsilo-test-template-{version}-{hash:016x}");
    let dir = root.join(&name);
    if !dir.join("PG_VERSION").is_file() {
        let _lock = FileLock::acquire(&root.join(format!("{name}.lock")));
        if !dir.join("PG_VERSION").is_file() {
            // Leftovers of a build that died half-way (we hold the lock: nobody else builds).
            if let Ok(entries) = fs::read_dir(&root) {
                for entry in entries.flatten() {
                    if entry.file_name().to_string_lossy().starts_with(&format!("{name}.tmp-")) {
                        remove_dir_quietly(&entry.path());
                    }
                }
            }
            let started = Instant::now();
            build_template(&bindir, &root, &name);
            eprintln!(
                "pgsilo test harness: built PostgreSQL {version} template {} in {:.2?}",
                dir.display(),
                started.elapsed()
            );
        }
    }
    *guard = Some(dir.clone());
    dir
}

fn build_template(bindir: &Path, root: &Path, name: &str) {
    sweep_stale_scratch_dirs();
    // The server user must be able to write where initdb runs: build in a scratch dir
    // (under /tmp), then copy into the cache as ourselves.
    let scratch = Scratch::new("pgsilo-tmpl");
    let data = scratch.path.join("data");
    run_ok(
        server_command(&bindir.join("initdb"), &scratch.path)
            .arg("-D")
            .arg(&data)
            .args(INITDB_ARGS),
        None,
    );
    let conf_path = data.join("postgresql.conf");
    let mut conf = fs::read_to_string(&conf_path).unwrap_or_else(|e| panic!("read {}: {e}", conf_path.display()));
    conf.push_str(BASE_CONF);
    write_server_file(&conf_path, &conf);
    write_server_file(&data.join("pg_hba.conf"), PG_HBA);
    write_server_file(
        &data.join(CLUSTER_CONF),
        &format!(
            "{BUILD_CONF}unix_socket_directories = {}\n",
            conf_quote(&scratch.path.to_string_lossy())
        ),
    );
    let log = scratch.path.join("template.log");
    let mut postmaster = Postmaster::start(bindir, &data, &log, &scratch.path)
        .unwrap_or_else(|e| panic!("starting the template cluster failed: {e}"));
    run_ok(
        Command::new(bindir.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
            .arg("-h")
            .arg(&scratch.path)
            .args(["-p", "5432", "-d", "postgres", "-f", "-"])
            .env("PGCONNECT_TIMEOUT", "30"),
        Some(SETUP_SQL),
    );
    if !postmaster.stop(StopMode::Fast) {
        panic!("stopping the template cluster failed:\n{}", log_tail(&log, 40));
    }
    for leftover in [CLUSTER_CONF, "postmaster.opts", "postmaster.pid"] {
        let _ = fs::remove_file(data.join(leftover));
    }
    let tmp = root.join(format!("{name}.tmp-{}", std::process::id()));
    run_ok(Command::new("cp").arg("-a").arg(&data).arg(&tmp), None);
    fs::rename(&tmp, root.join(name)).unwrap_or_else(|e| panic!("rename {} into place: {e}", tmp.display()));
}

/// Quote a postgresql.conf value.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quote an SQL string literal.
fn sql_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

// ---------------------------------------------------------------------------------------
// Scratch directories
// ---------------------------------------------------------------------------------------

/// A fresh directory `<tmp>/<prefix>-<pid>-<n>-<rand>` owned by the server user. Removed on
/// drop, after killing any postmaster still running in `<dir>/data`.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new(prefix: &str) -> Scratch {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let base = scratch_base();
        for _ in 0..100 {
            let path = base.join(format!(
                "{prefix}-{}-{}-{:04x}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed),
                next_random() & 0xffff
            ));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    chown_to_server(&path);
                    return Scratch { path };
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("create {}: {e}", path.display()),
            }
        }
        panic!("could not create a scratch directory in {}", base.display());
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Normally stopped already (by PgCluster's drop, or the template build).
        force_kill_postmaster(&self.path.join("data"));
        if std::env::var_os("PGSILO_KEEP_TEST_CLUSTERS").is_some_and(|v| !v.is_empty()) {
            eprintln!("pgsilo test harness: keeping {}", self.path.display());
            return;
        }
        remove_dir_quietly(&self.path);
    }
}

/// Remove scratch dirs left by test processes that died without unwinding (killed,
/// aborted), stopping their postmasters. Once per process.
fn sweep_stale_scratch_dirs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = fs::read_dir(scratch_base()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name
                .strip_prefix("pgsilo-pg-")
                .or_else(|| name.strip_prefix("pgsilo-tmpl-"))
            else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            if pid as u32 == std::process::id() || process_alive(pid) {
                continue;
            }
            force_kill_postmaster(&entry.path().join("data"));
            remove_dir_quietly(&entry.path());
        }
    });
}

// ---------------------------------------------------------------------------------------
// Postmaster processes
// ---------------------------------------------------------------------------------------

/// Shutdown modes (the signals `pg_ctl stop -m <mode>` sends).
#[derive(Clone, Copy, Debug)]
enum StopMode {
    /// SIGINT: disconnect clients, checkpoint, exit.
    Fast,
    /// SIGQUIT: exit at once; crash recovery on next start.
    Immediate,
}

/// A postmaster we spawned directly (rather than through `pg_ctl`, whose 100 ms polling
/// adds up over hundreds of starts and stops). It stays in our process group, so Ctrl-C
/// on the test run also stops it.
struct Postmaster {
    child: Child,
}

impl Postmaster {
    /// Start `postgres -D data` (output appended to `log`) and wait until it reports
    /// "ready" in postmaster.pid. On failure, the error holds the new part of the log.
    fn start(bindir: &Path, data: &Path, log: &Path, cwd: &Path) -> Result<Postmaster, String> {
        let log_len = fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let log_err = log_file.try_clone().map_err(|e| format!("dup log fd: {e}"))?;
        let mut child = server_command(&bindir.join("postgres"), cwd)
            .arg("-D")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bindir.join("postgres").display()))?;
        let new_log = |log: &Path| {
            let bytes = fs::read(log).unwrap_or_default();
            String::from_utf8_lossy(bytes.get(log_len as usize..).unwrap_or(&[])).into_owned()
        };
        let deadline = Instant::now() + Duration::from_secs(START_TIMEOUT_SECS);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "postgres exited during startup ({status}); server log ({}):\n{}",
                    log.display(),
                    new_log(log)
                ));
            }
            if postmaster_ready(data, child.id()) {
                return Ok(Postmaster { child });
            }
            if Instant::now() > deadline {
                drop(Postmaster { child });
                return Err(format!(
                    "postgres not ready after {START_TIMEOUT_SECS} s; server log ({}):\n{}",
                    log.display(),
                    new_log(log)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Signal a shutdown and reap the process; escalates to SIGQUIT, then SIGKILL, if it
    /// hangs. True if it exited before escalation. Never panics.
    fn stop(&mut self, mode: StopMode) -> bool {
        let pid = self.child.id() as i32;
        let first = match mode {
            StopMode::Fast => libc::SIGINT,
            StopMode::Immediate => libc::SIGQUIT,
        };
        for (signal, secs) in [(first, STOP_TIMEOUT_SECS), (libc::SIGQUIT, 10), (libc::SIGKILL, 10)] {
            if let Ok(Some(_)) = self.child.try_wait() {
                return signal == first;
            }
            // SAFETY: our own, not yet reaped, child: the pid can't have been reused.
            unsafe { libc::kill(pid, signal) };
            let deadline = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < deadline {
                match self.child.try_wait() {
                    Ok(Some(_)) => return signal == first,
                    Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                    Err(_) => return false,
                }
            }
        }
        false
    }
}

impl Drop for Postmaster {
    /// Immediate shutdown unless already stopped (e.g. when a test or the template build
    /// panics): never leaves a server or a zombie behind.
    fn drop(&mut self) {
        self.stop(StopMode::Immediate);
    }
}

/// postmaster.pid names `pid` and says "ready" (the check `pg_ctl -w` does).
fn postmaster_ready(data: &Path, pid: u32) -> bool {
    let Ok(text) = fs::read_to_string(data.join("postmaster.pid")) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().collect();
    lines.len() >= 8 && lines[0].trim() == pid.to_string() && lines[7].trim() == "ready"
}

/// Replace `path` (atomically: written aside, then renamed) with `bytes`, owned by the
/// server user, with `mode`.
fn install_server_file(path: &Path, bytes: &[u8], mode: u32) {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
    file.write_all(bytes)
        .unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    file.set_permissions(fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", tmp.display()));
    drop(file);
    chown_to_server(&tmp);
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), path.display()));
}

fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn is_bind_error(log_part: &str) -> bool {
    log_part.contains("Address already in use")
        || log_part.contains("could not bind")
        || log_part.contains("could not create any TCP/IP sockets")
}

// ---------------------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------------------

/// Options for a cluster; see [`PgCluster::builder`].
#[derive(Clone, Debug)]
pub struct PgClusterBuilder {
    max_connections: u32,
    settings: Vec<(String, String)>,
    ssl: Option<SslFiles>,
    hba_prepend: Vec<String>,
}

/// Where the server's TLS files are copied from.
#[derive(Clone, Debug)]
struct SslFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
}

impl PgClusterBuilder {
    /// `max_connections` (default 200).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Any postgresql.conf setting, e.g. `.setting("log_connections", "on")`. Applied last,
    /// so it overrides the harness defaults.
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.settings.push((key.to_owned(), value.to_owned()));
        self
    }

    /// TLS with the certificates of `certs`: `ssl = on`, the server presents `server.crt`
    /// (CN/SAN localhost, SAN IP 127.0.0.1) and trusts `ca.crt` for client certificates
    /// (`ssl_ca_file`, so `clientcert=...` in [`hba_prepend`](Self::hba_prepend) lines works).
    /// pg_hba is unchanged: its `host` lines accept TLS and plain connections alike.
    pub fn ssl(self, certs: &TestCerts) -> Self {
        self.ssl_files(&certs.server_cert(), &certs.server_key(), Some(&certs.ca_cert()))
    }

    /// TLS with any certificate and key (e.g. `certs.expired_cert()`, `certs.wronghost_key()`),
    /// and optionally a CA for client certificates. The files are copied into the data
    /// directory (owned by the server user, key mode 0600) at every start and by
    /// [`PgCluster::reload_ssl`], so changes to the originals apply then.
    pub fn ssl_files(mut self, cert: &Path, key: &Path, ca: Option<&Path>) -> Self {
        self.ssl = Some(SslFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ca: ca.map(Path::to_path_buf),
        });
        self
    }

    /// A pg_hba.conf line put before the harness's lines (so it wins), e.g.
    /// `"hostssl all cert_user 127.0.0.1/32 cert"` or `"hostnossl all user_a 127.0.0.1/32
    /// reject"`. Lines apply in the order given.
    pub fn hba_prepend(mut self, line: &str) -> Self {
        self.hba_prepend.push(line.to_owned());
        self
    }

    /// Copy the template and start the cluster on a free port.
    pub fn start(self) -> PgCluster {
        let template = template_dir();
        sweep_stale_scratch_dirs();
        let bindir = pg_bindir();
        let scratch = Scratch::new("pgsilo-pg");
        let data = scratch.path.join("data");
        run_ok(Command::new("cp").arg("-a").arg(&template).arg(&data), None);
        if !self.hba_prepend.is_empty() {
            let mut hba = String::from("# prepended by PgClusterBuilder::hba_prepend\n");
            for line in &self.hba_prepend {
                hba.push_str(line);
                hba.push('\n');
            }
            hba.push_str(PG_HBA);
            write_server_file(&data.join("pg_hba.conf"), &hba);
        }
        let log = scratch.path.join("postgres.log");
        let mut cluster = PgCluster {
            log,
            data,
            port: 0,
            bindir,
            postmaster: None,
            builder: self,
            scratch,
        };
        cluster.start_server(false);
        cluster
    }
}

/// A throwaway PostgreSQL cluster on 127.0.0.1, with the harness's roles and databases:
///
/// | role         | password     | pg_hba method  | notes                          |
/// |--------------|--------------|----------------|--------------------------------|
/// | `postgres`   | —            | trust          | superuser                      |
/// | `scram_user` | `scram_pass` | scram-sha-256  | stored as SCRAM                |
/// | `md5_user`   | `md5_pass`   | md5            | stored as md5                  |
/// | `trust_user` | —            | trust          |                                |
/// | `user_a`     | `pass_a`     | scram-sha-256  | owns `tenant_a_db`             |
/// | `user_b`     | `pass_b`     | scram-sha-256  | owns `tenant_b_db`             |
/// | `pwd_user`   | `pwd_pass`   | password       | cleartext method, SCRAM stored |
/// | anyone else  |              | scram-sha-256  |                                |
///
/// Databases: `postgres`, `app_db` (everyone may connect and create, also in schema public),
/// `tenant_a_db` / `tenant_b_db` (only their owner, and superusers, may connect).
/// Methods are the same over TCP and over the Unix socket in [`PgCluster::socket_dir`].
///
/// Dropping it stops the server (immediate mode) and removes its directory.
pub struct PgCluster {
    // Field order matters for drop: `scratch` (stop + remove dir) goes last.
    log: PathBuf,
    data: PathBuf,
    port: u16,
    bindir: PathBuf,
    postmaster: Option<Postmaster>,
    builder: PgClusterBuilder,
    scratch: Scratch,
}

impl PgCluster {
    /// A cluster with the default settings.
    pub fn start() -> PgCluster {
        PgCluster::builder().start()
    }

    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            settings: Vec::new(),
            ssl: None,
            hba_prepend: Vec::new(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// Directory holding the server's Unix socket (`.s.PGSQL.<port>`). It is the cluster's
    /// scratch dir: mode 0700, owned by the server user (so reachable by root and by that
    /// user; when not root, the server runs as ourselves).
    pub fn socket_dir(&self) -> &Path {
        &self.scratch.path
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A program of the same installation, e.g. `bin("pgbench")`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole server log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `host=127.0.0.1 port=N user=postgres dbname=<db>` (trust: no password).
    pub fn superuser_conn_string(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db} connect_timeout=30",
            self.host(),
            self.port
        )
    }

    /// A superuser connection straight to PostgreSQL (database `postgres`), its
    /// connection driven by a tokio task: to look at pg_stat_activity beside pgsilo.
    pub async fn superuser_client(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.superuser_conn_string("postgres"), tokio_postgres::NoTls)
                .await
                .expect("superuser connection to PostgreSQL");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Key=value connection string over TCP for any role.
    pub fn conn_string(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host={} port={} user={user} password='{}' dbname={db} connect_timeout=30",
            self.host(),
            self.port,
            password.replace('\\', "\\\\").replace('\'', "\\'")
        )
    }

    /// Run SQL as `postgres` through psql (`-X -A -t -v ON_ERROR_STOP=1`, over TCP) and
    /// return its stdout, trimmed. Statements run one by one (so `CREATE DATABASE` works).
    /// Panics with psql's stderr on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql on {db} (port {}) failed: {e}\nSQL:\n{sql}", self.port))
    }

    /// Like [`psql`](Self::psql), but a failure is returned as psql's stderr, trimmed.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        run_psql(
            Command::new(self.bin("psql"))
                .args(["-h", self.host(), "-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", db])
                .env_remove("PGPASSWORD"),
            sql,
        )
    }

    /// Whether the cluster was built with [`ssl`](PgClusterBuilder::ssl) /
    /// [`ssl_files`](PgClusterBuilder::ssl_files).
    pub fn ssl_enabled(&self) -> bool {
        self.builder.ssl.is_some()
    }

    /// The server's copy of its certificate (in the data directory), if TLS is on.
    pub fn ssl_cert_path(&self) -> Option<PathBuf> {
        self.builder.ssl.as_ref().map(|_| self.data.join(SSL_CERT))
    }

    /// Reload the configuration (`SELECT pg_reload_conf()`; applies asynchronously).
    pub fn reload(&self) {
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    /// Copy the TLS files again from where [`ssl`](PgClusterBuilder::ssl) /
    /// [`ssl_files`](PgClusterBuilder::ssl_files) named them (e.g. after
    /// [`TestCerts::renew_server`]), reload, and wait (up to 30 s) until new connections
    /// get the new certificate. Returns its fingerprint. Panics if TLS is off.
    pub fn reload_ssl(&self) -> String {
        assert!(self.ssl_enabled(), "reload_ssl on a cluster without TLS");
        self.install_ssl_files();
        let expected = fingerprint_file(&self.data.join(SSL_CERT));
        self.reload();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let served = served_cert_fingerprint(self.host(), self.port, true);
            if served.as_deref() == Some(expected.as_str()) {
                return expected;
            }
            if Instant::now() > deadline {
                panic!(
                    "after reload the cluster on port {} still serves {served:?}, not {expected}; \
                     server log:\n{}",
                    self.port,
                    log_tail(&self.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Copy the TLS files into the data directory, owned by the server user; the key with
    /// mode 0600 (PostgreSQL refuses group- or world-readable keys it owns).
    fn install_ssl_files(&self) {
        let Some(ssl) = &self.builder.ssl else { return };
        let mut files = vec![(&ssl.cert, SSL_CERT, 0o644), (&ssl.key, SSL_KEY, 0o600)];
        if let Some(ca) = &ssl.ca {
            files.push((ca, SSL_CA, 0o644));
        }
        for (source, name, mode) in files {
            let bytes = fs::read(source).unwrap_or_else(|e| panic!("read {}: {e}", source.display()));
            install_server_file(&self.data.join(name), &bytes, mode);
        }
    }

    /// Fast shutdown (what `pg_ctl stop -m fast` does). Idempotent.
    pub fn stop(&mut self) {
        let Some(mut postmaster) = self.postmaster.take() else {
            return;
        };
        if !postmaster.stop(StopMode::Fast) {
            panic!(
                "fast shutdown of the cluster on port {} hung (killed it); server log:\n{}",
                self.port,
                log_tail(&self.log, 40)
            );
        }
    }

    /// Whether the server is running (not [`stop`](Self::stop)ped, and not dead).
    pub fn is_running(&mut self) -> bool {
        self.postmaster
            .as_mut()
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// Stop (fast), then start again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.start_server(true);
    }

    /// Terminate every session of `user` (`pg_terminate_backend`) and wait until they are
    /// gone. Returns how many were terminated.
    pub fn kill_backends(&self, user: &str) -> usize {
        let pids = self.psql(
            "postgres",
            &format!(
                // CASE fixes the evaluation order: the planner may otherwise run
                // pg_terminate_backend before the usename filter (on every backend).
                "SELECT pid FROM pg_stat_activity WHERE CASE \
                 WHEN usename = {} AND pid <> pg_backend_pid() THEN pg_terminate_backend(pid) \
                 ELSE false END",
                sql_literal(user)
            ),
        );
        let pids: Vec<&str> = pids.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if pids.is_empty() {
            return 0;
        }
        let check = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid IN ({})",
            pids.join(",")
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.psql("postgres", &check) != "0" {
            if Instant::now() > deadline {
                panic!("backends of {user} still alive 30 s after pg_terminate_backend");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        pids.len()
    }

    /// Write the per-cluster config for `port` and start; retries on another free port if
    /// the port was taken (or, with `same_port`, on the same one for a while).
    fn start_server(&mut self, same_port: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut attempt = 0;
        loop {
            attempt += 1;
            if !same_port {
                self.port = free_port();
            }
            self.install_ssl_files();
            self.write_cluster_conf();
            match Postmaster::start(&self.bindir, &self.data, &self.log, &self.scratch.path) {
                Ok(postmaster) => {
                    self.postmaster = Some(postmaster);
                    return;
                }
                Err(e) => {
                    let retry = is_bind_error(&e)
                        && if same_port {
                            Instant::now() < deadline
                        } else {
                            attempt < 20
                        };
                    if !retry {
                        panic!(
                            "could not start PostgreSQL (data dir {}, port {}): {e}",
                            self.data.display(),
                            self.port
                        );
                    }
                    if same_port {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        }
    }

    fn write_cluster_conf(&self) {
        let mut conf = String::new();
        let _ = writeln!(conf, "listen_addresses = '127.0.0.1'");
        let _ = writeln!(conf, "port = {}", self.port);
        let _ = writeln!(
            conf,
            "unix_socket_directories = {}",
            conf_quote(&self.scratch.path.to_string_lossy())
        );
        let _ = writeln!(conf, "max_connections = {}", self.builder.max_connections);
        if let Some(ssl) = &self.builder.ssl {
            let _ = writeln!(conf, "ssl = on");
            let path = |name: &str| conf_quote(&self.data.join(name).to_string_lossy());
            let _ = writeln!(conf, "ssl_cert_file = {}", path(SSL_CERT));
            let _ = writeln!(conf, "ssl_key_file = {}", path(SSL_KEY));
            if ssl.ca.is_some() {
                let _ = writeln!(conf, "ssl_ca_file = {}", path(SSL_CA));
            }
        }
        for (key, value) in &self.builder.settings {
            let _ = writeln!(conf, "{key} = {}", conf_quote(value));
        }
        write_server_file(&self.data.join(CLUSTER_CONF), &conf);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "pgsilo test harness: cluster on port {} (dir {}), last server log lines:\n{}",
                self.port,
                self.scratch.path.display(),
                log_tail(&self.log, 30)
            );
        }
        // Immediate shutdown (Postmaster's drop); then `scratch` removes the directory.
        self.postmaster = None;
    }
}
