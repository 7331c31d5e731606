//! Reading one table (of pgsilo's TOML, or of a PgBouncer ini) key by key: typed getters
//! that report, rather than stop at, every missing, mistyped, out-of-range or unknown key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{FileKind, Problem};
use super::value::{line_of, Entries, Node, Span, Value};

/// Collects the problems found in one config: one file, or a PgBouncer ini and the files
/// it includes.
pub(super) struct Report<'a> {
    kind: FileKind,
    /// The files read, in the order of their `base`: spans are offsets into one space in
    /// which each file's text starts at its base.
    sources: Vec<Source<'a>>,
    pub(super) problems: Vec<Problem>,
}

/// One file of a report: where its text starts in the span space.
#[derive(Clone, Copy)]
pub(super) struct Source<'a> {
    pub(super) base: usize,
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
}

impl<'a> Report<'a> {
    pub(super) fn new(kind: FileKind, file: &'a Path, text: &'a str) -> Report<'a> {
        Report::with_sources(kind, vec![Source { base: 0, file, text }])
    }

    /// `sources` in order of their base; the first is the main file, which problems
    /// without a position name.
    pub(super) fn with_sources(kind: FileKind, sources: Vec<Source<'a>>) -> Report<'a> {
        debug_assert!(!sources.is_empty() && sources.windows(2).all(|w| w[0].base <= w[1].base));
        Report {
            kind,
            sources,
            problems: Vec::new(),
        }
    }

    /// The file and line a span starts at; the main file alone without a span.
    pub(super) fn locate(&self, span: Option<&Span>) -> (PathBuf, Option<usize>) {
        match span {
            Some(span) => {
                let source = self
                    .sources
                    .iter()
                    .rev()
                    .find(|s| s.base <= span.start)
                    .unwrap_or(&self.sources[0]);
                let line = line_of(source.text, span.start - source.base);
                (source.file.to_path_buf(), Some(line))
            }
            None => (self.sources[0].file.to_path_buf(), None),
        }
    }

    pub(super) fn at(&mut self, span: Option<&Span>, message: String) {
        let (file, line) = self.locate(span);
        self.problems.push(Problem {
            kind: self.kind,
            file,
            line,
            message,
        });
    }
}

/// Integer types a key can hold, with the bound used in range messages.
pub(super) trait Uint: Copy + PartialOrd + std::fmt::Display + TryFrom<i64> {
    const MAX: u64;
}

impl Uint for u16 {
    const MAX: u64 = u16::MAX as u64;
}

impl Uint for u32 {
    const MAX: u64 = u32::MAX as u64;
}

impl Uint for usize {
    // TOML integers are i64, so that is the real ceiling.
    const MAX: u64 = i64::MAX as u64;
}

/// One table being read. Every getter marks its key as known; `finish` reports the rest.
pub(super) struct Section<'r, 'a> {
    report: &'r mut Report<'a>,
    /// How messages name the table: `[pgsilo]`, `[databases.app]`.
    name: String,
    /// Where the table starts, for problems about keys that are absent.
    span: Option<Span>,
    entries: Entries,
    known: Vec<&'static str>,
}

impl<'r, 'a> Section<'r, 'a> {
    pub(super) fn new(
        report: &'r mut Report<'a>,
        name: String,
        span: Option<Span>,
        entries: Entries,
    ) -> Section<'r, 'a> {
        Section {
            report,
            name,
            span,
            entries,
            known: Vec::new(),
        }
    }

    /// The keys asked for so far.
    #[cfg(test)]
    pub(super) fn known(&self) -> &[&'static str] {
        &self.known
    }

    pub(super) fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _)| k == key)
    }

    /// Where the key's value is, without consuming it.
    pub(super) fn span_of(&self, key: &str) -> Option<Span> {
        self.entries.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.span())
    }

    /// Removes and returns the key's value; the key becomes known either way.
    pub(super) fn take(&mut self, key: &'static str) -> Option<Node> {
        self.known.push(key);
        let index = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(index).1)
    }

    /// A problem with a key's value, located at the value.
    pub(super) fn invalid(&mut self, key: &str, span: Option<&Span>, message: impl std::fmt::Display) {
        let message = format!("{key} in {}: {message}", self.name);
        self.report.at(span, message);
    }

    /// A problem with the table as a whole (a required key is missing, two keys conflict).
    pub(super) fn table_problem(&mut self, message: impl std::fmt::Display) {
        let message = format!("{}: {message}", self.name);
        let span = self.span.clone();
        self.report.at(span.as_ref(), message);
    }

    fn wrong_type(&mut self, key: &str, value: &Node, expected: &str) {
        let found = value.get_ref().type_name();
        self.invalid(
            key,
            value.span().as_ref(),
            format!("expected {expected}, found {found}"),
        );
    }

    pub(super) fn string(&mut self, key: &'static str) -> Option<(String, Option<Span>)> {
        let value = self.take(key)?;
        match value.get_ref() {
            Value::String(s) => Some((s.clone(), value.span())),
            _ => {
                self.wrong_type(key, &value, "a string");
                None
            }
        }
    }

    pub(super) fn bool(&mut self, key: &'static str, default: bool) -> bool {
        let Some(value) = self.take(key) else {
            return default;
        };
        match value.get_ref() {
            Value::Boolean(b) => *b,
            _ => {
                self.wrong_type(key, &value, "true or false");
                default
            }
        }
    }

    /// An integer of at least `min`; absent, mistyped or out of range gives `default`
    /// (after reporting), and defaults are always valid, so no follow-on problems arise.
    pub(super) fn uint<T: Uint>(&mut self, key: &'static str, default: T, min: T) -> T {
        self.take(key)
            .and_then(|v| self.uint_value(key, &v, min))
            .unwrap_or(default)
    }

    /// Like `uint`, but absent (or reported as invalid) is `None`.
    pub(super) fn opt_uint<T: Uint>(&mut self, key: &'static str, min: T) -> Option<T> {
        let value = self.take(key)?;
        self.uint_value(key, &value, min)
    }

    fn uint_value<T: Uint>(&mut self, key: &str, value: &Node, min: T) -> Option<T> {
        let Value::Integer(n) = *value.get_ref() else {
            let expected = if T::MAX >= i64::MAX as u64 {
                format!("an integer of at least {min}")
            } else {
                format!("an integer from {min} to {}", T::MAX)
            };
            self.wrong_type(key, value, &expected);
            return None;
        };
        let problem = match T::try_from(n) {
            Ok(v) if v >= min => return Some(v),
            Ok(_) => format!("must be at least {min}, found {n}"),
            Err(_) if n < 0 => format!("must be at least {min}, found {n}"),
            Err(_) => format!("must be at most {}, found {n}", T::MAX),
        };
        self.invalid(key, value.span().as_ref(), problem);
        None
    }

    /// A number of CPU cores, whole or fractional and not negative, in thousandths
    /// (max_busy_cores); absent or reported as invalid is `None`.
    pub(super) fn cores(&mut self, key: &'static str) -> Option<u32> {
        let value = self.take(key)?;
        let cores = match value.get_ref() {
            Value::Integer(n) => *n as f64,
            Value::Float(x) => *x,
            _ => {
                self.wrong_type(key, &value, "a number of cores such as 0.5");
                return None;
            }
        };
        if !(0.0..=1_000_000.0).contains(&cores) {
            self.invalid(
                key,
                value.span().as_ref(),
                format!("must be from 0 (off) to 1000000 cores, found {cores}"),
            );
            return None;
        }
        let millicores = (cores * 1000.0).round() as u32;
        if cores > 0.0 && millicores == 0 {
            self.invalid(
                key,
                value.span().as_ref(),
                format!("{cores} is below the smallest budget, 0.001 cores"),
            );
            return None;
        }
        Some(millicores)
    }

    /// A length of time: whole or fractional seconds (as PgBouncer takes them), or a
    /// string with units such as "500ms" or "2m".
    pub(super) fn seconds(&mut self, key: &'static str, default: Duration) -> Duration {
        let Some(value) = self.take(key) else {
            return default;
        };
        let span = value.span();
        let parsed = match value.get_ref() {
            Value::Integer(n) => u64::try_from(*n)
                .map(Duration::from_secs)
                .map_err(|_| format!("{n} is negative")),
            Value::Float(x) => {
                Duration::try_from_secs_f64(*x).map_err(|_| format!("{x} is not a usable number of seconds"))
            }
            Value::String(s) => humantime::parse_duration(s).map_err(|e| format!("\"{s}\" is not a duration ({e})")),
            _ => {
                self.wrong_type(key, &value, "a number of seconds");
                return default;
            }
        };
        parsed.unwrap_or_else(|msg| {
            self.invalid(key, span.as_ref(), msg);
            default
        })
    }

    /// A timeout PgBouncer treats as disabled when 0: `None` means disabled.
    pub(super) fn timeout(&mut self, key: &'static str, default: Option<Duration>) -> Option<Duration> {
        Some(self.seconds(key, default.unwrap_or(Duration::ZERO))).filter(|d| !d.is_zero())
    }

    /// A list of names, written as PgBouncer does ("a, b") or as a TOML array.
    pub(super) fn names(&mut self, key: &'static str) -> Vec<String> {
        self.string_list(key).map(|(items, _)| items).unwrap_or_default()
    }

    /// A string split on commas, or an array of strings; blanks around items are trimmed
    /// and empty items dropped. `None` when absent or mistyped (after reporting).
    pub(super) fn string_list(&mut self, key: &'static str) -> Option<(Vec<String>, Option<Span>)> {
        let value = self.take(key)?;
        let span = value.span();
        let expected = "a string or an array of strings";
        let items = match value.get_ref() {
            Value::String(s) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item.get_ref() {
                        Value::String(s) if !s.trim().is_empty() => out.push(s.trim().to_string()),
                        Value::String(_) => {
                            self.invalid(key, item.span().as_ref(), "empty name in the list");
                        }
                        _ => {
                            self.wrong_type(key, item, "a string in the list");
                        }
                    }
                }
                out
            }
            _ => {
                self.wrong_type(key, &value, expected);
                return None;
            }
        };
        Some((items, span))
    }

    /// Reports every key no getter asked for, suggesting the nearest known spelling.
    pub(super) fn finish(self) {
        let Section {
            report,
            name,
            entries,
            known,
            ..
        } = self;
        for (key, value) in entries {
            let mut message = format!("unknown key \"{key}\" in {name}");
            if let Some(near) = nearest(&key, &known) {
                message.push_str(&format!(" (did you mean \"{near}\"?)"));
            }
            report.at(value.span().as_ref(), message);
        }
    }
}

/// The known name within a small edit distance of `word`, if any.
pub(super) fn nearest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    known
        .iter()
        .map(|k| (edit_distance(word, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Optimal string alignment distance: edits plus swaps of neighbours, the usual typos.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for (j, cell) in d.iter_mut().take(width).enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        d[i * width] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_spellings_only() {
        let known = ["max_client_conn", "listen_port", "pool_mode"];
        assert_eq!(nearest("max_client_con", &known), Some("max_client_conn"));
        assert_eq!(nearest("listen_prot", &known), Some("listen_port"));
        assert_eq!(nearest("prot", &["port", "host"]), Some("port"));
        assert_eq!(nearest("colour", &known), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
