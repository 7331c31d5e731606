//! A fixed-bucket latency histogram of atomics: one writer thread, any number of readers,
//! exported as a Prometheus histogram.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds in microseconds; the last bucket (+Inf) is implicit.
pub const BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// A copy of a histogram's counters, mergeable across workers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub buckets: [u64; BOUNDS_US.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

impl Histogram {
    #[inline]
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// A zero duration: the first bucket, nothing to add to the sum.
    #[inline]
    pub fn record_zero(&self) {
        self.buckets[0].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut s = HistogramSnapshot::default();
        for (d, b) in s.buckets.iter_mut().zip(&self.buckets) {
            *d = b.load(Relaxed);
        }
        s.sum_us = self.sum_us.load(Relaxed);
        s.count = self.count.load(Relaxed);
        s
    }
}

impl HistogramSnapshot {
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
        self.count += other.count;
    }

    /// Cumulative counts per upper bound, as Prometheus wants them (+Inf last).
    pub fn cumulative(&self) -> impl Iterator<Item = (Option<u64>, u64)> + '_ {
        let mut acc = 0;
        self.buckets.iter().enumerate().map(move |(i, n)| {
            acc += n;
            (BOUNDS_US.get(i).copied(), acc)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::default();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_micros(101));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        let c: Vec<_> = s.cumulative().collect();
        assert_eq!(c[0], (Some(100), 1));
        assert_eq!(c[1], (Some(250), 2));
        assert_eq!(c.last(), Some(&(None, 3)));
        assert_eq!(s.count, 3);
    }
}
