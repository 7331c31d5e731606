//! The session's timeouts (PgBouncer's client_idle_timeout, idle_transaction_timeout,
//! query_timeout, query_wait_timeout) and the ROLLBACK of a departed client: which one the
//! session timer is armed for, and what the client is told when it passes.
//!
//! A wait for a server has two: query_wait_timeout, and the moment to start watching the
//! client for a hang-up ([`PROBE_AFTER`]). Both ride on the session's one timer, so a
//! wait costs no timer of the pool's and, when it is short (the common case under a
//! saturated pool), no readiness operation in the kernel either.

use std::time::{Duration, Instant};

use super::{Flow, Timing};
use crate::protocol::SqlState;

/// PgBouncer's session timeouts; None is disabled.
pub(super) struct Timeouts {
    pub(super) client_idle: Option<Duration>,
    pub(super) idle_transaction: Option<Duration>,
    pub(super) query: Option<Duration>,
    pub(super) query_wait: Option<Duration>,
}

/// How long a client waits for a server before pgsilo watches its socket for a hang-up.
/// Most waits under a saturated pool last a few milliseconds: arming a readiness poll for
/// each and calling it off again cost more than the rest of the wait's bookkeeping. A
/// client that hangs up is noticed this much later, and a server granted to it meanwhile
/// goes back to the pool once its read sees the end.
pub(super) const PROBE_AFTER: Duration = Duration::from_millis(100);

/// Which deadline the session timer is armed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Deadline {
    /// A departed client's ROLLBACK is taking too long.
    Rollback,
    ClientIdle,
    IdleTransaction,
    Query,
    /// query_wait_timeout: the client waited too long for a server.
    QueryWait,
    /// Not an error: time to watch a waiting client's socket for a hang-up.
    WaitProbe,
}

impl Deadline {
    /// The error (SQLSTATE and setting) the session ends with when this deadline passes;
    /// None for a departed client's ROLLBACK, which only closes the server.
    pub(super) fn client_error(self) -> Option<(SqlState, &'static str)> {
        match self {
            Deadline::Rollback | Deadline::WaitProbe => None,
            Deadline::ClientIdle => Some((SqlState::IDLE_SESSION_TIMEOUT, "client_idle_timeout")),
            Deadline::IdleTransaction => Some((SqlState::IDLE_IN_TRANSACTION_TIMEOUT, "idle_transaction_timeout")),
            Deadline::Query => Some((SqlState::QUERY_CANCELED, "query_timeout")),
            Deadline::QueryWait => Some((SqlState::PROTOCOL_VIOLATION, "query_wait_timeout")),
        }
    }
}

/// Where the session stands, as far as its deadlines care.
#[derive(Clone, Copy, Debug)]
struct Standing {
    client_gone: bool,
    /// The server owes nothing and the client has sent nothing not yet dealt with.
    between_requests: bool,
    attached: bool,
}

impl Timing {
    /// The deadline that applies in the session's current state. At most one does: they
    /// belong to different states, checked in order.
    fn next_deadline(&self, now: Standing) -> Option<(Instant, Deadline)> {
        if let Some(d) = self.rollback_deadline {
            return Some((d, Deadline::Rollback));
        }
        if now.client_gone {
            return None;
        }
        let t = &self.timeouts;
        if let Some(since) = self.wait_started {
            let give_up = t.query_wait.map(|d| (since + d, Deadline::QueryWait));
            if self.probing {
                return give_up;
            }
            let probe = (since + PROBE_AFTER, Deadline::WaitProbe);
            return Some(give_up.filter(|g| g.0 <= probe.0).unwrap_or(probe));
        }
        if now.between_requests {
            return t.client_idle.map(|d| (self.last_activity + d, Deadline::ClientIdle));
        }
        // The remaining deadlines are about a server's transaction or request.
        if !now.attached {
            return None;
        }
        if let (Some(d), Some(start)) = (t.query, self.req_started) {
            return Some((start + d, Deadline::Query));
        }
        if let (Some(d), Some(since)) = (t.idle_transaction, self.quiet_since) {
            return Some((since + d, Deadline::IdleTransaction));
        }
        None
    }
}

impl Flow {
    /// The deadline the session timer should be armed for now.
    pub(super) fn next_deadline(&self) -> Option<(Instant, Deadline)> {
        self.timing.next_deadline(Standing {
            client_gone: self.client.gone,
            between_requests: self.tracker.is_idle() && self.up.buf.as_ref().is_none_or(|b| b.is_empty()),
            attached: self.server.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn timing(client_idle: u64, idle_transaction: u64, query: u64) -> Timing {
        let on = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Timing {
            timeouts: Timeouts {
                client_idle: on(client_idle),
                idle_transaction: on(idle_transaction),
                query: on(query),
                query_wait: None,
            },
            last_activity: Instant::now(),
            quiet_since: None,
            req_started: None,
            xact_started: None,
            wait_started: None,
            probing: false,
            rollback_deadline: None,
        }
    }

    const BETWEEN: Standing = Standing {
        client_gone: false,
        between_requests: true,
        attached: false,
    };
    const BUSY: Standing = Standing {
        client_gone: false,
        between_requests: false,
        attached: true,
    };
    const GONE: Standing = Standing {
        client_gone: true,
        between_requests: false,
        attached: true,
    };

    #[test]
    fn between_requests_only_client_idle_timeout_counts_from_the_clients_last_bytes() {
        let t = timing(30, 5, 7);
        assert_eq!(
            t.next_deadline(BETWEEN),
            Some((t.last_activity + 30 * SEC, Deadline::ClientIdle))
        );
        // With a server attached and a transaction quiet: still the client's business.
        let mut t = timing(30, 5, 0);
        t.quiet_since = Some(t.last_activity);
        let attached = Standing {
            attached: true,
            ..BETWEEN
        };
        assert_eq!(t.next_deadline(attached).map(|(_, d)| d), Some(Deadline::ClientIdle));
        assert_eq!(timing(0, 5, 7).next_deadline(BETWEEN), None);
    }

    #[test]
    fn a_request_in_flight_counts_query_timeout_from_when_it_was_sent() {
        let mut t = timing(30, 5, 7);
        let sent = t.last_activity + SEC;
        t.req_started = Some(sent);
        assert_eq!(t.next_deadline(BUSY), Some((sent + 7 * SEC, Deadline::Query)));
    }

    #[test]
    fn a_quiet_open_transaction_counts_idle_transaction_timeout_from_when_it_went_quiet() {
        let mut t = timing(30, 5, 7);
        let quiet = t.last_activity + 2 * SEC;
        t.quiet_since = Some(quiet);
        assert_eq!(
            t.next_deadline(BUSY),
            Some((quiet + 5 * SEC, Deadline::IdleTransaction))
        );
        // Disabled: nothing.
        let mut t = timing(30, 0, 7);
        t.quiet_since = Some(quiet);
        assert_eq!(t.next_deadline(BUSY), None);
    }

    #[test]
    fn without_a_server_no_query_or_transaction_deadline_applies() {
        let mut t = timing(30, 5, 7);
        t.req_started = Some(t.last_activity);
        t.quiet_since = Some(t.last_activity);
        let unattached = Standing {
            attached: false,
            ..BUSY
        };
        assert_eq!(t.next_deadline(unattached), None);
    }

    #[test]
    fn a_wait_for_a_server_first_arms_the_hang_up_watch_then_query_wait_timeout() {
        let mut t = timing(30, 5, 7);
        t.timeouts.query_wait = Some(120 * SEC);
        let since = t.last_activity;
        t.wait_started = Some(since);
        t.req_started = Some(since);
        // Neither client_idle_timeout nor query_timeout counts while waiting.
        assert_eq!(
            t.next_deadline(BETWEEN),
            Some((since + PROBE_AFTER, Deadline::WaitProbe))
        );
        assert_eq!(t.next_deadline(BUSY), Some((since + PROBE_AFTER, Deadline::WaitProbe)));
        t.probing = true;
        assert_eq!(t.next_deadline(BUSY), Some((since + 120 * SEC, Deadline::QueryWait)));
        // A query_wait_timeout shorter than the watch's delay comes first.
        t.probing = false;
        t.timeouts.query_wait = Some(Duration::from_millis(50));
        assert_eq!(
            t.next_deadline(BUSY),
            Some((since + Duration::from_millis(50), Deadline::QueryWait))
        );
        // query_wait_timeout = 0: the wait has no end, only the watch.
        t.timeouts.query_wait = None;
        assert_eq!(t.next_deadline(BUSY), Some((since + PROBE_AFTER, Deadline::WaitProbe)));
        t.probing = true;
        assert_eq!(t.next_deadline(BUSY), None);
    }

    #[test]
    fn a_departed_clients_rollback_deadline_is_the_only_one_left() {
        let mut t = timing(30, 5, 7);
        t.req_started = Some(t.last_activity);
        assert_eq!(t.next_deadline(GONE), None);
        let at = t.last_activity + 10 * SEC;
        t.rollback_deadline = Some(at);
        assert_eq!(t.next_deadline(GONE), Some((at, Deadline::Rollback)));
        assert_eq!(t.next_deadline(BUSY), Some((at, Deadline::Rollback)));
    }

    #[test]
    fn each_timeout_ends_the_session_with_its_own_sqlstate() {
        assert_eq!(Deadline::Rollback.client_error(), None);
        assert_eq!(
            Deadline::ClientIdle.client_error(),
            Some((SqlState::IDLE_SESSION_TIMEOUT, "client_idle_timeout"))
        );
        assert_eq!(
            Deadline::IdleTransaction.client_error(),
            Some((SqlState::IDLE_IN_TRANSACTION_TIMEOUT, "idle_transaction_timeout"))
        );
        assert_eq!(
            Deadline::Query.client_error(),
            Some((SqlState::QUERY_CANCELED, "query_timeout"))
        );
        // As the pool's own wait timeout said it (PgBouncer: 08P01).
        assert_eq!(
            Deadline::QueryWait.client_error(),
            Some((SqlState::PROTOCOL_VIOLATION, "query_wait_timeout"))
        );
        assert_eq!(Deadline::WaitProbe.client_error(), None);
    }
}
