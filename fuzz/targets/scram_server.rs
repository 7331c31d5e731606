//! The client's side of a SCRAM-SHA-256 exchange as pgsilo's server reads it: the
//! SASLInitialResponse body (mechanism, length, client-first-message) and the
//! client-final-message. Input: the SASLInitialResponse body, NUL (after the mechanism's
//! own), then the client-final-message. The server nonce is fixed so the fuzzer can echo
//! it back; one flags bit offers channel binding (SCRAM-SHA-256-PLUS).

use std::sync::OnceLock;

use pgsilo::auth::{scram_secret_from_password, ScramSecret, ScramServer};
use pgsilo::protocol::framing::read_cstr;

/// Derived once: 4096 PBKDF2 rounds per input would be most of the run.
fn verifier() -> ScramSecret {
    static V: OnceLock<ScramSecret> = OnceLock::new();
    V.get_or_init(|| scram_secret_from_password("secret", b"salt-of-sixteen!", 4096))
        .clone()
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&flags, data)) = data.split_first() else {
            return;
        };
        let verifier = (flags & 1 != 0).then(verifier);
        let binding = (flags & 2 != 0).then(|| vec![7u8; 32]);
        let mut server = ScramServer::with_nonce(verifier, "alice", &[1; 32], "SERVERNONCE".to_string())
            .with_channel_binding(binding);
        // As proxy/login.rs reads a SASLInitialResponse: mechanism, then a 4-byte length.
        let Some((mechanism, at)) = read_cstr(data, 0) else {
            return;
        };
        let rest = data.get(at + 4..).unwrap_or_default();
        let (first, fin) = match rest.iter().position(|&b| b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        if server.handle_initial(mechanism, first).is_ok() {
            let _ = server.handle_client_final(fin);
        }
    });
}
