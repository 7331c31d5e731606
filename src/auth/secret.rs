//! The secrets an auth_file may hold for a user, in PgBouncer's userlist.txt forms.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use thiserror::Error;

use super::scram_common::MAX_ITERATIONS;

/// A user's secret as written in the auth_file.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// The password itself.
    Plain(String),
    /// `md5` followed by 32 lowercase hex digits: md5(password || username).
    Md5(String),
    /// A SCRAM-SHA-256 verifier as stored in pg_authid.
    Scram(ScramSecret),
}

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, salt and keys in base64.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("malformed SCRAM-SHA-256 secret: {0}")]
    MalformedScram(&'static str),
}

impl Secret {
    /// Classifies a secret the way PgBouncer does: `md5` + 32 hex digits is an md5 hash,
    /// `SCRAM-SHA-256$` starts a SCRAM verifier, anything else is a plain-text password.
    pub fn parse(text: &str) -> Result<Secret, SecretError> {
        if let Some(rest) = text.strip_prefix("SCRAM-SHA-256$") {
            return ScramSecret::parse_body(rest).map(Secret::Scram);
        }
        if text.len() == 35 && text.starts_with("md5") && text[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Secret::Md5(text.to_ascii_lowercase()));
        }
        Ok(Secret::Plain(text.to_string()))
    }

    /// The form name used in messages, never the secret itself.
    pub fn kind(&self) -> &'static str {
        match self {
            Secret::Plain(_) => "plain",
            Secret::Md5(_) => "md5",
            Secret::Scram(_) => "SCRAM-SHA-256",
        }
    }
}

impl ScramSecret {
    fn parse_body(body: &str) -> Result<ScramSecret, SecretError> {
        let (params, keys) = body.split_once('$').ok_or(SecretError::MalformedScram(
            "expected <iterations>:<salt>$<storedkey>:<serverkey>",
        ))?;
        let (iter, salt) = params
            .split_once(':')
            .ok_or(SecretError::MalformedScram("expected <iterations>:<salt>"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(SecretError::MalformedScram("expected <storedkey>:<serverkey>"))?;
        let iterations: u32 = iter
            .parse()
            .map_err(|_| SecretError::MalformedScram("iteration count is not a number"))?;
        if iterations == 0 {
            return Err(SecretError::MalformedScram("iteration count is zero"));
        }
        // A cleartext login against this verifier runs that many PBKDF2 rounds on a
        // worker, which then serves no one else: the same cap as a server's SCRAM gets.
        if iterations > MAX_ITERATIONS {
            return Err(SecretError::MalformedScram("iteration count above 1000000"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| SecretError::MalformedScram("salt is not base64"))?;
        let stored_key = decode_key(stored)?;
        let server_key = decode_key(server)?;
        Ok(ScramSecret {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// The pg_authid text form.
    pub fn to_text(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

fn decode_key(text: &str) -> Result<[u8; 32], SecretError> {
    let bytes = B64
        .decode(text)
        .map_err(|_| SecretError::MalformedScram("key is not base64"))?;
    bytes
        .try_into()
        .map_err(|_| SecretError::MalformedScram("key is not 32 bytes"))
}

// Secrets never reach logs through Debug.
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({})", self.kind())
    }
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScramSecret(iterations={})", self.iterations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_three_forms() {
        assert!(matches!(Secret::parse("pencil"), Ok(Secret::Plain(p)) if p == "pencil"));
        let md5 = "md5ABCDEF0123456789abcdef0123456789";
        assert!(matches!(Secret::parse(md5), Ok(Secret::Md5(h)) if h == md5.to_ascii_lowercase()));
        // Too short to be an md5 hash: a password that happens to start with md5.
        assert!(matches!(Secret::parse("md5short"), Ok(Secret::Plain(_))));
        let scram = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
        match Secret::parse(scram) {
            Ok(Secret::Scram(s)) => {
                assert_eq!(s.iterations, 4096);
                assert_eq!(s.to_text(), scram);
            }
            other => panic!("not parsed as SCRAM: {other:?}"),
        }
    }

    #[test]
    fn rejects_broken_scram() {
        assert!(Secret::parse("SCRAM-SHA-256$4096:salt").is_err());
        assert!(Secret::parse("SCRAM-SHA-256$x:c2FsdA==$a:b").is_err());
        assert!(Secret::parse("SCRAM-SHA-256$4096:c2FsdA==$c2hvcnQ=:c2hvcnQ=").is_err());
    }

    /// Found by fuzzing (fuzz/targets/password.rs): a verifier of 4 billion iterations
    /// made one cleartext login hold a worker for minutes.
    #[test]
    fn refuses_iteration_counts_a_login_could_not_afford() {
        let keys = "dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q=:dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q=";
        let with = |n: &str| Secret::parse(&format!("SCRAM-SHA-256${n}:c2FsdA==${keys}"));
        assert!(matches!(with("1000000"), Ok(Secret::Scram(s)) if s.iterations == MAX_ITERATIONS));
        assert_eq!(
            with("4045678996").err(),
            Some(SecretError::MalformedScram("iteration count above 1000000"))
        );
        assert!(with("1000001").is_err());
    }
}
