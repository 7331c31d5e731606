//! The client side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS: the pooler logging in to
//! PostgreSQL, either with a password or by SCRAM passthrough. Server messages are
//! untrusted too: a malicious server must not be able to make the pooler panic or spin
//! (iteration cap), and must prove it knows the verifier before the login counts.
//!
//! Channel binding is chosen as libpq's `channel_binding=prefer` does: over TLS (channel
//! binding data given) PLUS is used whenever the server offers it.

use std::fmt;

use subtle::ConstantTimeEq;

use super::error::AuthError;
use super::scram_common::{
    attr_value, b64_decode, b64_decode_key, b64_encode, derive_keys, hmac, is_printable, parse_iterations,
    random_nonce, sha256, xor_into, Attrs, Key, CHANNEL_BINDING_TYPE, MECHANISM, MECHANISM_PLUS,
};

/// What the pooler proves its knowledge of the user's password with.
#[derive(Clone)]
pub enum ScramClientKeys {
    /// The password itself.
    Password(String),
    /// SCRAM passthrough, as PgBouncer does: the ClientKey recovered from an authenticated
    /// client's proof plus the ServerKey from the auth_file verifier; valid only when the
    /// server's salt and iterations equal the verifier's.
    Passthrough {
        client_key: [u8; 32],
        server_key: [u8; 32],
        salt: Vec<u8>,
        iterations: u32,
    },
}

impl fmt::Debug for ScramClientKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScramClientKeys::Password(_) => f.write_str("ScramClientKeys::Password(..)"),
            ScramClientKeys::Passthrough { iterations, .. } => {
                write!(f, "ScramClientKeys::Passthrough {{ iterations: {iterations}, .. }}")
            }
        }
    }
}

pub struct ScramClient {
    keys: ScramClientKeys,
    /// Sent in `n=`; empty outside tests, as libpq sends (PostgreSQL ignores it).
    username: String,
    nonce: String,
    /// The tls-server-end-point data of the server's certificate, when on TLS.
    channel_binding: Option<Vec<u8>>,
    /// SCRAM-SHA-256-PLUS was chosen (see `choose_mechanism`).
    plus: bool,
    state: State,
}

enum State {
    Initial,
    /// client-final sent; the ServerSignature a genuine server must return.
    AwaitingServerFinal {
        server_signature: Key,
    },
    Failed,
}

/// The longest `e=` text carried into an error.
const MAX_SERVER_ERROR_LEN: usize = 100;

impl ScramClient {
    /// A client with a random nonce (18 random bytes, base64).
    pub fn new(keys: ScramClientKeys) -> ScramClient {
        Self::with_nonce(keys, random_nonce())
    }

    /// As `new` with a chosen nonce (printable ASCII without ','). For tests and
    /// known-answer vectors only.
    pub fn with_nonce(keys: ScramClientKeys, nonce: String) -> ScramClient {
        ScramClient {
            keys,
            username: String::new(),
            nonce,
            channel_binding: None,
            plus: false,
            state: State::Initial,
        }
    }

    /// Sets the channel binding data: on a TLS connection, the tls-server-end-point hash
    /// of the certificate PostgreSQL presented (`crate::tls::der::server_end_point_hash`);
    /// None without TLS or when the certificate has no usable hash. Empty data counts as
    /// None. Call `choose_mechanism` afterwards so PLUS can be used.
    pub fn with_channel_binding(mut self, data: Option<Vec<u8>>) -> ScramClient {
        self.channel_binding = data.filter(|d| !d.is_empty());
        self
    }

    /// Picks the mechanism from the server's AuthenticationSASL data (mechanism names,
    /// each NUL-terminated, ending with an empty name) and returns it, for the
    /// SASLInitialResponse: SCRAM-SHA-256-PLUS when offered and channel binding data is
    /// set, else SCRAM-SHA-256. Without this call the client uses SCRAM-SHA-256.
    pub fn choose_mechanism(&mut self, sasl_mechanisms: &[u8]) -> Result<&'static str, AuthError> {
        if !matches!(self.state, State::Initial) {
            return Err(AuthError::OutOfOrder("mechanism chosen after the exchange started"));
        }
        let offers = |name: &str| {
            sasl_mechanisms
                .split(|&b| b == 0)
                .take_while(|m| !m.is_empty())
                .any(|m| m == name.as_bytes())
        };
        self.plus = self.channel_binding.is_some() && offers(MECHANISM_PLUS);
        if !self.plus && !offers(MECHANISM) {
            return Err(AuthError::NoSupportedMechanism);
        }
        Ok(self.mechanism())
    }

    /// The mechanism to name in the SASLInitialResponse.
    pub fn mechanism(&self) -> &'static str {
        if self.plus {
            MECHANISM_PLUS
        } else {
            MECHANISM
        }
    }

    /// The gs2 header: `p=tls-server-end-point,,` with PLUS; `y,,` when on TLS without
    /// PLUS (we support channel binding but the server did not offer it, which lets a
    /// server that does support it detect a downgrade); `n,,` otherwise.
    fn gs2_header(&self) -> Vec<u8> {
        if self.plus {
            format!("p={CHANNEL_BINDING_TYPE},,").into_bytes()
        } else if self.channel_binding.is_some() {
            b"y,,".to_vec()
        } else {
            b"n,,".to_vec()
        }
    }

    /// The client-first-message for SASLInitialResponse: `<gs2 header>n=,r=<nonce>`.
    pub fn client_first(&self) -> Vec<u8> {
        let mut msg = self.gs2_header();
        msg.extend_from_slice(&self.client_first_bare());
        msg
    }

    fn client_first_bare(&self) -> Vec<u8> {
        format!("n={},r={}", self.username, self.nonce).into_bytes()
    }

    /// server-first-message (AuthenticationSASLContinue data) → client-final-message.
    pub fn handle_server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(std::mem::replace(&mut self.state, State::Failed), State::Initial) {
            return Err(AuthError::OutOfOrder("server-first-message after the exchange started"));
        }

        let mut attrs = Attrs::new(msg);
        let nonce = match attrs.next_part() {
            Some([b'm', b'=', ..]) => {
                return Err(AuthError::Unsupported("mandatory extension (m=)"));
            }
            Some(part) => attr_value(part, b'r').ok_or(AuthError::Malformed("server-first-message lacks nonce r="))?,
            None => return Err(AuthError::Malformed("server-first-message is empty")),
        };
        let salt = attrs.require(b's', "server-first-message lacks salt s=")?;
        let iterations = attrs.require(b'i', "server-first-message lacks iteration count i=")?;
        attrs.extensions()?;

        if !is_printable(nonce) {
            return Err(AuthError::Malformed("server nonce is not printable ASCII"));
        }
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(self.nonce.as_bytes()) {
            return Err(AuthError::NonceMismatch(
                "server nonce does not extend the client nonce",
            ));
        }
        let salt = b64_decode(salt, "salt s= is not base64")?;
        if salt.is_empty() {
            return Err(AuthError::Malformed("salt s= is empty"));
        }
        let iterations = parse_iterations(iterations)?;

        let (client_key, server_key) = match &self.keys {
            ScramClientKeys::Password(password) => {
                let keys = derive_keys(password.as_bytes(), &salt, iterations);
                (keys.client_key, keys.server_key)
            }
            ScramClientKeys::Passthrough {
                client_key,
                server_key,
                salt: verifier_salt,
                iterations: verifier_iterations,
            } => {
                // The keys are bound to the verifier's salt and count; with any other the
                // server would reject the proof, so say why instead.
                if salt != *verifier_salt || iterations != *verifier_iterations {
                    return Err(AuthError::PassthroughMismatch);
                }
                (*client_key, *server_key)
            }
        };

        // c= is base64(gs2 header), followed with PLUS by the channel binding data.
        let mut cbind_input = self.gs2_header();
        if self.plus {
            cbind_input.extend_from_slice(self.channel_binding.as_deref().unwrap_or_default());
        }
        let mut without_proof = b"c=".to_vec();
        without_proof.extend_from_slice(b64_encode(&cbind_input).as_bytes());
        without_proof.extend_from_slice(b",r=");
        without_proof.extend_from_slice(nonce);
        let auth_message: [&[u8]; 5] = [&self.client_first_bare(), b",", msg, b",", &without_proof];
        let stored_key = sha256(&client_key);
        let mut proof = hmac(&stored_key, &auth_message);
        xor_into(&mut proof, &client_key);
        let server_signature = hmac(&server_key, &auth_message);

        let mut client_final = without_proof;
        client_final.extend_from_slice(b",p=");
        client_final.extend_from_slice(b64_encode(&proof).as_bytes());
        self.state = State::AwaitingServerFinal { server_signature };
        Ok(client_final)
    }

    /// Checks the server-final-message (AuthenticationSASLFinal data): `v=` must be the
    /// expected ServerSignature; `e=` reports the server's refusal.
    pub fn verify_server_final(&self, msg: &[u8]) -> Result<(), AuthError> {
        let State::AwaitingServerFinal { server_signature } = &self.state else {
            return Err(AuthError::OutOfOrder(
                "server-final-message before a client-final-message was sent",
            ));
        };
        let mut attrs = Attrs::new(msg);
        let first = attrs
            .next_part()
            .ok_or(AuthError::Malformed("server-final-message is empty"))?;
        if let Some(error) = attr_value(first, b'e') {
            return Err(AuthError::ServerError(sanitize_server_error(error)));
        }
        let verifier =
            attr_value(first, b'v').ok_or(AuthError::Malformed("server-final-message has neither v= nor e="))?;
        attrs.extensions()?;
        let signature = b64_decode_key(verifier, "server signature v= is not 32 bytes of base64")?;
        if bool::from(signature.ct_eq(server_signature)) {
            Ok(())
        } else {
            Err(AuthError::ServerSignatureMismatch)
        }
    }

    #[cfg(test)]
    fn with_username(mut self, username: &str) -> ScramClient {
        self.username = username.to_string();
        self
    }
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Initial => "initial",
            State::AwaitingServerFinal { .. } => "awaiting server-final",
            State::Failed => "failed",
        };
        write!(f, "ScramClient({state})")
    }
}

/// The server's error value, as printable ASCII and bounded, for a log line.
fn sanitize_server_error(value: &[u8]) -> String {
    value
        .iter()
        .take(MAX_SERVER_ERROR_LEN)
        .map(|&b| if (0x20..=0x7e).contains(&b) { char::from(b) } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether an error is the one a malformed-input case expects.
    type IsExpected = fn(&AuthError) -> bool;
    use crate::auth::scram_server::ScramServer;
    use crate::auth::scram_verifier::{new_scram_secret, scram_secret_from_password};
    use crate::auth::secret::ScramSecret;

    const MOCK_KEY: [u8; 32] = [9u8; 32];
    const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const CLIENT_FIRST: &[u8] = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &[u8] =
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &[u8] =
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &[u8] = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_client() -> ScramClient {
        ScramClient::with_nonce(ScramClientKeys::Password("pencil".into()), CLIENT_NONCE.into()).with_username("user")
    }

    #[test]
    fn rfc7677_vector() {
        let mut client = rfc_client();
        assert_eq!(client.client_first(), CLIENT_FIRST);
        assert_eq!(client.handle_server_first(SERVER_FIRST).unwrap(), CLIENT_FINAL);
        assert_eq!(client.verify_server_final(SERVER_FINAL), Ok(()));
        assert_eq!(
            client.verify_server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(AuthError::ServerSignatureMismatch)
        );
    }

    #[test]
    fn default_client_first_has_empty_user() {
        let client = ScramClient::with_nonce(ScramClientKeys::Password("x".into()), "abc".into());
        assert_eq!(client.client_first(), b"n,,n=,r=abc");
        let random = ScramClient::new(ScramClientKeys::Password("x".into())).client_first();
        assert!(random.starts_with(b"n,,n=,r="));
        assert_eq!(random.len(), b"n,,n=,r=".len() + 24);
    }

    /// Runs a full exchange, returning the server's outcome.
    fn converse(client: &mut ScramClient, server: &mut ScramServer) -> Result<crate::auth::ScramSuccess, AuthError> {
        let server_first = server.handle_initial(client.mechanism().as_bytes(), &client.client_first())?;
        let client_final = client.handle_server_first(&server_first)?;
        let success = server.handle_client_final(&client_final)?;
        client.verify_server_final(&success.server_final)?;
        Ok(success)
    }

    #[test]
    fn password_client_against_server() {
        let verifier = new_scram_secret("s3cret");
        let mut client = ScramClient::new(ScramClientKeys::Password("s3cret".into()));
        let mut server = ScramServer::new(Some(verifier.clone()), "alice", &MOCK_KEY);
        let success = converse(&mut client, &mut server).unwrap();
        assert_eq!(sha256(&success.client_key), verifier.stored_key);

        let mut client = ScramClient::new(ScramClientKeys::Password("wrong".into()));
        let mut server = ScramServer::new(Some(verifier), "alice", &MOCK_KEY);
        assert_eq!(
            converse(&mut client, &mut server).unwrap_err(),
            AuthError::PasswordMismatch
        );
    }

    fn passthrough_keys(client_key: Key, verifier: &ScramSecret) -> ScramClientKeys {
        ScramClientKeys::Passthrough {
            client_key,
            server_key: verifier.server_key,
            salt: verifier.salt.clone(),
            iterations: verifier.iterations,
        }
    }

    #[test]
    fn passthrough_logs_in_to_a_second_server() {
        let verifier = new_scram_secret("s3cret");
        // A client authenticates to the pooler...
        let mut client = ScramClient::new(ScramClientKeys::Password("s3cret".into()));
        let mut pooler = ScramServer::new(Some(verifier.clone()), "alice", &MOCK_KEY);
        let success = converse(&mut client, &mut pooler).unwrap();
        // ...and the pooler reuses its ClientKey to log in to PostgreSQL.
        let mut upstream_login = ScramClient::new(passthrough_keys(success.client_key, &verifier));
        let mut postgres = ScramServer::new(Some(verifier.clone()), "alice", &[0u8; 32]);
        converse(&mut upstream_login, &mut postgres).unwrap();
    }

    #[test]
    fn passthrough_with_a_different_salt_fails_clearly() {
        let verifier = new_scram_secret("s3cret");
        let mut client = ScramClient::new(ScramClientKeys::Password("s3cret".into()));
        let mut pooler = ScramServer::new(Some(verifier.clone()), "alice", &MOCK_KEY);
        let success = converse(&mut client, &mut pooler).unwrap();

        // Same password, but PostgreSQL's verifier has its own salt.
        let other = new_scram_secret("s3cret");
        let mut login = ScramClient::new(passthrough_keys(success.client_key, &verifier));
        let mut postgres = ScramServer::new(Some(other), "alice", &MOCK_KEY);
        assert_eq!(
            converse(&mut login, &mut postgres).unwrap_err(),
            AuthError::PassthroughMismatch
        );

        // Same salt, different iteration count.
        let other = scram_secret_from_password("s3cret", &verifier.salt, 4097);
        let mut login = ScramClient::new(passthrough_keys(success.client_key, &verifier));
        let mut postgres = ScramServer::new(Some(other), "alice", &MOCK_KEY);
        assert_eq!(
            converse(&mut login, &mut postgres).unwrap_err(),
            AuthError::PassthroughMismatch
        );
    }

    #[test]
    fn server_final_errors() {
        let mut client = rfc_client();
        assert!(matches!(
            client.verify_server_final(SERVER_FINAL),
            Err(AuthError::OutOfOrder(_))
        ));
        client.handle_server_first(SERVER_FIRST).unwrap();
        assert_eq!(
            client.verify_server_final(b"e=invalid-proof"),
            Err(AuthError::ServerError("invalid-proof".into()))
        );
        let long = [b"e=".as_slice(), &[b'\n'; 500]].concat();
        assert_eq!(
            client.verify_server_final(&long),
            Err(AuthError::ServerError("?".repeat(100)))
        );
        for bad in [b"".as_slice(), b"garbage", b"v=!!!", b"v=c2hvcnQ=", b"x=1"] {
            assert!(
                matches!(client.verify_server_final(bad), Err(AuthError::Malformed(_))),
                "{bad:?}"
            );
        }
        // Extensions after v= are allowed.
        let with_ext = [SERVER_FINAL, b",x=1"].concat();
        assert_eq!(client.verify_server_final(&with_ext), Ok(()));
    }

    #[test]
    fn malformed_server_first() {
        let n = format!("{CLIENT_NONCE}srv");
        let cases: Vec<(String, IsExpected)> = vec![
            (String::new(), |e| matches!(e, AuthError::Malformed(_))),
            ("garbage".into(), |e| matches!(e, AuthError::Malformed(_))),
            (format!("r={n},i=4096"), |e| matches!(e, AuthError::Malformed(_))),
            (format!("r={n},s=c2FsdA=="), |e| matches!(e, AuthError::Malformed(_))),
            ("s=c2FsdA==,i=4096".into(), |e| matches!(e, AuthError::Malformed(_))),
            (format!("r={n},s=!!,i=4096"), |e| matches!(e, AuthError::Malformed(_))),
            (format!("r={n},s=,i=4096"), |e| matches!(e, AuthError::Malformed(_))),
            (format!("r={n},s=c2FsdA==,i=x"), |e| {
                matches!(e, AuthError::Malformed(_))
            }),
            (format!("r={n},s=c2FsdA==,i=4096,"), |e| {
                matches!(e, AuthError::Malformed(_))
            }),
            (format!("r={n}\x01,s=c2FsdA==,i=4096"), |e| {
                matches!(e, AuthError::Malformed(_))
            }),
            (format!("m=x,r={n},s=c2FsdA==,i=4096"), |e| {
                matches!(e, AuthError::Unsupported(_))
            }),
            ("r=other,s=c2FsdA==,i=4096".into(), |e| {
                matches!(e, AuthError::NonceMismatch(_))
            }),
            (format!("r={CLIENT_NONCE},s=c2FsdA==,i=4096"), |e| {
                matches!(e, AuthError::NonceMismatch(_))
            }),
            (format!("r={n},s=c2FsdA==,i=0"), |e| {
                *e == AuthError::IterationsOutOfRange(0)
            }),
            (format!("r={n},s=c2FsdA==,i=4000000000"), |e| {
                *e == AuthError::IterationsOutOfRange(4_000_000_000)
            }),
        ];
        for (msg, ok) in cases {
            let mut client = rfc_client();
            let err = client.handle_server_first(msg.as_bytes()).unwrap_err();
            assert!(ok(&err), "{msg:?} gave {err:?}");
            assert!(matches!(
                client.handle_server_first(SERVER_FIRST),
                Err(AuthError::OutOfOrder(_))
            ));
            assert!(matches!(
                client.verify_server_final(SERVER_FINAL),
                Err(AuthError::OutOfOrder(_))
            ));
        }
    }

    const BINDING: &[u8] = b"0123456789abcdef0123456789abcdef";

    /// Channel binding data given to one side, if any.
    type Binding = Option<&'static [u8]>;

    /// The AuthenticationSASL data a server sends.
    fn sasl_list(names: &[&str]) -> Vec<u8> {
        let mut data: Vec<u8> = names.iter().flat_map(|n| [n.as_bytes(), b"\0"].concat()).collect();
        data.push(0);
        data
    }

    /// A login as pool/connect.rs makes one: pick from the server's list, then converse.
    fn login(
        client_binding: Option<&[u8]>,
        server_binding: Option<&[u8]>,
    ) -> (ScramClient, Result<crate::auth::ScramSuccess, AuthError>) {
        let verifier = new_scram_secret("s3cret");
        let mut server = ScramServer::new(Some(verifier), "alice", &MOCK_KEY)
            .with_channel_binding(server_binding.map(<[u8]>::to_vec));
        let mut client = ScramClient::new(ScramClientKeys::Password("s3cret".into()))
            .with_channel_binding(client_binding.map(<[u8]>::to_vec));
        client.choose_mechanism(&sasl_list(server.mechanisms())).unwrap();
        let result = converse(&mut client, &mut server);
        (client, result)
    }

    #[test]
    fn channel_binding_round_trips() {
        let b = Some(BINDING);
        let cases: &[(Binding, Binding, &str, &[u8])] = &[
            (None, None, "SCRAM-SHA-256", b"n,,"),
            (b, b, "SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,"),
            // TLS to a server that offers no PLUS.
            (b, None, "SCRAM-SHA-256", b"y,,"),
            // A client without TLS data against a TLS server.
            (None, b, "SCRAM-SHA-256", b"n,,"),
        ];
        for &(client_binding, server_binding, mechanism, header) in cases {
            let (client, result) = login(client_binding, server_binding);
            let what = format!("client {client_binding:?}, server {server_binding:?}");
            assert!(result.is_ok(), "{what}: {result:?}");
            assert_eq!(client.mechanism(), mechanism, "{what}");
            assert!(client.client_first().starts_with(header), "{what}");
        }
    }

    #[test]
    fn plus_client_final_binds_the_certificate_hash() {
        let mut client = rfc_client().with_channel_binding(Some(BINDING.to_vec()));
        let list = sasl_list(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        assert_eq!(client.choose_mechanism(&list), Ok("SCRAM-SHA-256-PLUS"));
        let client_final = client.handle_server_first(SERVER_FIRST).unwrap();
        let cbind = Attrs::new(&client_final).require(b'c', "c").unwrap();
        let cbind = b64_decode(cbind, "c").unwrap();
        assert_eq!(cbind, [&b"p=tls-server-end-point,,"[..], BINDING].concat());
    }

    #[test]
    fn mismatched_binding_data_fails() {
        // The server's certificate is not the one the client saw: a man in the middle.
        let (_, result) = login(Some(BINDING), Some(&[0x55; 32]));
        assert_eq!(result.unwrap_err(), AuthError::ChannelBindingMismatch);
    }

    #[test]
    fn stripping_plus_from_the_list_is_detected() {
        let verifier = new_scram_secret("s3cret");
        let mut server =
            ScramServer::new(Some(verifier), "alice", &MOCK_KEY).with_channel_binding(Some(BINDING.to_vec()));
        let mut client =
            ScramClient::new(ScramClientKeys::Password("s3cret".into())).with_channel_binding(Some(BINDING.to_vec()));
        // The client sees a list with PLUS removed and answers y,,.
        assert_eq!(
            client.choose_mechanism(&sasl_list(&["SCRAM-SHA-256"])),
            Ok("SCRAM-SHA-256")
        );
        assert_eq!(
            converse(&mut client, &mut server).unwrap_err(),
            AuthError::ChannelBindingDowngrade
        );
    }

    #[test]
    fn unknown_user_with_plus_looks_like_a_wrong_password() {
        let mut server = ScramServer::new(None, "nobody", &MOCK_KEY).with_channel_binding(Some(BINDING.to_vec()));
        let mut client =
            ScramClient::new(ScramClientKeys::Password("s3cret".into())).with_channel_binding(Some(BINDING.to_vec()));
        client.choose_mechanism(&sasl_list(server.mechanisms())).unwrap();
        assert_eq!(client.mechanism(), "SCRAM-SHA-256-PLUS");
        assert_eq!(
            converse(&mut client, &mut server).unwrap_err(),
            AuthError::PasswordMismatch
        );
    }

    #[test]
    fn choosing_a_mechanism() {
        let with = |binding: Option<&[u8]>| {
            ScramClient::new(ScramClientKeys::Password("x".into())).with_channel_binding(binding.map(<[u8]>::to_vec))
        };
        let b = Some(BINDING);
        let cases: &[(Binding, &[u8], Result<&str, AuthError>)] = &[
            (None, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0", Ok("SCRAM-SHA-256")),
            (b, b"SCRAM-SHA-256-PLUS\0\0", Ok("SCRAM-SHA-256-PLUS")),
            (b, b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0", Ok("SCRAM-SHA-256-PLUS")),
            (Some(b""), b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0", Ok("SCRAM-SHA-256")),
            (None, b"SCRAM-SHA-256-PLUS\0\0", Err(AuthError::NoSupportedMechanism)),
            (b, b"SCRAM-SHA-1\0\0", Err(AuthError::NoSupportedMechanism)),
            (b, b"", Err(AuthError::NoSupportedMechanism)),
            (b, b"\0SCRAM-SHA-256\0\0", Err(AuthError::NoSupportedMechanism)),
            (None, b"SCRAM-SHA-256", Ok("SCRAM-SHA-256")),
        ];
        for &(binding, list, ref expected) in cases {
            let mut client = with(binding);
            assert_eq!(
                client.choose_mechanism(list).as_ref(),
                expected.as_ref(),
                "{:?} with binding {binding:?}",
                String::from_utf8_lossy(list)
            );
        }
        // Without a choice, SCRAM-SHA-256.
        assert_eq!(with(b).mechanism(), "SCRAM-SHA-256");
        assert!(with(b).client_first().starts_with(b"y,,"));

        let mut client = rfc_client();
        client.handle_server_first(SERVER_FIRST).unwrap();
        assert!(matches!(
            client.choose_mechanism(b"SCRAM-SHA-256\0\0"),
            Err(AuthError::OutOfOrder(_))
        ));
    }

    #[test]
    fn errors_and_debug_do_not_leak_secrets() {
        let keys = ScramClientKeys::Password("hunter2".into());
        assert!(!format!("{keys:?}").contains("hunter2"));
        let client = ScramClient::new(keys);
        assert_eq!(format!("{client:?}"), "ScramClient(initial)");
    }
}
