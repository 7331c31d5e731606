//! Keeping the load generator's threads off the pooler's cores, where the machine allows.

/// Cores this process may run on (its affinity mask).
pub fn allowed_cores() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Where the generator's threads may run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CorePlan {
    /// Cores to restrict generator threads to; empty: do not pin.
    pub cores: Vec<usize>,
    /// Why the generator could not be kept off the cores it was asked to avoid.
    pub warning: Option<String>,
}

impl CorePlan {
    /// Plan for avoiding `avoid`, given the cores this process may use.
    pub fn new(avoid: &[usize], available: &[usize]) -> CorePlan {
        if avoid.is_empty() {
            return CorePlan::default();
        }
        let cores: Vec<usize> = available.iter().copied().filter(|c| !avoid.contains(c)).collect();
        if cores.is_empty() {
            return CorePlan {
                cores,
                warning: Some(format!(
                    "cannot keep the load generator off cores {}: this process may only run on \
                     cores {}; running unpinned, so the generator competes with the pooler \
                     (and PostgreSQL) for CPU",
                    list(avoid),
                    list(available)
                )),
            };
        }
        CorePlan { cores, warning: None }
    }

    pub fn describe(&self) -> String {
        if self.cores.is_empty() {
            "unpinned".into()
        } else {
            format!("pinned to cores {}", list(&self.cores))
        }
    }

    /// Restrict the calling thread to the planned cores (no-op when unpinned).
    pub fn apply_to_current_thread(&self) {
        if self.cores.is_empty() {
            return;
        }
        // SAFETY: as in allowed_cores; CPU_SET on indices below CPU_SETSIZE.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in &self.cores {
                if c < libc::CPU_SETSIZE as usize {
                    libc::CPU_SET(c, &mut set);
                }
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// Give the calling thread real-time (SCHED_FIFO) priority, so the generator's pacing
/// and the victim's sends are not delayed by whatever else wants the CPU. The victim does
/// little work per query, so this cannot starve the system (and the kernel's RT
/// throttling would stop it anyway). Fails without CAP_SYS_NICE.
pub fn set_realtime(priority: i32) -> Result<(), String> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; param is a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

fn list(cores: &[usize]) -> String {
    cores.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        assert_eq!(CorePlan::new(&[], &[0, 1]), CorePlan::default());
        let p = CorePlan::new(&[0, 1], &[0, 1, 2, 3]);
        assert_eq!(p.cores, vec![2, 3]);
        assert!(p.warning.is_none());
        let p = CorePlan::new(&[0, 1], &[0, 1]);
        assert!(p.cores.is_empty());
        assert!(p.warning.unwrap().contains("running unpinned"));
        assert!(!allowed_cores().is_empty());
    }
}
