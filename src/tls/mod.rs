//! TLS with rustls, both towards clients and towards PostgreSQL.

pub mod der;
