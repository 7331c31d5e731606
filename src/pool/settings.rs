//! Session settings (GUCs) as name/value pairs: what a server connection currently has,
//! what a client expects. Names compare case-insensitively, as PostgreSQL's do.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// lowercase name -> (name as PostgreSQL reports it, value)
    map: BTreeMap<String, (String, String)>,
    /// Changes with every change of `map`, to a number no other Settings ever had; a
    /// clone keeps it. Two Settings with the same generation hold the same entries, which
    /// lets the per-transaction comparison of a client's settings with a server's be
    /// skipped when neither changed since they last matched (`proxy::params`). 0: empty,
    /// never changed.
    generation: u64,
}

/// Generations are handed out process-wide, so no two histories share one.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

impl PartialEq for Settings {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl Eq for Settings {}

/// Settings PostgreSQL reports with ParameterStatus that a session may also change, so a
/// pooler must carry them from server to server for each client. The other reported ones
/// (server_version, integer_datetimes, is_superuser ...) describe the server, not the session.
pub const TRACKED_REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "default_transaction_read_only",
    "intervalstyle",
    "search_path",
    "standard_conforming_strings",
    "timezone",
];

pub fn is_tracked_reported(lower: &str) -> bool {
    TRACKED_REPORTED.contains(&lower)
}

impl Settings {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.map.get(&name.to_ascii_lowercase()).map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &str, value: &str) {
        let lower = name.to_ascii_lowercase();
        match self.map.get_mut(&lower) {
            Some(entry) => {
                if entry.1 != value {
                    entry.1.clear();
                    entry.1.push_str(value);
                    self.changed();
                }
            }
            None => {
                self.map.insert(lower, (name.to_string(), value.to_string()));
                self.changed();
            }
        }
    }

    pub fn remove(&mut self, name: &str) {
        if self.map.remove(&name.to_ascii_lowercase()).is_some() {
            self.changed();
        }
    }

    fn changed(&mut self) {
        self.generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
    }

    /// See the field: equal generations mean equal entries.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(&name.to_ascii_lowercase())
    }

    /// Lookup by a name already in lowercase: no allocation, for the per-transaction
    /// comparison of a client's settings with a server's.
    #[inline]
    pub fn get_lower(&self, lower: &str) -> Option<&str> {
        self.map.get(lower).map(|(_, v)| v.as_str())
    }

    /// (lowercase name, name as reported, value), ordered by lowercase name.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.map.iter().map(|(l, (n, v))| (l.as_str(), n.as_str(), v.as_str()))
    }

    /// (name as reported, value), ordered by lowercase name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.values().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A ParameterStatus body: two C strings.
pub fn parse_parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    use crate::protocol::framing::read_cstr;
    let (name, at) = read_cstr(body, 0)?;
    let (value, _) = read_cstr(body, at)?;
    Some((std::str::from_utf8(name).ok()?, std::str::from_utf8(value).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_case_insensitive_and_keep_reported_spelling() {
        let mut s = Settings::default();
        s.set("TimeZone", "UTC");
        s.set("timezone", "Europe/Paris");
        assert_eq!(s.get("TIMEZONE"), Some("Europe/Paris"));
        assert_eq!(s.iter().next(), Some(("TimeZone", "Europe/Paris")));
        s.remove("TimeZone");
        assert!(s.is_empty());
    }

    #[test]
    fn a_generation_changes_with_every_change_and_is_kept_by_a_clone() {
        let mut a = Settings::default();
        assert_eq!(a.generation(), 0);
        a.set("TimeZone", "UTC");
        let g1 = a.generation();
        assert_ne!(g1, 0);
        let mut b = a.clone();
        assert_eq!(b.generation(), g1);
        // The same value again changes nothing.
        b.set("timezone", "UTC");
        assert_eq!(b.generation(), g1);
        b.set("timezone", "Europe/Paris");
        assert_ne!(b.generation(), g1);
        // Another history reaching the same entries gets its own number, yet compares equal.
        let mut c = Settings::default();
        c.set("TimeZone", "UTC");
        assert_ne!(c.generation(), g1);
        assert_eq!(c, a);
        let g = c.generation();
        c.remove("nothing");
        assert_eq!(c.generation(), g);
        c.remove("timezone");
        assert_ne!(c.generation(), g);
    }

    #[test]
    fn parses_parameter_status() {
        assert_eq!(parse_parameter_status(b"TimeZone\0UTC\0"), Some(("TimeZone", "UTC")));
        assert_eq!(parse_parameter_status(b"TimeZone\0UTC"), None);
    }
}
