//! Building SCRAM-SHA-256 verifiers: from a password, and the mock verifier that stands in
//! for unknown users so their exchange looks like a real one.

use rand::RngCore;

use super::scram_common::{derive_keys, hmac, sha256, DEFAULT_ITERATIONS, SALT_LEN};
use super::secret::{ScramSecret, Secret};

/// The verifier PostgreSQL would store for `password` with this salt and iteration count.
pub fn scram_secret_from_password(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
    scram_secret_from_password_bytes(password.as_bytes(), salt, iterations)
}

/// As `scram_secret_from_password`, for password bytes that may not be UTF-8.
pub(crate) fn scram_secret_from_password_bytes(password: &[u8], salt: &[u8], iterations: u32) -> ScramSecret {
    let keys = derive_keys(password, salt, iterations);
    ScramSecret {
        iterations,
        salt: salt.to_vec(),
        stored_key: sha256(&keys.client_key),
        server_key: keys.server_key,
    }
}

/// A verifier with a random 16-byte salt and PostgreSQL's default 4096 iterations.
pub fn new_scram_secret(password: &str) -> ScramSecret {
    let mut salt = [0u8; SALT_LEN];
    rand::thread_rng().fill_bytes(&mut salt);
    scram_secret_from_password(password, &salt, DEFAULT_ITERATIONS)
}

/// The salt shown for `user` when no real one can be: keyed by the process's secret
/// `mock_key` so it cannot be predicted, and stable per user (like PostgreSQL's
/// scram_mock_salt) so that repeated attempts do not reveal that the user is unknown.
pub fn mock_salt(mock_key: &[u8; 32], user: &str) -> Vec<u8> {
    let mut salt = hmac(mock_key, &[b"pgsilo mock salt\0", user.as_bytes()]).to_vec();
    salt.truncate(SALT_LEN);
    salt
}

/// A verifier for a user who cannot authenticate with SCRAM. Its keys are derived from
/// `mock_key` (no password exists for them), and the server refuses it regardless of the
/// proof, so the keys only have to look like keys.
pub(crate) fn mock_verifier(mock_key: &[u8; 32], user: &str) -> ScramSecret {
    ScramSecret {
        iterations: DEFAULT_ITERATIONS,
        salt: mock_salt(mock_key, user),
        stored_key: hmac(mock_key, &[b"pgsilo mock stored key\0", user.as_bytes()]),
        server_key: hmac(mock_key, &[b"pgsilo mock server key\0", user.as_bytes()]),
    }
}

/// The verifier a `ScramServer` should check a client against for an auth_file entry:
/// a SCRAM secret as is; a plain-text password turned into a verifier with the user's
/// stable mock salt (so a plain-password user and an unknown user look alike on the wire),
/// at 4096 iterations; None for an md5 secret (which cannot do SCRAM) or an unknown user,
/// which `ScramServer::new` turns into the mock verifier.
///
/// For a plain password this runs the 4096-iteration key derivation; callers that want to
/// avoid that per login may cache the result per (user, password).
pub fn scram_verifier_for(secret: Option<&Secret>, user: &str, mock_key: &[u8; 32]) -> Option<ScramSecret> {
    match secret? {
        Secret::Scram(verifier) => Some(verifier.clone()),
        Secret::Plain(password) => Some(scram_secret_from_password(
            password,
            &mock_salt(mock_key, user),
            DEFAULT_ITERATIONS,
        )),
        Secret::Md5(_) => None,
    }
}

impl ScramSecret {
    /// `scram_secret_from_password` as a constructor.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
        scram_secret_from_password(password, salt, iterations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7677_verifier() {
        // The pg_authid form of the RFC 7677 example (password "pencil").
        let expected = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
        let Ok(Secret::Scram(parsed)) = Secret::parse(expected) else {
            panic!("test verifier does not parse")
        };
        let built = scram_secret_from_password("pencil", &parsed.salt, 4096);
        assert_eq!(built.to_text(), expected);
        assert_eq!(ScramSecret::from_password("pencil", &parsed.salt, 4096), built);
    }

    #[test]
    fn new_secret_has_fresh_salt() {
        let (a, b) = (new_scram_secret("pw"), new_scram_secret("pw"));
        assert_eq!(a.iterations, 4096);
        assert_eq!(a.salt.len(), 16);
        assert_ne!(a.salt, b.salt);
        assert_ne!(a.stored_key, b.stored_key);
    }

    #[test]
    fn mock_salt_is_stable_per_user_and_key() {
        let key = [7u8; 32];
        assert_eq!(mock_salt(&key, "alice"), mock_salt(&key, "alice"));
        assert_ne!(mock_salt(&key, "alice"), mock_salt(&key, "bob"));
        assert_ne!(mock_salt(&key, "alice"), mock_salt(&[8u8; 32], "alice"));
        assert_eq!(mock_salt(&key, "alice").len(), 16);
    }

    #[test]
    fn verifier_for_each_secret_kind() {
        let key = [1u8; 32];
        let scram = new_scram_secret("x");
        assert_eq!(
            scram_verifier_for(Some(&Secret::Scram(scram.clone())), "u", &key),
            Some(scram)
        );
        let plain = scram_verifier_for(Some(&Secret::Plain("pw".into())), "u", &key);
        assert_eq!(
            plain,
            Some(scram_secret_from_password("pw", &mock_salt(&key, "u"), 4096))
        );
        let md5 = Secret::Md5("md5".to_string() + &"0".repeat(32));
        assert_eq!(scram_verifier_for(Some(&md5), "u", &key), None);
        assert_eq!(scram_verifier_for(None, "u", &key), None);
    }
}
