//! What a client session and the admin console need from their process and their worker,
//! below both: the instance's shared state (`Instance`), the worker's (`WorkerCtx`),
//! control messages and session signals, and the cancel registry. `runtime` starts the
//! threads and calls into `proxy` and `admin`; they reach their surroundings only through
//! this module, so every import points down.

pub mod cancel;
pub mod control;
pub mod instance;
pub mod listen;
pub mod logins;
pub mod worker;

pub use instance::{Instance, Phase, WorkerInfo};
pub use worker::WorkerCtx;
