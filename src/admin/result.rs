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

    /// RowDescription for a bound portal: each column's format code as Bind asked.
    pub fn write_portal_description(&self, out: &mut Vec<u8>, formats: &[i16]) {
        backend::row_description_as(out, &self.columns, |i| format_of(formats, i));
    }

    /// DataRows with each column in the format Bind asked for (extended protocol:
    /// tokio-postgres, JDBC and others ask for binary).
    pub fn write_rows_as(&self, out: &mut Vec<u8>, formats: &[i16]) {
        let binary = (0..self.columns.len()).any(|i| format_of(formats, i) == 1);
        for r in &self.rows {
            if !binary {
                backend::data_row(out, r.iter().map(|v| v.as_deref()));
                continue;
            }
            backend::message(out, b'D', |b| {
                b.extend_from_slice(&(r.len() as u16).to_be_bytes());
                for (i, v) in r.iter().enumerate() {
                    let Some(v) = v else {
                        b.extend_from_slice(&(-1i32).to_be_bytes());
                        continue;
                    };
                    let ty = self.columns.get(i).map(|c| c.1).unwrap_or(ColumnType::Text);
                    let bytes: Vec<u8> = match (format_of(formats, i), ty) {
                        (1, ColumnType::Int8) => v.parse::<i64>().unwrap_or(0).to_be_bytes().to_vec(),
                        (1, ColumnType::Int4) => v.parse::<i32>().unwrap_or(0).to_be_bytes().to_vec(),
                        // Text is the same in both formats; the console has no other types.
                        _ => v.as_bytes().to_vec(),
                    };
                    b.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                    b.extend_from_slice(&bytes);
                }
            });
        }
        backend::command_complete(out, "SHOW");
    }
}

/// The format code of column `i` from Bind's result format codes: none means text for
/// all, one applies to all, else one per column.
fn format_of(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => 0,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(0),
    }
}

/// The result format codes of a Bind message body (empty if it is malformed).
pub fn bind_result_formats(body: &[u8]) -> Vec<i16> {
    fn parse(body: &[u8]) -> Option<Vec<i16>> {
        let i16_at = |at: usize| body.get(at..at + 2).map(|b| i16::from_be_bytes([b[0], b[1]]));
        let (_, at) = crate::protocol::framing::read_cstr(body, 0)?;
        let (_, mut at) = crate::protocol::framing::read_cstr(body, at)?;
        let n = i16_at(at)?.max(0) as usize;
        at += 2 + 2 * n;
        let params = i16_at(at)?.max(0) as usize;
        at += 2;
        for _ in 0..params {
            let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
            at += 4 + len.max(0) as usize;
        }
        let n = i16_at(at)?.max(0) as usize;
        at += 2;
        (0..n).map(|k| i16_at(at + 2 * k)).collect()
    }
    parse(body).unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(formats: &[i16]) -> Vec<u8> {
        let mut b = b"portal\0stmt\0".to_vec();
        b.extend_from_slice(&1i16.to_be_bytes()); // one parameter format
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes()); // one parameter, 3 bytes
        b.extend_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
        for f in formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
        b
    }

    #[test]
    fn bind_result_formats_are_read_past_the_parameters() {
        assert_eq!(bind_result_formats(&bind(&[])), Vec::<i16>::new());
        assert_eq!(bind_result_formats(&bind(&[1])), vec![1]);
        assert_eq!(bind_result_formats(&bind(&[0, 1])), vec![0, 1]);
        assert_eq!(bind_result_formats(b"trunc"), Vec::<i16>::new());
    }

    #[test]
    fn binary_rows_encode_integers_and_keep_text() {
        let mut rs = ResultSet::new(&[("name", ColumnType::Text), ("n", ColumnType::Int8)]);
        rs.row(vec![t("x"), n(258)]);
        rs.row(vec![None, n(-1)]);
        let mut out = Vec::new();
        rs.write_rows_as(&mut out, &[1]);
        // D, length, 2 columns, "x" (1 byte), 258 as 8 bytes.
        let first = &out[..out[1..5].iter().fold(0usize, |a, b| a * 256 + *b as usize) + 1];
        assert_eq!(&first[5..7], &2u16.to_be_bytes());
        assert_eq!(&first[7..11], &1i32.to_be_bytes());
        assert_eq!(first[11], b'x');
        assert_eq!(&first[12..16], &8i32.to_be_bytes());
        assert_eq!(&first[16..24], &258i64.to_be_bytes());
        let mut text = Vec::new();
        rs.write_rows_as(&mut text, &[]);
        assert!(text.windows(3).any(|w| w == b"258"));
    }
}
