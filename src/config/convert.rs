//! `pgsilo convert FILE.ini`: a PgBouncer config written out as the pgsilo TOML that
//! loads to the same configuration.
//!
//! The ini reader already made the tables pgsilo's TOML has, with PgBouncer's meaning
//! spelled out where pgsilo's defaults differ (`listen_addr = []`, absolute file names,
//! a host for databases without one); this writes those tables, with the instance name
//! the ini's file name gave it, and lists as comments what was not carried over.

use std::fmt::Write as _;
use std::path::Path;

use super::load::{toml_key, Loaded};
use super::value::{Entries, Value};

/// The TOML, and what the user should hear about the conversion.
#[derive(Debug)]
pub struct Converted {
    pub toml: String,
    /// PgBouncer settings pgsilo does not implement (left out of the TOML).
    pub warnings: Vec<String>,
    /// How the ini reads where pgsilo's defaults differ, settings that change nothing.
    pub notes: Vec<String>,
}

/// Converts the PgBouncer config at `path`. Problems (and, with `strict`, unsupported
/// settings) are errors, as when starting from the ini. The files the config names are
/// not opened.
pub fn convert(path: &Path, strict: bool) -> Result<Converted, Vec<String>> {
    let loaded = Loaded::read_unchecked(path).map_err(|e| e.messages())?;
    let Some(tables) = &loaded.ini_tables else {
        return Err(vec![format!(
            "{}: this is pgsilo's TOML already; convert reads PgBouncer ini files",
            path.display()
        )]);
    };
    let mut messages: Vec<String> = loaded.problems.iter().map(ToString::to_string).collect();
    let mut warnings = Vec::new();
    let mut notes = Vec::new();
    for notice in &loaded.notices {
        match (notice.unsupported, strict) {
            (true, true) => messages.push(format!("{notice} (refused with --strict)")),
            (true, false) => warnings.push(notice.to_string()),
            (false, _) => notes.push(notice.to_string()),
        }
    }
    if !messages.is_empty() {
        return Err(messages);
    }
    let source = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let toml = render(tables, &loaded.config.general.name, &source, &warnings, &notes);
    Ok(Converted { toml, warnings, notes })
}

fn render(tables: &Entries, name: &str, source: &Path, warnings: &[String], notes: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Converted by `pgsilo convert` from {}.", source.display());
    out.push_str("# It loads to the same configuration as the ini. File names are absolute: PgBouncer\n");
    out.push_str("# takes relative ones from the directory it is started in.\n");
    if !warnings.is_empty() {
        out.push_str("#\n# Not carried over (PgBouncer settings pgsilo does not implement):\n");
        for w in warnings {
            let _ = writeln!(out, "# - {}", one_line(w));
        }
    }
    if !notes.is_empty() {
        out.push_str("#\n# Notes:\n");
        for n in notes {
            let _ = writeln!(out, "# - {}", one_line(n));
        }
    }
    for (table, node) in tables {
        let Value::Table(entries) = node.get_ref() else {
            continue;
        };
        match table.as_str() {
            "pgsilo" => {
                out.push_str("\n[pgsilo]\n");
                if !entries.iter().any(|(k, _)| k == "name") {
                    let _ = writeln!(out, "name = {}", toml_string(name));
                }
                write_entries(&mut out, entries);
            }
            _ => {
                if entries.is_empty() {
                    let _ = writeln!(out, "\n[{table}]");
                }
                for (key, sub) in entries {
                    let _ = writeln!(out, "\n[{table}.{}]", toml_key(key));
                    if let Value::Table(sub) = sub.get_ref() {
                        write_entries(&mut out, sub);
                    }
                }
            }
        }
    }
    out
}

fn write_entries(out: &mut String, entries: &Entries) {
    for (key, value) in entries {
        let _ = writeln!(out, "{} = {}", toml_key(key), toml_value(value.get_ref()));
    }
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

fn toml_value(value: &Value) -> String {
    match value {
        Value::String(s) => toml_string(s),
        Value::Integer(n) => n.to_string(),
        // Debug keeps a decimal point or an exponent, so TOML reads a float back.
        Value::Float(x) => format!("{x:?}"),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(d) => d.clone(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(|i| toml_value(i.get_ref())).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Table(entries) => {
            let items: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{} = {}", toml_key(k), toml_value(v.get_ref())))
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Writes the files, converts `main`, writes the TOML beside it, and loads both.
    fn round_trip(files: &[(&str, &str)]) -> (Converted, Config, Config) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let ini = dir.path().join(files[0].0);
        let converted = convert(&ini, false).unwrap_or_else(|m| panic!("{m:#?}"));
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let toml = out.join("converted.toml");
        std::fs::write(&toml, &converted.toml).unwrap();
        let from_ini = Config::load(&ini).unwrap_or_else(|e| panic!("{e}"));
        let from_toml = Config::load(&toml).unwrap_or_else(|e| panic!("{e}\n{}", converted.toml));
        (converted, from_ini, from_toml)
    }

    fn same_but_path(mut a: Config, b: Config) {
        a.path = b.path.clone();
        assert_eq!(a, b);
    }

    #[test]
    fn the_converted_toml_loads_to_the_same_config() {
        let (converted, from_ini, from_toml) = round_trip(&[(
            "pgbouncer_tenant_a.ini",
            "[pgbouncer]\nlisten_port = 6432\nauth_file = /dev/null\nmax_client_conn = 100\n\
                 unix_socket_mode = 0750\nquery_wait_timeout = 2.5\nadmin_users = admin_a, ops\n\
                 logfile = /var/log/pgbouncer/a.log\nserver_reset_query = DISCARD ALL\n\
                 [databases]\ntenant_a_db = host=127.0.0.1 port=5432 password='p''w' user=svc\n\
                 sock = dbname=x\n* = host=db pool_mode=transaction\n\
                 [users]\nbob = pool_mode=session\n",
        )]);
        same_but_path(from_ini, from_toml.clone());
        let toml = &converted.toml;
        assert!(toml.contains("name = \"pgbouncer_tenant_a\""), "{toml}");
        assert!(toml.contains("listen_addr = []"), "{toml}");
        assert!(toml.contains("query_wait_timeout = 2.5"), "{toml}");
        assert!(toml.contains("unix_socket_mode = \"0750\""), "{toml}");
        assert!(toml.contains("[databases.\"*\"]"), "{toml}");
        assert!(toml.contains("[users.bob]"), "{toml}");
        assert!(toml.contains("# - ") && toml.contains("logfile"), "{toml}");
        assert!(!toml.lines().any(|l| l.starts_with("logfile")), "{toml}");
        assert_eq!(converted.warnings.len(), 1, "{:#?}", converted.warnings);
        assert_eq!(from_toml.general.name, "pgbouncer_tenant_a");
        assert!(from_toml.general.listen_addr.is_empty());
        assert_eq!(from_toml.databases["sock"].host, "/tmp");
    }

    #[test]
    fn strict_conversion_refuses_unsupported_settings() {
        let dir = tempfile::tempdir().unwrap();
        let ini = dir.path().join("a.ini");
        std::fs::write(
            &ini,
            "[pgbouncer]\nauth_file = u\npidfile = /run/a.pid\n[databases]\na = host=h\n",
        )
        .unwrap();
        let errors = convert(&ini, true).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].contains("line 3: pidfile = /run/a.pid in [pgbouncer]: not supported"),
            "{}",
            errors[0]
        );
        assert!(convert(&ini, false).is_ok());

        let toml = dir.path().join("a.toml");
        std::fs::write(&toml, "[pgsilo]\n").unwrap();
        assert!(convert(&toml, false).unwrap_err()[0].contains("pgsilo's TOML already"));
    }

    #[test]
    fn strings_are_escaped_for_toml() {
        assert_eq!(toml_string("a\"b\\c\u{1}"), "\"a\\\"b\\\\c\\u0001\"");
        assert_eq!(toml_value(&Value::Float(1e300)), "1e300");
        assert_eq!(toml_value(&Value::Float(10.0)), "10.0");
    }
}
