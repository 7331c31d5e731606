//! How clients got their servers, and how long each waited for one, by path: one
//! histogram per path per worker, written with the wait time the session measures anyway.

use std::time::Duration;

use super::histogram::{Histogram, HistogramSnapshot};

/// Where a server handed to a client came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AcquirePath {
    /// This worker's idle list.
    Idle = 0,
    /// Released by another client of this worker and handed straight to this one.
    Released = 1,
    /// Moved over from another worker (its idle list, or released there).
    OtherWorker = 2,
    /// A server connection opened while the client waited (for it or another client).
    New = 3,
}

impl AcquirePath {
    pub const ALL: [AcquirePath; 4] = [
        AcquirePath::Idle,
        AcquirePath::Released,
        AcquirePath::OtherWorker,
        AcquirePath::New,
    ];

    /// The name SHOW ACQUIRE and the metrics endpoint give the path.
    pub fn as_str(self) -> &'static str {
        match self {
            AcquirePath::Idle => "idle",
            AcquirePath::Released => "released",
            AcquirePath::OtherWorker => "other_worker",
            AcquirePath::New => "new",
        }
    }
}

/// One worker's histograms, one per path.
#[derive(Default)]
pub struct AcquireStats {
    by_path: [Histogram; AcquirePath::ALL.len()],
}

impl AcquireStats {
    /// A client that waited `waited` for a server that came by `path`.
    #[inline]
    pub fn record(&self, path: AcquirePath, waited: Duration) {
        self.by_path[path as usize].record(waited);
    }

    /// A client served at once, without a wait (and without reading the clock).
    #[inline]
    pub fn record_at_once(&self, path: AcquirePath) {
        self.by_path[path as usize].record_zero();
    }

    pub fn snapshot(&self) -> AcquireSnapshot {
        AcquireSnapshot {
            by_path: std::array::from_fn(|i| self.by_path[i].snapshot()),
        }
    }
}

/// A copy of the histograms, mergeable across workers and pools.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcquireSnapshot {
    by_path: [HistogramSnapshot; AcquirePath::ALL.len()],
}

impl AcquireSnapshot {
    pub fn path(&self, path: AcquirePath) -> &HistogramSnapshot {
        &self.by_path[path as usize]
    }

    pub fn merge(&mut self, other: &AcquireSnapshot) {
        for (a, b) in self.by_path.iter_mut().zip(&other.by_path) {
            a.merge(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_path_counts_apart_and_merges() {
        let s = AcquireStats::default();
        s.record_at_once(AcquirePath::Idle);
        s.record(AcquirePath::New, Duration::from_millis(30));
        s.record(AcquirePath::New, Duration::from_millis(3));
        let mut total = s.snapshot();
        assert_eq!(total.path(AcquirePath::Idle).count, 1);
        assert_eq!(total.path(AcquirePath::Idle).buckets[0], 1);
        assert_eq!(total.path(AcquirePath::New).count, 2);
        assert_eq!(total.path(AcquirePath::New).sum_us, 33_000);
        assert_eq!(total.path(AcquirePath::Released).count, 0);
        total.merge(&s.snapshot());
        assert_eq!(total.path(AcquirePath::New).count, 4);
    }
}
