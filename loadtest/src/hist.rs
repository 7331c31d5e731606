//! Latency histograms (microseconds, 3 significant figures) and their files: HdrHistogram's
//! percentile-distribution text (`.hgrm`) and interval logs (`.hlog`).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;

/// Significant figures of every histogram.
pub const SIGFIG: u8 = 3;
/// Highest trackable value: one hour in microseconds (larger values are clamped).
pub const MAX_MICROS: u64 = 3_600_000_000;
/// `.hgrm` and interval-log values are written in milliseconds (the histograms hold µs).
pub const OUTPUT_SCALE: f64 = 1000.0;
/// Java's default ticks per half distance for percentile distributions.
pub const TICKS_PER_HALF_DISTANCE: u32 = 5;

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, SIGFIG).expect("valid histogram bounds")
}

pub fn micros(d: Duration) -> u64 {
    (d.as_micros().min(u128::from(MAX_MICROS)) as u64).max(1)
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(micros(d));
}

/// Value at percentile `p` (0..=100), in milliseconds; 0 for an empty histogram.
pub fn pct_ms(h: &Histogram<u64>, p: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_percentile(p) as f64 / OUTPUT_SCALE
}

pub fn max_ms(h: &Histogram<u64>) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.max() as f64 / OUTPUT_SCALE
    }
}

/// Sub-buckets of a histogram with `sigfig` significant figures (as HdrHistogram computes it).
fn sub_bucket_count(sigfig: u8) -> u64 {
    let largest = 2 * 10u64.pow(u32::from(sigfig));
    1u64 << (largest as f64).log2().ceil() as u32
}

/// One line of a percentile distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HgrmRow {
    pub value: f64,
    pub percentile: f64,
    pub total_count: u64,
    /// `1/(1-Percentile)`; `None` on the final (100%) line, which has no such column.
    pub inverse: Option<f64>,
}

/// The footer of a percentile distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HgrmFooter {
    pub mean: f64,
    pub stddev: f64,
    pub max: f64,
    pub total_count: u64,
    pub buckets: u64,
    pub sub_buckets: u64,
}

/// The percentile distribution exactly as HdrHistogram's `outputPercentileDistribution`
/// writes it (values divided by `scale`), which the public plotters read.
pub fn percentile_distribution(h: &Histogram<u64>, scale: f64) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        let mut total: u64 = 0;
        for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let value = h.highest_equivalent(v.value_iterated_to()) as f64 / scale;
            if q < 1.0 {
                let _ = writeln!(
                    out,
                    "{:>12.3} {:>2.12} {:>10} {:>14.2}",
                    value,
                    q,
                    total,
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(out, "{:>12.3} {:>2.12} {:>10}", value, q, total);
            }
        }
    }
    let (mean, stddev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / scale, h.stdev() / scale, h.max() as f64 / scale)
    };
    let _ = writeln!(out, "#[Mean    = {mean:>12.3}, StdDeviation   = {stddev:>12.3}]");
    let _ = writeln!(out, "#[Max     = {max:>12.3}, Total count    = {:>12}]", h.len());
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_bucket_count(SIGFIG)
    );
    out
}

/// Parse a percentile distribution back (rows and footer); errors on anything malformed.
pub fn parse_percentile_distribution(text: &str) -> anyhow::Result<(Vec<HgrmRow>, HgrmFooter)> {
    let mut lines = text.lines();
    let header = lines.next().ok_or_else(|| anyhow!("empty file"))?;
    let cols: Vec<&str> = header.split_whitespace().collect();
    if cols != ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"] {
        bail!("unexpected header {header:?}");
    }
    let mut rows = Vec::new();
    let mut footer_lines = Vec::new();
    for line in lines {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        if let Some(rest) = t.strip_prefix("#[") {
            footer_lines.push(rest.trim_end_matches(']').to_string());
            continue;
        }
        let f: Vec<&str> = t.split_whitespace().collect();
        if !(f.len() == 3 || f.len() == 4) {
            bail!("malformed line {line:?}");
        }
        let row = HgrmRow {
            value: f[0].parse().with_context(|| format!("value in {line:?}"))?,
            percentile: f[1].parse().with_context(|| format!("percentile in {line:?}"))?,
            total_count: f[2].parse().with_context(|| format!("count in {line:?}"))?,
            inverse: match f.get(3) {
                Some(x) => Some(x.parse().with_context(|| format!("1/(1-p) in {line:?}"))?),
                None => None,
            },
        };
        rows.push(row);
    }
    let mut kv = std::collections::HashMap::new();
    for l in &footer_lines {
        for part in l.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| anyhow!("malformed footer {l:?}"))?;
            kv.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    let get = |k: &str| -> anyhow::Result<&String> { kv.get(k).ok_or_else(|| anyhow!("footer lacks {k}")) };
    let footer = HgrmFooter {
        mean: get("Mean")?.parse()?,
        stddev: get("StdDeviation")?.parse()?,
        max: get("Max")?.parse()?,
        total_count: get("Total count")?.parse()?,
        buckets: get("Buckets")?.parse()?,
        sub_buckets: get("SubBuckets")?.parse()?,
    };
    Ok((rows, footer))
}

/// An interval log (HdrHistogram's `.hlog`, as `HistogramLogWriter` writes it: deflated
/// V2 histograms, base64) with one histogram per interval, tagged.
pub fn interval_log(
    intervals: &[(Duration, Duration, Option<&str>, &Histogram<u64>)],
    base_time: SystemTime,
    comments: &[String],
) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    let mut builder = IntervalLogWriterBuilder::new();
    for c in comments {
        builder.add_comment(c);
    }
    builder
        .with_start_time(base_time)
        .with_base_time(base_time)
        .with_max_value_divisor(OUTPUT_SCALE);
    {
        let mut writer = builder
            .begin_log_with(&mut buf, &mut serializer)
            .context("starting interval log")?;
        writer
            .write_comment("\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"")
            .context("writing interval log")?;
        for (start, len, tag, h) in intervals {
            let tag = tag.and_then(Tag::new);
            writer
                .write_histogram(h, *start, *len, tag)
                .map_err(|e| anyhow!("writing interval log: {e}"))?;
        }
    }
    Ok(buf)
}

/// One histogram read back from an interval log.
#[derive(Debug)]
pub struct LoggedInterval {
    pub tag: Option<String>,
    /// Seconds since the log's BaseTime.
    pub start: Duration,
    pub duration: Duration,
    pub hist: Histogram<u64>,
}

/// Read an interval log back (every interval, decoded).
pub fn read_interval_log(bytes: &[u8]) -> anyhow::Result<Vec<LoggedInterval>> {
    use base64::Engine as _;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;
    let mut out = Vec::new();
    let mut de = Deserializer::new();
    for entry in IntervalLogIterator::new(bytes) {
        let entry = entry.map_err(|e| anyhow!("malformed interval log: {e:?}"))?;
        if let LogEntry::Interval(i) = entry {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(i.encoded_histogram())
                .context("interval histogram is not base64")?;
            let hist: Histogram<u64> = de
                .deserialize(&mut std::io::Cursor::new(raw))
                .map_err(|e| anyhow!("interval histogram does not decode: {e:?}"))?;
            out.push(LoggedInterval {
                tag: i.tag().map(|t| t.as_str().to_string()),
                start: i.start_timestamp(),
                duration: i.duration(),
                hist,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1..=10000 µs, one of each: a uniform distribution with known percentiles.
    fn uniform() -> Histogram<u64> {
        let mut h = new_hist();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let h = uniform();
        // 3 significant figures: within 0.1% of the exact value.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 1e-9;
        assert!(close(pct_ms(&h, 50.0), 5.0), "{}", pct_ms(&h, 50.0));
        assert!(close(pct_ms(&h, 90.0), 9.0));
        assert!(close(pct_ms(&h, 99.0), 9.9));
        assert!(close(pct_ms(&h, 99.9), 9.99));
        assert!(close(max_ms(&h), 10.0));
        assert_eq!(pct_ms(&new_hist(), 99.0), 0.0);
        assert_eq!(micros(Duration::from_nanos(10)), 1);
        assert_eq!(micros(Duration::from_secs(7200)), MAX_MICROS);
    }

    #[test]
    fn hgrm_has_the_hdrhistogram_layout_and_parses_back() {
        let h = uniform();
        let text = percentile_distribution(&h, OUTPUT_SCALE);
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap(),
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines.next().unwrap(), "");
        // First row as the Java implementation prints it.
        assert_eq!(
            lines.next().unwrap(),
            "       0.001 0.000000000000          1           1.00"
        );
        assert!(text.contains("#[Mean    =        5.001, StdDeviation   =        2.887]"));
        assert!(text.contains("#[Max     =       10.007, Total count    =        10000]"));
        assert!(text.contains("#[Buckets =           22, SubBuckets     =         2048]"));

        let (rows, footer) = parse_percentile_distribution(&text).unwrap();
        assert_eq!(footer.total_count, 10_000);
        assert!((footer.mean - 5.0).abs() < 0.01);
        assert_eq!(footer.sub_buckets, 2048);
        // Rows climb to 100% and the last one accounts for every value.
        assert!(rows.windows(2).all(|w| w[1].percentile >= w[0].percentile
            && w[1].total_count >= w[0].total_count
            && w[1].value >= w[0].value));
        let last = rows.last().unwrap();
        assert_eq!(last.percentile, 1.0);
        assert_eq!(last.total_count, 10_000);
        assert_eq!(last.inverse, None);
        // Reading percentiles off the file gives the known values (the file has rows at
        // 50% and 90% exactly; the first row at or past 99% is within one tick of it).
        let at = |p: f64| rows.iter().find(|r| r.percentile >= p).unwrap().value;
        assert!((at(0.5) - 5.0).abs() <= 0.005, "{}", at(0.5));
        assert!((at(0.9) - 9.0).abs() <= 0.01, "{}", at(0.9));
        assert!((9.9..=9.92).contains(&at(0.99)), "{}", at(0.99));
        for r in &rows[..rows.len() - 1] {
            let inv = r.inverse.unwrap();
            assert!((inv - 1.0 / (1.0 - r.percentile)).abs() <= 0.01 * inv);
        }
    }

    #[test]
    fn empty_histogram_still_writes_a_valid_file() {
        let text = percentile_distribution(&new_hist(), OUTPUT_SCALE);
        let (rows, footer) = parse_percentile_distribution(&text).unwrap();
        assert!(rows.is_empty());
        assert_eq!(footer.total_count, 0);
        assert!(parse_percentile_distribution("nonsense").is_err());
    }

    #[test]
    fn interval_log_round_trips() {
        let mut a = new_hist();
        a.record(100).unwrap();
        let b = uniform();
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let log = interval_log(
            &[
                (Duration::ZERO, Duration::from_secs(1), Some("baseline"), &a),
                (Duration::from_secs(1), Duration::from_secs(1), Some("contention"), &b),
            ],
            base,
            &["pgsilo-loadtest".to_string()],
        )
        .unwrap();
        let text = String::from_utf8(log.clone()).unwrap();
        assert!(text.starts_with("#pgsilo-loadtest\n"));
        assert!(text.contains("#[BaseTime: 1700000000.000 (seconds since epoch)]"));
        let hists = read_interval_log(&log).unwrap();
        assert_eq!(hists.len(), 2);
        assert_eq!(hists[0].tag.as_deref(), Some("baseline"));
        assert_eq!(hists[1].start, Duration::from_secs(1));
        assert_eq!(hists[1].duration, Duration::from_secs(1));
        assert!(text.contains(",10.007,"), "interval max in ms");
        let back = &hists[1].hist;
        assert_eq!(back.len(), 10_000);
        assert_eq!(back.value_at_quantile(0.99), b.value_at_quantile(0.99));
    }
}
