//! A client's session: login, then forwarding between client and server with transaction
//! tracking, settings carried across servers, and cancel requests.

pub mod cancel;
pub mod error;
pub mod login;
pub mod params;
pub mod scan;
pub mod session;
pub mod tx_tracker;

pub use error::SessionError;
