//! Carrying a client's session settings from server to server: what the client asked
//! for at startup or set since, compared with what the server it lands on has, and the
//! one statement that makes them match before the client's own query runs.

use crate::pool::settings::{is_tracked_reported, Settings};
use crate::pool::ServerMeta;

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

/// The settings a client starts with: the pool's welcome values for the tracked reported
/// settings, overridden by what the client sent (its parameters and `-c` options).
pub fn initial_settings(
    welcome: &Settings,
    startup: &[(String, String)],
    options: &[(String, String)],
    ignored: &[String],
) -> Settings {
    let mut s = Settings::default();
    for (name, value) in welcome.iter() {
        if is_tracked_reported(&name.to_ascii_lowercase()) {
            s.set(name, value);
        }
    }
    let from_client = startup
        .iter()
        .filter(|(k, _)| !NOT_SETTINGS.contains(&k.as_str()))
        .chain(options.iter());
    for (name, value) in from_client {
        if ignored.iter().any(|i| i.eq_ignore_ascii_case(name)) {
            continue;
        }
        s.set(name, value);
    }
    s
}

/// The statement that turns the server's settings into the client's, or None when they
/// already match (the common case, which must cost nothing but a comparison).
pub fn sync_statement(desired: &Settings, server: &ServerMeta) -> Option<String> {
    // Unreported settings are left out of the generations: with any, compare in full.
    let generations = (desired.generation(), server.settings.generation());
    let cacheable = server.unreported.is_empty();
    if cacheable && server.in_sync.get() == Some(generations) {
        return None;
    }
    let mut sets: Vec<(&str, &str)> = Vec::new();
    for (lower, name, value) in desired.entries() {
        if server.settings.get_lower(lower) != Some(value) {
            sets.push((name, value));
        }
    }
    let resets: Vec<&String> = server
        .unreported
        .iter()
        .filter(|n| desired.get_lower(n).is_none())
        .collect();
    if sets.is_empty() && resets.is_empty() {
        if cacheable {
            server.in_sync.set(Some(generations));
        }
        return None;
    }
    let mut sql = String::new();
    if !sets.is_empty() {
        sql.push_str("SELECT ");
        for (i, (name, value)) in sets.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str("pg_catalog.set_config(");
            push_literal(&mut sql, name);
            sql.push_str(", ");
            push_literal(&mut sql, value);
            sql.push_str(", false)");
        }
        sql.push(';');
    }
    for name in resets {
        sql.push_str("RESET ");
        push_ident(&mut sql, name);
        sql.push(';');
    }
    Some(sql)
}

/// After the sync statement ran: unreported settings pgsilo set are now known on the
/// server, reset ones are gone, and the client adopts the server's spelling of values it
/// set (PostgreSQL normalises `utc` to `UTC`), so the next comparison matches.
pub fn after_sync(desired: &mut Settings, server: &mut ServerMeta, welcome: &Settings) {
    let names: Vec<(String, String)> = desired.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    for (name, value) in names {
        let lower = name.to_ascii_lowercase();
        // Reported means this server announced it at login (the welcome): search_path is
        // in TRACKED_REPORTED, but PostgreSQL reports it only from version 18 on. Before,
        // it must be recorded as unreported, or it is never RESET for the next client.
        if welcome.contains(&lower) {
            if let Some(reported) = server.settings.get(&name) {
                if reported != value {
                    let reported = reported.to_string();
                    desired.set(&name, &reported);
                }
            }
        } else {
            server.settings.set(&name, &value);
            server.unreported.insert(lower);
        }
    }
    let stale: Vec<String> = server
        .unreported
        .iter()
        .filter(|n| !desired.contains(n))
        .cloned()
        .collect();
    for name in stale {
        server.unreported.remove(&name);
        server.settings.remove(&name);
    }
}

/// The query that reads back every setting a session changed at run time (SET, or
/// pgsilo's own set_config), as input text PostgreSQL accepts again.
pub const SNAPSHOT_QUERY: &str =
    "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings WHERE source = 'session'";

/// After the client ran SET or RESET under transaction pooling: the session's settings as
/// the server reports them become the client's. Settings PostgreSQL reports itself
/// (ParameterStatus) are already tracked; this catches the others (statement_timeout,
/// work_mem, search_path before PostgreSQL 18...), so they follow the client to its
/// next server and are reset before another client uses this one.
pub fn apply_snapshot(
    desired: &mut Settings,
    server: &mut ServerMeta,
    welcome: &Settings,
    initial: &Settings,
    captured: &[(String, String)],
) {
    for (name, value) in captured {
        let lower = name.to_ascii_lowercase();
        if welcome.contains(&lower) {
            continue;
        }
        server.settings.set(name, value);
        server.unreported.insert(lower);
        desired.set(name, value);
    }
    // Reported settings no longer set in the session were RESET (RESET x, RESET ALL,
    // DISCARD ALL, SET x TO DEFAULT): the server is back at its default, which PostgreSQL
    // reports only when the value changed. Directly, the client would be back at what it
    // connected with; the correction that follows gives the server that value again.
    for (lower, name, value) in initial.entries() {
        if welcome.contains(lower) && !captured.iter().any(|(c, _)| c.eq_ignore_ascii_case(name)) {
            desired.set(name, value);
        }
    }
    // The server forgets what RESET touched (its CommandComplete came first); the
    // client's own settings say which unreported ones it had that are no longer set.
    server
        .unreported
        .retain(|n| captured.iter().any(|(c, _)| c.eq_ignore_ascii_case(n)));
    let stale: Vec<String> = server
        .settings
        .entries()
        .filter(|(lower, _, _)| !welcome.contains(lower) && !server.unreported.contains(*lower))
        .map(|(lower, _, _)| lower.to_string())
        .collect();
    for lower in stale {
        server.settings.remove(&lower);
    }
    let gone: Vec<String> = desired
        .entries()
        .filter(|(lower, name, _)| {
            !welcome.contains(lower) && !captured.iter().any(|(c, _)| c.eq_ignore_ascii_case(name))
        })
        .map(|(lower, _, _)| lower.to_string())
        .collect();
    for lower in gone {
        // RESET: the server is back at its default; the client is back at what it
        // logged in with, which the correction (or its next server's sync) gives it.
        match initial.get(&lower) {
            Some(v) => {
                let v = v.to_string();
                desired.set(&lower, &v);
            }
            None => desired.remove(&lower),
        }
    }
}

/// An E'' literal: backslashes and quotes escaped, valid whatever
/// standard_conforming_strings says.
fn push_literal(sql: &mut String, s: &str) {
    sql.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => sql.push_str("''"),
            '\\' => sql.push_str("\\\\"),
            c => sql.push(c),
        }
    }
    sql.push('\'');
}

fn push_ident(sql: &mut String, s: &str) {
    sql.push('"');
    for c in s.chars() {
        if c == '"' {
            sql.push('"');
        }
        sql.push(c);
    }
    sql.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ServerMeta {
        ServerMeta::new(crate::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 1)
    }

    #[test]
    fn no_statement_when_settings_match() {
        let mut server = meta();
        server.settings.set("TimeZone", "UTC");
        let mut desired = Settings::default();
        desired.set("TimeZone", "UTC");
        assert_eq!(sync_statement(&desired, &server), None);
    }

    #[test]
    fn a_remembered_match_holds_only_while_neither_side_changes() {
        let mut server = meta();
        server.settings.set("TimeZone", "UTC");
        let mut desired = Settings::default();
        desired.set("TimeZone", "UTC");
        assert_eq!(sync_statement(&desired, &server), None);
        assert!(server.in_sync.get().is_some(), "the match is remembered");
        // Another client with the same settings (a clone): still nothing to do.
        assert_eq!(sync_statement(&desired.clone(), &server), None);
        // The client changed: compared again.
        desired.set("TimeZone", "Europe/Paris");
        assert!(sync_statement(&desired, &server).unwrap().contains("Europe/Paris"));
        // The server changed (a ParameterStatus): compared again.
        desired.set("TimeZone", "UTC");
        assert_eq!(sync_statement(&desired, &server), None);
        server.settings.set("TimeZone", "Asia/Tokyo");
        assert!(sync_statement(&desired, &server).unwrap().contains("'UTC'"));
        // Unreported settings on the server: always compared in full.
        server.settings.set("TimeZone", "UTC");
        server.settings.set("statement_timeout", "5s");
        server.unreported.insert("statement_timeout".into());
        server
            .in_sync
            .set(Some((desired.generation(), server.settings.generation())));
        assert!(sync_statement(&desired, &server).unwrap().contains("RESET"));
    }

    #[test]
    fn sets_differences_and_resets_leftovers() {
        let mut server = meta();
        server.settings.set("TimeZone", "UTC");
        server.settings.set("statement_timeout", "5s");
        server.unreported.insert("statement_timeout".into());
        let mut desired = Settings::default();
        desired.set("TimeZone", "Europe/Paris");
        desired.set("application_name", "it's");
        let sql = sync_statement(&desired, &server).unwrap();
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'application_name', E'it''s', false), \
             pg_catalog.set_config(E'TimeZone', E'Europe/Paris', false);RESET \"statement_timeout\";"
        );
    }

    #[test]
    fn after_sync_adopts_normalised_values_and_records_unreported() {
        let welcome = {
            let mut w = Settings::default();
            w.set("TimeZone", "UTC");
            w
        };
        let mut server = meta();
        server.settings.set("TimeZone", "UTC");
        let mut desired = Settings::default();
        desired.set("timezone", "utc");
        desired.set("extra_float_digits", "3");
        after_sync(&mut desired, &mut server, &welcome);
        assert_eq!(desired.get("TimeZone"), Some("UTC"));
        assert_eq!(server.settings.get("extra_float_digits"), Some("3"));
        assert!(server.unreported.contains("extra_float_digits"));
        assert_eq!(sync_statement(&desired, &server), None);
    }

    #[test]
    fn a_tracked_setting_the_server_does_not_report_is_unreported() {
        // PostgreSQL before 18 does not report search_path.
        let mut welcome = Settings::default();
        welcome.set("TimeZone", "UTC");
        let mut server = meta();
        server.settings.set("TimeZone", "UTC");
        let mut desired = Settings::default();
        desired.set("search_path", "s2, public");
        after_sync(&mut desired, &mut server, &welcome);
        assert!(server.unreported.contains("search_path"));
        assert_eq!(sync_statement(&desired, &server), None);
        // The next client, which did not ask for it, gets it reset.
        let other = Settings::default();
        assert_eq!(
            sync_statement(&other, &server).as_deref(),
            Some("RESET \"search_path\";")
        );
    }

    #[test]
    fn snapshot_makes_unreported_sets_the_clients_and_resets_the_rest() {
        let mut welcome = Settings::default();
        welcome.set("TimeZone", "UTC");
        let mut initial = Settings::default();
        initial.set("extra_float_digits", "3");
        let mut desired = initial.clone();
        let mut server = meta();
        server.settings.set("extra_float_digits", "3");
        server.unreported.insert("extra_float_digits".into());
        let captured = vec![
            ("statement_timeout".to_string(), "5s".to_string()),
            ("TimeZone".to_string(), "UTC".to_string()),
        ];
        apply_snapshot(&mut desired, &mut server, &welcome, &initial, &captured);
        assert_eq!(desired.get("statement_timeout"), Some("5s"));
        assert!(server.unreported.contains("statement_timeout"));
        // extra_float_digits was RESET: the server forgets it, the client keeps its
        // startup value for its next server.
        assert!(!server.unreported.contains("extra_float_digits"));
        assert_eq!(desired.get("extra_float_digits"), Some("3"));
        assert!(sync_statement(&desired, &server).is_some());
    }

    #[test]
    fn initial_settings_take_tracked_welcome_values_and_client_overrides() {
        let mut welcome = Settings::default();
        welcome.set("server_version", "15.1");
        welcome.set("TimeZone", "UTC");
        welcome.set("client_encoding", "UTF8");
        let startup = vec![
            ("user".to_string(), "u".to_string()),
            ("client_encoding".to_string(), "LATIN1".to_string()),
            ("extra_float_digits".to_string(), "3".to_string()),
        ];
        let options = vec![("search_path".to_string(), "a,b".to_string())];
        let s = initial_settings(&welcome, &startup, &options, &["extra_float_digits".to_string()]);
        assert_eq!(s.get("server_version"), None);
        assert_eq!(s.get("TimeZone"), Some("UTC"));
        assert_eq!(s.get("client_encoding"), Some("LATIN1"));
        assert_eq!(s.get("search_path"), Some("a,b"));
        assert_eq!(s.get("extra_float_digits"), None);
        assert_eq!(s.get("user"), None);
    }
}
