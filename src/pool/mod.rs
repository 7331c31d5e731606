//! Server connections: opening and logging in, the instance-wide cap per (database, user),
//! each worker's idle list, and moving servers between workers.

pub mod auth_query;
pub mod busy;
pub mod connect;
pub mod error;
pub mod local;
pub mod prepared;
pub mod server;
pub mod settings;
pub mod shared;
pub mod target;

pub use auth_query::{AuthLookups, AuthQuery};
pub use error::PoolError;
pub use local::{LocalPool, PoolMsg, Postman};
pub use server::{ServerConn, ServerMeta, ServerParts, ServerRd, ServerWr};
pub use settings::Settings;
pub use shared::{PoolRegistry, SharedPool};
pub use target::{Credential, ServerTarget};
