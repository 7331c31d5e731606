//! A client's first moments: the startup packet (and the SSL/GSS/cancel requests that
//! share its framing), authentication against the auth_file, and the welcome PostgreSQL
//! would give: settings, a cancel key, ReadyForQuery.

use std::rc::Rc;
use std::sync::Arc;

use monoio::io::AsyncWriteRentExt;

use super::params::{after_sync, initial_settings, sync_statement};
use super::SessionError;
use crate::auth::{verify_cleartext, verify_md5_response, AuthError, ScramSecret, ScramServer, Secret};
use crate::config::{AuthType, Config, PoolMode, Userlist};
use crate::context::cancel::{send_cancel, CancelSlot};
use crate::context::logins::Admission;
use crate::context::WorkerCtx;
use crate::metrics::{ConnEntry, Registered, CLIENTS};
use crate::net::{Peer, Stream, TlsStream};
use crate::pool::{AuthQuery, Credential, LocalPool, ServerConn, ServerTarget, Settings};
use crate::protocol::backend::{self, Severity};
use crate::protocol::framing::read_cstr;
use crate::protocol::io::{read_at_least, read_message, write_out};
use crate::protocol::startup::{self, Startup, StartupPacket};
use crate::protocol::{MsgBuf, SqlState};

/// Names of the admin console's virtual database.
pub const ADMIN_DATABASES: &[&str] = &["pgsilo", "pgbouncer"];

/// Authentication messages are small; a larger one is not a real client.
const AUTH_MESSAGE_LIMIT: u32 = 16 * 1024;

pub struct LoggedIn {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub peer: Peer,
    pub pool: Rc<LocalPool>,
    /// Shared with other clients that logged in with the same parameters until it changes.
    pub settings: Arc<Settings>,
    pub cancel_pid: u32,
    pub cancel: Arc<CancelSlot>,
    /// This client's row in SHOW CLIENTS.
    pub entry: Registered,
    /// Session mode: the server bound to the client at login, whose process id the
    /// client was given.
    pub bound: Option<ServerConn>,
    /// What the client sent after its last login message without waiting for the
    /// welcome (a startup packet and a query in one write, which PostgreSQL accepts):
    /// the session's first input.
    pub pending: Vec<u8>,
}

pub struct AdminLogin {
    pub id: u64,
    pub user: String,
    pub peer: Peer,
    /// stats_users may only look; admin_users may also act.
    pub can_act: bool,
    pub entry: Registered,
}

pub enum Opening {
    /// A cancel request was handled; the connection just closes.
    Cancel,
    Session(LoggedIn),
    Admin(AdminLogin),
}

/// The first byte of a TLS handshake record: a client that starts TLS at once
/// (PostgreSQL 17's `sslnegotiation=direct`) instead of asking with an SSLRequest. No
/// startup packet can begin with it (its length would exceed the limit).
const TLS_HANDSHAKE: u8 = 0x16;

/// Runs the login. On a refusal the caller sends the FATAL error and closes. The stream
/// is in a slot because TLS replaces it; the slot is empty when a TLS handshake failed
/// half-way and nothing more can be said to the client. `admission` is told when the
/// startup packet has come and when the client has authenticated (it then counts
/// against max_client_conn instead of the logins in progress).
pub async fn login(
    ctx: &Rc<WorkerCtx>,
    slot: &mut Option<Stream>,
    peer: Peer,
    id: u64,
    admission: &Admission,
) -> Result<Opening, SessionError> {
    let mut buf = MsgBuf::with_capacity(512);
    let tls = ctx.instance.tls();
    let gone = || SessionError::ClientGone(crate::protocol::io::WireError::Closed);
    let startup = loop {
        let stream = slot.as_mut().ok_or_else(gone)?;
        let (res, back) = read_at_least(stream, buf, 4).await;
        buf = back;
        res?;
        // TLS only on TCP: PostgreSQL answers N on Unix sockets too.
        let tls_possible = matches!(stream, Stream::Tcp(_));
        if buf.data().first() == Some(&TLS_HANDSHAKE) && tls_possible {
            let Some(acceptor) = tls.acceptor.clone() else {
                // As PostgreSQL without TLS: nothing a TLS client could read; close.
                return Err(gone());
            };
            start_tls(slot, acceptor, buf.data(), true).await?;
            buf.consume(buf.len());
            continue;
        }
        let len = match startup::declared_len(buf.data()) {
            Some(r) => r?,
            None => continue,
        };
        let (res, back) = read_at_least(stream, buf, len).await;
        buf = back;
        res?;
        let packet = startup::parse(&buf.data()[..len])?;
        buf.consume(len);
        match packet {
            StartupPacket::SslRequest if tls_possible && tls.acceptor.is_some() => {
                // Bytes behind the SSLRequest arrived before the handshake, in the
                // clear; taking them as if encrypted is CVE-2021-23214.
                if !buf.is_empty() {
                    return Err(SessionError::refused(
                        SqlState::PROTOCOL_VIOLATION,
                        "received unencrypted data after SSL request",
                    ));
                }
                let (res, _) = stream.write_all(b"S".to_vec()).await;
                res.map_err(|e| SessionError::ClientGone(e.into()))?;
                if let Some(acceptor) = tls.acceptor.clone() {
                    start_tls(slot, acceptor, &[], false).await?;
                }
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                // No TLS configured (or already on it), no GSS encryption: the client
                // carries on as it is or gives up, as with a PostgreSQL built without them.
                let (res, _) = stream.write_all(b"N".to_vec()).await;
                res.map_err(|e| SessionError::ClientGone(e.into()))?;
            }
            StartupPacket::Cancel { pid, secret } => {
                if let Some(pending) = ctx.instance.cancels.lookup(pid, &secret) {
                    if let Err(e) = send_cancel(pending.target).await {
                        log::warn!("C-{id}: cancel request to {} failed: {e}", pending.target.addr);
                    }
                }
                return Ok(Opening::Cancel);
            }
            StartupPacket::Startup(s) => break s,
        }
    };
    admission.startup_received();
    let stream = slot.as_mut().ok_or_else(gone)?;
    // Unix sockets are local: PgBouncer (and PostgreSQL's `local` lines) ask no TLS there.
    if tls.client_mode.requires_tls() && !stream.is_tls() && !matches!(stream, Stream::Unix(_)) {
        return Err(SessionError::refused(
            SqlState::INVALID_AUTHORIZATION,
            "SSL required (client_tls_sslmode)",
        ));
    }

    let mut out = Vec::with_capacity(512);
    if startup.minor > 0 || !startup.protocol_options.is_empty() {
        backend::negotiate_protocol_version(&mut out, 0, &startup.protocol_options);
    }
    let user = startup
        .get("user")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            SessionError::refused(
                SqlState::INVALID_AUTHORIZATION,
                "no user name specified in startup packet",
            )
        })?
        .to_string();
    if startup
        .get("replication")
        .is_some_and(|r| r != "false" && r != "0" && r != "off")
    {
        return Err(SessionError::refused(
            SqlState::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported by pgsilo",
        ));
    }
    let database = startup
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_string();
    let config = ctx.instance.config();
    let general = &config.general;
    // Early, as PgBouncer refuses at the startup packet; the place itself is taken once
    // the client has authenticated, so logins in progress never hold one.
    if ctx.instance.logged_in() >= general.max_client_conn {
        return Err(max_client_conn_reached());
    }
    let mut startup = startup;
    if general.application_name_add_host {
        // As PgBouncer: the client's address goes into application_name, so PostgreSQL's
        // pg_stat_activity shows where a pooled query came from.
        let from = match peer {
            Peer::Tcp(a) => format!("{}:{}", a.ip(), a.port()),
            Peer::Unix(_) => "unix".to_string(),
        };
        let app = format!("{} - {from}", startup.get("application_name").unwrap_or(""));
        startup.params.retain(|(k, _)| k != "application_name");
        startup.params.push(("application_name".into(), app));
    }
    let application_name = startup.get("application_name").unwrap_or("").to_string();
    if general.log_connections {
        // PgBouncer's words (tls=no, or the protocol and cipher), so log alerts keep working.
        let tls_info = stream
            .tls()
            .map_or_else(|| "no".to_string(), |t| crate::tls::describe(t.connection()));
        log::info!(
            "C-{id}: {database}/{user}@{peer} login attempt: db={database} user={user} tls={tls_info} application_name={application_name}"
        );
    }

    let is_admin = ADMIN_DATABASES.contains(&database.as_str());
    // The `*` database and [users] settings make this client's view of the config.
    let config = if is_admin {
        config.clone()
    } else {
        config.for_login(&database, &user).ok_or_else(|| {
            SessionError::refused(SqlState::INVALID_CATALOG_NAME, format!("no such database: {database}"))
        })?
    };

    let userlist = ctx.instance.userlist();
    let mut secret = userlist.get(&user).cloned();
    // A user the auth_file does not list may be known to PostgreSQL (auth_query). The
    // lookup runs for every such user, found or not, before the same exchange as
    // always: nothing tells a user who exists from one who does not.
    let lookup = match (&secret, general.auth_type) {
        (None, AuthType::Trust | AuthType::Plain | AuthType::Md5 | AuthType::ScramSha256) if !is_admin => {
            auth_query_for(&config, &userlist, &tls, &database, &ctx.instance.pools)
        }
        _ => None,
    };
    if let Some(q) = &lookup {
        secret = ctx.auth_lookups.lookup(q, &user, ctx.id).await.map_err(|e| {
            log::warn!(
                "C-{id}: {database}/{user}@{peer} auth_query as {} on {} failed: {e}",
                q.target.user,
                q.database
            );
            SessionError::refused(e.sqlstate(), e.client_message())
        })?;
    }
    let client_key = match authenticate(
        ctx,
        stream,
        &mut buf,
        &mut out,
        general.auth_type,
        &user,
        secret.as_ref(),
        tls.end_point.clone().filter(|_| stream.is_tls()),
    )
    .await
    {
        Ok(key) => key,
        Err(e) => {
            // The password may have changed in PostgreSQL: the next attempt asks again.
            if let Some(q) = &lookup {
                ctx.auth_lookups.forget(q, &user);
            }
            return Err(e);
        }
    };
    if !admission.log_in(&ctx.instance, general.max_client_conn) {
        return Err(max_client_conn_reached());
    }

    if is_admin {
        let can_act = general.admin_users.iter().any(|u| u == &user);
        let can_look = can_act || general.stats_users.iter().any(|u| u == &user);
        if !can_look {
            return Err(SessionError::refused(
                SqlState::INSUFFICIENT_PRIVILEGE,
                format!("not allowed: user \"{user}\" is not in admin_users or stats_users"),
            ));
        }
        welcome_admin(stream, out).await?;
        let entry = register_client(ctx, stream, id, &user, &database, peer, "", 0);
        return Ok(Opening::Admin(AdminLogin {
            id,
            user,
            peer,
            can_act,
            entry,
        }));
    }

    let shared = ctx.instance.pools.get_or_create(&database, &user, || {
        pool_definition(&config, &userlist, &ctx.instance.tls(), &database, &user)
    });
    if config.databases.get(&database).is_some_and(|d| d.user.is_none()) {
        let scram_key = client_key.filter(|_| matches!(secret, Some(Secret::Scram(_))));
        match (&lookup, &secret) {
            // Servers log in as the client's user: with the secret auth_query found.
            (Some(_), Some(found)) => shared.use_found_secret(credential_from(Some(found)), scram_key),
            _ => {
                if let Some(key) = scram_key {
                    shared.set_scram_client_key(key);
                }
            }
        }
    }
    let pool = ctx.local_pool(&shared);

    let options = match startup.get("options") {
        Some(o) => startup::parse_options(o).map_err(|e| SessionError::refused(SqlState::FEATURE_NOT_SUPPORTED, e))?,
        None => Vec::new(),
    };
    let settings = client_settings(
        &pool,
        &startup,
        &options,
        &general.ignore_startup_parameters,
        general.query_wait_timeout,
    )
    .await?;
    let welcome = pool.shared.welcome().unwrap_or_default();

    // Session mode, as a direct connection: when a server is free, the client has it from
    // login on and is told its real process id (BackendKeyData, so pg_backend_pid() and
    // notifications' pids agree); cancels still go through pgsilo, under pgsilo's key.
    let bound = if pool.shared.mode == PoolMode::Session {
        let asked = std::time::Instant::now();
        let conn = pool.acquire_if_free().await;
        if let Some(c) = &conn {
            pool.stats().acquire.record(c.meta.via, asked.elapsed());
        }
        conn
    } else {
        None
    };
    let registered = bound.as_ref().and_then(|conn| {
        Some((
            conn.meta.backend_pid,
            ctx.instance.cancels.register_as(conn.meta.backend_pid)?,
        ))
    });
    let (cancel_pid, cancel) = match registered {
        Some(r) => r,
        None => ctx.instance.cancels.register(),
    };
    backend::auth_ok(&mut out);
    for (name, value) in welcome.iter() {
        let value = settings.get(name).unwrap_or(value);
        backend::parameter_status(&mut out, name, value);
    }
    for (name, value) in settings.iter() {
        if !welcome.contains(name) && crate::pool::settings::is_tracked_reported(&name.to_ascii_lowercase()) {
            backend::parameter_status(&mut out, name, value);
        }
    }
    backend::backend_key_data(&mut out, cancel_pid, cancel.secret);
    backend::ready_for_query(&mut out, b'I');
    let (res, _) = write_out(stream, out).await;
    if let Err(e) = res {
        ctx.instance.cancels.unregister(cancel_pid);
        if let Some(conn) = bound {
            // Nothing ran on it.
            pool.release(conn, true);
        }
        return Err(SessionError::ClientGone(e));
    }
    if general.log_connections {
        log::info!("C-{id}: {database}/{user}@{peer} login ok");
    }
    let entry = register_client(ctx, stream, id, &user, &database, peer, &application_name, cancel_pid);
    Ok(Opening::Session(LoggedIn {
        id,
        user,
        database,
        application_name,
        peer,
        pool,
        settings,
        cancel_pid,
        cancel,
        entry,
        bound,
        pending: buf.data().to_vec(),
    }))
}

fn max_client_conn_reached() -> SessionError {
    SessionError::refused(
        SqlState::TOO_MANY_CONNECTIONS,
        "no more connections allowed (max_client_conn)",
    )
}

#[allow(clippy::too_many_arguments)]
fn register_client(
    ctx: &WorkerCtx,
    stream: &Stream,
    id: u64,
    user: &str,
    database: &str,
    peer: Peer,
    application_name: &str,
    cancel_pid: u32,
) -> Registered {
    let mut e = ConnEntry::new(
        id,
        user,
        database,
        (peer.addr_text(), peer.port()),
        stream.local_addr(),
        ctx.id,
    );
    e.application_name = application_name.to_string();
    e.tls = stream
        .tls()
        .map(|t| crate::tls::describe(t.connection()))
        .unwrap_or_default();
    e.remote_pid = cancel_pid;
    Registered::new(&CLIENTS, e)
}

/// Where this pool's servers are and how pgsilo logs in to them: with the auth_file
/// secret of the user it logs in as (the forced user's, when [databases] names one).
pub fn pool_definition(
    config: &Config,
    userlist: &Userlist,
    tls: &crate::tls::TlsContext,
    database: &str,
    user: &str,
) -> (crate::config::PoolMode, usize, ServerTarget) {
    let g = &config.general;
    let tls_mode = tls.server_mode;
    let tls = tls.connector.clone();
    let (mode, cap, target) = match config.databases.get(database) {
        Some(db) => {
            let server_user = db.user.clone().unwrap_or_else(|| user.to_string());
            let credential = match (&db.user, &db.password) {
                (Some(_), Some(p)) => Credential::Password(p.clone()),
                // A forced user without a password in the config: its auth_file entry.
                (Some(forced), None) => credential_from(userlist.get(forced)),
                (None, _) => credential_from(userlist.get(user)),
            };
            (
                db.effective_pool_mode(g),
                db.effective_pool_size(g),
                ServerTarget {
                    host: db.host.clone(),
                    port: db.port,
                    dbname: db.dbname.clone(),
                    user: server_user,
                    credential,
                    connect_timeout: timeout_or(g.server_connect_timeout, 15),
                    tcp_keepalive: g.tcp_keepalive,
                    tls_mode,
                    tls,
                },
            )
        }
        None => (
            g.pool_mode,
            g.default_pool_size,
            ServerTarget {
                host: String::new(),
                port: 0,
                dbname: database.to_string(),
                user: user.to_string(),
                credential: Credential::None,
                connect_timeout: timeout_or(g.server_connect_timeout, 15),
                tcp_keepalive: g.tcp_keepalive,
                tls_mode,
                tls,
            },
        ),
    };
    (mode, cap, target)
}

/// The auth_query lookup for clients of `database`, when it has an auth_user: on the
/// server of its auth_dbname entry (itself by default), as auth_user with its auth_file
/// secret.
fn auth_query_for(
    config: &Config,
    userlist: &Userlist,
    tls: &crate::tls::TlsContext,
    database: &str,
    pools: &crate::pool::PoolRegistry,
) -> Option<AuthQuery> {
    let g = &config.general;
    let db = config.databases.get(database)?;
    let auth_user = db.effective_auth_user(g)?;
    let auth_db = db.effective_auth_dbname(g);
    // The load checked that the entry exists.
    let entry = config.databases.get(auth_db)?;
    let credential = credential_from(userlist.get(auth_user));
    // A SCRAM verifier answers SCRAM only with a ClientKey auth_user proved through
    // pgsilo, as for its pools.
    let client_key = match &credential {
        Credential::Scram(_) => pools.all().iter().filter(|p| p.user == auth_user).find_map(|p| {
            let (target, key) = p.login_material();
            key.filter(|_| target.credential == credential)
        }),
        _ => None,
    };
    Some(AuthQuery {
        target: ServerTarget {
            host: entry.host.clone(),
            port: entry.port,
            dbname: entry.dbname.clone(),
            user: auth_user.to_string(),
            credential,
            connect_timeout: timeout_or(g.server_connect_timeout, 15),
            tcp_keepalive: g.tcp_keepalive,
            tls_mode: tls.server_mode,
            tls: tls.connector.clone(),
        },
        client_key,
        database: auth_db.to_string(),
        query: db.effective_auth_query(g).to_string(),
    })
}

fn credential_from(secret: Option<&Secret>) -> Credential {
    match secret {
        Some(Secret::Plain(p)) => Credential::Password(p.clone()),
        Some(Secret::Md5(h)) => Credential::Md5(h.clone()),
        Some(Secret::Scram(v)) => Credential::Scram(v.clone()),
        None => Credential::None,
    }
}

fn timeout_or(t: Option<std::time::Duration>, default_secs: u64) -> std::time::Duration {
    t.unwrap_or(std::time::Duration::from_secs(default_secs))
}

/// The settings this client starts with. A server is needed only when the pool has not
/// met one yet (for the welcome values) or the client sent a setting whose value has not
/// been seen before: PostgreSQL must judge it now, as it would at a direct login, rather
/// than fail the client's first query later.
async fn client_settings(
    pool: &Rc<LocalPool>,
    startup: &Startup,
    options: &[(String, String)],
    ignored: &[String],
    wait_timeout: Option<std::time::Duration>,
) -> Result<Arc<Settings>, SessionError> {
    let overrides: Vec<&(String, String)> = startup
        .params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | "options" | "replication"))
        .chain(options.iter())
        .filter(|(k, _)| !ignored.iter().any(|i| i.eq_ignore_ascii_case(k)))
        .collect();
    let unjudged = |pool: &LocalPool| {
        overrides
            .iter()
            .any(|(k, v)| !k.eq_ignore_ascii_case("application_name") && pool.shared.validated(k, v).is_none())
    };
    if let Some(welcome) = pool.shared.welcome() {
        if !unjudged(pool) {
            // Clients that log in with the same parameters share one copy.
            let key: Vec<(String, String)> = overrides.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            if let Some(s) = pool.shared.shared_settings(&key) {
                return Ok(s);
            }
            let mut s = initial_settings(&welcome, &startup.params, options, ignored);
            for (k, v) in &overrides {
                if let Some(norm) = pool.shared.validated(k, v) {
                    s.set(k, &norm);
                }
            }
            return Ok(pool.shared.share_settings(key, s));
        }
    }
    let asked = std::time::Instant::now();
    let mut conn = pool.acquire(wait_timeout).await?;
    pool.stats().acquire.record(conn.meta.via, asked.elapsed());
    let welcome = pool.shared.welcome().unwrap_or_default();
    let mut settings = initial_settings(&welcome, &startup.params, options, ignored);
    if let Some(sql) = sync_statement(&settings, &conn.meta) {
        match conn.internal_query(&sql).await {
            Ok(outcome) => {
                if let Some(err) = outcome.error {
                    // The failed statement rolled back; but the server's reported values
                    // may have moved, so it is not trusted further.
                    pool.release(conn, false);
                    return Err(SessionError::Refused {
                        code: SqlState::parse(&err.code).unwrap_or(SqlState::INVALID_PARAMETER_VALUE),
                        message: err.message,
                    });
                }
                after_sync(&mut settings, &mut conn.meta, &welcome);
            }
            Err(e) => {
                pool.release(conn, false);
                return Err(e.into());
            }
        }
    }
    for (k, v) in &overrides {
        if let Some(norm) = settings.get(k) {
            pool.shared.remember_validated(k, v, norm);
        }
    }
    let reusable = conn.meta.tx_status == b'I';
    pool.release(conn, reusable);
    Ok(Arc::new(settings))
}

async fn welcome_admin(stream: &mut Stream, mut out: Vec<u8>) -> Result<(), SessionError> {
    backend::auth_ok(&mut out);
    for (name, value) in [
        ("server_version", env!("CARGO_PKG_VERSION")),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "pgsilo"),
    ] {
        backend::parameter_status(&mut out, name, value);
    }
    backend::backend_key_data(&mut out, 0, 0);
    backend::ready_for_query(&mut out, b'I');
    let (res, _) = write_out(stream, out).await;
    res.map_err(SessionError::ClientGone)
}

/// Authenticates by the instance's auth_type. Every failure, including an unknown user,
/// looks the same from outside. Returns the client's SCRAM ClientKey when it proved one.
#[allow(clippy::too_many_arguments)]
async fn authenticate(
    ctx: &Rc<WorkerCtx>,
    stream: &mut Stream,
    buf: &mut MsgBuf,
    out: &mut Vec<u8>,
    auth_type: AuthType,
    user: &str,
    secret: Option<&Secret>,
    binding: Option<Vec<u8>>,
) -> Result<Option<[u8; 32]>, SessionError> {
    let failed = || {
        SessionError::refused(
            SqlState::INVALID_PASSWORD,
            format!("password authentication failed for user \"{user}\""),
        )
    };
    match auth_type {
        AuthType::Cert => {
            // The chain was checked against client_tls_ca_file in the handshake; what is
            // left is that it names this user, as PostgreSQL's and PgBouncer's cert.
            let cert = stream
                .tls()
                .and_then(|t| t.connection().peer_certificates())
                .and_then(|c| c.first());
            let Some(cert) = cert else {
                return Err(SessionError::refused(
                    SqlState::INVALID_AUTHORIZATION,
                    "connection requires a valid client certificate",
                ));
            };
            match crate::tls::der::subject_common_name(cert) {
                Some(cn) if cn == user => Ok(None),
                _ => Err(SessionError::refused(
                    SqlState::INVALID_AUTHORIZATION,
                    format!("certificate authentication failed for user \"{user}\""),
                )),
            }
        }
        AuthType::Trust => {
            if secret.is_none() {
                return Err(failed());
            }
            Ok(None)
        }
        AuthType::Plain => {
            backend::auth_cleartext(out);
            let password = exchange(stream, buf, out).await?;
            let password = password.strip_suffix(&[0]).unwrap_or(&password);
            if verify_cleartext(secret, user, password) {
                Ok(None)
            } else {
                Err(failed())
            }
        }
        AuthType::Md5 if !matches!(secret, Some(Secret::Scram(_))) => {
            let salt: [u8; 4] = rand::random();
            backend::auth_md5(out, salt);
            let response = exchange(stream, buf, out).await?;
            let response = response.strip_suffix(&[0]).unwrap_or(&response);
            if verify_md5_response(secret, user, salt, response) {
                Ok(None)
            } else {
                Err(failed())
            }
        }
        // md5 with a SCRAM secret switches to SCRAM, as PgBouncer and PostgreSQL do.
        AuthType::Md5 | AuthType::ScramSha256 => {
            let verifier: Option<ScramSecret> = match secret {
                Some(Secret::Scram(v)) => Some(v.clone()),
                Some(Secret::Plain(p)) => Some(ctx.instance.scram_for_plain(user, p)),
                Some(Secret::Md5(_)) | None => None,
            };
            // On TLS, SCRAM-SHA-256-PLUS is offered too, bound to the certificate this
            // connection's handshake presented (PgBouncer offers no channel binding).
            let mut server = ScramServer::new(verifier, user, &ctx.instance.mock_key).with_channel_binding(binding);
            backend::auth_sasl(out, server.mechanisms());
            let initial = exchange(stream, buf, out).await?;
            let (mechanism, at) = read_cstr(&initial, 0).ok_or(SessionError::Protocol(
                crate::protocol::ProtocolError::Malformed("SASLInitialResponse"),
            ))?;
            let data = initial.get(at + 4..).unwrap_or_default();
            let server_first = server.handle_initial(mechanism, data).map_err(|e| match e {
                AuthError::InvalidMechanism => SessionError::refused(
                    SqlState::INVALID_AUTHORIZATION,
                    "client selected an invalid SASL authentication mechanism",
                ),
                // PostgreSQL's code for a channel binding the client got wrong.
                AuthError::ChannelBindingDowngrade => {
                    SessionError::refused(SqlState::PROTOCOL_VIOLATION, "SCRAM channel binding negotiation error")
                }
                _ => failed(),
            })?;
            backend::auth_sasl_continue(out, &server_first);
            let client_final = exchange(stream, buf, out).await?;
            let ok = server.handle_client_final(&client_final).map_err(|_| failed())?;
            backend::auth_sasl_final(out, &ok.server_final);
            Ok(Some(ok.client_key))
        }
    }
}

/// Runs the TLS handshake with a client on the TCP stream in `slot`. `early` is what was
/// already read of a direct-TLS ClientHello. Direct TLS must name PostgreSQL's ALPN
/// protocol, as PostgreSQL 17 demands (a client of another protocol could otherwise be
/// talked into speaking to pgsilo).
async fn start_tls(
    slot: &mut Option<Stream>,
    acceptor: Arc<rustls::ServerConfig>,
    early: &[u8],
    direct: bool,
) -> Result<(), SessionError> {
    let Some(Stream::Tcp(tcp)) = slot.take() else {
        return Err(SessionError::ClientGone(crate::protocol::io::WireError::Closed));
    };
    let lost = |e: std::io::Error| SessionError::ClientGone(crate::protocol::io::WireError::Io(e));
    let conn = rustls::ServerConnection::new(acceptor).map_err(|e| lost(std::io::Error::other(e)))?;
    let tls = TlsStream::handshake(tcp, rustls::Connection::Server(conn), early)
        .await
        .map_err(lost)?;
    if direct && tls.connection().alpn_protocol() != Some(crate::tls::ALPN_POSTGRESQL) {
        return Err(lost(std::io::Error::other(
            "direct TLS without the postgresql ALPN protocol",
        )));
    }
    *slot = Some(Stream::Tls(Box::new(tls)));
    Ok(())
}

/// Sends what is in `out` and reads the client's PasswordMessage-family reply body.
async fn exchange(stream: &mut Stream, buf: &mut MsgBuf, out: &mut Vec<u8>) -> Result<Vec<u8>, SessionError> {
    let (res, back) = write_out(stream, std::mem::take(out)).await;
    *out = back;
    res.map_err(SessionError::ClientGone)?;
    let taken = std::mem::replace(buf, MsgBuf::with_capacity(0));
    let (res, back) = read_message(stream, taken, AUTH_MESSAGE_LIMIT).await;
    *buf = back;
    let h = res?;
    if h.tag != b'p' {
        return Err(SessionError::Protocol(crate::protocol::ProtocolError::Unexpected {
            expected: "password",
            got: h.tag as char,
        }));
    }
    let body = buf.data()[5..h.total()].to_vec();
    buf.consume(h.total());
    Ok(body)
}

/// Sends a FATAL error to a client that is about to be closed. Best effort.
pub async fn send_fatal(stream: &mut Stream, code: SqlState, message: &str) {
    let mut out = Vec::with_capacity(64 + message.len());
    backend::error_response(&mut out, Severity::Fatal, code, message);
    let _ = write_out(stream, out).await;
}
