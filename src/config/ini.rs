//! PgBouncer's config file, read as PgBouncer reads it, into the same tree of tables the
//! TOML reader makes, so one set of readers (`General`, `Database`) judges both.
//!
//! The file format is libusual's `cfparser` as PgBouncer uses it:
//! - Lines are `[section]`, `key = value`, comments (`;` or `#` first on the line; there
//!   are no comments after a value), blank, or `%include FILE`. A value is the rest of the
//!   line with the blanks around it removed; nothing is unquoted. Keys are letters,
//!   digits and `_.-*`. A later key wins over an earlier one.
//! - `%include FILE` reads FILE in place, up to 10 deep. A relative FILE is taken from
//!   the current directory, as PgBouncer does (not from the including file's folder).
//! - `[pgbouncer]` is required; `[databases]`, `[users]` and `[peers]` are optional. A
//!   second `[pgbouncer]` header resets the settings above it, as in PgBouncer.
//! - `[databases]` and `[users]` values are libpq-style `key=value` lists: values are
//!   bare words or `'quoted'` (`''` is a quote), and may not be empty.
//!
//! Values become what pgsilo's readers expect: PgBouncer's integers (C `strtol`, so
//! `0x1F` and octal `0777` too), booleans (`0`/`1`, also yes/no/on/off/true/false),
//! seconds (whole or fractional), comma-separated lists. Where PgBouncer's behaviour
//! without a key differs from pgsilo's TOML default, the tree says PgBouncer's: no
//! `listen_addr` means the Unix socket only; relative file names are taken from the
//! current directory (made absolute here); a database without `host` uses the Unix
//! socket in `unix_socket_dir`.
//!
//! Keys PgBouncer knows and pgsilo does not implement are not passed on: each becomes an
//! [`IniNotice`] saying what pgsilo does instead (an error with `--strict`), unless its
//! value is one that changes nothing (`syslog = 0`, `logfile =`). Keys neither knows
//! are passed on, so the readers report them as unknown.

use std::io;
use std::path::{Path, PathBuf};

use super::value::{Entries, Node, Span, Value};

/// PgBouncer's limit on nested `%include`s.
const MAX_INCLUDE_DEPTH: usize = 10;

/// How a `[pgbouncer]` key's text becomes a value pgsilo's readers take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// C `strtol` with base 0.
    Int,
    /// An integer (non-zero is true) or yes/no/on/off/true/false.
    Bool,
    /// Whole or fractional seconds, not negative.
    Seconds,
    /// A whole or fractional number, not negative (`max_busy_cores`).
    Number,
    /// Comma-separated names.
    List,
    /// Comma-separated integers (`cpus`).
    IntList,
    /// Taken as it is.
    Text,
    /// A file or folder name: relative to the current directory; empty stays empty.
    Path,
    /// An integer file mode (`0777` is octal, as `strtol` reads it).
    Mode,
}

/// Every `[pgbouncer]` key pgsilo implements, under PgBouncer's name, and pgsilo's own
/// keys (so one ini file can carry them too).
const KINDS: &[(&str, Kind)] = &[
    ("name", Kind::Text),
    ("listen_addr", Kind::List),
    ("listen_port", Kind::Int),
    ("listen_backlog", Kind::Int),
    ("cpus", Kind::IntList),
    ("auth_type", Kind::Text),
    ("auth_file", Kind::Path),
    ("auth_user", Kind::Text),
    ("auth_query", Kind::Text),
    ("auth_dbname", Kind::Text),
    ("pool_mode", Kind::Text),
    ("max_client_conn", Kind::Int),
    ("max_pending_logins", Kind::Int),
    ("max_pending_logins_per_addr", Kind::Int),
    ("default_pool_size", Kind::Int),
    ("min_pool_size", Kind::Int),
    ("reserve_pool_size", Kind::Int),
    ("reserve_pool_timeout", Kind::Seconds),
    ("max_db_connections", Kind::Int),
    ("max_busy_cores", Kind::Number),
    ("max_prepared_statements", Kind::Int),
    ("server_reset_query", Kind::Text),
    ("server_reset_query_always", Kind::Bool),
    ("server_check_query", Kind::Text),
    ("server_check_delay", Kind::Seconds),
    ("server_connect_timeout", Kind::Seconds),
    ("server_login_retry", Kind::Seconds),
    ("query_wait_timeout", Kind::Seconds),
    ("query_timeout", Kind::Seconds),
    ("client_login_timeout", Kind::Seconds),
    ("startup_packet_timeout", Kind::Seconds),
    ("client_idle_timeout", Kind::Seconds),
    ("idle_transaction_timeout", Kind::Seconds),
    ("server_idle_timeout", Kind::Seconds),
    ("server_lifetime", Kind::Seconds),
    ("shutdown_timeout", Kind::Seconds),
    ("takeover_socket", Kind::Path),
    ("admin_users", Kind::List),
    ("stats_users", Kind::List),
    ("stats_period", Kind::Seconds),
    ("log_stats", Kind::Bool),
    ("log_connections", Kind::Bool),
    ("log_disconnections", Kind::Bool),
    ("log_pooler_errors", Kind::Bool),
    ("verbose", Kind::Int),
    ("ignore_startup_parameters", Kind::List),
    ("metrics_listen", Kind::Text),
    ("pkt_buf", Kind::Int),
    ("tcp_keepalive", Kind::Bool),
    ("application_name_add_host", Kind::Bool),
    ("client_tls_sslmode", Kind::Text),
    ("client_tls_key_file", Kind::Path),
    ("client_tls_cert_file", Kind::Path),
    ("client_tls_ca_file", Kind::Path),
    ("client_tls_protocols", Kind::Text),
    ("client_tls_ciphers", Kind::Text),
    ("server_tls_sslmode", Kind::Text),
    ("server_tls_ca_file", Kind::Path),
    ("server_tls_key_file", Kind::Path),
    ("server_tls_cert_file", Kind::Path),
    ("server_tls_protocols", Kind::Text),
    ("server_tls_ciphers", Kind::Text),
    ("unix_socket_dir", Kind::Path),
    ("unix_socket_mode", Kind::Mode),
    ("unix_socket_group", Kind::Text),
];

/// Values of an unsupported key that change nothing; `ANY`: no value does.
const ANY: &[&str] = &["*"];

/// A PgBouncer key pgsilo does not implement: the values that change nothing, and what
/// pgsilo does instead.
type Unsupported = (&'static str, &'static [&'static str], &'static str);

/// `[pgbouncer]` keys of PgBouncer (up to 1.24) that pgsilo does not implement.
const UNSUPPORTED: &[Unsupported] = &[
    ("logfile", &[""], "pgsilo logs to stderr (the journal, under systemd); this file is not written"),
    ("pidfile", &[""], "pgsilo writes no pid file (under systemd the unit tracks its main process)"),
    ("syslog", &["0"], "pgsilo logs to stderr; journald passes lines on to syslog where it is set up to"),
    ("syslog_ident", ANY, "pgsilo does not log to syslog itself"),
    ("syslog_facility", ANY, "pgsilo does not log to syslog itself"),
    ("user", &[""], "pgsilo does not switch users: start it as that user (User= in the systemd unit)"),
    ("job_name", ANY, "PgBouncer uses it for the Windows service only"),
    ("service_name", ANY, "PgBouncer uses it for the Windows service only"),
    ("conffile", ANY, "it is read-only in PgBouncer"),
    ("so_reuseport", &["0"], "one pgsilo process serves a port, with a worker per core; a second process on the same port is refused"),
    ("tcp_defer_accept", ANY, "a latency setting; pgsilo accepts connections without it"),
    ("tcp_socket_buffer", &["0"], "the kernel's socket buffer sizes are used"),
    ("tcp_keepcnt", &["0"], "the kernel's keepalive count is used (tcp_keepalive itself is supported)"),
    ("tcp_keepidle", &["0"], "the kernel's keepalive idle time is used (tcp_keepalive itself is supported)"),
    ("tcp_keepintvl", &["0"], "the kernel's keepalive interval is used (tcp_keepalive itself is supported)"),
    ("tcp_user_timeout", &["0"], "TCP_USER_TIMEOUT is not set"),
    ("dns_max_ttl", &["15"], "host names are resolved by the system resolver for each new server connection; pgsilo keeps no cache"),
    ("dns_nxdomain_ttl", &["15"], "host names are resolved by the system resolver for each new server connection; pgsilo keeps no cache"),
    ("dns_zone_check_period", &["0"], "host names are resolved by the system resolver for each new server connection"),
    ("resolv_conf", &[""], "the system resolver is used as the system configures it"),
    ("disable_pqexec", &["0"], "simple queries with several statements are not refused"),
    ("server_round_robin", &["0"], "idle servers are not reused in round-robin order"),
    ("server_fast_close", &["0"], "in session mode a server marked for closing is closed when its client leaves"),
    ("max_packet_size", &["2147483647"], "pgsilo's own message size limit applies"),
    ("sbuf_loopcnt", ANY, "a fairness setting of PgBouncer's single event loop; pgsilo's workers need none"),
    ("suspend_timeout", ANY, "pgsilo has no SUSPEND; it restarts without dropping connections with --takeover"),
    ("auth_hba_file", &[""], "auth_type hba is not supported"),
    ("auth_ident_file", &[""], "auth_type hba is not supported"),
    ("auth_ldap_options", &[""], "auth_type ldap is not supported"),
    ("client_tls13_ciphers", &[""], "rustls' TLS 1.3 cipher suites are used"),
    ("server_tls13_ciphers", &[""], "rustls' TLS 1.3 cipher suites are used"),
    ("client_tls_dheparams", &["", "auto", "none"], "rustls offers no finite-field DHE; ECDHE key exchange is used"),
    ("client_tls_ecdhcurve", &["", "auto"], "rustls chooses the key exchange group"),
    ("peer_id", &["0"], "peering is not supported: cancel requests reach only this process's clients"),
    ("max_user_connections", &["0"], "there is no per-user limit on server connections (pool sizes and max_db_connections still apply)"),
    ("max_user_client_connections", &["0"], "there is no per-user limit on client connections (max_client_conn still applies)"),
    ("max_db_client_connections", &["0"], "there is no per-database limit on client connections (max_client_conn still applies)"),
    ("autodb_idle_timeout", &["3600"], "pools made from the \"*\" database stay until restart; their idle servers still close after server_idle_timeout"),
    ("cancel_wait_timeout", &["10"], "pgsilo sends each cancel request on at once, without that limit"),
    ("query_wait_notify", &["0", "5"], "clients waiting for a server get no notice"),
    ("transaction_timeout", &["0"], "transactions have no length limit (idle_transaction_timeout and query_timeout are supported)"),
    ("track_extra_parameters", ANY, "pgsilo follows every setting a client makes, not only a list"),
    ("scram_iterations", &["4096"], "pgsilo's own iteration count is used for SCRAM with plain-text auth_file passwords"),
];

/// `[databases]` parameters pgsilo implements, with pgsilo's name and kind.
const DATABASE_KINDS: &[(&str, &str, Kind)] = &[
    ("dbname", "dbname", Kind::Text),
    ("host", "host", Kind::Text),
    ("port", "port", Kind::Int),
    ("user", "user", Kind::Text),
    ("password", "password", Kind::Text),
    ("auth_user", "auth_user", Kind::Text),
    ("auth_query", "auth_query", Kind::Text),
    ("auth_dbname", "auth_dbname", Kind::Text),
    ("pool_size", "pool_size", Kind::Int),
    ("min_pool_size", "min_pool_size", Kind::Int),
    ("reserve_pool", "reserve_pool", Kind::Int),
    ("reserve_pool_size", "reserve_pool", Kind::Int),
    ("max_db_connections", "max_db_connections", Kind::Int),
    ("max_busy_cores", "max_busy_cores", Kind::Number),
    ("pool_mode", "pool_mode", Kind::Text),
];

/// What a server logs in with when PgBouncer would set a startup parameter pgsilo does
/// not.
const SERVER_STARTS_WITH_DEFAULT: &str =
    "pgsilo's server connections start with PostgreSQL's default for it (a client's own setting is still applied to the server it uses)";

/// `[databases]` parameters of PgBouncer that pgsilo does not implement.
const DATABASE_UNSUPPORTED: &[Unsupported] = &[
    ("client_encoding", &[], SERVER_STARTS_WITH_DEFAULT),
    ("datestyle", &[], SERVER_STARTS_WITH_DEFAULT),
    ("timezone", &[], SERVER_STARTS_WITH_DEFAULT),
    ("application_name", &[], SERVER_STARTS_WITH_DEFAULT),
    ("connect_query", &[], "it is not run on new server connections"),
    ("load_balance_hosts", &["disable"], "a database has one host"),
    (
        "server_lifetime",
        &[],
        "the [pgbouncer] server_lifetime applies to every database",
    ),
    (
        "max_db_client_connections",
        &["0"],
        "there is no per-database limit on client connections (max_client_conn still applies)",
    ),
];

/// `[databases]` parameters the `*` entry cannot carry: pools it makes take their
/// settings from the `[pgbouncer]` values.
const FALLBACK_ONLY_GENERAL: &[&str] = &["min_pool_size", "reserve_pool", "max_db_connections"];

/// `[users]` parameters of PgBouncer that pgsilo does not implement.
const USER_UNSUPPORTED: &[Unsupported] = &[(
    "max_user_connections",
    &["0"],
    "there is no per-user limit on server connections (pool sizes and max_db_connections still apply)",
)];

/// One file read: the main config or an included one.
pub(super) struct IniFile {
    /// As opened (an include's name joined to the current directory).
    pub(super) path: PathBuf,
    pub(super) text: String,
    /// Where its text starts in the span space shared by all files read.
    pub(super) base: usize,
}

/// Something about the file that works but that its author should know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct IniNotice {
    pub(super) span: Option<Span>,
    pub(super) message: String,
    /// A PgBouncer setting pgsilo does not implement (an error with `--strict`).
    pub(super) unsupported: bool,
}

/// A PgBouncer config as pgsilo's tables, with what could not be read.
pub(super) struct IniDoc {
    pub(super) files: Vec<IniFile>,
    /// `pgsilo` (the `[pgbouncer]` keys), `databases` and `users`, as the TOML reader
    /// would give them. Absent when there was no `[pgbouncer]` section.
    pub(super) tables: Entries,
    pub(super) problems: Vec<(Option<Span>, String)>,
    pub(super) notices: Vec<IniNotice>,
}

/// Reads the PgBouncer config `path`, whose text is `text`; `%include`s and relative
/// file names are taken from `cwd`, and included files read with `load`.
pub(super) fn read(path: &Path, text: String, cwd: &Path, load: &dyn Fn(&Path) -> io::Result<String>) -> IniDoc {
    let mut scanner = Scanner {
        files: Vec::new(),
        next_base: 0,
        lines: Vec::new(),
        problems: Vec::new(),
        cwd,
        load,
    };
    scanner.scan(path.to_path_buf(), text, 0);
    let Scanner {
        files,
        lines,
        mut problems,
        ..
    } = scanner;
    let mut notices = Vec::new();
    let tables = if problems.is_empty() {
        build(lines, cwd, &mut problems, &mut notices)
    } else {
        // PgBouncer stops at a syntax error; what follows it was not read.
        Vec::new()
    };
    IniDoc {
        files,
        tables,
        problems,
        notices,
    }
}

/// One meaningful line of a file.
enum Line {
    Section {
        name: String,
        span: Span,
    },
    Pair {
        key: String,
        key_span: Span,
        value: String,
        value_span: Span,
    },
}

/// libusual's `parse_ini_file`, line for line; positions are kept for messages.
struct Scanner<'a> {
    files: Vec<IniFile>,
    next_base: usize,
    lines: Vec<Line>,
    problems: Vec<(Option<Span>, String)>,
    cwd: &'a Path,
    load: &'a dyn Fn(&Path) -> io::Result<String>,
}

/// C's `isspace` in the C locale.
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'*')
}

impl Scanner<'_> {
    /// Scans one file; false when reading must stop (PgBouncer stops at the first error).
    fn scan(&mut self, path: PathBuf, text: String, depth: usize) -> bool {
        let base = self.next_base;
        // One past the end, so a span at a file's end is still in that file.
        self.next_base += text.len() + 1;
        let index = self.files.len();
        self.files.push(IniFile { path, text, base });
        let text = std::mem::take(&mut self.files[index].text);
        let ok = self.scan_text(&text, base, depth);
        self.files[index].text = text;
        ok
    }

    fn scan_text(&mut self, text: &str, base: usize, depth: usize) -> bool {
        let b = text.as_bytes();
        let mut p = 0;
        let at = |from: usize, to: usize| base + from..base + to;
        while p < b.len() {
            while p < b.len() && c_isspace(b[p]) {
                p += 1;
            }
            if p >= b.len() {
                break;
            }
            if b[p..].starts_with(b"%include") && b.get(p + 8).is_some_and(|&c| c == b' ' || c == b'\t') {
                let start = p;
                p += 8;
                while p < b.len() && (b[p] == b' ' || b[p] == b'\t') {
                    p += 1;
                }
                let (name, end) = rest_of_line(text, p);
                let span = at(start, end);
                p = end;
                if depth + 1 > MAX_INCLUDE_DEPTH {
                    self.problems.push((
                        Some(span),
                        format!("%include {name}: includes nested more than {MAX_INCLUDE_DEPTH} deep"),
                    ));
                    return false;
                }
                let path = self.cwd.join(name);
                match (self.load)(&path) {
                    Ok(included) => {
                        if !self.scan(path, included, depth + 1) {
                            return false;
                        }
                    }
                    Err(e) => {
                        self.problems.push((
                            Some(span),
                            format!("%include {name}: cannot read {}: {e}", path.display()),
                        ));
                        return false;
                    }
                }
                continue;
            }
            if b[p] == b'#' || b[p] == b';' {
                while p < b.len() && b[p] != b'\n' {
                    p += 1;
                }
                continue;
            }
            if b[p] == b'[' {
                let start = p;
                p += 1;
                let name_start = p;
                while p < b.len() && b[p] != b']' && b[p] != b'\n' {
                    p += 1;
                }
                if p >= b.len() || b[p] != b']' {
                    self.problems.push((
                        Some(at(start, p)),
                        "syntax error: a section header without its closing ]".into(),
                    ));
                    return false;
                }
                self.lines.push(Line::Section {
                    name: text[name_start..p].to_string(),
                    span: at(start, p + 1),
                });
                p += 1;
                continue;
            }
            let key_start = p;
            // A name with other characters is a double-quoted SQL identifier ("" for a
            // quote), as PgBouncer's [databases] and [users] allow.
            let mut quoted: Option<String> = None;
            if b.get(p) == Some(&b'"') {
                let mut name = String::new();
                let mut q = p + 1;
                let mut closed = false;
                while q < b.len() && b[q] != b'\n' {
                    if b[q] == b'"' {
                        if b.get(q + 1) == Some(&b'"') {
                            name.push('"');
                            q += 2;
                            continue;
                        }
                        closed = true;
                        q += 1;
                        break;
                    }
                    let ch = text[q..].chars().next().unwrap_or('?');
                    name.push(ch);
                    q += ch.len_utf8();
                }
                if closed && !name.is_empty() {
                    quoted = Some(name);
                    p = q;
                }
            }
            if quoted.is_none() {
                while p < b.len() && is_key_byte(b[p]) {
                    p += 1;
                }
            }
            let key_end = p;
            while p < b.len() && (b[p] == b' ' || b[p] == b'\t') {
                p += 1;
            }
            if p >= b.len() || b[p] != b'=' || key_start == key_end {
                let (line, _) = rest_of_line(text, key_start);
                let why = if key_start == key_end {
                    "expected a key (letters, digits, _ . - *) then ="
                } else {
                    "expected = after the key"
                };
                self.problems
                    .push((Some(at(key_start, key_start)), format!("syntax error: {why}: {line:?}")));
                return false;
            }
            p += 1;
            while p < b.len() && (b[p] == b' ' || b[p] == b'\t') {
                p += 1;
            }
            let (value, end) = rest_of_line(text, p);
            self.lines.push(Line::Pair {
                key: quoted.unwrap_or_else(|| text[key_start..key_end].to_string()),
                key_span: at(key_start, key_end),
                value: value.to_string(),
                value_span: at(p, p + value.len()),
            });
            p = end;
        }
        true
    }
}

/// The text from `from` to the end of its line without trailing blanks, and where the
/// line ends.
fn rest_of_line(text: &str, from: usize) -> (&str, usize) {
    let end = text[from..].find('\n').map_or(text.len(), |i| from + i);
    let value = text[from..end].trim_end_matches(|c: char| c.is_ascii() && c_isspace(c as u8));
    (value, end)
}

/// A key's text where it was written.
struct Setting {
    key: String,
    key_span: Span,
    value: String,
    value_span: Span,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sect {
    PgBouncer,
    Databases,
    Users,
    Peers,
}

/// PgBouncer's loader over the scanned lines (sections, a later key wins), then each
/// section as pgsilo's table.
fn build(
    lines: Vec<Line>,
    cwd: &Path,
    problems: &mut Vec<(Option<Span>, String)>,
    notices: &mut Vec<IniNotice>,
) -> Entries {
    let mut current = None;
    let mut main_span: Option<Span> = None;
    let mut databases_span = None;
    let mut users_span = None;
    let mut general: Vec<Setting> = Vec::new();
    let mut databases: Vec<Setting> = Vec::new();
    let mut users: Vec<Setting> = Vec::new();
    let mut peers: Vec<Setting> = Vec::new();
    for line in lines {
        match line {
            Line::Section { name, span } => {
                current = match name.as_str() {
                    "pgbouncer" => {
                        if !general.is_empty() {
                            notices.push(IniNotice {
                                span: Some(span.clone()),
                                message: "[pgbouncer] starts again: as in PgBouncer, the settings of the [pgbouncer] section above are reset to their defaults".into(),
                                unsupported: false,
                            });
                            general.clear();
                        }
                        main_span = Some(span);
                        Some(Sect::PgBouncer)
                    }
                    "databases" => {
                        databases_span.get_or_insert(span);
                        Some(Sect::Databases)
                    }
                    "users" => {
                        users_span.get_or_insert(span);
                        Some(Sect::Users)
                    }
                    "peers" => Some(Sect::Peers),
                    other => {
                        problems.push((
                            Some(span),
                            format!("unknown section [{other}]; PgBouncer's are [pgbouncer], [databases], [users] and [peers]"),
                        ));
                        return Vec::new();
                    }
                };
            }
            Line::Pair {
                key,
                key_span,
                value,
                value_span,
            } => {
                let Some(sect) = current else {
                    problems.push((
                        Some(key_span),
                        format!("\"{key}\" comes before any section; put it under [pgbouncer]"),
                    ));
                    return Vec::new();
                };
                let list = match sect {
                    Sect::PgBouncer => &mut general,
                    Sect::Databases => &mut databases,
                    Sect::Users => &mut users,
                    Sect::Peers => &mut peers,
                };
                list.retain(|s| s.key != key);
                list.push(Setting {
                    key,
                    key_span,
                    value,
                    value_span,
                });
            }
        }
    }
    let Some(main_span) = main_span else {
        problems.push((
            None,
            "no [pgbouncer] section: a PgBouncer config needs one (PgBouncer refuses the file too)".into(),
        ));
        return Vec::new();
    };

    let mut out = Notes { problems, notices };
    let (pgsilo, unix_dir) = general_table(general, cwd, &mut out);
    let mut tables = vec![("pgsilo".to_string(), Node::new(Value::Table(pgsilo), Some(main_span)))];
    if let Some(span) = databases_span {
        let entries = databases
            .into_iter()
            .filter_map(|s| database_table(s, unix_dir.as_deref(), &mut out))
            .collect();
        tables.push(("databases".into(), Node::new(Value::Table(entries), Some(span))));
    }
    if let Some(span) = users_span {
        let entries = users.into_iter().filter_map(|s| user_table(s, &mut out)).collect();
        tables.push(("users".into(), Node::new(Value::Table(entries), Some(span))));
    }
    for peer in peers {
        out.unsupported(
            &peer.key_span,
            format!(
                "{} = {} in [peers]: not supported; peering is not implemented: cancel requests reach only this process's clients",
                peer.key, peer.value
            ),
        );
    }
    tables
}

/// Where problems and notices go while tables are built.
struct Notes<'a> {
    problems: &'a mut Vec<(Option<Span>, String)>,
    notices: &'a mut Vec<IniNotice>,
}

impl Notes<'_> {
    fn problem(&mut self, span: &Span, message: String) {
        self.problems.push((Some(span.clone()), message));
    }

    fn unsupported(&mut self, span: &Span, message: String) {
        self.notices.push(IniNotice {
            span: Some(span.clone()),
            message,
            unsupported: true,
        });
    }

    fn note(&mut self, span: Option<&Span>, message: String) {
        self.notices.push(IniNotice {
            span: span.cloned(),
            message,
            unsupported: false,
        });
    }

    /// A PgBouncer key pgsilo does not implement: a notice unless its value changes
    /// nothing, which is mentioned anyway so no key passes unseen.
    fn not_implemented(&mut self, (key, inert, instead): Unsupported, value: &str, span: &Span, table: &str) {
        let changes_nothing = inert == ANY || inert.iter().any(|v| v.eq_ignore_ascii_case(value.trim()));
        if changes_nothing {
            self.note(
                Some(span),
                format!("{key} = {value} in {table}: not implemented by pgsilo, and changes nothing here ({instead})"),
            );
        } else {
            self.unsupported(span, format!("{key} = {value} in {table}: not supported; {instead}"));
        }
    }
}

/// `[pgbouncer]` as pgsilo's `[pgsilo]` table; also the Unix socket folder a database
/// without a host connects through.
fn general_table(settings: Vec<Setting>, cwd: &Path, out: &mut Notes) -> (Entries, Option<String>) {
    let mut entries = Entries::new();
    let mut unix_dir = Some("/tmp".to_string());
    let mut listen_addr_set = false;
    let mut listen_port = "6432".to_string();
    for s in settings {
        if let Some(&(_, kind)) = KINDS.iter().find(|(k, _)| *k == s.key) {
            match convert(kind, &s.value, cwd) {
                Ok(value) => {
                    match s.key.as_str() {
                        "unix_socket_dir" => {
                            unix_dir = match &value {
                                Value::String(d) if !d.is_empty() => Some(d.clone()),
                                _ => None,
                            }
                        }
                        "listen_addr" => listen_addr_set = true,
                        "listen_port" => {
                            if let Value::Integer(port) = value {
                                listen_port = port.to_string();
                            }
                        }
                        _ => {}
                    }
                    entries.push((s.key, Node::new(value, Some(s.value_span))));
                }
                Err(why) => out.problem(&s.value_span, format!("{} in [pgbouncer]: {why}", s.key)),
            }
        } else if let Some(&entry) = UNSUPPORTED.iter().find(|(k, _, _)| *k == s.key) {
            out.not_implemented(entry, &s.value, &s.key_span, "[pgbouncer]");
        } else {
            // Unknown to both: the reader reports it, with a near spelling if any.
            entries.push((s.key, Node::new(Value::String(s.value), Some(s.value_span))));
        }
    }
    if !listen_addr_set {
        entries.push(("listen_addr".into(), Node::new(Value::Array(Vec::new()), None)));
        let message = match &unix_dir {
            Some(dir) => format!(
                "listen_addr is not set: as in PgBouncer, clients connect through the Unix socket {dir}/.s.PGSQL.{listen_port} only (set listen_addr for TCP)"
            ),
            None => "listen_addr is not set: as in PgBouncer, no TCP address is listened on".to_string(),
        };
        out.note(None, message);
    }
    (entries, unix_dir)
}

/// A `[pgbouncer]` value as the readers take it.
fn convert(kind: Kind, text: &str, cwd: &Path) -> Result<Value, String> {
    let value = match kind {
        Kind::Int => Value::Integer(c_int(text).ok_or_else(|| format!("\"{text}\" is not an integer"))?),
        Kind::Bool => Value::Boolean(
            c_bool(text).ok_or_else(|| format!("\"{text}\" is not a boolean (0, 1, yes, no, on, off, true, false)"))?,
        ),
        Kind::Seconds => seconds(text).ok_or_else(|| format!("\"{text}\" is not a number of seconds"))?,
        // The same syntax: an integer, or a non-negative decimal.
        Kind::Number => seconds(text).ok_or_else(|| format!("\"{text}\" is not a non-negative number"))?,
        Kind::List => Value::Array(
            split_list(text)
                .map(|item| Node::new(Value::String(item.to_string()), None))
                .collect(),
        ),
        Kind::IntList => {
            let mut items = Vec::new();
            for item in split_list(text) {
                let n = c_int(item).ok_or_else(|| format!("\"{item}\" is not an integer"))?;
                items.push(Node::new(Value::Integer(n), None));
            }
            Value::Array(items)
        }
        Kind::Text => Value::String(text.to_string()),
        Kind::Path if text.is_empty() => Value::String(String::new()),
        Kind::Path => Value::String(cwd.join(text).display().to_string()),
        Kind::Mode => match c_int(text) {
            Some(mode) if mode >= 0 => Value::String(format!("0{mode:o}")),
            _ => return Err(format!("\"{text}\" is not a file mode such as 0777")),
        },
    };
    Ok(value)
}

/// PgBouncer's lists: comma-separated, blanks around items dropped, empty items too.
fn split_list(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// C's `strtol(text, &end, 0)` accepting only a whole number: an optional sign, then
/// decimal, `0x` hex or `0` octal.
fn c_int(text: &str) -> Option<i64> {
    let t = text.trim_start_matches(|c: char| c.is_ascii() && c_isspace(c as u8));
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, hex)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let n = i64::from_str_radix(digits, radix).ok()?;
    Some(if negative { -n } else { n })
}

fn c_bool(text: &str) -> Option<bool> {
    if let Some(n) = c_int(text) {
        return Some(n != 0);
    }
    match text.trim().to_ascii_lowercase().as_str() {
        "yes" | "on" | "true" => Some(true),
        "no" | "off" | "false" => Some(false),
        _ => None,
    }
}

/// PgBouncer's times: a non-negative decimal number of seconds (C `strtod`).
fn seconds(text: &str) -> Option<Value> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().ok().map(Value::Integer);
    }
    let looks_numeric = t
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    let x: f64 = t.parse().ok().filter(|_| looks_numeric)?;
    (x.is_finite() && x >= 0.0).then_some(Value::Float(x))
}

/// One `key=value` of a `[databases]` or `[users]` value, with where its value is.
struct Param {
    key: String,
    key_span: Span,
    value: String,
    value_span: Span,
}

/// PgBouncer's connection-string parser (`cstr_get_pair`): `key=value` pairs separated
/// by blanks; a value is a word or `'quoted'` with `''` for a quote; empty values are
/// refused. `base` is where `text` starts in the span space.
fn parse_params(text: &str, base: usize) -> Result<Vec<Param>, (Span, String)> {
    let b = text.as_bytes();
    let at = |from: usize, to: usize| base + from..base + to;
    let mut params = Vec::new();
    let mut p = 0;
    loop {
        while p < b.len() && c_isspace(b[p]) {
            p += 1;
        }
        if p >= b.len() {
            return Ok(params);
        }
        let key_start = p;
        while p < b.len() && b[p] != b'=' && b[p] != b' ' {
            p += 1;
        }
        let key_end = p;
        while p < b.len() && c_isspace(b[p]) {
            p += 1;
        }
        if p >= b.len() || b[p] != b'=' || key_start == key_end {
            return Err((
                at(key_start, key_end),
                format!("expected key=value, found \"{}\"", &text[key_start..]),
            ));
        }
        p += 1;
        while p < b.len() && c_isspace(b[p]) {
            p += 1;
        }
        let value_start = p;
        let value = if b.get(p) == Some(&b'\'') {
            p += 1;
            let mut value = String::new();
            loop {
                let Some(rel) = text[p..].find('\'') else {
                    return Err((
                        at(value_start, b.len()),
                        "a quoted value without its closing quote".into(),
                    ));
                };
                value.push_str(&text[p..p + rel]);
                p += rel + 1;
                if b.get(p) == Some(&b'\'') {
                    value.push('\'');
                    p += 1;
                } else {
                    break;
                }
            }
            if p < b.len() && !c_isspace(b[p]) {
                return Err((at(p, p + 1), "expected a blank after the closing quote".into()));
            }
            value
        } else {
            while p < b.len() && b[p] != b' ' {
                p += 1;
            }
            text[value_start..p].to_string()
        };
        if value.is_empty() {
            return Err((
                at(key_start, p),
                format!("{} has an empty value", &text[key_start..key_end]),
            ));
        }
        params.push(Param {
            key: text[key_start..key_end].to_string(),
            key_span: at(key_start, key_end),
            value,
            value_span: at(value_start, p),
        });
    }
}

/// One `[databases]` line as a `[databases.NAME]` table.
fn database_table(s: Setting, unix_dir: Option<&str>, out: &mut Notes) -> Option<(String, Node)> {
    let table = format!("[databases] {}", s.key);
    let params = match parse_params(&s.value, s.value_span.start) {
        Ok(params) => params,
        Err((span, why)) => {
            out.problem(&span, format!("{table}: {why}"));
            return None;
        }
    };
    let fallback = s.key == "*";
    let mut entries = Entries::new();
    for p in params {
        if let Some(&(_, name, kind)) = DATABASE_KINDS.iter().find(|(k, _, _)| *k == p.key) {
            if fallback && FALLBACK_ONLY_GENERAL.contains(&name) {
                out.unsupported(
                    &p.key_span,
                    format!(
                        "{} = {} in {table}: not supported for the \"*\" database; its pools take the [pgbouncer] value",
                        p.key, p.value
                    ),
                );
                continue;
            }
            let value = match kind {
                Kind::Int => match p.value.parse::<i64>() {
                    Ok(n) => Value::Integer(n),
                    Err(_) => {
                        out.problem(
                            &p.value_span,
                            format!("{} in {table}: \"{}\" is not an integer", p.key, p.value),
                        );
                        continue;
                    }
                },
                _ => Value::String(p.value),
            };
            entries.retain(|(k, _)| k != name);
            entries.push((name.to_string(), Node::new(value, Some(p.value_span))));
        } else if let Some(&entry) = DATABASE_UNSUPPORTED.iter().find(|(k, _, _)| *k == p.key) {
            out.not_implemented(entry, &p.value, &p.key_span, &table);
        } else {
            out.problem(
                &p.key_span,
                format!("{table}: unknown parameter \"{}\" (PgBouncer refuses it too)", p.key),
            );
        }
    }
    if !entries.iter().any(|(k, _)| k == "host") {
        // PgBouncer connects through the Unix socket in its own unix_socket_dir.
        match unix_dir {
            Some(dir) => entries.insert(0, ("host".into(), Node::new(Value::String(dir.to_string()), None))),
            None => {
                out.problem(
                    &s.key_span,
                    format!(
                        "{table}: no host, and unix_socket_dir is empty: there is no Unix socket to connect through"
                    ),
                );
                return None;
            }
        }
    }
    Some((s.key, Node::new(Value::Table(entries), Some(s.key_span))))
}

/// One `[users]` line as a `[users.NAME]` table.
fn user_table(s: Setting, out: &mut Notes) -> Option<(String, Node)> {
    let table = format!("[users] {}", s.key);
    let params = match parse_params(&s.value, s.value_span.start) {
        Ok(params) => params,
        Err((span, why)) => {
            out.problem(&span, format!("{table}: {why}"));
            return None;
        }
    };
    let mut entries = Entries::new();
    for p in params {
        if p.key == "pool_mode" {
            entries.retain(|(k, _)| k != "pool_mode");
            entries.push((
                "pool_mode".into(),
                Node::new(Value::String(p.value), Some(p.value_span)),
            ));
        } else if let Some(&entry) = USER_UNSUPPORTED.iter().find(|(k, _, _)| *k == p.key) {
            out.not_implemented(entry, &p.value, &p.key_span, &table);
        } else {
            out.problem(
                &p.key_span,
                format!("{table}: unknown parameter \"{}\" (PgBouncer refuses it too)", p.key),
            );
        }
    }
    Some((s.key, Node::new(Value::Table(entries), Some(s.key_span))))
}

/// Whether a file is a PgBouncer config rather than pgsilo's TOML: by its name (`.ini`,
/// `.toml`), else by its text (a `[pgbouncer]` section, or a `%include` first).
pub fn is_pgbouncer_config(path: &Path, text: &str) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("ini") => return true,
        Some(e) if e.eq_ignore_ascii_case("toml") => return false,
        _ => {}
    }
    let mut meaningful = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'));
    if meaningful.clone().next().is_some_and(|l| l.starts_with("%include")) {
        return true;
    }
    meaningful.any(|l| l == "[pgbouncer]")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read_with(files: &[(&str, &str)]) -> IniDoc {
        let map: HashMap<PathBuf, String> = files
            .iter()
            .map(|(p, t)| (Path::new("/cwd").join(p), t.to_string()))
            .collect();
        let load = move |p: &Path| {
            map.get(p)
                .cloned()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
        };
        let main = Path::new("/cwd").join(files[0].0);
        read(&main, load(&main).unwrap(), Path::new("/cwd"), &load)
    }

    fn table<'d>(doc: &'d IniDoc, name: &str) -> &'d Entries {
        match doc.tables.iter().find(|(k, _)| k == name).map(|(_, v)| v.get_ref()) {
            Some(Value::Table(t)) => t,
            _ => panic!("no table {name}"),
        }
    }

    fn get<'e>(entries: &'e Entries, key: &str) -> &'e Value {
        entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.get_ref())
            .unwrap_or_else(|| panic!("no {key} in {entries:?}"))
    }

    fn text_of(doc: &IniDoc, span: &Span) -> String {
        let file = doc.files.iter().rev().find(|f| f.base <= span.start).unwrap();
        file.text[span.start - file.base..span.end - file.base].to_string()
    }

    #[test]
    fn values_are_read_as_pgbouncer_reads_them() {
        let doc = read_with(&[(
            "p.ini",
            "  ; comment\n# another\n[pgbouncer]\nlisten_port=6433\nmax_client_conn = 0x10 \n\
             unix_socket_mode = 0750\nlog_connections = no\nlog_stats = 0\n\
             query_wait_timeout = 2.5\nserver_lifetime = 010\nadmin_users = a , b,,c\n\
             server_reset_query = DISCARD ALL ; not a comment\nauth_file = users.txt\n\
             listen_addr = 127.0.0.1, ::1\n\t max_client_conn\t=\t 64\r\n",
        )]);
        assert!(doc.problems.is_empty(), "{:?}", doc.problems);
        let g = table(&doc, "pgsilo");
        assert_eq!(get(g, "listen_port"), &Value::Integer(6433));
        // A later key wins.
        assert_eq!(get(g, "max_client_conn"), &Value::Integer(64));
        assert_eq!(get(g, "unix_socket_mode"), &Value::String("0750".into()));
        assert_eq!(get(g, "log_connections"), &Value::Boolean(false));
        assert_eq!(get(g, "log_stats"), &Value::Boolean(false));
        assert_eq!(get(g, "query_wait_timeout"), &Value::Float(2.5));
        // strtol with base 0: a leading 0 is octal.
        assert_eq!(get(g, "server_lifetime"), &Value::Integer(10));
        let Value::Array(admins) = get(g, "admin_users") else {
            panic!()
        };
        let admins: Vec<_> = admins.iter().map(|n| n.get_ref().clone()).collect();
        assert_eq!(admins, ["a", "b", "c"].map(|s| Value::String(s.into())));
        assert_eq!(
            get(g, "server_reset_query"),
            &Value::String("DISCARD ALL ; not a comment".into())
        );
        assert_eq!(get(g, "auth_file"), &Value::String("/cwd/users.txt".into()));
        let Value::Array(addrs) = get(g, "listen_addr") else {
            panic!()
        };
        assert_eq!(addrs.len(), 2);
        assert!(doc.notices.is_empty(), "{:?}", doc.notices);
    }

    #[test]
    fn integers_follow_strtol() {
        assert_eq!(c_int("42"), Some(42));
        assert_eq!(c_int("-1"), Some(-1));
        assert_eq!(c_int("+7"), Some(7));
        assert_eq!(c_int("0777"), Some(0o777));
        assert_eq!(c_int("0x1f"), Some(31));
        assert_eq!(c_int("0"), Some(0));
        for bad in ["", "08", "0x", "12abc", "1.5", "x", "0x+1"] {
            assert_eq!(c_int(bad), None, "{bad}");
        }
        assert_eq!(c_bool("ON"), Some(true));
        assert_eq!(c_bool("2"), Some(true));
        assert_eq!(c_bool("False"), Some(false));
        assert_eq!(c_bool("maybe"), None);
        assert_eq!(seconds("30"), Some(Value::Integer(30)));
        assert_eq!(seconds(".5"), Some(Value::Float(0.5)));
        assert_eq!(seconds("1e1"), Some(Value::Float(10.0)));
        for bad in ["-1", "inf", "nan", "5s", ""] {
            assert_eq!(seconds(bad), None, "{bad}");
        }
    }

    #[test]
    fn databases_are_connection_strings_with_quotes() {
        let doc = read_with(&[(
            "p.ini",
            "[pgbouncer]\nunix_socket_dir = sockets\n[databases]\n\
             app = host=db.internal port=6000 dbname=app_prod user=svc password='it''s secret' pool_size=5\n\
             local = dbname=other\n\
             * = host=10.0.0.9 pool_mode=transaction\n",
        )]);
        assert!(doc.problems.is_empty(), "{:?}", doc.problems);
        let dbs = table(&doc, "databases");
        let Value::Table(app) = get(dbs, "app") else { panic!() };
        assert_eq!(get(app, "host"), &Value::String("db.internal".into()));
        assert_eq!(get(app, "port"), &Value::Integer(6000));
        assert_eq!(get(app, "password"), &Value::String("it's secret".into()));
        assert_eq!(get(app, "pool_size"), &Value::Integer(5));
        // Where a value was written, quotes included.
        let span = app.iter().find(|(k, _)| k == "password").unwrap().1.span().unwrap();
        assert_eq!(text_of(&doc, &span), "'it''s secret'");
        // No host: the Unix socket in unix_socket_dir, relative to the current directory.
        let Value::Table(local) = get(dbs, "local") else {
            panic!()
        };
        assert_eq!(get(local, "host"), &Value::String("/cwd/sockets".into()));
        let Value::Table(fallback) = get(dbs, "*") else {
            panic!()
        };
        assert_eq!(get(fallback, "pool_mode"), &Value::String("transaction".into()));
    }

    #[test]
    fn connection_string_errors_are_reported_where_they_are() {
        for (line, needle) in [
            ("a = host", "expected key=value"),
            ("a = host=", "host has an empty value"),
            ("a = password='x", "without its closing quote"),
            ("a = password='x'y", "blank after the closing quote"),
            ("a = hots=db", "unknown parameter \"hots\""),
            ("a = host=db port=many", "\"many\" is not an integer"),
        ] {
            let doc = read_with(&[("p.ini", &format!("[pgbouncer]\n[databases]\n{line}\n"))]);
            assert_eq!(doc.problems.len(), 1, "{line}: {:?}", doc.problems);
            let (span, message) = &doc.problems[0];
            assert!(message.contains(needle), "{line}: {message}");
            assert!(
                message.starts_with("[databases] a") || message.starts_with("port in [databases] a"),
                "{message}"
            );
            assert_eq!(
                span.as_ref().map(|s| s.start >= "[pgbouncer]\n[databases]\n".len()),
                Some(true)
            );
        }
    }

    #[test]
    fn includes_are_read_in_place_from_the_current_directory() {
        let doc = read_with(&[
            (
                "main.ini",
                "[pgbouncer]\nlisten_port = 1\n%include conf.d/more.ini\nmax_client_conn = 3\n",
            ),
            (
                "conf.d/more.ini",
                "listen_port = 2\n[databases]\nx = host=h\n[pgbouncer]\n",
            ),
        ]);
        assert!(doc.problems.is_empty(), "{:?}", doc.problems);
        assert_eq!(doc.files.len(), 2);
        assert_eq!(doc.files[1].path, Path::new("/cwd/conf.d/more.ini"));
        // The included file's second [pgbouncer] header resets the settings above it.
        let g = table(&doc, "pgsilo");
        assert!(!g.iter().any(|(k, _)| k == "listen_port"), "{g:?}");
        assert_eq!(get(g, "max_client_conn"), &Value::Integer(3));
        assert!(doc.notices.iter().any(|n| n.message.contains("starts again")));
        let dbs = table(&doc, "databases");
        let span = dbs[0].1.span().unwrap();
        assert!(
            span.start >= doc.files[1].base,
            "the entry is located in the included file"
        );

        let doc = read_with(&[("main.ini", "[pgbouncer]\n%include missing.ini\n")]);
        assert!(doc.problems[0]
            .1
            .contains("%include missing.ini: cannot read /cwd/missing.ini"));
        let doc = read_with(&[("loop.ini", "[pgbouncer]\n%include loop.ini\n")]);
        assert!(
            doc.problems[0].1.contains("nested more than 10 deep"),
            "{:?}",
            doc.problems
        );
    }

    #[test]
    fn quoted_names_are_sql_identifiers() {
        let doc = read_with(&[(
            "q.ini",
            "[databases]\n\"my db\" = host=localhost dbname='my db'\n\"say \"\"hi\"\"\" = host=h\n[pgbouncer]\n",
        )]);
        assert!(doc.problems.is_empty(), "{:?}", doc.problems);
        let dbs = table(&doc, "databases");
        let names: Vec<&str> = dbs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["my db", "say \"hi\""]);
    }

    #[test]
    fn structure_errors_stop_the_read_as_in_pgbouncer() {
        for (text, needle) in [
            ("[pgbouncer\nx = 1\n", "closing ]"),
            ("[pgbouncer]\nlisten port = 1\n", "expected = after the key"),
            ("[pgbouncer]\n= 1\n", "expected a key"),
            ("listen_port = 1\n[pgbouncer]\n", "comes before any section"),
            ("[pgbouncer]\n[pgsilo]\n", "unknown section [pgsilo]"),
            ("[databases]\na = host=x\n", "no [pgbouncer] section"),
        ] {
            let doc = read_with(&[("p.ini", text)]);
            assert_eq!(doc.problems.len(), 1, "{text:?}: {:?}", doc.problems);
            assert!(doc.problems[0].1.contains(needle), "{text:?}: {:?}", doc.problems);
        }
    }

    #[test]
    fn unsupported_keys_are_named_unless_they_change_nothing() {
        let doc = read_with(&[(
            "p.ini",
            "[pgbouncer]\nlogfile = /var/log/pgbouncer/a.log\npidfile =\nsyslog = 0\nuser = postgres\n\
             listen_addr = *\n[databases]\na = host=h timezone=UTC load_balance_hosts=disable\n\
             * = host=h max_db_connections=5\n[users]\nbob = pool_mode=transaction max_user_connections=3\n\
             [peers]\n1 = host=/tmp\n",
        )]);
        assert!(doc.problems.is_empty(), "{:?}", doc.problems);
        let unsupported: Vec<_> = doc
            .notices
            .iter()
            .filter(|n| n.unsupported)
            .map(|n| n.message.as_str())
            .collect();
        let expected = [
            "logfile = /var/log/pgbouncer/a.log in [pgbouncer]: not supported; pgsilo logs to stderr",
            "user = postgres in [pgbouncer]: not supported; pgsilo does not switch users",
            "timezone = UTC in [databases] a: not supported",
            "max_db_connections = 5 in [databases] *: not supported for the \"*\" database",
            "max_user_connections = 3 in [users] bob: not supported",
            "1 = host=/tmp in [peers]: not supported; peering",
        ];
        assert_eq!(unsupported.len(), expected.len(), "{unsupported:#?}");
        for (got, want) in unsupported.iter().zip(expected) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
        let quiet: Vec<_> = doc
            .notices
            .iter()
            .filter(|n| !n.unsupported)
            .map(|n| &n.message)
            .collect();
        assert_eq!(quiet.len(), 3, "{quiet:#?}");
        assert!(quiet.iter().all(|m| m.contains("changes nothing")), "{quiet:#?}");
        let users = table(&doc, "users");
        let Value::Table(bob) = get(users, "bob") else { panic!() };
        assert_eq!(get(bob, "pool_mode"), &Value::String("transaction".into()));
    }

    #[test]
    fn unset_listen_addr_means_the_unix_socket_only() {
        let doc = read_with(&[("p.ini", "[pgbouncer]\nlisten_port = 6433\n")]);
        let g = table(&doc, "pgsilo");
        assert_eq!(get(g, "listen_addr"), &Value::Array(Vec::new()));
        assert_eq!(doc.notices.len(), 1);
        assert!(doc.notices[0].message.contains("Unix socket /tmp/.s.PGSQL.6433 only"));
        assert!(!doc.notices[0].unsupported);
    }

    #[test]
    fn the_format_is_told_by_name_or_by_content() {
        assert!(is_pgbouncer_config(Path::new("a.ini"), ""));
        assert!(!is_pgbouncer_config(Path::new("a.toml"), "[pgbouncer]\n"));
        assert!(is_pgbouncer_config(
            Path::new("pgbouncer.conf"),
            "; x\n[databases]\n[pgbouncer]\n"
        ));
        assert!(is_pgbouncer_config(Path::new("a"), "%include /etc/pgbouncer/common\n"));
        assert!(!is_pgbouncer_config(
            Path::new("a.conf"),
            "[pgsilo]\n[databases.a]\nhost = \"x\"\n"
        ));
    }

    #[test]
    fn every_pgsilo_key_has_a_kind() {
        for key in crate::config::General::KEYS {
            assert!(KINDS.iter().any(|(k, _)| k == key), "{key} has no ini kind");
        }
        for (key, _) in KINDS {
            assert!(crate::config::General::KEYS.contains(key), "{key} is not a pgsilo key");
            assert!(!UNSUPPORTED.iter().any(|(k, _, _)| k == key), "{key} is both");
        }
    }
}
