//! Certificates for TLS tests (made with rcgen: ECDSA P-256 keys, SHA-256 signatures), and
//! a look at the certificate a TLS listener serves (with `openssl s_client`).
//!
//! [`TestCerts::new`] writes, as PEM, into a directory:
//!
//! | file                             | what                                                   |
//! |----------------------------------|--------------------------------------------------------|
//! | `ca.crt`, `ca.key`               | the test CA                                            |
//! | `server.crt`, `server.key`       | `localhost` (SANs DNS localhost, IP 127.0.0.1), by CA |
//! | `other_ca.crt`, `other_ca.key`   | an unrelated CA ("wrong CA" tests)                     |
//! | `expired.crt`, `expired.key`     | like server.crt, but expired (2010 to 2011), by CA     |
//! | `wronghost.crt`, `wronghost.key` | SAN only `example.invalid`, by CA                      |
//! | `client-<cn>.crt/.key`           | [`TestCerts::client_cert`], by CA                      |
//! | `client-other-<cn>.crt/.key`     | [`TestCerts::client_cert_other_ca`], by the other CA   |
//!
//! Keys are PKCS#8 PEM with mode 0600. Fingerprints ([`fingerprint`]) are the SHA-256 of
//! the certificate's DER, in lowercase hex without colons.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rcgen::{
    date_time_ymd, BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use sha2::{Digest, Sha256};

use super::postgres::pg_bindir;
use super::process::run_psql;

/// A CA's certificate and key (to sign with).
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// What kind of leaf certificate to make.
#[derive(Clone, Copy)]
enum Leaf {
    Server,
    Client,
}

/// A test PKI written to a directory; see the module docs for the files.
pub struct TestCerts {
    dir: PathBuf,
    ca: Ca,
    other_ca: Ca,
    /// Held only for [`TestCerts::temp`]: removes the directory on drop.
    _tempdir: Option<tempfile::TempDir>,
}

impl TestCerts {
    /// Make all certificates and write them into `dir` (created if missing; existing files
    /// are overwritten).
    pub fn new(dir: &Path) -> TestCerts {
        TestCerts::create(dir.to_path_buf(), None)
    }

    /// Like [`new`](Self::new), in a fresh temporary directory removed on drop.
    pub fn temp() -> TestCerts {
        let tempdir = tempfile::Builder::new()
            .prefix("pgsilo-certs-")
            .tempdir()
            .expect("create a temporary directory for certificates");
        TestCerts::create(tempdir.path().to_path_buf(), Some(tempdir))
    }

    fn create(dir: PathBuf, tempdir: Option<tempfile::TempDir>) -> TestCerts {
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let ca = make_ca("pgsilo test CA");
        let other_ca = make_ca("pgsilo other test CA");
        write_file(&dir.join("ca.crt"), &ca.cert.pem(), 0o644);
        write_file(&dir.join("ca.key"), &ca.key.serialize_pem(), 0o600);
        write_file(&dir.join("other_ca.crt"), &other_ca.cert.pem(), 0o644);
        write_file(&dir.join("other_ca.key"), &other_ca.key.serialize_pem(), 0o600);
        let certs = TestCerts {
            dir,
            ca,
            other_ca,
            _tempdir: tempdir,
        };
        certs.renew_server();
        let (cert, key) = leaf(&certs.ca, Leaf::Server, "localhost", &["localhost", "127.0.0.1"], true);
        certs.write_pair("expired", &cert, &key);
        let (cert, key) = leaf(&certs.ca, Leaf::Server, "example.invalid", &["example.invalid"], false);
        certs.write_pair("wronghost", &cert, &key);
        certs
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ca.crt`: the CA that signed the server, expired, wronghost and client certificates.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// `ca.key`.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// `other_ca.crt`: an unrelated CA (trusting it must fail verification of our certs).
    pub fn other_ca_cert(&self) -> PathBuf {
        self.dir.join("other_ca.crt")
    }

    /// `other_ca.key`.
    pub fn other_ca_key(&self) -> PathBuf {
        self.dir.join("other_ca.key")
    }

    /// `server.crt`: CN localhost, SANs DNS `localhost` and IP `127.0.0.1`, signed by the
    /// CA. Replaced by [`renew_server`](Self::renew_server).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    /// `server.key`.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// `expired.crt`: like server.crt, but valid only from 2010-01-01 to 2011-01-01.
    pub fn expired_cert(&self) -> PathBuf {
        self.dir.join("expired.crt")
    }

    /// `expired.key`.
    pub fn expired_key(&self) -> PathBuf {
        self.dir.join("expired.key")
    }

    /// `wronghost.crt`: CN and only SAN `example.invalid`, signed by the CA.
    pub fn wronghost_cert(&self) -> PathBuf {
        self.dir.join("wronghost.crt")
    }

    /// `wronghost.key`.
    pub fn wronghost_key(&self) -> PathBuf {
        self.dir.join("wronghost.key")
    }

    /// Fingerprint of the current `server.crt`.
    pub fn server_fingerprint(&self) -> String {
        fingerprint_file(&self.server_cert())
    }

    /// A client certificate (EKU clientAuth) with CN `cn`, signed by the CA: returns
    /// (`client-<cn>.crt`, `client-<cn>.key`). Characters of `cn` other than ASCII
    /// letters, digits, `-`, `_` and `.` are replaced by `_` in the file names.
    pub fn client_cert(&self, cn: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = leaf(&self.ca, Leaf::Client, cn, &[], false);
        self.write_pair(&format!("client-{}", file_stem(cn)), &cert, &key)
    }

    /// Like [`client_cert`](Self::client_cert), but signed by the other CA (a server
    /// trusting only `ca.crt` must reject it): `client-other-<cn>.crt/.key`.
    pub fn client_cert_other_ca(&self, cn: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = leaf(&self.other_ca, Leaf::Client, cn, &[], false);
        self.write_pair(&format!("client-other-{}", file_stem(cn)), &cert, &key)
    }

    /// A server certificate (EKU serverAuth) signed by the CA with CN `cn` and the given
    /// SANs (IP addresses become IP SANs, anything else DNS SANs), written to
    /// `<name>.crt`/`<name>.key`.
    pub fn server_cert_for(&self, name: &str, cn: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = leaf(&self.ca, Leaf::Server, cn, sans, false);
        self.write_pair(&file_stem(name), &cert, &key)
    }

    /// Replace `server.key` and `server.crt` with a new key and a new certificate (same
    /// names, same CA); returns the new certificate's [`fingerprint`]. Each file is
    /// replaced atomically (written aside, then renamed): the key first, then the
    /// certificate, so reload only after this returns.
    pub fn renew_server(&self) -> String {
        let (cert, key) = leaf(&self.ca, Leaf::Server, "localhost", &["localhost", "127.0.0.1"], false);
        self.write_pair("server", &cert, &key);
        fingerprint(cert.der())
    }

    /// Write `<stem>.key` (0600), then `<stem>.crt` (0644), each atomically.
    fn write_pair(&self, stem: &str, cert: &Certificate, key: &KeyPair) -> (PathBuf, PathBuf) {
        let cert_path = self.dir.join(format!("{stem}.crt"));
        let key_path = self.dir.join(format!("{stem}.key"));
        write_file(&key_path, &key.serialize_pem(), 0o600);
        write_file(&cert_path, &cert.pem(), 0o644);
        (cert_path, key_path)
    }
}

fn new_key() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate an ECDSA P-256 key")
}

fn make_ca(cn: &str) -> Ca {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.distinguished_name.push(DnType::OrganizationName, "pgsilo tests");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2120, 1, 1);
    let key = new_key();
    let cert = params.self_signed(&key).expect("self-sign the test CA");
    Ca { cert, key }
}

/// A leaf certificate with a fresh key (so a fresh serial: rcgen derives it from the key).
fn leaf(ca: &Ca, kind: Leaf, cn: &str, sans: &[&str], expired: bool) -> (Certificate, KeyPair) {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).unwrap_or_else(|e| panic!("certificate names for {cn}: {e}"));
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.distinguished_name.push(DnType::OrganizationName, "pgsilo tests");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match kind {
        Leaf::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Leaf::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params.use_authority_key_identifier_extension = true;
    if expired {
        params.not_before = date_time_ymd(2010, 1, 1);
        params.not_after = date_time_ymd(2011, 1, 1);
    } else {
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2120, 1, 1);
    }
    let key = new_key();
    let cert = params
        .signed_by(&key, &ca.cert, &ca.key)
        .unwrap_or_else(|e| panic!("sign the certificate for {cn}: {e}"));
    (cert, key)
}

fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Write `path` atomically (a temporary file in the same directory, renamed over it) with
/// `mode`, whatever the umask.
fn write_file(path: &Path, contents: &str, mode: u32) {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let tmp = path.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
    file.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    file.set_permissions(fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", tmp.display()));
    drop(file);
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), path.display()));
}

// ---------------------------------------------------------------------------------------
// Fingerprints
// ---------------------------------------------------------------------------------------

/// SHA-256 of a certificate's DER, lowercase hex without separators. `cert` is DER, or PEM
/// (the first `CERTIFICATE` block counts). Panics if PEM without a certificate.
pub fn fingerprint(cert: &[u8]) -> String {
    // DER is a SEQUENCE (0x30); anything else is taken for PEM.
    let der = if cert.first() != Some(&0x30) {
        let text = String::from_utf8_lossy(cert);
        first_pem_cert(&text).unwrap_or_else(|| panic!("no CERTIFICATE block in PEM:\n{text}"))
    } else {
        cert.to_vec()
    };
    Sha256::digest(&der).iter().map(|b| format!("{b:02x}")).collect()
}

/// [`fingerprint`] of the (first) certificate in a PEM or DER file.
pub fn fingerprint_file(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    fingerprint(&bytes)
}

/// Bring a fingerprint in another notation (e.g. openssl's `AB:CD:...`, possibly after
/// `sha256 Fingerprint=`) to ours: lowercase hex without separators.
pub fn normalize_fingerprint(text: &str) -> String {
    let text = text.trim();
    let text = text.rsplit_once('=').map_or(text, |(_, hex)| hex);
    text.chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// DER of the first `-----BEGIN CERTIFICATE-----` block of `pem`.
fn first_pem_cert(pem: &str) -> Option<Vec<u8>> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find(BEGIN)? + BEGIN.len();
    let end = start + pem[start..].find(END)?;
    let b64: String = pem[start..end].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

// ---------------------------------------------------------------------------------------
// What a listener serves
// ---------------------------------------------------------------------------------------

/// How long `openssl s_client` may take.
const S_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The leaf certificate (PEM) the TLS server at `host:port` presents, read with
/// `openssl s_client` (no verification: an untrusted or expired certificate is returned
/// too). With `postgres_sslrequest`, TLS starts after PostgreSQL's SSLRequest
/// (`-starttls postgres`); else the handshake starts at once (direct TLS). SNI is `host`
/// unless it is an IP address (then none). `None` if no certificate was received (refused,
/// no TLS, handshake failure, or 30 s timeout).
pub fn served_cert_pem(host: &str, port: u16, postgres_sslrequest: bool) -> Option<String> {
    let ip = host.parse::<IpAddr>().ok();
    let target = match ip {
        Some(IpAddr::V6(_)) => format!("[{host}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &target]);
    if postgres_sslrequest {
        cmd.args(["-starttls", "postgres"]);
    }
    if ip.is_some() {
        cmd.arg("-noservername");
    } else {
        cmd.args(["-servername", host]);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn openssl s_client: {e}"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let deadline = Instant::now() + S_CLIENT_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                // Our own child: kill and reap it (its stdout then closes).
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    let out = reader.join().unwrap_or_default();
    let text = String::from_utf8_lossy(&out);
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = text.find(BEGIN)?;
    let end = start + text[start..].find(END)? + END.len();
    Some(format!("{}\n", &text[start..end]))
}

/// [`fingerprint`] of the certificate the listener at `host:port` serves; see
/// [`served_cert_pem`].
pub fn served_cert_fingerprint(host: &str, port: u16, postgres_sslrequest: bool) -> Option<String> {
    served_cert_pem(host, port, postgres_sslrequest).map(|pem| fingerprint(pem.as_bytes()))
}

/// Run psql (of [`pg_bindir`]) with a libpq connection string, e.g.
/// `host=localhost hostaddr=127.0.0.1 port=N user=postgres dbname=postgres sslmode=verify-full
/// sslrootcert=/path/ca.crt`; `-X -A -t -q -v ON_ERROR_STOP=1`, SQL on stdin. No `PGSSL*`,
/// `PGPASSWORD` or `PGHOST`-style variables from the environment apply. Returns trimmed
/// stdout, or `Err` with the exit status and stderr (e.g. "certificate verify failed").
pub fn psql_conninfo(conninfo: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new(pg_bindir().join("psql"));
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "PGSSLCERT",
        "PGSSLKEY",
        "PGSSLCRL",
        "PGSSLNEGOTIATION",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("-d").arg(conninfo);
    run_psql(&mut cmd, sql)
}

/// `openssl x509 -fingerprint -sha256 -noout -in <cert>`, [normalized](normalize_fingerprint):
/// a check of [`fingerprint`] by another implementation.
pub fn openssl_fingerprint(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-fingerprint", "-sha256", "-noout", "-in"])
        .arg(cert)
        .output()
        .unwrap_or_else(|e| panic!("spawn openssl x509: {e}"));
    assert!(
        out.status.success(),
        "openssl x509 -in {} failed: {}",
        cert.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    normalize_fingerprint(&String::from_utf8_lossy(&out.stdout))
}
