//! Every stats_period: per-database averages for SHOW STATS, and PgBouncer's stats log
//! line (in PgBouncer's words; off with log_stats = 0). Runs on its own thread, away from
//! the workers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::context::{Instance, Phase};
use crate::metrics::{Averages, PoolTotals};

fn by_database(instance: &Instance) -> BTreeMap<String, PoolTotals> {
    let mut m: BTreeMap<String, PoolTotals> = BTreeMap::new();
    for p in instance.pools.all() {
        m.entry(p.database.clone()).or_default().add(&p.stats.totals());
    }
    m
}

fn average(now: &PoolTotals, before: &PoolTotals, secs: f64) -> Averages {
    let d = |a: u64, b: u64| a.saturating_sub(b);
    let per = |total: u64, count: u64| total.checked_div(count).unwrap_or(0);
    let xacts = d(now.xact_count, before.xact_count);
    let queries = d(now.query_count, before.query_count);
    let waits = d(now.wait_time.count, before.wait_time.count);
    Averages {
        xact_count: (xacts as f64 / secs) as u64,
        query_count: (queries as f64 / secs) as u64,
        recv: (d(now.bytes_received, before.bytes_received) as f64 / secs) as u64,
        sent: (d(now.bytes_sent, before.bytes_sent) as f64 / secs) as u64,
        xact_time: per(d(now.xact_time_us, before.xact_time_us), xacts),
        query_time: per(d(now.query_time_us, before.query_time_us), queries),
        wait_time: per(d(now.wait_time_us, before.wait_time_us), waits),
    }
}

pub fn spawn(instance: Arc<Instance>) {
    let name = format!("{}:stats", instance.name);
    let _ = std::thread::Builder::new().name(name).spawn(move || {
        let mut before = by_database(&instance);
        let mut at = Instant::now();
        loop {
            let period = instance.config().general.stats_period.max(Duration::from_secs(1));
            // Sleep in short steps so shutdown is not held up by a long period.
            while at.elapsed() < period {
                if instance.phase() >= Phase::Exiting {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200).min(period));
            }
            let now = by_database(&instance);
            let secs = at.elapsed().as_secs_f64();
            at = Instant::now();
            let mut all = Averages::default();
            let mut all_now = PoolTotals::default();
            let mut all_before = PoolTotals::default();
            let mut averages = BTreeMap::new();
            for (db, t) in &now {
                let b = before.get(db).cloned().unwrap_or_default();
                averages.insert(db.clone(), average(t, &b, secs));
                all_now.add(t);
                all_before.add(&b);
            }
            if !now.is_empty() {
                all = average(&all_now, &all_before, secs);
            }
            instance.set_averages(averages);
            if !instance.config().general.log_stats {
                before = now;
                continue;
            }
            log::info!(
                "stats: {} xacts/s, {} queries/s, in {} B/s, out {} B/s, xact {} us, query {} us, wait {} us",
                all.xact_count,
                all.query_count,
                all.recv,
                all.sent,
                all.xact_time,
                all.query_time,
                all.wait_time
            );
            before = now;
        }
    });
}
