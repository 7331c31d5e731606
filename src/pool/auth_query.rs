//! auth_query, as PgBouncer's: the secret of a user the auth_file does not list, looked up
//! in PostgreSQL on a connection logged in as auth_user.
//!
//! Each worker keeps its own lookup connections, apart from the client pools so a lookup
//! never takes a client's server: one per (server, database, auth_user), opened by the
//! first lookup, used by one lookup at a time (the others wait their turn, asleep), and
//! closed by server_idle_timeout and server_lifetime like pooled servers. The query runs
//! as an unnamed prepared statement with the user name as its one text parameter, so no
//! name is ever quoted into SQL. A secret found is reused for `ANSWER_TTL`; a miss is
//! never remembered, and the caller forgets a secret a client failed to log in with, so
//! a password changed in PostgreSQL is picked up at the next attempt. RELOAD forgets
//! everything (`reset`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::connect::connect;
use super::server::{ServerConn, INTERNAL_MESSAGE_LIMIT};
use super::settings::parse_parameter_status;
use super::target::ServerTarget;
use super::PoolError;
use crate::auth::Secret;
use crate::metrics::ConnState;
use crate::protocol::io::{read_message, write_out};
use crate::protocol::{frontend, ErrorFields, MsgBuf, SqlState};

/// How long a worker reuses a secret auth_query found before asking PostgreSQL again.
pub const ANSWER_TTL: Duration = Duration::from_secs(60);

/// Secrets a worker remembers at most: expired ones go first, then all of them.
const ANSWER_LIMIT: usize = 10_000;

/// One lookup: where, as whom, and what to run.
pub struct AuthQuery {
    /// auth_dbname's server and dbname, logged in to as auth_user with its auth_file secret.
    pub target: ServerTarget,
    /// For an auth_user whose auth_file secret is a SCRAM verifier: a ClientKey it
    /// proved through pgsilo (passthrough).
    pub client_key: Option<[u8; 32]>,
    /// The `[databases]` entry the lookup runs on, for SHOW SERVERS.
    pub database: String,
    pub query: String,
}

/// Why a lookup found no answer. The client is refused with `sqlstate`; the log gets the
/// whole story (`Display`).
#[derive(Debug, Error)]
pub enum LookupError {
    /// auth_user's connection could not be opened or logged in.
    #[error("auth_user could not log in: {0}")]
    Login(PoolError),
    /// PostgreSQL ran the query and reported an error.
    #[error("auth_query failed: {0}")]
    Query(ErrorFields),
    /// The connection broke, or the answer did not come in time.
    #[error("auth_query got no answer: {0}")]
    Lost(String),
    /// An answer auth_query must not give.
    #[error("auth_query: {0}")]
    Answer(String),
}

impl LookupError {
    /// PostgreSQL's own code for a query error; otherwise 08P01, as PgBouncer's errors.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            LookupError::Query(f) => SqlState::parse(&f.code).unwrap_or(SqlState::PROTOCOL_VIOLATION),
            _ => SqlState::PROTOCOL_VIOLATION,
        }
    }

    /// What the client is told: the kind of trouble, not the server's words (the client
    /// has not logged in; the log has the details).
    pub fn client_message(&self) -> &'static str {
        match self {
            LookupError::Login(_) => "auth_query lookup failed: auth_user could not log in",
            LookupError::Query(_) => "auth_query lookup failed: the query failed",
            LookupError::Lost(_) => "auth_query lookup failed: no answer from the server",
            LookupError::Answer(_) => "auth_query lookup failed: unusable answer",
        }
    }
}

/// Where a lookup runs; each has one lookup connection per worker.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Source {
    host: String,
    port: u16,
    dbname: String,
    user: String,
}

impl Source {
    fn of(target: &ServerTarget) -> Source {
        Source {
            host: target.host.clone(),
            port: target.port,
            dbname: target.dbname.clone(),
            user: target.user.clone(),
        }
    }
}

#[derive(PartialEq, Eq, Hash)]
struct AnswerKey {
    source: Source,
    query: String,
    user: String,
}

/// One source's lookup connection, used by one lookup at a time.
#[derive(Default)]
struct Lane {
    busy: Cell<bool>,
    /// Lookups waiting for their turn; all are woken when a turn ends, and the first to
    /// run takes it (a waiter whose login gave up meanwhile cannot swallow the wake-up).
    waiters: RefCell<Vec<Waker>>,
    /// The connection between lookups, with the reset generation it was opened in.
    idle: RefCell<Option<(ServerConn, u64)>>,
}

/// A lookup's turn on its lane; ends when dropped, however the lookup ends.
struct Turn(Rc<Lane>);

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.busy.set(false);
        for w in self.0.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

impl Lane {
    async fn turn(self: &Rc<Self>) -> Turn {
        std::future::poll_fn(|cx| {
            if self.busy.get() {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            } else {
                self.busy.set(true);
                Poll::Ready(())
            }
        })
        .await;
        Turn(self.clone())
    }
}

/// A worker's lookup connections and the secrets they found.
#[derive(Default)]
pub struct AuthLookups {
    lanes: RefCell<HashMap<Source, Rc<Lane>>>,
    answers: RefCell<HashMap<AnswerKey, (Instant, Secret)>>,
    /// Bumped by `reset`: connections opened before are closed when their lookup ends.
    generation: Cell<u64>,
}

impl AuthLookups {
    /// The user's secret: `None` when the query found no row, or NULL (an expired role,
    /// or one without a password). The caller treats `None` as a wrong password.
    pub async fn lookup(&self, q: &AuthQuery, user: &str, worker: usize) -> Result<Option<Secret>, LookupError> {
        let key = AnswerKey {
            source: Source::of(&q.target),
            query: q.query.clone(),
            user: user.to_string(),
        };
        if let Some(secret) = self.remembered(&key) {
            return Ok(Some(secret));
        }
        let lane = self.lanes.borrow_mut().entry(key.source.clone()).or_default().clone();
        let _turn = lane.turn().await;
        // The lookup before this one may have asked for the same user.
        if let Some(secret) = self.remembered(&key) {
            return Ok(Some(secret));
        }
        let generation = self.generation.get();
        let idle = lane.idle.borrow_mut().take();
        let mut reused = match idle {
            Some((conn, g)) if g == generation && conn.is_alive() => Some(conn),
            _ => None,
        };
        loop {
            let was_reused = reused.is_some();
            let mut conn = match reused.take() {
                Some(conn) => conn,
                None => connect(&q.target, q.client_key, &q.database, worker)
                    .await
                    .map_err(LookupError::Login)?,
            };
            conn.meta.mark(ConnState::Active, 0);
            let answer = match monoio::time::timeout(q.target.connect_timeout, run(&mut conn, &q.query, user)).await {
                Ok(Ok(answer)) => answer,
                // An idle connection the server closed since (a restart): once more, on a
                // fresh one.
                Ok(Err(LookupError::Lost(_))) if was_reused => continue,
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(LookupError::Lost(format!(
                        "no answer within {:?} (server_connect_timeout)",
                        q.target.connect_timeout
                    )))
                }
            };
            if conn.meta.tx_status == b'I' && generation == self.generation.get() {
                conn.meta.last_used = Instant::now();
                conn.meta.mark(ConnState::Idle, 0);
                *lane.idle.borrow_mut() = Some((conn, generation));
            }
            let secret = answer.into_secret(user)?;
            // An answer asked for before a reload may be stale already.
            if let Some(secret) = secret.as_ref().filter(|_| generation == self.generation.get()) {
                self.remember(key, secret.clone());
            }
            return Ok(secret);
        }
    }

    /// Forgets the user's secret (a client failed to log in with it: the password may
    /// have changed).
    pub fn forget(&self, q: &AuthQuery, user: &str) {
        let key = AnswerKey {
            source: Source::of(&q.target),
            query: q.query.clone(),
            user: user.to_string(),
        };
        self.answers.borrow_mut().remove(&key);
    }

    /// RELOAD: every secret forgotten, every lookup connection closed (auth_user's
    /// secret, the servers or TLS settings may have changed).
    pub fn reset(&self) {
        self.generation.set(self.generation.get() + 1);
        self.answers.borrow_mut().clear();
        self.close_idle(|_| true);
    }

    /// Periodic upkeep: idle lookup connections past server_idle_timeout or
    /// server_lifetime are closed (zero: never), expired secrets forgotten.
    pub fn close_expired(&self, idle_timeout: Option<Duration>, lifetime: Duration) {
        self.answers.borrow_mut().retain(|_, (at, _)| at.elapsed() < ANSWER_TTL);
        self.close_idle(|conn| {
            let m = &conn.meta;
            idle_timeout.is_some_and(|t| m.last_used.elapsed() >= t)
                || (!lifetime.is_zero() && m.created.elapsed() >= lifetime)
                || !conn.is_alive()
        });
    }

    /// Shutdown: every idle lookup connection closed.
    pub fn close_all(&self) {
        self.close_idle(|_| true);
    }

    fn close_idle(&self, close: impl Fn(&ServerConn) -> bool) {
        let mut lanes = self.lanes.borrow_mut();
        for (source, lane) in lanes.iter() {
            let mut idle = lane.idle.borrow_mut();
            if idle.as_ref().is_some_and(|(conn, _)| close(conn)) {
                if let Some((conn, _)) = idle.take() {
                    log::info!(
                        "S-{}: {}/{} closing auth_query connection",
                        conn.meta.id,
                        source.dbname,
                        source.user
                    );
                }
            }
        }
        lanes.retain(|_, lane| lane.busy.get() || lane.idle.borrow().is_some() || !lane.waiters.borrow().is_empty());
    }

    fn remembered(&self, key: &AnswerKey) -> Option<Secret> {
        let answers = self.answers.borrow();
        let (at, secret) = answers.get(key)?;
        (at.elapsed() < ANSWER_TTL).then(|| secret.clone())
    }

    fn remember(&self, key: AnswerKey, secret: Secret) {
        let mut answers = self.answers.borrow_mut();
        if answers.len() >= ANSWER_LIMIT {
            answers.retain(|_, (at, _)| at.elapsed() < ANSWER_TTL);
            if answers.len() >= ANSWER_LIMIT {
                answers.clear();
            }
        }
        answers.insert(key, (Instant::now(), secret));
    }
}

/// What the server answered.
#[derive(Debug, Default, PartialEq)]
struct Answer {
    error: Option<ErrorFields>,
    rows: usize,
    /// The first row's column count and second column (None: NULL).
    first: Option<(usize, Option<Vec<u8>>)>,
}

impl Answer {
    fn into_secret(self, user: &str) -> Result<Option<Secret>, LookupError> {
        if let Some(e) = self.error {
            return Err(LookupError::Query(e));
        }
        let Some((columns, value)) = self.first else {
            return Ok(None);
        };
        if self.rows > 1 {
            return Err(LookupError::Answer(format!(
                "{} rows for user \"{user}\"; it must return one row at most",
                self.rows
            )));
        }
        if columns < 2 {
            return Err(LookupError::Answer(format!(
                "{columns} column(s); it must return the user name and the secret"
            )));
        }
        // PostgreSQL keeps no empty passwords: empty is no password.
        let Some(text) = value.filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        match std::str::from_utf8(&text).ok().map(Secret::parse) {
            Some(Ok(secret)) => Ok(Some(secret)),
            // Like a role whose password cannot be used: the user cannot log in.
            _ => {
                log::warn!("auth_query: the secret of user \"{user}\" is malformed; the user cannot log in");
                Ok(None)
            }
        }
    }
}

/// Runs the query with `user` as `$1` and reads up to ReadyForQuery.
async fn run(conn: &mut ServerConn, sql: &str, user: &str) -> Result<Answer, LookupError> {
    let lost = |e: crate::protocol::io::WireError| LookupError::Lost(e.to_string());
    let mut out = Vec::with_capacity(sql.len() + user.len() + 48);
    frontend::parse(&mut out, sql);
    frontend::bind(&mut out, &[Some(user.as_bytes())]);
    frontend::execute(&mut out);
    frontend::sync(&mut out);
    let (res, _) = write_out(&mut conn.wr, out).await;
    res.map_err(lost)?;
    let mut buf = MsgBuf::with_capacity(512);
    let mut answer = Answer::default();
    loop {
        let (res, back) = read_message(&mut conn.rd, buf, INTERNAL_MESSAGE_LIMIT).await;
        buf = back;
        let h = res.map_err(lost)?;
        let body = &buf.data()[5..h.total()];
        match h.tag {
            b'Z' => {
                conn.meta.tx_status = body.first().copied().unwrap_or(b'I');
                return Ok(answer);
            }
            b'D' => {
                answer.rows += 1;
                if answer.first.is_none() {
                    let row = second_column(body).ok_or_else(|| LookupError::Lost("malformed DataRow".into()))?;
                    answer.first = Some(row);
                }
            }
            b'E' => answer.error = Some(ErrorFields::parse(body)),
            b'S' => {
                if let Some((name, value)) = parse_parameter_status(body) {
                    conn.meta.settings.set(name, value);
                }
            }
            // A COPY would wait for data pgsilo never sends.
            b'G' | b'H' | b'W' => {
                return Err(LookupError::Answer("it must not run COPY".into()));
            }
            // ParseComplete, BindComplete, CommandComplete, notices.
            _ => {}
        }
        buf.consume(h.total());
    }
}

/// A DataRow's column count and second value (None: NULL or absent). None if malformed.
fn second_column(body: &[u8]) -> Option<(usize, Option<Vec<u8>>)> {
    let count = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let columns = usize::try_from(count).ok()?;
    let mut at = 2;
    let mut second = None;
    for i in 0..columns {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        let value = match usize::try_from(len) {
            Ok(n) => {
                let v = body.get(at..at + n)?;
                at += n;
                Some(v)
            }
            Err(_) => None,
        };
        if i == 1 {
            second = value.map(<[u8]>::to_vec);
        }
    }
    Some((columns, second))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_row(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = Vec::new();
        crate::protocol::backend::data_row(&mut out, values.iter().copied());
        out[5..].to_vec()
    }

    #[test]
    fn the_secret_is_the_second_column() {
        let row = data_row(&[Some("alice"), Some("md5abc")]);
        assert_eq!(second_column(&row), Some((2, Some(b"md5abc".to_vec()))));
        assert_eq!(second_column(&data_row(&[Some("alice"), None])), Some((2, None)));
        assert_eq!(second_column(&data_row(&[Some("alice")])), Some((1, None)));
        // Truncated: a length beyond the body.
        assert_eq!(second_column(&row[..row.len() - 1]), None);
        assert_eq!(second_column(&[0]), None);
    }

    #[test]
    fn answers_become_secrets_or_nothing() {
        let md5 = "md5ABCDEF0123456789abcdef0123456789";
        let one = |value: Option<&str>| Answer {
            error: None,
            rows: 1,
            first: Some((2, value.map(|v| v.as_bytes().to_vec()))),
        };
        assert!(matches!(one(Some(md5)).into_secret("u"), Ok(Some(Secret::Md5(_)))));
        assert!(matches!(
            one(Some("pencil")).into_secret("u"),
            Ok(Some(Secret::Plain(_)))
        ));
        // NULL (expired, no password), empty, malformed, no row: no secret.
        assert!(matches!(one(None).into_secret("u"), Ok(None)));
        assert!(matches!(one(Some("")).into_secret("u"), Ok(None)));
        assert!(matches!(one(Some("SCRAM-SHA-256$x")).into_secret("u"), Ok(None)));
        assert!(matches!(Answer::default().into_secret("u"), Ok(None)));

        let two_rows = Answer {
            rows: 2,
            ..one(Some(md5))
        };
        assert!(matches!(two_rows.into_secret("u"), Err(LookupError::Answer(_))));
        let narrow = Answer {
            first: Some((1, None)),
            ..one(None)
        };
        assert!(matches!(narrow.into_secret("u"), Err(LookupError::Answer(_))));
        let failed = Answer {
            error: Some(ErrorFields {
                code: "42501".into(),
                message: "permission denied for table pg_authid".into(),
                ..ErrorFields::default()
            }),
            ..Answer::default()
        };
        let e = failed.into_secret("u").unwrap_err();
        assert_eq!(e.sqlstate(), SqlState(*b"42501"));
        assert!(e.to_string().contains("permission denied"), "{e}");
        assert!(!e.client_message().contains("pg_authid"));
        assert_eq!(
            LookupError::Lost("gone".into()).sqlstate(),
            SqlState::PROTOCOL_VIOLATION
        );
    }

    #[monoio::test(timer_enabled = true)]
    async fn a_turn_ends_when_dropped_and_wakes_the_next_lookup() {
        let lane = Rc::new(Lane::default());
        let first = lane.turn().await;
        let next = {
            let lane = lane.clone();
            monoio::spawn(async move {
                let _turn = lane.turn().await;
            })
        };
        monoio::time::sleep(Duration::from_millis(5)).await;
        assert!(lane.busy.get() && lane.waiters.borrow().len() == 1);
        drop(first);
        next.await;
        assert!(!lane.busy.get());
    }
}
