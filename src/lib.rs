//! pgsilo: a per-tenant PostgreSQL connection pooler.
//!
//! One process serves one tenant. Inside, one pinned worker thread per core runs its own
//! monoio runtime, its own SO_REUSEPORT listener and its share of the server pool.

pub mod admin;
pub mod auth;
pub mod config;
pub mod context;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod runtime;
pub mod tls;
