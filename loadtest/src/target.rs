//! Targets are plain libpq-style connection strings, so the same run can measure pgsilo,
//! PgBouncer or PostgreSQL itself.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::errors::ErrLabel;

/// A connection string, parsed.
#[derive(Clone, Debug)]
pub struct Target {
    pub config: Config,
}

impl Target {
    /// Parse `"host=127.0.0.1 port=6433 user=user_b password=pass_b dbname=tenant_b_db"`
    /// or a `postgresql://` URL. TLS is not used.
    pub fn parse(text: &str, application_name: &str) -> anyhow::Result<Target> {
        let mut config =
            Config::from_str(text).with_context(|| format!("invalid connection string {:?}", redact_text(text)))?;
        if config.get_hosts().is_empty() {
            config.host("127.0.0.1");
        }
        if config.get_application_name().is_none() {
            config.application_name(application_name);
        }
        Ok(Target { config })
    }

    /// The connection string without the password, for reports.
    pub fn display(&self) -> String {
        let c = &self.config;
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(s) => s.clone(),
                Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = c.get_ports().iter().map(u16::to_string).collect();
        let mut parts = vec![format!("host={}", hosts.join(","))];
        if !ports.is_empty() {
            parts.push(format!("port={}", ports.join(",")));
        }
        if let Some(u) = c.get_user() {
            parts.push(format!("user={u}"));
        }
        if let Some(d) = c.get_dbname() {
            parts.push(format!("dbname={d}"));
        }
        parts.join(" ")
    }

    /// Open a connection (TCP, startup, authentication) within `timeout`; its connection
    /// task runs on the current runtime.
    pub async fn connect(&self, timeout: Duration) -> Result<Client, ErrLabel> {
        match tokio::time::timeout(timeout, self.config.connect(NoTls)).await {
            Err(_) => Err(ErrLabel::timeout("connect")),
            Ok(Err(e)) => Err(ErrLabel::from_pg(&e)),
            Ok(Ok((client, connection))) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(client)
            }
        }
    }
}

/// Blank out `password=...` in a key=value string (best effort, for error messages).
fn redact_text(text: &str) -> String {
    text.split_whitespace()
        .map(|kv| {
            if kv.to_ascii_lowercase().starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_key_value_and_hides_the_password() {
        let t = Target::parse(
            "host=127.0.0.1 port=6433 user=user_b password=pass_b dbname=tenant_b_db",
            "x",
        )
        .unwrap();
        assert_eq!(t.display(), "host=127.0.0.1 port=6433 user=user_b dbname=tenant_b_db");
        assert_eq!(t.config.get_application_name(), Some("x"));
        let u = Target::parse("postgresql://user_a:pass_a@127.0.0.1:6432/tenant_a_db", "x").unwrap();
        assert_eq!(u.display(), "host=127.0.0.1 port=6432 user=user_a dbname=tenant_a_db");
        let err = Target::parse("host=x password=secret port=notaport", "x")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
