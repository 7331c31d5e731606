//! Integration-test harness: throwaway real PostgreSQL clusters, and real pgsilo processes
//! in front of them.
//!
//! Use from a test file with `mod support;` and then `support::PgCluster::start()`; start
//! pgsilo with `support::Pgsilo::builder()` (see [`pgsilo`]); talk raw protocol with
//! [`wire::Raw`]; make TLS certificates with [`TestCerts`] (see [`tls`]) and give them to
//! a cluster with `PgCluster::builder().ssl(&certs)`.
//!
//! A template data directory (roles, databases, pg_hba; see [`PgCluster`]) is built once
//! per PostgreSQL version and setup revision under the cargo target dir; each cluster is a
//! `cp -a` of it in its own scratch dir (on /dev/shm when roomy, else $TMPDIR) with its own
//! postmaster on a free 127.0.0.1 port. Dropping a [`PgCluster`] stops it (immediate mode)
//! and removes its directory; clusters left by a killed test process are removed by the
//! next one. When root, the server runs as `postgres` (else `nobody`).
//!
//! Environment knobs: `PG_BINDIR` (which install to use), `PGSILO_TEST_TMPDIR` (where
//! scratch dirs go), `PGSILO_KEEP_TEST_CLUSTERS=1` (keep them after drop, for debugging).

#![allow(dead_code)]

pub mod cores;
pub mod nspawn;
mod pgsilo;
mod ports;
mod postgres;
mod process;
pub mod tls;
pub mod txpool;
pub mod wire;

#[allow(unused_imports)]
pub use pgsilo::{
    connect_with, db_error, must_fail, pgsilo_bin, runtime, simple_rows, toml_str, Db, Failed, Pgsilo, PgsiloBuilder,
};
#[allow(unused_imports)]
pub use ports::{free_port, wait_for_port};
#[allow(unused_imports)]
pub use postgres::{pg_bindir, PgCluster, PgClusterBuilder};
#[allow(unused_imports)]
pub use tls::{fingerprint, fingerprint_file, psql_conninfo, served_cert_fingerprint, TestCerts};
