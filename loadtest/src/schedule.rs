//! The open-loop schedule: when each query is meant to start, a pacing thread that hands
//! each slot to its sender on time, and the sender loop that measures latency from the
//! intended start.
//!
//! No coordinated omission: a sender whose previous query stalled does not skip the slots
//! that came due meanwhile. It sends them late, one after another, and each one's latency
//! is counted from its intended start, so a stall counts in full for every query it held up.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::errors::ErrLabel;

/// One scheduled query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Position in the global schedule (0, 1, 2, ...).
    pub index: u64,
    /// When the query is meant to start.
    pub intended: Instant,
}

/// A fixed rate from `start` until `end` (exclusive): slot `i` is due at `start + i / rate`.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub start: Instant,
    pub end: Instant,
    pub rate: f64,
}

impl Schedule {
    pub fn new(start: Instant, end: Instant, rate: f64) -> Schedule {
        assert!(rate > 0.0 && rate.is_finite(), "rate must be positive");
        assert!(end >= start, "schedule ends before it starts");
        Schedule { start, end, rate }
    }

    /// Offset of slot `index` from the start (computed from the index, so no drift).
    pub fn offset(&self, index: u64) -> Duration {
        Duration::from_nanos((index as f64 * 1e9 / self.rate).round() as u64)
    }

    pub fn intended(&self, index: u64) -> Instant {
        self.start + self.offset(index)
    }

    /// Number of slots due before `end`.
    pub fn len(&self) -> u64 {
        let span = self.end - self.start;
        let mut n = (span.as_secs_f64() * self.rate).ceil() as u64;
        while n > 0 && self.offset(n - 1) >= span {
            n -= 1;
        }
        while self.offset(n) < span {
            n += 1;
        }
        n
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        (0..self.len()).map(move |index| Slot {
            index,
            intended: self.intended(index),
        })
    }

    /// Which of `senders` connections sends slot `index` (round robin, so each connection
    /// runs at rate / senders, evenly interleaved).
    pub fn sender_of(index: u64, senders: usize) -> usize {
        (index % senders as u64) as usize
    }
}

/// Start the pacing thread: at each slot's intended time it hands the slot to its
/// sender's queue. A busy sender's queue grows; nothing is dropped. It stops after the
/// last slot (dropping the queues, which ends the senders once they drain) or when `stop`
/// is set. Returns the number of slots dispatched.
pub fn spawn_pacer(
    schedule: Schedule,
    queues: Vec<UnboundedSender<Slot>>,
    stop: Arc<AtomicBool>,
    on_start: impl FnOnce() + Send + 'static,
) -> JoinHandle<u64> {
    assert!(!queues.is_empty());
    std::thread::Builder::new()
        .name("loadtest-pacer".into())
        .spawn(move || {
            on_start();
            precise_timers();
            let mut dispatched = 0;
            for slot in schedule.slots() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                sleep_until(slot.intended, &stop);
                let q = &queues[Schedule::sender_of(slot.index, queues.len())];
                if q.send(slot).is_ok() {
                    dispatched += 1;
                }
            }
            dispatched
        })
        .expect("spawn pacer thread")
}

/// Ask the kernel not to coalesce this thread's timer wake-ups (default slack is 50 µs).
pub fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Sleep on this thread until `t` (in bounded steps, so `stop` is noticed).
fn sleep_until(t: Instant, stop: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= t || stop.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep((t - now).min(Duration::from_millis(100)));
    }
}

/// What a sender calls for each slot: run the query, finishing by `deadline`.
pub trait Service {
    fn call(&mut self, slot: Slot, deadline: Instant) -> impl Future<Output = Result<(), ErrLabel>>;
}

/// The result of one slot.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub slot: Slot,
    /// When the sender started it (≥ intended).
    pub sent: Instant,
    pub done: Instant,
    pub result: Result<(), ErrLabel>,
    /// The generator's own lateness: `sent − intended` when the sender was free at the
    /// intended time (so any lateness was the pacer's or the runtime's, not the server's);
    /// `None` when the sender was still busy with an earlier query.
    pub generator_lag: Option<Duration>,
}

impl Outcome {
    /// Latency from the intended start: includes any time the query waited for its turn.
    pub fn latency(&self) -> Duration {
        self.done.saturating_duration_since(self.slot.intended)
    }

    /// Time from actual send to answer (what a closed-loop tool would report).
    pub fn service_time(&self) -> Duration {
        self.done.saturating_duration_since(self.sent)
    }
}

/// One sender: takes its slots in order, never skips one. A slot whose deadline
/// (`intended + timeout`) passed before its turn came is not sent and counts as a timeout.
pub async fn run_sender<S: Service>(
    mut queue: UnboundedReceiver<Slot>,
    service: &mut S,
    timeout: Duration,
    mut sink: impl FnMut(Outcome),
) {
    let mut prev_done: Option<Instant> = None;
    while let Some(slot) = queue.recv().await {
        let sent = Instant::now();
        let free_in_time = prev_done.is_none_or(|d| d <= slot.intended);
        let generator_lag = free_in_time.then(|| sent.saturating_duration_since(slot.intended));
        let deadline = slot.intended + timeout;
        let result = if sent >= deadline {
            Err(ErrLabel::new(
                "timeout",
                "not sent: its connection was busy until past the deadline",
            ))
        } else {
            service.call(slot, deadline).await
        };
        let done = Instant::now();
        prev_done = Some(done);
        sink(Outcome {
            slot,
            sent,
            done,
            result,
            generator_lag,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::unbounded_channel;

    #[test]
    fn intended_times_follow_the_rate_without_drift() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, t0 + Duration::from_secs(2), 500.0);
        assert_eq!(s.len(), 1000);
        assert_eq!(s.intended(0), t0);
        assert_eq!(s.offset(1), Duration::from_millis(2));
        assert_eq!(s.offset(999), Duration::from_millis(1998));
        // Computed from the index, not accumulated: no drift after a million slots.
        assert_eq!(s.offset(1_000_000), Duration::from_secs(2000));
        let slots: Vec<Slot> = s.slots().collect();
        assert_eq!(slots.len(), 1000);
        assert!(slots.windows(2).all(|w| w[1].intended > w[0].intended));
        assert!(slots.iter().all(|x| x.intended < s.end));

        // Fractional rates and boundaries: 3/s for 1 s is slots at 0, 1/3, 2/3.
        let s = Schedule::new(t0, t0 + Duration::from_secs(1), 3.0);
        assert_eq!(s.len(), 3);
        let s = Schedule::new(t0, t0 + Duration::from_millis(1001), 3.0);
        assert_eq!(s.len(), 4);
        let s = Schedule::new(t0, t0, 3.0);
        assert!(s.is_empty());
    }

    #[test]
    fn slots_are_spread_round_robin_over_senders() {
        let mut per = [0u32; 8];
        for i in 0..800 {
            per[Schedule::sender_of(i, 8)] += 1;
        }
        assert!(per.iter().all(|&n| n == 100));
        assert_eq!(Schedule::sender_of(9, 8), 1);
    }

    /// A fake server: answers at once, except that slot `stall_at` takes `stall`.
    struct Stalling {
        stall_at: u64,
        stall: Duration,
        calls: Vec<u64>,
    }

    impl Service for Stalling {
        async fn call(&mut self, slot: Slot, _deadline: Instant) -> Result<(), ErrLabel> {
            self.calls.push(slot.index);
            if slot.index == self.stall_at {
                tokio::time::sleep(self.stall).await;
            }
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stalled_sender_skips_no_slot_and_counts_the_stall_in_full() {
        let period = Duration::from_millis(10);
        let stall = Duration::from_millis(150);
        let t0 = Instant::now() + Duration::from_millis(20);
        let schedule = Schedule::new(t0, t0 + period * 30, 100.0);
        let (tx, rx) = unbounded_channel();
        let pacer = spawn_pacer(schedule.clone(), vec![tx], Arc::default(), || {});
        let mut svc = Stalling {
            stall_at: 3,
            stall,
            calls: Vec::new(),
        };
        let mut outcomes = Vec::new();
        run_sender(rx, &mut svc, Duration::from_secs(10), |o| outcomes.push(o)).await;
        assert_eq!(pacer.join().unwrap(), 30);

        // Every slot was sent, in order, none skipped.
        assert_eq!(svc.calls, (0..30).collect::<Vec<_>>());
        assert_eq!(outcomes.len(), 30);
        for (i, o) in outcomes.iter().enumerate() {
            assert_eq!(o.slot.index, i as u64);
            assert_eq!(o.slot.intended, schedule.intended(i as u64));
            assert!(o.sent >= o.slot.intended, "slot {i} sent before its time");
            assert!(o.result.is_ok());
            assert_eq!(o.latency(), o.done - o.slot.intended);
        }
        // The stalled query itself.
        assert!(outcomes[3].latency() >= stall);
        // Queries held up behind it: answered instantly once sent, but their latency
        // from the intended start includes the wait (slot 3 + k is due 10k ms after it).
        for k in 1..=10u32 {
            let o = &outcomes[3 + k as usize];
            assert!(
                o.latency() >= stall.saturating_sub(period * k),
                "slot {} latency {:?} should include the stall",
                3 + k,
                o.latency()
            );
            assert!(o.generator_lag.is_none(), "a busy sender is not generator lag");
        }
        // Caught up: slots after the stall went out back to back until the schedule was
        // reached again, then on time (the sender was free at their intended time).
        assert!(outcomes[4].sent >= outcomes[3].done);
        assert!(outcomes[29].generator_lag.is_some());
        assert!(outcomes[0].generator_lag.is_some());
    }

    struct Never;
    impl Service for Never {
        async fn call(&mut self, _slot: Slot, deadline: Instant) -> Result<(), ErrLabel> {
            tokio::time::sleep_until(deadline.into()).await;
            Err(ErrLabel::timeout("query"))
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn slots_past_their_deadline_count_as_timeouts_not_skips() {
        let t0 = Instant::now();
        let schedule = Schedule::new(t0, t0 + Duration::from_millis(100), 100.0);
        let (tx, rx) = unbounded_channel();
        let pacer = spawn_pacer(schedule, vec![tx], Arc::default(), || {});
        let mut outcomes = Vec::new();
        run_sender(rx, &mut Never, Duration::from_millis(30), |o| outcomes.push(o)).await;
        pacer.join().unwrap();
        assert_eq!(outcomes.len(), 10);
        assert!(outcomes.iter().all(|o| o.result.is_err()));
        // Deadlines come from the intended time: the whole run ends about one timeout
        // after the last slot, not ten timeouts later.
        assert!(outcomes[9].done - t0 < Duration::from_millis(100 + 30 + 200));
        assert!(outcomes.iter().all(|o| o.latency() >= Duration::from_millis(29)));
    }
}
