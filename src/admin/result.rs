//! Result sets the console produces, and their encoding as PostgreSQL messages.

use crate::protocol::backend::{self, ColumnType};

pub struct ResultSet {
    pub columns: Vec<(&'static str, ColumnType)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl ResultSet {
    pub fn new(columns: &[(&'static str, ColumnType)]) -> ResultSet {
        ResultSet {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, values: Vec<Option<String>>) {
        self.rows.push(values);
    }

    pub fn write_description(&self, out: &mut Vec<u8>) {
        backend::row_description(out, &self.columns);
    }

    pub fn write_rows(&self, out: &mut Vec<u8>) {
        for r in &self.rows {
            backend::data_row(out, r.iter().map(|v| v.as_deref()));
        }
        backend::command_complete(out, "SHOW");
    }
}

/// What a console command produced.
pub enum Outcome {
    Rows(ResultSet),
    /// A command without rows: its CommandComplete tag.
    Done(&'static str),
    /// Informational lines (SHOW HELP), sent as NOTICEs, then the tag.
    Notice(Vec<String>, &'static str),
}

/// Shorthands for building rows.
pub fn t(s: impl Into<String>) -> Option<String> {
    Some(s.into())
}

pub fn n(v: impl std::fmt::Display) -> Option<String> {
    Some(v.to_string())
}
