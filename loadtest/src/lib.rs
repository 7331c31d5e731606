//! pgsilo-loadtest: a noisy-neighbour load tester for PostgreSQL poolers.
//!
//! A victim tenant sends queries on a fixed schedule (open loop, latency from each
//! query's intended start) through three phases: `baseline` (alone), `contention` (while
//! an aggressor tenant misbehaves) and `recovery` (alone again). The report compares the
//! victim's latency histograms across phases; `compare` does it for two setups (e.g. one
//! pgsilo process per tenant versus one shared process) side by side.

pub mod affinity;
pub mod aggressor;
pub mod chart;
pub mod errors;
pub mod hist;
pub mod report;
pub mod run;
pub mod scenario;
pub mod schedule;
pub mod target;
pub mod victim;
