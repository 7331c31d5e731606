//! The victim tenant's load: open-loop queries over a few connections, a connect probe,
//! and the per-phase bookkeeping.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::errors::{ErrLabel, ErrorCounts};
use crate::hist::{new_hist, record};
use crate::schedule::{Outcome, Schedule, Service, Slot};
use crate::target::Target;

/// The measured phases, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Victim alone.
    Baseline,
    /// Victim and aggressor.
    Contention,
    /// Victim alone again.
    Recovery,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Baseline, Phase::Contention, Phase::Recovery];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Baseline => "baseline",
            Phase::Contention => "contention",
            Phase::Recovery => "recovery",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// When each phase starts: warm-up, then three phases of equal length from `t0`.
#[derive(Clone, Copy, Debug)]
pub struct PhaseClock {
    pub warmup_start: Instant,
    /// Start of the baseline phase.
    pub t0: Instant,
    pub phase_len: Duration,
    /// Wall-clock time of `t0`, for the interval log.
    pub t0_wall: SystemTime,
}

impl PhaseClock {
    pub fn new(warmup_start: Instant, warmup: Duration, phase_len: Duration) -> PhaseClock {
        let t0 = warmup_start + warmup;
        let t0_wall = SystemTime::now() + t0.saturating_duration_since(Instant::now());
        PhaseClock {
            warmup_start,
            t0,
            phase_len,
            t0_wall,
        }
    }

    /// The phase an instant falls in; `None` during warm-up or after the end.
    pub fn phase_of(&self, t: Instant) -> Option<Phase> {
        if t < self.t0 {
            return None;
        }
        let i = ((t - self.t0).as_nanos() / self.phase_len.as_nanos().max(1)) as usize;
        Phase::ALL.get(i).copied()
    }

    pub fn start_of(&self, p: Phase) -> Instant {
        self.t0 + self.phase_len * p.index() as u32
    }

    pub fn end_of(&self, p: Phase) -> Instant {
        self.start_of(p) + self.phase_len
    }

    pub fn end(&self) -> Instant {
        self.end_of(Phase::Recovery)
    }
}

/// Length of each interval-log histogram.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Everything measured for the victim in one phase.
#[derive(Clone, Debug)]
pub struct PhaseStats {
    /// Successful queries: latency from intended start, µs.
    pub latency: Histogram<u64>,
    /// Successful queries: time from actual send to answer, µs.
    pub service: Histogram<u64>,
    pub ok: u64,
    pub errors: ErrorCounts,
    /// The generator's own lateness (see [`Outcome::generator_lag`]), µs.
    pub send_lag: Histogram<u64>,
    /// Queries whose connection was still busy at their intended time.
    pub queued_behind: u64,
    /// New victim connections (probe and reconnects) that succeeded: latency, µs.
    pub connect: Histogram<u64>,
    pub connect_ok: u64,
    pub connect_errors: ErrorCounts,
    /// Of the above, how many were reconnects of query connections.
    pub reconnects: u64,
    /// Per-interval latency histograms (for the interval log), from the phase start.
    pub intervals: Vec<Histogram<u64>>,
}

impl Default for PhaseStats {
    fn default() -> Self {
        PhaseStats {
            latency: new_hist(),
            service: new_hist(),
            ok: 0,
            errors: ErrorCounts::default(),
            send_lag: new_hist(),
            queued_behind: 0,
            connect: new_hist(),
            connect_ok: 0,
            connect_errors: ErrorCounts::default(),
            reconnects: 0,
            intervals: Vec::new(),
        }
    }
}

impl PhaseStats {
    /// Queries accounted for (answered or failed).
    pub fn queries(&self) -> u64 {
        self.ok + self.errors.total()
    }
}

/// The victim's measurements, attributed to phases by each event's intended start.
#[derive(Debug)]
pub struct Recorder {
    pub clock: PhaseClock,
    pub phases: [PhaseStats; 3],
    /// Warm-up results, kept apart and not reported as a phase.
    pub warmup: PhaseStats,
}

impl Recorder {
    pub fn new(clock: PhaseClock) -> Recorder {
        Recorder {
            clock,
            phases: Default::default(),
            warmup: PhaseStats::default(),
        }
    }

    fn stats_for(&mut self, t: Instant) -> Option<(&mut PhaseStats, Duration)> {
        if t < self.clock.warmup_start {
            return None;
        }
        match self.clock.phase_of(t) {
            Some(p) => {
                let since = t - self.clock.start_of(p);
                Some((&mut self.phases[p.index()], since))
            }
            None if t < self.clock.t0 => Some((&mut self.warmup, Duration::ZERO)),
            None => None,
        }
    }

    pub fn record_query(&mut self, o: &Outcome) {
        let Some((st, since)) = self.stats_for(o.slot.intended) else {
            return;
        };
        match &o.result {
            Ok(()) => {
                st.ok += 1;
                record(&mut st.latency, o.latency());
                record(&mut st.service, o.service_time());
                let i = (since.as_nanos() / INTERVAL.as_nanos()) as usize;
                while st.intervals.len() <= i {
                    st.intervals.push(new_hist());
                }
                record(&mut st.intervals[i], o.latency());
            }
            Err(e) => st.errors.add(e),
        }
        match o.generator_lag {
            Some(lag) => record(&mut st.send_lag, lag),
            None => st.queued_behind += 1,
        }
    }

    /// A new victim connection attempted at `started` (its intended time for probes).
    pub fn record_connect(&mut self, started: Instant, done: Instant, result: Result<(), &ErrLabel>, reconnect: bool) {
        let Some((st, _)) = self.stats_for(started) else {
            return;
        };
        if reconnect {
            st.reconnects += 1;
        }
        match result {
            Ok(()) => {
                st.connect_ok += 1;
                record(&mut st.connect, done.saturating_duration_since(started));
            }
            Err(e) => st.connect_errors.add(e),
        }
    }
}

pub type SharedRecorder = Arc<Mutex<Recorder>>;

/// One victim connection as a [`Service`]: runs the query, replaces the connection
/// when it broke or timed out (or when it is due for recycling), and records reconnects.
pub struct VictimConn {
    pub target: Target,
    pub query: String,
    pub connect_timeout: Duration,
    pub reconnect_every: Duration,
    pub client: Option<Client>,
    pub connected_at: Instant,
    pub recorder: SharedRecorder,
}

impl Service for VictimConn {
    async fn call(&mut self, _slot: Slot, deadline: Instant) -> Result<(), ErrLabel> {
        if !self.reconnect_every.is_zero() && self.connected_at.elapsed() >= self.reconnect_every {
            self.client = None;
        }
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            let started = Instant::now();
            let budget = self.connect_timeout.min(deadline.saturating_duration_since(started));
            let result = self.target.connect(budget).await;
            let done = Instant::now();
            self.recorder
                .lock()
                .unwrap()
                .record_connect(started, done, result.as_ref().map(|_| ()), true);
            self.client = Some(result?);
            self.connected_at = done;
        }
        let client = self.client.as_ref().expect("connected above");
        match tokio::time::timeout_at(deadline.into(), client.simple_query(&self.query)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                let label = ErrLabel::from_pg(&e);
                if client.is_closed() {
                    self.client = None;
                }
                Err(label)
            }
            Err(_) => {
                // The answer may still come: this connection is out of step now.
                self.client = None;
                Err(ErrLabel::timeout("query"))
            }
        }
    }
}

/// The connect probe: at each slot of `schedule`, a new connection runs `SELECT 1` and
/// disconnects; latency is measured from the slot's intended time. Probes run
/// concurrently, so a slow one does not hold up the next.
pub async fn probe_loop(target: Target, schedule: Schedule, timeout: Duration, recorder: SharedRecorder) {
    let mut tasks = JoinSet::new();
    for slot in schedule.slots().collect::<Vec<_>>() {
        tokio::time::sleep_until(slot.intended.into()).await;
        let target = target.clone();
        let recorder = recorder.clone();
        tasks.spawn(async move {
            let deadline = slot.intended + timeout;
            let result = match target.connect(deadline.saturating_duration_since(Instant::now())).await {
                Ok(client) => {
                    let done = Instant::now();
                    match tokio::time::timeout_at(deadline.into(), client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => Ok(done),
                        Ok(Err(e)) => Err(ErrLabel::from_pg(&e)),
                        Err(_) => Err(ErrLabel::timeout("probe query")),
                    }
                }
                Err(e) => Err(e),
            };
            let mut rec = recorder.lock().unwrap();
            match result {
                Ok(done) => rec.record_connect(slot.intended, done, Ok(()), false),
                Err(e) => rec.record_connect(slot.intended, Instant::now(), Err(&e), false),
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> PhaseClock {
        let w = Instant::now();
        PhaseClock::new(w, Duration::from_secs(1), Duration::from_secs(2))
    }

    #[test]
    fn phases_by_intended_time() {
        let c = clock();
        assert_eq!(c.phase_of(c.warmup_start), None);
        assert_eq!(c.phase_of(c.t0), Some(Phase::Baseline));
        assert_eq!(c.phase_of(c.t0 + Duration::from_millis(1999)), Some(Phase::Baseline));
        assert_eq!(c.phase_of(c.t0 + Duration::from_secs(2)), Some(Phase::Contention));
        assert_eq!(c.phase_of(c.t0 + Duration::from_secs(5)), Some(Phase::Recovery));
        assert_eq!(c.phase_of(c.end()), None);
        assert_eq!(c.end(), c.t0 + Duration::from_secs(6));
    }

    #[test]
    fn latency_is_recorded_from_the_intended_start_in_the_intended_phase() {
        let c = clock();
        let mut r = Recorder::new(c);
        // Due at the very end of baseline, answered 300 ms later (in contention): it
        // belongs to baseline, with 300 ms latency although it was only 1 ms in flight.
        let intended = c.t0 + Duration::from_millis(1999);
        let o = Outcome {
            slot: Slot { index: 7, intended },
            sent: intended + Duration::from_millis(299),
            done: intended + Duration::from_millis(300),
            result: Ok(()),
            generator_lag: None,
        };
        r.record_query(&o);
        let b = &r.phases[0];
        assert_eq!(b.ok, 1);
        assert_eq!(b.latency.max(), b.latency.highest_equivalent(300_000));
        assert!(b.service.max() <= 1_001);
        assert_eq!(b.queued_behind, 1);
        assert_eq!(b.intervals.len(), 2);
        assert_eq!(r.phases[1].ok, 0);

        // Errors are counted by code, not put in the latency histogram.
        let mut e = o.clone();
        e.slot.intended = c.t0 + Duration::from_secs(3);
        e.result = Err(ErrLabel::new("53300", "no more connections allowed"));
        e.generator_lag = Some(Duration::from_micros(50));
        r.record_query(&e);
        assert_eq!(r.phases[1].errors.total(), 1);
        assert!(r.phases[1].latency.is_empty());
        assert_eq!(r.phases[1].send_lag.len(), 1);
        assert_eq!(r.phases[1].queries(), 1);

        // Warm-up results are kept apart.
        let mut w = o.clone();
        w.slot.intended = c.warmup_start;
        r.record_query(&w);
        assert_eq!(r.warmup.ok, 1);

        r.record_connect(c.t0, c.t0 + Duration::from_millis(3), Ok(()), false);
        r.record_connect(
            c.t0,
            c.t0,
            Err(&ErrLabel::new("53300", "no more connections allowed")),
            true,
        );
        assert_eq!(r.phases[0].connect_ok, 1);
        assert_eq!(r.phases[0].connect_errors.total(), 1);
        assert_eq!(r.phases[0].reconnects, 1);
    }
}
