//! SQLSTATE codes pgsilo raises and the fields of ErrorResponse/NoticeResponse bodies.

use super::framing::read_cstr;

/// A SQLSTATE: five characters of 0-9 and A-Z, carried as they are. pgsilo's own codes
/// are constants; a server's code reaches the client unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(pub [u8; 5]);

impl SqlState {
    pub const PROTOCOL_VIOLATION: SqlState = SqlState(*b"08P01");
    pub const CONNECTION_FAILURE: SqlState = SqlState(*b"08006");
    pub const CONNECTION_EXCEPTION: SqlState = SqlState(*b"08000");
    /// sqlclient_unable_to_establish_sqlconnection: TLS with the server could not be set up.
    pub const UNABLE_TO_CONNECT: SqlState = SqlState(*b"08001");
    pub const INVALID_CATALOG_NAME: SqlState = SqlState(*b"3D000");
    pub const INVALID_PASSWORD: SqlState = SqlState(*b"28P01");
    pub const INVALID_AUTHORIZATION: SqlState = SqlState(*b"28000");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState(*b"53300");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState(*b"0A000");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState(*b"57P01");
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState(*b"57P03");
    pub const QUERY_CANCELED: SqlState = SqlState(*b"57014");
    pub const INTERNAL_ERROR: SqlState = SqlState(*b"XX000");
    pub const SYNTAX_ERROR: SqlState = SqlState(*b"42601");
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState(*b"42501");
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState(*b"22023");
    pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState(*b"42P05");
    pub const UNDEFINED_PREPARED_STATEMENT: SqlState = SqlState(*b"26000");
    pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState(*b"57P05");
    pub const IDLE_IN_TRANSACTION_TIMEOUT: SqlState = SqlState(*b"25P03");

    /// A code as text (from a server's ErrorResponse): None unless it is a SQLSTATE.
    pub fn parse(code: &str) -> Option<SqlState> {
        let bytes: [u8; 5] = code.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            .then_some(SqlState(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Only digits and capitals: parse() and the constants see to it.
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }
}

impl std::fmt::Debug for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqlState({})", self.as_str())
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fields of an ErrorResponse or NoticeResponse a pooler cares about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
}

impl ErrorFields {
    /// Parses the body (after the header). Unknown field types are skipped as the
    /// protocol requires; a truncated body yields what was readable.
    pub fn parse(body: &[u8]) -> ErrorFields {
        let mut f = ErrorFields::default();
        let mut at = 0;
        while let Some(&kind) = body.get(at) {
            if kind == 0 {
                break;
            }
            let Some((value, next)) = read_cstr(body, at + 1) else {
                break;
            };
            let value = String::from_utf8_lossy(value).into_owned();
            match kind {
                b'V' => f.severity = value,
                b'S' if f.severity.is_empty() => f.severity = value,
                b'C' => f.code = value,
                b'M' => f.message = value,
                b'D' => f.detail = Some(value),
                _ => {}
            }
            at = next;
        }
        f
    }

    /// Only the SQLSTATE, without allocating: for counting errors on the hot path.
    pub fn code_of(body: &[u8]) -> Option<[u8; 5]> {
        let mut at = 0;
        while let Some(&kind) = body.get(at) {
            if kind == 0 {
                return None;
            }
            let (value, next) = read_cstr(body, at + 1)?;
            if kind == b'C' {
                return value.try_into().ok();
            }
            at = next;
        }
        None
    }
}

impl std::fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (SQLSTATE {})", self.severity, self.message, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_five_digits_or_capitals_and_pass_as_they_are() {
        assert_eq!(SqlState::parse("42501"), Some(SqlState(*b"42501")));
        assert_eq!(
            SqlState::parse("P0001").map(|c| c.to_string()),
            Some("P0001".to_string())
        );
        for bad in ["4250", "425011", "42a01", "42 01", "", "4250\u{e9}"] {
            assert_eq!(SqlState::parse(bad), None, "{bad:?}");
        }
        assert_eq!(SqlState::PROTOCOL_VIOLATION.as_str(), "08P01");
    }
    use crate::protocol::backend::{error_response, Severity};

    #[test]
    fn parses_what_backend_writes() {
        let mut out = Vec::new();
        error_response(&mut out, Severity::Error, SqlState::QUERY_CANCELED, "canceled");
        let f = ErrorFields::parse(&out[5..]);
        assert_eq!(f.severity, "ERROR");
        assert_eq!(f.code, "57014");
        assert_eq!(f.message, "canceled");
        assert_eq!(ErrorFields::code_of(&out[5..]), Some(*b"57014"));
    }

    #[test]
    fn truncated_bodies_do_not_panic() {
        assert_eq!(ErrorFields::parse(b"SERR").severity, "");
        assert_eq!(ErrorFields::code_of(b"C12"), None);
        assert_eq!(ErrorFields::code_of(b""), None);
    }
}
