//! Messages pgsilo sends to clients itself, appended to an output buffer. Forwarded messages
//! never pass through here: they travel as the bytes the server sent.

use super::error_fields::SqlState;

/// Appends a message with type `tag`, letting `body` write the payload, then patches in
/// the length so callers never count bytes by hand.
pub fn message(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    out.push(tag);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An ErrorResponse pgsilo raises itself; counted with the servers' errors by SQLSTATE.
pub fn error_response(out: &mut Vec<u8>, severity: Severity, code: SqlState, text: &str) {
    crate::metrics::ERRORS.count(code.0);
    message(out, b'E', |b| {
        b.push(b'S');
        cstr(b, severity.as_str());
        b.push(b'V');
        cstr(b, severity.as_str());
        b.push(b'C');
        cstr(b, code.as_str());
        b.push(b'M');
        cstr(b, text);
        b.push(0);
    });
}

pub fn notice_response(out: &mut Vec<u8>, text: &str) {
    message(out, b'N', |b| {
        b.push(b'S');
        cstr(b, "NOTICE");
        b.push(b'V');
        cstr(b, "NOTICE");
        b.push(b'C');
        cstr(b, "00000");
        b.push(b'M');
        cstr(b, text);
        b.push(0);
    });
}

fn auth(out: &mut Vec<u8>, code: u32, rest: &[u8]) {
    message(out, b'R', |b| {
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(rest);
    });
}

pub fn auth_ok(out: &mut Vec<u8>) {
    auth(out, 0, &[]);
}

pub fn auth_cleartext(out: &mut Vec<u8>) {
    auth(out, 3, &[]);
}

pub fn auth_md5(out: &mut Vec<u8>, salt: [u8; 4]) {
    auth(out, 5, &salt);
}

pub fn auth_sasl(out: &mut Vec<u8>, mechanisms: &[&str]) {
    message(out, b'R', |b| {
        b.extend_from_slice(&10u32.to_be_bytes());
        for m in mechanisms {
            cstr(b, m);
        }
        b.push(0);
    });
}

pub fn auth_sasl_continue(out: &mut Vec<u8>, data: &[u8]) {
    auth(out, 11, data);
}

pub fn auth_sasl_final(out: &mut Vec<u8>, data: &[u8]) {
    auth(out, 12, data);
}

pub fn parameter_status(out: &mut Vec<u8>, name: &str, value: &str) {
    message(out, b'S', |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

pub fn backend_key_data(out: &mut Vec<u8>, pid: u32, secret: u32) {
    message(out, b'K', |b| {
        b.extend_from_slice(&pid.to_be_bytes());
        b.extend_from_slice(&secret.to_be_bytes());
    });
}

pub fn ready_for_query(out: &mut Vec<u8>, status: u8) {
    message(out, b'Z', |b| b.push(status));
}

/// Tells a client asking for a newer minor version or for protocol options that we speak
/// 3.0 and none of the options, so it can carry on instead of failing.
pub fn negotiate_protocol_version(out: &mut Vec<u8>, minor: u16, unsupported: &[String]) {
    message(out, b'v', |b| {
        b.extend_from_slice(&(minor as u32).to_be_bytes());
        b.extend_from_slice(&(unsupported.len() as u32).to_be_bytes());
        for o in unsupported {
            cstr(b, o);
        }
    });
}

/// A text-format RowDescription, for result sets pgsilo produces (the admin console).
pub fn row_description(out: &mut Vec<u8>, columns: &[(&str, ColumnType)]) {
    row_description_as(out, columns, |_| 0);
}

/// RowDescription with each column's format code (0 text, 1 binary) from `format`.
pub fn row_description_as(out: &mut Vec<u8>, columns: &[(&str, ColumnType)], format: impl Fn(usize) -> i16) {
    message(out, b'T', |b| {
        b.extend_from_slice(&(columns.len() as u16).to_be_bytes());
        for (i, (name, ty)) in columns.iter().enumerate() {
            cstr(b, name);
            b.extend_from_slice(&0u32.to_be_bytes()); // table oid
            b.extend_from_slice(&0u16.to_be_bytes()); // column number
            b.extend_from_slice(&ty.oid().to_be_bytes());
            b.extend_from_slice(&ty.size().to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes()); // type modifier
            b.extend_from_slice(&format(i).to_be_bytes());
        }
    });
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnType {
    Text,
    Int8,
    Int4,
    Numeric,
    Timestamptz,
}

impl ColumnType {
    fn oid(self) -> u32 {
        match self {
            ColumnType::Text => 25,
            ColumnType::Int8 => 20,
            ColumnType::Int4 => 23,
            ColumnType::Numeric => 1700,
            ColumnType::Timestamptz => 1184,
        }
    }

    fn size(self) -> i16 {
        match self {
            ColumnType::Text | ColumnType::Numeric => -1,
            ColumnType::Int8 | ColumnType::Timestamptz => 8,
            ColumnType::Int4 => 4,
        }
    }
}

/// A DataRow of text values; `None` is SQL NULL.
pub fn data_row<'a>(out: &mut Vec<u8>, values: impl IntoIterator<Item = Option<&'a str>>) {
    message(out, b'D', |b| {
        let count_at = b.len();
        b.extend_from_slice(&0u16.to_be_bytes());
        let mut n: u16 = 0;
        for v in values {
            n += 1;
            match v {
                Some(s) => {
                    b.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b[count_at..count_at + 2].copy_from_slice(&n.to_be_bytes());
    });
}

pub fn command_complete(out: &mut Vec<u8>, tag: &str) {
    message(out, b'C', |b| cstr(b, tag));
}

pub fn empty_query_response(out: &mut Vec<u8>) {
    message(out, b'I', |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::framing::{scan, Scan};

    #[test]
    fn lengths_are_patched_in() {
        let mut out = Vec::new();
        error_response(
            &mut out,
            Severity::Fatal,
            SqlState::INVALID_CATALOG_NAME,
            "no such database: x",
        );
        ready_for_query(&mut out, b'I');
        match scan(&out) {
            Scan::Whole(h) => {
                assert_eq!(h.tag, b'E');
                assert_eq!(&out[h.total()..], &[b'Z', 0, 0, 0, 5, b'I']);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_row_counts_columns_and_nulls() {
        let mut out = Vec::new();
        data_row(&mut out, [Some("a"), None]);
        assert_eq!(&out[5..7], &2u16.to_be_bytes());
        assert_eq!(&out[7..11], &1i32.to_be_bytes());
        assert_eq!(&out[12..16], &(-1i32).to_be_bytes());
    }
}
