//! The keys of the front door: TLS towards clients and towards PostgreSQL, and the Unix
//! socket. Names, meanings and defaults are PgBouncer's.

use std::fmt;
use std::path::{Path, PathBuf};

use super::section::Section;

/// PgBouncer's `client_tls_sslmode` / `server_tls_sslmode` values (libpq's sslmode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(text: &str) -> Option<SslMode> {
        Self::ALL.into_iter().find(|m| m.as_str().eq_ignore_ascii_case(text))
    }

    /// Plaintext is refused at this mode or above.
    pub fn requires_tls(self) -> bool {
        self >= SslMode::Require
    }

    /// The peer's certificate is checked against the CA at this mode or above.
    pub fn verifies(self) -> bool {
        self >= SslMode::VerifyCa
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// TLS towards clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    /// `client_tls_sslmode`. Default disable.
    pub sslmode: SslMode,
    /// `client_tls_key_file`, `client_tls_cert_file`: required unless disabled.
    pub key_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    /// `client_tls_ca_file`: client certificates are checked against it (verify-ca,
    /// verify-full, and auth_type cert).
    pub ca_file: Option<PathBuf>,
    /// `client_tls_protocols`. Default "secure" (TLS 1.2 and 1.3).
    pub protocols: String,
    /// `client_tls_ciphers`. Default "fast".
    pub ciphers: String,
}

/// TLS towards PostgreSQL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    /// `server_tls_sslmode`. Default prefer, as PgBouncer.
    pub sslmode: SslMode,
    /// `server_tls_ca_file`: for verify-ca/verify-full; the system's roots otherwise.
    pub ca_file: Option<PathBuf>,
    /// `server_tls_key_file`, `server_tls_cert_file`: a client certificate for PostgreSQL.
    pub key_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    /// `server_tls_protocols`. Default "secure".
    pub protocols: String,
    /// `server_tls_ciphers`. Default "fast".
    pub ciphers: String,
}

/// The Unix socket clients may connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixSocket {
    /// `unix_socket_dir`: `.s.PGSQL.<listen_port>` is made there; None (the empty string)
    /// disables it. Default /tmp, as PgBouncer.
    pub dir: Option<PathBuf>,
    /// `unix_socket_mode`. Default 0777.
    pub mode: u32,
    /// `unix_socket_group`: the socket's group; None keeps the process's.
    pub group: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontDoor {
    pub client_tls: ClientTls,
    pub server_tls: ServerTls,
    pub unix_socket: UnixSocket,
}

impl FrontDoor {
    pub const KEYS: &'static [&'static str] = &[
        "client_tls_sslmode",
        "client_tls_key_file",
        "client_tls_cert_file",
        "client_tls_ca_file",
        "client_tls_protocols",
        "client_tls_ciphers",
        "server_tls_sslmode",
        "server_tls_ca_file",
        "server_tls_key_file",
        "server_tls_cert_file",
        "server_tls_protocols",
        "server_tls_ciphers",
        "unix_socket_dir",
        "unix_socket_mode",
        "unix_socket_group",
    ];

    pub fn defaults() -> FrontDoor {
        FrontDoor {
            client_tls: ClientTls {
                sslmode: SslMode::Disable,
                key_file: None,
                cert_file: None,
                ca_file: None,
                protocols: "secure".into(),
                ciphers: "fast".into(),
            },
            server_tls: ServerTls {
                sslmode: SslMode::Prefer,
                ca_file: None,
                key_file: None,
                cert_file: None,
                protocols: "secure".into(),
                ciphers: "fast".into(),
            },
            unix_socket: UnixSocket {
                dir: Some(PathBuf::from("/tmp")),
                mode: 0o777,
                group: None,
            },
        }
    }

    pub(super) fn read(section: &mut Section, config_path: &Path) -> FrontDoor {
        let d = FrontDoor::defaults();
        let folder = config_path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let file = |section: &mut Section, key: &'static str| -> Option<PathBuf> {
            match section.string(key) {
                Some((f, _)) if f.trim().is_empty() => None,
                Some((f, _)) => Some(folder.join(f.trim())),
                None => None,
            }
        };
        let mode = |section: &mut Section, key: &'static str| {
            let (text, span) = section.string(key)?;
            let parsed = SslMode::parse(text.trim());
            if parsed.is_none() {
                let choices = SslMode::ALL.map(SslMode::as_str).join(", ");
                section.invalid(
                    key,
                    span.as_ref(),
                    format!("\"{text}\" is not supported; expected one of {choices}"),
                );
            }
            parsed
        };
        let text = |section: &mut Section, key: &'static str, default: &str| {
            section
                .string(key)
                .map(|(t, _)| t)
                .unwrap_or_else(|| default.to_string())
        };

        let client_span = section.span_of("client_tls_sslmode");
        let client_tls = ClientTls {
            sslmode: mode(section, "client_tls_sslmode").unwrap_or(d.client_tls.sslmode),
            key_file: file(section, "client_tls_key_file"),
            cert_file: file(section, "client_tls_cert_file"),
            ca_file: file(section, "client_tls_ca_file"),
            protocols: text(section, "client_tls_protocols", &d.client_tls.protocols),
            ciphers: text(section, "client_tls_ciphers", &d.client_tls.ciphers),
        };
        if client_tls.sslmode != SslMode::Disable && (client_tls.key_file.is_none() || client_tls.cert_file.is_none()) {
            section.invalid(
                "client_tls_sslmode",
                client_span.as_ref(),
                "needs client_tls_key_file and client_tls_cert_file (or set it to disable)",
            );
        }
        if client_tls.sslmode.verifies() && client_tls.ca_file.is_none() {
            section.invalid(
                "client_tls_sslmode",
                client_span.as_ref(),
                "verify-ca and verify-full need client_tls_ca_file to check client certificates against",
            );
        }
        let server_tls = ServerTls {
            sslmode: mode(section, "server_tls_sslmode").unwrap_or(d.server_tls.sslmode),
            ca_file: file(section, "server_tls_ca_file"),
            key_file: file(section, "server_tls_key_file"),
            cert_file: file(section, "server_tls_cert_file"),
            protocols: text(section, "server_tls_protocols", &d.server_tls.protocols),
            ciphers: text(section, "server_tls_ciphers", &d.server_tls.ciphers),
        };
        for (key, value) in [
            ("client_tls_protocols", &client_tls.protocols),
            ("server_tls_protocols", &server_tls.protocols),
        ] {
            if let Err(why) = parse_protocols(value) {
                let span = section.span_of(key);
                section.invalid(key, span.as_ref(), why);
            }
        }
        let unix_dir = match section.string("unix_socket_dir") {
            Some((dir, _)) if dir.trim().is_empty() => None,
            Some((dir, _)) => Some(PathBuf::from(dir.trim())),
            None => d.unix_socket.dir,
        };
        let unix_mode = match section.string("unix_socket_mode") {
            Some((text, span)) => match u32::from_str_radix(text.trim().trim_start_matches("0o"), 8) {
                Ok(m) if m <= 0o777 => m,
                _ => {
                    section.invalid(
                        "unix_socket_mode",
                        span.as_ref(),
                        format!("\"{text}\" is not an octal file mode such as \"0777\""),
                    );
                    d.unix_socket.mode
                }
            },
            None => d.unix_socket.mode,
        };
        let unix_group = section
            .string("unix_socket_group")
            .map(|(g, _)| g.trim().to_string())
            .filter(|g| !g.is_empty());
        FrontDoor {
            client_tls,
            server_tls,
            unix_socket: UnixSocket {
                dir: unix_dir,
                mode: unix_mode,
                group: unix_group,
            },
        }
    }

    pub fn config_items(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let c = &self.client_tls;
        let s = &self.server_tls;
        let u = &self.unix_socket;
        vec![
            ("client_tls_sslmode", c.sslmode.to_string()),
            ("client_tls_key_file", path(&c.key_file)),
            ("client_tls_cert_file", path(&c.cert_file)),
            ("client_tls_ca_file", path(&c.ca_file)),
            ("client_tls_protocols", c.protocols.clone()),
            ("client_tls_ciphers", c.ciphers.clone()),
            ("server_tls_sslmode", s.sslmode.to_string()),
            ("server_tls_ca_file", path(&s.ca_file)),
            ("server_tls_key_file", path(&s.key_file)),
            ("server_tls_cert_file", path(&s.cert_file)),
            ("server_tls_protocols", s.protocols.clone()),
            ("server_tls_ciphers", s.ciphers.clone()),
            ("unix_socket_dir", path(&u.dir)),
            ("unix_socket_mode", format!("{:04o}", u.mode)),
            ("unix_socket_group", u.group.clone().unwrap_or_default()),
        ]
    }
}

/// The TLS versions a `*_tls_protocols` value allows: PgBouncer's words (`all`,
/// `secure`, `legacy`, `tlsv1.0` … `tlsv1.3`, comma or space separated). rustls speaks
/// only TLS 1.2 and 1.3, so older versions are accepted in the list and never offered.
/// Returns (tls12, tls13).
pub fn parse_protocols(text: &str) -> Result<(bool, bool), String> {
    let (mut v12, mut v13) = (false, false);
    for word in text.split([',', ' ', ':']).map(str::trim).filter(|w| !w.is_empty()) {
        match word.to_ascii_lowercase().as_str() {
            "all" | "secure" | "legacy" | "normal" => {
                v12 = true;
                v13 = true;
            }
            "tlsv1.2" => v12 = true,
            "tlsv1.3" => v13 = true,
            "tlsv1" | "tlsv1.0" | "tlsv1.1" => {}
            other => {
                return Err(format!(
                    "unknown TLS protocol \"{other}\"; expected all, secure, tlsv1.2 or tlsv1.3"
                ))
            }
        }
    }
    if !v12 && !v13 {
        return Err("allows no TLS version pgsilo supports (TLS 1.2, TLS 1.3)".to_string());
    }
    Ok((v12, v13))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_follow_pgbouncer_words() {
        assert_eq!(parse_protocols("secure"), Ok((true, true)));
        assert_eq!(parse_protocols("tlsv1.3"), Ok((false, true)));
        assert_eq!(parse_protocols("tlsv1.2, tlsv1.3"), Ok((true, true)));
        assert!(parse_protocols("tlsv1.1").is_err());
        assert!(parse_protocols("sslv3").is_err());
    }

    #[test]
    fn modes_order_by_strictness() {
        assert!(SslMode::Require.requires_tls());
        assert!(!SslMode::Prefer.requires_tls());
        assert!(SslMode::VerifyFull.verifies());
        assert!(!SslMode::Require.verifies());
    }
}
