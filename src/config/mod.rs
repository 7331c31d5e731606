//! The instance's configuration: the config file (pgsilo's TOML, or a PgBouncer ini read
//! as it is) and the auth_file it names.
//!
//! Key names, defaults and the auth_file format follow PgBouncer. Loading reports every
//! problem found, each with its file and, where there is one, its line.

mod check;
mod convert;
mod database;
mod error;
mod front_door;
mod general;
mod ini;
mod load;
mod section;
mod userlist;
mod value;

pub use check::{check, check_with, Checked};
pub use convert::{convert, Converted};
pub use database::{Database, RESERVED_DATABASE_NAMES};
pub use error::{ConfigError, FileKind, Notice, Problem};
pub use front_door::{parse_protocols, ClientTls, FrontDoor, ServerTls, SslMode, UnixSocket};
pub use general::{cores_text, AuthType, General, PoolMode, UserSettings};
pub use ini::is_pgbouncer_config;
pub use load::{Config, FALLBACK_DATABASE};
pub use userlist::Userlist;
