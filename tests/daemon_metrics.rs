//! The Prometheus endpoint (`metrics_listen`) as a scraper sees it: well-formed text
//! exposition, pool gauges, counters that grow with traffic, histograms, errors by
//! SQLSTATE, one series per worker, and 404 elsewhere.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use support::{db_error, free_port, runtime, PgCluster, Pgsilo};

/// One sample: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Scrape {
    content_type: String,
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The single sample of `name` with `labels`; panics if there is not exactly one.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.find(name, labels);
        assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
        found[0].value
    }
}

fn http_get(port: u16, path: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics_listen");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        })
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

/// Parses the text exposition format strictly: every line is a `# HELP`/`# TYPE`
/// comment or `name{label="value",...} value`.
fn parse(body: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    for line in body.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(_), _) => {}
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(
                        matches!(kind, "counter" | "gauge" | "histogram" | "summary" | "untyped"),
                        "{line}"
                    );
                    types.insert(name.to_string(), kind.to_string());
                }
                _ => panic!("bad comment line: {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                (name, parse_labels(inner, line))
            }
        };
        assert!(
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    (samples, types)
}

fn parse_labels(inner: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = inner.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad label name {key:?} in {line:?}"
        );
        assert_eq!(chars.next(), Some('"'), "label value not quoted in {line:?}");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => panic!("bad escape {other:?} in {line:?}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        }
        assert!(
            labels.insert(key.clone(), value).is_none(),
            "label {key} twice in {line:?}"
        );
        match chars.next() {
            Some(',') | None => {}
            other => panic!("unexpected {other:?} after a label in {line:?}"),
        }
    }
    labels
}

fn scrape(port: u16) -> Scrape {
    let (status, content_type, body) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    let (samples, types) = parse(&body);
    Scrape {
        content_type,
        samples,
        types,
    }
}

#[test]
fn metrics_endpoint_serves_prometheus_text_that_follows_the_traffic() {
    let cluster = PgCluster::start();
    let metrics_port = free_port();
    let p = Pgsilo::builder()
        .pool_size(2)
        .user("user_a", "pass_a")
        .database("tenant_a_db", &cluster)
        .set_str("metrics_listen", &format!("127.0.0.1:{metrics_port}"))
        .start();
    p.wait_for_log(
        &format!("metrics on http://127.0.0.1:{metrics_port}/metrics"),
        Duration::from_secs(10),
    );
    let workers: usize = {
        let log = p.log();
        log.lines()
            .find(|l| l.contains(" LOG listening on "))
            .and_then(|l| l.split(" with ").nth(1))
            .and_then(|s| s.split(" worker(s)").next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("worker count in the log:\n{log}"))
    };

    let rt = runtime();
    let pool = [("database", "tenant_a_db"), ("user", "user_a")];
    let (client, first) = rt.block_on(async {
        let c = p.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        for i in 0..10 {
            c.batch_execute(&format!("BEGIN; SELECT {i}; COMMIT")).await.unwrap();
        }
        let e = c.simple_query("SELECT 1/0").await.unwrap_err();
        assert_eq!(db_error(&e).0, "22012");
        (c, scrape(metrics_port))
    });

    assert!(
        first.content_type.starts_with("text/plain; version=0.0.4"),
        "{:?}",
        first.content_type
    );
    assert_eq!(
        first.value("pgsilo_pool_clients", &[pool[0], pool[1], ("state", "active")]),
        1.0
    );
    assert_eq!(
        first.value("pgsilo_pool_clients", &[pool[0], pool[1], ("state", "waiting")]),
        0.0
    );
    for state in ["active", "idle", "login"] {
        first.value("pgsilo_pool_servers", &[pool[0], pool[1], ("state", state)]);
    }
    assert_eq!(first.value("pgsilo_pool_size", &pool), 2.0);
    let xacts = first.value("pgsilo_pool_transactions_total", &pool);
    assert!(xacts >= 10.0, "{xacts}");
    let queries = first.value("pgsilo_pool_queries_total", &pool);
    assert!(queries >= 11.0, "{queries}");
    assert!(first.value("pgsilo_pool_received_bytes_total", &pool) > 0.0);
    assert!(first.value("pgsilo_pool_sent_bytes_total", &pool) > 0.0);
    assert_eq!(first.value("pgsilo_errors_total", &[("sqlstate", "22012")]), 1.0);
    for (name, kind) in [
        ("pgsilo_pool_clients", "gauge"),
        ("pgsilo_pool_transactions_total", "counter"),
        ("pgsilo_errors_total", "counter"),
        ("pgsilo_pool_query_duration_seconds", "histogram"),
        ("pgsilo_worker_clients", "gauge"),
    ] {
        assert_eq!(first.types.get(name).map(String::as_str), Some(kind), "# TYPE {name}");
    }

    // The query histogram: cumulative buckets ending in +Inf, which equals _count.
    let buckets = first.find("pgsilo_pool_query_duration_seconds_bucket", &pool);
    assert!(buckets.len() >= 3, "{buckets:?}");
    let mut last = 0.0;
    let mut last_le = f64::NEG_INFINITY;
    for b in &buckets {
        let le = &b.labels["le"];
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap()
        };
        assert!(bound > last_le, "buckets in order: {buckets:?}");
        assert!(b.value >= last, "cumulative: {buckets:?}");
        last = b.value;
        last_le = bound;
    }
    assert_eq!(buckets.last().unwrap().labels["le"], "+Inf");
    let count = first.value("pgsilo_pool_query_duration_seconds_count", &pool);
    assert_eq!(last, count);
    assert!(count >= 11.0, "{count}");
    assert!(first.value("pgsilo_pool_query_duration_seconds_sum", &pool) > 0.0);

    // One series per worker.
    let per_worker = first.find("pgsilo_worker_clients", &[]);
    assert_eq!(per_worker.len(), workers, "{per_worker:?}");
    let mut ids: Vec<&str> = per_worker.iter().map(|s| s.labels["worker"].as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), workers);
    assert_eq!(
        per_worker.iter().map(|s| s.value).sum::<f64>(),
        1.0,
        "one client: {per_worker:?}"
    );
    assert_eq!(first.find("pgsilo_worker_transactions_total", &[]).len(), workers);
    assert_eq!(first.find("pgsilo_worker_servers", &[("state", "idle")]).len(), workers);
    let worker_xacts: f64 = first
        .find("pgsilo_worker_transactions_total", &[])
        .iter()
        .map(|s| s.value)
        .sum();
    assert_eq!(worker_xacts, xacts, "workers add up to the pool");

    // More traffic: the counters grow, and so does the error counter.
    rt.block_on(async {
        for _ in 0..5 {
            client.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
        }
        let e = client.simple_query("SELECT 1/0").await.unwrap_err();
        assert_eq!(db_error(&e).0, "22012");
        let e = client.simple_query("SELECT * FROM no_such_table").await.unwrap_err();
        assert_eq!(db_error(&e).0, "42P01");
    });
    let second = scrape(metrics_port);
    assert!(second.value("pgsilo_pool_transactions_total", &pool) >= xacts + 5.0);
    assert!(second.value("pgsilo_pool_queries_total", &pool) >= queries + 7.0);
    assert!(
        second.value("pgsilo_pool_query_duration_seconds_count", &pool) > count,
        "histogram count grew"
    );
    assert_eq!(second.value("pgsilo_errors_total", &[("sqlstate", "22012")]), 2.0);
    assert_eq!(second.value("pgsilo_errors_total", &[("sqlstate", "42P01")]), 1.0);
    let worker_xacts2: f64 = second
        .find("pgsilo_worker_transactions_total", &[])
        .iter()
        .map(|s| s.value)
        .sum();
    assert!(worker_xacts2 >= worker_xacts + 5.0);

    drop(client);
    let (status, _, body) = http_get(metrics_port, "/other");
    assert_eq!(status, 404, "{body}");
    let (status, _, _) = http_get(metrics_port, "/");
    assert_eq!(status, 404);
    let (status, ct, _) = http_get(metrics_port, "/metrics?x=1");
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/plain; version=0.0.4"));
}
