//! Errors counted by SQLSTATE (or by kind when the server sent none).

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// What went wrong with one query or connection attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrLabel {
    /// The SQLSTATE ("53300"), or "timeout", "closed", "io", "client".
    pub code: String,
    /// The first line of the message.
    pub message: String,
}

impl ErrLabel {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> ErrLabel {
        let message: String = message.into();
        let first = message.lines().next().unwrap_or("").to_string();
        ErrLabel {
            code: code.into(),
            message: first,
        }
    }

    pub fn timeout(what: &str) -> ErrLabel {
        ErrLabel::new("timeout", format!("{what} timed out"))
    }

    /// Classify a tokio-postgres error.
    pub fn from_pg(e: &tokio_postgres::Error) -> ErrLabel {
        if let Some(db) = e.as_db_error() {
            return ErrLabel::new(db.code().code(), db.message());
        }
        if e.is_closed() {
            return ErrLabel::new("closed", "connection closed");
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                return ErrLabel::new("io", format!("{:?}: {io}", io.kind()));
            }
            source = s.source();
        }
        ErrLabel::new("client", e.to_string())
    }
}

impl fmt::Display for ErrLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.message)
    }
}

/// A short name for the codes a pooler test meets most (else the code itself).
pub fn code_name(code: &str) -> &str {
    match code {
        "53300" => "too_many_connections",
        "53400" => "configuration_limit_exceeded",
        "57014" => "query_canceled",
        "57P01" => "admin_shutdown",
        "08P01" => "protocol_violation",
        "08006" => "connection_failure",
        "08004" => "connection_rejected",
        "25P03" => "idle_in_transaction_timeout",
        "28P01" => "invalid_password",
        "28000" => "invalid_authorization",
        "3D000" => "invalid_catalog_name",
        other => other,
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ErrorEntry {
    pub count: u64,
    /// The message of the first error seen with this code.
    pub message: String,
}

/// Error counts by code.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ErrorCounts {
    pub by_code: BTreeMap<String, ErrorEntry>,
}

impl ErrorCounts {
    pub fn add(&mut self, label: &ErrLabel) {
        let entry = self.by_code.entry(label.code.clone()).or_insert_with(|| ErrorEntry {
            count: 0,
            message: label.message.clone(),
        });
        entry.count += 1;
    }

    pub fn merge(&mut self, other: &ErrorCounts) {
        for (code, e) in &other.by_code {
            let entry = self.by_code.entry(code.clone()).or_insert_with(|| ErrorEntry {
                count: 0,
                message: e.message.clone(),
            });
            entry.count += e.count;
        }
    }

    pub fn total(&self) -> u64 {
        self.by_code.values().map(|e| e.count).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    /// "53300 ×412 (no more connections allowed (max_client_conn)); timeout ×3 (...)".
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "none".into();
        }
        self.by_code
            .iter()
            .map(|(code, e)| format!("{code} x{} ({})", e.count, e.message))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_code_and_keeps_first_message() {
        let mut c = ErrorCounts::default();
        c.add(&ErrLabel::new("53300", "no more connections allowed (max_client_conn)"));
        c.add(&ErrLabel::new("53300", "something else"));
        c.add(&ErrLabel::timeout("query"));
        assert_eq!(c.total(), 3);
        assert_eq!(c.by_code["53300"].count, 2);
        assert_eq!(
            c.by_code["53300"].message,
            "no more connections allowed (max_client_conn)"
        );
        let mut d = ErrorCounts::default();
        d.merge(&c);
        d.merge(&c);
        assert_eq!(d.total(), 6);
        assert!(d.summary().contains("53300 x4"));
        assert_eq!(ErrorCounts::default().summary(), "none");
    }
}
