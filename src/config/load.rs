//! The whole config file: `[pgsilo]` plus `[databases.*]`, read and validated together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::database::{Database, RESERVED_DATABASE_NAMES};
use super::error::{ConfigError, FileKind, Problem};
use super::general::General;
use super::section::{nearest, Report, Section};
use super::value::{line_of, parse_document, Node, Span, Value};

/// One instance's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The config file, absolute.
    pub path: PathBuf,
    pub general: General,
    /// By the name clients ask for.
    pub databases: BTreeMap<String, Database>,
}

const TABLES: [&str; 2] = ["pgsilo", "databases"];

impl Config {
    /// Reads, parses and validates the file, and checks the auth_file can be opened.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Loaded::read(path)?.into_result()
    }

    /// Parses and validates `text` as if read from `path`, which names the file in
    /// messages and anchors a relative auth_file. Touches no files, so unlike `load` it
    /// does not check that the auth_file exists.
    pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let parsed = parse(text, path);
        finish(parsed.config, parsed.problems)
    }

    /// Every `[pgsilo]` key with its value as text, for SHOW CONFIG.
    pub fn config_items(&self) -> Vec<(&'static str, String)> {
        self.general.config_items()
    }
}

fn finish(config: Config, problems: Vec<Problem>) -> Result<Config, ConfigError> {
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid { problems })
    }
}

/// A config as far as it could be read, with its problems; `check` needs this even when
/// there are problems, to go on to the auth_file.
pub(super) struct Loaded {
    pub(super) config: Config,
    pub(super) problems: Vec<Problem>,
    /// The auth_file is named and opens; false means a problem about it is reported.
    pub(super) auth_file_readable: bool,
}

impl Loaded {
    pub(super) fn read(path: &Path) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            kind: FileKind::Config,
            path: path.to_path_buf(),
            source,
        })?;
        let Parsed {
            config,
            mut problems,
            auth_file_line,
        } = parse(&text, path);
        let auth_file = &config.general.auth_file;
        let mut auth_file_readable = false;
        if !auth_file.as_os_str().is_empty() {
            match readable_file(auth_file) {
                Ok(()) => auth_file_readable = true,
                Err(why) => problems.push(Problem {
                    kind: FileKind::Config,
                    file: path.to_path_buf(),
                    line: auth_file_line,
                    message: format!("auth_file in [pgsilo]: cannot read {}: {why}", auth_file.display()),
                }),
            }
        }
        sort_by_line(&mut problems);
        Ok(Loaded {
            config,
            problems,
            auth_file_readable,
        })
    }

    pub(super) fn into_result(self) -> Result<Config, ConfigError> {
        finish(self.config, self.problems)
    }
}

fn readable_file(path: &Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("it is a directory".to_string());
    }
    Ok(())
}

struct Parsed {
    config: Config,
    problems: Vec<Problem>,
    auth_file_line: Option<usize>,
}

fn parse(text: &str, path: &Path) -> Parsed {
    // Messages name the file as the user did; stored paths are absolute.
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let default_name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "pgsilo".to_string());
    let mut report = Report::new(FileKind::Config, path, text);
    let mut config = Config {
        path: absolute.clone(),
        general: General::defaults(default_name.clone()),
        databases: BTreeMap::new(),
    };
    let entries = match parse_document(text) {
        Ok(entries) => entries,
        Err((message, span)) => {
            report.at(span.as_ref(), format!("not valid TOML: {message}"));
            return Parsed {
                config,
                problems: report.problems,
                auth_file_line: None,
            };
        }
    };

    let mut pgsilo = (Vec::new(), None);
    let mut databases = None;
    for (key, value) in entries {
        let span = value.span();
        match (key.as_str(), value.into_inner()) {
            ("pgsilo", Value::Table(t)) => pgsilo = (t, span),
            ("databases", Value::Table(t)) => databases = Some((t, span)),
            (table @ ("pgsilo" | "databases"), other) => {
                let found = other.type_name();
                report.at(
                    span.as_ref(),
                    format!("{table} must be the table [{table}], found {found}"),
                );
            }
            (_, Value::Table(_)) => {
                let hint = match key.as_str() {
                    "pgbouncer" => Some("pgsilo"),
                    other => nearest(other, &TABLES),
                };
                let hint = hint.map(|h| format!(" (did you mean [{h}]?)")).unwrap_or_default();
                report.at(span.as_ref(), format!("unknown table [{key}]{hint}"));
            }
            (_, _) if General::KEYS.contains(&key.as_str()) => {
                report.at(
                    span.as_ref(),
                    format!("key \"{key}\" is outside any table; it belongs under [pgsilo]"),
                );
            }
            (_, _) => report.at(span.as_ref(), format!("unknown key \"{key}\" at top level")),
        }
    }

    let (pgsilo_entries, pgsilo_span) = pgsilo;
    let auth_file_line = pgsilo_entries
        .iter()
        .find(|(k, _)| k == "auth_file")
        .and_then(|(_, v)| v.span())
        .map(|span| line_of(text, span.start));
    let auth_dbname_span = pgsilo_entries
        .iter()
        .find(|(k, _)| k == "auth_dbname")
        .and_then(|(_, v)| v.span());
    let mut section = Section::new(&mut report, "[pgsilo]".to_string(), pgsilo_span, pgsilo_entries);
    config.general = General::read(&mut section, &absolute, default_name);
    section.finish();
    check_general(&mut report, &config.general);

    match databases {
        None => report.at(
            None,
            "no databases: add a [databases.NAME] table for each database clients may use".to_string(),
        ),
        Some((entries, span)) if entries.is_empty() => report.at(
            span.as_ref(),
            "[databases] is empty: add a [databases.NAME] table for each database clients may use".to_string(),
        ),
        Some((entries, _)) => {
            let mut auth_dbnames = Vec::new();
            for (name, value) in entries {
                if let Some((db, span)) = read_database(&mut report, &config.general, name, value) {
                    if let Some(auth_dbname) = &db.auth_dbname {
                        auth_dbnames.push((format!("[databases.{}]", toml_key(&db.name)), auth_dbname.clone(), span));
                    }
                    config.databases.insert(db.name.clone(), db);
                }
            }
            if let Some(auth_dbname) = &config.general.auth_dbname {
                auth_dbnames.push(("[pgsilo]".to_string(), auth_dbname.clone(), auth_dbname_span));
            }
            // The lookup runs on that entry's server, in its dbname.
            for (table, auth_dbname, span) in auth_dbnames {
                if !config.databases.contains_key(&auth_dbname) {
                    report.at(
                        span.as_ref(),
                        format!("auth_dbname in {table}: \"{auth_dbname}\" is not a database in [databases]"),
                    );
                }
            }
        }
    }

    let mut problems = report.problems;
    sort_by_line(&mut problems);
    Parsed {
        config,
        problems,
        auth_file_line,
    }
}

/// Problems that involve more than one key.
fn check_general(report: &mut Report, g: &General) {
    if let Some(metrics) = g.metrics_listen {
        let clash = metrics.port() == g.listen_port
            && (metrics.ip().is_unspecified()
                || g.listen_addr.iter().any(|a| a.is_unspecified() || *a == metrics.ip()));
        if clash {
            report.at(
                None,
                format!(
                    "[pgsilo]: metrics_listen {metrics} uses listen_port {} on an address clients connect to",
                    g.listen_port
                ),
            );
        }
    }
}

/// The database, with where its auth_dbname is written (checked once every database is
/// known).
fn read_database(
    report: &mut Report,
    general: &General,
    name: String,
    value: Node,
) -> Option<(Database, Option<Span>)> {
    let span = value.span();
    let table_name = format!("[databases.{}]", toml_key(&name));
    let name_problem = if name.is_empty() {
        Some("a database name must not be empty".to_string())
    } else if RESERVED_DATABASE_NAMES.contains(&name.as_str()) {
        Some(format!("the name \"{name}\" is reserved for the admin console"))
    } else if name == "*" {
        Some("the \"*\" fallback database is not supported; list each database".to_string())
    } else {
        None
    };
    if let Some(problem) = name_problem {
        report.at(span.as_ref(), format!("{table_name}: {problem}"));
    }
    let Value::Table(entries) = value.into_inner() else {
        report.at(
            span.as_ref(),
            format!("{table_name}: expected a table of settings such as host and port"),
        );
        return None;
    };
    let mut section = Section::new(report, table_name, span, entries);
    let auth_dbname_span = section.span_of("auth_dbname");
    let db = Database::read(&name, &mut section, general);
    section.finish();
    Some((db, auth_dbname_span))
}

/// A table key as it would be written in TOML: bare when it can be, quoted otherwise.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// File order, with whole-file problems last; the sort is stable so a line's problems
/// keep the order they were found in.
fn sort_by_line(problems: &mut [Problem]) {
    problems.sort_by_key(|p| (p.line.is_none(), p.line));
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    use super::*;
    use crate::config::{AuthType, PoolMode};

    const PATH: &str = "/etc/pgsilo/tenant_a.toml";
    const MINIMAL: &str = "[pgsilo]\nauth_file = \"users.txt\"\n\n[databases.app]\nhost = \"db.internal\"\n";

    fn parse_ok(text: &str) -> Config {
        match Config::from_str(text, Path::new(PATH)) {
            Ok(config) => config,
            Err(e) => panic!("unexpected problems:\n{e}"),
        }
    }

    fn messages(text: &str) -> Vec<String> {
        match Config::from_str(text, Path::new(PATH)) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.messages(),
        }
    }

    /// The one message containing `needle`.
    fn find<'m>(messages: &'m [String], needle: &str) -> &'m str {
        let hits: Vec<_> = messages.iter().filter(|m| m.contains(needle)).collect();
        assert_eq!(hits.len(), 1, "{needle:?} in {messages:#?}");
        hits[0]
    }

    fn with_general(lines: &str) -> String {
        format!("[pgsilo]\nauth_file = \"users.txt\"\n{lines}\n\n[databases.app]\nhost = \"db\"\n")
    }

    #[test]
    fn defaults_are_pgbouncers() {
        let c = parse_ok(MINIMAL);
        let g = &c.general;
        assert_eq!(c.path, Path::new(PATH));
        assert_eq!(g.name, "tenant_a");
        assert_eq!(g.listen_addr, [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        assert_eq!(g.listen_port, 6432);
        assert_eq!(g.listen_backlog, 128);
        assert_eq!(g.cpus, None);
        assert_eq!(g.auth_type, AuthType::Md5);
        assert_eq!(g.auth_file, Path::new("/etc/pgsilo/users.txt"));
        assert_eq!(g.pool_mode, PoolMode::Session);
        assert_eq!(g.max_client_conn, 100);
        assert_eq!(g.default_pool_size, 20);
        assert_eq!(g.min_pool_size, 0);
        assert_eq!(g.reserve_pool_size, 0);
        assert_eq!(g.max_db_connections, 0);
        assert_eq!(g.max_prepared_statements, 200);
        assert_eq!(g.server_reset_query.as_deref(), Some("DISCARD ALL"));
        assert!(!g.server_reset_query_always);
        assert_eq!(g.server_check_delay, Duration::from_secs(30));
        assert_eq!(g.server_check_query.as_deref(), Some("select 1"));
        assert_eq!(g.reserve_pool_timeout, Some(Duration::from_secs(5)));
        assert_eq!(g.server_connect_timeout, Some(Duration::from_secs(15)));
        assert_eq!(g.server_login_retry, Duration::from_secs(15));
        assert_eq!(g.query_wait_timeout, Some(Duration::from_secs(120)));
        assert_eq!(g.query_timeout, None);
        assert_eq!(g.client_login_timeout, Some(Duration::from_secs(60)));
        assert_eq!(g.client_idle_timeout, None);
        assert_eq!(g.idle_transaction_timeout, None);
        assert_eq!(g.server_idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(g.server_lifetime, Duration::from_secs(3600));
        assert_eq!(g.shutdown_timeout, Duration::from_secs(30));
        assert!(g.admin_users.is_empty() && g.stats_users.is_empty());
        assert_eq!(g.stats_period, Duration::from_secs(60));
        assert!(g.log_connections && g.log_disconnections && g.log_pooler_errors);
        assert_eq!(g.verbose, 0);
        assert!(g.ignore_startup_parameters.is_empty());
        assert_eq!(g.metrics_listen, None);
        assert_eq!(g.pkt_buf, 4096);
        assert!(g.tcp_keepalive);
        assert!(!g.application_name_add_host);
        assert_eq!((g.auth_user.as_deref(), g.auth_dbname.as_deref()), (None, None));
        assert_eq!(
            g.auth_query,
            "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
        );

        let db = &c.databases["app"];
        assert_eq!(db.name, "app");
        assert_eq!(db.host, "db.internal");
        assert_eq!(db.port, 5432);
        assert_eq!(db.dbname, "app");
        assert_eq!((db.user.as_deref(), db.password.as_deref()), (None, None));
        assert_eq!((db.pool_size, db.pool_mode), (None, None));
        assert_eq!(db.max_db_connections, 0);
        assert_eq!(db.effective_pool_size(g), 20);
        assert_eq!(db.effective_pool_mode(g), PoolMode::Session);
        assert_eq!((db.effective_min_pool_size(g), db.effective_reserve_pool(g)), (0, 0));
        assert_eq!(db.effective_auth_user(g), None);
        assert_eq!(db.effective_auth_query(g), g.auth_query);
        assert_eq!(db.effective_auth_dbname(g), "app");
    }

    #[test]
    fn auth_query_keys_are_read_globally_and_overridden_per_database() {
        let c = parse_ok(
            r#"
[pgsilo]
auth_file = "users.txt"
auth_user = "pgsilo_auth"
auth_query = "SELECT usename, passwd FROM pgsilo.lookup($1)"
auth_dbname = "authdb"

[databases.app]
host = "db"

[databases.authdb]
host = "db"
dbname = "postgres"

[databases.other]
host = "db2"
auth_user = "other_auth"
auth_query = "SELECT u, p FROM users WHERE u = $1"
auth_dbname = "other"
"#,
        );
        let g = &c.general;
        assert_eq!(g.auth_user.as_deref(), Some("pgsilo_auth"));
        assert_eq!(g.auth_dbname.as_deref(), Some("authdb"));
        let app = &c.databases["app"];
        assert_eq!(app.effective_auth_user(g), Some("pgsilo_auth"));
        assert_eq!(
            app.effective_auth_query(g),
            "SELECT usename, passwd FROM pgsilo.lookup($1)"
        );
        assert_eq!(app.effective_auth_dbname(g), "authdb");
        let other = &c.databases["other"];
        assert_eq!(other.effective_auth_user(g), Some("other_auth"));
        assert_eq!(other.effective_auth_query(g), "SELECT u, p FROM users WHERE u = $1");
        assert_eq!(other.effective_auth_dbname(g), "other");

        let items: BTreeMap<_, _> = c.config_items().into_iter().collect();
        assert_eq!(items["auth_user"], "pgsilo_auth");
        assert_eq!(items["auth_dbname"], "authdb");
        assert_eq!(items["auth_query"], "SELECT usename, passwd FROM pgsilo.lookup($1)");

        // A database may turn the lookup on for itself alone; an empty [pgsilo] value is
        // no value, as in PgBouncer.
        let c = parse_ok(&format!(
            "{}auth_user = \"a\"\n",
            with_general("auth_user = \"\"\nauth_dbname = \"\"")
        ));
        assert_eq!(
            (c.general.auth_user.as_deref(), c.general.auth_dbname.as_deref()),
            (None, None)
        );
        assert_eq!(c.databases["app"].effective_auth_user(&c.general), Some("a"));
    }

    #[test]
    fn auth_query_keys_with_problems_are_reported() {
        let m = messages(&format!(
            "{}auth_user = \"\"\nauth_query = \"SELECT 1\"\nauth_dbname = \"nowhere\"\n",
            with_general("auth_query = \"  \"\nauth_dbname = \"missing\"\nauth_user = 5")
        ));
        assert!(find(&m, "auth_query in [pgsilo]").ends_with("must not be empty"));
        assert!(find(&m, "auth_user in [pgsilo]").ends_with("expected a string, found an integer"));
        assert!(find(&m, "auth_dbname in [pgsilo]")
            .ends_with("auth_dbname in [pgsilo]: \"missing\" is not a database in [databases]"));
        assert!(find(&m, "auth_user in [databases.app]").contains("must not be empty"));
        assert!(find(&m, "auth_query in [databases.app]").ends_with("must take the user name as $1"));
        assert!(find(&m, "\"nowhere\"").contains("line 11: auth_dbname in [databases.app]"));
        assert_eq!(m.len(), 6, "{m:#?}");
    }

    #[test]
    fn reads_every_key() {
        let c = parse_ok(
            r#"
[pgsilo]
name = "tenant_a"
listen_addr = "127.0.0.1"
listen_port = 7432
listen_backlog = 64
cpus = [0, 2]
auth_type = "scram-sha-256"
auth_file = "/srv/userlist_tenant_a.txt"
pool_mode = "transaction"
max_client_conn = 1000
default_pool_size = 10
min_pool_size = 2
reserve_pool_size = 3
reserve_pool_timeout = 0
max_db_connections = 50
max_prepared_statements = 0
server_reset_query = ""
server_reset_query_always = true
server_check_query = ""
server_check_delay = 0
server_connect_timeout = 5
server_login_retry = 1
query_wait_timeout = 0
query_timeout = 30
client_login_timeout = 10
client_idle_timeout = 300
idle_transaction_timeout = 0.5
server_idle_timeout = 0
server_lifetime = 0
shutdown_timeout = "2m"
admin_users = "admin, ops"
stats_users = ["monitor"]
stats_period = 15
log_connections = false
log_disconnections = false
log_pooler_errors = false
verbose = 2
ignore_startup_parameters = "extra_float_digits,search_path"
metrics_listen = "127.0.0.1:9127"
pkt_buf = 8192
tcp_keepalive = false
application_name_add_host = true

[databases.tenant_a_db]
host = "/var/run/postgresql"
port = 5433
dbname = "real_db"
user = "app"
password = "secret"
pool_size = 4
pool_mode = "session"
min_pool_size = 1
reserve_pool = 2
max_db_connections = 8
"#,
        );
        let g = &c.general;
        assert_eq!(g.listen_port, 7432);
        assert_eq!(g.cpus, Some(vec![0, 2]));
        assert_eq!(g.auth_type, AuthType::ScramSha256);
        assert_eq!(g.auth_file, Path::new("/srv/userlist_tenant_a.txt"));
        assert_eq!(g.pool_mode, PoolMode::Transaction);
        assert_eq!(g.server_reset_query, None);
        assert_eq!(g.server_check_delay, Duration::ZERO);
        assert_eq!(g.query_wait_timeout, None);
        assert_eq!(g.query_timeout, Some(Duration::from_secs(30)));
        assert_eq!(g.idle_transaction_timeout, Some(Duration::from_millis(500)));
        assert_eq!(g.server_idle_timeout, None);
        assert_eq!(g.server_lifetime, Duration::ZERO);
        assert_eq!(g.shutdown_timeout, Duration::from_secs(120));
        assert_eq!(g.admin_users, ["admin", "ops"]);
        assert_eq!(g.stats_users, ["monitor"]);
        assert_eq!(g.ignore_startup_parameters, ["extra_float_digits", "search_path"]);
        assert_eq!(g.metrics_listen, Some("127.0.0.1:9127".parse().unwrap()));
        assert_eq!(g.verbose, 2);
        assert!(g.application_name_add_host && !g.tcp_keepalive);

        let db = &c.databases["tenant_a_db"];
        assert_eq!(db.host, "/var/run/postgresql");
        assert_eq!((db.port, db.dbname.as_str()), (5433, "real_db"));
        assert_eq!(
            (db.user.as_deref(), db.password.as_deref()),
            (Some("app"), Some("secret"))
        );
        assert_eq!(db.effective_pool_size(g), 4);
        assert_eq!(db.effective_pool_mode(g), PoolMode::Session);
        assert_eq!(db.max_db_connections, 8);
        assert_eq!((db.effective_min_pool_size(g), db.effective_reserve_pool(g)), (1, 2));
        assert_eq!(g.reserve_pool_timeout, None);
        assert_eq!(g.server_check_query, None);

        let items: BTreeMap<_, _> = c.config_items().into_iter().collect();
        assert_eq!(items["idle_transaction_timeout"], "0.5");
        assert_eq!(items["query_wait_timeout"], "0");
        assert_eq!(items["admin_users"], "admin,ops");
        assert_eq!(items["auth_type"], "scram-sha-256");
        assert_eq!(items["cpus"], "0,2");
        assert_eq!(items["server_reset_query"], "");
    }

    #[test]
    fn database_inherits_the_global_max_db_connections() {
        let c = parse_ok(&with_general("max_db_connections = 7"));
        assert_eq!(c.databases["app"].max_db_connections, 7);
    }

    #[test]
    fn unknown_keys_name_the_key_the_table_the_file_and_the_line() {
        let text = "[pgsilo]\nauth_file = \"u.txt\"\nmax_client_con = 10\n\n[databases.app]\nhost = \"db\"\nprot = 5432\n\n[pgbouncer]\nlisten_port = 1\n";
        let m = messages(text);
        assert_eq!(
            find(&m, "max_client_con\""),
            "/etc/pgsilo/tenant_a.toml line 3: unknown key \"max_client_con\" in [pgsilo] (did you mean \"max_client_conn\"?)"
        );
        assert_eq!(
            find(&m, "prot"),
            "/etc/pgsilo/tenant_a.toml line 7: unknown key \"prot\" in [databases.app] (did you mean \"port\"?)"
        );
        assert!(find(&m, "[pgbouncer]").contains("unknown table [pgbouncer] (did you mean [pgsilo]?)"));
        assert_eq!(m.len(), 3, "{m:#?}");
    }

    #[test]
    fn keys_before_any_table_are_pointed_at_pgsilo() {
        let text = format!("listen_port = 6432\nfoo = 1\n{MINIMAL}");
        let m = messages(&text);
        assert!(find(&m, "line 1:").contains("\"listen_port\" is outside any table; it belongs under [pgsilo]"));
        assert!(find(&m, "line 2:").contains("unknown key \"foo\" at top level"));
    }

    #[test]
    fn wrong_types_name_the_key_and_the_expected_type() {
        let m = messages(&with_general(
            "listen_port = \"6432\"\nlog_connections = 1\nadmin_users = 5\nserver_idle_timeout = true\nauth_type = \"ldap\"",
        ));
        assert!(find(&m, "listen_port")
            .ends_with("listen_port in [pgsilo]: expected an integer from 1 to 65535, found a string"));
        assert!(find(&m, "log_connections").ends_with("expected true or false, found an integer"));
        assert!(find(&m, "admin_users").ends_with("expected a string or an array of strings, found an integer"));
        assert!(find(&m, "server_idle_timeout").ends_with("expected a number of seconds, found a boolean"));
        assert!(find(&m, "auth_type")
            .contains("\"ldap\" is not supported; expected one of trust, plain, md5, scram-sha-256"));
        assert_eq!(m.len(), 5);
    }

    #[test]
    fn every_problem_is_reported_in_file_order() {
        let text = r#"
[pgsilo]
listen_addr = "localhost"
listen_port = 0
default_pool_size = 0
pkt_buf = 512
pool_mode = "statement"
query_timeout = -1
stats_period = 0
cpus = [1, 1]

[databases.pgsilo]
host = "db"

[databases.pgbouncer]
host = "db"

[databases.nohost]
port = 70000

[databases.sock]
host = "run/postgresql"
password = "x"
pool_size = 0
"#;
        let m = messages(text);
        let expected = [
            "line 2: [pgsilo]: auth_file is required",
            "line 3: listen_addr in [pgsilo]: \"localhost\" is not an IP address",
            "line 4: listen_port in [pgsilo]: must be at least 1, found 0",
            "line 5: default_pool_size in [pgsilo]: must be at least 1, found 0",
            "line 6: pkt_buf in [pgsilo]: must be at least 1024, found 512",
            "line 7: pool_mode in [pgsilo]: \"statement\" is not supported; expected one of session, transaction",
            "line 8: query_timeout in [pgsilo]: -1 is negative",
            "line 9: stats_period in [pgsilo]: must be more than 0 seconds",
            "line 10: cpus in [pgsilo]: core 1 is listed twice",
            "[databases.pgsilo]: the name \"pgsilo\" is reserved for the admin console",
            "[databases.pgbouncer]: the name \"pgbouncer\" is reserved",
            "[databases.nohost]: host is required",
            "port in [databases.nohost]: must be at most 65535, found 70000",
            "host in [databases.sock]: \"run/postgresql\" is relative",
            "password in [databases.sock]: is set without user",
            "pool_size in [databases.sock]: must be at least 1, found 0",
        ];
        assert_eq!(m.len(), expected.len(), "{m:#?}");
        for (message, want) in m.iter().zip(expected) {
            assert!(message.contains(want), "{message:?} should contain {want:?}");
            assert!(message.starts_with(PATH), "{message}");
        }
        // Display puts one problem on each line.
        let err = Config::from_str(text, Path::new(PATH)).unwrap_err();
        assert_eq!(err.to_string().lines().count(), expected.len());
    }

    #[test]
    fn a_pooler_without_databases_is_an_error() {
        let m = messages("[pgsilo]\nauth_file = \"u.txt\"\n");
        assert!(find(&m, "no databases").starts_with(&format!("{PATH}: no databases")));
        let m = messages("[pgsilo]\nauth_file = \"u.txt\"\n[databases]\n");
        assert!(find(&m, "[databases] is empty").starts_with(&format!("{PATH} line 3:")));
    }

    #[test]
    fn relative_auth_file_is_taken_from_the_config_folder() {
        let c = Config::from_str(MINIMAL, Path::new("/srv/tenants/a.toml")).unwrap();
        assert_eq!(c.general.auth_file, Path::new("/srv/tenants/users.txt"));
        assert_eq!(c.general.name, "a");

        let c = Config::from_str(MINIMAL, Path::new("conf/b.toml")).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(c.path, cwd.join("conf/b.toml"));
        assert_eq!(c.general.auth_file, cwd.join("conf/users.txt"));

        let text = MINIMAL.replace("users.txt", "/abs/users.txt");
        let c = Config::from_str(&text, Path::new("conf/b.toml")).unwrap();
        assert_eq!(c.general.auth_file, Path::new("/abs/users.txt"));
    }

    #[test]
    fn listen_addr_takes_a_string_a_comma_list_or_an_array() {
        let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        let parse = |value: &str| {
            parse_ok(&with_general(&format!("listen_addr = {value}")))
                .general
                .listen_addr
        };
        assert_eq!(parse("\"10.0.0.1\""), [v4(10, 0, 0, 1)]);
        assert_eq!(
            parse("\"10.0.0.1, ::1\""),
            [v4(10, 0, 0, 1), IpAddr::V6(Ipv6Addr::LOCALHOST)]
        );
        assert_eq!(
            parse("[\"::1\", \"10.0.0.2\"]"),
            [IpAddr::V6(Ipv6Addr::LOCALHOST), v4(10, 0, 0, 2)]
        );
        let all = [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)];
        assert_eq!(parse("\"*\""), all);
        assert_eq!(parse("[\"*\", \"0.0.0.0\"]"), all);

        let m = messages(&with_general("listen_addr = [\"10.0.0.1\", \"nope\", 3]"));
        assert!(find(&m, "nope").contains("\"nope\" is not an IP address"));
        assert!(find(&m, "found an integer").contains("listen_addr in [pgsilo]"));
        let m = messages(&with_general("listen_addr = \"\""));
        assert!(find(&m, "listen_addr").contains("no address to listen on"));
    }

    #[test]
    fn timeouts_take_whole_or_fractional_seconds_and_zero_disables() {
        let g = parse_ok(&with_general(
            "query_wait_timeout = 0\nclient_login_timeout = 2.5\nserver_connect_timeout = \"1500ms\"\nserver_check_delay = 0.25",
        ))
        .general;
        assert_eq!(g.query_wait_timeout, None);
        assert_eq!(g.client_login_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(g.server_connect_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(g.server_check_delay, Duration::from_millis(250));
        let m = messages(&with_general("query_timeout = -0.5\nclient_idle_timeout = \"soon\""));
        assert!(find(&m, "query_timeout").contains("-0.5 is not a usable number of seconds"));
        assert!(find(&m, "client_idle_timeout").contains("\"soon\" is not a duration"));
    }

    #[test]
    fn metrics_listen_must_be_an_address_apart_from_the_client_port() {
        let m = messages(&with_general("metrics_listen = \"9127\""));
        assert!(find(&m, "metrics_listen").contains("is not an address:port"));
        let m = messages(&with_general(
            "listen_addr = \"*\"\nmetrics_listen = \"127.0.0.1:6432\"",
        ));
        assert!(find(&m, "metrics_listen").contains("uses listen_port 6432"));
        let g = parse_ok(&with_general("metrics_listen = \"[::1]:9127\"")).general;
        assert_eq!(g.metrics_listen.map(|a| a.port()), Some(9127));
    }

    #[test]
    fn database_names_that_need_quotes_are_quoted_in_messages() {
        let text = "[pgsilo]\nauth_file = \"u\"\n[databases.\"my db\"]\nhost = \"db\"\nsize = 1\n[databases.\"*\"]\nhost = \"db\"\n";
        let m = messages(text);
        assert!(find(&m, "size").contains("unknown key \"size\" in [databases.\"my db\"]"));
        assert!(find(&m, "fallback").contains("[databases.\"*\"]"));
        let m = messages("[pgsilo]\nauth_file = \"u\"\n[databases]\napp = \"host=db\"\n");
        assert!(find(&m, "app").contains("[databases.app]: expected a table of settings"));
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let m = messages("[pgsilo]\nauth_file = \"u.txt\"\nlisten_port = = 1\n");
        assert_eq!(m.len(), 1);
        assert!(m[0].starts_with(&format!("{PATH} line 3: not valid TOML:")), "{}", m[0]);
    }

    #[test]
    fn load_checks_the_auth_file_can_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let err = Config::load(&path).unwrap_err();
        let m = err.messages();
        assert_eq!(m.len(), 1);
        assert!(m[0].contains("line 2: auth_file in [pgsilo]: cannot read"), "{}", m[0]);
        assert!(m[0].contains("users.txt"));

        std::fs::write(dir.path().join("users.txt"), "\"a\" \"b\"\n").unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.general.auth_file, dir.path().join("users.txt"));

        let missing = dir.path().join("none.toml");
        let err = Config::load(&missing).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Read {
                kind: FileKind::Config,
                ..
            }
        ));
        assert!(err.to_string().starts_with("cannot read config file "));
    }

    #[test]
    fn inline_tables_and_dotted_keys_work_like_headers() {
        let text = "[pgsilo]\nauth_file = \"u\"\n[databases]\na = { host = \"db1\", port = 6000 }\nb.host = \"db2\"\n";
        let c = parse_ok(text);
        assert_eq!((c.databases["a"].host.as_str(), c.databases["a"].port), ("db1", 6000));
        assert_eq!(c.databases["b"].host, "db2");

        let m = messages("[pgsilo]\nauth_file = \"u\"\n[databases]\na = { host = \"db1\", prot = 1 }\n");
        assert!(find(&m, "prot").starts_with(&format!("{PATH} line 4: unknown key \"prot\"")));
    }

    #[test]
    fn tables_where_values_belong_are_wrong_types() {
        let m = messages(&with_general("listen_port = 1979-05-27\n[pgsilo.auth_type.x]\ny = 1"));
        assert!(find(&m, "listen_port").ends_with("expected an integer from 1 to 65535, found a datetime"));
        assert!(find(&m, "auth_type").ends_with("auth_type in [pgsilo]: expected a string, found a table"));
        assert_eq!(m.len(), 2, "{m:#?}");
    }
}
