//! The server side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, RFC 7677, RFC 5929):
//! verifying a client's password proof against a stored verifier and, on TLS connections,
//! that the client saw the pooler's own certificate (channel binding type
//! tls-server-end-point), as PostgreSQL's auth-scram.c does.
//!
//! Client messages are hostile input: every malformation is an `AuthError`, and after any
//! error the exchange is over (a client cannot retry a proof on the same state).

use std::fmt;

use subtle::ConstantTimeEq;

use super::error::AuthError;
use super::scram_common::{
    attr_value, b64_decode, b64_decode_key, b64_encode, hmac, is_printable, random_nonce, sha256, xor_into, Attrs, Key,
    CHANNEL_BINDING_TYPE, MECHANISM, MECHANISM_PLUS,
};
use super::scram_verifier::mock_verifier;
use super::secret::ScramSecret;

/// What a successful exchange yields.
pub struct ScramSuccess {
    /// The server-final-message (`v=<ServerSignature>`), to send in AuthenticationSASLFinal.
    pub server_final: Vec<u8>,
    /// The client's ClientKey, recovered from its proof; with the verifier's ServerKey it
    /// lets the pooler log in to PostgreSQL as this user (SCRAM passthrough).
    pub client_key: [u8; 32],
}

impl fmt::Debug for ScramSuccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramSuccess { .. }")
    }
}

pub struct ScramServer {
    verifier: ScramSecret,
    /// Set when `verifier` is the mock: the exchange runs normally and fails at the proof.
    doomed: bool,
    server_nonce: String,
    /// The connection's tls-server-end-point data; set exactly when SCRAM-SHA-256-PLUS
    /// is offered.
    channel_binding: Option<Vec<u8>>,
    state: State,
}

/// The mechanism lists `mechanisms` returns, PLUS first as PostgreSQL lists them.
const WITHOUT_PLUS: &[&str] = &[MECHANISM];
const WITH_PLUS: &[&str] = &[MECHANISM_PLUS, MECHANISM];

enum State {
    AwaitingClientFirst,
    AwaitingClientFinal {
        /// What the client-final `c=` must decode to: the gs2 header exactly as the client
        /// sent it, followed by the channel binding data with SCRAM-SHA-256-PLUS.
        expected_cbind: Vec<u8>,
        /// Client nonce followed by server nonce.
        nonce: Vec<u8>,
        client_first_bare: Vec<u8>,
        server_first: Vec<u8>,
    },
    Finished,
}

impl ScramServer {
    /// `verifier`: the user's SCRAM verifier, or None for an unknown user or a secret that
    /// cannot do SCRAM (md5), in which case a mock verifier derived deterministically from
    /// (`mock_key`, `user`) is used — the same salt every time for the same user, like
    /// PostgreSQL's scram_mock_salt — so the exchange looks identical and fails at the proof.
    /// `mock_key` should be a per-process random secret.
    pub fn new(verifier: Option<ScramSecret>, user: &str, mock_key: &[u8; 32]) -> ScramServer {
        Self::with_nonce(verifier, user, mock_key, random_nonce())
    }

    /// As `new` with a chosen server nonce (printable ASCII without ','). For tests and
    /// known-answer vectors only: a predictable nonce defeats replay protection.
    pub fn with_nonce(
        verifier: Option<ScramSecret>,
        user: &str,
        mock_key: &[u8; 32],
        server_nonce: String,
    ) -> ScramServer {
        let (verifier, doomed) = match verifier {
            Some(v) => (v, false),
            None => (mock_verifier(mock_key, user), true),
        };
        ScramServer {
            verifier,
            doomed,
            server_nonce,
            channel_binding: None,
            state: State::AwaitingClientFirst,
        }
    }

    /// Offers SCRAM-SHA-256-PLUS with this channel binding data: on a TLS connection, the
    /// tls-server-end-point hash of the certificate the pooler presented
    /// (`crate::tls::der::server_end_point_hash`). None (no TLS, or a certificate without
    /// a usable hash) offers SCRAM-SHA-256 only; empty data counts as None.
    pub fn with_channel_binding(mut self, data: Option<Vec<u8>>) -> ScramServer {
        self.channel_binding = data.filter(|d| !d.is_empty());
        self
    }

    /// The mechanisms to list in AuthenticationSASL.
    pub fn mechanisms(&self) -> &'static [&'static str] {
        if self.channel_binding.is_some() {
            WITH_PLUS
        } else {
            WITHOUT_PLUS
        }
    }

    /// The SASLInitialResponse: the mechanism the client selected and its
    /// client-first-message → server-first-message. A mechanism not offered by
    /// `mechanisms` is `AuthError::InvalidMechanism`.
    pub fn handle_initial(&mut self, mechanism: &[u8], msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        // Any error below leaves the exchange finished.
        if !matches!(
            std::mem::replace(&mut self.state, State::Finished),
            State::AwaitingClientFirst
        ) {
            return Err(AuthError::OutOfOrder("client-first-message after the exchange started"));
        }

        let binding = if mechanism == MECHANISM.as_bytes() {
            None
        } else if mechanism == MECHANISM_PLUS.as_bytes() {
            Some(self.channel_binding.as_deref().ok_or(AuthError::InvalidMechanism)?)
        } else {
            return Err(AuthError::InvalidMechanism);
        };

        let (gs2_header, bare) = split_gs2_header(msg, binding.is_some(), self.channel_binding.is_some())?;
        let client_nonce = parse_client_first_bare(bare)?;
        let mut expected_cbind = gs2_header.to_vec();
        expected_cbind.extend_from_slice(binding.unwrap_or_default());

        let mut nonce = client_nonce.to_vec();
        nonce.extend_from_slice(self.server_nonce.as_bytes());
        let mut server_first = b"r=".to_vec();
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(b",s=");
        server_first.extend_from_slice(b64_encode(&self.verifier.salt).as_bytes());
        server_first.extend_from_slice(format!(",i={}", self.verifier.iterations).as_bytes());

        self.state = State::AwaitingClientFinal {
            expected_cbind,
            nonce,
            client_first_bare: bare.to_vec(),
            server_first: server_first.clone(),
        };
        Ok(server_first)
    }

    /// `handle_initial` with SCRAM-SHA-256, for callers that check the mechanism themselves.
    pub fn handle_client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        self.handle_initial(MECHANISM.as_bytes(), msg)
    }

    /// client-final-message (the SASLResponse data) → server-final-message and the
    /// recovered ClientKey. A wrong proof, an unknown user or an md5-only user all give
    /// `AuthError::PasswordMismatch`.
    pub fn handle_client_final(&mut self, msg: &[u8]) -> Result<ScramSuccess, AuthError> {
        let State::AwaitingClientFinal {
            expected_cbind,
            nonce,
            client_first_bare,
            server_first,
        } = std::mem::replace(&mut self.state, State::Finished)
        else {
            return Err(AuthError::OutOfOrder(
                "client-final-message without a preceding client-first-message",
            ));
        };

        // The proof is the last attribute; everything before its comma is
        // client-final-message-without-proof, which the AuthMessage covers.
        let comma = msg
            .iter()
            .rposition(|&b| b == b',')
            .ok_or(AuthError::Malformed("client-final-message has no proof"))?;
        let (without_proof, proof_part) = msg.split_at(comma);
        let proof = proof_part
            .get(1..)
            .and_then(|p| attr_value(p, b'p'))
            .ok_or(AuthError::Malformed("client-final-message does not end with proof p="))?;
        let proof = b64_decode_key(proof, "proof p= is not 32 bytes of base64")?;

        let mut attrs = Attrs::new(without_proof);
        let cbind = attrs.require(b'c', "client-final-message does not start with c=")?;
        let cbind = b64_decode(cbind, "channel binding c= is not base64")?;
        let final_nonce = attrs.require(b'r', "client-final-message lacks nonce r=")?;
        attrs.extensions()?;

        if !bool::from(cbind.as_slice().ct_eq(&expected_cbind)) {
            return Err(AuthError::ChannelBindingMismatch);
        }
        if !bool::from(final_nonce.ct_eq(&nonce)) {
            return Err(AuthError::NonceMismatch(
                "client-final nonce is not the client nonce plus the server nonce",
            ));
        }

        let auth_message: [&[u8]; 5] = [&client_first_bare, b",", &server_first, b",", without_proof];
        let client_signature = hmac(&self.verifier.stored_key, &auth_message);
        let mut client_key: Key = proof;
        xor_into(&mut client_key, &client_signature);
        // Constant time, and the mock verifier fails only after the same work.
        let proof_ok =
            sha256(&client_key).ct_eq(&self.verifier.stored_key) & subtle::Choice::from(u8::from(!self.doomed));
        if !bool::from(proof_ok) {
            return Err(AuthError::PasswordMismatch);
        }

        let server_signature = hmac(&self.verifier.server_key, &auth_message);
        let mut server_final = b"v=".to_vec();
        server_final.extend_from_slice(b64_encode(&server_signature).as_bytes());
        Ok(ScramSuccess {
            server_final,
            client_key,
        })
    }
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::AwaitingClientFirst => "awaiting client-first",
            State::AwaitingClientFinal { .. } => "awaiting client-final",
            State::Finished => "finished",
        };
        write!(f, "ScramServer({state})")
    }
}

/// Splits `gs2-header client-first-message-bare`, applying PostgreSQL's rules to the
/// channel binding flag. With SCRAM-SHA-256-PLUS (`plus`) only `p=tls-server-end-point`
/// is valid. With SCRAM-SHA-256, `n` (no channel binding) is; `y` (the client supports it
/// but thinks the server does not) is valid only when the server did not offer PLUS
/// (`offered_plus`), since otherwise an attacker may have removed PLUS from the list;
/// `p=` is not.
fn split_gs2_header(msg: &[u8], plus: bool, offered_plus: bool) -> Result<(&[u8], &[u8]), AuthError> {
    let mut attrs = Attrs::new(msg);
    match attrs.next_part() {
        Some(b"n") | Some(b"y") if plus => {
            return Err(AuthError::Malformed(
                "client selected SCRAM-SHA-256-PLUS, but its gs2 header does not require channel binding (p=)",
            ))
        }
        Some(b"n") => {}
        Some(b"y") if offered_plus => return Err(AuthError::ChannelBindingDowngrade),
        Some(b"y") => {}
        Some([b'p', b'=', cb_name @ ..]) => {
            if !plus {
                return Err(AuthError::UnsupportedChannelBinding(
                    "client selected SCRAM-SHA-256 without channel binding, but requires channel binding (p=)",
                ));
            }
            if cb_name != CHANNEL_BINDING_TYPE.as_bytes() {
                return Err(AuthError::UnsupportedChannelBinding(
                    "channel binding type is not tls-server-end-point",
                ));
            }
        }
        _ => {
            return Err(AuthError::Malformed(
                "client-first-message does not start with a gs2 channel binding flag",
            ))
        }
    }
    match attrs.next_part() {
        Some(b"") => {}
        Some([b'a', b'=', ..]) => {
            return Err(AuthError::Unsupported("authorization identity (a=)"));
        }
        _ => return Err(AuthError::Malformed("gs2 header is not followed by ','")),
    }
    let bare = attrs.remaining();
    let header = msg
        .get(..msg.len().saturating_sub(bare.len()))
        .ok_or(AuthError::Malformed("client-first-message is truncated"))?;
    Ok((header, bare))
}

/// Validates client-first-message-bare and returns the client nonce. The username is
/// ignored, as PostgreSQL ignores it: the user comes from the startup packet.
fn parse_client_first_bare(bare: &[u8]) -> Result<&[u8], AuthError> {
    let mut attrs = Attrs::new(bare);
    match attrs.next_part() {
        Some([b'm', b'=', ..]) => {
            return Err(AuthError::Unsupported("mandatory extension (m=)"));
        }
        Some([b'n', b'=', ..]) => {}
        _ => return Err(AuthError::Malformed("client-first-message lacks username n=")),
    }
    let nonce = attrs.require(b'r', "client-first-message lacks nonce r=")?;
    if nonce.is_empty() || !is_printable(nonce) {
        return Err(AuthError::Malformed("client nonce is empty or not printable ASCII"));
    }
    attrs.extensions()?;
    Ok(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether an error is the one a malformed-input case expects.
    type IsExpected = fn(&AuthError) -> bool;
    use crate::auth::scram_verifier::scram_secret_from_password;

    const MOCK_KEY: [u8; 32] = [42u8; 32];
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const CLIENT_FIRST: &[u8] = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &[u8] =
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &[u8] =
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &[u8] = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> ScramSecret {
        let salt = b64_decode(b"W22ZaJ0SNY7soEsUEjb6gQ==", "salt").unwrap();
        scram_secret_from_password("pencil", &salt, 4096)
    }

    fn rfc_server() -> ScramServer {
        ScramServer::with_nonce(Some(rfc_verifier()), "user", &MOCK_KEY, SERVER_NONCE.into())
    }

    #[test]
    fn rfc7677_vector() {
        let mut server = rfc_server();
        assert_eq!(server.handle_client_first(CLIENT_FIRST).unwrap(), SERVER_FIRST);
        let success = server.handle_client_final(CLIENT_FINAL).unwrap();
        assert_eq!(success.server_final, SERVER_FINAL);
        // The recovered ClientKey is the password's.
        assert_eq!(sha256(&success.client_key), rfc_verifier().stored_key);
        // The exchange is over.
        assert!(matches!(
            server.handle_client_final(CLIENT_FINAL),
            Err(AuthError::OutOfOrder(_))
        ));
    }

    #[test]
    fn wrong_password_fails_at_proof() {
        let salt = b64_decode(b"W22ZaJ0SNY7soEsUEjb6gQ==", "salt").unwrap();
        let other = scram_secret_from_password("not pencil", &salt, 4096);
        let mut server = ScramServer::with_nonce(Some(other), "user", &MOCK_KEY, SERVER_NONCE.into());
        server.handle_client_first(CLIENT_FIRST).unwrap();
        assert_eq!(
            server.handle_client_final(CLIENT_FINAL).unwrap_err(),
            AuthError::PasswordMismatch
        );
    }

    #[test]
    fn y_header_needs_matching_cbind() {
        let mut server = rfc_server();
        server.handle_client_first(b"y,,n=,r=abc").unwrap();
        let err = server
            .handle_client_final(format!("c=biws,r=abc{SERVER_NONCE},p=AAAA").as_bytes())
            .unwrap_err();
        // The proof is checked for shape first.
        assert!(matches!(err, AuthError::Malformed(_)));

        let proof = b64_encode(&[0u8; 32]);
        for (cbind, expected) in [
            ("biws", AuthError::ChannelBindingMismatch),
            ("eSws", AuthError::PasswordMismatch),
        ] {
            let mut server = rfc_server();
            server.handle_client_first(b"y,,n=,r=abc").unwrap();
            let msg = format!("c={cbind},r=abc{SERVER_NONCE},p={proof}");
            assert_eq!(server.handle_client_final(msg.as_bytes()).unwrap_err(), expected);
        }
    }

    #[test]
    fn unknown_user_and_md5_user_look_like_a_wrong_password() {
        let first = |server: &mut ScramServer| server.handle_client_first(CLIENT_FIRST).unwrap();
        let mut a = ScramServer::with_nonce(None, "user", &MOCK_KEY, SERVER_NONCE.into());
        let mut b = ScramServer::with_nonce(None, "user", &MOCK_KEY, SERVER_NONCE.into());
        let (fa, fb) = (first(&mut a), first(&mut b));
        assert_eq!(fa, fb, "same salt and iterations for the same unknown user");
        assert!(fa.ends_with(b",i=4096"));
        assert_eq!(
            a.handle_client_final(CLIENT_FINAL).unwrap_err(),
            AuthError::PasswordMismatch
        );

        // The mock is used for an md5-only user too (the caller passes None).
        let mut c = ScramServer::with_nonce(None, "user", &MOCK_KEY, SERVER_NONCE.into());
        assert_eq!(first(&mut c), fa);
    }

    #[test]
    fn doomed_flag_refuses_a_correct_proof() {
        // A mock verifier that happens to equal the real one still fails.
        let mut server = rfc_server();
        server.doomed = true;
        server.handle_client_first(CLIENT_FIRST).unwrap();
        assert_eq!(
            server.handle_client_final(CLIENT_FINAL).unwrap_err(),
            AuthError::PasswordMismatch
        );
    }

    #[test]
    fn malformed_client_first() {
        let cases: &[(&[u8], IsExpected)] = &[
            (b"", |e| matches!(e, AuthError::Malformed(_))),
            (b"garbage", |e| matches!(e, AuthError::Malformed(_))),
            (b"\xff\x00,,,", |e| matches!(e, AuthError::Malformed(_))),
            (b"n,,", |e| matches!(e, AuthError::Malformed(_))),
            (b"n,,n=user", |e| matches!(e, AuthError::Malformed(_))),
            (b"n,,n=user,r=", |e| matches!(e, AuthError::Malformed(_))),
            (b"n,,n=user,r=a b", |e| matches!(e, AuthError::Malformed(_))),
            (b"n,,n=user,x=abc", |e| matches!(e, AuthError::Malformed(_))),
            (b"n,,r=abc", |e| matches!(e, AuthError::Malformed(_))),
            (b"n,n=user,r=abc", |e| matches!(e, AuthError::Malformed(_))),
            (b"n,,n=user,r=abc,", |e| matches!(e, AuthError::Malformed(_))),
            (b"n,,n=user,r=abc,1", |e| matches!(e, AuthError::Malformed(_))),
            (b"x,,n=user,r=abc", |e| matches!(e, AuthError::Malformed(_))),
            (b"p=tls-server-end-point,,n=,r=abc", |e| {
                matches!(e, AuthError::UnsupportedChannelBinding(_))
            }),
            (b"n,a=admin,n=,r=abc", |e| matches!(e, AuthError::Unsupported(_))),
            (b"n,,m=ext,n=,r=abc", |e| matches!(e, AuthError::Unsupported(_))),
        ];
        for (msg, ok) in cases {
            let err = rfc_server().handle_client_first(msg).unwrap_err();
            assert!(ok(&err), "{:?} gave {err:?}", String::from_utf8_lossy(msg));
        }
        // Extensions after the nonce are ignored.
        assert!(rfc_server().handle_client_first(b"n,,n=,r=abc,x=1").is_ok());
    }

    #[test]
    fn malformed_client_final() {
        let nonce = format!("rOprNGfwEbeRWgbNEkqO{SERVER_NONCE}");
        let proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let cases: Vec<(String, IsExpected)> = vec![
            (String::new(), |e| matches!(e, AuthError::Malformed(_))),
            ("garbage".into(), |e| matches!(e, AuthError::Malformed(_))),
            (format!("c=biws,r={nonce}"), |e| matches!(e, AuthError::Malformed(_))),
            (format!("c=biws,r={nonce},p=!!notbase64"), |e| {
                matches!(e, AuthError::Malformed(_))
            }),
            (format!("c=biws,r={nonce},p=c2hvcnQ="), |e| {
                matches!(e, AuthError::Malformed(_))
            }),
            (format!("c=biws,p={proof}"), |e| matches!(e, AuthError::Malformed(_))),
            (format!("r={nonce},p={proof}"), |e| matches!(e, AuthError::Malformed(_))),
            (format!("c=!!,r={nonce},p={proof}"), |e| {
                matches!(e, AuthError::Malformed(_))
            }),
            (format!("c=eSws,r={nonce},p={proof}"), |e| {
                *e == AuthError::ChannelBindingMismatch
            }),
            (format!("c=biws,r=rOprNGfwEbeRWgbNEkqO,p={proof}"), |e| {
                matches!(e, AuthError::NonceMismatch(_))
            }),
            (format!("c=biws,r={nonce}x,p={proof}"), |e| {
                matches!(e, AuthError::NonceMismatch(_))
            }),
            (format!("c=biws,r={nonce},p={proof},x=1"), |e| {
                matches!(e, AuthError::Malformed(_))
            }),
        ];
        for (msg, ok) in cases {
            let mut server = rfc_server();
            server.handle_client_first(CLIENT_FIRST).unwrap();
            let err = server.handle_client_final(msg.as_bytes()).unwrap_err();
            assert!(ok(&err), "{msg:?} gave {err:?}");
            // A failed exchange cannot be retried.
            assert!(matches!(
                server.handle_client_final(CLIENT_FINAL),
                Err(AuthError::OutOfOrder(_))
            ));
        }
    }

    #[test]
    fn out_of_order() {
        let mut server = rfc_server();
        assert!(matches!(
            server.handle_client_final(CLIENT_FINAL),
            Err(AuthError::OutOfOrder(_))
        ));
        let mut server = rfc_server();
        server.handle_client_first(CLIENT_FIRST).unwrap();
        assert!(matches!(
            server.handle_client_first(CLIENT_FIRST),
            Err(AuthError::OutOfOrder(_))
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz over both messages.
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"nyp=,abcrsiv0189+/=\xff\x00";
        for _ in 0..2000 {
            let len = (next() % 40) as usize;
            let msg: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let mut server = ScramServer::new(None, "u", &MOCK_KEY);
            let _ = server.handle_client_first(&msg);
            let mut server = ScramServer::new(None, "u", &MOCK_KEY);
            if server.handle_client_first(b"n,,n=,r=abc").is_ok() {
                let _ = server.handle_client_final(&msg);
            }
        }
    }

    #[test]
    fn debug_shows_no_secrets() {
        let server = ScramServer::new(Some(rfc_verifier()), "user", &MOCK_KEY);
        assert_eq!(format!("{server:?}"), "ScramServer(awaiting client-first)");
    }

    const BINDING: &[u8] = b"0123456789abcdef0123456789abcdef";
    const PLAIN: &str = "SCRAM-SHA-256";
    const PLUS: &str = "SCRAM-SHA-256-PLUS";

    /// Channel binding data given to the server, if any.
    type Binding = Option<&'static [u8]>;

    fn server_with_binding(binding: Option<&[u8]>) -> ScramServer {
        rfc_server().with_channel_binding(binding.map(<[u8]>::to_vec))
    }

    #[test]
    fn plus_is_offered_only_with_binding_data() {
        assert_eq!(server_with_binding(None).mechanisms(), [PLAIN]);
        assert_eq!(server_with_binding(Some(BINDING)).mechanisms(), [PLUS, PLAIN]);
        assert_eq!(server_with_binding(Some(b"")).mechanisms(), [PLAIN]);
    }

    #[test]
    fn unknown_mechanism_or_plus_without_binding_is_an_invalid_mechanism() {
        let first = b"p=tls-server-end-point,,n=,r=abc";
        let cases: &[(Binding, &str)] = &[
            (None, PLUS),
            (Some(b""), PLUS),
            (Some(BINDING), "SCRAM-SHA-1"),
            (Some(BINDING), "scram-sha-256-plus"),
            (Some(BINDING), ""),
            (None, "SCRAM-SHA-256\0"),
        ];
        for &(binding, mechanism) in cases {
            let mut server = server_with_binding(binding);
            assert_eq!(
                server.handle_initial(mechanism.as_bytes(), first),
                Err(AuthError::InvalidMechanism),
                "{mechanism:?} with binding {binding:?}"
            );
            assert!(matches!(
                server.handle_initial(PLAIN.as_bytes(), b"n,,n=,r=abc"),
                Err(AuthError::OutOfOrder(_))
            ));
        }
    }

    #[test]
    fn gs2_flag_rules_follow_postgresql() {
        let b = Some(BINDING);
        let cases: &[(Binding, &str, &[u8], IsExpected)] = &[
            (None, PLAIN, b"n,,n=,r=abc", |_| false),
            (None, PLAIN, b"y,,n=,r=abc", |_| false),
            (b, PLAIN, b"n,,n=,r=abc", |_| false),
            (b, PLUS, b"p=tls-server-end-point,,n=,r=abc", |_| false),
            // The client could bind but thinks we cannot, while we offered PLUS.
            (b, PLAIN, b"y,,n=,r=abc", |e| *e == AuthError::ChannelBindingDowngrade),
            (None, PLAIN, b"p=tls-server-end-point,,n=,r=abc", |e| {
                matches!(e, AuthError::UnsupportedChannelBinding(_))
            }),
            (b, PLAIN, b"p=tls-server-end-point,,n=,r=abc", |e| {
                matches!(e, AuthError::UnsupportedChannelBinding(_))
            }),
            (b, PLUS, b"p=tls-unique,,n=,r=abc", |e| {
                matches!(e, AuthError::UnsupportedChannelBinding(_))
            }),
            (b, PLUS, b"p=,,n=,r=abc", |e| {
                matches!(e, AuthError::UnsupportedChannelBinding(_))
            }),
            (b, PLUS, b"n,,n=,r=abc", |e| matches!(e, AuthError::Malformed(_))),
            (b, PLUS, b"y,,n=,r=abc", |e| matches!(e, AuthError::Malformed(_))),
            (b, PLUS, b"p=tls-server-end-point,n=,r=abc", |e| {
                matches!(e, AuthError::Malformed(_))
            }),
            (b, PLUS, b"p=tls-server-end-point,a=x,n=,r=abc", |e| {
                matches!(e, AuthError::Unsupported(_))
            }),
            (b, PLUS, b"p=tls-server-end-point,,r=abc", |e| {
                matches!(e, AuthError::Malformed(_))
            }),
        ];
        for &(binding, mechanism, first, is_expected) in cases {
            let result = server_with_binding(binding).handle_initial(mechanism.as_bytes(), first);
            let what = format!(
                "{mechanism} {:?} binding {}",
                String::from_utf8_lossy(first),
                binding.is_some()
            );
            match result {
                Ok(server_first) => assert!(server_first.starts_with(b"r=abc"), "{what}"),
                Err(e) => assert!(is_expected(&e), "{what} gave {e:?}"),
            }
        }
        // handle_client_first is SCRAM-SHA-256, downgrade check included.
        let mut server = server_with_binding(b);
        assert_eq!(
            server.handle_client_first(b"y,,n=,r=abc"),
            Err(AuthError::ChannelBindingDowngrade)
        );
    }

    #[test]
    fn plus_client_final_must_carry_the_binding_data() {
        let header = b"p=tls-server-end-point,,";
        let proof = b64_encode(&[0u8; 32]);
        let cases: Vec<(Vec<u8>, AuthError)> = vec![
            // The gs2 header alone, as without PLUS.
            (header.to_vec(), AuthError::ChannelBindingMismatch),
            // Another certificate's hash: a man in the middle.
            ([&header[..], &[0u8; 32]].concat(), AuthError::ChannelBindingMismatch),
            ([&header[..], BINDING, b"x"].concat(), AuthError::ChannelBindingMismatch),
            (b"n,,".to_vec(), AuthError::ChannelBindingMismatch),
            // The right data gets as far as the (here wrong) proof.
            ([&header[..], BINDING].concat(), AuthError::PasswordMismatch),
        ];
        for (cbind, expected) in cases {
            let mut server = server_with_binding(Some(BINDING));
            server
                .handle_initial(PLUS.as_bytes(), &[&header[..], b"n=,r=abc"].concat())
                .unwrap();
            let msg = format!("c={},r=abc{SERVER_NONCE},p={proof}", b64_encode(&cbind));
            assert_eq!(
                server.handle_client_final(msg.as_bytes()).unwrap_err(),
                expected,
                "{:?}",
                String::from_utf8_lossy(&cbind)
            );
        }

        // Without PLUS the binding data must not be appended, even when offered.
        let mut server = server_with_binding(Some(BINDING));
        server.handle_initial(PLAIN.as_bytes(), b"n,,n=,r=abc").unwrap();
        let msg = format!(
            "c={},r=abc{SERVER_NONCE},p={proof}",
            b64_encode(&[b"n,,", BINDING].concat())
        );
        assert_eq!(
            server.handle_client_final(msg.as_bytes()).unwrap_err(),
            AuthError::ChannelBindingMismatch
        );
    }
}
