//! Telling sessions about events they do not see on their sockets: KILL from the admin
//! console, and the shutdown phases. The main thread (or an admin session) sends a
//! [`ControlMsg`] to every worker; each worker flags the affected sessions and wakes them.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

pub enum ControlMsg {
    /// The instance moved to a new shutdown phase.
    Phase(Phase),
    /// Drop every client of a database (all databases with None) and its servers.
    Kill { database: Option<String> },
    /// Close idle servers of a database (all with None), e.g. after PAUSE.
    CloseIdle { database: Option<String> },
    /// Paused pools resumed: give waiting clients a chance.
    Kick,
    /// The configuration was reloaded: re-read per-worker settings.
    Reload,
    /// A NotificationResponse (or NoticeResponse) of a pool's LISTEN connection for
    /// these clients (by client id) of the worker.
    Notify { to: Vec<u64>, msg: std::sync::Arc<[u8]> },
}

/// Shutdown phases, in order. Workers poll this; signals and the admin console set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Running = 0,
    /// SIGINT: stop accepting, let clients finish their work, then exit.
    Draining = 1,
    /// SIGTERM: stop accepting, close each client when its transaction ends.
    Closing = 2,
    /// Exit now.
    Exiting = 3,
}

/// What a session is told, read and cleared by the session itself.
pub struct SessionSignal {
    pub database: String,
    /// When the session started (its client had logged in).
    born: Instant,
    /// End now, telling the client why.
    kill: Cell<Option<&'static str>>,
    /// End at the next moment the client has no transaction open.
    drain: Cell<bool>,
    /// The client has been quiet for a while: drop the forwarding state and wait cheaply.
    shrink: Cell<bool>,
    /// Bumped by the session on client activity; the worker's tick compares it.
    activity: Cell<u64>,
    seen_activity: Cell<u64>,
    /// Notifications for the client, whole messages, written between its transactions.
    notes: RefCell<Vec<u8>>,
    /// Bumped with each notification queued.
    noted: Cell<u64>,
    waker: Cell<Option<Waker>>,
}

/// What a session has already acted on, for [`SessionSignal::poll_changed`].
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    kill: bool,
    drain: bool,
    shrink: bool,
    noted: u64,
}

impl SessionSignal {
    pub fn new(database: &str) -> SessionSignal {
        SessionSignal {
            database: database.to_string(),
            born: Instant::now(),
            kill: Cell::new(None),
            drain: Cell::new(false),
            shrink: Cell::new(false),
            activity: Cell::new(0),
            seen_activity: Cell::new(0),
            notes: RefCell::new(Vec::new()),
            noted: Cell::new(0),
            waker: Cell::new(None),
        }
    }

    pub fn kill(&self, why: &'static str) {
        self.kill.set(Some(why));
        self.wake();
    }

    /// Queues a notification for the client and wakes the session.
    pub fn note(&self, msg: &[u8]) {
        let mut notes = self.notes.borrow_mut();
        if notes.len() + msg.len() > NOTE_QUEUE_LIMIT {
            // A client that does not take its notifications would hold memory without
            // bound; PostgreSQL's own queue is bounded too.
            drop(notes);
            self.kill(NOTES_OVERFLOW);
            return;
        }
        notes.extend_from_slice(msg);
        drop(notes);
        self.noted.set(self.noted.get().wrapping_add(1));
        self.wake();
    }

    pub fn has_notes(&self) -> bool {
        !self.notes.borrow().is_empty()
    }

    /// The queued notifications, in order; the queue is left empty.
    pub fn take_notes(&self) -> Vec<u8> {
        std::mem::take(&mut *self.notes.borrow_mut())
    }

    pub fn drain(&self) {
        self.drain.set(true);
        self.wake();
    }

    /// The session saw client activity (costs a non-atomic increment).
    #[inline]
    pub fn active(&self) {
        self.activity.set(self.activity.get().wrapping_add(1));
    }

    /// The worker's periodic tick: a session with no activity since the last tick is
    /// asked to shrink.
    pub fn tick(&self) {
        let now = self.activity.get();
        if now == self.seen_activity.get() {
            if !self.shrink.get() {
                self.shrink.set(true);
                self.wake();
            }
        } else {
            self.seen_activity.set(now);
        }
    }

    /// The current state, for a waiter that should only hear about later changes.
    pub fn seen_now(&self) -> Seen {
        Seen {
            kill: self.kill.get().is_some(),
            drain: self.drain.get(),
            shrink: self.shrink.get(),
            noted: self.noted.get(),
        }
    }

    /// Whether a shrink is pending; reading it clears it.
    pub fn take_shrink(&self) -> bool {
        self.shrink.replace(false)
    }

    pub fn killed(&self) -> Option<&'static str> {
        self.kill.get()
    }

    pub fn draining(&self) -> bool {
        self.drain.get()
    }

    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Ready whenever a signal is set that the session has not yet acted on; `seen`
    /// remembers what it has acted on.
    pub fn poll_changed(&self, cx: &mut Context<'_>, seen: &mut Seen) -> Poll<()> {
        let now = Seen {
            kill: self.kill.get().is_some(),
            drain: self.drain.get(),
            shrink: self.shrink.get(),
            noted: self.noted.get(),
        };
        if now != *seen {
            *seen = now;
            return Poll::Ready(());
        }
        self.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

/// The sessions of one worker.
#[derive(Default)]
pub struct Sessions {
    list: RefCell<Vec<Weak<SessionSignal>>>,
    /// The latest shutdown phase this worker has acted on. A session that starts later
    /// (a client accepted before the shutdown that finished logging in after it) gets
    /// the same treatment as those that were there.
    shutdown: Cell<Option<Phase>>,
    /// Sessions that LISTEN through the pool's listener, by client id.
    pub subscribers: Rc<Subscribers>,
}

/// A worker's listening sessions, by client id, for [`ControlMsg::Notify`].
#[derive(Default)]
pub struct Subscribers(RefCell<std::collections::HashMap<u64, Weak<SessionSignal>>>);

impl Subscribers {
    pub fn add(&self, client: u64, signal: &Rc<SessionSignal>) {
        self.0.borrow_mut().insert(client, Rc::downgrade(signal));
    }

    pub fn remove(&self, client: u64) {
        self.0.borrow_mut().remove(&client);
    }

    /// Queues `msg` for each of `to` still here.
    pub fn notify(&self, to: &[u64], msg: &[u8]) {
        let mut map = self.0.borrow_mut();
        for c in to {
            match map.get(c).and_then(|w| w.upgrade()) {
                Some(s) => s.note(msg),
                None => {
                    map.remove(c);
                }
            }
        }
    }
}

/// Notifications queued for one client and not yet written, at most.
pub const NOTE_QUEUE_LIMIT: usize = 16 << 20;
/// Why a client whose queue of notifications overflowed is closed.
pub const NOTES_OVERFLOW: &str = "the client did not read its notifications (16 MiB queued)";

/// What a session is told in each shutdown phase.
pub const SHUTTING_DOWN: &str = "pgsilo is shutting down";

/// How long a session that has just logged in may go on before a shutdown drain closes
/// it. A client that connects for one query (the common pattern behind a takeover's
/// "no connection fails") sends it right after its login; closing it in between would
/// fail that query although nothing was wrong with its connection. Long-connected idle
/// clients are closed at once, and a grace session in a transaction still finishes it.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

impl Sessions {
    /// Tells every session of this worker about a new shutdown phase (Closing: end
    /// between transactions; Exiting: end now), and remembers it for sessions to come.
    pub fn enter_phase(&self, phase: Phase) {
        if self.shutdown.get().is_some_and(|p| p >= phase) {
            return;
        }
        self.shutdown.set(Some(phase));
        match phase {
            Phase::Closing => self.drain_due(),
            Phase::Exiting => self.each(|s| s.kill(SHUTTING_DOWN)),
            _ => {}
        }
    }

    /// While closing: drains the sessions whose [`DRAIN_GRACE`] has passed. Called when
    /// the phase begins and then periodically by the worker.
    pub fn drain_due(&self) {
        if self.shutdown.get() != Some(Phase::Closing) {
            return;
        }
        self.each(|s| {
            if !s.draining() && s.born.elapsed() >= DRAIN_GRACE {
                s.drain();
            }
        });
    }

    /// A new session. One that starts while closing is drained by [`Sessions::drain_due`]
    /// once its grace has passed; one that starts while exiting is killed at once.
    pub fn add(&self, database: &str) -> Rc<SessionSignal> {
        let s = Rc::new(SessionSignal::new(database));
        if self.shutdown.get() == Some(Phase::Exiting) {
            s.kill(SHUTTING_DOWN);
        }
        let mut list = self.list.borrow_mut();
        // Forget sessions that have ended, now and then, so the list stays short.
        if list.len() >= 64 && list.len().is_power_of_two() {
            list.retain(|w| w.strong_count() > 0);
        }
        list.push(Rc::downgrade(&s));
        s
    }

    pub fn each(&self, mut f: impl FnMut(&SessionSignal)) {
        let mut list = self.list.borrow_mut();
        list.retain(|w| w.strong_count() > 0);
        for s in list.iter().filter_map(|w| w.upgrade()) {
            f(&s);
        }
    }

    pub fn live(&self) -> usize {
        self.list.borrow().iter().filter(|w| w.strong_count() > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_spares_new_sessions_for_their_grace_and_exiting_kills_all() {
        let sessions = Sessions::default();
        let old = sessions.add("db");
        let young = {
            std::thread::sleep(DRAIN_GRACE);
            sessions.add("db")
        };
        sessions.enter_phase(Phase::Closing);
        assert!(old.draining());
        assert!(!young.draining());
        let late = sessions.add("db");
        assert!(!late.draining());
        std::thread::sleep(DRAIN_GRACE);
        sessions.drain_due();
        assert!(young.draining() && late.draining());
        sessions.enter_phase(Phase::Exiting);
        assert_eq!(old.killed(), Some(SHUTTING_DOWN));
        assert_eq!(sessions.add("db").killed(), Some(SHUTTING_DOWN));
    }
}
