//! What a run does: phases, victim load, aggressor scenarios, pass/fail limits.
//!
//! Read from a TOML file (every key optional, see `scenarios/noisy_neighbour.toml`), then
//! overridden by command-line flags.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One way for the aggressor tenant to be a noisy neighbour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AggressorKind {
    /// Open clients up to and past max_client_conn and keep them busy with long
    /// `pg_sleep` queries, so the client budget and the pool stay exhausted.
    Connections,
    /// Closed-loop clients sending cheap queries as fast as they can.
    Throughput,
    /// Clients that open a transaction and sit on their server connection.
    IdleInTransaction,
}

impl AggressorKind {
    pub const ALL: [AggressorKind; 3] = [
        AggressorKind::Connections,
        AggressorKind::Throughput,
        AggressorKind::IdleInTransaction,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AggressorKind::Connections => "connections",
            AggressorKind::Throughput => "throughput",
            AggressorKind::IdleInTransaction => "idle-in-transaction",
        }
    }
}

impl fmt::Display for AggressorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AggressorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        AggressorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == norm)
            .ok_or_else(|| {
                format!(
                    "unknown aggressor scenario {s:?} (expected one of: connections, throughput, idle-in-transaction)"
                )
            })
    }
}

impl<'de> Deserialize<'de> for AggressorKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for AggressorKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Parse "8s", "500ms", "1m 30s" (humantime) or a bare number of seconds ("8", "0.5").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("invalid duration {text:?}"));
    }
    humantime::parse_duration(t).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Duration in a TOML file: a string ("8s", "250ms") or a number of seconds.
mod dur {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Secs(f64),
    }

    pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
            Raw::Secs(f) if f.is_finite() && f >= 0.0 => Ok(Duration::from_secs_f64(f)),
            Raw::Secs(f) => Err(serde::de::Error::custom(format!("invalid duration {f}"))),
        }
    }

    pub fn ser<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Phases {
    /// Victim load before `baseline`, not measured (connections warm, caches hot).
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub warmup: Duration,
    /// Length of each measured phase: baseline, contention, recovery.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub duration: Duration,
}

impl Default for Phases {
    fn default() -> Self {
        Phases {
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(8),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Victim {
    /// Queries per second in all (open loop: sent on schedule whatever the answers do).
    pub rate: f64,
    /// Connections the rate is spread over (query i goes to connection i mod n).
    pub connections: usize,
    /// The query, sent with the simple query protocol.
    pub query: String,
    /// A query not answered this long after its intended start counts as an error
    /// ("timeout"); its connection is then replaced.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub query_timeout: Duration,
    /// Limit on opening a connection (TCP, startup, authentication).
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub connect_timeout: Duration,
    /// New connections per second opened by the connect probe (connect, `SELECT 1`,
    /// disconnect), measuring connect latency and refusals; 0 turns the probe off.
    pub probe_rate: f64,
    /// Each victim connection is replaced after this long (0: never), as apps that
    /// recycle connections do; the reconnect counts in the query's latency.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub reconnect_every: Duration,
}

impl Default for Victim {
    fn default() -> Self {
        Victim {
            rate: 500.0,
            connections: 8,
            query: "SELECT 1".into(),
            query_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            probe_rate: 4.0,
            reconnect_every: Duration::ZERO,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionsScenario {
    /// Clients to keep open; set it past the aggressor's max_client_conn.
    pub clients: usize,
    /// What each connected client runs in a loop.
    pub query: String,
    /// Wait before a refused or broken client tries again.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub retry: Duration,
    /// Clients start spread over this long (logins cost the generator CPU too).
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub ramp: Duration,
}

impl Default for ConnectionsScenario {
    fn default() -> Self {
        ConnectionsScenario {
            clients: 160,
            query: "SELECT pg_sleep(1)".into(),
            retry: Duration::from_secs(1),
            ramp: Duration::from_millis(500),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThroughputScenario {
    /// Closed-loop clients.
    pub clients: usize,
    pub query: String,
}

impl Default for ThroughputScenario {
    fn default() -> Self {
        ThroughputScenario {
            clients: 32,
            query: "SELECT 1".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdleInTransactionScenario {
    /// Clients that run `BEGIN; SELECT 1` and then sit; set it past the pool size.
    pub clients: usize,
}

impl Default for IdleInTransactionScenario {
    fn default() -> Self {
        IdleInTransactionScenario { clients: 25 }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Aggressor {
    /// Scenarios run together during the contention phase.
    pub scenarios: Vec<AggressorKind>,
    /// Threads of the aggressor's own runtime.
    pub threads: usize,
    /// Limit on each aggressor connection attempt.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub connect_timeout: Duration,
    pub connections: ConnectionsScenario,
    pub throughput: ThroughputScenario,
    pub idle_in_transaction: IdleInTransactionScenario,
}

impl Default for Aggressor {
    fn default() -> Self {
        Aggressor {
            scenarios: vec![AggressorKind::Connections, AggressorKind::IdleInTransaction],
            threads: 2,
            connect_timeout: Duration::from_secs(5),
            connections: ConnectionsScenario::default(),
            throughput: ThroughputScenario::default(),
            idle_in_transaction: IdleInTransactionScenario::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Check {
    /// Fail when the victim's p99 under contention exceeds this many times its baseline p99.
    pub max_p99_ratio: f64,
    /// Warn that the run proves nothing when the generator's own send lag (p99 of actual
    /// send time minus intended time, for queries whose connection was free) exceeds this.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub max_send_lag: Duration,
}

impl Default for Check {
    fn default() -> Self {
        Check {
            max_p99_ratio: 1.5,
            max_send_lag: Duration::from_millis(5),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Generator {
    /// Cores the load generator's threads must not run on (the pooler's cores).
    pub avoid_cores: Vec<usize>,
    /// Run the victim's pacing and sending threads at real-time priority (SCHED_FIFO),
    /// so that on a busy machine the measuring instrument stays on schedule. The
    /// aggressor keeps normal priority. Ignored (with a note) where not permitted.
    pub realtime: bool,
}

impl Default for Generator {
    fn default() -> Self {
        Generator {
            avoid_cores: Vec::new(),
            realtime: true,
        }
    }
}

/// A whole scenario.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub phases: Phases,
    pub victim: Victim,
    pub aggressor: Aggressor,
    pub check: Check,
    pub generator: Generator,
}

impl Scenario {
    pub fn from_toml(text: &str) -> anyhow::Result<Scenario> {
        let s: Scenario = toml::from_str(text)?;
        Ok(s)
    }

    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading scenario {}", path.display()))?;
        Scenario::from_toml(&text).with_context(|| format!("in scenario {}", path.display()))
    }

    /// Reject settings that cannot run.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.victim.rate > 0.0 && self.victim.rate.is_finite()) {
            bail!("victim rate must be positive, got {}", self.victim.rate);
        }
        if self.victim.rate > 100_000.0 {
            bail!(
                "victim rate {} is beyond what this generator can pace",
                self.victim.rate
            );
        }
        if self.victim.connections == 0 {
            bail!("victim connections must be at least 1");
        }
        if !(self.victim.probe_rate >= 0.0 && self.victim.probe_rate <= 1000.0) {
            bail!("probe rate must be between 0 and 1000 per second");
        }
        if self.phases.duration < Duration::from_millis(100) {
            bail!("phase duration must be at least 100ms");
        }
        if self.victim.query_timeout.is_zero() || self.victim.connect_timeout.is_zero() {
            bail!("query_timeout and connect_timeout must be positive");
        }
        if self.check.max_p99_ratio.is_nan() || self.check.max_p99_ratio <= 0.0 {
            bail!("max_p99_ratio must be positive");
        }
        if self.aggressor.threads == 0 {
            bail!("aggressor threads must be at least 1");
        }
        Ok(())
    }

    /// Victim queries expected per measured phase (rate × duration).
    pub fn expected_per_phase(&self) -> f64 {
        self.victim.rate * self.phases.duration.as_secs_f64()
    }

    /// One line describing the load, for reports.
    pub fn describe(&self) -> String {
        let aggr = if self.aggressor.scenarios.is_empty() {
            "none".to_string()
        } else {
            self.aggressor
                .scenarios
                .iter()
                .map(|k| match k {
                    AggressorKind::Connections => format!(
                        "connections ({} clients running {:?})",
                        self.aggressor.connections.clients, self.aggressor.connections.query
                    ),
                    AggressorKind::Throughput => format!(
                        "throughput ({} closed-loop clients running {:?})",
                        self.aggressor.throughput.clients, self.aggressor.throughput.query
                    ),
                    AggressorKind::IdleInTransaction => format!(
                        "idle-in-transaction ({} clients)",
                        self.aggressor.idle_in_transaction.clients
                    ),
                })
                .collect::<Vec<_>>()
                .join(" + ")
        };
        format!(
            "victim: {:?} open loop at {}/s over {} connections, connect probe {}/s; \
             phases: {} each (+{} warm-up); aggressor: {}",
            self.victim.query,
            self.victim.rate,
            self.victim.connections,
            self.victim.probe_rate,
            humantime::format_duration(self.phases.duration),
            humantime::format_duration(self.phases.warmup),
            aggr
        )
    }
}

/// Parse "connections,idle-in-transaction" (empty or "none": no aggressor).
pub fn parse_kinds(text: &str) -> Result<Vec<AggressorKind>, String> {
    let t = text.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for part in t.split(',') {
        let k: AggressorKind = part.parse()?;
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// Parse "0,1" or "0-3,6".
pub fn parse_cores(text: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a.trim().parse().map_err(|_| format!("bad core range {part:?}"))?;
            let b: usize = b.trim().parse().map_err(|_| format!("bad core range {part:?}"))?;
            if a > b {
                return Err(format!("bad core range {part:?}"));
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| format!("bad core id {part:?}"))?);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_toml_overrides() {
        let s = Scenario::from_toml(
            r#"
            [phases]
            duration = "2s"
            warmup = 0.5
            [victim]
            rate = 200
            [aggressor]
            scenarios = ["throughput", "idle_in_transaction"]
            [aggressor.throughput]
            clients = 4
            [check]
            max_p99_ratio = 2.0
            max_send_lag = "10ms"
            "#,
        )
        .unwrap();
        assert_eq!(s.phases.duration, Duration::from_secs(2));
        assert_eq!(s.phases.warmup, Duration::from_millis(500));
        assert_eq!(s.victim.rate, 200.0);
        assert_eq!(s.victim.connections, 8);
        assert_eq!(
            s.aggressor.scenarios,
            vec![AggressorKind::Throughput, AggressorKind::IdleInTransaction]
        );
        assert_eq!(s.aggressor.throughput.clients, 4);
        assert_eq!(s.aggressor.connections.clients, 160);
        assert_eq!(s.check.max_send_lag, Duration::from_millis(10));
        s.validate().unwrap();
        assert_eq!(s.expected_per_phase(), 400.0);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Scenario::from_toml("[victim]\nrat = 3\n").is_err());
        assert!(Scenario::from_toml("[aggressor]\nscenarios = [\"cpu\"]\n").is_err());
    }

    #[test]
    fn shipped_scenario_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/noisy_neighbour.toml");
        let s = Scenario::load(&path).unwrap();
        s.validate().unwrap();
    }

    #[test]
    fn parsing_helpers() {
        assert_eq!(parse_duration("8s").unwrap(), Duration::from_secs(8));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_cores("0,1").unwrap(), vec![0, 1]);
        assert_eq!(parse_cores("3-5, 1").unwrap(), vec![1, 3, 4, 5]);
        assert!(parse_cores("x").is_err());
        assert_eq!(
            parse_kinds("connections, idle-in-transaction").unwrap(),
            vec![AggressorKind::Connections, AggressorKind::IdleInTransaction]
        );
        assert!(parse_kinds("none").unwrap().is_empty());
        assert!(parse_kinds("cpu").is_err());
    }
}
