//! Client authentication (trust, plain, md5, SCRAM-SHA-256[-PLUS]) and the pooler's own login to PostgreSQL.
//!
//! Everything here is pure: byte-in/byte-out state machines and checks, no I/O. The proxy
//! moves the wire messages and calls in.

pub mod cleartext;
pub mod error;
pub mod md5;
pub mod scram_client;
pub mod scram_common;
pub mod scram_server;
pub mod scram_verifier;
pub mod secret;

pub use cleartext::verify_cleartext;
pub use error::AuthError;
pub use md5::{md5_salted_response, md5_secret, verify_md5_response};
pub use scram_client::{ScramClient, ScramClientKeys};
pub use scram_common::{CHANNEL_BINDING_TYPE, DEFAULT_ITERATIONS, MAX_ITERATIONS, MECHANISM, MECHANISM_PLUS};
pub use scram_server::{ScramServer, ScramSuccess};
pub use scram_verifier::{mock_salt, new_scram_secret, scram_secret_from_password, scram_verifier_for};
pub use secret::{ScramSecret, Secret, SecretError};
