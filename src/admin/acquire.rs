//! SHOW ACQUIRE: per pool and per path (idle, released, other_worker, new), how many
//! times clients got a server that way and how long they waited, as a histogram. A
//! command of its own: SHOW STATS keeps PgBouncer's columns for the tools that parse them.

use super::result::{n, t, ResultSet};
use crate::context::Instance;
use crate::metrics::histogram::BOUNDS_US;
use crate::metrics::AcquirePath;
use crate::protocol::backend::ColumnType::{Int8, Text};

/// One column per histogram bucket, named by its upper bound; each counts the waits in
/// that bucket alone (not cumulative).
const BUCKET_COLUMNS: [&str; BOUNDS_US.len() + 1] = [
    "le_100us", "le_250us", "le_500us", "le_1ms", "le_2_5ms", "le_5ms", "le_10ms", "le_25ms", "le_50ms", "le_100ms",
    "le_250ms", "le_500ms", "le_1s", "le_2_5s", "le_5s", "le_10s", "over_10s",
];

pub fn show(instance: &Instance) -> ResultSet {
    let mut columns = vec![
        ("database", Text),
        ("user", Text),
        ("path", Text),
        ("count", Int8),
        ("total_wait_us", Int8),
        ("avg_wait_us", Int8),
    ];
    columns.extend(BUCKET_COLUMNS.iter().map(|c| (*c, Int8)));
    let mut rs = ResultSet::new(&columns);
    for p in instance.pools.all() {
        let totals = p.stats.totals();
        for path in AcquirePath::ALL {
            let h = totals.acquire.path(path);
            let mut row = vec![
                t(&p.database),
                t(&p.user),
                t(path.as_str()),
                n(h.count),
                n(h.sum_us),
                n(h.sum_us.checked_div(h.count).unwrap_or(0)),
            ];
            row.extend(h.buckets.iter().map(|b| n(*b)));
            rs.row(row);
        }
    }
    rs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_columns_follow_the_histogram_bounds() {
        let names: Vec<String> = BOUNDS_US
            .iter()
            .map(|&us| match us {
                us if us < 1_000 => format!("le_{us}us"),
                us if us < 1_000_000 => format!("le_{}ms", (us as f64 / 1e3).to_string().replace('.', "_")),
                us => format!("le_{}s", (us as f64 / 1e6).to_string().replace('.', "_")),
            })
            .chain(["over_10s".to_string()])
            .collect();
        assert_eq!(names, BUCKET_COLUMNS);
    }
}
