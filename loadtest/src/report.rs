//! Summaries, tables and verdicts.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::aggressor::AggressorStats;
use crate::errors::ErrorCounts;
use crate::hist::{max_ms, pct_ms};
use crate::scenario::Scenario;
use crate::victim::{Phase, PhaseStats};

/// Percentiles reported everywhere: label and percentile.
pub const PERCENTILES: [(&str, f64); 4] = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)];

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            count: h.len(),
            p50: pct_ms(h, 50.0),
            p90: pct_ms(h, 90.0),
            p99: pct_ms(h, 99.0),
            p999: pct_ms(h, 99.9),
            max: max_ms(h),
        }
    }

    pub fn values(&self) -> [f64; 5] {
        [self.p50, self.p90, self.p99, self.p999, self.max]
    }

    /// Each value divided by the baseline's (`None` where the baseline is 0).
    pub fn ratio_to(&self, base: &Latency) -> [Option<f64>; 5] {
        let a = self.values();
        let b = base.values();
        std::array::from_fn(|i| (b[i] > 0.0 && self.count > 0).then(|| a[i] / b[i]))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseSummary {
    pub phase: String,
    /// Queries the schedule had for this phase (rate × duration).
    pub expected: f64,
    /// Queries accounted for (answered or failed).
    pub queries: u64,
    pub latency: Latency,
    /// Time from actual send to answer, for comparison (what a closed-loop tool shows).
    pub service_time: Latency,
    pub errors: u64,
    pub error_detail: ErrorCounts,
    pub connect: Latency,
    pub connect_attempts: u64,
    pub connect_errors: u64,
    pub connect_error_detail: ErrorCounts,
    pub reconnects: u64,
    /// The generator's own send lag (p99 and max, ms) over the queries whose connection
    /// was free at their intended time.
    pub send_lag_p99: f64,
    pub send_lag_max: f64,
    pub queued_behind: u64,
}

impl PhaseSummary {
    pub fn of(phase: Phase, st: &PhaseStats, expected: f64) -> PhaseSummary {
        PhaseSummary {
            phase: phase.name().into(),
            expected,
            queries: st.queries(),
            latency: Latency::of(&st.latency),
            service_time: Latency::of(&st.service),
            errors: st.errors.total(),
            error_detail: st.errors.clone(),
            connect: Latency::of(&st.connect),
            connect_attempts: st.connect_ok + st.connect_errors.total(),
            connect_errors: st.connect_errors.total(),
            connect_error_detail: st.connect_errors.clone(),
            reconnects: st.reconnects,
            send_lag_p99: pct_ms(&st.send_lag, 99.0),
            send_lag_max: max_ms(&st.send_lag),
            queued_behind: st.queued_behind,
        }
    }

    /// Victim errors of every kind (queries and new connections).
    pub fn victim_errors(&self) -> u64 {
        self.errors + self.connect_errors
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub pass: bool,
    /// Contention p99 / baseline p99.
    pub p99_ratio: Option<f64>,
    pub max_p99_ratio: f64,
    pub ratio_ok: bool,
    /// Victim errors over the three phases (queries and new connections).
    pub victim_errors: u64,
    /// True when the generator fell behind its own schedule: the run proves nothing.
    pub generator_lagged: bool,
    pub line: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub label: String,
    pub victim: String,
    pub aggressor: Option<String>,
    pub scenario: Scenario,
    pub generator_cores: String,
    pub phases: Vec<PhaseSummary>,
    pub aggressor_stats: AggressorStats,
    pub verdict: Verdict,
    pub warnings: Vec<String>,
    /// Victim errors during the unmeasured warm-up (queries and new connections): they
    /// do not count in the verdict, but often explain what followed.
    pub warmup_errors: ErrorCounts,
}

impl RunSummary {
    pub fn phase(&self, p: Phase) -> &PhaseSummary {
        &self.phases[p.index()]
    }
}

/// Judge a run: contention p99 within `max_p99_ratio` × baseline and no victim errors.
pub fn verdict(label: &str, phases: &[PhaseSummary], scenario: &Scenario) -> Verdict {
    let base = &phases[Phase::Baseline.index()];
    let cont = &phases[Phase::Contention.index()];
    let max = scenario.check.max_p99_ratio;
    let ratio = (base.latency.p99 > 0.0 && cont.latency.count > 0).then(|| cont.latency.p99 / base.latency.p99);
    let ratio_ok = ratio.is_some_and(|r| r <= max);
    let victim_errors: u64 = phases.iter().map(PhaseSummary::victim_errors).sum();
    let lag_limit = scenario.check.max_send_lag.as_secs_f64() * 1000.0;
    let generator_lagged = phases.iter().any(|p| p.send_lag_p99 > lag_limit);
    let pass = ratio_ok && victim_errors == 0;
    let mut reasons = Vec::new();
    match ratio {
        Some(r) => reasons.push(format!(
            "victim p99 under contention {:.3} ms = {r:.2}x baseline {:.3} ms (limit {max}x{})",
            cont.latency.p99,
            base.latency.p99,
            if ratio_ok { "" } else { ", EXCEEDED" }
        )),
        None => reasons.push("no victim p99 to compare (no successful queries)".into()),
    }
    if victim_errors == 0 {
        reasons.push("0 victim errors".into());
    } else {
        let mut all = ErrorCounts::default();
        for p in phases {
            all.merge(&p.error_detail);
            all.merge(&p.connect_error_detail);
        }
        reasons.push(format!("{victim_errors} victim errors: {}", all.summary()));
    }
    let mut line = format!(
        "VERDICT [{label}]: {}: {}",
        if pass { "PASS" } else { "FAIL" },
        reasons.join("; ")
    );
    if generator_lagged {
        line.push_str(" (INCONCLUSIVE: the load generator fell behind its schedule)");
    }
    Verdict {
        pass,
        p99_ratio: ratio,
        max_p99_ratio: max,
        ratio_ok,
        victim_errors,
        generator_lagged,
        line,
    }
}

fn ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

/// The victim's query table: one row per phase, a ratio-to-baseline row under the others.
pub fn victim_table(s: &RunSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "victim queries [{}]: latency from intended start, ms ({}/s open loop over {} connections)",
        s.label, s.scenario.victim.rate, s.scenario.victim.connections
    );
    let _ = writeln!(
        out,
        "{:<13}{:>8}{:>8}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "phase", "count", "errors", "p50", "p90", "p99", "p99.9", "max"
    );
    let base = s.phase(Phase::Baseline).latency;
    for p in &s.phases {
        let l = &p.latency;
        let _ = writeln!(
            out,
            "{:<13}{:>8}{:>8}{:>10}{:>10}{:>10}{:>10}{:>10}",
            p.phase,
            l.count,
            p.errors,
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max)
        );
        if p.phase != Phase::Baseline.name() {
            let r = l.ratio_to(&base);
            let _ = writeln!(
                out,
                "{:<29}{:>10}{:>10}{:>10}{:>10}{:>10}",
                "  vs baseline",
                ratio(r[0]),
                ratio(r[1]),
                ratio(r[2]),
                ratio(r[3]),
                ratio(r[4])
            );
        }
    }
    for p in &s.phases {
        if p.errors > 0 {
            let _ = writeln!(out, "  {} query errors: {}", p.phase, p.error_detail.summary());
        }
    }
    out
}

/// New victim connections (connect probe and reconnects).
pub fn connect_table(s: &RunSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "victim new connections [{}]: connect latency, ms (probe {}/s + reconnects)",
        s.label, s.scenario.victim.probe_rate
    );
    let _ = writeln!(
        out,
        "{:<13}{:>8}{:>8}{:>10}{:>10}{:>10}",
        "phase", "tried", "failed", "p50", "p99", "max"
    );
    for p in &s.phases {
        let _ = writeln!(
            out,
            "{:<13}{:>8}{:>8}{:>10}{:>10}{:>10}",
            p.phase,
            p.connect_attempts,
            p.connect_errors,
            ms(p.connect.p50),
            ms(p.connect.p99),
            ms(p.connect.max)
        );
    }
    for p in &s.phases {
        if p.connect_errors > 0 {
            let _ = writeln!(
                out,
                "  {} connect errors: {}",
                p.phase,
                p.connect_error_detail.summary()
            );
        }
    }
    out
}

/// What the aggressor did during contention.
pub fn aggressor_table(s: &RunSummary) -> String {
    let mut out = String::new();
    let Some(target) = &s.aggressor else {
        return "aggressor: none\n".into();
    };
    let secs = s.aggressor_stats.seconds.max(1e-9);
    let _ = writeln!(out, "aggressor [{}] ({target}), during contention:", s.label);
    for (kind, k) in &s.aggressor_stats.by_kind {
        let _ = writeln!(
            out,
            "  {kind:<20} {} clients: {} connected (peak {} at once), {} refused/failed; \
             {} queries ({:.0}/s), {} query errors",
            k.clients,
            k.connect_ok,
            k.held_peak,
            k.connect_errors.total(),
            k.queries_ok,
            k.queries_ok as f64 / secs,
            k.query_errors.total()
        );
        if !k.connect_errors.is_empty() {
            let _ = writeln!(out, "    connect errors: {}", k.connect_errors.summary());
        }
        if !k.query_errors.is_empty() {
            let _ = writeln!(out, "    query errors: {}", k.query_errors.summary());
        }
    }
    out
}

/// The generator's own punctuality, per phase.
pub fn generator_line(s: &RunSummary) -> String {
    let parts: Vec<String> = s
        .phases
        .iter()
        .map(|p| format!("{} p99 {} / max {} ms", p.phase, ms(p.send_lag_p99), ms(p.send_lag_max)))
        .collect();
    format!(
        "generator send lag ({}; limit p99 {} ms): {}\n",
        s.generator_cores,
        ms(s.scenario.check.max_send_lag.as_secs_f64() * 1000.0),
        parts.join(", ")
    )
}

/// Everything about one run, as printed and saved to summary.txt.
pub fn full_text(s: &RunSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "== {} ==", s.label);
    let _ = writeln!(out, "victim: {}", s.victim);
    let _ = writeln!(out, "{}", s.scenario.describe());
    out.push('\n');
    out.push_str(&victim_table(s));
    out.push('\n');
    out.push_str(&connect_table(s));
    out.push('\n');
    out.push_str(&aggressor_table(s));
    out.push_str(&generator_line(s));
    if !s.warmup_errors.is_empty() {
        let _ = writeln!(
            out,
            "victim errors during warm-up (not measured): {}",
            s.warmup_errors.summary()
        );
    }
    for w in &s.warnings {
        let _ = writeln!(out, "WARNING: {w}");
    }
    let _ = writeln!(out, "{}", s.verdict.line);
    out
}

/// The dedicated-vs-shared table.
pub fn comparison_table(a: &RunSummary, b: &RunSummary) -> String {
    let mut out = String::new();
    let w = 28;
    let row = |out: &mut String, name: &str, x: String, y: String| {
        let _ = writeln!(out, "{name:<28}{x:<w$}{y:<w$}");
    };
    row(&mut out, "", a.label.clone(), b.label.clone());
    let lat = |s: &RunSummary, p: Phase, f: fn(&Latency) -> f64| -> String {
        let l = s.phase(p).latency;
        let base = s.phase(Phase::Baseline).latency;
        let v = f(&l);
        if p == Phase::Baseline {
            format!("{} ms", ms(v))
        } else {
            let b = f(&base);
            if b > 0.0 {
                format!("{} ms ({:.2}x)", ms(v), v / b)
            } else {
                format!("{} ms", ms(v))
            }
        }
    };
    for (name, f) in [
        ("p50", (|l: &Latency| l.p50) as fn(&Latency) -> f64),
        ("p99", |l: &Latency| l.p99),
        ("p99.9", |l: &Latency| l.p999),
        ("max", |l: &Latency| l.max),
    ] {
        for p in Phase::ALL {
            row(
                &mut out,
                &format!("victim {name} {}", p.name()),
                lat(a, p, f),
                lat(b, p, f),
            );
        }
    }
    let errs = |s: &RunSummary, p: Phase| -> String {
        let ph = s.phase(p);
        let mut all = ph.error_detail.clone();
        all.merge(&ph.connect_error_detail);
        if all.is_empty() {
            "0".into()
        } else {
            let codes: Vec<String> = all.by_code.iter().map(|(c, e)| format!("{c} x{}", e.count)).collect();
            format!("{} ({})", all.total(), codes.join(", "))
        }
    };
    for p in Phase::ALL {
        row(&mut out, &format!("victim errors {}", p.name()), errs(a, p), errs(b, p));
    }
    let conn = |s: &RunSummary| -> String {
        let c = s.phase(Phase::Contention);
        format!(
            "{}/{} ok, p99 {} ms",
            c.connect_attempts - c.connect_errors,
            c.connect_attempts,
            ms(c.connect.p99)
        )
    };
    row(&mut out, "new connections contention", conn(a), conn(b));
    let lag = |s: &RunSummary| -> String {
        let m = s.phases.iter().map(|p| p.send_lag_p99).fold(0.0, f64::max);
        format!("p99 {} ms", ms(m))
    };
    row(&mut out, "generator send lag", lag(a), lag(b));
    let v = |s: &RunSummary| -> String {
        if s.verdict.pass {
            "PASS (isolated)".into()
        } else {
            "FAIL (not isolated)".into()
        }
    };
    row(&mut out, "verdict", v(a), v(b));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::ErrLabel;
    use crate::hist::new_hist;

    fn phase(p: Phase, base_us: u64, errors: u64) -> PhaseSummary {
        let mut st = PhaseStats::default();
        for i in 0..1000 {
            st.latency.record(base_us + i % 10).unwrap();
            st.ok += 1;
        }
        for _ in 0..errors {
            st.connect_errors
                .add(&ErrLabel::new("53300", "no more connections allowed (max_client_conn)"));
        }
        st.send_lag = new_hist();
        st.send_lag.record(100).unwrap();
        PhaseSummary::of(p, &st, 1000.0)
    }

    #[test]
    fn verdict_checks_the_ratio_and_errors() {
        let s = Scenario::default();
        let ok = [
            phase(Phase::Baseline, 1000, 0),
            phase(Phase::Contention, 1200, 0),
            phase(Phase::Recovery, 1000, 0),
        ];
        let v = verdict("dedicated", &ok, &s);
        assert!(v.pass, "{}", v.line);
        assert!((v.p99_ratio.unwrap() - 1.2).abs() < 0.01);
        assert!(v.line.starts_with("VERDICT [dedicated]: PASS"));

        let slow = [
            phase(Phase::Baseline, 1000, 0),
            phase(Phase::Contention, 2000, 0),
            phase(Phase::Recovery, 1000, 0),
        ];
        let v = verdict("shared", &slow, &s);
        assert!(!v.pass && !v.ratio_ok);
        assert!(v.line.contains("EXCEEDED"));

        let errs = [
            phase(Phase::Baseline, 1000, 0),
            phase(Phase::Contention, 1000, 3),
            phase(Phase::Recovery, 1000, 0),
        ];
        let v = verdict("shared", &errs, &s);
        assert!(!v.pass && v.ratio_ok);
        assert_eq!(v.victim_errors, 3);
        assert!(v.line.contains("53300 x3"), "{}", v.line);
    }
}
