//! Passwords as pgsilo reads them: a secret as written in an auth_file or returned by
//! auth_query (`Secret::parse`: plain, md5…, SCRAM-SHA-256$…), and a client's
//! PasswordMessage checked against it (cleartext and md5). Input: the secret text, NUL,
//! the PasswordMessage body.

use pgsilo::auth::{verify_cleartext, verify_md5_response, Secret};
use pgsilo_fuzz::split_nul;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let parts = split_nul(data, 2);
        let Ok(text) = std::str::from_utf8(parts[0]) else {
            return;
        };
        let secret = Secret::parse(text).ok();
        if let Some(Secret::Scram(v)) = &secret {
            let again = Secret::parse(&v.to_text()).expect("a verifier's own text parses");
            assert_eq!(again, Secret::Scram(v.clone()));
        }
        // As proxy/login.rs: the body without its terminating NUL.
        let response = parts[1];
        // A verifier's rounds are its own cost, up to MAX_ITERATIONS (about a second here):
        // past a few thousand they only slow the search down.
        if !matches!(&secret, Some(Secret::Scram(v)) if v.iterations > 10_000) {
            let _ = verify_cleartext(secret.as_ref(), "alice", response);
        }
        let _ = verify_md5_response(secret.as_ref(), "alice", *b"salt", response);
    });
}
