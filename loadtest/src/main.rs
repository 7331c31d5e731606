//! `pgsilo-loadtest`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use pgsilo_loadtest::report;
use pgsilo_loadtest::run::{self, RunSpec, SHARED_MACHINE_NOTE};
use pgsilo_loadtest::scenario::{parse_cores, parse_duration, parse_kinds, AggressorKind, Scenario};
use pgsilo_loadtest::target::Target;

/// Noisy-neighbour load tester for PostgreSQL poolers: does one tenant saturated to its
/// limits change another tenant's latency?
///
/// Exit status: 0 isolation held; 1 it did not (victim p99 under contention above
/// --max-p99-ratio × baseline, or victim errors); 2 the run could not be made.
#[derive(Parser)]
#[command(name = "pgsilo-loadtest", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure one victim/aggressor pair: baseline, contention, recovery.
    Run(RunArgs),
    /// Run the same scenario against dedicated instances, then a shared one, and
    /// report both side by side.
    Compare(CompareArgs),
    /// Print the scenario (file plus flags) as TOML and exit.
    ShowScenario(ScenarioArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Victim connection string, e.g. "host=127.0.0.1 port=6433 user=user_b password=pass_b dbname=tenant_b_db".
    #[arg(long)]
    victim: String,
    /// Aggressor connection string (needed unless --aggressors none).
    #[arg(long)]
    aggressor: Option<String>,
    /// Directory for the report files.
    #[arg(long, default_value = "target/loadtest")]
    out: PathBuf,
    /// Name of the run in reports.
    #[arg(long, default_value = "run")]
    label: String,
    #[command(flatten)]
    scenario: ScenarioArgs,
}

/// How the dedicated setup's ratio check counts in compare's exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RatioCheck {
    /// Exit 1 if the dedicated victim fails the ratio check or sees errors.
    Enforce,
    /// Report the ratio check; exit 1 only if the dedicated victim sees errors.
    Report,
}

#[derive(Args)]
struct CompareArgs {
    /// Victim connection string of the dedicated setup (the victim tenant's own instance).
    #[arg(long)]
    dedicated_victim: String,
    /// Aggressor connection string of the dedicated setup (the aggressor's own instance).
    #[arg(long)]
    dedicated_aggressor: String,
    /// Victim connection string of the shared setup (one instance serving both).
    #[arg(long)]
    shared_victim: String,
    /// Aggressor connection string of the shared setup.
    #[arg(long)]
    shared_aggressor: String,
    /// Directory for the report files (dedicated/, shared/, comparison.*).
    #[arg(long, default_value = "target/loadtest-compare")]
    out: PathBuf,
    /// Pause between the two setups, for PostgreSQL to settle.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    settle: Duration,
    /// Whether the dedicated setup's ratio check decides the exit status. The shared
    /// setup never does: it is expected to fail.
    #[arg(long, value_enum, default_value = "enforce")]
    ratio_check: RatioCheck,
    #[command(flatten)]
    scenario: ScenarioArgs,
}

/// The scenario: a TOML file, then these overrides.
#[derive(Args, Clone)]
struct ScenarioArgs {
    /// Scenario file (see loadtest/scenarios/noisy_neighbour.toml).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Length of each phase (baseline, contention, recovery), e.g. 8s.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Unmeasured victim load before baseline.
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// Victim queries per second (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Victim connections the rate is spread over.
    #[arg(long)]
    victim_connections: Option<usize>,
    /// Victim query.
    #[arg(long)]
    victim_query: Option<String>,
    /// Victim query timeout, from its intended start.
    #[arg(long, value_parser = parse_duration)]
    query_timeout: Option<Duration>,
    /// Victim connect timeout.
    #[arg(long, value_parser = parse_duration)]
    connect_timeout: Option<Duration>,
    /// New victim connections per second (connect probe); 0 turns it off.
    #[arg(long)]
    probe_rate: Option<f64>,
    /// Replace each victim connection after this long (0: never).
    #[arg(long, value_parser = parse_duration)]
    reconnect_every: Option<Duration>,
    /// Aggressor scenarios, comma-separated: connections, throughput, idle-in-transaction, or none.
    #[arg(long, value_parser = |s: &str| parse_kinds(s).map(Kinds))]
    aggressors: Option<Kinds>,
    /// Clients of the `connections` scenario.
    #[arg(long)]
    connections_clients: Option<usize>,
    /// Query looped by `connections` clients.
    #[arg(long)]
    connections_query: Option<String>,
    /// Clients of the `throughput` scenario.
    #[arg(long)]
    throughput_clients: Option<usize>,
    /// Query of the `throughput` scenario.
    #[arg(long)]
    throughput_query: Option<String>,
    /// Clients of the `idle-in-transaction` scenario.
    #[arg(long)]
    idle_clients: Option<usize>,
    /// Threads of the aggressor's runtime.
    #[arg(long)]
    aggressor_threads: Option<usize>,
    /// Fail when victim p99 under contention exceeds this × baseline p99.
    #[arg(long)]
    max_p99_ratio: Option<f64>,
    /// Warn that the run proves nothing when the generator's send lag p99 exceeds this.
    #[arg(long, value_parser = parse_duration)]
    max_send_lag: Option<Duration>,
    /// Keep the victim's threads at normal priority (default: real-time if permitted).
    #[arg(long)]
    no_realtime: bool,
    /// Cores the generator must stay off, e.g. 0,1 (the pooler's).
    #[arg(long, value_parser = |s: &str| parse_cores(s).map(Cores))]
    avoid_cores: Option<Cores>,
}

/// A list given as one comma-separated value (clap would otherwise repeat the flag).
#[derive(Clone, Debug)]
struct Kinds(Vec<AggressorKind>);
#[derive(Clone, Debug)]
struct Cores(Vec<usize>);

impl ScenarioArgs {
    fn resolve(&self) -> anyhow::Result<Scenario> {
        let mut s = match &self.scenario {
            Some(path) => Scenario::load(path)?,
            None => Scenario::default(),
        };
        macro_rules! set {
            ($field:expr, $value:expr) => {
                if let Some(v) = $value.clone() {
                    $field = v;
                }
            };
        }
        set!(s.phases.duration, self.duration);
        set!(s.phases.warmup, self.warmup);
        set!(s.victim.rate, self.rate);
        set!(s.victim.connections, self.victim_connections);
        set!(s.victim.query, self.victim_query);
        set!(s.victim.query_timeout, self.query_timeout);
        set!(s.victim.connect_timeout, self.connect_timeout);
        set!(s.victim.probe_rate, self.probe_rate);
        set!(s.victim.reconnect_every, self.reconnect_every);
        set!(s.aggressor.scenarios, self.aggressors.as_ref().map(|k| k.0.clone()));
        set!(s.aggressor.connections.clients, self.connections_clients);
        set!(s.aggressor.connections.query, self.connections_query);
        set!(s.aggressor.throughput.clients, self.throughput_clients);
        set!(s.aggressor.throughput.query, self.throughput_query);
        set!(s.aggressor.idle_in_transaction.clients, self.idle_clients);
        set!(s.aggressor.threads, self.aggressor_threads);
        set!(s.check.max_p99_ratio, self.max_p99_ratio);
        set!(s.check.max_send_lag, self.max_send_lag);
        set!(s.generator.avoid_cores, self.avoid_cores.as_ref().map(|c| c.0.clone()));
        if self.no_realtime {
            s.generator.realtime = false;
        }
        s.validate()?;
        Ok(s)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgsilo-loadtest: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_files(files: &[PathBuf]) {
    println!("report files:");
    for f in files {
        println!("  {}", f.display());
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::ShowScenario(a) => {
            print!("{}", toml::to_string_pretty(&a.resolve()?)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(a) => {
            let scenario = a.scenario.resolve()?;
            let spec = RunSpec {
                label: a.label.clone(),
                victim: Target::parse(&a.victim, "pgsilo-loadtest-victim")?,
                aggressor: a
                    .aggressor
                    .as_deref()
                    .map(|s| Target::parse(s, "pgsilo-loadtest-aggressor"))
                    .transpose()?,
                scenario,
                out_dir: a.out.clone(),
            };
            eprintln!(
                "pgsilo-loadtest: {} (total {})",
                spec.scenario.describe(),
                humantime::format_duration(spec.scenario.phases.warmup + spec.scenario.phases.duration * 3)
            );
            let r = run::run(&spec)?;
            println!("{}", report::full_text(&r.summary));
            println!("{SHARED_MACHINE_NOTE}");
            print_files(&r.files);
            Ok(if r.summary.verdict.pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Compare(a) => {
            let scenario = a.scenario.resolve()?;
            let t = |s: &str, role: &str| Target::parse(s, &format!("pgsilo-loadtest-{role}"));
            let specs = [
                RunSpec {
                    label: "dedicated".into(),
                    victim: t(&a.dedicated_victim, "victim")?,
                    aggressor: Some(t(&a.dedicated_aggressor, "aggressor")?),
                    scenario: scenario.clone(),
                    out_dir: a.out.join("dedicated"),
                },
                RunSpec {
                    label: "shared".into(),
                    victim: t(&a.shared_victim, "victim")?,
                    aggressor: Some(t(&a.shared_aggressor, "aggressor")?),
                    scenario: scenario.clone(),
                    out_dir: a.out.join("shared"),
                },
            ];
            eprintln!("pgsilo-loadtest: {}", scenario.describe());
            let c = run::compare(&specs, &a.out, a.settle)?;
            println!("{}", c.text);
            let dedicated = &c.runs[0].summary.verdict;
            let shared = &c.runs[1].summary.verdict;
            println!(
                "isolation: dedicated {}, shared {}{}",
                if dedicated.pass { "HELD" } else { "BROKEN" },
                if shared.pass { "HELD" } else { "BROKEN" },
                if !shared.pass {
                    " (expected: one instance shares its client budget and workers between tenants)"
                } else {
                    ""
                }
            );
            let mut files = c.files.clone();
            for r in &c.runs {
                files.extend(r.files.iter().cloned());
            }
            print_files(&files);
            let ok = match a.ratio_check {
                RatioCheck::Enforce => dedicated.pass,
                RatioCheck::Report => dedicated.victim_errors == 0,
            };
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}
