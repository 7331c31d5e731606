//! max_busy_cores: a pool's budget of server busy time, shared by its workers.
//!
//! Busy time is the time a server is attached to a client, from the grant to the release:
//! what a transaction (under transaction pooling) costs the database. The meter keeps
//! the last second of it: finished attachments in a ring of ten 100 ms buckets keyed by
//! time, plus the attachments in progress, so a transaction running for seconds counts
//! while it runs. A new attachment is admitted only while the window holds less than
//! `max_busy_cores` seconds.
//!
//! An attachment in progress counts at least the pool's typical attachment (a moving
//! average of the recent ones): a new transaction costs nothing yet when it is
//! admitted, and without this the moment the window has room every waiting client would
//! be admitted at once, overshooting the budget by up to the pool size in transactions.
//!
//! Everything is atomics: workers attach and release concurrently, and nothing here
//! allocates. Limits: it measures time attached, not PostgreSQL CPU (a transaction
//! waiting on a lock counts); the window is one second in 100 ms steps; and when servers
//! attached for longer than the window and servers attached for less are in progress
//! together, each in-progress server counts as the average of their time (bounded by the
//! window), which may count some too high until they are released.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const BUCKET_US: u64 = 100_000;
const BUCKETS: usize = 10;
const WINDOW_US: u64 = BUCKET_US * BUCKETS as u64;

/// Microseconds since the first use, plus one (0 is never a time).
fn micros(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_micros() as u64 + 1
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn instant(us: u64) -> Instant {
    epoch() + Duration::from_micros(us.saturating_sub(1))
}

/// A bucket's number in its high 32 bits, its busy microseconds in the low 32 (up to
/// 4295 s a bucket: tens of thousands of servers busy throughout): one word, so a
/// bucket is reused for a new time and added to without a race.
fn pack(bucket: u64, us: u64) -> u64 {
    (bucket << 32) | us.min(u32::MAX as u64)
}

pub struct BusyMeter {
    /// Busy microseconds allowed per second: max_busy_cores × 10⁶; 0 is off.
    budget_us: AtomicU64,
    ring: [AtomicU64; BUCKETS],
    /// Attachments in progress: how many, and the sum of their start times. Updated
    /// between `began` and `ended` (counts of updates started and finished), so a reader
    /// can tell it saw the two together.
    attached: AtomicU64,
    starts: AtomicU64,
    began: AtomicU64,
    ended: AtomicU64,
    /// Busy microseconds ever recorded, for the metrics (a counter).
    total_us: AtomicU64,
    /// Moving average of recent attachments' length (µs, weight 1/8 to the newest).
    typical_us: AtomicU64,
}

impl Default for BusyMeter {
    fn default() -> BusyMeter {
        // Fixes the epoch before any time is taken for the meter.
        epoch();
        BusyMeter {
            budget_us: AtomicU64::new(0),
            ring: std::array::from_fn(|_| AtomicU64::new(0)),
            attached: AtomicU64::new(0),
            starts: AtomicU64::new(0),
            began: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            total_us: AtomicU64::new(0),
            typical_us: AtomicU64::new(0),
        }
    }
}

/// An attachment being metered. Ended at the release; dropped without that (the
/// server was lost with its client), it ends then, so the meter never keeps counting a
/// server that is gone.
pub struct BusyTicket {
    meter: Arc<BusyMeter>,
    start: u64,
}

impl std::fmt::Debug for BusyTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusyTicket").field("start", &self.start).finish()
    }
}

impl BusyTicket {
    pub fn end(mut self, now: Instant) {
        self.meter.detach(self.start, micros(now));
        self.start = 0;
    }
}

impl Drop for BusyTicket {
    fn drop(&mut self) {
        if self.start != 0 {
            self.meter.detach(self.start, micros(Instant::now()));
        }
    }
}

impl BusyMeter {
    /// Sets the budget in thousandths of a core; 0 turns it off.
    pub fn set_budget(&self, millicores: u32) {
        self.budget_us.store(u64::from(millicores) * 1000, SeqCst);
    }

    /// The budget in thousandths of a core; 0: off.
    pub fn budget_millicores(&self) -> u32 {
        (self.budget_us.load(SeqCst) / 1000) as u32
    }

    #[inline]
    pub fn is_on(&self) -> bool {
        self.budget_us.load(SeqCst) != 0
    }

    /// Busy seconds recorded so far (attachments ended), for the metrics.
    pub fn total_seconds(&self) -> f64 {
        self.total_us.load(SeqCst) as f64 / 1e6
    }

    /// Starts metering an attachment (the caller has checked the budget is on).
    pub fn attach(self: &Arc<Self>, now: Instant) -> BusyTicket {
        let start = micros(now);
        self.began.fetch_add(1, SeqCst);
        self.starts.fetch_add(start, SeqCst);
        self.attached.fetch_add(1, SeqCst);
        self.ended.fetch_add(1, SeqCst);
        BusyTicket {
            meter: self.clone(),
            start,
        }
    }

    fn detach(&self, start: u64, end: u64) {
        self.began.fetch_add(1, SeqCst);
        let _ = self.attached.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
        let _ = self.starts.fetch_update(SeqCst, SeqCst, |s| s.checked_sub(start));
        self.ended.fetch_add(1, SeqCst);
        self.record(start, end);
    }

    /// Adds a finished attachment to the buckets it overlaps within the window.
    fn record(&self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let length = end - start;
        self.total_us.fetch_add(length, SeqCst);
        let length = length.min(WINDOW_US);
        let _ = self.typical_us.fetch_update(SeqCst, SeqCst, |t| {
            Some(if t == 0 { length } else { t - t / 8 + length / 8 })
        });
        let last = end / BUCKET_US;
        let first = (start / BUCKET_US).max(last.saturating_sub(BUCKETS as u64 - 1));
        for b in first..=last {
            let from = start.max(b * BUCKET_US);
            let to = end.min((b + 1) * BUCKET_US);
            if to > from {
                self.add(b, to - from);
            }
        }
    }

    fn add(&self, bucket: u64, us: u64) {
        let slot = &self.ring[bucket as usize % BUCKETS];
        let _ = slot.fetch_update(SeqCst, SeqCst, |word| {
            let (b, have) = (word >> 32, word & u32::MAX as u64);
            match b.cmp(&bucket) {
                std::cmp::Ordering::Equal => Some(pack(bucket, have + us)),
                std::cmp::Ordering::Less => Some(pack(bucket, us)),
                // The slot moved on to a newer time: this is outside the window now.
                std::cmp::Ordering::Greater => None,
            }
        });
    }

    /// Busy microseconds of the attachments in progress: their time so far, or the
    /// typical attachment's if more, each counted up to the window.
    fn in_progress(&self, now: u64) -> u64 {
        let typical = self.typical_us.load(SeqCst);
        for _ in 0..4 {
            let ended = self.ended.load(SeqCst);
            let n = self.attached.load(SeqCst);
            let starts = self.starts.load(SeqCst);
            if self.began.load(SeqCst) == ended {
                let so_far = (n * now).saturating_sub(starts);
                return so_far.max(n * typical).min(n * WINDOW_US);
            }
        }
        // Updates keep racing the reading: count every attachment as the whole window.
        self.attached.load(SeqCst) * WINDOW_US
    }

    /// Busy microseconds within the window ending at `now`, and the busy time of each of
    /// the window's buckets, oldest first.
    fn window(&self, now: u64) -> (u64, [u64; BUCKETS]) {
        let current = now / BUCKET_US;
        let mut per = [0; BUCKETS];
        for (i, slot) in per.iter_mut().enumerate() {
            let Some(b) = (current + 1 + i as u64).checked_sub(BUCKETS as u64) else {
                continue;
            };
            let word = self.ring[b as usize % BUCKETS].load(SeqCst);
            if word >> 32 == b {
                *slot = word & u32::MAX as u64;
            }
        }
        (per.iter().sum::<u64>() + self.in_progress(now), per)
    }

    /// Whether the pool must hold back new attachments at `now`: `Some(at)` when the
    /// window is at the budget or over it, with when it will have room (as the buckets
    /// now in it slide out); None when there is room or the budget is off.
    pub fn over(&self, now: Instant) -> Option<Instant> {
        let budget = self.budget_us.load(SeqCst);
        if budget == 0 {
            return None;
        }
        let now_us = micros(now);
        let (used, per) = self.window(now_us);
        if used < budget {
            return None;
        }
        let current = now_us / BUCKET_US;
        let mut excess = used - budget + 1;
        for (i, us) in per.iter().enumerate() {
            // Bucket i (oldest first) leaves the window when bucket current + 1 + i begins.
            if *us >= excess {
                return Some(instant((current + 1 + i as u64) * BUCKET_US));
            }
            excess -= us;
        }
        // The servers attached now hold the budget: look again at the next step.
        Some(instant((current + 1) * BUCKET_US))
    }

    /// Busy microseconds in the window ending at `now` (for tests and SHOW).
    pub fn used_us(&self, now: Instant) -> u64 {
        self.window(micros(now)).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A meter with a budget (thousandths of a core), and a time on a bucket boundary so
    /// that steps from it are exact.
    fn aligned(millicores: u32) -> (Arc<BusyMeter>, Instant) {
        let meter = Arc::new(BusyMeter::default());
        meter.set_budget(millicores);
        (meter, instant((micros(Instant::now()) / BUCKET_US + 1) * BUCKET_US))
    }

    #[test]
    fn finished_time_slides_out_of_the_one_second_window() {
        let (meter, t0) = aligned(500);
        meter.attach(t0).end(t0 + ms(300));
        meter.attach(t0 + ms(300)).end(t0 + ms(500));
        assert_eq!(meter.used_us(t0 + ms(550)), 500_000);
        // At the budget: no room until the first 100 ms of it slide out.
        assert_eq!(meter.over(t0 + ms(550)), Some(t0 + ms(1000)));
        assert_eq!(meter.used_us(t0 + ms(1050)), 400_000);
        assert_eq!(meter.over(t0 + ms(1050)), None);
        assert_eq!(meter.used_us(t0 + ms(1550)), 0);
        assert!((meter.total_seconds() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn an_attachment_in_progress_counts_while_it_runs() {
        let meter = Arc::new(BusyMeter::default());
        meter.set_budget(1500);
        let t0 = Instant::now();
        let long = meter.attach(t0);
        assert_eq!(meter.used_us(t0 + ms(400)), 400_000);
        // A transaction running for seconds counts as one core, not its whole age.
        assert_eq!(meter.used_us(t0 + ms(5000)), 1_000_000);
        assert_eq!(meter.over(t0 + ms(5000)), None);
        let short = meter.attach(t0 + ms(5000));
        let at = t0 + ms(5500);
        assert!(meter.over(at).is_some(), "1.5 s busy within the last second");
        short.end(at);
        // Ended, it moves to the buckets: still 1.5 s in the window.
        assert!((meter.used_us(at) as i64 - 1_500_000).abs() <= 100_000);
        drop(long);
        assert_eq!(meter.attached.load(SeqCst), 0);
        assert_eq!(meter.starts.load(SeqCst), 0);
    }

    #[test]
    fn a_new_attachment_counts_as_a_typical_one_at_once() {
        let meter = Arc::new(BusyMeter::default());
        meter.set_budget(500);
        let t0 = Instant::now();
        meter.attach(t0).end(t0 + ms(200));
        let at = t0 + ms(200);
        assert_eq!(meter.over(at), None);
        // Admitted together, two more would go past the budget: the second waits.
        let _a = meter.attach(at);
        assert_eq!(meter.used_us(at), 400_000);
        assert_eq!(meter.over(at), None);
        let _b = meter.attach(at);
        assert_eq!(meter.used_us(at), 600_000);
        assert!(meter.over(at).is_some());
    }

    #[test]
    fn an_attachment_longer_than_the_window_records_only_the_window() {
        let (meter, t0) = aligned(100);
        meter.attach(t0).end(t0 + ms(3050));
        // The window is the current 100 ms bucket and the nine before it.
        assert_eq!(meter.used_us(t0 + ms(3050)), 950_000);
        assert_eq!(meter.used_us(t0 + ms(3950)), 50_000);
        assert_eq!(meter.used_us(t0 + ms(4050)), 0);
    }

    #[test]
    fn an_unset_budget_never_holds_back() {
        let meter = Arc::new(BusyMeter::default());
        let t0 = Instant::now();
        let _t = meter.attach(t0);
        assert_eq!(meter.over(t0 + ms(900)), None);
    }
}
