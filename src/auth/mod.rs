//! Client authentication (trust, plain, md5, SCRAM-SHA-256) and the pooler's own login to PostgreSQL.

pub mod secret;

pub use secret::{ScramSecret, Secret, SecretError};
