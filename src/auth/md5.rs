//! PostgreSQL's md5 password method: the md5 secret is md5(password || user), and the
//! wire response is md5(hex(secret) || 4-byte salt), both as `md5` + 32 lowercase hex.

use ::md5::{Digest, Md5};
use subtle::ConstantTimeEq;

use super::secret::Secret;

/// `"md5"` + hex(md5(password || user)): the form PostgreSQL stores and an auth_file holds.
pub fn md5_secret(user: &str, password: &str) -> String {
    md5_secret_bytes(user.as_bytes(), password.as_bytes())
}

/// As `md5_secret`, for password bytes that may not be UTF-8.
pub(crate) fn md5_secret_bytes(user: &[u8], password: &[u8]) -> String {
    md5_hex(&[password, user])
}

/// `"md5"` + hex(md5(hex_part_of_secret || salt)): what a client sends in PasswordMessage,
/// and what the pooler sends to an md5 server when it holds only the md5 secret.
/// `md5_secret` is `md5` + 32 hex digits; without the prefix it is used whole.
pub fn md5_salted_response(md5_secret: &str, salt: [u8; 4]) -> String {
    let hex = md5_secret.strip_prefix("md5").unwrap_or(md5_secret);
    md5_hex(&[hex.as_bytes(), &salt])
}

/// Checks a client's md5 PasswordMessage `response` (without its trailing NUL).
///
/// A plain secret is hashed to its md5 secret first. A SCRAM secret (from which no md5
/// secret can be derived) or an unknown user (None) is checked against a dummy secret
/// with the same hashing work, then refused, so that timing does not tell them apart
/// from a wrong password. Callers should prefer SCRAM for users with a SCRAM secret.
pub fn verify_md5_response(secret: Option<&Secret>, user: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let (md5_secret, known) = match secret {
        Some(Secret::Plain(password)) => (md5_secret(user, password), true),
        Some(Secret::Md5(hash)) => (hash.clone(), true),
        // Two md5 rounds, as for a plain secret.
        Some(Secret::Scram(_)) | None => (md5_secret(user, ""), false),
    };
    let expected = md5_salted_response(&md5_secret, salt);
    let matches = expected.as_bytes().ct_eq(response);
    bool::from(matches & subtle::Choice::from(u8::from(known)))
}

/// `"md5"` + lowercase hex of md5 over the concatenated parts.
fn md5_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    for byte in digest {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram_verifier::new_scram_secret;

    const SALT: [u8; 4] = [1, 2, 3, 4];

    #[test]
    fn known_answers() {
        assert_eq!(
            md5_secret("postgres", "postgres"),
            "md53175bce1d3201d16594cebf9d7eb3f9d"
        );
        assert_eq!(md5_secret("user", "pencil"), "md520c46e3762c864548e296b33c3406aa9");
        assert_eq!(
            md5_salted_response("md53175bce1d3201d16594cebf9d7eb3f9d", SALT),
            "md568be9ed08db75f318087ab337aaea044"
        );
    }

    #[test]
    fn verifies_plain_and_md5_secrets() {
        let response = md5_salted_response(&md5_secret("postgres", "postgres"), SALT);
        let plain = Secret::Plain("postgres".into());
        let md5 = Secret::Md5(md5_secret("postgres", "postgres"));
        for secret in [&plain, &md5] {
            assert!(verify_md5_response(Some(secret), "postgres", SALT, response.as_bytes()));
            // Wrong salt, truncated, empty, trailing NUL: all refused.
            assert!(!verify_md5_response(
                Some(secret),
                "postgres",
                [0; 4],
                response.as_bytes()
            ));
            assert!(!verify_md5_response(
                Some(secret),
                "postgres",
                SALT,
                &response.as_bytes()[..34]
            ));
            assert!(!verify_md5_response(Some(secret), "postgres", SALT, b""));
            let with_nul = [response.as_bytes(), b"\0"].concat();
            assert!(!verify_md5_response(Some(secret), "postgres", SALT, &with_nul));
        }
    }

    #[test]
    fn plain_secret_is_bound_to_the_user() {
        let response = md5_salted_response(&md5_secret("postgres", "postgres"), SALT);
        let plain = Secret::Plain("postgres".into());
        assert!(!verify_md5_response(Some(&plain), "other", SALT, response.as_bytes()));
    }

    #[test]
    fn scram_secret_and_unknown_user_are_refused() {
        // Even the response the dummy secret would accept.
        let dummy = md5_salted_response(&md5_secret("postgres", ""), SALT);
        let scram = Secret::Scram(new_scram_secret(""));
        assert!(!verify_md5_response(Some(&scram), "postgres", SALT, dummy.as_bytes()));
        assert!(!verify_md5_response(None, "postgres", SALT, dummy.as_bytes()));
    }
}
