//! Which statements a server connection has prepared under pgsilo's names, with LRU
//! eviction so a long-lived server does not accumulate every statement ever seen.

use std::collections::HashMap;

/// Statement identity: a hash of its definition (query text and parameter types).
pub type StmtHash = u128;

#[derive(Debug, Default)]
pub struct PreparedCache {
    /// hash -> last use (a counter, not a clock).
    used: HashMap<StmtHash, u64>,
    tick: u64,
}

impl PreparedCache {
    pub fn contains(&self, hash: StmtHash) -> bool {
        self.used.contains_key(&hash)
    }

    /// Records a use; returns whether it was already there.
    pub fn touch(&mut self, hash: StmtHash) -> bool {
        self.tick += 1;
        match self.used.get_mut(&hash) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Adds a statement, first evicting the least recently used one when `capacity` is
    /// reached; returns the evicted hash, which the caller must Close on the server.
    pub fn insert(&mut self, hash: StmtHash, capacity: usize) -> Option<StmtHash> {
        self.tick += 1;
        let mut evicted = None;
        if !self.used.contains_key(&hash) && capacity > 0 && self.used.len() >= capacity {
            if let Some((&old, _)) = self.used.iter().min_by_key(|(_, &t)| t) {
                self.used.remove(&old);
                evicted = Some(old);
            }
        }
        self.used.insert(hash, self.tick);
        evicted
    }

    pub fn remove(&mut self, hash: StmtHash) {
        self.used.remove(&hash);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut c = PreparedCache::default();
        assert_eq!(c.insert(1, 2), None);
        assert_eq!(c.insert(2, 2), None);
        assert!(c.touch(1));
        assert_eq!(c.insert(3, 2), Some(2));
        assert!(c.contains(1) && c.contains(3) && !c.contains(2));
        assert_eq!(c.insert(3, 2), None);
    }
}
