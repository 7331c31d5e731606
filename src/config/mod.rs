//! The instance's configuration: the TOML config file and the auth_file it names.
//!
//! Key names, defaults and the auth_file format follow PgBouncer. Loading reports every
//! problem found, each with its file and, where there is one, its line.

mod check;
mod database;
mod error;
mod front_door;
mod general;
mod load;
mod section;
mod userlist;
mod value;

pub use check::check;
pub use database::{Database, RESERVED_DATABASE_NAMES};
pub use error::{ConfigError, FileKind, Problem};
pub use front_door::{parse_protocols, ClientTls, FrontDoor, ServerTls, SslMode, UnixSocket};
pub use general::{AuthType, General, PoolMode};
pub use load::Config;
pub use userlist::Userlist;
