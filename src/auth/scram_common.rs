//! SCRAM-SHA-256 building blocks shared by both sides: H, HMAC, Hi, password
//! normalisation, nonces, the attribute parser for RFC 5802 messages and the channel
//! binding names.

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::error::AuthError;

pub const MECHANISM: &str = "SCRAM-SHA-256";

/// SCRAM-SHA-256 with channel binding (RFC 5802 section 6), offered on TLS connections.
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// The one channel binding type PostgreSQL implements (RFC 5929 section 4): a hash of the
/// server's certificate, see `crate::tls::der::server_end_point_hash`.
pub const CHANNEL_BINDING_TYPE: &str = "tls-server-end-point";

/// PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// The most iterations the pooler accepts from a server. PostgreSQL's default is 4096;
/// the cap bounds the CPU a malicious or misconfigured server can make us burn.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// PostgreSQL's SCRAM_DEFAULT_SALT_LEN.
pub const SALT_LEN: usize = 16;

/// Random bytes per nonce, as PostgreSQL and libpq use (SCRAM_RAW_NONCE_LEN).
pub const NONCE_RAW_LEN: usize = 18;

pub const KEY_LEN: usize = 32;
pub type Key = [u8; KEY_LEN];

type HmacSha256 = Hmac<Sha256>;

/// SHA-256's block size: the HMAC key length after RFC 2104's padding.
const BLOCK_LEN: usize = 64;

/// H(data).
pub fn sha256(data: &[u8]) -> Key {
    Sha256::digest(data).into()
}

/// An HMAC-SHA-256 keyed with `key`, built through the infallible `KeyInit::new` so no
/// Result needs unwrapping: per RFC 2104 a key longer than the block is first hashed, and
/// a shorter one is zero-padded to the block, which is exactly what the padded array is.
fn hmac_keyed(key: &[u8]) -> HmacSha256 {
    let hashed;
    let key = if key.len() > BLOCK_LEN {
        hashed = sha256(key);
        &hashed[..]
    } else {
        key
    };
    let mut block = hmac::digest::generic_array::GenericArray::<u8, _>::default();
    for (b, k) in block.iter_mut().zip(key) {
        *b = *k;
    }
    <HmacSha256 as KeyInit>::new(&block)
}

/// HMAC(key, part1 || part2 || ...).
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> Key {
    let mut mac = hmac_keyed(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Hi(password, salt, i) of RFC 5802: PBKDF2-HMAC-SHA-256 with one output block.
/// An iteration count of 0 is treated as 1 (callers reject 0 before getting here).
pub fn hi(password: &[u8], salt: &[u8], iterations: u32) -> Key {
    // Keying is the costly part of a short HMAC; key once and clone the keyed state.
    let keyed = hmac_keyed(password);
    let mut mac = keyed.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: Key = mac.finalize().into_bytes().into();
    let mut result = u;
    for _ in 1..iterations {
        let mut mac = keyed.clone();
        mac.update(&u);
        u = mac.finalize().into_bytes().into();
        xor_into(&mut result, &u);
    }
    result
}

pub fn xor_into(acc: &mut Key, other: &Key) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// The keys a password yields for one salt and iteration count.
pub struct DerivedKeys {
    pub client_key: Key,
    pub server_key: Key,
}

/// SaltedPassword = Hi(Normalize(password), salt, i);
/// ClientKey = HMAC(SaltedPassword, "Client Key"); ServerKey = HMAC(SaltedPassword, "Server Key").
pub fn derive_keys(password: &[u8], salt: &[u8], iterations: u32) -> DerivedKeys {
    let salted = hi(&normalize_password(password), salt, iterations);
    DerivedKeys {
        client_key: hmac(&salted, &[b"Client Key"]),
        server_key: hmac(&salted, &[b"Server Key"]),
    }
}

/// Normalize(password) as PostgreSQL applies it: SASLprep (RFC 4013), falling back to the
/// raw bytes when the password is not UTF-8 or SASLprep rejects it, so derived keys are
/// identical to the ones in pg_authid.
pub fn normalize_password(password: &[u8]) -> Cow<'_, [u8]> {
    // PostgreSQL applies SASLprep and falls back to the raw bytes when the password is not
    // valid UTF-8 or SASLprep rejects it; doing the same keeps keys identical to pg_authid's.
    match std::str::from_utf8(password).ok().map(stringprep::saslprep) {
        Some(Ok(Cow::Owned(prepped))) => Cow::Owned(prepped.into_bytes()),
        _ => Cow::Borrowed(password),
    }
}

/// A fresh nonce: NONCE_RAW_LEN random bytes in base64, so printable and comma-free.
pub fn random_nonce() -> String {
    let mut raw = [0u8; NONCE_RAW_LEN];
    rand::thread_rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

pub fn b64_encode(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

pub fn b64_decode(text: &[u8], what: &'static str) -> Result<Vec<u8>, AuthError> {
    B64.decode(text).map_err(|_| AuthError::Malformed(what))
}

/// Decodes a base64 value that must hold exactly one key (proof, signature).
pub fn b64_decode_key(text: &[u8], what: &'static str) -> Result<Key, AuthError> {
    b64_decode(text, what)?
        .try_into()
        .map_err(|_| AuthError::Malformed(what))
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
pub fn is_printable(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Reads a message as comma-separated `attr=value` parts, front to back.
pub struct Attrs<'a> {
    rest: Option<&'a [u8]>,
}

impl<'a> Attrs<'a> {
    pub fn new(msg: &'a [u8]) -> Attrs<'a> {
        Attrs { rest: Some(msg) }
    }

    /// The next comma-separated part, or None once the message is used up.
    pub fn next_part(&mut self) -> Option<&'a [u8]> {
        let rest = self.rest?;
        match rest.iter().position(|&b| b == b',') {
            Some(i) => {
                let (part, tail) = rest.split_at(i);
                self.rest = tail.get(1..);
                Some(part)
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }

    /// The unread remainder of the message (empty when used up).
    pub fn remaining(&self) -> &'a [u8] {
        self.rest.unwrap_or_default()
    }

    /// The value of the next part, which must be `name=value`; `missing` explains the
    /// error otherwise.
    pub fn require(&mut self, name: u8, missing: &'static str) -> Result<&'a [u8], AuthError> {
        self.next_part()
            .and_then(|part| attr_value(part, name))
            .ok_or(AuthError::Malformed(missing))
    }

    /// Checks that every remaining part is an extension `attr=value` (ignored, as
    /// PostgreSQL ignores them).
    pub fn extensions(&mut self) -> Result<(), AuthError> {
        while let Some(part) = self.next_part() {
            match part {
                [name, b'=', ..] if name.is_ascii_alphabetic() => {}
                _ => return Err(AuthError::Malformed("trailing data is not an attribute")),
            }
        }
        Ok(())
    }
}

/// `value` if `part` is `name=value`.
pub fn attr_value(part: &[u8], name: u8) -> Option<&[u8]> {
    match part {
        [n, b'=', value @ ..] if *n == name => Some(value),
        _ => None,
    }
}

/// Parses an iteration count and enforces 1..=MAX_ITERATIONS.
pub fn parse_iterations(text: &[u8]) -> Result<u32, AuthError> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return Err(AuthError::Malformed("iteration count is not a number"));
    }
    // Digits only, so the only parse failure left is overflow: saturate for the message.
    let value = std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    match u32::try_from(value) {
        Ok(n) if (1..=MAX_ITERATIONS).contains(&n) => Ok(n),
        _ => Err(AuthError::IterationsOutOfRange(value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_new_from_slice_for_any_key_length() {
        for len in [0usize, 1, 32, 63, 64, 65, 200] {
            let key = vec![0x5au8; len];
            let mut reference = <HmacSha256 as Mac>::new_from_slice(&key).unwrap();
            reference.update(b"message");
            let reference: Key = reference.finalize().into_bytes().into();
            assert_eq!(hmac(&key, &[b"mess", b"age"]), reference, "key length {len}");
        }
    }

    #[test]
    fn hi_matches_pbkdf2_known_answer() {
        // RFC 7914 section 11: PBKDF2-HMAC-SHA256 (P="passwd", S="salt", c=1), first block.
        let expected = [
            0x55, 0xac, 0x04, 0x6e, 0x56, 0xe3, 0x08, 0x9f, 0xec, 0x16, 0x91, 0xc2, 0x25, 0x44, 0xb6, 0x05, 0xf9, 0x41,
            0x85, 0x21, 0x6d, 0xde, 0x04, 0x65, 0xe6, 0x8b, 0x9d, 0x57, 0xc2, 0x0d, 0xac, 0xbc,
        ];
        assert_eq!(hi(b"passwd", b"salt", 1), expected);
    }

    #[test]
    fn attrs_split_and_check() {
        let mut a = Attrs::new(b"r=abc,s=,i=1,x=ext");
        assert_eq!(a.require(b'r', "r").unwrap(), b"abc");
        assert_eq!(a.require(b's', "s").unwrap(), b"");
        assert_eq!(a.require(b'i', "i").unwrap(), b"1");
        assert!(a.extensions().is_ok());
        assert!(a.require(b'r', "gone").is_err());

        let mut a = Attrs::new(b"r=abc,");
        a.require(b'r', "r").unwrap();
        assert_eq!(a.remaining(), b"");
        assert!(a.extensions().is_err(), "an empty trailing part is not an attribute");
    }

    #[test]
    fn iterations_range() {
        assert_eq!(parse_iterations(b"4096"), Ok(4096));
        assert_eq!(parse_iterations(b"0"), Err(AuthError::IterationsOutOfRange(0)));
        assert_eq!(
            parse_iterations(b"1000001"),
            Err(AuthError::IterationsOutOfRange(1_000_001))
        );
        assert_eq!(
            parse_iterations(b"99999999999999999999999"),
            Err(AuthError::IterationsOutOfRange(u64::MAX))
        );
        assert!(matches!(parse_iterations(b"+5"), Err(AuthError::Malformed(_))));
        assert!(matches!(parse_iterations(b""), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn nonces_are_printable_and_distinct() {
        let (a, b) = (random_nonce(), random_nonce());
        assert!(is_printable(a.as_bytes()));
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
    }
}
