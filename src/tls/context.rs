//! The instance's TLS settings made ready to use: rustls configurations for accepting
//! clients and for connecting to PostgreSQL, built from the `client_tls_*` and
//! `server_tls_*` keys, swapped whole when a reload reads new certificates.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme, SupportedProtocolVersion};
use thiserror::Error;

use crate::config::{parse_protocols, ClientTls, FrontDoor, ServerTls, SslMode};

/// PostgreSQL's ALPN protocol name (PostgreSQL 17's direct TLS requires it).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Where Debian (and most Linux systems) keep the trusted roots, for server_tls_sslmode
/// verify-* without server_tls_ca_file, as OpenSSL's default paths in PgBouncer.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {reason}")]
    File {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("{key}: {path} holds no {what}")]
    Empty {
        key: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("{key}: {reason}")]
    Setting { key: &'static str, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Everything a worker needs to speak TLS, for one generation of the configuration.
pub struct TlsContext {
    pub client_mode: SslMode,
    /// None when client_tls_sslmode is disable.
    pub acceptor: Option<Arc<rustls::ServerConfig>>,
    /// The channel binding data (tls-server-end-point) of pgsilo's own certificate, for
    /// SCRAM-SHA-256-PLUS; None when the certificate's signature hash has no binding.
    pub end_point: Option<Vec<u8>>,
    pub server_mode: SslMode,
    /// None when server_tls_sslmode is disable.
    pub connector: Option<Arc<rustls::ClientConfig>>,
}

impl TlsContext {
    pub fn disabled() -> TlsContext {
        TlsContext {
            client_mode: SslMode::Disable,
            acceptor: None,
            end_point: None,
            server_mode: SslMode::Disable,
            connector: None,
        }
    }

    pub fn load(front: &FrontDoor) -> Result<TlsContext, TlsError> {
        // ring rather than aws-lc-rs: no cmake or assembler toolchain to build. Its
        // provider lacks only the post-quantum key exchange, which PostgreSQL clients
        // do not offer yet.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (acceptor, end_point) = match front.client_tls.sslmode {
            SslMode::Disable => (None, None),
            _ => {
                let (config, end_point) = acceptor(&front.client_tls, &provider)?;
                (Some(Arc::new(config)), end_point)
            }
        };
        let connector = match front.server_tls.sslmode {
            SslMode::Disable => None,
            _ => Some(Arc::new(connector(&front.server_tls, &provider)?)),
        };
        Ok(TlsContext {
            client_mode: front.client_tls.sslmode,
            acceptor,
            end_point,
            server_mode: front.server_tls.sslmode,
            connector,
        })
    }
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        key,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.display().to_string(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

fn read_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        key,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in read_certs(key, path)? {
        store.add(cert).map_err(|e| TlsError::File {
            key,
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(store)
}

fn versions(key: &'static str, text: &str) -> Result<Vec<&'static SupportedProtocolVersion>, TlsError> {
    let (v12, v13) = parse_protocols(text).map_err(|reason| TlsError::Setting { key, reason })?;
    let mut out = Vec::new();
    if v13 {
        out.push(&rustls::version::TLS13);
    }
    if v12 {
        out.push(&rustls::version::TLS12);
    }
    Ok(out)
}

/// The provider limited to the cipher suites a `*_tls_ciphers` value names: PgBouncer's
/// keywords (fast, normal, secure, all, default, compat, legacy) keep rustls' own list,
/// which has only modern AEAD suites; otherwise a colon-separated list of IANA suite
/// names (TLS13_AES_256_GCM_SHA384, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, ...).
fn with_ciphers(
    key: &'static str,
    text: &str,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<CryptoProvider>, TlsError> {
    let text = text.trim();
    if ["fast", "normal", "secure", "all", "default", "compat", "legacy", "HIGH"]
        .iter()
        .any(|k| k.eq_ignore_ascii_case(text))
    {
        return Ok(provider.clone());
    }
    let wanted: Vec<String> = text
        .split([':', ','])
        .map(|s| s.trim().to_ascii_uppercase())
        .filter(|s| !s.is_empty())
        .collect();
    let mut p = (**provider).clone();
    p.cipher_suites
        .retain(|s| wanted.iter().any(|w| *w == format!("{:?}", s.suite())));
    if p.cipher_suites.is_empty() {
        let known: Vec<String> = provider
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        return Err(TlsError::Setting {
            key,
            reason: format!(
                "\"{text}\" names no supported cipher suite; use fast, secure, all, or some of {}",
                known.join(":")
            ),
        });
    }
    Ok(Arc::new(p))
}

fn acceptor(
    c: &ClientTls,
    provider: &Arc<CryptoProvider>,
) -> Result<(rustls::ServerConfig, Option<Vec<u8>>), TlsError> {
    let (Some(key_file), Some(cert_file)) = (&c.key_file, &c.cert_file) else {
        return Err(TlsError::Setting {
            key: "client_tls_sslmode",
            reason: "needs client_tls_key_file and client_tls_cert_file".into(),
        });
    };
    let certs = read_certs("client_tls_cert_file", cert_file)?;
    let key = read_key("client_tls_key_file", key_file)?;
    let end_point = certs.first().and_then(|c| super::der::server_end_point_hash(c));
    let provider = with_ciphers("client_tls_ciphers", &c.ciphers, provider)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions("client_tls_protocols", &c.protocols)?)?;
    let builder = match &c.ca_file {
        // With a CA, clients are asked for a certificate; only verify-ca/verify-full
        // make it mandatory (auth_type cert checks for one itself).
        Some(ca) => {
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots("client_tls_ca_file", ca)?), provider);
            let v = if c.sslmode.verifies() {
                v
            } else {
                v.allow_unauthenticated()
            };
            let v = v.build().map_err(|e| TlsError::Setting {
                key: "client_tls_ca_file",
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    config.ignore_client_order = true;
    Ok((config, end_point))
}

fn connector(s: &ServerTls, provider: &Arc<CryptoProvider>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = with_ciphers("server_tls_ciphers", &s.ciphers, provider)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions("server_tls_protocols", &s.protocols)?)?;
    let algorithms = provider.signature_verification_algorithms;
    let builder = if s.sslmode.verifies() {
        let store = match &s.ca_file {
            Some(ca) => roots("server_tls_ca_file", ca)?,
            None => roots("server_tls_ca_file", Path::new(SYSTEM_ROOTS))?,
        };
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .map_err(|e| TlsError::Setting {
                key: "server_tls_ca_file",
                reason: e.to_string(),
            })?;
        if s.sslmode == SslMode::VerifyFull {
            builder.with_webpki_verifier(webpki)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { webpki }))
        }
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify { algorithms }))
    };
    let mut config = match (&s.key_file, &s.cert_file) {
        (Some(key), Some(cert)) => builder.with_client_auth_cert(
            read_certs("server_tls_cert_file", cert)?,
            read_key("server_tls_key_file", key)?,
        )?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// server_tls_sslmode verify-ca: the chain must lead to the CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// server_tls_sslmode allow/prefer/require: encryption without authentication of the
/// server, as libpq's require. The handshake signatures are still checked.
#[derive(Debug)]
struct NoVerify {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// "TLSv1.3/TLS13_AES_256_GCM_SHA384", for SHOW CLIENTS/SERVERS and the logs.
pub fn describe(conn: &rustls::Connection) -> String {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    };
    match conn.negotiated_cipher_suite() {
        Some(s) => format!("{version}/{:?}", s.suite()),
        None => version.to_string(),
    }
}
