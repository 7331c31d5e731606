//! Which statements a server connection has prepared under pgsilo's names, with LRU
//! eviction so a long-lived server does not accumulate every statement ever seen, and
//! with each copy's age, so a copy made before a schema change is never used for a
//! client that prepared its statement after it.
//!
//! Ages are stamps of one process-wide clock: a client's Parse and every server's copies
//! are ordered by it, whichever worker they were made on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};

use crate::protocol::SqlState;

/// Statement identity: a hash of its definition (query text and parameter types).
pub type StmtHash = u128;

/// A point on pgsilo's statement clock; 0 is "never" (an unusable copy).
pub type Stamp = u64;

static CLOCK: AtomicU64 = AtomicU64::new(1);

/// Now, on the statement clock: later calls return larger stamps.
pub fn stamp() -> Stamp {
    CLOCK.fetch_add(1, Relaxed)
}

/// Why PostgreSQL rejected a copy of a statement as stale, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidation {
    pub at: Stamp,
    /// PostgreSQL's SQLSTATE and message, for a client whose own statement is as stale
    /// (it gets them as it would on a direct connection).
    pub code: SqlState,
    pub message: String,
}

/// Statements PostgreSQL rejected as stale on some server (their text now means
/// something else): copies made before the stamp are not used anywhere.
static INVALIDATED: Mutex<Option<HashMap<StmtHash, Invalidation>>> = Mutex::new(None);
/// Whether INVALIDATED holds anything: the per-Bind check costs one load until then.
static ANY_INVALIDATED: AtomicBool = AtomicBool::new(false);

/// Every copy of `hash` made before now is stale, on every server; PostgreSQL said so
/// with `code` and `message`.
pub fn invalidate(hash: StmtHash, code: SqlState, message: String) {
    let at = stamp();
    let mut map = INVALIDATED.lock().unwrap_or_else(PoisonError::into_inner);
    map.get_or_insert_with(HashMap::new)
        .insert(hash, Invalidation { at, code, message });
    ANY_INVALIDATED.store(true, Relaxed);
}

/// The stamp before which copies of `hash` are stale (0: none are).
pub fn invalidated_at(hash: StmtHash) -> Stamp {
    invalidation(hash).map_or(0, |i| i.at)
}

/// The last time PostgreSQL rejected a copy of `hash` as stale, if ever. One atomic
/// load while nothing ever was.
pub fn invalidation(hash: StmtHash) -> Option<Invalidation> {
    if !ANY_INVALIDATED.load(Relaxed) {
        return None;
    }
    let map = INVALIDATED.lock().unwrap_or_else(PoisonError::into_inner);
    map.as_ref().and_then(|m| m.get(&hash).cloned())
}

#[derive(Debug, Clone, Copy)]
struct Copy {
    /// Last use, for LRU (a counter, not a clock).
    used: u64,
    /// When the Parse that made it was sent; 0 when the server may hold a statement
    /// under this name that must not be used (a Parse or Close whose outcome is not
    /// known, a copy spoiled by a rollback): it is closed before being prepared again.
    made: Stamp,
}

#[derive(Debug, Default)]
pub struct PreparedCache {
    copies: HashMap<StmtHash, Copy>,
    tick: u64,
    /// Copies made since the server was last idle outside a transaction: if that
    /// transaction fails or rolls back (to a savepoint, too), they may refer to objects
    /// that no longer exist, and are not shared.
    provisional: Vec<StmtHash>,
    /// An error or a rollback happened since then.
    tainted: bool,
}

impl PreparedCache {
    /// The server may hold a statement under this hash's name (usable or not).
    pub fn contains(&self, hash: StmtHash) -> bool {
        self.copies.contains_key(&hash)
    }

    /// Whether the server has a usable copy made after `not_before`; a use is recorded.
    pub fn fresh(&mut self, hash: StmtHash, not_before: Stamp) -> bool {
        self.tick += 1;
        match self.copies.get_mut(&hash) {
            Some(c) if c.made != 0 && c.made > not_before => {
                c.used = self.tick;
                true
            }
            _ => false,
        }
    }

    /// Records a copy made at `made` (replacing what was there), first evicting the least
    /// recently used one when `capacity` is reached; returns the evicted hash, which the
    /// caller must Close on the server.
    pub fn insert(&mut self, hash: StmtHash, made: Stamp, capacity: usize) -> Option<StmtHash> {
        self.tick += 1;
        let mut evicted = None;
        if !self.copies.contains_key(&hash) && capacity > 0 && self.copies.len() >= capacity {
            if let Some((&old, _)) = self.copies.iter().min_by_key(|(_, c)| c.used) {
                self.copies.remove(&old);
                evicted = Some(old);
            }
        }
        self.copies.insert(hash, Copy { used: self.tick, made });
        evicted
    }

    /// Makes room for `room` new copies within `capacity` (0: no limit) by evicting the
    /// least recently used ones, never one of `keep` (the copies one request uses may
    /// exceed the capacity for a while). Returns the evicted hashes, which the caller
    /// must Close on the server.
    pub fn evict_for(&mut self, room: usize, capacity: usize, keep: &[StmtHash]) -> Vec<StmtHash> {
        let mut evicted = Vec::new();
        while capacity > 0 && self.copies.len() + room > capacity {
            let Some((&old, _)) = self
                .copies
                .iter()
                .filter(|(h, _)| !keep.contains(h))
                .min_by_key(|(_, c)| c.used)
            else {
                break;
            };
            self.copies.remove(&old);
            evicted.push(old);
        }
        evicted
    }

    /// The server may still hold this statement, but it must not be used: a Parse or
    /// Close of it did not run, or the transaction it was made in did not commit.
    pub fn spoil(&mut self, hash: StmtHash) {
        let tick = self.tick;
        self.copies.entry(hash).or_insert(Copy { used: tick, made: 0 }).made = 0;
    }

    /// The copy is known to be gone from the server.
    pub fn remove(&mut self, hash: StmtHash) {
        self.copies.remove(&hash);
    }

    pub fn clear(&mut self) {
        self.copies.clear();
        self.provisional.clear();
        self.tainted = false;
    }

    /// A Parse of `hash` was sent while the server's transaction may still roll back.
    pub fn made_provisionally(&mut self, hash: StmtHash) {
        self.provisional.push(hash);
    }

    /// The server reported an error or a rollback.
    pub fn tx_failed(&mut self) {
        if !self.provisional.is_empty() {
            self.tainted = true;
        }
    }

    /// The server is idle outside a transaction: copies made in a transaction that failed
    /// are spoiled, the others are now as good as any.
    pub fn tx_ended(&mut self) {
        if self.provisional.is_empty() {
            return;
        }
        if std::mem::take(&mut self.tainted) {
            for hash in std::mem::take(&mut self.provisional) {
                if let Some(c) = self.copies.get_mut(&hash) {
                    c.made = 0;
                }
            }
        }
        self.provisional.clear();
    }

    pub fn len(&self) -> usize {
        self.copies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut c = PreparedCache::default();
        assert_eq!(c.insert(1, 5, 2), None);
        assert_eq!(c.insert(2, 5, 2), None);
        assert!(c.fresh(1, 0));
        assert_eq!(c.insert(3, 5, 2), Some(2));
        assert!(c.contains(1) && c.contains(3) && !c.contains(2));
        assert_eq!(c.insert(3, 6, 2), None);
    }

    #[test]
    fn room_is_made_without_evicting_what_a_request_uses() {
        let mut c = PreparedCache::default();
        for h in 1..=3 {
            c.insert(h, 5, 3);
        }
        assert!(c.fresh(1, 0));
        assert_eq!(c.evict_for(2, 3, &[2]), vec![3, 1]);
        assert!(c.contains(2));
        // What is kept may leave the cache over its capacity.
        assert!(c.evict_for(5, 3, &[2]).is_empty());
        assert!(c.evict_for(9, 0, &[]).is_empty(), "no limit");
    }

    #[test]
    fn a_copy_older_than_the_clients_parse_is_not_fresh() {
        let mut c = PreparedCache::default();
        c.insert(1, 10, 0);
        assert!(c.fresh(1, 9));
        assert!(!c.fresh(1, 10));
        assert!(!c.fresh(1, 11));
        c.spoil(1);
        assert!(c.contains(1));
        assert!(!c.fresh(1, 0));
        // Spoiling an unknown statement records that the server may hold it.
        c.spoil(7);
        assert!(c.contains(7) && !c.fresh(7, 0));
    }

    #[test]
    fn copies_of_a_failed_transaction_are_spoiled_at_its_end() {
        let mut c = PreparedCache::default();
        c.insert(1, 10, 0);
        c.made_provisionally(1);
        c.tx_ended();
        assert!(c.fresh(1, 0), "committed: shared");
        c.insert(2, 11, 0);
        c.made_provisionally(2);
        c.tx_failed();
        c.tx_ended();
        assert!(!c.fresh(2, 0), "rolled back: spoiled");
        assert!(c.fresh(1, 0));
        // An error with nothing provisional taints nothing later.
        c.tx_failed();
        c.insert(3, 12, 0);
        c.made_provisionally(3);
        c.tx_ended();
        assert!(c.fresh(3, 0));
    }

    #[test]
    fn invalidation_is_seen_everywhere() {
        let h: StmtHash = 0xdead_beef_0000_1111;
        assert_eq!(invalidated_at(h), 0);
        let before = stamp();
        invalidate(
            h,
            SqlState::FEATURE_NOT_SUPPORTED,
            "cached plan must not change result type".into(),
        );
        assert!(invalidated_at(h) > before);
        assert_eq!(invalidation(h).map(|i| i.code), Some(SqlState::FEATURE_NOT_SUPPORTED));
        assert_eq!(invalidated_at(h + 1), 0);
    }
}
