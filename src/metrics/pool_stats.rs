//! Per-pool counters. Each worker writes only its own cache-line-aligned slot, so the hot
//! path never contends with another worker; readers (admin console, metrics, the stats
//! log line) add the slots up.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::acquire::{AcquireSnapshot, AcquireStats};
use super::histogram::{Histogram, HistogramSnapshot};

#[repr(align(64))]
#[derive(Default)]
pub struct WorkerPoolStats {
    pub xact_count: AtomicU64,
    pub query_count: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub xact_time_us: AtomicU64,
    pub query_time_us: AtomicU64,
    pub wait_time_us: AtomicU64,
    /// Clients logged in to this pool, those with a server, those waiting for one.
    pub clients: AtomicI64,
    pub clients_active: AtomicI64,
    pub clients_waiting: AtomicI64,
    /// Servers attached to clients, being opened.
    pub servers_active: AtomicI64,
    pub servers_login: AtomicI64,
    pub query_time: Histogram,
    pub xact_time: Histogram,
    pub wait_time: Histogram,
    /// Waits for a server by how the server came (SHOW ACQUIRE).
    pub acquire: AcquireStats,
}

pub struct PoolStats {
    workers: Box<[WorkerPoolStats]>,
}

/// Sums over all workers.
#[derive(Clone, Debug, Default)]
pub struct PoolTotals {
    pub xact_count: u64,
    pub query_count: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub xact_time_us: u64,
    pub query_time_us: u64,
    pub wait_time_us: u64,
    pub clients: i64,
    pub clients_active: i64,
    pub clients_waiting: i64,
    pub servers_active: i64,
    pub servers_login: i64,
    pub query_time: HistogramSnapshot,
    pub xact_time: HistogramSnapshot,
    pub wait_time: HistogramSnapshot,
    pub acquire: AcquireSnapshot,
}

impl PoolStats {
    pub fn new(workers: usize) -> PoolStats {
        PoolStats {
            workers: (0..workers.max(1)).map(|_| WorkerPoolStats::default()).collect(),
        }
    }

    /// The calling worker's slot.
    #[inline]
    pub fn worker(&self, worker: usize) -> &WorkerPoolStats {
        &self.workers[worker.min(self.workers.len() - 1)]
    }

    pub fn totals(&self) -> PoolTotals {
        let mut t = PoolTotals::default();
        for w in self.workers.iter() {
            t.add(&w.snapshot());
        }
        t
    }

    pub fn worker_totals(&self, worker: usize) -> PoolTotals {
        self.worker(worker).snapshot()
    }
}

impl WorkerPoolStats {
    #[inline]
    pub fn add(counter: &AtomicI64, delta: i64) {
        counter.fetch_add(delta, Relaxed);
    }

    #[inline]
    pub fn record_wait(&self, d: Duration) {
        self.wait_time_us.fetch_add(d.as_micros() as u64, Relaxed);
        self.wait_time.record(d);
    }

    fn snapshot(&self) -> PoolTotals {
        PoolTotals {
            xact_count: self.xact_count.load(Relaxed),
            query_count: self.query_count.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            xact_time_us: self.xact_time_us.load(Relaxed),
            query_time_us: self.query_time_us.load(Relaxed),
            wait_time_us: self.wait_time_us.load(Relaxed),
            clients: self.clients.load(Relaxed),
            clients_active: self.clients_active.load(Relaxed),
            clients_waiting: self.clients_waiting.load(Relaxed),
            servers_active: self.servers_active.load(Relaxed),
            servers_login: self.servers_login.load(Relaxed),
            query_time: self.query_time.snapshot(),
            xact_time: self.xact_time.snapshot(),
            wait_time: self.wait_time.snapshot(),
            acquire: self.acquire.snapshot(),
        }
    }
}

impl PoolTotals {
    pub fn add(&mut self, o: &PoolTotals) {
        self.xact_count += o.xact_count;
        self.query_count += o.query_count;
        self.bytes_received += o.bytes_received;
        self.bytes_sent += o.bytes_sent;
        self.xact_time_us += o.xact_time_us;
        self.query_time_us += o.query_time_us;
        self.wait_time_us += o.wait_time_us;
        self.clients += o.clients;
        self.clients_active += o.clients_active;
        self.clients_waiting += o.clients_waiting;
        self.servers_active += o.servers_active;
        self.servers_login += o.servers_login;
        self.query_time.merge(&o.query_time);
        self.xact_time.merge(&o.xact_time);
        self.wait_time.merge(&o.wait_time);
        self.acquire.merge(&o.acquire);
    }
}

/// Per-second rates and per-event times over the last period, as SHOW STATS gives them.
#[derive(Clone, Debug, Default)]
pub struct Averages {
    pub xact_count: u64,
    pub query_count: u64,
    pub recv: u64,
    pub sent: u64,
    /// Microseconds per transaction / query / wait.
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
}
