//! One run (baseline, contention, recovery against one victim/aggressor pair), and the
//! comparison of two setups.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::sync::mpsc::unbounded_channel;
use tokio::sync::watch;

use crate::affinity::{allowed_cores, set_realtime, CorePlan};
use crate::aggressor::{self, AggressorStats};
use crate::chart::{self, Panel, Series, PHASE_COLORS};
use crate::errors::code_name;
use crate::hist::{interval_log, percentile_distribution, OUTPUT_SCALE};
use crate::report::{self, PhaseSummary, RunSummary};
use crate::scenario::Scenario;
use crate::schedule::{run_sender, spawn_pacer, Schedule};
use crate::target::Target;
use crate::victim::{probe_loop, Phase, PhaseClock, PhaseStats, Recorder, SharedRecorder, VictimConn, INTERVAL};

/// What to run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// Names the run in reports ("dedicated", "shared", ...).
    pub label: String,
    pub victim: Target,
    /// `None`, or no scenarios: the victim runs alone in every phase.
    pub aggressor: Option<Target>,
    pub scenario: Scenario,
    /// Where the report files go (created if missing).
    pub out_dir: PathBuf,
}

/// A finished run: its summary and the victim's per-phase histograms.
pub struct RunResult {
    pub summary: RunSummary,
    pub phases: [PhaseStats; 3],
    pub files: Vec<PathBuf>,
}

/// SCHED_FIFO priority of the victim's threads (low among real-time priorities).
const RT_PRIORITY: i32 = 10;

/// Short note printed with every report: what no pooler can isolate on this machine.
pub const SHARED_MACHINE_NOTE: &str =
    "note: PostgreSQL itself (and this load generator) run on the same cores as both \
setups; an aggressor that loads PostgreSQL's CPU, disk or locks slows every tenant, whatever the pooler. This \
measures pooler-level isolation: client budgets, pools and pooler workers.";

fn build_rt(name: &str, threads: usize, plan: CorePlan) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all()
        .thread_name(name)
        .on_thread_start(move || plan.apply_to_current_thread());
    b.build().with_context(|| format!("building the {name} runtime"))
}

/// Check that a target answers `SELECT 1` before the run starts.
async fn preflight(role: &str, t: &Target, timeout: Duration) -> anyhow::Result<()> {
    let client = t
        .connect(timeout)
        .await
        .map_err(|e| anyhow!("cannot connect to the {role} ({}): {e}", t.display()))?;
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| anyhow!("the {role} ({}) cannot run SELECT 1: {e}", t.display()))?;
    Ok(())
}

/// Run the three phases and write the report files into `spec.out_dir`.
pub fn run(spec: &RunSpec) -> anyhow::Result<RunResult> {
    let sc = spec.scenario.clone();
    sc.validate()?;
    let aggressor = spec.aggressor.clone().filter(|_| !sc.aggressor.scenarios.is_empty());
    if spec.aggressor.is_none() && !sc.aggressor.scenarios.is_empty() {
        bail!("aggressor scenarios are set but no aggressor connection string was given");
    }
    let plan = CorePlan::new(&sc.generator.avoid_cores, &allowed_cores());
    let mut warnings = Vec::new();
    if let Some(w) = &plan.warning {
        eprintln!("pgsilo-loadtest: warning: {w}");
        warnings.push(w.clone());
    }
    plan.apply_to_current_thread();
    // Real-time priority for the victim's pacer and sender threads, if asked and allowed.
    let realtime = sc.generator.realtime && {
        let probe = std::thread::spawn(|| set_realtime(RT_PRIORITY));
        match probe.join().unwrap_or_else(|_| Err("panicked".into())) {
            Ok(()) => true,
            Err(e) => {
                let w = format!(
                    "cannot give the generator real-time priority ({e}); it runs at normal \
                     priority and may fall behind on a busy machine"
                );
                eprintln!("pgsilo-loadtest: warning: {w}");
                warnings.push(w);
                false
            }
        }
    };
    let rt_on_start = move || {
        if realtime {
            let _ = set_realtime(RT_PRIORITY);
        }
    };
    fs::create_dir_all(&spec.out_dir).with_context(|| format!("creating {}", spec.out_dir.display()))?;

    // Preflight, and the victim's connections, opened before the clock starts.
    let setup_rt = build_rt("loadtest-setup", 1, plan.clone())?;
    setup_rt.block_on(async {
        preflight("victim", &spec.victim, sc.victim.connect_timeout).await?;
        if let Some(a) = &aggressor {
            preflight("aggressor", a, sc.aggressor.connect_timeout).await?;
        }
        anyhow::Ok(())
    })?;
    drop(setup_rt);

    let victim_rt = build_rt("loadtest-victim", 1, plan.clone())?;
    let victim_plan = plan.clone();
    let conns = sc.victim.connections;
    let clients = victim_rt.block_on(async {
        let mut v = Vec::with_capacity(conns);
        for i in 0..conns {
            let c = spec.victim.connect(sc.victim.connect_timeout).await.map_err(|e| {
                anyhow!(
                    "opening victim connection {} of {conns} to {}: {e}",
                    i + 1,
                    spec.victim.display()
                )
            })?;
            v.push(c);
        }
        anyhow::Ok(v)
    })?;

    // The clock: warm-up, then baseline / contention / recovery.
    let warmup_start = Instant::now() + Duration::from_millis(50);
    let clock = PhaseClock::new(warmup_start, sc.phases.warmup, sc.phases.duration);
    let recorder: SharedRecorder = Arc::new(Mutex::new(Recorder::new(clock)));
    let stop = Arc::new(AtomicBool::new(false));

    // Pacer → one queue per victim connection.
    let mut queues = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..conns {
        let (tx, rx) = unbounded_channel();
        queues.push(tx);
        receivers.push(rx);
    }
    let pacer_plan = plan.clone();
    let pacer = spawn_pacer(
        Schedule::new(warmup_start, clock.end(), sc.victim.rate),
        queues,
        stop.clone(),
        move || {
            pacer_plan.apply_to_current_thread();
            rt_on_start();
        },
    );

    // Victim senders, on their own thread.
    let victim_thread = {
        let recorder = recorder.clone();
        let target = spec.victim.clone();
        let v = sc.victim.clone();
        std::thread::Builder::new()
            .name("loadtest-victim".into())
            .spawn(move || {
                victim_plan.apply_to_current_thread();
                rt_on_start();
                let local = tokio::task::LocalSet::new();
                victim_rt.block_on(local.run_until(async move {
                    let mut handles = Vec::new();
                    for (client, rx) in clients.into_iter().zip(receivers) {
                        let mut conn = VictimConn {
                            target: target.clone(),
                            query: v.query.clone(),
                            connect_timeout: v.connect_timeout,
                            reconnect_every: v.reconnect_every,
                            client: Some(client),
                            connected_at: Instant::now(),
                            recorder: recorder.clone(),
                        };
                        let rec = recorder.clone();
                        let timeout = v.query_timeout;
                        handles.push(tokio::task::spawn_local(async move {
                            run_sender(rx, &mut conn, timeout, |o| rec.lock().unwrap().record_query(&o)).await;
                        }));
                    }
                    for h in handles {
                        let _ = h.await;
                    }
                }))
            })?
    };

    // Connect probe, on its own thread (client-side SCRAM costs CPU).
    let probe_thread = if sc.victim.probe_rate > 0.0 {
        let rt = build_rt("loadtest-probe", 1, plan.clone())?;
        let recorder = recorder.clone();
        let target = spec.victim.clone();
        let schedule = Schedule::new(warmup_start, clock.end(), sc.victim.probe_rate);
        let timeout = sc.victim.connect_timeout;
        Some(
            std::thread::Builder::new()
                .name("loadtest-probe".into())
                .spawn(move || rt.block_on(probe_loop(target, schedule, timeout, recorder)))?,
        )
    } else {
        None
    };

    // Aggressor: starts with contention, stops with it.
    let agg_stats = Arc::new(Mutex::new(AggressorStats::default()));
    let agg_thread = if let Some(target) = aggressor.clone() {
        let rt = build_rt("loadtest-aggr", sc.aggressor.threads, plan.clone())?;
        let cfg = sc.aggressor.clone();
        let stats = agg_stats.clone();
        let start = clock.start_of(Phase::Contention);
        let end = clock.end_of(Phase::Contention);
        Some(
            std::thread::Builder::new()
                .name("loadtest-aggr-ctl".into())
                .spawn(move || {
                    rt.block_on(async move {
                        let (tx, rx) = watch::channel(false);
                        tokio::time::sleep_until(start.into()).await;
                        let task = tokio::spawn(aggressor::run(target, cfg, stats, rx, Duration::from_secs(5)));
                        tokio::time::sleep_until(end.into()).await;
                        let _ = tx.send(true);
                        let _ = task.await;
                    });
                    rt.shutdown_timeout(Duration::from_secs(2));
                })?,
        )
    } else {
        None
    };

    let dispatched = pacer.join().map_err(|_| anyhow!("pacer thread panicked"))?;
    victim_thread.join().map_err(|_| anyhow!("victim thread panicked"))?;
    if let Some(t) = probe_thread {
        t.join().map_err(|_| anyhow!("probe thread panicked"))?;
    }
    if let Some(t) = agg_thread {
        t.join().map_err(|_| anyhow!("aggressor thread panicked"))?;
    }

    let rec = Arc::try_unwrap(recorder)
        .map_err(|_| anyhow!("recorder still shared"))?
        .into_inner()
        .unwrap();
    let agg = agg_stats.lock().unwrap().clone();
    let cores = format!(
        "{}, {}",
        plan.describe(),
        if realtime {
            "victim threads at real-time priority"
        } else {
            "normal priority"
        }
    );
    finish(spec, &sc, rec, agg, cores, warnings, dispatched)
}

fn finish(
    spec: &RunSpec,
    sc: &Scenario,
    rec: Recorder,
    agg: AggressorStats,
    generator: String,
    mut warnings: Vec<String>,
    dispatched: u64,
) -> anyhow::Result<RunResult> {
    let expected = sc.expected_per_phase();
    let phases: Vec<PhaseSummary> = Phase::ALL
        .iter()
        .map(|&p| PhaseSummary::of(p, &rec.phases[p.index()], expected))
        .collect();
    let accounted: u64 = phases.iter().map(|p| p.queries).sum::<u64>() + rec.warmup.queries();
    if accounted != dispatched {
        warnings.push(format!(
            "{dispatched} victim queries were scheduled but {accounted} accounted for"
        ));
    }
    let lag_limit = sc.check.max_send_lag.as_secs_f64() * 1000.0;
    for p in &phases {
        if p.send_lag_p99 > lag_limit {
            warnings.push(format!(
                "the load generator fell behind its own schedule in {}: send lag p99 {:.3} ms > {:.3} ms \
                 (max {:.3} ms). Latencies include the generator's own delay, so this run proves nothing; \
                 lower the rate, give the generator a free core (--avoid-cores), or quiet the machine",
                p.phase, p.send_lag_p99, lag_limit, p.send_lag_max
            ));
        }
    }
    let verdict = report::verdict(&spec.label, &phases, sc);
    let summary = RunSummary {
        label: spec.label.clone(),
        victim: spec.victim.display(),
        aggressor: spec.aggressor.as_ref().map(Target::display),
        scenario: sc.clone(),
        generator_cores: generator,
        phases,
        aggressor_stats: agg,
        verdict,
        warnings,
        warmup_errors: {
            let mut e = rec.warmup.errors.clone();
            e.merge(&rec.warmup.connect_errors);
            e
        },
    };
    let files = write_run_files(&spec.out_dir, &summary, &rec)?;
    Ok(RunResult {
        summary,
        phases: rec.phases,
        files,
    })
}

fn write(path: PathBuf, bytes: impl AsRef<[u8]>, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    files.push(path);
    Ok(())
}

fn phase_series(phases: &[PhaseStats; 3]) -> Vec<Series<'_>> {
    Phase::ALL
        .iter()
        .map(|&p| Series {
            name: p.name().into(),
            hist: &phases[p.index()].latency,
            color: PHASE_COLORS[p.index()],
        })
        .collect()
}

/// What the chart cannot show by itself: victim errors per phase, and the verdict.
fn panel_notes(s: &RunSummary) -> Vec<String> {
    let mut notes = Vec::new();
    let errs: Vec<String> = s
        .phases
        .iter()
        .map(|p| {
            let mut all = p.error_detail.clone();
            all.merge(&p.connect_error_detail);
            let codes: Vec<String> = all
                .by_code
                .keys()
                .map(|c| match code_name(c) {
                    n if n == c => c.clone(),
                    n => format!("{c} {n}"),
                })
                .collect();
            if codes.is_empty() {
                format!("{} 0", p.phase)
            } else {
                format!("{} {} ({})", p.phase, all.total(), codes.join(", "))
            }
        })
        .collect();
    notes.push(format!("victim errors: {}", errs.join(", ")));
    let c = s.phase(Phase::Contention);
    if c.connect_attempts > 0 {
        notes.push(format!(
            "new victim connections during contention: {} of {} refused or failed",
            c.connect_errors, c.connect_attempts
        ));
    }
    let v = &s.verdict;
    notes.push(format!(
        "{}: contention p99 {} baseline (limit {}x), {} victim errors",
        if v.pass { "PASS" } else { "FAIL" },
        v.p99_ratio
            .map(|r| format!("{r:.2}x"))
            .unwrap_or_else(|| "n/a vs".into()),
        v.max_p99_ratio,
        v.victim_errors
    ));
    notes
}

fn footnote(sc: &Scenario) -> String {
    format!(
        "{:?} at {}/s open loop over {} connections; {} per phase; latency from each query's intended start (no coordinated omission)",
        sc.victim.query,
        sc.victim.rate,
        sc.victim.connections,
        humantime::format_duration(sc.phases.duration)
    )
}

fn write_run_files(dir: &Path, s: &RunSummary, rec: &Recorder) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in Phase::ALL {
        let st = &rec.phases[p.index()];
        write(
            dir.join(format!("victim_{}.hgrm", p.name())),
            percentile_distribution(&st.latency, OUTPUT_SCALE),
            &mut files,
        )?;
        write(
            dir.join(format!("victim_connect_{}.hgrm", p.name())),
            percentile_distribution(&st.connect, OUTPUT_SCALE),
            &mut files,
        )?;
    }
    // Interval log: one histogram per second of each phase, tagged with the phase.
    let mut intervals = Vec::new();
    for p in Phase::ALL {
        let st = &rec.phases[p.index()];
        let phase_off = rec.clock.start_of(p) - rec.clock.t0;
        let n = st.intervals.len();
        for (i, h) in st.intervals.iter().enumerate() {
            let start = INTERVAL * i as u32;
            let len = if i + 1 == n {
                rec.clock.phase_len.saturating_sub(start).max(Duration::from_millis(1))
            } else {
                INTERVAL
            };
            intervals.push((phase_off + start, len, Some(p.name()), h));
        }
    }
    let log = interval_log(
        &intervals,
        rec.clock.t0_wall,
        &[
            format!("pgsilo-loadtest [{}]: victim query latency, values in ms", s.label),
            format!("victim: {}", s.victim),
        ],
    )?;
    write(dir.join("victim.hlog"), log, &mut files)?;
    let svg = dir.join("victim_latency.svg");
    chart::write_svg(
        &svg,
        &[Panel {
            title: format!("victim latency by percentile: {}", s.label),
            series: phase_series(&rec.phases),
            notes: panel_notes(s),
        }],
        &footnote(&s.scenario),
    )?;
    files.push(svg);
    write(dir.join("summary.txt"), report::full_text(s), &mut files)?;
    write(dir.join("summary.json"), serde_json::to_string_pretty(s)?, &mut files)?;
    Ok(files)
}

/// Read a `summary.json` back (for tools and tests).
pub fn read_summary(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The comparison of two setups (dedicated pair, then shared instance).
pub struct Comparison {
    pub runs: Vec<RunResult>,
    pub text: String,
    pub files: Vec<PathBuf>,
}

/// Run the same scenario against each setup in turn (pausing `settle` in between), then
/// write the combined chart and table into `out_dir`.
pub fn compare(specs: &[RunSpec], out_dir: &Path, settle: Duration) -> anyhow::Result<Comparison> {
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut runs = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(settle);
        }
        eprintln!(
            "pgsilo-loadtest: running [{}] for {} ...",
            spec.label,
            humantime::format_duration(spec.scenario.phases.warmup + spec.scenario.phases.duration * 3)
        );
        let r = run(spec).with_context(|| format!("run [{}]", spec.label))?;
        eprintln!("{}", r.summary.verdict.line);
        runs.push(r);
    }
    let mut files = Vec::new();
    let svg = out_dir.join("comparison.svg");
    let panels: Vec<Panel> = runs
        .iter()
        .map(|r| Panel {
            title: format!("victim latency: {}", r.summary.label),
            series: phase_series(&r.phases),
            notes: panel_notes(&r.summary),
        })
        .collect();
    chart::write_svg(&svg, &panels, &footnote(&specs[0].scenario))?;
    files.push(svg);
    let mut text = String::new();
    for r in &runs {
        text.push_str(&report::full_text(&r.summary));
        text.push('\n');
    }
    if runs.len() == 2 {
        text.push_str("== comparison ==\n");
        text.push_str(&report::comparison_table(&runs[0].summary, &runs[1].summary));
        text.push('\n');
    }
    text.push_str(SHARED_MACHINE_NOTE);
    text.push('\n');
    for r in &runs {
        text.push_str(&r.summary.verdict.line);
        text.push('\n');
    }
    write(out_dir.join("comparison.txt"), &text, &mut files)?;
    let json: Vec<&RunSummary> = runs.iter().map(|r| &r.summary).collect();
    write(
        out_dir.join("comparison.json"),
        serde_json::to_string_pretty(&json)?,
        &mut files,
    )?;
    Ok(Comparison { runs, text, files })
}
