//! The whole config: `[pgsilo]`, `[databases.*]` and `[users.*]`, read and validated
//! together, from pgsilo's TOML or from a PgBouncer ini as it is (`ini.rs`). Both become
//! the same tree of tables, read by the same readers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::database::{Database, RESERVED_DATABASE_NAMES};
use super::error::{ConfigError, FileKind, Notice, Problem};
use super::general::{read_pool_mode, General, UserSettings};
use super::ini;
use super::section::{nearest, Report, Section, Source};
use super::value::{parse_document, Entries, Node, Span, Value};

/// One instance's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The config file, absolute.
    pub path: PathBuf,
    pub general: General,
    /// By the name clients ask for; `*` ([`FALLBACK_DATABASE`]) serves the names no
    /// other entry has.
    pub databases: BTreeMap<String, Database>,
}

/// The `[databases]` entry for databases no other entry names (PgBouncer's `*`): a client
/// asking for one gets a pool to that entry's server, in the database it asked for
/// (unless the entry names a dbname).
pub const FALLBACK_DATABASE: &str = "*";

const TABLES: [&str; 3] = ["pgsilo", "databases", "users"];

impl Config {
    /// Reads, parses and validates the file (TOML, or a PgBouncer ini), and checks the
    /// auth_file can be opened.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Loaded::read(path)?.into_result()
    }

    /// Parses and validates `text` as pgsilo's TOML, as if read from `path`, which names
    /// the file in messages and anchors a relative auth_file. Touches no files, so unlike
    /// `load` it does not check that the auth_file exists.
    pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let parsed = parse_toml(text, path);
        finish(parsed.config, parsed.problems)
    }

    /// Parses and validates `text` as a PgBouncer ini, as if read from `path`; `load` reads
    /// what it `%include`s. Touches no files itself: the fuzz targets' way in (fuzz/).
    #[doc(hidden)]
    pub fn from_ini_str(
        text: &str,
        path: &Path,
        load: &dyn Fn(&Path) -> std::io::Result<String>,
    ) -> Result<Config, ConfigError> {
        let parsed = parse_ini(path, text.to_string(), Path::new("/"), load);
        finish(parsed.config, parsed.problems)
    }

    /// Every `[pgsilo]` key with its value as text, for SHOW CONFIG.
    pub fn config_items(&self) -> Vec<(&'static str, String)> {
        self.general.config_items()
    }

    /// The configuration a client of `database` logging in as `user` is served under:
    /// this one when it lists the database and has no `[users]` settings for the user;
    /// otherwise a copy whose entry for `database` is made from the `*` entry (dbname =
    /// the name asked for) and carries the user's pool_mode. None: no such database.
    pub fn for_login(self: &Arc<Config>, database: &str, user: &str) -> Option<Arc<Config>> {
        if RESERVED_DATABASE_NAMES.contains(&database) {
            return None;
        }
        let user_mode = self.general.users.get(user).and_then(|u| u.pool_mode);
        let listed = self.databases.get(database).filter(|_| database != FALLBACK_DATABASE);
        if listed.is_some() && user_mode.is_none() {
            return Some(self.clone());
        }
        let mut db = match listed {
            Some(db) => db.clone(),
            None => {
                let mut db = self.databases.get(FALLBACK_DATABASE)?.clone();
                db.name = database.to_string();
                if db.dbname == FALLBACK_DATABASE {
                    db.dbname = database.to_string();
                }
                db
            }
        };
        if user_mode.is_some() {
            db.pool_mode = user_mode;
        }
        let mut config = Config::clone(self);
        config.databases.insert(database.to_string(), db);
        Some(Arc::new(config))
    }
}

fn finish(config: Config, problems: Vec<Problem>) -> Result<Config, ConfigError> {
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid { problems })
    }
}

/// Which syntax a config was written in; decides how messages name its tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dialect {
    Toml,
    PgBouncer,
}

impl Dialect {
    fn general(self) -> &'static str {
        match self {
            Dialect::Toml => "[pgsilo]",
            Dialect::PgBouncer => "[pgbouncer]",
        }
    }

    fn database(self, name: &str) -> String {
        match self {
            Dialect::Toml => format!("[databases.{}]", toml_key(name)),
            Dialect::PgBouncer => format!("[databases] {name}"),
        }
    }

    fn user(self, name: &str) -> String {
        match self {
            Dialect::Toml => format!("[users.{}]", toml_key(name)),
            Dialect::PgBouncer => format!("[users] {name}"),
        }
    }
}

/// A config as far as it could be read, with its problems; `check` needs this even when
/// there are problems, to go on to the auth_file.
pub(super) struct Loaded {
    pub(super) config: Config,
    pub(super) problems: Vec<Problem>,
    pub(super) notices: Vec<Notice>,
    /// The auth_file is named and opens; false means a problem about it is reported.
    pub(super) auth_file_readable: bool,
    /// A PgBouncer ini's tables as pgsilo's (what `convert` writes out); None for TOML.
    pub(super) ini_tables: Option<Entries>,
}

impl Loaded {
    pub(super) fn read(path: &Path) -> Result<Loaded, ConfigError> {
        let Parsed {
            config,
            mut problems,
            notices,
            auth_file_at,
            ini_tables,
        } = Self::parse_file(path)?;
        let auth_file = &config.general.auth_file;
        let mut auth_file_readable = false;
        if !auth_file.as_os_str().is_empty() {
            match readable_file(auth_file) {
                Ok(()) => auth_file_readable = true,
                Err(why) => {
                    let (file, line) = auth_file_at.unwrap_or_else(|| (path.to_path_buf(), None));
                    let section = if ini_tables.is_some() {
                        Dialect::PgBouncer
                    } else {
                        Dialect::Toml
                    }
                    .general();
                    problems.push(Problem {
                        kind: FileKind::Config,
                        file,
                        line,
                        message: format!("auth_file in {section}: cannot read {}: {why}", auth_file.display()),
                    });
                }
            }
        }
        sort_by_line(&mut problems, path);
        Ok(Loaded {
            config,
            problems,
            notices,
            auth_file_readable,
            ini_tables,
        })
    }

    /// Reads and parses the file without looking at the files it names.
    fn parse_file(path: &Path) -> Result<Parsed, ConfigError> {
        let text = read_text(path)?;
        if ini::is_pgbouncer_config(path, &text) {
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
            Ok(parse_ini(path, text, &cwd, &|p: &Path| std::fs::read_to_string(p)))
        } else {
            Ok(parse_toml(&text, path))
        }
    }

    /// Reads the config without opening the files it names (for `convert`): the config,
    /// its problems and notices, and a PgBouncer ini's tables.
    pub(super) fn read_unchecked(path: &Path) -> Result<Loaded, ConfigError> {
        let parsed = Self::parse_file(path)?;
        Ok(Loaded {
            config: parsed.config,
            problems: parsed.problems,
            notices: parsed.notices,
            auth_file_readable: false,
            ini_tables: parsed.ini_tables,
        })
    }

    pub(super) fn into_result(self) -> Result<Config, ConfigError> {
        finish(self.config, self.problems)
    }
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        kind: FileKind::Config,
        path: path.to_path_buf(),
        source,
    })
}

fn readable_file(path: &Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("it is a directory".to_string());
    }
    Ok(())
}

/// A file and, where there is one, a line in it.
type Location = (PathBuf, Option<usize>);

struct Parsed {
    config: Config,
    problems: Vec<Problem>,
    notices: Vec<Notice>,
    /// Where auth_file is set (file, line), for problems about the file it names.
    auth_file_at: Option<Location>,
    ini_tables: Option<Entries>,
}

/// The config before its tables are read: the defaults, under the file's name.
fn empty_config(path: &Path) -> (Config, String) {
    // Messages name the file as the user did; stored paths are absolute.
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let default_name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "pgsilo".to_string());
    let config = Config {
        path: absolute,
        general: General::defaults(default_name.clone()),
        databases: BTreeMap::new(),
    };
    (config, default_name)
}

fn parse_toml(text: &str, path: &Path) -> Parsed {
    let mut report = Report::new(FileKind::Config, path, text);
    let (config, default_name) = empty_config(path);
    let (config, auth_file_at, notices) = match parse_document(text) {
        Ok(entries) => read_tables(&mut report, entries, config, default_name, Dialect::Toml),
        Err((message, span)) => {
            report.at(span.as_ref(), format!("not valid TOML: {message}"));
            (config, None, Vec::new())
        }
    };
    let mut problems = report.problems;
    sort_by_line(&mut problems, path);
    Parsed {
        config,
        problems,
        notices,
        auth_file_at,
        ini_tables: None,
    }
}

/// A PgBouncer ini (and what it includes) through the same readers as TOML; `cwd` is
/// where relative names are taken from, `load` reads included files.
fn parse_ini(path: &Path, text: String, cwd: &Path, load: &dyn Fn(&Path) -> std::io::Result<String>) -> Parsed {
    let doc = ini::read(path, text, cwd, load);
    // Messages name the main file as the user did.
    let sources = doc
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| Source {
            base: f.base,
            file: if i == 0 { path } else { &f.path },
            text: &f.text,
        })
        .collect();
    let mut report = Report::with_sources(FileKind::Config, sources);
    for (span, message) in &doc.problems {
        report.at(span.as_ref(), message.clone());
    }
    let (config, default_name) = empty_config(path);
    let (config, auth_file_at, mut notices) = if doc.tables.is_empty() {
        (config, None, Vec::new())
    } else {
        read_tables(
            &mut report,
            doc.tables.clone(),
            config,
            default_name,
            Dialect::PgBouncer,
        )
    };
    for n in &doc.notices {
        let (file, line) = report.locate(n.span.as_ref());
        notices.push(Notice {
            file,
            line,
            message: n.message.clone(),
            unsupported: n.unsupported,
        });
    }
    notices.sort_by_key(|n| (n.file != path, n.line.is_none(), n.line));
    let mut problems = report.problems;
    sort_by_line(&mut problems, path);
    Parsed {
        config,
        problems,
        notices,
        auth_file_at,
        ini_tables: Some(doc.tables),
    }
}

/// The top-level tables into a config: `[pgsilo]`, `[databases]`, `[users]`. Returns
/// where auth_file is set, and notices about what reads differently in this dialect.
fn read_tables(
    report: &mut Report,
    entries: Entries,
    mut config: Config,
    default_name: String,
    dialect: Dialect,
) -> (Config, Option<Location>, Vec<Notice>) {
    let mut notices = Vec::new();
    let mut pgsilo = (Vec::new(), None);
    let mut databases = None;
    let mut users = None;
    for (key, value) in entries {
        let span = value.span();
        match (key.as_str(), value.into_inner()) {
            ("pgsilo", Value::Table(t)) => pgsilo = (t, span),
            ("databases", Value::Table(t)) => databases = Some((t, span)),
            ("users", Value::Table(t)) => users = Some((t, span)),
            (table @ ("pgsilo" | "databases" | "users"), other) => {
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
    let auth_file_at = pgsilo_entries
        .iter()
        .find(|(k, _)| k == "auth_file")
        .and_then(|(_, v)| v.span())
        .map(|span| report.locate(Some(&span)));
    let auth_dbname_span = pgsilo_entries
        .iter()
        .find(|(k, _)| k == "auth_dbname")
        .and_then(|(_, v)| v.span());
    let mut section = Section::new(report, dialect.general().to_string(), pgsilo_span, pgsilo_entries);
    config.general = General::read(&mut section, &config.path, default_name);
    section.finish();
    check_general(report, &config.general, dialect);

    let no_databases = match databases {
        None => Some((None, "no databases")),
        Some((entries, span)) if entries.is_empty() => Some((span, "[databases] is empty")),
        Some((entries, _)) => {
            let mut auth_dbnames = Vec::new();
            for (name, value) in entries {
                if let Some((db, span)) = read_database(report, &config.general, name, value, dialect) {
                    if let Some(auth_dbname) = &db.auth_dbname {
                        auth_dbnames.push((dialect.database(&db.name), auth_dbname.clone(), span));
                    }
                    config.databases.insert(db.name.clone(), db);
                }
            }
            if let Some(auth_dbname) = &config.general.auth_dbname {
                auth_dbnames.push((dialect.general().to_string(), auth_dbname.clone(), auth_dbname_span));
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
            None
        }
    };
    if let Some((span, what)) = no_databases {
        match dialect {
            Dialect::Toml => report.at(
                span.as_ref(),
                format!("{what}: add a [databases.NAME] table for each database clients may use"),
            ),
            // PgBouncer starts without databases; so does pgsilo reading its file.
            Dialect::PgBouncer => {
                let (file, line) = report.locate(span.as_ref());
                notices.push(Notice {
                    file,
                    line,
                    message: format!(
                        "{what}: every client will get \"no such database\" (add NAME = host=... lines under [databases])"
                    ),
                    unsupported: false,
                });
            }
        }
    }

    if let Some((entries, _)) = users {
        for (name, value) in entries {
            if let Some(settings) = read_user(report, &name, value, dialect) {
                config.general.users.insert(name, settings);
            }
        }
    }
    (config, auth_file_at, notices)
}

/// Problems that involve more than one key.
fn check_general(report: &mut Report, g: &General, dialect: Dialect) {
    if let Some(metrics) = g.metrics_listen {
        let clash = metrics.port() == g.listen_port
            && (metrics.ip().is_unspecified()
                || g.listen_addr.iter().any(|a| a.is_unspecified() || *a == metrics.ip()));
        if clash {
            report.at(
                None,
                format!(
                    "{}: metrics_listen {metrics} uses listen_port {} on an address clients connect to",
                    dialect.general(),
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
    dialect: Dialect,
) -> Option<(Database, Option<Span>)> {
    let span = value.span();
    let table_name = dialect.database(&name);
    let name_problem = if name.is_empty() {
        Some("a database name must not be empty".to_string())
    } else if RESERVED_DATABASE_NAMES.contains(&name.as_str()) {
        Some(format!("the name \"{name}\" is reserved for the admin console"))
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

/// One `[users.NAME]` table.
fn read_user(report: &mut Report, name: &str, value: Node, dialect: Dialect) -> Option<UserSettings> {
    let span = value.span();
    let table_name = dialect.user(name);
    let Value::Table(entries) = value.into_inner() else {
        report.at(
            span.as_ref(),
            format!("{table_name}: expected a table of settings such as pool_mode"),
        );
        return None;
    };
    let mut section = Section::new(report, table_name, span, entries);
    let pool_mode = read_pool_mode(&mut section, "pool_mode");
    section.finish();
    Some(UserSettings { pool_mode })
}

/// A table key as it would be written in TOML: bare when it can be, quoted otherwise.
pub(super) fn toml_key(key: &str) -> String {
    let bare = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// File order (the main file, then included files), with whole-file problems last; the
/// sort is stable so a line's problems keep the order they were found in.
fn sort_by_line(problems: &mut [Problem], main: &Path) {
    problems.sort_by(|a, b| {
        let key = |p: &Problem| (p.line.is_none(), p.file != main, p.file.clone(), p.line);
        key(a).cmp(&key(b))
    });
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
listen_addr = "no-such-host.invalid"
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
            "line 3: listen_addr in [pgsilo]: \"no-such-host.invalid\" is neither an IP address",
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
        assert!(find(&m, "nope").contains("\"nope\" is neither an IP address"));
        // A name that resolves is taken, as PgBouncer does (Debian's stock config says localhost).
        assert!(parse("\"localhost\"").contains(&v4(127, 0, 0, 1)));
        assert!(find(&m, "found an integer").contains("listen_addr in [pgsilo]"));
        // Empty: the Unix socket only, as PgBouncer without listen_addr; with no Unix
        // socket either, nobody could connect.
        assert!(parse("\"\"").is_empty());
        assert!(parse("[]").is_empty());
        let m = messages(&with_general("listen_addr = \"\"\nunix_socket_dir = \"\""));
        assert!(find(&m, "listen_addr").contains("no address to listen on, and unix_socket_dir is \"\""));
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
    fn max_busy_cores_is_a_fraction_of_cores_overridden_per_database() {
        let c = parse_ok(&format!(
            "{}\n[databases.other]\nhost = \"db\"\nmax_busy_cores = 2\n",
            with_general("max_busy_cores = 0.5")
        ));
        let g = &c.general;
        assert_eq!(g.max_busy_cores, 500);
        assert_eq!(c.databases["app"].effective_max_busy_cores(g), 500);
        assert_eq!(c.databases["other"].effective_max_busy_cores(g), 2000);
        let items: BTreeMap<_, _> = c.config_items().into_iter().collect();
        assert_eq!(items["max_busy_cores"], "0.5");
        assert_eq!(parse_ok(&with_general("")).general.max_busy_cores, 0);
        let m = messages(&with_general("max_busy_cores = -1"));
        assert!(find(&m, "max_busy_cores").contains("must be from 0 (off)"));
        let m = messages(&with_general("max_busy_cores = 0.0001"));
        assert!(find(&m, "max_busy_cores").contains("below the smallest budget"));
        let m = messages(&with_general("max_busy_cores = \"half\""));
        assert!(find(&m, "max_busy_cores").contains("expected a number of cores"));
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
        let text = "[pgsilo]\nauth_file = \"u\"\n[databases.\"my db\"]\nhost = \"db\"\nsize = 1\n[databases.\"*\"]\nhost = \"db\"\nreserve_pool = 2\n";
        let m = messages(text);
        assert!(find(&m, "unknown key").contains("unknown key \"size\" in [databases.\"my db\"]"));
        assert!(find(&m, "reserve_pool")
            .contains("reserve_pool in [databases.\"*\"]: is not supported for the \"*\" database"));
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

    /// An ini read through the readers, with `files` (name, text) as what %include finds
    /// in the current directory /cwd.
    fn ini(text: &str, files: &[(&str, &str)]) -> Parsed {
        let files: Vec<(PathBuf, String)> = files
            .iter()
            .map(|(n, t)| (Path::new("/cwd").join(n), t.to_string()))
            .collect();
        let load = move |p: &Path| {
            files
                .iter()
                .find(|(n, _)| n == p)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
        };
        parse_ini(
            Path::new("/etc/pgbouncer/pgbouncer_tenant_a.ini"),
            text.to_string(),
            Path::new("/cwd"),
            &load,
        )
    }

    const SEED_A: &str = "[pgbouncer]\nlisten_port = 6432\nauth_file = /etc/pgbouncer/userlist_tenant_a.txt\nmax_client_conn = 100\n\n[databases]\ntenant_a_db = host=127.0.0.1 port=5432 dbname=tenant_a_db\n";

    #[test]
    fn the_seed_ini_reads_as_pgbouncer_reads_it() {
        let parsed = ini(SEED_A, &[]);
        assert!(parsed.problems.is_empty(), "{:#?}", parsed.problems);
        let c = parsed.config;
        let g = &c.general;
        assert_eq!(c.path, Path::new("/etc/pgbouncer/pgbouncer_tenant_a.ini"));
        assert_eq!(g.name, "pgbouncer_tenant_a");
        assert_eq!(g.listen_port, 6432);
        assert_eq!(g.max_client_conn, 100);
        assert_eq!(g.auth_file, Path::new("/etc/pgbouncer/userlist_tenant_a.txt"));
        // PgBouncer without listen_addr: the Unix socket only.
        assert!(g.listen_addr.is_empty());
        assert_eq!(g.front_door.unix_socket.dir.as_deref(), Some(Path::new("/tmp")));
        // Everything else is PgBouncer's default, which is pgsilo's.
        let mut expected = General::defaults("pgbouncer_tenant_a".into());
        expected.listen_addr = Vec::new();
        expected.auth_file = g.auth_file.clone();
        assert_eq!(g, &expected);
        let db = &c.databases["tenant_a_db"];
        assert_eq!(
            (db.host.as_str(), db.port, db.dbname.as_str()),
            ("127.0.0.1", 5432, "tenant_a_db")
        );
        assert_eq!(parsed.notices.len(), 1, "{:#?}", parsed.notices);
        assert!(parsed.notices[0].message.contains("/tmp/.s.PGSQL.6432 only"));
        assert_eq!(
            parsed.auth_file_at,
            Some((PathBuf::from("/etc/pgbouncer/pgbouncer_tenant_a.ini"), Some(3)))
        );
    }

    #[test]
    fn ini_problems_name_the_ini_section_and_the_file_they_are_in() {
        let parsed = ini(
            "[pgbouncer]\nauth_file = u\npool_mode = statement\nmax_client_con = 5\n%include extra.ini\n",
            &[(
                "extra.ini",
                "listen_port = many\n[databases]\npgbouncer = host=x\nb = host=y auth_dbname=nope\n",
            )],
        );
        let m: Vec<String> = parsed.problems.iter().map(ToString::to_string).collect();
        let main = "/etc/pgbouncer/pgbouncer_tenant_a.ini";
        let expected = [
            format!("{main} line 3: pool_mode in [pgbouncer]: \"statement\" is not supported"),
            format!("{main} line 4: unknown key \"max_client_con\" in [pgbouncer] (did you mean \"max_client_conn\"?)"),
            "/cwd/extra.ini line 1: listen_port in [pgbouncer]: \"many\" is not an integer".to_string(),
            "/cwd/extra.ini line 3: [databases] pgbouncer: the name \"pgbouncer\" is reserved".to_string(),
            "/cwd/extra.ini line 4: auth_dbname in [databases] b: \"nope\" is not a database".to_string(),
        ];
        assert_eq!(m.len(), expected.len(), "{m:#?}");
        for (got, want) in m.iter().zip(&expected) {
            assert!(got.starts_with(want.as_str()), "{got:?} should start with {want:?}");
        }
    }

    #[test]
    fn an_ini_without_databases_starts_as_pgbouncer_does() {
        let parsed = ini("[pgbouncer]\nauth_file = u\nlisten_addr = 127.0.0.1\n", &[]);
        assert!(parsed.problems.is_empty(), "{:#?}", parsed.problems);
        assert!(parsed.config.databases.is_empty());
        assert_eq!(parsed.notices.len(), 1);
        assert!(parsed.notices[0]
            .message
            .starts_with("no databases: every client will get \"no such database\""));
    }

    #[test]
    fn users_set_their_pool_mode_in_toml_and_ini() {
        let c = parse_ok(&format!(
            "{}[users.bob]\npool_mode = \"transaction\"\n",
            with_general("")
        ));
        assert_eq!(c.general.users["bob"].pool_mode, Some(PoolMode::Transaction));
        let m = messages(&format!(
            "{}[users.bob]\npool_mode = \"x\"\nmax_user_connections = 1\n",
            with_general("")
        ));
        assert!(find(&m, "pool_mode in [users.bob]").contains("\"x\" is not supported"));
        assert!(find(&m, "max_user_connections").contains("unknown key \"max_user_connections\" in [users.bob]"));

        let parsed = ini(&format!("{SEED_A}[users]\nbob = pool_mode=transaction\n"), &[]);
        assert!(parsed.problems.is_empty(), "{:#?}", parsed.problems);
        assert_eq!(
            parsed.config.general.users["bob"].pool_mode,
            Some(PoolMode::Transaction)
        );
    }

    #[test]
    fn a_login_sees_the_fallback_database_and_its_user_settings() {
        let c = Arc::new(parse_ok(&format!(
            "{}pool_size = 3\n[databases.\"*\"]\nhost = \"fallback\"\npool_mode = \"transaction\"\n[users.bob]\npool_mode = \"session\"\n",
            with_general("")
        )));
        // Listed, no user settings: the same config.
        let same = c.for_login("app", "alice").unwrap();
        assert!(Arc::ptr_eq(&same, &c));
        // Unlisted: made from `*`, in the database asked for.
        let other = c.for_login("reports", "alice").unwrap();
        let db = &other.databases["reports"];
        assert_eq!(
            (db.name.as_str(), db.host.as_str(), db.dbname.as_str()),
            ("reports", "fallback", "reports")
        );
        assert_eq!(db.effective_pool_mode(&other.general), PoolMode::Transaction);
        // A user's pool_mode wins over the database's.
        let bob = c.for_login("reports", "bob").unwrap();
        assert_eq!(
            bob.databases["reports"].effective_pool_mode(&bob.general),
            PoolMode::Session
        );
        let bob = c.for_login("app", "bob").unwrap();
        assert_eq!(bob.databases["app"].pool_mode, Some(PoolMode::Session));
        assert_eq!(bob.databases["app"].pool_size, Some(3));
        // The console's names are never databases.
        assert!(c.for_login("pgbouncer", "alice").is_none());

        let without = Arc::new(parse_ok(MINIMAL));
        assert!(without.for_login("reports", "alice").is_none());
        assert!(without.for_login("*", "alice").is_none());
        // A `*` with its own dbname sends every name there.
        let fixed = Arc::new(parse_ok(&format!(
            "{MINIMAL}[databases.\"*\"]\nhost = \"h\"\ndbname = \"common\"\n"
        )));
        assert_eq!(fixed.for_login("x", "u").unwrap().databases["x"].dbname, "common");
    }
}
