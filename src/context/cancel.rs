//! Cancel requests. Each client gets its own BackendKeyData from pgsilo; a cancel request
//! arriving on any worker finds the client's slot here and is sent on to whichever
//! server runs that client's query right now.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::net::Endpoint;
use crate::protocol::frontend;
use crate::protocol::io::write_out;

/// The server side of a cancel: where the client's current server is and its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: Endpoint,
    pub pid: u32,
    pub secret: u32,
}

/// How long a cancel request to PostgreSQL may take, connect to close. A server with a
/// cancel in flight waits at most this (plus a margin) before going back to the pool.
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// One client's cancel state. Updated by its own worker at every server attach/detach
/// (uncontended), read by whichever worker receives a cancel request.
pub struct CancelSlot {
    pub secret: u32,
    target: Mutex<Option<CancelTarget>>,
    /// Cancel requests sent on for this client that PostgreSQL has not yet finished with.
    /// PostgreSQL signals the backend more than once per request (the process, then its
    /// process group) and a busy machine can run the client's next steps in between: a
    /// server handed to another client before the request is done could have that
    /// client's query cancelled. So a server leaves this client only once this is zero.
    in_flight: AtomicU32,
}

impl CancelSlot {
    /// Points the slot at the client's server (Some) or at nothing (None). After
    /// `set(None)` returns, no new cancel can reach the old target; those already
    /// looked up are counted in [`CancelSlot::in_flight`].
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    pub fn get(&self) -> Option<CancelTarget> {
        *self.target.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancel requests for this client still on their way to PostgreSQL.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// A cancel request being sent on: counted in its slot until dropped.
pub struct PendingCancel {
    slot: Arc<CancelSlot>,
    pub target: CancelTarget,
}

impl Drop for PendingCancel {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<u32, Arc<CancelSlot>>>,
}

impl CancelRegistry {
    /// Issues a fresh (pid, secret) pair for a client. The pid is random too, so keys
    /// reveal nothing about how many clients came before.
    pub fn register(&self) -> (u32, Arc<CancelSlot>) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // Positive as an int4, like a real pid, for clients that print it.
            let pid = rand::random::<u32>() & 0x7fff_ffff;
            if pid == 0 || slots.contains_key(&pid) {
                continue;
            }
            let slot = Arc::new(CancelSlot {
                secret: rand::random(),
                target: Mutex::new(None),
                in_flight: AtomicU32::new(0),
            });
            slots.insert(pid, slot.clone());
            return (pid, slot);
        }
    }

    /// Registers a client under the process id of the server it is bound to for its whole
    /// session, so the client's BackendKeyData, pg_backend_pid() and notifications'
    /// process ids agree. None if another client holds that key (a random one of
    /// pgsilo's, or a server of another database with the same pid).
    pub fn register_as(&self, pid: u32) -> Option<Arc<CancelSlot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if pid == 0 || pid > 0x7fff_ffff || slots.contains_key(&pid) {
            return None;
        }
        let slot = Arc::new(CancelSlot {
            secret: rand::random(),
            target: Mutex::new(None),
            in_flight: AtomicU32::new(0),
        });
        slots.insert(pid, slot.clone());
        Some(slot)
    }

    pub fn unregister(&self, pid: u32) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid);
    }

    /// The server to cancel for a client key, if the key is valid and the client has a
    /// server right now; counted as in flight until the returned value is dropped.
    pub fn lookup(&self, pid: u32, secret: &[u8]) -> Option<PendingCancel> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pid)
            .cloned()?;
        let ok: bool = secret.ct_eq(&slot.secret.to_be_bytes()).into();
        if !ok {
            return None;
        }
        // Counted under the target's lock, so a session that has cleared its target
        // and then sees zero knows no request can still reach its old server.
        let target = {
            let t = slot.target.lock().unwrap_or_else(|p| p.into_inner());
            let target = (*t)?;
            slot.in_flight.fetch_add(1, Ordering::AcqRel);
            target
        };
        Some(PendingCancel { slot, target })
    }

    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sends a CancelRequest to PostgreSQL on a new connection, as libpq does, and waits
/// (at most [`CANCEL_TIMEOUT`]) until PostgreSQL has acted on it.
pub async fn send_cancel(target: CancelTarget) -> std::io::Result<()> {
    monoio::time::timeout(CANCEL_TIMEOUT, send_cancel_inner(target))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn send_cancel_inner(target: CancelTarget) -> std::io::Result<()> {
    let mut stream = target.addr.connect().await?;
    let mut out = Vec::with_capacity(16);
    frontend::cancel_request(&mut out, target.pid, &target.secret.to_be_bytes());
    let (res, _) = write_out(&mut stream, out).await;
    res.map_err(|e| std::io::Error::other(e.to_string()))?;
    // PostgreSQL closes the connection once it has signalled the backend; waiting for
    // that keeps the cancel ordered before whatever the server does next.
    let buf = Vec::with_capacity(1);
    let _ = monoio::io::AsyncReadRent::read(&mut stream, buf).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_find_their_slot_only_with_the_right_secret() {
        let reg = CancelRegistry::default();
        let (pid, slot) = reg.register();
        let target = CancelTarget {
            addr: Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()),
            pid: 99,
            secret: 7,
        };
        let t = |p: Option<PendingCancel>| p.map(|p| p.target);
        assert_eq!(t(reg.lookup(pid, &slot.secret.to_be_bytes())), None);
        slot.set(Some(target));
        let pending = reg.lookup(pid, &slot.secret.to_be_bytes());
        assert_eq!(pending.as_ref().map(|p| p.target), Some(target));
        assert_eq!(slot.in_flight(), 1);
        drop(pending);
        assert_eq!(slot.in_flight(), 0);
        assert_eq!(t(reg.lookup(pid, &slot.secret.wrapping_add(1).to_be_bytes())), None);
        assert_eq!(t(reg.lookup(pid, &[1, 2])), None);
        assert_eq!(slot.in_flight(), 0);
        reg.unregister(pid);
        assert!(reg.is_empty());
    }
}
