//! The PostgreSQL wire protocol by hand, over a blocking `TcpStream`: for tests that must
//! send what no well-behaved client sends, and read exactly what comes back.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST: u32 = 80_877_103;

/// A startup message (protocol 3.0) with these parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    with_length(&body)
}

/// `body` prefixed with its length (counting the length word), as startup packets are.
pub fn with_length(body: &[u8]) -> Vec<u8> {
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// A regular message: type byte, length, body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A simple Query message.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// The fields of an ErrorResponse / NoticeResponse body, by field type ('C', 'M', 'S'...).
pub fn error_fields(body: &[u8]) -> HashMap<u8, String> {
    let mut fields = HashMap::new();
    let mut at = 0;
    while at < body.len() && body[at] != 0 {
        let kind = body[at];
        let rest = &body[at + 1..];
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        fields.insert(kind, String::from_utf8_lossy(&rest[..end]).into_owned());
        at += 1 + end + 1;
    }
    fields
}

/// A raw client connection.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let stream =
            TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = stream.set_nodelay(true);
        Raw { stream }
    }

    /// Writes bytes; false if the peer had already closed (a reset or broken pipe).
    pub fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// One byte (the answer to SSLRequest), or None at EOF.
    pub fn read_byte(&mut self) -> Option<u8> {
        let mut b = [0u8; 1];
        match self.stream.read_exact(&mut b) {
            Ok(()) => Some(b[0]),
            Err(_) => None,
        }
    }

    /// The next message (type byte and body), or None at EOF / reset. Panics on timeout.
    pub fn read_message(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        if let Err(e) = self.stream.read_exact(&mut header) {
            return eof_or_panic(e);
        }
        let len = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
        assert!(len >= 4, "server sent a message with length {len}");
        let mut body = vec![0u8; len - 4];
        if let Err(e) = self.stream.read_exact(&mut body) {
            return eof_or_panic(e);
        }
        Some((header[0], body))
    }

    /// Reads messages until an ErrorResponse; returns its fields. Panics if the
    /// connection ends first.
    #[track_caller]
    pub fn expect_error(&mut self) -> HashMap<u8, String> {
        let mut seen = Vec::new();
        loop {
            match self.read_message() {
                Some((b'E', body)) => return error_fields(&body),
                Some((tag, _)) => seen.push(tag as char),
                None => panic!("connection ended without an ErrorResponse (saw {seen:?})"),
            }
        }
    }

    /// True when the peer closed the connection (EOF or reset) with nothing more to read.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
            ),
        }
    }

    /// Logs in with a startup message, answering cleartext and md5 password requests
    /// with `password`, and reads up to the first ReadyForQuery.
    pub fn login(&mut self, user: &str, password: &str, db: &str) {
        assert!(self.send(&startup_message(&[("user", user), ("database", db)])));
        loop {
            let (tag, body) = self.read_message().expect("connection closed during login");
            match tag {
                b'R' => {
                    let code = u32::from_be_bytes(body[..4].try_into().unwrap());
                    match code {
                        0 => {}
                        3 => {
                            let mut p = password.as_bytes().to_vec();
                            p.push(0);
                            self.send(&message(b'p', &p));
                        }
                        5 => {
                            let salt: [u8; 4] = body[4..8].try_into().unwrap();
                            let hash =
                                postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
                            let mut p = hash.into_bytes();
                            p.push(0);
                            self.send(&message(b'p', &p));
                        }
                        other => panic!("raw login: unsupported authentication request {other}"),
                    }
                }
                b'E' => panic!("raw login failed: {:?}", error_fields(&body)),
                b'Z' => return,
                _ => {}
            }
        }
    }

    /// Sends a simple query and collects the messages up to ReadyForQuery.
    pub fn simple_query(&mut self, sql: &str) -> Vec<(u8, Vec<u8>)> {
        assert!(self.send(&query(sql)), "send query");
        let mut out = Vec::new();
        loop {
            let m = self.read_message().expect("connection closed during query");
            let done = m.0 == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }
}

fn eof_or_panic<T>(e: std::io::Error) -> Option<T> {
    match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => None,
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            panic!("no answer from the server within the read timeout")
        }
        _ => panic!("read failed: {e}"),
    }
}
