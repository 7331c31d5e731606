//! The admin console: the virtual database `pgsilo` (alias `pgbouncer`), speaking
//! PgBouncer's commands and column names so its tools work unchanged.

mod acquire;
mod actions;
pub mod command;
mod result;
mod show;

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;

use crate::net::Stream;

use crate::context::WorkerCtx;
use crate::protocol::backend::{self, Severity};
use crate::protocol::framing::read_cstr;
use crate::protocol::io::{read_message, write_out, WireError};
use crate::protocol::{MsgBuf, SqlState};
use crate::proxy::login::AdminLogin;
use command::Command;
use result::{Outcome, ResultSet};

const ADMIN_MESSAGE_LIMIT: u32 = 1 << 20;
/// The database name console sessions are listed under for shutdown signals (KILL
/// only names configured databases, so it never matches).
const ADMIN_DATABASE: &str = "pgsilo";

pub async fn serve(ctx: Rc<WorkerCtx>, mut stream: Stream, who: AdminLogin) {
    who.entry.entry.set_state(crate::metrics::ConnState::Active);
    let mut buf = MsgBuf::with_capacity(1024);
    let mut out = Vec::with_capacity(4096);
    // Extended protocol: the statement text of the last Parse, its result once run,
    // and whether an error is skipping messages until Sync.
    let mut statement = String::new();
    let mut described: Option<Outcome> = None;
    let mut failed = false;
    // Result format codes of the last Bind (tokio-postgres and JDBC ask for binary).
    let mut formats: Vec<i16> = Vec::new();
    // Shutdown reaches the console too: an idle console session must not hold a
    // SIGTERM/SHUTDOWN (which waits for clients to leave) until shutdown_timeout.
    let signal = ctx.sessions.add(ADMIN_DATABASE);
    loop {
        let read = {
            let mut read = pin!(read_message(&mut stream, buf, ADMIN_MESSAGE_LIMIT));
            let mut seen = signal.seen_now();
            poll_fn(|cx| {
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                // Only kill and drain end a console session; a quiet console also gets
                // asked to shrink, which it has nothing to shrink for.
                while signal.poll_changed(cx, &mut seen).is_ready() {
                    if signal.killed().is_some() || signal.draining() {
                        return Poll::Ready(None);
                    }
                }
                Poll::Pending
            })
            .await
        };
        // Waiting for a command is always between transactions: close at once.
        let Some((res, back)) = read else {
            backend::error_response(
                &mut out,
                Severity::Fatal,
                SqlState::ADMIN_SHUTDOWN,
                signal.killed().unwrap_or(crate::context::control::SHUTTING_DOWN),
            );
            let _ = write_out(&mut stream, out).await;
            return;
        };
        buf = back;
        let h = match res {
            Ok(h) => h,
            Err(WireError::Protocol(e)) => {
                backend::error_response(&mut out, Severity::Fatal, SqlState::PROTOCOL_VIOLATION, &e.to_string());
                let _ = write_out(&mut stream, out).await;
                return;
            }
            Err(_) => return,
        };
        let body = buf.data()[5..h.total()].to_vec();
        buf.consume(h.total());
        match h.tag {
            b'Q' => {
                let text = read_cstr(&body, 0)
                    .map(|(t, _)| String::from_utf8_lossy(t).into_owned())
                    .unwrap_or_default();
                for part in text.split(';') {
                    if part.trim().is_empty() {
                        continue;
                    }
                    match run(&ctx, &who, part).await {
                        Ok(o) => write_outcome(&mut out, &o, true, &[]),
                        Err((code, msg)) => {
                            backend::error_response(&mut out, Severity::Error, code, &msg);
                            break;
                        }
                    }
                }
                if text.trim().trim_matches(';').trim().is_empty() {
                    backend::empty_query_response(&mut out);
                }
                backend::ready_for_query(&mut out, b'I');
            }
            b'P' if !failed => {
                // Parse: name, query, parameter types. Only the query matters.
                statement = read_cstr(&body, 0)
                    .and_then(|(_, at)| read_cstr(&body, at))
                    .map(|(q, _)| String::from_utf8_lossy(q).into_owned())
                    .unwrap_or_default();
                described = None;
                backend::message(&mut out, b'1', |_| {});
            }
            b'B' if !failed => {
                formats = result::bind_result_formats(&body);
                backend::message(&mut out, b'2', |_| {});
            }
            b'D' if !failed => match run(&ctx, &who, &statement).await {
                Ok(o) => {
                    if body.first() == Some(&b'S') {
                        backend::message(&mut out, b't', |b| b.extend_from_slice(&0u16.to_be_bytes()));
                    }
                    match &o {
                        Outcome::Rows(rs) if body.first() == Some(&b'P') => {
                            rs.write_portal_description(&mut out, &formats)
                        }
                        Outcome::Rows(rs) => rs.write_description(&mut out),
                        _ => backend::message(&mut out, b'n', |_| {}),
                    }
                    described = Some(o);
                }
                Err((code, msg)) => {
                    backend::error_response(&mut out, Severity::Error, code, &msg);
                    failed = true;
                }
            },
            b'E' if !failed => {
                let o = match described.take() {
                    Some(o) => Ok(o),
                    None => run(&ctx, &who, &statement).await,
                };
                match o {
                    Ok(o) => write_outcome(&mut out, &o, false, &formats),
                    Err((code, msg)) => {
                        backend::error_response(&mut out, Severity::Error, code, &msg);
                        failed = true;
                    }
                }
            }
            b'C' if !failed => backend::message(&mut out, b'3', |_| {}),
            b'S' => {
                failed = false;
                backend::ready_for_query(&mut out, b'I');
            }
            b'H' | b'P' | b'B' | b'D' | b'E' | b'C' => {}
            b'X' => return,
            other => {
                let msg = format!("unsupported message type '{}' on the admin console", other as char);
                backend::error_response(&mut out, Severity::Error, SqlState::PROTOCOL_VIOLATION, &msg);
                backend::ready_for_query(&mut out, b'I');
            }
        }
        if matches!(h.tag, b'Q' | b'S' | b'H') || !matches!(h.tag, b'P' | b'B' | b'D' | b'E' | b'C') {
            let (res, back) = write_out(&mut stream, std::mem::take(&mut out)).await;
            out = back;
            if res.is_err() {
                return;
            }
        }
        if ctx.instance.phase() >= crate::context::Phase::Exiting {
            return;
        }
    }
}

fn write_outcome(out: &mut Vec<u8>, o: &Outcome, with_description: bool, formats: &[i16]) {
    match o {
        Outcome::Rows(rs) => {
            if with_description {
                rs.write_description(out);
            }
            rs.write_rows_as(out, formats);
        }
        Outcome::Done(tag) => backend::command_complete(out, tag),
        Outcome::Notice(lines, tag) => {
            for l in lines {
                backend::notice_response(out, l);
            }
            backend::command_complete(out, tag);
        }
    }
}

async fn run(ctx: &Rc<WorkerCtx>, who: &AdminLogin, text: &str) -> Result<Outcome, (SqlState, String)> {
    let cmd = command::parse(text).map_err(|e| (SqlState::SYNTAX_ERROR, e.0))?;
    let instance = &ctx.instance;
    let needs_admin = !matches!(cmd, Command::Show(_) | Command::Empty);
    if needs_admin && !who.can_act {
        return Err((SqlState::INSUFFICIENT_PRIVILEGE, "admin access needed".into()));
    }
    let bad = |e: String| (SqlState::INVALID_PARAMETER_VALUE, e);
    match cmd {
        Command::Empty => Ok(Outcome::Rows(ResultSet::new(&[]))),
        Command::Show(what) => show::show(instance, &what).map_err(|e| (SqlState::SYNTAX_ERROR, e)),
        Command::Reload => {
            log::info!("RELOAD command issued by {} on the admin console", who.user);
            actions::reload(instance);
            Ok(Outcome::Done("RELOAD"))
        }
        Command::Pause(db) => {
            log::info!("PAUSE {} issued by {}", db.as_deref().unwrap_or("(all)"), who.user);
            actions::pause(instance, db.as_deref()).await.map_err(bad)?;
            Ok(Outcome::Done("PAUSE"))
        }
        Command::Resume(db) => {
            actions::resume(instance, db.as_deref()).map_err(bad)?;
            Ok(Outcome::Done("RESUME"))
        }
        Command::Kill(db) => {
            log::info!("KILL {db} issued by {}", who.user);
            actions::kill(instance, &db).map_err(bad)?;
            Ok(Outcome::Done("KILL"))
        }
        Command::Shutdown => {
            log::info!("SHUTDOWN issued by {} on the admin console", who.user);
            actions::shutdown();
            Ok(Outcome::Done("SHUTDOWN"))
        }
        Command::Set(_) => Err((
            SqlState::FEATURE_NOT_SUPPORTED,
            "SET is not supported; edit the config file and RELOAD".into(),
        )),
    }
}
