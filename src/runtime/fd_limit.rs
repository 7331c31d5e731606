//! The open-file limit: every client, login in progress and server connection is a
//! descriptor. At start the soft limit is raised to the hard one (a login shell's 1024
//! would refuse a flood's worth of sockets long before the budgets do), and the limit is
//! compared with what the configuration may need, as PgBouncer logs it.

use crate::config::{Config, Userlist};

/// Descriptors beyond clients and servers: listeners, the takeover and metrics sockets,
/// io_uring, log and config files.
const OVERHEAD: u64 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// The process's RLIMIT_NOFILE.
pub fn current() -> std::io::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `lim` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(FdLimit {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// Raises the soft limit to the hard limit if it is lower. Returns the limit now in force
/// and the soft limit before, when it was raised.
pub fn raise_to_hard() -> std::io::Result<(FdLimit, Option<u64>)> {
    let before = current()?;
    if before.soft >= before.hard {
        return Ok((before, None));
    }
    let lim = libc::rlimit {
        rlim_cur: before.hard,
        rlim_max: before.hard,
    };
    // SAFETY: setrlimit reads one rlimit struct; raising the soft limit up to the hard
    // one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((current()?, Some(before.soft)))
}

/// What the configuration may hold open at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpectedFds {
    pub max_client_conn: u64,
    pub max_pending_logins: u64,
    /// Server connections: each database's pool size and reserve, per user unless the
    /// database forces one (PgBouncer's estimate; `*` counts as one database).
    pub servers: u64,
}

impl ExpectedFds {
    pub fn of(config: &Config, userlist: &Userlist) -> ExpectedFds {
        let g = &config.general;
        let users = userlist.len().max(1) as u64;
        let servers = config
            .databases
            .values()
            .map(|db| {
                let per_pool = (db.effective_pool_size(g) + db.effective_reserve_pool(g)) as u64;
                let pools = if db.user.is_some() { 1 } else { users };
                let all = per_pool * pools;
                match db.max_db_connections {
                    0 => all,
                    cap => all.min(cap as u64),
                }
            })
            .sum();
        ExpectedFds {
            max_client_conn: g.max_client_conn as u64,
            max_pending_logins: g.max_pending_logins as u64,
            servers,
        }
    }

    pub fn total(&self) -> u64 {
        self.max_client_conn + self.max_pending_logins + self.servers + OVERHEAD
    }

    /// The warning to log when `limit` is below what may be needed.
    pub fn shortfall(&self, limit: FdLimit) -> Option<String> {
        (limit.soft < self.total()).then(|| {
            format!(
                "file descriptor limit {} (hard: {}) is below the {} that max_client_conn ({}) + max_pending_logins ({}) + server connections ({}) may need: \
                 past it, new connections fail to be accepted; raise LimitNOFILE= (systemd) or ulimit -n, or lower the budgets",
                limit.soft,
                limit.hard,
                self.total(),
                self.max_client_conn,
                self.max_pending_logins,
                self.servers
            )
        })
    }
}

/// At start (`raise`): raises the soft limit to the hard one and logs the limit with
/// what the configuration may need, as PgBouncer's "kernel file descriptor limit" line;
/// at start and on reload, warns when the limit is short.
pub fn check(config: &Config, userlist: &Userlist, raise: bool) {
    let limit = if raise {
        raise_to_hard()
    } else {
        current().map(|l| (l, None))
    };
    let (limit, raised_from) = match limit {
        Ok(l) => l,
        Err(e) => {
            log::warn!("cannot read or raise the file descriptor limit (RLIMIT_NOFILE): {e}");
            return;
        }
    };
    let expected = ExpectedFds::of(config, userlist);
    if let Some(from) = raised_from {
        log::info!(
            "file descriptor limit raised from {from} to the hard limit {}",
            limit.hard
        );
    }
    if raise {
        log::info!(
            "kernel file descriptor limit: {} (hard: {}); max_client_conn: {}, max_pending_logins: {}, max expected fd use: {}",
            limit.soft,
            limit.hard,
            expected.max_client_conn,
            expected.max_pending_logins,
            expected.total()
        );
    }
    if let Some(warning) = expected.shortfall(limit) {
        log::warn!("{warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected(max_client_conn: u64, max_pending_logins: u64, servers: u64) -> ExpectedFds {
        ExpectedFds {
            max_client_conn,
            max_pending_logins,
            servers,
        }
    }

    #[test]
    fn a_limit_below_clients_logins_and_servers_is_reported() {
        let e = expected(100, 1000, 40);
        assert_eq!(e.total(), 1172);
        let low = FdLimit { soft: 1024, hard: 4096 };
        let warning = e.shortfall(low).unwrap();
        assert!(
            warning.starts_with("file descriptor limit 1024 (hard: 4096) is below the 1172"),
            "{warning}"
        );
        assert_eq!(e.shortfall(FdLimit { soft: 4096, hard: 4096 }), None);
    }

    #[test]
    fn the_limit_is_read_and_raising_it_never_lowers_it() {
        let before = current().unwrap();
        assert!(before.soft <= before.hard);
        let (now, raised_from) = raise_to_hard().unwrap();
        assert_eq!(now.soft, now.hard);
        assert!(now.soft >= before.soft);
        assert_eq!(raised_from.is_some(), before.soft < before.hard);
    }
}
