//! Logins in progress: a worker's budget of connections that have not authenticated
//! yet, kept apart from max_client_conn (which counts clients logged in), so sockets that
//! connect and then say nothing cannot lock real clients out.
//!
//! Each worker holds its share of `max_pending_logins` and `max_pending_logins_per_addr`
//! (the kernel spreads one address's TCP connections over the workers). A new
//! connection, by its address ([`LoginKey`]):
//! - takes a free place, when its address is below its per-address cap;
//! - else, when the share is full, evicts a login of the address holding the most, when
//!   that address holds more than the newcomer's: its oldest without a startup packet,
//!   else its oldest;
//! - else evicts its own address's oldest login that has not sent a startup packet
//!   [`STARTUP_GRACE`] after connecting (every real client sends one at once);
//! - else is turned away (told FATAL 53300 by the accept loop, before anything is
//!   read, while few are being told; else closed without a word).
//!
//! So one address cannot keep another out: a flood fills at most the budget, and every
//! other address takes places back from it; and sockets that connect and say nothing do
//! not keep even their own address's real clients out. A login leaves the budget when it
//! has authenticated, and takes a max_client_conn place then ([`Admission::log_in`]).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::{poll_fn, Future};
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::instance::{ClientSlot, Instance};

/// A login that has not sent its startup packet this long after connecting makes room
/// for a new connection from its own address.
pub const STARTUP_GRACE: Duration = Duration::from_secs(1);

/// How often, at most, a worker logs what its budget turned away.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Whose share a login counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoginKey {
    V4(Ipv4Addr),
    /// The /64 an IPv6 client is in: a single host usually holds a whole /64, so a
    /// per-address cap by /128 would be no cap.
    V6(u64),
    /// A Unix-socket client, by the user id of the connecting process (none when the
    /// kernel does not say): local users do not crowd each other out.
    Local(Option<u32>),
}

impl LoginKey {
    pub fn of_ip(ip: IpAddr) -> LoginKey {
        match ip {
            IpAddr::V4(a) => LoginKey::V4(a),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => LoginKey::V4(v4),
                None => LoginKey::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

impl std::fmt::Display for LoginKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginKey::V4(a) => write!(f, "{a}"),
            LoginKey::V6(prefix) => write!(f, "{}/64", std::net::Ipv6Addr::from(u128::from(*prefix) << 64)),
            LoginKey::Local(Some(uid)) => write!(f, "unix socket (uid {uid})"),
            LoginKey::Local(None) => write!(f, "unix socket"),
        }
    }
}

/// One worker's share of the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginLimits {
    pub total: usize,
    /// None: no per-address cap (the eviction still keeps addresses from crowding
    /// each other out).
    pub per_addr: Option<usize>,
}

impl LoginLimits {
    /// A worker's share of the instance-wide `max_pending_logins` and
    /// `max_pending_logins_per_addr` (0 = no per-address cap), rounded up.
    pub fn share(total: usize, per_addr: usize, workers: usize) -> LoginLimits {
        let workers = workers.max(1);
        LoginLimits {
            total: total.div_ceil(workers).max(1),
            per_addr: (per_addr > 0).then(|| per_addr.div_ceil(workers)),
        }
    }
}

/// Why a new connection was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Its address already holds its per-address cap.
    AddrFull,
    /// The budget is full and no address holds more than the newcomer's.
    Full,
}

/// How a login was cut short by the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// A connection from an address holding fewer logins took its place.
    Evicted,
    /// No startup packet within startup_packet_timeout.
    StartupTimeout,
}

/// A worker's logins in progress.
#[derive(Default)]
pub struct PendingLogins {
    table: RefCell<Table>,
    turned_away: Cell<TurnedAway>,
    last_report: Cell<Option<Instant>>,
    /// Connections turned away that are being told why (see [`Refusing`]).
    refusing: Rc<Cell<usize>>,
}

/// A turned-away connection being told why, counted so that a flood cannot make the
/// telling cost more descriptors than the budget itself.
pub struct Refusing(Rc<Cell<usize>>);

impl Drop for Refusing {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// What the budget turned away since the last report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TurnedAway {
    /// New connections closed at the per-address cap.
    pub refused_addr: u64,
    /// New connections closed with the budget full.
    pub refused_full: u64,
    pub evicted: u64,
    pub startup_timeouts: u64,
}

impl TurnedAway {
    fn any(&self) -> bool {
        *self != TurnedAway::default()
    }
}

#[derive(Default)]
struct Table {
    next_seq: u64,
    /// Each address's logins, oldest first.
    by_key: HashMap<LoginKey, BTreeMap<u64, Rc<Pending>>>,
    /// (logins, address) for every address with logins: the last holds the most.
    by_count: BTreeSet<(usize, LoginKey)>,
    total: usize,
}

impl Table {
    fn count(&self, key: LoginKey) -> usize {
        self.by_key.get(&key).map_or(0, BTreeMap::len)
    }

    fn insert(&mut self, pending: Rc<Pending>) {
        let key = pending.key;
        let entries = self.by_key.entry(key).or_default();
        let before = entries.len();
        entries.insert(pending.seq, pending);
        if before > 0 {
            self.by_count.remove(&(before, key));
        }
        self.by_count.insert((before + 1, key));
        self.total += 1;
    }

    fn remove(&mut self, pending: &Pending) {
        let key = pending.key;
        let Some(entries) = self.by_key.get_mut(&key) else {
            return;
        };
        let before = entries.len();
        if entries.remove(&pending.seq).is_none() {
            return;
        }
        self.by_count.remove(&(before, key));
        if before > 1 {
            self.by_count.insert((before - 1, key));
        } else {
            self.by_key.remove(&key);
        }
        self.total -= 1;
    }

    /// A login of the address holding the most, when it holds more than `than`: its
    /// oldest without a startup packet, else its oldest.
    fn victim(&self, than: usize) -> Option<Rc<Pending>> {
        let &(most, key) = self.by_count.last()?;
        if most <= than {
            return None;
        }
        let entries = self.by_key.get(&key)?;
        entries
            .values()
            .find(|p| !p.started.get())
            .or_else(|| entries.values().next())
            .cloned()
    }

    /// The oldest login of `key` still without a startup packet [`STARTUP_GRACE`] after
    /// connecting.
    fn stale(&self, key: LoginKey, now: Instant) -> Option<Rc<Pending>> {
        self.by_key
            .get(&key)?
            .values()
            .find(|p| !p.started.get() && now.saturating_duration_since(p.connected) >= STARTUP_GRACE)
            .cloned()
    }
}

/// One login's entry, shared by the table and the login's [`Admission`].
struct Pending {
    seq: u64,
    key: LoginKey,
    connected: Instant,
    started: Cell<bool>,
    evicted: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl PendingLogins {
    /// Takes a place for a new connection from `key`, connected at `now`, evicting
    /// another login when there is none free (see the module comment).
    pub fn admit(self: &Rc<Self>, key: LoginKey, limits: LoginLimits, now: Instant) -> Result<Admission, Refused> {
        let (admission, victim) = {
            let mut table = self.table.borrow_mut();
            let mine = table.count(key);
            let victim = if limits.per_addr.is_some_and(|cap| mine >= cap) {
                let Some(victim) = table.stale(key, now) else {
                    self.note(|t| t.refused_addr += 1);
                    return Err(Refused::AddrFull);
                };
                Some(victim)
            } else if table.total >= limits.total {
                let Some(victim) = table.victim(mine).or_else(|| table.stale(key, now)) else {
                    self.note(|t| t.refused_full += 1);
                    return Err(Refused::Full);
                };
                Some(victim)
            } else {
                None
            };
            if let Some(victim) = &victim {
                table.remove(victim);
                victim.evicted.set(true);
                self.note(|t| t.evicted += 1);
            }
            table.next_seq += 1;
            let pending = Rc::new(Pending {
                seq: table.next_seq,
                key,
                connected: now,
                started: Cell::new(false),
                evicted: Cell::new(false),
                waker: Cell::new(None),
            });
            table.insert(pending.clone());
            (
                Admission {
                    logins: self.clone(),
                    pending,
                    slot: RefCell::new(None),
                },
                victim,
            )
        };
        // Woken outside the borrow: the victim's task runs later, on this thread.
        if let Some(waker) = victim.and_then(|v| v.waker.take()) {
            waker.wake();
        }
        Ok(admission)
    }

    /// A place to tell a turned-away connection why, when fewer than `max` are being
    /// told; None: close it without a word.
    pub fn refusing(&self, max: usize) -> Option<Refusing> {
        let n = self.refusing.get();
        (n < max).then(|| {
            self.refusing.set(n + 1);
            Refusing(self.refusing.clone())
        })
    }

    /// Logins in progress on this worker.
    pub fn len(&self) -> usize {
        self.table.borrow().total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What was turned away since the last report, once per [`REPORT_EVERY`] at most
    /// (and only when something was).
    pub fn report_due(&self, now: Instant) -> Option<TurnedAway> {
        let counts = self.turned_away.get();
        if !counts.any() || self.last_report.get().is_some_and(|at| now < at + REPORT_EVERY) {
            return None;
        }
        self.last_report.set(Some(now));
        self.turned_away.set(TurnedAway::default());
        Some(counts)
    }

    fn note(&self, f: impl FnOnce(&mut TurnedAway)) {
        let mut t = self.turned_away.get();
        f(&mut t);
        self.turned_away.set(t);
    }

    fn leave(&self, pending: &Pending) {
        self.table.borrow_mut().remove(pending);
    }
}

/// A connection's accounting from accept to close: its place among the logins in
/// progress until it authenticates, then its max_client_conn place.
pub struct Admission {
    logins: Rc<PendingLogins>,
    pending: Rc<Pending>,
    slot: RefCell<Option<ClientSlot>>,
}

impl Admission {
    /// The client sent its startup packet: startup_packet_timeout no longer applies.
    pub fn startup_received(&self) {
        self.pending.started.set(true);
    }

    pub fn has_startup(&self) -> bool {
        self.pending.started.get()
    }

    /// The client authenticated: it leaves the logins in progress and takes a place
    /// among the `max` logged-in clients. False (and still a login in progress) when
    /// they are all taken.
    pub fn log_in(&self, instance: &Arc<Instance>, max: usize) -> bool {
        let Some(slot) = instance.take_client_slot(max) else {
            return false;
        };
        self.logins.leave(&self.pending);
        *self.slot.borrow_mut() = Some(slot);
        true
    }

    /// Resolves when the budget ends this login: evicted, or no startup packet within
    /// `startup_timeout`. Never resolves once the client has logged in.
    pub async fn cut(&self, startup_timeout: Option<Duration>) -> Cut {
        let mut deadline = startup_timeout.map(|t| Box::pin(monoio::time::sleep(t)));
        let cut = poll_fn(|cx| {
            if self.pending.evicted.get() {
                return Poll::Ready(Cut::Evicted);
            }
            self.pending.waker.set(Some(cx.waker().clone()));
            if let Some(sleep) = deadline.as_mut() {
                if sleep.as_mut().poll(cx).is_ready() {
                    deadline = None;
                    if !self.pending.started.get() {
                        return Poll::Ready(Cut::StartupTimeout);
                    }
                }
            }
            Poll::Pending
        })
        .await;
        if cut == Cut::StartupTimeout {
            self.logins.note(|t| t.startup_timeouts += 1);
        }
        cut
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.logins.leave(&self.pending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> LoginKey {
        LoginKey::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    fn limits(total: usize, per_addr: Option<usize>) -> LoginLimits {
        LoginLimits { total, per_addr }
    }

    #[test]
    fn an_address_at_its_cap_is_refused_while_others_get_in() {
        let logins = Rc::new(PendingLogins::default());
        let (l, t0) = (limits(10, Some(2)), Instant::now());
        let _a = logins.admit(v4(1), l, t0).unwrap();
        let _b = logins.admit(v4(1), l, t0).unwrap();
        assert_eq!(logins.admit(v4(1), l, t0).err(), Some(Refused::AddrFull));
        let _c = logins.admit(v4(2), l, t0).unwrap();
        assert_eq!(logins.len(), 3);
    }

    #[test]
    fn a_full_budget_evicts_the_oldest_login_of_the_address_holding_the_most() {
        let logins = Rc::new(PendingLogins::default());
        let (l, t0) = (limits(3, None), Instant::now());
        let flood: Vec<Admission> = (0..3).map(|_| logins.admit(v4(1), l, t0).unwrap()).collect();
        // The flood's own next connection has nobody to take a place from.
        assert_eq!(logins.admit(v4(1), l, t0).err(), Some(Refused::Full));
        let other = logins.admit(v4(2), l, t0).unwrap();
        let evicted: Vec<bool> = flood.iter().map(|a| a.pending.evicted.get()).collect();
        assert_eq!(evicted, [true, false, false], "the oldest goes first");
        assert_eq!(logins.len(), 3);
        // A Unix-socket client gets in too; 127.0.0.2 holds one, the flood two.
        let _local = logins.admit(LoginKey::Local(Some(1000)), l, t0).unwrap();
        assert!(flood[1].pending.evicted.get());
        assert!(!other.pending.evicted.get());
        // Every address now holds one, more than a fourth's none: it takes a place too.
        let _fourth = logins.admit(v4(3), l, t0).unwrap();
        assert_eq!(logins.len(), 3);
        drop(flood);
        assert!(logins.len() <= 3);
    }

    #[test]
    fn logins_that_sent_a_startup_packet_are_evicted_last() {
        let logins = Rc::new(PendingLogins::default());
        let (l, t0) = (limits(3, None), Instant::now());
        let flood: Vec<Admission> = (0..3).map(|_| logins.admit(v4(1), l, t0).unwrap()).collect();
        flood[0].startup_received();
        let _other = logins.admit(v4(2), l, t0).unwrap();
        let evicted: Vec<bool> = flood.iter().map(|a| a.pending.evicted.get()).collect();
        assert_eq!(evicted, [false, true, false]);
    }

    #[test]
    fn silent_sockets_make_room_for_their_own_address_after_the_grace() {
        let logins = Rc::new(PendingLogins::default());
        let (l, t0) = (limits(10, Some(2)), Instant::now());
        let talker = logins.admit(v4(1), l, t0).unwrap();
        talker.startup_received();
        let silent = logins.admit(v4(1), l, t0).unwrap();
        let soon = t0 + STARTUP_GRACE / 2;
        assert_eq!(logins.admit(v4(1), l, soon).err(), Some(Refused::AddrFull));
        let late = t0 + STARTUP_GRACE;
        let newcomer = logins.admit(v4(1), l, late).unwrap();
        assert!(silent.pending.evicted.get());
        assert!(
            !talker.pending.evicted.get(),
            "a login that sent its startup packet stays"
        );
        newcomer.startup_received();
        assert_eq!(
            logins.admit(v4(1), l, late + STARTUP_GRACE).err(),
            Some(Refused::AddrFull)
        );
    }

    #[test]
    fn an_evicted_or_finished_login_leaves_the_table_once() {
        let logins = Rc::new(PendingLogins::default());
        let (l, t0) = (limits(1, None), Instant::now());
        let first = logins.admit(v4(1), l, t0).unwrap();
        let second = logins.admit(v4(2), l, t0).unwrap();
        assert!(first.pending.evicted.get());
        drop(first);
        assert_eq!(
            logins.len(),
            1,
            "dropping the evicted one does not free another's place"
        );
        drop(second);
        assert!(logins.is_empty());
        assert!(logins.table.borrow().by_count.is_empty());
    }

    #[test]
    fn refusals_being_told_are_bounded() {
        let logins = PendingLogins::default();
        let first = logins.refusing(2).unwrap();
        let _second = logins.refusing(2).unwrap();
        assert!(logins.refusing(2).is_none());
        drop(first);
        assert!(logins.refusing(2).is_some());
    }

    #[test]
    fn shares_round_up_and_zero_means_no_per_address_cap() {
        assert_eq!(LoginLimits::share(1000, 100, 2), limits(500, Some(50)));
        assert_eq!(LoginLimits::share(5, 3, 4), limits(2, Some(1)));
        assert_eq!(LoginLimits::share(1, 0, 8), limits(1, None));
    }

    #[test]
    fn ipv6_clients_are_grouped_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::10".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::10".parse().unwrap();
        assert_eq!(LoginKey::of_ip(a), LoginKey::of_ip(b));
        assert_ne!(LoginKey::of_ip(a), LoginKey::of_ip(c));
        assert_eq!(LoginKey::of_ip(a).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(LoginKey::of_ip(mapped), v4(1));
    }

    #[test]
    fn reports_come_at_most_every_ten_seconds_and_only_with_news() {
        let logins = Rc::new(PendingLogins::default());
        let t0 = Instant::now();
        assert_eq!(logins.report_due(t0), None);
        let l = limits(1, Some(1));
        let _a = logins.admit(v4(1), l, t0).unwrap();
        let _ = logins.admit(v4(1), l, t0);
        assert_eq!(logins.report_due(t0).unwrap().refused_addr, 1);
        let _ = logins.admit(v4(1), l, t0);
        assert_eq!(logins.report_due(t0 + Duration::from_secs(1)), None);
        assert_eq!(logins.report_due(t0 + REPORT_EVERY).unwrap().refused_addr, 1);
    }
}
