//! One `[databases.NAME]` table: where the server is and how its pool is sized.

use std::path::Path;

use super::general::{read_auth_query, read_pool_mode, General, PoolMode};
use super::load::FALLBACK_DATABASE;
use super::section::Section;

/// Names clients cannot use for a database: they reach the admin console.
pub const RESERVED_DATABASE_NAMES: [&str; 2] = ["pgsilo", "pgbouncer"];

/// A database clients may ask for, and the server database it maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Database {
    /// The name clients ask for: the table's key. `*` serves every name no other entry
    /// has ([`FALLBACK_DATABASE`]).
    pub name: String,
    /// `host`: a host name or IP address, or an absolute path to the folder holding the
    /// server's Unix socket, as libpq takes it. Required.
    pub host: String,
    /// `port`: also picks the socket file name when `host` is a folder. Default 5432.
    pub port: u16,
    /// `dbname`: the database on the server. Default: `name` (for `*`: the name the
    /// client asks for).
    pub dbname: String,
    /// `user`: log in to the server as this user whoever the client is. Default: the
    /// client's user.
    pub user: Option<String>,
    /// `password`: the forced `user`'s password. Default: that user's auth_file secret.
    pub password: Option<String>,
    /// `pool_size`: overrides `default_pool_size` for this database.
    pub pool_size: Option<usize>,
    /// `pool_mode`: overrides the `[pgsilo]` pool_mode for this database.
    pub pool_mode: Option<PoolMode>,
    /// `min_pool_size`: overrides the `[pgsilo]` min_pool_size for this database's pools.
    pub min_pool_size: Option<usize>,
    /// `reserve_pool`: overrides `reserve_pool_size` for this database's pools (PgBouncer's
    /// per-database name for it).
    pub reserve_pool: Option<usize>,
    /// `max_db_connections`: server connections to this database across users; 0 =
    /// unlimited. Default: the `[pgsilo]` value.
    pub max_db_connections: usize,
    /// `max_busy_cores`: overrides the `[pgsilo]` max_busy_cores (thousandths of a core)
    /// for this database's pools.
    pub max_busy_cores: Option<u32>,
    /// `auth_user`: overrides the `[pgsilo]` auth_user for clients of this database.
    pub auth_user: Option<String>,
    /// `auth_query`: overrides the `[pgsilo]` auth_query for clients of this database.
    pub auth_query: Option<String>,
    /// `auth_dbname`: overrides the `[pgsilo]` auth_dbname for clients of this database.
    pub auth_dbname: Option<String>,
}

impl Database {
    /// Server connections allowed per (database, user) pool.
    pub fn effective_pool_size(&self, g: &General) -> usize {
        self.pool_size.unwrap_or(g.default_pool_size)
    }

    pub fn effective_pool_mode(&self, g: &General) -> PoolMode {
        self.pool_mode.unwrap_or(g.pool_mode)
    }

    /// Server connections each of this database's pools keeps open even when idle.
    pub fn effective_min_pool_size(&self, g: &General) -> usize {
        self.min_pool_size.unwrap_or(g.min_pool_size)
    }

    /// Extra connections each of this database's pools may open for clients that waited
    /// reserve_pool_timeout.
    pub fn effective_reserve_pool(&self, g: &General) -> usize {
        self.reserve_pool.unwrap_or(g.reserve_pool_size)
    }

    /// The busy-time budget of each of this database's pools, in thousandths of a core;
    /// 0: none.
    pub fn effective_max_busy_cores(&self, g: &General) -> u32 {
        self.max_busy_cores.unwrap_or(g.max_busy_cores)
    }

    /// Who looks up the secrets of this database's clients that the auth_file does not
    /// list; None: nobody, they cannot log in.
    pub fn effective_auth_user<'a>(&'a self, g: &'a General) -> Option<&'a str> {
        self.auth_user.as_deref().or(g.auth_user.as_deref())
    }

    pub fn effective_auth_query<'a>(&'a self, g: &'a General) -> &'a str {
        self.auth_query.as_deref().unwrap_or(&g.auth_query)
    }

    /// The `[databases]` entry whose server the lookup runs on: auth_dbname, else this one.
    pub fn effective_auth_dbname<'a>(&'a self, g: &'a General) -> &'a str {
        self.auth_dbname
            .as_deref()
            .or(g.auth_dbname.as_deref())
            .unwrap_or(&self.name)
    }

    /// Reads the table. As with `General::read`, the result is only meaningful when the
    /// section reported no problems.
    pub(super) fn read(name: &str, section: &mut Section, general: &General) -> Database {
        if name == FALLBACK_DATABASE {
            // Pools made from `*` take these from the instance's settings.
            for key in ["min_pool_size", "reserve_pool", "max_db_connections", "max_busy_cores"] {
                if let Some(span) = section.span_of(key) {
                    section.invalid(
                        key,
                        Some(&span),
                        "is not supported for the \"*\" database: its pools take the instance-wide value",
                    );
                }
            }
        }
        let host = read_host(section);
        let port = section.uint("port", 5432, 1);
        let dbname = match section.string("dbname") {
            Some((dbname, span)) if dbname.is_empty() => {
                section.invalid("dbname", span.as_ref(), "must not be empty");
                name.to_string()
            }
            Some((dbname, _)) => dbname,
            None => name.to_string(),
        };
        let user = match section.string("user") {
            Some((user, span)) if user.is_empty() => {
                section.invalid(
                    "user",
                    span.as_ref(),
                    "must not be empty; remove the key to use the client's user",
                );
                None
            }
            Some((user, _)) => Some(user),
            None => None,
        };
        let password_span = section.span_of("password");
        let password = section.string("password").map(|(p, _)| p);
        if password.is_some() && user.is_none() {
            // PgBouncer would silently ignore it; the user meant something else.
            section.invalid(
                "password",
                password_span.as_ref(),
                "is set without user; it is only used for the forced user",
            );
        }
        let pool_size = section.opt_uint("pool_size", 1);
        let pool_mode = read_pool_mode(section, "pool_mode");
        let min_pool_size = section.opt_uint("min_pool_size", 0);
        let reserve_pool = section.opt_uint("reserve_pool", 0);
        let max_db_connections = section
            .opt_uint("max_db_connections", 0)
            .unwrap_or(general.max_db_connections);
        let max_busy_cores = section.cores("max_busy_cores");
        let auth_user = read_override(section, "auth_user");
        let auth_query = read_auth_query(section, "auth_query");
        let auth_dbname = read_override(section, "auth_dbname");
        Database {
            name: name.to_string(),
            host,
            port,
            dbname,
            user,
            password,
            pool_size,
            pool_mode,
            min_pool_size,
            reserve_pool,
            max_db_connections,
            max_busy_cores,
            auth_user,
            auth_query,
            auth_dbname,
        }
    }
}

/// A name overriding a `[pgsilo]` value; empty would mean nothing.
fn read_override(section: &mut Section, key: &'static str) -> Option<String> {
    match section.string(key) {
        Some((value, span)) if value.is_empty() => {
            section.invalid(
                key,
                span.as_ref(),
                "must not be empty; remove the key to use the [pgsilo] value",
            );
            None
        }
        Some((value, _)) => Some(value),
        None => None,
    }
}

fn read_host(section: &mut Section) -> String {
    let present = section.has("host");
    let Some((host, span)) = section.string("host") else {
        if !present {
            section.table_problem("host is required (a host name, an IP address or a Unix socket folder)");
        }
        return String::new();
    };
    let problem = if host.is_empty() {
        Some("must not be empty".to_string())
    } else if host.contains(',') {
        Some(format!(
            "\"{host}\" lists several hosts; pgsilo connects to exactly one"
        ))
    } else if host.contains('/') && !Path::new(&host).is_absolute() {
        Some(format!(
            "\"{host}\" is relative; a Unix socket folder must be an absolute path"
        ))
    } else if !host.contains('/') && host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some(format!("\"{host}\" is not a host name or IP address"))
    } else {
        None
    };
    if let Some(problem) = problem {
        section.invalid("host", span.as_ref(), problem);
    }
    host
}
