//! The `[pgsilo]` section: listening, authentication, pool sizing and timeouts; and the
//! per-user settings of `[users]`. Key names and defaults are PgBouncer's.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::front_door::FrontDoor;
use super::section::Section;
use super::value::Value;

/// PgBouncer's default `auth_query`: the role's password unless it expired (VALID UNTIL)
/// or the role cannot log in.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END FROM pg_authid WHERE rolname=$1 AND rolcanlogin";

/// How clients prove who they are (PgBouncer's `auth_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthType {
    /// No password asked; the user name must still be in the auth_file.
    Trust,
    /// Clear-text password exchange.
    Plain,
    /// MD5 challenge; users whose secret is SCRAM get SCRAM instead, as in PgBouncer.
    Md5,
    /// SCRAM-SHA-256; needs a SCRAM or plain secret in the auth_file.
    ScramSha256,
    /// A client certificate, checked against client_tls_ca_file, whose CommonName is
    /// the user name (PgBouncer's `cert`). Needs TLS from clients.
    Cert,
}

impl AuthType {
    const ALL: [AuthType; 5] = [
        AuthType::Trust,
        AuthType::Plain,
        AuthType::Md5,
        AuthType::ScramSha256,
        AuthType::Cert,
    ];

    /// The config file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::Trust => "trust",
            AuthType::Plain => "plain",
            AuthType::Md5 => "md5",
            AuthType::ScramSha256 => "scram-sha-256",
            AuthType::Cert => "cert",
        }
    }

    fn parse(text: &str) -> Option<AuthType> {
        Self::ALL.into_iter().find(|a| a.as_str().eq_ignore_ascii_case(text))
    }
}

impl fmt::Display for AuthType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a server connection goes back to the pool (PgBouncer's `pool_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// When the client disconnects.
    Session,
    /// When a transaction ends.
    Transaction,
}

impl PoolMode {
    const ALL: [PoolMode; 2] = [PoolMode::Session, PoolMode::Transaction];

    /// The config file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }

    fn parse(text: &str) -> Option<PoolMode> {
        Self::ALL.into_iter().find(|m| m.as_str().eq_ignore_ascii_case(text))
    }
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `[users]` entry: what one user's pools do differently (PgBouncer's `[users]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserSettings {
    /// `pool_mode`: overrides the database's and the `[pgsilo]` pool_mode for this user's
    /// pools, as in PgBouncer.
    pub pool_mode: Option<PoolMode>,
}

/// The `[pgsilo]` section, and the `[users]` settings that apply instance-wide.
///
/// Timeouts that PgBouncer disables with 0 are `Option<Duration>`, `None` meaning
/// disabled. Durations where 0 is a real length of time (check every time, retry at
/// once, close after one use) are plain `Duration`. Counts keep PgBouncer's integers;
/// where 0 means "unlimited" or "disabled" the field says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct General {
    /// `name`: shown in logs and the process title. Default: the config file's stem.
    pub name: String,
    /// `listen_addr`: addresses to accept clients on; `*` expands to 0.0.0.0 and ::.
    /// Empty: no TCP, clients connect through the Unix socket only (PgBouncer's default,
    /// so a PgBouncer ini without listen_addr reads that way). Default 127.0.0.1.
    pub listen_addr: Vec<IpAddr>,
    /// `listen_port`. Default 6432.
    pub listen_port: u16,
    /// `listen_backlog`: the listen(2) queue length. Default 128.
    pub listen_backlog: u32,
    /// `cpus`: core ids to run workers on; `None` lets the runtime decide.
    pub cpus: Option<Vec<usize>>,
    /// `auth_type`. Default md5.
    pub auth_type: AuthType,
    /// `auth_file`: the userlist.txt, made absolute against the config file's folder.
    /// Required whatever the auth_type: trust still needs the user names.
    pub auth_file: PathBuf,
    /// `auth_user`: for users the auth_file does not list, pgsilo logs in to PostgreSQL
    /// as this user (its secret is in the auth_file) and looks their secret up with
    /// `auth_query`. `None` (default) turns the lookup off.
    pub auth_user: Option<String>,
    /// `auth_query`: the lookup; `$1` is the user name, the answer's second column the
    /// md5 hash or SCRAM verifier (NULL, or no row: the user cannot log in). Default
    /// PgBouncer's, on pg_authid ([`DEFAULT_AUTH_QUERY`]).
    pub auth_query: String,
    /// `auth_dbname`: the `[databases]` entry whose server database the lookup runs in;
    /// `None` (default): the database the client asks for.
    pub auth_dbname: Option<String>,
    /// `pool_mode`: for databases that do not set their own. Default session.
    pub pool_mode: PoolMode,
    /// `max_client_conn`: clients logged in at once (past authentication); logins in
    /// progress have their own budget below. Default 100.
    pub max_client_conn: usize,
    /// `max_pending_logins` (pgsilo's own): connections not yet authenticated, in all
    /// (each worker holds its share). When they are all taken, a connection from an
    /// address holding fewer evicts the oldest login of the address holding the most.
    /// Default 1000.
    pub max_pending_logins: usize,
    /// `max_pending_logins_per_addr` (pgsilo's own): connections not yet authenticated
    /// from one client address (an IPv6 /64; one local user on the Unix socket); more
    /// are turned away at once (FATAL 53300). 0 = no cap of its own. Default 500: one app host may start
    /// hundreds of logins at once (and auth_query lookups queue them).
    pub max_pending_logins_per_addr: usize,
    /// `default_pool_size`: server connections per (database, user) pool. Default 20.
    pub default_pool_size: usize,
    /// `min_pool_size`: server connections kept open even when idle. Default 0.
    pub min_pool_size: usize,
    /// `reserve_pool_size`: extra connections for pools that keep clients waiting. Default 0.
    pub reserve_pool_size: usize,
    /// `reserve_pool_timeout`: how long a client waits before a reserve connection may be
    /// opened for it; `None` (0) disables the reserve pool. Default 5 s.
    pub reserve_pool_timeout: Option<Duration>,
    /// `max_db_connections`: server connections per database across users; 0 = unlimited.
    pub max_db_connections: usize,
    /// `max_busy_cores` (pgsilo's own), in thousandths of a core: a pool's servers may
    /// spend at most this much time attached to clients per second; a client waits for
    /// its server while the last second is over it. 0 = off, the default.
    pub max_busy_cores: u32,
    /// `max_prepared_statements`: prepared statements tracked per server connection in
    /// transaction mode; 0 disables the tracking. Default 200.
    pub max_prepared_statements: usize,
    /// `server_reset_query`: run when a server connection is released; `None` when set
    /// to the empty string. Default "DISCARD ALL".
    pub server_reset_query: Option<String>,
    /// `server_reset_query_always`: run the reset query in transaction mode too. Default false.
    pub server_reset_query_always: bool,
    /// `server_check_query`: run on a server idle longer than server_check_delay before
    /// a client gets it; `None` when set to the empty string (no check). Default "select 1".
    pub server_check_query: Option<String>,
    /// `server_check_delay`: how long a released connection is reused without a health
    /// check; zero checks every time. Default 30 s.
    pub server_check_delay: Duration,
    /// `server_connect_timeout`: limit on connecting and logging in to the server;
    /// `None` = no limit. Default 15 s.
    pub server_connect_timeout: Option<Duration>,
    /// `server_login_retry`: wait after a failed server login before trying again;
    /// zero retries at once. Default 15 s.
    pub server_login_retry: Duration,
    /// `query_wait_timeout`: how long a client may wait for a server; `None` = forever.
    /// Default 120 s.
    pub query_wait_timeout: Option<Duration>,
    /// `query_timeout`: queries running longer are cancelled; `None` = no limit (default).
    pub query_timeout: Option<Duration>,
    /// `client_login_timeout`: time a client has to log in; `None` = no limit. Default 60 s.
    pub client_login_timeout: Option<Duration>,
    /// `startup_packet_timeout` (pgsilo's own): time a new connection has to send its
    /// startup packet (TLS handshake included); `None` = only client_login_timeout.
    /// Default 10 s.
    pub startup_packet_timeout: Option<Duration>,
    /// `client_idle_timeout`: idle clients are dropped after this; `None` = never (default).
    pub client_idle_timeout: Option<Duration>,
    /// `idle_transaction_timeout`: clients idle inside a transaction are dropped after
    /// this; `None` = never (default).
    pub idle_transaction_timeout: Option<Duration>,
    /// `server_idle_timeout`: idle server connections are closed after this; `None` =
    /// never. Default 600 s.
    pub server_idle_timeout: Option<Duration>,
    /// `server_lifetime`: unused server connections older than this are closed; zero
    /// means use each connection once. Default 3600 s.
    pub server_lifetime: Duration,
    /// `shutdown_timeout` (pgsilo's own): how long SIGTERM waits for transactions in
    /// flight; zero closes at once. Default 30 s.
    pub shutdown_timeout: Duration,
    /// `takeover_socket` (pgsilo's own): the Unix socket a new process for the same tenant
    /// (`pgsilo --takeover`) connects to, to receive the listening sockets and make this
    /// one drain. Default `/tmp/.s.pgsilo.<listen_port>`; an empty string disables it.
    pub takeover_socket: Option<std::path::PathBuf>,
    /// `admin_users`: users allowed every admin console command. Default none.
    pub admin_users: Vec<String>,
    /// `stats_users`: users allowed the read-only admin console commands. Default none.
    pub stats_users: Vec<String>,
    /// `stats_period`: how often averages are computed and logged. Default 60 s.
    pub stats_period: Duration,
    /// `log_stats`: log the stats line every stats_period. Default true.
    pub log_stats: bool,
    /// `log_connections`. Default true.
    pub log_connections: bool,
    /// `log_disconnections`. Default true.
    pub log_disconnections: bool,
    /// `log_pooler_errors`: log the errors sent to clients. Default true.
    pub log_pooler_errors: bool,
    /// `verbose`: extra logging level. Default 0.
    pub verbose: u32,
    /// `ignore_startup_parameters`: startup parameters accepted from clients and not
    /// forwarded. Default none.
    pub ignore_startup_parameters: Vec<String>,
    /// `metrics_listen` (pgsilo's own): where to serve metrics; `None` = not served.
    pub metrics_listen: Option<SocketAddr>,
    /// `pkt_buf`: buffer size for forwarding, at least 1024. Default 4096.
    pub pkt_buf: usize,
    /// `tcp_keepalive`. Default true.
    pub tcp_keepalive: bool,
    /// `application_name_add_host`: append the client's address to application_name.
    /// Default false.
    pub application_name_add_host: bool,
    /// TLS towards clients and servers, and the Unix socket (`client_tls_*`,
    /// `server_tls_*`, `unix_socket_*`).
    pub front_door: FrontDoor,
    /// `[users]`: settings by user name; users not listed have none.
    pub users: BTreeMap<String, UserSettings>,
}

impl General {
    /// Every `[pgsilo]` key, in the order `config_items` lists them.
    pub const KEYS: &'static [&'static str] = &[
        "name",
        "listen_addr",
        "listen_port",
        "listen_backlog",
        "cpus",
        "auth_type",
        "auth_file",
        "auth_user",
        "auth_query",
        "auth_dbname",
        "pool_mode",
        "max_client_conn",
        "max_pending_logins",
        "max_pending_logins_per_addr",
        "default_pool_size",
        "min_pool_size",
        "reserve_pool_size",
        "reserve_pool_timeout",
        "max_db_connections",
        "max_busy_cores",
        "max_prepared_statements",
        "server_reset_query",
        "server_reset_query_always",
        "server_check_query",
        "server_check_delay",
        "server_connect_timeout",
        "server_login_retry",
        "query_wait_timeout",
        "query_timeout",
        "client_login_timeout",
        "startup_packet_timeout",
        "client_idle_timeout",
        "idle_transaction_timeout",
        "server_idle_timeout",
        "server_lifetime",
        "shutdown_timeout",
        "takeover_socket",
        "admin_users",
        "stats_users",
        "stats_period",
        "log_stats",
        "log_connections",
        "log_disconnections",
        "log_pooler_errors",
        "verbose",
        "ignore_startup_parameters",
        "metrics_listen",
        "pkt_buf",
        "tcp_keepalive",
        "application_name_add_host",
        // FrontDoor::KEYS, in its order.
        "client_tls_sslmode",
        "client_tls_key_file",
        "client_tls_cert_file",
        "client_tls_ca_file",
        "client_tls_protocols",
        "client_tls_ciphers",
        "server_tls_sslmode",
        "server_tls_ca_file",
        "server_tls_key_file",
        "server_tls_cert_file",
        "server_tls_protocols",
        "server_tls_ciphers",
        "unix_socket_dir",
        "unix_socket_mode",
        "unix_socket_group",
    ];

    /// PgBouncer's defaults. `auth_file` has none; it is left empty.
    pub fn defaults(name: String) -> General {
        General {
            name,
            listen_addr: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            listen_port: 6432,
            listen_backlog: 128,
            cpus: None,
            auth_type: AuthType::Md5,
            auth_file: PathBuf::new(),
            auth_user: None,
            auth_query: DEFAULT_AUTH_QUERY.to_string(),
            auth_dbname: None,
            pool_mode: PoolMode::Session,
            max_client_conn: 100,
            max_pending_logins: 1000,
            max_pending_logins_per_addr: 500,
            default_pool_size: 20,
            min_pool_size: 0,
            reserve_pool_size: 0,
            reserve_pool_timeout: Some(Duration::from_secs(5)),
            max_db_connections: 0,
            max_busy_cores: 0,
            max_prepared_statements: 200,
            server_reset_query: Some("DISCARD ALL".to_string()),
            server_reset_query_always: false,
            server_check_query: Some("select 1".to_string()),
            server_check_delay: Duration::from_secs(30),
            server_connect_timeout: Some(Duration::from_secs(15)),
            server_login_retry: Duration::from_secs(15),
            query_wait_timeout: Some(Duration::from_secs(120)),
            query_timeout: None,
            client_login_timeout: Some(Duration::from_secs(60)),
            startup_packet_timeout: Some(Duration::from_secs(10)),
            client_idle_timeout: None,
            idle_transaction_timeout: None,
            server_idle_timeout: Some(Duration::from_secs(600)),
            server_lifetime: Duration::from_secs(3600),
            shutdown_timeout: Duration::from_secs(30),
            takeover_socket: Some(default_takeover_socket(6432)),
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            stats_period: Duration::from_secs(60),
            log_stats: true,
            log_connections: true,
            log_disconnections: true,
            log_pooler_errors: true,
            verbose: 0,
            ignore_startup_parameters: Vec::new(),
            metrics_listen: None,
            pkt_buf: 4096,
            tcp_keepalive: true,
            application_name_add_host: false,
            front_door: FrontDoor::defaults(),
            users: BTreeMap::new(),
        }
    }

    /// Reads the section. Problems go to the section's report; fields with problems keep
    /// their defaults, so the caller must not use the result when problems were found.
    pub(super) fn read(section: &mut Section, config_path: &Path, default_name: String) -> General {
        let d = General::defaults(default_name);
        let name = match section.string("name") {
            Some((name, span)) if name.trim().is_empty() || name.chars().any(char::is_control) => {
                section.invalid("name", span.as_ref(), "must be non-empty printable text");
                d.name
            }
            Some((name, _)) => name,
            None => d.name,
        };
        let listen_addr = read_listen_addr(section).unwrap_or(d.listen_addr);
        let listen_port = section.uint("listen_port", d.listen_port, 1);
        let listen_backlog = section.uint("listen_backlog", d.listen_backlog, 1);
        let cpus = read_cpus(section);
        let auth_type = read_choice(
            section,
            "auth_type",
            AuthType::parse,
            &AuthType::ALL.map(AuthType::as_str),
        )
        .unwrap_or(d.auth_type);
        let auth_file = read_auth_file(section, config_path);
        // As in PgBouncer, an empty value is the same as no value.
        let auth_user = section.string("auth_user").map(|(u, _)| u).filter(|u| !u.is_empty());
        let auth_query = read_auth_query(section, "auth_query").unwrap_or(d.auth_query);
        let auth_dbname = section.string("auth_dbname").map(|(d, _)| d).filter(|d| !d.is_empty());
        let pool_mode = read_pool_mode(section, "pool_mode").unwrap_or(d.pool_mode);
        let max_client_conn = section.uint("max_client_conn", d.max_client_conn, 1);
        let max_pending_logins = section.uint("max_pending_logins", d.max_pending_logins, 1);
        let max_pending_logins_per_addr = section.uint("max_pending_logins_per_addr", d.max_pending_logins_per_addr, 0);
        let default_pool_size = section.uint("default_pool_size", d.default_pool_size, 1);
        let min_pool_size = section.uint("min_pool_size", d.min_pool_size, 0);
        let reserve_pool_size = section.uint("reserve_pool_size", d.reserve_pool_size, 0);
        let reserve_pool_timeout = section.timeout("reserve_pool_timeout", d.reserve_pool_timeout);
        let max_db_connections = section.uint("max_db_connections", d.max_db_connections, 0);
        let max_busy_cores = section.cores("max_busy_cores").unwrap_or(d.max_busy_cores);
        let max_prepared_statements = section.uint("max_prepared_statements", d.max_prepared_statements, 0);
        let server_reset_query = match section.string("server_reset_query") {
            Some((query, _)) if query.trim().is_empty() => None,
            Some((query, _)) => Some(query),
            None => d.server_reset_query,
        };
        let server_reset_query_always = section.bool("server_reset_query_always", d.server_reset_query_always);
        let server_check_query = match section.string("server_check_query") {
            Some((query, _)) if query.trim().is_empty() => None,
            Some((query, _)) => Some(query),
            None => d.server_check_query,
        };
        let server_check_delay = section.seconds("server_check_delay", d.server_check_delay);
        let server_connect_timeout = section.timeout("server_connect_timeout", d.server_connect_timeout);
        let server_login_retry = section.seconds("server_login_retry", d.server_login_retry);
        let query_wait_timeout = section.timeout("query_wait_timeout", d.query_wait_timeout);
        let query_timeout = section.timeout("query_timeout", d.query_timeout);
        let client_login_timeout = section.timeout("client_login_timeout", d.client_login_timeout);
        let startup_packet_timeout = section.timeout("startup_packet_timeout", d.startup_packet_timeout);
        let client_idle_timeout = section.timeout("client_idle_timeout", d.client_idle_timeout);
        let idle_transaction_timeout = section.timeout("idle_transaction_timeout", d.idle_transaction_timeout);
        let server_idle_timeout = section.timeout("server_idle_timeout", d.server_idle_timeout);
        let server_lifetime = section.seconds("server_lifetime", d.server_lifetime);
        let shutdown_timeout = section.seconds("shutdown_timeout", d.shutdown_timeout);
        let takeover_socket = match section.string("takeover_socket") {
            Some((path, _)) if path.trim().is_empty() => None,
            Some((path, _)) => Some(std::path::PathBuf::from(path)),
            None => Some(default_takeover_socket(listen_port)),
        };
        let admin_users = section.names("admin_users");
        let stats_users = section.names("stats_users");
        let stats_period_span = section.span_of("stats_period");
        let mut stats_period = section.seconds("stats_period", d.stats_period);
        if stats_period.is_zero() {
            section.invalid(
                "stats_period",
                stats_period_span.as_ref(),
                "must be more than 0 seconds",
            );
            stats_period = d.stats_period;
        }
        let log_stats = section.bool("log_stats", d.log_stats);
        let log_connections = section.bool("log_connections", d.log_connections);
        let log_disconnections = section.bool("log_disconnections", d.log_disconnections);
        let log_pooler_errors = section.bool("log_pooler_errors", d.log_pooler_errors);
        let verbose = section.uint("verbose", d.verbose, 0);
        let ignore_startup_parameters = section.names("ignore_startup_parameters");
        let metrics_listen =
            section
                .string("metrics_listen")
                .and_then(|(text, span)| match text.trim().parse::<SocketAddr>() {
                    Ok(addr) => Some(addr),
                    Err(_) => {
                        section.invalid(
                            "metrics_listen",
                            span.as_ref(),
                            format!("\"{text}\" is not an address:port such as \"127.0.0.1:9127\""),
                        );
                        None
                    }
                });
        let pkt_buf = section.uint("pkt_buf", d.pkt_buf, 1024);
        let tcp_keepalive = section.bool("tcp_keepalive", d.tcp_keepalive);
        let application_name_add_host = section.bool("application_name_add_host", d.application_name_add_host);
        let front_door = FrontDoor::read(section, config_path);
        if listen_addr.is_empty() && front_door.unix_socket.dir.is_none() {
            let span = section.span_of("listen_addr");
            section.invalid(
                "listen_addr",
                span.as_ref(),
                "no address to listen on, and unix_socket_dir is \"\": clients could not connect at all",
            );
        }
        if auth_type == AuthType::Cert
            && (front_door.client_tls.sslmode == crate::config::SslMode::Disable
                || front_door.client_tls.ca_file.is_none())
        {
            let span = section.span_of("auth_type");
            section.invalid(
                "auth_type",
                span.as_ref(),
                "cert needs client_tls_sslmode other than disable and a client_tls_ca_file",
            );
        }

        General {
            name,
            listen_addr,
            listen_port,
            listen_backlog,
            cpus,
            auth_type,
            auth_file,
            auth_user,
            auth_query,
            auth_dbname,
            pool_mode,
            max_client_conn,
            max_pending_logins,
            max_pending_logins_per_addr,
            default_pool_size,
            min_pool_size,
            reserve_pool_size,
            reserve_pool_timeout,
            max_db_connections,
            max_busy_cores,
            max_prepared_statements,
            server_reset_query,
            server_reset_query_always,
            server_check_query,
            server_check_delay,
            server_connect_timeout,
            server_login_retry,
            query_wait_timeout,
            query_timeout,
            client_login_timeout,
            startup_packet_timeout,
            client_idle_timeout,
            idle_transaction_timeout,
            server_idle_timeout,
            server_lifetime,
            shutdown_timeout,
            takeover_socket,
            admin_users,
            stats_users,
            stats_period,
            log_stats,
            log_connections,
            log_disconnections,
            log_pooler_errors,
            verbose,
            ignore_startup_parameters,
            metrics_listen,
            pkt_buf,
            tcp_keepalive,
            application_name_add_host,
            front_door,
            users: BTreeMap::new(),
        }
    }

    /// Every key with its value as text, in `KEYS` order. Values use the config file's
    /// spelling; durations are seconds and a disabled timeout is 0, as PgBouncer shows them.
    pub fn config_items(&self) -> Vec<(&'static str, String)> {
        let list = |items: &[String]| items.join(",");
        let timeout = |t: Option<Duration>| seconds_text(t.unwrap_or(Duration::ZERO));
        let items = vec![
            ("name", self.name.clone()),
            (
                "listen_addr",
                self.listen_addr
                    .iter()
                    .map(IpAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("listen_port", self.listen_port.to_string()),
            ("listen_backlog", self.listen_backlog.to_string()),
            (
                "cpus",
                self.cpus
                    .as_ref()
                    .map(|c| c.iter().map(usize::to_string).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
            ),
            ("auth_type", self.auth_type.to_string()),
            ("auth_file", self.auth_file.display().to_string()),
            ("auth_user", self.auth_user.clone().unwrap_or_default()),
            ("auth_query", self.auth_query.clone()),
            ("auth_dbname", self.auth_dbname.clone().unwrap_or_default()),
            ("pool_mode", self.pool_mode.to_string()),
            ("max_client_conn", self.max_client_conn.to_string()),
            ("max_pending_logins", self.max_pending_logins.to_string()),
            (
                "max_pending_logins_per_addr",
                self.max_pending_logins_per_addr.to_string(),
            ),
            ("default_pool_size", self.default_pool_size.to_string()),
            ("min_pool_size", self.min_pool_size.to_string()),
            ("reserve_pool_size", self.reserve_pool_size.to_string()),
            ("reserve_pool_timeout", timeout(self.reserve_pool_timeout)),
            ("max_db_connections", self.max_db_connections.to_string()),
            ("max_busy_cores", cores_text(self.max_busy_cores)),
            ("max_prepared_statements", self.max_prepared_statements.to_string()),
            (
                "server_reset_query",
                self.server_reset_query.clone().unwrap_or_default(),
            ),
            ("server_reset_query_always", self.server_reset_query_always.to_string()),
            (
                "server_check_query",
                self.server_check_query.clone().unwrap_or_default(),
            ),
            ("server_check_delay", seconds_text(self.server_check_delay)),
            ("server_connect_timeout", timeout(self.server_connect_timeout)),
            ("server_login_retry", seconds_text(self.server_login_retry)),
            ("query_wait_timeout", timeout(self.query_wait_timeout)),
            ("query_timeout", timeout(self.query_timeout)),
            ("client_login_timeout", timeout(self.client_login_timeout)),
            ("startup_packet_timeout", timeout(self.startup_packet_timeout)),
            ("client_idle_timeout", timeout(self.client_idle_timeout)),
            ("idle_transaction_timeout", timeout(self.idle_transaction_timeout)),
            ("server_idle_timeout", timeout(self.server_idle_timeout)),
            ("server_lifetime", seconds_text(self.server_lifetime)),
            ("shutdown_timeout", seconds_text(self.shutdown_timeout)),
            (
                "takeover_socket",
                self.takeover_socket
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
            ("admin_users", list(&self.admin_users)),
            ("stats_users", list(&self.stats_users)),
            ("stats_period", seconds_text(self.stats_period)),
            ("log_stats", self.log_stats.to_string()),
            ("log_connections", self.log_connections.to_string()),
            ("log_disconnections", self.log_disconnections.to_string()),
            ("log_pooler_errors", self.log_pooler_errors.to_string()),
            ("verbose", self.verbose.to_string()),
            ("ignore_startup_parameters", list(&self.ignore_startup_parameters)),
            (
                "metrics_listen",
                self.metrics_listen.map(|a| a.to_string()).unwrap_or_default(),
            ),
            ("pkt_buf", self.pkt_buf.to_string()),
            ("tcp_keepalive", self.tcp_keepalive.to_string()),
            ("application_name_add_host", self.application_name_add_host.to_string()),
        ];
        let mut items = items;
        items.extend(self.front_door.config_items());
        debug_assert!(items.iter().map(|(k, _)| *k).eq(Self::KEYS.iter().copied()));
        items
    }
}

/// Whole seconds print as integers ("30"), fractions as decimals ("0.5").
/// Thousandths of a core as the config file writes cores: "0.5", "2".
pub fn cores_text(millicores: u32) -> String {
    (f64::from(millicores) / 1000.0).to_string()
}

fn seconds_text(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        d.as_secs_f64().to_string()
    }
}

/// `listen_addr`: PgBouncer's comma-separated string, or a TOML array; `*` means every
/// IPv4 and IPv6 address. Empty means none: Unix socket clients only, as in PgBouncer.
fn read_listen_addr(section: &mut Section) -> Option<Vec<IpAddr>> {
    let (items, span) = section.string_list("listen_addr")?;
    let mut addrs = Vec::new();
    let mut bad = false;
    for item in items {
        let parsed = if item == "*" {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
        } else if let Ok(addr) = item.parse::<IpAddr>() {
            vec![addr]
        } else {
            // A host name, as PgBouncer allows ("localhost" in Debian's stock config):
            // every address it resolves to, resolved once at start and on reload.
            use std::net::ToSocketAddrs;
            match (item.as_str(), 0u16).to_socket_addrs() {
                Ok(found) => {
                    let ips: Vec<IpAddr> = found.map(|a| a.ip()).collect();
                    if ips.is_empty() {
                        section.invalid(
                            "listen_addr",
                            span.as_ref(),
                            format!("\"{item}\" resolves to no address"),
                        );
                        bad = true;
                        continue;
                    }
                    ips
                }
                Err(e) => {
                    section.invalid(
                        "listen_addr",
                        span.as_ref(),
                        format!("\"{item}\" is neither an IP address, \"*\", nor a host name that resolves: {e}"),
                    );
                    bad = true;
                    continue;
                }
            }
        };
        for addr in parsed {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
    }
    (!bad).then_some(addrs)
}

/// `cpus`: a non-empty list of distinct core ids.
fn read_cpus(section: &mut Section) -> Option<Vec<usize>> {
    let value = section.take("cpus")?;
    let span = value.span();
    let Value::Array(items) = value.get_ref() else {
        let found = value.get_ref().type_name();
        section.invalid(
            "cpus",
            span.as_ref(),
            format!("expected an array of core ids, found {found}"),
        );
        return None;
    };
    if items.is_empty() {
        section.invalid("cpus", span.as_ref(), "empty list; remove the key to let pgsilo choose");
        return None;
    }
    let mut cpus = Vec::with_capacity(items.len());
    let mut bad = false;
    for item in items {
        match item.get_ref() {
            Value::Integer(n) => match usize::try_from(*n) {
                Ok(id) if cpus.contains(&id) => {
                    section.invalid("cpus", item.span().as_ref(), format!("core {id} is listed twice"));
                    bad = true;
                }
                Ok(id) => cpus.push(id),
                Err(_) => {
                    section.invalid("cpus", item.span().as_ref(), format!("{n} is not a core id"));
                    bad = true;
                }
            },
            other => {
                let found = other.type_name();
                section.invalid(
                    "cpus",
                    item.span().as_ref(),
                    format!("expected a core id (an integer), found {found}"),
                );
                bad = true;
            }
        }
    }
    (!bad).then_some(cpus)
}

/// `auth_file`: required; relative paths are taken from the config file's folder.
fn read_auth_file(section: &mut Section, config_path: &Path) -> PathBuf {
    let present = section.has("auth_file");
    match section.string("auth_file") {
        Some((file, span)) if file.trim().is_empty() => {
            section.invalid("auth_file", span.as_ref(), "must name a file");
            PathBuf::new()
        }
        Some((file, _)) => {
            let folder = config_path.parent().unwrap_or(Path::new("/"));
            folder.join(file)
        }
        None => {
            if !present {
                section.table_problem("auth_file is required (the userlist.txt with the users who may log in)");
            }
            PathBuf::new()
        }
    }
}

/// An auth_query value; also read for the per-database override. It must be a query
/// and take the user name as `$1`: it runs as a prepared statement with that one
/// parameter.
pub(super) fn read_auth_query(section: &mut Section, key: &'static str) -> Option<String> {
    let (query, span) = section.string(key)?;
    let problem = if query.trim().is_empty() {
        "must not be empty"
    } else if !query.contains("$1") {
        "must take the user name as $1"
    } else {
        return Some(query);
    };
    section.invalid(key, span.as_ref(), problem);
    None
}

/// A pool_mode value; also read for the per-database override.
pub(super) fn read_pool_mode(section: &mut Section, key: &'static str) -> Option<PoolMode> {
    read_choice(section, key, PoolMode::parse, &PoolMode::ALL.map(PoolMode::as_str))
}

fn read_choice<T>(
    section: &mut Section,
    key: &'static str,
    parse: fn(&str) -> Option<T>,
    choices: &[&str],
) -> Option<T> {
    let (text, span) = section.string(key)?;
    let parsed = parse(text.trim());
    if parsed.is_none() {
        let choices = choices.join(", ");
        section.invalid(
            key,
            span.as_ref(),
            format!("\"{text}\" is not supported; expected one of {choices}"),
        );
    }
    parsed
}

/// One takeover socket per port: the port is what identifies a tenant's listener.
pub fn default_takeover_socket(port: u16) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/tmp/.s.pgsilo.{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::FileKind;
    use crate::config::section::Report;

    #[test]
    fn reader_and_config_items_cover_exactly_the_listed_keys() {
        let path = Path::new("/etc/pgsilo/t.toml");
        let mut report = Report::new(FileKind::Config, path, "");
        let mut section = Section::new(&mut report, "[pgsilo]".to_string(), None, Vec::new());
        let general = General::read(&mut section, path, "t".to_string());
        assert_eq!(section.known(), General::KEYS);
        let keys: Vec<_> = general.config_items().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, General::KEYS);
    }

    #[test]
    fn spellings_round_trip() {
        for a in AuthType::ALL {
            assert_eq!(AuthType::parse(&a.to_string()), Some(a));
        }
        for m in PoolMode::ALL {
            assert_eq!(PoolMode::parse(&m.to_string()), Some(m));
        }
        assert_eq!(AuthType::ScramSha256.to_string(), "scram-sha-256");
        assert_eq!(AuthType::parse("SCRAM-SHA-256"), Some(AuthType::ScramSha256));
        assert_eq!(PoolMode::parse("statement"), None);
    }

    #[test]
    fn durations_print_as_seconds() {
        assert_eq!(seconds_text(Duration::from_secs(30)), "30");
        assert_eq!(seconds_text(Duration::from_millis(500)), "0.5");
    }
}
