//! Counters, the connection registry, and the Prometheus endpoint.

pub mod acquire;
pub mod histogram;
pub mod pool_stats;
pub mod prometheus;
pub mod registry;

pub use acquire::{AcquirePath, AcquireSnapshot, AcquireStats};
pub use pool_stats::{Averages, PoolStats, PoolTotals, WorkerPoolStats};
pub use registry::{ConnEntry, ConnState, Registered, CLIENTS, ERRORS, SERVERS};
