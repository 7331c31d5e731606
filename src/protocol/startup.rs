//! The untyped first packet a client sends: a startup message, or one of the requests
//! that share its framing (SSL, GSS encryption, cancel).

use super::framing::read_cstr;
use super::ProtocolError;

pub const PROTOCOL_3_0: u32 = 3 << 16;
pub const SSL_REQUEST: u32 = 80877103;
pub const GSSENC_REQUEST: u32 = 80877104;
pub const CANCEL_REQUEST: u32 = 80877102;
/// PostgreSQL's own limit on a startup packet (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_LEN: u32 = 10_000;

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: u32, secret: Vec<u8> },
    Startup(Startup),
}

#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Startup {
    /// The minor protocol version the client asked for (major is always 3 here).
    pub minor: u16,
    /// Parameters in the order sent, without protocol options (`_pq_.*`).
    pub params: Vec<(String, String)>,
    /// `_pq_.*` protocol options the client asked for; we support none and say so.
    pub protocol_options: Vec<String>,
}

impl Startup {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The declared length of the packet at the front of `bytes`, once four bytes are there.
pub fn declared_len(bytes: &[u8]) -> Option<Result<usize, ProtocolError>> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Some(Err(ProtocolError::BadStartupLength(len)));
    }
    Some(Ok(len as usize))
}

/// Parses a whole packet (length word included).
pub fn parse(packet: &[u8]) -> Result<StartupPacket, ProtocolError> {
    let code = packet
        .get(4..8)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(ProtocolError::BadStartup("packet shorter than 8 bytes"))?;
    match code {
        SSL_REQUEST => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST => {
            let pid = packet
                .get(8..12)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(ProtocolError::BadStartup("cancel request without a process id"))?;
            let secret = packet.get(12..).unwrap_or_default().to_vec();
            if secret.is_empty() {
                return Err(ProtocolError::BadStartup("cancel request without a secret key"));
            }
            Ok(StartupPacket::Cancel { pid, secret })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedProtocol { major, minor });
            }
            parse_params(&packet[8..], minor).map(StartupPacket::Startup)
        }
    }
}

fn parse_params(body: &[u8], minor: u16) -> Result<Startup, ProtocolError> {
    let mut params = Vec::new();
    let mut protocol_options = Vec::new();
    let mut at = 0;
    loop {
        let (name, next) = read_cstr(body, at).ok_or(ProtocolError::BadStartup("missing terminator"))?;
        if name.is_empty() {
            if next != body.len() {
                return Err(ProtocolError::BadStartup("data after the final terminator"));
            }
            break;
        }
        let (value, next) = read_cstr(body, next).ok_or(ProtocolError::BadStartup("parameter without a value"))?;
        let name = std::str::from_utf8(name).map_err(|_| ProtocolError::BadStartup("parameter name is not UTF-8"))?;
        let value =
            std::str::from_utf8(value).map_err(|_| ProtocolError::BadStartup("parameter value is not UTF-8"))?;
        if name.starts_with("_pq_.") {
            protocol_options.push(name.to_string());
        } else {
            params.push((name.to_string(), value.to_string()));
        }
        at = next;
    }
    Ok(Startup {
        minor,
        params,
        protocol_options,
    })
}

/// Splits a libpq `options` value into settings: `-c name=value`, `-cname=value` and
/// `--name=value`, with backslash escaping spaces as PostgreSQL's pg_split_opts does.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                    in_word = true;
                }
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    let mut settings = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let assignment = if w == "-c" {
            it.next().ok_or_else(|| "option -c without a setting".to_string())?
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_string()
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_string()
        } else {
            return Err(format!("unsupported option \"{w}\" (only -c name=value is supported)"));
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("option \"{assignment}\" has no value"))?;
        // PostgreSQL accepts dashes for underscores in option names.
        settings.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut p = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn parses_startup_parameters() {
        let p = packet(PROTOCOL_3_0, b"user\0alice\0database\0db\0_pq_.x\0y\0\0");
        match parse(&p).unwrap() {
            StartupPacket::Startup(s) => {
                assert_eq!(s.get("user"), Some("alice"));
                assert_eq!(s.get("database"), Some("db"));
                assert_eq!(s.protocol_options, vec!["_pq_.x".to_string()]);
                assert_eq!(s.minor, 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn recognises_special_requests() {
        assert_eq!(parse(&packet(SSL_REQUEST, b"")).unwrap(), StartupPacket::SslRequest);
        assert_eq!(
            parse(&packet(GSSENC_REQUEST, b"")).unwrap(),
            StartupPacket::GssEncRequest
        );
        let mut body = 42u32.to_be_bytes().to_vec();
        body.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            parse(&packet(CANCEL_REQUEST, &body)).unwrap(),
            StartupPacket::Cancel {
                pid: 42,
                secret: 7u32.to_be_bytes().to_vec()
            }
        );
    }

    #[test]
    fn rejects_malformed_packets() {
        assert!(parse(&packet(PROTOCOL_3_0, b"user\0alice")).is_err());
        assert!(parse(&packet(PROTOCOL_3_0, b"user\0alice\0\0junk")).is_err());
        assert!(parse(&packet(2 << 16, b"\0")).is_err());
        assert!(parse(&[0, 0, 0, 8]).is_err());
        assert!(matches!(declared_len(&[0, 0, 0, 3]), Some(Err(_))));
        assert!(matches!(declared_len(&[0, 1, 0, 0]), Some(Err(_))));
        assert!(matches!(declared_len(&[0, 0, 0, 9]), Some(Ok(9))));
        assert!(declared_len(&[0, 0]).is_none());
    }

    #[test]
    fn splits_options_like_postgres() {
        let s = parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=64MB").unwrap();
        assert_eq!(
            s,
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "64MB".into())
            ]
        );
        let s = parse_options(r"-c application_name=my\ app").unwrap();
        assert_eq!(s, vec![("application_name".into(), "my app".into())]);
        assert!(parse_options("-x").is_err());
        assert!(parse_options("-c").is_err());
    }
}
