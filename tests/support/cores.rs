//! Which cores a test may pin pgsilo's workers to.

use std::collections::BTreeSet;

/// "0-2,5" -> {0, 1, 2, 5}
pub fn parse_cpu_list(list: &str) -> BTreeSet<usize> {
    let mut cpus = BTreeSet::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => {
                cpus.insert(part.parse::<usize>().unwrap());
            }
        }
    }
    cpus
}

/// Cores this test process may use.
pub fn available_cores() -> BTreeSet<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    parse_cpu_list(
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list in /proc/self/status"),
    )
}
