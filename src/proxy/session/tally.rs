//! What the session counts for its pool's stats (SHOW STATS, the stats log line,
//! Prometheus): gathered here, folded into the pool's counters at each release.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::Flow;
use crate::metrics::WorkerPoolStats;

/// Per-session counters, folded into the pool's at each release so the shared cache
/// line is touched once per transaction, not per message.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) queries: u64,
    pub(super) xacts: u64,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    pub(super) query_time: Duration,
    pub(super) xact_time: Duration,
}

impl Flow {
    /// A request (or several, pipelined) got its ReadyForQuery: record how long it took,
    /// and how long the transaction took if it ended.
    pub(super) fn timed(&mut self, xact_ended: bool) {
        let now = Instant::now();
        let stats = self.who.pool.stats();
        if let Some(t) = self.timing.req_started.take() {
            let d = now - t;
            stats.query_time.record(d);
            self.tally.query_time += d;
        }
        if self.tracker.outstanding() > 0 {
            self.timing.req_started = Some(now);
        }
        self.timing.quiet_since = (self.tracker.is_quiet() && self.tracker.status() != b'I').then_some(now);
        if xact_ended && self.tracker.status() == b'I' {
            if let Some(t) = self.timing.xact_started.take() {
                let d = now - t;
                stats.xact_time.record(d);
                self.tally.xact_time += d;
            }
        }
    }

    pub(super) fn flush_tally(&mut self) {
        let stats = self.who.pool.stats();
        let t = std::mem::take(&mut self.tally);
        stats.query_count.fetch_add(t.queries, Relaxed);
        stats.xact_count.fetch_add(t.xacts, Relaxed);
        stats.bytes_received.fetch_add(t.bytes_in, Relaxed);
        stats.bytes_sent.fetch_add(t.bytes_out, Relaxed);
        stats.query_time_us.fetch_add(t.query_time.as_micros() as u64, Relaxed);
        stats.xact_time_us.fetch_add(t.xact_time.as_micros() as u64, Relaxed);
    }

    /// The session is over: the last counts go to the pool, and a server still attached
    /// is closed.
    pub(super) fn finish_tally(&mut self) {
        self.flush_tally();
        if let Some(s) = self.server.take() {
            // The loop ended with a server still attached (an error path): its state is
            // unknown, so it is closed rather than reused.
            self.server_left();
            drop(s);
            self.who.pool.slot_freed();
        }
        WorkerPoolStats::add(&self.who.pool.stats().clients, -1);
    }
}
