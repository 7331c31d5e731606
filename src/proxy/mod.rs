//! A client's session: login, then forwarding between client and server with transaction
//! tracking, settings carried across servers, and cancel requests.

pub mod downstream;
pub mod error;
pub mod expect;
pub mod login;
pub mod params;
pub mod prepared;
pub mod retry;
pub mod session;
pub mod sql_scan;
pub mod tx_tracker;
pub mod upstream;

pub use error::SessionError;
