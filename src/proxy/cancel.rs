//! Cancel requests. Each client gets its own BackendKeyData from pgsilo; a cancel request
//! arriving on any worker finds the client's slot here and is sent on to whichever
//! server runs that client's query right now.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use monoio::net::TcpStream;
use subtle::ConstantTimeEq;

use crate::protocol::frontend;
use crate::protocol::io::write_out;

/// The server side of a cancel: where the client's current server is and its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: u32,
    pub secret: u32,
}

/// One client's cancel state. Updated by its own worker at every server attach/detach
/// (uncontended), read by whichever worker receives a cancel request.
pub struct CancelSlot {
    pub secret: u32,
    target: Mutex<Option<CancelTarget>>,
}

impl CancelSlot {
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    pub fn get(&self) -> Option<CancelTarget> {
        *self.target.lock().unwrap_or_else(|p| p.into_inner())
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
            });
            slots.insert(pid, slot.clone());
            return (pid, slot);
        }
    }

    pub fn unregister(&self, pid: u32) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid);
    }

    /// The server to cancel for a client key, if the key is valid and the client has a
    /// server right now.
    pub fn lookup(&self, pid: u32, secret: &[u8]) -> Option<CancelTarget> {
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
        slot.get()
    }

    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sends a CancelRequest to PostgreSQL on a new connection, as libpq does.
pub async fn send_cancel(target: CancelTarget) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_addr(target.addr).await?;
    let mut out = Vec::with_capacity(16);
    frontend::cancel_request(&mut out, target.pid, &target.secret.to_be_bytes());
    let (res, _) = write_out(&mut stream, out).await;
    res.map_err(|e| std::io::Error::other(e.to_string()))?;
    // PostgreSQL closes the connection once it has read the request; waiting for that
    // keeps the cancel ordered before whatever the client does next.
    let buf = Vec::with_capacity(1);
    let _ = monoio::time::timeout(
        std::time::Duration::from_secs(5),
        monoio::io::AsyncReadRent::read(&mut stream, buf),
    )
    .await;
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
            addr: "127.0.0.1:5432".parse().unwrap(),
            pid: 99,
            secret: 7,
        };
        assert_eq!(reg.lookup(pid, &slot.secret.to_be_bytes()), None);
        slot.set(Some(target));
        assert_eq!(reg.lookup(pid, &slot.secret.to_be_bytes()), Some(target));
        assert_eq!(reg.lookup(pid, &slot.secret.wrapping_add(1).to_be_bytes()), None);
        assert_eq!(reg.lookup(pid, &[1, 2]), None);
        reg.unregister(pid);
        assert!(reg.is_empty());
    }
}
