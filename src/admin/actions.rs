//! Console commands that change things: RELOAD, PAUSE, RESUME, KILL, SHUTDOWN.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::context::control::ControlMsg;
use crate::context::Instance;

pub fn reload(instance: &std::sync::Arc<Instance>) {
    instance.reload();
}

fn set_paused(instance: &Instance, database: Option<&str>, paused: bool) -> Result<(), String> {
    if let Some(db) = database {
        if !instance.config().databases.contains_key(db) {
            return Err(format!("no such database: {db}"));
        }
    }
    for p in instance.pools.all() {
        if database.is_none_or(|d| d == p.database) {
            p.paused.store(paused, Ordering::SeqCst);
        }
    }
    Ok(())
}

/// PAUSE: no new transactions get a server; returns once the running ones are done and
/// the servers are closed, as PgBouncer's PAUSE does.
pub async fn pause(instance: &Instance, database: Option<&str>) -> Result<(), String> {
    set_paused(instance, database, true)?;
    loop {
        let busy: i64 = instance
            .pools
            .all()
            .iter()
            .filter(|p| database.is_none_or(|d| d == p.database))
            .map(|p| p.stats.totals().servers_active)
            .sum();
        if busy <= 0 {
            break;
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = database.map(str::to_string);
    instance.broadcast(|| ControlMsg::CloseIdle { database: db.clone() });
    Ok(())
}

pub fn resume(instance: &Instance, database: Option<&str>) -> Result<(), String> {
    set_paused(instance, database, false)?;
    instance.broadcast(|| ControlMsg::Kick);
    Ok(())
}

/// KILL: drops the database's clients and servers at once; new clients wait until RESUME.
pub fn kill(instance: &Instance, database: &str) -> Result<(), String> {
    set_paused(instance, Some(database), true)?;
    let db = database.to_string();
    instance.broadcast(|| ControlMsg::Kill {
        database: Some(db.clone()),
    });
    Ok(())
}

/// SHUTDOWN: the same as SIGTERM, so the main thread runs the usual shutdown.
pub fn shutdown() {
    // SAFETY: sending a signal to our own process.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGTERM);
    }
}

impl crate::context::Instance {
    /// Whether a pool of this database is paused (for tests and SHOW DATABASES).
    pub fn is_paused(&self, database: &str) -> bool {
        self.pools
            .all()
            .iter()
            .any(|p| p.database == database && p.paused.load(Ordering::SeqCst))
    }
}
