//! Checking a clear-text password (auth_type=plain) against any auth_file secret form.

use subtle::ConstantTimeEq;

use super::md5::md5_secret_bytes;
use super::scram_common::{derive_keys, sha256, DEFAULT_ITERATIONS};
use super::secret::Secret;

/// Salt for the dummy derivation done for unknown users; its value is irrelevant.
const DUMMY_SALT: &[u8; 16] = b"pgsilo-dummy-slt";

/// Checks `password` (the PasswordMessage payload without its trailing NUL) for `user`.
///
/// Plain: constant-time equality (of SHA-256 digests, so the length does not leak either).
/// md5: compare md5_secret(user, password). SCRAM: derive the keys with the verifier's
/// salt and iteration count and compare StoredKey and ServerKey. Unknown user (None):
/// false after a SCRAM derivation at PostgreSQL's default 4096 iterations, the costliest
/// common case, so an unknown user is never answered faster than a SCRAM user.
///
/// A password containing a NUL byte is refused outright: PostgreSQL passwords are C
/// strings, and HMAC's zero-padding of short keys would otherwise make `pw\0` derive the
/// same SCRAM keys as `pw`.
pub fn verify_cleartext(secret: Option<&Secret>, user: &str, password: &[u8]) -> bool {
    if password.contains(&0) {
        return false;
    }
    match secret {
        Some(Secret::Plain(expected)) => bool::from(sha256(expected.as_bytes()).ct_eq(&sha256(password))),
        Some(Secret::Md5(expected)) => {
            let candidate = md5_secret_bytes(user.as_bytes(), password);
            bool::from(candidate.as_bytes().ct_eq(expected.as_bytes()))
        }
        Some(Secret::Scram(verifier)) => {
            let keys = derive_keys(password, &verifier.salt, verifier.iterations);
            let stored_ok = sha256(&keys.client_key).ct_eq(&verifier.stored_key);
            let server_ok = keys.server_key.ct_eq(&verifier.server_key);
            bool::from(stored_ok & server_ok)
        }
        None => {
            let keys = derive_keys(password, DUMMY_SALT, DEFAULT_ITERATIONS);
            // Compare as the SCRAM arm does, then refuse regardless.
            let _ = sha256(&keys.client_key).ct_eq(&keys.server_key);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::md5::md5_secret;
    use crate::auth::scram_verifier::{new_scram_secret, scram_secret_from_password};

    #[test]
    fn all_three_secret_kinds() {
        let secrets = [
            Secret::Plain("pencil".into()),
            Secret::Md5(md5_secret("user", "pencil")),
            Secret::Scram(new_scram_secret("pencil")),
        ];
        for secret in &secrets {
            assert!(verify_cleartext(Some(secret), "user", b"pencil"), "{secret:?}");
            assert!(!verify_cleartext(Some(secret), "user", b"pencil!"), "{secret:?}");
            assert!(!verify_cleartext(Some(secret), "user", b"pencil\0"), "{secret:?}");
            assert!(!verify_cleartext(Some(secret), "user", b""), "{secret:?}");
            assert!(!verify_cleartext(Some(secret), "user", b"\xff\xfe"), "{secret:?}");
        }
        // md5 secrets are bound to the user name.
        assert!(!verify_cleartext(Some(&secrets[1]), "other", b"pencil"));
    }

    #[test]
    fn scram_checks_both_keys() {
        let good = scram_secret_from_password("pencil", b"salt", 4096);
        let mut bad_server_key = good.clone();
        bad_server_key.server_key[0] ^= 1;
        assert!(verify_cleartext(Some(&Secret::Scram(good)), "u", b"pencil"));
        assert!(!verify_cleartext(Some(&Secret::Scram(bad_server_key)), "u", b"pencil"));
    }

    #[test]
    fn unknown_user_is_refused() {
        assert!(!verify_cleartext(None, "user", b"pencil"));
        assert!(!verify_cleartext(None, "user", b""));
    }
}
