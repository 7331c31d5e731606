//! The server's side of a SCRAM-SHA-256 exchange as pgsilo's own login to PostgreSQL
//! reads it: the AuthenticationSASL mechanism list, server-first-message and
//! server-final-message. Input: those three, NUL-separated (the list's own NULs need
//! none: it is the input up to its empty name). Passthrough keys keep a run free of
//! PBKDF2, whose cost is the server's to choose.

use pgsilo::auth::{ScramClient, ScramClientKeys};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&flags, data)) = data.split_first() else {
            return;
        };
        let keys = ScramClientKeys::Passthrough {
            client_key: [3; 32],
            server_key: [4; 32],
            salt: b"salt-of-sixteen!".to_vec(),
            iterations: 4096,
        };
        let binding = (flags & 1 != 0).then(|| vec![7u8; 32]);
        let mut client = ScramClient::with_nonce(keys, "CLIENTNONCE".to_string()).with_channel_binding(binding);
        // The mechanism list ends at an empty name, i.e. two NULs in a row.
        let end = data.windows(2).position(|w| w == [0, 0]).map_or(data.len(), |i| i + 2);
        let (mechanisms, rest) = data.split_at(end);
        if client.choose_mechanism(mechanisms).is_err() {
            return;
        }
        let _ = client.client_first();
        let (first, fin) = match rest.iter().position(|&b| b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        if client.handle_server_first(first).is_ok() {
            let _ = client.verify_server_final(fin);
        }
    });
}
